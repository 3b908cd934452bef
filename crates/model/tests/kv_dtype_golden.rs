//! The transformers goldens (computed with an f32 KV cache) with Quiver's cache in bf16 and f16.
//!
//! Tolerance: rounding K and V to bf16 (8 significant bits, relative error ≤ 2^-9) or f16 (11
//! bits, ≤ 2^-12) perturbs every attention output by about that fraction of the V rows it mixes,
//! and the test kit's small random models amplify it through their layers. Last-position logits
//! must stay within [`BF16_TOL`] / [`F16_TOL`] max-abs of transformers' (measured worst cases
//! over the five models are reported by the test and are several times smaller), and greedy
//! tokens must match except after a step whose golden top-1/top-2 margin is below twice the
//! tolerance, where rounding may legitimately flip the choice. A bug (unrounded garbage,
//! truncation on every value, a wrong row) moves logits by orders of magnitude more.

use anyhow::{ensure, Context, Result};
use quiver_model::generate::{generate_greedy, BLOCK_SIZE};
use quiver_model::{BatchBuilder, BlockAllocator, ModelBundle, SequenceCache};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType};
use quiver_testkit::{materialize, max_abs_diff};

const BF16_TOL: f32 = 5e-2;
const F16_TOL: f32 = 1e-2;
const MODELS: &[&str] = &[
    "llama-f32",
    "llama-bf16-tied-sharded",
    "qwen2-f32-tied",
    "qwen2-bf16-linear",
    "mistral-f32",
];

fn check(name: &str, dtype: DType, tol: f32) -> Result<f32> {
    let (dir, golden) = materialize(name)?;
    let mut bundle =
        ModelBundle::load(CpuBackend::default(), dir.path(), None).with_context(|| format!("loading {name}"))?;
    bundle.model.set_kv_dtype(dtype);
    let model = &bundle.model;
    ensure!(model.kv_layout(1, 16).dtype == dtype, "the layout follows set_kv_dtype");
    let mut worst = 0.0f32;
    for (i, p) in golden.prompts.iter().enumerate() {
        // Prefill only: the last position's logits.
        let mut alloc = BlockAllocator::new(p.ids.len().div_ceil(BLOCK_SIZE), BLOCK_SIZE);
        let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
        let mut seq = SequenceCache::default();
        seq.reserve(&mut alloc, p.ids.len())
            .map_err(|_| anyhow::anyhow!("out of blocks"))?;
        let mut b = BatchBuilder::new();
        b.push(&mut seq, BLOCK_SIZE, &p.ids, true);
        let logits = model.backend.download(&model.forward(&b.finish(), &mut kv)?)?;
        let d = max_abs_diff(&logits, &p.last_logits);
        worst = worst.max(d);
        ensure!(
            d <= tol,
            "{name} ({dtype} KV) prompt {i}: last logits differ by {d} (tolerance {tol})"
        );
        let got = generate_greedy(model, &p.ids, p.greedy.len(), &[], None, |_| {})?;
        for (step, (g, want)) in got.iter().zip(&p.greedy).enumerate() {
            if g != want {
                ensure!(
                    p.greedy_margins[step] < 2.0 * tol,
                    "{name} ({dtype} KV) prompt {i}: greedy token {step} is {g}, transformers chose {want} (margin {})",
                    p.greedy_margins[step]
                );
                break;
            }
        }
    }
    Ok(worst)
}

#[test]
fn goldens_hold_with_a_bf16_kv_cache() -> Result<()> {
    for name in MODELS {
        let worst = check(name, DType::BF16, BF16_TOL)?;
        eprintln!("{name}: bf16 KV, worst last-logit |Δ| {worst:.2e} (tolerance {BF16_TOL:.0e})");
    }
    Ok(())
}

#[test]
fn goldens_hold_with_an_f16_kv_cache() -> Result<()> {
    for name in MODELS {
        let worst = check(name, DType::F16, F16_TOL)?;
        eprintln!("{name}: f16 KV, worst last-logit |Δ| {worst:.2e} (tolerance {F16_TOL:.0e})");
    }
    Ok(())
}

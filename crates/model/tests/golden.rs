//! Quiver against transformers: the test kit's models, and goldens computed from those exact
//! files by `tests/oracle/make_goldens.py`.
//!
//! Tolerance: last-position logits within 1e-3 max-abs (weights are f32 or bf16-exact and all
//! compute is f32, so only summation order differs). Greedy tokens must match except after a
//! step whose golden top-1/top-2 margin is below 1e-3, where either choice is legitimate.

use anyhow::{ensure, Context, Result};
use quiver_model::generate::{argmax, generate_greedy, BLOCK_SIZE};
use quiver_model::{BatchBuilder, BlockAllocator, ModelBundle, SequenceCache};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::Backend;
use quiver_testkit::{materialize, max_abs_diff, Golden};

const LOGIT_TOL: f32 = 1e-3;
const TIE_MARGIN: f32 = 1e-3;
const MODELS: &[&str] = &[
    "llama-f32",
    "llama-bf16-tied-sharded",
    "qwen2-f32-tied",
    "qwen2-bf16-linear",
    "mistral-f32",
];

fn check_greedy(name: &str, i: usize, got: &[u32], golden: &Golden) -> Result<()> {
    let p = &golden.prompts[i];
    for (step, (g, want)) in got.iter().zip(&p.greedy).enumerate() {
        if g != want {
            ensure!(
                p.greedy_margins[step] < TIE_MARGIN,
                "{name} prompt {i}: greedy token {step} is {g}, transformers chose {want} (margin {})",
                p.greedy_margins[step]
            );
            return Ok(()); // a near-tie flipped; later tokens legitimately diverge
        }
    }
    ensure!(
        got.len() == p.greedy.len(),
        "{name} prompt {i}: {} greedy tokens, expected {}",
        got.len(),
        p.greedy.len()
    );
    Ok(())
}

fn check_model(name: &str) -> Result<()> {
    let (dir, golden) = materialize(name)?;
    let bundle =
        ModelBundle::load(CpuBackend::default(), dir.path(), None).with_context(|| format!("loading {name}"))?;
    let model = &bundle.model;
    for (i, p) in golden.prompts.iter().enumerate() {
        let ids = bundle.tokenizer.encode(&p.text, true)?;
        ensure!(
            ids == p.ids,
            "{name} prompt {i}: token ids {ids:?}, transformers {:?}",
            p.ids
        );
        // One prompt alone: prefill logits and the greedy continuation (KV cache, one token a step).
        let got = generate_greedy(model, &p.ids, p.greedy.len(), &[], None, |_| {})?;
        check_greedy(name, i, &got, &golden)?;
    }

    // All prompts in one ragged batch, prompt 0 already decoding while the others prefill.
    let n = golden.prompts.len();
    let mut alloc = BlockAllocator::new(64, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seqs = vec![SequenceCache::default(); n];
    let first = &golden.prompts[0];
    seqs[0]
        .reserve(&mut alloc, first.ids.len())
        .map_err(|_| anyhow::anyhow!("out of blocks"))?;
    let mut b = BatchBuilder::new();
    b.push(&mut seqs[0], BLOCK_SIZE, &first.ids, true);
    let logits = model.backend.download(&model.forward(&b.finish(), &mut kv)?)?;
    let d = max_abs_diff(&logits, &first.last_logits);
    ensure!(
        d <= LOGIT_TOL,
        "{name} prompt 0: last logits differ by {d} (tolerance {LOGIT_TOL})"
    );

    let mut b = BatchBuilder::new();
    seqs[0]
        .reserve(&mut alloc, 1)
        .map_err(|_| anyhow::anyhow!("out of blocks"))?;
    b.push(&mut seqs[0], BLOCK_SIZE, &first.greedy[..1], true);
    for (i, p) in golden.prompts.iter().enumerate().skip(1) {
        seqs[i]
            .reserve(&mut alloc, p.ids.len())
            .map_err(|_| anyhow::anyhow!("out of blocks"))?;
        b.push(&mut seqs[i], BLOCK_SIZE, &p.ids, true);
    }
    let vocab = model.cfg.vocab_size;
    let logits = model.backend.download(&model.forward(&b.finish(), &mut kv)?)?;
    let decode_row = &logits[..vocab];
    if first.greedy_margins[1] >= TIE_MARGIN {
        ensure!(
            argmax(decode_row) == first.greedy[1],
            "{name}: batched decode step chose {} not {}",
            argmax(decode_row),
            first.greedy[1]
        );
    }
    for (i, p) in golden.prompts.iter().enumerate().skip(1) {
        let d = max_abs_diff(&logits[i * vocab..(i + 1) * vocab], &p.last_logits);
        ensure!(
            d <= LOGIT_TOL,
            "{name} prompt {i} in a ragged batch: last logits differ by {d} (tolerance {LOGIT_TOL})"
        );
    }
    for s in &mut seqs {
        s.release(&mut alloc);
    }
    ensure!(alloc.num_free() == alloc.total(), "{name}: blocks leaked");

    let tmpl = bundle
        .chat_template
        .as_ref()
        .context("golden model has no chat template")?;
    for (i, c) in golden.chat.iter().enumerate() {
        let msgs: Vec<serde_json::Value> = c
            .messages
            .iter()
            .map(|m| serde_json::json!({"role": m.role, "content": m.content}))
            .collect();
        let text = tmpl.render(&msgs, true, None)?;
        let ids = bundle.tokenizer.encode(&text, false)?;
        ensure!(
            ids == c.ids,
            "{name} chat {i}: ids {ids:?}\ntransformers {:?}\nrendered {text:?}",
            c.ids
        );
    }
    Ok(())
}

#[test]
fn goldens_match_transformers() -> Result<()> {
    let mut failures = Vec::new();
    for name in MODELS {
        if let Err(e) = check_model(name) {
            failures.push(format!("{name}: {e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Last-position logits of one prompt prefilled alone in a fresh cache.
fn prefill_logits(model: &quiver_model::Llama<CpuBackend>, ids: &[u32]) -> Result<Vec<f32>> {
    let mut alloc = BlockAllocator::new(ids.len().div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seq = SequenceCache::default();
    seq.reserve(&mut alloc, ids.len())
        .map_err(|_| anyhow::anyhow!("out of blocks"))?;
    let mut b = BatchBuilder::new();
    b.push(&mut seq, BLOCK_SIZE, ids, true);
    Ok(model.backend.download(&model.forward(&b.finish(), &mut kv)?)?)
}

/// f16 checkpoints load and run in f16 (widened in the kernels). The weights are rounded, so the
/// golden holds only approximately: logits within 0.05 of the f32 model's.
#[test]
fn f16_checkpoint_runs_close_to_f32() -> Result<()> {
    use safetensors::tensor::TensorView;
    use safetensors::{Dtype, SafeTensors};
    let (dir, golden) = materialize("llama-f32")?;
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut converted = Vec::new();
    for (name, v) in st.tensors() {
        ensure!(v.dtype() == Dtype::F32, "fixture is not f32");
        let data: Vec<u8> = v
            .data()
            .chunks_exact(4)
            .flat_map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        converted.push((name, v.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = converted
        .iter()
        .map(|(n, s, d)| Ok((n.clone(), TensorView::new(Dtype::F16, s.clone(), d)?)))
        .collect::<Result<_>>()?;
    std::fs::write(&path, safetensors::serialize(views, None)?)?;
    let bundle = ModelBundle::load(CpuBackend::default(), dir.path(), None)?;
    let p = &golden.prompts[2];
    let d = max_abs_diff(&prefill_logits(&bundle.model, &p.ids)?, &p.last_logits);
    ensure!(d > 0.0 && d <= 0.05, "f16 logits differ from the f32 golden by {d}");
    Ok(())
}

/// With `--matmul-precision bf16` the activations are rounded to bf16 at every matmul input of
/// a prefill (≥ 24 rows), as llama.cpp does: the logits move off the f32 golden, but only by the
/// rounding. Tolerance: 1% of the largest |logit| (measured 0.3-0.55% on these models, i.e.
/// 0.03-0.047 on logits up to ~9). On a CPU without AVX512_BF16 the option falls back to f32 and
/// the logits must then match as tightly as the f32 path.
#[test]
fn bf16_activations_stay_close_to_the_goldens() -> Result<()> {
    use quiver_tensor::cpu::{bf16_activations_supported, Precision};
    const BF16_REL_TOL: f32 = 0.01;
    let mut checked = 0;
    for name in ["llama-bf16-tied-sharded", "qwen2-bf16-linear"] {
        let (dir, golden) = materialize(name)?;
        let backend = CpuBackend::with_precision(Precision::Bf16Activations);
        let bundle = ModelBundle::load(backend, dir.path(), None)?;
        for (i, p) in golden.prompts.iter().enumerate().filter(|(_, p)| p.ids.len() >= 24) {
            let d = max_abs_diff(&prefill_logits(&bundle.model, &p.ids)?, &p.last_logits);
            let scale = p.last_logits.iter().fold(0f32, |a, v| a.max(v.abs()));
            eprintln!(
                "{name} prompt {i} ({} tokens): bf16 activations differ by {d} (max |logit| {scale})",
                p.ids.len()
            );
            if bf16_activations_supported() {
                // Nonzero: the bf16 path really ran (f32 agrees to ~1e-6 here).
                ensure!(
                    d > 1e-4 && d <= BF16_REL_TOL * scale,
                    "{name} prompt {i}: bf16-activation logits differ by {d} (expected 1e-4 < d ≤ {BF16_REL_TOL} × {scale})"
                );
            } else {
                ensure!(d <= LOGIT_TOL, "{name} prompt {i}: f32 fallback differs by {d}");
            }
            checked += 1;
        }
    }
    ensure!(checked >= 2, "no golden prompt long enough for the bf16 path");
    Ok(())
}

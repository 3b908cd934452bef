//! Quiver's LoRA against transformers + PEFT on the test kit's adapters: each adapter alone
//! (logits and greedy decoding through the paged kernels), the same adapters merged into the
//! base, and one mixed batch of base rows and several adapters (PEFT's `adapter_names=`).
//!
//! Tolerance: 1e-3 max-abs on logits (f32 base, f32/bf16-exact adapters, f32 compute). Greedy
//! tokens may differ only after a golden step whose top-1/top-2 margin is below 1e-3.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{anyhow, ensure, Context, Result};
use quiver_adapters::{load_peft_adapter, HostAdapter};
use quiver_model::generate::{generate_greedy, BLOCK_SIZE};
use quiver_model::{lora_page_size, BatchBuilder, BlockAllocator, LoraAdapter, ModelBundle, SequenceCache};
use quiver_tensor::cpu::{CpuBackend, CpuPagePool};
use quiver_tensor::{Backend, DType};
use quiver_testkit::{load_golden, materialize_lora, max_abs_diff};

const LOGIT_TOL: f32 = 1e-3;
const TIE_MARGIN: f32 = 1e-3;

struct Loaded {
    bundle: ModelBundle<CpuBackend>,
    pool: CpuPagePool,
    pages: BlockAllocator,
    host: BTreeMap<String, HostAdapter>,
    device: BTreeMap<String, Arc<LoraAdapter>>,
}

fn load(base: &str) -> Result<(tempfile::TempDir, quiver_testkit::LoraGolden, Loaded)> {
    let (dir, golden) = materialize_lora(base)?;
    let bundle = ModelBundle::load(CpuBackend::default(), &dir.path().join("base"), None)?;
    let cfg = bundle.model.cfg.clone();
    let page = lora_page_size(&cfg);
    let mut pages = BlockAllocator::new(16384, page);
    let mut pool = bundle.model.backend.new_page_pool(page, pages.total(), DType::F32)?;
    let (mut host, mut device) = (BTreeMap::new(), BTreeMap::new());
    for name in golden.adapters.keys() {
        let h = load_peft_adapter(name, &dir.path().join("adapters").join(name), &cfg)?;
        let d = LoraAdapter::upload(name, &h.modules, &cfg, &bundle.model.backend, &mut pool, &mut pages)?;
        host.insert(name.clone(), h);
        device.insert(name.clone(), Arc::new(d));
    }
    Ok((
        dir,
        golden,
        Loaded {
            bundle,
            pool,
            pages,
            host,
            device,
        },
    ))
}

fn check_base(base: &str) -> Result<()> {
    let (_dir, golden, mut l) = load(base)?;
    let vocab = l.bundle.model.cfg.vocab_size;
    for (i, s) in golden.single.iter().enumerate() {
        let adapter = l.device.get(&s.adapter).context("unknown adapter in golden")?;
        let model = &l.bundle.model;
        // Prefill logits through the paged kernels.
        let mut alloc = BlockAllocator::new(16, BLOCK_SIZE);
        let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
        let mut seq = SequenceCache::default();
        seq.reserve(&mut alloc, s.ids.len())
            .map_err(|_| anyhow!("out of blocks"))?;
        let mut b = BatchBuilder::new();
        b.push_with_adapter(&mut seq, BLOCK_SIZE, &s.ids, true, Some(adapter));
        let logits = model
            .backend
            .download(&model.forward_with_adapters(&b.finish(), &mut kv, Some(&l.pool))?)?;
        let d = max_abs_diff(&logits, &s.last_logits);
        ensure!(
            d <= LOGIT_TOL,
            "{base} single {i} ({}): logits differ by {d}",
            s.adapter
        );
        // Greedy decoding, one token a step.
        let got = generate_greedy(model, &s.ids, s.greedy.len(), &[], Some((&l.pool, adapter)), |_| {})?;
        for (step, (g, w)) in got.iter().zip(&s.greedy).enumerate() {
            if g != w {
                ensure!(
                    s.greedy_margins[step] < TIE_MARGIN,
                    "{base} single {i} ({}): greedy step {step} {g} vs {w}",
                    s.adapter
                );
                break;
            }
        }
    }

    // Merged mode: the adapter folded into the (f32) base weights gives the same logits; unmerging
    // restores the base model exactly.
    let base_golden = load_golden(base)?;
    let prompt = &base_golden.prompts[1];
    for (i, s) in golden.single.iter().enumerate() {
        let host = &l.host[&s.adapter];
        l.bundle.model.merge(&s.adapter, &host.modules)?;
        let got = last_logits(&l.bundle, &s.ids)?;
        let d = max_abs_diff(&got, &s.last_logits);
        ensure!(
            d <= LOGIT_TOL,
            "{base} merged {i} ({}): logits differ by {d}",
            s.adapter
        );
        ensure!(
            l.bundle.model.unmerge().as_deref() == Some(s.adapter.as_str()),
            "unmerge returned another name"
        );
        let d = max_abs_diff(&last_logits(&l.bundle, &prompt.ids)?, &prompt.last_logits);
        ensure!(
            d <= LOGIT_TOL,
            "{base}: after unmerging {} the base logits differ by {d}",
            s.adapter
        );
    }

    // Mixed batch: every row in one ragged forward, each with its own adapter (or none).
    let model = &l.bundle.model;
    let rows = &golden.mixed.rows;
    let mut alloc = BlockAllocator::new(64, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut b = BatchBuilder::new();
    let mut seqs = vec![SequenceCache::default(); rows.len()];
    for (row, seq) in rows.iter().zip(seqs.iter_mut()) {
        seq.reserve(&mut alloc, row.ids.len())
            .map_err(|_| anyhow!("out of blocks"))?;
        let adapter = row
            .adapter
            .as_ref()
            .map(|n| l.device.get(n).context("unknown adapter"))
            .transpose()?;
        b.push_with_adapter(seq, BLOCK_SIZE, &row.ids, true, adapter);
    }
    let logits = model
        .backend
        .download(&model.forward_with_adapters(&b.finish(), &mut kv, Some(&l.pool))?)?;
    for (i, want) in golden.mixed.last_logits.iter().enumerate() {
        let d = max_abs_diff(&logits[i * vocab..(i + 1) * vocab], want);
        ensure!(
            d <= LOGIT_TOL,
            "{base} mixed row {i} ({:?}): logits differ by {d}",
            rows[i].adapter
        );
    }

    // Every page comes back.
    let total = l.pages.total();
    for (_, a) in std::mem::take(&mut l.device) {
        Arc::try_unwrap(a)
            .map_err(|_| anyhow!("adapter still shared"))?
            .release(&mut l.pages);
    }
    ensure!(l.pages.num_free() == total, "adapter pages leaked");
    Ok(())
}

fn last_logits(bundle: &ModelBundle<CpuBackend>, ids: &[u32]) -> Result<Vec<f32>> {
    let model = &bundle.model;
    let mut alloc = BlockAllocator::new(16, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seq = SequenceCache::default();
    seq.reserve(&mut alloc, ids.len())
        .map_err(|_| anyhow!("out of blocks"))?;
    let mut b = BatchBuilder::new();
    b.push(&mut seq, BLOCK_SIZE, ids, true);
    Ok(model.backend.download(&model.forward(&b.finish(), &mut kv)?)?)
}

#[test]
fn llama_adapters_match_peft() -> Result<()> {
    check_base("llama-f32")
}

#[test]
fn qwen2_adapters_match_peft() -> Result<()> {
    check_base("qwen2-f32-tied")
}

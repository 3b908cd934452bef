//! Workload 1: one sequence, prefill of the long prompt and batch-1 decode, base and adapter 0,
//! on the bf16 base (f32 and, where the CPU has AVX512_BF16, bf16 activations) and on each
//! quantized base (`QUIVER_PEERS_QUANT`), the latter with f32 and with int8 activations.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use quiver_adapters::load_peft_adapter;
use quiver_benches::measure_read_bandwidth_gbps;
use quiver_model::generate::{argmax, BLOCK_SIZE};
use quiver_model::{BatchBuilder, BlockAllocator, Llama, LoraAdapter, ModelBundle, SequenceCache};
use quiver_tensor::cpu::{bf16_activations_supported, CpuBackend, CpuPagePool, Precision};
use quiver_tensor::{Backend, DType};

use crate::quant::{formats, quantization, workload1_only};
use crate::{ids, Workload, AGREE_TOKENS, DECODE_PROMPT, DECODE_STEPS, MAX_MODEL_LEN, PREFILL_LEN};

/// Prefill of `prompt` then `steps` greedy decode steps on one sequence: (prefill tok/s, decode
/// tok/s, tokens).
fn single(
    model: &Llama<CpuBackend>,
    pool: &CpuPagePool,
    adapter: Option<&Arc<LoraAdapter>>,
    prompt: &[u32],
    steps: usize,
) -> Result<(f64, f64, Vec<u32>)> {
    let total = prompt.len() + steps;
    let mut alloc = BlockAllocator::new(total.div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seq = SequenceCache::default();
    seq.reserve(&mut alloc, total)
        .map_err(|_| anyhow::anyhow!("out of KV blocks"))?;
    let mut next = prompt.to_vec();
    let mut out = Vec::new();
    let t = Instant::now();
    let mut prefill = 0.0;
    while out.len() <= steps {
        let mut b = BatchBuilder::new();
        b.push_with_adapter(&mut seq, BLOCK_SIZE, &next, true, adapter);
        let logits = model.forward_with_adapters(&b.finish(), &mut kv, Some(pool))?;
        let token = argmax(&model.backend.download(&logits)?);
        if out.is_empty() {
            prefill = t.elapsed().as_secs_f64();
        }
        out.push(token);
        next = vec![token];
    }
    let decode = t.elapsed().as_secs_f64() - prefill;
    Ok((prompt.len() as f64 / prefill, steps as f64 / decode, out))
}

/// The matmul precisions Quiver runs the bf16 base in: f32 (the default, the reference) and,
/// where the CPU has AVX512_BF16 and not under `QUIVER_PEERS_WORKLOADS=1` (the short run), bf16
/// activations (`--matmul-precision bf16`, what llama.cpp computes), reported under labels with
/// the suffix " bf16".
pub fn precisions() -> Vec<(Precision, &'static str)> {
    let mut v = vec![(Precision::F32, "")];
    if bf16_activations_supported() && !workload1_only() {
        v.push((Precision::Bf16Activations, " bf16"));
    }
    v
}

/// One loaded model of workload 1 and how its rows are labelled.
struct Variant {
    bundle: ModelBundle<CpuBackend>,
    /// Labels are `{prefix}base{suffix}` and `{prefix}adapter{suffix}`.
    prefix: String,
    suffix: &'static str,
    /// The weights' name (`bf16`, `int8`, `int4`) where this variant's batch-1 decode is set
    /// against the bandwidth bound at its own bytes per token.
    bound: Option<String>,
    /// Whether to time the 512-token prefill (int8 activations change only batch 1).
    prefill: bool,
}

/// A row of workload 1: label, variant, adapter.
type Config<'a> = (String, &'a Variant, Option<&'a Arc<LoraAdapter>>);

/// `QUIVER_PEERS_REPS`: timed repetitions of each workload-1 row per run (default 3; the best
/// counts). Shared with `llamacpp_bench.py`.
fn reps() -> Result<usize> {
    std::env::var("QUIVER_PEERS_REPS").map_or(Ok(3), |v| {
        v.trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("QUIVER_PEERS_REPS={v}: expected a positive count"))
    })
}

/// Workload 1 on every variant, best of `reps()` in interleaved rounds. Returns the JSON members
/// `"single":{..},"agree":{..},"weights":{..},"bandwidth_gbps":X`.
pub fn workload1(w: &Workload) -> Result<String> {
    let load = |p, format| {
        ModelBundle::load_with(
            CpuBackend::with_precision(p),
            &w.model,
            Some(MAX_MODEL_LEN),
            quantization(format),
        )
    };
    let mut variants = Vec::new();
    for (p, suffix) in precisions() {
        let bound = (p == Precision::F32).then(|| "bf16".to_string());
        variants.push(Variant {
            bundle: load(p, None)?,
            prefix: String::new(),
            suffix,
            bound,
            prefill: true,
        });
    }
    for f in formats()? {
        for (p, suffix, prefill) in [
            (Precision::F32, "", true),
            (Precision::Int8Activations, " i8act", false),
        ] {
            let bound = Some(f.to_string());
            let bundle = load(p, Some(f))?;
            variants.push(Variant {
                bundle,
                prefix: format!("{f} "),
                suffix,
                bound,
                prefill,
            });
        }
    }
    let model = &variants[0].bundle.model;
    let cfg = &model.cfg;
    let host = load_peft_adapter("a0", &w.adapters[0], cfg)?;
    let page = quiver_model::lora_page_size(cfg);
    let need: usize = host
        .modules
        .iter()
        .map(|m| m.rank * (m.kind.dims(cfg).0 + m.kind.dims(cfg).1) / page)
        .sum();
    let mut pages = BlockAllocator::new(need, page);
    let mut pool = model.backend.new_page_pool(page, pages.total(), DType::BF16)?;
    let a0 = Arc::new(LoraAdapter::upload(
        "a0",
        &host.modules,
        cfg,
        &model.backend,
        &mut pool,
        &mut pages,
    )?);
    let decode_prompt = &w.long[..DECODE_PROMPT];
    let threads = rayon::current_num_threads();
    // Rounds interleave the configurations so that machine noise hits all alike; the best counts.
    let configs: Vec<Config> = variants
        .iter()
        .flat_map(|v| {
            [
                (format!("{}base{}", v.prefix, v.suffix), v, None),
                (format!("{}adapter{}", v.prefix, v.suffix), v, Some(&a0)),
            ]
        })
        .collect();
    // (prefill tok/s, decode tok/s, decode ÷ bound)
    let mut best = vec![(0.0f64, 0.0f64, 0.0f64); configs.len()];
    let mut tokens = vec![Vec::new(); configs.len()];
    let mut bandwidth = 0.0f64;
    for _ in 0..reps()? {
        for (i, (_, v, adapter)) in configs.iter().enumerate() {
            let model = &v.bundle.model;
            if v.prefill {
                let (p, _, _) = single(model, &pool, *adapter, &w.long, 0)?;
                best[i].0 = best[i].0.max(p);
            }
            // The bound of the base's decode from a bandwidth probe just before it.
            let probe = (v.bound.is_some() && adapter.is_none()).then(|| measure_read_bandwidth_gbps(threads));
            let (_, d, t) = single(model, &pool, *adapter, decode_prompt, DECODE_STEPS)?;
            best[i].1 = best[i].1.max(d);
            if let Some(gbps) = probe {
                bandwidth = bandwidth.max(gbps);
                let bound = gbps * 1e9 / model.weight_bytes() as f64;
                best[i].2 = best[i].2.max(d / bound);
            }
            tokens[i] = t;
        }
    }
    let mut single_json = Vec::new();
    let mut agree = Vec::new();
    for (((label, v, adapter), (prefill, decode, frac)), t) in configs.iter().zip(best).zip(&tokens) {
        let mut members = vec![format!("\"decode_tok_s\":{decode:.4}")];
        if v.prefill {
            members.push(format!("\"prefill_tok_s\":{prefill:.4}"));
        }
        if v.bound.is_some() && adapter.is_none() {
            members.push(format!("\"bound_frac\":{frac:.4}"));
        }
        println!(
            "quiver {label}: prefill {PREFILL_LEN} tokens {prefill:.1} tok/s, decode batch 1 {decode:.1} tok/s{}",
            if frac > 0.0 {
                format!(" ({:.0}% of its bound)", 100.0 * frac)
            } else {
                String::new()
            }
        );
        single_json.push(format!("\"{label}\":{{{}}}", members.join(",")));
        agree.push(format!("\"{label}\":{}", ids(&t[..AGREE_TOKENS])));
    }
    let weights: BTreeMap<&String, usize> = variants
        .iter()
        .filter_map(|v| Some((v.bound.as_ref()?, v.bundle.model.weight_bytes())))
        .collect();
    let weights: Vec<String> = weights.iter().map(|(k, b)| format!("\"{k}\":{b}")).collect();
    Ok(format!(
        "\"single\":{{{}}},\"agree\":{{{}}},\"weights\":{{{}}},\"bandwidth_gbps\":{bandwidth:.3}",
        single_json.join(","),
        agree.join(","),
        weights.join(",")
    ))
}

//! Prefill and decode throughput of the CPU runtime on the Qwen2.5-0.5B-shaped test-kit model
//! (random bf16 weights), with the batch-1 bound measured in the same run:
//! bound = streaming read bandwidth (2 threads) ÷ bytes of weights read per token.
//!
//!     cargo bench -p quiver-benches --bench decode
//!
//! Prefill and batched decode run again with `--matmul-precision bf16` (activations rounded to
//! bf16 at the matmul inputs, AVX512_BF16) where the CPU has it, each next to its f32 row.
//!
//! QUIVER_BENCH_MODEL=DIR uses an existing model directory instead of writing one. A filter
//! argument (`-- decode` or `-- prefill`) runs only the rows whose label contains it, e.g. to
//! profile one workload under `perf record`.
//!
//! `-- quant` runs the quantized bases instead (`--quantization int8|int4`, LM head int8) side by
//! side with bf16, each batch-1 figure against the bound at that model's own bytes per token
//! (see `quant_table`).
//!
//! `-- invariant` runs the default kernels and `--batch-invariant` ones side by side
//! (see `invariant_table`).

use std::time::Instant;

use quiver_benches::{bench_model_dir, measure_read_bandwidth_gbps};
use quiver_model::generate::BLOCK_SIZE;
use quiver_model::{BatchBuilder, BlockAllocator, Llama, ModelBundle, Quantization, SequenceCache};
use quiver_tensor::cpu::{bf16_activations_supported, CpuBackend, Precision};
use quiver_tensor::QuantFormat;

/// Deterministic prompt ids spread over the small tokenizer's range.
fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2654435761).wrapping_add(salt * 97)) % 500 + 3)
        .collect()
}

/// Prefills `batch` sequences of `prompt_len`, then times `steps` decode steps over all of them.
fn decode_tps(model: &Llama<CpuBackend>, batch: usize, prompt_len: usize, steps: usize) -> anyhow::Result<f64> {
    let blocks = batch * (prompt_len + steps).div_ceil(BLOCK_SIZE);
    let mut alloc = BlockAllocator::new(blocks, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(blocks, BLOCK_SIZE)?;
    let mut seqs = vec![SequenceCache::default(); batch];
    let mut b = BatchBuilder::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        s.reserve(&mut alloc, prompt_len + steps)
            .map_err(|_| anyhow::anyhow!("out of KV blocks"))?;
        b.push(s, BLOCK_SIZE, &prompt(prompt_len, i as u32), true);
    }
    model.forward(&b.finish(), &mut kv)?;
    let t = Instant::now();
    for step in 0..steps {
        let mut b = BatchBuilder::new();
        for s in seqs.iter_mut() {
            b.push(s, BLOCK_SIZE, &[(step as u32 * 7) % 500 + 3], true);
        }
        model.forward(&b.finish(), &mut kv)?;
    }
    Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
}

fn prefill_tps(model: &Llama<CpuBackend>, len: usize) -> anyhow::Result<f64> {
    let mut alloc = BlockAllocator::new(len.div_ceil(BLOCK_SIZE), BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut s = SequenceCache::default();
    s.reserve(&mut alloc, len)
        .map_err(|_| anyhow::anyhow!("out of KV blocks"))?;
    let mut b = BatchBuilder::new();
    b.push(&mut s, BLOCK_SIZE, &prompt(len, 1), true);
    let input = b.finish();
    let t = Instant::now();
    model.forward(&input, &mut kv)?;
    Ok(len as f64 / t.elapsed().as_secs_f64())
}

fn best_of(n: usize, mut f: impl FnMut() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    let mut best = 0.0f64;
    for _ in 0..n {
        best = best.max(f()?);
    }
    Ok(best)
}

fn main() -> anyhow::Result<()> {
    let dir = bench_model_dir()?;
    if std::env::args().skip(1).any(|a| a == "quant") {
        return quant_table(&dir);
    }
    if std::env::args().skip(1).any(|a| a == "invariant") {
        return invariant_table(&dir);
    }
    let bundle = ModelBundle::load(CpuBackend::default(), &dir, Some(2048))?;
    let model = &bundle.model;
    let gbps = measure_read_bandwidth_gbps(2);
    let bytes = model.weight_bytes() as f64;
    let bound = gbps * 1e9 / bytes;
    println!(
        "model: {} ({:.3} GB of weights read per decode step), {}",
        dir.display(),
        bytes / 1e9,
        model.backend_name()
    );
    println!("streaming read bandwidth (2 threads): {gbps:.1} GB/s → batch-1 bound {bound:.1} tokens/s\n");
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |label: &str| filter.as_deref().is_none_or(|f| label.contains(f));
    println!("| workload | tokens/s | note |");
    println!("|---|---:|---|");
    // The same weights (memory-mapped once more) with bf16-activation matmuls.
    let bf16 = if bf16_activations_supported() {
        let backend = CpuBackend::with_precision(Precision::Bf16Activations);
        Some(ModelBundle::load(backend, &dir, Some(2048))?)
    } else {
        println!("(no AVX512_BF16 here: the bf16-activation rows are skipped)\n");
        None
    };
    if wanted("prefill, 512-token prompt") {
        let p = best_of(2, || prefill_tps(model, 512))?;
        println!("| prefill, 512-token prompt | {p:.1} | one forward over the whole prompt |");
        if let Some(b) = &bf16 {
            let q = best_of(2, || prefill_tps(&b.model, 512))?;
            println!(
                "| prefill, 512-token prompt, bf16 activations | {q:.1} | {:.2}× f32 |",
                q / p
            );
        }
    }
    // Batch 1 against the bound probed right before it: on a shared machine the bandwidth and
    // the decode speed move together, so each round's ratio uses its own probe.
    let (mut d1, mut ratios) = (0.0f64, Vec::new());
    for _ in 0..3 {
        let round_bound = measure_read_bandwidth_gbps(2) * 1e9 / bytes;
        let d = decode_tps(model, 1, 32, 24)?;
        ratios.push(d / round_bound);
        d1 = d1.max(d);
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "| decode, batch 1 | {d1:.1} | {:.0}% of the first bound; per round against its own probe: {} |",
        100.0 * d1 / bound,
        ratios
            .iter()
            .map(|r| format!("{:.0}%", 100.0 * r))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for batch in [8, 32] {
        if wanted(&format!("decode, batch {batch}")) {
            let d = best_of(2, || decode_tps(model, batch, 32, 12))?;
            println!("| decode, batch {batch} | {d:.1} | {:.1}× batch 1 |", d / d1);
            if let Some(b) = bf16.as_ref().filter(|_| batch >= 24) {
                let q = best_of(2, || decode_tps(&b.model, batch, 32, 12))?;
                println!(
                    "| decode, batch {batch}, bf16 activations | {q:.1} | {:.2}× f32 |",
                    q / d
                );
            }
        }
    }
    Ok(())
}

/// The cost of `--batch-invariant`: prefill and decode with the default kernels and the
/// batch-invariant ones, in interleaved rounds (best of 3 each).
fn invariant_table(dir: &std::path::Path) -> anyhow::Result<()> {
    let default = ModelBundle::load(CpuBackend::default(), dir, Some(2048))?;
    let invariant = ModelBundle::load(CpuBackend::default().with_batch_invariant(true), dir, Some(2048))?;
    println!("model: {}", dir.display());
    println!("| workload | default tokens/s | batch invariant tokens/s | invariant / default |");
    println!("|---|---:|---:|---:|");
    type Workload = (&'static str, fn(&Llama<CpuBackend>) -> anyhow::Result<f64>);
    let workloads: [Workload; 4] = [
        ("prefill, 512-token prompt", |m| prefill_tps(m, 512)),
        ("decode, batch 1", |m| decode_tps(m, 1, 32, 24)),
        ("decode, batch 8", |m| decode_tps(m, 8, 32, 12)),
        ("decode, batch 32", |m| decode_tps(m, 32, 32, 12)),
    ];
    for (label, run) in workloads {
        let (mut d, mut i) = (0.0f64, 0.0f64);
        for _ in 0..3 {
            d = d.max(run(&default.model)?);
            i = i.max(run(&invariant.model)?);
        }
        println!("| {label} | {d:.1} | {i:.1} | {:.2} |", i / d);
    }
    Ok(())
}

/// bf16, int8 and int4 bases of the same checkpoint in one run: batch-1 decode in interleaved
/// rounds (each round's bound from a bandwidth probe just before it, at the model's own bytes
/// per token), batched decode and prefill.
fn quant_table(dir: &std::path::Path) -> anyhow::Result<()> {
    let load = |format: Option<QuantFormat>| {
        let q = Quantization {
            format,
            keep_lm_head: false,
        };
        ModelBundle::load_with(CpuBackend::default(), dir, Some(2048), q)
    };
    let models = [
        ("bf16", load(None)?),
        ("int8", load(Some(QuantFormat::Int8))?),
        ("int4", load(Some(QuantFormat::Int4))?),
    ];
    println!("model: {}, {}\n", dir.display(), models[0].1.model.backend_name());
    // The same quantized bases with int8 activations at batch 1 too (`--matmul-precision int8`).
    let int8a = |format| {
        let q = Quantization {
            format: Some(format),
            keep_lm_head: false,
        };
        ModelBundle::load_with(
            CpuBackend::with_precision(Precision::Int8Activations),
            dir,
            Some(2048),
            q,
        )
    };
    let int8_acts = [int8a(QuantFormat::Int8)?, int8a(QuantFormat::Int4)?];
    let bytes: Vec<f64> = models.iter().map(|(_, b)| b.model.weight_bytes() as f64).collect();
    let (mut best, mut ratios) = ([0.0f64; 3], [0.0f64; 3]);
    let (mut best_a, mut ratios_a) = ([0.0f64; 2], [0.0f64; 2]);
    for _ in 0..3 {
        for (i, (_, b)) in models.iter().enumerate() {
            let bound = measure_read_bandwidth_gbps(2) * 1e9 / bytes[i];
            let d = decode_tps(&b.model, 1, 32, 24)?;
            best[i] = best[i].max(d);
            ratios[i] = ratios[i].max(d / bound);
        }
        for (i, b) in int8_acts.iter().enumerate() {
            let bound = measure_read_bandwidth_gbps(2) * 1e9 / bytes[i + 1];
            let d = decode_tps(&b.model, 1, 32, 24)?;
            best_a[i] = best_a[i].max(d);
            ratios_a[i] = ratios_a[i].max(d / bound);
        }
    }
    let row = |label: &str, f: &dyn Fn(usize) -> String| {
        let cells: Vec<String> = (0..3).map(f).collect();
        println!("| {label} | {} |", cells.join(" | "));
    };
    println!(
        "| workload | {} |",
        models.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---:|---:|---:|");
    row("weights read per decode step", &|i| format!("{:.3} GB", bytes[i] / 1e9));
    row("decode, batch 1 (tokens/s)", &|i| format!("{:.1}", best[i]));
    row("batch 1, best round vs its own bound", &|i| {
        format!("{:.0}%", 100.0 * ratios[i])
    });
    // bf16 weights have no int8-activation path.
    let quant_only = |v: &[f64; 2], i: usize, f: &dyn Fn(f64) -> String| {
        if i == 0 {
            "–".to_string()
        } else {
            f(v[i - 1])
        }
    };
    row("decode, batch 1, int8 activations (tokens/s)", &|i| {
        quant_only(&best_a, i, &|v| format!("{v:.1}"))
    });
    row("batch 1, int8 activations, vs its own bound", &|i| {
        quant_only(&ratios_a, i, &|v| format!("{:.0}%", 100.0 * v))
    });
    for batch in [8, 32] {
        let t: Vec<f64> = models
            .iter()
            .map(|(_, b)| best_of(2, || decode_tps(&b.model, batch, 32, 12)))
            .collect::<anyhow::Result<_>>()?;
        row(&format!("decode, batch {batch} (tokens/s)"), &|i| {
            format!("{:.1}", t[i])
        });
    }
    let p: Vec<f64> = models
        .iter()
        .map(|(_, b)| best_of(2, || prefill_tps(&b.model, 512)))
        .collect::<anyhow::Result<_>>()?;
    row("prefill, 512-token prompt (tokens/s)", &|i| format!("{:.1}", p[i]));
    Ok(())
}

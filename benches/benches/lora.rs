//! The LoRA tax: decode throughput of a batch of 32 rows on the Qwen2.5-0.5B-shaped model,
//! (a) base only, (b) all rows on one rank-16 all-linear adapter, (c) 32 different rank-16
//! adapters, (d) 32 adapters of mixed ranks 8–64; merged mode for (b); and a micro-benchmark of
//! the shrink/expand kernel against the bytes of adapter pages it must read.
//!
//!     cargo bench -p quiver-benches --bench lora            (everything)
//!     cargo bench -p quiver-benches --bench lora -- kernel  (the kernel micro-benchmark only)
//!     cargo bench -p quiver-benches --bench lora -- quant   (the tax on int8/int4 bases only)

use std::sync::Arc;
use std::time::Instant;

use anyhow::anyhow;
use quiver_benches::bandwidth::read_in_order;
use quiver_benches::{bench_model_dir, measure_read_bandwidth_gbps};
use quiver_model::generate::BLOCK_SIZE;
use quiver_model::{
    lora_page_size, BatchBuilder, BlockAllocator, HostLoraModule, Llama, LoraAdapter, ModelBundle, ModelConfig,
    ModuleKind, Quantization, SequenceCache,
};
use quiver_tensor::cpu::lora::PageData;
use quiver_tensor::cpu::{CpuBackend, CpuPagePool};
use quiver_tensor::{Backend, DType, LoraSegment, QuantFormat};

const BATCH: usize = 32;

/// The adapter of each batch row (None = base model).
type RowAdapters = Vec<Option<Arc<LoraAdapter>>>;

/// A random all-linear adapter of `rank` (values small enough to keep activations sane).
fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64) -> Vec<HostLoraModule> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
    };
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        for kind in ModuleKind::ALL {
            let (i, o) = kind.dims(cfg);
            let a = (0..rank * i).map(|_| rnd()).collect();
            let b = (0..o * rank).map(|_| rnd()).collect();
            out.push(HostLoraModule {
                layer,
                kind,
                rank,
                scale: 2.0,
                a,
                b,
            });
        }
    }
    out
}

/// Decode tokens/s of `BATCH` rows, row `i` on `adapters[i]` (None = base).
fn decode_tps(
    model: &Llama<CpuBackend>,
    pool: &CpuPagePool,
    adapters: &[Option<Arc<LoraAdapter>>],
    steps: usize,
) -> anyhow::Result<f64> {
    let prompt_len = 16;
    let blocks = BATCH * (prompt_len + steps).div_ceil(BLOCK_SIZE);
    let mut alloc = BlockAllocator::new(blocks, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(blocks, BLOCK_SIZE)?;
    let mut seqs = vec![SequenceCache::default(); BATCH];
    let mut b = BatchBuilder::new();
    for (i, s) in seqs.iter_mut().enumerate() {
        s.reserve(&mut alloc, prompt_len + steps)
            .map_err(|_| anyhow!("out of KV blocks"))?;
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|t| (t * 31 + i as u32 * 7) % 500 + 3)
            .collect();
        b.push_with_adapter(s, BLOCK_SIZE, &prompt, true, adapters[i].as_ref());
    }
    model.forward_with_adapters(&b.finish(), &mut kv, Some(pool))?;
    let t = Instant::now();
    for step in 0..steps {
        let mut b = BatchBuilder::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            b.push_with_adapter(
                s,
                BLOCK_SIZE,
                &[(step as u32 * 13) % 500 + 3],
                true,
                adapters[i].as_ref(),
            );
        }
        model.forward_with_adapters(&b.finish(), &mut kv, Some(pool))?;
    }
    Ok((BATCH * steps) as f64 / t.elapsed().as_secs_f64())
}

/// A page pool holding one rank-16 adapter, 32 distinct rank-16 ones and one per `mixed_ranks`.
struct AdapterSet {
    pool: CpuPagePool,
    one: Arc<LoraAdapter>,
    distinct: Vec<Option<Arc<LoraAdapter>>>,
    mixed: Vec<Option<Arc<LoraAdapter>>>,
}

impl AdapterSet {
    fn build(model: &Llama<CpuBackend>, page: usize, dtype: DType, mixed_ranks: &[usize]) -> anyhow::Result<Self> {
        let cfg = &model.cfg;
        let per_rank: usize = ModuleKind::ALL
            .iter()
            .map(|k| (k.dims(cfg).0 + k.dims(cfg).1) / page)
            .sum::<usize>()
            * cfg.num_layers;
        let total_rank = 33 * 16 + mixed_ranks.iter().sum::<usize>();
        let mut pages = BlockAllocator::new(per_rank * total_rank, page);
        let mut pool = model.backend.new_page_pool(page, pages.total(), dtype)?;
        let mut upload = |name: &str, rank: usize, seed: u64| -> anyhow::Result<Arc<LoraAdapter>> {
            let host = random_adapter(cfg, rank, seed);
            Ok(Arc::new(LoraAdapter::upload(
                name,
                &host,
                cfg,
                &model.backend,
                &mut pool,
                &mut pages,
            )?))
        };
        let one = upload("one", 16, 1)?;
        let distinct = (0..BATCH)
            .map(|i| upload(&format!("r16-{i}"), 16, 100 + i as u64).map(Some))
            .collect::<Result<_, _>>()?;
        let mixed = mixed_ranks
            .iter()
            .enumerate()
            .map(|(i, &r)| upload(&format!("mixed-{i}"), r, 200 + i as u64).map(Some))
            .collect::<Result<_, _>>()?;
        Ok(AdapterSet {
            pool,
            one,
            distinct,
            mixed,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let dir = bench_model_dir()?;
    let mut bundle = ModelBundle::load(CpuBackend::default(), &dir, Some(2048))?;
    let cfg = bundle.model.cfg.clone();
    let page = lora_page_size(&cfg);
    println!("model: {} · page {page} values", dir.display());
    let mixed_ranks: Vec<usize> = (0..BATCH).map(|i| [8, 16, 32, 64][i % 4]).collect();
    // bf16 pages (what a bf16 base model serves with), then f32 pages for comparison.
    let bf16 = AdapterSet::build(&bundle.model, page, DType::BF16, &mixed_ranks)?;
    if std::env::args().any(|a| a == "kernel") {
        return kernel_step(&bundle.model, &bf16);
    }
    if std::env::args().any(|a| a == "quant") {
        return quant_tax(&dir, &bundle.model, &bf16);
    }
    let f32s = AdapterSet::build(&bundle.model, page, DType::F32, &[])?;
    // Rounds interleave the configurations so that machine noise hits them alike; best of 3.
    let m = &bundle.model;
    let configs: [(&str, &CpuPagePool, RowAdapters); 5] = [
        ("(a) base only", &bf16.pool, vec![None; BATCH]),
        (
            "(b) one rank-16 all-linear adapter",
            &bf16.pool,
            vec![Some(bf16.one.clone()); BATCH],
        ),
        ("(c) 32 different rank-16 adapters", &bf16.pool, bf16.distinct.clone()),
        ("(d) 32 adapters, ranks 8/16/32/64", &bf16.pool, bf16.mixed.clone()),
        ("(c) with f32 pages", &f32s.pool, f32s.distinct.clone()),
    ];
    let mut best = [0.0f64; 5];
    for _ in 0..3 {
        for (i, (_, pool, adapters)) in configs.iter().enumerate() {
            best[i] = best[i].max(decode_tps(m, pool, adapters, 8)?);
        }
    }
    let base = best[0];
    // The ratio alone hides which side moved (a faster base lowers it); the absolute cost of the
    // adapters per decode step is the difference of the step times.
    let step_ms = |tps: f64| BATCH as f64 / tps * 1e3;
    println!("\n| decode, batch {BATCH} (bf16 pages unless noted) | tokens/s | vs base | step ms | over base, ms |");
    println!("|---|---:|---:|---:|---:|");
    for ((name, _, _), tps) in configs.iter().zip(best) {
        println!(
            "| {name} | {tps:.1} | {:.2} | {:.1} | {:+.1} |",
            tps / base,
            step_ms(tps),
            step_ms(tps) - step_ms(base)
        );
    }
    bundle.model.merge("one", &random_adapter(&cfg, 16, 1))?;
    let mut merged = 0.0f64;
    for _ in 0..3 {
        merged = merged.max(decode_tps(&bundle.model, &bf16.pool, &vec![None; BATCH], 8)?);
    }
    bundle.model.unmerge();
    println!(
        "| (b') the same adapter merged into the base | {merged:.1} | {:.2} | {:.1} | {:+.1} |",
        merged / base,
        step_ms(merged),
        step_ms(merged) - step_ms(base)
    );

    kernel_step(&bundle.model, &bf16)?;
    Ok(())
}

/// Case (c) against (a) on quantized bases (`--quantization`, LM head int8) next to bf16: the
/// adapters' cost is the same bytes and flops whatever the base, so the tax grows as the base
/// gets cheaper. Interleaved rounds, best of 3.
fn quant_tax(dir: &std::path::Path, bf16_model: &Llama<CpuBackend>, set: &AdapterSet) -> anyhow::Result<()> {
    let load = |format| {
        let q = Quantization {
            format: Some(format),
            keep_lm_head: false,
        };
        ModelBundle::load_with(CpuBackend::default(), dir, Some(2048), q)
    };
    let (int8, int4) = (load(QuantFormat::Int8)?, load(QuantFormat::Int4)?);
    let models = [("bf16", bf16_model), ("int8", &int8.model), ("int4", &int4.model)];
    let (mut base, mut one, mut adapted) = ([0.0f64; 3], [0.0f64; 3], [0.0f64; 3]);
    for _ in 0..3 {
        for (i, (_, m)) in models.iter().enumerate() {
            base[i] = base[i].max(decode_tps(m, &set.pool, &vec![None; BATCH], 8)?);
            one[i] = one[i].max(decode_tps(m, &set.pool, &vec![Some(set.one.clone()); BATCH], 8)?);
            adapted[i] = adapted[i].max(decode_tps(m, &set.pool, &set.distinct, 8)?);
        }
    }
    println!("\n| decode, batch {BATCH}, bf16 pages | (a) base only | (b) one rank-16 adapter | tax | (c) 32 rank-16 adapters | tax |");
    println!("|---|---:|---:|---:|---:|---:|");
    let tax = |v: f64, b: f64| format!("{:.0}%", 100.0 * (1.0 - v / b));
    for (i, (name, _)) in models.iter().enumerate() {
        println!(
            "| {name} base | {:.1} | {:.1} | {} | {:.1} | {} |",
            base[i],
            one[i],
            tax(one[i], base[i]),
            adapted[i],
            tax(adapted[i], base[i])
        );
    }
    Ok(())
}

/// Kernel micro-benchmark: the LoRA work of one decode step of case (c) alone: every layer's 7
/// projections, each with 32 single-token segments (BGMV) on 32 different rank-16 adapters, so
/// all 563 MB of their bf16 pages come from DRAM as in decode. Run on the backend's pool like a
/// forward pass; best of `REPS` steps, next to the streaming read bandwidth measured right after.
fn kernel_step(model: &Llama<CpuBackend>, set: &AdapterSet) -> anyhow::Result<()> {
    const REPS: usize = 12;
    let cfg = &model.cfg;
    let adapters: Vec<&LoraAdapter> = set.distinct.iter().flatten().map(|a| a.as_ref()).collect();
    let mut calls = Vec::new();
    let mut bytes = 0usize;
    for layer in 0..cfg.num_layers {
        for kind in ModuleKind::ALL {
            let (in_f, out_f) = kind.dims(cfg);
            let segments: Vec<LoraSegment> = adapters
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    let module = a.module(layer, kind).ok_or_else(|| anyhow!("module"))?;
                    bytes += module.rank * (in_f + out_f) * 2;
                    Ok(LoraSegment {
                        start: i,
                        len: 1,
                        module,
                    })
                })
                .collect::<anyhow::Result<_>>()?;
            calls.push((in_f, out_f, segments));
        }
    }
    let mut x: Vec<Vec<f32>> = Vec::new();
    let mut y: Vec<Vec<f32>> = Vec::new();
    for (in_f, out_f, _) in &calls {
        x.push((0..BATCH * in_f).map(|i| ((i % 97) as f32 - 48.0) * 1e-3).collect());
        y.push(vec![0.0f32; BATCH * out_f]);
    }
    let b = &model.backend;
    // The same pages read in the same order, same split across threads, with no arithmetic:
    // the floor this kernel could reach on this machine (best per layer, as above).
    let page_f32s = set.pool.page * 2 / 4;
    let PageData::BF16(data) = &set.pool.data else {
        anyhow::bail!("the kernel benchmark expects bf16 pages");
    };
    let as_f32: &[f32] = bytemuck::cast_slice(&data[..]);
    let per = BATCH.div_ceil(4 * b.install(rayon::current_num_threads));
    let read_calls: Vec<Vec<Vec<&[f32]>>> = calls
        .iter()
        .map(|(_, out_f, segments)| {
            let cout = out_f / set.pool.page;
            segments
                .chunks(per)
                .map(|tiles| {
                    // Page ids in the kernel's read order; runs of adjacent pages become one
                    // slice, so the read pays no per-page call.
                    let ids = tiles.iter().map(|s| s.module).flat_map(|m| {
                        let b = (0..cout).flat_map(move |c| (0..m.rank).map(move |j| m.b_pages[j * cout + c]));
                        m.a_pages.iter().copied().chain(b)
                    });
                    let mut runs: Vec<(u32, u32)> = Vec::new();
                    for id in ids {
                        match runs.last_mut() {
                            Some((first, n)) if *first + *n == id => *n += 1,
                            _ => runs.push((id, 1)),
                        }
                    }
                    runs.into_iter()
                        .map(|(first, n)| &as_f32[first as usize * page_f32s..][..n as usize * page_f32s])
                        .collect::<Vec<_>>()
                })
                .collect()
        })
        .collect();
    let mut floor_layer = vec![f64::INFINITY; cfg.num_layers];
    let mut best = f64::INFINITY;
    let mut best_layer = vec![f64::INFINITY; cfg.num_layers];
    // Kernel and plain read alternate, so machine noise hits them alike.
    for _ in 0..REPS {
        b.install(|| {
            for (l, layer_calls) in read_calls.chunks(ModuleKind::ALL.len()).enumerate() {
                let t = Instant::now();
                let s: f32 = layer_calls.iter().map(|tasks| read_in_order(tasks)).sum();
                std::hint::black_box(s);
                floor_layer[l] = floor_layer[l].min(t.elapsed().as_secs_f64());
            }
        });
        let (secs, layers) = b.install(|| -> anyhow::Result<(f64, Vec<f64>)> {
            let t = Instant::now();
            let mut layers = Vec::with_capacity(cfg.num_layers);
            let mut work = calls.iter().zip(&x).zip(&mut y);
            for _ in 0..cfg.num_layers {
                let tl = Instant::now();
                for (((in_f, out_f, segments), x), y) in work.by_ref().take(ModuleKind::ALL.len()) {
                    b.lora(&set.pool, x, y, *in_f, *out_f, segments)?;
                }
                layers.push(tl.elapsed().as_secs_f64());
            }
            Ok((t.elapsed().as_secs_f64(), layers))
        })?;
        best = best.min(secs);
        best_layer.iter_mut().zip(layers).for_each(|(b, l)| *b = b.min(l));
    }
    let floor: f64 = floor_layer.iter().sum();
    let gbps = measure_read_bandwidth_gbps(2);
    // The sum of each layer's best time is the quiet-machine figure, comparable to the
    // bandwidth probe's best segment (a 40-ms step is rarely undisturbed on a shared machine).
    let quiet: f64 = best_layer.iter().sum();
    let mb = bytes as f64 / 1e6;
    println!(
        "\nLoRA kernels of one decode step (c): {} layers × 7 projections, 32 tokens × 32 rank-16 adapters, {mb:.0} MB of bf16 pages",
        cfg.num_layers
    );
    for (what, secs) in [("best whole step", best), ("sum of best layers", quiet)] {
        let rate = bytes as f64 / secs / 1e9;
        println!(
            "  {what}: {:.2} ms, {rate:.1} GB/s ({:.0}% of the {gbps:.1} GB/s streaming bandwidth)",
            secs * 1e3,
            100.0 * rate / gbps
        );
    }
    println!(
        "  the same pages only read, same order and split (sum of best layers): {:.2} ms, {:.1} GB/s; the kernel takes {:.2}x that",
        floor * 1e3,
        bytes as f64 / floor / 1e9,
        quiet / floor
    );
    Ok(())
}

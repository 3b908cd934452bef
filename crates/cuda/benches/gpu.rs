//! The GPU benchmark (run by benches/gpu/check.sh):
//!
//! 1. device-to-device memcpy bandwidth, the yardstick;
//! 2. the LoRA kernels through `Backend::lora` on Qwen2.5-0.5B-shaped projections (896→4864 and
//!    4864→896, bf16 pages of 128 values): BGMV (decode: 64 rows, 64 distinct rank-16 adapters)
//!    and SGMV (prefill: 8 segments of 128 tokens, one rank-16 adapter each), reporting the
//!    bandwidth achieved over the bytes each call must move: every page once, x once, y read and
//!    written once;
//! 3. end-to-end decode of the Qwen2.5-0.5B-shaped test-kit model (random bf16 weights), batch
//!    64, base only and with 1, 8 and 64 distinct rank-16 all-linear adapters (bf16 pages; row
//!    `i` of `n` adapters uses adapter `i·n/64`, so consecutive rows share a segment).
//!
//! A Markdown table of the results comes last.
//!
//!     cargo bench -p quiver-cuda --bench gpu
//!
//! Without a GPU it prints `no GPU: <reason>` and exits 0, or 1 when `QUIVER_REQUIRE_GPU=1`.
//! `QUIVER_BENCH_MODEL=DIR` uses an existing model directory instead of writing the test-kit one
//! (shared with the CPU benchmarks under target/bench-models/).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use cudarc::driver::CudaContext;
use quiver_cuda::{CudaBackend, CudaPagePool};
use quiver_model::generate::BLOCK_SIZE;
use quiver_model::{
    lora_page_size, BatchBuilder, BlockAllocator, HostLoraModule, Llama, LoraAdapter, ModelBundle, ModelConfig,
    ModuleKind, SequenceCache,
};
use quiver_tensor::{Backend, DType, LoraModule, LoraSegment};

const BATCH: usize = 64;
const RANK: usize = 16;
/// Qwen2.5-0.5B's adapter page (`lora_page_size`: gcd of 896, 128 and 4864).
const PAGE: usize = 128;

struct Row {
    what: String,
    result: String,
    note: String,
}

fn row(what: impl Into<String>, result: impl Into<String>, note: impl Into<String>) -> Row {
    Row {
        what: what.into(),
        result: result.into(),
        note: note.into(),
    }
}

/// Deterministic values in `[-amp, amp)`.
struct Rnd(u64);

impl Rnd {
    fn next(&mut self, amp: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp
    }
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.next(amp)).collect()
    }
}

/// Seconds per call of `f`, best of 3 rounds of `reps` after a warm-up, the device synchronized
/// around each round.
fn seconds_per_call(be: &CudaBackend, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        be.synchronize()?;
        let t = Instant::now();
        for _ in 0..reps {
            f()?;
        }
        be.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(best)
}

/// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.
fn memcpy_gbps() -> Result<f64> {
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let bytes = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(bytes)?;
    let mut dst = stream.alloc_zeros::<u8>(bytes)?;
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let reps = 10;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            stream.memcpy_dtod(&src, &mut dst)?;
        }
        stream.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(2.0 * bytes as f64 / best / 1e9)
}

/// `count` rank-`RANK` modules of `in_f → out_f` on consecutive pages of `pool`, random weights.
fn modules(
    be: &CudaBackend,
    pool: &mut CudaPagePool,
    next_page: &mut u32,
    count: usize,
    (in_f, out_f): (usize, usize),
    rnd: &mut Rnd,
) -> Result<Vec<LoraModule>> {
    let mut take = |n: usize| {
        let ids: Vec<u32> = (*next_page..*next_page + n as u32).collect();
        *next_page += n as u32;
        ids
    };
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let a_pages = take(RANK * in_f / PAGE);
        let b_pages = take(RANK * out_f / PAGE);
        be.write_pages(pool, &a_pages, &rnd.vec(a_pages.len() * PAGE, 0.02))?;
        be.write_pages(pool, &b_pages, &rnd.vec(b_pages.len() * PAGE, 0.02))?;
        out.push(LoraModule {
            rank: RANK,
            scale: 2.0,
            a_pages,
            b_pages,
        });
    }
    Ok(out)
}

/// Times one `Backend::lora` call over `segments` of (start, len, module index).
#[allow(clippy::too_many_arguments)]
fn lora_call(
    be: &CudaBackend,
    pool: &CudaPagePool,
    mods: &[LoraModule],
    plan: &[(usize, usize, usize)],
    tokens: usize,
    (in_f, out_f): (usize, usize),
    rnd: &mut Rnd,
    reps: usize,
) -> Result<(f64, f64)> {
    let segments: Vec<LoraSegment> = plan
        .iter()
        .map(|&(start, len, m)| LoraSegment {
            start,
            len,
            module: &mods[m],
        })
        .collect();
    let x = be.upload(&rnd.vec(tokens * in_f, 1.0))?;
    let mut y = be.zeros(tokens * out_f)?;
    let secs = seconds_per_call(be, reps, || Ok(be.lora(pool, &x, &mut y, in_f, out_f, &segments)?))?;
    let distinct: std::collections::BTreeSet<usize> = plan.iter().map(|p| p.2).collect();
    let page_bytes = distinct.len() * RANK * (in_f + out_f) * 2;
    let act_bytes = tokens * (in_f + 2 * out_f) * 4;
    Ok((secs, (page_bytes + act_bytes) as f64))
}

fn lora_kernels(be: &CudaBackend, copy_gbps: f64, rows: &mut Vec<Row>) -> Result<()> {
    let shapes = [(896, 4864), (4864, 896)];
    let (bgmv_mods, sgmv_mods, seg_len) = (BATCH, 8, 128);
    let per_module: usize = shapes.iter().map(|(i, o)| RANK * (i + o) / PAGE).sum();
    let mut pool = be.new_page_pool(PAGE, per_module * (bgmv_mods + sgmv_mods), DType::BF16)?;
    let mut next = 0u32;
    let mut rnd = Rnd(0x5eed_1234_abcd_0001);
    for shape in shapes {
        let (in_f, out_f) = shape;
        let bg = modules(be, &mut pool, &mut next, bgmv_mods, shape, &mut rnd)?;
        let sg = modules(be, &mut pool, &mut next, sgmv_mods, shape, &mut rnd)?;
        let bgmv_plan: Vec<_> = (0..BATCH).map(|i| (i, 1, i)).collect();
        let (secs, bytes) = lora_call(be, &pool, &bg, &bgmv_plan, BATCH, shape, &mut rnd, 200)?;
        let gbps = bytes / secs / 1e9;
        println!(
            "BGMV {in_f}→{out_f}: {BATCH} rows × {BATCH} rank-{RANK} adapters: {:.1} µs, {:.2} MB moved, {gbps:.0} GB/s",
            secs * 1e6,
            bytes / 1e6
        );
        rows.push(row(
            format!("BGMV {in_f}→{out_f}, {BATCH} rows × {BATCH} rank-{RANK} adapters (bf16 pages)"),
            format!("{:.1} µs · {gbps:.0} GB/s", secs * 1e6),
            format!(
                "{:.0}% of memcpy; {:.1} MB must move",
                100.0 * gbps / copy_gbps,
                bytes / 1e6
            ),
        ));
        let sgmv_plan: Vec<_> = (0..sgmv_mods).map(|s| (s * seg_len, seg_len, s)).collect();
        let tokens = sgmv_mods * seg_len;
        let (secs, bytes) = lora_call(be, &pool, &sg, &sgmv_plan, tokens, shape, &mut rnd, 50)?;
        let gbps = bytes / secs / 1e9;
        println!(
            "SGMV {in_f}→{out_f}: {sgmv_mods} segments × {seg_len} tokens: {:.1} µs, {:.2} MB moved, {gbps:.0} GB/s",
            secs * 1e6,
            bytes / 1e6
        );
        rows.push(row(
            format!("SGMV {in_f}→{out_f}, {sgmv_mods} segments × {seg_len} tokens, rank {RANK} (bf16 pages)"),
            format!("{:.1} µs · {gbps:.0} GB/s", secs * 1e6),
            format!(
                "{:.0}% of memcpy; {:.1} MB must move",
                100.0 * gbps / copy_gbps,
                bytes / 1e6
            ),
        ));
    }
    Ok(())
}

/// A random all-linear adapter of `rank` (values small enough to keep activations sane).
fn random_adapter(cfg: &ModelConfig, rank: usize, seed: u64) -> Vec<HostLoraModule> {
    let mut rnd = Rnd(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        for kind in ModuleKind::ALL {
            let (i, o) = kind.dims(cfg);
            out.push(HostLoraModule {
                layer,
                kind,
                rank,
                scale: 2.0,
                a: rnd.vec(rank * i, 0.01),
                b: rnd.vec(o * rank, 0.01),
            });
        }
    }
    out
}

/// Decode tokens/s of `BATCH` rows after a 16-token prefill each; row `i` on `adapters[i]`.
/// The device is synchronized after every step, as a server must before sampling.
fn decode_tps(
    be: &CudaBackend,
    model: &Llama<CudaBackend>,
    pool: &CudaPagePool,
    adapters: &[Option<Arc<LoraAdapter>>],
    steps: usize,
) -> Result<f64> {
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
    be.synchronize()?;
    let t = Instant::now();
    for step in 0..steps {
        let mut b = BatchBuilder::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            let token = [(step as u32 * 13 + i as u32) % 500 + 3];
            b.push_with_adapter(s, BLOCK_SIZE, &token, true, adapters[i].as_ref());
        }
        model.forward_with_adapters(&b.finish(), &mut kv, Some(pool))?;
        be.synchronize()?;
    }
    Ok((BATCH * steps) as f64 / t.elapsed().as_secs_f64())
}

fn model_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("QUIVER_BENCH_MODEL") {
        return Ok(dir.into());
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-models/qwen2.5-0.5b");
    if !dir.join("config.json").exists() {
        println!("writing the Qwen2.5-0.5B-shaped test-kit model to {}", dir.display());
        quiver_testkit::write_model(&quiver_testkit::qwen25_05b_spec(), &dir).context("writing the benchmark model")?;
    }
    Ok(dir)
}

fn end_to_end(be: &CudaBackend, rows: &mut Vec<Row>) -> Result<()> {
    let dir = model_dir()?;
    let t = Instant::now();
    let bundle = ModelBundle::load(be.clone(), &dir, Some(2048))?;
    let model = &bundle.model;
    let cfg = model.cfg.clone();
    let page = lora_page_size(&cfg);
    println!(
        "model {} loaded in {:.1} s ({:.2} GB of weights), adapter page {page}",
        dir.display(),
        t.elapsed().as_secs_f64(),
        model.weight_bytes() as f64 / 1e9
    );
    let per_rank: usize = ModuleKind::ALL
        .iter()
        .map(|k| (k.dims(&cfg).0 + k.dims(&cfg).1) / page)
        .sum::<usize>()
        * cfg.num_layers;
    let mut pages = BlockAllocator::new(per_rank * RANK * BATCH, page);
    let mut pool = be.new_page_pool(page, pages.total(), DType::BF16)?;
    let t = Instant::now();
    let mut adapters = Vec::with_capacity(BATCH);
    for i in 0..BATCH {
        let host = random_adapter(&cfg, RANK, 100 + i as u64);
        let name = format!("r{RANK}-{i}");
        adapters.push(Arc::new(LoraAdapter::upload(
            &name, &host, &cfg, be, &mut pool, &mut pages,
        )?));
    }
    be.synchronize()?;
    println!(
        "{BATCH} rank-{RANK} all-linear adapters uploaded in {:.1} s ({:.2} GB of bf16 pages)",
        t.elapsed().as_secs_f64(),
        (per_rank * RANK * BATCH * page * 2) as f64 / 1e9
    );
    let configs: Vec<(String, Vec<Option<Arc<LoraAdapter>>>)> =
        std::iter::once(("base only".to_string(), vec![None; BATCH]))
            .chain([1, 8, 64].into_iter().map(|n| {
                let rows = (0..BATCH).map(|i| Some(adapters[i * n / BATCH].clone())).collect();
                let label = if n == 1 {
                    "1 adapter".to_string()
                } else {
                    format!("{n} distinct adapters")
                };
                (label, rows)
            }))
            .collect();
    // Rounds interleave the configurations so that noise hits them alike; best of 3.
    let steps = 32;
    let mut best = vec![0.0f64; configs.len()];
    for _ in 0..3 {
        for (i, (_, rows)) in configs.iter().enumerate() {
            best[i] = best[i].max(decode_tps(be, model, &pool, rows, steps)?);
        }
    }
    let base = best[0];
    for ((label, _), tps) in configs.iter().zip(&best) {
        println!("decode batch {BATCH}, {label}: {tps:.0} tokens/s");
        rows.push(row(
            format!("decode, batch {BATCH}, {label} (rank {RANK}, all linears)"),
            format!("{tps:.0} tokens/s"),
            format!("{:.2} ms/step · {:.2}× base", 1e3 * BATCH as f64 / tps, tps / base),
        ));
    }
    Ok(())
}

fn main() -> Result<()> {
    let be = match CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => {
            println!("no GPU: {e}");
            if std::env::var("QUIVER_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                eprintln!("QUIVER_REQUIRE_GPU=1: failing");
                std::process::exit(1);
            }
            return Ok(());
        }
    };
    println!("device: {}", be.name());
    let mut rows = Vec::new();
    let copy = memcpy_gbps()?;
    println!("device memcpy: {copy:.0} GB/s (read + write)");
    rows.push(row(
        "device-to-device memcpy, 1 GiB",
        format!("{copy:.0} GB/s"),
        "read + write",
    ));
    lora_kernels(&be, copy, &mut rows)?;
    end_to_end(&be, &mut rows)?;

    println!("\n## GPU benchmark: {}\n", be.name());
    println!("| measurement | result | note |");
    println!("|---|---:|---|");
    for r in &rows {
        println!("| {} | {} | {} |", r.what, r.result, r.note);
    }
    Ok(())
}

//! CPU paged attention over an f32, bf16 or f16 KV cache (`--kv-cache-dtype`), on the
//! Qwen2.5-0.5B attention shape (14 query heads, 2 KV heads, head_dim 64, blocks of 16).
//!
//! `cargo bench -p quiver-benches --bench attention`: decode steps (B sequences, one new token
//! each at context L) and one chunked-prefill step. Each case cycles through enough layers that
//! the cache is read from DRAM as in a real 24-layer step (up to 24 layers, ≤ 256 MB of f32 K/V
//! per case), and the three dtypes are timed in interleaved rounds on the same positions and
//! values, so drift on a shared machine hits all three alike. "best" per call is the figure to
//! compare (neighbours only slow a run down); the ratio columns are bf16/f32 and f16/f32.

use std::time::{Duration, Instant};

use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout};

const HEADS: usize = 14;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 16;
const MAX_LAYERS: usize = 24;
const CASE_BYTES: usize = 256 << 20;
const ROUNDS: usize = 5;
const ROUND_BUDGET: Duration = Duration::from_millis(60);
const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// (label, sequences, context length, new tokens per sequence).
const CASES: [(&str, usize, usize, usize); 8] = [
    ("decode", 1, 1024, 1),
    ("decode", 1, 8192, 1),
    ("decode", 8, 2048, 1),
    ("decode", 16, 1024, 1),
    ("decode", 16, 4096, 1),
    ("decode", 64, 512, 1),
    ("decode", 64, 2048, 1),
    ("prefill", 1, 2048, 256),
];

struct Case {
    layers: usize,
    batch: AttentionBatch,
    q: Vec<f32>,
}

fn rng(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn setup(seqs: usize, ctx: usize, new: usize) -> (Case, KvLayout) {
    let blocks_per_seq = ctx.div_ceil(BLOCK);
    let per_layer = 2 * seqs * blocks_per_seq * BLOCK * KV_HEADS * HEAD_DIM * 4;
    let layers = (CASE_BYTES / per_layer).clamp(1, MAX_LAYERS);
    let layout = KvLayout {
        num_layers: layers,
        num_blocks: seqs * blocks_per_seq,
        block_size: BLOCK,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
        dtype: DType::F32,
    };
    // Sequence s owns blocks s, s + seqs, s + 2·seqs…: interleaved, as an allocator hands them out.
    let tables: Vec<Vec<u32>> = (0..seqs)
        .map(|s| (0..blocks_per_seq).map(|b| (b * seqs + s) as u32).collect())
        .collect();
    let mut batch = AttentionBatch {
        block_tables: tables,
        ..Default::default()
    };
    for s in 0..seqs {
        for p in ctx - new..ctx {
            batch.positions.push(p as u32);
            batch.seq.push(s as u32);
            batch.slots.push(0);
        }
    }
    let mut seed = 7;
    let q = (0..batch.num_tokens() * HEADS * HEAD_DIM)
        .map(|_| rng(&mut seed))
        .collect();
    (Case { layers, batch, q }, layout)
}

/// A pool of `dtype` with every position of every sequence written (the same values for all
/// dtypes).
fn fill(cpu: &CpuBackend, layout: KvLayout, case: &Case, ctx: usize) -> quiver_tensor::cpu::CpuKvPool {
    let mut pool = cpu.new_kv_pool(layout).expect("pool");
    let w = KV_HEADS * HEAD_DIM;
    let mut seed = 11;
    for (s, table) in case.batch.block_tables.iter().enumerate() {
        let slots: Vec<u32> = (0..ctx)
            .map(|p| table[p / BLOCK] * BLOCK as u32 + (p % BLOCK) as u32)
            .collect();
        for layer in 0..case.layers {
            seed += (s * 31 + layer) as u64;
            let k: Vec<f32> = (0..ctx * w).map(|_| rng(&mut seed)).collect();
            let v: Vec<f32> = (0..ctx * w).map(|_| rng(&mut seed)).collect();
            cpu.write_kv(&mut pool, layer, &k, &v, &slots).expect("write_kv");
        }
    }
    pool
}

fn main() {
    let cpu = CpuBackend::default();
    println!(
        "{}; {HEADS} heads / {KV_HEADS} KV heads × {HEAD_DIM}, blocks of {BLOCK}",
        cpu.name()
    );
    println!("cpu features: {}\n", quiver_tensor::cpu::features());
    println!(
        "{:<8} {:>4} {:>6} {:>7} {:>6} {:>10} {:>10} {:>10} {:>6} {:>6}",
        "step", "seqs", "ctx", "tokens", "layers", "f32 ms", "bf16 ms", "f16 ms", "bf16/", "f16/"
    );
    for (label, seqs, ctx, new) in CASES {
        let (case, layout) = setup(seqs, ctx, new);
        let pools: Vec<_> = DTYPES
            .iter()
            .map(|&dtype| fill(&cpu, KvLayout { dtype, ..layout }, &case, ctx))
            .collect();
        let mut best = [f64::INFINITY; 3];
        let mut out = vec![0.0f32; case.q.len()];
        let mut layer = 0;
        for _ in 0..ROUNDS {
            for (i, pool) in pools.iter().enumerate() {
                let start = Instant::now();
                let mut calls = 0;
                while start.elapsed() < ROUND_BUDGET || calls == 0 {
                    let t = Instant::now();
                    cpu.install(|| cpu.attention(pool, layer, &case.q, HEADS, &case.batch, &mut out))
                        .expect("attention");
                    best[i] = best[i].min(t.elapsed().as_secs_f64());
                    layer = (layer + 1) % case.layers;
                    calls += 1;
                }
            }
        }
        let ms = best.map(|b| b * 1e3);
        println!(
            "{label:<8} {seqs:>4} {ctx:>6} {:>7} {:>6} {:>10.3} {:>10.3} {:>10.3} {:>6.2} {:>6.2}",
            case.batch.num_tokens(),
            case.layers,
            ms[0],
            ms[1],
            ms[2],
            ms[1] / ms[0],
            ms[2] / ms[0]
        );
    }
}

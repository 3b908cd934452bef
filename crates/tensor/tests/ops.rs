//! CPU element-wise, norm, rotary and paged-attention kernels against naive references on
//! random inputs of odd sizes. Tolerance: 1e-5 relative to the magnitude (f32 kernels that only
//! reorder sums).

use quiver_tensor::cpu::{ops, CpuBackend};
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout, RopeTable};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what}[{i}]: {g} vs {w}");
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut r = Rng(1);
    for (rows, d) in [(1, 7), (3, 33), (9, 97)] {
        let (x, w) = (r.vec(rows * d), r.vec(d));
        let mut out = vec![0.0; rows * d];
        ops::rms_norm(&x, &w, 1e-5, &mut out);
        let mut want = vec![0.0; rows * d];
        for i in 0..rows {
            let row = &x[i * d..(i + 1) * d];
            let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                want[i * d + j] = (w[j] as f64 * row[j] as f64 / (ms + 1e-5).sqrt()) as f32;
            }
        }
        assert_close(&out, &want, "rms_norm");
    }
}

#[test]
fn silu_mul_matches_reference() {
    let mut r = Rng(2);
    for n in [1, 13, 40_001] {
        let (mut g, u) = (r.vec(n), r.vec(n));
        let want: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(a, b)| ((*a as f64) / (1.0 + (-*a as f64).exp()) * *b as f64) as f32)
            .collect();
        ops::silu_mul(&mut g, &u);
        assert_close(&g, &want, "silu_mul");
    }
}

#[test]
fn rope_matches_rotate_half_reference() {
    let mut r = Rng(3);
    let (heads, hd, tokens, maxpos) = (3, 10, 5, 20);
    let half = hd / 2;
    let table = RopeTable {
        half_dim: half,
        cos: (0..maxpos * half)
            .map(|i| ((i / half) as f32 * 0.3 / (1 + i % half) as f32).cos())
            .collect(),
        sin: (0..maxpos * half)
            .map(|i| ((i / half) as f32 * 0.3 / (1 + i % half) as f32).sin())
            .collect(),
    };
    let positions = [0u32, 19, 4, 4, 11];
    let x = r.vec(tokens * heads * hd);
    let mut got = x.clone();
    ops::rope(&mut got, heads, hd, &positions, &table);
    let mut want = x.clone();
    for (t, &p) in positions.iter().enumerate() {
        let p = p as usize;
        for h in 0..heads {
            let base = (t * heads + h) * hd;
            for i in 0..hd {
                let rot = if i < half {
                    -x[base + i + half]
                } else {
                    x[base + i - half]
                };
                let (c, s) = (table.cos[p * half + i % half], table.sin[p * half + i % half]);
                want[base + i] = x[base + i] * c + rot * s;
            }
        }
    }
    assert_close(&got, &want, "rope");
}

/// Two sequences with scattered block tables, GQA (6 query heads on 2 KV heads), odd head_dim,
/// one sequence prefilling several tokens while the other decodes one.
#[test]
fn paged_attention_matches_dense_reference() {
    attention_case(4, 6, 2, 10, 4, [13, 9], 9..13, 8);
}

/// Block sizes where 16 keys are read in place (16, 32), a head_dim with a partial column slab
/// (80), a context past one online-softmax chunk (300 > 256 keys) and a prefill longer than one
/// 8-token tile.
#[test]
fn paged_attention_matches_dense_reference_on_long_tiled_contexts() {
    attention_case_as(DType::F32, 5, 14, 2, 64, 16, [300, 40], 280..300, 39);
    attention_case_as(DType::F32, 6, 4, 4, 80, 32, [270, 17], 250..270, 16);
    attention_case_as(DType::F32, 7, 8, 1, 64, 16, [33, 600], 0..33, 599);
}

/// A bf16 or f16 cache: `write_kv` rounds each value to nearest even (what `half` does) and the
/// kernel reads exactly those values, so it matches the dense f64 reference over the rounded
/// K/V to the f32 tolerance, on the in-place (block 16/32) and gathered (block 4) K tiles and
/// both 256-key chunks.
#[test]
fn paged_attention_over_16_bit_kv_matches_reference_over_rounded_values() {
    for dtype in [DType::BF16, DType::F16] {
        attention_case_as(dtype, 4, 6, 2, 10, 4, [13, 9], 9..13, 8);
        attention_case_as(dtype, 5, 14, 2, 64, 16, [300, 40], 280..300, 39);
        attention_case_as(dtype, 6, 4, 4, 80, 32, [270, 17], 250..270, 16);
        attention_case_as(dtype, 7, 8, 1, 64, 16, [33, 600], 0..33, 599);
    }
}

/// The value a cache of `dtype` stores for `x`.
fn rounded(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
    }
}

#[allow(clippy::too_many_arguments)]
fn attention_case(
    seed: u64,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    bs: usize,
    lens: [usize; 2],
    prefill: std::ops::Range<u32>,
    decode: u32,
) {
    attention_case_as(DType::F32, seed, heads, kv_heads, hd, bs, lens, prefill, decode)
}

/// Sequence 0 prefills `prefill` (the positions of its new tokens), sequence 1 decodes position
/// `decode`; `lens` are both sequences' full context lengths after this step.
#[allow(clippy::too_many_arguments)]
fn attention_case_as(
    dtype: DType,
    seed: u64,
    heads: usize,
    kv_heads: usize,
    hd: usize,
    bs: usize,
    lens: [usize; 2],
    prefill: std::ops::Range<u32>,
    decode: u32,
) {
    let mut r = Rng(seed);
    let blocks: Vec<usize> = lens.iter().map(|l| l.div_ceil(bs)).collect();
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: blocks[0] + blocks[1] + 3,
        block_size: bs,
        num_kv_heads: kv_heads,
        head_dim: hd,
        dtype,
    };
    let cpu = CpuBackend::default();
    let mut pool = cpu.new_kv_pool(layout).unwrap();
    // Scattered tables: sequence 0 takes odd-numbered blocks downwards, sequence 1 the rest.
    let mut free: Vec<u32> = (0..layout.num_blocks as u32).rev().collect();
    free.rotate_left(1);
    let tables = vec![
        free[..blocks[0]].to_vec(),
        free[blocks[0]..blocks[0] + blocks[1]].to_vec(),
    ];
    // Dense per-sequence K/V, written into the cache in one call.
    let dense_k: Vec<Vec<f32>> = lens.iter().map(|&l| r.vec(l * kv_heads * hd)).collect();
    let dense_v: Vec<Vec<f32>> = lens.iter().map(|&l| r.vec(l * kv_heads * hd)).collect();
    let mut slots = Vec::new();
    let (mut k_all, mut v_all) = (Vec::new(), Vec::new());
    for s in 0..2 {
        for p in 0..lens[s] {
            slots.push(tables[s][p / bs] * bs as u32 + (p % bs) as u32);
            k_all.extend_from_slice(&dense_k[s][p * kv_heads * hd..(p + 1) * kv_heads * hd]);
            v_all.extend_from_slice(&dense_v[s][p * kv_heads * hd..(p + 1) * kv_heads * hd]);
        }
    }
    cpu.write_kv(&mut pool, 0, &k_all, &v_all, &slots).unwrap();
    let mut batch = AttentionBatch {
        block_tables: tables.clone(),
        ..Default::default()
    };
    for p in prefill {
        batch.positions.push(p);
        batch.seq.push(0);
    }
    batch.positions.push(decode);
    batch.seq.push(1);
    batch.slots = vec![0; batch.positions.len()];
    let n = batch.num_tokens();
    let q = r.vec(n * heads * hd);
    let mut out = vec![0.0; q.len()];
    cpu.attention(&pool, 0, &q, heads, &batch, &mut out).unwrap();

    // The reference reads what the cache holds.
    let round = |d: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
        d.iter()
            .map(|s| s.iter().map(|&x| rounded(dtype, x)).collect())
            .collect()
    };
    let (dense_k, dense_v) = (round(&dense_k), round(&dense_v));
    let mut want = vec![0.0f32; q.len()];
    for t in 0..n {
        let (s, ctx) = (batch.seq[t] as usize, batch.positions[t] as usize + 1);
        for h in 0..heads {
            let kvh = h / (heads / kv_heads);
            let qh = &q[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            let krow = |j: usize| &dense_k[s][(j * kv_heads + kvh) * hd..(j * kv_heads + kvh + 1) * hd];
            let scores: Vec<f64> = (0..ctx)
                .map(|j| {
                    qh.iter()
                        .zip(krow(j))
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for d in 0..hd {
                want[(t * heads + h) * hd + d] = (0..ctx)
                    .map(|j| (scores[j] - m).exp() / z * dense_v[s][(j * kv_heads + kvh) * hd + d] as f64)
                    .sum::<f64>() as f32;
            }
        }
    }
    assert_close(&out, &want, &format!("paged_attention ({dtype} KV)"));
}

#[test]
fn attention_rejects_short_block_table() {
    let cpu = CpuBackend::default();
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 2,
        block_size: 4,
        num_kv_heads: 1,
        head_dim: 2,
        dtype: DType::F32,
    };
    let pool = cpu.new_kv_pool(layout).unwrap();
    let batch = AttentionBatch {
        positions: vec![5],
        slots: vec![0],
        seq: vec![0],
        block_tables: vec![vec![0]],
    };
    let mut out = vec![0.0; 2];
    assert!(cpu.attention(&pool, 0, &vec![1.0, 1.0], 1, &batch, &mut out).is_err());
}

/// The polynomial exp (attention softmax, sampler) against f64 exp over its whole range.
#[test]
fn exp_f32_is_accurate() {
    for i in 0..300_000 {
        let x = -90.0 + i as f32 * 0.000_33;
        let (got, want) = (ops::exp_f32(x) as f64, (x as f64).exp());
        assert!(
            if x < -87.0 {
                got == 0.0
            } else {
                (got - want).abs() <= 3e-7 * want
            },
            "exp({x}) = {got}"
        );
    }
    assert_eq!((ops::exp_f32(0.0), ops::exp_f32(f32::NEG_INFINITY)), (1.0, 0.0));
}

//! CPU element-wise, norm, rotary and paged-attention kernels against naive references on
//! random inputs of odd sizes. Tolerance: 1e-5 relative to the magnitude (f32 kernels that only
//! reorder sums).

use quiver_tensor::cpu::{ops, CpuBackend};
use quiver_tensor::{AttentionBatch, Backend, KvLayout, RopeTable};

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
    let mut r = Rng(4);
    let (heads, kv_heads, hd, bs) = (6, 2, 10, 4);
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 12,
        block_size: bs,
        num_kv_heads: kv_heads,
        head_dim: hd,
    };
    let cpu = CpuBackend::default();
    let mut pool = cpu.new_kv_pool(layout).unwrap();
    let tables = vec![vec![7u32, 2, 9, 0], vec![5u32, 11, 1]];
    let lens = [13usize, 9]; // full context lengths after this step
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
    // Queries: sequence 0 prefills positions 9..13, sequence 1 decodes position 8.
    let mut batch = AttentionBatch {
        block_tables: tables.clone(),
        ..Default::default()
    };
    for p in 9..13 {
        batch.positions.push(p);
        batch.seq.push(0);
    }
    batch.positions.push(8);
    batch.seq.push(1);
    batch.slots = vec![0; batch.positions.len()];
    let n = batch.num_tokens();
    let q = r.vec(n * heads * hd);
    let mut out = vec![0.0; q.len()];
    cpu.attention(&pool, 0, &q, heads, &batch, &mut out).unwrap();

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
    assert_close(&out, &want, "paged_attention");
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

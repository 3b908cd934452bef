//! Batch invariance, asserted bitwise: a row of x (a token) gets the same result alone as in any
//! batch, at every batch size across the tile, remainder and path thresholds
//! ([`matmul_batch_invariant`], the LoRA kernels with `batch_invariant`), and a query's attention
//! is the same in any tile, beside any other tokens, in any chunk of its prefill.

use half::{bf16, f16};

use super::attention::{paged_attention, PagedKv};
use super::lora::{CheckedSegments, CpuPagePool};
use super::{matmul_batch_invariant, Precision};
use crate::backend::{AttentionBatch, LoraModule, LoraSegment};
use crate::quant::{quantize, QuantFormat};
use crate::storage::{DType, Matrix};

fn rand_vec(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn assert_bitwise(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: {a} vs {b} alone");
    }
}

/// Batch sizes around every switch: the 3-/4-row tiles and their remainders, bf16 activations
/// (24) and the `gemm` crate (256).
const BATCHES: [usize; 14] = [2, 3, 4, 5, 6, 7, 9, 13, 23, 24, 25, 255, 256, 260];

#[test]
fn matmul_rows_do_not_depend_on_the_batch() {
    // k with a tail below 16 and 8 lanes; n with a remainder after whole 4- and 6-row blocks, and
    // one weight large enough to be split across rayon tasks.
    for (n, k) in [(15, 75), (300, 256)] {
        let w = rand_vec(n as u64, n * k);
        let x = rand_vec(7, 260 * k);
        let mut weights = vec![
            ("f32", Matrix::from_f32(n, k, w.clone()).unwrap()),
            ("f16", Matrix::from_f32_as(DType::F16, n, k, w.clone()).unwrap()),
            ("bf16", Matrix::from_f32_as(DType::BF16, n, k, w.clone()).unwrap()),
        ];
        if k % 32 == 0 {
            let f = Matrix::from_f32(n, k, w.clone()).unwrap();
            weights.push(("int8", quantize(&f, QuantFormat::Int8).unwrap()));
            weights.push(("int4", quantize(&f, QuantFormat::Int4).unwrap()));
        }
        for (name, w) in &weights {
            for precision in [Precision::F32, Precision::Bf16Activations, Precision::Int8Activations] {
                let alone: Vec<f32> = (0..260)
                    .flat_map(|i| {
                        let mut o = vec![0.0; n];
                        matmul_batch_invariant(&x[i * k..(i + 1) * k], 1, w, &mut o, precision);
                        o
                    })
                    .collect();
                for m in BATCHES {
                    // Rows starting at an odd offset, so each lands in another tile position too.
                    let at = 260 - m;
                    let mut out = vec![f32::NAN; m * n];
                    matmul_batch_invariant(&x[at * k..260 * k], m, w, &mut out, precision);
                    let what = format!("{name} {precision} n={n} k={k} m={m}");
                    assert_bitwise(&out, &alone[at * n..260 * n], &what);
                }
            }
        }
    }
}

#[test]
fn lora_tokens_do_not_depend_on_their_tile() {
    // Pages of 4 (AVX-512) or 8 (AVX2) vectors: the shape whose default shrink unrolls by tile.
    let (page, in_f, out_f, rank) = (64, 128, 192, 8);
    for dtype in [DType::F32, DType::BF16] {
        let pages = rank * (in_f + out_f) / page;
        let mut pool = CpuPagePool::new(page, pages, dtype).unwrap();
        let values = rand_vec(3, pages * page);
        for (id, v) in values.chunks(page).enumerate() {
            pool.write(id as u32, v);
        }
        let module = LoraModule {
            rank,
            scale: 0.75,
            a_pages: (0..(rank * in_f / page) as u32).collect(),
            b_pages: ((rank * in_f / page) as u32..pages as u32).collect(),
        };
        let tokens = 19;
        let x = rand_vec(4, tokens * in_f);
        let y0 = rand_vec(5, tokens * out_f);
        let apply = |start: usize, len: usize| {
            let mut y = y0[start * out_f..(start + len) * out_f].to_vec();
            let seg = vec![LoraSegment {
                start: 0,
                len,
                module: &module,
            }];
            CheckedSegments::new(&pool, len, in_f, out_f, seg)
                .unwrap()
                .batch_invariant(true)
                .apply(&x[start * in_f..(start + len) * in_f], &mut y)
                .unwrap();
            y
        };
        let alone: Vec<f32> = (0..tokens).flat_map(|t| apply(t, 1)).collect();
        // One run of 19 tokens: tiles of 8, 8 and 3; then runs of every length 2..=8.
        assert_bitwise(&apply(0, tokens), &alone, &format!("{dtype:?} run of {tokens}"));
        for len in 2..=8 {
            let at = tokens - len;
            let what = format!("{dtype:?} run of {len}");
            assert_bitwise(&apply(at, len), &alone[at * out_f..], &what);
        }
    }
}

/// One sequence's K/V (300 positions, block 16, f32/bf16/f16) and the attention of its last
/// 40 query tokens computed as one prefill, as chunks of other sizes, each alone (decode), and
/// beside another sequence.
#[test]
fn attention_rows_do_not_depend_on_tiles_or_chunks() {
    let (heads, kv_heads, hd, bs, ctx) = (4, 2, 64, 16, 300);
    // bs is also `paged`'s block size.
    let blocks = ctx / bs + 1;
    let k = rand_vec(11, blocks * bs * kv_heads * hd);
    let v = rand_vec(12, blocks * bs * kv_heads * hd);
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let other: Vec<u32> = (0..blocks as u32).collect();
    let q = rand_vec(13, ctx * heads * hd);
    let row = heads * hd;
    fn run<T: super::attention::KvElem>(
        kv: &PagedKv<'_, T>,
        q: &[f32],
        row: usize,
        heads: usize,
        tables: &[Vec<u32>],
        tokens: &[(u32, u32)],
    ) -> Vec<f32> {
        let batch = AttentionBatch {
            seq: tokens.iter().map(|t| t.0).collect(),
            positions: tokens.iter().map(|t| t.1).collect(),
            slots: vec![0; tokens.len()],
            block_tables: tables.to_vec(),
        };
        let qs: Vec<f32> = tokens
            .iter()
            .flat_map(|&(_, p)| q[p as usize * row..][..row].to_vec())
            .collect();
        let mut out = vec![f32::NAN; qs.len()];
        paged_attention(kv, &qs, heads, &batch, &mut out);
        out
    }
    fn check<T: super::attention::KvElem>(
        kv: &PagedKv<'_, T>,
        q: &[f32],
        row: usize,
        heads: usize,
        tables: &[Vec<u32>],
    ) {
        let last: Vec<(u32, u32)> = (260..300).map(|p| (0, p)).collect();
        let alone: Vec<f32> = last
            .iter()
            .flat_map(|&t| run(kv, q, row, heads, tables, &[t]))
            .collect();
        assert_bitwise(&run(kv, q, row, heads, tables, &last), &alone, "one prefill");
        for chunk in [3, 5, 12, 17] {
            let got: Vec<f32> = last
                .chunks(chunk)
                .flat_map(|c| run(kv, q, row, heads, tables, c))
                .collect();
            assert_bitwise(&got, &alone, &format!("chunks of {chunk}"));
        }
        // Beside a short and a long prefill of another sequence, in one step.
        let mut mixed: Vec<(u32, u32)> = (0..9).map(|p| (1, p)).collect();
        mixed.extend(&last[..13]);
        mixed.extend((100..120).map(|p| (1, p)));
        let got = run(kv, q, row, heads, tables, &mixed);
        assert_bitwise(&got[9 * row..22 * row], &alone[..13 * row], "beside another sequence");
    }
    let tables = [table, other];
    fn paged<'a, T>(k: &'a [T], v: &'a [T], kv_heads: usize, head_dim: usize) -> PagedKv<'a, T> {
        PagedKv {
            k,
            v,
            block_size: 16,
            kv_heads,
            head_dim,
        }
    }
    check(&paged(&k, &v, kv_heads, hd), &q, row, heads, &tables);
    let (kb, vb): (Vec<bf16>, Vec<bf16>) = k
        .iter()
        .zip(&v)
        .map(|(&a, &b)| (bf16::from_f32(a), bf16::from_f32(b)))
        .unzip();
    check(&paged(&kb, &vb, kv_heads, hd), &q, row, heads, &tables);
    let (kh, vh): (Vec<f16>, Vec<f16>) = k
        .iter()
        .zip(&v)
        .map(|(&a, &b)| (f16::from_f32(a), f16::from_f32(b)))
        .unzip();
    check(&paged(&kh, &vh, kv_heads, hd), &q, row, heads, &tables);
}

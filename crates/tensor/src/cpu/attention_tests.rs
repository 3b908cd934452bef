//! Unit tests of `attention.rs`'s bodies.

use super::*;

/// The portable body (what CPUs without AVX-512 run) against the one this machine runs, on a
/// case with copied K tiles (block 8), a partial V slab (head_dim 72), two 256-key chunks and
/// a prefill over several tiles; both are checked against a dense reference in `tests/ops.rs`
/// only through the best path.
#[test]
fn portable_body_matches_the_best_one() {
    let (heads, kv_heads, hd, bs) = (6, 2, 72, 8);
    let ctx = 300;
    let blocks = ctx / bs + 1;
    let mut seed = 5u64;
    let mut r = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let k: Vec<f32> = (0..blocks * bs * kv_heads * hd).map(|_| r()).collect();
    let v: Vec<f32> = (0..blocks * bs * kv_heads * hd).map(|_| r()).collect();
    let kv = PagedKv {
        k: &k,
        v: &v,
        block_size: bs,
        kv_heads,
        head_dim: hd,
    };
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let positions: Vec<u32> = (280..300).chain([5]).collect();
    let batch = AttentionBatch {
        seq: positions.iter().map(|&p| u32::from(p == 5)).collect(),
        slots: vec![0; positions.len()],
        positions,
        block_tables: vec![table.clone(), table],
    };
    let q: Vec<f32> = (0..batch.num_tokens() * heads * hd).map(|_| r()).collect();
    fn both<T: KvElem>(kv: &PagedKv<'_, T>, q: &[f32], heads: usize, batch: &AttentionBatch, what: &str) {
        let (mut best, mut portable) = (vec![f32::NAN; q.len()], vec![f32::NAN; q.len()]);
        attention_on(Path::Best, kv, q, heads, batch, &mut best);
        attention_on(Path::Portable, kv, q, heads, batch, &mut portable);
        for (i, (a, b)) in best.iter().zip(&portable).enumerate() {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{what} out[{i}]: {a} vs {b}");
        }
    }
    both(&kv, &q, heads, &batch, "f32");
    // The 16-bit caches, whose widening differs between the paths (intrinsics vs scalar).
    let (kb, vb): (Vec<bf16>, Vec<bf16>) = (
        k.iter().map(|&x| bf16::from_f32(x)).collect(),
        v.iter().map(|&x| bf16::from_f32(x)).collect(),
    );
    both(
        &PagedKv {
            k: &kb,
            v: &vb,
            block_size: bs,
            kv_heads,
            head_dim: hd,
        },
        &q,
        heads,
        &batch,
        "bf16",
    );
    let (kh, vh): (Vec<f16>, Vec<f16>) = (
        k.iter().map(|&x| f16::from_f32(x)).collect(),
        v.iter().map(|&x| f16::from_f32(x)).collect(),
    );
    both(
        &PagedKv {
            k: &kh,
            v: &vh,
            block_size: bs,
            kv_heads,
            head_dim: hd,
        },
        &q,
        heads,
        &batch,
        "f16",
    );
}

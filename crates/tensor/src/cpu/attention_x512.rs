//! The AVX-512 inner tiles of `attention.rs` (see its module docs for why they are intrinsics).

use std::arch::x86_64::*;

use super::{CHUNK_KEYS, LANES, ROWS, SLAB};

/// # Safety
/// AVX-512F; `q` has ROWS rows of `hd`, `k` has `(hd - 1) * stride + 16` floats.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn qk_tile(q: *const f32, hd: usize, k: *const f32, stride: usize, acc: &mut [[f32; LANES]; ROWS]) {
    // SAFETY (whole body): reads within the bounds above; stores into `acc`.
    unsafe {
        let mut a = [_mm512_setzero_ps(); ROWS];
        for d in 0..hd {
            let kv = _mm512_loadu_ps(k.add(d * stride));
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(i * hd + d)), kv, *ai);
            }
        }
        for (dst, ai) in acc.iter_mut().zip(a) {
            _mm512_storeu_ps(dst.as_mut_ptr(), ai);
        }
    }
}

/// # Safety
/// AVX-512F; `p` has ROWS rows (stride CHUNK_KEYS) of ≥ `live` floats; `v_at(j)` has `w` ≤ 64.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn pv_tile<'v>(
    p: *const f32,
    live: usize,
    v_at: impl Fn(usize) -> &'v [f32],
    w: usize,
    acc: &mut [[f32; SLAB]; ROWS],
) {
    const V: usize = SLAB / 16;
    // Lanes of each 16-column vector that lie inside the slab.
    let masks: [__mmask16; V] = std::array::from_fn(|u| {
        let n = w.saturating_sub(16 * u).min(16);
        ((1u32 << n) - 1) as __mmask16
    });
    // SAFETY (whole body): masked loads stay within each V slab's w floats; p reads are
    // below (ROWS - 1) * CHUNK_KEYS + live; stores into `acc`.
    unsafe {
        let mut a = [[_mm512_setzero_ps(); V]; ROWS];
        for j in 0..live {
            let v = v_at(j).as_ptr();
            let vv: [__m512; V] = std::array::from_fn(|u| _mm512_maskz_loadu_ps(masks[u], v.add(16 * u)));
            for (i, ai) in a.iter_mut().enumerate() {
                let pj = _mm512_set1_ps(*p.add(i * CHUNK_KEYS + j));
                for (au, vu) in ai.iter_mut().zip(&vv) {
                    *au = _mm512_fmadd_ps(pj, *vu, *au);
                }
            }
        }
        for (dst, ai) in acc.iter_mut().zip(a) {
            for (u, au) in ai.into_iter().enumerate() {
                _mm512_storeu_ps(dst.as_mut_ptr().add(16 * u), au);
            }
        }
    }
}

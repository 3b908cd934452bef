//! AVX-512 kernels of the weight-streaming matmul, picked at run time where the CPU has
//! AVX-512F/BW: a batch-1 GEMV ([`gemv_rows`]) and register tiles for small batches
//! ([`gemv_block`]); `simd.rs` holds the AVX2 versions and the portable fallback.
//!
//! At batch 1 the kernel is a pure stream over the weights. Reading the rows of a task's chunk
//! strictly in order gives the hardware prefetcher one sequential stream (the 4-row AVX2 tiles
//! walk four streams at once), and a software prefetch a fixed distance ahead of the read keeps
//! DRAM busy across row ends, so the kernel gets closer to the machine's read bandwidth than
//! the multi-stream tiles.

use std::arch::x86_64::*;

/// How far ahead of the read the software prefetch runs: far enough to cover the DRAM latency,
/// near enough that the lines are still in L1 when the read reaches them.
const PF_AHEAD_BYTES: usize = 8 << 10;

/// `out[r] = Σ_p x[p] · w[r * k + p]` for every row `r < rows`, with f32 accumulation.
///
/// # Safety
/// AVX-512F/BW must be available ([`super::features`]); `x` has `k` readable floats, `w` has
/// `rows * k` elements and `out` has `rows` writable floats.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_rows<T: super::simd::Weight>(
    x: *const f32,
    k: usize,
    w: *const T,
    rows: usize,
    out: *mut f32,
) {
    let bytes = rows * k * std::mem::size_of::<T>();
    let base = w as *const i8;
    // Next cache line of the chunk to prefetch; runs PF_AHEAD_BYTES ahead of the read.
    let mut pf = 0usize;
    // SAFETY (whole body): reads are at w[r * k + p .. + 16] and x[p .. + 16] with p + 16 ≤ k
    // (loop conditions), writes at out[r], r < rows; prefetches never fault and stay below
    // `bytes` anyway.
    unsafe {
        for r in 0..rows {
            let wr = w.add(r * k);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut p = 0;
            while p + 64 <= k {
                let ahead = ((r * k + p) * std::mem::size_of::<T>() + PF_AHEAD_BYTES + 128).min(bytes);
                while pf < ahead {
                    _mm_prefetch::<_MM_HINT_T0>(base.add(pf));
                    pf += 64;
                }
                for (u, a) in acc.iter_mut().enumerate() {
                    let q = p + 16 * u;
                    *a = _mm512_fmadd_ps(T::load16(wr.add(q)), _mm512_loadu_ps(x.add(q)), *a);
                }
                p += 64;
            }
            while p + 16 <= k {
                acc[0] = _mm512_fmadd_ps(T::load16(wr.add(p)), _mm512_loadu_ps(x.add(p)), acc[0]);
                p += 16;
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            let mut s = _mm512_reduce_add_ps(sum);
            while p < k {
                s += *x.add(p) * (*wr.add(p)).to_f32();
                p += 1;
            }
            *out.add(r) = s;
        }
    }
}

/// Rows of `w` per block (the tiles over one block read it from L1 after the first): 6 for
/// 2-byte weights, so a tile of 4 x rows holds 24 accumulators, 4 x vectors and a weight vector
/// (29 of the 32 registers) and loads x once per 6 weight rows instead of 4; 4 for f32, whose
/// 6-row blocks (21 KB at k = 896) make the next-block prefetch too large for the
/// memory-bound small batches.
const fn block_rows(elem: usize) -> usize {
    if elem == 4 {
        4
    } else {
        NR_MAX
    }
}
const NR_MAX: usize = 6;
/// Most x rows per tile.
const MR_MAX: usize = 4;

/// Small-batch (2 ≤ m, compute-bound from m ≈ 4) counterpart of the AVX2 tiles in `simd.rs`:
/// `out[i * ldo + r] = Σ_p x[i * k + p] · w[r * k + p]` for `i < m` and `r < rows`. Loop order
/// as there: a block of 6 (f32: 4) weight rows against every group of up to 4 x rows, so each
/// weight row comes from memory once; the groups prefetch the next block between them.
///
/// # Safety
/// AVX-512F/BW must be available; `x` has `m * k` readable floats, `w` has `rows * k` elements
/// and `out[i * ldo + r]` is writable for all `i < m`, `r < rows`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_block<T: super::simd::Weight>(
    x: *const f32,
    m: usize,
    k: usize,
    w: *const T,
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    let elem = std::mem::size_of::<T>();
    let block = block_rows(elem);
    let mut r = 0;
    while r < rows {
        let nr = if rows - r >= block { block } else { 1 };
        let next = w.wrapping_add((r + nr) * k) as *const i8;
        // Groups of at most 4 x rows, as even as possible (never a 1-row group when m ≥ 2).
        let groups = m.div_ceil(MR_MAX);
        let (mut i, mut g) = (0, 0);
        while i < m {
            let left = groups - g;
            let mr = (m - i).div_ceil(left);
            // This group prefetches the next block's rows q with q % groups == g (all four when
            // there is one group); prefetch never faults, so running past `w` is harmless.
            let pf = Prefetch {
                base: next,
                row_bytes: k * elem,
                mask: (0..block).filter(|q| q % groups == g).fold(0, |a, q| a | 1 << q),
                line_elems: 64 / elem,
            };
            // SAFETY: x rows i..i + mr and weight rows r..r + nr exist (loop bounds); the rest
            // is this function's contract.
            unsafe {
                let (xp, wp, op) = (x.add(i * k), w.add(r * k), out.add(i * ldo + r));
                match (mr, nr) {
                    (1, 6) => tile::<T, 1, 6>(xp, k, wp, op, ldo, pf),
                    (2, 6) => tile::<T, 2, 6>(xp, k, wp, op, ldo, pf),
                    (3, 6) => tile::<T, 3, 6>(xp, k, wp, op, ldo, pf),
                    (_, 6) => tile::<T, 4, 6>(xp, k, wp, op, ldo, pf),
                    (1, 4) => tile::<T, 1, 4>(xp, k, wp, op, ldo, pf),
                    (2, 4) => tile::<T, 2, 4>(xp, k, wp, op, ldo, pf),
                    (3, 4) => tile::<T, 3, 4>(xp, k, wp, op, ldo, pf),
                    (_, 4) => tile::<T, 4, 4>(xp, k, wp, op, ldo, pf),
                    (1, _) => tile::<T, 1, 1>(xp, k, wp, op, ldo, pf),
                    (2, _) => tile::<T, 2, 1>(xp, k, wp, op, ldo, pf),
                    (3, _) => tile::<T, 3, 1>(xp, k, wp, op, ldo, pf),
                    _ => tile::<T, 4, 1>(xp, k, wp, op, ldo, pf),
                }
            }
            i += mr;
            g += 1;
        }
        r += nr;
    }
}

/// Which lines of the next weight block a tile prefetches: rows in `mask`, at the position the
/// tile is reading.
#[derive(Clone, Copy)]
struct Prefetch {
    base: *const i8,
    row_bytes: usize,
    mask: u32,
    line_elems: usize,
}

/// One register tile: `MR` x rows × `R` weight rows, 16 lanes at a time, then the k % 16 tail
/// in scalar code. Writes `out[i * ldo + r]`.
///
/// # Safety
/// As for [`gemv_block`], restricted to this tile.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn tile<T: super::simd::Weight, const MR: usize, const R: usize>(
    x: *const f32,
    k: usize,
    w: *const T,
    out: *mut f32,
    ldo: usize,
    pf: Prefetch,
) {
    let mut acc = [[_mm512_setzero_ps(); MR]; R];
    let mut p = 0;
    // SAFETY (whole body): loads are at p + 0..16 ≤ k within a row of x or w (loop
    // conditions); stores go to out[i * ldo + r], i < MR, r < R; prefetches never fault.
    unsafe {
        while p + 16 <= k {
            if p.is_multiple_of(pf.line_elems) {
                for q in 0..NR_MAX {
                    if pf.mask & (1 << q) != 0 {
                        let at = pf.base.wrapping_add(q * pf.row_bytes + p * 64 / pf.line_elems);
                        _mm_prefetch::<_MM_HINT_T0>(at);
                    }
                }
            }
            let xv: [__m512; MR] = std::array::from_fn(|i| _mm512_loadu_ps(x.add(i * k + p)));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wv = T::load16(w.add(r * k + p));
                for (a, xi) in acc_r.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(wv, *xi, *a);
                }
            }
            p += 16;
        }
        for (r, acc_r) in acc.iter().enumerate() {
            for (i, a) in acc_r.iter().enumerate() {
                let mut s = _mm512_reduce_add_ps(*a);
                for q in p..k {
                    s += *x.add(i * k + q) * (*w.add(r * k + q)).to_f32();
                }
                *out.add(i * ldo + r) = s;
            }
        }
    }
}

//! Opt-in bf16-activation matmul for bf16 weights: x is rounded to bf16 once per call and every
//! product runs through AVX512_BF16's `vdpbf16ps` (32 bf16 pairs into 16 f32 sums per
//! instruction), with no widening of the weights and f32 accumulation.
//!
//! This is what llama.cpp (and PyTorch in bf16) computes for a bf16 model, and it does twice the
//! multiply-adds per instruction of the f32 path. The price is precision: each activation keeps
//! 8 significant bits at the matmul input, so logits move by ~1e-2 instead of ~1e-5 against the
//! f32 reference. Hence opt-in ([`super::Precision::Bf16Activations`]), and only used where the
//! CPU has the instruction; elsewhere the f32 path runs.
//!
//! Tiles are dot-product shaped like the f32 ones in `simd512.rs`: 4 x rows × 6 weight rows, 16
//! lane accumulators each, reduced together at the end of k by a transpose-add tree. k is taken
//! in slices that keep a weight block in L1, and a task's x rows (at most 128) stay in L2.

use std::arch::x86_64::*;

use half::bf16;
use rayon::prelude::*;

use super::{bf16_activations_supported, SendPtr};

/// Rows of W per block and x rows per tile: 24 accumulators, 4 x vectors and a weight vector
/// fill the 32 registers, and each x vector loaded serves 6 weight rows.
const NR: usize = 6;
const MR: usize = 4;
/// k is taken in slices of this many elements, so a block of weight rows (6 × 2 KB) stays in L1
/// while the x rows of a task pass over it.
const KC: usize = 1024;
/// Most x rows per task: their k slice (≤ 256 KB) stays in L2, and a prefill splits into enough
/// tasks for both cores even where the weight has few rows (k/v: 128).
const MC: usize = 128;
/// Smallest weight slice (bytes) per rayon task.
const TASK_MIN_BYTES: usize = 64 << 10;

/// Rounds `x` to bf16 (nearest even), bit for bit as `half::bf16::from_f32` except that
/// subnormal inputs (< 1.2e-38) become zero; large inputs are split across threads (a 512-token
/// prefill's x is ~2 MB).
pub(crate) fn round_to_bf16(x: &[f32], out: &mut Vec<bf16>) {
    assert!(bf16_activations_supported(), "round_to_bf16 needs AVX512_BF16");
    out.resize(x.len(), bf16::ZERO);
    const CHUNK: usize = 32 << 10;
    if x.len() <= CHUNK {
        round_slice(x, out);
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(o, c)| round_slice(c, o));
    }
}

fn round_slice(x: &[f32], out: &mut [bf16]) {
    assert!(bf16_activations_supported() && out.len() >= x.len());
    let (chunks, tail) = (x.chunks_exact(32), x.len() / 32 * 32);
    for (c, o) in chunks.zip(out.chunks_exact_mut(32)) {
        // SAFETY: AVX512_BF16 is asserted above; `c` and `o` hold 32 elements each.
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(c.as_ptr()), _mm512_loadu_ps(c.as_ptr().add(16)));
            _mm512_storeu_si512(o.as_mut_ptr() as *mut __m512i, cvt32(lo, hi));
        }
    }
    // The same flush of subnormals as the instruction, so the result does not depend on where
    // the 32-element blocks end.
    for (o, &v) in out[tail..].iter_mut().zip(&x[tail..]) {
        *o = bf16::from_f32(if v.is_subnormal() { 0.0f32.copysign(v) } else { v });
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
fn cvt32(lo: __m512, hi: __m512) -> __m512i {
    // The second operand fills the low half.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// `out[i * n + j] = Σ_p xb[i * k + p] · w[j * k + p]` for `i < m`, `j < n`, accumulated in f32.
///
/// # Panics
/// If the CPU lacks AVX512_BF16 ([`bf16_activations_supported`]) or a slice is shorter than
/// its shape.
pub(crate) fn matmul_bf16(xb: &[bf16], m: usize, k: usize, w: &[bf16], n: usize, out: &mut [f32]) {
    assert!(bf16_activations_supported(), "matmul_bf16 needs AVX512_BF16");
    assert!(
        xb.len() >= m * k && w.len() >= n * k && out.len() >= m * n,
        "matmul_bf16: shapes"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Tasks are (x rows, weight rows) rectangles: ~4 per thread so work stealing evens out.
    let row_bytes = 2 * k.max(1);
    let m_tasks = m.div_ceil(MC);
    let n_tasks = (4 * rayon::current_num_threads()).div_ceil(m_tasks);
    let rows = n
        .div_ceil(n_tasks)
        .max(TASK_MIN_BYTES.div_ceil(row_bytes))
        .next_multiple_of(NR)
        .min(n);
    let mc = m.div_ceil(m_tasks);
    let dst = SendPtr(out.as_mut_ptr());
    let n_chunks = n.div_ceil(rows);
    let run = |t: usize| {
        let (i0, j0) = ((t / n_chunks) * mc, (t % n_chunks) * rows);
        let (mi, nr) = (mc.min(m - i0), rows.min(n - j0));
        // SAFETY: AVX512_BF16 is asserted above; task t reads x rows i0..i0 + mi (< m) and
        // weight rows j0..j0 + nr (< n), and writes only that rectangle of `out`, which no other
        // task writes; `out` is exclusively borrowed for the whole call.
        unsafe {
            let (x, w, o) = (
                xb.as_ptr().add(i0 * k),
                w.as_ptr().add(j0 * k),
                dst.get().add(i0 * n + j0),
            );
            block(x, mi, k, w, nr, o, n)
        }
    };
    let count = m_tasks * n_chunks;
    if count == 1 {
        run(0);
    } else {
        (0..count).into_par_iter().for_each(run);
    }
}

/// One task: weight rows `w[0..rows]` against x rows `x[0..m]`, writing `out[i * ldo + r]`.
///
/// # Safety
/// AVX512_BF16 available; `x` has `m * k`, `w` has `rows * k` elements; the outputs are writable.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block(x: *const bf16, m: usize, k: usize, w: *const bf16, rows: usize, out: *mut f32, ldo: usize) {
    let mut p0 = 0;
    while p0 < k || p0 == 0 {
        let kc = KC.min(k - p0);
        let mut r = 0;
        while r < rows {
            let nr = NR.min(rows - r);
            let mut i = 0;
            while i < m {
                let mr = MR.min(m - i);
                let span = Span { k, p0, kc, add: p0 > 0 };
                // SAFETY: rows i..i + mr of x and r..r + nr of w exist; the outputs are in the
                // caller's range.
                unsafe { tile(x.add(i * k), mr, w.add(r * k), nr, out.add(i * ldo + r), ldo, span) };
                i += mr;
            }
            r += nr;
        }
        p0 += kc.max(1);
    }
}

/// The k slice a tile covers: elements `p0..p0 + kc` of rows `k` long; `add` accumulates into
/// `out` (later slices) instead of overwriting it (the first).
#[derive(Clone, Copy)]
struct Span {
    k: usize,
    p0: usize,
    kc: usize,
    add: bool,
}

/// `mr` (≤ 4) x rows × `nr` (≤ 4) weight rows. Absent rows repeat row 0 (their sums are
/// discarded) so the loop body is branch-free; the k % 32 tail uses zero-masked loads.
///
/// # Safety
/// As for [`block`], restricted to this tile and its k slice.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile(x: *const bf16, mr: usize, w: *const bf16, nr: usize, out: *mut f32, ldo: usize, span: Span) {
    let Span { k, p0, kc, add } = span;
    let xr: [*const bf16; MR] = std::array::from_fn(|i| x.wrapping_add(if i < mr { i } else { 0 } * k + p0));
    let wr: [*const bf16; NR] = std::array::from_fn(|r| w.wrapping_add(if r < nr { r } else { 0 } * k + p0));
    let mut acc = [_mm512_setzero_ps(); MR * NR];
    let k = kc;
    let mut p = 0;
    // SAFETY (whole body): full loads read p..p + 32 ≤ k of a row; the masked tail reads only
    // lanes below k; stores go to out[i * ldo + r] for i < mr, r < nr.
    unsafe {
        while p + 32 <= k {
            let xv: [__m512bh; MR] = std::array::from_fn(|i| bh(_mm512_loadu_si512(xr[i].add(p) as *const _)));
            for r in 0..NR {
                let wv = bh(_mm512_loadu_si512(wr[r].add(p) as *const _));
                for i in 0..MR {
                    acc[r * MR + i] = _mm512_dpbf16_ps(acc[r * MR + i], wv, xv[i]);
                }
            }
            p += 32;
        }
        if p < k {
            let mask: __mmask32 = (1u32 << (k - p)) - 1;
            let xv: [__m512bh; MR] =
                std::array::from_fn(|i| bh(_mm512_maskz_loadu_epi16(mask, xr[i].add(p) as *const i16)));
            for r in 0..NR {
                let wv = bh(_mm512_maskz_loadu_epi16(mask, wr[r].add(p) as *const i16));
                for i in 0..MR {
                    acc[r * MR + i] = _mm512_dpbf16_ps(acc[r * MR + i], wv, xv[i]);
                }
            }
        }
        let mut sums = [0.0f32; 32];
        for (g, chunk) in acc.chunks(16).enumerate() {
            let v: [__m512; 16] = std::array::from_fn(|j| chunk.get(j).copied().unwrap_or(_mm512_setzero_ps()));
            _mm512_storeu_ps(sums.as_mut_ptr().add(16 * g), reduce16(&v));
        }
        for r in 0..nr {
            for i in 0..mr {
                let o = out.add(i * ldo + r);
                *o = if add { *o + sums[r * MR + i] } else { sums[r * MR + i] };
            }
        }
    }
}

#[inline(always)]
fn bh(v: __m512i) -> __m512bh {
    // SAFETY: same size, every bit pattern valid.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// Lane j of the result is the sum of the 16 lanes of `v[j]`: a transpose-add tree of 15 adds
/// and 30 shuffles instead of 16 separate horizontal reductions.
#[target_feature(enable = "avx512f")]
#[inline]
fn reduce16(v: &[__m512; 16]) -> __m512 {
    // Within each 128-bit lane: pairs (a, b) → [a0+a2, b0+b2, a1+a3, b1+b3].
    let pair = |a: __m512, b: __m512| _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    let p: [__m512; 8] = std::array::from_fn(|i| pair(v[2 * i], v[2 * i + 1]));
    // Within each 128-bit lane: [a, b, c, d] partial sums of four vectors.
    let quad = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(x, y),
            _mm512_shuffle_ps::<0b11_10_11_10>(x, y),
        )
    };
    let q: [__m512; 4] = std::array::from_fn(|i| quad(p[2 * i], p[2 * i + 1]));
    // Across 128-bit lanes: [X0+X1, X2+X3, Y0+Y1, Y2+Y3], then the same on two of those.
    let lanes = |x: __m512, y: __m512| {
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
        )
    };
    lanes(lanes(q[0], q[1]), lanes(q[2], q[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Rounding agrees with `half` bit for bit (zeros, infinities, NaN, overflow to infinity,
    /// ties), except that the instruction flushes subnormal inputs to a zero of the same sign.
    #[test]
    fn rounding_matches_half_except_subnormals() {
        if !bf16_activations_supported() {
            return;
        }
        let vals = [
            0.0f32,
            -0.0,
            1e-40,
            -1e-40,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            3.4e38,
            1.0 + 2f32.powi(-8),
            1.0 + 3.0 * 2f32.powi(-8),
            -2.5,
        ];
        // 64 elements through the instruction, then a scalar tail that has subnormals too.
        let mut x: Vec<f32> = vals.iter().cycle().take(64).copied().collect();
        x.extend([1e-40, -1e-40, 1.5, f32::NAN]);
        let mut out = Vec::new();
        round_to_bf16(&x, &mut out);
        for (a, b) in x.iter().zip(&out) {
            let want = if a.is_subnormal() {
                bf16::from_f32(0.0f32.copysign(*a))
            } else {
                bf16::from_f32(*a)
            };
            assert_eq!(b.to_bits(), want.to_bits(), "{a:e}");
        }
    }

    #[test]
    fn reduce16_sums_each_vector_into_its_lane() {
        if !bf16_activations_supported() {
            return;
        }
        let vals: Vec<f32> = (0..256).map(|i| (i * 7 % 31) as f32 - 15.0).collect();
        let v: [__m512; 16] = std::array::from_fn(|j| unsafe { _mm512_loadu_ps(vals[16 * j..].as_ptr()) });
        let mut got = [0.0f32; 16];
        unsafe { _mm512_storeu_ps(got.as_mut_ptr(), reduce16(&v)) };
        for (j, g) in got.iter().enumerate() {
            assert_eq!(*g, vals[16 * j..16 * j + 16].iter().sum::<f32>(), "lane {j}");
        }
    }

    /// Against an f64 reference on the same bf16 inputs, for odd shapes that exercise partial
    /// tiles, the masked k tail, x chunking and several tasks.
    #[test]
    fn matches_reference_on_odd_shapes() {
        if !bf16_activations_supported() {
            eprintln!("no AVX512_BF16 here: bf16dot not exercised");
            return;
        }
        let mut seed = 7;
        for &(m, k, n) in &[
            (1, 5, 3),
            (2, 33, 7),
            (5, 64, 9),
            (7, 95, 13),
            (13, 1000, 37),
            (300, 2100, 70),
            (9, 0, 5),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<bf16> = (0..n * k).map(|_| bf16::from_f32(lcg(&mut seed))).collect();
            let mut xb = Vec::new();
            round_to_bf16(&x, &mut xb);
            for (a, b) in x.iter().zip(&xb) {
                assert_eq!(b.to_bits(), bf16::from_f32(*a).to_bits(), "rounding of {a}");
            }
            let mut out = vec![f32::NAN; m * n];
            matmul_bf16(&xb, m, k, &w, n, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| xb[i * k + p].to_f64() * w[j * k + p].to_f64()).sum();
                    let got = out[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "({m},{k},{n}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

//! SIMD building blocks for the matmul: the one widening trait of the CPU kernels ([`Weight`]),
//! a register-tiled "weight-streaming" block kernel and a dtype widener. [`gemv_block`] dispatches to the AVX-512 kernels of `simd512.rs` where the CPU
//! has them, else to the AVX2+FMA+F16C ones here, chosen once at run time; every public function
//! here is safe and falls back to portable scalar code on other CPUs and targets.

use half::{bf16, f16};

/// A weight (or LoRA page) element type the kernels widen to f32: one scalar and one vector
/// load per register width, shared by the AVX2 and AVX-512 matmul kernels, the LoRA tiles and
/// `Matrix::row_f32`.
pub(crate) trait Weight: bytemuck::Pod + Send + Sync + 'static {
    /// Whether tiles over several x rows should read a pre-widened f32 copy of each weight block:
    /// true for f16, whose F16C conversion is too costly to redo in every tile (each group of x
    /// rows would convert the same weights again); bf16 widening is two cheap integer ops and
    /// f32 needs none.
    const WIDEN_FIRST: bool = false;
    fn to_f32(self) -> f32;
    /// Loads 8 consecutive elements from `p` (no alignment needed) widened to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the caller must run with AVX2, FMA and F16C enabled
    /// (it is only called from `#[target_feature]` kernels, into which it is inlined).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Loads 16 consecutive elements from `p` (no alignment needed) widened to f32.
    ///
    /// # Safety
    /// `p..p + 16` must be readable, and the caller must run with AVX-512F enabled (inlined
    /// into `#[target_feature]` kernels like [`Weight::load8`]).
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller guarantees 8 readable floats at `p` and AVX support.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller guarantees 16 readable floats and AVX-512F.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the top half of an f32: exact, NaN-preserving.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bytes at `p` and AVX2 support.
        unsafe {
            let v = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(v)))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bytes and AVX-512F.
        unsafe {
            let v = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        }
    }
}

impl Weight for f16 {
    const WIDEN_FIRST: bool = true;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 16 readable bytes at `p` and F16C support.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 32 readable bytes and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// `out[i * ldo + r] = Σ_p x[i * k + p] · w[r * k + p]` for `i < m` and every row `r` of `w`
/// (`w.len() / k` rows). Each weight row is read once and dotted against all `m` rows of `x`,
/// so for small `m` the cost is one pass over `w`.
///
/// `invariant`: every output is summed in one order whatever `m`, the row's place in its tile
/// and the tile's shape (see `CpuBackend::with_batch_invariant`). Off, the batch-1 AVX-512
/// kernel splits each dot product into 4 partial sums and the AVX2 tiles into 1, 2 or 4 by
/// shape, so a row's result depends on the batch it came in by a few ulps.
pub(crate) fn gemv_block<T: Weight>(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[T],
    out: &mut [f32],
    ldo: usize,
    invariant: bool,
) {
    if m == 0 || k == 0 || w.is_empty() {
        return;
    }
    assert_eq!(w.len() % k, 0, "gemv_block: weight length not a multiple of k");
    let rows = w.len() / k;
    assert!(x.len() >= m * k, "gemv_block: x too short");
    assert!(
        ldo >= rows && out.len() >= (m - 1) * ldo + rows,
        "gemv_block: out too short"
    );
    #[cfg(target_arch = "x86_64")]
    if m == 1 && !invariant && super::features().avx512f_bw() {
        // SAFETY: AVX-512F/BW present (checked); x has k floats, w has rows·k elements and
        // out[..rows] is in bounds (asserts above).
        unsafe { super::simd512::gemv_rows(x.as_ptr(), k, w.as_ptr(), rows, out.as_mut_ptr()) };
        return;
    }
    // f16 stays on the AVX2 tiles, which widen it once per block (see `Weight::WIDEN_FIRST`),
    // except when invariant: the AVX-512 tiles sum every shape in one order.
    #[cfg(target_arch = "x86_64")]
    if (invariant || !T::WIDEN_FIRST) && super::features().avx512f_bw() {
        // SAFETY: AVX-512F/BW present (checked); the asserts above keep every x, w and out
        // index in bounds.
        unsafe { super::simd512::gemv_block(x.as_ptr(), m, k, w.as_ptr(), rows, out.as_mut_ptr(), ldo) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2_fma_f16c() {
        // SAFETY: the CPU has AVX2/FMA/F16C (checked), and the asserts above guarantee every
        // x, w and out index the kernel touches is in bounds.
        unsafe { avx2::gemv_block(x.as_ptr(), m, k, w.as_ptr(), rows, out.as_mut_ptr(), ldo, invariant) };
        return;
    }
    gemv_block_scalar(x, m, k, w, rows, out, ldo);
}

/// Widens `src` into `dst` (same length).
pub(crate) fn widen<T: Weight>(src: &[T], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if super::features().avx2_fma_f16c() {
        // SAFETY: CPU features checked; both slices have `src.len()` elements.
        unsafe { avx2::widen(src.as_ptr(), dst.as_mut_ptr(), src.len()) };
        return;
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

fn gemv_block_scalar<T: Weight>(x: &[f32], m: usize, k: usize, w: &[T], rows: usize, out: &mut [f32], ldo: usize) {
    for (r, wr) in w.chunks_exact(k).enumerate().take(rows) {
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            // Eight partial sums, like the SIMD lanes, so the compiler can vectorise.
            let mut acc = [0.0f32; 8];
            let (xc, wc) = (xi.chunks_exact(8), wr.chunks_exact(8));
            let mut tail = 0.0;
            for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
                tail += a * b.to_f32();
            }
            for (a8, b8) in xc.zip(wc) {
                for l in 0..8 {
                    acc[l] += a8[l] * b8[l].to_f32();
                }
            }
            out[i * ldo + r] = acc.iter().sum::<f32>() + tail;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Weight;
    use std::arch::x86_64::*;

    /// Rows of `w` per register tile; a tile also covers up to 3 rows of `x`.
    const NR: usize = 4;
    /// From this many x rows on, `WIDEN_FIRST` weights are widened once per block (measured: below
    /// it the widening pass costs more than the slow in-tile conversion).
    const WIDEN_MIN_M: usize = 6;
    /// Minimum prefetch distance in bytes of weights.
    const PF_AHEAD_BYTES: usize = 8 << 10;

    /// See [`super::gemv_block`]. Loop order: a block of 4 weight rows (then in L1/L2) against
    /// every group of up to 3 rows of x, so each weight row comes from memory once.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `x` has `m * k` readable floats, `w` has
    /// `rows * k` elements and `out[i * ldo + r]` is writable for all `i < m`, `r < rows`.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemv_block<T: Weight>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const T,
        rows: usize,
        out: *mut f32,
        ldo: usize,
        invariant: bool,
    ) {
        // With many x rows, f16 blocks are widened once into an f32 buffer (in L1/L2) instead of
        // in every tile (see `Weight::WIDEN_FIRST`).
        let widen_first = T::WIDEN_FIRST && m >= WIDEN_MIN_M;
        let mut buf = if widen_first { vec![0.0f32; NR * k] } else { Vec::new() };
        // Prefetch at least PF_AHEAD_BYTES ahead: for small blocks the next one is too close to
        // hide the DRAM latency.
        let pf_blocks = PF_AHEAD_BYTES.div_ceil(NR * k * std::mem::size_of::<T>());
        let mut r = 0;
        while r < rows {
            let nr = if rows - r >= NR { NR } else { 1 };
            // The block the tiles over this one prefetch (see `Prefetch`).
            let next = w.wrapping_add((r + nr + NR * (pf_blocks - 1)) * k) as *const i8;
            // SAFETY: rows r..r + nr are in range (loop bounds) and `buf` holds NR·k ≥ nr·k
            // floats, so everything stays inside the buffers described in this fn's contract.
            unsafe {
                let (wp, op) = (w.add(r * k), out.add(r));
                if widen_first {
                    widen(wp, buf.as_mut_ptr(), nr * k);
                    row_block(
                        x,
                        m,
                        k,
                        buf.as_ptr(),
                        nr,
                        op,
                        ldo,
                        next,
                        std::mem::size_of::<T>(),
                        invariant,
                    );
                } else {
                    row_block(x, m, k, wp, nr, op, ldo, next, std::mem::size_of::<T>(), invariant);
                }
            }
            r += nr;
        }
    }

    /// `nr` (NR or 1) weight rows against all m rows of x, in groups of up to 3 rows. The unroll
    /// `U` is also the number of partial sums per output, so `invariant` keeps it at 1.
    ///
    /// # Safety
    /// As for [`gemv_block`], restricted to these rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_block<T: Weight>(
        x: *const f32,
        m: usize,
        k: usize,
        w: *const T,
        nr: usize,
        out: *mut f32,
        ldo: usize,
        next: *const i8,
        elem_bytes: usize,
        invariant: bool,
    ) {
        // ceil(m / 3) groups (the 2 + 2 split below keeps that count), capped at NR.
        let groups = m.div_ceil(3).min(NR);
        let (mut i, mut g) = (0, 0);
        while i < m {
            // Groups of 3, but 2 + 2 rather than 3 + 1 at the end: a 1-row tile reuses each
            // weight vector for a single x row.
            let mr = if m - i == 4 { 2 } else { (m - i).min(3) };
            // Group g prefetches the next block's rows r with r % groups == g.
            let mask = (0..NR).filter(|r| r % groups == g).fold(0, |a, r| a | 1 << r);
            let pf = Prefetch {
                base: next,
                elem_bytes,
                mask,
            };
            // SAFETY: x rows i..i + mr exist (loop bounds); the rest is the caller's contract.
            unsafe {
                let (xp, op) = (x.add(i * k), out.add(i * ldo));
                match (mr, nr) {
                    (1, NR) if invariant => tile::<T, 1, NR, 1>(xp, k, w, op, ldo, pf),
                    (1, _) if invariant => tile::<T, 1, 1, 1>(xp, k, w, op, ldo, pf),
                    (2, 1) if invariant => tile::<T, 2, 1, 1>(xp, k, w, op, ldo, pf),
                    (3, 1) if invariant => tile::<T, 3, 1, 1>(xp, k, w, op, ldo, pf),
                    (1, NR) => tile::<T, 1, NR, 2>(xp, k, w, op, ldo, pf),
                    (2, NR) => tile::<T, 2, NR, 1>(xp, k, w, op, ldo, pf),
                    (3, NR) => tile::<T, 3, NR, 1>(xp, k, w, op, ldo, pf),
                    (1, _) => tile::<T, 1, 1, 4>(xp, k, w, op, ldo, pf),
                    (2, _) => tile::<T, 2, 1, 2>(xp, k, w, op, ldo, pf),
                    _ => tile::<T, 3, 1, 2>(xp, k, w, op, ldo, pf),
                }
            }
            i += mr;
            g += 1;
        }
    }

    /// Which memory a tile prefetches: the rows in `mask` of the weight block at `base` (row
    /// stride `k` elements of `elem_bytes`), at the position the tile is reading. Several short
    /// row streams at once defeat the hardware prefetcher, so each block prefetches the next
    /// one; with several x groups per block, the rows are shared out between them so DRAM stays
    /// busy the whole time. Prefetches never fault, so pointing past the end of `w` is harmless
    /// (addresses use `wrapping_add`).
    #[derive(Clone, Copy)]
    struct Prefetch {
        base: *const i8,
        elem_bytes: usize,
        mask: u32,
    }

    impl Prefetch {
        #[inline(always)]
        fn row(self, r: usize, k: usize, p: usize) {
            if self.mask & (1 << r) != 0 {
                let addr = self.base.wrapping_add((r * k + p) * self.elem_bytes);
                // SAFETY: SSE is part of the x86_64 baseline; a prefetch never faults.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(addr) };
            }
        }
    }

    /// One register tile: `MR` x rows (stride `k`) × `R` weight rows (stride `k`), with the k
    /// loop unrolled `U` times so there are `U·R·MR` independent FMA chains (enough to hide
    /// the FMA latency even when MR = 1). Writes `out[i * ldo + r]`.
    ///
    /// # Safety
    /// As for [`gemv_block`], restricted to this tile.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn tile<T: Weight, const MR: usize, const R: usize, const U: usize>(
        x: *const f32,
        k: usize,
        w: *const T,
        out: *mut f32,
        ldo: usize,
        pf: Prefetch,
    ) {
        let mut acc = [[[_mm256_setzero_ps(); MR]; R]; U];
        let mut p = 0;
        // SAFETY (whole body): every load is at offset p + 8·u + 0..8 ≤ k within a row of x or
        // w, guaranteed by the loop conditions; stores go to out[i * ldo + r], i < MR, r < R.
        unsafe {
            while p + 8 * U <= k {
                // One prefetch per cache line and row (each line has 64 / elem_bytes elements).
                if p & (64 / pf.elem_bytes - 1) == 0 {
                    for r in 0..R {
                        pf.row(r, k, p);
                    }
                }
                for (u, acc_u) in acc.iter_mut().enumerate() {
                    let q = p + 8 * u;
                    let mut xv = [_mm256_setzero_ps(); MR];
                    for (i, v) in xv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(x.add(i * k + q));
                    }
                    for (r, acc_r) in acc_u.iter_mut().enumerate() {
                        let wv = T::load8(w.add(r * k + q));
                        for (a, xi) in acc_r.iter_mut().zip(&xv) {
                            *a = _mm256_fmadd_ps(wv, *xi, *a);
                        }
                    }
                }
                p += 8 * U;
            }
            while p + 8 <= k {
                for (r, acc_r) in acc[0].iter_mut().enumerate() {
                    let wv = T::load8(w.add(r * k + p));
                    for (i, a) in acc_r.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.add(i * k + p)), *a);
                    }
                }
                p += 8;
            }
            for r in 0..R {
                for i in 0..MR {
                    let mut v = acc[0][r][i];
                    for acc_u in &acc[1..] {
                        v = _mm256_add_ps(v, acc_u[r][i]);
                    }
                    let mut s = hsum(v);
                    for q in p..k {
                        s += *x.add(i * k + q) * (*w.add(r * k + q)).to_f32();
                    }
                    *out.add(i * ldo + r) = s;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// # Safety
    /// AVX2/F16C available; `src` and `dst` hold `len` elements.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen<T: Weight>(src: *const T, dst: *mut f32, len: usize) {
        let mut p = 0;
        // SAFETY: p + 8 ≤ len for the vector loop, p < len for the tail.
        unsafe {
            while p + 8 <= len {
                _mm256_storeu_ps(dst.add(p), T::load8(src.add(p)));
                p += 8;
            }
            while p < len {
                *dst.add(p) = (*src.add(p)).to_f32();
                p += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable fallback (never taken on this CPU by `gemv_block`) against the SIMD path.
    #[test]
    fn scalar_fallback_matches_simd() {
        let mut seed = 1u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 23) as f32 - 1.0
        };
        // Row counts cover whole 6-row (2-byte weights) and 4-row (f32) blocks plus single rows.
        for (m, rows, k) in [(1, 9, 37), (4, 6, 8), (7, 5, 100), (9, 13, 100), (32, 20, 64)] {
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let (wb, wh): (Vec<bf16>, Vec<f16>) = w.iter().map(|&v| (bf16::from_f32(v), f16::from_f32(v))).unzip();
            let check = |fast: &[f32], slow: &[f32]| {
                for (a, b) in fast.iter().zip(slow) {
                    assert!((a - b).abs() <= 1e-5 * k as f32, "{a} vs {b} (m={m} rows={rows} k={k})");
                }
            };
            let (mut fast, mut slow) = (vec![0.0; m * rows], vec![0.0; m * rows]);
            gemv_block(&x, m, k, &w, &mut fast, rows, false);
            gemv_block_scalar(&x, m, k, &w, rows, &mut slow, rows);
            check(&fast, &slow);
            gemv_block(&x, m, k, &wb, &mut fast, rows, false);
            gemv_block_scalar(&x, m, k, &wb, rows, &mut slow, rows);
            check(&fast, &slow);
            gemv_block(&x, m, k, &wh, &mut fast, rows, false);
            gemv_block_scalar(&x, m, k, &wh, rows, &mut slow, rows);
            check(&fast, &slow);
        }
    }

    #[test]
    fn widen_is_exact() {
        let v: Vec<f32> = (0..37)
            .map(|i| i as f32 * 0.37 - 5.0)
            .chain([f32::NAN, f32::INFINITY])
            .collect();
        let b: Vec<bf16> = v.iter().map(|&a| bf16::from_f32(a)).collect();
        let h: Vec<f16> = v.iter().map(|&a| f16::from_f32(a)).collect();
        let mut out = vec![0.0; v.len()];
        widen(&b, &mut out);
        for (o, e) in out.iter().zip(&b) {
            assert_eq!(o.to_bits(), e.to_f32().to_bits());
        }
        widen(&h, &mut out);
        for (o, e) in out.iter().zip(&h) {
            assert!(o.to_bits() == e.to_f32().to_bits() || (o.is_nan() && e.is_nan()));
        }
    }
}

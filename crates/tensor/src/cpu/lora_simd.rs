//! SIMD tiles of the paged LoRA kernel (`cpu::lora`): AVX-512 for pages of a multiple of 16
//! floats, AVX2/FMA for pages of a multiple of 8. One generic body ([`Vector`]) is compiled
//! into each of the two `#[target_feature]` entry points.
//!
//! One tile is up to 8 tokens of one segment. The shrink reads each A page once and dots it
//! against every token of the tile in registers (`NT × U` accumulator chains per row of A,
//! summed horizontally once per row, not per page). The expand keeps a strip of `NT × UC`
//! output vectors in registers and streams the rank pages of Bᵀ that feed it, so `y` is loaded
//! and stored once per tile instead of once per rank (as a row-by-row expand would).
//! Adapter upload hands out Bᵀ's page ids column page by column page, so those rank pages are
//! adjacent in the pool; with AVX-512 a 1-2-token strip is a whole page, so the expand reads
//! each column block of rank pages front to back (half-page strips would read it in two
//! strided passes). There is no software prefetch: the kernel is bound by DRAM latency, and a
//! prefetch far ahead ties up the L1 miss buffers that the demand loads need, while the
//! sequential runs of pages are what the hardware prefetchers follow anyway.

use std::arch::x86_64::*;

use super::Page;
use crate::backend::LoraModule;

/// Geometry shared by every tile of one `lora_apply` call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    /// Floats per page (a multiple of 8).
    pub page: usize,
    pub in_f: usize,
    pub out_f: usize,
    /// One partial sum per shrink output whatever the tile's size (see `CheckedSegments`).
    pub invariant: bool,
}

/// One SIMD register of f32 lanes. Every method is `unsafe`: the caller must run with the
/// register's target features enabled (the methods are inlined into `#[target_feature]` entry
/// points), and pointers must have `LANES` readable (writable) elements.
pub(super) trait Vector: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `LANES` page elements widened to f32 by the matmul's `Weight` loads (exact).
    unsafe fn load_page<T: Page>(p: *const T) -> Self;
    /// `a · b + c`, fused.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn hsum(self) -> f32;
}

/// AVX2: 8 lanes.
#[derive(Clone, Copy)]
pub(super) struct V8(__m256);

impl Vector for V8 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (all methods of V8): AVX2/FMA are enabled in the caller (trait contract);
        // pointers cover 8 elements.
        unsafe { V8(_mm256_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { V8(_mm256_set1_ps(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { V8(_mm256_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm256_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn load_page<T: Page>(p: *const T) -> Self {
        unsafe { V8(T::load8(p)) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        unsafe { V8(_mm256_fmadd_ps(a.0, b.0, c.0)) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        unsafe { V8(_mm256_add_ps(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        unsafe {
            let v = self.0;
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
        }
    }
}

/// AVX-512: 16 lanes.
#[derive(Clone, Copy)]
pub(super) struct V16(__m512);

impl Vector for V16 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        // SAFETY (all methods of V16): AVX-512F is enabled in the caller (trait contract);
        // pointers cover 16 elements.
        unsafe { V16(_mm512_setzero_ps()) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { V16(_mm512_set1_ps(v)) }
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { V16(_mm512_loadu_ps(p)) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { _mm512_storeu_ps(p, self.0) }
    }
    #[inline(always)]
    unsafe fn load_page<T: Page>(p: *const T) -> Self {
        unsafe { V16(T::load16(p)) }
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        unsafe { V16(_mm512_fmadd_ps(a.0, b.0, c.0)) }
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        unsafe { V16(_mm512_add_ps(a.0, b.0)) }
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        unsafe { _mm512_reduce_add_ps(self.0) }
    }
}

/// One tile: `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` for the `n` (1..=8) tokens whose x rows start at
/// `x` and y rows at `y` (row strides `in_f` and `out_f`), with AVX2/FMA.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `x` has `n · in_f` readable floats, `y` has `n · out_f`
/// writable floats; `base` points at a pool in which every page id of `m` is a whole page;
/// `m` has `rank · in_f / page` A pages and `rank · out_f / page` B pages; `page % 8 == 0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tile_avx2<T: Page>(base: *const T, d: Dims, m: &LoraModule, x: *const f32, y: *mut f32, n: usize) {
    // SAFETY: forwarded contract, with the features `V8` needs.
    unsafe { tile::<T, V8>(base, d, m, x, y, n) }
}

/// [`tile_avx2`] with AVX-512.
///
/// # Safety
/// As for [`tile_avx2`], with AVX-512F available instead and `page % 16 == 0`.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub(super) unsafe fn tile_avx512<T: Page>(
    base: *const T,
    d: Dims,
    m: &LoraModule,
    x: *const f32,
    y: *mut f32,
    n: usize,
) {
    // SAFETY: forwarded contract, with the features `V16` needs.
    unsafe { tile::<T, V16>(base, d, m, x, y, n) }
}

/// The body of both entry points; `V::LANES` divides the page.
///
/// # Safety
/// As for [`tile_avx2`], with `V`'s target features enabled in the caller.
#[inline(always)]
unsafe fn tile<T: Page, V: Vector>(base: *const T, d: Dims, m: &LoraModule, x: *const f32, y: *mut f32, n: usize) {
    let mut small = [0.0f32; 8 * 64];
    let mut big = Vec::new();
    let h: &mut [f32] = if n * m.rank <= small.len() {
        &mut small[..n * m.rank]
    } else {
        big.resize(n * m.rank, 0.0);
        &mut big
    };
    // SAFETY: forwarded contract; `h` holds n · rank floats. Unrolled variants need the
    // vectors per page to be a multiple of 4 (pages of 128 floats: 8 or 16).
    unsafe {
        // Whole-page strips where a page is 8 vectors and the registers hold them (AVX-512:
        // 2 × 8 accumulators + 8 page vectors of 32).
        let whole_page = V::LANES == 16 && d.page / V::LANES == 8;
        // The shrink's `U` is also its number of partial sums: invariant takes the U = 1 arms.
        match (n, (d.page / V::LANES).is_multiple_of(4) && !d.invariant) {
            (1, true) if whole_page => run::<T, V, 1, 4, 8>(base, d, m, x, y, h),
            (2, true) if whole_page => run::<T, V, 2, 4, 8>(base, d, m, x, y, h),
            (1, true) => run::<T, V, 1, 4, 4>(base, d, m, x, y, h),
            (2, true) => run::<T, V, 2, 4, 4>(base, d, m, x, y, h),
            (3, true) => run::<T, V, 3, 2, 2>(base, d, m, x, y, h),
            (4, true) => run::<T, V, 4, 2, 2>(base, d, m, x, y, h),
            (5, true) => run::<T, V, 5, 1, 1>(base, d, m, x, y, h),
            (6, true) => run::<T, V, 6, 1, 1>(base, d, m, x, y, h),
            (7, true) => run::<T, V, 7, 1, 1>(base, d, m, x, y, h),
            (_, true) => run::<T, V, 8, 1, 1>(base, d, m, x, y, h),
            (1, false) => run::<T, V, 1, 1, 1>(base, d, m, x, y, h),
            (2, false) => run::<T, V, 2, 1, 1>(base, d, m, x, y, h),
            (3, false) => run::<T, V, 3, 1, 1>(base, d, m, x, y, h),
            (4, false) => run::<T, V, 4, 1, 1>(base, d, m, x, y, h),
            (5, false) => run::<T, V, 5, 1, 1>(base, d, m, x, y, h),
            (6, false) => run::<T, V, 6, 1, 1>(base, d, m, x, y, h),
            (7, false) => run::<T, V, 7, 1, 1>(base, d, m, x, y, h),
            (_, false) => run::<T, V, 8, 1, 1>(base, d, m, x, y, h),
        }
    }
}

/// Shrink then expand for `NT` tokens: `U` vectors of A per accumulator group in the shrink,
/// `UC` output vectors per strip in the expand. A vector is `L = V::LANES` floats.
///
/// # Safety
/// As for [`tile`], with `n == NT` and `h.len() == NT · rank`.
#[inline(always)]
unsafe fn run<T: Page, V: Vector, const NT: usize, const U: usize, const UC: usize>(
    base: *const T,
    d: Dims,
    m: &LoraModule,
    x: *const f32,
    y: *mut f32,
    h: &mut [f32],
) {
    let (p, r, l) = (d.page, m.rank, V::LANES);
    let (cin, cout, chunks) = (d.in_f / p, d.out_f / p, p / l);
    // SAFETY (whole body): A page (j, c) is a_pages[j · cin + c] and Bᵀ page (j, c) is
    // b_pages[j · cout + c], both whole pages of the pool; chunk offsets are < p; x offsets are
    // t · in_f + c · p + (< p) < n · in_f, y offsets t · out_f + c · p + (< p) < n · out_f.
    unsafe {
        // Shrink: h[t, j] = scale · x[t] · A[j].
        for j in 0..r {
            let mut acc = [[V::zero(); U]; NT];
            for c in 0..cin {
                let a = base.add(m.a_pages[j * cin + c] as usize * p);
                let xc = x.add(c * p);
                // `U` divides `chunks` (see `tile`).
                for v in (0..chunks).step_by(U) {
                    for u in 0..U {
                        let w = V::load_page(a.add((v + u) * l));
                        for (t, acc_t) in acc.iter_mut().enumerate() {
                            let xv = V::load(xc.add(t * d.in_f + (v + u) * l));
                            acc_t[u] = V::fmadd(xv, w, acc_t[u]);
                        }
                    }
                }
            }
            for (t, acc_t) in acc.iter().enumerate() {
                let s = acc_t[1..].iter().fold(acc_t[0], |s, a| V::add(s, *a));
                h[t * r + j] = m.scale * s.hsum();
            }
        }
        // Expand in strips: y[t] += Σ_j h[t, j] · Bᵀ[j], UC vectors of one column page at a time.
        for c in 0..cout {
            // `UC` divides `chunks` (see `tile`).
            for v in (0..chunks).step_by(UC) {
                let yv = y.add(c * p + v * l);
                strip::<T, V, NT, UC>(base, p, m, h, m.b_pages.as_ptr().add(c), cout, v, yv, d.out_f);
            }
        }
    }
}

/// `y[t, 0..L·UC] += Σ_j h[t, j] · Bᵀ page (j, c)[L·v ..]` for `NT` tokens (y row stride `ldy`);
/// `ids[j · cout]` is page (j, c).
///
/// # Safety
/// As for [`run`]; `v + UC ≤ page / L`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn strip<T: Page, V: Vector, const NT: usize, const UC: usize>(
    base: *const T,
    p: usize,
    m: &LoraModule,
    h: &[f32],
    ids: *const u32,
    cout: usize,
    v: usize,
    y: *mut f32,
    ldy: usize,
) {
    let (r, l) = (m.rank, V::LANES);
    // SAFETY: see `run`; the y strip of each token is L·UC floats inside its row, and
    // `ids[j · cout]` is inside b_pages for j < rank.
    unsafe {
        let mut acc = [[V::zero(); UC]; NT];
        for (t, acc_t) in acc.iter_mut().enumerate() {
            for (u, a) in acc_t.iter_mut().enumerate() {
                *a = V::load(y.add(t * ldy + u * l));
            }
        }
        for j in 0..r {
            let b = base.add(*ids.add(j * cout) as usize * p + v * l);
            let w: [V; UC] = std::array::from_fn(|u| V::load_page(b.add(u * l)));
            for (t, acc_t) in acc.iter_mut().enumerate() {
                let coef = V::splat(*h.get_unchecked(t * r + j));
                for (a, wu) in acc_t.iter_mut().zip(&w) {
                    *a = V::fmadd(coef, *wu, *a);
                }
            }
        }
        for (t, acc_t) in acc.iter().enumerate() {
            for (u, a) in acc_t.iter().enumerate() {
                a.store(y.add(t * ldy + u * l));
            }
        }
    }
}

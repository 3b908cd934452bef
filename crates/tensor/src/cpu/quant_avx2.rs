//! AVX2 kernels for block-quantized weights: the AVX-512 kernels of `quant_avx512.rs` on ymm
//! registers, each 16-row panel taken as two halves of 8 rows (a half's 4 bytes per row are the
//! low or high 32 bytes of each 64-byte group). The integer path has no `vpdpbusd`: int8 codes
//! use the sign trick (`|q|` as unsigned bytes times x with q's sign, `vpmaddubsw`, so no pair
//! sum can saturate: 2·127·127 < 2¹⁵), int4 nibbles multiply x directly; `vpmaddwd` with ones
//! then sums pairs into 32-bit lanes.

use std::arch::x86_64::*;

use super::quant_matmul::{Panels, XInt, XF32};
use crate::quant::{QuantFormat, BLOCK, PANEL};

/// Rows per ymm (half a panel).
const HALF: usize = 8;

trait Format {
    const LOADS: usize;
    const OFFSET: f32;
    /// What the integer accumulator starts at, per unit of the block's x code sum.
    const INIT: i32;
    /// See `quant_avx512::Format::column`, on 8 rows.
    ///
    /// # Safety
    /// Only called from AVX2 kernels (inlined into them).
    unsafe fn column<const J: usize>(v: __m256i) -> __m256;
    /// Adds one load's exact integer products with x (`x + i·kp`) to `acc[i]`.
    ///
    /// # Safety
    /// Only called from AVX2 kernels; `x + i·kp .. + 32 / LOADS` readable for i < MR.
    unsafe fn dot<const MR: usize>(v: __m256i, x: *const i8, kp: usize, acc: &mut [__m256i; MR]);
}

struct Int8;
struct Int4;

/// 4 bytes of x row i, broadcast.
#[inline(always)]
unsafe fn x4(x: *const i8, i: usize, kp: usize, at: usize) -> __m256i {
    // SAFETY: the caller guarantees the bytes are readable.
    _mm256_set1_epi32(unsafe { (x.add(i * kp + at) as *const i32).read_unaligned() })
}

impl Format for Int8 {
    const LOADS: usize = 8;
    const OFFSET: f32 = 0.0;
    const INIT: i32 = 0;
    #[inline(always)]
    unsafe fn column<const J: usize>(v: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_srai_epi32::<24>(_mm256_sllv_epi32(
            v,
            _mm256_set1_epi32(24 - 8 * J as i32),
        )))
    }
    #[inline(always)]
    unsafe fn dot<const MR: usize>(v: __m256i, x: *const i8, kp: usize, acc: &mut [__m256i; MR]) {
        let (aw, ones) = (_mm256_abs_epi8(v), _mm256_set1_epi16(1));
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: see the trait.
            let sx = _mm256_sign_epi8(unsafe { x4(x, i, kp, 0) }, v);
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
        }
    }
}

impl Format for Int4 {
    const LOADS: usize = 4;
    const OFFSET: f32 = 8.0;
    const INIT: i32 = -8;
    #[inline(always)]
    unsafe fn column<const J: usize>(v: __m256i) -> __m256 {
        let shift = 8 * (J % 4) + 4 * (J / 4);
        _mm256_cvtepi32_ps(_mm256_and_si256(
            _mm256_srlv_epi32(v, _mm256_set1_epi32(shift as i32)),
            _mm256_set1_epi32(0x0F),
        ))
    }
    #[inline(always)]
    unsafe fn dot<const MR: usize>(v: __m256i, x: *const i8, kp: usize, acc: &mut [__m256i; MR]) {
        let (mask, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
        let lo = _mm256_and_si256(v, mask);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: see the trait. Each pair sum is at most 2·15·127, two of them fit i16.
            let p = unsafe {
                _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, x4(x, i, kp, 0)),
                    _mm256_maddubs_epi16(hi, x4(x, i, kp, 4)),
                )
            };
            *a = _mm256_add_epi32(*a, _mm256_madd_epi16(p, ones));
        }
    }
}

/// Half `h` of one panel against up to MR x rows.
#[derive(Clone, Copy)]
struct Tile {
    blocks: usize,
    /// The half's first code byte (panel base + 32·h).
    codes: *const u8,
    /// The half's first scale (panel base + 8·h).
    scales: *const u16,
    kp: usize,
    out: *mut f32,
    ldo: usize,
    valid: usize,
}

impl Tile {
    #[inline(always)]
    unsafe fn scales(self, b: usize) -> __m256 {
        // SAFETY: 8 scales of this half at block b (caller's contract).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(self.scales.add(b * PANEL) as *const __m128i)) }
    }

    #[inline(always)]
    unsafe fn store<const MR: usize>(self, acc: &[__m256; MR]) {
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: out[i·ldo + r] is writable for r < valid (caller's contract).
            unsafe {
                let o = self.out.add(i * self.ldo);
                if self.valid == HALF {
                    _mm256_storeu_ps(o, *a);
                } else {
                    let mut tmp = [0.0f32; HALF];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), *a);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, self.valid);
                }
            }
        }
    }
}

/// The tiles of every valid half panel: `f(tile, first x row, rows in the group)` for groups of
/// up to `max_mr` x rows.
unsafe fn halves(
    w: &Panels<'_>,
    m: usize,
    kp: usize,
    out: *mut f32,
    ldo: usize,
    max_mr: usize,
    mut f: impl FnMut(Tile, usize, usize),
) {
    let pbb = w.format.panel_block_bytes();
    for p in 0..w.panels() {
        for h in 0..2 {
            let first = p * PANEL + h * HALF;
            if first >= w.rows {
                break;
            }
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(max_mr);
                // SAFETY: panel p, half h and rows i.. exist (the callers' contracts).
                let t = unsafe {
                    Tile {
                        blocks: w.blocks,
                        codes: w.codes.as_ptr().add(p * w.blocks * pbb + 32 * h),
                        scales: w.scales.as_ptr().add(p * w.blocks * PANEL + HALF * h),
                        kp,
                        out: out.add(i * ldo + first),
                        ldo,
                        valid: (w.rows - first).min(HALF),
                    }
                };
                f(t, i, mr);
                i += mr;
            }
        }
    }
}

/// See `quant_matmul::f32_panels`.
///
/// # Safety
/// As `quant_avx512::f32_panels`, with AVX2/FMA/F16C instead of AVX-512.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f32_panels(x: &XF32<'_>, m: usize, w: &Panels<'_>, out: *mut f32, ldo: usize) {
    // SAFETY: the offsets stay inside the buffers of the contract; `sums` is read for int4 only.
    unsafe {
        halves(w, m, x.kp, out, ldo, 4, |t, i, mr| {
            let (xp, s) = (x.x.as_ptr().add(i * x.kp), x.sums.as_ptr().wrapping_add(i * w.blocks));
            match (w.format, mr) {
                (QuantFormat::Int8, 1) => f32_tile_int8::<1>(t, xp),
                (QuantFormat::Int8, 2) => f32_tile_int8::<2>(t, xp),
                (QuantFormat::Int8, 3) => f32_tile::<Int8, 3, 2>(t, xp, s),
                (QuantFormat::Int8, _) => f32_tile::<Int8, 4, 1>(t, xp, s),
                (QuantFormat::Int4, 1) => f32_tile::<Int4, 1, 4>(t, xp, s),
                (QuantFormat::Int4, 2) => f32_tile::<Int4, 2, 2>(t, xp, s),
                (QuantFormat::Int4, 3) => f32_tile::<Int4, 3, 2>(t, xp, s),
                (QuantFormat::Int4, _) => f32_tile::<Int4, 4, 1>(t, xp, s),
            }
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_tile<F: Format, const MR: usize, const S: usize>(t: Tile, x: *const f32, sums: *const f32) {
    let mut acc = [_mm256_setzero_ps(); MR];
    let per = BLOCK / F::LOADS;
    // SAFETY (whole body): as in `quant_avx512::f32_tile`.
    unsafe {
        for b in 0..t.blocks {
            let mut part = [[_mm256_setzero_ps(); MR]; S];
            let blk = t.codes.add(b * F::LOADS * 64);
            for g in 0..F::LOADS {
                let v = _mm256_loadu_si256(blk.add(g * 64) as *const __m256i);
                let xc = x.add(b * BLOCK + g * per);
                column::<F, MR, S, 0>(v, xc, t.kp, &mut part);
                column::<F, MR, S, 1>(v, xc, t.kp, &mut part);
                column::<F, MR, S, 2>(v, xc, t.kp, &mut part);
                column::<F, MR, S, 3>(v, xc, t.kp, &mut part);
                if per == 8 {
                    column::<F, MR, S, 4>(v, xc, t.kp, &mut part);
                    column::<F, MR, S, 5>(v, xc, t.kp, &mut part);
                    column::<F, MR, S, 6>(v, xc, t.kp, &mut part);
                    column::<F, MR, S, 7>(v, xc, t.kp, &mut part);
                }
            }
            let d = t.scales(b);
            for (i, a) in acc.iter_mut().enumerate() {
                let mut s = part[0][i];
                for p in &part[1..] {
                    s = _mm256_add_ps(s, p[i]);
                }
                if F::OFFSET != 0.0 {
                    s = _mm256_sub_ps(s, _mm256_set1_ps(F::OFFSET * *sums.add(i * t.blocks + b)));
                }
                *a = _mm256_fmadd_ps(s, d, *a);
            }
        }
        t.store(&acc);
    }
}

/// The int8 f32 path for 1 or 2 x rows (`quant_avx512::f32_tile_int8` on ymm): `vpmovsxbd`
/// widens 8 bytes (2 rows × 4 columns) straight from memory against x's 4 columns broadcast
/// twice; each block's lanes are scaled by their row's scale and a row's 4 columns summed at the
/// end.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f32_tile_int8<const MR: usize>(t: Tile, x: *const f32) {
    // Lane l of quarter q is row 2q + l / 4 of the half, column l % 4.
    let rows: [__m256i; 4] = std::array::from_fn(|q| {
        let idx: [i32; 8] = std::array::from_fn(|l| (2 * q + l / 4) as i32);
        // SAFETY: 8 readable i32s.
        unsafe { _mm256_loadu_si256(idx.as_ptr() as *const __m256i) }
    });
    let mut acc = [[_mm256_setzero_ps(); MR]; 4];
    // SAFETY (whole body): loads stay within the half's 32 bytes of each 64-byte group of the
    // panel's blocks and the x rows' kp floats; see the caller.
    unsafe {
        for b in 0..t.blocks {
            let mut part = [[_mm256_setzero_ps(); MR]; 4];
            let blk = t.codes.add(b * 512);
            for g in 0..8 {
                let xv: [__m256; MR] = std::array::from_fn(|i| {
                    _mm256_broadcast_ps(&*(x.add(i * t.kp + b * BLOCK + 4 * g) as *const __m128))
                });
                for (q, pq) in part.iter_mut().enumerate() {
                    let w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
                        blk.add(g * 64 + 8 * q) as *const __m128i
                    )));
                    for (p, xi) in pq.iter_mut().zip(&xv) {
                        *p = _mm256_fmadd_ps(w, *xi, *p);
                    }
                }
            }
            let d = t.scales(b);
            for q in 0..4 {
                let dq = _mm256_permutevar8x32_ps(d, rows[q]);
                for i in 0..MR {
                    acc[q][i] = _mm256_fmadd_ps(part[q][i], dq, acc[q][i]);
                }
            }
        }
        for i in 0..MR {
            let mut lanes = [0.0f32; 32];
            for (q, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * q), a[i]);
            }
            let o = t.out.add(i * t.ldo);
            for r in 0..t.valid {
                *o.add(r) = lanes[4 * r] + lanes[4 * r + 1] + lanes[4 * r + 2] + lanes[4 * r + 3];
            }
        }
    }
}

#[inline(always)]
unsafe fn column<F: Format, const MR: usize, const S: usize, const J: usize>(
    v: __m256i,
    x: *const f32,
    kp: usize,
    part: &mut [[__m256; MR]; S],
) {
    // SAFETY: the caller runs with AVX2/FMA and x + i·kp + J is inside x row i.
    unsafe {
        let w = F::column::<J>(v);
        for (i, p) in part[J % S].iter_mut().enumerate() {
            *p = _mm256_fmadd_ps(w, _mm256_set1_ps(*x.add(i * kp + J)), *p);
        }
    }
}

/// See `quant_matmul::int_panels`.
///
/// # Safety
/// As `quant_avx512::int_panels`, with AVX2/FMA/F16C instead of AVX-512 VNNI.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn int_panels(x: &XInt, m: usize, w: &Panels<'_>, out: *mut f32, ldo: usize) {
    // SAFETY: the offsets stay inside the buffers of the contract.
    unsafe {
        halves(w, m, x.kp, out, ldo, 4, |t, i, mr| {
            let xs = (
                x.q.as_ptr().add(i * x.kp),
                x.scale.as_ptr().add(i * w.blocks),
                x.sums.as_ptr().add(i * w.blocks),
            );
            match (w.format, mr) {
                (QuantFormat::Int8, 1) => int_tile::<Int8, 1>(t, xs),
                (QuantFormat::Int8, 2) => int_tile::<Int8, 2>(t, xs),
                (QuantFormat::Int8, 3) => int_tile::<Int8, 3>(t, xs),
                (QuantFormat::Int8, _) => int_tile::<Int8, 4>(t, xs),
                (QuantFormat::Int4, 1) => int_tile::<Int4, 1>(t, xs),
                (QuantFormat::Int4, 2) => int_tile::<Int4, 2>(t, xs),
                (QuantFormat::Int4, 3) => int_tile::<Int4, 3>(t, xs),
                (QuantFormat::Int4, _) => int_tile::<Int4, 4>(t, xs),
            }
        })
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn int_tile<F: Format, const MR: usize>(t: Tile, (xq, scale, sums): (*const i8, *const f32, *const i32)) {
    let mut acc = [_mm256_setzero_ps(); MR];
    let per = BLOCK / F::LOADS;
    // SAFETY (whole body): as in `quant_avx512::int_tile`.
    unsafe {
        for b in 0..t.blocks {
            let mut isum: [__m256i; MR] =
                std::array::from_fn(|i| _mm256_set1_epi32(F::INIT * *sums.add(i * t.blocks + b)));
            let blk = t.codes.add(b * F::LOADS * 64);
            for g in 0..F::LOADS {
                let v = _mm256_loadu_si256(blk.add(g * 64) as *const __m256i);
                F::dot(v, xq.add(b * BLOCK + g * per), t.kp, &mut isum);
            }
            let d = t.scales(b);
            for (i, a) in acc.iter_mut().enumerate() {
                let s = _mm256_mul_ps(d, _mm256_set1_ps(*scale.add(i * t.blocks + b)));
                *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), s, *a);
            }
        }
        t.store(&acc);
    }
}

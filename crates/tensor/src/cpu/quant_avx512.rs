//! AVX-512 kernels for block-quantized weights (see `quant_matmul.rs` for the two paths and
//! `crate::quant` for the layout): one zmm lane per row of a 16-row panel, so a 64-byte load
//! holds 4 (int8) or 8 (int4) columns of all 16 rows and no horizontal sums are needed.
//!
//! * f32 path: column j of a load is shifted out of each lane, converted to f32 and multiplied
//!   with x[j] broadcast; each block's sum is scaled by the 16 rows' scales at its end.
//! * integer path (AVX-512 VNNI): `vpdpbusd` multiplies a load's unsigned bytes (int8 codes
//!   XOR 0x80, i.e. q + 128; int4 nibbles, q + 8) with 4 int8 x values broadcast, summing 4
//!   products per lane; the accumulator starts at `−bias · Σ xq` so it ends at the exact
//!   `Σ q · xq` of the block.

use std::arch::x86_64::*;

use super::quant_matmul::{Panels, XInt, XF32};
use crate::quant::{QuantFormat, BLOCK, PANEL};

/// What differs between the formats, as the kernels see it.
trait Format {
    /// 64-byte loads per block.
    const LOADS: usize;
    /// What the f32 path's `column` values exceed q by, to be taken off per block as
    /// `OFFSET · Σx` (0: `column` gives q itself).
    const OFFSET: f32;
    /// Widened column `J` of a load: the 16 rows' values q of that column, as f32 (minus
    /// `OFFSET`).
    ///
    /// # Safety
    /// Only called from AVX-512F/BW kernels (inlined into them).
    unsafe fn column<const J: usize>(v: __m512i) -> __m512;
    /// Adds the integer dot products of one load with x (`x[i]` points at the load's first
    /// column of x row i, `kp` apart) to `acc[i]`.
    ///
    /// # Safety
    /// Only called from AVX-512 VNNI kernels; `x + i·kp .. + 4·PER_LOAD` readable for i < MR.
    unsafe fn dot<const MR: usize>(v: __m512i, x: *const i8, kp: usize, acc: &mut [__m512i; MR]);
    /// Bias of the unsigned bytes `dot` multiplies (q + bias).
    const BIAS: i32;
}

struct Int8;
struct Int4;

impl Format for Int8 {
    const LOADS: usize = 8;
    const OFFSET: f32 = 0.0;
    const BIAS: i32 = 128;
    #[inline(always)]
    unsafe fn column<const J: usize>(v: __m512i) -> __m512 {
        // Byte J of each lane, sign-extended.
        _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(_mm512_sllv_epi32(
            v,
            _mm512_set1_epi32(24 - 8 * J as i32),
        )))
    }
    #[inline(always)]
    unsafe fn dot<const MR: usize>(v: __m512i, x: *const i8, kp: usize, acc: &mut [__m512i; MR]) {
        let u = _mm512_xor_si512(v, _mm512_set1_epi8(-128));
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 4 readable bytes at x + i·kp.
            let xv = unsafe { (x.add(i * kp) as *const i32).read_unaligned() };
            *a = _mm512_dpbusd_epi32(*a, u, _mm512_set1_epi32(xv));
        }
    }
}

impl Format for Int4 {
    const LOADS: usize = 4;
    const OFFSET: f32 = 0.0;
    const BIAS: i32 = 8;
    #[inline(always)]
    unsafe fn column<const J: usize>(v: __m512i) -> __m512 {
        // Columns 0..4: low nibbles of bytes 0..4; columns 4..8: their high nibbles. `vpermps`
        // reads only the low 4 bits of each index, so shifting the nibble down is enough to
        // look its value q − 8 up in a 16-entry table: no mask, no conversion, no offset.
        let shift = 8 * (J % 4) + 4 * (J / 4);
        let values = _mm512_setr_ps(
            -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
        );
        _mm512_permutexvar_ps(_mm512_srlv_epi32(v, _mm512_set1_epi32(shift as i32)), values)
    }
    #[inline(always)]
    unsafe fn dot<const MR: usize>(v: __m512i, x: *const i8, kp: usize, acc: &mut [__m512i; MR]) {
        let mask = _mm512_set1_epi8(0x0F);
        let lo = _mm512_and_si512(v, mask);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
        for (i, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller guarantees 8 readable bytes at x + i·kp.
            let (xl, xh) = unsafe {
                let p = x.add(i * kp) as *const i32;
                (p.read_unaligned(), p.add(1).read_unaligned())
            };
            *a = _mm512_dpbusd_epi32(*a, lo, _mm512_set1_epi32(xl));
            *a = _mm512_dpbusd_epi32(*a, hi, _mm512_set1_epi32(xh));
        }
    }
}

/// One panel against up to MR x rows.
#[derive(Clone, Copy)]
struct Tile {
    blocks: usize,
    codes: *const u8,
    scales: *const u16,
    kp: usize,
    out: *mut f32,
    ldo: usize,
    valid: usize,
}

impl Tile {
    /// The block's 16 row scales as f32.
    #[inline(always)]
    unsafe fn scales(self, b: usize) -> __m512 {
        // SAFETY: the panel has `blocks` × 16 scales (caller's contract).
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(self.scales.add(b * PANEL) as *const __m256i)) }
    }

    #[inline(always)]
    unsafe fn store<const MR: usize>(self, acc: &[__m512; MR]) {
        for (i, a) in acc.iter().enumerate() {
            // SAFETY: out[i·ldo + r] is writable for r < valid (caller's contract).
            unsafe {
                let o = self.out.add(i * self.ldo);
                if self.valid == PANEL {
                    _mm512_storeu_ps(o, *a);
                } else {
                    _mm512_mask_storeu_ps(o, ((1u32 << self.valid) - 1) as u16, *a);
                }
            }
        }
    }
}

/// See `quant_matmul::f32_panels`.
///
/// # Safety
/// AVX-512F/BW present; `x.x` holds m rows of `x.kp = 32·blocks` floats (int4: `x.sums` m ×
/// blocks); `w`'s buffers hold its panels; `out[i·ldo + r]` is writable for i < m, r < w.rows.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn f32_panels(x: &XF32<'_>, m: usize, w: &Panels<'_>, out: *mut f32, ldo: usize) {
    let pbb = w.format.panel_block_bytes();
    for p in 0..w.panels() {
        let mut i = 0;
        while i < m {
            let mr = (m - i).min(4);
            // SAFETY (block): panel p and x rows i..i + mr exist; the offsets stay inside the
            // buffers of the contract (the sums pointer is only read for int4, where it has m rows).
            unsafe {
                let t = Tile {
                    blocks: w.blocks,
                    codes: w.codes.as_ptr().add(p * w.blocks * pbb),
                    scales: w.scales.as_ptr().add(p * w.blocks * PANEL),
                    kp: x.kp,
                    out: out.add(i * ldo + p * PANEL),
                    ldo,
                    valid: (w.rows - p * PANEL).min(PANEL),
                };
                let (xp, sums) = (x.x.as_ptr().add(i * x.kp), x.sums.as_ptr().wrapping_add(i * w.blocks));
                match (w.format, mr) {
                    (QuantFormat::Int8, 1) => f32_tile_int8::<1>(t, xp),
                    (QuantFormat::Int8, 2) => f32_tile_int8::<2>(t, xp),
                    (QuantFormat::Int8, 3) => f32_tile::<Int8, 3, 2>(t, xp, sums),
                    (QuantFormat::Int8, _) => f32_tile::<Int8, 4, 2>(t, xp, sums),
                    (QuantFormat::Int4, 1) => f32_tile::<Int4, 1, 4>(t, xp, sums),
                    (QuantFormat::Int4, 2) => f32_tile::<Int4, 2, 4>(t, xp, sums),
                    (QuantFormat::Int4, 3) => f32_tile::<Int4, 3, 2>(t, xp, sums),
                    (QuantFormat::Int4, _) => f32_tile::<Int4, 4, 2>(t, xp, sums),
                }
            }
            i += mr;
        }
    }
}

/// `MR` x rows against one panel; `S` independent partial sums per x row within a block, so the
/// FMA chains overlap.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn f32_tile<F: Format, const MR: usize, const S: usize>(t: Tile, x: *const f32, sums: *const f32) {
    let mut acc = [_mm512_setzero_ps(); MR];
    // SAFETY (whole body): loads stay within the panel's blocks × LOADS × 64 code bytes and the
    // x rows' kp floats (column b·32 + g·PER + J < kp); see the caller.
    unsafe {
        for b in 0..t.blocks {
            let mut part = [[_mm512_setzero_ps(); MR]; S];
            let blk = t.codes.add(b * F::LOADS * 64);
            let per = BLOCK / F::LOADS;
            for g in 0..F::LOADS {
                let v = _mm512_loadu_si512(blk.add(g * 64) as *const __m512i);
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
                    s = _mm512_add_ps(s, p[i]);
                }
                if F::OFFSET != 0.0 {
                    s = _mm512_sub_ps(s, _mm512_set1_ps(F::OFFSET * *sums.add(i * t.blocks + b)));
                }
                *a = _mm512_fmadd_ps(s, d, *a);
            }
        }
        t.store(&acc);
    }
}

/// The int8 f32 path for 1 or 2 x rows, with a quarter of a load per vector: `vpmovsxbd`
/// widens 16 bytes (4 rows × 4 columns) straight from memory, x's 4 columns are broadcast
/// 128 bits at a time, and each block's lanes are scaled by their row's scale; the 4 columns of
/// a row are summed once, at the end. 3 vector operations per 16 weights instead of 3.75.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn f32_tile_int8<const MR: usize>(t: Tile, x: *const f32) {
    // Lane l of quarter q is row 4q + l / 4, column l % 4.
    let rows: [__m512i; 4] = std::array::from_fn(|q| {
        let idx: [i32; 16] = std::array::from_fn(|l| (4 * q + l / 4) as i32);
        // SAFETY: 16 readable i32s.
        unsafe { _mm512_loadu_si512(idx.as_ptr() as *const __m512i) }
    });
    let mut acc = [[_mm512_setzero_ps(); MR]; 4];
    // SAFETY (whole body): loads stay within the panel's blocks × 512 code bytes and the x rows'
    // kp floats; see the caller.
    unsafe {
        for b in 0..t.blocks {
            let mut part = [[_mm512_setzero_ps(); MR]; 4];
            let blk = t.codes.add(b * 512);
            for g in 0..8 {
                let xv: [__m512; MR] =
                    std::array::from_fn(|i| _mm512_broadcast_f32x4(_mm_loadu_ps(x.add(i * t.kp + b * BLOCK + 4 * g))));
                for (q, pq) in part.iter_mut().enumerate() {
                    let w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                        blk.add(g * 64 + 16 * q) as *const __m128i
                    )));
                    for (p, xi) in pq.iter_mut().zip(&xv) {
                        *p = _mm512_fmadd_ps(w, *xi, *p);
                    }
                }
            }
            let d = t.scales(b);
            for q in 0..4 {
                let dq = _mm512_permutexvar_ps(rows[q], d);
                for i in 0..MR {
                    acc[q][i] = _mm512_fmadd_ps(part[q][i], dq, acc[q][i]);
                }
            }
        }
        for i in 0..MR {
            let mut lanes = [0.0f32; 64];
            for (q, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr().add(16 * q), a[i]);
            }
            let o = t.out.add(i * t.ldo);
            for r in 0..t.valid {
                *o.add(r) = lanes[4 * r] + lanes[4 * r + 1] + lanes[4 * r + 2] + lanes[4 * r + 3];
            }
        }
    }
}

/// Column `J` of load `v` times x column `J` (at `x + i·kp + J`) into partial sum `J % S`.
#[inline(always)]
unsafe fn column<F: Format, const MR: usize, const S: usize, const J: usize>(
    v: __m512i,
    x: *const f32,
    kp: usize,
    part: &mut [[__m512; MR]; S],
) {
    // SAFETY: the caller runs with AVX-512F/BW and x + i·kp + J is inside x row i.
    unsafe {
        let w = F::column::<J>(v);
        for (i, p) in part[J % S].iter_mut().enumerate() {
            *p = _mm512_fmadd_ps(w, _mm512_set1_ps(*x.add(i * kp + J)), *p);
        }
    }
}

/// See `quant_matmul::int_panels`.
///
/// # Safety
/// AVX-512F/BW/VNNI present; `x.q` holds m rows of `x.kp = 32·blocks` codes and `x.scale`,
/// `x.sums` m × blocks values; `w`'s buffers hold its panels; `out[i·ldo + r]` is writable for
/// i < m, r < w.rows.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn int_panels(x: &XInt, m: usize, w: &Panels<'_>, out: *mut f32, ldo: usize) {
    let pbb = w.format.panel_block_bytes();
    for p in 0..w.panels() {
        let mut i = 0;
        while i < m {
            // Groups of up to 8 rows, as even as possible.
            let mr = (m - i).div_ceil((m - i).div_ceil(8));
            // SAFETY (block): panel p and x rows i..i + mr exist (see the contract).
            unsafe {
                let t = Tile {
                    blocks: w.blocks,
                    codes: w.codes.as_ptr().add(p * w.blocks * pbb),
                    scales: w.scales.as_ptr().add(p * w.blocks * PANEL),
                    kp: x.kp,
                    out: out.add(i * ldo + p * PANEL),
                    ldo,
                    valid: (w.rows - p * PANEL).min(PANEL),
                };
                let xs = XRows {
                    q: x.q.as_ptr().add(i * x.kp),
                    scale: x.scale.as_ptr().add(i * w.blocks),
                    sums: x.sums.as_ptr().add(i * w.blocks),
                };
                match (w.format, mr) {
                    (QuantFormat::Int8, 1) => int_tile::<Int8, 1>(t, xs),
                    (QuantFormat::Int8, 2) => int_tile::<Int8, 2>(t, xs),
                    (QuantFormat::Int8, 3) => int_tile::<Int8, 3>(t, xs),
                    (QuantFormat::Int8, 4) => int_tile::<Int8, 4>(t, xs),
                    (QuantFormat::Int8, 5) => int_tile::<Int8, 5>(t, xs),
                    (QuantFormat::Int8, 6) => int_tile::<Int8, 6>(t, xs),
                    (QuantFormat::Int8, 7) => int_tile::<Int8, 7>(t, xs),
                    (QuantFormat::Int8, _) => int_tile::<Int8, 8>(t, xs),
                    (QuantFormat::Int4, 1) => int_tile::<Int4, 1>(t, xs),
                    (QuantFormat::Int4, 2) => int_tile::<Int4, 2>(t, xs),
                    (QuantFormat::Int4, 3) => int_tile::<Int4, 3>(t, xs),
                    (QuantFormat::Int4, 4) => int_tile::<Int4, 4>(t, xs),
                    (QuantFormat::Int4, 5) => int_tile::<Int4, 5>(t, xs),
                    (QuantFormat::Int4, 6) => int_tile::<Int4, 6>(t, xs),
                    (QuantFormat::Int4, 7) => int_tile::<Int4, 7>(t, xs),
                    (QuantFormat::Int4, _) => int_tile::<Int4, 8>(t, xs),
                }
            }
            i += mr;
        }
    }
}

/// The quantized x rows of one tile.
#[derive(Clone, Copy)]
struct XRows {
    q: *const i8,
    scale: *const f32,
    sums: *const i32,
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int_tile<F: Format, const MR: usize>(t: Tile, x: XRows) {
    let mut acc = [_mm512_setzero_ps(); MR];
    let per = BLOCK / F::LOADS;
    // SAFETY (whole body): loads stay within the panel's codes and scales and the x rows' kp
    // codes and blocks scales/sums; see the caller.
    unsafe {
        for b in 0..t.blocks {
            let mut isum: [__m512i; MR] =
                std::array::from_fn(|i| _mm512_set1_epi32(-F::BIAS * *x.sums.add(i * t.blocks + b)));
            let blk = t.codes.add(b * F::LOADS * 64);
            for g in 0..F::LOADS {
                let v = _mm512_loadu_si512(blk.add(g * 64) as *const __m512i);
                F::dot(v, x.q.add(b * BLOCK + g * per), t.kp, &mut isum);
            }
            let d = t.scales(b);
            for (i, a) in acc.iter_mut().enumerate() {
                let s = _mm512_mul_ps(d, _mm512_set1_ps(*x.scale.add(i * t.blocks + b)));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[i]), s, *a);
            }
        }
        t.store(&acc);
    }
}

/// `quant_scalar::quantize_x` with AVX-512, to the bit: the same division and the same
/// round-half-to-even (`vcvtps2dq` under the default rounding mode).
///
/// # Safety
/// AVX-512F/BW present; `x` holds m × k floats; `out.q` m × out.kp codes and `out.scale`,
/// `out.sums` m × (out.kp / 32) values, with out.kp ≥ k.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn quantize_x(x: &[f32], m: usize, k: usize, out: &mut XInt) {
    let nb = out.kp / BLOCK;
    for i in 0..m {
        for b in 0..nb {
            let lo = b * BLOCK;
            let n = (k - lo).min(BLOCK);
            let mask = |half: usize| -> u16 {
                let left = n.saturating_sub(16 * half).min(16);
                ((1u32 << left) - 1) as u16
            };
            // SAFETY: masked loads read only x[i·k + lo .. + n]; the stores write the block's 32
            // codes of row i (kp ≥ lo + 32).
            unsafe {
                let p = x.as_ptr().add(i * k + lo);
                let v0 = _mm512_maskz_loadu_ps(mask(0), p);
                let v1 = _mm512_maskz_loadu_ps(mask(1), p.wrapping_add(16));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
                let d = amax / 127.0;
                let (q0, q1) = if d > 0.0 {
                    let dv = _mm512_set1_ps(d);
                    (
                        _mm512_cvtps_epi32(_mm512_div_ps(v0, dv)),
                        _mm512_cvtps_epi32(_mm512_div_ps(v1, dv)),
                    )
                } else {
                    (_mm512_setzero_si512(), _mm512_setzero_si512())
                };
                let dst = out.q.as_mut_ptr().add(i * out.kp + lo);
                _mm_storeu_si128(dst as *mut __m128i, _mm512_cvtepi32_epi8(q0));
                _mm_storeu_si128(dst.add(16) as *mut __m128i, _mm512_cvtepi32_epi8(q1));
                out.scale[i * nb + b] = d;
                out.sums[i * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            }
        }
    }
}

//! Portable kernels for block-quantized weights: the fallback off x86 and the oracle the SIMD
//! kernels are tested against. Same inputs and outputs as the SIMD kernels
//! (`quant_avx512.rs`, `quant_avx2.rs`); the integer path computes exactly what they compute
//! (integer block sums, then `acc = fma(sum, d_w · d_x, acc)` block by block), so they agree to
//! the bit.

use super::quant_matmul::{Panels, XInt, XF32};
use crate::quant::{code, rint, QuantFormat, BLOCK, PANEL};

/// f32 path: `out[i * ldo + r] = Σ_b d_rb · Σ_c (q_rbc − offset) · x[i, 32b + c]` for the rows of
/// `w`, i.e. x times the dequantized weights.
pub(crate) fn f32_panels(x: &XF32<'_>, m: usize, w: &Panels<'_>, out: &mut [f32], ldo: usize) {
    w.check_out(m, out.len(), ldo);
    let pbb = w.format.panel_block_bytes();
    for r in 0..w.rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        for i in 0..m {
            let xi = &x.x[i * x.kp..(i + 1) * x.kp];
            let mut acc = 0.0f32;
            for b in 0..w.blocks {
                let at = (p * w.blocks + b) * pbb;
                let block = &w.codes[at..at + pbb];
                let mut s = 0.0f32;
                for (c, xv) in xi[b * BLOCK..(b + 1) * BLOCK].iter().enumerate() {
                    s += signed(w.format, code(w.format, block, lane, c)) as f32 * xv;
                }
                acc += s * w.scale(p, b, lane);
            }
            out[i * ldo + r] = acc;
        }
    }
}

/// Integer path: per block, the exact integer `Σ_c (q_rbc − offset) · xq[i, 32b + c]`, then
/// `acc = fma(sum, d_rb · dx_ib, acc)`.
pub(crate) fn int_panels(x: &XInt, m: usize, w: &Panels<'_>, out: &mut [f32], ldo: usize) {
    w.check_out(m, out.len(), ldo);
    let pbb = w.format.panel_block_bytes();
    for r in 0..w.rows {
        let (p, lane) = (r / PANEL, r % PANEL);
        for i in 0..m {
            let mut acc = 0.0f32;
            for b in 0..w.blocks {
                let at = (p * w.blocks + b) * pbb;
                let block = &w.codes[at..at + pbb];
                let xq = &x.q[i * x.kp + b * BLOCK..i * x.kp + (b + 1) * BLOCK];
                let s: i32 = xq
                    .iter()
                    .enumerate()
                    .map(|(c, &v)| signed(w.format, code(w.format, block, lane, c)) * v as i32)
                    .sum();
                acc = (s as f32).mul_add(w.scale(p, b, lane) * x.scale[i * w.blocks + b], acc);
            }
            out[i * ldo + r] = acc;
        }
    }
}

/// A code as the signed integer `q` of its value `q · d`.
#[inline]
fn signed(format: QuantFormat, code: u8) -> i32 {
    match format {
        QuantFormat::Int8 => code as i8 as i32,
        QuantFormat::Int4 => code as i32 - 8,
    }
}

/// Quantizes each row of `x` (`m × k`, rows padded with zeros to `kp`) per block of 32:
/// scale `max|x| / 127` (f32), codes `round(x / scale)` half to even, and each block's code sum.
pub(crate) fn quantize_x(x: &[f32], m: usize, k: usize, out: &mut XInt) {
    let nb = out.kp / BLOCK;
    let mut block = [0.0f32; BLOCK];
    for i in 0..m {
        for b in 0..nb {
            block.fill(0.0);
            let (lo, hi) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
            block[..hi - lo].copy_from_slice(&x[i * k + lo..i * k + hi]);
            let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let q = &mut out.q[i * out.kp + lo..i * out.kp + lo + BLOCK];
            let mut sum = 0i32;
            for (qv, &v) in q.iter_mut().zip(&block) {
                *qv = if d > 0.0 { rint(v / d) as i8 } else { 0 };
                sum += *qv as i32;
            }
            out.scale[i * nb + b] = d;
            out.sums[i * nb + b] = sum;
        }
    }
}

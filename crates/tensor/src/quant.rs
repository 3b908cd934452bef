//! Block-quantized weight matrices (`--quantization int8|int4`), made once at load from a
//! bf16/f16/f32 matrix.
//!
//! **Blocks.** Each row is cut into blocks of [`BLOCK`] = 32 values along the input dimension (the
//! last block zero-padded), each with one f16 scale `d`. Codes are `round(x / d)` computed in f32
//! and rounded half to even (numpy's `rint`, so an oracle can reproduce them bit for bit):
//! * int8: `q ∈ [-127, 127]`, value `q·d`; `d = max|x| / 127` rounded *up* to an f16, so no code
//!   clips and every element is within `d/2` of its value.
//! * int4: `q ∈ [0, 15]`, value `(q − 8)·d`; `d = x_m / −8` rounded to the nearest f16, where `x_m`
//!   is the block's first element of largest magnitude (llama.cpp's Q4_0): `x_m` lands on `−8·d`,
//!   the other side reaches `7·|d|`. Elements with `x/d ∈ [−8.5, 7.5]` are within `|d|/2` of their
//!   value, the rest (the far side of `x_m`) within `|d|`. No offset per block: on Gaussian blocks
//!   an offset (Q4_1) lowers the RMS error only from 8.6% to 7.8% of the RMS weight, for 11% more
//!   bytes per weight and so 11% slower decode.
//!
//! Scales are f16, not f32: rounding `d` up to an f16 moves it by at most 2⁻¹⁰ (the error bound
//! `d/2` grows by 0.1%), while 2 bytes less per block of 32 is 6% fewer bytes for int8 (34 instead
//! of 36) and 10% for int4 (18 instead of 20) — decode speed at the bandwidth bound. The f16 range
//! is ample for weights (a block whose max |w| would need a scale beyond 65504 is refused).
//!
//! Every value `q·d` is exact in f32 (≤ 8-bit code × 11-bit scale), so "the dequantized weights"
//! are well defined and the f32 kernels multiply exactly them.
//!
//! **Layout** (what the kernels stream). Rows are grouped in panels of [`PANEL`] = 16 (the last
//! zero-padded); a panel stores block after block, and within a block the 16 rows' codes are
//! interleaved 4 bytes at a time, so one 64-byte load holds the same 4 bytes of all 16 rows — a
//! row per 32-bit lane, the operand order of `vpdpbusd`:
//! * int8: byte `g·64 + r·4 + t` of a block is the code of row `r`, column `4g + t` (g < 8).
//! * int4: byte `g·64 + r·4 + t` holds row `r`'s codes for columns `8g + t` (low nibble) and
//!   `8g + 4 + t` (high nibble) (g < 4).
//!
//! Scales follow the same order: panel, block, then the 16 rows' f16 scales.
//!
//! **Zero shifts** (imports only). Pre-quantized GPTQ/AWQ checkpoints with zero points store
//! `(q − z)·d`; [`from_codes`] keeps the codes as above and, per row and block, the shift
//! `s = 8 − z` (int4) or `128 − z` (int8; the code is `q − 128`) as an i16: the value is the
//! symmetric one plus `s·d` (exact in f32). The kernels multiply the symmetric part; each task
//! then adds `Σ_b s·d · (x's block sum)` for its rows while they are hot (2 bytes more per block
//! than a symmetric matrix: int4 5 bits a weight instead of 4.5).

use std::fmt;
use std::sync::Arc;

use half::f16;
use rayon::prelude::*;

use crate::cpu::huge::HugeVec;
use crate::error::TensorError;
use crate::storage::{DType, Matrix, MatrixData, SharedBytes, TypedSlice};

/// Values per block along the input dimension.
pub const BLOCK: usize = 32;
/// Rows per panel.
pub const PANEL: usize = 16;

/// A block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Int8,
    Int4,
}

impl QuantFormat {
    /// Bytes of codes per row and block.
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Int8 => BLOCK,
            QuantFormat::Int4 => BLOCK / 2,
        }
    }

    /// Bytes of codes per panel and block.
    pub const fn panel_block_bytes(self) -> usize {
        PANEL * self.block_bytes()
    }

    /// Storage bits per weight, scale included (int8: 8.5, int4: 4.5).
    pub fn bits_per_weight(self) -> f64 {
        (self.block_bytes() + 2) as f64 * 8.0 / BLOCK as f64
    }

    /// `(value code) → q` offset: the value is `(code − offset)·d` for the code read as a
    /// signed (int8) or unsigned (int4) byte.
    pub const fn offset(self) -> i32 {
        match self {
            QuantFormat::Int8 => 0,
            QuantFormat::Int4 => 8,
        }
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuantFormat::Int8 => "int8",
            QuantFormat::Int4 => "int4",
        })
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "int8" => Ok(QuantFormat::Int8),
            "int4" => Ok(QuantFormat::Int4),
            other => Err(format!("quantization {other:?}: expected int8 or int4")),
        }
    }
}

/// A quantized matrix's storage; see the module docs for the layout.
#[derive(Clone)]
pub struct QuantData {
    pub format: QuantFormat,
    /// The dtype the matrix was quantized from.
    pub source: DType,
    /// Blocks per row: `cols.div_ceil(BLOCK)`.
    pub blocks: usize,
    /// Panels: `rows.div_ceil(PANEL)`.
    pub panels: usize,
    /// `panels × blocks × format.panel_block_bytes()` bytes of codes.
    pub codes: TypedSlice<u8>,
    /// `panels × blocks × PANEL` scales.
    pub scales: TypedSlice<f16>,
    /// Per row and block, `s` such that `s·d` is added to every value of the block: `rows ×
    /// blocks`, row-major (see the module docs); `None` for symmetric blocks.
    pub zero_shifts: Option<TypedSlice<i16>>,
}

impl QuantData {
    /// Whether the buffers fit a `[rows, cols]` matrix.
    pub(crate) fn check(&self, rows: usize, cols: usize) -> Result<(), TensorError> {
        let (nb, np) = (cols.div_ceil(BLOCK), rows.div_ceil(PANEL));
        if self.blocks != nb
            || self.panels != np
            || self.codes.len() != np * nb * self.format.panel_block_bytes()
            || self.scales.len() != np * nb * PANEL
            || self.zero_shifts.as_ref().is_some_and(|z| z.len() != rows * nb)
        {
            return Err(TensorError::Shape {
                op: "QuantData",
                detail: format!(
                    "{} panels × {} blocks ({} code bytes, {} scales) for [{rows}, {cols}] {}",
                    self.panels,
                    self.blocks,
                    self.codes.len(),
                    self.scales.len(),
                    self.format
                ),
            });
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        self.codes.len() + 2 * self.scales.len() + 2 * self.zero_shifts.as_ref().map_or(0, |z| z.len())
    }

    /// Row `r` dequantized into `out` (its `cols` values).
    pub(crate) fn row_f32(&self, r: usize, out: &mut [f32]) {
        let (p, lane) = (r / PANEL, r % PANEL);
        let pbb = self.format.panel_block_bytes();
        for (b, chunk) in out.chunks_mut(BLOCK).enumerate() {
            let block = (p * self.blocks + b) * pbb;
            let d = self.scales[(p * self.blocks + b) * PANEL + lane].to_f32();
            for (c, o) in chunk.iter_mut().enumerate() {
                *o = value(
                    self.format,
                    code(self.format, &self.codes[block..block + pbb], lane, c),
                    d,
                );
            }
            if let Some(shifts) = &self.zero_shifts {
                let offset = shifts[r * self.blocks + b] as f32 * d;
                chunk.iter_mut().for_each(|o| *o += offset);
            }
        }
    }
}

/// Byte position of row `lane`'s code for column `c` of a panel's block, and (int4) whether it
/// is the high nibble.
#[inline]
pub(crate) fn code_at(format: QuantFormat, lane: usize, c: usize) -> (usize, bool) {
    match format {
        QuantFormat::Int8 => ((c / 4) * 64 + lane * 4 + c % 4, false),
        QuantFormat::Int4 => ((c / 8) * 64 + lane * 4 + c % 4, c % 8 >= 4),
    }
}

/// The code of row `lane`, column `c` in one panel block (`block` = its codes).
#[inline]
pub(crate) fn code(format: QuantFormat, block: &[u8], lane: usize, c: usize) -> u8 {
    let (at, high) = code_at(format, lane, c);
    match (format, high) {
        (QuantFormat::Int8, _) => block[at],
        (QuantFormat::Int4, false) => block[at] & 0x0F,
        (QuantFormat::Int4, true) => block[at] >> 4,
    }
}

/// The value a code stands for under scale `d` (exact in f32).
#[inline]
pub fn value(format: QuantFormat, code: u8, d: f32) -> f32 {
    match format {
        QuantFormat::Int8 => (code as i8) as f32 * d,
        QuantFormat::Int4 => (code as i32 - 8) as f32 * d,
    }
}

/// `v` rounded to the nearest integer, ties to even (numpy's `rint`), for |v| < 2²²: adding and
/// subtracting 1.5·2²³ leaves no fraction bits, so the FPU's round-to-nearest-even does the
/// rounding. Inlined, unlike `f32::round_ties_even` (a libm call on baseline x86-64), which made
/// it most of the quantization time.
#[inline(always)]
pub(crate) fn rint(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// One block's int8 scale and codes (`x` up to [`BLOCK`] values; missing ones count as 0).
/// `Err` names what cannot be represented.
pub fn quantize_block_int8(x: &[f32], codes: &mut [u8; BLOCK]) -> Result<f16, String> {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let mut h = f16::from_f32(d);
    if h.to_f32() < d {
        h = f16::from_bits(h.to_bits() + 1);
    }
    if !h.is_finite() {
        return Err(format!("max |w| {amax} needs a scale beyond f16's range"));
    }
    let d = h.to_f32();
    codes.fill(0);
    if d > 0.0 {
        for (q, &v) in codes.iter_mut().zip(x) {
            *q = rint(v / d).clamp(-127.0, 127.0) as i8 as u8;
        }
    }
    Ok(h)
}

/// One block's int4 scale and codes (one code per byte, 0..=15); as [`quantize_block_int8`].
pub fn quantize_block_int4(x: &[f32], codes: &mut [u8; BLOCK]) -> Result<f16, String> {
    let (mut xm, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            (xm, amax) = (v, v.abs());
        }
    }
    let h = f16::from_f32(xm / -8.0);
    if !h.is_finite() {
        return Err(format!("max |w| {amax} needs a scale beyond f16's range"));
    }
    let d = h.to_f32();
    codes.fill(8);
    if d != 0.0 {
        for (q, &v) in codes.iter_mut().zip(x) {
            *q = (rint((v / d).clamp(-9.0, 8.0)) + 8.0).clamp(0.0, 15.0) as u8;
        }
    }
    Ok(h)
}

/// Quantizes `m` (bf16/f16/f32) into `format`, rows in parallel; the codes and scales live in
/// huge-page memory when large (see [`crate::cpu::huge`]). A non-finite weight, or a block whose
/// scale would overflow f16, is an error naming its row and column.
pub fn quantize(m: &Matrix, format: QuantFormat) -> Result<Matrix, TensorError> {
    if let MatrixData::Quant(q) = &m.data {
        return Err(TensorError::Quantize(format!("already quantized ({})", q.format)));
    }
    build(format, m.dtype(), (m.rows, m.cols), None, |p, c, s| {
        quantize_panel(m, format, p, c, s)
    })
}

/// Codes of a pre-quantized checkpoint in `format`'s layout: `codes[r·cols + c]` is element
/// `(r, c)`'s code (int8: a signed code's bits; int4: `0..=15`, value `(q − 8)·d`),
/// `scales[r·blocks + b]` its block's scale and `zero_shifts` (if any) as
/// [`QuantData::zero_shifts`].
pub fn from_codes(
    format: QuantFormat,
    source: DType,
    (rows, cols): (usize, usize),
    codes: &[u8],
    scales: &[f16],
    zero_shifts: Option<Vec<i16>>,
) -> Result<Matrix, TensorError> {
    let (nb, pbb) = (cols.div_ceil(BLOCK), format.panel_block_bytes());
    if codes.len() != rows * cols || scales.len() != rows * nb {
        return Err(TensorError::Quantize(format!(
            "{} codes and {} scales for [{rows}, {cols}] (expected {} and {})",
            codes.len(),
            scales.len(),
            rows * cols,
            rows * nb
        )));
    }
    if format == QuantFormat::Int4 && codes.iter().any(|&q| q > 15) {
        return Err(TensorError::Quantize("int4 code above 15".into()));
    }
    build(format, source, (rows, cols), zero_shifts, |p, out, s| {
        let mut q = [0u8; BLOCK];
        for lane in 0..PANEL.min(rows - p * PANEL) {
            let r = p * PANEL + lane;
            for b in 0..nb {
                let row = &codes[r * cols + b * BLOCK..r * cols + cols.min((b + 1) * BLOCK)];
                q.fill(format.offset() as u8);
                q[..row.len()].copy_from_slice(row);
                put_block(
                    format,
                    &mut out[b * pbb..(b + 1) * pbb],
                    s,
                    (b, lane),
                    scales[r * nb + b],
                    &q,
                );
            }
        }
        Ok(())
    })
}

/// A `[rows, cols]` matrix in `format` whose panels `fill(p, codes, scale bytes)` writes (both
/// zeroed, in parallel); the buffers live in huge-page memory when large.
fn build(
    format: QuantFormat,
    source: DType,
    (rows, cols): (usize, usize),
    zero_shifts: Option<Vec<i16>>,
    fill: impl Fn(usize, &mut [u8], &mut [u8]) -> Result<(), TensorError> + Sync,
) -> Result<Matrix, TensorError> {
    let (nb, np, pbb) = (cols.div_ceil(BLOCK), rows.div_ceil(PANEL), format.panel_block_bytes());
    let mut codes = HugeVec::<u8>::zeroed(np * nb * pbb);
    let mut scales = HugeVec::<u8>::zeroed(np * nb * PANEL * 2);
    if nb > 0 {
        codes
            .par_chunks_mut(nb * pbb)
            .zip(scales.par_chunks_mut(nb * PANEL * 2))
            .enumerate()
            .try_for_each(|(p, (c, s))| fill(p, c, s))?;
    }
    let (nc, ns) = (codes.len(), scales.len() / 2);
    let codes: SharedBytes = Arc::new(codes);
    let scales: SharedBytes = Arc::new(scales);
    let data = QuantData {
        format,
        source,
        blocks: nb,
        panels: np,
        codes: TypedSlice::from_bytes(codes, 0, nc)?,
        scales: TypedSlice::from_bytes(scales, 0, ns)?,
        zero_shifts: zero_shifts.map(TypedSlice::from_vec),
    };
    Matrix::new(rows, cols, MatrixData::Quant(data))
}

/// Writes row `lane`'s codes `q` of block `b` into the panel block `block` and its scale `d`
/// into the panel's scale bytes.
fn put_block(
    format: QuantFormat,
    block: &mut [u8],
    scales: &mut [u8],
    (b, lane): (usize, usize),
    d: f16,
    q: &[u8; BLOCK],
) {
    let s = (b * PANEL + lane) * 2;
    scales[s..s + 2].copy_from_slice(&d.to_bits().to_ne_bytes());
    for (c, &v) in q.iter().enumerate() {
        let (at, high) = code_at(format, lane, c);
        block[at] |= if high { v << 4 } else { v };
    }
}

/// Panel `p` of `m` into its code bytes `out` and scale bytes `scales` (both zeroed).
fn quantize_panel(
    m: &Matrix,
    format: QuantFormat,
    p: usize,
    out: &mut [u8],
    scales: &mut [u8],
) -> Result<(), TensorError> {
    let nb = m.cols.div_ceil(BLOCK);
    let pbb = format.panel_block_bytes();
    let mut row = vec![0.0f32; nb * BLOCK];
    let mut q = [0u8; BLOCK];
    for lane in 0..PANEL.min(m.rows - p * PANEL) {
        let r = p * PANEL + lane;
        m.row_f32(r, &mut row[..m.cols]);
        if let Some(c) = row[..m.cols].iter().position(|v| !v.is_finite()) {
            return Err(TensorError::Quantize(format!("row {r}, column {c}: weight {}", row[c])));
        }
        for b in 0..nb {
            let x = &row[b * BLOCK..(b + 1) * BLOCK];
            let d = match format {
                QuantFormat::Int8 => quantize_block_int8(x, &mut q),
                QuantFormat::Int4 => quantize_block_int4(x, &mut q),
            }
            .map_err(|e| TensorError::Quantize(format!("row {r}, columns {}..: {e}", b * BLOCK)))?;
            put_block(format, &mut out[b * pbb..(b + 1) * pbb], scales, (b, lane), d, &q);
        }
    }
    Ok(())
}

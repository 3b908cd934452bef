//! `out[m, n] = x[m, k] · W[n, k]ᵀ` with W in f32, f16 or bf16 (widened in the kernel).
//!
//! Two paths, picked by the number of x rows `m`:
//! * small m (decode): `simd::gemv_block` streams each weight row from memory once and dots it
//!   against every row of x; rows of W are split across cores. Memory-bandwidth bound.
//! * large m (prefill): compute bound; W is widened to f32 panel by panel and handed to the
//!   `gemm` crate's packed, cache-blocked f32 kernel.
//!
//! Each output is one dot product, but its summation order differs between the paths (and
//! between the streaming path's tile shapes), so a row's result depends by a few ulps on how
//! many rows came with it. [`matmul_batch_invariant`] takes one order for every m.

use std::cell::Cell;

use rayon::prelude::*;

use super::simd::{self, Weight};
use super::SendPtr;
use crate::storage::{Matrix, MatrixData};

/// From this many x rows on, the `gemm` crate's packed kernel takes over: both paths are
/// compute bound well below it, and only with many rows does `gemm`'s cache blocking beat the
/// streaming kernel, which reads each weight once and needs no packing.
pub const GEMM_MIN_M: usize = 256;

/// Weight bytes below which the streaming path stays on the calling thread: rayon's fork/join
/// would cost more than it saves.
const PAR_MIN_BYTES: usize = 128 << 10;

/// Smallest weight slice (bytes) given to one rayon task in the streaming path.
const TASK_MIN_BYTES: usize = 64 << 10;

/// f32 elements of widened weight per `gemm` call: large enough that the packing and per-call
/// overhead vanish, small enough that the scratch stays modest for a 150k-row LM head.
const PANEL_ELEMS: usize = 4 << 20;

/// What a matmul rounds its inputs to before multiplying.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// x stays f32 and weights are widened to f32: the reference, matching transformers in f32
    /// to ~1e-5.
    #[default]
    F32,
    /// For bf16 weights and 24 or more x rows on a CPU with AVX512_BF16, x is rounded to bf16 and
    /// multiplied with `vdpbf16ps` (f32 accumulation), as llama.cpp and PyTorch-in-bf16 do:
    /// twice the multiply-adds per instruction, logits ~0.5% of their largest magnitude off the
    /// reference.
    /// Elsewhere it is [`Precision::F32`].
    Bf16Activations,
    /// For block-quantized weights (`--quantization`), x is quantized per block to int8 at every
    /// batch size, single rows included (llama.cpp's way): the fastest batch-1 decode where the
    /// f32 path cannot keep up with memory, logits ~1–2% of their largest magnitude off. Under
    /// [`Precision::F32`] a single row stays f32 and only larger batches go int8.
    /// Elsewhere it is [`Precision::F32`].
    Int8Activations,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16Activations),
            "int8" => Ok(Precision::Int8Activations),
            other => Err(format!("matmul precision {other:?}: expected f32, bf16 or int8")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16Activations => "bf16",
            Precision::Int8Activations => "int8",
        })
    }
}

/// Whether [`Precision::Bf16Activations`] takes effect on this CPU (it needs AVX512_BF16).
pub fn bf16_activations_supported() -> bool {
    super::features().avx512_bf16()
}

/// x rows from which bf16-activation matmuls run: below, streaming the weights is the
/// bottleneck, not the products, so the f32 tiles keep up and rounding x would only cost
/// precision.
const BF16_MIN_M: usize = 24;

/// Fast `out = x · Wᵀ`: `x` is `[m, w.cols]`, `out` is `[m, w.rows]`, both row-major.
pub fn matmul(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    matmul_with(x, m, w, out, Precision::F32)
}

/// [`matmul`] at the given input precision.
pub fn matmul_with(x: &[f32], m: usize, w: &Matrix, out: &mut [f32], precision: Precision) {
    matmul_mode(x, m, w, out, precision, false)
}

/// [`matmul_with`] where each row of `out` is bitwise the same whatever the other rows of `x`
/// and however many there are (SGLang's and vLLM's "batch invariance"): every m takes the
/// streaming kernels, in the one summation order of its single-row case, never the `gemm`
/// crate. bf16 activations (where supported) then apply at every m, and quantized weights
/// take int8 activations at every m (the integer path's block dot products are exact, its f32
/// path's tiles sum in an order that depends on the rows per tile).
pub fn matmul_batch_invariant(x: &[f32], m: usize, w: &Matrix, out: &mut [f32], precision: Precision) {
    matmul_mode(x, m, w, out, precision, true)
}

fn matmul_mode(x: &[f32], m: usize, w: &Matrix, out: &mut [f32], precision: Precision, invariant: bool) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x has {} elements, expected {m}×{k}", x.len());
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} elements, expected {m}×{n}",
        out.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let bf16_min_m = if invariant { 1 } else { BF16_MIN_M };
    match &w.data {
        MatrixData::F32(s) => matmul_typed(x, m, k, n, s, out, invariant),
        MatrixData::F16(s) => matmul_typed(x, m, k, n, s, out, invariant),
        MatrixData::BF16(s)
            if precision == Precision::Bf16Activations && m >= bf16_min_m && bf16_activations_supported() =>
        {
            matmul_bf16_activations(x, m, k, n, s, out)
        }
        MatrixData::BF16(s) => matmul_typed(x, m, k, n, s, out, invariant),
        MatrixData::Quant(q) => {
            let int8_always = invariant || precision == Precision::Int8Activations;
            super::quant_matmul::matmul_quant(x, m, k, n, q, out, int8_always)
        }
    }
}

thread_local! {
    /// Reused buffer for x rounded to bf16.
    static X_BF16: Cell<Vec<half::bf16>> = const { Cell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
fn matmul_bf16_activations(x: &[f32], m: usize, k: usize, n: usize, w: &[half::bf16], out: &mut [f32]) {
    let mut xb = X_BF16.take();
    super::bf16dot::round_to_bf16(x, &mut xb);
    super::bf16dot::matmul_bf16(&xb, m, k, w, n, out);
    X_BF16.set(xb);
}

#[cfg(not(target_arch = "x86_64"))]
fn matmul_bf16_activations(x: &[f32], m: usize, k: usize, n: usize, w: &[half::bf16], out: &mut [f32]) {
    // Never reached: bf16 activations are unsupported off x86_64.
    matmul_typed(x, m, k, n, w, out, true)
}

pub(crate) fn matmul_typed<T: Weight>(
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    w: &[T],
    out: &mut [f32],
    invariant: bool,
) {
    if m >= GEMM_MIN_M && !invariant {
        matmul_gemm(x, m, k, n, w, out);
    } else {
        matmul_stream(x, m, k, n, w, out, invariant);
    }
}

/// Weight-streaming path, parallel over output features (rows of W). Each output comes whole
/// from one tile, so how the rows of W are split between tasks does not change any sum.
fn matmul_stream<T: Weight>(x: &[f32], m: usize, k: usize, n: usize, w: &[T], out: &mut [f32], invariant: bool) {
    let row_bytes = k * std::mem::size_of::<T>();
    if n * row_bytes < PAR_MIN_BYTES {
        simd::gemv_block(x, m, k, w, out, n, invariant);
        return;
    }
    // ~8 tasks per thread so work stealing evens out a noisy neighbour, but never slices so
    // thin that task overhead shows; a multiple of 12 rows keeps the 4- and 6-row tiles full.
    let tasks = 8 * rayon::current_num_threads();
    let rows = n
        .div_ceil(tasks)
        .max(TASK_MIN_BYTES.div_ceil(row_bytes))
        .next_multiple_of(12);
    if m == 1 {
        // One x row: each task's outputs are a contiguous slice of `out`.
        out.par_chunks_mut(rows)
            .zip(w.par_chunks(rows * k))
            .for_each(|(o, wc)| simd::gemv_block(x, 1, k, wc, o, o.len(), invariant));
        return;
    }
    let dst = SendPtr(out.as_mut_ptr());
    w.par_chunks(rows * k).enumerate().for_each(|(t, wc)| {
        let (j0, nr) = (t * rows, wc.len() / k);
        let mut local = vec![0.0f32; m * nr];
        simd::gemv_block(x, m, k, wc, &mut local, nr, invariant);
        for (i, src) in local.chunks_exact(nr).enumerate() {
            // SAFETY: `out` is exclusively borrowed for this whole call and has m·n elements;
            // task t writes only columns j0..j0 + nr (≤ n) of each row i < m, and these column
            // ranges are disjoint between tasks, so no two threads touch the same element.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst.get().add(i * n + j0), nr);
            }
        }
    });
}

thread_local! {
    /// Reused widening buffer: fresh pages for every call would cost more page faults than the
    /// conversion itself. Taken out while in use, so a nested call just allocates its own.
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Compute-bound path: the `gemm` crate on f32, widening non-f32 weights panel by panel.
fn matmul_gemm<T: Weight>(x: &[f32], m: usize, k: usize, n: usize, w: &[T], out: &mut [f32]) {
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        gemm_f32(x, m, k, n, bytemuck::cast_slice(w), 0, n, out);
        return;
    }
    let panel_rows = (PANEL_ELEMS / k).clamp(1, n);
    let mut scratch = SCRATCH.take();
    scratch.resize(panel_rows * k, 0.0);
    for j0 in (0..n).step_by(panel_rows) {
        let nr = panel_rows.min(n - j0);
        let (src, dst) = (&w[j0 * k..(j0 + nr) * k], &mut scratch[..nr * k]);
        let chunk = (64 << 10).max(k);
        dst.par_chunks_mut(chunk)
            .zip(src.par_chunks(chunk))
            .for_each(|(d, s)| simd::widen(s, d));
        gemm_f32(x, m, k, n, dst, j0, nr, out);
    }
    SCRATCH.set(scratch);
}

/// `out[:, j0..j0 + nr] = x · wᵀ` where `w` is the `[nr, k]` f32 panel of rows j0.. of W.
#[allow(clippy::too_many_arguments)]
fn gemm_f32(x: &[f32], m: usize, k: usize, n: usize, w: &[f32], j0: usize, nr: usize, out: &mut [f32]) {
    assert!(x.len() >= m * k && w.len() >= nr * k && j0 + nr <= n && out.len() >= m * n);
    let dst = out[j0..].as_mut_ptr();
    // SAFETY: gemm reads x as [m, k] (row stride k, col stride 1) and the panel as the [k, nr]
    // matrix wᵀ (row stride 1, col stride k), and writes the [m, nr] block of `out` starting at
    // column j0 with row stride n; the assert above keeps all of these in bounds. With
    // read_dst = false the old contents of `out` are ignored (alpha unused), dst = 1·x·wᵀ.
    unsafe {
        gemm::gemm(
            m,
            nr,
            k,
            dst,
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

/// Naive reference: the oracle the fast kernels are tested against.
pub fn matmul_ref(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x has {} elements, expected {m}×{k}", x.len());
    assert_eq!(
        out.len(),
        m * n,
        "matmul: out has {} elements, expected {m}×{n}",
        out.len()
    );
    let mut row = vec![0.0f32; k];
    for j in 0..n {
        w.row_f32(j, &mut row);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = 0.0f64;
            for (a, b) in xi.iter().zip(&row) {
                acc += (*a as f64) * (*b as f64);
            }
            out[i * n + j] = acc as f32;
        }
    }
}

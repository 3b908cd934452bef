//! Block-quantized weights on the device (`--quantization`, GPTQ/AWQ imports): the CPU layout of
//! `quiver_tensor::quant` uploaded as it is (codes in [`CudaWeight::data`], scales and zero
//! shifts beside them). Decode-sized batches (m ≤ [`GEMV_MAX_M`]) dequantize in registers in
//! `gemv_q8`/`gemv_q4`; larger ones dequantize the matrix to f16 and run cuBLAS, as vLLM and TGI
//! do at large m. The CPU kernels are the oracle (tests/gpu_quant.rs).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use quiver_tensor::quant::{QuantData, QuantFormat, PANEL};
use quiver_tensor::{DType, Matrix, MatrixData, TensorError, TypedSlice};

use crate::backend::{flat, grid, CudaBackend, CudaWeight};
use crate::error::dev;
use crate::linear::GEMV_MAX_M;

/// Warps per panel in the gemv kernels (`QWARPS` in kernels/gemv_quant.cu).
const QWARPS: u32 = 4;

/// A quantized weight's scales and zero shifts; its codes are the weight's `data`.
pub struct CudaQuant {
    pub format: QuantFormat,
    pub blocks: usize,
    pub panels: usize,
    /// f16 bits, `panels × blocks × 16`.
    pub scales: CudaSlice<u16>,
    /// `rows × blocks`, if the matrix has zero points.
    pub zero_shifts: Option<CudaSlice<i16>>,
}

fn kernel(prefix: &str, format: QuantFormat) -> String {
    match format {
        QuantFormat::Int8 => format!("{prefix}_q8"),
        QuantFormat::Int4 => format!("{prefix}_q4"),
    }
}

/// A null device pointer for an absent `shifts` argument (the kernels test for it).
const NULL: u64 = 0;

/// Uploads `q` (the matrix `[rows, cols]`).
pub fn upload(be: &CudaBackend, rows: usize, cols: usize, q: &QuantData) -> Result<CudaWeight, TensorError> {
    let scales: Vec<u16> = q.scales.as_slice().iter().map(|s| s.to_bits()).collect();
    let quant = CudaQuant {
        format: q.format,
        blocks: q.blocks,
        panels: q.panels,
        scales: be.htod(&scales)?,
        zero_shifts: q.zero_shifts.as_ref().map(|z| be.htod(z.as_slice())).transpose()?,
    };
    Ok(CudaWeight {
        rows,
        cols,
        dtype: q.source,
        data: be.htod(q.codes.as_slice())?,
        quant: Some(quant),
    })
}

/// The matrix back on the host, exactly as uploaded.
pub fn download(be: &CudaBackend, w: &CudaWeight, q: &CudaQuant) -> Result<Matrix, TensorError> {
    let stream = be.stream();
    let codes = stream.clone_dtoh(&w.data).map_err(dev)?;
    let scales = stream.clone_dtoh(&q.scales).map_err(dev)?;
    let zero_shifts = match &q.zero_shifts {
        Some(z) => Some(TypedSlice::from_vec(stream.clone_dtoh(z).map_err(dev)?)),
        None => None,
    };
    let data = QuantData {
        format: q.format,
        source: w.dtype,
        blocks: q.blocks,
        panels: q.panels,
        codes: TypedSlice::from_vec(codes),
        scales: TypedSlice::from_vec(scales.into_iter().map(half::f16::from_bits).collect()),
        zero_shifts,
    };
    Matrix::new(w.rows, w.cols, MatrixData::Quant(data))
}

/// `out[m, n] = x[m, k] · Wᵀ`.
pub fn matmul(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    m: usize,
    w: &CudaWeight,
    q: &CudaQuant,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let (n, k, nb) = (w.rows as i32, w.cols as i32, q.blocks as i32);
    if m > GEMV_MAX_M {
        let half = dequantize_f16(be, w, q)?;
        return crate::linear::matmul(be, x, m, &half, out);
    }
    let stream = be.stream();
    let sums = match &q.zero_shifts {
        Some(_) => {
            let len = m * q.blocks;
            // SAFETY: `block_sums` writes every element before `gemv_q*` reads it.
            let mut sums = unsafe { stream.alloc::<f32>(len) }.map_err(dev)?;
            let mi = m as i32;
            let mut b = stream.launch_builder(be.func("block_sums")?);
            b.arg(x).arg(&mi).arg(&k).arg(&nb).arg(&mut sums);
            // SAFETY: argument types match the kernel; x holds m × k values.
            unsafe { b.launch(flat(len)) }.map_err(dev)?;
            Some(sums)
        }
        None => None,
    };
    let mi = m as i32;
    let name = kernel("gemv", q.format);
    let mut b = stream.launch_builder(be.func(&name)?);
    b.arg(x).arg(&mi).arg(&w.data).arg(&q.scales);
    match (&q.zero_shifts, &sums) {
        (Some(z), Some(s)) => b.arg(z).arg(s),
        _ => b.arg(&NULL).arg(&NULL),
    };
    b.arg(out).arg(&n).arg(&k).arg(&nb);
    let cfg = LaunchConfig {
        grid_dim: (q.panels as u32, 1, 1),
        block_dim: (32 * QWARPS, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types match the kernel; the buffers hold the panels the kernel reads
    // (codes and scales padded to whole panels, shifts read for rows < n only) and out m × n.
    unsafe { b.launch(cfg) }.map_err(dev)?;
    Ok(())
}

/// The matrix dequantized to a temporary f16 weight.
fn dequantize_f16(be: &CudaBackend, w: &CudaWeight, q: &CudaQuant) -> Result<CudaWeight, TensorError> {
    let len = w.rows * w.cols;
    let stream = be.stream();
    // SAFETY: the kernel writes all `len` f16 values before cuBLAS reads them.
    let mut data = unsafe { stream.alloc::<u8>(2 * len) }.map_err(dev)?;
    let (n, k, nb) = (w.rows as i32, w.cols as i32, q.blocks as i32);
    let name = kernel("dequant", q.format) + "_f16";
    let mut b = stream.launch_builder(be.func(&name)?);
    b.arg(&w.data).arg(&q.scales);
    match &q.zero_shifts {
        Some(z) => b.arg(z),
        None => b.arg(&NULL),
    };
    b.arg(&mut data).arg(&n).arg(&k).arg(&nb);
    // SAFETY: argument types match the kernel; `data` holds rows × cols f16 values.
    unsafe { b.launch(flat(len)) }.map_err(dev)?;
    Ok(CudaWeight {
        rows: w.rows,
        cols: w.cols,
        dtype: DType::F16,
        data,
        quant: None,
    })
}

/// Rows `ids` of a quantized table (ids checked by the caller).
pub fn embed(
    be: &CudaBackend,
    table: &CudaWeight,
    q: &CudaQuant,
    ids: &CudaSlice<u32>,
    count: usize,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let (width, nb) = (table.cols as i32, q.blocks as i32);
    let name = kernel("embed", q.format);
    let mut b = be.stream().launch_builder(be.func(&name)?);
    b.arg(&table.data).arg(&q.scales);
    match &q.zero_shifts {
        Some(z) => b.arg(z),
        None => b.arg(&NULL),
    };
    b.arg(ids).arg(out).arg(&width).arg(&nb);
    // SAFETY: argument types match the kernel; `out` holds count × width values.
    unsafe { b.launch(grid(count, 1, 256)) }.map_err(dev)?;
    Ok(())
}

/// Rows per panel, as the kernels assume.
const _: () = assert!(PANEL == 16);

//! `out[m, n] = x[m, k] · wᵀ`. Decode-sized batches (m ≤ 8) run the gemv kernel, which streams
//! w once in its storage dtype against f32 activations; larger batches go to cuBLAS, with x
//! rounded to the weight's 16-bit type and f32 accumulation (what vLLM and transformers do on a
//! GPU).

use std::ffi::c_void;

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use quiver_tensor::{DType, TensorError};

use crate::backend::{check, flat, CudaBackend, CudaWeight};
use crate::error::dev;

/// Rows the gemv kernel handles in one pass (`GEMV_MAX_M` in kernels/gemv.cu).
pub const GEMV_MAX_M: usize = 8;
const GEMV_WARPS: usize = 4;

pub fn matmul(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    m: usize,
    w: &CudaWeight,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let (n, k) = (w.rows, w.cols);
    check("matmul", x.len() >= m * k && out.len() >= m * n, || {
        format!("x {} for [{m}, {k}], out {} for [{m}, {n}]", x.len(), out.len())
    })?;
    if m == 0 {
        return Ok(());
    }
    if let Some(q) = &w.quant {
        return crate::quant::matmul(be, x, m, w, q, out);
    }
    if m <= GEMV_MAX_M {
        return gemv(be, x, m, w, out);
    }
    gemm(be, x, m, w, out)
}

fn gemv(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    m: usize,
    w: &CudaWeight,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let name = match w.dtype {
        DType::F32 => "gemv_f32",
        DType::BF16 => "gemv_bf16",
        DType::F16 => "gemv_f16",
    };
    let (mi, ni, ki) = (m as i32, w.rows as i32, w.cols as i32);
    let cfg = LaunchConfig {
        grid_dim: (w.rows.div_ceil(GEMV_WARPS) as u32, 1, 1),
        block_dim: (32 * GEMV_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = be.stream().launch_builder(be.func(name)?);
    b.arg(x).arg(&mi).arg(&w.data).arg(out).arg(&ni).arg(&ki);
    // SAFETY: argument types match the kernel; shapes checked by the caller.
    unsafe { b.launch(cfg) }.map_err(dev)?;
    Ok(())
}

fn gemm(
    be: &CudaBackend,
    x: &CudaSlice<f32>,
    m: usize,
    w: &CudaWeight,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let (n, k) = (w.rows, w.cols);
    let stream = be.stream();
    // Column-major view: outᵀ[n, m] = W[n, k] · xᵀ[k, m], W read transposed from its row-major
    // [n, k] (= column-major [k, n]) storage.
    let mut rounded = None;
    let (x_type, w_type) = match w.dtype {
        DType::F32 => (cudaDataType::CUDA_R_32F, cudaDataType::CUDA_R_32F),
        DType::BF16 | DType::F16 => {
            let (kernel, ty) = if w.dtype == DType::BF16 {
                ("to_bf16", cudaDataType::CUDA_R_16BF)
            } else {
                ("to_f16", cudaDataType::CUDA_R_16F)
            };
            let len = m * k;
            // SAFETY: every element is written by the conversion kernel before cuBLAS reads it.
            let mut half = unsafe { stream.alloc::<u16>(len) }.map_err(dev)?;
            let mut b = stream.launch_builder(be.func(kernel)?);
            b.arg(x).arg(&mut half).arg(&len);
            // SAFETY: argument types match the kernel.
            unsafe { b.launch(flat(len)) }.map_err(dev)?;
            rounded = Some(half);
            (ty, ty)
        }
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // cuBLAS runs in the thread's current context; the scheduler thread is not the one that
    // created it, and the f32 path launches no kernel (which would bind it) first.
    be.inner.ctx.bind_to_thread().map_err(dev)?;
    let (w_ptr, _w_sync) = w.data.device_ptr(stream);
    let (x_ptr, _x_sync) = match &rounded {
        Some(h) => h.device_ptr(stream),
        None => x.device_ptr(stream),
    };
    let (o_ptr, _o_sync) = out.device_ptr_mut(stream);
    // SAFETY: pointers are live device buffers of the checked sizes; the handle is bound to
    // `stream`, so the call is ordered after the conversion kernel.
    unsafe {
        cudarc::cublas::result::gemm_ex(
            *be.inner.blas.handle(),
            cublasOperation_t::CUBLAS_OP_T,
            cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            w_ptr as *const c_void,
            w_type,
            k as i32,
            x_ptr as *const c_void,
            x_type,
            k as i32,
            &beta as *const f32 as *const c_void,
            o_ptr as *mut c_void,
            cudaDataType::CUDA_R_32F,
            n as i32,
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| TensorError::Device(format!("cuBLAS gemm [{m}×{k}]·[{n}×{k}]ᵀ: {e}")))?;
    Ok(())
}

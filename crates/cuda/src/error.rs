use quiver_tensor::TensorError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CudaError {
    /// No usable driver, library or device; the caller may fall back to the CPU.
    #[error("CUDA unavailable: {0}")]
    Unavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC could not compile {kernel} for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("PTX cache {path}: {source}")]
    Cache { path: String, source: std::io::Error },
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Blas(e.to_string())
    }
}

impl From<CudaError> for TensorError {
    fn from(e: CudaError) -> Self {
        TensorError::Device(e.to_string())
    }
}

/// Driver errors inside backend methods, which speak `TensorError`.
pub(crate) fn dev(e: cudarc::driver::DriverError) -> TensorError {
    TensorError::Device(format!("CUDA driver: {e}"))
}

//! The CUDA backend: [`CudaBackend`] implements `quiver_tensor::Backend` with kernels from
//! `kernels/*.cu` (compiled at start-up by NVRTC for the device's architecture, PTX cached on
//! disk) and cuBLAS for the large matmuls. cudarc loads every library dynamically, so building
//! needs no CUDA toolkit and a machine without a GPU gets an error to fall back from, not a panic.

pub mod attention;
pub mod backend;
pub mod device;
pub mod error;
pub mod kernels;
pub mod linear;
pub mod lora;
pub mod pool;
pub mod quant;
pub mod reuse;

pub use backend::{CudaBackend, CudaKvPool, CudaPagePool, CudaWeight};
pub use device::{device_count, driver_available};
pub use error::CudaError;

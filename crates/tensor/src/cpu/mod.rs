//! CPU backend: AVX2/FMA kernels behind safe functions (runtime-detected, scalar fallback),
//! work split across cores with rayon.

mod attention;
pub mod backend;
#[cfg(target_arch = "x86_64")]
mod bf16dot;
pub mod huge;
pub mod lora;
pub mod matmul;
pub mod ops;
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd512;

pub use backend::{CpuBackend, CpuKvPool};
pub use lora::CpuPagePool;
pub use matmul::{bf16_activations_supported, matmul, matmul_ref, matmul_with, Precision};

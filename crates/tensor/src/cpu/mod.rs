//! CPU backend: AVX2/FMA kernels behind safe functions (runtime-detected, scalar fallback),
//! work split across cores with rayon.

pub mod matmul;
pub mod ops;

pub use matmul::{matmul, matmul_ref};

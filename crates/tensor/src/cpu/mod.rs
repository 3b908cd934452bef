//! CPU backend: AVX2/FMA and AVX-512 kernels behind safe functions (picked from one run-time
//! probe, [`features`], with a scalar fallback), work split across cores with rayon.

mod attention;
pub mod backend;
#[cfg(target_arch = "x86_64")]
mod bf16dot;
mod features;
pub mod huge;
#[cfg(test)]
mod invariance_tests;
pub mod kv_pool;
pub mod lora;
pub mod matmul;
pub mod ops;
#[cfg(target_arch = "x86_64")]
mod quant_avx2;
#[cfg(target_arch = "x86_64")]
mod quant_avx512;
pub(crate) mod quant_matmul;
mod quant_scalar;
#[cfg(test)]
mod quant_tests;
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd512;

pub use backend::CpuBackend;
pub use features::{features, CpuFeatures};
pub use kv_pool::{CpuKvPool, KvData};
pub use lora::CpuPagePool;
pub use matmul::{bf16_activations_supported, matmul, matmul_batch_invariant, matmul_ref, matmul_with, Precision};
#[doc(hidden)]
pub use quant_matmul::{matmul_quant_forced, ForcedPath};
pub(crate) use simd::Weight;

/// Raw output pointer shared by parallel tasks that each write a disjoint part of it (the
/// matmul's column blocks, attention's rows).
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: only used for disjoint writes while the owning `&mut [f32]` is held by the caller.
unsafe impl Send for SendPtr {}
// SAFETY: as above; the pointer itself is never used to create overlapping references.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    // A method (not field access) so closures capture the whole Send+Sync wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

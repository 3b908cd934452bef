//! Finding a device: cudarc panics when a library is missing, so presence is checked first and
//! every failure becomes a `CudaError` the caller can fall back from.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::CudaError;

/// Runs a cudarc call that may panic (missing library or symbol) and turns the panic into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| Err(CudaError::Unavailable(format!("{what} failed"))))
}

/// Whether the driver library (`libcuda`) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only dlopen()s the library; no symbol is called.
    catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether cuBLAS can be loaded.
pub fn cublas_available() -> bool {
    // SAFETY: as above.
    catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, or why there are none.
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_available() {
        return Err(CudaError::Unavailable("no CUDA driver (libcuda) found".into()));
    }
    guarded("counting CUDA devices", || {
        let n = cudarc::driver::CudaContext::device_count()?;
        Ok(n.max(0) as usize)
    })
}

/// `sm_90` for compute capability 9.0.
pub fn arch_name(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_names() {
        assert_eq!(arch_name(9, 0), "sm_90");
        assert_eq!(arch_name(8, 6), "sm_86");
    }

    #[test]
    fn missing_pieces_are_errors_not_panics() {
        // On a machine without a GPU this must say so; with one it must count it.
        match device_count() {
            Ok(n) => assert!(n < 1024),
            Err(e) => assert!(e.to_string().contains("CUDA"), "{e}"),
        }
    }
}

//! AVX-512 batch-1 GEMV: `out[r] = x · w[r]` one weight row after another.
//!
//! At batch 1 the kernel is a pure stream over the weights. Reading the rows of a task's chunk
//! strictly in order gives the hardware prefetcher one sequential stream (the 4-row AVX2 tiles
//! walk four streams at once), and a software prefetch a fixed distance ahead of the read keeps
//! DRAM busy across row ends. Measured on the decode matmul sequence of the Qwen2.5-0.5B shape
//! (2 Zen 5 cores): 57 GB/s against 48-53 GB/s for the AVX2 tiles, 79% of the read-bandwidth
//! probe against 64-72% (`docs/BENCHMARKS.md`, issue 2).

use std::arch::x86_64::*;

use half::{bf16, f16};

/// How far ahead of the read the software prefetch runs (measured flat between 8 and 16 KB,
/// worse at 2-4 KB and at 32 KB).
const PF_AHEAD_BYTES: usize = 8 << 10;

/// A weight element the AVX-512 kernel widens 16 at a time.
pub(crate) trait Wide: Copy {
    /// Loads 16 consecutive elements from `p` widened to f32.
    ///
    /// # Safety
    /// `p..p + 16` must be readable and AVX-512F/BW must be available.
    unsafe fn load16(p: *const Self) -> __m512;
}

impl Wide for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 16 readable floats and AVX-512F.
        unsafe { _mm512_loadu_ps(p) }
    }
}

impl Wide for bf16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 32 readable bytes and AVX-512F/BW.
        unsafe {
            let v = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
        }
    }
}

impl Wide for f16 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        // SAFETY: the caller guarantees 32 readable bytes and AVX-512F.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
    }
}

/// Whether the AVX-512 kernel can run here; detected once.
pub(crate) fn available() -> bool {
    use std::sync::OnceLock;
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw"))
}

/// `out[r] = Σ_p x[p] · w[r * k + p]` for every row `r < rows`, with f32 accumulation.
///
/// # Safety
/// AVX-512F/BW must be available ([`available`]); `x` has `k` readable floats, `w` has
/// `rows * k` elements and `out` has `rows` writable floats.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemv_rows<T: super::simd::Weight>(
    x: *const f32,
    k: usize,
    w: *const T,
    rows: usize,
    out: *mut f32,
) {
    let bytes = rows * k * std::mem::size_of::<T>();
    let base = w as *const i8;
    // Next cache line of the chunk to prefetch; runs PF_AHEAD_BYTES ahead of the read.
    let mut pf = 0usize;
    // SAFETY (whole body): reads are at w[r * k + p .. + 16] and x[p .. + 16] with p + 16 ≤ k
    // (loop conditions), writes at out[r], r < rows; prefetches never fault and stay below
    // `bytes` anyway.
    unsafe {
        for r in 0..rows {
            let wr = w.add(r * k);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut p = 0;
            while p + 64 <= k {
                let ahead = ((r * k + p) * std::mem::size_of::<T>() + PF_AHEAD_BYTES + 128).min(bytes);
                while pf < ahead {
                    _mm_prefetch::<_MM_HINT_T0>(base.add(pf));
                    pf += 64;
                }
                for (u, a) in acc.iter_mut().enumerate() {
                    let q = p + 16 * u;
                    *a = _mm512_fmadd_ps(T::load16(wr.add(q)), _mm512_loadu_ps(x.add(q)), *a);
                }
                p += 64;
            }
            while p + 16 <= k {
                acc[0] = _mm512_fmadd_ps(T::load16(wr.add(p)), _mm512_loadu_ps(x.add(p)), acc[0]);
                p += 16;
            }
            let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            let mut s = _mm512_reduce_add_ps(sum);
            while p < k {
                s += *x.add(p) * (*wr.add(p)).to_f32();
                p += 1;
            }
            *out.add(r) = s;
        }
    }
}

//! Streaming read bandwidth of this machine: the roofline for batch-1 decode, which reads
//! every weight once per token.

use std::time::Instant;

/// Bytes streamed per run: far larger than any L3, so the sum reads DRAM.
const BUFFER_BYTES: usize = 512 << 20;
/// Runs per variant (with and without software prefetch); the best one counts, since on a
/// shared machine every disturbance only makes a run slower.
const RUNS: usize = 4;
/// Software prefetch distance of the prefetching variant.
const PREFETCH_BYTES: usize = 2048;

/// Best read bandwidth in GB/s (1e9 bytes/s) with `threads` threads each summing its own
/// contiguous part of a 512 MiB f32 buffer with AVX2. Runs alternate between plain loads and
/// loads plus software prefetch (the matmul kernels prefetch, and on some machines that reads
/// faster than the hardware prefetcher alone), so this is the best streaming rate a kernel
/// can expect.
pub fn measure_read_bandwidth_gbps(threads: usize) -> f64 {
    let threads = threads.max(1);
    let len = BUFFER_BYTES / 4;
    let chunk = len.div_ceil(threads);
    let mut buf = vec![0.0f32; len];
    // Touch the pages from the threads that will read them (first-touch placement).
    std::thread::scope(|s| {
        for (t, part) in buf.chunks_mut(chunk).enumerate() {
            s.spawn(move || part.iter_mut().enumerate().for_each(|(i, v)| *v = (i + t) as f32));
        }
    });
    let mut best = 0.0f64;
    let mut sink = 0.0f32;
    for run in 0..2 * RUNS {
        let prefetch = run % 2 == 1;
        let start = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = buf.chunks(chunk).map(|p| s.spawn(move || sum(p, prefetch))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        sink += total;
        best = best.max(BUFFER_BYTES as f64 / secs / 1e9);
    }
    std::hint::black_box(sink);
    best
}

fn sum(v: &[f32], prefetch: bool) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available on this CPU (checked just above).
        return unsafe { sum_avx2(v, prefetch) };
    }
    let _ = prefetch;
    // Portable fallback: independent lanes let the compiler vectorise with whatever it has.
    let mut acc = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_avx2(v: &[f32], prefetch: bool) -> f32 {
    use std::arch::x86_64::*;
    // Eight independent accumulators (64 floats, 4 cache lines per step) hide the add latency,
    // so the loop is limited by loads alone.
    let mut acc = [_mm256_setzero_ps(); 8];
    let chunks = v.chunks_exact(64);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        let p = c.as_ptr();
        if prefetch {
            for line in 0..4 {
                // A prefetch never faults, so running past the end of `v` is harmless
                // (wrapping_add: no out-of-bounds pointer arithmetic).
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES / 4 + 16 * line) as *const i8);
            }
        }
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: `c` has 64 floats, so `c[8 * j..8 * j + 8]` is in bounds; loadu has no
            // alignment requirement.
            *a = _mm256_add_ps(*a, unsafe { _mm256_loadu_ps(p.add(8 * j)) });
        }
    }
    let total = acc[1..].iter().fold(acc[0], |t, a| _mm256_add_ps(t, *a));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds exactly 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), total) };
    lanes.iter().sum::<f32>() + tail
}

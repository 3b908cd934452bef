//! Streaming read bandwidth of this machine: the roofline for batch-1 decode, which reads
//! every weight once per token.

use std::time::Instant;

/// The buffer streamed: far larger than any L3, so every segment comes from DRAM.
const BUFFER_BYTES: usize = 512 << 20;
/// Timed unit. Short segments (about a millisecond) catch the quiet moments of a shared machine
/// the way a benchmark's best-of-many short calls do; a whole-buffer time would be penalised by
/// any neighbour during it, and the two would not be comparable.
const SEGMENT_BYTES: usize = 32 << 20;
/// Passes over the buffer per variant (with and without software prefetch).
const PASSES: usize = 4;
/// Software prefetch distance of the prefetching variant.
const PREFETCH_BYTES: usize = 2048;

/// Best read bandwidth in GB/s (1e9 bytes/s) with `threads` threads each summing its share of
/// 32 MiB segments of a 512 MiB f32 buffer with AVX2, all threads timed together per segment.
/// Passes alternate between plain loads and loads plus software prefetch (the matmul kernels
/// prefetch, and on some machines that reads faster than the hardware prefetcher alone), so
/// this is the best streaming rate a kernel can expect.
pub fn measure_read_bandwidth_gbps(threads: usize) -> f64 {
    let threads = threads.max(1);
    let len = BUFFER_BYTES / 4;
    let seg = SEGMENT_BYTES / 4;
    let part = seg.div_ceil(threads);
    let mut buf = vec![0.0f32; len];
    // Touch each thread's share of every segment from that thread (first-touch placement).
    std::thread::scope(|s| {
        let mut shares: Vec<Vec<&mut [f32]>> = (0..threads).map(|_| Vec::new()).collect();
        for segment in buf.chunks_mut(seg) {
            for (t, p) in segment.chunks_mut(part).enumerate() {
                shares[t].push(p);
            }
        }
        for (t, share) in shares.into_iter().enumerate() {
            s.spawn(move || {
                share
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i + t) as f32)
            });
        }
    });
    // Threads start each segment together (barrier) and record when they started and finished
    // it; a segment's time runs from the first start to the last finish.
    let rounds = 2 * PASSES * (len / seg);
    let barrier = std::sync::Barrier::new(threads);
    let spans: Vec<Vec<(Instant, Instant)>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (buf, barrier) = (&buf, &barrier);
                s.spawn(move || {
                    let mut sink = 0.0f32;
                    let mut spans = Vec::with_capacity(rounds);
                    for round in 0..rounds {
                        let segment = buf.chunks(seg).nth(round % (len / seg)).unwrap_or(&[]);
                        let prefetch = (round / (len / seg)) % 2 == 1;
                        barrier.wait();
                        let start = Instant::now();
                        if let Some(p) = segment.chunks(part).nth(t) {
                            sink += sum(p, prefetch);
                        }
                        spans.push((start, Instant::now()));
                    }
                    std::hint::black_box(sink);
                    spans
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (0..rounds)
        .map(|r| {
            let first = spans.iter().map(|s| s[r].0).min().unwrap();
            let last = spans.iter().map(|s| s[r].1).max().unwrap();
            SEGMENT_BYTES as f64 / (last - first).as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Reads every slice of every task, the tasks in parallel on the current rayon pool and each
/// task's slices in order (a plain sum, no other work): the memory-bound floor of a kernel that
/// reads the same bytes in the same order with the same split across threads. Returns a value
/// that depends on every element, so the reads cannot be elided.
pub fn read_in_order(tasks: &[Vec<&[f32]>]) -> f32 {
    use rayon::prelude::*;
    tasks
        .par_iter()
        .map(|slices| slices.iter().map(|s| sum(s, false)).sum::<f32>())
        .sum()
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

//! Shared by the GPU tests: the device (or why there is none), fresh seeded inputs, and the
//! comparison metric.
//!
//! Without a GPU every GPU test prints `skipped, no GPU: <reason>` and passes, unless
//! `QUIVER_REQUIRE_GPU=1` is set (benches/gpu/check.sh sets it): then it fails.
#![allow(dead_code)] // each test file uses a different subset

use std::sync::OnceLock;

use quiver_cuda::CudaBackend;

/// Below this fraction of the reference's largest magnitude, an element is judged against that
/// floor instead of its own magnitude (see [`verdict`]).
pub const SCALE_FLOOR: f32 = 1e-2;
/// Paths that compute in f32 from f32 inputs: only summation order differs from the CPU.
pub const TOL_F32: f32 = 1e-4;
/// Paths through bf16/f16 values (weights, pages, rounded activations).
pub const TOL_HALF: f32 = 1e-2;

pub fn require_gpu() -> bool {
    std::env::var("QUIVER_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// CUDA device 0, opened once per test binary. `None` (after printing why) on a machine without
/// a usable GPU; panics instead when `QUIVER_REQUIRE_GPU=1`.
pub fn gpu(test: &str) -> Option<CudaBackend> {
    static DEVICE: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    match DEVICE.get_or_init(|| CudaBackend::new(0).map_err(|e| e.to_string())) {
        Ok(b) => Some(b.clone()),
        Err(e) => {
            assert!(!require_gpu(), "{test}: QUIVER_REQUIRE_GPU=1 but no GPU: {e}");
            println!("{test}: skipped, no GPU: {e}");
            None
        }
    }
}

/// splitmix64: small, fast, and good enough for test inputs.
pub struct Rng(u64);

impl Rng {
    /// Seeded from the clock so every run sees fresh inputs; `QUIVER_SEED=N` replays a run.
    /// The seed is printed (and shown by the harness when the test fails).
    pub fn seeded(test: &str) -> Rng {
        let seed = match std::env::var("QUIVER_SEED") {
            Ok(s) => s.trim().parse().expect("QUIVER_SEED must be a u64"),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        };
        println!("{test}: seed {seed} (QUIVER_SEED={seed} replays it)");
        // Each test mixes in its name, so tests sharing a seed still draw different inputs.
        let mixed = test.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        Rng(mixed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    pub fn f32(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(lo, hi)).collect()
    }

    /// `count` distinct values below `n`, in random order.
    pub fn distinct(&mut self, count: usize, n: usize) -> Vec<u32> {
        assert!(count <= n, "{count} distinct values below {n}");
        let mut seen = std::collections::HashSet::with_capacity(count);
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let v = self.below(n) as u32;
            if seen.insert(v) {
                out.push(v);
            }
        }
        out
    }
}

/// The worst element of a comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Worst {
    pub err: f32,
    pub index: usize,
    pub got: f32,
    pub want: f32,
}

/// The comparison metric: every GPU value must be finite (a NaN or ±inf never passes, which is
/// also how a NaN-poisoned element the kernel never wrote fails), and
///
/// `err = max_i |got_i − want_i| / max(|want_i|, SCALE_FLOOR · max_j |want_j|)`
///
/// must not exceed `tol`: relative error per element, where elements smaller than 1% of the
/// output's largest magnitude (cancellation makes their own relative error meaningless) are
/// judged against that 1% floor. Returns the worst element.
pub fn verdict(got: &[f32], want: &[f32], tol: f32) -> Result<Worst, String> {
    if got.len() != want.len() {
        return Err(format!("{} values, the reference has {}", got.len(), want.len()));
    }
    if let Some(i) = want.iter().position(|v| !v.is_finite()) {
        return Err(format!("the reference itself has {} at {i} (test bug)", want[i]));
    }
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        return Err(format!(
            "element {i} is {} (reference {}): NaN/inf never passes; NaN means never written",
            got[i], want[i]
        ));
    }
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let floor = (SCALE_FLOOR * scale).max(f32::MIN_POSITIVE);
    let mut worst = Worst {
        err: 0.0,
        index: 0,
        got: got.first().copied().unwrap_or(0.0),
        want: want.first().copied().unwrap_or(0.0),
    };
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(floor);
        // Both values are finite, so err is finite or +inf (overflow), never NaN.
        if err > worst.err {
            worst = Worst {
                err,
                index: i,
                got: g,
                want: w,
            };
        }
    }
    if worst.err <= tol {
        Ok(worst)
    } else {
        Err(format!(
            "relative error {:.3e} > {tol:.0e} at element {} (gpu {}, cpu {})",
            worst.err, worst.index, worst.got, worst.want
        ))
    }
}

/// [`verdict`], printing the worst error of the op; panics on failure.
pub fn check(op: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    match verdict(got, want, tol) {
        Ok(w) => {
            println!(
                "  {op:<44} worst rel err {:.2e} (tol {tol:.0e}, {} values)",
                w.err,
                got.len()
            );
            w.err
        }
        Err(e) => panic!("{op}: {e}"),
    }
}

//! Bit-reproducible numeric primitives of the sampler: max, sum and exp over a row in lanes that
//! vectorise, and its PRNG.

const LANES: usize = 8;

/// Maximum of a NaN-free row, in independent lanes so it vectorises.
pub(super) fn max_of(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `out[i] = exp((xs[i] - max) * scale)`, a plain map so it vectorises.
pub(super) fn exp_into(out: &mut Vec<f32>, xs: &[f32], max: f32, scale: f32) {
    out.clear();
    out.extend(xs.iter().map(|&x| exp_f32((x - max) * scale)));
}

/// Σ xs in f64, in a fixed lane order (vectorises, and stays reproducible).
pub(super) fn sum_f64(xs: &[f32]) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    acc.iter().sum::<f64>() + rest.iter().map(|&x| x as f64).sum::<f64>()
}

/// The sampler's exp: shared with the attention kernel (`quiver_tensor::cpu::ops::exp_f32`).
pub(super) use quiver_tensor::cpu::ops::exp_f32;

/// xoshiro256** (Blackman & Vigna), seeded through splitmix64: tiny, fast, and the same stream
/// on every platform.
#[derive(Debug, Clone)]
pub(super) struct Xoshiro256StarStar {
    s: [u64; 4],
}

impl Xoshiro256StarStar {
    pub(super) fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Xoshiro256StarStar {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1) with 53 bits.
    pub(super) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

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

/// exp(x) for x ≤ 88 from basic IEEE operations only (Cephes' expf polynomial, ~1 ulp), so it
/// vectorises and gives bit-identical results on every platform, unlike the system libm.
/// Below -87 it returns 0: such weights are < 2^-125 of the top token's.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub(super) fn exp_f32(x: f32) -> f32 {
    // Adding 1.5·2^23 rounds to an integer that lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    // x - n·ln2 in two parts so r is exact enough.
    let r = xc - n * 0.693_359_375 - n * -2.121_944_40e-4;
    let p = ((((1.987_569_150_0e-4 * r + 1.398_199_950_7e-3) * r + 8.333_451_907_3e-3) * r + 4.166_579_589_4e-2) * r
        + 1.666_666_545_9e-1)
        * r
        + 5.000_000_120_1e-1;
    let y = p * (r * r) + r + 1.0;
    let scale = f32::from_bits(((k + 127) << 23) as u32);
    if x < -87.0 {
        0.0
    } else {
        y * scale
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_f32_is_accurate() {
        for i in 0..300_000 {
            let x = -90.0 + i as f32 * 0.000_33;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            assert!(
                if x < -87.0 {
                    got == 0.0
                } else {
                    (got - want).abs() <= 3e-7 * want
                },
                "exp({x}) = {got}"
            );
        }
        assert_eq!((exp_f32(0.0), exp_f32(f32::NEG_INFINITY)), (1.0, 0.0));
    }
}

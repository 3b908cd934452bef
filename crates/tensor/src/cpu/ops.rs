//! Element-wise, normalisation and rotary kernels for the CPU backend (attention: `attention.rs`). Written so that
//! LLVM vectorises the inner loops (fixed-width lane arrays); parallel over rows where it pays.

use rayon::prelude::*;

use crate::backend::RopeTable;

/// Rows above which row-parallel kernels fan out to the rayon pool.
const PAR_ROWS: usize = 4;

/// Dot product with 8 independent lanes (vectorises; deterministic order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ta.iter().zip(tb) {
        tail += x * y;
    }
    lanes.iter().sum::<f32>() + tail
}

/// exp(x) for x ≤ 88 from basic IEEE operations only (Cephes' expf polynomial, ~1 ulp), so it
/// vectorises and gives bit-identical results on every platform, unlike the system libm.
/// Below -87 it returns 0: such weights are < 2^-125 of the top token's.
#[allow(clippy::excessive_precision)]
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
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

/// `acc += s * x`.
#[inline]
pub fn axpy(acc: &mut [f32], s: f32, x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += s * v;
    }
}

pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let one = |(xr, or): (&[f32], &mut [f32])| {
        let ms = dot(xr, xr) / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    };
    if x.len() / d > PAR_ROWS {
        x.par_chunks(d).zip(out.par_chunks_mut(d)).for_each(one);
    } else {
        x.chunks(d).zip(out.chunks_mut(d)).for_each(one);
    }
}

/// `gate = silu(gate) * up`, with the polynomial [`exp_f32`] (it vectorises; libm's does not).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 16 * 1024;
    let f = |(g, u): (&mut [f32], &[f32])| {
        for (a, b) in g.iter_mut().zip(u) {
            *a = *a / (1.0 + exp_f32(-*a)) * b;
        }
    };
    if gate.len() > CHUNK {
        gate.par_chunks_mut(CHUNK).zip(up.par_chunks(CHUNK)).for_each(f);
    } else {
        f((gate, up));
    }
}

/// Rotate-half RoPE on `[tokens, heads, head_dim]`; the first `2 * table.half_dim` features of
/// each head rotate (all of them for the supported models).
pub fn rope(x: &mut [f32], heads: usize, head_dim: usize, positions: &[u32], table: &RopeTable) {
    let half = table.half_dim;
    for (t, tok) in x.chunks_mut(heads * head_dim).enumerate() {
        let p = positions[t] as usize;
        let (cos, sin) = (
            &table.cos[p * half..(p + 1) * half],
            &table.sin[p * half..(p + 1) * half],
        );
        for head in tok.chunks_mut(head_dim) {
            let (lo, hi) = head[..2 * half].split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

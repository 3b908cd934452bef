//! Element-wise, normalisation, rotary and attention kernels for the CPU backend. Written so that
//! LLVM vectorises the inner loops (fixed-width lane arrays); parallel over rows where it pays.

use rayon::prelude::*;

use crate::backend::{AttentionBatch, RopeTable};

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

pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    const CHUNK: usize = 16 * 1024;
    let f = |(g, u): (&mut [f32], &[f32])| {
        for (a, b) in g.iter_mut().zip(u) {
            *a = *a / (1.0 + (-*a).exp()) * b;
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

/// Paged K (or V) storage of one layer: `[num_blocks * block_size, kv_heads, head_dim]`.
pub struct PagedLayer<'a> {
    pub data: &'a [f32],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl PagedLayer<'_> {
    #[inline]
    fn row(&self, table: &[u32], pos: usize, kv_head: usize) -> &[f32] {
        let slot = table[pos / self.block_size] as usize * self.block_size + pos % self.block_size;
        let at = (slot * self.kv_heads + kv_head) * self.head_dim;
        &self.data[at..at + self.head_dim]
    }
}

/// Causal attention: each token's `heads` query heads attend over positions `0..=positions[t]`
/// of its sequence, read through that sequence's block table. GQA maps head `h` to KV head
/// `h / (heads / kv_heads)`. `q` and `out` are `[tokens, heads, head_dim]`.
pub fn paged_attention(
    k: &PagedLayer<'_>,
    v: &PagedLayer<'_>,
    q: &[f32],
    heads: usize,
    batch: &AttentionBatch,
    out: &mut [f32],
) {
    let hd = k.head_dim;
    let group = heads / k.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let work = |(i, o): (usize, &mut [f32])| {
        let (t, h) = (i / heads, i % heads);
        let table = &batch.block_tables[batch.seq[t] as usize];
        let ctx = batch.positions[t] as usize + 1;
        let qh = &q[i * hd..(i + 1) * hd];
        let kvh = h / group;
        let mut scores: Vec<f32> = (0..ctx).map(|j| dot(qh, k.row(table, j, kvh)) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        o.fill(0.0);
        for (j, s) in scores.iter().enumerate() {
            axpy(o, s / sum, v.row(table, j, kvh));
        }
    };
    out.par_chunks_mut(hd).enumerate().with_min_len(4).for_each(work);
}

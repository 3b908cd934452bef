//! LoRA gather kernels over a paged weight pool (S-LoRA's unified paging, Punica's SGMV/BGMV).
//!
//! Every adapted linear stores A as `rank` rows of `in` floats and Bᵀ as `rank` rows of `out`
//! floats. Rows are cut into fixed-size pages (`page` floats, a divisor of every model dimension),
//! so adapters of any rank share one pool with neither padding nor fragmentation. A batch names,
//! per run of tokens, which module's pages to use: one kernel covers SGMV (long runs sharing an
//! adapter: each page is loaded once and reused across the run's tokens) and BGMV (runs of one
//! token, each on its own adapter). Tokens outside every run cost nothing.

use rayon::prelude::*;

use crate::backend::{LoraModule, LoraSegment};
use crate::cpu::ops::{axpy, dot};

/// Tokens per work item: enough to reuse each loaded page, small enough to spread over cores.
const TILE: usize = 8;

/// `pages` pages of `page` floats each.
pub struct CpuPagePool {
    pub page: usize,
    pub data: Vec<f32>,
}

impl CpuPagePool {
    pub fn new(page: usize, pages: usize) -> Self {
        CpuPagePool { page, data: vec![0.0; page * pages] }
    }
    pub fn num_pages(&self) -> usize {
        self.data.len() / self.page.max(1)
    }
    #[inline]
    fn get(&self, id: u32) -> &[f32] {
        let at = id as usize * self.page;
        &self.data[at..at + self.page]
    }
}

/// `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` for the tokens of every segment. `x` is `[tokens, in]`,
/// `y` is `[tokens, out]`; segments must be sorted by `start` and disjoint.
pub fn lora_apply(pool: &CpuPagePool, x: &[f32], y: &mut [f32], in_f: usize, out_f: usize, segments: &[LoraSegment<'_>]) {
    // Cut segments into tiles and pair each tile with its (disjoint) rows of y.
    let mut work: Vec<(usize, &LoraModule, &mut [f32])> = Vec::new();
    let mut rest = y;
    let mut consumed = 0;
    for seg in segments {
        let mut start = seg.start;
        while start < seg.start + seg.len {
            let len = TILE.min(seg.start + seg.len - start);
            let (_, tail) = rest.split_at_mut((start - consumed) * out_f);
            let (rows, tail) = tail.split_at_mut(len * out_f);
            work.push((start, seg.module, rows));
            rest = tail;
            consumed = start + len;
            start += len;
        }
    }
    let p = pool.page;
    let run = |(start, m, rows): (usize, &LoraModule, &mut [f32])| {
        let n = rows.len() / out_f;
        let (cin, cout) = (in_f / p, out_f / p);
        // Shrink: h[t, j] = x[t] · A[j]
        let mut h = vec![0.0f32; n * m.rank];
        for j in 0..m.rank {
            for c in 0..cin {
                let page = pool.get(m.a_pages[j * cin + c]);
                for t in 0..n {
                    let xs = &x[(start + t) * in_f + c * p..][..p];
                    h[t * m.rank + j] += dot(xs, page);
                }
            }
        }
        // Expand: y[t] += scale · Σ_j h[t, j] · Bᵀ[j]
        for j in 0..m.rank {
            for c in 0..cout {
                let page = pool.get(m.b_pages[j * cout + c]);
                for t in 0..n {
                    let ys = &mut rows[t * out_f + c * p..][..p];
                    axpy(ys, m.scale * h[t * m.rank + j], page);
                }
            }
        }
    };
    if work.len() > 1 {
        work.into_par_iter().for_each(run);
    } else {
        work.into_iter().for_each(run);
    }
}

/// Dense reference: the oracle for [`lora_apply`]. `a` is `[rank, in]`, `b` is `[out, rank]`.
pub fn lora_ref(x: &[f32], y: &mut [f32], in_f: usize, out_f: usize, start: usize, len: usize, a: &[f32], b: &[f32], rank: usize, scale: f32) {
    for t in start..start + len {
        let h: Vec<f64> =
            (0..rank).map(|j| (0..in_f).map(|i| x[t * in_f + i] as f64 * a[j * in_f + i] as f64).sum()).collect();
        for o in 0..out_f {
            let d: f64 = (0..rank).map(|j| b[o * rank + j] as f64 * h[j]).sum();
            y[t * out_f + o] += (scale as f64 * d) as f32;
        }
    }
}

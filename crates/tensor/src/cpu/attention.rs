//! Paged causal attention for the CPU backend, tiled so that no score needs a horizontal sum.
//!
//! K is stored transposed within each block, `[block][kv_head][head_dim][block_size]`: 16
//! consecutive positions of one dimension are one vector, so `q · k` for 16 keys is `head_dim`
//! broadcast-FMAs into one 16-lane accumulator. V stays row-major, `[slot][kv_head][head_dim]`,
//! so `p · V` adds whole V rows into register accumulators. A work item is one KV head and a tile
//! of up to [`TILE_TOKENS`] consecutive tokens of one sequence: all their query heads of that
//! group (up to 8 × 7 rows for Qwen2.5) share every K and V vector it loads. Keys are taken in
//! chunks of [`CHUNK_KEYS`] with an online softmax (running max and sum, as FlashAttention), so
//! the score buffer stays in L1/L2 however long the context.
//!
//! K and V may be stored as bf16 or f16 (`--kv-cache-dtype`): each work item then widens every
//! 16-key K tile, and each chunk's V rows, once into small f32 buffers (L1/L2) that all its query
//! rows share, so the inner tiles below are the same f32 code for every dtype while the cache
//! streams half the bytes. f32 K/V are read in place.
//!
//! The body is plain Rust compiled for AVX-512 or AVX2+FMA+F16C at run time (the crate's baseline is
//! SSE2). Its two inner tiles (4 rows × 16 scores, 4 rows × 64 output columns) are AVX-512
//! intrinsics on CPUs that have it: as portable lane loops LLVM sometimes compiled them to
//! scalar FMAs or kept the accumulators in memory. Elsewhere the portable loops run (a unit
//! test below compares the two).

use rayon::prelude::*;

use half::{bf16, f16};

use super::ops::exp_f32;
use super::{SendPtr, Weight};
use crate::backend::AttentionBatch;

/// Keys per score vector.
const LANES: usize = 16;
/// Consecutive tokens of one sequence per work item.
const TILE_TOKENS: usize = 8;
/// Keys per online-softmax chunk.
const CHUNK_KEYS: usize = 256;
/// Query rows sharing each loaded K or V vector in the inner loops.
const ROWS: usize = 4;
/// V columns per register slab of the `p · V` loop.
const SLAB: usize = 64;

/// A K/V element: f32 (read in place) or a 16-bit type widened as it is loaded.
pub trait KvElem: Weight {
    /// The values themselves when they already are f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
}
impl KvElem for f32 {
    #[inline(always)]
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
}
impl KvElem for bf16 {
    #[inline(always)]
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
}
impl KvElem for f16 {
    #[inline(always)]
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
}

/// Instruction sets a body is compiled for (`body::<ISA>`).
const PORTABLE: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

/// One layer's paged K and V, laid out as described in the module docs.
pub struct PagedKv<'a, T = f32> {
    pub k: &'a [T],
    pub v: &'a [T],
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Index of K element (`slot`, `kv_head`, `d`) in the transposed layout.
#[inline]
pub fn k_index(block_size: usize, kv_heads: usize, head_dim: usize, slot: usize, kv_head: usize, d: usize) -> usize {
    let (block, off) = (slot / block_size, slot % block_size);
    ((block * kv_heads + kv_head) * head_dim + d) * block_size + off
}

/// Causal attention: each token's `heads` query heads attend over positions `0..=positions[t]`
/// of its sequence, read through that sequence's block table. GQA maps head `h` to KV head
/// `h / (heads / kv_heads)`. `q` and `out` are `[tokens, heads, head_dim]`.
pub fn paged_attention<T: KvElem>(
    kv: &PagedKv<'_, T>,
    q: &[f32],
    heads: usize,
    batch: &AttentionBatch,
    out: &mut [f32],
) {
    attention_on(Path::Best, kv, q, heads, batch, out)
}

/// Which compiled body runs: the best the CPU has, or (for the tests, which run on an AVX-512
/// machine) the portable loops that other CPUs get.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    Best,
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

fn attention_on<T: KvElem>(
    path: Path,
    kv: &PagedKv<'_, T>,
    q: &[f32],
    heads: usize,
    batch: &AttentionBatch,
    out: &mut [f32],
) {
    let n = batch.num_tokens();
    // Tiles: runs of consecutive tokens of the same sequence, at most TILE_TOKENS long.
    let mut tiles = Vec::new();
    let mut t0 = 0;
    while t0 < n {
        let mut t1 = t0 + 1;
        while t1 < n && t1 - t0 < TILE_TOKENS && batch.seq[t1] == batch.seq[t0] {
            t1 += 1;
        }
        tiles.push((t0, t1));
        t0 = t1;
    }
    let job = Attend {
        kv,
        q,
        heads,
        batch,
        group: heads / kv.kv_heads,
        scale: 1.0 / (kv.head_dim as f32).sqrt(),
        out: SendPtr(out.as_mut_ptr()),
    };
    assert!(q.len() >= n * heads * kv.head_dim && out.len() >= q.len());
    let items = tiles.len() * kv.kv_heads;
    (0..items).into_par_iter().for_each(|i| {
        let (t0, t1) = tiles[i / kv.kv_heads];
        // SAFETY: item (tile, kv head) writes only the output rows of its tokens' query heads of
        // that group, which no other item writes; `out` is exclusively borrowed for this call.
        unsafe {
            match path {
                Path::Best => job.run(t0, t1, i % kv.kv_heads),
                Path::Portable => job.body::<PORTABLE>(t0, t1, i % kv.kv_heads),
            }
        }
    });
}

struct Attend<'a, T> {
    kv: &'a PagedKv<'a, T>,
    q: &'a [f32],
    heads: usize,
    batch: &'a AttentionBatch,
    group: usize,
    scale: f32,
    out: SendPtr,
}

impl<T: KvElem> Attend<'_, T> {
    /// # Safety
    /// No other thread writes the output rows of tokens `t0..t1`, KV head `g`.
    unsafe fn run(&self, t0: usize, t1: usize, g: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = super::features();
            if cpu.avx512f_bw() && cpu.avx2_fma_f16c() {
                // SAFETY: AVX-512F/BW, AVX2, FMA and F16C present (checked); the rest is this function's contract.
                return unsafe { self.avx512(t0, t1, g) };
            }
            if cpu.avx2_fma_f16c() {
                // SAFETY: AVX2, FMA and F16C present (checked).
                return unsafe { self.avx2(t0, t1, g) };
            }
        }
        // SAFETY: this function's contract.
        unsafe { self.body::<PORTABLE>(t0, t1, g) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn avx512(&self, t0: usize, t1: usize, g: usize) {
        // SAFETY: the caller's contract; AVX-512F is enabled here.
        unsafe { self.body::<AVX512>(t0, t1, g) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn avx2(&self, t0: usize, t1: usize, g: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.body::<AVX2>(t0, t1, g) }
    }

    /// Plain loops throughout: iterator adapters are separate generic functions that would not
    /// inherit the caller's target features. With `AVX512` the two inner tiles use AVX-512
    /// intrinsics (LLVM's vectorisation of them proved fragile); the caller must then have
    /// AVX-512F (and AVX2+FMA+F16C for `AVX2`, whose widening uses them).
    #[inline(always)]
    unsafe fn body<const ISA: u8>(&self, t0: usize, t1: usize, g: usize) {
        let (hd, group) = (self.kv.head_dim, self.group);
        let table = &self.batch.block_tables[self.batch.seq[t0] as usize];
        // Rows r = (token t0 + r / group, head g·group + r % group), queries pre-scaled.
        let rows = (t1 - t0) * group;
        // Both buffers have ROWS spare zero rows, so the inner loops always run ROWS rows
        // (fixed trip counts keep the accumulators in registers); extra rows are discarded.
        let mut qs = vec![0.0f32; (rows + ROWS) * hd];
        let mut ctx = vec![0usize; rows];
        for r in 0..rows {
            let (t, h) = (t0 + r / group, g * group + r % group);
            let src = &self.q[(t * self.heads + h) * hd..][..hd];
            for d in 0..hd {
                qs[r * hd + d] = src[d] * self.scale;
            }
            ctx[r] = self.batch.positions[t] as usize + 1;
        }
        let ctx_max = ctx.iter().copied().max().unwrap_or(0);
        let mut m = vec![f32::NEG_INFINITY; rows];
        let mut l = vec![0.0f32; rows];
        let mut o = vec![0.0f32; rows * hd];
        let mut s = vec![0.0f32; (rows + ROWS) * CHUNK_KEYS];
        let mut kt = vec![0.0f32; hd * LANES];
        // A chunk's V rows widened to f32, when they are not f32 already.
        let v32 = T::as_f32(self.kv.v);
        let mut vw = vec![0.0f32; if v32.is_none() { CHUNK_KEYS * hd } else { 0 }];
        let mut vpad = [0.0f32; SLAB];
        let mut c0 = 0;
        while c0 < ctx_max {
            let cl = CHUNK_KEYS.min(ctx_max - c0);
            // Scores, 16 keys at a time.
            let mut j0 = 0;
            while j0 < cl {
                let n = LANES.min(cl - j0);
                let (base, stride) = self.k_tile::<ISA>(table, g, c0 + j0, n, &mut kt);
                let mut r0 = 0;
                while r0 < rows {
                    let nr = ROWS.min(rows - r0);
                    let mut acc = [[0.0f32; LANES]; ROWS];
                    qk_tile::<ISA>(&qs[r0 * hd..], hd, base, stride, &mut acc);
                    for (i, a) in acc.iter().enumerate().take(nr) {
                        let r = r0 + i;
                        let dst = &mut s[r * CHUNK_KEYS + j0..][..n];
                        for e in 0..n {
                            dst[e] = if c0 + j0 + e < ctx[r] { a[e] } else { f32::NEG_INFINITY };
                        }
                    }
                    r0 += nr;
                }
                j0 += n;
            }
            // Online softmax: rescale what each row has so far to the new running max.
            for r in 0..rows {
                // The row's own keys only, so exp_sum's lanes split them alike in any tile
                // (batch invariance); masked keys weigh 0 in the p · V loop.
                let live = ctx[r].saturating_sub(c0).min(cl);
                let (row, masked) = s[r * CHUNK_KEYS..][..cl].split_at_mut(live);
                masked.fill(0.0);
                if live == 0 {
                    continue;
                }
                let mc = max(row).max(m[r]);
                let corr = exp_f32(m[r] - mc);
                let sum = exp_sum(row, mc);
                l[r] = l[r] * corr + sum;
                m[r] = mc;
                for x in &mut o[r * hd..][..hd] {
                    *x *= corr;
                }
            }
            if v32.is_none() {
                let live = ctx.iter().map(|&c| c.saturating_sub(c0).min(cl)).max().unwrap_or(0);
                for j in 0..live {
                    widen::<T, ISA>(self.v_row(table, g, c0 + j), &mut vw[j * hd..][..hd]);
                }
            }
            // o += p · V, a slab of columns for up to 4 rows in registers.
            let mut r0 = 0;
            while r0 < rows {
                let nr = ROWS.min(rows - r0);
                let live = (r0..r0 + nr)
                    .map(|r| ctx[r].saturating_sub(c0).min(cl))
                    .max()
                    .unwrap_or(0);
                let mut c = 0;
                while c < hd {
                    let w = SLAB.min(hd - c);
                    let mut acc = [[0.0f32; SLAB]; ROWS];
                    let p = &s[r0 * CHUNK_KEYS..];
                    match v32 {
                        Some(v) => {
                            let v_at = |j: usize| &self.v_row_in(v, table, g, c0 + j)[c..c + w];
                            pv_tile::<ISA>(p, live, v_at, w, &mut vpad, &mut acc);
                        }
                        None => {
                            let v_at = |j: usize| &vw[j * hd + c..][..w];
                            pv_tile::<ISA>(p, live, v_at, w, &mut vpad, &mut acc);
                        }
                    }
                    for (i, a) in acc.iter().enumerate().take(nr) {
                        let dst = &mut o[(r0 + i) * hd + c..][..w];
                        for e in 0..w {
                            dst[e] += a[e];
                        }
                    }
                    c += w;
                }
                r0 += nr;
            }
            c0 += cl;
        }
        for r in 0..rows {
            let (t, h) = (t0 + r / group, g * group + r % group);
            let inv = 1.0 / l[r];
            // SAFETY: row (t, h) < tokens × heads lies inside `out` (asserted by the caller) and
            // belongs to this work item alone (this function's contract).
            let dst = unsafe { std::slice::from_raw_parts_mut(self.out.get().add((t * self.heads + h) * hd), hd) };
            for d in 0..hd {
                dst[d] = o[r * hd + d] * inv;
            }
        }
    }

    /// K of positions `j0..j0 + n` (n ≤ 16): element (d, e) is at `base[d * stride + e]`. When
    /// the 16 positions lie in one block, f32 K is read in place and 16-bit K widened into `kt`
    /// 16 lanes at a time; otherwise they are gathered into `kt`. Lanes ≥ n hold finite filler
    /// (their scores are masked).
    #[inline(always)]
    fn k_tile<'b, const ISA: u8>(
        &'b self,
        table: &[u32],
        g: usize,
        j0: usize,
        n: usize,
        kt: &'b mut [f32],
    ) -> (&'b [f32], usize) {
        let kv = self.kv;
        let (bs, hd) = (kv.block_size, kv.head_dim);
        if j0 % bs + LANES <= bs {
            let slot = table[j0 / bs] as usize * bs + j0 % bs;
            let at = k_index(bs, kv.kv_heads, hd, slot, g, 0);
            if let Some(k) = T::as_f32(kv.k) {
                return (&k[at..], bs);
            }
            for d in 0..hd {
                widen::<T, ISA>(&kv.k[at + d * bs..][..LANES], &mut kt[d * LANES..][..LANES]);
            }
            return (kt, LANES);
        }
        kt.fill(0.0);
        for e in 0..n {
            let pos = j0 + e;
            let slot = table[pos / bs] as usize * bs + pos % bs;
            for d in 0..hd {
                kt[d * LANES + e] = kv.k[k_index(bs, kv.kv_heads, hd, slot, g, d)].to_f32();
            }
        }
        (kt, LANES)
    }

    #[inline(always)]
    fn v_row(&self, table: &[u32], g: usize, pos: usize) -> &[T] {
        self.v_row_in(self.kv.v, table, g, pos)
    }

    #[inline(always)]
    fn v_row_in<'v, E>(&self, v: &'v [E], table: &[u32], g: usize, pos: usize) -> &'v [E] {
        let kv = self.kv;
        let slot = table[pos / kv.block_size] as usize * kv.block_size + pos % kv.block_size;
        &v[(slot * kv.kv_heads + g) * kv.head_dim..][..kv.head_dim]
    }
}

/// `dst = src` widened to f32, with the vector loads of the body's instruction set.
#[inline(always)]
fn widen<T: KvElem, const ISA: u8>(src: &[T], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        if ISA == AVX512 {
            while i + 16 <= n {
                // SAFETY: 16 elements in bounds; `AVX512` bodies run with AVX-512F enabled.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr().add(i), T::load16(src.as_ptr().add(i))) };
                i += 16;
            }
        }
        if ISA != PORTABLE {
            while i + 8 <= n {
                // SAFETY: 8 elements in bounds; `AVX2`/`AVX512` bodies run with AVX2+FMA+F16C.
                unsafe { _mm256_storeu_ps(dst.as_mut_ptr().add(i), T::load8(src.as_ptr().add(i))) };
                i += 8;
            }
        }
    }
    while i < n {
        dst[i] = src[i].to_f32();
        i += 1;
    }
}

/// Largest element, in 16 independent lanes so that it vectorises.
#[inline(always)]
fn max(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for e in 0..LANES {
            lanes[e] = if c[e] > lanes[e] { c[e] } else { lanes[e] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in lanes.iter().chain(tail) {
        m = if v > m { v } else { m };
    }
    m
}

/// `row[j] = exp(row[j] - max)`, returning the sum, in 16 independent lanes.
#[inline(always)]
fn exp_sum(row: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for e in 0..LANES {
            c[e] = exp_f32(c[e] - max);
            lanes[e] += c[e];
        }
    }
    let mut sum = 0.0;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    for l in lanes {
        sum += l;
    }
    sum
}

/// `acc[i][e] = Σ_d q[i * hd + d] · k[d * stride + e]` for the ROWS rows of `q` and 16 keys.
#[inline(always)]
fn qk_tile<const ISA: u8>(q: &[f32], hd: usize, k: &[f32], stride: usize, acc: &mut [[f32; LANES]; ROWS]) {
    assert!(q.len() >= ROWS * hd && (hd == 0 || k.len() >= (hd - 1) * stride + LANES));
    #[cfg(target_arch = "x86_64")]
    if ISA == AVX512 {
        // SAFETY: bounds asserted above; `AVX512` promises AVX-512F (see `body`).
        unsafe { x512::qk_tile(q.as_ptr(), hd, k.as_ptr(), stride, acc) };
        return;
    }
    for d in 0..hd {
        let kd = &k[d * stride..][..LANES];
        for (i, a) in acc.iter_mut().enumerate() {
            let qv = q[i * hd + d];
            for e in 0..LANES {
                a[e] = qv.mul_add(kd[e], a[e]);
            }
        }
    }
}

/// `acc[i][e] += Σ_j p[i * CHUNK_KEYS + j] · v_at(j)[e]` for the ROWS rows of `p`, `j < live`,
/// `e < w` (≤ SLAB; `pad` holds a partial slab zero-extended).
#[inline(always)]
fn pv_tile<'v, const ISA: u8>(
    p: &[f32],
    live: usize,
    v_at: impl Fn(usize) -> &'v [f32],
    w: usize,
    pad: &mut [f32; SLAB],
    acc: &mut [[f32; SLAB]; ROWS],
) {
    assert!(p.len() >= (ROWS - 1) * CHUNK_KEYS + live && live <= CHUNK_KEYS && w <= SLAB);
    #[cfg(target_arch = "x86_64")]
    if ISA == AVX512 {
        // SAFETY: bounds asserted above, each V slab has w elements; `AVX512` promises AVX-512F.
        unsafe { x512::pv_tile(p.as_ptr(), live, v_at, w, acc) };
        return;
    }
    for j in 0..live {
        let v = v_at(j);
        pad[..w].copy_from_slice(&v[..w]);
        for (i, a) in acc.iter_mut().enumerate() {
            let pj = p[i * CHUNK_KEYS + j];
            for e in 0..SLAB {
                a[e] = pj.mul_add(pad[e], a[e]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[path = "attention_x512.rs"]
mod x512;

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;

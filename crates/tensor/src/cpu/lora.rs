//! LoRA gather kernels over a paged weight pool (S-LoRA's unified paging, Punica's SGMV/BGMV).
//!
//! Every adapted linear stores A as `rank` rows of `in` floats and Bᵀ as `rank` rows of `out`
//! floats. Rows are cut into fixed-size pages (`page` floats, a divisor of every model dimension),
//! so adapters of any rank share one pool with neither padding nor fragmentation. A batch names,
//! per run of tokens, which module's pages to use: one kernel covers SGMV (long runs sharing an
//! adapter: each page is loaded once and reused across the run's tokens) and BGMV (runs of one
//! token, each on its own adapter). Tokens outside every run cost nothing.

use half::bf16;
use rayon::prelude::*;

use crate::backend::{LoraModule, LoraSegment};
use crate::cpu::huge::HugeVec;
use crate::cpu::simd::Weight;
use crate::storage::DType;

/// Tokens per work item: enough to reuse each loaded page, small enough to spread over cores.
const TILE: usize = 8;

/// Page storage: f32 (exact for f32 adapters) or bf16 (half the memory and traffic; exact for
/// bf16 adapters, what a bf16 base model serves with).
/// Huge-page backed: a decode step streams hundreds of MB of pages.
pub enum PageData {
    F32(HugeVec<f32>),
    BF16(HugeVec<bf16>),
}

/// `pages` pages of `page` values each.
pub struct CpuPagePool {
    pub page: usize,
    pub data: PageData,
}

/// A page element the kernels widen to f32 as they load it.
pub trait PageElem: Copy + Send + Sync {
    fn f(self) -> f32;
}
impl PageElem for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
}
impl PageElem for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorises (to_f32 may not).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

/// A page element the SIMD tiles widen (f32 or bf16; `load8`/`load16` come from the matmul's
/// [`Weight`]).
pub(crate) trait Page: PageElem + Weight {}
impl Page for f32 {}
impl Page for bf16 {}

impl CpuPagePool {
    pub fn new(page: usize, pages: usize, dtype: DType) -> Result<Self, crate::TensorError> {
        let data = match dtype {
            DType::F32 => PageData::F32(HugeVec::zeroed(page * pages)),
            DType::BF16 => PageData::BF16(HugeVec::zeroed(page * pages)),
            DType::F16 => {
                return Err(crate::TensorError::DType {
                    dtype: dtype.to_string(),
                    what: "adapter pages (f32 or bf16)".into(),
                })
            }
        };
        Ok(CpuPagePool { page, data })
    }
    pub fn dtype(&self) -> DType {
        match self.data {
            PageData::F32(_) => DType::F32,
            PageData::BF16(_) => DType::BF16,
        }
    }
    pub fn num_pages(&self) -> usize {
        let len = match &self.data {
            PageData::F32(v) => v.len(),
            PageData::BF16(v) => v.len(),
        };
        len / self.page.max(1)
    }
    /// Stores `values` (one page) into page `id`, rounding to the pool's dtype.
    pub fn write(&mut self, id: u32, values: &[f32]) {
        let at = id as usize * self.page;
        match &mut self.data {
            PageData::F32(v) => v[at..at + self.page].copy_from_slice(values),
            PageData::BF16(v) => v[at..at + self.page]
                .iter_mut()
                .zip(values)
                .for_each(|(d, s)| *d = bf16::from_f32(*s)),
        }
    }

    /// Bytes of the pool resident in memory (`None` for a small pool kept in a `Vec`).
    pub fn resident_bytes(&self) -> Option<usize> {
        match &self.data {
            PageData::F32(v) => v.resident_bytes(),
            PageData::BF16(v) => v.resident_bytes(),
        }
    }

    /// Page `id`'s values widened to f32.
    pub fn page_values(&self, id: u32) -> Vec<f32> {
        let at = id as usize * self.page;
        match &self.data {
            PageData::F32(v) => v[at..at + self.page].to_vec(),
            PageData::BF16(v) => v[at..at + self.page].iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Zeroes `ids` and gives the whole OS pages inside them back to the system (adjacent ids
    /// are released as one range, so pages smaller than an OS page still return memory).
    pub fn release(&mut self, ids: &[u32]) -> usize {
        let page = self.page;
        crate::cpu::huge::unit_runs(ids, page)
            .into_iter()
            .map(|r| match &mut self.data {
                PageData::F32(v) => v.release(r),
                PageData::BF16(v) => v.release(r),
            })
            .sum()
    }
}

/// A typed view of the pool's pages.
struct Pages<'a, T> {
    page: usize,
    data: &'a [T],
}

impl<T> Pages<'_, T> {
    #[inline(always)]
    fn get(&self, id: u32) -> &[T] {
        let at = id as usize * self.page;
        &self.data[at..at + self.page]
    }
}

/// AVX2 tiles for pages of a multiple of 8 floats.
#[cfg(target_arch = "x86_64")]
#[path = "lora_simd.rs"]
mod tiles;

/// One work item: tokens `start..start + rows.len() / out` of one segment, and their rows of y.
struct Tile<'a> {
    start: usize,
    module: &'a LoraModule,
    rows: &'a mut [f32],
}

/// `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` for the tokens of every segment. `x` is `[tokens, in]`,
/// `y` is `[tokens, out]`; segments must be sorted by `start` and disjoint.
///
/// # Panics
/// If a segment does not fit `x`/`y`, a module's page lists do not match its rank and the
/// dimensions, or a page id is outside the pool ([`try_lora_apply`] reports these instead).
pub fn lora_apply(
    pool: &CpuPagePool,
    x: &[f32],
    y: &mut [f32],
    in_f: usize,
    out_f: usize,
    segments: &[LoraSegment<'_>],
) {
    if let Err(e) = try_lora_apply(pool, x, y, in_f, out_f, segments, false) {
        panic!("lora_apply: {e}");
    }
}

/// [`lora_apply`], with what does not fit reported as an error (nothing is written then), and
/// the shrink's summation order chosen ([`CheckedSegments::batch_invariant`]).
pub fn try_lora_apply(
    pool: &CpuPagePool,
    x: &[f32],
    y: &mut [f32],
    in_f: usize,
    out_f: usize,
    segments: &[LoraSegment<'_>],
    invariant: bool,
) -> Result<(), String> {
    let tokens = x.len() / in_f.max(1);
    (CheckedSegments::new(pool, tokens, in_f, out_f, segments.to_vec())?)
        .batch_invariant(invariant)
        .apply(x, y)
}

/// One linear's segments checked against the pool and its dimensions: what the tiles' unchecked
/// page loads rely on. A step's batch checks each slot once and applies it per call.
pub struct CheckedSegments<'a> {
    pool: &'a CpuPagePool,
    tokens: usize,
    in_f: usize,
    out_f: usize,
    segments: Vec<LoraSegment<'a>>,
    /// One summation order for every token, whatever its tile (see [`Self::batch_invariant`]).
    invariant: bool,
}

impl<'a> CheckedSegments<'a> {
    /// Segments sorted, disjoint and inside `tokens`; page lists matching rank and dimensions,
    /// every id a page of `pool`.
    pub fn new(
        pool: &'a CpuPagePool,
        tokens: usize,
        in_f: usize,
        out_f: usize,
        segments: Vec<LoraSegment<'a>>,
    ) -> Result<Self, String> {
        let p = pool.page;
        if !(p > 0 && in_f.is_multiple_of(p) && out_f.is_multiple_of(p)) {
            return Err(format!("in {in_f} out {out_f} are not whole pages of {p}"));
        }
        let num_pages = pool.num_pages();
        let mut end = 0;
        for seg in &segments {
            let m = seg.module;
            if !(seg.start >= end
                && seg.start + seg.len <= tokens
                && m.a_pages.len() == m.rank * (in_f / p)
                && m.b_pages.len() == m.rank * (out_f / p)
                && max_id(&m.a_pages).max(max_id(&m.b_pages)) <= num_pages)
            {
                return Err(format!(
                    "segment {}+{} (rank {}) does not fit the batch or the pool",
                    seg.start, seg.len, m.rank
                ));
            }
            end = seg.start + seg.len;
        }
        Ok(CheckedSegments {
            pool,
            tokens,
            in_f,
            out_f,
            segments,
            invariant: false,
        })
    }

    /// Sums each token's shrink in one order whatever the size of its tile (the tiles of a run
    /// hold up to 8 tokens, and by default their shrink keeps 1 to 4 partial sums by size), so
    /// a token's result does not depend on the batch (see `CpuBackend::with_batch_invariant`).
    pub fn batch_invariant(self, on: bool) -> Self {
        Self { invariant: on, ..self }
    }

    pub fn segments(&self) -> &[LoraSegment<'a>] {
        &self.segments
    }

    /// `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` for the tokens of every segment.
    pub fn apply(&self, x: &[f32], y: &mut [f32]) -> Result<(), String> {
        let (p, in_f, out_f, tokens) = (self.pool.page, self.in_f, self.out_f, self.tokens);
        if !(x.len() == tokens * in_f && y.len() == tokens * out_f) {
            return Err(format!(
                "x {} y {} for {tokens} tokens, in {in_f} out {out_f}",
                x.len(),
                y.len()
            ));
        }
        let pool = self.pool;
        // Cut segments into tiles and pair each tile with its (disjoint) rows of y.
        let mut work: Vec<Tile<'_>> = Vec::new();
        let mut rest = y;
        let mut consumed = 0;
        for seg in &self.segments {
            let mut start = seg.start;
            while start < seg.start + seg.len {
                let len = TILE.min(seg.start + seg.len - start);
                let (_, tail) = rest.split_at_mut((start - consumed) * out_f);
                let (rows, tail) = tail.split_at_mut(len * out_f);
                work.push(Tile {
                    start,
                    module: seg.module,
                    rows,
                });
                rest = tail;
                consumed = start + len;
                start += len;
            }
        }
        // Runs of consecutive tiles, a few per thread: each run reads its pages in pool order, and
        // work stealing evens out a busy core.
        let per = work.len().div_ceil(4 * rayon::current_num_threads()).max(1);
        let inv = self.invariant;
        let run = |tiles: &mut [Tile<'_>]| match &pool.data {
            PageData::F32(data) => run_tiles(p, data, x, tiles, in_f, out_f, inv),
            PageData::BF16(data) => run_tiles(p, data, x, tiles, in_f, out_f, inv),
        };
        if work.len() > per {
            work.par_chunks_mut(per).for_each(run);
        } else {
            run(&mut work);
        }
        Ok(())
    }
}

/// The largest page id in `ids` plus one (0 if empty): vectorises, unlike `all(..)`.
fn max_id(ids: &[u32]) -> usize {
    ids.iter().copied().max().map_or(0, |m| m as usize + 1)
}

/// The tiles of one run, in order, on the calling thread. The portable tiles sum each token on
/// its own already; `invariant` makes the SIMD ones do so too.
fn run_tiles<T: Page>(
    page: usize,
    data: &[T],
    x: &[f32],
    tiles: &mut [Tile<'_>],
    in_f: usize,
    out_f: usize,
    invariant: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let wide = page.is_multiple_of(16) && has_avx512();
        if wide || (page.is_multiple_of(8) && has_avx2_fma()) {
            let d = tiles::Dims {
                page,
                in_f,
                out_f,
                invariant,
            };
            for t in tiles.iter_mut() {
                let n = t.rows.len() / out_f;
                let xs = &x[t.start * in_f..(t.start + n) * in_f];
                let (xp, yp) = (xs.as_ptr(), t.rows.as_mut_ptr());
                // SAFETY: the CPU features are present (checked just above: AVX-512F with
                // page % 16 == 0, else AVX2/FMA/F16C with page % 8 == 0); `CheckedSegments::new`
                // checked that the module's page lists match rank and dims and that every id is
                // a page of `data`; `xs` and `rows` hold n (1..=TILE) rows of in_f and out_f
                // floats.
                unsafe {
                    if wide {
                        tiles::tile_avx512(data.as_ptr(), d, t.module, xp, yp, n)
                    } else {
                        tiles::tile_avx2(data.as_ptr(), d, t.module, xp, yp, n)
                    }
                };
            }
            return;
        }
    }
    let pages = Pages { page, data };
    for t in tiles.iter_mut() {
        tile(&pages, x, t.rows, t.start, t.module, in_f, out_f);
    }
}

fn has_avx512() -> bool {
    crate::cpu::features().avx512f_avx2()
}

fn has_avx2_fma() -> bool {
    crate::cpu::features().avx2_fma_f16c()
}

/// One tile of tokens on one module; the body is compiled twice, with and without AVX2/FMA.
fn tile<T: PageElem>(
    pool: &Pages<'_, T>,
    x: &[f32],
    rows: &mut [f32],
    start: usize,
    m: &LoraModule,
    in_f: usize,
    out_f: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked at run time just above).
        unsafe { tile_avx2(pool, x, rows, start, m, in_f, out_f) };
        return;
    }
    tile_body::<T, false>(pool, x, rows, start, m, in_f, out_f)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<T: PageElem>(
    pool: &Pages<'_, T>,
    x: &[f32],
    rows: &mut [f32],
    start: usize,
    m: &LoraModule,
    in_f: usize,
    out_f: usize,
) {
    tile_body::<T, true>(pool, x, rows, start, m, in_f, out_f)
}

/// `a * b + c`, fused where the caller was compiled with FMA (`mul_add` is a libm call otherwise).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product in 8 lanes (one AVX register; LLVM vectorises the lane loop).
#[inline(always)]
fn dot<T: PageElem, const FMA: bool>(a: &[f32], b: &[T]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y.f()).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] = madd::<FMA>(x[l], y[l].f(), lanes[l]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[inline(always)]
fn tile_body<T: PageElem, const FMA: bool>(
    pool: &Pages<'_, T>,
    x: &[f32],
    rows: &mut [f32],
    start: usize,
    m: &LoraModule,
    in_f: usize,
    out_f: usize,
) {
    let p = pool.page;
    let n = rows.len() / out_f;
    let (cin, cout) = (in_f / p, out_f / p);
    // Shrink: h[t, j] = x[t] · A[j]; each page is loaded once for all tokens of the tile.
    let mut h = [0.0f32; TILE * 64];
    let mut h_big = Vec::new();
    let h: &mut [f32] = if n * m.rank <= h.len() {
        &mut h[..n * m.rank]
    } else {
        h_big.resize(n * m.rank, 0.0);
        &mut h_big
    };
    for j in 0..m.rank {
        for c in 0..cin {
            let page = pool.get(m.a_pages[j * cin + c]);
            for t in 0..n {
                h[t * m.rank + j] += dot::<T, FMA>(&x[(start + t) * in_f + c * p..][..p], page);
            }
        }
    }
    // Expand: y[t] += scale · Σ_j h[t, j] · Bᵀ[j]
    for j in 0..m.rank {
        for c in 0..cout {
            let page = pool.get(m.b_pages[j * cout + c]);
            for t in 0..n {
                let coef = m.scale * h[t * m.rank + j];
                for (y, b) in rows[t * out_f + c * p..][..p].iter_mut().zip(page) {
                    *y = madd::<FMA>(coef, b.f(), *y);
                }
            }
        }
    }
}

/// Dense weights of one adapted linear, for the reference: `a` is `[rank, in]`, `b` is `[out, rank]`.
pub struct DenseLora<'a> {
    pub a: &'a [f32],
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f32,
}

/// Dense reference: the oracle for [`lora_apply`], on tokens `start..start + len`.
pub fn lora_ref(x: &[f32], y: &mut [f32], in_f: usize, out_f: usize, start: usize, len: usize, w: &DenseLora<'_>) {
    let DenseLora { a, b, rank, scale } = *w;
    for t in start..start + len {
        let h: Vec<f64> = (0..rank)
            .map(|j| (0..in_f).map(|i| x[t * in_f + i] as f64 * a[j * in_f + i] as f64).sum())
            .collect();
        for o in 0..out_f {
            let d: f64 = (0..rank).map(|j| b[o * rank + j] as f64 * h[j]).sum();
            y[t * out_f + o] += (scale as f64 * d) as f32;
        }
    }
}

#[cfg(test)]
#[path = "lora_tests.rs"]
mod tests;

//! The backend trait: every operation the model's forward pass needs, on opaque device buffers.
//! The CPU backend implements it with plain `Vec<f32>`s and is the oracle for the others.

use crate::error::TensorError;
use crate::storage::{DType, Matrix};

/// Geometry of the paged KV cache: `num_blocks` blocks of `block_size` token slots, per layer,
/// each entry stored as `dtype` (K/V are computed in f32 and rounded to it when written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// Entries of K (or of V) per block and layer.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Bytes of K and V storage per block, all layers together: a bf16/f16 cache holds twice the
    /// blocks of an f32 one in the same budget.
    pub fn bytes_per_block(&self) -> usize {
        2 * self.num_layers * self.block_elems() * self.dtype.size()
    }
}

/// Rotary embedding tables: `cos`/`sin` are `[max_positions, rotary_dim / 2]`, row = position.
#[derive(Debug, Clone)]
pub struct RopeTable {
    pub half_dim: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl RopeTable {
    pub fn max_positions(&self) -> usize {
        self.cos.len() / self.half_dim.max(1)
    }
}

/// Host-side description of one ragged batch: token `t` belongs to sequence `seq[t]`, sits at
/// `positions[t]`, and its K/V go to cache slot `slots[t]` (block * block_size + offset).
/// Sequence `s` attends over its first `positions[t] + 1` cache entries through `block_tables[s]`.
#[derive(Debug, Clone, Default)]
pub struct AttentionBatch {
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub seq: Vec<u32>,
    pub block_tables: Vec<Vec<u32>>,
}

impl AttentionBatch {
    pub fn num_tokens(&self) -> usize {
        self.positions.len()
    }
}

/// One adapted linear in the page pool: A as `rank` rows of `in` floats, Bᵀ as `rank` rows of
/// `out` floats, each row cut into `in / page` (resp. `out / page`) pages; `a_pages[j * (in /
/// page) + c]` holds floats `c * page ..` of row `j`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    pub rank: usize,
    pub scale: f32,
    pub a_pages: Vec<u32>,
    pub b_pages: Vec<u32>,
}

/// Tokens `start..start + len` of the batch use `module`.
#[derive(Debug, Clone, Copy)]
pub struct LoraSegment<'a> {
    pub start: usize,
    pub len: usize,
    pub module: &'a LoraModule,
}

/// One forward step's adapters, described once for every adapted linear of the step (what vLLM's
/// punica wrapper builds in `update_metadata`): runs of tokens that share an adapter, and per
/// slot (one projection of one layer) the module each run uses there.
#[derive(Debug, Clone, Default)]
pub struct LoraPlan<'a> {
    pub tokens: usize,
    /// `(start, len)` of each run; sorted and disjoint.
    pub runs: Vec<(usize, usize)>,
    pub slots: Vec<LoraSlot<'a>>,
}

/// One adapted linear's part of a [`LoraPlan`].
#[derive(Debug, Clone, Default)]
pub struct LoraSlot<'a> {
    pub in_f: usize,
    pub out_f: usize,
    /// `modules[r]`: the module run `r` uses here; `None`: base only.
    pub modules: Vec<Option<&'a LoraModule>>,
}

impl<'a> LoraPlan<'a> {
    /// A one-slot plan: each segment is a run (what a lone [`Backend::lora`] call prepares).
    pub fn single(tokens: usize, in_f: usize, out_f: usize, segments: &[LoraSegment<'a>]) -> Self {
        LoraPlan {
            tokens,
            runs: segments.iter().map(|s| (s.start, s.len)).collect(),
            slots: vec![LoraSlot {
                in_f,
                out_f,
                modules: segments.iter().map(|s| Some(s.module)).collect(),
            }],
        }
    }

    /// The segments of `slot`: its runs that have a module there, in order.
    pub fn segments(&self, slot: &LoraSlot<'a>) -> Vec<LoraSegment<'a>> {
        self.runs
            .iter()
            .zip(&slot.modules)
            .filter_map(|(&(start, len), m)| {
                Some(LoraSegment {
                    start,
                    len,
                    module: (*m)?,
                })
            })
            .collect()
    }

    /// Runs sorted, disjoint and inside the batch; every slot names one entry per run.
    pub fn check(&self) -> Result<(), TensorError> {
        let mut end = 0;
        for &(start, len) in &self.runs {
            if start < end || start + len > self.tokens {
                return Err(TensorError::Shape {
                    op: "lora_batch",
                    detail: format!("run {start}+{len} overlaps or leaves a batch of {}", self.tokens),
                });
            }
            end = start + len;
        }
        if let Some((i, s)) = self
            .slots
            .iter()
            .enumerate()
            .find(|(_, s)| s.modules.len() != self.runs.len())
        {
            return Err(TensorError::Shape {
                op: "lora_batch",
                detail: format!(
                    "slot {i} names {} modules for {} runs",
                    s.modules.len(),
                    self.runs.len()
                ),
            });
        }
        Ok(())
    }
}

pub trait Backend: Clone + Send + Sync + 'static {
    /// Flat f32 activations.
    type Tensor: Send + Sync;
    /// A weight matrix in its storage dtype.
    type Weight: Send + Sync;
    /// K/V storage for every layer.
    type KvPool: Send;
    /// Fixed-size pages holding adapter weights.
    type PagePool: Send + Sync;
    /// A [`LoraPlan`] checked (and on a device uploaded) once per step, read by every
    /// [`lora_slot`](Self::lora_slot) call of the step. It borrows the page pool, so no page can
    /// be rewritten or released while it lives.
    type LoraBatch<'a>: Send + Sync
    where
        Self: 'a;

    fn name(&self) -> String;

    /// Runs `f` (a whole forward pass) where the backend's kernels are cheapest to launch: the
    /// CPU backend runs it on its worker pool so each kernel's fan-out needs no cross-thread
    /// handoff.
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    fn upload_weight(&self, m: Matrix) -> Result<Self::Weight, TensorError>;
    fn upload(&self, data: &[f32]) -> Result<Self::Tensor, TensorError>;
    fn zeros(&self, len: usize) -> Result<Self::Tensor, TensorError>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>, TensorError>;
    fn new_kv_pool(&self, layout: KvLayout) -> Result<Self::KvPool, TensorError>;
    /// A pool of `pages` pages of `page_floats` values stored as `dtype` (f32 or bf16).
    fn new_page_pool(&self, page_floats: usize, pages: usize, dtype: DType) -> Result<Self::PagePool, TensorError>;
    /// Gives the memory behind `blocks` (every layer's K and V) back to the system where the
    /// backend can: the CPU pool returns the whole OS pages inside those blocks
    /// (`madvise(MADV_DONTNEED)`), so a released block reads as zeros until it is written again
    /// (blocks are always written before they are read); CUDA keeps its chunks for now (no-op).
    /// For freed blocks only: the caller must not release a block a sequence still reads.
    fn release_kv_blocks(&self, pool: &mut Self::KvPool, blocks: &[u32]) -> Result<(), TensorError>;
    /// [`release_kv_blocks`](Self::release_kv_blocks) for adapter pages: a released page reads as
    /// zeros until written again.
    fn release_pages(&self, pool: &mut Self::PagePool, pages: &[u32]) -> Result<(), TensorError>;
    /// Copies `data` (`pages.len()` pages, back to back) into the given pages, rounding to the
    /// pool's dtype.
    fn write_pages(&self, pool: &mut Self::PagePool, pages: &[u32], data: &[f32]) -> Result<(), TensorError>;
    /// Returns a weight to host memory in its storage dtype (merging adapters into the base).
    fn download_weight(&self, w: &Self::Weight) -> Result<Matrix, TensorError>;

    /// `out[i] = table[ids[i]]` widened to f32.
    fn embed(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Tensor) -> Result<(), TensorError>;
    /// `out[m, n] = x[m, k] · wᵀ`.
    fn matmul(&self, x: &Self::Tensor, m: usize, w: &Self::Weight, out: &mut Self::Tensor) -> Result<(), TensorError>;
    /// `x[r, :] += bias` for every row.
    fn add_bias(&self, x: &mut Self::Tensor, bias: &Self::Tensor) -> Result<(), TensorError>;
    /// `acc += x`.
    fn add(&self, acc: &mut Self::Tensor, x: &Self::Tensor) -> Result<(), TensorError>;
    /// Row-wise RMSNorm: `out = x / sqrt(mean(x²) + eps) * w`.
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f32, out: &mut Self::Tensor)
        -> Result<(), TensorError>;
    /// `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Tensor, up: &Self::Tensor) -> Result<(), TensorError>;
    /// Rotate-half RoPE in place on `[tokens, heads, head_dim]`.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> Result<(), TensorError>;
    /// Store this step's K and V (`[tokens, kv_heads, head_dim]`) at `slots`.
    fn write_kv(
        &self,
        pool: &mut Self::KvPool,
        layer: usize,
        k: &Self::Tensor,
        v: &Self::Tensor,
        slots: &[u32],
    ) -> Result<(), TensorError>;
    /// Causal attention of each token's query heads over its sequence's cached K/V.
    fn attention(
        &self,
        pool: &Self::KvPool,
        layer: usize,
        q: &Self::Tensor,
        heads: usize,
        batch: &AttentionBatch,
        out: &mut Self::Tensor,
    ) -> Result<(), TensorError>;
    /// LoRA delta for each segment's tokens: `y[t] += scale · (x[t] · Aᵀ) · Bᵀ`; `x` is
    /// `[tokens, in_f]`, `y` is `[tokens, out_f]`; segments sorted and disjoint. One call on its
    /// own: a forward pass prepares a [`lora_batch`](Self::lora_batch) once instead.
    fn lora(
        &self,
        pool: &Self::PagePool,
        x: &Self::Tensor,
        y: &mut Self::Tensor,
        in_f: usize,
        out_f: usize,
        segments: &[LoraSegment<'_>],
    ) -> Result<(), TensorError>;
    /// Prepares one step's adapters for every slot of `plan`.
    fn lora_batch<'a>(&self, pool: &'a Self::PagePool, plan: LoraPlan<'a>) -> Result<Self::LoraBatch<'a>, TensorError>;
    /// [`lora`](Self::lora) for slot `slot` of a prepared batch: `x` is `[tokens, in_f]`, `y`
    /// is `[tokens, out_f]` with the slot's dimensions.
    fn lora_slot(
        &self,
        batch: &Self::LoraBatch<'_>,
        slot: usize,
        x: &Self::Tensor,
        y: &mut Self::Tensor,
    ) -> Result<(), TensorError>;
    /// `out[i, :] = x[rows[i], :]` for rows of width `width`.
    fn gather_rows(
        &self,
        x: &Self::Tensor,
        width: usize,
        rows: &[u32],
        out: &mut Self::Tensor,
    ) -> Result<(), TensorError>;
}

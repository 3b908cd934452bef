//! The CPU's paged KV cache: per layer, K and V in the layout's dtype (f32, bf16 or f16), each in
//! its own anonymous mapping of 4 KB pages, so that freed blocks can give their memory back.
//!
//! V is `[num_blocks * block_size, kv_heads, head_dim]`; K is transposed within each block,
//! `[num_blocks, kv_heads, head_dim, block_size]` (see `attention.rs`). Either way one block's
//! entries of one layer are one contiguous run of `block_elems` values.

use half::{bf16, f16};

use super::attention::{self, PagedKv};
use super::huge::HugeVec;
use crate::backend::{AttentionBatch, KvLayout};
use crate::storage::DType;

/// One layer's K or V.
pub enum KvData {
    F32(HugeVec<f32>),
    BF16(HugeVec<bf16>),
    F16(HugeVec<f16>),
}

impl KvData {
    fn zeroed(dtype: DType, len: usize) -> Self {
        match dtype {
            DType::F32 => KvData::F32(HugeVec::zeroed_small_pages(len)),
            DType::BF16 => KvData::BF16(HugeVec::zeroed_small_pages(len)),
            DType::F16 => KvData::F16(HugeVec::zeroed_small_pages(len)),
        }
    }

    /// Rounds `x` to the stored dtype (round to nearest even, as `half` and torch do) at `i`.
    #[inline]
    fn set(&mut self, i: usize, x: f32) {
        match self {
            KvData::F32(d) => d[i] = x,
            KvData::BF16(d) => d[i] = bf16::from_f32(x),
            KvData::F16(d) => d[i] = f16::from_f32(x),
        }
    }

    /// Stores `src` at `at..`, rounded.
    fn set_row(&mut self, at: usize, src: &[f32]) {
        match self {
            KvData::F32(d) => d[at..at + src.len()].copy_from_slice(src),
            KvData::BF16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = bf16::from_f32(x);
                }
            }
            KvData::F16(d) => {
                for (o, &x) in d[at..at + src.len()].iter_mut().zip(src) {
                    *o = f16::from_f32(x);
                }
            }
        }
    }

    /// Entry `i` widened to f32.
    pub fn get(&self, i: usize) -> f32 {
        match self {
            KvData::F32(d) => d[i],
            KvData::BF16(d) => d[i].to_f32(),
            KvData::F16(d) => d[i].to_f32(),
        }
    }

    /// Bytes of this buffer resident in memory (see [`HugeVec::resident_bytes`]).
    pub fn resident_bytes(&self) -> Option<usize> {
        match self {
            KvData::F32(d) => d.resident_bytes(),
            KvData::BF16(d) => d.resident_bytes(),
            KvData::F16(d) => d.resident_bytes(),
        }
    }

    fn release(&mut self, range: std::ops::Range<usize>) -> usize {
        match self {
            KvData::F32(d) => d.release(range),
            KvData::BF16(d) => d.release(range),
            KvData::F16(d) => d.release(range),
        }
    }
}

/// K and V of every layer (see the module docs for the layout).
pub struct CpuKvPool {
    pub layout: KvLayout,
    pub k: Vec<KvData>,
    pub v: Vec<KvData>,
}

impl CpuKvPool {
    pub fn new(layout: KvLayout) -> Self {
        let per_layer = layout.num_blocks * layout.block_elems();
        CpuKvPool {
            layout,
            k: (0..layout.num_layers)
                .map(|_| KvData::zeroed(layout.dtype, per_layer))
                .collect(),
            v: (0..layout.num_layers)
                .map(|_| KvData::zeroed(layout.dtype, per_layer))
                .collect(),
        }
    }

    /// Stores token rows `k`/`v` (`[kv_heads * head_dim]` each) at slot `s` of `layer`; the
    /// caller has checked the slot and lengths.
    pub(crate) fn write_slot(&mut self, layer: usize, s: usize, k: &[f32], v: &[f32]) {
        let l = self.layout;
        let (bs, kvh, hd) = (l.block_size, l.num_kv_heads, l.head_dim);
        let kl = &mut self.k[layer];
        for (i, &x) in k.iter().enumerate() {
            kl.set(attention::k_index(bs, kvh, hd, s, i / hd, i % hd), x);
        }
        self.v[layer].set_row(s * k.len(), v);
    }

    /// Zeroes `blocks` in every layer, returning the whole OS pages inside them to the system
    /// (adjacent blocks as one range); the bytes given back. The caller has checked the ids.
    pub(crate) fn release(&mut self, blocks: &[u32]) -> usize {
        let runs = super::huge::unit_runs(blocks, self.layout.block_elems());
        let mut returned = 0;
        for data in self.k.iter_mut().chain(self.v.iter_mut()) {
            for r in &runs {
                returned += data.release(r.clone());
            }
        }
        returned
    }

    /// Causal attention over `layer` (checked by the caller), reading K/V in their stored dtype.
    pub(crate) fn attention(&self, layer: usize, q: &[f32], heads: usize, batch: &AttentionBatch, out: &mut [f32]) {
        let l = self.layout;
        macro_rules! run {
            ($k:expr, $v:expr) => {
                attention::paged_attention(
                    &PagedKv {
                        k: $k,
                        v: $v,
                        block_size: l.block_size,
                        kv_heads: l.num_kv_heads,
                        head_dim: l.head_dim,
                    },
                    q,
                    heads,
                    batch,
                    out,
                )
            };
        }
        match (&self.k[layer], &self.v[layer]) {
            (KvData::F32(k), KvData::F32(v)) => run!(k, v),
            (KvData::BF16(k), KvData::BF16(v)) => run!(k, v),
            (KvData::F16(k), KvData::F16(v)) => run!(k, v),
            _ => unreachable!("K and V of a layer share the pool's dtype"),
        }
    }
}

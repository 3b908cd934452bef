//! Host-side bookkeeping of the paged KV cache: a free list of blocks, each sequence's block
//! table, and the builder that lays a step's tokens out as one ragged [`ForwardInput`].

use std::sync::Arc;

use crate::llama::ForwardInput;
use crate::lora::{AdapterRun, LoraAdapter};

/// Fixed pool of KV blocks (also used for adapter pages); a block is `block_size` token slots in
/// every layer. Ids never handed out are not listed: a pool sized for a large GPU holds hundreds of
/// millions of pages, and a free list of all of them would cost gigabytes of host memory.
#[derive(Debug)]
pub struct BlockAllocator {
    /// Released ids, reused last-released first. Their memory is still touched (resident).
    released: Vec<u32>,
    /// Released ids whose memory went back to the OS ([`Self::trim`]): reused after `released`,
    /// before never-used ids.
    cold: Vec<u32>,
    /// Ids `fresh..total` have never been handed out.
    fresh: usize,
    total: usize,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(total: usize, block_size: usize) -> Self {
        BlockAllocator {
            released: Vec::new(),
            cold: Vec::new(),
            fresh: 0,
            total: total.min(u32::MAX as usize),
            block_size,
        }
    }
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn num_free(&self) -> usize {
        self.released.len() + self.cold.len() + (self.total - self.fresh)
    }
    /// Ids whose memory may be resident: handed out at some time and not trimmed since.
    pub fn touched(&self) -> usize {
        self.fresh - self.cold.len()
    }
    /// Of `n` ids about to be allocated, how many would touch memory not resident now.
    pub fn untouched_needed(&self, n: usize) -> usize {
        n.saturating_sub(self.released.len())
    }
    /// Moves up to `n` released ids to the cold list and returns them: the caller gives their
    /// memory back to the OS (they read as zeros when next used).
    pub fn trim(&mut self, n: usize) -> Vec<u32> {
        // The longest released first: the last released are the next reused.
        let take = n.min(self.released.len());
        let ids: Vec<u32> = self.released.drain(..take).collect();
        self.cold.extend_from_slice(&ids);
        ids
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    /// `n` blocks, or none at all if fewer are free: released ones first (last released first),
    /// then never-used ids in ascending order (so a fresh pool hands out contiguous ids, which
    /// the gather kernels stream well).
    pub fn alloc_many(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.num_free()).then(|| {
            let reused = n.min(self.released.len());
            let mut blocks = self.released.split_off(self.released.len() - reused);
            blocks.reverse();
            let cold = (n - reused).min(self.cold.len());
            blocks.extend(self.cold.drain(self.cold.len() - cold..).rev());
            let more = n - reused - cold;
            blocks.extend((self.fresh..self.fresh + more).map(|b| b as u32));
            self.fresh += more;
            blocks
        })
    }
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.released.extend(blocks);
        debug_assert!(self.num_free() <= self.total, "a block was released twice");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trimmed_ids_are_untouched_and_reused_after_warm_ones() {
        let mut a = BlockAllocator::new(8, 16);
        assert_eq!(a.alloc_many(4), Some(vec![0, 1, 2, 3]));
        assert_eq!(a.touched(), 4);
        a.release([0, 1, 2]);
        assert_eq!(a.trim(2), vec![0, 1], "the longest released go cold first");
        assert_eq!((a.touched(), a.num_free()), (2, 7));
        assert_eq!(a.untouched_needed(3), 2, "one warm id left");
        assert_eq!(a.alloc_many(4), Some(vec![2, 1, 0, 4]), "warm, then cold, then fresh");
        assert_eq!(a.touched(), 5);
        assert_eq!(a.trim(1), Vec::<u32>::new(), "nothing released to trim");
    }

    #[test]
    fn allocator_hands_out_ascending_then_reuses_last_released_first() {
        let mut a = BlockAllocator::new(6, 16);
        assert_eq!(a.alloc_many(3), Some(vec![0, 1, 2]));
        assert_eq!(a.num_free(), 3);
        a.release([1, 2]);
        assert_eq!(a.alloc_many(4), Some(vec![2, 1, 3, 4]));
        assert_eq!(a.alloc_many(2), None, "only one left: nothing is taken");
        assert_eq!(a.num_free(), 1);
        assert_eq!(a.alloc_many(1), Some(vec![5]));
        assert_eq!(a.num_free(), 0);
    }

    #[test]
    fn a_huge_pool_costs_nothing_until_used() {
        let mut a = BlockAllocator::new(400_000_000, 1);
        assert_eq!(a.num_free(), 400_000_000);
        assert_eq!(a.alloc_many(2), Some(vec![0, 1]));
    }
}

/// The KV cache of one sequence: its block table and how many positions hold K/V.
#[derive(Debug, Default, Clone)]
pub struct SequenceCache {
    pub block_table: Vec<u32>,
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks;

impl SequenceCache {
    /// Makes room for `count` more tokens; on failure nothing is allocated.
    pub fn reserve(&mut self, alloc: &mut BlockAllocator, count: usize) -> Result<(), OutOfBlocks> {
        let need = alloc
            .blocks_for(self.len + count)
            .saturating_sub(self.block_table.len());
        let blocks = alloc.alloc_many(need).ok_or(OutOfBlocks)?;
        self.block_table.extend(blocks);
        Ok(())
    }

    /// Returns every block to the allocator.
    pub fn release(&mut self, alloc: &mut BlockAllocator) {
        alloc.release(self.block_table.drain(..));
        self.len = 0;
    }
}

/// Accumulates one step's ragged batch.
#[derive(Debug, Default)]
pub struct BatchBuilder {
    input: ForwardInput,
}

impl BatchBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `tokens` as the next positions of `seq` (room must have been reserved) and
    /// returns the row of the last token, whose logits are requested when `want_logits`.
    pub fn push(&mut self, seq: &mut SequenceCache, block_size: usize, tokens: &[u32], want_logits: bool) -> u32 {
        self.push_with_adapter(seq, block_size, tokens, want_logits, None)
    }

    /// [`push`](Self::push) for tokens that run through `adapter`; consecutive tokens on the same
    /// adapter form one run (one SGMV segment).
    pub fn push_with_adapter(
        &mut self,
        seq: &mut SequenceCache,
        block_size: usize,
        tokens: &[u32],
        want_logits: bool,
        adapter: Option<&Arc<LoraAdapter>>,
    ) -> u32 {
        if let Some(adapter) = adapter {
            let start = self.input.tokens.len();
            match self.input.lora.last_mut() {
                Some(run) if run.start + run.len == start && Arc::ptr_eq(&run.adapter, adapter) => {
                    run.len += tokens.len()
                }
                _ => self.input.lora.push(AdapterRun {
                    start,
                    len: tokens.len(),
                    adapter: adapter.clone(),
                }),
            }
        }
        let a = &mut self.input.attn;
        let sid = a.block_tables.len() as u32;
        a.block_tables.push(seq.block_table.clone());
        for (i, &t) in tokens.iter().enumerate() {
            let pos = seq.len + i;
            self.input.tokens.push(t);
            a.positions.push(pos as u32);
            a.slots
                .push(seq.block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32);
            a.seq.push(sid);
        }
        seq.len += tokens.len();
        let row = self.input.tokens.len() as u32 - 1;
        if want_logits {
            self.input.logits_rows.push(row);
        }
        row
    }

    pub fn is_empty(&self) -> bool {
        self.input.tokens.is_empty()
    }

    pub fn finish(self) -> ForwardInput {
        self.input
    }
}

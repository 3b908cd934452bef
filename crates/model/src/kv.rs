//! Host-side bookkeeping of the paged KV cache: a free list of blocks, each sequence's block
//! table, and the builder that lays a step's tokens out as one ragged [`ForwardInput`].

use std::sync::Arc;

use crate::llama::ForwardInput;
use crate::lora::{AdapterRun, LoraAdapter};

/// Fixed pool of KV blocks; a block is `block_size` token slots in every layer.
#[derive(Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
    block_size: usize,
}

impl BlockAllocator {
    pub fn new(total: usize, block_size: usize) -> Self {
        // Hand out low block numbers first (pop from the end).
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
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
        self.free.len()
    }
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }
    fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }
    /// `n` blocks, or none at all if fewer are free; in the order `alloc` would give them (so a
    /// fresh pool hands out ascending, contiguous ids, which the gather kernels stream well).
    pub fn alloc_many(&mut self, n: usize) -> Option<Vec<u32>> {
        (n <= self.free.len()).then(|| {
            let mut blocks = self.free.split_off(self.free.len() - n);
            blocks.reverse();
            blocks
        })
    }
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
        debug_assert!(self.free.len() <= self.total, "a block was released twice");
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
        if need > alloc.num_free() {
            return Err(OutOfBlocks);
        }
        for _ in 0..need {
            self.block_table.extend(alloc.alloc());
        }
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

//! KV memory: the block free list, the prefix cache over it, and the share of the memory budget
//! the blocks take. Cached blocks nobody holds keep their bytes charged until room is needed.
//!
//! When memory is short, idle adapters' device copies are evicted before idle cached blocks: an
//! evicted adapter comes back by copying its pages from the host tier, an evicted prefix only by
//! running prefill over all of its tokens again (for a rank-8 adapter and a 1,024-token prompt
//! of a 0.5B model the bytes are about the same, the work to restore them is not).
//! `EngineConfig::evict_cached_blocks_first` reverses the order, to measure the choice.

use std::collections::HashMap;

use quiver_model::{BlockAllocator, SequenceCache};
use quiver_tensor::Backend;

use crate::adapters::AdapterManager;
use crate::memory::MemoryBudget;
use crate::prefix::{Chain, PrefixCache, WeightsId};

/// Token counters in vLLM v1's sense: tokens looked up in the prefix cache at admission (the
/// prompt, plus the tokens generated before a preemption on readmission) and tokens found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PrefixStats {
    pub queries: u64,
    pub hits: u64,
}

pub(crate) struct KvMemory {
    blocks: BlockAllocator,
    block_bytes: usize,
    /// `None` with prefix caching off.
    prefix: Option<PrefixCache>,
    stats: PrefixStats,
    /// Idle cached blocks are evicted before idle adapters (not the default).
    cached_blocks_first: bool,
}

impl KvMemory {
    pub fn new(blocks: BlockAllocator, block_bytes: usize, caching: bool, cached_blocks_first: bool) -> Self {
        let prefix = caching.then(|| PrefixCache::new(blocks.block_size()));
        KvMemory {
            blocks,
            block_bytes,
            prefix,
            stats: PrefixStats::default(),
            cached_blocks_first,
        }
    }

    pub fn cached_blocks_first(&self) -> bool {
        self.cached_blocks_first
    }

    pub fn block_bytes(&self) -> usize {
        self.block_bytes
    }

    /// Bytes of the blocks whose memory may be resident (held, cached or released but not trimmed).
    pub fn touched_bytes(&self) -> usize {
        self.blocks.touched() * self.block_bytes
    }

    /// Takes up to `bytes` (rounded up to blocks) of released blocks off the warm free list; the
    /// caller returns their memory to the OS.
    pub fn trim(&mut self, bytes: usize) -> Vec<u32> {
        self.blocks.trim(bytes.div_ceil(self.block_bytes))
    }

    pub fn total_blocks(&self) -> usize {
        self.blocks.total()
    }

    pub fn used_blocks(&self) -> usize {
        self.blocks.total() - self.blocks.num_free()
    }

    /// Blocks in the prefix cache, and those of them nobody holds.
    pub fn cached_blocks(&self) -> (usize, usize) {
        self.prefix
            .as_ref()
            .map_or((0, 0), |p| (p.cached_blocks(), p.idle_blocks()))
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    /// Counts an admitted sequence's lookup: `queried` tokens, `hit` of them found.
    pub fn count_lookup(&mut self, queried: usize, hit: usize) {
        if self.prefix.is_some() {
            self.stats.queries += queried as u64;
            self.stats.hits += hit as u64;
        }
    }

    pub fn caching(&self) -> bool {
        self.prefix.is_some()
    }

    /// Grows `cache` by `tokens` slots, charging the shared budget: idle adapters are evicted
    /// first, then idle cached blocks (or the other way round), if that makes room. On failure
    /// nothing changes.
    pub fn reserve<B: Backend>(
        &mut self,
        budget: &mut MemoryBudget,
        adapters: &mut AdapterManager<B>,
        cache: &mut SequenceCache,
        tokens: usize,
    ) -> bool {
        let need = self
            .blocks
            .blocks_for(cache.len + tokens)
            .saturating_sub(cache.block_table.len());
        let bytes = need * self.block_bytes;
        if need > self.blocks.num_free() + self.cached_blocks().1 {
            return false;
        }
        if bytes > budget.free() {
            if self.cached_blocks_first {
                self.make_room(bytes, budget);
            }
            adapters.yield_memory(bytes, budget);
        }
        if !self.make_room(bytes, budget) {
            return false;
        }
        while need > self.blocks.num_free() && self.evict_one(budget) {}
        if need > self.blocks.num_free() || !budget.take_kv(bytes) {
            return false;
        }
        if cache.reserve(&mut self.blocks, tokens).is_err() {
            budget.give_kv(bytes);
            return false;
        }
        true
    }

    /// Evicts idle cached blocks, least recently used first, until `bytes` fit in the budget.
    pub fn make_room(&mut self, bytes: usize, budget: &mut MemoryBudget) -> bool {
        while budget.free() < bytes {
            if !self.evict_one(budget) {
                return false;
            }
        }
        true
    }

    fn evict_one(&mut self, budget: &mut MemoryBudget) -> bool {
        let Some(block) = self.prefix.as_mut().and_then(PrefixCache::evict) else {
            return false;
        };
        self.blocks.release([block]);
        budget.give_kv(self.block_bytes);
        true
    }

    /// Evicts every idle cached block.
    pub fn evict_idle(&mut self, budget: &mut MemoryBudget) {
        while self.evict_one(budget) {}
    }

    /// Starts `cache` (empty) with the longest cached chain of `tokens` under `weights`; returns
    /// the chain, whose length in tokens the sequence need not compute.
    pub fn lookup(&mut self, weights: WeightsId, tokens: &[u32], cache: &mut SequenceCache) -> Chain {
        debug_assert!(cache.block_table.is_empty() && cache.len == 0);
        let Some(prefix) = self.prefix.as_mut() else {
            return Chain::default();
        };
        let (blocks, chain) = prefix.lookup(weights, tokens);
        cache.len = blocks.len() * self.blocks.block_size();
        cache.block_table = blocks;
        chain
    }

    /// Registers the blocks `computed` tokens have filled.
    pub fn register(
        &mut self,
        weights: WeightsId,
        tokens: &[u32],
        cache: &SequenceCache,
        computed: usize,
        chain: &mut Chain,
    ) {
        if let Some(prefix) = self.prefix.as_mut() {
            prefix.register(weights, tokens, &cache.block_table, computed, chain);
        }
    }

    /// Gives back a sequence's blocks, last first: its own are freed, cached ones lose a
    /// reference (and become the first to be evicted among its chain).
    pub fn release(&mut self, budget: &mut MemoryBudget, cache: &mut SequenceCache) {
        for block in cache.block_table.drain(..).rev() {
            if self.prefix.as_mut().is_none_or(|p| p.release(block)) {
                self.blocks.release([block]);
                budget.give_kv(self.block_bytes);
            }
        }
        cache.len = 0;
    }

    /// For tests: the prefix cache is consistent; every cached block has exactly as many
    /// references as sequences hold it (so none is freed while held, and the counts return to
    /// zero); a block of a sequence's own belongs to no other; every block in use is held or
    /// idle in the cache (none leaks); and the budget charges exactly the blocks in use.
    pub fn check<'a>(&self, budget: &MemoryBudget, tables: impl Iterator<Item = &'a [u32]>) -> Result<(), String> {
        let mut holders: HashMap<u32, u32> = HashMap::new();
        for table in tables {
            for &b in table {
                *holders.entry(b).or_default() += 1;
            }
        }
        let refs = |b: u32| self.prefix.as_ref().and_then(|p| p.refs(b));
        for (&b, &n) in &holders {
            match refs(b) {
                Some(r) if r != n => return Err(format!("cached block {b}: {r} references, {n} holders")),
                None if n > 1 => return Err(format!("block {b} of a sequence's own is held {n} times")),
                _ => {}
            }
        }
        if let Some(p) = &self.prefix {
            p.check()?;
            let held_refs: u64 = holders
                .iter()
                .filter(|(b, _)| p.refs(**b).is_some())
                .map(|(_, &n)| u64::from(n))
                .sum();
            if p.references() != held_refs {
                return Err(format!(
                    "{} references on cached blocks, {held_refs} held",
                    p.references()
                ));
            }
        }
        let (used, idle) = (self.used_blocks(), self.cached_blocks().1);
        if used != holders.len() + idle {
            return Err(format!(
                "{used} blocks in use: {} held, {idle} idle cached",
                holders.len()
            ));
        }
        if budget.kv_bytes() != used * self.block_bytes {
            return Err(format!(
                "{} KV bytes charged for {used} blocks of {} B",
                budget.kv_bytes(),
                self.block_bytes
            ));
        }
        Ok(())
    }
}

//! Automatic prefix caching: full KV blocks are kept, keyed by what computed them, and reused by
//! any later sequence whose tokens start the same way under the same weights.
//!
//! A block's key is the chain link `(parent, adapter, tokens)`: the cache serial of the block
//! before it (0 at the start of a sequence), the identity of the weights (0 for the base model,
//! else the adapter's load generation, which every (re-)registration renews) and the block's own
//! token ids. The `HashMap` hashes the key and, on a hash match, compares it in full, so a hit is
//! an exact match of every token id of the whole prefix under the same weights: a hash collision
//! costs a probe, never a wrong block. Serials are never reused, so a link to an evicted parent
//! can never match a newer block that took over its id.
//!
//! Blocks are reference counted. A cached block nobody holds stays (its bytes still charged to
//! the memory budget) on an LRU list until memory is needed; a sequence gives its blocks back
//! last block first, so the tail of a chain is evicted before the prefix other chains share.

use std::collections::{BTreeSet, HashMap};

/// The weights that computed a block's K/V: 0 for the base model, else the adapter lease's
/// generation.
pub type WeightsId = u64;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Link {
    parent: u64,
    weights: WeightsId,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Entry {
    link: Link,
    serial: u64,
    /// Sequences holding the block.
    refs: u32,
    /// When the last reference ended (the key of `idle`), while `refs == 0`.
    idle_since: u64,
}

/// How far a sequence's blocks are registered in the cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// Leading full blocks already looked up or registered.
    pub blocks: usize,
    /// Serial of the cache entry for the last of them (0: none yet).
    pub parent: u64,
}

#[derive(Debug)]
pub struct PrefixCache {
    block_size: usize,
    by_link: HashMap<Link, u32>,
    entries: HashMap<u32, Entry>,
    /// Unreferenced cached blocks, `(idle_since, block)`: the first is evicted first.
    idle: BTreeSet<(u64, u32)>,
    next_serial: u64,
    clock: u64,
}

impl PrefixCache {
    pub fn new(block_size: usize) -> Self {
        PrefixCache {
            block_size,
            by_link: HashMap::new(),
            entries: HashMap::new(),
            idle: BTreeSet::new(),
            next_serial: 1,
            clock: 0,
        }
    }

    /// Blocks in the cache (held or idle).
    pub fn cached_blocks(&self) -> usize {
        self.entries.len()
    }

    /// Cached blocks nobody holds: what [`Self::evict`] can free.
    pub fn idle_blocks(&self) -> usize {
        self.idle.len()
    }

    /// The longest cached chain of full blocks starting `tokens` under `weights`, each taken
    /// with a reference. It never covers the last token: that one is always computed, for the
    /// logits, into a block of the sequence's own (a prompt that ends on a block boundary
    /// recomputes its whole last block), so no sequence ever writes into a shared block.
    pub fn lookup(&mut self, weights: WeightsId, tokens: &[u32]) -> (Vec<u32>, Chain) {
        let bs = self.block_size;
        let mut chain = Chain::default();
        let mut blocks = Vec::new();
        let cacheable = tokens.len().saturating_sub(1) / bs;
        for full in tokens.chunks_exact(bs).take(cacheable) {
            let link = Link {
                parent: chain.parent,
                weights,
                tokens: full.into(),
            };
            let Some(&block) = self.by_link.get(&link) else { break };
            let Some(e) = self.entries.get_mut(&block) else { break };
            if e.refs == 0 {
                self.idle.remove(&(e.idle_since, block));
            }
            e.refs += 1;
            chain = Chain {
                blocks: chain.blocks + 1,
                parent: e.serial,
            };
            blocks.push(block);
        }
        (blocks, chain)
    }

    /// Registers the blocks of `table` that `computed` tokens have filled since `chain`. A block
    /// whose link is already cached (another sequence computed the same prefix at the same
    /// time) stays the sequence's own; the chain continues from the cached one.
    pub fn register(&mut self, weights: WeightsId, tokens: &[u32], table: &[u32], computed: usize, chain: &mut Chain) {
        let bs = self.block_size;
        while chain.blocks < computed / bs {
            let j = chain.blocks;
            let link = Link {
                parent: chain.parent,
                weights,
                tokens: tokens[j * bs..(j + 1) * bs].into(),
            };
            let serial = match self.by_link.get(&link) {
                Some(existing) => self.entries.get(existing).map_or(0, |e| e.serial),
                None => {
                    let serial = self.next_serial;
                    self.next_serial += 1;
                    self.by_link.insert(link.clone(), table[j]);
                    self.entries.insert(
                        table[j],
                        Entry {
                            link,
                            serial,
                            refs: 1,
                            idle_since: 0,
                        },
                    );
                    serial
                }
            };
            *chain = Chain {
                blocks: j + 1,
                parent: serial,
            };
        }
    }

    /// Drops a sequence's reference to `block`. True when the block is not cached: the caller
    /// frees it. A cached block stays, idle once its last reference is gone.
    pub fn release(&mut self, block: u32) -> bool {
        let Some(e) = self.entries.get_mut(&block) else {
            return true;
        };
        debug_assert!(e.refs > 0, "block {block} released more often than taken");
        e.refs = e.refs.saturating_sub(1);
        if e.refs == 0 {
            self.clock += 1;
            e.idle_since = self.clock;
            self.idle.insert((self.clock, block));
        }
        false
    }

    /// Removes the least recently used idle block from the cache and returns it (to be freed).
    pub fn evict(&mut self) -> Option<u32> {
        let (_, block) = self.idle.pop_first()?;
        if let Some(e) = self.entries.remove(&block) {
            self.by_link.remove(&e.link);
        }
        Some(block)
    }

    /// References on `block`, `None` when it is not cached.
    pub fn refs(&self, block: u32) -> Option<u32> {
        self.entries.get(&block).map(|e| e.refs)
    }

    /// References held on cached blocks, summed (0 when no sequence holds any).
    pub fn references(&self) -> u64 {
        self.entries.values().map(|e| u64::from(e.refs)).sum()
    }

    /// Checks the cache's invariants (tests, debug builds): every link maps to its entry, and a
    /// block is idle exactly when nobody holds it. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        if self.by_link.len() != self.entries.len() {
            return Err(format!(
                "{} links for {} entries",
                self.by_link.len(),
                self.entries.len()
            ));
        }
        for (link, block) in &self.by_link {
            match self.entries.get(block) {
                Some(e) if e.link == *link => {}
                _ => return Err(format!("link to block {block} has no matching entry")),
            }
        }
        for (&block, e) in &self.entries {
            let idle = self.idle.contains(&(e.idle_since, block));
            if idle != (e.refs == 0) {
                return Err(format!("block {block}: {} references, idle {idle}", e.refs));
            }
        }
        if self.idle.len() != self.entries.values().filter(|e| e.refs == 0).count() {
            return Err("idle list holds blocks that are not cached".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_is_found_only_under_the_same_weights_and_never_covers_the_last_token() {
        let mut c = PrefixCache::new(2);
        let tokens = [1, 2, 3, 4, 5];
        assert_eq!(c.lookup(7, &tokens).0, Vec::<u32>::new());
        let mut chain = Chain::default();
        c.register(7, &tokens, &[10, 11, 12], 5, &mut chain);
        assert_eq!(chain.blocks, 2);
        assert_eq!(c.lookup(7, &tokens).0, vec![10, 11]);
        assert_eq!(c.lookup(8, &tokens).0, Vec::<u32>::new(), "other weights");
        assert_eq!(c.lookup(7, &[1, 2, 3, 4]).0, vec![10], "the last token is recomputed");
        assert_eq!(c.lookup(7, &[1, 2, 9, 4, 5]).0, vec![10], "diverges in block 2");
        assert_eq!(c.lookup(7, &[9, 2, 3, 4, 5]).0, Vec::<u32>::new());
        c.check().unwrap();
    }

    #[test]
    fn idle_blocks_are_evicted_tail_first_and_held_ones_never() {
        let mut c = PrefixCache::new(1);
        let mut chain = Chain::default();
        c.register(0, &[1, 2, 3], &[5, 6, 7], 3, &mut chain);
        assert!(!c.release(7) && !c.release(6));
        assert!(c.release(99), "an uncached block is the caller's to free");
        assert_eq!(c.evict(), Some(7), "the tail goes first");
        assert_eq!(c.evict(), Some(6));
        assert_eq!(c.evict(), None, "block 5 is still held");
        assert_eq!(c.references(), 1);
        c.release(5);
        assert_eq!(c.evict(), Some(5));
        assert_eq!((c.cached_blocks(), c.references()), (0, 0));
        c.check().unwrap();
    }
}

//! The device tier: leases, uploads into the page pool under the shared budget, eviction of
//! idle adapters, and retired copies waiting for their last lease to end.

use std::sync::Arc;

use quiver_adapters::HostAdapter;
use quiver_model::LoraAdapter;
use quiver_tensor::Backend;

use super::{Acquire, AdapterManager, Device, Lease};
use crate::error::EngineError;
use crate::memory::MemoryBudget;

impl<B: Backend> AdapterManager<B> {
    /// Retired adapters still leased by requests, waiting for their pages to come back.
    pub(super) fn retire(&mut self, d: Device, budget: &mut MemoryBudget) {
        self.retired.push(d);
        self.reclaim(budget);
    }

    /// Frees the pages of retired adapters whose last lease has ended.
    pub fn reclaim(&mut self, budget: &mut MemoryBudget) {
        let mut i = 0;
        while i < self.retired.len() {
            if Arc::strong_count(&self.retired[i].adapter) == 1 {
                let d = self.retired.swap_remove(i);
                budget.give_adapter(d.bytes);
                if let Ok(a) = Arc::try_unwrap(d.adapter) {
                    a.release(&mut self.pages);
                }
            } else {
                i += 1;
            }
        }
    }

    /// A lease on `name` in device memory, uploading (and evicting idle adapters) as needed.
    pub fn acquire(&mut self, name: &str, budget: &mut MemoryBudget) -> Acquire {
        self.clock += 1;
        let Some(reg) = self.registry.get_mut(name) else {
            return Acquire::Failed(EngineError::UnknownAdapter(name.into()));
        };
        if let Some(reason) = reg.failed.take() {
            // Report once; a later request retries the load.
            return Acquire::Failed(EngineError::AdapterLoad {
                name: name.into(),
                reason,
            });
        }
        let generation = reg.generation;
        if let Some(d) = self.device.get_mut(name) {
            d.last_used = self.clock;
            self.stats.device_hits += 1;
            return Acquire::Ready(Lease {
                adapter: d.adapter.clone(),
                generation: d.generation,
            });
        }
        let Some(pos) = self.host.iter().position(|(n, _)| n == name) else {
            // No load from here: admission asks for every waiting request's adapter, and loading
            // them all would evict from the host tier what the head of the queue needs next. The
            // scheduler prefetches the head of the queue ([`Self::prefetch`]).
            return Acquire::Pending;
        };
        // Most recently used goes last (the host tier evicts from the front).
        let entry = self.host.remove(pos);
        let host = entry.1.clone();
        self.host.push(entry);
        let bytes = self.device_bytes(&host);
        if bytes > budget.total() {
            return Acquire::Failed(EngineError::AdapterLoad {
                name: name.into(),
                reason: format!(
                    "needs {bytes} B of device memory, more than the whole budget ({} B)",
                    budget.total()
                ),
            });
        }
        if !self.make_room(bytes, budget) {
            return Acquire::Pending;
        }
        match LoraAdapter::upload(
            name,
            &host.modules,
            &self.cfg,
            &self.backend,
            &mut self.pool,
            &mut self.pages,
        ) {
            Ok(a) => {
                // The device copy serves from now on: its host copy goes first when the host tier
                // needs room, before adapters that queued requests are still waiting for.
                if let Some(pos) = self.host.iter().position(|(n, _)| n == name) {
                    let entry = self.host.remove(pos);
                    self.host.insert(0, entry);
                }
                budget.take_adapter(bytes);
                self.stats.uploads += 1;
                self.stats.host_hits += 1;
                let adapter = Arc::new(a);
                self.device.insert(
                    name.into(),
                    Device {
                        adapter: adapter.clone(),
                        bytes,
                        last_used: self.clock,
                        generation,
                    },
                );
                Acquire::Ready(Lease { adapter, generation })
            }
            Err(e) => Acquire::Failed(EngineError::AdapterLoad {
                name: name.into(),
                reason: e.to_string(),
            }),
        }
    }

    /// Evicts idle, unpinned device adapters (least recently used first) until `bytes` fit.
    pub(super) fn make_room(&mut self, bytes: usize, budget: &mut MemoryBudget) -> bool {
        self.reclaim(budget);
        while budget.free() < bytes {
            let victim = self
                .device
                .iter()
                .filter(|(n, d)| Arc::strong_count(&d.adapter) == 1 && !self.registry.get(*n).is_some_and(|r| r.pinned))
                .min_by_key(|(_, d)| d.last_used)
                .map(|(n, _)| n.clone());
            let Some(victim) = victim else { return false };
            if let Some(d) = self.device.remove(&victim) {
                self.stats.device_evictions += 1;
                self.retire(d, budget);
            }
        }
        true
    }

    /// Bytes an upload of `name` needs: `Some` when its host copy is ready and no device copy
    /// exists (an acquire that returned `Pending` then waits for memory, not for a load).
    pub fn upload_bytes(&self, name: &str) -> Option<usize> {
        if self.device.contains_key(name) {
            return None;
        }
        let (_, host) = self.host.iter().find(|(n, _)| n == name)?;
        Some(self.device_bytes(host))
    }

    /// Budget bytes of `host`'s pages once uploaded.
    pub(super) fn device_bytes(&self, host: &HostAdapter) -> usize {
        let pages: usize = (host.modules.iter())
            .map(|m| {
                let (i, o) = m.kind.dims(&self.cfg);
                m.rank * (i + o) / self.pages.block_size()
            })
            .sum();
        pages * self.page_bytes
    }

    /// Frees device memory for KV blocks by evicting idle adapters; true if `bytes` now fit.
    pub fn yield_memory(&mut self, bytes: usize, budget: &mut MemoryBudget) -> bool {
        self.make_room(bytes, budget)
    }
}

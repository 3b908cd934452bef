//! The scheduler's answers to commands (adapter registry, stats) and its test-only checks.

use quiver_tensor::Backend;

use super::Scheduler;
use crate::request::{Command, EngineStats};

impl<B: Backend> Scheduler<B> {
    pub fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { request, events } => self.submit(request, events),
            Command::RegisterAdapter {
                name,
                path,
                pinned,
                preloaded,
                reply,
            } => {
                let mut r = (self.adapters).register(&name, path.clone(), pinned, preloaded.clone(), &mut self.budget);
                if r.is_err() && pinned && self.mem.cached_blocks().1 > 0 {
                    // A pinned upload may need the memory idle cached blocks hold.
                    self.mem.evict_idle(&mut self.budget);
                    r = self.adapters.register(&name, path, pinned, preloaded, &mut self.budget);
                }
                let _ = reply.send(r);
            }
            Command::UnregisterAdapter { name, reply } => {
                let _ = reply.send(self.adapters.unregister(&name, &mut self.budget));
            }
            Command::UnregisterIdleAdapter { candidates, reply } => {
                let in_use: std::collections::HashSet<&str> =
                    (self.running.iter().filter_map(|s| s.adapter.as_deref()))
                        .chain(self.waiting.iter().filter_map(|(k, _)| k.as_deref()))
                        .collect();
                let _ = reply.send(
                    self.adapters
                        .unregister_first_idle(&candidates, &in_use, &mut self.budget),
                );
            }
            Command::PinAdapter { name, pinned, reply } => {
                let mut r = self.adapters.set_pinned(&name, pinned, &mut self.budget);
                if r.is_err() && self.mem.cached_blocks().1 > 0 {
                    self.mem.evict_idle(&mut self.budget);
                    r = self.adapters.set_pinned(&name, pinned, &mut self.budget);
                }
                let _ = reply.send(r);
            }
            Command::Adapters { reply } => {
                let _ = reply.send(self.adapters.info());
            }
            Command::Stats { reply } => {
                // Counters of unregistered adapters go: adapter churn must not grow them forever.
                let adapters = &self.adapters;
                (self.stats.requests.per_adapter).retain(|name, _| name.is_empty() || adapters.is_registered(name));
                let _ = reply.send(self.stats());
            }
        }
    }

    /// The KV bookkeeping's invariants, for tests: see [`KvMemory::check`].
    pub fn check_kv(&self) -> Result<(), String> {
        let tables = self.running.iter().map(|s| s.cache.block_table.as_slice());
        self.mem.check(&self.budget, tables)
    }

    pub fn stats(&self) -> EngineStats {
        let mut running: Vec<String> = self.running.iter().filter_map(|s| s.adapter.clone()).collect();
        running.sort();
        running.dedup();
        let mut waiting: Vec<String> = self.waiting.iter().filter_map(|(k, _)| k.clone()).collect();
        waiting.sort();
        waiting.dedup();
        EngineStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            // Held by sequences: idle cached blocks count as free (vLLM's KV cache usage).
            kv_blocks_used: self.mem.used_blocks() - self.mem.cached_blocks().1,
            kv_blocks_total: self.mem.total_blocks(),
            prefix_cache_queries: self.mem.prefix_stats().queries,
            prefix_cache_hits: self.mem.prefix_stats().hits,
            prefix_cache_bytes: self.mem.cached_blocks().0 * self.mem.block_bytes(),
            prefix_cache_idle_bytes: self.mem.cached_blocks().1 * self.mem.block_bytes(),
            memory_budget: self.budget.total(),
            kv_bytes: self.budget.kv_bytes(),
            adapter_bytes: self.budget.adapter_bytes(),
            adapter_pages_used: self.adapters.pages_in_use(),
            resident_bytes: self.mem.touched_bytes() + self.adapters.touched_bytes(),
            running_adapters: running,
            waiting_adapters: waiting,
            adapters: self.adapters.stats,
            ..self.stats.clone()
        }
    }
}

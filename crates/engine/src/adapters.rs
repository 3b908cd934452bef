//! Adapters in three tiers: registered (a name and a directory on disk), host (loaded and
//! validated, LRU under a byte budget, copies the device also holds evicted first) and device
//! (uploaded into the page pool the kernels read, under the shared memory budget). Loading runs
//! on its own thread; the scheduler polls for results and never blocks on I/O. A device adapter
//! is immutable and held by `Arc`: a running request's clone is its lease, and only adapters
//! nobody leases (and not pinned) are evicted.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use quiver_adapters::{load_peft_adapter_with, HostAdapter, LoadLimits};
use quiver_model::{BlockAllocator, LoraAdapter, ModelConfig};
use quiver_tensor::Backend;

use crate::error::EngineError;
use crate::memory::MemoryBudget;

mod device_tier;

/// Where an adapter currently lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Disk,
    Loading,
    Host,
    Device,
}

#[derive(Debug, Clone)]
pub struct AdapterInfo {
    pub name: String,
    pub path: PathBuf,
    pub tier: Tier,
    pub pinned: bool,
    pub rank: usize,
    pub bytes: usize,
    /// Requests holding a lease right now.
    pub in_flight: usize,
}

/// Counters for the metrics endpoint.
#[derive(Debug, Default, Clone, Copy)]
pub struct AdapterStats {
    pub loads: u64,
    pub load_failures: u64,
    pub uploads: u64,
    pub device_hits: u64,
    pub host_hits: u64,
    pub device_evictions: u64,
    pub host_evictions: u64,
}

/// A running request's hold on a device adapter, with the identity of the weights it holds.
#[derive(Debug, Clone)]
pub struct Lease {
    pub adapter: Arc<LoraAdapter>,
    /// The registration these weights were loaded under: unique across the manager's life and
    /// bumped by every (re-)registration, so a reloaded adapter has a new one. Never 0 (the
    /// prefix cache's identity of the base model).
    pub generation: u64,
}

pub enum Acquire {
    Ready(Lease),
    /// Being loaded or waiting for device memory; ask again next step.
    Pending,
    Failed(EngineError),
}

struct Registered {
    path: PathBuf,
    pinned: bool,
    /// Bumped on re-registration so a stale load result is dropped.
    generation: u64,
    failed: Option<String>,
}

struct Device {
    adapter: Arc<LoraAdapter>,
    bytes: usize,
    last_used: u64,
    generation: u64,
}

type LoadResult = (String, u64, Result<HostAdapter, String>);

pub struct AdapterManager<B: Backend> {
    backend: B,
    cfg: ModelConfig,
    registry: HashMap<String, Registered>,
    /// Host tier, least recently used first.
    host: Vec<(String, Arc<HostAdapter>)>,
    host_budget: usize,
    device: HashMap<String, Device>,
    /// Unregistered or replaced device adapters still leased by running requests.
    retired: Vec<Device>,
    loading: HashSet<String>,
    /// Bytes of the largest adapter loaded so far: sizes the prefetch window.
    largest_host: usize,
    pages: BlockAllocator,
    pool: B::PagePool,
    page_bytes: usize,
    max_rank: usize,
    clock: u64,
    generation: u64,
    /// Budget bytes pinned adapters must leave to KV blocks: one sequence of `max_model_len`.
    kv_floor: usize,
    jobs: Sender<(String, u64, PathBuf)>,
    results: Receiver<LoadResult>,
    pub stats: AdapterStats,
}

impl<B: Backend> AdapterManager<B> {
    /// `pool` holds `pages` (its page count); host memory for loaded adapters is capped at
    /// `host_budget` bytes; adapters above `max_rank` are refused.
    pub fn new(
        backend: B,
        cfg: ModelConfig,
        pool: B::PagePool,
        pages: BlockAllocator,
        page_bytes: usize,
        host_budget: usize,
        max_rank: usize,
    ) -> Self {
        let (jobs, job_rx) = channel::<(String, u64, PathBuf)>();
        let (result_tx, results) = channel();
        let loader_cfg = cfg.clone();
        let limits = LoadLimits {
            max_rank: Some(max_rank),
        };
        // File I/O, parsing and validation stay off the scheduler thread.
        std::thread::Builder::new()
            .name("quiver-adapter-loader".into())
            .spawn(move || {
                for (name, generation, path) in job_rx {
                    let r = load_peft_adapter_with(&name, &path, &loader_cfg, limits).map_err(|e| e.to_string());
                    if result_tx.send((name, generation, r)).is_err() {
                        break;
                    }
                }
            })
            .ok();
        AdapterManager {
            backend,
            cfg,
            registry: HashMap::new(),
            host: Vec::new(),
            host_budget,
            largest_host: 0,
            device: HashMap::new(),
            retired: Vec::new(),
            loading: HashSet::new(),
            pages,
            pool,
            page_bytes,
            max_rank,
            clock: 0,
            generation: 0,
            kv_floor: 0,
            jobs,
            results,
            stats: AdapterStats::default(),
        }
    }

    /// Pinning never takes the budget below `bytes` for KV blocks (one full-length sequence).
    pub fn keep_for_kv(&mut self, bytes: usize) {
        self.kv_floor = bytes;
    }

    fn pinned_bytes(&self) -> usize {
        let pinned = |n: &String| self.registry.get(n).is_some_and(|r| r.pinned);
        self.device
            .iter()
            .filter(|(n, _)| pinned(n))
            .map(|(_, d)| d.bytes)
            .sum()
    }

    /// Bytes of the pages whose memory may be resident (in use, or released but not trimmed).
    pub fn touched_bytes(&self) -> usize {
        self.pages.touched() * self.page_bytes
    }

    /// Returns the memory of up to `bytes` (rounded up to pages) of released pages to the OS.
    pub fn trim(&mut self, bytes: usize) -> Result<(), EngineError> {
        let pages = self.pages.trim(bytes.div_ceil(self.page_bytes));
        (self.backend)
            .release_pages(&mut self.pool, &pages)
            .map_err(|e| EngineError::Model(e.to_string()))
    }

    pub fn pool(&self) -> &B::PagePool {
        &self.pool
    }

    /// Makes `name` known; `preloaded` (already validated) goes straight into the host tier. A
    /// pinned adapter is uploaded at once; one that does not fit is not registered.
    pub fn register(
        &mut self,
        name: &str,
        path: PathBuf,
        pinned: bool,
        preloaded: Option<Arc<HostAdapter>>,
        budget: &mut MemoryBudget,
    ) -> Result<(), EngineError> {
        if self.registry.contains_key(name) {
            return Err(EngineError::AdapterExists(name.into()));
        }
        if let Some(reason) = preloaded.as_ref().and_then(|h| self.rank_refusal(h)) {
            return Err(EngineError::AdapterLoad {
                name: name.into(),
                reason,
            });
        }
        self.generation += 1;
        self.registry.insert(
            name.into(),
            Registered {
                path,
                pinned,
                generation: self.generation,
                failed: None,
            },
        );
        if let Some(host) = preloaded {
            self.insert_host(name.to_string(), host);
        }
        if pinned {
            if let Err(e) = self.make_resident(name, budget) {
                let _ = self.unregister(name, budget);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Forgets `name`. Running requests keep their lease; its pages return when the last ends.
    pub fn unregister(&mut self, name: &str, budget: &mut MemoryBudget) -> Result<(), EngineError> {
        self.registry
            .remove(name)
            .ok_or_else(|| EngineError::UnknownAdapter(name.into()))?;
        self.host.retain(|(n, _)| n != name);
        self.loading.remove(name);
        if let Some(d) = self.device.remove(name) {
            self.retire(d, budget);
        }
        Ok(())
    }

    /// Unregisters the first of `candidates` (in the caller's order, e.g. least recently used
    /// first) that is registered, unpinned, not in `in_use` (the adapters of running and waiting
    /// sequences) and leased by nobody; returns its name, or `None` when every one is busy.
    pub fn unregister_first_idle(
        &mut self,
        candidates: &[String],
        in_use: &HashSet<&str>,
        budget: &mut MemoryBudget,
    ) -> Option<String> {
        let victim = candidates.iter().find(|name| {
            self.registry.get(name.as_str()).is_some_and(|r| !r.pinned)
                && !in_use.contains(name.as_str())
                && self
                    .device
                    .get(name.as_str())
                    .is_none_or(|d| Arc::strong_count(&d.adapter) == 1)
        })?;
        let victim = victim.clone();
        self.unregister(&victim, budget).ok()?;
        Some(victim)
    }

    /// Pins (uploading now if loaded; refused, and left unpinned, if it does not fit) or unpins.
    pub fn set_pinned(&mut self, name: &str, pinned: bool, budget: &mut MemoryBudget) -> Result<(), EngineError> {
        let r = self
            .registry
            .get_mut(name)
            .ok_or_else(|| EngineError::UnknownAdapter(name.into()))?;
        r.pinned = pinned;
        if pinned {
            if let Err(e) = self.make_resident(name, budget) {
                if let Some(r) = self.registry.get_mut(name) {
                    r.pinned = false;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    pub fn is_registered(&self, name: &str) -> bool {
        self.registry.contains_key(name)
    }

    /// The one rank check: adapters above `--max-lora-rank` are refused, however they arrive.
    fn rank_refusal(&self, host: &HostAdapter) -> Option<String> {
        (host.max_rank() > self.max_rank)
            .then(|| format!("rank {} exceeds --max-lora-rank {}", host.max_rank(), self.max_rank))
    }

    /// Collects finished loads into the host tier. Call once per scheduler step.
    pub fn poll(&mut self) {
        while let Ok((name, generation, result)) = self.results.try_recv() {
            self.loading.remove(&name);
            if self.registry.get(&name).is_none_or(|r| r.generation != generation) {
                continue;
            }
            let result = result.and_then(|host| match self.rank_refusal(&host) {
                Some(reason) => Err(reason),
                None => Ok(host),
            });
            let Some(reg) = self.registry.get_mut(&name) else {
                continue;
            };
            match result {
                Ok(host) => {
                    self.stats.loads += 1;
                    reg.failed = None;
                    self.insert_host(name, Arc::new(host));
                }
                Err(reason) => {
                    self.stats.load_failures += 1;
                    reg.failed = Some(reason);
                }
            }
        }
    }

    /// How many adapters the host tier holds, judging by the largest loaded so far (one until
    /// the first load tells the size).
    pub fn host_capacity(&self) -> usize {
        self.host_budget.checked_div(self.largest_host).map_or(1, |n| n.max(1))
    }

    fn insert_host(&mut self, name: String, host: Arc<HostAdapter>) {
        self.largest_host = self.largest_host.max(host.bytes());
        self.host.retain(|(n, _)| *n != name);
        self.host.push((name, host));
        // Evict least recently used host copies over budget: never the one just loaded, never a
        // pinned one (pinned adapters may hold the host tier above its budget).
        while self.host.iter().map(|(_, h)| h.bytes()).sum::<usize>() > self.host_budget {
            let registry = &self.registry;
            let unpinned = |(n, _): &(String, Arc<HostAdapter>)| registry.get(n).is_none_or(|r| !r.pinned);
            let Some(victim) = self.host[..self.host.len() - 1].iter().position(unpinned) else {
                break;
            };
            self.host.remove(victim);
            self.stats.host_evictions += 1;
        }
    }

    /// Uploads a pinned adapter now, so that its pages are charged to the budget from the start
    /// and are never evicted.
    fn make_resident(&mut self, name: &str, budget: &mut MemoryBudget) -> Result<(), EngineError> {
        if !self.host.iter().any(|(n, _)| n == name) {
            // Not loaded yet: it becomes resident on first use and stays.
            self.prefetch(name);
            return Ok(());
        }
        let refused = |reason: String| EngineError::AdapterLoad {
            name: name.into(),
            reason,
        };
        let err = match self.acquire(name, budget) {
            Acquire::Ready(_) if self.pinned_bytes() + self.kv_floor <= budget.total() => return Ok(()),
            Acquire::Ready(_) => refused(format!(
                "pinned adapters would hold {} B of the {} B memory budget, leaving less than one \
                 sequence of max_model_len needs for its KV cache ({} B): raise --memory-budget-mb or \
                 pin fewer adapters",
                self.pinned_bytes(),
                budget.total(),
                self.kv_floor
            )),
            Acquire::Pending => refused(format!(
                "pinned, it must stay in device memory, but the memory budget ({} B, {} B free) is held by \
                 other pinned adapters and running requests: raise --memory-budget-mb or pin fewer adapters",
                budget.total(),
                budget.free()
            )),
            Acquire::Failed(e) => e,
        };
        Err(err)
    }

    /// Starts loading `name` into the host tier if it is registered and not yet there.
    pub fn prefetch(&mut self, name: &str) {
        if self.device.contains_key(name) || self.loading.contains(name) || self.host.iter().any(|(n, _)| n == name) {
            return;
        }
        if let Some(reg) = self.registry.get(name).filter(|r| r.failed.is_none()) {
            if self
                .jobs
                .send((name.to_string(), reg.generation, reg.path.clone()))
                .is_ok()
            {
                self.loading.insert(name.to_string());
            }
        }
    }

    pub fn info(&self) -> Vec<AdapterInfo> {
        let mut out: Vec<AdapterInfo> = self
            .registry
            .iter()
            .map(|(name, r)| {
                let host = self.host.iter().find(|(n, _)| n == name).map(|(_, h)| h.clone());
                let (tier, in_flight) = match self.device.get(name) {
                    Some(d) => (Tier::Device, Arc::strong_count(&d.adapter) - 1),
                    None if host.is_some() => (Tier::Host, 0),
                    None if self.loading.contains(name) => (Tier::Loading, 0),
                    None => (Tier::Disk, 0),
                };
                AdapterInfo {
                    name: name.clone(),
                    path: r.path.clone(),
                    tier,
                    pinned: r.pinned,
                    rank: host.as_ref().map_or(0, |h| h.max_rank()),
                    bytes: host.as_ref().map_or(0, |h| h.bytes()),
                    in_flight,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Pages currently allocated (device tier plus retired-but-leased).
    pub fn pages_in_use(&self) -> usize {
        self.pages.total() - self.pages.num_free()
    }
}

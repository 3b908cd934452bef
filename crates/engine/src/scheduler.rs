//! The scheduler: an OS thread that owns every piece of batch state (queue, running sequences,
//! KV blocks, the memory budget, the adapter manager) and runs one ragged batch per step:
//! decode tokens of running sequences first, then prefill chunks of new ones, all under a token
//! budget (chunked prefill). When KV memory runs out the newest sequence is preempted and later
//! recomputed; every block and lease comes back when a sequence ends, however it ends.

use std::collections::HashSet;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use quiver_model::{lora_page_size, BatchBuilder, BlockAllocator, Llama, Tokenizer};
use quiver_tensor::Backend;
use tokio::sync::mpsc::UnboundedSender;

use crate::adapters::{Acquire, AdapterManager};
use crate::error::EngineError;
use crate::kv_memory::KvMemory;
use crate::memory::MemoryBudget;
use crate::queue::FairQueue;
use crate::request::{Command, EngineStats, Event};
use crate::sampling::Sampler;
use crate::sequence::{Outcome, Sequence};
use crate::validation::{Limits, ValidRequest, MAX_N};
use crate::EngineConfig;

mod commands;

pub struct Scheduler<B: Backend> {
    model: Llama<B>,
    /// Detokenizes for the output stage; without it deltas carry tokens only.
    tokenizer: Option<Arc<Tokenizer>>,
    cfg: EngineConfig,
    eos: Vec<u32>,
    kv: B::KvPool,
    mem: KvMemory,
    budget: MemoryBudget,
    adapters: AdapterManager<B>,
    waiting: FairQueue<Sequence>,
    running: Vec<Sequence>,
    next_id: u64,
    next_request_id: u64,
    /// Mixed into the seed of requests that bring none, so unseeded output differs across runs.
    seed_base: u64,
    stats: EngineStats,
}

impl<B: Backend> Scheduler<B> {
    /// Sizes the KV cache and the adapter page pool from one memory budget. Both pools can hold
    /// the whole budget; the budget itself decides the split at run time (untouched pages of
    /// these zeroed buffers cost no physical memory).
    pub fn build(
        model: Llama<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        eos: Vec<u32>,
        cfg: EngineConfig,
    ) -> Result<Self, EngineError> {
        let merr = |e: quiver_model::ModelError| EngineError::Model(e.to_string());
        let block_bytes = model.kv_layout(1, cfg.block_size).bytes_per_block();
        let num_blocks = cfg.memory_budget / block_bytes;
        if num_blocks == 0 {
            return Err(EngineError::Invalid(format!(
                "memory budget {} B holds no KV block of {block_bytes} B",
                cfg.memory_budget
            )));
        }
        let page = lora_page_size(&model.cfg);
        let page_bytes = page * cfg.adapter_dtype.size();
        let num_pages = cfg.memory_budget / page_bytes;
        let kv = model.new_kv_pool(num_blocks, cfg.block_size).map_err(merr)?;
        let pool = model
            .backend
            .new_page_pool(page, num_pages, cfg.adapter_dtype)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let mut adapters = AdapterManager::new(
            model.backend.clone(),
            model.cfg.clone(),
            pool,
            BlockAllocator::new(num_pages, page),
            page_bytes,
            cfg.host_adapter_budget,
            cfg.max_lora_rank,
        );
        adapters.keep_for_kv(cfg.max_model_len.div_ceil(cfg.block_size) * block_bytes);
        let blocks = BlockAllocator::new(num_blocks, cfg.block_size);
        Ok(Self::new(model, tokenizer, eos, cfg, adapters, kv, blocks, block_bytes))
    }

    /// What requests are validated against: the model, and the longest sequence the KV budget
    /// holds.
    pub fn limits(&self) -> Limits {
        let blocks = self
            .mem
            .total_blocks()
            .min(self.budget.total() / self.mem.block_bytes());
        Limits {
            max_model_len: self.cfg.max_model_len,
            vocab_size: self.model.cfg.vocab_size,
            max_kv_tokens: blocks * self.cfg.block_size,
            has_tokenizer: self.tokenizer.is_some(),
            max_request_prompt_tokens: self
                .cfg
                .max_request_prompt_tokens
                .unwrap_or(MAX_N.saturating_mul(self.cfg.max_model_len)),
        }
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        model: Llama<B>,
        tokenizer: Option<Arc<Tokenizer>>,
        eos: Vec<u32>,
        cfg: EngineConfig,
        adapters: AdapterManager<B>,
        kv: B::KvPool,
        blocks: BlockAllocator,
        block_bytes: usize,
    ) -> Self {
        let budget = MemoryBudget::new(cfg.memory_budget);
        Scheduler {
            model,
            tokenizer,
            waiting: FairQueue::new(cfg.policy),
            mem: KvMemory::new(
                blocks,
                block_bytes,
                cfg.enable_prefix_caching,
                cfg.evict_cached_blocks_first,
            ),
            cfg,
            eos,
            kv,
            budget,
            adapters,
            running: Vec::new(),
            next_id: 0,
            next_request_id: 0,
            seed_base: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed),
            stats: EngineStats::default(),
        }
    }

    /// Runs until every command sender is gone and no work is left.
    pub fn run(mut self, commands: Receiver<Command>) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle {
                match commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.running.is_empty() && self.waiting.is_empty() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            if let Err(e) = self.step() {
                self.fail_running(e);
            }
        }
    }

    /// Queues every choice of a validated request. An adapter unloaded since validation is the
    /// one thing that can still refuse it here.
    fn submit(&mut self, request: Arc<ValidRequest>, events: UnboundedSender<Event>) {
        let r = request.request();
        if let Some(name) = r.adapter.as_ref().filter(|n| !self.adapters.is_registered(n)) {
            let _ = events.send(Event::Error(EngineError::UnknownAdapter(name.clone())));
            return;
        }
        debug_assert!(r
            .prompts
            .iter()
            .all(|p| !p.is_empty() && p.len() < self.cfg.max_model_len));
        self.next_request_id += 1;
        let submitted = Instant::now();
        for index in 0..request.num_choices() {
            self.next_id += 1;
            let mut sampling = r.sampling.clone();
            // n > 1 with a seed: distinct but reproducible samples.
            sampling.seed = sampling.seed.map(|s| s.wrapping_add(index as u64));
            let seq = Sequence::new(
                self.next_id,
                self.next_request_id,
                index,
                request.clone(),
                Sampler::new(sampling, self.seed_base ^ self.next_id),
                self.tokenizer.is_some(),
                events.clone(),
                submitted,
            );
            // Start the load now only near the head of the queue; `step` prefetches the rest as
            // they move up. A load for a request far back could be evicted from the host tier
            // before the request is admitted, and then be loaded again.
            if let Some(name) = seq
                .adapter
                .as_deref()
                .filter(|_| self.waiting.len() < self.prefetch_window())
            {
                self.adapters.prefetch(name);
            }
            self.waiting.push_back(seq.adapter.clone(), seq);
        }
    }

    /// Waiting requests whose adapters load ahead of admission: `cfg.prefetch`, but no more than
    /// the host tier holds, or the loads would evict each other before use.
    fn prefetch_window(&self) -> usize {
        self.cfg.prefetch.min(self.adapters.host_capacity())
    }

    fn release(&mut self, mut seq: Sequence) {
        self.mem.release(&mut self.budget, &mut seq.cache);
        seq.lease = None;
        self.adapters.reclaim(&mut self.budget);
    }

    /// Sends the newest running sequence back to the queue; its cache is recomputed later.
    fn preempt_newest(&mut self) -> bool {
        let Some(i) = (0..self.running.len()).max_by_key(|&i| self.running[i].id) else {
            return false;
        };
        let mut seq = self.running.swap_remove(i);
        self.mem.release(&mut self.budget, &mut seq.cache);
        seq.forget_kv();
        self.stats.preemptions += 1;
        self.waiting.push_front(seq.adapter.clone(), seq);
        true
    }

    fn drop_cancelled(&mut self) {
        let cancelled = self.waiting.drain_where(|s| s.events.is_closed());
        let mut gone: Vec<Sequence> = cancelled;
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].events.is_closed() {
                gone.push(self.running.swap_remove(i));
            } else {
                i += 1;
            }
        }
        let mut requests: Vec<u64> = gone.iter().map(|s| s.request_id).collect();
        requests.sort_unstable();
        requests.dedup();
        self.stats.cancelled += requests.len() as u64;
        for seq in gone {
            seq.abort(&mut self.stats.requests);
            self.release(seq);
        }
    }

    /// One iteration: schedule, forward, sample, stream.
    pub fn step(&mut self) -> Result<(), EngineError> {
        self.adapters.poll();
        self.drop_cancelled();
        for name in self.waiting.upcoming_adapters(self.prefetch_window()) {
            self.adapters.prefetch(&name);
        }
        let mut token_budget = self.cfg.max_batch_tokens;
        // (sequence index in `running`, tokens fed this step) — running first, oldest first.
        let mut plan: Vec<(usize, usize)> = Vec::new();
        self.running.sort_by_key(|s| s.id);
        let mut i = 0;
        while i < self.running.len() && token_budget > 0 {
            let pending = self.running[i].tokens.len() - self.running[i].computed;
            let chunk = pending.min(token_budget);
            if self
                .mem
                .reserve(&mut self.budget, &mut self.adapters, &mut self.running[i].cache, chunk)
            {
                plan.push((i, chunk));
                token_budget -= chunk;
                i += 1;
            } else if self.running.len() > i + 1 {
                // Out of KV memory: the newest sequence gives its blocks back.
                self.preempt_newest();
            } else {
                self.preempt_newest();
                break;
            }
        }
        // Admit new sequences while budget remains, skipping any whose adapter is not ready, and
        // later choices of a prompt an earlier choice is still prefilling: they start once its
        // blocks are cached, so the prompt is computed once.
        let bs = self.cfg.block_size;
        let mut prefilling: HashSet<(u64, usize)> = (self.running.iter())
            .filter(|s| s.computed < s.prompt_len)
            .map(Sequence::prompt_key)
            .collect();
        while token_budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let (adapters, budget, mem) = (&mut self.adapters, &mut self.budget, &mut self.mem);
            let mut failed: Vec<(u64, EngineError)> = Vec::new();
            let next = self.waiting.pop_ready(|key, seq| {
                if mem.caching() && seq.computed == 0 && seq.prompt_len > bs && prefilling.contains(&seq.prompt_key()) {
                    return false;
                }
                match key {
                    None => true,
                    Some(_) if seq.lease.is_some() => true,
                    Some(name) => match acquire(adapters, mem, name, budget) {
                        Acquire::Ready(a) => {
                            seq.lease = Some(a);
                            true
                        }
                        Acquire::Pending => false,
                        Acquire::Failed(e) => {
                            failed.push((seq.id, e));
                            true
                        }
                    },
                }
            });
            let Some((_, mut seq)) = next else { break };
            if let Some((_, e)) = failed.into_iter().find(|(id, _)| *id == seq.id) {
                seq.fail(e, &mut self.stats.requests);
                self.release(seq);
                continue;
            }
            let looked_up = seq.computed == 0;
            if looked_up {
                seq.weights = seq.lease.as_ref().map_or(0, |l| l.generation);
                seq.chain = self.mem.lookup(seq.weights, &seq.tokens, &mut seq.cache);
                seq.computed = seq.cache.len;
            }
            let chunk = (seq.tokens.len() - seq.computed).min(token_budget);
            if !self
                .mem
                .reserve(&mut self.budget, &mut self.adapters, &mut seq.cache, chunk)
            {
                self.mem.release(&mut self.budget, &mut seq.cache);
                seq.forget_kv();
                self.waiting.push_front(seq.adapter.clone(), seq);
                break;
            }
            if looked_up {
                self.mem.count_lookup(seq.tokens.len(), seq.cache.len);
                seq.cached_tokens.get_or_insert(seq.cache.len);
            }
            prefilling.insert(seq.prompt_key());
            plan.push((self.running.len(), chunk));
            token_budget -= chunk;
            if seq.queue_time.is_none() {
                let waited = seq.submitted.elapsed();
                seq.queue_time = Some(waited);
                self.stats.requests.queue_time.observe(waited);
            }
            self.running.push(seq);
        }
        if plan.is_empty() {
            if !self.running.is_empty() || !self.waiting.is_empty() {
                // Waiting on adapter loads: don't spin.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            return Ok(());
        }
        self.return_memory()?;
        self.run_batch(&plan)
    }

    /// The budget bounds physical memory, not only what is in use: while the KV pool and the
    /// page pool together have touched more than the budget (free KV blocks after a burst of
    /// long sequences, free pages after adapter churn), the memory of released blocks, then of
    /// released pages, goes back to the OS. Runs before the batch writes any KV; costs nothing
    /// while both pools stay within the budget.
    fn return_memory(&mut self) -> Result<(), EngineError> {
        let over = |s: &Self| (s.mem.touched_bytes() + s.adapters.touched_bytes()).saturating_sub(s.budget.total());
        let excess = over(self);
        if excess == 0 {
            return Ok(());
        }
        let blocks = self.mem.trim(excess);
        (self.model.backend)
            .release_kv_blocks(&mut self.kv, &blocks)
            .map_err(|e| EngineError::Model(e.to_string()))?;
        let excess = over(self);
        if excess > 0 {
            self.adapters.trim(excess)?;
        }
        Ok(())
    }

    fn run_batch(&mut self, plan: &[(usize, usize)]) -> Result<(), EngineError> {
        let bs = self.cfg.block_size;
        let mut batch = BatchBuilder::new();
        let mut sampled_rows = Vec::new();
        for &(i, chunk) in plan {
            let seq = &mut self.running[i];
            let start = seq.computed;
            let wants_logits = start + chunk == seq.tokens.len();
            batch.push_with_adapter(
                &mut seq.cache,
                bs,
                &seq.tokens[start..start + chunk],
                wants_logits,
                seq.lease.as_ref().map(|l| &l.adapter),
            );
            seq.computed += chunk;
            if wants_logits {
                sampled_rows.push(i);
            }
        }
        let input = batch.finish();
        let logits = self
            .model
            .forward_with_adapters(&input, &mut self.kv, Some(self.adapters.pool()))
            .and_then(|t| Ok(self.model.backend.download(&t)?))
            .map_err(|e| EngineError::Model(e.to_string()))?;
        self.stats.steps += 1;
        for &(i, _) in plan {
            let seq = &mut self.running[i];
            (self.mem).register(seq.weights, &seq.tokens, &seq.cache, seq.computed, &mut seq.chain);
        }
        let vocab = self.model.cfg.vocab_size;
        let tokenizer = self.tokenizer.as_deref();
        let mut finished = Vec::new();
        for (row, &i) in sampled_rows.iter().enumerate() {
            let seq = &mut self.running[i];
            let (prompt, generated) = seq.tokens.split_at(seq.prompt_len);
            let outcome = match seq
                .sampler
                .sample(&logits[row * vocab..(row + 1) * vocab], prompt, generated)
            {
                Ok(sampled) => seq.emit(
                    sampled,
                    &self.eos,
                    self.cfg.max_model_len,
                    tokenizer,
                    &mut self.stats.requests,
                ),
                Err(e) => seq.fail(EngineError::Model(e.to_string()), &mut self.stats.requests),
            };
            if !matches!(outcome, Outcome::Running) {
                finished.push(i);
            }
        }
        finished.sort_unstable_by(|a, b| b.cmp(a));
        for i in finished {
            let seq = self.running.swap_remove(i);
            self.stats.finished += 1;
            self.release(seq);
        }
        Ok(())
    }

    fn fail_running(&mut self, e: EngineError) {
        tracing::error!(error = %e, "batch failed; failing its requests");
        for mut seq in std::mem::take(&mut self.running) {
            seq.fail(e.clone(), &mut self.stats.requests);
            self.release(seq);
        }
    }
}

/// A lease on `name`; when its upload waits for memory that only idle cached blocks hold (idle
/// adapters were evicted first), those blocks make room. In the other order they make room
/// before any adapter is evicted.
fn acquire<B: Backend>(
    adapters: &mut AdapterManager<B>,
    mem: &mut KvMemory,
    name: &str,
    budget: &mut MemoryBudget,
) -> Acquire {
    if mem.cached_blocks_first() {
        if let Some(bytes) = adapters.upload_bytes(name) {
            mem.make_room(bytes, budget);
        }
    }
    match adapters.acquire(name, budget) {
        Acquire::Pending => match adapters.upload_bytes(name) {
            Some(bytes) if mem.make_room(bytes, budget) => adapters.acquire(name, budget),
            _ => Acquire::Pending,
        },
        done => done,
    }
}

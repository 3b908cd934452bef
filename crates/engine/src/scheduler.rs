//! The scheduler: an OS thread that owns every piece of batch state (queue, running sequences,
//! KV blocks, the memory budget, the adapter manager) and runs one ragged batch per step:
//! decode tokens of running sequences first, then prefill chunks of new ones, all under a token
//! budget (chunked prefill). When KV memory runs out the newest sequence is preempted and later
//! recomputed; every block and lease comes back when a sequence ends, however it ends.

use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quiver_model::{lora_page_size, BatchBuilder, BlockAllocator, Llama, LoraAdapter, SequenceCache};
use quiver_tensor::Backend;
use tokio::sync::mpsc::UnboundedSender;

use crate::adapters::{Acquire, AdapterManager};
use crate::error::EngineError;
use crate::memory::MemoryBudget;
use crate::queue::{FairQueue, Key};
use crate::request::{Command, EngineStats, Event, FinishReason, GenerateRequest};
use crate::sampling::Sampler;
use crate::EngineConfig;

struct Sequence {
    id: u64,
    adapter: Key,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    computed: usize,
    cache: SequenceCache,
    lease: Option<Arc<LoraAdapter>>,
    sampler: Sampler,
    request: GenerateRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
    /// Set when the sequence first runs.
    queue_time: Option<Duration>,
}

impl Sequence {
    fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// KV memory: block free list plus the share of the memory budget it has taken.
struct KvMemory {
    blocks: BlockAllocator,
    block_bytes: usize,
}

impl KvMemory {
    /// Grows `cache` by `tokens` slots, charging the shared budget (evicting idle adapters if
    /// that makes room). On failure nothing changes.
    fn reserve<B: Backend>(
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
        if need > self.blocks.num_free() {
            return false;
        }
        // Take the bytes, or evict idle adapters to make room and take them then.
        let taken = budget.take_kv(bytes) || (adapters.yield_memory(bytes, budget) && budget.take_kv(bytes));
        if !taken {
            return false;
        }
        if cache.reserve(&mut self.blocks, tokens).is_err() {
            budget.give_kv(bytes);
            return false;
        }
        true
    }

    fn release(&mut self, budget: &mut MemoryBudget, cache: &mut SequenceCache) {
        budget.give_kv(cache.block_table.len() * self.block_bytes);
        cache.release(&mut self.blocks);
    }
}

pub struct Scheduler<B: Backend> {
    model: Llama<B>,
    cfg: EngineConfig,
    eos: Vec<u32>,
    kv: B::KvPool,
    mem: KvMemory,
    budget: MemoryBudget,
    adapters: AdapterManager<B>,
    waiting: FairQueue<Sequence>,
    running: Vec<Sequence>,
    next_id: u64,
    /// Mixed into the seed of requests that bring none, so unseeded output differs across runs.
    seed_base: u64,
    stats: EngineStats,
}

impl<B: Backend> Scheduler<B> {
    /// Sizes the KV cache and the adapter page pool from one memory budget. Both pools can hold
    /// the whole budget; the budget itself decides the split at run time (untouched pages of
    /// these zeroed buffers cost no physical memory).
    pub fn build(model: Llama<B>, eos: Vec<u32>, cfg: EngineConfig) -> Result<Self, EngineError> {
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
        let adapters = AdapterManager::new(
            model.backend.clone(),
            model.cfg.clone(),
            pool,
            BlockAllocator::new(num_pages, page),
            page_bytes,
            cfg.host_adapter_budget,
            cfg.max_lora_rank,
        );
        let blocks = BlockAllocator::new(num_blocks, cfg.block_size);
        Ok(Self::new(model, eos, cfg, adapters, kv, blocks, block_bytes))
    }

    /// Whether any request is queued or running.
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    fn new(
        model: Llama<B>,
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
            waiting: FairQueue::new(cfg.policy),
            cfg,
            eos,
            kv,
            mem: KvMemory { blocks, block_bytes },
            budget,
            adapters,
            running: Vec::new(),
            next_id: 0,
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
                let _ = reply.send(self.adapters.register(&name, path, pinned, preloaded));
            }
            Command::UnregisterAdapter { name, reply } => {
                let _ = reply.send(self.adapters.unregister(&name, &mut self.budget));
            }
            Command::PinAdapter { name, pinned, reply } => {
                let _ = reply.send(self.adapters.set_pinned(&name, pinned));
            }
            Command::Adapters { reply } => {
                let _ = reply.send(self.adapters.info());
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
        }
    }

    /// Admission control: reject up front what can never run.
    fn submit(&mut self, request: GenerateRequest, events: UnboundedSender<Event>) {
        let total = request.prompt.len() + request.max_tokens;
        let blocks_needed = total.div_ceil(self.cfg.block_size);
        let error = if request.prompt.is_empty() {
            Some(EngineError::Invalid("the prompt is empty".into()))
        } else if total > self.cfg.max_model_len {
            Some(EngineError::TooLarge(format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the maximum context length {}",
                request.prompt.len(),
                request.max_tokens,
                self.cfg.max_model_len
            )))
        } else if blocks_needed > self.mem.blocks.total() || blocks_needed * self.mem.block_bytes > self.budget.total()
        {
            Some(EngineError::TooLarge(format!(
                "{total} tokens need more KV memory than the whole budget"
            )))
        } else if let Some(bad) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.cfg.vocab_size)
        {
            Some(EngineError::Invalid(format!(
                "token id {bad} is outside the vocabulary"
            )))
        } else if let Some(name) = request.adapter.as_ref().filter(|n| !self.adapters.is_registered(n)) {
            Some(EngineError::UnknownAdapter(name.clone()))
        } else {
            request
                .sampling
                .validate()
                .err()
                .map(|e| EngineError::Invalid(e.to_string()))
        };
        if let Some(e) = error {
            let _ = events.send(Event::Error(e));
            return;
        }
        self.next_id += 1;
        let seq = Sequence {
            id: self.next_id,
            adapter: request.adapter.clone(),
            tokens: request.prompt.clone(),
            prompt_len: request.prompt.len(),
            computed: 0,
            cache: SequenceCache::default(),
            lease: None,
            sampler: Sampler::new(request.sampling.clone(), self.seed_base ^ self.next_id),
            request,
            events,
            submitted: Instant::now(),
            queue_time: None,
        };
        // Start the load now only near the head of the queue; `step` prefetches the rest as they
        // move up. A load for a request far back could be evicted from the host tier before the
        // request is admitted, and then be loaded again.
        if let Some(name) = seq
            .adapter
            .as_deref()
            .filter(|_| self.waiting.len() < self.prefetch_window())
        {
            self.adapters.prefetch(name);
        }
        self.waiting.push_back(seq.adapter.clone(), seq);
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
        seq.computed = 0;
        seq.lease = None;
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
        for seq in gone {
            self.stats.cancelled += 1;
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
        // Admit new sequences while budget remains, skipping any whose adapter is not ready.
        while token_budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let (adapters, budget) = (&mut self.adapters, &mut self.budget);
            let mut failed: Vec<(u64, EngineError)> = Vec::new();
            let next = self.waiting.pop_ready(|key, seq| match key {
                None => true,
                Some(_) if seq.lease.is_some() => true,
                Some(name) => match adapters.acquire(name, budget) {
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
            });
            let Some((_, mut seq)) = next else { break };
            if let Some((_, e)) = failed.into_iter().find(|(id, _)| *id == seq.id) {
                let _ = seq.events.send(Event::Error(e));
                self.release(seq);
                continue;
            }
            let chunk = (seq.tokens.len() - seq.computed).min(token_budget);
            if !self
                .mem
                .reserve(&mut self.budget, &mut self.adapters, &mut seq.cache, chunk)
            {
                seq.lease = None;
                self.waiting.push_front(seq.adapter.clone(), seq);
                break;
            }
            plan.push((self.running.len(), chunk));
            token_budget -= chunk;
            seq.queue_time.get_or_insert_with(|| seq.submitted.elapsed());
            self.running.push(seq);
        }
        if plan.is_empty() {
            if !self.running.is_empty() || !self.waiting.is_empty() {
                // Waiting on adapter loads: don't spin.
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            return Ok(());
        }
        self.run_batch(&plan)
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
                seq.lease.as_ref(),
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
        let vocab = self.model.cfg.vocab_size;
        let mut finished = Vec::new();
        for (row, &i) in sampled_rows.iter().enumerate() {
            let seq = &mut self.running[i];
            let (prompt, generated) = seq.tokens.split_at(seq.prompt_len);
            let sampled = match seq
                .sampler
                .sample(&logits[row * vocab..(row + 1) * vocab], prompt, generated)
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = seq.events.send(Event::Error(EngineError::Model(e.to_string())));
                    finished.push(i);
                    continue;
                }
            };
            let token = sampled.token;
            seq.tokens.push(token);
            let _ = seq.events.send(Event::Token(sampled));
            let stop =
                seq.request.stop_token_ids.contains(&token) || (!seq.request.ignore_eos && self.eos.contains(&token));
            let length = seq.generated() >= seq.request.max_tokens || seq.tokens.len() >= self.cfg.max_model_len;
            if stop || length {
                let reason = if stop { FinishReason::Stop } else { FinishReason::Length };
                let _ = seq.events.send(Event::Finished {
                    reason,
                    prompt_tokens: seq.prompt_len,
                    completion_tokens: seq.generated(),
                    queue_time: seq.queue_time.unwrap_or_default(),
                });
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
        for seq in std::mem::take(&mut self.running) {
            let _ = seq.events.send(Event::Error(e.clone()));
            self.release(seq);
        }
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
            kv_blocks_used: self.mem.blocks.total() - self.mem.blocks.num_free(),
            kv_blocks_total: self.mem.blocks.total(),
            memory_budget: self.budget.total(),
            kv_bytes: self.budget.kv_bytes(),
            adapter_bytes: self.budget.adapter_bytes(),
            adapter_pages_used: self.adapters.pages_in_use(),
            running_adapters: running,
            waiting_adapters: waiting,
            adapters: self.adapters.stats,
            ..self.stats.clone()
        }
    }
}

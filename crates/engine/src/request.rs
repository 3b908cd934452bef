//! What the API sends the engine and what streams back on each request's own channel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quiver_adapters::HostAdapter;
use tokio::sync::{mpsc, oneshot};

use crate::adapters::{AdapterInfo, AdapterStats};
use crate::error::EngineError;
use crate::metrics::RequestMetrics;
use crate::sampling::{Sampled, SamplingParams};
use crate::validation::ValidRequest;

/// A generation request as the API layer assembled it: tokenized, not yet validated. Only
/// [`Validator::validate`](crate::validation::Validator::validate) turns it into something the
/// engine accepts.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// One or more prompts; each runs `n` times (choice `i * n + j` is sample `j` of prompt `i`).
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    /// Adapter name; `None` runs the base model.
    pub adapter: Option<String>,
    pub sampling: SamplingParams,
    /// `None`: whatever the context leaves after the prompt.
    pub max_tokens: Option<usize>,
    /// Stop strings, matched on the detokenized text (needs an engine with a tokenizer).
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
}

impl GenerateRequest {
    /// One prompt, greedy, one choice, defaults everywhere else.
    pub fn new(prompt: Vec<u32>) -> Self {
        GenerateRequest {
            prompts: vec![prompt],
            n: 1,
            adapter: None,
            sampling: SamplingParams::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
        }
    }
}

/// Why a stop ended a choice (OpenAI's `finish_reason: "stop"`; vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopCause {
    Eos,
    /// One of the request's `stop_token_ids`.
    Token(u32),
    /// The request's stop string at this index.
    String(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or the context length was reached.
    Length,
    Stop(StopCause),
}

impl FinishReason {
    /// OpenAI's `finish_reason`, and vLLM's `finished_reason` metric label.
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop(_) => "stop",
        }
    }
}

/// New output of one choice: text now final (empty while a character or a possible stop string
/// is incomplete) and the tokens sampled since the last delta.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub index: usize,
    pub text: String,
    pub tokens: Vec<Sampled>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(Delta),
    /// The choice's last event; every choice of a request ends with one (or the request with
    /// an [`Event::Error`]).
    Finished {
        index: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens served from the prefix cache (OpenAI's
        /// `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: usize,
        /// From submission until the choice first ran (adapter loading and queueing included).
        queue_time: Duration,
    },
    /// The request failed; no further events follow.
    Error(EngineError),
}

/// Engine-wide numbers for `/metrics` and routers.
#[derive(Debug, Default, Clone)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub memory_budget: usize,
    pub kv_bytes: usize,
    pub adapter_bytes: usize,
    pub adapter_pages_used: usize,
    /// Bytes of KV blocks and adapter pages whose memory may be resident (touched and not given
    /// back): at most `memory_budget` once a step has begun.
    pub resident_bytes: usize,
    /// Tokens looked up in the prefix cache and tokens found (vLLM v1's counters).
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
    /// Bytes of KV blocks in the prefix cache (part of `kv_bytes`), and of those nobody holds
    /// (evicted when memory is needed).
    pub prefix_cache_bytes: usize,
    pub prefix_cache_idle_bytes: usize,
    pub preemptions: u64,
    pub steps: u64,
    /// Choices that ended (any reason but cancellation).
    pub finished: u64,
    /// Requests whose client went away before they ended.
    pub cancelled: u64,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub adapters: AdapterStats,
    pub requests: RequestMetrics,
}

pub enum Command {
    Submit {
        request: Arc<ValidRequest>,
        events: mpsc::UnboundedSender<Event>,
    },
    RegisterAdapter {
        name: String,
        path: PathBuf,
        pinned: bool,
        /// Already loaded and validated: goes straight to the host tier.
        preloaded: Option<Arc<HostAdapter>>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    UnregisterAdapter {
        name: String,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Unregisters the first idle adapter among `candidates` (LRU eviction of just-in-time ones).
    UnregisterIdleAdapter {
        candidates: Vec<String>,
        reply: oneshot::Sender<Option<String>>,
    },
    PinAdapter {
        name: String,
        pinned: bool,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    Adapters {
        reply: oneshot::Sender<Vec<AdapterInfo>>,
    },
    Stats {
        reply: oneshot::Sender<EngineStats>,
    },
}

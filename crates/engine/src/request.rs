//! What the API sends the engine and what streams back on each request's own channel.

use std::path::PathBuf;
use std::sync::Arc;

use quiver_adapters::HostAdapter;
use tokio::sync::{mpsc, oneshot};

use crate::adapters::{AdapterInfo, AdapterStats};
use crate::error::EngineError;
use crate::sampling::{Sampled, SamplingParams};

/// One generation request, already tokenized and validated by the API layer.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Adapter name; `None` runs the base model.
    pub adapter: Option<String>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` or the context length was reached.
    Length,
    /// EOS or a stop token id.
    Stop,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token(Sampled),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// From submission until the request first ran (adapter loading and queueing included).
        queue_time: std::time::Duration,
    },
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
    pub preemptions: u64,
    pub steps: u64,
    pub finished: u64,
    pub cancelled: u64,
    pub running_adapters: Vec<String>,
    pub waiting_adapters: Vec<String>,
    pub adapters: AdapterStats,
}

pub enum Command {
    Submit {
        request: GenerateRequest,
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

//! What every handler shares: the engine handle, the tokenizer and template, the names it serves,
//! keys, limits and the admission semaphore.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use quiver_engine::Engine;
use quiver_model::{ChatTemplate, ModelConfig, Tokenizer};
use tokio::sync::Semaphore;

use crate::connections::ConnectionLimits;
use crate::metrics::Metrics;
use crate::models::AdapterLoader;
use crate::openai::limits::InputLimits;

/// The server's own limits; what a request may ask of the model is the engine validator's.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Choices (prompts × `n`) admitted at once, running or queued in the engine: the
    /// admission semaphore's size. A request that does not fit now gets 429, one that never can
    /// a 400.
    pub max_concurrent: usize,
    /// Prompts and characters per request, checked before tokenizing.
    pub input: InputLimits,
    /// Advertised as vLLM's `max_lora`: the most adapters that can be in device memory for one batch
    /// (`metrics::max_loras`).
    pub max_loras: usize,
    /// Timeouts, open connections and the shutdown deadline of the HTTP server.
    pub connections: ConnectionLimits,
}

pub struct AppState {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub model_cfg: ModelConfig,
    pub chat_template: Option<ChatTemplate>,
    /// The base model's name in the API (`model` field).
    pub served_name: String,
    pub model_path: String,
    /// Adapters visible in `/v1/models`, by name → directory.
    pub adapters: RwLock<BTreeMap<String, PathBuf>>,
    pub adapter_root: Option<PathBuf>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub limits: Limits,
    /// One permit per admitted choice.
    pub admission: Arc<Semaphore>,
    /// Templating and tokenization jobs running at once on the blocking pool (one per core), so
    /// that huge prompts queue for a slot instead of taking every blocking thread.
    pub tokenizer_slots: Arc<Semaphore>,
    pub draining: AtomicBool,
    pub metrics: Metrics,
    pub created: u64,
    /// Runtime adapter loads: single flight, remembered failures, the just-in-time cap.
    pub loader: AdapterLoader,
}

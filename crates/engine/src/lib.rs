//! The serving engine: one scheduler thread owns the queue, the KV blocks, the adapter page pool
//! and the adapter leases; each step it runs one ragged batch and streams tokens back.

pub mod adapters;
pub mod engine;
pub mod error;
mod kv_memory;
pub mod memory;
pub mod metrics;
pub mod output;
pub mod prefix;
pub mod queue;
pub mod request;
pub mod sampling;
pub mod scheduler;
mod sequence;
pub mod stop;
pub mod validation;

pub use engine::Engine;
pub use error::EngineError;
pub use queue::Policy;
pub use request::{Delta, EngineStats, Event, FinishReason, GenerateRequest, StopCause};
pub use validation::{ValidRequest, ValidationError, Validator};

use quiver_tensor::DType;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Tokens per step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    pub block_size: usize,
    /// Bytes shared by KV blocks and adapter pages.
    pub memory_budget: usize,
    /// Bytes of loaded adapters kept in host memory (LRU).
    pub host_adapter_budget: usize,
    pub max_lora_rank: usize,
    pub max_model_len: usize,
    pub policy: Policy,
    /// Page dtype of the adapter pool (f32 exact, bf16 half the memory).
    pub adapter_dtype: DType,
    /// KV cache entries; `None`: the checkpoint's dtype (`--kv-cache-dtype auto`). Defaults to
    /// f32, the exact reference.
    pub kv_cache_dtype: Option<DType>,
    /// Waiting requests, from the head of the queue, whose adapters are loaded into the host tier
    /// ahead of admission (each step, and at submission for a request that lands among them).
    /// Requests further back load when they get there: loading them earlier could evict what the
    /// head needs. Capped at the number of adapters the host tier holds.
    pub prefetch: usize,
    /// Most prompt tokens per request, counted per choice (prompts × `n`); `None`: `MAX_N` ×
    /// `max_model_len`, so any single prompt at any `n` fits.
    pub max_request_prompt_tokens: Option<usize>,
    /// Automatic prefix caching: full KV blocks are kept, keyed by their tokens, the tokens
    /// before them and the adapter's identity, and reused by later requests (see `prefix`).
    pub enable_prefix_caching: bool,
    /// When memory is short, evict idle cached prefix blocks before idle adapters' device
    /// copies. Off (the default): adapters go first, see `kv_memory`; on exists to measure that
    /// choice (`--bench prefix`).
    pub evict_cached_blocks_first: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 64,
            max_batch_tokens: 512,
            block_size: 16,
            memory_budget: 1 << 30,
            host_adapter_budget: 2 << 30,
            max_lora_rank: 64,
            max_model_len: 4096,
            policy: Policy::AdapterRoundRobin,
            adapter_dtype: DType::F32,
            kv_cache_dtype: Some(DType::F32),
            prefetch: 8,
            max_request_prompt_tokens: None,
            enable_prefix_caching: true,
            evict_cached_blocks_first: false,
        }
    }
}

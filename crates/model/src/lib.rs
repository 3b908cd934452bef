//! Hugging Face model directories for the Llama family: config, memory-mapped weights,
//! tokenizer, chat template and the forward pass over a ragged batch with a paged KV cache.

pub mod bundle;
pub mod chat;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv;
pub mod llama;
pub mod lora;
pub mod prequant;
pub mod quantize;
pub mod rope;
pub mod tokenizer;
pub mod weights;

pub use bundle::ModelBundle;
pub use chat::ChatTemplate;
pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use kv::{BatchBuilder, BlockAllocator, SequenceCache};
pub use llama::{ForwardInput, Linear, Llama, Quantization};
pub use lora::{lora_page_size, lora_plan, lora_slot, AdapterRun, HostLoraModule, LoraAdapter, LoraBatch, ModuleKind};
pub use prequant::{PreQuantMethod, PreQuantized};
pub use tokenizer::{IncrementalDecoder, Tokenizer};

//! PEFT LoRA adapters: `adapter_config.json` semantics (targets, rank/alpha patterns, rsLoRA,
//! layers_to_transform), validation of `adapter_model.safetensors` against the base model, and
//! loading into host tensors that the model uploads into its page pool or merges into the base.

pub mod bounds;
pub mod config;
pub mod error;
pub mod files;
pub mod load;

pub use config::{LoraConfig, TargetModule};
pub use error::AdapterError;
pub use files::{MAX_CONFIG_BYTES, MAX_HEADER_BYTES};
pub use load::{load_peft_adapter, load_peft_adapter_with, HostAdapter, LoadLimits};

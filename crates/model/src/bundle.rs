//! Everything loaded from one model directory: weights, tokenizer, chat template, stop tokens.

use std::path::Path;

use quiver_tensor::Backend;
use serde_json::Value;

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{read_json, Result};
use crate::llama::{Llama, Quantization};
use crate::tokenizer::Tokenizer;

pub struct ModelBundle<B: Backend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Generation ends at any of these (generation_config.json, else config.json).
    pub eos_token_ids: Vec<u32>,
}

impl<B: Backend> ModelBundle<B> {
    /// Loads `dir`; `max_model_len` caps the context (and the rope table) below the model's own.
    pub fn load(backend: B, dir: &Path, max_model_len: Option<usize>) -> Result<Self> {
        Self::load_with(backend, dir, max_model_len, Quantization::default())
    }

    /// [`load`](Self::load) with the base weights stored as `quant` says.
    pub fn load_with(backend: B, dir: &Path, max_model_len: Option<usize>, quant: Quantization) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let tokenizer = Tokenizer::from_dir(dir)?;
        let chat_template = ChatTemplate::from_dir(dir)?;
        let mut eos = cfg.eos_token_ids.clone();
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen: Value = read_json(&gen_path)?;
            let ids: Vec<u32> = match gen.get("eos_token_id") {
                Some(Value::Number(n)) => n.as_u64().into_iter().map(|n| n as u32).collect(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
                _ => Vec::new(),
            };
            if !ids.is_empty() {
                eos = ids;
            }
        }
        let max_len = max_model_len
            .unwrap_or(cfg.max_position_embeddings)
            .min(cfg.max_position_embeddings);
        let model = Llama::load_with(backend, cfg, dir, max_len, quant)?;
        Ok(ModelBundle {
            model,
            tokenizer,
            chat_template,
            eos_token_ids: eos,
        })
    }
}

//! Quiver test kit: writes tiny deterministic models in exact Hugging Face layout
//! (safetensors + configs + tokenizer) and reads the transformers golden outputs computed
//! on them by `tests/oracle/make_goldens.py`.
//!
//! It also writes deterministic PEFT LoRA adapters for those models ([`write_adapter`]) and
//! reads the transformers + PEFT goldens computed on them by
//! `tests/oracle/make_lora_goldens.py` ([`materialize_lora`]), and writes the dequantized
//! weights of quantized bases for `tests/oracle/make_quant_goldens.py` ([`write_dequantized`]).
//!
//! Every file is byte-identical on every run and machine; goldens record the sha256 of each
//! file, so a change here is caught by [`materialize`] instead of silently drifting.

mod adapter;
mod config;
mod corpus;
mod golden;
mod lora_golden;
mod quant_golden;
mod spec;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub use adapter::{
    adapter_config_json, adapter_spec_by_name, golden_adapter_specs, write_adapter, write_lora_goldens, AdapterSpec,
    LoraModule, Targets,
};
pub use config::{config_json, generation_config_json};
pub use corpus::CORPUS;
pub use golden::{
    file_hashes, goldens_dir, load_golden, materialize, max_abs_diff, ChatMessage, Generator, Golden, GoldenChat,
    GoldenPrompt,
};
pub use lora_golden::{
    load_lora_golden, materialize_lora, GoldenAdapter, LoraGenerator, LoraGolden, LoraMixed, LoraSingle, MixedRow,
};
pub use quant_golden::{
    dequantized_sha256, load_prequant_golden, load_quant_golden, materialize_prequant, quant_golden_name, quantized_as,
    sha256_hex, write_dequantized, write_quant_goldens, QuantGolden, PREQUANT_GOLDENS, QUANT_GOLDENS,
};
pub use spec::{
    golden_specs, qwen25_05b_spec, spec_by_name, Arch, ConfigForm, DType, ModelSpec, Rope, TokenizerFlavor,
};
pub use tokenizer::{
    build_tokenizer, special_ids, SpecialIds, BPE_VOCAB_SIZE, CHATML_CHAT_TEMPLATE, LLAMA_CHAT_TEMPLATE,
};
pub use weights::{shard_file_name, tensor_specs, tensor_values, Init, TensorSpec};

impl ModelSpec {
    /// Embedding rows: the explicit vocab size, else the tokenizer's.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size.unwrap_or_else(|| tokenizer::vocab_size(self.tokenizer))
    }
}

/// Writes the complete model directory for `spec` into `dir` (created if needed).
/// Returns the names of the files written.
pub fn write_model(spec: &ModelSpec, dir: &Path) -> Result<Vec<String>> {
    spec.validate()?;
    let tok_vocab = tokenizer::vocab_size(spec.tokenizer);
    let vocab = spec.vocab_size();
    anyhow::ensure!(
        vocab >= tok_vocab,
        "{}: vocab_size {vocab} is smaller than the tokenizer's {tok_vocab}",
        spec.name
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ids = special_ids(spec.tokenizer);
    config::write_json(&dir.join("config.json"), &config_json(spec, vocab, &ids))?;
    config::write_json(&dir.join("generation_config.json"), &generation_config_json(spec, &ids))?;
    let mut files = vec!["config.json".to_string(), "generation_config.json".into()];
    files.extend(tokenizer::write_tokenizer_files(spec, dir)?);
    files.extend(weights::write_weights(spec, vocab, dir)?);
    files.sort();
    Ok(files)
}

/// Writes every golden model into `root/<name>`; returns (name, dir) pairs.
pub fn write_golden_models(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    golden_specs()
        .into_iter()
        .map(|spec| {
            let dir = root.join(&spec.name);
            write_model(&spec, &dir)?;
            Ok((spec.name, dir))
        })
        .collect()
}

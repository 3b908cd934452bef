//! `config.json` of the Llama family (llama, mistral, qwen2), in both the transformers-4 form
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and the transformers-5 form (`rope_parameters`,
//! `dtype`). Whatever Quiver cannot compute exactly is refused here, naming the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{read_json, ModelError, Result};
use crate::prequant::PreQuantized;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Longest context the model may be run at (the sliding window caps it when one is set, so
    /// that the window never takes effect and full attention stays exact).
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2; llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// A GPTQ/AWQ checkpoint (`quantization_config`): its linears are packed codes.
    pub prequantized: Option<PreQuantized>,
}

fn unsupported(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Config {
        field: field.into(),
        reason: reason.into(),
    }
}

struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| invalid(key, "required positive integer"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| invalid(key, format!("expected an integer, got {v}"))),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| invalid(key, format!("expected a number, got {v}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| invalid(key, format!("expected a boolean, got {v}"))),
        }
    }
    fn opt_str(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(Value::as_str)
    }
}

/// Token ids may be an integer or a list of integers.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|n| n as u32).collect(),
        _ => Vec::new(),
    }
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let value: Value = read_json(&dir.join("config.json"))?;
        Self::from_json(&value)
    }

    pub fn from_json(value: &Value) -> Result<Self> {
        let map = value
            .as_object()
            .ok_or_else(|| invalid("config", "expected a JSON object"))?;
        let f = Fields(map);
        let arch = match f.opt_str("model_type") {
            Some("llama") => Arch::Llama,
            Some("mistral") => Arch::Mistral,
            Some("qwen2") => Arch::Qwen2,
            Some(other) => {
                return Err(unsupported(
                    "model_type",
                    format!("`{other}` (supported: llama, mistral, qwen2)"),
                ))
            }
            None => return Err(invalid("model_type", "missing")),
        };
        if let Some(act) = f.opt_str("hidden_act").or(f.opt_str("hidden_activation")) {
            if act != "silu" {
                return Err(unsupported("hidden_act", format!("`{act}` (only silu)")));
            }
        }
        let prequantized = match map.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => Some(PreQuantized::from_config(q)?),
        };
        if f.opt_bool("mlp_bias")? == Some(true) {
            return Err(unsupported("mlp_bias", "MLP biases are not supported"));
        }
        if let Some(p) = f.opt_f64("partial_rotary_factor")? {
            if p != 1.0 {
                return Err(unsupported("partial_rotary_factor", format!("{p} (only 1.0)")));
            }
        }
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(invalid(
                "num_key_value_heads",
                format!("{num_kv_heads} must divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(invalid(
                    "head_dim",
                    "absent and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(invalid(
                "head_dim",
                format!("{head_dim} must be even for rotary embeddings"),
            ));
        }
        let mut max_pos = f.opt_usize("max_position_embeddings")?.unwrap_or(4096);
        let window = match arch {
            Arch::Qwen2 if f.opt_bool("use_sliding_window")? != Some(true) => None,
            _ => f.opt_usize("sliding_window")?,
        };
        if let Some(w) = window {
            // Attention with a window equals full attention while the context fits inside it.
            if w < max_pos {
                tracing::warn!(
                    sliding_window = w,
                    max_position_embeddings = max_pos,
                    "capping the context at the sliding window"
                );
                max_pos = w;
            }
        }
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let qkv_bias = match arch {
            Arch::Qwen2 => true,
            Arch::Llama => attention_bias,
            Arch::Mistral => false,
        };
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: f.usize("vocab_size")?,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_position_embeddings: max_pos,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias: arch == Arch::Llama && attention_bias,
            bos_token_id: token_ids(map.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(map.get("eos_token_id")),
            prequantized,
        })
    }
}

/// transformers 5 puts everything under `rope_parameters`; transformers 4 has `rope_theta` at the
/// top and an optional `rope_scaling` (whose type key is `rope_type`, or `type` in older files).
fn parse_rope(f: &Fields<'_>) -> Result<(f64, RopeScaling)> {
    let (field, params) = match f.0.get("rope_parameters") {
        Some(Value::Object(p)) => ("rope_parameters", Some(p)),
        _ => match f.0.get("rope_scaling") {
            Some(Value::Object(p)) => ("rope_scaling", Some(p)),
            Some(Value::Null) | None => ("rope_scaling", None),
            Some(v) => return Err(invalid("rope_scaling", format!("expected an object or null, got {v}"))),
        },
    };
    let p = params.map(Fields);
    let theta = match p.as_ref().map(|p| p.opt_f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let Some(p) = p else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = p.opt_str("rope_type").or(p.opt_str("type")).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        p.opt_f64(key)?
            .ok_or_else(|| invalid(&format!("{field}.{key}"), format!("required for rope_type `{kind}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        },
        other => {
            return Err(unsupported(
                &format!("{field}.rope_type"),
                format!("`{other}` (supported: default, linear, llama3)"),
            ))
        }
    };
    Ok((theta, scaling))
}

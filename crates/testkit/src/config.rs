//! `config.json` and `generation_config.json`, in the form transformers writes them.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::spec::{Arch, ConfigForm, ModelSpec, Rope};
use crate::tokenizer::SpecialIds;

/// Rebuilds objects with sorted keys. serde_json keeps insertion order when some crate in
/// the build enables `preserve_order`, so sorting ourselves keeps the bytes independent of
/// which workspace crates are compiled alongside the test kit.
pub(crate) fn canonical(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(String, Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, canonical(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(canonical).collect()),
        other => other,
    }
}

/// Writes pretty JSON with sorted keys and a trailing newline.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(&canonical(value.clone()))?;
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Version string stamped into the configs; only informative.
fn transformers_version(form: ConfigForm) -> &'static str {
    match form {
        ConfigForm::Transformers4 => "4.46.0",
        ConfigForm::Transformers5 => "5.0.0",
    }
}

/// Rope fields other than the type and theta (shared by both config forms).
fn rope_extra(rope: &Rope) -> Map<String, Value> {
    let mut m = Map::new();
    match *rope {
        Rope::Default => {}
        Rope::Linear { factor } => {
            m.insert("factor".into(), json!(factor));
        }
        Rope::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            m.insert("factor".into(), json!(factor));
            m.insert("low_freq_factor".into(), json!(low_freq_factor));
            m.insert("high_freq_factor".into(), json!(high_freq_factor));
            m.insert(
                "original_max_position_embeddings".into(),
                json!(original_max_position_embeddings),
            );
        }
    }
    m
}

fn rope_type(rope: &Rope) -> &'static str {
    match rope {
        Rope::Default => "default",
        Rope::Linear { .. } => "linear",
        Rope::Llama3 { .. } => "llama3",
    }
}

/// The `config.json` value for `spec` with embedding rows `vocab`.
pub fn config_json(spec: &ModelSpec, vocab: usize, ids: &SpecialIds) -> Value {
    let mut c = json!({
        "architectures": [spec.arch.architecture()],
        "model_type": spec.arch.model_type(),
        "attention_dropout": 0.0,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "transformers_version": transformers_version(spec.config_form),
        "use_cache": true,
        "vocab_size": vocab,
    });
    let Some(m) = c.as_object_mut() else {
        unreachable!("json! object literal")
    };
    match spec.arch {
        Arch::Llama => {
            m.insert("attention_bias".into(), json!(false));
            m.insert("mlp_bias".into(), json!(false));
            m.insert("pretraining_tp".into(), json!(1));
        }
        Arch::Mistral => {
            m.insert("sliding_window".into(), Value::Null);
        }
        Arch::Qwen2 => {
            // As in the real Qwen2.5 configs: a window size is present but disabled.
            m.insert("use_sliding_window".into(), json!(false));
            m.insert("sliding_window".into(), json!(32768));
            m.insert("max_window_layers".into(), json!(spec.num_layers));
        }
    }
    if spec.explicit_head_dim() {
        m.insert("head_dim".into(), json!(spec.head_dim()));
    }
    let dtype = json!(spec.dtype.torch_name());
    match spec.config_form {
        ConfigForm::Transformers4 => {
            m.insert("torch_dtype".into(), dtype);
            m.insert("rope_theta".into(), json!(spec.rope_theta));
            let scaling = match spec.rope {
                Rope::Default => Value::Null,
                ref r => {
                    let mut s = rope_extra(r);
                    s.insert("rope_type".into(), json!(rope_type(r)));
                    Value::Object(s)
                }
            };
            m.insert("rope_scaling".into(), scaling);
        }
        ConfigForm::Transformers5 => {
            m.insert("dtype".into(), dtype);
            let mut p = rope_extra(&spec.rope);
            p.insert("rope_type".into(), json!(rope_type(&spec.rope)));
            p.insert("rope_theta".into(), json!(spec.rope_theta));
            m.insert("rope_parameters".into(), Value::Object(p));
        }
    }
    c
}

/// `generation_config.json`: greedy by default, every end-of-turn id as eos.
pub fn generation_config_json(spec: &ModelSpec, ids: &SpecialIds) -> Value {
    let mut g = json!({
        "bos_token_id": ids.bos,
        "eos_token_id": ids.generation_eos,
        "do_sample": false,
        "transformers_version": transformers_version(spec.config_form),
    });
    if let (Some(pad), Some(m)) = (ids.pad, g.as_object_mut()) {
        m.insert("pad_token_id".into(), json!(pad));
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_nested_keys() {
        let v = canonical(json!({"b": {"z": 1, "a": 2}, "a": [ {"y": 0, "x": 1} ]}));
        let s = serde_json::to_string(&v).unwrap_or_default();
        assert_eq!(s, r#"{"a":[{"x":1,"y":0}],"b":{"a":2,"z":1}}"#);
    }
}

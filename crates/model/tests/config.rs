//! config.json parsing: both transformers forms, and clear refusals naming the field.

use quiver_model::{Arch, ModelConfig, ModelError, RopeScaling};
use serde_json::{json, Value};

fn base(model_type: &str) -> Value {
    json!({
        "model_type": model_type, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 300, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "hidden_act": "silu", "eos_token_id": [5, 7], "bos_token_id": 1
    })
}

fn with(mut v: Value, key: &str, val: Value) -> Value {
    v[key] = val;
    v
}

fn refused_field(v: &Value) -> String {
    match ModelConfig::from_json(v) {
        Err(ModelError::Unsupported { field, .. }) | Err(ModelError::Config { field, .. }) => field,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn transformers4_form() {
    let v = with(base("llama"), "rope_theta", json!(500000.0));
    let v = with(
        v,
        "rope_scaling",
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    );
    let c = ModelConfig::from_json(&v).unwrap();
    assert_eq!(c.arch, Arch::Llama);
    assert_eq!(c.rope_theta, 500000.0);
    assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert_eq!(
        (c.head_dim, c.num_kv_heads, c.eos_token_ids.clone()),
        (16, 2, vec![5, 7])
    );
    assert!(!c.qkv_bias && !c.tie_word_embeddings);
}

#[test]
fn transformers5_form_and_legacy_type_key() {
    let v = with(
        base("qwen2"),
        "rope_parameters",
        json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
    );
    let c = ModelConfig::from_json(&with(v, "head_dim", json!(24))).unwrap();
    assert_eq!(
        (c.arch, c.rope_theta, c.head_dim, c.qkv_bias),
        (Arch::Qwen2, 1e6, 24, true)
    );
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    let v = with(base("llama"), "rope_scaling", json!({"type": "linear", "factor": 4.0}));
    assert_eq!(
        ModelConfig::from_json(&v).unwrap().rope_scaling,
        RopeScaling::Linear { factor: 4.0 }
    );
}

#[test]
fn refusals_name_the_field() {
    assert_eq!(
        refused_field(&with(base("llama"), "model_type", json!("gpt2"))),
        "model_type"
    );
    let yarn = with(
        base("llama"),
        "rope_scaling",
        json!({"rope_type": "yarn", "factor": 4.0}),
    );
    assert_eq!(refused_field(&yarn), "rope_scaling.rope_type");
    let dyn5 = with(
        base("llama"),
        "rope_parameters",
        json!({"rope_type": "dynamic", "factor": 2.0}),
    );
    assert_eq!(refused_field(&dyn5), "rope_parameters.rope_type");
    let linear_no_factor = with(base("llama"), "rope_scaling", json!({"rope_type": "linear"}));
    assert_eq!(refused_field(&linear_no_factor), "rope_scaling.factor");
    assert_eq!(
        refused_field(&with(base("llama"), "hidden_act", json!("gelu"))),
        "hidden_act"
    );
    assert_eq!(
        refused_field(&with(base("llama"), "num_key_value_heads", json!(3))),
        "num_key_value_heads"
    );
    let mut missing = base("llama");
    missing.as_object_mut().unwrap().remove("hidden_size");
    assert_eq!(refused_field(&missing), "hidden_size");
    assert_eq!(
        refused_field(&with(base("llama"), "vocab_size", json!("many"))),
        "vocab_size"
    );
}

#[test]
fn sliding_window_caps_context_instead_of_changing_attention() {
    let c = ModelConfig::from_json(&with(base("mistral"), "sliding_window", json!(512))).unwrap();
    assert_eq!(c.max_position_embeddings, 512);
    let c = ModelConfig::from_json(&with(base("mistral"), "sliding_window", Value::Null)).unwrap();
    assert_eq!(c.max_position_embeddings, 2048);
    // qwen2 ignores sliding_window unless use_sliding_window is set.
    let q = with(base("qwen2"), "sliding_window", json!(256));
    assert_eq!(ModelConfig::from_json(&q).unwrap().max_position_embeddings, 2048);
    let q = with(q, "use_sliding_window", json!(true));
    assert_eq!(ModelConfig::from_json(&q).unwrap().max_position_embeddings, 256);
}

#[test]
fn pre_quantized_checkpoints_are_refused_naming_the_method() {
    for method in ["gptq", "awq", "bitsandbytes"] {
        let v = with(
            base("llama"),
            "quantization_config",
            json!({"quant_method": method, "bits": 4, "group_size": 128}),
        );
        match ModelConfig::from_json(&v) {
            Err(ModelError::Unsupported { field, reason }) => {
                assert_eq!(field, "quantization_config");
                assert!(reason.contains(method) && reason.contains("--quantization"), "{reason}");
            }
            other => panic!("{method}: expected a refusal, got {other:?}"),
        }
    }
}

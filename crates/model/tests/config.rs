//! config.json parsing: both transformers forms, and clear refusals naming the field.

use quiver_model::{Arch, ModelConfig, ModelError, PreQuantMethod, RopeScaling};
use quiver_tensor::QuantFormat;
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
fn gptq_and_awq_configs_are_read_as_vllm_reads_them() {
    let read = |q: Value| ModelConfig::from_json(&with(base("llama"), "quantization_config", q));
    let gptq = json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true});
    let p = read(gptq).unwrap().prequantized.unwrap();
    assert_eq!((p.method, p.bits, p.group_size), (PreQuantMethod::Gptq, 4, Some(128)));
    let channel = json!({"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq"});
    let p = read(channel).unwrap().prequantized.unwrap();
    assert_eq!((p.bits, p.group_size, p.format()), (8, None, QuantFormat::Int8));
    // AutoAWQ's own key names.
    let awq = json!({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": true, "version": "GEMM"});
    let p = read(awq).unwrap().prequantized.unwrap();
    assert_eq!(
        (p.method, p.group_size, p.format()),
        (PreQuantMethod::Awq, Some(64), QuantFormat::Int4)
    );
    assert_eq!(ModelConfig::from_json(&base("llama")).unwrap().prequantized, None);
}

#[test]
fn quantization_configs_quiver_cannot_serve_are_refused_naming_the_field() {
    let cases = [
        (
            json!({"quant_method": "bitsandbytes", "load_in_4bit": true}),
            "quant_method",
            "bitsandbytes",
        ),
        (json!({"quant_method": "fp8"}), "quant_method", "--quantization"),
        (json!({"bits": 4}), "quant_method", "missing"),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": true}),
            "desc_act",
            "act-order",
        ),
        (
            json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
            "bits",
            "4, 8",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 16}),
            "group_size",
            "multiples of 32",
        ),
        (
            json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}),
            "checkpoint_format",
            "gptq_v2",
        ),
        (
            json!({"quant_method": "awq", "bits": 8, "group_size": 128}),
            "bits",
            "supported: 4",
        ),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": -1}),
            "group_size",
            "-1",
        ),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}),
            "version",
            "gemv",
        ),
        (
            json!({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": false}),
            "zero_point",
            "zero points",
        ),
    ];
    for (q, want_field, want_reason) in cases {
        match ModelConfig::from_json(&with(base("llama"), "quantization_config", q.clone())) {
            Err(ModelError::Unsupported { field, reason }) => {
                assert_eq!(field, format!("quantization_config.{want_field}"), "{q}");
                assert!(reason.contains(want_reason), "{q}: {reason}");
            }
            other => panic!("{q}: expected a refusal, got {other:?}"),
        }
    }
}

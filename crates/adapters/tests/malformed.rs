//! Broken adapters are refused with an error that names the adapter, the field or tensor, and
//! the reason — never a panic, never a silently wrong model.

use std::path::Path;

use quiver_adapters::{load_peft_adapter, AdapterError};
use quiver_model::ModelConfig;
use quiver_testkit::{adapter_spec_by_name, spec_by_name, write_adapter, write_model};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

const NAME: &str = "llama-r8-all-linear";

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    cfg: ModelConfig,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let spec = adapter_spec_by_name(NAME).unwrap();
    write_model(&spec_by_name(&spec.base).unwrap(), &tmp.path().join("base")).unwrap();
    let dir = tmp.path().join("adapter");
    write_adapter(&spec, &dir).unwrap();
    let cfg = ModelConfig::from_dir(&tmp.path().join("base")).unwrap();
    Fixture { _tmp: tmp, dir, cfg }
}

fn load(f: &Fixture) -> Result<(), String> {
    load_peft_adapter("bad-one", &f.dir, &f.cfg).map(|_| ()).map_err(|e| {
        let msg = e.to_string();
        assert!(
            msg.contains("adapter `bad-one`"),
            "error does not name the adapter: {msg}"
        );
        msg
    })
}

fn edit_config(f: &Fixture, edit: impl FnOnce(&mut Value)) {
    let path = f.dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

/// Rewrites adapter_model.safetensors, letting `edit` change or drop each tensor.
fn edit_tensors(
    dir: &Path,
    mut edit: impl FnMut(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in st.tensors() {
        if let Some((d, s, b)) = edit(&name, v.dtype(), v.shape().to_vec(), v.data().to_vec()) {
            out.push((name, d, s, b));
        }
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn expect(msg: Result<(), String>, parts: &[&str]) {
    let msg = msg.expect_err("the adapter should have been refused");
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} lacks {p:?}");
    }
}

#[test]
fn the_valid_fixture_loads() {
    let f = fixture();
    let a = load_peft_adapter(NAME, &f.dir, &f.cfg).unwrap();
    assert_eq!((a.modules.len(), a.max_rank()), (7 * f.cfg.num_layers, 8));
}

#[test]
fn truncated_safetensors() {
    let f = fixture();
    let path = f.dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect(load(&f), &["adapter_model.safetensors", "not a valid safetensors"]);
}

#[test]
fn missing_config() {
    let f = fixture();
    std::fs::remove_file(f.dir.join("adapter_config.json")).unwrap();
    expect(load(&f), &["adapter_config.json"]);
}

#[test]
fn config_is_not_json() {
    let f = fixture();
    std::fs::write(f.dir.join("adapter_config.json"), "{\"r\": 8,").unwrap();
    expect(load(&f), &["adapter_config.json", "invalid JSON"]);
}

#[test]
fn wrong_shape() {
    let f = fixture();
    edit_config(&f, |v| v["r"] = json!(4));
    expect(load(&f), &["lora_A.weight", "shape [8, 64]", "expected [4, 64]"]);
}

#[test]
fn wrong_dtype() {
    let f = fixture();
    edit_tensors(&f.dir, |name, d, s, b| {
        Some(if name.ends_with("0.self_attn.q_proj.lora_A.weight") {
            (Dtype::I32, s, b)
        } else {
            (d, s, b)
        })
    });
    expect(load(&f), &["layers.0.self_attn.q_proj.lora_A.weight", "dtype I32"]);
}

#[test]
fn nan_weights() {
    let f = fixture();
    edit_tensors(&f.dir, |name, d, s, mut b| {
        if name.ends_with("1.mlp.down_proj.lora_B.weight") {
            b[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        Some((d, s, b))
    });
    expect(
        load(&f),
        &["layers.1.mlp.down_proj.lora_B.weight", "non-finite", "index 1"],
    );
}

#[test]
fn missing_and_extra_tensors() {
    let f = fixture();
    edit_tensors(&f.dir, |name, d, s, b| {
        (!name.ends_with("1.self_attn.v_proj.lora_B.weight")).then_some((d, s, b))
    });
    expect(load(&f), &["layers.1.self_attn.v_proj.lora_B.weight", "missing"]);

    let f = fixture();
    edit_config(&f, |v| {
        v["target_modules"] = json!(["q_proj", "k_proj", "v_proj", "o_proj"])
    });
    expect(load(&f), &["mlp", "not targeted"]);

    // The rewriting helper itself keeps a valid file valid.
    let f = fixture();
    edit_tensors(&f.dir, |_, d, s, b| Some((d, s, b)));
    assert!(load(&f).is_ok(), "rewriting without change must still load");
}

#[test]
fn modules_the_model_does_not_have() {
    let f = fixture();
    edit_config(&f, |v| v["target_modules"] = json!(["q_proj", "c_attn"]));
    expect(load(&f), &["target_modules", "`c_attn` is not a module of this model"]);
    let f = fixture();
    edit_config(&f, |v| v["target_modules"] = json!(r".*\.attn\.c_proj"));
    expect(load(&f), &["target_modules", "matches no module"]);
    let f = fixture();
    edit_config(&f, |v| v["layers_to_transform"] = json!([0, 7]));
    expect(load(&f), &["layers_to_transform", "layer 7"]);
}

#[test]
fn unsupported_options_name_their_field() {
    for (field, value, reason) in [
        ("use_dora", json!(true), "DoRA"),
        ("bias", json!("all"), "only \"none\""),
        ("modules_to_save", json!(["lm_head"]), "not supported"),
        ("peft_type", json!("IA3"), "only LORA"),
        ("r", json!(0), "positive integer"),
        ("target_modules", json!(42), "expected a list"),
        ("rank_pattern", json!({"q_proj": "big"}), "positive integer"),
    ] {
        let f = fixture();
        edit_config(&f, |v| v[field] = value.clone());
        expect(load(&f), &[field, reason]);
    }
}

#[test]
fn errors_are_typed() {
    let f = fixture();
    edit_config(&f, |v| v["use_dora"] = json!(true));
    match load_peft_adapter("x", &f.dir, &f.cfg) {
        Err(AdapterError::Config { field, .. }) => assert_eq!(field, "use_dora"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn scales_that_are_not_finite_f32_are_refused() {
    // alpha/r is finite in f64 but not in f32, where the kernels scale.
    for (edit, parts) in [
        (json!({"lora_alpha": 1e300}), vec!["`lora_alpha`", "not a finite f32"]),
        (
            json!({"lora_alpha": 1e300, "use_rslora": true}),
            vec!["`lora_alpha`", "sqrt(r)", "not a finite f32"],
        ),
        (
            json!({"alpha_pattern": {"v_proj": 1e300}}),
            vec!["`alpha_pattern.v_proj`", "v_proj", "not a finite f32"],
        ),
    ] {
        let f = fixture();
        edit_config(&f, |v| {
            for (k, x) in edit.as_object().unwrap() {
                v[k] = x.clone();
            }
        });
        expect(load(&f), &parts);
    }
}

/// Sets value `index` of every tensor whose name ends with `suffix` to `value`.
fn poke(f: &Fixture, suffix: &str, index: usize, value: f32) {
    edit_tensors(&f.dir, |name, d, s, mut b| {
        if name.ends_with(suffix) {
            assert_eq!(d, Dtype::F32);
            b[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
        }
        Some((d, s, b))
    });
}

#[test]
fn weights_whose_update_overflows_are_refused() {
    // Finite weights of 3e38: A·B overflows.
    let f = fixture();
    poke(&f, "0.self_attn.q_proj.lora_A.weight", 3, 3e38);
    poke(&f, "0.self_attn.q_proj.lora_B.weight", 5, 3e38);
    expect(
        load(&f),
        &["model.layers.0.self_attn.q_proj`", "overflows f32", "max|A| 3e38"],
    );
    // Each factor modest, the product with a large (finite) scale not.
    let f = fixture();
    edit_config(&f, |v| v["lora_alpha"] = json!(3e37));
    poke(&f, "1.mlp.gate_proj.lora_A.weight", 0, 1.0);
    poke(&f, "1.mlp.gate_proj.lora_B.weight", 0, 1.0);
    expect(
        load(&f),
        &["model.layers.1.mlp.gate_proj`", "overflows f32", "scale 3.75e36"],
    );
    // Rounded to infinity in a bf16 page.
    let f = fixture();
    poke(&f, "1.mlp.up_proj.lora_B.weight", 0, f32::MAX);
    expect(load(&f), &["layers.1.mlp.up_proj.lora_B.weight", "bf16"]);
    // Large but harmless values still load.
    let f = fixture();
    poke(&f, "0.self_attn.q_proj.lora_A.weight", 3, 1e4);
    assert!(load(&f).is_ok());
}

#[test]
fn limits_are_checked_before_tensor_data() {
    use quiver_adapters::{load_peft_adapter_with, LoadLimits, MAX_CONFIG_BYTES};
    let f = fixture();
    let limited = LoadLimits { max_rank: Some(4) };
    let err = load_peft_adapter_with("x", &f.dir, &f.cfg, limited)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`r`") && err.contains("rank 8") && err.contains("--max-lora-rank 4"),
        "{err}"
    );

    let path = f.dir.join("adapter_config.json");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(&" ".repeat(MAX_CONFIG_BYTES as usize));
    std::fs::write(&path, text).unwrap();
    expect(load(&f), &["adapter_config.json", "more than the limit"]);

    // A FIFO in place of the weights is refused without being opened (opening one blocks).
    let f = fixture();
    std::fs::remove_file(f.dir.join("adapter_model.safetensors")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(f.dir.join("adapter_model.safetensors"))
        .status()
        .unwrap();
    assert!(made.success());
    expect(load(&f), &["adapter_model.safetensors", "not a regular file"]);
}

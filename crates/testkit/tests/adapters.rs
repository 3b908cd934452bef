//! Test-kit LoRA adapters: same bytes every time, PEFT's config layout, and exactly the
//! modules (and per-module shapes) PEFT's targeting rules select.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use quiver_testkit::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

fn adapter(name: &str) -> AdapterSpec {
    adapter_spec_by_name(name).unwrap_or_else(|| panic!("no adapter spec {name}"))
}

/// Tensor name -> shape of a written adapter.
fn written_shapes(dir: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    Ok(st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect())
}

/// The adapted module names (without the `base_model.model.` prefix and `.lora_X.weight`).
fn adapted(spec: &AdapterSpec) -> Result<BTreeSet<String>> {
    let dir = tempfile::tempdir()?;
    write_adapter(spec, dir.path())?;
    let shapes = written_shapes(dir.path())?;
    let mut out = BTreeSet::new();
    for name in shapes.keys() {
        let m = name.strip_prefix("base_model.model.").context("prefix")?;
        let m = m
            .strip_suffix(".lora_A.weight")
            .or_else(|| m.strip_suffix(".lora_B.weight"))
            .context("suffix")?;
        out.insert(m.to_string());
    }
    Ok(out)
}

fn modules(layers: &[usize], projs: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for i in layers {
        for p in projs {
            let block = if ["gate", "up", "down"].contains(p) {
                "mlp"
            } else {
                "self_attn"
            };
            out.insert(format!("model.layers.{i}.{block}.{p}_proj"));
        }
    }
    out
}

const ALL: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

#[test]
fn same_bytes_twice() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let (ma, aa) = write_lora_goldens(a.path())?;
    let (mb, ab) = write_lora_goldens(b.path())?;
    assert_eq!(ma.len(), mb.len());
    assert_eq!(aa.len(), golden_adapter_specs().len());
    for ((name, _, da), (_, _, db)) in aa.iter().zip(&ab) {
        let (ha, hb) = (file_hashes(da)?, file_hashes(db)?);
        assert_eq!(ha.len(), 2, "{name}: {ha:?}");
        assert_eq!(ha, hb, "{name} differs between two writes");
        assert_eq!(da, &a.path().join("adapters").join(name));
    }
    Ok(())
}

#[test]
fn golden_specs_cover_the_features() {
    let specs = golden_adapter_specs();
    let names: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), specs.len(), "adapter names must be unique");
    let ranks: BTreeSet<usize> = specs.iter().map(|s| s.r).collect();
    assert!([1, 8, 16, 64].iter().all(|r| ranks.contains(r)), "{ranks:?}");
    assert!(specs.iter().any(|s| s.use_rslora));
    assert!(specs.iter().any(|s| s.target == Targets::AllLinear));
    assert!(specs.iter().any(|s| matches!(s.target, Targets::Regex(_))));
    assert!(specs
        .iter()
        .any(|s| !s.rank_pattern.is_empty() && !s.alpha_pattern.is_empty()));
    assert!(specs.iter().any(|s| s.layers_to_transform.is_some()));
    assert!(specs.iter().any(|s| s.dtype == DType::Bf16));
    assert!(specs.iter().filter(|s| s.base == "qwen2-f32-tied").count() >= 2);
    for s in &specs {
        assert!(spec_by_name(&s.base).is_some(), "{}: unknown base {}", s.name, s.base);
    }
}

#[test]
fn adapter_config_has_peft_fields() -> Result<()> {
    for spec in golden_adapter_specs() {
        let dir = tempfile::tempdir()?;
        assert_eq!(
            write_adapter(&spec, dir.path())?,
            ["adapter_config.json", "adapter_model.safetensors"]
        );
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json"))?;
        let c: Value = serde_json::from_str(&text)?;
        let n = &spec.name;
        // PEFT writes json.dumps(..., indent=2, sort_keys=True) without a trailing newline.
        let keys: Vec<&String> = c.as_object().context("object")?.keys().collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]) && !text.ends_with('\n'), "{n}");
        assert!(
            text.find("\"alpha_pattern\"") < text.find("\"use_rslora\""),
            "{n}: keys not in file order"
        );
        for (k, v) in [
            ("peft_type", json!("LORA")),
            ("task_type", json!("CAUSAL_LM")),
            ("base_model_name_or_path", json!(spec.base)),
            ("r", json!(spec.r)),
            ("use_rslora", json!(spec.use_rslora)),
            ("layers_to_transform", json!(spec.layers_to_transform)),
            ("layers_pattern", Value::Null),
            ("fan_in_fan_out", json!(false)),
            ("bias", json!("none")),
            ("use_dora", json!(false)),
            ("modules_to_save", Value::Null),
            ("lora_dropout", json!(0.0)),
            ("init_lora_weights", json!(true)),
            ("inference_mode", json!(true)),
        ] {
            assert_eq!(c[k], v, "{n}: {k}");
        }
        assert_eq!(c["lora_alpha"].as_f64(), Some(spec.lora_alpha), "{n}");
        let target = match &spec.target {
            Targets::List(l) => json!(l),
            Targets::Regex(p) => json!(p),
            Targets::AllLinear => json!("all-linear"),
        };
        assert_eq!(c["target_modules"], target, "{n}");
        assert_eq!(c["rank_pattern"], json!(spec.rank_pattern), "{n}");
        let alphas: BTreeMap<String, f64> = serde_json::from_value(c["alpha_pattern"].clone())?;
        assert_eq!(alphas, spec.alpha_pattern, "{n}");
    }
    // Integral alphas are written as JSON integers, as Python writes an int.
    let c = adapter_config_json(&adapter("llama-rank-alpha-pattern"));
    assert_eq!(c["lora_alpha"], json!(16));
    assert_eq!(c["alpha_pattern"], json!({"o_proj": 64, "v_proj": 2.5}));
    Ok(())
}

#[test]
fn targets_select_peft_modules() -> Result<()> {
    let both = [0, 1];
    for (name, want) in [
        ("llama-r1-qv", modules(&both, &["q", "v"])),
        ("llama-r8-all-linear", modules(&both, &ALL)),
        ("llama-r16-rslora-qkvo", modules(&both, &["q", "k", "v", "o"])),
        ("llama-r64-mlp", modules(&both, &["gate", "up", "down"])),
        ("llama-regex-l1-qv", modules(&[1], &["q", "v"])),
        ("llama-rank-alpha-pattern", modules(&both, &ALL)),
        ("llama-layers1", modules(&[1], &["q", "v", "o", "down"])),
        ("llama-bf16-r8", modules(&both, &["q", "k", "up"])),
        ("qwen2-r4-qkv", modules(&both, &["q", "k", "v"])),
        ("qwen2-r8-all-linear-rslora", modules(&both, &ALL)),
        ("qwen2-r2-o-down-bf16", modules(&both, &["o", "down"])),
    ] {
        let spec = adapter(name);
        assert_eq!(adapted(&spec)?, want, "{name}");
        let listed: BTreeSet<String> = spec.modules()?.into_iter().map(|m| m.name).collect();
        assert_eq!(listed, want, "{name}: modules()");
    }
    assert_eq!(golden_adapter_specs().len(), 11, "new golden adapter: add it above");
    Ok(())
}

#[test]
fn rank_and_alpha_patterns_give_per_module_shapes() -> Result<()> {
    let spec = adapter("llama-rank-alpha-pattern");
    let dir = tempfile::tempdir()?;
    write_adapter(&spec, dir.path())?;
    let shapes = written_shapes(dir.path())?;
    let base = spec_by_name(&spec.base).context("base")?;
    let (h, inter) = (base.hidden_size, base.intermediate_size);
    let kv = base.num_kv_heads * base.head_dim();
    for m in spec.modules()? {
        let short = m.name.rsplit('.').next().context("name")?;
        let layer1 = m.name.starts_with("model.layers.1.");
        let r = match short {
            "q_proj" => 2,
            "up_proj" | "down_proj" if layer1 => 16,
            _ => 8,
        };
        let alpha = match short {
            "o_proj" => 64.0,
            "v_proj" => 2.5,
            _ => 16.0,
        };
        let (inp, out) = match short {
            "k_proj" | "v_proj" => (h, kv),
            "gate_proj" | "up_proj" => (h, inter),
            "down_proj" => (inter, h),
            _ => (h, h),
        };
        assert_eq!((m.r, m.alpha, m.scaling), (r, alpha, alpha / r as f64), "{}", m.name);
        assert_eq!((m.in_features, m.out_features), (inp, out), "{}", m.name);
        assert_eq!(shapes[&m.lora_a_key()], [r, inp], "{}", m.name);
        assert_eq!(shapes[&m.lora_b_key()], [out, r], "{}", m.name);
    }
    // rsLoRA divides by sqrt(r).
    let rs = adapter("llama-r16-rslora-qkvo").modules()?;
    assert!(rs.iter().all(|m| m.r == 16 && m.scaling == 2.0), "{rs:?}");
    Ok(())
}

#[test]
fn tensors_are_random_nonzero_and_in_dtype() -> Result<()> {
    for spec in golden_adapter_specs() {
        let dir = tempfile::tempdir()?;
        write_adapter(&spec, dir.path())?;
        let bytes = std::fs::read(dir.path().join("adapter_model.safetensors"))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)?;
        let format = meta.metadata().as_ref().and_then(|m| m.get("format")).cloned();
        assert_eq!(format.as_deref(), Some("pt"));
        let st = SafeTensors::deserialize(&bytes)?;
        let specs = spec.tensor_specs()?;
        assert_eq!(st.len(), specs.len(), "{}", spec.name);
        for t in &specs {
            let view = st.tensor(&t.name)?;
            let want_dtype = if spec.dtype == DType::Bf16 {
                Dtype::BF16
            } else {
                Dtype::F32
            };
            assert_eq!(view.dtype(), want_dtype, "{}", t.name);
            let vals = tensor_values(t, spec.dtype, spec.seed);
            let raw: Vec<u8> = match spec.dtype {
                DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                DType::Bf16 => vals
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            };
            assert_eq!(view.data(), raw.as_slice(), "{}", t.name);
            let nonzero = vals.iter().filter(|v| **v != 0.0).count();
            assert!(nonzero * 10 > vals.len() * 9, "{}: mostly zeros", t.name);
        }
    }
    Ok(())
}

/// PEFT corner cases of `target_modules`, on ad-hoc specs.
#[test]
fn peft_targeting_corner_cases() -> Result<()> {
    let mk = |target: Targets, layers: Option<Vec<usize>>| AdapterSpec {
        name: "t".into(),
        base: "llama-f32".into(),
        r: 2,
        lora_alpha: 4.0,
        use_rslora: false,
        target,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        layers_to_transform: layers,
        dtype: DType::F32,
        seed: 9,
    };
    let list = |xs: &[&str]| Targets::List(xs.iter().map(|s| s.to_string()).collect());
    let names =
        |s: &AdapterSpec| -> Result<BTreeSet<String>> { Ok(s.modules()?.into_iter().map(|m| m.name).collect()) };
    // Suffix match is on whole dotted segments: "proj" matches nothing.
    assert!(mk(list(&["proj"]), None).modules().is_err());
    // A full module name matches exactly and is exempt from layers_to_transform (PEFT
    // checks the layer only for suffix matches); the suffix entry is filtered.
    let s = mk(list(&["model.layers.0.self_attn.q_proj", "v_proj"]), Some(vec![1]));
    let want: BTreeSet<String> = modules(&[0], &["q"]).into_iter().chain(modules(&[1], &["v"])).collect();
    assert_eq!(names(&s)?, want);
    // A regex string must match the whole name; PEFT refuses it with layers_to_transform,
    // and so does "all-linear".
    assert_eq!(
        names(&mk(Targets::Regex(r".*\.(q|k)_proj".into()), None))?,
        modules(&[0, 1], &["q", "k"])
    );
    assert!(mk(Targets::Regex(r".*\.(q|k)_proj".into()), Some(vec![1]))
        .modules()
        .is_err());
    assert!(mk(Targets::AllLinear, Some(vec![1])).modules().is_err());
    // An empty layers_to_transform list filters nothing.
    assert_eq!(names(&mk(list(&["q_proj"]), Some(vec![])))?, modules(&[0, 1], &["q"]));
    assert!(mk(Targets::Regex("q_proj".into()), None).modules().is_err());
    // lm_head is never adapted by all-linear; targeting it explicitly is refused.
    assert!(mk(list(&["lm_head"]), None).modules().is_err());
    Ok(())
}

#[test]
fn lora_goldens_match_current_kit() -> Result<()> {
    let bases: BTreeSet<String> = golden_adapter_specs().into_iter().map(|s| s.base).collect();
    for base in bases {
        let (dir, golden) = materialize_lora(&base)?;
        let vocab = spec_by_name(&base).context("base")?.vocab_size();
        assert!(dir.path().join("base/config.json").is_file());
        for name in golden.adapters.keys() {
            assert!(dir
                .path()
                .join("adapters")
                .join(name)
                .join("adapter_config.json")
                .is_file());
            assert!(
                golden.single.iter().any(|s| &s.adapter == name),
                "{base}: no single run of {name}"
            );
        }
        for s in &golden.single {
            assert_eq!(s.last_logits.len(), vocab);
            assert_eq!(s.greedy.len(), s.greedy_margins.len());
        }
        let rows = &golden.mixed.rows;
        assert_eq!(rows.len(), golden.mixed.last_logits.len());
        assert!(
            rows.iter().all(|r| r.ids.len() == rows[0].ids.len()),
            "{base}: mixed rows must not need padding"
        );
        assert!(rows.iter().any(|r| r.adapter.is_none()), "{base}: no base row");
        assert!(golden.mixed.last_logits.iter().all(|l| l.len() == vocab));
    }
    Ok(())
}

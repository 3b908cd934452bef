//! Deterministic PEFT LoRA adapters for the golden models, in the layout PEFT's
//! `save_pretrained` writes (`adapter_config.json` + `adapter_model.safetensors`).
//!
//! Which modules an adapter touches, and with which rank and alpha, follows PEFT's rules
//! (checked against PEFT itself by `tests/oracle/make_lora_goldens.py`):
//! * `target_modules` list: a module is adapted when its full name equals an entry or ends
//!   with `.` + entry; then, only if it matched by suffix, `layers_to_transform` restricts
//!   the layer index (the first `.<name>.<digits>.` segment of the module name);
//! * `target_modules` string: `re.fullmatch(pattern, module_name)`;
//! * `"all-linear"`: every linear layer except the output head;
//! * `layers_to_transform` with a string target (regex or `"all-linear"`) is refused, as
//!   PEFT's `LoraConfig` refuses it;
//! * `rank_pattern` / `alpha_pattern`: the first key `k` (in the file's key order, sorted
//!   here) with `re.match(rf"(.*\.)?({k})$", module_name)` overrides `r` / `lora_alpha`.
//!
//! Unlike PEFT's initialization (B = 0), both A and B are random, scaled so that every
//! adapted module adds `W x`-relative noise of a fixed size whatever its rank and alpha:
//! A ~ N(0, 1/in), B ~ N(0, (DELTA_STD / (scaling * sqrt(r)))^2). A wrong scaling (alpha/r
//! instead of alpha/sqrt(r), the wrong alpha or rank for a module) is then as visible in
//! the logits as a missing adapter.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use regex::Regex;
use serde_json::{json, Value};

use crate::spec::{spec_by_name, DType, ModelSpec};
use crate::weights::{make_readable, Init, LazyTensor, TensorSpec};

/// Relative size of one module's LoRA delta: std of `scaling * B A x` over std of `W x`.
const DELTA_STD: f32 = 0.12;

/// `target_modules` of a LoRA config.
#[derive(Debug, Clone, PartialEq)]
pub enum Targets {
    /// Module names or name suffixes, e.g. `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// A Python regex that must match the full module name (`re.fullmatch`).
    Regex(String),
    /// PEFT's `"all-linear"`: every projection, never `lm_head`.
    AllLinear,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    pub name: String,
    /// Name of the golden model this adapter is for.
    pub base: String,
    pub r: usize,
    pub lora_alpha: f64,
    /// Scaling alpha/sqrt(r) instead of alpha/r.
    pub use_rslora: bool,
    pub target: Targets,
    /// Regex key -> rank, matched as PEFT's `get_pattern_key` does.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Regex key -> alpha, matched as PEFT's `get_pattern_key` does.
    pub alpha_pattern: BTreeMap<String, f64>,
    pub layers_to_transform: Option<Vec<usize>>,
    /// Storage dtype of the A/B tensors.
    pub dtype: DType,
    pub seed: u64,
}

/// One module an adapter modifies, with its effective rank, alpha and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// Full module name, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scaling: f64,
}

impl LoraModule {
    /// Name of the `[r, in]` tensor in `adapter_model.safetensors`.
    pub fn lora_a_key(&self) -> String {
        format!("base_model.model.{}.lora_A.weight", self.name)
    }

    /// Name of the `[out, r]` tensor in `adapter_model.safetensors`.
    pub fn lora_b_key(&self) -> String {
        format!("base_model.model.{}.lora_B.weight", self.name)
    }
}

/// Every linear module of the model PEFT could adapt: (name, in, out). `lm_head` is listed
/// (it exists as a module even when tied) so that a target matching it is caught.
fn linear_modules(model: &ModelSpec) -> Vec<(String, usize, usize)> {
    let h = model.hidden_size;
    let q = model.num_heads * model.head_dim();
    let kv = model.num_kv_heads * model.head_dim();
    let inter = model.intermediate_size;
    let mut out = Vec::new();
    for i in 0..model.num_layers {
        let p = format!("model.layers.{i}");
        for (proj, inp, outp) in [("q", h, q), ("k", h, kv), ("v", h, kv), ("o", q, h)] {
            out.push((format!("{p}.self_attn.{proj}_proj"), inp, outp));
        }
        for (proj, inp, outp) in [("gate", h, inter), ("up", h, inter), ("down", inter, h)] {
            out.push((format!("{p}.mlp.{proj}_proj"), inp, outp));
        }
    }
    out.push(("lm_head".into(), h, model.vocab_size()));
    out
}

/// Python `re.fullmatch(pattern, s)` for the syntax both engines share.
fn fullmatch(pattern: &str, s: &str) -> Result<bool> {
    let re = Regex::new(&format!("^(?:{pattern})$")).with_context(|| format!("bad regex {pattern:?}"))?;
    Ok(re.is_match(s))
}

/// PEFT's `get_pattern_key`: the first key `k` with `re.match(rf"(.*\.)?({k})$", name)`.
fn pattern_key<'a, V>(patterns: &'a BTreeMap<String, V>, name: &str) -> Result<Option<&'a V>> {
    for (k, v) in patterns {
        if fullmatch(&format!(r"(.*\.)?({k})"), name)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The layer index PEFT reads for `layers_to_transform` when `layers_pattern` is unset:
/// the digits of the first `.<segment>.<digits>.` in the name.
fn layer_index(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    // `.*?\.[^.]*\.(\d+)\.`: a dot-delimited all-digit segment that has a segment before
    // it which is not the first one, and a segment after it.
    (2..parts.len().saturating_sub(1))
        .find(|&j| !parts[j].is_empty() && parts[j].bytes().all(|b| b.is_ascii_digit()))
        .and_then(|j| parts[j].parse().ok())
}

impl AdapterSpec {
    /// The golden model this adapter applies to.
    pub fn base_spec(&self) -> Result<ModelSpec> {
        spec_by_name(&self.base).with_context(|| format!("{}: unknown base model {}", self.name, self.base))
    }

    fn targeted(&self, name: &str) -> Result<bool> {
        match &self.target {
            Targets::AllLinear => Ok(name != "lm_head"),
            Targets::Regex(p) => fullmatch(p, name),
            Targets::List(list) => {
                if list.iter().any(|t| t == name) {
                    return Ok(true);
                }
                if !list.iter().any(|t| name.ends_with(&format!(".{t}"))) {
                    return Ok(false);
                }
                Ok(match &self.layers_to_transform {
                    Some(layers) if !layers.is_empty() => layer_index(name).is_some_and(|i| layers.contains(&i)),
                    _ => true,
                })
            }
        }
    }

    /// The modules PEFT adapts under this config, in model order.
    pub fn modules(&self) -> Result<Vec<LoraModule>> {
        let model = self.base_spec()?;
        if self.layers_to_transform.is_some() && !matches!(self.target, Targets::List(_)) {
            bail!(
                "{}: `layers_to_transform` cannot be used when `target_modules` is a str (PEFT)",
                self.name
            );
        }
        let mut out = Vec::new();
        for (name, in_features, out_features) in linear_modules(&model) {
            if !self.targeted(&name)? {
                continue;
            }
            ensure!(
                name != "lm_head",
                "{}: adapting lm_head is not supported by the kit",
                self.name
            );
            let r = *pattern_key(&self.rank_pattern, &name)?.unwrap_or(&self.r);
            let alpha = *pattern_key(&self.alpha_pattern, &name)?.unwrap_or(&self.lora_alpha);
            ensure!(r > 0, "{}: rank 0 for {name}", self.name);
            let scaling = if self.use_rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            };
            out.push(LoraModule {
                name,
                in_features,
                out_features,
                r,
                alpha,
                scaling,
            });
        }
        ensure!(
            !out.is_empty(),
            "{}: target_modules match no module of {}",
            self.name,
            self.base
        );
        Ok(out)
    }

    /// The A and B tensors of `adapter_model.safetensors`, sorted by name. Their values are
    /// `tensor_values(t, self.dtype, self.seed)`.
    pub fn tensor_specs(&self) -> Result<Vec<TensorSpec>> {
        let mut t = Vec::new();
        for m in self.modules()? {
            let b_std = DELTA_STD / (m.scaling as f32 * (m.r as f32).sqrt());
            t.push(TensorSpec {
                name: m.lora_a_key(),
                shape: vec![m.r, m.in_features],
                init: Init {
                    mean: 0.0,
                    std: 1.0 / (m.in_features as f32).sqrt(),
                },
            });
            t.push(TensorSpec {
                name: m.lora_b_key(),
                shape: vec![m.out_features, m.r],
                init: Init { mean: 0.0, std: b_std },
            });
        }
        t.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(t)
    }
}

/// A whole number as a JSON integer (as Python writes an int alpha), else a float.
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// `adapter_config.json` as PEFT writes it for this spec (the fields that matter for
/// inference; PEFT versions differ in which other defaults they add).
pub fn adapter_config_json(spec: &AdapterSpec) -> Value {
    let target = match &spec.target {
        Targets::List(l) => json!(l),
        Targets::Regex(p) => json!(p),
        Targets::AllLinear => json!("all-linear"),
    };
    let alpha_pattern: serde_json::Map<String, Value> = spec
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), number(*v)))
        .collect();
    json!({
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": spec.base,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": spec.layers_to_transform,
        "lora_alpha": number(spec.lora_alpha),
        "lora_bias": false,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": spec.rank_pattern,
        "target_modules": target,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    })
}

/// Writes `adapter_config.json` and `adapter_model.safetensors` for `spec` into `dir`
/// (created if needed); returns the file names.
pub fn write_adapter(spec: &AdapterSpec, dir: &Path) -> Result<Vec<String>> {
    let tensors = spec.tensor_specs()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Like PEFT: sorted keys, indent 2, no trailing newline.
    let config = serde_json::to_string_pretty(&crate::config::canonical(adapter_config_json(spec)))?;
    let config_path = dir.join("adapter_config.json");
    std::fs::write(&config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
    let views = tensors.iter().map(|t| {
        (
            t.name.clone(),
            LazyTensor {
                spec: t,
                dtype: spec.dtype,
                seed: spec.seed,
            },
        )
    });
    let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let path = dir.join("adapter_model.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &path).with_context(|| format!("writing {}", path.display()))?;
    make_readable(&path)?;
    Ok(vec!["adapter_config.json".into(), "adapter_model.safetensors".into()])
}

fn list(items: &[&str]) -> Targets {
    Targets::List(items.iter().map(|s| s.to_string()).collect())
}

const ATTN: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

/// The adapters whose PEFT outputs are committed under `tests/goldens/lora`.
pub fn golden_adapter_specs() -> Vec<AdapterSpec> {
    let base = |name: &str, base: &str, r: usize, alpha: f64, target: Targets, seed: u64| AdapterSpec {
        name: name.into(),
        base: base.into(),
        r,
        lora_alpha: alpha,
        use_rslora: false,
        target,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        layers_to_transform: None,
        dtype: DType::F32,
        seed,
    };
    let all: Vec<&str> = ATTN.iter().chain(&MLP).copied().collect();
    let llama = "llama-f32";
    let qwen = "qwen2-f32-tied";
    vec![
        base("llama-r1-qv", llama, 1, 2.0, list(&["q_proj", "v_proj"]), 101),
        base("llama-r8-all-linear", llama, 8, 16.0, Targets::AllLinear, 102),
        // rsLoRA: scaling 8/sqrt(16) = 2, where plain LoRA would give 0.5.
        AdapterSpec {
            use_rslora: true,
            ..base("llama-r16-rslora-qkvo", llama, 16, 8.0, list(&ATTN), 103)
        },
        base("llama-r64-mlp", llama, 64, 32.0, list(&MLP), 104),
        // Only layer 1's q and v, via a regex string.
        base(
            "llama-regex-l1-qv",
            llama,
            4,
            8.0,
            Targets::Regex(r"model\.layers\.1\.self_attn\.(q|v)_proj".into()),
            105,
        ),
        // Per-module ranks and alphas: q r2, layer-1 up/down r16, the rest r8; o and v get
        // their own alphas (one of them fractional).
        AdapterSpec {
            rank_pattern: [
                ("q_proj".to_string(), 2),
                (r"layers\.1\.mlp\.(up|down)_proj".to_string(), 16),
            ]
            .into(),
            alpha_pattern: [("o_proj".to_string(), 64.0), ("v_proj".to_string(), 2.5)].into(),
            ..base("llama-rank-alpha-pattern", llama, 8, 16.0, list(&all), 106)
        },
        AdapterSpec {
            layers_to_transform: Some(vec![1]),
            ..base(
                "llama-layers1",
                llama,
                4,
                4.0,
                list(&["q_proj", "v_proj", "o_proj", "down_proj"]),
                107,
            )
        },
        AdapterSpec {
            dtype: DType::Bf16,
            ..base(
                "llama-bf16-r8",
                llama,
                8,
                16.0,
                list(&["q_proj", "k_proj", "up_proj"]),
                108,
            )
        },
        base("qwen2-r4-qkv", qwen, 4, 8.0, list(&["q_proj", "k_proj", "v_proj"]), 201),
        AdapterSpec {
            use_rslora: true,
            ..base("qwen2-r8-all-linear-rslora", qwen, 8, 16.0, Targets::AllLinear, 202)
        },
        AdapterSpec {
            rank_pattern: [("down_proj".to_string(), 32)].into(),
            dtype: DType::Bf16,
            ..base(
                "qwen2-r2-o-down-bf16",
                qwen,
                2,
                4.0,
                list(&["o_proj", "down_proj"]),
                203,
            )
        },
    ]
}

pub fn adapter_spec_by_name(name: &str) -> Option<AdapterSpec> {
    golden_adapter_specs().into_iter().find(|s| s.name == name)
}

/// Writes the base models of the golden adapters to `root/<base>` and every golden adapter
/// to `root/adapters/<name>`. Returns `(base, dir)` and `(adapter, base, dir)` lists.
#[allow(clippy::type_complexity)]
pub fn write_lora_goldens(root: &Path) -> Result<(Vec<(String, PathBuf)>, Vec<(String, String, PathBuf)>)> {
    let specs = golden_adapter_specs();
    let mut bases: Vec<String> = specs.iter().map(|s| s.base.clone()).collect();
    bases.sort();
    bases.dedup();
    let mut models = Vec::new();
    for b in bases {
        let spec = spec_by_name(&b).with_context(|| format!("unknown base model {b}"))?;
        let dir = root.join(&b);
        crate::write_model(&spec, &dir)?;
        models.push((b, dir));
    }
    let mut adapters = Vec::new();
    for s in specs {
        if s.name.is_empty() || s.name.contains(['/', '\\']) || s.name == "." || s.name == ".." {
            bail!("bad adapter name {:?}", s.name);
        }
        let dir = root.join("adapters").join(&s.name);
        write_adapter(&s, &dir)?;
        adapters.push((s.name, s.base, dir));
    }
    Ok((models, adapters))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_index_like_peft() {
        assert_eq!(layer_index("model.layers.12.mlp.up_proj"), Some(12));
        assert_eq!(layer_index("model.layers.0.self_attn.q_proj"), Some(0));
        assert_eq!(layer_index("lm_head"), None);
        // The first numbered segment wins (e.g. MoE expert indices come later).
        assert_eq!(layer_index("model.layers.3.experts.7.w1"), Some(3));
    }

    #[test]
    fn pattern_key_is_suffix_anchored() -> Result<()> {
        let p: BTreeMap<String, usize> = [("q_proj".to_string(), 2), (r"1\.mlp\.up_proj".to_string(), 5)].into();
        assert_eq!(pattern_key(&p, "model.layers.0.self_attn.q_proj")?, Some(&2));
        assert_eq!(pattern_key(&p, "model.layers.0.self_attn.xq_proj")?, None);
        assert_eq!(pattern_key(&p, "model.layers.1.mlp.up_proj")?, Some(&5));
        assert_eq!(pattern_key(&p, "model.layers.11.mlp.up_proj")?, None);
        Ok(())
    }
}

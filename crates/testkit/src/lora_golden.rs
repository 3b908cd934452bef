//! LoRA goldens produced by `tests/oracle/make_lora_goldens.py` (transformers + PEFT) and
//! helpers to use them.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::adapter::{golden_adapter_specs, write_adapter};
use crate::golden::{file_hashes, goldens_dir, hash_diffs, load_golden};
use crate::spec::spec_by_name;
use crate::write_model;

/// Versions of the reference implementation that produced a LoRA golden file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraGenerator {
    pub torch: String,
    pub transformers: String,
    pub peft: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenAdapter {
    /// sha256 (hex) of `adapter_config.json` and `adapter_model.safetensors`.
    pub files: BTreeMap<String, String>,
}

/// One prompt run with a single adapter active (PEFT `set_adapter`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraSingle {
    pub adapter: String,
    pub ids: Vec<u32>,
    /// f32 logits at the last position of a forward pass over `ids`.
    pub last_logits: Vec<f32>,
    /// Greedy continuation (full recompute each step).
    pub greedy: Vec<u32>,
    /// Top-1 minus top-2 logit at each greedy step; small margins may legitimately flip.
    pub greedy_margins: Vec<f32>,
}

/// One row of the mixed batch: an adapter name, or `None` for the base model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedRow {
    pub adapter: Option<String>,
    pub ids: Vec<u32>,
}

/// One forward pass over rows of equal length, each with its own adapter
/// (`model(input_ids, adapter_names=[...])`, `"__base__"` for `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraMixed {
    pub rows: Vec<MixedRow>,
    /// Last-position logits of each row.
    pub last_logits: Vec<Vec<f32>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraGolden {
    /// Golden model name of the base.
    pub base: String,
    pub generator: LoraGenerator,
    pub adapters: BTreeMap<String, GoldenAdapter>,
    pub single: Vec<LoraSingle>,
    pub mixed: LoraMixed,
}

/// Reads `tests/goldens/lora/<base>.json`.
pub fn load_lora_golden(base: &str) -> Result<LoraGolden> {
    let path = goldens_dir().join("lora").join(format!("{base}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading LoRA golden {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing LoRA golden {}", path.display()))
}

const REGENERATE: &str = "The test kit changed: regenerate the LoRA goldens with \
                          `python tests/oracle/make_lora_goldens.py` (see its docstring) and commit them.";

/// Writes base model `base` to `<tmp>/base` and each of its golden adapters to
/// `<tmp>/adapters/<name>`, checking every file against the sha256 the goldens were computed
/// on (the base against `tests/goldens/<base>.json`). Keep the `TempDir` alive while using
/// the paths.
pub fn materialize_lora(base: &str) -> Result<(tempfile::TempDir, LoraGolden)> {
    let golden = load_lora_golden(base)?;
    if golden.base != base {
        bail!("LoRA golden for {base} names base {}", golden.base);
    }
    let model = spec_by_name(base).with_context(|| format!("no test kit spec named {base}"))?;
    let dir = tempfile::Builder::new()
        .prefix(&format!("quiver-lora-{base}-"))
        .tempdir()
        .context("creating temp dir")?;
    let base_dir = dir.path().join("base");
    write_model(&model, &base_dir)?;
    if let Some(diffs) = hash_diffs(&file_hashes(&base_dir)?, &load_golden(base)?.files) {
        bail!(
            "model files for {base} differ from the ones its golden was computed on ({diffs}). \
             Regenerate the model goldens (`python tests/oracle/make_goldens.py`) and the LoRA \
             goldens (`python tests/oracle/make_lora_goldens.py`) and commit them."
        );
    }
    let specs: BTreeMap<String, _> = golden_adapter_specs()
        .into_iter()
        .filter(|s| s.base == base)
        .map(|s| (s.name.clone(), s))
        .collect();
    let missing: Vec<&String> = specs.keys().filter(|n| !golden.adapters.contains_key(*n)).collect();
    if !missing.is_empty() {
        bail!("the test kit has adapters for {base} that the LoRA golden lacks: {missing:?}. {REGENERATE}");
    }
    for (name, want) in &golden.adapters {
        let spec = specs
            .get(name)
            .with_context(|| format!("LoRA golden {base} has adapter {name}, the test kit does not. {REGENERATE}"))?;
        let adir = dir.path().join("adapters").join(name);
        write_adapter(spec, &adir)?;
        if let Some(diffs) = hash_diffs(&file_hashes(&adir)?, &want.files) {
            bail!("adapter files for {name} differ from the ones its golden was computed on ({diffs}). {REGENERATE}");
        }
    }
    Ok((dir, golden))
}

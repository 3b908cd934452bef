//! Reads a PEFT adapter directory into validated host tensors: every targeted module has
//! exactly its A `[rank, in]` and B `[out, rank]`, finite, with an update that cannot overflow,
//! and nothing else is in the file. Everything the config and the safetensors header say is
//! checked against the base model and the file's length before any tensor data is read; the
//! data is then read one tensor at a time.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use quiver_model::{HostLoraModule, ModelConfig, ModuleKind};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use serde_json::Value;

use crate::bounds::{max_abs, page_overflow, update_overflow};
use crate::config::LoraConfig;
use crate::error::AdapterError;
use crate::files::{read_capped, SafetensorsFile, MAX_CONFIG_BYTES, MAX_HEADER_BYTES};

/// A validated adapter in host memory, ready to upload into a page pool or merge into the base.
#[derive(Debug, Clone)]
pub struct HostAdapter {
    pub name: String,
    pub modules: Vec<HostLoraModule>,
}

impl HostAdapter {
    pub fn max_rank(&self) -> usize {
        self.modules.iter().map(|m| m.rank).max().unwrap_or(0)
    }
    /// Bytes of f32 weights (what the page pool will hold).
    pub fn bytes(&self) -> usize {
        self.modules.iter().map(|m| 4 * (m.a.len() + m.b.len())).sum()
    }
}

const PREFIX: &str = "base_model.model.";

/// What a load may accept beyond what the file and the base model allow.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadLimits {
    /// The largest rank accepted (`--max-lora-rank`), checked before any tensor is read.
    pub max_rank: Option<usize>,
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (3, Q, 'A').
fn parse_key(key: &str) -> Option<(usize, ModuleKind, char)> {
    let rest = key.strip_prefix(PREFIX)?.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (parent, rest) = rest.split_once('.')?;
    let (proj, rest) = rest.split_once('.')?;
    let which = match rest {
        "lora_A.weight" => 'A',
        "lora_B.weight" => 'B',
        _ => return None,
    };
    let kind = ModuleKind::from_proj_name(proj).filter(|k| k.parent() == parent)?;
    Some((layer.parse().ok()?, kind, which))
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// Loads and validates the adapter in `dir` for a base model with config `model`.
pub fn load_peft_adapter(name: &str, dir: &Path, model: &ModelConfig) -> Result<HostAdapter, AdapterError> {
    load_peft_adapter_with(name, dir, model, LoadLimits::default())
}

/// [`load_peft_adapter`] under `limits`.
pub fn load_peft_adapter_with(
    name: &str,
    dir: &Path,
    model: &ModelConfig,
    limits: LoadLimits,
) -> Result<HostAdapter, AdapterError> {
    let io = |path: &Path, reason: String| AdapterError::Io {
        adapter: name.into(),
        path: path.display().to_string(),
        reason,
    };
    let cfg_path = dir.join("adapter_config.json");
    let text = read_capped(&cfg_path, MAX_CONFIG_BYTES).map_err(|e| io(&cfg_path, e))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, format!("invalid JSON: {e}")))?;
    let field = |(field, reason): (String, String)| AdapterError::Config {
        adapter: name.into(),
        field,
        reason,
    };
    let cfg = LoraConfig::parse(&json, model.arch).map_err(field)?;
    let targets = cfg.resolve(model).map_err(field)?;
    if let Some(max) = limits.max_rank {
        if let Some(t) = targets.iter().find(|t| t.rank > max) {
            let field = if t.rank == cfg.r { "r" } else { "rank_pattern" };
            return Err(AdapterError::Config {
                adapter: name.into(),
                field: field.into(),
                reason: format!(
                    "rank {} of {} exceeds --max-lora-rank {max}",
                    t.rank,
                    t.kind.path(t.layer)
                ),
            });
        }
    }

    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(io(
            &st_path,
            "only safetensors adapters are supported (found adapter_model.bin)".into(),
        ));
    }
    let mut st = SafetensorsFile::open(&st_path, MAX_HEADER_BYTES).map_err(|e| io(&st_path, e))?;
    let tensor_err = |tensor: &str, reason: String| AdapterError::Tensor {
        adapter: name.into(),
        tensor: tensor.into(),
        reason,
    };

    // Names and dtypes, in name order so that the first error is always the same one.
    let header: BTreeMap<String, TensorInfo> = st
        .metadata
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.clone()))
        .collect();
    let mut found: BTreeMap<(usize, ModuleKind, char), (String, TensorInfo)> = BTreeMap::new();
    for (key, info) in header {
        let parsed = parse_key(&key)
            .ok_or_else(|| tensor_err(&key, "not a LoRA weight of a q/k/v/o/gate/up/down projection".into()))?;
        if !matches!(info.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(tensor_err(
                &key,
                format!("dtype {:?} (supported: f32, bf16, f16)", info.dtype),
            ));
        }
        found.insert(parsed, (key, info));
    }
    // Shapes against the base model and the config, and nothing missing or left over.
    let mut planned = Vec::with_capacity(targets.len());
    for t in &targets {
        let (in_f, out_f) = t.kind.dims(model);
        let mut take = |which: char, shape: [usize; 2]| {
            let key = format!("{PREFIX}{}.lora_{which}.weight", t.kind.path(t.layer));
            let (key, info) = found
                .remove(&(t.layer, t.kind, which))
                .ok_or_else(|| tensor_err(&key, "missing".into()))?;
            if info.shape != shape {
                return Err(tensor_err(
                    &key,
                    format!(
                        "shape {:?}, expected {shape:?} (rank {} for this module)",
                        info.shape, t.rank
                    ),
                ));
            }
            Ok((key, info))
        };
        let a = take('A', [t.rank, in_f])?;
        let b = take('B', [out_f, t.rank])?;
        planned.push((t, a, b));
    }
    if let Some((key, _)) = found.into_values().next() {
        return Err(tensor_err(
            &key,
            "present in the file but not targeted by adapter_config.json".into(),
        ));
    }

    // Only now the data, one tensor at a time.
    let mut read = |(key, info): &(String, TensorInfo)| -> Result<Vec<f32>, AdapterError> {
        let bytes = st
            .read(info)
            .map_err(|e| io(&st_path, format!("reading `{key}`: {e}")))?;
        let data = to_f32(info.dtype, &bytes)
            .ok_or_else(|| tensor_err(key, format!("dtype {:?} (supported: f32, bf16, f16)", info.dtype)))?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(tensor_err(key, format!("non-finite value {} at index {i}", data[i])));
        }
        if let Some(reason) = page_overflow(max_abs(&data)) {
            return Err(tensor_err(key, reason));
        }
        Ok(data)
    };
    let mut modules = Vec::with_capacity(planned.len());
    for (t, a_info, b_info) in planned {
        let a = read(&a_info)?;
        let b = read(&b_info)?;
        let (in_f, _) = t.kind.dims(model);
        if let Some(reason) = update_overflow(in_f, t.rank, t.scale, max_abs(&a), max_abs(&b)) {
            return Err(tensor_err(&format!("{PREFIX}{}", t.kind.path(t.layer)), reason));
        }
        modules.push(HostLoraModule {
            layer: t.layer,
            kind: t.kind,
            rank: t.rank,
            scale: t.scale,
            a,
            b,
        });
    }
    Ok(HostAdapter {
        name: name.to_string(),
        modules,
    })
}

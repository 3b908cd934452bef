//! Reads a PEFT adapter directory into validated host tensors: every targeted module has
//! exactly its A `[rank, in]` and B `[out, rank]`, finite, and nothing else is in the file.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use quiver_model::{HostLoraModule, ModelConfig, ModuleKind};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::LoraConfig;
use crate::error::AdapterError;

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

/// A tensor read from the file: its key, shape and values widened to f32.
type FoundTensor = (String, Vec<usize>, Vec<f32>);

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
    let io = |path: &Path, reason: String| AdapterError::Io {
        adapter: name.into(),
        path: path.display().to_string(),
        reason,
    };
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| io(&cfg_path, e.to_string()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| io(&cfg_path, format!("invalid JSON: {e}")))?;
    let field = |(field, reason): (String, String)| AdapterError::Config {
        adapter: name.into(),
        field,
        reason,
    };
    let cfg = LoraConfig::parse(&json, model.arch).map_err(field)?;
    let targets = cfg.resolve(model).map_err(field)?;

    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(io(
            &st_path,
            "only safetensors adapters are supported (found adapter_model.bin)".into(),
        ));
    }
    let bytes = std::fs::read(&st_path).map_err(|e| io(&st_path, e.to_string()))?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| io(&st_path, format!("not a valid safetensors file: {e}")))?;
    let tensor_err = |tensor: &str, reason: String| AdapterError::Tensor {
        adapter: name.into(),
        tensor: tensor.into(),
        reason,
    };

    let mut found: BTreeMap<(usize, ModuleKind, char), FoundTensor> = BTreeMap::new();
    for (key, view) in st.tensors() {
        let parsed = parse_key(&key)
            .ok_or_else(|| tensor_err(&key, "not a LoRA weight of a q/k/v/o/gate/up/down projection".into()))?;
        let data = to_f32(view.dtype(), view.data())
            .ok_or_else(|| tensor_err(&key, format!("dtype {:?} (supported: f32, bf16, f16)", view.dtype())))?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(tensor_err(&key, format!("non-finite value {} at index {i}", data[i])));
        }
        found.insert(parsed, (key.clone(), view.shape().to_vec(), data));
    }
    let mut modules = Vec::with_capacity(targets.len());
    for t in &targets {
        let (in_f, out_f) = t.kind.dims(model);
        let mut take = |which: char, shape: [usize; 2]| {
            let key = format!("{PREFIX}{}.lora_{which}.weight", t.kind.path(t.layer));
            let (_, got, data) = found
                .remove(&(t.layer, t.kind, which))
                .ok_or_else(|| tensor_err(&key, "missing".into()))?;
            if got != shape {
                return Err(tensor_err(
                    &key,
                    format!("shape {got:?}, expected {shape:?} (rank {} for this module)", t.rank),
                ));
            }
            Ok(data)
        };
        let a = take('A', [t.rank, in_f])?;
        let b = take('B', [out_f, t.rank])?;
        modules.push(HostLoraModule {
            layer: t.layer,
            kind: t.kind,
            rank: t.rank,
            scale: t.scale,
            a,
            b,
        });
    }
    if let Some((key, _, _)) = found.into_values().next() {
        return Err(tensor_err(
            &key,
            "present in the file but not targeted by adapter_config.json".into(),
        ));
    }
    Ok(HostAdapter {
        name: name.to_string(),
        modules,
    })
}

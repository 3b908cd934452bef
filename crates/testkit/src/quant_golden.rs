//! Goldens of quantized bases (`--quantization int8|int4`), produced by
//! `tests/oracle/make_quant_goldens.py`: transformers in f32 on the weights as Quiver
//! dequantizes them, with and without a LoRA adapter.
//!
//! [`write_dequantized`] writes the oracle's input: the model directory with every weight Quiver
//! quantizes (each layer's q/k/v/o/gate/up/down, and the LM head or tied embedding as int8)
//! replaced by its dequantized f32 values, computed with Quiver's own quantizer. The oracle
//! quantizes the original weights once more by the format's definition and checks that it gets
//! the same values to the bit, so the format is checked independently of Quiver's code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use quiver_tensor::quant::quantize;
use quiver_tensor::{Matrix, QuantFormat};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::golden::{file_hashes, goldens_dir, GoldenPrompt};
use crate::lora_golden::LoraSingle;

/// (model, format) pairs with a quantized golden; the f32 ones also have LoRA goldens, whose
/// adapters run on the quantized base.
pub const QUANT_GOLDENS: [(&str, QuantFormat); 5] = [
    ("llama-f32", QuantFormat::Int8),
    ("llama-f32", QuantFormat::Int4),
    ("qwen2-f32-tied", QuantFormat::Int8),
    ("qwen2-f32-tied", QuantFormat::Int4),
    ("llama-bf16-tied-sharded", QuantFormat::Int4),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantGolden {
    pub model: String,
    /// `int8` or `int4`.
    pub format: String,
    pub generator: crate::Generator,
    /// sha256 of the dequantized `model.safetensors` the logits were computed on.
    pub dequantized_sha256: String,
    /// The base model alone.
    pub prompts: Vec<GoldenPrompt>,
    /// One adapter at a time on the quantized base (PEFT on the dequantized weights).
    pub adapters: Vec<LoraSingle>,
}

pub fn quant_golden_name(model: &str, format: QuantFormat) -> String {
    format!("{model}-{format}")
}

/// Reads `tests/goldens/quant/<model>-<format>.json`.
pub fn load_quant_golden(model: &str, format: QuantFormat) -> Result<QuantGolden> {
    let path = goldens_dir()
        .join("quant")
        .join(format!("{}.json", quant_golden_name(model, format)));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading quant golden {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing quant golden {}", path.display()))
}

/// How Quiver stores a tensor of the checkpoint under `format`: the layers' linear weights in
/// the format, the LM head (or a tied embedding) in int8, everything else as it is.
pub fn quantized_as(name: &str, format: QuantFormat, tied: bool) -> Option<QuantFormat> {
    const LINEARS: [&str; 7] = [
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ];
    if name.starts_with("model.layers.") && LINEARS.iter().any(|l| name.ends_with(l)) {
        Some(format)
    } else if name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight") {
        Some(QuantFormat::Int8)
    } else {
        None
    }
}

/// Writes `model_dir` into `out` with its weights dequantized as Quiver stores them under
/// `format` (one f32 `model.safetensors`; config, tokenizer and templates copied).
pub fn write_dequantized(model_dir: &Path, out: &Path, format: QuantFormat) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(model_dir.join("config.json"))?)?;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(model_dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if name.ends_with(".safetensors") {
            files.push(path);
        } else if name != "model.safetensors.index.json" && path.is_file() {
            std::fs::copy(&path, out.join(&name))?;
        }
    }
    files.sort();
    let mut tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for path in &files {
        let bytes = std::fs::read(path)?;
        let st = SafeTensors::deserialize(&bytes).with_context(|| format!("reading {}", path.display()))?;
        for (name, v) in st.tensors() {
            let values: Vec<f32> = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::BF16 => v
                    .data()
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => bail!("{name}: dtype {other:?} (the test kit writes f32 and bf16)"),
            };
            tensors.insert(
                name,
                (
                    v.shape().to_vec(),
                    values.iter().flat_map(|x| x.to_le_bytes()).collect(),
                ),
            );
        }
    }
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false) && !tensors.contains_key("lm_head.weight");
    for (name, (shape, data)) in tensors.iter_mut() {
        let Some(f) = quantized_as(name, format, tied) else {
            continue;
        };
        let [rows, cols] = shape[..] else {
            bail!("{name}: shape {shape:?} is not a matrix")
        };
        let values: Vec<f32> = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let q = quantize(&Matrix::from_f32(rows, cols, values)?, f)?;
        *data = q.to_f32_vec().iter().flat_map(|x| x.to_le_bytes()).collect();
    }
    let views: Vec<(&String, TensorView)> = tensors
        .iter()
        .map(|(n, (s, d))| Ok((n, TensorView::new(Dtype::F32, s.clone(), d)?)))
        .collect::<Result<_>>()?;
    std::fs::write(out.join("model.safetensors"), safetensors::serialize(views, None)?)?;
    Ok(())
}

/// sha256 of the dequantized weights of `model_dir` under `format`.
pub fn dequantized_sha256(model_dir: &Path, format: QuantFormat) -> Result<String> {
    let tmp = tempfile::Builder::new().prefix("quiver-dequantized-").tempdir()?;
    write_dequantized(model_dir, tmp.path(), format)?;
    file_hashes(tmp.path())?
        .remove("model.safetensors")
        .context("no model.safetensors written")
}

/// For the oracle: every quantized golden's base in `root/<model>` and its dequantized form in
/// `root/<model>-<format>`; returns (model, format, base dir, dequantized dir).
pub fn write_quant_goldens(root: &Path) -> Result<Vec<(String, QuantFormat, PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for (model, format) in QUANT_GOLDENS {
        let spec = crate::spec_by_name(model).with_context(|| format!("no test kit spec {model}"))?;
        let base = root.join(model);
        if !base.join("config.json").exists() {
            crate::write_model(&spec, &base)?;
        }
        let deq = root.join(quant_golden_name(model, format));
        write_dequantized(&base, &deq, format)?;
        out.push((model.to_string(), format, base, deq));
    }
    Ok(out)
}

/// Pre-quantized checkpoints with goldens, `(case, base model)`: written by
/// `tests/oracle/make_prequant_goldens.py` into `tests/goldens/prequant/<case>/` (config.json
/// with `quantization_config`, model.safetensors) beside `<case>.json`.
pub const PREQUANT_GOLDENS: [(&str, &str); 7] = [
    ("llama-f32-gptq-4bit-g32-sym", "llama-f32"),
    ("llama-f32-gptq-4bit-g64", "llama-f32"),
    ("llama-f32-gptq-8bit-channel", "llama-f32"),
    ("qwen2-f32-tied-gptq-8bit-channel-sym", "qwen2-f32-tied"),
    ("qwen2-f32-tied-gptq-4bit-channel", "qwen2-f32-tied"),
    ("llama-f32-awq-4bit-g32", "llama-f32"),
    ("llama-f32-awq-4bit-g64", "llama-f32"),
];

/// Reads `tests/goldens/prequant/<case>.json` (its `dequantized_sha256` hashes the dequantized
/// linears, see the oracle script).
pub fn load_prequant_golden(case: &str) -> Result<QuantGolden> {
    let path = goldens_dir().join("prequant").join(format!("{case}.json"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The test kit's `base` with its LoRA golden adapters ([`crate::materialize_lora`]), the base's
/// config and weights replaced by the committed checkpoint of `case`: a model directory as a
/// user downloads it. Returns the temp dir and the model directory in it.
pub fn materialize_prequant(case: &str, base: &str) -> Result<(tempfile::TempDir, PathBuf)> {
    let (dir, _) = crate::materialize_lora(base)?;
    let model = dir.path().join("base");
    for entry in std::fs::read_dir(&model)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "safetensors") || path.ends_with("model.safetensors.index.json") {
            std::fs::remove_file(&path)?;
        }
    }
    let src = goldens_dir().join("prequant").join(case);
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(name), model.join(name)).with_context(|| format!("copying {case}/{name}"))?;
    }
    Ok((dir, model))
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

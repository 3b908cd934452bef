//! Deterministic weight generation and safetensors writing.
//!
//! Values come from a counter-based generator (splitmix64 of seed + index), so any element
//! can be computed independently: chunks are filled in parallel and the bytes never depend
//! on the thread count. Only integer ops and IEEE add/mul are used (no libm), so the bytes
//! are the same on every machine.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use safetensors::tensor::{Dtype, View};
use serde_json::json;

use crate::spec::{DType, ModelSpec};

const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Approximately standard normal: Irwin-Hall sum of four 16-bit uniforms, rescaled to
/// unit variance (range about ±3.46, which is fine for test weights).
fn normal(stream: u64, index: u64) -> f32 {
    let r = mix64(stream.wrapping_add(index.wrapping_add(1).wrapping_mul(GAMMA)));
    let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
    // Var of one U{0..65535} is (65536^2 - 1)/12; four of them: std ~= 37837.2269.
    (sum as f32 - 131_070.0) * (1.0 / 37_837.227)
}

/// How a tensor's values are distributed: `mean + std * N(0, 1)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Init {
    pub mean: f32,
    pub std: f32,
}

/// One tensor of the checkpoint, before its data is generated.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// PyTorch order: `[out_features, in_features]` for linear weights.
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Every tensor of the model, sorted by name, with HF names and shapes.
pub fn tensor_specs(spec: &ModelSpec, vocab: usize) -> Vec<TensorSpec> {
    let h = spec.hidden_size;
    let q = spec.num_heads * spec.head_dim();
    let kv = spec.num_kv_heads * spec.head_dim();
    let inter = spec.intermediate_size;
    let linear = |name: String, out: usize, inp: usize| TensorSpec {
        name,
        shape: vec![out, inp],
        init: Init {
            mean: 0.0,
            std: 1.0 / (inp as f32).sqrt(),
        },
    };
    // Norm weights near 1 and small biases keep activations well scaled while still
    // making a wrong "weight = 1" / "no bias" shortcut visible in the outputs.
    let norm = |name: String| TensorSpec {
        name,
        shape: vec![h],
        init: Init { mean: 1.0, std: 0.1 },
    };
    let bias = |name: String, n: usize| TensorSpec {
        name,
        shape: vec![n],
        init: Init { mean: 0.0, std: 0.1 },
    };
    // Layer 0 sees the embeddings through RMSNorm, so their scale only sets how much of the
    // raw token survives in the residual stream. At std 1 it dominates, and a tied model
    // then greedily repeats its last input token; at 0.3 the layers drive the output and
    // tied logits still have a std of about 0.3 * sqrt(hidden) (2.4 at hidden 64).
    let mut t = vec![
        TensorSpec {
            name: "model.embed_tokens.weight".into(),
            shape: vec![vocab, h],
            init: Init { mean: 0.0, std: 0.3 },
        },
        norm("model.norm.weight".into()),
    ];
    if !spec.tie_word_embeddings {
        // Logit std ~2.5 (the normed hidden state has norm sqrt(hidden)), so greedy
        // margins are mostly well above f32 noise.
        let mut head = linear("lm_head.weight".into(), vocab, h);
        head.init.std = 2.5 / (h as f32).sqrt();
        t.push(head);
    }
    for i in 0..spec.num_layers {
        let p = format!("model.layers.{i}");
        t.push(norm(format!("{p}.input_layernorm.weight")));
        t.push(norm(format!("{p}.post_attention_layernorm.weight")));
        for (proj, out) in [("q", q), ("k", kv), ("v", kv)] {
            t.push(linear(format!("{p}.self_attn.{proj}_proj.weight"), out, h));
            if spec.attention_bias {
                t.push(bias(format!("{p}.self_attn.{proj}_proj.bias"), out));
            }
        }
        t.push(linear(format!("{p}.self_attn.o_proj.weight"), h, q));
        t.push(linear(format!("{p}.mlp.gate_proj.weight"), inter, h));
        t.push(linear(format!("{p}.mlp.up_proj.weight"), inter, h));
        t.push(linear(format!("{p}.mlp.down_proj.weight"), h, inter));
    }
    t.sort_by(|a, b| a.name.cmp(&b.name));
    t
}

/// Fills `out` (little-endian bytes of `dtype`) with the values of tensor `t`.
fn fill(out: &mut [u8], t: &TensorSpec, dtype: DType, seed: u64) {
    let stream = mix64(seed ^ mix64(fnv1a64(&t.name)));
    let size = dtype.size();
    // Chunks of whole elements; each chunk knows its first element index.
    const CHUNK: usize = 1 << 20;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let work = |(ci, chunk): (usize, &mut [u8])| {
        let first = (ci * CHUNK) as u64;
        for (j, dst) in chunk.chunks_exact_mut(size).enumerate() {
            let v = t.init.mean + t.init.std * normal(stream, first + j as u64);
            match dtype {
                DType::F32 => dst.copy_from_slice(&v.to_le_bytes()),
                DType::Bf16 => dst.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
            }
        }
    };
    let chunks: Vec<(usize, &mut [u8])> = out.chunks_mut(CHUNK * size).enumerate().collect();
    if threads <= 1 || chunks.len() <= 1 {
        chunks.into_iter().for_each(work);
        return;
    }
    // Round-robin chunks over threads; the result is independent of the assignment.
    let mut buckets: Vec<Vec<(usize, &mut [u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (k, c) in chunks.into_iter().enumerate() {
        buckets[k % threads].push(c);
    }
    std::thread::scope(|s| {
        for b in buckets {
            s.spawn(move || b.into_iter().for_each(work));
        }
    });
}

/// A tensor whose bytes are generated only when safetensors asks for them, so writing a
/// large model holds one tensor in memory at a time.
pub(crate) struct LazyTensor<'a> {
    pub(crate) spec: &'a TensorSpec,
    pub(crate) dtype: DType,
    pub(crate) seed: u64,
}

impl View for LazyTensor<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            DType::F32 => Dtype::F32,
            DType::Bf16 => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.spec.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut buf = vec![0u8; self.data_len()];
        fill(&mut buf, self.spec, self.dtype, self.seed);
        Cow::Owned(buf)
    }

    fn data_len(&self) -> usize {
        self.spec.numel() * self.dtype.size()
    }
}

/// Generates the tensor's values as f32 (bf16 tensors already rounded), for tests.
pub fn tensor_values(t: &TensorSpec, dtype: DType, seed: u64) -> Vec<f32> {
    let mut buf = vec![0u8; t.numel() * dtype.size()];
    fill(&mut buf, t, dtype, seed);
    match dtype {
        DType::F32 => buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::Bf16 => buf
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// File name of shard `i` (0-based) of `n`, as transformers names them.
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Splits the name-sorted tensors into `n` contiguous groups of roughly equal bytes.
fn split_shards(tensors: &[TensorSpec], n: usize, dsize: usize) -> Vec<Vec<&TensorSpec>> {
    let total: usize = tensors.iter().map(|t| t.numel() * dsize).sum();
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new(); n];
    let mut acc = 0usize;
    for t in tensors {
        // Shard index by the byte position of the tensor's midpoint.
        let mid = acc + t.numel() * dsize / 2;
        let k = (mid * n / total.max(1)).min(n - 1);
        shards[k].push(t);
        acc += t.numel() * dsize;
    }
    shards
}

/// safetensors persists a 0600 temp file; give it the usual 0644 so the model dir can be
/// shared (e.g. read by the oracle under another user).
pub(crate) fn make_readable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Writes the safetensors file(s) and, when sharded, `model.safetensors.index.json`.
/// Returns the names of the files written.
pub fn write_weights(spec: &ModelSpec, vocab: usize, dir: &Path) -> Result<Vec<String>> {
    let tensors = tensor_specs(spec, vocab);
    let dsize = spec.dtype.size();
    let shards = split_shards(&tensors, spec.shards, dsize);
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = shard_file_name(i, spec.shards);
        let views = shard.iter().map(|t| {
            let view = LazyTensor {
                spec: t,
                dtype: spec.dtype,
                seed: spec.seed,
            };
            (t.name.clone(), view)
        });
        // One metadata key, so the header serialization is deterministic.
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let path = dir.join(&file);
        safetensors::serialize_to_file(views, Some(meta), &path)
            .with_context(|| format!("writing {}", path.display()))?;
        make_readable(&path)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
        }
        files.push(file);
    }
    if spec.shards > 1 {
        let total: usize = tensors.iter().map(|t| t.numel() * dsize).sum();
        let index = json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let name = "model.safetensors.index.json".to_string();
        crate::config::write_json(&dir.join(&name), &index)?;
        files.push(name);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_variance() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| f64::from(normal(7, i))).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }

    #[test]
    fn shards_are_contiguous_and_nonempty() {
        let spec = crate::spec::golden_specs().swap_remove(1);
        let t = tensor_specs(&spec, 512);
        let s = split_shards(&t, 3, 2);
        assert!(s.iter().all(|g| !g.is_empty()));
        assert_eq!(s.iter().map(Vec::len).sum::<usize>(), t.len());
    }
}

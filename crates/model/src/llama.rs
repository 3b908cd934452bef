//! The Llama family (llama, mistral, qwen2): a config, a `load` that walks the weight names, and
//! a `forward` over one flat ragged batch against the paged KV cache.

use std::path::Path;

use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout, RopeTable};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::lora::{lora_slot, AdapterRun, HostLoraModule, LoraBatch, ModuleKind};
pub use crate::quantize::Quantization;
use crate::quantize::Quantizer;
use crate::rope::rope_table;
use crate::weights::WeightStore;

/// `y = x · Wᵀ + b`.
pub struct Linear<B: Backend> {
    pub weight: B::Weight,
    pub bias: Option<B::Tensor>,
    pub in_features: usize,
    pub out_features: usize,
}

impl<B: Backend> Linear<B> {
    fn load(b: &B, w: &WeightStore, name: &str, dims: (usize, usize), bias: bool, q: &mut Quantizer) -> Result<Self> {
        let (out_f, in_f) = dims;
        let m = q.linear(w, name, (out_f, in_f))?;
        let weight = b.upload_weight(m)?;
        let bias = if bias {
            Some(b.upload(&w.vector(&format!("{name}.bias"), out_f)?)?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            in_features: in_f,
            out_features: out_f,
        })
    }

    /// Base projection plus slot `slot` of this step's adapters (tokens outside every run: base
    /// only).
    pub fn forward(
        &self,
        b: &B,
        x: &B::Tensor,
        rows: usize,
        lora: Option<(&LoraBatch<'_, B>, usize)>,
    ) -> Result<B::Tensor> {
        let mut out = b.zeros(rows * self.out_features)?;
        b.matmul(x, rows, &self.weight, &mut out)?;
        if let Some(bias) = &self.bias {
            b.add_bias(&mut out, bias)?;
        }
        if let Some((batch, slot)) = lora {
            batch.apply(b, slot, x, &mut out)?;
        }
        Ok(out)
    }
}

pub struct Layer<B: Backend> {
    pub input_norm: B::Tensor,
    pub q: Linear<B>,
    pub k: Linear<B>,
    pub v: Linear<B>,
    pub o: Linear<B>,
    pub post_norm: B::Tensor,
    pub gate: Linear<B>,
    pub up: Linear<B>,
    pub down: Linear<B>,
}

impl<B: Backend> Layer<B> {
    pub fn linear(&self, kind: ModuleKind) -> &Linear<B> {
        match kind {
            ModuleKind::Q => &self.q,
            ModuleKind::K => &self.k,
            ModuleKind::V => &self.v,
            ModuleKind::O => &self.o,
            ModuleKind::Gate => &self.gate,
            ModuleKind::Up => &self.up,
            ModuleKind::Down => &self.down,
        }
    }

    fn linear_mut(&mut self, kind: ModuleKind) -> &mut Linear<B> {
        match kind {
            ModuleKind::Q => &mut self.q,
            ModuleKind::K => &mut self.k,
            ModuleKind::V => &mut self.v,
            ModuleKind::O => &mut self.o,
            ModuleKind::Gate => &mut self.gate,
            ModuleKind::Up => &mut self.up,
            ModuleKind::Down => &mut self.down,
        }
    }
}

/// The base weights an adapter merge replaced, kept to restore them exactly.
struct Merged<B: Backend> {
    name: String,
    originals: Vec<(usize, ModuleKind, B::Weight)>,
}

pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Tensor,
    /// `None` when the embeddings are tied.
    lm_head: Option<B::Weight>,
    rope: RopeTable,
    weight_bytes: usize,
    merged: Option<Merged<B>>,
    /// The dtype the checkpoint stores its weights in (before any `--quantization`).
    checkpoint_dtype: DType,
    /// The KV cache's entries; f32 unless [`set_kv_dtype`](Self::set_kv_dtype) says otherwise.
    kv_dtype: DType,
}

/// One step's work: every token of every sequence in the batch, flat.
#[derive(Debug, Clone, Default)]
pub struct ForwardInput {
    pub tokens: Vec<u32>,
    pub attn: AttentionBatch,
    /// Rows (token indices) whose logits are wanted, usually each sequence's last token.
    pub logits_rows: Vec<u32>,
    /// Runs of tokens that use an adapter, sorted and disjoint; other tokens use the base model.
    pub lora: Vec<AdapterRun>,
}

impl<B: Backend> Llama<B> {
    /// Loads weights from `dir` (config already parsed). `max_positions` bounds the rope table.
    pub fn load(backend: B, cfg: ModelConfig, dir: &Path, max_positions: usize) -> Result<Self> {
        Self::load_with(backend, cfg, dir, max_positions, Quantization::default())
    }

    /// [`load`](Self::load), storing the weights as `quant` says.
    pub fn load_with(
        backend: B,
        cfg: ModelConfig,
        dir: &Path,
        max_positions: usize,
        quant: Quantization,
    ) -> Result<Self> {
        let w = WeightStore::open_dir(dir)?;
        Self::from_store_with(backend, cfg, &w, max_positions, quant)
    }

    pub fn from_store(backend: B, cfg: ModelConfig, w: &WeightStore, max_positions: usize) -> Result<Self> {
        Self::from_store_with(backend, cfg, w, max_positions, Quantization::default())
    }

    /// [`from_store`](Self::from_store), storing the weights as `quant` says.
    pub fn from_store_with(
        backend: B,
        cfg: ModelConfig,
        w: &WeightStore,
        max_positions: usize,
        quant: Quantization,
    ) -> Result<Self> {
        let (h, hd, inter) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let b = &backend;
        let mut qz = Quantizer::new(quant, cfg.prequantized)?;
        let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
        let embed_name = "model.embed_tokens.weight";
        let checkpoint_dtype = w.dtype(embed_name).unwrap_or(DType::F32);
        let embed_m = w.matrix(embed_name, cfg.vocab_size, h)?;
        // A tied embedding is the LM head too, so it is stored as the LM head is.
        let embed_m = if tied {
            qz.lm_head(embed_m, embed_name)?
        } else {
            qz.stored += embed_m.bytes();
            embed_m
        };
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, o: usize, n: usize, bias: bool| {
                Linear::load(b, w, &format!("{p}.{name}"), (o, n), bias, &mut qz)
            };
            let (q, k, v) = (
                lin("self_attn.q_proj", qd, h, cfg.qkv_bias)?,
                lin("self_attn.k_proj", kvd, h, cfg.qkv_bias)?,
                lin("self_attn.v_proj", kvd, h, cfg.qkv_bias)?,
            );
            let o = lin("self_attn.o_proj", h, qd, cfg.o_bias)?;
            let (gate, up, down) = (
                lin("mlp.gate_proj", inter, h, false)?,
                lin("mlp.up_proj", inter, h, false)?,
                lin("mlp.down_proj", h, inter, false)?,
            );
            layers.push(Layer {
                input_norm: b.upload(&w.vector(&format!("{p}.input_layernorm.weight"), h)?)?,
                q,
                k,
                v,
                o,
                post_norm: b.upload(&w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?)?,
                gate,
                up,
                down,
            });
        }
        let norm = b.upload(&w.vector("model.norm.weight", h)?)?;
        let lm_head = if tied {
            None
        } else {
            let m = qz.lm_head(w.matrix("lm_head.weight", cfg.vocab_size, h)?, "lm_head.weight")?;
            Some(b.upload_weight(m)?)
        };
        let embed = b.upload_weight(embed_m)?;
        qz.log();
        let weight_bytes = qz.stored;
        let rope = rope_table(&cfg, max_positions.min(cfg.max_position_embeddings));
        Ok(Llama {
            cfg,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            rope,
            weight_bytes,
            merged: None,
            checkpoint_dtype,
            kv_dtype: DType::F32,
        })
    }

    /// Bytes of the weight matrices as stored (after any quantization); with tied embeddings
    /// the embedding matrix counts once, as the LM head: what one decode step streams.
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Folds an adapter into the base weights (`W += scale · B · A`, stored back in the weight's
    /// dtype, or quantized again in its format) so that it costs nothing per token; [`unmerge`](Self::unmerge) restores the exact
    /// originals. One adapter at a time.
    pub fn merge(&mut self, name: &str, modules: &[HostLoraModule]) -> Result<()> {
        if let Some(m) = &self.merged {
            return Err(ModelError::Input(format!(
                "adapter `{}` is already merged; unmerge it first",
                m.name
            )));
        }
        let mut originals = Vec::with_capacity(modules.len());
        for m in modules {
            let (in_f, out_f) = m.kind.dims(&self.cfg);
            if m.layer >= self.layers.len() || m.a.len() != m.rank * in_f || m.b.len() != out_f * m.rank {
                return Err(ModelError::Input(format!(
                    "adapter `{name}`: module {} does not fit the model",
                    m.kind.path(m.layer)
                )));
            }
            let lin = self.layers[m.layer].linear(m.kind);
            let base = self.backend.download_weight(&lin.weight)?;
            let mut w = base.to_f32_vec();
            for (o, row) in w.chunks_mut(in_f).enumerate() {
                for j in 0..m.rank {
                    let coef = m.scale * m.b[o * m.rank + j];
                    for (wi, ai) in row.iter_mut().zip(&m.a[j * in_f..(j + 1) * in_f]) {
                        *wi += coef * ai;
                    }
                }
            }
            let merged = self.backend.upload_weight(base.from_f32_like(out_f, in_f, w)?)?;
            let old = std::mem::replace(&mut self.layers[m.layer].linear_mut(m.kind).weight, merged);
            originals.push((m.layer, m.kind, old));
        }
        self.merged = Some(Merged {
            name: name.to_string(),
            originals,
        });
        Ok(())
    }

    /// Restores the base weights; returns the name of the adapter that was merged.
    pub fn unmerge(&mut self) -> Option<String> {
        let m = self.merged.take()?;
        for (layer, kind, w) in m.originals {
            self.layers[layer].linear_mut(kind).weight = w;
        }
        Some(m.name)
    }

    pub fn merged_adapter(&self) -> Option<&str> {
        self.merged.as_ref().map(|m| m.name.as_str())
    }

    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// Longest sequence the rope table covers.
    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// The dtype the checkpoint stores its weights in (the embedding's; for a quantized base,
    /// what the file held before quantization): what `--kv-cache-dtype auto` picks.
    pub fn checkpoint_dtype(&self) -> DType {
        self.checkpoint_dtype
    }

    /// The dtype of the KV pools this model creates from now on ([`new_kv_pool`](Self::new_kv_pool),
    /// [`kv_layout`](Self::kv_layout)). f32 by default, the exact reference; bf16/f16 halve the
    /// bytes per block (twice the tokens in one budget) at the cost of rounding K and V.
    pub fn set_kv_dtype(&mut self, dtype: DType) {
        self.kv_dtype = dtype;
    }

    pub fn kv_dtype(&self) -> DType {
        self.kv_dtype
    }

    pub fn kv_layout(&self, num_blocks: usize, block_size: usize) -> KvLayout {
        KvLayout {
            num_layers: self.cfg.num_layers,
            num_blocks,
            block_size,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            dtype: self.kv_dtype,
        }
    }

    pub fn new_kv_pool(&self, num_blocks: usize, block_size: usize) -> Result<B::KvPool> {
        Ok(self.backend.new_kv_pool(self.kv_layout(num_blocks, block_size))?)
    }

    fn validate(&self, input: &ForwardInput) -> Result<()> {
        let n = input.tokens.len();
        let a = &input.attn;
        if a.positions.len() != n || a.slots.len() != n || a.seq.len() != n {
            return Err(ModelError::Input(format!(
                "batch of {n} tokens has {} positions, {} slots, {} sequence ids",
                a.positions.len(),
                a.slots.len(),
                a.seq.len()
            )));
        }
        // Token ids are the engine validator's; each backend's `embed` still refuses one outside
        // its table rather than reading past it.
        if let Some(p) = a.positions.iter().find(|&&p| p as usize >= self.max_positions()) {
            return Err(ModelError::Input(format!(
                "position {p} exceeds the maximum context {}",
                self.max_positions()
            )));
        }
        if let Some(r) = input.logits_rows.iter().find(|&&r| r as usize >= n) {
            return Err(ModelError::Input(format!(
                "logits row {r} outside a batch of {n} tokens"
            )));
        }
        let mut end = 0;
        for run in &input.lora {
            if run.start < end || run.start + run.len > n {
                return Err(ModelError::Input(format!(
                    "adapter run {}+{} overlaps or leaves the batch",
                    run.start, run.len
                )));
            }
            if run.adapter.layers.len() != self.cfg.num_layers {
                return Err(ModelError::Input(format!(
                    "adapter `{}` was built for another model",
                    run.adapter.name
                )));
            }
            end = run.start + run.len;
        }
        Ok(())
    }

    /// Runs every token of `input` through the model, writing their K/V into `kv`, and returns
    /// the logits `[logits_rows.len(), vocab]` of the requested rows.
    pub fn forward(&self, input: &ForwardInput, kv: &mut B::KvPool) -> Result<B::Tensor> {
        self.forward_with_adapters(input, kv, None)
    }

    /// [`forward`](Self::forward) with the adapter runs of `input` read from `pages`.
    pub fn forward_with_adapters(
        &self,
        input: &ForwardInput,
        kv: &mut B::KvPool,
        pages: Option<&B::PagePool>,
    ) -> Result<B::Tensor> {
        self.validate(input)?;
        self.backend.install(|| self.forward_inner(input, kv, pages))
    }

    fn forward_inner(
        &self,
        input: &ForwardInput,
        kv: &mut B::KvPool,
        pages: Option<&B::PagePool>,
    ) -> Result<B::Tensor> {
        if !input.lora.is_empty() && pages.is_none() {
            return Err(ModelError::Input(
                "batch uses adapters but no page pool was given".into(),
            ));
        }
        // Built once per step; every layer and projection reads its slot of it.
        let batch = match pages {
            Some(pool) if !input.lora.is_empty() => Some(LoraBatch::new(
                &self.backend,
                pool,
                &input.lora,
                input.tokens.len(),
                &self.cfg,
            )?),
            _ => None,
        };
        let lora = |layer, kind| batch.as_ref().map(|l| (l, lora_slot(layer, kind)));
        let b = &self.backend;
        let cfg = &self.cfg;
        let (n, h, hd) = (input.tokens.len(), cfg.hidden_size, cfg.head_dim);
        let positions = &input.attn.positions;
        let mut hidden = b.zeros(n * h)?;
        b.embed(&self.embed, &input.tokens, &mut hidden)?;
        let mut normed = b.zeros(n * h)?;
        let mut attn = b.zeros(n * cfg.num_heads * hd)?;
        for (li, layer) in self.layers.iter().enumerate() {
            b.rms_norm(&hidden, &layer.input_norm, cfg.rms_norm_eps, &mut normed)?;
            let mut q = layer.q.forward(b, &normed, n, lora(li, ModuleKind::Q))?;
            let mut k = layer.k.forward(b, &normed, n, lora(li, ModuleKind::K))?;
            let v = layer.v.forward(b, &normed, n, lora(li, ModuleKind::V))?;
            b.rope(&mut q, cfg.num_heads, hd, positions, &self.rope)?;
            b.rope(&mut k, cfg.num_kv_heads, hd, positions, &self.rope)?;
            b.write_kv(kv, li, &k, &v, &input.attn.slots)?;
            b.attention(kv, li, &q, cfg.num_heads, &input.attn, &mut attn)?;
            b.add(&mut hidden, &layer.o.forward(b, &attn, n, lora(li, ModuleKind::O))?)?;

            b.rms_norm(&hidden, &layer.post_norm, cfg.rms_norm_eps, &mut normed)?;
            let mut gate = layer.gate.forward(b, &normed, n, lora(li, ModuleKind::Gate))?;
            b.silu_mul(&mut gate, &layer.up.forward(b, &normed, n, lora(li, ModuleKind::Up))?)?;
            b.add(
                &mut hidden,
                &layer.down.forward(b, &gate, n, lora(li, ModuleKind::Down))?,
            )?;
        }
        // Only the rows whose logits are wanted go through the final norm and the LM head.
        let rows = input.logits_rows.len();
        let mut last = b.zeros(rows * h)?;
        b.gather_rows(&hidden, h, &input.logits_rows, &mut last)?;
        let mut last_normed = b.zeros(rows * h)?;
        b.rms_norm(&last, &self.norm, cfg.rms_norm_eps, &mut last_normed)?;
        let mut logits = b.zeros(rows * cfg.vocab_size)?;
        b.matmul(
            &last_normed,
            rows,
            self.lm_head.as_ref().unwrap_or(&self.embed),
            &mut logits,
        )?;
        Ok(logits)
    }
}

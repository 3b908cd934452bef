//! Model specifications: the knobs a test model varies, and the fixed set of golden models.

use anyhow::{bail, Result};

/// Model family, as named by `model_type` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn architecture(self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// Storage dtype of every tensor in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    Bf16,
}

impl DType {
    /// The name transformers uses in `torch_dtype` / `dtype`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::Bf16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
}

/// RoPE variant; mirrors transformers' `rope_type`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rope {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Which transformers generation wrote `config.json`: 4.x puts `rope_theta` and
/// `rope_scaling` at top level with `torch_dtype`; 5.x nests them in `rope_parameters`
/// and says `dtype`. Real checkpoints exist in both forms, so loaders must read both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigForm {
    Transformers4,
    Transformers5,
}

/// Special tokens and chat template style of the tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerFlavor {
    /// `<|begin_of_text|>` prepended by the post-processor, Llama-3 chat headers, eos `<|eot_id|>`.
    Llama,
    /// No BOS, ChatML `<|im_start|>`/`<|im_end|>`, `<|endoftext|>` (Qwen style).
    ChatMl,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub arch: Arch,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Explicit head dim; written to config only when it differs from hidden/heads.
    pub head_dim: Option<usize>,
    pub intermediate_size: usize,
    /// Embedding rows; `None` means the tokenizer's vocabulary size.
    pub vocab_size: Option<usize>,
    pub tie_word_embeddings: bool,
    pub dtype: DType,
    /// 1 = `model.safetensors`; N > 1 = N shards plus `model.safetensors.index.json`.
    pub shards: usize,
    pub rope: Rope,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub config_form: ConfigForm,
    /// q/k/v projection biases (required by qwen2, unsupported here for llama/mistral).
    pub attention_bias: bool,
    pub seed: u64,
    pub tokenizer: TokenizerFlavor,
}

impl ModelSpec {
    /// A small llama f32 model; the golden variants start from this and change a few fields.
    pub fn tiny(name: &str, arch: Arch) -> ModelSpec {
        let qwen = arch == Arch::Qwen2;
        ModelSpec {
            name: name.to_string(),
            arch,
            hidden_size: 64,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: None,
            intermediate_size: 128,
            vocab_size: None,
            tie_word_embeddings: false,
            dtype: DType::F32,
            shards: 1,
            rope: Rope::Default,
            rope_theta: if qwen { 1_000_000.0 } else { 10_000.0 },
            rms_norm_eps: if qwen { 1e-6 } else { 1e-5 },
            max_position_embeddings: 2048,
            config_form: ConfigForm::Transformers4,
            attention_bias: qwen,
            seed: 0,
            tokenizer: if qwen {
                TokenizerFlavor::ChatMl
            } else {
                TokenizerFlavor::Llama
            },
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// True when config.json must carry `head_dim` because it is not hidden/heads.
    pub fn explicit_head_dim(&self) -> bool {
        self.head_dim.is_some_and(|d| d * self.num_heads != self.hidden_size)
    }

    /// Rejects combinations transformers would load differently from what we write.
    pub fn validate(&self) -> Result<()> {
        let n = &self.name;
        if self.num_heads == 0 || self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            bail!("{n}: num_heads must be a positive multiple of num_kv_heads");
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!("{n}: hidden_size not divisible by num_heads and no head_dim given");
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("{n}: head_dim must be even for RoPE");
        }
        if self.shards == 0 {
            bail!("{n}: shards must be >= 1");
        }
        match (self.arch, self.attention_bias) {
            (Arch::Qwen2, false) => bail!("{n}: qwen2 always has q/k/v biases"),
            (Arch::Llama | Arch::Mistral, true) => {
                bail!("{n}: llama attention_bias also biases o_proj; not supported by the kit")
            }
            _ => {}
        }
        Ok(())
    }
}

/// The tiny models whose transformers outputs are committed under `tests/goldens`.
pub fn golden_specs() -> Vec<ModelSpec> {
    let llama_f32 = ModelSpec {
        seed: 1,
        ..ModelSpec::tiny("llama-f32", Arch::Llama)
    };
    let llama_bf16 = ModelSpec {
        head_dim: Some(24),
        tie_word_embeddings: true,
        dtype: DType::Bf16,
        shards: 2,
        rope: Rope::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        },
        rope_theta: 500_000.0,
        config_form: ConfigForm::Transformers5,
        seed: 2,
        ..ModelSpec::tiny("llama-bf16-tied-sharded", Arch::Llama)
    };
    let qwen_f32 = ModelSpec {
        hidden_size: 48,
        intermediate_size: 96,
        tie_word_embeddings: true,
        seed: 3,
        ..ModelSpec::tiny("qwen2-f32-tied", Arch::Qwen2)
    };
    let qwen_bf16 = ModelSpec {
        dtype: DType::Bf16,
        rope: Rope::Linear { factor: 4.0 },
        config_form: ConfigForm::Transformers5,
        seed: 4,
        ..ModelSpec::tiny("qwen2-bf16-linear", Arch::Qwen2)
    };
    let mistral = ModelSpec {
        hidden_size: 32,
        intermediate_size: 96,
        seed: 5,
        ..ModelSpec::tiny("mistral-f32", Arch::Mistral)
    };
    vec![llama_f32, llama_bf16, qwen_f32, qwen_bf16, mistral]
}

/// Qwen2.5-0.5B shapes with random bf16 weights, for benchmarks. The tokenizer is the
/// small test one; embedding rows past it are simply never looked up.
pub fn qwen25_05b_spec() -> ModelSpec {
    ModelSpec {
        hidden_size: 896,
        num_layers: 24,
        num_heads: 14,
        num_kv_heads: 2,
        intermediate_size: 4864,
        vocab_size: Some(151_936),
        tie_word_embeddings: true,
        dtype: DType::Bf16,
        max_position_embeddings: 32_768,
        seed: 25,
        ..ModelSpec::tiny("qwen2.5-0.5b", Arch::Qwen2)
    }
}

/// Llama-3.2-1B shapes (llama3 RoPE scaling, tied embeddings) with random bf16 weights, for
/// benchmarks; like [`qwen25_05b_spec`], the small test tokenizer covers the first rows only.
pub fn llama32_1b_spec() -> ModelSpec {
    ModelSpec {
        hidden_size: 2048,
        num_layers: 16,
        num_heads: 32,
        num_kv_heads: 8,
        head_dim: Some(64),
        intermediate_size: 8192,
        vocab_size: Some(128_256),
        tie_word_embeddings: true,
        dtype: DType::Bf16,
        rope: Rope::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        },
        rope_theta: 500_000.0,
        max_position_embeddings: 131_072,
        seed: 32,
        ..ModelSpec::tiny("llama-3.2-1b", Arch::Llama)
    }
}

/// Looks up a golden spec or a benchmark shape (`qwen2.5-0.5b`, `llama-3.2-1b`) by name.
pub fn spec_by_name(name: &str) -> Option<ModelSpec> {
    golden_specs()
        .into_iter()
        .chain([qwen25_05b_spec(), llama32_1b_spec()])
        .find(|s| s.name == name)
}

//! The test tokenizer: byte-level BPE trained on [`CORPUS`], in two special-token flavors.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::config::write_json;
use crate::corpus::CORPUS;
use crate::spec::{ModelSpec, TokenizerFlavor};

/// Size of the trained BPE vocabulary (256 byte symbols + merges); the flavor's special
/// tokens follow it, as in real Llama 3 / Qwen tokenizers.
pub const BPE_VOCAB_SIZE: usize = 504;

pub const LLAMA_SPECIALS: [&str; 5] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
];
pub const CHATML_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Llama-3-style template: BOS once at the start, role headers, trimmed content.
pub const LLAMA_CHAT_TEMPLATE: &str = r#"{%- for message in messages %}
    {%- if loop.first %}{{- bos_token }}{%- endif %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
    {%- endif %}
{%- endfor %}"#;

/// ChatML template as used by Qwen2.5, without tool support.
pub const CHATML_CHAT_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if not loop.first %}
            {{- raise_exception('The system message must come first') }}
        {%- endif %}
    {%- elif message['role'] == 'user' or message['role'] == 'assistant' %}
        {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"#;

/// Token ids the configs refer to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    /// `bos_token_id` in config.json (Qwen sets it to `<|endoftext|>` though it never adds it).
    pub bos: u32,
    /// `eos_token_id` in config.json.
    pub eos: u32,
    /// `eos_token_id` in generation_config.json: every id that ends a turn.
    pub generation_eos: Vec<u32>,
    pub pad: Option<u32>,
}

fn to_anyhow(e: tokenizers::Error) -> anyhow::Error {
    anyhow!("tokenizers: {e}")
}

/// The pre-tokenizer regex of Qwen2 (also what transformers' `Qwen2Tokenizer` rebuilds).
pub const QWEN2_PRETOKENIZE_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// An untrained tokenizer with the flavor's normalizer, pre-tokenizer and decoder.
///
/// transformers loads model_type `qwen2` with `Qwen2Tokenizer`, which rebuilds its own
/// pipeline (NFC + Qwen regex split + byte level) instead of reading tokenizer.json's, so
/// the ChatML flavor uses exactly that pipeline and both sides tokenize alike. The Llama
/// flavor keeps the plain GPT-2 style byte-level pre-tokenizer, which transformers takes
/// from tokenizer.json as is.
fn pipeline(flavor: TokenizerFlavor) -> Result<Tokenizer> {
    let mut tok = Tokenizer::new(BPE::default());
    match flavor {
        TokenizerFlavor::Llama => {
            tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
        }
        TokenizerFlavor::ChatMl => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_PRETOKENIZE_REGEX.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(to_anyhow)?;
            let byte_level = ByteLevel::new(false, false, false);
            tok.with_normalizer(Some(NFC));
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
            tok.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));
        }
    }
    Ok(tok)
}

/// Trains the byte-level BPE on the corpus. The trainer sorts its alphabet and breaks
/// merge ties by pair id, so the result does not depend on hash or thread order.
fn train_base(flavor: TokenizerFlavor) -> Result<Tokenizer> {
    let mut tok = pipeline(flavor)?;
    let trainer = BpeTrainerBuilder::new()
        .vocab_size(BPE_VOCAB_SIZE)
        .min_frequency(0)
        .show_progress(false)
        // All 256 byte symbols, so any UTF-8 text is encodable.
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut trainer: TrainerWrapper = trainer.into();
    tok.train(&mut trainer, CORPUS.lines().filter(|l| !l.is_empty()))
        .map_err(to_anyhow)?;
    let got = tok.get_vocab_size(false);
    if got != BPE_VOCAB_SIZE {
        return Err(anyhow!("BPE training produced {got} tokens, expected {BPE_VOCAB_SIZE}"));
    }
    Ok(tok)
}

/// The trained tokenizer of a flavor, without special tokens; trained once per process.
fn base(flavor: TokenizerFlavor) -> Result<&'static Tokenizer> {
    type Slot = OnceLock<std::result::Result<Tokenizer, String>>;
    static LLAMA: Slot = OnceLock::new();
    static CHATML: Slot = OnceLock::new();
    let slot = match flavor {
        TokenizerFlavor::Llama => &LLAMA,
        TokenizerFlavor::ChatMl => &CHATML,
    };
    slot.get_or_init(|| train_base(flavor).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("training the test tokenizer failed: {e}"))
}

pub fn specials(flavor: TokenizerFlavor) -> &'static [&'static str] {
    match flavor {
        TokenizerFlavor::Llama => &LLAMA_SPECIALS,
        TokenizerFlavor::ChatMl => &CHATML_SPECIALS,
    }
}

/// The complete tokenizer of a flavor, ready to encode or serialize.
pub fn build_tokenizer(flavor: TokenizerFlavor) -> Result<Tokenizer> {
    let mut tok = base(flavor)?.clone();
    let added: Vec<AddedToken> = specials(flavor).iter().map(|s| AddedToken::from(*s, true)).collect();
    tok.add_special_tokens(&added);
    let id = |s: &str| tok.token_to_id(s).ok_or_else(|| anyhow!("special token {s} missing"));
    match flavor {
        TokenizerFlavor::Llama => {
            let bos = LLAMA_SPECIALS[0];
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A:0"))
                .map_err(|e| anyhow!("{e}"))?
                .try_pair(format!("{bos} $A:0 {bos}:1 $B:1"))
                .map_err(|e| anyhow!("{e}"))?
                .special_tokens(vec![(bos, id(bos)?)])
                .build()
                .map_err(|e| anyhow!("{e}"))?;
            tok.with_post_processor(Some(post));
        }
        TokenizerFlavor::ChatMl => {
            // As in Qwen2's tokenizer.json: a byte-level post-processor (offsets only).
            tok.with_post_processor(Some(ByteLevel::new(false, false, false)));
        }
    }
    Ok(tok)
}

/// Serialized `tokenizer.json`. The tokenizers crate writes vocab and merges in id order and
/// maps with sorted keys, so this is stable.
pub fn tokenizer_json(flavor: TokenizerFlavor) -> Result<String> {
    let mut s = build_tokenizer(flavor)?.to_string(true).map_err(to_anyhow)?;
    s.push('\n');
    Ok(s)
}

/// Total vocabulary (BPE + specials) of a flavor.
pub fn vocab_size(flavor: TokenizerFlavor) -> usize {
    BPE_VOCAB_SIZE + specials(flavor).len()
}

/// Id of special token `i` of the flavor: they follow the BPE vocabulary in order.
fn special_id(flavor: TokenizerFlavor, name: &str) -> u32 {
    let i = specials(flavor).iter().position(|s| *s == name).unwrap_or(0);
    (BPE_VOCAB_SIZE + i) as u32
}

pub fn special_ids(flavor: TokenizerFlavor) -> SpecialIds {
    let id = |s| special_id(flavor, s);
    match flavor {
        TokenizerFlavor::Llama => SpecialIds {
            bos: id("<|begin_of_text|>"),
            eos: id("<|eot_id|>"),
            generation_eos: vec![id("<|end_of_text|>"), id("<|eot_id|>")],
            pad: Some(id("<|end_of_text|>")),
        },
        TokenizerFlavor::ChatMl => SpecialIds {
            bos: id("<|endoftext|>"),
            eos: id("<|im_end|>"),
            generation_eos: vec![id("<|im_end|>"), id("<|endoftext|>")],
            pad: Some(id("<|endoftext|>")),
        },
    }
}

/// (bos, eos, pad) token strings as tokenizer_config.json names them.
fn token_strings(flavor: TokenizerFlavor) -> (Option<&'static str>, &'static str, &'static str) {
    match flavor {
        TokenizerFlavor::Llama => (Some("<|begin_of_text|>"), "<|eot_id|>", "<|end_of_text|>"),
        TokenizerFlavor::ChatMl => (None, "<|im_end|>", "<|endoftext|>"),
    }
}

fn added_token_json(content: &str) -> Value {
    json!({
        "content": content,
        "lstrip": false,
        "normalized": false,
        "rstrip": false,
        "single_word": false,
        "special": true,
    })
}

pub fn tokenizer_config_json(spec: &ModelSpec) -> Value {
    let flavor = spec.tokenizer;
    let (bos, eos, pad) = token_strings(flavor);
    let decoder: Map<String, Value> = specials(flavor)
        .iter()
        .map(|s| (special_id(flavor, s).to_string(), added_token_json(s)))
        .collect();
    let template = match flavor {
        TokenizerFlavor::Llama => LLAMA_CHAT_TEMPLATE,
        TokenizerFlavor::ChatMl => CHATML_CHAT_TEMPLATE,
    };
    json!({
        // Must agree with the post-processor: only the Llama flavor prepends BOS.
        "add_bos_token": bos.is_some(),
        "add_eos_token": false,
        "added_tokens_decoder": decoder,
        "bos_token": bos,
        "chat_template": template,
        "clean_up_tokenization_spaces": false,
        "eos_token": eos,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": spec.max_position_embeddings,
        "pad_token": pad,
        // transformers picks Qwen2Tokenizer for qwen2 whatever this says; name it honestly.
        "tokenizer_class": match flavor {
            TokenizerFlavor::Llama => "PreTrainedTokenizerFast",
            TokenizerFlavor::ChatMl => "Qwen2Tokenizer",
        },
    })
}

pub fn special_tokens_map_json(flavor: TokenizerFlavor) -> Value {
    let (bos, eos, pad) = token_strings(flavor);
    let mut m = Map::new();
    if let Some(b) = bos {
        m.insert("bos_token".into(), added_token_json(b));
    }
    m.insert("eos_token".into(), added_token_json(eos));
    m.insert("pad_token".into(), added_token_json(pad));
    for v in m.values_mut() {
        if let Some(o) = v.as_object_mut() {
            o.remove("special");
        }
    }
    Value::Object(m)
}

/// Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json.
pub fn write_tokenizer_files(spec: &ModelSpec, dir: &Path) -> Result<Vec<String>> {
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, tokenizer_json(spec.tokenizer)?).with_context(|| format!("writing {}", path.display()))?;
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config_json(spec))?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &special_tokens_map_json(spec.tokenizer),
    )?;
    Ok(vec![
        "tokenizer.json".into(),
        "tokenizer_config.json".into(),
        "special_tokens_map.json".into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_is_deterministic() -> Result<()> {
        for flavor in [TokenizerFlavor::Llama, TokenizerFlavor::ChatMl] {
            let a = train_base(flavor)?.to_string(false).map_err(to_anyhow)?;
            let b = train_base(flavor)?.to_string(false).map_err(to_anyhow)?;
            assert_eq!(a, b, "{flavor:?}");
        }
        Ok(())
    }

    #[test]
    fn special_ids_match_the_tokenizer() -> Result<()> {
        for flavor in [TokenizerFlavor::Llama, TokenizerFlavor::ChatMl] {
            let tok = build_tokenizer(flavor)?;
            for s in specials(flavor) {
                assert_eq!(tok.token_to_id(s), Some(special_id(flavor, s)), "{s}");
            }
        }
        Ok(())
    }
}

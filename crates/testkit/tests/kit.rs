//! The test kit must write the same bytes every time, in a layout transformers loads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use quiver_testkit::*;
use safetensors::SafeTensors;
use serde_json::Value;

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

fn spec(name: &str) -> ModelSpec {
    spec_by_name(name).unwrap_or_else(|| panic!("no spec {name}"))
}

#[test]
fn same_bytes_twice() -> Result<()> {
    let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let first = write_golden_models(a.path())?;
    let second = write_golden_models(b.path())?;
    assert_eq!(first.len(), second.len());
    for ((name, da), (_, db)) in first.iter().zip(&second) {
        let (ha, hb) = (file_hashes(da)?, file_hashes(db)?);
        assert!(ha.len() >= 6, "{name}: {ha:?}");
        assert_eq!(ha, hb, "{name} differs between two writes");
    }
    Ok(())
}

/// The committed goldens were computed from files written by another process (a release
/// build run by the oracle script); matching hashes proves cross-process stability.
#[test]
fn goldens_match_current_kit() -> Result<()> {
    for s in golden_specs() {
        let (dir, golden) = materialize(&s.name)?;
        assert_eq!(golden.model, s.name);
        assert_eq!(golden.prompts.len(), 4);
        assert!(!golden.chat.is_empty());
        let vocab = s.vocab_size();
        for p in &golden.prompts {
            assert_eq!(p.last_logits.len(), vocab);
            assert_eq!(p.greedy.len(), p.greedy_margins.len());
            let tok = build_tokenizer(s.tokenizer).map_err(|e| anyhow::anyhow!("{e}"))?;
            let enc = tok.encode(p.text.as_str(), true).map_err(|e| anyhow::anyhow!("{e}"))?;
            assert_eq!(enc.get_ids(), p.ids.as_slice(), "{}: {:?}", s.name, p.text);
        }
        assert!(dir.path().join("config.json").is_file());
    }
    Ok(())
}

#[test]
fn config_has_expected_fields() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, d) in write_golden_models(dir.path())? {
        let s = spec(&name);
        let c = read_json(&d.join("config.json"))?;
        assert_eq!(c["model_type"], s.arch.model_type());
        assert_eq!(c["architectures"][0], s.arch.architecture());
        assert_eq!(c["hidden_act"], "silu");
        assert_eq!(c["hidden_size"], s.hidden_size);
        assert_eq!(c["num_hidden_layers"], s.num_layers);
        assert_eq!(c["num_attention_heads"], s.num_heads);
        assert_eq!(c["num_key_value_heads"], s.num_kv_heads);
        assert_eq!(c["intermediate_size"], s.intermediate_size);
        assert_eq!(c["vocab_size"], s.vocab_size());
        assert_eq!(c["tie_word_embeddings"], s.tie_word_embeddings);
        assert_eq!(c["rms_norm_eps"].as_f64(), Some(s.rms_norm_eps));
        assert_eq!(c.get("head_dim").is_some(), s.explicit_head_dim());
        match s.config_form {
            ConfigForm::Transformers4 => {
                assert_eq!(c["torch_dtype"], s.dtype.torch_name());
                assert_eq!(c["rope_theta"].as_f64(), Some(s.rope_theta));
                assert!(c.get("rope_scaling").is_some());
            }
            ConfigForm::Transformers5 => {
                assert_eq!(c["dtype"], s.dtype.torch_name());
                let p = &c["rope_parameters"];
                assert_eq!(p["rope_theta"].as_f64(), Some(s.rope_theta));
                assert!(p["rope_type"].is_string());
                assert!(c.get("rope_theta").is_none());
            }
        }
        match s.arch {
            Arch::Mistral => assert!(c["sliding_window"].is_null()),
            Arch::Qwen2 => assert_eq!(c["use_sliding_window"], false),
            Arch::Llama => assert_eq!(c["attention_bias"], false),
        }
        let ids = special_ids(s.tokenizer);
        assert_eq!(c["bos_token_id"], ids.bos);
        assert_eq!(c["eos_token_id"], ids.eos);
        let g = read_json(&d.join("generation_config.json"))?;
        assert_eq!(g["eos_token_id"], serde_json::json!(ids.generation_eos));
        let tc = read_json(&d.join("tokenizer_config.json"))?;
        assert!(tc["chat_template"]
            .as_str()
            .is_some_and(|t| t.contains("add_generation_prompt")));
        assert_eq!(tc["add_bos_token"], s.tokenizer == TokenizerFlavor::Llama);
    }
    Ok(())
}

#[test]
fn tokenizer_round_trips_corpus_and_specials() -> Result<()> {
    let err = |e: tokenizers::Error| anyhow::anyhow!("{e}");
    for flavor in [TokenizerFlavor::Llama, TokenizerFlavor::ChatMl] {
        let tok = build_tokenizer(flavor)?;
        for text in CORPUS.lines().chain(["Un café 😀 — 今天很好, καλημέρα! 👨‍👩‍👧"]) {
            let ids = tok.encode(text, false).map_err(err)?.get_ids().to_vec();
            assert_eq!(tok.decode(&ids, false).map_err(err)?, text, "{flavor:?}");
        }
        let ids = special_ids(flavor);
        let expect_bos = flavor == TokenizerFlavor::Llama;
        let enc = tok.encode("hello", true).map_err(err)?;
        assert_eq!(enc.get_ids()[0] == ids.bos, expect_bos, "{flavor:?}");
        let eos = tok.id_to_token(ids.eos).context("eos")?;
        assert!(eos == "<|eot_id|>" || eos == "<|im_end|>");
        // Special tokens in text are matched whole, never split into bytes.
        let enc = tok.encode(format!("a{eos}b").as_str(), false).map_err(err)?;
        assert_eq!(enc.get_ids().len(), 3);
        let specials = match flavor {
            TokenizerFlavor::Llama => 5,
            TokenizerFlavor::ChatMl => 3,
        };
        assert_eq!(tok.get_vocab_size(true), BPE_VOCAB_SIZE + specials);
    }
    Ok(())
}

#[test]
fn weights_have_hf_names_and_match_generator() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for (name, d) in write_golden_models(dir.path())? {
        let s = spec(&name);
        let expected = tensor_specs(&s, s.vocab_size());
        let files: Vec<String> = (0..s.shards).map(|i| shard_file_name(i, s.shards)).collect();
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut total = 0usize;
        for f in &files {
            let bytes = std::fs::read(d.join(f))?;
            let st = SafeTensors::deserialize(&bytes)?;
            for (tname, view) in st.tensors() {
                let prev = seen.insert(tname.clone(), f.clone());
                assert!(prev.is_none(), "{name}: {tname} in two shards");
                let t = expected.iter().find(|t| t.name == tname).context("unexpected")?;
                assert_eq!(view.shape(), t.shape.as_slice(), "{name}: {tname}");
                total += view.data().len();
                // Spot-check the data against the in-memory generator.
                let vals = tensor_values(t, s.dtype, s.seed);
                let first = match s.dtype {
                    DType::F32 => f32::from_le_bytes(view.data()[..4].try_into()?),
                    DType::Bf16 => half::bf16::from_le_bytes(view.data()[..2].try_into()?).to_f32(),
                };
                assert_eq!(first, vals[0]);
            }
        }
        let names: BTreeSet<&str> = seen.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, want, "{name}");
        assert_eq!(names.contains("lm_head.weight"), !s.tie_word_embeddings);
        let has_bias = names.contains("model.layers.0.self_attn.q_proj.bias");
        assert_eq!(has_bias, s.arch == Arch::Qwen2);
        if s.shards > 1 {
            let index = read_json(&d.join("model.safetensors.index.json"))?;
            let map = index["weight_map"].as_object().context("weight_map")?;
            assert_eq!(map.len(), seen.len(), "{name}: index covers each tensor once");
            for (tname, file) in &seen {
                assert_eq!(map[tname], file.as_str(), "{name}: {tname}");
            }
            assert_eq!(index["metadata"]["total_size"], total);
        } else {
            assert!(!d.join("model.safetensors.index.json").exists());
        }
    }
    Ok(())
}

#[test]
fn golden_specs_cover_the_features() {
    let specs = golden_specs();
    assert!(specs.iter().any(|s| s.shards > 1 && s.tie_word_embeddings));
    assert!(specs.iter().any(|s| s.explicit_head_dim()));
    assert!(specs.iter().any(|s| matches!(s.rope, Rope::Llama3 { .. })));
    assert!(specs.iter().any(|s| matches!(s.rope, Rope::Linear { .. })));
    assert!(specs.iter().any(|s| s.arch == Arch::Mistral));
    for s in &specs {
        assert!(s.validate().is_ok(), "{}", s.name);
    }
    let big = qwen25_05b_spec();
    let params: usize = tensor_specs(&big, big.vocab_size()).iter().map(TensorSpec::numel).sum();
    assert_eq!(big.vocab_size(), 151_936);
    assert!((490_000_000..500_000_000).contains(&params), "{params}");
}

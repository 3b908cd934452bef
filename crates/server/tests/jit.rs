//! Runtime adapter loading under misuse: just-in-time names are plain directory names and a
//! directory is one adapter however it is spelled; concurrent first uses share one load; a
//! failed load is remembered; adapters whose update cannot stay finite are refused; the
//! just-in-time cap evicts the least recently used; loads racing unloads stay consistent.

mod common;

use std::path::Path;

use anyhow::{ensure, Context, Result};
use common::*;
use futures_util::future::join_all;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

fn completion(model: &str) -> String {
    json!({"model": model, "prompt": "hi", "max_tokens": 1}).to_string()
}

async fn complete(srv: &Server, model: &str) -> Result<(u16, String)> {
    http(srv.addr, "POST", "/v1/completions", Some(&completion(model)), None).await
}

async fn admin(srv: &Server, path: &str, body: Value) -> Result<(u16, String)> {
    http(srv.addr, "POST", path, Some(&body.to_string()), None).await
}

async fn model_ids(srv: &Server) -> Result<Vec<String>> {
    let (_, text) = http(srv.addr, "GET", "/v1/models", None, None).await?;
    let v = json_of(&text)?;
    Ok(v["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect())
}

/// Copies the adapter directory `from` to `to` (both under the root).
fn copy_adapter(root: &Path, from: &str, to: &str) -> Result<()> {
    std::fs::create_dir_all(root.join(to))?;
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(root.join(from).join(f), root.join(to).join(f))?;
    }
    Ok(())
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) -> Result<()> {
    let path = dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    edit(&mut v);
    Ok(std::fs::write(path, v.to_string())?)
}

/// Sets the first value of every (f32) tensor to `value`.
fn poke_all(dir: &Path, value: f32) -> Result<()> {
    let path = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&path)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut out = Vec::new();
    for (name, v) in st.tensors() {
        ensure!(v.dtype() == Dtype::F32, "{name} is not f32");
        let mut data = v.data().to_vec();
        data[..4].copy_from_slice(&value.to_le_bytes());
        out.push((name, v.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(n, s, d)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), d)?)))
        .collect::<Result<_>>()?;
    std::fs::write(&path, safetensors::serialize(views, None)?)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_names_are_plain_names_and_a_directory_is_one_adapter() -> Result<()> {
    let srv = server(None, 64).await?;
    let name = "qwen2-r2-o-down-bf16";
    let before = model_ids(&srv).await?;
    let abs = srv.adapters.join(name).display().to_string();
    for bad in [
        format!("{name}/"),
        format!("./{name}"),
        format!("{name}/."),
        format!("x/../{name}"),
        abs,
        "..".into(),
        ".".into(),
        "".into(),
    ] {
        let (status, text) = complete(&srv, &bad).await?;
        let (status, err) = error_code(status, &text)?;
        ensure!(
            status == 404 && err["code"] == "model_not_found",
            "{bad:?}: {status} {text}"
        );
    }
    ensure!(model_ids(&srv).await? == before, "a refused name registered something");
    ensure!(srv.state.loader.load_attempts() == 0);

    std::os::unix::fs::symlink(srv.adapters.join(name), srv.adapters.join("alias"))?;
    let (status, text) = complete(&srv, name).await?;
    ensure!(status == 200 && json_of(&text)?["model"] == name, "{status} {text}");
    let (status, text) = complete(&srv, "alias").await?;
    ensure!(status == 200 && json_of(&text)?["model"] == "alias", "{status} {text}");
    let after = model_ids(&srv).await?;
    ensure!(
        after.len() == before.len() + 1 && after.iter().any(|m| m == name),
        "two spellings, one adapter: {after:?}"
    );
    ensure!(srv.state.loader.load_attempts() == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_uses_share_one_load() -> Result<()> {
    let srv = server(None, 64).await?;
    let name = "qwen2-r8-all-linear-rslora";
    let answers = join_all((0..8).map(|_| complete(&srv, name))).await;
    for a in answers {
        let (status, text) = a?;
        ensure!(status == 200, "{status} {text}");
    }
    ensure!(srv.state.loader.load_attempts() == 1);
    ensure!(srv.state.loader.jit_names() == [name]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_adapter_is_loaded_once_and_remembered() -> Result<()> {
    let srv = server(None, 64).await?;
    copy_adapter(&srv.adapters, "qwen2-r4-qkv", "bad")?;
    edit_config(&srv.adapters.join("bad"), |v| v["lora_alpha"] = json!(1e300))?;
    let answers = join_all((0..16).map(|_| complete(&srv, "bad"))).await;
    let mut messages = Vec::new();
    for a in answers {
        let (status, text) = a?;
        let (status, err) = error_code(status, &text)?;
        ensure!(status == 400, "{status} {text}");
        messages.push(err["message"].as_str().context("message")?.to_string());
    }
    ensure!(
        messages.iter().all(|m| *m == messages[0]) && messages[0].contains("not a finite f32"),
        "{messages:?}"
    );
    ensure!(
        srv.state.loader.load_attempts() == 1,
        "{} loads",
        srv.state.loader.load_attempts()
    );
    // Fixed on disk: just-in-time requests still get the remembered failure...
    copy_adapter(&srv.adapters, "qwen2-r4-qkv", "bad")?;
    let (status, text) = complete(&srv, "bad").await?;
    ensure!(status == 400 && text.contains("not a finite f32"), "{status} {text}");
    ensure!(srv.state.loader.load_attempts() == 1);
    // ...the admin API does not consult it, and its success clears it. The directory is now
    // the adapter `fixed`, which the name `bad` resolves to.
    let (status, text) = admin(
        &srv,
        "/v1/load_lora_adapter",
        json!({"lora_name": "fixed", "lora_path": "bad"}),
    )
    .await?;
    ensure!(status == 200, "{status} {text}");
    let (status, text) = complete(&srv, "bad").await?;
    ensure!(status == 200, "{status} {text}");
    ensure!(srv.state.loader.load_attempts() == 2);
    let ids = model_ids(&srv).await?;
    ensure!(
        ids.iter().any(|m| m == "fixed") && !ids.iter().any(|m| m == "bad"),
        "{ids:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_whose_update_cannot_stay_finite_are_refused() -> Result<()> {
    let srv = server(None, 64).await?;
    copy_adapter(&srv.adapters, "qwen2-r4-qkv", "huge-alpha")?;
    edit_config(&srv.adapters.join("huge-alpha"), |v| v["lora_alpha"] = json!(1e300))?;
    copy_adapter(&srv.adapters, "qwen2-r4-qkv", "huge-weights")?;
    poke_all(&srv.adapters.join("huge-weights"), 3e38)?;
    for (name, reason) in [("huge-alpha", "not a finite f32"), ("huge-weights", "overflows f32")] {
        let (status, text) = admin(
            &srv,
            "/v1/load_lora_adapter",
            json!({"lora_name": name, "lora_path": name}),
        )
        .await?;
        let (status, _) = error_code(status, &text)?;
        ensure!(status == 400 && text.contains(reason), "{name}: {status} {text}");
        let (status, text) = complete(&srv, name).await?;
        ensure!(
            status == 400 && text.contains(reason),
            "{name} just in time: {status} {text}"
        );
    }
    let (status, text) = complete(&srv, "base").await?;
    ensure!(status == 200, "{status} {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jit_cap_unregisters_the_least_recently_used() -> Result<()> {
    let srv = server_with(None, 64, |o| o.adapter_loading.max_jit_adapters = 2).await?;
    for j in ["j1", "j2", "j3", "j4"] {
        copy_adapter(&srv.adapters, "qwen2-r2-o-down-bf16", j)?;
    }
    for (model, jit) in [
        ("j1", vec!["j1"]),
        ("j2", vec!["j1", "j2"]),
        ("j1", vec!["j1", "j2"]),
        // j2 is now the least recently used.
        ("j3", vec!["j1", "j3"]),
    ] {
        let (status, text) = complete(&srv, model).await?;
        ensure!(status == 200, "{model}: {status} {text}");
        ensure!(
            srv.state.loader.jit_names() == jit,
            "after {model}: {:?}",
            srv.state.loader.jit_names()
        );
    }
    let ids = model_ids(&srv).await?;
    ensure!(
        ids.iter().any(|m| m == "qwen2-r4-qkv") && !ids.iter().any(|m| m == "j2"),
        "start-up adapters stay, the evicted one is gone: {ids:?}"
    );
    // An admin-loaded adapter neither counts nor is evicted, and serves its directory's name.
    let (status, text) = admin(
        &srv,
        "/v1/load_lora_adapter",
        json!({"lora_name": "adm", "lora_path": "j4"}),
    )
    .await?;
    ensure!(status == 200, "{status} {text}");
    let (status, text) = complete(&srv, "j4").await?;
    ensure!(status == 200, "{status} {text}");
    let (status, text) = complete(&srv, "j2").await?;
    ensure!(status == 200, "{status} {text}");
    ensure!(srv.state.loader.jit_names() == ["j2", "j3"]);
    ensure!(model_ids(&srv).await?.iter().any(|m| m == "adm"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jit_loads_racing_unloads_answer_200_or_a_clean_404() -> Result<()> {
    let srv = server(None, 64).await?;
    let name = "qwen2-r8-all-linear-rslora";
    let unload = json!({"lora_name": name});
    // (JIT 200s, JIT 404s, unload 200s) over the rounds, to show both sides of the race ran.
    let mut seen = (0, 0, 0);
    for round in 0..20 {
        let jit = join_all((0..4).map(|_| complete(&srv, name)));
        let unloads = join_all((0..2).map(|_| admin(&srv, "/v1/unload_lora_adapter", unload.clone())));
        let (jit, unloads) = tokio::join!(jit, unloads);
        for a in jit {
            let (status, text) = a?;
            let clean_404 = status == 404 && json_of(&text)?["error"]["code"] == "model_not_found";
            ensure!(status == 200 || clean_404, "round {round}: {status} {text}");
            if status == 200 {
                seen.0 += 1;
            } else {
                seen.1 += 1;
            }
        }
        for u in unloads {
            let (status, text) = u?;
            ensure!(status == 200 || status == 404, "round {round}: unload {status} {text}");
            seen.2 += usize::from(status == 200);
        }
        // The names the API shows and the engine's registry agree.
        let listed = model_ids(&srv).await?.iter().any(|m| m == name);
        let registered = srv.state.engine.adapters()?.await?.iter().any(|a| a.name == name);
        ensure!(
            listed == registered,
            "round {round}: listed {listed}, registered {registered}"
        );
    }
    eprintln!("JIT 200s, JIT 404s, unloads done: {seen:?}");
    ensure!(seen.0 > 0 && seen.2 > 0, "{seen:?}");
    let (status, text) = complete(&srv, name).await?;
    ensure!(status == 200, "{status} {text}");
    Ok(())
}

//! Pinned adapters (issue #14): `pinned: true` on the load endpoint (SGLang's field) and
//! `--pinned-lora-modules` at start put an adapter in device memory at once and keep it there;
//! pinning that would leave the KV cache less than one full-length sequence is refused.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};

/// (tier, pinned) of every adapter, by name, from `/v1/lora_adapters`.
async fn tiers(srv: &Server) -> Result<Vec<(String, String, bool)>> {
    let (status, text) = http(srv.addr, "GET", "/v1/lora_adapters", None, None).await?;
    ensure!(status == 200, "{status} {text}");
    let v: Value = serde_json::from_str(&text)?;
    let data = v["data"].as_array().context("data")?;
    data.iter()
        .map(|a| {
            Ok((
                a["name"].as_str().context("name")?.to_string(),
                a["tier"].as_str().context("tier")?.to_string(),
                a["pinned"].as_bool().context("pinned")?,
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_adapters_are_resident_from_the_start() -> Result<()> {
    let srv = server_with(None, 8, |o| o.pinned_adapters = vec!["qwen2-r4-qkv".into()]).await?;
    let load = |name: &str, pinned: bool| {
        json!({"lora_name": name, "lora_path": "qwen2-r8-all-linear-rslora", "pinned": pinned}).to_string()
    };
    let (status, text) = http(srv.addr, "POST", "/v1/load_lora_adapter", Some(&load("p", true)), None).await?;
    ensure!(status == 200, "{status} {text}");
    let (status, text) = http(srv.addr, "POST", "/v1/load_lora_adapter", Some(&load("u", false)), None).await?;
    ensure!(status == 200, "{status} {text}");
    let got = tiers(&srv).await?;
    let want = vec![
        ("p".to_string(), "device".to_string(), true),
        ("qwen2-r4-qkv".to_string(), "device".to_string(), true),
        ("u".to_string(), "host".to_string(), false),
    ];
    ensure!(got == want, "{got:?}");
    let stats = srv.state.engine.stats()?.await?;
    ensure!(
        stats.adapter_bytes > 0,
        "pinned pages are charged to the budget: {stats:?}"
    );
    let bad = json!({"lora_name": "b", "lora_path": "qwen2-r8-all-linear-rslora", "pinned": "yes"}).to_string();
    let (status, _) = http(srv.addr, "POST", "/v1/load_lora_adapter", Some(&bad), None).await?;
    ensure!(status == 400, "a pinned that is not a boolean: {status}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinning_that_leaves_no_room_for_one_sequence_is_refused() -> Result<()> {
    // A budget that holds exactly one sequence of max_model_len (256) and nothing more.
    let srv = server(None, 8).await?;
    let limits = srv.state.engine.validator().limits().clone();
    let per_token = (64usize << 20).div_ceil(limits.max_kv_tokens);
    let tight = per_token * limits.max_model_len;
    drop(srv);
    let refused = server_with(None, 8, move |o| {
        o.engine.memory_budget = tight;
        o.pinned_adapters = vec!["qwen2-r4-qkv".into()];
    })
    .await;
    let msg = format!("{:#}", refused.err().context("a pinned adapter without room started")?);
    ensure!(
        msg.contains("pinned") && msg.contains("--memory-budget-mb") && msg.contains("qwen2-r4-qkv"),
        "{msg}"
    );
    // The same budget serves the adapter unpinned, and refuses to pin it at run time.
    let srv = server_with(None, 8, move |o| o.engine.memory_budget = tight).await?;
    let load = json!({"lora_name": "p", "lora_path": "qwen2-r8-all-linear-rslora", "pinned": true}).to_string();
    let (status, text) = http(srv.addr, "POST", "/v1/load_lora_adapter", Some(&load), None).await?;
    ensure!(status == 400 && text.contains("pin fewer adapters"), "{status} {text}");
    let got = tiers(&srv).await?;
    ensure!(
        got.iter().all(|(n, _, _)| n != "p"),
        "a refused pin stays unregistered: {got:?}"
    );
    Ok(())
}

//! Start-up refuses limits under which the server could not answer (issue #21): zeros, and a
//! `--max-model-len` whose sequence the memory budget's KV cache cannot hold (issue #14: the
//! message names the largest that fits; without the flag the model's length is capped instead);
//! each message names the flag to change.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::server_with;
use quiver_server::ServerOptions;

async fn refusal(tweak: impl FnOnce(&mut ServerOptions)) -> Result<String> {
    match server_with(None, 8, tweak).await {
        Ok(_) => anyhow::bail!("the server started"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_limits_are_refused_naming_their_flag() -> Result<()> {
    type Tweak = Box<dyn FnOnce(&mut ServerOptions)>;
    let cases: Vec<(&str, Tweak)> = vec![
        ("--max-num-seqs", Box::new(|o| o.engine.max_num_seqs = 0)),
        ("--max-num-batched-tokens", Box::new(|o| o.engine.max_batch_tokens = 0)),
        ("--max-concurrent-choices", Box::new(|o| o.max_concurrent = 0)),
        ("--max-body-bytes", Box::new(|o| o.max_body_bytes = 0)),
        ("--max-connections", Box::new(|o| o.connections.max_connections = 0)),
        ("--max-lora-rank", Box::new(|o| o.engine.max_lora_rank = 0)),
        ("--max-model-len", Box::new(|o| o.max_model_len = Some(0))),
        ("--memory-budget-mb", Box::new(|o| o.engine.memory_budget = 0)),
        (
            "--http-header-read-timeout",
            Box::new(|o| o.connections.header_read_timeout = Duration::ZERO),
        ),
        (
            "--http-body-read-timeout",
            Box::new(|o| o.connections.body_read_timeout = Duration::ZERO),
        ),
        (
            "--gpu-memory-utilization",
            Box::new(|o| o.gpu_memory_utilization = Some(0.0)),
        ),
        (
            "--gpu-memory-utilization",
            Box::new(|o| o.gpu_memory_utilization = Some(1.5)),
        ),
    ];
    for (flag, tweak) in cases {
        let msg = refusal(tweak).await?;
        ensure!(msg.contains(flag), "{flag}: {msg}");
    }
    // A zero shutdown deadline is a choice (cancel at once), not a mistake.
    server_with(None, 8, |o| o.connections.shutdown_timeout = Duration::ZERO).await?;
    Ok(())
}

/// (model max_model_len, KV tokens per byte of budget) of the test server's model.
async fn model_len_and_bytes_per_token() -> Result<(usize, usize)> {
    let srv = server_with(None, 8, |_| {}).await?;
    let limits = srv.state.engine.validator().limits().clone();
    let budget = 64usize << 20; // common::server's
    ensure!(limits.max_model_len > 32, "{limits:?}");
    Ok((limits.max_model_len, budget.div_ceil(limits.max_kv_tokens)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_model_len_over_the_kv_budget_is_refused_naming_the_largest_that_fits() -> Result<()> {
    let (model_len, bytes_per_token) = model_len_and_bytes_per_token().await?;
    // The test model's blocks are 16 tokens: a budget of 32 tokens' bytes holds exactly 32.
    let msg = refusal(move |o| {
        o.engine.memory_budget = bytes_per_token * 32;
        o.max_model_len = Some(model_len);
    })
    .await?;
    ensure!(
        msg.contains(&format!("--max-model-len {model_len} does not fit"))
            && msg.contains("the largest --max-model-len that fits is 32")
            && msg.contains("--memory-budget-mb")
            && msg.contains("--kv-cache-dtype"),
        "{msg}"
    );
    // Lowering max_model_len to what the budget holds starts.
    server_with(None, 8, move |o| {
        o.engine.memory_budget = bytes_per_token * 64;
        o.max_model_len = Some(32);
    })
    .await
    .context("a budget that holds max_model_len")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_max_model_len_the_model_length_is_capped_to_the_kv_budget() -> Result<()> {
    let (model_len, bytes_per_token) = model_len_and_bytes_per_token().await?;
    let srv = server_with(None, 8, move |o| {
        o.engine.memory_budget = bytes_per_token * 48;
        o.max_model_len = None;
    })
    .await?;
    let limits = srv.state.engine.validator().limits().clone();
    ensure!(
        limits.max_model_len == 48 && limits.max_kv_tokens == 48 && model_len > 48,
        "{limits:?}"
    );
    // A request without max_tokens gets the rest of the capped length, not a refusal.
    let body = serde_json::json!({"model": srv.state.served_name, "prompt": [1, 2, 3], "temperature": 0});
    let (status, body) = common::http(srv.addr, "POST", "/v1/completions", Some(&body.to_string()), None).await?;
    ensure!(status == 200, "{status} {body}");
    Ok(())
}

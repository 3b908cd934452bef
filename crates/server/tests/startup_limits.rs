//! Start-up refuses limits under which the server could not answer (issue #21): zeros, and a
//! memory budget whose KV cache cannot hold one sequence of `max_model_len`; each message names
//! the flag to change.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_under_one_full_length_sequence_is_refused() -> Result<()> {
    let srv = server_with(None, 8, |_| {}).await?;
    let limits = srv.state.engine.validator().limits().clone();
    let budget = 64usize << 20; // common::server's
    let bytes_per_token = budget.div_ceil(limits.max_kv_tokens);
    ensure!(limits.max_model_len > 32, "{limits:?}");
    let msg = refusal(move |o| o.engine.memory_budget = bytes_per_token * 32).await?;
    ensure!(
        msg.contains("--memory-budget-mb") && msg.contains("--max-model-len"),
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

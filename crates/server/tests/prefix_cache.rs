//! Prefix caching through HTTP: a repeated prompt reports `usage.prompt_tokens_details.cached_tokens`
//! (completions, and chat's final streamed usage), and vLLM's prefix-cache counters move.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};

/// The number after `name` (with its labels) in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Result<f64> {
    let line = (text.lines())
        .find(|l| l.starts_with(name))
        .with_context(|| format!("no {name} in\n{text}"))?;
    Ok(line.rsplit(' ').next().context("no value")?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_reports_cached_tokens_and_the_counters_move() -> Result<()> {
    let srv = server(None, 64).await?;
    let prompt: Vec<u32> = (0..40).map(|t| (t * 7 + 3) % 200 + 5).collect();
    let body =
        json!({"model": "qwen2-r4-qkv", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": true});
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body.to_string()), None).await?;
        ensure!(status == 200, "{status}: {text}");
        let usage = json_of(&text)?["usage"].clone();
        ensure!(usage["prompt_tokens"] == 40, "{usage}");
        cached.push(
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .context("cached_tokens")?,
        );
    }
    // Blocks of 16 tokens: the second request finds the first's two full blocks.
    ensure!(cached == [0, 32], "cached_tokens {cached:?}");

    let content = "The quick brown fox jumps over the lazy dog, again and again. ".repeat(3);
    let body = json!({"model": "base", "messages": [{"role": "user", "content": content}], "max_tokens": 2,
                      "stream": true, "stream_options": {"include_usage": true}});
    let mut cached = Vec::new();
    for _ in 0..2 {
        let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None).await?;
        ensure!(status == 200, "{status}: {text}");
        let last = (text.lines().filter_map(|l| l.strip_prefix("data: ")))
            .rfind(|f| *f != "[DONE]")
            .context("no chunk")?;
        let usage: Value = json_of(last)?["usage"].clone();
        cached.push(
            usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .context("cached_tokens")?,
        );
    }
    ensure!(cached[0] == 0 && cached[1] > 0, "chat cached_tokens {cached:?}");

    let (_, metrics) = http(srv.addr, "GET", "/metrics", None, None).await?;
    let queries = metric(&metrics, "vllm:prefix_cache_queries_total{model_name=\"base\"}")?;
    let hits = metric(&metrics, "vllm:prefix_cache_hits_total{model_name=\"base\"}")?;
    ensure!(hits == 32.0 + cached[1] as f64, "hits {hits}");
    ensure!(queries >= 80.0 + 2.0 * 16.0 && queries > hits, "queries {queries}");
    ensure!(metric(&metrics, "quiver_prefix_cache_bytes")? > 0.0, "{metrics}");
    Ok(())
}

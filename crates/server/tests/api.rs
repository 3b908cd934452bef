//! Completions and chat end to end, in process, over real sockets on 127.0.0.1: greedy tokens
//! against transformers + PEFT goldens, streaming, metrics, and OpenAI-format errors.

mod common;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_completions_match_peft_through_http() -> Result<()> {
    let srv = server(None, 64).await?;
    for single in &srv.golden.single {
        let body = json!({"model": single.adapter, "prompt": single.ids, "max_tokens": single.greedy.len(), "temperature": 0,
                          "logprobs": 0, "return_tokens_as_token_ids": true, "ignore_eos": true});
        let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body.to_string()), None).await?;
        ensure!(status == 200, "{status}: {text}");
        let v = json_of(&text)?;
        ensure!(v["model"] == single.adapter.as_str(), "model not echoed: {v}");
        let got = token_ids(&v["choices"][0]["logprobs"]["tokens"])?;
        check_greedy(&got, &single.greedy, &single.greedy_margins, &single.adapter)?;
        ensure!(
            v["usage"]["prompt_tokens"] == single.ids.len() && v["usage"]["completion_tokens"] == single.greedy.len(),
            "{v}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_stream_and_metrics() -> Result<()> {
    let srv = server(None, 64).await?;
    let (status, text) = http(srv.addr, "GET", "/v1/models", None, None).await?;
    ensure!(status == 200);
    let v = json_of(&text)?;
    let ids: Vec<&str> = v["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    ensure!(ids == ["base", "qwen2-r4-qkv"], "{ids:?}");
    ensure!(
        v["data"][1]["parent"] == "base"
            && v["data"][1]["root"]
                .as_str()
                .is_some_and(|r| r.ends_with("qwen2-r4-qkv")),
        "{v}"
    );

    let body = json!({"model": "qwen2-r4-qkv", "messages": [{"role": "user", "content": "Bonjour, ça va?"}], "max_tokens": 6,
                      "stream": true, "stream_options": {"include_usage": true}, "seed": 7, "temperature": 0.8, "n": 2});
    let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None).await?;
    ensure!(status == 200, "{status}: {text}");
    let frames: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    ensure!(frames.last() == Some(&"[DONE]"), "stream must end with [DONE]: {text}");
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| json_of(f))
        .collect::<Result<_>>()?;
    ensure!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "qwen2-r4-qkv"),
        "{text}"
    );
    let finished: Vec<_> = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"] == "length")
        .collect();
    ensure!(finished.len() == 2, "two choices must finish: {text}");
    let usage = &chunks.last().context("usage chunk")?["usage"];
    ensure!(
        usage["completion_tokens"] == 12 && usage["total_tokens"].as_u64() > Some(12),
        "{usage}"
    );
    ensure!(
        chunks.iter().any(|c| c["choices"][0]["delta"]["role"] == "assistant"),
        "first delta carries the role"
    );

    let (_, metrics) = http(srv.addr, "GET", "/metrics", None, None).await?;
    for needle in [
        "vllm:lora_requests_info{max_lora=",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "quiver_requests_total{adapter=\"qwen2-r4-qkv\"} 2",
        "quiver_adapter_residency{adapter=\"qwen2-r4-qkv\",tier=\"device\"} 1",
        "vllm:time_to_first_token_seconds_count{model_name=\"base\"} 2",
        "vllm:request_queue_time_seconds_count{model_name=\"base\"} 2",
        "vllm:request_success_total{model_name=\"base\",finished_reason=\"length\"} 2",
        "vllm:generation_tokens_total{model_name=\"base\"} 12",
    ] {
        ensure!(metrics.contains(needle), "metrics lack {needle}:\n{metrics}");
    }
    let (status, _) = http(srv.addr, "GET", "/health", None, None).await?;
    ensure!(status == 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() -> Result<()> {
    let srv = server(None, 64).await?;
    let long: Vec<u32> = vec![5; 300];
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        ("/v1/completions", "{not json".into(), 400, None),
        (
            "/v1/completions",
            json!({"model": "nope", "prompt": "x"}).to_string(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": long}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "x", "n": 99}).to_string(),
            400,
            Some("n"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "x", "temperature": -1}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "x", "top_p": 0}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "x", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": [[1, -2]]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": [999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "messages": [{"role": "robot", "content": "x"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        ("/v1/nothing", "{}".into(), 404, None),
    ];
    for (path, body, want, param) in cases {
        let (status, text) = http(srv.addr, "POST", path, Some(&body), None).await?;
        let (status, err) = error_code(status, &text)?;
        ensure!(status == want, "{path} {body}: {status} {err}");
        if let Some(p) = param {
            ensure!(err["param"] == p, "{path} {body}: param {}", err["param"]);
        }
    }
    let big = format!("{{\"model\": \"base\", \"prompt\": \"{}\"}}", "a".repeat(2 << 20));
    let (status, _) = http(srv.addr, "POST", "/v1/completions", Some(&big), None).await?;
    ensure!(status == 413, "oversized body: {status}");
    let ok = json!({"model": "base", "prompt": "still alive", "max_tokens": 2}).to_string();
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&ok), None).await?;
    ensure!(status == 200, "{status}: {text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adapters_edge_inputs_and_prometheus_format() -> Result<()> {
    let srv = server(None, 64).await?;
    // Different adapters at once, each greedy result equal to the same request made alone.
    let names = [
        "base",
        "qwen2-r4-qkv",
        "qwen2-r8-all-linear-rslora",
        "qwen2-r2-o-down-bf16",
    ];
    let body = |m: &str| {
        json!({"model": m, "prompt": "The quick brown fox", "max_tokens": 6, "temperature": 0, "ignore_eos": true})
            .to_string()
    };
    let mut alone = Vec::new();
    for m in names {
        let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body(m)), None).await?;
        ensure!(status == 200, "{m}: {status} {text}");
        alone.push(json_of(&text)?["choices"][0]["text"].clone());
    }
    let together = futures_util::future::join_all(names.iter().map(|m| {
        let b = body(m);
        async move { http(srv.addr, "POST", "/v1/completions", Some(&b), None).await }
    }))
    .await;
    for ((m, r), want) in names.iter().zip(together).zip(&alone) {
        let (status, text) = r?;
        ensure!(
            status == 200 && json_of(&text)?["choices"][0]["text"] == *want,
            "{m} differs when batched: {text}"
        );
    }
    // A huge max_tokens does not fit the context: 400 naming the prompt.
    let huge = json!({"model": "base", "prompt": "x", "max_tokens": 1_000_000_000}).to_string();
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&huge), None).await?;
    ensure!(
        error_code(status, &text)?.0 == 400 && text.contains("maximum context length"),
        "{text}"
    );
    // Wrong types and invalid UTF-8 are 400s; so are unknown fields, as OpenAI does.
    let (status, _) = http(
        srv.addr,
        "POST",
        "/v1/completions",
        Some(r#"{"model": "base", "prompt": "x", "max_tokens": "ten"}"#),
        None,
    )
    .await?;
    ensure!(status == 400);
    let mut s = TcpStream::connect(srv.addr).await?;
    let bad = b"{\"model\": \"base\", \"prompt\": \"\xff\xfe\"}";
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        bad.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(bad).await?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await?;
    ensure!(
        String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 400"),
        "invalid UTF-8: {}",
        String::from_utf8_lossy(&raw)
    );
    let unknown = json!({"model": "base", "prompt": "x", "max_tokens": 1, "frobnicate": true}).to_string();
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&unknown), None).await?;
    ensure!(
        error_code(status, &text)?
            == (
                400,
                json!({"message": "Unrecognized request argument supplied: frobnicate", "type": "invalid_request_error", "param": "frobnicate", "code": null})
            ),
        "{text}"
    );

    // /metrics is valid Prometheus text: every sample belongs to a declared family and has a number.
    let (_, metrics) = http(srv.addr, "GET", "/metrics", None, None).await?;
    let mut families = std::collections::HashSet::new();
    for line in metrics.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().context("name")?, parts.next().context("kind")?);
            ensure!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').context("sample without value")?;
        ensure!(value.parse::<f64>().is_ok(), "bad value in {line}");
        let name = series.split('{').next().context("name")?;
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| families.contains(*f))
            .unwrap_or(name);
        ensure!(families.contains(family), "sample {name} has no TYPE line");
        if let Some(labels) = series.strip_prefix(name).filter(|l| !l.is_empty()) {
            ensure!(
                labels.starts_with('{') && labels.ends_with('}') && labels.matches('"').count() % 2 == 0,
                "bad labels in {line}"
            );
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_model_streaming_and_chat_prompts_match_transformers() -> Result<()> {
    let srv = server(None, 64).await?;
    let golden = quiver_testkit::load_golden(BASE)?;
    for (i, p) in golden.prompts.iter().enumerate() {
        // Base model, streamed: concatenate the token ids of every frame.
        let body = json!({"model": "base", "prompt": p.ids, "max_tokens": p.greedy.len(), "temperature": 0, "stream": true,
                          "logprobs": 0, "return_tokens_as_token_ids": true, "ignore_eos": true});
        let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body.to_string()), None).await?;
        ensure!(status == 200, "{status}: {text}");
        let mut got = Vec::new();
        for frame in text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|f| *f != "[DONE]")
        {
            let v = json_of(frame)?;
            if let Some(lp) = v["choices"][0]["logprobs"].as_object() {
                got.extend(token_ids(&lp["tokens"])?);
            }
        }
        check_greedy(&got, &p.greedy, &p.greedy_margins, &format!("base prompt {i} streamed"))?;
    }
    // Chat: the prompt the server builds has exactly the ids of transformers' apply_chat_template.
    for c in &golden.chat {
        let body = json!({"model": "base", "messages": c.messages, "max_tokens": 1});
        let (status, text) = http(srv.addr, "POST", "/v1/chat/completions", Some(&body.to_string()), None).await?;
        ensure!(status == 200, "{status}: {text}");
        ensure!(
            json_of(&text)?["usage"]["prompt_tokens"] == c.ids.len(),
            "chat prompt length differs: {text}"
        );
    }
    Ok(())
}

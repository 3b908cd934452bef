//! The HTTP API end to end, in process, over real sockets on 127.0.0.1: the test kit's qwen2 and
//! its PEFT adapters, goldens from transformers + PEFT for the greedy tokens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use quiver_engine::EngineConfig;
use quiver_server::{build_state, AppState, ServerOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BASE: &str = "qwen2-f32-tied";

struct Server {
    addr: std::net::SocketAddr,
    state: Arc<AppState>,
    _dir: tempfile::TempDir,
    adapters: PathBuf,
    golden: quiver_testkit::LoraGolden,
}

async fn server(api_key: Option<&str>, max_concurrent: usize) -> Result<Server> {
    let (dir, golden) = quiver_testkit::materialize_lora(BASE)?;
    let adapters = dir.path().join("adapters");
    let preloaded = "qwen2-r4-qkv";
    let opts = ServerOptions {
        model: dir.path().join("base"),
        served_model_name: Some("base".into()),
        lora_modules: vec![(preloaded.into(), adapters.join(preloaded))],
        adapter_root: Some(adapters.clone()),
        api_key: api_key.map(str::to_string),
        admin_key: None,
        max_model_len: Some(256),
        max_concurrent,
        max_body_bytes: 1 << 20,
        engine: EngineConfig {
            memory_budget: 64 << 20,
            ..Default::default()
        },
    };
    let state = tokio::task::spawn_blocking(move || build_state(opts)).await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = state.clone();
    tokio::spawn(async move { quiver_server::serve(s, listener, std::future::pending()).await });
    Ok(Server {
        addr,
        state,
        _dir: dir,
        adapters,
        golden,
    })
}

/// A minimal HTTP/1.1 client (Connection: close), decoding chunked bodies.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8(raw)?;
    let (head, rest) = text.split_once("\r\n\r\n").context("no header end")?;
    let status: u16 = head.split(' ').nth(1).context("status")?.parse()?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(rest)?
    } else {
        rest.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut s: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").context("chunk size")?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

fn json_of(body: &str) -> Result<Value> {
    serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))
}

fn error_code(status: u16, body: &str) -> Result<(u16, Value)> {
    let v = json_of(body)?;
    ensure!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "not OpenAI's error format: {body}"
    );
    Ok((status, v["error"].clone()))
}

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
        let got: Vec<u32> = v["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .context("tokens")?
            .iter()
            .map(|t| {
                t.as_str()
                    .and_then(|t| t.strip_prefix("token_id:"))
                    .and_then(|t| t.parse().ok())
                    .context("token_id")
            })
            .collect::<Result<_>>()?;
        for (step, (g, w)) in got.iter().zip(&single.greedy).enumerate() {
            if g != w {
                ensure!(
                    single.greedy_margins[step] < 1e-3,
                    "{}: token {step} {g} vs PEFT {w}",
                    single.adapter
                );
                break;
            }
        }
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
        "quiver_time_to_first_token_seconds_count 2",
        "quiver_request_queue_time_seconds_count 2",
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
            Some("messages"),
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
async fn keys_are_enforced() -> Result<()> {
    let srv = server(Some("sekrit"), 64).await?;
    let body = json!({"model": "base", "prompt": "x", "max_tokens": 1}).to_string();
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body), None).await?;
    ensure!(error_code(status, &text)?.0 == 401);
    let (status, _) = http(srv.addr, "POST", "/v1/completions", Some(&body), Some("wrong")).await?;
    ensure!(status == 401);
    let (status, text) = http(srv.addr, "POST", "/v1/completions", Some(&body), Some("sekrit")).await?;
    ensure!(status == 200, "{status}: {text}");
    let load = json!({"lora_name": "x", "lora_path": "qwen2-r8-all-linear-rslora"}).to_string();
    let (status, _) = http(srv.addr, "POST", "/v1/load_lora_adapter", Some(&load), None).await?;
    ensure!(status == 401, "admin endpoints need the key too");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_load_unload_and_jit() -> Result<()> {
    let srv = server(None, 64).await?;
    let post = |path: &'static str, body: Value| {
        let addr = srv.addr;
        async move { http(addr, "POST", path, Some(&body.to_string()), None).await }
    };
    let (status, text) = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "rs", "lora_path": "qwen2-r8-all-linear-rslora"}),
    )
    .await?;
    ensure!(status == 200, "{status}: {text}");
    let (status, _) = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "rs", "lora_path": "qwen2-r8-all-linear-rslora"}),
    )
    .await?;
    ensure!(status == 400, "loading a name twice is a 400");
    let (status, _) = post("/v1/load_lora_adapter", json!({"lora_name": "rs2"})).await?;
    ensure!(status == 400, "missing lora_path");
    let (status, text) = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "up", "lora_path": "../base"}),
    )
    .await?;
    ensure!(
        status == 400 && text.contains(".."),
        "escaping the root: {status} {text}"
    );
    std::os::unix::fs::symlink(
        srv.adapters.parent().context("parent")?.join("base"),
        srv.adapters.join("sneaky"),
    )?;
    let (status, text) = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "sneaky", "lora_path": "sneaky"}),
    )
    .await?;
    ensure!(
        status == 400 && text.contains("outside"),
        "symlink out of the root: {status} {text}"
    );
    // A broken adapter: refused, and nothing is left behind.
    let broken = srv.adapters.join("broken");
    std::fs::create_dir(&broken)?;
    std::fs::copy(
        srv.adapters.join("qwen2-r4-qkv/adapter_model.safetensors"),
        broken.join("adapter_model.safetensors"),
    )?;
    std::fs::write(
        broken.join("adapter_config.json"),
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": true}"#,
    )?;
    let (status, text) = post(
        "/v1/load_lora_adapter",
        json!({"lora_name": "broken", "lora_path": "broken"}),
    )
    .await?;
    ensure!(status == 400 && text.contains("use_dora"), "{status} {text}");
    let (_, models) = http(srv.addr, "GET", "/v1/models", None, None).await?;
    ensure!(models.contains("\"rs\"") && !models.contains("\"broken\""), "{models}");
    // Just-in-time: an unknown name that is a directory under the root loads on first use.
    let (status, text) = post(
        "/v1/completions",
        json!({"model": "qwen2-r2-o-down-bf16", "prompt": "hi", "max_tokens": 2}),
    )
    .await?;
    ensure!(
        status == 200 && text.contains("qwen2-r2-o-down-bf16"),
        "{status} {text}"
    );
    let (status, text) = http(srv.addr, "GET", "/v1/lora_adapters", None, None).await?;
    ensure!(status == 200 && text.contains("\"tier\":\"device\""), "{text}");
    // Unload.
    let (status, _) = post("/v1/unload_lora_adapter", json!({"lora_name": "rs"})).await?;
    ensure!(status == 200);
    let (status, _) = post("/v1/unload_lora_adapter", json!({"lora_name": "rs"})).await?;
    ensure!(status == 404);
    let (status, _) = post(
        "/v1/completions",
        json!({"model": "rs", "prompt": "hi", "max_tokens": 1}),
    )
    .await?;
    ensure!(status == 404, "an unloaded adapter is gone");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_429_and_a_disconnect_cancels() -> Result<()> {
    let srv = server(None, 1).await?;
    // Hold the only slot with a long stream, reading one frame, then hang up.
    let mut s = TcpStream::connect(srv.addr).await?;
    let body =
        json!({"model": "base", "prompt": "go on", "max_tokens": 200, "stream": true, "ignore_eos": true}).to_string();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).await?;
    ensure!(
        n > 0 && String::from_utf8_lossy(&buf[..n]).contains("200"),
        "stream did not start"
    );
    let (status, text) = http(
        srv.addr,
        "POST",
        "/v1/completions",
        Some(&json!({"model": "base", "prompt": "x"}).to_string()),
        None,
    )
    .await?;
    ensure!(error_code(status, &text)?.0 == 429, "{status} {text}");
    drop(s);
    // The engine sees the consumer gone and frees the sequence.
    for _ in 0..100 {
        let stats = srv.state.engine.stats()?.await?;
        if stats.cancelled >= 1 && stats.running == 0 && stats.kv_blocks_used == 0 {
            let (status, _) = http(
                srv.addr,
                "POST",
                "/v1/completions",
                Some(&json!({"model": "base", "prompt": "x", "max_tokens": 1}).to_string()),
                None,
            )
            .await?;
            ensure!(status == 200, "the slot must be free again");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("the disconnected request was not cancelled")
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
    // Wrong types and invalid UTF-8 are 400s; unknown fields are ignored, as vLLM does.
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
    let (status, _) = http(srv.addr, "POST", "/v1/completions", Some(&unknown), None).await?;
    ensure!(status == 200);

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

/// Token ids of a completion, from `logprobs.tokens` with `return_tokens_as_token_ids`.
fn token_ids(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("tokens")?
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| t.strip_prefix("token_id:"))
                .and_then(|t| t.parse().ok())
                .context("token_id")
        })
        .collect()
}

fn check_greedy(got: &[u32], want: &[u32], margins: &[f32], what: &str) -> Result<()> {
    for (step, (g, w)) in got.iter().zip(want).enumerate() {
        if g != w {
            ensure!(margins[step] < 1e-3, "{what}: token {step} {g} vs reference {w}");
            return Ok(());
        }
    }
    ensure!(
        got.len() == want.len(),
        "{what}: {} tokens, expected {}",
        got.len(),
        want.len()
    );
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

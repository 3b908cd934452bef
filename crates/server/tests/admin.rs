//! Keys, runtime adapter loading and unloading, admission and cancellation, over real sockets.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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

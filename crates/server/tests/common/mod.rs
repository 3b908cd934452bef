//! Shared by the API tests: an in-process server on 127.0.0.1:0 over the test kit's qwen2 and its
//! PEFT adapters, and a minimal HTTP/1.1 client.
#![allow(dead_code)] // each test file uses a different subset

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use quiver_engine::EngineConfig;
use quiver_server::{build_state, AppState, Device, ServerOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const BASE: &str = "qwen2-f32-tied";

pub struct Server {
    pub addr: std::net::SocketAddr,
    pub state: Arc<AppState>,
    pub _dir: tempfile::TempDir,
    pub adapters: PathBuf,
    pub golden: quiver_testkit::LoraGolden,
    /// Sending on it starts `serve`'s shutdown (dropping it does not).
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// `serve` itself: it returns once drained.
    pub serving: tokio::task::JoinHandle<std::io::Result<()>>,
}

pub fn test_device() -> Result<Device> {
    match std::env::var("QUIVER_TEST_DEVICE") {
        Ok(d) => d.parse().map_err(anyhow::Error::msg),
        Err(_) => Ok(Device::Cpu),
    }
}

pub async fn server(api_key: Option<&str>, max_concurrent: usize) -> Result<Server> {
    server_with(api_key, max_concurrent, |_| {}).await
}

/// `server`, with its options adjusted by `tweak` first.
pub async fn server_with(
    api_key: Option<&str>,
    max_concurrent: usize,
    tweak: impl FnOnce(&mut ServerOptions),
) -> Result<Server> {
    let (dir, golden) = quiver_testkit::materialize_lora(BASE)?;
    let adapters = dir.path().join("adapters");
    let preloaded = "qwen2-r4-qkv";
    let mut opts = ServerOptions {
        model: dir.path().join("base"),
        served_model_name: Some("base".into()),
        lora_modules: vec![(preloaded.into(), adapters.join(preloaded))],
        pinned_adapters: vec![],
        adapter_root: Some(adapters.clone()),
        api_key: api_key.map(str::to_string),
        admin_key: None,
        max_model_len: Some(256),
        max_concurrent,
        max_body_bytes: 1 << 20,
        input_limits: Default::default(),
        // The GPU check script runs these tests on CUDA with QUIVER_TEST_DEVICE=cuda.
        device: test_device()?,
        cpu_matmul_precision: Default::default(),
        cpu_keep_weights_mapped: false,
        cpu_batch_invariant: false,
        quantization: Default::default(),
        gpu_memory_utilization: None,
        engine: EngineConfig {
            memory_budget: 64 << 20,
            ..Default::default()
        },
        connections: Default::default(),
        adapter_loading: Default::default(),
    };
    tweak(&mut opts);
    let state = tokio::task::spawn_blocking(move || build_state(opts)).await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = state.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        if stopped.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let serving = tokio::spawn(quiver_server::serve(s, listener, shutdown));
    Ok(Server {
        addr,
        state,
        _dir: dir,
        adapters,
        golden,
        stop: Some(stop),
        serving,
    })
}

/// A minimal HTTP/1.1 client (Connection: close), decoding chunked bodies.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    key: Option<&str>,
) -> Result<(u16, String)> {
    http_raw(addr, method, path, body.unwrap_or("").as_bytes(), key).await
}

/// [`http`] with a body of any bytes and no key.
pub async fn http_bytes(addr: std::net::SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    http_raw(addr, method, path, body, None).await
}

async fn http_raw(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    key: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // A server that refuses a body by its length answers and closes before reading it all: the
    // write may fail, the answer is still there to read.
    let _ = s.write_all(&request).await;
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

pub fn dechunk(mut s: &str) -> Result<String> {
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

pub fn json_of(body: &str) -> Result<Value> {
    serde_json::from_str(body).with_context(|| format!("not JSON: {body}"))
}

pub fn error_code(status: u16, body: &str) -> Result<(u16, Value)> {
    let v = json_of(body)?;
    ensure!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "not OpenAI's error format: {body}"
    );
    Ok((status, v["error"].clone()))
}

/// Token ids of a completion, from `logprobs.tokens` with `return_tokens_as_token_ids`.
pub fn token_ids(v: &Value) -> Result<Vec<u32>> {
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

pub fn check_greedy(got: &[u32], want: &[u32], margins: &[f32], what: &str) -> Result<()> {
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

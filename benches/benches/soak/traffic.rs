//! The soak's clients: well-behaved requests (timed), clients that go away mid-stream, adapter
//! churn through the admin API, and hostile clients. Each runs until `stop` and records what it got.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quiver_benches::Rng;
use serde_json::json;

use crate::client::{disconnect_after, request, stall};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Between the rounds of the disconnecting and churning clients: busy, not a flood (the hostile
/// client is the flood).
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Default)]
pub struct Tally {
    /// Seconds per well-behaved request that succeeded.
    pub latencies: Vec<f64>,
    /// (client kind, status or "timeout"/"io") → count.
    pub outcomes: BTreeMap<(&'static str, String), usize>,
}

pub type Shared = Arc<Mutex<Tally>>;

fn record(tally: &Shared, kind: &'static str, outcome: String) {
    if let Ok(mut t) = tally.lock() {
        *t.outcomes.entry((kind, outcome)).or_default() += 1;
    }
}

fn outcome(r: &anyhow::Result<(u16, String)>) -> String {
    match r {
        Ok((s, _)) => s.to_string(),
        Err(e) if e.to_string().contains("timed out") => "timeout".into(),
        Err(_) => "io".into(),
    }
}

/// A completion or chat request; `max_tokens: None` means a long one that ignores EOS.
fn generation_body(rng: &mut Rng, model: &str, stream: bool, max_tokens: Option<usize>) -> (&'static str, Vec<u8>) {
    let (path, mut body) = if rng.below(2) == 0 {
        let prompt = format!("The quick brown fox {} jumps", rng.below(1000));
        ("/v1/completions", json!({"model": model, "prompt": prompt}))
    } else {
        let messages = [json!({"role": "user", "content": format!("Tell me about {}.", rng.below(1000))})];
        ("/v1/chat/completions", json!({"model": model, "messages": messages}))
    };
    body["stream"] = json!(stream);
    match max_tokens {
        Some(m) => body["max_tokens"] = json!(m),
        None => {
            body["max_tokens"] = json!(200);
            body["ignore_eos"] = json!(true);
        }
    }
    (path, body.to_string().into_bytes())
}

/// Requests on the base model and the preloaded adapters; their latency is the soak's measure.
pub async fn well_behaved(addr: SocketAddr, models: Vec<String>, seed: u64, tally: Shared, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        let model = models[rng.below(models.len())].clone();
        let stream = rng.below(3) == 0;
        let max_tokens = 8 + rng.below(24);
        let (path, body) = generation_body(&mut rng, &model, stream, Some(max_tokens));
        let start = Instant::now();
        let r = request(addr, "POST", path, &body, TIMEOUT).await;
        if matches!(r, Ok((200, _))) {
            if let Ok(mut t) = tally.lock() {
                t.latencies.push(start.elapsed().as_secs_f64());
            }
        }
        record(&tally, "well-behaved", outcome(&r));
    }
}

/// Streams that the client drops after the first bytes.
pub async fn disconnecting(addr: SocketAddr, models: Vec<String>, seed: u64, tally: Shared, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    while !stop.load(Ordering::Relaxed) {
        let model = models[rng.below(models.len())].clone();
        let (path, body) = generation_body(&mut rng, &model, true, None);
        let r = disconnect_after(addr, path, &body, 64 + rng.below(512)).await;
        record(
            &tally,
            "disconnecting",
            if r.is_ok() { "dropped".into() } else { "io".into() },
        );
        tokio::time::sleep(PAUSE).await;
    }
}

/// Loads an adapter under a fresh name, uses it, unloads it.
pub async fn churn(addr: SocketAddr, adapter_dirs: Vec<String>, seed: u64, tally: Shared, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let name = format!("churn-{seed}-{k}");
        let path = &adapter_dirs[rng.below(adapter_dirs.len())];
        let load = json!({"lora_name": name, "lora_path": path}).to_string();
        let r = request(addr, "POST", "/v1/load_lora_adapter", load.as_bytes(), TIMEOUT).await;
        record(&tally, "churn: load", outcome(&r));
        let (p, body) = generation_body(&mut rng, &name, false, Some(8));
        let r = request(addr, "POST", p, &body, TIMEOUT).await;
        record(&tally, "churn: use", outcome(&r));
        let unload = json!({"lora_name": name}).to_string();
        let r = request(addr, "POST", "/v1/unload_lora_adapter", unload.as_bytes(), TIMEOUT).await;
        record(&tally, "churn: unload", outcome(&r));
        tokio::time::sleep(PAUSE).await;
    }
}

/// One attack at a time, in rotation: each names what it tries in the tally.
pub async fn hostile(addr: SocketAddr, seed: u64, tally: Shared, stop: Arc<AtomicBool>) {
    let mut rng = Rng(seed);
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        match i % 9 {
            0 => {
                // Partial headers, then silence.
                let _ = stall(
                    addr,
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                    Duration::from_secs(90),
                )
                .await;
                record(&tally, "hostile: stalled headers", "closed".into());
            }
            1 => {
                // Idle keep-alive connections, many at once.
                let idle: Vec<_> = (0..100)
                    .map(|_| tokio::spawn(stall(addr, b"", Duration::from_secs(90))))
                    .collect();
                for h in idle {
                    let _ = h.await;
                }
                record(&tally, "hostile: 100 idle connections", "closed".into());
            }
            2 => {
                let body = format!(
                    "{{\"model\":\"base\",\"prompt\":[{}],\"n\":16,\"max_tokens\":1}}",
                    vec!["[5,6,7]"; 50_000].join(",")
                );
                let r = request(addr, "POST", "/v1/completions", body.as_bytes(), TIMEOUT).await;
                record(&tally, "hostile: 800k sequences", outcome(&r));
            }
            3 => {
                let body = json!({"model": "base", "prompt": "word ".repeat(400_000), "max_tokens": 1}).to_string();
                let r = request(addr, "POST", "/v1/completions", body.as_bytes(), TIMEOUT).await;
                record(&tally, "hostile: 2 MB prompt", outcome(&r));
            }
            4 => {
                let r = request(addr, "POST", "/v1/completions", &vec![b'x'; 16 << 20], TIMEOUT).await;
                record(&tally, "hostile: 16 MB body", outcome(&r));
            }
            5 => {
                let r = request(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    b"{\"messages\": [1, null, {}",
                    TIMEOUT,
                )
                .await;
                record(&tally, "hostile: malformed JSON", outcome(&r));
            }
            6 => {
                let names = ["nope/", "./nope", "/etc", "../x", "nope"];
                let name = names[rng.below(names.len())];
                let body = json!({"model": name, "prompt": "hi", "max_tokens": 1}).to_string();
                let r = request(addr, "POST", "/v1/completions", body.as_bytes(), TIMEOUT).await;
                record(&tally, "hostile: odd adapter names", outcome(&r));
            }
            7 => {
                let body = json!({"model": "base", "messages": [{"role": "hacker", "content": 5}]}).to_string();
                let r = request(addr, "POST", "/v1/chat/completions", body.as_bytes(), TIMEOUT).await;
                record(&tally, "hostile: bad messages", outcome(&r));
            }
            _ => {
                let r = request(addr, "DELETE", "/v1/models", b"", TIMEOUT).await;
                record(&tally, "hostile: wrong method", outcome(&r));
            }
        }
    }
}

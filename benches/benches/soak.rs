//! Soak: the release `quiver serve` under 30 minutes of mixed traffic — well-behaved requests on
//! the base model and adapters, clients that drop their streams, adapter churn through the admin
//! API, and hostile clients in rotation (stalled headers, 100 idle connections, the 800,000-sequence
//! body, a 2 MB prompt, a 16 MB body, malformed JSON, odd adapter names, bad `messages`, a wrong
//! method). A quiet phase of well-behaved traffic alone comes first, as the reference. Reports the
//! server's RSS over time, the p50/p99 latency of well-behaved requests quiet vs mixed, every
//! outcome by client, 5xx counts, and how long SIGTERM takes to end the process. Targets (issue
//! #21): flat RSS, mixed p99 within 2× of quiet, zero 5xx.
//!
//!     cargo build --release -p quiver && cargo bench -p quiver-benches --bench soak
//!
//! On the test kit's tiny qwen2 and its PEFT adapters. Knobs: `QUIVER_SOAK_MINUTES` (mixed phase,
//! default 30), `QUIVER_SOAK_QUIET_S` (default 120), `QUIVER_SOAK_BIN` (default
//! `target/release/quiver`), `QUIVER_SOAK_ARGS` (extra `quiver serve` flags, space-separated),
//! `QUIVER_SOAK_MIX` (the mixed-phase clients beside the well-behaved ones, comma-separated,
//! default `disconnecting,churn,hostile`).

#[path = "soak/client.rs"]
mod client;
#[path = "soak/traffic.rs"]
mod traffic;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use traffic::{Shared, Tally};

const BASE: &str = "qwen2-f32-tied";
const PRELOADED: usize = 3;

fn env_or(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

fn rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The memory the server's KV and adapter pools may hold resident, from `/metrics` (these grow
/// up to the memory budget by design: cached prefixes, warm free lists), in MB.
async fn pools_mb(addr: SocketAddr) -> Result<f64> {
    let (_, body) = client::request(addr, "GET", "/metrics", b"", Duration::from_secs(5)).await?;
    let line = (body.lines())
        .find(|l| l.starts_with("quiver_memory_resident_bytes"))
        .context("no quiver_memory_resident_bytes in /metrics")?;
    let bytes: f64 = line.split_whitespace().last().context("no value")?.parse()?;
    Ok(bytes / (1 << 20) as f64)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

fn start_server(base: &PathBuf, adapters: &PathBuf, names: &[String]) -> Result<Server> {
    let bin = std::env::var("QUIVER_SOAK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/quiver"));
    ensure!(
        bin.exists(),
        "{} not found: build it with `cargo build --release -p quiver`",
        bin.display()
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut cmd = Command::new(&bin);
    cmd.arg("serve")
        .arg("--model")
        .arg(base)
        .args(["--served-model-name", "base", "--port", &port.to_string()])
        .arg("--adapter-root")
        .arg(adapters);
    for n in names {
        cmd.arg("--lora-modules")
            .arg(format!("{n}={}", adapters.join(n).display()));
    }
    if let Ok(extra) = std::env::var("QUIVER_SOAK_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    Ok(Server { child, addr })
}

async fn wait_healthy(addr: SocketAddr) -> Result<()> {
    for _ in 0..300 {
        if let Ok((200, _)) = client::request(addr, "GET", "/health", b"", Duration::from_secs(1)).await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the server did not become healthy")
}

fn spawn_mixed(
    addr: SocketAddr,
    models: &[String],
    dirs: &[String],
    tally: &Shared,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // `QUIVER_SOAK_MIX`: which of them run (all by default), to tell which one grows the RSS.
    let mix = std::env::var("QUIVER_SOAK_MIX").unwrap_or_else(|_| "disconnecting,churn,hostile".into());
    let on = |name: &str| mix.split(',').any(|m| m.trim() == name);
    let mut tasks = Vec::new();
    if on("disconnecting") {
        let models = models.to_vec();
        tasks.push(tokio::spawn(traffic::disconnecting(
            addr,
            models,
            11,
            tally.clone(),
            stop.clone(),
        )));
    }
    if on("churn") {
        tasks.push(tokio::spawn(traffic::churn(
            addr,
            dirs.to_vec(),
            12,
            tally.clone(),
            stop.clone(),
        )));
    }
    if on("hostile") {
        tasks.push(tokio::spawn(traffic::hostile(addr, 13, tally.clone(), stop.clone())));
    }
    tasks
}

/// Runs well-behaved clients (plus `mixed` ones) for `secs`; returns their tally.
async fn phase(addr: SocketAddr, models: &[String], dirs: &[String], secs: u64, mixed: bool) -> Tally {
    let tally: Shared = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(traffic::well_behaved(
                addr,
                models.to_vec(),
                i,
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();
    if mixed {
        tasks.extend(spawn_mixed(addr, models, dirs, &tally, &stop));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let mut out = Tally::default();
    if let Ok(mut t) = tally.lock() {
        std::mem::swap(&mut out, &mut t);
    }
    out
}

fn report(name: &str, t: &mut Tally) -> f64 {
    t.latencies.sort_by(f64::total_cmp);
    let p99 = percentile(&t.latencies, 0.99);
    println!(
        "{name}: {} well-behaved requests, p50 {:.3} s, p99 {:.3} s",
        t.latencies.len(),
        percentile(&t.latencies, 0.5),
        p99
    );
    p99
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let minutes = env_or("QUIVER_SOAK_MINUTES", 30)?;
    let quiet_s = env_or("QUIVER_SOAK_QUIET_S", 120)?;
    let (dir, _) = quiver_testkit::materialize_lora(BASE)?;
    let adapters = dir.path().join("adapters");
    let mut dirs: Vec<String> = std::fs::read_dir(&adapters)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("qwen2"))
        .collect();
    dirs.sort();
    ensure!(dirs.len() >= PRELOADED, "too few test-kit adapters: {dirs:?}");
    let preloaded: Vec<String> = dirs[..PRELOADED].to_vec();
    let mut server = start_server(&dir.path().join("base"), &adapters, &preloaded)?;
    let (addr, pid) = (server.addr, server.child.id());
    wait_healthy(addr).await?;
    let mut models = vec!["base".to_string()];
    models.extend(preloaded);

    // (seconds, RSS MB, MB of KV blocks and adapter pages the server reports resident).
    let rss: Arc<Mutex<Vec<(f64, f64, f64)>>> = Arc::default();
    let t0 = Instant::now();
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            while let Some(mb) = rss_mb(pid) {
                let pools = pools_mb(addr).await.unwrap_or(f64::NAN);
                if let Ok(mut r) = rss.lock() {
                    r.push((t0.elapsed().as_secs_f64(), mb, pools));
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
    };
    let mut quiet = phase(addr, &models, &dirs, quiet_s, false).await;
    let rss_after_quiet = rss_mb(pid).unwrap_or(f64::NAN);
    let mut mixed = phase(addr, &models, &dirs, minutes * 60, true).await;
    let rss_end = rss_mb(pid).unwrap_or(f64::NAN);

    let term = Instant::now();
    Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    let status = server.child.wait()?;
    let exit_s = term.elapsed().as_secs_f64();
    sampler.abort();

    println!(
        "soak: {minutes} min mixed after {quiet_s} s quiet, {BASE} + {} adapters",
        dirs.len()
    );
    let (q99, m99) = (report("quiet", &mut quiet), report("mixed", &mut mixed));
    println!("mixed p99 / quiet p99: {:.2} (target ≤ 2)", m99 / q99);
    println!("RSS: {rss_after_quiet:.0} MB after the quiet phase, {rss_end:.0} MB at the end");
    println!("\n| minute | RSS MB | KV + adapter pools MB | RSS less pools MB |\n|---:|---:|---:|---:|");
    if let Ok(r) = rss.lock() {
        let mut next = 0.0;
        for &(t, mb, pools) in r.iter() {
            if t >= next {
                println!("| {:.0} | {mb:.1} | {pools:.1} | {:.1} |", t / 60.0, mb - pools);
                next += 60.0;
            }
        }
    }
    println!("\n| client | outcome | count |\n|---|---|---:|");
    let mut fivexx = 0;
    for ((kind, outcome), n) in quiet.outcomes.iter().chain(mixed.outcomes.iter()) {
        if outcome.starts_with('5') {
            fivexx += n;
        }
        println!("| {kind} | {outcome} | {n} |");
    }
    println!("\n5xx answers: {fivexx} (target 0); SIGTERM → exit {status} after {exit_s:.1} s");
    println!("machine: {}", quiver_benches::machine());
    Ok(())
}

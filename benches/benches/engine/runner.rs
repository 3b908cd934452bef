//! Replays a request stream against a fresh engine and measures one sweep point.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use quiver_benches::{zipf_cdf, zipf_pick};
use quiver_engine::adapters::AdapterStats;

use quiver_engine::{Engine, EngineConfig, Event, GenerateRequest, Policy};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::DType;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::adapters::adapter_name;
use crate::noise::{cpu_ticks, least_disturbed, other_cores};
use crate::workload::Arrival;
use crate::{env_mb, HOST_ADAPTER_BUDGET, MAX_MODEL_LEN, MEMORY_BUDGET, RANK, ZIPF_ALPHA};

struct Record {
    submitted: Instant,
    tokens: Vec<Instant>,
    done: Instant,
}

fn collect(mut rx: UnboundedReceiver<Event>, submitted: Instant) -> Result<Record> {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta(_)) => tokens.push(Instant::now()),
            Some(Event::Finished { .. }) => {
                return Ok(Record {
                    submitted,
                    tokens,
                    done: Instant::now(),
                })
            }
            Some(Event::Error(e)) => bail!("request failed: {e}"),
            None => bail!("the engine dropped a request"),
        }
    }
}

pub struct Point {
    pub adapters: usize,
    pub requests: usize,
    /// First arrival to last finish.
    pub makespan: f64,
    pub output_tokens: usize,
    /// The saturated window: from the first stats sample with a full batch to the last one with
    /// requests waiting.
    pub window: f64,
    pub saturated: bool,
    pub window_tokens: usize,
    pub window_requests: usize,
    pub mean_running: f64,
    /// Batches run in the window.
    pub steps: u64,
    pub ttft: Vec<f64>,
    pub tpot: Vec<f64>,
    pub stats: AdapterStats,
    pub preemptions: u64,
    /// CPU cores other processes kept busy on average during the run.
    pub others: f64,
}

fn delta(a: AdapterStats, b: AdapterStats) -> AdapterStats {
    AdapterStats {
        loads: b.loads - a.loads,
        load_failures: b.load_failures - a.load_failures,
        uploads: b.uploads - a.uploads,
        device_hits: b.device_hits - a.device_hits,
        host_hits: b.host_hits - a.host_hits,
        device_evictions: b.device_evictions - a.device_evictions,
        host_evictions: b.host_evictions - a.host_evictions,
    }
}

pub fn engine_config() -> EngineConfig {
    EngineConfig {
        max_num_seqs: 32,
        max_batch_tokens: 256,
        block_size: 16,
        memory_budget: env_mb("QUIVER_ENGINE_BENCH_MEMORY_MB").unwrap_or(MEMORY_BUDGET),
        host_adapter_budget: env_mb("QUIVER_ENGINE_BENCH_HOST_MB").unwrap_or(HOST_ADAPTER_BUDGET),
        max_lora_rank: RANK,
        max_model_len: MAX_MODEL_LEN,
        adapter_dtype: DType::BF16,
        policy: policy(),
        ..EngineConfig::default()
    }
}

/// FCFS by default: every sweep point then admits the same requests in the same order (but for
/// requests skipped while their adapter loads), so only the adapter count changes.
/// `QUIVER_ENGINE_BENCH_POLICY=round-robin` runs the engine's default policy instead.
fn policy() -> Policy {
    match std::env::var("QUIVER_ENGINE_BENCH_POLICY").as_deref() {
        Ok("round-robin") => Policy::AdapterRoundRobin,
        _ => Policy::Fcfs,
    }
}

fn start_engine(model_dir: &Path, adapter_root: &Path, adapters: usize) -> Result<Engine> {
    let bundle = ModelBundle::load(CpuBackend::default(), model_dir, Some(MAX_MODEL_LEN))?;
    // With the tokenizer, as the server runs it: the engine's output stage detokenizes.
    let engine = Engine::start(
        bundle.model,
        Some(Arc::new(bundle.tokenizer)),
        bundle.eos_token_ids,
        engine_config(),
    )?;
    for i in 0..adapters {
        engine
            .register_adapter(&adapter_name(i), adapter_root.join(adapter_name(i)), false)?
            .blocking_recv()??;
    }
    // Warm-up on the base model (thread pool, allocations); touches no adapter.
    let warm = GenerateRequest {
        max_tokens: Some(4),
        ignore_eos: true,
        ..GenerateRequest::new((3..67).collect())
    };
    collect(engine.submit(engine.validate(warm)?)?, Instant::now())?;
    Ok(engine)
}

/// Engine load every `SAMPLE_EVERY`: (when, running, waiting, steps so far).
type Sample = (Instant, usize, usize, u64);
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Replays `stream` against a fresh engine with `adapters` registered adapters.
pub fn run_point(model_dir: &Path, adapter_root: &Path, adapters: usize, stream: &[Arrival]) -> Result<Point> {
    let engine = start_engine(model_dir, adapter_root, adapters)?;
    let cdf = zipf_cdf(adapters, ZIPF_ALPHA);
    let before = engine.stats()?.blocking_recv()?;
    let done = AtomicBool::new(false);
    let t0 = Instant::now();
    let cpu0 = cpu_ticks();
    let (records, samples) = std::thread::scope(|s| -> Result<(Vec<Record>, Vec<Sample>)> {
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(SAMPLE_EVERY);
                match engine.stats().ok().and_then(|rx| rx.blocking_recv().ok()) {
                    Some(st) => samples.push((Instant::now(), st.running, st.waiting, st.steps)),
                    None => break,
                }
            }
            samples
        });
        let mut handles = Vec::with_capacity(stream.len());
        for a in stream {
            let due = t0 + Duration::from_secs_f64(a.at);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let request = GenerateRequest {
                adapter: Some(adapter_name(zipf_pick(&cdf, a.popularity))),
                max_tokens: Some(a.max_tokens),
                ignore_eos: true,
                ..GenerateRequest::new(a.prompt.clone())
            };
            let submitted = Instant::now();
            let rx = engine.submit(engine.validate(request)?)?;
            handles.push(s.spawn(move || collect(rx, submitted)));
        }
        let records = handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("collector panicked"))?)
            .collect::<Result<Vec<_>>>();
        done.store(true, Ordering::Relaxed);
        let samples = sampler.join().map_err(|_| anyhow::anyhow!("sampler panicked"))?;
        Ok((records?, samples))
    })?;
    let others = other_cores(cpu0, t0);
    if std::env::var("QUIVER_ENGINE_BENCH_DUMP").is_ok() {
        for (t, r, w, st) in &samples {
            eprintln!("{:.2} running {r} waiting {w} steps {st}", (*t - t0).as_secs_f64());
        }
    }
    let after = engine.stats()?.blocking_recv()?;
    ensure!(
        after.waiting == 0 && after.running == 0,
        "engine still busy after all requests finished"
    );
    let end = records.iter().map(|r| r.done).max().context("no requests")?;
    // Throughput under load: only while requests were waiting (ramp-up and drain excluded).
    let full = samples.iter().position(|s| s.1 >= engine_config().max_num_seqs);
    let last_waiting = samples.iter().rposition(|s| s.2 > 0);
    let (from, to, saturated, steps) = match (full, last_waiting) {
        (Some(a), Some(b)) if samples[b].0 >= samples[a].0 + Duration::from_secs(5) => {
            (samples[a].0, samples[b].0, true, samples[b].3 - samples[a].3)
        }
        _ => (t0, end, false, after.steps - before.steps),
    };
    let in_window = |t: &Instant| *t >= from && *t < to;
    let window_samples: Vec<usize> = samples.iter().filter(|s| in_window(&s.0)).map(|s| s.1).collect();
    let ttft = records
        .iter()
        .map(|r| (*r.tokens.first().unwrap_or(&r.done) - r.submitted).as_secs_f64())
        .collect();
    let tpot = records
        .iter()
        .filter(|r| r.tokens.len() > 1)
        .map(|r| (r.tokens[r.tokens.len() - 1] - r.tokens[0]).as_secs_f64() / (r.tokens.len() - 1) as f64)
        .collect();
    Ok(Point {
        adapters,
        requests: records.len(),
        makespan: (end - t0).as_secs_f64(),
        output_tokens: records.iter().map(|r| r.tokens.len()).sum(),
        window: (to - from).as_secs_f64(),
        saturated,
        window_tokens: records.iter().flat_map(|r| &r.tokens).filter(|t| in_window(t)).count(),
        window_requests: records.iter().filter(|r| in_window(&r.done)).count(),
        steps,
        mean_running: window_samples.iter().sum::<usize>() as f64 / window_samples.len().max(1) as f64,
        ttft,
        tpot,
        stats: delta(before.adapters, after.adapters),
        preemptions: after.preemptions - before.preemptions,
        others,
    })
}

impl Point {
    /// Output tokens/s in the saturated window.
    pub fn tok_s(&self) -> f64 {
        self.window_tokens as f64 / self.window
    }
    /// Requests finished per second in the saturated window.
    pub fn req_s(&self) -> f64 {
        self.window_requests as f64 / self.window
    }
    pub fn acquisitions(&self) -> u64 {
        self.stats.device_hits + self.stats.host_hits
    }
    /// Fraction of adapter acquisitions served without a disk load. A miss is an upload right
    /// after a fresh load, and each load precedes at most one of them (a prefetched load may
    /// even be evicted unused), so misses ≤ min(loads, uploads): this is a lower bound.
    pub fn host_hit_rate(&self) -> f64 {
        1.0 - self.stats.loads.min(self.stats.uploads) as f64 / self.acquisitions().max(1) as f64
    }
}

/// Capacity in requests/s: the first `n` requests of the stream, all at once, on 8 adapters.
pub fn calibrate(model_dir: &Path, adapter_root: &Path, stream: &[Arrival], n: usize, tries: usize) -> Result<f64> {
    let burst: Vec<Arrival> = stream
        .iter()
        .take(n)
        .map(|a| Arrival {
            at: 0.0,
            prompt: a.prompt.clone(),
            max_tokens: a.max_tokens,
            popularity: a.popularity,
        })
        .collect();
    let p = least_disturbed("calibration", tries, || run_point(model_dir, adapter_root, 8, &burst))?;
    Ok(p.requests as f64 / p.makespan)
}

//! Prefix caching on multi-tenant chat traffic (issue #14), on the Qwen2.5-0.5B-shaped test-kit
//! model: 32 adapters, each with its own 1,024-token system prompt; per adapter several users,
//! each sending 3 turns of a growing chat (every turn resends the conversation so far); users
//! start at Poisson times and send their next turn when the previous one ends. One run, the
//! same workload four times: caching off and on under a roomy budget, then caching on under a
//! tight budget with idle adapters evicted before idle cached blocks (the engine's ranking) and
//! the other way round. Reports throughput, TTFT p50/p99, the prefix-cache hit rate and the
//! memory held by cached blocks, draws the TTFT distributions, then measures the TTFT of a
//! 1,536-token prompt sent twice and how many tokens one budget holds per KV cache dtype.
//!
//!     cargo bench -p quiver-benches --bench prefix
//!
//! Knobs: `QUIVER_PREFIX_BENCH_ADAPTERS` (32), `QUIVER_PREFIX_BENCH_USERS` (users per adapter,
//! 3), `QUIVER_PREFIX_BENCH_TURNS` (3), `QUIVER_PREFIX_BENCH_SYSTEM` (system prompt tokens,
//! 1024), `QUIVER_PREFIX_BENCH_RATE` (users starting per second, 2), `QUIVER_PREFIX_BENCH_MEMORY_MB`
//! (roomy budget, 2048), `QUIVER_PREFIX_BENCH_TIGHT_MB` (tight budget, 512; 0 skips those runs),
//! `QUIVER_PREFIX_BENCH_PLOT=FILE` (the PNG, `docs/bench-prefix.png`), `QUIVER_BENCH_MODEL=DIR`.

#[path = "prefix/capacity.rs"]
mod capacity;
#[path = "prefix/chat.rs"]
mod chat;
#[path = "prefix/plot.rs"]
mod plot;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use quiver_benches::{bench_model_dir, machine, Rng};
use quiver_engine::{Engine, EngineConfig, EngineStats};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::DType;
use quiver_testkit::{write_adapter, AdapterSpec, Targets};

use chat::{run_users, send, workload, Shape, Turn};

const SEED: u64 = 0x5EED_0014;
const MAX_MODEL_LEN: usize = 4096;
const REPEATED_PROMPT: usize = 1536;

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v.parse().ok().with_context(|| format!("{name}={v}")),
        Err(_) => Ok(default),
    }
}

fn adapter_name(i: usize) -> String {
    format!("tenant-{i:02}")
}

/// Rank-16 adapters on q/k/v/o (so each tenant's KV differs), written once under `target/`.
fn ensure_adapters(root: &Path, n: usize) -> Result<()> {
    for i in 0..n {
        let dir = root.join(adapter_name(i));
        if dir.join("adapter_model.safetensors").exists() {
            continue;
        }
        let spec = AdapterSpec {
            name: adapter_name(i),
            base: "qwen2.5-0.5b".into(),
            r: 16,
            lora_alpha: 32.0,
            use_rslora: false,
            target: Targets::List(["q_proj", "k_proj", "v_proj", "o_proj"].map(String::from).into()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            layers_to_transform: None,
            dtype: quiver_testkit::DType::Bf16,
            seed: 14_000 + i as u64,
        };
        write_adapter(&spec, &dir)?;
    }
    Ok(())
}

/// The engine as `quiver serve` runs this model (bf16 adapter pages, KV in the checkpoint's
/// dtype).
fn config(memory_budget: usize, prefix_caching: bool) -> EngineConfig {
    EngineConfig {
        max_num_seqs: 32,
        max_batch_tokens: 512,
        memory_budget,
        max_lora_rank: 16,
        max_model_len: MAX_MODEL_LEN,
        adapter_dtype: DType::BF16,
        kv_cache_dtype: None,
        enable_prefix_caching: prefix_caching,
        ..EngineConfig::default()
    }
}

/// An engine over `bundle` (its tokenizer and EOS ids included).
pub fn engine(bundle: ModelBundle<CpuBackend>, cfg: EngineConfig) -> Result<Engine> {
    let tokenizer = Some(Arc::new(bundle.tokenizer));
    Ok(Engine::start(bundle.model, tokenizer, bundle.eos_token_ids, cfg)?)
}

fn start(model: &Path, adapters: &Path, n: usize, cfg: EngineConfig) -> Result<Engine> {
    let engine = engine(
        ModelBundle::load(CpuBackend::default(), model, Some(MAX_MODEL_LEN))?,
        cfg,
    )?;
    for i in 0..n {
        engine
            .register_adapter(&adapter_name(i), adapters.join(adapter_name(i)), false)?
            .blocking_recv()??;
    }
    // Warm-up on the base model: thread pool, allocations; leaves nothing a tenant can reuse.
    send(&engine, None, (3..67).collect(), 2)?;
    Ok(engine)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub struct Row {
    pub label: String,
    requests: usize,
    pub seconds: f64,
    tokens: usize,
    /// Sorted.
    pub ttft: Vec<f64>,
    stats: EngineStats,
}

impl Row {
    pub fn requests_per_s(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

fn row(label: String, turns: &[Turn], elapsed: Duration, stats: EngineStats) -> Row {
    let mut ttft: Vec<f64> = turns.iter().map(|t| t.ttft.as_secs_f64()).collect();
    ttft.sort_by(f64::total_cmp);
    Row {
        label,
        requests: turns.len(),
        seconds: elapsed.as_secs_f64(),
        tokens: turns.iter().map(|t| t.prompt_tokens + t.output_tokens).sum(),
        ttft,
        stats,
    }
}

fn main() -> Result<()> {
    let shape = Shape {
        adapters: env_num("QUIVER_PREFIX_BENCH_ADAPTERS", 32)?,
        users_per_adapter: env_num("QUIVER_PREFIX_BENCH_USERS", 3)?,
        turns: env_num("QUIVER_PREFIX_BENCH_TURNS", 3)?,
        system_len: env_num("QUIVER_PREFIX_BENCH_SYSTEM", 1024)?,
        user_len: (16, 64),
        max_tokens: 16,
        rate: env_num("QUIVER_PREFIX_BENCH_RATE", 2.0)?,
    };
    let budget = env_num("QUIVER_PREFIX_BENCH_MEMORY_MB", 2048usize)? << 20;
    let tight = env_num("QUIVER_PREFIX_BENCH_TIGHT_MB", 512usize)? << 20;
    let model = bench_model_dir()?;
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = repo.join("target/bench-adapters-prefix");
    ensure_adapters(&root, shape.adapters)?;
    println!("machine: {}", machine());
    println!(
        "workload: {} adapters × {} users × {} turns; system prompts {} tokens, user messages 16-64 tokens, {} output tokens (greedy, ignore_eos); users start at {:.1}/s (Poisson); KV cache and adapter pages bf16; seed {SEED:#x}",
        shape.adapters, shape.users_per_adapter, shape.turns, shape.system_len, shape.max_tokens, shape.rate
    );
    let (systems, users) = workload(shape, SEED);
    let mut runs = vec![
        (format!("caching off, {} MiB", budget >> 20), config(budget, false)),
        (format!("caching on, {} MiB", budget >> 20), config(budget, true)),
    ];
    if tight > 0 {
        let mut cached_first = config(tight, true);
        cached_first.evict_cached_blocks_first = true;
        runs.push((
            format!("caching on, {} MiB, idle adapters evicted first", tight >> 20),
            config(tight, true),
        ));
        runs.push((
            format!("caching on, {} MiB, idle cached blocks evicted first", tight >> 20),
            cached_first,
        ));
    }
    let mut rows = Vec::new();
    for (label, cfg) in runs {
        let engine = start(&model, &root, shape.adapters, cfg)?;
        let (turns, elapsed) = run_users(&engine, &systems, &users, shape, adapter_name)?;
        let stats = engine.stats()?.blocking_recv()?;
        rows.push(row(label, &turns, elapsed, stats));
    }
    println!();
    println!("| run | requests | seconds | requests/s | tokens/s (prompt + output) | TTFT p50 (s) | TTFT p99 (s) | hit rate (tokens) | cached-block memory | adapter uploads / device evictions | preemptions |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let s = &r.stats;
        let hit = s.prefix_cache_hits as f64 / (s.prefix_cache_queries.max(1)) as f64;
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.0} | {:.3} | {:.3} | {:.1}% ({} of {}) | {:.1} MiB | {} / {} | {} |",
            r.label,
            r.requests,
            r.seconds,
            r.requests_per_s(),
            r.tokens as f64 / r.seconds,
            percentile(&r.ttft, 0.5),
            percentile(&r.ttft, 0.99),
            100.0 * hit,
            s.prefix_cache_hits,
            s.prefix_cache_queries,
            s.prefix_cache_bytes as f64 / (1 << 20) as f64,
            s.adapters.uploads,
            s.adapters.device_evictions,
            s.preemptions,
        );
    }
    let (off, on) = (&rows[0], &rows[1]);
    println!(
        "\ncaching on / off: throughput {:.2}× (target ≥ 3), p50 TTFT {:.1}× lower (target ≥ 5)",
        on.requests_per_s() / off.requests_per_s(),
        percentile(&off.ttft, 0.5) / percentile(&on.ttft, 0.5)
    );
    if let [_, _, adapters_first, cached_first] = &rows[..] {
        println!(
            "tight budget: idle adapters evicted first / idle cached blocks evicted first: throughput {:.2}×, p50 TTFT {:.2}× lower",
            adapters_first.requests_per_s() / cached_first.requests_per_s(),
            percentile(&cached_first.ttft, 0.5) / percentile(&adapters_first.ttft, 0.5)
        );
    }
    let png = std::env::var("QUIVER_PREFIX_BENCH_PLOT").map_or_else(|_| repo.join("docs/bench-prefix.png"), Into::into);
    plot::plot(&rows, &png)?;
    println!("plot: {}", png.display());

    // A repeated long prompt on one adapter: the second send reuses every full block.
    let engine = start(&model, &root, 1, config(budget, true))?;
    let prompt = Rng(SEED ^ 1536).prompt(REPEATED_PROMPT);
    let (first, _) = send(&engine, Some(adapter_name(0)), prompt.clone(), 1)?;
    let (second, _) = send(&engine, Some(adapter_name(0)), prompt, 1)?;
    println!(
        "repeated {REPEATED_PROMPT}-token prompt: TTFT {:.3} s first, {:.4} s second: {:.0}× lower (target ≥ 10)",
        first.ttft.as_secs_f64(),
        second.ttft.as_secs_f64(),
        first.ttft.as_secs_f64() / second.ttft.as_secs_f64()
    );
    drop(engine);

    capacity::report(&model, &[DType::F32, DType::BF16, DType::F16])
}

//! The engine end to end on the test kit's tiny llama and its PEFT adapters: greedy tokens are
//! the same alone and in a busy mixed batch (with preemption), a cold adapter does not hold up
//! other requests, pinned and leased adapters are never evicted, and nothing leaks.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use quiver_engine::request::Command;
use quiver_engine::scheduler::Scheduler;
use quiver_engine::{Engine, EngineConfig, Event, FinishReason, GenerateRequest, ValidRequest, Validator};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use tokio::sync::mpsc::UnboundedReceiver;

const ADAPTERS: &[&str] = &[
    "llama-r8-all-linear",
    "llama-r1-qv",
    "llama-r64-mlp",
    "llama-rank-alpha-pattern",
];

fn fixture() -> Result<(tempfile::TempDir, PathBuf)> {
    let (dir, _) = quiver_testkit::materialize_lora("llama-f32")?;
    let base = dir.path().join("base");
    Ok((dir, base))
}

fn start(base: &Path, adapters: &Path, cfg: EngineConfig) -> Result<Engine> {
    let bundle = ModelBundle::load(CpuBackend::default(), base, None)?;
    let engine = Engine::start(bundle.model, None, vec![], cfg)?;
    for name in ADAPTERS {
        engine
            .register_adapter(name, adapters.join(name), false)?
            .blocking_recv()??;
    }
    Ok(engine)
}

/// Registers `dir/name` with a scheduler driven by hand.
fn register(s: &mut Scheduler<CpuBackend>, dir: &Path, name: &str, pinned: bool) -> Result<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    s.handle(Command::RegisterAdapter {
        name: name.into(),
        path: dir.join(name),
        pinned,
        preloaded: None,
        reply: tx,
    });
    Ok(rx.try_recv()??)
}

fn small() -> EngineConfig {
    EngineConfig {
        memory_budget: 64 << 20,
        ..Default::default()
    }
}

fn request(i: usize, max_tokens: usize) -> GenerateRequest {
    let len = 3 + (i * 7) % 40;
    GenerateRequest {
        adapter: if i % 5 == 4 {
            None
        } else {
            Some(ADAPTERS[i % ADAPTERS.len()].to_string())
        },
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerateRequest::new((0..len as u32).map(|t| (t * 13 + i as u32 * 31) % 400 + 5).collect())
    }
}

/// Validates and submits, as the API does.
fn submit(engine: &Engine, r: GenerateRequest) -> Result<UnboundedReceiver<Event>> {
    Ok(engine.submit(engine.validate(r)?)?)
}

/// Validates a request for a scheduler driven by hand.
fn valid(s: &Scheduler<CpuBackend>, r: GenerateRequest) -> std::sync::Arc<ValidRequest> {
    Validator::new(s.limits()).validate(r).expect("a valid request").into()
}

/// Collects a request's tokens until it finishes.
fn collect(mut rx: UnboundedReceiver<Event>) -> Result<(Vec<u32>, FinishReason)> {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().context("engine dropped the request")? {
            Event::Delta(d) => tokens.extend(d.tokens.iter().map(|s| s.token)),
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                ensure!(
                    completion_tokens == tokens.len(),
                    "usage says {completion_tokens}, got {}",
                    tokens.len()
                );
                return Ok((tokens, reason));
            }
            Event::Error(e) => bail!("request failed: {e}"),
        }
    }
}

#[test]
fn tokens_are_the_same_alone_and_in_a_busy_batch_with_preemption() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let n = 12;
    let alone_engine = start(&base, &adapters, small())?;
    let mut alone = Vec::new();
    for i in 0..n {
        alone.push(collect(submit(&alone_engine, request(i, 10))?)?.0);
    }
    // A budget of a few KV blocks (8 KiB each here) forces preemption and recomputation, and a
    // small token budget forces chunked prefill.
    let cfg = EngineConfig {
        memory_budget: 400 << 10,
        max_batch_tokens: 24,
        block_size: 4,
        ..small()
    };
    let busy = start(&base, &adapters, cfg)?;
    let receivers: Vec<_> = (0..n)
        .map(|i| submit(&busy, request(i, 10)))
        .collect::<Result<_, _>>()?;
    for (i, rx) in receivers.into_iter().enumerate() {
        let (tokens, reason) = collect(rx)?;
        ensure!(reason == FinishReason::Length, "request {i} finished with {reason:?}");
        ensure!(
            tokens == alone[i],
            "request {i}: busy batch gave {tokens:?}, alone {:?}",
            alone[i]
        );
    }
    let stats = busy.stats()?.blocking_recv()?;
    ensure!(stats.preemptions > 0, "the small budget should have forced preemption");
    ensure!(
        stats.kv_blocks_used == 0 && stats.kv_bytes == stats.prefix_cache_idle_bytes,
        "KV blocks leaked: {stats:?}"
    );
    ensure!(
        stats.running == 0 && stats.waiting == 0,
        "requests left behind: {stats:?}"
    );
    Ok(())
}

/// The adapter's config is a FIFO: its load blocks until the test writes it. Base-model and
/// resident-adapter requests must finish meanwhile.
#[test]
fn a_cold_adapter_does_not_delay_other_requests() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let engine = start(&base, &adapters, small())?;
    // Warm llama-r1-qv.
    collect(submit(&engine, request(1, 2))?)?;
    let cold = dir.path().join("cold");
    std::fs::create_dir(&cold)?;
    std::fs::copy(
        adapters.join("llama-r8-all-linear/adapter_model.safetensors"),
        cold.join("adapter_model.safetensors"),
    )?;
    let fifo = cold.join("adapter_config.json");
    let status = std::process::Command::new("mkfifo").arg(&fifo).status()?;
    ensure!(status.success(), "mkfifo failed");
    engine
        .register_adapter("cold", cold.clone(), false)?
        .blocking_recv()??;
    let mut cold_req = request(0, 4);
    cold_req.adapter = Some("cold".into());
    let mut cold_rx = submit(&engine, cold_req)?;
    let t = Instant::now();
    let warm = collect(submit(&engine, request(1, 8))?)?;
    let base_only = collect(submit(&engine, request(4, 8))?)?;
    ensure!(
        warm.0.len() == 8 && base_only.0.len() == 8,
        "other requests did not complete"
    );
    ensure!(
        cold_rx.try_recv().is_err(),
        "the cold request cannot have produced anything yet"
    );
    let waited = t.elapsed();
    // Release the load: write the config into the FIFO.
    let config = std::fs::read(adapters.join("llama-r8-all-linear/adapter_config.json"))?;
    std::fs::write(&fifo, config)?;
    let (tokens, _) = collect(cold_rx)?;
    ensure!(tokens.len() == 4, "cold request produced {} tokens", tokens.len());
    ensure!(waited < Duration::from_secs(30), "sanity");
    Ok(())
}

/// Drives the scheduler by hand with a budget that holds about one adapter beside the KV cache.
#[test]
fn eviction_spares_pinned_and_leased_adapters() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let bundle = ModelBundle::load(CpuBackend::default(), &base, None)?;
    // 64-token KV blocks of 32,768 B. Pinned r1 (1,792 B) + leased r64 (294,912 B) + the long
    // request's block = 329,472 B; r8 (65,536 B) does not fit beside them until r64 is evicted.
    let cfg = EngineConfig {
        memory_budget: 360_000,
        block_size: 64,
        ..small()
    };
    let mut s = Scheduler::build(bundle.model, None, vec![], cfg)?;
    register(&mut s, &adapters, "llama-r1-qv", true)?;
    register(&mut s, &adapters, "llama-r64-mlp", false)?;
    register(&mut s, &adapters, "llama-r8-all-linear", false)?;
    let submit = |s: &mut Scheduler<CpuBackend>, adapter: &str, max_tokens| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = request(0, max_tokens);
        r.adapter = Some(adapter.into());
        s.handle(Command::Submit {
            request: valid(s, r),
            events: tx,
        });
        rx
    };
    let run_until = |s: &mut Scheduler<CpuBackend>, rx: &mut UnboundedReceiver<Event>| -> Result<Vec<Event>> {
        let mut events = Vec::new();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            s.step()?;
            while let Ok(e) = rx.try_recv() {
                let done = !matches!(e, Event::Delta(_));
                events.push(e);
                if done {
                    return Ok(events);
                }
            }
        }
        bail!("request did not finish")
    };
    // Pinned adapter resident.
    let mut rx = submit(&mut s, "llama-r1-qv", 1);
    run_until(&mut s, &mut rx)?;
    // A long request holds a lease on r64 while r8 asks for room.
    let mut long = submit(&mut s, "llama-r64-mlp", 50);
    let mut first = None;
    while first.is_none() {
        s.step()?;
        first = long.try_recv().ok();
    }
    let mut small = submit(&mut s, "llama-r8-all-linear", 1);
    for _ in 0..5 {
        s.step()?;
    }
    ensure!(
        small.try_recv().is_err(),
        "r8 cannot have run: there is no room without evicting"
    );
    let info = |s: &mut Scheduler<CpuBackend>| -> Result<Vec<quiver_engine::adapters::AdapterInfo>> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::Adapters { reply: tx });
        Ok(rx.try_recv()?)
    };
    let tiers: Vec<_> = info(&mut s)?
        .into_iter()
        .map(|a| (a.name, a.tier, a.in_flight))
        .collect();
    use quiver_engine::adapters::Tier;
    ensure!(
        tiers.contains(&("llama-r1-qv".into(), Tier::Device, 0)),
        "pinned adapter evicted: {tiers:?}"
    );
    ensure!(
        tiers.contains(&("llama-r64-mlp".into(), Tier::Device, 1)),
        "leased adapter evicted: {tiers:?}"
    );
    ensure!(
        !tiers
            .iter()
            .any(|(n, t, _)| n == "llama-r8-all-linear" && *t == Tier::Device),
        "r8 uploaded: {tiers:?}"
    );
    // Once the lease ends, r64 can be evicted and r8 runs.
    drop(long);
    let events = run_until(&mut s, &mut small)?;
    ensure!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "small request: {events:?}"
    );
    let tiers: Vec<_> = info(&mut s)?.into_iter().map(|a| (a.name, a.tier)).collect();
    ensure!(
        tiers.contains(&("llama-r1-qv".into(), Tier::Device)),
        "pinned adapter evicted: {tiers:?}"
    );
    ensure!(
        tiers.contains(&("llama-r8-all-linear".into(), Tier::Device)),
        "r8 not resident: {tiers:?}"
    );
    ensure!(
        !tiers.contains(&("llama-r64-mlp".into(), Tier::Device)),
        "r64 should have made room: {tiers:?}"
    );
    Ok(())
}

/// A queue longer than the host tier holds: only the head of the queue is prefetched, and the
/// window (8 by default) shrinks to what the host tier holds, so no adapter is loaded, evicted
/// from the host tier before its request is admitted, and loaded again.
#[test]
fn a_long_queue_loads_each_adapter_once() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let bundle = ModelBundle::load(CpuBackend::default(), &base, None)?;
    let cfg = EngineConfig {
        max_num_seqs: 1,
        // The host tier keeps only the adapter loaded last.
        host_adapter_budget: 1,
        ..small()
    };
    ensure!(cfg.prefetch > 1, "the test needs a window wider than the host tier");
    let mut s = Scheduler::build(bundle.model, None, vec![], cfg)?;
    for name in ADAPTERS {
        register(&mut s, &adapters, name, false)?;
    }
    let mut pending: Vec<UnboundedReceiver<Event>> = ADAPTERS
        .iter()
        .map(|name| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut r = request(0, 2);
            r.adapter = Some(name.to_string());
            let request = valid(&s, r);
            s.handle(Command::Submit { request, events: tx });
            rx
        })
        .collect();
    let t = Instant::now();
    while !pending.is_empty() {
        ensure!(t.elapsed() < Duration::from_secs(60), "requests did not finish");
        s.step()?;
        pending.retain_mut(|rx| {
            let mut done = false;
            while let Ok(e) = rx.try_recv() {
                done |= !matches!(e, Event::Delta(_));
            }
            !done
        });
    }
    let stats = s.stats().adapters;
    ensure!(
        stats.uploads == ADAPTERS.len() as u64 && stats.loads == stats.uploads,
        "each adapter should be loaded once and uploaded once: {stats:?}"
    );
    Ok(())
}

#[test]
fn impossible_requests_are_rejected_up_front() -> Result<()> {
    let (dir, base) = fixture()?;
    let engine = start(
        &base,
        &dir.path().join("adapters"),
        EngineConfig {
            max_model_len: 64,
            ..small()
        },
    )?;
    let mut too_long = request(0, 100);
    too_long.adapter = None;
    let mut unknown = request(0, 2);
    unknown.adapter = Some("nope".into());
    match engine.validate(too_long) {
        Err(e) => ensure!(e.to_string().contains("maximum context length"), "{e}"),
        Ok(_) => bail!("a request longer than the context passed validation"),
    }
    match submit(&engine, unknown)?.blocking_recv() {
        Some(Event::Error(e)) => ensure!(e.to_string().contains("not registered"), "{e}"),
        other => bail!("expected an error, got {other:?}"),
    }
    Ok(())
}

/// A pinned adapter keeps its host copy when the host tier is over budget: the others go.
#[test]
fn the_host_tier_never_evicts_a_pinned_adapter() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let bundle = ModelBundle::load(CpuBackend::default(), &base, None)?;
    let cfg = EngineConfig {
        host_adapter_budget: 1,
        ..small()
    };
    let mut s = Scheduler::build(bundle.model, None, vec![], cfg)?;
    register(&mut s, &adapters, "llama-r64-mlp", true)?;
    for name in ["llama-r8-all-linear", "llama-r1-qv"] {
        register(&mut s, &adapters, name, false)?;
    }
    let tiers = |s: &mut Scheduler<CpuBackend>| -> Result<Vec<(String, quiver_engine::adapters::Tier)>> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::Adapters { reply: tx });
        Ok(rx.try_recv()?.into_iter().map(|a| (a.name, a.tier)).collect())
    };
    use quiver_engine::adapters::Tier;
    // Each unpinned adapter in turn: run one request on it, which loads it into the host tier.
    for name in ["llama-r8-all-linear", "llama-r1-qv"] {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut r = request(1, 1);
        r.adapter = Some(name.into());
        s.handle(Command::Submit {
            request: valid(&s, r),
            events: tx,
        });
        let t = Instant::now();
        while !matches!(rx.try_recv(), Ok(Event::Finished { .. })) {
            ensure!(t.elapsed() < Duration::from_secs(30), "{name} did not finish");
            s.step()?;
        }
    }
    let t = Instant::now();
    while !tiers(&mut s)?.contains(&("llama-r64-mlp".into(), Tier::Host)) {
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the pinned adapter never reached the host tier"
        );
        s.step()?;
    }
    let got = tiers(&mut s)?;
    ensure!(
        got.contains(&("llama-r8-all-linear".into(), Tier::Device))
            && got.contains(&("llama-r1-qv".into(), Tier::Device)),
        "{got:?}"
    );
    Ok(())
}

/// Per-adapter request counters end with their adapter: churn through many names must not grow
/// the metrics forever.
#[test]
fn counters_of_unregistered_adapters_are_dropped() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let bundle = ModelBundle::load(CpuBackend::default(), &base, None)?;
    let mut s = Scheduler::build(bundle.model, None, vec![], small())?;
    let stats = |s: &mut Scheduler<CpuBackend>| -> Result<quiver_engine::EngineStats> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::Stats { reply: tx });
        Ok(rx.try_recv()?)
    };
    for k in 0..3 {
        let name = format!("churn-{k}");
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::RegisterAdapter {
            name: name.clone(),
            path: adapters.join("llama-r1-qv"),
            pinned: false,
            preloaded: None,
            reply: tx,
        });
        rx.try_recv()??;
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let mut r = request(1, 1);
        r.adapter = Some(name.clone());
        s.handle(Command::Submit {
            request: valid(&s, r),
            events: tx,
        });
        let t = Instant::now();
        while !matches!(events.try_recv(), Ok(Event::Finished { .. })) {
            ensure!(t.elapsed() < Duration::from_secs(30), "{name} did not finish");
            s.step()?;
        }
        ensure!(stats(&mut s)?.requests.per_adapter.contains_key(&name));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::UnregisterAdapter {
            name: name.clone(),
            reply: tx,
        });
        rx.try_recv()??;
    }
    let names: Vec<String> = stats(&mut s)?.requests.per_adapter.into_keys().collect();
    ensure!(names.is_empty(), "{names:?}");
    Ok(())
}

/// The budget bounds physical memory: KV blocks freed after long sequences and the pages of an
/// adapter uploaded afterwards never hold more than the budget together (released blocks give
/// their memory back).
#[test]
fn kv_and_adapter_pages_together_stay_within_the_budget() -> Result<()> {
    let (dir, base) = fixture()?;
    let adapters = dir.path().join("adapters");
    let bundle = ModelBundle::load(CpuBackend::default(), &base, None)?;
    // 64-token blocks of 32,768 B: 10 fit; r64's pages (294,912 B) fit only once the KV is free.
    let budget = 360_000;
    let cfg = EngineConfig {
        memory_budget: budget,
        block_size: 64,
        ..small()
    };
    let mut s = Scheduler::build(bundle.model, None, vec![], cfg)?;
    register(&mut s, &adapters, "llama-r64-mlp", false)?;
    let stats = |s: &mut Scheduler<CpuBackend>| -> Result<quiver_engine::EngineStats> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        s.handle(Command::Stats { reply: tx });
        Ok(rx.try_recv()?)
    };
    let run = |s: &mut Scheduler<CpuBackend>, requests: Vec<GenerateRequest>| -> Result<()> {
        let mut rxs = Vec::new();
        for r in requests {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            s.handle(Command::Submit {
                request: valid(s, r),
                events: tx,
            });
            rxs.push(rx);
        }
        let t = Instant::now();
        let mut done = 0;
        while done < rxs.len() {
            ensure!(t.elapsed() < Duration::from_secs(60), "requests did not finish");
            s.step()?;
            for rx in &mut rxs {
                if matches!(rx.try_recv(), Ok(Event::Finished { .. })) {
                    done += 1;
                }
            }
        }
        Ok(())
    };
    // Three base-model sequences of 103-117 tokens: 2 blocks each, 196,608 B; with r64's pages
    // that is 491,520 B, over the budget unless the free blocks give their memory back.
    let long: Vec<GenerateRequest> = (0..3)
        .map(|i| GenerateRequest {
            adapter: None,
            ..request(i, 100)
        })
        .collect();
    run(&mut s, long)?;
    let touched_kv = stats(&mut s)?.resident_bytes;
    ensure!(touched_kv >= 6 * 32_768, "the long sequences touched {touched_kv} B");
    let mut r = request(1, 1);
    r.adapter = Some("llama-r64-mlp".into());
    run(&mut s, vec![r])?;
    let st = stats(&mut s)?;
    ensure!(st.adapter_bytes >= 294_912, "r64 not resident: {st:?}");
    ensure!(
        st.resident_bytes <= budget,
        "{} B resident (KV touched {touched_kv} B + pages) over the {budget} B budget",
        st.resident_bytes
    );
    Ok(())
}

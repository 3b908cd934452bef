//! Prefix caching end to end: greedy tokens and logprobs are bitwise identical with caching on
//! and off (across adapters, for n > 1, under preemption, with chunked prefill, for prompts that
//! share only part of a block), the same prompt under the base model, adapter A, adapter B and a
//! reloaded A gives in any order exactly what it gives alone, and the cache does get hits.
//!
//! Every engine here runs the CPU backend in batch-invariant mode
//! (`CpuBackend::with_batch_invariant`, `--batch-invariant`). In the default mode the same
//! token's logits come out a few ulps apart when its prefill is cut into other chunks, shares a
//! step with other sequences or finds its prefix's K/V in the cache (computed by an earlier,
//! differently shaped prefill): the matmul sums in an order that depends on the number of rows
//! (and hands large prefills to the `gemm` crate), and so does the LoRA shrink. Only with every
//! kernel batch invariant can "identical" mean bitwise.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use quiver_engine::{Engine, EngineConfig, EngineStats, Event, GenerateRequest};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use quiver_testkit::{write_adapter, AdapterSpec, DType, Targets};

/// Block size of every engine here: prompts below are laid out in blocks of 4.
const BS: usize = 4;

/// The test kit's tiny llama (2 layers) and adapters that change K/V in different ways: `kv`
/// and `kv-b` (k_proj and v_proj), `kv-reloaded` (the same targets, other weights: what `kv`
/// becomes when reloaded), `mlp-l0` (layer 0's MLP only: layer 0's K/V equal the base model's,
/// layer 1's differ) and `mlp-l1` (the last layer's MLP: every K/V equals the base model's).
struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    adapters: PathBuf,
}

fn fixture() -> Result<Fixture> {
    let (dir, _) = quiver_testkit::materialize_lora("llama-f32")?;
    let adapters = dir.path().join("prefix-adapters");
    let list = |items: &[&str]| Targets::List(items.iter().map(|s| s.to_string()).collect());
    let spec = |name: &str, target: Targets, layers: Option<Vec<usize>>, seed: u64| AdapterSpec {
        name: name.into(),
        base: "llama-f32".into(),
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        target,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        layers_to_transform: layers,
        dtype: DType::F32,
        seed,
    };
    let mlp = ["gate_proj", "up_proj", "down_proj"];
    for s in [
        spec("kv", list(&["k_proj", "v_proj"]), None, 201),
        spec("kv-b", list(&["k_proj", "v_proj"]), None, 202),
        spec("kv-reloaded", list(&["k_proj", "v_proj"]), None, 203),
        spec("mlp-l0", list(&mlp), Some(vec![0]), 204),
        spec("mlp-l1", list(&mlp), Some(vec![1]), 205),
    ] {
        write_adapter(&s, &adapters.join(&s.name))?;
    }
    Ok(Fixture {
        base: dir.path().join("base"),
        adapters,
        _dir: dir,
    })
}

/// The backend every engine here runs on (see the module docs).
fn backend() -> CpuBackend {
    CpuBackend::default().with_batch_invariant(true)
}

fn start(f: &Fixture, caching: bool, cfg: EngineConfig) -> Result<Engine> {
    let bundle = ModelBundle::load(backend(), &f.base, None)?;
    let engine = Engine::start(
        bundle.model,
        None,
        vec![],
        EngineConfig {
            enable_prefix_caching: caching,
            block_size: BS,
            ..cfg
        },
    )?;
    for name in ["kv", "kv-b", "mlp-l0", "mlp-l1"] {
        register(&engine, name, &f.adapters.join(name))?;
    }
    Ok(engine)
}

fn register(engine: &Engine, name: &str, dir: &Path) -> Result<()> {
    Ok(engine
        .register_adapter(name, dir.to_path_buf(), false)?
        .blocking_recv()??)
}

fn stats(engine: &Engine) -> Result<EngineStats> {
    Ok(engine.stats()?.blocking_recv()?)
}

/// Each choice's (token, logprob) pairs and its `cached_tokens`.
type Choices = Vec<(Vec<(u32, f32)>, usize)>;

fn request(prompt: Vec<u32>, adapter: Option<&str>, n: usize, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::new(prompt);
    r.adapter = adapter.map(String::from);
    r.n = n;
    r.max_tokens = Some(max_tokens);
    r.ignore_eos = true;
    r.sampling.logprobs = Some(2);
    r
}

fn submit(engine: &Engine, r: GenerateRequest) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>> {
    Ok(engine.submit(engine.validate(r)?)?)
}

fn collect(mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Result<Choices> {
    let mut out: Choices = vec![(Vec::new(), 0); n];
    let mut done = 0;
    while done < n {
        match rx.blocking_recv().context("engine dropped the request")? {
            Event::Delta(d) => out[d.index].0.extend(d.tokens.iter().map(|s| (s.token, s.logprob))),
            Event::Finished {
                index, cached_tokens, ..
            } => {
                out[index].1 = cached_tokens;
                done += 1;
            }
            Event::Error(e) => bail!("request failed: {e}"),
        }
    }
    Ok(out)
}

fn run(engine: &Engine, r: GenerateRequest) -> Result<Choices> {
    let n = r.n;
    collect(submit(engine, r)?, n)
}

/// Same tokens and bitwise the same logprobs in every choice (`cached_tokens` are not
/// compared: they differ with caching on and off by design).
fn same(a: &Choices, b: &Choices) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|((x, _), (y, _))| {
            x.len() == y.len() && (x.iter().zip(y)).all(|(p, q)| p.0 == q.0 && p.1.to_bits() == q.1.to_bits())
        })
}

/// Other tokens, or a logprob further off than any summation order could move it: what a block
/// computed under other weights does (so a test that they differ proves something).
fn far_apart(a: &Choices, b: &Choices) -> bool {
    a.len() != b.len()
        || a.iter().zip(b).any(|((x, _), (y, _))| {
            x.len() != y.len() || (x.iter().zip(y)).any(|(p, q)| p.0 != q.0 || (p.1 - q.1).abs() > 1e-3)
        })
}

/// A mixed workload: a 24-token system prompt (6 blocks) shared by every request, users who
/// share it plus part of a block, chat turns that extend an earlier prompt, every adapter.
fn workload() -> Vec<GenerateRequest> {
    let system: Vec<u32> = (0..24).map(|t| (t * 11 + 7) % 250 + 3).collect();
    let adapters = [None, Some("kv"), Some("kv-b"), Some("mlp-l0"), Some("mlp-l1")];
    let mut out = Vec::new();
    for (i, adapter) in adapters.iter().enumerate() {
        for user in 0..2u32 {
            let mut prompt = system.clone();
            // Users share the first two tokens of their block, then diverge mid-block.
            prompt.extend([9, 10, 20 + user, 30 + i as u32, 40 + user]);
            out.push(request(prompt.clone(), *adapter, 1 + user as usize * 2, 5));
            // The next turn resends the conversation and adds to it.
            prompt.extend([50, 51, 52, 53, 54, 55, 56]);
            out.push(request(prompt, *adapter, 1, 4));
        }
    }
    // A prompt that ends exactly on a block boundary and is cached whole: its last block is
    // recomputed.
    out.push(request(system.clone(), Some("kv"), 1, 3));
    out.push(request(system, Some("kv"), 2, 3));
    out
}

/// One request at a time, caching on and off: identical tokens and logprobs, and the cache hit.
#[test]
fn outputs_are_identical_with_caching_on_and_off() -> Result<()> {
    let f = fixture()?;
    let cfg = EngineConfig {
        memory_budget: 64 << 20,
        ..Default::default()
    };
    let (on, off) = (start(&f, true, cfg.clone())?, start(&f, false, cfg)?);
    for (i, r) in workload().into_iter().enumerate() {
        let (a, b) = (run(&on, r.clone())?, run(&off, r)?);
        ensure!(same(&a, &b), "request {i}: caching on {a:?}, off {b:?}");
        ensure!(
            b.iter().all(|c| c.1 == 0),
            "request {i}: cached tokens with caching off"
        );
    }
    let s = stats(&on)?;
    ensure!(
        s.prefix_cache_hits > 0 && s.prefix_cache_queries > s.prefix_cache_hits,
        "{s:?}"
    );
    ensure!(s.prefix_cache_bytes > 0 && s.kv_blocks_used == 0, "{s:?}");
    ensure!(
        s.kv_bytes == s.prefix_cache_idle_bytes,
        "only idle cached blocks stay: {s:?}"
    );
    let off = stats(&off)?;
    ensure!(
        off.prefix_cache_queries == 0 && off.prefix_cache_bytes == 0 && off.kv_bytes == 0,
        "{off:?}"
    );
    Ok(())
}

/// Everything at once on a budget of a few dozen blocks and a 12-token step: chunked prefill,
/// preemption and recomputation with shared blocks give what caching off gives alone.
#[test]
fn outputs_are_identical_under_preemption_and_chunked_prefill() -> Result<()> {
    let f = fixture()?;
    let alone = start(
        &f,
        false,
        EngineConfig {
            memory_budget: 64 << 20,
            ..Default::default()
        },
    )?;
    let expected: Vec<Choices> = workload().into_iter().map(|r| run(&alone, r)).collect::<Result<_>>()?;
    // The four adapters take 30 KiB here and a KV block 2 KiB: 35 blocks for 8 sequences.
    let busy = start(
        &f,
        true,
        EngineConfig {
            memory_budget: 100 << 10,
            max_batch_tokens: 12,
            max_num_seqs: 8,
            ..Default::default()
        },
    )?;
    let mut got = Vec::new();
    for round in 0..2 {
        let rxs: Vec<_> = (workload().into_iter())
            .map(|r| Ok((r.n, submit(&busy, r)?)))
            .collect::<Result<_>>()?;
        for (i, (n, rx)) in rxs.into_iter().enumerate() {
            let c = collect(rx, n)?;
            ensure!(
                same(&c, &expected[i]),
                "round {round} request {i}: {c:?}, alone {:?}",
                expected[i]
            );
            got.push(c);
        }
    }
    let s = stats(&busy)?;
    ensure!(s.preemptions > 0, "the budget should force preemption: {s:?}");
    ensure!(s.prefix_cache_hits > 0, "{s:?}");
    ensure!(
        s.kv_blocks_used == 0 && s.kv_bytes == s.prefix_cache_idle_bytes,
        "{s:?}"
    );
    ensure!(s.kv_bytes + s.adapter_bytes <= s.memory_budget, "{s:?}");
    Ok(())
}

/// The later choices of an n > 1 request find the prompt the first one prefilled.
#[test]
fn choices_share_their_prompt() -> Result<()> {
    let f = fixture()?;
    let engine = start(
        &f,
        true,
        EngineConfig {
            memory_budget: 64 << 20,
            ..Default::default()
        },
    )?;
    let prompt: Vec<u32> = (0..41).map(|t| (t * 5 + 1) % 200 + 3).collect();
    let c = run(&engine, request(prompt, Some("kv"), 4, 3))?;
    ensure!(c[0].1 == 0, "nothing cached before the first choice: {c:?}");
    for (i, (_, cached)) in c.iter().enumerate().skip(1) {
        ensure!(
            *cached == 40,
            "choice {i} found {cached} of the prompt's 40 full-block tokens"
        );
    }
    let s = stats(&engine)?;
    ensure!(
        (s.prefix_cache_queries, s.prefix_cache_hits) == (4 * 41, 3 * 40),
        "the prompt is looked up 4 times and found 3: {s:?}"
    );
    Ok(())
}

/// Every order of the base model, A, B and a reloaded A on one prompt (with a repeat at the
/// end, which must hit) gives exactly each one's answer alone: no block crosses weights.
#[test]
fn blocks_never_cross_adapters_or_reloads() -> Result<()> {
    let f = fixture()?;
    let cfg = EngineConfig {
        memory_budget: 64 << 20,
        ..Default::default()
    };
    let prompt: Vec<u32> = (0..33).map(|t| (t * 3 + 2) % 200 + 3).collect();
    // (adapter name as sent, directory registered under that name)
    let cases: [(Option<&str>, &str); 6] = [
        (None, ""),
        (Some("kv"), "kv"),
        (Some("kv-b"), "kv-b"),
        (Some("kv"), "kv-reloaded"),
        (Some("mlp-l0"), "mlp-l0"),
        (Some("mlp-l1"), "mlp-l1"),
    ];
    let alone: Vec<Choices> = (cases.iter())
        .map(|&(name, dir)| {
            let e = start(&f, false, cfg.clone())?;
            if dir == "kv-reloaded" {
                e.unregister_adapter("kv")?.blocking_recv()??;
                register(&e, "kv", &f.adapters.join(dir))?;
            }
            run(&e, request(prompt.clone(), name, 1, 6))
        })
        .collect::<Result<_>>()?;
    for (i, a) in alone.iter().enumerate() {
        for (j, b) in alone.iter().enumerate().skip(i + 1) {
            ensure!(
                far_apart(a, b),
                "cases {i} and {j} answer alike: the test proves nothing"
            );
        }
    }
    let engine = start(&f, true, cfg)?;
    let mut kv_dir = "kv";
    for order in permutations(4) {
        // The base, A, B, reloaded A in this order; then one of the MLP adapters; then a repeat.
        let mut seq: Vec<usize> = order.clone();
        seq.push(4 + order[0] % 2);
        seq.push(order[3]);
        for &c in &seq {
            let (name, dir) = cases[c];
            if name == Some("kv") && dir != kv_dir {
                engine.unregister_adapter("kv")?.blocking_recv()??;
                register(&engine, "kv", &f.adapters.join(dir))?;
                kv_dir = dir;
            }
            let got = run(&engine, request(prompt.clone(), name, 1, 6))?;
            ensure!(same(&got, &alone[c]), "order {order:?}, case {c}: {got:?}");
        }
    }
    let s = stats(&engine)?;
    ensure!(s.prefix_cache_hits > 0, "repeats must hit: {s:?}");
    Ok(())
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, n - 1);
            out.push(q);
        }
    }
    out
}

/// Starts an engine whose budget fills with idle cached blocks, then uploads adapter `kv`,
/// which needs memory only those blocks hold (so no request waits forever); returns the stats
/// once the cache was full and once `kv` is uploaded and idle, with almost nothing free.
fn full_cache_then_upload(f: &Fixture, cached_first: bool) -> Result<(Engine, EngineStats, EngineStats)> {
    let budget = 100 << 10;
    let engine = start(
        f,
        true,
        EngineConfig {
            memory_budget: budget,
            evict_cached_blocks_first: cached_first,
            ..Default::default()
        },
    )?;
    // Distinct 40-token base prompts until the cache holds nearly the whole budget.
    let mut i = 0u32;
    while stats(&engine)?.prefix_cache_bytes + (8 << 10) < budget {
        let prompt: Vec<u32> = (0..40).map(|t| (t * 13 + i * 31) % 250 + 3).collect();
        run(&engine, request(prompt, None, 1, 1))?;
        i += 1;
        ensure!(i < 100, "the cache does not fill: {:?}", stats(&engine)?);
    }
    let full = stats(&engine)?;
    ensure!(
        full.adapter_bytes == 0 && full.kv_bytes == full.prefix_cache_idle_bytes,
        "{full:?}"
    );
    let c = run(&engine, request(vec![7; 5], Some("kv"), 1, 2))?;
    ensure!(c[0].0.len() == 2, "{c:?}");
    let uploaded = stats(&engine)?;
    ensure!(
        uploaded.adapters.uploads == 1 && uploaded.adapter_bytes > 0,
        "{uploaded:?}"
    );
    ensure!(
        uploaded.prefix_cache_bytes < full.prefix_cache_bytes,
        "cached blocks made room"
    );
    ensure!(uploaded.memory_budget - uploaded.kv_bytes - uploaded.adapter_bytes < 4 << 10);
    Ok((engine, full, uploaded))
}

/// With the budget full of idle cached blocks, an adapter upload makes room by evicting them;
/// once that adapter is idle, a request that needs memory evicts it before any cached block
/// (the documented ranking).
#[test]
fn idle_cached_blocks_yield_to_uploads_and_idle_adapters_go_first() -> Result<()> {
    let f = fixture()?;
    let (engine, _, uploaded) = full_cache_then_upload(&f, false)?;
    // A small base request needs a block or two, fewer bytes than the idle adapter holds: the
    // adapter goes, the cached blocks stay.
    run(&engine, request(vec![9; 5], None, 1, 2))?;
    let after = stats(&engine)?;
    ensure!(after.adapters.device_evictions == 1, "{after:?}");
    ensure!(
        after.prefix_cache_bytes >= uploaded.prefix_cache_bytes,
        "a cached block went before the idle adapter: {uploaded:?} then {after:?}"
    );
    Ok(())
}

/// `evict_cached_blocks_first` reverses the ranking: the same request (more blocks than are
/// free) makes room from cached blocks and the idle adapter stays.
#[test]
fn the_other_ranking_evicts_cached_blocks_before_idle_adapters() -> Result<()> {
    let f = fixture()?;
    let (engine, _, uploaded) = full_cache_then_upload(&f, true)?;
    run(&engine, request(vec![9; 5], None, 1, 2))?;
    let after = stats(&engine)?;
    ensure!(
        after.adapters.device_evictions == 0 && after.adapter_bytes == uploaded.adapter_bytes,
        "the idle adapter went: {after:?}"
    );
    ensure!(after.kv_bytes + after.adapter_bytes <= after.memory_budget, "{after:?}");
    Ok(())
}

//! Quiver's side of the side-by-side benchmark against llama.cpp and transformers + PEFT
//! (`benches/peers/run.sh` drives it; see `benches/peers/README.md`).
//!
//!     cargo bench -p quiver-benches --bench peers -- prepare WORK
//!     cargo bench -p quiver-benches --bench peers -- run WORK OUT.json
//!     cargo bench -p quiver-benches --bench peers -- single WORK OUT.json   (workload 1 only)
//!
//! `prepare` writes the rank-16 all-linear PEFT adapters under `WORK/adapters/` (the base model is
//! a test-kit model: `QUIVER_PEERS_SHAPE=qwen2.5-0.5b`, the default, shared with the other
//! benchmarks, or `llama-3.2-1b`; see `bench_shape_dir`) and
//! `WORK/workload.json`, the one definition of the work every system runs: token ids (no
//! tokenizer is involved), lengths, adapters per request. `run` measures Quiver on it and writes
//! the results and the greedy tokens it produced (for the agreement check) as JSON. Workload 1
//! and batch 8 on 8 adapters also run on the quantized bases (`QUIVER_PEERS_QUANT`, default
//! `int8,int4`); `QUIVER_PEERS_WORKLOADS=1` skips workloads 2 and 3.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use quiver_benches::{bench_shape_dir, zipf_cdf, zipf_pick, Rng};
use quiver_engine::{Engine, EngineConfig, Event, GenerateRequest};
use quiver_model::{ModelBundle, Quantization};
use quiver_tensor::cpu::{CpuBackend, Precision};
use quiver_tensor::DType;
use quiver_testkit::{write_adapter, AdapterSpec, Targets};
use rayon::prelude::*;

#[path = "peers/quant.rs"]
mod quant;
#[path = "peers/workload1.rs"]
mod workload1;

use quant::{quant_batch, workload1_only};
use workload1::{precisions, workload1};

/// Adapters written by `prepare` (workload 2's largest batch uses one each).
const ADAPTERS: usize = 32;
const RANK: usize = 16;
/// Bump when the adapters change (the marker also names the model shape).
const ADAPTER_SET: &str = "32 PEFT adapters, rank 16, alpha 32, all-linear, bf16, seeds 70000+i, v1";
/// The test-kit model shapes `QUIVER_PEERS_SHAPE` may name (the first is the default).
const SHAPES: [&str; 2] = ["qwen2.5-0.5b", "llama-3.2-1b"];
const PREFILL_LEN: usize = 512;
const DECODE_PROMPT: usize = 64;
const DECODE_STEPS: usize = 32;
const AGREE_TOKENS: usize = 8;
/// Workload 2: every request has a `BATCH_PROMPT`-token prompt and asks for `BATCH_NEW` tokens.
const BATCH_PROMPT: usize = 64;
const BATCH_NEW: usize = 32;
/// Workload 3 (S-LoRA's synthetic workload, offline): requests, lengths, adapter counts.
const SLORA_REQUESTS: usize = 32;
const SLORA_PROMPT: (usize, usize) = (16, 128);
const SLORA_OUTPUT: (usize, usize) = (8, 32);
const SLORA_POINTS: [usize; 3] = [1, 8, 32];
const ZIPF_ALPHA: f64 = 1.0;
const SEED: u64 = 0x5EED_0000_0007;
const MAX_MODEL_LEN: usize = 1024;

/// Which adapter request `i` of a batch names (None = the base model).
type AdapterOf<'a> = &'a dyn Fn(usize) -> Option<String>;

fn adapter_name(i: usize) -> String {
    format!("peer-r16-{i:02}")
}

/// `QUIVER_PEERS_SHAPE`: the test-kit model the benchmark runs on.
fn shape() -> Result<&'static str> {
    let Ok(v) = std::env::var("QUIVER_PEERS_SHAPE") else {
        return Ok(SHAPES[0]);
    };
    SHAPES
        .into_iter()
        .find(|s| *s == v.trim())
        .with_context(|| format!("QUIVER_PEERS_SHAPE={v}: expected one of {SHAPES:?}"))
}

fn adapter_spec(i: usize, shape: &str) -> AdapterSpec {
    AdapterSpec {
        name: adapter_name(i),
        base: shape.into(),
        r: RANK,
        lora_alpha: 32.0,
        use_rslora: false,
        target: Targets::AllLinear,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        layers_to_transform: None,
        dtype: quiver_testkit::DType::Bf16,
        seed: 70_000 + i as u64,
    }
}

fn ids(v: &[u32]) -> String {
    let s: Vec<String> = v.iter().map(u32::to_string).collect();
    format!("[{}]", s.join(","))
}

fn floats(v: &[f64]) -> String {
    let s: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
    format!("[{}]", s.join(","))
}

fn prepare(work: &Path) -> Result<()> {
    let shape = shape()?;
    let model = bench_shape_dir(shape)?;
    let root = work.join("adapters");
    let marker = root.join("COMPLETE");
    let set = format!("{ADAPTER_SET}, {shape}");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == set) {
        println!("adapters: reusing {} ({set})", root.display());
    } else {
        (0..ADAPTERS)
            .into_par_iter()
            .try_for_each(|i| write_adapter(&adapter_spec(i, shape), &root.join(adapter_name(i))).map(|_| ()))?;
        std::fs::write(&marker, &set).with_context(|| format!("writing {}", marker.display()))?;
        println!("adapters: wrote {ADAPTERS} to {} ({set})", root.display());
    }
    let mut rng = Rng(SEED);
    let long = rng.prompt(PREFILL_LEN);
    let batch: Vec<Vec<u32>> = (0..ADAPTERS).map(|_| rng.prompt(BATCH_PROMPT)).collect();
    let cdfs: Vec<Vec<f64>> = SLORA_POINTS.iter().map(|&n| zipf_cdf(n, ZIPF_ALPHA)).collect();
    let mut requests = Vec::new();
    for _ in 0..SLORA_REQUESTS {
        let len = rng.range(SLORA_PROMPT);
        let prompt = rng.prompt(len);
        let max_tokens = rng.range(SLORA_OUTPUT);
        let u = rng.unit();
        let at: Vec<String> = cdfs.iter().map(|c| zipf_pick(c, u).to_string()).collect();
        requests.push(format!(
            "{{\"prompt\":{},\"max_tokens\":{max_tokens},\"adapter_at\":[{}]}}",
            ids(&prompt),
            at.join(",")
        ));
    }
    let adapters: Vec<String> = (0..ADAPTERS)
        .map(|i| format!("\"{}\"", root.join(adapter_name(i)).display()))
        .collect();
    let prompts: Vec<String> = batch.iter().map(|p| ids(p)).collect();
    let points: Vec<String> = SLORA_POINTS.iter().map(usize::to_string).collect();
    let mut json = String::new();
    write!(
        json,
        "{{\"model\":\"{}\",\"adapters\":[{}],\"prefill_prompt\":{},\"decode_prompt_len\":{DECODE_PROMPT},\"decode_steps\":{DECODE_STEPS},\"agree_tokens\":{AGREE_TOKENS},\"batch\":{{\"new_tokens\":{BATCH_NEW},\"prompts\":[{}]}},\"slora\":{{\"points\":[{}],\"zipf_alpha\":{ZIPF_ALPHA},\"requests\":[{}]}}}}",
        model.display(),
        adapters.join(","),
        ids(&long),
        prompts.join(","),
        points.join(","),
        requests.join(",")
    )?;
    std::fs::write(work.join("workload.json"), json).context("writing workload.json")?;
    println!("workload: {}", work.join("workload.json").display());
    Ok(())
}

/// The parts of `workload.json` that `run` needs, read back with a minimal parser (it is the
/// file `prepare` wrote: flat integer arrays under known keys).
struct Workload {
    model: PathBuf,
    adapters: Vec<PathBuf>,
    long: Vec<u32>,
    batch: Vec<Vec<u32>>,
    /// (prompt, max_tokens, adapter per point)
    slora: Vec<(Vec<u32>, usize, Vec<usize>)>,
}

fn int_arrays(s: &str) -> Result<Vec<Vec<u32>>> {
    s.split('[')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.split(']')
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|x| !x.trim().is_empty())
                .map(|x| x.trim().parse::<u32>().with_context(|| format!("bad id {x:?}")))
                .collect()
        })
        .collect()
}

fn between<'a>(s: &'a str, from: &str, to: &str) -> Result<&'a str> {
    let a = s.find(from).with_context(|| format!("workload.json: no {from}"))? + from.len();
    let b = s[a..]
        .find(to)
        .with_context(|| format!("workload.json: no {to} after {from}"))?;
    Ok(&s[a..a + b])
}

fn read_workload(work: &Path) -> Result<Workload> {
    let s = std::fs::read_to_string(work.join("workload.json")).context("reading workload.json (run prepare first)")?;
    let adapters = between(&s, "\"adapters\":[", "]")?
        .split(',')
        .map(|x| PathBuf::from(x.trim_matches('"')))
        .collect();
    let mut slora = Vec::new();
    for r in between(&s, "\"requests\":[", "]}}")?.split("{\"prompt\":").skip(1) {
        let prompt = int_arrays(between(r, "", "]")?)?.concat();
        let max_tokens = between(r, "\"max_tokens\":", ",")?.parse()?;
        let at = int_arrays(between(r, "\"adapter_at\":", "}")?)?.concat();
        slora.push((prompt, max_tokens, at.into_iter().map(|x| x as usize).collect()));
    }
    Ok(Workload {
        model: between(&s, "\"model\":\"", "\"")?.into(),
        adapters,
        long: int_arrays(between(&s, "\"prefill_prompt\":", "]")?)?.concat(),
        batch: int_arrays(between(&s, "\"prompts\":[", "]]")?)?,
        slora,
    })
}

struct Done {
    tokens: Vec<Vec<u32>>,
    /// Seconds from the common start to each request's last token.
    latency: Vec<f64>,
    ttft: Vec<f64>,
    /// Tokens generated per second over the whole run (first submit to last finish).
    tok_s: f64,
}

/// Submits every request at once and waits for all of them.
fn run_all(engine: &Engine, requests: &[(Vec<u32>, usize, Option<String>)]) -> Result<Done> {
    let t0 = Instant::now();
    let rxs = requests
        .iter()
        .map(|(prompt, max_tokens, adapter)| {
            let request = GenerateRequest {
                adapter: adapter.clone(),
                max_tokens: Some(*max_tokens),
                ignore_eos: true,
                ..GenerateRequest::new(prompt.clone())
            };
            Ok(engine.submit(engine.validate(request)?)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = rxs
            .into_iter()
            .map(|mut rx| {
                s.spawn(move || -> Result<(Vec<u32>, f64, f64)> {
                    let mut tokens = Vec::new();
                    let mut first = None;
                    loop {
                        match rx.blocking_recv() {
                            Some(Event::Delta(d)) => {
                                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                                tokens.extend(d.tokens.iter().map(|t| t.token));
                            }
                            Some(Event::Finished { .. }) => {
                                let done = t0.elapsed().as_secs_f64();
                                return Ok((tokens, done, first.unwrap_or(done)));
                            }
                            Some(Event::Error(e)) => bail!("request failed: {e}"),
                            None => bail!("the engine dropped a request"),
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("collector panicked"))?)
            .collect::<Result<Vec<_>>>()
    })?;
    let end = results.iter().map(|r| r.1).fold(0.0, f64::max);
    let total: usize = results.iter().map(|r| r.0.len()).sum();
    for ((t, _, _), (_, want, _)) in results.iter().zip(requests) {
        ensure!(t.len() == *want, "a request produced {} of {want} tokens", t.len());
    }
    Ok(Done {
        tok_s: total as f64 / end,
        latency: results.iter().map(|r| r.1).collect(),
        ttft: results.iter().map(|r| r.2).collect(),
        tokens: results.into_iter().map(|r| r.0).collect(),
    })
}

/// Best (highest tok/s) of `n` runs.
fn best_of(engine: &Engine, n: usize, requests: &[(Vec<u32>, usize, Option<String>)]) -> Result<Done> {
    let mut best: Option<Done> = None;
    for _ in 0..n {
        let d = run_all(engine, requests)?;
        if best.as_ref().is_none_or(|b| d.tok_s > b.tok_s) {
            best = Some(d);
        }
    }
    best.context("no run")
}

fn done_json(name: &str, d: &Done, extra: &str) -> String {
    let toks: Vec<String> = d.tokens.iter().map(|t| ids(t)).collect();
    format!(
        "{{\"name\":\"{name}\",{extra}\"tok_s\":{:.4},\"latency\":{},\"ttft\":{},\"tokens\":[{}]}}",
        d.tok_s,
        floats(&d.latency),
        floats(&d.ttft),
        toks.join(",")
    )
}

/// Workload 1 only (run.sh interleaves a second round with llama.cpp's).
fn run_single(work: &Path, out: &Path) -> Result<()> {
    let w = read_workload(work)?;
    let json = format!("{{\"system\":\"quiver\",{}}}", workload1(&w)?);
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))
}

fn run(work: &Path, out: &Path) -> Result<()> {
    let w = read_workload(work)?;
    let threads = rayon::current_num_threads();
    println!("quiver: model {} · {threads} threads", w.model.display());
    let single_json = workload1(&w)?;
    let quant_json = quant_batch(&w)?;
    if workload1_only() {
        let json = format!("{{\"system\":\"quiver\",\"threads\":{threads},{single_json},{quant_json}}}");
        return std::fs::write(out, json).with_context(|| format!("writing {}", out.display()));
    }

    // Workloads 2 and 3 go through the engine, all adapters registered (and resident after a
    // warm-up run) as PEFT holds them all in memory. Workload 2 runs again with bf16 activations.
    let mut batch_json = Vec::new();
    let mut slora_json = Vec::new();
    for (precision, suffix) in precisions() {
        let engine = start_engine(&w, precision, Quantization::default())?;
        let batch = |n: usize, adapter: AdapterOf| -> Vec<(Vec<u32>, usize, Option<String>)> {
            (0..n).map(|i| (w.batch[i].clone(), BATCH_NEW, adapter(i))).collect()
        };
        let distinct = |i: usize| Some(adapter_name(i));
        run_all(&engine, &batch(ADAPTERS, &distinct))?;
        // The same list as BATCHES in peft_bench.py.
        let configs: [(&str, usize, AdapterOf); 5] = [
            ("base", 1, &|_| None),
            ("base", 8, &|_| None),
            ("one adapter", 8, &|_| Some(adapter_name(0))),
            ("different adapters", 8, &distinct),
            ("different adapters", 32, &distinct),
        ];
        for (name, n, f) in configs {
            let d = best_of(&engine, 3, &batch(n, f))?;
            println!("quiver{suffix} batch {n}, {name}: {:.1} tok/s", d.tok_s);
            let extra = format!("\"batch\":{n},\"precision\":\"{precision}\",");
            batch_json.push(done_json(name, &d, &extra));
        }
        if precision != Precision::F32 {
            continue;
        }
        for (k, &n) in SLORA_POINTS.iter().enumerate() {
            let reqs: Vec<_> = w
                .slora
                .iter()
                .map(|(p, m, at)| (p.clone(), *m, Some(adapter_name(at[k]))))
                .collect();
            let d = best_of(&engine, 3, &reqs)?;
            println!("quiver S-LoRA workload, {n} adapters: {:.1} tok/s", d.tok_s);
            slora_json.push(done_json("slora", &d, &format!("\"adapters\":{n},")));
        }
    }
    let json = format!(
        "{{\"system\":\"quiver\",\"threads\":{threads},{single_json},{quant_json},\"batch\":[{}],\"slora\":[{}]}}",
        batch_json.join(","),
        slora_json.join(",")
    );
    std::fs::write(out, json).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// An engine over the benchmark model (base weights stored as `quant` says) with every adapter
/// registered.
fn start_engine(w: &Workload, precision: Precision, quant: Quantization) -> Result<Engine> {
    let bundle = ModelBundle::load_with(
        CpuBackend::with_precision(precision),
        &w.model,
        Some(MAX_MODEL_LEN),
        quant,
    )?;
    let engine = Engine::start(
        bundle.model,
        Some(Arc::new(bundle.tokenizer)),
        bundle.eos_token_ids,
        EngineConfig {
            max_num_seqs: 32,
            max_batch_tokens: 512,
            memory_budget: 1536 << 20,
            host_adapter_budget: 2048 << 20,
            max_lora_rank: RANK,
            max_model_len: MAX_MODEL_LEN,
            adapter_dtype: DType::BF16,
            ..EngineConfig::default()
        },
    )?;
    for (i, dir) in w.adapters.iter().enumerate() {
        engine
            .register_adapter(&adapter_name(i), dir.clone(), false)?
            .blocking_recv()??;
    }
    Ok(engine)
}

fn main() -> Result<()> {
    // `cargo bench` appends `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["prepare", work] => prepare(Path::new(work)),
        ["run", work, out] => run(Path::new(work), Path::new(out)),
        ["single", work, out] => run_single(Path::new(work), Path::new(out)),
        _ => bail!("usage: peers prepare WORK | peers run WORK OUT.json | peers single WORK OUT.json (driven by benches/peers/run.sh)"),
    }
}

//! The Gateway API Inference Extension's model server protocol (its proposal 003), as the endpoint
//! picker (EPP) reads it from `/metrics`: every metric it scrapes exists with the type and label
//! set it parses, the gauges move as requests queue and run (the adapters among them named in
//! `vllm:lora_requests_info`), and all of it returns to zero when the work is done.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use common::{http, server_with};
use serde_json::json;

/// One sample of the text exposition format: its labels and value.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

/// `# TYPE` lines and samples by metric name.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, Vec<Sample>>,
}

/// Parses Prometheus' text format, label values with their escapes (`\\`, `\"`, `\n`): label
/// values here hold commas (adapter lists), so a naive split would not do.
fn parse(text: &str) -> Result<Exposition> {
    let mut e = Exposition::default();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').context("TYPE line")?;
            e.types.insert(name.into(), ty.into());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).context("sample name")?;
        let name = &line[..name_end];
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut key = String::new();
            let end = loop {
                let (i, c) = chars.next().context("unterminated labels")?;
                match c {
                    '}' => break i,
                    ',' => {}
                    '=' => {
                        ensure!(
                            chars.next().map(|x| x.1) == Some('"'),
                            "label value must be quoted: {line}"
                        );
                        let mut value = String::new();
                        loop {
                            match chars.next().context("unterminated label value")?.1 {
                                '"' => break,
                                '\\' => match chars.next().context("escape")?.1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                c => value.push(c),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), value);
                    }
                    c => key.push(c),
                }
            };
            rest = &body[end + 1..];
        }
        let value: f64 = rest.trim().parse().with_context(|| format!("sample value: {line}"))?;
        e.samples.entry(name.into()).or_default().push(Sample { labels, value });
    }
    Ok(e)
}

impl Exposition {
    /// The one sample of a gauge whose label names are exactly `labels`.
    fn gauge(&self, name: &str, labels: &[&str]) -> Result<&Sample> {
        ensure!(
            self.types.get(name).map(String::as_str) == Some("gauge"),
            "{name}: TYPE {:?}, the EPP expects a gauge",
            self.types.get(name)
        );
        let samples = self.samples.get(name).with_context(|| format!("{name}: no sample"))?;
        ensure!(samples.len() == 1, "{name}: {} samples, expected one", samples.len());
        let got: BTreeSet<&str> = samples[0].labels.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = labels.iter().copied().collect();
        ensure!(got == want, "{name}: labels {got:?}, expected {want:?}");
        Ok(&samples[0])
    }
}

/// What the EPP takes from one scrape (its vLLM defaults).
#[derive(Debug)]
struct Scrape {
    waiting: f64,
    running: f64,
    kv_usage: f64,
    max_lora: usize,
    running_adapters: BTreeSet<String>,
    waiting_adapters: BTreeSet<String>,
}

fn adapter_list(s: &str) -> BTreeSet<String> {
    s.split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect()
}

async fn scrape(addr: std::net::SocketAddr) -> Result<Scrape> {
    let (status, text) = http(addr, "GET", "/metrics", None, None).await?;
    ensure!(status == 200, "/metrics {status}");
    let e = parse(&text)?;
    let waiting = e.gauge("vllm:num_requests_waiting", &["model_name"])?.value;
    let running = e.gauge("vllm:num_requests_running", &["model_name"])?.value;
    let kv_usage = e.gauge("vllm:kv_cache_usage_perc", &["model_name"])?.value;
    ensure!((0.0..=1.0).contains(&kv_usage), "KV usage is a fraction: {kv_usage}");
    let lora = e.gauge(
        "vllm:lora_requests_info",
        &["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
    )?;
    // The value is the time of the update: the EPP keeps the series with the latest one.
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    ensure!(
        (now - lora.value).abs() < 60.0,
        "lora_requests_info value {} is not now ({now})",
        lora.value
    );
    let max_lora: usize = lora.labels["max_lora"].parse().context("max_lora is a count")?;
    ensure!(max_lora >= 1, "max_lora 0: no replica could take an adapter");
    Ok(Scrape {
        waiting,
        running,
        kv_usage,
        max_lora,
        running_adapters: adapter_list(&lora.labels["running_lora_adapters"]),
        waiting_adapters: adapter_list(&lora.labels["waiting_lora_adapters"]),
    })
}

fn idle(s: &Scrape) -> bool {
    s.waiting == 0.0
        && s.running == 0.0
        && s.kv_usage == 0.0
        && s.running_adapters.is_empty()
        && s.waiting_adapters.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_the_epp_reads_move_with_load_and_return_to_zero() -> Result<()> {
    // Two sequences at a time: of 16 choices on two adapters, most must wait.
    let srv = server_with(None, 1024, |o| o.engine.max_num_seqs = 2).await?;
    let addr = srv.addr;
    let first = scrape(addr).await?;
    ensure!(idle(&first), "not idle before any request: {first:?}");
    ensure!(first.max_lora == 2, "max_lora {} with --max-num-seqs 2", first.max_lora);

    let adapters = ["qwen2-r4-qkv", "qwen2-r8-all-linear-rslora"];
    let mut jobs = Vec::new();
    for adapter in adapters {
        let body = json!({"model": adapter, "prompt": vec![[5, 6, 7]; 8], "max_tokens": 96, "ignore_eos": true});
        jobs.push(tokio::spawn(async move {
            http(addr, "POST", "/v1/completions", Some(&body.to_string()), None).await
        }));
    }
    let (mut max_waiting, mut max_running, mut max_kv) = (0.0f64, 0.0f64, 0.0f64);
    let (mut ran, mut waited) = (BTreeSet::new(), BTreeSet::new());
    for _ in 0..4000 {
        let s = scrape(addr).await?;
        ensure!(s.running <= 2.0, "{} running with --max-num-seqs 2", s.running);
        ensure!(
            s.running_adapters.len() <= s.max_lora,
            "{s:?}: more adapters running than max_lora"
        );
        (max_waiting, max_running, max_kv) = (
            max_waiting.max(s.waiting),
            max_running.max(s.running),
            max_kv.max(s.kv_usage),
        );
        ran.extend(s.running_adapters);
        waited.extend(s.waiting_adapters);
        if jobs.iter().all(|j| j.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for job in jobs {
        let (status, text) = job.await??;
        ensure!(status == 200, "{status} {text}");
    }
    ensure!(
        max_waiting >= 1.0,
        "no request was ever seen waiting (max {max_waiting})"
    );
    ensure!(max_running >= 1.0, "no request was ever seen running");
    ensure!(max_kv > 0.0, "KV usage never moved");
    let all: BTreeSet<String> = adapters.iter().map(|a| a.to_string()).collect();
    ensure!(ran == all, "running_lora_adapters named {ran:?}, expected {all:?}");
    ensure!(
        !waited.is_empty() && waited.is_subset(&all),
        "waiting_lora_adapters named {waited:?}"
    );

    // Finished: every gauge back to zero, and the adapter lists empty.
    let mut last = None;
    for _ in 0..200 {
        let s = scrape(addr).await?;
        if idle(&s) {
            return Ok(());
        }
        last = Some(s);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the metrics did not return to zero: {last:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_lora_is_what_the_memory_budget_holds() -> Result<()> {
    // The tiny model's largest accepted adapter (rank 64 on every projection) is a few hundred
    // KiB: 8 MiB hold far fewer of them than --max-num-seqs 1000 could run.
    let srv = server_with(None, 64, |o| {
        o.engine.max_num_seqs = 1000;
        o.engine.memory_budget = 8 << 20;
    })
    .await?;
    let s = scrape(srv.addr).await?;
    ensure!(s.max_lora > 1 && s.max_lora < 1000, "max_lora {}", s.max_lora);
    // Smaller adapters fit more: max_lora is a floor, and the three registered adapters fit.
    ensure!(s.max_lora >= 3, "max_lora {}", s.max_lora);
    Ok(())
}

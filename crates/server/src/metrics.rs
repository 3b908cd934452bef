//! Prometheus metrics: Quiver's own (per adapter, per tier, latency histograms) and the ones
//! Kubernetes routers read from vLLM (`vllm:lora_requests_info`, `vllm:num_requests_waiting`,
//! `vllm:kv_cache_usage_perc`), so the Gateway API Inference Extension routes to Quiver as it does
//! to vLLM. Rendered by hand in the text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quiver_engine::adapters::{AdapterInfo, Tier};
use quiver_engine::EngineStats;

const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, v: f64) {
        for (c, b) in self.counts.iter_mut().zip(BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (c, b) in self.counts.iter().zip(BUCKETS) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            self.count, self.sum, self.count
        );
    }
}

#[derive(Default, Clone, Copy)]
struct PerAdapter {
    requests: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
}

#[derive(Default)]
struct Inner {
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    per_adapter: BTreeMap<String, PerAdapter>,
    rejected: BTreeMap<u16, u64>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut Inner)) {
        if let Ok(mut g) = self.inner.lock() {
            f(&mut g)
        }
    }

    pub fn observe_ttft(&self, d: Duration) {
        self.with(|m| m.ttft.observe(d.as_secs_f64()));
    }

    pub fn observe_queue(&self, d: Duration) {
        self.with(|m| m.queue.observe(d.as_secs_f64()));
    }

    pub fn observe_tpot(&self, d: Duration) {
        self.with(|m| m.tpot.observe(d.as_secs_f64()));
    }

    pub fn finished(&self, adapter: Option<&str>, prompt: usize, generated: usize, e2e: Duration) {
        self.with(|m| {
            m.e2e.observe(e2e.as_secs_f64());
            let a = m.per_adapter.entry(adapter.unwrap_or("").to_string()).or_default();
            a.requests += 1;
            a.prompt_tokens += prompt as u64;
            a.generation_tokens += generated as u64;
        });
    }

    pub fn rejected(&self, status: u16) {
        self.with(|m| *m.rejected.entry(status).or_default() += 1);
    }

    pub fn render(&self, stats: &EngineStats, adapters: &[AdapterInfo], max_lora: usize, model: &str) -> String {
        let mut out = String::new();
        let Ok(m) = self.inner.lock() else { return out };
        let kv_usage = if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{}\"}} {v}",
                label(model)
            );
        };
        gauge(
            &mut out,
            "vllm:num_requests_running",
            "Requests running on the engine.",
            stats.running as f64,
        );
        gauge(
            &mut out,
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            stats.waiting as f64,
        );
        gauge(
            &mut out,
            "vllm:kv_cache_usage_perc",
            "Fraction of KV-cache blocks in use.",
            kv_usage,
        );
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let _ = writeln!(
            out,
            "# HELP vllm:lora_requests_info Running and waiting LoRA adapters.\n# TYPE vllm:lora_requests_info gauge\n\
             vllm:lora_requests_info{{max_lora=\"{max_lora}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"}} {now}",
            label(&stats.running_adapters.join(",")),
            label(&stats.waiting_adapters.join(","))
        );
        gauge(
            &mut out,
            "quiver_memory_budget_bytes",
            "Device memory shared by KV blocks and adapter pages.",
            stats.memory_budget as f64,
        );
        gauge(
            &mut out,
            "quiver_kv_cache_bytes",
            "Bytes of the budget held by KV blocks.",
            stats.kv_bytes as f64,
        );
        gauge(
            &mut out,
            "quiver_adapter_device_bytes",
            "Bytes of the budget held by adapter pages.",
            stats.adapter_bytes as f64,
        );
        let a = &stats.adapters;
        let counters = [
            (
                "quiver_preemptions_total",
                "Sequences preempted for KV memory and recomputed.",
                stats.preemptions,
            ),
            ("quiver_engine_steps_total", "Engine iterations.", stats.steps),
            (
                "quiver_requests_cancelled_total",
                "Requests whose client went away.",
                stats.cancelled,
            ),
            (
                "quiver_adapter_loads_total",
                "Adapters loaded from disk into host memory.",
                a.loads,
            ),
            (
                "quiver_adapter_load_failures_total",
                "Adapter loads that failed validation.",
                a.load_failures,
            ),
            (
                "quiver_adapter_uploads_total",
                "Adapters copied from host into device pages.",
                a.uploads,
            ),
            (
                "quiver_adapter_device_hits_total",
                "Adapter acquisitions served from device memory.",
                a.device_hits,
            ),
            (
                "quiver_adapter_host_hits_total",
                "Adapter acquisitions served from the host cache.",
                a.host_hits,
            ),
            (
                "quiver_adapter_device_evictions_total",
                "Adapters evicted from device memory.",
                a.device_evictions,
            ),
            (
                "quiver_adapter_host_evictions_total",
                "Adapters evicted from the host cache.",
                a.host_evictions,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(out, "# HELP quiver_adapter_residency Where each adapter lives (1 for its tier).\n# TYPE quiver_adapter_residency gauge");
        for info in adapters {
            let tier = match info.tier {
                Tier::Disk => "disk",
                Tier::Loading => "loading",
                Tier::Host => "host",
                Tier::Device => "device",
            };
            let _ = writeln!(
                out,
                "quiver_adapter_residency{{adapter=\"{}\",tier=\"{tier}\"}} 1",
                label(&info.name)
            );
        }
        for (name, help, f) in [
            (
                "quiver_requests_total",
                "Finished requests per adapter (\"\" = base model).",
                (|p: &PerAdapter| p.requests) as fn(&PerAdapter) -> u64,
            ),
            ("quiver_prompt_tokens_total", "Prompt tokens per adapter.", |p| {
                p.prompt_tokens
            }),
            ("quiver_generation_tokens_total", "Generated tokens per adapter.", |p| {
                p.generation_tokens
            }),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (adapter, p) in &m.per_adapter {
                let _ = writeln!(out, "{name}{{adapter=\"{}\"}} {}", label(adapter), f(p));
            }
        }
        let _ = writeln!(out, "# HELP quiver_requests_rejected_total Requests refused, by HTTP status.\n# TYPE quiver_requests_rejected_total counter");
        for (status, n) in &m.rejected {
            let _ = writeln!(out, "quiver_requests_rejected_total{{status=\"{status}\"}} {n}");
        }
        m.ttft
            .render("quiver_time_to_first_token_seconds", "Time to first token.", &mut out);
        m.tpot.render(
            "quiver_time_per_output_token_seconds",
            "Time between output tokens.",
            &mut out,
        );
        m.e2e.render(
            "quiver_e2e_request_latency_seconds",
            "End-to-end request latency.",
            &mut out,
        );
        m.queue.render(
            "quiver_request_queue_time_seconds",
            "Time from submission until a request first runs.",
            &mut out,
        );
        out
    }
}

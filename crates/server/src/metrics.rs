//! Prometheus metrics, rendered by hand in the text exposition format. vLLM's names wherever vLLM
//! has the metric — the router-facing gauges the Gateway API Inference Extension reads
//! (`vllm:lora_requests_info`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`) and the
//! request metrics its dashboards chart (`vllm:request_success_total{finished_reason}`, token
//! counters, TTFT / inter-token / e2e / queue histograms) — and `quiver_*` for what only Quiver
//! has (adapter tiers and residency, per-adapter counts, preemptions, memory split).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use quiver_engine::adapters::AdapterInfo;
use quiver_engine::metrics::{AdapterCounts, Histogram, LATENCY_BUCKETS};
use quiver_engine::{EngineConfig, EngineStats};
use quiver_model::{ModelConfig, ModuleKind};

use crate::admin::tier_name;

/// vLLM's `max_lora` label of `vllm:lora_requests_info`: how many adapters can be in device memory
/// for one batch at once. The Gateway API Inference Extension's LoRA affinity counts a replica's
/// running + waiting adapters against it to decide whether that replica can take one more.
///
/// Quiver has no fixed adapter slots (vLLM's `--max-loras`): adapter pages and KV blocks share one
/// memory budget. So this is the number of the largest adapters the server accepts (rank
/// `--max-lora-rank` on all seven projections of every layer) that fit in the budget beside one
/// full-length sequence's KV cache (what pinning also keeps free), and never more than
/// `--max-num-seqs` (one adapter per running sequence); at least 1. Smaller adapters fit more.
pub fn max_loras(model: &ModelConfig, engine: &EngineConfig, kv_block_bytes: usize) -> usize {
    let per_layer: usize = ModuleKind::ALL
        .iter()
        .map(|k| {
            let (i, o) = k.dims(model);
            i + o
        })
        .sum();
    let adapter = model.num_layers * engine.max_lora_rank * per_layer * engine.adapter_dtype.size();
    let kv_floor = engine.max_model_len.div_ceil(engine.block_size.max(1)) * kv_block_bytes;
    let fit = engine.memory_budget.saturating_sub(kv_floor) / adapter.max(1);
    fit.min(engine.max_num_seqs).max(1)
}

fn render_histogram(h: &Histogram, name: &str, help: &str, model: &str, out: &mut String) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (c, b) in h.counts.iter().zip(LATENCY_BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{model_name=\"{model}\",le=\"{b}\"}} {c}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{model_name=\"{model}\",le=\"+Inf\"}} {}\n{name}_sum{{model_name=\"{model}\"}} {}\n{name}_count{{model_name=\"{model}\"}} {}",
        h.count, h.sum, h.count
    );
}

/// What only the HTTP side sees: requests refused before they reached the engine.
#[derive(Default)]
pub struct Metrics {
    rejected: Mutex<BTreeMap<u16, u64>>,
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    pub fn rejected(&self, status: u16) {
        if let Ok(mut r) = self.rejected.lock() {
            *r.entry(status).or_default() += 1;
        }
    }

    pub fn render(&self, stats: &EngineStats, adapters: &[AdapterInfo], max_lora: usize, model: &str) -> String {
        let mut out = String::new();
        let m = &stats.requests;
        let model = label(model);
        let kv_usage = if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{model}\"}} {v}"
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
        gauge(
            &mut out,
            "quiver_memory_resident_bytes",
            "Bytes of KV blocks and adapter pages whose memory may be resident (touched and not given back).",
            stats.resident_bytes as f64,
        );
        gauge(
            &mut out,
            "quiver_prefix_cache_bytes",
            "Bytes of KV blocks in the prefix cache (part of quiver_kv_cache_bytes).",
            stats.prefix_cache_bytes as f64,
        );
        gauge(
            &mut out,
            "quiver_prefix_cache_idle_bytes",
            "Bytes of cached KV blocks no request holds, evicted when memory is needed.",
            stats.prefix_cache_idle_bytes as f64,
        );
        // vLLM v1's prefix-cache counters, in tokens.
        for (name, help, v) in [
            (
                "vllm:prefix_cache_queries_total",
                "Prefix cache queries, in terms of number of queried tokens.",
                stats.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits_total",
                "Prefix cache hits, in terms of number of cached tokens.",
                stats.prefix_cache_hits,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{model}\"}} {v}"
            );
        }
        let a = &stats.adapters;
        let counters = [
            (
                "quiver_preemptions_total",
                "Sequences preempted for KV memory and recomputed.",
                stats.preemptions,
            ),
            ("quiver_engine_steps_total", "Engine iterations.", stats.steps),
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
            let tier = tier_name(info.tier);
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
                (|p: &AdapterCounts| p.requests) as fn(&AdapterCounts) -> u64,
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
        if let Ok(rejected) = self.rejected.lock() {
            for (status, n) in rejected.iter() {
                let _ = writeln!(out, "quiver_requests_rejected_total{{status=\"{status}\"}} {n}");
            }
        }
        // vLLM's request metrics, under its names and labels.
        let _ = writeln!(out, "# HELP vllm:request_success_total Count of successfully processed requests.\n# TYPE vllm:request_success_total counter");
        for reason in ["stop", "length", "abort"] {
            let n = m.finished.get(reason).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "vllm:request_success_total{{model_name=\"{model}\",finished_reason=\"{reason}\"}} {n}"
            );
        }
        for (name, help, v) in [
            (
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                m.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                m.generation_tokens,
            ),
            (
                "quiver_request_errors_total",
                "Choices that ended with an engine error.",
                m.finished.get("error").copied().unwrap_or(0),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{model}\"}} {v}"
            );
        }
        for (h, name, help) in [
            (
                &m.time_to_first_token,
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
            ),
            (
                &m.inter_token_latency,
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
            ),
            (
                &m.e2e_latency,
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
            ),
            (
                &m.queue_time,
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
            ),
        ] {
            render_histogram(h, name, help, &model, &mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-3-8B-shaped model: the numbers a GPU deployment sees.
    fn llama8b() -> ModelConfig {
        let json = serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": false
        });
        ModelConfig::from_json(&json).expect("a llama config")
    }

    #[test]
    fn max_lora_counts_largest_adapters_beside_one_sequence() {
        let model = llama8b();
        let mut engine = EngineConfig {
            max_lora_rank: 16,
            adapter_dtype: quiver_tensor::DType::BF16,
            max_model_len: 8192,
            block_size: 16,
            max_num_seqs: 256,
            memory_budget: 20 << 30,
            ..EngineConfig::default()
        };
        // Rank 16 on q, k, v, o, gate, up, down: 16 × (8192 + 2 × 5120 + 8192 + 3 × 18432) × 32
        // layers × 2 B = 83,886,080 B (80 MiB). KV of 8,192 tokens in 128 KiB blocks: 64 MiB.
        let block = 128 << 10;
        let adapter = 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336)) * 32 * 2;
        let want = ((20usize << 30) - (8192 / 16) * block) / adapter;
        assert_eq!(max_loras(&model, &engine, block), want);
        assert!(want > 1 && want < 256, "{want}");
        // Capped by the sequences that can run at once, and never 0.
        engine.max_num_seqs = 4;
        assert_eq!(max_loras(&model, &engine, block), 4);
        engine.memory_budget = 1 << 20;
        assert_eq!(max_loras(&model, &engine, block), 1);
    }
}

//! Request-level metrics, recorded where requests end (the engine's output stage) and rendered
//! by the server under vLLM's names.

use std::collections::BTreeMap;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// A cumulative Prometheus histogram over [`LATENCY_BUCKETS`].
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Histogram {
    /// Observations `<=` each bucket's bound.
    pub counts: [u64; LATENCY_BUCKETS.len()],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        for (c, b) in self.counts.iter_mut().zip(LATENCY_BUCKETS) {
            if v <= b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Token counts of one adapter (`""` = the base model).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AdapterCounts {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

/// Every choice counts once in `finished` with its reason: `stop`, `length`, `abort` (its
/// client went away) or `error`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RequestMetrics {
    pub finished: BTreeMap<&'static str, u64>,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub per_adapter: BTreeMap<String, AdapterCounts>,
}

impl RequestMetrics {
    /// A choice ended: `reason` as above, its adapter, its token counts and its lifetime.
    pub fn ended(
        &mut self,
        reason: &'static str,
        adapter: Option<&str>,
        prompt: usize,
        generated: usize,
        e2e: Duration,
    ) {
        *self.finished.entry(reason).or_default() += 1;
        self.prompt_tokens += prompt as u64;
        self.generation_tokens += generated as u64;
        self.e2e_latency.observe(e2e);
        let a = self.per_adapter.entry(adapter.unwrap_or("").to_string()).or_default();
        a.requests += 1;
        a.prompt_tokens += prompt as u64;
        a.generation_tokens += generated as u64;
    }
}

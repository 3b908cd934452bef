//! The request stream: Poisson arrivals with uniform prompt and output lengths, and the Zipf
//! popularity that maps each request to an adapter.

use quiver_benches::Rng;

use crate::{OUTPUT_LEN, PROMPT_LEN};

/// One request of the stream, independent of the number of adapters.
pub struct Arrival {
    /// Seconds after the start.
    pub at: f64,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    /// Uniform draw turned into an adapter by the Zipf CDF of each sweep point.
    pub popularity: f64,
}

pub fn workload(n: usize, rate: f64, seed: u64) -> Vec<Arrival> {
    let mut rng = Rng(seed);
    let mut at = 0.0;
    (0..n)
        .map(|i| {
            if i > 0 {
                at += -(1.0 - rng.unit()).ln() / rate;
            }
            let len = rng.range(PROMPT_LEN);
            let prompt = (0..len).map(|_| 3 + (rng.next_u64() % 20_000) as u32).collect();
            let max_tokens = rng.range(OUTPUT_LEN);
            Arrival {
                at,
                prompt,
                max_tokens,
                popularity: rng.unit(),
            }
        })
        .collect()
}

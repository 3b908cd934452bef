//! Zipf popularity over adapters, as in S-LoRA's synthetic workload: rank k (0-based) is
//! adapter k, drawn with probability ∝ (k + 1)^-α.

/// Cumulative Zipf(`alpha`) probabilities over `n` ranks.
pub fn zipf_cdf(n: usize, alpha: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|k| (k as f64).powf(-alpha)).collect();
    let total: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / total;
            acc
        })
        .collect()
}

/// The rank a uniform draw `u` in [0, 1) falls on.
pub fn zipf_pick(cdf: &[f64], u: f64) -> usize {
    cdf.partition_point(|&c| c <= u).min(cdf.len().saturating_sub(1))
}

//! One logits row in, one token out, in vLLM's order: penalties → temperature → top-k → top-p →
//! min-p → sample. Logprobs come from the raw model distribution (vLLM's default "raw_logprobs").
//!
//! Non-finite logits: NaN counts as `-inf` (never sampled) and `+inf` as `f32::MAX` (so softmax
//! stays defined). A row with no finite logit is an error, [`SamplingError::NoFiniteLogits`],
//! rather than a made-up token.

use std::cmp::Ordering;

use numeric::{exp_into, max_of, sum_f64, Xoshiro256StarStar};

mod numeric;

/// Most alternatives `logprobs` may ask for (OpenAI's `top_logprobs` and vLLM's default cap).
pub const MAX_LOGPROBS: usize = 20;
/// Temperatures below this sample greedily (vLLM's `_SAMPLING_EPS`); dividing by them would overflow.
pub const GREEDY_TEMPERATURE: f32 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off; larger than the vocabulary is the same as off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off; keeps tokens whose probability is at least `min_p` times the top token's.
    pub min_p: f32,
    /// `None` uses the engine's per-request seed.
    pub seed: Option<u64>,
    /// 1 = off; HF/vLLM semantics over prompt ∪ generated tokens.
    pub repetition_penalty: f32,
    /// OpenAI semantics over generated tokens only.
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Return the top-N raw logprobs as well as the chosen token's (N ≤ [`MAX_LOGPROBS`]).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
    #[error("min_p must be in [0, 1], got {0}")]
    MinP(f32),
    #[error("repetition_penalty must be a finite number > 0, got {0}")]
    RepetitionPenalty(f32),
    #[error("presence_penalty must be in [-2, 2], got {0}")]
    PresencePenalty(f32),
    #[error("frequency_penalty must be in [-2, 2], got {0}")]
    FrequencyPenalty(f32),
    #[error("logprobs must be at most {MAX_LOGPROBS}, got {0}")]
    Logprobs(usize),
    /// Not a parameter error: the model produced a row that is empty or all NaN / -inf.
    #[error("no finite logit to sample from (row of {0})")]
    NoFiniteLogits(usize),
}

impl SamplingError {
    /// The OpenAI request field at fault (for the error's `param`), `None` for runtime errors.
    pub fn param(&self) -> Option<&'static str> {
        Some(match self {
            SamplingError::Temperature(_) => "temperature",
            SamplingError::TopP(_) => "top_p",
            SamplingError::MinP(_) => "min_p",
            SamplingError::RepetitionPenalty(_) => "repetition_penalty",
            SamplingError::PresencePenalty(_) => "presence_penalty",
            SamplingError::FrequencyPenalty(_) => "frequency_penalty",
            SamplingError::Logprobs(_) => "logprobs",
            SamplingError::NoFiniteLogits(_) => return None,
        })
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), SamplingError> {
        // Written as negated "valid" checks so NaN fails every one of them.
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(SamplingError::MinP(self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(SamplingError::PresencePenalty(self.presence_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(SamplingError::FrequencyPenalty(self.frequency_penalty));
        }
        match self.logprobs {
            Some(n) if n > MAX_LOGPROBS => Err(SamplingError::Logprobs(n)),
            _ => Ok(()),
        }
    }

    /// Temperature (near) zero: argmax of the penalised logits; top-k/p and min-p don't matter.
    pub fn is_greedy(&self) -> bool {
        self.temperature.is_nan() || self.temperature < GREEDY_TEMPERATURE
    }
}

/// One sampled token. Logprobs are natural logs of the raw (unpenalised, temperature 1) softmax.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
    /// The `logprobs` most likely tokens, most likely first, ties by lower id; empty when not asked.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Histogram buckets over the temperature-scaled log-weight `(max - x) / T`: 1/16 nat wide,
/// the last one catching everything below e^-64 (irrelevant to any top-p a f32 can express);
/// index `BUCKETS` holds the -inf logits.
const BUCKETS: usize = 1024;
const BUCKETS_PER_NAT: f32 = 16.0;

/// Per-sequence sampler: its own PRNG (so a seed reproduces regardless of batch neighbours) and
/// scratch buffers reused every step.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256StarStar,
    buf: Buffers,
}

#[derive(Debug, Clone, Default)]
struct Buffers {
    /// Sanitised, then penalised logits.
    scratch: Vec<f32>,
    /// Unnormalised probabilities exp((x - max) / T), then zeroed where filtered out.
    weights: Vec<f32>,
    /// Histogram bucket of each token (only when top-k or top-p is on).
    buckets: Vec<u16>,
    /// Token ids of one histogram bucket.
    idx: Vec<u32>,
    /// Sorted copy of the generated ids, to count them.
    counts: Vec<u32>,
    hist_count: Vec<usize>,
    hist_mass: Vec<f64>,
}

impl Sampler {
    /// `params` should have passed [`SamplingParams::validate`]; out-of-range values are clamped
    /// (a negative temperature samples greedily, a `top_p` outside (0, 1) is treated as off).
    pub fn new(params: SamplingParams, default_seed: u64) -> Sampler {
        let rng = Xoshiro256StarStar::new(params.seed.unwrap_or(default_seed));
        Sampler {
            params,
            rng,
            buf: Buffers::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Samples one token from `logits` (one row, length = vocab). `prompt` and `generated` feed
    /// the penalties; ids outside the vocabulary are ignored. The caller's row is not modified.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> Result<Sampled, SamplingError> {
        let none = SamplingError::NoFiniteLogits(logits.len());
        self.buf.load(logits);
        // Raw distribution first, before the penalties overwrite the scratch row.
        let raw_max = max_of(&self.buf.scratch);
        if raw_max == f32::NEG_INFINITY {
            return Err(none);
        }
        exp_into(&mut self.buf.weights, &self.buf.scratch, raw_max, 1.0);
        let lse = raw_max as f64 + sum_f64(&self.buf.weights).ln();
        self.buf.apply_penalties(&self.params, logits, prompt, generated);
        let token = if self.params.is_greedy() {
            self.buf.argmax()
        } else {
            self.buf.sample_random(&self.params, &mut self.rng)
        }
        .ok_or(none)?;
        let logprob = (finite(logits[token as usize]) as f64 - lse) as f32;
        let top_logprobs = match self.params.logprobs {
            Some(n) if n > 0 => top_raw(logits, n, lse),
            _ => Vec::new(),
        };
        Ok(Sampled {
            token,
            logprob,
            top_logprobs,
        })
    }

    /// The row after NaN/inf sanitising and penalties: what temperature and the filters see.
    pub fn penalised(&mut self, logits: &[f32], prompt: &[u32], generated: &[u32]) -> &[f32] {
        self.buf.load(logits);
        self.buf.apply_penalties(&self.params, logits, prompt, generated);
        &self.buf.scratch
    }
}

impl Buffers {
    fn load(&mut self, logits: &[f32]) {
        self.scratch.clear();
        self.scratch.extend(logits.iter().map(|&x| finite(x)));
    }

    fn apply_penalties(&mut self, p: &SamplingParams, logits: &[f32], prompt: &[u32], generated: &[u32]) {
        let s = &mut self.scratch;
        let vocab = s.len();
        let rp = p.repetition_penalty;
        if rp != 1.0 && rp > 0.0 {
            // Recomputed from the raw value, so a token seen many times is penalised once.
            for &t in prompt.iter().chain(generated).filter(|&&t| (t as usize) < vocab) {
                let x = finite(logits[t as usize]);
                s[t as usize] = finite(if x > 0.0 { x / rp } else { x * rp });
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            self.counts.clear();
            self.counts
                .extend(generated.iter().copied().filter(|&t| (t as usize) < vocab));
            self.counts.sort_unstable();
            for run in self.counts.chunk_by(|a, b| a == b) {
                let t = run[0] as usize;
                s[t] = finite(s[t] - p.presence_penalty - p.frequency_penalty * run.len() as f32);
            }
        }
    }

    /// First index of the largest penalised logit; `None` when all are -inf.
    fn argmax(&self) -> Option<u32> {
        let max = max_of(&self.scratch);
        if max == f32::NEG_INFINITY {
            return None;
        }
        self.scratch.iter().position(|&x| x == max).map(|i| i as u32)
    }

    fn sample_random(&mut self, params: &SamplingParams, rng: &mut Xoshiro256StarStar) -> Option<u32> {
        let max = max_of(&self.scratch);
        if max == f32::NEG_INFINITY {
            return None;
        }
        let inv_t = 1.0 / params.temperature;
        exp_into(&mut self.weights, &self.scratch, max, inv_t);
        let top_k = Some(params.top_k).filter(|&k| k < self.scratch.len()).unwrap_or(0);
        let top_p = params.top_p as f64;
        let nucleus = top_p > 0.0 && top_p < 1.0;
        let min_p = params.min_p.min(1.0); // above 1 nothing, not even the top token, would stay

        // Top-k and top-p both keep a prefix of the canonical order (logit descending, id
        // ascending): everything in buckets before `bound`, and in bucket `bound` what sorts
        // before `cut`. So the draw can walk the vocabulary in id order whatever found them.
        let mut bound = BUCKETS as u16;
        let mut cut = (f32::NEG_INFINITY, 0u32);
        if top_k > 0 || nucleus {
            // Histogram by log-weight so only one bucket ever needs selecting or sorting.
            let scale = inv_t * BUCKETS_PER_NAT;
            let last_bucket = (BUCKETS - 1) as f32;
            // -inf logits go to an extra bucket past the end: never candidates.
            self.buckets.clear();
            self.buckets.extend(self.scratch.iter().map(|&x| {
                if x == f32::NEG_INFINITY {
                    BUCKETS as u16
                } else {
                    (((max - x) * scale).min(last_bucket) as i32) as u16
                }
            }));
            self.hist_count.clear();
            self.hist_count.resize(BUCKETS + 1, 0);
            self.hist_mass.clear();
            self.hist_mass.resize(BUCKETS + 1, 0.0);
            for (&b, &w) in self.buckets.iter().zip(self.weights.iter()) {
                self.hist_count[b as usize] += 1;
                self.hist_mass[b as usize] += w as f64;
            }
            let desc = |a: &u32, b: &u32| desc_by(self.scratch[*a as usize], self.scratch[*b as usize], *a, *b);
            let mut floor = f32::NEG_INFINITY;
            let mut last = BUCKETS - 1;
            if top_k > 0 {
                let (mut seen, mut b) = (0, 0);
                while b < BUCKETS - 1 && seen + self.hist_count[b] < top_k {
                    seen += self.hist_count[b];
                    b += 1;
                }
                // Fewer finite logits than k: nothing to cut.
                if seen + self.hist_count[b] >= top_k {
                    collect_bucket(&mut self.idx, &self.scratch, &self.buckets, b as u16, f32::NEG_INFINITY);
                    let need = top_k - seen;
                    self.idx.select_nth_unstable_by(need - 1, desc);
                    // Ties with the k-th logit are kept (vLLM, HF): a threshold, not a count.
                    floor = self.scratch[self.idx[need - 1] as usize];
                    (bound, cut) = (b as u16, (floor, u32::MAX));
                    // Mass of what survives in the boundary bucket, summed in id order.
                    self.idx.retain(|&i| self.scratch[i as usize] >= floor);
                    self.idx.sort_unstable();
                    self.hist_mass[b] = self.idx.iter().map(|&i| self.weights[i as usize] as f64).sum();
                    last = b;
                }
            }
            if nucleus {
                let total: f64 = self.hist_mass[..=last].iter().sum();
                let target = top_p * total;
                let (mut before, mut b) = (0.0, 0);
                while b < last && before + self.hist_mass[b] < target {
                    before += self.hist_mass[b];
                    b += 1;
                }
                collect_bucket(&mut self.idx, &self.scratch, &self.buckets, b as u16, floor);
                self.idx.sort_unstable_by(desc);
                // vLLM keeps a token while the mass strictly before it is below top_p; the
                // first token of this bucket always stays since `before < target`.
                let mut cum = before;
                let mut at = self.idx.len();
                for (j, &i) in self.idx.iter().enumerate() {
                    if j > 0 && cum >= target {
                        at = j;
                        break;
                    }
                    cum += self.weights[i as usize] as f64;
                }
                if let Some(&i) = self.idx.get(at) {
                    (bound, cut) = (b as u16, (self.scratch[i as usize], i));
                } else if let Some(&i) = self.idx.last() {
                    // The whole bucket stays: cut just after its last token.
                    (bound, cut) = (b as u16, (self.scratch[i as usize], i + 1));
                }
            }
        }

        if (bound as usize) < BUCKETS || min_p > 0.0 {
            let ((cx, ci), no_cut) = (cut, bound as usize == BUCKETS);
            for (i, (&x, w)) in self.scratch.iter().zip(self.weights.iter_mut()).enumerate() {
                let b = if no_cut { 0 } else { self.buckets[i] };
                let kept = b < bound || (b == bound && (x > cx || (x == cx && (i as u32) < ci)));
                if !kept || *w < min_p {
                    *w = 0.0;
                }
            }
        }
        draw(&self.weights, rng.next_f64())
    }
}

/// Ids (ascending) of the logits >= `floor` in bucket `b` (< `BUCKETS`, so finite).
fn collect_bucket(idx: &mut Vec<u32>, scratch: &[f32], buckets: &[u16], b: u16, floor: f32) {
    idx.clear();
    for (i, (&x, &bi)) in scratch.iter().zip(buckets).enumerate() {
        if bi == b && x >= floor {
            idx.push(i as u32);
        }
    }
}

/// Inverse-CDF draw in id order with `u` in [0, 1): whole blocks are skipped by their sums.
fn draw(weights: &[f32], u: f64) -> Option<u32> {
    const BLOCK: usize = 256;
    let target = u * sum_f64(weights);
    let mut acc = 0.0f64;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let sum = sum_f64(block);
        if acc + sum <= target {
            acc += sum;
            continue;
        }
        for (j, &w) in block.iter().enumerate() {
            acc += w as f64;
            if w > 0.0 && target < acc {
                return Some((b * BLOCK + j) as u32);
            }
        }
    }
    // Rounding left the target past the end: the last token with any weight.
    weights.iter().rposition(|&w| w > 0.0).map(|i| i as u32)
}

/// The `n` most likely tokens of the raw distribution, most likely first, ties by lower id:
/// one pass keeping a small sorted list (n ≤ 20).
fn top_raw(logits: &[f32], n: usize, lse: f64) -> Vec<(u32, f32)> {
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &x) in logits.iter().enumerate() {
        let x = finite(x);
        // Later ids lose ties, so only a strictly larger logit displaces a full list's last entry.
        if best.len() == n && best.last().is_some_and(|&(y, _)| x <= y) {
            continue;
        }
        let at = best.partition_point(|&(y, _)| y >= x);
        best.insert(at, (x, i as u32));
        best.truncate(n);
    }
    best.into_iter().map(|(x, i)| (i, (x as f64 - lse) as f32)).collect()
}

/// NaN → -inf (never chosen), +inf → f32::MAX (keeps softmax defined).
fn finite(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else {
        x.min(f32::MAX)
    }
}

/// Descending by value, then ascending by id: a total order, so results don't depend on the
/// selection algorithm. Values are already free of NaN.
fn desc_by(x: f32, y: f32, a: u32, b: u32) -> Ordering {
    y.partial_cmp(&x).unwrap_or(Ordering::Equal).then(a.cmp(&b))
}

#[cfg(test)]
mod tests {
    use super::numeric::exp_f32;
    use super::*;
    use proptest::prelude::*;

    /// Brute force: full sort, vLLM's rules, the same weights.
    fn reference(row: &[f32], p: &SamplingParams) -> Vec<bool> {
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| desc_by(row[a as usize], row[b as usize], a, b));
        let max = row[order[0] as usize];
        let w = |i: u32| exp_f32((row[i as usize] - max) * (1.0 / p.temperature));
        if p.top_k > 0 && p.top_k < order.len() {
            let kth = row[order[p.top_k - 1] as usize];
            order.retain(|&i| row[i as usize] >= kth);
        }
        if p.top_p < 1.0 {
            let target = p.top_p as f64 * order.iter().map(|&i| w(i) as f64).sum::<f64>();
            let mut before = 0.0;
            let at = order.iter().position(|&i| {
                let b = before;
                before += w(i) as f64;
                b >= target
            });
            order.truncate(at.unwrap_or(order.len()).max(1));
        }
        let mut kept = vec![false; row.len()];
        order
            .into_iter()
            .filter(|&i| w(i) > 0.0 && w(i) >= p.min_p)
            .for_each(|i| kept[i as usize] = true);
        kept
    }

    proptest! {
        /// The histogram shortcut keeps exactly what a full sort would, ties and -inf included.
        #[test]
        fn kept_set_matches_a_full_sort(
            row in prop::collection::vec(prop_oneof![
                4 => (-24i32..24).prop_map(|v| v as f32 * 0.25),
                4 => -6.0f32..6.0,
                1 => Just(f32::NEG_INFINITY),
            ], 1..400),
            temperature in 0.05f32..3.0,
            top_k in 0usize..60,
            top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
            min_p in prop_oneof![Just(0.0f32), 0.0f32..0.5],
        ) {
            prop_assume!(row.iter().any(|x| x.is_finite()));
            let p = SamplingParams { temperature, top_k, top_p, min_p, ..SamplingParams::default() };
            let want = reference(&row, &p);
            let mut s = Sampler::new(p, 0);
            let token = s.sample(&row, &[], &[]).unwrap().token;
            prop_assert!(want[token as usize]);
            prop_assert_eq!(s.buf.weights.iter().map(|&w| w > 0.0).collect::<Vec<_>>(), want);
        }
    }
}

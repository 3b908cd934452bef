//! Sampler semantics against hand computations and a naive full-sort reference.

use proptest::prelude::*;
use quiver_engine::sampling::{Sampler, SamplingError, SamplingParams, MAX_LOGPROBS};

fn params() -> SamplingParams {
    SamplingParams::default()
}

fn random(temperature: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        ..params()
    }
}

/// Deterministic pseudo-random logits (an LCG), so tests need no RNG crate.
fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&x| x as f64 - lse).collect()
}

fn softmax(row: &[f32], t: f32) -> Vec<f64> {
    let scaled: Vec<f32> = row.iter().map(|x| x / t).collect();
    log_softmax(&scaled).into_iter().map(f64::exp).collect()
}

fn draw(p: SamplingParams, row: &[f32], n: usize) -> Vec<u32> {
    let mut s = Sampler::new(p, 0);
    (0..n).map(|_| s.sample(row, &[], &[]).unwrap().token).collect()
}

fn frequencies(tokens: &[u32], vocab: usize) -> Vec<f64> {
    let mut f = vec![0.0; vocab];
    for &t in tokens {
        f[t as usize] += 1.0 / tokens.len() as f64;
    }
    f
}

fn assert_close(got: &[f64], want: &[f64], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol,
            "token {i}: got {g:.4}, want {w:.4} (all: {got:?} vs {want:?})"
        );
    }
}

/// Logits whose softmax is exactly `probs` (up to rounding).
fn from_probs(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

#[test]
fn default_is_greedy_argmax() {
    assert!(params().is_greedy());
    let mut s = Sampler::new(params(), 7);
    for seed in 0..20 {
        let row = logits(1000, seed);
        assert_eq!(s.sample(&row, &[], &[]).unwrap().token, argmax(&row));
    }
    // Ties go to the first index.
    assert_eq!(s.sample(&[1.0, 3.0, 3.0, 2.0], &[], &[]).unwrap().token, 1);
    // A tiny temperature is greedy too (vLLM's epsilon), and so ignores the seed.
    let row = logits(100, 3);
    assert_eq!(draw(random(1e-6), &row, 5), vec![argmax(&row); 5]);
}

#[test]
fn same_seed_same_sequence_different_seeds_differ() {
    let row = logits(50, 1);
    let seeded = |seed| SamplingParams {
        seed: Some(seed),
        ..random(1.0)
    };
    let a = draw(seeded(42), &row, 64);
    assert_eq!(a, draw(seeded(42), &row, 64));
    assert_ne!(a, draw(seeded(43), &row, 64));
    // An explicit seed wins over the engine's default seed; without one the default is used.
    let mut x = Sampler::new(seeded(9), 1);
    let mut y = Sampler::new(seeded(9), 2);
    let mut z = Sampler::new(random(1.0), 9);
    for _ in 0..32 {
        let t = x.sample(&row, &[], &[]).unwrap().token;
        assert_eq!(t, y.sample(&row, &[], &[]).unwrap().token);
        assert_eq!(t, z.sample(&row, &[], &[]).unwrap().token);
    }
    let mut u = Sampler::new(random(1.0), 1);
    let mut v = Sampler::new(random(1.0), 2);
    let us: Vec<u32> = (0..64).map(|_| u.sample(&row, &[], &[]).unwrap().token).collect();
    let vs: Vec<u32> = (0..64).map(|_| v.sample(&row, &[], &[]).unwrap().token).collect();
    assert_ne!(us, vs);
}

#[test]
fn a_seed_is_independent_of_batch_neighbours() {
    let rows: Vec<Vec<f32>> = (0..40).map(|i| logits(64, i)).collect();
    let p = SamplingParams {
        seed: Some(5),
        top_k: 20,
        top_p: 0.9,
        ..random(0.8)
    };
    let mut alone = Sampler::new(p.clone(), 0);
    let solo: Vec<u32> = rows.iter().map(|r| alone.sample(r, &[], &[]).unwrap().token).collect();
    // Interleave with other sequences' samplers, as a batch would.
    let mut mine = Sampler::new(p, 0);
    let mut others: Vec<Sampler> = (0..3).map(|i| Sampler::new(random(1.0), i)).collect();
    let mut batched = Vec::new();
    for r in &rows {
        for o in &mut others {
            o.sample(r, &[], &[]).unwrap();
        }
        batched.push(mine.sample(r, &[], &[]).unwrap().token);
    }
    assert_eq!(solo, batched);
}

#[test]
fn top_k_1_and_tiny_top_p_are_greedy() {
    for seed in 0..30 {
        let row = logits(500, seed);
        let k1 = SamplingParams {
            top_k: 1,
            seed: Some(seed),
            ..random(1.5)
        };
        let p0 = SamplingParams {
            top_p: 1e-6,
            seed: Some(seed),
            ..random(1.5)
        };
        assert_eq!(draw(k1, &row, 10), vec![argmax(&row); 10]);
        assert_eq!(draw(p0, &row, 10), vec![argmax(&row); 10]);
    }
    // With tied maxima the nucleus keeps the lower id, as greedy does.
    let p0 = SamplingParams {
        top_p: 1e-6,
        ..random(1.0)
    };
    assert_eq!(draw(p0, &[0.0, 2.0, 2.0], 10), vec![1; 10]);
}

#[test]
fn top_k_keeps_the_k_best_renormalised() {
    let probs = [0.1, 0.4, 0.05, 0.3, 0.15];
    let row = from_probs(&probs);
    let p = SamplingParams {
        top_k: 2,
        seed: Some(3),
        ..random(1.0)
    };
    let f = frequencies(&draw(p, &row, 20_000), 5);
    assert_close(&f, &[0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7, 0.0], 0.015);
    // Ties with the k-th logit are kept (vLLM / HF threshold semantics); a huge k is off.
    let p = SamplingParams {
        top_k: 1,
        seed: Some(3),
        ..random(1.0)
    };
    let f = frequencies(&draw(p, &[1.0, 0.0, 1.0], 4000), 3);
    assert!(f[0] > 0.4 && f[2] > 0.4 && f[1] == 0.0, "{f:?}");
    let p = SamplingParams {
        top_k: usize::MAX,
        seed: Some(3),
        ..random(1.0)
    };
    assert_close(&frequencies(&draw(p, &row, 20_000), 5), &probs, 0.015);
}

#[test]
fn top_p_keeps_the_nucleus() {
    // Sorted probs 0.5, 0.3, 0.15, 0.05: a token stays while the mass before it is < top_p.
    let row = from_probs(&[0.15, 0.5, 0.05, 0.3]);
    let p = SamplingParams {
        top_p: 0.75,
        seed: Some(1),
        ..random(1.0)
    };
    assert_close(
        &frequencies(&draw(p, &row, 20_000), 4),
        &[0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8],
        0.015,
    );
    let p = SamplingParams {
        top_p: 0.85,
        seed: Some(1),
        ..random(1.0)
    };
    assert_close(
        &frequencies(&draw(p, &row, 20_000), 4),
        &[0.15 / 0.95, 0.5 / 0.95, 0.0, 0.3 / 0.95],
        0.015,
    );
    // top_k then top_p: the nucleus is taken on the renormalised top-k mass.
    let p = SamplingParams {
        top_k: 2,
        top_p: 0.6,
        seed: Some(1),
        ..random(1.0)
    };
    assert_eq!(draw(p, &row, 2000), vec![1; 2000]);
}

#[test]
fn min_p_filters_relative_to_the_top_token() {
    let row = from_probs(&[0.5, 0.3, 0.15, 0.05]);
    let p = SamplingParams {
        min_p: 0.25,
        seed: Some(2),
        ..random(1.0)
    };
    let f = frequencies(&draw(p, &row, 20_000), 4);
    assert_close(&f, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0], 0.015);
    let p = SamplingParams {
        min_p: 0.5,
        seed: Some(2),
        ..random(1.0)
    };
    assert_close(
        &frequencies(&draw(p, &row, 20_000), 4),
        &[0.625, 0.375, 0.0, 0.0],
        0.015,
    );
    // min_p = 1 keeps only the top token; with top_p the same filter applies after the nucleus.
    let p = SamplingParams {
        min_p: 1.0,
        top_p: 0.99,
        seed: Some(2),
        ..random(1.0)
    };
    assert_eq!(draw(p, &row, 100), vec![0; 100]);
    // min-p is measured after temperature: at T = 2 token 3 is at sqrt(0.1) of the top.
    let p = SamplingParams {
        min_p: 0.3,
        seed: Some(2),
        ..random(2.0)
    };
    assert!(draw(p, &row, 5000).contains(&3));
}

#[test]
fn temperature_matches_softmax_of_scaled_logits() {
    let row = [1.0f32, 0.5, -0.5];
    for t in [0.5f32, 0.7, 1.0, 2.0] {
        let p = SamplingParams {
            seed: Some(11),
            ..random(t)
        };
        let f = frequencies(&draw(p, &row, 30_000), 3);
        assert_close(&f, &softmax(&row, t), 0.012);
    }
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
    let row = [2.0f32, -1.0, 0.5, 3.0, -2.0];
    let p = SamplingParams {
        repetition_penalty: 2.0,
        ..params()
    };
    let mut s = Sampler::new(p, 0);
    // Prompt ∪ generated, each token once however often it appears; id 99 is out of range.
    let got = s.penalised(&row, &[0, 1, 1, 99], &[1, 3, 3]).to_vec();
    assert_eq!(got, vec![1.0, -2.0, 0.5, 1.5, -2.0]);
    // Greedy follows the penalised row: at 2× token 3 (1.5) still beats 0 (1.0); at 10× token 2 wins.
    assert_eq!(s.sample(&row, &[0, 1], &[3]).unwrap().token, 3);
    let p = SamplingParams {
        repetition_penalty: 10.0,
        ..params()
    };
    assert_eq!(Sampler::new(p, 0).sample(&row, &[3, 0], &[]).unwrap().token, 2);
}

#[test]
fn presence_and_frequency_penalties_count_generated_tokens_only() {
    let row = [2.0f32, 1.0, 0.5, 3.0];
    let p = SamplingParams {
        presence_penalty: 0.5,
        frequency_penalty: 0.25,
        ..params()
    };
    let mut s = Sampler::new(p, 0);
    // Token 0 is in the prompt only: untouched. Token 3 generated 3×, token 1 once.
    let got = s.penalised(&row, &[0, 0, 2], &[3, 1, 3, 3]).to_vec();
    assert_eq!(got, vec![2.0, 1.0 - 0.5 - 0.25, 0.5, 3.0 - 0.5 - 0.75]);
    assert_eq!(s.sample(&row, &[0], &[3, 1, 3, 3]).unwrap().token, 0);
    // Negative values reward repetition.
    let p = SamplingParams {
        presence_penalty: -2.0,
        frequency_penalty: -1.0,
        ..params()
    };
    let mut s = Sampler::new(p, 0);
    assert_eq!(
        s.penalised(&row, &[], &[2, 2]).to_vec(),
        vec![2.0, 1.0, 0.5 + 2.0 + 2.0, 3.0]
    );
    assert_eq!(s.sample(&row, &[], &[2, 2]).unwrap().token, 2);
    // All three together: repetition first, then frequency and presence (vLLM order).
    let p = SamplingParams {
        repetition_penalty: 2.0,
        presence_penalty: 1.0,
        frequency_penalty: 0.5,
        ..params()
    };
    let got = Sampler::new(p, 0).penalised(&row, &[1], &[0, 0]).to_vec();
    assert_eq!(got, vec![2.0 / 2.0 - 1.0 - 1.0, 0.5, 0.5, 3.0]);
}

#[test]
fn logprobs_are_the_raw_log_softmax() {
    let row = logits(300, 4);
    let want = log_softmax(&row);
    // Penalties and temperature change what is sampled, never the reported logprobs.
    let p = SamplingParams {
        logprobs: Some(5),
        repetition_penalty: 1.3,
        frequency_penalty: 0.7,
        seed: Some(1),
        ..random(0.6)
    };
    let mut s = Sampler::new(p, 0);
    let generated: Vec<u32> = (0..40).collect();
    for _ in 0..20 {
        let out = s.sample(&row, &[1, 2, 3], &generated).unwrap();
        assert!((out.logprob as f64 - want[out.token as usize]).abs() < 1e-5);
        assert_eq!(out.top_logprobs.len(), 5);
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        for (&(id, lp), &want_id) in out.top_logprobs.iter().zip(&order) {
            assert_eq!(id, want_id);
            assert!((lp as f64 - want[id as usize]).abs() < 1e-5);
        }
    }
    // Ties are ordered by lower id; N is clamped to the vocabulary; 0 and None return no list.
    let row = [0.0f32, 1.0, 1.0, -1.0];
    let with = |n| {
        Sampler::new(
            SamplingParams {
                logprobs: n,
                ..params()
            },
            0,
        )
        .sample(&row, &[], &[])
        .unwrap()
    };
    let top = with(Some(20)).top_logprobs;
    assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2, 0, 3]);
    assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
    let total: f64 = top.iter().map(|t| (t.1 as f64).exp()).sum();
    assert!((total - 1.0).abs() < 1e-6);
    assert!(with(Some(0)).top_logprobs.is_empty());
    let none = with(None);
    assert!(none.top_logprobs.is_empty());
    assert!((none.logprob as f64 - log_softmax(&row)[1]).abs() < 1e-6);
}

#[test]
fn validation_names_the_field() {
    assert_eq!(params().validate(), Ok(()));
    let edges = SamplingParams {
        temperature: 2.0,
        top_k: usize::MAX,
        top_p: 1.0,
        min_p: 1.0,
        repetition_penalty: 0.01,
        presence_penalty: -2.0,
        frequency_penalty: 2.0,
        logprobs: Some(MAX_LOGPROBS),
        seed: Some(u64::MAX),
    };
    assert_eq!(edges.validate(), Ok(()));
    let with = |set: fn(&mut SamplingParams)| {
        let mut p = params();
        set(&mut p);
        p
    };
    let cases: [(SamplingParams, &str, &str); 14] = [
        (with(|p| p.temperature = -0.1), "temperature", "got -0.1"),
        (with(|p| p.temperature = f32::NAN), "temperature", "got NaN"),
        (with(|p| p.temperature = f32::INFINITY), "temperature", "got inf"),
        (with(|p| p.top_p = 1.5), "top_p", "top_p must be in (0, 1], got 1.5"),
        (with(|p| p.top_p = 0.0), "top_p", "got 0"),
        (with(|p| p.top_p = f32::NAN), "top_p", "got NaN"),
        (with(|p| p.min_p = -0.01), "min_p", "min_p must be in [0, 1]"),
        (with(|p| p.min_p = 1.01), "min_p", "got 1.01"),
        (with(|p| p.repetition_penalty = 0.0), "repetition_penalty", "> 0, got 0"),
        (with(|p| p.repetition_penalty = -1.0), "repetition_penalty", "got -1"),
        (
            with(|p| p.presence_penalty = 2.5),
            "presence_penalty",
            "in [-2, 2], got 2.5",
        ),
        (with(|p| p.frequency_penalty = -2.01), "frequency_penalty", "got -2.01"),
        (with(|p| p.frequency_penalty = f32::NAN), "frequency_penalty", "got NaN"),
        (
            with(|p| p.logprobs = Some(21)),
            "logprobs",
            "logprobs must be at most 20, got 21",
        ),
    ];
    for (p, field, text) in cases {
        let err = p.validate().unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with(field), "{msg}");
        assert!(msg.contains(text), "{msg} lacks {text}");
        assert_eq!(err.param(), Some(field));
    }
}

#[test]
fn nan_and_infinite_logits() {
    let nan = f32::NAN;
    let row = [nan, 1.0, nan, 0.5, f32::NEG_INFINITY];
    // NaN counts as -inf: never chosen, greedy or sampled, and its logprob is -inf.
    assert_eq!(Sampler::new(params(), 0).sample(&row, &[], &[]).unwrap().token, 1);
    let p = SamplingParams {
        logprobs: Some(5),
        ..random(1.0)
    };
    let mut s = Sampler::new(p.clone(), 0);
    for _ in 0..200 {
        let out = s.sample(&row, &[], &[]).unwrap();
        assert!(out.token == 1 || out.token == 3);
        assert!(out.logprob.is_finite());
        assert_eq!(
            out.top_logprobs.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 0, 2, 4]
        );
        assert!(out.top_logprobs[2..].iter().all(|t| t.1 == f32::NEG_INFINITY));
    }
    for k in [1, 2, 3] {
        let mut s = Sampler::new(
            SamplingParams {
                top_k: k,
                top_p: 0.9,
                ..p.clone()
            },
            0,
        );
        assert!((0..50).all(|_| [1, 3].contains(&s.sample(&row, &[], &[]).unwrap().token)));
    }
    // Penalties on NaN tokens keep them out.
    let p = SamplingParams {
        repetition_penalty: 0.5,
        presence_penalty: -2.0,
        ..random(1.0)
    };
    let mut s = Sampler::new(p, 0);
    assert!((0..50).all(|_| [1, 3].contains(&s.sample(&row, &[0, 2], &[0, 2]).unwrap().token)));
    // No finite logit (or an empty row) is an error, not a panic or a made-up token.
    for bad in [vec![nan; 4], vec![f32::NEG_INFINITY; 3], vec![]] {
        for p in [params(), random(1.0)] {
            let err = Sampler::new(p, 0).sample(&bad, &[], &[]).unwrap_err();
            assert_eq!(err, SamplingError::NoFiniteLogits(bad.len()));
            assert_eq!(err.param(), None);
        }
    }
    // +inf is the certain token, with logprob 0.
    let row = [0.0, f32::INFINITY, 3.0];
    for p in [
        params(),
        random(1.0),
        SamplingParams {
            top_p: 0.5,
            ..random(1.0)
        },
    ] {
        let out = Sampler::new(p, 0).sample(&row, &[], &[]).unwrap();
        assert_eq!((out.token, out.logprob), (1, 0.0));
    }
}

#[test]
fn caller_logits_are_untouched() {
    let row = logits(1000, 9);
    let copy = row.clone();
    let p = SamplingParams {
        repetition_penalty: 1.5,
        presence_penalty: 1.0,
        top_k: 10,
        logprobs: Some(3),
        ..random(1.0)
    };
    let mut s = Sampler::new(p, 0);
    for _ in 0..5 {
        s.sample(&row, &[1, 2, 3], &[4, 4, 5]).unwrap();
    }
    let mut s = Sampler::new(random(0.9), 0);
    s.sample(&row, &[], &[]).unwrap();
    assert_eq!(row, copy);
}

#[test]
fn full_size_vocabulary() {
    // Qwen2's vocabulary; a flat tail makes the nucleus large, exercising the growing sort.
    let mut row = vec![0.0f32; 151_936];
    row[7] = 12.0;
    row[151_935] = 11.0;
    let p = SamplingParams {
        top_k: 50,
        top_p: 0.95,
        min_p: 0.01,
        seed: Some(1),
        ..random(0.7)
    };
    let toks = draw(p, &row, 50);
    assert!(toks.iter().all(|&t| t == 7 || t == 151_935), "{toks:?}");
    let p = SamplingParams {
        top_p: 0.5,
        seed: Some(1),
        logprobs: Some(20),
        ..random(1.0)
    };
    let mut s = Sampler::new(p, 0);
    let flat = logits(151_936, 5);
    for _ in 0..5 {
        let out = s.sample(&flat, &[], &[]).unwrap();
        assert_eq!(out.top_logprobs.len(), 20);
        // Logits are uniform on [-4, 4): half the mass lies above 4 - ln 2 ≈ 3.31.
        assert!(flat[out.token as usize] > 3.25, "{}", flat[out.token as usize]);
    }
}

/// Tokens a naive full-sort implementation would allow (penalties off).
fn reference_support(row: &[f32], p: &SamplingParams) -> Vec<u32> {
    let mut order: Vec<u32> = (0..row.len() as u32).collect();
    order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    let max = row[order[0] as usize] as f64;
    let w = |i: u32| ((row[i as usize] as f64 - max) / p.temperature as f64).exp();
    if p.top_k > 0 && p.top_k < order.len() {
        let kth = row[order[p.top_k - 1] as usize];
        order.retain(|&i| row[i as usize] >= kth);
    }
    if p.top_p < 1.0 {
        let total: f64 = order.iter().map(|&i| w(i)).sum();
        let mut before = 0.0;
        let mut cut = order.len();
        for (j, &i) in order.iter().enumerate() {
            if j > 0 && before >= p.top_p as f64 * total {
                cut = j;
                break;
            }
            before += w(i);
        }
        order.truncate(cut);
    }
    order.retain(|&i| w(i) >= p.min_p as f64);
    order
}

proptest! {
    #[test]
    fn samples_stay_in_the_reference_support(
        row in prop::collection::vec(-6.0f32..6.0, 1..80),
        temperature in 0.1f32..3.0,
        top_k in 0usize..12,
        top_p in prop_oneof![Just(1.0f32), 0.01f32..1.0],
        min_p in prop_oneof![Just(0.0f32), 0.0f32..0.9],
        seed in any::<u64>(),
    ) {
        let p = SamplingParams { temperature, top_k, top_p, min_p, seed: Some(seed), ..params() };
        let support = reference_support(&row, &p);
        let mut s = Sampler::new(p, 0);
        for _ in 0..20 {
            let t = s.sample(&row, &[], &[]).unwrap().token;
            prop_assert!(support.contains(&t), "{t} not in {support:?}");
        }
    }
}

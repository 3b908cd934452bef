//! The multi-tenant chat workload: every adapter comes with its own long system prompt, several
//! users per adapter each hold a conversation of a few turns, and each turn resends the whole
//! conversation (system prompt, earlier turns, the model's answers) plus a new user message.
//! Users start at Poisson times; a user's next turn is sent as soon as the previous one ends.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use quiver_benches::Rng;
use quiver_engine::{Engine, Event, GenerateRequest};

/// The workload's shape (all from the environment, see `prefix.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub adapters: usize,
    pub users_per_adapter: usize,
    pub turns: usize,
    pub system_len: usize,
    pub user_len: (usize, usize),
    pub max_tokens: usize,
    /// Users starting per second (Poisson).
    pub rate: f64,
}

/// One user: its adapter, its start time and the user messages of its turns.
pub struct User {
    pub adapter: usize,
    pub start: f64,
    pub messages: Vec<Vec<u32>>,
}

fn tokens(rng: &mut Rng, n: usize) -> Vec<u32> {
    (0..n).map(|_| 3 + (rng.next_u64() % 20_000) as u32).collect()
}

/// The system prompts (one per adapter) and the users, identical for every run with one seed.
pub fn workload(shape: Shape, seed: u64) -> (Vec<Vec<u32>>, Vec<User>) {
    let mut rng = Rng(seed);
    let systems = (0..shape.adapters)
        .map(|_| tokens(&mut rng, shape.system_len))
        .collect();
    let mut at = 0.0;
    let mut users: Vec<User> = (0..shape.adapters * shape.users_per_adapter)
        .map(|i| {
            if i > 0 {
                at += -(1.0 - rng.unit()).ln() / shape.rate;
            }
            let messages = (0..shape.turns)
                .map(|_| {
                    let n = rng.range(shape.user_len);
                    tokens(&mut rng, n)
                })
                .collect();
            User {
                adapter: i % shape.adapters,
                start: at,
                messages,
            }
        })
        .collect();
    users.sort_by(|a, b| a.start.total_cmp(&b.start));
    (systems, users)
}

/// One turn as the client saw it.
pub struct Turn {
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Submission to first token.
    pub ttft: Duration,
}

/// Sends one request and waits for its end; returns the turn and the generated token ids.
pub fn send(engine: &Engine, adapter: Option<String>, prompt: Vec<u32>, max_tokens: usize) -> Result<(Turn, Vec<u32>)> {
    let prompt_tokens = prompt.len();
    let request = GenerateRequest {
        adapter,
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerateRequest::new(prompt)
    };
    let submitted = Instant::now();
    let mut rx = engine.submit(engine.validate(request)?)?;
    let mut first = None;
    let mut generated = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(Event::Delta(d)) => {
                first.get_or_insert_with(Instant::now);
                generated.extend(d.tokens.iter().map(|s| s.token));
            }
            Some(Event::Finished { .. }) => break,
            Some(Event::Error(e)) => bail!("request failed: {e}"),
            None => bail!("the engine dropped a request"),
        }
    }
    let done = Instant::now();
    let turn = Turn {
        prompt_tokens,
        output_tokens: generated.len(),
        ttft: first.unwrap_or(done) - submitted,
    };
    Ok((turn, generated))
}

/// Runs every user's conversation against `engine`, users in parallel from their start times.
pub fn run_users(
    engine: &Engine,
    systems: &[Vec<u32>],
    users: &[User],
    shape: Shape,
    name: impl Fn(usize) -> String + Sync,
) -> Result<(Vec<Turn>, Duration)> {
    let t0 = Instant::now();
    let turns = std::thread::scope(|s| -> Result<Vec<Turn>> {
        let handles: Vec<_> = users
            .iter()
            .map(|u| {
                let name = &name;
                s.spawn(move || -> Result<Vec<Turn>> {
                    let due = t0 + Duration::from_secs_f64(u.start);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let mut conversation = systems[u.adapter].clone();
                    let mut turns = Vec::new();
                    for message in &u.messages {
                        conversation.extend_from_slice(message);
                        let (turn, answer) =
                            send(engine, Some(name(u.adapter)), conversation.clone(), shape.max_tokens)?;
                        conversation.extend(answer);
                        turns.push(turn);
                    }
                    Ok(turns)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.join().map_err(|_| anyhow::anyhow!("a user thread panicked"))??);
        }
        Ok(all)
    })?;
    Ok((turns, t0.elapsed()))
}

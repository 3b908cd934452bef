//! Every ending is the engine's: length, EOS, a stop token, a stop string and a client that went
//! away each end a choice with their own reason, and each moves its own metric — a stop string is
//! a `stop`, never a cancellation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use quiver_engine::{Engine, EngineConfig, EngineStats, Event, FinishReason, GenerateRequest, StopCause};
use quiver_model::{ModelBundle, Tokenizer};
use quiver_tensor::cpu::CpuBackend;
use tokio::sync::mpsc::UnboundedReceiver;

const PROMPT: [u32; 6] = [40, 41, 42, 43, 44, 45];

/// An engine over the test kit's tiny qwen2 with its tokenizer; `eos` as given.
fn start(eos: Vec<u32>) -> Result<(tempfile::TempDir, Engine, Arc<Tokenizer>)> {
    let (dir, _) = quiver_testkit::materialize_lora("qwen2-f32-tied")?;
    let bundle = ModelBundle::load(CpuBackend::default(), &dir.path().join("base"), None)?;
    let tokenizer = Arc::new(bundle.tokenizer);
    let cfg = EngineConfig {
        memory_budget: 64 << 20,
        ..Default::default()
    };
    let engine = Engine::start(bundle.model, Some(tokenizer.clone()), eos, cfg)?;
    Ok((dir, engine, tokenizer))
}

fn greedy(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        max_tokens: Some(max_tokens),
        ..GenerateRequest::new(PROMPT.to_vec())
    }
}

struct Ended {
    tokens: Vec<u32>,
    text: String,
    reason: FinishReason,
}

fn run(engine: &Engine, r: GenerateRequest) -> Result<Ended> {
    let mut rx = engine.submit(engine.validate(r)?)?;
    let (mut tokens, mut text) = (Vec::new(), String::new());
    loop {
        match rx.blocking_recv().context("the engine dropped the request")? {
            Event::Delta(d) => {
                tokens.extend(d.tokens.iter().map(|s| s.token));
                text.push_str(&d.text);
            }
            Event::Finished {
                reason,
                completion_tokens,
                ..
            } => {
                ensure!(
                    completion_tokens == tokens.len(),
                    "usage {completion_tokens} vs {}",
                    tokens.len()
                );
                return Ok(Ended { tokens, text, reason });
            }
            Event::Error(e) => bail!("request failed: {e}"),
        }
    }
}

fn stats(engine: &Engine) -> Result<EngineStats> {
    Ok(engine.stats()?.blocking_recv()?)
}

fn count(s: &EngineStats, reason: &str) -> u64 {
    s.requests.finished.get(reason).copied().unwrap_or(0)
}

#[test]
fn length_stop_token_stop_string_and_eos_each_end_a_choice() -> Result<()> {
    let (_dir, engine, tok) = start(vec![])?;
    // Length: ignore nothing, no EOS configured, so the budget ends it.
    let full = run(&engine, greedy(8))?;
    ensure!(
        full.reason == FinishReason::Length && full.tokens.len() == 8,
        "{:?}",
        full.reason
    );
    ensure!(
        full.text == tok.decode(&full.tokens, true)?,
        "streamed text differs from the decode"
    );
    let s = stats(&engine)?;
    ensure!(
        count(&s, "length") == 1 && s.requests.generation_tokens == 8,
        "{:?}",
        s.requests
    );

    // A stop token id: the choice ends on it, the token counted.
    let stop_at = full.tokens[2];
    let first = full.tokens.iter().position(|&t| t == stop_at).context("token")?;
    let r = GenerateRequest {
        stop_token_ids: vec![stop_at],
        ..greedy(8)
    };
    let ended = run(&engine, r)?;
    ensure!(
        ended.reason == FinishReason::Stop(StopCause::Token(stop_at)),
        "{:?}",
        ended.reason
    );
    ensure!(
        ended.tokens == full.tokens[..=first],
        "{:?} vs {:?}",
        ended.tokens,
        full.tokens
    );

    // A stop string: the text ends before its earliest occurrence.
    let chars: Vec<char> = full.text.chars().collect();
    ensure!(
        chars.len() >= 4,
        "the test needs a few characters of output: {:?}",
        full.text
    );
    let stop: String = chars[2..4].iter().collect();
    let cut = full.text.find(&stop).context("stop in text")?;
    let r = GenerateRequest {
        stop: vec!["never appears \u{1}".into(), stop.clone()],
        ..greedy(8)
    };
    let ended = run(&engine, r)?;
    ensure!(
        ended.reason == FinishReason::Stop(StopCause::String(1)),
        "{:?}",
        ended.reason
    );
    ensure!(
        ended.text == full.text[..cut],
        "{:?} vs {:?} cut at {stop:?}",
        ended.text,
        full.text
    );
    let s = stats(&engine)?;
    ensure!(
        count(&s, "stop") == 2 && count(&s, "abort") == 0 && s.cancelled == 0,
        "{:?}",
        s
    );
    ensure!(s.finished == 3, "finished {}", s.finished);
    drop(engine);

    // EOS: the same token, now the model's end-of-sequence id; `ignore_eos` runs past it.
    let (_dir, engine, _) = start(vec![stop_at])?;
    let ended = run(&engine, greedy(8))?;
    ensure!(ended.reason == FinishReason::Stop(StopCause::Eos), "{:?}", ended.reason);
    ensure!(ended.tokens == full.tokens[..=first]);
    let ignored = run(
        &engine,
        GenerateRequest {
            ignore_eos: true,
            ..greedy(8)
        },
    )?;
    ensure!(ignored.reason == FinishReason::Length && ignored.tokens == full.tokens);
    let s = stats(&engine)?;
    ensure!(count(&s, "stop") == 1 && count(&s, "length") == 1, "{:?}", s.requests);
    Ok(())
}

/// The client goes away mid-generation: the choice is aborted, counted once as a cancelled
/// request and as `abort`, and its memory comes back.
#[test]
fn a_client_that_goes_away_is_an_abort() -> Result<()> {
    let (_dir, engine, _) = start(vec![])?;
    let r = GenerateRequest { n: 2, ..greedy(200) };
    let mut rx: UnboundedReceiver<Event> = engine.submit(engine.validate(r)?)?;
    match rx.blocking_recv() {
        Some(Event::Delta(_)) => {}
        other => bail!("expected a delta first, got {other:?}"),
    }
    drop(rx);
    let t = Instant::now();
    loop {
        let s = stats(&engine)?;
        if s.running == 0 && s.waiting == 0 {
            ensure!(s.cancelled == 1, "one request cancelled, got {}", s.cancelled);
            ensure!(count(&s, "abort") == 2, "both choices aborted: {:?}", s.requests);
            ensure!(s.finished == 0 && s.kv_blocks_used == 0, "{s:?}");
            return Ok(());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(30),
            "the request was not cancelled: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

//! A client that goes away takes every choice of its request with it at the next step, the
//! queued ones that never started included; other requests are untouched. And the validator
//! bounds a request's prompt tokens, counted once per choice.

use anyhow::{ensure, Context, Result};
use quiver_engine::request::Command;
use quiver_engine::scheduler::Scheduler;
use quiver_engine::{EngineConfig, EngineStats, Event, GenerateRequest, Validator};
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

fn scheduler(cfg: EngineConfig) -> Result<(tempfile::TempDir, Scheduler<CpuBackend>)> {
    let (dir, _) = quiver_testkit::materialize_lora("llama-f32")?;
    let bundle = ModelBundle::load(CpuBackend::default(), &dir.path().join("base"), None)?;
    let s = Scheduler::build(bundle.model, None, vec![], cfg)?;
    Ok((dir, s))
}

fn stats(s: &mut Scheduler<CpuBackend>) -> Result<EngineStats> {
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    s.handle(Command::Stats { reply: tx });
    Ok(rx.try_recv()?)
}

fn submit(s: &mut Scheduler<CpuBackend>, r: GenerateRequest) -> Result<UnboundedReceiver<Event>> {
    let request = Validator::new(s.limits()).validate(r)?;
    let (events, rx) = unbounded_channel();
    s.handle(Command::Submit {
        request: request.into(),
        events,
    });
    Ok(rx)
}

fn long(prompts: usize, n: usize) -> GenerateRequest {
    GenerateRequest {
        prompts: vec![vec![5, 6, 7]; prompts],
        n,
        max_tokens: Some(40),
        ignore_eos: true,
        ..GenerateRequest::new(vec![])
    }
}

#[test]
fn a_gone_client_takes_its_queued_choices_at_the_next_step() -> Result<()> {
    let (_dir, mut s) = scheduler(EngineConfig {
        memory_budget: 64 << 20,
        max_num_seqs: 2,
        ..Default::default()
    })?;
    // 16 prompts × n 16: 256 choices, of which 2 can run at once.
    let gone = submit(&mut s, long(16, 16))?;
    let mut other = submit(&mut s, long(1, 1))?;
    s.step()?;
    let before = stats(&mut s)?;
    ensure!(
        before.running == 2 && before.waiting == 255,
        "running {} waiting {}",
        before.running,
        before.waiting
    );
    drop(gone);
    s.step()?;
    let after = stats(&mut s)?;
    ensure!(
        after.cancelled == 1 && after.waiting + after.running == 1,
        "one step after the client left: cancelled {} running {} waiting {}",
        after.cancelled,
        after.running,
        after.waiting
    );
    // Every choice is counted as an abort, and the ones that never started produced nothing.
    let aborted = after.requests.finished.get("abort").copied().unwrap_or(0);
    ensure!(aborted == 256, "aborted {aborted}");
    ensure!(
        after.requests.generation_tokens <= 2,
        "queued choices generated {} tokens",
        after.requests.generation_tokens
    );
    // The other client's request runs to its end.
    while s.has_work() {
        s.step()?;
    }
    let mut tokens = 0;
    let mut finished = false;
    while let Ok(e) = other.try_recv() {
        match e {
            Event::Delta(d) => tokens += d.tokens.len(),
            Event::Finished { .. } => finished = true,
            Event::Error(e) => anyhow::bail!("the other request failed: {e}"),
        }
    }
    ensure!(
        finished && tokens == 40,
        "other request: {tokens} tokens, finished {finished}"
    );
    let end = stats(&mut s)?;
    ensure!(end.kv_blocks_used == 0, "{} KV blocks leaked", end.kv_blocks_used);
    Ok(())
}

#[test]
fn prompt_tokens_are_bounded_per_request_counting_each_choice() -> Result<()> {
    let (_dir, s) = scheduler(EngineConfig {
        memory_budget: 64 << 20,
        max_model_len: 64,
        max_request_prompt_tokens: Some(96),
        ..Default::default()
    })?;
    let v = Validator::new(s.limits());
    let r = |prompts: usize, len: usize, n: usize| GenerateRequest {
        prompts: vec![vec![5; len]; prompts],
        n,
        max_tokens: Some(1),
        ..GenerateRequest::new(vec![])
    };
    // 32 tokens × n 3 = 96: at the cap.
    v.validate(r(1, 32, 3)).context("a request at the cap")?;
    v.validate(r(3, 32, 1)).context("the same work as three prompts")?;
    for (prompts, n) in [(1, 4), (4, 1), (2, 2)] {
        let e = v.validate(r(prompts, 32, n)).err().context("over the cap passed")?;
        ensure!(
            e.param == "prompt" && e.message.contains("at most 96"),
            "{prompts} × {n}: {e}"
        );
    }
    // n out of range is named before any counting.
    ensure!(v.choices(3, 0).is_err_and(|e| e.param == "n"));
    ensure!(v.choices(3, 4)? == 12);
    // Default: 16 × max_model_len, so one prompt at the longest length fits at n = 16.
    let (_dir, s) = scheduler(EngineConfig {
        memory_budget: 64 << 20,
        max_model_len: 64,
        ..Default::default()
    })?;
    let v = Validator::new(s.limits());
    ensure!(v.limits().max_request_prompt_tokens == 16 * 64);
    v.validate(r(1, 63, 16)).context("one long prompt at n = 16")?;
    Ok(())
}

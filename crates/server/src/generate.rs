//! Runs the choices of one API request through the engine: one engine request per prompt × n,
//! each consumed by its own task that detokenizes, applies stop strings and forwards deltas on
//! one channel. When the HTTP side goes away the channel closes, the tasks drop their engine
//! receivers and the engine cancels those sequences at its next step.

use std::sync::Arc;
use std::time::Instant;

use quiver_engine::output::TextStream;
use quiver_engine::{Event, FinishReason, GenerateRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tracing::Instrument;

use crate::error::ApiError;
use crate::openai::GenParams;
use crate::state::AppState;

/// One generated token with its log-probabilities.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug)]
pub enum Delta {
    /// New text (possibly empty while a character or a stop string is incomplete) and the
    /// tokens that produced it.
    Text {
        index: usize,
        text: String,
        tokens: Vec<TokenInfo>,
    },
    Done {
        index: usize,
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed {
        index: usize,
        error: ApiError,
    },
}

pub struct Choice {
    pub index: usize,
    pub prompt: Vec<u32>,
}

/// Starts every choice; deltas of all of them arrive on the returned channel.
pub fn spawn_choices(
    state: &Arc<AppState>,
    choices: Vec<Choice>,
    adapter: Option<String>,
    params: &GenParams,
    permit: OwnedSemaphorePermit,
    request_id: &str,
) -> mpsc::Receiver<Delta> {
    let (tx, rx) = mpsc::channel(64);
    let permit = Arc::new(permit);
    for choice in choices {
        let state = state.clone();
        let tx = tx.clone();
        let max_tokens = params
            .max_tokens
            .unwrap_or_else(|| state.limits.max_model_len.saturating_sub(choice.prompt.len()))
            .max(1);
        let mut sampling = params.sampling.clone();
        // n > 1 with a seed: distinct but reproducible samples.
        sampling.seed = sampling.seed.map(|s| s.wrapping_add(choice.index as u64));
        let request = GenerateRequest {
            prompt: choice.prompt,
            adapter: adapter.clone(),
            sampling,
            max_tokens,
            stop_token_ids: params.stop_token_ids.clone(),
            ignore_eos: params.ignore_eos,
        };
        let stops = params.stop.clone();
        let skip_special = params.skip_special_tokens;
        let permit = permit.clone();
        let span = tracing::info_span!("choice", request_id = %request_id, adapter = adapter.as_deref().unwrap_or("-"), index = choice.index);
        tokio::spawn(
            async move {
                let _permit = permit;
                let index = choice.index;
                if let Err(error) = run_choice(&state, index, request, stops, skip_special, &tx).await {
                    tracing::info!(%error, "failed");
                    let _ = tx.send(Delta::Failed { index, error }).await;
                }
            }
            .instrument(span),
        );
    }
    rx
}

async fn run_choice(
    state: &AppState,
    index: usize,
    request: GenerateRequest,
    stops: Vec<String>,
    skip_special: bool,
    tx: &mpsc::Sender<Delta>,
) -> Result<(), ApiError> {
    let prompt_tokens = request.prompt.len();
    let adapter = request.adapter.clone();
    let mut text = TextStream::new(stops, skip_special).map_err(|e| ApiError::param("stop", e.to_string()))?;
    let started = Instant::now();
    let mut events = state.engine.submit(request)?;
    let mut first: Option<Instant> = None;
    let mut last = started;
    let mut completion_tokens = 0;
    let tok = &state.tokenizer;
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(s) => {
                let now = Instant::now();
                match first {
                    None => state.metrics.observe_ttft(now - started),
                    Some(_) => state.metrics.observe_tpot(now - last),
                }
                first.get_or_insert(now);
                last = now;
                completion_tokens += 1;
                let piece = text.push(tok, s.token).map_err(|e| ApiError::Internal(e.to_string()))?;
                let info = TokenInfo {
                    id: s.token,
                    logprob: s.logprob,
                    top: s.top_logprobs,
                };
                if tx
                    .send(Delta::Text {
                        index,
                        text: piece.text,
                        tokens: vec![info],
                    })
                    .await
                    .is_err()
                {
                    return Ok(()); // client gone: dropping `events` cancels the request
                }
                if piece.stopped {
                    state
                        .metrics
                        .finished(adapter.as_deref(), prompt_tokens, completion_tokens, started.elapsed());
                    let _ = tx
                        .send(Delta::Done {
                            index,
                            finish_reason: "stop",
                            prompt_tokens,
                            completion_tokens,
                        })
                        .await;
                    return Ok(());
                }
            }
            Event::Finished { reason, queue_time, .. } => {
                state.metrics.observe_queue(queue_time);
                let ttft = first.map(|f| f - started).unwrap_or_default();
                tracing::info!(
                    prompt_tokens,
                    completion_tokens,
                    ttft_ms = ttft.as_millis() as u64,
                    queue_ms = queue_time.as_millis() as u64,
                    decode_ms = first.map(|f| (last - f).as_millis() as u64).unwrap_or(0),
                    ?reason,
                    "finished"
                );
                let rest = text.finish(tok).map_err(|e| ApiError::Internal(e.to_string()))?;
                if !rest.is_empty() {
                    let _ = tx
                        .send(Delta::Text {
                            index,
                            text: rest,
                            tokens: vec![],
                        })
                        .await;
                }
                let finish_reason = match reason {
                    FinishReason::Length => "length",
                    FinishReason::Stop => "stop",
                };
                state
                    .metrics
                    .finished(adapter.as_deref(), prompt_tokens, completion_tokens, started.elapsed());
                let _ = tx
                    .send(Delta::Done {
                        index,
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    })
                    .await;
                return Ok(());
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Unavailable)
}

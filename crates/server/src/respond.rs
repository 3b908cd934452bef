//! Turns a running request's engine events into OpenAI's response objects: one JSON body, or SSE
//! frames (`data: {chunk}` … `data: [DONE]`). Every ending is the engine's; this only formats.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::Json;
use futures_util::stream::{self, Stream};
use quiver_engine::sampling::Sampled;
use quiver_engine::{Event, FinishReason, StopCause};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::response::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatLogprobs, ChatTokenLogprob, Chunk, ChunkDelta, CompletionChoice,
    CompletionLogprobs, Response, StopReason, TopLogprob, Usage,
};
use crate::routes::{Job, Kind};
use crate::state::AppState;

pub async fn respond(state: Arc<AppState>, job: Result<Job, ApiError>) -> HttpResponse {
    match job {
        Err(e) => {
            state.metrics.rejected(e.status().as_u16());
            e.into_response()
        }
        Ok(job) if job.format.stream => stream(state, job).into_response(),
        Ok(job) => match collect(&state, job).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn token_text(state: &AppState, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        state.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

fn chat_logprobs(state: &AppState, tokens: &[Sampled], as_ids: bool) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        let token = token_text(state, id, as_ids);
        TopLogprob {
            bytes: token.as_bytes().to_vec(),
            token,
            logprob,
        }
    };
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| {
                let TopLogprob { token, logprob, bytes } = top(t.token, t.logprob);
                ChatTokenLogprob {
                    token,
                    logprob,
                    bytes,
                    top_logprobs: t.top_logprobs.iter().map(|&(id, lp)| top(id, lp)).collect(),
                }
            })
            .collect(),
    }
}

/// Completions logprobs; `offset` is the choice's text length before these tokens.
fn completion_logprobs(state: &AppState, tokens: &[Sampled], as_ids: bool, offset: usize) -> CompletionLogprobs {
    let texts: Vec<String> = tokens.iter().map(|t| token_text(state, t.token, as_ids)).collect();
    let text_offset = texts
        .iter()
        .scan(offset, |at, t| {
            let here = *at;
            *at += t.len();
            Some(here)
        })
        .collect();
    CompletionLogprobs {
        token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| {
                t.top_logprobs
                    .iter()
                    .map(|&(id, lp)| (token_text(state, id, as_ids), Value::from(lp)))
                    .collect::<Map<_, _>>()
            })
            .collect(),
        tokens: texts,
        text_offset,
    }
}

fn stop_reason(job: &Job, reason: &FinishReason) -> Option<StopReason> {
    match reason {
        FinishReason::Stop(StopCause::Token(t)) => Some(StopReason::Token(*t)),
        FinishReason::Stop(StopCause::String(i)) => job.request.request().stop.get(*i).cloned().map(StopReason::Text),
        _ => None,
    }
}

/// Usage over all choices: n samples of one prompt count its tokens once, as OpenAI does.
#[derive(Default)]
struct Tally {
    prompt: usize,
    cached: usize,
    completion: usize,
    done: usize,
}

impl Tally {
    /// Prompt tokens (and their cached part) count once per prompt, from its first choice.
    fn add(&mut self, job: &Job, index: usize, prompt: usize, cached: usize, completion: usize) {
        if index.is_multiple_of(job.request.request().n) {
            self.prompt += prompt;
            self.cached += cached;
        }
        self.completion += completion;
        self.done += 1;
    }

    fn usage(&self) -> Usage {
        Usage::new(self.prompt, self.completion, self.cached)
    }
}

async fn collect(state: &AppState, mut job: Job) -> Result<HttpResponse, ApiError> {
    #[derive(Default)]
    struct Acc {
        text: String,
        tokens: Vec<Sampled>,
        finish: Option<FinishReason>,
    }
    let mut acc: Vec<Acc> = (0..job.choices).map(|_| Acc::default()).collect();
    let mut tally = Tally::default();
    while tally.done < job.choices {
        match job.events.recv().await.ok_or(ApiError::Unavailable)? {
            Event::Delta(d) => {
                let a = &mut acc[d.index];
                a.text.push_str(&d.text);
                a.tokens.extend(d.tokens);
            }
            Event::Finished {
                index,
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                acc[index].finish = Some(reason);
                tally.add(&job, index, prompt_tokens, cached_tokens, completion_tokens);
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    let as_ids = job.format.token_ids_as_text;
    let wants_logprobs = job.request.request().sampling.logprobs.is_some();
    let (id, model, created, usage) = (job.id.clone(), job.model.clone(), created(), tally.usage());
    tracing::info!(request_id = %id, prompt_tokens = usage.prompt_tokens, completion_tokens = usage.completion_tokens, "finished");
    let body = match job.kind {
        Kind::Chat => Json(Response {
            id,
            object: "chat.completion",
            created,
            model,
            choices: acc
                .into_iter()
                .enumerate()
                .map(|(index, a)| ChatChoice {
                    index,
                    logprobs: wants_logprobs.then(|| chat_logprobs(state, &a.tokens, as_ids)),
                    finish_reason: a.finish.as_ref().map(FinishReason::as_str),
                    stop_reason: a.finish.as_ref().and_then(|r| stop_reason(&job, r)),
                    message: AssistantMessage {
                        role: "assistant",
                        content: a.text,
                    },
                })
                .collect(),
            usage,
        })
        .into_response(),
        Kind::Completion => Json(Response {
            id,
            object: "text_completion",
            created,
            model,
            choices: acc
                .into_iter()
                .enumerate()
                .map(|(index, a)| CompletionChoice {
                    index,
                    logprobs: wants_logprobs.then(|| completion_logprobs(state, &a.tokens, as_ids, 0)),
                    finish_reason: a.finish.as_ref().map(FinishReason::as_str),
                    stop_reason: a.finish.as_ref().and_then(|r| stop_reason(&job, r)),
                    text: a.text,
                })
                .collect(),
            usage,
        })
        .into_response(),
    };
    Ok(body)
}

/// The SSE side: state carried from frame to frame.
struct Streaming {
    state: Arc<AppState>,
    job: Job,
    created: u64,
    tally: Tally,
    /// Text sent so far per choice (completions logprobs' `text_offset`).
    offsets: Vec<usize>,
    sent_role: Vec<bool>,
    ended: bool,
}

impl Streaming {
    fn chunk<C: serde::Serialize>(&self, choices: Vec<C>, usage: Option<Usage>) -> String {
        let object = match self.job.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let chunk = Chunk {
            id: self.job.id.clone(),
            object,
            created: self.created,
            model: self.job.model.clone(),
            choices,
            usage,
        };
        serde_json::to_string(&chunk).unwrap_or_default()
    }

    fn error(&mut self, e: ApiError) -> String {
        self.ended = true;
        serde_json::to_string(&e.body()).unwrap_or_default()
    }

    /// The frames for the next event (none for text held back), or `None` at the end.
    async fn next(&mut self) -> Option<Vec<String>> {
        if self.ended {
            return None;
        }
        if self.tally.done == self.job.choices {
            self.ended = true;
            let mut frames = Vec::new();
            if self.job.format.include_usage {
                frames.push(self.chunk::<ChatChunkChoice>(vec![], Some(self.tally.usage())));
            }
            frames.push("[DONE]".to_string());
            return Some(frames);
        }
        let as_ids = self.job.format.token_ids_as_text;
        let wants_logprobs = self.job.request.request().sampling.logprobs.is_some();
        let frame = match self.job.events.recv().await {
            None => self.error(ApiError::Unavailable),
            Some(Event::Error(e)) => self.error(e.into()),
            Some(Event::Delta(d)) if d.text.is_empty() && !wants_logprobs => return Some(vec![]),
            Some(Event::Delta(d)) => {
                let i = d.index;
                let offset = self.offsets[i];
                self.offsets[i] += d.text.len();
                match self.job.kind {
                    Kind::Chat => {
                        let role = (!std::mem::replace(&mut self.sent_role[i], true)).then_some("assistant");
                        let choice = ChatChunkChoice {
                            index: i,
                            logprobs: wants_logprobs.then(|| chat_logprobs(&self.state, &d.tokens, as_ids)),
                            delta: ChunkDelta {
                                role,
                                content: Some(d.text),
                            },
                            finish_reason: None,
                            stop_reason: None,
                        };
                        self.chunk(vec![choice], None)
                    }
                    Kind::Completion => {
                        let choice = CompletionChoice {
                            index: i,
                            logprobs: wants_logprobs
                                .then(|| completion_logprobs(&self.state, &d.tokens, as_ids, offset)),
                            text: d.text,
                            finish_reason: None,
                            stop_reason: None,
                        };
                        self.chunk(vec![choice], None)
                    }
                }
            }
            Some(Event::Finished {
                index,
                reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
                ..
            }) => {
                self.tally
                    .add(&self.job, index, prompt_tokens, cached_tokens, completion_tokens);
                let stop_reason = stop_reason(&self.job, &reason);
                match self.job.kind {
                    Kind::Chat => self.chunk(
                        vec![ChatChunkChoice {
                            index,
                            delta: ChunkDelta::default(),
                            logprobs: None,
                            finish_reason: Some(reason.as_str()),
                            stop_reason,
                        }],
                        None,
                    ),
                    Kind::Completion => self.chunk(
                        vec![CompletionChoice {
                            index,
                            text: String::new(),
                            logprobs: None,
                            finish_reason: Some(reason.as_str()),
                            stop_reason,
                        }],
                        None,
                    ),
                }
            }
        };
        Some(vec![frame])
    }
}

fn stream(state: Arc<AppState>, job: Job) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let init = Streaming {
        created: created(),
        offsets: vec![0; job.choices],
        sent_role: vec![false; job.choices],
        tally: Tally::default(),
        ended: false,
        state,
        job,
    };
    let frames = stream::unfold(init, |mut s| async move { s.next().await.map(|f| (f, s)) });
    let events = futures_util::StreamExt::flat_map(frames, |frames| {
        stream::iter(frames.into_iter().map(|f| Ok(SseEvent::default().data(f))))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

//! `/v1/completions` and `/v1/chat/completions`, non-streaming and SSE.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::admin::{check_key, resolve_model};
use crate::error::ApiError;
use crate::generate::{spawn_choices, Choice, Delta, TokenInfo};
use crate::openai::{prompts, ChatRequest, CompletionRequest, GenParams, Prompt};
use crate::state::AppState;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

fn request_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!(
        "{prefix}-{:016x}",
        NEXT.fetch_add(1, Ordering::Relaxed) ^ 0x5eed_0000_0000
    )
}

pub fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Everything needed to answer once the choices run.
struct Job {
    kind: Kind,
    id: String,
    model: String,
    params: GenParams,
    logprobs: Option<usize>,
    deltas: mpsc::Receiver<Delta>,
    choices: usize,
}

fn check_length(state: &AppState, prompt: &[u32], params: &GenParams, what: &str) -> Result<(), ApiError> {
    let max = state.limits.max_model_len;
    if prompt.is_empty() {
        return Err(ApiError::param(what, "the prompt is empty"));
    }
    let want = prompt.len() + params.max_tokens.unwrap_or(1);
    if prompt.len() >= max || want > max {
        return Err(ApiError::param(
            what,
            format!(
                "This model's maximum context length is {max} tokens. However, you requested {want} tokens ({} in the prompt, {} for the completion).",
                prompt.len(),
                params.max_tokens.unwrap_or(1)
            ),
        ));
    }
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= state.model_cfg.vocab_size) {
        return Err(ApiError::param(what, format!("token id {t} is outside the vocabulary")));
    }
    Ok(())
}

async fn start(
    state: &Arc<AppState>,
    kind: Kind,
    model: Option<&str>,
    prompts: Vec<Vec<u32>>,
    params: GenParams,
    logprobs: Option<usize>,
) -> Result<Job, ApiError> {
    let (name, adapter) = resolve_model(state, model).await?;
    for p in &prompts {
        check_length(
            state,
            p,
            &params,
            if kind == Kind::Chat { "messages" } else { "prompt" },
        )?;
    }
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let n = params.n;
    let choices: Vec<Choice> = prompts
        .into_iter()
        .enumerate()
        .flat_map(|(i, p)| {
            (0..n).map(move |j| Choice {
                index: i * n + j,
                prompt: p.clone(),
            })
        })
        .collect();
    let total = choices.len();
    let id = request_id(kind);
    let deltas = spawn_choices(state, choices, adapter, &params, permit, &id);
    Ok(Job {
        kind,
        id,
        model: name,
        params,
        logprobs,
        deltas,
        choices: total,
    })
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        check_key(&state, &headers, false)?;
        let req: CompletionRequest = parse(&body)?;
        if req.echo {
            return Err(ApiError::param("echo", "echo is not supported"));
        }
        let logprobs = match req.logprobs {
            None => None,
            Some(n) if (0..=20).contains(&n) => Some(n as usize),
            Some(n) => {
                return Err(ApiError::param(
                    "logprobs",
                    format!("logprobs must be between 0 and 20, got {n}"),
                ))
            }
        };
        let params = req.common.params(None, logprobs)?;
        let mut ids = Vec::new();
        for p in prompts(&req.prompt)? {
            ids.push(match p {
                Prompt::Text(t) => state
                    .tokenizer
                    .encode(&t, true)
                    .map_err(|e| ApiError::Internal(e.to_string()))?,
                Prompt::Tokens(t) => t,
            });
        }
        start(
            &state,
            Kind::Completion,
            req.common.model.as_deref(),
            ids,
            params,
            logprobs,
        )
        .await
    }
    .await;
    respond(state, result).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        check_key(&state, &headers, false)?;
        let req: ChatRequest = parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        let logprobs = match (req.logprobs, req.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => return Err(ApiError::param("top_logprobs", "top_logprobs needs logprobs: true")),
            (true, None) => Some(0),
            (true, Some(n)) if (0..=20).contains(&n) => Some(n as usize),
            (true, Some(n)) => {
                return Err(ApiError::param(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, got {n}"),
                ))
            }
        };
        let params = req.common.params(req.max_completion_tokens, logprobs)?;
        let template = state
            .chat_template
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no chat template"))?;
        let text = template
            .render(&req.messages, req.add_generation_prompt, req.tools.as_ref())
            .map_err(|e| ApiError::param("messages", e.to_string()))?;
        let ids = state
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        start(
            &state,
            Kind::Chat,
            req.common.model.as_deref(),
            vec![ids],
            params,
            logprobs,
        )
        .await
    }
    .await;
    respond(state, result).await
}

async fn respond(state: Arc<AppState>, job: Result<Job, ApiError>) -> Response {
    match job {
        Err(e) => {
            state.metrics.rejected(e.status().as_u16());
            e.into_response()
        }
        Ok(job) if job.params.stream => stream(state, job).into_response(),
        Ok(job) => match collect(&state, job).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

fn token_text(state: &AppState, id: u32, as_ids: bool) -> String {
    if as_ids {
        format!("token_id:{id}")
    } else {
        state.tokenizer.decode(&[id], false).unwrap_or_default()
    }
}

/// Log-probabilities in each API's format.
fn logprobs_json(state: &AppState, kind: Kind, tokens: &[TokenInfo], as_ids: bool, offset: usize) -> Value {
    match kind {
        Kind::Chat => {
            let entry = |id: u32, lp: f32| {
                let t = token_text(state, id, as_ids);
                json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|t| {
                    let mut e = entry(t.id, t.logprob);
                    e["top_logprobs"] = Value::Array(t.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
                    e
                })
                .collect();
            json!({ "content": content })
        }
        Kind::Completion => {
            let texts: Vec<String> = tokens.iter().map(|t| token_text(state, t.id, as_ids)).collect();
            let mut offsets = Vec::new();
            let mut at = offset;
            for t in &texts {
                offsets.push(at);
                at += t.len();
            }
            json!({
                "tokens": texts,
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|&(id, lp)| (token_text(state, id, as_ids), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn collect(state: &AppState, mut job: Job) -> Result<Value, ApiError> {
    struct Acc {
        text: String,
        tokens: Vec<TokenInfo>,
        finish: Option<&'static str>,
    }
    let mut acc: Vec<Acc> = (0..job.choices)
        .map(|_| Acc {
            text: String::new(),
            tokens: Vec::new(),
            finish: None,
        })
        .collect();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut done = 0;
    while done < job.choices {
        match job.deltas.recv().await.ok_or(ApiError::Unavailable)? {
            Delta::Text { index, text, tokens } => {
                acc[index].text.push_str(&text);
                acc[index].tokens.extend(tokens);
            }
            Delta::Done {
                index,
                finish_reason,
                prompt_tokens: p,
                completion_tokens: c,
            } => {
                acc[index].finish = Some(finish_reason);
                // n samples of one prompt count its tokens once, as OpenAI does.
                if index % job.params.n == 0 {
                    prompt_tokens += p;
                }
                completion_tokens += c;
                done += 1;
            }
            Delta::Failed { error, .. } => return Err(error),
        }
    }
    let as_ids = job.params.token_ids_as_text;
    let choices: Vec<Value> = acc
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let lp = job.logprobs.map(|_| logprobs_json(state, job.kind, &a.tokens, as_ids, 0));
            match job.kind {
                Kind::Chat => json!({"index": i, "message": {"role": "assistant", "content": a.text}, "logprobs": lp, "finish_reason": a.finish}),
                Kind::Completion => json!({"index": i, "text": a.text, "logprobs": lp, "finish_reason": a.finish}),
            }
        })
        .collect();
    let object = if job.kind == Kind::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Ok(json!({
        "id": job.id, "object": object, "created": created(), "model": job.model, "choices": choices,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens},
    }))
}

/// SSE: one `data:` frame per delta, then (if asked) a usage frame, then `data: [DONE]`.
fn stream(state: Arc<AppState>, job: Job) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct S {
        state: Arc<AppState>,
        job: Job,
        id: String,
        created: u64,
        done: usize,
        prompt_tokens: usize,
        completion_tokens: usize,
        offsets: Vec<usize>,
        sent_role: Vec<bool>,
        finished: bool,
    }
    let init = S {
        id: job.id.clone(),
        created: created(),
        offsets: vec![0; job.choices],
        sent_role: vec![false; job.choices],
        state,
        job,
        done: 0,
        prompt_tokens: 0,
        completion_tokens: 0,
        finished: false,
    };
    let frames = stream::unfold(init, |mut s| async move {
        if s.finished {
            return None;
        }
        let object = if s.job.kind == Kind::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let chunk = |s: &S, choices: Value, usage: Value| json!({"id": s.id, "object": object, "created": s.created, "model": s.job.model, "choices": choices, "usage": usage});
        if s.done == s.job.choices {
            s.finished = true;
            let mut frames = Vec::new();
            if s.job.params.include_usage {
                let usage = json!({"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens, "total_tokens": s.prompt_tokens + s.completion_tokens});
                frames.push(chunk(&s, json!([]), usage).to_string());
            }
            frames.push("[DONE]".to_string());
            return Some((frames, s));
        }
        let frame = match s.job.deltas.recv().await {
            None => {
                s.finished = true;
                json!({"error": ApiError::Unavailable.body()["error"]}).to_string()
            }
            Some(Delta::Failed { error, .. }) => {
                s.finished = true;
                json!({"error": error.body()["error"]}).to_string()
            }
            Some(Delta::Text { text, .. }) if text.is_empty() && s.job.logprobs.is_none() => {
                // Held-back bytes (an incomplete character or stop string): nothing to send yet.
                return Some((vec![], s));
            }
            Some(Delta::Text { index, text, tokens }) => {
                let lp = s.job.logprobs.map(|_| {
                    logprobs_json(
                        &s.state,
                        s.job.kind,
                        &tokens,
                        s.job.params.token_ids_as_text,
                        s.offsets[index],
                    )
                });
                s.offsets[index] += text.len();
                let choice = match s.job.kind {
                    Kind::Chat => {
                        let mut delta = json!({"content": text});
                        if !s.sent_role[index] {
                            delta["role"] = json!("assistant");
                            s.sent_role[index] = true;
                        }
                        json!({"index": index, "delta": delta, "logprobs": lp, "finish_reason": null})
                    }
                    Kind::Completion => json!({"index": index, "text": text, "logprobs": lp, "finish_reason": null}),
                };
                chunk(&s, json!([choice]), Value::Null).to_string()
            }
            Some(Delta::Done {
                index,
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                s.done += 1;
                if index % s.job.params.n == 0 {
                    s.prompt_tokens += prompt_tokens;
                }
                s.completion_tokens += completion_tokens;
                let choice = match s.job.kind {
                    Kind::Chat => {
                        json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason})
                    }
                    Kind::Completion => {
                        json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason})
                    }
                };
                chunk(&s, json!([choice]), Value::Null).to_string()
            }
        };
        Some((vec![frame], s))
    });
    let events = futures_util::StreamExt::flat_map(frames, |frames| {
        stream::iter(frames.into_iter().map(|f| Ok(SseEvent::default().data(f))))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

//! `/v1/completions` and `/v1/chat/completions`: typed body (prompt count and size capped) →
//! admission (one permit per choice) → tokens (on a bounded blocking pool) → the engine's
//! validator → one engine request for all choices → `respond`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use quiver_engine::{Event, ValidRequest, ValidationError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, TryAcquireError};
use tracing::Instrument;

use crate::error::ApiError;
use crate::extract::{check_key, Access};
use crate::models::resolve_model;
use crate::openai::request::{parse_chat, parse_completion, Format, PromptInput, Settings};
use crate::respond::respond;
use crate::state::AppState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

impl Kind {
    /// What the API calls the prompt, for errors about it.
    fn prompt_param(self) -> &'static str {
        match self {
            Kind::Completion => "prompt",
            Kind::Chat => "messages",
        }
    }
}

fn request_id(kind: Kind) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!(
        "{prefix}-{:016x}",
        NEXT.fetch_add(1, Ordering::Relaxed) ^ 0x5eed_0000_0000
    )
}

/// A request the engine is running: what `respond` needs to answer it.
pub struct Job {
    pub kind: Kind,
    pub id: String,
    /// The name to echo in `model`.
    pub model: String,
    pub request: Arc<ValidRequest>,
    pub format: Format,
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Prompts × n.
    pub choices: usize,
    /// Held until the response is complete (admission control, and drain on shutdown).
    pub _permit: OwnedSemaphorePermit,
}

/// The engine validator's refusal as a 400, naming the chat API's `messages` for the prompt.
fn refused(kind: Kind, e: ValidationError) -> ApiError {
    let param = if e.param == "prompt" {
        kind.prompt_param()
    } else {
        e.param
    };
    ApiError::param(param, e.message)
}

/// Admission, before any template or tokenizer work: one permit per choice (prompts × `n`).
/// A request larger than the whole semaphore is a 400; one that does not fit now, a 429.
fn admit(state: &AppState, kind: Kind, prompts: usize, n: usize) -> Result<OwnedSemaphorePermit, ApiError> {
    let choices = state
        .engine
        .validator()
        .choices(prompts, n)
        .map_err(|e| refused(kind, e))?;
    let cap = state.limits.max_concurrent;
    let permits = u32::try_from(choices)
        .ok()
        .filter(|&c| c as usize <= cap)
        .ok_or_else(|| {
            let param = if n > 1 { "n" } else { kind.prompt_param() };
            ApiError::param(
                param,
                format!("this request has {choices} choices (prompts × n); the server admits at most {cap} at once"),
            )
        })?;
    state
        .admission
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|e| match e {
            TryAcquireError::NoPermits => ApiError::Overloaded,
            TryAcquireError::Closed => ApiError::Unavailable,
        })
}

/// Runs templating and tokenization on the blocking pool, off the async workers, at most one
/// job per core at once (`AppState::tokenizer_slots`). The slot is held until the job ends,
/// even if its client has gone.
async fn tokenize<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let slot = state
        .tokenizer_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Unavailable)?;
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        f()
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// Completions' text prompts → token ids (with the tokenizer's special tokens, e.g. BOS).
async fn encode(state: &AppState, texts: Vec<String>) -> Result<Vec<Vec<u32>>, ApiError> {
    let tokenizer = state.tokenizer.clone();
    tokenize(state, move || {
        texts
            .iter()
            .map(|t| tokenizer.encode(t, true).map_err(|e| ApiError::Internal(e.to_string())))
            .collect()
    })
    .await
}

/// Validates the tokenized request and hands it to the engine.
async fn start(
    state: &Arc<AppState>,
    kind: Kind,
    model: (String, Option<String>),
    prompts: Vec<Vec<u32>>,
    settings: Settings,
    permit: OwnedSemaphorePermit,
) -> Result<Job, ApiError> {
    let (name, adapter) = model;
    let Settings { mut request, format } = settings;
    request.prompts = prompts;
    request.adapter = adapter;
    let request = Arc::new(state.engine.validate(request).map_err(|e| refused(kind, e))?);
    let choices = request.num_choices();
    let events = state.engine.submit(request.clone())?;
    Ok(Job {
        kind,
        id: request_id(kind),
        model: name,
        request,
        format,
        events,
        choices,
        _permit: permit,
    })
}

pub async fn completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let job = async {
        check_key(&state, &headers, Access::Client)?;
        let req = parse_completion(&body)?;
        let settings = req.settings(&state.limits.input)?;
        let permit = admit(&state, Kind::Completion, req.num_prompts(), settings.request.n)?;
        let model = resolve_model(&state, req.common.model.as_deref()).await?;
        let prompts = match req.prompt {
            PromptInput::Tokens(ids) => vec![ids],
            PromptInput::TokenLists(lists) => lists,
            PromptInput::Text(t) => encode(&state, vec![t]).await?,
            PromptInput::Texts(ts) => encode(&state, ts).await?,
        };
        start(&state, Kind::Completion, model, prompts, settings, permit).await
    }
    .instrument(tracing::info_span!("completions"))
    .await;
    respond(state, job).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let job = async {
        check_key(&state, &headers, Access::Client)?;
        let req = parse_chat(&body)?;
        let settings = req.settings(&state.limits.input)?;
        let permit = admit(&state, Kind::Chat, 1, settings.request.n)?;
        let model = resolve_model(&state, req.common.model.as_deref()).await?;
        let tools = req.template_tools();
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
        let messages = req.messages;
        let st = state.clone();
        let ids = tokenize(&state, move || {
            let template = st
                .chat_template
                .as_ref()
                .ok_or_else(|| ApiError::bad("this model has no chat template"))?;
            let text = template
                .render(&messages, add_generation_prompt, tools.as_ref())
                .map_err(|e| ApiError::param("messages", e.to_string()))?;
            st.tokenizer
                .encode(&text, false)
                .map_err(|e| ApiError::Internal(e.to_string()))
        })
        .await?;
        start(&state, Kind::Chat, model, vec![ids], settings, permit).await
    }
    .instrument(tracing::info_span!("chat_completions"))
    .await;
    respond(state, job).await
}

//! `/v1/completions` and `/v1/chat/completions`: typed body → tokens (on the blocking pool) →
//! the engine's validator → one engine request for all choices → `respond`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use quiver_engine::{Event, ValidRequest};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
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

/// Runs CPU-bound request preparation (templates, tokenization) off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ApiError> + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn start(
    state: &Arc<AppState>,
    kind: Kind,
    model: Option<&str>,
    prompts: Vec<Vec<u32>>,
    settings: Settings,
) -> Result<Job, ApiError> {
    let (name, adapter) = resolve_model(state, model).await?;
    let Settings { mut request, format } = settings;
    request.prompts = prompts;
    request.adapter = adapter;
    let valid = state.engine.validate(request).map_err(|e| {
        let param = if e.param == "prompt" {
            kind.prompt_param()
        } else {
            e.param
        };
        ApiError::param(param, e.message)
    })?;
    let request = Arc::new(valid);
    let choices = request.num_choices();
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
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
        let settings = req.settings()?;
        let tokenizer = state.tokenizer.clone();
        let prompt = req.prompt;
        let prompts = blocking(move || {
            let encode = |t: &str| tokenizer.encode(t, true).map_err(|e| ApiError::Internal(e.to_string()));
            match prompt {
                PromptInput::Text(t) => Ok(vec![encode(&t)?]),
                PromptInput::Texts(ts) => ts.iter().map(|t| encode(t)).collect(),
                PromptInput::Tokens(ids) => Ok(vec![ids]),
                PromptInput::TokenLists(lists) => Ok(lists),
            }
        })
        .await?;
        start(&state, Kind::Completion, req.common.model.as_deref(), prompts, settings).await
    }
    .instrument(tracing::info_span!("completions"))
    .await;
    respond(state, job).await
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let job = async {
        check_key(&state, &headers, Access::Client)?;
        let req = parse_chat(&body)?;
        let settings = req.settings()?;
        let tools = req.template_tools();
        let add_generation_prompt = req.add_generation_prompt.unwrap_or(true);
        let model = req.common.model.clone();
        let messages = req.messages;
        let st = state.clone();
        let ids = blocking(move || {
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
        start(&state, Kind::Chat, model.as_deref(), vec![ids], settings).await
    }
    .instrument(tracing::info_span!("chat_completions"))
    .await;
    respond(state, job).await
}

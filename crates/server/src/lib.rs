//! The OpenAI-compatible HTTP server: hyper connections (`connections.rs`) into axum routes on
//! tokio for I/O, request parsing and tokenization; validation, scheduling, tensor work and every
//! ending on the engine's side. See docs/ARCHITECTURE.md.

pub mod admin;
pub mod body;
pub mod connections;
pub mod device;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod respond;
pub mod routes;
pub mod startup;
pub mod state;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

pub use connections::{serve, ConnectionLimits};
pub use device::Device;
pub use error::ApiError;
pub use startup::{build_state, ServerOptions};
pub use state::{AppState, Limits};

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/models", get(admin::models))
        .route("/v1/load_lora_adapter", post(admin::load_lora_adapter))
        .route("/v1/unload_lora_adapter", post(admin::unload_lora_adapter))
        .route("/v1/lora_adapters", get(admin::lora_adapters))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        // After the routes: it applies to the routes added before it.
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::no_such_route)
        // The body was read whole (and checked) by `read_whole_body`; this only lifts axum's
        // default limit of 2 MB for the handlers' `Bytes`.
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body::read_whole_body,
        ))
        .with_state(state)
}

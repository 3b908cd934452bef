//! The OpenAI-compatible HTTP server: axum on tokio for I/O, request parsing and tokenization;
//! validation, scheduling, tensor work and every ending on the engine's side. See
//! docs/ARCHITECTURE.md.

pub mod admin;
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

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

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
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves until `shutdown` resolves, then drains: no new requests (503), running ones finish.
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let drain_state = state.clone();
    let app = router(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            drain_state.draining.store(true, Ordering::Relaxed);
            tracing::info!("draining: refusing new requests, finishing running ones");
        })
        .await?;
    // Wait for in-flight generations (each holds an admission permit).
    let _ = state.admission.acquire_many(state.limits.max_concurrent as u32).await;
    Ok(())
}

//! Every request's body is read whole before routing, within `--max-body-bytes` and
//! `--http-body-read-timeout`: a body that is too large, too slow or malformed is answered here in
//! OpenAI's error format, and handlers take bytes that are already in memory.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};

use crate::error::{body_read_error, body_timeout, body_too_large, ApiError};
use crate::state::AppState;

/// The middleware (`axum::middleware::from_fn_with_state`).
pub async fn read_whole_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limits = &state.limits;
    match read(body, limits.max_body_bytes, limits.connections.body_read_timeout).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(e) => {
            state.metrics.rejected(e.status().as_u16());
            e.into_response()
        }
    }
}

async fn read(body: Body, max: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    // A Content-Length over the limit is refused before a byte of the body is read.
    if body.size_hint().lower() > max as u64 {
        return Err(body_too_large(max));
    }
    let collected = tokio::time::timeout(timeout, Limited::new(body, max).collect())
        .await
        .map_err(|_| body_timeout(timeout))?;
    collected.map(|c| c.to_bytes()).map_err(|e| body_read_error(e, max))
}

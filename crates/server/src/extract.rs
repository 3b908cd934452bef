//! What every handler does first: the API key check. Request bodies are parsed by their typed
//! module (`openai::request`, `admin`); this module has no handlers, so nothing imports back.

use axum::http::{header, HeaderMap};

use crate::error::ApiError;
use crate::state::AppState;

/// Which key an endpoint wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The API key, when one is set.
    Client,
    /// The admin key when one is set, else the API key.
    Admin,
}

/// Checks `Authorization: Bearer <key>` against the key `access` wants.
pub fn check_key(state: &AppState, headers: &HeaderMap, access: Access) -> Result<(), ApiError> {
    let want = match access {
        Access::Admin => state.admin_key.as_ref().or(state.api_key.as_ref()),
        Access::Client => state.api_key.as_ref(),
    };
    let Some(want) = want else { return Ok(()) };
    let got = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison: do not leak the key's prefix through timing.
    let ok = got.is_some_and(|g| {
        g.len() == want.len() && g.bytes().zip(want.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Parses a small JSON body (admin endpoints) into `T`.
pub fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

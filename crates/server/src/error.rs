//! Every error a client can see, mapped in one place to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`.

use std::time::Duration;

use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::BoxError;
use http_body_util::LengthLimitError;
use quiver_engine::{EngineError, ValidationError};
use thiserror::Error;

use crate::openai::response::{ErrorBody, ErrorDetail};

#[derive(Debug, Clone, Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request body did not arrive within `--http-body-read-timeout`.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("the server is at capacity; retry later")]
    Overloaded,
    #[error("the server is shutting down")]
    Unavailable,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<&str>, Option<&'static str>) {
        match self {
            ApiError::BadRequest { param, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request_error", param.as_deref(), None)
            }
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                None,
                Some("invalid_api_key"),
            ),
            ApiError::ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model"),
                Some("model_not_found"),
            ),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", None, Some("not_found")),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", None, None),
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                None,
                Some("method_not_allowed"),
            ),
            ApiError::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                Some("request_timeout"),
            ),
            ApiError::Overloaded => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                Some("overloaded"),
            ),
            ApiError::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                None,
                Some("shutting_down"),
            ),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None, None),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    pub fn body(&self) -> ErrorBody {
        let (_, kind, param, code) = self.parts();
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param: param.map(str::to_string),
                code,
            },
        }
    }
}

/// The router's fallback: no route has this path.
pub async fn no_such_route(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such route: {}", uri.path()))
}

/// The router's fallback for a known path asked with a method it does not serve (axum still
/// adds the `Allow` header).
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}

/// Why a request body could not be read whole: too large, or broken (a malformed chunked
/// encoding, a client that went away mid-body).
pub fn body_read_error(e: BoxError, max_body_bytes: usize) -> ApiError {
    if e.is::<LengthLimitError>() {
        body_too_large(max_body_bytes)
    } else {
        ApiError::bad(format!("could not read the request body: {e}"))
    }
}

pub fn body_too_large(max_body_bytes: usize) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "the request body is larger than the server's limit of {max_body_bytes} bytes (--max-body-bytes)"
    ))
}

pub fn body_timeout(timeout: Duration) -> ApiError {
    ApiError::RequestTimeout(format!(
        "the request body did not arrive within {} s (--http-body-read-timeout)",
        timeout.as_secs_f64()
    ))
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::param(e.param, e.message)
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::TooLarge(m) | EngineError::Invalid(m) => ApiError::bad(m),
            EngineError::UnknownAdapter(name) => ApiError::ModelNotFound(name),
            EngineError::AdapterExists(name) => {
                ApiError::bad(format!("The lora adapter '{name}' has already been loaded."))
            }
            e @ EngineError::AdapterLoad { .. } => ApiError::bad(e.to_string()),
            EngineError::Stopped => ApiError::Unavailable,
            EngineError::Model(m) => ApiError::Internal(m),
        }
    }
}

/// `Retry-After` on a 429: admission frees as soon as any running choice ends, so a second is
/// enough for a well-behaved client to come back without hammering.
const RETRY_AFTER_SECS: &str = "1";

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
        }
        response
    }
}

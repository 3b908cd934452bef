//! Every error a client can see, mapped in one place to an HTTP status and OpenAI's error body
//! `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Internal(_)) {
            tracing::error!(error = %self, "internal error");
        }
        (self.status(), axum::Json(self.body())).into_response()
    }
}

use thiserror::Error;

#[derive(Debug, Clone, Error, PartialEq)]
pub enum EngineError {
    /// The request can never run (too long for the model or for the whole KV budget).
    #[error("{0}")]
    TooLarge(String),
    #[error("adapter `{0}` is not registered")]
    UnknownAdapter(String),
    #[error("adapter `{name}` failed to load: {reason}")]
    AdapterLoad { name: String, reason: String },
    #[error("adapter `{0}` is already registered")]
    AdapterExists(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
    #[error("model error: {0}")]
    Model(String),
}

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    /// A config field that Quiver cannot serve; names the field so the user knows what to change.
    #[error("config.json: unsupported `{field}`: {reason}")]
    Unsupported { field: String, reason: String },
    #[error("config.json: missing or invalid `{field}`: {reason}")]
    Config { field: String, reason: String },
    #[error("weights: {0}")]
    Weights(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Tensor(#[from] quiver_tensor::TensorError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|source| ModelError::Json {
        path: path.to_owned(),
        source,
    })
}

use thiserror::Error;

/// Every refusal names the adapter, the field or tensor at fault, and why.
#[derive(Debug, Error)]
pub enum AdapterError {
    #[error("adapter `{adapter}`: {path}: {reason}")]
    Io {
        adapter: String,
        path: String,
        reason: String,
    },
    #[error("adapter `{adapter}`: adapter_config.json `{field}`: {reason}")]
    Config {
        adapter: String,
        field: String,
        reason: String,
    },
    #[error("adapter `{adapter}`: tensor `{tensor}`: {reason}")]
    Tensor {
        adapter: String,
        tensor: String,
        reason: String,
    },
    #[error("adapter `{adapter}`: {reason}")]
    Other { adapter: String, reason: String },
}

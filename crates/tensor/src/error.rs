use thiserror::Error;

#[derive(Debug, Error)]
pub enum TensorError {
    #[error("shape mismatch in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("unsupported dtype {dtype} for {what}")]
    DType { dtype: String, what: String },
    #[error("out of range: {0}")]
    Range(String),
    /// A weight that the chosen quantization format cannot represent.
    #[error("cannot quantize: {0}")]
    Quantize(String),
    /// A device (driver, compiler, library or memory) failure, with its context.
    #[error("device error: {0}")]
    Device(String),
}

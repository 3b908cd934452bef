//! Tensor storage (weights kept in their file dtype), the [`Backend`] trait the model is written
//! against, and the CPU backend whose kernels are both the default path and the test oracle.

pub mod backend;
pub mod cpu;
pub mod error;
pub mod quant;
pub mod storage;

pub use backend::{AttentionBatch, Backend, KvLayout, LoraModule, LoraPlan, LoraSegment, LoraSlot, RopeTable};
pub use error::TensorError;
pub use quant::QuantFormat;
pub use storage::{DType, Matrix, MatrixData, TypedSlice};

//! Weight storage. Tensors stay in the dtype the file holds (bf16/f16/f32) and are read straight
//! from the memory map when alignment allows; kernels widen to f32 as they load.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::cpu::Weight;
use crate::error::TensorError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}

/// Bytes that outlive the tensors pointing into them (a memory-mapped file, usually).
pub type SharedBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A typed, read-only view: either a region of shared bytes (zero-copy) or an owned vector
/// (used when the region is misaligned for `T`, or for tensors built in memory).
#[derive(Clone)]
pub enum TypedSlice<T: bytemuck::Pod> {
    Mapped {
        bytes: SharedBytes,
        offset: usize,
        len: usize,
        _t: std::marker::PhantomData<T>,
    },
    Owned(Arc<Vec<T>>),
}

impl<T: bytemuck::Pod> TypedSlice<T> {
    /// View `len` elements of `T` starting at byte `offset` of `bytes`; copies if misaligned.
    pub fn from_bytes(bytes: SharedBytes, offset: usize, len: usize) -> Result<Self, TensorError> {
        let size = std::mem::size_of::<T>();
        let region = (*bytes)
            .as_ref()
            .get(offset..offset + len * size)
            .ok_or_else(|| TensorError::Range(format!("{len} elements at byte {offset}")))?;
        if (region.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            Ok(TypedSlice::Mapped {
                bytes,
                offset,
                len,
                _t: std::marker::PhantomData,
            })
        } else {
            Ok(TypedSlice::Owned(Arc::new(bytemuck::pod_collect_to_vec(region))))
        }
    }

    pub fn from_vec(v: Vec<T>) -> Self {
        TypedSlice::Owned(Arc::new(v))
    }

    pub fn as_slice(&self) -> &[T] {
        match self {
            TypedSlice::Mapped { bytes, offset, len, .. } => {
                let size = std::mem::size_of::<T>();
                // Alignment and bounds were checked in `from_bytes`.
                bytemuck::cast_slice(&(**bytes).as_ref()[*offset..*offset + *len * size])
            }
            TypedSlice::Owned(v) => v.as_slice(),
        }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for TypedSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

#[derive(Clone)]
pub enum MatrixData {
    F32(TypedSlice<f32>),
    F16(TypedSlice<f16>),
    BF16(TypedSlice<bf16>),
}

/// A row-major `[rows, cols]` weight matrix; a linear layer computes `y = x · Wᵀ`, so `rows` is
/// the output features and `cols` the input features (PyTorch's layout).
#[derive(Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: MatrixData,
}

impl Matrix {
    pub fn new(rows: usize, cols: usize, data: MatrixData) -> Result<Self, TensorError> {
        let len = match &data {
            MatrixData::F32(s) => s.len(),
            MatrixData::F16(s) => s.len(),
            MatrixData::BF16(s) => s.len(),
        };
        if len != rows * cols {
            return Err(TensorError::Shape {
                op: "Matrix::new",
                detail: format!("{len} elements for [{rows}, {cols}]"),
            });
        }
        Ok(Matrix { rows, cols, data })
    }

    pub fn from_f32(rows: usize, cols: usize, v: Vec<f32>) -> Result<Self, TensorError> {
        Self::new(rows, cols, MatrixData::F32(TypedSlice::from_vec(v)))
    }

    /// f32 values stored as `dtype` (rounded to nearest for the half types).
    pub fn from_f32_as(dtype: DType, rows: usize, cols: usize, v: Vec<f32>) -> Result<Self, TensorError> {
        let data = match dtype {
            DType::F32 => MatrixData::F32(TypedSlice::from_vec(v)),
            DType::F16 => MatrixData::F16(TypedSlice::from_vec(v.iter().map(|&x| f16::from_f32(x)).collect())),
            DType::BF16 => MatrixData::BF16(TypedSlice::from_vec(v.iter().map(|&x| bf16::from_f32(x)).collect())),
        };
        Self::new(rows, cols, data)
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            MatrixData::F32(_) => DType::F32,
            MatrixData::F16(_) => DType::F16,
            MatrixData::BF16(_) => DType::BF16,
        }
    }

    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype().size()
    }

    /// Row `r` widened to f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            MatrixData::F32(s) => out.copy_from_slice(&s[r * c..(r + 1) * c]),
            MatrixData::F16(s) => widen_scalar(&s[r * c..(r + 1) * c], out),
            MatrixData::BF16(s) => widen_scalar(&s[r * c..(r + 1) * c], out),
        }
    }

    /// The whole matrix widened to f32 (tests, one-off conversions).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for r in 0..self.rows {
            self.row_f32(r, &mut out[r * self.cols..(r + 1) * self.cols]);
        }
        out
    }
}

/// `out[i] = src[i]` widened by the kernels' own [`Weight::to_f32`], one element at a time
/// (embedding rows and the matmul reference need no SIMD).
fn widen_scalar<T: Weight>(src: &[T], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(src) {
        *o = v.to_f32();
    }
}

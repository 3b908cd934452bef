//! Weight storage. Tensors stay in the dtype the file holds (bf16/f16/f32) and are read straight
//! from the memory map when alignment allows; kernels widen to f32 as they load. Block-quantized
//! matrices (`--quantization`) are [`MatrixData::Quant`], laid out as [`crate::quant`] describes.

use std::fmt;
use std::sync::Arc;

use half::{bf16, f16};

use crate::cpu::Weight;
use crate::error::TensorError;
use crate::quant::{QuantData, QuantFormat};

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
        /// `bytes` is a read-only file mapping, whose pages may be dropped from this process and
        /// are read back from the file if touched again (see [`TypedSlice::release_file_pages`]).
        file: bool,
        _t: std::marker::PhantomData<T>,
    },
    Owned(Arc<Vec<T>>),
}

impl<T: bytemuck::Pod> TypedSlice<T> {
    /// View `len` elements of `T` starting at byte `offset` of `bytes`; copies if misaligned.
    pub fn from_bytes(bytes: SharedBytes, offset: usize, len: usize) -> Result<Self, TensorError> {
        Self::view(bytes, offset, len, false)
    }

    /// [`from_bytes`](Self::from_bytes) for a read-only memory map of a file: once a copy of the
    /// data exists, [`release_file_pages`](Self::release_file_pages) may drop the mapped pages.
    pub fn from_file_bytes(bytes: SharedBytes, offset: usize, len: usize) -> Result<Self, TensorError> {
        Self::view(bytes, offset, len, true)
    }

    fn view(bytes: SharedBytes, offset: usize, len: usize, file: bool) -> Result<Self, TensorError> {
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
                file,
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

    /// Drops this process's mapping of the file pages that lie wholly inside this slice (a
    /// region of a file mapping only; anything else is left alone), so that after the data has
    /// been copied or quantized, RSS counts the weights once. The pages stay in the page cache
    /// as clean cache, and reading the slice again faults them back in from the file, so this
    /// never changes what the slice holds. Returns the bytes released.
    pub fn release_file_pages(&self) -> usize {
        let TypedSlice::Mapped { file: true, .. } = self else {
            return 0;
        };
        let bytes: &[u8] = bytemuck::cast_slice(self.as_slice());
        release_pages(bytes)
    }
}

/// `madvise(MADV_DONTNEED)` on the pages wholly inside `bytes`, which must lie in a read-only
/// file mapping (see [`TypedSlice::release_file_pages`]).
#[cfg(unix)]
fn release_pages(bytes: &[u8]) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        p if p > 0 => p as usize,
        _ => return 0,
    };
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end <= start {
        return 0;
    }
    // SAFETY: [start, end) is page-aligned and inside `bytes`, a region of a read-only shared
    // file mapping that stays mapped (the slice holds it). MADV_DONTNEED on such a mapping only
    // unmaps the pages from this process; a later read faults them in again from the file, so
    // no reference into the region ever sees different data.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if rc == 0 {
        end - start
    } else {
        0
    }
}

#[cfg(not(unix))]
fn release_pages(_bytes: &[u8]) -> usize {
    0
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
    /// Block-quantized (int8/int4 codes, f16 scales), in panels of 16 rows.
    Quant(QuantData),
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
            MatrixData::Quant(q) => {
                q.check(rows, cols)?;
                rows * cols
            }
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

    /// The storage dtype; for a quantized matrix, the dtype it was quantized from.
    pub fn dtype(&self) -> DType {
        match &self.data {
            MatrixData::F32(_) => DType::F32,
            MatrixData::F16(_) => DType::F16,
            MatrixData::BF16(_) => DType::BF16,
            MatrixData::Quant(q) => q.source,
        }
    }

    /// The block format of a quantized matrix.
    pub fn quant_format(&self) -> Option<QuantFormat> {
        match &self.data {
            MatrixData::Quant(q) => Some(q.format),
            _ => None,
        }
    }

    /// Bytes of storage (for a quantized matrix: codes and scales, padding included).
    pub fn bytes(&self) -> usize {
        match &self.data {
            MatrixData::Quant(q) => q.bytes(),
            _ => self.rows * self.cols * self.dtype().size(),
        }
    }

    /// `[rows, cols]` f32 values stored as this matrix is: in its dtype, or quantized again in its
    /// format (merging an adapter into a base).
    pub fn from_f32_like(&self, rows: usize, cols: usize, v: Vec<f32>) -> Result<Self, TensorError> {
        match &self.data {
            MatrixData::Quant(q) => {
                let m = Self::from_f32(rows, cols, v)?;
                let mut out = crate::quant::quantize(&m, q.format)?;
                if let MatrixData::Quant(d) = &mut out.data {
                    d.source = q.source;
                }
                Ok(out)
            }
            _ => Self::from_f32_as(self.dtype(), rows, cols, v),
        }
    }

    /// See [`TypedSlice::release_file_pages`]; a quantized matrix owns its memory (0).
    pub fn release_file_pages(&self) -> usize {
        match &self.data {
            MatrixData::F32(s) => s.release_file_pages(),
            MatrixData::F16(s) => s.release_file_pages(),
            MatrixData::BF16(s) => s.release_file_pages(),
            MatrixData::Quant(_) => 0,
        }
    }

    /// Row `r` widened to f32 (embedding lookup).
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let c = self.cols;
        match &self.data {
            MatrixData::F32(s) => out.copy_from_slice(&s[r * c..(r + 1) * c]),
            MatrixData::F16(s) => widen_scalar(&s[r * c..(r + 1) * c], out),
            MatrixData::BF16(s) => widen_scalar(&s[r * c..(r + 1) * c], out),
            MatrixData::Quant(q) => q.row_f32(r, out),
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

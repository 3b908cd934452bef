//! Memory-mapped safetensors, single-file or sharded (`model.safetensors.index.json`). Tensors are
//! handed out as views into the maps, in the dtype the file stores.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use quiver_tensor::storage::SharedBytes;
use quiver_tensor::{DType, Matrix, MatrixData, TypedSlice};
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::error::{read_json, ModelError, Result};

/// How a tensor is stored: a float dtype, or int32 (the packed codes of GPTQ/AWQ checkpoints).
#[derive(Clone, Copy, PartialEq)]
enum Stored {
    Float(DType),
    I32,
}

struct Entry {
    file: usize,
    dtype: Stored,
    shape: Vec<usize>,
    offset: usize,
}

/// Every tensor of a checkpoint, by name.
pub struct WeightStore {
    files: Vec<SharedBytes>,
    entries: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

fn werr(msg: impl Into<String>) -> ModelError {
    ModelError::Weights(msg.into())
}

struct MappedFile(memmap2::Mmap);

impl AsRef<[u8]> for MappedFile {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn map_file(path: &Path) -> Result<SharedBytes> {
    let file = File::open(path).map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    // SAFETY: the map is read-only; like every inference server we assume checkpoint files are
    // not modified while being served (a truncation would fault, not corrupt memory safety
    // guarantees of the data we already validated).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ModelError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(Arc::new(MappedFile(map)))
}

impl WeightStore {
    /// Opens `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.exists() {
            let idx: ShardIndex = read_json(&index)?;
            let names: BTreeSet<&String> = idx.weight_map.values().collect();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else if dir.join("model.safetensors").exists() {
            vec![dir.join("model.safetensors")]
        } else {
            return Err(werr(format!(
                "{}: no model.safetensors or model.safetensors.index.json",
                dir.display()
            )));
        };
        Self::open_files(&paths)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut store = WeightStore {
            files: Vec::new(),
            entries: HashMap::new(),
        };
        for path in paths {
            let bytes = map_file(path)?;
            let data: &[u8] = (*bytes).as_ref();
            let st = SafeTensors::deserialize(data).map_err(|e| werr(format!("{}: {e}", path.display())))?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => Stored::Float(DType::F32),
                    Dtype::F16 => Stored::Float(DType::F16),
                    Dtype::BF16 => Stored::Float(DType::BF16),
                    Dtype::I32 => Stored::I32,
                    other => {
                        return Err(werr(format!(
                            "{}: tensor `{name}` has dtype {other:?} (supported: f32, f16, bf16; i32 for packed codes)",
                            path.display()
                        )))
                    }
                };
                let offset = view.data().as_ptr() as usize - data.as_ptr() as usize;
                let entry = Entry {
                    file: store.files.len(),
                    dtype,
                    shape: view.shape().to_vec(),
                    offset,
                };
                if store.entries.insert(name.clone(), entry).is_some() {
                    return Err(werr(format!("tensor `{name}` appears in more than one shard")));
                }
            }
            store.files.push(bytes);
        }
        Ok(store)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| werr(format!("missing tensor `{name}`")))?;
        if e.shape != shape {
            return Err(werr(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                e.shape
            )));
        }
        Ok(e)
    }

    fn data(&self, name: &str, shape: &[usize]) -> Result<MatrixData> {
        let e = self.entry(name, shape)?;
        let (bytes, len) = (self.files[e.file].clone(), shape.iter().product());
        Ok(match e.dtype {
            Stored::Float(DType::F32) => MatrixData::F32(TypedSlice::<f32>::from_file_bytes(bytes, e.offset, len)?),
            Stored::Float(DType::F16) => MatrixData::F16(TypedSlice::<f16>::from_file_bytes(bytes, e.offset, len)?),
            Stored::Float(DType::BF16) => MatrixData::BF16(TypedSlice::<bf16>::from_file_bytes(bytes, e.offset, len)?),
            Stored::I32 => return Err(werr(format!("tensor `{name}` is int32, expected a float tensor"))),
        })
    }

    /// An int32 tensor of `shape` (little-endian, as safetensors stores it), copied.
    pub fn i32s(&self, name: &str, shape: &[usize]) -> Result<Vec<i32>> {
        let e = self.entry(name, shape)?;
        if e.dtype != Stored::I32 {
            return Err(werr(format!("tensor `{name}` must be int32")));
        }
        let len: usize = shape.iter().product();
        let data: &[u8] = (*self.files[e.file]).as_ref();
        let raw = &data[e.offset..e.offset + 4 * len];
        Ok(raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// An f16 tensor of `shape`, copied (scales of packed codes must be f16 to stay exact).
    pub fn f16s(&self, name: &str, shape: &[usize]) -> Result<Vec<f16>> {
        match self.data(name, shape)? {
            MatrixData::F16(s) => Ok(s.as_slice().to_vec()),
            _ => Err(werr(format!("tensor `{name}` must be f16"))),
        }
    }

    /// A 2-D tensor `[rows, cols]`, zero-copy when aligned.
    pub fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix::new(rows, cols, self.data(name, &[rows, cols])?)?)
    }

    /// A 1-D tensor widened to f32 (norm weights, biases).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        Ok(Matrix::new(1, len, self.data(name, &[len])?)?.to_f32_vec())
    }

    /// Dtype of a tensor, if present.
    pub fn dtype(&self, name: &str) -> Option<DType> {
        self.entries.get(name).and_then(|e| match e.dtype {
            Stored::Float(d) => Some(d),
            Stored::I32 => None,
        })
    }
}

//! Device storage that commits memory on first use: a pool of `units` fixed-size units (KV
//! blocks, adapter pages) is a table of chunk pointers, and a chunk is allocated the first time
//! one of its units is written. The engine sizes the KV pool and the page pool each for the whole
//! memory budget and lets the budget decide the split at run time; committing lazily keeps the
//! untouched part of each pool free, as the OS does for the CPU backend's pools.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use quiver_tensor::TensorError;

use crate::error::dev;

/// Chunks aim at this size: big enough that the table stays short, small enough that a pool
/// touched in one place commits little.
pub const CHUNK_BYTES: usize = 32 << 20;

/// Units per chunk for units of `unit_bytes`.
pub fn units_per_chunk(unit_bytes: usize) -> u32 {
    (CHUNK_BYTES / unit_bytes.max(1)).clamp(1, u32::MAX as usize) as u32
}

/// The chunks holding `units`, in ascending order without repeats.
pub fn chunks_of(units: impl IntoIterator<Item = u32>, per_chunk: u32) -> Vec<usize> {
    let mut out: Vec<usize> = units.into_iter().map(|u| (u / per_chunk) as usize).collect();
    out.sort_unstable();
    out.dedup();
    out
}

pub struct ChunkedPool {
    pub unit_bytes: usize,
    pub per_chunk: u32,
    pub units: usize,
    chunks: Vec<Option<CudaSlice<u8>>>,
    host_table: Vec<u64>,
    table: CudaSlice<u64>,
}

impl ChunkedPool {
    pub fn new(stream: &Arc<CudaStream>, unit_bytes: usize, units: usize) -> Result<Self, TensorError> {
        let per_chunk = units_per_chunk(unit_bytes);
        let n = units.div_ceil(per_chunk as usize).max(1);
        Ok(ChunkedPool {
            unit_bytes,
            per_chunk,
            units,
            chunks: (0..n).map(|_| None).collect(),
            host_table: vec![0; n],
            table: stream.alloc_zeros::<u64>(n).map_err(dev)?,
        })
    }

    /// Device bytes committed so far.
    pub fn committed_bytes(&self) -> usize {
        self.chunks.iter().flatten().map(|c| c.len()).sum()
    }

    /// Commits the chunks of `units` (zeroed) and publishes their pointers to the device table.
    pub fn ensure(&mut self, stream: &Arc<CudaStream>, units: &[u32]) -> Result<(), TensorError> {
        let mut changed = false;
        for c in chunks_of(units.iter().copied(), self.per_chunk) {
            if c >= self.chunks.len() {
                return Err(TensorError::Range(format!(
                    "unit in chunk {c} of a pool of {}",
                    self.chunks.len()
                )));
            }
            if self.chunks[c].is_none() {
                let bytes = self.per_chunk as usize * self.unit_bytes;
                let chunk = stream.alloc_zeros::<u8>(bytes).map_err(|e| {
                    TensorError::Device(format!(
                        "cannot commit {bytes} B of device memory for a pool chunk: {e}"
                    ))
                })?;
                let (ptr, _sync) = chunk.device_ptr(stream);
                self.host_table[c] = ptr;
                drop(_sync);
                self.chunks[c] = Some(chunk);
                changed = true;
            }
        }
        if changed {
            stream.memcpy_htod(&self.host_table, &mut self.table).map_err(dev)?;
        }
        Ok(())
    }

    /// Whether `unit`'s chunk holds memory; a kernel reading an uncommitted unit would fault and
    /// take the whole CUDA context down, so callers refuse such reads first.
    pub fn is_committed(&self, unit: u32) -> bool {
        self.host_table
            .get((unit / self.per_chunk) as usize)
            .is_some_and(|&p| p != 0)
    }

    pub fn table(&self) -> &CudaSlice<u64> {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_math() {
        assert_eq!(units_per_chunk(CHUNK_BYTES * 2), 1);
        assert_eq!(units_per_chunk(1 << 20), 32);
        assert_eq!(chunks_of([70, 3, 31, 32, 64], 32), vec![0, 1, 2]);
        assert!(chunks_of([], 4).is_empty());
    }
}

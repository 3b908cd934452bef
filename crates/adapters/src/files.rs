//! Bounded reads of an adapter's files: `adapter_config.json` under a size cap, and a safetensors
//! header read from its first bytes and checked against the file's length, so that nothing a file
//! claims can make the loader allocate more than the file really holds. Tensor data is then read
//! one tensor at a time from the offsets the header gave.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use safetensors::tensor::{Metadata, TensorInfo};

/// The largest `adapter_config.json` read (PEFT writes ~1 KB; per-layer patterns stay far below).
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// The largest safetensors header read: ~150 bytes per tensor, so room for ~7,000 tensors, more
/// than an all-linear adapter of a 200-layer model has.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;

/// Opens `path` only if it is a regular file (opening a FIFO blocks; a device may never end).
pub fn open_regular(path: &Path) -> Result<(File, u64), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    Ok((file, len))
}

/// Reads a whole text file of at most `cap` bytes. (Not only regular files: the engine's tests
/// stand in a FIFO for a slow disk. Just-in-time names only reach regular files.)
pub fn read_capped(path: &Path, cap: u64) -> Result<String, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if meta.is_file() && meta.len() > cap {
        return Err(format!("{} bytes, more than the limit of {cap}", meta.len()));
    }
    let mut text = String::new();
    // `take`: a file that grows after the check is still read only up to the cap.
    file.take(cap + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > cap {
        return Err(format!("more than the limit of {cap} bytes"));
    }
    Ok(text)
}

/// A safetensors file whose header has been read and checked; no tensor data read yet.
pub struct SafetensorsFile {
    file: File,
    /// Offset of the data section (8 + header length).
    data_start: u64,
    pub metadata: Metadata,
}

fn invalid(reason: impl std::fmt::Display) -> String {
    format!("not a valid safetensors file: {reason}")
}

impl SafetensorsFile {
    /// Reads the header (at most `max_header` bytes) and checks that the tensors it describes
    /// are contiguous, sized by their shapes and dtypes, and fill the rest of the file exactly.
    pub fn open(path: &Path, max_header: u64) -> Result<Self, String> {
        let (mut file, len) = open_regular(path)?;
        if len < 8 {
            return Err(invalid(format!("{len} bytes, too short for the header length")));
        }
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|e| e.to_string())?;
        let n = u64::from_le_bytes(n);
        if n > max_header {
            return Err(invalid(format!(
                "a header of {n} bytes, more than the limit of {max_header}"
            )));
        }
        if 8 + n > len {
            return Err(invalid(format!("a header of {n} bytes, but the file has {len} bytes")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| e.to_string())?;
        // Deserializing `Metadata` also checks offsets: contiguous, in order, and each tensor's
        // byte length equal to its shape times its dtype's size (with overflow checks).
        let metadata: Metadata = serde_json::from_slice(&header).map_err(invalid)?;
        let data = len - 8 - n;
        if metadata.data_len() as u64 != data {
            return Err(invalid(format!(
                "the header describes {} bytes of tensor data, the file holds {data}",
                metadata.data_len()
            )));
        }
        Ok(SafetensorsFile {
            file,
            data_start: 8 + n,
            metadata,
        })
    }

    /// The bytes of one tensor the header described.
    pub fn read(&mut self, info: &TensorInfo) -> Result<Vec<u8>, String> {
        let (start, end) = info.data_offsets;
        let mut bytes = vec![0u8; end - start];
        self.file
            .seek(SeekFrom::Start(self.data_start + start as u64))
            .and_then(|_| self.file.read_exact(&mut bytes))
            .map_err(|e| e.to_string())?;
        Ok(bytes)
    }
}

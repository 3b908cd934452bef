//! Any bytes as `adapter_model.safetensors`: the bounded header reader accepts a consistent file
//! or refuses it, never panics or allocates what the header merely claims.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quiver_adapters::files::SafetensorsFile;
use quiver_adapters::MAX_HEADER_BYTES;

fuzz_target!(|bytes: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("adapter_model.safetensors");
    if std::fs::write(&path, bytes).is_ok() {
        let _ = SafetensorsFile::open(&path, MAX_HEADER_BYTES);
    }
});

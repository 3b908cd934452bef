//! Per-step arrays uploaded once per step instead of once per layer: every layer of a forward pass
//! sends the same positions, slots, block tables and RoPE rows, so each upload is kept under its
//! name with the host values it came from and reused while they are equal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::CudaSlice;
use quiver_tensor::TensorError;

type Entries<V> = Mutex<HashMap<&'static str, (Vec<u32>, Arc<V>)>>;

#[derive(Default)]
pub struct Reuse {
    u32s: Entries<CudaSlice<u32>>,
    f32s: Entries<CudaSlice<f32>>,
}

fn reuse_or<V>(
    entries: &Entries<V>,
    name: &'static str,
    key: &[u32],
    upload: impl FnOnce() -> Result<V, TensorError>,
) -> Result<Arc<V>, TensorError> {
    let mut map = entries
        .lock()
        .map_err(|_| TensorError::Device("upload cache poisoned".into()))?;
    if let Some((k, v)) = map.get(name) {
        if k.as_slice() == key {
            return Ok(v.clone());
        }
    }
    // The replaced buffer may still be read by queued kernels; cudarc's drop waits for them.
    let fresh = Arc::new(upload()?);
    map.insert(name, (key.to_vec(), fresh.clone()));
    Ok(fresh)
}

impl Reuse {
    /// `values` on the device, uploaded only if they differ from the last upload under `name`.
    pub fn u32s(
        &self,
        name: &'static str,
        values: &[u32],
        upload: impl FnOnce() -> Result<CudaSlice<u32>, TensorError>,
    ) -> Result<Arc<CudaSlice<u32>>, TensorError> {
        reuse_or(&self.u32s, name, values, upload)
    }

    /// The same for f32 values (compared bit for bit).
    pub fn f32s(
        &self,
        name: &'static str,
        values: &[f32],
        upload: impl FnOnce() -> Result<CudaSlice<f32>, TensorError>,
    ) -> Result<Arc<CudaSlice<f32>>, TensorError> {
        let bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
        reuse_or(&self.f32s, name, &bits, upload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_while_the_values_are_equal() {
        let entries: Entries<usize> = Default::default();
        let mut uploads = 0;
        let mut get = |name, key: &[u32]| {
            *reuse_or(&entries, name, key, || {
                uploads += 1;
                Ok(uploads)
            })
            .expect("no error")
        };
        assert_eq!(get("slots", &[1, 2, 3]), 1);
        assert_eq!(get("slots", &[1, 2, 3]), 1, "same values: no upload");
        assert_eq!(get("positions", &[1, 2, 3]), 2, "names are separate");
        assert_eq!(get("slots", &[1, 2, 4]), 3, "new values: new upload");
        assert_eq!(get("slots", &[1, 2]), 4);
    }
}

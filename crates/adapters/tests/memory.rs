//! An adapter file cannot make the loader allocate more than the adapter really needs: a 2 GiB
//! sparse `adapter_model.safetensors` (trailing bytes, a giant shape, a giant rank that matches
//! the file, data claimed beyond the end, a giant header) is refused with its peak RSS under
//! 50 MB above where it started. One test in its own binary, so no other test's allocations disturb the measurement.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use quiver_adapters::{load_peft_adapter_with, LoadLimits};
use quiver_model::{ModelConfig, ModuleKind};
use quiver_testkit::{adapter_spec_by_name, spec_by_name, write_adapter, write_model};
use serde_json::{json, Map, Value};

const TWO_GIB: u64 = 2 << 30;
const MAX_GROWTH_KB: u64 = 50 << 10;

fn status_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets the peak RSS (`VmHWM`) to the current RSS and returns that: a buffer allocated and
/// freed during a load still shows in the peak afterwards.
fn reset_peak_kb() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    status_kb("VmRSS:")
}

/// Writes a safetensors header for `tensors` (f32, contiguous) and sizes the file to
/// `file_len`, or to exactly header + data when `None`; the data is a hole (sparse).
fn write_sparse(path: &Path, tensors: &[(String, Vec<usize>)], file_len: Option<u64>) {
    let mut header = Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().map(|&d| d as u64).product::<u64>();
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut f = File::create(path).unwrap();
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    f.set_len(file_len.unwrap_or(8 + header.len() as u64 + offset)).unwrap();
}

/// The tensors an all-linear adapter of `rank` has, with `giant` rows for the first A instead.
fn all_linear(cfg: &ModelConfig, rank: usize, giant: Option<usize>) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        for kind in ModuleKind::ALL {
            let (i, o) = kind.dims(cfg);
            let key = |w: char| format!("base_model.model.{}.lora_{w}.weight", kind.path(layer));
            let rows = match giant {
                Some(g) if out.is_empty() => g,
                _ => rank,
            };
            out.push((key('A'), vec![rows, i]));
            out.push((key('B'), vec![o, rank]));
        }
    }
    out
}

fn set_rank(dir: &Path, r: usize) {
    let path = dir.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["r"] = json!(r);
    v["lora_alpha"] = json!(r);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn two_gib_sparse_adapters_are_refused_without_reading_them() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = adapter_spec_by_name("llama-r8-all-linear").unwrap();
    write_model(&spec_by_name(&spec.base).unwrap(), &tmp.path().join("base")).unwrap();
    let cfg = ModelConfig::from_dir(&tmp.path().join("base")).unwrap();
    let dir = tmp.path().join("adapter");
    write_adapter(&spec, &dir).unwrap();
    let st = dir.join("adapter_model.safetensors");
    let limits = LoadLimits { max_rank: Some(64) };
    let load = || load_peft_adapter_with("big", &dir, &cfg, limits).map(|_| ());
    assert!(load().is_ok(), "the fixture itself loads");

    let (h, layers) = (cfg.hidden_size, cfg.num_layers);
    // Bytes per rank of an all-linear adapter, to size a rank whose tensors fill 2 GiB.
    let per_rank: u64 = ModuleKind::ALL
        .iter()
        .map(|k| {
            let (i, o) = k.dims(&cfg);
            4 * (i + o) as u64
        })
        .sum::<u64>()
        * layers as u64;
    // (what, how to write it, what the refusal says)
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "a valid header, then 2 GiB of trailing holes",
            Box::new(|| write_sparse(&st, &all_linear(&cfg, 8, None), Some(TWO_GIB))),
            "the file holds",
        ),
        (
            "a giant shape that the 2 GiB file matches",
            Box::new(|| {
                write_sparse(
                    &st,
                    &all_linear(&cfg, 8, Some((TWO_GIB / (4 * h as u64)) as usize)),
                    None,
                )
            }),
            "expected [8, ",
        ),
        (
            "a giant rank in the config and the file, all consistent",
            Box::new(|| {
                let r = (TWO_GIB / per_rank) as usize;
                set_rank(&dir, r);
                write_sparse(&st, &all_linear(&cfg, r, None), None);
            }),
            "exceeds --max-lora-rank 64",
        ),
        (
            "data claimed far beyond the end of the file",
            Box::new(|| {
                set_rank(&dir, 8);
                write_sparse(&st, &all_linear(&cfg, 8, Some(1 << 40)), Some(1 << 20));
            }),
            "the file holds",
        ),
        (
            "a 2 GiB header",
            Box::new(|| {
                let mut f = File::create(&st).unwrap();
                f.write_all(&(TWO_GIB - 8).to_le_bytes()).unwrap();
                f.set_len(TWO_GIB).unwrap();
            }),
            "more than the limit",
        ),
    ];
    for (what, make, reason) in cases {
        make();
        let before = reset_peak_kb();
        let err = load().expect_err(what).to_string();
        let grew = status_kb("VmHWM:").saturating_sub(before);
        eprintln!("{what}: refused, peak RSS +{grew} kB: {err}");
        assert!(err.contains(reason), "{what}: {err}");
        assert!(grew < MAX_GROWTH_KB, "{what}: peak RSS grew by {grew} kB");
    }
}

//! The benchmark's adapter set: written once to disk, and what loading and uploading one costs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use quiver_adapters::load_peft_adapter;
use quiver_model::{BlockAllocator, LoraAdapter, ModelBundle};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::{Backend, DType};
use quiver_testkit::{write_adapter, AdapterSpec, Targets};
use rayon::prelude::*;

use crate::{ADAPTER_SET, MAX_ADAPTERS, MAX_MODEL_LEN, RANK};

pub fn adapter_name(i: usize) -> String {
    format!("r16-{i:04}")
}

pub fn adapter_spec(i: usize) -> AdapterSpec {
    AdapterSpec {
        name: adapter_name(i),
        base: "qwen2.5-0.5b".into(),
        r: RANK,
        lora_alpha: 32.0,
        use_rslora: false,
        target: Targets::List(vec!["q_proj".into(), "v_proj".into()]),
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        layers_to_transform: None,
        dtype: quiver_testkit::DType::Bf16,
        seed: 10_000 + i as u64,
    }
}

/// Writes the adapters under `root` unless a previous run finished writing the same set.
pub fn ensure_adapters(root: &Path) -> Result<()> {
    let marker = root.join("COMPLETE");
    if std::fs::read_to_string(&marker).is_ok_and(|s| s == ADAPTER_SET) {
        println!(
            "adapters: reusing {MAX_ADAPTERS} rank-{RANK} adapters in {} ({ADAPTER_SET})",
            root.display()
        );
        return Ok(());
    }
    let t = Instant::now();
    (0..MAX_ADAPTERS)
        .into_par_iter()
        .try_for_each(|i| write_adapter(&adapter_spec(i), &root.join(adapter_name(i))).map(|_| ()))?;
    let secs = t.elapsed().as_secs_f64();
    let bytes: u64 = (0..MAX_ADAPTERS)
        .map(|i| std::fs::metadata(root.join(adapter_name(i)).join("adapter_model.safetensors")).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    std::fs::write(&marker, ADAPTER_SET)?;
    println!(
        "adapters: wrote {MAX_ADAPTERS} rank-{RANK} adapters ({:.2} GB, {:.2} MB each) to {} in {secs:.1} s ({:.0} MB/s)",
        bytes as f64 / 1e9,
        bytes as f64 / MAX_ADAPTERS as f64 / 1e6,
        root.display(),
        bytes as f64 / 1e6 / secs
    );
    Ok(())
}

/// Mean time to load one adapter from disk into the host tier (files in the OS page cache after
/// the first read) and to upload it into bf16 pages, on the engine's own code paths.
pub fn adapter_costs(model_dir: &Path, adapter_root: &Path) -> Result<(f64, f64)> {
    let bundle = ModelBundle::load(CpuBackend::default(), model_dir, Some(MAX_MODEL_LEN))?;
    let cfg = &bundle.model.cfg;
    let page = quiver_model::lora_page_size(cfg);
    let n = 16;
    let t = Instant::now();
    let hosts = (0..n)
        .map(|i| load_peft_adapter(&adapter_name(i), &adapter_root.join(adapter_name(i)), cfg))
        .collect::<Result<Vec<_>, _>>()?;
    let load = t.elapsed().as_secs_f64() / n as f64;
    let per: usize = hosts[0]
        .modules
        .iter()
        .map(|m| m.rank * (m.kind.dims(cfg).0 + m.kind.dims(cfg).1) / page)
        .sum();
    let mut pages = BlockAllocator::new(per * n, page);
    let mut pool = bundle.model.backend.new_page_pool(page, pages.total(), DType::BF16)?;
    let t = Instant::now();
    for h in &hosts {
        LoraAdapter::upload(&h.name, &h.modules, cfg, &bundle.model.backend, &mut pool, &mut pages)?;
    }
    Ok((load, t.elapsed().as_secs_f64() / n as f64))
}

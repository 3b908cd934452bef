//! Memory honesty (issue #21): once the CPU backend has copied a weight matrix into memory of its
//! own (huge pages) or quantized it, the safetensors mapping's pages of that matrix are no
//! longer mapped into the process, so RSS counts the weights once.

#![cfg(target_os = "linux")]

use anyhow::{ensure, Context, Result};
use quiver_model::{ModelBundle, Quantization};
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::QuantFormat;
use quiver_testkit::{write_model, Arch, ModelSpec};

/// KiB of `file` mapped into this process (the Rss of its mappings in /proc/self/smaps).
fn mapped_kib(file: &std::path::Path) -> Result<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").context("reading /proc/self/smaps")?;
    let name = file.to_string_lossy();
    let (mut inside, mut kib) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.ends_with(name.as_ref());
        } else if inside && first == "Rss:" {
            kib += line
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(kib)
}

#[test]
fn copied_and_quantized_weights_leave_their_file_pages_unmapped() -> Result<()> {
    // gate/up/down are 2 MiB of f32 each (copied into huge pages); the rest stays mapped.
    let spec = ModelSpec {
        hidden_size: 256,
        intermediate_size: 2048,
        num_heads: 4,
        num_kv_heads: 2,
        seed: 9,
        ..ModelSpec::tiny("rss-check", Arch::Llama)
    };
    let dir = tempfile::tempdir()?;
    write_model(&spec, dir.path())?;
    let file = dir.path().join("model.safetensors");
    let file_kib = std::fs::metadata(&file)?.len() / 1024;
    let copied_kib = (spec.num_layers * 3 * spec.hidden_size * spec.intermediate_size * 4 / 1024) as u64;

    let copied = ModelBundle::load(CpuBackend::default(), dir.path(), None)?;
    let after_copy = mapped_kib(&file)?;
    eprintln!("copied: {after_copy} KiB of the file still mapped ({copied_kib} KiB copied)");
    ensure!(
        after_copy + copied_kib <= file_kib + 8,
        "{after_copy} KiB of a {file_kib} KiB file still mapped after copying {copied_kib} KiB"
    );
    drop(copied);

    let q = Quantization {
        format: Some(QuantFormat::Int8),
        keep_lm_head: false,
    };
    let quantized = ModelBundle::load_with(CpuBackend::default(), dir.path(), None, q)?;
    let after_quant = mapped_kib(&file)?;
    eprintln!("quantized: {after_quant} KiB of the file still mapped");
    // Every linear and the LM head are quantized: only the embedding, norms and the page-sized
    // edges of each matrix may remain.
    let embed_kib = (quantized.model.cfg.vocab_size * spec.hidden_size * 4 / 1024) as u64;
    ensure!(
        after_quant <= embed_kib + 64,
        "{after_quant} KiB of the file still mapped after quantizing (embedding {embed_kib} KiB)"
    );
    Ok(())
}

//! The quantized-base part of the peers benchmark (issue #17): which formats run, and batch 8
//! on 8 adapters through the engine on the bf16 base and on each quantized one.

use anyhow::Result;
use quiver_model::Quantization;
use quiver_tensor::cpu::Precision;
use quiver_tensor::QuantFormat;

use crate::{adapter_name, best_of, done_json, run_all, start_engine, Workload, BATCH_NEW};

/// Requests (each on its own adapter) of the quantized-vs-bf16 engine comparison.
const QUANT_BATCH: usize = 8;

/// `QUIVER_PEERS_QUANT`: the `--quantization` formats of the quantized rows, comma- or
/// space-separated (default `int8,int4`; `none`: bf16 only).
pub fn formats() -> Result<Vec<QuantFormat>> {
    let v = std::env::var("QUIVER_PEERS_QUANT").unwrap_or_else(|_| "int8,int4".into());
    if v.trim() == "none" {
        return Ok(Vec::new());
    }
    v.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|e: String| anyhow::anyhow!("QUIVER_PEERS_QUANT: {e}"))
        })
        .collect()
}

/// `--quantization FORMAT` with the default int8 LM head (None: the checkpoint's bf16).
pub fn quantization(format: Option<QuantFormat>) -> Quantization {
    Quantization {
        format,
        keep_lm_head: false,
    }
}

/// `QUIVER_PEERS_WORKLOADS=1`: workload 1 and the quantized rows only (no workloads 2 and 3).
pub fn workload1_only() -> bool {
    std::env::var("QUIVER_PEERS_WORKLOADS").is_ok_and(|v| v.trim() == "1")
}

/// Batch 8, each request on its own adapter, end to end through the engine on the bf16 base
/// and on each quantized base (all adapters registered, best of 3 after a warm-up run).
/// Returns the JSON member `"quant_batch":[..]`.
pub fn quant_batch(w: &Workload) -> Result<String> {
    let mut out = Vec::new();
    for format in std::iter::once(None).chain(formats()?.into_iter().map(Some)) {
        let engine = start_engine(w, Precision::F32, quantization(format))?;
        let requests: Vec<_> = (0..QUANT_BATCH)
            .map(|i| (w.batch[i].clone(), BATCH_NEW, Some(adapter_name(i))))
            .collect();
        run_all(&engine, &requests)?;
        let d = best_of(&engine, 3, &requests)?;
        let weights = format.map_or_else(|| "bf16".to_string(), |f| f.to_string());
        println!(
            "quiver {weights} weights, batch {QUANT_BATCH}, different adapters: {:.1} tok/s",
            d.tok_s
        );
        let extra = format!("\"batch\":{QUANT_BATCH},\"weights\":\"{weights}\",");
        out.push(done_json("different adapters", &d, &extra));
    }
    Ok(format!("\"quant_batch\":[{}]", out.join(",")))
}

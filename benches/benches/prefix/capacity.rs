//! How many tokens one memory budget holds per KV cache dtype: distinct prompts (more tokens
//! than the budget can hold in any dtype) fill the prefix cache, and the engine's own figures
//! say how many bytes of blocks it kept within the budget.

use std::path::Path;

use anyhow::Result;
use quiver_benches::Rng;
use quiver_engine::EngineConfig;
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;
use quiver_tensor::DType;

use crate::chat::send;

const BUDGET: usize = 64 << 20;
const PROMPTS: usize = 16;
const PROMPT_LEN: usize = 512;
const BLOCK_SIZE: usize = 16;

pub fn report(model: &Path, dtypes: &[DType]) -> Result<()> {
    println!(
        "\nKV cache dtype: tokens a {} MiB budget holds ({PROMPTS} distinct {PROMPT_LEN}-token prompts sent, prefix caching on)\n",
        BUDGET >> 20
    );
    println!("| KV dtype | bytes per token | tokens held | vs f32 |");
    println!("|---|---:|---:|---:|");
    let mut f32_tokens = None;
    for &dtype in dtypes {
        let mut bundle = ModelBundle::load(CpuBackend::default(), model, Some(4096))?;
        bundle.model.set_kv_dtype(dtype);
        let block_bytes = bundle.model.kv_layout(1, BLOCK_SIZE).bytes_per_block();
        let cfg = EngineConfig {
            memory_budget: BUDGET,
            block_size: BLOCK_SIZE,
            kv_cache_dtype: Some(dtype),
            enable_prefix_caching: true,
            ..EngineConfig::default()
        };
        let engine = crate::engine(bundle, cfg)?;
        for i in 0..PROMPTS {
            send(&engine, None, Rng(0xCA9A ^ i as u64).prompt(PROMPT_LEN), 1)?;
        }
        let s = engine.stats()?.blocking_recv()?;
        // Nothing runs: every KV byte charged to the budget is a cached block.
        let tokens = s.kv_bytes / block_bytes * BLOCK_SIZE;
        let f32_tokens = *f32_tokens.get_or_insert(tokens);
        println!(
            "| {dtype} | {} | {tokens} | {:.2}× |",
            block_bytes / BLOCK_SIZE,
            tokens as f64 / f32_tokens.max(1) as f64
        );
    }
    Ok(())
}

//! The paged KV cache on the device and causal attention over it.

use cudarc::driver::{CudaSlice, PushKernelArg};
use quiver_tensor::{AttentionBatch, DType, TensorError};

use crate::backend::{check, grid, CudaBackend, CudaKvPool};
use crate::error::dev;

/// Head sizes the attention kernel keeps in registers (`MAX_HEAD_DIM` in kernels/attention.cu).
pub const MAX_HEAD_DIM: usize = 256;
const WARPS: usize = 4;

/// The kernel's name for the pool's dtype (`write_kv_bf16`, …).
fn kernel(base: &str, dtype: DType) -> String {
    format!("{base}_{dtype}")
}

pub fn write_kv(
    be: &CudaBackend,
    pool: &mut CudaKvPool,
    layer: usize,
    k: &CudaSlice<f32>,
    v: &CudaSlice<f32>,
    slots: &[u32],
) -> Result<(), TensorError> {
    let l = pool.layout;
    let width = l.num_kv_heads * l.head_dim;
    check(
        "write_kv",
        layer < l.num_layers && k.len() >= slots.len() * width && v.len() >= slots.len() * width,
        || {
            format!(
                "layer {layer}/{}, {} slots of {width}, k {} v {}",
                l.num_layers,
                slots.len(),
                k.len(),
                v.len()
            )
        },
    )?;
    let capacity = l.num_blocks * l.block_size;
    if let Some(bad) = slots.iter().find(|&&s| s as usize >= capacity) {
        return Err(TensorError::Range(format!("KV slot {bad} ≥ {capacity}")));
    }
    if slots.is_empty() {
        return Ok(());
    }
    let blocks: Vec<u32> = slots.iter().map(|&s| s / l.block_size as u32).collect();
    pool.pool.ensure(be.stream(), &blocks)?;
    let slots_d = be.htod_step("slots", slots)?;
    let (per_chunk, layer_i) = (pool.pool.per_chunk, layer as i32);
    let (bs, kvh, hd) = (l.block_size as i32, l.num_kv_heads as i32, l.head_dim as i32);
    let mut b = be.stream().launch_builder(be.func(&kernel("write_kv", l.dtype))?);
    b.arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&layer_i)
        .arg(k)
        .arg(v)
        .arg(&*slots_d)
        .arg(&bs)
        .arg(&kvh)
        .arg(&hd);
    // SAFETY: argument types match the kernel; every slot's chunk is committed above.
    unsafe { b.launch(grid(slots.len(), 1, 128)) }.map_err(dev)?;
    Ok(())
}

pub fn attention(
    be: &CudaBackend,
    pool: &CudaKvPool,
    layer: usize,
    q: &CudaSlice<f32>,
    heads: usize,
    batch: &AttentionBatch,
    out: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let l = pool.layout;
    let (tokens, hd) = (batch.num_tokens(), l.head_dim);
    check(
        "attention",
        layer < l.num_layers
            && hd <= MAX_HEAD_DIM
            && l.num_kv_heads > 0
            && heads.is_multiple_of(l.num_kv_heads)
            && q.len() >= tokens * heads * hd
            && out.len() >= tokens * heads * hd
            && batch.seq.len() == tokens,
        || {
            format!(
                "layer {layer}, {tokens} tokens × {heads} heads × {hd} (≤ {MAX_HEAD_DIM}), {} kv heads",
                l.num_kv_heads
            )
        },
    )?;
    if tokens == 0 {
        return Ok(());
    }
    // Every position a token attends to must be in its table: an unchecked index would read
    // another request's cache.
    let mut table_start = Vec::with_capacity(batch.block_tables.len());
    let mut tables = Vec::new();
    for t in &batch.block_tables {
        table_start.push(tables.len() as u32);
        if let Some(bad) = t.iter().find(|&&b| b as usize >= l.num_blocks) {
            return Err(TensorError::Range(format!("KV block {bad} ≥ {}", l.num_blocks)));
        }
        tables.extend_from_slice(t);
    }
    // The blocks read are each sequence's first `max position / block_size + 1`; they must hold
    // memory (written K/V), or the kernel would fault on an uncommitted chunk.
    let mut reach = vec![0usize; batch.block_tables.len()];
    for (t, (&p, &s)) in batch.positions.iter().zip(&batch.seq).enumerate() {
        let len = batch.block_tables.get(s as usize).map(|b| b.len() * l.block_size);
        if len.is_none_or(|n| p as usize >= n) {
            return Err(TensorError::Range(format!(
                "token {t} at position {p} beyond its block table"
            )));
        }
        reach[s as usize] = reach[s as usize].max(p as usize / l.block_size + 1);
    }
    for (table, &n) in batch.block_tables.iter().zip(&reach) {
        if let Some(bad) = table[..n].iter().find(|&&b| !pool.pool.is_committed(b)) {
            return Err(TensorError::Range(format!(
                "KV block {bad} is read before any K/V was written to it"
            )));
        }
    }
    let (pos_d, seq_d) = (
        be.htod_step("positions", &batch.positions)?,
        be.htod_step("seq", &batch.seq)?,
    );
    let (start_d, tables_d) = (
        be.htod_step("table_start", &table_start)?,
        be.htod_step("tables", &tables)?,
    );
    let scale = 1.0 / (hd as f32).sqrt();
    let (per_chunk, layer_i, tok) = (pool.pool.per_chunk, layer as i32, tokens as i32);
    let (h, kvh, hdi, bs) = (heads as i32, l.num_kv_heads as i32, hd as i32, l.block_size as i32);
    let mut b = be
        .stream()
        .launch_builder(be.func(&kernel("paged_attention", l.dtype))?);
    b.arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&layer_i)
        .arg(q)
        .arg(out)
        .arg(&*pos_d)
        .arg(&*seq_d)
        .arg(&*start_d)
        .arg(&*tables_d)
        .arg(&tok)
        .arg(&h)
        .arg(&kvh)
        .arg(&hdi)
        .arg(&bs)
        .arg(&scale);
    // SAFETY: argument types match the kernel; positions and blocks checked above.
    unsafe { b.launch(grid((tokens * heads).div_ceil(WARPS), 1, 32 * WARPS as u32)) }.map_err(dev)?;
    Ok(())
}

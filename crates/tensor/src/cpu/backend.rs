//! [`Backend`] for the CPU: activations are `Vec<f32>`, weights stay memory-mapped.

use crate::backend::{AttentionBatch, Backend, KvLayout, LoraPlan, LoraSegment, RopeTable};
use crate::cpu::kv_pool::CpuKvPool;
use crate::cpu::lora::{try_lora_apply, CheckedSegments, CpuPagePool};
use crate::cpu::{matmul_batch_invariant, matmul_with, ops, Precision};
use crate::error::TensorError;
use crate::storage::{DType, Matrix};

/// The CPU backend. `CpuBackend::default()` computes in f32 (the reference); see [`Precision`]
/// for the opt-in bf16-activation matmuls and [`CpuBackend::with_batch_invariant`] for
/// results that do not depend on the batch.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    precision: Precision,
    /// Serve weights from the file mapping instead of copying large ones into huge pages.
    keep_mapped: bool,
    /// Only kernels whose per-token results do not depend on the batch.
    batch_invariant: bool,
}

impl CpuBackend {
    pub fn with_precision(precision: Precision) -> Self {
        Self {
            precision,
            ..Self::default()
        }
    }

    /// Every token's results bitwise the same whatever else shares its step, however its
    /// prefill is cut into chunks and wherever its cached prefix came from (`--batch-invariant`,
    /// as SGLang's `--enable-deterministic-inference`): matmuls sum each output in one order at
    /// every batch size ([`matmul_batch_invariant`]: no `gemm` crate for large prefills, no
    /// 4-way split of batch-1 dot products) and LoRA shrinks in one order per token. Attention,
    /// norms and the rest are batch invariant in either mode.
    pub fn with_batch_invariant(self, on: bool) -> Self {
        Self {
            batch_invariant: on,
            ..self
        }
    }

    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// Leaves weights in the safetensors mapping (no copy at load; decode streams them more
    /// slowly, see [`crate::cpu::huge::into_huge_pages`]): for a machine whose memory cannot hold
    /// a private copy of the model next to the page cache's.
    pub fn keep_weights_mapped(self) -> Self {
        Self {
            keep_mapped: true,
            ..self
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }
}

/// The pool forward passes run on (one thread per core); `None` if it could not be created, in
/// which case kernels use rayon's global pool from the calling thread.
fn worker_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("quiver-cpu-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// One step's adapters on the CPU: each slot's segments, checked against the pool once.
pub struct CpuLoraBatch<'a> {
    pub slots: Vec<CheckedSegments<'a>>,
}

fn check(op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<(), TensorError> {
    if ok {
        Ok(())
    } else {
        Err(TensorError::Shape { op, detail: detail() })
    }
}

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Weight = Matrix;
    type KvPool = CpuKvPool;
    type PagePool = CpuPagePool;
    type LoraBatch<'a> = CpuLoraBatch<'a>;

    fn name(&self) -> String {
        let threads = worker_pool().map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        let invariant = if self.batch_invariant { ", batch invariant" } else { "" };
        match self.precision {
            Precision::F32 => format!("cpu ({threads} threads{invariant})"),
            Precision::Bf16Activations => format!("cpu ({threads} threads, bf16-activation matmuls{invariant})"),
            Precision::Int8Activations => {
                format!("cpu ({threads} threads, int8 activations for quantized weights{invariant})")
            }
        }
    }

    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match worker_pool() {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }

    fn upload_weight(&self, m: Matrix) -> Result<Matrix, TensorError> {
        Ok(if self.keep_mapped {
            m
        } else {
            crate::cpu::huge::into_huge_pages(m)
        })
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>, TensorError> {
        Ok(data.to_vec())
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>, TensorError> {
        Ok(vec![0.0; len])
    }

    fn download(&self, t: &Vec<f32>) -> Result<Vec<f32>, TensorError> {
        Ok(t.clone())
    }

    fn new_kv_pool(&self, layout: KvLayout) -> Result<CpuKvPool, TensorError> {
        Ok(CpuKvPool::new(layout))
    }

    fn release_kv_blocks(&self, pool: &mut CpuKvPool, blocks: &[u32]) -> Result<(), TensorError> {
        let n = pool.layout.num_blocks;
        if let Some(b) = blocks.iter().find(|&&b| b as usize >= n) {
            return Err(TensorError::Range(format!("kv block {b} ≥ pool of {n}")));
        }
        pool.release(blocks);
        Ok(())
    }

    fn release_pages(&self, pool: &mut CpuPagePool, pages: &[u32]) -> Result<(), TensorError> {
        let n = pool.num_pages();
        if let Some(p) = pages.iter().find(|&&p| p as usize >= n) {
            return Err(TensorError::Range(format!("page {p} ≥ pool of {n}")));
        }
        pool.release(pages);
        Ok(())
    }

    fn new_page_pool(&self, page_floats: usize, pages: usize, dtype: DType) -> Result<CpuPagePool, TensorError> {
        check("new_page_pool", page_floats > 0, || "page size 0".into())?;
        CpuPagePool::new(page_floats, pages, dtype)
    }

    fn write_pages(&self, pool: &mut CpuPagePool, pages: &[u32], data: &[f32]) -> Result<(), TensorError> {
        let p = pool.page;
        check("write_pages", data.len() == pages.len() * p, || {
            format!("{} floats for {} pages of {p}", data.len(), pages.len())
        })?;
        let n = pool.num_pages();
        for (&id, chunk) in pages.iter().zip(data.chunks(p)) {
            if id as usize >= n {
                return Err(TensorError::Range(format!("page {id} ≥ pool of {n}")));
            }
            pool.write(id, chunk);
        }
        Ok(())
    }

    fn download_weight(&self, w: &Matrix) -> Result<Matrix, TensorError> {
        Ok(w.clone())
    }

    fn lora(
        &self,
        pool: &CpuPagePool,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        in_f: usize,
        out_f: usize,
        segments: &[LoraSegment<'_>],
    ) -> Result<(), TensorError> {
        try_lora_apply(pool, x, y, in_f, out_f, segments, self.batch_invariant)
            .map_err(|detail| TensorError::Shape { op: "lora", detail })
    }

    fn lora_batch<'a>(&self, pool: &'a CpuPagePool, plan: LoraPlan<'a>) -> Result<CpuLoraBatch<'a>, TensorError> {
        plan.check()?;
        let slots = plan
            .slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                CheckedSegments::new(pool, plan.tokens, slot.in_f, slot.out_f, plan.segments(slot))
                    .map(|s| s.batch_invariant(self.batch_invariant))
                    .map_err(|detail| TensorError::Shape {
                        op: "lora_batch",
                        detail: format!("slot {i}: {detail}"),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(CpuLoraBatch { slots })
    }

    fn lora_slot(
        &self,
        batch: &CpuLoraBatch<'_>,
        slot: usize,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<(), TensorError> {
        let s = batch
            .slots
            .get(slot)
            .ok_or_else(|| TensorError::Range(format!("lora slot {slot} of {}", batch.slots.len())))?;
        s.apply(x, y)
            .map_err(|detail| TensorError::Shape { op: "lora", detail })
    }

    fn embed(&self, table: &Matrix, ids: &[u32], out: &mut Vec<f32>) -> Result<(), TensorError> {
        let d = table.cols;
        check("embed", out.len() == ids.len() * d, || {
            format!("out {} for {} ids × {d}", out.len(), ids.len())
        })?;
        for (&id, row) in ids.iter().zip(out.chunks_mut(d)) {
            if id as usize >= table.rows {
                return Err(TensorError::Range(format!("token id {id} ≥ vocabulary {}", table.rows)));
            }
            table.row_f32(id as usize, row);
        }
        Ok(())
    }

    fn matmul(&self, x: &Vec<f32>, m: usize, w: &Matrix, out: &mut Vec<f32>) -> Result<(), TensorError> {
        check("matmul", x.len() == m * w.cols && out.len() == m * w.rows, || {
            format!("x {} out {} for m={m} w=[{}, {}]", x.len(), out.len(), w.rows, w.cols)
        })?;
        if self.batch_invariant {
            matmul_batch_invariant(x, m, w, out, self.precision);
        } else {
            matmul_with(x, m, w, out, self.precision);
        }
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) -> Result<(), TensorError> {
        check(
            "add_bias",
            !bias.is_empty() && x.len().is_multiple_of(bias.len()),
            || format!("{} by {}", x.len(), bias.len()),
        )?;
        for row in x.chunks_mut(bias.len()) {
            for (a, b) in row.iter_mut().zip(bias) {
                *a += b;
            }
        }
        Ok(())
    }

    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<(), TensorError> {
        check("add", acc.len() == x.len(), || format!("{} + {}", acc.len(), x.len()))?;
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
        Ok(())
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<(), TensorError> {
        check(
            "rms_norm",
            !w.is_empty() && x.len().is_multiple_of(w.len()) && out.len() == x.len(),
            || format!("x {} w {} out {}", x.len(), w.len(), out.len()),
        )?;
        ops::rms_norm(x, w, eps, out);
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), TensorError> {
        check("silu_mul", gate.len() == up.len(), || {
            format!("{} vs {}", gate.len(), up.len())
        })?;
        ops::silu_mul(gate, up);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> Result<(), TensorError> {
        check(
            "rope",
            x.len() == positions.len() * heads * head_dim && 2 * table.half_dim <= head_dim,
            || format!("x {} for {} tokens × {heads} × {head_dim}", x.len(), positions.len()),
        )?;
        if let Some(p) = positions.iter().find(|&&p| p as usize >= table.max_positions()) {
            return Err(TensorError::Range(format!(
                "position {p} ≥ rope table {}",
                table.max_positions()
            )));
        }
        ops::rope(x, heads, head_dim, positions, table);
        Ok(())
    }

    fn write_kv(
        &self,
        pool: &mut CpuKvPool,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        slots: &[u32],
    ) -> Result<(), TensorError> {
        let l = pool.layout;
        let w = l.num_kv_heads * l.head_dim;
        let cap = l.num_blocks * l.block_size;
        check(
            "write_kv",
            k.len() == slots.len() * w && v.len() == k.len() && layer < l.num_layers,
            || format!("k {} v {} for {} slots × {w}", k.len(), v.len(), slots.len()),
        )?;
        for (t, &s) in slots.iter().enumerate() {
            let s = s as usize;
            if s >= cap {
                return Err(TensorError::Range(format!("kv slot {s} ≥ capacity {cap}")));
            }
            pool.write_slot(layer, s, &k[t * w..(t + 1) * w], &v[t * w..(t + 1) * w]);
        }
        Ok(())
    }

    fn attention(
        &self,
        pool: &CpuKvPool,
        layer: usize,
        q: &Vec<f32>,
        heads: usize,
        batch: &AttentionBatch,
        out: &mut Vec<f32>,
    ) -> Result<(), TensorError> {
        let l = pool.layout;
        let n = batch.num_tokens();
        check(
            "attention",
            q.len() == n * heads * l.head_dim && out.len() == q.len() && heads.is_multiple_of(l.num_kv_heads),
            || {
                format!(
                    "q {} out {} for {n} tokens × {heads} × {}",
                    q.len(),
                    out.len(),
                    l.head_dim
                )
            },
        )?;
        for t in 0..n {
            let table = batch.block_tables.get(batch.seq[t] as usize).ok_or_else(|| {
                TensorError::Range(format!("token {t}: no block table for sequence {}", batch.seq[t]))
            })?;
            let need = batch.positions[t] as usize / l.block_size + 1;
            if table.len() < need || table[..need].iter().any(|&b| b as usize >= l.num_blocks) {
                return Err(TensorError::Range(format!(
                    "token {t}: block table too short or out of range"
                )));
            }
        }
        pool.attention(layer, q, heads, batch, out);
        Ok(())
    }

    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], out: &mut Vec<f32>) -> Result<(), TensorError> {
        check("gather_rows", out.len() == rows.len() * width, || {
            format!("out {} for {} rows", out.len(), rows.len())
        })?;
        for (i, &r) in rows.iter().enumerate() {
            let r = r as usize;
            let src = x
                .get(r * width..(r + 1) * width)
                .ok_or_else(|| TensorError::Range(format!("row {r}")))?;
            out[i * width..(i + 1) * width].copy_from_slice(src);
        }
        Ok(())
    }
}

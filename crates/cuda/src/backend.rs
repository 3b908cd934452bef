//! [`Backend`] on an NVIDIA GPU: activations are f32 device buffers, weights stay in their file
//! dtype on the device, and every kernel but the large matmuls is one of `kernels/*.cu`.

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout, LoraPlan, LoraSegment, Matrix, RopeTable, TensorError};

use crate::device::{arch_name, cublas_available, device_count, guarded};
use crate::error::{dev, CudaError};
use crate::kernels::{nvrtc_available, Kernels};
use crate::pool::ChunkedPool;

pub(crate) struct Inner {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// Adapter pages travel on their own stream, overlapping the forward pass.
    pub copy_stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    pub label: String,
    pub reuse: crate::reuse::Reuse,
}

#[derive(Clone)]
pub struct CudaBackend {
    pub(crate) inner: Arc<Inner>,
}

/// A weight matrix in its storage dtype, row-major `[rows, cols]` like [`Matrix`]; or, with
/// `quant`, block-quantized (`data` holds the codes, `dtype` the dtype it was quantized from).
pub struct CudaWeight {
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
    pub data: CudaSlice<u8>,
    pub quant: Option<crate::quant::CudaQuant>,
}

/// K and V of every layer in lazily committed chunks of whole blocks.
pub struct CudaKvPool {
    pub layout: KvLayout,
    pub pool: ChunkedPool,
}

/// Adapter pages (f32 or bf16) in lazily committed chunks.
pub struct CudaPagePool {
    pub page: usize,
    pub dtype: DType,
    pub pool: ChunkedPool,
    pub staging: crate::lora::Staging,
}

pub(crate) fn check(op: &'static str, ok: bool, detail: impl FnOnce() -> String) -> Result<(), TensorError> {
    if ok {
        Ok(())
    } else {
        Err(TensorError::Shape { op, detail: detail() })
    }
}

/// A grid-stride launch over `n` elements.
pub(crate) fn flat(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 8192) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(crate) fn grid(x: usize, y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x.max(1) as u32, y.max(1) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn bytes_of(m: &Matrix) -> Result<Vec<u8>, TensorError> {
    use quiver_tensor::MatrixData;
    Ok(match &m.data {
        MatrixData::F32(s) => bytemuck::cast_slice(s.as_slice()).to_vec(),
        MatrixData::F16(s) => bytemuck::cast_slice(s.as_slice()).to_vec(),
        MatrixData::BF16(s) => bytemuck::cast_slice(s.as_slice()).to_vec(),
        MatrixData::Quant(q) => {
            return Err(TensorError::DType {
                dtype: q.format.to_string(),
                what: "dense CUDA weights (quantized ones upload through quant::upload)".into(),
            })
        }
    })
}

impl CudaBackend {
    /// Opens device `ordinal`, compiles (or loads cached) kernels for its architecture and
    /// creates the cuBLAS handle. Every missing piece is an error, never a panic.
    pub fn new(ordinal: usize) -> Result<CudaBackend, CudaError> {
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::Unavailable(format!(
                "device cuda:{ordinal} requested, {count} present"
            )));
        }
        if !cublas_available() {
            return Err(CudaError::Unavailable("cuBLAS (libcublas) not found".into()));
        }
        if !nvrtc_available() {
            return Err(CudaError::Unavailable("NVRTC (libnvrtc) not found".into()));
        }
        guarded("initialising the CUDA device", || {
            let ctx = CudaContext::new(ordinal)?;
            let (major, minor) = ctx.compute_capability()?;
            let arch = arch_name(major, minor);
            let stream = ctx.new_stream()?;
            let copy_stream = ctx.new_stream()?;
            let blas = CudaBlas::new(stream.clone())?;
            let kernels = Kernels::load(&ctx, &arch)?;
            let label = format!("cuda:{ordinal} ({}, {arch})", ctx.name()?);
            Ok(CudaBackend {
                inner: Arc::new(Inner {
                    ctx,
                    stream,
                    copy_stream,
                    blas,
                    kernels,
                    label,
                    reuse: Default::default(),
                }),
            })
        })
    }

    /// (free, total) device memory in bytes.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.inner.ctx.mem_get_info()?)
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, TensorError> {
        Ok(self.inner.kernels.get(name)?)
    }

    pub(crate) fn htod<T: cudarc::driver::DeviceRepr>(&self, v: &[T]) -> Result<CudaSlice<T>, TensorError> {
        if v.is_empty() {
            return self.stream().null::<T>().map_err(dev);
        }
        self.stream().clone_htod(v).map_err(dev)
    }

    /// Like `htod`, but reuses the last upload under `name` while the values are the same (the
    /// layers of one forward pass).
    pub(crate) fn htod_step(&self, name: &'static str, v: &[u32]) -> Result<Arc<CudaSlice<u32>>, TensorError> {
        self.inner.reuse.u32s(name, v, || self.htod(v))
    }

    /// Blocks until the forward pass queued so far has run (timing, tests).
    pub fn synchronize(&self) -> Result<(), TensorError> {
        self.stream().synchronize().map_err(dev)
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaSlice<f32>;
    type Weight = CudaWeight;
    type KvPool = CudaKvPool;
    type PagePool = CudaPagePool;
    type LoraBatch<'a> = crate::lora::CudaLoraBatch<'a>;

    fn name(&self) -> String {
        self.inner.label.clone()
    }

    fn upload_weight(&self, m: Matrix) -> Result<CudaWeight, TensorError> {
        if let quiver_tensor::MatrixData::Quant(q) = &m.data {
            return crate::quant::upload(self, m.rows, m.cols, q);
        }
        let dtype = m.dtype();
        let data = self.htod(&bytes_of(&m)?)?;
        Ok(CudaWeight {
            rows: m.rows,
            cols: m.cols,
            dtype,
            data,
            quant: None,
        })
    }

    fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>, TensorError> {
        self.htod(data)
    }

    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>, TensorError> {
        if len == 0 {
            return self.stream().null::<f32>().map_err(dev);
        }
        self.stream().alloc_zeros::<f32>(len).map_err(dev)
    }

    fn download(&self, t: &CudaSlice<f32>) -> Result<Vec<f32>, TensorError> {
        self.stream().clone_dtoh(t).map_err(dev)
    }

    fn new_kv_pool(&self, layout: KvLayout) -> Result<CudaKvPool, TensorError> {
        let pool = ChunkedPool::new(self.stream(), layout.bytes_per_block(), layout.num_blocks)?;
        Ok(CudaKvPool { layout, pool })
    }

    fn new_page_pool(&self, page_floats: usize, pages: usize, dtype: DType) -> Result<CudaPagePool, TensorError> {
        check("new_page_pool", page_floats > 0, || "page size 0".into())?;
        if dtype == DType::F16 {
            return Err(TensorError::DType {
                dtype: dtype.to_string(),
                what: "adapter pages (f32 or bf16)".into(),
            });
        }
        let pool = ChunkedPool::new(self.stream(), page_floats * dtype.size(), pages)?;
        Ok(CudaPagePool {
            page: page_floats,
            dtype,
            pool,
            staging: Default::default(),
        })
    }

    /// Keeps the chunks: giving device memory back (per chunk, once all its blocks are free)
    /// is left for when the engine releases blocks.
    fn release_kv_blocks(&self, pool: &mut CudaKvPool, blocks: &[u32]) -> Result<(), TensorError> {
        let n = pool.layout.num_blocks;
        match blocks.iter().find(|&&b| b as usize >= n) {
            Some(b) => Err(TensorError::Range(format!("KV block {b} ≥ {n}"))),
            None => Ok(()),
        }
    }

    /// Keeps the chunks, as [`Self::release_kv_blocks`].
    fn release_pages(&self, pool: &mut CudaPagePool, pages: &[u32]) -> Result<(), TensorError> {
        let n = pool.pool.units;
        match pages.iter().find(|&&p| p as usize >= n) {
            Some(p) => Err(TensorError::Range(format!("page {p} ≥ {n}"))),
            None => Ok(()),
        }
    }

    fn write_pages(&self, pool: &mut CudaPagePool, pages: &[u32], data: &[f32]) -> Result<(), TensorError> {
        crate::lora::write_pages(self, pool, pages, data)
    }

    fn download_weight(&self, w: &CudaWeight) -> Result<Matrix, TensorError> {
        use quiver_tensor::{MatrixData, TypedSlice};
        if let Some(q) = &w.quant {
            return crate::quant::download(self, w, q);
        }
        let bytes = self.stream().clone_dtoh(&w.data).map_err(dev)?;
        let data = match w.dtype {
            DType::F32 => MatrixData::F32(TypedSlice::from_vec(bytemuck::pod_collect_to_vec(&bytes))),
            DType::F16 => MatrixData::F16(TypedSlice::from_vec(bytemuck::pod_collect_to_vec(&bytes))),
            DType::BF16 => MatrixData::BF16(TypedSlice::from_vec(bytemuck::pod_collect_to_vec(&bytes))),
        };
        Matrix::new(w.rows, w.cols, data)
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaSlice<f32>) -> Result<(), TensorError> {
        let w = table.cols;
        check("embed", out.len() >= ids.len() * w, || {
            format!("{} ids of {w} into {}", ids.len(), out.len())
        })?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= table.rows) {
            return Err(TensorError::Range(format!(
                "token id {bad} ≥ vocabulary {}",
                table.rows
            )));
        }
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(q) = &table.quant {
            let ids_d = self.htod(ids)?;
            return crate::quant::embed(self, table, q, &ids_d, ids.len(), out);
        }
        let name = match table.dtype {
            DType::F32 => "embed_f32",
            DType::BF16 => "embed_bf16",
            DType::F16 => "embed_f16",
        };
        let ids_d = self.htod(ids)?;
        let width = w as i32;
        let mut b = self.stream().launch_builder(self.func(name)?);
        b.arg(&table.data).arg(&ids_d).arg(out).arg(&width);
        // SAFETY: argument types match the kernel; bounds checked above.
        unsafe { b.launch(grid(ids.len(), 1, 256)) }.map_err(dev)?;
        Ok(())
    }

    fn matmul(
        &self,
        x: &CudaSlice<f32>,
        m: usize,
        w: &CudaWeight,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), TensorError> {
        crate::linear::matmul(self, x, m, w, out)
    }

    fn add_bias(&self, x: &mut CudaSlice<f32>, bias: &CudaSlice<f32>) -> Result<(), TensorError> {
        let (n, width) = (x.len(), bias.len());
        check("add_bias", width > 0 && n.is_multiple_of(width), || {
            format!("{n} values, bias of {width}")
        })?;
        let w = width as i32;
        let mut b = self.stream().launch_builder(self.func("add_bias")?);
        b.arg(x).arg(bias).arg(&w).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(flat(n)) }.map_err(dev)?;
        Ok(())
    }

    fn add(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>) -> Result<(), TensorError> {
        let n = acc.len();
        check("add", x.len() >= n, || format!("{} += {}", n, x.len()))?;
        let mut b = self.stream().launch_builder(self.func("add")?);
        b.arg(acc).arg(x).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(flat(n)) }.map_err(dev)?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), TensorError> {
        let d = w.len();
        check(
            "rms_norm",
            d > 0 && x.len().is_multiple_of(d) && out.len() >= x.len(),
            || format!("{} values, width {d}, out {}", x.len(), out.len()),
        )?;
        let (rows, width) = (x.len() / d, d as i32);
        let mut b = self.stream().launch_builder(self.func("rms_norm")?);
        b.arg(x).arg(w).arg(out).arg(&width).arg(&eps);
        // SAFETY: as above.
        unsafe { b.launch(grid(rows, 1, 256)) }.map_err(dev)?;
        Ok(())
    }

    fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<(), TensorError> {
        let n = gate.len();
        check("silu_mul", up.len() >= n, || format!("{n} gates, {} ups", up.len()))?;
        let mut b = self.stream().launch_builder(self.func("silu_mul")?);
        b.arg(gate).arg(up).arg(&n);
        // SAFETY: as above.
        unsafe { b.launch(flat(n)) }.map_err(dev)?;
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> Result<(), TensorError> {
        let half = table.half_dim;
        let tokens = positions.len();
        check(
            "rope",
            x.len() >= tokens * heads * head_dim && 2 * half <= head_dim,
            || format!("{} values for {tokens}×{heads}×{head_dim}, rotary half {half}", x.len()),
        )?;
        if tokens == 0 || half == 0 {
            return Ok(());
        }
        if let Some(&p) = positions.iter().find(|&&p| p as usize >= table.max_positions()) {
            return Err(TensorError::Range(format!("position {p} ≥ {}", table.max_positions())));
        }
        // Only the batch's rows of the table travel, and once per step (q and k of every layer
        // use the same rows), not the whole table once per call.
        let gather = |src: &[f32]| -> Vec<f32> {
            positions
                .iter()
                .flat_map(|&p| src[p as usize * half..(p as usize + 1) * half].iter().copied())
                .collect()
        };
        let (cos, sin) = (gather(&table.cos), gather(&table.sin));
        let cos_d = self.inner.reuse.f32s("rope_cos", &cos, || self.htod(&cos))?;
        let sin_d = self.inner.reuse.f32s("rope_sin", &sin, || self.htod(&sin))?;
        let (h, hd, hf) = (heads as i32, head_dim as i32, half as i32);
        let mut b = self.stream().launch_builder(self.func("rope")?);
        b.arg(x).arg(&*cos_d).arg(&*sin_d).arg(&h).arg(&hd).arg(&hf);
        // SAFETY: as above.
        unsafe { b.launch(grid(tokens, heads, 64)) }.map_err(dev)?;
        Ok(())
    }

    fn write_kv(
        &self,
        pool: &mut CudaKvPool,
        layer: usize,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        slots: &[u32],
    ) -> Result<(), TensorError> {
        crate::attention::write_kv(self, pool, layer, k, v, slots)
    }

    fn attention(
        &self,
        pool: &CudaKvPool,
        layer: usize,
        q: &CudaSlice<f32>,
        heads: usize,
        batch: &AttentionBatch,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), TensorError> {
        crate::attention::attention(self, pool, layer, q, heads, batch, out)
    }

    fn lora(
        &self,
        pool: &CudaPagePool,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        in_f: usize,
        out_f: usize,
        segments: &[LoraSegment<'_>],
    ) -> Result<(), TensorError> {
        crate::lora::lora(self, pool, x, y, in_f, out_f, segments)
    }

    fn lora_batch<'a>(
        &self,
        pool: &'a CudaPagePool,
        plan: LoraPlan<'a>,
    ) -> Result<crate::lora::CudaLoraBatch<'a>, TensorError> {
        crate::lora::lora_batch(self, pool, plan)
    }

    fn lora_slot(
        &self,
        batch: &crate::lora::CudaLoraBatch<'_>,
        slot: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), TensorError> {
        crate::lora::lora_slot(self, batch, slot, x, y)
    }

    fn gather_rows(
        &self,
        x: &CudaSlice<f32>,
        width: usize,
        rows: &[u32],
        out: &mut CudaSlice<f32>,
    ) -> Result<(), TensorError> {
        let n = x.len() / width.max(1);
        check("gather_rows", out.len() >= rows.len() * width, || {
            format!("{} rows of {width} into {}", rows.len(), out.len())
        })?;
        if let Some(bad) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(TensorError::Range(format!("row {bad} ≥ {n}")));
        }
        if rows.is_empty() {
            return Ok(());
        }
        let rows_d = self.htod(rows)?;
        let w = width as i32;
        let mut b = self.stream().launch_builder(self.func("gather_rows")?);
        b.arg(x).arg(&rows_d).arg(out).arg(&w);
        // SAFETY: as above.
        unsafe { b.launch(grid(rows.len(), 1, 256)) }.map_err(dev)?;
        Ok(())
    }
}

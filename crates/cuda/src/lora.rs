//! Adapter pages on the device: host → device paging through a pinned buffer on the copy stream,
//! and the shrink/expand gather kernels (SGMV for prefill segments, BGMV for decode rows).

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice, PushKernelArg};
use half::bf16;
use quiver_tensor::{DType, LoraSegment, TensorError};

use crate::backend::{check, grid, CudaBackend, CudaPagePool};
use crate::error::dev;

const NO_SEGMENT: u32 = u32::MAX;

/// One u32 buffer describing a call (layout in kernels/lora.cu): per-token segment, per-segment
/// (rank, scale bits, A page list offset, Bᵀ page list offset), then the page lists.
pub fn build_meta(
    tokens: usize,
    in_f: usize,
    out_f: usize,
    page: usize,
    segments: &[LoraSegment<'_>],
) -> Result<(Vec<u32>, usize), TensorError> {
    let mut tok_seg = vec![NO_SEGMENT; tokens];
    let mut max_rank = 0;
    for (i, s) in segments.iter().enumerate() {
        let m = s.module;
        check("lora", s.start + s.len <= tokens, || {
            format!("segment {}..{} of {tokens} tokens", s.start, s.start + s.len)
        })?;
        check(
            "lora",
            m.a_pages.len() == m.rank * (in_f / page) && m.b_pages.len() == m.rank * (out_f / page),
            || {
                format!(
                    "rank {} module with {} A / {} B pages for {in_f}→{out_f}",
                    m.rank,
                    m.a_pages.len(),
                    m.b_pages.len()
                )
            },
        )?;
        for t in &mut tok_seg[s.start..s.start + s.len] {
            check("lora", *t == NO_SEGMENT, || "overlapping segments".into())?;
            *t = i as u32;
        }
        max_rank = max_rank.max(m.rank);
    }
    let seg_base = tokens;
    let mut meta = tok_seg;
    meta.resize(seg_base + 4 * segments.len(), 0);
    for (i, s) in segments.iter().enumerate() {
        let a_off = meta.len() as u32;
        meta.extend_from_slice(&s.module.a_pages);
        let b_off = meta.len() as u32;
        meta.extend_from_slice(&s.module.b_pages);
        meta[seg_base + 4 * i..seg_base + 4 * i + 4].copy_from_slice(&[
            s.module.rank as u32,
            s.module.scale.to_bits(),
            a_off,
            b_off,
        ]);
    }
    Ok((meta, max_rank))
}

pub fn lora(
    be: &CudaBackend,
    pool: &CudaPagePool,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    in_f: usize,
    out_f: usize,
    segments: &[LoraSegment<'_>],
) -> Result<(), TensorError> {
    let p = pool.page;
    check("lora", in_f.is_multiple_of(p) && out_f.is_multiple_of(p), || {
        format!("{in_f}→{out_f} not whole pages of {p}")
    })?;
    let tokens = x.len() / in_f.max(1);
    check("lora", y.len() >= tokens * out_f, || {
        format!("y {} for {tokens}×{out_f}", y.len())
    })?;
    let (meta, max_rank) = build_meta(tokens, in_f, out_f, p, segments)?;
    let pages = pool.pool.units;
    if let Some(bad) = meta[tokens + 4 * segments.len()..]
        .iter()
        .find(|&&id| id as usize >= pages)
    {
        return Err(TensorError::Range(format!("page {bad} ≥ pool of {pages}")));
    }
    // An unwritten page has no memory behind it; reading it would fault the whole context.
    if let Some(bad) = meta[tokens + 4 * segments.len()..]
        .iter()
        .find(|&&id| !pool.pool.is_committed(id))
    {
        return Err(TensorError::Range(format!(
            "adapter page {bad} is read before it was written"
        )));
    }
    if max_rank == 0 {
        return Ok(());
    }
    let suffix = if pool.dtype == DType::BF16 { "bf16" } else { "f32" };
    let meta_d = be.htod(&meta)?;
    let mut tmp = be.stream().alloc_zeros::<f32>(tokens * max_rank).map_err(dev)?;
    let (in_i, out_i, tok_i, page_i, rank_i) = (in_f as i32, out_f as i32, tokens as i32, p as i32, max_rank as i32);
    let per_chunk = pool.pool.per_chunk;
    let shrink = be.func(&format!("lora_shrink_{suffix}"))?;
    let mut b = be.stream().launch_builder(shrink);
    b.arg(x)
        .arg(&in_i)
        .arg(&meta_d)
        .arg(&tok_i)
        .arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&page_i)
        .arg(&mut tmp)
        .arg(&rank_i);
    // SAFETY: argument types match the kernel; page ids checked against the pool above.
    unsafe { b.launch(grid(tokens, max_rank, 128)) }.map_err(dev)?;
    let expand = be.func(&format!("lora_expand_{suffix}"))?;
    let mut b = be.stream().launch_builder(expand);
    b.arg(&tmp)
        .arg(&rank_i)
        .arg(&meta_d)
        .arg(&tok_i)
        .arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&page_i)
        .arg(y)
        .arg(&out_i);
    // SAFETY: as above.
    unsafe { b.launch(grid(tokens, out_f.div_ceil(256), 256)) }.map_err(dev)?;
    Ok(())
}

/// A pinned host buffer reused for every page upload; it grows to the largest upload seen, and is
/// only overwritten once the copy reading it has finished.
#[derive(Default)]
pub struct Staging {
    buf: Option<PinnedHostSlice<u8>>,
    copied: Option<CudaEvent>,
}

impl Staging {
    /// Copies `bytes` to a new device buffer on the copy stream; the compute stream waits for the
    /// copy before its next kernel, the host does not.
    fn stage(&mut self, be: &CudaBackend, bytes: &[u8]) -> Result<CudaSlice<u8>, TensorError> {
        let inner = &be.inner;
        if let Some(done) = self.copied.take() {
            done.synchronize().map_err(dev)?;
        }
        if self.buf.as_ref().is_none_or(|b| b.len() < bytes.len()) {
            // SAFETY: written below before any copy reads it; the old buffer's copy is done.
            let grown = bytes.len().max(self.buf.as_ref().map_or(0, |b| 2 * b.len()));
            self.buf = Some(unsafe { inner.ctx.alloc_pinned::<u8>(grown) }.map_err(dev)?);
        }
        let buf = self
            .buf
            .as_mut()
            .ok_or_else(|| TensorError::Device("no pinned staging buffer".into()))?;
        let host = &mut buf.as_mut_slice().map_err(dev)?[..bytes.len()];
        host.copy_from_slice(bytes);
        // SAFETY: filled by the copy below before anything reads it.
        let mut staged = unsafe { inner.copy_stream.alloc::<u8>(bytes.len()) }.map_err(dev)?;
        {
            let (dst, _sync) = staged.device_ptr_mut(&inner.copy_stream);
            // SAFETY: `host` is pinned memory of `bytes.len()` bytes that stays untouched until
            // `copied` fires; `dst` has room for all of it.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, inner.copy_stream.cu_stream()) }
                .map_err(dev)?;
        }
        let copied = inner.copy_stream.record_event(None).map_err(dev)?;
        inner.stream.wait(&copied).map_err(dev)?;
        self.copied = Some(copied);
        Ok(staged)
    }
}

impl Drop for Staging {
    /// The copy may still be reading the pinned buffer (the raw copy does not tell cudarc).
    fn drop(&mut self) {
        if let Some(done) = self.copied.take() {
            if let Err(e) = done.synchronize() {
                tracing::warn!(error = %e, "waiting for an adapter copy before freeing its buffer");
            }
        }
    }
}

/// Rounds `data` to the pool's dtype into a pinned buffer, copies it on the copy stream, and
/// scatters it to its pages on the compute stream once the copy is done. The forward pass
/// already queued keeps running meanwhile; the next one sees the pages.
pub fn write_pages(be: &CudaBackend, pool: &mut CudaPagePool, pages: &[u32], data: &[f32]) -> Result<(), TensorError> {
    let p = pool.page;
    check("write_pages", data.len() == pages.len() * p, || {
        format!("{} floats for {} pages of {p}", data.len(), pages.len())
    })?;
    if let Some(bad) = pages.iter().find(|&&id| id as usize >= pool.pool.units) {
        return Err(TensorError::Range(format!("page {bad} ≥ pool of {}", pool.pool.units)));
    }
    if pages.is_empty() {
        return Ok(());
    }
    let rounded: Vec<bf16>;
    let bytes: &[u8] = match pool.dtype {
        DType::BF16 => {
            rounded = data.iter().map(|&v| bf16::from_f32(v)).collect();
            bytemuck::cast_slice(&rounded)
        }
        _ => bytemuck::cast_slice(data),
    };
    let staged = pool.staging.stage(be, bytes)?;
    pool.pool.ensure(be.stream(), pages)?;
    let ids = be.htod(pages)?;
    let (per_chunk, page_bytes) = (pool.pool.per_chunk, (p * pool.dtype.size()) as i32);
    let mut b = be.stream().launch_builder(be.func("scatter_pages")?);
    b.arg(&staged)
        .arg(&ids)
        .arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&page_bytes);
    // SAFETY: argument types match the kernel; chunks committed and ids checked above.
    unsafe { b.launch(grid(pages.len(), 1, 256)) }.map_err(dev)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_tensor::LoraModule;

    #[test]
    fn meta_layout() {
        let m = LoraModule {
            rank: 2,
            scale: 0.5,
            a_pages: vec![7, 8, 9, 10],
            b_pages: vec![1, 2],
        };
        let segs = [LoraSegment {
            start: 1,
            len: 2,
            module: &m,
        }];
        let (meta, max_rank) = build_meta(4, 8, 4, 4, &segs).expect("valid");
        assert_eq!(max_rank, 2);
        assert_eq!(&meta[..4], &[NO_SEGMENT, 0, 0, NO_SEGMENT]);
        assert_eq!(&meta[4..8], &[2, 0.5f32.to_bits(), 8, 12]);
        assert_eq!(&meta[8..], &[7, 8, 9, 10, 1, 2]);
        let bad = [LoraSegment {
            start: 3,
            len: 2,
            module: &m,
        }];
        assert!(build_meta(4, 8, 4, 4, &bad).is_err());
    }
}

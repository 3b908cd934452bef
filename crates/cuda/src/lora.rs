//! Adapter pages on the device: host → device paging through a pinned buffer on the copy stream,
//! and the shrink/expand gather kernels (SGMV for prefill segments, BGMV for decode rows).

use std::collections::HashMap;

use cudarc::driver::{CudaEvent, CudaSlice, DevicePtrMut, PinnedHostSlice, PushKernelArg};
use half::bf16;
use quiver_tensor::{DType, LoraModule, LoraPlan, LoraSegment, TensorError};

use crate::backend::{check, grid, CudaBackend, CudaPagePool};
use crate::error::dev;

const NO_SEGMENT: u32 = u32::MAX;

/// One slot's part of a step's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotMeta {
    pub in_f: usize,
    pub out_f: usize,
    /// Offset of the slot's run table in the buffer.
    pub seg_base: u32,
    /// 0: no run has a module here, nothing to launch.
    pub max_rank: usize,
}

/// One u32 buffer describing a whole step (layout in kernels/lora.cu): per-token run, then per
/// slot a table of (rank, scale bits, A page list offset, Bᵀ page list offset) per run, then
/// every page list from `pages_from` on; a module's lists appear once however many runs use it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepMeta {
    pub meta: Vec<u32>,
    pub slots: Vec<SlotMeta>,
    pub pages_from: usize,
}

pub fn build_step_meta(plan: &LoraPlan<'_>, page: usize) -> Result<StepMeta, TensorError> {
    plan.check()?;
    let (tokens, runs) = (plan.tokens, plan.runs.len());
    let pages_from = tokens + 4 * runs * plan.slots.len();
    check("lora", u32::try_from(pages_from).is_ok(), || {
        format!("{pages_from} metadata entries")
    })?;
    let mut meta = vec![NO_SEGMENT; tokens];
    for (r, &(start, len)) in plan.runs.iter().enumerate() {
        meta[start..start + len].fill(r as u32);
    }
    meta.resize(pages_from, 0);
    let mut placed: HashMap<*const LoraModule, (u32, u32)> = HashMap::new();
    let mut slots = Vec::with_capacity(plan.slots.len());
    for (i, slot) in plan.slots.iter().enumerate() {
        let (in_f, out_f) = (slot.in_f, slot.out_f);
        check(
            "lora",
            page > 0 && in_f.is_multiple_of(page) && out_f.is_multiple_of(page),
            || format!("slot {i}: {in_f}→{out_f} not whole pages of {page}"),
        )?;
        let seg_base = tokens + 4 * runs * i;
        let mut max_rank = 0;
        for (r, m) in slot.modules.iter().enumerate() {
            let Some(m) = m else { continue };
            check(
                "lora",
                m.a_pages.len() == m.rank * (in_f / page) && m.b_pages.len() == m.rank * (out_f / page),
                || {
                    format!(
                        "slot {i}: rank {} module with {} A / {} B pages for {in_f}→{out_f}",
                        m.rank,
                        m.a_pages.len(),
                        m.b_pages.len()
                    )
                },
            )?;
            let (a_off, b_off) = match placed.get(&std::ptr::from_ref(*m)) {
                Some(&offs) => offs,
                None => {
                    let a_off = meta.len();
                    meta.extend_from_slice(&m.a_pages);
                    let b_off = meta.len();
                    meta.extend_from_slice(&m.b_pages);
                    check("lora", u32::try_from(meta.len()).is_ok(), || {
                        format!("{} metadata entries", meta.len())
                    })?;
                    let offs = (a_off as u32, b_off as u32);
                    placed.insert(std::ptr::from_ref(*m), offs);
                    offs
                }
            };
            meta[seg_base + 4 * r..seg_base + 4 * r + 4].copy_from_slice(&[
                m.rank as u32,
                m.scale.to_bits(),
                a_off,
                b_off,
            ]);
            max_rank = max_rank.max(m.rank);
        }
        slots.push(SlotMeta {
            in_f,
            out_f,
            seg_base: seg_base as u32,
            max_rank,
        });
    }
    Ok(StepMeta {
        meta,
        slots,
        pages_from,
    })
}

/// The layout of a lone call: [`build_step_meta`] for one slot whose runs are the segments.
pub fn build_meta(
    tokens: usize,
    in_f: usize,
    out_f: usize,
    page: usize,
    segments: &[LoraSegment<'_>],
) -> Result<(Vec<u32>, usize), TensorError> {
    let step = build_step_meta(&LoraPlan::single(tokens, in_f, out_f, segments), page)?;
    let max_rank = step.slots.first().map_or(0, |s| s.max_rank);
    Ok((step.meta, max_rank))
}

/// One step's adapters on the device: the metadata of every slot, uploaded once.
pub struct CudaLoraBatch<'a> {
    pool: &'a CudaPagePool,
    tokens: usize,
    slots: Vec<SlotMeta>,
    /// `None` when no slot has a module: nothing was uploaded.
    meta: Option<CudaSlice<u32>>,
}

/// Builds a step's metadata, checks every page id against the pool (in range and written) once,
/// and uploads it in one copy.
pub fn lora_batch<'a>(
    be: &CudaBackend,
    pool: &'a CudaPagePool,
    plan: LoraPlan<'a>,
) -> Result<CudaLoraBatch<'a>, TensorError> {
    let step = build_step_meta(&plan, pool.page)?;
    let page_ids = &step.meta[step.pages_from..];
    let pages = pool.pool.units;
    if let Some(bad) = page_ids.iter().find(|&&id| id as usize >= pages) {
        return Err(TensorError::Range(format!("page {bad} ≥ pool of {pages}")));
    }
    // An unwritten page has no memory behind it; reading it would fault the whole context.
    if let Some(bad) = page_ids.iter().find(|&&id| !pool.pool.is_committed(id)) {
        return Err(TensorError::Range(format!(
            "adapter page {bad} is read before it was written"
        )));
    }
    let meta = if step.slots.iter().any(|s| s.max_rank > 0) {
        Some(be.htod(&step.meta)?)
    } else {
        None
    };
    Ok(CudaLoraBatch {
        pool,
        tokens: plan.tokens,
        slots: step.slots,
        meta,
    })
}

pub fn lora_slot(
    be: &CudaBackend,
    batch: &CudaLoraBatch<'_>,
    slot: usize,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
) -> Result<(), TensorError> {
    let s = batch
        .slots
        .get(slot)
        .ok_or_else(|| TensorError::Range(format!("lora slot {slot} of {}", batch.slots.len())))?;
    let (tokens, in_f, out_f, max_rank) = (batch.tokens, s.in_f, s.out_f, s.max_rank);
    check("lora", x.len() == tokens * in_f && y.len() >= tokens * out_f, || {
        format!("x {} y {} for {tokens} tokens, {in_f}→{out_f}", x.len(), y.len())
    })?;
    let Some(meta_d) = batch.meta.as_ref().filter(|_| max_rank > 0) else {
        return Ok(());
    };
    let pool = batch.pool;
    let suffix = if pool.dtype == DType::BF16 { "bf16" } else { "f32" };
    let mut tmp = be.stream().alloc_zeros::<f32>(tokens * max_rank).map_err(dev)?;
    let (in_i, out_i, page_i, rank_i) = (in_f as i32, out_f as i32, pool.page as i32, max_rank as i32);
    let (seg_base, per_chunk) = (s.seg_base, pool.pool.per_chunk);
    let shrink = be.func(&format!("lora_shrink_{suffix}"))?;
    let mut b = be.stream().launch_builder(shrink);
    b.arg(x)
        .arg(&in_i)
        .arg(meta_d)
        .arg(&seg_base)
        .arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&page_i)
        .arg(&mut tmp)
        .arg(&rank_i);
    // SAFETY: argument types match the kernel; page ids checked against the pool when the batch
    // was built, and the batch borrows the pool so none has changed since.
    unsafe { b.launch(grid(tokens, max_rank, 128)) }.map_err(dev)?;
    let expand = be.func(&format!("lora_expand_{suffix}"))?;
    let mut b = be.stream().launch_builder(expand);
    b.arg(&tmp)
        .arg(&rank_i)
        .arg(meta_d)
        .arg(&seg_base)
        .arg(pool.pool.table())
        .arg(&per_chunk)
        .arg(&page_i)
        .arg(y)
        .arg(&out_i);
    // SAFETY: as above.
    unsafe { b.launch(grid(tokens, out_f.div_ceil(256), 256)) }.map_err(dev)?;
    Ok(())
}

/// A lone call: a one-slot batch, prepared and applied.
pub fn lora(
    be: &CudaBackend,
    pool: &CudaPagePool,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<f32>,
    in_f: usize,
    out_f: usize,
    segments: &[LoraSegment<'_>],
) -> Result<(), TensorError> {
    let tokens = x.len() / in_f.max(1);
    let batch = lora_batch(be, pool, LoraPlan::single(tokens, in_f, out_f, segments))?;
    lora_slot(be, &batch, 0, x, y)
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
    use quiver_tensor::LoraSlot;

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

    /// A step's one buffer: the token → run map once, a run table per slot at its `seg_base`
    /// (rank 0 where a run has no module there), then each module's page lists once.
    #[test]
    fn step_meta_layout_for_several_slots() {
        let m = |rank: usize, first: u32, a: usize, b: usize| LoraModule {
            rank,
            scale: rank as f32,
            a_pages: (first..first + a as u32).collect(),
            b_pages: (100 + first..100 + first + b as u32).collect(),
        };
        // Slot 0 is 8→4, slot 1 is 4→8, pages of 4 floats.
        let (x0, y0) = (m(1, 10, 2, 1), m(2, 20, 4, 2));
        let x1 = m(1, 30, 1, 2);
        let plan = LoraPlan {
            tokens: 5,
            runs: vec![(0, 2), (3, 1), (4, 1)],
            slots: vec![
                LoraSlot {
                    in_f: 8,
                    out_f: 4,
                    modules: vec![Some(&x0), Some(&y0), Some(&x0)],
                },
                LoraSlot {
                    in_f: 4,
                    out_f: 8,
                    modules: vec![Some(&x1), None, Some(&x1)],
                },
            ],
        };
        let step = build_step_meta(&plan, 4).expect("valid");
        assert_eq!(&step.meta[..5], &[0, 0, NO_SEGMENT, 1, 2]);
        let (s0, s1) = (5u32, 5 + 12u32);
        assert_eq!(
            step.slots,
            vec![
                SlotMeta {
                    in_f: 8,
                    out_f: 4,
                    seg_base: s0,
                    max_rank: 2
                },
                SlotMeta {
                    in_f: 4,
                    out_f: 8,
                    seg_base: s1,
                    max_rank: 1
                },
            ]
        );
        assert_eq!(step.pages_from, 29);
        let (x0a, x0b, y0a, y0b, x1a, x1b) = (29, 31, 32, 36, 38, 39);
        let table = |base: u32| &step.meta[base as usize..base as usize + 12];
        assert_eq!(
            table(s0),
            &[
                1,
                1f32.to_bits(),
                x0a,
                x0b,
                2,
                2f32.to_bits(),
                y0a,
                y0b,
                1,
                1f32.to_bits(),
                x0a,
                x0b
            ]
        );
        assert_eq!(
            table(s1),
            &[1, 1f32.to_bits(), x1a, x1b, 0, 0, 0, 0, 1, 1f32.to_bits(), x1a, x1b]
        );
        assert_eq!(
            &step.meta[29..],
            &[10, 11, 110, 20, 21, 22, 23, 120, 121, 30, 130, 131],
            "each module's lists once"
        );

        // Page lists that do not match a slot's dims, and runs that overlap, are refused.
        let mut wrong = plan.clone();
        wrong.slots[1].in_f = 8;
        assert!(build_step_meta(&wrong, 4).is_err());
        let mut overlap = plan.clone();
        overlap.runs[1] = (1, 2);
        assert!(build_step_meta(&overlap, 4).is_err());
        let mut short = plan;
        short.slots[0].modules.pop();
        assert!(build_step_meta(&short, 4).is_err());
    }
}

//! One LoRA batch per forward step: a backend that counts its calls shows that the model prepares
//! the step's adapters once and every adapted linear reads its slot of that one batch.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{ensure, Result};
use quiver_model::generate::BLOCK_SIZE;
use quiver_model::{
    lora_page_size, lora_slot, BatchBuilder, BlockAllocator, HostLoraModule, LoraAdapter, ModelBundle, ModelConfig,
    ModuleKind, SequenceCache,
};
use quiver_tensor::cpu::{CpuBackend, CpuKvPool, CpuPagePool};
use quiver_tensor::{AttentionBatch, Backend, DType, KvLayout, LoraPlan, LoraSegment, Matrix, RopeTable, TensorError};
use quiver_testkit::materialize;

/// `(tokens, runs, slots)` of a prepared plan.
type PlanShape = (usize, Vec<(usize, usize)>, usize);

/// What the model asked of the backend's LoRA entry points.
#[derive(Default)]
struct Calls {
    batches: AtomicUsize,
    lone: AtomicUsize,
    plans: Mutex<Vec<PlanShape>>,
    slots: Mutex<Vec<usize>>,
}

/// The CPU backend, counting LoRA calls.
#[derive(Clone, Default)]
struct Counting {
    cpu: CpuBackend,
    calls: Arc<Calls>,
}

impl Backend for Counting {
    type Tensor = Vec<f32>;
    type Weight = Matrix;
    type KvPool = CpuKvPool;
    type PagePool = CpuPagePool;
    type LoraBatch<'a> = <CpuBackend as Backend>::LoraBatch<'a>;

    fn name(&self) -> String {
        format!("counting {}", self.cpu.name())
    }
    fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.cpu.install(f)
    }
    fn upload_weight(&self, m: Matrix) -> Result<Matrix, TensorError> {
        self.cpu.upload_weight(m)
    }
    fn upload(&self, data: &[f32]) -> Result<Vec<f32>, TensorError> {
        self.cpu.upload(data)
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>, TensorError> {
        self.cpu.zeros(len)
    }
    fn download(&self, t: &Vec<f32>) -> Result<Vec<f32>, TensorError> {
        self.cpu.download(t)
    }
    fn new_kv_pool(&self, layout: KvLayout) -> Result<CpuKvPool, TensorError> {
        self.cpu.new_kv_pool(layout)
    }
    fn new_page_pool(&self, page_floats: usize, pages: usize, dtype: DType) -> Result<CpuPagePool, TensorError> {
        self.cpu.new_page_pool(page_floats, pages, dtype)
    }
    fn release_kv_blocks(&self, pool: &mut CpuKvPool, blocks: &[u32]) -> Result<(), TensorError> {
        self.cpu.release_kv_blocks(pool, blocks)
    }
    fn release_pages(&self, pool: &mut CpuPagePool, pages: &[u32]) -> Result<(), TensorError> {
        self.cpu.release_pages(pool, pages)
    }
    fn write_pages(&self, pool: &mut CpuPagePool, pages: &[u32], data: &[f32]) -> Result<(), TensorError> {
        self.cpu.write_pages(pool, pages, data)
    }
    fn download_weight(&self, w: &Matrix) -> Result<Matrix, TensorError> {
        self.cpu.download_weight(w)
    }
    fn embed(&self, table: &Matrix, ids: &[u32], out: &mut Vec<f32>) -> Result<(), TensorError> {
        self.cpu.embed(table, ids, out)
    }
    fn matmul(&self, x: &Vec<f32>, m: usize, w: &Matrix, out: &mut Vec<f32>) -> Result<(), TensorError> {
        self.cpu.matmul(x, m, w, out)
    }
    fn add_bias(&self, x: &mut Vec<f32>, bias: &Vec<f32>) -> Result<(), TensorError> {
        self.cpu.add_bias(x, bias)
    }
    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<(), TensorError> {
        self.cpu.add(acc, x)
    }
    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, eps: f32, out: &mut Vec<f32>) -> Result<(), TensorError> {
        self.cpu.rms_norm(x, w, eps, out)
    }
    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), TensorError> {
        self.cpu.silu_mul(gate, up)
    }
    fn rope(
        &self,
        x: &mut Vec<f32>,
        heads: usize,
        head_dim: usize,
        positions: &[u32],
        table: &RopeTable,
    ) -> Result<(), TensorError> {
        self.cpu.rope(x, heads, head_dim, positions, table)
    }
    fn write_kv(
        &self,
        pool: &mut CpuKvPool,
        layer: usize,
        k: &Vec<f32>,
        v: &Vec<f32>,
        slots: &[u32],
    ) -> Result<(), TensorError> {
        self.cpu.write_kv(pool, layer, k, v, slots)
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
        self.cpu.attention(pool, layer, q, heads, batch, out)
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
        self.calls.lone.fetch_add(1, Ordering::Relaxed);
        self.cpu.lora(pool, x, y, in_f, out_f, segments)
    }
    fn lora_batch<'a>(&self, pool: &'a CpuPagePool, plan: LoraPlan<'a>) -> Result<Self::LoraBatch<'a>, TensorError> {
        self.calls.batches.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut plans) = self.calls.plans.lock() {
            plans.push((plan.tokens, plan.runs.clone(), plan.slots.len()));
        }
        self.cpu.lora_batch(pool, plan)
    }
    fn lora_slot(
        &self,
        batch: &Self::LoraBatch<'_>,
        slot: usize,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<(), TensorError> {
        if let Ok(mut slots) = self.calls.slots.lock() {
            slots.push(slot);
        }
        self.cpu.lora_slot(batch, slot, x, y)
    }
    fn gather_rows(&self, x: &Vec<f32>, width: usize, rows: &[u32], out: &mut Vec<f32>) -> Result<(), TensorError> {
        self.cpu.gather_rows(x, width, rows, out)
    }
}

/// A random adapter of `rank` on the given projections of every layer.
fn adapter(cfg: &ModelConfig, rank: usize, kinds: &[ModuleKind], seed: u32) -> Vec<HostLoraModule> {
    let mut state = seed.wrapping_mul(2_654_435_761) | 1;
    let mut rnd = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        (state >> 8) as f32 / (1u32 << 24) as f32 * 0.2 - 0.1
    };
    let mut out = Vec::new();
    for layer in 0..cfg.num_layers {
        for &kind in kinds {
            let (i, o) = kind.dims(cfg);
            out.push(HostLoraModule {
                layer,
                kind,
                rank,
                scale: 2.0,
                a: (0..rank * i).map(|_| rnd()).collect(),
                b: (0..o * rank).map(|_| rnd()).collect(),
            });
        }
    }
    out
}

#[test]
fn adapters_are_prepared_once_per_step() -> Result<()> {
    let (dir, _) = materialize("llama-f32")?;
    let backend = Counting::default();
    let calls = backend.calls.clone();
    let model = ModelBundle::load(backend.clone(), dir.path(), None)?.model;
    let cfg = model.cfg.clone();
    let page = lora_page_size(&cfg);
    let mut pages = BlockAllocator::new(4096, page);
    let mut pool = backend.new_page_pool(page, pages.total(), DType::F32)?;
    let mut upload = |name, modules: &[HostLoraModule]| -> Result<Arc<LoraAdapter>> {
        Ok(Arc::new(LoraAdapter::upload(
            name, modules, &cfg, &backend, &mut pool, &mut pages,
        )?))
    };
    let all = upload("all", &adapter(&cfg, 4, &ModuleKind::ALL, 1))?;
    let qv = upload("qv", &adapter(&cfg, 2, &[ModuleKind::Q, ModuleKind::V], 2))?;

    // Rows: a prefill on `all`, a base prefill, a prefill on `qv`.
    let rows: [(&[u32], Option<&Arc<LoraAdapter>>); 3] =
        [(&[5, 9, 14, 3], Some(&all)), (&[7, 8], None), (&[11, 2, 6], Some(&qv))];
    let mut alloc = BlockAllocator::new(64, BLOCK_SIZE);
    let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
    let mut seqs = vec![SequenceCache::default(); rows.len()];
    let mut forward = |seqs: &mut [SequenceCache], step: usize| -> Result<Vec<f32>> {
        let mut b = BatchBuilder::new();
        for (seq, (ids, a)) in seqs.iter_mut().zip(&rows) {
            let ids: &[u32] = if step == 0 { ids } else { &ids[..1] };
            seq.reserve(&mut alloc, ids.len())
                .map_err(|_| anyhow::anyhow!("out of KV blocks"))?;
            b.push_with_adapter(seq, BLOCK_SIZE, ids, true, *a);
        }
        Ok(model
            .backend
            .download(&model.forward_with_adapters(&b.finish(), &mut kv, Some(&pool))?)?)
    };
    let prefill = forward(&mut seqs, 0)?;
    let decode = forward(&mut seqs, 1)?;

    let layers = cfg.num_layers;
    ensure!(calls.batches.load(Ordering::Relaxed) == 2, "one batch per step");
    ensure!(calls.lone.load(Ordering::Relaxed) == 0, "no per-call segments");
    let plans = calls.plans.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    ensure!(
        plans
            == vec![
                (9, vec![(0, 4), (6, 3)], 7 * layers),
                (3, vec![(0, 1), (2, 1)], 7 * layers)
            ],
        "plans {plans:?}"
    );
    // Every projection of every layer reads its own slot once per step, in forward order.
    let slots = calls.slots.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    let order = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
    ];
    let step: Vec<usize> = (0..layers).flat_map(|l| order.map(|k| lora_slot(l, k))).collect();
    ensure!(slots == [step.clone(), step].concat(), "slots {slots:?}");

    // The adapters change their rows; the base row is the base model's.
    let vocab = cfg.vocab_size;
    let base = {
        let mut alloc = BlockAllocator::new(64, BLOCK_SIZE);
        let mut kv = model.new_kv_pool(alloc.total(), BLOCK_SIZE)?;
        let mut b = BatchBuilder::new();
        let mut seqs = vec![SequenceCache::default(); rows.len()];
        for (seq, (ids, _)) in seqs.iter_mut().zip(&rows) {
            seq.reserve(&mut alloc, ids.len())
                .map_err(|_| anyhow::anyhow!("out of KV blocks"))?;
            b.push(seq, BLOCK_SIZE, ids, true);
        }
        model.backend.download(&model.forward(&b.finish(), &mut kv)?)?
    };
    let row = |v: &[f32], r: usize| v[r * vocab..(r + 1) * vocab].to_vec();
    let diff = |r| quiver_testkit::max_abs_diff(&row(&prefill, r), &row(&base, r));
    ensure!(diff(0) > 1e-3 && diff(2) > 1e-3, "adapted rows differ from the base");
    ensure!(diff(1) < 1e-4, "the base row is the base model's: {}", diff(1));
    ensure!(decode.len() == 3 * vocab);
    Ok(())
}

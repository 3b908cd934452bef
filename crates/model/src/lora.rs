//! LoRA adapters as the model sees them: per layer and projection, a rank, a scale and the
//! pages holding A and Bᵀ. The model applies them as a decorator on each linear; which tokens
//! use which adapter is a list of runs in the batch.

use std::sync::Arc;

use quiver_tensor::{Backend, LoraModule, LoraPlan, LoraSlot};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::kv::BlockAllocator;

/// The seven projections an adapter may target, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModuleKind {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl ModuleKind {
    pub const ALL: [ModuleKind; 7] = [
        ModuleKind::Q,
        ModuleKind::K,
        ModuleKind::V,
        ModuleKind::O,
        ModuleKind::Gate,
        ModuleKind::Up,
        ModuleKind::Down,
    ];

    pub fn proj_name(self) -> &'static str {
        match self {
            ModuleKind::Q => "q_proj",
            ModuleKind::K => "k_proj",
            ModuleKind::V => "v_proj",
            ModuleKind::O => "o_proj",
            ModuleKind::Gate => "gate_proj",
            ModuleKind::Up => "up_proj",
            ModuleKind::Down => "down_proj",
        }
    }

    pub fn from_proj_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.proj_name() == name)
    }

    /// `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            ModuleKind::Q | ModuleKind::K | ModuleKind::V | ModuleKind::O => "self_attn",
            _ => "mlp",
        }
    }

    /// Module path inside the model, e.g. `model.layers.3.self_attn.q_proj`.
    pub fn path(self, layer: usize) -> String {
        format!("model.layers.{layer}.{}.{}", self.parent(), self.proj_name())
    }

    /// `(in_features, out_features)` of this projection.
    pub fn dims(self, cfg: &ModelConfig) -> (usize, usize) {
        let (h, q, kv, i) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        match self {
            ModuleKind::Q => (h, q),
            ModuleKind::K | ModuleKind::V => (h, kv),
            ModuleKind::O => (q, h),
            ModuleKind::Gate | ModuleKind::Up => (h, i),
            ModuleKind::Down => (i, h),
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Page size (in floats) for adapter weights: a divisor of every projection dimension, so rows
/// split into whole pages; at most 256 floats.
pub fn lora_page_size(cfg: &ModelConfig) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    let dims = ModuleKind::ALL.iter().flat_map(|k| {
        let (i, o) = k.dims(cfg);
        [i, o]
    });
    let mut g = dims.fold(0, gcd);
    while g > 256 && g % 2 == 0 {
        g /= 2;
    }
    g.max(1)
}

/// One adapted projection in host memory, validated: `a` is `[rank, in]`, `b` is `[out, rank]`.
#[derive(Debug, Clone)]
pub struct HostLoraModule {
    pub layer: usize,
    pub kind: ModuleKind,
    pub rank: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// An adapter resident in a page pool. Immutable; in-flight requests hold it by `Arc`.
#[derive(Debug)]
pub struct LoraAdapter {
    pub name: String,
    /// `layers[l][kind.index()]`.
    pub layers: Vec<[Option<LoraModule>; 7]>,
    pages: Vec<u32>,
}

impl LoraAdapter {
    /// Copies `modules` into freshly allocated pages of `pool`.
    pub fn upload<B: Backend>(
        name: &str,
        modules: &[HostLoraModule],
        cfg: &ModelConfig,
        backend: &B,
        pool: &mut B::PagePool,
        pages: &mut BlockAllocator,
    ) -> Result<Self> {
        let page = pages.block_size();
        let need: usize = modules
            .iter()
            .map(|m| {
                let (i, o) = m.kind.dims(cfg);
                m.rank * (i + o) / page
            })
            .sum();
        let all = pages.alloc_many(need).ok_or_else(|| {
            ModelError::Input(format!(
                "adapter `{name}` needs {need} pages, {} free",
                pages.num_free()
            ))
        })?;
        let mut adapter = LoraAdapter {
            name: name.to_string(),
            layers: vec![Default::default(); cfg.num_layers],
            pages: all,
        };
        let mut next = 0;
        let mut take = |n: usize| {
            next += n;
            adapter.pages[next - n..next].to_vec()
        };
        let mut placed = Vec::new();
        for m in modules {
            let (in_f, out_f) = m.kind.dims(cfg);
            let a_pages = take(m.rank * in_f / page);
            // Bᵀ page (j, c) is b_pages[j · cout + c]; hand out the ids column page by column
            // page, so that the rank pages an expand strip reads together are adjacent.
            let cout = out_f / page;
            let ids = take(m.rank * cout);
            let b_pages: Vec<u32> = (0..m.rank * cout)
                .map(|q| ids[(q % cout) * m.rank + q / cout])
                .collect();
            backend.write_pages(pool, &a_pages, &m.a)?;
            let bt: Vec<f32> = (0..m.rank)
                .flat_map(|j| m.b.iter().skip(j).step_by(m.rank).copied())
                .collect();
            backend.write_pages(pool, &b_pages, &bt)?;
            placed.push((
                m.layer,
                m.kind,
                LoraModule {
                    rank: m.rank,
                    scale: m.scale,
                    a_pages,
                    b_pages,
                },
            ));
        }
        for (layer, kind, module) in placed {
            adapter.layers[layer][kind.index()] = Some(module);
        }
        Ok(adapter)
    }

    /// Returns the adapter's pages to the allocator.
    pub fn release(self, pages: &mut BlockAllocator) {
        pages.release(self.pages);
    }

    pub fn num_pages(&self) -> usize {
        self.pages.len()
    }

    pub fn module(&self, layer: usize, kind: ModuleKind) -> Option<&LoraModule> {
        self.layers.get(layer).and_then(|l| l[kind.index()].as_ref())
    }
}

/// Tokens `start..start + len` of a batch use `adapter`.
#[derive(Debug, Clone)]
pub struct AdapterRun {
    pub start: usize,
    pub len: usize,
    pub adapter: Arc<LoraAdapter>,
}

/// The slot of `kind` in `layer`: slots are numbered layer by layer, in [`ModuleKind::ALL`] order.
pub fn lora_slot(layer: usize, kind: ModuleKind) -> usize {
    layer * ModuleKind::ALL.len() + kind.index()
}

/// The plan of a step's runs: one slot per layer and projection (see [`lora_slot`]), each run
/// naming its adapter's module there.
pub fn lora_plan<'a>(runs: &'a [AdapterRun], tokens: usize, cfg: &ModelConfig) -> LoraPlan<'a> {
    let slots = (0..cfg.num_layers)
        .flat_map(|layer| ModuleKind::ALL.map(|kind| (layer, kind)))
        .map(|(layer, kind)| {
            let (in_f, out_f) = kind.dims(cfg);
            LoraSlot {
                in_f,
                out_f,
                modules: runs.iter().map(|r| r.adapter.module(layer, kind)).collect(),
            }
        })
        .collect();
    LoraPlan {
        tokens,
        runs: runs.iter().map(|r| (r.start, r.len)).collect(),
        slots,
    }
}

/// One step's adapters, prepared by the backend once and read by every adapted linear of the
/// step (vLLM's punica wrapper builds its metadata the same way, once per step).
pub struct LoraBatch<'a, B: Backend> {
    prepared: B::LoraBatch<'a>,
    /// Slots no run adapts: their linears skip the backend call.
    used: Vec<bool>,
}

impl<'a, B: Backend> LoraBatch<'a, B> {
    pub fn new(
        backend: &B,
        pool: &'a B::PagePool,
        runs: &'a [AdapterRun],
        tokens: usize,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        let plan = lora_plan(runs, tokens, cfg);
        let used = plan
            .slots
            .iter()
            .map(|s| s.modules.iter().any(Option::is_some))
            .collect();
        Ok(LoraBatch {
            prepared: backend.lora_batch(pool, plan)?,
            used,
        })
    }

    /// `y += ` the LoRA delta of slot `slot` for `x`.
    pub fn apply(&self, backend: &B, slot: usize, x: &B::Tensor, y: &mut B::Tensor) -> Result<()> {
        // A slot past the end goes to the backend, which reports it.
        if self.used.get(slot) != Some(&false) {
            backend.lora_slot(&self.prepared, slot, x, y)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_tensor::cpu::CpuBackend;
    use quiver_tensor::DType;

    /// A llama shape small enough to lay out by hand.
    fn tiny_config(layers: usize) -> ModelConfig {
        ModelConfig::from_json(&serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "max_position_embeddings": 64
        }))
        .expect("config")
    }

    /// The plan names each run's module in every slot: the slot's dims, `None` where the run's
    /// adapter does not target the projection.
    #[test]
    fn plan_has_every_slot_once() {
        let cfg = tiny_config(2);
        let module = |rank| LoraModule {
            rank,
            scale: 1.0,
            a_pages: vec![],
            b_pages: vec![],
        };
        let mut all = LoraAdapter {
            name: "all".into(),
            layers: vec![Default::default(); 2],
            pages: vec![],
        };
        let mut down = LoraAdapter {
            name: "down".into(),
            layers: vec![Default::default(); 2],
            pages: vec![],
        };
        for l in 0..2 {
            all.layers[l] = std::array::from_fn(|k| Some(module(k + 1)));
            down.layers[l][ModuleKind::Down.index()] = Some(module(9));
        }
        let (all, down) = (Arc::new(all), Arc::new(down));
        let runs = [
            AdapterRun {
                start: 0,
                len: 3,
                adapter: all.clone(),
            },
            AdapterRun {
                start: 4,
                len: 1,
                adapter: down,
            },
            AdapterRun {
                start: 5,
                len: 2,
                adapter: all,
            },
        ];
        let plan = lora_plan(&runs, 7, &cfg);
        assert_eq!(plan.tokens, 7);
        assert_eq!(plan.runs, vec![(0, 3), (4, 1), (5, 2)]);
        assert_eq!(plan.slots.len(), 14);
        for l in 0..2 {
            for kind in ModuleKind::ALL {
                let slot = &plan.slots[lora_slot(l, kind)];
                assert_eq!((slot.in_f, slot.out_f), kind.dims(&cfg));
                let ranks: Vec<Option<usize>> = slot.modules.iter().map(|m| m.map(|m| m.rank)).collect();
                let down = (kind == ModuleKind::Down).then_some(9);
                assert_eq!(ranks, vec![Some(kind.index() + 1), down, Some(kind.index() + 1)]);
                let segs: Vec<(usize, usize)> = plan.segments(slot).iter().map(|s| (s.start, s.len)).collect();
                let want = if down.is_some() {
                    vec![(0, 3), (4, 1), (5, 2)]
                } else {
                    vec![(0, 3), (5, 2)]
                };
                assert_eq!(segs, want);
            }
        }
        plan.check().expect("valid plan");
    }

    /// Upload stores A and Bᵀ page by page in the documented order, and hands out Bᵀ's ids
    /// column page by column page: the rank pages an expand strip reads together are adjacent.
    #[test]
    fn upload_lays_out_pages_for_the_strips() {
        let cfg = tiny_config(1);
        let (rank, page) = (3, 32);
        let (in_f, out_f) = ModuleKind::Up.dims(&cfg);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            (0..rank * in_f).map(|i| i as f32).collect(),
            (0..out_f * rank).map(|i| -(i as f32)).collect(),
        );
        let module = HostLoraModule {
            layer: 0,
            kind: ModuleKind::Up,
            rank,
            scale: 0.5,
            a: a.clone(),
            b: b.clone(),
        };
        let mut pages = BlockAllocator::new(64, page);
        let mut pool = CpuBackend::default()
            .new_page_pool(page, pages.total(), DType::F32)
            .expect("pool");
        let up =
            LoraAdapter::upload("t", &[module], &cfg, &CpuBackend::default(), &mut pool, &mut pages).expect("upload");
        let m = up.module(0, ModuleKind::Up).expect("module");
        let quiver_tensor::cpu::lora::PageData::F32(data) = &pool.data else {
            panic!("f32 pool")
        };
        let page_of = |id: u32| &data[id as usize * page..][..page];
        let (cin, cout) = (in_f / page, out_f / page);
        for j in 0..rank {
            for c in 0..cin {
                assert_eq!(page_of(m.a_pages[j * cin + c]), &a[j * in_f + c * page..][..page]);
            }
            for c in 0..cout {
                let want: Vec<f32> = (0..page).map(|o| b[(c * page + o) * rank + j]).collect();
                assert_eq!(page_of(m.b_pages[j * cout + c]), &want[..]);
            }
        }
        for c in 0..cout {
            let strip: Vec<u32> = (0..rank).map(|j| m.b_pages[j * cout + c]).collect();
            assert!(strip.windows(2).all(|w| w[1] == w[0] + 1), "strip {c}: {strip:?}");
        }
    }
}

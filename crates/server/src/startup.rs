//! Start-up: picks the backend (CPU, or CUDA when built with it and a GPU answers), loads the
//! model, starts the engine and registers the start-up adapters.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use quiver_adapters::load_peft_adapter;
use quiver_engine::{Engine, EngineConfig};
use quiver_model::{ModelBundle, Quantization};
use quiver_tensor::cpu::{CpuBackend, Precision};
use quiver_tensor::Backend;
use tokio::sync::Semaphore;

use crate::connections::ConnectionLimits;
use crate::device::Device;
use crate::models::{AdapterLoader, AdapterLoading};
use crate::openai::limits::InputLimits;
use crate::state::{AppState, Limits};

/// Everything `quiver serve` needs besides the socket.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub model: PathBuf,
    pub served_model_name: Option<String>,
    pub lora_modules: Vec<(String, PathBuf)>,
    /// Names among `lora_modules` that are pinned: uploaded at start, never evicted, their bytes
    /// held in the memory budget (`--pinned-lora-modules`).
    pub pinned_adapters: Vec<String>,
    pub adapter_root: Option<PathBuf>,
    pub api_key: Option<String>,
    pub admin_key: Option<String>,
    pub max_model_len: Option<usize>,
    /// Choices (prompts × `n`) admitted at once.
    pub max_concurrent: usize,
    pub max_body_bytes: usize,
    /// Prompts and characters per request (`--max-prompts-per-request`, `--max-prompt-chars`).
    pub input_limits: InputLimits,
    pub device: Device,
    /// Input precision of the CPU backend's matmuls (f32 = the reference; ignored on a GPU).
    pub cpu_matmul_precision: Precision,
    /// Leave the weights in the file mapping instead of copying them into huge pages (CPU).
    pub cpu_keep_weights_mapped: bool,
    /// Batch-invariant CPU kernels (`--batch-invariant`, `CpuBackend::with_batch_invariant`).
    pub cpu_batch_invariant: bool,
    /// Base weights quantized at load (`--quantization`).
    pub quantization: Quantization,
    /// On a GPU, size the KV + adapter budget as this fraction of the memory left free once the
    /// weights are resident; `None` keeps `engine.memory_budget`.
    pub gpu_memory_utilization: Option<f64>,
    pub engine: EngineConfig,
    /// Runtime (admin and just-in-time) adapter loading.
    pub adapter_loading: AdapterLoading,
    /// HTTP timeouts, open connections, shutdown deadline.
    pub connections: ConnectionLimits,
}

impl ServerOptions {
    /// Refuses limits under which the server would start but could not answer (a zero
    /// `--max-num-seqs` once queued every request forever); each message names its flag.
    pub fn check(&self) -> anyhow::Result<()> {
        let counts = [
            ("--max-num-seqs", self.engine.max_num_seqs),
            ("--max-num-batched-tokens", self.engine.max_batch_tokens),
            ("--max-concurrent-choices", self.max_concurrent),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-connections", self.connections.max_connections),
            ("--max-lora-rank", self.engine.max_lora_rank),
            ("--max-model-len", self.max_model_len.unwrap_or(1)),
        ];
        for (flag, value) in counts {
            anyhow::ensure!(value > 0, "{flag} 0: must be at least 1");
        }
        // Both are semaphores whose permits are counted in u32.
        for (flag, value) in [
            ("--max-concurrent-choices", self.max_concurrent),
            ("--max-connections", self.connections.max_connections),
        ] {
            anyhow::ensure!(
                value <= u32::MAX as usize,
                "{flag} {value}: must be at most {}",
                u32::MAX
            );
        }
        anyhow::ensure!(
            self.engine.memory_budget > 0,
            "--memory-budget-mb 0: the KV cache needs memory; give at least one sequence's worth"
        );
        for (flag, timeout) in [
            ("--http-header-read-timeout", self.connections.header_read_timeout),
            ("--http-body-read-timeout", self.connections.body_read_timeout),
        ] {
            anyhow::ensure!(
                !timeout.is_zero(),
                "{flag} 0: must be above 0 (a zero timeout ends every request before it arrives)"
            );
        }
        if let Some(f) = self.gpu_memory_utilization {
            anyhow::ensure!(
                f > 0.0 && f <= 1.0,
                "--gpu-memory-utilization {f}: must be above 0 and at most 1"
            );
        }
        Ok(())
    }
}

/// The longest sequence served: the model's own (or `--max-model-len`), and no longer than the KV
/// share of the budget holds. A `--max-model-len` that does not fit is refused, naming the
/// largest that does; the model's own maximum is capped to it instead, with a log line.
fn fit_model_len(given: Option<usize>, model_len: usize, kv_tokens: usize, budget: usize) -> anyhow::Result<usize> {
    if model_len <= kv_tokens {
        return Ok(model_len);
    }
    let mib = budget as f64 / (1 << 20) as f64;
    anyhow::ensure!(
        given.is_none() && kv_tokens > 1,
        "--max-model-len {model_len} does not fit: the memory budget ({mib:.1} MiB) holds a KV cache of \
         {kv_tokens} tokens, so the largest --max-model-len that fits is {kv_tokens}; raise \
         --memory-budget-mb (on a GPU: --gpu-memory-utilization), use a smaller --kv-cache-dtype, or \
         lower --max-model-len"
    );
    tracing::info!(
        model_len,
        max_model_len = kv_tokens,
        "the memory budget ({mib:.1} MiB) holds {kv_tokens} tokens of KV cache: max_model_len capped to \
         {kv_tokens} (raise --memory-budget-mb for more)"
    );
    Ok(kv_tokens)
}

/// Loads the model, starts the engine and registers the start-up adapters (each validated fully:
/// a broken adapter stops the start with its error).
pub fn build_state(opts: ServerOptions) -> anyhow::Result<Arc<AppState>> {
    opts.check()?;
    match opts.device {
        Device::Cpu => build_on(cpu_backend(&opts), opts, None),
        Device::Cuda(n) => build_on_cuda(n, opts),
        Device::Auto => {
            #[cfg(feature = "cuda")]
            match quiver_cuda::CudaBackend::new(0) {
                Ok(be) => return build_on_backend_cuda(be, opts),
                Err(e) => tracing::info!("--device auto: {e}; using the CPU"),
            }
            #[cfg(not(feature = "cuda"))]
            tracing::info!("--device auto: this build has no CUDA support (cargo feature `cuda`); using the CPU");
            build_on(cpu_backend(&opts), opts, None)
        }
    }
}

fn cpu_backend(opts: &ServerOptions) -> CpuBackend {
    tracing::info!(features = %quiver_tensor::cpu::features(), "CPU kernels dispatch on");
    let precision = opts.cpu_matmul_precision;
    if precision == Precision::Bf16Activations && !quiver_tensor::cpu::bf16_activations_supported() {
        tracing::warn!("--matmul-precision bf16: this CPU has no AVX512_BF16; matmuls stay in f32");
    }
    let backend = CpuBackend::with_precision(precision).with_batch_invariant(opts.cpu_batch_invariant);
    if opts.cpu_keep_weights_mapped {
        backend.keep_weights_mapped()
    } else {
        backend
    }
}

#[cfg(feature = "cuda")]
fn build_on_cuda(ordinal: usize, opts: ServerOptions) -> anyhow::Result<Arc<AppState>> {
    let be = quiver_cuda::CudaBackend::new(ordinal)?;
    build_on_backend_cuda(be, opts)
}

#[cfg(feature = "cuda")]
fn build_on_backend_cuda(be: quiver_cuda::CudaBackend, opts: ServerOptions) -> anyhow::Result<Arc<AppState>> {
    if opts.cpu_matmul_precision != Precision::F32 {
        tracing::info!("--matmul-precision applies to the CPU backend only; ignored on the GPU");
    }
    let probe = be.clone();
    let fraction = opts.gpu_memory_utilization;
    let budget = move || -> anyhow::Result<Option<usize>> {
        let Some(f) = fraction else { return Ok(None) };
        let (free, total) = probe.memory_info()?;
        Ok(Some(crate::device::device_budget(free, total, f)))
    };
    build_on(be, opts, Some(Box::new(budget)))
}

#[cfg(not(feature = "cuda"))]
fn build_on_cuda(ordinal: usize, _opts: ServerOptions) -> anyhow::Result<Arc<AppState>> {
    anyhow::bail!("--device cuda:{ordinal}: this build has no CUDA support; rebuild with `cargo build --release -p quiver --features cuda`")
}

/// Measures the device's memory budget once the weights are resident (`None`: keep the flag's).
type DeviceBudget = Box<dyn FnOnce() -> anyhow::Result<Option<usize>>>;

fn build_on<B: Backend>(
    backend: B,
    opts: ServerOptions,
    device_budget: Option<DeviceBudget>,
) -> anyhow::Result<Arc<AppState>> {
    tracing::info!(backend = %backend.name(), "loading {}", opts.model.display());
    let bundle = ModelBundle::load_with(backend, &opts.model, opts.max_model_len, opts.quantization)?;
    let cfg = bundle.model.cfg.clone();
    let model_len = bundle.model.max_positions();
    let served_name = opts
        .served_model_name
        .clone()
        .unwrap_or_else(|| opts.model.display().to_string());
    let mut engine_cfg = opts.engine.clone();
    if let Some(budget) = device_budget.map(|f| f()).transpose()?.flatten() {
        tracing::info!(bytes = budget, "KV + adapter budget sized from free device memory");
        engine_cfg.memory_budget = budget;
    }
    let block_bytes = bundle.model.kv_layout(1, engine_cfg.block_size).bytes_per_block();
    let kv_tokens = engine_cfg.memory_budget / block_bytes * engine_cfg.block_size;
    let max_model_len = fit_model_len(opts.max_model_len, model_len, kv_tokens, engine_cfg.memory_budget)?;
    engine_cfg.max_model_len = max_model_len;
    let limits = Limits {
        max_body_bytes: opts.max_body_bytes,
        max_concurrent: opts.max_concurrent,
        input: opts.input_limits,
        max_loras: crate::metrics::max_loras(&cfg, &engine_cfg, block_bytes),
        connections: opts.connections.clone(),
    };
    let tokenizer = Arc::new(bundle.tokenizer);
    let engine = Engine::start(
        bundle.model,
        Some(tokenizer.clone()),
        bundle.eos_token_ids.clone(),
        engine_cfg,
    )?;
    let mut adapters = BTreeMap::new();
    for (name, path) in &opts.lora_modules {
        let host = load_peft_adapter(name, path, &cfg)?;
        let pinned = opts.pinned_adapters.contains(name);
        engine
            .register_loaded_adapter(name, path.clone(), pinned, Arc::new(host))?
            .blocking_recv()??;
        adapters.insert(name.clone(), path.clone());
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Arc::new(AppState {
        engine,
        tokenizer,
        model_cfg: cfg,
        chat_template: bundle.chat_template,
        served_name,
        model_path: opts.model.display().to_string(),
        adapters: RwLock::new(adapters),
        adapter_root: opts.adapter_root,
        api_key: opts.api_key,
        admin_key: opts.admin_key,
        admission: Arc::new(Semaphore::new(limits.max_concurrent)),
        tokenizer_slots: Arc::new(Semaphore::new(
            std::thread::available_parallelism().map_or(1, usize::from),
        )),
        limits,
        draining: AtomicBool::new(false),
        metrics: Default::default(),
        created,
        loader: AdapterLoader::new(opts.adapter_loading, opts.engine.max_lora_rank),
    }))
}

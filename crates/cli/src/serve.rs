//! `quiver serve`: flags (vLLM's names where vLLM has one), the demo fallback, the runtime.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use quiver_engine::{EngineConfig, Policy};
use quiver_server::models::AdapterLoading;
use quiver_server::{ConnectionLimits, ServerOptions};
use quiver_tensor::DType;

#[derive(Parser, Debug)]
#[command(name = "quiver serve")]
pub struct ServeArgs {
    /// Hugging Face model directory. Without it, the built-in demo model and its adapters.
    #[arg(long, env = "QUIVER_MODEL")]
    pub model: Option<PathBuf>,
    /// Name of the base model in the API (`model` field); default: the model path.
    #[arg(long, env = "QUIVER_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Adapters to serve from the start: `NAME=PATH` or vLLM's JSON `{"name": .., "path": ..}`.
    #[arg(long, num_args = 1.., env = "QUIVER_LORA_MODULES", value_delimiter = ' ')]
    pub lora_modules: Vec<String>,
    /// Adapters to serve from the start, pinned: uploaded to device memory at start and never
    /// evicted (their bytes stay in the memory budget). Same forms as --lora-modules; the JSON
    /// form of --lora-modules also takes `"pinned": true`.
    #[arg(long, num_args = 1.., env = "QUIVER_PINNED_LORA_MODULES", value_delimiter = ' ')]
    pub pinned_lora_modules: Vec<String>,
    #[arg(long, default_value = "127.0.0.1", env = "QUIVER_HOST")]
    pub host: String,
    #[arg(long, default_value_t = 8000, env = "QUIVER_PORT")]
    pub port: u16,
    /// Clients must send `Authorization: Bearer KEY`.
    #[arg(long, env = "QUIVER_API_KEY")]
    pub api_key: Option<String>,
    /// Key for the admin endpoints (load/unload/list adapters); default: the API key.
    #[arg(long, env = "QUIVER_ADMIN_API_KEY")]
    pub admin_api_key: Option<String>,
    /// Directory runtime loads may read from (and where unknown names are looked up on first use).
    #[arg(long, env = "QUIVER_ADAPTER_ROOT")]
    pub adapter_root: Option<PathBuf>,
    /// Where the model runs: auto (CUDA when built with it and a GPU answers, else CPU), cpu,
    /// cuda or cuda:N.
    #[arg(long, default_value = "auto", env = "QUIVER_DEVICE")]
    pub device: quiver_server::Device,
    /// Memory shared by KV blocks and resident adapter pages, in MiB. Default: 2048 on the CPU;
    /// on a GPU, --gpu-memory-utilization of the memory left once the weights are loaded.
    #[arg(long, env = "QUIVER_MEMORY_BUDGET_MB")]
    pub memory_budget_mb: Option<usize>,
    /// Fraction of free GPU memory (after the weights) for KV blocks and adapter pages.
    #[arg(long, default_value_t = 0.9, env = "QUIVER_GPU_MEMORY_UTILIZATION")]
    pub gpu_memory_utilization: f64,
    /// Loaded adapters kept in host memory (LRU), in MiB.
    #[arg(long, default_value_t = 4096, env = "QUIVER_HOST_ADAPTER_BUDGET_MB")]
    pub host_adapter_budget_mb: usize,
    #[arg(long, default_value_t = 64, env = "QUIVER_MAX_LORA_RANK")]
    pub max_lora_rank: usize,
    /// Adapter page dtype: f32 (exact) or bf16 (half the memory); auto = bf16 for bf16 models.
    #[arg(long, default_value = "auto", env = "QUIVER_LORA_DTYPE")]
    pub lora_dtype: String,
    /// KV cache entries: auto (the dtype the checkpoint stores its weights in, also for a
    /// quantized base: bf16 for bf16 models, f32 for f32 ones), bf16, f16 or f32 (exact).
    /// 16-bit entries hold twice the tokens of f32 in the same memory budget.
    #[arg(long, default_value = "auto", env = "QUIVER_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: String,
    /// CPU matmul inputs: f32 (the reference: matches transformers in f32) or bf16 (bf16 weights
    /// only, on CPUs with AVX512_BF16: activations rounded to bf16 as llama.cpp and PyTorch-in-bf16
    /// do; prefill and large batches ~1.5x faster, logits differ by ~1e-2) or int8 (with
    /// --quantization: activations quantized to int8 at batch 1 too, not only from 2 rows on).
    #[arg(long, default_value = "f32", env = "QUIVER_MATMUL_PRECISION")]
    pub matmul_precision: quiver_tensor::cpu::Precision,
    /// On the CPU, read the weights from the safetensors mapping instead of copying matrices of
    /// 2 MB or more into huge pages at load (which decode streams ~20% faster; the copy needs
    /// memory for a private copy of those weights).
    #[arg(long, env = "QUIVER_CPU_KEEP_WEIGHTS_MAPPED")]
    pub cpu_keep_weights_mapped: bool,
    /// On the CPU, only kernels whose results for a token do not depend on the batch: the same
    /// request gets bitwise the same logprobs whatever shares its steps, however its prefill is
    /// chunked and with prefix caching on or off (as SGLang's --enable-deterministic-inference).
    /// Costs prefill speed (no `gemm` crate for large batches) and some batch-1 decode.
    #[arg(long, env = "QUIVER_BATCH_INVARIANT")]
    pub batch_invariant: bool,
    #[command(flatten)]
    pub quantization: crate::quantization::QuantizationArgs,
    #[arg(long, env = "QUIVER_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    #[arg(long, default_value_t = 64, env = "QUIVER_MAX_NUM_SEQS")]
    pub max_num_seqs: usize,
    /// Tokens per engine step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 512, env = "QUIVER_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: usize,
    /// Automatic prefix caching (on by default): full KV blocks are kept, keyed by their tokens,
    /// the tokens before them and the adapter (and its load), and reused by requests that start
    /// the same way; idle ones are evicted when memory is needed. `--no-enable-prefix-caching`
    /// turns it off; of the two flags the last given wins.
    #[arg(long, env = "QUIVER_ENABLE_PREFIX_CACHING", default_value_t = true, num_args = 0..=1,
          default_missing_value = "true", action = clap::ArgAction::Set,
          overrides_with = "no_enable_prefix_caching")]
    pub enable_prefix_caching: bool,
    #[arg(long, overrides_with = "enable_prefix_caching")]
    pub no_enable_prefix_caching: bool,
    /// `adapter-rr` (per-adapter queues in rotation) or `fcfs`.
    #[arg(long, default_value = "adapter-rr", env = "QUIVER_SCHEDULING_POLICY")]
    pub scheduling_policy: String,
    /// Choices (prompts × n) admitted at once, running or queued: a request that does not fit
    /// now gets 429 with Retry-After, one larger than this a 400. `--max-concurrent-requests`
    /// is the old name (it counted requests).
    #[arg(long, visible_alias = "max-concurrent-requests", default_value_t = 1024,
          value_parser = positive_u32, env = "QUIVER_MAX_CONCURRENT_CHOICES")]
    pub max_concurrent_choices: usize,
    /// Prompts in one completions request (`prompt` as a list).
    #[arg(long, default_value_t = quiver_server::openai::limits::DEFAULT_MAX_PROMPTS,
          value_parser = positive_u32, env = "QUIVER_MAX_PROMPTS_PER_REQUEST")]
    pub max_prompts_per_request: usize,
    /// Characters of prompt text per request (completions' text prompts together; every string
    /// of the chat messages and tools), checked before templating and tokenizing.
    #[arg(long, default_value_t = quiver_server::openai::limits::DEFAULT_MAX_PROMPT_CHARS,
          value_parser = positive_u32, env = "QUIVER_MAX_PROMPT_CHARS")]
    pub max_prompt_chars: usize,
    /// Prompt tokens per request, counted once per choice (prompts × n). Default: 16 ×
    /// max-model-len, so one prompt at any n always fits.
    #[arg(long, value_parser = positive_u32, env = "QUIVER_MAX_REQUEST_PROMPT_TOKENS")]
    pub max_request_prompt_tokens: Option<usize>,
    #[arg(long, default_value_t = 8 << 20, env = "QUIVER_MAX_BODY_BYTES")]
    pub max_body_bytes: usize,
    /// Most adapters registered just in time (requests naming a directory under --adapter-root);
    /// when full, the least recently used one no request is using is unregistered.
    #[arg(long, default_value_t = 1000, env = "QUIVER_MAX_JIT_ADAPTERS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_jit_adapters: u64,
    /// Seconds a failed adapter load is remembered: just-in-time requests for it get the same
    /// 400 without reading the files again (0: not remembered; the admin load API ignores it).
    #[arg(long, default_value_t = 30, env = "QUIVER_ADAPTER_FAILURE_TTL")]
    pub adapter_failure_ttl: u64,
    // Connections and shutdown (crates/server/src/connections.rs).
    /// Seconds a connection may take to send a request's headers, counted from when the server
    /// starts waiting for it: also how long an idle keep-alive connection stays open.
    #[arg(long, default_value = "10", value_parser = seconds, env = "QUIVER_HTTP_HEADER_READ_TIMEOUT")]
    pub http_header_read_timeout: Duration,
    /// Seconds a request's whole body may take to arrive; slower ones get 408. Responses (streamed
    /// or not) have no deadline.
    #[arg(long, default_value = "60", value_parser = seconds, env = "QUIVER_HTTP_BODY_READ_TIMEOUT")]
    pub http_body_read_timeout: Duration,
    /// Open connections at once; at the limit new ones wait in the listen backlog until one
    /// closes. Keep it below the open-file limit (`ulimit -n`).
    #[arg(long, default_value_t = 512, env = "QUIVER_MAX_CONNECTIONS")]
    pub max_connections: usize,
    /// Seconds running requests may take to finish after SIGTERM/Ctrl-C before they are
    /// cancelled and the process exits (Kubernetes' default grace period is 30).
    #[arg(long, default_value = "30", value_parser = seconds, env = "QUIVER_SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Duration,
}

/// A duration flag in seconds (fractions allowed).
impl ServeArgs {
    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.http_header_read_timeout,
            body_read_timeout: self.http_body_read_timeout,
            max_connections: self.max_connections,
            shutdown_timeout: self.shutdown_timeout,
        }
    }

    /// `--enable-prefix-caching` unless `--no-enable-prefix-caching` came last.
    fn prefix_caching(&self) -> bool {
        self.enable_prefix_caching && !self.no_enable_prefix_caching
    }
}

fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?} seconds: {e}"))
}

/// A limit flag: at least 1, and within what the admission semaphore counts (u32).
fn positive_u32(s: &str) -> Result<usize, String> {
    match s.parse::<u32>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v as usize),
        Err(e) => Err(e.to_string()),
    }
}

/// One `--lora-modules` entry: name, path, and whether its JSON form asks for pinning.
fn parse_module(s: &str) -> anyhow::Result<(String, PathBuf, bool)> {
    if s.trim_start().starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(s).with_context(|| format!("--lora-modules {s}"))?;
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let pinned = match v.get("pinned") {
            None => false,
            Some(p) => p
                .as_bool()
                .with_context(|| format!("--lora-modules {s}: \"pinned\" must be true or false"))?,
        };
        match (field("name"), field("path")) {
            (Some(n), Some(p)) => Ok((n, p.into(), pinned)),
            _ => bail!("--lora-modules {s}: JSON form needs \"name\" and \"path\""),
        }
    } else {
        let (n, p) = s
            .split_once('=')
            .with_context(|| format!("--lora-modules {s}: expected NAME=PATH"))?;
        Ok((n.to_string(), p.into(), false))
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut lora_modules: Vec<(String, PathBuf)> = Vec::new();
    let mut pinned_adapters: Vec<String> = Vec::new();
    let pinned_flag = args.pinned_lora_modules.iter().map(|s| (s, true));
    for (s, pin) in args.lora_modules.iter().map(|s| (s, false)).chain(pinned_flag) {
        let (name, path, pinned) = parse_module(s)?;
        if pin || pinned {
            pinned_adapters.push(name.clone());
        }
        lora_modules.push((name, path));
    }
    let (model, served) = match &args.model {
        Some(m) => (m.clone(), args.served_model_name.clone()),
        None => {
            let (model, adapters) = crate::demo::write_demo()?;
            lora_modules.extend(adapters);
            (
                model,
                Some(args.served_model_name.clone().unwrap_or_else(|| "quiver-demo".into())),
            )
        }
    };
    let policy = match args.scheduling_policy.as_str() {
        "adapter-rr" => Policy::AdapterRoundRobin,
        "fcfs" => Policy::Fcfs,
        other => bail!("--scheduling-policy {other}: expected adapter-rr or fcfs"),
    };
    let kv_cache_dtype = match args.kv_cache_dtype.as_str() {
        "auto" => None,
        "bf16" => Some(DType::BF16),
        "f16" => Some(DType::F16),
        "f32" => Some(DType::F32),
        other => bail!("--kv-cache-dtype {other}: expected auto, bf16, f16 or f32"),
    };
    let lora_dtype = match args.lora_dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        "auto" => {
            let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(model.join("config.json"))?)?;
            let dtype = cfg
                .get("torch_dtype")
                .or(cfg.get("dtype"))
                .and_then(|v| v.as_str())
                .unwrap_or("float32");
            if dtype == "bfloat16" {
                DType::BF16
            } else {
                DType::F32
            }
        }
        other => bail!("--lora-dtype {other}: expected auto, f32 or bf16"),
    };
    let opts = ServerOptions {
        model,
        served_model_name: served,
        lora_modules,
        pinned_adapters,
        adapter_root: args.adapter_root.clone(),
        api_key: args.api_key.clone(),
        admin_key: args.admin_api_key.clone(),
        max_model_len: args.max_model_len,
        max_concurrent: args.max_concurrent_choices,
        max_body_bytes: args.max_body_bytes,
        input_limits: quiver_server::openai::limits::InputLimits {
            max_prompts: args.max_prompts_per_request,
            max_chars: args.max_prompt_chars,
        },
        device: args.device,
        cpu_matmul_precision: args.matmul_precision,
        cpu_keep_weights_mapped: args.cpu_keep_weights_mapped,
        cpu_batch_invariant: args.batch_invariant,
        quantization: args.quantization.get(),
        gpu_memory_utilization: args.memory_budget_mb.is_none().then_some(args.gpu_memory_utilization),
        engine: EngineConfig {
            max_num_seqs: args.max_num_seqs,
            max_batch_tokens: args.max_num_batched_tokens,
            memory_budget: args.memory_budget_mb.unwrap_or(2048) << 20,
            host_adapter_budget: args.host_adapter_budget_mb << 20,
            max_lora_rank: args.max_lora_rank,
            policy,
            adapter_dtype: lora_dtype,
            kv_cache_dtype,
            max_request_prompt_tokens: args.max_request_prompt_tokens,
            enable_prefix_caching: args.prefix_caching(),
            ..EngineConfig::default()
        },
        connections: args.connection_limits(),
        adapter_loading: AdapterLoading {
            max_jit_adapters: args.max_jit_adapters as usize,
            failure_ttl: std::time::Duration::from_secs(args.adapter_failure_ttl),
        },
    };
    let state = quiver_server::build_state(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let names: Vec<String> = state
            .adapters
            .read()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default();
        tracing::info!(%addr, model = %state.served_name, adapters = ?names, "serving the OpenAI API");
        quiver_server::serve(state, listener, shutdown_signal()).await?;
        Ok(())
    });
    // `serve` kept to its deadline; work left on the blocking pool (a tokenization, an adapter
    // read) must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    result
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{parse_module, ServeArgs};

    #[test]
    fn prefix_caching_is_on_unless_turned_off_last() -> anyhow::Result<()> {
        let on = |args: &[&str]| -> anyhow::Result<bool> {
            let argv = std::iter::once("quiver serve").chain(args.iter().copied());
            Ok(ServeArgs::try_parse_from(argv)?.prefix_caching())
        };
        assert!(on(&[])?);
        assert!(!on(&["--no-enable-prefix-caching"])?);
        assert!(on(&["--enable-prefix-caching"])?);
        assert!(!on(&["--enable-prefix-caching", "--no-enable-prefix-caching"])?);
        assert!(on(&["--no-enable-prefix-caching", "--enable-prefix-caching"])?);
        assert!(!on(&["--enable-prefix-caching", "false"])?);
        Ok(())
    }

    /// The flags' defaults are written twice (clap needs literals); they must not drift apart.
    #[test]
    fn connection_flag_defaults_are_the_servers_defaults() -> anyhow::Result<()> {
        let args = ServeArgs::try_parse_from(["quiver serve"])?;
        assert_eq!(args.connection_limits(), quiver_server::ConnectionLimits::default());
        Ok(())
    }

    #[test]
    fn lora_modules_take_both_forms_and_json_pinning() -> anyhow::Result<()> {
        assert_eq!(parse_module("a=/x")?, ("a".into(), "/x".into(), false));
        let json = r#"{"name": "b", "path": "/y", "pinned": true}"#;
        assert_eq!(parse_module(json)?, ("b".into(), "/y".into(), true));
        let bad = parse_module(r#"{"name": "b", "path": "/y", "pinned": "yes"}"#);
        assert!(format!("{:#}", bad.err().ok_or_else(|| anyhow::anyhow!("accepted"))?).contains("pinned"));
        assert!(parse_module("no-equals").is_err());
        Ok(())
    }
}

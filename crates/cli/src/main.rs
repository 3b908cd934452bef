//! `quiver`: the command-line entry point.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use quiver_model::generate::generate_greedy;
use quiver_model::{IncrementalDecoder, ModelBundle};
use quiver_tensor::cpu::CpuBackend;

mod demo;
mod quantization;
mod serve;

#[derive(Parser)]
#[command(name = "quiver", version, about = "Multi-adapter LLM inference server")]
struct Cli {
    /// Log lines as text (colour only on a terminal) or as JSON objects for log shippers.
    #[arg(long, global = true, default_value = "text", env = "QUIVER_LOG_FORMAT")]
    log_format: LogFormat,
    /// Without a subcommand, `quiver` serves (the demo model unless --model is given).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logs(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API.
    Serve(Box<serve::ServeArgs>),
    /// Generate a completion for one prompt (greedy), streaming it to stdout.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer.json). Without it, the
    /// built-in demo model (test kit, random weights) is written to `target/demo-model` and used.
    #[arg(long, env = "QUIVER_MODEL")]
    model: Option<PathBuf>,
    /// Prompt text.
    #[arg(long)]
    prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64, env = "QUIVER_MAX_TOKENS")]
    max_tokens: usize,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Matmul inputs: f32 (the reference), bf16 or int8 (see `quiver serve --help`).
    #[arg(long, default_value = "f32", env = "QUIVER_MATMUL_PRECISION")]
    matmul_precision: quiver_tensor::cpu::Precision,
    /// Only batch-invariant CPU kernels (see `quiver serve --help`).
    #[arg(long, env = "QUIVER_BATCH_INVARIANT")]
    batch_invariant: bool,
    #[command(flatten)]
    quantization: quantization::QuantizationArgs,
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let dir = match args.model.clone() {
        Some(dir) => dir,
        None => demo::write_demo()?.0,
    };
    let backend = CpuBackend::with_precision(args.matmul_precision).with_batch_invariant(args.batch_invariant);
    let bundle = ModelBundle::load_with(backend, &dir, None, args.quantization.get())
        .with_context(|| format!("loading {}", dir.display()))?;
    let load_s = t0.elapsed().as_secs_f64();
    let prompt_ids = if args.chat {
        let Some(tmpl) = &bundle.chat_template else {
            bail!("{} has no chat template", dir.display())
        };
        let text = tmpl.render(
            &[serde_json::json!({"role": "user", "content": args.prompt})],
            true,
            None,
        )?;
        bundle.tokenizer.encode(&text, false)?
    } else {
        bundle.tokenizer.encode(&args.prompt, true)?
    };
    let mut decoder = IncrementalDecoder::new(true);
    let mut stdout = std::io::stdout();
    let t1 = Instant::now();
    let mut first: Option<f64> = None;
    let mut failed = None;
    let out = generate_greedy(
        &bundle.model,
        &prompt_ids,
        args.max_tokens,
        &bundle.eos_token_ids,
        None,
        |tok| {
            first.get_or_insert_with(|| t1.elapsed().as_secs_f64());
            match decoder.push(&bundle.tokenizer, tok) {
                Ok(Some(piece)) => {
                    print!("{piece}");
                    let _ = stdout.flush();
                }
                Ok(None) => {}
                Err(e) => failed = Some(e),
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if let Some(rest) = decoder.flush(&bundle.tokenizer)? {
        print!("{rest}");
    }
    println!();
    let total = t1.elapsed().as_secs_f64();
    let ttft = first.unwrap_or(total);
    let decode_tps = if out.len() > 1 {
        (out.len() - 1) as f64 / (total - ttft)
    } else {
        0.0
    };
    eprintln!(
        "[{}] load {load_s:.2}s · prompt {} tokens in {ttft:.3}s ({:.1} tok/s) · {} tokens, decode {decode_tps:.1} tok/s",
        bundle.model.backend_name(),
        prompt_ids.len(),
        prompt_ids.len() as f64 / ttft,
        out.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    match cli.command {
        Some(Command::Generate(args)) => generate(args),
        Some(Command::Serve(args)) => serve::run(*args),
        None => serve::run(serve::ServeArgs::parse_from(["quiver"])),
    }
}

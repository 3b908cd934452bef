//! Helpers shared by the benchmarks in `benches/benches/`.

pub mod bandwidth;
pub mod machine;
pub mod plot;
pub mod rng;
pub mod zipf;

pub use bandwidth::measure_read_bandwidth_gbps;
pub use machine::machine;
pub use plot::load_font;
pub use rng::Rng;
pub use zipf::{zipf_cdf, zipf_pick};

/// The Qwen2.5-0.5B-shaped test-kit model (random bf16 weights), written once under `target/`;
/// `QUIVER_BENCH_MODEL=DIR` uses an existing directory instead.
pub fn bench_model_dir() -> anyhow::Result<std::path::PathBuf> {
    bench_shape_dir("qwen2.5-0.5b")
}

/// [`bench_model_dir`] for any test-kit spec by name (e.g. `llama-3.2-1b`), written once under
/// `target/bench-models/NAME`; `QUIVER_BENCH_MODEL=DIR` still wins.
pub fn bench_shape_dir(name: &str) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context;
    if let Ok(dir) = std::env::var("QUIVER_BENCH_MODEL") {
        return Ok(dir.into());
    }
    let spec = quiver_testkit::spec_by_name(name).with_context(|| format!("no test-kit model named {name}"))?;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/bench-models")
        .join(name);
    if !dir.join("config.json").exists() {
        quiver_testkit::write_model(&spec, &dir).context("writing the benchmark model")?;
    }
    Ok(dir)
}

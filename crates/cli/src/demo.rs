//! The built-in demo: a tiny qwen2 model and three PEFT adapters from the test kit (random
//! weights, so the text is gibberish, but every path of the product is real), written once.

use std::path::PathBuf;

use anyhow::Context;

pub const DEMO_MODEL: &str = "qwen2-f32-tied";

/// `(model dir, [(adapter name, dir)])` under `target/demo`.
pub fn write_demo() -> anyhow::Result<(PathBuf, Vec<(String, PathBuf)>)> {
    let root = PathBuf::from("target/demo");
    let model = root.join(DEMO_MODEL);
    if !model.join("config.json").exists() {
        let spec = quiver_testkit::spec_by_name(DEMO_MODEL).context("demo model spec")?;
        quiver_testkit::write_model(&spec, &model)
            .with_context(|| format!("writing the demo model to {}", model.display()))?;
        tracing::info!(dir = %model.display(), "wrote the demo model");
    }
    let mut adapters = Vec::new();
    for spec in quiver_testkit::golden_adapter_specs()
        .into_iter()
        .filter(|s| s.base == DEMO_MODEL)
    {
        let dir = root.join("adapters").join(&spec.name);
        if !dir.join("adapter_config.json").exists() {
            quiver_testkit::write_adapter(&spec, &dir)
                .with_context(|| format!("writing demo adapter {}", spec.name))?;
        }
        adapters.push((spec.name.clone(), dir));
    }
    Ok((model, adapters))
}

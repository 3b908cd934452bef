//! `quiver-testkit write-goldens ROOT` | `quiver-testkit write-model NAME DIR` |
//! `quiver-testkit write-adapter NAME DIR` | `quiver-testkit write-lora-goldens ROOT` |
//! `quiver-testkit write-quant-goldens ROOT`

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: quiver-testkit write-goldens ROOT\n       \
                     quiver-testkit write-model NAME DIR   (NAME: a golden model or qwen2.5-0.5b)\n       \
                     quiver-testkit write-adapter NAME DIR   (NAME: a golden adapter)\n       \
                     quiver-testkit write-lora-goldens ROOT   (bases in ROOT/<base>, adapters in ROOT/adapters/<name>)\n       \
                     quiver-testkit write-quant-goldens ROOT   (bases in ROOT/<base>, dequantized in ROOT/<base>-<format>)";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["write-goldens", root] => {
            for (name, dir) in quiver_testkit::write_golden_models(Path::new(root))? {
                println!("{name}\t{}", dir.display());
            }
        }
        ["write-model", name, dir] => {
            let spec = quiver_testkit::spec_by_name(name).with_context(|| {
                let names: Vec<String> = quiver_testkit::golden_specs().into_iter().map(|s| s.name).collect();
                format!("unknown model {name}; known: {}, qwen2.5-0.5b", names.join(", "))
            })?;
            let start = Instant::now();
            let files = quiver_testkit::write_model(&spec, Path::new(dir))?;
            eprintln!(
                "wrote {} files to {dir} in {:.1}s",
                files.len(),
                start.elapsed().as_secs_f64()
            );
        }
        ["write-adapter", name, dir] => {
            let spec = quiver_testkit::adapter_spec_by_name(name).with_context(|| {
                let names: Vec<String> = quiver_testkit::golden_adapter_specs()
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                format!("unknown adapter {name}; known: {}", names.join(", "))
            })?;
            let files = quiver_testkit::write_adapter(&spec, Path::new(dir))?;
            eprintln!("wrote {} files to {dir} (adapter for {})", files.len(), spec.base);
        }
        ["write-lora-goldens", root] => {
            // Tab-separated, for tests/oracle/make_lora_goldens.py.
            let (models, adapters) = quiver_testkit::write_lora_goldens(Path::new(root))?;
            for (name, dir) in models {
                println!("model\t{name}\t{}", dir.display());
            }
            for (name, base, dir) in adapters {
                println!("adapter\t{name}\t{base}\t{}", dir.display());
            }
        }
        ["write-quant-goldens", root] => {
            // Tab-separated, for tests/oracle/make_quant_goldens.py.
            for (model, format, base, deq) in quiver_testkit::write_quant_goldens(Path::new(root))? {
                println!("{model}\t{format}\t{}\t{}", base.display(), deq.display());
            }
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}

//! `quiver-testkit write-goldens ROOT` | `quiver-testkit write-model NAME DIR`

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: quiver-testkit write-goldens ROOT\n       \
                     quiver-testkit write-model NAME DIR   (NAME: a golden model or qwen2.5-0.5b)";

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
                let names: Vec<String> = quiver_testkit::golden_specs()
                    .into_iter()
                    .map(|s| s.name)
                    .collect();
                format!(
                    "unknown model {name}; known: {}, qwen2.5-0.5b",
                    names.join(", ")
                )
            })?;
            let start = Instant::now();
            let files = quiver_testkit::write_model(&spec, Path::new(dir))?;
            eprintln!(
                "wrote {} files to {dir} in {:.1}s",
                files.len(),
                start.elapsed().as_secs_f64()
            );
        }
        _ => bail!("{USAGE}"),
    }
    Ok(())
}

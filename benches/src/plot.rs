//! What the benchmarks that draw plots share.

use anyhow::{Context, Result};
use plotters::style::FontStyle;

/// Registers the TrueType font the plots use (`QUIVER_BENCH_FONT`, DejaVu Sans by default).
pub fn load_font() -> Result<()> {
    let path =
        std::env::var("QUIVER_BENCH_FONT").unwrap_or_else(|_| "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf".into());
    let bytes = std::fs::read(&path).with_context(|| {
        format!("reading the plot font {path} (install fonts-dejavu-core or set QUIVER_BENCH_FONT to a .ttf file)")
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{path} is not a usable TrueType font"))
}

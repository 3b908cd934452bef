//! The PNG of `--bench prefix`: each run's TTFT distribution and its throughput.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use quiver_benches::load_font;

use crate::Row;

const COLORS: [RGBColor; 4] = [
    RGBColor(200, 60, 40),
    RGBColor(30, 90, 200),
    RGBColor(40, 150, 70),
    RGBColor(150, 90, 20),
];

/// Seconds for a tick at `log10(seconds)` (the axis is drawn in log10 for even tick spacing).
fn seconds(x: &f64) -> String {
    let t = 10f64.powf(*x);
    match t {
        t if t < 1.0 => format!("{t:.2}"),
        t if t < 10.0 => format!("{t:.1}"),
        t => format!("{t:.0}"),
    }
}

pub fn plot(rows: &[Row], path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(800);

    let all = rows.iter().flat_map(|r| r.ttft.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let x_range = lo.max(1e-3).log10() - 0.05..hi.max(1e-3).log10() + 0.05;
    let mut c = ChartBuilder::on(&left)
        .caption("Time to first token, every turn", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, 0.0..1.0)?;
    c.configure_mesh()
        .x_desc("TTFT, seconds (log scale)")
        .y_desc("fraction of turns")
        .x_labels(8)
        .x_label_formatter(&seconds)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for (r, color) in rows.iter().zip(COLORS) {
        let n = r.ttft.len() as f64;
        let points = r
            .ttft
            .iter()
            .enumerate()
            .map(|(i, &t)| (t.max(1e-3).log10(), (i + 1) as f64 / n));
        c.draw_series(LineSeries::new(points, color.stroke_width(3)))?
            .label(r.label.as_str())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let top = rows.iter().map(Row::requests_per_s).fold(0.0, f64::max) * 1.2;
    let mut c = ChartBuilder::on(&right)
        .caption("Throughput", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..top)?;
    c.configure_mesh()
        .disable_x_mesh()
        .x_desc("run (colours as on the left)")
        .y_desc("requests/s")
        .x_labels(0)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for (i, (r, color)) in rows.iter().zip(COLORS).enumerate() {
        let (x, y) = (i as f64, r.requests_per_s());
        c.draw_series([Rectangle::new([(x + 0.1, 0.0), (x + 0.9, y)], color.mix(0.8).filled())])?;
        c.draw_series([Text::new(
            format!("{y:.2}"),
            (x + 0.35, y + top * 0.02),
            ("sans-serif", 16),
        )])?;
    }
    root.present()?;
    Ok(())
}

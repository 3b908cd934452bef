//! Statistics, the machine description, the plot and the printed tables.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use quiver_benches::load_font;
pub use quiver_benches::machine;
use quiver_engine::EngineConfig;
use quiver_model::ModelBundle;
use quiver_tensor::cpu::CpuBackend;

use crate::adapters::adapter_spec;
use crate::runner::Point;
use crate::{MAX_MODEL_LEN, NOISE_CORES, OUTPUT_LEN, PROMPT_LEN};

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Nearest-rank percentile.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    s[((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1]
}

/// `all_runs[i]`: (output tok/s, disturbed) of every round of point `i`.
pub fn plot(points: &[Point], all_runs: &[Vec<(f64, bool)>], reference: Option<f64>, path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let xs = |p: &Point| p.adapters as f64;
    let x_range = (0.7f64..3000.0).log_scale();
    let fmt_x = |x: &f64| format!("{x:.0}");

    let top = all_runs.iter().flatten().fold(0.0, |a: f64, b| a.max(b.0)) * 1.15;
    let mut c = ChartBuilder::on(&left)
        .caption("Throughput vs number of adapters", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range.clone(), 0.0..top)?;
    c.configure_mesh()
        .x_desc("distinct adapters (log scale)")
        .y_desc("output tokens/s")
        .x_label_formatter(&fmt_x)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    c.draw_series(LineSeries::new(
        points.iter().map(|p| (xs(p), p.tok_s())),
        BLUE.stroke_width(3),
    ))?
    .label("throughput")
    .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(3)));
    c.draw_series(points.iter().map(|p| Circle::new((xs(p), p.tok_s()), 5, BLUE.filled())))?;
    let every: Vec<(f64, f64, bool)> = points
        .iter()
        .zip(all_runs)
        .flat_map(|(p, v)| v.iter().map(move |&(t, d)| (xs(p), t, d)))
        .collect();
    let faint = BLUE.mix(0.6).stroke_width(1);
    c.draw_series(
        every
            .iter()
            .filter(|e| !e.2)
            .map(|&(x, t, _)| Circle::new((x, t), 4, faint)),
    )?
    .label("each round (line: best)")
    .legend(move |(x, y)| Circle::new((x + 10, y), 4, faint));
    if every.iter().any(|e| e.2) {
        c.draw_series(
            every
                .iter()
                .filter(|e| e.2)
                .map(|&(x, t, _)| Cross::new((x, t), 4, faint)),
        )?
        .label("round disturbed by other processes")
        .legend(move |(x, y)| Cross::new((x + 10, y), 4, faint));
    }
    if let Some(r) = reference {
        let target = RED.mix(0.7).stroke_width(2);
        c.draw_series(DashedLineSeries::new(
            [(0.7, 0.95 * r), (3000.0, 0.95 * r)],
            8,
            6,
            target,
        ))?
        .label("target: 95% of the 8-adapter point")
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], target));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let top = points
        .iter()
        .flat_map(|p| [percentile(&p.ttft, 99.0), mean(&p.ttft)])
        .fold(0.0, f64::max)
        * 1.15;
    let mut c = ChartBuilder::on(&right)
        .caption("Time to first token (saturated)", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x_range, 0.0..top)?;
    c.configure_mesh()
        .x_desc("distinct adapters (log scale)")
        .y_desc("seconds")
        .x_label_formatter(&fmt_x)
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()?;
    for (name, color, f) in [
        (
            "p99 TTFT",
            RED,
            (|p: &Point| percentile(&p.ttft, 99.0)) as fn(&Point) -> f64,
        ),
        ("mean TTFT", RGBColor(0, 140, 60), |p: &Point| mean(&p.ttft)),
    ] {
        c.draw_series(LineSeries::new(
            points.iter().map(|p| (xs(p), f(p))),
            color.stroke_width(3),
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        c.draw_series(points.iter().map(|p| Circle::new((xs(p), f(p)), 5, color.filled())))?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// The model and the engine configuration, with what a full batch of KV blocks and one adapter
/// take against the budgets.
pub fn print_setup(model_dir: &Path, cfg: &EngineConfig) -> Result<()> {
    let bundle = ModelBundle::load(CpuBackend::default(), model_dir, Some(MAX_MODEL_LEN))?;
    let block = bundle.model.kv_layout(1, cfg.block_size).bytes_per_block();
    let page = quiver_model::lora_page_size(&bundle.model.cfg);
    let spec = adapter_spec(0);
    let host: usize = spec
        .modules()?
        .iter()
        .map(|m| 4 * m.r * (m.in_features + m.out_features))
        .sum();
    let device: usize = spec
        .modules()?
        .iter()
        .map(|m| m.r * (m.in_features + m.out_features) / page * page * 2)
        .sum();
    let kv_peak = cfg.max_num_seqs * (PROMPT_LEN.1 + OUTPUT_LEN.1).div_ceil(cfg.block_size) * block;
    println!("model: {} · {}", model_dir.display(), bundle.model.backend_name());
    println!(
        "engine: max_num_seqs {} · max_batch_tokens {} · memory budget {} MB (KV for a full batch of the longest requests: {} MB; one adapter: {:.2} MB of bf16 pages) · host adapter cache {} MB ({:.2} MB per adapter as f32 → {} adapters) · policy {:?}",
        cfg.max_num_seqs,
        cfg.max_batch_tokens,
        cfg.memory_budget >> 20,
        kv_peak >> 20,
        device as f64 / 1e6,
        cfg.host_adapter_budget >> 20,
        host as f64 / 1e6,
        cfg.host_adapter_budget / host,
        cfg.policy
    );
    Ok(())
}

/// One line per run of a sweep point (`round` counts from 0).
pub fn print_round(n: usize, round: usize, p: &Point) {
    println!(
        "  {n:>4} adapters, round {}: makespan {:.1} s ({:.1} output tok/s overall); saturated window {:.1} s{} with mean batch {:.1}, {:.0} ms per step: {} output tokens, {} requests finished; adapters: {} loads, {} uploads, {} device hits, {} device / {} host evictions; {} preemptions; other processes: {:.2} cores",
        round + 1,
        p.makespan,
        p.output_tokens as f64 / p.makespan,
        p.window,
        if p.saturated { "" } else { " (NOT saturated: whole run)" },
        p.mean_running,
        1e3 * p.window / p.steps.max(1) as f64,
        p.window_tokens,
        p.window_requests,
        p.stats.loads,
        p.stats.uploads,
        p.stats.device_hits,
        p.stats.device_evictions,
        p.stats.host_evictions,
        p.preemptions,
        p.others
    );
}

/// The results table, one row per point (its best round), in Markdown.
pub fn print_table(results: &[Point], all_runs: &[Vec<(f64, bool)>], reference: Option<f64>, rounds: usize) {
    println!(
        "columns: req/s and output tok/s over the saturated window (best of {rounds} rounds); TTFT = submit → first token; TPOT = (last − first token) / (tokens − 1) per request; adapter loads = disk → host loads; host hit rate = 1 − min(loads, uploads) / acquisitions (a lower bound) and device hit rate = device hits / acquisitions, where acquisitions = device hits + uploads from the host tier (about one per admitted request); * = a round that other processes disturbed (≥ {NOISE_CORES} cores busy) in all its tries\n"
    );
    println!("| adapters | req/s | output tok/s | mean TTFT | p99 TTFT | mean TPOT | p99 TPOT | adapter loads | host hit rate | device hit rate | mean batch | vs 8 adapters | tok/s of each round |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for (p, each) in results.iter().zip(all_runs) {
        let each: Vec<String> = each
            .iter()
            .map(|&(t, disturbed)| format!("{t:.1}{}", if disturbed { "*" } else { "" }))
            .collect();
        let vs = reference.map_or_else(|| "–".into(), |r| format!("{:+.1}%", 100.0 * (p.tok_s() / r - 1.0)));
        println!(
            "| {} | {:.2} | {:.1} | {:.2} s | {:.2} s | {:.0} ms | {:.0} ms | {} | {:.1}% | {:.1}% | {:.1} | {vs} | {} |",
            p.adapters,
            p.req_s(),
            p.tok_s(),
            mean(&p.ttft),
            percentile(&p.ttft, 99.0),
            1e3 * mean(&p.tpot),
            1e3 * percentile(&p.tpot, 99.0),
            p.stats.loads,
            100.0 * p.host_hit_rate(),
            100.0 * p.stats.device_hits as f64 / p.acquisitions().max(1) as f64,
            p.mean_running,
            each.join(" / "),
        );
    }
}

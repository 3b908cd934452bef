//! Quantized-weight matmul kernels on the Qwen2.5-0.5B shapes: each path (f32: dequantize in
//! registers; int: activations quantized to int8, integer dot products) at each batch size, on
//! this CPU's best kernels and on the AVX2 ones, next to bf16. The crossover of the two paths is
//! where `quant_matmul.rs` switches (`INT_MIN_M_*`).
//!
//! `cargo bench -p quiver-benches --bench quant [-- FILTER...]`: each FILTER (e.g. `int4`,
//! `m=8`, `down`) keeps only rows whose label contains it. Weights rotate through copies adding up
//! to 128 MiB, so small matrices are read from DRAM as in real decode; "best" of the calls within
//! a time budget is the figure to compare on a shared machine.

use std::time::{Duration, Instant};

use quiver_benches::measure_read_bandwidth_gbps;
use quiver_tensor::cpu::{features, matmul, matmul_quant_forced, ForcedPath};
use quiver_tensor::quant::quantize;
use quiver_tensor::{DType, Matrix, MatrixData, QuantFormat, TypedSlice};

const SHAPES: [(&str, usize, usize); 5] = [
    ("q/o 896x896", 896, 896),
    ("k/v 128x896", 128, 896),
    ("gate/up 4864x896", 4864, 896),
    ("down 896x4864", 896, 4864),
    ("lm_head 151936x896", 151936, 896),
];
const MS: [usize; 9] = [1, 2, 3, 4, 6, 8, 16, 32, 512];
const COLD_BYTES: usize = 128 << 20;
const ROW_BUDGET: Duration = Duration::from_millis(400);
const MIN_REPS: usize = 3;

/// What a row runs.
#[derive(Clone, Copy)]
enum Kind {
    Bf16,
    /// Format, path, and whether blocks carry zero shifts (GPTQ/AWQ with zero points).
    Quant(QuantFormat, ForcedPath, bool),
}

impl Kind {
    fn name(self) -> String {
        match self {
            Kind::Bf16 => "bf16".into(),
            Kind::Quant(f, p, false) => format!("{f} {}", path_name(p)),
            Kind::Quant(f, p, true) => format!("{f}+zp {}", path_name(p)),
        }
    }
}

fn path_name(p: ForcedPath) -> &'static str {
    match p {
        ForcedPath::F32 => "f32",
        ForcedPath::Int => "int",
        ForcedPath::Avx2F32 => "avx2-f32",
        ForcedPath::Avx2Int => "avx2-int",
    }
}

fn main() -> anyhow::Result<()> {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let threads = rayon::current_num_threads();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    println!("{threads} threads, CPU features: {}\n", features());
    println!("| shape | weights | m | best | GB/s | GFLOP/s | %BW (m = 1) |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut kinds = vec![Kind::Bf16];
    for f in [QuantFormat::Int8, QuantFormat::Int4] {
        for p in [
            ForcedPath::F32,
            ForcedPath::Int,
            ForcedPath::Avx2F32,
            ForcedPath::Avx2Int,
        ] {
            kinds.push(Kind::Quant(f, p, false));
        }
        for p in [ForcedPath::F32, ForcedPath::Int] {
            kinds.push(Kind::Quant(f, p, true));
        }
    }
    let mut seed = 1u64;
    for (name, n, k) in SHAPES {
        for kind in &kinds {
            let label = |m: usize| format!("{name} {} m={m}", kind.name());
            let ms: Vec<usize> = MS
                .into_iter()
                .filter(|&m| filters.iter().all(|f| label(m).contains(f.as_str())))
                .collect();
            if ms.is_empty() {
                continue;
            }
            let base = Matrix::from_f32_as(DType::BF16, n, k, weights(n * k, &mut seed))?;
            // Each copy in memory of its own (`Matrix::clone` would share the buffer).
            let mut copy = || -> anyhow::Result<Matrix> {
                Ok(match kind {
                    Kind::Bf16 => Matrix::from_f32_as(DType::BF16, n, k, base.to_f32_vec())?,
                    Kind::Quant(f, _, zero_points) => with_zero_shifts(quantize(&base, *f)?, *zero_points, &mut seed)?,
                })
            };
            let w = copy()?;
            let copies: Vec<Matrix> = (0..COLD_BYTES.div_ceil(w.bytes()))
                .map(|_| copy())
                .collect::<anyhow::Result<_>>()?;
            for m in ms {
                let x: Vec<f32> = weights(m * k, &mut seed).iter().map(|v| v * 50.0).collect();
                let mut out = vec![0.0f32; m * n];
                let bw = (m == 1).then(|| measure_read_bandwidth_gbps(threads));
                let run = |w: &Matrix, out: &mut [f32]| match kind {
                    Kind::Bf16 => matmul(&x, m, w, out),
                    Kind::Quant(_, p, _) => matmul_quant_forced(&x, m, w, out, *p),
                };
                let best = pool.install(|| {
                    run(&copies[0], &mut out);
                    let (mut best, start, mut reps) = (f64::MAX, Instant::now(), 0);
                    while reps < MIN_REPS || start.elapsed() < ROW_BUDGET {
                        let t = Instant::now();
                        run(&copies[reps % copies.len()], &mut out);
                        best = best.min(t.elapsed().as_secs_f64());
                        reps += 1;
                    }
                    best
                });
                std::hint::black_box(&out);
                let gbps = w.bytes() as f64 / best / 1e9;
                let pct = bw.map_or("".into(), |b| format!("{:.0}%", 100.0 * gbps / b));
                println!(
                    "| {name} | {} | {m} | {:.1} µs | {gbps:.1} | {:.1} | {pct} |",
                    kind.name(),
                    best * 1e6,
                    2.0 * (m * n * k) as f64 / best / 1e9
                );
            }
        }
    }
    Ok(())
}

/// Roughly Gaussian values, σ ≈ 0.02.
fn weights(len: usize, seed: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            (0..4)
                .map(|_| {
                    *seed ^= *seed << 13;
                    *seed ^= *seed >> 7;
                    *seed ^= *seed << 17;
                    (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
                })
                .sum::<f32>()
                * 0.017
        })
        .collect()
}

/// `m` with random per-block zero shifts when `on` (as a GPTQ/AWQ import with zero points has).
fn with_zero_shifts(m: Matrix, on: bool, seed: &mut u64) -> anyhow::Result<Matrix> {
    let (rows, cols) = (m.rows, m.cols);
    match m.data {
        MatrixData::Quant(mut q) if on => {
            let shifts = weights(rows * q.blocks, seed)
                .iter()
                .map(|v| (v * 200.0) as i16)
                .collect();
            q.zero_shifts = Some(TypedSlice::from_vec(shifts));
            Ok(Matrix::new(rows, cols, MatrixData::Quant(q))?)
        }
        data => Ok(Matrix::new(rows, cols, data)?),
    }
}

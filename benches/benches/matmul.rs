//! Matmul kernel throughput on the Qwen2.5-0.5B weight shapes.
//!
//! `cargo bench -p quiver-benches --bench matmul [-- FILTER...]`: each FILTER (e.g. `lm_head`,
//! `bf16`, `m=1`) keeps only rows whose label contains it. Weights rotate through enough
//! copies to exceed the L3 cache, so small matrices are read from DRAM as in real decode.
//! Times are wall clock; "best" is the figure to compare on a shared machine (neighbours only
//! slow a run down), GB/s and GFLOP/s are computed from it.
//!
//! `cargo bench -p quiver-benches --bench matmul -- hugepages`: batch-1 bf16 GEMV over weight
//! copies in 4 KB pages (a plain heap allocation) against the same copies in 2 MB transparent
//! huge pages ([`HugeVec`]), interleaved call by call in one run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use half::{bf16, f16};
use quiver_benches::measure_read_bandwidth_gbps;
use quiver_tensor::cpu::huge::HugeVec;
use quiver_tensor::cpu::{matmul, matmul_with, Precision};
use quiver_tensor::{DType, Matrix, MatrixData, TypedSlice};

const SHAPES: [(&str, usize, usize); 5] = [
    ("q/o 896x896", 896, 896),
    ("k/v 128x896", 128, 896),
    ("gate/up 4864x896", 4864, 896),
    ("down 896x4864", 896, 4864),
    ("lm_head 151936x896", 151936, 896),
];
const MS: [usize; 5] = [1, 8, 16, 32, 512];
/// Weight copies cycled through add up to at least this many bytes (4× the 32 MiB L3).
const COLD_BYTES: usize = 128 << 20;
/// Per-row time budget; every row runs at least `MIN_REPS` timed calls.
const ROW_BUDGET: Duration = Duration::from_millis(800);
const MIN_REPS: usize = 3;

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let threads = rayon::current_num_threads();
    // Run on a worker of the pool, as a forward pass should: a call from outside the pool pays
    // a cross-thread hand-off every time (measured separately below).
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    if filters.iter().any(|f| f == "hugepages") {
        pool.install(|| hugepages(threads));
        return;
    }
    let rows = pool.install(|| run_table(&filters, threads));
    println!("{threads} threads; %BW = weight GB/s / read bandwidth probed just before the row\n");
    println!(
        "{:<20} {:>5} {:>4} {:>10} {:>10} {:>8} {:>9} {:>6} {:>6}",
        "shape (n x k)", "dtype", "m", "best", "median", "GB/s", "GFLOP/s", "probe", "%BW"
    );
    for (name, dtype, m, nk, bytes, best, median, bw) in rows {
        let gbps = bytes as f64 / best / 1e9;
        let gflops = 2.0 * (m * nk) as f64 / best / 1e9;
        let (probe, pct) = match bw {
            Some(bw) => (format!("{bw:.1}"), format!("{:.0}%", 100.0 * gbps / bw)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<20} {dtype:>5} {m:>4} {:>10} {:>10} {gbps:>8.1} {gflops:>9.1} {probe:>6} {pct:>6}",
            fmt_time(best),
            fmt_time(median)
        );
    }
    if filters.is_empty() {
        let (inside, outside) = call_overhead(&pool);
        println!(
            "\n128x896 bf16 m=1 in cache, median per call: {} on a pool worker, {} called from outside the pool",
            fmt_time(inside),
            fmt_time(outside)
        );
    }
}

/// Weight types, and bf16 weights with bf16-rounded activations ("bf16a", `Precision::Bf16Activations`).
const MODES: [(DType, Precision); 4] = [
    (DType::BF16, Precision::F32),
    (DType::BF16, Precision::Bf16Activations),
    (DType::F16, Precision::F32),
    (DType::F32, Precision::F32),
];

fn mode_name(dtype: DType, precision: Precision) -> String {
    match precision {
        Precision::F32 => dtype.to_string(),
        Precision::Bf16Activations => format!("{dtype}a"),
        Precision::Int8Activations => format!("{dtype}i8a"),
    }
}

/// name, mode, m, n·k, weight bytes, best s, median s, probed GB/s (m = 1 rows).
type Row = (&'static str, String, usize, usize, usize, f64, f64, Option<f64>);

fn run_table(filters: &[String], threads: usize) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut seed = 1u64;
    for (name, n, k) in SHAPES {
        for (dtype, precision) in MODES {
            let mode = mode_name(dtype, precision);
            let label = |m: usize| format!("{name} {mode} m={m}");
            let ms: Vec<usize> = MS
                .into_iter()
                .filter(|&m| filters.iter().all(|f| label(m).contains(f.as_str())))
                .collect();
            if ms.is_empty() {
                continue;
            }
            eprintln!("{name} {mode} ...");
            let w = random_matrix(n, k, dtype, &mut seed);
            let copies: Vec<Matrix> = (0..COLD_BYTES.div_ceil(w.bytes())).map(|_| deep_copy(&w)).collect();
            drop(w);
            for m in ms {
                let x = random_vec(m * k, &mut seed);
                let mut out = vec![0.0f32; m * n];
                // Batch-1 rows are compared with the bandwidth of the moment: on a shared machine
                // it swings by 2× as neighbours come and go.
                let bw = (m == 1).then(|| measure_read_bandwidth_gbps(threads));
                let matmul = |x: &[f32], m, w: &Matrix, out: &mut [f32]| matmul_with(x, m, w, out, precision);
                matmul(&x, m, &copies[0], &mut out); // warm-up: thread pool, scratch buffers
                let mut times = Vec::new();
                let start = Instant::now();
                while times.len() < MIN_REPS || start.elapsed() < ROW_BUDGET {
                    let w = &copies[times.len() % copies.len()];
                    let t = Instant::now();
                    matmul(&x, m, w, &mut out);
                    times.push(t.elapsed().as_secs_f64());
                }
                std::hint::black_box(&out);
                times.sort_by(f64::total_cmp);
                rows.push((
                    name,
                    mode.clone(),
                    m,
                    n * k,
                    copies[0].bytes(),
                    times[0],
                    times[times.len() / 2],
                    bw,
                ));
            }
        }
    }
    rows
}

/// Median time of a small in-cache matmul called on a pool worker vs handed in from outside.
fn call_overhead(pool: &rayon::ThreadPool) -> (f64, f64) {
    let mut seed = 7u64;
    let (n, k) = (128, 896);
    let w = random_matrix(n, k, DType::BF16, &mut seed);
    let x = random_vec(k, &mut seed);
    let mut out = vec![0.0f32; n];
    let median = |f: &mut dyn FnMut()| {
        let mut t: Vec<f64> = (0..2000)
            .map(|_| {
                let s = Instant::now();
                f();
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let inside = pool.install(|| median(&mut || matmul(&x, 1, &w, &mut out)));
    let outside = median(&mut || pool.install(|| matmul(&x, 1, &w, &mut out)));
    (inside, outside)
}

fn fmt_time(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else {
        format!("{:.2} ms", s * 1e3)
    }
}

fn random_vec(len: usize, seed: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            // xorshift64; values in [-1, 1).
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn random_matrix(n: usize, k: usize, dtype: DType, seed: &mut u64) -> Matrix {
    let v = random_vec(n * k, seed);
    let data = match dtype {
        DType::F32 => MatrixData::F32(TypedSlice::from_vec(v)),
        DType::F16 => MatrixData::F16(TypedSlice::from_vec(v.iter().map(|&a| f16::from_f32(a)).collect())),
        DType::BF16 => MatrixData::BF16(TypedSlice::from_vec(v.iter().map(|&a| bf16::from_f32(a)).collect())),
    };
    Matrix::new(n, k, data).unwrap()
}

/// A copy with its own memory (`Matrix::clone` shares the buffer).
fn deep_copy(w: &Matrix) -> Matrix {
    let data = match &w.data {
        MatrixData::F32(s) => MatrixData::F32(TypedSlice::from_vec(s.to_vec())),
        MatrixData::F16(s) => MatrixData::F16(TypedSlice::from_vec(s.to_vec())),
        MatrixData::BF16(s) => MatrixData::BF16(TypedSlice::from_vec(s.to_vec())),
        MatrixData::Quant(_) => unreachable!("this benchmark makes float matrices only"),
    };
    Matrix::new(w.rows, w.cols, data).unwrap()
}

/// Bytes in huge pages, as the storage layer's shared-bytes type.
struct HugeBytes(HugeVec<u8>);
impl AsRef<[u8]> for HugeBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A bf16 copy of `w` in 2 MB pages.
fn huge_copy(w: &Matrix) -> Matrix {
    let MatrixData::BF16(s) = &w.data else {
        unreachable!("bf16 only")
    };
    let mut buf = HugeVec::<u8>::zeroed(2 * s.len());
    for (d, v) in buf.chunks_exact_mut(2).zip(s.iter()) {
        d.copy_from_slice(&v.to_bits().to_le_bytes());
    }
    let data = TypedSlice::from_bytes(Arc::new(HugeBytes(buf)), 0, s.len()).unwrap();
    Matrix::new(w.rows, w.cols, MatrixData::BF16(data)).unwrap()
}

/// Batch-1 bf16 GEMV, 4 KB pages vs 2 MB pages: calls alternate between the two sets of copies
/// (each set ≥ 128 MB, so every call reads from DRAM); best and median per set.
fn hugepages(threads: usize) {
    let mut seed = 3u64;
    println!("{threads} threads; bf16, m = 1; 4 KB pages vs 2 MB pages, interleaved\n");
    println!("| shape (n × k) | 4 KB: best, GB/s | 2 MB: best, GB/s | 4 KB median | 2 MB median | best 2 MB / 4 KB |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, n, k) in SHAPES {
        let w = random_matrix(n, k, DType::BF16, &mut seed);
        let count = COLD_BYTES.div_ceil(w.bytes());
        let small: Vec<Matrix> = (0..count).map(|_| deep_copy(&w)).collect();
        let huge: Vec<Matrix> = (0..count).map(|_| huge_copy(&w)).collect();
        let x = random_vec(k, &mut seed);
        let mut out = vec![0.0f32; n];
        matmul(&x, 1, &small[0], &mut out);
        matmul(&x, 1, &huge[0], &mut out);
        let (mut ts, mut th) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while ts.len() < 2 * MIN_REPS || start.elapsed() < 2 * ROW_BUDGET {
            let i = ts.len() % count;
            for (set, times) in [(&small, &mut ts), (&huge, &mut th)] {
                let t = Instant::now();
                matmul(&x, 1, &set[i], &mut out);
                times.push(t.elapsed().as_secs_f64());
            }
        }
        std::hint::black_box(&out);
        ts.sort_by(f64::total_cmp);
        th.sort_by(f64::total_cmp);
        let gb = w.bytes() as f64 / 1e9;
        println!(
            "| {name} | {}, {:.1} | {}, {:.1} | {} | {} | {:.2} |",
            fmt_time(ts[0]),
            gb / ts[0],
            fmt_time(th[0]),
            gb / th[0],
            fmt_time(ts[ts.len() / 2]),
            fmt_time(th[th.len() / 2]),
            ts[0] / th[0]
        );
    }
}

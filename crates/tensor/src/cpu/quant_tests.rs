//! Quantize → dequantize bounds per format, and every quantized-matmul kernel this CPU can run
//! against the f64 reference on the dequantized weights, at odd shapes and every batch class.

use super::quant_matmul::{matmul_quant_with, paths, Isa, QuantPaths, XInt};
use super::{features, matmul, matmul_ref, quant_scalar};
use crate::quant::{from_codes, quantize, QuantFormat, BLOCK, PANEL};
use crate::storage::{DType, Matrix, MatrixData};

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly Gaussian weights (σ ≈ 0.02) with 1% outliers 10× larger, as in trained models.
    fn weights(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let g = (0..4).map(|_| self.uniform()).sum::<f32>() * 0.017;
                if self.next().is_multiple_of(100) {
                    g * 10.0
                } else {
                    g
                }
            })
            .collect()
    }
}

const FORMATS: [QuantFormat; 2] = [QuantFormat::Int8, QuantFormat::Int4];

/// The stored scale of row r, block b.
fn scale(q: &Matrix, r: usize, b: usize) -> f32 {
    let MatrixData::Quant(d) = &q.data else {
        panic!("not quantized")
    };
    d.scales[((r / PANEL) * d.blocks + b) * PANEL + r % PANEL].to_f32()
}

/// Bounds (f32 division adds at most 127·2⁻²⁴ relative to the code):
/// * int8: d ≥ max|x|/127 (no code clips), d ≤ max|x|/127 · (1 + 2⁻¹⁰) (f16 rounding up) or the
///   smallest f16 step, and |x − q·d| ≤ d · (1/2 + 1e-5).
/// * int4: |d| within 2⁻¹¹ of max|x|/8 (f16 rounding), the extreme element on −8·d exactly
///   (±1 code rounding of f16), and |x − (q − 8)·d| ≤ |d| · (1/2 + 1e-5) where x/d ∈ [−8.5, 7.5],
///   ≤ |d| · (1 + 1e-5) elsewhere.
fn check_round_trip(rows: usize, cols: usize, v: &[f32], format: QuantFormat) {
    let m = Matrix::from_f32(rows, cols, v.to_vec()).unwrap();
    let q = quantize(&m, format).unwrap();
    assert_eq!((q.rows, q.cols, q.quant_format()), (rows, cols, Some(format)));
    let back = q.to_f32_vec();
    for r in 0..rows {
        for b in 0..cols.div_ceil(BLOCK) {
            let (lo, hi) = (r * cols + b * BLOCK, r * cols + ((b + 1) * BLOCK).min(cols));
            let (x, y) = (&v[lo..hi], &back[lo..hi]);
            let d = scale(&q, r, b);
            let amax = x.iter().fold(0.0f32, |a, t| a.max(t.abs()));
            let at = |c: usize| format!("{format} [{rows}, {cols}] row {r} col {}", b * BLOCK + c);
            match format {
                QuantFormat::Int8 => {
                    assert!(d >= amax / 127.0, "{}: scale {d} below max|x|/127", at(0));
                    assert!(
                        d <= amax / 127.0 * (1.0 + 1.0 / 1024.0) + 6e-8,
                        "{}: scale {d} too large",
                        at(0)
                    );
                    for (c, (a, b)) in x.iter().zip(y).enumerate() {
                        assert!((a - b).abs() <= d * (0.5 + 1e-5), "{}: {a} → {b} (scale {d})", at(c));
                    }
                }
                QuantFormat::Int4 => {
                    assert!(
                        (d.abs() - amax / 8.0).abs() <= amax / 8.0 / 2048.0 + 6e-8,
                        "{}: scale {d}",
                        at(0)
                    );
                    for (c, (a, b)) in x.iter().zip(y).enumerate() {
                        let near = (-8.5..=7.5).contains(&(a / d));
                        let bound = d.abs() * if near { 0.5 + 1e-5 } else { 1.0 + 1e-5 };
                        assert!((a - b).abs() <= bound, "{}: {a} → {b} (scale {d})", at(c));
                    }
                }
            }
        }
    }
}

#[test]
fn round_trips_stay_within_the_stated_bounds() {
    let mut rng = Rng(7);
    for format in FORMATS {
        for (rows, cols) in [(1, 1), (3, 31), (17, 32), (16, 33), (33, 100), (40, 256)] {
            check_round_trip(rows, cols, &rng.weights(rows * cols), format);
            let wide: Vec<f32> = (0..rows * cols).map(|_| rng.uniform() * 3.0).collect();
            check_round_trip(rows, cols, &wide, format);
        }
        // Zeros, f16-subnormal scales, exact extremes, and one huge value in a block of small ones.
        let mut odd = vec![0.0f32; 4 * 64];
        for (i, v) in odd.iter_mut().enumerate().skip(64) {
            *v = match i / 64 {
                1 => (i as f32 - 96.0) * 1e-8,
                2 => [-1.0, 1.0, 0.5, -0.25][i % 4],
                _ => (if i % 64 == 5 { 1000.0 } else { 1e-3 }) * if i % 2 == 0 { 1.0 } else { -1.0 },
            };
        }
        check_round_trip(4, 64, &odd, format);
    }
}

#[test]
fn weights_quantization_cannot_represent_are_refused() {
    for format in FORMATS {
        for bad in [f32::NAN, f32::INFINITY, 1e12] {
            let mut v = vec![0.5f32; 2 * 40];
            v[45] = bad;
            let err = quantize(&Matrix::from_f32(2, 40, v).unwrap(), format)
                .err()
                .map(|e| e.to_string());
            let msg = err.unwrap_or_else(|| panic!("{format}: {bad} was quantized"));
            assert!(msg.contains("row 1") && msg.contains("column"), "{format}: {msg}");
        }
    }
}

/// The kernel sets this CPU has, each forced on its own.
fn available() -> Vec<(Isa, Isa)> {
    let mut v = vec![(Isa::Scalar, Isa::Scalar)];
    #[cfg(target_arch = "x86_64")]
    {
        if features().avx2_fma_f16c() {
            v.push((Isa::Avx2, Isa::Avx2));
        }
        if features().avx512f_bw() {
            // The f32 AVX-512 kernels need no VNNI; pair them with whichever integer set exists.
            let int = if features().avx512_vnni() {
                Isa::Avx512
            } else {
                v[v.len() - 1].1
            };
            v.push((Isa::Avx512, int));
        }
    }
    v
}

fn forced(f32: Isa, int: Isa, int_min_m: usize) -> QuantPaths {
    QuantPaths { f32, int, int_min_m }
}

/// Shapes: k around block and 64-byte boundaries, n around panel and half-panel boundaries.
const SHAPES: [(usize, usize); 7] = [(1, 1), (7, 40), (16, 64), (17, 96), (33, 100), (47, 129), (64, 300)];
const BATCHES: [usize; 9] = [1, 2, 3, 4, 5, 7, 8, 9, 33];

/// f32 path against `matmul_ref` on the dequantized weights. Tolerance: the kernels accumulate
/// each block as Σ code·x (int4 codes are q + 8, so magnitudes up to |w| + 8|d|) and then scale,
/// so any summation order is within 2k·ε·Σ|x|(|w| + 8|d|) + ε|ref| (the γₖ bound); one
/// dropped or doubled term would be ~Σ|xw|/k, far above it.
#[test]
fn f32_path_kernels_match_the_reference_on_dequantized_weights() {
    let mut rng = Rng(11);
    for (f32_isa, _) in available() {
        for format in FORMATS {
            for (n, k) in SHAPES {
                let q = quantize(&Matrix::from_f32(n, k, rng.weights(n * k)).unwrap(), format).unwrap();
                let wd = q.to_f32_vec();
                let MatrixData::Quant(data) = &q.data else {
                    unreachable!()
                };
                for m in BATCHES {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                    let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
                    matmul_quant_with(&x, m, k, n, data, &mut got, &forced(f32_isa, Isa::Scalar, usize::MAX));
                    matmul_ref(&x, m, &q, &mut want);
                    for i in 0..m {
                        for j in 0..n {
                            let mag: f32 = (0..k)
                                .map(|p| {
                                    x[i * k + p].abs() * (wd[j * k + p].abs() + 8.0 * scale(&q, j, p / BLOCK).abs())
                                })
                                .sum();
                            let tol = 2.0 * k as f32 * f32::EPSILON * mag + f32::EPSILON * want[i * n + j].abs();
                            let err = (got[i * n + j] - want[i * n + j]).abs();
                            assert!(
                                err <= tol,
                                "{f32_isa:?} {format} m={m} n={n} k={k} [{i},{j}]: {} vs {} (tol {tol})",
                                got[i * n + j],
                                want[i * n + j]
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Integer path: every kernel set gives the scalar oracle's result bit for bit, and that is
/// the f64 product of the dequantized x (x's codes times their block scales) with the dequantized
/// weights within (nb + 2)·ε·Σ|x̂w| + ε|ref| (integer block sums are exact; each block adds one
/// product of scales and one FMA).
#[test]
fn int_path_kernels_are_exact_integer_sums_of_the_quantized_operands() {
    let mut rng = Rng(13);
    let sets = available();
    for format in FORMATS {
        for (n, k) in SHAPES {
            let q = quantize(&Matrix::from_f32(n, k, rng.weights(n * k)).unwrap(), format).unwrap();
            let MatrixData::Quant(data) = &q.data else {
                unreachable!()
            };
            let nb = k.div_ceil(BLOCK);
            for m in BATCHES {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform() * 2.0).collect();
                let mut xi = XInt {
                    q: vec![0; m * nb * BLOCK],
                    kp: nb * BLOCK,
                    scale: vec![0.0; m * nb],
                    sums: vec![0; m * nb],
                };
                quant_scalar::quantize_x(&x, m, k, &mut xi);
                let xd: Vec<f32> = (0..m * k)
                    .map(|t| {
                        let (i, p) = (t / k, t % k);
                        xi.q[i * xi.kp + p] as f32 * xi.scale[i * nb + p / BLOCK]
                    })
                    .collect();
                let mut want = vec![0.0; m * n];
                matmul_ref(&xd, m, &q, &mut want);
                let wd = q.to_f32_vec();
                let mut oracle = vec![f32::NAN; m * n];
                matmul_quant_with(&x, m, k, n, data, &mut oracle, &forced(Isa::Scalar, Isa::Scalar, 1));
                for i in 0..m {
                    for j in 0..n {
                        let mag: f32 = (0..k).map(|p| (xd[i * k + p] * wd[j * k + p]).abs()).sum();
                        let tol = (nb + 2) as f32 * f32::EPSILON * mag + f32::EPSILON * want[i * n + j].abs();
                        let err = (oracle[i * n + j] - want[i * n + j]).abs();
                        assert!(err <= tol, "{format} m={m} n={n} k={k} [{i},{j}]: {err} > {tol}");
                    }
                }
                for &(_, int) in &sets[1..] {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_quant_with(&x, m, k, n, data, &mut got, &forced(Isa::Scalar, int, 1));
                    let same = got.iter().zip(&oracle).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(
                        same,
                        "{int:?} {format} m={m} n={n} k={k}: differs from the scalar oracle"
                    );
                }
            }
        }
    }
    eprintln!("kernel sets checked: {sets:?}");
}

/// The public `matmul` on shapes large enough to split across tasks (both the contiguous m = 1
/// split and the m > 1 one), with this CPU's paths, against the reference: the f32 path as in
/// the kernel test, the integer path within the activation rounding (x within half a step of
/// max|x|/127 per block, so each output within Σ_b (max|x_b|/254)·Σ|w_b| plus float rounding).
#[test]
fn matmul_on_quantized_weights_splits_work_and_picks_the_paths() {
    let mut rng = Rng(17);
    let (n, k) = (16 * 37 + 5, 520);
    for format in FORMATS {
        let q = quantize(&Matrix::from_f32(n, k, rng.weights(n * k)).unwrap(), format).unwrap();
        let wd = q.to_f32_vec();
        for m in [1, 3, paths().int_min_m.min(40), 40] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
            let (mut got, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
            matmul(&x, m, &q, &mut got);
            matmul_ref(&x, m, &q, &mut want);
            let int = m >= paths().int_min_m;
            for i in 0..m {
                for j in 0..n {
                    let (mut mag, mut act) = (0.0f32, 0.0f32);
                    for b in 0..k.div_ceil(BLOCK) {
                        let cols = b * BLOCK..((b + 1) * BLOCK).min(k);
                        let xmax = cols.clone().fold(0.0f32, |a, p| a.max(x[i * k + p].abs()));
                        let wsum: f32 = cols.clone().map(|p| wd[j * k + p].abs()).sum();
                        act += xmax / 254.0 * 1.0001 * wsum;
                        mag += cols
                            .map(|p| x[i * k + p].abs() * (wd[j * k + p].abs() + 8.0 * scale(&q, j, b).abs()))
                            .sum::<f32>();
                    }
                    let tol = 2.0 * k as f32 * f32::EPSILON * mag + if int { act } else { 0.0 };
                    let err = (got[i * n + j] - want[i * n + j]).abs();
                    assert!(err <= tol, "{format} m={m} [{i},{j}]: {err} > {tol} (int path: {int})");
                }
            }
        }
    }
}

#[test]
fn requantizing_like_a_matrix_keeps_its_format_and_source_dtype() {
    let mut rng = Rng(19);
    let src = Matrix::from_f32_as(crate::DType::BF16, 32, 96, rng.weights(32 * 96)).unwrap();
    let q = quantize(&src, QuantFormat::Int4).unwrap();
    let again = q.from_f32_like(32, 96, q.to_f32_vec()).unwrap();
    assert_eq!(
        (again.quant_format(), again.dtype()),
        (Some(QuantFormat::Int4), crate::DType::BF16)
    );
    // Dequantized values quantize to themselves.
    assert_eq!(again.to_f32_vec(), q.to_f32_vec());
    assert!(
        q.bytes() < src.bytes() / 3,
        "int4 {} bytes vs bf16 {}",
        q.bytes(),
        src.bytes()
    );
}

/// Every instruction set quantizes x to the same codes, scales and sums, zero blocks and
/// partial last blocks included.
#[test]
fn activation_quantization_is_the_same_on_every_kernel_set() {
    use super::quant_matmul::quantize_x;
    let mut rng = Rng(23);
    for (m, k) in [(1, 1), (2, 31), (3, 64), (5, 100), (7, 896)] {
        let mut x: Vec<f32> = (0..m * k).map(|_| rng.uniform() * 3.0).collect();
        x[..k.min(40)].fill(0.0);
        let nb = k.div_ceil(BLOCK);
        let fresh = || XInt {
            q: vec![0; m * nb * BLOCK],
            kp: nb * BLOCK,
            scale: vec![0.0; m * nb],
            sums: vec![0; m * nb],
        };
        let mut want = fresh();
        quant_scalar::quantize_x(&x, m, k, &mut want);
        for (isa, _) in available() {
            let mut got = fresh();
            quantize_x(isa, &x, m, k, &mut got);
            assert_eq!((&got.q, &got.sums), (&want.q, &want.sums), "{isa:?} m={m} k={k}");
            assert!(
                got.scale
                    .iter()
                    .zip(&want.scale)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }
    }
}

/// An imported matrix (GPTQ/AWQ-style): random codes over the format's whole range (int8's −128
/// included, which [`quantize`] never writes), random f16 scales, and per-block zero shifts over
/// their whole range if `with_shifts` (and without them, the same codes and scales).
fn imported(rng: &mut Rng, format: QuantFormat, n: usize, k: usize, with_shifts: bool) -> (Matrix, Matrix) {
    let nb = k.div_ceil(BLOCK);
    let codes: Vec<u8> = (0..n * k)
        .map(|_| match format {
            QuantFormat::Int8 => rng.next() as u8,
            QuantFormat::Int4 => (rng.next() % 16) as u8,
        })
        .collect();
    let scales: Vec<half::f16> = (0..n * nb).map(|_| half::f16::from_f32(rng.uniform() * 0.01)).collect();
    // Zero points run 0..=16 (int4; GPTQ v1 reads 16 for a stored 15) or 0..=256 (int8): shifts
    // 8 − z or 128 − z.
    let half: u64 = if format == QuantFormat::Int4 { 8 } else { 128 };
    let shifts: Vec<i16> = (0..n * nb)
        .map(|_| (half as i64 - (rng.next() % (2 * half + 1)) as i64) as i16)
        .collect();
    let make = |z: Option<Vec<i16>>| from_codes(format, DType::F32, (n, k), &codes, &scales, z).unwrap();
    (make(with_shifts.then(|| shifts.clone())), make(None))
}

/// Imported codes on every kernel set: the f32 path against the reference on the dequantized
/// weights (zero shifts included; tolerance as in the f32 kernel test, with each block's offset
/// `s·d` counted as a weight of its block), the integer path bit for bit the scalar oracle's on
/// the symmetric part, and the shifts' share (with minus without) equal to x's block sums times
/// the offsets, in f64, within the rounding of the block sums and of the two outputs.
#[test]
fn imported_codes_with_zero_shifts_match_the_reference() {
    let mut rng = Rng(17);
    let sets = available();
    for format in FORMATS {
        for (n, k) in SHAPES {
            let nb = k.div_ceil(BLOCK);
            let (w, sym) = imported(&mut rng, format, n, k, true);
            let (MatrixData::Quant(wd), MatrixData::Quant(sd)) = (&w.data, &sym.data) else {
                unreachable!()
            };
            let (deq, shifts) = (w.to_f32_vec(), wd.zero_shifts.clone().unwrap());
            for m in BATCHES {
                let x: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
                let mut want = vec![0.0; m * n];
                matmul_ref(&x, m, &w, &mut want);
                let mut oracle = vec![f32::NAN; m * n];
                matmul_quant_with(&x, m, k, n, sd, &mut oracle, &forced(Isa::Scalar, Isa::Scalar, 1));
                for &(f32_isa, int) in &sets {
                    let mut got = vec![f32::NAN; m * n];
                    matmul_quant_with(&x, m, k, n, wd, &mut got, &forced(f32_isa, int, usize::MAX));
                    let (mut got_int, mut got_sym) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                    matmul_quant_with(&x, m, k, n, wd, &mut got_int, &forced(f32_isa, int, 1));
                    matmul_quant_with(&x, m, k, n, sd, &mut got_sym, &forced(f32_isa, int, 1));
                    assert!(
                        got_sym.iter().zip(&oracle).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{int:?} {format} m={m} n={n} k={k}: integer path differs from the scalar oracle"
                    );
                    for i in 0..m {
                        for j in 0..n {
                            let (mut mag, mut share, mut share_mag) = (0.0f32, 0.0f64, 0.0f32);
                            for b in 0..nb {
                                let xs = &x[i * k + b * BLOCK..i * k + k.min((b + 1) * BLOCK)];
                                let d = scale(&w, j, b);
                                let o = shifts[j * nb + b] as f32 * d;
                                let d = d.abs();
                                for (p, v) in xs.iter().enumerate() {
                                    mag += v.abs() * ((deq[j * k + b * BLOCK + p] - o).abs() + 8.0 * d + o.abs());
                                }
                                share += xs.iter().map(|&v| v as f64).sum::<f64>() * o as f64;
                                share_mag += xs.iter().map(|v| v.abs()).sum::<f32>() * o.abs();
                            }
                            let at = format!("{f32_isa:?}/{int:?} {format} m={m} n={n} k={k} [{i},{j}]");
                            let (g, r) = (got[i * n + j], want[i * n + j]);
                            let tol = 2.0 * k as f32 * f32::EPSILON * mag + f32::EPSILON * r.abs();
                            assert!((g - r).abs() <= tol, "{at}: f32 path {g} vs {r} (tol {tol})");
                            let (a, s) = (got_int[i * n + j], got_sym[i * n + j]);
                            let tol = (BLOCK + nb + 2) as f32 * f32::EPSILON * share_mag
                                + 2.0 * f32::EPSILON * (a.abs() + s.abs());
                            let err = ((a - s) as f64 - share).abs() as f32;
                            assert!(err <= tol, "{at}: zero shifts' share {} vs {share} (tol {tol})", a - s);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn imported_codes_are_checked() {
    let scales = [half::f16::ONE; 2];
    let bad = from_codes(
        QuantFormat::Int4,
        DType::F32,
        (2, 3),
        &[0, 1, 16, 0, 0, 0],
        &scales,
        None,
    );
    assert!(bad.err().is_some_and(|e| e.to_string().contains("above 15")));
    let short = from_codes(QuantFormat::Int8, DType::F32, (2, 3), &[0; 5], &scales, None);
    assert!(short.err().is_some_and(|e| e.to_string().contains("5 codes")));
    let shifts = from_codes(
        QuantFormat::Int8,
        DType::F32,
        (2, 3),
        &[0; 6],
        &scales,
        Some(vec![0; 3]),
    );
    assert!(shifts.is_err(), "3 zero shifts for 2 rows × 1 block");
}

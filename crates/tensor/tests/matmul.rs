//! The fast `matmul` against the f64-accumulating `matmul_ref`, for every weight dtype, odd
//! shapes (SIMD tails, partial register tiles, uneven rayon slices) and both the streaming and
//! the `gemm` paths.

use half::{bf16, f16};
use quiver_tensor::cpu::matmul::GEMM_MIN_M;
use quiver_tensor::cpu::{matmul, matmul_ref};
use quiver_tensor::{DType, Matrix, MatrixData, TypedSlice};

/// SplitMix64: tiny, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.uniform()).collect()
    }
}

fn matrix(n: usize, k: usize, v: &[f32], dtype: DType) -> Matrix {
    let data = match dtype {
        DType::F32 => MatrixData::F32(TypedSlice::from_vec(v.to_vec())),
        DType::F16 => MatrixData::F16(TypedSlice::from_vec(v.iter().map(|&a| f16::from_f32(a)).collect())),
        DType::BF16 => MatrixData::BF16(TypedSlice::from_vec(v.iter().map(|&a| bf16::from_f32(a)).collect())),
    };
    Matrix::new(n, k, data).unwrap()
}

/// Checks one shape; returns the largest error seen relative to the error bound.
///
/// Tolerance: any f32 summation order of k products is within k·ε·Σ|xₚwₚ| of the exact sum
/// (the classic γₖ bound; FMA only tightens it), and the reference is exact to f32 rounding, so
/// `k·ε·Σ|xw| + ε|ref|` can never flake. It still catches indexing bugs: one dropped or doubled
/// term moves the result by ~Σ|xw|/k, far above k·ε·Σ|xw| for every k used here (k ≤ 1000).
/// Weights are rounded to their dtype before the reference sees them, so dtype rounding is
/// not part of the error.
fn check(rng: &mut Rng, m: usize, n: usize, k: usize, dtype: DType) -> f32 {
    let x = rng.vec(m * k);
    let w = matrix(n, k, &rng.vec(n * k), dtype);
    let wf = w.to_f32_vec();
    let (mut fast, mut want) = (vec![f32::NAN; m * n], vec![0.0; m * n]);
    matmul(&x, m, &w, &mut fast);
    matmul_ref(&x, m, &w, &mut want);
    let mut worst = 0.0f32;
    for i in 0..m {
        for j in 0..n {
            let abs_sum: f32 = (0..k).map(|p| (x[i * k + p] * wf[j * k + p]).abs()).sum();
            let (got, r) = (fast[i * n + j], want[i * n + j]);
            let tol = k as f32 * f32::EPSILON * abs_sum + f32::EPSILON * r.abs() + f32::MIN_POSITIVE;
            let err = (got - r).abs();
            assert!(
                err <= tol,
                "{dtype} m={m} n={n} k={k}: out[{i},{j}] = {got}, reference {r} (tolerance {tol})"
            );
            worst = worst.max(err / tol);
        }
    }
    worst
}

#[test]
fn matches_reference_on_odd_shapes() {
    let mut rng = Rng(42);
    let mut worst = 0.0f32;
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for m in [1, 2, 3, 4, 5, 7, 17, 40, GEMM_MIN_M + 3] {
            for n in [1, 5, 131] {
                for k in [1, 7, 33, 97, 1000] {
                    worst = worst.max(check(&mut rng, m, n, k, dtype));
                }
            }
        }
    }
    // Typically a few percent of the worst-case bound.
    eprintln!("largest error / tolerance: {worst:.4}");
}

#[test]
fn matches_reference_on_larger_shapes() {
    let mut rng = Rng(7);
    // Many rows: several rayon slices with a ragged last one (streaming path, m = 1 and m > 1).
    for dtype in [DType::F32, DType::BF16] {
        check(&mut rng, 1, 2053, 515, dtype);
        check(&mut rng, 9, 1031, 260, dtype);
    }
    // More than one widened panel on the gemm path (n·k > 4 Mi elements). The full reference
    // would take seconds at opt-level 1, so every 37th column (all panels, both edges) is checked.
    let (m, n, k) = (GEMM_MIN_M, 4500, 1000);
    let x = rng.vec(m * k);
    let w = matrix(n, k, &rng.vec(n * k), DType::BF16);
    let wf = w.to_f32_vec();
    let mut out = vec![f32::NAN; m * n];
    matmul(&x, m, &w, &mut out);
    for j in (0..n).step_by(37).chain([n - 1]) {
        for i in 0..m {
            let (xi, wj) = (&x[i * k..(i + 1) * k], &wf[j * k..(j + 1) * k]);
            let exact: f64 = xi.iter().zip(wj).map(|(a, b)| *a as f64 * *b as f64).sum();
            let abs_sum: f32 = xi.iter().zip(wj).map(|(a, b)| (a * b).abs()).sum();
            let tol = k as f32 * f32::EPSILON * abs_sum + f32::MIN_POSITIVE;
            let got = out[i * n + j];
            assert!(
                (got as f64 - exact).abs() <= tol as f64,
                "out[{i},{j}] = {got}, exact {exact}"
            );
        }
    }
}

#[test]
fn nan_propagates() {
    let (n, k) = (37, 45);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for m in [1, 4, GEMM_MIN_M + 1] {
            let mut rng = Rng(3);
            // NaN in x row 0: that whole output row is NaN, the others are not.
            let mut x = rng.vec(m * k);
            x[k / 2] = f32::NAN;
            let mut wv = rng.vec(n * k);
            // NaN in weight row 2 (exactly representable in every dtype): column 2 is NaN.
            wv[2 * k + 11] = f32::NAN;
            let w = matrix(n, k, &wv, dtype);
            let mut out = vec![0.0; m * n];
            matmul(&x, m, &w, &mut out);
            for i in 0..m {
                for j in 0..n {
                    let v = out[i * n + j];
                    assert_eq!(v.is_nan(), i == 0 || j == 2, "{dtype} m={m}: out[{i},{j}] = {v}");
                }
            }
        }
    }
}

#[test]
fn empty_shapes_return() {
    let w = matrix(3, 4, &[0.5; 12], DType::BF16);
    matmul(&[], 0, &w, &mut []);
    let empty = matrix(0, 4, &[], DType::F16);
    matmul(&[1.0; 8], 2, &empty, &mut []);
    // k = 0: an empty sum is 0.
    let zero_k = matrix(3, 0, &[], DType::F32);
    let mut out = [f32::NAN; 6];
    matmul(&[], 2, &zero_k, &mut out);
    assert_eq!(out, [0.0; 6]);
}

/// `Precision::Bf16Activations`: from 24 x rows on (AVX512_BF16 CPUs) the result is x rounded to
/// bf16 times W, to the same summation-order bound as above (a bf16 × bf16 product is exact in
/// f32); below 24 rows, and on CPUs without the instruction, it is the f32 matmul.
#[test]
fn bf16_activations_round_x_and_nothing_else() {
    use quiver_tensor::cpu::{bf16_activations_supported, matmul_with, Precision};
    let mut rng = Rng(11);
    for &(m, n, k) in &[(23, 9, 37), (24, 13, 33), (31, 70, 95), (300, 17, 1057)] {
        let x = rng.vec(m * k);
        let w = matrix(n, k, &rng.vec(n * k), DType::BF16);
        let wf = w.to_f32_vec();
        let mut fast = vec![f32::NAN; m * n];
        matmul_with(&x, m, &w, &mut fast, Precision::Bf16Activations);
        let rounded = m >= 24 && bf16_activations_supported();
        let xr: Vec<f32> = if rounded {
            x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect()
        } else {
            x.clone()
        };
        let mut want = vec![0.0; m * n];
        matmul_ref(&xr, m, &w, &mut want);
        let mut plain = vec![0.0; m * n];
        matmul_ref(&x, m, &w, &mut plain);
        let mut moved = false;
        for i in 0..m {
            for j in 0..n {
                let abs_sum: f32 = (0..k).map(|p| (xr[i * k + p] * wf[j * k + p]).abs()).sum();
                let (got, r) = (fast[i * n + j], want[i * n + j]);
                let tol = k as f32 * f32::EPSILON * abs_sum + f32::EPSILON * r.abs() + f32::MIN_POSITIVE;
                assert!(
                    (got - r).abs() <= tol,
                    "m={m} n={n} k={k}: [{i},{j}] {got} vs {r} (tol {tol})"
                );
                moved |= (got - plain[i * n + j]).abs() > 1e-4;
            }
        }
        // Where x is rounded, the result must visibly differ from the f32 one.
        assert_eq!(moved, rounded, "m={m}: bf16 rounding seen {moved}, expected {rounded}");
    }
}

#[test]
fn precision_parses_and_prints() {
    use quiver_tensor::cpu::Precision;
    for (s, p) in [
        ("f32", Precision::F32),
        ("bf16", Precision::Bf16Activations),
        ("int8", Precision::Int8Activations),
    ] {
        assert_eq!(s.parse::<Precision>(), Ok(p));
        assert_eq!(p.to_string(), s);
    }
    let err = "fp8".parse::<Precision>().expect_err("not a precision");
    assert!(err.contains("f32, bf16 or int8"), "{err}");
}

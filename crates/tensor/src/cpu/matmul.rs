//! `out[m, n] = x[m, k] · W[n, k]ᵀ` with W in f32, f16 or bf16 (widened in the kernel).

use crate::storage::Matrix;

/// Fast path (placeholder until the tuned kernels land): delegates to the reference.
pub fn matmul(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    matmul_ref(x, m, w, out)
}

/// Naive reference: the oracle the fast kernels are tested against.
pub fn matmul_ref(x: &[f32], m: usize, w: &Matrix, out: &mut [f32]) {
    let (n, k) = (w.rows, w.cols);
    assert_eq!(x.len(), m * k, "matmul: x has {} elements, expected {m}×{k}", x.len());
    assert_eq!(out.len(), m * n, "matmul: out has {} elements, expected {m}×{n}", out.len());
    let mut row = vec![0.0f32; k];
    for j in 0..n {
        w.row_f32(j, &mut row);
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            let mut acc = 0.0f64;
            for (a, b) in xi.iter().zip(&row) {
                acc += (*a as f64) * (*b as f64);
            }
            out[i * n + j] = acc as f32;
        }
    }
}

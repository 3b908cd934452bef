//! Block-quantized weights on the CUDA backend (kernels/gemv_quant.cu) against the CPU's f64
//! reference on the same dequantized weights, with odd shapes (k not a multiple of the 32-wide
//! blocks, n not of the 16-row panels), int8 and int4, with and without GPTQ/AWQ zero shifts:
//!
//!     QUIVER_REQUIRE_GPU=1 cargo test --release -p quiver-cuda --test gpu_quant -- --nocapture
//!
//! The gemv path (m ≤ 8) keeps x in f32, so only summation order differs (`TOL_F32`); the cuBLAS
//! path dequantizes W to f16 and rounds x to f16 by design, so the reference does too
//! (`TOL_HALF`). Without a GPU the tests print why and pass (see `common`).

mod common;

use anyhow::Result;
use common::{check, gpu, Rng, TOL_F32, TOL_HALF};
use half::f16;
use quiver_cuda::linear::GEMV_MAX_M;
use quiver_tensor::cpu::matmul_ref;
use quiver_tensor::quant::{from_codes, quantize, QuantFormat};
use quiver_tensor::{Backend, DType, Matrix};

/// Codes over the format's whole range, f16 scales, zero shifts over theirs if `shifted`.
fn imported(rng: &mut Rng, format: QuantFormat, n: usize, k: usize, shifted: bool) -> Result<Matrix> {
    let nb = k.div_ceil(32);
    let codes: Vec<u8> = (0..n * k)
        .map(|_| match format {
            QuantFormat::Int8 => rng.next_u64() as u8,
            QuantFormat::Int4 => rng.below(16) as u8,
        })
        .collect();
    let scales: Vec<f16> = (0..n * nb).map(|_| f16::from_f32(rng.f32(-0.02, 0.02))).collect();
    let half: usize = if format == QuantFormat::Int4 { 8 } else { 128 };
    let shifts = shifted.then(|| {
        (0..n * nb)
            .map(|_| (half as i64 - rng.below(2 * half + 1) as i64) as i16)
            .collect()
    });
    Ok(from_codes(format, DType::F16, (n, k), &codes, &scales, shifts)?)
}

fn f16_rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

#[test]
fn quantized_matmul_matches_the_reference_on_gemv_and_cublas_paths() -> Result<()> {
    let Some(gpu) = gpu("quantized matmul") else {
        return Ok(());
    };
    let mut rng = Rng::seeded("quantized matmul");
    let (n, k) = (171, 301);
    for format in [QuantFormat::Int8, QuantFormat::Int4] {
        for shifted in [false, true] {
            let wq = if shifted {
                imported(&mut rng, format, n, k, true)?
            } else {
                quantize(&Matrix::from_f32(n, k, rng.vec(n * k, -1.0, 1.0))?, format)?
            };
            let w = gpu.upload_weight(wq.clone())?;
            let w16 = Matrix::from_f32(n, k, f16_rounded(&wq.to_f32_vec()))?;
            for m in [1, 3, 8, 9, 33] {
                let x = rng.vec(m * k, -1.0, 1.0);
                let cublas = m > GEMV_MAX_M;
                let mut want = vec![0.0; m * n];
                if cublas {
                    matmul_ref(&f16_rounded(&x), m, &w16, &mut want);
                } else {
                    matmul_ref(&x, m, &wq, &mut want);
                }
                let mut out = gpu.upload(&vec![f32::NAN; m * n])?;
                gpu.matmul(&gpu.upload(&x)?, m, &w, &mut out)?;
                let path = if cublas { "dequantize + cuBLAS" } else { "gemv" };
                let zp = if shifted { " with zero shifts" } else { "" };
                check(
                    &format!("matmul {format}{zp} [{m}×{k}]·[{n}×{k}]ᵀ ({path})"),
                    &gpu.download(&out)?,
                    &want,
                    if cublas { TOL_HALF } else { TOL_F32 },
                );
            }
        }
    }
    Ok(())
}

/// A quantized table (a tied embedding stored as the int8 LM head) gives its dequantized rows,
/// and a quantized weight downloads exactly as uploaded (merging adapters goes through it).
#[test]
fn quantized_embedding_rows_and_download_match_the_host_matrix() -> Result<()> {
    let Some(gpu) = gpu("quantized embed") else {
        return Ok(());
    };
    let mut rng = Rng::seeded("quantized embed");
    let (rows, width) = (157, 83);
    for format in [QuantFormat::Int8, QuantFormat::Int4] {
        for shifted in [false, true] {
            let wq = imported(&mut rng, format, rows, width, shifted)?;
            let table = gpu.upload_weight(wq.clone())?;
            let ids = rng.distinct(9, rows);
            let mut want = vec![0.0; ids.len() * width];
            for (t, &id) in ids.iter().enumerate() {
                wq.row_f32(id as usize, &mut want[t * width..(t + 1) * width]);
            }
            let mut out = gpu.upload(&vec![f32::NAN; ids.len() * width])?;
            gpu.embed(&table, &ids, &mut out)?;
            check(
                &format!("embed {format} shifted={shifted}"),
                &gpu.download(&out)?,
                &want,
                TOL_F32,
            );
            let back = gpu.download_weight(&table)?;
            assert_eq!(back.quant_format(), Some(format));
            assert!(
                back.to_f32_vec()
                    .iter()
                    .zip(wq.to_f32_vec())
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{format}: downloaded weight differs"
            );
        }
    }
    Ok(())
}

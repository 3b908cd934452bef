//! Magnitude checks that keep an adapter's update finite. Finite weights are not enough: an
//! alpha of 1e300 makes alpha/r infinite in f32, and weights of 3e38 overflow as soon as A and B
//! multiply. The kernels compute `scale · ((x · Aᵀ) · Bᵀ)` in f32 from pages in f32 or bf16, so
//! each stored value must survive rounding to bf16 and the whole product must stay finite.

use half::bf16;

/// Largest |value|, for slices already checked finite.
pub fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// A value of A or B that rounds to infinity in a bf16 page.
pub fn page_overflow(max_abs: f32) -> Option<String> {
    bf16::from_f32(max_abs).is_infinite().then(|| {
        format!(
            "value {max_abs:e} overflows the bf16 page dtype (largest finite {:e})",
            bf16::MAX.to_f32()
        )
    })
}

/// For inputs with every entry in [-1, 1], bounds every intermediate of the LoRA update of one
/// module: the shrink `x · Aᵀ` (≤ in · max|A|), the expand before scaling (≤ rank · that ·
/// max|B|) and after it. `None` when all fit in f32; otherwise why not.
pub fn update_overflow(in_features: usize, rank: usize, scale: f32, max_a: f32, max_b: f32) -> Option<String> {
    let shrink = in_features as f64 * max_a as f64;
    let expand = shrink * rank as f64 * max_b as f64;
    let scaled = expand * (scale as f64).abs();
    let worst = shrink.max(expand).max(scaled);
    (worst > f32::MAX as f64).then(|| {
        format!(
            "the scaled update overflows f32: for inputs in [-1, 1] it can reach {worst:e} \
             (in {in_features}, rank {rank}, scale {scale:e}, max|A| {max_a:e}, max|B| {max_b:e})"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_modules_pass_and_overflowing_ones_do_not() {
        assert_eq!(update_overflow(8192, 64, 2.0, 0.05, 0.05), None);
        assert!(update_overflow(64, 8, 1.0, 3e38, 3e38).is_some());
        assert!(update_overflow(64, 8, 1e38, 0.1, 0.1).is_some());
        assert!(
            update_overflow(64, 8, 1.0, 1e37, 0.0).is_some(),
            "the shrink alone overflows"
        );
        assert_eq!(page_overflow(3e38), None);
        assert!(page_overflow(f32::MAX).is_some());
    }
}

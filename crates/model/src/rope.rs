//! Rotary tables computed the way transformers computes them (inverse frequencies rounded to
//! f32, angle = position × inv_freq in f32), so positions match the reference bit for bit-ish.

use quiver_tensor::RopeTable;

use crate::config::{ModelConfig, RopeScaling};

/// Inverse frequencies for each rotary pair, after the configured scaling.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let exponent = (2 * i) as f32 / dim as f32;
            1.0f32 / (cfg.rope_theta.powf(exponent as f64) as f32)
        })
        .collect();
    match cfg.rope_scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| (*f as f64 / factor) as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let scaled = if wavelen > low_wavelen { f / factor } else { f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    }
                })
                .collect()
        }
    }
}

/// cos/sin for positions `0..max_positions`.
pub fn rope_table(cfg: &ModelConfig, max_positions: usize) -> RopeTable {
    let inv = inv_freq(cfg);
    let half = inv.len();
    let mut cos = Vec::with_capacity(max_positions * half);
    let mut sin = Vec::with_capacity(max_positions * half);
    for p in 0..max_positions {
        for &f in &inv {
            let angle = (p as f32 * f) as f64;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    RopeTable {
        half_dim: half,
        cos,
        sin,
    }
}

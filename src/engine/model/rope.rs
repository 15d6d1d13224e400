//! Rotary position embedding tables (HF "rotate half" layout), including Llama-3 rope scaling.

use candle_core::{Device, Tensor};

use crate::checkpoint::ModelConfig;
use crate::engine::ops::rows::gather_rows;

/// `cos`/`sin` tables `[max_positions, head_dim / 2]`.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

/// Inverse frequencies, with Llama-3's frequency-dependent scaling applied when configured.
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    let Some(s) = &cfg.rope_scaling else {
        return base;
    };
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor;
    let high_wavelen = old / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

impl RopeTables {
    pub fn new(cfg: &ModelConfig, device: &Device) -> candle_core::Result<Self> {
        let freqs = inv_freq(cfg);
        let half = freqs.len();
        let n = cfg.max_position_embeddings;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &freqs {
                let angle = p as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (n, half), device)?,
            sin: Tensor::from_vec(sin, (n, half), device)?,
        })
    }

    /// Rows for the given absolute positions (`[rows]` u32 on the tables' device), f32.
    pub fn gather(&self, positions: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            gather_rows(&self.cos, positions)?,
            gather_rows(&self.sin, positions)?,
        ))
    }
}

//! Hidden-state taps: an optional per-layer observer of (layer input, layer output). Passing no tap
//! costs nothing. [`BlockInfluence`] is the reduction that layer-importance pruning uses.

use candle_core::{DType, Tensor, D};

/// Sees every executed layer's input and output rows (`[T, hidden]`, packed over the step).
pub trait LayerTap {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()>;
}

/// Block Influence per base layer: `1 - cos(input_t, output_t)`, averaged over tokens.
#[derive(Debug, Clone, Default)]
pub struct BlockInfluence {
    sums: Vec<f64>,
    counts: Vec<usize>,
}

impl BlockInfluence {
    pub fn new(base_layers: usize) -> Self {
        Self {
            sums: vec![0.0; base_layers],
            counts: vec![0; base_layers],
        }
    }

    /// Mean BI of each base layer (`None` where the layer never ran).
    pub fn scores(&self) -> Vec<Option<f64>> {
        self.sums
            .iter()
            .zip(&self.counts)
            .map(|(s, &c)| (c > 0).then(|| s / c as f64))
            .collect()
    }
}

impl LayerTap for BlockInfluence {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        let (a, b) = (input.to_dtype(DType::F32)?, output.to_dtype(DType::F32)?);
        let dot = (&a * &b)?.sum(D::Minus1)?;
        let norms = (a.sqr()?.sum(D::Minus1)?.sqrt()? * b.sqr()?.sum(D::Minus1)?.sqrt()?)?;
        let cos = (dot / norms.clamp(1e-12, f64::INFINITY)?)?;
        let bi: Vec<f32> = (1.0 - cos)?.to_vec1()?;
        self.sums[base_layer] += bi.iter().map(|&x| x as f64).sum::<f64>();
        self.counts[base_layer] += bi.len();
        Ok(())
    }
}

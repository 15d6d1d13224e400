//! Hidden-state taps: an optional per-layer observer of (layer input, layer output). Passing no tap
//! costs nothing. [`BlockInfluence`] and [`FinalTokenStates`] are the reductions layer-importance
//! scoring uses (see `crate::importance`); both expect one prompt per step (its chunks may come in
//! several steps) and are told where a prompt ends.

use candle_core::{DType, IndexOp, Tensor, D};

/// Sees every executed layer's input and output rows (`[T, hidden]`, packed over the step).
pub trait LayerTap {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()>;
}

/// Block Influence per base layer, as ShortGPT defines it: `1 - cos(input_t, output_t)` in f32 per
/// token, averaged over a prompt's tokens, then over prompts.
#[derive(Debug, Clone, Default)]
pub struct BlockInfluence {
    /// The current prompt's sum and count of per-token BI, per base layer.
    token_sums: Vec<f64>,
    token_counts: Vec<usize>,
    /// Sums of finished prompts' means, and how many prompts ran each layer.
    prompt_sums: Vec<f64>,
    prompt_counts: Vec<usize>,
}

impl BlockInfluence {
    pub fn new(base_layers: usize) -> Self {
        Self {
            token_sums: vec![0.0; base_layers],
            token_counts: vec![0; base_layers],
            prompt_sums: vec![0.0; base_layers],
            prompt_counts: vec![0; base_layers],
        }
    }

    /// Closes the current prompt: its per-layer token means join the average over prompts.
    pub fn end_prompt(&mut self) {
        for layer in 0..self.token_sums.len() {
            let n = std::mem::take(&mut self.token_counts[layer]);
            let sum = std::mem::take(&mut self.token_sums[layer]);
            if n > 0 {
                self.prompt_sums[layer] += sum / n as f64;
                self.prompt_counts[layer] += 1;
            }
        }
    }

    /// Mean BI of each base layer over the finished prompts (`None` where the layer never ran).
    pub fn scores(&self) -> Vec<Option<f64>> {
        self.prompt_sums
            .iter()
            .zip(&self.prompt_counts)
            .map(|(s, &c)| (c > 0).then(|| s / c as f64))
            .collect()
    }
}

/// Per-row cosine similarity of two `[T, hidden]` tensors, computed in f32.
fn row_cosines(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let dot = (&a * &b)?.sum(D::Minus1)?;
    let norms = (a.sqr()?.sum(D::Minus1)?.sqrt()? * b.sqr()?.sum(D::Minus1)?.sqrt()?)?;
    dot / norms.clamp(1e-12, f64::INFINITY)?
}

impl LayerTap for BlockInfluence {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        let bi: Vec<f32> = (1.0 - row_cosines(input, output)?)?.to_vec1()?;
        self.token_sums[base_layer] += bi.iter().map(|&x| x as f64).sum::<f64>();
        self.token_counts[base_layer] += bi.len();
        Ok(())
    }
}

/// The last row of the hidden state before the first layer and after every layer of a plan, in
/// f32: `states[p]` is the input of plan position `p`, `states[plan_len]` the last layer's output.
/// A step that starts at the plan's first layer starts the list afresh, so after a prompt's last
/// chunk it holds that prompt's final token.
#[derive(Debug, Clone)]
pub struct FinalTokenStates {
    first_layer: usize,
    states: Vec<Vec<f32>>,
}

impl FinalTokenStates {
    /// For a plan whose first executed base layer is `first_layer`.
    pub fn new(first_layer: usize) -> Self {
        Self {
            first_layer,
            states: Vec::new(),
        }
    }

    /// The states of the last step (input of each plan position, then the final output).
    pub fn take(&mut self) -> Vec<Vec<f32>> {
        std::mem::take(&mut self.states)
    }
}

fn last_row(x: &Tensor) -> candle_core::Result<Vec<f32>> {
    let rows = x.dim(0)?;
    x.i(rows - 1)?.to_dtype(DType::F32)?.to_vec1()
}

impl LayerTap for FinalTokenStates {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        if base_layer == self.first_layer {
            self.states.clear();
            self.states.push(last_row(input)?);
        }
        self.states.push(last_row(output)?);
        Ok(())
    }
}

/// Several taps at once.
pub struct Taps<'a>(pub Vec<&'a mut dyn LayerTap>);

impl LayerTap for Taps<'_> {
    fn observe(
        &mut self,
        base_layer: usize,
        input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        for tap in self.0.iter_mut() {
            tap.observe(base_layer, input, output)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rows(v: &[[f32; 2]]) -> Tensor {
        let flat: Vec<f32> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 2), &Device::Cpu).unwrap()
    }

    #[test]
    fn influence_averages_tokens_then_prompts() {
        let mut bi = BlockInfluence::new(2);
        // Prompt 1: two tokens on layer 0, cosines 1 and 0 -> mean BI 0.5.
        bi.observe(
            0,
            &rows(&[[1., 0.], [1., 0.]]),
            &rows(&[[2., 0.], [0., 3.]]),
        )
        .unwrap();
        bi.end_prompt();
        // Prompt 2: one token, opposite direction -> BI 2.
        bi.observe(0, &rows(&[[1., 1.]]), &rows(&[[-1., -1.]]))
            .unwrap();
        bi.end_prompt();
        let s = bi.scores();
        // Mean over prompts (0.5 + 2) / 2, not over the three tokens (1 + 2) / 3.
        assert!((s[0].unwrap() - 1.25).abs() < 1e-6, "{s:?}");
        assert_eq!(s[1], None);
    }

    #[test]
    fn final_states_restart_at_the_first_layer() {
        let mut t = FinalTokenStates::new(3);
        let (a, b) = (rows(&[[9., 9.], [1., 2.]]), rows(&[[0., 0.], [3., 4.]]));
        t.observe(3, &a, &b).unwrap();
        t.observe(5, &b, &a).unwrap();
        // A later chunk of the same prompt replaces the earlier one.
        t.observe(3, &b, &a).unwrap();
        assert_eq!(t.take(), vec![vec![3., 4.], vec![1., 2.]]);
    }
}

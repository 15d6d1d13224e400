//! Layer importance for choosing what to prune: Block Influence (ShortGPT; the paper's criterion)
//! and the angular distance between the hidden states `n` layers apart (Gromov et al. 2024), over
//! a calibration set, on a base or any plan.
//!
//! Contract:
//! - BI of a layer is `1 - cos(x_in, x_out)`, cosine in f32 per token, averaged over each prompt's
//!   tokens (BOS included) and then over prompts; the suggested drop set is the `K` layers of
//!   lowest BI (highest cosine), ties to the later layer.
//! - The angular distance of the block starting at plan position `l` is
//!   `arccos(cos(h_l, h_{l+n})) / pi` at each prompt's final token (`h_l` is the input of position
//!   `l`, before any final norm), averaged over prompts; the suggested block is the one of least
//!   distance with `n = K`, ties to the later block.
//! - A run does one prompt chunk per [`ImportanceRun::advance`], so a server can interleave it with
//!   generation on the engine's thread; it has its own small KV cache (room for its longest
//!   prompt) and touches no other sequence.

pub mod calibration;
mod task;

use std::sync::Arc;

use serde::Serialize;

pub use task::ImportanceTask;

use crate::engine::instrument::taps::{BlockInfluence, FinalTokenStates, LayerTap, Taps};
use crate::engine::model::DecoderModel;
use crate::engine::{Engine, EngineError, EngineOptions, RunSpec, StepItem};
use crate::plan::LayerPlan;

/// Tokens per forward of a calibration prompt (longer prompts run in chunks).
const CHUNK_TOKENS: usize = 512;

/// Which score ranks layers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Block Influence per layer.
    #[default]
    Bi,
    /// Angular distance over blocks of consecutive layers.
    Angular,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportanceError {
    #[error(transparent)]
    Calibration(#[from] calibration::CalibrationError),
    #[error("cannot drop {drop} of the plan's {plan_len} layers: choose 1 to {}", plan_len.saturating_sub(1))]
    BadDrop { drop: usize, plan_len: usize },
    #[error("calibration prompt {index} has {len} tokens; the model's context is {max}")]
    PromptTooLong {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("cannot set up the run's KV cache: {0}")]
    Cache(EngineError),
    #[error("running calibration prompt {index}: {error}")]
    Engine { index: usize, error: EngineError },
}

/// One layer's Block Influence.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerScore {
    pub layer: usize,
    pub score: f64,
}

/// The angular distance across a block of consecutive plan layers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BlockScore {
    /// Base layers of the block, in plan order.
    pub layers: Vec<usize>,
    pub distance: f64,
}

/// Scores, ranking and the suggested drop set.
#[derive(Debug, Clone, Serialize)]
pub struct ImportanceReport {
    pub metric: Metric,
    pub base_layers: usize,
    /// The base layers the scored plan runs, in order.
    pub plan_layers: Vec<usize>,
    pub prompts: usize,
    pub tokens: usize,
    /// `K`: layers to drop (the block size `n` for the angular metric).
    pub drop_count: usize,
    /// BI of every layer of the plan, in plan order.
    pub block_influence: Vec<LayerScore>,
    /// Every block of `K` consecutive plan layers, in plan order.
    pub angular_distance: Vec<BlockScore>,
    /// By the chosen metric, most removable first: layers (bi) or blocks' first layers (angular).
    pub ranking: Vec<usize>,
    /// The suggested base layers to drop, ascending.
    pub drop: Vec<usize>,
}

/// A calibration pass over one plan of a model, a chunk at a time.
pub struct ImportanceRun {
    engine: Engine,
    spec: RunSpec,
    prompts: Vec<Vec<u32>>,
    /// The prompt running and the next token of it.
    index: usize,
    at: usize,
    influence: BlockInfluence,
    finals: FinalTokenStates,
    /// Sum over prompts of the angular distance between `h_i` and `h_j`, `[(P+1) * (P+1)]`.
    angular_sums: Vec<f64>,
}

impl ImportanceRun {
    /// Checks the prompts against the model's context and sets up a cache for the longest. `spec`
    /// is a plan, optionally with an overlay and an adapter.
    pub fn new(
        model: Arc<DecoderModel>,
        spec: impl Into<RunSpec>,
        prompts: Vec<Vec<u32>>,
    ) -> Result<Self, ImportanceError> {
        let spec = spec.into();
        let plan = &spec.plan;
        let max = model.config().max_position_embeddings;
        for (index, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(calibration::CalibrationError::Empty { index }.into());
            }
            if p.len() > max {
                let len = p.len();
                return Err(ImportanceError::PromptTooLong { index, len, max });
            }
        }
        if prompts.is_empty() {
            return Err(calibration::CalibrationError::NoPrompts.into());
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let opts = EngineOptions {
            kv_blocks: longest.div_ceil(16) + 1,
            block_size: 16,
            max_model_len: None,
            kv_cache_bytes: None,
            prefix_caching: false,
            device_sampling: false,
            ..EngineOptions::default()
        };
        let positions = plan.layers().len() + 1;
        let first = plan.layers().first().copied().unwrap_or(0);
        // The serving device's own cache kind: paged on CUDA, contiguous on the CPU.
        let engine = Engine::for_device(model, &opts).map_err(ImportanceError::Cache)?;
        Ok(Self {
            engine,
            influence: BlockInfluence::new(plan.base_layers()),
            finals: FinalTokenStates::new(first),
            angular_sums: vec![0.0; positions * positions],
            spec,
            prompts,
            index: 0,
            at: 0,
        })
    }

    /// Prompts finished so far, of how many.
    pub fn progress(&self) -> (usize, usize) {
        (self.index, self.prompts.len())
    }

    /// Runs the next chunk; `Ok(true)` once every prompt has run.
    pub fn advance(&mut self) -> Result<bool, ImportanceError> {
        let Some(prompt) = self.prompts.get(self.index) else {
            return Ok(true);
        };
        let index = self.index;
        let seq = index as u64;
        let engine_err = |error| ImportanceError::Engine { index, error };
        if self.at == 0 {
            self.engine
                .add_sequence(seq, self.spec.clone())
                .map_err(engine_err)?;
        }
        let end = (self.at + CHUNK_TOKENS).min(prompt.len());
        let item = StepItem {
            seq,
            tokens: prompt[self.at..end].to_vec(),
            score: None,
            want_logits: false,
            greedy_top: None,
            draw: None,
        };
        let mut taps = Taps(vec![
            &mut self.influence as &mut dyn LayerTap,
            &mut self.finals,
        ]);
        let outcome = self.engine.step_with_tap(&[item], Some(&mut taps)).pop();
        if let Some(Err(error)) = outcome {
            self.engine.release(seq);
            return Err(engine_err(error));
        }
        self.at = end;
        if end == prompt.len() {
            self.engine.release(seq);
            self.influence.end_prompt();
            self.add_angular();
            self.index += 1;
            self.at = 0;
        }
        Ok(self.index == self.prompts.len())
    }

    fn add_angular(&mut self) {
        let states = self.finals.take();
        let n = self.spec.plan.layers().len() + 1;
        if states.len() != n {
            return;
        }
        for i in 0..n {
            for j in i + 1..n {
                self.angular_sums[i * n + j] += angular_distance(&states[i], &states[j]);
            }
        }
    }

    /// The report once every prompt has run, ranked by `metric` with `drop` layers suggested.
    pub fn report(&self, metric: Metric, drop: usize) -> Result<ImportanceReport, ImportanceError> {
        let plan = &self.spec.plan;
        let layers = plan.layers();
        check_drop(drop, layers.len())?;
        let prompts = self.index.max(1) as f64;
        let bi = self.influence.scores();
        let block_influence: Vec<LayerScore> = layers
            .iter()
            .map(|&layer| LayerScore {
                layer,
                score: bi[layer].unwrap_or(f64::NAN),
            })
            .collect();
        let n = layers.len() + 1;
        let angular_distance: Vec<BlockScore> = (0..=layers.len() - drop)
            .map(|start| BlockScore {
                layers: layers[start..start + drop].to_vec(),
                distance: self.angular_sums[start * n + start + drop] / prompts,
            })
            .collect();
        let (ranking, mut dropped) = match metric {
            Metric::Bi => {
                let ranking = rank_ascending(block_influence.iter().map(|s| (s.layer, s.score)));
                let dropped = ranking[..drop].to_vec();
                (ranking, dropped)
            }
            Metric::Angular => {
                let ranking =
                    rank_ascending(angular_distance.iter().map(|b| (b.layers[0], b.distance)));
                let best = ranking[0];
                let block = angular_distance.iter().find(|b| b.layers[0] == best);
                let dropped = block.map(|b| b.layers.clone()).unwrap_or_default();
                (ranking, dropped)
            }
        };
        dropped.sort_unstable();
        Ok(ImportanceReport {
            metric,
            base_layers: plan.base_layers(),
            plan_layers: layers.to_vec(),
            prompts: self.index,
            tokens: self.prompts[..self.index].iter().map(Vec::len).sum(),
            drop_count: drop,
            block_influence,
            angular_distance,
            ranking,
            drop: dropped,
        })
    }
}

impl ImportanceReport {
    /// A plain-text table: each layer's BI and each block's distance, the ranking and the drop set.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{} prompts, {} tokens; plan of {} of {} layers; metric {:?}, K = {}\n",
            self.prompts,
            self.tokens,
            self.plan_layers.len(),
            self.base_layers,
            self.metric,
            self.drop_count
        );
        out += &format!("{:>5}  {:>10}  {:>18}\n", "layer", "BI", "angular (block)");
        for (i, s) in self.block_influence.iter().enumerate() {
            let block = self
                .angular_distance
                .get(i)
                .map(|b| {
                    format!(
                        "{:.6} ({}..={})",
                        b.distance,
                        b.layers[0],
                        b.layers[b.layers.len() - 1]
                    )
                })
                .unwrap_or_default();
            out += &format!("{:>5}  {:>10.6}  {:>18}\n", s.layer, s.score, block);
        }
        let list = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        out += &format!("ranking (most removable first): {}\n", list(&self.ranking));
        out += &format!("suggested drop: {}", list(&self.drop));
        out
    }
}

/// `K` must leave at least one layer.
pub fn check_drop(drop: usize, plan_len: usize) -> Result<(), ImportanceError> {
    if drop == 0 || drop >= plan_len {
        return Err(ImportanceError::BadDrop { drop, plan_len });
    }
    Ok(())
}

/// `arccos(cos(a, b)) / pi`, in f64 over f32 states.
fn angular_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    let cos = dot / (na.sqrt() * nb.sqrt()).max(1e-300);
    cos.clamp(-1.0, 1.0).acos() / std::f64::consts::PI
}

/// Keys by ascending score, ties to the later key (NaN last).
fn rank_ascending(scored: impl Iterator<Item = (usize, f64)>) -> Vec<usize> {
    let mut v: Vec<(usize, f64)> = scored.collect();
    v.sort_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)));
    v.into_iter().map(|(k, _)| k).collect()
}

/// The default `K`: a quarter of the plan's layers (the paper's 8 of 32), at least one.
pub fn default_drop(plan_len: usize) -> usize {
    (plan_len / 4).clamp(1, plan_len.saturating_sub(1).max(1))
}

/// Runs every prompt and reports (the command line's path; a server uses [`ImportanceTask`]).
pub fn run_to_end(
    model: Arc<DecoderModel>,
    plan: Arc<LayerPlan>,
    prompts: Vec<Vec<u32>>,
    metric: Metric,
    drop: usize,
) -> Result<ImportanceReport, ImportanceError> {
    check_drop(drop, plan.layers().len())?;
    let mut run = ImportanceRun::new(model, plan, prompts)?;
    while !run.advance()? {}
    run.report(metric, drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn angular_distance_is_a_fraction_of_a_half_turn() {
        assert!(angular_distance(&[1., 0.], &[2., 0.]).abs() < 1e-12);
        assert!((angular_distance(&[1., 0.], &[0., 3.]) - 0.5).abs() < 1e-12);
        assert!((angular_distance(&[1., 0.], &[-1., 0.]) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ranking_breaks_ties_to_the_later_key() {
        let r = rank_ascending([(1, 0.5), (2, 0.1), (3, 0.5), (4, f64::NAN)].into_iter());
        assert_eq!(r, vec![2, 3, 1, 4]);
    }

    #[test]
    fn the_default_drop_is_a_quarter() {
        assert_eq!(default_drop(32), 8);
        assert_eq!(default_drop(30), 7);
        assert_eq!(default_drop(3), 1);
        assert_eq!(default_drop(2), 1);
    }
}

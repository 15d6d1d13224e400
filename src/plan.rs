//! Layer plans: the ordered list of base-layer indices a forward pass runs. The base model is the
//! plan of all layers; a pruned variant is a plan over the same weights.

use serde::{Deserialize, Serialize};

/// A layer-list problem, worded for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

/// How a plan is described: drop these layers, keep these layers (in this order), or drop the
/// last fraction of layers (reverse-order pruning; `round(fraction * layers)` layers go).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlanSpec {
    Drop(Vec<usize>),
    Keep(Vec<usize>),
    Reverse(f64),
}

/// A validated plan over a base model with `base_layers` layers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct LayerPlan {
    layers: Vec<usize>,
    base_layers: usize,
}

/// Parses `"3,5,22-29"` into indices (ranges inclusive), in the order given.
pub fn parse_layer_list(text: &str) -> Result<Vec<usize>, PlanError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(PlanError(format!("empty entry in layer list `{text}`")));
        }
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| PlanError(format!("`{s}` is not a layer index (in `{text}`)")))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(PlanError(format!("range `{part}` runs backwards")));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// Writes indices compactly as `"3,5,22-29"`.
pub fn format_layer_list(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let mut j = i;
        while j + 1 < layers.len() && layers[j + 1] == layers[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", layers[i], layers[j])
        } else {
            layers[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

impl PlanSpec {
    /// Resolves the description against a base with `base_layers` layers.
    pub fn resolve(&self, base_layers: usize) -> Result<LayerPlan, PlanError> {
        match self {
            PlanSpec::Keep(keep) => LayerPlan::new(keep.clone(), base_layers),
            PlanSpec::Drop(drop) => {
                check_indices(drop, base_layers)?;
                let keep = (0..base_layers).filter(|i| !drop.contains(i)).collect();
                LayerPlan::new(keep, base_layers)
            }
            PlanSpec::Reverse(fraction) => {
                if !(0.0..1.0).contains(fraction) {
                    return Err(PlanError(format!(
                        "reverse fraction {fraction} must be in [0, 1)"
                    )));
                }
                let dropped = (fraction * base_layers as f64).round() as usize;
                LayerPlan::new((0..base_layers - dropped).collect(), base_layers)
            }
        }
    }
}

fn check_indices(layers: &[usize], base_layers: usize) -> Result<(), PlanError> {
    let mut seen = vec![false; base_layers];
    for &l in layers {
        if l >= base_layers {
            return Err(PlanError(format!(
                "layer {l} is out of range: the base has layers 0..{}",
                base_layers.saturating_sub(1)
            )));
        }
        if std::mem::replace(&mut seen[l], true) {
            return Err(PlanError(format!("layer {l} is listed twice")));
        }
    }
    Ok(())
}

impl LayerPlan {
    /// A plan running `layers` in order; indices must be in range and distinct, and at least one kept.
    pub fn new(layers: Vec<usize>, base_layers: usize) -> Result<Self, PlanError> {
        check_indices(&layers, base_layers)?;
        if layers.is_empty() {
            return Err(PlanError("the plan keeps no layers".into()));
        }
        Ok(Self {
            layers,
            base_layers,
        })
    }

    /// Every layer of the base, in order.
    pub fn full(base_layers: usize) -> Self {
        Self {
            layers: (0..base_layers).collect(),
            base_layers,
        }
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    pub fn base_layers(&self) -> usize {
        self.base_layers
    }

    pub fn is_full(&self) -> bool {
        self.layers.len() == self.base_layers
            && self.layers.iter().enumerate().all(|(i, &l)| i == l)
    }

    /// Base layers the plan does not run, ascending.
    pub fn dropped(&self) -> Vec<usize> {
        (0..self.base_layers)
            .filter(|i| !self.layers.contains(i))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(parse_layer_list("3, 5,7-9").unwrap(), vec![3, 5, 7, 8, 9]);
        assert!(parse_layer_list("3,,4").is_err());
        assert!(parse_layer_list("9-7").is_err());
        assert!(parse_layer_list("x").is_err());
        assert_eq!(format_layer_list(&[3, 5, 7, 8, 9]), "3,5,7-9");
    }

    #[test]
    fn resolves_specs() {
        let p = PlanSpec::Drop(vec![22, 23, 24, 25, 26, 27, 28, 29])
            .resolve(30)
            .unwrap();
        assert_eq!(p.layers(), (0..22).collect::<Vec<_>>().as_slice());
        assert_eq!(PlanSpec::Reverse(0.25).resolve(30).unwrap(), p);
        assert_eq!(
            PlanSpec::Reverse(0.25).resolve(32).unwrap().dropped(),
            (24..32).collect::<Vec<_>>()
        );
        assert_eq!(
            PlanSpec::Reverse(0.25).resolve(28).unwrap().dropped(),
            (21..28).collect::<Vec<_>>()
        );
        assert!(LayerPlan::full(4).is_full());
    }

    #[test]
    fn rejects_bad_plans() {
        assert!(PlanSpec::Drop(vec![30])
            .resolve(30)
            .unwrap_err()
            .0
            .contains("out of range"));
        assert!(PlanSpec::Keep(vec![1, 1])
            .resolve(30)
            .unwrap_err()
            .0
            .contains("twice"));
        assert!(PlanSpec::Drop((0..4).collect()).resolve(4).is_err());
        assert!(PlanSpec::Reverse(1.5).resolve(4).is_err());
    }
}

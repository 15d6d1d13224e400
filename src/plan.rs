//! Layer plans: the ordered list of base-layer indices a forward pass runs. The base model is the
//! plan of all layers; a pruned variant is a plan over the same weights.
//!
//! Contract: a layer list from a user (`"3,5,22-29"`) is held as ranges and never expanded before
//! every bound is checked against the base it applies to, so no input can make a plan longer than
//! its base's layer count or allocate in proportion to the numbers it names.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// A layer-list or plan problem, worded for the user.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("empty entry in layer list `{0}`")]
    EmptyEntry(String),
    #[error("`{entry}` is not a layer index (in `{list}`)")]
    NotAnIndex { entry: String, list: String },
    #[error("range `{0}` runs backwards")]
    Backwards(String),
    #[error("layer {layer} is out of range: the base has layers 0..{}", .base_layers.saturating_sub(1))]
    OutOfRange { layer: usize, base_layers: usize },
    #[error("layer {0} is listed twice")]
    Duplicate(usize),
    #[error("the plan keeps no layers")]
    KeepsNothing,
    #[error("reverse fraction {0} must be in [0, 1)")]
    BadFraction(f64),
    #[error("layer {layer} is not in the plan of `{parent}` (it runs {kept})")]
    NotInParent {
        layer: usize,
        parent: String,
        kept: String,
    },
}

/// A user's layer list, held as inclusive ranges until [`LayerList::expand`] checks it against a
/// base. Parsing checks the syntax only. Consecutive entries are merged (`3,4,5` is `3-5`), so two
/// spellings of one list compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerList {
    ranges: Vec<(usize, usize)>,
}

impl LayerList {
    fn push(&mut self, (a, b): (usize, usize)) {
        match self.ranges.last_mut() {
            Some(last) if last.1.checked_add(1) == Some(a) => last.1 = b,
            _ => self.ranges.push((a, b)),
        }
    }
}

impl FromStr for LayerList {
    type Err = PlanError;

    /// Parses `"3,5,22-29"` (ranges inclusive, order kept); nothing is expanded.
    fn from_str(text: &str) -> Result<Self, PlanError> {
        let mut list = LayerList::default();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(PlanError::EmptyEntry(text.to_string()));
            }
            let num = |s: &str| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|_| PlanError::NotAnIndex {
                        entry: s.trim().to_string(),
                        list: text.to_string(),
                    })
            };
            let range = match part.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None => {
                    let i = num(part)?;
                    (i, i)
                }
            };
            if range.0 > range.1 {
                return Err(PlanError::Backwards(part.to_string()));
            }
            list.push(range);
        }
        Ok(list)
    }
}

impl From<Vec<usize>> for LayerList {
    fn from(indices: Vec<usize>) -> Self {
        let mut list = LayerList::default();
        for i in indices {
            list.push((i, i));
        }
        list
    }
}

impl FromIterator<usize> for LayerList {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl fmt::Display for LayerList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ranges
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                }
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl LayerList {
    /// The indices in order, after checking that each lies below `base_layers` and that none
    /// repeats; the result is never longer than `base_layers`.
    pub fn expand(&self, base_layers: usize) -> Result<Vec<usize>, PlanError> {
        let mut seen = vec![false; base_layers];
        let mut out = Vec::new();
        for &(a, b) in &self.ranges {
            if b >= base_layers {
                return Err(PlanError::OutOfRange {
                    layer: b,
                    base_layers,
                });
            }
            for (l, was_seen) in seen.iter_mut().enumerate().take(b + 1).skip(a) {
                if std::mem::replace(was_seen, true) {
                    return Err(PlanError::Duplicate(l));
                }
                out.push(l);
            }
        }
        Ok(out)
    }
}

/// Parses a layer list; kept for callers that name it as a function.
pub fn parse_layer_list(text: &str) -> Result<LayerList, PlanError> {
    text.parse()
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

/// How a plan is described: drop these layers, keep these layers (in this order), or drop the
/// last fraction of layers (reverse-order pruning; `round(fraction * layers)` layers go).
#[derive(Debug, Clone, PartialEq)]
pub enum PlanSpec {
    Drop(LayerList),
    Keep(LayerList),
    Reverse(f64),
}

/// A validated plan over a base model with `base_layers` layers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct LayerPlan {
    layers: Vec<usize>,
    base_layers: usize,
}

impl PlanSpec {
    /// Resolves the description against a base with `base_layers` layers.
    pub fn resolve(&self, base_layers: usize) -> Result<LayerPlan, PlanError> {
        self.resolve_on(&LayerPlan::full(base_layers), "")
    }

    /// Resolves the description on top of `parent` (a base's full plan or a variant's plan):
    /// indices still name base layers; `drop` removes layers from the parent's plan, `keep` picks
    /// layers of the parent's plan, in the order given, and `reverse` drops the last fraction of
    /// the parent's layers. A layer the parent does not run is refused, naming `parent_name`.
    pub fn resolve_on(
        &self,
        parent: &LayerPlan,
        parent_name: &str,
    ) -> Result<LayerPlan, PlanError> {
        let base_layers = parent.base_layers;
        let check_in_parent =
            |layers: &[usize]| match layers.iter().find(|l| !parent.layers.contains(l)) {
                Some(&layer) => Err(PlanError::NotInParent {
                    layer,
                    parent: parent_name.to_string(),
                    kept: format_layer_list(&parent.layers),
                }),
                None => Ok(()),
            };
        match self {
            PlanSpec::Keep(keep) => {
                let keep = keep.expand(base_layers)?;
                check_in_parent(&keep)?;
                LayerPlan::new(keep, base_layers)
            }
            PlanSpec::Drop(drop) => {
                let drop = drop.expand(base_layers)?;
                check_in_parent(&drop)?;
                let keep = parent
                    .layers
                    .iter()
                    .copied()
                    .filter(|l| !drop.contains(l))
                    .collect();
                LayerPlan::new(keep, base_layers)
            }
            PlanSpec::Reverse(fraction) => {
                if !(0.0..1.0).contains(fraction) {
                    return Err(PlanError::BadFraction(*fraction));
                }
                let n = parent.layers.len();
                let dropped = (fraction * n as f64).round() as usize;
                LayerPlan::new(parent.layers[..n - dropped].to_vec(), base_layers)
            }
        }
    }
}

impl LayerPlan {
    /// A plan running `layers` in order; indices must be in range and distinct, and at least one kept.
    pub fn new(layers: Vec<usize>, base_layers: usize) -> Result<Self, PlanError> {
        let mut seen = vec![false; base_layers];
        for &l in &layers {
            if l >= base_layers {
                return Err(PlanError::OutOfRange {
                    layer: l,
                    base_layers,
                });
            }
            if std::mem::replace(&mut seen[l], true) {
                return Err(PlanError::Duplicate(l));
            }
        }
        if layers.is_empty() {
            return Err(PlanError::KeepsNothing);
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

    /// The one spelling of this plan relative to `parent`: `drop=<sorted list>` when it runs a
    /// subsequence of the parent's layers in their order, else `keep=<list in order>`.
    pub fn canonical_suffix(&self, parent: &LayerPlan) -> String {
        let mut rest = parent.layers.iter();
        let is_subsequence = self.layers.iter().all(|l| rest.any(|p| p == l));
        if is_subsequence {
            let dropped: Vec<usize> = parent
                .layers
                .iter()
                .copied()
                .filter(|l| !self.layers.contains(l))
                .collect();
            let mut sorted = dropped;
            sorted.sort_unstable();
            format!("drop={}", format_layer_list(&sorted))
        } else {
            format!("keep={}", format_layer_list(&self.layers))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(text: &str) -> LayerList {
        text.parse().unwrap()
    }

    #[test]
    fn parses_lists_and_ranges() {
        assert_eq!(list("3, 5,7-9").expand(30).unwrap(), vec![3, 5, 7, 8, 9]);
        assert!("3,,4".parse::<LayerList>().is_err());
        assert!("9-7".parse::<LayerList>().is_err());
        assert!("x".parse::<LayerList>().is_err());
        assert_eq!(format_layer_list(&[3, 5, 7, 8, 9]), "3,5,7-9");
        assert_eq!(list("3,5,7-9").to_string(), "3,5,7-9");
        assert_eq!(list("3,4,5,7"), LayerList::from(vec![3, 4, 5, 7]));
        assert_eq!(list("3,4,5,7").to_string(), "3-5,7");
    }

    #[test]
    fn huge_ranges_are_refused_before_expansion() {
        // Expanding any of these would allocate terabytes or overflow a capacity.
        for text in [
            "0-1000000000000",
            "0-18446744073709551615",
            "18446744073709551615",
            "5-300000000",
        ] {
            let err = list(text).expand(30).unwrap_err();
            assert!(matches!(err, PlanError::OutOfRange { .. }), "{text}: {err}");
        }
        assert!("0-18446744073709551616".parse::<LayerList>().is_err());
    }

    #[test]
    fn resolves_specs() {
        let p = PlanSpec::Drop(list("22-29")).resolve(30).unwrap();
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
        assert!(PlanSpec::Drop(vec![30].into())
            .resolve(30)
            .unwrap_err()
            .to_string()
            .contains("out of range"));
        assert_eq!(
            PlanSpec::Keep(vec![1, 1].into()).resolve(30).unwrap_err(),
            PlanError::Duplicate(1)
        );
        assert_eq!(
            PlanSpec::Drop((0..4).collect::<Vec<_>>().into())
                .resolve(4)
                .unwrap_err(),
            PlanError::KeepsNothing
        );
        assert!(PlanSpec::Reverse(1.5).resolve(4).is_err());
    }

    #[test]
    fn composes_on_a_parent_plan() {
        let rev25 = PlanSpec::Reverse(0.25).resolve(30).unwrap();
        let composed = PlanSpec::Drop(list("3"))
            .resolve_on(&rev25, "rev25")
            .unwrap();
        let expected: Vec<usize> = (0..22).filter(|&l| l != 3).collect();
        assert_eq!(composed.layers(), expected.as_slice());
        let err = PlanSpec::Drop(list("25"))
            .resolve_on(&rev25, "rev25")
            .unwrap_err();
        assert!(
            err.to_string().contains("not in the plan of `rev25`"),
            "{err}"
        );
        assert_eq!(composed.canonical_suffix(&rev25), "drop=3");
        assert_eq!(
            composed.canonical_suffix(&LayerPlan::full(30)),
            "drop=3,22-29"
        );
        let swapped = PlanSpec::Keep(list("1,0")).resolve(30).unwrap();
        assert_eq!(swapped.canonical_suffix(&LayerPlan::full(30)), "keep=1,0");
    }
}

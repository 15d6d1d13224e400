//! Shared hidden states within a step: when sequences of different plans of one base feed the
//! same fresh prompt (same tokens from position 0, same adapter and overlay) in one step, the
//! layers their plans start with in common run once. The sequence of the plan run in full (the
//! trunk) gives the other (the branch) its hidden states after those layers and the keys and
//! values it stored there; the branch runs only its remaining layers. `rev25` scored beside its
//! base runs no layer of its own; `@drop=i` beside the base runs layers `i+1..`.
//!
//! Contract: a branch's results equal those of running it alone within float reordering (the
//! rows are computed in another packed forward); only fresh prompts share (a continued chunk's
//! history may differ), only caches that can share keys and values take part
//! ([`crate::engine::kv::KvCache::share_kv`]: the CPU's contiguous cache, and the paged pool,
//! which shares whole blocks and copies a partly filled last one), and never while a layer tap
//! is observing the step.

use std::collections::HashMap;

use candle_core::Tensor;

use super::instrument::taps::LayerTap;
use super::{RunSpec, StepItem};
use crate::engine::Engine;

/// A branch item run from a trunk item's hidden states after `depth` plan positions.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fork {
    pub trunk_item: usize,
    pub depth: usize,
}

/// Branch items of one group that start after the same number of plan positions, and their
/// hidden states there (packed in item order).
pub(super) struct BranchRun {
    pub depth: usize,
    pub items: Vec<usize>,
    pub hidden: Tensor,
}

/// How a step's groups share work: the order they run in and each item's fork, if any.
pub(super) struct SharePlan {
    /// Group indices in run order (longest plans first, so they can be trunks).
    pub order: Vec<usize>,
    /// Per item index: where its hidden states come from.
    pub forks: HashMap<usize, Fork>,
}

/// Number of leading plan positions two plans run alike.
fn common_depth(a: &RunSpec, b: &RunSpec) -> usize {
    let same_overlay = match (&a.overlay, &b.overlay) {
        (None, None) => true,
        (Some(x), Some(y)) => std::sync::Arc::ptr_eq(x, y),
        _ => false,
    };
    if !same_overlay {
        return 0;
    }
    a.plan
        .layers()
        .iter()
        .zip(b.plan.layers())
        .take_while(|(x, y)| x == y)
        .count()
}

impl Engine {
    /// Plans which items of `groups` take their first layers from an item of an earlier group:
    /// a fresh prompt of the same tokens and adapter in the group sharing the most leading
    /// layers. Trunk items are always run from the embeddings, so the order decides what can
    /// be shared (see the sort below).
    pub(super) fn plan_sharing(
        &self,
        items: &[StepItem],
        groups: &[(RunSpec, Vec<usize>)],
        allowed: bool,
    ) -> SharePlan {
        // Longest plans first; among plans of one length, the lexicographically smallest layer
        // list first, the one sharing the longest prefixes with the rest: in a single-layer
        // sweep `@drop=N-1` is the trunk and every `@drop=i` forks from it after `i` layers.
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by(|&a, &b| {
            let (la, lb) = (groups[a].0.plan.layers(), groups[b].0.plan.layers());
            lb.len().cmp(&la.len()).then_with(|| la.cmp(lb))
        });
        let mut forks = HashMap::new();
        if !allowed || !self.share_hidden || groups.len() < 2 {
            return SharePlan { order, forks };
        }
        let fresh = |i: usize| self.seqs.get(&items[i].seq).is_some_and(|s| s.len == 0);
        let lora = |i: usize| {
            self.seqs[&items[i].seq]
                .spec
                .lora
                .as_ref()
                .map(|l| std::sync::Arc::as_ptr(l) as usize)
        };
        let exact = |i: usize| self.exact_class(items[i].score.is_some());
        for (n, &g) in order.iter().enumerate() {
            for &b in &groups[g].1 {
                if !fresh(b) {
                    continue;
                }
                // The trunk sharing the most layers among earlier groups' unforked items.
                let best = order[..n]
                    .iter()
                    .filter_map(|&t| {
                        let depth = common_depth(&groups[t].0, &groups[g].0);
                        let a = groups[t].1.iter().copied().find(|&a| {
                            !forks.contains_key(&a)
                                && fresh(a)
                                && items[a].tokens == items[b].tokens
                                && lora(a) == lora(b)
                                && exact(a) == exact(b)
                        })?;
                        (depth > 0).then_some(Fork {
                            trunk_item: a,
                            depth,
                        })
                    })
                    .max_by_key(|f| f.depth);
                if let Some(f) = best {
                    forks.insert(b, f);
                }
            }
        }
        SharePlan { order, forks }
    }

    /// The branch runs of one group's `forked` items, one per depth, each branch given its
    /// trunk's keys and values for those positions; and the items that cannot fork after all
    /// (their trunk failed), to run whole.
    pub(super) fn fork_runs(
        &mut self,
        items: &[StepItem],
        forked: &[usize],
        share: &SharePlan,
        captured: &HashMap<(usize, usize), Tensor>,
    ) -> (Vec<BranchRun>, Vec<usize>) {
        let mut by_depth: Vec<(usize, Vec<usize>, Vec<Tensor>)> = Vec::new();
        let mut unshared = Vec::new();
        for &b in forked {
            let f = share.forks[&b];
            let Some(x) = captured.get(&(f.trunk_item, f.depth)) else {
                unshared.push(b);
                continue;
            };
            let (from, to) = (items[f.trunk_item].seq, items[b].seq);
            match self
                .cache
                .share_kv(from, to, f.depth, items[b].tokens.len())
            {
                Ok(true) => {}
                _ => {
                    unshared.push(b);
                    continue;
                }
            }
            self.shared_layer_rows += (items[b].tokens.len() * f.depth) as u64;
            match by_depth.iter_mut().find(|(d, _, _)| *d == f.depth) {
                Some((_, bs, xs)) => {
                    bs.push(b);
                    xs.push(x.clone());
                }
                None => by_depth.push((f.depth, vec![b], vec![x.clone()])),
            }
        }
        let mut runs = Vec::with_capacity(by_depth.len());
        for (depth, items, xs) in by_depth {
            match Tensor::cat(&xs, 0) {
                Ok(hidden) => runs.push(BranchRun {
                    depth,
                    items,
                    hidden,
                }),
                Err(_) => unshared.extend(items),
            }
        }
        (runs, unshared)
    }

    /// Whether fresh prompts of plans sharing leading layers run those layers once per step.
    pub fn shares_hidden(&self) -> bool {
        self.share_hidden
    }

    /// Rows times plan positions that forks did not recompute, since the engine started.
    pub fn shared_layer_rows(&self) -> u64 {
        self.shared_layer_rows
    }
}

impl SharePlan {
    /// What the items `whole` of a group running `spec` must leave for their branches: each
    /// trunk item's rows after each depth a branch asks for.
    pub(super) fn captures_from(
        &self,
        spec: &RunSpec,
        items: &[StepItem],
        whole: &[usize],
    ) -> Capture {
        let mut capture = Capture::default();
        let mut offset = 0;
        for &a in whole {
            let len = items[a].tokens.len();
            for f in self.forks.values().filter(|f| f.trunk_item == a) {
                if let Some(&layer) = spec.plan.layers().get(f.depth - 1) {
                    capture.want(layer, a, f.depth, offset, len);
                }
            }
            offset += len;
        }
        capture
    }
}

/// Records the hidden states of trunk items after given plan positions while the trunk's group
/// runs: `wants[base_layer]` lists (item, depth, packed row offset, rows).
#[derive(Default)]
pub(super) struct Capture {
    wants: HashMap<usize, Vec<(usize, usize, usize, usize)>>,
    pub got: HashMap<(usize, usize), Tensor>,
}

impl Capture {
    /// Asks for `item`'s rows (`offset`, `len` in its group's packing) after `depth` positions
    /// of a plan whose base layer at position `depth - 1` is `layer`.
    pub fn want(&mut self, layer: usize, item: usize, depth: usize, offset: usize, len: usize) {
        let w = self.wants.entry(layer).or_default();
        if !w.iter().any(|&(i, d, _, _)| (i, d) == (item, depth)) {
            w.push((item, depth, offset, len));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.wants.is_empty()
    }
}

impl LayerTap for Capture {
    fn observe(
        &mut self,
        base_layer: usize,
        _input: &Tensor,
        output: &Tensor,
    ) -> candle_core::Result<()> {
        if let Some(w) = self.wants.get(&base_layer) {
            for &(item, depth, offset, len) in w {
                self.got
                    .insert((item, depth), output.narrow(0, offset, len)?.contiguous()?);
            }
        }
        Ok(())
    }
}

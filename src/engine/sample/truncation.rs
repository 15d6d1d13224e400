//! Which tokens a draw may pick after top-k, top-p (nucleus) and min-p truncation, in time linear
//! in the vocabulary: no full sort, so a 128k-token vocabulary costs a few passes per row.
//!
//! Contract: the kept set is exactly the shortest prefix of the candidates ordered by value
//! (descending, ties by lower id first) whose probability mass reaches `top_p` of the whole,
//! intersected with the tokens whose probability is at least `min_p` times the largest — the set
//! a full sort would give (up to the rounding of the running sums). The reference is
//! [`tests::kept_by_sorting`].

/// Buckets per nat of log-probability below the largest, and how many buckets (the last one takes
/// everything further down).
const BUCKETS_PER_NAT: f64 = 32.0;
const BUCKETS: usize = 2048;

/// The candidates (id, temperature-scaled logit) a draw chooses from and their weights
/// `exp(value - max)` (the largest is 1).
pub struct Candidates {
    pub items: Vec<(u32, f32)>,
    pub weights: Vec<f64>,
}

impl Candidates {
    /// Every id of `logits` (or its `top_k` best, when `0 < top_k < len`), in id order, scaled
    /// by `1 / temperature`.
    pub fn new(logits: &[f32], temperature: f32, top_k: usize) -> Self {
        let items: Vec<(u32, f32)> = if top_k > 0 && top_k < logits.len() {
            let mut best = super::sampler::top_k_pairs(logits, top_k);
            best.sort_unstable_by_key(|c| c.0);
            best
        } else {
            logits
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u32, v))
                .collect()
        };
        let inv_t = 1.0 / f64::from(temperature);
        let max = items.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
        let items: Vec<(u32, f32)> = items
            .into_iter()
            .map(|(i, v)| (i, ((f64::from(v) - f64::from(max)) * inv_t) as f32))
            .collect();
        let weights = items.iter().map(|c| f64::from(c.1).exp()).collect();
        Self { items, weights }
    }

    /// Whether each candidate survives top-p and min-p.
    pub fn kept(&self, top_p: f32, min_p: f32) -> Vec<bool> {
        let total: f64 = self.weights.iter().sum();
        let boundary = if top_p < 1.0 {
            self.nucleus_boundary(f64::from(top_p) * total)
        } else {
            None
        };
        let floor = f64::from(min_p.max(0.0));
        self.items
            .iter()
            .zip(&self.weights)
            .map(|(&(id, v), &w)| {
                let in_nucleus = boundary.is_none_or(|(bv, bid)| v > bv || (v == bv && id <= bid));
                in_nucleus && (w >= floor || v == 0.0)
            })
            .collect()
    }

    /// The last (value, id) of the shortest sorted prefix whose weight reaches `target`: weights
    /// are summed per bucket of log-probability, and only the bucket where the sum crosses the
    /// target is sorted.
    fn nucleus_boundary(&self, target: f64) -> Option<(f32, u32)> {
        let bucket = |v: f32| ((-f64::from(v) * BUCKETS_PER_NAT) as usize).min(BUCKETS - 1);
        let mut mass = vec![0.0f64; BUCKETS];
        for (&(_, v), &w) in self.items.iter().zip(&self.weights) {
            mass[bucket(v)] += w;
        }
        let mut before = 0.0;
        let crossing = mass.iter().position(|&m| {
            let reached = before + m >= target;
            if !reached {
                before += m;
            }
            reached
        })?;
        let mut members: Vec<(f32, u32, f64)> = self
            .items
            .iter()
            .zip(&self.weights)
            .filter(|(&(_, v), _)| bucket(v) == crossing)
            .map(|(&(id, v), &w)| (v, id, w))
            .collect();
        members.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut acc = before;
        for &(v, id, w) in &members {
            acc += w;
            if acc >= target {
                return Some((v, id));
            }
        }
        members.last().map(|&(v, id, _)| (v, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: sort every candidate, keep the shortest prefix reaching `top_p` of the
    /// mass, then those at least `min_p` of the largest probability.
    pub fn kept_by_sorting(c: &Candidates, top_p: f32, min_p: f32) -> Vec<bool> {
        let mut order: Vec<usize> = (0..c.items.len()).collect();
        order.sort_by(|&a, &b| {
            c.items[b]
                .1
                .total_cmp(&c.items[a].1)
                .then(c.items[a].0.cmp(&c.items[b].0))
        });
        let total: f64 = c.weights.iter().sum();
        let mut kept = vec![false; c.items.len()];
        let mut acc = 0.0;
        for &j in &order {
            kept[j] = c.weights[j] >= f64::from(min_p) || c.items[j].1 == 0.0;
            acc += c.weights[j];
            if top_p < 1.0 && acc >= f64::from(top_p) * total {
                break;
            }
        }
        kept
    }

    /// A pseudo-random vocabulary with ties and long tails.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (x >> 40) as f32 / (1u64 << 24) as f32;
                (u * 40.0).round() / 4.0 - 5.0
            })
            .collect()
    }

    #[test]
    fn the_kept_set_equals_a_full_sort() {
        for (seed, n) in [(1, 50), (2, 1000), (3, 49152), (4, 128256)] {
            let x = logits(n, seed);
            for temperature in [0.5, 0.9, 1.3] {
                for top_k in [0, 40] {
                    let c = Candidates::new(&x, temperature, top_k);
                    for (top_p, min_p) in [(1.0, 0.0), (0.95, 0.0), (0.5, 0.0), (0.9, 0.05)] {
                        let fast = c.kept(top_p, min_p);
                        let slow = kept_by_sorting(&c, top_p, min_p);
                        let kept = fast.iter().filter(|&&k| k).count();
                        assert!(kept >= 1);
                        assert_eq!(
                            fast, slow,
                            "n {n} T {temperature} top_k {top_k} top_p {top_p} min_p {min_p}"
                        );
                    }
                }
            }
        }
    }
}

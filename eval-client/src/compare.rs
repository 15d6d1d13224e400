//! A/B comparison of result files: per-task score and retention (variant / base), with 95 % paired
//! bootstrap confidence intervals on retention and on the difference, and McNemar's exact test.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One task's per-item outcome for one model, as `eval` writes it. `acc` / `acc_norm` hold the
/// task's two metrics, named in `metrics` (e.g. `acc`/`acc_norm`, `strict_match`/
/// `flexible_extract`, `pass@1`, `rougeL_f1`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: String,
    pub model: String,
    pub metrics: [String; 2],
    pub generative: bool,
    pub acc: f64,
    pub acc_norm: f64,
    pub items: Vec<ItemResult>,
    /// Generative tasks: degeneration of the responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degeneration: Option<crate::analysis::Degeneration>,
    /// Program tasks: every sample's failure class, counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failures: Option<Vec<crate::analysis::FailureCount>>,
}

/// What was asked and answered, for reading a result file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    pub prompt: String,
    pub responses: Vec<String>,
    pub extracted: Vec<String>,
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// The item's score under each metric (0/1, a pass fraction, or ROUGE-L).
    pub value: f64,
    pub value_norm: f64,
    #[serde(default)]
    pub gold: usize,
    #[serde(default)]
    pub loglikelihoods: Vec<f64>,
    #[serde(default)]
    pub pred: usize,
    #[serde(default)]
    pub pred_norm: usize,
    pub record: Record,
}

impl TaskResult {
    pub fn values(&self, norm: bool) -> Vec<f64> {
        self.items
            .iter()
            .map(|i| if norm { i.value_norm } else { i.value })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub task: String,
    pub variant: String,
    pub n: usize,
    pub base_score: f64,
    pub variant_score: f64,
    pub retention: f64,
    pub retention_ci: (f64, f64),
    pub difference: f64,
    pub difference_ci: (f64, f64),
    /// Exact McNemar on 0/1 items; `None` for continuous scores.
    pub mcnemar_p: Option<f64>,
    pub generative: bool,
}

use crate::metrics::average as mean;

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[idx]
}

/// 95 % paired bootstrap intervals of (variant/base, variant - base) over items.
pub fn paired_bootstrap(
    base: &[f64],
    variant: &[f64],
    iterations: usize,
    seed: u64,
) -> ((f64, f64), (f64, f64)) {
    let n = base.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ratios = Vec::with_capacity(iterations);
    let mut diffs = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let (mut b, mut v) = (0.0, 0.0);
        for _ in 0..n {
            let i = rng.random_range(0..n);
            b += base[i];
            v += variant[i];
        }
        if b > 0.0 {
            ratios.push(v / b);
        }
        diffs.push((v - b) / n as f64);
    }
    ratios.sort_by(f64::total_cmp);
    diffs.sort_by(f64::total_cmp);
    let ci = |s: &[f64]| {
        if s.is_empty() {
            (f64::NAN, f64::NAN)
        } else {
            (percentile(s, 0.025), percentile(s, 0.975))
        }
    };
    (ci(&ratios), ci(&diffs))
}

/// Two-sided exact McNemar p-value from the discordant pairs.
pub fn mcnemar_exact(base: &[bool], variant: &[bool]) -> f64 {
    let b = base
        .iter()
        .zip(variant)
        .filter(|(x, y)| **x && !**y)
        .count();
    let c = base
        .iter()
        .zip(variant)
        .filter(|(x, y)| !**x && **y)
        .count();
    let n = b + c;
    if n == 0 {
        return 1.0;
    }
    // P(X <= min(b, c)) for X ~ Binomial(n, 1/2), doubled.
    let k = b.min(c);
    let mut log_choose = 0.0f64; // ln C(n, 0)
    let mut tail = 0.0;
    for i in 0..=k {
        if i > 0 {
            log_choose += ((n - i + 1) as f64).ln() - (i as f64).ln();
        }
        tail += (log_choose - n as f64 * std::f64::consts::LN_2).exp();
    }
    (2.0 * tail).min(1.0)
}

/// Compares a variant's result with the base's on the same items.
pub fn compare(base: &TaskResult, variant: &TaskResult, norm: bool) -> Result<Comparison, String> {
    if base.items.len() != variant.items.len()
        || base
            .items
            .iter()
            .zip(&variant.items)
            .any(|(a, b)| a.id != b.id || a.gold != b.gold)
    {
        return Err(format!(
            "{}: {} and {} were not run on the same items",
            base.task, base.model, variant.model
        ));
    }
    let (b, v) = (base.values(norm), variant.values(norm));
    let (retention_ci, difference_ci) = paired_bootstrap(&b, &v, 2000, 0);
    let binary = |x: &[f64]| x.iter().all(|&y| y == 0.0 || y == 1.0);
    let mcnemar_p = (binary(&b) && binary(&v)).then(|| {
        let to_bool = |x: &[f64]| x.iter().map(|&y| y == 1.0).collect::<Vec<_>>();
        mcnemar_exact(&to_bool(&b), &to_bool(&v))
    });
    let (bs, vs) = (mean(&b), mean(&v));
    Ok(Comparison {
        task: base.task.clone(),
        variant: variant.model.clone(),
        n: b.len(),
        base_score: bs,
        variant_score: vs,
        retention: if bs > 0.0 { vs / bs } else { f64::NAN },
        retention_ci,
        difference: vs - bs,
        difference_ci,
        mcnemar_p,
        generative: base.generative,
    })
}

/// The paper's Table 1 layout, with intervals and p-values.
pub fn markdown(base_model: &str, rows: &[Comparison]) -> String {
    let mut s = format!("| task | variant | n | {base_model} | variant | retention [95% CI] | diff [95% CI] | McNemar p |\n|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} [{:.3}, {:.3}] | {:+.3} [{:+.3}, {:+.3}] | {} |\n",
            r.task, r.variant, r.n, r.base_score, r.variant_score, r.retention, r.retention_ci.0, r.retention_ci.1,
            r.difference, r.difference_ci.0, r.difference_ci.1,
            r.mcnemar_p.map_or("-".to_string(), |p| format!("{p:.2e}"))
        );
    }
    let mut variants: Vec<&str> = Vec::new();
    for r in rows {
        if !variants.contains(&r.variant.as_str()) {
            variants.push(&r.variant);
        }
    }
    for v in variants {
        for (generative, kind) in [(false, "classification"), (true, "generative")] {
            let ret: Vec<f64> = rows
                .iter()
                .filter(|r| r.variant == v && r.generative == generative && r.retention.is_finite())
                .map(|r| r.retention)
                .collect();
            if !ret.is_empty() {
                s += &format!(
                    "\nmean {kind} retention of {v}: {:.3} over {} tasks",
                    ret.iter().sum::<f64>() / ret.len() as f64,
                    ret.len()
                );
            }
        }
    }
    s
}

/// The report files of a comparison against `base`: `compare-<base>.{md,json,png}`, the base's
/// name kept whole (dots included) with `/` made `_`.
pub fn report_paths(out_dir: &std::path::Path, base: &str) -> [std::path::PathBuf; 3] {
    let stem = format!("compare-{}", base.replace(['/', '\\'], "_"));
    ["md", "json", "png"].map(|ext| out_dir.join(format!("{stem}.{ext}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(task: &str, variant: &str, generative: bool) -> Comparison {
        Comparison {
            task: task.into(),
            variant: variant.into(),
            n: 4,
            base_score: 0.5,
            variant_score: 0.25,
            retention: 0.5,
            retention_ci: (0.25, 0.75),
            difference: -0.25,
            difference_ci: (-0.5, 0.0),
            mcnemar_p: Some(0.5),
            generative,
        }
    }

    #[test]
    fn summary_lines_appear_once_per_variant_and_kind() {
        // Two tasks × two variants, rows task by task: the variants alternate.
        let rows = vec![
            row("arc", "rev25", false),
            row("arc", "bi", false),
            row("gsm8k", "rev25", true),
            row("gsm8k", "bi", true),
        ];
        let md = markdown("llama", &rows);
        let summaries: Vec<&str> = md.lines().filter(|l| l.starts_with("mean ")).collect();
        assert_eq!(summaries.len(), 4, "{md}");
        let unique: std::collections::BTreeSet<&&str> = summaries.iter().collect();
        assert_eq!(unique.len(), 4, "{md}");
    }

    #[test]
    fn report_files_keep_the_whole_base_name() {
        let dir = std::path::Path::new("/r");
        let a = report_paths(dir, "llama-3.1-8b-instruct");
        let b = report_paths(dir, "llama-3.2-1b-instruct");
        assert_eq!(a[0], dir.join("compare-llama-3.1-8b-instruct.md"));
        assert_eq!(a[2], dir.join("compare-llama-3.1-8b-instruct.png"));
        assert!(a.iter().all(|p| !b.contains(p)));
        assert_eq!(
            report_paths(dir, "org/model")[1],
            dir.join("compare-org_model.json")
        );
    }

    #[test]
    fn mcnemar_matches_hand_computation() {
        // b = 10, c = 2: 2 * P(X <= 2 | n = 12) = 2 * (1 + 12 + 66) / 4096 = 0.03857.
        let mut base = vec![true; 10];
        base.extend([false; 2]);
        let variant: Vec<bool> = base.iter().map(|x| !x).collect();
        assert!((mcnemar_exact(&base, &variant) - 0.0385742).abs() < 1e-6);
        assert_eq!(mcnemar_exact(&[true, false], &[true, false]), 1.0);
        assert_eq!(mcnemar_exact(&base, &base), 1.0);
    }

    #[test]
    fn bootstrap_intervals_hold_the_estimate_and_repeat() {
        let base: Vec<f64> = (0..200).map(|i| f64::from(i % 3 != 0)).collect();
        let variant: Vec<f64> = (0..200).map(|i| f64::from(i % 2 == 0)).collect();
        let (r, d) = paired_bootstrap(&base, &variant, 1000, 7);
        let ratio = mean(&variant) / mean(&base);
        assert!(r.0 < ratio && ratio < r.1, "{r:?} {ratio}");
        let diff = mean(&variant) - mean(&base);
        assert!(d.0 < diff && diff < d.1);
        assert_eq!(paired_bootstrap(&base, &variant, 1000, 7), (r, d));
        let (same, _) = paired_bootstrap(&base, &base, 200, 1);
        assert_eq!(same, (1.0, 1.0));
    }
}

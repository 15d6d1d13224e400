//! An ablation's files: `ablation.json` (every score), `ablation.md` (a table per iteration and
//! the chosen layers), `sweep.png` (score vs layer of the single-layer sweep) and `heatmap.png`
//! (layer × iteration), under `<out_dir>/ablate/<model>/`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{charts, AblateError, Ablation};
use crate::plot::{unless_no_font, ChartError};

/// The report's directory.
pub fn report_dir(out_dir: &Path, model: &str) -> PathBuf {
    out_dir.join("ablate").join(model.replace("..", "_"))
}

/// The Markdown report.
pub fn markdown(a: &Ablation) -> String {
    let mut md = format!("# Layer ablation of `{}`\n\n", a.model);
    let items: Vec<String> = a
        .items_per_task
        .iter()
        .map(|(t, n)| format!("{t} ({n} items)"))
        .collect();
    let _ = writeln!(md, "Tasks: {}.\n", items.join(", "));
    let base: Vec<String> = a
        .baseline
        .iter()
        .map(|b| format!("{} {} {:.4}", b.task, b.metric, b.value))
        .collect();
    let _ = writeln!(md, "Baseline: {}.", base.join("; "));
    if a.zero_baseline_tasks.len() == a.baseline.len() {
        let _ = writeln!(
            md,
            "Every task scores 0 on the baseline: scores are mean raw metrics, not ratios."
        );
    } else if !a.zero_baseline_tasks.is_empty() {
        let _ = writeln!(
            md,
            "Left out of the scores (baseline 0): {}.",
            a.zero_baseline_tasks.join(", ")
        );
    }
    let tasks: Vec<&str> = a.baseline.iter().map(|b| b.task.as_str()).collect();
    for it in &a.iterations {
        let _ = writeln!(
            md,
            "\n## Iteration {}{}\n",
            it.iteration,
            if it.iteration == 1 {
                " (single-layer sweep)"
            } else {
                ""
            }
        );
        let _ = writeln!(md, "| layer | {} | score |", tasks.join(" | "));
        let _ = writeln!(md, "|---:|{}---:|", "---:|".repeat(tasks.len()));
        for c in &it.candidates {
            let values: Vec<String> = c.tasks.iter().map(|t| format!("{:.4}", t.value)).collect();
            let mark = if c.layer == it.chosen {
                " **chosen**"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| {} | {} | {:.4}{mark} |",
                c.layer,
                values.join(" | "),
                c.score
            );
        }
        let _ = writeln!(md, "\nDropped so far: {:?} → `{}`", it.dropped, it.model);
    }
    md
}

/// Writes the JSON, the Markdown and both charts; returns their paths.
pub fn write_reports(out_dir: &Path, a: &Ablation) -> Result<Vec<PathBuf>, AblateError> {
    let dir = report_dir(out_dir, &a.model);
    let write_err = |path: &Path, e: &dyn std::fmt::Display| AblateError::Write {
        path: path.to_path_buf(),
        error: e.to_string(),
    };
    std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, &e))?;
    let json = dir.join("ablation.json");
    let text = serde_json::to_string_pretty(a).map_err(|e| write_err(&json, &e))?;
    std::fs::write(&json, text).map_err(|e| write_err(&json, &e))?;
    let md = dir.join("ablation.md");
    std::fs::write(&md, markdown(a)).map_err(|e| write_err(&md, &e))?;
    let mut written = vec![json, md];
    type Chart = fn(&Path, &Ablation) -> Result<(), ChartError>;
    let charts: [(&str, Chart); 2] = [
        ("sweep.png", charts::sweep_chart),
        ("heatmap.png", charts::heatmap),
    ];
    for (name, draw) in charts {
        let path = dir.join(name);
        let drawn = unless_no_font(draw(&path, a), &path).map_err(|e| write_err(&path, &e))?;
        if drawn.is_some() {
            written.push(path);
        }
    }
    Ok(written)
}

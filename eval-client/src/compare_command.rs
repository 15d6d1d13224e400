//! `pruneval compare`: retention of variants against a base from result files (the arithmetic
//! probe added whenever every model has it), as markdown (with degeneration and failure
//! analyses), JSON, a retention chart and a failure chart.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::{analysis, compare, eval, plot};

#[derive(Debug, Clone, clap::Args)]
pub struct CompareSettings {
    #[arg(long)]
    pub base: String,
    #[arg(long, value_delimiter = ',')]
    pub variants: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    #[arg(long, default_value = "results")]
    pub out_dir: PathBuf,
    /// Use acc_norm instead of acc.
    #[arg(long)]
    pub norm: bool,
}

/// Writes the report files; returns the markdown.
pub fn run(settings: &CompareSettings) -> Result<String> {
    let CompareSettings {
        base,
        variants,
        tasks: names,
        out_dir,
        norm,
    } = settings.clone();
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut tasks_shown = names.clone();
    // The arithmetic probe sits beside the task scores whenever every model has it.
    let probe = "arithmetic".to_string();
    let has_probe = std::iter::once(&base)
        .chain(&variants)
        .all(|m| eval::result_path(&out_dir, m, &probe).exists());
    if has_probe && !tasks_shown.contains(&probe) {
        tasks_shown.push(probe);
    }
    for task in &tasks_shown {
        let b = eval::read_result(&out_dir, &base, task)?;
        for v in &variants {
            let r = eval::read_result(&out_dir, v, task)?;
            rows.push(compare::compare(&b, &r, norm).map_err(anyhow::Error::msg)?);
            results.push(r);
        }
        results.insert(results.len() - variants.len(), b);
    }
    let table = compare::markdown(&base, &rows) + &analysis::report::markdown(&results);
    println!("{table}");
    let [md, json, png] = compare::report_paths(&out_dir, &base);
    std::fs::write(&md, &table).with_context(|| format!("write {}", md.display()))?;
    std::fs::write(&json, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("write {}", json.display()))?;
    let drawn = plot::unless_no_font(plot::retention_chart(&png, &base, &rows), &png)?;
    println!("\nwrote {} and {}", md.display(), json.display());
    if drawn.is_some() {
        println!("wrote {}", png.display());
    }
    let failures = png.with_file_name(format!(
        "{}-failures.png",
        png.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("compare")
    ));
    let drawn = analysis::report::failure_chart(&failures, &results);
    if plot::unless_no_font(drawn, &failures)? == Some(true) {
        println!("wrote {}", failures.display());
    }
    Ok(table)
}

//! The analyses in `pruneval compare`: degeneration side by side per task and model, the code
//! failure taxonomy as counts (Markdown) and as a stacked bar chart per model and task (PNG).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::FailureClass;
use crate::compare::TaskResult;
use crate::plot::{
    register_sans, render, text_width, titled_canvas, ChartError, LABEL_SIZE, MARGIN, TITLE_SIZE,
};

fn cell(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.2}"))
}

/// Markdown sections for the results that carry analyses (empty when none does).
pub fn markdown(results: &[TaskResult]) -> String {
    let mut s = String::new();
    let degenerate: Vec<&TaskResult> = results
        .iter()
        .filter(|r| r.degeneration.is_some())
        .collect();
    if !degenerate.is_empty() {
        s += "\n\n## Degeneration\n\n| task | model | responses | rep-2 | rep-3 | rep-4 | Self-BLEU-4 |\n|---|---|---:|---:|---:|---:|---:|\n";
        for r in degenerate {
            if let Some(d) = &r.degeneration {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    r.task,
                    r.model,
                    d.responses,
                    cell(d.rep_2),
                    cell(d.rep_3),
                    cell(d.rep_4),
                    cell(d.self_bleu_4)
                );
            }
        }
    }
    let coded: Vec<&TaskResult> = results.iter().filter(|r| r.failures.is_some()).collect();
    if !coded.is_empty() {
        let labels: Vec<&str> = FailureClass::ALL.iter().map(|c| c.label()).collect();
        let _ = write!(
            s,
            "\n\n## Code failures\n\n| task | model | {} |\n|---|---|{}\n",
            labels.join(" | "),
            "---:|".repeat(labels.len())
        );
        for r in coded {
            let counts: Vec<String> = r
                .failures
                .iter()
                .flatten()
                .map(|c| c.count.to_string())
                .collect();
            let _ = writeln!(s, "| {} | {} | {} |", r.task, r.model, counts.join(" | "));
        }
    }
    s
}

/// The colour of the `k`-th class of [`FailureClass::ALL`]: passed green, failures warm to cool,
/// other grey.
fn class_color(k: usize) -> RGBColor {
    const COLORS: [RGBColor; 7] = [
        RGBColor(46, 160, 67),
        RGBColor(230, 126, 34),
        RGBColor(241, 196, 15),
        RGBColor(52, 120, 200),
        RGBColor(142, 68, 173),
        RGBColor(192, 57, 43),
        RGBColor(140, 140, 140),
    ];
    COLORS[k % COLORS.len()]
}

/// A stacked bar per (task, model) of program results: each class's share of the samples.
pub fn failure_chart(path: &Path, results: &[TaskResult]) -> Result<bool, ChartError> {
    let bars: Vec<&TaskResult> = results.iter().filter(|r| r.failures.is_some()).collect();
    if bars.is_empty() {
        return Ok(false);
    }
    register_sans()?;
    let title = "Why generated programs fail";
    let legend_width = FailureClass::ALL
        .iter()
        .map(|c| text_width(c.label(), LABEL_SIZE))
        .max()
        .unwrap_or(0)
        + 60;
    let width = (90 * bars.len() as u32 + 120 + legend_width)
        .max(text_width(title, TITLE_SIZE) + 2 * MARGIN);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let (root, body) = titled_canvas(path, (width, 660), title)?;
        let (plot, legend) = body.split_horizontally(width - legend_width);
        let mut chart = ChartBuilder::on(&plot)
            .margin(12)
            .x_label_area_size(200)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..bars.len() as f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("share of samples")
            .draw()?;
        for (i, r) in bars.iter().enumerate() {
            let counts = r.failures.as_deref().unwrap_or_default();
            let total = counts.iter().map(|c| c.count).sum::<usize>().max(1) as f64;
            let mut bottom = 0.0;
            for (k, c) in counts.iter().enumerate() {
                let top = bottom + c.count as f64 / total;
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(i as f64 + 0.15, bottom), (i as f64 + 0.85, top)],
                    class_color(k).filled(),
                )))?;
                bottom = top;
            }
            let label: String = format!("{} / {}", r.task, r.model)
                .chars()
                .take(24)
                .collect();
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(
                label,
                (x + 6, y + 6),
                ("sans-serif", 13)
                    .into_font()
                    .transform(FontTransform::Rotate90),
            ))?;
        }
        for (k, c) in FailureClass::ALL.iter().enumerate() {
            let y = 40 + 28 * k as i32;
            legend.draw(&Rectangle::new(
                [(10, y), (28, y + 16)],
                class_color(k).filled(),
            ))?;
            legend.draw(&Text::new(c.label(), (36, y), ("sans-serif", LABEL_SIZE)))?;
        }
        root.present()?;
        Ok(())
    };
    render(path, draw)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::{Degeneration, FailureCount};

    fn result(task: &str, model: &str, failures: Option<[usize; 7]>) -> TaskResult {
        TaskResult {
            task: task.into(),
            model: model.into(),
            metrics: ["pass@1".into(), "pass@1".into()],
            generative: true,
            acc: 0.5,
            acc_norm: 0.5,
            items: Vec::new(),
            degeneration: Some(Degeneration {
                rep_2: Some(12.5),
                rep_3: None,
                rep_4: Some(3.0),
                self_bleu_4: Some(40.25),
                responses: 8,
            }),
            failures: failures.map(|counts| {
                FailureClass::ALL
                    .iter()
                    .zip(counts)
                    .map(|(&class, count)| FailureCount { class, count })
                    .collect()
            }),
        }
    }

    #[test]
    fn tables_show_each_model_side_by_side() {
        let results = [
            result("humaneval", "base", Some([5, 1, 0, 0, 2, 0, 0])),
            result("humaneval", "base@drop=3", Some([1, 2, 3, 1, 1, 0, 0])),
            result("gsm8k", "base", None),
        ];
        let md = markdown(&results);
        assert!(
            md.contains("| humaneval | base@drop=3 | 8 | 12.50 | - | 3.00 | 40.25 |"),
            "{md}"
        );
        assert!(md.contains("| gsm8k | base | 8 |"), "{md}");
        assert!(
            md.contains("| humaneval | base@drop=3 | 1 | 2 | 3 | 1 | 1 | 0 | 0 |"),
            "{md}"
        );
        assert!(!md.contains("| gsm8k | base | 5"), "{md}");
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("failures.png");
        assert!(failure_chart(&png, &results).unwrap());
        let bytes = std::fs::read(&png).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
        if let Ok(keep) = std::env::var("PRUNEVAL_KEEP_CHART") {
            std::fs::write(keep, &bytes).unwrap();
        }
        assert!(!failure_chart(&png, &results[2..]).unwrap());
    }
}

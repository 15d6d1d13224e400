//! The comparison's PNG: retention (variant / base) per task as bars with their 95 % bootstrap
//! intervals, one colour per variant, and the no-loss line at 1.0 (plotters, bitmap backend).

use std::path::Path;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::compare::Comparison;

/// System fonts tried for labels (plotters' ab_glyph backend needs one registered).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_sans() -> Result<(), String> {
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or_else(|| {
            format!(
                "no font for the chart: install DejaVu Sans (Debian: fonts-dejavu-core); looked in {}",
                FONTS.join(", ")
            )
        })?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| "the DejaVu Sans font could not be read".to_string())
}

/// Writes the retention chart of `rows` to `path`.
pub fn retention_chart(path: &Path, base: &str, rows: &[Comparison]) -> Result<(), String> {
    register_sans()?;
    let mut tasks: Vec<&str> = rows.iter().map(|r| r.task.as_str()).collect();
    tasks.dedup();
    let mut variants: Vec<&str> = rows.iter().map(|r| r.variant.as_str()).collect();
    variants.sort();
    variants.dedup();
    let top = rows
        .iter()
        .flat_map(|r| [r.retention, r.retention_ci.1])
        .filter(|x| x.is_finite())
        .fold(1.2f64, f64::max)
        * 1.1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root =
            BitMapBackend::new(path, (160 * tasks.len() as u32 + 200, 520)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("Retention vs {base} (95% paired bootstrap CI)"),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..tasks.len() as f64, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("retention")
            .draw()?;
        let width = 0.8 / variants.len() as f64;
        for (vi, v) in variants.iter().enumerate() {
            let color = Palette99::pick(vi).to_rgba();
            let bars: Vec<(f64, &Comparison)> = rows
                .iter()
                .filter(|r| r.variant == *v && r.retention.is_finite())
                .filter_map(|r| {
                    let t = tasks.iter().position(|t| *t == r.task)?;
                    Some((t as f64 + 0.1 + vi as f64 * width, r))
                })
                .collect();
            chart
                .draw_series(bars.iter().map(|(x, r)| {
                    Rectangle::new([(*x, 0.0), (x + width * 0.9, r.retention)], color.filled())
                }))?
                .label(*v)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled())
                });
            chart.draw_series(
                bars.iter()
                    .filter(|(_, r)| r.retention_ci.0.is_finite())
                    .map(|(x, r)| {
                        let mid = x + width * 0.45;
                        PathElement::new(
                            vec![(mid, r.retention_ci.0), (mid, r.retention_ci.1)],
                            BLACK.stroke_width(2),
                        )
                    }),
            )?;
        }
        // Task names above each group (plotters' numeric x labels cannot name categories).
        chart.draw_series(tasks.iter().enumerate().map(|(i, t)| {
            let peak = rows
                .iter()
                .filter(|r| r.task == *t)
                .flat_map(|r| [r.retention, r.retention_ci.1])
                .filter(|x| x.is_finite())
                .fold(0.0f64, f64::max);
            Text::new(
                t.to_string(),
                (i as f64 + 0.1, (peak + top * 0.04).min(top * 0.97)),
                ("sans-serif", 16),
            )
        }))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (tasks.len() as f64, 1.0)],
            RED.stroke_width(1),
        )))?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| format!("chart {}: {e}", path.display()))
}

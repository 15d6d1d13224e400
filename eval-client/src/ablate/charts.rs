//! The ablation's charts (plotters, bitmap backend): the single-layer sweep as score vs dropped
//! layer with the unablated model's line at 1.0, and the greedy search as a layer × iteration
//! heatmap (red low, green high; the chosen layer of each iteration outlined).

use std::path::Path;

use plotters::prelude::*;

use super::Ablation;
use crate::plot::{
    register_sans, render, text_width, titled_canvas, ChartError, LABEL_SIZE, MARGIN, TITLE_SIZE,
};

/// Axis labels at whole numbers only, without decimals.
fn integer_label(x: &f64) -> String {
    if (x - x.round()).abs() < 1e-6 {
        format!("{}", x.round() as i64)
    } else {
        String::new()
    }
}

/// The highest layer index any iteration scored, plus one.
fn layer_span(a: &Ablation) -> usize {
    a.iterations
        .iter()
        .flat_map(|it| it.candidates.iter().map(|c| c.layer + 1))
        .max()
        .unwrap_or(1)
}

/// Score vs layer of iteration 1 (the single-layer sweep).
pub fn sweep_chart(path: &Path, a: &Ablation) -> Result<(), ChartError> {
    register_sans()?;
    let Some(sweep) = a.iterations.first() else {
        return Ok(());
    };
    let title = format!("Single-layer sweep of {}", a.model);
    let layers = layer_span(a);
    let width = (28 * layers as u32 + 160).max(text_width(&title, TITLE_SIZE) + 2 * MARGIN);
    let top = sweep
        .candidates
        .iter()
        .map(|c| c.score)
        .fold(1.0f64, f64::max)
        * 1.1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let (root, body) = titled_canvas(path, (width, 460), &title)?;
        let mut chart = ChartBuilder::on(&body)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..layers as f64 - 0.5, 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc("dropped layer")
            .x_label_formatter(&integer_label)
            .y_desc("score (mean of task / unablated)")
            .label_style(("sans-serif", LABEL_SIZE))
            .draw()?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, 1.0), (layers as f64 - 0.5, 1.0)],
            BLACK.mix(0.4).stroke_width(1),
        )))?;
        let points: Vec<(f64, f64)> = sweep
            .candidates
            .iter()
            .map(|c| (c.layer as f64, c.score))
            .collect();
        let color = Palette99::pick(0).to_rgba();
        chart.draw_series(std::iter::once(PathElement::new(
            points.clone(),
            color.stroke_width(2),
        )))?;
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

/// Red (0) through yellow to green (the best score of the chart).
fn heat_color(score: f64, best: f64) -> RGBColor {
    let t = (score / best.max(1e-9)).clamp(0.0, 1.0);
    let (r, g) = if t < 0.5 {
        (230.0, 460.0 * t)
    } else {
        (460.0 * (1.0 - t), 200.0)
    };
    RGBColor(r as u8, g as u8, 60)
}

/// Layer × iteration, each cell a candidate's score.
pub fn heatmap(path: &Path, a: &Ablation) -> Result<(), ChartError> {
    register_sans()?;
    let title = format!("Greedy layer pruning of {}", a.model);
    let layers = layer_span(a);
    let rows = a.iterations.len().max(1);
    let width = (28 * layers as u32 + 160).max(text_width(&title, TITLE_SIZE) + 2 * MARGIN);
    let height = 34 * rows as u32 + 150;
    let best = a
        .iterations
        .iter()
        .flat_map(|it| it.candidates.iter().map(|c| c.score))
        .fold(0.0f64, f64::max);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let (root, body) = titled_canvas(path, (width, height), &title)?;
        let mut chart = ChartBuilder::on(&body)
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(-0.5f64..layers as f64 - 0.5, rows as f64 - 0.5..-0.5f64)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("layer")
            .y_desc("iteration")
            .x_label_formatter(&integer_label)
            .y_labels(rows.min(20) + 1)
            .y_label_formatter(&|y| {
                // Rows are iterations 1, 2, ... centred on 0, 1, ...
                if (y - y.round()).abs() < 1e-6 && *y >= 0.0 {
                    format!("{}", y.round() as i64 + 1)
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", LABEL_SIZE))
            .draw()?;
        for (row, it) in a.iterations.iter().enumerate() {
            let y = row as f64;
            chart.draw_series(it.candidates.iter().map(|c| {
                let x = c.layer as f64;
                Rectangle::new(
                    [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                    heat_color(c.score, best).filled(),
                )
            }))?;
            let x = it.chosen as f64;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)],
                BLACK.stroke_width(3),
            )))?;
        }
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

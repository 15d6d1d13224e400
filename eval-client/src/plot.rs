//! The comparison's PNG: retention (variant / base) per task as bars with their 95 % bootstrap
//! intervals, one colour per variant, and the no-loss line at 1.0 (plotters, bitmap backend).
//!
//! Layout: the title spans the whole canvas (which is widened to hold it), the bars fill the plot
//! area below it, and the legend has a column of its own to the right, so it never covers a bar.

use std::path::{Path, PathBuf};

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::compare::Comparison;

/// System fonts tried for labels (plotters' ab_glyph backend needs one registered).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
pub(crate) const TITLE_SIZE: u32 = 22;
pub(crate) const LABEL_SIZE: u32 = 16;
const HEIGHT: u32 = 520;
pub(crate) const MARGIN: u32 = 20;

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("no font for the chart: install DejaVu Sans (Debian: fonts-dejavu-core); looked in {}", FONTS.join(", "))]
    NoFont,
    #[error("the DejaVu Sans font could not be read")]
    BadFont,
    #[error("chart {path}: {message}")]
    Draw { path: PathBuf, message: String },
}

/// A chart that cannot be drawn for want of a font is skipped (`None`) with a warning on stderr:
/// its figures are in the JSON and Markdown written beside it. Other chart errors stay errors.
pub fn unless_no_font<T>(
    result: Result<T, ChartError>,
    path: &Path,
) -> Result<Option<T>, ChartError> {
    match result {
        Err(ChartError::NoFont) => {
            eprintln!(
                "warning: {} not drawn: {}",
                path.display(),
                ChartError::NoFont
            );
            Ok(None)
        }
        r => r.map(Some),
    }
}

pub(crate) fn register_sans() -> Result<(), ChartError> {
    let bytes = FONTS
        .iter()
        .find_map(|p| std::fs::read(p).ok())
        .ok_or(ChartError::NoFont)?;
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(bytes.into_boxed_slice()),
    )
    .map_err(|_| ChartError::BadFont)
}

/// A drawing area of a PNG chart.
pub(crate) type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A white canvas of `size` with `title` across its top: the canvas (to present) and the area
/// below the title.
pub(crate) fn titled_canvas<'a>(
    path: &'a Path,
    size: (u32, u32),
    title: &str,
) -> Result<(Area<'a>, Area<'a>), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE)?;
    let body = root
        .margin(8, 0, 0, 0)
        .titled(title, ("sans-serif", TITLE_SIZE))?;
    Ok((root, body))
}

/// Runs a chart's drawing, naming the file in its error.
pub(crate) fn render(
    path: &Path,
    draw: impl FnOnce() -> Result<(), Box<dyn std::error::Error>>,
) -> Result<(), ChartError> {
    draw().map_err(|e| ChartError::Draw {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Where the parts of a chart go, in pixels: `[start, end)` columns of the plot and the legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChartLayout {
    pub width: u32,
    pub height: u32,
    pub plot: (u32, u32),
    pub legend: (u32, u32),
}

pub(crate) fn text_width(text: &str, size: u32) -> u32 {
    ("sans-serif", size)
        .into_font()
        .box_size(text)
        .map_or(text.len() as u32 * size, |(w, _)| w)
}

/// The layout for `tasks` task groups, these legend labels and this title.
fn layout(tasks: usize, labels: &[&str], title: &str) -> ChartLayout {
    let legend_width = labels
        .iter()
        .map(|l| text_width(l, LABEL_SIZE))
        .max()
        .unwrap_or(0)
        + 40
        + MARGIN;
    let bars = 160 * tasks as u32 + 120;
    let width = (bars + legend_width).max(text_width(title, TITLE_SIZE) + 2 * MARGIN);
    let plot_end = width - legend_width;
    ChartLayout {
        width,
        height: HEIGHT,
        plot: (0, plot_end),
        legend: (plot_end, width),
    }
}

/// Distinct values in the order first seen.
fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Writes the retention chart of `rows` to `path` and returns its layout.
pub fn retention_chart(
    path: &Path,
    base: &str,
    rows: &[Comparison],
) -> Result<ChartLayout, ChartError> {
    register_sans()?;
    let tasks = distinct(rows.iter().map(|r| r.task.as_str()));
    let variants = distinct(rows.iter().map(|r| r.variant.as_str()));
    let title = format!("Retention vs {base} (95% paired bootstrap CI)");
    let lay = layout(tasks.len(), &variants, &title);
    let top = rows
        .iter()
        .flat_map(|r| [r.retention, r.retention_ci.1])
        .filter(|x| x.is_finite())
        .fold(1.2f64, f64::max)
        * 1.1;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let (root, body) = titled_canvas(path, (lay.width, lay.height), &title)?;
        let (plot_area, legend_area) = body.split_horizontally(lay.plot.1);
        let mut chart = ChartBuilder::on(&plot_area)
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
        let width = 0.8 / variants.len().max(1) as f64;
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
            chart.draw_series(bars.iter().map(|(x, r)| {
                Rectangle::new([(*x, 0.0), (x + width * 0.9, r.retention)], color.filled())
            }))?;
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
            let y = 40 + vi as i32 * 24;
            legend_area.draw(&Rectangle::new([(8, y), (22, y + 14)], color.filled()))?;
            legend_area.draw(&Text::new(
                v.to_string(),
                (30, y - 1),
                ("sans-serif", LABEL_SIZE),
            ))?;
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
                ("sans-serif", LABEL_SIZE),
            )
        }))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (tasks.len() as f64, 1.0)],
            RED.stroke_width(1),
        )))?;
        root.present()?;
        Ok(())
    };
    render(path, draw)?;
    Ok(lay)
}

/// A bar chart of `(label, count)` pairs, in the order given.
pub fn histogram(
    path: &Path,
    title: &str,
    x_desc: &str,
    bars: &[(String, usize)],
) -> Result<(), ChartError> {
    register_sans()?;
    let width = (60 * bars.len() as u32 + 160).max(text_width(title, TITLE_SIZE) + 2 * MARGIN);
    let top = bars.iter().map(|(_, n)| *n).max().unwrap_or(1).max(1) as f64 * 1.15;
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let (root, body) = titled_canvas(path, (width, 420), title)?;
        let mut chart = ChartBuilder::on(&body)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..bars.len().max(1) as f64, 0f64..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .x_desc(x_desc)
            .y_desc("records")
            .draw()?;
        let color = Palette99::pick(0).to_rgba();
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, n))| {
            Rectangle::new(
                [(i as f64 + 0.1, 0.0), (i as f64 + 0.9, *n as f64)],
                color.filled(),
            )
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (label, _))| {
            Text::new(
                label.clone(),
                (i as f64 + 0.15, top * 0.02),
                ("sans-serif", LABEL_SIZE),
            )
        }))?;
        root.present()?;
        Ok(())
    };
    render(path, draw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::Comparison;

    #[test]
    fn a_missing_font_skips_the_chart_and_nothing_else() {
        let p = Path::new("x.png");
        assert_eq!(
            unless_no_font(Err::<(), _>(ChartError::NoFont), p).unwrap(),
            None
        );
        assert_eq!(unless_no_font(Ok::<_, ChartError>(3), p).unwrap(), Some(3));
        assert!(matches!(
            unless_no_font(Err::<(), _>(ChartError::BadFont), p),
            Err(ChartError::BadFont)
        ));
    }

    fn row(task: &str, variant: &str, retention: f64) -> Comparison {
        Comparison {
            task: task.into(),
            variant: variant.into(),
            n: 10,
            base_score: 0.5,
            variant_score: 0.5 * retention,
            retention,
            retention_ci: (retention - 0.1, retention + 0.1),
            difference: 0.0,
            difference_ci: (0.0, 0.0),
            mcnemar_p: None,
            generative: false,
        }
    }

    #[test]
    fn the_title_fits_and_the_legend_keeps_off_the_bars() {
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("chart.png");
        let rows = vec![
            row("arithmetic", "llama-3.1-8b-instruct@drop=22-29", 0.4),
            row("arithmetic", "llama-3.1-8b-instruct-recovered-sgr", 0.9),
        ];
        let base = "llama-3.1-8b-instruct-a-rather-long-base-name";
        let lay = retention_chart(&png, base, &rows).unwrap();
        assert!(lay.legend.0 >= lay.plot.1, "{lay:?}");
        let img = image::open(&png).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (lay.width, lay.height));
        // No title pixel touches either side of the canvas: nothing is clipped.
        let title_band = 0..30;
        for x in (0..6).chain(img.width() - 6..img.width()) {
            for y in title_band.clone() {
                assert_eq!(
                    img.get_pixel(x, y).0,
                    [255, 255, 255],
                    "title at ({x}, {y})"
                );
            }
        }
        // The title is drawn at all.
        let dark = (0..img.width())
            .flat_map(|x| title_band.clone().map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0[0] < 128)
            .count();
        assert!(dark > 100, "{dark} dark title pixels");
    }
}

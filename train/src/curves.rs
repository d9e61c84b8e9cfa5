//! The run's curves in one picture, `curves.svg` in the run directory, redrawn at every
//! evaluation so a killed run has one too: training and EMA validation loss, and the interior-word
//! rate of the evaluation samples, against the step.

use crate::checkpoint::{write_atomic, CheckpointError, METRICS_FILE};
use chardiff_runtime::metrics::Quality;
use plotters::prelude::*;
use serde::Deserialize;
use std::path::Path;

pub const CURVES_FILE: &str = "curves.svg";

/// What the picture needs of one `metrics.jsonl` line (`EvalRecord`). A loss is absent (null)
/// where it was not a number, e.g. the training loss of the evaluation before the first step.
#[derive(Clone, Debug, Deserialize)]
pub struct Point {
    pub step: u64,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub quality: Option<Quality>,
}

/// Every evaluation recorded in the run's `metrics.jsonl`, in order.
pub fn read_records(dir: &Path) -> Result<Vec<Point>, CheckpointError> {
    let path = dir.join(METRICS_FILE);
    let text = std::fs::read_to_string(&path)
        .map_err(|source| CheckpointError::Io { path: path.clone(), source })?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| CheckpointError::Invalid {
                path: path.clone(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Draws the curves of `dir`'s `metrics.jsonl` into `dir/curves.svg`.
pub fn write_curves(dir: &Path) -> Result<(), CheckpointError> {
    let records = read_records(dir)?;
    let path = dir.join(CURVES_FILE);
    let svg = svg(&records)
        .map_err(|message| CheckpointError::Invalid { path: path.clone(), message })?;
    write_atomic(&path, svg.as_bytes()).map_err(|source| CheckpointError::Io { path, source })
}

/// The SVG text: loss above, word rate below, one shared step axis.
pub fn svg(records: &[Point]) -> Result<String, String> {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (900, 640)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let (top, bottom) = root.split_vertically(380);
        let last_step = records.iter().map(|r| r.step).max().unwrap_or(1).max(1);
        let losses = records.iter().flat_map(|r| [r.train_loss, r.val_loss]).flatten();
        let (lo, hi) = losses.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let (lo, hi) = if lo <= hi { (lo * 0.95, hi * 1.05) } else { (0.0, 1.0) };
        series(
            &top,
            "loss (x0 MSE)",
            (0..last_step + 1, lo..hi),
            &[
                (
                    "train (mean since last eval)",
                    BLUE,
                    records.iter().filter_map(|r| Some((r.step, r.train_loss?))).collect(),
                ),
                (
                    "validation (EMA weights)",
                    RED,
                    records.iter().filter_map(|r| Some((r.step, r.val_loss?))).collect(),
                ),
            ],
        )?;
        let words: Vec<(u64, f64)> = records
            .iter()
            .filter_map(|r| Some((r.step, 100.0 * r.quality.as_ref()?.word_rate)))
            .collect();
        series(
            &bottom,
            "interior-word rate of the samples, %",
            (0..last_step + 1, 0.0..100.0),
            &[("samples (EMA weights)", GREEN, words)],
        )?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

type Series<'a> = (&'a str, RGBColor, Vec<(u64, f64)>);

fn series<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    (x, y): (std::ops::Range<u64>, std::ops::Range<f64>),
    lines: &[Series<'_>],
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(x, y)
        .map_err(err)?;
    chart.configure_mesh().x_desc("step").draw().map_err(err)?;
    for (label, color, points) in lines {
        let color = *color;
        chart
            .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(*label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64, words: Option<f64>) -> Point {
        let quality = words.map(|word_rate| Quality { word_rate, ..Quality::default() });
        Point { step, train_loss: Some(loss + 0.01), val_loss: Some(loss), quality }
    }

    #[test]
    fn both_panels_are_drawn_and_degenerate_runs_do_not_fail() {
        let records = [record(100, 0.3, Some(0.25)), record(200, 0.25, Some(0.4))];
        let picture = svg(&records).unwrap();
        for label in ["loss (x0 MSE)", "validation (EMA weights)", "interior-word rate"] {
            assert!(picture.contains(label), "{label}");
        }
        assert!(picture.matches("<polyline").count() >= 3, "three curves");
        svg(&[]).unwrap();
        svg(&[record(0, 0.3, None)]).unwrap();
        let first: Point =
            serde_json::from_str(r#"{"step":0,"train_loss":null,"val_loss":0.7,"quality":null}"#)
                .unwrap();
        assert!(svg(&[first]).unwrap().contains("<svg"));
    }
}

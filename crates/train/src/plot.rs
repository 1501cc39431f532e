//! The perplexity-by-position chart (`ppl_by_position.png`), drawn with plotters into a bitmap,
//! its text in glatrain-plot's embedded font (no system fonts needed).

use std::path::Path;

pub use glatrain_plot::PlotError;
use glatrain_plot::{register_font, FONT_FAMILY};
use plotters::prelude::*;

/// One point of the chart: positions `[start, end)` and their perplexity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketPoint {
    pub start: usize,
    pub end: usize,
    pub perplexity: f64,
}

/// Draws perplexity against position (the middle of each bucket) and saves it as PNG at `path`.
pub fn draw_ppl_by_position(
    path: &Path,
    title: &str,
    points: &[BucketPoint],
) -> Result<(), PlotError> {
    let err = |message: String| PlotError::at(path, message);
    if points.is_empty() {
        return Err(err("no buckets to draw".into()));
    }
    register_font().map_err(err)?;

    let x_max = points.iter().map(|p| p.end).max().unwrap_or(1) as f64;
    let finite: Vec<f64> = points
        .iter()
        .map(|p| p.perplexity)
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let (lo, hi) = if finite.is_empty() {
        (0.0, 1.0)
    } else {
        let pad = ((hi - lo) * 0.1).max(hi.abs() * 0.02).max(1e-3);
        ((lo - pad).max(0.0), hi + pad)
    };

    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT_FAMILY, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, lo..hi)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("position in context (bucket middle)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("perplexity")
        .label_style((FONT_FAMILY, 14))
        .axis_desc_style((FONT_FAMILY, 16))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    let series: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.perplexity.is_finite())
        .map(|p| ((p.start + p.end) as f64 / 2.0, p.perplexity))
        .collect();
    chart
        .draw_series(LineSeries::new(series.clone(), BLUE.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(
            series
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 4, BLUE.filled())),
        )
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ppl.png");
        let points: Vec<BucketPoint> = (0..8)
            .map(|i| BucketPoint {
                start: i * 16,
                end: (i + 1) * 16,
                perplexity: 20.0 / (i + 1) as f64,
            })
            .collect();
        draw_ppl_by_position(&path, "perplexity by position", &points).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 2000,
            "a chart with text and a line, not an empty image"
        );
    }

    #[test]
    fn empty_input_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let err = draw_ppl_by_position(&tmp.path().join("x.png"), "t", &[]).unwrap_err();
        assert!(err.to_string().contains("x.png"));
    }
}

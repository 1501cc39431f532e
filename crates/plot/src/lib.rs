//! PNG charts that need no system fonts: [`FONT_FAMILY`] is DejaVu Sans Mono, embedded
//! (`assets/`, Bitstream Vera licence) and registered with plotters by [`register_font`]; and
//! [`draw_line_charts`], panels of named lines side by side (the benchmark's comparison chart).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

/// The font family name charts use for every text; [`register_font`] must have succeeded.
pub const FONT_FAMILY: &str = "glatrain-mono";
static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

/// Registers the embedded font as [`FONT_FAMILY`] (once per process; later calls return the
/// first outcome).
///
/// # Errors
/// The font does not load (a broken embedded file).
pub fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT)
                .map_err(|_| "the embedded font does not load".to_string())
        })
        .clone()
}

/// A failure to draw or save a chart.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot draw the chart: {message}")]
pub struct PlotError {
    pub path: String,
    pub message: String,
}

impl PlotError {
    /// A failure to draw the chart of `path`, saying why.
    pub fn at(path: &Path, message: String) -> Self {
        Self {
            path: path.display().to_string(),
            message,
        }
    }
}

/// One named line: its points `(x, y)`, drawn in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// An axis: its label, and whether its scale is logarithmic (then every value must be > 0;
/// tick labels show the values, to two significant digits).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub label: String,
    pub log: bool,
}

/// One panel: a title, two axes and its lines (with a legend).
#[derive(Debug, Clone, PartialEq)]
pub struct LineChart {
    pub title: String,
    pub x: Axis,
    pub y: Axis,
    pub series: Vec<Series>,
}

/// Colours of the lines, in series order (then repeated).
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

impl Axis {
    /// The value as drawn: log10 on a log axis.
    fn to_drawn(&self, v: f64) -> f64 {
        if self.log {
            v.log10()
        } else {
            v
        }
    }

    /// The drawn range covering `values` with a margin.
    fn range(&self, values: impl Iterator<Item = f64>) -> (f64, f64) {
        let (lo, hi) = values
            .map(|v| self.to_drawn(v))
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.08).max(if self.log {
            0.05
        } else {
            hi.abs() * 0.05 + 1e-9
        });
        (lo - pad, hi + pad)
    }

    /// A tick's text: the value itself on a log axis (`0.5`, `128`, `2e+04`).
    fn label(&self, drawn: f64) -> String {
        if !self.log {
            return format!("{drawn:.3}")
                .trim_end_matches('0')
                .trim_end_matches('.')
                .to_string();
        }
        let v = 10f64.powf(drawn);
        if !(1e-3..1e5).contains(&v) {
            return format!("{v:.0e}");
        }
        // Two significant digits, no trailing zeros after the point.
        let step = 10f64.powf(v.log10().floor() - 1.0);
        let rounded = (v / step).round() * step;
        let decimals = (-step.log10().round()).max(0.0) as usize;
        format!("{rounded:.decimals$}")
    }
}

/// Draws `charts` side by side, each `panel` pixels, into a PNG at `path`.
///
/// # Errors
/// No charts, a value a log axis cannot show (<= 0), the font, or the drawing and writing of
/// the file.
pub fn draw_line_charts(
    path: &Path,
    charts: &[LineChart],
    panel: (u32, u32),
) -> Result<(), PlotError> {
    let err = |message: String| PlotError::at(path, message);
    if charts.is_empty() {
        return Err(err("no charts to draw".into()));
    }
    for chart in charts {
        for s in &chart.series {
            let bad = s.points.iter().find(|&&(x, y)| {
                (chart.x.log && x <= 0.0) || (chart.y.log && y <= 0.0) || !x.is_finite()
            });
            if let Some((x, y)) = bad {
                return Err(err(format!(
                    "{}: point ({x}, {y}) of {} cannot be drawn on its axes",
                    chart.title, s.name
                )));
            }
        }
    }
    register_font().map_err(err)?;
    let width = panel.0 * charts.len() as u32;
    let root = BitMapBackend::new(path, (width, panel.1)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    for (area, chart) in root.split_evenly((1, charts.len())).iter().zip(charts) {
        draw_panel(area, chart).map_err(err)?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

fn draw_panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    chart: &LineChart,
) -> Result<(), String> {
    let points = || chart.series.iter().flat_map(|s| s.points.iter().copied());
    let (x0, x1) = chart.x.range(points().map(|p| p.0));
    let (y0, y1) = chart.y.range(points().map(|p| p.1));
    let mut c = ChartBuilder::on(area)
        .caption(&chart.title, (FONT_FAMILY, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    let x_label = |v: &f64| chart.x.label(*v);
    let y_label = |v: &f64| chart.y.label(*v);
    c.configure_mesh()
        .x_desc(chart.x.label.as_str())
        .y_desc(chart.y.label.as_str())
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style((FONT_FAMILY, 13))
        .axis_desc_style((FONT_FAMILY, 15))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, s) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let drawn: Vec<(f64, f64)> = s
            .points
            .iter()
            .map(|&(x, y)| (chart.x.to_drawn(x), chart.y.to_drawn(y)))
            .collect();
        c.draw_series(LineSeries::new(drawn.clone(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(s.name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        c.draw_series(drawn.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    c.configure_series_labels()
        .label_font((FONT_FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(log: bool) -> LineChart {
        LineChart {
            title: "time per op".into(),
            x: Axis {
                label: "T".into(),
                log,
            },
            y: Axis {
                label: "ms".into(),
                log,
            },
            series: vec![
                Series {
                    name: "a".into(),
                    points: vec![(1024.0, 0.5), (2048.0, 1.0), (4096.0, 2.0)],
                },
                Series {
                    name: "b".into(),
                    points: vec![(1024.0, 0.2), (4096.0, 3.2)],
                },
            ],
        }
    }

    #[test]
    fn panels_side_by_side_make_a_png() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("chart.png");
        draw_line_charts(&path, &[chart(true), chart(false)], (400, 300)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 4000,
            "text, lines and legends: {}",
            bytes.len()
        );
    }

    #[test]
    fn log_axes_refuse_what_they_cannot_show() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = chart(true);
        c.series[1].points.push((8192.0, 0.0));
        let err = draw_line_charts(&tmp.path().join("x.png"), &[c], (400, 300)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("x.png") && msg.contains("(8192, 0) of b"),
            "{msg}"
        );
        let err = draw_line_charts(&tmp.path().join("y.png"), &[], (400, 300)).unwrap_err();
        assert!(err.to_string().contains("no charts"));
    }

    #[test]
    fn log_ticks_read_as_values() {
        let log = Axis {
            label: String::new(),
            log: true,
        };
        assert_eq!(log.label(2f64.log10() + 3.0), "2000");
        assert_eq!(log.label(2.5), "320");
        assert_eq!(log.label(-1.0), "0.10");
        assert_eq!(log.label(0.25f64.log10()), "0.25");
        assert_eq!(log.label(6.0), "1e6");
        let linear = Axis {
            label: String::new(),
            log: false,
        };
        assert_eq!(linear.label(2.5), "2.5");
        assert_eq!(linear.label(3.0), "3");
        assert!(register_font().is_ok());
    }
}

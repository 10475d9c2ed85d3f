//! `--plot`: output throughput (x) against a latency (y) across a sweep, one line per
//! configuration (this run's and each `--compare` report's), each point named by its load.

use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::args::{Load, PlotLatency};
use super::report::{RunReport, ServeBenchReport};
use super::BenchError;

/// The image's size in pixels (SVG units for SVG).
const SIZE: (u32, u32) = (960, 600);

/// Line colors, distinct from one another and readable on white (matplotlib's "tab10").
const COLORS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

/// The file formats `--plot` writes, by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotFormat {
    Png,
    Svg,
}

impl PlotFormat {
    pub fn of(path: &Path) -> Result<Self, BenchError> {
        match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
            Some("png") => Ok(PlotFormat::Png),
            Some("svg") => Ok(PlotFormat::Svg),
            _ => Err(BenchError::Option(format!("--plot {}: the file must end in .png or .svg", path.display()))),
        }
    }
}

/// One line: a configuration's runs as (throughput, latency, load) points.
struct Line {
    label: String,
    points: Vec<(f64, f64, String)>,
}

fn line(report: &ServeBenchReport, latency: PlotLatency) -> Line {
    let y = |r: &RunReport| match latency {
        PlotLatency::Tpot => r.tpot_ms.map(|s| s.mean),
        PlotLatency::E2e => r.e2e_ms.map(|s| s.p50),
    };
    let name = |load: Load| match load {
        Load::Concurrency(c) => format!("c={c}"),
        Load::RequestRate(r) => format!("r={r}"),
        Load::AllAtOnce => "r=inf".into(),
    };
    let points = report.runs.iter().filter_map(|r| Some((r.output_throughput, y(r)?, name(r.load)))).collect();
    Line { label: report.label.clone(), points }
}

/// Draws every report's sweep into `path` (`.png` or `.svg`).
pub fn draw(path: &Path, reports: &[ServeBenchReport], latency: PlotLatency) -> Result<(), BenchError> {
    let lines: Vec<Line> = reports.iter().map(|r| line(r, latency)).collect();
    let failed = |reason: String| BenchError::Plot { path: PathBuf::from(path), reason };
    // Text is laid out (and on a bitmap drawn) with a font given to plotters.
    register_font().map_err(failed)?;
    match PlotFormat::of(path)? {
        PlotFormat::Svg => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            chart(&root, &lines, latency).map_err(failed)
        }
        PlotFormat::Png => {
            let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
            {
                let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
                chart(&root, &lines, latency).map_err(failed)?;
            }
            write_png(path, &pixels).map_err(failed)
        }
    }
}

/// The font embedded in the binary: no system fonts needed.
fn register_font() -> Result<(), String> {
    plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
        .map_err(|_| "the embedded font did not load".to_string())
}

fn chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    lines: &[Line],
    latency: PlotLatency,
) -> Result<(), String> {
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let points = || lines.iter().flat_map(|l| &l.points);
    let x_max = points().map(|p| p.0).fold(0.0, f64::max).max(1e-3) * 1.1;
    let y_max = points().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.15;
    let y_desc = match latency {
        PlotLatency::Tpot => "mean time per output token (ms)",
        PlotLatency::E2e => "median end-to-end latency (ms)",
    };
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(root)
        .caption("specula bench serve: latency against throughput", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .map_err(e)?;
    chart.configure_mesh().x_desc("output throughput (tok/s)").y_desc(y_desc).draw().map_err(e)?;
    for (i, line) in lines.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let xy = line.points.iter().map(|p| (p.0, p.1));
        chart
            .draw_series(LineSeries::new(xy, color.stroke_width(2)).point_size(4))
            .map_err(e)?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        // Each point's load, a little right of and above it.
        let names = line
            .points
            .iter()
            .map(|p| EmptyElement::at((p.0, p.1)) + Text::new(p.2.clone(), (6, -18), ("sans-serif", 14).into_font()));
        chart.draw_series(names).map_err(e)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)
}

fn write_png(path: &Path, rgb: &[u8]) -> Result<(), String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

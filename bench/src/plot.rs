//! SVG plots of a scenario's runs: latency CDF per lane and deliveries per
//! second, one line per run (Caduceus and the comparison).

use std::io;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::results::RunResult;

const WIDTH_PX: u32 = 900;
const HEIGHT_PX: u32 = 520;
const PALETTE: [RGBColor; 6] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
];

fn plot_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("plot failed: {error}"))
}

/// Draws the latency CDF of every lane of every run into
/// `<dir>/<scenario>-latency.svg`, with a logarithmic latency axis.
pub fn latency_cdf(dir: &Path, scenario: &str, runs: &[RunResult]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{scenario}-latency.svg"));
    let series: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .flat_map(|run| {
            run.lanes.iter().map(move |lane| {
                let points = lane
                    .cdf
                    .iter()
                    .map(|&(millis, quantile)| (millis.max(0.01), quantile))
                    .collect();
                (format!("{} {}", run.target, lane.lane), points)
            })
        })
        .collect();
    let max_ms = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(millis, _)| millis))
        .fold(1.0f64, f64::max);
    let min_ms = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|&(millis, _)| millis))
        .fold(max_ms, f64::min)
        .max(0.01);

    let root = SVGBackend::new(&path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: injection-to-receipt latency CDF"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((min_ms..max_ms * 1.1).log_scale(), 0.0..1.0)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of messages")
        .draw()
        .map_err(plot_error)?;
    for (index, (label, points)) in series.into_iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(path.clone())
}

/// Draws deliveries per second of every run into
/// `<dir>/<scenario>-throughput.svg`.
pub fn throughput(dir: &Path, scenario: &str, runs: &[RunResult]) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{scenario}-throughput.svg"));
    let max_seconds = runs
        .iter()
        .map(|run| run.delivered_per_second_series.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let max_rate = runs
        .iter()
        .flat_map(|run| run.delivered_per_second_series.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1);

    let root = SVGBackend::new(&path, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{scenario}: messages delivered per second"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..max_seconds as u64, 0..max_rate + max_rate / 10)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first injection")
        .y_desc("messages/s")
        .draw()
        .map_err(plot_error)?;
    for (index, run) in runs.iter().enumerate() {
        let color = PALETTE[index % PALETTE.len()];
        let points = run
            .delivered_per_second_series
            .iter()
            .enumerate()
            .map(|(second, &count)| (second as u64, count));
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(run.target.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_error)?;
    root.present().map_err(plot_error)?;
    Ok(path.clone())
}

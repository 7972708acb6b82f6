//! The charts under docs/bench/: plotters' SVG backend with its built-in text layout (no
//! font file, no fontconfig: the SVG names a generic family and the viewer draws it).
//! - ratios.svg: flowgate / peer for every row that has a peer measured in the same run;
//! - soak-rss.svg, soak-fds.svg, soak-latency.svg: the soak's samples over time, from
//!   soak.csv (written by the soak bench).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::{Opts, Row, RunInfo};

pub struct Chart {
    pub path: PathBuf,
    pub title: String,
    /// A line for the markdown under the chart.
    pub note: String,
}

const GREEN: RGBColor = RGBColor(46, 139, 87);
const RED_: RGBColor = RGBColor(200, 50, 50);
const GREY: RGBColor = RGBColor(70, 110, 170);
const FONT: &str = "sans-serif";

fn err(e: impl std::fmt::Display) -> String {
    format!("chart: {e}")
}

pub fn draw_all(opts: &Opts, rows: &[Row], info: &RunInfo) -> Result<Vec<Chart>, String> {
    let mut out = Vec::new();
    let with_ratio: Vec<&Row> =
        rows.iter().filter(|r| r.ratio.is_some_and(f64::is_finite)).collect();
    if !with_ratio.is_empty() {
        let path = opts.charts.join("ratios.svg");
        ratios(&path, &with_ratio, info).map_err(err)?;
        out.push(Chart {
            path,
            title: "flowgate / peer, same run".into(),
            note: "flowgate / peer measured in the same run, one bar a row of the table: green \
                   meets its target, red does not, blue has none. For rates higher is better; \
                   for latency, CPU, memory and parse time lower."
                .into(),
        });
    }
    let csv = opts.charts.join("soak.csv");
    if let Ok(text) = std::fs::read_to_string(&csv) {
        let series = read_csv(&text);
        if series.get("secs").is_some_and(|s| !s.is_empty()) {
            out.extend(soak(opts, &series, info).map_err(err)?);
        }
    }
    Ok(out)
}

fn footer(info: &RunInfo) -> String {
    format!("{} · {} · {}", info.machine, info.date, info.commit)
}

fn ratios(path: &Path, rows: &[&Row], info: &RunInfo) -> Result<(), Box<dyn std::error::Error>> {
    let n = rows.len() as i32;
    let height = 90 + 26 * rows.len() as u32;
    let root = SVGBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let (body, foot) = root.split_vertically(height - 22);
    foot.draw_text(&footer(info), &(FONT, 12).into_font().color(&BLACK.mix(0.7)), (10, 4))?;
    let max = rows.iter().filter_map(|r| r.ratio).fold(1.2f64, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(&body)
        .caption("flowgate / peer, same run", (FONT, 18))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(470)
        .build_cartesian_2d(0f64..max, (0..n).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                rows.get(*i as usize).map(|r| short(&r.capability, 70)).unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .x_desc("ratio")
        .label_style((FONT, 12))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let colour = match r.met {
            Some(true) => GREEN,
            Some(false) => RED_,
            None => GREY,
        };
        let i = i as i32;
        let mut bar = Rectangle::new(
            [(0.0, SegmentValue::Exact(i)), (r.ratio.unwrap_or(0.0), SegmentValue::Exact(i + 1))],
            colour.filled(),
        );
        bar.set_margin(4, 4, 0, 0);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let x = r.ratio.unwrap_or(0.0);
        Text::new(format!(" {x:.2}×"), (x, SegmentValue::CenterOf(i as i32)), (FONT, 11))
    }))?;
    chart.draw_series(LineSeries::new(
        [(1.0, SegmentValue::Exact(0)), (1.0, SegmentValue::Last)],
        BLACK.stroke_width(1),
    ))?;
    root.present()?;
    Ok(())
}

fn short(s: &str, n: usize) -> String {
    let s = s.replace('`', "");
    if s.chars().count() <= n {
        s
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

fn read_csv(text: &str) -> HashMap<String, Vec<f64>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let mut cols: HashMap<String, Vec<f64>> =
        header.iter().map(|h| (h.to_string(), Vec::new())).collect();
    for l in lines {
        let vals: Vec<f64> = l.split(',').map(|v| v.trim().parse().unwrap_or(f64::NAN)).collect();
        if vals.len() != header.len() {
            continue;
        }
        for (h, v) in header.iter().zip(vals) {
            if let Some(c) = cols.get_mut(*h) {
                c.push(v);
            }
        }
    }
    cols
}

/// One line chart: `series` as (label, values, colour) against minutes.
fn lines(
    path: &Path,
    title: &str,
    y_desc: &str,
    minutes: &[f64],
    series: &[(&str, Vec<f64>, RGBColor)],
    info: &RunInfo,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 360)).into_drawing_area();
    root.fill(&WHITE)?;
    let (body, foot) = root.split_vertically(338);
    foot.draw_text(&footer(info), &(FONT, 12).into_font().color(&BLACK.mix(0.7)), (10, 4))?;
    let xmax = minutes.iter().copied().fold(0.5f64, f64::max);
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1e-9f64, f64::max)
        * 1.2;
    let mut chart = ChartBuilder::on(&body)
        .caption(title, (FONT, 18))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart.configure_mesh().x_desc("minutes").y_desc(y_desc).label_style((FONT, 12)).draw()?;
    for (label, values, colour) in series {
        let colour = *colour;
        chart
            .draw_series(LineSeries::new(
                minutes.iter().copied().zip(values.iter().copied()).filter(|p| p.1.is_finite()),
                colour.stroke_width(2),
            ))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font((FONT, 12))
        .draw()?;
    root.present()?;
    Ok(())
}

fn soak(
    opts: &Opts,
    s: &HashMap<String, Vec<f64>>,
    info: &RunInfo,
) -> Result<Vec<Chart>, Box<dyn std::error::Error>> {
    let col = |k: &str| s.get(k).cloned().unwrap_or_default();
    let minutes: Vec<f64> = col("secs").iter().map(|x| x / 60.0).collect();
    let scale = |v: Vec<f64>, d: f64| v.into_iter().map(|x| x / d).collect::<Vec<_>>();
    let dir = &opts.charts;
    let mut out = Vec::new();
    let path = dir.join("soak-rss.svg");
    lines(
        &path,
        "soak: flowgate RSS",
        "MiB",
        &minutes,
        &[("RSS", scale(col("rss_kib"), 1024.0), GREY)],
        info,
    )?;
    out.push(Chart { path, title: "soak: RSS".into(), note: String::new() });
    let path = dir.join("soak-fds.svg");
    lines(
        &path,
        "soak: open file descriptors and conntrack entries",
        "count",
        &minutes,
        &[("open fds", col("fds"), GREY), ("conntrack entries", col("conntrack"), GREEN)],
        info,
    )?;
    out.push(Chart {
        path,
        title: "soak: open fds and conntrack entries".into(),
        note: String::new(),
    });
    let path = dir.join("soak-latency.svg");
    lines(
        &path,
        "soak: allowed TCP exchange latency per 10 s sample",
        "ms",
        &minutes,
        &[("p50", scale(col("p50_us"), 1000.0), GREY), ("p99", scale(col("p99_us"), 1000.0), RED_)],
        info,
    )?;
    out.push(Chart {
        path,
        title: "soak: latency p50 and p99".into(),
        note: "Latency on a shared 2-CPU machine with other builds and tests running at the \
               same time: the spikes are the neighbours' as much as flowgate's."
            .into(),
    });
    Ok(out)
}

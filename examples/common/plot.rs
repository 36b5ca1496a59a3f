//! The harness's plot: one-way throughput against message size, written
//! as SVG next to the JSON report.

use crate::{Plan, Report, size_name};
use std::path::Path;

/// Throughput (MB/s) against message size, one line per contender; both
/// axes logarithmic (the sizes span five orders of magnitude, the rates two).
pub fn plot(path: &Path, r: &Report, plan: &Plan) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let xs: Vec<f64> = plan.sizes.iter().map(|&s| s as f64).collect();
    let ys: Vec<f64> = r
        .one_way
        .iter()
        .map(|t| t.mb_per_sec)
        .chain(r.read_every_byte.iter().map(|t| t.mb_per_sec))
        .collect();
    if xs.is_empty() || ys.is_empty() {
        return Err("no throughput measured".into());
    }
    let (xmin, xmax) = (
        xs.iter().copied().fold(f64::MAX, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let (ymin, ymax) = (
        ys.iter().copied().fold(f64::MAX, f64::min),
        ys.iter().copied().fold(0.0, f64::max),
    );
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, foot) = root.split_vertically(600);
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "ringipc harness: one-way throughput by message size",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(
            ((xmin.min(64.0 * 1024.0) / 1.4)..(xmax.max(4.0 * 1024.0 * 1024.0) * 1.4))
                .log_scale()
                .with_key_points(xs.clone()),
            ((ymin / 1.6)..(ymax * 1.6))
                .log_scale()
                .with_key_points(one_two_five(ymin / 1.6, ymax * 1.6)),
        )?;
    chart
        .configure_mesh()
        .x_desc("message size (log scale)")
        .y_desc("payload MB/s (10^6 bytes/s, log scale)")
        .x_label_formatter(&|x| size_name(x.round() as usize))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    let colors = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(148, 103, 189),
        RGBColor(44, 160, 44),
        RGBColor(0, 0, 0),
    ];
    for (i, &c) in plan.contenders.iter().enumerate() {
        let color = colors[i % colors.len()];
        let points: Vec<(f64, f64)> = plan
            .sizes
            .iter()
            .filter_map(|&s| Some((s as f64, r.one_way(c, s)?.mb_per_sec)))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(c.name())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    // Scenario 1b, dashed: the same transports with every byte read.
    let read_all = [
        ("ringipc-uring arena", colors[0]),
        ("ringipc-epoll arena", colors[1]),
        ("ringipc-epoll inline", RGBColor(140, 86, 75)),
        ("tokio pipe+codec", colors[2]),
        ("ipc-channel", colors[4]),
        ("raw pipe", colors[5]),
    ];
    for (name, color) in read_all {
        let points: Vec<(f64, f64)> = r
            .read_every_byte
            .iter()
            .filter(|row| row.contender == name)
            .map(|row| (row.size as f64, row.mb_per_sec))
            .collect();
        if points.is_empty() {
            continue;
        }
        chart
            .draw_series(DashedLineSeries::new(
                points.clone(),
                6,
                4,
                color.stroke_width(2),
            ))?
            .label(format!("{name}, every byte read"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(1))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&p| TriangleMarker::new(p, 5, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    let m = &r.machine;
    foot.draw(&Text::new(
        format!(
            "{}, {} usable cores, {}; pinning {}; {:.2} s per cell",
            m.cpu_model,
            m.cores_usable.len(),
            m.kernel,
            m.pinning
                .map_or("off".into(), |[a, b]| format!("cores {a},{b}")),
            plan.cell.as_secs_f64()
        ),
        (16, 8),
        ("sans-serif", 13).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    root.present()?;
    Ok(())
}

/// 1, 2, 5, 10, 20, 50, ... within `lo..hi`: labels for a log axis.
fn one_two_five(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut decade = 10f64.powf(lo.max(1e-9).log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * decade;
            if (lo..=hi).contains(&v) {
                out.push(v);
            }
        }
        decade *= 10.0;
    }
    out
}

//! The report's plots (PNG and SVG through `plotters`): only with the `cli` feature.

use super::{Cell, Curve, Panel};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

/// Twelve distinguishable colours (the tab10 set, then two darker extras), so no two methods share a colour.
const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(0, 60, 120),
];

fn e<E: std::fmt::Debug>(x: E) -> anyhow::Error {
    anyhow!("plot: {x:?}")
}

macro_rules! render {
    ($dir:expr, $name:expr, $size:expr, |$root:ident| $body:block) => {{
        let svg_path = $dir.join(format!("{}.svg", $name));
        let png_path = $dir.join(format!("{}.png", $name));
        let tmp_svg = $dir.join(format!(".{}.svg.tmp", $name));
        let tmp_png = $dir.join(format!(".{}.png.tmp.png", $name));
        // a plot that fails half-way leaves no temporary behind (after the renames there is none to remove)
        let _tmp = crate::util::TempFiles(vec![tmp_svg.clone(), tmp_png.clone()]);
        {
            let $root = SVGBackend::new(&tmp_svg, $size).into_drawing_area();
            $body
            $root.present().map_err(e)?;
        }
        {
            let $root = BitMapBackend::new(&tmp_png, $size).into_drawing_area();
            $body
            $root.present().map_err(e)?;
        }
        std::fs::rename(&tmp_svg, &svg_path)?;
        std::fs::rename(&tmp_png, &png_path)?;
    }};
}

pub fn line_plot(
    dir: &Path,
    name: &str,
    title: &str,
    xlabel: &str,
    xlabels: &[String],
    series: &[Curve],
) -> Result<()> {
    render!(dir, name, (800, 500), |root| {
        root.fill(&WHITE).map_err(e)?;
        draw_curves(&root, title, 22, xlabel, xlabels, series, true)?;
    });
    Ok(())
}

/// One panel a task (accuracy vs shots with 95 % CI bars), in a grid of up to three columns; the legend in the
/// first panel.
pub fn task_panels(dir: &Path, name: &str, xlabel: &str, xlabels: &[String], panels: &[Panel]) -> Result<()> {
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols).max(1);
    render!(dir, name, (420 * cols as u32, 320 * rows as u32), |root| {
        root.fill(&WHITE).map_err(e)?;
        for (i, (area, (task, series))) in root.split_evenly((rows, cols)).iter().zip(panels).enumerate() {
            draw_curves(area, task, 16, xlabel, xlabels, series, i == 0)?;
        }
    });
    Ok(())
}

/// Curves with their 95 % CI as vertical bars (none for n = 1) on one drawing area.
fn draw_curves<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    title_size: u32,
    xlabel: &str,
    xlabels: &[String],
    series: &[Curve],
    legend: bool,
) -> Result<()> {
    let pts = || series.iter().flat_map(|s| s.1.iter());
    let ymin = pts().map(|p| p.y - p.half.unwrap_or(0.0)).fold(100.0f64, f64::min).floor().max(0.0);
    let ymax = pts().map(|p| p.y + p.half.unwrap_or(0.0)).fold(0.0f64, f64::max).ceil().min(100.0);
    let n = xlabels.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", title_size))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(-0.3f64..(n - 0.7), (ymin - 2.0).max(0.0)..(ymax + 2.0).min(100.0))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc("accuracy (%)")
        .x_labels(xlabels.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < xlabels.len() {
                xlabels[i as usize].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(e)?;
    let k = series.len().max(1) as f64;
    for (i, (m, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        // methods side by side around each x, so their bars do not hide each other
        let dx = 0.25 * ((i as f64 + 0.5) / k - 0.5);
        let xy: Vec<(f64, f64)> = pts.iter().map(|p| (p.x + dx, p.y)).collect();
        let s = chart.draw_series(LineSeries::new(xy.clone(), c.stroke_width(2))).map_err(e)?;
        if legend {
            s.label(m.clone()).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart.draw_series(xy.iter().map(|p| Circle::new(*p, 3, c.filled()))).map_err(e)?;
        for p in pts {
            if let Some(h) = p.half {
                let x = p.x + dx;
                let cap = 0.02;
                for seg in [
                    vec![(x, p.y - h), (x, p.y + h)],
                    vec![(x - cap, p.y - h), (x + cap, p.y - h)],
                    vec![(x - cap, p.y + h), (x + cap, p.y + h)],
                ] {
                    chart.draw_series(std::iter::once(PathElement::new(seg, c.stroke_width(1)))).map_err(e)?;
                }
            }
        }
    }
    if legend {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

/// Names without the prefix they all share up to a '-' or '_' (e.g. `clinc-`), for axis labels.
fn strip_common_prefix(names: &[String]) -> Vec<String> {
    let Some(first) = names.first() else { return Vec::new() };
    let mut cut = 0;
    for (i, ch) in first.char_indices() {
        if !names.iter().all(|n| n.get(..=i) == first.get(..=i)) {
            break;
        }
        if ch == '-' || ch == '_' {
            cut = i + 1;
        }
    }
    if names.len() < 2 {
        cut = 0;
    }
    names.iter().map(|n| n[cut..].to_string()).collect()
}

pub fn heatmap(dir: &Path, c: &Cell) -> Result<()> {
    let rows: Vec<(&String, &Vec<f32>)> = c.weights.iter().collect();
    let nm = c.modules.len();
    let maxw = rows.iter().flat_map(|r| r.1.iter()).cloned().fold(0.0f32, f32::max).max(1e-6);
    let h = 190 + 28 * rows.len() as u32;
    let short = strip_common_prefix(&c.modules);
    render!(dir, "heatmap_weights", (260 + 60 * nm as u32, h), |root| {
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("Learned weights: {} ({}-shot, seed {})", c.task, c.shots, c.seed), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(150)
            .y_label_area_size(120)
            .build_cartesian_2d((0..nm.max(1) - 1).into_segmented(), (0..rows.len().max(1) - 1).into_segmented())
            .map_err(e)?;
        let name_of = |v: &SegmentValue<usize>, f: &dyn Fn(usize) -> String| match v {
            SegmentValue::CenterOf(i) => f(*i),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(nm)
            .y_labels(rows.len())
            .x_label_formatter(&|_| String::new())
            .y_label_formatter(&|y| {
                name_of(y, &|i| {
                    rows.get(i)
                        .map(|r| r.0.replace("encoder.layer.", "L").replace("attention.self.", ""))
                        .unwrap_or_default()
                })
            })
            .draw()
            .map_err(e)?;
        chart
            .draw_series(rows.iter().enumerate().flat_map(|(y, (_, w))| {
                w.iter().enumerate().map(move |(x, v)| {
                    let t = (*v / maxw) as f64;
                    let col = RGBColor((255.0 * (1.0 - t)) as u8, (255.0 * (1.0 - 0.6 * t)) as u8, 255);
                    Rectangle::new(
                        [
                            (SegmentValue::Exact(x), SegmentValue::Exact(y)),
                            (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1)),
                        ],
                        col.filled(),
                    )
                })
            }))
            .map_err(e)?;
        chart
            .draw_series(rows.iter().enumerate().flat_map(|(y, (_, w))| {
                w.iter().enumerate().map(move |(x, v)| {
                    Text::new(
                        format!("{v:.2}"),
                        (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)),
                        ("sans-serif", 11).into_font(),
                    )
                })
            }))
            .map_err(e)?;
        // Module names under the columns, rotated, starting just below the axis (the mesh's own rotated
        // labels are centred on the tick and run into the plot).
        for (i, name) in short.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(SegmentValue::CenterOf(i), SegmentValue::Exact(0)));
            let style = ("sans-serif", 12).into_font().transform(FontTransform::Rotate90);
            root.draw(&Text::new(name.clone(), (px + 6, py + 6), style)).map_err(e)?;
        }
    });
    Ok(())
}

pub fn scatter(dir: &Path, file: &str, what: &str, per_task: &BTreeMap<String, Vec<(f64, f64)>>) -> Result<()> {
    let all = per_task.values().flatten();
    let (xmin, xmax) = all.clone().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let ymax = all.map(|p| p.1).fold(0.0f64, f64::max);
    let pad = 0.05 * (xmax - xmin) + 1e-3;
    render!(dir, file, (700, 500), |root| {
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Learned weight vs task similarity", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xmin - pad)..(xmax + pad), 0.0..(ymax * 1.1 + 1e-3))
            .map_err(e)?;
        chart.configure_mesh().x_desc(what).y_desc("mean learned weight (largest shot count)").draw().map_err(e)?;
        for (i, (task, pairs)) in per_task.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(pairs.iter().map(|p| Circle::new(*p, 4, c.filled())))
                .map_err(e)?
                .label(task.as_str())
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(e)?;
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing_plot(dir: &Path) -> Result<()> {
        render!(dir, "broken", (64, 48), |root| {
            root.fill(&WHITE).map_err(e)?;
            if dir.exists() {
                return Err(anyhow!("drawing failed half-way"));
            }
        });
        Ok(())
    }

    #[test]
    fn a_plot_that_fails_half_way_leaves_no_temporary() {
        let d = std::env::temp_dir().join(format!("loracomp-plot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(failing_plot(&d).is_err());
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}

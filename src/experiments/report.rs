//! report.md and plots (PNG and SVG through `plotters`) from a sweep's cells. Built without the `cli` feature
//! (no `plotters`), report.md is written in full and its Plots section says that none were drawn.

use super::sweep::{Cell, SweepConfig, SweepOutput};
#[cfg(feature = "cli")]
use anyhow::anyhow;
use anyhow::Result;
#[cfg(feature = "cli")]
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Similarity per downstream task and upstream module.
type Similarity = BTreeMap<String, BTreeMap<String, f64>>;

pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, sd)
}

fn shot_order(s: &str) -> usize {
    s.parse().unwrap_or(usize::MAX)
}

/// Accuracy (%) per (task, method, shots) over seeds.
fn table(cells: &[&Cell]) -> BTreeMap<(String, String, String), Vec<f64>> {
    let mut t: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    for c in cells {
        t.entry((c.task.clone(), c.method.clone(), c.shots.clone())).or_default().push(c.accuracy * 100.0);
    }
    t
}

pub fn write_all(cfg: &SweepConfig, out: &SweepOutput, dir: &Path) -> Result<()> {
    let main: Vec<&Cell> = out.cells.iter().filter(|c| c.kind == "main").collect();
    let t = table(&main);
    let mut shots: Vec<String> = cfg.shots.iter().map(|s| s.to_string()).collect();
    shots.sort_by_key(|s| shot_order(s));
    let methods = &cfg.methods;
    let mut md = String::new();
    writeln!(md, "# {}\n", cfg.name).unwrap();
    writeln!(
        md,
        "Model `{}`; bank: {} upstream LoRA modules{} (rank {}, α {}, on {}); {} seeds; {} steps of batch {} per few-shot run. \
         Accuracy (%) on each task's test split, mean ± std over seeds.\n",
        cfg.model.display(),
        cfg.upstream.len(),
        if cfg.exclude_self { ", each downstream task's bank without its own module" } else { "" },
        cfg.bank.rank,
        cfg.bank.alpha,
        cfg.bank.targets.join(", "),
        cfg.seeds,
        cfg.adapt.steps,
        cfg.adapt.batch
    )
    .unwrap();
    let header = |md: &mut String| {
        writeln!(md, "| method | {} |", shots.iter().map(|s| format!("{s}-shot")).collect::<Vec<_>>().join(" | "))
            .unwrap();
        writeln!(md, "|---|{}", "---|".repeat(shots.len())).unwrap();
    };
    // A share of the grid (`--tasks`, or a sweep still running): say so, and average over the tasks with results.
    let with_results: Vec<&String> = cfg.downstream.iter().filter(|t| main.iter().any(|c| &c.task == *t)).collect();
    let planned = cfg.downstream.len() * cfg.shots.len() * cfg.seeds * cfg.methods.len();
    if main.len() < planned {
        writeln!(
            md,
            "**Partial:** {} of the {planned} cells of the main grid are done ({} of {} downstream tasks have \
             results); running the same command again completes it.\n",
            main.len(),
            with_results.len(),
            cfg.downstream.len()
        )
        .unwrap();
    }
    if !out.missing.is_empty() {
        writeln!(
            md,
            "**Missing:** {} planned cell{} (main grid and ablation) have no result yet{}; run the same sweep again, \
             or resubmit the shards with missing work (`loracomp sweep submit --resume`).\n",
            out.missing.len(),
            if out.missing.len() == 1 { "" } else { "s" },
            if out.missing.len() <= 20 {
                format!(": {}", out.missing.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "))
            } else {
                format!(
                    " (the first 20: {})",
                    out.missing[..20].iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
                )
            }
        )
        .unwrap();
    }
    // average over tasks: per seed, the mean over the tasks (with results) that have that seed
    if with_results.len() == cfg.downstream.len() {
        writeln!(md, "## Average over downstream tasks\n").unwrap();
    } else {
        let names: Vec<&str> = with_results.iter().map(|s| s.as_str()).collect();
        writeln!(md, "## Average over the downstream tasks with results ({})\n", names.join(", ")).unwrap();
    }
    header(&mut md);
    let mut avg: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for m in methods {
        let mut row = Vec::new();
        for s in &shots {
            let mut per_seed: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
            for c in main.iter().filter(|c| &c.method == m && &c.shots == s) {
                per_seed.entry(c.seed).or_default().push(c.accuracy * 100.0);
            }
            let v: Vec<f64> = per_seed
                .values()
                .filter(|v| v.len() == with_results.len())
                .map(|v| v.iter().sum::<f64>() / v.len() as f64)
                .collect();
            row.push(if v.is_empty() { "–".into() } else { fmt(&v) });
            avg.insert((m.clone(), s.clone()), v);
        }
        writeln!(md, "| {m} | {} |", row.join(" | ")).unwrap();
    }
    for task in &with_results {
        writeln!(md, "\n## {task}\n").unwrap();
        header(&mut md);
        for m in methods {
            let row: Vec<String> = shots
                .iter()
                .map(|s| t.get(&((*task).clone(), m.clone(), s.clone())).map(|v| fmt(v)).unwrap_or_else(|| "–".into()))
                .collect();
            writeln!(md, "| {m} | {} |", row.join(" | ")).unwrap();
        }
    }
    writeln!(md, "\n## Cost\n\n| method | trainable parameters | mean train seconds per run |\n|---|---|---|").unwrap();
    for m in methods {
        let cs: Vec<&&Cell> = main.iter().filter(|c| &c.method == m).collect();
        if let Some(c) = cs.first() {
            let secs: Vec<f64> = cs.iter().map(|c| c.train_seconds).collect();
            writeln!(md, "| {m} | {} | {:.2} |", c.trainable_params, mean_std(&secs).0).unwrap();
        }
    }
    let total: f64 = out.cells.iter().map(|c| c.train_seconds).sum();
    writeln!(
        md,
        "\nTraining time summed over all {} cells: {:.1} min on {} threads (the bank's training and evaluation \
         not included; manifest.json has the wall time of the last run).",
        out.cells.len(),
        total / 60.0,
        rayon::current_num_threads()
    )
    .unwrap();
    // ablation
    let ab: Vec<&Cell> = out.cells.iter().filter(|c| c.kind == "ablation").collect();
    let mut ab_series: BTreeMap<String, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
    for c in &ab {
        ab_series.entry(c.method.clone()).or_default().entry(c.n_modules).or_default().push(c.accuracy * 100.0);
    }
    for c in out.cells.iter().filter(|c| c.kind.starts_with("retrieval")) {
        let by = c.kind.strip_prefix("retrieval-").unwrap_or("arrow");
        ab_series
            .entry(format!("{} ({by} top-k)", c.method))
            .or_default()
            .entry(c.n_modules)
            .or_default()
            .push(c.accuracy * 100.0);
    }
    if !ab_series.is_empty() {
        let shots = cfg.ablation.as_ref().map(|a| a.shots).unwrap_or(0);
        writeln!(
            md,
            "\n## Number of upstream modules ({shots}-shot, random subsets, mean ± std over draws and tasks)\n"
        )
        .unwrap();
        let sizes: Vec<usize> = {
            let mut s: Vec<usize> = ab.iter().map(|c| c.n_modules).collect();
            s.sort();
            s.dedup();
            s
        };
        writeln!(
            md,
            "| method | {} |",
            sizes
                .iter()
                .map(|s| format!("{s} module{}", if *s == 1 { "" } else { "s" }))
                .collect::<Vec<_>>()
                .join(" | ")
        )
        .unwrap();
        writeln!(md, "|---|{}", "---|".repeat(sizes.len())).unwrap();
        for (m, ser) in &ab_series {
            let row: Vec<String> =
                sizes.iter().map(|s| ser.get(s).map(|v| fmt(v)).unwrap_or_else(|| "–".into())).collect();
            writeln!(md, "| {m} | {} |", row.join(" | ")).unwrap();
        }
    }
    // learned weight vs similarity, by two measures
    let measures: [(&str, &str, &Similarity); 2] = [
        ("weight_vs_similarity", "cosine of the tasks' mean base-model embeddings", &out.similarity),
        ("weight_vs_cka", "CKA gain of the module alone with the downstream labels", &out.cka),
    ];
    let mut drawn = Vec::new();
    for (file, what, sims) in measures {
        let per_task = weight_similarity_pairs(sims, &main);
        let pairs: Vec<(f64, f64)> = per_task.values().flatten().copied().collect();
        if pairs.is_empty() {
            continue;
        }
        if drawn.is_empty() {
            writeln!(
                md,
                "\n## Does learned composition favour related modules?\n\nSpearman correlation between an upstream \
                 module's similarity to the downstream task and its learned weight (mean over layers and seeds at the \
                 largest shot count), pooled over all (task, module) pairs and within each downstream task.\n\n\
                 | similarity | pooled ρ | pairs | {} |\n|---|---|---|{}",
                per_task.keys().map(|t| format!("ρ {t}")).collect::<Vec<_>>().join(" | "),
                "---|".repeat(per_task.len())
            )
            .unwrap();
        }
        let pooled = spearman(&pairs, &format!("report {file}"))?;
        let within = per_task
            .iter()
            .map(|(t, p)| Ok(format!("{:.3}", spearman(p, &format!("report {file}, task '{t}'"))?)))
            .collect::<Result<Vec<_>>>()?;
        writeln!(md, "| {what} ({file}.png) | **{pooled:.3}** | {} | {} |", pairs.len(), within.join(" | ")).unwrap();
        drawn.push((file, what, per_task));
    }
    let mut plots = vec!["accuracy_vs_shots"];

    // plots
    let xs: Vec<(String, f64)> = shots.iter().enumerate().map(|(i, s)| (s.clone(), i as f64)).collect();
    let series: Vec<(String, Vec<(f64, f64)>)> = methods
        .iter()
        .map(|m| {
            let pts = xs
                .iter()
                .filter_map(|(s, x)| {
                    avg.get(&(m.clone(), s.clone())).filter(|v| !v.is_empty()).map(|v| (*x, mean_std(v).0))
                })
                .collect();
            (m.clone(), pts)
        })
        .collect();
    let labels: Vec<String> = xs.iter().map(|(s, _)| s.clone()).collect();
    line_plot(dir, "accuracy_vs_shots", "Accuracy vs shots (mean over tasks)", "shots per class", &labels, &series)?;
    if !ab_series.is_empty() {
        let sizes: Vec<usize> = {
            let mut s: Vec<usize> = ab.iter().map(|c| c.n_modules).collect();
            s.sort();
            s.dedup();
            s
        };
        let labels: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
        let series: Vec<(String, Vec<(f64, f64)>)> = ab_series
            .iter()
            .map(|(m, ser)| {
                (
                    m.clone(),
                    sizes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| ser.get(s).map(|v| (i as f64, mean_std(v).0)))
                        .collect(),
                )
            })
            .collect();
        line_plot(dir, "modules_ablation", "Accuracy vs number of upstream modules", "modules", &labels, &series)?;
        plots.push("modules_ablation");
    }
    if let Some(h) = &cfg.heatmap {
        let shots = h.shots.to_string();
        if let Some(c) =
            main.iter().find(|c| c.task == h.task && c.method == "learned" && c.shots == shots && c.seed == 0)
        {
            heatmap(dir, c)?;
            plots.push("heatmap_weights");
        }
    }
    for (file, what, per_task) in &drawn {
        scatter(dir, file, what, per_task)?;
        plots.push(file);
    }
    writeln!(md, "\n## Plots\n").unwrap();
    if cfg!(feature = "cli") {
        for p in plots {
            writeln!(md, "- {p}.png / .svg").unwrap();
        }
    } else {
        writeln!(md, "None drawn: this loracomp was built without its `cli` feature (plotters).").unwrap();
    }
    crate::util::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(())
}

fn fmt(v: &[f64]) -> String {
    let (m, s) = mean_std(v);
    format!("{m:.1} ± {s:.1}")
}

/// (similarity, mean learned weight) per (downstream task, upstream module), at each task's largest shot count,
/// grouped by downstream task.
fn weight_similarity_pairs(sims_by_task: &Similarity, main: &[&Cell]) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut out = BTreeMap::new();
    for (task, sims) in sims_by_task {
        let learned: Vec<&&Cell> =
            main.iter().filter(|c| &c.task == task && c.method == "learned" && !c.weights.is_empty()).collect();
        let Some(top) = learned.iter().map(|c| shot_order(&c.shots)).max() else { continue };
        let cs: Vec<&&&Cell> = learned.iter().filter(|c| shot_order(&c.shots) == top).collect();
        let mut pairs = Vec::new();
        for (j, name) in cs[0].modules.iter().enumerate() {
            let mut ws = Vec::new();
            for c in &cs {
                for w in c.weights.values() {
                    ws.push(w[j] as f64);
                }
            }
            if let Some(s) = sims.get(name) {
                pairs.push((*s, mean_std(&ws).0));
            }
        }
        if !pairs.is_empty() {
            out.insert(task.clone(), pairs);
        }
    }
    out
}

fn ranks(v: &[f64], source: &str, item: &str) -> Result<Vec<f64>> {
    crate::util::ensure_finite(v.iter().copied(), source, item)?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for k in i..=j {
            r[idx[k]] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    Ok(r)
}

/// Spearman rank correlation of the pairs; `source` names them in the error a NaN or Inf gives.
pub fn spearman(pairs: &[(f64, f64)], source: &str) -> Result<f64> {
    let a = ranks(&pairs.iter().map(|p| p.0).collect::<Vec<_>>(), source, "similarity of pair")?;
    let b = ranks(&pairs.iter().map(|p| p.1).collect::<Vec<_>>(), source, "learned weight of pair")?;
    let (ma, mb) = (mean_std(&a).0, mean_std(&b).0);
    let cov: f64 = a.iter().zip(&b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    Ok(cov / (va * vb).sqrt().max(1e-12))
}

/// Twelve distinguishable colours (the tab10 set, then two darker extras), so no two methods share a colour.
#[cfg(feature = "cli")]
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

#[cfg(feature = "cli")]
fn e<E: std::fmt::Debug>(x: E) -> anyhow::Error {
    anyhow!("plot: {x:?}")
}

#[cfg(feature = "cli")]
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

#[cfg(feature = "cli")]
fn line_plot(
    dir: &Path,
    name: &str,
    title: &str,
    xlabel: &str,
    xlabels: &[String],
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let ymin = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(100.0f64, f64::min).floor().max(0.0);
    let ymax = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(0.0f64, f64::max).ceil().min(100.0);
    let n = xlabels.len().max(1) as f64;
    render!(dir, name, (800, 500), |root| {
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
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
        for (i, (m, pts)) in series.iter().enumerate() {
            let c = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
                .map_err(e)?
                .label(m.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            chart.draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled()))).map_err(e)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(e)?;
    });
    Ok(())
}

/// Names without the prefix they all share up to a '-' or '_' (e.g. `clinc-`), for axis labels.
#[cfg(feature = "cli")]
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

#[cfg(feature = "cli")]
fn heatmap(dir: &Path, c: &Cell) -> Result<()> {
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

#[cfg(feature = "cli")]
fn scatter(dir: &Path, file: &str, what: &str, per_task: &BTreeMap<String, Vec<(f64, f64)>>) -> Result<()> {
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

/// Without the `cli` feature nothing is drawn (report.md says so); the data stay in report.md and results.jsonl.
#[cfg(not(feature = "cli"))]
fn line_plot(_: &Path, _: &str, _: &str, _: &str, _: &[String], _: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "cli"))]
fn heatmap(_: &Path, _: &Cell) -> Result<()> {
    Ok(())
}

#[cfg(not(feature = "cli"))]
fn scatter(_: &Path, _: &str, _: &str, _: &BTreeMap<String, Vec<(f64, f64)>>) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "cli")]
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
    #[cfg(feature = "cli")]
    fn a_plot_that_fails_half_way_leaves_no_temporary() {
        let d = std::env::temp_dir().join(format!("loracomp-plot-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        assert!(failing_plot(&d).is_err());
        let left: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(left.is_empty(), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn spearman_refuses_a_nan_naming_the_pair_not_a_panic() {
        let ok = spearman(&[(1.0, 2.0), (2.0, 3.0), (3.0, 5.0)], "r").unwrap();
        assert!((ok - 1.0).abs() < 1e-12, "{ok}");
        let e = spearman(&[(1.0, 2.0), (f64::NAN, 3.0)], "report weight_vs_cka").unwrap_err().to_string();
        assert_eq!(e, "report weight_vs_cka: the criterion of similarity of pair 1 is NaN");
    }
}

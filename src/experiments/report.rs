//! report.md and plots (PNG and SVG through `plotters`, in `report/plots.rs`) from a sweep's cells. Built without the
//! `cli` feature (no `plotters`), report.md is written in full and its Plots section says that none were drawn.
//!
//! Statistics (see [`super::stats`]): every accuracy and macro-F1 is the mean ± the half-width of its 95 %
//! Student-t confidence interval over seeds ("n=1" where a single seed gives no interval); the paired
//! comparisons are paired t-tests on (task, seed) pairs; Spearman's ρ comes with its n and p-value.

use super::stats::{fmt_p, mean_ci, paired_t, MeanCi};
use super::sweep::{Cell, SweepConfig, SweepOutput};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// Similarity per downstream task and upstream module.
#[cfg(feature = "cli")]
mod plots;
/// Without the `cli` feature nothing is drawn (report.md says so); the data stay in report.md and results.jsonl.
#[cfg(not(feature = "cli"))]
mod plots {
    use super::{Cell, Curve, Panel};
    use anyhow::Result;
    use std::collections::BTreeMap;
    use std::path::Path;
    pub fn line_plot(_: &Path, _: &str, _: &str, _: &str, _: &[String], _: &[Curve]) -> Result<()> {
        Ok(())
    }
    pub fn task_panels(_: &Path, _: &str, _: &str, _: &[String], _: &[Panel]) -> Result<()> {
        Ok(())
    }
    pub fn heatmap(_: &Path, _: &Cell) -> Result<()> {
        Ok(())
    }
    pub fn scatter(_: &Path, _: &str, _: &str, _: &BTreeMap<String, Vec<(f64, f64)>>) -> Result<()> {
        Ok(())
    }
}
use plots::{heatmap, line_plot, scatter, task_panels};

type Similarity = BTreeMap<String, BTreeMap<String, f64>>;

pub use super::stats::mean_std;

/// A bank module's own scores on its upstream task (from the module's metrics.json, written when it is trained).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamScore {
    /// The split the scores are on (`test`, or `valid` for a task without a test split).
    pub eval_split: Option<String>,
    pub n_eval: usize,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub valid_accuracy: Option<f64>,
}

impl UpstreamScore {
    /// The scores a bank module's metrics.json records; `None` if it records no evaluation.
    pub fn from_metrics(m: &serde_json::Value) -> Option<Self> {
        Some(UpstreamScore {
            eval_split: m["eval_split"].as_str().map(String::from),
            n_eval: m["n_eval"].as_u64().unwrap_or(0) as usize,
            accuracy: m["accuracy"].as_f64()?,
            macro_f1: m["macro_f1"].as_f64()?,
            valid_accuracy: m["valid_accuracy"].as_f64(),
        })
    }
}

/// What the report needs from the bank and the model besides the cells, kept in `module_stats.json` beside
/// results.jsonl so that `loracomp sweep report` can draw the report again without them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModuleStats {
    /// Cosine of mean base-model embeddings, per downstream task and upstream module.
    pub similarity: Similarity,
    /// CKA gain with the downstream labels, per downstream task and upstream module.
    pub cka: Similarity,
    /// Each bank module's own scores on its upstream task.
    pub upstream: BTreeMap<String, UpstreamScore>,
}

pub const MODULE_STATS: &str = "module_stats.json";

impl ModuleStats {
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::util::write_atomic(&dir.join(MODULE_STATS), serde_json::to_string_pretty(self)?.as_bytes())
    }

    /// `dir/module_stats.json`, or `None` where the sweep's report stage never wrote one.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(MODULE_STATS);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok(Some(serde_json::from_str(&text).with_context(|| format!("{}: not a module_stats file", p.display()))?))
    }
}

fn shot_order(s: &str) -> usize {
    s.parse().unwrap_or(usize::MAX)
}

/// A score of a cell, in %.
#[derive(Clone, Copy)]
enum Metric {
    Accuracy,
    MacroF1,
}

impl Metric {
    fn of(self, c: &Cell) -> f64 {
        100.0
            * match self {
                Metric::Accuracy => c.accuracy,
                Metric::MacroF1 => c.macro_f1,
            }
    }
}

/// The main grid's cells by (task, method, shots), then seed.
type Grid<'a> = BTreeMap<(String, String, String), BTreeMap<u64, &'a Cell>>;

fn grid<'a>(cells: &[&'a Cell]) -> Grid<'a> {
    let mut g: Grid = BTreeMap::new();
    for c in cells {
        g.entry((c.task.clone(), c.method.clone(), c.shots.clone())).or_default().insert(c.seed, c);
    }
    g
}

/// Per seed, the mean over `tasks` of the metric, for the seeds every one of those tasks has.
fn per_seed_mean(g: &Grid, tasks: &[&String], m: &str, s: &str, metric: Metric) -> Vec<f64> {
    let mut per_seed: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for t in tasks {
        if let Some(by_seed) = g.get(&((*t).clone(), m.to_string(), s.to_string())) {
            for (seed, c) in by_seed {
                per_seed.entry(*seed).or_default().push(metric.of(c));
            }
        }
    }
    per_seed.values().filter(|v| v.len() == tasks.len()).map(|v| v.iter().sum::<f64>() / v.len() as f64).collect()
}

/// `mean ± half` of `v`, `–` when empty.
fn cell_text(v: &[f64]) -> String {
    if v.is_empty() {
        "–".into()
    } else {
        mean_ci(v).fmt(1)
    }
}

/// A table of methods × shot counts: the mean over `tasks` (per seed, then over seeds) of the metric.
fn method_table(md: &mut String, g: &Grid, tasks: &[&String], methods: &[String], shots: &[String], metric: Metric) {
    writeln!(md, "| method | {} |", shots.iter().map(|s| format!("{s}-shot")).collect::<Vec<_>>().join(" | ")).unwrap();
    writeln!(md, "|---|{}", "---|".repeat(shots.len())).unwrap();
    for m in methods {
        let row: Vec<String> = shots.iter().map(|s| cell_text(&per_seed_mean(g, tasks, m, s, metric))).collect();
        writeln!(md, "| {m} | {} |", row.join(" | ")).unwrap();
    }
}

/// `0.467 (n=30, p=0.009)`, in bold where p < 0.05 from at least four points.
fn fmt_rho(s: &super::stats::Spearman) -> String {
    let p = fmt_p(s.p);
    let text = format!("{:.3} (n={}, p{}{p})", s.rho, s.n, if p.starts_with('<') { "" } else { "=" });
    if s.n >= 4 && s.p.is_some_and(|p| p < 0.05) {
        format!("**{text}**")
    } else {
        text
    }
}

pub fn write_all(cfg: &SweepConfig, out: &SweepOutput, dir: &Path) -> Result<()> {
    let main: Vec<&Cell> = out.cells.iter().filter(|c| c.kind == "main").collect();
    let g = grid(&main);
    let mut shots: Vec<String> = cfg.shots.iter().map(|s| s.to_string()).collect();
    shots.sort_by_key(|s| shot_order(s));
    let methods = &cfg.methods;
    let mut md = String::new();
    writeln!(md, "# {}\n", cfg.name).unwrap();
    writeln!(
        md,
        "Model `{}`; bank: {} upstream LoRA modules{} (rank {}, α {}, on {}); {} seeds; {} steps of batch {} per few-shot run. \
         Accuracy (%) on each task's test split{}: mean ± half-width of the 95 % Student-t confidence interval over \
         seeds (\"n=1\" where one seed gives no interval).\n",
        cfg.model.display(),
        cfg.upstream.len(),
        if cfg.exclude_self { ", each downstream task's bank without its own module" } else { "" },
        cfg.bank.rank,
        cfg.bank.alpha,
        cfg.bank.targets.join(", "),
        cfg.seeds,
        cfg.adapt.steps,
        cfg.adapt.batch,
        cfg.adapt.eval_limit.map_or(String::new(), |n| format!(
            " ({n} examples spread over it where it has more: `adapt.eval_limit`)"
        ))
    )
    .unwrap();
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
    writeln!(
        md,
        "The unit is the seed: each seed's accuracy averaged over the {} task{}, then mean ± 95 % CI over the seeds \
         that every task has.\n",
        with_results.len(),
        if with_results.len() == 1 { "" } else { "s" }
    )
    .unwrap();
    method_table(&mut md, &g, &with_results, methods, &shots, Metric::Accuracy);

    paired_section(&mut md, &g, &with_results, methods, &shots);

    for task in &with_results {
        writeln!(md, "\n## {task}\n").unwrap();
        method_table(&mut md, &g, &[*task], methods, &shots, Metric::Accuracy);
    }

    writeln!(
        md,
        "\n## Macro-F1\n\nMacro-F1 (%) on each task's test split (the unweighted mean of the per-class F1), as the \
         accuracy above: mean ± 95 % CI over seeds; the average over tasks per seed first.\n\n### Average over \
         downstream tasks\n"
    )
    .unwrap();
    method_table(&mut md, &g, &with_results, methods, &shots, Metric::MacroF1);
    for task in &with_results {
        writeln!(md, "\n### {task}\n").unwrap();
        method_table(&mut md, &g, &[*task], methods, &shots, Metric::MacroF1);
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
        out.threads
    )
    .unwrap();

    upstream_section(&mut md, cfg, out);
    weights_section(&mut md, &g, &with_results, &shots);

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
    let ab_sizes: Vec<usize> =
        ab_series.values().flat_map(|s| s.keys().copied()).collect::<BTreeSet<_>>().into_iter().collect();
    if !ab_series.is_empty() {
        ablation_section(&mut md, cfg, &ab, &ab_series, &ab_sizes);
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
                 largest shot count), pooled over all (task, module) pairs and within each downstream task, as \
                 ρ (n pairs, two-sided p). p is exact (all n! pairings) for n ≤ {}, the t approximation with n − 2 \
                 degrees of freedom above; bold: p < 0.05 from n ≥ 4.\n\n\
                 | similarity | pooled ρ | {} |\n|---|---|{}",
                super::stats::SPEARMAN_EXACT_MAX,
                per_task.keys().map(|t| format!("ρ {t}")).collect::<Vec<_>>().join(" | "),
                "---|".repeat(per_task.len())
            )
            .unwrap();
        }
        let pooled = spearman(&pairs, &format!("report {file}"))?;
        let within = per_task
            .iter()
            .map(|(t, p)| Ok(fmt_rho(&spearman(p, &format!("report {file}, task '{t}'"))?)))
            .collect::<Result<Vec<_>>>()?;
        writeln!(md, "| {what} ({file}.png) | {} | {} |", fmt_rho(&pooled), within.join(" | ")).unwrap();
        drawn.push((file, what, per_task));
    }
    if !drawn.is_empty() && out.cka.is_empty() {
        writeln!(
            md,
            "\nThe CKA gain was not recorded with these results: it needs the trained bank, which is not kept with \
             the report."
        )
        .unwrap();
    }
    if drawn.is_empty()
        && out.similarity.is_empty()
        && main.iter().any(|c| c.method == "learned" && !c.weights.is_empty())
    {
        let why = if dir.join(MODULE_STATS).exists() {
            // the report stage ran with the bank and recorded no similarity: the model is generative
            "the similarities are cosines of an encoder's mean base-model embeddings, and a generative model \
             (rank classification) has none"
                .to_string()
        } else {
            format!(
                "the module similarities are computed (for encoder models) from the model, the data and the trained \
                 bank when the sweep's report stage runs, and there is no {MODULE_STATS} here"
            )
        };
        writeln!(
            md,
            "\n## Does learned composition favour related modules?\n\nNot recorded with these results: {why}."
        )
        .unwrap();
    }
    let mut plots = vec!["accuracy_vs_shots", "accuracy_vs_shots_per_task"];

    // plots
    let xs: Vec<(String, f64)> = shots.iter().enumerate().map(|(i, s)| (s.clone(), i as f64)).collect();
    let labels: Vec<String> = xs.iter().map(|(s, _)| s.clone()).collect();
    let curves = |tasks: &[&String]| -> Vec<Curve> {
        methods
            .iter()
            .map(|m| {
                let pts = xs
                    .iter()
                    .filter_map(|(s, x)| {
                        let v = per_seed_mean(&g, tasks, m, s, Metric::Accuracy);
                        (!v.is_empty()).then(|| Point::new(*x, mean_ci(&v)))
                    })
                    .collect();
                (m.clone(), pts)
            })
            .collect()
    };
    line_plot(
        dir,
        "accuracy_vs_shots",
        "Accuracy vs shots (mean over tasks, 95 % CI over seeds)",
        "shots per class",
        &labels,
        &curves(&with_results),
    )?;
    let panels: Vec<Panel> = with_results.iter().map(|t| ((*t).clone(), curves(&[*t]))).collect();
    task_panels(dir, "accuracy_vs_shots_per_task", "shots per class", &labels, &panels)?;
    if !ab_series.is_empty() {
        let labels: Vec<String> = ab_sizes.iter().map(|s| s.to_string()).collect();
        let series: Vec<Curve> = ab_series
            .iter()
            .map(|(m, ser)| {
                (
                    m.clone(),
                    ab_sizes
                        .iter()
                        .enumerate()
                        .filter_map(|(i, s)| ser.get(s).map(|v| Point::new(i as f64, mean_ci(v))))
                        .collect(),
                )
            })
            .collect();
        line_plot(
            dir,
            "modules_ablation",
            "Accuracy vs number of upstream modules (95 % CI)",
            "modules",
            &labels,
            &series,
        )?;
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

/// Per shot count, the best method by mean accuracy over its (task, seed) cells against every other method:
/// paired t-test on the (task, seed) pairs both have.
fn paired_section(md: &mut String, g: &Grid, tasks: &[&String], methods: &[String], shots: &[String]) {
    let mut rows = Vec::new();
    for s in shots {
        // (task, seed) → accuracy, per method
        let by_method: Vec<(&String, Pairs)> = methods
            .iter()
            .map(|m| {
                let mut v = BTreeMap::new();
                for t in tasks {
                    if let Some(by_seed) = g.get(&((*t).clone(), m.clone(), s.clone())) {
                        for (seed, c) in by_seed {
                            v.insert((*t, *seed), Metric::Accuracy.of(c));
                        }
                    }
                }
                (m, v)
            })
            .collect();
        let mean = |v: &BTreeMap<(&String, u64), f64>| v.values().sum::<f64>() / v.len() as f64;
        let Some((best, bv)) =
            by_method.iter().filter(|(_, v)| !v.is_empty()).max_by(|a, b| mean(&a.1).total_cmp(&mean(&b.1)))
        else {
            continue;
        };
        for (m, v) in &by_method {
            if m == best || v.is_empty() {
                continue;
            }
            let (a, b): (Vec<f64>, Vec<f64>) = v.iter().filter_map(|(k, x)| bv.get(k).map(|y| (*x, *y))).unzip();
            let r = paired_t(&a, &b);
            let diff = if r.n == 0 {
                "–".to_string()
            } else {
                match r.diff.half {
                    Some(h) => format!("{:+.1} [{:+.1}, {:+.1}]", r.diff.mean, r.diff.mean - h, r.diff.mean + h),
                    None => format!("{:+.1} (n=1)", r.diff.mean),
                }
            };
            rows.push(format!(
                "| {s} | {best} ({:.1}) | {m} ({:.1}) | {diff} | {} | {} |",
                mean(bv),
                mean(v),
                r.n,
                fmt_p(r.p)
            ));
        }
    }
    if rows.is_empty() {
        return;
    }
    writeln!(
        md,
        "\n## Paired comparison with the best method\n\nPer shot count, the method with the highest mean accuracy \
         over its (task, seed) cells (\"best\") against each other method: Δ = method − best in accuracy points over \
         the (task, seed) pairs both have, with its 95 % CI, the number of pairs n and the two-sided p-value of the \
         paired t-test (n − 1 degrees of freedom). The p-values are not corrected for the number of comparisons, \
         and pairs of one task share its test set, so they are not fully independent.\n\n\
         | shots | best (mean) | method (mean) | Δ [95 % CI] | n | p |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for r in rows {
        writeln!(md, "{r}").unwrap();
    }
}

/// Each bank module's own accuracy on its upstream task, where the bank recorded it.
fn upstream_section(md: &mut String, cfg: &SweepConfig, out: &SweepOutput) {
    if cfg.upstream.is_empty() {
        return;
    }
    writeln!(md, "\n## Upstream modules\n").unwrap();
    if out.upstream.is_empty() {
        writeln!(
            md,
            "Each bank module's own accuracy on its upstream task: not recorded with these results (no {MODULE_STATS}; \
             the sweep's report stage copies it from the bank's metrics.json files)."
        )
        .unwrap();
        return;
    }
    writeln!(
        md,
        "Each bank module's own scores on its upstream task (the bank's metrics.json: the module with its trained \
         head, on the split named, test where the task has one).\n\n\
         | module | split | examples | accuracy (%) | macro-F1 (%) | valid accuracy (%) |\n|---|---|---|---|---|---|"
    )
    .unwrap();
    for u in &cfg.upstream {
        match out.upstream.get(u) {
            Some(s) => writeln!(
                md,
                "| {u} | {} | {} | {:.1} | {:.1} | {} |",
                s.eval_split.as_deref().unwrap_or("–"),
                s.n_eval,
                100.0 * s.accuracy,
                100.0 * s.macro_f1,
                s.valid_accuracy.map_or("–".into(), |v| format!("{:.1}", 100.0 * v))
            ),
            None => writeln!(md, "| {u} | not recorded | | | | |"),
        }
        .unwrap();
    }
}

/// Per method that records weights and per task: each module's weight, the mean over layers, then mean ± 95 %
/// CI over seeds, per shot count.
fn weights_section(md: &mut String, g: &Grid, tasks: &[&String], shots: &[String]) {
    let with_weights: BTreeSet<&String> =
        g.iter().filter(|(_, s)| s.values().any(|c| !c.weights.is_empty())).map(|((_, m, _), _)| m).collect();
    if with_weights.is_empty() {
        return;
    }
    writeln!(
        md,
        "\n## Learned weights per module\n\nEach module's composition weight (softmax over the bank), the mean over \
         the layers and targets, then mean ± 95 % CI over seeds; uniform composition gives each of N modules 1/N."
    )
    .unwrap();
    for m in with_weights {
        for t in tasks {
            // module → shots → per-seed means over layers
            let mut per: BTreeMap<String, BTreeMap<&String, Vec<f64>>> = BTreeMap::new();
            let mut order: Vec<String> = Vec::new();
            for s in shots {
                let Some(by_seed) = g.get(&((*t).clone(), m.clone(), s.clone())) else { continue };
                for c in by_seed.values().filter(|c| !c.weights.is_empty()) {
                    for (j, name) in c.modules.iter().enumerate() {
                        let ws: Vec<f64> = c.weights.values().filter_map(|w| w.get(j)).map(|x| *x as f64).collect();
                        if !order.contains(name) {
                            order.push(name.clone());
                        }
                        per.entry(name.clone()).or_default().entry(s).or_default().push(mean_std(&ws).0);
                    }
                }
            }
            if per.is_empty() {
                continue;
            }
            writeln!(md, "\n### {m}: {t} ({} modules)\n", order.len()).unwrap();
            writeln!(md, "| module | {} |", shots.iter().map(|s| format!("{s}-shot")).collect::<Vec<_>>().join(" | "))
                .unwrap();
            writeln!(md, "|---|{}", "---|".repeat(shots.len())).unwrap();
            for name in &order {
                let row: Vec<String> =
                    shots.iter().map(|s| per[name].get(s).map_or("–".into(), |v| mean_ci(v).fmt(3))).collect();
                writeln!(md, "| {name} | {} |", row.join(" | ")).unwrap();
            }
        }
    }
}

/// The module-count ablation: mean ± 95 % CI over draws and tasks, and how many distinct subsets were drawn.
fn ablation_section(
    md: &mut String,
    cfg: &SweepConfig,
    ab: &[&Cell],
    ab_series: &BTreeMap<String, BTreeMap<usize, Vec<f64>>>,
    sizes: &[usize],
) {
    let shots = cfg.ablation.as_ref().map(|a| a.shots).unwrap_or(0);
    let draws = cfg.ablation.as_ref().map(|a| a.draws).unwrap_or(0);
    writeln!(
        md,
        "\n## Number of upstream modules ({shots}-shot, random subsets, mean ± 95 % CI over draws and tasks)\n"
    )
    .unwrap();
    let head = |md: &mut String| {
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
    };
    head(md);
    for (m, ser) in ab_series {
        let row: Vec<String> =
            sizes.iter().map(|s| ser.get(s).map(|v| cell_text(v)).unwrap_or_else(|| "–".into())).collect();
        writeln!(md, "| {m} | {} |", row.join(" | ")).unwrap();
    }
    // distinct random subsets per (task, size), over the draws (the seeds) that ran
    let mut subsets: Draws = BTreeMap::new();
    for c in ab {
        let e = subsets.entry(c.n_modules).or_default().entry(&c.task).or_default();
        e.0.insert(&c.modules);
        e.1.insert(c.seed);
    }
    let row: Vec<String> = sizes
        .iter()
        .map(|s| match subsets.get(s) {
            None => "–".into(),
            Some(t) => {
                let d: usize = t.values().map(|x| x.0.len()).sum();
                let n: usize = t.values().map(|x| x.1.len()).sum();
                format!("{d} of {n}")
            }
        })
        .collect();
    writeln!(md, "| distinct subsets of draws (summed over tasks) | {} |", row.join(" | ")).unwrap();
    let repeated = subsets.values().flat_map(|t| t.values()).any(|(d, n)| d.len() < n.len());
    // sizes with no more possible subsets than draws (in some task's pool): all of them are used, once
    let tasks: Vec<&String> = match &cfg.ablation {
        Some(a) if !a.tasks.is_empty() => a.tasks.iter().collect(),
        _ => cfg.downstream.iter().collect(),
    };
    let few: Vec<String> = sizes
        .iter()
        .filter_map(|&s| {
            let counts: BTreeSet<usize> = tasks
                .iter()
                .map(|t| {
                    let pool = cfg.upstream.iter().filter(|u| !(cfg.exclude_self && u == t)).count();
                    super::sweep::binomial(pool, s)
                })
                .filter(|&c| c <= draws)
                .collect();
            (!counts.is_empty()).then(|| {
                let c: Vec<String> = counts.iter().map(|c| c.to_string()).collect();
                format!("{s} module{}: {} possible", if s == 1 { "" } else { "s" }, c.join(" / "))
            })
        })
        .collect();
    writeln!(
        md,
        "\nRandom subsets are distinct within a (task, size); where a size has no more possible subsets than the \
         {draws} draws configured, each of them is used once instead ({}).{}",
        if few.is_empty() { "no such size here".to_string() } else { few.join("; ") },
        if repeated {
            " **These results hold repeated subsets** (a draw with the same modules as another, with another \
             seed): they were run before draws were made distinct."
        } else {
            ""
        }
    )
    .unwrap();
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

/// Spearman's ρ of the pairs with n and p; `source` names them in the error a NaN or Inf gives.
pub fn spearman(pairs: &[(f64, f64)], source: &str) -> Result<super::stats::Spearman> {
    let x: Vec<f64> = pairs.iter().map(|p| p.0).collect();
    let y: Vec<f64> = pairs.iter().map(|p| p.1).collect();
    crate::util::ensure_finite(x.iter().copied(), source, "similarity of pair")?;
    crate::util::ensure_finite(y.iter().copied(), source, "learned weight of pair")?;
    Ok(super::stats::spearman(&x, &y))
}

/// A named curve of a plot.
type Curve = (String, Vec<Point>);
/// A titled panel of curves.
type Panel = (String, Vec<Curve>);
/// Accuracy per (task, seed) of one method.
type Pairs<'a> = BTreeMap<(&'a String, u64), f64>;
/// Per size, per task: the distinct module subsets and the seeds (draws) that ran.
type Draws<'a> = BTreeMap<usize, BTreeMap<&'a String, (BTreeSet<&'a Vec<String>>, BTreeSet<u64>)>>;

/// A point of a curve: x, the mean and its 95 % interval half-width (none for n = 1).
#[derive(Clone, Copy, Debug)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub half: Option<f64>,
}

impl Point {
    fn new(x: f64, ci: MeanCi) -> Self {
        Point { x, y: ci.mean, half: ci.half }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_refuses_a_nan_naming_the_pair_not_a_panic() {
        let ok = spearman(&[(1.0, 2.0), (2.0, 3.0), (3.0, 5.0)], "r").unwrap();
        assert!((ok.rho - 1.0).abs() < 1e-12 && ok.n == 3, "{ok:?}");
        let e = spearman(&[(1.0, 2.0), (f64::NAN, 3.0)], "report weight_vs_cka").unwrap_err().to_string();
        assert_eq!(e, "report weight_vs_cka: the criterion of similarity of pair 1 is NaN");
    }
}

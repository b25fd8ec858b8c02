//! `loracomp sweep report` on a small synthetic results.jsonl: every statistics section is there and its numbers
//! are the ones scipy gives for the same values.

use super::common;
use serde_json::json;
use std::path::Path;

const CONFIG: &str = r#"name = "synthetic"
model = "no-model-needed"
data = "no-data-needed"
upstream = ["ua", "ub"]
downstream = ["A", "B"]
shots = [1, 4]
seeds = 3
methods = ["uniform", "learned"]

[ablation]
shots = 1
draws = 2
"#;

/// Accuracy: 0.5, +0.1 at 4 shots, +0.05 for learned, +0.01 a seed, +0.02 on task B; learned gets a seed's
/// noise so the paired differences vary.
fn accuracy(task: &str, method: &str, shots: usize, seed: u64) -> f64 {
    let noise = [0.0, 0.004, -0.002][seed as usize];
    0.5 + if shots == 4 { 0.1 } else { 0.0 }
        + if method == "learned" { 0.05 + noise } else { 0.0 }
        + 0.01 * seed as f64
        + if task == "B" { 0.02 } else { 0.0 }
}

fn cell(kind: &str, task: &str, method: &str, shots: usize, seed: u64, modules: &[&str]) -> serde_json::Value {
    let acc = accuracy(task, method, shots, seed);
    let weights = if method == "learned" && kind == "main" {
        json!({"layer.0.query": [0.7, 0.3], "layer.0.value": [0.5, 0.5]})
    } else {
        json!({})
    };
    json!({
        "key": format!("{kind}|{task}|{method}|{shots}|{seed}|{}", modules.join("+")), "kind": kind, "task": task,
        "method": method, "shots": shots.to_string(), "seed": seed, "n_modules": modules.len(), "modules": modules,
        "accuracy": acc, "macro_f1": acc - 0.1, "trainable_params": 10, "train_seconds": 1.0, "weights": weights,
    })
}

fn write(dir: &Path, cells: &[serde_json::Value], stats: Option<serde_json::Value>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.toml"), CONFIG).unwrap();
    let text: String = cells.iter().map(|c| format!("{c}\n")).collect();
    std::fs::write(dir.join("results.jsonl"), text).unwrap();
    if let Some(s) = stats {
        std::fs::write(dir.join("module_stats.json"), s.to_string()).unwrap();
    }
}

fn report(dir: &Path) -> String {
    let o = common::bin().args(["sweep", "report", "--out"]).arg(dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read_to_string(dir.join("report.md")).unwrap()
}

fn has(report: &str, line: &str) {
    assert!(report.contains(line), "missing {line:?} in:\n{report}");
}

#[test]
fn sweep_report_redraws_every_statistics_section_from_results_alone() {
    let root = common::tmpdir("report");
    let mut cells = Vec::new();
    for task in ["A", "B"] {
        for shots in [1, 4] {
            for seed in 0..3 {
                for m in ["uniform", "learned"] {
                    cells.push(cell("main", task, m, shots, seed, &["ua", "ub"]));
                }
            }
        }
        for m in ["uniform", "learned"] {
            cells.push(cell("ablation", task, m, 1, 0, &["ua"]));
            cells.push(cell("ablation", task, m, 1, 1, &["ub"]));
            cells.push(cell("ablation", task, m, 1, 0, &["ua", "ub"]));
        }
    }
    let stats = json!({
        "similarity": {"A": {"ua": 0.9, "ub": 0.1}, "B": {"ua": 0.8, "ub": 0.2}},
        "cka": {},
        "upstream": {"ua": {"eval_split": "test", "n_eval": 200, "accuracy": 0.915, "macro_f1": 0.9, "valid_accuracy": 0.92}},
    });
    let dir = root.join("full");
    write(&dir, &cells, Some(stats));
    let r = report(&dir);
    // Per task, 95 % t interval over 3 seeds: A uniform 1-shot is 50, 51, 52 → 51.0 ± 4.303 / √3 = 2.484.
    has(&r, "## A\n\n| method | 1-shot | 4-shot |\n|---|---|---|\n| uniform | 51.0 ± 2.5 | 61.0 ± 2.5 |");
    // The average over tasks per seed (51, 52, 53 at 1 shot): the same interval.
    has(&r, "| uniform | 52.0 ± 2.5 | 62.0 ± 2.5 |");
    // Paired: at 1 shot learned is best; uniform − learned over the 6 (task, seed) pairs is −5.0, −5.4, −4.8
    // twice: mean −5.067, 95 % CI ± 0.287, p = 9.77e-8 (scipy.stats.ttest_1samp).
    has(&r, "## Paired comparison with the best method");
    has(&r, "| 1 | learned (57.1) | uniform (52.0) | -5.1 [-5.4, -4.8] | 6 | <0.001 |");
    // Macro-F1 is 10 points under the accuracy here.
    has(&r, "## Macro-F1");
    has(&r, "### A\n\n| method | 1-shot | 4-shot |\n|---|---|---|\n| uniform | 41.0 ± 2.5 | 51.0 ± 2.5 |");
    // Weights: (0.7 + 0.5) / 2 and (0.3 + 0.5) / 2 in every seed.
    has(&r, "### learned: A (2 modules)");
    has(&r, "| ua | 0.600 ± 0.000 | 0.600 ± 0.000 |");
    has(&r, "| ub | 0.400 ± 0.000 | 0.400 ± 0.000 |");
    // Upstream module scores, and "not recorded" for the module without them.
    has(&r, "| ua | test | 200 | 91.5 | 90.0 | 92.0 |");
    has(&r, "| ub | not recorded | | | | |");
    // Spearman: pooled over 4 pairs, ρ = 0.894, exact p = 1/3 (scipy permutation_test); per task n = 2, no p, no bold.
    has(&r, "| 0.894 (n=4, p=0.333) | 1.000 (n=2, p=–) | 1.000 (n=2, p=–) |");
    assert!(!r.contains("**1.000") && !r.contains("p=<"), "{r}");
    // Ablation: 2 distinct subsets of size 1 per task; size 2 has one possible subset, said so.
    has(&r, "| distinct subsets of draws (summed over tasks) | 4 of 4 | 2 of 2 |");
    has(&r, "2 modules: 1 possible");
    assert!(!r.contains("repeated subsets"), "{r}");
    for f in ["accuracy_vs_shots", "accuracy_vs_shots_per_task", "modules_ablation", "weight_vs_similarity"] {
        assert!(dir.join(format!("{f}.png")).exists() && dir.join(format!("{f}.svg")).exists(), "{f}");
    }

    // Without module_stats.json, a seed missing, and a repeated ablation subset: each said, not hidden.
    let mut fewer: Vec<serde_json::Value> =
        cells.iter().filter(|c| !(c["task"] == "B" && c["seed"] == 2 && c["kind"] == "main")).cloned().collect();
    fewer.push(cell("ablation", "A", "uniform", 1, 1, &["ua", "ub"]));
    let dir = root.join("partial");
    write(&dir, &fewer, None);
    let r = report(&dir);
    has(&r, "**Missing:** 4 planned cells");
    has(&r, "Each bank module's own accuracy on its upstream task: not recorded");
    has(&r, "## Does learned composition favour related modules?\n\nNot recorded");
    has(&r, "**These results hold repeated subsets**");
    // B has only seeds 0 and 1 now: 52, 53 → 52.5 ± 12.706 · 0.707 / √2 = 6.4.
    has(&r, "## B\n\n| method | 1-shot | 4-shot |\n|---|---|---|\n| uniform | 52.5 ± 6.4 |");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn sweep_report_without_results_is_an_error_naming_the_directory() {
    let root = common::tmpdir("report-empty");
    write(&root, &[], None);
    let o = common::bin().args(["sweep", "report", "--out"]).arg(&root).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no results") && err.contains(&root.display().to_string()), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

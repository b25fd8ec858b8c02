//! `loracomp sweep submit`: a sweep as a Slurm job-array pipeline (bank array → cells array → report job,
//! chained with `afterok`) or as Kubernetes Indexed Jobs. Scripts and manifests are written under the output
//! directory; `sbatch` is called unless `--dry-run`; `kubectl` never is.

use super::shard::Stage;
use super::sweep::{collect_results, Plan, SweepConfig};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the stages run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Slurm,
    K8s,
}

/// What `sweep submit` was asked to do (paths absolute).
pub struct SubmitSpec {
    pub target: Target,
    /// The config the jobs read (`OUT/config.toml`).
    pub config: PathBuf,
    pub out: PathBuf,
    /// The directory the jobs run in (relative paths of the config are taken from it).
    pub workdir: PathBuf,
    pub shards: usize,
    /// The loracomp binary the jobs call (Slurm: this one by default; Kubernetes: `loracomp` in the image).
    pub bin: PathBuf,
    pub sbatch_args: Vec<String>,
    pub dry_run: bool,
    pub resume: bool,
    pub threads: Option<usize>,
    pub compute: String,
    pub image: String,
    pub pvc: Option<String>,
    /// The shared volume's root, mounted at the same path in every pod.
    pub volume_root: PathBuf,
    /// The `sbatch` program (`LORACOMP_SBATCH` overrides it, for tests).
    pub sbatch: String,
}

/// One stage's share of the work per shard: items, estimated cost, and what is not done yet.
struct StageLoad {
    items: Vec<usize>,
    cost: Vec<f64>,
    todo: Vec<usize>,
    todo_cost: Vec<f64>,
}

impl StageLoad {
    fn new(n: usize) -> Self {
        StageLoad { items: vec![0; n], cost: vec![0.0; n], todo: vec![0; n], todo_cost: vec![0.0; n] }
    }
    /// The shards to submit: those with work (missing work with `resume`).
    fn shards(&self, resume: bool) -> Vec<usize> {
        let v = if resume { &self.todo } else { &self.items };
        (0..v.len()).filter(|&s| v[s] > 0).collect()
    }
}

/// CPU-hours, printed with enough digits to be read at any size.
struct Hours(f64);

impl std::fmt::Display for Hours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.0;
        let s = if h >= 10.0 {
            format!("{h:.1}")
        } else if h >= 0.01 {
            format!("{h:.3}")
        } else {
            format!("{h:.2e}")
        };
        f.pad(&s)
    }
}

/// What a submission did: the summary printed, and the job ids (Slurm, not a dry run).
pub struct Submitted {
    pub summary: String,
    pub jobs: Vec<(Stage, String)>,
}

/// `0-3`, or `0,2,5`: the array indices of `shards`.
fn array_spec(shards: &[usize], count: usize) -> String {
    if shards.len() == count && count > 0 {
        format!("0-{}", count - 1)
    } else {
        shards.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(",")
    }
}

/// A word quoted for bash.
fn sh(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| anyhow!("{}: path is not UTF-8", p.display()))
}

/// The loracomp command line of one stage (`--shard env` for the sharded stages).
fn stage_args(spec: &SubmitSpec, stage: Stage, threads: &str) -> Result<Vec<String>> {
    let mut a = vec!["--compute".to_string(), spec.compute.clone(), "--threads".into(), threads.to_string()];
    a.extend(["sweep", "--quiet", "--config"].map(String::from));
    a.push(path_str(&spec.config)?.to_string());
    a.push("--out".into());
    a.push(path_str(&spec.out)?.to_string());
    a.extend(["--stage".to_string(), stage.name().to_string()]);
    if stage != Stage::Report {
        a.extend(["--shard".to_string(), "env".into(), "--shards".into(), spec.shards.to_string()]);
    }
    Ok(a)
}

/// A DNS-1123 label from the sweep's name: lowercase letters, digits and '-', at most `max` characters.
fn dns_label(name: &str, max: usize) -> String {
    let mut s: String = name
        .to_lowercase()
        .chars()
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    while s.contains("--") {
        s = s.replace("--", "-");
    }
    let s: String = s.trim_matches('-').chars().take(max).collect();
    let s = s.trim_end_matches('-').to_string();
    if s.is_empty() {
        "sweep".into()
    } else {
        s
    }
}

/// The `sbatch` script of one stage.
fn sbatch_script(spec: &SubmitSpec, cfg: &SweepConfig, stage: Stage) -> Result<String> {
    let threads = match spec.threads {
        Some(t) => t.to_string(),
        None => "${SLURM_CPUS_PER_TASK:-1}".to_string(),
    };
    let logs = spec.out.join("slurm").join("logs");
    let mut s = String::from("#!/bin/bash\n");
    writeln!(s, "#SBATCH --job-name=loracomp-{}-{}", dns_label(&cfg.name, 40), stage.name())?;
    if stage == Stage::Report {
        writeln!(s, "#SBATCH --output={}/report-%j.out", path_str(&logs)?)?;
    } else {
        writeln!(s, "#SBATCH --array=0-{}", spec.shards - 1)?;
        writeln!(s, "#SBATCH --output={}/{}-%a-%A.out", path_str(&logs)?, stage.name())?;
    }
    for a in &spec.sbatch_args {
        writeln!(s, "#SBATCH {a}")?;
    }
    writeln!(
        s,
        "# Written by `loracomp sweep submit --slurm --shards {}`: stage '{}'{}. Resubmit the shards with missing work\n\
         # with the same command and --resume; every shard resumes where it stopped.",
        spec.shards,
        stage.name(),
        if stage == Stage::Report { " (merges the shards into results.jsonl and report.md)" } else { ", one array task per shard" }
    )?;
    writeln!(s, "set -euo pipefail")?;
    writeln!(s, "cd {}", sh(path_str(&spec.workdir)?))?;
    let args: Vec<String> = stage_args(spec, stage, "@THREADS@")?.iter().map(|a| sh(a)).collect();
    let line =
        format!("exec {} {}", sh(path_str(&spec.bin)?), args.join(" ")).replace("@THREADS@", &format!("\"{threads}\""));
    writeln!(s, "{line}")?;
    Ok(s)
}

/// The Kubernetes Indexed Job of one stage (N completions, all in parallel; the report: one).
pub fn k8s_job(spec: &SubmitSpec, cfg: &SweepConfig, stage: Stage) -> Result<Value> {
    let n = if stage == Stage::Report { 1 } else { spec.shards };
    let threads = spec.threads.map_or("1".to_string(), |t| t.to_string());
    let mut command = vec![path_str(&spec.bin)?.to_string()];
    command.extend(stage_args(spec, stage, &threads)?);
    let root = path_str(&spec.volume_root)?;
    let volume = match &spec.pvc {
        Some(claim) => json!({"name": "shared", "persistentVolumeClaim": {"claimName": claim}}),
        None => json!({"name": "shared", "hostPath": {"path": root, "type": "Directory"}}),
    };
    let name = format!("loracomp-{}-{}", dns_label(&cfg.name, 40), stage.name());
    Ok(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "loracomp", "loracomp/stage": stage.name()}},
        "spec": {
            "completionMode": "Indexed",
            "completions": n,
            "parallelism": n,
            "backoffLimit": 3 * n,
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "loracomp", "loracomp/stage": stage.name()}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{
                        "name": "loracomp",
                        "image": spec.image,
                        "workingDir": path_str(&spec.workdir)?,
                        "command": command,
                        "env": [{"name": "LORACOMP_SHARDS", "value": spec.shards.to_string()}],
                        "volumeMounts": [{"name": "shared", "mountPath": root}],
                    }],
                    "volumes": [volume],
                }
            }
        }
    }))
}

/// YAML (block style) of a JSON value; strings are written double-quoted (JSON escapes are YAML's).
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => yaml_map(m, 0, &mut out),
        Value::Array(a) if !a.is_empty() => yaml_seq(a, 0, &mut out),
        _ => out = scalar(v) + "\n",
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        Value::String(s) => serde_json::to_string(s).unwrap_or_default(),
        other => other.to_string(),
    }
}

fn nested(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn yaml_map(m: &serde_json::Map<String, Value>, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for (k, v) in m {
        let key = if k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) {
            k.clone()
        } else {
            serde_json::to_string(k).unwrap_or_default()
        };
        match v {
            Value::Object(o) if !o.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                yaml_map(o, indent + 2, out);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push_str(&format!("{pad}{key}:\n"));
                yaml_seq(a, indent + 2, out);
            }
            _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(v))),
        }
    }
}

fn yaml_seq(a: &[Value], indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    for v in a {
        if nested(v) {
            let mut inner = String::new();
            match v {
                Value::Object(o) => yaml_map(o, indent + 2, &mut inner),
                Value::Array(x) => yaml_seq(x, indent + 2, &mut inner),
                _ => unreachable!(),
            }
            out.push_str(&pad);
            out.push_str("- ");
            out.push_str(&inner[indent + 2..]);
        } else {
            out.push_str(&format!("{pad}- {}\n", scalar(v)));
        }
    }
}

/// Every path the jobs read or write must be on the shared volume (Kubernetes): errors name the field.
fn check_on_volume(spec: &SubmitSpec, cfg: &SweepConfig) -> Result<()> {
    let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { spec.workdir.join(p) };
    for (field, p) in [
        ("--out", spec.out.clone()),
        ("working directory", spec.workdir.clone()),
        ("model", abs(&cfg.model)),
        ("data", abs(&cfg.data)),
    ] {
        if !p.starts_with(&spec.volume_root) {
            bail!(
                "field '{field}': {} is not under the shared volume {} (--volume-root): every pod must see it at the \
                 same path",
                p.display(),
                spec.volume_root.display()
            );
        }
    }
    Ok(())
}

/// Plan, write the scripts or manifests, print the cost, and (Slurm, not a dry run) submit.
pub fn submit(cfg: &SweepConfig, spec: &SubmitSpec) -> Result<Submitted> {
    if spec.shards == 0 {
        bail!("--shards must be at least 1");
    }
    let plan = Plan::new(cfg, &spec.out)?;
    let n = spec.shards;
    let done: HashSet<String> = collect_results(&spec.out)?.into_iter().map(|c| c.key).collect();
    // Every bank module and cell with its shard, estimated cost and state: DIR/<slurm|k8s>/plan.tsv.
    let mut table = String::from("stage\tshard\tkey\tcost\tdone\n");
    let mut bank = StageLoad::new(n);
    for (b, s) in plan.bank.iter().zip(plan.bank_shards(n)) {
        let trained = b.dir.join("metrics.json").exists();
        bank.items[s] += 1;
        bank.cost[s] += b.cost;
        if !trained {
            bank.todo[s] += 1;
            bank.todo_cost[s] += b.cost;
        }
        writeln!(table, "bank\t{s}\t{}\t{:.0}\t{trained}", b.name, b.cost)?;
    }
    let mut cells = StageLoad::new(n);
    for (c, s) in plan.cells.iter().zip(plan.cell_shards(n)) {
        let have = done.contains(&c.key);
        cells.items[s] += 1;
        cells.cost[s] += c.cost;
        if !have {
            cells.todo[s] += 1;
            cells.todo_cost[s] += c.cost;
        }
        writeln!(table, "cells\t{s}\t{}\t{:.0}\t{have}", c.key, c.cost)?;
    }
    let dir = spec.out.join(if spec.target == Target::Slurm { "slurm" } else { "k8s" });
    crate::util::write_atomic(&dir.join("plan.tsv"), table.as_bytes())?;
    let hours = |cost: f64| Hours(plan.cpu_seconds(cost) / 3600.0);
    let mut summary = String::new();
    let total_cells = plan.cells.len();
    let missing: usize = cells.todo.iter().sum();
    let bank_total: f64 = bank.cost.iter().sum();
    let cells_total: f64 = cells.cost.iter().sum();
    writeln!(
        summary,
        "sweep '{}': {} bank modules, {total_cells} cells ({missing} without a result), {n} shards",
        cfg.name,
        plan.bank.len()
    )?;
    writeln!(
        summary,
        "estimated CPU-hours: {} in all (bank {}, cells {}); still to run {}",
        hours(bank_total + cells_total),
        hours(bank_total),
        hours(cells_total),
        hours(bank.todo_cost.iter().sum::<f64>() + cells.todo_cost.iter().sum::<f64>())
    )?;
    writeln!(
        summary,
        "  (a rough estimate: {:.3}M parameters in matrix products, about {:.0} tokens an example, 6 flops per \
         parameter and token per training example, {:.0} GFLOP/s per core; the similarities of the report stage \
         not included)",
        plan.model_params / 1e6,
        plan.tokens,
        super::shard::FLOPS_PER_CORE / 1e9
    )?;
    writeln!(summary, "shard  bank modules (to run)  bank CPU-h  cells (to run)  cells CPU-h")?;
    for s in 0..n {
        writeln!(
            summary,
            "{s:>5}  {:>12} ({:>6})  {:>10}  {:>5} ({:>6})  {:>11}",
            bank.items[s],
            bank.todo[s],
            hours(bank.cost[s]),
            cells.items[s],
            cells.todo[s],
            hours(cells.cost[s])
        )?;
    }
    let bank_shards = bank.shards(spec.resume);
    let cell_shards = cells.shards(spec.resume);
    writeln!(summary, "every module and cell with its shard and cost: {}", dir.join("plan.tsv").display())?;
    let mut jobs = Vec::new();
    match spec.target {
        Target::Slurm => {
            let dir = spec.out.join("slurm");
            std::fs::create_dir_all(dir.join("logs")).with_context(|| format!("cannot create {}", dir.display()))?;
            let mut paths = Vec::new();
            for stage in Stage::ALL {
                let p = dir.join(format!("{}.sbatch", stage.name()));
                crate::util::write_atomic(&p, sbatch_script(spec, cfg, stage)?.as_bytes())?;
                paths.push(p);
            }
            let plan_line = |what: &str, shards: &[usize]| {
                if shards.is_empty() {
                    format!("{what}: nothing to run, not submitted\n")
                } else {
                    format!("{what}: array {}\n", array_spec(shards, n))
                }
            };
            summary += &plan_line("bank", &bank_shards);
            summary += &plan_line("cells", &cell_shards);
            writeln!(summary, "scripts: {}", dir.display())?;
            if spec.dry_run {
                writeln!(summary, "dry run: nothing submitted")?;
            } else {
                let mut after: Option<String> = None;
                for (stage, shards) in
                    [(Stage::Bank, &bank_shards), (Stage::Cells, &cell_shards), (Stage::Report, &vec![0])]
                {
                    if shards.is_empty() {
                        continue;
                    }
                    let mut args = vec!["--parsable".to_string()];
                    if stage != Stage::Report {
                        args.push(format!("--array={}", array_spec(shards, n)));
                    }
                    if let Some(id) = &after {
                        args.push(format!("--dependency=afterok:{id}"));
                        args.push("--kill-on-invalid-dep=yes".into());
                    }
                    args.push(path_str(&dir.join(format!("{}.sbatch", stage.name())))?.to_string());
                    let id = sbatch(&spec.sbatch, &args)?;
                    writeln!(summary, "submitted {} as job {id}", stage.name())?;
                    jobs.push((stage, id.clone()));
                    after = Some(id);
                }
                let record: Vec<Value> = jobs.iter().map(|(s, id)| json!({"stage": s.name(), "job": id})).collect();
                crate::util::write_atomic(&dir.join("jobs.json"), serde_json::to_string_pretty(&record)?.as_bytes())?;
            }
        }
        Target::K8s => {
            check_on_volume(spec, cfg)?;
            let dir = spec.out.join("k8s");
            let mut names = Vec::new();
            for stage in Stage::ALL {
                let p = dir.join(format!("{}.yaml", stage.name()));
                crate::util::write_atomic(&p, to_yaml(&k8s_job(spec, cfg, stage)?).as_bytes())?;
                names.push((stage, p));
            }
            writeln!(
                summary,
                "manifests: {} (Indexed Jobs; every index runs, an index with no work exits at once)",
                dir.display()
            )?;
            writeln!(summary, "apply them in order, each after the previous one completed:")?;
            for (stage, p) in &names {
                let job = format!("loracomp-{}-{}", dns_label(&cfg.name, 40), stage.name());
                writeln!(
                    summary,
                    "  kubectl apply -f {} && kubectl wait --for=condition=complete --timeout=-1s job/{job}",
                    p.display()
                )?;
            }
            if spec.dry_run {
                writeln!(summary, "dry run: nothing applied")?;
            }
        }
    }
    Ok(Submitted { summary, jobs })
}

/// Run `sbatch ARGS`; returns the job id (`--parsable` prints `ID` or `ID;CLUSTER`).
fn sbatch(program: &str, args: &[String]) -> Result<String> {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (is Slurm installed? --dry-run writes the scripts only)"))?;
    if !o.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    let text = String::from_utf8_lossy(&o.stdout);
    let id = text.trim().split(';').next().unwrap_or_default().to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit() || c == '_') {
        bail!("{program} printed no job id: '{}'", text.trim());
    }
    Ok(id)
}

/// The shard of each bank module and cell, for `--dry-run` output and tests: (bank, cells) per shard.
pub fn shard_sizes(plan: &Plan, n: usize) -> Vec<(usize, usize)> {
    let mut v = vec![(0, 0); n];
    for s in plan.bank_shards(n) {
        v[s].0 += 1;
    }
    for s in plan.cell_shards(n) {
        v[s].1 += 1;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_of_nested_values() {
        let v = json!({"a": 1, "b": {"c": "x y", "d": [1, 2]}, "e": [{"f": "g", "h": [{"i": true}]}], "z": []});
        let y = to_yaml(&v);
        assert_eq!(
            y,
            "a: 1\nb:\n  c: \"x y\"\n  d:\n    - 1\n    - 2\ne:\n  - f: \"g\"\n    h:\n      - i: true\nz: []\n"
        );
    }

    #[test]
    fn quoting_and_labels() {
        assert_eq!(sh("/a/b"), "/a/b");
        assert_eq!(sh("it's"), r"'it'\''s'");
        assert_eq!(dns_label("Label shift: CLINC (10)", 40), "label-shift-clinc-10");
        assert_eq!(dns_label("__", 40), "sweep");
        assert_eq!(array_spec(&[0, 1, 2], 3), "0-2");
        assert_eq!(array_spec(&[1, 2], 3), "1,2");
    }
}

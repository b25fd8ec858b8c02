//! Sharded sweeps (`--stage`, `--shard`) end with the same cells, bit for bit, as one process; every cell is
//! run by exactly one shard; a rerun duplicates nothing; the report names missing cells; stale cells (another
//! arithmetic) are set aside; `sweep submit` writes Slurm scripts chained with afterok and valid Kubernetes
//! Indexed Jobs.

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Output;

/// tests/fixtures/tiny-bert with a WordLevel tokenizer over w0…w94 (ids within its 99-token vocabulary).
pub fn tiny_model(root: &Path) -> PathBuf {
    let m = root.join("model");
    common::copy_dir(&common::fixture("tiny-bert"), &m);
    std::fs::copy(common::root().join("tests/slurm/tiny-tokenizer.json"), m.join("tokenizer.json")).unwrap();
    m
}

/// A two-class task: each class's examples hold one of its keywords among filler words.
fn task(dir: &Path, keys: [usize; 2], seed: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("labels.txt"), "a\nb\n").unwrap();
    for (s, split) in ["train", "valid", "test"].iter().enumerate() {
        let mut text = String::new();
        for i in 0..6 {
            for (label, k) in keys.iter().enumerate() {
                let f = |j: usize| 40 + (i * 7 + j * 3 + s * 11 + seed) % 50;
                let line = format!("w{} w{k} w{}", f(0), f(1));
                text += &serde_json::json!({"text": line, "label": (["a", "b"][label])}).to_string();
                text.push('\n');
            }
        }
        std::fs::write(dir.join(format!("{split}.jsonl")), text).unwrap();
    }
}

fn setup(tag: &str) -> (PathBuf, PathBuf) {
    let root = common::tmpdir(tag);
    let model = tiny_model(&root);
    task(&root.join("data/up1"), [1, 2], 0);
    task(&root.join("data/up2"), [3, 4], 1);
    task(&root.join("data/up3"), [5, 6], 2);
    task(&root.join("data/down"), [7, 8], 3);
    let cfg = root.join("sweep.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"name = "shard-test"
model = "{}"
data = "{}"
upstream = ["up1", "up2", "up3"]
downstream = ["down", "up3"]
exclude_self = true
shots = [1, 2]
seeds = 2
methods = ["linear-probe", "full", "lora", "uniform", "learned"]
[bank]
epochs = 1
rank = 2
alpha = 4
batch = 4
[adapt]
steps = 3
batch = 4
max_len = 16
[ablation]
shots = 1
draws = 1
"#,
            model.display(),
            root.join("data").display()
        ),
    )
    .unwrap();
    (root, cfg)
}

fn sweep(cfg: &Path, out: &Path, extra: &[&str]) -> Output {
    common::bin()
        .args(["--threads", "1", "sweep", "--quiet", "--config"])
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    o
}

/// The result fields of every line of `file` by key (timing left out); a duplicated key fails.
fn results(file: &Path) -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        v.as_object_mut().unwrap().remove("train_seconds");
        let key = v["key"].as_str().unwrap().to_string();
        assert!(m.insert(key.clone(), v).is_none(), "{}: cell {key} twice", file.display());
    }
    m
}

#[test]
fn shards_merge_to_the_single_process_results() {
    let (root, cfg) = setup("shard");
    let single = root.join("single");
    ok(sweep(&cfg, &single, &[]));
    let want = results(&single.join("results.jsonl"));
    // 2 tasks × 2 shots × 2 seeds × 5 methods, and the ablation (sizes 1, 2 of 2 modules × 2 methods, per task)
    assert_eq!(want.len(), 40 + 10, "{:?}", want.keys());
    assert!(want.keys().all(|k| k.split('|').count() == 6), "keys carry the stamp: {:?}", want.keys());

    let out = root.join("sharded");
    for i in 0..3 {
        ok(sweep(&cfg, &out, &["--stage", "bank", "--shard", &format!("{i}/3")]));
    }
    // the bank is split: each module trained once, by one shard (the shards' locks are their own files)
    assert_eq!(std::fs::read_dir(out.join("bank")).unwrap().count(), 3);
    // shard 1 through the environment, as in a Slurm array
    let o = ok(common::bin()
        .args(["--threads", "1", "sweep", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .args(["--stage", "cells", "--shard", "env", "--shards", "3"])
        .env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "1")
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&o.stdout).contains("shard 1/3"), "{}", String::from_utf8_lossy(&o.stdout));
    // a report with shards 0 and 2 missing says which cells are missing
    let o = ok(sweep(&cfg, &out, &["--stage", "report"]));
    assert!(String::from_utf8_lossy(&o.stderr).contains("planned cells have no result"));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("**Missing:**"), "{report}");
    for i in [0, 2] {
        ok(sweep(&cfg, &out, &["--stage", "cells", "--shard", &format!("{i}/3")]));
    }
    // a shard another process runs is refused (this test holds its lock), naming the lock file
    let held = std::fs::File::open(out.join("shards/cells-0-of-3.lock")).unwrap();
    held.lock().unwrap();
    let o = sweep(&cfg, &out, &["--stage", "cells", "--shard", "0/3"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cells-0-of-3.lock") && err.contains("another process"), "{err}");
    drop(held);
    // a rerun of a finished shard runs and duplicates nothing
    let before = std::fs::read_to_string(out.join("shards/cells-2-of-3.jsonl")).unwrap();
    ok(sweep(&cfg, &out, &["--stage", "cells", "--shard", "2/3"]));
    assert_eq!(std::fs::read_to_string(out.join("shards/cells-2-of-3.jsonl")).unwrap(), before);
    let mut keys = BTreeSet::new();
    let mut sizes = Vec::new();
    for i in 0..3 {
        let r = results(&out.join(format!("shards/cells-{i}-of-3.jsonl")));
        sizes.push(r.len());
        for k in r.keys() {
            assert!(keys.insert(k.clone()), "{k} run by two shards");
        }
    }
    assert_eq!(keys.len(), want.len());
    assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");
    ok(sweep(&cfg, &out, &["--stage", "report"]));
    let first = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(results(&out.join("results.jsonl")), want, "merged shards differ from one process");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(!report.contains("Missing") && !report.contains("Partial"), "{report}");
    // the merge is idempotent
    ok(sweep(&cfg, &out, &["--stage", "report"]));
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap(), first);

    // another arithmetic is another experiment: nothing is reused, the old cells are set aside
    let o = ok(common::bin()
        .args(["--threads", "1", "--compute", "bf16", "sweep", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .args(["--stage", "report"])
        .output()
        .unwrap());
    if loracomp::engine::bf16::available() {
        assert!(String::from_utf8_lossy(&o.stderr).contains(&format!("{} planned cells have no result", want.len())));
        assert!(results(&out.join("results.jsonl")).is_empty());
        assert_eq!(results(&out.join("stale-results.jsonl")).len(), want.len());
    }

    // bad shard specifications name the flag
    for (args, what) in [
        (vec!["--shard", "3/3"], "--shard"),
        (vec!["--shard", "x"], "--shard"),
        (vec!["--shard", "env"], "SLURM_ARRAY_TASK_ID"),
        (vec!["--shards", "2"], "--shards"),
    ] {
        let o = sweep(&cfg, &out, &args);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(what), "{args:?}: {err}");
    }
}

#[test]
fn submit_writes_chained_slurm_arrays_and_indexed_jobs() {
    let (root, cfg) = setup("submit");
    let out = root.join("out");
    let submit = |extra: &[&str]| {
        common::bin()
            .current_dir(&root)
            .args(["sweep", "submit", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = ok(submit(&["--slurm", "--shards", "3", "--dry-run", "--sbatch-arg=--partition=cpu"]));
    let table = std::fs::read_to_string(out.join("slurm/plan.tsv")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("cells\t")).count(), 50);
    assert_eq!(table.lines().filter(|l| l.starts_with("bank\t")).count(), 3);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("50 cells") && text.contains("estimated CPU-hours") && text.contains("nothing submitted"),
        "{text}"
    );
    let bank = std::fs::read_to_string(out.join("slurm/bank.sbatch")).unwrap();
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_loracomp")).unwrap();
    assert!(bank.contains(exe.to_str().unwrap()), "the scripts call this binary: {bank}");
    assert!(bank.contains("#SBATCH --array=0-2") && bank.contains("#SBATCH --partition=cpu"), "{bank}");
    assert!(bank.contains("--stage bank --shard env --shards 3"), "{bank}");
    let report = std::fs::read_to_string(out.join("slurm/report.sbatch")).unwrap();
    assert!(report.contains("--stage report") && !report.contains("--array"), "{report}");

    // a stand-in sbatch records its arguments and prints job ids
    let log = root.join("sbatch.log");
    let fake = root.join("sbatch");
    std::fs::write(
        &fake,
        format!("#!/bin/bash\necho \"$*\" >> {}\necho $((100 + $(wc -l < {}) ))\n", log.display(), log.display()),
    )
    .unwrap();
    std::process::Command::new("chmod").arg("+x").arg(&fake).status().unwrap();
    let o = ok(common::bin()
        .current_dir(&root)
        .env("LORACOMP_SBATCH", &fake)
        .args(["sweep", "submit", "--slurm", "--shards", "3", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    let calls = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls[0].starts_with("--parsable --array=0-2 ") && calls[0].ends_with("bank.sbatch"), "{calls:?}");
    assert!(calls[1].contains("--array=0-2 --dependency=afterok:101 --kill-on-invalid-dep=yes"), "{calls:?}");
    assert!(calls[2].contains("--dependency=afterok:102") && !calls[2].contains("--array"), "{calls:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("submitted report as job 103"));

    // --resume submits only shards with missing work: train the bank and run shard 1's cells first
    for i in 0..3 {
        ok(sweep(&cfg, &out, &["--stage", "bank", "--shard", &format!("{i}/3")]));
    }
    ok(sweep(&cfg, &out, &["--stage", "cells", "--shard", "1/3"]));
    std::fs::remove_file(&log).unwrap();
    ok(common::bin()
        .current_dir(&root)
        .env("LORACOMP_SBATCH", &fake)
        .args(["sweep", "submit", "--slurm", "--shards", "3", "--resume", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap());
    let calls = std::fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = calls.lines().collect();
    assert_eq!(calls.len(), 2, "no bank job, cells 0 and 2, the report: {calls:?}");
    assert!(calls[0].contains("--array=0,2 ") && !calls[0].contains("dependency"), "{calls:?}");
    assert!(calls[1].contains("--dependency=afterok:101"), "{calls:?}");

    // Kubernetes: Indexed Jobs, checked against the batch/v1 Job schema without a cluster
    let o = ok(submit(&["--k8s", "--shards", "3", "--dry-run", "--pvc", "sweeps"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("nothing applied"));
    let files: Vec<PathBuf> = ["bank", "cells", "report"].iter().map(|s| out.join(format!("k8s/{s}.yaml"))).collect();
    let cells = std::fs::read_to_string(&files[1]).unwrap();
    assert!(
        cells.contains("completionMode: \"Indexed\"")
            && cells.contains("completions: 3")
            && cells.contains("parallelism: 3")
    );
    assert!(cells.contains("claimName: \"sweeps\"") && cells.contains("image: \"loracomp:latest\""), "{cells}");
    let check = common::root().join("tests/k8s/validate_jobs.py");
    let v = std::process::Command::new("python3").arg(&check).args(&files).output();
    match v {
        Ok(v) if v.status.code() == Some(0) => {}
        Ok(v) if v.status.code() == Some(3) => {
            eprintln!("k8s schema check skipped: {}", String::from_utf8_lossy(&v.stderr))
        }
        Ok(v) => panic!("{}{}", String::from_utf8_lossy(&v.stdout), String::from_utf8_lossy(&v.stderr)),
        Err(e) => eprintln!("k8s schema check skipped: no python3 ({e})"),
    }
    // a path outside the shared volume is refused, naming the field
    let o = submit(&["--k8s", "--shards", "2", "--dry-run", "--volume-root", "/nonexistent-volume"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--volume-root"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A cells shard killed (SIGKILL) at arbitrary moments and run again ends with the cells of an uninterrupted
/// run, none twice in its file (a torn last line is cut off by the shard itself, never by the report).
#[test]
fn killed_shard_resumes_without_duplicates() {
    let (root, cfg) = setup("shard-kill");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("steps = 3", "steps = 200").replace(
        "methods = [\"linear-probe\", \"full\", \"lora\", \"uniform\", \"learned\"]",
        "methods = [\"lora\", \"learned\"]",
    );
    let text = &text[..text.find("[ablation]").unwrap()];
    std::fs::write(&cfg, text).unwrap();
    let single = root.join("single");
    ok(sweep(&cfg, &single, &[]));
    let want = results(&single.join("results.jsonl"));
    let out = root.join("killed");
    ok(sweep(&cfg, &out, &["--stage", "bank"]));
    let file = out.join("shards/cells-0-of-2.jsonl");
    let mut kills = 0;
    // Each run is killed right after it appends a cell (or, for a first run, as soon as it has started one):
    // a fixed delay would let a shard on a loaded machine finish before any kill.
    for round in 0..5u64 {
        let before = std::fs::metadata(&file).map_or(0, |m| m.len());
        let mut child = common::bin()
            .args(["--threads", "1", "sweep", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .args(["--stage", "cells", "--shard", "0/2"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let limit = std::time::Duration::from_secs(120);
        while child.try_wait().unwrap().is_none()
            && std::fs::metadata(&file).map_or(0, |m| m.len()) == before
            && t0.elapsed() < limit
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // a little into the next cell, at a different point each round
        std::thread::sleep(std::time::Duration::from_millis(20 * round));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        // the report may run at any time: it reads the shard file without cutting it
        ok(sweep(&cfg, &out, &["--stage", "report"]));
    }
    assert!(kills > 0, "the shard finished before any kill; the test proves nothing");
    for i in 0..2 {
        ok(sweep(&cfg, &out, &["--stage", "cells", "--shard", &format!("{i}/2")]));
    }
    ok(sweep(&cfg, &out, &["--stage", "report"]));
    results(&file); // fails on a cell twice
    assert_eq!(results(&out.join("results.jsonl")), want, "resumed shards differ from one process");
}

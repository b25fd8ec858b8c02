//! A sweep killed with SIGKILL at arbitrary moments and resumed ends with the same results as an uninterrupted
//! run, with no cell duplicated; a different config in the same directory is refused without --force.

use crate::common;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn write_task(dir: &Path, words: &[(&str, [&str; 4])]) {
    std::fs::create_dir_all(dir).unwrap();
    let labels: Vec<&str> = words.iter().map(|w| w.0).collect();
    std::fs::write(dir.join("labels.txt"), labels.join("\n") + "\n").unwrap();
    for split in ["train", "valid", "test"] {
        let mut s = String::new();
        for (label, texts) in words {
            for t in texts {
                s += &serde_json::json!({"text": format!("{t} ({split})"), "label": label}).to_string();
                s.push('\n');
            }
        }
        std::fs::write(dir.join(format!("{split}.jsonl")), s).unwrap();
    }
}

fn config(root: &Path, steps: usize) -> String {
    format!(
        r#"name = "resume-test"
model = "{}"
data = "{}"
upstream = ["up1", "up2"]
downstream = ["down"]
shots = [1, 2]
seeds = 2
methods = ["linear-probe", "uniform", "learned", "lora"]
[bank]
epochs = 1
rank = 2
alpha = 4
[adapt]
steps = {steps}
[ablation]
shots = 1
draws = 2
"#,
        common::minilm_dir().display(),
        root.join("data").display()
    )
}

fn results(dir: &Path) -> BTreeMap<String, (f64, f64)> {
    let text = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = v["key"].as_str().unwrap().to_string();
        let prev = m.insert(key.clone(), (v["accuracy"].as_f64().unwrap(), v["macro_f1"].as_f64().unwrap()));
        assert!(prev.is_none(), "cell {key} duplicated");
    }
    m
}

#[test]
fn killed_sweep_resumes_to_the_same_results() {
    let root = common::tmpdir("sweep");
    write_task(
        &root.join("data/up1"),
        &[
            ("a", ["red apple", "green pear", "ripe plum", "sweet fig"]),
            ("b", ["fast car", "old bus", "red truck", "new bike"]),
        ],
    );
    write_task(
        &root.join("data/up2"),
        &[
            ("x", ["cold snow", "heavy rain", "warm sun", "thick fog"]),
            ("y", ["loud drum", "soft flute", "sad violin", "bright horn"]),
        ],
    );
    write_task(
        &root.join("data/down"),
        &[
            ("p", ["a small cat", "the big dog", "one brown cow", "two white goats"]),
            ("q", ["blue sky", "dark night", "grey cloud", "clear dawn"]),
        ],
    );
    let cfg = root.join("sweep.toml");
    std::fs::write(&cfg, config(&root, 3)).unwrap();
    let run = |out: &Path| {
        common::bin()
            .args(["--threads", "2", "sweep", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };

    let clean = root.join("clean");
    let o = run(&clean);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = results(&clean);
    assert!(want.len() >= 2 * 2 * 4, "{} cells", want.len());

    let killed = root.join("killed");
    let mut kills = 0;
    for delay_ms in [700u64, 1300, 1900, 2600, 400, 3300] {
        let mut child = common::bin()
            .args(["--threads", "2", "sweep", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&killed)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    // A lock left by a killed process (a pid that does not run) is taken over.
    std::fs::write(killed.join(".sweep.lock"), "4194303").unwrap();
    let o = run(&killed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!killed.join(".sweep.lock").exists(), "the lock is removed when the sweep ends");
    assert!(kills > 0, "the sweep finished before any kill; the test proves nothing");
    assert_eq!(results(&killed), want, "resumed results differ from the uninterrupted run");
    for f in ["report.md", "manifest.json", "accuracy_vs_shots.png", "accuracy_vs_shots.svg", "modules_ablation.png"] {
        assert!(killed.join(f).exists(), "{f}");
    }

    // a directory another running sweep holds is refused (this test's own process stands in for it)
    let busy = root.join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join(".sweep.lock"), std::process::id().to_string()).unwrap();
    let o = run(&busy);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("another sweep"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!busy.join("results.jsonl").exists());

    // another config in the same directory is refused
    std::fs::write(&cfg, config(&root, 4)).unwrap();
    let o = run(&killed);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

/// `--tasks` runs one downstream task's cells; a later run without it adds the others and keeps the first
/// task's results; an unknown name is refused before anything is written.
#[test]
fn tasks_filter_runs_a_share_and_the_rest_resumes() {
    let root = common::tmpdir("sweep-tasks");
    for (name, a, b) in [("up1", "fruit", "vehicle"), ("up2", "weather", "music"), ("down", "animal", "sky")] {
        write_task(
            &root.join("data").join(name),
            &[
                (a, ["one red thing", "a green one", "the ripe kind", "some sweet ones"]),
                (b, ["x y", "y z", "z w", "w x"]),
            ],
        );
    }
    let text = config(&root, 2)
        .replace("downstream = [\"down\"]", "downstream = [\"down\", \"up2\"]\nexclude_self = true")
        .replace(
            "methods = [\"linear-probe\", \"uniform\", \"learned\", \"lora\"]",
            "methods = [\"uniform\", \"learned\"]",
        )
        .replace("[ablation]\nshots = 1\ndraws = 2\n", "");
    let cfg = root.join("sweep.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = root.join("out");
    let run = |extra: &[&str]| {
        common::bin()
            .args(["--threads", "2", "sweep", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--tasks", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--tasks") && err.contains("'nope'") && err.contains("down, up2"), "{err}");
    assert!(!out.exists(), "a refused filter leaves no output");

    let o = run(&["--tasks", "down"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let first = results(&out);
    assert_eq!(first.len(), 2 * 2 * 2, "{:?}", first.keys());
    assert!(first.keys().all(|k| k.contains("|down|")), "{:?}", first.keys());
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("**Partial:** 8 of the 16 cells"), "{report}");
    assert!(report.contains("## Average over the downstream tasks with results (down)"), "{report}");

    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let all = results(&out);
    assert_eq!(all.len(), 2 * 2 * 2 * 2);
    for (k, v) in &first {
        assert_eq!(all.get(k), Some(v), "{k}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(!report.contains("Partial") && report.contains("## Average over downstream tasks"), "{report}");
    assert!(!report.contains("modules_ablation"), "no ablation configured, none listed: {report}");
}

/// f32 and bf16 cells never mix in one directory (each cell records its arithmetic; manifest.json too), and a
/// sweep that fails before any result leaves neither its config.toml nor the directory behind.
#[test]
fn compute_modes_do_not_mix_and_a_failed_sweep_leaves_nothing() {
    let root = common::tmpdir("sweep-compute");
    for (name, a, b) in [("up1", "fruit", "vehicle"), ("up2", "weather", "music"), ("down", "animal", "sky")] {
        write_task(
            &root.join("data").join(name),
            &[
                (a, ["one red thing", "a green one", "the ripe kind", "some sweet ones"]),
                (b, ["x y", "y z", "z w", "w x"]),
            ],
        );
    }
    let text = config(&root, 1)
        .replace("methods = [\"linear-probe\", \"uniform\", \"learned\", \"lora\"]", "methods = [\"linear-probe\"]")
        .replace("shots = [1, 2]", "shots = [1]")
        .replace("seeds = 2", "seeds = 1")
        .replace("[ablation]\nshots = 1\ndraws = 2\n", "");
    let cfg = root.join("sweep.toml");
    std::fs::write(&cfg, &text).unwrap();
    let out = root.join("out");
    let run = || {
        common::bin()
            .args(["--threads", "2", "sweep", "--quiet", "--config"])
            .arg(&cfg)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap()
    };
    // a bank task whose validation split is bad: the sweep fails while training the bank
    std::fs::write(root.join("data/up1/valid.jsonl"), "{\"text\": \"x\", \"label\": \"nope\"}\n").unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("valid.jsonl:1") && err.contains("'nope'"), "{err}");
    assert!(!out.join("config.toml").exists(), "config.toml of a failed sweep left behind");
    assert!(!out.exists(), "a failed sweep left {:?}", std::fs::read_dir(&out).map(|d| d.count()));
    write_task(
        &root.join("data/up1"),
        &[("fruit", ["one red thing", "a green one", "the ripe kind", "some sweet ones"]), ("vehicle", ["x y"; 4])],
    );

    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let mode = manifest["compute"].as_str().unwrap().to_string();
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["compute"], mode.as_str(), "{l}");
    }
    // Cells of the other arithmetic are another experiment: their keys carry the mode, so a run in one mode
    // never counts the other's as done, and the report stage sets them aside
    // (`sweep_shard::shards_merge_to_the_single_process_results` runs it with --compute bf16).
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["key"].as_str().unwrap().contains('|'), "{l}");
    }
}

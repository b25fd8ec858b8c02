//! Thread count does not change results: `adapt` under RAYON_NUM_THREADS=1 and 2 (and `--threads 3`) gives
//! bit-identical metrics and exported adapters, because every reduction runs in fixed-size chunks summed in order
//! (ARCHITECTURE.md, Invariants; docs/reliability.md, Determinism).

use crate::common;
use serde_json::Value;
use std::path::Path;

fn task(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("labels.txt"), "animal\nfood\nweather\n").unwrap();
    let rows = [
        ("animal", ["the cat sleeps", "a dog barks loudly", "horses run in the field", "my parrot talks"]),
        ("food", ["pizza with cheese", "i love fresh bread", "pasta for dinner", "a bowl of soup"]),
        ("weather", ["it will rain today", "sunny skies ahead", "a cold snowy night", "strong winds tomorrow"]),
    ];
    for (split, range) in [("train", 0..3), ("valid", 3..4), ("test", 2..4)] {
        let mut s = String::new();
        for (label, texts) in &rows {
            for t in &texts[range.clone()] {
                s += &serde_json::json!({"text": t, "label": label}).to_string();
                s.push('\n');
            }
        }
        std::fs::write(dir.join(format!("{split}.jsonl")), s).unwrap();
    }
}

/// Run `args` with RAYON_NUM_THREADS=`threads`; return metrics.json without the timing and every file of the
/// exported adapter, byte for byte.
fn run(args: &[&str], threads: &str, out: &Path) -> (Value, Vec<(String, Vec<u8>)>) {
    let o = common::bin().env("RAYON_NUM_THREADS", threads).args(args).arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let mut m: Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("train_seconds");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(out.join("adapter"))
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
        .collect();
    files.sort();
    (m, files)
}

#[test]
fn adapt_is_bit_identical_across_thread_counts() {
    let model = common::minilm_dir();
    let m = model.to_str().unwrap();
    let d = common::tmpdir("determinism");
    task(&d.join("up"));
    task(&d.join("down"));
    let up = d.join("up-adapter");
    let o = common::bin()
        .args(["train", "--model", m, "--task", d.join("up").to_str().unwrap(), "--steps", "3", "--rank", "4"])
        .args(["--out", up.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let down = d.join("down");
    for method in ["learned", "lora", "full"] {
        let mut args = vec!["adapt", "--model", m, "--task", down.to_str().unwrap(), "--shots", "3", "--seed", "4"];
        args.extend(["--steps", "4", "--batch", "8", "--method", method]);
        if method == "learned" {
            args.extend(["--bank", up.to_str().unwrap()]);
        }
        let (m1, f1) = run(&args, "1", &d.join(format!("{method}-t1")));
        let (m2, f2) = run(&args, "2", &d.join(format!("{method}-t2")));
        for k in ["accuracy", "macro_f1", "final_loss", "module_weights", "export_relative_error"] {
            assert_eq!(m1[k], m2[k], "{method}: '{k}' differs between 1 and 2 threads");
        }
        assert_eq!(m1, m2, "{method}: metrics.json differs between 1 and 2 threads");
        assert!(f1 == f2, "{method}: exported adapter files differ between 1 and 2 threads");
        let mut a3 = vec!["--threads", "3"];
        a3.extend(&args);
        let (m3, f3) = run(&a3, "1", &d.join(format!("{method}-t3")));
        assert_eq!(m1, m3, "{method}: metrics.json differs between 1 and 3 threads");
        assert!(f1 == f3, "{method}: exported adapter files differ between 1 and 3 threads");
    }
}

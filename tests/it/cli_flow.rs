//! End to end through the CLI on the real MiniLM: train an upstream adapter, adapt with learned composition,
//! and evaluate the exported adapter: it must reproduce the adapted model's test accuracy exactly.

use crate::common;
use serde_json::Value;
use std::path::Path;

fn write_task(dir: &Path, seed: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("labels.txt"), "animal\nfood\nweather\n").unwrap();
    let words = [
        (
            "animal",
            [
                "the cat sleeps",
                "a dog barks loudly",
                "horses run in the field",
                "my parrot talks",
                "the cow eats grass",
            ],
        ),
        ("food", ["pizza with cheese", "i love fresh bread", "pasta for dinner", "a bowl of soup", "sweet apple pie"]),
        (
            "weather",
            ["it will rain today", "sunny skies ahead", "a cold snowy night", "strong winds tomorrow", "hot and humid"],
        ),
    ];
    for (split, range) in [("train", 0..4), ("valid", 4..5), ("test", 3..5)] {
        let mut s = String::new();
        for (label, texts) in &words {
            for t in &texts[range.clone()] {
                s += &serde_json::json!({"text": format!("{t} {seed}"), "label": label}).to_string();
                s.push('\n');
            }
        }
        std::fs::write(dir.join(format!("{split}.jsonl")), s).unwrap();
    }
}

fn run(args: &[&str]) -> Value {
    let out = common::bin().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn train_adapt_eval_round_trip() {
    let model = common::minilm_dir();
    let m = model.to_str().unwrap();
    let d = common::tmpdir("cli");
    write_task(&d.join("up"), 1);
    write_task(&d.join("down"), 2);
    let up = d.join("bank/up");
    let t = run(&[
        "train",
        "--model",
        m,
        "--task",
        d.join("up").to_str().unwrap(),
        "--out",
        up.to_str().unwrap(),
        "--steps",
        "4",
        "--rank",
        "4",
    ]);
    assert!(t["accuracy"].as_f64().unwrap() >= 0.0);
    for f in ["adapter_config.json", "adapter_model.safetensors", "loracomp.json", "metrics.json"] {
        assert!(up.join(f).exists(), "{f}");
    }
    for method in ["learned", "lora"] {
        let out = d.join(format!("adapt-{method}"));
        let down = d.join("down");
        let mut args = vec!["adapt", "--model", m, "--task", down.to_str().unwrap(), "--shots", "2", "--seed", "3"];
        args.extend(["--method", method, "--out", out.to_str().unwrap(), "--steps", "6"]);
        if method == "learned" {
            args.extend(["--bank", up.to_str().unwrap()]);
        }
        let a = run(&args);
        assert_eq!(a["method"], method);
        let e = run(&[
            "eval",
            "--model",
            m,
            "--task",
            d.join("down").to_str().unwrap(),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
        ]);
        assert_eq!(e["accuracy"], a["accuracy"], "{method}: exported adapter vs adapted model");
        assert_eq!(e["macro_f1"], a["macro_f1"]);
        // refusing to overwrite results
        let again = common::bin()
            .args([
                "adapt",
                "--model",
                m,
                "--task",
                d.join("down").to_str().unwrap(),
                "--shots",
                "2",
                "--method",
                method,
            ])
            .args(["--bank", up.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(again.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    }
    // the same seed and thread count give bit-identical results
    let rerun = |out: &str| {
        run(&[
            "--threads",
            "2",
            "adapt",
            "--model",
            m,
            "--task",
            d.join("down").to_str().unwrap(),
            "--shots",
            "2",
            "--seed",
            "5",
            "--method",
            "learned",
            "--bank",
            up.to_str().unwrap(),
            "--out",
            d.join(out).to_str().unwrap(),
            "--steps",
            "5",
        ])
    };
    let (r1, r2) = (rerun("det1"), rerun("det2"));
    for k in ["accuracy", "macro_f1", "final_loss", "module_weights"] {
        assert_eq!(r1[k], r2[k], "{k} differs between identical runs");
    }
    // an adapter made for another base model is refused unless --allow-base-mismatch
    let cfgp = up.join("adapter_config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&cfgp).unwrap()).unwrap();
    v["base_model_name_or_path"] = "bert-base-uncased".into();
    std::fs::write(&cfgp, v.to_string()).unwrap();
    let args = |out: &str| {
        vec![
            "adapt".to_string(),
            "--model".into(),
            m.into(),
            "--task".into(),
            d.join("down").display().to_string(),
            "--shots".into(),
            "2".into(),
            "--method".into(),
            "uniform".into(),
            "--bank".into(),
            up.display().to_string(),
            "--out".into(),
            d.join(out).display().to_string(),
            "--steps".into(),
            "2".into(),
        ]
    };
    let o = common::bin().args(args("mismatch")).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("base_model_name_or_path")
            && err.contains("bert-base-uncased")
            && err.contains("adapter_config.json"),
        "{err}"
    );
    assert!(!d.join("mismatch").exists(), "no output left behind");
    let o = common::bin().args(args("mismatch")).arg("--allow-base-mismatch").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // a label missing from labels.txt is named with file and line
    std::fs::write(d.join("down/test.jsonl"), "{\"text\": \"x\", \"label\": \"plants\"}\n").unwrap();
    let out = common::bin()
        .args(["eval", "--model", m, "--task", d.join("down").to_str().unwrap(), "--adapter"])
        .arg(d.join("adapt-lora/adapter"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("test.jsonl:1") && err.contains("plants") && err.contains("label"), "{err}");
}

//! Bad inputs around adaptation: each ends in a clear error naming the file and field (or the step), exit 1,
//! no panic and no output left behind.

use crate::common;
use std::path::Path;

fn task(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("labels.txt"), "neg\npos\n").unwrap();
    let rows = "{\"text\": \"great film\", \"label\": \"pos\"}\n{\"text\": \"awful plot\", \"label\": \"neg\"}\n\
                {\"text\": \"loved it\", \"label\": \"pos\"}\n{\"text\": \"boring\", \"label\": \"neg\"}\n";
    for s in ["train", "valid", "test"] {
        std::fs::write(dir.join(format!("{s}.jsonl")), rows).unwrap();
    }
}

fn fails(args: &[&str], needles: &[&str]) {
    let o = common::bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    // 1 for loracomp's own errors, 2 for command-line usage errors (clap); a panic would be 101
    assert!(matches!(o.status.code(), Some(1) | Some(2)), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: '{n}' not in: {err}");
    }
}

#[test]
fn divergence_empty_split_bad_json_and_bad_adapters() {
    let m = common::minilm_dir();
    let m = m.to_str().unwrap();
    let d = common::tmpdir("badadapt");
    let t = d.join("task");
    task(&t);
    let ts = t.to_str().unwrap();
    // training that diverges stops and names the step
    let out = d.join("div");
    fails(
        &[
            "adapt",
            "--model",
            m,
            "--task",
            ts,
            "--shots",
            "2",
            "--method",
            "lora",
            "--lr",
            "1e30",
            "--lr-head",
            "1e30",
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "5",
        ],
        &["diverged at step"],
    );
    assert!(!out.join("metrics.json").exists());
    // composition methods need a bank
    fails(
        &[
            "adapt",
            "--model",
            m,
            "--task",
            ts,
            "--shots",
            "1",
            "--method",
            "learned",
            "--out",
            d.join("nb").to_str().unwrap(),
        ],
        &["needs a bank"],
    );
    // unknown method lists the known ones
    fails(
        &["adapt", "--model", m, "--task", ts, "--shots", "1", "--method", "magic", "--out", "x"],
        &["unknown method", "lorahub"],
    );
    // malformed JSON line and empty split
    let t2 = d.join("task2");
    task(&t2);
    std::fs::write(t2.join("train.jsonl"), "{\"text\": \"ok\", \"label\": \"pos\"}\n{\"text\": 3}\n").unwrap();
    fails(
        &[
            "adapt",
            "--model",
            m,
            "--task",
            t2.to_str().unwrap(),
            "--shots",
            "1",
            "--method",
            "linear-probe",
            "--out",
            d.join("o2").to_str().unwrap(),
        ],
        &["train.jsonl:2", "'text'"],
    );
    std::fs::write(t2.join("train.jsonl"), "\n").unwrap();
    fails(
        &[
            "adapt",
            "--model",
            m,
            "--task",
            t2.to_str().unwrap(),
            "--shots",
            "1",
            "--method",
            "linear-probe",
            "--out",
            d.join("o3").to_str().unwrap(),
        ],
        &["train.jsonl", "empty"],
    );
    // an adapter with NaN weights, a truncated one, an unsupported dtype
    let ok = d.join("ok");
    let o = common::bin()
        .args(["train", "--model", m, "--task", ts, "--out", ok.to_str().unwrap(), "--steps", "2", "--rank", "2"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let st = ok.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for (name, data) in [
        ("truncated", bytes[..bytes.len() - 10].to_vec()),
        ("nan", {
            let mut b = bytes.clone();
            let n = b.len();
            b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
            b
        }),
    ] {
        let bad = d.join(name);
        common::copy_dir(&ok, &bad);
        std::fs::write(bad.join("adapter_model.safetensors"), data).unwrap();
        let needle = if name == "nan" { "NaN" } else { "not a valid safetensors" };
        fails(
            &[
                "adapt",
                "--model",
                m,
                "--task",
                ts,
                "--shots",
                "1",
                "--method",
                "uniform",
                "--bank",
                bad.to_str().unwrap(),
                "--out",
                d.join(format!("o-{name}")).to_str().unwrap(),
            ],
            &["adapter_model.safetensors", needle],
        );
    }
    // a target module the model lacks (layer 9 of a 6-layer model)
    let far = d.join("far");
    common::copy_dir(&ok, &far);
    let tf = loracomp::engine::weights::TensorFile::open(&far.join("adapter_model.safetensors")).unwrap();
    let renamed = tf.tensors.into_iter().map(|(k, v)| (k.replace("layer.0.", "layer.9."), v)).collect();
    loracomp::engine::weights::write_safetensors(&far.join("adapter_model.safetensors"), &renamed, None).unwrap();
    fails(
        &[
            "adapt",
            "--model",
            m,
            "--task",
            ts,
            "--shots",
            "1",
            "--method",
            "uniform",
            "--bank",
            far.to_str().unwrap(),
            "--out",
            d.join("o-far").to_str().unwrap(),
        ],
        &["encoder.layer.9", "does not have"],
    );
}

//! `loracomp forward` against the Python goldens, and its bad-input errors.

use serde_json::Value;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loracomp"))
}

fn fixture(p: &str) -> String {
    format!("{}/tests/fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn forward_bert_matches_transformers() {
    let out = bin()
        .args(["forward", "--model", &fixture("tiny-bert"), "--input", &fixture("tiny-bert/golden.json")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let gold: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-bert/golden.json")).unwrap()).unwrap();
    let g = &gold["last_hidden_state"];
    assert_eq!(got["shape"], g["shape"]);
    let (a, b) = (got["data"].as_array().unwrap(), g["data"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max);
    assert!(max <= 1e-4, "max abs diff {max}");
}

#[test]
fn forward_bad_inputs_name_the_field() {
    let dir = std::env::temp_dir().join(format!("loracomp-fwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (r#"{"attention_mask": [[1, 1]]}"#, "field 'input_ids' is missing"),
        (r#"{"input_ids": [[1, 2], [3]]}"#, "row 1 has 1 entries"),
        (r#"{"input_ids": [[1, 99999]]}"#, "outside the vocabulary"),
        (r#"{"input_ids": [[1, 2]], "attention_mask": [[1]]}"#, "field 'attention_mask' is [1, 1]"),
        (r#"[1, 2]"#, "expected one JSON object"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = dir.join(format!("in{i}.json"));
        std::fs::write(&p, text).unwrap();
        let out = bin().args(["forward", "--model", &fixture("tiny-bert"), "--input"]).arg(&p).output().unwrap();
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: '{err}' lacks '{want}'");
        assert!(err.contains(&format!("in{i}.json")), "case {i}: error does not name the file: {err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn fails_with(model: &str, input: &str, tag: &str, needles: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("loracomp-fwd-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("in.json");
    std::fs::write(&p, input).unwrap();
    let out = bin().args(["forward", "--model", model, "--input"]).arg(&p).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "a panic or abort is not an error: {err}");
    assert!(out.stdout.is_empty(), "no output computed on NaN");
    for n in needles {
        assert!(err.contains(n), "'{n}' not in: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
    err
}

/// Finite weights whose products overflow f32 give NaN/Inf outputs; `forward` used to print them with exit 0.
#[test]
fn overflowing_weights_fail_forward_naming_the_layer() {
    let d = std::env::temp_dir().join(format!("loracomp-fwd-overflow-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("tiny-bert/{f}")), d.join(f)).unwrap();
    }
    let p = d.join("model.safetensors");
    let mut tf = loracomp::engine::weights::TensorFile::open(&p).unwrap();
    for key in ["encoder.layer.1.intermediate.dense.weight", "encoder.layer.1.output.dense.weight"] {
        tf.tensors.get_mut(key).unwrap().1.iter_mut().for_each(|v| *v *= 1e30);
    }
    loracomp::engine::weights::write_safetensors(&p, &tf.tensors, None).unwrap();
    let m = d.to_str().unwrap();
    fails_with(m, r#"{"input_ids": [[2, 5, 7, 3]]}"#, "overflow", &["holds NaN/Inf", "first in the layer 1 output"]);
    std::fs::remove_dir_all(&d).ok();
}

/// Batch × length (and image size) are estimated before anything is allocated, and refused with the estimate.
#[test]
fn inputs_too_large_for_memory_are_refused_with_the_estimate() {
    let ids = vec!["0"; 300_000].join(",");
    fails_with(
        &fixture("tiny-llama"),
        &format!(r#"{{"input_ids": [[{ids}]]}}"#),
        "long",
        &["in.json: field 'input_ids': a forward pass of batch 1 × 300000 needs about", "MemAvailable"],
    );
    let row = vec!["0"; 1024].join(",");
    let plane = vec![format!("[{row}]"); 1024].join(",");
    let px = vec![format!("[{plane}]"); 3].join(",");
    fails_with(
        &fixture("tiny-vit"),
        &format!(r#"{{"pixel_values": [[{px}]]}}"#),
        "image",
        &["field 'pixel_values': a forward pass of batch 1 × 65537 needs about"],
    );
}

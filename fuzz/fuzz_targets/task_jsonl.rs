//! A task split (`train.jsonl`) on arbitrary bytes, with a fixed labels list. Accepted examples must carry a
//! label index inside the list; a refused split must name the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::data::Task;
use std::path::{Path, PathBuf};

fuzz_target!(|data: &[u8]| {
    let task = Task {
        dir: PathBuf::from("fuzz/task"),
        name: "task".into(),
        labels: ["negative", "positive", "0", "1", "é"].iter().map(|s| s.to_string()).collect(),
        image: None,
    };
    match task.parse_split(Path::new("fuzz/task/train.jsonl"), data) {
        Ok(ex) => {
            assert!(!ex.is_empty());
            assert!(ex.iter().all(|e| e.label < task.labels.len()));
        }
        Err(e) => assert!(format!("{e:#}").contains("train.jsonl"), "error does not name the file: {e:#}"),
    }
});

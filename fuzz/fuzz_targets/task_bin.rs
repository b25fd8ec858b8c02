//! An image task split (`train.bin`) on arbitrary bytes, with a fixed labels list and a 1×2×3 image size.
//! Accepted examples must carry a label index inside the list and 6 pixel bytes; a refused split must name the
//! file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::data::{ImageShape, Task};
use std::path::{Path, PathBuf};

fuzz_target!(|data: &[u8]| {
    let shape = ImageShape { channels: 1, height: 2, width: 3 };
    let task = Task {
        dir: PathBuf::from("fuzz/task"),
        name: "task".into(),
        labels: ["a", "b", "c"].iter().map(|s| s.to_string()).collect(),
        image: Some(shape),
    };
    match task.parse_image_split(Path::new("fuzz/task/train.bin"), shape, data) {
        Ok(ex) => {
            assert!(!ex.is_empty());
            assert!(ex.iter().all(|e| e.label < task.labels.len() && e.pixels.len() == 6));
        }
        Err(e) => assert!(format!("{e:#}").contains("train.bin"), "error does not name the file: {e:#}"),
    }
});

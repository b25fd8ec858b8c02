//! A sweep config (TOML) → parse + validate. A refused config must name the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::experiments::sweep::SweepConfig;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match SweepConfig::parse(Path::new("fuzz/sweep.toml"), text) {
        Ok(cfg) => {
            assert!(!cfg.downstream.is_empty() && cfg.seeds > 0 && !cfg.shots.is_empty());
        }
        Err(e) => assert!(format!("{e:#}").contains("sweep.toml"), "error does not name the file: {e:#}"),
    }
});

//! A sweep config (TOML) → parse + validate. A refused config must name the file; an accepted one must plan a
//! bounded number of cells, list no value twice and name tasks by relative paths that stay inside `data` and the
//! output directory.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::experiments::sweep::{SweepConfig, MAX_CELLS};
use std::path::{Component, Path};

fn distinct<T: PartialEq>(v: &[T]) -> bool {
    v.iter().enumerate().all(|(i, x)| !v[..i].contains(x))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match SweepConfig::parse(Path::new("fuzz/sweep.toml"), text) {
        Ok(cfg) => {
            assert!(!cfg.downstream.is_empty() && cfg.seeds > 0 && !cfg.shots.is_empty());
            assert!(cfg.planned_cells().is_some_and(|n| n <= MAX_CELLS), "unbounded plan accepted");
            assert!(cfg.seeds <= MAX_CELLS && cfg.ablation.as_ref().is_none_or(|a| a.draws <= MAX_CELLS));
            assert!(distinct(&cfg.shots) && distinct(&cfg.methods) && distinct(&cfg.upstream));
            assert!(distinct(&cfg.downstream));
            for t in cfg.upstream.iter().chain(&cfg.downstream) {
                let inside = Path::new(t).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
                assert!(!t.is_empty() && inside, "task name '{t}' leaves its directory");
            }
        }
        Err(e) => assert!(format!("{e:#}").contains("sweep.toml"), "error does not name the file: {e:#}"),
    }
});

//! `adapter_config.json` bytes → parse + validate. An accepted config must give every module a positive rank
//! and a finite scale; a refused one must say which file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::lora::peft::AdapterConfig;
use std::path::Path;

const MODULES: [&str; 4] = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.1.attention.output.dense",
    "encoder.layer.11.intermediate.dense",
    "classifier",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = Path::new("fuzz/adapter_config.json");
    match AdapterConfig::parse(path, text) {
        Ok(cfg) => {
            for m in MODULES {
                if let Some(t) = &cfg.target_modules {
                    let _ = t.matches(m);
                }
                if let Ok((r, scale)) = cfg.rank_and_scale(m) {
                    assert!(r > 0, "accepted config gives {m} rank 0");
                    assert!(scale.is_finite(), "accepted config gives {m} scale {scale}");
                }
            }
        }
        Err(e) => assert!(format!("{e:#}").contains("adapter_config.json"), "error does not name the file: {e:#}"),
    }
});

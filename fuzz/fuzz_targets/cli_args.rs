//! Command-line arguments → clap parsing (nothing is run). The bytes are split on NUL into arguments appended
//! to a command whose required options are given, so mutations reach the numeric options (--rank, --batch,
//! --export-rank, --max-len, --steps, --lr, --alpha, --weight-decay, --threads, --shots, --seed, --weights …).
//! Parsing must never panic; an accepted command line must hold the values the rest of the program relies on.
#![no_main]
use libfuzzer_sys::fuzz_target;
use loracomp::cli::{parse_args, Cmd};

const BASES: [&[&str]; 4] = [
    &["train", "--model", "m", "--task", "t", "--out", "o"],
    &["adapt", "--model", "m", "--task", "t", "--shots", "4", "--method", "lora", "--out", "o"],
    &["compose", "--model", "m", "--bank", "b", "--out", "o"],
    &["pretrain", "--task", "t", "--out", "o"],
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let mut args: Vec<String> = vec!["loracomp".into()];
    args.extend(BASES[pick as usize % BASES.len()].iter().map(|s| s.to_string()));
    args.extend(text.split('\0').filter(|s| !s.is_empty()).map(String::from));
    let Ok(cli) = parse_args(&args) else { return };
    if let Some(t) = cli.threads {
        let _ = t; // bounded at run time (MAX_THREADS), before any pool is built
    }
    match cli.cmd {
        Cmd::Train { args, rank, alpha, .. } => {
            assert!(rank > 0 && args.batch > 0, "accepted rank {rank} / batch {}", args.batch);
            assert!(alpha.is_finite() && args.weight_decay.is_finite());
            assert!(args.lr.is_none_or(f32::is_finite) && args.lr_head.is_none_or(f32::is_finite));
        }
        Cmd::Adapt { args, rank, alpha, export_rank, shots, .. } => {
            assert!(rank != Some(0) && args.batch > 0 && export_rank != Some(0));
            assert!(shots.0 != Some(0));
            assert!(alpha.is_none_or(f32::is_finite) && args.weight_decay.is_finite());
            assert!(args.lr.is_none_or(f32::is_finite) && args.lr_head.is_none_or(f32::is_finite));
        }
        Cmd::Compose { export_rank, .. } => assert!(export_rank != Some(0)),
        Cmd::Pretrain { lr, weight_decay, batch, .. } => {
            assert!(lr.is_finite() && weight_decay.is_finite() && batch > 0);
        }
        _ => {}
    }
});

//! Every integration test in one crate (one binary to compile and link instead of one per file).

mod auto;
mod bad_input_adapt;
mod bad_input_cli;
mod bad_input_model;
mod cli_flow;
mod common;
mod composition;
mod determinism;
mod forward_cli;
mod generative;
mod llama;
mod model_gradcheck;
mod parity;
mod peft_roundtrip;
mod report;
mod sweep_resume;
mod sweep_shard;
mod t5;
mod vision;
mod vit;

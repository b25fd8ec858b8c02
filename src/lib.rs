//! loracomp: few-shot adaptation of a frozen pre-trained encoder by composing a bank of pre-trained LoRA modules
//! (Asadi et al. 2024, "Does Combining Parameter-efficient Modules Improve Few-shot Transfer Accuracy?").
//!
//! Layers, bottom up: [`engine`] (GEMM, kernels, optimiser) → [`models`] (architectures) → [`lora`] (bank layer,
//! PEFT I/O) → methods → data → experiments → cli.

pub mod cli;
pub mod data;
pub mod engine;
pub mod experiments;
pub mod lora;
pub mod methods;
pub mod models;
pub mod util;

//! loracomp: few-shot adaptation of a frozen pre-trained model by composing a bank of pre-trained LoRA modules
//! (Asadi et al. 2024, "Does Combining Parameter-efficient Modules Improve Few-shot Transfer Accuracy?").
//!
//! Layers, bottom up (nothing imports upward; ARCHITECTURE.md has the diagram):
//! [`engine`] (GEMM, kernels, optimiser, safetensors) → [`lora`] (bank layer, PEFT I/O) → [`models`]
//! (BERT, ViT/DINOv2, T5, Llama; [`models::kind::ModelKind`]) → [`data`] (task directories, [`data::Shots`]) →
//! [`methods`] (the [`methods::task::TaskModel`] interface and one file per method) → [`app`] (plain specs:
//! train, adapt, eval, compose, predict) → [`experiments`] (sweeps, reports, bench, demo) → `cli`.
//!
//! The public API in four steps:
//!
//! ```no_run
//! use loracomp::app::{adapt, AdaptSpec, Common, MethodOptions};
//! use loracomp::data::Shots;
//! use loracomp::methods::Method;
//!
//! # fn main() -> anyhow::Result<()> {
//! // 1. a model directory (BERT, ViT, T5, Llama), 2. a bank of PEFT adapters, 3. a task with a few examples:
//! let spec = AdaptSpec {
//!     common: Common::new("models/all-MiniLM-L6-v2", "tasks/mytask"),
//!     out: "runs/mytask".into(),
//!     shots: Shots(Some(8)),
//!     method: Method::Learned,
//!     bank: vec!["bank/a".into(), "bank/b".into()],
//!     options: MethodOptions::default(),
//!     export_rank: None,
//! };
//! // 4. adapt: metrics.json and a PEFT adapter in runs/mytask/adapter.
//! let metrics = adapt(&spec)?;
//! println!("accuracy {}", metrics["accuracy"]);
//! # Ok(())
//! # }
//! ```
//!
//! Lower down, [`models::encoder::LoadedModel::load`] loads any supported directory,
//! [`methods::bank::attach_bank`] puts a bank on any model's linear layers with a
//! [`lora::bank::Composition`], and [`methods::export::export_adapter`] writes the result as a PEFT adapter
//! (`examples/compose.rs` composes two adapters this way).
//!
//! Cargo features: `cli` (default) adds the command-line front end (`cli`, clap, the `loracomp` binary),
//! terminal progress bars (indicatif) and the sweep report's PNG/SVG plots (plotters). With
//! `default-features = false` the whole library above is there; progress is printed as plain log lines and a
//! sweep's report.md lists no plots, saying why.

// Every `unsafe` block says why it is sound (`// SAFETY: …` right above it).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod app;
#[cfg(feature = "cli")]
pub mod cli;
pub mod data;
pub mod engine;
pub mod experiments;
pub mod lora;
pub mod methods;
pub mod models;
pub mod progress;
pub mod util;

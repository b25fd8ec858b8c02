//! Model architectures, one file each, on the shared engine.

pub mod bert;
pub mod classifier;
pub mod config;
pub mod encoder;
pub mod forward;
pub mod generative;
pub mod hf;
pub mod image;
pub mod kind;
pub mod llama;
pub mod t5;
pub mod tokenize;
pub mod vit;

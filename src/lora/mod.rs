//! LoRA: the bank linear layer, PEFT adapter input/output, and the trait models implement to carry banks.

pub mod bank;
pub mod host;
pub mod peft;

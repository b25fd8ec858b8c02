//! LoRA: the bank linear layer and PEFT adapter input/output.

pub mod bank;
pub mod peft;

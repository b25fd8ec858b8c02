//! `uniform`: W + (1/N)·Σ_n ΔW_n on every layer the bank adapts; no composition parameter is trained, only
//! the head (on cached features, since the composed encoder is fixed).

use super::task::TaskModel;
use crate::lora::peft::Adapter;
use anyhow::Result;

pub fn prepare(model: &mut dyn TaskModel, bank: &[Adapter]) -> Result<Vec<String>> {
    super::bank::attach_bank(model, bank, |_, n| super::bank::uniform(n))
}

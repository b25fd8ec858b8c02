//! `lora`: a LoRA trained from scratch on the target modules (rank, alpha, targets from the options) with
//! the head; the bank is not used.

use super::task::TaskModel;
use super::AdaptOpts;
use anyhow::Result;

pub fn prepare(model: &mut dyn TaskModel, opts: &AdaptOpts) -> Result<Vec<String>> {
    super::bank::attach_fresh_lora(model, &opts.targets, opts.rank, opts.alpha, opts.loop_opts.seed)
}

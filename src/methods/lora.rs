//! `lora`: a LoRA trained from scratch on the target modules (rank, alpha, targets from the options) with
//! the head; the bank is not used.

use super::AdaptOpts;
use crate::models::classifier::Classifier;
use anyhow::Result;

pub fn prepare(model: &mut Classifier, opts: &AdaptOpts) -> Result<Vec<String>> {
    super::bank::attach_fresh_lora(model, &opts.targets, opts.rank, opts.alpha, opts.loop_opts.seed)
}

//! `full`: full fine-tuning. Every encoder weight and the head are trained.

use crate::models::classifier::Classifier;

pub fn prepare(model: &mut Classifier) -> Vec<String> {
    model.encoder.set_all_trainable(true);
    Vec::new()
}

//! `linear-probe`: classifier tuning. The encoder is frozen; only the head is trained (on cached features).

use crate::models::classifier::Classifier;

pub fn prepare(_model: &mut Classifier) -> Vec<String> {
    Vec::new()
}

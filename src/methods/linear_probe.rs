//! `linear-probe`: classifier tuning. The encoder is frozen; only the head is trained (on cached features).
//! A generative model has no head, so the method is refused there (see [`prepare`]).

use super::task::TaskModel;
use anyhow::{bail, Result};

pub fn prepare(model: &mut dyn TaskModel) -> Result<Vec<String>> {
    if !model.has_head() {
        bail!(
            "--method linear-probe trains a classification head, and a generative model ({}) has none: it ranks the label strings; use uniform, learned, lora or full",
            model.describe()
        );
    }
    Ok(Vec::new())
}

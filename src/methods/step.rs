//! One optimisation step shared by every gradient-based method: forward, backward, AdamW on the trainable
//! parameters (each with its own learning rate), then the bank layers' cached merges are invalidated.

use super::common::Encoded;
use super::task::TaskModel;
use crate::engine::param::{AdamW, NonFinite};
use crate::models::classifier::Classifier;
use crate::models::encoder::Input;
use anyhow::{bail, Result};

/// Hook run between backward and the update (penalties, tied parameters).
pub type GradHook<'a> = &'a mut dyn FnMut(&mut dyn TaskModel);

/// Run one step on `items`; returns the loss. Fails (naming the step) if the loss or any gradient is NaN or
/// infinite.
pub fn train_step(
    model: &mut dyn TaskModel,
    items: &[&Encoded],
    opt: &AdamW,
    t: u64,
    lr_for: &dyn Fn(&str) -> f32,
    hook: Option<GradHook>,
) -> Result<f32> {
    model.zero_grad();
    let loss = model.loss_backward(items)?;
    finish_step(model, loss, opt, t, lr_for, hook)
}

/// [`train_step`] on a batch already built for an encoder classifier (benchmarks and tests time the step alone).
pub fn classifier_step<'a>(
    model: &mut Classifier,
    batch: impl Into<Input<'a>>,
    labels: &[usize],
    opt: &AdamW,
    t: u64,
    lr_for: &dyn Fn(&str) -> f32,
    hook: Option<GradHook>,
) -> Result<f32> {
    TaskModel::zero_grad(model);
    model.forward(batch)?;
    let loss = model.backward(labels)?;
    finish_step(model, loss, opt, t, lr_for, hook)
}

/// The rest of a step once the gradients are in: checks, hook, AdamW, invalidation.
fn finish_step(
    model: &mut dyn TaskModel,
    loss: f32,
    opt: &AdamW,
    t: u64,
    lr_for: &dyn Fn(&str) -> f32,
    hook: Option<GradHook>,
) -> Result<f32> {
    if !loss.is_finite() {
        bail!("training diverged at step {t}: loss is {loss}");
    }
    if let Some(h) = hook {
        h(model);
    }
    for (name, p) in model.trainable_params_mut() {
        match opt.step_checked(p, t, lr_for(&name)) {
            Ok(()) => {}
            Err(NonFinite::Grad) => bail!("training diverged at step {t}: gradient of {name} holds NaN or Inf"),
            Err(NonFinite::Data) => bail!("training diverged at step {t}: {name} holds NaN or Inf after the update"),
        }
    }
    for l in model.all_linears_mut() {
        l.invalidate_after_step();
    }
    Ok(loss)
}

/// Drop every cached merge (after any weight or composition change).
pub fn invalidate(model: &mut dyn TaskModel) {
    model.invalidate();
}

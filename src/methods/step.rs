//! One optimisation step shared by every gradient-based method: forward, backward, AdamW on the trainable
//! parameters, then the bank layers' cached merges are invalidated.

use crate::engine::param::AdamW;
use crate::models::bert::Batch;
use crate::models::classifier::Classifier;
use anyhow::{bail, Result};

/// Run one step; returns the loss. Fails (naming the step) if the loss or any gradient is NaN or infinite.
pub fn train_step(
    model: &mut Classifier,
    batch: &Batch,
    labels: &[usize],
    opt: &AdamW,
    t: u64,
    lr: f32,
) -> Result<f32> {
    model.zero_grad();
    model.forward(batch)?;
    let loss = model.backward(labels)?;
    if !loss.is_finite() {
        bail!("training diverged at step {t}: loss is {loss}");
    }
    for (name, p) in model.trainable_params_mut() {
        if p.grad.iter().any(|g| !g.is_finite()) {
            bail!("training diverged at step {t}: gradient of {name} holds NaN or Inf");
        }
        opt.step(p, t, lr);
    }
    for layer in &mut model.bert.layers {
        for l in layer.linears_mut() {
            l.invalidate();
        }
    }
    model.head.invalidate();
    Ok(loss)
}

//! `learned`: W + Σ_n softmax(v)_n·ΔW_n with one logit vector `v` per adapted layer, initialised to zero
//! (uniform), trained with the head; all LoRA factors stay frozen. Options: one global vector shared by every
//! layer, and an entropy penalty λ·H(softmax(v)) that pushes towards choosing few modules.

use super::task::TaskModel;
use crate::lora::bank::Composition;
use crate::lora::peft::Adapter;
use anyhow::Result;

pub fn prepare(model: &mut dyn TaskModel, bank: &[Adapter]) -> Result<Vec<String>> {
    super::bank::attach_bank(model, bank, |_, n| super::bank::learned(n))
}

/// Gradient hook: adds the entropy penalty's gradient and ties the logits when `global`.
pub fn hook(global: bool, entropy: f32) -> impl FnMut(&mut dyn TaskModel) {
    move |model: &mut dyn TaskModel| {
        let mut logits: Vec<&mut crate::engine::param::Param> = Vec::new();
        for lin in model.all_linears_mut() {
            if let Composition::Learned(p) = &mut lin.comp {
                logits.push(p);
            }
        }
        if entropy != 0.0 {
            for p in logits.iter_mut() {
                let mut w = p.data.clone();
                let n = w.len();
                crate::engine::kernels::softmax_rows(&mut w, n);
                let h: f32 = -w.iter().map(|&x| if x > 0.0 { x * x.ln() } else { 0.0 }).sum::<f32>();
                for (g, &wk) in p.grad.iter_mut().zip(&w) {
                    let lw = if wk > 0.0 { wk.ln() } else { 0.0 };
                    *g += entropy * (-wk * (lw + h));
                }
            }
        }
        if global && logits.len() > 1 {
            let n = logits[0].grad.len();
            let mut sum = vec![0.0f32; n];
            for p in logits.iter() {
                sum.iter_mut().zip(&p.grad).for_each(|(s, g)| *s += g);
            }
            for p in logits.iter_mut() {
                p.grad.copy_from_slice(&sum);
            }
        }
    }
}

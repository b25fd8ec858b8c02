//! Attaching a bank of PEFT adapters to a model's linear layers.

use super::task::TaskModel;
use crate::engine::param::Param;
use crate::lora::bank::{Composition, FreshLora};
use crate::lora::host::attach_adapters;
use crate::lora::peft::Adapter;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};

/// Put the bank's modules on every linear layer some adapter targets, in bank order (an adapter that does not
/// target a layer takes part there with rank 0, so module `n` means adapter `n` in every layer), with the
/// composition `comp(layer_path, N)`. Returns the adapted layer paths.
pub fn attach_bank(
    model: &mut dyn TaskModel,
    bank: &[Adapter],
    comp: impl FnMut(&str, usize) -> Composition,
) -> Result<Vec<String>> {
    attach_adapters(model, bank, comp)
}

/// Uniform weights 1/N.
pub fn uniform(n: usize) -> Composition {
    Composition::Fixed(vec![1.0 / n as f32; n])
}

/// Trainable logits initialised to zero (= uniform).
pub fn learned(n: usize) -> Composition {
    let mut p = Param::zeros(vec![n]);
    p.set_trainable(true);
    Composition::Learned(p)
}

/// A fresh trainable LoRA on every linear layer whose name ends with one of `targets`, initialised as PEFT
/// does (A Kaiming-uniform with a = √5, i.e. U(±1/√in); B zero). Returns the adapted paths.
pub fn attach_fresh_lora(
    model: &mut dyn TaskModel,
    targets: &[String],
    r: usize,
    alpha: f32,
    seed: u64,
) -> Result<Vec<String>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4C6F_5241);
    let mut used = Vec::new();
    // Factors, gradients and two AdamW moments: 4 f32 per entry of A [r, in] and B [out, r] on every target,
    // refused before anything is allocated when beyond the memory available.
    let paths = model.linear_paths();
    let entries: u128 = paths
        .iter()
        .filter(|p| targets.iter().any(|t| *p == t || p.ends_with(&format!(".{t}"))))
        .filter_map(|p| model.linear_mut(p).map(|l| (l.din + l.dout) as u128))
        .sum();
    crate::util::check_fits(
        entries.checked_mul(r as u128 * 16),
        &format!("--rank {r}: the fresh LoRA (factors, gradients, AdamW moments)"),
    )?;
    for path in paths {
        if !targets.iter().any(|t| path == *t || path.ends_with(&format!(".{t}"))) {
            continue;
        }
        let lin = model.linear_mut(&path).expect("linear_paths lists only existing modules");
        let bound = 1.0 / (lin.din as f32).sqrt();
        let mut a = Param::new(vec![r, lin.din], (0..r * lin.din).map(|_| rng.gen_range(-bound..bound)).collect());
        let mut b = Param::zeros(vec![lin.dout, r]);
        a.set_trainable(true);
        b.set_trainable(true);
        lin.fresh = Some(FreshLora { a, b, r, scale: alpha / r as f32 });
        used.push(path);
    }
    if used.is_empty() {
        let mut names: Vec<String> =
            model.linear_paths().iter().map(|p| p.rsplit('.').next().unwrap_or(p).to_string()).collect();
        names.sort();
        names.dedup();
        bail!(
            "--targets {} matches no linear module of this model (its module names end with: {})",
            targets.join(","),
            names.join(", ")
        );
    }
    Ok(used)
}

/// Load a single adapter (as `train` or `adapt` wrote it) onto `model` exactly: its LoRA terms with weight 1
/// and, on a model with a head, its head. Fails if the head's class count differs from `classes`, if a model
/// with a head gets an adapter without one, or the other way round.
pub fn apply_adapter(model: &mut dyn TaskModel, adapter: &Adapter, classes: usize) -> Result<()> {
    attach_bank(model, std::slice::from_ref(adapter), |_, n| Composition::Fixed(vec![1.0; n]))?;
    let Some(head) = model.head_mut() else {
        if adapter.head.is_some() {
            bail!(
                "{}: the adapter has a classifier head (modules_to_save 'classifier'), but a generative model classifies by ranking label strings; was it made for an encoder?",
                adapter.dir.display()
            );
        }
        return Ok(());
    };
    let Some((shape, w, b)) = &adapter.head else {
        bail!("{}: the adapter has no classifier head (modules_to_save 'classifier')", adapter.dir.display());
    };
    if shape[0] != classes || shape[1] != head.din {
        bail!(
            "{}: classifier head is {:?} but the task has {classes} labels and the model {} features",
            adapter.dir.display(),
            shape,
            head.din
        );
    }
    head.w.data.copy_from_slice(w);
    if let Some(bias) = head.bias.as_mut() {
        bias.data.copy_from_slice(b);
    }
    head.invalidate();
    Ok(())
}

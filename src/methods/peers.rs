//! Peer methods on the same bank, shots and seeds: LoraHub's gradient-free search, dense merges (task
//! arithmetic, TIES, DARE, magnitude pruning), the best single module, and Arrow-style module retrieval.
//!
//! All of them fix a composition of the frozen bank, then train only the head on the composed encoder's
//! features — the same head training as `uniform`. Where a method must choose something from the few-shot
//! examples (LoraHub's weights, task arithmetic's λ, the best module) it scores candidates with a head-free
//! criterion: the cross-entropy of a nearest-class-prototype classifier on L2-normalised features (prototypes
//! leave the scored example out when its class has another one), temperature 0.1. Every candidate costs one
//! forward pass of the few-shot set.

use super::common::{features, Encoded};
use crate::lora::bank::{Composition, LoraModule};
use crate::lora::peft::Adapter;
use crate::models::classifier::Classifier;
use anyhow::{bail, Result};
use serde_json::{json, Value};

/// Head-free score of features: nearest-prototype cross-entropy (lower is better).
pub fn prototype_loss(feats: &[f32], labels: &[usize], classes: usize, d: usize) -> f64 {
    let n = labels.len();
    let mut f = feats.to_vec();
    crate::engine::kernels::l2_normalize_rows(&mut f, d);
    let mut sums = vec![0.0f64; classes * d];
    let mut counts = vec![0usize; classes];
    for i in 0..n {
        counts[labels[i]] += 1;
        for k in 0..d {
            sums[labels[i] * d + k] += f[i * d + k] as f64;
        }
    }
    let mut loss = 0.0;
    for i in 0..n {
        let mut logits = Vec::with_capacity(classes);
        for c in 0..classes {
            if counts[c] == 0 {
                continue;
            }
            let own = c == labels[i] && counts[c] > 1;
            let cnt = if own { counts[c] - 1 } else { counts[c] } as f64;
            let mut proto: Vec<f64> =
                (0..d).map(|k| sums[c * d + k] - if own { f[i * d + k] as f64 } else { 0.0 }).collect();
            let norm = proto.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            proto.iter_mut().for_each(|v| *v /= norm);
            let _ = cnt;
            let cos: f64 = (0..d).map(|k| proto[k] * f[i * d + k] as f64).sum();
            logits.push((c, cos / 0.1));
        }
        let mx = logits.iter().map(|l| l.1).fold(f64::MIN, f64::max);
        let lse = mx + logits.iter().map(|l| (l.1 - mx).exp()).sum::<f64>().ln();
        let own = logits.iter().find(|l| l.0 == labels[i]).map(|l| l.1).unwrap_or(mx);
        loss += lse - own;
    }
    loss / n.max(1) as f64
}

fn score(model: &mut Classifier, data: &[Encoded], pad: u32, classes: usize) -> Result<f64> {
    let f = features(model, data, pad, 64)?;
    let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
    Ok(prototype_loss(&f, &labels, classes, model.encoder.hidden()))
}

fn set_fixed(model: &mut Classifier, paths: &[String], w: &[f32]) {
    for p in paths {
        let lin = model.encoder.linear_mut(p).unwrap();
        lin.comp = Composition::Fixed(w.to_vec());
        lin.invalidate();
    }
}

/// LoraHub: CMA-ES over module weights in [-1.5, 1.5] (initial mean 0, step 0.5), objective = prototype loss
/// plus 0.05·mean|w|, `generations` generations. `compat` composes like LoraHub's code (Σ w A and Σ w B as
/// one LoRA; all modules of a layer must share rank and scale) instead of the exact Σ w ΔW.
#[allow(clippy::too_many_arguments)]
pub fn lorahub(
    model: &mut Classifier,
    paths: &[String],
    n: usize,
    data: &[Encoded],
    pad: u32,
    classes: usize,
    generations: usize,
    seed: u64,
    compat: bool,
) -> Result<Value> {
    let originals: Vec<Vec<LoraModule>> =
        paths.iter().map(|p| model.encoder.linear_mut(p).unwrap().bank().to_vec()).collect();
    if compat {
        for (p, bank) in paths.iter().zip(&originals) {
            let r0 = bank[0].r;
            if bank.iter().any(|m| m.r != r0 || (m.scale - bank[0].scale).abs() > 1e-6) {
                bail!("lorahub-compat sums A and B factors, so every module of '{p}' needs the same rank and scale; use lorahub for the exact Σ w ΔW");
            }
        }
    }
    let apply = |model: &mut Classifier, w: &[f32]| {
        for (p, bank) in paths.iter().zip(&originals) {
            let lin = model.encoder.linear_mut(p).unwrap();
            if compat {
                let (r, s) = (bank[0].r, bank[0].scale);
                let mut a = vec![0.0f32; bank[0].a.len()];
                let mut b = vec![0.0f32; bank[0].b.len()];
                for (m, wn) in bank.iter().zip(w) {
                    a.iter_mut().zip(&m.a).for_each(|(x, y)| *x += wn * y);
                    b.iter_mut().zip(&m.b).for_each(|(x, y)| *x += wn * y);
                }
                lin.set_bank(vec![LoraModule { a, b, r, scale: s }]);
                lin.comp = Composition::Fixed(vec![1.0]);
            } else {
                lin.comp = Composition::Fixed(w.to_vec());
            }
            lin.invalidate();
        }
    };
    let mut evals = 0usize;
    let mut err: Option<anyhow::Error> = None;
    let best = {
        let objective = |x: &cmaes::DVector<f64>| -> f64 {
            let w: Vec<f32> = x.iter().map(|v| v.clamp(-1.5, 1.5) as f32).collect();
            apply(model, &w);
            evals += 1;
            match score(model, data, pad, classes) {
                Ok(l) => l + 0.05 * w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len() as f64,
                Err(e) => {
                    err.get_or_insert(e);
                    f64::INFINITY
                }
            }
        };
        let mut cma = cmaes::CMAESOptions::new(vec![0.0; n], 0.5)
            .max_generations(generations)
            .seed(seed)
            .build(objective)
            .map_err(|e| anyhow::anyhow!("CMA-ES options: {e:?}"))?;
        let res = cma.run();
        res.overall_best.map(|b| b.point)
    };
    if let Some(e) = err {
        return Err(e);
    }
    let w: Vec<f32> =
        best.map(|p| p.iter().map(|v| v.clamp(-1.5, 1.5) as f32).collect()).unwrap_or_else(|| vec![0.0; n]);
    apply(model, &w);
    Ok(
        json!({"weights": w, "evaluations": evals, "generations": generations, "composition": if compat { "sum of factors" } else { "exact" }}),
    )
}

/// Pick the single module with the lowest prototype loss; the layers keep only its weight.
pub fn best_single(
    model: &mut Classifier,
    paths: &[String],
    n: usize,
    data: &[Encoded],
    pad: u32,
    classes: usize,
) -> Result<Value> {
    let mut losses = Vec::new();
    for j in 0..n {
        let mut w = vec![0.0f32; n];
        w[j] = 1.0;
        set_fixed(model, paths, &w);
        losses.push(score(model, data, pad, classes)?);
    }
    let best = (0..n).min_by(|&a, &b| losses[a].partial_cmp(&losses[b]).unwrap()).unwrap();
    let mut w = vec![0.0f32; n];
    w[best] = 1.0;
    set_fixed(model, paths, &w);
    Ok(json!({"chosen": best, "losses": losses}))
}

/// Dense merge of each layer's task vectors, λ chosen from `grid` by prototype loss. The merged ΔW replaces the
/// bank as one module (A = I, B = λ·M), so forward and export stay exact.
#[allow(clippy::too_many_arguments)]
pub fn dense_merge(
    model: &mut Classifier,
    paths: &[String],
    merge: super::merges::Merge,
    grid: &[f32],
    data: &[Encoded],
    pad: u32,
    classes: usize,
    seed: u64,
) -> Result<Value> {
    let mut merged: Vec<(String, Vec<f32>, usize)> = Vec::new();
    for (li, p) in paths.iter().enumerate() {
        let lin = model.encoder.linear_mut(p).unwrap();
        let n = lin.bank().len();
        let tvs: Vec<Vec<f32>> = (0..n)
            .filter(|&j| lin.bank()[j].r > 0)
            .map(|j| {
                let mut w = vec![0.0f32; n];
                w[j] = 1.0;
                lin.delta_w(&w)
            })
            .collect();
        merged.push((p.clone(), merge.apply(&tvs, 1.0, seed.wrapping_mul(1_000_003).wrapping_add(li as u64)), lin.din));
    }
    let apply = |model: &mut Classifier, lambda: f32| {
        for (p, m, din) in &merged {
            let lin = model.encoder.linear_mut(p).unwrap();
            let mut eye = vec![0.0f32; din * din];
            for i in 0..*din {
                eye[i * din + i] = 1.0;
            }
            lin.set_bank(vec![LoraModule { a: eye, b: m.clone(), r: *din, scale: 1.0 }]);
            lin.comp = Composition::Fixed(vec![lambda]);
            lin.invalidate();
        }
    };
    let mut losses = Vec::new();
    for &l in grid {
        apply(model, l);
        losses.push(score(model, data, pad, classes)?);
    }
    let bi = (0..grid.len()).min_by(|&a, &b| losses[a].partial_cmp(&losses[b]).unwrap()).unwrap();
    apply(model, grid[bi]);
    Ok(json!({"lambda": grid[bi], "grid": grid, "losses": losses}))
}

/// Arrow-style retrieval: each module's prototype per layer is the top right singular vector of its ΔW; a
/// module scores the mean |⟨x, v⟩|/‖x‖ over the few-shot tokens x entering that layer (base model), averaged
/// over the attention projections it adapts. Returns the indices of the `k` best modules, best first.
pub fn arrow_select(
    model: &mut Classifier,
    bank: &[Adapter],
    data: &[Encoded],
    pad: u32,
    k: usize,
) -> Result<Vec<usize>> {
    let items: Vec<&Encoded> = data.iter().collect();
    let (batch, _) = super::common::batch_of(&items, pad);
    let mask = model.encoder.forward((&batch).into())?.1;
    let d = model.encoder.hidden();
    let mut scores = vec![0.0f64; bank.len()];
    let mut counts = vec![0usize; bank.len()];
    for (n, a) in bank.iter().enumerate() {
        for (path, m) in &a.modules {
            let Some(rest) = path.strip_prefix("encoder.layer.") else { continue };
            let (l, name) = rest.split_once('.').unwrap_or(("", ""));
            if !name.starts_with("attention.self.") && !name.starts_with("attention.attention.") {
                continue;
            }
            let l: usize = l.parse().unwrap_or(0);
            let v = top_right_singular(&m.a, &m.b, m.r, m.din, m.dout);
            let x = model.encoder.layer_input(l);
            let (mut s, mut c) = (0.0f64, 0usize);
            for t in 0..mask.len() {
                if mask[t] == 0.0 {
                    continue;
                }
                let row = &x[t * d..(t + 1) * d];
                let norm = row.iter().map(|v| (v * v) as f64).sum::<f64>().sqrt().max(1e-12);
                s += (row.iter().zip(&v).map(|(a, b)| (*a * *b) as f64).sum::<f64>()).abs() / norm;
                c += 1;
            }
            scores[n] += s / c.max(1) as f64;
            counts[n] += 1;
        }
    }
    let mut idx: Vec<usize> = (0..bank.len()).collect();
    let avg = |n: usize| if counts[n] > 0 { scores[n] / counts[n] as f64 } else { f64::MIN };
    idx.sort_by(|&a, &b| avg(b).partial_cmp(&avg(a)).unwrap());
    idx.truncate(k.min(bank.len()));
    Ok(idx)
}

/// Top right singular vector of B·A by power iteration on (BA)ᵀ(BA) through the factors.
fn top_right_singular(a: &[f32], b: &[f32], r: usize, din: usize, dout: usize) -> Vec<f32> {
    let mut v: Vec<f64> = (0..din).map(|i| 1.0 + (i % 7) as f64 * 0.1).collect();
    for _ in 0..50 {
        let av: Vec<f64> = (0..r).map(|j| (0..din).map(|i| a[j * din + i] as f64 * v[i]).sum()).collect();
        let bav: Vec<f64> = (0..dout).map(|o| (0..r).map(|j| b[o * r + j] as f64 * av[j]).sum()).collect();
        let btb: Vec<f64> = (0..r).map(|j| (0..dout).map(|o| b[o * r + j] as f64 * bav[o]).sum()).collect();
        let mut nv: Vec<f64> = (0..din).map(|i| (0..r).map(|j| a[j * din + i] as f64 * btb[j]).sum()).collect();
        let norm = nv.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
        nv.iter_mut().for_each(|x| *x /= norm);
        v = nv;
    }
    v.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prototype_loss_prefers_separated_classes() {
        // two classes, 2 examples each, d = 2
        let good = [1.0, 0.0, 0.9, 0.1, 0.0, 1.0, 0.1, 0.9];
        let bad = [1.0, 0.0, 0.0, 1.0, 0.9, 0.1, 0.1, 0.9];
        let labels = [0, 0, 1, 1];
        assert!(prototype_loss(&good, &labels, 2, 2) < prototype_loss(&bad, &labels, 2, 2));
    }

    #[test]
    fn power_iteration_finds_the_top_singular_vector() {
        // B·A = diag(3, 1) in 2-d: A = I, B = diag(3, 1)
        let a = [1.0, 0.0, 0.0, 1.0];
        let b = [3.0, 0.0, 0.0, 1.0];
        let v = top_right_singular(&a, &b, 2, 2, 2);
        assert!((v[0].abs() - 1.0).abs() < 1e-4 && v[1].abs() < 1e-3, "{v:?}");
    }

    #[test]
    fn cmaes_minimises_standard_functions() {
        // sphere and Rosenbrock in 4-d, as used to validate the optimiser LoraHub relies on
        let sphere = |x: &cmaes::DVector<f64>| x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum::<f64>();
        let mut c = cmaes::CMAESOptions::new(vec![0.0; 4], 0.5).max_generations(200).seed(1).build(sphere).unwrap();
        let r = c.run();
        assert!(r.overall_best.unwrap().value < 1e-8);
        let rosen = |x: &cmaes::DVector<f64>| {
            (0..x.len() - 1).map(|i| 100.0 * (x[i + 1] - x[i] * x[i]).powi(2) + (1.0 - x[i]).powi(2)).sum::<f64>()
        };
        let mut c = cmaes::CMAESOptions::new(vec![0.0; 4], 0.5).max_generations(2000).seed(2).build(rosen).unwrap();
        let r = c.run();
        assert!(r.overall_best.unwrap().value < 1e-6);
    }
}

//! Peer methods on the same bank, shots and seeds: LoraHub's gradient-free search, dense merges (task
//! arithmetic, TIES, DARE, magnitude pruning), the best single module, and Arrow-style module retrieval.
//!
//! All of them fix a composition of the frozen bank, then train only what the model has besides the bank: the
//! head of an encoder classifier (on the composed encoder's features, the same head training as `uniform`),
//! nothing on a generative model (the composition is used as it is, as LoraHub does). Where a method must choose
//! something from the few-shot examples (LoraHub's weights, task arithmetic's λ, the best module) it scores
//! candidates with the model's head-free criterion ([`TaskModel::criterion`]): for an encoder, the
//! cross-entropy of a nearest-class-prototype classifier on L2-normalised features (prototypes leave the scored
//! example out when its class has another one), temperature 0.1; for a generative model, the answer tokens'
//! cross-entropy. Every candidate costs one forward pass of the few-shot set, except in LoraHub's search on an
//! encoder, which scores a whole CMA-ES generation in a few batched passes
//! ([`super::task::score_population_in`]).

use super::common::Encoded;
use super::task::TaskModel;
use crate::engine::cma::CmaEs;
use crate::lora::bank::{Composition, LoraModule};
use crate::lora::peft::Adapter;
use crate::models::classifier::Classifier;
use anyhow::{bail, Result};
use serde_json::{json, Value};

pub use super::task::prototype_loss;

/// Fixed composition weights `w` on every layer in `paths`.
pub(crate) fn set_fixed(model: &mut dyn TaskModel, paths: &[String], w: &[f32]) {
    for p in paths {
        let lin = model.linear_mut(p).expect("paths come from the model");
        lin.comp = Composition::Fixed(w.to_vec());
        lin.invalidate();
    }
}

/// The index of the smallest value; an error naming `source`, `item` and the index when any value is not finite
/// ([`crate::util::ensure_finite`]).
pub(crate) fn argmin_finite(values: &[f64], source: &str, item: &str) -> Result<usize> {
    crate::util::ensure_finite(values.iter().copied(), source, item)?;
    (0..values.len())
        .min_by(|&a, &b| values[a].total_cmp(&values[b]))
        .ok_or_else(|| anyhow::anyhow!("{source}: no {item} to choose from"))
}

/// LoraHub's objective for a weight vector and its prototype loss: loss + 0.05·mean|w|.
pub fn lorahub_objective(loss: f64, w: &[f32]) -> f64 {
    loss + 0.05 * w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64
}

/// LoraHub: CMA-ES ([`CmaEs`], default population) over module weights in [-1.5, 1.5] (initial mean 0, step
/// 0.5; points are clamped to the box before scoring), objective [`lorahub_objective`], `generations`
/// generations; the best point scored is kept. Each generation is scored together by
/// [`score_population_in`](super::task::score_population_in).
/// `compat` composes like LoraHub's code (Σ w A and Σ w B as one LoRA; all modules of a layer must share rank
/// and scale) instead of the exact Σ w ΔW.
#[allow(clippy::too_many_arguments)]
pub fn lorahub(
    model: &mut dyn TaskModel,
    paths: &[String],
    n: usize,
    data: &[Encoded],
    generations: usize,
    seed: u64,
    compat: bool,
) -> Result<Value> {
    let originals: Vec<Vec<LoraModule>> =
        paths.iter().map(|p| model.linear_mut(p).expect("paths come from the model").bank().to_vec()).collect();
    if compat {
        for (p, bank) in paths.iter().zip(&originals) {
            let r0 = bank[0].r;
            if bank.iter().any(|m| m.r != r0 || (m.scale - bank[0].scale).abs() > 1e-6) {
                bail!("lorahub-compat sums A and B factors, so every module of '{p}' needs the same rank and scale; use lorahub for the exact Σ w ΔW");
            }
        }
    }
    // The chosen weights as a fixed composition (compat: the summed factors replace the bank as one module).
    let apply = |model: &mut dyn TaskModel, w: &[f32]| {
        for (p, bank) in paths.iter().zip(&originals) {
            let lin = model.linear_mut(p).expect("paths come from the model");
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
    let boxed = |x: &[f64]| -> Vec<f32> { x.iter().map(|v| v.clamp(-1.5, 1.5) as f32).collect() };
    let mut es = CmaEs::new(vec![0.0; n], 0.5, seed);
    let mut passes = 0;
    let mut err = None;
    for _ in 0..generations {
        let cands: Vec<Vec<f32>> = es.ask().iter().map(|x| boxed(x)).collect();
        match model.criterion_population(paths, data, &cands, compat) {
            Ok((losses, p)) => {
                passes += p;
                let values: Vec<f64> = losses.iter().zip(&cands).map(|(l, w)| lorahub_objective(*l, w)).collect();
                es.tell(&values);
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let (w, objective) = match es.best() {
        Some((x, v)) => (boxed(x), Some(v)),
        None => (vec![0.0; n], None),
    };
    // Leave a fixed composition behind whatever happened (the search used per-group compositions).
    apply(model, &w);
    if let Some(e) = err {
        return Err(e);
    }
    Ok(json!({
        "weights": w,
        "objective": objective,
        "evaluations": es.evaluations(),
        "generations": generations,
        "population": es.population_size(),
        "forward_passes": passes,
        "composition": if compat { "sum of factors" } else { "exact" },
    }))
}

/// Each module's criterion alone (weight 1 on it, 0 on the others).
pub fn module_losses(model: &mut dyn TaskModel, paths: &[String], n: usize, data: &[Encoded]) -> Result<Vec<f64>> {
    let mut losses = Vec::new();
    for j in 0..n {
        let mut w = vec![0.0f32; n];
        w[j] = 1.0;
        set_fixed(model, paths, &w);
        losses.push(model.criterion(data)?);
    }
    Ok(losses)
}

/// Pick the single module with the lowest head-free criterion; the layers keep only its weight.
pub fn best_single(model: &mut dyn TaskModel, paths: &[String], n: usize, data: &[Encoded]) -> Result<Value> {
    let losses = module_losses(model, paths, n, data)?;
    let best = argmin_finite(&losses, "best-single", "module")?;
    let mut w = vec![0.0f32; n];
    w[best] = 1.0;
    set_fixed(model, paths, &w);
    Ok(json!({"chosen": best, "losses": losses}))
}

/// Dense merge of each layer's task vectors, λ chosen from `grid` by prototype loss. The merged ΔW replaces the
/// bank as one module (A = I, B = λ·M), so forward and export stay exact.
#[allow(clippy::too_many_arguments)]
pub fn dense_merge(
    model: &mut dyn TaskModel,
    paths: &[String],
    merge: super::merges::Merge,
    grid: &[f32],
    data: &[Encoded],
    seed: u64,
) -> Result<Value> {
    let mut merged: Vec<(String, Vec<f32>, usize)> = Vec::new();
    for (li, p) in paths.iter().enumerate() {
        let lin = model.linear_mut(p).expect("paths come from the model");
        let n = lin.bank().len();
        let tvs: Vec<Vec<f32>> = (0..n)
            .filter(|&j| lin.bank()[j].r > 0)
            .map(|j| {
                let mut w = vec![0.0f32; n];
                w[j] = 1.0;
                lin.delta_w(&w)
            })
            .collect();
        let m = merge.apply(&tvs, 1.0, seed.wrapping_mul(1_000_003).wrapping_add(li as u64))?;
        merged.push((p.clone(), m, lin.din));
    }
    let apply = |model: &mut dyn TaskModel, lambda: f32| {
        for (p, m, din) in &merged {
            let lin = model.linear_mut(p).expect("paths come from the model");
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
        losses.push(model.criterion(data)?);
    }
    let bi = argmin_finite(&losses, "dense merge", "λ candidate")?;
    apply(model, grid[bi]);
    Ok(json!({"lambda": grid[bi], "grid": grid, "losses": losses}))
}

/// Arrow-style retrieval: each module's prototype per layer is the top right singular vector of its ΔW; a
/// module scores the mean |⟨x, v⟩|/‖x‖ over the few-shot tokens x entering that layer (base model), averaged
/// over the attention projections it adapts. Returns the indices of the `k` best modules, best first.
pub fn arrow_select(model: &mut Classifier, bank: &[Adapter], data: &[Encoded], k: usize) -> Result<Vec<usize>> {
    let items: Vec<&Encoded> = data.iter().collect();
    let (batch, _) = super::common::batch_of(&items, model.pad);
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
    if let Some(n) = (0..bank.len()).find(|&n| !avg(n).is_finite() && counts[n] > 0) {
        bail!("arrow retrieval: the score of module {n} is {} (not a finite number)", avg(n));
    }
    idx.sort_by(|&a, &b| avg(b).total_cmp(&avg(a)));
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
    use crate::engine::kernels::Pooling;
    use crate::methods::common::{batch_of, Item};
    use crate::models::bert::Batch;
    use crate::models::bert::Bert;
    use crate::models::config::BertConfig;
    use crate::models::encoder::InputBatch;
    use rand::{Rng, SeedableRng};

    /// A tiny random BERT classifier with a bank on the query, value and intermediate layers: ranks `ranks`
    /// (scales 1.5/√r), and the layer paths that carry it.
    fn tiny(ranks: &[usize], seed: u64) -> (Classifier, Vec<String>) {
        let cfg = BertConfig {
            vocab_size: 23,
            hidden_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            intermediate_size: 17,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-12,
            max_position_embeddings: 16,
            type_vocab_size: 2,
            pad_token_id: 0,
            model_type: Some("bert".into()),
            position_embedding_type: None,
        };
        let mut model = Classifier::new(Bert::random(cfg, seed).unwrap(), Pooling::Mean, 3, seed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
        let mut rv = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-0.6f32..0.6)).collect() };
        let paths: Vec<String> = model
            .encoder
            .linear_paths()
            .into_iter()
            .filter(|p| p.ends_with("query") || p.ends_with("value") || p.ends_with("intermediate.dense"))
            .collect();
        for p in &paths {
            let lin = model.encoder.linear_mut(p).unwrap();
            let (din, dout) = (lin.din, lin.dout);
            let bank = ranks.iter().map(|&r| LoraModule {
                a: rv(r * din),
                b: rv(dout * r),
                r,
                scale: 1.5 / (r as f32).sqrt(),
            });
            lin.set_bank(bank.collect());
        }
        (model, paths)
    }

    /// Nine examples of lengths 3 to 9 (ids 1..22, pad 0), three classes.
    fn examples() -> Vec<Encoded> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        (0..9)
            .map(|i| {
                let len = 3 + (i * 4) % 7;
                let ids: Vec<u32> = (0..len).map(|_| rng.gen_range(1..23)).collect();
                Encoded { item: Item::Tokens { types: vec![0; len], ids }, label: i % 3 }
            })
            .collect()
    }

    fn cands() -> Vec<Vec<f32>> {
        vec![vec![0.6, -1.3, 1.5, 0.2], vec![-1.5, 0.0, 0.7, -0.4], vec![0.0; 4], vec![1.1, 0.9, -0.8, 1.5]]
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    #[test]
    fn population_forward_equals_separate_fixed_forwards() {
        let (mut model, paths) = tiny(&[3, 1, 4, 2], 1);
        let data = examples();
        let items: Vec<&Encoded> = data.iter().collect();
        let (one, _) = batch_of(&items, 0);
        let InputBatch::Tokens(one) = one else { unreachable!("text examples") };
        let cands = cands();
        let k = cands.len();
        let big = Batch {
            batch: one.batch * k,
            seq: one.seq,
            ids: one.ids.repeat(k),
            types: one.types.repeat(k),
            mask: one.mask.repeat(k),
        };
        for p in &paths {
            model.encoder.linear_mut(p).unwrap().comp =
                Composition::PerGroup { weights: cands.clone(), sum_factors: false };
        }
        let logits = model.forward(&big).unwrap().to_vec();
        let pooled = model.pooled().to_vec();
        let (d, c, b) = (model.encoder.hidden(), model.classes, one.batch);
        let mut spread = 0.0f32;
        for (g, w) in cands.iter().enumerate() {
            set_fixed(&mut model, &paths, w);
            let lg = model.forward(&one).unwrap().to_vec();
            let pg = model.pooled().to_vec();
            let (dl, dp) = (
                max_diff(&logits[g * b * c..(g + 1) * b * c], &lg),
                max_diff(&pooled[g * b * d..(g + 1) * b * d], &pg),
            );
            assert!(dl <= 1e-5 && dp <= 1e-5, "candidate {g}: logits {dl}, features {dp}");
            spread = spread.max(max_diff(&pooled[..b * d], &pg));
        }
        assert!(spread > 1e-2, "the candidates' features should differ: {spread}");
    }

    #[test]
    fn population_scores_equal_per_candidate_scores_however_split() {
        let (mut model, paths) = tiny(&[3, 1, 4, 2], 2);
        let data = examples();
        let cands = cands();
        let (one_pass, passes) = model.criterion_population(&paths, &data, &cands, false).unwrap();
        assert_eq!(passes, 1);
        // a budget of 20 rows splits the examples into chunks and the candidates into several passes
        let (split, passes) =
            crate::methods::task::score_population_in(&mut model, &paths, &data, &cands, false, 20).unwrap();
        assert!(passes > 4, "{passes}");
        for (g, w) in cands.iter().enumerate() {
            set_fixed(&mut model, &paths, w);
            let single = model.criterion(&data).unwrap();
            assert!((one_pass[g] - single).abs() < 1e-5, "candidate {g}: {} vs {single}", one_pass[g]);
            assert!((split[g] - single).abs() < 1e-5, "candidate {g}: {} vs {single}", split[g]);
        }
    }

    #[test]
    fn lorahub_objective_is_the_per_candidate_objective_of_its_weights() {
        for compat in [false, true] {
            let ranks: &[usize] = if compat { &[2, 2, 2, 2] } else { &[3, 1, 4, 2] };
            let (mut model, paths) = tiny(ranks, 3);
            let data = examples();
            let out = lorahub(&mut model, &paths, 4, &data, 4, 7, compat).unwrap();
            let w: Vec<f32> = serde_json::from_value(out["weights"].clone()).unwrap();
            let objective = out["objective"].as_f64().unwrap();
            assert_eq!(out["evaluations"], 4 * 8); // λ = 4 + ⌊3 ln 4⌋
            assert_eq!(out["forward_passes"], 4);
            // lorahub leaves the chosen composition fixed on the model: score it one candidate at a time
            let single = lorahub_objective(model.criterion(&data).unwrap(), &w);
            assert!((objective - single).abs() < 1e-5, "compat {compat}: {objective} vs {single}");
            if !compat {
                let (mut fresh, _) = tiny(ranks, 3);
                set_fixed(&mut fresh, &paths, &w);
                let again = lorahub_objective(fresh.criterion(&data).unwrap(), &w);
                assert!((objective - again).abs() < 1e-5, "{objective} vs {again}");
            }
            // the search improved on its start (w = 0 is the bare encoder)
            let (mut bare, _) = tiny(ranks, 3);
            set_fixed(&mut bare, &paths, &[0.0; 4]);
            assert!(objective < bare.criterion(&data).unwrap(), "compat {compat}");
        }
    }

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
}

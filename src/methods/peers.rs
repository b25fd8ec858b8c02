//! Peer methods on the same bank, shots and seeds: LoraHub's gradient-free search, dense merges (task
//! arithmetic, TIES, DARE, magnitude pruning), the best single module, and Arrow-style module retrieval.
//!
//! All of them fix a composition of the frozen bank, then train only the head on the composed encoder's
//! features — the same head training as `uniform`. Where a method must choose something from the few-shot
//! examples (LoraHub's weights, task arithmetic's λ, the best module) it scores candidates with a head-free
//! criterion: the cross-entropy of a nearest-class-prototype classifier on L2-normalised features (prototypes
//! leave the scored example out when its class has another one), temperature 0.1. Every candidate costs one
//! forward pass of the few-shot set, except in LoraHub's search, which scores a whole CMA-ES generation in a
//! few batched passes ([`score_population`]).

use super::common::{batch_of, features, Encoded, Item};
use crate::engine::cma::CmaEs;
use crate::engine::kernels::pool_forward;
use crate::lora::bank::{Composition, LoraModule};
use crate::lora::peft::Adapter;
use crate::models::bert::Batch;
use crate::models::classifier::Classifier;
use crate::models::encoder::{Encoder, InputBatch};
use crate::models::vit::Pixels;
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

/// Fixed composition weights `w` on every layer in `paths`.
pub(crate) fn set_fixed(model: &mut Classifier, paths: &[String], w: &[f32]) {
    for p in paths {
        let lin = model.encoder.linear_mut(p).unwrap();
        lin.comp = Composition::Fixed(w.to_vec());
        lin.invalidate();
    }
}

/// Most token rows a population forward pass takes. The length-sorted examples are cut into chunks of at most
/// `POPULATION_ROWS / λ` padded rows and each chunk is replicated for the whole population, so a generation
/// costs a few passes with little padding. Measured on the real model and bank (trec, 10 modules, λ = 10,
/// single-thread CPU seconds per generation): per-candidate forwards 0.87 (4-shot) and 2.3 (16-shot); one
/// pass of the whole padded population 0.86–0.92 (4-shot); 512 rows 0.50 / 1.76, 1024 0.52 / 1.76,
/// 2048 0.63 / 1.90. The batch is what makes short chunks pay: per-candidate forwards in chunks of 3–12
/// examples stay at 0.80–1.05.
const POPULATION_ROWS: usize = 1024;

/// Prototype losses of the candidate weight vectors `cands`, scored together. The few-shot examples are sorted
/// by length and cut into chunks (see [`POPULATION_ROWS`]); each chunk is replicated once per candidate and run
/// through one forward pass in which each copy's rows use that candidate's composition
/// ([`Composition::PerGroup`]; `sum_factors` for LoraHub's Σ w A, Σ w B). When one chunk's copies exceed the
/// budget the candidates are split too. Returns the losses, in `cands` order, and the number of passes.
#[allow(clippy::too_many_arguments)]
pub fn score_population(
    model: &mut Classifier,
    paths: &[String],
    data: &[Encoded],
    pad: u32,
    classes: usize,
    cands: &[Vec<f32>],
    sum_factors: bool,
) -> Result<(Vec<f64>, usize)> {
    score_population_in(model, paths, data, pad, classes, cands, sum_factors, POPULATION_ROWS)
}

#[allow(clippy::too_many_arguments)]
fn score_population_in(
    model: &mut Classifier,
    paths: &[String],
    data: &[Encoded],
    pad: u32,
    classes: usize,
    cands: &[Vec<f32>],
    sum_factors: bool,
    max_rows: usize,
) -> Result<(Vec<f64>, usize)> {
    let (d, ne, pooling) = (model.encoder.hidden(), data.len(), model.pooling);
    // Rows an example takes in a pass: its tokens, or for an image its patches plus the CLS token.
    let patch = match &model.encoder {
        Encoder::Vit(v) => v.cfg.patch_size.max(1),
        Encoder::Bert(_) => 1,
    };
    let rows_of = |e: &Encoded| match &e.item {
        Item::Tokens { ids, .. } => ids.len(),
        Item::Pixels { h, w, .. } => (h / patch) * (w / patch) + 1,
    };
    let mut order: Vec<usize> = (0..ne).collect();
    order.sort_by_key(|&i| rows_of(&data[i]));
    // feats[c] holds candidate c's pooled features, [ne, d] in input order.
    let mut feats = vec![vec![0.0f32; ne * d]; cands.len()];
    let mut passes = 0;
    let mut start = 0;
    // Rows of one copy of a chunk: the whole population's copies of it should fit one pass.
    let per_copy = (max_rows / cands.len().max(1)).max(1);
    while start < ne {
        // The longest run of (length-sorted) examples whose padded batch fits `per_copy` rows, at least one.
        let mut end = start + 1;
        while end < ne && (end + 1 - start) * rows_of(&data[order[end]]) <= per_copy {
            end += 1;
        }
        let chunk = &order[start..end];
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let (one, _) = batch_of(&items, pad);
        let n1 = chunk.len();
        let rows1 = n1 * rows_of(&data[order[end - 1]]);
        let per_pass = (max_rows / rows1.max(1)).clamp(1, cands.len().max(1));
        for (ci, group) in cands.chunks(per_pass).enumerate() {
            for p in paths {
                let lin = model.encoder.linear_mut(p).unwrap();
                lin.comp = Composition::PerGroup { weights: group.to_vec(), sum_factors };
                lin.invalidate();
            }
            let k = group.len();
            // The chunk repeated once per candidate: copy g is scored with candidate g's weights.
            let big = match &one {
                InputBatch::Tokens(b) => InputBatch::Tokens(Batch {
                    batch: b.batch * k,
                    seq: b.seq,
                    ids: b.ids.repeat(k),
                    types: b.types.repeat(k),
                    mask: b.mask.repeat(k),
                }),
                InputBatch::Pixels(p) => InputBatch::Pixels(Pixels {
                    batch: p.batch * k,
                    channels: p.channels,
                    height: p.height,
                    width: p.width,
                    data: p.data.repeat(k),
                }),
            };
            let (h, mask, seq) = model.encoder.forward((&big).into())?;
            passes += 1;
            let mut pooled = vec![0.0f32; n1 * k * d];
            pool_forward(pooling, h, &mask, n1 * k, seq, d, &mut pooled);
            for g in 0..k {
                let f = &mut feats[ci * per_pass + g];
                for (e, &i) in chunk.iter().enumerate() {
                    let row = (g * n1 + e) * d;
                    f[i * d..(i + 1) * d].copy_from_slice(&pooled[row..row + d]);
                }
            }
        }
        start = end;
    }
    let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
    Ok((feats.iter().map(|f| prototype_loss(f, &labels, classes, d)).collect(), passes))
}

/// LoraHub's objective for a weight vector and its prototype loss: loss + 0.05·mean|w|.
pub fn lorahub_objective(loss: f64, w: &[f32]) -> f64 {
    loss + 0.05 * w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len().max(1) as f64
}

/// LoraHub: CMA-ES ([`CmaEs`], default population) over module weights in [-1.5, 1.5] (initial mean 0, step
/// 0.5; points are clamped to the box before scoring), objective [`lorahub_objective`], `generations`
/// generations; the best point scored is kept. Each generation is scored together by [`score_population`].
/// `compat` composes like LoraHub's code (Σ w A and Σ w B as one LoRA; all modules of a layer must share rank
/// and scale) instead of the exact Σ w ΔW.
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
    // The chosen weights as a fixed composition (compat: the summed factors replace the bank as one module).
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
    let boxed = |x: &[f64]| -> Vec<f32> { x.iter().map(|v| v.clamp(-1.5, 1.5) as f32).collect() };
    let mut es = CmaEs::new(vec![0.0; n], 0.5, seed);
    let mut passes = 0;
    let mut err = None;
    for _ in 0..generations {
        let cands: Vec<Vec<f32>> = es.ask().iter().map(|x| boxed(x)).collect();
        match score_population(model, paths, data, pad, classes, &cands, compat) {
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
    use crate::engine::kernels::Pooling;
    use crate::models::bert::Bert;
    use crate::models::config::BertConfig;
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
        let (one_pass, passes) = score_population(&mut model, &paths, &data, 0, 3, &cands, false).unwrap();
        assert_eq!(passes, 1);
        // a budget of 20 rows splits the examples into chunks and the candidates into several passes
        let (split, passes) = score_population_in(&mut model, &paths, &data, 0, 3, &cands, false, 20).unwrap();
        assert!(passes > 4, "{passes}");
        for (g, w) in cands.iter().enumerate() {
            set_fixed(&mut model, &paths, w);
            let single = score(&mut model, &data, 0, 3).unwrap();
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
            let out = lorahub(&mut model, &paths, 4, &data, 0, 3, 4, 7, compat).unwrap();
            let w: Vec<f32> = serde_json::from_value(out["weights"].clone()).unwrap();
            let objective = out["objective"].as_f64().unwrap();
            assert_eq!(out["evaluations"], 4 * 8); // λ = 4 + ⌊3 ln 4⌋
            assert_eq!(out["forward_passes"], 4);
            // lorahub leaves the chosen composition fixed on the model: score it one candidate at a time
            let single = lorahub_objective(score(&mut model, &data, 0, 3).unwrap(), &w);
            assert!((objective - single).abs() < 1e-5, "compat {compat}: {objective} vs {single}");
            if !compat {
                let (mut fresh, _) = tiny(ranks, 3);
                set_fixed(&mut fresh, &paths, &w);
                let again = lorahub_objective(score(&mut fresh, &data, 0, 3).unwrap(), &w);
                assert!((objective - again).abs() < 1e-5, "{objective} vs {again}");
            }
            // the search improved on its start (w = 0 is the bare encoder)
            let (mut bare, _) = tiny(ranks, 3);
            set_fixed(&mut bare, &paths, &[0.0; 4]);
            assert!(objective < score(&mut bare, &data, 0, 3).unwrap(), "compat {compat}");
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

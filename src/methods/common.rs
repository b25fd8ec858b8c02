//! Pieces every method shares: encoded examples (token ids or preprocessed pixels), mini-batches, evaluation,
//! training loops.

use super::step::{invalidate, train_step, GradHook};
use super::task::TaskModel;
use crate::data::{Example, Examples};
use crate::engine::kernels::{pool_forward, softmax_cross_entropy, Pooling};
use crate::engine::param::AdamW;
use crate::models::classifier::Classifier;
use crate::models::encoder::{Frontend, InputBatch, LoadedModel};
use crate::models::tokenize::{pad_batch, TextEncoder};
use crate::models::vit::Pixels;
use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;
use std::sync::Arc;

/// What an encoded example holds for the model.
#[derive(Clone, Debug)]
pub enum Item {
    /// Token ids and token types (BERT).
    Tokens { ids: Vec<u32>, types: Vec<u32> },
    /// A preprocessed image `[channels, height, width]` (ViT `pixel_values` of one example).
    Pixels { c: usize, h: usize, w: usize, data: Arc<Vec<f32>> },
}

/// An example ready for the model.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub item: Item,
    pub label: usize,
}

impl Encoded {
    /// Sequence length (tokens) or pixel count, by which evaluation batches are ordered.
    pub fn len(&self) -> usize {
        match &self.item {
            Item::Tokens { ids, .. } => ids.len(),
            Item::Pixels { data, .. } => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl crate::data::Labelled for Encoded {
    fn label(&self) -> usize {
        self.label
    }
}

pub fn encode_all(tok: &TextEncoder, ex: &[Example]) -> Result<Vec<Encoded>> {
    ex.iter()
        .map(|e| {
            let (ids, types) = tok.encode(&e.text, e.pair.as_deref())?;
            Ok(Encoded { item: Item::Tokens { ids, types }, label: e.label })
        })
        .collect()
}

/// Encode a split for the model's front end: text through the tokenizer; images (bytes 0–255) to f32, a grey
/// image repeated into three channels when the model takes RGB, then the model's preprocessor (resize to its
/// size, rescale, normalise). Fails when text meets an image model or the other way round.
pub fn encode_examples(front: &Frontend, ex: &Examples) -> Result<Vec<Encoded>> {
    use rayon::prelude::*;
    match (front, ex) {
        (Frontend::Text(tok), Examples::Text(v)) => encode_all(tok, v),
        (Frontend::Prompt { tok, template, .. }, Examples::Text(v)) => v
            .iter()
            .map(|e| {
                let prompt = Frontend::prompt(template.as_deref(), &e.text, e.pair.as_deref());
                let (ids, types) = tok.encode(&prompt, None)?;
                Ok(Encoded { item: Item::Tokens { ids, types }, label: e.label })
            })
            .collect(),
        (Frontend::Image { pre, channels }, Examples::Images(shape, v)) => {
            let (c, h, w) = (shape.channels, shape.height, shape.width);
            let out_c = match (c, *channels) {
                (a, b) if a == b => a,
                (1, 3) => 3,
                (a, b) => bail!("the task's images have {a} channel(s) but the model takes {b}"),
            };
            let enc: Vec<Encoded> = v
                .par_iter()
                .map(|e| {
                    let grey: Vec<f32> = e.pixels.iter().map(|&b| b as f32).collect();
                    let img = if out_c == c { grey } else { grey.repeat(out_c) };
                    let (oh, ow, x) = pre.apply(&img, out_c, h, w)?;
                    Ok(Encoded { item: Item::Pixels { c: out_c, h: oh, w: ow, data: Arc::new(x) }, label: e.label })
                })
                .collect::<Result<_>>()?;
            if let Some(first) = enc.first() {
                if enc.iter().any(|e| e.len() != first.len()) {
                    bail!("the model's preprocessor gives images of different sizes; give it a fixed size (size.height/width)");
                }
            }
            Ok(enc)
        }
        (_, ex) => {
            check_kind(front, matches!(ex, Examples::Images(..)))?;
            unreachable!("check_kind refuses every other pairing")
        }
    }
}

/// Fail unless the front end takes the task's kind of examples (images or text).
pub fn check_kind(front: &Frontend, image_task: bool) -> Result<()> {
    match (front, image_task) {
        (Frontend::Text(_) | Frontend::Prompt { .. }, true) => {
            bail!("an image task needs an image model (ViT, DINOv2); this one is a text model")
        }
        (Frontend::Image { .. }, false) => {
            bail!("a text task needs a text model (BERT, T5, Llama); this one is an image model")
        }
        _ => Ok(()),
    }
}

/// Embeddings of `ex` through `lm`'s encoder alone (pooled, optionally L2-normalised), in input order: texts as
/// [`crate::models::hf::HfEncoder::embed`] computes them, images through [`encode_examples`].
pub fn embed_examples(
    lm: &mut LoadedModel,
    ex: &Examples,
    pooling: Pooling,
    normalize: bool,
    batch: usize,
) -> Result<Vec<Vec<f32>>> {
    lm.encoder()?;
    let (front, encoder) = lm.parts_mut();
    if let (Frontend::Text(tok), Examples::Text(v), Some(bert)) = (front, ex, encoder.and_then(|e| e.bert_mut())) {
        let texts: Vec<String> = v.iter().map(|e| e.text.clone()).collect();
        return crate::models::hf::embed_texts(bert, tok, &texts, pooling, normalize, batch);
    }
    let enc = encode_examples(&lm.frontend, ex)?;
    let pad = lm.pad_id();
    let d = lm.encoder()?.hidden();
    let mut out = Vec::with_capacity(enc.len());
    for chunk in enc.chunks(batch.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().collect();
        let (b, _) = batch_of(&items, pad);
        let (h, mask, seq) = lm.encoder_mut()?.forward((&b).into())?;
        let mut pooled = vec![0.0; chunk.len() * d];
        pool_forward(pooling, h, &mask, chunk.len(), seq, d, &mut pooled);
        if normalize {
            crate::engine::kernels::l2_normalize_rows(&mut pooled, d);
        }
        out.extend(pooled.chunks(d).map(|r| r.to_vec()));
    }
    Ok(out)
}

/// A batch of `items` (all text or all images of one size) and their labels.
pub fn batch_of(items: &[&Encoded], pad_id: u32) -> (InputBatch, Vec<usize>) {
    let labels = items.iter().map(|e| e.label).collect();
    match items.first().map(|e| &e.item) {
        Some(Item::Pixels { c, h, w, .. }) => {
            let (c, h, w) = (*c, *h, *w);
            let mut data = Vec::with_capacity(items.len() * c * h * w);
            for e in items {
                match &e.item {
                    Item::Pixels { data: d, .. } if d.len() == c * h * w => data.extend_from_slice(d),
                    _ => panic!("batch_of: a batch mixes images of different sizes or text and images"),
                }
            }
            (InputBatch::Pixels(Pixels { batch: items.len(), channels: c, height: h, width: w, data }), labels)
        }
        _ => {
            let seqs: Vec<(Vec<u32>, Vec<u32>)> = items
                .iter()
                .map(|e| match &e.item {
                    Item::Tokens { ids, types } => (ids.clone(), types.clone()),
                    Item::Pixels { .. } => panic!("batch_of: a batch mixes text and images"),
                })
                .collect();
            (InputBatch::Tokens(pad_batch(&seqs, pad_id)), labels)
        }
    }
}

/// Training-loop settings.
#[derive(Clone, Debug, Serialize)]
pub struct LoopOpts {
    pub steps: usize,
    pub batch: usize,
    pub seed: u64,
    pub weight_decay: f32,
    /// Linear warm-up over this fraction of the steps, then linear decay to zero.
    pub warmup_frac: f32,
}

impl LoopOpts {
    pub fn lr_factor(&self, t: usize) -> f32 {
        let warm = ((self.steps as f32) * self.warmup_frac).max(1.0);
        let t = t as f32;
        if t < warm {
            (t + 1.0) / warm
        } else {
            ((self.steps as f32 - t) / (self.steps as f32 - warm).max(1.0)).clamp(0.0, 1.0)
        }
    }
}

/// Seeded mini-batch order over `n` items: shuffled epochs, `batch` items a step.
pub struct Sampler {
    order: Vec<usize>,
    pos: usize,
    batch: usize,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(n: usize, batch: usize, seed: u64) -> Self {
        let mut s = Sampler {
            order: (0..n).collect(),
            pos: n,
            batch: batch.min(n).max(1),
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x5A3D_17E1),
        };
        s.order.shuffle(&mut s.rng);
        s.pos = 0;
        s
    }
    pub fn next_batch(&mut self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.batch);
        while out.len() < self.batch {
            if self.pos == self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.pos = 0;
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

/// Train the whole model (whatever is trainable) on `data`; `lr_for(name)` gives each parameter's base rate.
/// Returns the per-step losses.
pub fn train_model(
    model: &mut dyn TaskModel,
    data: &[Encoded],
    opts: &LoopOpts,
    lr_for: &dyn Fn(&str) -> f32,
    mut hook: Option<GradHook>,
    mut progress: impl FnMut(usize, f32),
) -> Result<Vec<f32>> {
    let opt = AdamW { weight_decay: opts.weight_decay, ..Default::default() };
    let mut sampler = Sampler::new(data.len(), opts.batch, opts.seed);
    let mut losses = Vec::with_capacity(opts.steps);
    for t in 0..opts.steps {
        let idx = sampler.next_batch();
        let items: Vec<&Encoded> = idx.iter().map(|&i| &data[i]).collect();
        let f = opts.lr_factor(t);
        let h: Option<GradHook> = hook.as_mut().map(|h| &mut **h as GradHook);
        let loss = train_step(model, &items, &opt, t as u64 + 1, &|n| lr_for(n) * f, h)?;
        losses.push(loss);
        progress(t, loss);
    }
    Ok(losses)
}

/// Pooled features of `data` through the (frozen) encoder, `[n, hidden]`, in input order.
pub fn features(model: &mut Classifier, data: &[Encoded], pad_id: u32, batch: usize) -> Result<Vec<f32>> {
    let d = model.encoder.hidden();
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].len());
    let mut out = vec![0.0f32; data.len() * d];
    for chunk in order.chunks(batch.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let (b, _) = batch_of(&items, pad_id);
        let n = items.len();
        let (h, mask, seq) = model.encoder.forward((&b).into())?;
        let mut pooled = vec![0.0; n * d];
        pool_forward(model.pooling, h, &mask, n, seq, d, &mut pooled);
        for (k, &i) in chunk.iter().enumerate() {
            out[i * d..(i + 1) * d].copy_from_slice(&pooled[k * d..(k + 1) * d]);
        }
    }
    Ok(out)
}

/// Train only the head on cached features (the encoder is frozen): same sampler, schedule and optimiser as
/// [`train_model`], so head-only methods get the same budget.
pub fn train_head_on_features(
    model: &mut Classifier,
    feats: &[f32],
    labels: &[usize],
    opts: &LoopOpts,
    lr: f32,
) -> Result<Vec<f32>> {
    let (d, c) = (model.encoder.hidden(), model.classes);
    let losses = train_linear_head(&mut model.head, feats, labels, d, c, opts, lr)?;
    invalidate(model);
    Ok(losses)
}

/// Train a linear head `head` (`[c, d]`) on features `feats` (`[n, d]`) with softmax cross-entropy: the
/// sampler, schedule and optimiser of [`train_model`]. Returns the per-step losses.
pub fn train_linear_head(
    head: &mut crate::lora::bank::BankLinear,
    feats: &[f32],
    labels: &[usize],
    d: usize,
    c: usize,
    opts: &LoopOpts,
    lr: f32,
) -> Result<Vec<f32>> {
    let opt = AdamW { weight_decay: opts.weight_decay, ..Default::default() };
    let mut sampler = Sampler::new(labels.len(), opts.batch, opts.seed);
    let mut losses = Vec::new();
    for t in 0..opts.steps {
        let idx = sampler.next_batch();
        let b = idx.len();
        let x: Vec<f32> = idx.iter().flat_map(|&i| feats[i * d..(i + 1) * d].iter().copied()).collect();
        let y: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
        let mut logits = vec![0.0; b * c];
        for p in [&mut head.w].into_iter().chain(head.bias.as_mut()) {
            p.zero_grad();
        }
        head.forward(&x, b, &mut logits);
        let (mut probs, mut dl) = (vec![0.0; b * c], vec![0.0; b * c]);
        let loss = softmax_cross_entropy(&logits, &y, c, &mut probs, &mut dl);
        if !loss.is_finite() {
            bail!("training diverged at step {}: loss is {loss}", t + 1);
        }
        head.backward(&x, &dl, b, None, false);
        let f = opts.lr_factor(t);
        for (_, p) in head.trainable_params_mut() {
            opt.step(p, t as u64 + 1, lr * f);
        }
        head.invalidate();
        losses.push(loss);
    }
    Ok(losses)
}

/// Class scores of `data` (one row of `classes` values per example: logits, or a generative model's answer
/// log-probabilities), in input order; examples are batched by length.
pub fn class_scores(model: &mut dyn TaskModel, data: &[Encoded], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].len());
    let mut out = vec![Vec::new(); data.len()];
    let c = model.classes();
    for chunk in order.chunks(batch.max(1)) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let s = model.class_scores(&items)?;
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = s[k * c..(k + 1) * c].to_vec();
        }
    }
    Ok(out)
}

/// The index of a row's largest score (the first on ties).
pub fn argmax(row: &[f32]) -> usize {
    (0..row.len()).fold(0, |best, j| if row[j] > row[best] { j } else { best })
}

/// Predictions on `data` (argmax of the class scores), in input order.
pub fn predict(model: &mut dyn TaskModel, data: &[Encoded], batch: usize) -> Result<Vec<usize>> {
    Ok(class_scores(model, data, batch)?.iter().map(|r| argmax(r)).collect())
}

/// Accuracy and macro-F1 (over the classes present in `gold` or `pred`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Scores {
    pub accuracy: f64,
    pub macro_f1: f64,
    pub n: usize,
}

pub fn score(gold: &[usize], pred: &[usize], classes: usize) -> Scores {
    let n = gold.len();
    let correct = gold.iter().zip(pred).filter(|(a, b)| a == b).count();
    let mut tp = vec![0usize; classes];
    let mut fp = vec![0usize; classes];
    let mut fnn = vec![0usize; classes];
    for (&g, &p) in gold.iter().zip(pred) {
        if g == p {
            tp[g] += 1;
        } else {
            fp[p] += 1;
            fnn[g] += 1;
        }
    }
    let mut f1s = Vec::new();
    for c in 0..classes {
        if tp[c] + fp[c] + fnn[c] == 0 {
            continue;
        }
        let denom = 2 * tp[c] + fp[c] + fnn[c];
        f1s.push(2.0 * tp[c] as f64 / denom as f64);
    }
    Scores {
        accuracy: if n == 0 { 0.0 } else { correct as f64 / n as f64 },
        macro_f1: if f1s.is_empty() { 0.0 } else { f1s.iter().sum::<f64>() / f1s.len() as f64 },
        n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_by_hand() {
        let s = score(&[0, 0, 1, 2], &[0, 1, 1, 2], 4);
        assert_eq!(s.accuracy, 0.75);
        // class 0: tp1 fn1 → 2/3; class 1: tp1 fp1 → 2/3; class 2: 1
        assert!((s.macro_f1 - (2.0 / 3.0 + 2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn schedule_warms_up_and_decays_to_zero() {
        let o = LoopOpts { steps: 100, batch: 4, seed: 0, weight_decay: 0.0, warmup_frac: 0.1 };
        assert!(o.lr_factor(0) < 0.2);
        assert!((o.lr_factor(9) - 1.0).abs() < 1e-6);
        assert!(o.lr_factor(99) < 0.02);
    }
}

//! The one task-level interface every method talks to, [`TaskModel`], and its two implementations:
//!
//! - [`Classifier`]: an encoder (BERT, ViT, DINOv2), pooling and a linear head; loss = softmax cross-entropy of
//!   the head's logits; head-free criterion = leave-one-out nearest-prototype cross-entropy of the pooled
//!   features ([`prototype_loss`]).
//! - [`RankClassifier`]: a generative model (T5, Llama) that ranks the label strings; loss = the answer tokens'
//!   cross-entropy; head-free criterion = that same loss without training (LoraHub's objective).
//!
//! No method knows which architecture it runs on: methods attach banks through [`LinearHost`], train through
//! [`TaskModel::loss_backward`] and [`TaskModel::trainable_params_mut`], choose compositions with
//! [`TaskModel::criterion`], and predict with [`TaskModel::class_scores`].

use super::common::{batch_of, features, Encoded, Item};
use crate::engine::kernels::pool_forward;
use crate::engine::param::Param;
use crate::lora::bank::{BankLinear, Composition};
use crate::lora::host::LinearHost;
use crate::models::bert::Batch;
use crate::models::classifier::Classifier;
use crate::models::encoder::{Encoder, InputBatch};
use crate::models::generative::RankClassifier;
use crate::models::vit::Pixels;
use anyhow::{bail, Result};

/// A model that classifies few-shot examples and can be adapted: see the module docs.
pub trait TaskModel: LinearHost {
    /// Number of classes.
    fn classes(&self) -> usize;
    /// Whether the model has a classification head (trained by every method, stored in the adapter).
    fn has_head(&self) -> bool;
    /// Forward pass of `items`, mean loss against their labels, and backward: gradients accumulate into the
    /// trainable parameters. Returns the loss.
    fn loss_backward(&mut self, items: &[&Encoded]) -> Result<f32>;
    /// Class scores `[items, classes]`, row-major; the prediction is the argmax of a row. Classifier: logits;
    /// rank classifier: each answer's summed log-probability. Errors on a non-finite score.
    fn class_scores(&mut self, items: &[&Encoded]) -> Result<Vec<f32>>;
    /// Head-free criterion of the current composition on `data` (lower is better), used to choose among
    /// compositions before any training (LoraHub's weights, a merge's λ, the best module, retrieval).
    fn criterion(&mut self, data: &[Encoded]) -> Result<f64>;
    /// The criterion of each candidate weight vector on the layers `paths` (`sum_factors`: LoraHub's Σ w A,
    /// Σ w B), and the number of forward passes spent. The layers are left with a per-group composition.
    fn criterion_population(
        &mut self,
        paths: &[String],
        data: &[Encoded],
        cands: &[Vec<f32>],
        sum_factors: bool,
    ) -> Result<(Vec<f64>, usize)> {
        let mut out = Vec::with_capacity(cands.len());
        for c in cands {
            for p in paths {
                let lin = self.linear_mut(p).expect("paths come from the model");
                lin.comp = Composition::PerGroup { weights: vec![c.clone()], sum_factors };
                lin.invalidate();
            }
            out.push(self.criterion(data)?);
        }
        Ok((out, cands.len()))
    }
    /// Pooled features of `data` under each candidate weight vector on the layers `paths` (`[n, hidden]` each,
    /// in input order) and the number of forward passes spent, for choosing among compositions by what a head
    /// trained on them does (`auto`'s cross-validation); `None` for a model without a head. The layers are left
    /// with a per-group composition.
    fn features_population(
        &mut self,
        _paths: &[String],
        _data: &[Encoded],
        _cands: &[Vec<f32>],
    ) -> Result<Option<(Vec<Vec<f32>>, usize)>> {
        Ok(None)
    }
    /// Train only the head, the rest frozen (head-only methods). Returns the per-step losses; a model without
    /// a head trains nothing and returns its loss on `data` once.
    fn train_head_only(
        &mut self,
        data: &[Encoded],
        opts: &super::common::LoopOpts,
        lr: f32,
        eval_batch: usize,
    ) -> Result<Vec<f32>>;
    /// Every trainable parameter, named (a classifier's head under `classifier.`).
    fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)>;
    /// Make every weight of the foundation model trainable or frozen (full fine-tuning).
    fn set_base_trainable(&mut self, on: bool);
    /// Every `BankLinear`, the head included (for invalidating cached merges and visiting compositions).
    fn all_linears_mut(&mut self) -> Vec<&mut BankLinear>;
    /// The adaptable linear layers with their PEFT paths, in layer order (for export).
    fn named_linears(&mut self) -> Vec<(String, &mut BankLinear)>;
    /// The classification head, if any.
    fn head(&self) -> Option<&BankLinear>;
    fn head_mut(&mut self) -> Option<&mut BankLinear>;

    fn zero_grad(&mut self) {
        for (_, p) in self.trainable_params_mut() {
            p.zero_grad();
        }
    }

    /// Drop every cached merge (after any weight or composition change).
    fn invalidate(&mut self) {
        for l in self.all_linears_mut() {
            l.invalidate();
        }
    }
}

impl TaskModel for Classifier {
    fn classes(&self) -> usize {
        self.classes
    }
    fn has_head(&self) -> bool {
        true
    }
    fn loss_backward(&mut self, items: &[&Encoded]) -> Result<f32> {
        let (batch, labels) = batch_of(items, self.pad);
        self.forward(&batch)?;
        self.backward(&labels)
    }
    fn class_scores(&mut self, items: &[&Encoded]) -> Result<Vec<f32>> {
        let (batch, _) = batch_of(items, self.pad);
        let logits = self.forward(&batch)?.to_vec();
        if let Some(i) = logits.iter().position(|x| !x.is_finite()) {
            bail!(
                "the logit of class {} for example {} is {} (the encoder's output overflowed)",
                i % self.classes,
                i / self.classes,
                logits[i]
            );
        }
        Ok(logits)
    }
    fn criterion(&mut self, data: &[Encoded]) -> Result<f64> {
        let pad = self.pad;
        let f = features(self, data, pad, 64)?;
        let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
        finite("prototype criterion", prototype_loss(&f, &labels, self.classes, self.encoder.hidden()))
    }
    fn criterion_population(
        &mut self,
        paths: &[String],
        data: &[Encoded],
        cands: &[Vec<f32>],
        sum_factors: bool,
    ) -> Result<(Vec<f64>, usize)> {
        score_population_in(self, paths, data, cands, sum_factors, POPULATION_ROWS)
    }
    fn features_population(
        &mut self,
        paths: &[String],
        data: &[Encoded],
        cands: &[Vec<f32>],
    ) -> Result<Option<(Vec<Vec<f32>>, usize)>> {
        Ok(Some(features_population_in(self, paths, data, cands, false, POPULATION_ROWS)?))
    }
    fn train_head_only(
        &mut self,
        data: &[Encoded],
        opts: &super::common::LoopOpts,
        lr: f32,
        eval_batch: usize,
    ) -> Result<Vec<f32>> {
        let pad = self.pad;
        let feats = features(self, data, pad, eval_batch)?;
        let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
        super::common::train_head_on_features(self, &feats, &labels, opts, lr)
    }
    fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        Classifier::trainable_params_mut(self)
    }
    fn set_base_trainable(&mut self, on: bool) {
        self.encoder.set_all_trainable(on);
    }
    fn all_linears_mut(&mut self) -> Vec<&mut BankLinear> {
        let mut v = self.encoder.linears_mut();
        v.push(&mut self.head);
        v
    }
    fn named_linears(&mut self) -> Vec<(String, &mut BankLinear)> {
        let paths = self.encoder.linear_paths();
        let lins = self.encoder.linears_mut();
        paths.into_iter().zip(lins).collect()
    }
    fn head(&self) -> Option<&BankLinear> {
        Some(&self.head)
    }
    fn head_mut(&mut self) -> Option<&mut BankLinear> {
        Some(&mut self.head)
    }
}

impl LinearHost for Classifier {
    fn linear_paths(&self) -> Vec<String> {
        self.encoder.linear_paths()
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        self.encoder.linear_mut(path)
    }
    fn resolve(&self, module: &str) -> Option<String> {
        LinearHost::resolve(&self.encoder, module)
    }
    fn describe(&self) -> String {
        LinearHost::describe(&self.encoder)
    }
}

fn prompts<'a>(items: &[&'a Encoded]) -> Result<Vec<&'a [u32]>> {
    items
        .iter()
        .map(|e| match &e.item {
            Item::Tokens { ids, .. } => Ok(&ids[..]),
            Item::Pixels { .. } => bail!("a generative model takes text, not images"),
        })
        .collect()
}

impl TaskModel for RankClassifier {
    fn classes(&self) -> usize {
        RankClassifier::classes(self)
    }
    fn has_head(&self) -> bool {
        false
    }
    fn loss_backward(&mut self, items: &[&Encoded]) -> Result<f32> {
        let p = prompts(items)?;
        let labels: Vec<usize> = items.iter().map(|e| e.label).collect();
        self.loss(&p, &labels, true)
    }
    fn class_scores(&mut self, items: &[&Encoded]) -> Result<Vec<f32>> {
        let p = prompts(items)?;
        self.scores(&p)
    }
    /// The mean answer-token cross-entropy over `data` (LoraHub's objective), in batches of 16.
    fn criterion(&mut self, data: &[Encoded]) -> Result<f64> {
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in data.chunks(16) {
            let items: Vec<&Encoded> = chunk.iter().collect();
            let p = prompts(&items)?;
            let labels: Vec<usize> = chunk.iter().map(|e| e.label).collect();
            let tokens: usize = labels.iter().map(|&y| self.answers[y].len()).sum();
            sum += self.loss(&p, &labels, false)? as f64 * tokens as f64;
            n += tokens;
        }
        finite("answer cross-entropy criterion", sum / n.max(1) as f64)
    }
    fn train_head_only(
        &mut self,
        data: &[Encoded],
        _opts: &super::common::LoopOpts,
        _lr: f32,
        _eval_batch: usize,
    ) -> Result<Vec<f32>> {
        Ok(vec![self.criterion(data)? as f32])
    }
    fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.lm.trainable_params_mut()
    }
    fn set_base_trainable(&mut self, on: bool) {
        self.lm.set_body_trainable(on);
    }
    fn all_linears_mut(&mut self) -> Vec<&mut BankLinear> {
        self.lm.linears_mut().into_iter().map(|(_, l)| l).collect()
    }
    fn named_linears(&mut self) -> Vec<(String, &mut BankLinear)> {
        self.lm.linears_mut()
    }
    fn head(&self) -> Option<&BankLinear> {
        None
    }
    fn head_mut(&mut self) -> Option<&mut BankLinear> {
        None
    }
}

impl LinearHost for RankClassifier {
    fn linear_paths(&self) -> Vec<String> {
        self.lm.linear_paths()
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        self.lm.linear_mut(path)
    }
    fn resolve(&self, module: &str) -> Option<String> {
        self.lm.resolve(module)
    }
    fn describe(&self) -> String {
        self.lm.describe()
    }
}

fn finite(what: &str, v: f64) -> Result<f64> {
    if !v.is_finite() {
        bail!("the {what} is {v} (the model's output overflowed, or a bank module's values are too large)");
    }
    Ok(v)
}

/// A task model of either kind, owned (what [`super::adapt_encoded`] returns).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum TaskNet {
    Classifier(Classifier),
    Ranker(RankClassifier),
}

impl TaskNet {
    pub fn as_dyn(&mut self) -> &mut dyn TaskModel {
        match self {
            TaskNet::Classifier(c) => c,
            TaskNet::Ranker(r) => r,
        }
    }

    /// The encoder classifier (`None` for a rank classifier).
    pub fn classifier(&self) -> Option<&Classifier> {
        match self {
            TaskNet::Classifier(c) => Some(c),
            TaskNet::Ranker(_) => None,
        }
    }

    pub fn classifier_mut(&mut self) -> Option<&mut Classifier> {
        match self {
            TaskNet::Classifier(c) => Some(c),
            TaskNet::Ranker(_) => None,
        }
    }

    pub fn ranker(&self) -> Option<&RankClassifier> {
        match self {
            TaskNet::Ranker(r) => Some(r),
            TaskNet::Classifier(_) => None,
        }
    }
}

/// Head-free score of features: nearest-prototype cross-entropy (lower is better). Each example is scored
/// against its class prototype without itself when its class has another example (leave-one-out), features and
/// prototypes L2-normalised, temperature 0.1.
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
            let mut proto: Vec<f64> =
                (0..d).map(|k| sums[c * d + k] - if own { f[i * d + k] as f64 } else { 0.0 }).collect();
            let norm = proto.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
            proto.iter_mut().for_each(|v| *v /= norm);
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

/// Most token rows a population forward pass takes. The length-sorted examples are cut into chunks of at most
/// `POPULATION_ROWS / λ` padded rows and each chunk is replicated for the whole population, so a generation
/// costs a few passes with little padding. Measured on the real model and bank (trec, 10 modules, λ = 10,
/// single-thread CPU seconds per generation): per-candidate forwards 0.87 (4-shot) and 2.3 (16-shot); one
/// pass of the whole padded population 0.86–0.92 (4-shot); 512 rows 0.50 / 1.76, 1024 0.52 / 1.76,
/// 2048 0.63 / 1.90. The batch is what makes short chunks pay: per-candidate forwards in chunks of 3–12
/// examples stay at 0.80–1.05.
pub const POPULATION_ROWS: usize = 1024;

/// Prototype losses of the candidate weight vectors `cands`, scored together. The few-shot examples are sorted
/// by length and cut into chunks (see [`POPULATION_ROWS`]); each chunk is replicated once per candidate and run
/// through one forward pass in which each copy's rows use that candidate's composition
/// ([`Composition::PerGroup`]; `sum_factors` for LoraHub's Σ w A, Σ w B). When one chunk's copies exceed the
/// budget the candidates are split too. Returns the losses, in `cands` order, and the number of passes.
pub fn score_population_in(
    model: &mut Classifier,
    paths: &[String],
    data: &[Encoded],
    cands: &[Vec<f32>],
    sum_factors: bool,
    max_rows: usize,
) -> Result<(Vec<f64>, usize)> {
    let (d, classes) = (model.encoder.hidden(), model.classes);
    let (feats, passes) = features_population_in(model, paths, data, cands, sum_factors, max_rows)?;
    let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
    let losses = feats
        .iter()
        .enumerate()
        .map(|(c, f)| finite(&format!("prototype criterion of candidate {c}"), prototype_loss(f, &labels, classes, d)))
        .collect::<Result<Vec<f64>>>()?;
    Ok((losses, passes))
}

/// The pooled features of `data` under each candidate of `cands` (`[n, hidden]` each, input order), computed
/// in the batched population passes of [`score_population_in`], and the number of passes.
pub fn features_population_in(
    model: &mut Classifier,
    paths: &[String],
    data: &[Encoded],
    cands: &[Vec<f32>],
    sum_factors: bool,
    max_rows: usize,
) -> Result<(Vec<Vec<f32>>, usize)> {
    let (d, ne, pooling, pad) = (model.encoder.hidden(), data.len(), model.pooling, model.pad);
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
                let lin = model.encoder.linear_mut(p).expect("paths come from the model");
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
    Ok((feats, passes))
}

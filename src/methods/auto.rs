//! `auto`: the composition loracomp recommends. It is not one of the paper's methods (`learned` is); it is
//! what the task-shift measurements in docs/methods.md ("`auto`") found to win, on any architecture:
//!
//! 1. **Retrieval.** Every bank module alone (weight 1) is scored by the model's head-free criterion
//!    ([`TaskModel::criterion_population`]: leave-one-out prototype loss on an encoder, answer cross-entropy on
//!    a generative model) and the modules are ranked by it.
//! 2. **Candidates.** No module at all (the bare model), and for each set size k in {1, 2, 3, N} (capped by
//!    `top_k`, N = all modules) the k best-ranked modules with equal weights summing to each total scale T of
//!    `scales`: ΔW = (T/k)·Σ_{n ∈ top k} ΔW_n. Unlike `learned`'s softmax, T may exceed 1 ("more than one
//!    module's worth", kitchen_and_dining ×2 on TREC) or be 0 ("no module", HWU).
//! 3. **Selection.** By default (`--auto-select criterion`) the candidate with the lowest head-free criterion
//!    (the leave-one-out prototype loss of its features; a generative model's answer cross-entropy) wins.
//!    With one example in some class an encoder's prototype criterion cannot leave it out and is ~0 for every
//!    candidate, so a fixed composition is kept instead: the best-ranked module at weight
//!    [`ONE_SHOT_LEAD`] plus the whole bank at (1 − [`ONE_SHOT_LEAD`])/N each (total scale 1), the retrieval
//!    choice shrunk halfway towards uniform composition, since one example a class ranks the modules
//!    noisily (measurements at [`ONE_SHOT_LEAD`]). `--auto-select cv`
//!    chooses by cross-validation inside the few-shot set instead (a user has no validation split): the
//!    examples are split into `folds` stratified folds (fewer when a class has fewer examples), and for each
//!    candidate a fresh head is trained on the other folds' features, as the final head is trained, and
//!    scored on the held-out fold; the highest held-out accuracy wins, ties going to the lower held-out
//!    cross-entropy, then to the earlier candidate. On the task-shift suite the criterion chose better
//!    (docs/methods.md, "`auto`"): 4 folds of one example a class make held-out accuracy too coarse.
//! 4. **Training.** The chosen composition is fixed and the head is trained on its features for
//!    max(steps, ⌈epochs·n/batch⌉) steps ([`head_steps`]): a budget that grows with the few-shot set.
//! 5. **A LoRA on top** (when every class has at least `lora_from` examples): a fresh LoRA (the `lora`
//!    method's rank, alpha, targets and learning rate) is trained with the head for `steps` steps on top of
//!    the fixed composition, the head starting from step 4's. The layer computes
//!    `y = x·(W + Σ_n w_n·s_n·B_n·A_n + s·B·A)ᵀ + b`, with only `A`, `B` and the head trainable, and exports
//!    exactly as one PEFT LoRA (`export.rs`). With few examples a class the composition is what transfers;
//!    with more, a LoRA trained from scratch overtakes it (docs/methods.md, "`auto`"), and one started on the
//!    composition keeps both.
//!
//! Cost: N + |candidates| forward passes over the few-shot set (batched into population passes on an
//! encoder), and folds × |candidates| head trainings on cached features.

use super::common::{argmax, train_linear_head, Encoded, LoopOpts};
use super::peers::{argmin_finite, set_fixed};
use super::task::TaskModel;
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{json, Value};

/// `auto`'s settings (`adapt --method auto`: `--auto-scales`, `--auto-top-k`, `--auto-folds`,
/// `--auto-epochs`).
#[derive(Clone, Debug, Serialize)]
pub struct AutoOpts {
    /// Total scales T of the candidate compositions (Σ of the kept modules' weights); 0 is always a candidate.
    pub scales: Vec<f32>,
    /// The largest retrieved set tried besides the whole bank (set sizes 1, 2, 3 up to this, and N).
    pub top_k: usize,
    /// How the candidate is chosen.
    pub select: AutoSelect,
    /// Cross-validation folds (at most the smallest class's example count), with [`AutoSelect::Cv`].
    pub folds: usize,
    /// Head-training epochs: the head trains max(steps, ⌈epochs·n/batch⌉) steps.
    pub epochs: usize,
    /// Train a LoRA on top of the chosen composition (step 5) when every class has at least this many
    /// examples; `None`: never.
    pub lora_from: Option<usize>,
}

impl Default for AutoOpts {
    fn default() -> Self {
        AutoOpts {
            scales: vec![0.5, 1.0, 2.0, 3.0],
            top_k: 3,
            select: AutoSelect::Criterion,
            folds: 4,
            epochs: 20,
            lora_from: Some(DEFAULT_LORA_FROM),
        }
    }
}

/// Examples per class from which `auto` trains a LoRA on top of its composition (docs/methods.md, "`auto`").
pub const DEFAULT_LORA_FROM: usize = 2;

impl AutoOpts {
    /// Whether step 5 runs for a few-shot set whose smallest class has `min_count` examples.
    pub fn lora_stage(&self, min_count: usize) -> bool {
        self.lora_from.is_some_and(|k| min_count >= k)
    }

    /// Check the settings (each error names its option).
    pub fn validate(&self) -> Result<()> {
        if self.scales.is_empty() || self.scales.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            bail!(
                "--auto-scales must be positive finite numbers (scale 0, no module, is always a candidate), got {:?}",
                self.scales
            );
        }
        if self.top_k == 0 {
            bail!("--auto-top-k must be at least 1 (0 would keep no module)");
        }
        if self.folds < 2 {
            bail!("--auto-folds must be at least 2 (one fold holds nothing out), got {}", self.folds);
        }
        if self.epochs == 0 {
            bail!("--auto-epochs must be at least 1");
        }
        if self.lora_from == Some(0) {
            bail!("--auto-lora-from must be at least 1 example per class (or off)");
        }
        Ok(())
    }
}

/// How `auto` chooses among its candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AutoSelect {
    /// The head-free criterion (leave-one-out prototype loss; answer cross-entropy on a generative model).
    Criterion,
    /// Cross-validation of the head inside the few-shot set (held-out accuracy, then cross-entropy).
    Cv,
}

impl std::str::FromStr for AutoSelect {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "criterion" => Ok(AutoSelect::Criterion),
            "cv" => Ok(AutoSelect::Cv),
            _ => Err(format!("unknown selection '{s}' (criterion, cv)")),
        }
    }
}

/// The smallest class's example count in `data` (classes without examples do not count).
pub fn min_class_count(data: &[Encoded], classes: usize) -> usize {
    let mut counts = vec![0usize; classes];
    for e in data {
        if let Some(c) = counts.get_mut(e.label) {
            *c += 1;
        }
    }
    counts.into_iter().filter(|&c| c > 0).min().unwrap_or(0)
}

/// `--auto-lora-from`: a number of examples per class, or `off` (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraFrom(pub Option<usize>);

impl std::str::FromStr for LoraFrom {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "off" => Ok(LoraFrom(None)),
            _ => match s.parse::<usize>() {
                Ok(0) | Err(_) => Err(format!("expected a number of examples per class ≥ 1, or off; got '{s}'")),
                Ok(k) => Ok(LoraFrom(Some(k))),
            },
        }
    }
}

impl<'de> serde::Deserialize<'de> for LoraFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Word(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Count(k) => k.to_string(),
            Raw::Word(w) => w,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for LoraFrom {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Some(k) => s.serialize_u64(k as u64),
            None => s.serialize_str("off"),
        }
    }
}

/// Head-training steps for `n` examples: the loop's own budget, or `epochs` passes over them if more.
pub fn head_steps(loop_opts: &LoopOpts, epochs: usize, n: usize) -> usize {
    loop_opts.steps.max((epochs * n).div_ceil(loop_opts.batch.max(1)))
}

/// With one example in some class, the weight of the best-ranked module in the composition `auto` keeps,
/// on top of the whole bank at (1 − `ONE_SHOT_LEAD`)/N each. Measured on every 1-shot cell of three text
/// suites (mean accuracy %, task-shift-quick 15 cells / task-shift-mixed 18 / label-shift-all 30;
/// docs/methods.md, "`auto`"): the best-ranked module alone (lead 1) 57.6 / 41.9 / 74.6; lead 0.7
/// 57.0 / 42.6 / 75.8; lead 0.5 56.9 / 42.9 / 76.4; lead 0.3 56.2 / – / –; the whole bank alone (uniform)
/// 54.8 / 43.3 / 76.3. Which end wins flips between suites, and within one task (TREC: +3.0 for the
/// module alone under task-shift-quick's bank, −5.8 under task-shift-mixed's); 0.5 has the best mean.
pub const ONE_SHOT_LEAD: f32 = 0.5;

/// One candidate composition: the kept modules (bank indices) with weights summing to `scale`: `lead` on the
/// first of them, and the rest of `scale` split equally over all of them.
struct Candidate {
    modules: Vec<usize>,
    scale: f32,
    lead: f32,
}

impl Candidate {
    fn new(modules: Vec<usize>, scale: f32) -> Candidate {
        Candidate { modules, scale, lead: 0.0 }
    }

    fn weights(&self, n: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; n];
        for &m in &self.modules {
            w[m] = (self.scale - self.lead) / self.modules.len() as f32;
        }
        if let Some(&first) = self.modules.first() {
            w[first] += self.lead;
        }
        w
    }
}

/// Stratified folds: the i-th example of each class (in input order) goes to fold i mod `folds`.
fn fold_of(labels: &[usize], classes: usize, folds: usize) -> Vec<usize> {
    let mut seen = vec![0usize; classes];
    labels
        .iter()
        .map(|&y| {
            let f = seen[y] % folds;
            seen[y] += 1;
            f
        })
        .collect()
}

/// Held-out accuracy and mean cross-entropy of heads trained on the other folds, pooled over the folds.
#[allow(clippy::too_many_arguments)]
fn cross_validate(
    head0: &crate::lora::bank::BankLinear,
    feats: &[f32],
    labels: &[usize],
    fold: &[usize],
    folds: usize,
    classes: usize,
    loop_opts: &LoopOpts,
    epochs: usize,
    lr: f32,
) -> Result<(f64, f64)> {
    let d = head0.din;
    let (mut correct, mut ce, mut total) = (0usize, 0.0f64, 0usize);
    for f in 0..folds {
        let train: Vec<usize> = (0..labels.len()).filter(|&i| fold[i] != f).collect();
        let test: Vec<usize> = (0..labels.len()).filter(|&i| fold[i] == f).collect();
        let x: Vec<f32> = train.iter().flat_map(|&i| feats[i * d..(i + 1) * d].iter().copied()).collect();
        let y: Vec<usize> = train.iter().map(|&i| labels[i]).collect();
        let mut head = head0.clone();
        let opts = LoopOpts { steps: head_steps(loop_opts, epochs, train.len()), ..loop_opts.clone() };
        train_linear_head(&mut head, &x, &y, d, classes, &opts, lr)?;
        let xt: Vec<f32> = test.iter().flat_map(|&i| feats[i * d..(i + 1) * d].iter().copied()).collect();
        let mut logits = vec![0.0f32; test.len() * classes];
        head.forward(&xt, test.len(), &mut logits);
        for (r, &i) in test.iter().enumerate() {
            let row = &logits[r * classes..(r + 1) * classes];
            let mx = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let lse = mx + row.iter().map(|&v| (v as f64 - mx).exp()).sum::<f64>().ln();
            ce += lse - row[labels[i]] as f64;
            correct += usize::from(argmax(row) == labels[i]);
            total += 1;
        }
    }
    Ok((correct as f64 / total.max(1) as f64, ce / total.max(1) as f64))
}

/// Run steps 1–3 on the bank layers `paths` (N = `n` modules) and leave the chosen composition fixed on
/// them. Returns the choices for metrics.json: the module ranking and criteria, every candidate with its
/// scores, the chosen one, and the head-training steps.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &mut dyn TaskModel,
    paths: &[String],
    n: usize,
    data: &[Encoded],
    opts: &AutoOpts,
    loop_opts: &LoopOpts,
    lr_head: f32,
) -> Result<Value> {
    // 1. Each module alone, ranked by the head-free criterion.
    let singles: Vec<Vec<f32>> = (0..n)
        .map(|j| {
            let mut w = vec![0.0f32; n];
            w[j] = 1.0;
            w
        })
        .collect();
    let (module_crit, mut passes) = model.criterion_population(paths, data, &singles, false)?;
    crate::util::ensure_finite(module_crit.iter().copied(), "auto", "bank module")?;
    let mut ranking: Vec<usize> = (0..n).collect();
    ranking.sort_by(|&a, &b| module_crit[a].total_cmp(&module_crit[b]));

    // 2. Candidates: none, then the top-k modules at each total scale.
    let mut sizes: Vec<usize> = [1, 2, 3].into_iter().filter(|&k| k <= opts.top_k.min(n)).collect();
    if !sizes.contains(&n) {
        sizes.push(n);
    }
    let mut cands = vec![Candidate::new(Vec::new(), 0.0)];
    for &k in &sizes {
        for &s in &opts.scales {
            cands.push(Candidate::new(ranking[..k].to_vec(), s));
        }
    }
    let mut weights: Vec<Vec<f32>> = cands.iter().map(|c| c.weights(n)).collect();

    // 3. Selection: cross-validation of the head where there is one and every class has two examples.
    let labels: Vec<usize> = data.iter().map(|e| e.label).collect();
    let classes = model.classes();
    let min_count = min_class_count(data, classes);
    let folds = opts.folds.min(min_count);
    let head0 = model.head().cloned();
    let mut criterion = Vec::with_capacity(cands.len());
    let mut cv: Vec<(f64, f64)> = Vec::new();
    match (model.features_population(paths, data, &weights)?, head0) {
        (Some((feats, p)), Some(head0)) => {
            passes += p;
            let d = head0.din;
            for (c, f) in feats.iter().enumerate() {
                let l = super::task::prototype_loss(f, &labels, classes, d);
                if !l.is_finite() {
                    bail!("auto: the prototype criterion of candidate {c} is {l}");
                }
                criterion.push(l);
            }
            if folds >= 2 && opts.select == AutoSelect::Cv {
                let fold = fold_of(&labels, classes, folds);
                for f in &feats {
                    cv.push(cross_validate(
                        &head0,
                        f,
                        &labels,
                        &fold,
                        folds,
                        classes,
                        loop_opts,
                        opts.epochs,
                        lr_head,
                    )?);
                }
            }
        }
        _ => {
            let (c, p) = model.criterion_population(paths, data, &weights, false)?;
            passes += p;
            criterion = c;
        }
    }
    // With one example in a class and a head, the prototype criterion cannot leave that example out and is
    // ~0 for every candidate (0.001–0.07 on the task-shift suite): a fixed composition is kept, the
    // best-ranked module at ONE_SHOT_LEAD plus the whole bank (ONE_SHOT_LEAD's measurements).
    let singleton = model.has_head() && min_count < 2;
    let mut fallback = None;
    if singleton && cv.is_empty() {
        let lead = if n > 1 { ONE_SHOT_LEAD } else { 0.0 };
        let c = Candidate { modules: ranking.clone(), scale: 1.0, lead };
        let w = c.weights(n);
        fallback = Some(match weights.iter().position(|v| *v == w) {
            Some(i) => i,
            None => {
                cands.push(c);
                let (c, p) = model.criterion_population(paths, data, std::slice::from_ref(&w), false)?;
                passes += p;
                criterion.push(c[0]);
                weights.push(w);
                cands.len() - 1
            }
        });
    }
    let chosen = if let Some(i) = fallback {
        i
    } else if cv.is_empty() {
        argmin_finite(&criterion, "auto", "candidate composition")?
    } else {
        crate::util::ensure_finite(cv.iter().map(|c| c.1), "auto", "candidate's held-out cross-entropy")?;
        (0..cv.len()).fold(0, |best, c| {
            let better = cv[c].0 > cv[best].0 || (cv[c].0 == cv[best].0 && cv[c].1 < cv[best].1);
            if better {
                c
            } else {
                best
            }
        })
    };
    set_fixed(model, paths, &weights[chosen]);
    let listed: Vec<Value> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({"modules": c.modules, "scale": c.scale, "criterion": criterion[i]});
            if c.lead != 0.0 {
                v["lead"] = json!(c.lead);
            }
            if let Some((acc, ce)) = cv.get(i) {
                v["cv_accuracy"] = json!(acc);
                v["cv_loss"] = json!(ce);
            }
            v
        })
        .collect();
    Ok(json!({
        "selection": match (fallback.is_some(), cv.is_empty()) {
            (true, _) => "best-ranked module and the whole bank (a class has one example)",
            (false, true) => "criterion",
            (false, false) => "cross-validation",
        },
        "folds": if cv.is_empty() { 0 } else { folds },
        "ranking": ranking,
        "module_criterion": module_crit,
        "candidates": listed,
        "chosen": chosen,
        "kept": cands[chosen].modules,
        "scale": cands[chosen].scale,
        "weights": weights[chosen],
        "forward_passes": passes,
        "head_steps": head_steps(loop_opts, opts.epochs, data.len()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_are_stratified() {
        let labels = [0, 1, 0, 1, 0, 1, 0, 2, 2];
        assert_eq!(fold_of(&labels, 3, 2), vec![0, 0, 1, 1, 0, 0, 1, 0, 1]);
    }

    #[test]
    fn the_head_budget_grows_with_the_examples() {
        let o = LoopOpts { steps: 100, batch: 16, seed: 0, weight_decay: 0.0, warmup_frac: 0.06 };
        assert_eq!(head_steps(&o, 20, 24), 100);
        assert_eq!(head_steps(&o, 20, 1232), 1540);
    }
}

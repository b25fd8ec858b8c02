//! The application layer: plain specs for each command (`train`, `adapt`, `eval`, `compose`, `predict`) and the
//! functions that run them. The CLI (clap, in `cli/`) and the sweep both build specs and call these; nothing
//! here knows about command-line parsing.
//!
//! Options belong to the method that uses them: [`MethodOptions::apply`] refuses an option that does not apply
//! to the chosen method, and a value that would turn the method into another one (a no-op), naming the option.

use crate::data::{Shots, Task};
use crate::engine::kernels::Pooling;
use crate::lora::peft::Adapter;
use crate::methods::common::{argmax, check_kind, class_scores, encode_examples, predict as predict_all, score};
use crate::methods::task::{TaskModel, TaskNet};
use crate::methods::{adapt_encoded_with, AdaptOpts, Method, Retrieval};
use crate::models::encoder::LoadedModel;
use crate::models::kind::ModelKind;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub use crate::methods::DEFAULT_STEPS;

/// What `train` and `adapt` share.
#[derive(Clone, Debug)]
pub struct Common {
    pub model: PathBuf,
    pub task: PathBuf,
    pub seed: u64,
    /// Optimisation steps (`adapt`: [`DEFAULT_STEPS`]; `train`: from the epochs).
    pub steps: Option<usize>,
    pub batch: usize,
    /// Learning rate of the method's own parameters (LoRA factors, logits, model weights).
    pub lr: Option<f32>,
    /// Learning rate of a classifier head (encoders only).
    pub lr_head: Option<f32>,
    pub weight_decay: f32,
    /// Pooling of an encoder's output (encoders only; default by architecture).
    pub pooling: Option<Pooling>,
    pub max_len: usize,
    pub force: bool,
    pub allow_base_mismatch: bool,
    /// Prompt template of a generative model (`{text}`, `{text_pair}`).
    pub template: Option<String>,
    /// Split to evaluate on after training (default: `test` when the task has it, else nothing).
    pub eval_split: Option<String>,
    /// No progress on stderr.
    pub quiet: bool,
}

impl Common {
    pub fn new(model: impl Into<PathBuf>, task: impl Into<PathBuf>) -> Self {
        Common {
            model: model.into(),
            task: task.into(),
            seed: 0,
            steps: None,
            batch: 16,
            lr: None,
            lr_head: None,
            weight_decay: 0.0,
            pooling: None,
            max_len: crate::models::hf::DEFAULT_MAX_LEN,
            force: false,
            allow_base_mismatch: false,
            template: None,
            eval_split: None,
            quiet: false,
        }
    }
}

/// `train`: one upstream LoRA (bank building).
#[derive(Clone, Debug)]
pub struct TrainSpec {
    pub common: Common,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    /// Target modules (default: the architecture's query and value projections).
    pub targets: Option<Vec<String>>,
    pub epochs: usize,
    /// Train on K examples per class instead of the whole split.
    pub shots: Option<usize>,
}

/// Settings that belong to one method or another; `None` / `false` = not given.
#[derive(Clone, Debug, Default)]
pub struct MethodOptions {
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub targets: Option<Vec<String>>,
    pub global_weights: bool,
    pub entropy_penalty: Option<f32>,
    pub lorahub_generations: Option<usize>,
    pub density: Option<f32>,
    pub drop_p: Option<f32>,
    pub select: Option<usize>,
    pub select_by: Option<Retrieval>,
    /// auto: total scales of the candidate compositions.
    pub auto_scales: Option<Vec<f32>>,
    /// auto: the largest retrieved set tried besides the whole bank.
    pub auto_top_k: Option<usize>,
    /// auto: how the candidate is chosen.
    pub auto_select: Option<crate::methods::auto::AutoSelect>,
    /// auto: cross-validation folds (with `auto_select` cv).
    pub auto_folds: Option<usize>,
    /// auto: head-training epochs (the head trains max(steps, ⌈epochs·n/batch⌉) steps).
    pub auto_epochs: Option<usize>,
    /// auto: examples per class from which a LoRA is trained on top of the composition; `Some(None)` = never.
    pub auto_lora_from: Option<Option<usize>>,
}

impl MethodOptions {
    /// Put the given options into `o` for `method`; an error names any option that does not apply to it, or
    /// whose value would make it a no-op.
    pub fn apply(&self, method: Method, kind: ModelKind, o: &mut AdaptOpts) -> Result<()> {
        let m = method.name();
        let refuse = |flag: &str, applies: &str| -> Result<()> {
            bail!("{flag} does not apply to --method {m} (it is an option of {applies})")
        };
        // auto's LoRA stage takes the lora method's settings, unless it is switched off.
        let auto_lora = method == Method::Auto && self.auto_lora_from != Some(None);
        let lora = method == Method::Lora || auto_lora;
        let lora_owners = "lora, and auto's LoRA stage";
        if self.rank.is_some() && !lora {
            refuse("--rank", lora_owners)?;
        }
        if self.alpha.is_some() && !lora {
            refuse("--alpha", lora_owners)?;
        }
        if self.targets.is_some() && !lora {
            refuse("--targets", lora_owners)?;
        }
        if let Some(r) = self.rank {
            if r == 0 {
                bail!("--rank must be at least 1");
            }
            o.rank = r;
        }
        if let Some(a) = self.alpha {
            if !a.is_finite() || a == 0.0 {
                bail!("--alpha must be a finite non-zero number (0 would switch the LoRA off), got {a}");
            }
            o.alpha = a;
        }
        o.targets = self.targets.clone().unwrap_or_else(|| kind.default_targets());
        let learned = method == Method::Learned;
        if self.global_weights && !learned {
            refuse("--global-weights", "learned")?;
        }
        o.global_weights = self.global_weights;
        if let Some(e) = self.entropy_penalty {
            if !learned {
                refuse("--entropy-penalty", "learned")?;
            }
            if !e.is_finite() {
                bail!("--entropy-penalty must be a finite number, got {e}");
            }
            o.entropy_penalty = e;
        }
        if let Some(g) = self.lorahub_generations {
            if !matches!(method, Method::Lorahub | Method::LorahubCompat) {
                refuse("--lorahub-generations", "lorahub and lorahub-compat")?;
            }
            if g == 0 {
                bail!("--lorahub-generations must be at least 1 (0 would search nothing and keep w = 0)");
            }
            o.lorahub_generations = g;
        }
        if let Some(d) = self.density {
            if !matches!(method, Method::Ties | Method::DareTies | Method::MagnitudePrune) {
                refuse("--density", "ties, dare-ties and magnitude-prune")?;
            }
            if !(d > 0.0 && d <= 1.0) {
                bail!("--density must be in (0, 1] (the fraction of entries kept; 0 keeps nothing), got {d}");
            }
            o.density = d;
        }
        if let Some(p) = self.drop_p {
            if !matches!(method, Method::Dare | Method::DareTies) {
                refuse("--drop-p", "dare and dare-ties")?;
            }
            if !(p > 0.0 && p < 1.0) {
                bail!("--drop-p must be in (0, 1) (1 drops everything, 0 is task arithmetic), got {p}");
            }
            o.drop_p = p;
        }
        if let Some(k) = self.select {
            if !method.needs_bank() {
                bail!("--select does not apply to --method {m}, which uses no bank");
            }
            if k == 0 {
                bail!("--select must be at least 1 (0 would keep no module)");
            }
            o.select = Some(k);
        }
        let auto_given = [
            ("--auto-scales", self.auto_scales.is_some()),
            ("--auto-top-k", self.auto_top_k.is_some()),
            ("--auto-select", self.auto_select.is_some()),
            ("--auto-folds", self.auto_folds.is_some()),
            ("--auto-epochs", self.auto_epochs.is_some()),
            ("--auto-lora-from", self.auto_lora_from.is_some()),
        ];
        if let Some((flag, _)) = auto_given.iter().find(|(_, given)| *given) {
            if method != Method::Auto {
                refuse(flag, "auto")?;
            }
        }
        if let Some(s) = &self.auto_scales {
            o.auto.scales = s.clone();
        }
        if let Some(k) = self.auto_top_k {
            o.auto.top_k = k;
        }
        if let Some(s) = self.auto_select {
            o.auto.select = s;
        }
        if let Some(f) = self.auto_folds {
            if o.auto.select != crate::methods::auto::AutoSelect::Cv {
                bail!("--auto-folds applies to --auto-select cv (the default selection, criterion, has no folds)");
            }
            o.auto.folds = f;
        }
        if let Some(e) = self.auto_epochs {
            o.auto.epochs = e;
        }
        if let Some(k) = self.auto_lora_from {
            o.auto.lora_from = k;
        }
        o.auto.validate()?;
        if let Some(by) = self.select_by {
            if self.select.is_none() {
                bail!("--by ranks modules for --select; give --select K");
            }
            o.select_by = by;
        } else if kind.is_generative() {
            o.select_by = Retrieval::Loss;
        }
        Ok(())
    }
}

/// `adapt`: K-shot adaptation with one method.
#[derive(Clone, Debug)]
pub struct AdaptSpec {
    pub common: Common,
    pub out: PathBuf,
    pub shots: Shots,
    pub method: Method,
    pub bank: Vec<PathBuf>,
    pub options: MethodOptions,
    /// Compress the exported LoRA to this rank by truncated SVD.
    pub export_rank: Option<usize>,
}

/// Refuse to overwrite results unless `force`; refuse an output path that is a file.
fn check_out(out: &Path, marker: &str, force: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!("{}: exists and is not a directory (--out names the output directory)", out.display());
    }
    if out.join(marker).exists() && !force {
        bail!("{}: already holds results ({marker}); pass --force to replace them", out.display());
    }
    Ok(())
}

fn load_bank(dirs: &[PathBuf], model: &Path, allow_mismatch: bool) -> Result<Vec<Adapter>> {
    dirs.iter()
        .map(|d| {
            let a = Adapter::load(d)?;
            crate::lora::peft::check_base(&a, model, allow_mismatch)?;
            Ok(a)
        })
        .collect()
}

/// Shortfall of few-shot sampling as JSON, with a warning on stderr.
fn report_short(task: &Task, short: &[(usize, usize)], k: Option<usize>) -> Value {
    if !short.is_empty() {
        let list: Vec<String> = short.iter().map(|(c, n)| format!("{} ({n})", task.labels[*c])).collect();
        eprintln!(
            "warning: {}: {} label(s) have fewer than {} training examples and contribute all they have: {}",
            task.name,
            short.len(),
            k.map(|k| k.to_string()).unwrap_or_default(),
            list.join(", ")
        );
    }
    json!(short.iter().map(|(c, n)| json!({"label": task.labels[*c], "available": n})).collect::<Vec<_>>())
}

/// Load the model for a task: architecture, template, pooling, and the check that it takes the task's inputs.
fn load_for(common: &Common, task: &Task) -> Result<(LoadedModel, Pooling)> {
    let mut lm = LoadedModel::load(&common.model, common.max_len)?;
    check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
    lm.set_template(common.template.clone())?;
    if lm.kind.is_generative() {
        if common.pooling.is_some() {
            bail!("--pooling applies to encoders; a {} model ranks label strings and pools nothing", lm.kind.name());
        }
        if common.lr_head.is_some() {
            bail!("--lr-head applies to encoders; a {} model has no classification head", lm.kind.name());
        }
    }
    let pooling = common.pooling.unwrap_or(lm.kind.default_pooling());
    Ok((lm, pooling))
}

/// The split evaluated after training: `--eval-split`, else `test` when the task has it, else none.
fn eval_split(common: &Common, task: &Task) -> Result<Option<String>> {
    match &common.eval_split {
        Some(s) => {
            if !matches!(s.as_str(), "train" | "valid" | "test") {
                bail!("--eval-split '{s}': expected train, valid or test");
            }
            Ok(Some(s.clone()))
        }
        None if task.has_split("test") => Ok(Some("test".to_string())),
        None => {
            if !common.quiet {
                eprintln!(
                    "note: {} has no test split: nothing is evaluated after training (--eval-split valid or train \
                     evaluates on another split)",
                    task.dir.display()
                );
            }
            Ok(None)
        }
    }
}

fn encode_split(lm: &LoadedModel, task: &Task, split: Option<&str>) -> Result<Vec<crate::methods::common::Encoded>> {
    match split {
        Some(s) => encode_examples(&lm.frontend, &task.examples(s)?),
        None => Ok(Vec::new()),
    }
}

fn options_from(common: &Common, method: Method, pooling: Pooling) -> AdaptOpts {
    let mut o = AdaptOpts::defaults(method, common.seed);
    o.loop_opts.steps = common.steps.unwrap_or(DEFAULT_STEPS);
    o.loop_opts.batch = common.batch;
    o.loop_opts.weight_decay = common.weight_decay;
    if let Some(lr) = common.lr {
        o.lr_body = lr;
    }
    if let Some(lr) = common.lr_head {
        o.lr_head = lr;
    }
    o.pooling = pooling;
    o
}

fn meta(task: &Task, lm: &LoadedModel, pooling: Pooling, method: &str, common: &Common, extra: Value) -> Value {
    let mut m = json!({
        "labels": task.labels,
        "model_kind": lm.kind,
        "method": method,
        "task": task.name,
        "base_model": common.model.display().to_string(),
        "loracomp_version": env!("CARGO_PKG_VERSION"),
    });
    let o = m.as_object_mut().expect("an object");
    if lm.kind.is_generative() {
        o.insert("template".into(), json!(common.template));
    } else {
        o.insert("pooling".into(), json!(pooling));
    }
    if let Some(e) = extra.as_object() {
        o.extend(e.clone());
    }
    m
}

/// Accuracy on a split as JSON (`null`s when nothing was evaluated).
fn scores_json(prefix: &str, s: Option<&crate::methods::common::Scores>) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(format!("{prefix}accuracy"), json!(s.map(|s| s.accuracy)));
    m.insert(format!("{prefix}macro_f1"), json!(s.map(|s| s.macro_f1)));
    Value::Object(m)
}

/// Run a method with progress on stderr: the training steps (gradient methods), then the evaluation.
#[allow(clippy::too_many_arguments)]
fn run_with_progress(
    lm: &LoadedModel,
    task: &Task,
    train: &[crate::methods::common::Encoded],
    test: &[crate::methods::common::Encoded],
    bank: &[Adapter],
    opts: &AdaptOpts,
    what: &str,
    quiet: bool,
) -> Result<crate::methods::Outcome> {
    let gradient = matches!(opts.method, Method::Full | Method::Lora | Method::Learned);
    let mut p = crate::progress::Progress::new(if gradient { opts.loop_opts.steps } else { 0 }, what, "step", quiet);
    if !quiet && !gradient {
        eprintln!("{what}: {} (head only; no step-by-step progress)", opts.method.name());
    }
    let out = adapt_encoded_with(
        lm.base(&task.labels)?,
        lm.pad_id(),
        task.labels.len(),
        train,
        test,
        bank,
        opts,
        &mut |_, loss| {
            p.set_message(format!("loss {loss:.4}"));
            p.inc(1);
        },
    )?;
    p.finish();
    if !quiet && !test.is_empty() {
        eprintln!("{what}: evaluated {} examples: accuracy {:.4}", out.scores.n, out.scores.accuracy);
    }
    Ok(out)
}

/// Train one upstream LoRA on a task and write it as a PEFT adapter with metrics.json.
pub fn train(spec: &TrainSpec) -> Result<Value> {
    let c = &spec.common;
    check_out(&spec.out, "metrics.json", c.force)?;
    let task = Task::open(&c.task)?;
    let (lm, pooling) = load_for(c, &task)?;
    let split = eval_split(c, &task)?;
    let pool = task.examples("train")?;
    let (fs, fs_short) = pool.sample_k_shot(task.labels.len(), spec.shots, c.seed);
    let short = report_short(&task, &fs_short, spec.shots);
    let mut opts = options_from(c, Method::Lora, pooling);
    opts.rank = spec.rank;
    opts.alpha = spec.alpha;
    let targets = spec.targets.clone().unwrap_or_else(|| lm.kind.default_targets());
    opts.targets = targets.clone();
    if c.lr.is_none() {
        opts.lr_body = 1e-3;
    }
    if c.lr_head.is_none() {
        opts.lr_head = 5e-3;
    }
    if c.steps.is_none() {
        opts.loop_opts.steps = spec.epochs * fs.len().div_ceil(c.batch.max(1));
    }
    // Every input is read and checked before training starts.
    let train_enc = encode_examples(&lm.frontend, &fs)?;
    let valid_enc = if task.has_split("valid") { encode_split(&lm, &task, Some("valid"))? } else { Vec::new() };
    let test = encode_split(&lm, &task, split.as_deref())?;
    // Then one `train` at a time per --out (a killed one's lock is taken over; a directory the lock created is
    // removed again if nothing was written), and the results check again under the lock.
    let _lock = crate::util::DirLock::take(&spec.out, ".train.lock", "train")?;
    check_out(&spec.out, "metrics.json", c.force)?;
    let res = run_with_progress(&lm, &task, &train_enc, &test, &[], &opts, &format!("train {}", task.name), c.quiet)?;
    let mut net = res.model;
    let vs = if valid_enc.is_empty() {
        None
    } else {
        let vp = predict_all(net.as_dyn(), &valid_enc, 64)?;
        Some(score(&valid_enc.iter().map(|e| e.label).collect::<Vec<_>>(), &vp, task.labels.len()))
    };
    let m = meta(&task, &lm, pooling, "lora", c, json!({"rank": spec.rank, "alpha": spec.alpha, "targets": targets}));
    // Upstream adapters keep their own rank and alpha (not the exact-export form), as PEFT would save them.
    write_trained_lora(net.as_dyn(), &spec.out, spec.rank, spec.alpha, &targets, &c.model, lm.kind, &m)?;
    let mut metrics = json!({
        "task": task.name,
        "model_kind": lm.kind,
        "method": "lora",
        "shots": Shots(spec.shots),
        "seed": c.seed,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "targets": targets,
        "steps": opts.loop_opts.steps,
        "n_train": fs.len(),
        "short_labels": short,
        "eval_split": split,
        "n_eval": res.scores.n,
        "trainable_params": res.trainable_params,
        "train_seconds": res.train_seconds,
        "final_loss": res.final_loss,
    });
    let o = metrics.as_object_mut().expect("an object");
    o.extend(scores_json("valid_", vs.as_ref()).as_object().cloned().unwrap_or_default());
    let test_scores = split.is_some().then_some(&res.scores);
    o.extend(scores_json("", test_scores).as_object().cloned().unwrap_or_default());
    crate::util::write_atomic(&spec.out.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// Save a freshly trained LoRA with its own r and alpha (B unscaled), plus the head where the model has one.
#[allow(clippy::too_many_arguments)]
fn write_trained_lora(
    model: &mut dyn TaskModel,
    out: &Path,
    rank: usize,
    alpha: f32,
    targets: &[String],
    base: &Path,
    kind: ModelKind,
    meta: &Value,
) -> Result<()> {
    use crate::lora::peft::{write_adapter, AdapterConfig, ExportModule};
    let mut modules = std::collections::BTreeMap::new();
    for (path, lin) in model.named_linears() {
        if let Some(f) = &lin.fresh {
            modules.insert(
                path,
                ExportModule {
                    a: f.a.data.clone(),
                    b: f.b.data.clone(),
                    r: f.r,
                    din: lin.din,
                    dout: lin.dout,
                    alpha: alpha as f64,
                },
            );
        }
    }
    let mut cfg = AdapterConfig::new(rank, alpha as f64, targets.to_vec(), Some(base.display().to_string()));
    cfg.task_type = kind.peft_task_type().map(String::from);
    match model.head() {
        Some(h) => {
            let b = h.bias.as_ref().map(|b| b.data.clone()).unwrap_or_default();
            write_adapter(out, cfg, &modules, Some((&h.w.shape, &h.w.data, &b)), meta)
        }
        None => write_adapter(out, cfg, &modules, None, meta),
    }
}

/// Adapt to a task from K examples per class with one method, evaluate, and export the adapter.
pub fn adapt(spec: &AdaptSpec) -> Result<Value> {
    let c = &spec.common;
    check_out(&spec.out, "metrics.json", c.force)?;
    // The model and the task first: a wrong --model path is reported as such, not as a bank mismatch.
    ModelKind::of(&c.model)?;
    let task = Task::open(&c.task)?;
    let bank = load_bank(&spec.bank, &c.model, c.allow_base_mismatch)?;
    if !spec.method.needs_bank() && !spec.bank.is_empty() {
        bail!("--bank does not apply to --method {}, which uses no bank", spec.method.name());
    }
    let (lm, pooling) = load_for(c, &task)?;
    if c.lr.is_some() && spec.method == Method::Auto && spec.options.auto_lora_from == Some(None) {
        bail!("--lr applies to auto's LoRA stage, which --auto-lora-from off switches off");
    }
    if c.lr.is_some() && !matches!(spec.method, Method::Full | Method::Lora | Method::Learned | Method::Auto) {
        bail!(
            "--lr does not apply to --method {}: it trains no parameter of its own (use --lr-head for the head)",
            spec.method.name()
        );
    }
    let mut opts = options_from(c, spec.method, pooling);
    spec.options.apply(spec.method, lm.kind, &mut opts)?;
    let split = eval_split(c, &task)?;
    let test = encode_split(&lm, &task, split.as_deref())?;
    let pool = task.examples("train")?;
    let (fs, fs_short) = pool.sample_k_shot(task.labels.len(), spec.shots.0, c.seed);
    let short = report_short(&task, &fs_short, spec.shots.0);
    let train_enc = encode_examples(&lm.frontend, &fs)?;
    let what = format!("adapt {} {}", spec.method.name(), task.name);
    let res = run_with_progress(&lm, &task, &train_enc, &test, &bank, &opts, &what, c.quiet)?;
    let bank_names: Vec<String> = res.used_modules.iter().map(|&i| bank[i].dir.display().to_string()).collect();
    let weights: serde_json::Map<String, Value> = res.weights.iter().map(|(p, w)| (p.clone(), json!(w))).collect();
    let m = meta(
        &task,
        &lm,
        pooling,
        spec.method.name(),
        c,
        json!({"bank": bank_names, "module_weights": weights, "shots": spec.shots, "seed": c.seed}),
    );
    let mut net = res.model;
    let export_errors = crate::methods::export::export_adapter(
        net.as_dyn(),
        &spec.out.join("adapter"),
        Some(c.model.display().to_string()),
        lm.kind.peft_task_type(),
        spec.export_rank,
        &m,
    )?;
    // The exported adapter, reloaded onto a fresh model, is what a user gets: with a compressed export its
    // accuracy is measured too.
    let export_accuracy = match (spec.export_rank, split.is_some()) {
        (Some(_), true) => {
            let adapter = Adapter::load(&spec.out.join("adapter"))?;
            let mut fresh =
                crate::methods::task_net(lm.base(&task.labels)?, lm.pad_id(), task.labels.len(), pooling, 0)?;
            crate::methods::bank::apply_adapter(fresh.as_dyn(), &adapter, task.labels.len())?;
            let p = predict_all(fresh.as_dyn(), &test, 64)?;
            Some(score(&test.iter().map(|e| e.label).collect::<Vec<_>>(), &p, task.labels.len()).accuracy)
        }
        _ => None,
    };
    if spec.method == Method::Full {
        write_full_model(&mut net, &c.model, &spec.out.join("model"))?;
    }
    let mut metrics = json!({
        "method": spec.method.name(),
        "model_kind": lm.kind,
        "task": task.name,
        "shots": spec.shots,
        "seed": c.seed,
        "eval_split": split,
        "n_test": res.scores.n,
        "n_train": fs.len(),
        "short_labels": short,
        "trainable_params": res.trainable_params,
        "train_seconds": res.train_seconds,
        "final_loss": res.final_loss,
        "bank": bank_names,
        "module_weights": weights,
        "details": res.details,
        "export_rank": spec.export_rank,
        "export_relative_error": export_errors,
        "export_accuracy": export_accuracy,
        "options": applied_options(&opts, lm.kind),
    });
    let o = metrics.as_object_mut().expect("an object");
    o.extend(scores_json("", split.is_some().then_some(&res.scores)).as_object().cloned().unwrap_or_default());
    crate::util::write_atomic(&spec.out.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// The options that applied to the run (no other method's settings).
pub fn applied_options(o: &AdaptOpts, kind: ModelKind) -> Value {
    let mut v = json!({
        "steps": o.loop_opts.steps,
        "batch": o.loop_opts.batch,
        "seed": o.loop_opts.seed,
        "weight_decay": o.loop_opts.weight_decay,
        "warmup_frac": o.loop_opts.warmup_frac,
        "eval_batch": o.eval_batch,
    });
    let m = v.as_object_mut().expect("an object");
    if !kind.is_generative() {
        m.insert("pooling".into(), json!(o.pooling));
        m.insert("lr_head".into(), json!(o.lr_head));
    }
    match o.method {
        Method::Full => {
            m.insert("lr".into(), json!(o.lr_body));
        }
        Method::Lora => {
            m.insert("lr".into(), json!(o.lr_body));
            m.insert("rank".into(), json!(o.rank));
            m.insert("alpha".into(), json!(o.alpha));
            m.insert("targets".into(), json!(o.targets));
        }
        Method::Learned => {
            m.insert("lr".into(), json!(o.lr_body));
            m.insert("global_weights".into(), json!(o.global_weights));
            m.insert("entropy_penalty".into(), json!(o.entropy_penalty));
        }
        Method::Lorahub | Method::LorahubCompat => {
            m.insert("lorahub_generations".into(), json!(o.lorahub_generations));
        }
        Method::Ties | Method::MagnitudePrune => {
            m.insert("density".into(), json!(o.density));
        }
        Method::Dare => {
            m.insert("drop_p".into(), json!(o.drop_p));
        }
        Method::DareTies => {
            m.insert("density".into(), json!(o.density));
            m.insert("drop_p".into(), json!(o.drop_p));
        }
        Method::Auto => {
            m.insert("auto_scales".into(), json!(o.auto.scales));
            m.insert("auto_top_k".into(), json!(o.auto.top_k));
            m.insert("auto_select".into(), json!(o.auto.select));
            if o.auto.select == crate::methods::auto::AutoSelect::Cv {
                m.insert("auto_folds".into(), json!(o.auto.folds));
            }
            m.insert("auto_epochs".into(), json!(o.auto.epochs));
            m.insert("auto_lora_from".into(), json!(o.auto.lora_from));
            if o.auto.lora_from.is_some() {
                m.insert("lr".into(), json!(o.lr_body));
                m.insert("rank".into(), json!(o.rank));
                m.insert("alpha".into(), json!(o.alpha));
                m.insert("targets".into(), json!(o.targets));
            }
        }
        _ => {}
    }
    if let Some(k) = o.select {
        m.insert("select".into(), json!(k));
        m.insert("select_by".into(), json!(o.select_by));
    }
    v
}

/// A fully fine-tuned model as a Hugging Face folder (config, tokenizer or preprocessor copied from the base).
fn write_full_model(net: &mut TaskNet, base: &Path, dir: &Path) -> Result<()> {
    let Some(model) = net.classifier() else {
        // A generative model's fine-tuned weights are exported as the adapter's dense deltas would be too
        // large; say so rather than write nothing silently.
        eprintln!(
            "note: full fine-tuning of a generative model is evaluated but its weights are not written (no model/ directory)"
        );
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let files = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "preprocessor_config.json",
    ];
    for f in files {
        let src = base.join(f);
        if src.exists() {
            crate::util::ensure_regular(&src)?;
            let bytes = std::fs::read(&src).map_err(|e| anyhow!("cannot read {}: {e}", src.display()))?;
            crate::util::write_atomic(&dir.join(f), &bytes)?;
        }
    }
    crate::engine::weights::write_safetensors(&dir.join("model.safetensors"), &model.encoder.state_dict(), None)
}

/// Where an adapter directory was given as a run directory, point at its `adapter/`.
fn adapter_hint(dir: &Path) -> String {
    if dir.join("adapter").join(crate::lora::peft::CONFIG_FILE).exists() {
        format!(" ({} holds an adapter: did you mean {}?)", dir.display(), dir.join("adapter").display())
    } else {
        String::new()
    }
}

fn load_adapter(dir: &Path) -> Result<Adapter> {
    Adapter::load(dir).map_err(|e| anyhow!("{e:#}{}", adapter_hint(dir)))
}

/// The task model an adapter was made for, with the adapter applied: its kind's model, pooling and template
/// from the adapter's sidecar.
fn model_with_adapter(
    model_dir: &Path,
    adapter: &Adapter,
    labels: &[String],
    max_len: usize,
) -> Result<(LoadedModel, TaskNet)> {
    let meta = adapter.meta.as_ref();
    let pooling = meta
        .and_then(|m| m.get("pooling"))
        .and_then(|p| p.as_str())
        .map(|p| p.parse::<Pooling>().map_err(|e| anyhow!("{}: {e}", adapter.dir.display())))
        .transpose()?;
    let template = meta.and_then(|m| m.get("template")).and_then(|t| t.as_str()).map(String::from);
    let mut lm = LoadedModel::load(model_dir, max_len)?;
    if lm.kind.is_generative() {
        lm.set_template(template)?;
    }
    let pooling = pooling.unwrap_or(lm.kind.default_pooling());
    let mut net = crate::methods::task_net(lm.base(labels)?, lm.pad_id(), labels.len(), pooling, 0)?;
    crate::methods::bank::apply_adapter(net.as_dyn(), adapter, labels.len())?;
    Ok((lm, net))
}

/// What `eval` evaluates: an adapter loracomp (or PEFT) wrote, or a generative model's frozen base.
#[derive(Clone, Debug)]
pub enum EvalTarget {
    /// An adapter directory; its sidecar carries the labels, pooling and template it was trained with.
    Adapter { dir: PathBuf, allow_base_mismatch: bool },
    /// The frozen generative model itself, ranking the label strings with no adaptation (zero-shot). An encoder
    /// has no head without an adapter, so it is refused. `template` as in `adapt --template`.
    Base { template: Option<String> },
}

impl EvalTarget {
    /// From `eval`'s options: an adapter when one is given, else the base. An option that does not apply to
    /// the target is an error naming it.
    pub fn new(adapter: Option<PathBuf>, allow_base_mismatch: bool, template: Option<String>) -> Result<Self> {
        match adapter {
            Some(dir) => {
                if template.is_some() {
                    bail!("--template applies to eval without --adapter; an adapter carries the template it was trained with");
                }
                Ok(EvalTarget::Adapter { dir, allow_base_mismatch })
            }
            None => {
                if allow_base_mismatch {
                    bail!("--allow-base-mismatch applies to an --adapter; without one the base itself is evaluated");
                }
                Ok(EvalTarget::Base { template })
            }
        }
    }
}

/// Evaluate an adapter, or a generative model zero-shot, on a task split.
pub fn eval(model_dir: &Path, task_dir: &Path, target: &EvalTarget, split: &str, max_len: usize) -> Result<Value> {
    if !matches!(split, "train" | "valid" | "test") {
        bail!("--split '{split}': expected train, valid or test");
    }
    let task = Task::open(task_dir)?;
    let (lm, mut net, what) = match target {
        EvalTarget::Adapter { dir: adapter_dir, allow_base_mismatch } => {
            let adapter = load_adapter(adapter_dir)?;
            crate::lora::peft::check_base(&adapter, model_dir, *allow_base_mismatch)?;
            if let Some(labels) = adapter.labels() {
                if labels != task.labels {
                    bail!(
                        "{}: the adapter's labels differ from {}/labels.txt; an adapter predicts the labels it was \
                         trained for (a composition of bank adapters gets this task's with `compose --task {} \
                         --shots K`)",
                        adapter_dir.join(crate::lora::peft::LORACOMP_FILE).display(),
                        task_dir.display(),
                        task_dir.display()
                    );
                }
            }
            let (lm, net) = model_with_adapter(model_dir, &adapter, &task.labels, max_len)?;
            (lm, net, json!({"adapter": adapter_dir.display().to_string()}))
        }
        EvalTarget::Base { template } => {
            let mut lm = LoadedModel::load(model_dir, max_len)?;
            if !lm.kind.is_generative() {
                bail!(
                    "{}: eval without --adapter evaluates a generative model zero-shot (ranking the label strings); \
                     this is an encoder, whose classification head only an adapter provides: pass --adapter",
                    model_dir.display()
                );
            }
            lm.set_template(template.clone())?;
            let pooling = lm.kind.default_pooling();
            let net = crate::methods::task_net(lm.base(&task.labels)?, lm.pad_id(), task.labels.len(), pooling, 0)?;
            (lm, net, json!({"adapter": Value::Null, "zero_shot": true}))
        }
    };
    check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
    let e = encode_examples(&lm.frontend, &task.examples(split)?)?;
    // Scores holding NaN/Inf are an error (class_scores), never an accuracy computed on them.
    let pred = predict_all(net.as_dyn(), &e, 64).map_err(|err| match target {
        EvalTarget::Adapter { dir, .. } => {
            anyhow!("{} with {} on {split}: {err}", model_dir.display(), dir.display())
        }
        EvalTarget::Base { .. } => anyhow!("{} zero-shot on {split}: {err}", model_dir.display()),
    })?;
    let s = score(&e.iter().map(|x| x.label).collect::<Vec<_>>(), &pred, task.labels.len());
    let mut out = json!({"task": task.name, "split": split,
                         "accuracy": s.accuracy, "macro_f1": s.macro_f1, "n": s.n});
    for (k, v) in what.as_object().into_iter().flatten() {
        out[k] = v.clone();
    }
    Ok(out)
}

/// One input of `predict`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PredictInput {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
}

/// One output line of `predict`: the label and each label's probability.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_pair: Option<String>,
    pub label: String,
    pub scores: serde_json::Map<String, Value>,
}

/// Label new texts with an adapter loracomp wrote (train, adapt, compose): the label names come from the
/// adapter's sidecar. Scores are softmax probabilities over the labels (a generative model's: over the answers'
/// summed log-probabilities).
pub fn predict(
    model_dir: &Path,
    adapter_dir: &Path,
    inputs: &[PredictInput],
    max_len: usize,
) -> Result<Vec<Prediction>> {
    let adapter = load_adapter(adapter_dir)?;
    let labels = adapter.labels().ok_or_else(|| {
        anyhow!(
            "{}: no label names (field 'labels'); predict needs an adapter written by loracomp train, adapt or compose",
            adapter_dir.join(crate::lora::peft::LORACOMP_FILE).display()
        )
    })?;
    let (lm, mut net) = model_with_adapter(model_dir, &adapter, &labels, max_len)?;
    if lm.is_image() {
        bail!("predict labels texts; {} is an image model", model_dir.display());
    }
    let ex: Vec<crate::data::Example> = inputs
        .iter()
        .map(|i| crate::data::Example { text: i.text.clone(), pair: i.text_pair.clone(), label: 0 })
        .collect();
    let enc = encode_examples(&lm.frontend, &crate::data::Examples::Text(ex))?;
    let rows = class_scores(net.as_dyn(), &enc, 64)?;
    Ok(inputs
        .iter()
        .zip(rows)
        .map(|(i, row)| {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            let scores = labels.iter().zip(&e).map(|(l, v)| (l.clone(), json!(v / z))).collect();
            Prediction {
                text: i.text.clone(),
                text_pair: i.text_pair.clone(),
                label: labels[argmax(&row)].clone(),
                scores,
            }
        })
        .collect())
}

/// `compose`: fixed-weight composition of bank adapters, written as one PEFT adapter. With `task` and `shots`,
/// an encoder gets a fresh head trained on K examples per class with the composition fixed; without them no
/// head is written (a generative model never has one).
#[derive(Clone, Debug)]
pub struct ComposeSpec {
    pub model: PathBuf,
    pub bank: Vec<PathBuf>,
    pub weights: Vec<f32>,
    pub export_rank: Option<usize>,
    pub out: PathBuf,
    pub force: bool,
    pub task: Option<PathBuf>,
    pub shots: Option<Shots>,
    pub seed: u64,
    pub template: Option<String>,
}

pub fn compose(spec: &ComposeSpec) -> Result<Value> {
    check_out(&spec.out, crate::lora::peft::CONFIG_FILE, spec.force)?;
    ModelKind::of(&spec.model)?;
    let bank = load_bank(&spec.bank, &spec.model, false)?;
    let n = bank.len();
    let w: Vec<f32> = if spec.weights.is_empty() { vec![1.0 / n as f32; n] } else { spec.weights.clone() };
    if w.len() != n {
        bail!("--weights has {} values for {n} bank adapters", w.len());
    }
    if w.iter().any(|v| !v.is_finite()) {
        bail!("--weights must be finite numbers");
    }
    if spec.shots.is_some() != spec.task.is_some() {
        bail!("--task and --shots go together: the head is trained on K examples per class of the task");
    }
    let mut lm = LoadedModel::load(&spec.model, crate::models::hf::DEFAULT_MAX_LEN)?;
    let pooling = lm.kind.default_pooling();
    let comp = |_: &str, _: usize| crate::lora::bank::Composition::Fixed(w.clone());
    let mut m = json!({
        "method": "compose",
        "model_kind": lm.kind,
        "bank": spec.bank.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
        "weights": w,
        "base_model": spec.model.display().to_string(),
        "loracomp_version": env!("CARGO_PKG_VERSION"),
    });
    let o = m.as_object_mut().expect("an object");
    let mut net = match &spec.task {
        Some(tdir) => {
            let task = Task::open(tdir)?;
            check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
            lm.set_template(spec.template.clone())?;
            let k = spec.shots.expect("checked above");
            let mut opts = AdaptOpts::defaults(Method::Uniform, spec.seed);
            opts.loop_opts.steps = DEFAULT_STEPS;
            opts.pooling = pooling;
            let (fs, _) = task.examples("train")?.sample_k_shot(task.labels.len(), k.0, spec.seed);
            let enc = encode_examples(&lm.frontend, &fs)?;
            let mut net =
                crate::methods::task_net(lm.base(&task.labels)?, lm.pad_id(), task.labels.len(), pooling, spec.seed)?;
            let model = net.as_dyn();
            model.set_base_trainable(false);
            crate::methods::bank::attach_bank(model, &bank, comp)?;
            model.train_head_only(&enc, &opts.loop_opts, opts.lr_head, opts.eval_batch)?;
            o.insert("labels".into(), json!(task.labels));
            o.insert("task".into(), json!(task.name));
            o.insert("shots".into(), json!(k));
            o.insert("seed".into(), json!(spec.seed));
            if lm.kind.is_generative() {
                o.insert("template".into(), json!(spec.template));
            } else {
                o.insert("pooling".into(), json!(pooling));
            }
            net
        }
        None => {
            if spec.template.is_some() {
                bail!("--template is stored with a task's labels; give --task and --shots with it");
            }
            let mut net = crate::methods::task_net(lm.base(&["a".into(), "b".into()])?, lm.pad_id(), 2, pooling, 0)?;
            crate::methods::bank::attach_bank(net.as_dyn(), &bank, comp)?;
            net
        }
    };
    let head = spec.task.is_some();
    // An encoder's composition without a task has no trained head: its LoRA terms only.
    let export = if head { crate::methods::export::export_adapter } else { crate::methods::export::export_lora_only };
    let errors = export(
        net.as_dyn(),
        &spec.out,
        Some(spec.model.display().to_string()),
        lm.kind.peft_task_type(),
        spec.export_rank,
        &m,
    )?;
    Ok(json!({"out": spec.out.display().to_string(), "weights": w, "head": head, "export_relative_error": errors}))
}

/// Texts of a predict input file: one JSON object a line with `text` (and optionally `text_pair`).
pub fn read_predict_inputs(path: &Path) -> Result<Vec<PredictInput>> {
    use std::io::BufRead;
    crate::util::ensure_regular(path)?;
    let f = std::fs::File::open(path).map_err(|e| anyhow!("cannot open {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| anyhow!("{}: cannot read line {}: {e}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
        let text = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("{}:{}: field 'text' missing or not a string", path.display(), i + 1))?;
        let text_pair = match v.get("text_pair") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{}:{}: field 'text_pair' is not a string", path.display(), i + 1),
        };
        out.push(PredictInput { text: text.to_string(), text_pair });
    }
    if out.is_empty() {
        bail!("{}: no inputs", path.display());
    }
    Ok(out)
}

//! The `train`, `adapt` and `eval` commands.

use super::{Shots, TrainArgs};
use crate::data::Task;
use crate::engine::kernels::Pooling;
use crate::lora::peft::Adapter;
use crate::methods::common::{check_kind, encode_examples, predict, score};
use crate::methods::{adapt_encoded, AdaptOpts, Method};
use crate::models::classifier::Classifier;
use crate::models::encoder::LoadedModel;
use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Refuse to overwrite results unless `force`.
fn check_out(out: &Path, marker: &str, force: bool) -> Result<()> {
    if out.join(marker).exists() && !force {
        bail!("{}: already holds results ({marker}); pass --force to replace them", out.display());
    }
    Ok(())
}

fn opts_from(args: &TrainArgs, method: Method, lm: &LoadedModel) -> AdaptOpts {
    let mut o = AdaptOpts::defaults(method, args.seed);
    if let Some(s) = args.steps {
        o.loop_opts.steps = s;
    }
    o.loop_opts.batch = args.batch;
    o.loop_opts.weight_decay = args.weight_decay;
    if let Some(lr) = args.lr {
        o.lr_body = lr;
    }
    if let Some(lr) = args.lr_head {
        o.lr_head = lr;
    }
    o.pooling = args.pooling.unwrap_or(lm.encoder.default_pooling());
    o
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

fn meta(task: &Task, pooling: Pooling, method: &str, model: &Path, extra: Value) -> Value {
    let mut m = json!({
        "labels": task.labels,
        "pooling": pooling,
        "method": method,
        "task": task.name,
        "base_model": model.display().to_string(),
        "loracomp_version": env!("CARGO_PKG_VERSION"),
    });
    if let (Some(o), Some(e)) = (m.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    m
}

pub fn train(
    args: &TrainArgs,
    out: &Path,
    rank: usize,
    alpha: f32,
    targets: &[String],
    epochs: usize,
    shots: Option<usize>,
) -> Result<Value> {
    check_out(out, "metrics.json", args.force)?;
    let task = Task::open(&args.task)?;
    let lm = LoadedModel::load(&args.model, args.max_len)?;
    check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
    let pool = task.examples("train")?;
    let (fs, fs_short) = pool.sample_k_shot(task.labels.len(), shots, args.seed);
    let short = report_short(&task, &fs_short, shots);
    let mut opts = opts_from(args, Method::Lora, &lm);
    opts.rank = rank;
    opts.alpha = alpha;
    opts.targets = targets.to_vec();
    if args.lr.is_none() {
        opts.lr_body = 1e-3;
    }
    if args.lr_head.is_none() {
        opts.lr_head = 5e-3;
    }
    if args.steps.is_none() {
        opts.loop_opts.steps = epochs * fs.len().div_ceil(args.batch.max(1));
    }
    let train_enc = encode_examples(&lm.frontend, &fs)?;
    let test = encode_examples(&lm.frontend, &task.examples("test")?)?;
    let res = adapt_encoded(lm.encoder.clone(), lm.pad_id(), task.labels.len(), &train_enc, &test, &[], &opts)?;
    let mut model = res.model;
    let valid_enc = encode_examples(&lm.frontend, &task.examples("valid")?)?;
    let vp = predict(&mut model, &valid_enc, lm.pad_id(), 64)?;
    let vs = score(&valid_enc.iter().map(|e| e.label).collect::<Vec<_>>(), &vp, task.labels.len());
    let m = meta(&task, opts.pooling, "lora", &args.model, json!({"rank": rank, "alpha": alpha, "targets": targets}));
    // Upstream adapters keep their own rank and alpha (not the exact-export form), as PEFT would save them.
    write_trained_lora(&model, out, rank, alpha, targets, &args.model, &m)?;
    let metrics = json!({
        "task": task.name,
        "method": "lora",
        "shots": shots.map(|k| json!(k)).unwrap_or(json!("full")),
        "seed": args.seed,
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "steps": opts.loop_opts.steps,
        "n_train": fs.len(),
        "short_labels": short,
        "valid_accuracy": vs.accuracy,
        "valid_macro_f1": vs.macro_f1,
        "accuracy": res.scores.accuracy,
        "macro_f1": res.scores.macro_f1,
        "trainable_params": res.trainable_params,
        "train_seconds": res.train_seconds,
        "final_loss": res.final_loss,
    });
    crate::util::write_atomic(&out.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// Save a freshly trained LoRA with its own r and alpha (B unscaled), plus the head.
fn write_trained_lora(
    model: &Classifier,
    out: &Path,
    rank: usize,
    alpha: f32,
    targets: &[String],
    base: &Path,
    meta: &Value,
) -> Result<()> {
    use crate::lora::peft::{write_adapter, AdapterConfig, ExportModule};
    let mut modules = std::collections::BTreeMap::new();
    for (path, lin) in model.encoder.linears() {
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
    let cfg = AdapterConfig::new(rank, alpha as f64, targets.to_vec(), Some(base.display().to_string()));
    let h = &model.head;
    let b = h.bias.as_ref().map(|b| b.data.clone()).unwrap_or_default();
    write_adapter(out, cfg, &modules, Some((&h.w.shape, &h.w.data, &b)), meta)
}

/// `adapt`'s own options.
pub struct AdaptCli {
    pub shots: Shots,
    pub method: Method,
    pub bank: Vec<PathBuf>,
    pub out: PathBuf,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub global_weights: bool,
    pub entropy_penalty: f32,
    pub export_rank: Option<usize>,
    pub select: Option<usize>,
    pub select_by: crate::methods::Retrieval,
    pub lorahub_generations: usize,
    pub density: f32,
    pub drop_p: f32,
}

pub fn adapt(args: &TrainArgs, a: AdaptCli) -> Result<Value> {
    check_out(&a.out, "metrics.json", args.force)?;
    let task = Task::open(&args.task)?;
    let bank = load_bank(&a.bank, &args.model, args.allow_base_mismatch)?;
    let lm = LoadedModel::load(&args.model, args.max_len)?;
    check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
    let pool = task.examples("train")?;
    let test = encode_examples(&lm.frontend, &task.examples("test")?)?;
    let (fs, fs_short) = pool.sample_k_shot(task.labels.len(), a.shots.0, args.seed);
    let short = report_short(&task, &fs_short, a.shots.0);
    let mut opts = opts_from(args, a.method, &lm);
    opts.rank = a.rank;
    opts.alpha = a.alpha;
    opts.targets = a.targets.clone();
    opts.global_weights = a.global_weights;
    opts.entropy_penalty = a.entropy_penalty;
    opts.select = a.select;
    opts.select_by = a.select_by;
    opts.lorahub_generations = a.lorahub_generations;
    opts.density = a.density;
    opts.drop_p = a.drop_p;
    let train_enc = encode_examples(&lm.frontend, &fs)?;
    let res = adapt_encoded(lm.encoder.clone(), lm.pad_id(), task.labels.len(), &train_enc, &test, &bank, &opts)?;
    let bank_names: Vec<String> = res.used_modules.iter().map(|&i| bank[i].dir.display().to_string()).collect();
    let weights: serde_json::Map<String, Value> = res.weights.iter().map(|(p, w)| (p.clone(), json!(w))).collect();
    let m = meta(
        &task,
        opts.pooling,
        a.method.name(),
        &args.model,
        json!({"bank": bank_names, "module_weights": weights, "shots": a.shots.to_string(), "seed": args.seed}),
    );
    let export_errors = crate::methods::export::export_adapter(
        &res.model,
        &a.out.join("adapter"),
        Some(args.model.display().to_string()),
        a.export_rank,
        &m,
    )?;
    if a.method == Method::Full {
        write_full_model(&res.model, &args.model, &a.out.join("model"))?;
    }
    let metrics = json!({
        "method": a.method.name(),
        "task": task.name,
        "shots": a.shots.0.map(|k| json!(k)).unwrap_or(json!("full")),
        "seed": args.seed,
        "accuracy": res.scores.accuracy,
        "macro_f1": res.scores.macro_f1,
        "n_test": res.scores.n,
        "n_train": fs.len(),
        "short_labels": short,
        "trainable_params": res.trainable_params,
        "train_seconds": res.train_seconds,
        "final_loss": res.final_loss,
        "bank": bank_names,
        "module_weights": weights,
        "details": res.details,
        "export_rank": a.export_rank,
        "export_relative_error": export_errors,
        "options": opts,
    });
    crate::util::write_atomic(&a.out.join("metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// A fully fine-tuned encoder as a Hugging Face folder (config, tokenizer or preprocessor copied from the base).
fn write_full_model(model: &Classifier, base: &Path, dir: &Path) -> Result<()> {
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
            let bytes = std::fs::read(&src).map_err(|e| anyhow!("cannot read {}: {e}", src.display()))?;
            crate::util::write_atomic(&dir.join(f), &bytes)?;
        }
    }
    crate::models::weights::write_safetensors(&dir.join("model.safetensors"), &model.encoder.state_dict(), None)
}

pub fn eval(model_dir: &Path, task_dir: &Path, adapter_dir: &Path, split: &str, max_len: usize) -> Result<Value> {
    let task = Task::open(task_dir)?;
    let adapter = Adapter::load(adapter_dir)?;
    if let Some(labels) = adapter.labels() {
        if labels != task.labels {
            bail!(
                "{}: the adapter's labels differ from {}/labels.txt",
                adapter_dir.join(crate::lora::peft::LORACOMP_FILE).display(),
                task_dir.display()
            );
        }
    }
    let pooling = adapter
        .meta
        .as_ref()
        .and_then(|m| m.get("pooling"))
        .and_then(|p| p.as_str())
        .map(|p| p.parse::<Pooling>().map_err(|e| anyhow!("{}: {e}", adapter_dir.display())))
        .transpose()?;
    let lm = LoadedModel::load(model_dir, max_len)?;
    check_kind(&lm.frontend, task.image.is_some()).map_err(|e| anyhow!("{}: {e}", task.dir.display()))?;
    let pooling = pooling.unwrap_or(lm.encoder.default_pooling());
    let pad = lm.pad_id();
    let mut model = Classifier::new(lm.encoder, pooling, task.labels.len(), 0);
    crate::methods::bank::apply_adapter(&mut model, &adapter, task.labels.len())?;
    let e = encode_examples(&lm.frontend, &task.examples(split)?)?;
    let pred = predict(&mut model, &e, pad, 64)?;
    let s = score(&e.iter().map(|x| x.label).collect::<Vec<_>>(), &pred, task.labels.len());
    Ok(json!({"task": task.name, "split": split, "adapter": adapter_dir.display().to_string(),
              "accuracy": s.accuracy, "macro_f1": s.macro_f1, "n": s.n}))
}

pub fn compose(
    model_dir: &Path,
    bank_dirs: &[PathBuf],
    weights: &[f32],
    head_from: usize,
    export_rank: Option<usize>,
    out: &Path,
    force: bool,
) -> Result<Value> {
    check_out(out, crate::lora::peft::CONFIG_FILE, force)?;
    let bank = load_bank(bank_dirs, model_dir, false)?;
    let n = bank.len();
    let w: Vec<f32> = if weights.is_empty() { vec![1.0 / n as f32; n] } else { weights.to_vec() };
    if w.len() != n {
        bail!("--weights has {} values for {n} bank adapters", w.len());
    }
    if w.iter().any(|v| !v.is_finite()) {
        bail!("--weights must be finite numbers");
    }
    let src = bank.get(head_from).ok_or_else(|| anyhow!("--head-from {head_from}: there are only {n} adapters"))?;
    let Some((shape, hw, hb)) = &src.head else {
        bail!("{}: has no classifier head to carry over (--head-from)", src.dir.display());
    };
    let encoder = LoadedModel::load(model_dir, crate::models::hf::DEFAULT_MAX_LEN)?.encoder;
    let default_pooling = encoder.default_pooling();
    let pooling = src
        .meta
        .as_ref()
        .and_then(|m| m.get("pooling"))
        .and_then(|p| p.as_str())
        .and_then(|p| p.parse::<Pooling>().ok())
        .unwrap_or(default_pooling);
    let mut model = Classifier::new(encoder, pooling, shape[0], 0);
    crate::methods::bank::attach_bank(&mut model, &bank, |_, _| crate::lora::bank::Composition::Fixed(w.clone()))?;
    model.head.w.data.copy_from_slice(hw);
    if let Some(b) = model.head.bias.as_mut() {
        b.data.copy_from_slice(hb);
    }
    let mut m = src.meta.clone().unwrap_or_else(|| json!({}));
    if let Some(o) = m.as_object_mut() {
        o.insert("method".into(), json!("compose"));
        o.insert("bank".into(), json!(bank_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>()));
        o.insert("weights".into(), json!(w));
        o.insert("pooling".into(), json!(pooling));
    }
    let errors =
        crate::methods::export::export_adapter(&model, out, Some(model_dir.display().to_string()), export_rank, &m)?;
    Ok(json!({"out": out.display().to_string(), "weights": w, "export_relative_error": errors}))
}

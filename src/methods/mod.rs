//! Adaptation methods. Each file prepares a model for one method; [`adapt`] runs any of them with the same
//! sampler, schedule, optimiser and evaluation.
//!
//! | method | trainable | file |
//! |---|---|---|
//! | `linear-probe` | head | `linear_probe.rs` |
//! | `full` | every encoder weight + head | `full.rs` |
//! | `lora` | fresh LoRA on the targets + head | `lora.rs` |
//! | `uniform` | head (bank merged with weights 1/N) | `uniform.rs` |
//! | `learned` | softmax logits per layer (or one global vector) + head | `learned.rs` |
//! | `lorahub`, `lorahub-compat` | head (module weights searched by CMA-ES) | `peers.rs` |
//! | `task-arithmetic`, `ties`, `dare`, `dare-ties`, `magnitude-prune` | head (dense merge, λ chosen) | `peers.rs`, `merges.rs` |
//! | `best-single` | head (one module chosen) | `peers.rs` |
//! | `auto` | head, and from 2 examples a class a fresh LoRA on top (retrieval, scale and set size chosen by the head-free criterion) | `auto.rs` |

pub mod auto;
pub mod bank;
pub mod common;
pub mod export;
pub mod full;
pub mod learned;
pub mod linear_probe;
pub mod lora;
pub mod merges;
pub mod peers;
pub mod pretrain;
pub mod pretrain_lm;
pub mod similarity;
pub mod step;
pub mod task;
pub mod uniform;

use crate::data::Example;
use crate::engine::kernels::Pooling;
use crate::lora::peft::Adapter;
use crate::models::bert::Bert;
use crate::models::classifier::Classifier;
use crate::models::encoder::{Base, Encoder};
use crate::models::generative::RankClassifier;
use crate::models::tokenize::TextEncoder;
use anyhow::{bail, Result};
use common::{encode_all, predict, score, train_model, Encoded, LoopOpts, Scores};
use serde::Serialize;
use std::time::Instant;
use task::TaskNet;

/// One default step budget for `adapt`, `compose --task` and the sweep.
pub const DEFAULT_STEPS: usize = 100;

/// The adaptation methods `adapt` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    LinearProbe,
    Full,
    Lora,
    Uniform,
    Learned,
    Lorahub,
    LorahubCompat,
    TaskArithmetic,
    Ties,
    Dare,
    DareTies,
    MagnitudePrune,
    BestSingle,
    /// The recommended composition (`auto.rs`): retrieval, scaled candidates chosen by the head-free criterion,
    /// a LoRA on top from 2 examples a class.
    Auto,
}

impl Method {
    /// The paper's methods.
    pub const ALL: [Method; 5] = [Method::LinearProbe, Method::Full, Method::Lora, Method::Uniform, Method::Learned];
    /// Peers run on the same bank.
    pub const PEERS: [Method; 8] = [
        Method::Lorahub,
        Method::LorahubCompat,
        Method::TaskArithmetic,
        Method::Ties,
        Method::Dare,
        Method::DareTies,
        Method::MagnitudePrune,
        Method::BestSingle,
    ];
    /// Every method `adapt` knows: the paper's, the peers, and `auto`.
    pub fn every() -> impl Iterator<Item = Method> {
        Method::ALL.into_iter().chain(Method::PEERS).chain([Method::Auto])
    }
    pub fn name(self) -> &'static str {
        match self {
            Method::LinearProbe => "linear-probe",
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Uniform => "uniform",
            Method::Learned => "learned",
            Method::Lorahub => "lorahub",
            Method::LorahubCompat => "lorahub-compat",
            Method::TaskArithmetic => "task-arithmetic",
            Method::Ties => "ties",
            Method::Dare => "dare",
            Method::DareTies => "dare-ties",
            Method::MagnitudePrune => "magnitude-prune",
            Method::BestSingle => "best-single",
            Method::Auto => "auto",
        }
    }
    pub fn needs_bank(self) -> bool {
        !matches!(self, Method::LinearProbe | Method::Full | Method::Lora)
    }
    /// Whether the encoder stays frozen, so the head can be trained on cached features.
    fn frozen_encoder(self) -> bool {
        !matches!(self, Method::Full | Method::Lora | Method::Learned)
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::every().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Method::every().map(|m| m.name()).collect();
            format!("unknown method '{s}' ({})", names.join(", "))
        })
    }
}

/// How `--select k` ranks the bank's modules before composition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retrieval {
    /// Arrow-style: each module's top right singular vectors as prototypes, scored against the examples' inputs.
    Arrow,
    /// CKA gain of each module alone with the few-shot labels (see `similarity.rs`).
    Cka,
    /// Each module alone scored by the model's head-free criterion (prototype loss for an encoder, answer
    /// cross-entropy for a generative model); works on every architecture.
    Loss,
}

impl std::str::FromStr for Retrieval {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "arrow" => Ok(Retrieval::Arrow),
            "cka" => Ok(Retrieval::Cka),
            "loss" => Ok(Retrieval::Loss),
            _ => Err(format!("unknown retrieval '{s}' (arrow, cka, loss)")),
        }
    }
}

/// Everything a method run needs besides data.
#[derive(Clone, Debug, Serialize)]
pub struct AdaptOpts {
    pub method: Method,
    #[serde(flatten)]
    pub loop_opts: LoopOpts,
    pub lr_head: f32,
    /// Learning rate of the method's own parameters (LoRA factors, logits, encoder weights).
    pub lr_body: f32,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub global_weights: bool,
    pub entropy_penalty: f32,
    pub pooling: Pooling,
    pub eval_batch: usize,
    /// Keep only the `k` bank modules that Arrow-style retrieval ranks best for the few-shot examples.
    pub select: Option<usize>,
    /// How `select` ranks the modules.
    pub select_by: Retrieval,
    /// CMA-ES generations for LoraHub.
    pub lorahub_generations: usize,
    /// Density kept by TIES / magnitude pruning, drop probability of DARE.
    pub density: f32,
    pub drop_p: f32,
    /// `auto`'s settings.
    pub auto: auto::AutoOpts,
}

impl AdaptOpts {
    /// Defaults per method (learning rates tuned once on CLINC validation data, then fixed).
    pub fn defaults(method: Method, seed: u64) -> Self {
        let lr_body = match method {
            Method::Full => 1e-4,
            Method::Lora | Method::Auto => 1e-3,
            Method::Learned => 5e-2,
            _ => 0.0,
        };
        AdaptOpts {
            method,
            loop_opts: LoopOpts { steps: DEFAULT_STEPS, batch: 16, seed, weight_decay: 0.0, warmup_frac: 0.06 },
            lr_head: 1e-2,
            lr_body,
            // LoRA from scratch at rank 16, as in the paper (alpha 2r).
            rank: 16,
            alpha: 32.0,
            targets: vec!["query".into(), "value".into()],
            global_weights: false,
            entropy_penalty: 0.0,
            pooling: Pooling::Mean,
            eval_batch: 64,
            select: None,
            select_by: Retrieval::Arrow,
            lorahub_generations: 40,
            density: 0.2,
            drop_p: 0.5,
            auto: auto::AutoOpts::default(),
        }
    }
}

/// What a run produced.
pub struct Outcome {
    /// The adapted model: an encoder classifier or a rank classifier.
    pub model: TaskNet,
    pub scores: Scores,
    pub trainable_params: usize,
    pub train_seconds: f64,
    pub final_loss: f32,
    /// Learned (or fixed) module weights per adapted layer path.
    pub weights: Vec<(String, Vec<f32>)>,
    /// The bank modules used (indices into the given bank, after any retrieval).
    pub used_modules: Vec<usize>,
    /// Method-specific choices (LoraHub weights, λ, chosen module).
    pub details: serde_json::Value,
}

/// Adapt `bert` to `train` with `opts.method`, then score on `test` (text tasks; [`adapt_encoded`] is the
/// general form).
pub fn adapt(
    bert: &Bert,
    tok: &TextEncoder,
    classes: usize,
    train: &[Example],
    test: &[Example],
    bank: &[Adapter],
    opts: &AdaptOpts,
) -> Result<Outcome> {
    let train_enc = encode_all(tok, train)?;
    let test_enc = encode_all(tok, test)?;
    adapt_encoded(Encoder::Bert(bert.clone()), tok.pad_id, classes, &train_enc, &test_enc, bank, opts)
}

/// The adapted model for a task: a classifier (pooling, a fresh head) on an encoder, or a rank classifier over
/// the label strings on a generative model.
pub fn task_net(base: Base, pad: u32, classes: usize, pooling: Pooling, seed: u64) -> Result<TaskNet> {
    Ok(match base {
        Base::Encoder(e) => TaskNet::Classifier(Classifier::new(e, pooling, classes, seed).with_pad(pad)),
        Base::Generative { lm, answers } => {
            if answers.len() != classes {
                bail!("{} label strings for {classes} classes", answers.len());
            }
            TaskNet::Ranker(RankClassifier::new(lm, answers, pad)?)
        }
    })
}

/// Adapt `base` (an encoder, or a generative model with its answers) to encoded examples `train` with
/// `opts.method`, then score on `test`. `pad` is the token batches' padding id (ignored for images).
pub fn adapt_encoded(
    base: impl Into<Base>,
    pad: u32,
    classes: usize,
    train_enc: &[Encoded],
    test_enc: &[Encoded],
    bank: &[Adapter],
    opts: &AdaptOpts,
) -> Result<Outcome> {
    adapt_encoded_with(base, pad, classes, train_enc, test_enc, bank, opts, &mut |_, _| {})
}

/// [`adapt_encoded`], calling `progress(step, loss)` after every step of gradient training.
#[allow(clippy::too_many_arguments)]
pub fn adapt_encoded_with(
    base: impl Into<Base>,
    pad: u32,
    classes: usize,
    train_enc: &[Encoded],
    test_enc: &[Encoded],
    bank: &[Adapter],
    opts: &AdaptOpts,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<Outcome> {
    if opts.method.needs_bank() && bank.is_empty() {
        bail!("method '{}' needs a bank: give --bank ADAPTERDIR...", opts.method.name());
    }
    let mut net = task_net(base.into(), pad, classes, opts.pooling, opts.loop_opts.seed)?;
    let t0 = Instant::now();
    let mut used_modules: Vec<usize> = (0..bank.len()).collect();
    {
        let model = net.as_dyn();
        // The foundation model is frozen whatever state it arrives in; each method makes trainable only its own.
        model.set_base_trainable(false);
    }
    if let (Some(k), true) = (opts.select, opts.method.needs_bank()) {
        used_modules = match (opts.select_by, &mut net) {
            (Retrieval::Arrow, TaskNet::Classifier(c)) => peers::arrow_select(c, bank, train_enc, k)?,
            (Retrieval::Cka, TaskNet::Classifier(c)) => {
                similarity::cka_select(&c.encoder, pad, bank, train_enc, classes, opts.pooling, k)?
            }
            (Retrieval::Loss, net) => {
                let model = net.as_dyn();
                let paths = uniform::prepare(model, bank)?;
                let losses = peers::module_losses(model, &paths, bank.len(), train_enc)?;
                crate::util::ensure_finite(losses.iter().copied(), "--by loss", "bank module")?;
                // The method attaches the chosen modules afresh: no layer keeps the whole bank.
                for l in model.all_linears_mut() {
                    l.set_bank(Vec::new());
                    l.comp = crate::lora::bank::Composition::Off;
                }
                let mut idx: Vec<usize> = (0..bank.len()).collect();
                idx.sort_by(|&a, &b| losses[a].total_cmp(&losses[b]));
                idx.truncate(k.min(bank.len()));
                idx
            }
            (by, TaskNet::Ranker(_)) => bail!(
                "--by {}: retrieval by encoder features is for encoders (bert, vit, dinov2); on a generative model use --by loss",
                serde_json::to_value(by)?.as_str().unwrap_or("?")
            ),
        };
    }
    let sub: Vec<Adapter> = used_modules.iter().map(|&i| bank[i].clone()).collect();
    let bank = &sub[..];
    let mut details = serde_json::Value::Null;
    let model = net.as_dyn();
    let adapted = match opts.method {
        Method::LinearProbe => linear_probe::prepare(model)?,
        Method::Full => full::prepare(model),
        Method::Lora => lora::prepare(model, opts)?,
        Method::Uniform => uniform::prepare(model, bank)?,
        Method::Learned => learned::prepare(model, bank)?,
        peer => {
            let paths = uniform::prepare(model, bank)?;
            let (n, seed) = (bank.len(), opts.loop_opts.seed);
            let grid = [0.0f32, 0.2, 0.4, 0.6, 0.8, 1.0];
            use merges::Merge;
            details = match peer {
                Method::Lorahub | Method::LorahubCompat => peers::lorahub(
                    model,
                    &paths,
                    n,
                    train_enc,
                    opts.lorahub_generations,
                    seed,
                    peer == Method::LorahubCompat,
                )?,
                Method::BestSingle => peers::best_single(model, &paths, n, train_enc)?,
                Method::Auto => auto::run(model, &paths, n, train_enc, &opts.auto, &opts.loop_opts, opts.lr_head)?,
                dense => {
                    let merge = match dense {
                        Method::TaskArithmetic => Merge::TaskArithmetic,
                        Method::Ties => Merge::Ties { density: opts.density },
                        Method::Dare => Merge::DareLinear { p: opts.drop_p },
                        Method::DareTies => Merge::DareTies { p: opts.drop_p, density: opts.density },
                        Method::MagnitudePrune => Merge::MagnitudePrune { density: opts.density },
                        _ => unreachable!("every other method is matched above"),
                    };
                    peers::dense_merge(model, &paths, merge, &grid, train_enc, seed)?
                }
            };
            paths
        }
    };
    let mut trainable_params: usize = model.trainable_params_mut().iter().map(|(_, p)| p.len()).sum();
    if opts.global_weights && opts.method == Method::Learned {
        // one vector shared by every layer counts once
        trainable_params -= bank.len() * adapted.len().saturating_sub(1);
    }
    // The head learns at lr_head, the method's own parameters (LoRA factors, logits, encoder weights) at lr_body.
    let (lr_head, lr_body) = (opts.lr_head, opts.lr_body);
    let lr_for = move |n: &str| if n.starts_with("classifier.") { lr_head } else { lr_body };
    let mut losses = if opts.method.frozen_encoder() {
        let mut loop_opts = opts.loop_opts.clone();
        if opts.method == Method::Auto {
            loop_opts.steps = auto::head_steps(&opts.loop_opts, opts.auto.epochs, train_enc.len());
        }
        model.train_head_only(train_enc, &loop_opts, opts.lr_head, opts.eval_batch)?
    } else {
        let mut hook = learned::hook(opts.global_weights, opts.entropy_penalty);
        train_model(model, train_enc, &opts.loop_opts, &lr_for, Some(&mut hook), &mut *progress)?
    };
    if opts.method == Method::Auto {
        let mut lora = serde_json::Value::Null;
        if opts.auto.lora_stage(auto::min_class_count(train_enc, classes)) {
            // Step 5: a fresh LoRA on top of the fixed composition, trained with the head (started from step
            // 4's) at the `lora` method's settings.
            let lora_paths = lora::prepare(model, opts)?;
            trainable_params = model.trainable_params_mut().iter().map(|(_, p)| p.len()).sum();
            losses = train_model(model, train_enc, &opts.loop_opts, &lr_for, None, progress)?;
            lora = serde_json::json!({
                "rank": opts.rank, "alpha": opts.alpha, "lr": opts.lr_body,
                "steps": opts.loop_opts.steps, "layers": lora_paths.len(),
            });
        }
        if let Some(d) = details.as_object_mut() {
            d.insert("lora".into(), lora);
        }
    }
    let train_seconds = t0.elapsed().as_secs_f64();
    let pred = predict(model, test_enc, opts.eval_batch)?;
    let gold: Vec<usize> = test_enc.iter().map(|e| e.label).collect();
    let scores = score(&gold, &pred, classes);
    let weights = adapted
        .iter()
        .filter_map(|p| {
            let lin = model.linear_mut(p)?;
            (!lin.bank().is_empty()).then(|| (p.clone(), lin.module_weights()))
        })
        .collect();
    Ok(Outcome {
        model: net,
        scores,
        trainable_params,
        train_seconds,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        weights,
        used_modules,
        details,
    })
}

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

pub mod bank;
pub mod common;
pub mod export;
pub mod full;
pub mod learned;
pub mod linear_probe;
pub mod lora;
pub mod step;
pub mod uniform;

use crate::data::Example;
use crate::engine::kernels::Pooling;
use crate::lora::peft::Adapter;
use crate::models::bert::Bert;
use crate::models::classifier::Classifier;
use crate::models::tokenize::TextEncoder;
use anyhow::{bail, Result};
use common::{encode_all, features, predict, score, train_head_on_features, train_model, LoopOpts, Scores};
use serde::Serialize;
use std::time::Instant;

/// The adaptation methods `adapt` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    LinearProbe,
    Full,
    Lora,
    Uniform,
    Learned,
}

impl Method {
    pub const ALL: [Method; 5] = [Method::LinearProbe, Method::Full, Method::Lora, Method::Uniform, Method::Learned];
    pub fn name(self) -> &'static str {
        match self {
            Method::LinearProbe => "linear-probe",
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Uniform => "uniform",
            Method::Learned => "learned",
        }
    }
    pub fn needs_bank(self) -> bool {
        matches!(self, Method::Uniform | Method::Learned)
    }
    /// Whether the encoder stays frozen, so the head can be trained on cached features.
    fn frozen_encoder(self) -> bool {
        matches!(self, Method::LinearProbe | Method::Uniform)
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown method '{s}' (linear-probe, full, lora, uniform, learned)"))
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
}

impl AdaptOpts {
    /// Defaults per method (learning rates tuned once on CLINC validation data, then fixed).
    pub fn defaults(method: Method, seed: u64) -> Self {
        let lr_body = match method {
            Method::Full => 1e-4,
            Method::Lora => 1e-3,
            Method::Learned => 5e-2,
            Method::LinearProbe | Method::Uniform => 0.0,
        };
        AdaptOpts {
            method,
            loop_opts: LoopOpts { steps: 200, batch: 16, seed, weight_decay: 0.0, warmup_frac: 0.06 },
            lr_head: 1e-2,
            lr_body,
            rank: 8,
            alpha: 16.0,
            targets: vec!["query".into(), "value".into()],
            global_weights: false,
            entropy_penalty: 0.0,
            pooling: Pooling::Mean,
            eval_batch: 64,
        }
    }
}

/// What a run produced.
pub struct Outcome {
    pub model: Classifier,
    pub scores: Scores,
    pub trainable_params: usize,
    pub train_seconds: f64,
    pub final_loss: f32,
    /// Learned (or fixed) module weights per adapted layer path.
    pub weights: Vec<(String, Vec<f32>)>,
}

/// Adapt `bert` to `train` with `opts.method`, then score on `test`.
pub fn adapt(
    bert: &Bert,
    tok: &TextEncoder,
    classes: usize,
    train: &[Example],
    test: &[Example],
    bank: &[Adapter],
    opts: &AdaptOpts,
) -> Result<Outcome> {
    if opts.method.needs_bank() && bank.is_empty() {
        bail!("method '{}' needs a bank: give --bank ADAPTERDIR...", opts.method.name());
    }
    let pad = tok.pad_id;
    let mut model = Classifier::new(bert.clone(), opts.pooling, classes, opts.loop_opts.seed);
    // The foundation model is frozen whatever state it arrives in; each method makes trainable only its own.
    model.bert.set_all_trainable(false);
    let adapted = match opts.method {
        Method::LinearProbe => linear_probe::prepare(&mut model),
        Method::Full => full::prepare(&mut model),
        Method::Lora => lora::prepare(&mut model, opts)?,
        Method::Uniform => uniform::prepare(&mut model, bank)?,
        Method::Learned => learned::prepare(&mut model, bank)?,
    };
    let mut trainable_params: usize = model.trainable_params_mut().iter().map(|(_, p)| p.len()).sum();
    if opts.global_weights && opts.method == Method::Learned {
        // one vector shared by every layer counts once
        trainable_params -= bank.len() * adapted.len().saturating_sub(1);
    }
    let train_enc = encode_all(tok, train)?;
    let t0 = Instant::now();
    let losses = if opts.method.frozen_encoder() {
        let feats = features(&mut model, &train_enc, pad, opts.eval_batch)?;
        let labels: Vec<usize> = train_enc.iter().map(|e| e.label).collect();
        train_head_on_features(&mut model, &feats, &labels, &opts.loop_opts, opts.lr_head)?
    } else {
        let (lr_head, lr_body) = (opts.lr_head, opts.lr_body);
        let lr_for = move |n: &str| if n.starts_with("classifier.") { lr_head } else { lr_body };
        let mut hook = learned::hook(opts.global_weights, opts.entropy_penalty);
        train_model(&mut model, &train_enc, pad, &opts.loop_opts, &lr_for, Some(&mut hook), |_, _| {})?
    };
    let train_seconds = t0.elapsed().as_secs_f64();
    let test_enc = encode_all(tok, test)?;
    let pred = predict(&mut model, &test_enc, pad, opts.eval_batch)?;
    let gold: Vec<usize> = test_enc.iter().map(|e| e.label).collect();
    let scores = score(&gold, &pred, classes);
    let weights = adapted
        .iter()
        .filter_map(|p| {
            let lin = model.bert.linear_mut(p)?;
            (!lin.bank().is_empty()).then(|| (p.clone(), lin.module_weights()))
        })
        .collect();
    Ok(Outcome {
        model,
        scores,
        trainable_params,
        train_seconds,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        weights,
    })
}

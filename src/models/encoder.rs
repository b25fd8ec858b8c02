//! The encoders a classifier can sit on — BERT (text) and ViT / DINOv2 (images) — behind one enum, with the
//! input batches each takes and the front end (tokenizer or image preprocessor) that makes them.
//!
//! Methods, training loops and the bank code talk to [`Encoder`]; the architecture files (`bert.rs`, `vit.rs`)
//! stay independent of each other.

use super::bert::{Batch, Bert};
use super::generative::Generative;
use super::hf::{HfDir, HfEncoder};
use super::image::Preprocessor;
use super::kind::ModelKind;
use super::tokenize::TextEncoder;
use super::vit::{Pixels, Vit};
use crate::engine::kernels::Pooling;
use crate::engine::param::Param;
use crate::lora::bank::BankLinear;
use crate::lora::host::LinearHost;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};

/// A batch for one of the encoders, borrowed.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a> {
    Tokens(&'a Batch),
    Pixels(&'a Pixels),
}

impl<'a> From<&'a Batch> for Input<'a> {
    fn from(b: &'a Batch) -> Self {
        Input::Tokens(b)
    }
}

impl<'a> From<&'a Pixels> for Input<'a> {
    fn from(p: &'a Pixels) -> Self {
        Input::Pixels(p)
    }
}

/// A batch for one of the encoders, owned (what `methods::common::batch_of` builds).
#[derive(Clone, Debug)]
pub enum InputBatch {
    Tokens(Batch),
    Pixels(Pixels),
}

impl<'a> From<&'a InputBatch> for Input<'a> {
    fn from(b: &'a InputBatch) -> Self {
        match b {
            InputBatch::Tokens(t) => Input::Tokens(t),
            InputBatch::Pixels(p) => Input::Pixels(p),
        }
    }
}

impl Input<'_> {
    /// Number of examples.
    pub fn batch(&self) -> usize {
        match self {
            Input::Tokens(b) => b.batch,
            Input::Pixels(p) => p.batch,
        }
    }
}

/// A text or image encoder; every linear layer of either is a [`BankLinear`].
// One encoder per classifier and one front end per loaded model: boxing the larger variant would save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Encoder {
    Bert(Bert),
    Vit(Vit),
}

impl From<Bert> for Encoder {
    fn from(b: Bert) -> Self {
        Encoder::Bert(b)
    }
}

impl From<Vit> for Encoder {
    fn from(v: Vit) -> Self {
        Encoder::Vit(v)
    }
}

impl Encoder {
    pub fn hidden(&self) -> usize {
        match self {
            Encoder::Bert(b) => b.hidden(),
            Encoder::Vit(v) => v.hidden(),
        }
    }

    /// The BERT encoder, if this is one.
    pub fn bert(&self) -> Option<&Bert> {
        match self {
            Encoder::Bert(b) => Some(b),
            Encoder::Vit(_) => None,
        }
    }

    pub fn bert_mut(&mut self) -> Option<&mut Bert> {
        match self {
            Encoder::Bert(b) => Some(b),
            Encoder::Vit(_) => None,
        }
    }

    /// Pooling used when none is asked for: mean for BERT (sentence-transformers models), CLS for ViT (how
    /// ViTs are pre-trained, `loracomp pretrain` included).
    pub fn default_pooling(&self) -> Pooling {
        match self {
            Encoder::Bert(_) => Pooling::Mean,
            Encoder::Vit(_) => Pooling::Cls,
        }
    }

    /// Forward pass; returns the last hidden state `[batch·seq, hidden]` and the token mask `[batch·seq]`
    /// (padding 0; every ViT token 1) with `seq`.
    pub fn forward(&mut self, x: Input) -> Result<(&[f32], Vec<f32>, usize)> {
        match (self, x) {
            (Encoder::Bert(m), Input::Tokens(b)) => Ok((m.forward(b)?, b.mask.clone(), b.seq)),
            (Encoder::Vit(m), Input::Pixels(p)) => {
                m.forward(p)?;
                let (b, seq) = m.shape();
                Ok((m.last_hidden(), vec![1.0; b * seq], seq))
            }
            (Encoder::Bert(_), Input::Pixels(_)) => bail!("a BERT encoder takes text, not images"),
            (Encoder::Vit(_), Input::Tokens(_)) => bail!("a ViT encoder takes images, not text"),
        }
    }

    /// Backward from the last hidden state's gradient into every trainable parameter.
    pub fn backward(&mut self, d_last: &[f32]) -> Result<()> {
        match self {
            Encoder::Bert(m) => m.backward(d_last),
            Encoder::Vit(m) => m.backward(d_last, false),
        }
    }

    pub fn set_all_trainable(&mut self, on: bool) {
        match self {
            Encoder::Bert(m) => m.set_all_trainable(on),
            Encoder::Vit(m) => m.set_all_trainable(on),
        }
    }

    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        match self {
            Encoder::Bert(m) => m.trainable_params_mut(),
            Encoder::Vit(m) => m.trainable_params_mut(),
        }
    }

    /// Every adaptable linear module's canonical path, in layer order.
    pub fn linear_paths(&self) -> Vec<String> {
        match self {
            Encoder::Bert(m) => m.linear_paths(),
            Encoder::Vit(m) => m.linear_paths(),
        }
    }

    pub fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        match self {
            Encoder::Bert(m) => m.linear_mut(path),
            Encoder::Vit(m) => m.linear_mut(path),
        }
    }

    /// Every adaptable linear module with its canonical path, in layer order (for export).
    pub fn linears(&self) -> Vec<(String, &BankLinear)> {
        let lins: Vec<&BankLinear> = match self {
            Encoder::Bert(m) => m.layers.iter().flat_map(|l| l.linears()).collect(),
            Encoder::Vit(m) => m.layers.iter().flat_map(|l| l.linears()).collect(),
        };
        self.linear_paths().into_iter().zip(lins).collect()
    }

    /// Every `BankLinear` of the encoder (the adaptable ones in layer order, then a ViT's patch projection),
    /// for invalidating cached merges and visiting compositions.
    pub fn linears_mut(&mut self) -> Vec<&mut BankLinear> {
        match self {
            Encoder::Bert(m) => m.layers.iter_mut().flat_map(|l| l.linears_mut()).collect(),
            Encoder::Vit(m) => {
                let mut v: Vec<&mut BankLinear> = m.layers.iter_mut().flat_map(|l| l.linears_mut()).collect();
                v.push(&mut m.patch);
                v
            }
        }
    }

    /// The input of layer `l`'s attention projections in the most recent forward pass, `[batch·seq, hidden]`.
    pub fn layer_input(&self, l: usize) -> &[f32] {
        match self {
            Encoder::Bert(m) => m.layer_input(l),
            Encoder::Vit(m) => m.layer_input(l),
        }
    }

    /// Every weight under its Hugging Face safetensors key.
    pub fn state_dict(&self) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        match self {
            Encoder::Bert(m) => m.state_dict(),
            Encoder::Vit(m) => m.state_dict(),
        }
    }
}

impl LinearHost for Encoder {
    fn linear_paths(&self) -> Vec<String> {
        Encoder::linear_paths(self)
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        Encoder::linear_mut(self, path)
    }
    fn resolve(&self, module: &str) -> Option<String> {
        match self {
            Encoder::Bert(m) => m.resolve(module),
            Encoder::Vit(m) => m.resolve(module),
        }
    }
    fn describe(&self) -> String {
        match self {
            Encoder::Bert(m) => m.describe(),
            Encoder::Vit(m) => m.describe(),
        }
    }
}

/// What turns task examples into model input.
#[allow(clippy::large_enum_variant)]
pub enum Frontend {
    /// A text encoder's tokenizer (text pairs as the tokenizer joins them).
    Text(TextEncoder),
    /// The model's preprocessor and the channel count its patch projection takes.
    Image { pre: Preprocessor, channels: usize },
    /// A generative model's tokenizer: the text (and text pair) through the prompt template, then the
    /// tokenizer with its own special tokens; each label string's answer tokens end with `eos`.
    Prompt { tok: TextEncoder, template: Option<String>, eos: u32 },
}

impl Frontend {
    /// The prompt for one example: `template` with `{text}` and `{text_pair}` replaced, or the bare text (a
    /// pair joined by a space) without one.
    pub fn prompt(template: Option<&str>, text: &str, pair: Option<&str>) -> String {
        match template {
            Some(t) => t.replace("{text}", text).replace("{text_pair}", pair.unwrap_or("")),
            None => match pair {
                Some(p) => format!("{text} {p}"),
                None => text.to_string(),
            },
        }
    }
}

/// Check a `--template`: it must contain `{text}`, and `{text_pair}` only where the task has pairs.
pub fn check_template(t: &str) -> Result<()> {
    if !t.contains("{text}") {
        bail!("--template '{t}' has no {{text}} placeholder");
    }
    Ok(())
}

/// The foundation model of a loaded directory: an encoder (a classifier head goes on top) or a generative model
/// (classes are ranked by their label strings).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Base {
    Encoder(Encoder),
    /// The model and each class's answer tokens.
    Generative {
        lm: Generative,
        answers: Vec<Vec<u32>>,
    },
}

impl From<Encoder> for Base {
    fn from(e: Encoder) -> Self {
        Base::Encoder(e)
    }
}

/// A Hugging Face model directory with its front end: BERT with `tokenizer.json`, ViT / DINOv2 with
/// `preprocessor_config.json`, T5 and Llama-family models with `tokenizer.json`. The architecture is read once,
/// from `config.json`'s `model_type` ([`ModelKind::of`]).
pub struct LoadedModel {
    pub dir: PathBuf,
    pub kind: ModelKind,
    /// The encoder of an encoder model; `None` for a generative one (see [`LoadedModel::generative`]).
    encoder: Option<Encoder>,
    generative: Option<Generative>,
    pub frontend: Frontend,
}

impl LoadedModel {
    /// Load any supported directory (see [`ModelKind`]). `max_len` truncates token sequences.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let hf = HfDir::open(dir)?;
        let kind = hf.kind;
        match kind {
            ModelKind::Vit | ModelKind::Dinov2 => {
                let vit: Vit = hf.load()?;
                let pp = dir.join("preprocessor_config.json");
                if !pp.is_file() {
                    bail!("{}: missing (an image model needs its preprocessor config)", pp.display());
                }
                let pre = Preprocessor::from_file(&pp)?;
                let channels = vit.cfg.num_channels;
                Ok(LoadedModel {
                    dir: dir.to_path_buf(),
                    kind,
                    encoder: Some(Encoder::Vit(vit)),
                    generative: None,
                    frontend: Frontend::Image { pre, channels },
                })
            }
            ModelKind::Bert => {
                let enc = HfEncoder::from_dir(&hf, max_len)?;
                Ok(LoadedModel {
                    dir: enc.dir,
                    kind,
                    encoder: Some(Encoder::Bert(enc.bert)),
                    generative: None,
                    frontend: Frontend::Text(enc.tok),
                })
            }
            ModelKind::T5 | ModelKind::Llama => {
                let lm = match kind {
                    ModelKind::T5 => Generative::T5(hf.load()?),
                    _ => Generative::Llama(hf.load()?),
                };
                let tok0 = hf.tokenizer(max_len, 0)?;
                let special = hf.special_tokens(&|t| tok0.token_to_id(t))?;
                let Some(eos) = special.eos else {
                    bail!(
                        "{}: no eos_token_id (config.json) or eos_token (special_tokens_map.json / tokenizer_config.json): rank classification ends every answer with it",
                        dir.display()
                    );
                };
                // Prompts are right-padded with the pad id (T5 is trained with it; a causal model never sees
                // what follows a sequence, so any id works and EOS is used where there is none).
                let pad = special.pad.unwrap_or(eos);
                let tok = hf.tokenizer(max_len, pad)?;
                Ok(LoadedModel {
                    dir: dir.to_path_buf(),
                    kind,
                    encoder: None,
                    generative: Some(lm),
                    frontend: Frontend::Prompt { tok, template: None, eos },
                })
            }
        }
    }

    /// The encoder, or an error naming the directory for a generative model (for commands that need
    /// features: `embed`, similarity measures).
    pub fn encoder(&self) -> Result<&Encoder> {
        self.encoder.as_ref().ok_or_else(|| self.not_encoder())
    }

    pub fn encoder_mut(&mut self) -> Result<&mut Encoder> {
        let e = self.not_encoder();
        self.encoder.as_mut().ok_or(e)
    }

    fn not_encoder(&self) -> anyhow::Error {
        anyhow!(
            "{}: a {} model is generative (it ranks label strings) and has no encoder features; this needs bert, vit or dinov2",
            self.dir.display(),
            self.kind.name()
        )
    }

    /// The front end and the encoder (if any), borrowed together.
    pub fn parts_mut(&mut self) -> (&Frontend, Option<&mut Encoder>) {
        (&self.frontend, self.encoder.as_mut())
    }

    /// The generative model, if this is one.
    pub fn generative(&self) -> Option<&Generative> {
        self.generative.as_ref()
    }

    /// Set the prompt template of a generative model; an error for an encoder (a template would be ignored).
    pub fn set_template(&mut self, template: Option<String>) -> Result<()> {
        let Some(t) = template else { return Ok(()) };
        check_template(&t)?;
        match &mut self.frontend {
            Frontend::Prompt { template, .. } => {
                *template = Some(t);
                Ok(())
            }
            _ => bail!(
                "--template applies to generative models (t5, llama); {} is a {} model",
                self.dir.display(),
                self.kind.name()
            ),
        }
    }

    /// The foundation model for a task with these label strings: the encoder, or the generative model with each
    /// label's answer tokens (the label string without special tokens, then EOS).
    pub fn base(&self, labels: &[String]) -> Result<Base> {
        match (&self.encoder, &self.generative, &self.frontend) {
            (Some(e), _, _) => Ok(Base::Encoder(e.clone())),
            (None, Some(g), Frontend::Prompt { tok, eos, .. }) => {
                let answers = labels
                    .iter()
                    .map(|l| {
                        let mut a = tok.encode_plain(l)?;
                        a.push(*eos);
                        Ok(a)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Base::Generative { lm: g.clone(), answers })
            }
            _ => unreachable!("a loaded model is an encoder or a generative model with a prompt front end"),
        }
    }

    /// Padding id for token batches (unused by image models).
    pub fn pad_id(&self) -> u32 {
        match &self.frontend {
            Frontend::Text(t) | Frontend::Prompt { tok: t, .. } => t.pad_id,
            Frontend::Image { .. } => 0,
        }
    }

    pub fn is_image(&self) -> bool {
        matches!(self.frontend, Frontend::Image { .. })
    }

    /// Files whose bytes define the model (hashed by sweeps to decide whether a bank can be reused): config,
    /// weights, and tokenizer or preprocessor config (tokenizer when `config.json` cannot be read).
    pub fn files(dir: &Path) -> Vec<PathBuf> {
        HfDir::files(dir)
    }
}

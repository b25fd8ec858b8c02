//! The encoders a classifier can sit on — BERT (text) and ViT / DINOv2 (images) — behind one enum, with the
//! input batches each takes and the front end (tokenizer or image preprocessor) that makes them.
//!
//! Methods, training loops and the bank code talk to [`Encoder`]; the architecture files (`bert.rs`, `vit.rs`)
//! stay independent of each other.

use super::bert::{Batch, Bert};
use super::image::Preprocessor;
use super::tokenize::TextEncoder;
use super::vit::{Pixels, Vit};
use crate::engine::kernels::Pooling;
use crate::engine::param::Param;
use crate::lora::bank::BankLinear;
use crate::lora::host::LinearHost;
use anyhow::{anyhow, bail, Context, Result};
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

/// A batch for one of the encoders, owned (what [`crate::methods::common::batch_of`] builds).
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

/// What turns task examples into encoder input.
#[allow(clippy::large_enum_variant)]
pub enum Frontend {
    Text(TextEncoder),
    /// The model's preprocessor and the channel count its patch projection takes.
    Image {
        pre: Preprocessor,
        channels: usize,
    },
}

/// A Hugging Face model directory with its front end: BERT with `tokenizer.json`, or ViT / DINOv2 with
/// `preprocessor_config.json`. The architecture is read from `config.json`'s `model_type`.
pub struct LoadedModel {
    pub dir: PathBuf,
    pub encoder: Encoder,
    pub frontend: Frontend,
}

/// `model_type` of `dir/config.json`.
pub fn model_type(dir: &Path) -> Result<String> {
    if !dir.is_dir() {
        bail!("{}: model directory not found", dir.display());
    }
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", p.display()))?;
    Ok(v.get("model_type").and_then(|t| t.as_str()).unwrap_or("bert").to_string())
}

impl LoadedModel {
    /// Load a BERT (`model_type` bert or absent, as sentence-transformers folders) or ViT / DINOv2 directory.
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        match model_type(dir)?.as_str() {
            "vit" | "dinov2" => {
                let vit = Vit::load(dir)?;
                let pp = dir.join("preprocessor_config.json");
                if !pp.is_file() {
                    bail!("{}: missing (an image model needs its preprocessor config)", pp.display());
                }
                let pre = Preprocessor::from_file(&pp)?;
                let channels = vit.cfg.num_channels;
                Ok(LoadedModel {
                    dir: dir.to_path_buf(),
                    encoder: Encoder::Vit(vit),
                    frontend: Frontend::Image { pre, channels },
                })
            }
            _ => {
                let enc = super::hf::HfEncoder::load(dir, max_len)?;
                Ok(LoadedModel { dir: enc.dir, encoder: Encoder::Bert(enc.bert), frontend: Frontend::Text(enc.tok) })
            }
        }
    }

    /// Padding id for token batches (unused by image models).
    pub fn pad_id(&self) -> u32 {
        match &self.frontend {
            Frontend::Text(t) => t.pad_id,
            Frontend::Image { .. } => 0,
        }
    }

    pub fn is_image(&self) -> bool {
        matches!(self.frontend, Frontend::Image { .. })
    }

    /// Files whose bytes define the model (hashed by sweeps to decide whether a bank can be reused): config,
    /// weights, and tokenizer or preprocessor config (tokenizer when `config.json` cannot be read).
    pub fn files(dir: &Path) -> Vec<PathBuf> {
        let front = match model_type(dir).as_deref() {
            Ok("vit") | Ok("dinov2") => "preprocessor_config.json",
            _ => "tokenizer.json",
        };
        vec![dir.join("config.json"), dir.join("model.safetensors"), dir.join(front)]
    }
}

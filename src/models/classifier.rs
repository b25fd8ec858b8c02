//! A classifier: encoder (BERT or ViT), pooling and a linear head (`classifier`, stored PEFT-style under
//! `modules_to_save` keys in adapters).

use super::bert::Bert;
use super::encoder::{Encoder, Input};
use crate::engine::kernels::{pool_backward, pool_forward, softmax_cross_entropy, Pooling};
use crate::engine::param::Param;
use crate::lora::bank::BankLinear;
use anyhow::Result;

/// Encoder + pooling + linear head.
#[derive(Clone, Debug)]
pub struct Classifier {
    pub encoder: Encoder,
    pub pooling: Pooling,
    pub head: BankLinear,
    pub classes: usize,
    /// Padding id of token batches built from encoded examples (unused by image models).
    pub pad: u32,
    pooled: Vec<f32>,
    logits: Vec<f32>,
    probs: Vec<f32>,
    dlogits: Vec<f32>,
    dpooled: Vec<f32>,
    dhidden: Vec<f32>,
    /// Shape and token mask of the last forward pass.
    batch: usize,
    seq: usize,
    mask: Vec<f32>,
}

impl Classifier {
    /// A fresh head (`normal(0, 0.02)` weight, zero bias, trainable) on `encoder` (a [`Bert`], a
    /// [`super::vit::Vit`] or an [`Encoder`]).
    pub fn new(encoder: impl Into<Encoder>, pooling: Pooling, classes: usize, seed: u64) -> Self {
        use rand::SeedableRng;
        let encoder = encoder.into();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x4845_4144);
        let d = encoder.hidden();
        let w: Vec<f32> = (0..classes * d).map(|_| crate::util::normal(&mut rng) * 0.02).collect();
        let mut wp = Param::new(vec![classes, d], w);
        let mut bp = Param::zeros(vec![classes]);
        wp.set_trainable(true);
        bp.set_trainable(true);
        Self::with_head(encoder, pooling, BankLinear::new(wp, Some(bp)))
    }

    pub fn with_head(encoder: impl Into<Encoder>, pooling: Pooling, head: BankLinear) -> Self {
        let classes = head.dout;
        Classifier {
            encoder: encoder.into(),
            pooling,
            head,
            classes,
            pad: 0,
            pooled: Vec::new(),
            logits: Vec::new(),
            probs: Vec::new(),
            dlogits: Vec::new(),
            dpooled: Vec::new(),
            dhidden: Vec::new(),
            batch: 0,
            seq: 0,
            mask: Vec::new(),
        }
    }

    /// The same classifier with token batches padded by `pad`.
    pub fn with_pad(mut self, pad: u32) -> Self {
        self.pad = pad;
        self
    }

    /// The BERT encoder (panics on an image model; for BERT-only code and tests).
    pub fn bert(&self) -> &Bert {
        self.encoder.bert().expect("a BERT classifier")
    }

    pub fn bert_mut(&mut self) -> &mut Bert {
        self.encoder.bert_mut().expect("a BERT classifier")
    }

    /// Logits `[batch, classes]` of a token batch ([`super::bert::Batch`]) or an image batch
    /// ([`super::vit::Pixels`]).
    pub fn forward<'a>(&mut self, x: impl Into<Input<'a>>) -> Result<&[f32]> {
        let x = x.into();
        let b = x.batch();
        let d = self.encoder.hidden();
        let (h, mask, seq) = self.encoder.forward(x)?;
        self.pooled.resize(b * d, 0.0);
        pool_forward(self.pooling, h, &mask, b, seq, d, &mut self.pooled);
        self.logits.resize(b * self.classes, 0.0);
        self.head.forward(&self.pooled, b, &mut self.logits);
        (self.batch, self.seq, self.mask) = (b, seq, mask);
        Ok(&self.logits)
    }

    /// Pooled features of the last forward pass `[batch, hidden]`.
    pub fn pooled(&self) -> &[f32] {
        &self.pooled
    }

    /// Mean cross-entropy of the last forward pass against `labels`; backpropagates into every trainable
    /// parameter (gradients accumulate). Returns the loss.
    pub fn backward(&mut self, labels: &[usize]) -> Result<f32> {
        let b = self.batch;
        self.probs.resize(b * self.classes, 0.0);
        self.dlogits.resize(b * self.classes, 0.0);
        let loss = softmax_cross_entropy(&self.logits, labels, self.classes, &mut self.probs, &mut self.dlogits);
        self.backward_from_logits_grad(None)?;
        Ok(loss)
    }

    /// Backward from a given logits gradient (or the one the last `backward` computed).
    pub fn backward_from_logits_grad(&mut self, dlogits: Option<&[f32]>) -> Result<()> {
        let b = self.batch;
        let d = self.encoder.hidden();
        if let Some(g) = dlogits {
            self.dlogits.clear();
            self.dlogits.extend_from_slice(g);
        }
        self.dpooled.resize(b * d, 0.0);
        self.head.backward(&self.pooled, &self.dlogits, b, Some(&mut self.dpooled), false);
        self.dhidden.resize(b * self.seq * d, 0.0);
        pool_backward(self.pooling, &self.dpooled, &self.mask, b, self.seq, d, &mut self.dhidden);
        self.encoder.backward(&self.dhidden)
    }

    /// Every trainable parameter, named (`classifier.weight`, `encoder.layer.0…`).
    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = self.encoder.trainable_params_mut();
        for (s, p) in self.head.trainable_params_mut() {
            out.push((format!("classifier.{s}"), p));
        }
        out
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.trainable_params_mut() {
            p.zero_grad();
        }
    }
}

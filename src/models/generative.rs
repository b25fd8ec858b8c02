//! Classification with a generative model (T5 / Flan-T5, Llama family) by **rank classification** over the
//! label strings, as LoraHub evaluates Flan-T5: there is no classification head.
//!
//! Each class `c` has an answer `a_c`: its label string's tokens followed by EOS (so that a label that is a
//! prefix of another, "no" and "none", still ends differently). For a prompt `x` (the task text through the
//! template, tokenised with the tokenizer's own special tokens), the score of class `c` is the answer's summed
//! log-probability
//!
//! ```text
//! s_c(x) = Σ_t log p(a_c[t] | x, a_c[<t])
//! ```
//!
//! (T5: the decoder, teacher-forced from `decoder_start_token_id`; Llama: the tokens after the prompt in
//! `prompt ‖ a_c`). The prediction is `argmax_c s_c(x)`. The summed, not the mean, log-probability is used: it is
//! the probability of the whole answer, and the mean would favour long labels whose later tokens are easy once
//! the first is given. `softmax_c s_c(x)` are the class probabilities `predict` prints.
//!
//! Training minimises the answer tokens' cross-entropy with the gold class's answer as the target (T5:
//! decoder target `a_y`; Llama: `x ‖ a_y`, loss on the answer tokens only), the mean over every answer token of
//! the batch, as transformers computes a sequence-to-sequence or causal-LM loss with `-100` labels.

use super::llama::{Llama, LmBatch, IGNORE};
use super::t5::{seq_cross_entropy, shift_right, Seq2SeqBatch, T5};
use crate::engine::param::Param;
use crate::lora::bank::BankLinear;
use crate::lora::host::LinearHost;
use anyhow::{bail, Result};

/// A generative model: every linear layer (and the LM head) is a [`BankLinear`] at its PEFT path.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Generative {
    T5(T5),
    Llama(Llama),
}

impl Generative {
    pub fn vocab(&self) -> usize {
        match self {
            Generative::T5(m) => m.vocab(),
            Generative::Llama(m) => m.vocab(),
        }
    }

    /// Every linear layer with its path (`lm_head` last).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut BankLinear)> {
        match self {
            Generative::T5(m) => m.linears_mut(),
            Generative::Llama(m) => {
                let paths = m.linear_paths();
                let mut lins: Vec<&mut BankLinear> = Vec::new();
                for layer in &mut m.layers {
                    lins.extend(layer.linears_mut());
                }
                lins.push(&mut m.lm_head);
                paths.into_iter().zip(lins).collect()
            }
        }
    }

    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        match self {
            Generative::T5(m) => m.trainable_params_mut(),
            Generative::Llama(m) => m.trainable_params_mut(),
        }
    }

    /// Full fine-tuning's parameters: the weight and bias of every linear layer of the body (attention and MLP
    /// projections). Embeddings, norms and the LM head (tied to the embeddings in T5) stay frozen.
    pub fn set_body_trainable(&mut self, on: bool) {
        for (path, lin) in self.linears_mut() {
            if path == "lm_head" {
                continue;
            }
            lin.w.set_trainable(on);
            if let Some(b) = lin.bias.as_mut() {
                b.set_trainable(on);
            }
        }
    }

    pub fn invalidate(&mut self) {
        match self {
            Generative::T5(m) => m.invalidate(),
            Generative::Llama(m) => m.invalidate(),
        }
    }
}

impl LinearHost for Generative {
    fn linear_paths(&self) -> Vec<String> {
        match self {
            Generative::T5(m) => m.linear_paths(),
            Generative::Llama(m) => m.linear_paths(),
        }
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        match self {
            Generative::T5(m) => m.linear_mut(path),
            Generative::Llama(m) => m.linear_mut(path),
        }
    }
    fn resolve(&self, module: &str) -> Option<String> {
        match self {
            Generative::T5(m) => m.resolve(module),
            Generative::Llama(m) => m.resolve(module),
        }
    }
    fn describe(&self) -> String {
        match self {
            Generative::T5(m) => m.describe(),
            Generative::Llama(m) => m.describe(),
        }
    }
}

/// Most logit values one scoring pass may hold (Llama scores `examples × classes` sequences at once):
/// 32 Mi floats, 128 MiB.
const SCORE_LOGITS: usize = 32 << 20;

/// A generative model with one answer per class; see the module docs.
#[derive(Clone, Debug)]
pub struct RankClassifier {
    pub lm: Generative,
    /// Class `c`'s answer tokens (label string + EOS).
    pub answers: Vec<Vec<u32>>,
    /// Padding id of the prompt batches.
    pub pad: u32,
}

impl RankClassifier {
    pub fn new(lm: Generative, answers: Vec<Vec<u32>>, pad: u32) -> Result<Self> {
        if answers.len() < 2 {
            bail!("rank classification needs at least two label strings, got {}", answers.len());
        }
        let v = lm.vocab();
        for (c, a) in answers.iter().enumerate() {
            if a.is_empty() {
                bail!("label {c} has no answer tokens");
            }
            if let Some(id) = a.iter().find(|&&id| id as usize >= v) {
                bail!("label {c}: answer token id {id} is outside the vocabulary (vocab_size {v})");
            }
        }
        for (i, a) in answers.iter().enumerate() {
            if let Some(j) = answers[..i].iter().position(|b| b == a) {
                bail!("labels {j} and {i} tokenise to the same answer, so rank classification cannot tell them apart");
            }
        }
        if pad as usize >= v {
            bail!("pad id {pad} is outside the vocabulary (vocab_size {v})");
        }
        Ok(RankClassifier { lm, answers, pad })
    }

    pub fn classes(&self) -> usize {
        self.answers.len()
    }

    /// Forward pass of `prompts` with the gold answers `labels`; returns the mean answer-token cross-entropy
    /// and, when `backward`, accumulates gradients into the trainable parameters.
    pub fn loss(&mut self, prompts: &[&[u32]], labels: &[usize], backward: bool) -> Result<f32> {
        if prompts.is_empty() || prompts.len() != labels.len() {
            bail!("rank classifier: {} prompts for {} labels", prompts.len(), labels.len());
        }
        if let Some(&y) = labels.iter().find(|&&y| y >= self.answers.len()) {
            bail!("rank classifier: label {y} but only {} answers", self.answers.len());
        }
        let pad = self.pad;
        match &mut self.lm {
            Generative::T5(m) => {
                let (b, src_len, input_ids, attention_mask) = pad_prompts(prompts, pad)?;
                let tgt_len = labels.iter().map(|&y| self.answers[y].len()).max().unwrap_or(1);
                let mut lab = vec![IGNORE; b * tgt_len];
                for (i, &y) in labels.iter().enumerate() {
                    for (t, &tok) in self.answers[y].iter().enumerate() {
                        lab[i * tgt_len + t] = tok as i64;
                    }
                }
                let start = m.cfg.start_token() as u32;
                let decoder_input_ids = shift_right(&lab, b, tgt_len, start, pad);
                let batch = Seq2SeqBatch {
                    batch: b,
                    src_len,
                    tgt_len,
                    input_ids,
                    attention_mask,
                    decoder_input_ids,
                    decoder_attention_mask: None,
                };
                let v = m.vocab();
                let logits = m.forward(&batch)?;
                let mut dl = vec![0.0f32; logits.len()];
                let loss = seq_cross_entropy(logits, &lab, v, &mut dl)?;
                if backward && loss.is_finite() {
                    m.backward(&dl, false)?;
                }
                Ok(loss)
            }
            Generative::Llama(m) => {
                let ex: Vec<(Vec<u32>, Vec<u32>)> =
                    prompts.iter().zip(labels).map(|(p, &y)| (p.to_vec(), self.answers[y].clone())).collect();
                let (batch, lab) = LmBatch::with_answers(&ex)?;
                // The LM head runs only where an answer token is predicted.
                let (loss, dl) = m.scored_loss(&batch, &lab)?;
                if backward && loss.is_finite() {
                    m.backward(&dl)?;
                }
                Ok(loss)
            }
        }
    }

    /// Class scores `[prompts, classes]`, row-major: each answer's summed log-probability (module docs).
    pub fn scores(&mut self, prompts: &[&[u32]]) -> Result<Vec<f32>> {
        let c = self.answers.len();
        let pad = self.pad;
        let out: Vec<f64> = match &mut self.lm {
            Generative::T5(m) => {
                let (b, src_len, ids, mask) = pad_prompts(prompts, pad)?;
                m.label_log_probs(&ids, &mask, b, src_len, &self.answers)?
            }
            Generative::Llama(m) => {
                let v = m.vocab();
                let longest = prompts.iter().map(|p| p.len()).max().unwrap_or(0)
                    + self.answers.iter().map(|a| a.len()).max().unwrap_or(0);
                // Examples per pass: as many as a full-vocabulary logit for each of their (prompt, answer)
                // positions would fit in SCORE_LOGITS. The LM head runs only at answer positions now, but this
                // also bounds the layers' activations, which grow with the positions.
                let per = (SCORE_LOGITS / (c * longest * v).max(1)).max(1);
                let mut out = Vec::with_capacity(prompts.len() * c);
                for chunk in prompts.chunks(per) {
                    let ex: Vec<(Vec<u32>, Vec<u32>)> =
                        chunk.iter().flat_map(|p| self.answers.iter().map(|a| (p.to_vec(), a.clone()))).collect();
                    let (batch, lab) = LmBatch::with_answers(&ex)?;
                    out.extend(m.answer_log_probs(&batch, &lab)?);
                }
                out
            }
        };
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            bail!(
                "rank classification: the score of label {} for example {} is {} (the model's output overflowed)",
                i % c,
                i / c,
                out[i]
            );
        }
        Ok(out.into_iter().map(|x| x as f32).collect())
    }
}

/// Right-padded prompt batch: `(batch, len, ids, mask)`.
fn pad_prompts(prompts: &[&[u32]], pad: u32) -> Result<(usize, usize, Vec<u32>, Vec<f32>)> {
    if prompts.is_empty() {
        bail!("no prompts");
    }
    if prompts.iter().any(|p| p.is_empty()) {
        bail!("a prompt has no tokens");
    }
    let len = prompts.iter().map(|p| p.len()).max().unwrap_or(1);
    let b = prompts.len();
    let mut ids = vec![pad; b * len];
    let mut mask = vec![0.0f32; b * len];
    for (i, p) in prompts.iter().enumerate() {
        ids[i * len..i * len + p.len()].copy_from_slice(p);
        mask[i * len..i * len + p.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    Ok((b, len, ids, mask))
}

//! A Hugging Face model directory: encoder weights, config and tokenizer together.

use super::bert::Bert;
use super::tokenize::TextEncoder;
use crate::engine::kernels::{l2_normalize_rows, pool_forward, Pooling};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// Default truncation length (tokens, special tokens included).
pub const DEFAULT_MAX_LEN: usize = 128;

/// An encoder with its tokenizer, loaded from a Hugging Face directory.
pub struct HfEncoder {
    pub dir: PathBuf,
    pub bert: Bert,
    pub tok: TextEncoder,
}

impl HfEncoder {
    pub fn load(dir: &Path, max_len: usize) -> Result<Self> {
        let bert = Bert::load(dir)?;
        let max_len = max_len.min(bert.cfg.max_position_embeddings);
        let tok = TextEncoder::load(dir, max_len, bert.cfg.pad_token_id as u32)?;
        Ok(HfEncoder { dir: dir.to_path_buf(), bert, tok })
    }

    /// Sentence embeddings of `texts`, in input order. Texts are sorted by length into batches of
    /// `batch_size` to keep padding small.
    pub fn embed(
        &mut self,
        texts: &[String],
        pooling: Pooling,
        normalize: bool,
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        embed_texts(&mut self.bert, &self.tok, texts, pooling, normalize, batch_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.dir.display()))
    }
}

/// Sentence embeddings of `texts` with `bert` and `tok`, in input order (see [`HfEncoder::embed`]).
pub fn embed_texts(
    bert: &mut Bert,
    tok: &TextEncoder,
    texts: &[String],
    pooling: Pooling,
    normalize: bool,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let d = bert.hidden();
    let enc: Vec<(Vec<u32>, Vec<u32>)> = texts.iter().map(|t| tok.encode(t, None)).collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| enc[i].0.len());
    let mut out = vec![Vec::new(); texts.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let seqs: Vec<_> = chunk.iter().map(|&i| enc[i].clone()).collect();
        let batch = tok.pad(&seqs);
        let h = bert.forward(&batch)?;
        if h.iter().any(|v| !v.is_finite()) {
            let at = bert.non_finite_stage().map(|s| format!(", first in the {s}")).unwrap_or_default();
            bail!("the model's output holds NaN/Inf{at}; do the weights overflow f32?");
        }
        let mut pooled = vec![0.0; batch.batch * d];
        pool_forward(pooling, h, &batch.mask, batch.batch, batch.seq, d, &mut pooled);
        if normalize {
            l2_normalize_rows(&mut pooled, d);
        }
        for (k, &i) in chunk.iter().enumerate() {
            out[i] = pooled[k * d..(k + 1) * d].to_vec();
        }
    }
    Ok(out)
}

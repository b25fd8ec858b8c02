//! Tokenisation through the `tokenizers` crate, with dynamic padding per batch.
//!
//! Hugging Face `tokenizer.json` files often carry fixed padding and truncation (all-MiniLM-L6-v2 pads and
//! truncates to 128). loracomp turns padding off, sets its own truncation length, and pads each batch to its
//! longest sequence; the attention mask is always applied.

use super::bert::Batch;
use anyhow::{anyhow, bail, Result};
use std::path::Path;
use tokenizers::{EncodeInput, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

/// A tokenizer loaded from `tokenizer.json`.
pub struct TextEncoder {
    tok: Tokenizer,
    pub max_len: usize,
    pub pad_id: u32,
}

impl TextEncoder {
    /// Load `dir/tokenizer.json`, truncating to `max_len` tokens (special tokens included).
    pub fn load(dir: &Path, max_len: usize, pad_id: u32) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!("{}: missing (loracomp needs the fast tokenizer file)", path.display());
        }
        crate::util::ensure_regular(&path)?;
        let mut tok = Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: invalid tokenizer: {e}", path.display()))?;
        tok.with_padding(None);
        // The tokenizer's truncation panics (a subtraction overflows) when max_len cannot hold the special tokens.
        let added = tok.get_post_processor().map(|p| tokenizers::PostProcessor::added_tokens(p, true)).unwrap_or(0);
        if max_len <= added {
            bail!(
                "max_len {max_len} (--max-len) leaves no room for text: {} adds {added} special tokens to a text pair",
                path.display()
            );
        }
        tok.with_truncation(Some(TruncationParams {
            max_length: max_len,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| anyhow!("{}: cannot set truncation: {e}", path.display()))?;
        Ok(TextEncoder { tok, max_len, pad_id })
    }

    /// Token ids and token-type ids of one text (or text pair).
    pub fn encode(&self, text: &str, pair: Option<&str>) -> Result<(Vec<u32>, Vec<u32>)> {
        let input: EncodeInput = match pair {
            Some(p) => (text, p).into(),
            None => text.into(),
        };
        let enc = self.tok.encode(input, true).map_err(|e| anyhow!("tokenizer failed on {text:?}: {e}"))?;
        Ok((enc.get_ids().to_vec(), enc.get_type_ids().to_vec()))
    }

    /// Token ids of `text` without special tokens (a generative model's answer).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.tok.encode(text, false).map_err(|e| anyhow!("tokenizer failed on {text:?}: {e}"))?;
        if enc.get_ids().is_empty() {
            bail!("the tokenizer gives no tokens for {text:?}");
        }
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Pad already-encoded sequences to the longest one.
    pub fn pad(&self, seqs: &[(Vec<u32>, Vec<u32>)]) -> Batch {
        pad_batch(seqs, self.pad_id)
    }
}

/// Pad `(ids, types)` sequences to the longest, mask 1 on tokens and 0 on padding.
pub fn pad_batch(seqs: &[(Vec<u32>, Vec<u32>)], pad_id: u32) -> Batch {
    let seq = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0).max(1);
    let batch = seqs.len();
    let mut b =
        Batch { batch, seq, ids: vec![pad_id; batch * seq], types: vec![0; batch * seq], mask: vec![0.0; batch * seq] };
    for (i, (ids, types)) in seqs.iter().enumerate() {
        b.ids[i * seq..i * seq + ids.len()].copy_from_slice(ids);
        b.types[i * seq..i * seq + types.len()].copy_from_slice(types);
        b.mask[i * seq..i * seq + ids.len()].iter_mut().for_each(|m| *m = 1.0);
    }
    b
}

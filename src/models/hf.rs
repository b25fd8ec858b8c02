//! A Hugging Face model directory: the one loader ([`HfDir`]: `config.json` with its `model_type`, the weights
//! file, the tokenizer), and a BERT encoder with its tokenizer ([`HfEncoder`]).

use super::bert::Bert;
use super::kind::{read_json, ModelKind, SpecialTokens};
use super::tokenize::TextEncoder;
use crate::engine::kernels::{l2_normalize_rows, pool_forward, Pooling};
use crate::engine::weights::TensorFile;
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Weights file of a model directory.
pub const WEIGHTS: &str = "model.safetensors";

/// A Hugging Face model directory, opened once: `config.json` read and its `model_type` parsed; the weights
/// ([`WEIGHTS`]) and `tokenizer.json` found beside it. Every architecture loads through [`HfDir::load`] and maps
/// only its own config fields and weight names ([`HfModel`]).
pub struct HfDir {
    pub dir: PathBuf,
    pub kind: ModelKind,
    config: Value,
}

/// What an architecture adds to [`HfDir`]: its config fields and the mapping of its weights.
pub trait HfModel: Sized {
    type Config;
    /// The architecture's fields of `config.json`, validated (errors name the key; [`HfDir`] adds the file).
    fn config(v: &Value) -> Result<Self::Config>;
    /// Build from the config, taking its tensors out of `tf` (checked for shape).
    fn from_tensors(cfg: Self::Config, tf: &mut TensorFile) -> Result<Self>;
    /// Whether a tensor name belongs to the part of the network the architecture runs: any such tensor left after
    /// [`HfModel::from_tensors`] means the config does not describe the weights, and is an error.
    fn owns(key: &str) -> bool;
}

impl HfDir {
    /// Open `dir`: it must be a directory with a readable `config.json` whose `model_type` is supported.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: model directory not found", dir.display());
        }
        let path = dir.join("config.json");
        let config = read_json(&path)?;
        let kind = ModelKind::of_config(&config, &path)?;
        Ok(HfDir { dir: dir.to_path_buf(), kind, config })
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// `config.json` parsed by `parse`; errors name the file.
    pub fn config<T>(&self, parse: impl FnOnce(&Value) -> Result<T>) -> Result<T> {
        parse(&self.config).map_err(|e| anyhow!("{}: {e}", self.config_path().display()))
    }

    /// All tensors of the weights file.
    pub fn weights(&self) -> Result<TensorFile> {
        let path = self.dir.join(WEIGHTS);
        if !path.exists() {
            bail!("{}: missing (loracomp reads weights from {WEIGHTS})", path.display());
        }
        TensorFile::open(&path)
    }

    /// The model of architecture `M`: its config, its weights, and no weight of its network left unused.
    pub fn load<M: HfModel>(&self) -> Result<M> {
        let cfg = self.config(M::config)?;
        let mut tf = self.weights()?;
        let model = M::from_tensors(cfg, &mut tf)?;
        tf.refuse_unused(&self.config_path(), M::owns)?;
        Ok(model)
    }

    /// `tokenizer.json`, truncating to `max_len` tokens and padding with `pad_id`.
    pub fn tokenizer(&self, max_len: usize, pad_id: u32) -> Result<TextEncoder> {
        TextEncoder::load(&self.dir, max_len, pad_id)
    }

    /// Special-token ids as transformers resolves them (see [`SpecialTokens`]); `lookup` is the tokenizer's
    /// vocabulary.
    pub fn special_tokens(&self, lookup: &dyn Fn(&str) -> Option<u32>) -> Result<SpecialTokens> {
        SpecialTokens::read(&self.dir, &self.config, lookup)
    }

    /// Files whose bytes define the model (hashed by sweeps to decide whether a bank can be reused): config,
    /// weights, and tokenizer or preprocessor config (tokenizer when `config.json` cannot be read).
    pub fn files(dir: &Path) -> Vec<PathBuf> {
        let front = match ModelKind::of(dir) {
            Ok(k) if k.is_image() => "preprocessor_config.json",
            _ => "tokenizer.json",
        };
        vec![dir.join("config.json"), dir.join(WEIGHTS), dir.join(front)]
    }
}

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
        Self::from_dir(&HfDir::open(dir)?, max_len)
    }

    /// From an opened directory (a `bert` one, or an old sentence-transformers folder without `model_type`).
    pub fn from_dir(hf: &HfDir, max_len: usize) -> Result<Self> {
        let bert: Bert = hf.load()?;
        let max_len = max_len.min(bert.cfg.max_position_embeddings);
        let tok = hf.tokenizer(max_len, bert.cfg.pad_token_id as u32)?;
        Ok(HfEncoder { dir: hf.dir.clone(), bert, tok })
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

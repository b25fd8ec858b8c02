//! T5 / Flan-T5 encoder–decoder (`T5ForConditionalGeneration`) with explicit forward and backward passes.
//!
//! Loaded from an unmodified Hugging Face directory (`config.json` with `model_type` "t5", `model.safetensors`).
//! Pre-norm blocks with T5's RMS-style layer norm; attention without `1/√d` scaling plus a relative position
//! bias computed by each stack's block 0 and shared by its other blocks; ReLU or gated-GELU feed-forward.
//! The head is `lm_head.weight` when the checkpoint has one (Flan-T5), else the shared embedding (original
//! T5); the decoder output is scaled by `d_model^-0.5` before it when the config ties the embeddings (or says
//! `scale_decoder_outputs`), as transformers does.
//!
//! Every linear layer is a [`BankLinear`] at its PEFT module path (`encoder.block.0.layer.0.SelfAttention.q`,
//! `decoder.block.1.layer.1.EncDecAttention.v`, `decoder.block.0.layer.2.DenseReluDense.wo`, `lm_head`), so
//! LoraHub's adapters (keyed `base_model.model.<path>.lora_A.weight`) attach directly. Every other weight is
//! frozen: the backward pass gives gradients of the bank compositions and fresh LoRAs, and of the input
//! embeddings when asked, never of frozen weights.
//!
//! Training is teacher-forced sequence cross-entropy ([`seq_cross_entropy`], labels −100 ignored);
//! classification is rank classification ([`T5::label_log_probs`], [`T5::rank_classify`]): each label string
//! is scored by its summed log-probability under teacher forcing and the best one wins.

use super::hf::{HfDir, HfModel};
use crate::engine::attention::{attention_backward, attention_forward, AttnSpec};
use crate::engine::kernels::{gelu_backward_inplace, gelu_forward, rmsnorm_backward, rmsnorm_forward, Gelu};
use crate::engine::param::Param;
use crate::engine::t5_ops::{position_bias, relu_backward_inplace, relu_forward};
use crate::engine::weights::TensorFile;
use crate::lora::bank::BankLinear;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The fields of a T5 `config.json` that loracomp uses. Unknown fields are ignored, as transformers does.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub scale_decoder_outputs: Option<bool>,
    #[serde(default)]
    pub decoder_start_token_id: Option<usize>,
    #[serde(default)]
    pub pad_token_id: Option<usize>,
    #[serde(default)]
    pub model_type: Option<String>,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    Relu,
    Gelu(Gelu),
}

impl T5Config {
    /// The fields of a parsed `config.json`, validated. Errors name the offending key.
    pub fn from_json(v: &Value) -> Result<Self> {
        let cfg = T5Config::deserialize(v).map_err(|e| anyhow!("invalid T5 config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "t5" {
                bail!("key 'model_type': '{t}' is not a T5 model");
            }
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_decoder_layers", self.decoder_layers()),
            ("num_heads", self.num_heads),
            ("relative_attention_num_buckets", self.relative_attention_num_buckets),
            ("relative_attention_max_distance", self.relative_attention_max_distance),
        ] {
            if v == 0 {
                bail!("key '{k}' must be positive");
            }
        }
        if self.relative_attention_num_buckets < 4 {
            bail!("key 'relative_attention_num_buckets' must be at least 4");
        }
        if !(self.layer_norm_epsilon > 0.0 && self.layer_norm_epsilon.is_finite()) {
            bail!("key 'layer_norm_epsilon' must be a positive number");
        }
        if let Some(s) = self.decoder_start_token_id.or(self.pad_token_id) {
            if s >= self.vocab_size {
                bail!("key 'decoder_start_token_id': {s} is outside the vocabulary (vocab_size {})", self.vocab_size);
            }
        }
        self.act()?;
        Ok(())
    }

    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// (gated, activation) from `feed_forward_proj` (`"relu"`, `"gated-gelu"`, …), as transformers reads it:
    /// `"gated-gelu"` means the tanh GELU (`gelu_new`), a plain `"gelu"` the exact one.
    pub fn act(&self) -> Result<(bool, Act)> {
        let f = self.feed_forward_proj.as_str();
        let (gated, name) = match f.split_once('-') {
            Some(("gated", a)) => (true, a),
            Some(_) => bail!("key 'feed_forward_proj': '{f}' is not 'ACT' or 'gated-ACT'"),
            None => (false, f),
        };
        let act = match (gated, name) {
            (_, "relu") => Act::Relu,
            (true, "gelu") => Act::Gelu(Gelu::Tanh),
            (false, "gelu") => Act::Gelu(Gelu::Erf),
            (_, "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => Act::Gelu(Gelu::Tanh),
            _ => bail!(
                "key 'feed_forward_proj': activation '{name}' is not supported (relu, gelu, gelu_new, gated-gelu, gated-relu)"
            ),
        };
        Ok((gated, act))
    }

    /// Whether the decoder output is scaled by `d_model^-0.5` before the head.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs.unwrap_or(self.tie_word_embeddings.unwrap_or(true))
    }

    /// The first decoder input (transformers: `decoder_start_token_id`, which is the pad id in T5).
    pub fn start_token(&self) -> usize {
        self.decoder_start_token_id.or(self.pad_token_id).unwrap_or(0)
    }

    pub fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// Q, K, V, O projections of one attention.
#[derive(Clone, Debug)]
pub struct T5Attn {
    pub q: BankLinear,
    pub k: BankLinear,
    pub v: BankLinear,
    pub o: BankLinear,
}

/// The feed-forward: `wo(act(wi(x)))`, or gated `wo(act(wi_0(x)) ⊙ wi_1(x))`.
#[derive(Clone, Debug)]
pub struct T5Ff {
    /// `wi`, or `wi_0` when gated.
    pub wi: BankLinear,
    /// `wi_1` when gated.
    pub wi_1: Option<BankLinear>,
    pub wo: BankLinear,
}

/// One block: self-attention, cross-attention (decoder only), feed-forward, each with its layer norm.
#[derive(Clone, Debug)]
pub struct T5Block {
    pub ln_self: Param,
    pub self_attn: T5Attn,
    pub cross: Option<(Param, T5Attn)>,
    pub ln_ff: Param,
    pub ff: T5Ff,
}

/// An encoder–decoder batch: `[batch, src_len]` encoder ids and mask, `[batch, tgt_len]` decoder ids and an
/// optional decoder mask (the decoder is always causal).
#[derive(Clone, Debug, Default)]
pub struct Seq2SeqBatch {
    pub batch: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub input_ids: Vec<u32>,
    pub attention_mask: Vec<f32>,
    pub decoder_input_ids: Vec<u32>,
    pub decoder_attention_mask: Option<Vec<f32>>,
}

#[derive(Clone, Debug, Default)]
struct AttnCache {
    xn: Vec<f32>,
    rstd: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
}

#[derive(Clone, Debug, Default)]
struct FfCache {
    xn: Vec<f32>,
    rstd: Vec<f32>,
    h0: Vec<f32>,
    h1: Vec<f32>,
    a: Vec<f32>,
    g: Vec<f32>,
}

/// One stack's activations: `hs[s]` is the input of sub-layer `s` (`hs[last]` the stack's output before its
/// final norm), with the sub-layers' caches.
#[derive(Clone, Debug, Default)]
struct StackCache {
    hs: Vec<Vec<f32>>,
    attn: Vec<AttnCache>,
    ff: Vec<FfCache>,
    bias: Vec<f32>,
    out: Vec<f32>,
    out_rstd: Vec<f32>,
}

/// Backward scratch. `dh` carries the gradient of the current sub-layer's output on entry to its backward and
/// of its input on exit.
#[derive(Clone, Debug, Default)]
struct Grads {
    dh: Vec<f32>,
    dx: Vec<f32>,
    dxn: Vec<f32>,
    dctx: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dg: Vec<f32>,
    dh1: Vec<f32>,
}

#[derive(Clone, Debug, Default)]
struct Workspace {
    batch: Seq2SeqBatch,
    dec_mask: Vec<f32>,
    enc: StackCache,
    dec: StackCache,
    logits: Vec<f32>,
    d_enc_emb: Vec<f32>,
    d_dec_emb: Vec<f32>,
    d_enc_out: Vec<f32>,
    g: Grads,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut Vec<f32> {
    v.resize(n, 0.0);
    v
}

/// `T5ForConditionalGeneration`.
#[derive(Clone, Debug)]
pub struct T5 {
    pub cfg: T5Config,
    pub gated: bool,
    pub act: Act,
    pub shared: Param,
    /// Relative position bias tables `[num_buckets, heads]` of the encoder's and the decoder's block 0.
    pub enc_rel_bias: Param,
    pub dec_rel_bias: Param,
    pub encoder: Vec<T5Block>,
    pub enc_final_ln: Param,
    pub decoder: Vec<T5Block>,
    pub dec_final_ln: Param,
    pub lm_head: BankLinear,
    ws: Workspace,
}

const ATTN_NAMES: [&str; 4] = ["q", "k", "v", "o"];

impl T5 {
    /// Load `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        HfDir::open(dir)?.load()
    }

    /// Build from a config and a tensor file with `T5ForConditionalGeneration`'s keys.
    pub fn from_tensors(cfg: T5Config, tf: &mut TensorFile) -> Result<Self> {
        cfg.validate()?;
        let (gated, act) = cfg.act()?;
        let (d, inner, ff, h, nb) =
            (cfg.d_model, cfg.inner(), cfg.d_ff, cfg.num_heads, cfg.relative_attention_num_buckets);
        let mut p =
            |key: &str, shape: &[usize]| -> Result<Param> { Ok(Param::new(shape.to_vec(), tf.take(key, shape)?)) };
        let shared = p("shared.weight", &[cfg.vocab_size, d])?;
        let mut stacks = Vec::new();
        for (stack, n) in [("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers())] {
            let rel = p(&format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"), &[nb, h])?;
            let mut blocks = Vec::new();
            for l in 0..n {
                let pre = format!("{stack}.block.{l}");
                let mut lin = |name: &str, o: usize, i: usize| -> Result<BankLinear> {
                    Ok(BankLinear::new(p(&format!("{pre}.{name}.weight"), &[o, i])?, None))
                };
                let mut attn = |which: &str| -> Result<T5Attn> {
                    Ok(T5Attn {
                        q: lin(&format!("{which}.q"), inner, d)?,
                        k: lin(&format!("{which}.k"), inner, d)?,
                        v: lin(&format!("{which}.v"), inner, d)?,
                        o: lin(&format!("{which}.o"), d, inner)?,
                    })
                };
                let self_attn = attn("layer.0.SelfAttention")?;
                let cross = if stack == "decoder" { Some(attn("layer.1.EncDecAttention")?) } else { None };
                let fl = if stack == "decoder" { 2 } else { 1 };
                let ff = if gated {
                    T5Ff {
                        wi: lin(&format!("layer.{fl}.DenseReluDense.wi_0"), ff, d)?,
                        wi_1: Some(lin(&format!("layer.{fl}.DenseReluDense.wi_1"), ff, d)?),
                        wo: lin(&format!("layer.{fl}.DenseReluDense.wo"), d, ff)?,
                    }
                } else {
                    T5Ff {
                        wi: lin(&format!("layer.{fl}.DenseReluDense.wi"), ff, d)?,
                        wi_1: None,
                        wo: lin(&format!("layer.{fl}.DenseReluDense.wo"), d, ff)?,
                    }
                };
                let ln_self = p(&format!("{pre}.layer.0.layer_norm.weight"), &[d])?;
                let cross = match cross {
                    Some(c) => Some((p(&format!("{pre}.layer.1.layer_norm.weight"), &[d])?, c)),
                    None => None,
                };
                let ln_ff = p(&format!("{pre}.layer.{fl}.layer_norm.weight"), &[d])?;
                blocks.push(T5Block { ln_self, self_attn, cross, ln_ff, ff });
            }
            let fin = p(&format!("{stack}.final_layer_norm.weight"), &[d])?;
            stacks.push((rel, blocks, fin));
        }
        let head = if tf.contains("lm_head.weight") {
            Param::new(vec![cfg.vocab_size, d], tf.take("lm_head.weight", &[cfg.vocab_size, d])?)
        } else {
            shared.clone()
        };
        let (dec_rel_bias, decoder, dec_final_ln) = stacks.pop().unwrap();
        let (enc_rel_bias, encoder, enc_final_ln) = stacks.pop().unwrap();
        Ok(T5 {
            cfg,
            gated,
            act,
            shared,
            enc_rel_bias,
            dec_rel_bias,
            encoder,
            enc_final_ln,
            decoder,
            dec_final_ln,
            lm_head: BankLinear::new(head, None),
            ws: Workspace::default(),
        })
    }

    /// A random model with `T5ForConditionalGeneration`'s keys (normal weights scaled by `1/√fan_in`, unit
    /// norms, normal position-bias tables, untied head when the config says so), from a seeded generator.
    /// For tests and timings at real shapes without a checkpoint.
    pub fn random(cfg: T5Config, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        let (gated, _) = cfg.act()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, inner, ff) = (cfg.d_model, cfg.inner(), cfg.d_ff);
        let mut names: Vec<(String, Vec<usize>)> = vec![("shared.weight".into(), vec![cfg.vocab_size, d])];
        if cfg.tie_word_embeddings == Some(false) {
            names.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
        }
        for (stack, n) in [("encoder", cfg.num_layers), ("decoder", cfg.decoder_layers())] {
            names.push((
                format!("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
                vec![cfg.relative_attention_num_buckets, cfg.num_heads],
            ));
            names.push((format!("{stack}.final_layer_norm.weight"), vec![d]));
            for l in 0..n {
                let pre = format!("{stack}.block.{l}");
                let mut attn = vec!["layer.0.SelfAttention"];
                if stack == "decoder" {
                    attn.push("layer.1.EncDecAttention");
                }
                for (i, a) in attn.iter().enumerate() {
                    for x in ["q", "k", "v"] {
                        names.push((format!("{pre}.{a}.{x}.weight"), vec![inner, d]));
                    }
                    names.push((format!("{pre}.{a}.o.weight"), vec![d, inner]));
                    names.push((format!("{pre}.layer.{i}.layer_norm.weight"), vec![d]));
                }
                let fl = attn.len();
                let wis: &[&str] = if gated { &["wi_0", "wi_1"] } else { &["wi"] };
                for w in wis {
                    names.push((format!("{pre}.layer.{fl}.DenseReluDense.{w}.weight"), vec![ff, d]));
                }
                names.push((format!("{pre}.layer.{fl}.DenseReluDense.wo.weight"), vec![d, ff]));
                names.push((format!("{pre}.layer.{fl}.layer_norm.weight"), vec![d]));
            }
        }
        let mut tensors = std::collections::BTreeMap::new();
        for (n, shape) in names {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = if n.ends_with("layer_norm.weight") {
                vec![1.0; len]
            } else {
                let std = if n.contains("relative_attention_bias") { 1.0 } else { (shape[1] as f32).powf(-0.5) };
                (0..len).map(|_| crate::util::normal(&mut rng) * std).collect()
            };
            tensors.insert(n, (shape, data));
        }
        let mut tf = TensorFile { path: "<random>".into(), tensors, unusable: Default::default() };
        Self::from_tensors(cfg, &mut tf)
    }

    pub fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Every linear layer with its canonical (PEFT) module path, in a fixed order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut BankLinear)> {
        let mut out = Vec::new();
        for (stack, blocks) in [("encoder", &mut self.encoder), ("decoder", &mut self.decoder)] {
            for (l, b) in blocks.iter_mut().enumerate() {
                let pre = format!("{stack}.block.{l}");
                let fl = if b.cross.is_some() { 2 } else { 1 };
                let T5Attn { q, k, v, o } = &mut b.self_attn;
                for (n, lin) in ATTN_NAMES.iter().zip([q, k, v, o]) {
                    out.push((format!("{pre}.layer.0.SelfAttention.{n}"), lin));
                }
                if let Some((_, T5Attn { q, k, v, o })) = b.cross.as_mut() {
                    for (n, lin) in ATTN_NAMES.iter().zip([q, k, v, o]) {
                        out.push((format!("{pre}.layer.1.EncDecAttention.{n}"), lin));
                    }
                }
                let ff = &mut b.ff;
                match ff.wi_1.as_mut() {
                    Some(w1) => {
                        out.push((format!("{pre}.layer.{fl}.DenseReluDense.wi_0"), &mut ff.wi));
                        out.push((format!("{pre}.layer.{fl}.DenseReluDense.wi_1"), w1));
                    }
                    None => out.push((format!("{pre}.layer.{fl}.DenseReluDense.wi"), &mut ff.wi)),
                }
                out.push((format!("{pre}.layer.{fl}.DenseReluDense.wo"), &mut ff.wo));
            }
        }
        out.push(("lm_head".to_string(), &mut self.lm_head));
        out
    }

    /// Every trainable parameter (bank compositions, fresh LoRAs) with a stable name.
    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out = Vec::new();
        for (path, lin) in self.linears_mut() {
            for (suffix, p) in lin.trainable_params_mut() {
                out.push((format!("{path}.{suffix}"), p));
            }
        }
        out
    }

    /// Drop every layer's cached merged weight (after parameters were changed from outside).
    pub fn invalidate(&mut self) {
        for (_, l) in self.linears_mut() {
            l.invalidate();
        }
    }

    /// Check a batch's shapes and ids.
    pub fn check_batch(&self, b: &Seq2SeqBatch) -> Result<()> {
        let (ns, nt) = (b.batch * b.src_len, b.batch * b.tgt_len);
        if b.input_ids.len() != ns || b.attention_mask.len() != ns {
            bail!("encoder arrays do not match [batch {}, src_len {}]", b.batch, b.src_len);
        }
        if b.decoder_input_ids.len() != nt || b.decoder_attention_mask.as_ref().is_some_and(|m| m.len() != nt) {
            bail!("decoder arrays do not match [batch {}, tgt_len {}]", b.batch, b.tgt_len);
        }
        if b.batch == 0 || b.src_len == 0 || b.tgt_len == 0 {
            bail!("empty batch");
        }
        let v = self.cfg.vocab_size;
        if let Some(id) = b.input_ids.iter().chain(&b.decoder_input_ids).find(|&&id| id as usize >= v) {
            bail!("token id {id} is outside the vocabulary (vocab_size {v})");
        }
        Ok(())
    }

    /// Embedding rows of `ids` (`[n, d_model]`).
    pub fn embed(&self, ids: &[u32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        let mut out = vec![0.0f32; ids.len() * d];
        for (row, &id) in out.chunks_mut(d).zip(ids) {
            row.copy_from_slice(&self.shared.data[id as usize * d..(id as usize + 1) * d]);
        }
        out
    }

    /// Forward pass with teacher forcing; returns the logits `[batch·tgt_len, vocab]`.
    pub fn forward(&mut self, b: &Seq2SeqBatch) -> Result<&[f32]> {
        self.check_batch(b)?;
        let enc = self.embed(&b.input_ids);
        let dec = self.embed(&b.decoder_input_ids);
        self.forward_embeds(b, &enc, &dec)
    }

    /// Forward pass from given encoder and decoder input embeddings (`[batch·src_len, d]`, `[batch·tgt_len, d]`);
    /// the ids in `b` are not read.
    pub fn forward_embeds(&mut self, b: &Seq2SeqBatch, enc_emb: &[f32], dec_emb: &[f32]) -> Result<&[f32]> {
        let d = self.cfg.d_model;
        if enc_emb.len() != b.batch * b.src_len * d || dec_emb.len() != b.batch * b.tgt_len * d {
            bail!("input embeddings do not match the batch shape");
        }
        let cfg = &self.cfg;
        let eps = cfg.layer_norm_epsilon as f32;
        let (nb, md, heads) = (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads);
        let ws = &mut self.ws;
        ws.batch = b.clone();
        ws.dec_mask = b.decoder_attention_mask.clone().unwrap_or_else(|| vec![1.0; b.batch * b.tgt_len]);
        let (act, ff_dim) = (self.act, cfg.d_ff);
        // Encoder.
        let sh = t5_attn(b.batch, b.src_len, b.src_len, heads, cfg.d_kv, false);
        ws.enc.bias = position_bias(&self.enc_rel_bias.data, heads, b.src_len, b.src_len, true, nb, md);
        prepare(&mut ws.enc, enc_emb, 2 * self.encoder.len());
        for (l, blk) in self.encoder.iter_mut().enumerate() {
            let c = &mut ws.enc;
            let (s0, s1) = (2 * l, 2 * l + 1);
            attn_forward(&mut blk.self_attn, &blk.ln_self, eps, c, s0, None, sh, &b.attention_mask, true);
            ff_forward(&mut blk.ff, &blk.ln_ff, eps, act, ff_dim, c, s1);
        }
        finish(&mut ws.enc, &self.enc_final_ln, eps, d, 1.0);
        // Decoder.
        let tq = b.batch * b.tgt_len;
        let sh_self = t5_attn(b.batch, b.tgt_len, b.tgt_len, heads, cfg.d_kv, true);
        let sh_cross = t5_attn(b.batch, b.tgt_len, b.src_len, heads, cfg.d_kv, false);
        ws.dec.bias = position_bias(&self.dec_rel_bias.data, heads, b.tgt_len, b.tgt_len, false, nb, md);
        prepare(&mut ws.dec, dec_emb, 3 * self.decoder.len());
        let enc_out = std::mem::take(&mut ws.enc.out);
        for (l, blk) in self.decoder.iter_mut().enumerate() {
            let c = &mut ws.dec;
            let s = 3 * l;
            attn_forward(&mut blk.self_attn, &blk.ln_self, eps, c, s, None, sh_self, &ws.dec_mask, true);
            let (ln, cross) = blk.cross.as_mut().expect("decoder blocks have cross-attention");
            attn_forward(cross, ln, eps, c, s + 1, Some(&enc_out), sh_cross, &b.attention_mask, false);
            ff_forward(&mut blk.ff, &blk.ln_ff, eps, act, ff_dim, c, s + 2);
        }
        ws.enc.out = enc_out;
        let scale = if cfg.scales_decoder_output() { (d as f32).powf(-0.5) } else { 1.0 };
        finish(&mut ws.dec, &self.dec_final_ln, eps, d, scale);
        let v = cfg.vocab_size;
        self.lm_head.forward(&ws.dec.out, tq, sized(&mut ws.logits, tq * v));
        Ok(&self.ws.logits)
    }

    /// Logits of the most recent forward pass.
    pub fn logits(&self) -> &[f32] {
        &self.ws.logits
    }

    fn encoder_trainable(&mut self) -> bool {
        self.linears_mut().into_iter().any(|(p, l)| p.starts_with("encoder.") && !l.trainable_params_mut().is_empty())
    }

    /// Backward pass from `dlogits` (`[batch·tgt_len, vocab]`) of the most recent forward. Accumulates into the
    /// trainable parameters only. The encoder is back-propagated when it has trainable parameters or when
    /// `input_grads` asks for the gradients of the input embeddings ([`T5::input_grads`]).
    pub fn backward(&mut self, dlogits: &[f32], input_grads: bool) -> Result<()> {
        let b = self.ws.batch.clone();
        let (d, v) = (self.cfg.d_model, self.cfg.vocab_size);
        let (ts, tq) = (b.batch * b.src_len, b.batch * b.tgt_len);
        if dlogits.len() != tq * v {
            bail!("backward: gradient has {} values, expected {}", dlogits.len(), tq * v);
        }
        let run_encoder = input_grads || self.encoder_trainable();
        let cfg = self.cfg.clone();
        let (heads, act, ff_dim) = (cfg.num_heads, self.act, cfg.d_ff);
        let ws = &mut self.ws;
        // Head and the decoder's final norm (with the output scale).
        self.lm_head.backward(&ws.dec.out, dlogits, tq, Some(sized(&mut ws.g.dxn, tq * d)), false);
        let scale = if cfg.scales_decoder_output() { (d as f32).powf(-0.5) } else { 1.0 };
        ws.g.dxn.iter_mut().for_each(|g| *g *= scale);
        let nd = 3 * self.decoder.len();
        rmsnorm_backward(
            &ws.g.dxn,
            &ws.dec.hs[nd],
            &ws.dec.out_rstd,
            &self.dec_final_ln.data,
            d,
            sized(&mut ws.g.dh, tq * d),
            false,
            None,
        );
        sized(&mut ws.d_enc_out, ts * d).fill(0.0);
        let sh_self = t5_attn(b.batch, b.tgt_len, b.tgt_len, heads, cfg.d_kv, true);
        let sh_cross = t5_attn(b.batch, b.tgt_len, b.src_len, heads, cfg.d_kv, false);
        for (l, blk) in self.decoder.iter_mut().enumerate().rev() {
            let s = 3 * l;
            ff_backward(&mut blk.ff, &blk.ln_ff, act, ff_dim, &ws.dec, s + 2, &mut ws.g);
            let (ln, cross) = blk.cross.as_mut().expect("decoder blocks have cross-attention");
            attn_backward(cross, ln, &ws.dec, s + 1, Some((&ws.enc.out, &mut ws.d_enc_out)), sh_cross, &mut ws.g);
            attn_backward(&mut blk.self_attn, &blk.ln_self, &ws.dec, s, None, sh_self, &mut ws.g);
        }
        if input_grads {
            ws.d_dec_emb.clone_from(&ws.g.dh);
        }
        if !run_encoder {
            return Ok(());
        }
        let ne = 2 * self.encoder.len();
        rmsnorm_backward(
            &ws.d_enc_out,
            &ws.enc.hs[ne],
            &ws.enc.out_rstd,
            &self.enc_final_ln.data,
            d,
            sized(&mut ws.g.dh, ts * d),
            false,
            None,
        );
        let sh = t5_attn(b.batch, b.src_len, b.src_len, heads, cfg.d_kv, false);
        for (l, blk) in self.encoder.iter_mut().enumerate().rev() {
            ff_backward(&mut blk.ff, &blk.ln_ff, act, ff_dim, &ws.enc, 2 * l + 1, &mut ws.g);
            attn_backward(&mut blk.self_attn, &blk.ln_self, &ws.enc, 2 * l, None, sh, &mut ws.g);
        }
        if input_grads {
            ws.d_enc_emb.clone_from(&ws.g.dh);
        }
        Ok(())
    }

    /// Gradients of the encoder and decoder input embeddings from the last `backward(…, true)`.
    pub fn input_grads(&self) -> (&[f32], &[f32]) {
        (&self.ws.d_enc_emb, &self.ws.d_dec_emb)
    }

    /// Summed log-probability of each label string for each example: `[batch, labels]`, row-major. Each label
    /// is a token sequence (usually ending in EOS) scored by teacher forcing from the decoder start token.
    pub fn label_log_probs(
        &mut self,
        input_ids: &[u32],
        attention_mask: &[f32],
        batch: usize,
        src_len: usize,
        labels: &[Vec<u32>],
    ) -> Result<Vec<f64>> {
        if labels.is_empty() {
            bail!("rank classification needs at least one label string");
        }
        let v = self.cfg.vocab_size;
        let start = self.cfg.start_token() as u32;
        let mut out = vec![0.0f64; batch * labels.len()];
        for (j, lab) in labels.iter().enumerate() {
            if lab.is_empty() {
                bail!("label string {j} has no tokens");
            }
            let t = lab.len();
            let mut dec = Vec::with_capacity(batch * t);
            for _ in 0..batch {
                dec.push(start);
                dec.extend_from_slice(&lab[..t - 1]);
            }
            let b = Seq2SeqBatch {
                batch,
                src_len,
                tgt_len: t,
                input_ids: input_ids.to_vec(),
                attention_mask: attention_mask.to_vec(),
                decoder_input_ids: dec,
                decoder_attention_mask: None,
            };
            if let Some(id) = lab.iter().find(|&&id| id as usize >= v) {
                bail!("label string {j}: token id {id} is outside the vocabulary (vocab_size {v})");
            }
            let logits = self.forward(&b)?;
            for i in 0..batch {
                let mut s = 0.0f64;
                for (p, &tok) in lab.iter().enumerate() {
                    let row = &logits[(i * t + p) * v..(i * t + p + 1) * v];
                    s += log_softmax_at(row, tok as usize);
                }
                out[i * labels.len() + j] = s;
            }
        }
        Ok(out)
    }

    /// Rank classification: for each example, the index of the label string with the highest summed
    /// log-probability (the first on ties).
    pub fn rank_classify(
        &mut self,
        input_ids: &[u32],
        attention_mask: &[f32],
        batch: usize,
        src_len: usize,
        labels: &[Vec<u32>],
    ) -> Result<Vec<usize>> {
        let s = self.label_log_probs(input_ids, attention_mask, batch, src_len, labels)?;
        Ok(s.chunks(labels.len())
            .map(|r| r.iter().enumerate().fold(0, |best, (j, &x)| if x > r[best] { j } else { best }))
            .collect())
    }
}

/// `log softmax(row)[k]`, in f64.
fn log_softmax_at(row: &[f32], k: usize) -> f64 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
    row[k] as f64 - lse
}

/// Teacher-forced sequence cross-entropy as transformers computes it: the mean over the positions whose label
/// is not −100. `logits` `[rows, vocab]`, `labels` `[rows]`. Writes `dlogits` (zero at ignored positions).
pub fn seq_cross_entropy(logits: &[f32], labels: &[i64], vocab: usize, dlogits: &mut [f32]) -> Result<f32> {
    if logits.len() != labels.len() * vocab || dlogits.len() != logits.len() {
        bail!("cross-entropy: {} logits for {} labels of vocabulary {vocab}", logits.len(), labels.len());
    }
    let n = labels.iter().filter(|&&l| l != -100).count();
    if n == 0 {
        bail!("cross-entropy: every label is -100 (nothing to score)");
    }
    let mut loss = 0.0f64;
    for (i, &lab) in labels.iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        let drow = &mut dlogits[i * vocab..(i + 1) * vocab];
        if lab == -100 {
            drow.fill(0.0);
            continue;
        }
        if lab < 0 || lab as usize >= vocab {
            bail!("cross-entropy: label {lab} at position {i} is outside the vocabulary [0, {vocab})");
        }
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0f64;
        for (g, &x) in drow.iter_mut().zip(row) {
            *g = (x - mx).exp();
            s += *g as f64;
        }
        let inv = 1.0 / (s * n as f64);
        drow.iter_mut().for_each(|g| *g = (*g as f64 * inv) as f32);
        drow[lab as usize] -= 1.0 / n as f32;
        loss += s.ln() - (row[lab as usize] - mx) as f64;
    }
    Ok((loss / n as f64) as f32)
}

/// Decoder inputs for teacher forcing from labels, as transformers' `_shift_right`: the start token, then the
/// labels moved one position right, −100 replaced by the pad id.
pub fn shift_right(labels: &[i64], batch: usize, len: usize, start: u32, pad: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(batch * len);
    for r in labels.chunks(len).take(batch) {
        out.push(start);
        out.extend(r[..len - 1].iter().map(|&l| if l == -100 { pad } else { l as u32 }));
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Sub-layers. Each reads its input from `c.hs[s]` and writes `c.hs[s + 1] = input + sublayer(norm(input))`.

/// T5 attention: no `1/√d` scale (the initialisation absorbs it), causal in the decoder's self-attention.
fn t5_attn(batch: usize, q_len: usize, k_len: usize, heads: usize, head_dim: usize, causal: bool) -> AttnSpec {
    AttnSpec { q_len, k_len, causal, scale: 1.0, ..AttnSpec::new(batch, q_len, heads, head_dim) }
}

fn prepare(c: &mut StackCache, emb: &[f32], subs: usize) {
    c.hs.resize(subs + 1, Vec::new());
    c.hs[0].clear();
    c.hs[0].extend_from_slice(emb);
    c.attn.resize(subs, AttnCache::default());
    c.ff.resize(subs, FfCache::default());
}

fn finish(c: &mut StackCache, ln: &Param, eps: f32, d: usize, scale: f32) {
    let last = c.hs.len() - 1;
    let rows = c.hs[last].len() / d;
    sized(&mut c.out_rstd, rows);
    sized(&mut c.out, rows * d);
    rmsnorm_forward(&c.hs[last], &ln.data, eps, d, &mut c.out, &mut c.out_rstd);
    if scale != 1.0 {
        c.out.iter_mut().for_each(|x| *x *= scale);
    }
}

#[allow(clippy::too_many_arguments)]
fn attn_forward(
    a: &mut T5Attn,
    ln: &Param,
    eps: f32,
    c: &mut StackCache,
    s: usize,
    kv: Option<&[f32]>,
    sh: AttnSpec,
    kmask: &[f32],
    with_bias: bool,
) {
    let d = ln.len();
    let (tq, tk, inner) = (sh.batch * sh.q_len, sh.batch * sh.k_len, sh.q_dim());
    let (before, after) = c.hs.split_at_mut(s + 1);
    let x = &before[s];
    let ac = &mut c.attn[s];
    rmsnorm_forward(x, &ln.data, eps, d, sized(&mut ac.xn, tq * d), sized(&mut ac.rstd, tq));
    a.q.forward(&ac.xn, tq, sized(&mut ac.q, tq * inner));
    let src = kv.unwrap_or(&ac.xn);
    a.k.forward(src, tk, sized(&mut ac.k, tk * inner));
    a.v.forward(src, tk, sized(&mut ac.v, tk * inner));
    let bias = with_bias.then_some(c.bias.as_slice());
    sized(&mut ac.probs, sh.probs_len());
    attention_forward(sh, &ac.q, &ac.k, &ac.v, kmask, bias, sized(&mut ac.ctx, tq * inner), &mut ac.probs);
    let y = sized(&mut after[0], tq * d);
    a.o.forward(&ac.ctx, tq, y);
    y.iter_mut().zip(x.iter()).for_each(|(o, xi)| *o += xi);
}

fn ff_forward(f: &mut T5Ff, ln: &Param, eps: f32, act: Act, dff: usize, c: &mut StackCache, s: usize) {
    let d = ln.len();
    let (before, after) = c.hs.split_at_mut(s + 1);
    let x = &before[s];
    let t = x.len() / d;
    let fc = &mut c.ff[s];
    rmsnorm_forward(x, &ln.data, eps, d, sized(&mut fc.xn, t * d), sized(&mut fc.rstd, t));
    f.wi.forward(&fc.xn, t, sized(&mut fc.h0, t * dff));
    let a = sized(&mut fc.a, t * dff);
    match act {
        Act::Relu => relu_forward(&fc.h0, a),
        Act::Gelu(k) => gelu_forward(k, &fc.h0, a),
    }
    sized(&mut fc.g, t * dff);
    match f.wi_1.as_mut() {
        Some(w1) => {
            w1.forward(&fc.xn, t, sized(&mut fc.h1, t * dff));
            for ((g, a), h1) in fc.g.iter_mut().zip(&fc.a).zip(&fc.h1) {
                *g = a * h1;
            }
        }
        None => fc.g.copy_from_slice(&fc.a),
    }
    let y = sized(&mut after[0], t * d);
    f.wo.forward(&fc.g, t, y);
    y.iter_mut().zip(x.iter()).for_each(|(o, xi)| *o += xi);
}

/// Residual + norm: `dh ← dh + normᵀ(dxn)` for the sub-layer input `x`.
fn norm_residual_backward(sc: &mut Grads, x: &[f32], rstd: &[f32], ln: &Param) {
    let d = ln.len();
    sized(&mut sc.dx, x.len()).copy_from_slice(&sc.dh);
    rmsnorm_backward(&sc.dxn, x, rstd, &ln.data, d, &mut sc.dx, true, None);
    std::mem::swap(&mut sc.dh, &mut sc.dx);
}

fn attn_backward(
    a: &mut T5Attn,
    ln: &Param,
    c: &StackCache,
    s: usize,
    kv: Option<(&[f32], &mut Vec<f32>)>,
    sh: AttnSpec,
    sc: &mut Grads,
) {
    let d = ln.len();
    let (tq, tk, inner) = (sh.batch * sh.q_len, sh.batch * sh.k_len, sh.q_dim());
    let ac = &c.attn[s];
    a.o.backward(&ac.ctx, &sc.dh, tq, Some(sized(&mut sc.dctx, tq * inner)), false);
    attention_backward(
        sh,
        &ac.q,
        &ac.k,
        &ac.v,
        &ac.probs,
        &sc.dctx,
        sized(&mut sc.dq, tq * inner),
        sized(&mut sc.dk, tk * inner),
        sized(&mut sc.dv, tk * inner),
    );
    a.q.backward(&ac.xn, &sc.dq, tq, Some(sized(&mut sc.dxn, tq * d)), false);
    match kv {
        None => {
            a.k.backward(&ac.xn, &sc.dk, tk, Some(&mut sc.dxn), true);
            a.v.backward(&ac.xn, &sc.dv, tk, Some(&mut sc.dxn), true);
        }
        Some((src, dsrc)) => {
            a.k.backward(src, &sc.dk, tk, Some(dsrc), true);
            a.v.backward(src, &sc.dv, tk, Some(dsrc), true);
        }
    }
    norm_residual_backward(sc, &c.hs[s], &ac.rstd, ln);
}

fn ff_backward(f: &mut T5Ff, ln: &Param, act: Act, dff: usize, c: &StackCache, s: usize, sc: &mut Grads) {
    let d = ln.len();
    let fc = &c.ff[s];
    let t = fc.xn.len() / d;
    f.wo.backward(&fc.g, &sc.dh, t, Some(sized(&mut sc.dg, t * dff)), false);
    if let Some(w1) = f.wi_1.as_mut() {
        // g = a ⊙ h1: dh1 = dg ⊙ a, da = dg ⊙ h1
        let dh1 = sized(&mut sc.dh1, t * dff);
        for ((o, g), a) in dh1.iter_mut().zip(sc.dg.iter()).zip(&fc.a) {
            *o = g * a;
        }
        sc.dg.iter_mut().zip(&fc.h1).for_each(|(g, h)| *g *= h);
        w1.backward(&fc.xn, &sc.dh1, t, Some(sized(&mut sc.dxn, t * d)), false);
        apply_act_backward(act, &fc.h0, &mut sc.dg);
        f.wi.backward(&fc.xn, &sc.dg, t, Some(&mut sc.dxn), true);
    } else {
        apply_act_backward(act, &fc.h0, &mut sc.dg);
        f.wi.backward(&fc.xn, &sc.dg, t, Some(sized(&mut sc.dxn, t * d)), false);
    }
    norm_residual_backward(sc, &c.hs[s], &fc.rstd, ln);
}

fn apply_act_backward(act: Act, x: &[f32], d: &mut [f32]) {
    match act {
        Act::Relu => relu_backward_inplace(x, d),
        Act::Gelu(k) => gelu_backward_inplace(k, x, d),
    }
}

impl crate::lora::host::LinearHost for T5 {
    fn linear_paths(&self) -> Vec<String> {
        // linears_mut needs &mut; the paths depend only on the shape, so build them from a description.
        let mut out = Vec::new();
        for (stack, n) in [("encoder", self.encoder.len()), ("decoder", self.decoder.len())] {
            for l in 0..n {
                let pre = format!("{stack}.block.{l}");
                for x in ATTN_NAMES {
                    out.push(format!("{pre}.layer.0.SelfAttention.{x}"));
                }
                if stack == "decoder" {
                    for x in ATTN_NAMES {
                        out.push(format!("{pre}.layer.1.EncDecAttention.{x}"));
                    }
                }
                let fl = if stack == "decoder" { 2 } else { 1 };
                let names: &[&str] = if self.gated { &["wi_0", "wi_1", "wo"] } else { &["wi", "wo"] };
                for x in names {
                    out.push(format!("{pre}.layer.{fl}.DenseReluDense.{x}"));
                }
            }
        }
        out.push("lm_head".into());
        out
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        self.linears_mut().into_iter().find(|(p, _)| p == path).map(|(_, l)| l)
    }
    fn describe(&self) -> String {
        format!("T5 with {} encoder and {} decoder blocks", self.encoder.len(), self.decoder.len())
    }
}

impl HfModel for T5 {
    type Config = T5Config;
    fn config(v: &Value) -> Result<T5Config> {
        T5Config::from_json(v)
    }
    fn from_tensors(cfg: T5Config, tf: &mut TensorFile) -> Result<Self> {
        T5::from_tensors(cfg, tf)
    }
    /// Every encoder/decoder tensor; the stacks' `embed_tokens` are copies of `shared`.
    fn owns(k: &str) -> bool {
        (k.starts_with("encoder.") || k.starts_with("decoder.")) && !k.ends_with(".embed_tokens.weight")
    }
}

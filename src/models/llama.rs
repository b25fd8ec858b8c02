//! Llama-family decoder (`LlamaForCausalLM`): RMSNorm, rotary positions, SwiGLU MLP, grouped-query causal
//! attention, with explicit forward and backward passes on the shared engine.
//!
//! Loaded from an unmodified Hugging Face directory (`config.json` with `model_type` "llama",
//! `model.safetensors` with `model.embed_tokens.weight`, `model.layers.N.…`, `model.norm.weight` and
//! `lm_head.weight`, or the embedding when `tie_word_embeddings`). Every linear layer, the LM head included, is a
//! [`BankLinear`] addressed by its PEFT module path (`model.layers.N.self_attn.q_proj`, `lm_head`, …), so PEFT
//! adapters made for `LlamaForCausalLM` load as they are.
//!
//! Positions are `0..seq` in every row, as transformers uses them when no `position_ids` are given; padding only
//! hides keys. A query that sees no key (a left pad before the first token) gets a zero attention context; its
//! logits are not meaningful (transformers' are an artefact of its dtype-minimum mask there).
//!
//! Library functions on top: the causal-LM loss on answer tokens (labels −100 elsewhere, shifted as
//! transformers does) and rank classification (each candidate answer scored by its summed log-probability).

use super::hf::{HfDir, HfModel};
use crate::engine::attention::{attention_backward, attention_forward, AttnSpec};
use crate::engine::kernels::{rmsnorm_backward, rmsnorm_forward};
use crate::engine::llama_ops::{rope_apply, swiglu_backward, swiglu_forward, Rope};
use crate::engine::param::Param;
use crate::engine::weights::TensorFile;
use crate::lora::bank::BankLinear;
use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

/// The label transformers ignores in the loss.
pub const IGNORE: i64 = -100;

/// The fields of a Llama `config.json` that loracomp uses. Unknown fields are ignored, as transformers does.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// transformers < 5 writes `rope_theta` (and `rope_scaling`) at the top level; transformers 5 writes
    /// `rope_parameters` `{rope_theta, rope_type}`.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Mistral's sliding attention window: loracomp attends to the whole sequence, so sequences longer than
    /// the window are refused.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// The fields of a parsed `config.json`, validated. Errors name the offending key.
    pub fn from_json(v: &Value) -> Result<Self> {
        let cfg = LlamaConfig::deserialize(v).map_err(|e| anyhow!("invalid Llama config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            if t != "llama" && t != "mistral" {
                bail!("key 'model_type': '{t}' is not a Llama-family model (expected llama or mistral)");
            }
        }
        for (k, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
        ] {
            if v == 0 {
                bail!("key '{k}' must be positive");
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            bail!(
                "key 'num_key_value_heads': {} does not divide num_attention_heads {}",
                self.kv_heads(),
                self.num_attention_heads
            );
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "key 'num_attention_heads': {} does not divide hidden_size {} (and no head_dim is given)",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            bail!("key 'head_dim': {hd} must be positive and even for rotary embeddings");
        }
        if self.hidden_act != "silu" {
            bail!("key 'hidden_act': '{}' is not supported (Llama's MLP is SiLU-gated: silu)", self.hidden_act);
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            bail!("key 'rms_norm_eps' must be a positive number");
        }
        let th = self.rope_theta()?;
        if !(th > 0.0 && th.is_finite()) {
            bail!("key 'rope_theta' must be a positive number");
        }
        Ok(())
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// θ of the default rotary embedding; an error for any other rope type (scaled ropes are not implemented).
    pub fn rope_theta(&self) -> Result<f64> {
        let mut theta = self.rope_theta;
        for (key, v) in [("rope_scaling", &self.rope_scaling), ("rope_parameters", &self.rope_parameters)] {
            let Some(v) = v.as_ref().filter(|v| !v.is_null()) else { continue };
            let Some(obj) = v.as_object() else {
                bail!("key '{key}' must be an object");
            };
            let ty = obj.get("rope_type").or_else(|| obj.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
            if ty != "default" {
                bail!("key '{key}': rope type '{ty}' is not supported (only the default rope)");
            }
            if let Some(t) = obj.get("rope_theta") {
                theta = Some(t.as_f64().ok_or_else(|| anyhow!("key '{key}.rope_theta' must be a number"))?);
            }
        }
        Ok(theta.unwrap_or(10000.0))
    }
}

/// A padded batch of token ids `[batch, seq]`; mask 1 for tokens and 0 for padding.
#[derive(Clone, Debug, Default)]
pub struct LmBatch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub mask: Vec<f32>,
}

impl LmBatch {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Right-padded batch of `prompt + answer` sequences with labels: the answer tokens, −100 elsewhere.
    pub fn with_answers(examples: &[(Vec<u32>, Vec<u32>)]) -> Result<(LmBatch, Vec<i64>)> {
        if examples.is_empty() {
            bail!("no examples");
        }
        let seq = examples.iter().map(|(p, a)| p.len() + a.len()).max().unwrap_or(0);
        let mut b = LmBatch { batch: examples.len(), seq, ids: vec![0; examples.len() * seq], mask: Vec::new() };
        b.mask = vec![0.0; b.ids.len()];
        let mut labels = vec![IGNORE; b.ids.len()];
        for (i, (p, a)) in examples.iter().enumerate() {
            if p.is_empty() || a.is_empty() {
                bail!("example {i}: prompt and answer must both be non-empty");
            }
            for (t, &tok) in p.iter().chain(a).enumerate() {
                b.ids[i * seq + t] = tok;
                b.mask[i * seq + t] = 1.0;
                if t >= p.len() {
                    labels[i * seq + t] = tok as i64;
                }
            }
        }
        Ok((b, labels))
    }
}

/// One decoder block.
#[derive(Clone, Debug)]
pub struct LlamaLayer {
    pub q_proj: BankLinear,
    pub k_proj: BankLinear,
    pub v_proj: BankLinear,
    pub o_proj: BankLinear,
    pub gate_proj: BankLinear,
    pub up_proj: BankLinear,
    pub down_proj: BankLinear,
    pub input_layernorm: Param,
    pub post_attention_layernorm: Param,
}

/// The linear modules of a layer as `LlamaDecoderLayer` names them (the suffixes PEFT matches).
pub const LINEAR_NAMES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl LlamaLayer {
    pub fn linears_mut(&mut self) -> [&mut BankLinear; 7] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
        ]
    }
    fn has_trainable(&mut self) -> bool {
        self.input_layernorm.trainable()
            || self.post_attention_layernorm.trainable()
            || self.linears_mut().into_iter().any(|l| !l.trainable_params_mut().is_empty())
    }
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    rstd1: Vec<f32>,
    n1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    hmid: Vec<f32>,
    rstd2: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    act: Vec<f32>,
}

#[derive(Clone, Debug, Default)]
struct Workspace {
    batch: LmBatch,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// `hs[0]` token embeddings, `hs[l + 1]` output of layer `l`.
    hs: Vec<Vec<f32>>,
    caches: Vec<LayerCache>,
    rstd_f: Vec<f32>,
    hn: Vec<f32>,
    /// The rows of `hn` the LM head ran on ([`Llama::forward_rows`]); `None`: every row.
    rows: Option<Vec<usize>>,
    /// `hn` gathered at `rows`, and its gradient.
    hsel: Vec<f32>,
    dhsel: Vec<f32>,
    logits: Vec<f32>,
    dh: Vec<f32>,
    dhn: Vec<f32>,
    dhmid: Vec<f32>,
    dn: Vec<f32>,
    dact: Vec<f32>,
    dgate: Vec<f32>,
    dup: Vec<f32>,
    dctx: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut Vec<f32> {
    v.resize(n, 0.0);
    v
}

/// `LlamaForCausalLM`.
#[derive(Clone, Debug)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Param,
    pub layers: Vec<LlamaLayer>,
    pub norm: Param,
    /// The LM head; with tied embeddings it holds a copy of the embedding matrix.
    pub lm_head: BankLinear,
    pub tied: bool,
    pub rope: Rope,
    ws: Workspace,
}

impl Llama {
    /// Load `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        HfDir::open(dir)?.load()
    }

    /// Build from a validated config and a tensor file with `LlamaForCausalLM`'s keys.
    pub fn from_tensors(cfg: LlamaConfig, tf: &mut TensorFile) -> Result<Self> {
        cfg.validate()?;
        let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kd) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
        let mut p =
            |key: &str, shape: &[usize]| -> Result<Param> { Ok(Param::new(shape.to_vec(), tf.take(key, shape)?)) };
        let mut embed = p("model.embed_tokens.weight", &[v, d])?;
        embed.set_row_sparse(d);
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let mut lin = |name: &str, o: usize, inp: usize, bias: bool| -> Result<BankLinear> {
                let w = p(&format!("model.layers.{l}.{name}.weight"), &[o, inp])?;
                let b = if bias { Some(p(&format!("model.layers.{l}.{name}.bias"), &[o])?) } else { None };
                Ok(BankLinear::new(w, b))
            };
            let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
            let q_proj = lin(LINEAR_NAMES[0], qd, d, ab)?;
            let k_proj = lin(LINEAR_NAMES[1], kd, d, ab)?;
            let v_proj = lin(LINEAR_NAMES[2], kd, d, ab)?;
            let o_proj = lin(LINEAR_NAMES[3], d, qd, ab)?;
            let gate_proj = lin(LINEAR_NAMES[4], i, d, mb)?;
            let up_proj = lin(LINEAR_NAMES[5], i, d, mb)?;
            let down_proj = lin(LINEAR_NAMES[6], d, i, mb)?;
            layers.push(LlamaLayer {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                input_layernorm: p(&format!("model.layers.{l}.input_layernorm.weight"), &[d])?,
                post_attention_layernorm: p(&format!("model.layers.{l}.post_attention_layernorm.weight"), &[d])?,
            });
        }
        let norm = p("model.norm.weight", &[d])?;
        let tied = cfg.tie_word_embeddings;
        let head_w = if tied { Param::new(vec![v, d], embed.data.clone()) } else { p("lm_head.weight", &[v, d])? };
        let rope = Rope::new(cfg.head_dim(), cfg.rope_theta()? as f32);
        Ok(Llama {
            cfg,
            embed,
            layers,
            norm,
            lm_head: BankLinear::new(head_w, None),
            tied,
            rope,
            ws: Workspace::default(),
        })
    }

    /// A random model with `LlamaForCausalLM`'s keys (normal weights scaled by `1/√fan_in`, embeddings
    /// normal(0, 0.02) as transformers initialises them, unit norms), from a seeded generator. The start of
    /// `loracomp pretrain --arch llama`, and real shapes for timings.
    pub fn random(cfg: LlamaConfig, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kd) = (cfg.num_attention_heads * cfg.head_dim(), cfg.kv_heads() * cfg.head_dim());
        let mut names: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![v, d]), ("model.norm.weight".into(), vec![d])];
        if !cfg.tie_word_embeddings {
            names.push(("lm_head.weight".into(), vec![v, d]));
        }
        for l in 0..cfg.num_hidden_layers {
            let shapes = [[qd, d], [kd, d], [kd, d], [d, qd], [i, d], [i, d], [d, i]];
            for (name, shape) in LINEAR_NAMES.iter().zip(shapes) {
                names.push((format!("model.layers.{l}.{name}.weight"), shape.to_vec()));
                let bias = if name.starts_with("self_attn") { cfg.attention_bias } else { cfg.mlp_bias };
                if bias {
                    names.push((format!("model.layers.{l}.{name}.bias"), vec![shape[0]]));
                }
            }
            for n in ["input_layernorm", "post_attention_layernorm"] {
                names.push((format!("model.layers.{l}.{n}.weight"), vec![d]));
            }
        }
        let mut tensors = std::collections::BTreeMap::new();
        for (n, shape) in names {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = if n.ends_with("norm.weight") {
                vec![1.0; len]
            } else if n.ends_with(".bias") {
                vec![0.0; len]
            } else {
                let std = if n.contains("embed_tokens") { 0.02 } else { (shape[1] as f32).powf(-0.5) };
                (0..len).map(|_| crate::util::normal(&mut rng) * std).collect()
            };
            tensors.insert(n, (shape, data));
        }
        let mut tf = TensorFile { path: "<random>".into(), tensors, unusable: Default::default() };
        Self::from_tensors(cfg, &mut tf)
    }

    /// Every weight under its `LlamaForCausalLM` safetensors key (`lm_head.weight` only when untied).
    pub fn state_dict(&self) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let mut out = std::collections::BTreeMap::new();
        let mut put = |k: String, p: &Param| {
            out.insert(k, (p.shape.clone(), p.data.clone()));
        };
        put("model.embed_tokens.weight".into(), &self.embed);
        put("model.norm.weight".into(), &self.norm);
        if !self.tied {
            put("lm_head.weight".into(), &self.lm_head.w);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let lins = [
                &layer.q_proj,
                &layer.k_proj,
                &layer.v_proj,
                &layer.o_proj,
                &layer.gate_proj,
                &layer.up_proj,
                &layer.down_proj,
            ];
            for (name, lin) in LINEAR_NAMES.iter().zip(lins) {
                put(format!("model.layers.{l}.{name}.weight"), &lin.w);
                if let Some(b) = &lin.bias {
                    put(format!("model.layers.{l}.{name}.bias"), b);
                }
            }
            put(format!("model.layers.{l}.input_layernorm.weight"), &layer.input_layernorm);
            put(format!("model.layers.{l}.post_attention_layernorm.weight"), &layer.post_attention_layernorm);
        }
        out
    }

    /// Make every weight trainable (pre-training): embeddings, norms, every linear layer and the head.
    pub fn set_all_trainable(&mut self, on: bool) {
        self.embed.set_trainable(on);
        self.norm.set_trainable(on);
        for layer in &mut self.layers {
            layer.input_layernorm.set_trainable(on);
            layer.post_attention_layernorm.set_trainable(on);
            for lin in layer.linears_mut() {
                lin.w.set_trainable(on);
                if let Some(b) = lin.bias.as_mut() {
                    b.set_trainable(on);
                }
            }
        }
        if !self.tied {
            self.lm_head.w.set_trainable(on);
        }
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn vocab(&self) -> usize {
        self.cfg.vocab_size
    }

    /// Causal grouped-query self-attention, scale `1/√head_dim`.
    fn shape(&self, b: &LmBatch) -> AttnSpec {
        let (heads, head_dim) = (self.cfg.num_attention_heads, self.cfg.head_dim());
        AttnSpec { kv_heads: self.cfg.kv_heads(), causal: true, ..AttnSpec::new(b.batch, b.seq, heads, head_dim) }
    }

    fn check_batch(&self, b: &LmBatch) -> Result<()> {
        let n = b.rows();
        if n == 0 || b.ids.len() != n || b.mask.len() != n {
            bail!("batch arrays do not match [batch {}, seq {}]", b.batch, b.seq);
        }
        if let Some(w) = self.cfg.sliding_window.filter(|&w| b.seq > w) {
            bail!("sequence length {} exceeds the model's sliding_window {w}; use a shorter --max-len", b.seq);
        }
        if let Some(id) = b.ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            bail!("token id {id} is outside the vocabulary (vocab_size {})", self.cfg.vocab_size);
        }
        Ok(())
    }

    /// Forward pass; returns the logits `[batch·seq, vocab]`. Caches what backward needs.
    pub fn forward(&mut self, batch: &LmBatch) -> Result<&[f32]> {
        self.forward_body(batch)?;
        let (t, v) = (batch.rows(), self.vocab());
        let ws = &mut self.ws;
        ws.rows = None;
        self.lm_head.forward(&ws.hn, t, sized(&mut ws.logits, t * v));
        Ok(&self.ws.logits)
    }

    /// Forward pass that runs the LM head only at `rows` (indices into the `batch·seq` positions); returns
    /// their logits `[rows.len(), vocab]`, the same numbers as those rows of [`Llama::forward`]'s. A loss on a
    /// few positions (rank classification's answer tokens, [`scored_rows`]) needs no other logits: on the
    /// `llama4` bench step (16 × 66 positions, 2 scored per sequence, vocab 32000) the full head is 69 of the
    /// step's GFLOP (forward and input gradient) and its logits and their gradient 270 MB. [`Llama::backward`]
    /// then takes the gradient of these logits.
    pub fn forward_rows(&mut self, batch: &LmBatch, rows: &[usize]) -> Result<&[f32]> {
        let t = batch.rows();
        if let Some(&r) = rows.iter().find(|&&r| r >= t) {
            bail!("forward_rows: row {r} is outside the batch's {t} positions");
        }
        self.forward_body(batch)?;
        let (d, v) = (self.hidden(), self.vocab());
        let ws = &mut self.ws;
        let hsel = sized(&mut ws.hsel, rows.len() * d);
        for (dst, &r) in hsel.chunks_mut(d).zip(rows) {
            dst.copy_from_slice(&ws.hn[r * d..(r + 1) * d]);
        }
        ws.rows = Some(rows.to_vec());
        self.lm_head.forward(&ws.hsel, rows.len(), sized(&mut ws.logits, rows.len() * v));
        Ok(&self.ws.logits)
    }

    /// Everything below the LM head: the layers and the final norm (into `ws.hn`).
    fn forward_body(&mut self, batch: &LmBatch) -> Result<()> {
        self.check_batch(batch)?;
        let sh = self.shape(batch);
        let (d, inter) = (self.hidden(), self.cfg.intermediate_size);
        let (qd, kd) = (sh.q_dim(), sh.kv_dim());
        let t = batch.rows();
        let eps = self.cfg.rms_norm_eps as f32;
        let nl = self.layers.len();
        let ws = &mut self.ws;
        ws.batch = batch.clone();
        (ws.cos, ws.sin) = self.rope.tables(batch.seq);
        ws.hs.resize(nl + 1, Vec::new());
        ws.caches.resize(nl, LayerCache::default());
        let h0 = sized(&mut ws.hs[0], t * d);
        for (row, &id) in h0.chunks_mut(d).zip(&batch.ids) {
            row.copy_from_slice(&self.embed.data[id as usize * d..(id as usize + 1) * d]);
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let (before, after) = ws.hs.split_at_mut(l + 1);
            let x = &before[l];
            let c = &mut ws.caches[l];
            sized(&mut c.rstd1, t);
            rmsnorm_forward(x, &layer.input_layernorm.data, eps, d, sized(&mut c.n1, t * d), &mut c.rstd1);
            layer.q_proj.forward(&c.n1, t, sized(&mut c.q, t * qd));
            layer.k_proj.forward(&c.n1, t, sized(&mut c.k, t * kd));
            layer.v_proj.forward(&c.n1, t, sized(&mut c.v, t * kd));
            rope_apply(&mut c.q, sh.q_len, sh.heads, sh.head_dim, &ws.cos, &ws.sin, false);
            rope_apply(&mut c.k, sh.q_len, sh.kv_heads, sh.head_dim, &ws.cos, &ws.sin, false);
            sized(&mut c.probs, sh.probs_len());
            attention_forward(sh, &c.q, &c.k, &c.v, &batch.mask, None, sized(&mut c.ctx, t * qd), &mut c.probs);
            layer.o_proj.forward(&c.ctx, t, sized(&mut c.hmid, t * d));
            c.hmid.iter_mut().zip(x.iter()).for_each(|(a, b)| *a += b);
            sized(&mut c.rstd2, t);
            rmsnorm_forward(
                &c.hmid,
                &layer.post_attention_layernorm.data,
                eps,
                d,
                sized(&mut c.n2, t * d),
                &mut c.rstd2,
            );
            layer.gate_proj.forward(&c.n2, t, sized(&mut c.gate, t * inter));
            layer.up_proj.forward(&c.n2, t, sized(&mut c.up, t * inter));
            swiglu_forward(&c.gate, &c.up, sized(&mut c.act, t * inter));
            let y = sized(&mut after[0], t * d);
            layer.down_proj.forward(&c.act, t, y);
            y.iter_mut().zip(c.hmid.iter()).for_each(|(a, b)| *a += b);
        }
        sized(&mut ws.rstd_f, t);
        rmsnorm_forward(&ws.hs[nl], &self.norm.data, eps, d, sized(&mut ws.hn, t * d), &mut ws.rstd_f);
        Ok(())
    }

    /// Backward pass from `dlogits` (for the most recent forward: `[batch·seq, vocab]` after
    /// [`Llama::forward`], `[rows, vocab]` after [`Llama::forward_rows`]). Accumulates into trainable parameters
    /// only (frozen weights get no gradient), and stops at the lowest layer that has any.
    pub fn backward(&mut self, dlogits: &[f32]) -> Result<()> {
        let batch = self.ws.batch.clone();
        let sh = self.shape(&batch);
        let (d, inter, v) = (self.hidden(), self.cfg.intermediate_size, self.vocab());
        let (qd, kd) = (sh.q_dim(), sh.kv_dim());
        let t = batch.rows();
        let nl = self.layers.len();
        let head_rows = self.ws.rows.as_ref().map_or(t, |r| r.len());
        if dlogits.len() != head_rows * v {
            bail!("backward: gradient has {} values, expected {}", dlogits.len(), head_rows * v);
        }
        if self.tied && self.embed.trainable() {
            bail!("training tied input/output embeddings is not supported");
        }
        let emb_tr = self.embed.trainable();
        let first = if emb_tr { Some(0) } else { self.layers.iter_mut().position(|l| l.has_trainable()) };
        let norm_tr = self.norm.trainable();
        let head_tr = !self.lm_head.trainable_params_mut().is_empty();
        let ws = &mut self.ws;
        let head_in = if ws.rows.is_some() { &ws.hsel } else { &ws.hn };
        if first.is_none() && !norm_tr {
            if head_tr {
                self.lm_head.backward(head_in, dlogits, head_rows, None, false);
            }
            return Ok(());
        }
        if let Some(rows) = &ws.rows {
            self.lm_head.backward(head_in, dlogits, head_rows, Some(sized(&mut ws.dhsel, head_rows * d)), false);
            let dhn = sized(&mut ws.dhn, t * d);
            dhn.fill(0.0);
            for (src, &r) in ws.dhsel.chunks(d).zip(rows) {
                dhn[r * d..(r + 1) * d].iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
        } else {
            self.lm_head.backward(head_in, dlogits, t, Some(sized(&mut ws.dhn, t * d)), false);
        }
        let dw = if norm_tr { Some(self.norm.grad.as_mut_slice()) } else { None };
        rmsnorm_backward(&ws.dhn, &ws.hs[nl], &ws.rstd_f, &self.norm.data, d, sized(&mut ws.dh, t * d), false, dw);
        let Some(first) = first else { return Ok(()) };
        for l in (first..nl).rev() {
            let need_dx = l > first || emb_tr;
            let layer = &mut self.layers[l];
            let c = &ws.caches[l];
            let x = &ws.hs[l];
            // MLP: y = hmid + down(silu(gate(n2))·up(n2)), n2 = rms(hmid)
            layer.down_proj.backward(&c.act, &ws.dh, t, Some(sized(&mut ws.dact, t * inter)), false);
            swiglu_backward(&c.gate, &c.up, &ws.dact, sized(&mut ws.dgate, t * inter), sized(&mut ws.dup, t * inter));
            layer.gate_proj.backward(&c.n2, &ws.dgate, t, Some(sized(&mut ws.dn, t * d)), false);
            layer.up_proj.backward(&c.n2, &ws.dup, t, Some(&mut ws.dn), true);
            sized(&mut ws.dhmid, t * d).copy_from_slice(&ws.dh);
            let ln2 = &mut layer.post_attention_layernorm;
            let dw = if ln2.trainable() { Some(ln2.grad.as_mut_slice()) } else { None };
            rmsnorm_backward(&ws.dn, &c.hmid, &c.rstd2, &ln2.data, d, &mut ws.dhmid, true, dw);
            // attention: hmid = x + o(attn(rope(q(n1)), rope(k(n1)), v(n1))), n1 = rms(x)
            layer.o_proj.backward(&c.ctx, &ws.dhmid, t, Some(sized(&mut ws.dctx, t * qd)), false);
            attention_backward(
                sh,
                &c.q,
                &c.k,
                &c.v,
                &c.probs,
                &ws.dctx,
                sized(&mut ws.dq, t * qd),
                sized(&mut ws.dk, t * kd),
                sized(&mut ws.dv, t * kd),
            );
            rope_apply(&mut ws.dq, sh.q_len, sh.heads, sh.head_dim, &ws.cos, &ws.sin, true);
            rope_apply(&mut ws.dk, sh.q_len, sh.kv_heads, sh.head_dim, &ws.cos, &ws.sin, true);
            let ln1 = &mut layer.input_layernorm;
            if need_dx || ln1.trainable() {
                layer.q_proj.backward(&c.n1, &ws.dq, t, Some(&mut ws.dn), false);
                layer.k_proj.backward(&c.n1, &ws.dk, t, Some(&mut ws.dn), true);
                layer.v_proj.backward(&c.n1, &ws.dv, t, Some(&mut ws.dn), true);
                ws.dh.copy_from_slice(&ws.dhmid);
                let dw = if ln1.trainable() { Some(ln1.grad.as_mut_slice()) } else { None };
                rmsnorm_backward(&ws.dn, x, &c.rstd1, &ln1.data, d, &mut ws.dh, true, dw);
            } else {
                layer.q_proj.backward(&c.n1, &ws.dq, t, None, false);
                layer.k_proj.backward(&c.n1, &ws.dk, t, None, false);
                layer.v_proj.backward(&c.n1, &ws.dv, t, None, false);
            }
        }
        if emb_tr {
            for (g, &id) in ws.dh.chunks(d).zip(&batch.ids) {
                let id = id as usize;
                self.embed.grad_row_mut(id, d).iter_mut().zip(g).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    /// Every trainable parameter with a stable name (for the optimiser, counting and tests).
    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out: Vec<(String, &mut Param)> = Vec::new();
        if self.embed.trainable() {
            out.push(("model.embed_tokens.weight".into(), &mut self.embed));
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let LlamaLayer {
                q_proj,
                k_proj,
                v_proj,
                o_proj,
                gate_proj,
                up_proj,
                down_proj,
                input_layernorm,
                post_attention_layernorm,
            } = layer;
            for (n, p) in [("input_layernorm", input_layernorm), ("post_attention_layernorm", post_attention_layernorm)]
            {
                if p.trainable() {
                    out.push((format!("model.layers.{l}.{n}.weight"), p));
                }
            }
            for (name, lin) in LINEAR_NAMES.iter().zip([q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj])
            {
                for (suffix, p) in lin.trainable_params_mut() {
                    out.push((format!("model.layers.{l}.{name}.{suffix}"), p));
                }
            }
        }
        if self.norm.trainable() {
            out.push(("model.norm.weight".into(), &mut self.norm));
        }
        for (suffix, p) in self.lm_head.trainable_params_mut() {
            out.push((format!("lm_head.{suffix}"), p));
        }
        out
    }

    pub fn zero_grad(&mut self) {
        for (_, p) in self.trainable_params_mut() {
            p.zero_grad();
        }
    }

    /// Call after changing any weight, composition or LoRA in place (drops cached merged weights).
    pub fn invalidate(&mut self) {
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.invalidate();
            }
        }
        self.lm_head.invalidate();
    }

    /// Causal-LM loss of `labels` (`[batch, seq]`, −100 where not scored) on a forward pass of `batch`, with the
    /// LM head run only at the scored positions ([`Llama::forward_rows`]). Returns the loss and its gradient
    /// with respect to those logits, ready for [`Llama::backward`].
    pub fn scored_loss(&mut self, batch: &LmBatch, labels: &[i64]) -> Result<(f32, Vec<f32>)> {
        let v = self.vocab();
        let (rows, targets) = scored_rows(labels, batch.batch, batch.seq, v)?;
        let logits = self.forward_rows(batch, &rows)?;
        let mut dl = vec![0.0; logits.len()];
        let loss = rows_cross_entropy(logits, &targets, v, &mut dl)?;
        Ok((loss, dl))
    }

    /// [`Llama::scored_loss`], then its backward pass: accumulates gradients into the trainable parameters.
    /// Returns the loss.
    pub fn loss_and_backward(&mut self, batch: &LmBatch, labels: &[i64]) -> Result<f32> {
        let (loss, dl) = self.scored_loss(batch, labels)?;
        self.backward(&dl)?;
        Ok(loss)
    }

    /// Summed log-probability of each candidate answer following `prompt` (each scored as if alone: the batch
    /// is right-padded, which a causal model never sees).
    pub fn score_candidates(&mut self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<Vec<f64>> {
        if candidates.is_empty() {
            bail!("rank classification needs at least one candidate");
        }
        let ex: Vec<(Vec<u32>, Vec<u32>)> = candidates.iter().map(|c| (prompt.to_vec(), c.clone())).collect();
        let (batch, labels) = LmBatch::with_answers(&ex)?;
        self.answer_log_probs(&batch, &labels)
    }

    /// Each sequence's summed log-probability of its labelled tokens (`labels` as [`LmBatch::with_answers`]
    /// writes them), with the LM head run only where a label is scored.
    pub fn answer_log_probs(&mut self, batch: &LmBatch, labels: &[i64]) -> Result<Vec<f64>> {
        let v = self.vocab();
        let (rows, targets) = scored_rows(labels, batch.batch, batch.seq, v)?;
        let logits = self.forward_rows(batch, &rows)?;
        let mut scores = vec![0.0f64; batch.batch];
        for (i, (&r, &k)) in rows.iter().zip(&targets).enumerate() {
            scores[r / batch.seq] += log_softmax_at(&logits[i * v..(i + 1) * v], k);
        }
        Ok(scores)
    }

    /// Rank classification: the index of the candidate with the highest summed log-probability, and all scores.
    pub fn rank_classify(&mut self, prompt: &[u32], candidates: &[Vec<u32>]) -> Result<(usize, Vec<f64>)> {
        let scores = self.score_candidates(prompt, candidates)?;
        let best = (0..scores.len()).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
        Ok((best, scores))
    }
}

/// `log softmax(row)[k]` in f64.
fn log_softmax_at(row: &[f32], k: usize) -> f64 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
    row[k] as f64 - lse
}

/// The positions a causal-LM loss on `labels` (`[batch, seq]`, −100 where not scored) uses: position
/// `r = (b, t)` is scored when `labels[b, t + 1]` is a label, and predicts it. Returns the scored positions
/// (row-major order) and their targets. Errors when none is scored or a label is outside the vocabulary.
pub fn scored_rows(labels: &[i64], batch: usize, seq: usize, vocab: usize) -> Result<(Vec<usize>, Vec<usize>)> {
    let rows = batch * seq;
    if labels.len() != rows {
        bail!("{} labels for a batch of [batch {batch}, seq {seq}]", labels.len());
    }
    let mut out = (Vec::new(), Vec::new());
    for r in (0..rows).filter(|r| r % seq + 1 < seq) {
        let l = labels[r + 1];
        if l == IGNORE {
            continue;
        }
        if l < 0 || l as usize >= vocab {
            bail!("label {l} is outside the vocabulary [0, {vocab}) (use -100 to skip a position)");
        }
        out.0.push(r);
        out.1.push(l as usize);
    }
    if out.0.is_empty() {
        bail!("no position is scored: every label after the first token is -100");
    }
    Ok(out)
}

/// One scored row's cross-entropy `−log softmax(row)[l]`; writes its gradient times `inv` (1 / scored rows)
/// into `dr`.
fn row_cross_entropy(row: &[f32], l: usize, inv: f32, dr: &mut [f32]) -> f64 {
    let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0f32;
    for (g, &x) in dr.iter_mut().zip(row) {
        *g = (x - mx).exp();
        s += *g;
    }
    dr.iter_mut().for_each(|g| *g *= inv / s);
    dr[l] -= inv;
    -((row[l] - mx) as f64 - (s as f64).ln())
}

/// Mean cross-entropy of `logits` (`[targets.len(), vocab]`, from [`Llama::forward_rows`] at
/// [`scored_rows`]) against `targets`; writes `dlogits`. Equals [`causal_lm_loss`] on the full logits.
pub fn rows_cross_entropy(logits: &[f32], targets: &[usize], vocab: usize, dlogits: &mut [f32]) -> Result<f32> {
    let n = targets.len();
    if n == 0 || logits.len() != n * vocab || dlogits.len() != n * vocab {
        bail!(
            "rows_cross_entropy: {} logits and {} gradients for {n} targets of vocabulary {vocab}",
            logits.len(),
            dlogits.len()
        );
    }
    if let Some(&l) = targets.iter().find(|&&l| l >= vocab) {
        bail!("label {l} is outside the vocabulary [0, {vocab})");
    }
    let inv = 1.0 / n as f32;
    let losses: Vec<f64> = dlogits
        .par_chunks_mut(vocab)
        .zip(logits.par_chunks(vocab))
        .zip(targets.par_iter())
        .map(|((dr, row), &l)| row_cross_entropy(row, l, inv, dr))
        .collect();
    Ok((losses.iter().sum::<f64>() / n as f64) as f32)
}

/// transformers' causal-LM loss: logits at position `t` predict `labels[t + 1]`; positions labelled −100 are
/// skipped and the loss is the mean over the rest. Writes `dlogits` (zero where not scored). Errors when no
/// position is scored or a label is outside the vocabulary.
pub fn causal_lm_loss(
    logits: &[f32],
    labels: &[i64],
    batch: usize,
    seq: usize,
    vocab: usize,
    dlogits: &mut [f32],
) -> Result<f32> {
    let rows = batch * seq;
    if labels.len() != rows || logits.len() != rows * vocab || dlogits.len() != rows * vocab {
        bail!("causal_lm_loss: labels/logits do not match [batch {batch}, seq {seq}, vocab {vocab}]");
    }
    let (scored, targets) = scored_rows(labels, batch, seq, vocab)?;
    let mut target = vec![None; rows];
    for (&r, &l) in scored.iter().zip(&targets) {
        target[r] = Some(l);
    }
    let inv = 1.0 / scored.len() as f32;
    let losses: Vec<f64> = dlogits[..rows * vocab]
        .par_chunks_mut(vocab)
        .enumerate()
        .map(|(r, dr)| match target[r] {
            None => {
                dr.fill(0.0);
                0.0
            }
            Some(l) => row_cross_entropy(&logits[r * vocab..(r + 1) * vocab], l, inv, dr),
        })
        .collect();
    Ok((losses.iter().sum::<f64>() / scored.len() as f64) as f32)
}

impl crate::lora::host::LinearHost for Llama {
    fn linear_paths(&self) -> Vec<String> {
        let mut v: Vec<String> = (0..self.layers.len())
            .flat_map(|l| LINEAR_NAMES.iter().map(move |n| format!("model.layers.{l}.{n}")))
            .collect();
        v.push("lm_head".into());
        v
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        if path == "lm_head" {
            return Some(&mut self.lm_head);
        }
        let (idx, name) = path.strip_prefix("model.layers.")?.split_once('.')?;
        let l: usize = idx.parse().ok()?;
        let pos = LINEAR_NAMES.iter().position(|n| *n == name)?;
        self.layers.get_mut(l).map(|layer| layer.linears_mut().into_iter().nth(pos).unwrap())
    }
    fn describe(&self) -> String {
        format!("Llama decoder with {} layers", self.layers.len())
    }
}

impl HfModel for Llama {
    type Config = LlamaConfig;
    fn config(v: &Value) -> Result<LlamaConfig> {
        LlamaConfig::from_json(v)
    }
    fn from_tensors(cfg: LlamaConfig, tf: &mut TensorFile) -> Result<Self> {
        Llama::from_tensors(cfg, tf)
    }
    /// Every `model.*` tensor (old checkpoints' rotary `inv_freq` buffers are recomputed); an `lm_head.weight`
    /// beside tied embeddings is ignored, as transformers ties it.
    fn owns(k: &str) -> bool {
        k.starts_with("model.") && !k.ends_with("rotary_emb.inv_freq")
    }
}

//! BERT-family encoder (post-LayerNorm, absolute positions) with explicit forward and backward passes.
//!
//! Loaded from an unmodified Hugging Face directory (`config.json`, `model.safetensors` with or without the
//! `bert.` key prefix). Every linear layer is a [`BankLinear`], so LoRA banks, learned compositions and fresh
//! LoRAs attach to any of them by their module path (`encoder.layer.N.attention.self.query`, …).

use super::config::BertConfig;
use super::hf::{HfDir, HfModel};
use crate::engine::attention::{attention_backward, attention_forward, AttnSpec};
use crate::engine::kernels::{gelu_backward_inplace, gelu_forward, layernorm_backward, layernorm_forward, Gelu};
use crate::engine::param::Param;
use crate::engine::weights::TensorFile;
use crate::lora::bank::BankLinear;
use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// A padded batch of token ids: `[batch, seq]`, mask 1 for tokens and 0 for padding.
#[derive(Clone, Debug, Default)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub ids: Vec<u32>,
    pub types: Vec<u32>,
    pub mask: Vec<f32>,
}

impl Batch {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// Word, position and token-type embeddings followed by LayerNorm.
#[derive(Clone, Debug)]
pub struct Embeddings {
    pub word: Param,
    pub pos: Param,
    pub typ: Param,
    pub ln_g: Param,
    pub ln_b: Param,
}

/// One transformer block.
#[derive(Clone, Debug)]
pub struct Layer {
    pub query: BankLinear,
    pub key: BankLinear,
    pub value: BankLinear,
    pub attn_out: BankLinear,
    pub ln1_g: Param,
    pub ln1_b: Param,
    pub inter: BankLinear,
    pub out: BankLinear,
    pub ln2_g: Param,
    pub ln2_b: Param,
}

/// The names of a layer's linear modules, as in Hugging Face's `BertModel` (the suffixes PEFT matches).
pub const LINEAR_NAMES: [&str; 6] = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
];

impl Layer {
    pub fn linears_mut(&mut self) -> [&mut BankLinear; 6] {
        [&mut self.query, &mut self.key, &mut self.value, &mut self.attn_out, &mut self.inter, &mut self.out]
    }
    pub fn linears(&self) -> [&BankLinear; 6] {
        [&self.query, &self.key, &self.value, &self.attn_out, &self.inter, &self.out]
    }
    fn has_trainable(&mut self) -> bool {
        self.ln1_g.trainable()
            || self.ln1_b.trainable()
            || self.ln2_g.trainable()
            || self.ln2_b.trainable()
            || self.linears_mut().into_iter().any(|l| !l.trainable_params_mut().is_empty())
    }
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    pre1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    h1: Vec<f32>,
    ipre: Vec<f32>,
    g: Vec<f32>,
    pre2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
}

/// Buffers reused across steps.
#[derive(Clone, Debug, Default)]
struct Workspace {
    batch: Batch,
    emb_sum: Vec<f32>,
    emb_mean: Vec<f32>,
    emb_rstd: Vec<f32>,
    /// `hs[0]` embeddings output, `hs[l + 1]` output of layer `l`.
    hs: Vec<Vec<f32>>,
    caches: Vec<LayerCache>,
    dh: Vec<f32>,
    dpre: Vec<f32>,
    dh1: Vec<f32>,
    dg: Vec<f32>,
    dctx: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut Vec<f32> {
    v.resize(n, 0.0);
    v
}

/// A BERT encoder.
#[derive(Clone, Debug)]
pub struct Bert {
    pub cfg: BertConfig,
    pub gelu: Gelu,
    pub emb: Embeddings,
    pub layers: Vec<Layer>,
    ws: Workspace,
}

impl Bert {
    /// Load `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        HfDir::open(dir)?.load()
    }

    /// Build from a config and a tensor file whose keys are `BertModel`'s, optionally prefixed by `bert.`.
    pub fn from_tensors(cfg: BertConfig, tf: &mut TensorFile) -> Result<Self> {
        let gelu = cfg.gelu()?;
        let prefix = if tf.contains("bert.embeddings.word_embeddings.weight") { "bert." } else { "" };
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut p = |key: &str, shape: &[usize]| -> Result<Param> {
            Ok(Param::new(shape.to_vec(), tf.take(&format!("{prefix}{key}"), shape)?))
        };
        let mut emb = Embeddings {
            word: p("embeddings.word_embeddings.weight", &[cfg.vocab_size, d])?,
            pos: p("embeddings.position_embeddings.weight", &[cfg.max_position_embeddings, d])?,
            typ: p("embeddings.token_type_embeddings.weight", &[cfg.type_vocab_size, d])?,
            ln_g: p("embeddings.LayerNorm.weight", &[d])?,
            ln_b: p("embeddings.LayerNorm.bias", &[d])?,
        };
        // Tables reached row by row: their gradient and AdamW updates touch only the rows a batch used.
        for t in [&mut emb.word, &mut emb.pos, &mut emb.typ] {
            t.set_row_sparse(d);
        }
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let mut lin = |name: &str, o: usize, inp: usize| -> Result<BankLinear> {
                let w = p(&format!("encoder.layer.{l}.{name}.weight"), &[o, inp])?;
                let b = p(&format!("encoder.layer.{l}.{name}.bias"), &[o])?;
                Ok(BankLinear::new(w, Some(b)))
            };
            let query = lin(LINEAR_NAMES[0], d, d)?;
            let key = lin(LINEAR_NAMES[1], d, d)?;
            let value = lin(LINEAR_NAMES[2], d, d)?;
            let attn_out = lin(LINEAR_NAMES[3], d, d)?;
            let inter = lin(LINEAR_NAMES[4], i, d)?;
            let out = lin(LINEAR_NAMES[5], d, i)?;
            layers.push(Layer {
                query,
                key,
                value,
                attn_out,
                inter,
                out,
                ln1_g: p(&format!("encoder.layer.{l}.attention.output.LayerNorm.weight"), &[d])?,
                ln1_b: p(&format!("encoder.layer.{l}.attention.output.LayerNorm.bias"), &[d])?,
                ln2_g: p(&format!("encoder.layer.{l}.output.LayerNorm.weight"), &[d])?,
                ln2_b: p(&format!("encoder.layer.{l}.output.LayerNorm.bias"), &[d])?,
            });
        }
        Ok(Bert { cfg, gelu, emb, layers, ws: Workspace::default() })
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }

    /// The linear module at a PEFT-style path relative to `BertModel`, e.g. `encoder.layer.3.attention.self.value`.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        let rest = path.strip_prefix("encoder.layer.")?;
        let (idx, name) = rest.split_once('.')?;
        let l: usize = idx.parse().ok()?;
        let pos = LINEAR_NAMES.iter().position(|n| *n == name)?;
        self.layers.get_mut(l).map(|layer| layer.linears_mut().into_iter().nth(pos).unwrap())
    }

    /// Every linear module path of the encoder, in layer order.
    pub fn linear_paths(&self) -> Vec<String> {
        (0..self.layers.len())
            .flat_map(|l| LINEAR_NAMES.iter().map(move |n| format!("encoder.layer.{l}.{n}")))
            .collect()
    }

    /// Make every weight of the encoder trainable (full fine-tuning) or frozen.
    pub fn set_all_trainable(&mut self, on: bool) {
        for p in [&mut self.emb.word, &mut self.emb.pos, &mut self.emb.typ, &mut self.emb.ln_g, &mut self.emb.ln_b] {
            p.set_trainable(on);
        }
        for layer in &mut self.layers {
            for p in [&mut layer.ln1_g, &mut layer.ln1_b, &mut layer.ln2_g, &mut layer.ln2_b] {
                p.set_trainable(on);
            }
            for lin in layer.linears_mut() {
                lin.w.set_trainable(on);
                if let Some(b) = lin.bias.as_mut() {
                    b.set_trainable(on);
                }
            }
        }
    }

    /// Every trainable parameter with a stable name (for the optimiser, counting and export).
    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let mut out: Vec<(String, &mut Param)> = Vec::new();
        let e = &mut self.emb;
        for (n, p) in [
            ("embeddings.word_embeddings.weight", &mut e.word),
            ("embeddings.position_embeddings.weight", &mut e.pos),
            ("embeddings.token_type_embeddings.weight", &mut e.typ),
            ("embeddings.LayerNorm.weight", &mut e.ln_g),
            ("embeddings.LayerNorm.bias", &mut e.ln_b),
        ] {
            if p.trainable() {
                out.push((n.to_string(), p));
            }
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let Layer { query, key, value, attn_out, ln1_g, ln1_b, inter, out: o, ln2_g, ln2_b } = layer;
            for (n, p) in [
                ("attention.output.LayerNorm.weight", ln1_g),
                ("attention.output.LayerNorm.bias", ln1_b),
                ("output.LayerNorm.weight", ln2_g),
                ("output.LayerNorm.bias", ln2_b),
            ] {
                if p.trainable() {
                    out.push((format!("encoder.layer.{l}.{n}"), p));
                }
            }
            for (name, lin) in LINEAR_NAMES.iter().zip([query, key, value, attn_out, inter, o]) {
                for (suffix, p) in lin.trainable_params_mut() {
                    out.push((format!("encoder.layer.{l}.{name}.{suffix}"), p));
                }
            }
        }
        out
    }

    fn check_batch(&self, b: &Batch) -> Result<()> {
        let n = b.rows();
        if b.ids.len() != n || b.types.len() != n || b.mask.len() != n {
            bail!("batch arrays do not match [batch {}, seq {}]", b.batch, b.seq);
        }
        if b.seq > self.cfg.max_position_embeddings {
            bail!("sequence length {} exceeds max_position_embeddings {}", b.seq, self.cfg.max_position_embeddings);
        }
        if let Some(id) = b.ids.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            bail!("token id {id} is outside the vocabulary (vocab_size {})", self.cfg.vocab_size);
        }
        if let Some(t) = b.types.iter().find(|&&t| t as usize >= self.cfg.type_vocab_size) {
            bail!("token type {t} is outside type_vocab_size {}", self.cfg.type_vocab_size);
        }
        Ok(())
    }

    /// Forward pass; returns the last hidden state `[batch·seq, hidden]`. Caches what backward needs.
    pub fn forward(&mut self, batch: &Batch) -> Result<&[f32]> {
        self.check_batch(batch)?;
        let d = self.hidden();
        let inter = self.cfg.intermediate_size;
        let t = batch.rows();
        let eps = self.cfg.layer_norm_eps as f32;
        let nl = self.layers.len();
        let ws = &mut self.ws;
        ws.batch = batch.clone();
        ws.hs.resize(nl + 1, Vec::new());
        ws.caches.resize(nl, LayerCache::default());
        // Embeddings.
        let sum = sized(&mut ws.emb_sum, t * d);
        for (r, row) in sum.chunks_mut(d).enumerate() {
            let (id, ty, s) = (batch.ids[r] as usize, batch.types[r] as usize, r % batch.seq);
            let w = &self.emb.word.data[id * d..(id + 1) * d];
            let p = &self.emb.pos.data[s * d..(s + 1) * d];
            let ty = &self.emb.typ.data[ty * d..(ty + 1) * d];
            for i in 0..d {
                row[i] = w[i] + p[i] + ty[i];
            }
        }
        sized(&mut ws.emb_mean, t);
        sized(&mut ws.emb_rstd, t);
        sized(&mut ws.hs[0], t * d);
        layernorm_forward(
            &ws.emb_sum,
            &self.emb.ln_g.data,
            &self.emb.ln_b.data,
            eps,
            d,
            &mut ws.hs[0],
            &mut ws.emb_mean,
            &mut ws.emb_rstd,
        );
        let sh = AttnSpec::new(batch.batch, batch.seq, self.cfg.num_attention_heads, self.cfg.head_dim());
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let (before, after) = ws.hs.split_at_mut(l + 1);
            let x = &before[l];
            let c = &mut ws.caches[l];
            layer.query.forward(x, t, sized(&mut c.q, t * d));
            layer.key.forward(x, t, sized(&mut c.k, t * d));
            layer.value.forward(x, t, sized(&mut c.v, t * d));
            sized(&mut c.probs, sh.probs_len());
            attention_forward(sh, &c.q, &c.k, &c.v, &batch.mask, None, sized(&mut c.ctx, t * d), &mut c.probs);
            layer.attn_out.forward(&c.ctx, t, sized(&mut c.pre1, t * d));
            c.pre1.iter_mut().zip(x.iter()).for_each(|(a, b)| *a += b);
            sized(&mut c.mean1, t);
            sized(&mut c.rstd1, t);
            layernorm_forward(
                &c.pre1,
                &layer.ln1_g.data,
                &layer.ln1_b.data,
                eps,
                d,
                sized(&mut c.h1, t * d),
                &mut c.mean1,
                &mut c.rstd1,
            );
            layer.inter.forward(&c.h1, t, sized(&mut c.ipre, t * inter));
            gelu_forward(self.gelu, &c.ipre, sized(&mut c.g, t * inter));
            layer.out.forward(&c.g, t, sized(&mut c.pre2, t * d));
            c.pre2.iter_mut().zip(c.h1.iter()).for_each(|(a, b)| *a += b);
            sized(&mut c.mean2, t);
            sized(&mut c.rstd2, t);
            let y = &mut after[0];
            layernorm_forward(
                &c.pre2,
                &layer.ln2_g.data,
                &layer.ln2_b.data,
                eps,
                d,
                sized(y, t * d),
                &mut c.mean2,
                &mut c.rstd2,
            );
        }
        Ok(&self.ws.hs[nl])
    }

    /// Where the most recent forward pass first held NaN or Inf: `"embeddings output"` or `"layer N output"`.
    pub fn non_finite_stage(&self) -> Option<String> {
        let nl = self.layers.len();
        let l =
            (0..=nl.min(self.ws.hs.len().saturating_sub(1))).find(|&l| self.ws.hs[l].iter().any(|v| !v.is_finite()))?;
        Some(if l == 0 { "embeddings output".to_string() } else { format!("layer {} output", l - 1) })
    }

    /// The input of layer `l` (its attention projections' input) in the most recent forward pass.
    pub fn layer_input(&self, l: usize) -> &[f32] {
        &self.ws.hs[l]
    }

    /// The last hidden state of the most recent forward pass.
    pub fn last_hidden(&self) -> &[f32] {
        &self.ws.hs[self.layers.len()]
    }

    fn embeddings_trainable(&self) -> bool {
        let e = &self.emb;
        e.word.trainable() || e.pos.trainable() || e.typ.trainable() || e.ln_g.trainable() || e.ln_b.trainable()
    }

    /// Backward pass from `d_last` (gradient of the last hidden state). Accumulates into trainable parameters
    /// only, and stops at the lowest layer that has any.
    pub fn backward(&mut self, d_last: &[f32]) -> Result<()> {
        let d = self.hidden();
        let inter = self.cfg.intermediate_size;
        let batch = self.ws.batch.clone();
        let t = batch.rows();
        if d_last.len() != t * d {
            return Err(anyhow!("backward: gradient has {} values, expected {}", d_last.len(), t * d));
        }
        let emb_tr = self.embeddings_trainable();
        let first = if emb_tr {
            0
        } else {
            match self.layers.iter_mut().position(|l| l.has_trainable()) {
                Some(f) => f,
                None => return Ok(()),
            }
        };
        let sh = AttnSpec::new(batch.batch, batch.seq, self.cfg.num_attention_heads, self.cfg.head_dim());
        let ws = &mut self.ws;
        sized(&mut ws.dh, t * d).copy_from_slice(d_last);
        for l in (first..self.layers.len()).rev() {
            let need_dx = l > first || emb_tr;
            let Layer { query, key, value, attn_out, ln1_g, ln1_b, inter: inter_l, out, ln2_g, ln2_b } =
                &mut self.layers[l];
            let c = &ws.caches[l];
            let x = &ws.hs[l];
            // LN2
            let lp =
                if ln2_g.trainable() { Some((ln2_g.grad.as_mut_slice(), ln2_b.grad.as_mut_slice())) } else { None };
            layernorm_backward(
                &ws.dh,
                &c.pre2,
                &c.mean2,
                &c.rstd2,
                &ln2_g.data,
                d,
                sized(&mut ws.dpre, t * d),
                false,
                lp,
            );
            // output.dense and GELU
            out.backward(&c.g, &ws.dpre, t, Some(sized(&mut ws.dg, t * inter)), false);
            gelu_backward_inplace(self.gelu, &c.ipre, &mut ws.dg);
            // gradient of h1: the residual (dpre) plus intermediate.dense's, accumulated in place
            inter_l.backward(&c.h1, &ws.dg, t, Some(&mut ws.dpre), true);
            // LN1
            let lp =
                if ln1_g.trainable() { Some((ln1_g.grad.as_mut_slice(), ln1_b.grad.as_mut_slice())) } else { None };
            layernorm_backward(
                &ws.dpre,
                &c.pre1,
                &c.mean1,
                &c.rstd1,
                &ln1_g.data,
                d,
                sized(&mut ws.dh1, t * d),
                false,
                lp,
            );
            // attention output dense
            attn_out.backward(&c.ctx, &ws.dh1, t, Some(sized(&mut ws.dctx, t * d)), false);
            attention_backward(
                sh,
                &c.q,
                &c.k,
                &c.v,
                &c.probs,
                &ws.dctx,
                sized(&mut ws.dq, t * d),
                sized(&mut ws.dk, t * d),
                sized(&mut ws.dv, t * d),
            );
            if need_dx {
                // the layer input's gradient: the residual (dh1) plus the three projections', in place
                query.backward(x, &ws.dq, t, Some(&mut ws.dh1), true);
                key.backward(x, &ws.dk, t, Some(&mut ws.dh1), true);
                value.backward(x, &ws.dv, t, Some(&mut ws.dh1), true);
                std::mem::swap(&mut ws.dh, &mut ws.dh1);
            } else {
                query.backward(x, &ws.dq, t, None, false);
                key.backward(x, &ws.dk, t, None, false);
                value.backward(x, &ws.dv, t, None, false);
            }
        }
        if emb_tr {
            let e = &mut self.emb;
            let lp =
                if e.ln_g.trainable() { Some((e.ln_g.grad.as_mut_slice(), e.ln_b.grad.as_mut_slice())) } else { None };
            layernorm_backward(
                &ws.dh,
                &ws.emb_sum,
                &ws.emb_mean,
                &ws.emb_rstd,
                &e.ln_g.data,
                d,
                sized(&mut ws.dpre, t * d),
                false,
                lp,
            );
            for r in 0..t {
                let g = &ws.dpre[r * d..(r + 1) * d];
                let (id, ty, s) = (batch.ids[r] as usize, batch.types[r] as usize, r % batch.seq);
                for (dst, idx) in [(&mut e.word, id), (&mut e.pos, s), (&mut e.typ, ty)] {
                    if dst.trainable() {
                        dst.grad_row_mut(idx, d).iter_mut().zip(g).for_each(|(a, b)| *a += b);
                    }
                }
            }
        }
        Ok(())
    }
}

impl Bert {
    /// A randomly initialised encoder as `transformers` initialises one (normal(0, 0.02) weights, zero biases,
    /// unit LayerNorm), from a seeded generator. Used by the demo's in-process pre-training and by tests.
    pub fn random(cfg: BertConfig, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
        let mut names: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![cfg.vocab_size, d]),
            ("embeddings.position_embeddings.weight".into(), vec![cfg.max_position_embeddings, d]),
            ("embeddings.token_type_embeddings.weight".into(), vec![cfg.type_vocab_size, d]),
            ("embeddings.LayerNorm.weight".into(), vec![d]),
            ("embeddings.LayerNorm.bias".into(), vec![d]),
        ];
        for l in 0..cfg.num_hidden_layers {
            for (n, o, inp) in [
                (LINEAR_NAMES[0], d, d),
                (LINEAR_NAMES[1], d, d),
                (LINEAR_NAMES[2], d, d),
                (LINEAR_NAMES[3], d, d),
                (LINEAR_NAMES[4], i, d),
                (LINEAR_NAMES[5], d, i),
            ] {
                names.push((format!("encoder.layer.{l}.{n}.weight"), vec![o, inp]));
                names.push((format!("encoder.layer.{l}.{n}.bias"), vec![o]));
            }
            for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
                names.push((format!("encoder.layer.{l}.{n}.weight"), vec![d]));
                names.push((format!("encoder.layer.{l}.{n}.bias"), vec![d]));
            }
        }
        let mut tf = TensorFile::random(names, &mut rng, |n| n.contains("LayerNorm.weight"));
        Self::from_tensors(cfg, &mut tf)
    }

    /// All weights as `BertModel` safetensors keys (for saving a pre-trained encoder as a Hugging Face folder).
    pub fn state_dict(&self) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let mut m = std::collections::BTreeMap::new();
        let mut put = |k: String, p: &Param| {
            m.insert(k, (p.shape.clone(), p.data.clone()));
        };
        let e = &self.emb;
        put("embeddings.word_embeddings.weight".into(), &e.word);
        put("embeddings.position_embeddings.weight".into(), &e.pos);
        put("embeddings.token_type_embeddings.weight".into(), &e.typ);
        put("embeddings.LayerNorm.weight".into(), &e.ln_g);
        put("embeddings.LayerNorm.bias".into(), &e.ln_b);
        for (l, layer) in self.layers.iter().enumerate() {
            for (n, lin) in LINEAR_NAMES.iter().zip(layer.linears()) {
                put(format!("encoder.layer.{l}.{n}.weight"), &lin.w);
                if let Some(b) = &lin.bias {
                    put(format!("encoder.layer.{l}.{n}.bias"), b);
                }
            }
            put(format!("encoder.layer.{l}.attention.output.LayerNorm.weight"), &layer.ln1_g);
            put(format!("encoder.layer.{l}.attention.output.LayerNorm.bias"), &layer.ln1_b);
            put(format!("encoder.layer.{l}.output.LayerNorm.weight"), &layer.ln2_g);
            put(format!("encoder.layer.{l}.output.LayerNorm.bias"), &layer.ln2_b);
        }
        m
    }
}

impl crate::lora::host::LinearHost for Bert {
    fn linear_paths(&self) -> Vec<String> {
        Bert::linear_paths(self)
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        Bert::linear_mut(self, path)
    }
    fn describe(&self) -> String {
        format!("BERT encoder with {} layers", self.layers.len())
    }
}

impl HfModel for Bert {
    type Config = BertConfig;
    fn config(v: &serde_json::Value) -> Result<BertConfig> {
        BertConfig::from_json(v)
    }
    fn from_tensors(cfg: BertConfig, tf: &mut TensorFile) -> Result<Self> {
        Bert::from_tensors(cfg, tf)
    }
    /// Everything under embeddings./encoder. (with or without `bert.`); the pooler and the pre-training / task
    /// heads are not part of the encoder.
    fn owns(k: &str) -> bool {
        let k = k.strip_prefix("bert.").unwrap_or(k);
        (k.starts_with("embeddings.") || k.starts_with("encoder.")) && k != "embeddings.position_ids"
    }
}

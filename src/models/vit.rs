//! Vision Transformer encoders — Hugging Face `ViTModel` and `Dinov2Model` — with explicit forward and backward.
//!
//! Loaded from an unmodified Hugging Face directory (`config.json` with `model_type` "vit" or "dinov2",
//! `model.safetensors` with or without the `vit.` / `dinov2.` key prefix). The image `[batch, C, H, W]` is cut
//! into `p×p` patches (the stride-`p` convolution of `patch_embeddings.projection` is one GEMM over the unfolded
//! patches), a CLS token is put in front, position embeddings are added (bicubically interpolated, as
//! transformers' `interpolate_pos_encoding`, when the image size differs from the pre-training size), then
//! pre-LayerNorm blocks (DINOv2: with layer scale) and a final LayerNorm give the last hidden state
//! `[batch, 1 + patches, hidden]`.
//!
//! Every linear layer is a [`BankLinear`]. Canonical module paths are the checkpoint's (classic) names,
//! `encoder.layer.N.attention.attention.query`, …; adapters made under transformers 5 key the runtime names
//! (`layers.N.attention.q_proj` for ViT, `encoder.layer.N.attention.q_proj` for DINOv2) and are mapped onto
//! the canonical paths by [`LinearHost::resolve`].

use super::hf::{HfDir, HfModel};
use crate::engine::attention::{attention_backward, attention_forward, AttnSpec};
use crate::engine::kernels::{
    gelu_backward_inplace, gelu_forward, layernorm_backward, layernorm_forward, pool_forward, Gelu, Pooling,
};
use crate::engine::param::Param;
use crate::engine::weights::TensorFile;
use crate::lora::bank::BankLinear;
use crate::lora::host::LinearHost;
use anyhow::{anyhow, bail, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::path::Path;

/// Which Hugging Face architecture the weights follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VitKind {
    /// `ViTModel`: pre-LN blocks, `intermediate.dense` / `output.dense` MLP.
    Vit,
    /// `Dinov2Model`: pre-LN blocks with layer scale, `mlp.fc1` / `mlp.fc2` MLP.
    Dinov2,
}

/// The fields of a ViT / DINOv2 `config.json` that loracomp uses.
#[derive(Clone, Debug, PartialEq)]
pub struct VitConfig {
    pub kind: VitKind,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// Pre-training image size `(height, width)`; the position table has one entry per patch of it.
    pub image_size: (usize, usize),
    pub patch_size: usize,
    pub num_channels: usize,
    pub qkv_bias: bool,
}

fn size_pair(v: &Value) -> Option<(usize, usize)> {
    if let Some(n) = v.as_u64() {
        return Some((n as usize, n as usize));
    }
    let a = v.as_array()?;
    match a.as_slice() {
        [h, w] => Some((h.as_u64()? as usize, w.as_u64()? as usize)),
        _ => None,
    }
}

impl VitConfig {
    /// Parse the fields of a config object (defaults as transformers' `ViTConfig` / `Dinov2Config`).
    pub fn from_json(v: &Value) -> Result<Self> {
        let kind = match v.get("model_type").and_then(|t| t.as_str()) {
            Some("vit") => VitKind::Vit,
            Some("dinov2") => VitKind::Dinov2,
            Some(other) => bail!("key 'model_type': '{other}' is not a ViT (supported: vit, dinov2)"),
            None => bail!("key 'model_type' is missing (expected vit or dinov2)"),
        };
        let usize_key = |k: &str, default: usize| -> Result<usize> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => {
                    let n = x.as_u64().ok_or_else(|| anyhow!("key '{k}' must be a non-negative integer"))?;
                    if n == 0 {
                        bail!("key '{k}' must be positive");
                    }
                    Ok(n as usize)
                }
            }
        };
        let dino = kind == VitKind::Dinov2;
        let hidden_size = usize_key("hidden_size", 768)?;
        let intermediate_size = if dino {
            if v.get("use_swiglu_ffn").and_then(|b| b.as_bool()).unwrap_or(false) {
                bail!("key 'use_swiglu_ffn': the SwiGLU MLP is not supported (only the GELU MLP)");
            }
            let r = match v.get("mlp_ratio") {
                None | Some(Value::Null) => 4.0,
                Some(x) => x.as_f64().ok_or_else(|| anyhow!("key 'mlp_ratio' must be a number"))?,
            };
            if !(r > 0.0 && r.is_finite()) {
                bail!("key 'mlp_ratio' must be positive");
            }
            (hidden_size as f64 * r) as usize
        } else {
            usize_key("intermediate_size", 3072)?
        };
        let image_size = match v.get("image_size") {
            None | Some(Value::Null) => {
                if dino {
                    (518, 518)
                } else {
                    (224, 224)
                }
            }
            Some(x) => size_pair(x).ok_or_else(|| anyhow!("key 'image_size' must be an integer or [height, width]"))?,
        };
        let patch_size = match v.get("patch_size") {
            None | Some(Value::Null) => {
                if dino {
                    14
                } else {
                    16
                }
            }
            Some(x) => match size_pair(x) {
                Some((a, b)) if a == b => a,
                Some(_) => bail!("key 'patch_size': non-square patches are not supported"),
                None => bail!("key 'patch_size' must be an integer"),
            },
        };
        let layer_norm_eps = match v.get("layer_norm_eps") {
            None | Some(Value::Null) => {
                if dino {
                    1e-6
                } else {
                    1e-12
                }
            }
            Some(x) => x.as_f64().ok_or_else(|| anyhow!("key 'layer_norm_eps' must be a number"))?,
        };
        let cfg = VitConfig {
            kind,
            hidden_size,
            num_hidden_layers: usize_key("num_hidden_layers", 12)?,
            num_attention_heads: usize_key("num_attention_heads", 12)?,
            intermediate_size,
            hidden_act: match v.get("hidden_act") {
                None | Some(Value::Null) => "gelu".into(),
                Some(x) => x.as_str().ok_or_else(|| anyhow!("key 'hidden_act' must be a string"))?.to_string(),
            },
            layer_norm_eps,
            image_size,
            patch_size,
            num_channels: usize_key("num_channels", 3)?,
            qkv_bias: v.get("qkv_bias").and_then(|b| b.as_bool()).unwrap_or(true),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        for (k, n) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("patch_size", self.patch_size),
            ("num_channels", self.num_channels),
        ] {
            if n == 0 {
                bail!("key '{k}' must be positive");
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            bail!(
                "key 'num_attention_heads': {} does not divide hidden_size {}",
                self.num_attention_heads,
                self.hidden_size
            );
        }
        let (h, w) = self.image_size;
        if h < self.patch_size || w < self.patch_size {
            bail!("key 'image_size': {h}x{w} is smaller than one patch ({})", self.patch_size);
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            bail!("key 'layer_norm_eps' must be a positive number");
        }
        self.gelu()?;
        Ok(())
    }

    pub fn gelu(&self) -> Result<Gelu> {
        match self.hidden_act.as_str() {
            "gelu" | "gelu_python" => Ok(Gelu::Erf),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Gelu::Tanh),
            other => bail!(
                "key 'hidden_act': unknown activation '{other}' (supported: gelu, gelu_python, gelu_new, gelu_pytorch_tanh, gelu_fast)"
            ),
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side of the pre-training image, `(rows, cols)`.
    pub fn grid(&self) -> (usize, usize) {
        (self.image_size.0 / self.patch_size, self.image_size.1 / self.patch_size)
    }
}

/// A batch of images `[batch, channels, height, width]`, row-major (transformers' `pixel_values`).
#[derive(Clone, Debug, Default)]
pub struct Pixels {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// One pre-LN block.
#[derive(Clone, Debug)]
pub struct VitLayer {
    pub ln1_g: Param,
    pub ln1_b: Param,
    pub query: BankLinear,
    pub key: BankLinear,
    pub value: BankLinear,
    pub attn_out: BankLinear,
    /// DINOv2 `layer_scale1.lambda1`.
    pub ls1: Option<Param>,
    pub ln2_g: Param,
    pub ln2_b: Param,
    pub fc1: BankLinear,
    pub fc2: BankLinear,
    /// DINOv2 `layer_scale2.lambda1`.
    pub ls2: Option<Param>,
}

impl VitLayer {
    pub fn linears_mut(&mut self) -> [&mut BankLinear; 6] {
        [&mut self.query, &mut self.key, &mut self.value, &mut self.attn_out, &mut self.fc1, &mut self.fc2]
    }
    pub fn linears(&self) -> [&BankLinear; 6] {
        [&self.query, &self.key, &self.value, &self.attn_out, &self.fc1, &self.fc2]
    }
    fn has_trainable(&mut self) -> bool {
        [&self.ln1_g, &self.ln1_b, &self.ln2_g, &self.ln2_b].iter().any(|p| p.trainable())
            || self.ls1.as_ref().is_some_and(|p| p.trainable())
            || self.ls2.as_ref().is_some_and(|p| p.trainable())
            || self.linears_mut().into_iter().any(|l| !l.trainable_params_mut().is_empty())
    }
}

/// Classic (checkpoint) names of a layer's six linears, in [`VitLayer::linears`] order.
pub fn classic_names(kind: VitKind) -> [&'static str; 6] {
    match kind {
        VitKind::Vit => [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ],
        VitKind::Dinov2 => [
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
            "mlp.fc1",
            "mlp.fc2",
        ],
    }
}

/// transformers-5 runtime names of a layer's six linears (both architectures).
pub const RUNTIME_NAMES: [&str; 6] =
    ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"];

fn layernorm_names(kind: VitKind) -> [&'static str; 2] {
    match kind {
        VitKind::Vit => ["layernorm_before", "layernorm_after"],
        VitKind::Dinov2 => ["norm1", "norm2"],
    }
}

#[derive(Clone, Debug, Default)]
struct LayerCache {
    n1: Vec<f32>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    ctx: Vec<f32>,
    /// Attention output projection (before layer scale).
    a: Vec<f32>,
    /// Residual stream after attention.
    h: Vec<f32>,
    n2: Vec<f32>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    ipre: Vec<f32>,
    g: Vec<f32>,
    /// MLP output (before layer scale).
    m: Vec<f32>,
}

#[derive(Clone, Debug, Default)]
struct Workspace {
    batch: usize,
    seq: usize,
    hw: (usize, usize),
    /// Unfolded patches `[batch·patches, C·p·p]`.
    unfolded: Vec<f32>,
    patch_out: Vec<f32>,
    /// Position embeddings for the current grid `[seq, d]` (interpolated when needed).
    pos: Vec<f32>,
    pos_grid: (usize, usize),
    /// `hs[0]` embeddings, `hs[l + 1]` output of layer `l` (before the final LayerNorm).
    hs: Vec<Vec<f32>>,
    caches: Vec<LayerCache>,
    last: Vec<f32>,
    fmean: Vec<f32>,
    frstd: Vec<f32>,
    dh: Vec<f32>,
    dbig: Vec<f32>,
    dsmall: Vec<f32>,
    dn: Vec<f32>,
    dctx: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dpatch: Vec<f32>,
    dunfolded: Vec<f32>,
    dpixels: Vec<f32>,
}

fn sized(v: &mut Vec<f32>, n: usize) -> &mut Vec<f32> {
    v.resize(n, 0.0);
    v
}

/// A ViT or DINOv2 encoder.
#[derive(Clone, Debug)]
pub struct Vit {
    pub cfg: VitConfig,
    pub gelu: Gelu,
    /// `patch_embeddings.projection` as a linear over unfolded patches: W `[hidden, C·p·p]`, bias `[hidden]`.
    pub patch: BankLinear,
    /// `[hidden]`.
    pub cls: Param,
    /// `[1 + grid_h·grid_w, hidden]`.
    pub pos: Param,
    pub layers: Vec<VitLayer>,
    pub ln_g: Param,
    pub ln_b: Param,
    ws: Workspace,
}

/// Bicubic weights of PyTorch's `upsample_bicubic2d` (A = −0.75) for fractional offset `t`.
fn cubic_weights(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t)]
}

/// For each output index, the four clamped source indices and their weights (align_corners = false, output
/// size given, so the scale is `in / out`).
fn cubic_taps(n_in: usize, n_out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let real = scale * (o as f32 + 0.5) - 0.5;
            let i0 = real.floor();
            let t = real - i0;
            let i0 = i0 as isize;
            let idx = [-1isize, 0, 1, 2].map(|k| (i0 + k).clamp(0, n_in as isize - 1) as usize);
            (idx, cubic_weights(t))
        })
        .collect()
}

/// Resize a `[gh, gw, d]` grid of vectors to `[oh, ow, d]` bicubically, as `torch.nn.functional.interpolate(
/// mode="bicubic", align_corners=False, size=(oh, ow))` on the `[d, gh, gw]` image.
pub fn bicubic_resize(src: &[f32], gh: usize, gw: usize, d: usize, oh: usize, ow: usize) -> Vec<f32> {
    let ty = cubic_taps(gh, oh);
    let tx = cubic_taps(gw, ow);
    let mut out = vec![0.0f32; oh * ow * d];
    out.par_chunks_mut(ow * d).enumerate().for_each(|(y, row)| {
        let (iy, wy) = ty[y];
        for (x, o) in row.chunks_mut(d).enumerate() {
            let (ix, wx) = tx[x];
            for c in 0..d {
                let mut acc = 0.0f32;
                for a in 0..4 {
                    let r = iy[a] * gw;
                    let v = wx[0] * src[(r + ix[0]) * d + c]
                        + wx[1] * src[(r + ix[1]) * d + c]
                        + wx[2] * src[(r + ix[2]) * d + c]
                        + wx[3] * src[(r + ix[3]) * d + c];
                    acc += wy[a] * v;
                }
                o[c] = acc;
            }
        }
    });
    out
}

impl Vit {
    /// Load `dir/config.json` and `dir/model.safetensors`.
    pub fn load(dir: &Path) -> Result<Self> {
        HfDir::open(dir)?.load()
    }

    /// Build from a config and a tensor file keyed as `ViTModel` / `Dinov2Model` (classic checkpoint names),
    /// optionally prefixed by `vit.` / `dinov2.` (as in the `…ForImageClassification` checkpoints).
    pub fn from_tensors(cfg: VitConfig, tf: &mut TensorFile) -> Result<Self> {
        let gelu = cfg.gelu()?;
        let head = match cfg.kind {
            VitKind::Vit => "vit.",
            VitKind::Dinov2 => "dinov2.",
        };
        let prefix = if tf.contains(&format!("{head}embeddings.cls_token")) { head } else { "" };
        let (d, inter, c, ps) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size);
        let (gh, gw) = cfg.grid();
        let mut p = |key: &str, shape: &[usize]| -> Result<Param> {
            Ok(Param::new(shape.to_vec(), tf.take(&format!("{prefix}{key}"), shape)?))
        };
        let pw = p("embeddings.patch_embeddings.projection.weight", &[d, c, ps, ps])?;
        let pb = p("embeddings.patch_embeddings.projection.bias", &[d])?;
        let patch = BankLinear::new(Param::new(vec![d, c * ps * ps], pw.data), Some(pb));
        let mut cls = p("embeddings.cls_token", &[1, 1, d])?;
        cls.shape = vec![d];
        let mut pos = p("embeddings.position_embeddings", &[1, 1 + gh * gw, d])?;
        pos.shape = vec![1 + gh * gw, d];
        let names = classic_names(cfg.kind);
        let [lnb, lna] = layernorm_names(cfg.kind);
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("encoder.layer.{l}");
            let mut lin = |name: &str, o: usize, i: usize, bias: bool| -> Result<BankLinear> {
                let w = p(&format!("{pre}.{name}.weight"), &[o, i])?;
                let b = if bias { Some(p(&format!("{pre}.{name}.bias"), &[o])?) } else { None };
                Ok(BankLinear::new(w, b))
            };
            let query = lin(names[0], d, d, cfg.qkv_bias)?;
            let key = lin(names[1], d, d, cfg.qkv_bias)?;
            let value = lin(names[2], d, d, cfg.qkv_bias)?;
            let attn_out = lin(names[3], d, d, true)?;
            let fc1 = lin(names[4], inter, d, true)?;
            let fc2 = lin(names[5], d, inter, true)?;
            let (ls1, ls2) = if cfg.kind == VitKind::Dinov2 {
                (
                    Some(p(&format!("{pre}.layer_scale1.lambda1"), &[d])?),
                    Some(p(&format!("{pre}.layer_scale2.lambda1"), &[d])?),
                )
            } else {
                (None, None)
            };
            layers.push(VitLayer {
                ln1_g: p(&format!("{pre}.{lnb}.weight"), &[d])?,
                ln1_b: p(&format!("{pre}.{lnb}.bias"), &[d])?,
                query,
                key,
                value,
                attn_out,
                ls1,
                ln2_g: p(&format!("{pre}.{lna}.weight"), &[d])?,
                ln2_b: p(&format!("{pre}.{lna}.bias"), &[d])?,
                fc1,
                fc2,
                ls2,
            });
        }
        let ln_g = p("layernorm.weight", &[d])?;
        let ln_b = p("layernorm.bias", &[d])?;
        Ok(Vit { cfg, gelu, patch, cls, pos, layers, ln_g, ln_b, ws: Workspace::default() })
    }

    pub fn hidden(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Whether the patch projection, CLS token or position table has a trainable parameter.
    fn embeddings_trainable(&mut self) -> bool {
        self.cls.trainable() || self.pos.trainable() || !self.patch.trainable_params_mut().is_empty()
    }

    /// Make every weight trainable (full fine-tuning, pre-training) or frozen.
    pub fn set_all_trainable(&mut self, on: bool) {
        let mut ps: Vec<&mut Param> = vec![&mut self.cls, &mut self.pos, &mut self.ln_g, &mut self.ln_b];
        ps.push(&mut self.patch.w);
        ps.extend(self.patch.bias.as_mut());
        for layer in &mut self.layers {
            let VitLayer { ln1_g, ln1_b, query, key, value, attn_out, ls1, ln2_g, ln2_b, fc1, fc2, ls2 } = layer;
            ps.extend([ln1_g, ln1_b, ln2_g, ln2_b]);
            ps.extend(ls1.as_mut());
            ps.extend(ls2.as_mut());
            for lin in [query, key, value, attn_out, fc1, fc2] {
                ps.push(&mut lin.w);
                ps.extend(lin.bias.as_mut());
            }
        }
        for p in ps {
            p.set_trainable(on);
        }
    }

    /// The input of layer `l`'s attention projections (after its first LayerNorm) in the most recent forward
    /// pass, `[batch·seq, hidden]`.
    pub fn layer_input(&self, l: usize) -> &[f32] {
        &self.ws.caches[l].n1
    }

    /// Every tensor's classic checkpoint key and shape (without the `vit.` / `dinov2.` prefix).
    fn tensor_shapes(cfg: &VitConfig) -> Vec<(String, Vec<usize>)> {
        let (d, inter, c, ps) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_channels, cfg.patch_size);
        let (gh, gw) = cfg.grid();
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.cls_token".into(), vec![1, 1, d]),
            ("embeddings.position_embeddings".into(), vec![1, 1 + gh * gw, d]),
            ("embeddings.patch_embeddings.projection.weight".into(), vec![d, c, ps, ps]),
            ("embeddings.patch_embeddings.projection.bias".into(), vec![d]),
        ];
        let names = classic_names(cfg.kind);
        let [lnb, lna] = layernorm_names(cfg.kind);
        for l in 0..cfg.num_hidden_layers {
            let pre = format!("encoder.layer.{l}");
            let dims = [(d, d), (d, d), (d, d), (d, d), (inter, d), (d, inter)];
            for (k, (name, (o, i))) in names.iter().zip(dims).enumerate() {
                v.push((format!("{pre}.{name}.weight"), vec![o, i]));
                if k >= 3 || cfg.qkv_bias {
                    v.push((format!("{pre}.{name}.bias"), vec![o]));
                }
            }
            for n in [lnb, lna] {
                v.push((format!("{pre}.{n}.weight"), vec![d]));
                v.push((format!("{pre}.{n}.bias"), vec![d]));
            }
            if cfg.kind == VitKind::Dinov2 {
                v.push((format!("{pre}.layer_scale1.lambda1"), vec![d]));
                v.push((format!("{pre}.layer_scale2.lambda1"), vec![d]));
            }
        }
        v.push(("layernorm.weight".into(), vec![d]));
        v.push(("layernorm.bias".into(), vec![d]));
        v
    }

    /// A randomly initialised encoder as transformers initialises a `ViTModel` (normal(0, 0.02) weights, CLS
    /// token and position table, zero biases, unit LayerNorms and layer scales), from a seeded generator. The
    /// start of `loracomp pretrain`.
    pub fn random(cfg: VitConfig, seed: u64) -> Result<Self> {
        use rand::SeedableRng;
        cfg.validate()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let unit = |n: &str| n.ends_with("lambda1") || (n.ends_with(".weight") && n.contains("norm"));
        let mut tf = TensorFile::random(Self::tensor_shapes(&cfg), &mut rng, unit);
        Self::from_tensors(cfg, &mut tf)
    }

    /// Every weight under its classic `ViTModel` / `Dinov2Model` safetensors key and shape.
    pub fn state_dict(&self) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let mut values: Vec<&[f32]> = vec![&self.cls.data, &self.pos.data, &self.patch.w.data];
        values.extend(self.patch.bias.as_ref().map(|b| &b.data[..]));
        for layer in &self.layers {
            for lin in layer.linears() {
                values.push(&lin.w.data);
                values.extend(lin.bias.as_ref().map(|b| &b.data[..]));
            }
            values.extend([&layer.ln1_g.data[..], &layer.ln1_b.data, &layer.ln2_g.data, &layer.ln2_b.data]);
            values.extend(layer.ls1.as_ref().map(|p| &p.data[..]));
            values.extend(layer.ls2.as_ref().map(|p| &p.data[..]));
        }
        values.extend([&self.ln_g.data[..], &self.ln_b.data]);
        let shapes = Self::tensor_shapes(&self.cfg);
        assert_eq!(shapes.len(), values.len(), "tensor_shapes and state_dict list the same tensors");
        shapes.into_iter().zip(values).map(|((n, s), v)| (n, (s, v.to_vec()))).collect()
    }

    /// `config.json` of this model as transformers writes a `ViTModel`'s (ViT only).
    pub fn config_json(&self) -> Value {
        let c = &self.cfg;
        serde_json::json!({
            "architectures": ["ViTModel"],
            "model_type": "vit",
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "layer_norm_eps": c.layer_norm_eps,
            "image_size": if c.image_size.0 == c.image_size.1 { serde_json::json!(c.image_size.0) } else { serde_json::json!([c.image_size.0, c.image_size.1]) },
            "patch_size": c.patch_size,
            "num_channels": c.num_channels,
            "qkv_bias": c.qkv_bias,
            "encoder_stride": c.patch_size,
        })
    }

    /// Every linear module's canonical (classic checkpoint) path, in layer order.
    pub fn linear_paths(&self) -> Vec<String> {
        let names = classic_names(self.cfg.kind);
        (0..self.layers.len()).flat_map(|l| names.iter().map(move |n| format!("encoder.layer.{l}.{n}"))).collect()
    }

    /// The linear module at a canonical path.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        let (l, pos) = self.locate(path)?;
        self.layers.get_mut(l).map(|layer| layer.linears_mut().into_iter().nth(pos).unwrap())
    }

    /// `(layer, index in [`VitLayer::linears`])` of a canonical path.
    fn locate(&self, path: &str) -> Option<(usize, usize)> {
        let rest = path.strip_prefix("encoder.layer.")?;
        let (idx, name) = rest.split_once('.')?;
        let l: usize = idx.parse().ok()?;
        let pos = classic_names(self.cfg.kind).iter().position(|n| *n == name)?;
        (l < self.layers.len()).then_some((l, pos))
    }

    /// Map an adapter's module path onto a canonical path: classic names (`encoder.layer.N.attention.attention.
    /// query`), transformers-5 runtime names (`layers.N.attention.q_proj` for ViT, `encoder.layer.N.attention.
    /// q_proj` for DINOv2), each with or without the `vit.` / `dinov2.` prefix of the classification models.
    pub fn resolve_path(&self, module: &str) -> Option<String> {
        let m = module.strip_prefix("vit.").or_else(|| module.strip_prefix("dinov2.")).unwrap_or(module);
        let (l, name) = if let Some(rest) = m.strip_prefix("encoder.layer.") {
            rest.split_once('.')?
        } else if let Some(rest) = m.strip_prefix("layers.") {
            rest.split_once('.')?
        } else {
            return None;
        };
        let idx: usize = l.parse().ok()?;
        if idx >= self.layers.len() || idx.to_string() != l {
            return None;
        }
        let l = idx;
        let classic = classic_names(self.cfg.kind);
        let pos = classic.iter().position(|n| *n == name).or_else(|| RUNTIME_NAMES.iter().position(|n| *n == name))?;
        Some(format!("encoder.layer.{l}.{}", classic[pos]))
    }

    /// Every trainable parameter with a stable name (LayerNorms, layer scales and the linears' own).
    pub fn trainable_params_mut(&mut self) -> Vec<(String, &mut Param)> {
        let names = classic_names(self.cfg.kind);
        let [lnb, lna] = layernorm_names(self.cfg.kind);
        let mut out: Vec<(String, &mut Param)> = Vec::new();
        for (suffix, p) in self.patch.trainable_params_mut() {
            out.push((format!("embeddings.patch_embeddings.projection.{suffix}"), p));
        }
        for (n, p) in [("embeddings.cls_token", &mut self.cls), ("embeddings.position_embeddings", &mut self.pos)] {
            if p.trainable() {
                out.push((n.to_string(), p));
            }
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let VitLayer { ln1_g, ln1_b, query, key, value, attn_out, ls1, ln2_g, ln2_b, fc1, fc2, ls2 } = layer;
            let mut ps: Vec<(String, &mut Param)> = vec![
                (format!("{lnb}.weight"), ln1_g),
                (format!("{lnb}.bias"), ln1_b),
                (format!("{lna}.weight"), ln2_g),
                (format!("{lna}.bias"), ln2_b),
            ];
            if let Some(p) = ls1.as_mut() {
                ps.push(("layer_scale1.lambda1".into(), p));
            }
            if let Some(p) = ls2.as_mut() {
                ps.push(("layer_scale2.lambda1".into(), p));
            }
            for (n, p) in ps {
                if p.trainable() {
                    out.push((format!("encoder.layer.{l}.{n}"), p));
                }
            }
            for (name, lin) in names.iter().zip([query, key, value, attn_out, fc1, fc2]) {
                for (suffix, p) in lin.trainable_params_mut() {
                    out.push((format!("encoder.layer.{l}.{name}.{suffix}"), p));
                }
            }
        }
        for (n, p) in [("layernorm.weight", &mut self.ln_g), ("layernorm.bias", &mut self.ln_b)] {
            if p.trainable() {
                out.push((n.to_string(), p));
            }
        }
        out
    }

    /// Check an image batch against the model: channels, and at least one patch per side.
    pub fn check_pixels(&self, px: &Pixels) -> Result<()> {
        if px.data.len() != px.batch * px.channels * px.height * px.width {
            bail!(
                "field 'pixel_values': {} values do not match [{}, {}, {}, {}]",
                px.data.len(),
                px.batch,
                px.channels,
                px.height,
                px.width
            );
        }
        if px.batch == 0 {
            bail!("field 'pixel_values': the batch is empty");
        }
        if px.channels != self.cfg.num_channels {
            bail!(
                "field 'pixel_values': {} channels, but the model's num_channels is {}",
                px.channels,
                self.cfg.num_channels
            );
        }
        let p = self.cfg.patch_size;
        if px.height < p || px.width < p {
            bail!("field 'pixel_values': image {}x{} is smaller than one {p}x{p} patch", px.height, px.width);
        }
        Ok(())
    }

    /// Position embeddings for a `gh × gw` patch grid, `[1 + gh·gw, d]`: the table itself for the pre-training
    /// grid, else its patch part resized bicubically (the CLS entry unchanged).
    pub fn position_embeddings(&self, gh: usize, gw: usize) -> Vec<f32> {
        let d = self.hidden();
        let (h0, w0) = self.cfg.grid();
        if (gh, gw) == (h0, w0) {
            return self.pos.data.clone();
        }
        let mut out = self.pos.data[..d].to_vec();
        out.extend(bicubic_resize(&self.pos.data[d..], h0, w0, d, gh, gw));
        out
    }

    /// Forward pass; returns the last hidden state `[batch·(1 + patches), hidden]`.
    pub fn forward(&mut self, px: &Pixels) -> Result<&[f32]> {
        self.check_pixels(px)?;
        let d = self.hidden();
        let (c, p) = (self.cfg.num_channels, self.cfg.patch_size);
        let (gh, gw) = (px.height / p, px.width / p);
        let np = gh * gw;
        let seq = 1 + np;
        let b = px.batch;
        let t = b * seq;
        let kp = c * p * p;
        let eps = self.cfg.layer_norm_eps as f32;
        let inter = self.cfg.intermediate_size;
        let nl = self.layers.len();
        // The table is cached per grid; a trainable one changes every step, so it is re-read every pass.
        if self.ws.pos_grid != (gh, gw) || self.ws.pos.len() != seq * d || self.pos.trainable() {
            self.ws.pos = self.position_embeddings(gh, gw);
            self.ws.pos_grid = (gh, gw);
        }
        let ws = &mut self.ws;
        ws.batch = b;
        ws.seq = seq;
        ws.hw = (px.height, px.width);
        ws.hs.resize(nl + 1, Vec::new());
        ws.caches.resize(nl, LayerCache::default());
        // Unfold: row (b, py, px) holds the patch's pixels in (channel, ky, kx) order, as the conv weight.
        let (hh, ww) = (px.height, px.width);
        sized(&mut ws.unfolded, b * np * kp).par_chunks_mut(kp).enumerate().for_each(|(r, row)| {
            let (bi, pi) = (r / np, r % np);
            let (py, pxx) = (pi / gw, pi % gw);
            for ch in 0..c {
                for ky in 0..p {
                    let src = ((bi * c + ch) * hh + py * p + ky) * ww + pxx * p;
                    row[(ch * p + ky) * p..(ch * p + ky + 1) * p].copy_from_slice(&px.data[src..src + p]);
                }
            }
        });
        self.patch.forward(&ws.unfolded, b * np, sized(&mut ws.patch_out, b * np * d));
        let (cls, pos, po) = (&self.cls.data, &ws.pos, &ws.patch_out);
        sized(&mut ws.hs[0], t * d).par_chunks_mut(d).enumerate().for_each(|(r, row)| {
            let (bi, s) = (r / seq, r % seq);
            let src = if s == 0 { &cls[..] } else { &po[(bi * np + s - 1) * d..(bi * np + s) * d] };
            for i in 0..d {
                row[i] = src[i] + pos[s * d + i];
            }
        });
        let sh = AttnSpec::new(b, seq, self.cfg.num_attention_heads, self.cfg.head_dim());
        let mask = vec![1.0f32; t];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let (before, after) = ws.hs.split_at_mut(l + 1);
            let x = &before[l];
            let cch = &mut ws.caches[l];
            sized(&mut cch.mean1, t);
            sized(&mut cch.rstd1, t);
            layernorm_forward(
                x,
                &layer.ln1_g.data,
                &layer.ln1_b.data,
                eps,
                d,
                sized(&mut cch.n1, t * d),
                &mut cch.mean1,
                &mut cch.rstd1,
            );
            layer.query.forward(&cch.n1, t, sized(&mut cch.q, t * d));
            layer.key.forward(&cch.n1, t, sized(&mut cch.k, t * d));
            layer.value.forward(&cch.n1, t, sized(&mut cch.v, t * d));
            sized(&mut cch.probs, sh.probs_len());
            attention_forward(sh, &cch.q, &cch.k, &cch.v, &mask, None, sized(&mut cch.ctx, t * d), &mut cch.probs);
            layer.attn_out.forward(&cch.ctx, t, sized(&mut cch.a, t * d));
            residual_scaled(x, &cch.a, layer.ls1.as_ref(), d, sized(&mut cch.h, t * d));
            sized(&mut cch.mean2, t);
            sized(&mut cch.rstd2, t);
            layernorm_forward(
                &cch.h,
                &layer.ln2_g.data,
                &layer.ln2_b.data,
                eps,
                d,
                sized(&mut cch.n2, t * d),
                &mut cch.mean2,
                &mut cch.rstd2,
            );
            layer.fc1.forward(&cch.n2, t, sized(&mut cch.ipre, t * inter));
            gelu_forward(self.gelu, &cch.ipre, sized(&mut cch.g, t * inter));
            layer.fc2.forward(&cch.g, t, sized(&mut cch.m, t * d));
            residual_scaled(&cch.h, &cch.m, layer.ls2.as_ref(), d, sized(&mut after[0], t * d));
        }
        sized(&mut ws.fmean, t);
        sized(&mut ws.frstd, t);
        layernorm_forward(
            &ws.hs[nl],
            &self.ln_g.data,
            &self.ln_b.data,
            eps,
            d,
            sized(&mut ws.last, t * d),
            &mut ws.fmean,
            &mut ws.frstd,
        );
        Ok(&self.ws.last)
    }

    /// `(batch, seq)` of the most recent forward pass.
    pub fn shape(&self) -> (usize, usize) {
        (self.ws.batch, self.ws.seq)
    }

    /// The last hidden state of the most recent forward pass, `[batch·seq, hidden]`.
    pub fn last_hidden(&self) -> &[f32] {
        &self.ws.last
    }

    /// Pool the last hidden state of the most recent forward pass: the CLS token, or the mean over all tokens.
    pub fn pooled(&self, mode: Pooling) -> Vec<f32> {
        let (b, s, d) = (self.ws.batch, self.ws.seq, self.hidden());
        let mut out = vec![0.0; b * d];
        pool_forward(mode, &self.ws.last, &vec![1.0; b * s], b, s, d, &mut out);
        out
    }

    /// Gradient of `pixel_values` from the last `backward(…, true)`, `[batch, C, H, W]`.
    pub fn pixel_grad(&self) -> &[f32] {
        &self.ws.dpixels
    }

    /// Backward from `d_last` (gradient of the last hidden state). Accumulates into trainable parameters only
    /// (frozen weights get none). With `input_grad` it runs down to the pixels ([`Vit::pixel_grad`]); without,
    /// it stops at the lowest layer that has trainable parameters, or runs into the embeddings when the patch
    /// projection, CLS token or position table is trainable (pre-training, full fine-tuning).
    pub fn backward(&mut self, d_last: &[f32], input_grad: bool) -> Result<()> {
        let d = self.hidden();
        let inter = self.cfg.intermediate_size;
        let (b, seq) = (self.ws.batch, self.ws.seq);
        let t = b * seq;
        let nl = self.layers.len();
        if d_last.len() != t * d || t == 0 {
            return Err(anyhow!("backward: gradient has {} values, expected {}", d_last.len(), t * d));
        }
        let emb_grad = self.embeddings_trainable();
        let first = if input_grad || emb_grad {
            0
        } else {
            match self.layers.iter_mut().position(|l| l.has_trainable()) {
                Some(f) => f,
                None if self.ln_g.trainable() || self.ln_b.trainable() => nl,
                None => return Ok(()),
            }
        };
        let sh = AttnSpec::new(b, seq, self.cfg.num_attention_heads, self.cfg.head_dim());
        let ws = &mut self.ws;
        // Final LayerNorm.
        let lp = if self.ln_g.trainable() {
            Some((self.ln_g.grad.as_mut_slice(), self.ln_b.grad.as_mut_slice()))
        } else {
            None
        };
        layernorm_backward(
            d_last,
            &ws.hs[nl],
            &ws.fmean,
            &ws.frstd,
            &self.ln_g.data,
            d,
            sized(&mut ws.dh, t * d),
            false,
            lp,
        );
        for l in (first..nl).rev() {
            let need_dx = l > first || input_grad || emb_grad;
            let VitLayer { ln1_g, ln1_b, query, key, value, attn_out, ls1, ln2_g, ln2_b, fc1, fc2, ls2 } =
                &mut self.layers[l];
            let c = &ws.caches[l];
            let x = &ws.hs[l];
            // y = h + ls2 ⊙ m. ws.dh holds dy; it becomes dh (the residual path) below.
            scale_grad(&ws.dh, &c.m, ls2.as_mut(), d, sized(&mut ws.dsmall, t * d));
            fc2.backward(&c.g, &ws.dsmall, t, Some(sized(&mut ws.dbig, t * inter)), false);
            gelu_backward_inplace(self.gelu, &c.ipre, &mut ws.dbig);
            fc1.backward(&c.n2, &ws.dbig, t, Some(sized(&mut ws.dn, t * d)), false);
            let lp =
                if ln2_g.trainable() { Some((ln2_g.grad.as_mut_slice(), ln2_b.grad.as_mut_slice())) } else { None };
            layernorm_backward(&ws.dn, &c.h, &c.mean2, &c.rstd2, &ln2_g.data, d, &mut ws.dh, true, lp);
            // h = x + ls1 ⊙ a.
            scale_grad(&ws.dh, &c.a, ls1.as_mut(), d, &mut ws.dsmall);
            attn_out.backward(&c.ctx, &ws.dsmall, t, Some(sized(&mut ws.dctx, t * d)), false);
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
            let lp =
                if ln1_g.trainable() { Some((ln1_g.grad.as_mut_slice(), ln1_b.grad.as_mut_slice())) } else { None };
            if need_dx || lp.is_some() {
                query.backward(&c.n1, &ws.dq, t, Some(&mut ws.dn), false);
                key.backward(&c.n1, &ws.dk, t, Some(&mut ws.dn), true);
                value.backward(&c.n1, &ws.dv, t, Some(&mut ws.dn), true);
                layernorm_backward(&ws.dn, x, &c.mean1, &c.rstd1, &ln1_g.data, d, &mut ws.dh, true, lp);
            } else {
                query.backward(&c.n1, &ws.dq, t, None, false);
                key.backward(&c.n1, &ws.dk, t, None, false);
                value.backward(&c.n1, &ws.dv, t, None, false);
            }
        }
        if !input_grad && !emb_grad {
            return Ok(());
        }
        // Embeddings: CLS and position rows take their gradient directly; the patch rows' gradient goes through
        // the projection and (with `input_grad`) is folded back onto the pixels.
        let (c, p) = (self.cfg.num_channels, self.cfg.patch_size);
        let (hh, ww) = ws.hw;
        let (gh, gw) = (hh / p, ww / p);
        let np = gh * gw;
        let kp = c * p * p;
        let dh = &ws.dh;
        if self.cls.trainable() {
            for bi in 0..b {
                let row = &dh[bi * seq * d..bi * seq * d + d];
                self.cls.grad.iter_mut().zip(row).for_each(|(g, v)| *g += v);
            }
        }
        if self.pos.trainable() {
            if (gh, gw) != self.cfg.grid() {
                bail!(
                    "position embeddings are trainable only at the pre-training image size {}x{} (got {hh}x{ww})",
                    self.cfg.image_size.0,
                    self.cfg.image_size.1
                );
            }
            for bi in 0..b {
                let rows = &dh[bi * seq * d..(bi + 1) * seq * d];
                self.pos.grad.iter_mut().zip(rows).for_each(|(g, v)| *g += v);
            }
        }
        if !input_grad && self.patch.trainable_params_mut().is_empty() {
            return Ok(());
        }
        sized(&mut ws.dpatch, b * np * d).par_chunks_mut(d).enumerate().for_each(|(r, row)| {
            let (bi, pi) = (r / np, r % np);
            let src = (bi * seq + 1 + pi) * d;
            row.copy_from_slice(&dh[src..src + d]);
        });
        if !input_grad {
            self.patch.backward(&ws.unfolded, &ws.dpatch, b * np, None, false);
            return Ok(());
        }
        self.patch.backward(&ws.unfolded, &ws.dpatch, b * np, Some(sized(&mut ws.dunfolded, b * np * kp)), false);
        let du = &ws.dunfolded;
        // Pixels outside whole patches (when H or W is not a multiple of p) get zero gradient.
        sized(&mut ws.dpixels, b * c * hh * ww).par_chunks_mut(hh * ww).enumerate().for_each(|(bc, img)| {
            let (bi, ch) = (bc / c, bc % c);
            img.fill(0.0);
            for pi in 0..np {
                let (py, pxx) = (pi / gw, pi % gw);
                let row = &du[(bi * np + pi) * kp..(bi * np + pi + 1) * kp];
                for ky in 0..p {
                    let dst = (py * p + ky) * ww + pxx * p;
                    img[dst..dst + p].copy_from_slice(&row[(ch * p + ky) * p..(ch * p + ky + 1) * p]);
                }
            }
        });
        Ok(())
    }
}

/// `out = x + s ⊙ a` per row (`s` the layer scale, or 1).
fn residual_scaled(x: &[f32], a: &[f32], s: Option<&Param>, d: usize, out: &mut [f32]) {
    out.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
        let (xr, ar) = (&x[r * d..(r + 1) * d], &a[r * d..(r + 1) * d]);
        match s {
            Some(s) => (0..d).for_each(|i| o[i] = xr[i] + s.data[i] * ar[i]),
            None => (0..d).for_each(|i| o[i] = xr[i] + ar[i]),
        }
    });
}

/// Backward of the scaled branch of [`residual_scaled`]: `da = s ⊙ dy`, and `ds += Σ_rows dy ⊙ a` when `s` is
/// trainable.
fn scale_grad(dy: &[f32], a: &[f32], s: Option<&mut Param>, d: usize, da: &mut [f32]) {
    match s {
        None => da.copy_from_slice(dy),
        Some(s) => {
            let sd = &s.data;
            da.par_chunks_mut(d).enumerate().for_each(|(r, o)| {
                let g = &dy[r * d..(r + 1) * d];
                (0..d).for_each(|i| o[i] = sd[i] * g[i]);
            });
            if s.trainable() {
                for (g, av) in dy.chunks(d).zip(a.chunks(d)) {
                    for i in 0..d {
                        s.grad[i] += g[i] * av[i];
                    }
                }
            }
        }
    }
}

impl LinearHost for Vit {
    fn linear_paths(&self) -> Vec<String> {
        Vit::linear_paths(self)
    }
    fn linear_mut(&mut self, path: &str) -> Option<&mut BankLinear> {
        Vit::linear_mut(self, path)
    }
    fn resolve(&self, module: &str) -> Option<String> {
        self.resolve_path(module)
    }
    fn describe(&self) -> String {
        let k = match self.cfg.kind {
            VitKind::Vit => "ViT",
            VitKind::Dinov2 => "DINOv2",
        };
        format!("{k} encoder with {} layers", self.layers.len())
    }
}

impl HfModel for Vit {
    type Config = VitConfig;
    fn config(v: &Value) -> Result<VitConfig> {
        VitConfig::from_json(v)
    }
    fn from_tensors(cfg: VitConfig, tf: &mut TensorFile) -> Result<Self> {
        Vit::from_tensors(cfg, tf)
    }
    /// The embeddings, encoder layers and final LayerNorm (with or without `vit.` / `dinov2.`). DINOv2's mask
    /// token is a pre-training input loracomp never feeds; pooler and classifier heads are outside the encoder.
    fn owns(k: &str) -> bool {
        let k = k.strip_prefix("vit.").or_else(|| k.strip_prefix("dinov2.")).unwrap_or(k);
        (k.starts_with("embeddings.") || k.starts_with("encoder.") || k.starts_with("layernorm."))
            && k != "embeddings.mask_token"
    }
}

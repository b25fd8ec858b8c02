//! Image preprocessing as a model's `preprocessor_config.json` describes it: resize, center crop, rescale,
//! normalise — the steps of transformers' `ViTImageProcessor` / `BitImageProcessor` (DINOv2).
//!
//! Resizing is antialiased separable resampling (bilinear: triangle filter; bicubic: cubic with a = −0.5),
//! the filter widened by the scale when shrinking — `torch.nn.functional.interpolate(..., antialias=True)`,
//! which transformers' torchvision backend calls. It runs in f32 on the `[C, H, W]` image; processors that
//! resize 8-bit images round back to integers after resizing, which this does not (a difference of at most
//! one grey level before rescaling).

use super::vit::Pixels;
use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde_json::Value;
use std::path::Path;

/// Resampling filter (PIL's numbering in `resample`: 2 bilinear, 3 bicubic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    Bilinear,
    Bicubic,
}

/// Target of the resize step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeTo {
    /// Exactly `height × width`.
    Exact(usize, usize),
    /// Shorter side to `n`, the longer side scaled to keep the aspect ratio (truncated, as transformers).
    ShortestEdge(usize),
}

/// The steps of `preprocessor_config.json` that loracomp applies.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessor {
    pub resize: Option<(ResizeTo, Resample)>,
    pub center_crop: Option<(usize, usize)>,
    pub rescale: Option<f32>,
    pub normalize: Option<(Vec<f32>, Vec<f32>)>,
}

fn size_of(v: &Value, key: &str) -> Result<ResizeTo> {
    if let Some(n) = v.as_u64() {
        return Ok(ResizeTo::Exact(n as usize, n as usize));
    }
    let h = v.get("height").and_then(|x| x.as_u64());
    let w = v.get("width").and_then(|x| x.as_u64());
    let s = v.get("shortest_edge").and_then(|x| x.as_u64());
    match (h, w, s) {
        (Some(h), Some(w), None) if h > 0 && w > 0 => Ok(ResizeTo::Exact(h as usize, w as usize)),
        (None, None, Some(s)) if s > 0 => Ok(ResizeTo::ShortestEdge(s as usize)),
        _ => bail!("key '{key}' must be {{\"height\", \"width\"}} or {{\"shortest_edge\"}} with positive integers"),
    }
}

fn floats3(v: &Value, key: &str) -> Result<Vec<f32>> {
    let a = v.as_array().ok_or_else(|| anyhow!("key '{key}' must be a list of numbers"))?;
    a.iter()
        .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| anyhow!("key '{key}' must be a list of numbers")))
        .collect()
}

impl Preprocessor {
    /// Read `path` (a `preprocessor_config.json`). Errors name the file and the key.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::ensure_regular(path)?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
        Self::from_json(&v).map_err(|e| anyhow!("{}: {e}", path.display()))
    }

    /// Parse a preprocessor config object. Missing flags default to off.
    pub fn from_json(v: &Value) -> Result<Self> {
        let flag = |k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(_) => bail!("key '{k}' must be true or false"),
            }
        };
        let need = |k: &str| v.get(k).filter(|x| !x.is_null()).ok_or_else(|| anyhow!("key '{k}' is missing"));
        let resize = if flag("do_resize")? {
            let to = size_of(need("size")?, "size")?;
            let rs = match v.get("resample").and_then(|x| x.as_u64()) {
                None | Some(2) => Resample::Bilinear,
                Some(3) => Resample::Bicubic,
                Some(other) => bail!("key 'resample': {other} is not supported (2 bilinear, 3 bicubic)"),
            };
            Some((to, rs))
        } else {
            None
        };
        let center_crop = if flag("do_center_crop")? {
            match size_of(need("crop_size")?, "crop_size")? {
                ResizeTo::Exact(h, w) => Some((h, w)),
                ResizeTo::ShortestEdge(_) => bail!("key 'crop_size' must give height and width"),
            }
        } else {
            None
        };
        let rescale = if flag("do_rescale")? {
            let f = need("rescale_factor")?.as_f64().ok_or_else(|| anyhow!("key 'rescale_factor' must be a number"))?;
            Some(f as f32)
        } else {
            None
        };
        let normalize = if flag("do_normalize")? {
            let mean = floats3(need("image_mean")?, "image_mean")?;
            let std = floats3(need("image_std")?, "image_std")?;
            if mean.len() != std.len() || mean.is_empty() {
                bail!("keys 'image_mean' and 'image_std' must have one entry per channel");
            }
            if std.iter().any(|s| s.is_nan() || *s <= 0.0) {
                bail!("key 'image_std' must be positive");
            }
            Some((mean, std))
        } else {
            None
        };
        Ok(Preprocessor { resize, center_crop, rescale, normalize })
    }

    /// Preprocess one `[C, H, W]` image (values as stored, e.g. 0–255) into model input `[C, H', W']`.
    pub fn apply(&self, img: &[f32], c: usize, h: usize, w: usize) -> Result<(usize, usize, Vec<f32>)> {
        if img.len() != c * h * w || c == 0 || h == 0 || w == 0 {
            bail!("image: {} values do not match [{c}, {h}, {w}]", img.len());
        }
        let (mut h, mut w, mut x) = (h, w, img.to_vec());
        if let Some((to, rs)) = self.resize {
            let (oh, ow) = match to {
                ResizeTo::Exact(a, b) => (a, b),
                ResizeTo::ShortestEdge(s) => {
                    if h <= w {
                        (s, (s as f64 * w as f64 / h as f64) as usize)
                    } else {
                        ((s as f64 * h as f64 / w as f64) as usize, s)
                    }
                }
            };
            let bytes = (c as u128).checked_mul(oh as u128).and_then(|n| n.checked_mul(ow as u128 * 8));
            crate::util::check_fits(bytes, &format!("image resize to {oh}x{ow} (preprocessor_config.json 'size')"))?;
            x = resize(&x, c, h, w, oh, ow, rs);
            (h, w) = (oh, ow);
        }
        if let Some((ch, cw)) = self.center_crop {
            if ch > h || cw > w {
                bail!("image: {h}x{w} is smaller than crop_size {ch}x{cw}");
            }
            // torchvision's center_crop: top = round((H - h) / 2) with Python's round (ties to even).
            let top = ((h - ch) as f64 / 2.0).round_ties_even() as usize;
            let left = ((w - cw) as f64 / 2.0).round_ties_even() as usize;
            let mut out = Vec::with_capacity(c * ch * cw);
            for k in 0..c {
                for y in top..top + ch {
                    out.extend_from_slice(&x[(k * h + y) * w + left..(k * h + y) * w + left + cw]);
                }
            }
            (x, h, w) = (out, ch, cw);
        }
        let scale = self.rescale.unwrap_or(1.0);
        if let Some((mean, std)) = &self.normalize {
            if mean.len() != c {
                bail!("image has {c} channels but image_mean / image_std have {}", mean.len());
            }
            x.par_chunks_mut(h * w).enumerate().for_each(|(k, plane)| {
                plane.iter_mut().for_each(|v| *v = (*v * scale - mean[k]) / std[k]);
            });
        } else if self.rescale.is_some() {
            x.iter_mut().for_each(|v| *v *= scale);
        }
        Ok((h, w, x))
    }

    /// Preprocess a batch of `[C, H, W]` images of one size into `pixel_values`.
    pub fn batch(&self, images: &[Vec<f32>], c: usize, h: usize, w: usize) -> Result<Pixels> {
        let mut data = Vec::new();
        let mut hw = (0, 0);
        for img in images {
            let (oh, ow, x) = self.apply(img, c, h, w)?;
            hw = (oh, ow);
            data.extend(x);
        }
        Ok(Pixels { batch: images.len(), channels: c, height: hw.0, width: hw.1, data })
    }
}

fn filter(rs: Resample, x: f32) -> f32 {
    let x = x.abs();
    match rs {
        Resample::Bilinear => (1.0 - x).max(0.0),
        Resample::Bicubic => {
            const A: f32 = -0.5;
            if x < 1.0 {
                ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
            } else {
                0.0
            }
        }
    }
}

/// For each output index along one axis: first source index and normalised weights (antialiased, as
/// PyTorch's `_upsample_*_aa` / PIL: the filter is stretched by the scale when downsampling).
fn aa_taps(n_in: usize, n_out: usize, rs: Resample) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f32 / n_out as f32;
    let support = match rs {
        Resample::Bilinear => 1.0,
        Resample::Bicubic => 2.0,
    } * scale.max(1.0);
    let inv = 1.0 / scale.max(1.0);
    (0..n_out)
        .map(|i| {
            let center = scale * (i as f32 + 0.5);
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut ws: Vec<f32> = (lo..hi).map(|j| filter(rs, (j as f32 - center + 0.5) * inv)).collect();
            let total: f32 = ws.iter().sum();
            if total != 0.0 {
                ws.iter_mut().for_each(|v| *v /= total);
            }
            (lo, ws)
        })
        .collect()
}

/// Resize a `[C, H, W]` image to `[C, oh, ow]`: horizontal pass, then vertical.
pub fn resize(x: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize, rs: Resample) -> Vec<f32> {
    let tx = aa_taps(w, ow, rs);
    let ty = aa_taps(h, oh, rs);
    let mut tmp = vec![0.0f32; c * h * ow];
    tmp.par_chunks_mut(ow).enumerate().for_each(|(r, out)| {
        let src = &x[r * w..(r + 1) * w];
        for (o, (lo, ws)) in out.iter_mut().zip(&tx) {
            *o = ws.iter().enumerate().map(|(k, wt)| wt * src[lo + k]).sum();
        }
    });
    let mut out = vec![0.0f32; c * oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(r, row)| {
        let (k, y) = (r / oh, r % oh);
        let (lo, ws) = &ty[y];
        row.fill(0.0);
        for (j, wt) in ws.iter().enumerate() {
            let src = &tmp[(k * h + lo + j) * ow..(k * h + lo + j + 1) * ow];
            row.iter_mut().zip(src).for_each(|(a, b)| *a += wt * b);
        }
    });
    out
}

//! `loracomp forward`: one forward pass of any supported architecture on inputs given as transformers'
//! forward arguments, for users checking loracomp against Python.
//!
//! The input file is one JSON object whose fields are named as transformers' `forward` arguments:
//! `input_ids` and `attention_mask` (`[batch][seq]` integers), `token_type_ids`, `pixel_values`
//! (`[batch][channels][height][width]` floats), `decoder_input_ids`. The output is the last hidden state for
//! encoders (BERT, ViT) and the logits for generative models, as `{"shape": [...], "data": [...]}` (row-major).

use crate::lora::bank::Composition;
use crate::lora::host::{attach_adapters, LinearHost};
use crate::lora::peft::{check_base, Adapter};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

/// A dense tensor as `forward` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct TensorOut {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The forward arguments read from the input file.
pub struct ForwardInput {
    pub path: std::path::PathBuf,
    pub fields: serde_json::Map<String, Value>,
}

impl ForwardInput {
    pub fn load(path: &Path) -> Result<Self> {
        crate::util::ensure_regular(path)?;
        let text = std::fs::read_to_string(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
        let Value::Object(fields) = v else {
            bail!("{}: expected one JSON object of forward arguments (input_ids, attention_mask, …)", path.display());
        };
        Ok(ForwardInput { path: path.to_path_buf(), fields })
    }

    pub fn has(&self, key: &str) -> bool {
        self.fields.get(key).is_some_and(|v| !v.is_null())
    }

    /// A `[batch][seq]` integer matrix, as (rows, cols, row-major data).
    pub fn ints2(&self, key: &str) -> Result<(usize, usize, Vec<i64>)> {
        let p = self.path.display();
        let v = self.fields.get(key).ok_or_else(|| anyhow!("{p}: field '{key}' is missing"))?;
        let rows = v.as_array().ok_or_else(|| anyhow!("{p}: field '{key}' must be a list of lists of integers"))?;
        if rows.is_empty() {
            bail!("{p}: field '{key}' is empty");
        }
        let mut out = Vec::new();
        let mut cols = None;
        for (i, r) in rows.iter().enumerate() {
            let r = r.as_array().ok_or_else(|| anyhow!("{p}: field '{key}'[{i}] must be a list of integers"))?;
            if *cols.get_or_insert(r.len()) != r.len() {
                bail!("{p}: field '{key}': row {i} has {} entries, row 0 has {}", r.len(), cols.unwrap());
            }
            for (j, x) in r.iter().enumerate() {
                out.push(x.as_i64().ok_or_else(|| anyhow!("{p}: field '{key}'[{i}][{j}] is not an integer"))?);
            }
        }
        let cols = cols.unwrap_or(0);
        if cols == 0 {
            bail!("{p}: field '{key}' has empty rows");
        }
        Ok((rows.len(), cols, out))
    }

    /// A float tensor of any rank, as (shape, row-major data).
    pub fn floats(&self, key: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let p = self.path.display();
        let v = self.fields.get(key).ok_or_else(|| anyhow!("{p}: field '{key}' is missing"))?;
        let mut shape = Vec::new();
        let mut cur = v;
        while let Value::Array(a) = cur {
            shape.push(a.len());
            match a.first() {
                Some(x) => cur = x,
                None => break,
            }
        }
        let mut data = Vec::new();
        fn walk(v: &Value, depth: usize, shape: &[usize], out: &mut Vec<f32>, key: &str, p: &str) -> Result<()> {
            if depth == shape.len() {
                let x = v.as_f64().ok_or_else(|| anyhow!("{p}: field '{key}' holds a non-number"))?;
                out.push(x as f32);
                return Ok(());
            }
            let a = v.as_array().ok_or_else(|| anyhow!("{p}: field '{key}' is ragged (not a rectangular tensor)"))?;
            if a.len() != shape[depth] {
                bail!(
                    "{p}: field '{key}' is ragged at depth {depth}: {} entries where {} expected",
                    a.len(),
                    shape[depth]
                );
            }
            a.iter().try_for_each(|x| walk(x, depth + 1, shape, out, key, p))
        }
        walk(v, 0, &shape, &mut data, key, &p.to_string())?;
        Ok((shape, data))
    }
}

/// Load each adapter, check it was made for this base (unless allowed), and put them all on `host` with weight 1
/// each (the sum of their ΔW, as PEFT computes with several adapters active).
pub fn attach_all(
    host: &mut dyn LinearHost,
    adapters: &[std::path::PathBuf],
    model_dir: &Path,
    allow: bool,
) -> Result<()> {
    if adapters.is_empty() {
        return Ok(());
    }
    let bank: Vec<Adapter> = adapters
        .iter()
        .map(|d| {
            let a = Adapter::load(d)?;
            check_base(&a, model_dir, allow)?;
            Ok(a)
        })
        .collect::<Result<_>>()?;
    attach_adapters(host, &bank, |_, n| Composition::Fixed(vec![1.0; n]))?;
    Ok(())
}

/// Refuse an output that holds NaN or Inf: finite weights (or adapters) that overflow f32 give one, and printing
/// it, or a metric or embedding computed from it, would be a result computed on NaN. `stage` names where it first
/// appeared when the model can tell (`layer 3 output`).
pub fn check_finite_output(data: &[f32], model_dir: &Path, what: &str, stage: Option<String>) -> Result<()> {
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        let at = stage.map(|s| format!(", first in the {s}")).unwrap_or_default();
        bail!(
            "{}: the model's {what} holds NaN/Inf ({} at index {i}{at}); do the weights overflow f32?",
            model_dir.display(),
            data[i]
        );
    }
    Ok(())
}

/// Rough size of one forward pass's activations (f32): per position and layer ~16 hidden-wide and 4 MLP-wide
/// buffers (inputs, outputs and caches), the attention scores (`heads · s²` per layer) and the logits.
#[allow(clippy::too_many_arguments)]
fn check_activations(
    inp: &ForwardInput,
    field: &str,
    b: usize,
    s: usize,
    (d, inter, heads, layers, vocab): (usize, usize, usize, usize, usize),
) -> Result<()> {
    let (b, s) = (b as u128, s as u128);
    let per_pos = (layers as u128) * (16 * d as u128 + 4 * inter as u128) + vocab as u128;
    let bytes = b
        .checked_mul(s)
        .and_then(|bs| bs.checked_mul(per_pos))
        .and_then(|x| x.checked_add(b.checked_mul(s)?.checked_mul(s)?.checked_mul(heads as u128 * layers as u128)?))
        .and_then(|x| x.checked_mul(4));
    crate::util::check_fits(
        bytes,
        &format!("{}: field '{field}': a forward pass of batch {b} × {s}", inp.path.display()),
    )
}

/// Run the forward pass the model directory's architecture defines.
pub fn run(model_dir: &Path, adapters: &[std::path::PathBuf], input: &Path, allow_mismatch: bool) -> Result<TensorOut> {
    let inp = ForwardInput::load(input)?;
    use super::kind::ModelKind;
    let hf = super::hf::HfDir::open(model_dir)?;
    match hf.kind {
        ModelKind::Bert => bert_forward(&hf, adapters, &inp, allow_mismatch),
        ModelKind::Llama => llama_forward(&hf, adapters, &inp, allow_mismatch),
        ModelKind::T5 => t5_forward(&hf, adapters, &inp, allow_mismatch),
        ModelKind::Vit | ModelKind::Dinov2 => vit_forward(&hf, adapters, &inp, allow_mismatch),
    }
}

fn bert_forward(
    hf: &super::hf::HfDir,
    adapters: &[std::path::PathBuf],
    inp: &ForwardInput,
    allow: bool,
) -> Result<TensorOut> {
    use super::bert::{Batch, Bert};
    let mut bert: Bert = hf.load()?;
    attach_all(&mut bert, adapters, &hf.dir, allow)?;
    let p = inp.path.display();
    let (b, s, ids) = inp.ints2("input_ids")?;
    let vocab = bert.cfg.vocab_size as i64;
    if let Some(x) = ids.iter().find(|&&x| x < 0 || x >= vocab) {
        bail!("{p}: field 'input_ids' holds {x}, outside the vocabulary [0, {vocab})");
    }
    if s > bert.cfg.max_position_embeddings {
        bail!("{p}: field 'input_ids' has {s} positions; the model has {}", bert.cfg.max_position_embeddings);
    }
    let mask = if inp.has("attention_mask") {
        let (mb, ms, m) = inp.ints2("attention_mask")?;
        if (mb, ms) != (b, s) {
            bail!("{p}: field 'attention_mask' is [{mb}, {ms}] but 'input_ids' is [{b}, {s}]");
        }
        m.iter().map(|&x| x as f32).collect()
    } else {
        vec![1.0; b * s]
    };
    let types = if inp.has("token_type_ids") {
        let (tb, ts, t) = inp.ints2("token_type_ids")?;
        if (tb, ts) != (b, s) {
            bail!("{p}: field 'token_type_ids' is [{tb}, {ts}] but 'input_ids' is [{b}, {s}]");
        }
        let tv = bert.cfg.type_vocab_size as i64;
        if let Some(x) = t.iter().find(|&&x| x < 0 || x >= tv) {
            bail!("{p}: field 'token_type_ids' holds {x}, outside [0, {tv})");
        }
        t.iter().map(|&x| x as u32).collect()
    } else {
        vec![0; b * s]
    };
    let c = &bert.cfg;
    let dims = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers, 0);
    check_activations(inp, "input_ids", b, s, dims)?;
    let batch = Batch { batch: b, seq: s, ids: ids.iter().map(|&x| x as u32).collect(), types, mask };
    let d = bert.hidden();
    let h = bert.forward(&batch)?.to_vec();
    check_finite_output(&h, &hf.dir, "last hidden state", bert.non_finite_stage())?;
    Ok(TensorOut { shape: vec![b, s, d], data: h })
}

/// Llama: logits `[batch, seq, vocab]` (positions `0..seq` in every row, as transformers without position_ids).
fn llama_forward(
    hf: &super::hf::HfDir,
    adapters: &[std::path::PathBuf],
    inp: &ForwardInput,
    allow: bool,
) -> Result<TensorOut> {
    use super::llama::{Llama, LmBatch};
    let mut model: Llama = hf.load()?;
    attach_all(&mut model, adapters, &hf.dir, allow)?;
    let p = inp.path.display();
    let (b, s, ids) = inp.ints2("input_ids")?;
    let vocab = model.vocab() as i64;
    if let Some(x) = ids.iter().find(|&&x| x < 0 || x >= vocab) {
        bail!("{p}: field 'input_ids' holds {x}, outside the vocabulary [0, {vocab})");
    }
    let mask = if inp.has("attention_mask") {
        let (mb, ms, m) = inp.ints2("attention_mask")?;
        if (mb, ms) != (b, s) {
            bail!("{p}: field 'attention_mask' is [{mb}, {ms}] but 'input_ids' is [{b}, {s}]");
        }
        if let Some(x) = m.iter().find(|&&x| x != 0 && x != 1) {
            bail!("{p}: field 'attention_mask' holds {x}; expected 0 or 1");
        }
        m.iter().map(|&x| x as f32).collect()
    } else {
        vec![1.0; b * s]
    };
    let c = &model.cfg;
    let dims = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers, c.vocab_size);
    check_activations(inp, "input_ids", b, s, dims)?;
    let batch = LmBatch { batch: b, seq: s, ids: ids.iter().map(|&x| x as u32).collect(), mask };
    let logits = model.forward(&batch)?.to_vec();
    check_finite_output(&logits, &hf.dir, "logits", None)?;
    Ok(TensorOut { shape: vec![b, s, vocab as usize], data: logits })
}

/// T5: logits `[batch, dec_seq, vocab]` from `input_ids`, `attention_mask` (optional), `decoder_input_ids` and
/// `decoder_attention_mask` (optional; the decoder is causal either way).
fn t5_forward(
    hf: &super::hf::HfDir,
    adapters: &[std::path::PathBuf],
    inp: &ForwardInput,
    allow: bool,
) -> Result<TensorOut> {
    use super::t5::{Seq2SeqBatch, T5};
    let mut model: T5 = hf.load()?;
    attach_all(&mut model, adapters, &hf.dir, allow)?;
    let p = inp.path.display();
    let vocab = model.vocab() as i64;
    let ids_field = |key: &str| -> Result<(usize, usize, Vec<u32>)> {
        let (b, s, ids) = inp.ints2(key)?;
        if let Some(x) = ids.iter().find(|&&x| x < 0 || x >= vocab) {
            bail!("{p}: field '{key}' holds {x}, outside the vocabulary [0, {vocab})");
        }
        Ok((b, s, ids.iter().map(|&x| x as u32).collect()))
    };
    let mask_field = |key: &str, b: usize, s: usize, of: &str| -> Result<Option<Vec<f32>>> {
        if !inp.has(key) {
            return Ok(None);
        }
        let (mb, ms, m) = inp.ints2(key)?;
        if (mb, ms) != (b, s) {
            bail!("{p}: field '{key}' is [{mb}, {ms}] but '{of}' is [{b}, {s}]");
        }
        if let Some(x) = m.iter().find(|&&x| x != 0 && x != 1) {
            bail!("{p}: field '{key}' holds {x}; a mask holds 0 or 1");
        }
        Ok(Some(m.iter().map(|&x| x as f32).collect()))
    };
    let (b, s, input_ids) = ids_field("input_ids")?;
    let (db, t, decoder_input_ids) = ids_field("decoder_input_ids")?;
    if db != b {
        bail!("{p}: field 'decoder_input_ids' has {db} rows but 'input_ids' has {b}");
    }
    let attention_mask = mask_field("attention_mask", b, s, "input_ids")?.unwrap_or_else(|| vec![1.0; b * s]);
    let decoder_attention_mask = mask_field("decoder_attention_mask", b, t, "decoder_input_ids")?;
    let c = &model.cfg;
    let dims =
        (c.d_model.max(c.num_heads * c.d_kv), c.d_ff, c.num_heads, c.num_layers + c.decoder_layers(), c.vocab_size);
    check_activations(inp, "input_ids + decoder_input_ids", b, s + t, dims)?;
    let batch = Seq2SeqBatch {
        batch: b,
        src_len: s,
        tgt_len: t,
        input_ids,
        attention_mask,
        decoder_input_ids,
        decoder_attention_mask,
    };
    let v = model.vocab();
    let logits = model.forward(&batch)?.to_vec();
    check_finite_output(&logits, &hf.dir, "logits", None)?;
    Ok(TensorOut { shape: vec![b, t, v], data: logits })
}

/// ViT / DINOv2: last hidden state `[batch, 1 + patches, hidden]` from `pixel_values`.
fn vit_forward(
    hf: &super::hf::HfDir,
    adapters: &[std::path::PathBuf],
    inp: &ForwardInput,
    allow: bool,
) -> Result<TensorOut> {
    use super::vit::Vit;
    let mut vit: Vit = hf.load()?;
    attach_all(&mut vit, adapters, &hf.dir, allow)?;
    let px = pixel_values(inp)?;
    vit.check_pixels(&px).map_err(|e| anyhow!("{}: {e}", inp.path.display()))?;
    let c = &vit.cfg;
    let seq = 1 + (px.height / c.patch_size) * (px.width / c.patch_size);
    let dims = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers, 0);
    check_activations(inp, "pixel_values", px.batch, seq, dims)?;
    let h = vit.forward(&px)?.to_vec();
    check_finite_output(&h, &hf.dir, "last hidden state", None)?;
    let (b, s) = vit.shape();
    Ok(TensorOut { shape: vec![b, s, vit.hidden()], data: h })
}

/// `pixel_values` as `[batch][channels][height][width]` floats.
pub fn pixel_values(inp: &ForwardInput) -> Result<super::vit::Pixels> {
    let (shape, data) = inp.floats("pixel_values")?;
    let [batch, channels, height, width] = shape[..] else {
        bail!(
            "{}: field 'pixel_values' has shape {shape:?}; expected [batch][channels][height][width]",
            inp.path.display()
        );
    };
    if data.is_empty() {
        bail!("{}: field 'pixel_values' is empty", inp.path.display());
    }
    Ok(super::vit::Pixels { batch, channels, height, width, data })
}

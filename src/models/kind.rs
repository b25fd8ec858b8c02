//! What kind of model a Hugging Face directory holds, read once from `config.json`'s `model_type`, and the
//! special-token ids transformers would use with it.
//!
//! Every command goes through [`ModelKind::of`] or [`super::hf::HfDir::open`]; nothing else parses `model_type`.

use anyhow::{anyhow, Context, Result};
use std::path::Path;

/// The architectures loracomp runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// BERT-style text encoder (`bert`, or no `model_type` as in old sentence-transformers folders).
    Bert,
    /// ViT image encoder.
    Vit,
    /// DINOv2 image encoder.
    Dinov2,
    /// T5 / Flan-T5 encoder–decoder (`T5ForConditionalGeneration`).
    T5,
    /// Llama-family decoder (`llama`, `mistral`): `LlamaForCausalLM`.
    Llama,
}

/// `model_type` values loracomp accepts, for error messages.
pub const SUPPORTED: &str = "bert, vit, dinov2, t5, llama, mistral";

impl ModelKind {
    /// The kind of `dir/config.json`. Errors name the file (missing directory, unreadable or invalid JSON,
    /// `model_type` not a string or not supported).
    pub fn of(dir: &Path) -> Result<Self> {
        Ok(super::hf::HfDir::open(dir)?.kind)
    }

    /// The kind a parsed `config.json` (at `p`, for errors) names.
    pub fn of_config(v: &serde_json::Value, p: &Path) -> Result<Self> {
        match v.get("model_type") {
            None => Ok(ModelKind::Bert),
            Some(t) => {
                let t = t.as_str().ok_or_else(|| anyhow!("{}: field 'model_type' is not a string", p.display()))?;
                Self::from_model_type(t).ok_or_else(|| {
                    anyhow!("{}: model_type '{t}' is not supported (supported: {SUPPORTED})", p.display())
                })
            }
        }
    }

    pub fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "bert" => ModelKind::Bert,
            "vit" => ModelKind::Vit,
            "dinov2" => ModelKind::Dinov2,
            "t5" => ModelKind::T5,
            "llama" | "mistral" => ModelKind::Llama,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Bert => "bert",
            ModelKind::Vit => "vit",
            ModelKind::Dinov2 => "dinov2",
            ModelKind::T5 => "t5",
            ModelKind::Llama => "llama",
        }
    }

    /// A generative model (T5, Llama): it classifies by ranking the label strings, with no classification head.
    pub fn is_generative(self) -> bool {
        matches!(self, ModelKind::T5 | ModelKind::Llama)
    }

    pub fn is_image(self) -> bool {
        matches!(self, ModelKind::Vit | ModelKind::Dinov2)
    }

    /// Pooling when none is asked for: CLS for ViT / DINOv2 (how ViTs are pre-trained, `loracomp pretrain`
    /// included), mean otherwise (sentence-transformers models; unused by generative models).
    pub fn default_pooling(self) -> crate::engine::kernels::Pooling {
        use crate::engine::kernels::Pooling;
        if self.is_image() {
            Pooling::Cls
        } else {
            Pooling::Mean
        }
    }

    /// The attention query and value projections, as PEFT's defaults name them for this architecture.
    pub fn default_targets(self) -> Vec<String> {
        let t: [&str; 2] = match self {
            ModelKind::Bert | ModelKind::Vit | ModelKind::Dinov2 => ["query", "value"],
            ModelKind::T5 => ["q", "v"],
            ModelKind::Llama => ["q_proj", "v_proj"],
        };
        t.iter().map(|s| s.to_string()).collect()
    }

    /// PEFT's `task_type` for adapters of this kind.
    pub fn peft_task_type(self) -> Option<&'static str> {
        match self {
            ModelKind::T5 => Some("SEQ_2_SEQ_LM"),
            ModelKind::Llama => Some("CAUSAL_LM"),
            _ => None,
        }
    }
}

pub(crate) fn read_json(p: &Path) -> Result<serde_json::Value> {
    crate::util::ensure_regular(p)?;
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow!("{}: invalid JSON: {e}", p.display()))
}

/// Special-token ids as transformers resolves them: `config.json`'s `*_token_id`, else the token string named in
/// `special_tokens_map.json` or `tokenizer_config.json` looked up in the tokenizer's vocabulary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialTokens {
    /// Read the ids for `dir`, whose `config.json` holds `cfg`; `lookup` maps a token string to its id (the
    /// tokenizer's vocabulary). Through [`super::hf::HfDir::special_tokens`].
    pub(crate) fn read(dir: &Path, cfg: &serde_json::Value, lookup: &dyn Fn(&str) -> Option<u32>) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let mut out = SpecialTokens::default();
        for (key, slot) in [("bos", &mut out.bos), ("eos", &mut out.eos), ("pad", &mut out.pad)] {
            let field = format!("{key}_token_id");
            match cfg.get(&field) {
                None | Some(serde_json::Value::Null) => {}
                // transformers allows a list of end ids (Llama 3); the first one ends an answer.
                Some(serde_json::Value::Array(a)) if !a.is_empty() => *slot = Some(id_of(&a[0], &cfg_path, &field)?),
                Some(v) => *slot = Some(id_of(v, &cfg_path, &field)?),
            }
        }
        for file in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(file);
            if !p.is_file() {
                continue;
            }
            let v = read_json(&p)?;
            for (key, slot) in [("bos", &mut out.bos), ("eos", &mut out.eos), ("pad", &mut out.pad)] {
                if slot.is_some() {
                    continue;
                }
                let field = format!("{key}_token");
                let tok = match v.get(&field) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                    _ => None,
                };
                if let Some(t) = tok {
                    *slot = Some(lookup(&t).ok_or_else(|| {
                        anyhow!("{}: field '{field}' is '{t}', which the tokenizer does not know", p.display())
                    })?);
                }
            }
        }
        Ok(out)
    }
}

fn id_of(v: &serde_json::Value, p: &Path, field: &str) -> Result<u32> {
    v.as_u64()
        .filter(|&n| n <= u32::MAX as u64)
        .map(|n| n as u32)
        .ok_or_else(|| anyhow!("{}: field '{field}' is not a token id", p.display()))
}

//! `config.json` of a Hugging Face BERT-family model.

use crate::engine::kernels::Gelu;
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use serde_json::Value;

/// The fields of a BERT `config.json` that loracomp uses. Unknown fields are ignored, as transformers does.
#[derive(Clone, Debug, Deserialize, serde::Serialize, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default = "default_types")]
    pub type_vocab_size: usize,
    #[serde(default)]
    pub pad_token_id: usize,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_types() -> usize {
    2
}

impl BertConfig {
    /// The fields of a parsed `config.json`, validated. Errors name the offending key.
    pub fn from_json(v: &Value) -> Result<Self> {
        let cfg = BertConfig::deserialize(v).map_err(|e| anyhow!("invalid model config: {e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.model_type {
            let ok = ["bert"];
            if !ok.contains(&t.as_str()) {
                bail!("key 'model_type': '{t}' is not supported here (supported: bert)");
            }
        }
        if let Some(p) = &self.position_embedding_type {
            if p != "absolute" {
                bail!("key 'position_embedding_type': '{p}' is not supported (only 'absolute')");
            }
        }
        for (k, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
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
        self.gelu()?;
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            bail!("key 'layer_norm_eps' must be a positive number");
        }
        Ok(())
    }

    /// The activation named by `hidden_act`.
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
}

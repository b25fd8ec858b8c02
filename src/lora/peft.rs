//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`, as Hugging Face PEFT
//! writes and reads them.
//!
//! Tensor keys are `base_model.model.<module path>.lora_A.weight` (`[r, in]`) and `….lora_B.weight`
//! (`[out, r]`). loracomp's classification model is a module with `bert` (a `BertModel`) and `classifier` (the
//! head), so paths read `bert.encoder.layer.N.attention.self.query`; adapters made on a bare `BertModel`
//! (`encoder.layer.N…`) are accepted too. The head is stored under modules_to_save keys
//! (`base_model.model.classifier.weight` / `.bias`, with `"modules_to_save": ["classifier"]`).

use crate::engine::weights::{write_safetensors, TensorFile};
use anyhow::{anyhow, bail, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Sidecar with what PEFT has no field for (label names, pooling, composition weights).
pub const LORACOMP_FILE: &str = "loracomp.json";

/// `target_modules`: a list of names (suffix match) or one regular expression (full match).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Targets {
    List(Vec<String>),
    Regex(String),
}

impl Targets {
    /// PEFT's rule (`check_target_module_exists`): a regex must match the whole module name; a list entry
    /// matches the name or its suffix after a dot. `"all-linear"` stands for every linear layer.
    pub fn matches(&self, module: &str) -> Result<bool> {
        Ok(match self {
            Targets::Regex(r) if r == "all-linear" => true,
            Targets::Regex(r) => {
                let re = Regex::new(&format!("^(?:{r})$")).map_err(|e| anyhow!("target_modules regex: {e}"))?;
                re.is_match(module)
            }
            Targets::List(l) => l.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
        })
    }
}

/// The fields of `adapter_config.json` that matter for LoRA; others are kept verbatim in `extra`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Option<Targets>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub rank_pattern: HashMap<String, usize>,
    #[serde(default)]
    pub alpha_pattern: HashMap<String, f64>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

fn bias_none() -> String {
    "none".into()
}

/// PEFT's pattern lookup: the first key `k` with `(.*\.)?k$` matching the module name.
fn pattern_lookup<T: Copy>(pats: &HashMap<String, T>, module: &str) -> Result<Option<T>> {
    let mut keys: Vec<&String> = pats.keys().collect();
    keys.sort();
    for k in keys {
        let re = Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map_err(|e| anyhow!("pattern key '{k}': {e}"))?;
        if re.is_match(module) {
            return Ok(Some(pats[k]));
        }
    }
    Ok(None)
}

impl AdapterConfig {
    /// A plain LoRA config.
    pub fn new(r: usize, alpha: f64, targets: Vec<String>, base: Option<String>) -> Self {
        AdapterConfig {
            peft_type: "LORA".into(),
            r,
            lora_alpha: alpha,
            target_modules: Some(Targets::List(targets)),
            use_rslora: false,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            fan_in_fan_out: false,
            modules_to_save: Some(vec!["classifier".into()]),
            bias: "none".into(),
            use_dora: false,
            base_model_name_or_path: base,
            task_type: None,
            lora_dropout: 0.0,
            layers_to_transform: None,
            extra: BTreeMap::new(),
        }
    }

    /// Parse and validate `adapter_config.json` text; `path` names the file in errors. (The fuzz target
    /// `adapter_config` calls this on arbitrary text.)
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let config: AdapterConfig =
            serde_json::from_str(text).map_err(|e| anyhow!("{}: invalid adapter config: {e}", path.display()))?;
        config.validate(path)?;
        Ok(config)
    }

    /// Reject what loracomp cannot apply exactly. `path` names the file in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let p = path.display();
        if self.peft_type != "LORA" {
            bail!("{p}: field 'peft_type' is '{}'; only LORA adapters are supported", self.peft_type);
        }
        if self.use_dora {
            bail!("{p}: field 'use_dora' is true; DoRA's magnitude vector cannot be composed as a LoRA, refusing");
        }
        if self.bias != "none" {
            bail!("{p}: field 'bias' is '{}'; adapters that train biases are not supported", self.bias);
        }
        if self.fan_in_fan_out {
            bail!("{p}: field 'fan_in_fan_out' is true; that is for GPT-2 Conv1D layers, which BERT has none of");
        }
        if self.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
            bail!("{p}: field 'layers_to_transform' is not supported");
        }
        if self.r == 0 {
            bail!("{p}: field 'r' must be positive");
        }
        // |scale| ≤ |alpha| since every rank is ≥ 1, so alphas within f32 range give finite f32 scales.
        let fits = |a: f64| a.is_finite() && a.abs() <= f32::MAX as f64;
        if !fits(self.lora_alpha) {
            bail!("{p}: field 'lora_alpha' must be a finite number within f32 range");
        }
        let mut keys: Vec<&String> = self.rank_pattern.keys().collect();
        keys.sort();
        for k in keys {
            if self.rank_pattern[k] == 0 {
                bail!("{p}: field 'rank_pattern': rank of '{k}' must be positive");
            }
        }
        let mut keys: Vec<&String> = self.alpha_pattern.keys().collect();
        keys.sort();
        for k in keys {
            if !fits(self.alpha_pattern[k]) {
                bail!("{p}: field 'alpha_pattern': alpha of '{k}' must be a finite number within f32 range");
            }
        }
        for key in ["use_qalora", "use_bdlora"] {
            if self.extra.get(key).and_then(|v| v.as_bool()) == Some(true) {
                bail!("{p}: field '{key}' is true; not supported");
            }
        }
        Ok(())
    }

    /// Rank and scale PEFT would give `module`.
    pub fn rank_and_scale(&self, module: &str) -> Result<(usize, f32)> {
        let r = pattern_lookup(&self.rank_pattern, module)?.unwrap_or(self.r);
        let alpha = pattern_lookup(&self.alpha_pattern, module)?.unwrap_or(self.lora_alpha);
        let scale = if self.use_rslora { alpha / (r as f64).sqrt() } else { alpha / r as f64 };
        Ok((r, scale as f32))
    }
}

/// One module's LoRA factors as read from disk.
#[derive(Clone, Debug)]
pub struct ModuleLora {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub din: usize,
    pub dout: usize,
    pub scale: f32,
}

/// A loaded PEFT LoRA adapter.
#[derive(Clone, Debug)]
pub struct Adapter {
    pub dir: PathBuf,
    pub name: String,
    pub config: AdapterConfig,
    /// Keyed by module path relative to `BertModel` (`encoder.layer.N.attention.self.query`).
    pub modules: BTreeMap<String, ModuleLora>,
    /// Head weight `[classes, hidden]` and bias, when saved.
    pub head: Option<(Vec<usize>, Vec<f32>, Vec<f32>)>,
    /// loracomp's sidecar, when present.
    pub meta: Option<Value>,
}

/// Strip PEFT's `base_model.model.` and loracomp's `bert.` from a key's module path.
fn module_of(path: &str) -> &str {
    let p = path.strip_prefix("base_model.model.").unwrap_or(path);
    p.strip_prefix("bert.").unwrap_or(p)
}

impl Adapter {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: adapter directory not found", dir.display());
        }
        let cpath = dir.join(CONFIG_FILE);
        crate::util::ensure_regular(&cpath)?;
        let text = std::fs::read_to_string(&cpath).map_err(|e| anyhow!("cannot read {}: {e}", cpath.display()))?;
        let config = AdapterConfig::parse(&cpath, &text)?;
        let wpath = dir.join(WEIGHTS_FILE);
        if !wpath.exists() {
            bail!("{}: missing (only safetensors adapters are read)", wpath.display());
        }
        let tf = TensorFile::open(&wpath)?;
        if let Some((k, why)) = tf.unusable.iter().next() {
            bail!("{}: tensor '{k}' {why}", wpath.display());
        }
        let mut modules = BTreeMap::new();
        // the key each module was read from, to refuse a module given twice (with and without `bert.`)
        let mut key_of: BTreeMap<String, &str> = BTreeMap::new();
        let exclude: Option<Targets> = match config.extra.get("exclude_modules") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                anyhow!("{}: field 'exclude_modules' must be a list of names or a regex: {e}", cpath.display())
            })?),
        };
        let mut head_w = None;
        let mut head_b = None;
        for (key, (shape, data)) in &tf.tensors {
            if let Some(path) = key.strip_suffix(".lora_A.weight") {
                let bkey = format!("{path}.lora_B.weight");
                let (bshape, bdata) = tf
                    .tensors
                    .get(&bkey)
                    .ok_or_else(|| anyhow!("{}: '{key}' has no matching '{bkey}'", wpath.display()))?;
                if shape.len() != 2 || bshape.len() != 2 || bshape[1] != shape[0] {
                    bail!(
                        "{}: '{key}' {shape:?} and '{bkey}' {bshape:?} are not LoRA factors [r, in] and [out, r]",
                        wpath.display()
                    );
                }
                let module = module_of(path).to_string();
                let full = path.strip_prefix("base_model.model.").unwrap_or(path);
                // PEFT applies a tensor only to a module its config targets; one it would not apply is refused
                // rather than applied here and silently differently from PEFT.
                let targeted = match &config.target_modules {
                    Some(t) => t.matches(full).map_err(|e| anyhow!("{}: {e}", cpath.display()))?,
                    None => true,
                };
                if !targeted {
                    bail!(
                        "{}: '{key}' is for module '{full}', which {}'s field 'target_modules' does not match; PEFT \
                         would not apply it",
                        wpath.display(),
                        cpath.display()
                    );
                }
                if let Some(x) = &exclude {
                    if x.matches(full).map_err(|e| anyhow!("{}: exclude_modules {e}", cpath.display()))? {
                        bail!(
                            "{}: '{key}' is for module '{full}', which {}'s field 'exclude_modules' excludes; PEFT \
                             would not apply it",
                            wpath.display(),
                            cpath.display()
                        );
                    }
                }
                if let Some(first) = key_of.insert(module.clone(), key) {
                    bail!(
                        "{}: module '{module}' is given twice, as '{first}' and as '{key}' (with and without a \
                         model prefix); which one PEFT applies depends on the model class, refusing",
                        wpath.display()
                    );
                }
                let (r_cfg, scale) = config.rank_and_scale(full)?;
                if r_cfg != shape[0] {
                    bail!(
                        "{}: '{key}' has rank {} but {} gives this module rank {r_cfg} (r / rank_pattern)",
                        wpath.display(),
                        shape[0],
                        cpath.display()
                    );
                }
                modules.insert(
                    module,
                    ModuleLora {
                        a: data.clone(),
                        b: bdata.clone(),
                        r: shape[0],
                        din: shape[1],
                        dout: bshape[0],
                        scale,
                    },
                );
            } else if key.ends_with(".lora_B.weight") {
                let akey = key.replace(".lora_B.weight", ".lora_A.weight");
                if !tf.tensors.contains_key(&akey) {
                    bail!("{}: '{key}' has no matching '{akey}'", wpath.display());
                }
            } else if key.contains("lora_magnitude_vector") {
                bail!("{}: '{key}' is a DoRA magnitude; not supported", wpath.display());
            } else if key.contains(".lora_embedding_") {
                bail!("{}: '{key}': LoRA on embeddings is not supported", wpath.display());
            } else if module_of(key) == "classifier.weight" {
                head_w = Some((shape.clone(), data.clone()));
            } else if module_of(key) == "classifier.bias" {
                head_b = Some(data.clone());
            } else {
                bail!("{}: tensor '{key}' is neither a LoRA factor nor the classifier head", wpath.display());
            }
        }
        let head = match (head_w, head_b) {
            (Some((s, w)), Some(b)) if s.len() == 2 && b.len() == s[0] => Some((s, w, b)),
            (None, None) => None,
            _ => bail!(
                "{}: classifier head incomplete (needs weight [classes, hidden] and bias [classes])",
                wpath.display()
            ),
        };
        let mpath = dir.join(LORACOMP_FILE);
        let meta = if mpath.exists() {
            crate::util::ensure_regular(&mpath)?;
            let t = std::fs::read_to_string(&mpath).map_err(|e| anyhow!("cannot read {}: {e}", mpath.display()))?;
            Some(serde_json::from_str(&t).map_err(|e| anyhow!("{}: invalid JSON: {e}", mpath.display()))?)
        } else {
            None
        };
        let name = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "adapter".into());
        Ok(Adapter { dir: dir.to_path_buf(), name, config, modules, head, meta })
    }

    /// Label names from the sidecar, when present.
    pub fn labels(&self) -> Option<Vec<String>> {
        self.meta.as_ref()?.get("labels")?.as_array()?.iter().map(|v| v.as_str().map(String::from)).collect()
    }
}

/// What to write for one module: factors with their PEFT rank and alpha.
pub struct ExportModule {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub r: usize,
    pub din: usize,
    pub dout: usize,
    pub alpha: f64,
}

/// Write a PEFT adapter directory. Modules whose rank or alpha differs from the global `r`/`lora_alpha` are
/// recorded in `rank_pattern` / `alpha_pattern` under their full module path, so PEFT rebuilds each exactly.
/// Files are written atomically; the directory is created if needed.
pub fn write_adapter(
    dir: &Path,
    mut config: AdapterConfig,
    modules: &BTreeMap<String, ExportModule>,
    head: Option<(&[usize], &[f32], &[f32])>,
    meta: &Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let mut tensors = BTreeMap::new();
    let mut names = std::collections::BTreeSet::new();
    // A classifier's modules sit under its `bert.` (the model PEFT wraps is BertForSequenceClassification-like);
    // a generative model's (task_type SEQ_2_SEQ_LM / CAUSAL_LM) are the model's own paths.
    let prefix = if config.task_type.is_some() { "" } else { "bert." };
    for (path, m) in modules {
        let full = format!("{prefix}{path}");
        if m.r != config.r {
            config.rank_pattern.insert(full.clone(), m.r);
        }
        if m.alpha != config.lora_alpha {
            config.alpha_pattern.insert(full.clone(), m.alpha);
        }
        names.insert(path.rsplit('.').next().unwrap_or(path).to_string());
        tensors.insert(format!("base_model.model.{full}.lora_A.weight"), (vec![m.r, m.din], m.a.clone()));
        tensors.insert(format!("base_model.model.{full}.lora_B.weight"), (vec![m.dout, m.r], m.b.clone()));
    }
    if matches!(&config.target_modules, Some(Targets::List(l)) if l.is_empty()) || config.target_modules.is_none() {
        config.target_modules = Some(Targets::List(names.into_iter().collect()));
    }
    if let Some((shape, w, b)) = head {
        tensors.insert("base_model.model.classifier.weight".into(), (shape.to_vec(), w.to_vec()));
        tensors.insert("base_model.model.classifier.bias".into(), (vec![shape[0]], b.to_vec()));
        config.modules_to_save = Some(vec!["classifier".into()]);
    } else {
        config.modules_to_save = None;
    }
    let mut md = HashMap::new();
    md.insert("format".to_string(), "pt".to_string());
    write_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(md))?;
    crate::util::write_atomic(&dir.join(CONFIG_FILE), serde_json::to_string_pretty(&config)?.as_bytes())?;
    crate::util::write_atomic(&dir.join(LORACOMP_FILE), serde_json::to_string_pretty(meta)?.as_bytes())?;
    Ok(())
}

/// Last path component of a model name or path, lower-cased (`sentence-transformers/all-MiniLM-L6-v2` and
/// `models/all-MiniLM-L6-v2/` both give `all-minilm-l6-v2`).
fn base_name(s: &str) -> String {
    s.trim_end_matches('/').rsplit('/').next().unwrap_or(s).to_lowercase()
}

/// Refuse an adapter whose `base_model_name_or_path` names another model than `model_dir` (by its folder name
/// or its config's `_name_or_path`), unless `allow`. Adapters that record no base are accepted; shapes are
/// checked separately when the bank is attached.
pub fn check_base(adapter: &Adapter, model_dir: &Path, allow: bool) -> Result<()> {
    let Some(base) = adapter.config.base_model_name_or_path.as_deref().filter(|b| !b.is_empty()) else {
        return Ok(());
    };
    let mut names = vec![base_name(&model_dir.canonicalize().unwrap_or(model_dir.to_path_buf()).to_string_lossy())];
    names.push(base_name(&model_dir.to_string_lossy()));
    if let Ok(text) = std::fs::read_to_string(model_dir.join("config.json")) {
        if let Some(n) =
            serde_json::from_str::<Value>(&text).ok().and_then(|v| v.get("_name_or_path")?.as_str().map(base_name))
        {
            names.push(n);
        }
    }
    if allow || names.contains(&base_name(base)) {
        return Ok(());
    }
    bail!(
        "{}: field 'base_model_name_or_path' is '{base}', but the model is {}; pass --allow-base-mismatch if the weights are the same",
        adapter.dir.join(CONFIG_FILE).display(),
        model_dir.display()
    )
}

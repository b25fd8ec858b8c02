//! Reading tensors from `.safetensors` files into f32, with errors that name the file and the key.

use anyhow::{anyhow, bail, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// All tensors of one safetensors file, converted to f32 on load (F32, F16 and BF16 are accepted).
pub struct TensorFile {
    pub path: PathBuf,
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    /// Tensors that cannot be used as weights (integer buffers such as `position_ids`), with the reason.
    /// They are an error only when a caller asks for them.
    pub unusable: BTreeMap<String, String>,
}

impl TensorFile {
    /// Randomly initialised tensors as `transformers` initialises them, drawn in the order of `names`: ones where
    /// `unit(name)` (norm scales), zeros for biases, normal(0, 0.02) otherwise.
    pub fn random(
        names: impl IntoIterator<Item = (String, Vec<usize>)>,
        rng: &mut impl rand::Rng,
        unit: impl Fn(&str) -> bool,
    ) -> Self {
        let mut tensors = BTreeMap::new();
        for (n, shape) in names {
            let len: usize = shape.iter().product();
            let data: Vec<f32> = if unit(&n) {
                vec![1.0; len]
            } else if n.ends_with("bias") {
                vec![0.0; len]
            } else {
                (0..len).map(|_| crate::util::normal(rng) * 0.02).collect()
            };
            tensors.insert(n, (shape, data));
        }
        TensorFile { path: "<random>".into(), tensors, unusable: Default::default() }
    }
}

/// Decode little-endian bytes of `dtype` into f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        crate::util::ensure_regular(path)?;
        let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
        Self::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            // The first 8 bytes are the header length; show what they claim beside the file size.
            let claimed = bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_le_bytes);
            let claimed = claimed.map(|n| format!(", header length field {n}")).unwrap_or_default();
            anyhow!("{}: not a valid safetensors file ({} bytes{claimed}): {e:?}", path.display(), bytes.len())
        })?;
        let mut tensors = BTreeMap::new();
        let mut unusable = BTreeMap::new();
        for (name, view) in st.tensors() {
            let Some(data) = to_f32(view.dtype(), view.data()) else {
                unusable.insert(name, format!("has dtype {:?}; supported: F32, F16, BF16", view.dtype()));
                continue;
            };
            let shape = view.shape().to_vec();
            if shape.iter().product::<usize>() != data.len() {
                bail!("{}: tensor '{name}' data does not match its shape {shape:?}", path.display());
            }
            if data.iter().any(|v| !v.is_finite()) {
                bail!("{}: tensor '{name}' holds NaN or Inf values", path.display());
            }
            tensors.insert(name, (shape, data));
        }
        Ok(TensorFile { path: path.to_path_buf(), tensors, unusable })
    }

    /// Take tensor `key`, checking its shape. `what` explains the expectation in the error.
    pub fn take(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>> {
        if let Some(why) = self.unusable.get(key) {
            bail!("{}: tensor '{key}' {why}", self.path.display());
        }
        let (s, d) =
            self.tensors.remove(key).ok_or_else(|| anyhow!("{}: missing tensor '{key}'", self.path.display()))?;
        if s != shape {
            bail!("{}: tensor '{key}' has shape {s:?}, expected {shape:?}", self.path.display());
        }
        Ok(d)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// After a loader has taken every tensor it uses: refuse the tensors still here that belong to the part of
    /// the network loracomp runs (`part(name)`), e.g. `encoder.layer.1.*` when config.json gives one layer —
    /// a config that does not describe its weights, which would otherwise run a different network without a word.
    /// Tensors outside it (pooler, pre-training heads, tied copies) are ignored, as transformers' `AutoModel` does.
    pub fn refuse_unused(&self, config: &Path, part: impl Fn(&str) -> bool) -> Result<()> {
        let unused: Vec<&str> = self.tensors.keys().map(|k| k.as_str()).filter(|k| part(k)).collect();
        if unused.is_empty() {
            return Ok(());
        }
        let shown = unused.iter().take(5).map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
        let more = if unused.len() > 5 { format!(" and {} more", unused.len() - 5) } else { String::new() };
        bail!(
            "{}: {} tensor(s) the model described by {} does not use: {shown}{more}; the config does not match \
             the weights (num_hidden_layers / num_layers too small?)",
            self.path.display(),
            unused.len(),
            config.display()
        )
    }
}

/// Write f32 tensors to a safetensors file atomically (temp file + rename).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let bufs: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, (s, d))| (k.clone(), s.clone(), d.iter().flat_map(|v| v.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bufs
        .iter()
        .map(|(k, s, b)| Ok((k.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<std::result::Result<_, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{}: cannot build tensors: {e:?}", path.display()))?;
    let bytes = safetensors::serialize(views, &metadata).map_err(|e| anyhow!("{}: {e:?}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
}

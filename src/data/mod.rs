//! Task directories and few-shot sampling.
//!
//! A text task is a directory with `labels.txt` (one label a line) and `train.jsonl`, `valid.jsonl`,
//! `test.jsonl` (`{"text": STR, "label": STR}`, plus `"text_pair": STR` for pair tasks).
//!
//! An image task has `labels.txt`, `image.json` (`{"channels": C, "height": H, "width": W}`) and `train.bin`,
//! `valid.bin`, `test.bin`: records of a little-endian u16 label index (into labels.txt) followed by the
//! image's C·H·W bytes (0–255), channel planes one after another, each row-major; no header. `image.json`
//! marks the directory as an image task. [`vision`] reads the shared CIFAR-10 / Omniglot / MNIST files and
//! builds such directories.

pub mod vision;

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A few-shot size: K examples per class, or the whole training split (`full`). The one shots type of the
/// command line, the sweep config, metrics.json and results (a number, or the string "full").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shots(pub Option<usize>);

impl std::str::FromStr for Shots {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "full" {
            return Ok(Shots(None));
        }
        match s.parse::<usize>() {
            Ok(0) | Err(_) => Err(format!("'{s}' is not a positive number of shots or 'full'")),
            Ok(k) => Ok(Shots(Some(k))),
        }
    }
}

impl std::fmt::Display for Shots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(k) => write!(f, "{k}"),
            None => write!(f, "full"),
        }
    }
}

impl serde::Serialize for Shots {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            Some(k) => s.serialize_u64(k as u64),
            None => s.serialize_str("full"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Shots {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Shots;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a positive integer or \"full\"")
            }
            fn visit_i64<E: serde::de::Error>(self, k: i64) -> std::result::Result<Shots, E> {
                if k > 0 {
                    Ok(Shots(Some(k as usize)))
                } else {
                    Err(E::custom(format!("shots: expected a positive integer or \"full\", got {k}")))
                }
            }
            fn visit_u64<E: serde::de::Error>(self, k: u64) -> std::result::Result<Shots, E> {
                self.visit_i64(k.min(i64::MAX as u64) as i64)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Shots, E> {
                if s == "full" {
                    Ok(Shots(None))
                } else {
                    Err(E::custom(format!("shots: expected a positive integer or \"full\", got \"{s}\"")))
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// One labelled text example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    pub pair: Option<String>,
    pub label: usize,
}

/// One labelled image: `channels·height·width` bytes in the task's [`ImageShape`].
#[derive(Clone, Debug, PartialEq)]
pub struct ImageExample {
    pub pixels: Arc<Vec<u8>>,
    pub label: usize,
}

/// Anything with a class index (what few-shot sampling needs).
pub trait Labelled {
    fn label(&self) -> usize;
}

impl Labelled for Example {
    fn label(&self) -> usize {
        self.label
    }
}

impl Labelled for ImageExample {
    fn label(&self) -> usize {
        self.label
    }
}

/// Image size of an image task (`image.json`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn pixels(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Bytes of one record: u16 label + pixels.
    pub fn record(&self) -> usize {
        2 + self.pixels()
    }

    /// Read and check `image.json`; errors name the file and the key.
    pub fn from_file(p: &Path) -> Result<Self> {
        crate::util::ensure_regular(p)?;
        let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
        let s: ImageShape = serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        for (k, v) in [("channels", s.channels), ("height", s.height), ("width", s.width)] {
            if v == 0 || v > 4096 {
                bail!("{}: key '{k}' must be between 1 and 4096, got {v}", p.display());
            }
        }
        if s.channels != 1 && s.channels != 3 {
            bail!("{}: key 'channels' must be 1 (grey) or 3 (RGB), got {}", p.display(), s.channels);
        }
        Ok(s)
    }
}

/// A split's examples: text or images.
#[derive(Clone, Debug)]
pub enum Examples {
    Text(Vec<Example>),
    Images(ImageShape, Vec<ImageExample>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match self {
            Examples::Text(v) => v.len(),
            Examples::Images(_, v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first `n` examples.
    pub fn take(&self, n: usize) -> Examples {
        match self {
            Examples::Text(v) => Examples::Text(v.iter().take(n).cloned().collect()),
            Examples::Images(s, v) => Examples::Images(*s, v.iter().take(n).cloned().collect()),
        }
    }

    /// At most `n` examples spread evenly over the split (every ⌈len/n⌉-th one, in order), the same ones every
    /// time: a fixed evaluation subsample.
    pub fn spread(&self, n: usize) -> Examples {
        let step = self.len().div_ceil(n.max(1)).max(1);
        match self {
            Examples::Text(v) => Examples::Text(v.iter().step_by(step).cloned().collect()),
            Examples::Images(s, v) => Examples::Images(*s, v.iter().step_by(step).cloned().collect()),
        }
    }

    /// K examples per class (see [`sample_k_shot`]); returns the sample and the short classes.
    pub fn sample_k_shot(&self, classes: usize, k: Option<usize>, seed: u64) -> (Examples, Vec<(usize, usize)>) {
        match self {
            Examples::Text(v) => {
                let fs = sample_k_shot(v, classes, k, seed);
                (Examples::Text(fs.examples), fs.short)
            }
            Examples::Images(s, v) => {
                let fs = sample_k_shot(v, classes, k, seed);
                (Examples::Images(*s, fs.examples), fs.short)
            }
        }
    }
}

/// A task: its label names and its splits (loaded on demand).
#[derive(Clone, Debug)]
pub struct Task {
    pub dir: PathBuf,
    pub name: String,
    pub labels: Vec<String>,
    /// `Some` for an image task (`image.json` present).
    pub image: Option<ImageShape>,
}

impl Task {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: task directory not found", dir.display());
        }
        let lp = dir.join("labels.txt");
        crate::util::ensure_regular(&lp)?;
        let text = std::fs::read_to_string(&lp).with_context(|| format!("cannot read {}", lp.display()))?;
        let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
        if labels.len() < 2 {
            bail!("{}: needs at least two labels, found {}", lp.display(), labels.len());
        }
        let mut seen = std::collections::HashSet::new();
        for l in &labels {
            if !seen.insert(l) {
                bail!("{}: label '{l}' listed twice", lp.display());
            }
        }
        let name = dir.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let ij = dir.join("image.json");
        let image = if ij.exists() { Some(ImageShape::from_file(&ij)?) } else { None };
        Ok(Task { dir: dir.to_path_buf(), name, labels, image })
    }

    /// The files that hold the task (hashed by sweeps).
    pub fn files(&self) -> Vec<PathBuf> {
        let names: &[&str] = if self.image.is_some() {
            &["labels.txt", "image.json", "train.bin", "valid.bin", "test.bin"]
        } else {
            &["labels.txt", "train.jsonl", "valid.jsonl", "test.jsonl"]
        };
        names.iter().map(|f| self.dir.join(f)).collect()
    }

    /// Whether the task has `split` (its file exists).
    pub fn has_split(&self, split: &str) -> bool {
        let ext = if self.image.is_some() { "bin" } else { "jsonl" };
        self.dir.join(format!("{split}.{ext}")).exists()
    }

    /// Read `split` of a text or an image task.
    pub fn examples(&self, split: &str) -> Result<Examples> {
        match self.image {
            Some(shape) => Ok(Examples::Images(shape, self.image_split(split)?)),
            None => Ok(Examples::Text(self.split(split)?)),
        }
    }

    /// Read `split` of an image task (`{split}.bin`). Errors name the file, the record and the field.
    pub fn image_split(&self, split: &str) -> Result<Vec<ImageExample>> {
        let Some(shape) = self.image else {
            bail!("{}: not an image task (no image.json)", self.dir.display());
        };
        let p = self.dir.join(format!("{split}.bin"));
        crate::util::ensure_regular(&p)?;
        let bytes = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
        self.parse_image_split(&p, shape, &bytes)
    }

    /// Parse image records; `p` names the file in errors.
    pub fn parse_image_split(&self, p: &Path, shape: ImageShape, bytes: &[u8]) -> Result<Vec<ImageExample>> {
        let rec = shape.record();
        if bytes.is_empty() {
            bail!("{}: the split is empty", p.display());
        }
        if !bytes.len().is_multiple_of(rec) {
            bail!(
                "{}: {} bytes is not a whole number of {rec}-byte records (u16 label + {}x{}x{} pixels, from image.json)",
                p.display(),
                bytes.len(),
                shape.channels,
                shape.height,
                shape.width
            );
        }
        bytes
            .chunks(rec)
            .enumerate()
            .map(|(i, r)| {
                let label = u16::from_le_bytes([r[0], r[1]]) as usize;
                if label >= self.labels.len() {
                    bail!(
                        "{}: record {}: field 'label' is {label}, but {}/labels.txt has {} labels",
                        p.display(),
                        i + 1,
                        self.dir.display(),
                        self.labels.len()
                    );
                }
                Ok(ImageExample { pixels: Arc::new(r[2..].to_vec()), label })
            })
            .collect()
    }

    /// Read `split` (`train`, `valid` or `test`). Errors name the file, the line and the field.
    pub fn split(&self, split: &str) -> Result<Vec<Example>> {
        let p = self.dir.join(format!("{split}.jsonl"));
        crate::util::ensure_regular(&p)?;
        let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        self.parse_split(&p, std::io::BufReader::new(f))
    }

    /// Parse split lines read from `reader`; `p` names the file in errors. (The fuzz target `task_jsonl` calls
    /// this on arbitrary bytes.)
    pub fn parse_split(&self, p: &Path, reader: impl BufRead) -> Result<Vec<Example>> {
        let index: std::collections::HashMap<&str, usize> =
            self.labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
        let mut out = Vec::new();
        // (line, has a text_pair) of the first example: a split is all pairs or all single texts
        let mut first: Option<(usize, bool)> = None;
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| format!("{}:{}: cannot read", p.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{}:{}", p.display(), i + 1);
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| anyhow!("{}: invalid JSON: {e}", at()))?;
            let text = v
                .get("text")
                .and_then(|t| t.as_str())
                .ok_or_else(|| anyhow!("{}: field 'text' missing or not a string", at()))?;
            let label = match v.get("label") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => bail!("{}: field 'label' missing or not a string", at()),
            };
            let label = *index.get(label.as_str()).ok_or_else(|| {
                anyhow!("{}: field 'label': '{label}' is not in {}/labels.txt", at(), self.dir.display())
            })?;
            let pair = match v.get("text_pair") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => bail!("{}: field 'text_pair' is not a string", at()),
            };
            let (l0, paired) = *first.get_or_insert((i + 1, pair.is_some()));
            if paired != pair.is_some() {
                let (here, there) = if paired { ("absent", "has one") } else { ("present", "has none") };
                bail!(
                    "{}: field 'text_pair' is {here}, but line {l0} {there}; a split is all text pairs or all \
                     single texts",
                    at()
                );
            }
            out.push(Example { text: text.to_string(), pair, label });
        }
        if out.is_empty() {
            bail!("{}: the split is empty", p.display());
        }
        Ok(out)
    }
}

/// Result of few-shot sampling.
#[derive(Clone, Debug)]
pub struct FewShot<T = Example> {
    pub examples: Vec<T>,
    /// Labels with fewer than K training examples: (label index, how many were available).
    pub short: Vec<(usize, usize)>,
}

/// K examples per class drawn from `pool` with `seed` (`None` = all). A class with fewer than K examples
/// contributes all it has, and is reported in `short` (absent classes contribute none).
pub fn sample_k_shot<T: Clone + Labelled>(pool: &[T], classes: usize, k: Option<usize>, seed: u64) -> FewShot<T> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<&T>> = vec![Vec::new(); classes];
    for e in pool {
        by_class[e.label()].push(e);
    }
    let mut examples = Vec::new();
    let mut short = Vec::new();
    for (c, list) in by_class.iter_mut().enumerate() {
        list.shuffle(&mut rng);
        let want = k.unwrap_or(list.len());
        if list.len() < want {
            short.push((c, list.len()));
        }
        examples.extend(list.iter().take(want).map(|e| (*e).clone()));
    }
    examples.shuffle(&mut rng);
    FewShot { examples, short }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> Vec<Example> {
        (0..30).map(|i| Example { text: format!("t{i}"), pair: None, label: if i < 3 { 2 } else { i % 2 } }).collect()
    }

    #[test]
    fn k_shot_is_seeded_balanced_and_reports_short_classes() {
        let p = pool();
        let a = sample_k_shot(&p, 4, Some(4), 7);
        let b = sample_k_shot(&p, 4, Some(4), 7);
        let c = sample_k_shot(&p, 4, Some(4), 8);
        assert_eq!(a.examples, b.examples);
        assert_ne!(a.examples, c.examples);
        for cl in 0..3 {
            let n = a.examples.iter().filter(|e| e.label == cl).count();
            assert_eq!(n, if cl == 2 { 3 } else { 4 });
        }
        assert_eq!(a.short, vec![(2, 3), (3, 0)]);
    }

    #[test]
    fn text_pair_on_only_some_lines_names_the_file_and_line() {
        let t = Task { name: "t".into(), dir: "t".into(), labels: vec!["a".into(), "b".into()], image: None };
        let p = Path::new("t/train.jsonl");
        let ok = "{\"text\": \"x\", \"text_pair\": \"y\", \"label\": \"a\"}\n".repeat(2);
        assert_eq!(t.parse_split(p, ok.as_bytes()).unwrap().len(), 2);
        let mixed =
            "{\"text\": \"x\", \"text_pair\": \"y\", \"label\": \"a\"}\n\n{\"text\": \"x\", \"label\": \"b\"}\n";
        let e = t.parse_split(p, mixed.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            e,
            "t/train.jsonl:3: field 'text_pair' is absent, but line 1 has one; a split is all text pairs or all single texts"
        );
        let mixed = "{\"text\": \"x\", \"label\": \"b\"}\n{\"text\": \"x\", \"text_pair\": null, \"label\": \"a\"}\n\
                     {\"text\": \"x\", \"text_pair\": \"y\", \"label\": \"a\"}\n";
        let e = t.parse_split(p, mixed.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with("t/train.jsonl:3: field 'text_pair' is present, but line 1 has none"), "{e}");
    }
}

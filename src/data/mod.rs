//! Task directories and few-shot sampling.
//!
//! A task is a directory with `labels.txt` (one label a line) and `train.jsonl`, `valid.jsonl`, `test.jsonl`
//! (`{"text": STR, "label": STR}`, plus `"text_pair": STR` for pair tasks).

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One labelled example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub text: String,
    pub pair: Option<String>,
    pub label: usize,
}

/// A task: its label names and its splits (loaded on demand).
#[derive(Clone, Debug)]
pub struct Task {
    pub dir: PathBuf,
    pub name: String,
    pub labels: Vec<String>,
}

impl Task {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: task directory not found", dir.display());
        }
        let lp = dir.join("labels.txt");
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
        Ok(Task { dir: dir.to_path_buf(), name, labels })
    }

    /// Read `split` (`train`, `valid` or `test`). Errors name the file, the line and the field.
    pub fn split(&self, split: &str) -> Result<Vec<Example>> {
        let p = self.dir.join(format!("{split}.jsonl"));
        let f = std::fs::File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
        self.parse_split(&p, std::io::BufReader::new(f))
    }

    /// Parse split lines read from `reader`; `p` names the file in errors. (The fuzz target `task_jsonl` calls
    /// this on arbitrary bytes.)
    pub fn parse_split(&self, p: &Path, reader: impl BufRead) -> Result<Vec<Example>> {
        let index: std::collections::HashMap<&str, usize> =
            self.labels.iter().enumerate().map(|(i, l)| (l.as_str(), i)).collect();
        let mut out = Vec::new();
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
pub struct FewShot {
    pub examples: Vec<Example>,
    /// Labels with fewer than K training examples: (label index, how many were available).
    pub short: Vec<(usize, usize)>,
}

/// K examples per class drawn from `pool` with `seed` (`None` = all). A class with fewer than K examples
/// contributes all it has, and is reported in `short` (absent classes contribute none).
pub fn sample_k_shot(pool: &[Example], classes: usize, k: Option<usize>, seed: u64) -> FewShot {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<&Example>> = vec![Vec::new(); classes];
    for e in pool {
        by_class[e.label].push(e);
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
}

//! Scale-out of a sweep: stages, shards, cost estimates and the deterministic assignment of bank modules and
//! cells to shards (`loracomp sweep --stage … --shard I/N`, and `sweep submit`).

use anyhow::{anyhow, bail, Result};
use std::path::Path;

/// A part of the sweep: the bank, the few-shot cells, or the merge and report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    Bank,
    Cells,
    Report,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Bank, Stage::Cells, Stage::Report];
    pub fn name(self) -> &'static str {
        match self {
            Stage::Bank => "bank",
            Stage::Cells => "cells",
            Stage::Report => "report",
        }
    }
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bank" => Ok(Stage::Bank),
            "cells" => Ok(Stage::Cells),
            "report" => Ok(Stage::Report),
            _ => Err(format!("unknown stage '{s}' (bank, cells or report)")),
        }
    }
}

/// Shard `index` of `count` (0-based, as Slurm array indices and Kubernetes completion indices are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ONE: Shard = Shard { index: 0, count: 1 };

    /// `I/N` with `0 <= I < N`.
    pub fn parse(s: &str) -> Result<Shard> {
        let (i, n) = s.split_once('/').ok_or_else(|| anyhow!("--shard: '{s}' is not I/N (e.g. 0/4) or 'env'"))?;
        let index: usize = i.trim().parse().map_err(|_| anyhow!("--shard: '{i}' in '{s}' is not a whole number"))?;
        let count: usize = n.trim().parse().map_err(|_| anyhow!("--shard: '{n}' in '{s}' is not a whole number"))?;
        Shard::new(index, count).map_err(|e| anyhow!("--shard: {e}"))
    }

    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 {
            bail!("the number of shards must be at least 1");
        }
        if index >= count {
            bail!("shard index {index} is not below the number of shards {count} (indices start at 0)");
        }
        Ok(Shard { index, count })
    }

    /// `--shard env`: the index from `SLURM_ARRAY_TASK_ID` or `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs);
    /// the count from `shards` (`--shards`), else `LORACOMP_SHARDS`, else `SLURM_ARRAY_TASK_COUNT`. (A resubmitted
    /// array holds only some indices, so its task count is not the number of shards: the scripts pass
    /// `--shards`.)
    pub fn from_env(shards: Option<usize>, get: impl Fn(&str) -> Option<String>) -> Result<Shard> {
        let num = |var: &str| -> Result<Option<usize>> {
            match get(var) {
                None => Ok(None),
                Some(v) => {
                    v.trim().parse().map(Some).map_err(|_| anyhow!("--shard env: {var}='{v}' is not a whole number"))
                }
            }
        };
        let (index, from) = match (num("SLURM_ARRAY_TASK_ID")?, num("JOB_COMPLETION_INDEX")?) {
            (Some(i), _) => (i, "SLURM_ARRAY_TASK_ID"),
            (None, Some(i)) => (i, "JOB_COMPLETION_INDEX"),
            (None, None) => {
                bail!("--shard env: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set (not in a job array?)")
            }
        };
        let count = match (shards, num("LORACOMP_SHARDS")?, num("SLURM_ARRAY_TASK_COUNT")?) {
            (Some(n), _, _) => n,
            (None, Some(n), _) => n,
            (None, None, Some(n)) if from == "SLURM_ARRAY_TASK_ID" => n,
            _ => bail!("--shard env: the number of shards is unknown: pass --shards N or set LORACOMP_SHARDS"),
        };
        Shard::new(index, count).map_err(|e| anyhow!("--shard env ({from}): {e}"))
    }

    /// `I-of-N`, as in shard file names.
    pub fn tag(self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Deterministic balancing by estimated cost (longest job first onto the least-loaded shard; ties go to the
/// lower shard index, and items of equal cost keep their order). `items` are (key, cost); returns the shard of
/// each item, in the items' order. The same list gives the same assignment in every process.
pub fn assign(items: &[(&str, f64)], count: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| items[b].1.total_cmp(&items[a].1).then_with(|| items[a].0.cmp(items[b].0)));
    let mut load = vec![0.0f64; count.max(1)];
    let mut out = vec![0usize; items.len()];
    for i in order {
        let (s, _) = load
            .iter()
            .enumerate()
            .fold((0usize, f64::INFINITY), |best, (s, &l)| if l < best.1 { (s, l) } else { best });
        load[s] += items[i].1.max(0.0);
        out[i] = s;
    }
    out
}

/// The number of examples in `split` of the task at `dir`, from file sizes and lines only (no parsing): text
/// tasks count non-empty lines, image tasks whole records. 0 where the split is missing.
pub fn split_len(dir: &Path, split: &str) -> Result<usize> {
    let ij = dir.join("image.json");
    if ij.exists() {
        let shape = crate::data::ImageShape::from_file(&ij)?;
        let p = dir.join(format!("{split}.bin"));
        let len = std::fs::metadata(&p).map(|m| m.len() as usize).unwrap_or(0);
        return Ok(len / shape.record().max(1));
    }
    let p = dir.join(format!("{split}.jsonl"));
    let Ok(bytes) = std::fs::read(&p) else { return Ok(0) };
    Ok(bytes.split(|b| *b == b'\n').filter(|l| l.iter().any(|b| !b.is_ascii_whitespace())).count())
}

/// Relative cost of a method per training example of a training step (LoRA = 1), with `m` modules; `None` for
/// methods whose encoder stays frozen (their head trains on features computed once).
pub fn method_factor(method: &str, m: usize) -> Option<f64> {
    let m = m as f64;
    match method {
        // every weight trained: the body's backward in full and AdamW over every parameter
        "full" => Some(1.5),
        "lora" => Some(1.0),
        "learned" => Some(0.8 + 0.02 * m),
        // LoraHub scores whole CMA-ES generations of merged banks on the few-shot examples
        "lorahub" | "lorahub-compat" => Some(0.5 + 0.02 * m),
        _ => None,
    }
}

/// Estimated cost (example passes; a forward pass is 1/3) of one few-shot cell: `steps` training steps of at
/// most `batch` of the `n_fewshot` examples (a frozen encoder: one forward pass over them), then a forward
/// pass over the `n_test` test examples. Calibrated on the label-shift protocol run (RESULTS.md): full ≈ 1.5 ×
/// LoRA ≈ 1.5 × learned per cell, linear-probe and uniform ≈ their few-shot forward passes.
pub fn cell_cost(method: &str, modules: usize, steps: usize, batch: usize, n_fewshot: usize, n_test: usize) -> f64 {
    let per_step = batch.min(n_fewshot.max(1)) as f64;
    let forward = 1.0 + 0.01 * modules as f64;
    let train = match method_factor(method, modules) {
        Some(f) => steps as f64 * per_step * f,
        // auto scores each module alone and its 17 default candidates over the few-shot set
        None if method == "auto" => n_fewshot as f64 / 3.0 * forward * (modules + 17) as f64,
        None => n_fewshot as f64 / 3.0 * forward,
    };
    train + n_test as f64 / 3.0 * forward + 1.0
}

/// Estimated cost of training one bank module: `epochs` passes over `n_train` examples (LoRA), then validation.
pub fn bank_cost(epochs: usize, n_train: usize, n_valid: usize) -> f64 {
    epochs as f64 * n_train as f64 + n_valid as f64 / 3.0 + 1.0
}

/// Effective throughput of one core, for turning example passes into CPU time: calibrated so that the
/// label-shift protocol (all-MiniLM-L6-v2, 2,050 cells, 222 min on 2 threads ≈ 7.4 CPU-hours) is estimated at
/// about that (AVX-512 f32 GEMM; other CPUs are slower).
pub const FLOPS_PER_CORE: f64 = 1.0e11;

/// CPU seconds of one example pass (forward + backward ≈ 6 flops per parameter per token) of a model of
/// `params` parameters (embedding tables excluded: they are looked up, not multiplied) at `tokens` tokens an
/// example.
pub fn seconds_per_pass(params: f64, tokens: f64) -> f64 {
    6.0 * params * tokens / FLOPS_PER_CORE
}

/// Tokens an example, estimated from a task's training file without tokenizing: about one token per 5 bytes of
/// a JSON line (text and label), plus the special tokens; at most `max_len`. Image tasks: 197 (a 224-pixel
/// image in 16-pixel patches, and CLS).
pub fn tokens_per_example(dir: &Path, max_len: usize) -> f64 {
    if dir.join("image.json").exists() {
        return 197.0;
    }
    let n = split_len(dir, "train").unwrap_or(0).max(1);
    let bytes = std::fs::metadata(dir.join("train.jsonl")).map(|m| m.len() as f64).unwrap_or(0.0);
    (bytes / n as f64 / 5.0 + 2.0).clamp(1.0, max_len.max(1) as f64)
}

/// Parameters of the model at `dir` that take part in matrix products: its weight file's size over 4 bytes
/// (f32), less the word-embedding table (`vocab_size` × `hidden_size`/`d_model` of config.json).
pub fn matmul_params(dir: &Path) -> f64 {
    let all = std::fs::metadata(dir.join("model.safetensors")).map(|m| m.len() as f64 / 4.0).unwrap_or(0.0);
    let cfg: serde_json::Value = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let get = |k: &str| cfg[k].as_f64().unwrap_or(0.0);
    let embed = get("vocab_size") * get("hidden_size").max(get("d_model"));
    if embed < all {
        all - embed
    } else {
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_env() {
        assert_eq!(Shard::parse("2/3").unwrap(), Shard { index: 2, count: 3 });
        assert!(Shard::parse("3/3").is_err());
        assert!(Shard::parse("0/0").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        let s = Shard::from_env(None, env(&[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "4")])).unwrap();
        assert_eq!(s, Shard { index: 1, count: 4 });
        // --shards wins over the array's task count (a resubmitted array holds only some indices)
        let s =
            Shard::from_env(Some(5), env(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "1")])).unwrap();
        assert_eq!(s, Shard { index: 4, count: 5 });
        let s = Shard::from_env(None, env(&[("JOB_COMPLETION_INDEX", "2"), ("LORACOMP_SHARDS", "3")])).unwrap();
        assert_eq!(s, Shard { index: 2, count: 3 });
        let e = Shard::from_env(None, env(&[("JOB_COMPLETION_INDEX", "2")])).unwrap_err().to_string();
        assert!(e.contains("--shards"), "{e}");
        assert!(Shard::from_env(None, env(&[])).is_err());
        assert!(Shard::from_env(Some(2), env(&[("JOB_COMPLETION_INDEX", "2")])).is_err());
    }

    #[test]
    fn assignment_is_balanced_by_cost_and_deterministic() {
        let items: Vec<(String, f64)> = (0..20).map(|i| (format!("k{i}"), if i < 2 { 100.0 } else { 10.0 })).collect();
        let refs: Vec<(&str, f64)> = items.iter().map(|(k, c)| (k.as_str(), *c)).collect();
        let a = assign(&refs, 3);
        assert_eq!(a, assign(&refs, 3));
        let mut load = [0.0; 3];
        for (i, s) in a.iter().enumerate() {
            load[*s] += refs[i].1;
        }
        // 380 in all: by count each shard would get ~7 items; by cost no shard holds more than the largest item
        // over the ideal share
        assert!(load.iter().all(|l| (l - 380.0 / 3.0).abs() <= 100.0), "{load:?}");
        assert_ne!(a[0], a[1], "the two expensive items go to different shards");
        assert!(assign(&refs, 1).iter().all(|&s| s == 0));
    }
}

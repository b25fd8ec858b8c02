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

/// Relative cost of a method per training example (forward + backward through the body = 1), with `m` modules.
pub fn method_factor(method: &str, m: usize) -> f64 {
    let m = m as f64;
    match method {
        // frozen body: one forward pass per example, then the head on cached features
        "linear-probe" => 0.4,
        // every weight trained: the body's backward in full and AdamW over every parameter
        "full" => 2.0,
        "lora" => 1.0,
        "uniform" => 1.0 + 0.02 * m,
        "learned" => 1.2 + 0.1 * m,
        // LoraHub scores whole CMA-ES generations of merged banks; the merges build dense ΔW per module
        "lorahub" | "lorahub-compat" => 0.6 + 0.2 * m,
        _ => 0.5 + 0.1 * m,
    }
}

/// Estimated cost (example passes) of one few-shot cell: training `steps` batches of at most `batch` of the
/// `n_fewshot` examples, then a forward pass over the `n_test` test examples.
pub fn cell_cost(method: &str, modules: usize, steps: usize, batch: usize, n_fewshot: usize, n_test: usize) -> f64 {
    let per_step = batch.min(n_fewshot.max(1)) as f64;
    let eval = n_test as f64 / 3.0 * (1.0 + 0.01 * modules as f64);
    steps as f64 * per_step * method_factor(method, modules) + eval + 1.0
}

/// Estimated cost of training one bank module: `epochs` passes over `n_train` examples (LoRA), then validation.
pub fn bank_cost(epochs: usize, n_train: usize, n_valid: usize) -> f64 {
    epochs as f64 * n_train as f64 + n_valid as f64 / 3.0 + 1.0
}

/// Assumed sustained throughput of one core, for turning example passes into CPU time.
pub const FLOPS_PER_CORE: f64 = 2.0e10;

/// CPU seconds of one example pass (forward + backward ≈ 6 flops per parameter per token) of a model of
/// `params` parameters at `tokens` tokens an example.
pub fn seconds_per_pass(params: f64, tokens: usize) -> f64 {
    6.0 * params * tokens as f64 / FLOPS_PER_CORE
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

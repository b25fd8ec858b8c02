//! `loracomp sweep`: the paper's protocol on a config file — a bank trained once (reused while its inputs and
//! settings hash the same), every downstream task × shots × seed × method, a module-count ablation, then
//! report.md, plots and manifest.json. Each finished cell is appended to results.jsonl at once; a sweep
//! stopped at any moment resumes where it stopped.

pub use super::shard::{Shard, Stage};
use crate::data::{Examples, Task};
use crate::engine::kernels::Pooling;
use crate::lora::peft::Adapter;
use crate::methods::common::{embed_examples, encode_examples, Encoded};
use crate::methods::{adapt_encoded, AdaptOpts, Method};
use crate::models::encoder::LoadedModel;
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A shot count (the one [`crate::data::Shots`] type, under the name sweep configs have always used).
pub use crate::data::Shots as ShotSpec;

fn default_shots() -> Vec<ShotSpec> {
    [1, 2, 4, 8, 16, 32].iter().map(|&k| ShotSpec(Some(k))).chain([ShotSpec(None)]).collect()
}
fn default_seeds() -> usize {
    5
}
fn default_methods() -> Vec<String> {
    Method::ALL.iter().map(|m| m.name().to_string()).collect()
}

/// How the bank is trained.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BankSettings {
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub epochs: usize,
    pub seed: u64,
    pub batch: usize,
    /// Learning rate of the bank's LoRA factors (default: `train`'s, 1e-3). Left out of the bank hash when not
    /// given, so banks trained before it existed are still found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f32>,
}

impl Default for BankSettings {
    fn default() -> Self {
        BankSettings {
            rank: 16,
            alpha: 32.0,
            targets: vec!["query".into(), "value".into()],
            epochs: 2,
            seed: 0,
            batch: 16,
            lr: None,
        }
    }
}

/// Few-shot training settings shared by every method (learning rates are each method's defaults unless given).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptSettings {
    pub steps: usize,
    pub batch: usize,
    pub max_len: usize,
    pub lr: BTreeMap<String, f32>,
    pub lr_head: Option<f32>,
    pub lora_rank: usize,
    pub lora_alpha: f32,
    /// Evaluate each cell on at most this many test examples, spread evenly over the split (the same ones for
    /// every cell): for models whose evaluation dominates the cost (rank classification over many labels).
    pub eval_limit: Option<usize>,
    /// `auto`'s `--auto-lora-from` (examples per class from which it trains a LoRA on top; `"off"`: never).
    /// Absent: auto's default. Left out of the stamp's settings when absent, so older sweeps keep their keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_lora_from: Option<crate::methods::auto::LoraFrom>,
}

impl Default for AdaptSettings {
    fn default() -> Self {
        AdaptSettings {
            steps: crate::methods::DEFAULT_STEPS,
            batch: 16,
            max_len: 128,
            lr: BTreeMap::new(),
            lr_head: None,
            // LoRA from scratch at rank 16, as in the paper (and as `adapt`).
            lora_rank: 16,
            lora_alpha: 32.0,
            eval_limit: None,
            auto_lora_from: None,
        }
    }
}

/// Accuracy against the number of bank modules (random subsets).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ablation {
    pub shots: usize,
    #[serde(default)]
    pub sizes: Vec<usize>,
    #[serde(default = "three")]
    pub draws: usize,
    #[serde(default = "ablation_methods")]
    pub methods: Vec<String>,
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Also run retrieval of the top-k modules for each size k (a curve beside random subsets).
    #[serde(default)]
    pub retrieval: bool,
    /// Retrieval criteria for those curves: `arrow` (default) and/or `cka`.
    #[serde(default = "arrow_only")]
    pub retrieval_by: Vec<String>,
}
fn arrow_only() -> Vec<String> {
    vec!["arrow".into()]
}
fn three() -> usize {
    3
}
fn ablation_methods() -> Vec<String> {
    vec!["uniform".into(), "learned".into()]
}

/// Which learned composition to draw as a heatmap.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Heatmap {
    pub task: String,
    pub shots: ShotSpec,
}

/// A sweep configuration (TOML).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    pub name: String,
    /// Hugging Face model directory (relative paths are taken from the current directory).
    pub model: PathBuf,
    /// Directory holding the task directories.
    pub data: PathBuf,
    pub upstream: Vec<String>,
    pub downstream: Vec<String>,
    /// Leave a downstream task's own adapter out of its bank (label-shift suites where the lists overlap).
    #[serde(default)]
    pub exclude_self: bool,
    #[serde(default = "default_shots")]
    pub shots: Vec<ShotSpec>,
    #[serde(default = "default_seeds")]
    pub seeds: usize,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default)]
    pub bank: BankSettings,
    #[serde(default)]
    pub adapt: AdaptSettings,
    #[serde(default)]
    pub ablation: Option<Ablation>,
    #[serde(default)]
    pub heatmap: Option<Heatmap>,
}

impl SweepConfig {
    pub fn load(path: &Path) -> Result<Self> {
        crate::util::ensure_regular(path)?;
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(path, &text)
    }

    /// Parse and validate config text; `path` names the file in errors. (The fuzz target `sweep_toml` calls
    /// this on arbitrary text.)
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let cfg: SweepConfig = toml::from_str(text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        cfg.validate().map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    /// Check that the model and every task directory the config names are there (and the task directories
    /// readable), before anything is written: a typo must not leave a half-made output directory behind.
    /// Errors name the field.
    pub fn check_inputs(&self) -> Result<()> {
        for p in LoadedModel::files(&self.model) {
            if !p.is_file() {
                bail!("field 'model': {} not found", p.display());
            }
        }
        let ablation = self.ablation.iter().flat_map(|a| a.tasks.iter().map(|t| ("ablation.tasks", t)));
        let heatmap = self.heatmap.iter().map(|h| ("heatmap.task", &h.task));
        let named =
            self.upstream.iter().map(|t| ("upstream", t)).chain(self.downstream.iter().map(|t| ("downstream", t)));
        for (field, t) in named.chain(ablation).chain(heatmap) {
            Task::open(&self.data.join(t)).map_err(|e| anyhow!("field '{field}': task '{t}': {e:#}"))?;
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<()> {
        for m in self.methods.iter().chain(self.ablation.iter().flat_map(|a| a.methods.iter())) {
            m.parse::<Method>().map_err(|e| anyhow!("field 'methods': {e}"))?;
        }
        if self.upstream.is_empty() && self.methods.iter().any(|m| m == "uniform" || m == "learned") {
            bail!("field 'upstream': composition methods need at least one upstream task");
        }
        if self.downstream.is_empty() {
            bail!("field 'downstream' is empty");
        }
        if self.seeds == 0 || self.shots.is_empty() {
            bail!("fields 'seeds' and 'shots' must not be empty");
        }
        for (field, v) in [
            ("bank.rank", self.bank.rank),
            ("bank.batch", self.bank.batch),
            ("adapt.batch", self.adapt.batch),
            ("adapt.lora_rank", self.adapt.lora_rank),
            ("adapt.eval_limit", self.adapt.eval_limit.unwrap_or(1)),
            ("ablation.shots", self.ablation.as_ref().map_or(1, |a| a.shots)),
        ] {
            if v == 0 {
                bail!("field '{field}' must be at least 1");
            }
        }
        for k in self.adapt.lr.keys() {
            k.parse::<Method>().map_err(|e| anyhow!("field 'adapt.lr': {e}"))?;
        }
        let uses_auto =
            self.methods.iter().chain(self.ablation.iter().flat_map(|a| a.methods.iter())).any(|m| m == "auto");
        if self.adapt.auto_lora_from.is_some() && !uses_auto {
            bail!("field 'adapt.auto_lora_from' is an option of method auto, which this sweep does not run");
        }
        for by in self.ablation.iter().flat_map(|a| &a.retrieval_by) {
            by.parse::<crate::methods::Retrieval>().map_err(|e| anyhow!("field 'ablation.retrieval_by': {e}"))?;
        }
        // Task names are directories under `data` and name the bank's directories under the output: a plain
        // relative path, never one that leaves them.
        let ablation_tasks = self.ablation.iter().flat_map(|a| a.tasks.iter().map(|t| ("ablation.tasks", t)));
        let heatmap = self.heatmap.iter().map(|h| ("heatmap.task", &h.task));
        let named =
            self.upstream.iter().map(|t| ("upstream", t)).chain(self.downstream.iter().map(|t| ("downstream", t)));
        for (field, t) in named.chain(ablation_tasks).chain(heatmap) {
            use std::path::Component;
            let p = Path::new(t);
            if t.is_empty() || !p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)) {
                bail!(
                    "field '{field}': '{t}' must be a task directory's name relative to 'data' (no absolute path, \
                     no '..'), as the bank is written under the output directory by that name"
                );
            }
        }
        // A value given twice would run (and average) the same cells twice, or train one bank module twice.
        fn no_duplicates<T: PartialEq + std::fmt::Display>(field: &str, v: &[T]) -> Result<()> {
            for (i, x) in v.iter().enumerate() {
                if v[..i].contains(x) {
                    bail!("field '{field}': '{x}' is listed twice");
                }
            }
            Ok(())
        }
        no_duplicates("shots", &self.shots)?;
        no_duplicates("methods", &self.methods)?;
        no_duplicates("upstream", &self.upstream)?;
        no_duplicates("downstream", &self.downstream)?;
        if let Some(a) = &self.ablation {
            no_duplicates("ablation.methods", &a.methods)?;
            no_duplicates("ablation.sizes", &a.sizes)?;
            no_duplicates("ablation.tasks", &a.tasks)?;
            no_duplicates("ablation.retrieval_by", &a.retrieval_by)?;
        }
        // The plan holds one entry per cell: refuse counts whose plan could not even be held in memory.
        let cells = self.planned_cells();
        let draws = self.ablation.as_ref().map_or(0, |a| a.draws);
        if cells.is_none_or(|n| n > MAX_CELLS) || self.seeds > MAX_CELLS || draws > MAX_CELLS {
            bail!(
                "fields 'seeds' / 'ablation.draws' ({} / {}) make {} cells, about {} bytes of plan alone \
                 (~{PLAN_BYTES_PER_CELL} bytes a cell); at most {MAX_CELLS} cells",
                self.seeds,
                draws,
                cells.map_or("more than 2^64".to_string(), |n| n.to_string()),
                cells.map_or("more than 2^64".to_string(), |n| n.saturating_mul(PLAN_BYTES_PER_CELL).to_string())
            );
        }
        Ok(())
    }

    /// Number of cells the config plans (main grid and ablation; for the ablation an upper bound, as a size with
    /// fewer possible subsets than draws has fewer draws), `None` on overflow.
    pub fn planned_cells(&self) -> Option<usize> {
        let main = self
            .downstream
            .len()
            .checked_mul(self.shots.len())?
            .checked_mul(self.seeds)?
            .checked_mul(self.methods.len())?;
        let ablation = match &self.ablation {
            None => 0,
            Some(a) => {
                let tasks = if a.tasks.is_empty() { self.downstream.len() } else { a.tasks.len() };
                let sizes = if a.sizes.is_empty() { 64 } else { a.sizes.len() };
                let per = 1 + if a.retrieval { a.retrieval_by.len() } else { 0 };
                tasks.checked_mul(sizes)?.checked_mul(a.draws)?.checked_mul(a.methods.len())?.checked_mul(per)?
            }
        };
        main.checked_add(ablation)
    }
}

/// Most cells a sweep config may plan (the largest committed suite has a few thousand).
pub const MAX_CELLS: usize = 10_000_000;
/// Rough size of one planned cell (key, names, module list) for the error message.
const PLAN_BYTES_PER_CELL: usize = 256;

/// The arithmetic the sweep's cells are computed in (`--compute`, where the CPU has it): `"f32"` or `"bf16"`.
pub fn compute_mode() -> &'static str {
    if crate::engine::gemm::bf16_active() {
        "bf16"
    } else {
        "f32"
    }
}

fn f32_mode() -> String {
    "f32".into()
}

/// One finished cell (a line of results.jsonl).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cell {
    pub key: String,
    pub kind: String,
    pub task: String,
    pub method: String,
    pub shots: String,
    pub seed: u64,
    pub n_modules: usize,
    pub modules: Vec<String>,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub trainable_params: usize,
    pub train_seconds: f64,
    #[serde(default)]
    pub weights: BTreeMap<String, Vec<f32>>,
    /// The arithmetic the cell was computed in ([`compute_mode`]); lines written before it was recorded are f32.
    #[serde(default = "f32_mode")]
    pub compute: String,
    /// `auto`'s choices (modules kept, scale, candidates' scores, head steps); absent for other methods.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub auto: serde_json::Value,
}

/// Read results.jsonl; a torn last line (a kill mid-write) is cut off, any other bad line is an error. Only the
/// process that appends to `path` (it holds its lock) may call this; others read with [`read_results_shared`].
pub fn read_results(path: &Path) -> Result<Vec<Cell>> {
    let (cells, good, len) = parse_results(path)?;
    if good < len {
        let f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.set_len(good as u64)?;
    }
    Ok(cells)
}

/// Read a results file another process may be appending to: a torn last line is skipped, the file left alone.
pub fn read_results_shared(path: &Path) -> Result<Vec<Cell>> {
    Ok(parse_results(path)?.0)
}

/// The complete lines of a results file, the length they cover, and the file's length.
fn parse_results(path: &Path) -> Result<(Vec<Cell>, usize, usize)> {
    if !path.exists() {
        return Ok((Vec::new(), 0, 0));
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut cells = Vec::new();
    let mut good = 0usize;
    let mut pos = 0usize;
    for (i, line) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Cell>(line) {
            Ok(c) if complete => {
                cells.push(c);
                good = pos + line.len();
            }
            _ if !complete => break,
            Err(e) => bail!("{}:{}: not a result line: {e}", path.display(), i + 1),
            Ok(_) => unreachable!(),
        }
        pos += line.len();
    }
    Ok((cells, good, bytes.len()))
}

fn append_result(path: &Path, c: &Cell) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut line = serde_json::to_vec(c)?;
    line.push(b'\n');
    f.write_all(&line).with_context(|| format!("cannot write {}", path.display()))?;
    f.sync_data().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn sha256_files(paths: &[PathBuf]) -> Result<String> {
    let mut h = Sha256::new();
    for p in paths {
        crate::util::ensure_regular(p)?;
        let bytes = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
        h.update(p.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default().as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn task_files(dir: &Path) -> Vec<PathBuf> {
    let names: &[&str] = if dir.join("image.json").exists() {
        &["labels.txt", "image.json", "train.bin", "valid.bin", "test.bin"]
    } else {
        &["labels.txt", "train.jsonl", "valid.jsonl", "test.jsonl"]
    };
    names.iter().map(|f| dir.join(f)).collect()
}

/// The hash a bank module's directory is named by: the model's and the task's file hashes and every setting the
/// trained module depends on — the bank settings, the token length it is trained with (`adapt.max_len`), the
/// arithmetic (`compute`) and the loracomp version.
pub fn bank_key(model_hash: &str, task_hash: &str, cfg: &SweepConfig, compute: &str) -> Result<String> {
    let settings = serde_json::to_string(&json!({"bank": cfg.bank, "max_len": cfg.adapt.max_len, "compute": compute,
                                                 "loracomp": env!("CARGO_PKG_VERSION")}))?;
    let mut h = Sha256::new();
    h.update(model_hash.as_bytes());
    h.update(task_hash.as_bytes());
    h.update(settings.as_bytes());
    Ok(format!("{:x}", h.finalize()))
}

/// Sweep progress and options.
pub struct SweepOpts {
    pub quiet: bool,
    pub threads: usize,
    /// Downstream tasks whose cells to run (empty: all).
    pub tasks: Vec<String>,
    /// Only this stage (`None`: all three).
    pub stage: Option<Stage>,
    /// This process's share of the bank and the cells (`None`: one process does everything, appending to
    /// `results.jsonl` under `.sweep.lock`, as before sharding existed).
    pub shard: Option<Shard>,
}

impl SweepOpts {
    pub fn new(quiet: bool, threads: usize) -> Self {
        SweepOpts { quiet, threads, tasks: Vec::new(), stage: None, shard: None }
    }
}

/// The state the report and plots are drawn from.
pub struct SweepOutput {
    pub cells: Vec<Cell>,
    /// Cosine of mean base-model embeddings, per downstream task and upstream module.
    pub similarity: BTreeMap<String, BTreeMap<String, f64>>,
    /// CKA gain with the downstream labels (see `similarity.rs`), per downstream task and upstream module.
    pub cka: BTreeMap<String, BTreeMap<String, f64>>,
    pub bank_names: Vec<String>,
    /// Keys of the planned cells that have no result yet (in plan order).
    pub missing: Vec<String>,
    /// Whether the report was written (a shard's own stages write none).
    pub reported: bool,
    /// Each bank module's own scores on its upstream task (the modules' metrics.json; empty where unknown).
    pub upstream: BTreeMap<String, super::report::UpstreamScore>,
    /// Worker threads the cells ran on (for the report's time summary).
    pub threads: usize,
}

/// One sweep at a time per output directory: `DIR/.sweep.lock` ([`crate::util::DirLock`]) holds the running
/// sweep's process id. A lock left by a process that no longer runs (killed) is taken over; one this process
/// already holds is shared (the CLI takes it before touching the directory, then calls [`run`]).
pub struct SweepLock(#[allow(dead_code)] crate::util::DirLock);

impl SweepLock {
    pub fn take(out: &Path) -> Result<Self> {
        Ok(SweepLock(crate::util::DirLock::take(out, ".sweep.lock", "sweep")?))
    }
}

/// A lock on one shard's file (`DIR/shards/…-I-of-N.lock`): an exclusive `flock` held while the shard runs,
/// so two processes never append to one shard file. The kernel releases it when its holder dies, however it
/// dies (a `scancel`, a node lost), so a rerun on any node takes it at once; the file itself stays (removing it
/// would let a waiting process lock a deleted file).
pub struct ShardLock(#[allow(dead_code)] std::fs::File);

impl ShardLock {
    pub fn take(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(path).unwrap_or_default();
                bail!(
                    "{}: another process ({}) is running this shard; wait for it to end",
                    path.display(),
                    holder.trim()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let mut g = &f;
        g.set_len(0).ok();
        write!(g, "process {} on {}", std::process::id(), host.trim()).ok();
        Ok(ShardLock(f))
    }
}

/// Every name in `tasks` (the `--tasks` filter) must be one of the config's downstream tasks.
pub fn check_tasks(cfg: &SweepConfig, tasks: &[String]) -> Result<()> {
    let ablation_tasks = cfg.ablation.as_ref().map(|a| a.tasks.clone()).unwrap_or_default();
    for t in tasks {
        if !cfg.downstream.contains(t) && !ablation_tasks.contains(t) {
            bail!("--tasks: '{t}' is not a downstream task of this config (downstream: {})", cfg.downstream.join(", "));
        }
    }
    Ok(())
}

/// One module of the bank in the plan.
#[derive(Clone, Debug)]
pub struct BankItem {
    pub name: String,
    pub dir: PathBuf,
    pub cost: f64,
}

/// One planned cell: its key (grid position and the stamp of everything that changes its result), what it runs
/// and its estimated cost.
#[derive(Clone, Debug)]
pub struct PlannedCell {
    pub key: String,
    pub task: String,
    pub method: String,
    pub shots: ShotSpec,
    pub seed: u64,
    pub modules: Vec<String>,
    pub cost: f64,
}

/// Everything a sweep will do, derived from the config and its inputs alone (no timing, nothing of what is
/// done): the same in every shard.
pub struct Plan {
    pub bank: Vec<BankItem>,
    pub cells: Vec<PlannedCell>,
    pub input_hashes: BTreeMap<String, String>,
    /// Parameters of the model that take part in matrix products, for the cost estimate.
    pub model_params: f64,
    /// Estimated tokens an example (the mean over the downstream tasks), for the cost estimate.
    pub tokens: f64,
}

impl Plan {
    /// The plan of `cfg` (inputs hashed; bank modules and cells in their fixed order).
    pub fn new(cfg: &SweepConfig, out: &Path) -> Result<Plan> {
        let model_hash = sha256_files(&LoadedModel::files(&cfg.model))?;
        let mut input_hashes = BTreeMap::new();
        input_hashes.insert("model".to_string(), model_hash.clone());
        let version = env!("CARGO_PKG_VERSION");
        let compute = compute_mode();
        // The bank: trained once per (model, task data, settings, max_len, arithmetic, version).
        let mut bank = Vec::new();
        let mut bank_keys = BTreeMap::new();
        for up in &cfg.upstream {
            let tdir = cfg.data.join(up);
            let th = sha256_files(&task_files(&tdir))?;
            input_hashes.insert(format!("task:{up}"), th.clone());
            let key = bank_key(&model_hash, &th, cfg, compute)?;
            let dir = out.join("bank").join(format!("{up}-{}", &key[..12]));
            let cost = super::shard::bank_cost(
                cfg.bank.epochs,
                super::shard::split_len(&tdir, "train")?,
                super::shard::split_len(&tdir, "valid")?,
            );
            bank_keys.insert(up.clone(), key);
            bank.push(BankItem { name: up.clone(), dir, cost });
        }
        // Each downstream task's stamp: its data, the model, the bank modules it may use, the few-shot
        // settings, the arithmetic and the version. A cell whose stamp differs is another experiment.
        let adapt_json = serde_json::to_string(&cfg.adapt)?;
        let mut stamps: HashMap<String, String> = HashMap::new();
        let mut sizes: HashMap<String, (usize, usize, usize)> = HashMap::new();
        let mut stamp_of = |task: &str| -> Result<(String, (usize, usize, usize))> {
            if let Some(s) = stamps.get(task) {
                return Ok((s.clone(), sizes[task]));
            }
            let tdir = cfg.data.join(task);
            let th = sha256_files(&task_files(&tdir))?;
            input_hashes.insert(format!("task:{task}"), th.clone());
            let mut h = Sha256::new();
            h.update(format!("loracomp={version}|compute={compute}|exclude_self={}|", cfg.exclude_self).as_bytes());
            for part in [&model_hash, &th, &adapt_json] {
                h.update(part.as_bytes());
                h.update(b"|");
            }
            for (up, k) in &bank_keys {
                if !(cfg.exclude_self && up == task) {
                    h.update(format!("{up}={k}|").as_bytes());
                }
            }
            let stamp = format!("{:x}", h.finalize())[..16].to_string();
            let classes = Task::open(&tdir)?.labels.len();
            let n = (classes, super::shard::split_len(&tdir, "train")?, super::shard::split_len(&tdir, "test")?);
            stamps.insert(task.to_string(), stamp.clone());
            sizes.insert(task.to_string(), n);
            Ok((stamp, n))
        };
        let cost = |method: &str, modules: usize, k: ShotSpec, n: (usize, usize, usize)| {
            let fewshot = k.0.map_or(n.1, |k| (k * n.0).min(n.1));
            super::shard::cell_cost(method, modules, cfg.adapt.steps, cfg.adapt.batch, fewshot, n.2)
        };
        let bank_size = |m: &str, n: usize| if m.parse::<Method>().is_ok_and(|m| m.needs_bank()) { n } else { 0 };
        let mut cells = Vec::new();
        for task in &cfg.downstream {
            let (stamp, n) = stamp_of(task)?;
            let bank_for: Vec<String> =
                cfg.upstream.iter().filter(|u| !(cfg.exclude_self && *u == task)).cloned().collect();
            for &k in &cfg.shots {
                for seed in 0..cfg.seeds as u64 {
                    for m in &cfg.methods {
                        cells.push(PlannedCell {
                            key: format!("main|{task}|{m}|{k}|{seed}|{stamp}"),
                            task: task.clone(),
                            method: m.clone(),
                            shots: k,
                            seed,
                            modules: bank_for.clone(),
                            cost: cost(m, bank_size(m, bank_for.len()), k, n),
                        });
                    }
                }
            }
        }
        if let Some(ab) = &cfg.ablation {
            let tasks = if ab.tasks.is_empty() { cfg.downstream.clone() } else { ab.tasks.clone() };
            let k = ShotSpec(Some(ab.shots));
            for task in &tasks {
                let (stamp, n) = stamp_of(task)?;
                let pool: Vec<String> =
                    cfg.upstream.iter().filter(|u| !(cfg.exclude_self && *u == task)).cloned().collect();
                let mut sizes = if ab.sizes.is_empty() {
                    let mut s = vec![];
                    let mut n = 1;
                    while n < pool.len() {
                        s.push(n);
                        n *= 2;
                    }
                    s.push(pool.len());
                    s
                } else {
                    ab.sizes.clone()
                };
                sizes.retain(|&s| s >= 1 && s <= pool.len());
                for &size in &sizes {
                    let subsets = ablation_subsets(&pool, size, ab.draws);
                    for draw in 0..ab.draws as u64 {
                        for m in &ab.methods {
                            if let Some(d) = subsets.get(draw as usize) {
                                cells.push(PlannedCell {
                                    key: format!("ablation|{task}|{m}|{size}|{draw}|{stamp}-k{}{}", ab.shots, d.tag),
                                    task: task.clone(),
                                    method: m.clone(),
                                    shots: k,
                                    seed: draw,
                                    modules: d.modules.clone(),
                                    cost: cost(m, size, k, n),
                                });
                            }
                            for by in ab.retrieval_by.iter().filter(|_| ab.retrieval) {
                                let kind =
                                    if by == "arrow" { "retrieval".to_string() } else { format!("retrieval-{by}") };
                                cells.push(PlannedCell {
                                    key: format!("{kind}|{task}|{m}|{size}|{draw}|{stamp}-k{}", ab.shots),
                                    task: task.clone(),
                                    method: m.clone(),
                                    shots: k,
                                    seed: draw,
                                    modules: pool.clone(),
                                    cost: cost(m, size, k, n) + cost("linear-probe", pool.len(), k, n),
                                });
                            }
                        }
                    }
                }
            }
        }
        let model_params = super::shard::matmul_params(&cfg.model);
        let tokens = cfg
            .downstream
            .iter()
            .map(|t| super::shard::tokens_per_example(&cfg.data.join(t), cfg.adapt.max_len))
            .sum::<f64>()
            / cfg.downstream.len().max(1) as f64;
        Ok(Plan { bank, cells, input_hashes, model_params, tokens })
    }

    /// The shard of each bank module (in plan order).
    pub fn bank_shards(&self, count: usize) -> Vec<usize> {
        let items: Vec<(&str, f64)> = self.bank.iter().map(|b| (b.name.as_str(), b.cost)).collect();
        super::shard::assign(&items, count)
    }

    /// The shard of each cell (in plan order).
    pub fn cell_shards(&self, count: usize) -> Vec<usize> {
        let items: Vec<(&str, f64)> = self.cells.iter().map(|c| (c.key.as_str(), c.cost)).collect();
        super::shard::assign(&items, count)
    }

    /// Estimated CPU seconds of `cost` example passes with this model.
    pub fn cpu_seconds(&self, cost: f64) -> f64 {
        cost * super::shard::seconds_per_pass(self.model_params, self.tokens)
    }
}

/// One random subset of the module-count ablation, and the suffix its cells' keys carry (empty for a subset the
/// first draw of its seed gave, which is what every draw was before draws were made distinct, so those results
/// stay valid).
#[derive(Clone, Debug, PartialEq)]
pub struct AblationDraw {
    pub modules: Vec<String>,
    pub tag: String,
}

/// Number of `k`-subsets of `n` things, saturating.
pub fn binomial(n: usize, k: usize) -> usize {
    if k > n {
        return 0;
    }
    let k = k.min(n - k);
    let mut c: u128 = 1;
    for i in 0..k {
        c = c * (n - i) as u128 / (i + 1) as u128;
        if c > usize::MAX as u128 {
            return usize::MAX;
        }
    }
    c as usize
}

/// The distinct random subsets of `size` modules of `pool` for the ablation's draws of one (task, size), sorted
/// by name within each subset; deterministic (draw `d` is seeded with 1000 + 7919·d + size).
///
/// With more possible subsets than `draws`, draw `d` shuffles the pool with its seed and takes the first `size`;
/// a subset an earlier draw already has is drawn again from the same generator until it is new (its keys then
/// end in `-r<redraws>`). With no more possible subsets than `draws` (e.g. the whole pool: one), the result is
/// every subset once, in lexicographic order of pool positions (keys end in `-all<count>`, except the single
/// subset, which is what every draw of it was before), so there are fewer draws than configured; the report says so.
pub fn ablation_subsets(pool: &[String], size: usize, draws: usize) -> Vec<AblationDraw> {
    let possible = binomial(pool.len(), size);
    if possible <= draws {
        let mut out = Vec::new();
        let mut idx: Vec<usize> = (0..size).collect();
        loop {
            let mut modules: Vec<String> = idx.iter().map(|&i| pool[i].clone()).collect();
            modules.sort();
            let tag = if possible == 1 { String::new() } else { format!("-all{possible}") };
            out.push(AblationDraw { modules, tag });
            // next combination: the rightmost index that can move, then the ones after it in a row
            let Some(i) = (0..size).rev().find(|&i| idx[i] < pool.len() - size + i) else { break };
            idx[i] += 1;
            for j in i + 1..size {
                idx[j] = idx[j - 1] + 1;
            }
        }
        return out;
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for draw in 0..draws as u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + draw * 7919 + size as u64);
        let mut redraws = 0usize;
        loop {
            let mut sub = pool.to_vec();
            sub.shuffle(&mut rng);
            sub.truncate(size);
            sub.sort();
            if seen.insert(sub.clone()) {
                let tag = if redraws == 0 { String::new() } else { format!("-r{redraws}") };
                out.push(AblationDraw { modules: sub, tag });
                break;
            }
            redraws += 1;
        }
    }
    out
}

/// Where shard `shard` appends its cells.
pub fn shard_file(out: &Path, shard: Shard) -> PathBuf {
    out.join("shards").join(format!("cells-{}.jsonl", shard.tag()))
}

/// Every result written so far: `results.jsonl` first, then each shard file (by name); the first line of each
/// key wins. Files other processes may be appending to are read without touching them.
pub fn collect_results(out: &Path) -> Result<Vec<Cell>> {
    let mut files = vec![out.join("results.jsonl")];
    let sdir = out.join("shards");
    if sdir.is_dir() {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&sdir)
            .with_context(|| format!("cannot read {}", sdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        names.sort();
        files.extend(names);
    }
    let mut seen = HashSet::new();
    let mut cells = Vec::new();
    for f in files {
        for c in read_results_shared(&f)? {
            if seen.insert(c.key.clone()) {
                cells.push(c);
            }
        }
    }
    Ok(cells)
}

/// Whether `out` holds any result (in results.jsonl or a shard file).
pub fn has_results(out: &Path) -> bool {
    let nonempty = |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.len() > 0);
    nonempty(&out.join("results.jsonl"))
        || std::fs::read_dir(out.join("shards"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.path().extension().is_some_and(|x| x == "jsonl") && nonempty(&e.path()))
            })
            .unwrap_or(false)
}

/// `loracomp sweep`: load and check the config at `config`, take `out` (refusing one that holds another
/// config's results unless `force`), save the config there and run (or resume) the sweep, its stage or its
/// shard. The CLI and the Python package call this.
pub fn run_config(config: &Path, out: &Path, opts: &SweepOpts, force: bool) -> Result<SweepOutput> {
    let cfg = SweepConfig::load(config)?;
    cfg.check_inputs().map_err(|e| anyhow!("{}: {e:#}", config.display()))?;
    check_tasks(&cfg, &opts.tasks)?;
    let text = std::fs::read_to_string(config).with_context(|| format!("cannot read {}", config.display()))?;
    let single = opts.stage.is_none() && opts.shard.is_none();
    let _lock = if single { Some(SweepLock::take(out)?) } else { None };
    if !single && force {
        bail!("--force: not with --stage or --shard (other shards may be writing); start over with a plain sweep");
    }
    let fresh = !out.join("config.toml").exists();
    save_config(out, config, &text, force)?;
    let res = run(&cfg, &text, out, opts);
    // A sweep that failed before any result leaves no config.toml of its own behind.
    if res.is_err() && fresh && !has_results(out) {
        let _ = std::fs::remove_file(out.join("config.toml"));
    }
    res
}

/// Save the config text in `out/config.toml`; a directory holding another config's results is refused unless
/// `force` (then its results are removed).
pub fn save_config(out: &Path, config: &Path, text: &str, force: bool) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let saved = out.join("config.toml");
    // Only results make a directory another config's: a config.toml without any is replaced.
    let has_results = has_results(out);
    if saved.exists() {
        let old = std::fs::read_to_string(&saved).with_context(|| format!("cannot read {}", saved.display()))?;
        if old == text {
            return Ok(());
        }
        if has_results {
            if !force {
                bail!(
                    "{}: holds results of a different config ({}, not {}); pass --force to start over",
                    out.display(),
                    saved.display(),
                    config.display()
                );
            }
            std::fs::remove_file(out.join("results.jsonl")).ok();
            std::fs::remove_dir_all(out.join("shards")).ok();
        }
    }
    crate::util::write_atomic(&saved, text.as_bytes())
}

/// The output of a run that drew no report: the cells it ran and the planned cells still without a result.
fn unreported(cfg: &SweepConfig, plan: &Plan, out: &Path, ran: Vec<Cell>) -> Result<SweepOutput> {
    let missing = missing_keys(plan, &collect_results(out)?);
    Ok(SweepOutput {
        cells: ran,
        similarity: BTreeMap::new(),
        cka: BTreeMap::new(),
        bank_names: cfg.upstream.clone(),
        missing,
        reported: false,
        upstream: BTreeMap::new(),
        threads: rayon::current_num_threads(),
    })
}

/// Run (or resume) a sweep into `out`: every stage in one process (`opts.shard` `None`), or one shard's part
/// of the stages `opts.stage` names.
pub fn run(cfg: &SweepConfig, cfg_text: &str, out: &Path, opts: &SweepOpts) -> Result<SweepOutput> {
    let t0 = std::time::Instant::now();
    check_tasks(cfg, &opts.tasks)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let log = |s: &str| {
        if !opts.quiet {
            eprintln!("{s}");
        }
    };
    let plan = Plan::new(cfg, out)?;
    let stages: Vec<Stage> = opts.stage.map_or(Stage::ALL.to_vec(), |s| vec![s]);
    // One process for the whole sweep: `.sweep.lock` for everything, cells appended to results.jsonl. Otherwise
    // (a stage or a shard) each shard's part under its own lock, cells to its own file (`--stage` alone: 0/1).
    let sharded = opts.shard.is_some() || opts.stage.is_some();
    let shard = opts.shard.unwrap_or(Shard::ONE);
    let _lock = if sharded { None } else { Some(SweepLock::take(out)?) };
    let wanted = |task: &str| opts.tasks.is_empty() || opts.tasks.iter().any(|t| t == task);

    if stages.contains(&Stage::Bank) {
        let mine: Vec<&BankItem> = if sharded {
            let s = plan.bank_shards(shard.count);
            plan.bank.iter().zip(s).filter(|(_, s)| *s == shard.index).map(|(b, _)| b).collect()
        } else {
            plan.bank.iter().collect()
        };
        let lock = out.join("shards").join(format!("bank-{}.lock", shard.tag()));
        let _shard_lock = if sharded { Some(ShardLock::take(&lock)?) } else { None };
        let mut pb = Progress::new(mine.len(), "bank", "module", opts.quiet);
        for b in mine {
            if !b.dir.join("metrics.json").exists() {
                pb.set_message(format!("training {}", b.name));
                let mut common = crate::app::Common::new(&cfg.model, cfg.data.join(&b.name));
                common.seed = cfg.bank.seed;
                common.batch = cfg.bank.batch;
                common.lr = cfg.bank.lr;
                common.max_len = cfg.adapt.max_len;
                common.force = true;
                // Step lines of each module in a log; on a terminal the bank's own bar is enough.
                common.quiet = opts.quiet || std::io::IsTerminal::is_terminal(&std::io::stderr());
                let spec = crate::app::TrainSpec {
                    common,
                    out: b.dir.clone(),
                    rank: cfg.bank.rank,
                    alpha: cfg.bank.alpha,
                    targets: Some(cfg.bank.targets.clone()),
                    epochs: cfg.bank.epochs,
                    shots: None,
                };
                let m = crate::app::train(&spec)?;
                pb.println(&format!(
                    "bank: {}: valid accuracy {:.4}",
                    b.name,
                    m["valid_accuracy"].as_f64().unwrap_or(0.0)
                ));
            }
            pb.inc(1);
        }
        pb.finish();
    }

    let mut ran = Vec::new();
    if stages.contains(&Stage::Cells) {
        let (file, _shard_lock) = if sharded {
            let lock = ShardLock::take(&out.join("shards").join(format!("cells-{}.lock", shard.tag())))?;
            (shard_file(out, shard), Some(lock))
        } else {
            (out.join("results.jsonl"), None)
        };
        // This process's own file: a torn last line is cut off (it alone appends to it).
        read_results(&file)?;
        let done: HashSet<String> = collect_results(out)?.into_iter().map(|c| c.key).collect();
        let owner = plan.cell_shards(shard.count);
        let todo: Vec<&PlannedCell> = plan
            .cells
            .iter()
            .zip(owner)
            .filter(|(c, s)| *s == shard.index && !done.contains(&c.key) && wanted(&c.task))
            .map(|(c, _)| c)
            .collect();
        let where_ = if sharded { format!(" (shard {shard})") } else { String::new() };
        log(&format!(
            "sweep '{}'{where_}: {} cells to run ({} done in this directory)",
            cfg.name,
            todo.len(),
            done.len()
        ));
        if !todo.is_empty() {
            ran = run_cells(cfg, &plan, &todo, &file, opts)?;
        }
    }

    if !stages.contains(&Stage::Report) {
        return unreported(cfg, &plan, out, ran);
    }
    // The report merges every shard into results.jsonl: one writer at a time.
    let _report_lock = match &_lock {
        Some(_) => None,
        None => match SweepLock::take(out) {
            Ok(l) => Some(l),
            Err(e) if opts.stage.is_none() => {
                log(&format!("report skipped ({e:#}); run `--stage report` when every shard is done"));
                return unreported(cfg, &plan, out, ran);
            }
            Err(e) => return Err(e),
        },
    };
    let (cells, missing) = merge(out, &plan)?;
    // The similarities need the whole bank; a report drawn before it is trained goes without them.
    let (similarity, cka) = match load_bank(&plan) {
        Ok(bank_all) => {
            let mut lm = LoadedModel::load(&cfg.model, cfg.adapt.max_len)?;
            similarities(cfg, &mut lm, &bank_all, opts.quiet)?
        }
        Err(e) if !plan.bank.is_empty() && opts.stage == Some(Stage::Report) => {
            log(&format!("report without module similarities: {e:#}"));
            (BTreeMap::new(), BTreeMap::new())
        }
        Err(e) => return Err(e),
    };
    // Each module's own scores, from its metrics.json; kept with the similarities for `sweep report`.
    let mut upstream = BTreeMap::new();
    for b in &plan.bank {
        let p = b.dir.join("metrics.json");
        if let Ok(text) = std::fs::read_to_string(&p) {
            let m: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
            if let Some(s) = super::report::UpstreamScore::from_metrics(&m) {
                upstream.insert(b.name.clone(), s);
            }
        }
    }
    let stats = super::report::ModuleStats { similarity, cka, upstream };
    stats.write(out)?;
    let super::report::ModuleStats { similarity, cka, upstream } = stats;
    let output = SweepOutput {
        cells,
        similarity,
        cka,
        bank_names: cfg.upstream.clone(),
        missing,
        reported: true,
        upstream,
        threads: opts.threads,
    };
    super::report::write_all(cfg, &output, out)?;
    let manifest = json!({
        "name": cfg.name,
        "config": cfg_text,
        "input_sha256": plan.input_hashes,
        "seeds": (0..cfg.seeds).collect::<Vec<_>>(),
        "loracomp_version": env!("CARGO_PKG_VERSION"),
        "compute": compute_mode(),
        "git_commit": git_commit(),
        "threads": opts.threads,
        "cells": output.cells.len(),
        "cells_missing": output.missing.len(),
        "wall_seconds_this_run": t0.elapsed().as_secs_f64(),
        "train_seconds_all_cells": output.cells.iter().map(|c| c.train_seconds).sum::<f64>(),
    });
    crate::util::write_atomic(&out.join("manifest.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())?;
    Ok(output)
}

/// `loracomp sweep report`: draw report.md and the plots again from `out/config.toml`, the results in `out`
/// (results.jsonl and any shard files; read, never changed) and `out/module_stats.json` where the report stage
/// wrote one (module similarities and the bank modules' own accuracy; without it the report says they were not
/// recorded; the cosine similarity, which needs no bank, is computed again where the config's model and data are
/// at hand). Needs neither the model, the data nor the bank, and runs no cell. Missing cells are the main grid's
/// (task, method, shots, seed) positions without a result; the ablation's planned keys need the inputs' hashes,
/// so they are not listed.
pub fn rerender(out: &Path) -> Result<SweepOutput> {
    let path = out.join("config.toml");
    let cfg = SweepConfig::load(&path)?;
    let _lock = SweepLock::take(out)?;
    let cells = collect_results(out)?;
    if cells.is_empty() {
        bail!("{}: no results (results.jsonl or shards/*.jsonl) to report", out.display());
    }
    let have: HashSet<(&str, &str, &str, u64)> = cells
        .iter()
        .filter(|c| c.kind == "main")
        .map(|c| (c.task.as_str(), c.method.as_str(), c.shots.as_str(), c.seed))
        .collect();
    let mut missing = Vec::new();
    for task in &cfg.downstream {
        for k in &cfg.shots {
            let k = k.to_string();
            for seed in 0..cfg.seeds as u64 {
                for m in &cfg.methods {
                    if !have.contains(&(task.as_str(), m.as_str(), k.as_str(), seed)) {
                        missing.push(format!("main|{task}|{m}|{k}|{seed}"));
                    }
                }
            }
        }
    }
    let stats = match super::report::ModuleStats::read(out)? {
        Some(s) => s,
        // Results from before module_stats.json: the cosine similarity needs only the model and the data (no
        // bank), so it is computed again where they are at hand; the CKA gain needs the bank and stays unknown.
        None => {
            let mut s = super::report::ModuleStats::default();
            let cosine = LoadedModel::load(&cfg.model, cfg.adapt.max_len)
                .and_then(|mut lm| similarities(&cfg, &mut lm, &BTreeMap::new(), true));
            match cosine {
                Ok((sim, _)) => s.similarity = sim,
                Err(e) => eprintln!("report without module similarities: {e:#}"),
            }
            s
        }
    };
    let manifest = std::fs::read_to_string(out.join("manifest.json")).ok();
    let threads = manifest
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["threads"].as_u64())
        .map_or(rayon::current_num_threads(), |t| t as usize);
    let output = SweepOutput {
        cells,
        similarity: stats.similarity,
        cka: stats.cka,
        bank_names: cfg.upstream.clone(),
        missing,
        reported: true,
        upstream: stats.upstream,
        threads,
    };
    super::report::write_all(&cfg, &output, out)?;
    Ok(output)
}

/// The planned cells without a result.
fn missing_keys(plan: &Plan, have: &[Cell]) -> Vec<String> {
    let have: HashSet<&str> = have.iter().map(|c| c.key.as_str()).collect();
    plan.cells.iter().filter(|c| !have.contains(c.key.as_str())).map(|c| c.key.clone()).collect()
}

/// Merge results.jsonl and every shard file into results.jsonl (atomically; the plan's cells in plan order,
/// each once). Cells of no planned key (another stamp: other inputs, settings, arithmetic or version) go to
/// stale-results.jsonl instead, never into the report. Running it again changes nothing.
fn merge(out: &Path, plan: &Plan) -> Result<(Vec<Cell>, Vec<String>)> {
    read_results(&out.join("results.jsonl"))?;
    let all = collect_results(out)?;
    let planned: HashSet<&str> = plan.cells.iter().map(|c| c.key.as_str()).collect();
    let (fresh, stale): (Vec<Cell>, Vec<Cell>) = all.into_iter().partition(|c| planned.contains(c.key.as_str()));
    let mut by_key: HashMap<String, Cell> = fresh.into_iter().map(|c| (c.key.clone(), c)).collect();
    let cells: Vec<Cell> = plan.cells.iter().filter_map(|p| by_key.remove(&p.key)).collect();
    let mut text = Vec::new();
    for c in &cells {
        text.extend(serde_json::to_vec(c)?);
        text.push(b'\n');
    }
    crate::util::write_atomic(&out.join("results.jsonl"), &text)?;
    if !stale.is_empty() {
        let path = out.join("stale-results.jsonl");
        let mut kept = read_results(&path)?;
        let seen: HashSet<String> = kept.iter().map(|c| c.key.clone()).collect();
        kept.extend(stale.into_iter().filter(|c| !seen.contains(&c.key)));
        let mut text = Vec::new();
        for c in &kept {
            text.extend(serde_json::to_vec(c)?);
            text.push(b'\n');
        }
        crate::util::write_atomic(&path, &text)?;
    }
    let missing = missing_keys(plan, &cells);
    Ok((cells, missing))
}

/// Every bank module of the plan, loaded; a module not trained yet is an error naming it.
fn load_bank(plan: &Plan) -> Result<BTreeMap<String, Adapter>> {
    plan.bank
        .iter()
        .map(|b| {
            if !b.dir.join("metrics.json").exists() {
                bail!(
                    "bank module '{}' is not trained yet ({} has no metrics.json): run the bank stage \
                     (`--stage bank`) for every shard first",
                    b.name,
                    b.dir.display()
                );
            }
            Ok((b.name.clone(), Adapter::load(&b.dir)?))
        })
        .collect()
}

/// Run `todo`, appending each finished cell to `file` at once; returns the cells run.
fn run_cells(
    cfg: &SweepConfig,
    plan: &Plan,
    todo: &[&PlannedCell],
    file: &Path,
    opts: &SweepOpts,
) -> Result<Vec<Cell>> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let bank_all = load_bank(plan)?;
    let lm = LoadedModel::load(&cfg.model, cfg.adapt.max_len)?;
    let default_pooling = lm.kind.default_pooling();
    let mut tasks: HashMap<String, (Task, Examples, Vec<Encoded>)> = HashMap::new();
    let mut ran = Vec::new();
    let total = todo.len();
    let mut pb = Progress::new(total, "cells", "cell", opts.quiet);
    for p in todo {
        let (task_name, method, k, seed) = (&p.task, &p.method, p.shots, p.seed);
        pb.set_message(format!("{task_name} {method} {k}-shot seed {seed}"));
        if !tasks.contains_key(task_name) {
            let t = Task::open(&cfg.data.join(task_name))?;
            let test = t.examples("test")?;
            let test = match cfg.adapt.eval_limit {
                Some(n) => test.spread(n),
                None => test,
            };
            let (tr, te) = (t.examples("train")?, encode_examples(&lm.frontend, &test)?);
            tasks.insert(task_name.clone(), (t, tr, te));
        }
        let (task, train, test) = &tasks[task_name];
        let m: Method = method.parse().map_err(|e: String| anyhow!(e))?;
        let fs = encode_examples(&lm.frontend, &train.sample_k_shot(task.labels.len(), k.0, seed).0)?;
        let bank: Vec<Adapter> =
            if m.needs_bank() { p.modules.iter().map(|b| bank_all[b].clone()).collect() } else { Vec::new() };
        let mut o = AdaptOpts::defaults(m, seed);
        o.pooling = default_pooling;
        o.loop_opts.steps = cfg.adapt.steps;
        o.loop_opts.batch = cfg.adapt.batch;
        o.rank = cfg.adapt.lora_rank;
        o.targets = lm.kind.default_targets();
        o.alpha = cfg.adapt.lora_alpha;
        if let Some(lr) = cfg.adapt.lr.get(method) {
            o.lr_body = *lr;
        }
        if let Some(lr) = cfg.adapt.lr_head {
            o.lr_head = lr;
        }
        if let Some(l) = cfg.adapt.auto_lora_from {
            o.auto.lora_from = l.0;
        }
        let kind = p.key.split('|').next().unwrap_or_default().to_string();
        if let Some(by) = kind.strip_prefix("retrieval") {
            o.select = p.key.split('|').nth(3).and_then(|s| s.parse().ok());
            o.select_by = by.trim_start_matches('-').parse().unwrap_or(crate::methods::Retrieval::Arrow);
        }
        let r = adapt_encoded(lm.base(&task.labels)?, lm.pad_id(), task.labels.len(), &fs, test, &bank, &o)?;
        let used: Vec<String> = r.used_modules.iter().map(|&i| p.modules[i].clone()).collect();
        let cell = Cell {
            key: p.key.clone(),
            kind,
            task: task_name.clone(),
            method: method.clone(),
            shots: k.to_string(),
            seed,
            n_modules: if m.needs_bank() { used.len() } else { 0 },
            modules: if m.needs_bank() { used } else { Vec::new() },
            accuracy: r.scores.accuracy,
            macro_f1: r.scores.macro_f1,
            trainable_params: r.trainable_params,
            train_seconds: r.train_seconds,
            weights: if m == Method::Learned { r.weights.into_iter().collect() } else { BTreeMap::new() },
            compute: compute_mode().to_string(),
            auto: if m == Method::Auto { r.details } else { serde_json::Value::Null },
        };
        append_result(file, &cell)?;
        pb.println(&format!(
            "cell {}/{total}: {} {} {}-shot seed {}: accuracy {:.4} ({:.1}s)",
            ran.len() + 1,
            cell.task,
            cell.method,
            cell.shots,
            cell.seed,
            cell.accuracy,
            cell.train_seconds
        ));
        ran.push(cell);
        pb.inc(1);
    }
    pb.finish();
    Ok(ran)
}

type Similarities = (BTreeMap<String, BTreeMap<String, f64>>, BTreeMap<String, BTreeMap<String, f64>>);

/// Similarity of each upstream task to each downstream task: the cosine of their mean base-model embeddings
/// and the CKA gain of each module alone with the downstream labels (encoder models with a `learned` method).
fn similarities(
    cfg: &SweepConfig,
    lm: &mut LoadedModel,
    bank_all: &BTreeMap<String, Adapter>,
    quiet: bool,
) -> Result<Similarities> {
    let default_pooling = lm.kind.default_pooling();
    let mut similarity = BTreeMap::new();
    // Similarity of each upstream task to each downstream task: cosine of their mean base-model embeddings.
    let centroid = |lm: &mut LoadedModel, dir: &Path| -> Result<Vec<f32>> {
        let t = Task::open(dir)?;
        let ex = t.examples("train")?.take(128);
        let e = embed_examples(lm, &ex, Pooling::Mean, true, 64)?;
        let d = e[0].len();
        let mut c = vec![0.0f32; d];
        for v in &e {
            c.iter_mut().zip(v).for_each(|(a, b)| *a += b / e.len() as f32);
        }
        Ok(c)
    };
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        (dot / (na * nb).max(1e-12)) as f64
    };
    // (Encoder features only: a generative model has none, and its sweeps report no similarity.)
    let features = !lm.kind.is_generative();
    if features && cfg.methods.iter().any(|m| m == "learned") && !cfg.upstream.is_empty() {
        let ups: Vec<(String, Vec<f32>)> =
            cfg.upstream.iter().map(|u| Ok((u.clone(), centroid(lm, &cfg.data.join(u))?))).collect::<Result<_>>()?;
        for d in &cfg.downstream {
            let c = centroid(lm, &cfg.data.join(d))?;
            similarity.insert(d.clone(), ups.iter().map(|(u, cu)| (u.clone(), cos(cu, &c))).collect());
        }
    }
    // CKA gain of each module alone with each downstream task's labels (up to 32 training examples a class).
    let mut cka = BTreeMap::new();
    if features && cfg.methods.iter().any(|m| m == "learned") && !cfg.upstream.is_empty() && !bank_all.is_empty() {
        let mut pb = Progress::new(cfg.downstream.len(), "similarity (CKA)", "task", quiet);
        for d in &cfg.downstream {
            let t = Task::open(&cfg.data.join(d))?;
            let classes = t.labels.len();
            let probe = encode_examples(&lm.frontend, &t.examples("train")?.sample_k_shot(classes, Some(32), 0).0)?;
            let names: Vec<String> = cfg.upstream.iter().filter(|u| !(cfg.exclude_self && *u == d)).cloned().collect();
            let bank: Vec<Adapter> = names.iter().map(|b| bank_all[b].clone()).collect();
            let (_, gains) = crate::methods::similarity::module_cka_gain(
                lm.encoder()?,
                lm.pad_id(),
                &bank,
                &probe,
                classes,
                default_pooling,
            )?;
            cka.insert(d.clone(), names.into_iter().zip(gains).collect());
            pb.inc(1);
        }
        pb.finish();
    }
    Ok((similarity, cka))
}

fn git_commit() -> Value {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| json!(String::from_utf8_lossy(&o.stdout).trim().to_string()))
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::process_running;

    const BASE: &str = "name = \"t\"\nmodel = \"m\"\ndata = \"d\"\nupstream = [\"a\", \"b\"]\ndownstream = [\"c\"]\n\
                        methods = [\"linear-probe\", \"learned\"]\nshots = [1, 2]\n";

    fn parse_err(text: &str) -> String {
        format!("{:#}", SweepConfig::parse(Path::new("x/sweep.toml"), text).unwrap_err())
    }

    #[test]
    fn duplicates_escaping_task_names_and_unbounded_counts_are_refused() {
        SweepConfig::parse(Path::new("x/sweep.toml"), BASE).unwrap();
        for (from, to, needle) in [
            ("shots = [1, 2]", "shots = [1, 2, 1]", "field 'shots': '1' is listed twice"),
            ("\"learned\"]", "\"learned\", \"learned\"]", "field 'methods': 'learned' is listed twice"),
            ("[\"a\", \"b\"]", "[\"a\", \"b\", \"a\"]", "field 'upstream': 'a' is listed twice"),
            ("[\"c\"]", "[\"c\", \"c\"]", "field 'downstream': 'c' is listed twice"),
            ("[\"a\", \"b\"]", "[\"a\", \"/tmp/evil\"]", "field 'upstream': '/tmp/evil' must be a task directory"),
            ("[\"a\", \"b\"]", "[\"a\", \"../../evil\"]", "field 'upstream': '../../evil' must be"),
            ("[\"c\"]", "[\"x/../../c\"]", "field 'downstream': 'x/../../c' must be"),
        ] {
            let text = BASE.replacen(from, to, 1);
            assert_ne!(text, BASE, "{from}");
            let e = parse_err(&text);
            assert!(e.starts_with("x/sweep.toml: ") && e.contains(needle), "{e}");
        }
        let e = parse_err(&format!("{BASE}seeds = 1000000000000\n"));
        assert!(e.contains("field") && e.contains("'seeds'") && e.contains("bytes of plan"), "{e}");
        let e = parse_err(&format!("{BASE}[ablation]\nshots = 1\ndraws = 9223372036854775807\n"));
        assert!(e.contains("'ablation.draws'") && e.contains("more than 2^64"), "{e}");
    }

    #[test]
    fn auto_lora_from_belongs_to_auto_and_stays_out_of_old_stamps() {
        let e = parse_err(&format!("{BASE}[adapt]\nauto_lora_from = 4\n"));
        assert!(e.contains("'adapt.auto_lora_from'") && e.contains("method auto"), "{e}");
        let auto = BASE.replacen("\"learned\"]", "\"auto\"]", 1);
        for (v, want) in [("4", Some(4)), ("\"off\"", None)] {
            let c = SweepConfig::parse(Path::new("x/sweep.toml"), &format!("{auto}[adapt]\nauto_lora_from = {v}\n"));
            assert_eq!(c.unwrap().adapt.auto_lora_from.map(|l| l.0), Some(want), "{v}");
        }
        for bad in ["0", "\"never\"", "-1"] {
            let e = parse_err(&format!("{auto}[adapt]\nauto_lora_from = {bad}\n"));
            assert!(e.contains("auto_lora_from") || e.contains("examples per class"), "{bad}: {e}");
        }
        // absent, the settings serialise as before the field existed: older sweeps keep their cell keys
        let json = serde_json::to_string(&AdaptSettings::default()).unwrap();
        assert!(!json.contains("auto_lora_from"), "{json}");
    }

    /// Ablation subsets are distinct within a (task, size), deterministic, the old draws wherever those were
    /// already distinct, and every possible subset once where there are no more of them than draws.
    #[test]
    fn ablation_draws_are_distinct_deterministic_and_exhaustive_when_few() {
        let pool: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
        let old = |pool: &[String], size: usize, draw: u64| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + draw * 7919 + size as u64);
            let mut sub = pool.to_vec();
            sub.shuffle(&mut rng);
            sub.truncate(size);
            sub.sort();
            sub
        };
        let mut redrawn = 0;
        for n in [3usize, 4, 5, 10] {
            for size in 1..=n {
                for draws in [1usize, 3, 5, 12] {
                    let p = &pool[..n];
                    let d = ablation_subsets(p, size, draws);
                    assert_eq!(d, ablation_subsets(p, size, draws), "deterministic");
                    let possible = binomial(n, size);
                    assert_eq!(d.len(), draws.min(possible), "n {n} size {size} draws {draws}");
                    let distinct: HashSet<&Vec<String>> = d.iter().map(|x| &x.modules).collect();
                    assert_eq!(distinct.len(), d.len(), "n {n} size {size} draws {draws}: {d:?}");
                    for x in &d {
                        assert_eq!(x.modules.len(), size);
                        assert!(x.modules.windows(2).all(|w| w[0] < w[1]) && x.modules.iter().all(|m| p.contains(m)));
                    }
                    if possible <= draws {
                        let tag = if possible == 1 { String::new() } else { format!("-all{possible}") };
                        assert!(d.iter().all(|x| x.tag == tag), "{d:?}");
                        continue;
                    }
                    // a draw keeps its old subset (and key) unless an earlier draw had it
                    let mut seen = HashSet::new();
                    for (i, x) in d.iter().enumerate() {
                        let o = old(p, size, i as u64);
                        if seen.insert(o.clone()) && x.tag.is_empty() {
                            assert_eq!(x.modules, o);
                        } else {
                            assert!(x.tag.starts_with("-r"), "{x:?}");
                            redrawn += 1;
                        }
                        seen.insert(x.modules.clone());
                    }
                }
            }
        }
        assert!(redrawn > 0, "the cases include draws the old scheme repeated");
        assert_eq!((binomial(10, 3), binomial(10, 10), binomial(3, 5)), (120, 1, 0));
        assert_eq!(binomial(200, 100), usize::MAX);
    }

    #[test]
    fn the_bank_hash_covers_max_len_and_compute() {
        let cfg = SweepConfig::parse(Path::new("x/sweep.toml"), BASE).unwrap();
        let k = bank_key("m", "t", &cfg, "f32").unwrap();
        let mut longer = cfg.clone();
        longer.adapt.max_len = 64;
        assert_ne!(k, bank_key("m", "t", &longer, "f32").unwrap());
        assert_ne!(k, bank_key("m", "t", &cfg, "bf16").unwrap());
        assert_eq!(k, bank_key("m", "t", &cfg.clone(), "f32").unwrap());
    }

    /// A lock holder that was killed but not yet reaped (a zombie) counts as gone, so its lock is taken over.
    #[test]
    fn zombies_and_missing_pids_do_not_hold_the_lock() {
        assert!(process_running(std::process::id()));
        assert!(!process_running(4_194_303));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // not reaped yet: once it has exited it is a zombie
        let t0 = std::time::Instant::now();
        while process_running(pid) && t0.elapsed().as_secs() < 10 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        assert!(stat.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'), "{stat}");
        assert!(!process_running(pid));
        child.wait().unwrap();
    }
}

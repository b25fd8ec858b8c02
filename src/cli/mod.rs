//! The `loracomp` command line.

use crate::engine::kernels::Pooling;
use crate::experiments::bench;
use crate::models::hf::{HfEncoder, DEFAULT_MAX_LEN};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "loracomp", version, about = "Few-shot adaptation by composing a bank of pre-trained LoRA modules")]
pub struct Cli {
    /// Worker threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Matrix-product arithmetic: `f32`, or `bf16` (bf16 operands, f32 accumulation; every parameter and
    /// gradient stays f32). bf16 needs AVX-512 BF16; without it products stay f32 (with a note on stderr).
    #[arg(long, global = true, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub compute: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// `loracomp sweep submit`.
#[derive(Subcommand, Debug)]
pub enum SweepAction {
    /// Submit a sweep as Slurm job arrays (bank array → cells array after it → one report job after that,
    /// `sbatch --parsable`, `afterok`), or write it as Kubernetes Indexed Jobs (`--k8s`, never applied).
    /// Scripts go to OUT/slurm/, manifests to OUT/k8s/; prints the cells, estimated CPU-hours and shard sizes.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["slurm", "k8s"])))]
    Submit {
        /// Sweep config (TOML), copied to OUT/config.toml for the jobs.
        #[arg(long)]
        config: PathBuf,
        /// Output directory on the filesystem every node shares (docs/scale-out.md).
        #[arg(long)]
        out: PathBuf,
        /// Submit to Slurm with sbatch.
        #[arg(long)]
        slurm: bool,
        /// Write Kubernetes batch/v1 Jobs (completionMode: Indexed) to OUT/k8s/; kubectl is never called.
        #[arg(long)]
        k8s: bool,
        /// Shards of the bank and cells stages (array tasks / completion indices).
        #[arg(long, value_parser = positive)]
        shards: usize,
        /// An extra sbatch option for every job (repeatable), e.g. --sbatch-arg=--partition=cpu
        /// --sbatch-arg=--cpus-per-task=4; written into the scripts as #SBATCH lines.
        #[arg(long = "sbatch-arg", allow_hyphen_values = true)]
        sbatch_arg: Vec<String>,
        /// Write the scripts or manifests and print the plan, cost and shard sizes; submit nothing.
        #[arg(long)]
        dry_run: bool,
        /// The loracomp binary the jobs run (default: this binary's absolute path for Slurm, `loracomp` in the
        /// image for Kubernetes).
        #[arg(long)]
        bin: Option<PathBuf>,
        /// Submit only the shards with missing work (bank modules not trained, cells without a result).
        #[arg(long)]
        resume: bool,
        /// Container image (Kubernetes).
        #[arg(long, default_value = "loracomp:latest")]
        image: String,
        /// Mount this PersistentVolumeClaim as the shared volume (Kubernetes; default: a hostPath volume).
        #[arg(long)]
        pvc: Option<String>,
        /// The shared volume's root, mounted at the same path in every pod; the output, the working directory,
        /// the model and the data must be under it (Kubernetes; default: the current directory).
        #[arg(long)]
        volume_root: Option<PathBuf>,
        /// Start over in an output directory that holds another config's results.
        #[arg(long)]
        force: bool,
    },
    /// Draw report.md and the plots again from a sweep directory's config.toml and results (results.jsonl and
    /// shards/*.jsonl, never changed) and module_stats.json where the sweep wrote it; needs neither the model,
    /// the data nor the bank, and runs no cell.
    Report {
        /// The sweep's output directory.
        #[arg(long)]
        out: PathBuf,
    },
}

pub use crate::data::Shots;

/// A count that must be at least 1 (ranks, batch sizes): 0 would otherwise be clamped or written silently.
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) | Err(_) => Err(format!("'{s}' is not a positive whole number")),
        Ok(n) => Ok(n),
    }
}

/// A real number that must be finite (learning rates, alpha, weight decay): `nan` and `inf` parse as f32 but
/// would only surface as a diverged training run.
fn finite(s: &str) -> std::result::Result<f32, String> {
    match s.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a finite number")),
    }
}

/// Parse command-line arguments (the first is the program name) without running anything; the fuzz target
/// `cli_args` drives the numeric options through it.
pub fn parse_args<I, T>(args: I) -> std::result::Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    Cli::try_parse_from(args)
}

/// Options shared by `train` and `adapt`.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Hugging Face model directory: BERT (tokenizer.json), ViT / DINOv2 (preprocessor_config.json), T5 /
    /// Flan-T5 or Llama / Mistral (tokenizer.json); the architecture is read from config.json's model_type.
    #[arg(long)]
    pub model: PathBuf,
    /// Task directory: text (labels.txt, train.jsonl, optional valid/test.jsonl) or image (labels.txt,
    /// image.json, train.bin, optional valid/test.bin).
    #[arg(long)]
    pub task: PathBuf,
    /// Seed of the few-shot sample, the initialisation and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Optimisation steps [default: 100 for adapt; for train, from --epochs].
    #[arg(long, value_parser = positive)]
    pub steps: Option<usize>,
    /// Examples per step.
    #[arg(long, default_value_t = 16, value_parser = positive)]
    pub batch: usize,
    /// Learning rate of the method's own parameters (LoRA factors, composition logits, model weights)
    /// [default: full 1e-4, lora 1e-3, learned 5e-2]; refused by methods that train none.
    #[arg(long, value_parser = finite)]
    pub lr: Option<f32>,
    /// Learning rate of the classifier head (encoders) [default: 1e-2; train: 5e-3].
    #[arg(long, value_parser = finite)]
    pub lr_head: Option<f32>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0, value_parser = finite)]
    pub weight_decay: f32,
    /// Pooling of an encoder's output: mean or cls [default: mean for BERT, cls for ViT / DINOv2]; not for
    /// generative models.
    #[arg(long)]
    pub pooling: Option<Pooling>,
    /// Truncate token sequences to this many tokens (special tokens included).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: usize,
    /// Prompt template of a generative model, with {text} (and {text_pair}) [default: the bare text].
    #[arg(long)]
    pub template: Option<String>,
    /// Split evaluated after training: train, valid or test [default: test when the task has test.jsonl,
    /// else none].
    #[arg(long, value_parser = ["train", "valid", "test"])]
    pub eval_split: Option<String>,
    /// Replace existing results in the output directory.
    #[arg(long)]
    pub force: bool,
    /// Accept bank adapters whose base_model_name_or_path names another model (shapes are still checked).
    #[arg(long)]
    pub allow_base_mismatch: bool,
    /// No progress on stderr (on a terminal a bar; elsewhere a line at each tenth of the steps and at least
    /// every 10 s).
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    fn common(&self) -> crate::app::Common {
        crate::app::Common {
            model: self.model.clone(),
            task: self.task.clone(),
            seed: self.seed,
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            lr_head: self.lr_head,
            weight_decay: self.weight_decay,
            pooling: self.pooling,
            max_len: self.max_len,
            force: self.force,
            allow_base_mismatch: self.allow_base_mismatch,
            template: self.template.clone(),
            eval_split: self.eval_split.clone(),
            quiet: self.quiet,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Train one upstream LoRA (with a head on an encoder) on a task (bank building); writes a PEFT adapter
    /// and metrics.json.
    Train {
        #[command(flatten)]
        args: TrainArgs,
        /// Output adapter directory.
        #[arg(long)]
        out: PathBuf,
        /// LoRA rank.
        #[arg(long, default_value_t = 16, value_parser = positive)]
        rank: usize,
        /// LoRA alpha (scale alpha / rank).
        #[arg(long, default_value_t = 32.0, value_parser = finite)]
        alpha: f32,
        /// Target modules, comma-separated [default: the attention query and value projections: query,value
        /// (BERT, ViT), q,v (T5), q_proj,v_proj (Llama)].
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// Epochs over the training examples (when --steps is not given).
        #[arg(long, default_value_t = 3, value_parser = positive)]
        epochs: usize,
        /// Train on K examples per class instead of the whole split (a number, or full).
        #[arg(long)]
        shots: Option<Shots>,
    },
    /// Adapt to a task from K examples per class with one method; evaluate; export a PEFT adapter.
    Adapt {
        #[command(flatten)]
        args: TrainArgs,
        /// Examples per class sampled from train (a positive number, or full for the whole split).
        #[arg(long)]
        shots: Shots,
        /// linear-probe | full | lora | uniform | learned | lorahub | lorahub-compat | task-arithmetic | ties |
        /// dare | dare-ties | magnitude-prune | best-single | auto (docs/methods.md; auto is the recommended
        /// composition).
        #[arg(long)]
        method: crate::methods::Method,
        /// Bank adapter directories (PEFT LoRA); needed by every method but linear-probe, full and lora.
        #[arg(long, num_args = 1..)]
        bank: Vec<PathBuf>,
        /// Output directory (metrics.json, adapter/).
        #[arg(long)]
        out: PathBuf,
        /// lora, and auto's LoRA stage: rank [default: 16].
        #[arg(long, value_parser = positive)]
        rank: Option<usize>,
        /// lora, and auto's LoRA stage: alpha [default: 32].
        #[arg(long, value_parser = finite)]
        alpha: Option<f32>,
        /// lora, and auto's LoRA stage: target modules, comma-separated [default: the attention query and value projections].
        #[arg(long, value_delimiter = ',')]
        targets: Option<Vec<String>>,
        /// learned: one weight vector shared by all layers.
        #[arg(long)]
        global_weights: bool,
        /// learned: entropy penalty on the module weights [default: 0].
        #[arg(long, allow_hyphen_values = true)]
        entropy_penalty: Option<f32>,
        /// Compress the exported LoRA to this rank by truncated SVD [default: exact concatenation]; the
        /// compressed adapter's accuracy is reported too.
        #[arg(long, value_parser = positive)]
        export_rank: Option<usize>,
        /// Methods with a bank: keep only the k modules that retrieval ranks best for the few-shot examples.
        #[arg(long)]
        select: Option<usize>,
        /// Retrieval criterion for --select: arrow (singular-vector prototypes of each module vs the examples;
        /// encoders), cka (CKA gain of each module's features with the labels; encoders), loss (each module's
        /// head-free criterion; every model) [default: arrow on encoders, loss on generative models].
        #[arg(long)]
        by: Option<crate::methods::Retrieval>,
        /// lorahub, lorahub-compat: CMA-ES generations [default: 40].
        #[arg(long)]
        lorahub_generations: Option<usize>,
        /// ties, dare-ties, magnitude-prune: fraction of entries kept, in (0, 1] [default: 0.2].
        #[arg(long)]
        density: Option<f32>,
        /// auto: total scales of the candidate compositions, comma-separated, each > 0 (0, no module, is always
        /// a candidate) [default: 0.5,1,2,3].
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        auto_scales: Option<Vec<f32>>,
        /// auto: the largest retrieved set tried besides the whole bank [default: 3].
        #[arg(long)]
        auto_top_k: Option<usize>,
        /// auto: how the candidate is chosen: criterion (the head-free leave-one-out criterion) or cv
        /// (cross-validation of the head inside the few-shot set) [default: criterion].
        #[arg(long)]
        auto_select: Option<crate::methods::auto::AutoSelect>,
        /// auto --auto-select cv: cross-validation folds inside the few-shot set, at least 2 [default: 4].
        #[arg(long)]
        auto_folds: Option<usize>,
        /// auto: head-training epochs; the head trains max(--steps, ⌈epochs·n/batch⌉) steps [default: 20].
        #[arg(long)]
        auto_epochs: Option<usize>,
        /// auto: train a LoRA (--rank, --alpha, --targets, --lr) on top of the chosen composition when every
        /// class has at least this many examples; `off`: never [default: 2].
        #[arg(long)]
        auto_lora_from: Option<crate::methods::auto::LoraFrom>,
        /// dare, dare-ties: drop probability, in (0, 1) [default: 0.5].
        #[arg(long)]
        drop_p: Option<f32>,
    },
    /// Compose bank adapters with fixed weights (Σ w_n ΔW_n, exact) and write one PEFT adapter; with --task and
    /// --shots, an encoder gets a head trained on K examples per class of the task.
    Compose {
        /// Hugging Face model directory the bank was made for.
        #[arg(long)]
        model: PathBuf,
        /// Bank adapter directories.
        #[arg(long, num_args = 1.., required = true)]
        bank: Vec<PathBuf>,
        /// One weight per adapter (any real numbers) [default: uniform 1/N].
        #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
        weights: Vec<f32>,
        /// Compress the exported LoRA to this rank by truncated SVD.
        #[arg(long, value_parser = positive)]
        export_rank: Option<usize>,
        /// Task whose labels the composed adapter predicts (a head is trained on it for encoders).
        #[arg(long, requires = "shots")]
        task: Option<PathBuf>,
        /// Examples per class of --task for the head.
        #[arg(long, requires = "task")]
        shots: Option<Shots>,
        /// Seed of the few-shot sample and the head.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Prompt template of a generative model (stored with the adapter).
        #[arg(long)]
        template: Option<String>,
        /// Output adapter directory.
        #[arg(long)]
        out: PathBuf,
        /// Replace an adapter already in --out.
        #[arg(long)]
        force: bool,
    },
    /// Evaluate an adapter (as written by train, adapt or compose) on a task split, or without --adapter a
    /// generative model zero-shot (ranking the label strings); prints metrics JSON.
    Eval {
        /// Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Task directory.
        #[arg(long)]
        task: PathBuf,
        /// Adapter directory (a run's adapter/ folder). Without it a generative model (T5, Llama) is evaluated
        /// zero-shot; an encoder needs one (its head is in the adapter).
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Prompt template of a generative model evaluated without --adapter, with {text} (and {text_pair})
        /// [default: the bare text].
        #[arg(long)]
        template: Option<String>,
        /// Split to evaluate: train, valid or test.
        #[arg(long, default_value = "test", value_parser = ["train", "valid", "test"])]
        split: String,
        /// Truncate token sequences to this many tokens.
        #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
        max_len: usize,
        /// Accept an adapter whose base_model_name_or_path names another model.
        #[arg(long)]
        allow_base_mismatch: bool,
    },
    /// Label new texts with an adapter loracomp wrote: one JSON line per input, {"text", "label", "scores"}
    /// (scores: each label's probability, summing to 1).
    Predict {
        /// Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Adapter directory (a run's adapter/ folder, or a train / compose output).
        #[arg(long)]
        adapter: PathBuf,
        /// Texts to label.
        #[arg(long, num_args = 1.., conflicts_with = "input")]
        text: Vec<String>,
        /// Second text of each --text, for pair tasks (as many as --text).
        #[arg(long, num_args = 1.., requires = "text")]
        text_pair: Vec<String>,
        /// JSON-lines file with "text" (and "text_pair") per line.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Truncate token sequences to this many tokens.
        #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
        max_len: usize,
    },
    /// Sentence embeddings from a Hugging Face encoder, one JSON object a line.
    Embed {
        /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Pooling of the last hidden state: mean or cls.
        #[arg(long, default_value = "mean")]
        pooling: Pooling,
        /// L2-normalise each embedding (as sentence-transformers models do).
        #[arg(long)]
        normalize: bool,
        /// Texts to embed.
        #[arg(long, num_args = 1.., conflicts_with = "input")]
        text: Vec<String>,
        /// JSON-lines file with a "text" field per line.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Truncate to this many tokens.
        #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
        max_len: usize,
        /// Texts per forward pass (sorted by length to keep padding small).
        #[arg(long, default_value_t = 32, value_parser = positive)]
        batch: usize,
    },
    /// One forward pass on transformers-style inputs (JSON: input_ids, attention_mask, token_type_ids,
    /// pixel_values, decoder_input_ids); prints {"shape": [...], "data": [...]}: the last hidden state of
    /// encoders, the logits of generative models. For checking loracomp against Python.
    Forward {
        /// Hugging Face model directory (config.json, model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter directories, applied together with weight 1 each.
        #[arg(long)]
        adapter: Vec<PathBuf>,
        /// JSON file with the forward arguments.
        #[arg(long)]
        input: PathBuf,
        /// Apply adapters whose base_model_name_or_path names another model.
        #[arg(long)]
        allow_base_mismatch: bool,
    },
    /// Phase 1 where no pre-trained model is at hand: train a small model from scratch and write it as a
    /// Hugging Face directory: a ViT (CLS pooling, a head) on image tasks (ViTModel), or a Llama language
    /// model on the texts of text tasks, with a BPE tokenizer trained on them (LlamaForCausalLM).
    Pretrain {
        /// Architecture: vit (image tasks) or llama (text tasks).
        #[arg(long, default_value = "vit", value_parser = ["vit", "llama"])]
        arch: String,
        /// Task directories: image tasks for vit (trained on as one task over the union of their labels), text
        /// tasks for llama (their train splits' texts; valid splits give the reported perplexity).
        #[arg(long, num_args = 1.., required = true)]
        task: Vec<PathBuf>,
        /// Output model directory.
        #[arg(long)]
        out: PathBuf,
        /// Hidden size.
        #[arg(long, default_value_t = 128, value_parser = positive)]
        hidden: usize,
        /// Layers.
        #[arg(long, default_value_t = 4, value_parser = positive)]
        layers: usize,
        /// Attention heads.
        #[arg(long, default_value_t = 4, value_parser = positive)]
        heads: usize,
        /// MLP width.
        #[arg(long, default_value_t = 256, value_parser = positive)]
        mlp: usize,
        /// vit: patch size [default: 4].
        #[arg(long, value_parser = positive)]
        patch: Option<usize>,
        /// vit: square input size the preprocessor resizes every image to [default: 32].
        #[arg(long, value_parser = positive)]
        image_size: Option<usize>,
        /// llama: key/value heads (grouped-query attention) [default: --heads / 2].
        #[arg(long, value_parser = positive)]
        kv_heads: Option<usize>,
        /// llama: BPE vocabulary size [default: 4096].
        #[arg(long, value_parser = positive)]
        vocab: Option<usize>,
        /// llama: longest training sequence in tokens [default: 48].
        #[arg(long, value_parser = positive)]
        max_len: Option<usize>,
        /// Optimisation steps [default: from --epochs].
        #[arg(long, value_parser = positive)]
        steps: Option<usize>,
        /// Epochs over the training examples (when --steps is not given).
        #[arg(long, default_value_t = 4, value_parser = positive)]
        epochs: usize,
        /// Examples (vit) or sequences (llama) per step.
        #[arg(long, default_value_t = 32, value_parser = positive)]
        batch: usize,
        /// Peak learning rate (linear warm-up, then linear decay).
        #[arg(long, default_value_t = 1e-3, value_parser = finite)]
        lr: f32,
        /// AdamW weight decay.
        #[arg(long, default_value_t = 0.05, value_parser = finite)]
        weight_decay: f32,
        /// Seed of the initialisation and the batch order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Replace a model already in --out.
        #[arg(long)]
        force: bool,
        /// No progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Build the vision suites' image task directories (CIFAR-10 pre-training and class subsets, MNIST, one
    /// task per Omniglot alphabet) from the shared data, with seeded per-class splits.
    VisionTasks {
        /// The shared vision data (cifar10/, mnist/, omniglot/).
        #[arg(long, default_value = "../shared/data/vision")]
        data: PathBuf,
        /// Output directory of the task directories.
        #[arg(long, default_value = "tasks/vision")]
        out: PathBuf,
        /// Seed of the per-class train / valid / test splits.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Run (or resume) an experiment sweep from a TOML config: bank, few-shot cells, report, plots, manifest.
    /// `--stage` and `--shard` run one part of it (job arrays); `sweep submit` submits the parts to Slurm or
    /// writes Kubernetes Indexed Jobs (docs/scale-out.md).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Sweep {
        #[command(subcommand)]
        action: Option<SweepAction>,
        /// Sweep config (TOML; keys in docs/formats.md; suites in experiments/*.toml).
        #[arg(long, required = true)]
        config: Option<PathBuf>,
        /// Output directory (results.jsonl, report.md, plots, manifest.json, bank/); a sweep resumes there.
        #[arg(long, required = true)]
        out: Option<PathBuf>,
        /// No progress on stderr (on a terminal a bar; elsewhere a line per finished cell and at least every 10 s).
        #[arg(long)]
        quiet: bool,
        /// Start over in an output directory that holds another config's results.
        #[arg(long)]
        force: bool,
        /// Run only these downstream tasks' cells (comma-separated; a part of a long sweep, or one share of
        /// it per machine: results of the same config can be concatenated). The report covers every cell done.
        #[arg(long, value_delimiter = ',')]
        tasks: Vec<String>,
        /// Run only this stage: `bank` (train the bank modules), `cells` (the few-shot cells), `report` (merge
        /// every shard's results into results.jsonl, report.md and the plots, and list the missing cells).
        /// Default: all three.
        #[arg(long, value_parser = ["bank", "cells", "report"])]
        stage: Option<String>,
        /// Run shard I of N (0-based) of the bank and cells stages: each module and cell belongs to exactly one
        /// shard, balanced by estimated cost; a shard appends to OUT/shards/cells-I-of-N.jsonl under its own
        /// lock. `env`: I from SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX, N from --shards, LORACOMP_SHARDS or
        /// SLURM_ARRAY_TASK_COUNT.
        #[arg(long)]
        shard: Option<String>,
        /// The number of shards, with `--shard env`.
        #[arg(long, value_parser = positive)]
        shards: Option<usize>,
    },
    /// The paper's three phases end to end on generated data (offline, a few minutes on 2 cores).
    Demo {
        /// Report directory.
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// No progress on stderr.
        #[arg(long)]
        quiet: bool,
    },
    /// Time fixed workloads (median ms per step after warm-up).
    Bench {
        /// Model shapes to time: minilm (all-MiniLM-L6-v2's), ref4 (4 layers, d 384), t5small (Flan-T5-small's),
        /// llama4 (4 layers, d 512, grouped KV heads); tiny, t5tiny, llamatiny for smoke runs.
        #[arg(long, value_delimiter = ',', default_value = "minilm,ref4")]
        workloads: Vec<String>,
        /// Steps to time: forward, lora, uniform, learned, full.
        #[arg(long, value_delimiter = ',', default_value = "forward,lora,uniform,learned,full")]
        modes: Vec<String>,
        /// Bank sizes for the uniform and learned modes.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        n: Vec<usize>,
        /// Untimed steps before timing.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 10, value_parser = positive)]
        iters: usize,
        /// Sequences per step.
        #[arg(long, default_value_t = 16, value_parser = positive)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 64, value_parser = positive)]
        seq: usize,
        /// Seconds-long run of the tiny workloads only (tiny, t5tiny, llamatiny; checks the output, not the timing).
        #[arg(long)]
        smoke: bool,
        /// JSON lines only.
        #[arg(long)]
        json: bool,
        /// Same as the global `--compute bf16`.
        #[arg(long)]
        bf16: bool,
        /// Also time each configuration's distinct product shapes alone, f32 vs bf16 (table on stderr).
        #[arg(long)]
        shapes: bool,
    },
}

/// One line of `embed`'s output: `{"text": …, "embedding": […]}`.
#[derive(serde::Serialize)]
struct EmbedLine<'a> {
    text: &'a str,
    embedding: &'a [f32],
}

fn read_texts(path: &std::path::Path) -> Result<Vec<String>> {
    crate::util::ensure_regular(path)?;
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("{}: cannot read line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
        let t = v
            .get("text")
            .and_then(|t| t.as_str())
            .ok_or_else(|| anyhow!("{}:{}: field 'text' missing or not a string", path.display(), i + 1))?;
        out.push(t.to_string());
    }
    Ok(out)
}

pub use crate::util::MAX_THREADS;

pub fn run(cli: Cli) -> Result<()> {
    // The command runs on one of the pool's own workers (`rayon::scope` called from outside the pool runs its
    // body on a worker): each parallel loop is then shared with the other workers directly, instead of the main
    // thread handing every loop to the pool and sleeping until it ends, two thread wake-ups per loop and a few
    // hundred loops per training step (measured: ref4 learned N = 8 bf16 61 → 55 ms). `init_pool` gives workers
    // the main thread's usual 8 MiB of stack, as the whole command now runs on one.
    crate::util::init_pool(cli.threads)?;
    rayon::scope(move |_| run_command(cli))
}

fn run_command(cli: Cli) -> Result<()> {
    let bf16 = cli.compute == "bf16" || matches!(cli.cmd, Cmd::Bench { bf16: true, .. });
    if bf16 {
        crate::engine::gemm::set_compute(crate::engine::gemm::Compute::Bf16);
        if !crate::engine::gemm::bf16_active() {
            eprintln!("note: bf16 compute requested but this CPU has no AVX-512 BF16; matrix products stay f32");
        }
    }
    match cli.cmd {
        Cmd::Embed { model, pooling, normalize, text, input, max_len, batch } => {
            let texts = match input {
                Some(p) => read_texts(&p)?,
                None if !text.is_empty() => text,
                None => bail!("give texts with --text or a JSON-lines file with --input"),
            };
            let mut enc = HfEncoder::load(&model, max_len)?;
            let embs = enc.embed(&texts, pooling, normalize, batch)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for (t, e) in texts.iter().zip(embs) {
                serde_json::to_writer(&mut out, &EmbedLine { text: t, embedding: &e })?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Cmd::Forward { model, adapter, input, allow_base_mismatch } => {
            let t = crate::models::forward::run(&model, &adapter, &input, allow_base_mismatch)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            serde_json::to_writer(&mut out, &t)?;
            out.write_all(b"\n")?;
            out.flush()?;
        }
        Cmd::Train { args, out, rank, alpha, targets, epochs, shots } => {
            let spec = crate::app::TrainSpec {
                common: args.common(),
                out,
                rank,
                alpha,
                targets,
                epochs,
                shots: shots.and_then(|s| s.0),
            };
            let m = crate::app::train(&spec)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Adapt {
            args,
            shots,
            method,
            bank,
            out,
            rank,
            alpha,
            targets,
            global_weights,
            entropy_penalty,
            export_rank,
            select,
            by,
            lorahub_generations,
            density,
            drop_p,
            auto_scales,
            auto_top_k,
            auto_select,
            auto_folds,
            auto_epochs,
            auto_lora_from,
        } => {
            let spec = crate::app::AdaptSpec {
                common: args.common(),
                out,
                shots,
                method,
                bank,
                options: crate::app::MethodOptions {
                    rank,
                    alpha,
                    targets,
                    global_weights,
                    entropy_penalty,
                    lorahub_generations,
                    density,
                    drop_p,
                    select,
                    select_by: by,
                    auto_scales,
                    auto_top_k,
                    auto_select,
                    auto_folds,
                    auto_epochs,
                    auto_lora_from: auto_lora_from.map(|l| l.0),
                },
                export_rank,
            };
            let m = crate::app::adapt(&spec)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Compose { model, bank, weights, export_rank, task, shots, seed, template, out, force } => {
            let spec =
                crate::app::ComposeSpec { model, bank, weights, export_rank, out, force, task, shots, seed, template };
            let m = crate::app::compose(&spec)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Eval { model, task, adapter, template, split, max_len, allow_base_mismatch } => {
            let target = crate::app::EvalTarget::new(adapter, allow_base_mismatch, template)?;
            let m = crate::app::eval(&model, &task, &target, &split, max_len)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Predict { model, adapter, text, text_pair, input, max_len } => {
            let inputs = match input {
                Some(p) => crate::app::read_predict_inputs(&p)?,
                None if !text.is_empty() => {
                    if !text_pair.is_empty() && text_pair.len() != text.len() {
                        bail!("--text-pair has {} values for {} --text", text_pair.len(), text.len());
                    }
                    text.iter()
                        .enumerate()
                        .map(|(i, t)| crate::app::PredictInput {
                            text: t.clone(),
                            text_pair: text_pair.get(i).cloned(),
                        })
                        .collect()
                }
                None => bail!("give texts with --text or a JSON-lines file with --input"),
            };
            let preds = crate::app::predict(&model, &adapter, &inputs, max_len)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            for p in preds {
                serde_json::to_writer(&mut out, &p)?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Cmd::Sweep { action: Some(SweepAction::Report { out }), .. } => {
            let res = crate::experiments::sweep::rerender(&out)?;
            if !res.missing.is_empty() {
                eprintln!("{} cells of the main grid have no result (listed in report.md)", res.missing.len());
            }
            println!("{} cells; report: {}", res.cells.len(), out.join("report.md").display());
        }
        Cmd::Sweep { action: Some(SweepAction::Submit { .. }), .. } => {
            let Cmd::Sweep { action: Some(a), .. } = cli.cmd else { unreachable!() };
            sweep_submit(a, cli.threads, &cli.compute)?;
        }
        Cmd::Sweep { action: None, config, out, quiet, force, tasks, stage, shard, shards } => {
            let (Some(config), Some(out)) = (config, out) else { bail!("sweep: --config and --out are required") };
            use crate::experiments::sweep;
            let stage: Option<sweep::Stage> =
                stage.map(|s| s.parse()).transpose().map_err(|e: String| anyhow!("--stage: {e}"))?;
            let shard = match shard.as_deref() {
                None if shards.is_some() => bail!("--shards: give it with --shard env"),
                None => None,
                Some("env") => Some(sweep::Shard::from_env(shards, |k| std::env::var(k).ok())?),
                Some(s) if shards.is_some() => bail!("--shards goes with --shard env, not with --shard {s}"),
                Some(s) => Some(sweep::Shard::parse(s)?),
            };
            let opts = sweep::SweepOpts { quiet, threads: rayon::current_num_threads(), tasks, stage, shard };
            let res = sweep::run_config(&config, &out, &opts, force)?;
            if res.reported {
                if !res.missing.is_empty() {
                    eprintln!("{} planned cells have no result yet (listed in report.md)", res.missing.len());
                }
                println!("{} cells; report: {}", res.cells.len(), out.join("report.md").display());
            } else {
                let what = shard.map(|s| format!("shard {s}")).unwrap_or_else(|| "this process".into());
                println!(
                    "{what}: {} cells run; {} planned cells without a result in {}",
                    res.cells.len(),
                    res.missing.len(),
                    out.display()
                );
            }
        }
        Cmd::Pretrain {
            arch,
            task,
            out,
            hidden,
            layers,
            heads,
            mlp,
            patch,
            image_size,
            kv_heads,
            vocab,
            max_len,
            steps,
            epochs,
            batch,
            lr,
            weight_decay,
            seed,
            force,
            quiet,
        } => {
            if out.join("model.safetensors").exists() && !force {
                bail!("{}: already holds a model; pass --force to replace it", out.display());
            }
            let tasks: Vec<crate::data::Task> =
                task.iter().map(|t| crate::data::Task::open(t)).collect::<Result<_>>()?;
            let mut progress: Option<crate::progress::Progress> = None;
            let mut log = |_: usize, loss: f32, steps: usize| {
                let p = progress.get_or_insert_with(|| {
                    crate::progress::Progress::new(steps, &format!("pretrain {arch}"), "step", quiet)
                });
                p.set_message(format!("loss {loss:.4}"));
                p.inc(1);
            };
            let m = if arch == "llama" {
                for (flag, given) in [("--patch", patch.is_some()), ("--image-size", image_size.is_some())] {
                    if given {
                        bail!("{flag} is an option of --arch vit");
                    }
                }
                let max_len = max_len.unwrap_or(48);
                let n_train: usize = tasks
                    .iter()
                    .map(|t| t.examples("train").map(|e| e.len()))
                    .collect::<Result<Vec<_>>>()?
                    .iter()
                    .sum();
                let steps = steps.unwrap_or(epochs * n_train.div_ceil(batch));
                let opts = crate::methods::pretrain_lm::LmPretrainOpts {
                    hidden,
                    layers,
                    heads,
                    kv_heads: kv_heads.unwrap_or((heads / 2).max(1)),
                    mlp,
                    vocab: vocab.unwrap_or(4096),
                    max_len,
                    steps,
                    batch,
                    lr,
                    weight_decay,
                    seed,
                };
                crate::methods::pretrain_lm::pretrain_llama(&tasks, &opts, &out, |t, l| log(t, l, steps))?
            } else {
                for (flag, given) in
                    [("--kv-heads", kv_heads.is_some()), ("--vocab", vocab.is_some()), ("--max-len", max_len.is_some())]
                {
                    if given {
                        bail!("{flag} is an option of --arch llama");
                    }
                }
                let n_train: usize = tasks
                    .iter()
                    .map(|t| t.image_split("train").map(|v| v.len()))
                    .collect::<Result<Vec<_>>>()?
                    .iter()
                    .sum();
                let steps = steps.unwrap_or(epochs * n_train.div_ceil(batch));
                let opts = crate::methods::pretrain::PretrainOpts {
                    hidden,
                    layers,
                    heads,
                    mlp,
                    patch: patch.unwrap_or(4),
                    image_size: image_size.unwrap_or(32),
                    steps,
                    batch,
                    lr,
                    weight_decay,
                    seed,
                };
                crate::methods::pretrain::pretrain_vit(&tasks, &opts, &out, |t, l| log(t, l, steps))?
            };
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::VisionTasks { data, out, seed } => {
            let m = crate::data::vision::build_tasks(&data, &out, seed)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Demo { out, quiet } => {
            let report = crate::experiments::demo::run(&out, quiet)?;
            println!("{report}");
            println!("Report written to {}.", out.display());
            println!("The real suite (all-MiniLM-L6-v2, CLINC bank, tasks outside it):");
            println!("  bash experiments/bank_clinc.sh && bash experiments/fewshot_clinc_bank.sh");
        }
        Cmd::Bench { workloads, modes, n, warmup, iters, batch, seq, smoke, json, shapes, .. } => {
            let opts = if smoke {
                bench::BenchOpts {
                    workloads: ["tiny", "t5tiny", "llamatiny"].map(String::from).to_vec(),
                    modes,
                    n_adapters: vec![2],
                    warmup: 1,
                    iters: 2,
                    batch: 4,
                    seq: 16,
                    shapes,
                }
            } else {
                bench::BenchOpts { workloads, modes, n_adapters: n, warmup, iters, batch, seq, shapes }
            };
            if !json {
                eprintln!(
                    "workload  mode      N    median ms   min ms   GFLOP/s  floor ms  ×floor  peak MiB  (threads {})",
                    rayon::current_num_threads()
                );
            }
            bench::run(&opts, |r| {
                // a closed pipe (`| head`) ends the output, not the process with a panic
                let mut out = std::io::stdout().lock();
                if json {
                    let _ = writeln!(out, "{}", serde_json::to_string(r).unwrap());
                } else {
                    let _ = writeln!(
                        out,
                        "{:<9} {:<8} {:>4} {:>10.2} {:>8.2} {:>9.1} {:>9.2} {:>7.2} {:>9.0}",
                        r.workload,
                        r.mode,
                        r.n_adapters,
                        r.median_ms,
                        r.min_ms,
                        r.gflops,
                        r.gemm_floor_ms,
                        r.ratio_to_floor,
                        r.peak_rss_mb
                    );
                }
            })?;
        }
    }
    Ok(())
}

/// `loracomp sweep submit`.
fn sweep_submit(a: SweepAction, threads: Option<usize>, compute: &str) -> Result<()> {
    use crate::experiments::submit;
    let SweepAction::Submit {
        config,
        out,
        slurm,
        k8s: _,
        shards,
        sbatch_arg,
        dry_run,
        bin,
        resume,
        image,
        pvc,
        volume_root,
        force,
    } = a
    else {
        bail!("sweep submit: not a submit action");
    };
    let cfg = crate::experiments::sweep::SweepConfig::load(&config)?;
    cfg.check_inputs().map_err(|e| anyhow!("{}: {e:#}", config.display()))?;
    let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let abs = |p: &std::path::Path| if p.is_absolute() { p.to_path_buf() } else { cwd.join(p) };
    let out = abs(&out);
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    crate::experiments::sweep::save_config(&out, &config, &text, force)?;
    let target = if slurm { submit::Target::Slurm } else { submit::Target::K8s };
    let bin = match bin {
        Some(b) => abs(&b),
        None if target == submit::Target::K8s => PathBuf::from("loracomp"),
        None => std::env::current_exe().context("cannot find this binary's path; pass --bin")?,
    };
    let spec = submit::SubmitSpec {
        target,
        config: out.join("config.toml"),
        out: out.clone(),
        workdir: cwd.clone(),
        shards,
        bin,
        sbatch_args: sbatch_arg,
        dry_run,
        resume,
        threads,
        compute: compute.to_string(),
        image,
        pvc,
        volume_root: volume_root.map(|p| abs(&p)).unwrap_or(cwd),
        sbatch: std::env::var("LORACOMP_SBATCH").unwrap_or_else(|_| "sbatch".into()),
    };
    let done = submit::submit(&cfg, &spec)?;
    print!("{}", done.summary);
    Ok(())
}

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
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Sentence embeddings from a Hugging Face encoder, one JSON object a line.
    Embed {
        /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
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
        #[arg(long, default_value_t = 32)]
        batch: usize,
    },
    /// Time fixed workloads (median ms per step after warm-up).
    Bench {
        #[arg(long, value_delimiter = ',', default_value = "minilm,ref4")]
        workloads: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "forward,lora,uniform,learned,full")]
        modes: Vec<String>,
        /// Bank sizes for the uniform and learned modes.
        #[arg(long, value_delimiter = ',', default_value = "8,64")]
        n: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Seconds-long run of the tiny workload only (checks the output, not the timing).
        #[arg(long)]
        smoke: bool,
        /// JSON lines only.
        #[arg(long)]
        json: bool,
    },
}

fn read_texts(path: &std::path::Path) -> Result<Vec<String>> {
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

pub fn run(cli: Cli) -> Result<()> {
    if let Some(t) = cli.threads {
        rayon::ThreadPoolBuilder::new().num_threads(t).build_global().map_err(|e| anyhow!("--threads: {e}"))?;
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
                serde_json::to_writer(&mut out, &serde_json::json!({"text": t, "embedding": e}))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
        }
        Cmd::Bench { workloads, modes, n, warmup, iters, smoke, json } => {
            let opts = if smoke {
                bench::BenchOpts {
                    workloads: vec!["tiny".into()],
                    modes,
                    n_adapters: vec![2],
                    warmup: 1,
                    iters: 2,
                    batch: 4,
                    seq: 16,
                }
            } else {
                bench::BenchOpts { workloads, modes, n_adapters: n, warmup, iters, batch: 16, seq: 64 }
            };
            if !json {
                eprintln!("workload  mode      N    median ms   min ms   (threads {})", rayon::current_num_threads());
            }
            bench::run(&opts, |r| {
                if json {
                    println!("{}", serde_json::to_string(r).unwrap());
                } else {
                    println!(
                        "{:<9} {:<8} {:>4} {:>10.2} {:>8.2}",
                        r.workload, r.mode, r.n_adapters, r.median_ms, r.min_ms
                    );
                }
            })?;
        }
    }
    Ok(())
}

//! `loracomp bench`: fixed workloads timed after warm-up, reported as median ms per step.
//!
//! Workloads use randomly initialised models of the real shapes (no download needed):
//!
//! - Encoders: `minilm` = all-MiniLM-L6-v2's shape (6 layers, d 384, 12 heads, MLP 1536) and `ref4` = a
//!   4-layer encoder with 6 heads; `tiny` for smoke runs. Every step is batch 16 × 64 tokens, mean pooling, a
//!   10-class head, cross-entropy and AdamW.
//! - Generative models, trained by rank classification ([`crate::models::generative`]): `t5small` =
//!   Flan-T5-small's shape (8 + 8 layers, d 512, 6 heads of 64, gated-GELU feed-forward 1024, vocab 32128,
//!   untied head) and `llama4` = a 4-layer Llama with grouped KV heads (d 512, 8 query heads, 2 KV heads of 64,
//!   SwiGLU 1376, vocab 32000, untied head); `t5tiny` and `llamatiny` for smoke runs. A step is batch 16 prompts
//!   of 64 tokens, 10 classes whose answers are 2 tokens (a label token and EOS), the answer tokens'
//!   cross-entropy (T5: decoder of 2 positions; Llama: the 66-token `prompt ‖ answer`, the LM head only at
//!   the positions that predict answer tokens, [`crate::models::llama::Llama::forward_rows`]) and AdamW. Bank modules sit on the attention's query and value
//!   projections (T5: `q`, `v` of self- and cross-attention, as PEFT's `target_modules=["q","v"]`; Llama:
//!   `q_proj`, `v_proj`). A rank classifier has no head, so its `uniform` step (nothing trains) is the merged
//!   model's loss, forward only; its `full` trains the body's linear layers (embeddings, norms, LM head frozen).

use crate::engine::gemm::{self, Compute, GemmCall};
use crate::engine::kernels::Pooling;
use crate::engine::param::{AdamW, Param};
use crate::lora::bank::{BankLinear, Composition, FreshLora, LoraModule};
use crate::methods::common::{Encoded, Item};
use crate::methods::step::{classifier_step, train_step};
use crate::models::bert::{Batch, Bert};
use crate::models::classifier::Classifier;
use crate::models::config::BertConfig;
use crate::models::generative::{Generative, RankClassifier};
use crate::models::llama::{Llama, LlamaConfig};
use crate::models::t5::{T5Config, T5};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::time::Instant;

/// One benchmark result line (the same fields as `bench/torch_ref.py` prints).
#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    #[serde(rename = "impl")]
    pub implementation: String,
    pub workload: String,
    pub mode: String,
    pub n_adapters: usize,
    pub batch: usize,
    pub seq: usize,
    pub threads: usize,
    pub dtype: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub peak_rss_mb: f64,
    /// Matrix-product GFLOP of one step and the rate achieved over the whole step.
    pub step_gflop: f64,
    pub gflops: f64,
    /// The step's products timed alone (the GEMM floor) and the step's median over it.
    pub gemm_floor_ms: f64,
    pub ratio_to_floor: f64,
}

/// Benchmark settings.
#[derive(Clone, Debug)]
pub struct BenchOpts {
    pub workloads: Vec<String>,
    pub modes: Vec<String>,
    pub n_adapters: Vec<usize>,
    pub warmup: usize,
    pub iters: usize,
    pub batch: usize,
    pub seq: usize,
    /// After each configuration, time its distinct product shapes in f32 and in bf16 (stderr table).
    pub shapes: bool,
}

/// One distinct product shape of a step: how often it occurs and its best time alone in each arithmetic.
#[derive(Clone, Debug)]
pub struct ShapeTiming {
    pub call: GemmCall,
    pub count: usize,
    pub f32_ms: f64,
    /// `None` where the CPU has no bf16 kernel.
    pub bf16_ms: Option<f64>,
}

/// Time each distinct shape in `calls` alone (best of `reps`) with f32 and with bf16 arithmetic. Shapes under
/// the bf16 size threshold run f32 in both. Restores the compute mode it found.
pub fn shape_timings(calls: &[GemmCall], reps: usize) -> Vec<ShapeTiming> {
    let before = gemm::compute();
    let mut out: Vec<ShapeTiming> = Vec::new();
    for c in calls {
        let same = |o: &GemmCall| (o.m, o.n, o.k, o.ta, o.tb, o.parallel) == (c.m, c.n, c.k, c.ta, c.tb, c.parallel);
        if let Some(t) = out.iter_mut().find(|t| same(&t.call)) {
            t.count += 1;
            continue;
        }
        gemm::set_compute(Compute::F32);
        let f32_ms = gemm::replay(&[*c], reps) * 1e3;
        gemm::set_compute(Compute::Bf16);
        let bf16_ms = gemm::bf16_active().then(|| gemm::replay(&[*c], reps) * 1e3);
        out.push(ShapeTiming { call: *c, count: 1, f32_ms, bf16_ms });
    }
    gemm::set_compute(before);
    out
}

/// Every workload name, encoders first.
pub const WORKLOADS: [&str; 7] = ["minilm", "ref4", "tiny", "t5small", "llama4", "t5tiny", "llamatiny"];

/// The BERT config of an encoder workload.
pub fn workload_config(name: &str) -> Result<BertConfig> {
    let (layers, heads) = match name {
        "minilm" => (6, 12),
        "ref4" => (4, 6),
        "tiny" => (2, 4),
        other => bail!("unknown workload '{other}' ({})", WORKLOADS.join(", ")),
    };
    let d = if name == "tiny" { 64 } else { 384 };
    Ok(BertConfig {
        vocab_size: 30522,
        hidden_size: d,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        intermediate_size: 4 * d,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-12,
        max_position_embeddings: 512,
        type_vocab_size: 2,
        pad_token_id: 0,
        model_type: Some("bert".into()),
        position_embedding_type: None,
    })
}

fn random_bank(rng: &mut impl Rng, n: usize, r: usize, din: usize, dout: usize) -> Vec<LoraModule> {
    (0..n)
        .map(|_| LoraModule {
            a: (0..r * din).map(|_| rng.gen_range(-0.05f32..0.05)).collect(),
            b: (0..dout * r).map(|_| rng.gen_range(-0.05f32..0.05)).collect(),
            r,
            scale: 2.0,
        })
        .collect()
}

/// Set up `mode` on a classifier over a random encoder of `workload`'s shape.
pub fn setup(workload: &str, mode: &str, n: usize, seed: u64) -> Result<Classifier> {
    let cfg = workload_config(workload)?;
    let bert = Bert::random(cfg, seed)?;
    let mut m = Classifier::new(bert, Pooling::Mean, 10, seed);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    match mode {
        "forward" => {}
        "full" => m.encoder.set_all_trainable(true),
        "lora" | "uniform" | "learned" => {
            let targets = m.bert_mut().layers.iter_mut().flat_map(|l| [&mut l.query, &mut l.value]);
            adapt_targets(targets, mode, n, &mut rng);
        }
        other => bail!("unknown bench mode '{other}' ({})", MODES.join(", ")),
    }
    Ok(m)
}

/// Every bench mode.
pub const MODES: [&str; 5] = ["forward", "lora", "uniform", "learned", "full"];

/// Put `mode`'s adapters (`lora`, `uniform`, `learned`) on the target projections.
fn adapt_targets<'a>(targets: impl Iterator<Item = &'a mut BankLinear>, mode: &str, n: usize, rng: &mut impl Rng) {
    for lin in targets {
        let (din, dout) = (lin.din, lin.dout);
        match mode {
            "lora" => {
                let mut a = Param::new(vec![8, din], (0..8 * din).map(|_| rng.gen_range(-0.05f32..0.05)).collect());
                let mut b = Param::zeros(vec![dout, 8]);
                a.set_trainable(true);
                b.set_trainable(true);
                lin.fresh = Some(FreshLora { a, b, r: 8, scale: 2.0 });
            }
            "uniform" => {
                lin.set_bank(random_bank(rng, n, 8, din, dout));
                lin.comp = Composition::Fixed(vec![1.0 / n as f32; n]);
            }
            _ => {
                lin.set_bank(random_bank(rng, n, 8, din, dout));
                let mut v = Param::zeros(vec![n]);
                v.set_trainable(true);
                lin.comp = Composition::Learned(v);
            }
        }
    }
}

/// Flan-T5-small's `config.json` (`t5small`), or a tiny model of the same kind (`t5tiny`).
fn t5_config(name: &str) -> T5Config {
    let small = name == "t5small";
    let (vocab, d, d_kv, heads, d_ff, layers) =
        if small { (32128, 512, 64, 6, 1024, 8) } else { (256, 32, 8, 4, 64, 2) };
    T5Config {
        vocab_size: vocab,
        d_model: d,
        d_kv,
        d_ff,
        num_layers: layers,
        num_decoder_layers: Some(layers),
        num_heads: heads,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        layer_norm_epsilon: 1e-6,
        feed_forward_proj: "gated-gelu".into(),
        tie_word_embeddings: Some(false),
        scale_decoder_outputs: None,
        decoder_start_token_id: Some(0),
        pad_token_id: Some(0),
        model_type: Some("t5".into()),
    }
}

/// A 4-layer Llama with grouped KV heads (`llama4`), or a tiny one (`llamatiny`).
fn llama_config(name: &str) -> LlamaConfig {
    let big = name == "llama4";
    let (vocab, d, heads, kv, inter, layers) = if big { (32000, 512, 8, 2, 1376, 4) } else { (256, 32, 4, 2, 64, 2) };
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: d,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: None,
        rms_norm_eps: 1e-6,
        rope_theta: Some(10000.0),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        hidden_act: "silu".into(),
        model_type: Some("llama".into()),
        sliding_window: None,
    }
}

/// Classes of the generative workloads; class `c`'s answer is `[CLASS_TOKEN0 + c, eos]`.
const CLASSES: usize = 10;
const CLASS_TOKEN0: u32 = 10;

/// Set up `mode` on a rank classifier over a random generative model of `workload`'s shape (`t5small`,
/// `llama4`, `t5tiny`, `llamatiny`).
pub fn setup_ranker(workload: &str, mode: &str, n: usize, seed: u64) -> Result<RankClassifier> {
    let (lm, eos, targets): (Generative, u32, [&str; 2]) = match workload {
        "t5small" | "t5tiny" => (Generative::T5(T5::random(t5_config(workload), seed)?), 1, [".q", ".v"]),
        "llama4" | "llamatiny" => {
            (Generative::Llama(Llama::random(llama_config(workload), seed)?), 2, [".q_proj", ".v_proj"])
        }
        other => bail!("unknown generative workload '{other}' (t5small, llama4, t5tiny, llamatiny)"),
    };
    let answers = (0..CLASSES as u32).map(|c| vec![CLASS_TOKEN0 + c, eos]).collect();
    let mut m = RankClassifier::new(lm, answers, 0)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    match mode {
        "forward" => {}
        "full" => m.lm.set_body_trainable(true),
        "lora" | "uniform" | "learned" => {
            let lins = m.lm.linears_mut().into_iter();
            let targets = lins.filter(|(p, _)| targets.iter().any(|t| p.ends_with(t))).map(|(_, l)| l);
            adapt_targets(targets, mode, n, &mut rng);
        }
        other => bail!("unknown bench mode '{other}' ({})", MODES.join(", ")),
    }
    Ok(m)
}

fn random_batch(rng: &mut impl Rng, batch: usize, seq: usize) -> (Batch, Vec<usize>) {
    let b = Batch {
        batch,
        seq,
        ids: (0..batch * seq).map(|_| rng.gen_range(1..30522u32)).collect(),
        types: vec![0; batch * seq],
        mask: vec![1.0; batch * seq],
    };
    (b, (0..batch).map(|_| rng.gen_range(0..10)).collect())
}

/// `batch` prompts of `seq` random tokens (ids from 2 on: 0 pads, 1 and 2 are EOS), each with a random class.
fn random_prompts(rng: &mut impl Rng, batch: usize, seq: usize, vocab: usize) -> Vec<Encoded> {
    (0..batch)
        .map(|_| Encoded {
            item: Item::Tokens { ids: (0..seq).map(|_| rng.gen_range(2..vocab as u32)).collect(), types: vec![0; seq] },
            label: rng.gen_range(0..CLASSES),
        })
        .collect()
}

fn prompt(e: &Encoded) -> Option<Vec<u32>> {
    match &e.item {
        Item::Tokens { ids, .. } => Some(ids.clone()),
        Item::Pixels { .. } => None,
    }
}

/// A workload's model with its fixed batch.
enum Net {
    Encoder(Box<Classifier>, Batch, Vec<usize>),
    /// The model, its examples and their prompts (the same tokens).
    Ranker(Box<RankClassifier>, Vec<Encoded>, Vec<Vec<u32>>),
}

impl Net {
    fn new(workload: &str, mode: &str, n: usize, batch: usize, seq: usize) -> Result<Net> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        Ok(if workload_config(workload).is_ok() {
            let (b, labels) = random_batch(&mut rng, batch, seq);
            Net::Encoder(Box::new(setup(workload, mode, n, 0)?), b, labels)
        } else {
            let m = setup_ranker(workload, mode, n, 0)?;
            let items = random_prompts(&mut rng, batch, seq, m.lm.vocab());
            let prompts = items.iter().filter_map(prompt).collect();
            Net::Ranker(Box::new(m), items, prompts)
        })
    }

    /// One step: `forward` only (encoders: inference; rankers: the loss without backward), or a training step.
    fn step(&mut self, forward: bool, opt: &AdamW, t: u64) -> Result<()> {
        match self {
            Net::Encoder(m, b, labels) if forward => m.forward(&*b).map(|_| ()),
            Net::Encoder(m, b, labels) => classifier_step(m, &*b, labels, opt, t, &|_| opt.lr, None).map(|_| ()),
            Net::Ranker(m, items, prompts) => {
                if forward {
                    let prompts: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
                    let labels: Vec<usize> = items.iter().map(|e| e.label).collect();
                    m.loss(&prompts, &labels, false).map(|_| ())
                } else {
                    let items: Vec<&Encoded> = items.iter().collect();
                    train_step(&mut **m, &items, opt, t, &|_| opt.lr, None).map(|_| ())
                }
            }
        }
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`), 0 where unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.to_string()))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Run every (workload, mode, N) combination.
pub fn run(opts: &BenchOpts, mut report: impl FnMut(&BenchResult)) -> Result<Vec<BenchResult>> {
    let mut out = Vec::new();
    for w in &opts.workloads {
        for mode in &opts.modes {
            let ns: Vec<usize> = if mode == "uniform" || mode == "learned" { opts.n_adapters.clone() } else { vec![0] };
            for &n in &ns {
                let mut net = Net::new(w, mode, n, opts.batch, opts.seq)?;
                // A rank classifier has no head, so under `uniform` (the bank merged once) nothing trains: its
                // step is the merged model's loss, forward only, as the uniform method evaluates it.
                let forward = mode == "forward" || (mode == "uniform" && matches!(net, Net::Ranker(..)));
                let opt = AdamW { lr: 1e-4, ..Default::default() };
                let mut times = Vec::new();
                for it in 0..opts.warmup + opts.iters {
                    let t0 = Instant::now();
                    net.step(forward, &opt, it as u64 + 1)?;
                    if it >= opts.warmup {
                        times.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
                // Elapsed times are finite by construction (Duration → f64); total_cmp cannot panic anyway.
                crate::util::ensure_finite(times.iter().copied(), "bench timings", "iteration")?;
                times.sort_by(|a, b| a.total_cmp(b));
                crate::engine::gemm::start_recording();
                net.step(forward, &opt, (opts.warmup + opts.iters) as u64 + 1)?;
                let calls = crate::engine::gemm::stop_recording();
                let flop: f64 = calls.iter().map(|c| crate::engine::gemm::matmul_flops(c.m, c.n, c.k)).sum();
                let floor_ms = crate::engine::gemm::replay(&calls, 3) * 1e3;
                if opts.shapes {
                    eprintln!("  products of one step ({w} {mode} N={n}): best of 5, ms and GFLOP/s");
                    for t in shape_timings(&calls, 5) {
                        let c = t.call;
                        let f = gemm::matmul_flops(c.m, c.n, c.k) / 1e6;
                        let bf = t.bf16_ms.map_or("-".to_string(), |b| format!("{b:.3} {:.0}", f / b));
                        eprintln!(
                            "  {:>5}x{:<5}x{:<5} {:?}{:?} {} ×{:<3} f32 {:.3} {:.0}  bf16 {bf}",
                            c.m,
                            c.n,
                            c.k,
                            c.ta,
                            c.tb,
                            if c.parallel { "par" } else { "seq" },
                            t.count,
                            t.f32_ms,
                            f / t.f32_ms
                        );
                    }
                }
                let median = times[times.len() / 2];
                let r = BenchResult {
                    implementation: "loracomp".into(),
                    workload: w.clone(),
                    mode: mode.clone(),
                    n_adapters: n,
                    batch: opts.batch,
                    seq: opts.seq,
                    threads: rayon::current_num_threads(),
                    dtype: if crate::engine::gemm::bf16_active() { "bf16" } else { "f32" }.into(),
                    median_ms: median,
                    min_ms: times[0],
                    peak_rss_mb: peak_rss_mb(),
                    step_gflop: flop / 1e9,
                    gflops: flop / 1e9 / (median / 1e3),
                    gemm_floor_ms: floor_ms,
                    ratio_to_floor: median / floor_ms.max(1e-9),
                };
                report(&r);
                out.push(r);
            }
        }
    }
    Ok(out)
}

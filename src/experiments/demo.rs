//! `loracomp demo`: the paper's three phases end to end on generated data, offline, in a few minutes.
//!
//! Data: a family of keyword-spotting tasks over a 100-word vocabulary. There are 24 keyword groups of two
//! words each, and filler words. A task picks 4 groups as its classes; an example is 6–12 filler words with
//! one or two keywords of its class's group inserted. Phase 1 pre-trains a tiny encoder (2 layers, d 64)
//! with full training on groups 0–11; phase 2 trains one LoRA per upstream task (groups 0–17, in overlapping
//! 4-way choices) and writes each as a PEFT adapter; phase 3 adapts to held-out tasks (groups 12–23, half of
//! them unseen by the bank) with every method at 1, 4 and 16 shots over 3 seeds. Phases 2 and 3 are a sweep
//! (`demo.toml` in the output directory): the same bank training, cells, report and plots as a real suite.

use crate::data::Example;
use crate::methods::{adapt, AdaptOpts, Method};
use crate::models::bert::Bert;
use crate::models::config::BertConfig;
use crate::models::tokenize::TextEncoder;
use anyhow::{anyhow, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::fmt::Write as _;
use std::path::Path;

const N_SPECIAL: usize = 4; // [PAD] [UNK] [CLS] [SEP]
const N_WORDS: usize = 96;
const N_GROUPS: usize = 24;
const FILLER_START: usize = 2 * N_GROUPS;

/// The generated tokenizer (WordLevel over `w0`…`w95`, `[CLS]`/`[SEP]` template), as a `tokenizer.json`.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert(t.to_string(), json!(i));
    }
    for w in 0..N_WORDS {
        vocab.insert(format!("w{w}"), json!(N_SPECIAL + w));
    }
    let special = |id: usize, c: &str| json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "[PAD]"), special(1, "[UNK]"), special(2, "[CLS]"), special(3, "[SEP]")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
        },
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    })
    .to_string()
}

fn config() -> BertConfig {
    BertConfig {
        vocab_size: N_SPECIAL + N_WORDS,
        hidden_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 128,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-12,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        pad_token_id: 0,
        model_type: Some("bert".into()),
        position_embedding_type: None,
    }
}

/// `n` examples a class of the task whose classes are keyword `groups`.
fn generate(groups: &[usize], n: usize, rng: &mut impl Rng) -> Vec<Example> {
    let mut out = Vec::new();
    for (label, &g) in groups.iter().enumerate() {
        for _ in 0..n {
            let len = rng.gen_range(6..=12);
            let mut words: Vec<usize> = (0..len).map(|_| rng.gen_range(FILLER_START..N_WORDS)).collect();
            for _ in 0..rng.gen_range(1..=2) {
                let pos = rng.gen_range(0..=words.len());
                words.insert(pos, 2 * g + rng.gen_range(0..2));
            }
            let text = words.iter().map(|w| format!("w{w}")).collect::<Vec<_>>().join(" ");
            out.push(Example { text, pair: None, label });
        }
    }
    out.shuffle(rng);
    out
}

/// Run the demo, writing `out/` (foundation model folder, bank adapters, results.jsonl, report.md).
pub fn run(out: &Path, quiet: bool) -> Result<String> {
    let t0 = std::time::Instant::now();
    let say = |s: &str| {
        if !quiet {
            eprintln!("[{:>5.1}s] {s}", t0.elapsed().as_secs_f64());
        }
    };
    std::fs::create_dir_all(out).map_err(|e| anyhow!("cannot create {}: {e}", out.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2024);
    let model_dir = out.join("foundation");
    std::fs::create_dir_all(&model_dir)?;
    crate::util::write_atomic(&model_dir.join("tokenizer.json"), tokenizer_json().as_bytes())?;
    let tok = TextEncoder::load(&model_dir, 32, 0)?;

    // Phase 1: pre-train the foundation model (full training on a 12-way task over groups 0–11).
    say("phase 1: pre-training a tiny encoder (2 layers, d 64) on keyword groups 0-11");
    let pre_groups: Vec<usize> = (0..12).collect();
    let pre_train = generate(&pre_groups, 150, &mut rng);
    let pre_test = generate(&pre_groups, 20, &mut rng);
    let mut opts = AdaptOpts::defaults(Method::Full, 0);
    opts.loop_opts.steps = 400;
    opts.loop_opts.batch = 32;
    opts.lr_body = 1e-3;
    opts.lr_head = 1e-2;
    let base = Bert::random(config(), 7)?;
    let pre = adapt(&base, &tok, 12, &pre_train, &pre_test, &[], &opts)?;
    let bert = pre.model.classifier().expect("a BERT classifier").bert().clone();
    say(&format!("  pre-training accuracy {:.1}%", pre.scores.accuracy * 100.0));
    crate::engine::weights::write_safetensors(&model_dir.join("model.safetensors"), &bert.state_dict(), None)?;
    crate::util::write_atomic(&model_dir.join("config.json"), serde_json::to_string_pretty(&config())?.as_bytes())?;

    // Phases 2 and 3 run through the sweep machinery, as a real suite does: the tasks are written as task
    // directories, the bank is trained once per upstream task, every cell is appended to results.jsonl, and
    // report.md and the plots come from the sweep's report.
    let tasks = out.join("tasks");
    let write_task =
        |name: &str, groups: &[usize], n_train: usize, n_test: usize, rng: &mut rand::rngs::StdRng| -> Result<()> {
            let dir = tasks.join(name);
            std::fs::create_dir_all(&dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
            let labels: Vec<String> = groups.iter().map(|g| format!("group{g}")).collect();
            crate::util::write_atomic(&dir.join("labels.txt"), (labels.join("\n") + "\n").as_bytes())?;
            for (split, n) in [("train", n_train), ("valid", n_test / 2), ("test", n_test)] {
                let lines: String = generate(groups, n, rng)
                    .iter()
                    .map(|e| json!({"text": e.text, "label": labels[e.label]}).to_string() + "\n")
                    .collect();
                crate::util::write_atomic(&dir.join(format!("{split}.jsonl")), lines.as_bytes())?;
            }
            Ok(())
        };
    let upstream: Vec<Vec<usize>> = (0..8).map(|i| (0..4).map(|j| (i * 2 + j * 3) % 18).collect()).collect();
    for (i, groups) in upstream.iter().enumerate() {
        write_task(&format!("task{i}"), groups, 60, 20, &mut rng)?;
    }
    let downstream: Vec<(&str, Vec<usize>)> =
        vec![("near", vec![12, 13, 14, 15]), ("mixed", vec![16, 17, 18, 19]), ("novel", vec![20, 21, 22, 23])];
    for (name, groups) in &downstream {
        write_task(name, groups, 40, 50, &mut rng)?;
    }
    let config = format!(
        r#"# The demo's phases 2 and 3 (written by `loracomp demo`).
name = "demo"
model = "{}"
data = "{}"
upstream = [{}]
downstream = ["near", "mixed", "novel"]
shots = [1, 4, 16]
seeds = 3
methods = ["linear-probe", "full", "lora", "uniform", "learned"]

[bank]
rank = 4
alpha = 8
targets = ["query", "value"]
epochs = 10
batch = 16

[adapt]
steps = 100
batch = 16
max_len = 32
lora_rank = 4
lora_alpha = 8
lr = {{ full = 1e-3 }}

[heatmap]
task = "novel"
shots = 16
"#,
        model_dir.display(),
        tasks.display(),
        (0..upstream.len()).map(|i| format!("\"task{i}\"")).collect::<Vec<_>>().join(", ")
    );
    say(&format!(
        "phase 2: a bank of {} LoRA modules (rank 4 on query, value); phase 3: every method, shots 1/4/16, 3 seeds",
        upstream.len()
    ));
    let cfg_path = out.join("demo.toml");
    crate::util::write_atomic(&cfg_path, config.as_bytes())?;
    let cfg = super::sweep::SweepConfig::parse(&cfg_path, &config)?;
    cfg.check_inputs()?;
    let opts = super::sweep::SweepOpts::new(quiet, rayon::current_num_threads());
    // A demo always starts afresh: results of an earlier demo in the same directory are replaced.
    std::fs::remove_file(out.join("results.jsonl")).ok();
    let res = super::sweep::run(&cfg, &config, out, &opts)?;
    let mut table = String::new();
    let shots = ["1", "4", "16"];
    writeln!(table, "| method | trainable params | {} |", shots.map(|k| format!("{k}-shot")).join(" | ")).unwrap();
    writeln!(table, "|---|---|{}", "---|".repeat(shots.len())).unwrap();
    for m in Method::ALL {
        let cells: Vec<String> = shots
            .iter()
            .map(|&k| {
                let v: Vec<f64> = res
                    .cells
                    .iter()
                    .filter(|c| c.kind == "main" && c.method == m.name() && c.shots == k)
                    .map(|c| c.accuracy * 100.0)
                    .collect();
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt();
                format!("{mean:.1} ± {sd:.1}")
            })
            .collect();
        let params = res.cells.iter().find(|c| c.method == m.name()).map_or(0, |c| c.trainable_params);
        writeln!(table, "| {} | {params} | {} |", m.name(), cells.join(" | ")).unwrap();
    }
    let summary = format!(
        "# loracomp demo\n\nGenerated keyword tasks; foundation model pre-trained in-process ({:.1}% on its own task); \
         bank of {} LoRA modules; accuracy (%) on 3 held-out tasks, mean ± std over tasks × 3 seeds.\n\n{table}\n\
         Wall time: {:.0} s. Full report with confidence intervals, paired tests and plots: report.md. Per-run \
         results: results.jsonl. Foundation model: foundation/. Tasks: tasks/. Bank: bank/.\n",
        pre.scores.accuracy * 100.0,
        upstream.len(),
        t0.elapsed().as_secs_f64()
    );
    crate::util::write_atomic(&out.join("summary.md"), summary.as_bytes())?;
    Ok(summary)
}

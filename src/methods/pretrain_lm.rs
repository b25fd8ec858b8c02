//! `loracomp pretrain --arch llama`: phase 1 for generative models where no pre-trained one can be had — a
//! small Llama trained from scratch as a causal language model on the texts of text tasks (their train splits),
//! then written as an unmodified Hugging Face `LlamaForCausalLM` directory (config.json, model.safetensors,
//! tokenizer.json, special_tokens_map.json, tokenizer_config.json) that loracomp and Python transformers load.
//!
//! The tokenizer is a BPE trained on the same texts by the `tokenizers` crate (lower-cased, SentencePiece-style
//! `▁` word boundaries, `<unk>` 0, `<s>` 1, `</s>` 2, BOS prepended as Llama's tokenizer does). The label names of
//! the tasks are part of its training text, so that every label is a short answer. Each training sequence is
//! `<s> text </s>` (truncated to `max_len`); the loss is transformers' causal-LM loss over every token after
//! the first.

use super::common::{LoopOpts, Sampler};
use crate::data::{Examples, Task};
use crate::engine::param::{AdamW, NonFinite};
use crate::models::llama::{causal_lm_loss, Llama, LlamaConfig, LmBatch, IGNORE};
use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// Architecture, tokenizer and schedule of a language-model pre-training run.
#[derive(Clone, Debug, Serialize)]
pub struct LmPretrainOpts {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub mlp: usize,
    pub vocab: usize,
    pub max_len: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub seed: u64,
}

/// Every text of `split` of the text tasks (text and text pair), in task order.
fn texts(tasks: &[Task], split: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in tasks {
        match t.examples(split)? {
            Examples::Text(v) => {
                for e in v {
                    out.push(e.text);
                    out.extend(e.pair);
                }
            }
            Examples::Images(..) => bail!("{}: language-model pre-training needs text tasks", t.dir.display()),
        }
    }
    Ok(out)
}

/// Train the BPE tokenizer on `corpus` and return it with the BOS post-processor.
fn train_tokenizer(corpus: &[String], vocab: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainer, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::normalizers::utils::Lowercase;
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::AddedToken;
    let e = |e: Box<dyn std::error::Error + Send + Sync>| anyhow!("tokenizer training: {e}");
    let bpe = BPE::builder().unk_token("<unk>".into()).build().map_err(e)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_normalizer(Some(Lowercase));
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    tok.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new('▁', PrependScheme::Always, true)));
    let specials = ["<unk>", "<s>", "</s>"].iter().map(|s| AddedToken::from(s.to_string(), true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .build()
        .into();
    tok.train(&mut trainer, corpus.iter()).map_err(e)?;
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(|m| anyhow!("tokenizer template: {m}"))?
        .try_pair("<s> $A $B")
        .map_err(|m| anyhow!("tokenizer template: {m}"))?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|m| anyhow!("tokenizer template: {m}"))?;
    tok.with_post_processor(Some(post));
    for (id, s) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        if tok.token_to_id(s) != Some(id as u32) {
            bail!("tokenizer training: special token {s} did not get id {id}");
        }
    }
    Ok(tok)
}

/// The `LlamaForCausalLM` config.json of `opts` (untied head, no biases, RoPE θ 10000).
pub fn config_json(opts: &LmPretrainOpts, vocab: usize) -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": opts.hidden,
        "intermediate_size": opts.mlp,
        "num_hidden_layers": opts.layers,
        "num_attention_heads": opts.heads,
        "num_key_value_heads": opts.kv_heads,
        "head_dim": opts.hidden / opts.heads,
        "hidden_act": "silu",
        "max_position_embeddings": opts.max_len.max(64),
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    })
}

/// Token sequences `<s> text </s>` of `texts`, truncated to `max_len` (the BOS comes from the tokenizer).
fn sequences(tok: &tokenizers::Tokenizer, texts: &[String], max_len: usize) -> Result<Vec<Vec<u32>>> {
    let enc = tok.encode_batch(texts.to_vec(), true).map_err(|e| anyhow!("tokenizer: {e}"))?;
    Ok(enc
        .into_iter()
        .map(|e| {
            let mut ids = e.get_ids().to_vec();
            ids.push(2);
            ids.truncate(max_len);
            ids
        })
        .filter(|s| s.len() >= 2)
        .collect())
}

/// A right-padded batch of sequences with every token after the first as a target.
fn lm_batch(seqs: &[&Vec<u32>]) -> (LmBatch, Vec<i64>) {
    let seq = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
    let mut b = LmBatch { batch: seqs.len(), seq, ids: vec![2; seqs.len() * seq], mask: vec![0.0; seqs.len() * seq] };
    let mut labels = vec![IGNORE; b.ids.len()];
    for (i, s) in seqs.iter().enumerate() {
        for (t, &id) in s.iter().enumerate() {
            b.ids[i * seq + t] = id;
            b.mask[i * seq + t] = 1.0;
            labels[i * seq + t] = id as i64;
        }
    }
    (b, labels)
}

/// Mean causal-LM loss per token over `seqs` (batches of 32), no gradients.
fn eval_loss(m: &mut Llama, seqs: &[Vec<u32>]) -> Result<f64> {
    let (mut sum, mut n) = (0.0f64, 0usize);
    for chunk in seqs.chunks(32) {
        let refs: Vec<&Vec<u32>> = chunk.iter().collect();
        let (b, labels) = lm_batch(&refs);
        let v = m.vocab();
        let logits = m.forward(&b)?;
        let mut dl = vec![0.0f32; logits.len()];
        let loss = causal_lm_loss(logits, &labels, b.batch, b.seq, v, &mut dl)?;
        let count: usize = chunk.iter().map(|s| s.len() - 1).sum();
        sum += loss as f64 * count as f64;
        n += count;
    }
    Ok(sum / n.max(1) as f64)
}

/// Pre-train on the texts of `tasks` and write the model directory `out`. Returns the metrics (also written
/// to `out/pretrain_metrics.json`). `progress(step, loss)` is called after every step.
pub fn pretrain_llama(
    tasks: &[Task],
    opts: &LmPretrainOpts,
    out: &Path,
    mut progress: impl FnMut(usize, f32),
) -> Result<Value> {
    if tasks.is_empty() {
        bail!("give at least one --task");
    }
    if opts.heads == 0 || !opts.hidden.is_multiple_of(opts.heads) || !(opts.hidden / opts.heads).is_multiple_of(2) {
        bail!("--hidden {} must be a multiple of --heads {} with an even head size", opts.hidden, opts.heads);
    }
    if opts.kv_heads == 0 || !opts.heads.is_multiple_of(opts.kv_heads) {
        bail!("--kv-heads {} must divide --heads {}", opts.kv_heads, opts.heads);
    }
    let train_texts = texts(tasks, "train")?;
    let valid_texts: Vec<String> = tasks
        .iter()
        .filter(|t| t.has_split("valid"))
        .map(|t| texts(std::slice::from_ref(t), "valid"))
        .collect::<Result<Vec<_>>>()?
        .concat();
    // Label names (underscores as spaces too) join the tokenizer's corpus, three times each.
    let mut corpus = train_texts.clone();
    for t in tasks {
        for l in &t.labels {
            for _ in 0..3 {
                corpus.push(l.clone());
                corpus.push(l.replace('_', " "));
            }
        }
    }
    let t0 = std::time::Instant::now();
    let tok = train_tokenizer(&corpus, opts.vocab)?;
    let vocab = tok.get_vocab_size(true);
    let train = sequences(&tok, &train_texts, opts.max_len)?;
    let valid = sequences(&tok, &valid_texts, opts.max_len)?;
    if train.is_empty() {
        bail!("no training text in the tasks' train splits");
    }
    let cfg_json = config_json(opts, vocab);
    let cfg: LlamaConfig = serde_json::from_value(cfg_json.clone())?;
    let mut m = Llama::random(cfg, opts.seed)?;
    m.set_all_trainable(true);
    let lo = LoopOpts {
        steps: opts.steps,
        batch: opts.batch,
        seed: opts.seed,
        weight_decay: opts.weight_decay,
        warmup_frac: 0.05,
    };
    let opt = AdamW { weight_decay: opts.weight_decay, ..Default::default() };
    let mut sampler = Sampler::new(train.len(), opts.batch, opts.seed);
    let mut losses = Vec::with_capacity(opts.steps);
    for t in 0..opts.steps {
        let idx = sampler.next_batch();
        let refs: Vec<&Vec<u32>> = idx.iter().map(|&i| &train[i]).collect();
        let (b, labels) = lm_batch(&refs);
        m.zero_grad();
        let loss = m.loss_and_backward(&b, &labels)?;
        if !loss.is_finite() {
            bail!("pre-training diverged at step {}: loss is {loss}", t + 1);
        }
        let lr = opts.lr * lo.lr_factor(t);
        for (name, p) in m.trainable_params_mut() {
            match opt.step_checked(p, t as u64 + 1, lr) {
                Ok(()) => {}
                Err(NonFinite::Grad) => {
                    bail!("pre-training diverged at step {}: gradient of {name} holds NaN or Inf", t + 1)
                }
                Err(NonFinite::Data) => bail!("pre-training diverged at step {}: {name} holds NaN or Inf", t + 1),
            }
        }
        m.invalidate();
        losses.push(loss);
        progress(t, loss);
    }
    let train_seconds = t0.elapsed().as_secs_f64();
    m.set_all_trainable(false);
    let valid_loss = if valid.is_empty() { None } else { Some(eval_loss(&mut m, &valid)?) };
    std::fs::create_dir_all(out).map_err(|e| anyhow!("cannot create {}: {e}", out.display()))?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    crate::engine::weights::write_safetensors(&out.join("model.safetensors"), &m.state_dict(), Some(meta))?;
    crate::util::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&cfg_json)?.as_bytes())?;
    let tok_json = tok.to_string(false).map_err(|e| anyhow!("tokenizer: {e}"))?;
    crate::util::write_atomic(&out.join("tokenizer.json"), tok_json.as_bytes())?;
    let special = json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
    crate::util::write_atomic(
        &out.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special)?.as_bytes(),
    )?;
    let tcfg = json!({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                      "unk_token": "<unk>", "add_bos_token": true, "add_eos_token": false,
                      "model_max_length": opts.max_len.max(64)});
    crate::util::write_atomic(&out.join("tokenizer_config.json"), serde_json::to_string_pretty(&tcfg)?.as_bytes())?;
    let tail = &losses[losses.len().saturating_sub(50)..];
    let metrics = json!({
        "arch": "llama",
        "tasks": tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "n_train_sequences": train.len(),
        "n_train_tokens": train.iter().map(|s| s.len()).sum::<usize>(),
        "vocab_size": vocab,
        "options": opts,
        "parameters": m.state_dict().values().map(|(s, _)| s.iter().product::<usize>()).sum::<usize>(),
        "final_loss_mean_last_50": tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        "valid_loss": valid_loss,
        "valid_perplexity": valid_loss.map(f64::exp),
        "train_seconds": train_seconds,
        "loracomp_version": env!("CARGO_PKG_VERSION"),
    });
    crate::util::write_atomic(&out.join("pretrain_metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

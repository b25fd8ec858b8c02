//! `loracomp pretrain --arch vit`: phase 1 of the paper where no pre-trained model can be had — a small ViT
//! trained from scratch with a classification head (CLS pooling) on one or more image tasks, then written as
//! an unmodified Hugging Face `ViTModel` directory (config.json, model.safetensors with classic checkpoint
//! keys, preprocessor_config.json) that loracomp and Python transformers load.
//!
//! Several tasks are pre-trained on as one task over the union of their labels (`task/label`). Grey images
//! are repeated into three channels and every image is resized to the model's size by the preprocessor that
//! is written with the model (bilinear, rescale 1/255, normalise with mean 0.5 and std 0.5 per channel).

use super::common::{encode_examples, predict, score, train_model, Encoded, LoopOpts};
use crate::data::{Examples, Task};
use crate::engine::kernels::Pooling;
use crate::models::classifier::Classifier;
use crate::models::encoder::Frontend;
use crate::models::image::Preprocessor;
use crate::models::vit::{Vit, VitConfig, VitKind};
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;

/// Architecture and schedule of the pre-training run.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainOpts {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    pub patch: usize,
    pub image_size: usize,
    pub steps: usize,
    pub batch: usize,
    pub lr: f32,
    pub weight_decay: f32,
    pub seed: u64,
}

/// `preprocessor_config.json` written with a pre-trained model of image size `n`.
pub fn preprocessor_json(n: usize) -> Value {
    json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": n, "width": n},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5]
    })
}

/// The ViT configuration of `opts` (pre-LN, GELU, qkv biases, three channels).
pub fn config(opts: &PretrainOpts) -> VitConfig {
    VitConfig {
        kind: VitKind::Vit,
        hidden_size: opts.hidden,
        num_hidden_layers: opts.layers,
        num_attention_heads: opts.heads,
        intermediate_size: opts.mlp,
        hidden_act: "gelu".into(),
        layer_norm_eps: 1e-12,
        image_size: (opts.image_size, opts.image_size),
        patch_size: opts.patch,
        num_channels: 3,
        qkv_bias: true,
    }
}

/// Union of the tasks' splits, labels offset per task.
fn union(tasks: &[Task], split: &str, front: &Frontend) -> Result<Vec<Encoded>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for t in tasks {
        let ex = t.examples(split)?;
        if !matches!(ex, Examples::Images(..)) {
            bail!("{}: pre-training needs image tasks (image.json)", t.dir.display());
        }
        out.extend(encode_examples(front, &ex)?.into_iter().map(|mut e| {
            e.label += offset;
            e
        }));
        offset += t.labels.len();
    }
    Ok(out)
}

/// Pre-train on `tasks` and write the model directory `out`. Returns the metrics (also written to
/// `out/pretrain_metrics.json`).
pub fn pretrain_vit(
    tasks: &[Task],
    opts: &PretrainOpts,
    out: &Path,
    progress: impl FnMut(usize, f32),
) -> Result<Value> {
    if tasks.is_empty() {
        bail!("give at least one --task");
    }
    let cfg = config(opts);
    cfg.validate()?;
    if !opts.image_size.is_multiple_of(opts.patch) {
        bail!("--image-size {} is not a multiple of --patch {}", opts.image_size, opts.patch);
    }
    let pre_json = preprocessor_json(opts.image_size);
    let front = Frontend::Image { pre: Preprocessor::from_json(&pre_json)?, channels: 3 };
    let labels: Vec<String> = if tasks.len() == 1 {
        tasks[0].labels.clone()
    } else {
        tasks.iter().flat_map(|t| t.labels.iter().map(move |l| format!("{}/{l}", t.name))).collect()
    };
    let train = union(tasks, "train", &front)?;
    let valid = union(tasks, "valid", &front)?;
    let test = union(tasks, "test", &front)?;
    let t0 = std::time::Instant::now();
    let vit = Vit::random(cfg, opts.seed)?;
    let mut model = Classifier::new(vit, Pooling::Cls, labels.len(), opts.seed);
    model.encoder.set_all_trainable(true);
    let lo = LoopOpts {
        steps: opts.steps,
        batch: opts.batch,
        seed: opts.seed,
        weight_decay: opts.weight_decay,
        warmup_frac: 0.1,
    };
    let lr = opts.lr;
    let losses = train_model(&mut model, &train, &lo, &|_| lr, None, progress)?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let gold = |d: &[Encoded]| d.iter().map(|e| e.label).collect::<Vec<_>>();
    let vs = score(&gold(&valid), &predict(&mut model, &valid, 64)?, labels.len());
    let ts = score(&gold(&test), &predict(&mut model, &test, 64)?, labels.len());
    let crate::models::encoder::Encoder::Vit(vit) = &model.encoder else { unreachable!("built as a ViT") };
    write_vit_dir(vit, &pre_json, out)?;
    let tail = &losses[losses.len().saturating_sub(20)..];
    let metrics = json!({
        "tasks": tasks.iter().map(|t| t.name.clone()).collect::<Vec<_>>(),
        "labels": labels,
        "n_train": train.len(),
        "options": opts,
        "parameters": vit.state_dict().values().map(|(s, _)| s.iter().product::<usize>()).sum::<usize>(),
        "valid_accuracy": vs.accuracy,
        "test_accuracy": ts.accuracy,
        "final_loss_mean_last_20": tail.iter().sum::<f32>() / tail.len().max(1) as f32,
        "train_seconds": train_seconds,
        "loracomp_version": env!("CARGO_PKG_VERSION"),
    });
    crate::util::write_atomic(&out.join("pretrain_metrics.json"), serde_json::to_string_pretty(&metrics)?.as_bytes())?;
    Ok(metrics)
}

/// Write `vit` as a Hugging Face `ViTModel` directory: config.json, model.safetensors (classic keys, as
/// transformers saves them) and preprocessor_config.json.
pub fn write_vit_dir(vit: &Vit, preprocessor: &Value, out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", out.display()))?;
    let meta: std::collections::HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    crate::engine::weights::write_safetensors(&out.join("model.safetensors"), &vit.state_dict(), Some(meta))?;
    crate::util::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&vit.config_json())?.as_bytes())?;
    crate::util::write_atomic(
        &out.join("preprocessor_config.json"),
        serde_json::to_string_pretty(preprocessor)?.as_bytes(),
    )?;
    Ok(())
}

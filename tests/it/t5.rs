//! T5 against transformers / peft goldens (tools/make_t5_goldens.py), and finite-difference checks of its
//! backward pass.

use loracomp::engine::param::Param;
use loracomp::engine::t5_ops::relative_position_bucket;
use loracomp::lora::bank::{Composition, FreshLora};
use loracomp::lora::host::{attach_adapters, LinearHost};
use loracomp::lora::peft::Adapter;
use loracomp::models::t5::{seq_cross_entropy, shift_right, Seq2SeqBatch, T5};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::PathBuf;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(p)
}

fn golden(model: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(model).join("golden.json")).unwrap()).unwrap()
}

fn ints(v: &Value) -> (usize, usize, Vec<i64>) {
    let rows = v.as_array().unwrap();
    let cols = rows[0].as_array().unwrap().len();
    let data = rows.iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap())).collect();
    (rows.len(), cols, data)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn batch_of(g: &Value) -> Seq2SeqBatch {
    let (b, s, ids) = ints(&g["input_ids"]);
    let (_, _, mask) = ints(&g["attention_mask"]);
    let (_, t, dec) = ints(&g["decoder_input_ids"]);
    Seq2SeqBatch {
        batch: b,
        src_len: s,
        tgt_len: t,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        attention_mask: mask.iter().map(|&x| x as f32).collect(),
        decoder_input_ids: dec.iter().map(|&x| x as u32).collect(),
        decoder_attention_mask: None,
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn logits_loss_and_buckets_match_transformers() {
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let g = golden(name);
        let mut m = T5::load(&fixture(name)).unwrap();
        let b = batch_of(&g);
        let logits = m.forward(&b).unwrap().to_vec();
        let want = floats(&g["logits"]["data"]);
        let diff = max_diff(&logits, &want);
        assert!(diff <= 1e-4, "{name}: logits max abs diff {diff}");
        // Teacher-forced loss (labels -100 ignored), and the decoder inputs are the labels shifted right.
        let (_, t, labels) = ints(&g["labels"]);
        assert_eq!(shift_right(&labels, b.batch, t, 0, 0), b.decoder_input_ids);
        let mut dl = vec![0.0; logits.len()];
        let loss = seq_cross_entropy(&logits, &labels, m.vocab(), &mut dl).unwrap();
        let want_loss = g["loss"].as_f64().unwrap() as f32;
        assert!((loss - want_loss).abs() <= 1e-4, "{name}: loss {loss} vs {want_loss}");
        let bk = &g["buckets"];
        for (key, bidir) in [("bidirectional", true), ("causal", false)] {
            for (r, w) in bk["relative"].as_array().unwrap().iter().zip(bk[key].as_array().unwrap()) {
                let got = relative_position_bucket(r.as_i64().unwrap(), bidir, 8, 12);
                assert_eq!(got as i64, w.as_i64().unwrap(), "{key} bucket of {r}");
            }
        }
    }
}

#[test]
fn rank_classification_scores_match_transformers() {
    for name in ["tiny-t5", "tiny-t5-gated"] {
        let g = golden(name);
        let mut m = T5::load(&fixture(name)).unwrap();
        let b = batch_of(&g);
        let labels: Vec<Vec<u32>> = g["rank"]["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let scores = m.label_log_probs(&b.input_ids, &b.attention_mask, b.batch, b.src_len, &labels).unwrap();
        let want: Vec<f64> = g["rank"]["scores"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .collect();
        for (s, w) in scores.iter().zip(&want) {
            assert!((s - w).abs() <= 1e-4, "{name}: score {s} vs {w}");
        }
        let pred = m.rank_classify(&b.input_ids, &b.attention_mask, b.batch, b.src_len, &labels).unwrap();
        for (i, p) in pred.iter().enumerate() {
            let row = &want[i * labels.len()..(i + 1) * labels.len()];
            assert!(row.iter().all(|v| v.is_finite()), "{name}: example {i}: non-finite golden scores {row:?}");
            let best = (0..labels.len()).max_by(|&a, &c| row[a].total_cmp(&row[c])).unwrap();
            assert_eq!(*p, best, "{name}: example {i}");
        }
    }
}

#[test]
fn peft_adapter_on_q_and_v_gives_peft_logits() {
    let g = golden("tiny-t5-gated");
    let mut m = T5::load(&fixture("tiny-t5-gated")).unwrap();
    let a = Adapter::load(&fixture("tiny-t5-gated/adapter_qv")).unwrap();
    // 2 encoder blocks × (q, v) + 3 decoder blocks × (self q, v + cross q, v).
    assert_eq!(a.modules.len(), 16);
    let used = attach_adapters(&mut m, &[a], |_, n| Composition::Fixed(vec![1.0; n])).unwrap();
    assert_eq!(used.len(), 16);
    assert!(used.contains(&"decoder.block.2.layer.1.EncDecAttention.v".to_string()));
    let logits = m.forward(&batch_of(&g)).unwrap().to_vec();
    let diff = max_diff(&logits, &floats(&g["peft_logits"]["data"]));
    assert!(diff <= 1e-4, "PEFT logits max abs diff {diff}");
    assert!(max_diff(&logits, &floats(&g["logits"]["data"])) > 1e-2, "adapter had no effect");
}

#[test]
fn adapter_for_a_module_t5_lacks_is_refused() {
    let mut m = T5::load(&fixture("tiny-t5")).unwrap();
    let mut a = Adapter::load(&fixture("tiny-t5-gated/adapter_qv")).unwrap();
    let (_, lora) = a.modules.pop_first().unwrap();
    a.modules.insert("decoder.block.7.layer.0.SelfAttention.q".into(), lora);
    let err = attach_adapters(&mut m, &[a], |_, n| Composition::Fixed(vec![1.0; n])).unwrap_err().to_string();
    assert!(err.contains("decoder.block.7.layer.0.SelfAttention.q") && err.contains("T5"), "{err}");
}

#[test]
fn bad_config_names_file_and_key() {
    let dir = std::env::temp_dir().join(format!("loracomp-t5-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("tiny-t5/model.safetensors"), dir.join("model.safetensors")).unwrap();
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(fixture("tiny-t5/config.json")).unwrap()).unwrap();
    for (key, val, want) in [
        ("feed_forward_proj", Value::from("gated-swish"), "feed_forward_proj"),
        ("d_kv", Value::from(0), "'d_kv' must be positive"),
        ("num_heads", Value::from(3), "has shape"),
    ] {
        let mut c = cfg.clone();
        c[key] = val;
        std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        let err = format!("{:#}", T5::load(&dir).unwrap_err());
        assert!(err.contains(want), "{key}: {err}");
        assert!(err.contains(&dir.display().to_string()), "{key}: error does not name the file: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------------------
// Gradients.

fn rand_vec(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * s).collect()
}

/// A model with a learned composition of two adapters on q and v, and fresh LoRAs on a few other layers.
fn trainable_model(name: &str) -> T5 {
    let mut m = T5::load(&fixture(name)).unwrap();
    let a = Adapter::load(&fixture("tiny-t5-gated/adapter_qv")).unwrap();
    let mut b = a.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for lora in b.modules.values_mut() {
        lora.a.iter_mut().for_each(|x| *x = rng.gen_range(-0.5f32..0.5));
    }
    attach_adapters(&mut m, &[a, b], |_, n| {
        let mut p = Param::new(vec![n], vec![0.3, -0.2]);
        p.set_trainable(true);
        Composition::Learned(p)
    })
    .unwrap();
    for path in [
        "encoder.block.0.layer.0.SelfAttention.k",
        "encoder.block.1.layer.1.DenseReluDense.wo",
        "decoder.block.0.layer.1.EncDecAttention.o",
        "decoder.block.2.layer.2.DenseReluDense.wo",
        "lm_head",
    ] {
        let lin = m.linear_mut(path).unwrap();
        let r = 2;
        let mut fa = Param::new(vec![r, lin.din], rand_vec(&mut rng, r * lin.din, 0.4));
        let mut fb = Param::new(vec![lin.dout, r], rand_vec(&mut rng, lin.dout * r, 0.4));
        fa.set_trainable(true);
        fb.set_trainable(true);
        lin.fresh = Some(FreshLora { a: fa, b: fb, r, scale: 1.5 });
    }
    m
}

fn loss_of(m: &mut T5, b: &Seq2SeqBatch, labels: &[i64], emb: Option<(&[f32], &[f32])>) -> f64 {
    let logits = match emb {
        Some((e, d)) => m.forward_embeds(b, e, d).unwrap().to_vec(),
        None => m.forward(b).unwrap().to_vec(),
    };
    // The same mean cross-entropy as seq_cross_entropy, summed in f64 so that finite differences are not
    // swamped by the rounding of an f32 loss.
    let v = m.vocab();
    let (mut sum, mut n) = (0.0f64, 0);
    for (row, &lab) in logits.chunks(v).zip(labels) {
        if lab != -100 {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln() + mx;
            sum += lse - row[lab as usize] as f64;
            n += 1;
        }
    }
    sum / n as f64
}

fn rel_err(num: f64, ana: f64) -> f64 {
    (num - ana).abs() / (1e-2 + num.abs().max(ana.abs()))
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    for name in ["tiny-t5-gated", "tiny-t5"] {
        let g = golden(name);
        let b = batch_of(&g);
        let (_, _, labels) = ints(&g["labels"]);
        let mut m = trainable_model(name);
        // Frozen weights carry no gradient buffers at all.
        assert!(!m.shared.trainable() && !m.enc_final_ln.trainable());
        for (_, lin) in m.linears_mut() {
            assert!(!lin.w.trainable());
        }
        let logits = m.forward(&b).unwrap().to_vec();
        let mut dl = vec![0.0; logits.len()];
        seq_cross_entropy(&logits, &labels, m.vocab(), &mut dl).unwrap();
        m.backward(&dl, true).unwrap();
        let grads: Vec<(String, Vec<f32>)> =
            m.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
        assert_eq!(grads.len(), 16 + 2 * 5, "{name}: trainable tensors");
        let eps = 1e-2f32;
        let mut checked = 0;
        for (pname, gr) in &grads {
            let step = (gr.len() / 3).max(1);
            for i in (0..gr.len()).step_by(step) {
                let set = |m: &mut T5, delta: f32| {
                    for (n, p) in m.trainable_params_mut() {
                        if &n == pname {
                            p.data[i] += delta;
                        }
                    }
                    m.invalidate();
                };
                set(&mut m, eps);
                let lp = loss_of(&mut m, &b, &labels, None);
                set(&mut m, -2.0 * eps);
                let lm = loss_of(&mut m, &b, &labels, None);
                set(&mut m, eps);
                let num = (lp - lm) / (2.0 * eps as f64);
                let err = rel_err(num, gr[i] as f64);
                assert!(err < 2e-2, "{name} {pname}[{i}]: analytic {} vs numeric {num} ({err:.2e})", gr[i]);
                checked += 1;
            }
        }
        assert!(checked > 60, "checked {checked}");
        // Gradients of the input embeddings (encoder and decoder).
        let (de, dd) = {
            let (a, c) = m.input_grads();
            (a.to_vec(), c.to_vec())
        };
        let enc = m.embed(&b.input_ids);
        let dec = m.embed(&b.decoder_input_ids);
        assert!(de.iter().any(|v| *v != 0.0) && dd.iter().any(|v| *v != 0.0));
        // The embeddings are small (|x| ~ 0.1) and feed an RMS norm directly, so a smaller step is needed.
        let eps = 1e-3f32;
        let (mut kinks, mut emb_checked) = (0, 0);
        for (which, x, gr) in [("encoder", &enc, &de), ("decoder", &dec, &dd)] {
            let step = x.len() / 25;
            for i in (0..x.len()).step_by(step) {
                let mut num_at = |h: f32| {
                    let mut xp = x.clone();
                    xp[i] += h;
                    let (e1, d1) = if which == "encoder" { (&xp, &dec) } else { (&enc, &xp) };
                    let lp = loss_of(&mut m, &b, &labels, Some((e1, d1)));
                    xp[i] -= 2.0 * h;
                    let (e1, d1) = if which == "encoder" { (&xp, &dec) } else { (&enc, &xp) };
                    let lm = loss_of(&mut m, &b, &labels, Some((e1, d1)));
                    (lp - lm) / (2.0 * h as f64)
                };
                let (num, num_small) = (num_at(eps), num_at(eps / 3.0));
                if rel_err(num, num_small) > 1e-2 {
                    // A ReLU kink inside the step: the difference quotient is not a derivative there.
                    kinks += 1;
                    continue;
                }
                let err = rel_err(num, gr[i] as f64);
                emb_checked += 1;
                assert!(err < 2e-2, "{name} d{which}_emb[{i}]: analytic {} vs numeric {num} ({err:.2e})", gr[i]);
            }
        }
        assert!(kinks <= 5 && emb_checked >= 45, "{name}: {emb_checked} checked, {kinks} skipped as kinks");
        // Padded encoder positions get no gradient.
        let d = m.cfg.d_model;
        let s = b.src_len;
        assert!(de[(s + s - 1) * d..(2 * s) * d].iter().all(|v| *v == 0.0));
    }
}

#[test]
fn cross_entropy_ignores_minus_100_and_checks_labels() {
    let logits = vec![0.1, 0.5, -0.3, 1.0, 0.0, 0.2];
    let mut d = vec![9.0; 6];
    let l = seq_cross_entropy(&logits, &[2, -100], 3, &mut d).unwrap();
    let lse = (0.1f64.exp() + 0.5f64.exp() + (-0.3f64).exp()).ln();
    assert!((l as f64 - (lse + 0.3)).abs() < 1e-6);
    assert_eq!(&d[3..], &[0.0, 0.0, 0.0]);
    assert!(seq_cross_entropy(&logits, &[-100, -100], 3, &mut d).is_err());
    assert!(seq_cross_entropy(&logits, &[3, 0], 3, &mut d).unwrap_err().to_string().contains("label 3"));
}

// ---------------------------------------------------------------------------------------------------------
// `loracomp forward` on T5.

fn forward_cli(model: &str, adapters: &[&str], input: &std::path::Path) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_loracomp"));
    cmd.args(["forward", "--model"]).arg(fixture(model));
    for a in adapters {
        cmd.arg("--adapter").arg(fixture(a));
    }
    cmd.arg("--input").arg(input).output().unwrap()
}

#[test]
fn forward_command_prints_t5_logits() {
    for (model, adapters, key) in [
        ("tiny-t5", vec![], "logits"),
        ("tiny-t5-gated", vec![], "logits"),
        ("tiny-t5-gated", vec!["tiny-t5-gated/adapter_qv"], "peft_logits"),
    ] {
        let out = forward_cli(model, &adapters, &fixture(model).join("golden.json"));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let g = golden(model);
        assert_eq!(got["shape"], g[key]["shape"]);
        assert_eq!(got["shape"], serde_json::json!([2, 6, 64]));
        let diff = max_diff(&floats(&got["data"]), &floats(&g[key]["data"]));
        assert!(diff <= 1e-4, "{model} {adapters:?}: max abs diff {diff}");
    }
}

#[test]
fn forward_command_t5_bad_inputs_name_the_field() {
    let dir = std::env::temp_dir().join(format!("loracomp-t5-fwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (r#"{"input_ids": [[3, 4]]}"#, "field 'decoder_input_ids' is missing"),
        (r#"{"input_ids": [[3, 4]], "decoder_input_ids": [[0], [0]]}"#, "'decoder_input_ids' has 2 rows"),
        (r#"{"input_ids": [[3, 4]], "decoder_input_ids": [[0, 64]]}"#, "field 'decoder_input_ids' holds 64"),
        (
            r#"{"input_ids": [[3, 4]], "attention_mask": [[1, 1, 1]], "decoder_input_ids": [[0]]}"#,
            "'attention_mask' is [1, 3]",
        ),
        (
            r#"{"input_ids": [[3, 4]], "decoder_input_ids": [[0, 5]], "decoder_attention_mask": [[1, 2]]}"#,
            "field 'decoder_attention_mask' holds 2",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = dir.join(format!("t5in{i}.json"));
        std::fs::write(&p, text).unwrap();
        let out = forward_cli("tiny-t5", &[], &p);
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: '{err}' lacks '{want}'");
        assert!(err.contains(&format!("t5in{i}.json")), "case {i}: error does not name the file: {err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Timing at Flan-T5-small's shapes (random weights): one forward and one forward + backward of a rank-8
/// fresh LoRA on every q and v. Run with `cargo test --release --test t5 -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing_flan_t5_small_shapes() {
    let cfg: loracomp::models::t5::T5Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_decoder_layers": 8,
        "num_heads": 6, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": false, "model_type": "t5"
    }))
    .unwrap();
    let mut m = T5::random(cfg, 0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let paths: Vec<String> = m.linear_paths().into_iter().filter(|p| p.ends_with(".q") || p.ends_with(".v")).collect();
    for p in &paths {
        let lin = m.linear_mut(p).unwrap();
        let mut fa = Param::new(vec![8, lin.din], rand_vec(&mut rng, 8 * lin.din, 0.01));
        let mut fb = Param::new(vec![lin.dout, 8], vec![0.0; lin.dout * 8]);
        fa.set_trainable(true);
        fb.set_trainable(true);
        lin.fresh = Some(FreshLora { a: fa, b: fb, r: 8, scale: 2.0 });
    }
    let (bs, s, t) = (8, 64, 8);
    let b = Seq2SeqBatch {
        batch: bs,
        src_len: s,
        tgt_len: t,
        input_ids: (0..bs * s).map(|i| (i * 7919 % 32000) as u32 + 2).collect(),
        attention_mask: vec![1.0; bs * s],
        decoder_input_ids: (0..bs * t).map(|i| (i * 104729 % 32000) as u32).collect(),
        decoder_attention_mask: None,
    };
    let labels: Vec<i64> = (0..bs * t).map(|i| (i * 31 % 32000) as i64).collect();
    m.forward(&b).unwrap();
    let t0 = std::time::Instant::now();
    m.forward(&b).unwrap();
    let fwd = t0.elapsed().as_secs_f64();
    let t0 = std::time::Instant::now();
    let logits = m.forward(&b).unwrap().to_vec();
    let mut dl = vec![0.0; logits.len()];
    seq_cross_entropy(&logits, &labels, m.vocab(), &mut dl).unwrap();
    m.backward(&dl, false).unwrap();
    let step = t0.elapsed().as_secs_f64();
    eprintln!(
        "flan-t5-small shapes, batch {bs}x{s} -> {t}, {} LoRA layers: forward {:.3} s, forward+backward {:.3} s ({} threads)",
        paths.len(),
        fwd,
        step,
        rayon::current_num_threads()
    );
}

#[test]
fn random_models_build_for_both_variants() {
    for (ff, tied) in [("relu", true), ("gated-gelu", false)] {
        let cfg: loracomp::models::t5::T5Config = serde_json::from_value(serde_json::json!({
            "vocab_size": 40, "d_model": 8, "d_kv": 3, "d_ff": 10, "num_layers": 2, "num_decoder_layers": 1,
            "num_heads": 2, "feed_forward_proj": ff, "tie_word_embeddings": tied, "model_type": "t5"
        }))
        .unwrap();
        let mut m = T5::random(cfg, 3).unwrap();
        assert_eq!(m.gated, !tied);
        assert_eq!(m.lm_head.w.data == m.shared.data, tied);
        let b = Seq2SeqBatch {
            batch: 1,
            src_len: 3,
            tgt_len: 2,
            input_ids: vec![5, 6, 1],
            attention_mask: vec![1.0; 3],
            decoder_input_ids: vec![0, 7],
            decoder_attention_mask: None,
        };
        assert!(m.forward(&b).unwrap().iter().all(|x| x.is_finite()));
    }
}

//! The Llama decoder against Python `transformers` / `peft` goldens (tools/make_llama_goldens.py), whole-model
//! finite-difference gradients, the causal-LM loss, rank classification, `loracomp forward` and bad inputs.

use loracomp::engine::param::Param;
use loracomp::lora::bank::{Composition, FreshLora};
use loracomp::lora::host::{attach_adapters, LinearHost};
use loracomp::lora::peft::Adapter;
use loracomp::models::llama::{causal_lm_loss, rows_cross_entropy, scored_rows, Llama, LmBatch};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama").join(p)
}

fn json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap())).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// The golden batch, labels and the `valid` query positions (those that see at least one token).
fn golden_batch(g: &Value) -> (LmBatch, Vec<i64>, Vec<bool>) {
    let ids = ints(&g["input_ids"]);
    let mask = ints(&g["attention_mask"]);
    let b = g["input_ids"].as_array().unwrap().len();
    let batch = LmBatch {
        batch: b,
        seq: ids.len() / b,
        ids: ids.iter().map(|&x| x as u32).collect(),
        mask: mask.iter().map(|&x| x as f32).collect(),
    };
    let labels = if g.get("labels").is_some() { ints(&g["labels"]) } else { Vec::new() };
    let valid = ints(&g["valid"]).iter().map(|&x| x == 1).collect();
    (batch, labels, valid)
}

/// Max |a − b| over the valid query positions; also checks the shape `[batch, seq, vocab]`.
fn max_diff(got: &[f32], gold: &Value, valid: &[bool], vocab: usize) -> f32 {
    let want = floats(&gold["data"]);
    assert_eq!(got.len(), want.len());
    assert_eq!(gold["shape"][2].as_u64().unwrap() as usize, vocab);
    let mut worst = 0.0f32;
    for (r, ok) in valid.iter().enumerate() {
        if *ok {
            for i in r * vocab..(r + 1) * vocab {
                worst = worst.max((got[i] - want[i]).abs());
            }
        }
    }
    worst
}

const MODELS: [&str; 2] = ["tiny-llama", "tiny-llama-mqa-bias-tied"];

fn model_file(model: &str, p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(model).join(p)
}

#[test]
fn logits_match_transformers_with_left_and_right_padding() {
    for name in MODELS {
        let g = json(&model_file(name, "golden.json"));
        let (batch, _, valid) = golden_batch(&g);
        assert!(valid.iter().any(|v| !v), "the golden batch has left padding");
        let mut m = Llama::load(&model_file(name, "")).unwrap();
        let v = m.vocab();
        let logits = m.forward(&batch).unwrap().to_vec();
        let d = max_diff(&logits, &g["logits"], &valid, v);
        eprintln!("{name}: logits vs transformers: max abs diff {d:.2e}");
        assert!(d <= 1e-4, "{name}: max abs diff {d}");
    }
    // the fixtures cover grouped-query and multi-query attention, biases, explicit head_dim and a tied head
    let m = Llama::load(&fixture("")).unwrap();
    assert_eq!((m.cfg.num_attention_heads, m.cfg.kv_heads(), m.tied), (4, 2, false));
    let m = Llama::load(&model_file(MODELS[1], "")).unwrap();
    assert_eq!((m.cfg.num_attention_heads, m.cfg.kv_heads(), m.cfg.head_dim(), m.tied), (4, 1, 16, true));
    assert!(m.layers[0].q_proj.bias.is_some() && m.layers[0].down_proj.bias.is_some());
    assert_eq!(m.lm_head.w.data, m.embed.data);
}

#[test]
fn causal_lm_loss_matches_transformers() {
    for name in MODELS {
        let g = json(&model_file(name, "golden.json"));
        let (batch, labels, _) = golden_batch(&g);
        let mut m = Llama::load(&model_file(name, "")).unwrap();
        let (_, _, loss) = full_loss(&mut m, &batch, &labels);
        let want = g["loss"].as_f64().unwrap() as f32;
        eprintln!("{name}: loss {loss} vs transformers {want}");
        assert!((loss - want).abs() <= 1e-4, "{name}: loss {loss} vs transformers {want}");
    }
    let g = json(&fixture("golden.json"));
    let (batch, labels, _) = golden_batch(&g);
    let mut m = Llama::load(&fixture("")).unwrap();
    let v = m.vocab();
    let (logits, mut dl, _) = full_loss(&mut m, &batch, &labels);
    // only positions followed by an answer token carry gradient, and each such row sums to zero
    for r in 0..batch.rows() {
        let row = &dl[r * v..(r + 1) * v];
        let scored = r % batch.seq + 1 < batch.seq && labels[r + 1] != -100;
        assert_eq!(row.iter().any(|x| *x != 0.0), scored, "row {r}");
        assert!(row.iter().sum::<f32>().abs() < 1e-6);
    }
    // errors: nothing scored, label outside the vocabulary
    let none = vec![-100; labels.len()];
    let e = causal_lm_loss(&logits, &none, batch.batch, batch.seq, v, &mut dl).unwrap_err().to_string();
    assert!(e.contains("no position is scored"), "{e}");
    let mut bad = labels.clone();
    bad[5] = 1000;
    let e = causal_lm_loss(&logits, &bad, batch.batch, batch.seq, v, &mut dl).unwrap_err().to_string();
    assert!(e.contains("label 1000"), "{e}");
}

#[test]
fn peft_adapter_loads_and_gives_peft_logits() {
    let g = json(&fixture("peft_golden.json"));
    let (batch, _, valid) = golden_batch(&g);
    let adapter = Adapter::load(&fixture("adapter")).unwrap();
    assert_eq!(adapter.modules.len(), 6, "q_proj, v_proj, down_proj in 2 layers");
    assert!(adapter.modules.contains_key("model.layers.1.mlp.down_proj"), "{:?}", adapter.modules.keys());
    let mut m = Llama::load(&fixture("")).unwrap();
    let used = attach_adapters(&mut m, &[adapter], |_, n| Composition::Fixed(vec![1.0; n])).unwrap();
    assert_eq!(used.len(), 6);
    let v = m.vocab();
    let logits = m.forward(&batch).unwrap().to_vec();
    let d = max_diff(&logits, &g["logits"], &valid, v);
    eprintln!("logits vs PEFT: max abs diff {d:.2e}");
    assert!(d <= 1e-4, "max abs diff to PEFT {d}");
    // and the adapter matters: the base model's logits are far from PEFT's
    let base = Llama::load(&fixture("")).unwrap().forward(&batch).unwrap().to_vec();
    assert!(max_diff(&base, &g["logits"], &valid, v) > 1e-2);
}

#[test]
fn rank_classification_matches_transformers_scores() {
    for name in MODELS {
        let g = json(&model_file(name, "golden.json"));
        let r = &g["rank"];
        let prompt: Vec<u32> = r["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let cands: Vec<Vec<u32>> = r["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
            .collect();
        let want: Vec<f64> = r["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let (_, scores) = Llama::load(&model_file(name, "")).unwrap().rank_classify(&prompt, &cands).unwrap();
        for (s, w) in scores.iter().zip(&want) {
            assert!((s - w).abs() <= 1e-4, "{name}: score {s} vs transformers {w}");
        }
    }
    let g = json(&fixture("golden.json"));
    let r = &g["rank"];
    let prompt: Vec<u32> = r["prompt"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let cands: Vec<Vec<u32>> = r["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect())
        .collect();
    let want: Vec<f64> = r["scores"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let mut m = Llama::load(&fixture("")).unwrap();
    let (best, scores) = m.rank_classify(&prompt, &cands).unwrap();
    for (s, w) in scores.iter().zip(&want) {
        assert!((s - w).abs() <= 1e-4, "score {s} vs transformers {w}");
    }
    let want_best = (0..want.len()).fold(0, |b, i| if want[i] > want[b] { i } else { b });
    assert_eq!(best, want_best);
    // a one-candidate question and a toy case where the model must prefer what it was trained towards:
    // make candidate 2 the favourite by training a fresh LoRA on lm_head for a few steps
    let mut m = Llama::load(&fixture("")).unwrap();
    fresh_lora(&mut m, &["lm_head"], 4, 0.0, 7);
    let (batch, labels) = LmBatch::with_answers(&[(prompt.clone(), cands[2].clone())]).unwrap();
    let opt = loracomp::engine::param::AdamW { lr: 0.05, ..Default::default() };
    for step in 1..=30 {
        m.zero_grad();
        m.loss_and_backward(&batch, &labels).unwrap();
        for (_, p) in m.trainable_params_mut() {
            opt.step(p, step, opt.lr);
        }
        m.invalidate();
    }
    let (best, _) = m.rank_classify(&prompt, &cands).unwrap();
    assert_eq!(best, 2);
    assert!(m.rank_classify(&prompt, &[]).is_err());
    assert!(m.rank_classify(&[], &cands).is_err());
}

/// A trainable LoRA on every linear whose path ends with one of `targets`; B is random with scale `b_scale`
/// (zero as PEFT initialises it when `b_scale` is 0).
fn fresh_lora(m: &mut Llama, targets: &[&str], r: usize, b_scale: f32, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for path in m.linear_paths() {
        if !targets.iter().any(|t| path == *t || path.ends_with(&format!(".{t}"))) {
            continue;
        }
        let lin = m.linear_mut(&path).unwrap();
        let bound = 1.0 / (lin.din as f32).sqrt();
        let mut a = Param::new(vec![r, lin.din], (0..r * lin.din).map(|_| rng.gen_range(-bound..bound)).collect());
        let mut b =
            Param::new(vec![lin.dout, r], (0..lin.dout * r).map(|_| rng.gen_range(-1.0f32..1.0) * b_scale).collect());
        a.set_trainable(true);
        b.set_trainable(true);
        lin.fresh = Some(FreshLora { a, b, r, scale: 2.0 });
    }
}

/// The full-logit path: [`Llama::forward`] at every position, then [`causal_lm_loss`]. Returns the logits, their
/// gradient and the loss.
fn full_loss(m: &mut Llama, batch: &LmBatch, labels: &[i64]) -> (Vec<f32>, Vec<f32>, f32) {
    let v = m.vocab();
    let logits = m.forward(batch).unwrap().to_vec();
    let mut dl = vec![0.0; logits.len()];
    let loss = causal_lm_loss(&logits, labels, batch.batch, batch.seq, v, &mut dl).unwrap();
    (logits, dl, loss)
}

fn loss_of(m: &mut Llama, batch: &LmBatch, labels: &[i64]) -> f64 {
    full_loss(m, batch, labels).2 as f64
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    gradcheck(MODELS[0], true);
    // multi-query attention, biases, explicit head_dim, tied head (the tied embedding stays frozen)
    gradcheck(MODELS[1], false);
}

fn gradcheck(model: &str, train_embeddings: bool) {
    let g = json(&model_file(model, "golden.json"));
    let (batch, labels, _) = golden_batch(&g);
    let mut m = Llama::load(&model_file(model, "")).unwrap();
    // a bank of two different random adapters with learned composition logits on q/v/down, fresh LoRAs
    // elsewhere, trainable input embeddings and norms
    let a = if model == MODELS[0] {
        Adapter::load(&fixture("adapter")).unwrap()
    } else {
        let mut a = Adapter::load(&fixture("adapter")).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        a.modules.retain(|k, _| k.starts_with("model.layers.0."));
        for (k, lora) in a.modules.iter_mut() {
            let lin = m.linear_mut(k).unwrap();
            (lora.din, lora.dout) = (lin.din, lin.dout);
            lora.a = (0..lora.r * lin.din).map(|_| rng.gen_range(-0.3f32..0.3)).collect();
            lora.b = (0..lin.dout * lora.r).map(|_| rng.gen_range(-0.3f32..0.3)).collect();
        }
        a
    };
    let mut b = a.clone();
    for lora in b.modules.values_mut() {
        lora.b.iter_mut().for_each(|x| *x *= -0.7);
    }
    attach_adapters(&mut m, &[a, b], |_, n| {
        let mut p = Param::new(vec![n], vec![0.3, -0.2]);
        p.set_trainable(true);
        Composition::Learned(p)
    })
    .unwrap();
    fresh_lora(&mut m, &["k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"], 2, 0.3, 3);
    m.embed.set_trainable(train_embeddings);
    m.norm.set_trainable(true);
    m.layers[0].input_layernorm.set_trainable(true);
    m.layers.last_mut().unwrap().post_attention_layernorm.set_trainable(true);
    m.zero_grad();
    m.loss_and_backward(&batch, &labels).unwrap();
    let grads: Vec<(String, Vec<f32>)> =
        m.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
    let names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "model.layers.0.self_attn.q_proj.composition_logits",
        "model.layers.0.mlp.down_proj.composition_logits",
        "model.layers.0.self_attn.k_proj.lora_A",
        "model.layers.0.mlp.up_proj.lora_B",
        "lm_head.lora_A",
    ] {
        assert!(names.contains(&want), "{want} not trainable: {names:?}");
    }
    let eps = 1e-2f32;
    let mut checked = 0;
    for (name, gr) in &grads {
        let n = gr.len();
        // the embedding rows of the tokens in the batch, and a sample of everything else
        let idx: Vec<usize> = if name.starts_with("model.embed") {
            batch.ids[..4].iter().flat_map(|&id| (0..32).step_by(9).map(move |j| id as usize * 32 + j)).collect()
        } else {
            (0..n).step_by((n / 6).max(1)).collect()
        };
        for i in idx {
            let set = |m: &mut Llama, delta: f32| {
                for (nm, p) in m.trainable_params_mut() {
                    if nm == *name {
                        p.data[i] += delta;
                    }
                }
                m.invalidate();
            };
            set(&mut m, eps);
            let lp = loss_of(&mut m, &batch, &labels);
            set(&mut m, -2.0 * eps);
            let lm = loss_of(&mut m, &batch, &labels);
            set(&mut m, eps);
            let num = (lp - lm) / (2.0 * eps as f64);
            let err = (num - gr[i] as f64).abs() / (1e-2 + num.abs().max(gr[i].abs() as f64));
            assert!(err < 2e-2, "{model} {name}[{i}]: analytic {} vs numeric {num} (rel err {err:.3e})", gr[i]);
            checked += 1;
        }
    }
    assert_eq!(names.contains(&"model.embed_tokens.weight"), train_embeddings);
    assert!(checked > 80, "{model}: checked {checked}");
    // frozen weights never get a gradient buffer
    for layer in &mut m.layers {
        for lin in layer.linears_mut() {
            assert!(lin.w.grad.is_empty());
        }
    }
    assert!(m.lm_head.w.grad.is_empty());
}

/// The LM head run only at the scored positions gives the full head's logits there, the same loss and the same
/// gradients, with a trainable LoRA on the head and below it.
#[test]
fn head_at_scored_rows_matches_the_full_head() {
    for name in MODELS {
        let g = json(&model_file(name, "golden.json"));
        let (batch, labels, _) = golden_batch(&g);
        let mut m = Llama::load(&model_file(name, "")).unwrap();
        fresh_lora(&mut m, &["q_proj", "down_proj", "lm_head"], 2, 0.3, 5);
        let v = m.vocab();
        let (rows, targets) = scored_rows(&labels, batch.batch, batch.seq, v).unwrap();
        assert!(!rows.is_empty() && rows.len() < batch.rows());
        let (full, dl, want) = full_loss(&mut m, &batch, &labels);
        m.zero_grad();
        m.backward(&dl).unwrap();
        let want_g: Vec<Vec<f32>> = m.trainable_params_mut().into_iter().map(|(_, p)| p.grad.clone()).collect();
        let sel = m.forward_rows(&batch, &rows).unwrap().to_vec();
        for (i, &r) in rows.iter().enumerate() {
            for k in 0..v {
                let (a, b) = (sel[i * v + k], full[r * v + k]);
                assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{name} row {r} logit {k}: {a} vs {b}");
            }
        }
        let mut ds = vec![0.0; sel.len()];
        let got = rows_cross_entropy(&sel, &targets, v, &mut ds).unwrap();
        assert!((got - want).abs() <= 1e-6 * want.abs(), "{name}: loss {got} vs {want}");
        m.zero_grad();
        m.backward(&ds).unwrap();
        let got_g: Vec<Vec<f32>> = m.trainable_params_mut().into_iter().map(|(_, p)| p.grad.clone()).collect();
        assert_eq!(got_g.len(), want_g.len());
        for (a, b) in got_g.iter().zip(&want_g) {
            let scale = b.iter().fold(0.0f32, |s, x| s.max(x.abs())).max(1e-6);
            let worst = a.iter().zip(b).fold(0.0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(worst <= 1e-5 * scale, "{name}: gradient differs by {worst} (largest {scale})");
        }
        // a gradient of the full shape is refused after forward_rows, and rows outside the batch are errors
        assert!(m.backward(&dl).unwrap_err().to_string().contains("expected"));
        let e = m.forward_rows(&batch, &[batch.rows()]).unwrap_err().to_string();
        assert!(e.contains("outside the batch"), "{e}");
    }
}

#[test]
fn backward_without_trainable_parameters_is_a_no_op_and_rejects_bad_gradients() {
    let g = json(&fixture("golden.json"));
    let (batch, labels, _) = golden_batch(&g);
    let mut m = Llama::load(&fixture("")).unwrap();
    assert_eq!(m.loss_and_backward(&batch, &labels).unwrap(), loss_of(&mut m, &batch, &labels) as f32);
    assert!(m.trainable_params_mut().is_empty());
    let e = m.backward(&[0.0; 3]).unwrap_err().to_string();
    assert!(e.contains("expected"), "{e}");
    let mut bad = batch.clone();
    bad.ids[0] = 96;
    let e = m.forward(&bad).unwrap_err().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    // a tied embedding is also the head: training it is refused rather than half-done
    let mut m = Llama::load(&model_file(MODELS[1], "")).unwrap();
    m.embed.set_trainable(true);
    let e = m.loss_and_backward(&batch, &labels).unwrap_err().to_string();
    assert!(e.contains("tied"), "{e}");
}

/// A copy of the fixture with `config.json` edited by `f`, in a fresh temp dir.
fn edited_model(tag: &str, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("loracomp-llama-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let Value::Object(mut cfg) = json(&fixture("config.json")) else { panic!() };
    f(&mut cfg);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    std::fs::copy(fixture("model.safetensors"), dir.join("model.safetensors")).unwrap();
    dir
}

#[test]
fn bad_configs_are_errors_naming_the_file_and_key() {
    type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "rope-linear",
            Box::new(|c| {
                c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "linear", "factor": 2.0}));
            }),
            "key 'rope_parameters': rope type 'linear' is not supported",
        ),
        (
            "rope-scaling",
            Box::new(|c| {
                c.remove("rope_parameters");
                c.insert("rope_theta".into(), serde_json::json!(10000.0));
                c.insert("rope_scaling".into(), serde_json::json!({"type": "dynamic", "factor": 2.0}));
            }),
            "key 'rope_scaling': rope type 'dynamic' is not supported",
        ),
        (
            "kv",
            Box::new(|c| {
                c.insert("num_key_value_heads".into(), serde_json::json!(3));
            }),
            "key 'num_key_value_heads': 3 does not divide num_attention_heads 4",
        ),
        (
            "act",
            Box::new(|c| {
                c.insert("hidden_act".into(), serde_json::json!("gelu"));
            }),
            "key 'hidden_act'",
        ),
        (
            "bias",
            Box::new(|c| {
                c.insert("attention_bias".into(), serde_json::json!(true));
            }),
            "missing tensor 'model.layers.0.self_attn.q_proj.bias'",
        ),
        (
            "missing",
            Box::new(|c| {
                c.remove("vocab_size");
            }),
            "missing field `vocab_size`",
        ),
    ];
    for (tag, f, want) in cases {
        let dir = edited_model(tag, f);
        let e = format!("{:#}", Llama::load(&dir).unwrap_err());
        assert!(e.contains(want), "{tag}: '{e}' lacks '{want}'");
        assert!(e.contains(&dir.display().to_string()), "{tag}: error does not name the file: {e}");
        std::fs::remove_dir_all(&dir).ok();
    }
    // older configs: top-level rope_theta with a null rope_scaling load and give the same model
    let dir = edited_model("old-rope", |c| {
        c.remove("rope_parameters");
        c.insert("rope_theta".into(), serde_json::json!(10000.0));
        c.insert("rope_scaling".into(), Value::Null);
    });
    let m = Llama::load(&dir).unwrap();
    assert_eq!(m.rope.inv_freq, Llama::load(&fixture("")).unwrap().rope.inv_freq);
    std::fs::remove_dir_all(&dir).ok();
    // tied embeddings: the LM head is the embedding matrix (lm_head.weight in the file is not used)
    let dir = edited_model("tied", |c| {
        c.insert("tie_word_embeddings".into(), serde_json::json!(true));
    });
    let m = Llama::load(&dir).unwrap();
    assert!(m.tied);
    assert_eq!(m.lm_head.w.data, m.embed.data);
    std::fs::remove_dir_all(&dir).ok();
}

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loracomp"))
}

#[test]
fn forward_cli_prints_transformers_and_peft_logits() {
    for (golden, adapter) in [("golden.json", None), ("peft_golden.json", Some("adapter"))] {
        let mut cmd = bin();
        cmd.args(["forward", "--model"]).arg(fixture("")).arg("--input").arg(fixture(golden));
        if let Some(a) = adapter {
            cmd.arg("--adapter").arg(fixture(a));
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let g = json(&fixture(golden));
        assert_eq!(got["shape"], g["logits"]["shape"]);
        let (_, _, valid) = golden_batch(&g);
        let d = max_diff(&floats(&got["data"]), &g["logits"], &valid, 96);
        assert!(d <= 1e-4, "{golden}: max abs diff {d}");
    }
}

#[test]
fn forward_cli_bad_inputs_name_the_field() {
    let dir = std::env::temp_dir().join(format!("loracomp-llama-fwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        (r#"{"attention_mask": [[1, 1]]}"#, "field 'input_ids' is missing"),
        (r#"{"input_ids": [[1, 96]]}"#, "outside the vocabulary"),
        (r#"{"input_ids": [[1, 2]], "attention_mask": [[1, 1, 1]]}"#, "field 'attention_mask' is [1, 3]"),
        (r#"{"input_ids": [[1, 2]], "attention_mask": [[1, 2]]}"#, "field 'attention_mask' holds 2"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = dir.join(format!("in{i}.json"));
        std::fs::write(&p, text).unwrap();
        let out = bin().args(["forward", "--model"]).arg(fixture("")).arg("--input").arg(&p).output().unwrap();
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: '{err}' lacks '{want}'");
        assert!(err.contains(&format!("in{i}.json")), "case {i}: error does not name the file: {err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).ok();
}

//! Composition semantics: uniform with one module is that module, learned with zero frozen logits is uniform,
//! merged and factored paths agree, and an exported adapter reloaded gives the same logits.

use crate::common;
use loracomp::engine::kernels::Pooling;
use loracomp::engine::param::Param;
use loracomp::lora::bank::{BankLinear, BankPath, Composition, LoraModule};
use loracomp::lora::peft::{write_adapter, Adapter, AdapterConfig, ExportModule};
use loracomp::methods::bank::{apply_adapter, attach_bank, learned, uniform};
use loracomp::methods::export::export_adapter;
use loracomp::models::bert::{Batch, Bert};
use loracomp::models::classifier::Classifier;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

fn rv(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * s).collect()
}

fn batch() -> Batch {
    Batch {
        batch: 2,
        seq: 6,
        ids: vec![2, 17, 33, 5, 9, 60, 2, 44, 8, 0, 0, 0],
        types: vec![0; 12],
        mask: vec![1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.],
    }
}

/// A random PEFT adapter for the tiny fixture model: rank `r`, on the given module names, with a head.
fn make_adapter(dir: &std::path::Path, seed: u64, r: usize, alpha: f64, rslora: bool, targets: &[&str]) -> Adapter {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bert = Bert::load(&common::fixture("tiny-bert")).unwrap();
    let mut modules = BTreeMap::new();
    for p in bert.linear_paths() {
        if targets.iter().any(|t| p.ends_with(t)) {
            let (din, dout) = if p.ends_with("intermediate.dense") { (32, 37) } else { (32, 32) };
            modules.insert(
                p,
                ExportModule { a: rv(&mut rng, r * din, 0.4), b: rv(&mut rng, dout * r, 0.4), r, din, dout, alpha },
            );
        }
    }
    let mut cfg = AdapterConfig::new(r, alpha, targets.iter().map(|s| s.to_string()).collect(), None);
    cfg.use_rslora = rslora;
    let hw = rv(&mut rng, 3 * 32, 0.5);
    let hb = rv(&mut rng, 3, 0.5);
    write_adapter(dir, cfg, &modules, Some((&[3, 32], &hw, &hb)), &serde_json::json!({"labels": ["a", "b", "c"]}))
        .unwrap();
    Adapter::load(dir).unwrap()
}

fn classifier() -> Classifier {
    Classifier::new(Bert::load(&common::fixture("tiny-bert")).unwrap(), Pooling::Mean, 3, 5)
}

#[test]
fn uniform_with_one_module_equals_that_module() {
    let d = common::tmpdir("one");
    let a = make_adapter(&d.join("a"), 1, 4, 8.0, false, &["query", "value"]);
    let mut m1 = classifier();
    attach_bank(&mut m1, std::slice::from_ref(&a), |_, n| uniform(n)).unwrap();
    let mut m2 = classifier();
    apply_adapter(&mut m2, &a, 3).unwrap();
    let mut m3 = classifier();
    // dense: W + s·B·A by hand
    for (path, ml) in &a.modules {
        let lin = m3.bert_mut().linear_mut(path).unwrap();
        for o in 0..ml.dout {
            for i in 0..ml.din {
                let s: f32 = (0..ml.r).map(|j| ml.b[o * ml.r + j] * ml.a[j * ml.din + i]).sum();
                lin.w.data[o * ml.din + i] += ml.scale * s;
            }
        }
    }
    m1.head = m2.head.clone();
    m3.head = m2.head.clone();
    let l1 = m1.forward(&batch()).unwrap().to_vec();
    let l2 = m2.forward(&batch()).unwrap().to_vec();
    let l3 = m3.forward(&batch()).unwrap().to_vec();
    for ((x, y), z) in l1.iter().zip(&l2).zip(&l3) {
        assert!((x - y).abs() < 1e-5 && (x - z).abs() < 1e-5, "{x} {y} {z}");
    }
}

#[test]
fn learned_with_frozen_zero_logits_equals_uniform() {
    let d = common::tmpdir("lz");
    let a = make_adapter(&d.join("a"), 2, 4, 8.0, false, &["query", "value"]);
    let b = make_adapter(&d.join("b"), 3, 2, 3.0, true, &["query", "key", "value", "intermediate.dense"]);
    let bank = vec![a, b];
    let mut mu = classifier();
    attach_bank(&mut mu, &bank, |_, n| uniform(n)).unwrap();
    let mut ml = classifier();
    attach_bank(&mut ml, &bank, |_, n| {
        let mut c = learned(n);
        if let Composition::Learned(p) = &mut c {
            p.set_trainable(false);
        }
        c
    })
    .unwrap();
    let lu = mu.forward(&batch()).unwrap().to_vec();
    let ll = ml.forward(&batch()).unwrap().to_vec();
    for (x, y) in lu.iter().zip(&ll) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // and uniform differs from the bare model (the bank does something)
    let lb = classifier().forward(&batch()).unwrap().to_vec();
    assert!(lu.iter().zip(&lb).any(|(x, y)| (x - y).abs() > 1e-3));
}

#[test]
fn merged_equals_factored_for_mixed_ranks_and_negative_weights() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let (din, dout, rows) = (24, 20, 9);
    let w = Param::new(vec![dout, din], rv(&mut rng, dout * din, 0.3));
    let bias = Param::new(vec![dout], rv(&mut rng, dout, 0.3));
    let mut lin = BankLinear::new(w, Some(bias));
    let ranks = [3usize, 1, 5, 0];
    let bank: Vec<LoraModule> = ranks
        .iter()
        .map(|&r| LoraModule {
            a: rv(&mut rng, r * din, 0.5),
            b: rv(&mut rng, dout * r, 0.5),
            r,
            scale: 1.7 / (r.max(1) as f32).sqrt(),
        })
        .collect();
    lin.set_bank(bank.clone());
    let weights = vec![0.6, -1.3, 0.25, 2.0];
    lin.comp = Composition::Fixed(weights.clone());
    let x = rv(&mut rng, rows * din, 1.0);
    let mut outs = Vec::new();
    for p in [BankPath::Merged, BankPath::Factored] {
        lin.force_path = Some(p);
        lin.invalidate();
        let mut y = vec![0.0; rows * dout];
        lin.forward(&x, rows, &mut y);
        outs.push(y);
    }
    // independent dense reference
    let mut want = vec![0.0f64; rows * dout];
    for t in 0..rows {
        for o in 0..dout {
            let mut s = lin.bias.as_ref().unwrap().data[o] as f64;
            for i in 0..din {
                let mut wv = lin.w.data[o * din + i] as f64;
                for (m, wn) in bank.iter().zip(&weights) {
                    for j in 0..m.r {
                        wv += (*wn as f64) * (m.scale as f64) * (m.b[o * m.r + j] as f64) * (m.a[j * din + i] as f64);
                    }
                }
                s += wv * x[t * din + i] as f64;
            }
            want[t * dout + o] = s;
        }
    }
    for k in 0..rows * dout {
        assert!((outs[0][k] - outs[1][k]).abs() <= 1e-5, "paths differ at {k}");
        assert!((outs[0][k] as f64 - want[k]).abs() <= 1e-4, "dense reference differs at {k}");
    }
}

#[test]
fn exported_composition_reloads_to_the_same_logits() {
    let d = common::tmpdir("export");
    let a = make_adapter(&d.join("a"), 5, 4, 8.0, false, &["query", "value"]);
    let b = make_adapter(&d.join("b"), 6, 2, 3.0, true, &["query", "key", "value"]);
    let bank = vec![a, b];
    let mut m = classifier();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    attach_bank(&mut m, &bank, |_, n| {
        let mut p = Param::new(vec![n], rv(&mut rng, n, 2.0));
        p.set_trainable(true);
        Composition::Learned(p)
    })
    .unwrap();
    let want = m.forward(&batch()).unwrap().to_vec();
    let meta = serde_json::json!({"labels": ["a", "b", "c"], "pooling": "mean"});
    let errs = export_adapter(&mut m, &d.join("export"), None, None, None, &meta).unwrap();
    assert!(errs.is_empty());
    let exported = Adapter::load(&d.join("export")).unwrap();
    let mut m2 = classifier();
    apply_adapter(&mut m2, &exported, 3).unwrap();
    let got = m2.forward(&batch()).unwrap().to_vec();
    for (x, y) in want.iter().zip(&got) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    // SVD export at a rank ≥ the concatenated rank is exact too; a smaller rank records its error
    let errs = export_adapter(&mut m, &d.join("svd"), None, None, Some(2), &meta).unwrap();
    assert!(!errs.is_empty() && errs.values().all(|e| *e > 0.0 && *e < 1.0), "{errs:?}");
    let errs = export_adapter(&mut m, &d.join("svd6"), None, None, Some(6), &meta).unwrap();
    let e6 = Adapter::load(&d.join("svd6")).unwrap();
    assert!(errs.values().all(|e| *e < 1e-5), "{errs:?}");
    let mut m3 = classifier();
    apply_adapter(&mut m3, &e6, 3).unwrap();
    let got = m3.forward(&batch()).unwrap().to_vec();
    for (x, y) in want.iter().zip(&got) {
        assert!((x - y).abs() < 1e-4, "svd {x} vs {y}");
    }
}

#[test]
fn rank_pattern_mismatch_and_unsupported_adapters_are_refused() {
    let d = common::tmpdir("refuse");
    make_adapter(&d.join("a"), 7, 4, 8.0, false, &["query"]);
    let cfgp = d.join("a/adapter_config.json");
    let orig = std::fs::read_to_string(&cfgp).unwrap();
    for (field, val, needle) in [
        ("r", serde_json::json!(3), "rank"),
        ("use_dora", serde_json::json!(true), "use_dora"),
        ("peft_type", serde_json::json!("IA3"), "peft_type"),
        ("bias", serde_json::json!("all"), "bias"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&orig).unwrap();
        v[field] = val;
        std::fs::write(&cfgp, serde_json::to_string(&v).unwrap()).unwrap();
        let e = format!("{:#}", Adapter::load(&d.join("a")).unwrap_err());
        assert!(e.contains(needle) && e.contains("adapter"), "{field}: {e}");
    }
}

#[test]
fn global_weights_stay_tied_and_entropy_penalty_gradient_is_exact() {
    use loracomp::data::Example;
    use loracomp::methods::{adapt, AdaptOpts, Method};
    let d = common::tmpdir("global");
    let bank = vec![
        make_adapter(&d.join("a"), 11, 4, 8.0, false, &["query", "value"]),
        make_adapter(&d.join("b"), 12, 2, 4.0, false, &["query", "value"]),
        make_adapter(&d.join("c"), 13, 3, 3.0, false, &["query", "value"]),
    ];
    // The tiny fixture has no tokenizer: borrow the demo's word-level one (ids < 99 fit its vocabulary).
    let tokdir = d.join("tok");
    std::fs::create_dir_all(&tokdir).unwrap();
    std::fs::write(tokdir.join("tokenizer.json"), loracomp::experiments::demo::tokenizer_json()).unwrap();
    let tok = loracomp::models::tokenize::TextEncoder::load(&tokdir, 16, 0).unwrap();
    let ex: Vec<Example> = (0..12)
        .map(|i| Example { text: format!("w{} w{} w{}", i, (i * 7) % 90, 40 + i % 3), pair: None, label: i % 3 })
        .collect();
    let bert = Bert::load(&common::fixture("tiny-bert")).unwrap();
    let run = |global: bool, entropy: f32| {
        let mut o = AdaptOpts::defaults(Method::Learned, 0);
        o.loop_opts.steps = 30;
        o.global_weights = global;
        o.entropy_penalty = entropy;
        adapt(&bert, &tok, 3, &ex, &ex, &bank, &o).unwrap()
    };
    let g = run(true, 0.0);
    let first = &g.weights[0].1;
    assert!(g.weights.iter().all(|(_, w)| w == first), "global weights differ across layers");
    assert!(first.iter().any(|w| (w - 1.0 / 3.0).abs() > 1e-3), "weights did not move");
    let per_layer = run(false, 0.0);
    assert!(per_layer.weights.iter().any(|(_, w)| w != &per_layer.weights[0].1));
    assert_eq!(g.trainable_params + 3 * (g.weights.len() - 1), per_layer.trainable_params);
    // The entropy penalty's gradient is λ·∂H(softmax(v))/∂v: check it by finite differences.
    let mut m = classifier();
    attach_bank(&mut m, &bank, |_, n| learned(n)).unwrap();
    let v0 = vec![0.7f32, -0.4, 0.2];
    let lam = 0.8f32;
    let entropy = |v: &[f32]| {
        let mut w = v.to_vec();
        loracomp::engine::kernels::softmax_rows(&mut w, 3);
        -w.iter().map(|x| (*x as f64) * (*x as f64).ln()).sum::<f64>()
    };
    if let Composition::Learned(p) = &mut m.bert_mut().layers[0].query.comp {
        p.data = v0.clone();
        p.zero_grad();
    }
    loracomp::methods::learned::hook(false, lam)(&mut m);
    let Composition::Learned(p) = &m.bert().layers[0].query.comp else { panic!() };
    for k in 0..3 {
        let (mut vp, mut vm) = (v0.clone(), v0.clone());
        vp[k] += 1e-3;
        vm[k] -= 1e-3;
        let num = lam as f64 * (entropy(&vp) - entropy(&vm)) / 2e-3;
        assert!((num - p.grad[k] as f64).abs() < 1e-3, "entropy grad {k}: {} vs {num}", p.grad[k]);
    }
}

#[test]
fn merge_kept_across_head_only_steps_trains_exactly_as_rebuilt_each_step() {
    use loracomp::engine::param::AdamW;
    use loracomp::methods::step::{classifier_step, invalidate};
    let d = common::tmpdir("keep");
    let a = make_adapter(&d.join("a"), 4, 4, 8.0, false, &["query", "value"]);
    let b = make_adapter(&d.join("b"), 5, 4, 8.0, false, &["query", "value"]);
    let bank = vec![a, b];
    let run = |rebuild: bool| {
        let mut m = classifier();
        attach_bank(&mut m, &bank, |_, n| uniform(n)).unwrap();
        for lin in m.encoder.linears_mut() {
            lin.force_path = Some(BankPath::Merged);
        }
        m.head.w.set_trainable(true);
        let opt = AdamW { lr: 1e-2, ..Default::default() };
        let mut losses = Vec::new();
        for t in 1..=4u64 {
            if rebuild {
                invalidate(&mut m);
            }
            losses.push(classifier_step(&mut m, &batch(), &[0, 2], &opt, t, &|_| 1e-2, None).unwrap());
        }
        (losses, m.forward(&batch()).unwrap().to_vec())
    };
    let (kept, rebuilt) = (run(false), run(true));
    assert_eq!(
        kept.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        rebuilt.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        kept.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        rebuilt.1.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    // and the head did train
    assert!(kept.0[3] < kept.0[0], "{:?}", kept.0);
}

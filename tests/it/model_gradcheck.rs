//! Finite-difference checks of a whole tiny encoder: full fine-tuning gradients (down to the embeddings),
//! learned-composition logits through both exact bank paths, and a fresh LoRA.

use loracomp::engine::kernels::Pooling;
use loracomp::engine::param::Param;
use loracomp::lora::bank::{BankPath, Composition, FreshLora, LoraModule};
use loracomp::models::bert::{Batch, Bert};
use loracomp::models::classifier::Classifier;
use loracomp::models::config::BertConfig;
use rand::{Rng, SeedableRng};

fn tiny_cfg(act: &str) -> BertConfig {
    BertConfig {
        vocab_size: 23,
        hidden_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 17,
        hidden_act: act.into(),
        layer_norm_eps: 1e-12,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        pad_token_id: 0,
        model_type: Some("bert".into()),
        position_embedding_type: None,
    }
}

fn batch() -> Batch {
    Batch {
        batch: 3,
        seq: 5,
        ids: vec![1, 5, 7, 9, 2, 1, 4, 4, 0, 0, 1, 22, 3, 8, 0],
        types: vec![0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
        mask: vec![1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 1., 1., 1., 1., 0.],
    }
}

const LABELS: [usize; 3] = [0, 2, 1];

fn rand_vec(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * s).collect()
}

/// Perturb every encoder weight so LayerNorms and biases are not trivial.
fn model(act: &str, seed: u64) -> Classifier {
    let mut bert = Bert::random(tiny_cfg(act), seed).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed + 100);
    bert.set_all_trainable(true);
    for (_, p) in bert.trainable_params_mut() {
        for v in p.data.iter_mut() {
            *v += rng.gen_range(-0.3f32..0.3);
        }
    }
    bert.set_all_trainable(false);
    Classifier::new(bert, Pooling::Mean, 3, seed)
}

fn loss(m: &mut Classifier) -> f64 {
    let b = batch();
    let logits = m.forward(&b).unwrap().to_vec();
    let mut p = vec![0.0; logits.len()];
    let mut d = vec![0.0; logits.len()];
    loracomp::engine::kernels::softmax_cross_entropy(&logits, &LABELS, 3, &mut p, &mut d) as f64
}

/// Check the analytic gradient of every trainable parameter (a sample of coordinates each) by central
/// differences of the loss.
fn check_all(m: &mut Classifier, eps: f32, tol: f64) -> usize {
    m.zero_grad();
    m.forward(&batch()).unwrap();
    m.backward(&LABELS).unwrap();
    let grads: Vec<(String, Vec<f32>)> =
        m.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
    let mut checked = 0;
    for (name, g) in grads {
        let n = g.len();
        let step = (n / 7).max(1);
        for i in (0..n).step_by(step) {
            let set = |m: &mut Classifier, delta: f32| {
                for (nm, p) in m.trainable_params_mut() {
                    if nm == name {
                        p.data[i] += delta;
                    }
                }
                invalidate_all(m);
            };
            set(m, eps);
            let lp = loss(m);
            set(m, -2.0 * eps);
            let lm = loss(m);
            set(m, eps);
            let num = (lp - lm) / (2.0 * eps as f64);
            let err = (num - g[i] as f64).abs() / (1e-2 + num.abs().max(g[i].abs() as f64));
            assert!(err < tol, "{name}[{i}]: analytic {} vs numeric {num} (rel err {err:.3e})", g[i]);
            checked += 1;
        }
    }
    checked
}

fn invalidate_all(m: &mut Classifier) {
    for layer in &mut m.bert_mut().layers {
        for l in layer.linears_mut() {
            l.invalidate();
        }
    }
    m.head.invalidate();
}

#[test]
fn full_finetuning_gradients_match_fd_down_to_embeddings() {
    for act in ["gelu", "gelu_new"] {
        let mut m = model(act, 1);
        m.bert_mut().set_all_trainable(true);
        let n = check_all(&mut m, 1e-2, 2e-2);
        assert!(n > 150, "checked {n}");
    }
}

fn attach_bank(m: &mut Classifier, path: BankPath, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = m.bert().hidden();
    let ranks = [2usize, 3, 1];
    for layer in &mut m.bert_mut().layers {
        for lin in [&mut layer.query, &mut layer.value] {
            let bank = ranks
                .iter()
                .map(|&r| LoraModule {
                    a: rand_vec(&mut rng, r * d, 0.5),
                    b: rand_vec(&mut rng, d * r, 0.5),
                    r,
                    scale: 2.0 / r as f32,
                })
                .collect();
            lin.set_bank(bank);
            let mut logits = Param::new(vec![3], rand_vec(&mut rng, 3, 0.5));
            logits.set_trainable(true);
            lin.comp = Composition::Learned(logits);
            lin.force_path = Some(path);
        }
    }
}

#[test]
fn learned_composition_gradients_match_fd_on_both_paths() {
    for path in [BankPath::Merged, BankPath::Factored] {
        let mut m = model("gelu", 2);
        attach_bank(&mut m, path, 7);
        let n = check_all(&mut m, 1e-2, 2e-2);
        assert!(n >= 4 * 3, "checked {n}");
    }
}

#[test]
fn merged_and_factored_paths_give_the_same_logits_and_gradients() {
    let mut out = Vec::new();
    for path in [BankPath::Merged, BankPath::Factored] {
        let mut m = model("gelu", 3);
        attach_bank(&mut m, path, 8);
        m.zero_grad();
        let logits = m.forward(&batch()).unwrap().to_vec();
        m.backward(&LABELS).unwrap();
        let grads: Vec<f32> = m.trainable_params_mut().into_iter().flat_map(|(_, p)| p.grad.clone()).collect();
        out.push((logits, grads));
    }
    for (a, b) in out[0].0.iter().zip(&out[1].0) {
        assert!((a - b).abs() <= 1e-5, "logits {a} vs {b}");
    }
    for (a, b) in out[0].1.iter().zip(&out[1].1) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "grad {a} vs {b}");
    }
}

#[test]
fn fresh_lora_gradients_match_fd() {
    let mut m = model("gelu", 4);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let d = m.bert().hidden();
    for layer in &mut m.bert_mut().layers {
        for lin in [&mut layer.query, &mut layer.value, &mut layer.inter] {
            let (din, dout, r) = (lin.din, lin.dout, 2);
            let mut a = Param::new(vec![r, din], rand_vec(&mut rng, r * din, 0.5));
            let mut b = Param::new(vec![dout, r], rand_vec(&mut rng, dout * r, 0.5));
            a.set_trainable(true);
            b.set_trainable(true);
            lin.fresh = Some(FreshLora { a, b, r, scale: 1.5 });
        }
    }
    assert_eq!(d, 12);
    let n = check_all(&mut m, 1e-2, 2e-2);
    assert!(n > 50, "checked {n}");
}

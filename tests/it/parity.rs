//! Parity with Python `transformers` / sentence-transformers (goldens made by tools/make_goldens.py).

use crate::common;
use loracomp::engine::kernels::Pooling;
use loracomp::models::bert::{Batch, Bert};
use loracomp::models::hf::HfEncoder;
use serde_json::Value;

fn load_json(p: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn flat_u32(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32))
        .collect()
}

fn tiny_parity(name: &str) {
    let dir = common::fixture(name);
    let g = load_json(&dir.join("golden.json"));
    let ids = flat_u32(&g["input_ids"]);
    let types = flat_u32(&g["token_type_ids"]);
    let mask: Vec<f32> = flat_u32(&g["attention_mask"]).into_iter().map(|m| m as f32).collect();
    let shape: Vec<usize> =
        g["last_hidden_state"]["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
    let want: Vec<f32> =
        g["last_hidden_state"]["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let mut bert = Bert::load(&dir).unwrap();
    let batch = Batch { batch: shape[0], seq: shape[1], ids, types, mask };
    let got = bert.forward(&batch).unwrap();
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{name}: max abs difference {worst}");
}

#[test]
fn tiny_bert_matches_transformers() {
    tiny_parity("tiny-bert");
}

#[test]
fn tiny_bert_tanh_gelu_matches_transformers() {
    tiny_parity("tiny-bert-tanh");
}

#[test]
fn bert_prefixed_keys_load_the_same() {
    // BertForSequenceClassification-style checkpoints prefix every key with `bert.`.
    let src = common::fixture("tiny-bert");
    let dir = common::tmpdir("prefixed");
    common::copy_dir(&src, &dir);
    let tf = loracomp::engine::weights::TensorFile::open(&src.join("model.safetensors")).unwrap();
    let renamed = tf.tensors.into_iter().map(|(k, v)| (format!("bert.{k}"), v)).collect();
    loracomp::engine::weights::write_safetensors(&dir.join("model.safetensors"), &renamed, None).unwrap();
    let g = load_json(&src.join("golden.json"));
    let ids = flat_u32(&g["input_ids"]);
    let n = ids.len();
    let batch = Batch { batch: 3, seq: n / 3, ids, types: vec![0; n], mask: vec![1.0; n] };
    let a = Bert::load(&src).unwrap().forward(&batch).unwrap().to_vec();
    let b = Bert::load(&dir).unwrap().forward(&batch).unwrap().to_vec();
    assert_eq!(a, b);
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    let g = load_json(&common::fixture("minilm/golden.json"));
    let texts: Vec<String> = g["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let mut enc = HfEncoder::load(&common::minilm_dir(), 128).unwrap();
    // tokenisation
    for (t, ids) in texts.iter().zip(g["input_ids"].as_array().unwrap()) {
        let want: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(enc.tok.encode(t, None).unwrap().0, want, "token ids of {t:?}");
    }
    for (pooling, normalize, key) in [
        (Pooling::Mean, true, "embeddings"),
        (Pooling::Mean, false, "mean_unnormalized"),
        (Pooling::Cls, false, "cls_embeddings_unnormalized"),
    ] {
        // batch size 3 mixes lengths, so padding and the mask are exercised
        let got = enc.embed(&texts, pooling, normalize, 3).unwrap();
        for (i, want) in g[key].as_array().unwrap().iter().enumerate() {
            let want: Vec<f32> = want.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            let worst = got[i].iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let tol = if normalize { 1e-4 } else { 1e-4 * want.iter().fold(1.0f32, |m, v| m.max(v.abs())) };
            assert!(worst <= tol, "{key} of text {i}: max abs difference {worst}");
        }
    }
}

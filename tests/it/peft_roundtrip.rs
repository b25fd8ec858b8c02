//! Round trip with real Hugging Face PEFT (goldens from tools/make_peft_goldens.py): loracomp reads adapters
//! that `peft` wrote (mixed ranks, rsLoRA, rank_pattern/alpha_pattern) and gives PEFT's logits; its exact
//! composition export, loaded by PEFT, gave the logits stored in the golden, and loracomp reloads the same.

use crate::common;
use loracomp::engine::kernels::Pooling;
use loracomp::lora::bank::Composition;
use loracomp::lora::peft::Adapter;
use loracomp::methods::bank::{apply_adapter, attach_bank};
use loracomp::methods::export::export_adapter;
use loracomp::models::bert::{Batch, Bert};
use loracomp::models::classifier::Classifier;
use serde_json::Value;

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixture("peft/golden.json")).unwrap()).unwrap()
}

fn batch(g: &Value) -> Batch {
    let rows = g["input_ids"].as_array().unwrap();
    let seq = rows[0].as_array().unwrap().len();
    let flat = |k: &str| -> Vec<u32> {
        g[k].as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32))
            .collect()
    };
    Batch {
        batch: rows.len(),
        seq,
        ids: flat("input_ids"),
        types: flat("token_type_ids"),
        mask: flat("attention_mask").into_iter().map(|m| m as f32).collect(),
    }
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
        .collect()
}

fn model() -> Classifier {
    Classifier::new(Bert::load(&common::fixture("tiny-bert")).unwrap(), Pooling::Mean, 3, 0)
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len());
    let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst <= 1e-5, "{what}: max abs difference {worst}");
}

#[test]
fn peft_adapters_load_with_peft_logits() {
    let g = golden();
    for (name, key) in [("adapter_a", "logits_a"), ("adapter_b", "logits_b")] {
        let a = Adapter::load(&common::fixture(&format!("peft/{name}"))).unwrap();
        let mut m = model();
        apply_adapter(&mut m, &a, 3).unwrap();
        let got = m.forward(&batch(&g)).unwrap().to_vec();
        assert_close(&got, &floats(&g[key]), name);
    }
}

#[test]
fn composition_matches_dense_reference_and_its_export_matches_peft() {
    let g = golden();
    let w: Vec<f32> = g["compose"]["weights"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
    let bank: Vec<Adapter> = ["adapter_a", "adapter_b"]
        .iter()
        .map(|n| Adapter::load(&common::fixture(&format!("peft/{n}"))).unwrap())
        .collect();
    let mut m = model();
    attach_bank(&mut m, &bank, |_, _| Composition::Fixed(w.clone())).unwrap();
    apply_head(&mut m, &bank[0]);
    let got = m.forward(&batch(&g)).unwrap().to_vec();
    assert_close(&got, &floats(&g["compose"]["logits"]), "composition vs dense torch reference");

    let dir = common::tmpdir("peft-export");
    export_adapter(&mut m, &dir, None, None, None, &serde_json::json!({"pooling": "mean"})).unwrap();
    let exported = Adapter::load(&dir).unwrap();
    let mut m2 = model();
    apply_adapter(&mut m2, &exported, 3).unwrap();
    let got2 = m2.forward(&batch(&g)).unwrap().to_vec();
    assert_close(&got2, &floats(&g["peft_logits_of_loracomp_export"]), "reloaded export vs PEFT on the export");
}

fn apply_head(m: &mut Classifier, a: &Adapter) {
    let (_, w, b) = a.head.as_ref().unwrap();
    m.head.w.data.copy_from_slice(w);
    m.head.bias.as_mut().unwrap().data.copy_from_slice(b);
}

//! `adapt --method auto` end to end through the CLI on the tiny fixtures (a ViT with a head; T5 and Llama by
//! rank classification run it in generative.rs): its recorded choices, its options, determinism across thread
//! counts, and that its selection chooses (a bank of pure noise is left out).

use crate::common;
use crate::vision::{rgb16, write_task};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A ViT fixture, an image downstream task with 4 training images a class, and a bank of two modules trained
/// on other image tasks.
struct Env {
    d: PathBuf,
    model: PathBuf,
    task: PathBuf,
    bank: Vec<PathBuf>,
}

impl Env {
    fn new(tag: &str) -> Self {
        let d = common::tmpdir(tag);
        let model = common::fixture("vit-pretrained");
        let task = d.join("down");
        write_task(&task, 2, rgb16(), [4, 1, 3], 1);
        let mut bank = Vec::new();
        for (i, seed) in [5u64, 6].iter().enumerate() {
            let td = d.join(format!("up{i}"));
            write_task(&td, 3, rgb16(), [3, 1, 1], *seed);
            let out = d.join(format!("bank{i}"));
            let o = common::bin()
                .args(["train", "--steps", "3", "--batch", "4", "--rank", "2", "--alpha", "4", "--model"])
                .arg(&model)
                .arg("--task")
                .arg(&td)
                .arg("--out")
                .arg(&out)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            bank.push(out);
        }
        Env { d, model, task, bank }
    }

    fn args<'a>(&'a self, out: &'a Path, bank: &'a [PathBuf], extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["adapt", "--model", self.model.to_str().unwrap(), "--task", self.task.to_str().unwrap()];
        a.extend(["--shots", "4", "--steps", "3", "--batch", "4", "--out", out.to_str().unwrap()]);
        a.extend(extra);
        if !bank.is_empty() {
            a.push("--bank");
        }
        a.extend(bank.iter().map(|p| p.to_str().unwrap()));
        a
    }
}

fn run(args: &[&str], threads: &str) -> Value {
    let o = common::bin().env("RAYON_NUM_THREADS", threads).args(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let o = common::bin().args(args).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{args:?} should fail: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn auto_records_its_choices_and_is_deterministic_across_threads() {
    let e = Env::new("auto-vit");
    let out1 = e.d.join("auto-t1");
    let cv = ["--method", "auto", "--seed", "3", "--auto-select", "cv"];
    let m1 = run(&e.args(&out1, &e.bank, &cv), "1");
    let det = &m1["details"];
    assert_eq!(det["selection"], "cross-validation", "{det}");
    assert_eq!(det["folds"], 4);
    // none, then sizes 1 and 2 (= N) at the four default scales
    let cands = det["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 1 + 2 * 4, "{det}");
    assert!(cands.iter().all(|c| c["cv_accuracy"].as_f64().is_some() && c["criterion"].as_f64().is_some()));
    let chosen = det["chosen"].as_u64().unwrap() as usize;
    assert_eq!(det["kept"], cands[chosen]["modules"]);
    assert_eq!(det["scale"], cands[chosen]["scale"]);
    // the module weights on the layers are the chosen candidate's
    let w: Vec<f64> = serde_json::from_value(det["weights"].clone()).unwrap();
    let total: f64 = w.iter().sum();
    assert!((total - det["scale"].as_f64().unwrap()).abs() < 1e-5, "{det}");
    for (_, lw) in m1["module_weights"].as_object().unwrap() {
        let lw: Vec<f64> = serde_json::from_value(lw.clone()).unwrap();
        assert_eq!(lw, w);
    }
    // 8 examples, 20 epochs, batch 4: 40 head steps (more than --steps 3)
    assert_eq!(det["head_steps"], 40);
    assert_eq!(m1["options"]["auto_folds"], 4);
    assert!(m1["options"].get("lorahub_generations").is_none());
    let out2 = e.d.join("auto-t2");
    let m2 = run(&e.args(&out2, &e.bank, &cv), "2");
    for k in ["accuracy", "macro_f1", "final_loss", "details", "module_weights"] {
        assert_eq!(m1[k], m2[k], "'{k}' differs between 1 and 2 threads");
    }
    // the default selection, the head-free criterion: the lowest criterion wins, the same at 1 and 2 threads
    let (o1, o2) = (e.d.join("crit-t1"), e.d.join("crit-t2"));
    let c1 = run(&e.args(&o1, &e.bank, &["--method", "auto"]), "1");
    let c2 = run(&e.args(&o2, &e.bank, &["--method", "auto"]), "2");
    for k in ["accuracy", "macro_f1", "final_loss", "details", "module_weights"] {
        assert_eq!(c1[k], c2[k], "criterion: '{k}' differs between 1 and 2 threads");
    }
    let det = &c1["details"];
    assert_eq!(det["selection"], "criterion", "{det}");
    assert_eq!(c1["options"]["auto_select"], "criterion");
    assert!(c1["options"].get("auto_folds").is_none());
    let crit: Vec<f64> =
        det["candidates"].as_array().unwrap().iter().map(|c| c["criterion"].as_f64().unwrap()).collect();
    let best = (0..crit.len()).min_by(|&a, &b| crit[a].total_cmp(&crit[b])).unwrap();
    assert_eq!(det["chosen"], best, "{det}");
    assert!(det["candidates"][0].get("cv_accuracy").is_none(), "no cross-validation is run: {det}");
    // one example a class: no fold can hold a class out, so the head-free criterion chooses
    let out3 = e.d.join("auto-1shot");
    let mut a = e.args(&out3, &e.bank, &["--method", "auto"]);
    a[6] = "1";
    let m3 = run(&a, "1");
    let det = &m3["details"];
    assert_eq!(det["selection"], "best-ranked module and the whole bank (a class has one example)", "{det}");
    assert_eq!(det["folds"], 0);
    // the prototype criterion cannot leave a lone example out: the best-ranked module at ONE_SHOT_LEAD plus
    // the whole bank, total scale 1
    assert_eq!(det["kept"], det["ranking"], "{det}");
    assert_eq!(det["scale"], 1.0);
    let w: Vec<f64> = det["weights"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let n = w.len() as f64;
    let lead = loracomp::methods::auto::ONE_SHOT_LEAD as f64;
    let top = det["ranking"][0].as_u64().unwrap() as usize;
    for (j, x) in w.iter().enumerate() {
        let want = (1.0 - lead) / n + if j == top { lead } else { 0.0 };
        assert!((x - want).abs() < 1e-6, "weight {j}: {x}, want {want} ({det})");
    }
    let chosen = &det["candidates"][det["chosen"].as_u64().unwrap() as usize];
    assert_eq!(chosen["lead"], lead, "{det}");
}

/// A copy of `src` with every LoRA factor replaced by uniform noise in ±`amp`.
pub(crate) fn noise_adapter(src: &Path, dst: &Path, seed: u64, amp: f32) {
    common::copy_dir(src, dst);
    let p = dst.join("adapter_model.safetensors");
    let mut tf = loracomp::engine::weights::TensorFile::open(&p).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for (name, (_, v)) in tf.tensors.iter_mut() {
        if name.contains("lora_") {
            v.iter_mut().for_each(|x| *x = rng.gen_range(-amp..amp));
        }
    }
    loracomp::engine::weights::write_safetensors(&p, &tf.tensors, None).unwrap();
}

#[test]
fn auto_chooses_a_composition_where_the_bare_encoder_fails() {
    // This ViT's own features do not tell the two classes apart (the linear probe is at chance); a bank of
    // noise modules does, so auto must keep modules, and its held-out choice carries over to the test split.
    let e = Env::new("auto-choose");
    let noise: Vec<PathBuf> = e
        .bank
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let n = e.d.join(format!("noise{i}"));
            noise_adapter(b, &n, 10 + i as u64, 3.0);
            n
        })
        .collect();
    let probe = e.d.join("probe");
    let mut a = e.args(&probe, &[], &["--method", "linear-probe"]);
    a[8] = "40";
    let p = run(&a, "1");
    assert!(p["accuracy"].as_f64().unwrap() <= 0.5, "{}", p["accuracy"]);
    let out = e.d.join("auto");
    let m = run(&e.args(&out, &noise, &["--method", "auto"]), "1");
    let det = &m["details"];
    let cands = det["candidates"].as_array().unwrap();
    let none = cands[0]["criterion"].as_f64().unwrap();
    let chosen = &cands[det["chosen"].as_u64().unwrap() as usize];
    assert!(det["scale"].as_f64().unwrap() > 0.0 && !det["kept"].as_array().unwrap().is_empty(), "{det}");
    assert!(chosen["criterion"].as_f64().unwrap() < none, "{det}");
    assert!(m["accuracy"].as_f64().unwrap() > p["accuracy"].as_f64().unwrap(), "{}", m["accuracy"]);
}

#[test]
fn auto_leaves_a_bank_of_noise_out() {
    // A small ViT pre-trained on the downstream task itself, so that its own features separate the classes;
    // a bank of pure noise can only hurt, and auto keeps none of it (scale 0).
    let e = Env::new("auto-noise");
    let base = e.d.join("base");
    let o = common::bin()
        .args(["pretrain", "--arch", "vit", "--hidden", "16", "--layers", "2", "--heads", "2", "--mlp", "32"])
        .args(["--patch", "4", "--image-size", "16", "--steps", "60", "--batch", "8", "--quiet", "--task"])
        .arg(&e.task)
        .arg("--out")
        .arg(&base)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut noise = Vec::new();
    for i in 0..2 {
        let trained = e.d.join(format!("trained{i}"));
        let o = common::bin()
            .args(["train", "--steps", "2", "--batch", "4", "--rank", "2", "--alpha", "4", "--model"])
            .arg(&base)
            .arg("--task")
            .arg(e.d.join(format!("up{i}")))
            .arg("--out")
            .arg(&trained)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let n = e.d.join(format!("noise{i}"));
        noise_adapter(&trained, &n, 30 + i, 3.0);
        noise.push(n);
    }
    let e = Env { model: base, ..e };
    let out = e.d.join("auto");
    let m = run(&e.args(&out, &noise, &["--method", "auto"]), "1");
    let det = &m["details"];
    assert_eq!(det["scale"], 0.0, "{det}");
    assert!(det["kept"].as_array().unwrap().is_empty(), "{det}");
    let cands = det["candidates"].as_array().unwrap();
    let none = cands[0]["criterion"].as_f64().unwrap();
    assert!(cands[1..].iter().all(|c| c["criterion"].as_f64().unwrap() > none), "{det}");
    // cross-validation of the head agrees
    let out = e.d.join("auto-cv");
    let m = run(&e.args(&out, &noise, &["--method", "auto", "--auto-select", "cv"]), "1");
    assert_eq!(m["details"]["scale"], 0.0, "{}", m["details"]);
}

#[test]
fn auto_options_belong_to_auto_and_no_op_values_are_refused() {
    let e = Env::new("auto-opts");
    let out = e.d.join("o");
    for (extra, needle) in [
        (&["--method", "uniform", "--auto-folds", "3"][..], "--auto-folds does not apply to --method uniform"),
        (&["--method", "learned", "--auto-scales", "1,2"][..], "--auto-scales does not apply"),
        (&["--method", "best-single", "--auto-top-k", "2"][..], "--auto-top-k does not apply"),
        (&["--method", "lorahub", "--auto-epochs", "5"][..], "--auto-epochs does not apply"),
        (&["--method", "uniform", "--auto-select", "cv"][..], "--auto-select does not apply"),
        (&["--method", "auto", "--auto-folds", "3"][..], "--auto-folds applies to --auto-select cv"),
        (&["--method", "auto", "--auto-select", "cv", "--auto-folds", "1"][..], "--auto-folds must be at least 2"),
        (&["--method", "auto", "--auto-scales", "0"][..], "--auto-scales must be positive"),
        (&["--method", "auto", "--auto-scales", "1,-2"][..], "--auto-scales must be positive"),
        (&["--method", "auto", "--auto-top-k", "0"][..], "--auto-top-k must be at least 1"),
        (&["--method", "auto", "--auto-epochs", "0"][..], "--auto-epochs must be at least 1"),
        (&["--method", "auto", "--lorahub-generations", "3"][..], "--lorahub-generations does not apply"),
        (&["--method", "uniform", "--auto-lora-from", "4"][..], "--auto-lora-from does not apply"),
        (&["--method", "auto", "--auto-lora-from", "off", "--rank", "4"][..], "--rank does not apply to --method auto"),
        (&["--method", "auto", "--auto-lora-from", "off", "--lr", "0.1"][..], "--lr applies to auto's LoRA stage"),
        (&["--method", "learned", "--rank", "4"][..], "--rank does not apply to --method learned"),
    ] {
        let err = fails(&e.args(&out, &e.bank, extra));
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(!out.exists(), "{extra:?}: nothing is written");
    }
    // a usage error of the flag itself (clap's exit code 2)
    let o = common::bin().args(e.args(&out, &e.bank, &["--method", "auto", "--auto-lora-from", "0"])).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("examples per class ≥ 1, or off"));
    assert!(!out.exists());
    // auto needs a bank
    let err = fails(&e.args(&out, &[], &["--method", "auto"]));
    assert!(err.contains("bank"), "{err}");
}

#[test]
fn auto_trains_a_lora_on_top_of_its_composition_and_exports_both() {
    // From --auto-lora-from examples a class (default 2), auto trains a fresh LoRA (the lora method's settings) with the
    // head on top of the fixed composition; the exported adapter carries both terms and scores as the model did.
    let e = Env::new("auto-lora");
    let out = e.d.join("auto");
    let extra = ["--method", "auto", "--auto-lora-from", "4", "--rank", "2", "--alpha", "4", "--lr", "0.01"];
    let m = run(&e.args(&out, &e.bank, &extra), "2");
    let lora = &m["details"]["lora"];
    assert_eq!(lora["rank"], 2, "{m}");
    assert_eq!(lora["alpha"], 4.0);
    assert_eq!(lora["steps"], 3);
    assert_eq!(m["options"]["auto_lora_from"], 4);
    assert_eq!(m["options"]["rank"], 2);
    assert_eq!(m["options"]["lr"].as_f64().unwrap() as f32, 0.01f32);
    // the head alone trains fewer parameters than the head with a LoRA on every query and value projection
    let off = e.d.join("auto-off");
    let h = run(&e.args(&off, &e.bank, &["--method", "auto", "--auto-lora-from", "off"]), "2");
    assert!(h["details"]["lora"].is_null(), "{h}");
    assert!(h["options"].get("rank").is_none(), "{h}");
    assert!(m["trainable_params"].as_u64().unwrap() > h["trainable_params"].as_u64().unwrap());
    // the same composition was chosen; the LoRA is what differs
    assert_eq!(m["details"]["chosen"], h["details"]["chosen"]);
    // the default (from 2 examples a class): four examples a class train a LoRA, one does not
    let dflt = e.d.join("auto-default");
    let d = run(&e.args(&dflt, &e.bank, &["--method", "auto"]), "2");
    assert_eq!(d["details"]["lora"]["rank"], 16, "{d}");
    assert_eq!(d["options"]["auto_lora_from"], 2);
    let one = e.d.join("auto-1shot");
    let mut a = e.args(&one, &e.bank, &["--method", "auto"]);
    a[6] = "1";
    let d1 = run(&a, "2");
    assert!(d1["details"]["lora"].is_null(), "{d1}");
    // the exported adapter (composition and LoRA in one PEFT LoRA) scores exactly as the adapted model
    let ev = run(
        &[
            "eval",
            "--model",
            e.model.to_str().unwrap(),
            "--task",
            e.task.to_str().unwrap(),
            "--adapter",
            out.join("adapter").to_str().unwrap(),
        ],
        "2",
    );
    assert_eq!(ev["accuracy"], m["accuracy"]);
    assert_eq!(ev["macro_f1"], m["macro_f1"]);
}

//! Image tasks and the ViT path end to end: task parsing and bad input, a pre-trained ViT directory that
//! loracomp loads back identically and that transformers reads (golden from tools/check_vit_pretrained.py),
//! every adaptation method on a ViT, and pretrain → train → adapt → eval through the CLI.

use crate::common;

use loracomp::data::{Examples, ImageShape, Task};
use loracomp::lora::peft::Adapter;
use loracomp::methods::common::encode_examples;
use loracomp::methods::{adapt_encoded, AdaptOpts, Method, Retrieval};
use loracomp::models::encoder::{Encoder, LoadedModel};
use loracomp::models::vit::{Pixels, Vit};
use serde_json::Value;
use std::path::Path;

/// A synthetic image task: class c has a bright horizontal band at rows 4c..4c+3 (plus noise), so a tiny ViT
/// can learn it from a few steps. `per` images per class and split.
pub(crate) fn write_task(dir: &Path, classes: usize, shape: ImageShape, per: [usize; 3], seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir).unwrap();
    let labels: Vec<String> = (0..classes).map(|c| format!("class{c}")).collect();
    std::fs::write(dir.join("labels.txt"), labels.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("image.json"), serde_json::to_string(&shape).unwrap()).unwrap();
    for (split, n) in ["train", "valid", "test"].iter().zip(per) {
        let mut bytes = Vec::new();
        for c in 0..classes {
            for _ in 0..n {
                bytes.extend_from_slice(&(c as u16).to_le_bytes());
                for _ch in 0..shape.channels {
                    for y in 0..shape.height {
                        for _x in 0..shape.width {
                            let band = y / 4 % classes == c;
                            bytes.push(if band { 200 } else { 20 } + rng.gen_range(0..40u8));
                        }
                    }
                }
            }
        }
        std::fs::write(dir.join(format!("{split}.bin")), bytes).unwrap();
    }
}

pub(crate) fn rgb16() -> ImageShape {
    ImageShape { channels: 3, height: 16, width: 16 }
}

fn err_of(r: anyhow::Result<impl std::fmt::Debug>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

#[test]
fn image_task_parses_and_bad_input_names_file_and_field() {
    let d = common::tmpdir("vision-task");
    write_task(&d, 3, rgb16(), [4, 1, 2], 1);
    let t = Task::open(&d).unwrap();
    assert_eq!(t.image, Some(rgb16()));
    let tr = t.image_split("train").unwrap();
    assert_eq!(tr.len(), 12);
    assert_eq!(tr[4].label, 1);
    assert_eq!(tr[0].pixels.len(), 3 * 16 * 16);
    // a torn record
    let bytes = std::fs::read(d.join("train.bin")).unwrap();
    std::fs::write(d.join("train.bin"), &bytes[..bytes.len() - 5]).unwrap();
    let e = err_of(t.image_split("train"));
    assert!(e.contains("train.bin") && e.contains("770-byte records"), "{e}");
    // a label outside labels.txt
    let mut bad = bytes.clone();
    bad[0] = 7;
    std::fs::write(d.join("train.bin"), &bad).unwrap();
    let e = err_of(t.image_split("train"));
    assert!(e.contains("train.bin: record 1: field 'label' is 7"), "{e}");
    // image.json: bad and missing keys
    std::fs::write(d.join("image.json"), r#"{"channels": 2, "height": 16, "width": 16}"#).unwrap();
    let e = err_of(Task::open(&d));
    assert!(e.contains("image.json") && e.contains("'channels'"), "{e}");
    std::fs::write(d.join("image.json"), r#"{"channels": 3, "width": 16}"#).unwrap();
    let e = err_of(Task::open(&d));
    assert!(e.contains("image.json") && e.contains("height"), "{e}");
}

#[test]
fn vision_tasks_and_pretrain_report_bad_input_with_nonzero_exit() {
    let d = common::tmpdir("vision-bad-cli");
    let o = common::bin()
        .args(["vision-tasks", "--data"])
        .arg(d.join("nope"))
        .arg("--out")
        .arg(d.join("out"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cifar10/labels.txt"), "{e}");
    // pre-training on a text task
    let text = d.join("text");
    std::fs::create_dir_all(&text).unwrap();
    std::fs::write(text.join("labels.txt"), "a\nb\n").unwrap();
    std::fs::write(text.join("train.jsonl"), "{\"text\": \"x\", \"label\": \"a\"}\n").unwrap();
    let o = common::bin().args(["pretrain", "--task"]).arg(&text).arg("--out").arg(d.join("m")).output().unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("image.json") || e.contains("train.bin"), "{e}");
    // an image task on a text model and a text task on an image model
    let img = d.join("img");
    write_task(&img, 2, rgb16(), [2, 1, 1], 2);
    for (model, task, want) in [
        (common::minilm_dir(), &img, "needs an image model"),
        (common::fixture("vit-pretrained"), &text, "needs a text model"),
    ] {
        let o = common::bin()
            .args(["adapt", "--method", "linear-probe", "--shots", "1", "--steps", "1", "--model"])
            .arg(&model)
            .arg("--task")
            .arg(task)
            .arg("--out")
            .arg(d.join("a"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn pretrained_vit_dir_loads_back_identically_and_matches_transformers() {
    // A model written by `loracomp pretrain` (tests/fixtures/vit-pretrained) gives transformers' last hidden
    // state (golden.json, from tools/check_vit_pretrained.py with /root/venv/bin/python).
    let dir = common::fixture("vit-pretrained");
    let g: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let flat = |v: &Value| -> Vec<f32> {
        fn go(v: &Value, out: &mut Vec<f32>) {
            match v {
                Value::Array(a) => a.iter().for_each(|x| go(x, out)),
                x => out.push(x.as_f64().unwrap() as f32),
            }
        }
        let mut o = Vec::new();
        go(v, &mut o);
        o
    };
    let px = Pixels { batch: 2, channels: 3, height: 16, width: 16, data: flat(&g["pixel_values"]) };
    let mut m = Vit::load(&dir).unwrap();
    let got = m.forward(&px).unwrap().to_vec();
    let want = flat(&g["last_hidden_state"]);
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert_eq!(got.len(), want.len());
    assert!(diff <= 1e-4, "max diff {diff}");
    // Written again, it reads back bit for bit: same tensors, same forward pass, same file bytes.
    let out = common::tmpdir("vit-roundtrip");
    let pre: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("preprocessor_config.json")).unwrap()).unwrap();
    loracomp::methods::pretrain::write_vit_dir(&m, &pre, &out).unwrap();
    let mut m2 = Vit::load(&out).unwrap();
    assert_eq!(m.state_dict(), m2.state_dict());
    assert_eq!(m2.forward(&px).unwrap().to_vec(), got);
    for f in ["model.safetensors", "config.json", "preprocessor_config.json"] {
        assert_eq!(std::fs::read(dir.join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn every_method_runs_on_a_vit_and_grey_images_are_converted() {
    let d = common::tmpdir("vision-methods");
    let lm = LoadedModel::load(&common::fixture("vit-pretrained"), 128).unwrap();
    assert!(matches!(lm.encoder().unwrap(), Encoder::Vit(_)));
    // grey 8×8 images through a 3-channel 16×16 model
    write_task(&d.join("grey"), 2, ImageShape { channels: 1, height: 8, width: 8 }, [3, 1, 2], 3);
    let t = Task::open(&d.join("grey")).unwrap();
    let ex = t.examples("train").unwrap();
    assert!(matches!(ex, Examples::Images(..)));
    let enc = encode_examples(&lm.frontend, &ex).unwrap();
    match &enc[0].item {
        loracomp::methods::common::Item::Pixels { c, h, w, data } => {
            assert_eq!((*c, *h, *w), (3, 16, 16));
            // the three channels are equal
            assert_eq!(data[..256], data[256..512]);
            assert_eq!(data[..256], data[512..]);
        }
        _ => panic!("expected pixels"),
    }
    // two bank modules trained with the library, then every method
    let mut bank = Vec::new();
    for (i, seed) in [5u64, 6].iter().enumerate() {
        let td = d.join(format!("up{i}"));
        write_task(&td, 3, rgb16(), [3, 1, 1], *seed);
        let o = common::bin()
            .args(["train", "--steps", "3", "--batch", "4", "--rank", "2", "--alpha", "4", "--model"])
            .arg(common::fixture("vit-pretrained"))
            .arg("--task")
            .arg(&td)
            .arg("--out")
            .arg(d.join(format!("bank{i}")))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        bank.push(Adapter::load(&d.join(format!("bank{i}"))).unwrap());
    }
    let test = encode_examples(&lm.frontend, &t.examples("test").unwrap()).unwrap();
    for m in Method::every() {
        let mut o = AdaptOpts::defaults(m, 0);
        o.loop_opts.steps = 2;
        o.loop_opts.batch = 4;
        o.lorahub_generations = 2;
        o.pooling = lm.encoder().unwrap().default_pooling();
        let r = adapt_encoded(lm.encoder().unwrap().clone(), lm.pad_id(), 2, &enc, &test, &bank, &o)
            .unwrap_or_else(|e| panic!("{}: {e:#}", m.name()));
        assert_eq!(r.scores.n, 4, "{}", m.name());
        assert!(r.final_loss.is_finite(), "{}", m.name());
        if m == Method::Learned {
            // one weight vector per adapted layer (query and value of 2 layers), 2 modules each
            assert_eq!(r.weights.len(), 4);
            assert!(r.weights.iter().all(|(p, w)| p.contains("attention.attention.") && w.len() == 2));
        }
    }
    // retrieval before composition: both criteria keep one module; CKA keeps the one with the larger gain
    let pooling = lm.encoder().unwrap().default_pooling();
    let (_, gains) =
        loracomp::methods::similarity::module_cka_gain(lm.encoder().unwrap(), lm.pad_id(), &bank, &enc, 2, pooling)
            .unwrap();
    assert!(gains.iter().all(|g| g.is_finite()) && gains[0] != gains[1], "{gains:?}");
    for by in [Retrieval::Arrow, Retrieval::Cka] {
        let mut o = AdaptOpts::defaults(Method::Uniform, 0);
        o.loop_opts.steps = 2;
        o.pooling = pooling;
        o.select = Some(1);
        o.select_by = by;
        let r = adapt_encoded(lm.encoder().unwrap().clone(), lm.pad_id(), 2, &enc, &test, &bank, &o).unwrap();
        assert_eq!(r.used_modules.len(), 1, "{by:?}");
        if by == Retrieval::Cka {
            assert_eq!(r.used_modules, vec![if gains[0] > gains[1] { 0 } else { 1 }]);
        }
    }
}

#[test]
fn tiny_vit_pretrain_bank_adapt_eval_through_the_cli() {
    let d = common::tmpdir("vision-e2e");
    write_task(&d.join("pre"), 4, rgb16(), [6, 2, 2], 11);
    write_task(&d.join("up0"), 3, rgb16(), [4, 1, 1], 12);
    write_task(&d.join("up1"), 2, ImageShape { channels: 1, height: 12, width: 12 }, [4, 1, 1], 13);
    write_task(&d.join("down"), 3, ImageShape { channels: 1, height: 16, width: 16 }, [4, 1, 3], 14);
    let run = |args: &[&str]| -> Value {
        let o = common::bin().current_dir(&d).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let pre = run(&[
        "pretrain",
        "--arch",
        "vit",
        "--task",
        "pre",
        "--out",
        "model",
        "--hidden",
        "32",
        "--layers",
        "2",
        "--heads",
        "2",
        "--mlp",
        "64",
        "--patch",
        "4",
        "--image-size",
        "16",
        "--steps",
        "6",
        "--batch",
        "8",
        "--quiet",
    ]);
    assert_eq!(pre["n_train"], 24);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(d.join("model/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "vit");
    assert!(Vit::load(&d.join("model")).is_ok());
    for up in ["up0", "up1"] {
        run(&[
            "train",
            "--model",
            "model",
            "--task",
            up,
            "--out",
            &format!("bank/{up}"),
            "--steps",
            "4",
            "--batch",
            "4",
        ]);
    }
    for method in ["uniform", "learned"] {
        let m = run(&[
            "adapt", "--model", "model", "--task", "down", "--shots", "2", "--seed", "1", "--steps", "5", "--batch",
            "4", "--method", method, "--bank", "bank/up0", "bank/up1", "--out", method,
        ]);
        assert_eq!(m["n_test"], 9);
        // eval of the exported adapter gives adapt's test accuracy
        let e = run(&["eval", "--model", "model", "--task", "down", "--adapter", &format!("{method}/adapter")]);
        assert_eq!(e["accuracy"], m["accuracy"], "{method}");
        assert_eq!(e["n"], 9);
    }
}

#[test]
fn vit_embedding_gradients_match_finite_differences() {
    // Pre-training and full fine-tuning train the patch projection, CLS token and position table: their
    // gradients (backward without the pixel gradient) against central differences of Σ r ⊙ last_hidden.
    use rand::{Rng, SeedableRng};
    let mut m = Vit::load(&common::fixture("vit-pretrained")).unwrap();
    m.set_all_trainable(false);
    for p in [&mut m.cls, &mut m.pos, &mut m.patch.w] {
        p.set_trainable(true);
    }
    m.patch.bias.as_mut().unwrap().set_trainable(true);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let px = Pixels {
        batch: 2,
        channels: 3,
        height: 16,
        width: 16,
        data: (0..2 * 3 * 16 * 16).map(|_| rng.gen_range(-1.0f32..1.0)).collect(),
    };
    let n = m.forward(&px).unwrap().len();
    let r: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let loss = |m: &mut Vit| -> f64 {
        let h = m.forward(&px).unwrap();
        h.iter().zip(&r).map(|(a, b)| *a as f64 * *b as f64).sum()
    };
    for (_, p) in m.trainable_params_mut() {
        p.zero_grad();
    }
    m.forward(&px).unwrap();
    m.backward(&r, false).unwrap();
    let grads: Vec<(String, Vec<f32>)> =
        m.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
    let names: Vec<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "embeddings.cls_token",
            "embeddings.position_embeddings"
        ]
    );
    let eps = 1e-2f32;
    for (k, (name, g)) in grads.iter().enumerate() {
        for i in [0, g.len() / 3, g.len() - 1] {
            let set = |m: &mut Vit, delta: f32| {
                let p = m.trainable_params_mut().into_iter().nth(k).unwrap().1;
                p.data[i] += delta;
                m.patch.invalidate();
            };
            set(&mut m, eps);
            let up = loss(&mut m);
            set(&mut m, -2.0 * eps);
            let down = loss(&mut m);
            set(&mut m, eps);
            let num = (up - down) / (2.0 * eps as f64);
            let ana = g[i] as f64;
            let err = (num - ana).abs() / (1e-2 + num.abs().max(ana.abs()));
            assert!(err < 2e-2, "{name}[{i}]: numeric {num} analytic {ana}");
        }
    }
}

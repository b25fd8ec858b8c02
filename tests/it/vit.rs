//! ViT and DINOv2 encoders: parity with transformers (same size and interpolated position embeddings), PEFT
//! adapters under both naming schemes, finite-difference gradients, and bad inputs.

use crate::common::{bin, fixture, tmpdir};
use loracomp::engine::param::Param;
use loracomp::engine::weights::{write_safetensors, TensorFile};
use loracomp::lora::bank::{BankPath, Composition, FreshLora, LoraModule};
use loracomp::lora::host::LinearHost;
use loracomp::models::forward::attach_all;
use loracomp::models::vit::{bicubic_resize, Pixels, Vit};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Pixels from a JSON object holding `pixel_values` `[b][c][h][w]`.
fn pixels_of(v: &Value) -> Pixels {
    fn flat(v: &Value, out: &mut Vec<f32>) {
        match v {
            Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
            x => out.push(x.as_f64().unwrap() as f32),
        }
    }
    let p = &v["pixel_values"];
    let (b, c, h, w) = (
        p.as_array().unwrap().len(),
        p[0].as_array().unwrap().len(),
        p[0][0].as_array().unwrap().len(),
        p[0][0][0].as_array().unwrap().len(),
    );
    let mut data = Vec::new();
    flat(p, &mut data);
    Pixels { batch: b, channels: c, height: h, width: w, data }
}

fn max_diff(got: &[f32], want: &Value) -> f64 {
    let data = want["data"].as_array().unwrap();
    assert_eq!(got.len(), data.len(), "length");
    got.iter().zip(data).map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs()).fold(0.0, f64::max)
}

fn check_parity(model: &str) {
    let gold = read_json(&fixture(model).join("golden.json"));
    let mut m = Vit::load(&fixture(model)).unwrap();
    for g in [&gold, &gold["interp"]] {
        let px = pixels_of(g);
        let h = m.forward(&px).unwrap().to_vec();
        let want = &g["last_hidden_state"];
        let (b, s) = m.shape();
        assert_eq!(serde_json::json!([b, s, m.hidden()]), want["shape"]);
        let d = max_diff(&h, want);
        assert!(d <= 1e-4, "{model} [{}x{}]: max abs diff {d}", px.height, px.width);
    }
}

#[test]
fn vit_matches_transformers_including_interpolated_positions() {
    check_parity("tiny-vit");
}

#[test]
fn dinov2_matches_transformers_including_interpolated_positions() {
    check_parity("tiny-dinov2");
}

#[test]
fn bicubic_resize_to_the_same_size_is_the_identity() {
    let src: Vec<f32> = (0..4 * 3 * 5).map(|i| (i as f32 * 0.37).sin()).collect();
    assert_eq!(bicubic_resize(&src, 4, 3, 5, 4, 3), src);
    // a constant grid stays constant at any size (the weights sum to one)
    let c = vec![0.75f32; 3 * 3 * 2];
    for v in bicubic_resize(&c, 3, 3, 2, 5, 7) {
        assert!((v - 0.75).abs() < 1e-6);
    }
}

#[test]
fn checkpoint_with_vit_prefix_loads_the_same() {
    let dir = tmpdir("vit-prefix");
    std::fs::copy(fixture("tiny-vit/config.json"), dir.join("config.json")).unwrap();
    let tf = TensorFile::open(&fixture("tiny-vit/model.safetensors")).unwrap();
    let prefixed = tf.tensors.into_iter().map(|(k, v)| (format!("vit.{k}"), v)).collect();
    write_safetensors(&dir.join("model.safetensors"), &prefixed, None).unwrap();
    let gold = read_json(&fixture("tiny-vit/golden.json"));
    let px = pixels_of(&gold);
    let a = Vit::load(&fixture("tiny-vit")).unwrap().forward(&px).unwrap().to_vec();
    let b = Vit::load(&dir).unwrap().forward(&px).unwrap().to_vec();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn resolve_maps_classic_and_runtime_names_onto_one_path() {
    let vit = Vit::load(&fixture("tiny-vit")).unwrap();
    let cases = [
        ("encoder.layer.1.attention.attention.query", Some("encoder.layer.1.attention.attention.query")),
        ("layers.1.attention.q_proj", Some("encoder.layer.1.attention.attention.query")),
        ("vit.layers.0.attention.o_proj", Some("encoder.layer.0.attention.output.dense")),
        ("layers.0.mlp.fc1", Some("encoder.layer.0.intermediate.dense")),
        ("vit.encoder.layer.0.output.dense", Some("encoder.layer.0.output.dense")),
        ("layers.0.mlp.fc2", Some("encoder.layer.0.output.dense")),
        ("layers.2.attention.q_proj", None),
        ("layers.01.attention.q_proj", None),
        ("encoder.layer.0.attention.self.query", None),
        ("embeddings.patch_embeddings.projection", None),
    ];
    for (m, want) in cases {
        assert_eq!(vit.resolve(m).as_deref(), want, "{m}");
    }
    let dino = Vit::load(&fixture("tiny-dinov2")).unwrap();
    assert_eq!(
        dino.resolve("encoder.layer.1.attention.v_proj").as_deref(),
        Some("encoder.layer.1.attention.attention.value")
    );
    assert_eq!(dino.resolve("dinov2.encoder.layer.0.mlp.fc2").as_deref(), Some("encoder.layer.0.mlp.fc2"));
    assert_eq!(dino.resolve("encoder.layer.0.intermediate.dense"), None);
    assert_eq!(dino.linear_paths().len(), 12);
}

fn adapter_output(model: &str, adapters: &[&str], px: &Pixels) -> Vec<f32> {
    let dir = fixture(model);
    let mut m = Vit::load(&dir).unwrap();
    let ads: Vec<PathBuf> = adapters.iter().map(|a| dir.join(a)).collect();
    attach_all(&mut m, &ads, &dir, false).unwrap();
    m.forward(px).unwrap().to_vec()
}

#[test]
fn peft_adapters_give_peft_outputs_under_both_naming_schemes() {
    let gold = read_json(&fixture("tiny-vit/peft_golden.json"));
    let px = pixels_of(&gold);
    let plain = Vit::load(&fixture("tiny-vit")).unwrap().forward(&px).unwrap().to_vec();
    for (key, sets) in [
        ("a", vec![vec!["adapter_runtime_a"], vec!["adapter_classic_a"]]),
        ("b", vec![vec!["adapter_runtime_b"], vec!["adapter_classic_b"]]),
        (
            "ab",
            vec![
                vec!["adapter_runtime_a", "adapter_runtime_b"],
                vec!["adapter_classic_a", "adapter_classic_b"],
                vec!["adapter_runtime_a", "adapter_classic_b"],
            ],
        ),
    ] {
        let want = &gold[format!("last_hidden_state_{key}")];
        // the adapter changes the output by far more than the tolerance
        assert!(max_diff(&plain, want) > 1e-2, "{key}: adapter has no visible effect");
        for set in sets {
            let d = max_diff(&adapter_output("tiny-vit", &set, &px), want);
            assert!(d <= 1e-4, "{set:?}: max abs diff {d}");
        }
    }
    let gold = read_json(&fixture("tiny-dinov2/peft_golden.json"));
    let px = pixels_of(&gold);
    let d = max_diff(&adapter_output("tiny-dinov2", &["adapter_runtime"], &px), &gold["last_hidden_state"]);
    assert!(d <= 1e-4, "dinov2 adapter: max abs diff {d}");
}

#[test]
fn adapter_naming_a_module_twice_or_a_missing_module_is_refused() {
    let dir = tmpdir("vit-twice");
    let src = fixture("tiny-vit/adapter_runtime_a");
    let tf = TensorFile::open(&src.join("adapter_model.safetensors")).unwrap();
    let mut t = tf.tensors.clone();
    for (k, v) in &tf.tensors {
        let classic = k
            .replace("base_model.model.layers.", "base_model.model.encoder.layer.")
            .replace(".attention.q_proj.", ".attention.attention.query.");
        t.insert(classic, v.clone());
    }
    // the classic names must be targeted too, or the adapter is refused first (PEFT would not apply them)
    let mut cfg = read_json(&src.join("adapter_config.json"));
    cfg["target_modules"].as_array_mut().unwrap().push("query".into());
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    write_safetensors(&dir.join("adapter_model.safetensors"), &t, None).unwrap();
    let mut m = Vit::load(&fixture("tiny-vit")).unwrap();
    let err = attach_all(&mut m, std::slice::from_ref(&dir), &fixture("tiny-vit"), false).unwrap_err().to_string();
    assert!(err.contains("appears twice"), "{err}");
    let t2 = tf
        .tensors
        .iter()
        .map(|(k, v)| (k.replace("layers.0.attention.q_proj", "layers.7.attention.q_proj"), v.clone()))
        .collect();
    write_safetensors(&dir.join("adapter_model.safetensors"), &t2, None).unwrap();
    let err = attach_all(&mut m, std::slice::from_ref(&dir), &fixture("tiny-vit"), false).unwrap_err().to_string();
    assert!(err.contains("layers.7.") && err.contains("ViT encoder with 2 layers"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------------------
// Finite differences of L = Σ r ⊙ last_hidden_state.

fn rand_vec(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * s).collect()
}

fn small_pixels(seed: u64, h: usize, w: usize) -> Pixels {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    Pixels { batch: 2, channels: 3, height: h, width: w, data: rand_vec(&mut rng, 2 * 3 * h * w, 1.0) }
}

fn loss(m: &mut Vit, px: &Pixels, r: &[f32]) -> f64 {
    let h = m.forward(px).unwrap();
    h.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

fn invalidate(m: &mut Vit) {
    for layer in &mut m.layers {
        for l in layer.linears_mut() {
            l.invalidate();
        }
    }
}

/// Attach to every layer's query, value, fc1 and fc2 a fixed bank with learned logits, and a fresh LoRA on
/// attn_out; make the LayerNorms and layer scales trainable.
fn make_trainable(m: &mut Vit, path: BankPath, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for layer in &mut m.layers {
        for p in [&mut layer.ln1_g, &mut layer.ln1_b, &mut layer.ln2_g, &mut layer.ln2_b] {
            p.set_trainable(true);
        }
        for p in [layer.ls1.as_mut(), layer.ls2.as_mut()].into_iter().flatten() {
            p.set_trainable(true);
        }
        for lin in [&mut layer.query, &mut layer.value, &mut layer.fc1, &mut layer.fc2] {
            let (din, dout) = (lin.din, lin.dout);
            let bank = [2usize, 1]
                .iter()
                .map(|&r| LoraModule {
                    a: rand_vec(&mut rng, r * din, 0.5),
                    b: rand_vec(&mut rng, dout * r, 0.5),
                    r,
                    scale: 1.5 / r as f32,
                })
                .collect();
            lin.set_bank(bank);
            let mut logits = Param::new(vec![2], rand_vec(&mut rng, 2, 0.5));
            logits.set_trainable(true);
            lin.comp = Composition::Learned(logits);
            lin.force_path = Some(path);
        }
        let lin = &mut layer.attn_out;
        let (din, dout, r) = (lin.din, lin.dout, 2);
        let mut a = Param::new(vec![r, din], rand_vec(&mut rng, r * din, 0.5));
        let mut b = Param::new(vec![dout, r], rand_vec(&mut rng, dout * r, 0.5));
        a.set_trainable(true);
        b.set_trainable(true);
        lin.fresh = Some(FreshLora { a, b, r, scale: 1.5 });
    }
    m.ln_g.set_trainable(true);
    m.ln_b.set_trainable(true);
}

fn fd_err(num: f64, ana: f64) -> f64 {
    (num - ana).abs() / (1e-2 + num.abs().max(ana.abs()))
}

fn gradcheck(model: &str, path: BankPath, h: usize, w: usize) {
    let mut m = Vit::load(&fixture(model)).unwrap();
    make_trainable(&mut m, path, 3);
    let px = small_pixels(4, h, w);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let n_out = m.forward(&px).unwrap().len();
    let r = rand_vec(&mut rng, n_out, 1.0);
    m.backward(&r, true).unwrap();
    let dpx = m.pixel_grad().to_vec();
    assert_eq!(dpx.len(), px.data.len());
    let eps = 1e-2f32;
    // f32 round-off in the summed loss dominates below ~1e-2; the pixels' curvature is mild at 3e-2.
    let eps_px = 3e-2f32;
    // pixels
    let mut checked = 0;
    let mut q = px.clone();
    for i in (0..px.data.len()).step_by(px.data.len() / 40) {
        q.data[i] = px.data[i] + eps_px;
        let lp = loss(&mut m, &q, &r);
        q.data[i] = px.data[i] - eps_px;
        let lm = loss(&mut m, &q, &r);
        q.data[i] = px.data[i];
        let num = (lp - lm) / (2.0 * eps_px as f64);
        let e = fd_err(num, dpx[i] as f64);
        assert!(e < 2e-2, "{model} pixel[{i}]: analytic {} vs numeric {num}", dpx[i]);
        checked += 1;
    }
    // every trainable parameter, a sample of coordinates each
    let grads: Vec<(String, Vec<f32>)> =
        m.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
    assert!(grads.iter().any(|(n, _)| n.ends_with("composition_logits")));
    assert!(grads.iter().any(|(n, _)| n.ends_with("lora_A")));
    for (name, g) in &grads {
        for i in (0..g.len()).step_by((g.len() / 4).max(1)) {
            let set = |m: &mut Vit, delta: f32| {
                for (nm, p) in m.trainable_params_mut() {
                    if nm == *name {
                        p.data[i] += delta;
                    }
                }
                invalidate(m);
            };
            set(&mut m, eps);
            let lp = loss(&mut m, &px, &r);
            set(&mut m, -2.0 * eps);
            let lm = loss(&mut m, &px, &r);
            set(&mut m, eps);
            let num = (lp - lm) / (2.0 * eps as f64);
            let e = fd_err(num, g[i] as f64);
            assert!(e < 2e-2, "{model} {name}[{i}]: analytic {} vs numeric {num} (err {e:.2e})", g[i]);
            checked += 1;
        }
    }
    assert!(checked > 100, "checked {checked}");
    // frozen weights got no gradient buffer
    assert!(m.layers[0].key.w.grad.is_empty() && m.patch.w.grad.is_empty() && m.pos.grad.is_empty());
}

#[test]
fn vit_gradients_match_fd_for_pixels_lora_and_compositions() {
    gradcheck("tiny-vit", BankPath::Factored, 16, 16);
    gradcheck("tiny-vit", BankPath::Merged, 12, 20);
}

#[test]
fn dinov2_gradients_match_fd_with_layer_scale_and_interpolated_positions() {
    gradcheck("tiny-dinov2", BankPath::Merged, 12, 20);
    gradcheck("tiny-dinov2", BankPath::Factored, 16, 16);
}

#[test]
fn backward_without_input_gradient_gives_the_same_parameter_gradients() {
    let px = small_pixels(6, 16, 16);
    let mut out = Vec::new();
    for input_grad in [true, false] {
        let mut m = Vit::load(&fixture("tiny-vit")).unwrap();
        make_trainable(&mut m, BankPath::Factored, 7);
        let n = m.forward(&px).unwrap().len();
        let r: Vec<f32> = (0..n).map(|i| (i as f32 * 0.1).cos()).collect();
        m.backward(&r, input_grad).unwrap();
        out.push(m.trainable_params_mut().into_iter().flat_map(|(_, p)| p.grad.clone()).collect::<Vec<f32>>());
    }
    assert_eq!(out[0], out[1]);
}

// ---------------------------------------------------------------------------------------------------------
// The binary.

fn max_diff_json(got: &Value, want: &Value) -> f64 {
    assert_eq!(got["shape"], want["shape"]);
    let (a, b) = (got["data"].as_array().unwrap(), want["data"].as_array().unwrap());
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x.as_f64().unwrap() - y.as_f64().unwrap()).abs()).fold(0.0, f64::max)
}

#[test]
fn forward_cli_vit_and_dinov2_match_transformers() {
    for model in ["tiny-vit", "tiny-dinov2"] {
        let dir = fixture(model);
        let out =
            bin().args(["forward", "--model"]).arg(&dir).arg("--input").arg(dir.join("golden.json")).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).unwrap();
        let d = max_diff_json(&got, &read_json(&dir.join("golden.json"))["last_hidden_state"]);
        assert!(d <= 1e-4, "{model}: max abs diff {d}");
    }
    let dir = fixture("tiny-vit");
    let out = bin()
        .args(["forward", "--model"])
        .arg(&dir)
        .arg("--adapter")
        .arg(dir.join("adapter_runtime_a"))
        .arg("--adapter")
        .arg(dir.join("adapter_classic_b"))
        .arg("--input")
        .arg(dir.join("peft_golden.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = max_diff_json(&got, &read_json(&dir.join("peft_golden.json"))["last_hidden_state_ab"]);
    assert!(d <= 1e-4, "adapters a+b: max abs diff {d}");
}

#[test]
fn forward_cli_bad_pixel_values_name_the_field() {
    let dir = tmpdir("vit-bad");
    let img = |c: usize, h: usize, w: usize| vec![vec![vec![0.5f32; w]; h]; c];
    let cases = [
        (serde_json::json!({"input_ids": [[1, 2]]}), "field 'pixel_values' is missing"),
        (serde_json::json!({"pixel_values": [img(2, 16, 16)]}), "2 channels, but the model's num_channels is 3"),
        (serde_json::json!({"pixel_values": img(3, 16, 16)}), "field 'pixel_values' has shape [3, 16, 16]"),
        (serde_json::json!({"pixel_values": [img(3, 3, 16)]}), "smaller than one 4x4 patch"),
        (serde_json::json!({"pixel_values": [img(3, 16, 16), img(3, 16, 15)]}), "field 'pixel_values' is ragged"),
        (serde_json::json!({"pixel_values": [[[["x"]]]]}), "field 'pixel_values' holds a non-number"),
    ];
    for (i, (v, want)) in cases.iter().enumerate() {
        let p = dir.join(format!("in{i}.json"));
        std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
        let out = bin().args(["forward", "--model"]).arg(fixture("tiny-vit")).arg("--input").arg(&p).output().unwrap();
        assert!(!out.status.success(), "case {i} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "case {i}: '{err}' lacks '{want}'");
        assert!(err.contains(&format!("in{i}.json")), "case {i}: error does not name the file: {err}");
        assert!(!err.contains("panicked"), "case {i}: {err}");
        assert!(out.stdout.is_empty());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_configs_name_the_key() {
    let dir = tmpdir("vit-cfg");
    let base: Value = read_json(&fixture("tiny-dinov2/config.json"));
    for (key, val, want) in [
        ("use_swiglu_ffn", Value::Bool(true), "key 'use_swiglu_ffn'"),
        ("num_attention_heads", serde_json::json!(5), "key 'num_attention_heads'"),
        ("patch_size", serde_json::json!("big"), "key 'patch_size'"),
        ("hidden_act", serde_json::json!("relu"), "key 'hidden_act'"),
    ] {
        let mut c = base.clone();
        c[key] = val;
        std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
        std::fs::copy(fixture("tiny-dinov2/model.safetensors"), dir.join("model.safetensors")).unwrap();
        let err = Vit::load(&dir).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("config.json"), "{key}: {err}");
    }
    // weights that do not fit the config name the tensor
    let mut c = base.clone();
    c["hidden_size"] = serde_json::json!(64);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    let err = Vit::load(&dir).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("has shape"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------------------
// Image preprocessing from preprocessor_config.json.

use loracomp::models::image::{Preprocessor, Resample, ResizeTo};

fn floats(v: &Value) -> Vec<f32> {
    v["data"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn preprocessing_matches_the_reference_resize_crop_rescale_normalise() {
    for model in ["tiny-vit", "tiny-dinov2"] {
        let pre = Preprocessor::from_file(&fixture(model).join("preprocessor_config.json")).unwrap();
        let gold = read_json(&fixture(model).join("preprocess_golden.json"));
        for case in gold["cases"].as_array().unwrap() {
            let s: Vec<usize> =
                case["image"]["shape"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            let (h, w, x) = pre.apply(&floats(&case["image"]), s[0], s[1], s[2]).unwrap();
            assert_eq!(serde_json::json!([s[0], h, w]), case["pixel_values"]["shape"]);
            let d = max_diff(&x, &case["pixel_values"]);
            assert!(d <= 1e-4, "{model} {s:?}: max abs diff {d}");
        }
    }
    // the preprocessed batch runs through the model
    let pre = Preprocessor::from_file(&fixture("tiny-vit/preprocessor_config.json")).unwrap();
    let px = pre.batch(&[vec![128.0; 3 * 20 * 30], vec![3.0; 3 * 20 * 30]], 3, 20, 30).unwrap();
    assert_eq!((px.batch, px.height, px.width), (2, 16, 16));
    assert!((px.data[0] - (128.0 / 255.0 - 0.5) / 0.5).abs() < 1e-5);
    assert_eq!(Vit::load(&fixture("tiny-vit")).unwrap().forward(&px).unwrap().len(), 2 * 17 * 32);
}

#[test]
fn preprocessing_config_parses_and_errors_name_the_key() {
    let v = serde_json::json!({"do_resize": true, "size": {"shortest_edge": 8}, "resample": 3});
    let p = Preprocessor::from_json(&v).unwrap();
    assert_eq!(p.resize, Some((ResizeTo::ShortestEdge(8), Resample::Bicubic)));
    assert_eq!((p.center_crop, p.rescale, p.normalize), (None, None, None));
    // no steps: the image passes through unchanged
    let none = Preprocessor::from_json(&serde_json::json!({})).unwrap();
    let img: Vec<f32> = (0..2 * 3 * 4).map(|i| i as f32).collect();
    assert_eq!(none.apply(&img, 2, 3, 4).unwrap(), (3, 4, img.clone()));
    // resizing to the same size is the identity, for both filters
    for rs in [2, 3] {
        let p = Preprocessor::from_json(
            &serde_json::json!({"do_resize": true, "size": {"height": 3, "width": 4}, "resample": rs}),
        )
        .unwrap();
        let (_, _, out) = p.apply(&img, 2, 3, 4).unwrap();
        out.iter().zip(&img).for_each(|(a, b)| assert!((a - b).abs() < 1e-5));
    }
    let dir = tmpdir("vit-pre");
    for (cfg, want) in [
        (serde_json::json!({"do_resize": true}), "key 'size' is missing"),
        (serde_json::json!({"do_resize": true, "size": {"height": 4}}), "key 'size'"),
        (serde_json::json!({"do_resize": true, "size": 4, "resample": 0}), "key 'resample'"),
        (serde_json::json!({"do_normalize": true, "image_mean": [0.5], "image_std": [0.0]}), "key 'image_std'"),
        (serde_json::json!({"do_rescale": "yes"}), "key 'do_rescale'"),
    ] {
        let p = dir.join("preprocessor_config.json");
        std::fs::write(&p, cfg.to_string()).unwrap();
        let err = Preprocessor::from_file(&p).unwrap_err().to_string();
        assert!(err.contains(want) && err.contains("preprocessor_config.json"), "{err}");
    }
    let crop =
        Preprocessor::from_json(&serde_json::json!({"do_center_crop": true, "crop_size": {"height": 5, "width": 5}}))
            .unwrap();
    assert!(crop.apply(&img, 2, 3, 4).unwrap_err().to_string().contains("smaller than crop_size"));
    std::fs::remove_dir_all(&dir).ok();
}

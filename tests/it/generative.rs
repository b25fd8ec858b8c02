//! T5 and Llama through the whole pipeline: every command and method on the tiny random fixtures, with a
//! word-level tokenizer this test writes, and the gradient of learned composition through rank classification
//! against finite differences.

use crate::common::{bin, copy_dir, fixture, tmpdir};
use loracomp::data::Shots;
use loracomp::lora::bank::Composition;
use loracomp::lora::host::LinearHost;
use loracomp::lora::peft::Adapter;
use loracomp::methods::common::encode_examples;
use loracomp::methods::task::TaskModel;
use loracomp::models::encoder::{Base, LoadedModel};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The tiny fixture with a word-level tokenizer, in `dir/<fixture name>` (so adapters' base_model_name_or_path
/// match). The tokenizers are the ones tools/make_rank_goldens.py writes: T5 style (pad 0, `</s>` 1, unk 2, EOS
/// appended) or Llama style (`<unk>` 0, `<s>` 1, `</s>` 2, BOS prepended).
fn model_dir(dir: &Path, name: &str) -> PathBuf {
    let m = dir.join(name);
    copy_dir(&fixture(name), &m);
    let style = if name.contains("t5") { "tiny-t5" } else { "tiny-llama" };
    std::fs::copy(fixture("rank").join(style).join("tokenizer.json"), m.join("tokenizer.json")).unwrap();
    m
}

/// A three-class task whose class is told by a keyword: red (apple, cherry, fire), green (grass, leaf, moss),
/// blue (sky, sea, ice).
fn task_dir(dir: &Path, name: &str, seed: usize, with_test: bool) -> PathBuf {
    let t = dir.join(name);
    std::fs::create_dir_all(&t).unwrap();
    std::fs::write(t.join("labels.txt"), "red\ngreen\nblue\n").unwrap();
    let keys = [["apple", "cherry", "fire"], ["grass", "leaf", "moss"], ["sky", "sea", "ice"]];
    let filler = ["the", "a", "is", "very", "and", "of", "this", "that"];
    let line = |i: usize, c: usize| {
        let k = keys[c][(i + seed) % 3];
        let f1 = filler[(i * 3 + seed) % filler.len()];
        let f2 = filler[(i * 5 + c + seed) % filler.len()];
        let label = ["red", "green", "blue"][c];
        json!({"text": format!("{f1} {k} {f2}"), "label": label}).to_string()
    };
    let split = |n: usize, off: usize| -> String {
        (0..n).flat_map(|i| (0..3).map(move |c| (i, c))).map(|(i, c)| line(i + off, c) + "\n").collect()
    };
    std::fs::write(t.join("train.jsonl"), split(6, 0)).unwrap();
    std::fs::write(t.join("valid.jsonl"), split(2, 6)).unwrap();
    if with_test {
        std::fs::write(t.join("test.jsonl"), split(3, 9)).unwrap();
    }
    t
}

fn run(args: &[&str]) -> Value {
    let out = bin().args(args).output().unwrap();
    assert!(out.status.success(), "loracomp {}\nstderr: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn fails(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    assert!(!out.status.success(), "loracomp {} should fail", args.join(" "));
    assert_eq!(out.status.code(), Some(1), "exit status: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Train a bank of two LoRAs, then run every method, predict, eval and compose through the CLI.
fn pipeline(name: &str) {
    let d = tmpdir(&format!("gen-{name}"));
    let m = model_dir(&d, name);
    let up1 = task_dir(&d, "up1", 1, true);
    let up2 = task_dir(&d, "up2", 2, true);
    let down = task_dir(&d, "down", 0, true);
    let (ms, ds) = (m.to_str().unwrap(), down.to_str().unwrap());
    let mut bank = Vec::new();
    for (i, up) in [&up1, &up2].iter().enumerate() {
        let out = d.join(format!("bank{i}"));
        let metrics = run(&[
            "train",
            "--model",
            ms,
            "--task",
            up.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "6",
            "--rank",
            "4",
            "--seed",
            &i.to_string(),
        ]);
        assert_eq!(metrics["model_kind"], name.split('-').nth(1).unwrap());
        assert!(metrics["accuracy"].as_f64().is_some() && metrics["valid_accuracy"].as_f64().is_some());
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        let task_type = if name.contains("t5") { "SEQ_2_SEQ_LM" } else { "CAUSAL_LM" };
        assert_eq!(cfg["task_type"], task_type);
        let a = Adapter::load(&out).unwrap();
        assert!(a.head.is_none(), "a generative adapter has no classifier head");
        let q = if name.contains("t5") {
            "encoder.block.0.layer.0.SelfAttention.q"
        } else {
            "model.layers.0.self_attn.q_proj"
        };
        assert!(a.modules.contains_key(q), "{:?}", a.modules.keys());
        bank.push(out);
    }
    let b: Vec<&str> = bank.iter().map(|p| p.to_str().unwrap()).collect();
    let methods = [
        "full",
        "lora",
        "uniform",
        "learned",
        "lorahub",
        "lorahub-compat",
        "task-arithmetic",
        "ties",
        "dare",
        "dare-ties",
        "magnitude-prune",
        "best-single",
        "auto",
    ];
    for method in methods {
        let out = d.join(format!("adapt-{method}"));
        let mut args = vec![
            "adapt",
            "--model",
            ms,
            "--task",
            ds,
            "--shots",
            "2",
            "--method",
            method,
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "4",
            "--template",
            "{text} ?",
        ];
        if !matches!(method, "full" | "lora") {
            args.push("--bank");
            args.extend(&b);
        }
        if method.starts_with("lorahub") {
            args.extend(["--lorahub-generations", "2"]);
        }
        if method == "auto" {
            // two examples a class reach this threshold: a LoRA is trained on the answer tokens on top
            args.extend(["--auto-lora-from", "2", "--rank", "2"]);
        }
        let metrics = run(&args);
        let acc = metrics["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc), "{method}: {acc}");
        if method == "auto" {
            // no head: the answer cross-entropy chooses among the candidates, which it records
            let det = &metrics["details"];
            assert_eq!(det["selection"], "criterion", "{det}");
            assert_eq!(det["candidates"].as_array().unwrap().len(), 1 + 2 * 4, "{det}");
            assert!(det["candidates"].as_array().unwrap().iter().all(|c| c["criterion"].as_f64().is_some()));
            assert_eq!(det["lora"]["rank"], 2, "{det}");
        }
        assert!(out.join("adapter/adapter_config.json").exists(), "{method}");
    }
    // retrieval by the head-free criterion works on a generative model; feature retrieval is refused
    let out = d.join("select");
    let metrics = run(&[
        "adapt",
        "--model",
        ms,
        "--task",
        ds,
        "--shots",
        "2",
        "--method",
        "learned",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "3",
        "--select",
        "1",
        "--bank",
        b[0],
        b[1],
    ]);
    assert_eq!(metrics["bank"].as_array().unwrap().len(), 1);
    assert_eq!(metrics["options"]["select_by"], "loss");
    let e = fails(&[
        "adapt",
        "--model",
        ms,
        "--task",
        ds,
        "--shots",
        "2",
        "--method",
        "learned",
        "--out",
        d.join("arrow").to_str().unwrap(),
        "--select",
        "1",
        "--by",
        "arrow",
        "--bank",
        b[0],
        b[1],
    ]);
    assert!(e.contains("--by loss"), "{e}");
    // linear-probe has no meaning without a head
    let e = fails(&[
        "adapt",
        "--model",
        ms,
        "--task",
        ds,
        "--shots",
        "2",
        "--method",
        "linear-probe",
        "--out",
        d.join("lp").to_str().unwrap(),
    ]);
    assert!(e.contains("no") && e.contains("head"), "{e}");
    assert!(!d.join("lp").exists());
    // predict and eval with the learned adapter (its template travels in the sidecar)
    let adapter = d.join("adapt-learned/adapter");
    let out = bin()
        .args(["predict", "--model", ms, "--adapter", adapter.to_str().unwrap(), "--text", "the sky is", "a leaf"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let s: f64 = l["scores"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
        assert!((s - 1.0).abs() < 1e-6, "{l}");
        assert!(["red", "green", "blue"].contains(&l["label"].as_str().unwrap()));
    }
    let ev = run(&["eval", "--model", ms, "--task", ds, "--adapter", adapter.to_str().unwrap()]);
    let adapt_m: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("adapt-learned/metrics.json")).unwrap()).unwrap();
    assert_eq!(ev["accuracy"], adapt_m["accuracy"], "eval of the exported adapter = adapt's own evaluation");
    // compose with fixed weights, for the task's labels
    let compose = |weights: &str, out: &Path| {
        let o = out.to_str().unwrap();
        run(&[
            "compose",
            "--model",
            ms,
            "--bank",
            b[0],
            b[1],
            "--weights",
            weights,
            "--task",
            ds,
            "--shots",
            "2",
            "--out",
            o,
        ])
    };
    let out = d.join("composed");
    compose("0.7,0.3", &out);
    let ev = run(&["eval", "--model", ms, "--task", ds, "--adapter", out.to_str().unwrap()]);
    assert!(ev["accuracy"].as_f64().is_some());
    // zero-shot: eval without an adapter ranks the labels with the frozen model, which is what an adapter of
    // weight 0 leaves (ΔW = 0)
    let zero = d.join("composed-zero");
    compose("0,0", &zero);
    let ev0 = run(&["eval", "--model", ms, "--task", ds, "--adapter", zero.to_str().unwrap()]);
    let zs = run(&["eval", "--model", ms, "--task", ds]);
    assert_eq!(zs["zero_shot"], true);
    assert_eq!((&zs["accuracy"], &zs["macro_f1"], &zs["n"]), (&ev0["accuracy"], &ev0["macro_f1"], &ev0["n"]));
    let zt = run(&["eval", "--model", ms, "--task", ds, "--template", "{text}"]);
    assert_eq!(zt["accuracy"], zs["accuracy"], "the default template is the bare text");
    // options that do not apply to the target are errors naming them
    let e = fails(&["eval", "--model", ms, "--task", ds, "--adapter", zero.to_str().unwrap(), "--template", "{text}"]);
    assert!(e.contains("--template"), "{e}");
    let e = fails(&["eval", "--model", ms, "--task", ds, "--allow-base-mismatch"]);
    assert!(e.contains("--allow-base-mismatch"), "{e}");
}

#[test]
fn t5_runs_every_command_and_method() {
    pipeline("tiny-t5");
}

#[test]
fn llama_runs_every_command_and_method() {
    pipeline("tiny-llama");
}

/// Adapters written by real PEFT are bank members: LoraHub's keying for T5 (q, v of every attention) and
/// Llama's q_proj, v_proj, down_proj.
#[test]
fn real_peft_adapters_are_bank_members() {
    for (name, adapter, layers) in
        [("tiny-llama", "tiny-llama/adapter", 6), ("tiny-t5-gated", "tiny-t5-gated/adapter_qv", 0)]
    {
        let d = tmpdir("gen-peft");
        let m = model_dir(&d, name);
        let down = task_dir(&d, "down", 0, true);
        let peft = fixture(adapter);
        let out = d.join("uniform");
        let metrics = run(&[
            "adapt",
            "--model",
            m.to_str().unwrap(),
            "--task",
            down.to_str().unwrap(),
            "--shots",
            "2",
            "--method",
            "uniform",
            "--out",
            out.to_str().unwrap(),
            "--bank",
            peft.to_str().unwrap(),
        ]);
        let adapted = metrics["module_weights"].as_object().unwrap().len();
        let expected = if layers > 0 { layers } else { Adapter::load(&peft).unwrap().modules.len() };
        assert_eq!(adapted, expected, "{name}: {metrics}");
    }
}

#[test]
fn options_that_do_not_apply_are_errors_naming_them() {
    let d = tmpdir("gen-opts");
    let m = model_dir(&d, "tiny-t5");
    let down = task_dir(&d, "down", 0, true);
    let (ms, ds) = (m.to_str().unwrap(), down.to_str().unwrap());
    let o = d.join("o");
    let os = o.to_str().unwrap();
    let base = ["adapt", "--model", ms, "--task", ds, "--shots", "2", "--out", os];
    for (extra, flag) in [
        (&["--method", "lora", "--density", "0.9"][..], "--density"),
        (&["--method", "lora", "--global-weights"][..], "--global-weights"),
        (&["--method", "full", "--select", "1"][..], "--select"),
        (&["--method", "lora", "--pooling", "mean"][..], "--pooling"),
        (&["--method", "lora", "--lr-head", "0.1"][..], "--lr-head"),
    ] {
        let mut args = base.to_vec();
        args.extend(extra);
        let e = fails(&args);
        assert!(e.contains(flag), "{flag}: {e}");
        assert!(!o.exists(), "{flag}: nothing is written");
    }
}

/// d loss / d logits of a learned composition through rank classification, against central differences.
#[test]
fn learned_composition_gradients_through_rank_classification_pass_finite_differences() {
    for name in ["tiny-t5", "tiny-llama"] {
        let d = tmpdir(&format!("gen-fd-{name}"));
        let m = model_dir(&d, name);
        let task = loracomp::data::Task::open(&task_dir(&d, "t", 0, false)).unwrap();
        let lm = LoadedModel::load(&m, 64).unwrap();
        let ex = task.examples("train").unwrap().sample_k_shot(3, Shots(Some(2)).0, 0).0;
        let enc = encode_examples(&lm.frontend, &ex).unwrap();
        let Base::Generative { lm: g, answers } = lm.base(&task.labels).unwrap() else { panic!("generative") };
        let mut r = loracomp::models::generative::RankClassifier::new(g, answers, lm.pad_id()).unwrap();
        // a bank of two random modules on q and v of every layer, learned logits at random values
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let targets = if name.contains("t5") { [".q", ".v"] } else { ["q_proj", "v_proj"] };
        let paths: Vec<String> =
            r.linear_paths().into_iter().filter(|p| targets.iter().any(|t| p.ends_with(t))).collect();
        for p in &paths {
            let lin = r.linear_mut(p).unwrap();
            let (din, dout) = (lin.din, lin.dout);
            let module = |rng: &mut rand::rngs::StdRng| loracomp::lora::bank::LoraModule {
                a: (0..2 * din).map(|_| rng.gen_range(-0.5f32..0.5)).collect(),
                b: (0..dout * 2).map(|_| rng.gen_range(-0.5f32..0.5)).collect(),
                r: 2,
                scale: 1.0,
            };
            lin.set_bank(vec![module(&mut rng), module(&mut rng)]);
            let mut v = loracomp::engine::param::Param::new(vec![2], vec![rng.gen_range(-1.0f32..1.0), 0.3]);
            v.set_trainable(true);
            lin.comp = Composition::Learned(v);
        }
        let items: Vec<_> = enc.iter().collect();
        r.zero_grad();
        r.loss_backward(&items).unwrap();
        let grads: Vec<(String, Vec<f32>)> =
            r.trainable_params_mut().into_iter().map(|(n, p)| (n, p.grad.clone())).collect();
        assert_eq!(grads.len(), paths.len(), "{:?}", grads.iter().map(|g| &g.0).collect::<Vec<_>>());
        let h = 1e-2f32;
        let (mut worst, mut kinks, mut checked) = (0.0f64, 0, 0);
        for p in &paths {
            for k in 0..2 {
                // loss with logit k moved by `delta` from where it started
                let mut at = |delta: f32| {
                    let lin = r.linear_mut(p).unwrap();
                    let Composition::Learned(v) = &mut lin.comp else { unreachable!("learned") };
                    let orig = v.data[k];
                    v.data[k] = orig + delta;
                    lin.invalidate();
                    let prompts: Vec<&[u32]> = enc
                        .iter()
                        .map(|e| match &e.item {
                            loracomp::methods::common::Item::Tokens { ids, .. } => &ids[..],
                            _ => unreachable!(),
                        })
                        .collect();
                    let labels: Vec<usize> = enc.iter().map(|e| e.label).collect();
                    let loss = r.loss(&prompts, &labels, false).unwrap() as f64;
                    let lin = r.linear_mut(p).unwrap();
                    let Composition::Learned(v) = &mut lin.comp else { unreachable!("learned") };
                    v.data[k] = orig;
                    lin.invalidate();
                    loss
                };
                // five-point stencil: truncation error O(h⁴), so f32 rounding of the loss dominates
                let mut fd_at = |h: f32| (-at(2.0 * h) + 8.0 * at(h) - 8.0 * at(-h) + at(-2.0 * h)) / (12.0 * h as f64);
                let (fd, fd_small) = (fd_at(h), fd_at(h / 2.0));
                let rel = |a: f64, b: f64| (a - b).abs() / (1e-2 + a.abs().max(b.abs()));
                if rel(fd, fd_small) > 5e-3 {
                    // a ReLU kink (tiny-t5's feed-forward) inside the step: no derivative to compare with
                    kinks += 1;
                    continue;
                }
                checked += 1;
                let g = &grads.iter().find(|(n, _)| n.starts_with(&format!("{p}."))).expect("a gradient per path").1;
                let an = g[k] as f64;
                // as the model gradient checks: relative error with a 1e-2 floor (the loss is rounded to f32)
                let err = rel(fd, an);
                worst = worst.max(err);
                assert!(err < 2e-2, "{name} {p}[{k}]: analytic {an}, finite difference {fd}");
            }
        }
        assert!(
            worst.is_finite() && checked >= 2 * kinks && checked >= 8,
            "{name}: {checked} checked, {kinks} at kinks"
        );
    }
}

/// An adapter trained by `loracomp train` on T5 / Llama, loaded by Python PEFT, gives the answer scores loracomp
/// computes (golden from tools/make_rank_goldens.py), and the adapter changes them.
#[test]
fn trained_generative_adapters_give_peft_answer_scores() {
    for name in ["tiny-t5", "tiny-llama"] {
        let d = tmpdir(&format!("gen-golden-{name}"));
        let m = model_dir(&d, name);
        let rank = fixture("rank").join(name);
        let g: Value = serde_json::from_str(&std::fs::read_to_string(rank.join("golden.json")).unwrap()).unwrap();
        let labels: Vec<String> = serde_json::from_value(g["labels"].clone()).unwrap();
        let prompts: Vec<String> = serde_json::from_value(g["prompts"].clone()).unwrap();
        let lm = LoadedModel::load(&m, 64).unwrap();
        let ex = loracomp::data::Examples::Text(
            prompts.iter().map(|t| loracomp::data::Example { text: t.clone(), pair: None, label: 0 }).collect(),
        );
        let enc = encode_examples(&lm.frontend, &ex).unwrap();
        let ids: Vec<Vec<u32>> = enc
            .iter()
            .map(|e| match &e.item {
                loracomp::methods::common::Item::Tokens { ids, .. } => ids.clone(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(json!(ids), g["prompt_ids"], "{name}: token ids differ from the tokenizers library's");
        let mut base = loracomp::methods::task_net(
            lm.base(&labels).unwrap(),
            lm.pad_id(),
            3,
            loracomp::engine::kernels::Pooling::Mean,
            0,
        )
        .unwrap();
        let mut adapted = base.clone();
        let adapter = Adapter::load(&rank.join("adapter")).unwrap();
        loracomp::methods::bank::apply_adapter(adapted.as_dyn(), &adapter, 3).unwrap();
        let items: Vec<_> = enc.iter().collect();
        let got = adapted.as_dyn().class_scores(&items).unwrap();
        let bare = base.as_dyn().class_scores(&items).unwrap();
        let want: Vec<f64> = g["scores"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().clone())
            .map(|v| v.as_f64().unwrap())
            .collect();
        let diff = got.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(diff <= 1e-4, "{name}: max |loracomp - PEFT| answer score difference {diff}");
        let moved = bare.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-2, "{name}: the adapter should change the scores ({moved})");
    }
}

/// A sweep on a generative model: bank, cells (the LoRA baseline on the architecture's own targets), report.
#[test]
fn a_sweep_runs_on_a_generative_model() {
    let d = tmpdir("gen-sweep");
    let m = model_dir(&d, "tiny-llama");
    let data = d.join("data");
    for (name, seed) in [("up1", 1), ("up2", 2), ("down", 0)] {
        task_dir(&data, name, seed, true);
    }
    let cfg = d.join("sweep.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"gen\"\nmodel = \"{}\"\ndata = \"{}\"\nupstream = [\"up1\", \"up2\"]\ndownstream = [\"down\"]\n\
             shots = [2]\nseeds = 1\nmethods = [\"lora\", \"uniform\", \"learned\", \"auto\"]\n\n[bank]\nrank = 2\nalpha = 4\n\
             targets = [\"q_proj\", \"v_proj\"]\nepochs = 1\nbatch = 8\n\n[adapt]\nsteps = 3\nbatch = 4\nmax_len = 32\n\
             eval_limit = 5\nauto_lora_from = 2\n",
            m.display(),
            data.display()
        ),
    )
    .unwrap();
    let out = d.join("out");
    let o = bin().args(["sweep", "--quiet", "--config"]).arg(&cfg).arg("--out").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 4, "{lines}");
    // auto's row records its choices
    let row: Value =
        lines.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|r| r["method"] == "auto").unwrap();
    assert_eq!(row["auto"]["selection"], "criterion", "{row}");
    assert!(row["auto"]["candidates"].as_array().is_some_and(|c| !c.is_empty()), "{row}");
    assert_eq!(row["auto"]["lora"]["rank"], 16, "the sweep's lora_rank: {row}");
    assert!(out.join("report.md").exists());
}

//! The bad inputs of the reliability audit (docs/reliability.md) that other tests did not cover at the command
//! line: each ends in exit code 1, an error naming the file and the field (or key), no panic, and nothing written
//! to the output directory. Bank adapters are made directly with `write_adapter`, with MiniLM's shapes.

use crate::common;
use loracomp::lora::peft::{write_adapter, AdapterConfig, ExportModule};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LABELS: &str = "neg\npos\n";

fn task(dir: &Path, per_class: usize) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("labels.txt"), LABELS).unwrap();
    let texts =
        [("pos", ["great film", "loved it", "a joy", "superb"]), ("neg", ["awful plot", "boring", "dull", "bad"])];
    let mut rows = String::new();
    for (label, ts) in texts {
        for t in &ts[..per_class] {
            rows += &json!({"text": t, "label": label}).to_string();
            rows.push('\n');
        }
    }
    for s in ["train", "valid", "test"] {
        std::fs::write(dir.join(format!("{s}.jsonl")), &rows).unwrap();
    }
}

/// A random rank-2 adapter on layer 0's query with input width `din`.
fn adapter(dir: &Path, din: usize, edit: impl FnOnce(&mut AdapterConfig)) {
    let (r, dout) = (2, 384);
    let mut modules = BTreeMap::new();
    let a = (0..r * din).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
    let b = (0..dout * r).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
    modules.insert("encoder.layer.0.attention.self.query".to_string(), ExportModule { a, b, r, din, dout, alpha: 4.0 });
    let mut cfg = AdapterConfig::new(r, 4.0, vec!["query".into()], None);
    edit(&mut cfg);
    // write_adapter only writes what it is given, so an edited config reaches the disk as is.
    write_adapter(dir, cfg, &modules, None, &json!({})).unwrap();
}

fn fails(args: &[&str], needles: &[&str], out: &Path) -> String {
    let o = common::bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{args:?} (a panic exits 101): {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: '{n}' not in: {err}");
    }
    assert!(!out.exists(), "{}: output left behind after: {err}", out.display());
    err
}

struct Env {
    m: PathBuf,
    d: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let d = common::tmpdir(tag);
        task(&d.join("task"), 2);
        Env { m: common::minilm_dir(), d }
    }
    /// `adapt --method uniform` with `bank` into a fresh output directory `out`.
    fn adapt_args(&self, bank: &Path, out: &Path) -> Vec<String> {
        [
            "adapt",
            "--model",
            self.m.to_str().unwrap(),
            "--task",
            self.d.join("task").to_str().unwrap(),
            "--shots",
            "1",
            "--method",
            "uniform",
            "--steps",
            "1",
            "--bank",
            bank.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    }
    fn adapt_fails(&self, bank: &Path, needles: &[&str]) -> String {
        let out = self.d.join(format!("out-{}", bank.file_name().unwrap().to_string_lossy()));
        let args = self.adapt_args(bank, &out);
        fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), needles, &out)
    }
}

/// Writes a bad weights file at the given path.
type WriteFile<'a> = Box<dyn Fn(&Path) + 'a>;

/// Write a safetensors file by hand: `header` JSON and raw `data`, with the 8-byte length prefix.
fn raw_safetensors(path: &Path, header: &Value, data: &[u8]) {
    let h = header.to_string().into_bytes();
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn bad_bank_adapters_are_refused_before_anything_is_written() {
    let e = Env::new("badcli-bank");
    let good = e.d.join("good");
    adapter(&good, 384, |_| {});
    let out = e.d.join("out-good");
    let args = e.adapt_args(&good, &out);
    let o = common::bin().args(&args).output().unwrap();
    assert!(o.status.success(), "the unedited adapter must work: {}", String::from_utf8_lossy(&o.stderr));

    // made for another base: a layer of another width
    let wide = e.d.join("wide");
    adapter(&wide, 768, |_| {});
    e.adapt_fails(&wide, &["wide", "encoder.layer.0.attention.self.query", "[768 → 384]", "another base model"]);

    // a target module the model lacks (layer 9 of a 6-layer model)
    let far = e.d.join("far");
    common::copy_dir(&good, &far);
    let st = far.join("adapter_model.safetensors");
    let tf = loracomp::engine::weights::TensorFile::open(&st).unwrap();
    let renamed = tf.tensors.into_iter().map(|(k, v)| (k.replace("layer.0.", "layer.9."), v)).collect();
    loracomp::engine::weights::write_safetensors(&st, &renamed, None).unwrap();
    e.adapt_fails(&far, &["far", "adapter targets module 'encoder.layer.9.attention.self.query'", "does not have"]);

    // config fields loracomp cannot apply exactly
    for (name, edit, field) in [
        (
            "ia3",
            Box::new(|c: &mut AdapterConfig| c.peft_type = "IA3".into()) as Box<dyn FnOnce(&mut AdapterConfig)>,
            "'peft_type'",
        ),
        ("dora", Box::new(|c: &mut AdapterConfig| c.use_dora = true), "'use_dora'"),
        ("bias", Box::new(|c: &mut AdapterConfig| c.bias = "lora_only".into()), "'bias'"),
        ("fifo", Box::new(|c: &mut AdapterConfig| c.fan_in_fan_out = true), "'fan_in_fan_out'"),
        ("layers", Box::new(|c: &mut AdapterConfig| c.layers_to_transform = Some(json!([0]))), "'layers_to_transform'"),
        ("rank0", Box::new(|c: &mut AdapterConfig| _ = c.rank_pattern.insert("query".into(), 0)), "'rank_pattern'"),
        // an alpha beyond f32 range would make the scale infinite
        (
            "alpha",
            Box::new(|c: &mut AdapterConfig| _ = c.alpha_pattern.insert("query".into(), 1e300)),
            "'alpha_pattern'",
        ),
    ] {
        let dir = e.d.join(name);
        adapter(&dir, 384, edit);
        e.adapt_fails(&dir, &["adapter_config.json", field]);
    }

    // weights files: truncated, garbage, absurd header length, unsupported dtypes, NaN / Inf, DoRA magnitudes
    let st = good.join("adapter_model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    let key = "base_model.model.bert.encoder.layer.0.attention.self.query";
    let cases: Vec<(&str, WriteFile, Vec<&str>)> = vec![
        (
            "truncated",
            Box::new(|p| std::fs::write(p, &bytes[..bytes.len() - 10]).unwrap()),
            vec!["not a valid safetensors"],
        ),
        (
            "garbage",
            Box::new(|p| std::fs::write(p, b"PK\x03\x04 this is a zip file").unwrap()),
            vec!["not a valid safetensors"],
        ),
        (
            "absurd",
            Box::new(|p| {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
                std::fs::write(p, b).unwrap()
            }),
            vec!["not a valid safetensors", "HeaderTooLarge"],
        ),
        (
            "int64",
            Box::new(|p| {
                let h = json!({
                    format!("{key}.lora_A.weight"): {"dtype": "I64", "shape": [2, 384], "data_offsets": [0, 6144]},
                    format!("{key}.lora_B.weight"): {"dtype": "F32", "shape": [384, 2], "data_offsets": [6144, 9216]},
                });
                raw_safetensors(p, &h, &vec![0u8; 9216]);
            }),
            vec!["lora_A.weight", "dtype I64", "supported: F32, F16, BF16"],
        ),
        (
            "float64",
            Box::new(|p| {
                let h = json!({
                    format!("{key}.lora_A.weight"): {"dtype": "F32", "shape": [2, 384], "data_offsets": [0, 3072]},
                    format!("{key}.lora_B.weight"): {"dtype": "F64", "shape": [384, 2], "data_offsets": [3072, 9216]},
                });
                raw_safetensors(p, &h, &vec![0u8; 9216]);
            }),
            vec!["lora_B.weight", "dtype F64"],
        ),
        (
            "inf",
            Box::new(|p| {
                let mut b = bytes.clone();
                let n = b.len();
                b[n - 4..].copy_from_slice(&f32::INFINITY.to_le_bytes());
                std::fs::write(p, b).unwrap()
            }),
            vec!["NaN or Inf"],
        ),
        (
            "magnitude",
            Box::new(|p| {
                let h = json!({
                    format!("{key}.lora_A.weight"): {"dtype": "F32", "shape": [2, 384], "data_offsets": [0, 3072]},
                    format!("{key}.lora_B.weight"): {"dtype": "F32", "shape": [384, 2], "data_offsets": [3072, 6144]},
                    format!("{key}.lora_magnitude_vector"): {"dtype": "F32", "shape": [384], "data_offsets": [6144, 7680]},
                });
                raw_safetensors(p, &h, &vec![0u8; 7680]);
            }),
            vec!["lora_magnitude_vector", "DoRA"],
        ),
    ];
    for (name, write, needles) in cases {
        let dir = e.d.join(name);
        common::copy_dir(&good, &dir);
        write(&dir.join("adapter_model.safetensors"));
        let mut n = vec!["adapter_model.safetensors"];
        n.extend(needles);
        e.adapt_fails(&dir, &n);
    }
}

#[test]
fn bad_task_files_name_the_file_the_line_and_the_field() {
    let e = Env::new("badcli-task");
    let good = e.d.join("good");
    adapter(&good, 384, |_| {});
    let t = e.d.join("task");
    // a label missing from labels.txt, in the training split
    std::fs::write(
        t.join("train.jsonl"),
        "{\"text\": \"ok\", \"label\": \"pos\"}\n{\"text\": \"meh\", \"label\": \"neutral\"}\n",
    )
    .unwrap();
    e.adapt_fails(&good, &["train.jsonl:2", "field 'label'", "'neutral'", "labels.txt"]);
    // an empty test split
    task(&t, 2);
    std::fs::write(t.join("test.jsonl"), "\n  \n").unwrap();
    e.adapt_fails(&good, &["test.jsonl", "the split is empty"]);
    // labels.txt with one label, and with a label twice
    task(&t, 2);
    std::fs::write(t.join("labels.txt"), "pos\n").unwrap();
    e.adapt_fails(&good, &["labels.txt", "at least two labels"]);
    std::fs::write(t.join("labels.txt"), "pos\nneg\npos\n").unwrap();
    e.adapt_fails(&good, &["labels.txt", "'pos' listed twice"]);
    // a label given as a JSON array, a text pair that is a number
    task(&t, 2);
    std::fs::write(t.join("valid.jsonl"), "{\"text\": \"x\", \"label\": [\"pos\"]}\n").unwrap();
    let out = e.d.join("out-train");
    let m = e.m.to_str().unwrap();
    let ts = t.to_str().unwrap();
    let train = |out: &Path| {
        ["train", "--model", m, "--task", ts, "--steps", "1", "--rank", "2", "--out", out.to_str().unwrap()]
            .map(String::from)
            .to_vec()
    };
    let args = train(&out);
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["valid.jsonl:1", "field 'label'"], &out);
    std::fs::write(t.join("valid.jsonl"), "{\"text\": \"x\", \"label\": \"pos\", \"text_pair\": 7}\n").unwrap();
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["valid.jsonl:1", "field 'text_pair'"], &out);
}

#[test]
fn more_shots_than_a_class_has_uses_all_it_has_and_says_so() {
    let e = Env::new("badcli-shots");
    let t = e.d.join("task");
    // pos has 3 examples, neg 1; ask for 2 per class
    std::fs::write(
        t.join("train.jsonl"),
        "{\"text\": \"great\", \"label\": \"pos\"}\n{\"text\": \"fine\", \"label\": \"pos\"}\n\
         {\"text\": \"superb\", \"label\": \"pos\"}\n{\"text\": \"awful\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    let out = e.d.join("out");
    let o = common::bin()
        .args(["adapt", "--model", e.m.to_str().unwrap(), "--task", t.to_str().unwrap(), "--shots", "2"])
        .args(["--method", "linear-probe", "--steps", "2", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("warning") && err.contains("fewer than 2") && err.contains("neg (1)"), "{err}");
    let m: Value = serde_json::from_slice(&std::fs::read(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["n_train"], 3);
    assert_eq!(m["short_labels"], json!([{"label": "neg", "available": 1}]));
}

#[test]
fn existing_results_are_kept_unless_force() {
    let e = Env::new("badcli-force");
    let m = e.m.to_str().unwrap();
    let t = e.d.join("task");
    let out = e.d.join("up");
    let train = |extra: &[&str]| {
        common::bin()
            .args(["train", "--model", m, "--task", t.to_str().unwrap(), "--steps", "1", "--rank", "2"])
            .args(["--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(train(&[]).status.success());
    let listing = |d: &Path| {
        let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| (e.file_name().to_string_lossy().to_string(), std::fs::read(e.path()).unwrap()))
            .collect();
        v.sort();
        v
    };
    let before = listing(&out);
    let o = train(&["--seed", "9"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("already holds results") && err.contains("--force") && err.contains("up"), "{err}");
    assert_eq!(listing(&out), before, "a refused run must leave the old results as they were");
    assert!(train(&["--seed", "9", "--force"]).status.success());

    // compose refuses an output directory that already holds an adapter
    let o = common::bin()
        .args(["compose", "--model", m, "--bank", out.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("adapter_config.json") && err.contains("--force"), "{err}");
}

#[test]
fn nan_in_the_base_model_names_the_tensor() {
    let d = common::tmpdir("badcli-nanmodel");
    common::copy_dir(&common::fixture("tiny-bert"), &d);
    let p = d.join("model.safetensors");
    let mut tf = loracomp::engine::weights::TensorFile::open(&p).unwrap();
    let key = "encoder.layer.1.output.dense.weight".to_string();
    let key = if tf.tensors.contains_key(&key) { key } else { format!("bert.{key}") };
    tf.tensors.get_mut(&key).unwrap().1[3] = f32::NAN;
    loracomp::engine::weights::write_safetensors(&p, &tf.tensors, None).unwrap();
    let o = common::bin().args(["embed", "--model"]).arg(&d).args(["--text", "hello"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.contains("model.safetensors") && err.contains(&key) && err.contains("NaN"), "{err}");
}

#[test]
fn sizes_that_cannot_work_are_refused_not_clamped() {
    let e = Env::new("badcli-sizes");
    let m = e.m.to_str().unwrap();
    let t = e.d.join("task");
    let out = e.d.join("out");
    let adapt = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<&str> =
            vec!["adapt", "--model", m, "--task", t.to_str().unwrap(), "--shots", "1", "--method", "lora"];
        a.extend(["--steps", "1", "--out", out.to_str().unwrap()]);
        a.extend(extra);
        a.into_iter().map(String::from).collect()
    };
    // the tokenizer used to panic when max_len could not hold [CLS] a [SEP] b [SEP]
    for n in ["0", "1", "3"] {
        let a = adapt(&["--max-len", n]);
        fails(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            &["tokenizer.json", &format!("max_len {n}"), "special tokens"],
            &out,
        );
    }
    // a rank, batch or export rank of 0 is a usage error (it used to be clamped, or written as an r = 0 adapter
    // that loracomp itself refuses to read)
    for (flag, needle) in [("--rank", "--rank"), ("--batch", "--batch"), ("--export-rank", "--export-rank")] {
        let o = common::bin().args(adapt(&[flag, "0"])).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(needle) && err.contains("not a positive whole number"), "{err}");
        assert!(!out.exists());
    }
    // the same in a sweep config: refused when the config is read, naming the file and the field
    let base = std::fs::read_to_string(common::root().join("experiments/task_shift_quick.toml")).unwrap();
    for (from, to, field) in [
        ("rank = 16", "rank = 0", "bank.rank"),
        ("batch = 16", "batch = 0", "adapt.batch"),
        ("shots = 4", "shots = 0", "ablation.shots"),
    ] {
        let p = e.d.join("sweep.toml");
        std::fs::write(&p, base.replacen(from, to, 1)).unwrap();
        let o = common::bin().args(["sweep", "--config", p.to_str().unwrap(), "--out", out.to_str().unwrap()]).output();
        let o = o.unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("sweep.toml") && err.contains(&format!("'{field}'")), "{err}");
        assert!(!out.exists());
    }
}

#[test]
fn a_sweep_with_missing_inputs_writes_nothing() {
    let e = Env::new("badcli-sweep");
    let out = e.d.join("out");
    let cfg = |model: &Path, down: &str| {
        format!(
            "name = \"t\"\nmodel = \"{}\"\ndata = \"{}\"\nupstream = [\"task\"]\ndownstream = [\"{down}\"]\n\
             methods = [\"linear-probe\"]\n",
            model.display(),
            e.d.display()
        )
    };
    let p = e.d.join("sweep.toml");
    for (text, needles) in [
        (cfg(&e.d.join("no-model"), "task"), vec!["field 'model'", "no-model/config.json", "not found"]),
        (cfg(&e.m, "tsak"), vec!["field 'downstream'", "task 'tsak'", "task directory not found"]),
    ] {
        std::fs::write(&p, text).unwrap();
        let mut n = vec!["sweep.toml"];
        n.extend(needles);
        fails(&["sweep", "--config", p.to_str().unwrap(), "--out", out.to_str().unwrap()], &n, &out);
    }
}

/// PEFT applies an adapter's tensors only to the modules `target_modules` matches, and each module once: a
/// tensor for another module, or one module under two keys (with and without `bert.`), is refused.
#[test]
fn adapters_that_peft_would_apply_differently_are_refused() {
    let e = Env::new("badcli-peftsem");
    // a tensor for 'query' while target_modules lists only 'value'
    let untargeted = e.d.join("untargeted");
    adapter(&untargeted, 384, |c| c.target_modules = Some(loracomp::lora::peft::Targets::List(vec!["value".into()])));
    e.adapt_fails(
        &untargeted,
        &["untargeted", "module 'bert.encoder.layer.0.attention.self.query'", "'target_modules' does not match"],
    );
    // a regex target_modules is a full match (PEFT's re.fullmatch)
    let regex = e.d.join("regex");
    adapter(&regex, 384, |c| c.target_modules = Some(loracomp::lora::peft::Targets::Regex("query".into())));
    e.adapt_fails(&regex, &["regex", "'target_modules' does not match"]);
    let full = e.d.join("regex-full");
    adapter(&full, 384, |c| c.target_modules = Some(loracomp::lora::peft::Targets::Regex(r".*\.query".into())));
    let out = e.d.join("out-regex-full");
    let o = common::bin().args(e.adapt_args(&full, &out)).output().unwrap();
    assert!(o.status.success(), "a full-match regex targets the module: {}", String::from_utf8_lossy(&o.stderr));
    // excluded by exclude_modules
    let excluded = e.d.join("excluded");
    adapter(&excluded, 384, |c| _ = c.extra.insert("exclude_modules".into(), json!(["query"])));
    e.adapt_fails(&excluded, &["excluded", "'exclude_modules' excludes"]);
    // one module twice: with and without the `bert.` prefix
    let twice = e.d.join("twice");
    adapter(&twice, 384, |_| {});
    let st = twice.join("adapter_model.safetensors");
    let mut tf = loracomp::engine::weights::TensorFile::open(&st).unwrap();
    let copies: Vec<_> = tf.tensors.iter().map(|(k, v)| (k.replace("model.bert.", "model."), v.clone())).collect();
    tf.tensors.extend(copies);
    loracomp::engine::weights::write_safetensors(&st, &tf.tensors, None).unwrap();
    e.adapt_fails(&twice, &["twice", "module 'encoder.layer.0.attention.self.query' is given twice"]);
}

/// A PEFT adapter with a two-class head, for `eval`.
fn adapter_with_head(dir: &Path, base: Option<String>) {
    let (r, din, dout) = (2, 384, 384);
    let mut modules = BTreeMap::new();
    let a = (0..r * din).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
    let b = (0..dout * r).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
    modules.insert("encoder.layer.0.attention.self.query".to_string(), ExportModule { a, b, r, din, dout, alpha: 4.0 });
    let cfg = AdapterConfig::new(r, 4.0, vec!["query".into()], base);
    let w: Vec<f32> = (0..2 * din).map(|i| ((i % 17) as f32 - 8.0) * 0.01).collect();
    let meta = json!({"labels": ["neg", "pos"], "pooling": "mean"});
    write_adapter(dir, cfg, &modules, Some((&[2, din], &w, &[0.0, 0.0])), &meta).unwrap();
}

/// A copy of MiniLM whose layer-2 MLP weights are scaled so that its products overflow f32 (every weight stays
/// finite, so loading accepts them).
fn overflowing_minilm(dir: &Path) {
    common::copy_dir(&common::minilm_dir(), dir);
    let p = dir.join("model.safetensors");
    let mut tf = loracomp::engine::weights::TensorFile::open(&p).unwrap();
    for key in ["encoder.layer.2.intermediate.dense.weight", "encoder.layer.2.output.dense.weight"] {
        tf.tensors.get_mut(key).unwrap().1.iter_mut().for_each(|v| *v *= 1e30);
    }
    loracomp::engine::weights::write_safetensors(&p, &tf.tensors, None).unwrap();
}

#[test]
fn eval_and_embed_refuse_nan_outputs_and_eval_checks_the_base() {
    let e = Env::new("badcli-eval");
    let t = e.d.join("task");
    let ad = e.d.join("ad");
    adapter_with_head(&ad, None);
    let eval = |model: &Path, adapter: &Path, extra: &[&str]| {
        let mut c = common::bin();
        c.args(["eval", "--model", model.to_str().unwrap(), "--task", t.to_str().unwrap()]);
        c.args(["--adapter", adapter.to_str().unwrap()]).args(extra);
        c.output().unwrap()
    };
    let o = eval(&e.m, &ad, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // an encoder's head is in its adapter: no zero-shot evaluation
    let o =
        common::bin().args(["eval", "--model", e.m.to_str().unwrap(), "--task", t.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty() && err.contains("encoder") && err.contains("--adapter"), "{err}");
    // logits computed on NaN: an error, not an accuracy
    let bad = e.d.join("overflow");
    overflowing_minilm(&bad);
    let o = eval(&bad, &ad, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty(), "no metrics");
    assert!(err.contains(bad.to_str().unwrap()) && err.contains("on test: the logit of class"), "{err}");
    assert!(err.contains("(the encoder's output overflowed)"), "{err}");
    // embed: the embedding of an overflowing model, named by the layer where it first happened
    let o = common::bin().args(["embed", "--model", bad.to_str().unwrap(), "--text", "hello"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(o.stdout.is_empty());
    assert!(err.contains("overflow: the model's output holds NaN/Inf, first in the layer 2 output"), "{err}");
    // an adapter made for another base model, as adapt refuses it
    let other = e.d.join("other");
    adapter_with_head(&other, Some("bert-base-uncased".into()));
    let o = eval(&e.m, &other, &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("field 'base_model_name_or_path' is 'bert-base-uncased'"), "{err}");
    assert!(err.contains("--allow-base-mismatch"), "{err}");
    let o = eval(&e.m, &other, &["--allow-base-mismatch"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn text_pair_on_only_some_lines_is_refused() {
    let e = Env::new("badcli-pair");
    let good = e.d.join("good");
    adapter(&good, 384, |_| {});
    let t = e.d.join("task");
    std::fs::write(
        t.join("train.jsonl"),
        "{\"text\": \"a\", \"text_pair\": \"b\", \"label\": \"pos\"}\n{\"text\": \"c\", \"label\": \"neg\"}\n",
    )
    .unwrap();
    e.adapt_fails(&good, &["train.jsonl:2", "field 'text_pair' is absent, but line 1 has one"]);
}

/// Runs `cmd`, killing it after `secs`: whether it failed fast, not after a long training run.
fn output_within(mut cmd: std::process::Command, secs: u64) -> std::process::Output {
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn");
    let t0 = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed().as_secs() > secs {
            child.kill().unwrap();
            panic!("still running after {secs} s: the error was not reported before training");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn train_checks_every_input_and_its_output_before_training_and_locks_its_output() {
    let e = Env::new("badcli-trainfirst");
    let t = e.d.join("task");
    let m = e.m.to_str().unwrap().to_string();
    // a long run: only a check made before training fails within the time limit
    let train = |out: &Path, steps: &str| {
        let mut c = common::bin();
        c.args(["train", "--model", &m, "--task", t.to_str().unwrap(), "--rank", "2", "--steps", steps]);
        c.args(["--out", out.to_str().unwrap()]);
        c
    };
    let file = e.d.join("a-file");
    std::fs::write(&file, "keep me").unwrap();
    let o = output_within(train(&file, "100000000"), 60);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("a-file: exists and is not a directory (--out names the output directory)"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    std::fs::write(t.join("valid.jsonl"), "{\"text\": \"x\", \"label\": \"maybe\"}\n").unwrap();
    let out = e.d.join("out");
    let o = output_within(train(&out, "100000000"), 60);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("valid.jsonl:1: field 'label': 'maybe'"), "{err}");
    assert!(!out.exists(), "nothing written");
    task(&t, 2);

    // a second train into the same --out while one runs (a live process holds the lock)
    std::fs::create_dir_all(&out).unwrap();
    let holder = std::process::id(); // this test process: alive
    std::fs::write(out.join(".train.lock"), holder.to_string()).unwrap();
    let o = output_within(train(&out, "1"), 60);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!(".train.lock: another train (process {holder}) is writing")), "{err}");
    assert!(!out.join("metrics.json").exists());
    std::fs::remove_file(out.join(".train.lock")).unwrap();

    // a temporary left by a killed run is removed by the next successful one; the lock is released
    let stale = out.join(".adapter_model.safetensors.4194303.tmp");
    std::fs::write(&stale, "half a file").unwrap();
    let o = output_within(train(&out, "1"), 300);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!stale.exists(), "stale temporary left behind");
    assert!(!out.join(".train.lock").exists(), "lock left behind");
}

#[test]
fn absurd_thread_counts_and_ranks_are_errors_with_the_estimate() {
    let o = common::bin().args(["--threads", "100000000", "embed", "--model", "m", "--text", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--threads 100000000") && err.contains("at most 4096") && err.contains("GiB of stack"),
        "{err}"
    );

    let e = Env::new("badcli-bigrank");
    let out = e.d.join("out");
    let t = e.d.join("task");
    let args = [
        "adapt",
        "--model",
        e.m.to_str().unwrap(),
        "--task",
        t.to_str().unwrap(),
        "--shots",
        "1",
        "--method",
        "lora",
        "--steps",
        "1",
        "--rank",
        "1000000000000",
        "--out",
        out.to_str().unwrap(),
    ];
    fails(&args, &["--rank 1000000000000: the fresh LoRA", "needs about", "MemAvailable"], &out);
    for lr in ["nan", "inf"] {
        let o = common::bin().args(args).args(["--lr", lr]).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("--lr") && err.contains("not a finite number"), "{err}");
    }
}

#[test]
fn a_fifo_in_place_of_a_task_file_is_refused() {
    let e = Env::new("badcli-fifo");
    let good = e.d.join("good");
    adapter(&good, 384, |_| {});
    let t = e.d.join("task");
    std::fs::remove_file(t.join("test.jsonl")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(t.join("test.jsonl")).status().unwrap().success());
    let out = e.d.join("out-good");
    let args = e.adapt_args(&good, &out);
    let mut c = common::bin();
    c.args(&args);
    let o = output_within(c, 60);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("test.jsonl: not a regular file"), "{err}");
    assert!(!out.exists());
}

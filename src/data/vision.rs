//! Readers for the shared vision data (`../shared/data/vision`) and `loracomp vision-tasks`, which builds the
//! vision suites' image task directories from it with seeded per-class train / valid / test splits.
//!
//! Source layouts:
//! - `cifar10/{train,test}.bin`, `labels.txt`: CIFAR binary records, 1 label byte then 3072 bytes (the 32×32
//!   R, G and B planes, row-major).
//! - `omniglot/<alphabet>.bin`, `<alphabet>.labels.txt` and `mnist/all.bin`, `labels.txt`: records of a
//!   little-endian u16 label then 784 bytes (28×28 grey, row-major).
//!
//! Tasks built (names are directory names under `--out`):
//! - `cifar10-pretrain`: CIFAR-10 classes airplane, automobile, bird, cat, deer (phase 1 of the suites);
//!   per class 900 train / 100 valid from `train.bin`, 200 test from `test.bin`.
//! - `cifar10-dog-frog`, `cifar10-horse-ship`, `cifar10-truck-dog`: subsets of the other five classes
//!   (bank modules of the domain-shift suite); per class 300 train / 50 valid, 100 test.
//! - `mnist`: the ten digits; per class 200 train / 50 valid / 200 test.
//! - `omniglot-<alphabet>` (lower case, `-` for other characters): one task per alphabet, each character a
//!   class; of its 20 drawings 12 train, 2 valid, 6 test.

use super::ImageShape;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::Path;

/// One source record: label index and pixels.
pub type Record = (usize, Vec<u8>);

fn read_bytes(p: &Path) -> Result<Vec<u8>> {
    crate::util::ensure_regular(p)?;
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// Non-empty lines of a labels file.
pub fn read_labels(p: &Path) -> Result<Vec<String>> {
    crate::util::ensure_regular(p)?;
    let text = std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?;
    let labels: Vec<String> = text.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    if labels.is_empty() {
        bail!("{}: no labels", p.display());
    }
    Ok(labels)
}

/// CIFAR binary records (1 label byte + 3×32×32). `classes` bounds the label.
pub fn read_cifar(p: &Path, classes: usize) -> Result<Vec<Record>> {
    let bytes = read_bytes(p)?;
    parse_records(p, &bytes, 1, 3 * 32 * 32, classes)
}

/// u16-labelled records of 28×28 grey images (Omniglot, MNIST). `classes` bounds the label.
pub fn read_u16_28(p: &Path, classes: usize) -> Result<Vec<Record>> {
    let bytes = read_bytes(p)?;
    parse_records(p, &bytes, 2, 28 * 28, classes)
}

/// Split `bytes` into records of a `label_bytes`-byte little-endian label and `pixels` bytes.
pub fn parse_records(p: &Path, bytes: &[u8], label_bytes: usize, pixels: usize, classes: usize) -> Result<Vec<Record>> {
    let rec = label_bytes + pixels;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        bail!("{}: {} bytes is not a whole, non-zero number of {rec}-byte records", p.display(), bytes.len());
    }
    bytes
        .chunks(rec)
        .enumerate()
        .map(|(i, r)| {
            let label = if label_bytes == 1 { r[0] as usize } else { u16::from_le_bytes([r[0], r[1]]) as usize };
            if label >= classes {
                bail!("{}: record {}: field 'label' is {label}, but there are {classes} labels", p.display(), i + 1);
            }
            Ok((label, r[label_bytes..].to_vec()))
        })
        .collect()
}

/// Records grouped by class, each group shuffled with `seed`.
fn by_class(records: Vec<Record>, classes: usize, seed: u64) -> Vec<Vec<Vec<u8>>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = vec![Vec::new(); classes];
    for (l, px) in records {
        out[l].push(px);
    }
    for g in &mut out {
        g.shuffle(&mut rng);
    }
    out
}

/// Write an image task directory (labels.txt, image.json, {train,valid,test}.bin), every file atomically.
pub fn write_image_task(
    dir: &Path,
    labels: &[String],
    shape: ImageShape,
    splits: &[(&str, Vec<Record>)],
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    crate::util::write_atomic(&dir.join("labels.txt"), (labels.join("\n") + "\n").as_bytes())?;
    crate::util::write_atomic(&dir.join("image.json"), serde_json::to_string_pretty(&shape)?.as_bytes())?;
    for (name, recs) in splits {
        let mut bytes = Vec::with_capacity(recs.len() * shape.record());
        for (l, px) in recs {
            if px.len() != shape.pixels() {
                bail!("{}: an image has {} bytes, not {}", dir.display(), px.len(), shape.pixels());
            }
            bytes.extend_from_slice(&(*l as u16).to_le_bytes());
            bytes.extend_from_slice(px);
        }
        crate::util::write_atomic(&dir.join(format!("{name}.bin")), &bytes)?;
    }
    Ok(())
}

/// A task from `keep` classes (source indices) of grouped records: per class `n_train`, `n_valid` from
/// `pool` and `n_test` from `test_pool` (or, when that is `None`, the next ones of `pool`).
struct Pick<'a> {
    pool: &'a [Vec<Vec<u8>>],
    test_pool: Option<&'a [Vec<Vec<u8>>]>,
    n_train: usize,
    n_valid: usize,
    n_test: usize,
}

impl Pick<'_> {
    fn splits(&self, keep: &[usize], names: &[String], what: &str) -> Result<Vec<(&'static str, Vec<Record>)>> {
        let (mut tr, mut va, mut te) = (Vec::new(), Vec::new(), Vec::new());
        for (new, &c) in keep.iter().enumerate() {
            let g = &self.pool[c];
            let need = self.n_train + self.n_valid + if self.test_pool.is_none() { self.n_test } else { 0 };
            if g.len() < need {
                bail!("{what}: class '{}' has {} images, {need} needed", names[c], g.len());
            }
            tr.extend(g[..self.n_train].iter().map(|p| (new, p.clone())));
            va.extend(g[self.n_train..self.n_train + self.n_valid].iter().map(|p| (new, p.clone())));
            let (src, from) = match self.test_pool {
                Some(t) => (&t[c], 0),
                None => (g, self.n_train + self.n_valid),
            };
            if src.len() < from + self.n_test {
                bail!("{what}: class '{}' has too few test images ({})", names[c], src.len() - from.min(src.len()));
            }
            te.extend(src[from..from + self.n_test].iter().map(|p| (new, p.clone())));
        }
        Ok(vec![("train", tr), ("valid", va), ("test", te)])
    }
}

/// Directory-safe lower-case task name.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for ch in s.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// CIFAR-10 class subsets used as bank modules of the domain-shift suite (class names).
pub const CIFAR_SUBSETS: [&[&str]; 3] = [&["dog", "frog"], &["horse", "ship"], &["truck", "dog"]];
/// CIFAR-10 classes of the pre-training task.
pub const CIFAR_PRETRAIN: [&str; 5] = ["airplane", "automobile", "bird", "cat", "deer"];

/// Build every vision task under `out` from the shared data in `data`; returns a summary per task.
pub fn build_tasks(data: &Path, out: &Path, seed: u64) -> Result<Value> {
    let mut summary = serde_json::Map::new();
    let rgb = ImageShape { channels: 3, height: 32, width: 32 };
    let grey = ImageShape { channels: 1, height: 28, width: 28 };
    let mut put =
        |name: String, labels: &[String], shape: ImageShape, splits: Vec<(&str, Vec<Record>)>| -> Result<()> {
            write_image_task(&out.join(&name), labels, shape, &splits)?;
            let counts: serde_json::Map<String, Value> =
                splits.iter().map(|(s, r)| (s.to_string(), json!(r.len()))).collect();
            summary.insert(name, json!({"classes": labels.len(), "images": counts, "shape": shape}));
            Ok(())
        };

    // CIFAR-10
    let cdir = data.join("cifar10");
    let cl = read_labels(&cdir.join("labels.txt"))?;
    let idx = |n: &str| -> Result<usize> {
        cl.iter().position(|l| l == n).ok_or_else(|| anyhow!("{}: no class '{n}'", cdir.join("labels.txt").display()))
    };
    let train = by_class(read_cifar(&cdir.join("train.bin"), cl.len())?, cl.len(), seed);
    let test = by_class(read_cifar(&cdir.join("test.bin"), cl.len())?, cl.len(), seed ^ 1);
    let keep: Vec<usize> = CIFAR_PRETRAIN.iter().map(|n| idx(n)).collect::<Result<_>>()?;
    let pick = Pick { pool: &train, test_pool: Some(&test), n_train: 900, n_valid: 100, n_test: 200 };
    let names: Vec<String> = keep.iter().map(|&c| cl[c].clone()).collect();
    put("cifar10-pretrain".into(), &names, rgb, pick.splits(&keep, &cl, "cifar10")?)?;
    // The subsets' classes are not pre-training classes; two subsets that share a class share its images.
    let pick = Pick { pool: &train, test_pool: Some(&test), n_train: 300, n_valid: 50, n_test: 100 };
    for sub in CIFAR_SUBSETS {
        let keep: Vec<usize> = sub.iter().map(|n| idx(n)).collect::<Result<_>>()?;
        let names: Vec<String> = sub.iter().map(|s| s.to_string()).collect();
        put(format!("cifar10-{}", sub.join("-")), &names, rgb, pick.splits(&keep, &cl, "cifar10")?)?;
    }

    // MNIST
    let mdir = data.join("mnist");
    let ml = read_labels(&mdir.join("labels.txt"))?;
    let m = by_class(read_u16_28(&mdir.join("all.bin"), ml.len())?, ml.len(), seed ^ 2);
    let pick = Pick { pool: &m, test_pool: None, n_train: 200, n_valid: 50, n_test: 200 };
    let keep: Vec<usize> = (0..ml.len()).collect();
    put("mnist".into(), &ml, grey, pick.splits(&keep, &ml, "mnist")?)?;

    // Omniglot: one task per alphabet.
    let odir = data.join("omniglot");
    let mut alphabets: Vec<String> = std::fs::read_dir(&odir)
        .with_context(|| format!("cannot read {}", odir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".bin")).map(|s| s.to_string()))
        .collect();
    alphabets.sort();
    if alphabets.is_empty() {
        bail!("{}: no <alphabet>.bin files", odir.display());
    }
    for (ai, a) in alphabets.iter().enumerate() {
        let al = read_labels(&odir.join(format!("{a}.labels.txt")))?;
        let g = by_class(read_u16_28(&odir.join(format!("{a}.bin")), al.len())?, al.len(), seed ^ (100 + ai as u64));
        let pick = Pick { pool: &g, test_pool: None, n_train: 12, n_valid: 2, n_test: 6 };
        let keep: Vec<usize> = (0..al.len()).collect();
        put(format!("omniglot-{}", slug(a)), &al, grey, pick.splits(&keep, &al, &format!("omniglot/{a}"))?)?;
    }
    Ok(Value::Object(summary))
}

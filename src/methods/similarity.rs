//! How related each upstream module is to a downstream task: for the sweep's "does learned composition favour
//! related modules?" analysis, and for `--select k --by cka` retrieval. Two measures:
//!
//! - **cosine**: cosine of the mean base-model embeddings of the two tasks' training texts (cheap, label-blind);
//! - **CKA gain**: linear CKA (Kornblith et al. 2019) between the representation that module `n` alone gives the
//!   downstream task's training examples (base + ΔW_n, pooled) and the downstream labels (one-hot), minus the same
//!   CKA for the base model. CKA with the label matrix is centred kernel-target alignment: how well the module's
//!   features already separate the downstream classes. Subtracting the base model's value makes the measure
//!   comparable across downstream tasks.

use crate::engine::kernels::Pooling;
use crate::lora::bank::Composition;
use crate::lora::peft::Adapter;
use crate::methods::bank::attach_bank;
use crate::methods::common::{features, Encoded};
use crate::models::classifier::Classifier;
use crate::models::encoder::Encoder;
use anyhow::Result;

/// Linear CKA between `x` `[n, dx]` and `y` `[n, dy]` (rows are the same examples):
/// ‖Ycᵀ Xc‖²_F / (‖Xcᵀ Xc‖_F ‖Ycᵀ Yc‖_F) with column-centred Xc, Yc; computed in f64. In [0, 1]; invariant to
/// orthogonal transforms and isotropic scaling of either side. 0 when either side is constant.
pub fn linear_cka(x: &[f32], y: &[f32], n: usize, dx: usize, dy: usize) -> f64 {
    assert_eq!(x.len(), n * dx);
    assert_eq!(y.len(), n * dy);
    let centre = |m: &[f32], d: usize| -> Vec<f64> {
        let mut mean = vec![0.0f64; d];
        for r in 0..n {
            for j in 0..d {
                mean[j] += m[r * d + j] as f64;
            }
        }
        mean.iter_mut().for_each(|v| *v /= n.max(1) as f64);
        (0..n * d).map(|i| m[i] as f64 - mean[i % d]).collect()
    };
    let (xc, yc) = (centre(x, dx), centre(y, dy));
    // Gram of columns: aᵀb, [da, db].
    let cross = |a: &[f64], da: usize, b: &[f64], db: usize| -> f64 {
        let mut s = 0.0;
        for i in 0..da {
            for j in 0..db {
                let mut v = 0.0;
                for r in 0..n {
                    v += a[r * da + i] * b[r * db + j];
                }
                s += v * v;
            }
        }
        s
    };
    let xy = cross(&yc, dy, &xc, dx);
    let xx = cross(&xc, dx, &xc, dx).sqrt();
    let yy = cross(&yc, dy, &yc, dy).sqrt();
    if xx <= 0.0 || yy <= 0.0 {
        return 0.0;
    }
    xy / (xx * yy)
}

/// One-hot label matrix `[n, classes]`.
pub fn one_hot(labels: &[usize], classes: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        y[i * classes + l] = 1.0;
    }
    y
}

/// CKA gain of each bank module for the (encoded) downstream examples: CKA(features under base + ΔW_n, labels)
/// − CKA(base features, labels). Returns (base CKA, gain per module in bank order).
pub fn module_cka_gain(
    encoder: &Encoder,
    pad_id: u32,
    bank: &[Adapter],
    examples: &[Encoded],
    classes: usize,
    pooling: Pooling,
) -> Result<(f64, Vec<f64>)> {
    let labels: Vec<usize> = examples.iter().map(|e| e.label).collect();
    let y = one_hot(&labels, classes);
    let n = examples.len();
    let mut model = Classifier::new(encoder.clone(), pooling, classes, 0);
    let d = model.encoder.hidden();
    let base = linear_cka(&features(&mut model, examples, pad_id, 64)?, &y, n, d, classes);
    let paths = attach_bank(&mut model, bank, |_, n| Composition::Fixed(vec![0.0; n]))?;
    let mut gains = Vec::with_capacity(bank.len());
    for m in 0..bank.len() {
        let mut w = vec![0.0f32; bank.len()];
        w[m] = 1.0;
        crate::methods::peers::set_fixed(&mut model, &paths, &w);
        let f = features(&mut model, examples, pad_id, 64)?;
        gains.push(linear_cka(&f, &y, n, d, classes) - base);
    }
    Ok((base, gains))
}

/// Keep the `k` modules with the largest CKA gain on the few-shot examples (ties by bank order); returns their
/// bank indices in bank order.
pub fn cka_select(
    encoder: &Encoder,
    pad_id: u32,
    bank: &[Adapter],
    examples: &[Encoded],
    classes: usize,
    pooling: Pooling,
    k: usize,
) -> Result<Vec<usize>> {
    let (_, gains) = module_cka_gain(encoder, pad_id, bank, examples, classes, pooling)?;
    Ok(top_k(&gains, k))
}

/// Indices of the `k` (at least 1) largest scores, ties to the lower index, returned in increasing order.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx.truncate(k.max(1));
    idx.sort();
    idx
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    #[test]
    fn cka_is_one_on_itself_and_invariant_to_rotation_scale_and_shift() {
        let (n, d) = (40, 5);
        let x = random(n, d, 1);
        assert!((linear_cka(&x, &x, n, d, d) - 1.0).abs() < 1e-12);
        // rotate the first two columns by 30°, scale by 3, shift by 7
        let (c, s) = (30f32.to_radians().cos(), 30f32.to_radians().sin());
        let mut z = x.clone();
        for r in 0..n {
            let (a, b) = (x[r * d], x[r * d + 1]);
            z[r * d] = c * a - s * b;
            z[r * d + 1] = s * a + c * b;
        }
        z.iter_mut().for_each(|v| *v = *v * 3.0 + 7.0);
        let y = random(n, 3, 2);
        let (a, b) = (linear_cka(&x, &y, n, d, 3), linear_cka(&z, &y, n, d, 3));
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        assert!(a > 0.0 && a < 1.0);
    }

    #[test]
    fn top_k_keeps_the_largest_in_bank_order() {
        assert_eq!(top_k(&[0.1, 0.5, -0.2, 0.5, 0.3], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.1, 0.5, -0.2, 0.5, 0.3], 3), vec![1, 3, 4]);
        assert_eq!(top_k(&[0.1, 0.5], 0), vec![1]);
        assert_eq!(top_k(&[0.1, 0.5], 9), vec![0, 1]);
    }

    #[test]
    fn cka_by_hand_and_label_alignment_orders_features() {
        // 1-D x and y: CKA = squared Pearson correlation.
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let y = [1.0f32, 3.0, 2.0, 4.0];
        // centred: x (-1.5,-0.5,0.5,1.5), y (-1.5,0.5,-0.5,1.5); xy = 4, xx = 5, yy = 5 → r = 0.8
        assert!((linear_cka(&x, &y, 4, 1, 1) - 0.64).abs() < 1e-12);
        // features that separate the classes align better with the labels than noise does
        let labels = [0usize, 0, 1, 1, 2, 2];
        let yl = one_hot(&labels, 3);
        let good: Vec<f32> = labels.iter().flat_map(|&l| [l as f32, (l * l) as f32]).collect();
        let noise = random(6, 2, 3);
        assert!(linear_cka(&good, &yl, 6, 2, 3) > linear_cka(&noise, &yl, 6, 2, 3));
        assert_eq!(linear_cka(&[1.0; 6], &yl, 6, 1, 3), 0.0);
    }
}

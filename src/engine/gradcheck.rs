//! Finite-difference checks of every kernel's backward pass.
//!
//! Each test builds a scalar loss `L = Σ r_i·y_i` with fixed random `r`, computes the analytic gradient with
//! the kernel's backward, and compares it with central differences of `L` in every (or a sample of) input
//! coordinates.

use super::attention::{attention_backward, attention_forward, AttnSpec};
use super::kernels::*;
use rand::{Rng, SeedableRng};

pub(crate) fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Compare `analytic` with central differences of `loss` around `x` (perturbing `x[i]` by ±eps).
pub(crate) fn fd_check(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    eps: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let step = (x.len() / 60).max(1);
    let mut worst = 0.0f64;
    for i in (0..x.len()).step_by(step) {
        let orig = xp[i];
        xp[i] = orig + eps;
        let lp = loss(&xp);
        xp[i] = orig - eps;
        let lm = loss(&xp);
        xp[i] = orig;
        let num = (lp - lm) / (2.0 * eps as f64);
        let err = (num - analytic[i] as f64).abs() / (1.0 + num.abs().max(analytic[i].abs() as f64));
        worst = worst.max(err);
        assert!(err < tol, "{name}[{i}]: analytic {} vs numeric {num} (err {err:.2e})", analytic[i]);
    }
    assert!(worst.is_finite());
}

#[test]
fn linear_backward_matches_fd() {
    let (rows, din, dout) = (5, 7, 4);
    let x = rand_vec(rows * din, 1, 1.0);
    let w = rand_vec(dout * din, 2, 1.0);
    let b = rand_vec(dout, 3, 1.0);
    let r = rand_vec(rows * dout, 4, 1.0);
    let f = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; rows * dout];
        linear_forward(x, w, Some(b), rows, din, dout, &mut y);
        dot(&y, &r)
    };
    let mut dx = vec![0.0; rows * din];
    let mut dw = vec![0.0; dout * din];
    let mut db = vec![0.0; dout];
    linear_backward_input(&r, &w, rows, din, dout, &mut dx, false);
    linear_backward_weight(&r, &x, rows, din, dout, 1.0, &mut dw);
    bias_backward(&r, rows, dout, &mut db);
    fd_check("linear dx", &x, &dx, 1e-2, 1e-3, |p| f(p, &w, &b));
    fd_check("linear dW", &w, &dw, 1e-2, 1e-3, |p| f(&x, p, &b));
    fd_check("linear db", &b, &db, 1e-2, 1e-3, |p| f(&x, &w, p));
}

#[test]
fn layernorm_backward_matches_fd() {
    let (rows, d) = (40, 13); // more than one ROW_CHUNK
    let x = rand_vec(rows * d, 5, 2.0);
    let g = rand_vec(d, 6, 1.0);
    let be = rand_vec(d, 7, 1.0);
    let r = rand_vec(rows * d, 8, 1.0);
    let f = |x: &[f32], g: &[f32], be: &[f32]| {
        let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(x, g, be, 1e-5, d, &mut y, &mut m, &mut s);
        dot(&y, &r)
    };
    let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
    layernorm_forward(&x, &g, &be, 1e-5, d, &mut y, &mut m, &mut s);
    let mut dx = vec![0.0; rows * d];
    let (mut dg, mut db) = (vec![0.0; d], vec![0.0; d]);
    layernorm_backward(&r, &x, &m, &s, &g, d, &mut dx, false, Some((&mut dg, &mut db)));
    fd_check("layernorm dx", &x, &dx, 1e-2, 2e-3, |p| f(p, &g, &be));
    fd_check("layernorm dgamma", &g, &dg, 1e-2, 2e-3, |p| f(&x, p, &be));
    fd_check("layernorm dbeta", &be, &db, 1e-2, 2e-3, |p| f(&x, &g, p));
    // accumulate mode adds
    let mut dx2 = dx.clone();
    layernorm_backward(&r, &x, &m, &s, &g, d, &mut dx2, true, None);
    for (a, b) in dx2.iter().zip(&dx) {
        assert!((a - 2.0 * b).abs() < 1e-5);
    }
}

#[test]
fn gelu_backward_matches_fd_both_forms() {
    let x = rand_vec(200, 9, 4.0);
    let r = rand_vec(200, 10, 1.0);
    for kind in [Gelu::Erf, Gelu::Tanh] {
        let f = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            gelu_forward(kind, x, &mut y);
            dot(&y, &r)
        };
        let mut d = r.clone();
        gelu_backward_inplace(kind, &x, &mut d);
        fd_check("gelu", &x, &d, 1e-2, 1e-3, f);
    }
    // the two forms agree to ~1e-3 and match known values
    assert!((Gelu::Erf.f(1.0) - 0.841_344_7).abs() < 1e-6);
    assert!((Gelu::Tanh.f(1.0) - 0.841_192).abs() < 1e-5);
}

/// Naive reference of the attention forward in f64 (see `engine::attention` for the maths).
fn attention_reference(sp: AttnSpec, q: &[f32], k: &[f32], v: &[f32], mask: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let AttnSpec { batch, q_len: sq, k_len: sk, heads, kv_heads, head_dim: dh, causal, scale } = sp;
    let (qd, kd) = (sp.q_dim(), sp.kv_dim());
    let mut ctx = vec![0.0f32; batch * sq * qd];
    for b in 0..batch {
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for i in 0..sq {
                let seen: Vec<usize> = (0..sk).filter(|&j| mask[b * sk + j] != 0.0 && (!causal || j <= i)).collect();
                let s: Vec<f64> = seen
                    .iter()
                    .map(|&j| {
                        let dotqk: f64 = (0..dh)
                            .map(|e| {
                                q[(b * sq + i) * qd + h * dh + e] as f64 * k[(b * sk + j) * kd + g * dh + e] as f64
                            })
                            .sum();
                        scale as f64 * dotqk + bias.map_or(0.0, |bs| bs[(h * sq + i) * sk + j] as f64)
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for e in 0..dh {
                    let c: f64 = seen
                        .iter()
                        .zip(&s)
                        .map(|(&j, x)| (x - mx).exp() / z * v[(b * sk + j) * kd + g * dh + e] as f64)
                        .sum();
                    ctx[(b * sq + i) * qd + h * dh + e] = c as f32;
                }
            }
        }
    }
    ctx
}

/// The one attention kernel with each of its features, alone and together: the forward against a naive
/// reference, hidden keys at exactly zero weight, and the backward against finite differences.
#[test]
fn attention_backward_matches_fd_for_every_feature() {
    let base = AttnSpec::new(2, 5, 2, 3);
    let cases: Vec<(&str, AttnSpec, bool)> = vec![
        // BERT / ViT: bidirectional, key padding, 1/√d
        ("padding", base, false),
        // Llama: causal grouped-query attention
        ("causal gqa", AttnSpec { batch: 3, heads: 4, kv_heads: 2, causal: true, ..base }, false),
        // T5 encoder: position bias, no scale
        ("bias", AttnSpec { scale: 1.0, ..base }, true),
        // T5 cross-attention: 3 queries over 5 keys, no bias
        ("cross", AttnSpec { q_len: 3, scale: 1.0, ..base }, false),
        // T5 decoder self-attention: causal with bias
        ("causal bias", AttnSpec { q_len: 4, k_len: 4, causal: true, scale: 1.0, ..base }, true),
        // everything at once: multi-query, causal, cross lengths, bias and an arbitrary scale
        (
            "all",
            AttnSpec { batch: 3, q_len: 4, k_len: 6, heads: 3, kv_heads: 1, causal: true, scale: 0.7, ..base },
            true,
        ),
    ];
    for (name, sp, with_bias) in cases {
        let (sq, sk, batch) = (sp.q_len, sp.k_len, sp.batch);
        let (nq, nk) = (batch * sq * sp.q_dim(), batch * sk * sp.kv_dim());
        let q = rand_vec(nq, 11, 1.0);
        let k = rand_vec(nk, 12, 1.0);
        let v = rand_vec(nk, 13, 1.0);
        let r = rand_vec(nq, 14, 1.0);
        let bias = with_bias.then(|| rand_vec(sp.heads * sq * sk, 15, 1.0));
        let bias = bias.as_deref();
        // row 0 full, row 1 right-padded by 2, row 2 (if any) left-padded by 2
        let mut mask = vec![1.0f32; batch * sk];
        mask[2 * sk - 2..2 * sk].fill(0.0);
        if batch > 2 {
            mask[2 * sk..2 * sk + 2].fill(0.0);
        }
        let run = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut ctx = vec![0.0; nq];
            let mut p = vec![0.0; sp.probs_len()];
            attention_forward(sp, q, k, v, &mask, bias, &mut ctx, &mut p);
            (ctx, p)
        };
        let (ctx, p) = run(&q, &k, &v);
        let want = attention_reference(sp, &q, &k, &v, &mask, bias);
        for (i, (a, b)) in ctx.iter().zip(&want).enumerate() {
            assert!((a - b).abs() < 1e-5, "{name}: ctx[{i}] {a} vs reference {b}");
        }
        for b in 0..batch {
            for h in 0..sp.heads {
                for i in 0..sq {
                    let row = &p[((b * sp.heads + h) * sq + i) * sk..][..sk];
                    let seen = |j: usize| mask[b * sk + j] != 0.0 && (!sp.causal || j <= i);
                    assert!(row.iter().enumerate().all(|(j, &x)| seen(j) || x == 0.0), "{name}: b{b} h{h} i{i}");
                    let want = if (0..sk).any(seen) { 1.0 } else { 0.0 };
                    assert!((row.iter().sum::<f32>() - want).abs() < 1e-6, "{name}: b{b} h{h} i{i} sum");
                }
            }
        }
        // dk, dv start non-zero: the backward overwrites them
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![1.0; nk], vec![1.0; nk]);
        attention_backward(sp, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv);
        let f = |q: &[f32], k: &[f32], v: &[f32]| dot(&run(q, k, v).0, &r);
        fd_check(&format!("{name} dq"), &q, &dq, 1e-2, 2e-3, |x| f(x, &k, &v));
        fd_check(&format!("{name} dk"), &k, &dk, 1e-2, 2e-3, |x| f(&q, x, &v));
        fd_check(&format!("{name} dv"), &v, &dv, 1e-2, 2e-3, |x| f(&q, &k, x));
    }
}

#[test]
fn rmsnorm_backward_matches_fd() {
    let (rows, d) = (40, 11); // more than one ROW_CHUNK
    let x = rand_vec(rows * d, 31, 2.0);
    let w = rand_vec(d, 32, 1.0);
    let r = rand_vec(rows * d, 33, 1.0);
    let f = |x: &[f32], w: &[f32]| {
        let (mut y, mut s) = (vec![0.0; rows * d], vec![0.0; rows]);
        rmsnorm_forward(x, w, 1e-6, d, &mut y, &mut s);
        dot(&y, &r)
    };
    let (mut y, mut s) = (vec![0.0; rows * d], vec![0.0; rows]);
    rmsnorm_forward(&x, &w, 1e-6, d, &mut y, &mut s);
    // matches the definition directly
    for row in [0, 17, 39] {
        let ms: f32 = x[row * d..(row + 1) * d].iter().map(|v| v * v).sum::<f32>() / d as f32;
        for i in 0..d {
            let want = w[i] * x[row * d + i] / (ms + 1e-6).sqrt();
            assert!((y[row * d + i] - want).abs() < 1e-5);
        }
    }
    let mut dx = vec![0.0; rows * d];
    let mut dw = vec![0.0; d];
    rmsnorm_backward(&r, &x, &s, &w, d, &mut dx, false, Some(&mut dw));
    fd_check("rmsnorm dx", &x, &dx, 1e-2, 2e-3, |p| f(p, &w));
    fd_check("rmsnorm dw", &w, &dw, 1e-2, 2e-3, |p| f(&x, p));
    // accumulate mode adds
    let mut dx2 = dx.clone();
    rmsnorm_backward(&r, &x, &s, &w, d, &mut dx2, true, None);
    for (a, b) in dx2.iter().zip(&dx) {
        assert!((a - 2.0 * b).abs() < 1e-5);
    }
}

#[test]
fn pooling_and_cross_entropy_backward_match_fd() {
    let (b, s, d) = (3, 4, 5);
    let h = rand_vec(b * s * d, 15, 1.0);
    let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    let r = rand_vec(b * d, 16, 1.0);
    for mode in [Pooling::Mean, Pooling::Cls] {
        let f = |h: &[f32]| {
            let mut o = vec![0.0; b * d];
            pool_forward(mode, h, &mask, b, s, d, &mut o);
            dot(&o, &r)
        };
        let mut dh = vec![0.0; b * s * d];
        pool_backward(mode, &r, &mask, b, s, d, &mut dh);
        fd_check("pool", &h, &dh, 1e-2, 1e-3, f);
    }
    let classes = 4;
    let logits = rand_vec(b * classes, 17, 3.0);
    let labels = vec![0usize, 3, 2];
    let f = |l: &[f32]| {
        let (mut p, mut d) = (vec![0.0; b * classes], vec![0.0; b * classes]);
        softmax_cross_entropy(l, &labels, classes, &mut p, &mut d) as f64
    };
    let (mut p, mut dl) = (vec![0.0; b * classes], vec![0.0; b * classes]);
    let loss = softmax_cross_entropy(&logits, &labels, classes, &mut p, &mut dl);
    assert!(loss > 0.0);
    fd_check("cross-entropy", &logits, &dl, 1e-2, 1e-3, f);
}

#[test]
fn reductions_do_not_depend_on_thread_count() {
    let (rows, d) = (100, 33);
    let x = rand_vec(rows * d, 18, 1.0);
    let g = rand_vec(d, 19, 1.0);
    let r = rand_vec(rows * d, 20, 1.0);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let (mut y, mut m, mut s) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
            layernorm_forward(&x, &g, &g, 1e-5, d, &mut y, &mut m, &mut s);
            let mut dx = vec![0.0; rows * d];
            let (mut dg, mut db) = (vec![0.0; d], vec![0.0; d]);
            layernorm_backward(&r, &x, &m, &s, &g, d, &mut dx, false, Some((&mut dg, &mut db)));
            let mut bb = vec![0.0; d];
            bias_backward(&r, rows, d, &mut bb);
            let (mut ry, mut rs) = (vec![0.0; rows * d], vec![0.0; rows]);
            rmsnorm_forward(&x, &g, 1e-6, d, &mut ry, &mut rs);
            let (mut rdx, mut rdw) = (vec![0.0; rows * d], vec![0.0; d]);
            rmsnorm_backward(&r, &x, &rs, &g, d, &mut rdx, false, Some(&mut rdw));
            (dx, dg, db, bb, ry, rdx, rdw)
        })
    };
    assert_eq!(run(1), run(3));
}

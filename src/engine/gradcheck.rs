//! Finite-difference checks of every kernel's backward pass.
//!
//! Each test builds a scalar loss `L = Σ r_i·y_i` with fixed random `r`, computes the analytic gradient with
//! the kernel's backward, and compares it with central differences of `L` in every (or a sample of) input
//! coordinates.

use super::attention::{attention_backward, attention_forward, AttnShape};
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

#[test]
fn attention_backward_matches_fd_with_padding() {
    let sh = AttnShape { batch: 2, seq: 5, heads: 2, head_dim: 3 };
    let n = sh.batch * sh.seq * sh.d();
    let q = rand_vec(n, 11, 1.0);
    let k = rand_vec(n, 12, 1.0);
    let v = rand_vec(n, 13, 1.0);
    let r = rand_vec(n, 14, 1.0);
    let mask = vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0];
    let f = |q: &[f32], k: &[f32], v: &[f32]| {
        let mut ctx = vec![0.0; n];
        let mut p = vec![0.0; sh.probs_len()];
        attention_forward(sh, q, k, v, &mask, &mut ctx, &mut p);
        dot(&ctx, &r)
    };
    let mut ctx = vec![0.0; n];
    let mut p = vec![0.0; sh.probs_len()];
    attention_forward(sh, &q, &k, &v, &mask, &mut ctx, &mut p);
    // padded keys get zero weight
    for b in 1..2 {
        for h in 0..2 {
            for i in 0..5 {
                let row = &p[((b * 2 + h) * 5 + i) * 5..((b * 2 + h) * 5 + i + 1) * 5];
                assert_eq!(row[3], 0.0);
                assert_eq!(row[4], 0.0);
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    attention_backward(sh, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv);
    fd_check("attention dq", &q, &dq, 1e-2, 2e-3, |x| f(x, &k, &v));
    fd_check("attention dk", &k, &dk, 1e-2, 2e-3, |x| f(&q, x, &v));
    fd_check("attention dv", &v, &dv, 1e-2, 2e-3, |x| f(&q, &k, x));
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
            (dx, dg, db, bb)
        })
    };
    assert_eq!(run(1), run(3));
}

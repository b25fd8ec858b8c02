//! What T5 needs beyond the shared kernels: its RMS-style layer norm (no mean subtraction, no bias), ReLU,
//! relative position buckets, and attention with an additive position bias, an optional causal mask, separate
//! query and key lengths (cross-attention) and no `1/√d` scaling. Forward and backward each.
//!
//! Layouts as in [`super::attention`]: `q` is `[batch·q_len, heads·head_dim]`, `k`/`v` `[batch·k_len, …]`,
//! heads read in place through strides; probabilities `[batch, heads, q_len, k_len]` are kept for backward.

use super::gemm::matmul_strided;
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------------------
// T5 layer norm: y = x / sqrt(mean(x²) + eps) · w.

/// Forward per row of `d`; stores `rstd = 1/sqrt(mean(x²) + eps)` per row for the backward pass.
pub fn t5_norm_forward(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) {
    let rows = x.len() / d;
    y[..rows * d].par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd[..rows].par_iter_mut()).for_each(|((yr, xr), rs)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..d {
            yr[i] = xr[i] * r * w[i];
        }
        *rs = r;
    });
}

/// Input gradient of [`t5_norm_forward`]: `dx = r·(g − x̂·mean(g·x̂))` with `g = dy·w`, `x̂ = x·r`. Writes `dx`,
/// or adds to it with `accumulate`. (The weight is frozen in every T5 use, so it gets no gradient.)
#[allow(clippy::too_many_arguments)]
pub fn t5_norm_backward(dy: &[f32], x: &[f32], rstd: &[f32], w: &[f32], d: usize, dx: &mut [f32], accumulate: bool) {
    let rows = x.len() / d;
    dx[..rows * d].par_chunks_mut(d).enumerate().for_each(|(r, dxr)| {
        let xr = &x[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let rs = rstd[r];
        let mut s = 0.0f32;
        for i in 0..d {
            s += dyr[i] * w[i] * xr[i] * rs;
        }
        let m = s / d as f32;
        for i in 0..d {
            let v = rs * (dyr[i] * w[i] - xr[i] * rs * m);
            if accumulate {
                dxr[i] += v;
            } else {
                dxr[i] = v;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// ReLU.

/// `y = max(x, 0)` elementwise.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    y[..x.len()].par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yc, xc)| {
        for (o, v) in yc.iter_mut().zip(xc) {
            *o = v.max(0.0);
        }
    });
}

/// `d *= [x > 0]` in place (`d` holds `dy` on entry).
pub fn relu_backward_inplace(x: &[f32], d: &mut [f32]) {
    d[..x.len()].par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(dc, xc)| {
        for (g, v) in dc.iter_mut().zip(xc) {
            if *v <= 0.0 {
                *g = 0.0;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// Relative position buckets (Mesh TensorFlow's scheme, as transformers' `T5Attention`).

/// Bucket of `relative = key_pos − query_pos`. Bidirectional (encoder): half the buckets for keys after the
/// query. Causal (decoder): only non-positive relative positions are distinguished. Within a half, the first
/// `n/2` distances are exact and the rest logarithmic up to `max_distance`.
pub fn relative_position_bucket(relative: i64, bidirectional: bool, num_buckets: usize, max_distance: usize) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let rp = if bidirectional {
        nb /= 2;
        if relative > 0 {
            bucket += nb;
        }
        relative.abs()
    } else {
        (-relative).max(0)
    };
    let max_exact = nb / 2;
    if rp < max_exact {
        bucket += rp;
    } else {
        // f32 arithmetic as transformers does it (the denominator is a Python float, i.e. f64, then cast).
        let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let v = ((rp as f32 / max_exact as f32).ln() / denom * (nb - max_exact) as f32) as i64;
        bucket += (max_exact + v).min(nb - 1);
    }
    bucket as usize
}

/// Position bias `[heads, q_len, k_len]` from the bucket table `[num_buckets, heads]`.
pub fn position_bias(
    table: &[f32],
    heads: usize,
    q_len: usize,
    k_len: usize,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; heads * q_len * k_len];
    for i in 0..q_len {
        for j in 0..k_len {
            let b = relative_position_bucket(j as i64 - i as i64, bidirectional, num_buckets, max_distance);
            for h in 0..heads {
                out[(h * q_len + i) * k_len + j] = table[b * heads + h];
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Attention with position bias.

/// Shape of one T5 attention call.
#[derive(Clone, Copy, Debug)]
pub struct T5AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub k_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl T5AttnShape {
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.q_len * self.k_len
    }
}

/// `ctx = softmax(q·kᵀ + bias + mask)·v` per head. `kmask` `[batch, k_len]` (0 = padded key, exactly zero
/// weight), `causal` hides keys after the query, `bias` `[heads, q_len, k_len]` is shared by the batch.
#[allow(clippy::too_many_arguments)]
pub fn t5_attention_forward(
    sh: T5AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kmask: &[f32],
    causal: bool,
    bias: Option<&[f32]>,
    ctx: &mut [f32],
    probs: &mut [f32],
) {
    let T5AttnShape { batch, q_len: sq, k_len: sk, heads, head_dim: dh } = sh;
    let d = sh.inner();
    ctx[..batch * sq * d]
        .par_chunks_mut(sq * d)
        .zip(probs[..sh.probs_len()].par_chunks_mut(heads * sq * sk))
        .enumerate()
        .for_each(|(b, (ctx_b, p_b))| {
            let m = &kmask[b * sk..(b + 1) * sk];
            for h in 0..heads {
                let p = &mut p_b[h * sq * sk..(h + 1) * sq * sk];
                let qo = b * sq * d + h * dh;
                let ko = b * sk * d + h * dh;
                matmul_strided(sq, sk, dh, 1.0, &q[qo..], d, 1, &k[ko..], 1, d, 0.0, p, sk);
                if let Some(bias) = bias {
                    p.iter_mut().zip(&bias[h * sq * sk..(h + 1) * sq * sk]).for_each(|(x, b)| *x += b);
                }
                for (i, row) in p.chunks_mut(sk).enumerate() {
                    let visible = |j: usize| m[j] != 0.0 && (!causal || j <= i);
                    let mut mx = f32::NEG_INFINITY;
                    for (j, x) in row.iter().enumerate() {
                        if visible(j) && *x > mx {
                            mx = *x;
                        }
                    }
                    let mut sum = 0.0f32;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if visible(j) { (*x - mx).exp() } else { 0.0 };
                        sum += *x;
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                matmul_strided(sq, dh, sk, 1.0, p, sk, 1, &v[ko..], d, 1, 0.0, &mut ctx_b[h * dh..], d);
            }
        });
}

/// Backward of [`t5_attention_forward`] from `dctx` and the cached `probs`: writes `dq` (`[batch·q_len, inner]`),
/// `dk`, `dv` (`[batch·k_len, inner]`), overwriting. The bias is frozen and gets no gradient.
#[allow(clippy::too_many_arguments)]
pub fn t5_attention_backward(
    sh: T5AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let T5AttnShape { batch, q_len: sq, k_len: sk, heads, head_dim: dh } = sh;
    let d = sh.inner();
    dq[..batch * sq * d]
        .par_chunks_mut(sq * d)
        .zip(dk[..batch * sk * d].par_chunks_mut(sk * d))
        .zip(dv[..batch * sk * d].par_chunks_mut(sk * d))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            let mut ds = vec![0.0f32; sq * sk];
            for h in 0..heads {
                let p = &probs[(b * heads + h) * sq * sk..(b * heads + h + 1) * sq * sk];
                let qo = b * sq * d + h * dh;
                let ko = b * sk * d + h * dh;
                // dP = dctx·Vᵀ
                matmul_strided(sq, sk, dh, 1.0, &dctx[qo..], d, 1, &v[ko..], 1, d, 0.0, &mut ds, sk);
                // dV = Pᵀ·dctx
                matmul_strided(sk, dh, sq, 1.0, p, 1, sk, &dctx[qo..], d, 1, 0.0, &mut dv_b[h * dh..], d);
                // dS = P ⊙ (dP − Σ_j dP·P)
                for (dr, pr) in ds.chunks_mut(sk).zip(p.chunks(sk)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (g, pv) in dr.iter_mut().zip(pr) {
                        *g = pv * (*g - dot);
                    }
                }
                // dQ = dS·K, dK = dSᵀ·Q
                matmul_strided(sq, dh, sk, 1.0, &ds, sk, 1, &k[ko..], d, 1, 0.0, &mut dq_b[h * dh..], d);
                matmul_strided(sk, dh, sq, 1.0, &ds, 1, sk, &q[qo..], d, 1, 0.0, &mut dk_b[h * dh..], d);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{fd_check, rand_vec};

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn t5_norm_backward_matches_fd() {
        let (rows, d) = (5, 7);
        let x = rand_vec(rows * d, 1, 1.5);
        let w = rand_vec(d, 2, 1.0);
        let r = rand_vec(rows * d, 3, 1.0);
        let f = |x: &[f32]| {
            let (mut y, mut rs) = (vec![0.0; rows * d], vec![0.0; rows]);
            t5_norm_forward(x, &w, 1e-6, d, &mut y, &mut rs);
            dot(&y, &r)
        };
        let (mut y, mut rs) = (vec![0.0; rows * d], vec![0.0; rows]);
        t5_norm_forward(&x, &w, 1e-6, d, &mut y, &mut rs);
        let mut dx = vec![1.0; rows * d];
        t5_norm_backward(&r, &x, &rs, &w, d, &mut dx, true);
        dx.iter_mut().for_each(|v| *v -= 1.0);
        fd_check("t5_norm dx", &x, &dx, 1e-3, 2e-3, f);
    }

    #[test]
    fn relu_backward_matches_fd() {
        let x: Vec<f32> = rand_vec(40, 5, 1.0).iter().map(|v| if v.abs() < 0.05 { 0.5 } else { *v }).collect();
        let r = rand_vec(40, 6, 1.0);
        let f = |x: &[f32]| {
            let mut y = vec![0.0; 40];
            relu_forward(x, &mut y);
            dot(&y, &r)
        };
        let mut d = r.clone();
        relu_backward_inplace(&x, &mut d);
        fd_check("relu", &x, &d, 1e-3, 1e-3, f);
    }

    #[test]
    fn t5_attention_backward_matches_fd() {
        for (causal, sq, sk) in [(false, 3, 5), (true, 4, 4)] {
            let sh = T5AttnShape { batch: 2, q_len: sq, k_len: sk, heads: 2, head_dim: 3 };
            let d = sh.inner();
            let q = rand_vec(2 * sq * d, 10, 1.0);
            let k = rand_vec(2 * sk * d, 11, 1.0);
            let v = rand_vec(2 * sk * d, 12, 1.0);
            let bias = rand_vec(2 * sq * sk, 13, 1.0);
            let mut mask = vec![1.0f32; 2 * sk];
            if !causal {
                mask[2 * sk - 1] = 0.0;
            }
            let r = rand_vec(2 * sq * d, 14, 1.0);
            let run = |q: &[f32], k: &[f32], v: &[f32]| {
                let mut ctx = vec![0.0; 2 * sq * d];
                let mut p = vec![0.0; sh.probs_len()];
                t5_attention_forward(sh, q, k, v, &mask, causal, Some(&bias), &mut ctx, &mut p);
                (ctx, p)
            };
            let (_, p) = run(&q, &k, &v);
            let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            t5_attention_backward(sh, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv);
            fd_check("t5 attn dq", &q, &dq, 1e-3, 3e-3, |x| dot(&run(x, &k, &v).0, &r));
            fd_check("t5 attn dk", &k, &dk, 1e-3, 3e-3, |x| dot(&run(&q, x, &v).0, &r));
            fd_check("t5 attn dv", &v, &dv, 1e-3, 3e-3, |x| dot(&run(&q, &k, x).0, &r));
            if causal {
                // Query 0 sees only key 0.
                assert!(p[1..sk].iter().all(|&x| x == 0.0));
            }
        }
    }

    #[test]
    fn buckets_cover_exact_and_log_ranges() {
        // Bidirectional, 8 buckets, max 12: |rel| 0,1 exact; then log; keys after the query use buckets 4..8.
        assert_eq!(relative_position_bucket(0, true, 8, 12), 0);
        assert_eq!(relative_position_bucket(-1, true, 8, 12), 1);
        assert_eq!(relative_position_bucket(1, true, 8, 12), 5);
        assert_eq!(relative_position_bucket(-100, true, 8, 12), 3);
        assert_eq!(relative_position_bucket(100, true, 8, 12), 7);
        // Causal: future keys all fall in bucket 0.
        assert_eq!(relative_position_bucket(5, false, 8, 12), 0);
        assert_eq!(relative_position_bucket(-100, false, 8, 12), 7);
    }
}

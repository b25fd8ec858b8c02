//! Kernels of Llama-family decoders, forward and backward each: RMSNorm, rotary position embeddings (Hugging
//! Face's `rotate_half` convention, default rope only), the SiLU-gated MLP activation (SwiGLU) and causal
//! grouped-query attention with a key padding mask.
//!
//! Layouts follow the rest of the engine: activations `[rows, cols]` row-major with `rows = batch·seq`; Q is
//! `[rows, heads·head_dim]`, K and V `[rows, kv_heads·head_dim]` (the projections' outputs), heads read in place
//! through strides. Query head `h` uses key/value head `h / (heads / kv_heads)`, as `repeat_kv` arranges them.

use super::gemm::matmul_strided;
use super::kernels::ROW_CHUNK;
use rayon::prelude::*;

// ---------------------------------------------------------------------------------------------------------
// RMSNorm: y = x / sqrt(mean(x²) + eps) · w.

/// Writes `y` and the per-row `rstd = 1/sqrt(mean(x²) + eps)` for the backward pass.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) {
    let rows = x.len() / d;
    y[..rows * d].par_chunks_mut(d).zip(x.par_chunks(d)).zip(rstd[..rows].par_iter_mut()).for_each(|((yr, xr), rs)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for i in 0..d {
            yr[i] = w[i] * (xr[i] * r);
        }
        *rs = r;
    });
}

/// RMSNorm backward: writes (or with `accumulate` adds) `dx`; adds `dw` when given.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    d: usize,
    dx: &mut [f32],
    accumulate: bool,
    dw: Option<&mut [f32]>,
) {
    let rows = x.len() / d;
    dx[..rows * d].par_chunks_mut(d).enumerate().for_each(|(r, dxr)| {
        let xr = &x[r * d..(r + 1) * d];
        let dyr = &dy[r * d..(r + 1) * d];
        let rs = rstd[r];
        // xhat = x·rs; g = dy·w; dx = rs·(g − xhat·mean(g·xhat))
        let sgx: f32 = (0..d).map(|i| dyr[i] * w[i] * xr[i] * rs).sum();
        let mgx = sgx / d as f32;
        for i in 0..d {
            let v = rs * (dyr[i] * w[i] - xr[i] * rs * mgx);
            if accumulate {
                dxr[i] += v;
            } else {
                dxr[i] = v;
            }
        }
    });
    if let Some(dw) = dw {
        let partials: Vec<f32> = (0..rows.div_ceil(ROW_CHUNK))
            .into_par_iter()
            .flat_map_iter(|c| {
                let mut acc = vec![0.0f32; d];
                for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                    for i in 0..d {
                        acc[i] += dy[r * d + i] * x[r * d + i] * rstd[r];
                    }
                }
                acc
            })
            .collect();
        for part in partials.chunks(d) {
            dw.iter_mut().zip(part).for_each(|(a, p)| *a += p);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Rotary position embeddings.

/// Default rotary embedding: `inv_freq[i] = θ^(−2i/head_dim)`, angles `pos·inv_freq`, computed in f32 as
/// transformers does.
#[derive(Clone, Debug)]
pub struct Rope {
    pub head_dim: usize,
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, theta: f32) -> Self {
        let inv_freq = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32)).collect();
        Rope { head_dim, inv_freq }
    }

    /// `cos` and `sin` tables `[seq, head_dim/2]` for positions `0..seq`.
    pub fn tables(&self, seq: usize) -> (Vec<f32>, Vec<f32>) {
        let half = self.head_dim / 2;
        let mut cos = vec![0.0; seq * half];
        let mut sin = vec![0.0; seq * half];
        for p in 0..seq {
            for i in 0..half {
                let a = p as f32 * self.inv_freq[i];
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
        }
        (cos, sin)
    }
}

/// Rotate every head of `x` (`[batch·seq, heads·head_dim]`, row `r` at position `r % seq`) in place:
/// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = (−x₂, x₁)`. With `inverse` it rotates by the opposite
/// angle, which is the backward pass (the transpose of a rotation).
pub fn rope_apply(x: &mut [f32], seq: usize, heads: usize, head_dim: usize, cos: &[f32], sin: &[f32], inverse: bool) {
    let half = head_dim / 2;
    let width = heads * head_dim;
    let sgn = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let p = r % seq;
        let (c, s) = (&cos[p * half..(p + 1) * half], &sin[p * half..(p + 1) * half]);
        for h in row.chunks_mut(head_dim) {
            for i in 0..half {
                let (a, b) = (h[i], h[i + half]);
                let si = sgn * s[i];
                h[i] = a * c[i] - b * si;
                h[i + half] = b * c[i] + a * si;
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// SwiGLU: h = silu(gate) ⊙ up.

#[inline]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = silu(gate)·up` elementwise.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out[..gate.len()].par_chunks_mut(4096).zip(gate.par_chunks(4096).zip(up.par_chunks(4096))).for_each(
        |(o, (g, u))| {
            for i in 0..o.len() {
                o[i] = g[i] * sigmoid(g[i]) * u[i];
            }
        },
    );
}

/// From `dh`, writes `dgate = dh·up·silu'(gate)` and `dup = dh·silu(gate)`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let n = gate.len();
    dgate[..n].par_chunks_mut(4096).zip(dup[..n].par_chunks_mut(4096)).enumerate().for_each(|(c, (dg, du))| {
        let off = c * 4096;
        for i in 0..dg.len() {
            let (g, u, d) = (gate[off + i], up[off + i], dh[off + i]);
            let s = sigmoid(g);
            du[i] = d * g * s;
            dg[i] = d * u * s * (1.0 + g * (1.0 - s));
        }
    });
}

// ---------------------------------------------------------------------------------------------------------
// Causal grouped-query attention with a key padding mask.

/// Shape of one causal attention call.
#[derive(Clone, Copy, Debug)]
pub struct GqaShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl GqaShape {
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// Forward: writes `ctx` (`[rows, heads·head_dim]`) and `probs` (`[batch, heads, seq, seq]`). Query `i` attends
/// to keys `j ≤ i` whose `mask` entry is non-zero; a query that sees no key (a left pad) gets zero weights and a
/// zero context.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_forward(
    sh: GqaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    ctx: &mut [f32],
    probs: &mut [f32],
) {
    let GqaShape { batch, seq: s, heads, head_dim: dh, .. } = sh;
    let (qd, kd, grp) = (sh.q_dim(), sh.kv_dim(), sh.group());
    let scale = 1.0 / (dh as f32).sqrt();
    ctx[..batch * s * qd]
        .par_chunks_mut(s * qd)
        .zip(probs[..sh.probs_len()].par_chunks_mut(heads * s * s))
        .enumerate()
        .for_each(|(b, (ctx_b, p_b))| {
            let m = &mask[b * s..(b + 1) * s];
            for h in 0..heads {
                let p = &mut p_b[h * s * s..(h + 1) * s * s];
                let qoff = b * s * qd + h * dh;
                let koff = b * s * kd + (h / grp) * dh;
                matmul_strided(s, s, dh, scale, &q[qoff..], qd, 1, &k[koff..], 1, kd, 0.0, p, s);
                for (i, row) in p.chunks_mut(s).enumerate() {
                    let seen = |j: usize| j <= i && m[j] != 0.0;
                    let mut mx = f32::NEG_INFINITY;
                    for (j, x) in row.iter().enumerate() {
                        if seen(j) && *x > mx {
                            mx = *x;
                        }
                    }
                    let mut sum = 0.0f32;
                    for (j, x) in row.iter_mut().enumerate() {
                        *x = if seen(j) { (*x - mx).exp() } else { 0.0 };
                        sum += *x;
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                matmul_strided(s, dh, s, 1.0, p, s, 1, &v[koff..], kd, 1, 0.0, &mut ctx_b[h * dh..], qd);
            }
        });
}

/// Backward: from `dctx` and the cached `probs`, writes `dq`, `dk`, `dv` (overwriting; each key/value head sums
/// the gradients of the query heads that share it).
#[allow(clippy::too_many_arguments)]
pub fn causal_attention_backward(
    sh: GqaShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let GqaShape { batch, seq: s, heads, head_dim: dh, .. } = sh;
    let (qd, kd, grp) = (sh.q_dim(), sh.kv_dim(), sh.group());
    let scale = 1.0 / (dh as f32).sqrt();
    dq[..batch * s * qd]
        .par_chunks_mut(s * qd)
        .zip(dk[..batch * s * kd].par_chunks_mut(s * kd))
        .zip(dv[..batch * s * kd].par_chunks_mut(s * kd))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            dk_b.fill(0.0);
            dv_b.fill(0.0);
            let mut ds = vec![0.0f32; s * s];
            for h in 0..heads {
                let p = &probs[(b * heads + h) * s * s..(b * heads + h + 1) * s * s];
                let qoff = b * s * qd + h * dh;
                let g = h / grp;
                let koff = b * s * kd + g * dh;
                // dP = dctx·Vᵀ
                matmul_strided(s, s, dh, 1.0, &dctx[qoff..], qd, 1, &v[koff..], 1, kd, 0.0, &mut ds, s);
                // dV += Pᵀ·dctx
                matmul_strided(s, dh, s, 1.0, p, 1, s, &dctx[qoff..], qd, 1, 1.0, &mut dv_b[g * dh..], kd);
                // dS = P ⊙ (dP − Σ_j dP·P) · scale (masked entries have P = 0)
                for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (x, pv) in dr.iter_mut().zip(pr) {
                        *x = pv * (*x - dot) * scale;
                    }
                }
                // dQ = dS·K, dK += dSᵀ·Q
                matmul_strided(s, dh, s, 1.0, &ds, s, 1, &k[koff..], kd, 1, 0.0, &mut dq_b[h * dh..], qd);
                matmul_strided(s, dh, s, 1.0, &ds, 1, s, &q[qoff..], qd, 1, 1.0, &mut dk_b[g * dh..], kd);
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
        let ms: f32 = x[..d].iter().map(|v| v * v).sum::<f32>() / d as f32;
        assert!((y[3] - w[3] * x[3] / (ms + 1e-6).sqrt()).abs() < 1e-5);
        let mut dx = vec![0.0; rows * d];
        let mut dw = vec![0.0; d];
        rmsnorm_backward(&r, &x, &s, &w, d, &mut dx, false, Some(&mut dw));
        fd_check("rmsnorm dx", &x, &dx, 1e-2, 2e-3, |p| f(p, &w));
        fd_check("rmsnorm dw", &w, &dw, 1e-2, 2e-3, |p| f(&x, p));
        let mut dx2 = dx.clone();
        rmsnorm_backward(&r, &x, &s, &w, d, &mut dx2, true, None);
        for (a, b) in dx2.iter().zip(&dx) {
            assert!((a - 2.0 * b).abs() < 1e-5);
        }
    }

    #[test]
    fn rope_matches_rotate_half_and_backward_matches_fd() {
        let (batch, seq, heads, dh) = (2, 5, 3, 8);
        let rope = Rope::new(dh, 10000.0);
        let (cos, sin) = rope.tables(seq);
        let n = batch * seq * heads * dh;
        let x = rand_vec(n, 34, 1.0);
        // reference: x·cos(emb) + rotate_half(x)·sin(emb), emb = cat(freqs, freqs)
        let mut y = x.clone();
        rope_apply(&mut y, seq, heads, dh, &cos, &sin, false);
        let half = dh / 2;
        for r in 0..batch * seq {
            let p = (r % seq) as f32;
            for h in 0..heads {
                let xs = &x[r * heads * dh + h * dh..][..dh];
                for i in 0..dh {
                    let a = p * rope.inv_freq[i % half];
                    let rot = if i < half { -xs[i + half] } else { xs[i - half] };
                    let want = xs[i] * a.cos() + rot * a.sin();
                    assert!((y[r * heads * dh + h * dh + i] - want).abs() < 1e-5);
                }
            }
        }
        // position 0 is the identity; the inverse undoes the rotation
        assert_eq!(&y[..heads * dh], &x[..heads * dh]);
        let mut back = y.clone();
        rope_apply(&mut back, seq, heads, dh, &cos, &sin, true);
        assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
        let r = rand_vec(n, 35, 1.0);
        let mut g = r.clone();
        rope_apply(&mut g, seq, heads, dh, &cos, &sin, true);
        fd_check("rope dx", &x, &g, 1e-2, 1e-3, |p| {
            let mut y = p.to_vec();
            rope_apply(&mut y, seq, heads, dh, &cos, &sin, false);
            dot(&y, &r)
        });
    }

    #[test]
    fn swiglu_backward_matches_fd() {
        let n = 300;
        let g = rand_vec(n, 36, 4.0);
        let u = rand_vec(n, 37, 2.0);
        let r = rand_vec(n, 38, 1.0);
        let f = |g: &[f32], u: &[f32]| {
            let mut o = vec![0.0; n];
            swiglu_forward(g, u, &mut o);
            dot(&o, &r)
        };
        let mut o = vec![0.0; n];
        swiglu_forward(&g, &u, &mut o);
        assert!((o[0] - g[0] / (1.0 + (-g[0]).exp()) * u[0]).abs() < 1e-6);
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&g, &u, &r, &mut dg, &mut du);
        fd_check("swiglu dgate", &g, &dg, 1e-2, 1e-3, |p| f(p, &u));
        fd_check("swiglu dup", &u, &du, 1e-2, 1e-3, |p| f(&g, p));
    }

    #[test]
    fn causal_gqa_attention_backward_matches_fd_with_padding() {
        let sh = GqaShape { batch: 3, seq: 5, heads: 4, kv_heads: 2, head_dim: 3 };
        let (nq, nk) = (sh.batch * sh.seq * sh.q_dim(), sh.batch * sh.seq * sh.kv_dim());
        let q = rand_vec(nq, 39, 1.0);
        let k = rand_vec(nk, 40, 1.0);
        let v = rand_vec(nk, 41, 1.0);
        let r = rand_vec(nq, 42, 1.0);
        // row 0 full, row 1 right-padded by 2, row 2 left-padded by 2
        let mask = [1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0., 0., 1., 1., 1.];
        let f = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut ctx = vec![0.0; nq];
            let mut p = vec![0.0; sh.probs_len()];
            causal_attention_forward(sh, q, k, v, &mask, &mut ctx, &mut p);
            dot(&ctx, &r)
        };
        let mut ctx = vec![0.0; nq];
        let mut p = vec![0.0; sh.probs_len()];
        causal_attention_forward(sh, &q, &k, &v, &mask, &mut ctx, &mut p);
        for b in 0..3 {
            for h in 0..4 {
                for i in 0..5 {
                    let row = &p[((b * 4 + h) * 5 + i) * 5..][..5];
                    let visible: Vec<usize> = (0..=i).filter(|&j| mask[b * 5 + j] != 0.0).collect();
                    for (j, &pj) in row.iter().enumerate() {
                        if !visible.contains(&j) {
                            assert_eq!(pj, 0.0, "b{b} h{h} i{i} j{j}");
                        }
                    }
                    let sum: f32 = row.iter().sum();
                    let want = if visible.is_empty() { 0.0 } else { 1.0 };
                    assert!((sum - want).abs() < 1e-6);
                }
            }
        }
        // the first query of a full row sees only itself: its context is V of its key/value head
        for h in 0..4 {
            let g = h / 2;
            for e in 0..3 {
                assert!((ctx[h * 3 + e] - v[g * 3 + e]).abs() < 1e-6);
            }
        }
        let (mut dq, mut dk, mut dv) = (vec![0.0; nq], vec![1.0; nk], vec![1.0; nk]);
        causal_attention_backward(sh, &q, &k, &v, &p, &r, &mut dq, &mut dk, &mut dv);
        fd_check("gqa dq", &q, &dq, 1e-2, 2e-3, |x| f(x, &k, &v));
        fd_check("gqa dk", &k, &dk, 1e-2, 2e-3, |x| f(&q, x, &v));
        fd_check("gqa dv", &v, &dv, 1e-2, 2e-3, |x| f(&q, &k, x));
    }
}

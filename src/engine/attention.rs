//! Multi-head scaled-dot-product attention with a key padding mask, forward and backward.
//!
//! `q`, `k`, `v`, `ctx` are `[batch·seq, heads·head_dim]` row-major (the layout the Q/K/V projections produce);
//! heads are read in place through strides. `mask` is `[batch, seq]` with 1 for a token and 0 for padding; padded
//! keys get exactly zero attention weight (as adding the dtype's minimum does in Hugging Face models). The
//! probabilities `[batch, heads, seq, seq]` are kept for the backward pass. Batches run in parallel.

use super::gemm::matmul_strided;
use rayon::prelude::*;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    pub fn d(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }
}

/// Forward: writes `ctx` and `probs`.
pub fn attention_forward(
    sh: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    ctx: &mut [f32],
    probs: &mut [f32],
) {
    let AttnShape { batch, seq: s, heads, head_dim: dh } = sh;
    let d = sh.d();
    let scale = 1.0 / (dh as f32).sqrt();
    ctx[..batch * s * d]
        .par_chunks_mut(s * d)
        .zip(probs[..sh.probs_len()].par_chunks_mut(heads * s * s))
        .enumerate()
        .for_each(|(b, (ctx_b, p_b))| {
            let base = b * s * d;
            let m = &mask[b * s..(b + 1) * s];
            for h in 0..heads {
                let p = &mut p_b[h * s * s..(h + 1) * s * s];
                let off = base + h * dh;
                matmul_strided(s, s, dh, scale, &q[off..], d, 1, &k[off..], 1, d, 0.0, p, s);
                for row in p.chunks_mut(s) {
                    let mut mx = f32::NEG_INFINITY;
                    for (x, &mk) in row.iter().zip(m) {
                        if mk != 0.0 && *x > mx {
                            mx = *x;
                        }
                    }
                    let mut sum = 0.0f32;
                    for (x, &mk) in row.iter_mut().zip(m) {
                        *x = if mk != 0.0 { (*x - mx).exp() } else { 0.0 };
                        sum += *x;
                    }
                    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
                    row.iter_mut().for_each(|x| *x *= inv);
                }
                matmul_strided(s, dh, s, 1.0, p, s, 1, &v[off..], d, 1, 0.0, &mut ctx_b[h * dh..], d);
            }
        });
}

/// Backward: from `dctx` and the cached `probs`, writes `dq`, `dk`, `dv` (overwriting).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    sh: AttnShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttnShape { batch, seq: s, heads, head_dim: dh } = sh;
    let d = sh.d();
    let scale = 1.0 / (dh as f32).sqrt();
    let n = batch * s * d;
    dq[..n]
        .par_chunks_mut(s * d)
        .zip(dk[..n].par_chunks_mut(s * d))
        .zip(dv[..n].par_chunks_mut(s * d))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            let base = b * s * d;
            let mut ds = vec![0.0f32; s * s];
            for h in 0..heads {
                let p = &probs[(b * heads + h) * s * s..(b * heads + h + 1) * s * s];
                let off = base + h * dh;
                // dP = dctx·Vᵀ
                matmul_strided(s, s, dh, 1.0, &dctx[off..], d, 1, &v[off..], 1, d, 0.0, &mut ds, s);
                // dV = Pᵀ·dctx
                matmul_strided(s, dh, s, 1.0, p, 1, s, &dctx[off..], d, 1, 0.0, &mut dv_b[h * dh..], d);
                // dS = P ⊙ (dP − Σ_j dP·P) · scale
                for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
                    let dot: f32 = dr.iter().zip(pr).map(|(a, b)| a * b).sum();
                    for (g, pv) in dr.iter_mut().zip(pr) {
                        *g = pv * (*g - dot) * scale;
                    }
                }
                // dQ = dS·K, dK = dSᵀ·Q
                matmul_strided(s, dh, s, 1.0, &ds, s, 1, &k[off..], d, 1, 0.0, &mut dq_b[h * dh..], d);
                matmul_strided(s, dh, s, 1.0, &ds, 1, s, &q[off..], d, 1, 0.0, &mut dk_b[h * dh..], d);
            }
        });
}

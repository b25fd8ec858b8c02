//! Multi-head scaled-dot-product attention with a key padding mask, forward and backward.
//!
//! `q`, `k`, `v`, `ctx` are `[batch·seq, heads·head_dim]` row-major (the layout the Q/K/V projections produce);
//! heads are read in place through strides. `mask` is `[batch, seq]` with 1 for a token and 0 for padding; padded
//! keys get exactly zero attention weight (as adding the dtype's minimum does in Hugging Face models). The
//! probabilities `[batch, heads, seq, seq]` are kept for the backward pass. Batches run in parallel.

use super::gemm::matmul_strided;
use super::kernels::{fast_exp, lane_sum, wide, wide_simd, LANES};
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
    let wide = wide_simd();
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
                    if wide {
                        // SAFETY: `wide_simd()` checked the CPU features.
                        unsafe { masked_softmax_avx512(row, m) }
                    } else {
                        masked_softmax(row, m)
                    }
                }
                matmul_strided(s, dh, s, 1.0, p, s, 1, &v[off..], d, 1, 0.0, &mut ctx_b[h * dh..], d);
            }
        });
}

/// Softmax over the unmasked entries of one score row (masked entries become 0; an all-masked row is all 0).
/// The exponentials are computed in their own loop so that it vectorises. The maximum is taken over 16
/// interleaved lanes (exact in any order) and the sum in the fixed 16-lane order of [`lane_sum`]: a single
/// running maximum or sum is a chain of dependent operations as long as the row.
#[inline(always)]
fn masked_softmax(row: &mut [f32], m: &[f32]) {
    let s = row.len();
    let m = &m[..s];
    let mut mx = [f32::NEG_INFINITY; LANES];
    for (xc, mc) in row.chunks(LANES).zip(m.chunks(LANES)) {
        for (l, (x, &mk)) in xc.iter().zip(mc).enumerate() {
            if mk != 0.0 && *x > mx[l] {
                mx[l] = *x;
            }
        }
    }
    let mx = mx.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for (x, &mk) in row.iter_mut().zip(m) {
        let e = fast_exp(*x - mx);
        *x = if mk != 0.0 { e } else { 0.0 };
    }
    let sum = lane_sum(s, |i| row[i]);
    let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// One row of the softmax backward: `dS = P ⊙ (dP − Σ_j dP·P)·scale`, in place on `dr` (holding dP).
#[inline(always)]
fn softmax_row_backward(dr: &mut [f32], pr: &[f32], scale: f32) {
    let pr = &pr[..dr.len()];
    let dot = lane_sum(dr.len(), |i| dr[i] * pr[i]);
    for (g, pv) in dr.iter_mut().zip(pr) {
        *g = pv * (*g - dot) * scale;
    }
}

/// [`softmax_row_backward`] over the rows of one head (`s` entries each).
#[inline(always)]
fn softmax_rows_backward(ds: &mut [f32], p: &[f32], s: usize, scale: f32) {
    for (dr, pr) in ds.chunks_mut(s).zip(p.chunks(s)) {
        softmax_row_backward(dr, pr, scale)
    }
}

wide! {
    /// [`softmax_rows_backward`] compiled for AVX-512.
    fn softmax_rows_backward_avx512(ds: &mut [f32], p: &[f32], s: usize, scale: f32) =>
        softmax_rows_backward(ds, p, s, scale)
}

wide! {
    /// [`masked_softmax`] compiled for AVX-512.
    fn masked_softmax_avx512(row: &mut [f32], m: &[f32]) => masked_softmax(row, m)
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
    let wide = wide_simd();
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
                if wide {
                    // SAFETY: `wide_simd()` checked the CPU features.
                    unsafe { softmax_rows_backward_avx512(&mut ds, p, s, scale) }
                } else {
                    softmax_rows_backward(&mut ds, p, s, scale)
                }
                // dQ = dS·K, dK = dSᵀ·Q
                matmul_strided(s, dh, s, 1.0, &ds, s, 1, &k[off..], d, 1, 0.0, &mut dq_b[h * dh..], d);
                matmul_strided(s, dh, s, 1.0, &ds, 1, s, &q[off..], d, 1, 0.0, &mut dk_b[h * dh..], d);
            }
        });
}

#[cfg(test)]
#[test]
fn wide_and_scalar_softmax_are_bit_identical() {
    let s = 37;
    let row0: Vec<f32> = (0..s).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
    for m in [vec![1.0f32; s], (0..s).map(|i| (i % 3 != 0) as u8 as f32).collect(), vec![0.0; s]] {
        let (mut a, mut b) = (row0.clone(), row0.clone());
        masked_softmax(&mut a, &m);
        if wide_simd() {
            // SAFETY: `wide_simd()` checked the CPU features.
            unsafe { masked_softmax_avx512(&mut b, &m) };
        } else {
            masked_softmax(&mut b, &m);
        }
        assert_eq!(a, b);
        // the backward rows, wide and scalar
        let dp: Vec<f32> = (0..s).map(|i| ((i * 104729) % 97) as f32 * 0.05 - 2.0).collect();
        let (mut ga, mut gb) = (dp.clone(), dp.clone());
        softmax_row_backward(&mut ga, &a, 0.125);
        if wide_simd() {
            // SAFETY: `wide_simd()` checked the CPU features.
            unsafe { softmax_rows_backward_avx512(&mut gb, &a, s, 0.125) };
        } else {
            softmax_row_backward(&mut gb, &a, 0.125);
        }
        assert_eq!(ga, gb);
        let total: f32 = a.iter().sum();
        assert!(m.iter().all(|&x| x == 0.0) && total == 0.0 || (total - 1.0).abs() < 1e-5);
        assert!(a.iter().zip(&m).all(|(p, &mk)| mk != 0.0 || *p == 0.0));
    }
}

//! The one attention kernel, forward and backward, used by BERT, ViT / DINOv2, T5 and Llama.
//!
//! For batch element `b`, query head `h` and its key/value head `g = h / (heads / kv_heads)` (grouped-query
//! attention as `repeat_kv` arranges it; `kv_heads = heads` is plain multi-head attention):
//!
//! ```text
//! S = scale · Q_h·K_gᵀ + B_h                    [q_len, k_len]   (B: optional additive bias, e.g. T5 positions)
//! P = softmax over the visible keys of each row  (key j visible to query i ⇔ mask[b, j] ≠ 0 and, if causal, j ≤ i)
//! C_h = P·V_g                                    [q_len, head_dim]
//! ```
//!
//! Hidden keys get exactly zero weight (as adding the dtype's minimum does in transformers) and a query that sees
//! no key at all (a left pad under a causal mask) gets zero weights and a zero context. The backward pass, from
//! `dC` and the cached `P`:
//!
//! ```text
//! dP = dC_h·V_gᵀ    dV_g += Pᵀ·dC_h    dS = P ⊙ (dP − Σ_j dP ⊙ P) · scale    dQ_h = dS·K_g    dK_g += dSᵀ·Q_h
//! ```
//!
//! where `+=` sums over the query heads that share a key/value head. The bias gets no gradient: T5's
//! `relative_attention_bias` is frozen in every use (its gradient would be `Σ_b dS / scale`).
//!
//! Layouts: `q`, `ctx` are `[batch·q_len, heads·head_dim]`, `k`, `v` `[batch·k_len, kv_heads·head_dim]` row-major
//! (the projections' outputs), heads read in place through strides; `mask` is `[batch, k_len]` (1 = token,
//! 0 = padding); `bias` `[heads, q_len, k_len]` is shared by the batch; the probabilities `[batch, heads, q_len,
//! k_len]` are kept for the backward pass. `q_len ≠ k_len` is cross-attention (T5's decoder reading the
//! encoder). Batch elements run in parallel; within one, the heads run in order on one thread.
//!
//! The softmax rows run in the AVX-512 build where the CPU has it, bit-identical to the scalar build (tested):
//! the maximum over 16 interleaved lanes, the exponentials by [`fast_exp`] in their own loop, the sum in the fixed
//! order of `lane_sum`.

use super::gemm::matmul_strided;
use super::kernels::{fast_exp, lane_sum, wide, wide_simd, LANES};
use rayon::prelude::*;

/// One attention call: shapes, causal masking and the score scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub batch: usize,
    pub q_len: usize,
    pub k_len: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; divides `heads`.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query `i` sees keys `j ≤ i` only.
    pub causal: bool,
    /// Factor on `Q·Kᵀ` (`1/√head_dim` in BERT, ViT and Llama; 1 in T5, whose weights absorb it).
    pub scale: f32,
}

impl AttnSpec {
    /// Bidirectional multi-head self-attention over `seq` tokens with scale `1/√head_dim` (BERT, ViT); other
    /// calls change fields of this one (`AttnSpec { causal: true, kv_heads, ..AttnSpec::new(…) }`).
    pub fn new(batch: usize, seq: usize, heads: usize, head_dim: usize) -> Self {
        AttnSpec {
            batch,
            q_len: seq,
            k_len: seq,
            heads,
            kv_heads: heads,
            head_dim,
            causal: false,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
    /// Width of a query / context row.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Width of a key / value row.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.q_len * self.k_len
    }
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        assert!(
            self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads),
            "attention: kv_heads {} does not divide heads {}",
            self.kv_heads,
            self.heads
        );
        self.heads / self.kv_heads
    }
}

/// Forward: writes `ctx` and `probs` (see the module documentation for the maths and layouts).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    sp: AttnSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    bias: Option<&[f32]>,
    ctx: &mut [f32],
    probs: &mut [f32],
) {
    let AttnSpec { batch, q_len: sq, k_len: sk, heads, head_dim: dh, causal, scale, .. } = sp;
    let (qd, kd, grp) = (sp.q_dim(), sp.kv_dim(), sp.group());
    assert!(mask.len() >= batch * sk, "attention: mask shorter than batch·k_len");
    if let Some(b) = bias {
        assert!(b.len() >= heads * sq * sk, "attention: bias shorter than heads·q_len·k_len");
    }
    let wide = wide_simd();
    ctx[..batch * sq * qd]
        .par_chunks_mut(sq * qd)
        .zip(probs[..sp.probs_len()].par_chunks_mut(heads * sq * sk))
        .enumerate()
        .for_each(|(b, (ctx_b, p_b))| {
            let m = &mask[b * sk..(b + 1) * sk];
            for h in 0..heads {
                let p = &mut p_b[h * sq * sk..(h + 1) * sq * sk];
                let qo = b * sq * qd + h * dh;
                let ko = b * sk * kd + (h / grp) * dh;
                matmul_strided(sq, sk, dh, scale, &q[qo..], qd, 1, &k[ko..], 1, kd, 0.0, p, sk);
                let bh = bias.map(|bias| &bias[h * sq * sk..(h + 1) * sq * sk]);
                if wide {
                    // SAFETY: `wide_simd()` checked the CPU features.
                    unsafe { probs_rows_avx512(p, m, bh, causal, sk) }
                } else {
                    probs_rows(p, m, bh, causal, sk)
                }
                matmul_strided(sq, dh, sk, 1.0, p, sk, 1, &v[ko..], kd, 1, 0.0, &mut ctx_b[h * dh..], qd);
            }
        });
}

/// Scores of one head (`k_len` per row) to probabilities in place: add the bias row, softmax over the visible
/// keys (a causal row's visible prefix `0..=i`, then the padding mask), zero the rest.
#[inline(always)]
fn probs_rows(p: &mut [f32], m: &[f32], bias: Option<&[f32]>, causal: bool, sk: usize) {
    for (i, row) in p.chunks_mut(sk).enumerate() {
        if let Some(b) = bias {
            for (x, bv) in row.iter_mut().zip(&b[i * sk..(i + 1) * sk]) {
                *x += bv;
            }
        }
        let n = if causal { (i + 1).min(sk) } else { sk };
        let (seen, hidden) = row.split_at_mut(n);
        masked_softmax(seen, &m[..n]);
        hidden.fill(0.0);
    }
}

wide! {
    /// [`probs_rows`] compiled for AVX-512.
    fn probs_rows_avx512(p: &mut [f32], m: &[f32], bias: Option<&[f32]>, causal: bool, sk: usize) =>
        probs_rows(p, m, bias, causal, sk)
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

/// One row of the softmax backward: `dS = P ⊙ (dP − Σ_j dP·P)·scale`, in place on `dr` (holding dP). Hidden
/// keys have `P = 0`, so their `dS` is 0.
#[inline(always)]
fn softmax_row_backward(dr: &mut [f32], pr: &[f32], scale: f32) {
    let pr = &pr[..dr.len()];
    let dot = lane_sum(dr.len(), |i| dr[i] * pr[i]);
    for (g, pv) in dr.iter_mut().zip(pr) {
        *g = pv * (*g - dot) * scale;
    }
}

/// [`softmax_row_backward`] over the rows of one head (`sk` entries each).
#[inline(always)]
fn softmax_rows_backward(ds: &mut [f32], p: &[f32], sk: usize, scale: f32) {
    for (dr, pr) in ds.chunks_mut(sk).zip(p.chunks(sk)) {
        softmax_row_backward(dr, pr, scale)
    }
}

wide! {
    /// [`softmax_rows_backward`] compiled for AVX-512.
    fn softmax_rows_backward_avx512(ds: &mut [f32], p: &[f32], sk: usize, scale: f32) =>
        softmax_rows_backward(ds, p, sk, scale)
}

/// Backward: from `dctx` and the cached `probs`, writes `dq`, `dk`, `dv` (overwriting; each key/value head gets
/// the sum over the query heads that share it). The bias, if the forward had one, gets no gradient.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    sp: AttnSpec,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dctx: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let AttnSpec { batch, q_len: sq, k_len: sk, heads, head_dim: dh, scale, .. } = sp;
    let (qd, kd, grp) = (sp.q_dim(), sp.kv_dim(), sp.group());
    let wide = wide_simd();
    dq[..batch * sq * qd]
        .par_chunks_mut(sq * qd)
        .zip(dk[..batch * sk * kd].par_chunks_mut(sk * kd))
        .zip(dv[..batch * sk * kd].par_chunks_mut(sk * kd))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            let mut ds = vec![0.0f32; sq * sk];
            for h in 0..heads {
                let p = &probs[(b * heads + h) * sq * sk..(b * heads + h + 1) * sq * sk];
                let g = h / grp;
                let qo = b * sq * qd + h * dh;
                let ko = b * sk * kd + g * dh;
                // The first query head of a group writes dK_g and dV_g, the others add to them.
                let beta = if h % grp == 0 { 0.0 } else { 1.0 };
                // dP = dC·Vᵀ
                matmul_strided(sq, sk, dh, 1.0, &dctx[qo..], qd, 1, &v[ko..], 1, kd, 0.0, &mut ds, sk);
                // dV (+)= Pᵀ·dC
                matmul_strided(sk, dh, sq, 1.0, p, 1, sk, &dctx[qo..], qd, 1, beta, &mut dv_b[g * dh..], kd);
                // dS = P ⊙ (dP − Σ_j dP·P) · scale
                if wide {
                    // SAFETY: `wide_simd()` checked the CPU features.
                    unsafe { softmax_rows_backward_avx512(&mut ds, p, sk, scale) }
                } else {
                    softmax_rows_backward(&mut ds, p, sk, scale)
                }
                // dQ = dS·K, dK (+)= dSᵀ·Q
                matmul_strided(sq, dh, sk, 1.0, &ds, sk, 1, &k[ko..], kd, 1, 0.0, &mut dq_b[h * dh..], qd);
                matmul_strided(sk, dh, sq, 1.0, &ds, 1, sk, &q[qo..], qd, 1, beta, &mut dk_b[g * dh..], kd);
            }
        });
}

#[cfg(test)]
#[test]
fn wide_and_scalar_softmax_are_bit_identical() {
    let (sq, sk) = (5, 37);
    let s0: Vec<f32> = (0..sq * sk).map(|i| ((i * 7919) % 101) as f32 * 0.173 - 8.0).collect();
    let bias: Vec<f32> = (0..sq * sk).map(|i| ((i * 31) % 17) as f32 * 0.4 - 3.0).collect();
    let masks = [vec![1.0f32; sk], (0..sk).map(|i| (i % 3 != 0) as u8 as f32).collect(), vec![0.0; sk]];
    for m in &masks {
        for (causal, bias) in [(false, None), (true, None), (false, Some(&bias[..])), (true, Some(&bias[..]))] {
            let (mut a, mut b) = (s0.clone(), s0.clone());
            probs_rows(&mut a, m, bias, causal, sk);
            if wide_simd() {
                // SAFETY: `wide_simd()` checked the CPU features.
                unsafe { probs_rows_avx512(&mut b, m, bias, causal, sk) };
            } else {
                probs_rows(&mut b, m, bias, causal, sk);
            }
            assert_eq!(a, b);
            // the backward rows, wide and scalar
            let dp: Vec<f32> = (0..sq * sk).map(|i| ((i * 104729) % 97) as f32 * 0.05 - 2.0).collect();
            let (mut ga, mut gb) = (dp.clone(), dp.clone());
            softmax_rows_backward(&mut ga, &a, sk, 0.125);
            if wide_simd() {
                // SAFETY: `wide_simd()` checked the CPU features.
                unsafe { softmax_rows_backward_avx512(&mut gb, &a, sk, 0.125) };
            } else {
                softmax_rows_backward(&mut gb, &a, sk, 0.125);
            }
            assert_eq!(ga, gb);
            for (i, row) in a.chunks(sk).enumerate() {
                let seen = |j: usize| m[j] != 0.0 && (!causal || j <= i);
                let total: f32 = row.iter().sum();
                let any = (0..sk).any(seen);
                assert!(if any { (total - 1.0).abs() < 1e-5 } else { total == 0.0 });
                assert!(row.iter().enumerate().all(|(j, p)| seen(j) || *p == 0.0));
            }
        }
    }
}

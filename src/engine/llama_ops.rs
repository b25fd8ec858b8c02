//! What Llama-family decoders need beyond the shared kernels (RMS norm in [`super::kernels`], attention in
//! [`super::attention`]): rotary position embeddings (Hugging Face's `rotate_half` convention, default rope only)
//! and the SiLU-gated MLP activation (SwiGLU), forward and backward each.
//!
//! Layouts follow the rest of the engine: activations `[rows, cols]` row-major with `rows = batch·seq`.

use super::kernels::{fast_exp, wide, wide_simd};
use rayon::prelude::*;

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

/// `σ(x) = 1/(1 + e^{−x})` through [`fast_exp`], so the SwiGLU loops vectorise. libm's `expf`, called one value
/// at a time, was 3.9 % of the `llama4` bench step's `perf` samples and the rayon/closure frames around it
/// another 3.9 % (2026-11-30). [`fast_exp`] saturates at `e^{88.7}` instead of overflowing, so below −88.7 the
/// result is 0 by a select (otherwise `x·σ(x)` at x ≈ −3e38 would be −1, not −0); NaN stays NaN.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let s = 1.0 / (1.0 + fast_exp(-x));
    if x < -88.7 {
        0.0
    } else {
        s
    }
}

/// Elements per parallel chunk of the SwiGLU loops.
const CHUNK: usize = 4096;

#[inline(always)]
fn swiglu_f_loop(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g * sigmoid(g) * u;
    }
}

#[inline(always)]
fn swiglu_b_loop(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) {
    for ((((dg, du), &g), &u), &d) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(d) {
        let s = sigmoid(g);
        *du = d * g * s;
        *dg = d * u * s * (1.0 + g * (1.0 - s));
    }
}

wide! {
    /// [`swiglu_f_loop`] compiled for AVX-512.
    fn swiglu_f_avx512(g: &[f32], u: &[f32], o: &mut [f32]) => swiglu_f_loop(g, u, o)
}
wide! {
    /// [`swiglu_b_loop`] compiled for AVX-512.
    fn swiglu_b_avx512(g: &[f32], u: &[f32], d: &[f32], dg: &mut [f32], du: &mut [f32]) => swiglu_b_loop(g, u, d, dg, du)
}

/// `out = silu(gate)·up` elementwise.
pub fn swiglu_forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let wide = wide_simd();
    let n = gate.len();
    out[..n].par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK).zip(up[..n].par_chunks(CHUNK))).for_each(
        |(o, (g, u))| {
            if wide {
                // SAFETY: `wide_simd()` checked that the CPU has AVX-512F, AVX2 and FMA.
                unsafe { swiglu_f_avx512(g, u, o) }
            } else {
                swiglu_f_loop(g, u, o)
            }
        },
    );
}

/// From `dh`, writes `dgate = dh·up·silu'(gate)` and `dup = dh·silu(gate)`.
pub fn swiglu_backward(gate: &[f32], up: &[f32], dh: &[f32], dgate: &mut [f32], dup: &mut [f32]) {
    let wide = wide_simd();
    let n = gate.len();
    dgate[..n].par_chunks_mut(CHUNK).zip(dup[..n].par_chunks_mut(CHUNK)).enumerate().for_each(|(c, (dg, du))| {
        let r = c * CHUNK..c * CHUNK + dg.len();
        let (g, u, d) = (&gate[r.clone()], &up[r.clone()], &dh[r]);
        if wide {
            // SAFETY: as above.
            unsafe { swiglu_b_avx512(g, u, d, dg, du) }
        } else {
            swiglu_b_loop(g, u, d, dg, du)
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
        // the fast sigmoid against libm's, over the whole range and past both saturation points
        let xs: Vec<f32> = (-2000..=2000).map(|i| i as f32 * 0.05).chain([-1e4, 1e4, f32::MIN, f32::MAX]).collect();
        let mut o2 = vec![0.0; xs.len()];
        swiglu_forward(&xs, &vec![1.0; xs.len()], &mut o2);
        for (x, y) in xs.iter().zip(&o2) {
            let want = (*x as f64) / (1.0 + (-*x as f64).exp());
            assert!((*y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "silu({x}) = {y}, want {want}");
        }
        let mut o3 = vec![0.0; 1];
        swiglu_forward(&[f32::NAN], &[1.0], &mut o3);
        assert!(o3[0].is_nan());
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&g, &u, &r, &mut dg, &mut du);
        fd_check("swiglu dgate", &g, &dg, 1e-2, 1e-3, |p| f(p, &u));
        fd_check("swiglu dup", &u, &du, 1e-2, 1e-3, |p| f(&g, p));
    }
}

//! What T5 needs beyond the shared kernels (its layer norm is [`super::kernels::rmsnorm_forward`], its attention
//! [`super::attention`] with an additive position bias, scale 1 and, in the decoder, a causal mask): ReLU
//! (forward and backward) and the relative position buckets that make the bias.

use rayon::prelude::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::gradcheck::{fd_check, rand_vec};

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
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

//! Model-merging operators on dense task vectors `ΔW_n` (one `[out, in]` matrix per bank module and layer),
//! as defined in their papers:
//! - task arithmetic (Ilharco et al. 2023): `λ·Σ_n ΔW_n`;
//! - TIES (Yadav et al. 2023): trim each `ΔW_n` to its top `density` fraction by magnitude, elect the sign of
//!   each entry as the sign of the sum of the trimmed values, then average only the entries that agree with it
//!   (disjoint mean), scaled by `λ`;
//! - DARE (Yu et al. 2024): drop each entry with probability `p` and rescale survivors by `1/(1-p)` (seeded),
//!   then combine linearly (`λ·Σ`) or with TIES;
//! - magnitude pruning (as PEFT's `magnitude_prune`): trim each `ΔW_n` to `density`, then `λ·Σ`.
//!
//! PEFT's `add_weighted_adapter` applies `ties`, `dare_*` and `magnitude_prune` to the A and B factors
//! separately (same rank required) unless the `*_svd` variant is chosen, which merges `ΔW` and re-factorises
//! it by SVD; loracomp merges the dense `ΔW` exactly, i.e. the `*_svd` semantics without the truncation.

use anyhow::{anyhow, Result};
use rand::{Rng, SeedableRng};

/// Keep the `density` fraction of entries with the largest magnitude (ties at the threshold kept), zero the rest.
/// A NaN or infinite entry has no magnitude rank: an error naming its index.
pub fn trim(x: &[f32], density: f32) -> Result<Vec<f32>> {
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(anyhow!("magnitude trim: entry {i} of the task vector is {}", x[i]));
    }
    let k = ((x.len() as f64) * density.clamp(0.0, 1.0) as f64).round() as usize;
    if k >= x.len() {
        return Ok(x.to_vec());
    }
    if k == 0 {
        return Ok(vec![0.0; x.len()]);
    }
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let idx = x.len() - k;
    mags.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    let thr = mags[idx];
    Ok(x.iter().map(|&v| if v.abs() >= thr { v } else { 0.0 }).collect())
}

/// [`trim`] of each task vector, the error naming the module.
fn trim_all<'a>(vs: impl Iterator<Item = (usize, std::borrow::Cow<'a, [f32]>)>, density: f32) -> Result<Vec<Vec<f32>>> {
    vs.map(|(n, v)| trim(&v, density).map_err(|e| anyhow!("module {n}: {e}"))).collect()
}

/// TIES merge of already-trimmed (or raw) task vectors: sign election by total mass, disjoint mean.
pub fn ties_merge(vs: &[Vec<f32>]) -> Vec<f32> {
    let n = vs[0].len();
    let mut out = vec![0.0f32; n];
    for i in 0..n {
        let total: f32 = vs.iter().map(|v| v[i]).sum();
        let sign = if total >= 0.0 { 1.0 } else { -1.0 };
        let (mut s, mut c) = (0.0f32, 0usize);
        for v in vs {
            if v[i] != 0.0 && v[i].signum() == sign {
                s += v[i];
                c += 1;
            }
        }
        out[i] = if c > 0 { s / c as f32 } else { 0.0 };
    }
    out
}

/// DARE: drop with probability `p`, rescale by `1/(1-p)`, seeded.
pub fn dare(x: &[f32], p: f32, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let keep = 1.0 - p;
    x.iter().map(|&v| if rng.gen::<f32>() < p { 0.0 } else { v / keep }).collect()
}

/// Element-wise `λ·Σ_n v_n`.
pub fn linear(vs: &[Vec<f32>], lambda: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; vs[0].len()];
    for v in vs {
        out.iter_mut().zip(v).for_each(|(o, x)| *o += x);
    }
    out.iter_mut().for_each(|o| *o *= lambda);
    out
}

/// The dense merges loracomp runs as methods.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Merge {
    TaskArithmetic,
    Ties { density: f32 },
    DareLinear { p: f32 },
    DareTies { p: f32, density: f32 },
    MagnitudePrune { density: f32 },
}

impl Merge {
    /// Merge one layer's task vectors with scale `lambda`; `seed` drives DARE's drops (per layer and module).
    pub fn apply(&self, vs: &[Vec<f32>], lambda: f32, seed: u64) -> Result<Vec<f32>> {
        use std::borrow::Cow;
        let borrowed = || vs.iter().enumerate().map(|(n, v)| (n, Cow::Borrowed(v.as_slice())));
        Ok(match *self {
            Merge::TaskArithmetic => linear(vs, lambda),
            Merge::Ties { density } => {
                let t = trim_all(borrowed(), density)?;
                ties_merge(&t).into_iter().map(|v| v * lambda).collect()
            }
            Merge::DareLinear { p } => {
                let d: Vec<Vec<f32>> =
                    vs.iter().enumerate().map(|(n, v)| dare(v, p, seed.wrapping_add(n as u64 * 7919))).collect();
                linear(&d, lambda)
            }
            Merge::DareTies { p, density } => {
                let dropped =
                    vs.iter().enumerate().map(|(n, v)| (n, Cow::Owned(dare(v, p, seed.wrapping_add(n as u64 * 7919)))));
                let d = trim_all(dropped, density)?;
                ties_merge(&d).into_iter().map(|v| v * lambda).collect()
            }
            Merge::MagnitudePrune { density } => {
                let t = trim_all(borrowed(), density)?;
                linear(&t, lambda)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trim_keeps_the_largest_magnitudes() {
        assert_eq!(trim(&[0.1, -3.0, 2.0, -0.5], 0.5).unwrap(), vec![0.0, -3.0, 2.0, 0.0]);
        assert_eq!(trim(&[1.0, 2.0], 1.0).unwrap(), vec![1.0, 2.0]);
        assert_eq!(trim(&[1.0, 2.0], 0.0).unwrap(), vec![0.0, 0.0]);
    }

    #[test]
    fn non_finite_task_vectors_are_an_error_naming_the_module_not_a_panic() {
        let e = trim(&[0.1, f32::NAN, 2.0, -0.5], 0.5).unwrap_err().to_string();
        assert_eq!(e, "magnitude trim: entry 1 of the task vector is NaN");
        let vs = vec![vec![1.0, -2.0, 0.5], vec![0.5, f32::INFINITY, -3.0]];
        for m in [Merge::Ties { density: 0.5 }, Merge::MagnitudePrune { density: 0.5 }] {
            let e = m.apply(&vs, 1.0, 0).unwrap_err().to_string();
            assert_eq!(e, "module 1: magnitude trim: entry 1 of the task vector is inf", "{m:?}");
        }
        let e = Merge::DareTies { p: 0.0, density: 0.5 }.apply(&vs, 1.0, 0).unwrap_err().to_string();
        assert!(e.starts_with("module 1: magnitude trim"), "{e}");
    }

    #[test]
    fn ties_elects_sign_by_mass_and_averages_agreeing_entries() {
        // entry 0: +1, +3, -2 → total +2 → mean of {1, 3} = 2
        // entry 1: -4, +1, 0 → total -3 → mean of {-4} = -4
        // entry 2: 0, 0, 0 → 0
        let vs = vec![vec![1.0, -4.0, 0.0], vec![3.0, 1.0, 0.0], vec![-2.0, 0.0, 0.0]];
        assert_eq!(ties_merge(&vs), vec![2.0, -4.0, 0.0]);
        // full TIES with trimming at density 2/3 and λ = 0.5
        let m = Merge::Ties { density: 2.0 / 3.0 }.apply(&[vec![1.0, -4.0, 0.1], vec![3.0, 1.0, 0.2]], 0.5, 0).unwrap();
        // trimmed (2 of 3 kept): [1, -4, 0], [3, 1, 0]; signs: +, -, (none) → [2, -4, 0] · 0.5
        assert_eq!(m, vec![1.0, -2.0, 0.0]);
    }

    #[test]
    fn dare_drops_and_rescales_unbiasedly_and_is_seeded() {
        let x = vec![1.0f32; 20000];
        let d = dare(&x, 0.9, 3);
        assert_eq!(d, dare(&x, 0.9, 3));
        assert!(d.iter().all(|&v| v == 0.0 || (v - 10.0).abs() < 1e-4));
        let mean: f32 = d.iter().sum::<f32>() / d.len() as f32;
        assert!((mean - 1.0).abs() < 0.08, "{mean}");
        assert_eq!(dare(&[2.0, -1.0], 0.0, 1), vec![2.0, -1.0]);
    }

    #[test]
    fn task_arithmetic_and_magnitude_prune() {
        let vs = vec![vec![1.0, -2.0, 0.5], vec![0.5, 1.0, -3.0]];
        assert_eq!(Merge::TaskArithmetic.apply(&vs, 0.5, 0).unwrap(), vec![0.75, -0.5, -1.25]);
        // density 1/3 keeps one entry each: [0, -2, 0], [0, 0, -3]
        assert_eq!(Merge::MagnitudePrune { density: 1.0 / 3.0 }.apply(&vs, 1.0, 0).unwrap(), vec![0.0, -2.0, -3.0]);
    }
}

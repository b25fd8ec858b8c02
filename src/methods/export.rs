//! Export of an adapted model as a PEFT LoRA adapter.
//!
//! Exact export: per layer, the bank term `Σ_n c_n·B_n·A_n` and a fresh LoRA `s·B_f·A_f` are written as one
//! LoRA of rank `R = Σ r_n (+ r_f)` with `A = [A_1; …; A_N; A_f]`, `B = [c_1·B_1, …, c_N·B_N, s·B_f]` and
//! `lora_alpha = R` (scale 1). With an export rank `k`, `ΔW` is compressed by truncated SVD (`B = U_k·Σ_k`,
//! `A = V_kᵀ`) and the relative Frobenius error per layer is reported.

use super::task::TaskModel;
use crate::lora::bank::BankLinear;
use crate::lora::peft::{write_adapter, AdapterConfig, ExportModule};
use anyhow::{anyhow, bail, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// `(A [R, in], B [out, R], R)` with every scale folded into B; `None` if the layer adds nothing.
pub fn layer_factors(lin: &BankLinear) -> Option<(Vec<f32>, Vec<f32>, usize)> {
    let weights = lin.module_weights();
    let active = !matches!(lin.comp, crate::lora::bank::Composition::Off);
    let mut parts: Vec<(&[f32], &[f32], usize, f32)> = Vec::new();
    if active {
        for (m, w) in lin.bank().iter().zip(&weights) {
            if m.r > 0 && *w != 0.0 {
                parts.push((&m.a, &m.b, m.r, w * m.scale));
            }
        }
    }
    if let Some(f) = &lin.fresh {
        parts.push((&f.a.data, &f.b.data, f.r, f.scale));
    }
    let rt: usize = parts.iter().map(|p| p.2).sum();
    if rt == 0 {
        return None;
    }
    let mut a = Vec::with_capacity(rt * lin.din);
    let mut b = vec![0.0f32; lin.dout * rt];
    let mut off = 0;
    for (pa, pb, r, c) in parts {
        a.extend_from_slice(pa);
        for o in 0..lin.dout {
            for j in 0..r {
                b[o * rt + off + j] = c * pb[o * r + j];
            }
        }
        off += r;
    }
    Some((a, b, rt))
}

/// Truncated SVD of `B·A` to rank `k`: returns `(A_k, B_k, relative Frobenius error)`. A `ΔW` that holds NaN or
/// Inf (factors that overflow) is refused before the SVD, whose iteration has no cap and would not end on it.
pub fn compress(
    a: &[f32],
    b: &[f32],
    r: usize,
    din: usize,
    dout: usize,
    k: usize,
) -> Result<(Vec<f32>, Vec<f32>, f64)> {
    let mut dw = vec![0.0f32; dout * din];
    crate::engine::gemm::matmul(
        dout,
        din,
        r,
        1.0,
        b,
        crate::engine::gemm::Trans::N,
        a,
        crate::engine::gemm::Trans::N,
        0.0,
        &mut dw,
    );
    if let Some(i) = dw.iter().position(|v| !v.is_finite()) {
        bail!(
            "ΔW = B·A holds {} at row {}, column {} (the factors overflow f32); refusing the rank-{k} SVD",
            dw[i],
            i / din,
            i % din
        );
    }
    let m = nalgebra::DMatrix::<f64>::from_fn(dout, din, |i, j| dw[i * din + j] as f64);
    let total = m.norm();
    let svd = m.svd(true, true);
    let (Some(u), Some(vt)) = (svd.u, svd.v_t) else { bail!("the SVD of ΔW returned no singular vectors") };
    crate::util::ensure_finite(svd.singular_values.iter().copied(), "SVD of ΔW", "singular value")?;
    let mut idx: Vec<usize> = (0..svd.singular_values.len()).collect();
    idx.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let k = k.min(idx.len());
    let mut ak = vec![0.0f32; k * din];
    let mut bk = vec![0.0f32; dout * k];
    let mut kept = 0.0f64;
    for (j, &s) in idx.iter().take(k).enumerate() {
        let sv = svd.singular_values[s];
        kept += sv * sv;
        for c in 0..din {
            ak[j * din + c] = vt[(s, c)] as f32;
        }
        for o in 0..dout {
            bk[o * k + j] = (u[(o, s)] * sv) as f32;
        }
    }
    let err = if total > 0.0 { ((total * total - kept).max(0.0)).sqrt() / total } else { 0.0 };
    Ok((ak, bk, err))
}

/// Write `model`'s LoRA terms and head as a PEFT adapter in `dir`. Returns the per-layer relative error of
/// the SVD compression (empty for exact export).
/// `task_type` is PEFT's (`SEQ_2_SEQ_LM`, `CAUSAL_LM`) for a generative model, which has no head.
pub fn export_adapter(
    model: &mut dyn TaskModel,
    dir: &Path,
    base: Option<String>,
    task_type: Option<&str>,
    export_rank: Option<usize>,
    meta: &Value,
) -> Result<BTreeMap<String, f64>> {
    export(model, dir, base, task_type, export_rank, meta, true)
}

/// [`export_adapter`] without the head: the LoRA terms only (a composition with no head trained for a task).
pub fn export_lora_only(
    model: &mut dyn TaskModel,
    dir: &Path,
    base: Option<String>,
    task_type: Option<&str>,
    export_rank: Option<usize>,
    meta: &Value,
) -> Result<BTreeMap<String, f64>> {
    export(model, dir, base, task_type, export_rank, meta, false)
}

fn export(
    model: &mut dyn TaskModel,
    dir: &Path,
    base: Option<String>,
    task_type: Option<&str>,
    export_rank: Option<usize>,
    meta: &Value,
    with_head: bool,
) -> Result<BTreeMap<String, f64>> {
    let mut modules = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (path, lin) in model.named_linears() {
        let lin: &BankLinear = lin;
        let Some((a, b, r)) = layer_factors(lin) else { continue };
        let (a, b, r) = match export_rank {
            Some(k) if k < r => {
                let (ak, bk, err) = compress(&a, &b, r, lin.din, lin.dout, k)
                    .map_err(|e| anyhow!("export of {} at --export-rank {k}: layer '{path}': {e}", dir.display()))?;
                errors.insert(path.clone(), err);
                (ak, bk, k)
            }
            _ => (a, b, r),
        };
        modules.insert(path, ExportModule { a, b, r, din: lin.din, dout: lin.dout, alpha: r as f64 });
    }
    let r = most_common(modules.values().map(|m| m.r)).unwrap_or(8);
    let mut cfg = AdapterConfig::new(r, r as f64, Vec::new(), base);
    cfg.task_type = task_type.map(String::from);
    match model.head().filter(|_| with_head) {
        Some(h) => {
            let bias = h.bias.as_ref().map(|b| b.data.clone()).unwrap_or_else(|| vec![0.0; h.dout]);
            write_adapter(dir, cfg, &modules, Some((&h.w.shape, &h.w.data, &bias)), meta)?;
        }
        None => write_adapter(dir, cfg, &modules, None, meta)?,
    }
    Ok(errors)
}

fn most_common(it: impl Iterator<Item = usize>) -> Option<usize> {
    let mut counts = BTreeMap::new();
    for v in it {
        *counts.entry(v).or_insert(0usize) += 1;
    }
    counts.into_iter().max_by_key(|&(v, c)| (c, std::cmp::Reverse(v))).map(|(v, _)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_delta_w_is_refused_before_the_svd_not_a_hang() {
        // finite factors whose product overflows f32: B·A = [[inf, 0], [0, 0]] (rank 2 → 1)
        let a = [1e30f32, 0.0, 0.0, 1.0];
        let b = [1e30f32, 0.0, 0.0, 1.0];
        let e = compress(&a, &b, 2, 2, 2, 1).unwrap_err().to_string();
        assert!(e.contains("holds inf at row 0, column 0") && e.contains("rank-1 SVD"), "{e}");
        // a finite ΔW still compresses, singular values sorted by total_cmp
        let (ak, bk, err) = compress(&[1.0, 0.0, 0.0, 2.0], &[1.0, 0.0, 0.0, 1.0], 2, 2, 2, 1).unwrap();
        assert_eq!((ak.len(), bk.len()), (2, 2));
        assert!((err - (1.0f64 / 5.0).sqrt()).abs() < 1e-9, "{err}");
    }
}

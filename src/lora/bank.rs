//! The LoRA-bank linear layer: frozen `W` (and bias), a bank of frozen LoRA modules, their composition, and an
//! optional fresh trainable LoRA.
//!
//! `y = x·(W + Σ_n c_n·B_n·A_n)ᵀ + b + s_f·x·A_fᵀ·B_fᵀ` with `c_n = w_n·s_n`, where `w` is fixed (uniform, a
//! merge's weights) or `softmax(v)` of learned logits `v`, and `s_n` is the module's own scale (α/r, or α/√r
//! with rsLoRA). Two exact ways compute the bank term; the layer picks the one with fewer flops for the
//! current shape ([`BankPath`]) and both give the same numbers up to rounding:
//! - merged: `ΔW = B_cat·diag(c)·A_cat` is formed (`[out, in]`), then one matmul with `W + ΔW`;
//! - factored: `U = x·A_catᵀ` (`[rows, R]`), `y += (U·diag(c))·B_catᵀ`, with `R = Σ r_n`.
//!
//! [`Composition::PerGroup`] scores a population of compositions in one pass (LoraHub's search): the rows are
//! split into equal consecutive groups and group g uses its own weights `w_g`. Only the factored path can do
//! that with two GEMMs over all rows (`U = x·A_catᵀ`, then each group's rows of `U` scaled by its own
//! coefficients, then `·B_catᵀ`), so this mode always takes it; it is forward-only.

use crate::engine::gemm::{matmul, Trans};
use crate::engine::kernels::{
    bias_backward, linear_backward_input, linear_backward_weight, linear_forward, softmax_rows,
};
use crate::engine::param::Param;

/// One frozen LoRA module of the bank for this layer.
#[derive(Clone, Debug)]
pub struct LoraModule {
    /// `A`, `[r, in]`.
    pub a: Vec<f32>,
    /// `B`, `[out, r]`.
    pub b: Vec<f32>,
    pub r: usize,
    /// α/r, or α/√r with rsLoRA.
    pub scale: f32,
}

/// How the bank's modules are weighted.
#[derive(Clone, Debug)]
pub enum Composition {
    /// The bank is not applied.
    Off,
    /// Fixed weights `w_n` (uniform composition uses `1/N`; merges may use any real weights).
    Fixed(Vec<f32>),
    /// Learned logits `v_n`, `w = softmax(v)`; trainable.
    Learned(Param),
    /// Forward-only population scoring: the rows of a forward call split into `weights.len()` equal consecutive
    /// groups, group g composed with `weights[g]`. With `sum_factors` a group's modules are combined as
    /// LoraHub's code does (`A = Σ w_n A_n`, `B = Σ w_n B_n`, one LoRA; every module needs the same rank and
    /// scale), otherwise exactly (`Σ w_n ΔW_n`). Backward refuses this mode.
    PerGroup { weights: Vec<Vec<f32>>, sum_factors: bool },
}

/// A fresh LoRA trained from scratch on this layer (`A` Kaiming-uniform, `B` zero, as PEFT initialises).
#[derive(Clone, Debug)]
pub struct FreshLora {
    /// `[r, in]`.
    pub a: Param,
    /// `[out, r]`.
    pub b: Param,
    pub r: usize,
    pub scale: f32,
}

/// Which exact evaluation of the bank term a layer uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BankPath {
    Merged,
    Factored,
}

/// A linear layer with a LoRA bank. See the module documentation.
#[derive(Clone, Debug)]
pub struct BankLinear {
    pub din: usize,
    pub dout: usize,
    pub w: Param,
    pub bias: Option<Param>,
    bank: Vec<LoraModule>,
    pub comp: Composition,
    pub fresh: Option<FreshLora>,
    /// Force a path (tests, benchmarks); `None` picks by flop count.
    pub force_path: Option<BankPath>,
    // Derived from the bank: A_cat [R, in], B_cat [out, R], rank offsets.
    a_cat: Vec<f32>,
    b_cat: Vec<f32>,
    offsets: Vec<usize>,
    // Cached effective weight W + ΔW for the merged path, valid while `merged_ok`.
    merged: Vec<f32>,
    merged_ok: bool,
    // Per-call caches for the backward pass.
    path_used: Option<BankPath>,
    coef: Vec<f32>,
    weights: Vec<f32>,
    u: Vec<f32>,
    uf: Vec<f32>,
    scratch: Vec<f32>,
    scratch2: Vec<f32>,
}

impl BankLinear {
    pub fn new(mut w: Param, bias: Option<Param>) -> Self {
        assert_eq!(w.shape.len(), 2);
        // `backward` is the weight gradient's only writer (one GEMM that overwrites after a zero_grad).
        w.set_lazy_zero();
        let (dout, din) = (w.shape[0], w.shape[1]);
        BankLinear {
            din,
            dout,
            w,
            bias,
            bank: Vec::new(),
            comp: Composition::Off,
            fresh: None,
            force_path: None,
            a_cat: Vec::new(),
            b_cat: Vec::new(),
            offsets: vec![0],
            merged: Vec::new(),
            merged_ok: false,
            path_used: None,
            coef: Vec::new(),
            weights: Vec::new(),
            u: Vec::new(),
            uf: Vec::new(),
            scratch: Vec::new(),
            scratch2: Vec::new(),
        }
    }

    pub fn bank(&self) -> &[LoraModule] {
        &self.bank
    }

    /// Total bank rank `R = Σ r_n`.
    pub fn bank_rank(&self) -> usize {
        *self.offsets.last().unwrap()
    }

    /// Replace the bank. Every module must match this layer's shape.
    pub fn set_bank(&mut self, bank: Vec<LoraModule>) {
        let mut offsets = vec![0];
        for m in &bank {
            assert_eq!(m.a.len(), m.r * self.din, "LoRA A shape");
            assert_eq!(m.b.len(), self.dout * m.r, "LoRA B shape");
            offsets.push(offsets.last().unwrap() + m.r);
        }
        let rt = *offsets.last().unwrap();
        let mut a_cat = Vec::with_capacity(rt * self.din);
        let mut b_cat = vec![0.0f32; self.dout * rt];
        for (n, m) in bank.iter().enumerate() {
            a_cat.extend_from_slice(&m.a);
            for o in 0..self.dout {
                b_cat[o * rt + offsets[n]..o * rt + offsets[n + 1]].copy_from_slice(&m.b[o * m.r..(o + 1) * m.r]);
            }
        }
        self.bank = bank;
        self.a_cat = a_cat;
        self.b_cat = b_cat;
        self.offsets = offsets;
        self.merged_ok = false;
    }

    /// Call after any change of `w`, `comp` or the bank (the optimiser does after each step).
    pub fn invalidate(&mut self) {
        self.merged_ok = false;
    }

    /// After an optimiser step: drop the cached merge only if a step can have changed it, i.e. `w` or the
    /// composition logits are trainable. A frozen layer with fixed weights (uniform composition, head-only
    /// training) keeps `W + ΔW` across steps instead of rebuilding it every step.
    pub fn invalidate_after_step(&mut self) {
        if self.w.trainable() || self.trainable_logits() {
            self.merged_ok = false;
        }
    }

    /// Current module weights `w_n` (softmax of the logits when learned).
    ///
    /// # Panics
    /// Under [`Composition::PerGroup`], which has no single weight vector (set a fixed composition after the
    /// population search).
    pub fn module_weights(&self) -> Vec<f32> {
        match &self.comp {
            Composition::Off => vec![0.0; self.bank.len()],
            Composition::Fixed(w) => w.clone(),
            Composition::PerGroup { .. } => {
                panic!("a per-group composition has no single weight vector; set a fixed composition first")
            }
            Composition::Learned(v) => {
                let mut w = v.data.clone();
                let n = w.len().max(1);
                softmax_rows(&mut w, n);
                w
            }
        }
    }

    fn bank_active(&self) -> bool {
        !self.bank.is_empty() && !matches!(self.comp, Composition::Off)
    }

    /// Dense `ΔW = Σ_n c_n·B_n·A_n` (`[out, in]`) for the given weights.
    pub fn delta_w(&self, weights: &[f32]) -> Vec<f32> {
        let mut d = vec![0.0f32; self.dout * self.din];
        self.add_delta(weights, &mut d);
        d
    }

    fn add_delta(&self, weights: &[f32], dst: &mut [f32]) {
        let rt = self.bank_rank();
        if rt == 0 {
            return;
        }
        // B_cat·diag(c) then one product with A_cat.
        let mut bc = self.b_cat.clone();
        for (n, m) in self.bank.iter().enumerate() {
            let c = weights[n] * m.scale;
            for o in 0..self.dout {
                bc[o * rt + self.offsets[n]..o * rt + self.offsets[n + 1]].iter_mut().for_each(|v| *v *= c);
            }
        }
        matmul(self.dout, self.din, rt, 1.0, &bc, Trans::N, &self.a_cat, Trans::N, 1.0, dst);
    }

    /// Flop-count choice between the two exact paths for `rows` input rows.
    pub fn choose_path(&self, rows: usize, need_weight_grad: bool) -> BankPath {
        if let Some(p) = self.force_path {
            return p;
        }
        let (i, o, r, t) = (self.din as f64, self.dout as f64, self.bank_rank() as f64, rows as f64);
        let merged = if need_weight_grad {
            // build ΔW, dW = dyᵀx, B_catᵀ·dW
            2.0 * o * i * r + t * o * i
        } else {
            o * i * r
        };
        let factored = if need_weight_grad { 2.0 * t * r * (i + o) } else { t * r * (i + o) };
        if merged <= factored {
            BankPath::Merged
        } else {
            BankPath::Factored
        }
    }

    fn learned(&self) -> bool {
        matches!(self.comp, Composition::Learned(_))
    }

    /// Forward for `rows` rows of `x` (`[rows, in]`) into `y` (`[rows, out]`).
    pub fn forward(&mut self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (din, dout) = (self.din, self.dout);
        let bias = self.bias.as_ref().map(|b| b.data.as_slice());
        if !self.bank_active() {
            self.path_used = None;
            linear_forward(x, &self.w.data, bias, rows, din, dout, y);
        } else if matches!(self.comp, Composition::PerGroup { .. }) {
            self.forward_groups(x, rows, y);
        } else {
            self.weights = self.module_weights();
            self.coef = self.bank.iter().zip(&self.weights).map(|(m, w)| w * m.scale).collect();
            let training_comp = self.learned() && self.trainable_logits();
            let path = self.choose_path(rows, training_comp);
            self.path_used = Some(path);
            match path {
                BankPath::Merged => {
                    if !self.merged_ok || self.w.trainable() || training_comp {
                        self.merged.clear();
                        self.merged.extend_from_slice(&self.w.data);
                        let w = self.weights.clone();
                        let mut merged = std::mem::take(&mut self.merged);
                        self.add_delta(&w, &mut merged);
                        self.merged = merged;
                        self.merged_ok = true;
                    }
                    linear_forward(x, &self.merged, bias, rows, din, dout, y);
                }
                BankPath::Factored => {
                    linear_forward(x, &self.w.data, bias, rows, din, dout, y);
                    let rt = self.bank_rank();
                    self.u.resize(rows * rt, 0.0);
                    matmul(rows, rt, din, 1.0, x, Trans::N, &self.a_cat, Trans::T, 0.0, &mut self.u);
                    self.scale_cols(rows, true);
                    matmul(rows, dout, rt, 1.0, &self.scratch, Trans::N, &self.b_cat, Trans::T, 1.0, y);
                }
            }
        }
        if let Some(f) = &self.fresh {
            self.uf.resize(rows * f.r, 0.0);
            matmul(rows, f.r, din, 1.0, x, Trans::N, &f.a.data, Trans::T, 0.0, &mut self.uf);
            matmul(rows, dout, f.r, f.scale, &self.uf, Trans::N, &f.b.data, Trans::T, 1.0, y);
        }
    }

    /// [`Composition::PerGroup`]: rows split into equal groups, group g composed with its own weights `w_g`.
    /// The two exact paths, chosen by flop count for one group's rows as for a single composition:
    /// - factored, over all rows at once: `y = x·Wᵀ + b`, `U = x·A_catᵀ`, each group's rows of `U` scaled by its
    ///   coefficients into `U'`, `y += U'·B_catᵀ`. Exact: `U'[t, j] = w_{g,n}·s_n·U[t, j]` for `j` in module
    ///   n's rank range. Summed factors (all `r_n = r`, `s_n = s`): `x·(Σ_n w_n A_n)ᵀ = Σ_n w_n U_n =: V`
    ///   (`[rows, r]`) and `V·(Σ_n w_n B_n)ᵀ = Σ_n (w_n V)·B_nᵀ`, so `U'[t, n·r + k] = s·w_{g,n}·V[t, k]`.
    /// - merged, group by group: `W_g = W + ΔW_g`, then the group's rows times `W_gᵀ`.
    fn forward_groups(&mut self, x: &[f32], rows: usize, y: &mut [f32]) {
        let Composition::PerGroup { weights, sum_factors } = &self.comp else {
            unreachable!("forward_groups is called for per-group compositions only")
        };
        let (weights, sum_factors) = (weights.clone(), *sum_factors);
        let (din, dout, rt, n) = (self.din, self.dout, self.bank_rank(), self.bank.len());
        let groups = weights.len();
        assert!(
            groups > 0 && rows.is_multiple_of(groups),
            "per-group composition: {rows} rows do not split into {groups} equal groups"
        );
        assert!(weights.iter().all(|w| w.len() == n), "per-group composition: every group needs {n} weights");
        let (r, s) = (self.bank[0].r, self.bank[0].scale);
        if sum_factors {
            assert!(
                self.bank.iter().all(|m| m.r == r && (m.scale - s).abs() <= 1e-6),
                "summed-factor composition needs the same rank and scale in every module"
            );
        }
        let bias = self.bias.as_ref().map(|b| b.data.as_slice());
        let per = rows / groups;
        let path = if rt == 0 { BankPath::Factored } else { self.choose_path(per, false) };
        self.path_used = Some(path);
        if path == BankPath::Merged {
            let mut merged = std::mem::take(&mut self.merged);
            for (g, w) in weights.iter().enumerate() {
                merged.clear();
                merged.extend_from_slice(&self.w.data);
                if sum_factors {
                    // s·(Σ w_n B_n)·(Σ w_n A_n)
                    let mut a = vec![0.0f32; r * din];
                    let mut b = vec![0.0f32; dout * r];
                    for (nn, wn) in w.iter().enumerate() {
                        let an = &self.a_cat[nn * r * din..(nn + 1) * r * din];
                        a.iter_mut().zip(an).for_each(|(p, q)| *p += wn * q);
                        for o in 0..dout {
                            let bn = &self.b_cat[o * rt + nn * r..o * rt + (nn + 1) * r];
                            b[o * r..(o + 1) * r].iter_mut().zip(bn).for_each(|(p, q)| *p += wn * q);
                        }
                    }
                    matmul(dout, din, r, s, &b, Trans::N, &a, Trans::N, 1.0, &mut merged);
                } else {
                    self.add_delta(w, &mut merged);
                }
                let (xg, yg) = (&x[g * per * din..(g + 1) * per * din], &mut y[g * per * dout..(g + 1) * per * dout]);
                linear_forward(xg, &merged, bias, per, din, dout, yg);
            }
            self.merged = merged;
            // The buffer now holds the last group's weights, not this layer's composition.
            self.merged_ok = false;
            return;
        }
        linear_forward(x, &self.w.data, bias, rows, din, dout, y);
        if rt == 0 {
            return;
        }
        self.u.resize(rows * rt, 0.0);
        matmul(rows, rt, din, 1.0, x, Trans::N, &self.a_cat, Trans::T, 0.0, &mut self.u);
        self.scratch.resize(rows * rt, 0.0);
        let mut v = vec![0.0f32; if sum_factors { r } else { 0 }];
        for (g, w) in weights.iter().enumerate() {
            let coef: Vec<f32> = self.bank.iter().zip(w).map(|(m, wn)| wn * m.scale).collect();
            for t in g * per..(g + 1) * per {
                let (src, dst) = (&self.u[t * rt..(t + 1) * rt], &mut self.scratch[t * rt..(t + 1) * rt]);
                if sum_factors {
                    v.fill(0.0);
                    for (wn, un) in w.iter().zip(src.chunks_exact(r)) {
                        v.iter_mut().zip(un).for_each(|(a, b)| *a += wn * b);
                    }
                    for (c, dn) in coef.iter().zip(dst.chunks_exact_mut(r)) {
                        dn.iter_mut().zip(&v).for_each(|(a, b)| *a = c * b);
                    }
                } else {
                    for (nn, c) in coef.iter().enumerate() {
                        for j in self.offsets[nn]..self.offsets[nn + 1] {
                            dst[j] = src[j] * c;
                        }
                    }
                }
            }
        }
        matmul(rows, dout, rt, 1.0, &self.scratch, Trans::N, &self.b_cat, Trans::T, 1.0, y);
    }

    fn trainable_logits(&self) -> bool {
        matches!(&self.comp, Composition::Learned(p) if p.trainable())
    }

    /// scratch = U·diag(c) (from `u` when `from_u`, else from `scratch2`), `[rows, R]`.
    fn scale_cols(&mut self, rows: usize, from_u: bool) {
        let rt = self.bank_rank();
        let src = if from_u { &self.u } else { &self.scratch2 };
        self.scratch.resize(rows * rt, 0.0);
        for t in 0..rows {
            for (n, c) in self.coef.iter().enumerate() {
                for j in self.offsets[n]..self.offsets[n + 1] {
                    self.scratch[t * rt + j] = src[t * rt + j] * c;
                }
            }
        }
    }

    /// Backward. `x` is the input given to the last `forward`, `dy` the output gradient. Accumulates gradients
    /// of the trainable parameters (W and bias when trainable, learned logits, fresh LoRA) and writes `dx` when
    /// asked (adding to it when `accumulate`).
    ///
    /// # Panics
    /// Under [`Composition::PerGroup`], which is forward-only (population scoring).
    pub fn backward(&mut self, x: &[f32], dy: &[f32], rows: usize, dx: Option<&mut [f32]>, accumulate: bool) {
        assert!(
            !matches!(self.comp, Composition::PerGroup { .. }),
            "per-group composition is forward-only (population scoring); set a fixed or learned composition to train"
        );
        let (din, dout) = (self.din, self.dout);
        if let Some(b) = self.bias.as_mut() {
            if b.trainable() {
                bias_backward(dy, rows, dout, &mut b.grad);
            }
        }
        let rt = self.bank_rank();
        let path = self.path_used;
        let learned = self.trainable_logits();
        // Gradient of the weights w_n, before the softmax Jacobian.
        let mut gw = vec![0.0f32; self.bank.len()];
        match path {
            Some(BankPath::Merged) if learned => {
                // dW_eff = dyᵀ·x; g_n = s_n·⟨B_n·A_n, dW_eff⟩ = s_n·Σ_{j∈n} (B_catᵀ·dW_eff)[j,:]·A_cat[j,:]
                self.scratch.resize(dout * din, 0.0);
                matmul(dout, din, rows, 1.0, dy, Trans::T, x, Trans::N, 0.0, &mut self.scratch);
                if self.w.trainable() {
                    if self.w.grad_beta() == 0.0 {
                        self.w.grad.copy_from_slice(&self.scratch);
                    } else {
                        self.w.grad.iter_mut().zip(&self.scratch).for_each(|(g, v)| *g += v);
                    }
                }
                self.scratch2.resize(rt * din, 0.0);
                matmul(rt, din, dout, 1.0, &self.b_cat, Trans::T, &self.scratch, Trans::N, 0.0, &mut self.scratch2);
                for (n, m) in self.bank.iter().enumerate() {
                    let mut s = 0.0f32;
                    for j in self.offsets[n]..self.offsets[n + 1] {
                        let row = &self.scratch2[j * din..(j + 1) * din];
                        let arow = &self.a_cat[j * din..(j + 1) * din];
                        s += row.iter().zip(arow).map(|(p, q)| p * q).sum::<f32>();
                    }
                    gw[n] = m.scale * s;
                }
            }
            _ => {
                if self.w.trainable() {
                    let beta = self.w.grad_beta();
                    linear_backward_weight(dy, x, rows, din, dout, beta, &mut self.w.grad);
                }
            }
        }
        // G = dy·B_cat ([rows, R]) is needed by the factored path for both dx and the logits.
        let factored = path == Some(BankPath::Factored);
        if factored && (learned || dx.is_some()) {
            self.scratch2.resize(rows * rt, 0.0);
            matmul(rows, rt, dout, 1.0, dy, Trans::N, &self.b_cat, Trans::N, 0.0, &mut self.scratch2);
            if learned {
                for (n, m) in self.bank.iter().enumerate() {
                    let mut s = 0.0f32;
                    for t in 0..rows {
                        for j in self.offsets[n]..self.offsets[n + 1] {
                            s += self.u[t * rt + j] * self.scratch2[t * rt + j];
                        }
                    }
                    gw[n] = m.scale * s;
                }
            }
        }
        if learned {
            let w = &self.weights;
            let dot: f32 = w.iter().zip(&gw).map(|(a, b)| a * b).sum();
            if let Composition::Learned(p) = &mut self.comp {
                for n in 0..w.len() {
                    p.grad[n] += w[n] * (gw[n] - dot);
                }
            }
        }
        // Fresh LoRA: uf = x·A_fᵀ was cached; y += s·uf·B_fᵀ.
        let mut guf = Vec::new();
        if let Some(f) = self.fresh.as_mut() {
            if f.b.trainable() {
                matmul(dout, f.r, rows, f.scale, dy, Trans::T, &self.uf, Trans::N, 1.0, &mut f.b.grad);
            }
            guf = vec![0.0f32; rows * f.r];
            matmul(rows, f.r, dout, f.scale, dy, Trans::N, &f.b.data, Trans::N, 0.0, &mut guf);
            if f.a.trainable() {
                matmul(f.r, din, rows, 1.0, &guf, Trans::T, x, Trans::N, 1.0, &mut f.a.grad);
            }
        }
        if let Some(dx) = dx {
            let wmat = if path == Some(BankPath::Merged) { &self.merged } else { &self.w.data };
            linear_backward_input(dy, wmat, rows, din, dout, dx, accumulate);
            if factored {
                self.scale_cols(rows, false);
                matmul(rows, din, rt, 1.0, &self.scratch, Trans::N, &self.a_cat, Trans::N, 1.0, dx);
            }
            if let Some(f) = &self.fresh {
                matmul(rows, din, f.r, 1.0, &guf, Trans::N, &f.a.data, Trans::N, 1.0, dx);
            }
        }
    }

    /// Parameters that take gradient steps, with a stable name suffix.
    pub fn trainable_params_mut(&mut self) -> Vec<(&'static str, &mut Param)> {
        let mut out: Vec<(&'static str, &mut Param)> = Vec::new();
        if self.w.trainable() {
            out.push(("weight", &mut self.w));
        }
        if let Some(b) = self.bias.as_mut() {
            if b.trainable() {
                out.push(("bias", b));
            }
        }
        if let Composition::Learned(p) = &mut self.comp {
            if p.trainable() {
                out.push(("composition_logits", p));
            }
        }
        if let Some(f) = self.fresh.as_mut() {
            if f.a.trainable() {
                out.push(("lora_A", &mut f.a));
            }
            if f.b.trainable() {
                out.push(("lora_B", &mut f.b));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rv(rng: &mut impl Rng, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * s).collect()
    }

    fn layer(rng: &mut impl Rng, din: usize, dout: usize, ranks: &[usize], scale: impl Fn(usize) -> f32) -> BankLinear {
        let w = Param::new(vec![dout, din], rv(rng, dout * din, 0.3));
        let bias = Param::new(vec![dout], rv(rng, dout, 0.3));
        let mut lin = BankLinear::new(w, Some(bias));
        let bank = ranks
            .iter()
            .map(|&r| LoraModule { a: rv(rng, r * din, 0.5), b: rv(rng, dout * r, 0.5), r, scale: scale(r) })
            .collect();
        lin.set_bank(bank);
        lin
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The weight gradient is zeroed lazily: after `zero_grad` the first backward overwrites the stale buffer
    /// and a second one accumulates, on the plain and the merged learned path alike.
    #[test]
    fn lazily_zeroed_weight_gradient_overwrites_then_accumulates() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(15);
        let (din, dout, rows) = (12, 10, 6);
        for learned in [false, true] {
            let mut lin = layer(&mut rng, din, dout, &[2, 3], |_| 0.5);
            if learned {
                let mut v = Param::zeros(vec![2]);
                v.set_trainable(true);
                lin.comp = Composition::Learned(v);
                lin.force_path = Some(BankPath::Merged);
            }
            lin.w.set_trainable(true);
            let x = rv(&mut rng, rows * din, 1.0);
            let dy = rv(&mut rng, rows * dout, 1.0);
            let mut y = vec![0.0; rows * dout];
            lin.forward(&x, rows, &mut y);
            lin.backward(&x, &dy, rows, None, false);
            let once = lin.w.grad.clone();
            lin.w.grad.iter_mut().for_each(|g| *g = f32::NAN); // stale contents must never be read
            lin.w.zero_grad();
            lin.backward(&x, &dy, rows, None, false);
            assert_eq!(lin.w.grad, once, "learned {learned}");
            lin.backward(&x, &dy, rows, None, false);
            let twice: Vec<f32> = once.iter().map(|g| g + g).collect();
            assert_eq!(lin.w.grad, twice, "learned {learned}");
            // no writer after zero_grad: the optimiser sees a zero gradient
            lin.w.zero_grad();
            assert!(lin.w.grad_settled().iter().all(|&g| g == 0.0));
        }
    }

    /// Group g's rows of a per-group forward against a fixed-composition forward of those rows alone, on both
    /// exact paths.
    #[test]
    fn per_group_forward_equals_separate_fixed_forwards() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (din, dout, rows) = (24, 20, 7);
        let mut lin = layer(&mut rng, din, dout, &[3, 1, 5, 0], |r| 1.7 / (r.max(1) as f32).sqrt());
        let groups = vec![vec![0.6, -1.3, 0.25, 2.0], vec![-1.5, 0.0, 1.5, -0.7], vec![0.1, 0.9, -0.4, 0.0]];
        let x = rv(&mut rng, rows * din, 1.0);
        let xs: Vec<f32> = (0..groups.len()).flat_map(|_| x.iter().copied()).collect();
        for pg in [BankPath::Merged, BankPath::Factored] {
            lin.force_path = Some(pg);
            lin.comp = Composition::PerGroup { weights: groups.clone(), sum_factors: false };
            let mut y = vec![f32::NAN; groups.len() * rows * dout];
            lin.forward(&xs, groups.len() * rows, &mut y);
            for (g, w) in groups.iter().enumerate() {
                lin.comp = Composition::Fixed(w.clone());
                for p in [BankPath::Merged, BankPath::Factored] {
                    lin.force_path = Some(p);
                    lin.invalidate();
                    let mut yg = vec![0.0; rows * dout];
                    lin.forward(&x, rows, &mut yg);
                    let d = max_diff(&y[g * rows * dout..(g + 1) * rows * dout], &yg);
                    assert!(d <= 1e-5, "per-group {pg:?}, group {g}, fixed {p:?}: {d}");
                }
            }
            // and the groups do differ (the weights matter)
            assert!(max_diff(&y[..rows * dout], &y[rows * dout..2 * rows * dout]) > 1e-2);
        }
    }

    /// Summed factors per group against the summed module `(Σ w A, Σ w B)` set as a one-module bank.
    #[test]
    fn per_group_summed_factors_equal_the_summed_module() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (din, dout, rows, r) = (16, 12, 5, 3);
        let mut lin = layer(&mut rng, din, dout, &[r, r, r], |_| 0.8);
        let bank = lin.bank().to_vec();
        let groups = vec![vec![1.2, -0.5, 0.3], vec![-1.5, 1.5, 0.0]];
        let x = rv(&mut rng, rows * din, 1.0);
        let xs: Vec<f32> = (0..groups.len()).flat_map(|_| x.iter().copied()).collect();
        for pg in [BankPath::Merged, BankPath::Factored] {
            lin.force_path = Some(pg);
            lin.comp = Composition::PerGroup { weights: groups.clone(), sum_factors: true };
            let mut y = vec![0.0; groups.len() * rows * dout];
            lin.forward(&xs, groups.len() * rows, &mut y);
            for (g, w) in groups.iter().enumerate() {
                let mut one = lin.clone();
                let mut a = vec![0.0f32; r * din];
                let mut b = vec![0.0f32; dout * r];
                for (m, wn) in bank.iter().zip(w) {
                    a.iter_mut().zip(&m.a).for_each(|(p, q)| *p += wn * q);
                    b.iter_mut().zip(&m.b).for_each(|(p, q)| *p += wn * q);
                }
                one.set_bank(vec![LoraModule { a, b, r, scale: 0.8 }]);
                one.comp = Composition::Fixed(vec![1.0]);
                let mut yg = vec![0.0; rows * dout];
                one.forward(&x, rows, &mut yg);
                let d = max_diff(&y[g * rows * dout..(g + 1) * rows * dout], &yg);
                assert!(d <= 1e-5, "per-group {pg:?}, group {g}: {d}");
                // not the exact Σ w ΔW (cross terms B_i A_j)
                lin.comp = Composition::Fixed(w.clone());
                lin.invalidate();
                let mut ye = vec![0.0; rows * dout];
                lin.forward(&x, rows, &mut ye);
                assert!(max_diff(&ye, &yg) > 1e-3, "group {g}");
                lin.comp = Composition::PerGroup { weights: groups.clone(), sum_factors: true };
            }
        }
    }

    #[test]
    #[should_panic(expected = "forward-only")]
    fn per_group_backward_is_refused() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let mut lin = layer(&mut rng, 6, 4, &[2], |_| 1.0);
        lin.comp = Composition::PerGroup { weights: vec![vec![1.0], vec![-1.0]], sum_factors: false };
        let x = rv(&mut rng, 2 * 6, 1.0);
        let mut y = vec![0.0; 2 * 4];
        lin.forward(&x, 2, &mut y);
        lin.backward(&x, &y, 2, None, false);
    }

    #[test]
    #[should_panic(expected = "equal groups")]
    fn per_group_rows_must_split_evenly() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        let mut lin = layer(&mut rng, 6, 4, &[2], |_| 1.0);
        lin.comp = Composition::PerGroup { weights: vec![vec![1.0], vec![-1.0]], sum_factors: false };
        let x = rv(&mut rng, 3 * 6, 1.0);
        let mut y = vec![0.0; 3 * 4];
        lin.forward(&x, 3, &mut y);
    }
}

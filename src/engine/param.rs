//! Parameters (value, and a gradient only when trainable) and the AdamW optimiser.

/// A tensor of the model. Frozen parameters carry no gradient buffer, so no code path can update them.
#[derive(Clone, Debug, Default)]
pub struct Param {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// Gradient, same length as `data` when trainable, empty when frozen. For a row-sparse parameter (an
    /// embedding table, see [`Param::set_row_sparse`]) gradients must be written through
    /// [`Param::grad_row_mut`], so that the rows a step touched are known.
    pub grad: Vec<f32>,
    /// AdamW first and second moments (allocated on first step).
    m: Vec<f32>,
    v: Vec<f32>,
    rows: Option<Box<SparseRows>>,
    /// Lazy zeroing (opt-in, for weights whose one writer can overwrite instead of accumulate): `zero_grad`
    /// only sets `stale`, the writer asks [`Param::grad_beta`] whether to overwrite, and AdamW zeroes a
    /// gradient still stale (no writer ran) before using it.
    lazy_zero: bool,
    stale: bool,
}

/// Row bookkeeping of an embedding table. Invariants: every gradient row not in `step` is zero, and every
/// moment row not in `seen` is zero (so AdamW's update of such a row is exactly `p · (1 − lr·wd)`).
#[derive(Clone, Debug, Default)]
struct SparseRows {
    row_len: usize,
    /// Rows given a gradient since the last `zero_grad`, and a flag per row.
    step: Vec<u32>,
    in_step: Vec<bool>,
    /// Rows that have ever had a gradient since the moments were allocated, and a flag per row.
    seen: Vec<u32>,
    in_seen: Vec<bool>,
}

impl SparseRows {
    fn new(rows: usize, row_len: usize) -> Self {
        SparseRows {
            row_len,
            step: Vec::new(),
            in_step: vec![false; rows],
            seen: Vec::new(),
            in_seen: vec![false; rows],
        }
    }
    fn clear(&mut self) {
        self.step.iter().for_each(|&r| self.in_step[r as usize] = false);
        self.seen.iter().for_each(|&r| self.in_seen[r as usize] = false);
        self.step.clear();
        self.seen.clear();
    }
}

/// What [`AdamW::step_checked`] found non-finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NonFinite {
    /// The gradient (checked before that part of the parameter is updated).
    Grad,
    /// The parameter after its update.
    Data,
}

impl Param {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "Param shape {shape:?} vs {} values", data.len());
        Param {
            shape,
            data,
            grad: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            rows: None,
            lazy_zero: false,
            stale: false,
        }
    }
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Param::new(shape, vec![0.0; n])
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn trainable(&self) -> bool {
        !self.grad.is_empty()
    }
    /// Make the parameter trainable (allocates its gradient) or frozen (drops gradient and moments).
    pub fn set_trainable(&mut self, on: bool) {
        if on {
            if self.grad.len() != self.data.len() {
                self.grad = vec![0.0; self.data.len()];
                if let Some(r) = &mut self.rows {
                    r.step.clear();
                    r.in_step.iter_mut().for_each(|f| *f = false);
                }
            }
        } else {
            self.grad = Vec::new();
            self.m = Vec::new();
            self.v = Vec::new();
            if let Some(r) = &mut self.rows {
                r.clear();
            }
        }
    }

    /// Declare the parameter a table of rows of `row_len` values that gradients reach row by row (an
    /// embedding). `zero_grad` and AdamW then touch only the rows that have had a gradient; the numbers are
    /// bit-identical to the dense update, because a row with zero gradient and zero moments moves by exactly
    /// the weight-decay factor.
    pub fn set_row_sparse(&mut self, row_len: usize) {
        assert!(
            row_len > 0 && self.data.len().is_multiple_of(row_len),
            "row length {row_len} vs {} values",
            self.data.len()
        );
        let rows = self.data.len() / row_len;
        let mut s = SparseRows::new(rows, row_len);
        // Moments or gradients from dense steps may be anywhere: count every row as touched.
        if !self.m.is_empty() || self.grad.iter().any(|&g| g != 0.0) {
            s.seen = (0..rows as u32).collect();
            s.in_seen.iter_mut().for_each(|f| *f = true);
            s.step = s.seen.clone();
            s.in_step.iter_mut().for_each(|f| *f = true);
        }
        self.rows = Some(Box::new(s));
    }

    /// The gradient of row `row` (of a row-sparse parameter: the row is recorded as touched this step; of a
    /// dense one: the slice `row * row_len ..`). Panics when the parameter is frozen.
    pub fn grad_row_mut(&mut self, row: usize, row_len: usize) -> &mut [f32] {
        if let Some(r) = &mut self.rows {
            debug_assert_eq!(r.row_len, row_len);
            if !r.in_step[row] {
                r.in_step[row] = true;
                r.step.push(row as u32);
            }
        }
        &mut self.grad[row * row_len..(row + 1) * row_len]
    }

    /// Opt in to lazy zeroing: every code path that writes this gradient must go through
    /// [`Param::grad_beta`] (for a linear layer's weight: its weight-gradient GEMM).
    pub fn set_lazy_zero(&mut self) {
        self.lazy_zero = true;
    }

    /// For the writer of a lazily zeroed gradient: `0.0` when the buffer is logically zero (overwrite it; the
    /// flag is cleared), `1.0` when it holds this step's gradient so far (accumulate).
    pub fn grad_beta(&mut self) -> f32 {
        if std::mem::take(&mut self.stale) {
            0.0
        } else {
            1.0
        }
    }

    /// The gradient with any pending lazy zeroing done.
    pub fn grad_settled(&mut self) -> &mut [f32] {
        if std::mem::take(&mut self.stale) {
            self.grad.iter_mut().for_each(|g| *g = 0.0);
        }
        &mut self.grad
    }

    pub fn zero_grad(&mut self) {
        if self.lazy_zero && self.rows.is_none() {
            self.stale = !self.grad.is_empty();
            return;
        }
        match &mut self.rows {
            Some(r) if !self.grad.is_empty() => {
                let n = r.row_len;
                for &row in &r.step {
                    let row = row as usize;
                    self.grad[row * n..(row + 1) * n].iter_mut().for_each(|g| *g = 0.0);
                    r.in_step[row] = false;
                }
                r.step.clear();
            }
            _ => self.grad.iter_mut().for_each(|g| *g = 0.0),
        }
    }
}

/// AdamW settings (decoupled weight decay, as `torch.optim.AdamW`).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// True when no value is NaN or infinite (branch-free, so it vectorises).
#[inline]
fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & ((v.to_bits() & 0x7fff_ffff) < 0x7f80_0000))
}

/// Values per chunk of the fused check-and-update loop (four 4 KiB streams stay in L1).
const CHUNK: usize = 1024;

struct Coef {
    beta1: f32,
    beta2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
    decay: f32,
    lr: f32,
}

impl Coef {
    /// Check the gradient, update, check the result, one L1-sized chunk at a time.
    #[inline]
    fn update(&self, data: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32]) -> Result<(), NonFinite> {
        let chunks = data.chunks_mut(CHUNK).zip(grad.chunks(CHUNK)).zip(m.chunks_mut(CHUNK)).zip(v.chunks_mut(CHUNK));
        for (((p, g), m), v) in chunks {
            if !all_finite(g) {
                return Err(NonFinite::Grad);
            }
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                *m = self.beta1 * *m + (1.0 - self.beta1) * g;
                *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
                let mhat = *m / self.bc1;
                let vhat = *v / self.bc2;
                *p = *p * self.decay - self.lr * mhat / (vhat.sqrt() + self.eps);
            }
            if !all_finite(p) {
                return Err(NonFinite::Data);
            }
        }
        Ok(())
    }
}

impl AdamW {
    /// One update of `p` at step `t` (1-based) with learning rate `lr` (which may follow a schedule).
    pub fn step(&self, p: &mut Param, t: u64, lr: f32) {
        let _ = self.step_checked(p, t, lr);
    }

    /// [`AdamW::step`] that also checks, in the same pass, that the gradient and the updated values are
    /// finite. On an error the parameter is partly updated (the caller stops training).
    pub fn step_checked(&self, p: &mut Param, t: u64, lr: f32) -> Result<(), NonFinite> {
        if p.grad.is_empty() {
            return Ok(());
        }
        p.grad_settled();
        if p.m.len() != p.data.len() {
            p.m = vec![0.0; p.data.len()];
            p.v = vec![0.0; p.data.len()];
            if let Some(r) = &mut p.rows {
                r.seen.iter().for_each(|&row| r.in_seen[row as usize] = false);
                r.seen.clear();
            }
        }
        let c = Coef {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            bc1: 1.0 - self.beta1.powi(t as i32),
            bc2: 1.0 - self.beta2.powi(t as i32),
            decay: 1.0 - lr * self.weight_decay,
            lr,
        };
        let Some(r) = &mut p.rows else {
            return c.update(&mut p.data, &p.grad, &mut p.m, &mut p.v);
        };
        let n = r.row_len;
        for &row in &r.step {
            if !r.in_seen[row as usize] {
                r.in_seen[row as usize] = true;
                r.seen.push(row);
            }
        }
        // Debug builds check the invariant on small tables (a full scan of a real vocabulary each step is too slow).
        if cfg!(debug_assertions) && p.grad.len() <= 1 << 20 {
            for (row, g) in p.grad.chunks(n).enumerate() {
                assert!(r.in_step[row] || g.iter().all(|&x| x == 0.0), "row {row} has a gradient not recorded");
            }
        }
        for &row in &r.seen {
            let s = row as usize * n..(row as usize + 1) * n;
            c.update(&mut p.data[s.clone()], &p.grad[s.clone()], &mut p.m[s.clone()], &mut p.v[s])?;
        }
        // Rows never touched: zero gradient and moments, so the dense update is exactly `p · decay`.
        if c.decay != 1.0 {
            for (row, x) in p.data.chunks_mut(n).enumerate() {
                if !r.in_seen[row] {
                    x.iter_mut().for_each(|x| *x *= c.decay);
                    if !all_finite(x) {
                        return Err(NonFinite::Data);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_minimises_a_quadratic_and_frozen_params_never_move() {
        let mut p = Param::new(vec![3], vec![1.0, -2.0, 3.0]);
        p.set_trainable(true);
        let opt = AdamW { lr: 0.1, ..Default::default() };
        for t in 1..=500 {
            p.zero_grad();
            for i in 0..3 {
                p.grad[i] = 2.0 * (p.data[i] - 0.5);
            }
            opt.step(&mut p, t, opt.lr);
        }
        for v in &p.data {
            assert!((v - 0.5).abs() < 1e-2, "{v}");
        }
        let mut f = Param::new(vec![2], vec![1.0, 2.0]);
        opt.step(&mut f, 1, 0.1);
        assert_eq!(f.data, vec![1.0, 2.0]);
    }

    /// The row-sparse update is the dense one, bit for bit: rows used in some steps and not others, weight
    /// decay on, moments reallocated after a freeze.
    #[test]
    fn row_sparse_adamw_equals_dense_bit_for_bit() {
        use rand::{Rng, SeedableRng};
        let (rows, n) = (40, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let init: Vec<f32> = (0..rows * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let mut dense = Param::new(vec![rows, n], init.clone());
        let mut sparse = Param::new(vec![rows, n], init);
        sparse.set_row_sparse(n);
        let opt = AdamW { lr: 0.05, weight_decay: 0.1, ..Default::default() };
        for round in 0..2 {
            dense.set_trainable(true);
            sparse.set_trainable(true);
            for t in 1..=6u64 {
                dense.zero_grad();
                sparse.zero_grad();
                for _ in 0..5 {
                    let row = rng.gen_range(0..rows / 2 + round * 10);
                    for j in 0..n {
                        let g = rng.gen_range(-1.0f32..1.0);
                        dense.grad[row * n + j] += g;
                        sparse.grad_row_mut(row, n)[j] += g;
                    }
                }
                opt.step_checked(&mut dense, t, opt.lr * (1.0 - 0.1 * t as f32)).unwrap();
                opt.step_checked(&mut sparse, t, opt.lr * (1.0 - 0.1 * t as f32)).unwrap();
                let bits = |p: &Param| p.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&dense), bits(&sparse), "round {round} step {t}");
                assert_eq!(dense.m, sparse.m);
                assert_eq!(dense.v, sparse.v);
            }
            dense.set_trainable(false);
            sparse.set_trainable(false);
        }
    }

    #[test]
    fn checked_step_reports_non_finite_gradients_and_values() {
        let opt = AdamW::default();
        let mut p = Param::new(vec![3000], vec![1.0; 3000]);
        p.set_trainable(true);
        p.grad[2500] = f32::NAN;
        assert_eq!(opt.step_checked(&mut p, 1, 0.1), Err(NonFinite::Grad));
        let mut q = Param::new(vec![2], vec![f32::MAX, 0.0]);
        q.set_trainable(true);
        q.grad[0] = -1.0;
        let big = AdamW { weight_decay: -1.0, ..Default::default() };
        assert_eq!(big.step_checked(&mut q, 1, 1.0), Err(NonFinite::Data));
        let mut e = Param::new(vec![4, 2], vec![1.0; 8]);
        e.set_row_sparse(2);
        e.set_trainable(true);
        e.grad_row_mut(3, 2)[1] = f32::INFINITY;
        assert_eq!(opt.step_checked(&mut e, 1, 0.1), Err(NonFinite::Grad));
    }
}

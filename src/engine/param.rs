//! Parameters (value, and a gradient only when trainable) and the AdamW optimiser.

/// A tensor of the model. Frozen parameters carry no gradient buffer, so no code path can update them.
#[derive(Clone, Debug, Default)]
pub struct Param {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// Gradient, same length as `data` when trainable, empty when frozen.
    pub grad: Vec<f32>,
    /// AdamW first and second moments (allocated on first step).
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "Param shape {shape:?} vs {} values", data.len());
        Param { shape, data, grad: Vec::new(), m: Vec::new(), v: Vec::new() }
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
            }
        } else {
            self.grad = Vec::new();
            self.m = Vec::new();
            self.v = Vec::new();
        }
    }
    pub fn zero_grad(&mut self) {
        self.grad.iter_mut().for_each(|g| *g = 0.0);
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

impl AdamW {
    /// One update of `p` at step `t` (1-based) with learning rate `lr` (which may follow a schedule).
    pub fn step(&self, p: &mut Param, t: u64, lr: f32) {
        if p.grad.is_empty() {
            return;
        }
        if p.m.len() != p.data.len() {
            p.m = vec![0.0; p.data.len()];
            p.v = vec![0.0; p.data.len()];
        }
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        let decay = 1.0 - lr * self.weight_decay;
        for i in 0..p.data.len() {
            let g = p.grad[i];
            p.m[i] = self.beta1 * p.m[i] + (1.0 - self.beta1) * g;
            p.v[i] = self.beta2 * p.v[i] + (1.0 - self.beta2) * g * g;
            let mhat = p.m[i] / bc1;
            let vhat = p.v[i] / bc2;
            p.data[i] = p.data[i] * decay - lr * mhat / (vhat.sqrt() + self.eps);
        }
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
}

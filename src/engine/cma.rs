//! CMA-ES with an ask/tell interface, so that a caller can score a whole generation at once (LoraHub scores
//! its population with one batched forward pass).
//!
//! This is the standard (μ/μ_w, λ)-CMA-ES of Hansen's tutorial ("The CMA Evolution Strategy: A Tutorial",
//! arXiv:1604.00772, default parameters of its table 1 with positive recombination weights only):
//! λ = 4 + ⌊3 ln n⌋, μ = ⌊λ/2⌋, w_i ∝ ln((λ+1)/2) − ln i, cumulative step-size adaptation, rank-one and
//! rank-μ covariance updates, c_m = 1. The covariance matrix is decomposed every generation (the dimensions
//! used here are small). The search is unbounded; callers that need a box clamp the points they evaluate.

use nalgebra::{DMatrix, DVector};
use rand::{Rng, SeedableRng};

/// One CMA-ES run. [`ask`](Self::ask) gives λ points, [`tell`](Self::tell) takes their objective values (lower
/// is better) in the same order and updates the distribution.
pub struct CmaEs {
    n: usize,
    lambda: usize,
    weights: Vec<f64>,
    mueff: f64,
    cc: f64,
    cs: f64,
    c1: f64,
    cmu: f64,
    damps: f64,
    /// E‖N(0, I)‖.
    chi_n: f64,
    mean: DVector<f64>,
    sigma: f64,
    pc: DVector<f64>,
    ps: DVector<f64>,
    c: DMatrix<f64>,
    /// Eigenvectors of C (columns) and the square roots of its eigenvalues: C = B·D²·Bᵀ.
    b: DMatrix<f64>,
    d: DVector<f64>,
    generation: usize,
    rng: rand::rngs::StdRng,
    /// Steps y_k = B·D·z_k of the points handed out by the last `ask`, waiting for `tell`.
    pending: Vec<DVector<f64>>,
    best: Option<(Vec<f64>, f64)>,
    evaluations: usize,
}

impl CmaEs {
    /// A run from `mean` with step size `sigma`, the default population size and a seeded generator.
    pub fn new(mean: Vec<f64>, sigma: f64, seed: u64) -> Self {
        let n = mean.len().max(1);
        let lambda = 4 + (3.0 * (n as f64).ln()).floor() as usize;
        Self::with_population(mean, sigma, lambda, seed)
    }

    /// As [`new`](Self::new) with population size `lambda` (at least 2).
    pub fn with_population(mean: Vec<f64>, sigma: f64, lambda: usize, seed: u64) -> Self {
        assert!(!mean.is_empty(), "CMA-ES needs at least one dimension");
        assert!(lambda >= 2, "CMA-ES needs a population of at least 2");
        assert!(sigma > 0.0 && sigma.is_finite(), "CMA-ES step size must be positive, got {sigma}");
        let n = mean.len();
        let nf = n as f64;
        let mu = lambda / 2;
        let raw: Vec<f64> = (1..=mu).map(|i| ((lambda as f64 + 1.0) / 2.0).ln() - (i as f64).ln()).collect();
        let sum: f64 = raw.iter().sum();
        let weights: Vec<f64> = raw.iter().map(|w| w / sum).collect();
        let mueff = 1.0 / weights.iter().map(|w| w * w).sum::<f64>();
        let cc = (4.0 + mueff / nf) / (nf + 4.0 + 2.0 * mueff / nf);
        let cs = (mueff + 2.0) / (nf + mueff + 5.0);
        let c1 = 2.0 / ((nf + 1.3).powi(2) + mueff);
        let cmu = (1.0 - c1).min(2.0 * (mueff - 2.0 + 1.0 / mueff) / ((nf + 2.0).powi(2) + mueff));
        let damps = 1.0 + 2.0 * (((mueff - 1.0) / (nf + 1.0)).sqrt() - 1.0).max(0.0) + cs;
        let chi_n = nf.sqrt() * (1.0 - 1.0 / (4.0 * nf) + 1.0 / (21.0 * nf * nf));
        CmaEs {
            n,
            lambda,
            weights,
            mueff,
            cc,
            cs,
            c1,
            cmu,
            damps,
            chi_n,
            mean: DVector::from_vec(mean),
            sigma,
            pc: DVector::zeros(n),
            ps: DVector::zeros(n),
            c: DMatrix::identity(n, n),
            b: DMatrix::identity(n, n),
            d: DVector::from_element(n, 1.0),
            generation: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            pending: Vec::new(),
            best: None,
            evaluations: 0,
        }
    }

    /// Population size λ.
    pub fn population_size(&self) -> usize {
        self.lambda
    }

    /// Generations completed (calls of `tell`).
    pub fn generation(&self) -> usize {
        self.generation
    }

    /// Objective values received so far.
    pub fn evaluations(&self) -> usize {
        self.evaluations
    }

    pub fn mean(&self) -> &[f64] {
        self.mean.as_slice()
    }

    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// The best point evaluated so far and its value.
    pub fn best(&self) -> Option<(&[f64], f64)> {
        self.best.as_ref().map(|(x, v)| (x.as_slice(), *v))
    }

    /// Sample the next generation: λ points `m + σ·B·D·z`, `z ~ N(0, I)`.
    pub fn ask(&mut self) -> Vec<Vec<f64>> {
        self.pending.clear();
        let mut points = Vec::with_capacity(self.lambda);
        for _ in 0..self.lambda {
            let z = DVector::from_iterator(self.n, (0..self.n).map(|_| std_normal(&mut self.rng)));
            let y = &self.b * z.component_mul(&self.d);
            points.push((&self.mean + self.sigma * &y).as_slice().to_vec());
            self.pending.push(y);
        }
        points
    }

    /// Update the distribution from the values of the points the last [`ask`](Self::ask) returned, in the same
    /// order. NaN counts as worse than every number.
    pub fn tell(&mut self, values: &[f64]) {
        assert_eq!(values.len(), self.pending.len(), "CMA-ES tell: one value per point of the last ask");
        let key = |v: f64| if v.is_nan() { f64::INFINITY } else { v };
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&i, &j| key(values[i]).total_cmp(&key(values[j])));
        let best = order[0];
        if self.best.as_ref().is_none_or(|(_, v)| key(values[best]) < *v) {
            let x = &self.mean + self.sigma * &self.pending[best];
            self.best = Some((x.as_slice().to_vec(), key(values[best])));
        }
        self.evaluations += values.len();
        // Recombination: y_w = Σ w_i·y_{i:λ}, m ← m + σ·y_w.
        let mut yw = DVector::zeros(self.n);
        for (w, &k) in self.weights.iter().zip(&order) {
            yw += *w * &self.pending[k];
        }
        self.mean += self.sigma * &yw;
        // Step-size path, with C^{-1/2}·y_w = B·D⁻¹·Bᵀ·y_w.
        let inv_d = self.d.map(|v| 1.0 / v);
        let c_inv_sqrt_yw = &self.b * (self.b.transpose() * &yw).component_mul(&inv_d);
        self.ps = (1.0 - self.cs) * &self.ps + (self.cs * (2.0 - self.cs) * self.mueff).sqrt() * c_inv_sqrt_yw;
        let g = (self.generation + 1) as f64;
        let ps_norm = self.ps.norm();
        let hsig =
            ps_norm / (1.0 - (1.0 - self.cs).powf(2.0 * g)).sqrt() < (1.4 + 2.0 / (self.n as f64 + 1.0)) * self.chi_n;
        let hs = if hsig { 1.0 } else { 0.0 };
        self.pc = (1.0 - self.cc) * &self.pc + hs * (self.cc * (2.0 - self.cc) * self.mueff).sqrt() * &yw;
        // Covariance: rank-one and rank-μ updates.
        let delta = (1.0 - hs) * self.cc * (2.0 - self.cc);
        let mut rank_mu = DMatrix::zeros(self.n, self.n);
        for (w, &k) in self.weights.iter().zip(&order) {
            let y = &self.pending[k];
            rank_mu += *w * y * y.transpose();
        }
        self.c = (1.0 - self.c1 - self.cmu + self.c1 * delta) * &self.c
            + self.c1 * &self.pc * self.pc.transpose()
            + self.cmu * rank_mu;
        // Step size.
        self.sigma *= ((self.cs / self.damps) * (ps_norm / self.chi_n - 1.0)).exp();
        self.decompose();
        self.pending.clear();
        self.generation += 1;
    }

    /// C = B·D²·Bᵀ, after symmetrising C.
    fn decompose(&mut self) {
        self.c = (&self.c + self.c.transpose()) * 0.5;
        let eig = self.c.clone().symmetric_eigen();
        self.b = eig.eigenvectors;
        self.d = eig.eigenvalues.map(|v| v.max(1e-300).sqrt());
    }
}

/// A standard normal draw (Box–Muller).
fn std_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run `generations` generations on `f`, evaluating each point clamped to `[lo, hi]`; returns the best value.
    fn minimise(f: impl Fn(&[f64]) -> f64, mut es: CmaEs, generations: usize, lo: f64, hi: f64) -> f64 {
        for _ in 0..generations {
            let pts = es.ask();
            let vals: Vec<f64> =
                pts.iter().map(|p| f(&p.iter().map(|v| v.clamp(lo, hi)).collect::<Vec<_>>())).collect();
            es.tell(&vals);
        }
        es.best().unwrap().1
    }

    fn sphere(x: &[f64]) -> f64 {
        x.iter().map(|v| (v - 0.3) * (v - 0.3)).sum()
    }

    fn rosenbrock(x: &[f64]) -> f64 {
        (0..x.len() - 1).map(|i| 100.0 * (x[i + 1] - x[i] * x[i]).powi(2) + (1.0 - x[i]).powi(2)).sum()
    }

    fn rastrigin(x: &[f64]) -> f64 {
        10.0 * x.len() as f64 + x.iter().map(|v| v * v - 10.0 * (2.0 * std::f64::consts::PI * v).cos()).sum::<f64>()
    }

    #[test]
    fn default_parameters_follow_the_tutorial() {
        let es = CmaEs::new(vec![0.0; 10], 0.5, 0);
        assert_eq!(es.population_size(), 10); // 4 + ⌊3 ln 10⌋ = 4 + 6
        assert_eq!(es.weights.len(), 5);
        assert!((es.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(es.weights.windows(2).all(|w| w[0] > w[1]));
        // μ_eff for λ = 10 is about 3.17
        assert!((es.mueff - 3.1672).abs() < 1e-3, "{}", es.mueff);
        assert_eq!(CmaEs::new(vec![0.0; 2], 0.5, 0).population_size(), 6);
    }

    #[test]
    fn minimises_sphere_and_rosenbrock() {
        let v = minimise(sphere, CmaEs::new(vec![0.0; 4], 0.5, 1), 200, f64::MIN, f64::MAX);
        assert!(v < 1e-12, "sphere {v}");
        let v = minimise(rosenbrock, CmaEs::new(vec![0.0; 4], 0.5, 2), 1500, f64::MIN, f64::MAX);
        assert!(v < 1e-10, "rosenbrock {v}");
    }

    #[test]
    fn finds_the_box_corner_when_the_optimum_is_outside_the_box() {
        // sphere centred at 3 in every coordinate, evaluated clamped to [-1.5, 1.5]: the best is the corner 1.5
        let f = |x: &[f64]| x.iter().map(|v| (v - 3.0) * (v - 3.0)).sum::<f64>();
        let v = minimise(f, CmaEs::new(vec![0.0; 5], 0.5, 3), 60, -1.5, 1.5);
        assert!((v - 5.0 * 2.25).abs() < 1e-9, "{v}");
    }

    #[test]
    fn rastrigin_in_a_box_needs_and_gets_a_large_population() {
        // Multimodal: with a large population and step CMA-ES sees the global structure past the local minima
        // (as IPOP-CMA-ES does); with the default λ = 7 from the same start it stays in a local one.
        let solved = |lambda, sigma| {
            (0..10)
                .filter(|&s| {
                    let es = CmaEs::with_population(vec![1.0; 3], sigma, lambda, s);
                    minimise(rastrigin, es, 150, -1.5, 1.5) < 1e-8
                })
                .count()
        };
        let (large, default) = (solved(50, 2.0), solved(7, 0.5));
        assert!(large >= 8, "large population solved {large}/10");
        assert!(default <= 2, "default population solved {default}/10");
    }

    #[test]
    fn same_seed_same_run_and_nan_ranks_last() {
        let run = |seed| {
            let mut es = CmaEs::new(vec![0.2; 3], 0.5, seed);
            for _ in 0..5 {
                let p = es.ask();
                let v: Vec<f64> = p.iter().map(|x| sphere(x)).collect();
                es.tell(&v);
            }
            es.mean().to_vec()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // a NaN value ranks last and does not poison the distribution
        let mut es = CmaEs::new(vec![0.0; 3], 0.5, 9);
        let p = es.ask();
        let v: Vec<f64> = p.iter().enumerate().map(|(i, x)| if i == 0 { f64::NAN } else { sphere(x) }).collect();
        es.tell(&v);
        assert!(es.mean().iter().all(|m| m.is_finite()) && es.sigma().is_finite());
        assert!(es.best().unwrap().1.is_finite());
    }
}

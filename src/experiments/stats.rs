//! The statistics a sweep report prints: Student-t confidence intervals over seeds, the paired t-test, and
//! Spearman's ρ with its p-value.
//!
//! The Student t distribution function is computed through the regularized incomplete beta function:
//! for t ≥ 0 with ν degrees of freedom, P(|T| ≥ t) = I_x(ν/2, 1/2) with x = ν / (ν + t²) (Abramowitz & Stegun
//! 26.7.1 with 26.5.2), and I_x(a, b) by its continued fraction (A&S 26.5.8) evaluated with the modified Lentz
//! method, switching to I_x(a, b) = 1 − I_{1−x}(b, a) where x > (a + 1) / (a + b + 2) so the fraction converges
//! fast. Quantiles invert the distribution function by bisection (monotone, 200 halvings reach f64 resolution).
//! Every value is checked against scipy in the tests (`tools/stats_reference.py` regenerates them).

/// ln Γ(x) for x > 0 (libm's lgamma).
fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// Continued fraction of the incomplete beta function (A&S 26.5.8), modified Lentz evaluation.
fn beta_cf(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let nonzero = |v: f64| if v.abs() < TINY { TINY } else { v };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let mut c = 1.0;
    let mut d = 1.0 / nonzero(1.0 - qab * x / qap);
    let mut h = d;
    // One Lentz step with partial numerator `aa`: updates d and c, returns the factor that multiplies h.
    let step = |aa: f64, c: &mut f64, d: &mut f64| {
        *d = 1.0 / nonzero(1.0 + aa * *d);
        *c = nonzero(1.0 + aa / *c);
        *d * *c
    };
    for m in 1..=10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        h *= step(m * (b - m) * x / ((qam + m2) * (a + m2)), &mut c, &mut d); // even step
        let del = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), &mut c, &mut d); // odd step
        h *= del;
        if (del - 1.0).abs() < 1e-16 {
            break;
        }
    }
    h
}

/// The regularized incomplete beta function I_x(a, b), a, b > 0, x in [0, 1].
pub fn betai(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_cf(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_cf(b, a, 1.0 - x) / b
    }
}

/// Two-sided tail P(|T| ≥ |t|) of Student's t with `df` degrees of freedom.
pub fn t_two_sided(t: f64, df: f64) -> f64 {
    if t.is_infinite() {
        return 0.0;
    }
    betai(df / 2.0, 0.5, df / (df + t * t))
}

/// Distribution function P(T ≤ t) of Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let tail = 0.5 * t_two_sided(t, df);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The `p` quantile of Student's t with `df` degrees of freedom (0 < p < 1), by bisection on [`t_cdf`].
pub fn t_quantile(p: f64, df: f64) -> f64 {
    let (mut lo, mut hi) = (-1.0f64, 1.0f64);
    while t_cdf(lo, df) > p {
        lo *= 2.0;
    }
    while t_cdf(hi, df) < p {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Mean and sample standard deviation (n − 1; 0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n.max(1.0);
    let sd = if v.len() > 1 { (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (m, sd)
}

/// A mean with its two-sided 95 % Student-t confidence interval: mean ± `half` (`None` for n < 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanCi {
    pub n: usize,
    pub mean: f64,
    pub half: Option<f64>,
}

/// Mean ± t_{0.975, n−1} · s / √n of `v`.
pub fn mean_ci(v: &[f64]) -> MeanCi {
    let (mean, sd) = mean_std(v);
    let n = v.len();
    let half = (n >= 2).then(|| t_quantile(0.975, (n - 1) as f64) * sd / (n as f64).sqrt());
    MeanCi { n, mean, half }
}

impl MeanCi {
    /// `76.6 ± 1.2`, or `76.6 (n=1)` where there is no interval.
    pub fn fmt(&self, prec: usize) -> String {
        match self.half {
            Some(h) => format!("{:.prec$} ± {:.prec$}", self.mean, h),
            None => format!("{:.prec$} (n={})", self.mean, self.n),
        }
    }
}

/// A paired t-test of the differences a − b.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Paired {
    pub n: usize,
    /// Mean difference and its 95 % interval (`half` `None` for n < 2).
    pub diff: MeanCi,
    pub t: f64,
    /// Two-sided p-value; `None` for n < 2. Differences all equal give t = ±∞ and p = 0 (or t = 0 and p = 1
    /// when they are all zero).
    pub p: Option<f64>,
}

/// Paired t-test on equal-length `a`, `b`: t = mean(d) / (s_d / √n) with n − 1 degrees of freedom.
pub fn paired_t(a: &[f64], b: &[f64]) -> Paired {
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let diff = mean_ci(&d);
    let n = d.len();
    if n < 2 {
        return Paired { n, diff, t: f64::NAN, p: None };
    }
    let sd = mean_std(&d).1;
    let (t, p) = if sd == 0.0 {
        if diff.mean == 0.0 {
            (0.0, 1.0)
        } else {
            (f64::INFINITY.copysign(diff.mean), 0.0)
        }
    } else {
        let t = diff.mean / (sd / (n as f64).sqrt());
        (t, t_two_sided(t, (n - 1) as f64))
    };
    Paired { n, diff, t, p: Some(p) }
}

/// Midranks (0-based) of `v` (finite values).
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        for k in i..=j {
            r[idx[k]] = (i + j) as f64 / 2.0;
        }
        i = j + 1;
    }
    r
}

/// Pearson correlation of two equal-length vectors (0 when either is constant).
fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let (ma, mb) = (mean_std(a).0, mean_std(b).0);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    if va == 0.0 || vb == 0.0 {
        0.0
    } else {
        cov / (va * vb).sqrt()
    }
}

/// Up to this many pairs the p-value of Spearman's ρ is exact (every one of the n! pairings); above it the
/// t approximation. 8! = 40,320 pairings take about a millisecond.
pub const SPEARMAN_EXACT_MAX: usize = 8;

/// Spearman's ρ with its sample size and two-sided p-value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spearman {
    pub rho: f64,
    pub n: usize,
    /// `None` for n < 3 (no test possible: every pairing of two points has |ρ| = 1).
    pub p: Option<f64>,
    /// Whether `p` is the exact permutation p-value (n ≤ [`SPEARMAN_EXACT_MAX`]) rather than the t approximation.
    pub exact: bool,
}

/// Spearman's ρ (the Pearson correlation of the midranks) of finite `x`, `y`, with its two-sided p-value: for
/// n ≤ [`SPEARMAN_EXACT_MAX`] the share of the n! pairings of x with a permutation of y whose |ρ| is at least
/// the observed one (ties kept as midranks); above, t = ρ √((n − 2) / (1 − ρ²)) on n − 2 degrees of freedom
/// (scipy.stats.spearmanr's p-value).
pub fn spearman(x: &[f64], y: &[f64]) -> Spearman {
    let (a, b) = (ranks(x), ranks(y));
    let rho = pearson(&a, &b);
    let n = x.len();
    if n < 3 {
        return Spearman { rho, n, p: None, exact: n <= SPEARMAN_EXACT_MAX };
    }
    if n <= SPEARMAN_EXACT_MAX {
        let mut perm = b.clone();
        let (mut hits, mut total) = (0u64, 0u64);
        let tol = 1e-12;
        let mut count = |p: &[f64]| {
            total += 1;
            if pearson(&a, p).abs() >= rho.abs() - tol {
                hits += 1;
            }
        };
        heap_permutations(&mut perm, &mut count);
        return Spearman { rho, n, p: Some(hits as f64 / total as f64), exact: true };
    }
    let df = (n - 2) as f64;
    let p = if rho.abs() >= 1.0 { 0.0 } else { t_two_sided(rho * (df / (1.0 - rho * rho)).sqrt(), df) };
    Spearman { rho, n, p: Some(p), exact: false }
}

/// Call `f` on every permutation of `v` (Heap's algorithm, iterative).
fn heap_permutations(v: &mut [f64], f: &mut impl FnMut(&[f64])) {
    let n = v.len();
    let mut c = vec![0usize; n];
    f(v);
    let mut i = 1;
    while i < n {
        if c[i] < i {
            if i % 2 == 0 {
                v.swap(0, i);
            } else {
                v.swap(c[i], i);
            }
            f(v);
            c[i] += 1;
            i = 1;
        } else {
            c[i] = 0;
            i += 1;
        }
    }
}

/// A p-value for a table: `0.012`, `<0.001`, or `–` where there is none.
pub fn fmt_p(p: Option<f64>) -> String {
    match p {
        None => "–".into(),
        Some(p) if p < 0.001 => "<0.001".into(),
        Some(p) => format!("{p:.3}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol * b.abs().max(1e-300), "{a} vs {b}");
    }

    /// scipy 1.17.1 values (tools/stats_reference.py prints them): special.betainc, stats.t.cdf / .ppf.
    #[test]
    fn incomplete_beta_and_student_t_match_scipy() {
        for (a, b, x, want) in [
            (0.5, 0.5, 0.3, 0.36901011956554536),
            (2.0, 0.5, 0.9, 0.5414697392755851),
            (2.5, 0.5, 0.1, 0.001114437541507422),
            (10.0, 3.0, 0.7, 0.25281534785499993),
            (50.0, 0.5, 0.95, 0.02387270549699076),
            (1.0, 1.0, 0.25, 0.25),
        ] {
            close(betai(a, b, x), want, 1e-10);
        }
        for (t, df, want) in [
            (2.0, 4.0, 0.9419417382415922),
            (-1.5, 9.0, 0.08392532802853753),
            (0.3, 1.0, 0.5927735790777423),
            (4.0, 14.0, 0.9993419754030651),
            (-3.2, 29.0, 0.0016592212317408765),
        ] {
            close(t_cdf(t, df), want, 1e-10);
        }
        for (df, want) in [
            (1.0, 12.706204736174694),
            (2.0, 4.302652729749462),
            (4.0, 2.7764451051977934),
            (9.0, 2.262157162798205),
            (14.0, 2.144786687917804),
            (49.0, 2.0095752371292392),
        ] {
            close(t_quantile(0.975, df), want, 1e-10);
        }
    }

    /// scipy.stats.ttest_rel and the t interval of the differences.
    #[test]
    fn paired_t_test_and_interval_match_scipy() {
        let a = [71.2, 68.4, 75.0, 80.1, 66.3, 72.9];
        let b = [69.8, 68.9, 72.4, 78.0, 65.1, 70.2];
        let r = paired_t(&a, &b);
        assert_eq!(r.n, 6);
        close(r.diff.mean, 1.5833333333333333, 1e-12);
        close(r.t, 3.261928755049408, 1e-10);
        close(r.p.unwrap(), 0.022397766109409, 1e-9);
        close(r.diff.half.unwrap(), 1.247754997752094, 1e-9);
        let ci = mean_ci(&[55.0, 58.5, 61.0, 54.5, 57.0]);
        close(ci.half.unwrap(), 3.302686194960119, 1e-9);
        assert_eq!(mean_ci(&[3.0]).fmt(1), "3.0 (n=1)");
        let same = paired_t(&[1.0, 2.0], &[1.0, 2.0]);
        assert_eq!((same.t, same.p), (0.0, Some(1.0)));
        assert_eq!(paired_t(&[2.0, 3.0], &[1.0, 2.0]).p, Some(0.0));
        assert_eq!(paired_t(&[2.0], &[1.0]).p, None);
    }

    /// scipy.stats.spearmanr (t approximation, n > 8) and scipy.stats.permutation_test with
    /// permutation_type='pairings' (exact, n ≤ 8).
    #[test]
    fn spearman_rho_and_p_match_scipy() {
        let x = [0.1, 0.4, 0.35, 0.8, 0.62, 0.05, 0.9, 0.33, 0.71, 0.2];
        let y = [0.02, 0.11, 0.2, 0.3, 0.09, 0.05, 0.41, 0.12, 0.1, 0.15];
        let s = spearman(&x, &y);
        assert!(!s.exact);
        close(s.rho, 0.6121212121212121, 1e-12);
        close(s.p.unwrap(), 0.05997214247725527, 1e-9);
        let s = spearman(&x[..6], &y[..6]);
        assert!(s.exact);
        close(s.rho, 0.7142857142857143, 1e-12);
        close(s.p.unwrap(), 0.1361111111111111, 1e-12);
        // ties (midranks)
        let s = spearman(&[1.0, 2.0, 2.0, 3.0, 4.0], &[1.0, 3.0, 2.0, 2.0, 5.0]);
        close(s.rho, 0.7631578947368421, 1e-12);
        close(s.p.unwrap(), 0.2, 1e-12);
        // two points: ρ = ±1, no test
        let s = spearman(&[1.0, 2.0], &[3.0, 4.0]);
        assert_eq!((s.rho, s.p), (1.0, None));
        // three points in order: the exact p is 2/6, nowhere near significance
        close(spearman(&[1.0, 2.0, 3.0], &[1.0, 5.0, 9.0]).p.unwrap(), 1.0 / 3.0, 1e-12);
    }
}

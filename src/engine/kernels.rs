//! Row-wise kernels with explicit forward and backward passes.
//!
//! Activations are `[rows, cols]` row-major. Work is split across rayon threads in chunks of a fixed number
//! of rows, and every reduction over rows (LayerNorm's γ/β gradients, bias gradients) sums per-chunk partials
//! in chunk order, so results do not depend on how many threads run.

use rayon::prelude::*;

/// Rows per parallel chunk. Fixed so that the summation order never depends on the thread count.
pub const ROW_CHUNK: usize = 16;

/// `wide!(fn name(args) => body)`: an `unsafe fn name` running `body` compiled for 16-lane AVX-512 (the
/// element-wise loops' wide versions, picked at run time by [`wide_simd`]), and on other architectures the same
/// body as is. The bodies are pure IEEE arithmetic in a fixed order (Rust never contracts to FMA), so both
/// builds give bit-identical results. Loops inside must be plain `for` loops (see ARCHITECTURE.md).
macro_rules! wide {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name($($arg: $ty),*) {
            $body
        }
        $(#[$doc])*
        #[cfg(not(target_arch = "x86_64"))]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name($($arg: $ty),*) {
            $body
        }
    };
}
pub(crate) use wide;

/// Per-chunk partial sums over rows, for a parameter gradient summed over the rows: chunk `c` (rows
/// `c·ROW_CHUNK ..`, in parallel) starts from zeros and calls `add_row(r, acc)` for each of its rows in order;
/// the chunks' `width`-entry vectors come back in chunk order (a fixed summation order at any thread count).
fn row_chunk_partials(rows: usize, width: usize, add_row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    (0..rows.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            let mut acc = vec![0.0f32; width];
            for r in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(rows) {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect()
}

/// Sum per-chunk partial vectors (each of `width` entries) in chunk order into `out` (accumulating).
fn reduce_partials(partials: &[f32], width: usize, out: &mut [f32]) {
    for part in partials.chunks(width) {
        for (o, p) in out.iter_mut().zip(part) {
            *o += *p;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Linear: y = x·Wᵀ + b, W stored [out, in] as in PyTorch / Hugging Face.

use super::gemm::{matmul, matmul_bias, Trans};

/// `y[rows, out] = x[rows, in]·Wᵀ (+ b)`.
pub fn linear_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, din: usize, dout: usize, y: &mut [f32]) {
    if let Some(b) = b {
        matmul_bias(rows, dout, din, x, Trans::N, w, Trans::T, b, y);
    } else {
        matmul(rows, dout, din, 1.0, x, Trans::N, w, Trans::T, 0.0, y);
    }
}

/// Input gradient `dx (+)= dy·W`. `accumulate` adds to `dx` instead of overwriting it.
pub fn linear_backward_input(
    dy: &[f32],
    w: &[f32],
    rows: usize,
    din: usize,
    dout: usize,
    dx: &mut [f32],
    accumulate: bool,
) {
    matmul(rows, din, dout, 1.0, dy, Trans::N, w, Trans::N, if accumulate { 1.0 } else { 0.0 }, dx);
}

/// Weight gradient `dW = beta·dW + dyᵀ·x` (only for trainable weights): `beta` 1 accumulates, 0 overwrites
/// (the old contents are then never read).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight(dy: &[f32], x: &[f32], rows: usize, din: usize, dout: usize, beta: f32, dw: &mut [f32]) {
    matmul(dout, din, rows, 1.0, dy, Trans::T, x, Trans::N, beta, dw);
}

/// Bias gradient `db += Σ_rows dy`.
pub fn bias_backward(dy: &[f32], rows: usize, dout: usize, db: &mut [f32]) {
    let partials = row_chunk_partials(rows, dout, |r, acc| {
        for (a, v) in acc.iter_mut().zip(&dy[r * dout..(r + 1) * dout]) {
            *a += *v;
        }
    });
    reduce_partials(&partials, dout, db);
}

// ---------------------------------------------------------------------------------------------------------
// LayerNorm over the last dimension.

/// Lanes of the row sums below: each row is summed as 16 interleaved partial sums (lane `l` adds entries
/// `l, l + 16, …` in order), then the lanes pairwise in a fixed tree. A single running sum is one long chain of
/// dependent additions; 16 lanes are one vector register's worth of independent chains. The order is fixed, so
/// the wide and scalar builds agree bit for bit and nothing depends on the thread count.
pub(crate) const LANES: usize = 16;

/// `Σ_i f(i)` over `0..n` in the fixed 16-lane order described at `LANES`.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let full = n / LANES * LANES;
    for c in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(c + l);
        }
    }
    for (l, a) in acc.iter_mut().enumerate().take(n - full) {
        *a += f(full + l);
    }
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

/// One LayerNorm row: writes `y`, returns `(mean, rstd)`.
#[inline(always)]
fn layernorm_row(xr: &[f32], gamma: &[f32], beta: &[f32], eps: f32, yr: &mut [f32]) -> (f32, f32) {
    let d = xr.len();
    let (gamma, beta, yr) = (&gamma[..d], &beta[..d], &mut yr[..d]);
    let m = lane_sum(d, |i| xr[i]) / d as f32;
    let var = lane_sum(d, |i| (xr[i] - m) * (xr[i] - m)) / d as f32;
    let r = 1.0 / (var + eps).sqrt();
    for i in 0..d {
        yr[i] = (xr[i] - m) * r * gamma[i] + beta[i];
    }
    (m, r)
}

/// One LayerNorm backward row: `dx = rs·(g − mean(g) − x̂·mean(g·x̂))` with `g = dy·γ`, `x̂ = (x − m)·rs`.
#[inline(always)]
fn layernorm_row_backward(dyr: &[f32], xr: &[f32], gamma: &[f32], m: f32, rs: f32, dxr: &mut [f32], accumulate: bool) {
    let d = xr.len();
    let (dyr, gamma, dxr) = (&dyr[..d], &gamma[..d], &mut dxr[..d]);
    let sg = lane_sum(d, |i| dyr[i] * gamma[i]);
    let sgx = lane_sum(d, |i| dyr[i] * gamma[i] * (xr[i] - m) * rs);
    let (mg, mgx) = (sg / d as f32, sgx / d as f32);
    for i in 0..d {
        let xhat = (xr[i] - m) * rs;
        let v = rs * (dyr[i] * gamma[i] - mg - xhat * mgx);
        if accumulate {
            dxr[i] += v;
        } else {
            dxr[i] = v;
        }
    }
}

/// LayerNorm rows of one chunk, `x`, `y` holding `mean.len()` rows of `d`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layernorm_rows(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    for (((yr, xr), mu), rs) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(mean.iter_mut()).zip(rstd.iter_mut()) {
        (*mu, *rs) = layernorm_row(xr, gamma, beta, eps, yr);
    }
}

wide! {
    /// [`layernorm_rows`] compiled for AVX-512.
    fn layernorm_rows_avx512(
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
        d: usize,
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
    ) => layernorm_rows(x, gamma, beta, eps, d, y, mean, rstd)
}

wide! {
    /// [`layernorm_row_backward`] compiled for AVX-512.
    fn layernorm_row_backward_avx512(
        dyr: &[f32],
        xr: &[f32],
        gamma: &[f32],
        m: f32,
        rs: f32,
        dxr: &mut [f32],
        accumulate: bool,
    ) => layernorm_row_backward(dyr, xr, gamma, m, rs, dxr, accumulate)
}

/// `y = (x - mean)/sqrt(var + eps)·γ + β` per row; stores `mean` and `rstd` per row for the backward pass.
/// Row sums in the fixed 16-lane order of `LANES`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let rows = x.len() / d;
    let wide = wide_simd();
    y[..rows * d]
        .par_chunks_mut(d * ROW_CHUNK)
        .zip(x[..rows * d].par_chunks(d * ROW_CHUNK))
        .zip(mean[..rows].par_chunks_mut(ROW_CHUNK).zip(rstd[..rows].par_chunks_mut(ROW_CHUNK)))
        .for_each(|((yc, xc), (mc, rc))| {
            if wide {
                // SAFETY: `wide_simd()` checked the CPU features.
                unsafe { layernorm_rows_avx512(xc, gamma, beta, eps, d, yc, mc, rc) }
            } else {
                layernorm_rows(xc, gamma, beta, eps, d, yc, mc, rc)
            }
        });
}

/// LayerNorm backward. Writes (or with `accumulate` adds) `dx`; adds `dγ`, `dβ` when given.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &[f32],
    x: &[f32],
    mean: &[f32],
    rstd: &[f32],
    gamma: &[f32],
    d: usize,
    dx: &mut [f32],
    accumulate: bool,
    dparams: Option<(&mut [f32], &mut [f32])>,
) {
    let rows = x.len() / d;
    let wide = wide_simd();
    dx[..rows * d].par_chunks_mut(d * ROW_CHUNK).enumerate().for_each(|(c, dxc)| {
        for (j, dxr) in dxc.chunks_exact_mut(d).enumerate() {
            let r = c * ROW_CHUNK + j;
            let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            if wide {
                // SAFETY: as above.
                unsafe { layernorm_row_backward_avx512(dyr, xr, gamma, mean[r], rstd[r], dxr, accumulate) }
            } else {
                layernorm_row_backward(dyr, xr, gamma, mean[r], rstd[r], dxr, accumulate)
            }
        }
    });
    if let Some((dgamma, dbeta)) = dparams {
        let partials = row_chunk_partials(rows, 2 * d, |r, acc| {
            let (m, rs) = (mean[r], rstd[r]);
            for i in 0..d {
                let g = dy[r * d + i];
                acc[i] += g * (x[r * d + i] - m) * rs;
                acc[d + i] += g;
            }
        });
        for part in partials.chunks(2 * d) {
            for i in 0..d {
                dgamma[i] += part[i];
                dbeta[i] += part[d + i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// RMS norm (Llama's RMSNorm, T5's layer norm): y = x / sqrt(mean(x²) + eps) · w, no mean, no bias.

/// One RMS norm row: writes `y`, returns `rstd = 1/sqrt(mean(x²) + eps)`.
#[inline(always)]
fn rmsnorm_row(xr: &[f32], w: &[f32], eps: f32, yr: &mut [f32]) -> f32 {
    let d = xr.len();
    let (w, yr) = (&w[..d], &mut yr[..d]);
    let r = 1.0 / (lane_sum(d, |i| xr[i] * xr[i]) / d as f32 + eps).sqrt();
    for i in 0..d {
        yr[i] = w[i] * (xr[i] * r);
    }
    r
}

/// RMS norm rows of one chunk, `x`, `y` holding `rstd.len()` rows of `d`.
#[inline(always)]
fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) {
    for ((yr, xr), rs) in y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(rstd.iter_mut()) {
        *rs = rmsnorm_row(xr, w, eps, yr);
    }
}

/// One RMS norm backward row: `dx = r·(g − x̂·mean(g·x̂))` with `g = dy·w`, `x̂ = x·r`.
#[inline(always)]
fn rmsnorm_row_backward(dyr: &[f32], xr: &[f32], w: &[f32], rs: f32, dxr: &mut [f32], accumulate: bool) {
    let d = xr.len();
    let (dyr, w, dxr) = (&dyr[..d], &w[..d], &mut dxr[..d]);
    let mgx = lane_sum(d, |i| dyr[i] * w[i] * xr[i] * rs) / d as f32;
    for i in 0..d {
        let v = rs * (dyr[i] * w[i] - xr[i] * rs * mgx);
        if accumulate {
            dxr[i] += v;
        } else {
            dxr[i] = v;
        }
    }
}

wide! {
    /// [`rmsnorm_rows`] compiled for AVX-512.
    fn rmsnorm_rows_avx512(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) =>
        rmsnorm_rows(x, w, eps, d, y, rstd)
}

wide! {
    /// [`rmsnorm_row_backward`] compiled for AVX-512.
    fn rmsnorm_row_backward_avx512(dyr: &[f32], xr: &[f32], w: &[f32], rs: f32, dxr: &mut [f32], accumulate: bool) =>
        rmsnorm_row_backward(dyr, xr, w, rs, dxr, accumulate)
}

/// `y = x / sqrt(mean(x²) + eps) · w` per row of `d`; stores `rstd` per row for the backward pass. The one RMS
/// norm: Llama's `RMSNorm` and T5's `T5LayerNorm`. Row sums in the fixed 16-lane order of `LANES`.
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, d: usize, y: &mut [f32], rstd: &mut [f32]) {
    let rows = x.len() / d;
    let wide = wide_simd();
    y[..rows * d]
        .par_chunks_mut(d * ROW_CHUNK)
        .zip(x[..rows * d].par_chunks(d * ROW_CHUNK))
        .zip(rstd[..rows].par_chunks_mut(ROW_CHUNK))
        .for_each(|((yc, xc), rc)| {
            if wide {
                // SAFETY: `wide_simd()` checked the CPU features.
                unsafe { rmsnorm_rows_avx512(xc, w, eps, d, yc, rc) }
            } else {
                rmsnorm_rows(xc, w, eps, d, yc, rc)
            }
        });
}

/// RMS norm backward: writes (or with `accumulate` adds) `dx`; adds `dw = Σ_rows dy·x̂` when given (chunk
/// partials summed in chunk order).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    dy: &[f32],
    x: &[f32],
    rstd: &[f32],
    w: &[f32],
    d: usize,
    dx: &mut [f32],
    accumulate: bool,
    dw: Option<&mut [f32]>,
) {
    let rows = x.len() / d;
    let wide = wide_simd();
    dx[..rows * d].par_chunks_mut(d * ROW_CHUNK).enumerate().for_each(|(c, dxc)| {
        for (j, dxr) in dxc.chunks_exact_mut(d).enumerate() {
            let r = c * ROW_CHUNK + j;
            let (xr, dyr) = (&x[r * d..(r + 1) * d], &dy[r * d..(r + 1) * d]);
            if wide {
                // SAFETY: `wide_simd()` checked the CPU features.
                unsafe { rmsnorm_row_backward_avx512(dyr, xr, w, rstd[r], dxr, accumulate) }
            } else {
                rmsnorm_row_backward(dyr, xr, w, rstd[r], dxr, accumulate)
            }
        }
    });
    if let Some(dw) = dw {
        let partials = row_chunk_partials(rows, d, |r, acc| {
            for i in 0..d {
                acc[i] += dy[r * d + i] * x[r * d + i] * rstd[r];
            }
        });
        reduce_partials(&partials, d, dw);
    }
}

// ---------------------------------------------------------------------------------------------------------
// GELU, exact (erf) and tanh forms.

/// Which GELU the model's config asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// `x·Φ(x)` with the exact normal CDF (`"gelu"` in Hugging Face configs).
    Erf,
    /// The tanh approximation (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    Tanh,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// erf for f32 as a rational function of x² on [-4, 4] (the approximation Eigen and XLA use for f32; a few
/// ULP from the exact value). Pure arithmetic, so the GELU loops vectorise; libm's `erff` branches per value
/// and made GELU a fifth of a MiniLM training step.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_6e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_473_9e-2;
    p / q
}

/// `tanh(u) = 1 − 2/(e^{2u} + 1)` through [`fast_exp`]: pure arithmetic, so the tanh-GELU loops vectorise.
/// libm's `tanhf` (with its `expm1f`) ran one value at a time and took about 18 % of a Flan-T5-small-shaped
/// training step's samples in `perf` (bench/README.md). Absolute error ≤ 3e-7 (tested against libm): GELU uses
/// `1 + tanh` and `1 − tanh²`, where an absolute error is what counts. `e^{2u}` saturating (at e^88.7) gives 1 and
/// to 0 gives −1, so no clamp is needed; NaN stays NaN.
#[inline(always)]
fn tanh_fast(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0)
}

impl Gelu {
    #[inline]
    pub fn f(self, x: f32) -> f32 {
        match self {
            Gelu::Erf => 0.5 * x * (1.0 + erf(x * INV_SQRT_2)),
            Gelu::Tanh => 0.5 * x * (1.0 + tanh_fast(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))),
        }
    }
    #[inline]
    pub fn df(self, x: f32) -> f32 {
        match self {
            Gelu::Erf => {
                let cdf = 0.5 * (1.0 + erf(x * INV_SQRT_2));
                let pdf = fast_exp(-0.5 * x * x) * 0.398_942_3;
                cdf + x * pdf
            }
            Gelu::Tanh => {
                let u = SQRT_2_OVER_PI * (x + 0.044715 * x * x * x);
                let t = tanh_fast(u);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
        }
    }
}

/// `y = gelu(x)` elementwise.
pub fn gelu_forward(kind: Gelu, x: &[f32], y: &mut [f32]) {
    let wide = wide_simd();
    y[..x.len()].par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yc, xc)| {
        if wide {
            // SAFETY: `wide_simd()` checked that the CPU has AVX-512F, AVX2 and FMA.
            unsafe { gelu_f_avx512(kind, xc, yc) }
        } else {
            gelu_f_loop(kind, xc, yc)
        }
    });
}

/// `dx = dy·gelu'(x)` elementwise, in place on `d` (which holds `dy` on entry).
pub fn gelu_backward_inplace(kind: Gelu, x: &[f32], d: &mut [f32]) {
    let wide = wide_simd();
    d[..x.len()].par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(dc, xc)| {
        if wide {
            // SAFETY: as above.
            unsafe { gelu_df_avx512(kind, xc, dc) }
        } else {
            gelu_df_loop(kind, xc, dc)
        }
    });
}

#[inline(always)]
fn gelu_f_loop(kind: Gelu, x: &[f32], y: &mut [f32]) {
    // Plain `for` loops, not `for_each`: `for_each` calls `Zip::fold`, which LLVM may keep out of line, and an
    // out-of-line generic is compiled without the caller's AVX-512 features (the erf backward loop ran 4-wide
    // that way). `for` only calls the tiny `next`, which always inlines.
    match kind {
        Gelu::Erf => {
            for (o, v) in y.iter_mut().zip(x) {
                *o = Gelu::Erf.f(*v);
            }
        }
        Gelu::Tanh => {
            for (o, v) in y.iter_mut().zip(x) {
                *o = Gelu::Tanh.f(*v);
            }
        }
    }
}

#[inline(always)]
fn gelu_df_loop(kind: Gelu, x: &[f32], d: &mut [f32]) {
    match kind {
        Gelu::Erf => {
            for (g, v) in d.iter_mut().zip(x) {
                *g *= Gelu::Erf.df(*v);
            }
        }
        Gelu::Tanh => {
            for (g, v) in d.iter_mut().zip(x) {
                *g *= Gelu::Tanh.df(*v);
            }
        }
    }
}

wide! {
    /// [`gelu_f_loop`] compiled for AVX-512.
    fn gelu_f_avx512(kind: Gelu, x: &[f32], y: &mut [f32]) => gelu_f_loop(kind, x, y)
}
wide! {
    /// [`gelu_df_loop`] compiled for AVX-512.
    fn gelu_df_avx512(kind: Gelu, x: &[f32], d: &mut [f32]) => gelu_df_loop(kind, x, d)
}

/// Whether the CPU runs the 16-lane versions of the element-wise loops (checked once).
pub fn wide_simd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *WIDE.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `e^x` in pure arithmetic (so loops over it vectorise, unlike libm's `expf`): `x = n·ln2 + r`,
/// `e^r` by a degree-6 polynomial on |r| ≤ ln2/2, `2^n` by building the exponent bits. Relative error
/// ≤ 2e-7 over the normal range (tested against libm); inputs below −87.3 give 0, and inputs above 88.7 saturate at e^88.7 ≈ 3.3e38 (finite).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round x·log2(e) to the nearest integer (ties to even) by adding 1.5·2²³: the sum's low mantissa bits then
    // hold n itself. No `round`/`floor` calls, which on baseline x86-64 become libm calls and stop the
    // surrounding loop from vectorising.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.3, 88.7);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 720.0f32;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // 2^n in two halves so that n = 128 (x near 88.7) does not overflow the exponent field.
    let h = ni >> 1; // ⌊n/2⌋
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((ni - h + 127) as u32) << 23);
    let y = p * s1 * s2;
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

/// The same algorithm written with `round_ties_even` and `floor`, as a reference for the bit trick.
#[cfg(test)]
fn fast_exp_reference(x: f32) -> f32 {
    let xc = x.clamp(-87.3, 88.7);
    let n = (xc * std::f32::consts::LOG2_E).round_ties_even();
    let r = xc - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let mut p = 1.0 / 720.0f32;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p * r + c;
    }
    let h = (n * 0.5).floor();
    let y = p * f32::from_bits(((h as i32 + 127) as u32) << 23) * f32::from_bits((((n - h) as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

#[cfg(test)]
#[test]
fn fast_exp_rounding_trick_is_bit_identical_to_round_and_floor() {
    let mut x = -90.0f32;
    while x < 90.0 {
        assert_eq!(fast_exp(x).to_bits(), fast_exp_reference(x).to_bits(), "x = {x}");
        x += 7.3e-4;
    }
    for x in [-87.3f32, 88.7, -0.5 * std::f32::consts::LN_2, 0.5 * std::f32::consts::LN_2, 0.0, -0.0, 1e-30] {
        assert_eq!(fast_exp(x).to_bits(), fast_exp_reference(x).to_bits(), "x = {x}");
    }
}

#[cfg(test)]
#[test]
fn fast_exp_matches_libm() {
    let mut worst = 0.0f64;
    for i in -873_000..=887_000 {
        let x = i as f32 * 1e-4;
        let (a, b) = (fast_exp(x) as f64, (x as f64).exp());
        worst = worst.max(((a - b) / b).abs());
    }
    assert!(worst < 3e-7, "max relative error {worst}");
    assert_eq!(fast_exp(-100.0), 0.0);
    assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    assert!(fast_exp(0.0) == 1.0);
}

#[cfg(test)]
#[test]
fn tanh_fast_matches_libm() {
    let mut worst = 0.0f64;
    for i in -200_000..=200_000 {
        let u = i as f32 * 1e-4;
        worst = worst.max((tanh_fast(u) as f64 - (u as f64).tanh()).abs());
    }
    assert!(worst < 3e-7, "max absolute error {worst}");
    assert_eq!(tanh_fast(100.0), 1.0);
    assert_eq!(tanh_fast(-100.0), -1.0);
    assert_eq!(tanh_fast(f32::INFINITY), 1.0);
    assert_eq!(tanh_fast(f32::NEG_INFINITY), -1.0);
    assert!(tanh_fast(f32::NAN).is_nan());
}

#[cfg(test)]
#[test]
fn wide_and_scalar_gelu_are_bit_identical() {
    let x: Vec<f32> = (0..5000).map(|i| (i as f32 - 2500.0) * 3.7e-3).collect();
    for kind in [Gelu::Erf, Gelu::Tanh] {
        let (mut a, mut b) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        gelu_f_loop(kind, &x, &mut a);
        gelu_forward(kind, &x, &mut b);
        assert_eq!(a, b);
        let (mut da, mut db) = (vec![0.7f32; x.len()], vec![0.7f32; x.len()]);
        gelu_df_loop(kind, &x, &mut da);
        gelu_backward_inplace(kind, &x, &mut db);
        assert_eq!(da, db);
    }
}

#[cfg(test)]
#[test]
fn wide_and_scalar_layernorm_are_bit_identical_and_lane_sums_are_accurate() {
    // d = 37 has a partial last lane group; 384 is BERT's width
    for d in [37usize, 384] {
        let rows = 40;
        let x: Vec<f32> = (0..rows * d).map(|i| ((i * 7919 % 1013) as f32 - 500.0) * 1e-2 + 3.0).collect();
        let g: Vec<f32> = (0..d).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..d).map(|i| (i % 5) as f32 * 0.01).collect();
        let (mut y1, mut m1, mut r1) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm_rows(&x, &g, &b, 1e-5, d, &mut y1, &mut m1, &mut r1);
        let (mut y2, mut m2, mut r2) = (vec![0.0; rows * d], vec![0.0; rows], vec![0.0; rows]);
        layernorm_forward(&x, &g, &b, 1e-5, d, &mut y2, &mut m2, &mut r2);
        assert_eq!((&y1, &m1, &r1), (&y2, &m2, &r2));
        let dy: Vec<f32> = (0..rows * d).map(|i| ((i * 104729 % 997) as f32 - 498.0) * 1e-3).collect();
        let mut dx1 = vec![0.0; rows * d];
        for r in 0..rows {
            let s = r * d..(r + 1) * d;
            layernorm_row_backward(&dy[s.clone()], &x[s.clone()], &g, m1[r], r1[r], &mut dx1[s], false);
        }
        let mut dx2 = vec![0.0; rows * d];
        layernorm_backward(&dy, &x, &m2, &r2, &g, d, &mut dx2, false, None);
        assert_eq!(dx1, dx2);
        // the lane order sums as accurately as a sequential f32 sum (compared in f64)
        for r in 0..rows {
            let xr = &x[r * d..(r + 1) * d];
            let exact: f64 = xr.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            assert!((m1[r] as f64 - exact).abs() <= 1e-6 * (1.0 + exact.abs()), "row {r}: {} vs {exact}", m1[r]);
        }
    }
}

#[cfg(test)]
#[test]
fn fast_erf_matches_libm() {
    let mut worst = 0.0f32;
    for i in -60000..=60000 {
        let x = i as f32 * 1e-4;
        worst = worst.max((erf(x) - libm::erff(x)).abs());
    }
    assert!(worst < 5e-7, "max |erf - erff| = {worst}");
}

// ---------------------------------------------------------------------------------------------------------
// Softmax cross-entropy (mean over the batch).

/// Returns the mean loss and writes `dlogits = (softmax - onehot)/batch`. `probs` receives the softmax.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[usize],
    classes: usize,
    probs: &mut [f32],
    dlogits: &mut [f32],
) -> f32 {
    let b = labels.len();
    let mut loss = 0.0f64;
    for i in 0..b {
        let row = &logits[i * classes..(i + 1) * classes];
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0f32;
        for (p, v) in probs[i * classes..(i + 1) * classes].iter_mut().zip(row) {
            *p = (v - mx).exp();
            s += *p;
        }
        let inv = 1.0 / s;
        for j in 0..classes {
            probs[i * classes + j] *= inv;
            dlogits[i * classes + j] = probs[i * classes + j] / b as f32;
        }
        dlogits[i * classes + labels[i]] -= 1.0 / b as f32;
        loss += -((row[labels[i]] - mx) as f64 - (s as f64).ln());
    }
    (loss / b as f64) as f32
}

/// In-place softmax over each row of length `n`.
pub fn softmax_rows(x: &mut [f32], n: usize) {
    for row in x.chunks_mut(n) {
        let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - mx).exp();
            s += *v;
        }
        let inv = 1.0 / s;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

// ---------------------------------------------------------------------------------------------------------
// Pooling over the sequence: mean over unmasked tokens, or the first ([CLS]) token.

/// Pooling mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Mean,
    Cls,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "cls" => Ok(Pooling::Cls),
            _ => Err(format!("unknown pooling '{s}' (expected mean or cls)")),
        }
    }
}

/// `h` is `[batch, seq, d]`, `mask` `[batch, seq]` (1 = token, 0 = padding). Writes `out[batch, d]`.
pub fn pool_forward(mode: Pooling, h: &[f32], mask: &[f32], batch: usize, seq: usize, d: usize, out: &mut [f32]) {
    out[..batch * d].par_chunks_mut(d).enumerate().for_each(|(b, o)| match mode {
        Pooling::Cls => o.copy_from_slice(&h[b * seq * d..b * seq * d + d]),
        Pooling::Mean => {
            o.fill(0.0);
            let mut cnt = 0.0f32;
            for s in 0..seq {
                let m = mask[b * seq + s];
                if m != 0.0 {
                    cnt += m;
                    let hr = &h[(b * seq + s) * d..(b * seq + s + 1) * d];
                    for (a, v) in o.iter_mut().zip(hr) {
                        *a += m * v;
                    }
                }
            }
            let inv = 1.0 / cnt.max(1e-9);
            o.iter_mut().for_each(|v| *v *= inv);
        }
    });
}

/// Backward of [`pool_forward`]: writes `dh[batch, seq, d]`.
pub fn pool_backward(mode: Pooling, dout: &[f32], mask: &[f32], batch: usize, seq: usize, d: usize, dh: &mut [f32]) {
    dh[..batch * seq * d].par_chunks_mut(seq * d).enumerate().for_each(|(b, dhb)| {
        dhb.fill(0.0);
        let g = &dout[b * d..(b + 1) * d];
        match mode {
            Pooling::Cls => dhb[..d].copy_from_slice(g),
            Pooling::Mean => {
                let cnt: f32 = mask[b * seq..(b + 1) * seq].iter().sum::<f32>().max(1e-9);
                for s in 0..seq {
                    let m = mask[b * seq + s];
                    if m != 0.0 {
                        for (o, v) in dhb[s * d..(s + 1) * d].iter_mut().zip(g) {
                            *o = m * v / cnt;
                        }
                    }
                }
            }
        }
    });
}

/// L2-normalise each row of `x` in place (as sentence-transformers' Normalize module; eps 1e-12).
pub fn l2_normalize_rows(x: &mut [f32], d: usize) {
    for row in x.chunks_mut(d) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
}

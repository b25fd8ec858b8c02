//! The one GEMM entry point. Every matrix product in loracomp goes through [`matmul`].
//!
//! Matrices are row-major `f32` slices. `op(X)` is `X` or `Xᵀ` as the `Trans` flag says; transposes are
//! expressed as strides, never materialised. The work is done by the `gemm` crate, which picks the widest
//! SIMD kernel the CPU offers at run time (AVX-512 with the `x86-v4` feature) and splits work across rayon
//! threads when the product is large enough to pay for it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

/// Arithmetic of the matrix products: f32 throughout, or bf16 operands with f32 accumulation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    F32,
    Bf16,
}

static COMPUTE: AtomicU8 = AtomicU8::new(0);

/// Products of fewer flops than this, or with `m` under 16 or `n` under 128, stay f32 in bf16 mode: packing
/// (∝ m·k + k·n) costs more than the faster kernel saves. Measured (release, 2 threads, best of 5):
/// [1024, 384] × [384, 64] 0.93× as fast in bf16 as the f32 `gemm` crate, × [384, 384] 1.6× faster.
pub const BF16_MIN_FLOPS: f64 = 4.0e6;

/// Choose the arithmetic of [`matmul`] for the whole process (default [`Compute::F32`]). Bf16 takes effect only
/// where the CPU has `avx512bf16` (see [`bf16_active`]); elsewhere products stay f32. Only GEMM operands are
/// rounded: every parameter, gradient, activation and reduction stays f32.
pub fn set_compute(c: Compute) {
    COMPUTE.store(c as u8, Ordering::SeqCst);
}

/// The requested arithmetic.
pub fn compute() -> Compute {
    if COMPUTE.load(Ordering::Relaxed) == Compute::Bf16 as u8 {
        Compute::Bf16
    } else {
        Compute::F32
    }
}

/// Whether large products run in bf16 now: requested, and the CPU can.
pub fn bf16_active() -> bool {
    compute() == Compute::Bf16 && super::bf16::available()
}

/// Shapes of the products issued while recording (for the benchmark's GEMM floor).
static RECORDING: AtomicBool = AtomicBool::new(false);
static CALLS: Mutex<Vec<GemmCall>> = Mutex::new(Vec::new());

/// One recorded product: `[m, k] × [k, n]`, whether it ran multi-threaded and whether in bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmCall {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: Trans,
    pub tb: Trans,
    pub parallel: bool,
    pub bf16: bool,
}

/// Start recording every product's shape (off by default; costs one atomic load per call).
pub fn start_recording() {
    CALLS.lock().unwrap().clear();
    RECORDING.store(true, Ordering::SeqCst);
}

/// Stop recording and return the shapes seen since [`start_recording`].
pub fn stop_recording() -> Vec<GemmCall> {
    RECORDING.store(false, Ordering::SeqCst);
    std::mem::take(&mut *CALLS.lock().unwrap())
}

fn record(c: GemmCall) {
    if RECORDING.load(Ordering::Relaxed) {
        CALLS.lock().unwrap().push(c);
    }
}

/// Seconds the given products take alone, each timed on its own buffers (best of `reps` runs): the floor a
/// step made of these products cannot go below.
pub fn replay(calls: &[GemmCall], reps: usize) -> f64 {
    let mut total = 0.0;
    let mut cache: std::collections::HashMap<(usize, usize, usize, bool, bool, bool), f64> = Default::default();
    for c in calls {
        let key = (c.m, c.n, c.k, c.ta == Trans::T, c.tb == Trans::T, c.parallel);
        let t = *cache.entry(key).or_insert_with(|| {
            let a = vec![0.5f32; c.m * c.k];
            let b = vec![0.25f32; c.k * c.n];
            let mut d = vec![0.0f32; c.m * c.n];
            let mut best = f64::MAX;
            for _ in 0..reps.max(1) {
                let t0 = std::time::Instant::now();
                if c.parallel {
                    matmul(c.m, c.n, c.k, 1.0, &a, c.ta, &b, c.tb, 0.0, &mut d);
                } else {
                    let ((ars, acs), (brs, bcs)) = (op_strides(c.ta, c.m, c.k), op_strides(c.tb, c.k, c.n));
                    matmul_strided(c.m, c.n, c.k, 1.0, &a, ars, acs, &b, brs, bcs, 0.0, &mut d, c.n);
                }
                best = best.min(t0.elapsed().as_secs_f64());
            }
            best
        });
        total += t;
    }
    total
}

/// (row stride, column stride) of `op(X)`, `[rows, cols]`, for `X` stored row-major as is (`N`: `[rows, cols]`)
/// or transposed (`T`: `[cols, rows]`).
fn op_strides(t: Trans, rows: usize, cols: usize) -> (usize, usize) {
    match t {
        Trans::N => (cols, 1),
        Trans::T => (1, rows),
    }
}

/// Whether an operand is used as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    N,
    T,
}

/// `C = beta·C + alpha·op(A)·op(B)` with `op(A)` of shape `[m, k]`, `op(B)` of shape `[k, n]`, `C` `[m, n]`.
///
/// `a` holds `A` row-major as stored: `[m, k]` when `ta == N`, `[k, m]` when `ta == T` (likewise `b`).
/// When `beta == 0` the old contents of `C` are never read (NaN in `C` does not leak).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    beta: f32,
    c: &mut [f32],
) {
    assert!(a.len() >= m * k, "matmul: A has {} elements, needs {}", a.len(), m * k);
    assert!(b.len() >= k * n, "matmul: B has {} elements, needs {}", b.len(), k * n);
    assert!(c.len() >= m * n, "matmul: C has {} elements, needs {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if beta == 0.0 {
            c[..m * n].fill(0.0);
        } else {
            c[..m * n].iter_mut().for_each(|v| *v *= beta);
        }
        return;
    }
    let ((a_rs, a_cs), (b_rs, b_cs)) = (op_strides(ta, m, k), op_strides(tb, k, n));
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    let parallel = flops > 2.0e5 && rayon::current_num_threads() > 1;
    if bf16_eligible(m, n, k) {
        record(GemmCall { m, n, k, ta, tb, parallel: true, bf16: true });
        let am = super::bf16::Mat { data: a, rs: a_rs, cs: a_cs };
        let bm = super::bf16::Mat { data: b, rs: b_rs, cs: b_cs };
        super::bf16::matmul_bf16(m, n, k, alpha, am, bm, beta, c, n, parallel);
        return;
    }
    record(GemmCall { m, n, k, ta, tb, parallel: true, bf16: false });
    let par = if parallel { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the asserts above guarantee every index the kernel touches lies inside the slices:
    // op(A) spans m·k elements, op(B) k·n and C m·n, with the strides derived from those shapes.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            par,
        );
    }
}

/// Whether [`matmul`] runs this product in bf16: bf16 mode is on and the product is large enough
/// (see [`BF16_MIN_FLOPS`]).
fn bf16_eligible(m: usize, n: usize, k: usize) -> bool {
    2.0 * m as f64 * n as f64 * k as f64 >= BF16_MIN_FLOPS && m >= 16 && n >= 128 && bf16_active()
}

/// `C[i, j] = (op(A)·op(B))[i, j] + bias[j]`, shapes as in [`matmul`]. In bf16 the bias is added in the
/// kernel's output step; in f32 each row of C is set to the bias and the product accumulated onto it. Both
/// give exactly what that fill followed by `matmul(.., beta = 1)` gives.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bias(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    ta: Trans,
    b: &[f32],
    tb: Trans,
    bias: &[f32],
    c: &mut [f32],
) {
    assert!(bias.len() >= n, "matmul_bias: bias has {} entries, needs {n}", bias.len());
    assert!(c.len() >= m * n, "matmul_bias: C has {} elements, needs {}", c.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k > 0 && bf16_eligible(m, n, k) {
        assert!(a.len() >= m * k, "matmul_bias: A has {} elements, needs {}", a.len(), m * k);
        assert!(b.len() >= k * n, "matmul_bias: B has {} elements, needs {}", b.len(), k * n);
        record(GemmCall { m, n, k, ta, tb, parallel: true, bf16: true });
        let ((a_rs, a_cs), (b_rs, b_cs)) = (op_strides(ta, m, k), op_strides(tb, k, n));
        let am = super::bf16::Mat { data: a, rs: a_rs, cs: a_cs };
        let bm = super::bf16::Mat { data: b, rs: b_rs, cs: b_cs };
        let parallel = rayon::current_num_threads() > 1;
        super::bf16::matmul_bf16_bias(m, n, k, 1.0, am, bm, &bias[..n], c, n, parallel);
        return;
    }
    use rayon::prelude::*;
    c[..m * n].par_chunks_mut(n * 16).for_each(|ch| {
        for r in ch.chunks_mut(n) {
            r.copy_from_slice(&bias[..n]);
        }
    });
    matmul(m, n, k, 1.0, a, ta, b, tb, 1.0, c);
}

/// Strided product for callers that already run inside a parallel loop (attention heads): single-threaded.
///
/// `C[i, j] = beta·C[i, j] + alpha·Σ_p A[i·a_rs + p·a_cs]·B[p·b_rs + j·b_cs]`, `C[i, j]` at `c[i·c_rs + j]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    beta: f32,
    c: &mut [f32],
    c_rs: usize,
) {
    if m == 0 || n == 0 || k == 0 {
        assert!(k != 0 || beta == 0.0 || m == 0 || n == 0, "matmul_strided: k = 0 with beta != 0");
        for i in 0..m {
            c[i * c_rs..i * c_rs + n].fill(0.0);
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len(), "matmul_strided: A out of bounds");
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len(), "matmul_strided: B out of bounds");
    assert!((m - 1) * c_rs + n <= c.len(), "matmul_strided: C out of bounds");
    assert!(c_rs >= n, "matmul_strided: C rows overlap");
    let ta = if a_cs == 1 { Trans::N } else { Trans::T };
    let tb = if b_cs == 1 { Trans::N } else { Trans::T };
    record(GemmCall { m, n, k, ta, tb, parallel: false, bf16: false });
    // SAFETY: the asserts bound the largest index the kernel reads or writes in each operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            beta != 0.0,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Count of floating-point operations of one `matmul` call (for the benchmark's GEMM floor).
pub fn matmul_flops(m: usize, n: usize, k: usize) -> f64 {
    2.0 * m as f64 * n as f64 * k as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], ta: Trans, b: &[f32], tb: Trans) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if ta == Trans::N { a[i * k + p] } else { a[p * m + i] };
                    let bv = if tb == Trans::N { b[p * n + j] } else { b[j * k + p] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn all_transposes_match_naive() {
        let (m, n, k) = (37, 29, 53);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 13) as f32 / 7.0 - 0.9).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 17) as f32 / 9.0 - 0.8).collect();
        for ta in [Trans::N, Trans::T] {
            for tb in [Trans::N, Trans::T] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![f32::NAN; m * n];
                matmul(m, n, k, 1.0, &a, ta, &b, tb, 0.0, &mut c);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-4, "{ta:?}{tb:?}: {x} vs {y}");
                }
                // accumulate: C = 2·C + 0.5·AB
                let mut c2 = want.clone();
                matmul(m, n, k, 0.5, &a, ta, &b, tb, 2.0, &mut c2);
                for (x, y) in c2.iter().zip(&want) {
                    assert!((x - 2.5 * y).abs() < 1e-3, "{ta:?}{tb:?} accumulate: {x} vs {}", 2.5 * y);
                }
            }
        }
    }
}

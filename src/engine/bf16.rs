//! bf16 GEMM: `C = beta·C + alpha·op(A)·op(B)` with the operands rounded to bf16 (round to nearest even) and
//! products accumulated in f32, on AVX-512 `vdpbf16ps`.
//!
//! Layout (BLIS-style, everything packed once per call):
//! - `op(B)` is packed into panels of [`NR`] = 32 columns. A panel stores, for each pair of rows `(2p, 2p+1)`, 32
//!   u32 words, each the two bf16 values `(B[2p, j], B[2p+1, j])`: exactly the operand `vdpbf16ps` wants.
//! - `op(A)` is packed into panels of [`MR`] = 12 rows of words `(A[i, 2p], A[i, 2p+1])`, which the microkernel
//!   broadcasts. When A's rows are contiguous the panel keeps them as rows (word `(r, p)` at `r·kp + p`: packing
//!   is then a plain conversion stream, and the kernel reads 12 row streams); otherwise it is pair-major (the 12
//!   words of one pair together, at `p·MR + r`), which transposed A fills with vector loads.
//! - Pack buffers are kept per thread and reused across products.
//! - Edges are zero-padded (rows to `MR`, columns to `NR`, `k` to even), so the microkernel always computes a full
//!   12 × 32 tile in 24 zmm accumulators; stores are masked to the real tile.
//! - Cache blocking: C is cut into blocks of at most [`MC_PANELS`] A panels × a share of the B panels, the rayon
//!   tasks. Within a block the loop is B panel outside, A panel inside, so a B panel (k × 32 bf16) is reused from
//!   L1/L2 across the block's A panels and the block's A panels (≤ 96 × k bf16) stay in L2. `k` is not split: one
//!   tile's whole dot product is one register accumulation, so results do not depend on blocking or threads.
//!
//! Each output is `alpha·acc + beta·C` (one fused multiply-add) with `acc` the f32 sum over `k` pairs in order,
//! per pair `acc += a₁·b₁; acc += a₀·b₀` (the order `vdpbf16ps` documents; bf16 × bf16 products are exact in
//! f32). [`matmul_bf16_reference`] computes that same sum in scalar code; it is also the fallback on CPUs
//! without `avx512bf16`. The vector conversion flushes denormal inputs (|x| < 1.2e-38) to zero, the scalar one
//! keeps them; that is the only difference.

use half::bf16;

/// Microkernel tile: rows.
pub const MR: usize = 12;
/// Microkernel tile: columns (two zmm of 16 f32).
pub const NR: usize = 32;
/// At most this many A panels (`MR` rows each) per parallel block.
pub const MC_PANELS: usize = 8;

/// Whether this CPU has the instructions the fast kernel uses (checked once).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAIL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAIL.get_or_init(|| {
            is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to the nearest bf16 (ties to even), as an f32.
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Strided operand: element `(r, c)` at `data[r·rs + c·cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl Mat<'_> {
    #[inline]
    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.rs + c * self.cs]
    }
    fn check(&self, rows: usize, cols: usize, name: &str) {
        if rows > 0 && cols > 0 {
            assert!((rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len(), "matmul_bf16: {name} out of bounds");
        }
    }
}

fn check_c(m: usize, n: usize, c: &[f32], c_rs: usize) {
    if m > 0 && n > 0 {
        assert!(c_rs >= n, "matmul_bf16: C rows overlap");
        assert!((m - 1) * c_rs + n <= c.len(), "matmul_bf16: C out of bounds");
    }
}

fn scale_c(m: usize, n: usize, beta: f32, c: &mut [f32], c_rs: usize) {
    for i in 0..m {
        let row = &mut c[i * c_rs..i * c_rs + n];
        if beta == 0.0 {
            row.fill(0.0);
        } else {
            row.iter_mut().for_each(|v| *v *= beta);
        }
    }
}

/// Scalar bf16 product with the fast kernel's rounding and summation order (see the module docs). Used as the
/// fallback where `avx512bf16` is absent and as the tests' exact reference.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_reference(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: &mut [f32],
    c_rs: usize,
) {
    a.check(m, k, "A");
    b.check(k, n, "B");
    check_c(m, n, c, c_rs);
    let ar: Vec<f32> = (0..m * k).map(|x| round_bf16(a.at(x / k, x % k))).collect();
    let mut bt = vec![0.0f32; n * k]; // op(B)ᵀ, rows contiguous in k
    for p in 0..k {
        for j in 0..n {
            bt[j * k + p] = round_bf16(b.at(p, j));
        }
    }
    for i in 0..m {
        let arow = &ar[i * k..(i + 1) * k];
        for j in 0..n {
            let brow = &bt[j * k..(j + 1) * k];
            let mut acc = 0.0f32;
            for p in (0..k).step_by(2) {
                if p + 1 < k {
                    acc += arow[p + 1] * brow[p + 1];
                }
                acc += arow[p] * brow[p];
            }
            let cv = &mut c[i * c_rs + j];
            *cv = if beta == 0.0 { alpha * acc } else { alpha.mul_add(acc, beta * *cv) };
        }
    }
}

/// `C = beta·C + alpha·op(A)·op(B)` in bf16 compute, `op(A)` `[m, k]`, `op(B)` `[k, n]`, `C[i, j]` at
/// `c[i·c_rs + j]`. When `beta == 0` the old contents of C are never read. `parallel` splits the output blocks
/// over rayon threads. Falls back to [`matmul_bf16_reference`] where the CPU lacks `avx512bf16`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    c: &mut [f32],
    c_rs: usize,
    parallel: bool,
) {
    product(m, n, k, alpha, a, b, beta, None, c, c_rs, parallel)
}

/// `C[i, j] = alpha·(op(A)·op(B))[i, j] + bias[j]` in bf16 compute: exactly what filling each row of C with
/// `bias` and then [`matmul_bf16`] with `beta = 1` gives, without the extra pass over C.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bf16_bias(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    bias: &[f32],
    c: &mut [f32],
    c_rs: usize,
    parallel: bool,
) {
    product(m, n, k, alpha, a, b, 0.0, Some(bias), c, c_rs, parallel)
}

/// Both entry points: `C = alpha·op(A)·op(B) + (bias[j] if given, else beta·C)`.
#[allow(clippy::too_many_arguments)]
fn product(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: Mat,
    b: Mat,
    beta: f32,
    bias: Option<&[f32]>,
    c: &mut [f32],
    c_rs: usize,
    parallel: bool,
) {
    a.check(m, k, "A");
    b.check(k, n, "B");
    check_c(m, n, c, c_rs);
    if let Some(bias) = bias {
        assert!(bias.len() >= n, "matmul_bf16_bias: bias has {} entries, needs {n}", bias.len());
    }
    if m == 0 || n == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if k > 0 && available() {
        // SAFETY: the CPU has the target features (checked above), the asserts bound every operand access and
        // a bias holds n entries.
        unsafe { x86::matmul(m, n, k, alpha, a, b, beta, bias, c, c_rs, parallel) };
        return;
    }
    let _ = parallel;
    // Elsewhere a bias is C filled with it, then beta = 1.
    let beta = match bias {
        Some(bias) => {
            for i in 0..m {
                c[i * c_rs..i * c_rs + n].copy_from_slice(&bias[..n]);
            }
            1.0
        }
        None => beta,
    };
    if k == 0 {
        scale_c(m, n, beta, c, c_rs);
        return;
    }
    matmul_bf16_reference(m, n, k, alpha, a, b, beta, c, c_rs);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Mat, MC_PANELS, MR, NR};
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    /// 16 f32 `lo ‖ hi` (32 consecutive values along k) → 16 words, word q = bf16 pair (x[2q], x[2q+1]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pairs_along(lo: __m512, hi: __m512) -> __m512i {
        // cvtne2ps(hi, lo) puts lo's 16 bf16 in the low half, in order: the words are already the pairs.
        // SAFETY: reinterprets one 64-byte vector as another of the same size; every bit pattern is valid in both.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// Two rows `r0`, `r1` of 16 f32 → 16 words, word q = bf16 pair (r0[q], r1[q]).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pairs_across(r0: __m512, r1: __m512) -> __m512i {
        // SAFETY: reinterprets one 64-byte vector as another of the same size; every bit pattern is valid in both.
        let both: __m512i = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(r1, r0)) };
        // halves [r0 | r1] → interleaved r0[0], r1[0], r0[1], r1[1], …
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        _mm512_permutexvar_epi16(idx, both)
    }

    /// Up to 16 values `get(0..len)` into a zmm, zeros beyond `len`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn gather16(len: usize, get: impl Fn(usize) -> f32) -> __m512 {
        let mut t = [0.0f32; 16];
        for (q, v) in t.iter_mut().enumerate().take(len) {
            *v = get(q);
        }
        // SAFETY: `t` is 16 f32, exactly the 64 bytes the unaligned load reads.
        unsafe { _mm512_loadu_ps(t.as_ptr()) }
    }

    /// Up to 16 contiguous values from `s`, zeros beyond `s.len()`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(s: &[f32]) -> __m512 {
        if s.len() >= 16 {
            // SAFETY: `s` holds at least the 16 f32 the unaligned load reads.
            unsafe { _mm512_loadu_ps(s.as_ptr()) }
        } else {
            let mask: __mmask16 = ((1u32 << s.len()) - 1) as __mmask16;
            // SAFETY: the mask enables only the first `s.len()` lanes, all inside `s`; masked-off lanes are not
            // accessed (no fault), and read as zero.
            unsafe { _mm512_maskz_loadu_ps(mask, s.as_ptr()) }
        }
    }

    /// Whether A panels are packed row by row ([`pack_a_rows`]) rather than pair by pair ([`pack_a_pairs`]):
    /// when `op(A)`'s rows are contiguous, converting each row in place is a plain vector stream, while the
    /// pair-major layout would need a transpose.
    #[inline]
    pub(super) fn a_rows_layout(a: Mat) -> bool {
        a.cs == 1
    }

    /// Pack A panel `ip` (rows `ip·MR ..`) row by row into `dst` (`MR · kp` words):
    /// `dst[r·kp + p] = (A[i, 2p], A[i, 2p+1])` with `i = ip·MR + r`. Needs `a.cs == 1`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_a_rows(a: Mat, m: usize, k: usize, ip: usize, dst: &mut [u32]) {
        let kp = k.div_ceil(2);
        for (r, out) in dst.chunks_exact_mut(kp).enumerate().take(MR) {
            let i = ip * MR + r;
            if i >= m {
                out.fill(0);
                continue;
            }
            let row = &a.data[i * a.rs..i * a.rs + k];
            // 32 values of k (16 pairs) at a time
            for p0 in (0..kp).step_by(16) {
                let k0 = 2 * p0;
                let lo = load16(&row[k0.min(k)..(k0 + 16).min(k)]);
                let hi = load16(&row[(k0 + 16).min(k)..(k0 + 32).min(k)]);
                let v = pairs_along(lo, hi);
                let len = (kp - p0).min(16);
                let mask: __mmask16 = if len == 16 { 0xffff } else { ((1u32 << len) - 1) as __mmask16 };
                // SAFETY: `len` words from `p0` lie inside `out` (kp words).
                unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr().add(p0).cast(), mask, v) };
            }
        }
    }

    /// Pack A panel `ip` (rows `ip·MR ..`) pair by pair into `dst` (`kp · MR` words):
    /// `dst[p·MR + r] = (A[i, 2p], A[i, 2p+1])`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_a_pairs(a: Mat, m: usize, k: usize, ip: usize, dst: &mut [u32]) {
        let kp = k.div_ceil(2);
        let i0 = ip * MR;
        let rows = (m - i0).min(MR);
        let mask: __mmask16 = ((1u32 << MR) - 1) as __mmask16;
        for p in 0..kp {
            let v = if a.rs == 1 {
                // op(A)ᵀ stored row-major: the MR values of one k are contiguous in i
                let col = |kk: usize| {
                    if kk < k {
                        load16(&a.data[i0 + kk * a.cs..i0 + kk * a.cs + rows])
                    } else {
                        _mm512_setzero_ps()
                    }
                };
                pairs_across(col(2 * p), col(2 * p + 1))
            } else {
                let get = |kk: usize| if kk < k { gather16(rows, |r| a.at(i0 + r, kk)) } else { _mm512_setzero_ps() };
                pairs_across(get(2 * p), get(2 * p + 1))
            };
            // SAFETY: the MR words at p·MR lie inside `dst`; lanes ≥ rows are zero (loads above are zero-filled).
            unsafe { _mm512_mask_storeu_epi32(dst.as_mut_ptr().add(p * MR).cast(), mask, v) };
        }
    }

    /// Pack B panel `jp` (columns `jp·NR ..`) into `dst` (`kp · NR` words): `dst[p·NR + c] = (B[2p, j], B[2p+1, j])`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    fn pack_b_panel(b: Mat, n: usize, k: usize, jp: usize, dst: &mut [u32]) {
        let kp = k.div_ceil(2);
        let j0 = jp * NR;
        let cols = (n - j0).min(NR);
        if b.cs == 1 {
            // rows of op(B) contiguous in j: interleave row pairs
            for p in 0..kp {
                for h in 0..2 {
                    let c0 = j0 + 16 * h;
                    let len = cols.saturating_sub(16 * h).min(16);
                    let row = |r: usize| {
                        if r < k && len > 0 {
                            load16(&b.data[r * b.rs + c0..r * b.rs + c0 + len])
                        } else {
                            _mm512_setzero_ps()
                        }
                    };
                    let w = pairs_across(row(2 * p), row(2 * p + 1));
                    // SAFETY: the 16 words at p·NR + 16h (h ≤ 1, NR = 32) lie inside `dst` (kp · NR words).
                    unsafe { _mm512_storeu_si512(dst[p * NR + 16 * h..].as_mut_ptr().cast(), w) };
                }
            }
        } else {
            // columns of op(B) (b.rs == 1: contiguous in k, or general strides): for each block of 16 pairs,
            // the 32 columns' pair vectors are formed along k, then transposed in registers so that each pair's
            // 32 words are two vector stores.
            for p0 in (0..kp).step_by(16) {
                let k0 = 2 * p0;
                let mut v = [[_mm512_setzero_si512(); 16]; 2];
                for (c, vc) in v.iter_mut().flatten().enumerate().take(cols) {
                    let j = j0 + c;
                    *vc = if b.rs == 1 {
                        let col = &b.data[j * b.cs..j * b.cs + k];
                        pairs_along(
                            load16(&col[k0.min(k)..(k0 + 16).min(k)]),
                            load16(&col[(k0 + 16).min(k)..(k0 + 32).min(k)]),
                        )
                    } else {
                        let lo = gather16(k.saturating_sub(k0).min(16), |q| b.at(k0 + q, j));
                        let hi = gather16(k.saturating_sub(k0 + 16).min(16), |q| b.at(k0 + 16 + q, j));
                        pairs_along(lo, hi)
                    };
                }
                for (h, half) in v.iter_mut().enumerate() {
                    transpose16(half);
                    for (q, w) in half.iter().enumerate().take((kp - p0).min(16)) {
                        // SAFETY: the 16 words at (p0 + q)·NR + 16h lie inside `dst` (kp · NR words).
                        unsafe { _mm512_storeu_si512(dst.as_mut_ptr().add((p0 + q) * NR + 16 * h).cast(), *w) };
                    }
                }
            }
        }
    }

    /// In-register transpose of a 16 × 16 matrix of 32-bit words (`r[i]` is row i): after it, `r[j]` holds
    /// what was column j. Four rounds of 16 shuffles: 32-bit and 64-bit interleaves within 128-bit lanes, then
    /// two rounds of 128-bit lane shuffles.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512i; 16]) {
        let mut a = [_mm512_setzero_si512(); 16];
        for i in 0..8 {
            a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        // b[4i + m], lane L: column 4L + m, rows 4i .. 4i + 4
        let mut b = [_mm512_setzero_si512(); 16];
        for i in 0..4 {
            b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
        }
        for m in 0..4 {
            // lanes (L0, L2) and (L1, L3) of b[m], b[4 + m], then of b[8 + m], b[12 + m]
            let c0 = _mm512_shuffle_i32x4::<0x88>(b[m], b[4 + m]);
            let c1 = _mm512_shuffle_i32x4::<0xdd>(b[m], b[4 + m]);
            let d0 = _mm512_shuffle_i32x4::<0x88>(b[8 + m], b[12 + m]);
            let d1 = _mm512_shuffle_i32x4::<0xdd>(b[8 + m], b[12 + m]);
            r[m] = _mm512_shuffle_i32x4::<0x88>(c0, d0);
            r[8 + m] = _mm512_shuffle_i32x4::<0xdd>(c0, d0);
            r[4 + m] = _mm512_shuffle_i32x4::<0x88>(c1, d1);
            r[12 + m] = _mm512_shuffle_i32x4::<0xdd>(c1, d1);
        }
    }

    /// One MR × NR tile: `acc = Σ_p a[p]·b[p]` over `kp` pairs, then `C = alpha·acc + beta·C` on the first
    /// `rows` × `cols` entries. `ROWS`: the A panel is packed row by row (word `(r, p)` at `r·kp + p`), else
    /// pair by pair (at `p·MR + r`).
    ///
    /// SAFETY: `pa` holds `kp·MR` words, `pb` `kp·NR`; `c` is valid for `rows` rows of stride `c_rs`, `cols` wide.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const ROWS: bool>(
        kp: usize,
        pa: *const u32,
        pb: *const u32,
        alpha: f32,
        beta: f32,
        bias: Option<*const f32>,
        c: *mut f32,
        c_rs: usize,
        rows: usize,
        cols: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for p in 0..kp {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(p * NR).cast()));
            let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(pb.add(p * NR + 16).cast()));
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let w = if ROWS { *pa.add(r * kp + p) } else { *pa.add(p * MR + r) };
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(w as i32));
                acc_r[0] = _mm512_dpbf16_ps(acc_r[0], av, b0);
                acc_r[1] = _mm512_dpbf16_ps(acc_r[1], av, b1);
            }
        }
        let va = _mm512_set1_ps(alpha);
        let vb = _mm512_set1_ps(beta);
        for (r, acc_r) in acc.iter().enumerate().take(rows) {
            for (h, &v) in acc_r.iter().enumerate() {
                let len = cols.saturating_sub(16 * h).min(16);
                if len == 0 {
                    continue;
                }
                let mask: __mmask16 = if len == 16 { 0xffff } else { ((1u32 << len) - 1) as __mmask16 };
                let dst = c.add(r * c_rs + 16 * h);
                let out = if let Some(bias) = bias {
                    // beta is 0 here: C = alpha·acc + bias[j], what C = bias then beta = 1 gives
                    _mm512_fmadd_ps(va, v, _mm512_maskz_loadu_ps(mask, bias.add(16 * h)))
                } else if beta == 0.0 {
                    _mm512_mul_ps(va, v)
                } else {
                    _mm512_fmadd_ps(va, v, _mm512_mul_ps(vb, _mm512_maskz_loadu_ps(mask, dst)))
                };
                _mm512_mask_storeu_ps(dst, mask, out);
            }
        }
    }

    #[derive(Clone, Copy)]
    struct SendPtr(*mut f32);
    // SAFETY: the blocks written through the pointer are disjoint (each task owns its tiles of C); the bias
    // is only read.
    unsafe impl Send for SendPtr {}
    // SAFETY: as for Send: shared references only copy the pointer; the tiles written through it are disjoint.
    unsafe impl Sync for SendPtr {}

    /// SAFETY: the CPU has avx512f/bw/bf16; `a`, `b`, `c` are bounds-checked by the caller; m, n, k > 0.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: Mat,
        b: Mat,
        beta: f32,
        bias: Option<&[f32]>,
        c: &mut [f32],
        c_rs: usize,
        parallel: bool,
    ) {
        let kp = k.div_ceil(2);
        let bias = bias.map(|b| SendPtr(b.as_ptr().cast_mut()));
        let (mp, np) = (m.div_ceil(MR), n.div_ceil(NR));
        // Pack buffers are kept per thread and reused: a fresh multi-megabyte allocation per product came back
        // from the kernel as zeroed pages, one page fault per 4 KiB written. Every word is written by the packing
        // below, so stale contents never reach the kernel. A nested call on the same thread (a rayon worker
        // stealing work while it waits) finds the buffers taken and allocates its own.
        let (mut pa_buf, mut pb_buf) = PACK_BUFS.with(|b| std::mem::take(&mut *b.borrow_mut()));
        for (buf, len) in [(&mut pa_buf, mp * kp * MR), (&mut pb_buf, np * kp * NR)] {
            if buf.len() < len {
                buf.resize(len, 0);
            }
        }
        let pa = &mut pa_buf[..mp * kp * MR];
        let pb = &mut pb_buf[..np * kp * NR];
        let rows_layout = a_rows_layout(a);
        // SAFETY: the caller guarantees the CPU features; `pack_a_*` write only inside panel `d`.
        let pack_a = |(ip, d): (usize, &mut [u32])| unsafe {
            if rows_layout {
                pack_a_rows(a, m, k, ip, d)
            } else {
                pack_a_pairs(a, m, k, ip, d)
            }
        };
        // SAFETY: as above; `pack_b_panel` writes only inside panel `d`.
        let pack_b = |(jp, d): (usize, &mut [u32])| unsafe { pack_b_panel(b, n, k, jp, d) };
        if parallel {
            pa.par_chunks_mut(kp * MR).enumerate().for_each(pack_a);
            pb.par_chunks_mut(kp * NR).enumerate().for_each(pack_b);
        } else {
            pa.chunks_mut(kp * MR).enumerate().for_each(pack_a);
            pb.chunks_mut(kp * NR).enumerate().for_each(pack_b);
        }
        // blocks: ≤ MC_PANELS A panels tall; enough column blocks for ~4 tasks per thread
        let rb = mp.div_ceil(MC_PANELS);
        let rb_panels = mp.div_ceil(rb);
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let cb = (4 * threads).div_ceil(rb).clamp(1, np);
        let cb_panels = np.div_ceil(cb);
        let cptr = SendPtr(c.as_mut_ptr());
        let (pa, pb) = (&*pa, &*pb);
        let block = move |blk: usize| {
            let (cptr, bias) = (cptr, bias);
            let (bi, bj) = (blk / cb, blk % cb);
            let jps = bj * cb_panels..((bj + 1) * cb_panels).min(np);
            let ips = bi * rb_panels..((bi + 1) * rb_panels).min(mp);
            for jp in jps {
                let cols = (n - jp * NR).min(NR);
                for ip in ips.clone() {
                    let rows = (m - ip * MR).min(MR);
                    let t = if rows_layout { tile::<true> } else { tile::<false> };
                    // SAFETY: the tile (ip, jp) lies inside C and belongs to this block only; the panels lie
                    // inside `pa` / `pb`; the caller guarantees the CPU features.
                    unsafe {
                        t(
                            kp,
                            pa.as_ptr().add(ip * kp * MR),
                            pb.as_ptr().add(jp * kp * NR),
                            alpha,
                            beta,
                            bias.map(|b| b.0.add(jp * NR).cast_const()),
                            cptr.0.add(ip * MR * c_rs + jp * NR),
                            c_rs,
                            rows,
                            cols,
                        )
                    };
                }
            }
        };
        if parallel && rb * cb > 1 {
            (0..rb * cb).into_par_iter().for_each(block);
        } else {
            (0..rb * cb).for_each(block);
        }
        PACK_BUFS.with(|b| *b.borrow_mut() = (pa_buf, pb_buf));
    }

    thread_local! {
        /// This thread's A and B pack buffers, reused across products.
        static PACK_BUFS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rand_vec(rng: &mut impl Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    /// (rs, cs) of an `[r, c]` operand stored as is (`t == false`) or transposed.
    fn strides(r: usize, c: usize, t: bool) -> (usize, usize) {
        if t {
            (1, r)
        } else {
            (c, 1)
        }
    }

    /// Exact product in f64, and for each entry a bound on the bf16 kernel's error: operands rounded to bf16
    /// (8 significant bits: relative error ≤ 2⁻⁸ each, so ≤ 2⁻⁷ + 2⁻¹⁶ per product) plus f32 summation
    /// (≤ k·2⁻²⁴ relative to Σ|a·b|), times |alpha|, plus f32 rounding of the `beta·C` term.
    #[allow(clippy::too_many_arguments)]
    fn f64_ref(m: usize, n: usize, k: usize, alpha: f32, a: Mat, b: Mat, beta: f32, c: &[f32]) -> Vec<(f64, f64)> {
        let mut out = vec![(0.0f64, 0.0f64); m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
                let abs: f64 = (0..k).map(|p| (a.at(i, p) as f64 * b.at(p, j) as f64).abs()).sum();
                let bc = if beta == 0.0 { 0.0 } else { beta as f64 * c[i * n + j] as f64 };
                let tol = alpha.abs() as f64 * abs * (2f64.powi(-7) + 2f64.powi(-16) + k as f64 * 2f64.powi(-23))
                    + 1e-6 * (bc.abs() + 1e-3);
                out[i * n + j] = (alpha as f64 * s + bc, tol);
            }
        }
        out
    }

    const SHAPES: [(usize, usize, usize); 12] = [
        (1, 1, 1),
        (1, 33, 7),
        (12, 32, 2),
        (13, 31, 3),
        (25, 65, 64),
        (37, 29, 53),
        (7, 100, 31),
        (96, 64, 33),
        (100, 97, 129),
        (130, 40, 200),
        (24, 160, 385),
        (200, 70, 17),
    ];

    #[test]
    fn matches_f64_within_bf16_tolerance() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for &(m, n, k) in &SHAPES {
            let a = rand_vec(&mut rng, m * k);
            let b = rand_vec(&mut rng, k * n);
            let c0 = rand_vec(&mut rng, m * n);
            for ta in [false, true] {
                for tb in [false, true] {
                    for &(alpha, beta) in &[(1.0f32, 0.0f32), (0.5, 2.0)] {
                        let (ars, acs) = strides(m, k, ta);
                        let (brs, bcs) = strides(k, n, tb);
                        let am = Mat { data: &a, rs: ars, cs: acs };
                        let bm = Mat { data: &b, rs: brs, cs: bcs };
                        let want = f64_ref(m, n, k, alpha, am, bm, beta, &c0);
                        let mut c = if beta == 0.0 { vec![f32::NAN; m * n] } else { c0.clone() };
                        matmul_bf16(m, n, k, alpha, am, bm, beta, &mut c, n, true);
                        for (x, (y, tol)) in c.iter().zip(&want) {
                            assert!(
                                (*x as f64 - y).abs() <= *tol,
                                "{m}x{n}x{k} ta {ta} tb {tb} α {alpha} β {beta}: {x} vs {y} (tol {tol})"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn equals_scalar_reference_exactly() {
        if !available() {
            eprintln!("avx512bf16 absent: the kernel is the reference itself; nothing to compare");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for &(m, n, k) in &SHAPES {
            let a = rand_vec(&mut rng, m * k);
            let b = rand_vec(&mut rng, k * n);
            let c0 = rand_vec(&mut rng, m * n);
            for ta in [false, true] {
                for tb in [false, true] {
                    for &(alpha, beta) in &[(1.0f32, 0.0f32), (0.5, 2.0)] {
                        let (ars, acs) = strides(m, k, ta);
                        let (brs, bcs) = strides(k, n, tb);
                        let am = Mat { data: &a, rs: ars, cs: acs };
                        let bm = Mat { data: &b, rs: brs, cs: bcs };
                        let mut want = c0.clone();
                        matmul_bf16_reference(m, n, k, alpha, am, bm, beta, &mut want, n);
                        for parallel in [false, true] {
                            let mut c = c0.clone();
                            matmul_bf16(m, n, k, alpha, am, bm, beta, &mut c, n, parallel);
                            for (idx, (x, y)) in c.iter().zip(&want).enumerate() {
                                assert!(
                                    x.to_bits() == y.to_bits(),
                                    "{m}x{n}x{k} ta {ta} tb {tb} α {alpha} β {beta} par {parallel} at {idx}: {x} vs {y}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bias_in_the_output_step_equals_fill_then_beta_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for &(m, n, k) in &SHAPES {
            let a = rand_vec(&mut rng, m * k);
            let b = rand_vec(&mut rng, k * n);
            let bias = rand_vec(&mut rng, n);
            for tb in [false, true] {
                let (brs, bcs) = strides(k, n, tb);
                let am = Mat { data: &a, rs: k, cs: 1 };
                let bm = Mat { data: &b, rs: brs, cs: bcs };
                let mut want: Vec<f32> = (0..m * n).map(|x| bias[x % n]).collect();
                matmul_bf16(m, n, k, 1.0, am, bm, 1.0, &mut want, n, true);
                let mut c = vec![f32::NAN; m * n];
                matmul_bf16_bias(m, n, k, 1.0, am, bm, &bias, &mut c, n, true);
                assert!(c.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "{m}x{n}x{k} tb {tb}");
            }
        }
    }

    #[test]
    fn strided_c_and_general_strides() {
        // C with row stride > n (untouched gaps) and A read with both strides ≠ 1 (every other column)
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (m, n, k) = (19, 45, 21);
        let a = rand_vec(&mut rng, m * 2 * k);
        let b = rand_vec(&mut rng, k * n);
        let am = Mat { data: &a, rs: 2 * k, cs: 2 };
        let bm = Mat { data: &b, rs: n, cs: 1 };
        let c_rs = n + 5;
        let mut c = vec![7.0f32; m * c_rs];
        matmul_bf16(m, n, k, 1.0, am, bm, 0.0, &mut c, c_rs, true);
        let mut want = vec![7.0f32; m * c_rs];
        matmul_bf16_reference(m, n, k, 1.0, am, bm, 0.0, &mut want, c_rs);
        for i in 0..m {
            for j in 0..c_rs {
                let (x, y) = (c[i * c_rs + j], want[i * c_rs + j]);
                if j >= n {
                    assert_eq!(x, 7.0, "gap at ({i}, {j}) written");
                } else {
                    assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "({i}, {j}): {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2⁻⁸ is halfway between bf16 1.0 and 1 + 2⁻⁷: ties to even (1.0); just above rounds up
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
        // the kernel uses the same rounding: a 1×1×1 product of two such values
        let x = [1.0 + 2f32.powi(-8) + 2f32.powi(-20)];
        let one = [1.0f32];
        let mut c = [0.0f32];
        matmul_bf16(
            1,
            1,
            1,
            1.0,
            Mat { data: &x, rs: 1, cs: 1 },
            Mat { data: &one, rs: 1, cs: 1 },
            0.0,
            &mut c,
            1,
            false,
        );
        assert_eq!(c[0], 1.0 + 2f32.powi(-7));
    }
}

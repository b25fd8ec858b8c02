/* Peak f32 FMA throughput of this CPU (AVX-512, 12 independent accumulators per thread, kept in registers):
 * the ceiling no matrix product can pass. Build and run:
 *   gcc -O3 -march=native -fopenmp bench/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 * (An array of accumulators instead of 12 variables measured 172 instead of 276 GFLOP/s on one core here.)
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

#define FMA(x) x = _mm512_fmadd_ps(x, b, c)

int main(void) {
    const long iters = 400000000;
    double t0 = omp_get_wtime();
    float out = 0;
#pragma omp parallel reduction(+ : out)
    {
        __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
        __m512 a0 = b, a1 = c, a2 = b, a3 = c, a4 = b, a5 = c, a6 = b, a7 = c, a8 = b, a9 = c, a10 = b, a11 = c;
        long n = iters / omp_get_num_threads();
        for (long it = 0; it < n; it++) {
            FMA(a0); FMA(a1); FMA(a2); FMA(a3); FMA(a4); FMA(a5);
            FMA(a6); FMA(a7); FMA(a8); FMA(a9); FMA(a10); FMA(a11);
        }
        __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                 _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
        s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
        out += _mm512_reduce_add_ps(s);
    }
    double t = omp_get_wtime() - t0;
    printf("%.1f GFLOP/s f32 FMA peak, %d threads (checksum %g)\n", iters * 12.0 * 32 / t / 1e9,
           omp_get_max_threads(), out);
    return 0;
}

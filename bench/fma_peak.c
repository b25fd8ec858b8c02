/* Peak f32 FMA throughput of this CPU (AVX-512, 12 independent accumulators per thread): the ceiling no
 * matrix product can pass. Build and run:
 *   gcc -O3 -march=native -fopenmp bench/fma_peak.c -o /tmp/fma_peak && OMP_NUM_THREADS=2 /tmp/fma_peak
 */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
    const long iters = 400000000;
    double t0 = omp_get_wtime();
    float out = 0;
#pragma omp parallel reduction(+ : out)
    {
        __m512 b = _mm512_set1_ps(0.9999999f), c = _mm512_set1_ps(1e-7f);
        __m512 a[12];
        for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
        long n = iters / omp_get_num_threads();
        for (long it = 0; it < n; it++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
        }
        __m512 s = a[0];
        for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
        out += _mm512_reduce_add_ps(s);
    }
    double t = omp_get_wtime() - t0;
    printf("%.1f GFLOP/s f32 FMA peak, %d threads (checksum %g)\n", iters * 12.0 * 32 / t / 1e9,
           omp_get_max_threads(), out);
    return 0;
}

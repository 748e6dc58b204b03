/* Kernel benchmark: measures this machine's FMA peak and streaming read bandwidth, then
   f32 matmul GFLOP/s at training shapes and matrix-vector GB/s per weight dtype, with 1
   and 2 threads, each as a percentage of the measured limit.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/bench_kernels.c \
      -o build/bench_kernels -lm -lpthread
   usage: build/bench_kernels [--quick] */
#define KMED_IMPLEMENTATION
#include "kmed.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* Seconds of CPU time used by the calling thread. On a shared machine the single-thread
   rates per CPU-second show what the kernels do when they run; wall-clock rates also
   count the time other processes held the core. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- machine limits ---- */

typedef struct peak_ctx { long iters; double sink[64]; } peak_ctx;

/* 12 independent FMA chains: enough to cover FMA latency x pipes on current x86 cores. */
static void peak_fn(void *vctx, size_t b, size_t e, int thread)
{
    peak_ctx *c = (peak_ctx *)vctx;
    long it;
    (void)b; (void)e;
#if defined(__AVX512F__)
    {
        __m512 m = _mm512_set1_ps(0.999999f), k = _mm512_set1_ps(1e-7f);
        __m512 a0 = _mm512_set1_ps(1.0f), a1 = _mm512_set1_ps(1.1f), a2 = _mm512_set1_ps(1.2f);
        __m512 a3 = _mm512_set1_ps(1.3f), a4 = _mm512_set1_ps(1.4f), a5 = _mm512_set1_ps(1.5f);
        __m512 a6 = _mm512_set1_ps(1.6f), a7 = _mm512_set1_ps(1.7f), a8 = _mm512_set1_ps(1.8f);
        __m512 a9 = _mm512_set1_ps(1.9f), a10 = _mm512_set1_ps(2.0f), a11 = _mm512_set1_ps(2.1f);
        for (it = 0; it < c->iters; it++) {
            a0 = _mm512_fmadd_ps(a0, m, k); a1 = _mm512_fmadd_ps(a1, m, k);
            a2 = _mm512_fmadd_ps(a2, m, k); a3 = _mm512_fmadd_ps(a3, m, k);
            a4 = _mm512_fmadd_ps(a4, m, k); a5 = _mm512_fmadd_ps(a5, m, k);
            a6 = _mm512_fmadd_ps(a6, m, k); a7 = _mm512_fmadd_ps(a7, m, k);
            a8 = _mm512_fmadd_ps(a8, m, k); a9 = _mm512_fmadd_ps(a9, m, k);
            a10 = _mm512_fmadd_ps(a10, m, k); a11 = _mm512_fmadd_ps(a11, m, k);
        }
        a0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                           _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
        a0 = _mm512_add_ps(a0, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
        c->sink[thread * 8] = _mm512_reduce_add_ps(a0);
    }
#elif defined(__AVX2__) && defined(__FMA__)
    {
        __m256 m = _mm256_set1_ps(0.999999f), k = _mm256_set1_ps(1e-7f);
        __m256 a0 = _mm256_set1_ps(1.0f), a1 = _mm256_set1_ps(1.1f), a2 = _mm256_set1_ps(1.2f);
        __m256 a3 = _mm256_set1_ps(1.3f), a4 = _mm256_set1_ps(1.4f), a5 = _mm256_set1_ps(1.5f);
        __m256 a6 = _mm256_set1_ps(1.6f), a7 = _mm256_set1_ps(1.7f), a8 = _mm256_set1_ps(1.8f);
        __m256 a9 = _mm256_set1_ps(1.9f), a10 = _mm256_set1_ps(2.0f), a11 = _mm256_set1_ps(2.1f);
        float t[8];
        for (it = 0; it < c->iters; it++) {
            a0 = _mm256_fmadd_ps(a0, m, k); a1 = _mm256_fmadd_ps(a1, m, k);
            a2 = _mm256_fmadd_ps(a2, m, k); a3 = _mm256_fmadd_ps(a3, m, k);
            a4 = _mm256_fmadd_ps(a4, m, k); a5 = _mm256_fmadd_ps(a5, m, k);
            a6 = _mm256_fmadd_ps(a6, m, k); a7 = _mm256_fmadd_ps(a7, m, k);
            a8 = _mm256_fmadd_ps(a8, m, k); a9 = _mm256_fmadd_ps(a9, m, k);
            a10 = _mm256_fmadd_ps(a10, m, k); a11 = _mm256_fmadd_ps(a11, m, k);
        }
        a0 = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)),
                           _mm256_add_ps(_mm256_add_ps(a4, a5), _mm256_add_ps(a6, a7)));
        a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_add_ps(a8, a9), _mm256_add_ps(a10, a11)));
        _mm256_storeu_ps(t, a0);
        c->sink[thread * 8] = t[0] + t[7];
    }
#else
    {
        float a[12] = { 1, 1.1f, 1.2f, 1.3f, 1.4f, 1.5f, 1.6f, 1.7f, 1.8f, 1.9f, 2, 2.1f };
        int j;
        for (it = 0; it < c->iters; it++)
            for (j = 0; j < 12; j++) a[j] = a[j] * 0.999999f + 1e-7f;
        c->sink[thread * 8] = a[0] + a[11];
    }
#endif
}

static int vec_width(void)
{
#if defined(__AVX512F__)
    return 16;
#elif defined(__AVX2__) && defined(__FMA__)
    return 8;
#else
    return 1;
#endif
}

/* GFLOP/s of the FMA loop on nt threads: best of many short runs, so that a run the
   scheduler did not interrupt is among them on a shared machine. */
static double measure_peak(kmed_pool *pool, int nt, double *cpu_best)
{
    peak_ctx c;
    double best = 0;
    int r;
    *cpu_best = 0;
    memset(&c, 0, sizeof c);
    c.iters = 1000000 / (vec_width() > 1 ? 1 : 8);
    for (r = 0; r < 40; r++) {
        double t0 = kmed_time_now(), c0 = cpu_now(), dt, ct;
        double flop = 12.0 * 2 * vec_width() * (double)c.iters * nt;
        kmed_pool_for(nt > 1 ? pool : NULL, (size_t)nt, 1, peak_fn, &c);
        dt = kmed_time_now() - t0;
        ct = cpu_now() - c0;
        if (flop / dt > best) best = flop / dt;
        if (nt == 1 && flop / ct > *cpu_best) *cpu_best = flop / ct;
    }
    *cpu_best *= 1e-9;
    return best * 1e-9;
}

typedef struct bw_ctx { const float *buf; size_t n; double sink[64]; } bw_ctx;

static void bw_fn(void *vctx, size_t b, size_t e, int thread)
{
    bw_ctx *c = (bw_ctx *)vctx;
    size_t i;
#if defined(__AVX512F__)
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    for (i = b; i + 64 <= e; i += 64) {
        s0 = _mm512_add_ps(s0, _mm512_loadu_ps(c->buf + i));
        s1 = _mm512_add_ps(s1, _mm512_loadu_ps(c->buf + i + 16));
        s2 = _mm512_add_ps(s2, _mm512_loadu_ps(c->buf + i + 32));
        s3 = _mm512_add_ps(s3, _mm512_loadu_ps(c->buf + i + 48));
    }
    c->sink[thread * 8] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1),
                                                             _mm512_add_ps(s2, s3)));
#else
    float s[8] = { 0 };
    for (i = b; i + 8 <= e; i += 8) {
        int j;
        for (j = 0; j < 8; j++) s[j] += c->buf[i + j];
    }
    c->sink[thread * 8] = s[0] + s[7];
#endif
}

/* GB/s of a streaming read over buf (best of 8). */
static double measure_bw(kmed_pool *pool, int nt, const float *buf, size_t n,
                         double *cpu_best)
{
    bw_ctx c;
    double best = 0;
    int r;
    *cpu_best = 0;
    c.buf = buf;
    c.n = n;
    for (r = 0; r < 8; r++) {
        double t0 = kmed_time_now(), c0 = cpu_now(), dt, ct;
        kmed_pool_for(nt > 1 ? pool : NULL, n, 4096, bw_fn, &c);
        dt = kmed_time_now() - t0;
        ct = cpu_now() - c0;
        if ((double)n * 4 / dt > best) best = (double)n * 4 / dt;
        if (nt == 1 && (double)n * 4 / ct > *cpu_best) *cpu_best = (double)n * 4 / ct;
    }
    *cpu_best *= 1e-9;
    return best * 1e-9;
}

static void fill(float *x, size_t n, uint64_t seed)
{
    kmed_rng rng;
    size_t i;
    kmed_rng_seed(&rng, seed);
    for (i = 0; i < n; i++) x[i] = (float)(kmed_rng_uniform(&rng) * 2 - 1);
}

/* Best time of a few runs of one matmul-like call. */
enum { OP_FWD, OP_DX, OP_DW, OP_MV };
typedef struct mm_job {
    int op, flags;
    kmed_dtype wt;
    size_t M, N, K;
    float *y, *x, *dy, *dx, *dw;
    const unsigned char *w;
    size_t wstride, nw;   /* matvec: cycle through nw weight copies wstride bytes apart */
} mm_job;

/* Best wall time of reps runs; *cpu gets the best CPU time of the calling thread. */
static double time_job(kmed_pool *pool, mm_job *j, int reps, double *cpu)
{
    double best = 1e30;
    int r;
    *cpu = 1e30;
    for (r = 0; r < reps; r++) {
        double t0 = kmed_time_now(), c0 = cpu_now(), dt;
        size_t i;
        switch (j->op) {
        case OP_FWD: kmed_matmul(pool, j->y, j->x, j->w, j->wt, j->M, j->N, j->K, j->flags); break;
        case OP_DX: kmed_matmul_dx(pool, j->dx, j->dy, j->w, j->wt, j->M, j->N, j->K); break;
        case OP_DW: kmed_matmul_dw(pool, j->dw, j->dy, j->x, j->M, j->N, j->K); break;
        case OP_MV:
            for (i = 0; i < j->nw; i++)
                kmed_matmul(pool, j->y, j->x, j->w + i * j->wstride, j->wt, j->M, j->N, j->K,
                            j->flags);
            break;
        }
        dt = kmed_time_now() - t0;
        if (dt < best) best = dt;
        if (cpu_now() - c0 < *cpu) *cpu = cpu_now() - c0;
    }
    return best;
}

int main(int argc, char **argv)
{
    kmed_error e;
    kmed_pool *pool = NULL;
    int quick = argc > 1 && strcmp(argv[1], "--quick") == 0, nt, ti;
    double peak[3], bw[3], peak_cpu, bw_cpu, dummy;
    size_t bw_n = (size_t)64 << 20;             /* 256 MB of floats: far beyond any cache */
    float *big = (float *)malloc(bw_n * sizeof(float));
    static const kmed_dtype types[] = { KMED_F32, KMED_BF16, KMED_Q8_0, KMED_Q4_0 };
    if (argc > 1 && !quick) {
        int help = strcmp(argv[1], "--help") == 0;
        fprintf(help ? stdout : stderr, "usage: bench_kernels [--quick]\n"
                "  --quick  fewer repetitions (default: off)\n");
        return help ? 0 : 2;
    }
    if (!big || kmed_pool_create(&pool, 2, &e) != KMED_OK) {
        fprintf(stderr, "bench_kernels: setup failed\n");
        return 1;
    }
    fill(big, bw_n, 1);
    printf("kernel benchmark (vector width %d floats", vec_width());
#ifdef KMED_USE_OPENBLAS
    printf(", OpenBLAS sgemm");
#endif
    printf(")\n\nmachine limits:\n");
    for (nt = 1; nt <= 2; nt++) {
        peak[nt] = measure_peak(pool, nt, nt == 1 ? &peak_cpu : &dummy);
        bw[nt] = measure_bw(pool, nt, big, bw_n, nt == 1 ? &bw_cpu : &dummy);
        printf("  %d thread%s: FMA peak %7.1f GFLOP/s   streaming read %6.1f GB/s  (wall)\n",
               nt, nt > 1 ? "s" : " ", peak[nt], bw[nt]);
    }
    printf("  1 thread : FMA peak %7.1f GFLOP/s   streaming read %6.1f GB/s  (per CPU-second)\n",
           peak_cpu, bw_cpu);
    printf("columns: 1T wall, 1T per CPU-second (vs the per-CPU-second limit), 2T wall\n");

    printf("\nf32 matmul (training shapes), GFLOP/s and %% of FMA peak:\n");
    {
        size_t M = 256, K = 512, N = 2048;
        mm_job j;
        const char *names[] = { "y = x W^T   (256x512 . 2048x512^T)",
                                "dx += dy W  (256x2048 . 2048x512)",
                                "dW += dy^T x (2048x256 . 256x512)" };
        int op;
        memset(&j, 0, sizeof j);
        j.M = M; j.N = N; j.K = K; j.wt = KMED_F32;
        j.x = big; j.w = (const unsigned char *)(big + M * K);
        j.dy = big + M * K + N * K; j.y = j.dy + M * N; j.dx = j.y + M * N;
        j.dw = j.dx + M * K;
        for (op = 0; op < 3; op++) {
            j.op = op == 0 ? OP_FWD : op == 1 ? OP_DX : OP_DW;
            printf("  %-36s", names[op]);
            for (nt = 1; nt <= 2; nt++) {
                double ct, t = time_job(nt > 1 ? pool : NULL, &j, quick ? 5 : 20, &ct);
                double gf = 2.0 * M * N * K / t * 1e-9, gc = 2.0 * M * N * K / ct * 1e-9;
                printf("  %dT %6.1f (%3.0f%%)", nt, gf, 100 * gf / peak[nt]);
                if (nt == 1) printf(" cpu %6.1f (%3.0f%%)", gc, 100 * gc / peak_cpu);
            }
            printf("\n");
        }
    }

    printf("\nmatrix-vector, 4096x4096 weights cycled past the caches (M=1), GB/s of weights "
           "and %% of read bandwidth:\n");
    {
        size_t N = 4096, K = 4096, rows_total, wbytes, r;
        float *tmp = (float *)malloc(N * K * sizeof(float)), y[4096], x[4096];
        fill(tmp, N * K, 2);
        fill(x, K, 3);
        for (ti = 0; ti < 4; ti++) {
            kmed_dtype wt = types[ti];
            unsigned char *w = (unsigned char *)big;
            mm_job j;
            int fi;
            wbytes = kmed_dtype_bytes(wt, (uint64_t)N * K);
            rows_total = bw_n * 4 / wbytes;           /* copies that fit the 256 MB buffer */
            if (rows_total > 16) rows_total = 16;
            for (r = 0; r < N; r++) kmed_quantize_row(wt, tmp + r * K, w + r * (wbytes / N), K);
            for (r = 1; r < rows_total; r++) memcpy(w + r * wbytes, w, wbytes);
            memset(&j, 0, sizeof j);
            j.op = OP_MV; j.wt = wt; j.M = 1; j.N = N; j.K = K; j.x = x; j.y = y;
            j.w = w; j.wstride = wbytes; j.nw = rows_total;
            for (fi = 0; fi < (wt == KMED_F32 ? 1 : 2); fi++) {
                j.flags = fi ? KMED_MM_FAST : 0;
                printf("  %-5s%-5s x%-3zu", kmed_dtype_name(wt), fi ? "FAST" : "", rows_total);
                for (nt = 1; nt <= 2; nt++) {
                    double ct, t = time_job(nt > 1 ? pool : NULL, &j, quick ? 3 : 8, &ct);
                    double gbs = (double)wbytes * (double)rows_total / t * 1e-9;
                    double gc = (double)wbytes * (double)rows_total / ct * 1e-9;
                    printf("  %dT %5.1f GB/s (%3.0f%%)", nt, gbs, 100 * gbs / bw[nt]);
                    if (nt == 1) printf(" cpu %5.1f (%3.0f%%)", gc, 100 * gc / bw_cpu);
                }
                printf("\n");
            }
        }
        /* prefill: M=64 rows against 4096x4096 weights, GFLOP/s */
        printf("\nprefill (M=64 . 4096x4096), GFLOP/s and %% of FMA peak:\n");
        {
            float *xm = (float *)malloc(64 * K * sizeof(float));
            float *ym = (float *)malloc(64 * N * sizeof(float));
            fill(xm, 64 * K, 4);
            for (ti = 0; ti < 4; ti++) {
                kmed_dtype wt = types[ti];
                unsigned char *w = (unsigned char *)big;
                mm_job j;
                int fi;
                wbytes = kmed_dtype_bytes(wt, (uint64_t)N * K);
                for (r = 0; r < N; r++)
                    kmed_quantize_row(wt, tmp + r * K, w + r * (wbytes / N), K);
                memset(&j, 0, sizeof j);
                j.op = OP_FWD; j.wt = wt; j.M = 64; j.N = N; j.K = K; j.x = xm; j.y = ym;
                j.w = w;
                for (fi = 0; fi < (wt == KMED_F32 ? 1 : 2); fi++) {
                    j.flags = fi ? KMED_MM_FAST : 0;
                    printf("  %-5s%-5s", kmed_dtype_name(wt), fi ? "FAST" : "");
                    for (nt = 1; nt <= 2; nt++) {
                        double ct, t = time_job(nt > 1 ? pool : NULL, &j, quick ? 2 : 5, &ct);
                        double gf = 2.0 * 64 * N * K / t * 1e-9, gc = 2.0 * 64 * N * K / ct * 1e-9;
                        printf("  %dT %6.1f (%3.0f%%)", nt, gf, 100 * gf / peak[nt]);
                        if (nt == 1) printf(" cpu %6.1f (%3.0f%%)", gc, 100 * gc / peak_cpu);
                    }
                    printf("\n");
                }
            }
            free(xm);
            free(ym);
        }
        free(tmp);
    }
    kmed_pool_free(pool);
    free(big);
    return 0;
}

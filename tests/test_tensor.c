/* Tests for the tensor module: conversions, Q8_0/Q4_0, kernels vs the scalar reference,
   thread-count independence, and GGML bit-exactness on the tiny-gemma2 fixture.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_tensor.c -o build/test_tensor \
      -lm -lpthread */

/* KMED_ASSERT records instead of aborting, so test_preconditions can see a misuse caught;
   any other assertion that fires is counted as a failure at the end of main (snprintf
   comes from <stdio.h>, which kmed.h includes before any use). The text kept is the first
   assertion since the last expected one: a call that carries on after its check may trip
   later ones, which kernels differ in (SIMD or scalar build). */
static int asserts_fired, asserts_expected;
static char assert_text[512];
#define KMED_ASSERT(x)                                                           \
    ((x) ? (void)0                                                               \
         : (void)(asserts_fired++ == asserts_expected                            \
                      ? snprintf(assert_text, sizeof assert_text, "%s", #x) : 0))
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* Summation-order tolerance for kernels vs the scalar reference, relative to sum |w*x|:
   f32 accumulation over K <= 1024 terms in a different order differs by a few K*eps. */
#define TOL_REORDER 1e-5

static const char *tname(kmed_dtype t)
{
    static const char *names[] = { "F32", "F16", "BF16", "Q8_0", "Q4_0" };
    return (int)t >= 0 && t <= KMED_Q4_0 ? names[t] : "?";
}

static float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* Independent rounding reference: nearest of two neighbouring candidates, ties to even. */
static uint16_t ref_round(double v, double lo, double hi, uint16_t clo, uint16_t chi)
{
    double dl = v - lo, dh = hi - v;
    if (dl < dh) return clo;
    if (dh < dl) return chi;
    return (clo & 1) ? chi : clo;
}

static void test_bf16(void)
{
    uint32_t h;
    int bad = 0;
    kmed_rng rng;
    int i;
    /* every bf16 value goes to f32 and back unchanged (NaNs stay NaN) */
    for (h = 0; h < 65536; h++) {
        float f = kmed_bf16_to_f32((uint16_t)h);
        uint16_t back = kmed_f32_to_bf16(f);
        if (f2u(f) != h << 16) bad++;
        if (f != f) { if (kmed_bf16_to_f32(back) == kmed_bf16_to_f32(back)) bad++; }
        else if (back != h) bad++;
    }
    CHECKF(bad == 0, "bf16 round trip: %d bad", bad);
    /* random f32 bit patterns against a double-precision nearest-even reference */
    kmed_rng_seed(&rng, 1);
    bad = 0;
    for (i = 0; i < 1000000; i++) {
        uint32_t u = (uint32_t)kmed_rng_u64(&rng);
        float f = u2f(u);
        uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1), got = kmed_f32_to_bf16(f);
        if (f != f) { bad += kmed_bf16_to_f32(got) == kmed_bf16_to_f32(got); continue; }
        if ((u & 0xffff) == 0) { bad += got != lo; continue; }
        {
            /* hi may be inf: compare against the value 2^128 it stands for */
            double dlo = kmed_bf16_to_f32(lo);
            double dhi = ((hi & 0x7fff) == 0x7f80) ? ldexp(lo & 0x8000 ? -1.0 : 1.0, 128)
                                                   : (double)kmed_bf16_to_f32(hi);
            bad += got != ref_round(fabs((double)f), fabs(dlo), fabs(dhi), lo, hi);
        }
    }
    CHECKF(bad == 0, "f32->bf16 vs reference: %d bad", bad);
    CHECK(kmed_f32_to_bf16(INFINITY) == 0x7f80);
    CHECK(kmed_f32_to_bf16(-INFINITY) == 0xff80);
    CHECK(kmed_f32_to_bf16(u2f(0x7f7fffff)) == 0x7f80);        /* FLT_MAX rounds up to inf */
    CHECK(kmed_f32_to_bf16(u2f(0x3f808000)) == 0x3f80);        /* tie to even, down */
    CHECK(kmed_f32_to_bf16(u2f(0x3f818000)) == 0x3f82);        /* tie to even, up */
    CHECK(kmed_f32_to_bf16(u2f(0x00000001)) == 0x0000);        /* tiny subnormal */
    CHECK(kmed_f32_to_bf16(u2f(0x7f800001)) != 0x7f80);        /* sNaN stays NaN */
}

static void test_f16(void)
{
    uint32_t h;
    int bad = 0, i;
    kmed_rng rng;
    for (h = 0; h < 65536; h++) {
        float f = kmed_f16_to_f32((uint16_t)h);
        uint16_t back = kmed_f32_to_f16(f);
        int isnan16 = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        if (isnan16) { bad += f == f; bad += (back & 0x7c00) != 0x7c00 || !(back & 0x3ff); }
        else if (back != h) bad++;
    }
    CHECKF(bad == 0, "f16 round trip: %d bad", bad);
    /* values exactly: subnormals, min normal, max */
    CHECK(kmed_f16_to_f32(0x0001) == ldexpf(1.0f, -24));
    CHECK(kmed_f16_to_f32(0x03ff) == ldexpf(1023.0f, -24));
    CHECK(kmed_f16_to_f32(0x0400) == ldexpf(1.0f, -14));
    CHECK(kmed_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(kmed_f16_to_f32(0xc000) == -2.0f);
    CHECK(kmed_f32_to_f16(65519.0f) == 0x7bff);
    CHECK(kmed_f32_to_f16(65520.0f) == 0x7c00);                /* tie rounds to even = inf */
    CHECK(kmed_f32_to_f16(ldexpf(1.0f, -25)) == 0x0000);       /* tie to even zero */
    CHECK(kmed_f32_to_f16(ldexpf(1.5f, -25)) == 0x0001);
    CHECK(kmed_f32_to_f16(ldexpf(3.0f, -25)) == 0x0002);       /* 1.5 units: tie to 2 */
    CHECK(kmed_f32_to_f16(-0.0f) == 0x8000);
    /* random f32 against a nearest-even reference over neighbouring f16 values */
    kmed_rng_seed(&rng, 2);
    for (i = 0; i < 1000000; i++) {
        /* magnitudes around the f16 range, where the interesting cases live */
        float f = (float)ldexp(kmed_rng_uniform(&rng) * 2 - 1, (int)kmed_rng_below(&rng, 48) - 28);
        uint16_t got = kmed_f32_to_f16(f), want;
        double a = fabs((double)f);
        uint16_t s = f < 0 ? 0x8000 : 0, lo = 0, hh;
        /* largest f16 magnitude <= a by bisection over the ordered positive codes */
        uint16_t l = 0, r = 0x7c00;
        while (l < r) {
            uint16_t mid = (uint16_t)((l + r + 1) / 2);
            if ((double)kmed_f16_to_f32(mid) <= a) l = mid; else r = (uint16_t)(mid - 1);
        }
        lo = l;
        hh = (uint16_t)(lo + 1);
        if ((double)kmed_f16_to_f32(lo) == a) want = lo;
        else {
            double dhi = hh == 0x7c00 ? 65536.0 : (double)kmed_f16_to_f32(hh);
            want = ref_round(a, kmed_f16_to_f32(lo), dhi, lo, hh);
        }
        want |= s;
        if (got != want) {
            bad++;
            if (bad < 5) fprintf(stderr, "f16 %a: %04x want %04x\n", f, got, want);
        }
#if defined(__F16C__)
        if (got != _cvtss_sh(f, 0)) bad++;   /* hardware rounding, nearest even */
#endif
    }
    CHECKF(bad == 0, "f32->f16 vs reference: %d bad", bad);
}

/* The row converters (SIMD where built so) equal the scalar conversions bit for bit, for
   every 16-bit pattern and for random f32 patterns with the special values mixed in, with
   the half side at an odd address and lengths that leave a scalar tail. */
static void test_half_rows(void)
{
    static const kmed_dtype ts[] = { KMED_F16, KMED_BF16 };
    static const uint32_t special[] = { 0x00000000u, 0x80000000u, 0x00000001u, 0x807fffffu,
                                        0x7f7fffffu, 0x7f800000u, 0xff800000u, 0x7f800001u,
                                        0xffc00001u, 0x7fffffffu, 0x3f808000u, 0x3f818000u,
                                        0x477ff000u, 0x477fefffu, 0x33000000u, 0x33000001u };
    const size_t N = 65536 + 13;
    unsigned char *half = (unsigned char *)malloc(2 * N + 1), *hb = half + 1;
    float *f = (float *)malloc(N * sizeof(float)), *g = (float *)malloc(N * sizeof(float));
    kmed_rng rng;
    size_t t, i;
    kmed_rng_seed(&rng, 3);
    for (t = 0; t < 2; t++) {
        int bad = 0;
        for (i = 0; i < N; i++) {
            uint16_t h = (uint16_t)i;
            memcpy(hb + 2 * i, &h, 2);
        }
        kmed_dequantize_row(ts[t], hb, f, N);
        for (i = 0; i < N; i++) {
            uint16_t h = (uint16_t)i;
            float want = ts[t] == KMED_F16 ? kmed_f16_to_f32(h) : kmed_bf16_to_f32(h);
            bad += f2u(f[i]) != f2u(want);
        }
        CHECKF(bad == 0, "%s -> f32 row: %d of %zu differ", tname(ts[t]), bad, N);
        for (i = 0; i < N; i++) {
            uint32_t u = (uint32_t)kmed_rng_u64(&rng);
            if (i % 7 == 0) u = special[(i / 7) % 16];
            f[i] = u2f(u);
        }
        kmed_quantize_row(ts[t], f, hb, N);
        bad = 0;
        for (i = 0; i < N; i++) {
            uint16_t h, want = ts[t] == KMED_F16 ? kmed_f32_to_f16(f[i]) : kmed_f32_to_bf16(f[i]);
            memcpy(&h, hb + 2 * i, 2);
            bad += h != want;
        }
        CHECKF(bad == 0, "f32 -> %s row: %d of %zu differ", tname(ts[t]), bad, N);
        /* and back: a half row is reproduced exactly through f32 (NaNs aside) */
        kmed_dequantize_row(ts[t], hb, g, N);
        bad = 0;
        for (i = 0; i < N; i++) bad += g[i] == g[i] && f2u(g[i]) != f2u(ts[t] == KMED_F16
            ? kmed_f16_to_f32(kmed_f32_to_f16(f[i])) : kmed_bf16_to_f32(kmed_f32_to_bf16(f[i])));
        CHECKF(bad == 0, "%s row round trip: %d differ", tname(ts[t]), bad);
    }
    free(half); free(f); free(g);
}

/* Q8_0/Q4_0: round-trip error bounds and GGML layout facts. */
static void test_quant_roundtrip(void)
{
    enum { K = 4096 };
    float *x = (float *)malloc(K * sizeof(float)), *y = (float *)malloc(K * sizeof(float));
    kmed_block_q8_0 q8[K / KMED_QK];
    kmed_block_q4_0 q4[K / KMED_QK];
    kmed_rng rng;
    size_t b, j;
    int bad8 = 0, bad4 = 0;
    kmed_rng_seed(&rng, 3);
    for (j = 0; j < K; j++) x[j] = (float)(kmed_rng_normal(&rng) * ldexp(1.0, (int)(j / 512) - 4));
    for (j = 0; j < 32; j++) x[j] = 0.0f;                  /* an all-zero block */
    kmed_quantize_row(KMED_Q8_0, x, q8, K);
    kmed_dequantize_row(KMED_Q8_0, q8, y, K);
    for (b = 0; b < K / KMED_QK; b++) {
        float amax = 0, d = kmed_f16_to_f32(q8[b].d);
        for (j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        /* error <= half a step, plus the fp16 rounding of the scale (2^-11 relative) */
        for (j = 0; j < 32; j++)
            bad8 += fabsf(y[b * 32 + j] - x[b * 32 + j]) > 0.5f * d + amax * 1e-3f;
    }
    CHECKF(bad8 == 0, "q8_0 round trip: %d bad", bad8);
    CHECK(q8[0].d == 0 && q8[0].qs[7] == 0);
    kmed_quantize_row(KMED_Q4_0, x, q4, K);
    kmed_dequantize_row(KMED_Q4_0, q4, y, K);
    for (b = 0; b < K / KMED_QK; b++) {
        float amax = 0, d = fabsf(kmed_f16_to_f32(q4[b].d));
        int has8 = 0;
        for (j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        for (j = 0; j < 32; j++)
            /* +8 clips to 7, so the side opposite the max may be a whole step off */
            bad4 += fabsf(y[b * 32 + j] - x[b * 32 + j]) > 1.0f * d + amax * 4e-3f + 1e-30f;
        /* the value of largest magnitude maps to q = 0 (i.e. -8 * d) */
        for (j = 0; j < 16; j++) has8 |= (q4[b].qs[j] & 15) == 0 || (q4[b].qs[j] >> 4) == 0;
        if (b > 0) bad4 += !has8;
    }
    CHECKF(bad4 == 0, "q4_0 round trip: %d bad", bad4);
    /* the nibble layout: element j low nibble of byte j, element j+16 high nibble */
    for (j = 0; j < 32; j++) x[j] = (float)j - 16.0f;      /* max |v| = 16 at j = 0 -> d = 2 */
    kmed_quantize_row(KMED_Q4_0, x, q4, 32);
    CHECK(kmed_f16_to_f32(q4[0].d) == 2.0f);
    CHECK((q4[0].qs[0] & 15) == 0 && (q4[0].qs[0] >> 4) == 8);   /* -16 -> 0, 0 -> 8 */
    CHECK((q4[0].qs[15] & 15) == 8 && (q4[0].qs[15] >> 4) == 15); /* -1 -> 8 (7.5 + 0.5) */
    kmed_quantize_row(KMED_Q8_0, x, q8, 32);
    CHECK(q8[0].qs[0] == -127 && q8[0].qs[16] == 0);
    CHECK(q8[0].qs[24] == 64);                          /* 8 * 127/16 = 63.5 -> away: 64 */
    free(x);
    free(y);
}

/* GGML's quantize_row_q8_0_ref / quantize_row_q4_0_ref transcribed independently (with the
   f16 rounding done by F16C where present), against kmed_quantize_row on random blocks
   and on blocks built to hit rounding ties exactly. */
static uint16_t ref_f16(float f)
{
#if defined(__F16C__)
    return _cvtss_sh(f, 0);
#else
    return kmed_f32_to_f16(f);
#endif
}

static void ref_q8_0(const float *x, kmed_block_q8_0 *y, size_t k)
{
    size_t i, j;
    for (i = 0; i < k / 32; i++) {
        float amax = 0.0f, d, id;
        for (j = 0; j < 32; j++) {
            float v = fabsf(x[i * 32 + j]);
            amax = amax > v ? amax : v;
        }
        d = amax / ((1 << 7) - 1);
        id = d ? 1.0f / d : 0.0f;
        y[i].d = ref_f16(d);
        for (j = 0; j < 32; j++) {
            volatile float x0 = x[i * 32 + j] * id;
            y[i].qs[j] = (int8_t)roundf(x0);
        }
    }
}

static void ref_q4_0(const float *x, kmed_block_q4_0 *y, size_t k)
{
    size_t i, j;
    for (i = 0; i < k / 32; i++) {
        float amax = 0.0f, max = 0.0f, d, id;
        for (j = 0; j < 32; j++) {
            float v = x[i * 32 + j];
            if (amax < fabsf(v)) { amax = fabsf(v); max = v; }
        }
        d = max / -8;
        id = d ? 1.0f / d : 0.0f;
        y[i].d = ref_f16(d);
        for (j = 0; j < 16; j++) {
            volatile float x0 = x[i * 32 + j] * id, x1 = x[i * 32 + 16 + j] * id;
            uint8_t xi0 = (uint8_t)((int8_t)(x0 + 8.5f) < 15 ? (int8_t)(x0 + 8.5f) : 15);
            uint8_t xi1 = (uint8_t)((int8_t)(x1 + 8.5f) < 15 ? (int8_t)(x1 + 8.5f) : 15);
            y[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        }
    }
}

static void test_quant_vs_ggml_ref(void)
{
    enum { NB = 2048, K = NB * 32 };
    float *x = (float *)malloc(K * sizeof(float));
    kmed_block_q8_0 *a8 = (kmed_block_q8_0 *)malloc(NB * sizeof *a8), *b8;
    kmed_block_q4_0 *a4 = (kmed_block_q4_0 *)malloc(NB * sizeof *a4), *b4;
    kmed_rng rng;
    size_t i, j;
    b8 = (kmed_block_q8_0 *)malloc(NB * sizeof *b8);
    b4 = (kmed_block_q4_0 *)malloc(NB * sizeof *b4);
    kmed_rng_seed(&rng, 6);
    for (i = 0; i < NB; i++) {
        int kind = (int)(i % 4);
        for (j = 0; j < 32; j++) {
            float v = (float)(kmed_rng_normal(&rng) * ldexp(1.0, (int)(i % 40) - 20));
            if (kind == 1) v = (float)((int)kmed_rng_below(&rng, 254) - 127) + 0.5f; /* ties */
            if (kind == 2) v = (float)((int)kmed_rng_below(&rng, 16) - 8) * 0.25f;   /* grid */
            x[i * 32 + j] = v;
        }
        if (kind == 1) x[i * 32 + (i / 4) % 32] = (i & 4) ? 127.0f : -127.0f;  /* d = 1 */
        if (kind == 3 && i % 8 == 3) for (j = 0; j < 32; j++) x[i * 32 + j] = 0.0f;
    }
    kmed_quantize_row(KMED_Q8_0, x, a8, K);
    ref_q8_0(x, b8, K);
    kmed_quantize_row(KMED_Q4_0, x, a4, K);
    ref_q4_0(x, b4, K);
    CHECKF(memcmp(a8, b8, NB * sizeof *a8) == 0, "Q8_0 differs from GGML's reference");
    CHECKF(memcmp(a4, b4, NB * sizeof *a4) == 0, "Q4_0 differs from GGML's reference");
    /* the exact SIMD dequantizer used by the GEMM packing equals kmed_dequantize_row */
    {
        float *y1 = (float *)malloc(K * sizeof(float)), *y2 = (float *)malloc(K * sizeof(float));
        static const kmed_dtype ts[] = { KMED_Q8_0, KMED_Q4_0 };
        unsigned char *buf = (unsigned char *)malloc(K * 2);
        size_t t;
        for (t = 0; t < 2; t++) {
            kmed_quantize_row(ts[t], x, buf, K);
            kmed_dequantize_row(ts[t], buf, y1, K);
#ifdef KMED__SIMD
            kmed__dequant_simd(ts[t], buf, y2, K);
#else
            kmed_dequantize_row(ts[t], buf, y2, K);
#endif
            CHECKF(memcmp(y1, y2, K * sizeof(float)) == 0, "SIMD dequant %s", tname(ts[t]));
        }
        free(y1); free(y2); free(buf);
    }
    CHECK(kmed_dtype_computable(KMED_Q4_0) && kmed_dtype_computable(KMED_F16));
    CHECK(!kmed_dtype_computable(KMED_I32) && !kmed_dtype_computable(KMED_DTYPE_UNKNOWN));
    free(x); free(a8); free(b8); free(a4); free(b4);
}

/* Fills a weight of dtype wt (N, K) from random f32 and returns the f32 dequantized copy. */
static void *make_weight(kmed_rng *rng, kmed_dtype wt, size_t N, size_t K, float **wf)
{
    size_t rb = kmed__tensor_row_bytes(wt, K), n, k;
    unsigned char *w = (unsigned char *)malloc(N * rb + 1);
    float *tmp = (float *)malloc(K * sizeof(float));
    *wf = (float *)malloc(N * K * sizeof(float) + 1);
    for (n = 0; n < N; n++) {
        for (k = 0; k < K; k++) tmp[k] = (float)kmed_rng_normal(rng);
        kmed_quantize_row(wt, tmp, w + n * rb, K);
        kmed_dequantize_row(wt, w + n * rb, *wf + n * K, K);
    }
    free(tmp);
    return w;
}

static void fill(kmed_rng *rng, float *x, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)kmed_rng_normal(rng);
}

/* max |a-b| / max(1, sum|terms|) style check: relative to the row scale sqrt(K). */
static int close_rel(const float *a, const float *b, size_t n, double scale, double tol)
{
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= tol * scale)) {
            fprintf(stderr, "  at %zu: %.9g vs %.9g\n", i, a[i], b[i]);
            return 0;
        }
    }
    return 1;
}

static void test_matmul(kmed_pool *pool1, kmed_pool *pool2)
{
    static const kmed_dtype types[] = { KMED_F32, KMED_F16, KMED_BF16, KMED_Q8_0, KMED_Q4_0 };
    static const size_t shapes[][3] = {
        { 1, 1, 32 }, { 1, 37, 64 }, { 1, 131, 320 }, { 3, 45, 96 }, { 17, 70, 160 },
        { 33, 129, 256 }, { 5, 300, 1024 }, { 64, 64, 64 }, { 1, 1000, 2048 },
        { 2, 7, 53 }, { 4, 9, 100 }, { 6, 33, 77 }, { 13, 70, 300 }, { 1, 5, 17 },
        { 150, 530, 288 }   /* more than one GEMM block in M, N and K */
    };
    kmed_rng rng;
    size_t ti, si, m, n, k;
    kmed_rng_seed(&rng, 4);
    for (ti = 0; ti < sizeof types / sizeof types[0]; ti++) {
        for (si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
            size_t M = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
            kmed_dtype wt = types[ti];
            float *wf, *x = (float *)malloc(M * K * 4), *ref = (float *)malloc(M * N * 4);
            float *y1 = (float *)malloc(M * N * 4), *y2 = (float *)malloc(M * N * 4);
            float *dy = (float *)malloc(M * N * 4);
            float *dx1 = (float *)malloc(M * K * 4), *dx2 = (float *)malloc(M * K * 4);
            float *dxr = (float *)malloc(M * K * 4);
            void *w;
            int fi;
            if (K % KMED_QK && (wt == KMED_Q8_0 || wt == KMED_Q4_0)) {
                free(x); free(ref); free(y1); free(y2); free(dy); free(dx1); free(dx2);
                free(dxr);
                continue;
            }
            w = make_weight(&rng, wt, N, K, &wf);
            fill(&rng, x, M * K);
            fill(&rng, dy, M * N);
            /* double-precision reference on the dequantized weight */
            for (m = 0; m < M; m++)
                for (n = 0; n < N; n++) {
                    double s = 0;
                    for (k = 0; k < K; k++) s += (double)x[m * K + k] * wf[n * K + k];
                    ref[m * N + n] = (float)s;
                }
            for (fi = 0; fi < 2; fi++) {
                int flags = fi ? KMED_MM_FAST : 0;
                double tol = TOL_REORDER;
                if (fi && (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16)) {
                    /* FAST computes exactly with x rounded to Q8_0 / BF16: the reference
                       uses that rounded x */
                    kmed_dtype qt = wt == KMED_BF16 ? KMED_BF16 : KMED_Q8_0;
                    float *xr = (float *)malloc(M * K * 4);
                    void *xq = malloc(M * kmed__tensor_row_bytes(qt, K));
                    for (m = 0; m < M; m++) {
                        kmed_quantize_row(qt, x + m * K, xq, K);
                        kmed_dequantize_row(qt, xq, xr + m * K, K);
                    }
                    for (m = 0; m < M; m++)
                        for (n = 0; n < N; n++) {
                            double s = 0;
                            for (k = 0; k < K; k++) s += (double)xr[m * K + k] * wf[n * K + k];
                            ref[m * N + n] = (float)s;
                        }
                    free(xr);
                    free(xq);
                }
                /* the scalar reference path of the same flags */
                kmed__matmul_ref(NULL, y2, x, w, wt, M, N, K, flags);
                kmed_matmul(pool1, y1, x, w, wt, M, N, K, flags);
                CHECKF(close_rel(y1, y2, M * N, sqrt((double)K), TOL_REORDER),
                       "matmul %s fast=%d %zux%zux%zu vs scalar reference", tname(wt), fi,
                       M, N, K);
                kmed_matmul(pool2, y2, x, w, wt, M, N, K, flags);
                CHECKF(close_rel(y1, ref, M * N, sqrt((double)K), tol),
                       "matmul %s fast=%d %zux%zux%zu vs reference", tname(wt), fi,
                       M, N, K);
                CHECKF(memcmp(y1, y2, M * N * 4) == 0, "matmul %s fast=%d %zux%zux%zu: "
                       "1 vs 2 threads differ", tname(wt), fi, M, N, K);
                if (fi && (wt == KMED_Q8_0 || wt == KMED_Q4_0) && M > 1) {
                    /* a row's FAST result is the same whether it comes in a batch (prefill)
                       or alone (decode) */
                    int same = 1;
                    for (m = 0; m < M; m++) {
                        kmed_matmul(pool2, y2, x + m * K, w, wt, 1, N, K, flags);
                        same &= memcmp(y2, y1 + m * N, N * 4) == 0;
                    }
                    CHECKF(same, "matmul %s fast %zux%zux%zu: rows alone differ from the batch",
                           tname(wt), M, N, K);
                }
                /* ACC adds onto y */
                memcpy(y2, y1, M * N * 4);
                kmed_matmul(pool2, y2, x, w, wt, M, N, K, flags | KMED_MM_ACC);
                for (m = 0; m < M * N; m++) y1[m] *= 2.0f;
                CHECKF(close_rel(y2, y1, M * N, sqrt((double)K), 1e-6),
                       "matmul ACC %s fast=%d", tname(wt), fi);
            }
            /* dx += dy · W */
            for (m = 0; m < M; m++)
                for (k = 0; k < K; k++) {
                    double s = 0.5;
                    for (n = 0; n < N; n++) s += (double)dy[m * N + n] * wf[n * K + k];
                    dxr[m * K + k] = (float)s;
                }
            for (m = 0; m < M * K; m++) dx1[m] = dx2[m] = 0.5f;
            kmed__matmul_dx_ref(NULL, dx2, dy, w, wt, M, N, K);
            kmed_matmul_dx(pool1, dx1, dy, w, wt, M, N, K);
            CHECKF(close_rel(dx1, dx2, M * K, sqrt((double)N) + 1, TOL_REORDER),
                   "matmul_dx %s %zux%zux%zu vs scalar reference", tname(wt), M, N, K);
            for (m = 0; m < M * K; m++) dx2[m] = 0.5f;
            kmed_matmul_dx(pool2, dx2, dy, w, wt, M, N, K);
            CHECKF(close_rel(dx1, dxr, M * K, sqrt((double)N) + 1, TOL_REORDER),
                   "matmul_dx %s %zux%zux%zu", tname(wt), M, N, K);
            CHECKF(memcmp(dx1, dx2, M * K * 4) == 0, "matmul_dx %s: 1 vs 2 threads differ",
                   tname(wt));
            free(wf); free(w); free(x); free(ref); free(y1); free(y2); free(dy);
            free(dx1); free(dx2); free(dxr);
        }
    }
}

static void test_dw_sgemm(kmed_pool *pool1, kmed_pool *pool2)
{
    static const size_t shapes[][3] = {
        { 1, 1, 1 }, { 7, 13, 5 }, { 33, 70, 129 }, { 64, 48, 96 }, { 100, 257, 31 },
        { 256, 96, 200 }
    };
    kmed_rng rng;
    size_t si, m, n, k;
    int ta, tb;
    kmed_rng_seed(&rng, 5);
    for (si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        size_t M = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
        float *dy = (float *)malloc(M * N * 4), *x = (float *)malloc(M * K * 4);
        float *dw1 = (float *)malloc(N * K * 4), *dw2 = (float *)malloc(N * K * 4);
        float *dwr = (float *)malloc(N * K * 4);
        float *A = (float *)malloc((M + 3) * (K + 3) * 4);
        float *B = (float *)malloc((K + 3) * (N + 3) * 4);
        float *C1 = (float *)malloc(M * (N + 5) * 4), *C2 = (float *)malloc(M * (N + 5) * 4);
        float *Cr = (float *)malloc(M * (N + 5) * 4);
        fill(&rng, dy, M * N);
        fill(&rng, x, M * K);
        for (n = 0; n < N; n++)
            for (k = 0; k < K; k++) {
                double s = 1.0;
                for (m = 0; m < M; m++) s += (double)dy[m * N + n] * x[m * K + k];
                dwr[n * K + k] = (float)s;
            }
        for (m = 0; m < N * K; m++) dw1[m] = dw2[m] = 1.0f;
        kmed__matmul_dw_ref(NULL, dw2, dy, x, M, N, K);
        kmed_matmul_dw(pool1, dw1, dy, x, M, N, K);
        CHECKF(close_rel(dw1, dw2, N * K, sqrt((double)M) + 1, TOL_REORDER),
               "matmul_dw %zux%zux%zu vs scalar reference", M, N, K);
        for (m = 0; m < N * K; m++) dw2[m] = 1.0f;
        kmed_matmul_dw(pool2, dw2, dy, x, M, N, K);
        CHECKF(close_rel(dw1, dwr, N * K, sqrt((double)M) + 1, TOL_REORDER),
               "matmul_dw %zux%zux%zu", M, N, K);
        CHECKF(memcmp(dw1, dw2, N * K * 4) == 0, "matmul_dw: 1 vs 2 threads differ");
        /* sgemm, all transposes, padded leading dimensions, alpha and beta */
        for (ta = 0; ta < 2; ta++)
            for (tb = 0; tb < 2; tb++) {
                size_t lda = (ta ? M : K) + 3, ldb = (tb ? K : N) + 3, ldc = N + 5;
                int bi;
                fill(&rng, A, (M + 3) * (K + 3));
                fill(&rng, B, (K + 3) * (N + 3));
                for (bi = 0; bi < 2; bi++) {
                    float beta = bi ? 0.5f : 0.0f, alpha = 1.5f;
                    fill(&rng, Cr, M * ldc);
                    if (!bi) for (m = 0; m < M * ldc; m++) Cr[m] = NAN; /* beta 0: not read */
                    memcpy(C1, Cr, M * ldc * 4);
                    memcpy(C2, Cr, M * ldc * 4);
                    for (m = 0; m < M; m++)
                        for (n = 0; n < N; n++) {
                            double s = 0;
                            for (k = 0; k < K; k++)
                                s += (double)(ta ? A[k * lda + m] : A[m * lda + k]) *
                                     (tb ? B[n * ldb + k] : B[k * ldb + n]);
                            Cr[m * ldc + n] = (float)(alpha * s +
                                                      (bi ? beta * Cr[m * ldc + n] : 0.0));
                        }
                    kmed_sgemm(pool1, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C1, ldc);
                    kmed_sgemm(pool2, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C2, ldc);
                    {
                        int ok = 1;
                        for (m = 0; m < M; m++)
                            ok &= close_rel(C1 + m * ldc, Cr + m * ldc, N,
                                            2 * sqrt((double)K) + 1, TOL_REORDER);
                        CHECKF(ok, "sgemm ta=%d tb=%d beta=%g %zux%zux%zu", ta, tb, beta,
                               M, N, K);
                        CHECKF(memcmp(C1, C2, M * ldc * 4) == 0 || !bi,
                               "sgemm: 1 vs 2 threads differ");
                    }
                }
            }
        free(dy); free(x); free(dw1); free(dw2); free(dwr); free(A); free(B);
        free(C1); free(C2); free(Cr);
    }
}

static void test_dot_f32(void)
{
    float a[300], b[300];
    kmed_rng rng;
    size_t n;
    int bad = 0;
    kmed_rng_seed(&rng, 7);
    fill(&rng, a, 300);
    fill(&rng, b, 300);
    for (n = 0; n <= 300; n += (n < 40 ? 1 : 37)) {
        double ref = 0;
        size_t i;
        for (i = 0; i < n; i++) ref += (double)a[i] * b[i];
        if (fabs(kmed_dot_f32(a, b, n) - ref) > TOL_REORDER * (sqrt((double)n) + 1)) bad++;
        if (fabs(kmed_dot_f32(a, b, n) - kmed_dot_row(KMED_F32, a, b, n)) >
            TOL_REORDER * (sqrt((double)n) + 1)) bad++;
    }
    CHECKF(bad == 0, "kmed_dot_f32: %d lengths off", bad);
}

typedef struct pool_probe { size_t *owner; size_t grain; int bad; } pool_probe;

static void probe_fn(void *ctx, size_t b, size_t e, int t)
{
    pool_probe *p = (pool_probe *)ctx;
    size_t i;
    if (b % p->grain) p->bad = 1;
    for (i = b; i < e; i++) p->owner[i] = (size_t)t + 1;
}

static void test_pool(void)
{
    kmed_error e = { 0 };
    kmed_pool *pool = NULL;
    size_t owner[1000];
    int round;
    CHECK_OK(kmed_pool_create(&pool, 3, &e));
#ifdef KMED_NO_THREADS
    CHECK(kmed_pool_threads(pool) == 1);
#else
    CHECK(kmed_pool_threads(pool) == 3);
#endif
    CHECK(kmed_pool_threads(NULL) == 1);
    for (round = 0; round < 200; round++) {
        pool_probe p;
        size_t i, n = 1 + (size_t)round * 5, covered = 0;
        p.owner = owner; p.grain = (size_t)(round % 7) + 1; p.bad = 0;
        memset(owner, 0, sizeof owner);
        kmed_pool_for(pool, n, p.grain, probe_fn, &p);
        for (i = 0; i < n; i++) covered += owner[i] != 0;
        CHECKF(covered == n && !p.bad, "pool_for n=%zu grain=%zu", n, p.grain);
        /* contiguous, nondecreasing thread ids: a static split */
        for (i = 1; i < n; i++) if (owner[i] < owner[i - 1]) p.bad = 1;
        CHECK(!p.bad);
    }
    kmed_pool_free(pool);
    CHECK(kmed_pool_create(&pool, -1, &e) == KMED_ERR_ARG);
}

/* THE key check: quantizing the fixture's BF16 weights with kmed_quantize_row gives exactly
   the blocks llama-quantize stored in the GGUF files. */
static void map_name(const char *hf, char *out, size_t cap)
{
    static const char *const pairs[][2] = {
        { "self_attn.q_proj", "attn_q" }, { "self_attn.k_proj", "attn_k" },
        { "self_attn.v_proj", "attn_v" }, { "self_attn.o_proj", "attn_output" },
        { "mlp.gate_proj", "ffn_gate" }, { "mlp.up_proj", "ffn_up" },
        { "mlp.down_proj", "ffn_down" }
    };
    int layer;
    char rest[128];
    size_t i;
    out[0] = 0;
    if (strcmp(hf, "model.embed_tokens.weight") == 0) {
        snprintf(out, cap, "token_embd.weight");
        return;
    }
    if (sscanf(hf, "model.layers.%d.%127[^\n]", &layer, rest) != 2) return;
    for (i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        size_t l = strlen(pairs[i][0]);
        if (strncmp(rest, pairs[i][0], l) == 0 && strcmp(rest + l, ".weight") == 0)
            snprintf(out, cap, "blk.%d.%s.weight", layer, pairs[i][1]);
    }
}

static void test_fixture_quant(void)
{
    static const char *const files[] = { "tiny-gemma2-q8_0.gguf", "tiny-gemma2-q4_0-pure.gguf" };
    static const kmed_dtype qtypes[] = { KMED_Q8_0, KMED_Q4_0 };
    const char *fx = kmed_test_fixtures();
    kmed_error e = { 0 };
    kmed_st st;
    char path[1200];
    size_t fi, ti;
    if (!fx) return;
    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    CHECK_OK(kmed_st_open(&st, path, &e));
    if (e.code) return;
    for (fi = 0; fi < 2; fi++) {
        kmed_gguf g;
        size_t compared = 0, blocks = 0, bad_blocks = 0;
        snprintf(path, sizeof path, "%s/tiny-gemma2/gguf/%s", fx, files[fi]);
        CHECK_OK(kmed_gguf_open(&g, path, &e));
        if (e.code) break;
        for (ti = 0; ti < st.n_tensors; ti++) {
            const kmed_tensor_info *t = &st.tensors[ti];
            const kmed_tensor_info *q;
            char gname[256];
            size_t rows, cols, r, rb;
            float *row;
            unsigned char *out;
            if (t->ndim != 2) continue;
            map_name(t->name, gname, sizeof gname);
            CHECKF(gname[0] != 0, "no GGUF name for %s", t->name);
            q = kmed_gguf_find_tensor(&g, gname);
            CHECKF(q != NULL, "%s: %s missing", files[fi], gname);
            if (!q) continue;
            CHECKF(q->dtype == qtypes[fi], "%s: %s has dtype %d", files[fi], gname, q->dtype);
            CHECK(t->dtype == KMED_BF16);
            rows = (size_t)t->shape[0];
            cols = (size_t)t->shape[1];
            CHECKF(q->ndim == 2 && q->shape[0] == rows && q->shape[1] == cols,
                   "%s shape", gname);
            rb = kmed__tensor_row_bytes(qtypes[fi], cols);
            if (q->dtype != qtypes[fi] || q->nbytes != rows * rb) continue;
            row = (float *)malloc(cols * sizeof(float));
            out = (unsigned char *)malloc(rb);
            for (r = 0; r < rows; r++) {
                size_t b;
                kmed_dequantize_row(KMED_BF16, (const uint16_t *)t->data + r * cols, row, cols);
                kmed_quantize_row(qtypes[fi], row, out, cols);
                for (b = 0; b < cols / KMED_QK; b++) {
                    size_t bs = rb / (cols / KMED_QK);
                    if (memcmp(out + b * bs, (const unsigned char *)q->data + r * rb + b * bs,
                               bs) != 0) {
                        if (bad_blocks < 3)
                            fprintf(stderr, "  %s row %zu block %zu differs\n", gname, r, b);
                        bad_blocks++;
                    }
                    blocks++;
                }
            }
            compared++;
            free(row);
            free(out);
        }
        printf("%s: %zu tensors, %zu blocks quantized, %zu differ from llama-quantize\n",
               files[fi], compared, blocks, bad_blocks);
        CHECKF(compared == 15, "%s: compared %zu tensors, want 15", files[fi], compared);
        CHECKF(bad_blocks == 0 && blocks > 0, "%s: %zu of %zu blocks differ", files[fi],
               bad_blocks, blocks);
        kmed_gguf_close(&g);
    }
    kmed_st_close(&st);
}

/* Misuse of the void row and matmul calls (a partial Q8_0/Q4_0 block, a dtype that is not
   computable) is caught by KMED_ASSERT with a message naming the call; the documented
   precondition, since these calls cannot return an error. */
static void expect_assert(const char *call, const char *frag)
{
    CHECKF(asserts_fired > asserts_expected && strstr(assert_text, frag),
           "%s: %d assertion(s) fired, first '%s'", call, asserts_fired - asserts_expected,
           assert_text);
    asserts_expected = asserts_fired = asserts_expected + 1; /* a miss is reported once */
}

static void test_preconditions(void)
{
    /* room for whole blocks past every partial size used, so a caught call runs safely */
    float x[256], y[256], dx[256];
    kmed_block_q8_0 q8[8];
    kmed_block_q4_0 q4[8];
    int i;
    for (i = 0; i < 256; i++) x[i] = (float)(i % 7) - 3.0f;
    memset(q8, 0, sizeof q8);
    memset(q4, 0, sizeof q4);
    kmed_quantize_row(KMED_Q8_0, x, q8, 31);
    expect_assert("kmed_quantize_row(Q8_0, n 31)", "kmed_quantize_row: n must be a multiple");
    kmed_quantize_row(KMED_Q4_0, x, q4, 48);
    expect_assert("kmed_quantize_row(Q4_0, n 48)", "kmed_quantize_row: n must be a multiple");
    kmed_dequantize_row(KMED_Q4_0, q4, y, 33);
    expect_assert("kmed_dequantize_row(Q4_0, n 33)", "kmed_dequantize_row: n must be");
    kmed_quantize_row(KMED_I32, x, y, 4);
    expect_assert("kmed_quantize_row(I32)", "dtype not computable");
    (void)kmed_dot_row(KMED_Q8_0, q8, x, 40);
    expect_assert("kmed_dot_row(Q8_0, n 40)", "kmed_dot_row: n must be");
    kmed_matmul(NULL, y, x, q8, KMED_Q8_0, 1, 1, 33, 0);
    expect_assert("kmed_matmul(Q8_0, K 33)", "kmed_matmul: wt must be computable, and K");
    memset(dx, 0, sizeof dx);
    kmed_matmul_dx(NULL, dx, y, q4, KMED_Q4_0, 1, 1, 33);
    expect_assert("kmed_matmul_dx(Q4_0, K 33)", "kmed_matmul_dx: wt must be computable");
    /* whole blocks, and any n for the float types, assert nothing */
    kmed_quantize_row(KMED_Q8_0, x, q8, 64);
    kmed_dequantize_row(KMED_Q8_0, q8, y, 64);
    kmed_quantize_row(KMED_BF16, x, q8, 31);
    kmed_matmul(NULL, y, x, q4, KMED_Q4_0, 1, 2, 32, 0);
    CHECKF(asserts_fired == asserts_expected, "valid calls asserted: %s", assert_text);
    asserts_fired = asserts_expected;
}

int main(void)
{
    kmed_error e = { 0 };
    kmed_pool *pool2 = NULL;
    test_bf16();
    test_f16();
    test_half_rows();
    test_quant_roundtrip();
    test_quant_vs_ggml_ref();
    test_pool();
    test_dot_f32();
    test_fixture_quant();
    CHECK_OK(kmed_pool_create(&pool2, 2, &e));
    test_matmul(NULL, pool2);
    test_dw_sgemm(NULL, pool2);
    kmed_pool_free(pool2);
    test_preconditions();
    CHECKF(asserts_fired == asserts_expected, "KMED_ASSERT fired outside the misuse checks: "
           "%s", assert_text);
    return kmed_test_done();
}

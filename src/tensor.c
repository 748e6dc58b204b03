/* ==== kmed_tensor: bf16/f16, Q8_0/Q4_0 blocks, matmul kernels, thread pool ==== */

/* How the kernels are chosen (compile time, no runtime dispatch):
     AVX-512 (+AVX2/FMA/F16C)  12x32 GEMM micro-kernel, 16-lane matrix-vector kernels,
                               VNNI int8 and BF16 dot products where the CPU has them
     AVX2 + FMA + F16C         6x16 GEMM micro-kernel, 8-lane kernels
     otherwise                 the scalar reference code, which is always compiled and is
                               what tests/test_tensor.c checks every path against
   kmed_matmul: M <= 4 runs matrix-vector kernels (weights dequantized in registers), larger
   M the packed GEMM (weight tiles dequantized once into the packed panel and reused for all
   M rows). FAST Q8_0/Q4_0 quantizes x to Q8_0 and takes integer dot products for every M,
   as llama.cpp does; FAST BF16 rounds x to bf16. Each output element is computed by an
   instruction sequence that depends only on its position in fixed K blocks, never on the
   thread ranges, so 1 and N threads give identical bits. */

#include <math.h>
#include <string.h>
#ifndef KMED_NO_THREADS
#include <pthread.h>
#include <unistd.h>
#endif
#ifdef KMED_USE_OPENBLAS
#include <cblas.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

/* GGUF block layouts: 2-byte fp16 scale then the quants, no padding. */
typedef char kmed__tensor_q8_0_is_34_bytes[sizeof(kmed_block_q8_0) == 34 ? 1 : -1];
typedef char kmed__tensor_q4_0_is_18_bytes[sizeof(kmed_block_q4_0) == 18 ? 1 : -1];

/* ---- scalar conversions ---- */

static uint32_t kmed__tensor_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float kmed__tensor_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

KMED_API float kmed_bf16_to_f32(uint16_t h)
{
    return kmed__tensor_bits_f32((uint32_t)h << 16);
}

KMED_API uint16_t kmed_f32_to_bf16(float f)
{
    uint32_t u = kmed__tensor_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)      /* NaN: keep sign and payload top, force quiet */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* round to nearest even; a carry into the exponent is the correct rounding (to inf too) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

KMED_API float kmed_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return kmed__tensor_bits_f32(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
        /* subnormal: m * 2^-24, exact in f32 */
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return kmed__tensor_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

KMED_API uint16_t kmed_f32_to_f16(float f)
{
    uint32_t u = kmed__tensor_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu, h, rem, half;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                                   /* normal f16 */
        h = (a - 0x38000000u) >> 13;
        rem = a & 0x1fffu;
        h += (rem > 0x1000u) || (rem == 0x1000u && (h & 1u));
        return (uint16_t)(sign | h);
    }
    if (a <= 0x33000000u) return sign;                        /* <= 2^-25: ties to 0 */
    {
        /* subnormal f16: value = mant * 2^(e-150), unit 2^-24, so shift by 126 - e */
        uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u, sh = 126u - e;
        h = mant >> sh;
        rem = mant & ((1u << sh) - 1u);
        half = 1u << (sh - 1u);
        h += (rem > half) || (rem == half && (h & 1u));
        return (uint16_t)(sign | h);
    }
}

/* ---- Q8_0 / Q4_0 (GGML's reference quantizer, ggml-quants.c *_ref) ---- */

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD_Q8 512
#else
#define KMED__SIMD_Q8 0
#endif

static void kmed__tensor_quant_q8_0(const float *x, kmed_block_q8_0 *y, size_t n)
{
    size_t i, j, nb = n / KMED_QK;
    for (i = 0; i < nb; i++) {
        const float *xb = x + i * KMED_QK;
        float amax = 0.0f, d, id;
#if KMED__SIMD_Q8 == 512
        /* same operations as below, 16 lanes at a time; roundf's ties-away-from-zero is
           rebuilt from trunc. Blocks holding NaN take the scalar path (max order). */
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        if (!_mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) &&
            !_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) &&
            !_mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) {
            __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1), half = _mm512_set1_ps(0.5f);
            __m512 ivec, one = _mm512_set1_ps(1.0f);
            int k;
            amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            d = amax / 127.0f;
            id = d != 0.0f ? 1.0f / d : 0.0f;
            y[i].d = kmed_f32_to_f16(d);
            ivec = _mm512_set1_ps(id);
            for (k = 0; k < 2; k++) {
                __m512 p = _mm512_mul_ps(k ? v1 : v0, ivec), a = _mm512_abs_ps(p);
                __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), half, _CMP_GE_OQ);
                __m512 r = _mm512_mask_add_ps(t, up, t, one);
                __m512i q = _mm512_cvttps_epi32(r);
                __mmask16 neg = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_LT_OQ);
                q = _mm512_mask_sub_epi32(q, neg, _mm512_setzero_si512(), q);
                _mm_storeu_si128((__m128i *)(void *)(y[i].qs + 16 * k), _mm512_cvtepi32_epi8(q));
            }
            continue;
        }
#endif
        for (j = 0; j < KMED_QK; j++) {
            float v = fabsf(xb[j]);
            amax = amax > v ? amax : v;  /* GGML's MAX(amax, v), NaN behaviour included */
        }
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kmed_f32_to_f16(d);
        for (j = 0; j < KMED_QK; j++) y[i].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

static void kmed__tensor_quant_q4_0(const float *x, kmed_block_q4_0 *y, size_t n)
{
    size_t i, j, nb = n / KMED_QK;
    for (i = 0; i < nb; i++) {
        const float *xb = x + i * KMED_QK;
        float amax = 0.0f, max = 0.0f, d, id;
        for (j = 0; j < KMED_QK; j++) {
            if (amax < fabsf(xb[j])) { amax = fabsf(xb[j]); max = xb[j]; }
        }
        d = max / -8.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kmed_f32_to_f16(d);
        for (j = 0; j < KMED_QK / 2; j++) {
            /* volatile: GGML rounds x*id to float before adding 8.5; a fused multiply-add
               (gcc -ffp-contract=fast) would change some nibbles */
            volatile float x0 = xb[j] * id, x1 = xb[j + KMED_QK / 2] * id;
            int q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = (uint8_t)((unsigned)q0 | ((unsigned)q1 << 4));
        }
    }
}

KMED_API void kmed_quantize_row(kmed_dtype t, const float *x, void *y, size_t n)
{
    size_t i;
    switch (t) {
    case KMED_F32: memcpy(y, x, n * sizeof(float)); break;
    case KMED_F16:
        for (i = 0; i < n; i++) ((uint16_t *)y)[i] = kmed_f32_to_f16(x[i]);
        break;
    case KMED_BF16:
        for (i = 0; i < n; i++) ((uint16_t *)y)[i] = kmed_f32_to_bf16(x[i]);
        break;
    case KMED_Q8_0:
        KMED_ASSERT(n % KMED_QK == 0);
        kmed__tensor_quant_q8_0(x, (kmed_block_q8_0 *)y, n);
        break;
    case KMED_Q4_0:
        KMED_ASSERT(n % KMED_QK == 0);
        kmed__tensor_quant_q4_0(x, (kmed_block_q4_0 *)y, n);
        break;
    default: KMED_ASSERT(0 && "kmed_quantize_row: dtype not computable");
    }
}

KMED_API void kmed_dequantize_row(kmed_dtype t, const void *x, float *y, size_t n)
{
    size_t i, j;
    switch (t) {
    case KMED_F32: memcpy(y, x, n * sizeof(float)); break;
    case KMED_F16: case KMED_BF16:
        /* safetensors data may sit at an odd offset: memcpy loads, never a misaligned read */
        for (i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, (const unsigned char *)x + 2 * i, 2);
            y[i] = t == KMED_F16 ? kmed_f16_to_f32(h) : kmed_bf16_to_f32(h);
        }
        break;
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)x;
        KMED_ASSERT(n % KMED_QK == 0);
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d);
            for (j = 0; j < KMED_QK; j++) y[i * KMED_QK + j] = (float)b[i].qs[j] * d;
        }
        break;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)x;
        KMED_ASSERT(n % KMED_QK == 0);
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d);
            for (j = 0; j < KMED_QK / 2; j++) {
                y[i * KMED_QK + j] = (float)((int)(b[i].qs[j] & 15) - 8) * d;
                y[i * KMED_QK + j + KMED_QK / 2] = (float)((int)(b[i].qs[j] >> 4) - 8) * d;
            }
        }
        break;
    }
    default: KMED_ASSERT(0 && "kmed_dequantize_row: dtype not computable");
    }
}

KMED_API int kmed_dtype_computable(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_F16 || t == KMED_BF16 || t == KMED_Q8_0 ||
           t == KMED_Q4_0;
}

/* Bytes of one weight row of n elements (n a multiple of KMED_QK for block types). */
static size_t kmed__tensor_row_bytes(kmed_dtype t, size_t n)
{
    switch (t) {
    case KMED_F32: return n * 4;
    case KMED_F16: case KMED_BF16: return n * 2;
    case KMED_Q8_0: return n / KMED_QK * sizeof(kmed_block_q8_0);
    case KMED_Q4_0: return n / KMED_QK * sizeof(kmed_block_q4_0);
    default: return 0;
    }
}

/* ---- thread pool ---- */

struct kmed_pool {
    int n_threads;
    unsigned char *scratch;      /* GEMM panels kept between calls (fresh mmap'd pages per
                                    call cost page faults); used by the pool's owner only */
    size_t scratch_bytes;
#ifndef KMED_NO_THREADS
    pthread_t *threads;          /* n_threads - 1 workers; the caller is thread 0 */
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    unsigned long gen;           /* bumped per job so a worker runs each job once */
    int pending, stop, started;
    kmed_pool_fn fn;
    void *ctx;
    size_t n, grain;
#endif
};

#ifndef KMED_NO_THREADS
/* The fixed range of thread t: chunks of `grain` split as evenly as possible. */
static void kmed__pool_range(size_t n, size_t grain, int t, int nt, size_t *b, size_t *e)
{
    size_t chunks = (n + grain - 1) / grain;
    size_t c0 = chunks * (size_t)t / (size_t)nt, c1 = chunks * (size_t)(t + 1) / (size_t)nt;
    *b = c0 * grain < n ? c0 * grain : n;
    *e = c1 * grain < n ? c1 * grain : n;
}

typedef struct kmed__pool_arg { kmed_pool *pool; int t; } kmed__pool_arg;

static void *kmed__pool_worker(void *arg)
{
    kmed__pool_arg *a = (kmed__pool_arg *)arg;
    kmed_pool *p = a->pool;
    int t = a->t;
    unsigned long seen = 0;
    KMED_FREE(a);
    for (;;) {
        size_t b, e;
        pthread_mutex_lock(&p->mu);
        while (!p->stop && p->gen == seen) pthread_cond_wait(&p->cv_work, &p->mu);
        if (p->stop) { pthread_mutex_unlock(&p->mu); return NULL; }
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);
        kmed__pool_range(p->n, p->grain, t, p->n_threads, &b, &e);
        if (b < e) p->fn(p->ctx, b, e, t);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->cv_done);
        pthread_mutex_unlock(&p->mu);
    }
}
#endif

KMED_API kmed_result kmed_pool_create(kmed_pool **pool, int n_threads, kmed_error *err)
{
    kmed_pool *p;
    *pool = NULL;
    if (n_threads < 0) return KMED__ERR(err, KMED_ERR_ARG, "thread count %d < 0", n_threads);
#ifdef KMED_NO_THREADS
    n_threads = 1;
#else
    if (n_threads == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    if (n_threads > 1024) n_threads = 1024;
#endif
    p = (kmed_pool *)kmed__calloc(1, sizeof *p);
    if (!p) return KMED__ERR(err, KMED_ERR_NOMEM, "thread pool");
    p->n_threads = n_threads;
#ifndef KMED_NO_THREADS
    if (n_threads > 1) {
        int i;
        p->threads = (pthread_t *)kmed__calloc((size_t)n_threads, sizeof(pthread_t));
        if (!p->threads) { KMED_FREE(p); return KMED__ERR(err, KMED_ERR_NOMEM, "thread pool"); }
        pthread_mutex_init(&p->mu, NULL);
        pthread_cond_init(&p->cv_work, NULL);
        pthread_cond_init(&p->cv_done, NULL);
        p->started = 1;
        for (i = 1; i < n_threads; i++) {
            kmed__pool_arg *a = (kmed__pool_arg *)KMED_MALLOC(sizeof *a);
            int rc = -1;
            if (a) {
                a->pool = p;
                a->t = i;
                rc = pthread_create(&p->threads[i], NULL, kmed__pool_worker, a);
                if (rc != 0) KMED_FREE(a);
            }
            if (rc != 0) {
                p->n_threads = i;  /* join only the ones that started */
                kmed_pool_free(p);
                return KMED__ERR(err, KMED_ERR_NOMEM, "cannot start thread %d of %d", i,
                                 n_threads);
            }
        }
    }
#endif
    *pool = p;
    return KMED_OK;
}

KMED_API void kmed_pool_free(kmed_pool *pool)
{
    if (!pool) return;
#ifndef KMED_NO_THREADS
    if (pool->started) {
        int i;
        pthread_mutex_lock(&pool->mu);
        pool->stop = 1;
        pthread_cond_broadcast(&pool->cv_work);
        pthread_mutex_unlock(&pool->mu);
        for (i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
        pthread_mutex_destroy(&pool->mu);
        pthread_cond_destroy(&pool->cv_work);
        pthread_cond_destroy(&pool->cv_done);
    }
    KMED_FREE(pool->threads);
#endif
    KMED_FREE(pool->scratch);
    KMED_FREE(pool);
}

KMED_API int kmed_pool_threads(const kmed_pool *pool)
{
    return pool ? pool->n_threads : 1;
}

KMED_API void kmed_pool_for(kmed_pool *pool, size_t n, size_t grain, kmed_pool_fn fn,
                            void *ctx)
{
    if (n == 0) return;
    if (grain == 0) grain = 1;
#ifndef KMED_NO_THREADS
    if (pool && pool->n_threads > 1 && n > grain) {
        size_t b, e;
        pthread_mutex_lock(&pool->mu);
        pool->fn = fn;
        pool->ctx = ctx;
        pool->n = n;
        pool->grain = grain;
        pool->pending = pool->n_threads - 1;
        pool->gen++;
        pthread_cond_broadcast(&pool->cv_work);
        pthread_mutex_unlock(&pool->mu);
        kmed__pool_range(n, grain, 0, pool->n_threads, &b, &e);
        if (b < e) fn(ctx, b, e, 0);
        pthread_mutex_lock(&pool->mu);
        while (pool->pending > 0) pthread_cond_wait(&pool->cv_done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
        return;
    }
#endif
    (void)pool;
    fn(ctx, 0, n, 0);
}

/* ---- scalar reference kernels ---- */

KMED_API float kmed_dot_row(kmed_dtype wt, const void *wrow, const float *x, size_t n)
{
    float s = 0.0f;
    size_t i, j;
    switch (wt) {
    case KMED_F32: {
        const float *w = (const float *)wrow;
        for (i = 0; i < n; i++) s += w[i] * x[i];
        break;
    }
    case KMED_F16: {
        const uint16_t *w = (const uint16_t *)wrow;
        for (i = 0; i < n; i++) s += kmed_f16_to_f32(w[i]) * x[i];
        break;
    }
    case KMED_BF16: {
        const uint16_t *w = (const uint16_t *)wrow;
        for (i = 0; i < n; i++) s += kmed_bf16_to_f32(w[i]) * x[i];
        break;
    }
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)wrow;
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d), bs = 0.0f;
            for (j = 0; j < KMED_QK; j++) bs += (float)b[i].qs[j] * x[i * KMED_QK + j];
            s += bs * d;
        }
        break;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)wrow;
        for (i = 0; i < n / KMED_QK; i++) {
            const float *xb = x + i * KMED_QK;
            float d = kmed_f16_to_f32(b[i].d), bs = 0.0f;
            for (j = 0; j < KMED_QK / 2; j++) {
                bs += (float)((int)(b[i].qs[j] & 15) - 8) * xb[j];
                bs += (float)((int)(b[i].qs[j] >> 4) - 8) * xb[j + KMED_QK / 2];
            }
            s += bs * d;
        }
        break;
    }
    default: KMED_ASSERT(0 && "kmed_dot_row: dtype not computable");
    }
    return s;
}

/* FAST reference: x already quantized to Q8_0 (xq) for Q8_0/Q4_0 weights; integer block
   dots scaled by both fp16 scales, as GGML's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0. */
static float kmed__tensor_dot_q8(kmed_dtype wt, const void *wrow, const kmed_block_q8_0 *xq,
                                 size_t n)
{
    float s = 0.0f;
    size_t i, j;
    for (i = 0; i < n / KMED_QK; i++) {
        int sumi = 0;
        float dw;
        if (wt == KMED_Q8_0) {
            const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)wrow + i;
            for (j = 0; j < KMED_QK; j++) sumi += (int)b->qs[j] * (int)xq[i].qs[j];
            dw = kmed_f16_to_f32(b->d);
        } else {
            const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)wrow + i;
            for (j = 0; j < KMED_QK / 2; j++) {
                sumi += ((int)(b->qs[j] & 15) - 8) * (int)xq[i].qs[j];
                sumi += ((int)(b->qs[j] >> 4) - 8) * (int)xq[i].qs[j + KMED_QK / 2];
            }
            dw = kmed_f16_to_f32(b->d);
        }
        s += (float)sumi * (dw * kmed_f16_to_f32(xq[i].d));
    }
    return s;
}

/* Context of one kmed_matmul call, shared by its thread ranges. */
typedef struct kmed__mm_ctx {
    float *y;               /* (M, N) */
    const float *x;         /* (M, K) */
    const void *w;          /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;   /* wrow: bytes per weight row */
    int flags;
    const void *xq;         /* FAST: x as Q8_0 blocks (M, K/32) or BF16 (M, K) */
} kmed__mm_ctx;

static void kmed__mm_scalar_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mm_ctx *c = (const kmed__mm_ctx *)vctx;
    size_t m, n;
    (void)thread;
    for (m = 0; m < c->M; m++) {
        for (n = n0; n < n1; n++) {
            const void *wr = (const unsigned char *)c->w + n * c->wrow;
            float v;
            if ((c->flags & KMED_MM_FAST) && (c->wt == KMED_Q8_0 || c->wt == KMED_Q4_0)) {
                const kmed_block_q8_0 *xq = (const kmed_block_q8_0 *)c->xq;
                v = kmed__tensor_dot_q8(c->wt, wr, xq + m * (c->K / KMED_QK), c->K);
            } else if ((c->flags & KMED_MM_FAST) && c->wt == KMED_BF16) {
                const uint16_t *xb = (const uint16_t *)c->xq + m * c->K;
                const uint16_t *wb = (const uint16_t *)wr;
                size_t k;
                v = 0.0f;
                for (k = 0; k < c->K; k++)
                    v += kmed_bf16_to_f32(wb[k]) * kmed_bf16_to_f32(xb[k]);
            } else {
                v = kmed_dot_row(c->wt, wr, c->x + m * c->K, c->K);
            }
            if (c->flags & KMED_MM_ACC) c->y[m * c->N + n] += v;
            else c->y[m * c->N + n] = v;
        }
    }
}

/* x quantized for the FAST path: Q8_0 rows for Q8_0/Q4_0 weights, BF16 for BF16; NULL when
   FAST does not apply or memory is short (the exact path then runs). Free with KMED_FREE. */
static void *kmed__mm_fast_x(const float *x, kmed_dtype wt, size_t M, size_t K, int flags)
{
    kmed_dtype qt = wt == KMED_BF16 ? KMED_BF16 : KMED_Q8_0;
    size_t rb = kmed__tensor_row_bytes(qt, K), m;
    char *xq;
    if (!(flags & KMED_MM_FAST) || !(wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16))
        return NULL;
    xq = (char *)KMED_MALLOC(M * rb + 1);
    if (xq) for (m = 0; m < M; m++) kmed_quantize_row(qt, x + m * K, xq + m * rb, K);
    return xq;
}

/* Scalar reference of kmed_matmul. */
static void kmed__matmul_ref(kmed_pool *pool, float *y, const float *x, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K, int flags)
{
    kmed__mm_ctx c;
    void *xq;
    if (M == 0 || N == 0) return;
    memset(&c, 0, sizeof c);
    c.y = y; c.x = x; c.w = w; c.wt = wt; c.M = M; c.N = N; c.K = K; c.flags = flags;
    c.wrow = kmed__tensor_row_bytes(wt, K);
    xq = kmed__mm_fast_x(x, wt, M, K, flags);
    if (!xq) c.flags &= ~KMED_MM_FAST;
    c.xq = xq;
    kmed_pool_for(pool, N, 16, kmed__mm_scalar_range, &c);
    KMED_FREE(xq);
}

typedef struct kmed__mmdx_ctx {
    float *dx;              /* (M, K) */
    const float *dy;        /* (M, N) */
    const void *w;          /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;
} kmed__mmdx_ctx;

/* dx[:, k0:k1] += dy · W[:, k0:k1]; one dequantized weight row slice at a time. */
static void kmed__mmdx_range(void *vctx, size_t k0, size_t k1, int thread)
{
    const kmed__mmdx_ctx *c = (const kmed__mmdx_ctx *)vctx;
    size_t n, m, k, len = k1 - k0, boff;
    float buf[256];
    (void)thread;
    while (len > 0) {
        size_t kl = len < 256 ? len : 256;
        for (n = 0; n < c->N; n++) {
            const unsigned char *wr = (const unsigned char *)c->w + n * c->wrow;
            boff = kmed__tensor_row_bytes(c->wt, k0);
            kmed_dequantize_row(c->wt, wr + boff, buf, kl);
            for (m = 0; m < c->M; m++) {
                float g = c->dy[m * c->N + n];
                float *d = c->dx + m * c->K + k0;
                for (k = 0; k < kl; k++) d[k] += g * buf[k];
            }
        }
        k0 += kl;
        len -= kl;
    }
}

static void kmed__matmul_dx_ref(kmed_pool *pool, float *dx, const float *dy, const void *w,
                                kmed_dtype wt, size_t M, size_t N, size_t K)
{
    kmed__mmdx_ctx c;
    if (M == 0 || K == 0) return;
    c.dx = dx; c.dy = dy; c.w = w; c.wt = wt; c.M = M; c.N = N; c.K = K;
    c.wrow = kmed__tensor_row_bytes(wt, K);
    /* grain 256 keeps each range a whole number of quant blocks and of buf */
    kmed_pool_for(pool, K, 256, kmed__mmdx_range, &c);
}

typedef struct kmed__mmdw_ctx {
    float *dw;              /* (N, K) */
    const float *dy;        /* (M, N) */
    const float *x;         /* (M, K) */
    size_t M, N, K;
} kmed__mmdw_ctx;

static void kmed__mmdw_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mmdw_ctx *c = (const kmed__mmdw_ctx *)vctx;
    size_t n, m, k;
    (void)thread;
    for (n = n0; n < n1; n++) {
        float *d = c->dw + n * c->K;
        for (m = 0; m < c->M; m++) {
            float g = c->dy[m * c->N + n];
            const float *xr = c->x + m * c->K;
            for (k = 0; k < c->K; k++) d[k] += g * xr[k];
        }
    }
}

static void kmed__matmul_dw_ref(kmed_pool *pool, float *dw, const float *dy, const float *x,
                                size_t M, size_t N, size_t K)
{
    kmed__mmdw_ctx c;
    if (N == 0 || K == 0) return;
    c.dw = dw; c.dy = dy; c.x = x; c.M = M; c.N = N; c.K = K;
    kmed_pool_for(pool, N, 4, kmed__mmdw_range, &c);
}

#ifndef KMED_USE_OPENBLAS   /* cblas_sgemm replaces the reference sgemm entirely */
typedef struct kmed__sgemm_ctx {
    int ta, tb;
    size_t M, N, K, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
} kmed__sgemm_ctx;

/* Scalar reference sgemm over rows [m0, m1) of C. */
static void kmed__sgemm_ref_range(void *vctx, size_t m0, size_t m1, int thread)
{
    const kmed__sgemm_ctx *c = (const kmed__sgemm_ctx *)vctx;
    size_t m, n, k;
    (void)thread;
    for (m = m0; m < m1; m++) {
        for (n = 0; n < c->N; n++) {
            float s = 0.0f, *cp = c->C + m * c->ldc + n;
            for (k = 0; k < c->K; k++) {
                float a = c->ta ? c->A[k * c->lda + m] : c->A[m * c->lda + k];
                float b = c->tb ? c->B[n * c->ldb + k] : c->B[k * c->ldb + n];
                s += a * b;
            }
            *cp = c->beta == 0.0f ? c->alpha * s : c->alpha * s + c->beta * *cp;
        }
    }
}

static void kmed__sgemm_ref(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                            float alpha, const float *A, size_t lda, const float *B,
                            size_t ldb, float beta, float *C, size_t ldc)
{
    kmed__sgemm_ctx c;
    if (M == 0 || N == 0) return;
    c.ta = ta; c.tb = tb; c.M = M; c.N = N; c.K = K; c.lda = lda; c.ldb = ldb; c.ldc = ldc;
    c.alpha = alpha; c.beta = beta; c.A = A; c.B = B; c.C = C;
    kmed_pool_for(pool, M, 4, kmed__sgemm_ref_range, &c);
}
#endif

/* ---- SIMD kernels, chosen at compile time (the scalar code above is the reference) ---- */

/* AVX-512 code also uses AVX2/FMA/F16C forms (every AVX-512 CPU has them; -march=native
   turns them all on) */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD 512
#define KMED__MR 12          /* micro-tile rows: 12 x 2 zmm accumulators of 16 floats */
#define KMED__NR 32
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD 256
#define KMED__MR 6           /* 6 x 2 ymm accumulators of 8 floats */
#define KMED__NR 16
#endif

#ifdef KMED__SIMD
#define KMED__KC 256         /* k-depth of packed panels: a B panel (KC x NR) stays in L1 */
#define KMED__MC (KMED__MR * 12)
#define KMED__NC 512         /* B block KC x NC (512 KB) stays in L2 */

/* Vector width helpers shared by the GEMM and matrix-vector kernels. */
#if KMED__SIMD == 512
#define KMED__REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define KMED__VZERO() _mm512_setzero_ps()
#define KMED__VT __m512
#define KMED__VW 16
#define KMED__VLOAD _mm512_loadu_ps
#define KMED__VSTORE _mm512_storeu_ps
#define KMED__VADD _mm512_add_ps
#define KMED__VFMA _mm512_fmadd_ps
#define KMED__VSET1 _mm512_set1_ps
#else
#define KMED__REP(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define KMED__VZERO() _mm256_setzero_ps()
#define KMED__VT __m256
#define KMED__VW 8
#define KMED__VLOAD _mm256_loadu_ps
#define KMED__VSTORE _mm256_storeu_ps
#define KMED__VADD _mm256_add_ps
#define KMED__VFMA _mm256_fmadd_ps
#define KMED__VSET1 _mm256_set1_ps
#endif

static float kmed__tensor_h2f(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return kmed_f16_to_f32(h);
#endif
}

/* Dequantizes n elements (a multiple of 32 for block types) exactly, like
   kmed_dequantize_row. */
static void kmed__dequant_simd(kmed_dtype t, const void *src, float *y, size_t n)
{
    size_t i = 0;
#if KMED__SIMD == 512
    switch (t) {
    case KMED_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 16 <= n; i += 16) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            _mm512_storeu_ps(y + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
        for (; i < n; i++) y[i] = kmed_bf16_to_f32(s[i]);
        return;
    }
    case KMED_F16: {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
        for (; i < n; i++) y[i] = kmed_f16_to_f32(s[i]);
        return;
    }
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)src;
        for (; i < n / KMED_QK; i++) {
            __m512 d = _mm512_set1_ps(kmed__tensor_h2f(b[i].d));
            __m128i q0 = _mm_loadu_si128((const __m128i *)b[i].qs);
            __m128i q1 = _mm_loadu_si128((const __m128i *)(b[i].qs + 16));
            _mm512_storeu_ps(y + i * 32,
                             _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0))));
            _mm512_storeu_ps(y + i * 32 + 16,
                             _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1))));
        }
        return;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)src;
        const __m128i m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
        for (; i < n / KMED_QK; i++) {
            __m512 d = _mm512_set1_ps(kmed__tensor_h2f(b[i].d));
            __m128i v = _mm_loadu_si128((const __m128i *)b[i].qs);
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, m4), e8);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m4), e8);
            _mm512_storeu_ps(y + i * 32,
                             _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))));
            _mm512_storeu_ps(y + i * 32 + 16,
                             _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))));
        }
        return;
    }
    default: break;
    }
#else
    switch (t) {
    case KMED_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        }
        for (; i < n; i++) y[i] = kmed_bf16_to_f32(s[i]);
        return;
    }
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)src;
        for (; i < n / KMED_QK; i++) {
            __m256 d = _mm256_set1_ps(kmed__tensor_h2f(b[i].d));
            int j;
            for (j = 0; j < 4; j++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(b[i].qs + 8 * j));
                _mm256_storeu_ps(y + i * 32 + 8 * j,
                                 _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
            }
        }
        return;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)src;
        const __m128i m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
        for (; i < n / KMED_QK; i++) {
            __m256 d = _mm256_set1_ps(kmed__tensor_h2f(b[i].d));
            __m128i v = _mm_loadu_si128((const __m128i *)b[i].qs);
            __m128i lo = _mm_sub_epi8(_mm_and_si128(v, m4), e8);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m4), e8);
            float *o = y + i * 32;
            __m128i parts[4];
            int j;
            parts[0] = lo; parts[1] = _mm_srli_si128(lo, 8);
            parts[2] = hi; parts[3] = _mm_srli_si128(hi, 8);
            for (j = 0; j < 4; j++)
                _mm256_storeu_ps(o + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(
                                                                 _mm256_cvtepi8_epi32(parts[j]))));
        }
        return;
    }
    default: break;
    }
#endif
    kmed_dequantize_row(t, src, y, n);
}

/* Dequantizes elements [n0, n0 + n) of a row (any n0; block types go through a block). */
static void kmed__dequant_span(kmed_dtype t, const unsigned char *row, size_t n0, size_t n,
                               float *y)
{
    if (t == KMED_F32) { memcpy(y, (const float *)row + n0, n * sizeof(float)); return; }
    if (t == KMED_F16 || t == KMED_BF16) {
        kmed__dequant_simd(t, row + 2 * n0, y, n);
        return;
    }
    if (n0 % KMED_QK == 0 && n % KMED_QK == 0) {   /* whole blocks: straight through */
        kmed__dequant_simd(t, row + kmed__tensor_row_bytes(t, n0), y, n);
        return;
    }
    while (n > 0) {
        size_t b = n0 / KMED_QK, off = n0 % KMED_QK, take = KMED_QK - off;
        float tmp[KMED_QK];
        if (take > n) take = n;
        kmed__dequant_simd(t, row + b * kmed__tensor_row_bytes(t, KMED_QK), tmp, KMED_QK);
        memcpy(y, tmp + off, take * sizeof(float));
        y += take; n0 += take; n -= take;
    }
}

/* One GEMM operand. A(i,k) = trans ? p[k*ld + i] : p[i*ld + k] (F32, scaled by alpha while
   packing). B(k,n) = trans ? row n, element k : row k, element n, rows of `ld` elements in
   dtype t (any computable dtype: dequantized while packing). */
typedef struct kmed__gsrc {
    const void *p;
    kmed_dtype t;
    size_t ld;
    int trans;
    float alpha;
} kmed__gsrc;

#if KMED__SIMD == 512
static void kmed__tr16(const float *src, size_t lds, float *dst, size_t ldd);
#endif

/* ap[k*MR + i] = A(i0+i, k0+k), zero rows past mr. */
static void kmed__pack_a(float *ap, const kmed__gsrc *A, size_t i0, size_t mr, size_t k0,
                         size_t kc)
{
    const float *a = (const float *)A->p;
    size_t i, k;
    if (A->trans) {
#if KMED__SIMD == 512
        if (mr == KMED__MR && A->alpha == 1.0f) {   /* 12 contiguous floats per k */
            for (k = 0; k < kc; k++)
                _mm512_mask_storeu_ps(ap + k * KMED__MR, 0x0fff,
                                      _mm512_maskz_loadu_ps(0x0fff, a + (k0 + k) * A->ld + i0));
            return;
        }
#endif
        for (k = 0; k < kc; k++) {
            const float *src = a + (k0 + k) * A->ld + i0;
            for (i = 0; i < mr; i++) ap[k * KMED__MR + i] = A->alpha * src[i];
            for (; i < KMED__MR; i++) ap[k * KMED__MR + i] = 0.0f;
        }
    } else {
#if KMED__SIMD == 512
        if (mr == KMED__MR && A->alpha == 1.0f && kc >= 16) {
            /* 16 k at a time: the 12 rows (4 zero rows below) transposed as a 16x16 tile */
            float t[16 * 16], u[16 * 16];
            memset(t + 12 * 16, 0, 4 * 16 * sizeof(float));
            for (k = 0; k + 16 <= kc; k += 16) {
                size_t j;
                for (i = 0; i < KMED__MR; i++)
                    _mm512_storeu_ps(t + i * 16, _mm512_loadu_ps(a + (i0 + i) * A->ld + k0 + k));
                kmed__tr16(t, 16, u, 16);
                for (j = 0; j < 16; j++)
                    _mm512_mask_storeu_ps(ap + (k + j) * KMED__MR, 0x0fff,
                                          _mm512_loadu_ps(u + j * 16));
            }
            for (i = 0; i < mr; i++) {
                const float *src = a + (i0 + i) * A->ld + k0;
                size_t kk;
                for (kk = k; kk < kc; kk++) ap[kk * KMED__MR + i] = src[kk];
            }
            return;
        }
#endif
        for (i = 0; i < mr; i++) {
            const float *src = a + (i0 + i) * A->ld + k0;
            for (k = 0; k < kc; k++) ap[k * KMED__MR + i] = A->alpha * src[k];
        }
        for (; i < KMED__MR; i++)
            for (k = 0; k < kc; k++) ap[k * KMED__MR + i] = 0.0f;
    }
}

#if KMED__SIMD == 512
/* dst[j*ldd + i] = src[i*lds + j] for a 16x16 tile (unrolled by hand so the 16 rows stay
   in registers). */
static void kmed__tr16(const float *src, size_t lds, float *dst, size_t ldd)
{
#define KMED__L(i) __m512 r##i = _mm512_loadu_ps(src + (size_t)(i) * lds);
#define KMED__U(a, b) __m512 t##a = _mm512_unpacklo_ps(r##a, r##b), \
                             t##b = _mm512_unpackhi_ps(r##a, r##b);
#define KMED__P(a, b, c, d)                                                                   \
    __m512 u##a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t##a),              \
                                                      _mm512_castps_pd(t##c)));            \
    __m512 u##b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t##a),              \
                                                      _mm512_castps_pd(t##c)));            \
    __m512 u##c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t##b),              \
                                                      _mm512_castps_pd(t##d)));            \
    __m512 u##d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t##b),              \
                                                      _mm512_castps_pd(t##d)));
#define KMED__Q(a, b) __m512 v##a = _mm512_shuffle_f32x4(u##a, u##b, 0x88), \
                             v##b = _mm512_shuffle_f32x4(u##a, u##b, 0xdd);
#define KMED__W(a, b)                                                                        \
    _mm512_storeu_ps(dst + (size_t)(a) * ldd, _mm512_shuffle_f32x4(v##a, v##b, 0x88));        \
    _mm512_storeu_ps(dst + (size_t)(a + 8) * ldd, _mm512_shuffle_f32x4(v##a, v##b, 0xdd));
    KMED__L(0) KMED__L(1) KMED__L(2) KMED__L(3) KMED__L(4) KMED__L(5) KMED__L(6) KMED__L(7)
    KMED__L(8) KMED__L(9) KMED__L(10) KMED__L(11) KMED__L(12) KMED__L(13) KMED__L(14)
    KMED__L(15)
    KMED__U(0, 1) KMED__U(2, 3) KMED__U(4, 5) KMED__U(6, 7)
    KMED__U(8, 9) KMED__U(10, 11) KMED__U(12, 13) KMED__U(14, 15)
    /* u(4i+c) holds column c of each 128-bit lane for rows 4i..4i+3 */
    KMED__P(0, 1, 2, 3) KMED__P(4, 5, 6, 7) KMED__P(8, 9, 10, 11) KMED__P(12, 13, 14, 15)
    KMED__Q(0, 4) KMED__Q(1, 5) KMED__Q(2, 6) KMED__Q(3, 7)
    KMED__Q(8, 12) KMED__Q(9, 13) KMED__Q(10, 14) KMED__Q(11, 15)
    KMED__W(0, 8) KMED__W(1, 9) KMED__W(2, 10) KMED__W(3, 11)
    KMED__W(4, 12) KMED__W(5, 13) KMED__W(6, 14) KMED__W(7, 15)
#undef KMED__L
#undef KMED__U
#undef KMED__P
#undef KMED__Q
#undef KMED__W
}
#endif

/* bp[k*NR + j] = src[j*lds + k] for j < nr, k < kc; zero columns past nr. */
static void kmed__pack_bt(float *bp, const float *src, size_t lds, size_t nr, size_t kc)
{
    size_t j = 0, k;
#if KMED__SIMD == 512
    for (; j + 16 <= nr; j += 16) {
        for (k = 0; k + 16 <= kc; k += 16) {
            size_t i;
            /* 16 row streams at once defeat the hardware prefetcher: fetch 4 lines ahead */
            for (i = 0; i < 16; i++)
                _mm_prefetch((const char *)(src + (j + i) * lds + k + 64), _MM_HINT_T0);
            kmed__tr16(src + j * lds + k, lds, bp + k * KMED__NR + j, KMED__NR);
        }
        for (; k < kc; k++) {
            size_t jj;
            for (jj = j; jj < j + 16; jj++) bp[k * KMED__NR + jj] = src[jj * lds + k];
        }
    }
#endif
    for (; j < nr; j++)
        for (k = 0; k < kc; k++) bp[k * KMED__NR + j] = src[j * lds + k];
    for (; j < KMED__NR; j++)
        for (k = 0; k < kc; k++) bp[k * KMED__NR + j] = 0.0f;
}

/* Packs B(k0.., n0..) as a KC x NR panel; tmp holds NR x KC floats for dequantized rows. */
static void kmed__pack_b(float *bp, const kmed__gsrc *B, size_t k0, size_t kc, size_t n0,
                         size_t nr, float *tmp)
{
    const unsigned char *base = (const unsigned char *)B->p;
    size_t rb = kmed__tensor_row_bytes(B->t, B->ld), j, k;
    if (B->trans) {
        if (B->t == KMED_F32) {
            kmed__pack_bt(bp, (const float *)base + n0 * B->ld + k0, B->ld, nr, kc);
        } else {
            for (j = 0; j < nr; j++)
                kmed__dequant_span(B->t, base + (n0 + j) * rb, k0, kc, tmp + j * kc);
            kmed__pack_bt(bp, tmp, kc, nr, kc);
        }
        return;
    }
    if (B->t == KMED_F32 && nr == KMED__NR) {   /* plain copy, NR floats per k */
        for (k = 0; k < kc; k++) {
            const float *src = (const float *)(const void *)(base + (k0 + k) * rb) + n0;
            KMED__VSTORE(bp + k * KMED__NR, KMED__VLOAD(src));
            KMED__VSTORE(bp + k * KMED__NR + KMED__VW, KMED__VLOAD(src + KMED__VW));
        }
        return;
    }
    for (k = 0; k < kc; k++) {
        float *d = bp + k * KMED__NR;
        kmed__dequant_span(B->t, base + (k0 + k) * rb, n0, nr, d);
        for (j = nr; j < KMED__NR; j++) d[j] = 0.0f;
    }
}

/* Micro-kernel: C[mr, nr] (+)= Ap (MR x kc, packed) . Bp (kc x NR, row k at bp + k*ldb:
   packed panels have ldb = NR; an f32 matrix with >= NR columns left can be used in place).
   The k loop and the final add are the same whatever mr/nr are, so edge tiles round like
   full ones. */
static void kmed__gemm_ukr_ldb(size_t kc, const float *ap, const float *bp, size_t ldb,
                               float *c, size_t ldc, int accum, size_t mr, size_t nr)
{
#define KMED__D(i) KMED__VT c##i##a = KMED__VZERO(), c##i##b = KMED__VZERO();
#define KMED__F(i) a = KMED__VSET1(ap[i]); c##i##a = KMED__VFMA(a, b0, c##i##a); \
    c##i##b = KMED__VFMA(a, b1, c##i##b);
#define KMED__S(i) KMED__VSTORE(t + i * KMED__NR, c##i##a); \
    KMED__VSTORE(t + i * KMED__NR + KMED__VW, c##i##b);
#define KMED__C(i) if (accum) { c##i##a = KMED__VADD(c##i##a, KMED__VLOAD(c + i * ldc)); \
    c##i##b = KMED__VADD(c##i##b, KMED__VLOAD(c + i * ldc + KMED__VW)); } \
    KMED__VSTORE(c + i * ldc, c##i##a); KMED__VSTORE(c + i * ldc + KMED__VW, c##i##b);
    KMED__REP(KMED__D)
    size_t k;
    for (k = 0; k < kc; k++) {
        KMED__VT b0 = KMED__VLOAD(bp), b1 = KMED__VLOAD(bp + KMED__VW), a;
        KMED__REP(KMED__F)
        ap += KMED__MR;
        bp += ldb;
    }
    if (mr == KMED__MR && nr == KMED__NR) {
        KMED__REP(KMED__C)
    } else {
        float t[KMED__MR * KMED__NR];
        size_t i, j;
        KMED__REP(KMED__S)
        for (i = 0; i < mr; i++)
            for (j = 0; j < nr; j++)
                c[i * ldc + j] = accum ? c[i * ldc + j] + t[i * KMED__NR + j] : t[i * KMED__NR + j];
    }
#undef KMED__D
#undef KMED__F
#undef KMED__S
#undef KMED__C
}

static void kmed__gemm_ukr(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                           int accum, size_t mr, size_t nr)
{
    kmed__gemm_ukr_ldb(kc, ap, bp, KMED__NR, c, ldc, accum, mr, nr);
}

typedef struct kmed__gemm_job {
    kmed__gsrc A, B;
    float *C;               /* (M, ldc) */
    size_t ldc, M, N, K;
    float beta;             /* with accum: C = beta * C + A.B, applied per thread range */
    int accum;              /* 0: C = A.B (C not read) */
    int split_n;            /* threads take column ranges (else row ranges) */
    unsigned char *scratch; /* per thread: scratch_bytes each */
    size_t scratch_bytes, ap_floats, bp_floats;
} kmed__gemm_job;

static float *kmed__align64(unsigned char *p)
{
    return (float *)(void *)(p + ((64 - ((uintptr_t)p & 63)) & 63));
}

static void kmed__gemm_block(const kmed__gemm_job *g, size_t m0, size_t m1, size_t n0,
                             size_t n1, unsigned char *scratch)
{
    float *ap = kmed__align64(scratch);
    float *bp = ap + g->ap_floats;
    float *tmp = bp + g->bp_floats;
    size_t jc, pc, ic, jr, ir, m, n;
    if (g->accum && g->beta != 1.0f)
        for (m = m0; m < m1; m++)
            for (n = n0; n < n1; n++) g->C[m * g->ldc + n] *= g->beta;
    if (g->K == 0) {
        if (!g->accum)
            for (m = m0; m < m1; m++)
                for (n = n0; n < n1; n++) g->C[m * g->ldc + n] = 0.0f;
        return;
    }
    for (jc = n0; jc < n1; jc += KMED__NC) {
        size_t nc = n1 - jc < KMED__NC ? n1 - jc : KMED__NC;
        for (pc = 0; pc < g->K; pc += KMED__KC) {
            size_t kc = g->K - pc < KMED__KC ? g->K - pc : KMED__KC;
            for (jr = 0; jr < nc; jr += KMED__NR)
                kmed__pack_b(bp + jr * kc, &g->B, pc, kc, jc + jr,
                             nc - jr < KMED__NR ? nc - jr : KMED__NR, tmp);
            for (ic = m0; ic < m1; ic += KMED__MC) {
                size_t mc = m1 - ic < KMED__MC ? m1 - ic : KMED__MC;
                for (ir = 0; ir < mc; ir += KMED__MR)
                    kmed__pack_a(ap + ir * kc, &g->A, ic + ir,
                                 mc - ir < KMED__MR ? mc - ir : KMED__MR, pc, kc);
                for (jr = 0; jr < nc; jr += KMED__NR)
                    for (ir = 0; ir < mc; ir += KMED__MR)
                        kmed__gemm_ukr(kc, ap + ir * kc, bp + jr * kc,
                                       g->C + (ic + ir) * g->ldc + jc + jr, g->ldc,
                                       g->accum || pc > 0,
                                       mc - ir < KMED__MR ? mc - ir : KMED__MR,
                                       nc - jr < KMED__NR ? nc - jr : KMED__NR);
            }
        }
    }
}

static void kmed__gemm_range(void *vctx, size_t b, size_t e, int thread)
{
    const kmed__gemm_job *g = (const kmed__gemm_job *)vctx;
    unsigned char *s = g->scratch + (size_t)thread * g->scratch_bytes;
    if (g->split_n) kmed__gemm_block(g, 0, g->M, b, e, s);
    else kmed__gemm_block(g, b, e, 0, g->N, s);
}

/* Runs the job over the pool; 0 when scratch memory is short (caller falls back). */
static int kmed__gemm_run(kmed_pool *pool, kmed__gemm_job *g)
{
    int nt = kmed_pool_threads(pool);
    /* panels sized to the problem: small GEMMs (LoRA) then stay off mmap'd fresh pages */
    size_t kc = g->K < KMED__KC ? (g->K ? g->K : 1) : KMED__KC;
    size_t mc = (g->M + KMED__MR - 1) / KMED__MR * KMED__MR;
    size_t nc = (g->N + KMED__NR - 1) / KMED__NR * KMED__NR, per;
    unsigned char *mem;
    if (mc > KMED__MC) mc = KMED__MC;
    if (nc > KMED__NC) nc = KMED__NC;
    g->ap_floats = mc * kc;
    g->bp_floats = nc * kc;
    per = (g->ap_floats + g->bp_floats + KMED__NR * kc) * sizeof(float) + 64;
    if (pool && pool->scratch_bytes >= per * (size_t)nt) {
        mem = pool->scratch;
    } else {
        mem = (unsigned char *)KMED_MALLOC(per * (size_t)nt);
        if (!mem) return 0;
        if (pool) {   /* keep the larger block for the next call */
            KMED_FREE(pool->scratch);
            pool->scratch = mem;
            pool->scratch_bytes = per * (size_t)nt;
        }
    }
    g->scratch = mem;
    g->scratch_bytes = per;
    if (g->split_n) kmed_pool_for(pool, g->N, KMED__NR, kmed__gemm_range, g);
    else kmed_pool_for(pool, g->M, KMED__MR, kmed__gemm_range, g);
    if (!pool) KMED_FREE(mem);
    return 1;
}

/* ---- matrix-vector kernels (M small: decode). Each output is computed by the same
   instruction sequence whatever rows share its loop, so results do not depend on the thread
   split. ---- */

typedef struct kmed__mv_ctx {
    float *y;                  /* (M, N) */
    const float *x;            /* (M, K) */
    const unsigned char *w;    /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;
    int acc;
    const void *xq;            /* FAST: x as Q8_0 blocks (M, K/32) or BF16 (M, K) */
} kmed__mv_ctx;

static void kmed__mv_out(const kmed__mv_ctx *c, size_t m, size_t n, float v)
{
    if (c->acc) c->y[m * c->N + n] += v;
    else c->y[m * c->N + n] = v;
}

static float kmed__hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if KMED__SIMD == 512
#define KMED__HSUM(v) _mm512_reduce_add_ps(v)
#define KMED__LD_F32(r, k) _mm512_loadu_ps((const float *)(const void *)(r) + (k))
#define KMED__U16P(r, k) ((const void *)((const uint16_t *)(const void *)(r) + (k)))
#define KMED__LD_BF16(r, k) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32( \
    _mm256_loadu_si256((const __m256i *)KMED__U16P(r, k))), 16))
#define KMED__LD_F16(r, k) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)KMED__U16P(r, k)))
/* 16 int8 -> 16 floats */
#define KMED__I8X16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(p))
#else
#define KMED__HSUM(v) kmed__hsum8(v)
#define KMED__LD_F32(r, k) _mm256_loadu_ps((const float *)(const void *)(r) + (k))
#define KMED__U16P(r, k) ((const void *)((const uint16_t *)(const void *)(r) + (k)))
#define KMED__LD_BF16(r, k) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32( \
    _mm_loadu_si128((const __m128i *)KMED__U16P(r, k))), 16))
#define KMED__LD_F16(r, k) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)KMED__U16P(r, k)))
#endif

/* Float-like weights (F32, BF16, F16), four weight rows per pass over x. */
#define KMED__MV_FLOATLIKE(NAME, LD, CVT)                                                   \
static void NAME(const kmed__mv_ctx *c, size_t n0, size_t n1)                             \
{                                                                                         \
    size_t n, m, k, r, K = c->K, KV = K / KMED__VW * KMED__VW;                             \
    for (n = n0; n < n1; n += 4) {                                                        \
        size_t R = n1 - n < 4 ? n1 - n : 4;                                               \
        const unsigned char *w0 = c->w + n * c->wrow;                                     \
        const unsigned char *w1 = w0 + (R > 1 ? c->wrow : 0);                             \
        const unsigned char *w2 = w0 + (R > 2 ? 2 * c->wrow : 0);                         \
        const unsigned char *w3 = w0 + (R > 3 ? 3 * c->wrow : 0);                         \
        for (m = 0; m < c->M; m++) {                                                      \
            const float *x = c->x + m * K;                                                \
            KMED__VT a0 = KMED__VZERO(), a1 = a0, a2 = a0, a3 = a0;                       \
            float out[4];                                                                 \
            for (k = 0; k < KV; k += KMED__VW) {                                          \
                KMED__VT xv = KMED__VLOAD(x + k);                                         \
                a0 = KMED__VFMA(LD(w0, k), xv, a0);                                       \
                a1 = KMED__VFMA(LD(w1, k), xv, a1);                                       \
                a2 = KMED__VFMA(LD(w2, k), xv, a2);                                       \
                a3 = KMED__VFMA(LD(w3, k), xv, a3);                                       \
            }                                                                             \
            out[0] = KMED__HSUM(a0); out[1] = KMED__HSUM(a1);                             \
            out[2] = KMED__HSUM(a2); out[3] = KMED__HSUM(a3);                             \
            for (r = 0; r < R; r++) {                                                     \
                const unsigned char *wr = c->w + (n + r) * c->wrow;                       \
                for (k = KV; k < K; k++) out[r] += CVT(wr, k) * x[k];                     \
                kmed__mv_out(c, m, n + r, out[r]);                                        \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}
#define KMED__CVT_F32(r, k) ((const float *)(const void *)(r))[k]
#define KMED__CVT_BF16(r, k) kmed_bf16_to_f32(((const uint16_t *)(const void *)(r))[k])
#define KMED__CVT_F16(r, k) kmed_f16_to_f32(((const uint16_t *)(const void *)(r))[k])
KMED__MV_FLOATLIKE(kmed__mv_f32, KMED__LD_F32, KMED__CVT_F32)
KMED__MV_FLOATLIKE(kmed__mv_bf16, KMED__LD_BF16, KMED__CVT_BF16)
KMED__MV_FLOATLIKE(kmed__mv_f16, KMED__LD_F16, KMED__CVT_F16)

/* 32 weights of block b as two (AVX-512) or four (AVX2) float vectors, unscaled. */
#if KMED__SIMD == 512
#define KMED__QDOT(t, q, xb)                                                               \
    t = _mm512_mul_ps(KMED__I8X16(q##0), _mm512_loadu_ps(xb));                            \
    t = _mm512_fmadd_ps(KMED__I8X16(q##1), _mm512_loadu_ps((xb) + 16), t)
#else
#define KMED__I8X8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(p))
#define KMED__QDOT(t, q, xb)                                                               \
    t = _mm256_mul_ps(KMED__I8X8(q##0), _mm256_loadu_ps(xb));                             \
    t = _mm256_fmadd_ps(KMED__I8X8(_mm_srli_si128(q##0, 8)), _mm256_loadu_ps((xb) + 8), t); \
    t = _mm256_fmadd_ps(KMED__I8X8(q##1), _mm256_loadu_ps((xb) + 16), t);                 \
    t = _mm256_fmadd_ps(KMED__I8X8(_mm_srli_si128(q##1, 8)), _mm256_loadu_ps((xb) + 24), t)
#endif

/* Q8_0 / Q4_0 weights, exact f32 activations: per block, sum q*x then scale by d (as the
   scalar reference does); two weight rows per pass. */
static void kmed__mv_quant(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK;
    const __m128i m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
    int q4 = c->wt == KMED_Q4_0;
    size_t bsz = q4 ? sizeof(kmed_block_q4_0) : sizeof(kmed_block_q8_0);
    for (n = n0; n < n1; n += 2) {
        size_t R = n1 - n < 2 ? 1 : 2;
        const unsigned char *r0 = c->w + n * c->wrow, *r1 = r0 + (R > 1 ? c->wrow : 0);
        for (m = 0; m < c->M; m++) {
            const float *x = c->x + m * c->K;
            KMED__VT a0 = KMED__VZERO(), a1 = a0, t;
            for (b = 0; b < nb; b++) {
                __m128i p0, p1, s0, s1;
                float d0, d1;
                /* prefetch the next row pair: a whole pass ahead hides memory latency */
                _mm_prefetch((const char *)(r0 + 2 * c->wrow + b * bsz), _MM_HINT_T0);
                _mm_prefetch((const char *)(r1 + 2 * c->wrow + b * bsz), _MM_HINT_T0);
                if (q4) {
                    const kmed_block_q4_0 *k0 = (const kmed_block_q4_0 *)(const void *)r0 + b;
                    const kmed_block_q4_0 *k1 = (const kmed_block_q4_0 *)(const void *)r1 + b;
                    __m128i v0 = _mm_loadu_si128((const __m128i *)(const void *)k0->qs);
                    __m128i v1 = _mm_loadu_si128((const __m128i *)(const void *)k1->qs);
                    p0 = _mm_sub_epi8(_mm_and_si128(v0, m4), e8);
                    p1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v0, 4), m4), e8);
                    s0 = _mm_sub_epi8(_mm_and_si128(v1, m4), e8);
                    s1 = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v1, 4), m4), e8);
                    d0 = kmed__tensor_h2f(k0->d);
                    d1 = kmed__tensor_h2f(k1->d);
                } else {
                    const kmed_block_q8_0 *k0 = (const kmed_block_q8_0 *)(const void *)r0 + b;
                    const kmed_block_q8_0 *k1 = (const kmed_block_q8_0 *)(const void *)r1 + b;
                    p0 = _mm_loadu_si128((const __m128i *)(const void *)k0->qs);
                    p1 = _mm_loadu_si128((const __m128i *)(const void *)(k0->qs + 16));
                    s0 = _mm_loadu_si128((const __m128i *)(const void *)k1->qs);
                    s1 = _mm_loadu_si128((const __m128i *)(const void *)(k1->qs + 16));
                    d0 = kmed__tensor_h2f(k0->d);
                    d1 = kmed__tensor_h2f(k1->d);
                }
                KMED__QDOT(t, p, x + b * KMED_QK);
                a0 = KMED__VFMA(t, KMED__VSET1(d0), a0);
                KMED__QDOT(t, s, x + b * KMED_QK);
                a1 = KMED__VFMA(t, KMED__VSET1(d1), a1);
            }
            kmed__mv_out(c, m, n, KMED__HSUM(a0));
            if (R > 1) kmed__mv_out(c, m, n + 1, KMED__HSUM(a1));
        }
    }
}

#if KMED__SIMD == 512
/* Q4_0 exact, AVX-512: vpermps looks the 16 dequantized values (q - 8) * d up from the
   nibbles directly (it reads only the low 4 bits of each index), so a block costs one
   zero-extension, one shift, two lookups and two FMAs. (q - 8) * d is exact in f32. */
static void kmed__mv_q4_512(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK;
    const __m512 base = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    for (n = n0; n < n1; n += 2) {
        size_t R = n1 - n < 2 ? 1 : 2;
        const kmed_block_q4_0 *r0 = (const kmed_block_q4_0 *)(const void *)(c->w + n * c->wrow);
        const kmed_block_q4_0 *r1 = R > 1 ? r0 + nb : r0;
        for (m = 0; m < c->M; m++) {
            const float *x = c->x + m * c->K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            for (b = 0; b < nb; b++) {
                __m512 xl = _mm512_loadu_ps(x + b * KMED_QK);
                _mm_prefetch((const char *)(r0 + 2 * nb + b), _MM_HINT_T0);
                _mm_prefetch((const char *)(r1 + 2 * nb + b), _MM_HINT_T0);
                __m512 xh = _mm512_loadu_ps(x + b * KMED_QK + 16);
                __m512i z0 = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(const void *)r0[b].qs));
                __m512i z1 = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(const void *)r1[b].qs));
                __m512 l0 = _mm512_mul_ps(base, _mm512_set1_ps(kmed__tensor_h2f(r0[b].d)));
                __m512 l1 = _mm512_mul_ps(base, _mm512_set1_ps(kmed__tensor_h2f(r1[b].d)));
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(z0, l0), xl, a0);
                b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(z0, 4), l0), xh, b0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(z1, l1), xl, a1);
                b1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(z1, 4), l1), xh, b1);
            }
            kmed__mv_out(c, m, n, _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)));
            if (R > 1) kmed__mv_out(c, m, n + 1, _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)));
        }
    }
}
#endif

/* ---- FAST: integer dot products against x quantized to Q8_0 (GGML's vec_dot_q8_0_q8_0
   and vec_dot_q4_0_q8_0 scheme), and BF16 x BF16 ---- */

/* 8 int32 partial sums of 32 signed int8 products, as floats (exact: |sum| < 2^24). */
static __m256 kmed__i8dot(__m256i w, __m256i x)
{
    /* |w| as unsigned times x with w's sign: the unsigned x signed form the ISA has */
    __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(s);
}

static void kmed__mv_fast_q(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK;
    const __m256i m4 = _mm256_set1_epi8(15), e8 = _mm256_set1_epi8(8);
    int q4 = c->wt == KMED_Q4_0;
    for (n = n0; n < n1; n++) {
        const unsigned char *row = c->w + n * c->wrow;
        for (m = 0; m < c->M; m++) {
            const kmed_block_q8_0 *xb = (const kmed_block_q8_0 *)c->xq + m * nb;
            __m256 acc = _mm256_setzero_ps();
            for (b = 0; b < nb; b++) {
                __m256i wq;
                float dw;
                if (q4) {
                    const kmed_block_q4_0 *k = (const kmed_block_q4_0 *)(const void *)row + b;
                    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)k->qs);
                    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(v),
                                                        _mm_srli_epi16(v, 4), 1);
                    wq = _mm256_sub_epi8(_mm256_and_si256(t, m4), e8);
                    dw = kmed__tensor_h2f(k->d);
                } else {
                    const kmed_block_q8_0 *k = (const kmed_block_q8_0 *)(const void *)row + b;
                    wq = _mm256_loadu_si256((const __m256i *)(const void *)k->qs);
                    dw = kmed__tensor_h2f(k->d);
                }
                acc = _mm256_fmadd_ps(kmed__i8dot(wq, _mm256_loadu_si256(
                                          (const __m256i *)(const void *)xb[b].qs)),
                                      _mm256_set1_ps(dw * kmed__tensor_h2f(xb[b].d)), acc);
            }
            kmed__mv_out(c, m, n, kmed__hsum8(acc));
        }
    }
}

static void kmed__mv_fast_bf16(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, k, K = c->K;
#if defined(__AVX512BF16__)
    size_t KV = K / 32 * 32;
#else
    size_t KV = K / KMED__VW * KMED__VW;
#endif
    for (n = n0; n < n1; n++) {
        const uint16_t *w = (const uint16_t *)(const void *)(c->w + n * c->wrow);
        for (m = 0; m < c->M; m++) {
            const uint16_t *xb = (const uint16_t *)c->xq + m * K;
            float s;
#if defined(__AVX512BF16__)
            __m512 acc = _mm512_setzero_ps();
            for (k = 0; k < KV; k += 32)
                acc = _mm512_dpbf16_ps(acc,
                                       (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                                       (__m512bh)_mm512_loadu_si512((const void *)(xb + k)));
#else
            KMED__VT acc = KMED__VZERO();
            for (k = 0; k < KV; k += KMED__VW)
                acc = KMED__VFMA(KMED__LD_BF16(w, k), KMED__LD_BF16(xb, k), acc);
#endif
            s = KMED__HSUM(acc);
            for (k = KV; k < K; k++) s += kmed_bf16_to_f32(w[k]) * kmed_bf16_to_f32(xb[k]);
            kmed__mv_out(c, m, n, s);
        }
    }
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define KMED__VNNI512 1
/* FAST Q8_0/Q4_0 with 512-bit VNNI, two blocks per vpdpbusd. The weights enter unsigned
   (Q4_0 nibbles as stored, Q8_0 as int8 + 128), so each block's integer sum is the exact
   dot minus a bias term bias*sum(x), which is added back per block in float from cx[b].
   x is re-laid per row as [qs: K bytes, each block pair arranged like the decoded weight
   bytes][xd: nb block scales][cx: nb floats, -8 or -128 times the block's sum of q]. */
static size_t kmed__vx_stride(size_t K)
{
    size_t nb = K / KMED_QK;
    return (K + nb * 8 + 64 + 63) / 64 * 64;
}

static void kmed__vx_build(unsigned char *dst, const float *x, kmed_dtype wt, size_t K,
                           kmed_block_q8_0 *tmp /* K/32 */)
{
    size_t nb = K / KMED_QK, b, i;
    int8_t *qs = (int8_t *)dst;
    float *xd = (float *)(void *)(dst + K), *cx = xd + nb;
    int q4 = wt == KMED_Q4_0;
    kmed_quantize_row(KMED_Q8_0, x, tmp, K);
    for (b = 0; b < nb; b++) {
        int sum = 0;
        for (i = 0; i < KMED_QK; i++) sum += tmp[b].qs[i];
        xd[b] = kmed__tensor_h2f(tmp[b].d);
        cx[b] = (float)(sum * (q4 ? -8 : -128));     /* exact: |sum * 128| < 2^24 */
    }
    for (b = 0; b + 2 <= nb; b += 2) {
        int8_t *o = qs + b * KMED_QK;
        if (q4) {
            /* decoded weight bytes of a pair: b0[0:16] b1[0:16] b0[16:32] b1[16:32] */
            memcpy(o, tmp[b].qs, 16); memcpy(o + 16, tmp[b + 1].qs, 16);
            memcpy(o + 32, tmp[b].qs + 16, 16); memcpy(o + 48, tmp[b + 1].qs + 16, 16);
        } else {
            memcpy(o, tmp[b].qs, 32); memcpy(o + 32, tmp[b + 1].qs, 32);
        }
    }
    if (nb & 1) memcpy(qs + (nb - 1) * KMED_QK, tmp[nb - 1].qs, 32);   /* odd tail: as is */
}

/* dw[b] = fp16 scale of block b (blocks `bs` = 18 or 34 bytes apart, scale first). Eight
   at a time: vpermt2w picks the scale words out of two 64-byte windows (Q4_0: words 9i;
   Q8_0: words 17i, four per 128-byte window), then one vcvtph2ps. */
static void kmed__vw_scales(const unsigned char *row, size_t bs, size_t nb, float *dw)
{
    size_t b = 0;
    const __m512i i4 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, 63, 54, 45, 36, 27, 18, 9, 0);
    const __m512i i8 = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 51, 34, 17, 0);
    /* 8 blocks span 144 (Q4_0) or 272 (Q8_0) bytes: the windows read stay inside them */
    for (; b + 8 <= nb; b += 8) {
        const unsigned char *p = row + b * bs;
        __m128i h;
        if (bs == sizeof(kmed_block_q4_0)) {
            __m512i w0 = _mm512_loadu_si512((const void *)p);
            __m512i w1 = _mm512_loadu_si512((const void *)(p + 64));
            h = _mm512_castsi512_si128(_mm512_permutex2var_epi16(w0, i4, w1));
        } else {
            __m512i lo = _mm512_permutex2var_epi16(_mm512_loadu_si512((const void *)p), i8,
                                                   _mm512_loadu_si512((const void *)(p + 64)));
            __m512i hi = _mm512_permutex2var_epi16(_mm512_loadu_si512((const void *)(p + 136)),
                                                   i8,
                                                   _mm512_loadu_si512((const void *)(p + 200)));
            h = _mm_unpacklo_epi64(_mm512_castsi512_si128(lo), _mm512_castsi512_si128(hi));
        }
        _mm256_storeu_ps(dw + b, _mm256_cvtph_ps(h));
    }
    for (; b < nb; b++) {
        uint16_t h;
        memcpy(&h, row + b * bs, 2);
        dw[b] = kmed__tensor_h2f(h);
    }
}

/* Weight bytes of block pair p, unsigned, in the order kmed__vx_build arranged x. */
static __m512i kmed__vw_pair(const unsigned char *row, kmed_dtype wt, size_t p)
{
    if (wt == KMED_Q4_0) {
        const kmed_block_q4_0 *w = (const kmed_block_q4_0 *)(const void *)row + 2 * p;
        __m128i v0 = _mm_loadu_si128((const __m128i *)(const void *)w[0].qs);
        __m128i v1 = _mm_loadu_si128((const __m128i *)(const void *)w[1].qs);
        __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(v0), v1, 1);
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(u), _mm256_srli_epi16(u, 4), 1);
        return _mm512_and_si512(z, _mm512_set1_epi8(15));
    } else {
        const kmed_block_q8_0 *w = (const kmed_block_q8_0 *)(const void *)row + 2 * p;
        __m256i a = _mm256_loadu_si256((const __m256i *)(const void *)w[0].qs);
        __m256i c = _mm256_loadu_si256((const __m256i *)(const void *)w[1].qs);
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(a), c, 1),
                                _mm512_set1_epi8((char)0x80));
    }
}

typedef struct kmed__vq_ctx {
    float *y;                  /* (M, N) */
    const unsigned char *w;    /* (N, K) Q8_0 or Q4_0 */
    kmed_dtype wt;
    size_t M, N, K, wrow, xstride, wbuf_bytes;
    int acc;
    const unsigned char *xv;   /* (M, xstride): kmed__vx_build rows */
    unsigned char *wbuf;       /* per thread: wbuf_bytes each */
} kmed__vq_ctx;

/* Dot of one weight row with one x row; zb: the row's decoded pairs, or NULL to decode in
   registers (M = 1). Same arithmetic either way. */
static float kmed__vq_dot(const kmed__vq_ctx *c, const unsigned char *row, const __m512i *zb,
                          const float *dw, const unsigned char *xr, float *sc)
{
    size_t nb = c->K / KMED_QK, np = nb / 2, j, p, g;
    const float *xd = (const float *)(const void *)(xr + c->K), *cx = xd + nb;
    /* lane -> block of the pair: Q4_0 lanes alternate by fours, Q8_0 by eights */
    const __m512i base = c->wt == KMED_Q4_0
        ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
        : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i two = _mm512_set1_epi32(2);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, accb = acc0;
    float r;
    for (j = 0; j + 16 <= nb; j += 16) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(dw + j), _mm512_loadu_ps(xd + j));
        _mm512_storeu_ps(sc + j, s);
        accb = _mm512_fmadd_ps(s, _mm512_loadu_ps(cx + j), accb);
    }
    r = 0.0f;
    for (; j < nb; j++) {
        sc[j] = dw[j] * xd[j];
        r += sc[j] * cx[j];
    }
    r += _mm512_reduce_add_ps(accb);
    /* 8 pairs per group share one vector of 16 block scales, picked per lane by vpermps */
    for (g = 0; g < np; g += 8) {
        __m512 sv = _mm512_loadu_ps(sc + 2 * g);   /* sc has 16 floats of slack */
        __m512i idx = base;
        size_t pe = np - g < 8 ? np : g + 8;
        for (p = g; p < pe; p += 2) {
            /* two pairs per step on two accumulators hide the FMA latency */
            __m512i z0 = zb ? zb[p] : kmed__vw_pair(row, c->wt, p);
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z0,
                                             _mm512_loadu_si512((const void *)(xr + p * 64)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_permutexvar_ps(idx, sv), acc0);
            idx = _mm512_add_epi32(idx, two);
            if (p + 1 < pe) {
                __m512i z1 = zb ? zb[p + 1] : kmed__vw_pair(row, c->wt, p + 1);
                __m512i x1 = _mm512_loadu_si512((const void *)(xr + p * 64 + 64));
                __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), z1, x1);
                acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_permutexvar_ps(idx, sv),
                                       acc1);
                idx = _mm512_add_epi32(idx, two);
            }
        }
    }
    r += _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    if (nb & 1) {   /* odd last block: exact integer dot */
        const int8_t *xq = (const int8_t *)(xr + (nb - 1) * KMED_QK);
        int sumi = 0;
        if (c->wt == KMED_Q4_0) {
            const kmed_block_q4_0 *k = (const kmed_block_q4_0 *)(const void *)row + nb - 1;
            for (j = 0; j < 16; j++)
                sumi += ((k->qs[j] & 15) - 8) * xq[j] + ((k->qs[j] >> 4) - 8) * xq[j + 16];
        } else {
            const kmed_block_q8_0 *k = (const kmed_block_q8_0 *)(const void *)row + nb - 1;
            for (j = 0; j < 32; j++) sumi += k->qs[j] * xq[j];
        }
        /* this block's bias term was already added through cx; take it back out */
        r += (float)sumi * sc[nb - 1] - sc[nb - 1] * cx[nb - 1];
    }
    return r;
}

static void kmed__vq_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__vq_ctx *c = (const kmed__vq_ctx *)vctx;
    size_t nb = c->K / KMED_QK, np = nb / 2, n, m;
    unsigned char *wb = c->wbuf + (size_t)thread * c->wbuf_bytes;
    __m512i *zb = (__m512i *)(void *)(wb + ((64 - ((uintptr_t)wb & 63)) & 63));
    float *dw = (float *)(void *)(zb + np), *sc = dw + nb + 16;
    size_t bs = c->wt == KMED_Q4_0 ? sizeof(kmed_block_q4_0) : sizeof(kmed_block_q8_0);
    for (n = n0; n < n1; n++) {
        const unsigned char *row = c->w + n * c->wrow;
        kmed__vw_scales(row, bs, nb, dw);
        if (c->M > 1) {
            size_t p;
            for (p = 0; p < np; p++) zb[p] = kmed__vw_pair(row, c->wt, p);
        }
        for (m = 0; m < c->M; m++) {
            float r = kmed__vq_dot(c, row, c->M > 1 ? zb : NULL, dw, c->xv + m * c->xstride,
                                   sc);
            if (c->acc) c->y[m * c->N + n] += r;
            else c->y[m * c->N + n] = r;
        }
    }
}

/* Runs FAST Q8_0/Q4_0 through the VNNI kernel; 0 when memory is short. */
static int kmed__vq_run(kmed_pool *pool, float *y, const float *x, const void *w,
                        kmed_dtype wt, size_t M, size_t N, size_t K, int acc)
{
    kmed__vq_ctx c;
    size_t nb = K / KMED_QK, m, nt = (size_t)kmed_pool_threads(pool);
    size_t xs = kmed__vx_stride(K), wbb = nb / 2 * 64 + nb * 8 + 64 + 64 + 64;
    unsigned char *mem = (unsigned char *)KMED_MALLOC(M * xs + nt * wbb + 64 + nb * 34);
    unsigned char *xv;
    if (!mem) return 0;
    xv = mem + ((64 - ((uintptr_t)mem & 63)) & 63);
    memset(&c, 0, sizeof c);
    c.y = y; c.w = (const unsigned char *)w; c.wt = wt; c.M = M; c.N = N; c.K = K;
    c.wrow = kmed__tensor_row_bytes(wt, K); c.xstride = xs; c.wbuf_bytes = wbb; c.acc = acc;
    c.xv = xv;
    c.wbuf = xv + M * xs;
    for (m = 0; m < M; m++)
        kmed__vx_build(xv + m * xs, x + m * K, wt, K,
                       (kmed_block_q8_0 *)(void *)(c.wbuf + nt * wbb));
    kmed_pool_for(pool, N, 16, kmed__vq_range, &c);
    KMED_FREE(mem);
    return 1;
}
#endif

static void kmed__mv_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mv_ctx *c = (const kmed__mv_ctx *)vctx;
    (void)thread;
    if (c->xq) {
        if (c->wt == KMED_BF16) kmed__mv_fast_bf16(c, n0, n1);
        else kmed__mv_fast_q(c, n0, n1);
        return;
    }
    switch (c->wt) {
    case KMED_F32: kmed__mv_f32(c, n0, n1); break;
    case KMED_BF16: kmed__mv_bf16(c, n0, n1); break;
    case KMED_F16: kmed__mv_f16(c, n0, n1); break;
#if KMED__SIMD == 512
    case KMED_Q4_0: kmed__mv_q4_512(c, n0, n1); break;
#endif
    default: kmed__mv_quant(c, n0, n1); break;
    }
}
#endif /* KMED__SIMD */

/* ---- public kernels: SIMD where compiled in, else the scalar reference ---- */

KMED_API void kmed_matmul(kmed_pool *pool, float *y, const float *x, const void *w,
                          kmed_dtype wt, size_t M, size_t N, size_t K, int flags)
{
    if (M == 0 || N == 0) return;
#ifdef KMED__SIMD
#ifdef KMED__VNNI512
    if ((flags & KMED_MM_FAST) && (wt == KMED_Q8_0 || wt == KMED_Q4_0) &&
        kmed__vq_run(pool, y, x, w, wt, M, N, K, (flags & KMED_MM_ACC) != 0))
        return;
#endif
    if ((flags & KMED_MM_FAST) && wt == KMED_BF16 && M > 4) {
        /* prefill: bf16 x bf16 products are exact in f32, so rounding x to bf16 and running
           the f32 GEMM computes what vdpbf16ps does, at GEMM speed */
        float *xr = (float *)KMED_MALLOC(M * K * sizeof(float) + 1);
        if (xr) {
            kmed__gemm_job g;
            size_t i;
            int ok;
            for (i = 0; i < M * K; i++) xr[i] = kmed_bf16_to_f32(kmed_f32_to_bf16(x[i]));
            memset(&g, 0, sizeof g);
            g.A.p = xr; g.A.t = KMED_F32; g.A.ld = K; g.A.alpha = 1.0f;
            g.B.p = w; g.B.t = wt; g.B.ld = K; g.B.trans = 1;
            g.C = y; g.ldc = N; g.M = M; g.N = N; g.K = K;
            g.beta = 1.0f; g.accum = (flags & KMED_MM_ACC) != 0; g.split_n = 1;
            ok = kmed__gemm_run(pool, &g);
            KMED_FREE(xr);
            if (ok) return;
        }
    }
    if ((flags & KMED_MM_FAST) && (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16)) {
        kmed__mv_ctx c;
        memset(&c, 0, sizeof c);
        c.y = y; c.x = x; c.w = (const unsigned char *)w; c.wt = wt;
        c.M = M; c.N = N; c.K = K; c.wrow = kmed__tensor_row_bytes(wt, K);
        c.acc = (flags & KMED_MM_ACC) != 0;
        c.xq = kmed__mm_fast_x(x, wt, M, K, flags);
        if (c.xq) {
            kmed_pool_for(pool, N, 16, kmed__mv_range, &c);
            KMED_FREE((void *)c.xq);
            return;
        }
        flags &= ~KMED_MM_FAST;   /* no memory for x: the exact path needs none */
    }
    if (M <= 4) {
        kmed__mv_ctx c;
        memset(&c, 0, sizeof c);
        c.y = y; c.x = x; c.w = (const unsigned char *)w; c.wt = wt;
        c.M = M; c.N = N; c.K = K; c.wrow = kmed__tensor_row_bytes(wt, K);
        c.acc = (flags & KMED_MM_ACC) != 0;
        kmed_pool_for(pool, N, 16, kmed__mv_range, &c);
        return;
    }
    if (M > 4 && !((flags & KMED_MM_FAST) &&
                   (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16))) {
#ifdef KMED_USE_OPENBLAS
        if (wt == KMED_F32) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f,
                        x, (int)K, (const float *)w, (int)K, (flags & KMED_MM_ACC) ? 1.0f : 0.0f,
                        y, (int)N);
            return;
        }
#endif
        {
            kmed__gemm_job g;
            memset(&g, 0, sizeof g);
            g.A.p = x; g.A.t = KMED_F32; g.A.ld = K; g.A.alpha = 1.0f;
            g.B.p = w; g.B.t = wt; g.B.ld = K; g.B.trans = 1;
            g.C = y; g.ldc = N; g.M = M; g.N = N; g.K = K;
            g.beta = 1.0f; g.accum = (flags & KMED_MM_ACC) != 0; g.split_n = 1;
            if (kmed__gemm_run(pool, &g)) return;
        }
    }
#endif
    kmed__matmul_ref(pool, y, x, w, wt, M, N, K, flags);
}

KMED_API void kmed_matmul_dx(kmed_pool *pool, float *dx, const float *dy, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K)
{
    if (M == 0 || K == 0) return;
#ifdef KMED__SIMD
#ifdef KMED_USE_OPENBLAS
    if (wt == KMED_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)K, (int)N, 1.0f,
                    dy, (int)N, (const float *)w, (int)K, 1.0f, dx, (int)K);
        return;
    }
#endif
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = dy; g.A.t = KMED_F32; g.A.ld = N; g.A.alpha = 1.0f;
        g.B.p = w; g.B.t = wt; g.B.ld = K;
        g.C = dx; g.ldc = K; g.M = M; g.N = K; g.K = N;
        g.beta = 1.0f; g.accum = 1; g.split_n = 1;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
    kmed__matmul_dx_ref(pool, dx, dy, w, wt, M, N, K);
}

KMED_API void kmed_matmul_dw(kmed_pool *pool, float *dw, const float *dy, const float *x,
                             size_t M, size_t N, size_t K)
{
    if (N == 0 || K == 0) return;
#ifdef KMED__SIMD
#ifdef KMED_USE_OPENBLAS
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)N, (int)K, (int)M, 1.0f,
                dy, (int)N, x, (int)K, 1.0f, dw, (int)K);
    return;
#else
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = dy; g.A.t = KMED_F32; g.A.ld = N; g.A.trans = 1; g.A.alpha = 1.0f;
        g.B.p = x; g.B.t = KMED_F32; g.B.ld = K;
        g.C = dw; g.ldc = K; g.M = N; g.N = K; g.K = M;
        g.beta = 1.0f; g.accum = 1; g.split_n = K >= N;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
#endif
    kmed__matmul_dw_ref(pool, dw, dy, x, M, N, K);
}

KMED_API void kmed_sgemm(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                         float alpha, const float *A, size_t lda, const float *B,
                         size_t ldb, float beta, float *C, size_t ldc)
{
    if (M == 0 || N == 0) return;
#ifdef KMED_USE_OPENBLAS
    (void)pool;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
    return;
#else
#ifdef KMED__SIMD
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = A; g.A.t = KMED_F32; g.A.ld = lda; g.A.trans = ta; g.A.alpha = alpha;
        g.B.p = B; g.B.t = KMED_F32; g.B.ld = ldb; g.B.trans = tb;
        g.C = C; g.ldc = ldc; g.M = M; g.N = N; g.K = K;
        g.beta = beta; g.accum = beta != 0.0f; g.split_n = N >= M;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
    kmed__sgemm_ref(pool, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

KMED_API float kmed_dot_f32(const float *a, const float *b, size_t n)
{
#ifdef KMED__SIMD
    /* two accumulators hide FMA latency; the tail is added last, in order */
    KMED__VT s0 = KMED__VZERO(), s1 = s0;
    size_t i = 0;
    float r;
    for (; i + 2 * KMED__VW <= n; i += 2 * KMED__VW) {
        s0 = KMED__VFMA(KMED__VLOAD(a + i), KMED__VLOAD(b + i), s0);
        s1 = KMED__VFMA(KMED__VLOAD(a + i + KMED__VW), KMED__VLOAD(b + i + KMED__VW), s1);
    }
    if (i + KMED__VW <= n) {
        s0 = KMED__VFMA(KMED__VLOAD(a + i), KMED__VLOAD(b + i), s0);
        i += KMED__VW;
    }
    r = KMED__HSUM(KMED__VADD(s0, s1));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
#else
    return kmed_dot_row(KMED_F32, a, b, n);
#endif
}

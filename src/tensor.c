/* ==== kmed_tensor: bf16/f16, Q8_0/Q4_0 blocks, matmul kernels, thread pool ==== */

#include <math.h>
#include <string.h>
#ifndef KMED_NO_THREADS
#include <pthread.h>
#include <unistd.h>
#endif
#ifdef KMED_USE_OPENBLAS
#include <cblas.h>
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

static void kmed__tensor_quant_q8_0(const float *x, kmed_block_q8_0 *y, size_t n)
{
    size_t i, j, nb = n / KMED_QK;
    for (i = 0; i < nb; i++) {
        const float *xb = x + i * KMED_QK;
        float amax = 0.0f, d, id;
        for (j = 0; j < KMED_QK; j++) {
            float v = fabsf(xb[j]);
            amax = amax > v ? amax : v;  /* GGML's MAX(amax, v): NaN does not propagate */
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
    case KMED_F16:
        for (i = 0; i < n; i++) y[i] = kmed_f16_to_f32(((const uint16_t *)x)[i]);
        break;
    case KMED_BF16:
        for (i = 0; i < n; i++) y[i] = kmed_bf16_to_f32(((const uint16_t *)x)[i]);
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

KMED_API void kmed_matmul(kmed_pool *pool, float *y, const float *x, const void *w,
                          kmed_dtype wt, size_t M, size_t N, size_t K, int flags)
{
    kmed__mm_ctx c;
    void *xq = NULL;
    size_t m;
    if (M == 0 || N == 0) return;
    memset(&c, 0, sizeof c);
    c.y = y; c.x = x; c.w = w; c.wt = wt; c.M = M; c.N = N; c.K = K; c.flags = flags;
    c.wrow = kmed__tensor_row_bytes(wt, K);
    if ((flags & KMED_MM_FAST) && (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16)) {
        kmed_dtype qt = wt == KMED_BF16 ? KMED_BF16 : KMED_Q8_0;
        size_t rb = kmed__tensor_row_bytes(qt, K);
        xq = KMED_MALLOC(M * rb + 1);
        if (!xq) c.flags &= ~KMED_MM_FAST;  /* no memory: the exact path needs none */
        else for (m = 0; m < M; m++) kmed_quantize_row(qt, x + m * K, (char *)xq + m * rb, K);
        c.xq = xq;
    }
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

KMED_API void kmed_matmul_dx(kmed_pool *pool, float *dx, const float *dy, const void *w,
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

KMED_API void kmed_matmul_dw(kmed_pool *pool, float *dw, const float *dy, const float *x,
                             size_t M, size_t N, size_t K)
{
    kmed__mmdw_ctx c;
    if (N == 0 || K == 0) return;
    c.dw = dw; c.dy = dy; c.x = x; c.M = M; c.N = N; c.K = K;
    kmed_pool_for(pool, N, 4, kmed__mmdw_range, &c);
}

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
    {
    kmed__sgemm_ctx c;
    c.ta = ta; c.tb = tb; c.M = M; c.N = N; c.K = K; c.lda = lda; c.ldb = ldb; c.ldc = ldc;
    c.alpha = alpha; c.beta = beta; c.A = A; c.B = B; c.C = C;
    kmed_pool_for(pool, M, 4, kmed__sgemm_ref_range, &c);
    }
#endif
}

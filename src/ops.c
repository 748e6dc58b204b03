/* ==== kmed_ops: Gemma-2 layer ops, each a forward (here) / backward (train) pair ==== */

/* Argument order for every op: outputs, saved statistics, inputs and weights, dimensions.
   Forwards are serial over the rows they are given; callers split rows (or heads) over a
   kmed_pool. Dimension names: N rows (tokens), C channels, H query heads, Hkv key/value
   heads, D head dim, S keys, F feed-forward width, r LoRA rank. */

#include <math.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KMED__OPS_AVX2 1
#endif

/* ---- vector helpers for the forwards: AVX2+FMA when compiled in, scalar otherwise ---- */

#ifdef KMED__OPS_AVX2
/* exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). */
static __m256 kmed__ops_exp8(__m256 x)
{
    __m256 fx, y, z;
    __m256i e;
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)),
                      _mm256_set1_ps(88.72283f));
    fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    z = _mm256_mul_ps(x, x);
    y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* tanh on 8 lanes as sign(x) (1 - t) / (1 + t), t = exp(-2|x|): absolute error ~1e-7. */
static __m256 kmed__ops_tanh8(__m256 x)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 t = kmed__ops_exp8(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    __m256 r = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
    return _mm256_or_ps(r, _mm256_and_ps(x, sign));
}

#if defined(__AVX512F__)
#define KMED__OPS_AVX512 1
/* kmed__ops_exp8 and kmed__ops_tanh8 on 16 lanes: the same operations in the same order,
   so every lane gets the bits the 8-lane versions give. */
static __m512 kmed__ops_exp16(__m512 x)
{
    __m512 fx, y, z;
    __m512i e;
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)),
                      _mm512_set1_ps(88.72283f));
    fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    z = _mm512_mul_ps(x, x);
    y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)),
                          23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

static __m512 kmed__ops_tanh16(__m512 x)
{
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
    __m512 t = kmed__ops_exp16(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
    __m512 r = _mm512_div_ps(_mm512_sub_ps(one, t), _mm512_add_ps(one, t));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r),
                                               _mm512_and_si512(_mm512_castps_si512(x), sign)));
}
#endif

static float kmed__ops_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* The tanh GELU (HF gelu_pytorch_tanh) in f32, no lookup table. */
static float kmed__gelu_tanh(float x)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

/* y = cap * tanh(x * pre / cap) over n values; y may alias x. */
static void kmed__ops_softcap_row(float *y, const float *x, size_t n, float cap, float pre)
{
    size_t i = 0;
    float inv = pre / cap;
#ifdef KMED__OPS_AVX2
    __m256 vi = _mm256_set1_ps(inv), vc = _mm256_set1_ps(cap);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(vc, kmed__ops_tanh8(
                                                      _mm256_mul_ps(_mm256_loadu_ps(x + i), vi))));
#endif
    for (; i < n; i++) y[i] = cap * tanhf(x[i] * inv);
}

/* x = exp(x - mx) over n values; returns the sum. */
static float kmed__ops_exp_sum(float *x, size_t n, float mx)
{
    size_t i = 0;
    float sum = 0.0f;
#ifdef KMED__OPS_AVX2
    __m256 vm = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = kmed__ops_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = kmed__ops_hsum8(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    return sum;
}

/* y[0..n) += a * x[0..n) */
static void kmed__ops_axpy(float *y, float a, const float *x, size_t n)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* out[j] = q . k_j for 4 rows k_j = k + j * ld (n values each); four keys share the
   loads of q and amortise the horizontal sums. */
static void kmed__ops_dot4(float *out, const float *q, const float *k, size_t ld, size_t n)
{
    size_t i = 0, j;
    float s[4] = { 0, 0, 0, 0 };
#ifdef KMED__OPS_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 8 <= n; i += 8) {
        __m256 vq = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + ld + i), a1);
        a2 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + 2 * ld + i), a2);
        a3 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + 3 * ld + i), a3);
    }
    s[0] = kmed__ops_hsum8(a0);
    s[1] = kmed__ops_hsum8(a1);
    s[2] = kmed__ops_hsum8(a2);
    s[3] = kmed__ops_hsum8(a3);
#endif
    for (; i < n; i++)
        for (j = 0; j < 4; j++) s[j] += q[i] * k[j * ld + i];
    for (j = 0; j < 4; j++) out[j] = s[j];
}

/* y = x / sqrt(mean(x^2) + eps) * (1 + w) per row (Gemma stores w, not 1 + w). Saves
   1/rms per row in rstd when it is non-NULL. y may alias x. */
static void kmed__rmsnorm_forward(float *y, float *rstd,
                                  const float *x, const float *w,
                                  size_t N, size_t C, float eps)
{
    size_t i, j;
    for (i = 0; i < N; i++) {
        const float *xi = x + i * C; /* (C) */
        float *yi = y + i * C;       /* (C) */
        float ss = 0.0f, r;
        for (j = 0; j < C; j++) ss += xi[j] * xi[j];
        r = 1.0f / sqrtf(ss / (float)C + eps);
        if (rstd) rstd[i] = r;
        for (j = 0; j < C; j++) yi[j] = xi[j] * r * (1.0f + w[j]);
    }
}

/* Backward of kmed__rmsnorm_forward from the saved rstd: with g = dy * (1 + w),
   dx += rstd * g - rstd^3 * x * mean(g * x); dw += sum over rows of dy * x * rstd.
   Rows in order, so dw does not depend on threads. dx or dw may be NULL (skipped). */
static void kmed__rmsnorm_backward(float *dx, float *dw,
                                   const float *dy, const float *x,
                                   const float *w, const float *rstd,
                                   size_t N, size_t C)
{
    size_t i, j;
    for (i = 0; i < N; i++) {
        const float *xi = x + i * C;   /* (C) */
        const float *dyi = dy + i * C; /* (C) */
        float r = rstd[i];
        if (dw)
            for (j = 0; j < C; j++) dw[j] += dyi[j] * xi[j] * r;
        if (dx) {
            float *dxi = dx + i * C;   /* (C) */
            double gx = 0.0;
            float c;
            for (j = 0; j < C; j++) gx += (double)(dyi[j] * (1.0f + w[j])) * xi[j];
            c = (float)(gx / (double)C) * r * r * r;
            for (j = 0; j < C; j++) dxi[j] += r * dyi[j] * (1.0f + w[j]) - c * xi[j];
        }
    }
}

/* Rotate-half RoPE: dims i and i + D/2 of each head form a pair rotated by the angle
   pos * theta^(-2i/D). x, y (N, H, D); pos (N) absolute positions. y may alias x. The
   frequencies, angles, cos and sin are float32 values as in HF. Nothing to save: the
   backward is the rotation by the negative angle. */
static void kmed__rope_forward(float *y,
                               const float *x, const int *pos,
                               size_t N, size_t H, size_t D, float theta)
{
    size_t n, h, i, half = D / 2;
    for (i = 0; i < half; i++) {
        float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)D));
        for (n = 0; n < N; n++) {
            float ang = (float)pos[n] * inv_freq;
            float c = cosf(ang), s = sinf(ang);
            for (h = 0; h < H; h++) {
                const float *xh = x + (n * H + h) * D; /* (D) */
                float *yh = y + (n * H + h) * D;       /* (D) */
                float a = xh[i], b = xh[i + half];
                yh[i] = a * c - b * s;
                yh[i + half] = b * c + a * s;
            }
        }
    }
}

/* Backward of kmed__rope_forward: dx += R(-angle) dy. dx must not alias dy. */
static void kmed__rope_backward(float *dx,
                                const float *dy, const int *pos,
                                size_t N, size_t H, size_t D, float theta)
{
    size_t n, h, i, half = D / 2;
    for (i = 0; i < half; i++) {
        float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)D));
        for (n = 0; n < N; n++) {
            float ang = (float)pos[n] * inv_freq;
            float c = cosf(ang), s = sinf(ang);
            for (h = 0; h < H; h++) {
                const float *dyh = dy + (n * H + h) * D; /* (D) */
                float *dxh = dx + (n * H + h) * D;       /* (D) */
                float a = dyh[i], b = dyh[i + half];
                dxh[i] += a * c + b * s;
                dxh[i + half] += b * c - a * s;
            }
        }
    }
}

/* GeGLU: h = gelu_tanh(g) * u elementwise, g and u (N, F) as n = N*F values. The backward
   needs g and u, so nothing extra is saved. h may alias g or u. */
static void kmed__geglu_forward(float *h, const float *g, const float *u, size_t n)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX2
    const __m256 k = _mm256_set1_ps(0.7978845608028654f), c = _mm256_set1_ps(0.044715f);
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 in = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, x), _mm256_mul_ps(x, x),
                                                     x));
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x),
                                 _mm256_add_ps(one, kmed__ops_tanh8(in)));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) h[i] = kmed__gelu_tanh(g[i]) * u[i];
}

/* Backward of kmed__geglu_forward: du += dh * gelu(g), dg += dh * u * gelu'(g).
   dg or du may be NULL. */
static void kmed__geglu_backward(float *dg, float *du,
                                 const float *dh, const float *g, const float *u, size_t n)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    size_t i;
    for (i = 0; i < n; i++) {
        float x = g[i], x2 = x * x;
        float t = tanhf(k * (x + 0.044715f * x2 * x));
        float gelu = 0.5f * x * (1.0f + t);
        float dgelu = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k *
                      (1.0f + 3.0f * 0.044715f * x2);
        if (du) du[i] += dh[i] * gelu;
        if (dg) dg[i] += dh[i] * u[i] * dgelu;
    }
}

/* Soft-cap: y = cap * tanh(x / cap) over n values (the backward uses y:
   dy/dx = 1 - (y/cap)^2). y may alias x. cap <= 0 copies. */
static void kmed__softcap_forward(float *y, const float *x, size_t n, float cap)
{
    if (cap <= 0.0f) {
        if (y != x) memmove(y, x, n * sizeof *y);
        return;
    }
    kmed__ops_softcap_row(y, x, n, cap, 1.0f);
}

/* Backward of kmed__softcap_forward from its output y: dx += dy * (1 - (y/cap)^2).
   cap <= 0: dx += dy. */
static void kmed__softcap_backward(float *dx, const float *dy, const float *y, size_t n,
                                   float cap)
{
    size_t i;
    if (cap <= 0.0f) {
        for (i = 0; i < n; i++) dx[i] += dy[i];
        return;
    }
    for (i = 0; i < n; i++) {
        float t = y[i] / cap;
        dx[i] += dy[i] * (1.0f - t * t);
    }
}

/* Cross-entropy statistics of one chunk of a logits row, fused so the chunk is read
   while it is in cache: y = softcap(y) in place (cap <= 0: unchanged), *mx = max(y),
   *sum = sum of exp(y - *mx) (f32, 8 lanes then the tail, as kmed__ops_exp_sum). The
   chunked LM head merges the chunks' (max, sum) into the row's log-sum-exp. */
static void kmed__xent_stats(float *y, size_t n, float cap, float *mx, float *sum)
{
    size_t i, nv = 0;
    float m = -INFINITY, s = 0.0f;
#ifdef KMED__OPS_AVX512
    nv = n / 16 * 16;
    if (nv) {
        /* max_ps(new, old) keeps old when new is NaN, as the scalar compare does */
        const __m512 vi = _mm512_set1_ps(1.0f / cap), vc = _mm512_set1_ps(cap);
        __m512 vm = _mm512_set1_ps(-INFINITY), acc = _mm512_setzero_ps();
        for (i = 0; i < nv; i += 16) {
            __m512 v = _mm512_loadu_ps(y + i);
            if (cap > 0.0f) {   /* kmed__ops_softcap_row, 16 lanes */
                v = _mm512_mul_ps(vc, kmed__ops_tanh16(_mm512_mul_ps(v, vi)));
                _mm512_storeu_ps(y + i, v);
            }
            vm = _mm512_max_ps(v, vm);
        }
        if (cap > 0.0f && nv < n) kmed__ops_softcap_row(y + nv, y + nv, n - nv, cap, 1.0f);
        m = _mm512_reduce_max_ps(vm);
        for (i = nv; i < n; i++) m = y[i] > m ? y[i] : m;
        vm = _mm512_set1_ps(m);
        for (i = 0; i < nv; i += 16)
            acc = _mm512_add_ps(acc, kmed__ops_exp16(_mm512_sub_ps(_mm512_loadu_ps(y + i), vm)));
        s = _mm512_reduce_add_ps(acc);
    }
#elif defined(KMED__OPS_AVX2)
    nv = n / 8 * 8;
    if (nv) {
        __m256 vm, acc = _mm256_setzero_ps();
        float t[8];
        if (cap > 0.0f) kmed__ops_softcap_row(y, y, n, cap, 1.0f);
        vm = _mm256_loadu_ps(y);
        for (i = 8; i < nv; i += 8) vm = _mm256_max_ps(_mm256_loadu_ps(y + i), vm);
        _mm256_storeu_ps(t, vm);
        for (i = 0; i < 8; i++) m = t[i] > m ? t[i] : m;
        for (i = nv; i < n; i++) m = y[i] > m ? y[i] : m;
        vm = _mm256_set1_ps(m);
        for (i = 0; i < nv; i += 8)
            acc = _mm256_add_ps(acc, kmed__ops_exp8(_mm256_sub_ps(_mm256_loadu_ps(y + i), vm)));
        s = kmed__ops_hsum8(acc);
    }
#endif
    if (nv == 0) {
        if (cap > 0.0f) kmed__ops_softcap_row(y, y, n, cap, 1.0f);
        for (i = 0; i < n; i++) m = y[i] > m ? y[i] : m;
    }
    for (i = nv; i < n; i++) s += expf(y[i] - m);
    *mx = m;
    *sum = s;
}

/* Backward of the softcapped cross-entropy for one chunk of a logits row, from the
   capped logits y (n) and the row's max mx: g = (exp(y - mx) * a - [j == tgt] * inv) *
   (1 - (y/cap)^2), a = inv / sum(exp(y - mx)) over the whole row, inv = 1 / normaliser.
   tgt >= n: the target is outside this chunk. Writes (not accumulates) g; g may be y. */
static void kmed__xent_grad(float *g, const float *y, size_t n, size_t tgt, float mx, float a,
                            float inv, float cap)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX512
    {
        const __m512 vm = _mm512_set1_ps(mx), va = _mm512_set1_ps(a), vc = _mm512_set1_ps(cap);
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= n; i += 16) {
            __m512 y16 = _mm512_loadu_ps(y + i);
            __m512 d = _mm512_mul_ps(kmed__ops_exp16(_mm512_sub_ps(y16, vm)), va);
            if (tgt >= i && tgt < i + 16)
                d = _mm512_mask_sub_ps(d, (__mmask16)(1u << (tgt - i)), d, _mm512_set1_ps(inv));
            if (cap > 0.0f) {
                __m512 t = _mm512_div_ps(y16, vc);
                d = _mm512_mul_ps(d, _mm512_sub_ps(one, _mm512_mul_ps(t, t)));
            }
            _mm512_storeu_ps(g + i, d);
        }
    }
#endif
#ifdef KMED__OPS_AVX2
    __m256 vm = _mm256_set1_ps(mx), va = _mm256_set1_ps(a), vc = _mm256_set1_ps(cap);
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 y8 = _mm256_loadu_ps(y + i);
        __m256 d = _mm256_mul_ps(kmed__ops_exp8(_mm256_sub_ps(y8, vm)), va);
        if (tgt >= i && tgt < i + 8) {
            float t[8];
            _mm256_storeu_ps(t, d);
            t[tgt - i] -= inv;
            d = _mm256_loadu_ps(t);
        }
        if (cap > 0.0f) {
            __m256 t = _mm256_div_ps(y8, vc);
            d = _mm256_mul_ps(d, _mm256_sub_ps(one, _mm256_mul_ps(t, t)));
        }
        _mm256_storeu_ps(g + i, d);
    }
#endif
    while (i < n) {   /* the tail (or all, without SIMD) through the cap's backward */
        float d[64], yc[64];  /* copies, so g may alias y */
        size_t j, m = n - i < 64 ? n - i : 64;
        for (j = 0; j < m; j++) {
            yc[j] = y[i + j];
            d[j] = expf(yc[j] - mx) * a;
            if (i + j == tgt) d[j] -= inv;
            g[i + j] = 0.0f;
        }
        kmed__softcap_backward(g + i, d, yc, m, cap);
        i += m;
    }
}

/* Embedding lookup scaled by sqrt(C): h[n] = dequant(E[ids[n]]) * scale, the scale
   rounded to f32 first (HF rounds sqrt(hidden) to the activation dtype). E (V, C) rows in
   dtype et; ids must be in [0, V) (the caller checks). h (N, C). */
static void kmed__embed_forward(float *h,
                                const int *ids, const void *E, kmed_dtype et,
                                size_t N, size_t C)
{
    size_t n, j, row_bytes = kmed_dtype_bytes(et, C);
    float scale = (float)sqrt((double)C);
    for (n = 0; n < N; n++) {
        float *hn = h + n * C; /* (C) */
        kmed_dequantize_row(et, (const unsigned char *)E + (size_t)ids[n] * row_bytes, hn, C);
        for (j = 0; j < C; j++) hn[j] *= scale;
    }
}

/* Backward of kmed__embed_forward into an f32 table: dE[ids[n]] += dh[n] * scale.
   Rows in order (repeated ids accumulate deterministically). dE (V, C), dh (N, C). */
static void kmed__embed_backward(float *dE,
                                 const float *dh, const int *ids,
                                 size_t N, size_t C)
{
    size_t n, j;
    float scale = (float)sqrt((double)C);
    for (n = 0; n < N; n++) {
        float *de = dE + (size_t)ids[n] * C; /* (C) */
        const float *dhn = dh + n * C;        /* (C) */
        for (j = 0; j < C; j++) de[j] += dhn[j] * scale;
    }
}

/* Causal attention for query heads [h0, h1) with GQA, score scale, soft-cap applied
   before masking, and an optional sliding window, all by absolute positions:
   query t sits at position qpos[t] and key j at position j; query t sees key j iff
   j <= qpos[t] and (window == 0 or qpos[t] - j < window). Requires qpos[t] < S.
   q (N, H, D); k, v (S, Hkv, D); out (N, H, D), only heads [h0, h1) written.
   att (H, N, S): when non-NULL, saves the softmax probabilities (0 where masked), and is
   also the score buffer; when NULL, scratch (S) is used instead.
   Query head h reads key/value head h / (H / Hkv). */
static void kmed__attention_forward(float *out, float *att,
                                    const float *q, const float *k, const float *v,
                                    const int *qpos, float *scratch,
                                    size_t N, size_t S, size_t H, size_t Hkv, size_t D,
                                    float scale, float softcap, size_t window,
                                    size_t h0, size_t h1)
{
    size_t h, t, j, group = H / Hkv, ld = Hkv * D;
    for (h = h0; h < h1; h++) {
        size_t hk = h / group;
        for (t = 0; t < N; t++) {
            const float *qt = q + (t * H + h) * D; /* (D) */
            float *ot = out + (t * H + h) * D;     /* (D) */
            float *p = att ? att + (h * N + t) * S : scratch; /* (S) */
            size_t p_t = (size_t)qpos[t];
            size_t lo = window && p_t >= window ? p_t - window + 1 : 0, nk = p_t + 1 - lo;
            const float *kb = k + lo * ld + hk * D; /* key lo of head hk */
            float mx = -INFINITY, sum, inv;
            for (j = 0; j + 4 <= nk; j += 4) kmed__ops_dot4(p + lo + j, qt, kb + j * ld, ld, D);
            for (; j < nk; j++) p[lo + j] = kmed_dot_row(KMED_F32, kb + j * ld, qt, D);
            if (softcap > 0.0f) kmed__ops_softcap_row(p + lo, p + lo, nk, softcap, scale);
            else for (j = 0; j < nk; j++) p[lo + j] *= scale;
            for (j = lo; j <= p_t; j++) if (p[j] > mx) mx = p[j];
            sum = kmed__ops_exp_sum(p + lo, nk, mx);
            inv = 1.0f / sum;
            memset(ot, 0, D * sizeof *ot);
            for (j = lo; j <= p_t; j++) {
                p[j] *= inv;
                kmed__ops_axpy(ot, p[j], v + (j * Hkv + hk) * D, D);
            }
            if (att) {
                for (j = 0; j < lo; j++) p[j] = 0.0f;
                for (j = p_t + 1; j < S; j++) p[j] = 0.0f;
            }
        }
    }
}

/* Backward of kmed__attention_forward from the saved probabilities att (H, N, S) for
   query heads [h0, h1), as GEMMs per head (the masked entries of att are 0, so full
   products stay exact): dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)) times
   the cap's derivative 1 - tanh^2 on the scores recomputed as Q K^T (cheaper than saving
   them), dQ += scale dS K, dK += scale dS^T Q. dq (N, H, D), dk, dv (S, Hkv, D)
   accumulate; dk/dv rows are shared by the H/Hkv query heads of a group, so parallel
   callers split [h0, h1) on group boundaries. scratch (2, N, S). */
static void kmed__attention_backward(float *dq, float *dk, float *dv,
                                     const float *dout, const float *att,
                                     const float *q, const float *k, const float *v,
                                     const int *qpos, float *scratch,
                                     size_t N, size_t S, size_t H, size_t Hkv, size_t D,
                                     float scale, float softcap, size_t window,
                                     size_t h0, size_t h1)
{
    size_t h, t, j, group = H / Hkv, HD = H * D, KD = Hkv * D;
    float *dp = scratch;         /* (N, S) dP, then dS */
    float *sc = scratch + N * S; /* (N, S) recomputed scores */
    for (h = h0; h < h1; h++) {
        size_t hk = h / group;
        const float *P = att + h * N * S; /* (N, S) */
        kmed_sgemm(NULL, 1, 0, S, D, N, 1.0f, P, S, dout + h * D, HD, 1.0f, dv + hk * D, KD);
        kmed_sgemm(NULL, 0, 1, N, S, D, 1.0f, dout + h * D, HD, v + hk * D, KD, 0.0f, dp, S);
        if (softcap > 0.0f)
            kmed_sgemm(NULL, 0, 1, N, S, D, scale, q + h * D, HD, k + hk * D, KD, 0.0f, sc, S);
        for (t = 0; t < N; t++) {
            const float *pt = P + t * S; /* (S) */
            float *dpt = dp + t * S;     /* (S) */
            size_t p_t = (size_t)qpos[t];
            size_t lo = window && p_t >= window ? p_t - window + 1 : 0;
            float pdp = 0.0f;
            for (j = lo; j <= p_t; j++) pdp += pt[j] * dpt[j];
            for (j = 0; j < lo; j++) dpt[j] = 0.0f;
            for (j = lo; j <= p_t; j++) {
                float ds = pt[j] * (dpt[j] - pdp);
                if (softcap > 0.0f) {
                    float th = tanhf(sc[t * S + j] / softcap);
                    ds *= 1.0f - th * th;
                }
                dpt[j] = ds * scale;
            }
            for (j = p_t + 1; j < S; j++) dpt[j] = 0.0f;
        }
        kmed_sgemm(NULL, 0, 0, N, D, S, 1.0f, dp, S, k + hk * D, KD, 1.0f, dq + h * D, HD);
        kmed_sgemm(NULL, 1, 0, S, D, N, 1.0f, dp, S, q + h * D, HD, 1.0f, dk + hk * D, KD);
    }
}

/* LoRA delta: y (M, N) += scale * (x A^T) B^T with x (M, K), A (r, K), B (N, r). Saves
   xa = x A^T (M, r), which the backward needs for dB. */
static void kmed__lora_forward(kmed_pool *pool, float *y, float *xa,
                               const float *x, const float *A, const float *B,
                               size_t M, size_t N, size_t K, size_t r, float scale)
{
    kmed_sgemm(pool, 0, 1, M, r, K, 1.0f, x, K, A, K, 0.0f, xa, r);
    kmed_sgemm(pool, 0, 1, M, N, r, scale, xa, r, B, r, 1.0f, y, N);
}

/* Backward of kmed__lora_forward: dB += scale * dy^T xa; with dxa = scale * dy B
   (M, r) in scratch: dA += dxa^T x, dx += dxa A. dx, dA, dB may be NULL. */
static void kmed__lora_backward(kmed_pool *pool, float *dx, float *dA, float *dB,
                                const float *dy, const float *xa,
                                const float *x, const float *A, const float *B,
                                float *dxa,
                                size_t M, size_t N, size_t K, size_t r, float scale)
{
    if (dB) kmed_sgemm(pool, 1, 0, N, r, M, scale, dy, N, xa, r, 1.0f, dB, r);
    if (!dA && !dx) return;
    kmed_sgemm(pool, 0, 0, M, r, N, scale, dy, N, B, r, 0.0f, dxa, r);
    if (dA) kmed_sgemm(pool, 1, 0, r, K, M, 1.0f, dxa, r, x, K, 1.0f, dA, K);
    if (dx) kmed_sgemm(pool, 0, 0, M, K, r, 1.0f, dxa, r, A, K, 1.0f, dx, K);
}

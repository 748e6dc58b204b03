/* ==== kmed_ops: Gemma-2 layer ops, each a forward (here) / backward (train) pair ==== */

/* Argument order for every op: outputs, saved statistics, inputs and weights, dimensions.
   Forwards are serial over the rows they are given; callers split rows (or heads) over a
   kmed_pool. Dimension names: N rows (tokens), C channels, H query heads, Hkv key/value
   heads, D head dim, S keys, F feed-forward width, r LoRA rank. */

#include <math.h>
#include <string.h>

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

/* Rotate-half RoPE: dims i and i + D/2 of each head form a pair rotated by the angle
   pos * theta^(-2i/D). x, y (N, H, D); pos (N) absolute positions. y may alias x. The
   frequencies, angles, cos and sin are float32 values as in HF. Nothing to save: the
   backward is the rotation by the negative angle. */
static void kmed__rope_forward(float *y,
                               const float *x, const int *pos,
                               size_t N, size_t H, size_t D, float theta)
{
    size_t n, h, i, half = D / 2;
    for (n = 0; n < N; n++) {
        for (i = 0; i < half; i++) {
            float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)D));
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

/* The tanh GELU (HF gelu_pytorch_tanh), exact in f32: no lookup table. */
static float kmed__gelu_tanh(float x)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

/* GeGLU: h = gelu_tanh(g) * u elementwise, g and u (N, F) as n = N*F values. The backward
   needs g and u, so nothing extra is saved. h may alias g or u. */
static void kmed__geglu_forward(float *h, const float *g, const float *u, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) h[i] = kmed__gelu_tanh(g[i]) * u[i];
}

/* Soft-cap: y = cap * tanh(x / cap) over n values (the backward uses y:
   dy/dx = 1 - (y/cap)^2). y may alias x. cap <= 0 copies. */
static void kmed__softcap_forward(float *y, const float *x, size_t n, float cap)
{
    size_t i;
    if (cap <= 0.0f) {
        if (y != x) memmove(y, x, n * sizeof *y);
        return;
    }
    for (i = 0; i < n; i++) y[i] = cap * tanhf(x[i] / cap);
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
    size_t h, t, j, d, group = H / Hkv;
    for (h = h0; h < h1; h++) {
        size_t hk = h / group;
        for (t = 0; t < N; t++) {
            const float *qt = q + (t * H + h) * D; /* (D) */
            float *ot = out + (t * H + h) * D;     /* (D) */
            float *p = att ? att + (h * N + t) * S : scratch; /* (S) */
            size_t p_t = (size_t)qpos[t];
            size_t lo = window && p_t >= window ? p_t - window + 1 : 0;
            float mx = -INFINITY, sum = 0.0f, inv;
            for (j = lo; j <= p_t; j++) {
                float s = kmed_dot_row(KMED_F32, k + (j * Hkv + hk) * D, qt, D) * scale;
                if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                p[j] = s;
                if (s > mx) mx = s;
            }
            for (j = lo; j <= p_t; j++) {
                p[j] = expf(p[j] - mx);
                sum += p[j];
            }
            inv = 1.0f / sum;
            for (d = 0; d < D; d++) ot[d] = 0.0f;
            for (j = lo; j <= p_t; j++) {
                const float *vj = v + (j * Hkv + hk) * D; /* (D) */
                float pj = p[j] * inv;
                p[j] = pj;
                for (d = 0; d < D; d++) ot[d] += pj * vj[d];
            }
            if (att) {
                for (j = 0; j < lo; j++) p[j] = 0.0f;
                for (j = p_t + 1; j < S; j++) p[j] = 0.0f;
            }
        }
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

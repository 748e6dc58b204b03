/* Training: op backwards vs finite differences, LoRA and full-parameter gradients, the
   tiny-gemma2 golden (loss with LoRA, every LoRA gradient, 3 AdamW steps), PEFT round
   trip, merge, quantized bases, checkpoint/resume, NaN guard.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_train.c -o build/test_train \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

/* Fixture README tolerances (about 10x the observed f32 round-off). */
#define TOL_LOSS_REL 2e-6      /* loss with LoRA, first step loss */
#define TOL_GRAD_REL 5e-4      /* max |err| per gradient tensor, x its max |grad| */
#define TOL_STEP_P90 5e-7      /* AdamW step k: >= 90% of elements within this */
#define TOL_STEP_P999 5e-6     /* ... >= 99.9% within this, all within 2 k lr */
#define TOL_STEPLOSS_REL 5e-5  /* later step losses (a near-zero-gradient element may flip) */
/* Finite differences of f32 code: h = 1e-3 relative steps leave ~1e-4 relative noise. */
#define TOL_FD 2e-3

static kmed_rng trng;

static void fill(float *x, size_t n, double scale)
{
    size_t i;
    for (i = 0; i < n; i++) x[i] = (float)(scale * kmed_rng_normal(&trng));
}

static double dmax(const float *a, size_t n)
{
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) m = fabs(a[i]) > m ? fabs(a[i]) : m;
    return m;
}


/* ---- op backwards vs central finite differences (objective J = sum w * y in double) ---- */

typedef double (*fd_fn)(void *ctx);

/* Perturbs x[i] by +-h (the float-rounded step), compares (J+ - J-)/(x+ - x-) with ana[i]. */
static void fd_check(const char *what, fd_fn J, void *ctx, float *x, const float *ana,
                     size_t n)
{
    double maxa = dmax(ana, n), maxe = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        float x0 = x[i];
        double h = 1e-2 * (fabs(x0) > 1 ? fabs(x0) : 1), jp, jm, num;
        float xp = (float)(x0 + h), xm = (float)(x0 - h);
        x[i] = xp;
        jp = J(ctx);
        x[i] = xm;
        jm = J(ctx);
        x[i] = x0;
        num = (jp - jm) / ((double)xp - (double)xm);
        if (fabs(num - ana[i]) > maxe) maxe = fabs(num - ana[i]);
    }
    printf("  fd %-22s max|grad| %.3g  max err %.3g\n", what, maxa, maxe);
    CHECKF(maxa > 0 && maxe <= TOL_FD * maxa + 1e-5, "%s: finite-difference error %.3g "
           "(max |grad| %.3g)", what, maxe, maxa);
}

static double wsum(const float *w, const float *y, size_t n)
{
    double s = 0;
    size_t i;
    for (i = 0; i < n; i++) s += (double)w[i] * y[i];
    return s;
}

typedef struct opctx {
    float x[256], w[64], g[256], u[256], wy[512], y[512], rstd[16];
    float q[256], k[256], v[256], att[512], scratch[128];
    int ids[8], pos[8], kst[8];
    const int *kstart;   /* NULL or kst: packed document starts */
    size_t N, C, H, Hkv, D, n, S, window, M, K, r;
    float cap, scale;
} opctx;

static double J_rmsnorm(void *p)
{
    opctx *c = (opctx *)p;
    kmed__rmsnorm_forward(c->y, c->rstd, c->x, c->w, c->N, c->C, 1e-6f);
    return wsum(c->wy, c->y, c->N * c->C);
}
static double J_rope(void *p)
{
    opctx *c = (opctx *)p;
    kmed__rope_forward(c->y, c->x, c->pos, c->N, c->H, c->D, 10000.0f);
    return wsum(c->wy, c->y, c->N * c->H * c->D);
}
static double J_geglu(void *p)
{
    opctx *c = (opctx *)p;
    kmed__geglu_forward(c->y, c->g, c->u, c->n);
    return wsum(c->wy, c->y, c->n);
}
static double J_softcap(void *p)
{
    opctx *c = (opctx *)p;
    kmed__softcap_forward(c->y, c->x, c->n, c->cap);
    return wsum(c->wy, c->y, c->n);
}
static double J_embed(void *p)
{
    opctx *c = (opctx *)p;
    kmed__embed_forward(c->y, c->ids, c->x, KMED_F32, c->N, c->C);
    return wsum(c->wy, c->y, c->N * c->C);
}
static double J_attn(void *p)
{
    opctx *c = (opctx *)p;
    kmed__attention_forward(c->y, c->att, c->q, c->k, c->v, c->pos, c->kstart, c->scratch,
                            c->N, c->S, c->H, c->Hkv, c->D, c->scale, c->cap, c->window, 0,
                            c->H);
    return wsum(c->wy, c->y, c->N * c->H * c->D);
}
/* The attention backward of c's setting (7 queries, 4 heads over 2 kv heads, D 4)
   against finite differences of J_attn; leaves c->att as the forward saved it. */
static void attn_fd(opctx *c, const char *what)
{
    static float dq[7 * 16], dk[7 * 8], dv[7 * 8];
    char name[64];
    memset(dq, 0, sizeof dq); memset(dk, 0, sizeof dk); memset(dv, 0, sizeof dv);
    J_attn(c);
    kmed__attention_backward(dq, dk, dv, c->wy, c->att, c->q, c->k, c->v, c->pos, c->kstart,
                             c->scratch, c->N, c->S, c->H, c->Hkv, c->D, c->scale, c->cap,
                             c->window, 0, c->H);
    snprintf(name, sizeof name, "%s dq", what);
    fd_check(name, J_attn, c, c->q, dq, 7 * 16);
    snprintf(name, sizeof name, "%s dk", what);
    fd_check(name, J_attn, c, c->k, dk, 7 * 8);
    snprintf(name, sizeof name, "%s dv", what);
    fd_check(name, J_attn, c, c->v, dv, 7 * 8);
    J_attn(c);
}

static double J_lora(void *p)
{
    opctx *c = (opctx *)p;
    memset(c->y, 0, sizeof c->y);
    /* x (M, K), A = q (r, K), B = k (N, r); xa in att */
    kmed__lora_forward(NULL, c->y, c->att, c->x, c->q, c->k, c->M, c->N, c->K, c->r, c->scale);
    return wsum(c->wy, c->y, c->M * c->N);
}

/* The vectorised elementwise kernels of the trainer (8 lanes, then a scalar tail: n = 1003
   covers both) against their formulas in double: GeGLU forward and backward (accumulating
   into nonzero gradients), soft-cap. Errors relative to 1 + |value|. */
static void test_elementwise_vs_double(void)
{
    enum { n = 1003 };
    static float g[n], u[n], dh[n], h[n], dg[n], du[n], dg0[n], du0[n];
    const double k = 0.7978845608028654, cap = 3.0;
    double worst = 0, worst_cap = 0;
    size_t i;
    fill(g, n, 4.0); fill(u, n, 1.0); fill(dh, n, 1.0); fill(dg0, n, 1.0); fill(du0, n, 1.0);
    g[0] = 0.0f; g[1] = 1e-4f; g[2] = -30.0f; g[3] = 30.0f; /* zero, tiny, saturated */
    memcpy(dg, dg0, sizeof dg);
    memcpy(du, du0, sizeof du);
    kmed__geglu_forward(h, g, u, n);
    kmed__geglu_backward(dg, du, dh, g, u, n);
    for (i = 0; i < n; i++) {
        double x = g[i], t = tanh(k * (x + 0.044715 * x * x * x));
        double gelu = 0.5 * x * (1 + t);
        double dgelu = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x);
        double want[3], got[3];
        int j;
        want[0] = gelu * u[i];                 got[0] = h[i];
        want[1] = dg0[i] + dh[i] * u[i] * dgelu; got[1] = dg[i];
        want[2] = du0[i] + dh[i] * gelu;        got[2] = du[i];
        for (j = 0; j < 3; j++) {
            double e = fabs(got[j] - want[j]) / (1 + fabs(want[j]));
            worst = e > worst ? e : worst;
        }
    }
    CHECKF(worst <= 4e-6, "geglu forward/backward vs double: %g", worst);
    for (i = 0; i < n; i++) g[i] *= 10.0f;
    kmed__ops_softcap_row(h, g, n, (float)cap, 0.5f);
    for (i = 0; i < n; i++) {
        double want = cap * tanh(g[i] * 0.5 / cap), e = fabs(h[i] - want) / (1 + fabs(want));
        worst_cap = e > worst_cap ? e : worst_cap;
    }
    CHECKF(worst_cap <= 1e-6, "softcap row vs double: %g", worst_cap);
    printf("elementwise kernels vs double: geglu %.1e, softcap %.1e\n", worst, worst_cap);
}

static void test_op_backwards(void)
{
    static opctx c;
    float dx[256], dw[64], dg[256], du[256], dq[256], dk[256], dxa[64];
    size_t i;

    memset(&c, 0, sizeof c);
    c.N = 3; c.C = 8;
    fill(c.x, 24, 1.0); fill(c.w, 8, 0.5); fill(c.wy, 24, 1.0);
    J_rmsnorm(&c);
    memset(dx, 0, sizeof dx); memset(dw, 0, sizeof dw);
    kmed__rmsnorm_backward(dx, dw, c.wy, c.x, c.w, c.rstd, c.N, c.C);
    fd_check("rmsnorm dx", J_rmsnorm, &c, c.x, dx, 24);
    fd_check("rmsnorm dw", J_rmsnorm, &c, c.w, dw, 8);

    c.N = 3; c.H = 2; c.D = 8; c.pos[0] = 0; c.pos[1] = 5; c.pos[2] = 17;
    fill(c.x, 48, 1.0); fill(c.wy, 48, 1.0);
    memset(dx, 0, sizeof dx);
    kmed__rope_backward(dx, c.wy, c.pos, c.N, c.H, c.D, 10000.0f);
    fd_check("rope dx", J_rope, &c, c.x, dx, 48);

    c.n = 24;
    fill(c.g, 24, 2.0); fill(c.u, 24, 1.0); fill(c.wy, 24, 1.0);
    memset(dg, 0, sizeof dg); memset(du, 0, sizeof du);
    kmed__geglu_backward(dg, du, c.wy, c.g, c.u, c.n);
    fd_check("geglu dgate", J_geglu, &c, c.g, dg, 24);
    fd_check("geglu dup", J_geglu, &c, c.u, du, 24);

    c.n = 24; c.cap = 3.0f;
    fill(c.x, 24, 4.0); fill(c.wy, 24, 1.0);
    J_softcap(&c);
    memset(dx, 0, sizeof dx);
    kmed__softcap_backward(dx, c.wy, c.y, c.n, c.cap);
    fd_check("softcap dx", J_softcap, &c, c.x, dx, 24);

    c.N = 4; c.C = 4; c.ids[0] = 1; c.ids[1] = 3; c.ids[2] = 1; c.ids[3] = 0;
    fill(c.x, 20, 1.0); fill(c.wy, 16, 1.0); /* table (5, 4) */
    memset(dx, 0, sizeof dx);
    kmed__embed_backward(dx, c.wy, c.ids, c.N, c.C);
    fd_check("embedding dE", J_embed, &c, c.x, dx, 20);

    /* attention: 7 queries, 4 query heads over 2 kv heads, soft-cap that bites, window 3,
       queries at absolute positions 0..6 */
    c.N = 7; c.S = 7; c.H = 4; c.Hkv = 2; c.D = 4; c.window = 3; c.cap = 1.5f;
    c.scale = 0.5f;
    for (i = 0; i < 7; i++) c.pos[i] = (int)i;
    fill(c.q, 7 * 16, 1.5); fill(c.k, 7 * 8, 1.5); fill(c.v, 7 * 8, 1.0);
    fill(c.wy, 7 * 16, 1.0);
    attn_fd(&c, "attention");
    c.window = 0; c.cap = 0.0f; /* plain causal, no cap */
    attn_fd(&c, "attention (causal)");
    /* packed documents at 0..2 and 3..6, with the window and cap back on: the probabilities
       of keys in another document are 0 and the gradients still match */
    c.window = 3; c.cap = 1.5f;
    for (i = 0; i < 7; i++) c.kst[i] = i < 3 ? 0 : 3;
    c.kstart = c.kst;
    attn_fd(&c, "attention (packed)");
    {
        int leak = 0;
        size_t h, t;
        for (h = 0; h < c.H; h++)
            for (t = 3; t < 7; t++) leak += c.att[(h * 7 + t) * 7 + 2] != 0.0f;
        CHECKF(leak == 0, "packed attention sees the previous document (%d)", leak);
    }
    c.kstart = NULL;

    c.M = 3; c.N = 5; c.K = 6; c.r = 2; c.scale = 1.5f;
    fill(c.x, 18, 1.0); fill(c.q, 12, 1.0); fill(c.k, 10, 1.0); fill(c.wy, 15, 1.0);
    J_lora(&c);
    memset(dx, 0, sizeof dx); memset(dq, 0, sizeof dq); memset(dk, 0, sizeof dk);
    kmed__lora_backward(NULL, dx, dq, dk, c.wy, c.att, c.x, c.q, c.k, dxa, c.M, c.N, c.K, c.r,
                        c.scale);
    fd_check("lora dx", J_lora, &c, c.x, dx, 18);
    fd_check("lora dA", J_lora, &c, c.q, dq, 12);
    fd_check("lora dB", J_lora, &c, c.k, dk, 10);
}


/* ---- tiny random model ---- */

#define TV 96
#define TC 32
#define TF 64
#define TL 2
#define TB 2
#define TT 9

static kmed_gemma_config tiny_cfg(void)
{
    kmed_gemma_config c;
    memset(&c, 0, sizeof c);
    c.vocab_size = TV; c.hidden_size = TC; c.intermediate_size = TF; c.n_layers = TL;
    c.n_heads = 4; c.n_kv_heads = 2; c.head_dim = 8; c.query_pre_attn_scalar = 8;
    c.rms_norm_eps = 1e-6f; c.rope_theta = 10000; c.max_position = 64;
    /* soft-caps and window small enough to matter at these sizes */
    c.attn_softcap = 2.0f; c.final_softcap = 3.0f; c.sliding_window = 3;
    c.bos_id = 2; c.eos_id = 1; c.pad_id = 0;
    return c;
}

/* Source weights of the tiny model: embed, then per layer q k v o gate up down; norms. */
typedef struct tiny_src { float *w[1 + TL * 7]; size_t rows[1 + TL * 7], cols[1 + TL * 7];
                          float norms[TL * 4 + 1][TC]; } tiny_src;
typedef struct tiny_model { kmed_gemma m; void *buf[1 + TL * 7]; } tiny_model;

static void tiny_src_init(tiny_src *s)
{
    kmed_gemma_config c = tiny_cfg();
    int l, t, i = 0;
    s->rows[i] = TV; s->cols[i] = TC; i++;
    for (l = 0; l < TL; l++)
        for (t = 0; t < 7; t++, i++) kmed__lora_dims(&c, t, &s->rows[i], &s->cols[i]);
    for (i = 0; i < 1 + TL * 7; i++) {
        s->w[i] = (float *)malloc(s->rows[i] * s->cols[i] * sizeof(float));
        fill(s->w[i], s->rows[i] * s->cols[i], i == 0 ? 0.5 : 1.0 / sqrt((double)s->cols[i]));
    }
    fill(&s->norms[0][0], (TL * 4 + 1) * TC, 0.3);
}

static void tiny_src_free(tiny_src *s)
{
    int i;
    for (i = 0; i < 1 + TL * 7; i++) free(s->w[i]);
}

/* Model over the source weights stored in dtype dt (quantized row by row); deq: store
   the dequantized values in f32 instead (the f32 reference for a quantized base). */
static void tiny_model_init(tiny_model *tm, const tiny_src *s, kmed_dtype dt, int deq)
{
    kmed_gemma_config c = tiny_cfg();
    kmed_error e = {0};
    int l, i;
    CHECK_OK(kmed_gemma_init(&tm->m, &c, &e));
    for (i = 0; i < 1 + TL * 7; i++) {
        size_t rb = kmed_dtype_bytes(dt, s->cols[i]), r;
        kmed_weight *w;
        unsigned char *q = (unsigned char *)malloc(rb * s->rows[i]);
        for (r = 0; r < s->rows[i]; r++)
            kmed_quantize_row(dt, s->w[i] + r * s->cols[i], q + r * rb, s->cols[i]);
        if (deq) {
            float *f = (float *)malloc(s->rows[i] * s->cols[i] * sizeof(float));
            for (r = 0; r < s->rows[i]; r++)
                kmed_dequantize_row(dt, q + r * rb, f + r * s->cols[i], s->cols[i]);
            free(q);
            q = (unsigned char *)f;
        }
        tm->buf[i] = q;
        w = i == 0 ? &tm->m.embed : (kmed_weight *)kmed__lora_base(&tm->m.layers[(i - 1) / 7],
                                                                    (i - 1) % 7);
        w->data = q;
        w->type = deq ? KMED_F32 : dt;
        w->rows = s->rows[i];
        w->cols = s->cols[i];
    }
    for (l = 0; l < TL; l++) {
        memcpy(tm->m.layers[l].attn_norm, s->norms[l * 4 + 0], sizeof s->norms[0]);
        memcpy(tm->m.layers[l].post_attn_norm, s->norms[l * 4 + 1], sizeof s->norms[0]);
        memcpy(tm->m.layers[l].pre_ffn_norm, s->norms[l * 4 + 2], sizeof s->norms[0]);
        memcpy(tm->m.layers[l].post_ffn_norm, s->norms[l * 4 + 3], sizeof s->norms[0]);
    }
    memcpy(tm->m.final_norm, s->norms[TL * 4], sizeof s->norms[0]);
}

static void tiny_model_free(tiny_model *tm)
{
    int i;
    kmed_gemma_free(&tm->m);
    for (i = 0; i < 1 + TL * 7; i++) free(tm->buf[i]);
}

/* Two sequences with different label masks (a padded batch in HF's convention). */
static void tiny_batch(int *ids, int *labels)
{
    int i;
    for (i = 0; i < TB * TT; i++) ids[i] = 3 + (int)kmed_rng_below(&trng, TV - 3);
    for (i = 0; i < TB * TT; i++) labels[i] = ids[i];
    labels[0] = labels[1] = labels[2] = KMED_LABEL_IGNORE;
    labels[TT + 4] = KMED_LABEL_IGNORE;
    labels[2 * TT - 2] = labels[2 * TT - 1] = KMED_LABEL_IGNORE; /* padding at the end */
    ids[2 * TT - 2] = ids[2 * TT - 1] = 0;
}

static kmed_train *tiny_trainer(const kmed_gemma *m, kmed_lora *lora, int full, int ckpt,
                                kmed_pool *pool)
{
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_error e = {0};
    memset(&tc, 0, sizeof tc);
    tc.full = full;
    tc.max_batch = TB;
    tc.max_seq = TT;
    tc.checkpointing = ckpt;
    tc.head_rows = 5; /* several LM-head blocks even at this size */
    tc.optim.lr = 1e-2f;
    tc.optim.weight_decay = 0.1f;
    CHECK_OK(kmed_train_create(&tr, m, lora, &tc, pool, &e));
    return tr;
}

typedef struct fdctx { kmed_train *tr; const int *ids, *labels; } fdctx;
static double J_loss(void *p)
{
    fdctx *c = (fdctx *)p;
    double loss = 0;
    kmed_error e = {0};
    CHECK_OK(kmed_train_loss(c->tr, c->ids, c->labels, TB, TT, &loss, &e));
    return loss;
}

/* Finite differences on a few elements of every parameter tensor (all of small ones). */
static void fd_params(kmed_train *tr, const int *ids, const int *labels, const char *what)
{
    kmed_param *ps;
    size_t np = kmed_train_params(tr, &ps), i, j, count = kmed_train_count(labels, TB, TT);
    fdctx c;
    double worst = 0;
    kmed_error e = {0};
    c.tr = tr; c.ids = ids; c.labels = labels;
    kmed_train_zero_grad(tr);
    CHECK_OK(kmed_train_forward_backward(tr, ids, labels, TB, TT, (double)count, NULL, NULL,
                                         &e));
    for (i = 0; i < np; i++) {
        double gm = dmax(ps[i].g, ps[i].n), maxe = 0;
        size_t nchk = ps[i].n < 24 ? ps[i].n : 24;
        for (j = 0; j < nchk; j++) {
            size_t at = ps[i].n < 24 ? j : (size_t)kmed_rng_below(&trng, ps[i].n);
            float x0 = ps[i].p[at], xp, xm;
            double h = 1e-2, num;
            xp = (float)(x0 + h); xm = (float)(x0 - h);
            ps[i].p[at] = xp;
            num = J_loss(&c);
            ps[i].p[at] = xm;
            num = (num - J_loss(&c)) / ((double)xp - xm);
            ps[i].p[at] = x0;
            if (fabs(num - ps[i].g[at]) > maxe) maxe = fabs(num - ps[i].g[at]);
        }
        if (gm > 0 && maxe / gm > worst) worst = maxe / gm;
        /* the loss itself is f32 (noise ~1e-7 relative): allow 1e-4 absolute */
        CHECKF(gm > 0 && maxe <= 1e-2 * gm + 1e-4, "%s %s: fd err %.3g, max |grad| %.3g", what,
               ps[i].name, maxe, gm);
    }
    printf("  fd %s: %zu tensors, worst err/max|grad| %.3g\n", what, np, worst);
}

static void grads_copy(kmed_train *tr, float *out)
{
    kmed_param *ps;
    size_t np = kmed_train_params(tr, &ps), i, o = 0;
    for (i = 0; i < np; i++) {
        memcpy(out + o, ps[i].g, ps[i].n * sizeof(float));
        o += ps[i].n;
    }
}

static double rel_diff(const float *a, const float *b, size_t n)
{
    double m = dmax(b, n);
    return kmed_test_maxdiff(a, b, n) / (m > 0 ? m : 1);
}

static void lora_randomize_B(kmed_lora *lora)
{
    int l, t;
    size_t out, in;
    kmed_gemma_config c = tiny_cfg();
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < 7; t++)
            if (lora->ab[l][t].B) {
                kmed__lora_dims(&c, t, &out, &in);
                fill(lora->ab[l][t].B, out * (size_t)lora->r, 0.2);
            }
}

static void test_tiny(kmed_pool *pool)
{
    tiny_src src;
    tiny_model f32m, qm, dm;
    kmed_lora lora, lora2;
    kmed_lora_config lc;
    kmed_train *tr, *tr2;
    kmed_error e = {0};
    int ids[TB * TT], labels[TB * TT];
    size_t count, n, i;
    float *g1, *g2;
    double loss, loss2;
    kmed_dtype qt[2] = {KMED_Q8_0, KMED_Q4_0};
    int k;

    tiny_src_init(&src);
    tiny_batch(ids, labels);
    count = kmed_train_count(labels, TB, TT);
    CHECK(count == (TT - 1 - 2) + (TT - 1 - 1 - 2));
    tiny_model_init(&f32m, &src, KMED_F32, 0);

    /* full-parameter gradients: every weight, norms and the tied embedding */
    tr = tiny_trainer(&f32m.m, NULL, 1, 0, NULL);
    if (tr) {
        kmed_param *ps;
        CHECK(kmed_train_params(tr, &ps) == 2 + TL * 11);
        CHECK(!strcmp(ps[0].name, "model.embed_tokens.weight"));
        fd_params(tr, ids, labels, "full-parameter");
        /* the saved HF directory loads back to the same model */
        {
            kmed_gemma back;
            kmed_train *tb = NULL;
            double l1 = 0, l2 = -1;
            CHECK_OK(kmed_train_step(tr, ids, labels, 1, TB, TT, NULL, &e));
            CHECK_OK(kmed_train_loss(tr, ids, labels, TB, TT, &l1, &e));
            CHECK_OK(kmed_train_save_model(tr, "build/test_train_model", &e));
            CHECK_OK(kmed_gemma_load(&back, "build/test_train_model", NULL, &e));
            if (e.code == KMED_OK) {
                tb = tiny_trainer(&back, NULL, 1, 0, NULL);
                if (tb) CHECK_OK(kmed_train_loss(tb, ids, labels, TB, TT, &l2, &e));
                CHECKF(l1 == l2, "saved full model: loss %.9g, reloaded %.9g", l1, l2);
                kmed_train_free(tb);
                kmed_gemma_free(&back);
            }
        }
        kmed_train_free(tr);
    }

    /* LoRA gradients with another rank/alpha and a subset of targets and layers */
    memset(&lc, 0, sizeof lc);
    lc.r = 3; lc.alpha = 5; lc.seed = 7;
    lc.targets = (1u << KMED_LORA_Q) | (1u << KMED_LORA_V) | (1u << KMED_LORA_O) |
                 (1u << KMED_LORA_UP) | (1u << KMED_LORA_DOWN);
    lc.layers = 2; /* layer 1 only: the backward stops above layer 0 */
    CHECK_OK(kmed_lora_create(&lora, &f32m.m, &lc, &e));
    CHECK(lora.ab[0][0].A == NULL && lora.ab[1][0].A && lora.ab[1][1].A == NULL);
    CHECK(fabsf(lora.scale - 5.0f / 3.0f) < 1e-7f);
    lora_randomize_B(&lora);
    tr = tiny_trainer(&f32m.m, &lora, 0, 0, NULL);
    if (tr) { fd_params(tr, ids, labels, "LoRA r=3 alpha=5"); kmed_train_free(tr); }
    kmed_lora_free(&lora);

    /* all targets, all layers */
    memset(&lc, 0, sizeof lc);
    lc.r = 4; lc.alpha = 8; lc.seed = 11;
    CHECK_OK(kmed_lora_create(&lora, &f32m.m, &lc, &e));
    lora_randomize_B(&lora);
    n = kmed_lora_numel(&lora);
    CHECK(n == (size_t)TL * 4 * (32 + 32 + 32 + 16 + 32 + 16 + 32 + 32 + 32 + 64 + 32 + 64 +
                                 64 + 32));
    g1 = (float *)malloc(n * sizeof(float));
    g2 = (float *)malloc(n * sizeof(float));
    tr = tiny_trainer(&f32m.m, &lora, 0, 0, NULL);
    if (tr) fd_params(tr, ids, labels, "LoRA all targets");

    /* checkpointing and 2 threads give the same bits */
    if (tr) grads_copy(tr, g1);
    tr2 = tiny_trainer(&f32m.m, &lora, 0, 1, pool);
    if (tr && tr2) {
        kmed_train_zero_grad(tr2);
        CHECK_OK(kmed_train_forward_backward(tr2, ids, labels, TB, TT, (double)count, NULL,
                                             NULL, &e));
        grads_copy(tr2, g2);
        CHECKF(memcmp(g1, g2, n * sizeof(float)) == 0, "checkpointing + 2 threads changed the "
               "gradients (max diff %.3g)", kmed_test_maxdiff(g1, g2, n));
    }
    kmed_train_free(tr2);

    /* gradient accumulation: two micro-batches of one = one batch of two */
    if (tr) {
        double s1 = 0, s2 = 0;
        kmed_train_zero_grad(tr);
        CHECK_OK(kmed_train_forward_backward(tr, ids, labels, 1, TT, (double)count, &s1, NULL,
                                             &e));
        CHECK_OK(kmed_train_forward_backward(tr, ids + TT, labels + TT, 1, TT, (double)count,
                                             &s2, NULL, &e));
        grads_copy(tr, g2);
        CHECKF(rel_diff(g2, g1, n) < 1e-5, "accumulated gradients differ: %.3g",
               rel_diff(g2, g1, n));
        CHECK_OK(kmed_train_loss(tr, ids, labels, TB, TT, &loss, &e));
        CHECKF(fabs((s1 + s2) / (double)count - loss) < 1e-6 * loss,
               "batch loss %.9g is not the mean over all counted tokens %.9g", loss,
               (s1 + s2) / (double)count);
    }

    /* packing: documents of 4 and 5 tokens in one sequence with position ids 0..3, 0..4
       (the second document's first label not counted) give the loss and gradients of the
       two documents trained apart */
    if (tr) {
        int pids[TT], plab[TT], ppos[TT] = {0, 1, 2, 3, 0, 1, 2, 3, 4};
        double s1 = 0, s2 = 0, sp = 0;
        size_t t;
        for (t = 0; t < TT; t++) {
            pids[t] = t < 4 ? ids[t] : ids[TT + t - 4];
            plab[t] = t < 4 ? labels[t] : t == 4 ? KMED_LABEL_IGNORE : labels[TT + t - 4];
        }
        kmed_train_zero_grad(tr);
        CHECK_OK(kmed_train_forward_backward(tr, pids, plab, 1, 4, 10.0, &s1, NULL, &e));
        CHECK_OK(kmed_train_forward_backward(tr, pids + 4, plab + 4, 1, 5, 10.0, &s2, NULL, &e));
        grads_copy(tr, g1);
        kmed_train_zero_grad(tr);
        kmed_train_set_positions(tr, ppos);
        CHECK_OK(kmed_train_forward_backward(tr, pids, plab, 1, TT, 10.0, &sp, NULL, &e));
        grads_copy(tr, g2);
        CHECKF(fabs(sp - (s1 + s2)) < 1e-5 * fabs(sp), "packed loss %.9g vs apart %.9g", sp,
               s1 + s2);
        CHECKF(rel_diff(g2, g1, n) < 1e-5, "packed gradients differ: %.3g", rel_diff(g2, g1, n));
        ppos[2] = -1;
        CHECK(kmed_train_forward_backward(tr, pids, plab, 1, TT, 10.0, NULL, NULL, &e) ==
              KMED_ERR_ARG && strstr(e.msg, "position id -1"));
        kmed_train_set_positions(tr, NULL);
        /* without positions the same tokens are one document: the loss changes */
        sp = 0;
        CHECK_OK(kmed_train_forward_backward(tr, pids, plab, 1, TT, 0.0, &sp, NULL, &e));
        CHECK(fabs(sp - (s1 + s2)) > 1e-4 * fabs(sp));
    }

    /* the training forward agrees with the inference forward (with the adapter) */
    if (tr) {
        kmed_gemma_state st;
        float *logits = (float *)malloc((size_t)TT * TV * sizeof(float));
        double nll = 0;
        size_t cnt = 0, b, t, j;
        CHECK_OK(kmed_gemma_state_init(&st, &f32m.m, TT, &e));
        for (b = 0; b < TB; b++) {
            CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
            CHECK_OK(kmed_gemma_forward(&f32m.m, &lora, &st, NULL, ids + b * TT, TT,
                                        KMED_FWD_LOGITS_ALL, logits, NULL, &e));
            for (t = 0; t + 1 < TT; t++) {
                int lab = labels[b * TT + t + 1];
                double mx = -1e30, se = 0;
                if (lab < 0) continue;
                for (j = 0; j < TV; j++) mx = fmax(mx, logits[t * TV + j]);
                for (j = 0; j < TV; j++) se += exp(logits[t * TV + j] - mx);
                nll += mx + log(se) - logits[t * TV + lab];
                cnt++;
            }
        }
        CHECK_OK(kmed_train_loss(tr, ids, labels, TB, TT, &loss, &e));
        printf("  train forward loss %.9g, inference forward loss %.9g\n", loss, nll / cnt);
        CHECKF(cnt == count && fabs(loss - nll / cnt) < 2e-6 * loss, "train loss %.9g vs "
               "kmed_gemma_forward %.9g", loss, nll / cnt);

        /* merge: the merged f32 model without adapter = the base with the adapter */
        {
            tiny_model mm;
            double lm = 0;
            kmed_train *trm;
            kmed_lora none;
            float *mw = (float *)malloc(TF * TC * sizeof(float));
            tiny_model_init(&mm, &src, KMED_F32, 0);
            CHECK_OK(kmed_lora_merged_weight(&f32m.m, &lora, 1, KMED_LORA_UP, mw, &e));
            CHECK_OK(kmed_lora_merge(&mm.m, &lora, &e));
            CHECK(kmed_test_maxdiff(mw, (const float *)mm.m.layers[1].up.data, TF * TC) < 1e-6);
            memset(&lc, 0, sizeof lc);
            lc.r = 1; lc.targets = 1; lc.layers = 1;
            CHECK_OK(kmed_lora_create(&none, &mm.m, &lc, &e)); /* B = 0: adds nothing */
            trm = tiny_trainer(&mm.m, &none, 0, 0, NULL);
            if (trm) CHECK_OK(kmed_train_loss(trm, ids, labels, TB, TT, &lm, &e));
            printf("  merged model loss %.9g vs adapter loss %.9g\n", lm, loss);
            CHECKF(fabs(lm - loss) < 1e-5 * loss, "merged %.9g vs adapter %.9g", lm, loss);
            kmed_train_free(trm);
            kmed_lora_free(&none);
            tiny_model_free(&mm);
            free(mw);
        }
        kmed_gemma_state_free(&st);
        free(logits);
    }
    kmed_train_free(tr);

    /* LoRA over a Q8_0 / Q4_0 base = f32 on the dequantized weights */
    for (k = 0; k < 2; k++) {
        tiny_model_init(&qm, &src, qt[k], 0);
        tiny_model_init(&dm, &src, qt[k], 1);
        tr = tiny_trainer(&qm.m, &lora, 0, 0, pool);
        tr2 = tiny_trainer(&dm.m, &lora, 0, 0, pool);
        if (tr && tr2) {
            loss = loss2 = 0;
            kmed_train_zero_grad(tr);
            CHECK_OK(kmed_train_forward_backward(tr, ids, labels, TB, TT, (double)count, &loss,
                                                 NULL, &e));
            grads_copy(tr, g1);
            kmed_train_zero_grad(tr2);
            CHECK_OK(kmed_train_forward_backward(tr2, ids, labels, TB, TT, (double)count,
                                                 &loss2, NULL, &e));
            grads_copy(tr2, g2);
            printf("  %s base: loss rel diff %.3g, gradients max rel diff %.3g vs dequantized "
                   "f32\n", kmed_dtype_name(qt[k]), fabs(loss - loss2) / loss2,
                   rel_diff(g1, g2, n));
            CHECK(fabs(loss - loss2) <= 1e-6 * loss2);
            CHECK(rel_diff(g1, g2, n) < 1e-5);
        }
        kmed_train_free(tr);
        kmed_train_free(tr2);
        tiny_model_free(&qm);
        tiny_model_free(&dm);
    }

    /* PEFT save/load round trip */
    {
        kmed_json_doc jd = {0};
        char *text = NULL;
        size_t len;
        const kmed_json *tm;
        CHECK_OK(kmed_lora_save(&lora, "build/test_train_adapter", "tiny", &e));
        CHECK_OK(kmed_lora_load(&lora2, &f32m.m, "build/test_train_adapter", &e));
        CHECK(lora2.r == lora.r && lora2.alpha == lora.alpha && lora2.scale == lora.scale &&
              lora2.targets == lora.targets && kmed_lora_numel(&lora2) == n);
        if (lora2.impl_)
            CHECK(memcmp(((kmed__lora_impl *)lora.impl_)->block,
                         ((kmed__lora_impl *)lora2.impl_)->block, n * sizeof(float)) == 0);
        CHECK_OK(kmed_file_read("build/test_train_adapter/adapter_config.json", 0, &text, &len,
                                &e));
        CHECK_OK(kmed_json_parse(&jd, text, len, "adapter_config.json", 0, &e));
        tm = kmed_json_get(jd.root, "target_modules");
        CHECK(tm && tm->len == 7 && !strcmp(kmed_json_str(kmed_json_at(tm, 6), ""),
                                             "down_proj"));
        CHECK(!strcmp(kmed_json_str(kmed_json_get(jd.root, "task_type"), ""), "CAUSAL_LM"));
        CHECK(!strcmp(kmed_json_str(kmed_json_get(jd.root, "peft_type"), ""), "LORA"));
        CHECK(kmed_json_num(kmed_json_get(jd.root, "r"), 0) == 4);
        CHECK(kmed_json_num(kmed_json_get(jd.root, "lora_alpha"), 0) == 8);
        CHECK(!strcmp(kmed_json_str(kmed_json_get(jd.root, "base_model_name_or_path"), ""),
                      "tiny"));
        kmed_json_free(&jd);
        kmed_free(text);
        kmed_lora_free(&lora2);
    }

    /* PEFT init: B zero, A within 1/sqrt(in), deterministic for a seed */
    memset(&lc, 0, sizeof lc);
    lc.r = 4; lc.seed = 5;
    CHECK_OK(kmed_lora_create(&lora2, &f32m.m, &lc, &e));
    {
        double amax = 0, bmax = 0;
        kmed_lora l3;
        for (i = 0; i < 4 * TF; i++) amax = fmax(amax, fabs(lora2.ab[0][KMED_LORA_DOWN].A[i]));
        for (i = 0; i < TC * 4; i++) bmax = fmax(bmax, fabs(lora2.ab[0][KMED_LORA_DOWN].B[i]));
        CHECK(amax <= 1.0 / sqrt((double)TF) && amax > 0.8 / sqrt((double)TF) && bmax == 0);
        CHECK(lora2.alpha == 8.0f && lora2.targets == 0x7F);
        CHECK_OK(kmed_lora_create(&l3, &f32m.m, &lc, &e));
        CHECK(memcmp(((kmed__lora_impl *)l3.impl_)->block,
                     ((kmed__lora_impl *)lora2.impl_)->block,
                     kmed_lora_numel(&l3) * sizeof(float)) == 0);
        kmed_lora_free(&l3);
    }
    kmed_lora_free(&lora2);

    free(g1);
    free(g2);
    kmed_lora_free(&lora);
    tiny_model_free(&f32m);
    tiny_src_free(&src);
}


/* ---- checkpoint/resume, guards, SGD, schedule ---- */

static kmed_train *resume_trainer(const kmed_gemma *m, kmed_lora *lora, int full)
{
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_error e = {0};
    memset(&tc, 0, sizeof tc);
    tc.full = full;
    tc.max_batch = TB;
    tc.max_seq = TT;
    tc.optim.lr = 1e-2f;
    tc.optim.weight_decay = 0.05f;
    tc.optim.clip = 0.5f;
    tc.optim.schedule = KMED_SCHED_COSINE;
    tc.optim.warmup = 2;
    tc.optim.total_steps = 6;
    CHECK_OK(kmed_train_create(&tr, m, lora, &tc, NULL, &e));
    return tr;
}

/* Steps from data position pos to `to`: batch = data[pos % 3]. */
static void run_steps(kmed_train *tr, int (*ids)[TB * TT], int (*labels)[TB * TT], size_t pos,
                      size_t to)
{
    kmed_error e = {0};
    double loss;
    for (; pos < to; pos++)
        CHECK_OK(kmed_train_step(tr, ids[pos % 3], labels[pos % 3], 1, TB, TT, &loss, &e));
}

static void test_resume_and_guards(void)
{
    tiny_src src;
    tiny_model tm;
    kmed_lora la, lb;
    kmed_lora_config lc;
    kmed_train *ta, *tb;
    kmed_error e = {0};
    int ids[3][TB * TT], labels[3][TB * TT];
    kmed_param *pa, *pb;
    size_t np, i;
    int full;

    tiny_src_init(&src);
    tiny_model_init(&tm, &src, KMED_Q8_0, 0);
    for (i = 0; i < 3; i++) tiny_batch(ids[i], labels[i]);
    for (full = 0; full < 2; full++) {
        kmed_gemma *m = &tm.m;
        tiny_model fm;
        int same = 1;
        kmed_train_ckpt ck, got;
        if (full) { tiny_model_init(&fm, &src, KMED_F32, 0); m = &fm.m; }
        memset(&lc, 0, sizeof lc);
        lc.r = 2; lc.seed = 3;
        if (!full) CHECK_OK(kmed_lora_create(&la, m, &lc, &e));
        ta = resume_trainer(m, full ? NULL : &la, full);
        if (ta) run_steps(ta, ids, labels, 0, 6);
        /* interrupted run: 3 steps, checkpoint, a fresh process state (another adapter
           init), resume, 3 more */
        if (!full) CHECK_OK(kmed_lora_create(&lb, m, &lc, &e));
        tb = resume_trainer(m, full ? NULL : &lb, full);
        if (tb) run_steps(tb, ids, labels, 0, 3);
        memset(&ck, 0, sizeof ck);
        ck.data_pos = 3;
        kmed_rng_seed(&ck.rng, 77);
        ck.train_loss = (float *)calloc(3, sizeof(float));
        ck.train_loss[2] = 1.5f;
        ck.n_train = 3;
        if (tb) CHECK_OK(kmed_train_ckpt_save(tb, "build/test_train.ckpt", &ck, &e));
        kmed_train_free(tb);
        if (!full) {
            kmed_lora_free(&lb);
            lc.seed = 99;
            CHECK_OK(kmed_lora_create(&lb, m, &lc, &e));
        }
        tb = resume_trainer(m, full ? NULL : &lb, full);
        if (tb && ta) {
            CHECK_OK(kmed_train_ckpt_load(tb, "build/test_train.ckpt", &got, &e));
            CHECK(got.data_pos == 3 && got.n_train == 3 && got.train_loss[2] == 1.5f &&
                  memcmp(&got.rng, &ck.rng, sizeof ck.rng) == 0);
            CHECK(kmed_train_step_count(tb) == 3);
            run_steps(tb, ids, labels, got.data_pos, 6);
            kmed_train_ckpt_free(&got);
            np = kmed_train_params(ta, &pa);
            CHECK(kmed_train_params(tb, &pb) == np);
            for (i = 0; i < np; i++)
                same &= memcmp(pa[i].p, pb[i].p, pa[i].n * sizeof(float)) == 0 &&
                        memcmp(pa[i].m, pb[i].m, pa[i].n * sizeof(float)) == 0;
            CHECKF(same, "%s: 3 steps + checkpoint + resume + 3 steps differs from 6 steps",
                   full ? "full" : "LoRA");
            printf("  resume (%s): 6 steps == 3 + checkpoint + 3, bit for bit: %s\n",
                   full ? "full" : "LoRA over Q8_0", same ? "yes" : "NO");
        }
        free(ck.train_loss);

        /* NaN guard: a poisoned weight stops the step with a message, changes nothing */
        if (ta) {
            float *snap;
            size_t tot = 0, o = 0;
            long before = kmed_train_step_count(ta);
            kmed_result rc;
            double loss;
            np = kmed_train_params(ta, &pa);
            for (i = 0; i < np; i++) tot += pa[i].n;
            snap = (float *)malloc(tot * sizeof(float));
            pa[np - 1].p[0] = NAN;
            for (i = 0; i < np; i++, o += pa[i - 1].n)
                memcpy(snap + o, pa[i].p, pa[i].n * sizeof(float));
            rc = kmed_train_step(ta, ids[0], labels[0], 1, TB, TT, &loss, &e);
            CHECKF(rc == KMED_ERR_NUMERIC && strstr(e.msg, "NaN"), "NaN guard: %s", e.msg);
            for (i = 0, o = 0; i < np; i++, o += pa[i - 1].n)
                CHECK(memcmp(snap + o, pa[i].p, pa[i].n * sizeof(float)) == 0);
            CHECK(kmed_train_step_count(ta) == before);
            kmed_train_zero_grad(ta);
            pa[1].g[3] = INFINITY;
            rc = kmed_train_check_grads(ta, &e);
            CHECKF(rc == KMED_ERR_NUMERIC && strstr(e.msg, pa[1].name), "grad guard: %s",
                   e.msg);
            free(snap);
        }
        kmed_train_free(ta);
        kmed_train_free(tb);
        if (!full) { kmed_lora_free(&la); kmed_lora_free(&lb); }
        if (full) tiny_model_free(&fm);
    }

    /* SGD: p -= lr * (g + wd * p) */
    {
        kmed_train_config tc;
        kmed_train *tr = NULL;
        float *p0, *g0;
        size_t o = 0, tot;
        double maxd = 0;
        memset(&lc, 0, sizeof lc);
        lc.r = 2;
        CHECK_OK(kmed_lora_create(&la, &tm.m, &lc, &e));
        lora_randomize_B(&la);
        memset(&tc, 0, sizeof tc);
        tc.max_batch = TB; tc.max_seq = TT;
        tc.optim.kind = KMED_OPTIM_SGD; tc.optim.lr = 0.5f; tc.optim.weight_decay = 0.1f;
        CHECK_OK(kmed_train_create(&tr, &tm.m, &la, &tc, NULL, &e));
        if (tr) {
            np = kmed_train_params(tr, &pa);
            tot = kmed_lora_numel(&la);
            p0 = (float *)malloc(tot * sizeof(float));
            g0 = (float *)malloc(tot * sizeof(float));
            kmed_train_zero_grad(tr);
            CHECK_OK(kmed_train_forward_backward(tr, ids[0], labels[0], TB, TT,
                     (double)kmed_train_count(labels[0], TB, TT), NULL, NULL, &e));
            for (i = 0; i < np; o += pa[i].n, i++) {
                memcpy(p0 + o, pa[i].p, pa[i].n * sizeof(float));
                memcpy(g0 + o, pa[i].g, pa[i].n * sizeof(float));
            }
            CHECK_OK(kmed_train_step(tr, ids[0], labels[0], 1, TB, TT, NULL, &e));
            for (i = 0, o = 0; i < np; o += pa[i].n, i++) {
                size_t j;
                for (j = 0; j < pa[i].n; j++) {
                    double want = p0[o + j] - 0.5 * (g0[o + j] + 0.1 * p0[o + j]);
                    maxd = fmax(maxd, fabs(pa[i].p[j] - want));
                }
            }
            CHECKF(maxd < 1e-6, "SGD step off by %.3g", maxd);
            free(p0);
            free(g0);
        }
        kmed_train_free(tr);
        kmed_lora_free(&la);
    }

    /* loss-spike guard: after 10 steps, a loss 3x the running mean stops the step */
    {
        kmed_train_config tc;
        kmed_train *tr = NULL;
        kmed_result rc;
        double loss = 0;
        int s;
        memset(&lc, 0, sizeof lc);
        lc.r = 2;
        CHECK_OK(kmed_lora_create(&la, &tm.m, &lc, &e));
        memset(&tc, 0, sizeof tc);
        tc.max_batch = TB; tc.max_seq = TT; tc.spike_factor = 2.0f;
        CHECK_OK(kmed_train_create(&tr, &tm.m, &la, &tc, NULL, &e));
        for (s = 0; tr && s < 10; s++)
            CHECK_OK(kmed_train_step(tr, ids[s % 3], labels[s % 3], 1, TB, TT, &loss, &e));
        if (tr) {
            CHECK(fabs(tr->loss_ema - loss) < 0.2 * loss); /* a running mean of these */
            tr->loss_ema = loss / 3.0; /* as if the losses so far had been 3x lower */
            rc = kmed_train_step(tr, ids[0], labels[0], 1, TB, TT, &loss, &e);
            CHECKF(rc == KMED_ERR_NUMERIC && strstr(e.msg, "spike"), "spike guard: %s", e.msg);
            CHECK(kmed_train_step_count(tr) == 10);
        }
        kmed_train_free(tr);
        kmed_lora_free(&la);
    }

    /* schedules (HF: step k uses lambda(k - 1)) */
    {
        kmed_optim_config oc;
        memset(&oc, 0, sizeof oc);
        oc.lr = 1.0f; oc.warmup = 4; oc.schedule = KMED_SCHED_COSINE; oc.total_steps = 104;
        CHECK(kmed_optim_lr(&oc, 1) == 0.0f && kmed_optim_lr(&oc, 3) == 0.5f);
        CHECK(kmed_optim_lr(&oc, 5) == 1.0f);
        CHECK(fabsf(kmed_optim_lr(&oc, 55) - 0.5f) < 1e-6f);
        CHECK(kmed_optim_lr(&oc, 105) < 1e-6f);
        oc.schedule = KMED_SCHED_CONSTANT;
        CHECK(kmed_optim_lr(&oc, 2) == 0.25f && kmed_optim_lr(&oc, 1000) == 1.0f);
    }
    tiny_model_free(&tm);
    tiny_src_free(&src);
}

/* ---- fixture ---- */

static const kmed_tensor_info *fx_tensor(const kmed_st *st, const char *name, size_t numel)
{
    const kmed_tensor_info *t = kmed_st_find(st, name);
    CHECKF(t && t->dtype == KMED_F32 && kmed_tensor_numel(t) == numel, "golden %s", name);
    return t && t->dtype == KMED_F32 && kmed_tensor_numel(t) == numel ? t : NULL;
}

/* Percentile check of the README: all trained tensors together vs golden. */
static void check_step(kmed_train *tr, const kmed_st *gold, int k, double lr)
{
    kmed_param *ps;
    size_t np = kmed_train_params(tr, &ps), i, j, n = 0, n90 = 0, n999 = 0, nall = 0;
    double mx = 0;
    for (i = 0; i < np; i++) {
        const kmed_tensor_info *t = fx_tensor(gold, ps[i].name, ps[i].n);
        if (!t) return;
        for (j = 0; j < ps[i].n; j++) {
            double d = fabs((double)ps[i].p[j] - ((const float *)t->data)[j]);
            n++;
            n90 += d <= TOL_STEP_P90;
            n999 += d <= TOL_STEP_P999;
            nall += d <= 2.0 * k * lr;
            if (d > mx) mx = d;
        }
    }
    printf("  AdamW step %d: %zu elements, %.4f%% <= 5e-7, %.4f%% <= 5e-6, max err %.3g\n", k,
           n, 100.0 * n90 / n, 100.0 * n999 / n, mx);
    CHECKF(n90 >= 0.9 * n, "step %d: only %zu of %zu within %g", k, n90, n, TOL_STEP_P90);
    CHECKF(n999 >= 0.999 * n, "step %d: only %zu of %zu within %g", k, n999, n, TOL_STEP_P999);
    CHECKF(nall == n, "step %d: %zu elements beyond 2 k lr", k, n - nall);
}

static void test_fixture(const char *fx, kmed_pool *pool)
{
    char path[1200];
    kmed_error e = {0};
    kmed_gemma m;
    kmed_lora lora;
    kmed_st fwd, grads, step[3];
    kmed_json_doc jd = {0};
    char *jtext = NULL;
    size_t jlen = 0, i, j, T;
    const kmed_tensor_info *tid, *tlab;
    int ids[64], labels[64];
    kmed_train *tr = NULL;
    kmed_train_config tc;
    kmed_param *ps;
    size_t np;
    double loss = 0, sum = 0, gold_loss, worst = 0;
    const kmed_json *sl;
    int k;

    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    CHECK_OK(kmed_gemma_load(&m, path, NULL, &e));
    if (e.code) return;
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_init", fx);
    CHECK_OK(kmed_lora_load(&lora, &m, path, &e));
    CHECK(lora.r == 4 && lora.scale == 2.0f && lora.targets == 0x7F);
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/forward.safetensors", fx);
    CHECK_OK(kmed_st_open(&fwd, path, &e));
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_grads.safetensors", fx);
    CHECK_OK(kmed_st_open(&grads, path, &e));
    for (k = 0; k < 3; k++) {
        snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_step%d.safetensors", fx, k + 1);
        CHECK_OK(kmed_st_open(&step[k], path, &e));
    }
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora.json", fx);
    CHECK_OK(kmed_file_read(path, 0, &jtext, &jlen, &e));
    CHECK_OK(kmed_json_parse(&jd, jtext, jlen, path, 0, &e));
    if (e.code) return;
    gold_loss = kmed_json_num(kmed_json_get(jd.root, "loss_with_lora"), 0);
    sl = kmed_json_get(jd.root, "step_losses");

    tid = kmed_st_find(&fwd, "input_ids");
    tlab = kmed_st_find(&fwd, "labels");
    CHECK(tid && tlab && tid->dtype == KMED_I32 && kmed_tensor_numel(tid) <= 64);
    if (!tid || !tlab) return;
    T = (size_t)kmed_tensor_numel(tid);
    memcpy(ids, tid->data, T * sizeof(int));
    memcpy(labels, tlab->data, T * sizeof(int));
    CHECK(kmed_train_count(labels, 1, T) == 28);

    memset(&tc, 0, sizeof tc);
    tc.max_batch = 1;
    tc.max_seq = (int)T;
    tc.optim.lr = 1e-3f;
    tc.optim.weight_decay = 0.01f;
    CHECK_OK(kmed_train_create(&tr, &m, &lora, &tc, pool, &e));
    if (!tr) return;
    np = kmed_train_params(tr, &ps);
    CHECK(np == 2 * 7 * 2);

    /* loss and gradients at the initial adapter */
    kmed_train_zero_grad(tr);
    CHECK_OK(kmed_train_forward_backward(tr, ids, labels, 1, T, 28.0, &sum, NULL, &e));
    loss = sum / 28.0;
    printf("  loss with LoRA %.9g (golden %.9g, rel err %.3g)\n", loss, gold_loss,
           fabs(loss - gold_loss) / gold_loss);
    CHECKF(fabs(loss - gold_loss) <= TOL_LOSS_REL * gold_loss, "loss %.9g vs %.9g", loss,
           gold_loss);
    for (i = 0; i < np; i++) {
        const kmed_tensor_info *t = fx_tensor(&grads, ps[i].name, ps[i].n);
        double err = 0, gm;
        if (!t) continue;
        gm = dmax((const float *)t->data, ps[i].n);
        for (j = 0; j < ps[i].n; j++) {
            double d = fabs((double)ps[i].g[j] - ((const float *)t->data)[j]);
            if (d > err) err = d;
        }
        if (err / gm > worst) worst = err / gm;
        CHECKF(err <= TOL_GRAD_REL * gm, "grad %s: max err %.3g, max |grad| %.3g", ps[i].name,
               err, gm);
    }
    printf("  LoRA gradients: worst max|err|/max|grad| %.3g over %zu tensors\n", worst, np);

    /* three AdamW steps on the same batch */
    for (k = 0; k < 3; k++) {
        double gl = kmed_json_num(kmed_json_at(sl, (size_t)k), 0);
        CHECK_OK(kmed_train_step(tr, ids, labels, 1, 1, T, &loss, &e));
        CHECKF(fabs(loss - gl) <= (k ? TOL_STEPLOSS_REL : TOL_LOSS_REL) * gl,
               "step %d loss %.9g vs %.9g", k + 1, loss, gl);
        check_step(tr, &step[k], k + 1, 1e-3);
    }
    CHECK_OK(kmed_train_loss(tr, ids, labels, 1, T, &loss, &e));
    gold_loss = kmed_json_num(kmed_json_get(jd.root, "loss_after_last_step"), 0);
    CHECKF(fabs(loss - gold_loss) <= TOL_STEPLOSS_REL * gold_loss, "loss after 3 steps %.9g "
           "vs %.9g", loss, gold_loss);

    kmed_train_free(tr);
    kmed_json_free(&jd);
    kmed_free(jtext);
    for (k = 0; k < 3; k++) kmed_st_close(&step[k]);
    kmed_st_close(&grads);
    kmed_st_close(&fwd);
    kmed_lora_free(&lora);
    kmed_gemma_free(&m);
}

/* Vocabulary compaction (used_tokens): a model whose unused tokens share one embedding
   row trains exactly as with every row computed: the same losses and gradient norms step
   by step (clipping active, so the norm must count the shared row once per token), the
   same weights, and a saved model with the full vocabulary again. */
static kmed_train *compact_trainer(const kmed_gemma *m, kmed_lora *lora, int full,
                                   const unsigned char *used, kmed_pool *pool)
{
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_error e = {0};
    memset(&tc, 0, sizeof tc);
    tc.full = full;
    tc.max_batch = TB;
    tc.max_seq = TT;
    tc.head_rows = 5;
    tc.optim.kind = KMED_OPTIM_SGD;   /* AdamW would turn float noise in near-zero
                                         gradients into whole lr-sized steps */
    tc.optim.lr = 0.5f;
    tc.optim.weight_decay = 0.1f;
    tc.optim.clip = 0.05f;
    tc.used_tokens = used;
    CHECK_OK(kmed_train_create(&tr, m, lora, &tc, pool, &e));
    return tr;
}

static void test_compact(kmed_pool *pool)
{
    enum { U = TV / 2 };   /* tokens [0, U) are used, [U, TV) share one row */
    tiny_src s;
    tiny_model tm;
    unsigned char used[TV];
    int ids[TB * TT], labels[TB * TT], full, k, v;
    kmed_error e = {0};
    tiny_src_init(&s);
    for (v = U + 1; v < TV; v++) memcpy(s.w[0] + v * TC, s.w[0] + U * TC, TC * sizeof(float));
    for (v = 0; v < TV; v++) used[v] = v < U;
    tiny_model_init(&tm, &s, KMED_F32, 0);
    for (full = 0; full <= 1; full++) {
        kmed_lora la, lb;
        kmed_lora_config lc;
        kmed_train *ta, *tb;
        kmed_param *pa, *pb;
        size_t np, i;
        double worst = 0;
        memset(&lc, 0, sizeof lc);
        lc.r = 4; lc.alpha = 8; lc.targets = (1u << KMED_LORA_NTARGETS) - 1; lc.seed = 5;
        if (!full) {
            CHECK_OK(kmed_lora_create(&la, &tm.m, &lc, &e));
            CHECK_OK(kmed_lora_create(&lb, &tm.m, &lc, &e));
            lora_randomize_B(&la);
            memcpy(((kmed__lora_impl *)lb.impl_)->block, ((kmed__lora_impl *)la.impl_)->block,
                   kmed_lora_numel(&la) * sizeof(float));
        }
        ta = compact_trainer(&tm.m, full ? NULL : &la, full, NULL, pool);
        tb = compact_trainer(&tm.m, full ? NULL : &lb, full, used, pool);
        CHECK(kmed_train_model(tb)->cfg.vocab_size == U + 1);
        for (k = 0; k < 4; k++) {
            double l1 = 0, l2 = 0;
            for (i = 0; i < TB * TT; i++) ids[i] = labels[i] = 3 + (int)kmed_rng_below(&trng, U - 3);
            labels[0] = labels[TT + 2] = KMED_LABEL_IGNORE;
            CHECK_OK(kmed_train_grads(ta, ids, labels, 1, TB, TT, &l1, &e));
            CHECK_OK(kmed_train_grads(tb, ids, labels, 1, TB, TT, &l2, &e));
            CHECKF(fabs(kmed_train_grad_norm(ta) - kmed_train_grad_norm(tb)) <=
                   1e-5 * kmed_train_grad_norm(ta), "%s step %d: gradient norm %.8g, compact %.8g",
                   full ? "full" : "lora", k, kmed_train_grad_norm(ta), kmed_train_grad_norm(tb));
            kmed_train_update(ta);
            kmed_train_update(tb);
            CHECKF(fabs(l1 - l2) <= 1e-5 * fabs(l1), "%s step %d: loss %.8f, compact %.8f",
                   full ? "full" : "lora", k, l1, l2);
        }
        np = kmed_train_params(ta, &pa);
        CHECK(kmed_train_params(tb, &pb) == np);
        for (i = full; i < np; i++)   /* every tensor but the embedding: same shape */
            if (pa[i].n == pb[i].n) {
                double d = rel_diff(pb[i].p, pa[i].p, pa[i].n);
                if (d > worst) worst = d;
            }
        if (full) {   /* embedding rows: own rows, and the shared row for the unused ones */
            for (v = 0; v < TV; v++) {
                double d = rel_diff(pb[0].p + (v < U ? v : U) * TC, pa[0].p + v * TC, TC);
                if (d > worst) worst = d;
            }
            CHECK(pb[0].shape[0] == U + 1);
        }
        CHECKF(worst < 1e-5, "%s: compact weights differ by %.3g", full ? "full" : "lora",
               worst);
        /* an unused token in a batch breaks the premise: refused, named */
        ids[3] = U + 7;
        CHECK(kmed_train_step(tb, ids, labels, 1, TB, TT, NULL, &e) == KMED_ERR_ARG);
        CHECKF(strstr(e.msg, "used tokens") && strstr(e.msg, "55"), "%s", e.msg);
        if (full) {   /* the saved model has every row again */
            kmed_gemma back;
            const char *dir = "build/test_compact_model";
            CHECK_OK(kmed_train_save_model(tb, dir, &e));
            CHECK_OK(kmed_gemma_load(&back, dir, NULL, &e));
            CHECK(back.cfg.vocab_size == TV && back.embed.rows == TV);
            if (back.embed.rows == TV)
                CHECK(rel_diff((const float *)back.embed.data, pa[0].p, (size_t)TV * TC) < 1e-5);
            kmed_gemma_free(&back);
        }
        kmed_train_free(ta);
        kmed_train_free(tb);
        if (!full) { kmed_lora_free(&la); kmed_lora_free(&lb); }
    }
    tiny_model_free(&tm);
    tiny_src_free(&s);
}

/* Trainable tokens (PEFT trainable_token_indices): rows start as the base's; the forward
   with the adapter equals the merged model (input embedding and tied head); the token
   rows' gradients pass finite differences and equal full training's embedding gradient
   rows (B = 0, so both forwards are the base's), with or without vocabulary compaction;
   the adapter saves and loads in any row order; bad adapters are refused. */
static void test_tokens(kmed_pool *pool)
{
    static const int tokens[4] = {40, 5, 17, 3};   /* any order; stored ascending */
    tiny_src s;
    tiny_model tm, mm;
    kmed_lora lora, back;
    kmed_lora_config lc;
    kmed_gemma_state st;
    kmed_train *tr, *tf, *tc;
    kmed_param *pt, *pf, *pc;
    unsigned char used[TV];
    int ids[TB * TT], labels[TB * TT], k, v;
    float *l1 = (float *)malloc((size_t)TT * TV * sizeof(float));
    float *l2 = (float *)malloc((size_t)TT * TV * sizeof(float));
    size_t np, i, count;
    double worst = 0;
    kmed_error e = {0};
    const char *dir = "build/test_tokens_adapter";
    char path[256];

    tiny_src_init(&s);
    tiny_model_init(&tm, &s, KMED_F32, 0);
    tiny_model_init(&mm, &s, KMED_F32, 0);
    memset(&lc, 0, sizeof lc);
    lc.r = 4; lc.alpha = 8; lc.seed = 3; lc.tokens = tokens; lc.n_tokens = 4;
    CHECK_OK(kmed_lora_create(&lora, &tm.m, &lc, &e));
    CHECK(lora.n_tokens == 4 && lora.token_ids[0] == 3 && lora.token_ids[3] == 40);
    CHECK(kmed_lora_token_row(&lora, 17) && !kmed_lora_token_row(&lora, 16));
    CHECK(!memcmp(kmed_lora_token_row(&lora, 17), s.w[0] + 17 * TC, TC * sizeof(float)));
    CHECK(kmed_lora_numel(&lora) > 4 * TC);

    /* gradients: token rows vs full training's dE rows, before B moves (B = 0) */
    tiny_batch(ids, labels);
    ids[1] = 5; ids[TT + 3] = 40; labels[5] = 17; labels[TT + 6] = 3;
    count = kmed_train_count(labels, TB, TT);
    tr = tiny_trainer(&tm.m, &lora, 0, 0, pool);
    tf = tiny_trainer(&tm.m, NULL, 1, 0, pool);
    np = kmed_train_params(tr, &pt);
    kmed_train_params(tf, &pf);
    CHECK(!strcmp(pt[np - 1].name, "base_model.model.model.embed_tokens.token_adapter."
                                   "trainable_tokens_delta") && pt[np - 1].shape[0] == 4);
    kmed_train_zero_grad(tr);
    kmed_train_zero_grad(tf);
    CHECK_OK(kmed_train_forward_backward(tr, ids, labels, TB, TT, (double)count, NULL, NULL, &e));
    CHECK_OK(kmed_train_forward_backward(tf, ids, labels, TB, TT, (double)count, NULL, NULL, &e));
    for (k = 0; k < 4; k++) {
        double d = rel_diff(pt[np - 1].g + k * TC, pf[0].g + lora.token_ids[k] * TC, TC);
        if (d > worst) worst = d;
        CHECK(dmax(pt[np - 1].g + k * TC, TC) > 0);
    }
    CHECKF(worst < 1e-5, "token-row gradients differ from full training's by %.3g", worst);
    kmed_train_free(tf);

    /* the same through compaction (the tokens among the used ones) */
    for (v = 0; v < TV; v++) used[v] = 1;
    for (v = 60; v < TV; v++) used[v] = 0;
    {
        kmed_train_config cc;
        memset(&cc, 0, sizeof cc);
        cc.max_batch = TB; cc.max_seq = TT; cc.head_rows = 5; cc.used_tokens = used;
        /* rows 60.. equal so they compact into one */
        for (v = 61; v < TV; v++) memcpy((float *)tm.buf[0] + v * TC, (float *)tm.buf[0] + 60 * TC,
                                         TC * sizeof(float));
        kmed_train_free(tr);
        tf = tiny_trainer(&tm.m, NULL, 1, 0, pool);   /* full, uncompacted: the reference */
        kmed_train_params(tf, &pf);
        tr = tiny_trainer(&tm.m, &lora, 0, 0, pool);
        CHECK_OK(kmed_train_create(&tc, &tm.m, &lora, &cc, pool, &e));
        CHECK(kmed_train_model(tc)->cfg.vocab_size == 61);
        np = kmed_train_params(tc, &pc);
        for (i = 0; i < (size_t)(TB * TT); i++) {   /* ids and labels among the used */
            if (ids[i] >= 60) ids[i] = 7;
            if (labels[i] >= 60) labels[i] = 8;
        }
        count = kmed_train_count(labels, TB, TT);
        kmed_train_zero_grad(tc);
        kmed_train_zero_grad(tf);
        CHECK_OK(kmed_train_forward_backward(tc, ids, labels, TB, TT, (double)count, NULL, NULL,
                                             &e));
        CHECK_OK(kmed_train_forward_backward(tf, ids, labels, TB, TT, (double)count, NULL, NULL,
                                             &e));
        worst = 0;
        for (k = 0; k < 4; k++) {
            double d = rel_diff(pc[np - 1].g + k * TC, pf[0].g + lora.token_ids[k] * TC, TC);
            if (d > worst) worst = d;
        }
        CHECKF(worst < 1e-5, "compact: token-row gradients differ by %.3g", worst);
        kmed_train_free(tc);
        kmed_train_free(tf);
        {   /* a trainable token among the shared rows: refused, named */
            static const int shared[1] = {70};
            kmed_lora lx;
            lc.tokens = shared; lc.n_tokens = 1;
            CHECK_OK(kmed_lora_create(&lx, &tm.m, &lc, &e));
            CHECK(kmed_train_create(&tc, &tm.m, &lx, &cc, pool, &e) == KMED_ERR_ARG);
            CHECKF(strstr(e.msg, "trainable token 70"), "%s", e.msg);
            kmed_lora_free(&lx);
        }
    }

    /* finite differences through every parameter, B and the rows moved off the base */
    lora_randomize_B(&lora);
    for (i = 0; i < 4 * TC; i++) lora.token_rows[i] += 0.3f * (float)kmed_rng_normal(&trng);
    fd_params(tr, ids, labels, "lora+tokens");
    /* a step updates the rows, and the next forward reads them */
    {
        double a = 0, b = 0;
        float r0 = lora.token_rows[0];
        CHECK_OK(kmed_train_step(tr, ids, labels, 1, TB, TT, &a, &e));
        CHECK(lora.token_rows[0] != r0);
        CHECK_OK(kmed_train_loss(tr, ids, labels, TB, TT, &b, &e));
        CHECK(b < a);
    }
    kmed_train_free(tr);

    /* forward with the adapter == the merged model (embedding rows + tied head) */
    memcpy(mm.buf[0], tm.buf[0], (size_t)TV * TC * sizeof(float));
    CHECK_OK(kmed_lora_merge(&mm.m, &lora, &e));
    CHECK(!memcmp((float *)mm.buf[0] + 5 * TC, kmed_lora_token_row(&lora, 5), TC * sizeof(float)));
    CHECK_OK(kmed_gemma_state_init(&st, &tm.m, TT, &e));
    CHECK_OK(kmed_gemma_forward(&tm.m, &lora, &st, pool, ids, TT, KMED_FWD_LOGITS_ALL, l1, NULL,
                                &e));
    st.pos = 0;
    CHECK_OK(kmed_gemma_forward(&mm.m, NULL, &st, pool, ids, TT, KMED_FWD_LOGITS_ALL, l2, NULL,
                                &e));
    CHECKF(rel_diff(l1, l2, (size_t)TT * TV) < 1e-5, "adapter vs merged logits: %.3g",
           rel_diff(l1, l2, (size_t)TT * TV));

    /* save / load: same ids and rows, also from a file listing them in another order */
    CHECK_OK(kmed_lora_save(&lora, dir, "tiny", &e));
    CHECK_OK(kmed_lora_load(&back, &tm.m, dir, &e));
    CHECK(back.n_tokens == 4 && !memcmp(back.token_ids, lora.token_ids, sizeof tokens));
    CHECK(!memcmp(back.token_rows, lora.token_rows, 4 * TC * sizeof(float)));
    kmed_lora_free(&back);
    {
        static const char cfg[] = "{\"peft_type\": \"LORA\", \"r\": 4, \"lora_alpha\": 8,"
                                  " \"trainable_token_indices\": {\"embed_tokens\": [40, 3]}}";
        kmed_tensor_info ti;
        float rows[2 * TC];
        memcpy(rows, kmed_lora_token_row(&lora, 40), TC * sizeof(float));
        memcpy(rows + TC, kmed_lora_token_row(&lora, 3), TC * sizeof(float));
        memset(&ti, 0, sizeof ti);
        ti.name = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
        ti.dtype = KMED_F32; ti.ndim = 2; ti.shape[0] = 2; ti.shape[1] = TC;
        ti.data = rows; ti.nbytes = sizeof rows;
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        CHECK_OK(kmed_st_write(path, &ti, 1, NULL, NULL, 0, &e));
        snprintf(path, sizeof path, "%s/adapter_config.json", dir);
        CHECK_OK(kmed_file_write_atomic(path, cfg, sizeof cfg - 1, &e));
        CHECK_OK(kmed_lora_load(&back, &tm.m, dir, &e));
        CHECK(back.n_tokens == 2 && back.token_ids[0] == 3 && back.token_ids[1] == 40);
        CHECK(!memcmp(kmed_lora_token_row(&back, 40), rows, TC * sizeof(float)));
        CHECK(!memcmp(kmed_lora_token_row(&back, 3), rows + TC, TC * sizeof(float)));
        kmed_lora_free(&back);
        /* the list without the tensor, a duplicate id, an id outside the vocabulary */
        snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
        CHECK_OK(kmed_st_write(path, &ti, 0, NULL, NULL, 0, &e));
        CHECK(kmed_lora_load(&back, &tm.m, dir, &e) == KMED_ERR_FORMAT);
        CHECKF(strstr(e.msg, "trainable_tokens_delta"), "%s", e.msg);
    }
    {
        static const int dup[2] = {4, 4}, out_of[1] = {TV};
        lc.tokens = dup; lc.n_tokens = 2;
        CHECK(kmed_lora_create(&back, &tm.m, &lc, &e) == KMED_ERR_ARG);
        CHECKF(strstr(e.msg, "twice"), "%s", e.msg);
        lc.tokens = out_of; lc.n_tokens = 1;
        CHECK(kmed_lora_create(&back, &tm.m, &lc, &e) == KMED_ERR_ARG);
    }
    kmed_gemma_state_free(&st);
    kmed_lora_free(&lora);
    tiny_model_free(&tm);
    tiny_model_free(&mm);
    tiny_src_free(&s);
    free(l1);
    free(l2);
}

int main(void)
{
    const char *fx = kmed_test_fixtures();
    kmed_pool *pool = NULL;
    kmed_error e = {0};
    kmed_rng_seed(&trng, 1234);
    CHECK_OK(kmed_pool_create(&pool, 2, &e));
    test_elementwise_vs_double();
    test_op_backwards();
    test_tiny(pool);
    test_resume_and_guards();
    test_compact(pool);
    test_tokens(pool);
    if (fx) test_fixture(fx, pool);
    kmed_pool_free(pool);
    return kmed_test_done();
}

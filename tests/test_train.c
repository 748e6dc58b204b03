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
    float q[256], k[256], v[256], att[512], scratch[16];
    int ids[8], pos[8];
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
    kmed__attention_forward(c->y, c->att, c->q, c->k, c->v, c->pos, c->scratch, c->N, c->S,
                            c->H, c->Hkv, c->D, c->scale, c->cap, c->window, 0, c->H);
    return wsum(c->wy, c->y, c->N * c->H * c->D);
}
static double J_lora(void *p)
{
    opctx *c = (opctx *)p;
    memset(c->y, 0, sizeof c->y);
    /* x (M, K), A = q (r, K), B = k (N, r); xa in att */
    kmed__lora_forward(NULL, c->y, c->att, c->x, c->q, c->k, c->M, c->N, c->K, c->r, c->scale);
    return wsum(c->wy, c->y, c->M * c->N);
}

static void test_op_backwards(void)
{
    static opctx c;
    float dx[256], dw[64], dg[256], du[256], dq[256], dk[256], dv[256], dxa[64];
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
    J_attn(&c);
    memset(dq, 0, sizeof dq); memset(dk, 0, sizeof dk); memset(dv, 0, sizeof dv);
    kmed__attention_backward(dq, dk, dv, c.wy, c.att, c.q, c.k, c.v, c.pos, c.scratch, c.N,
                             c.S, c.H, c.Hkv, c.D, c.scale, c.cap, c.window, 0, c.H);
    fd_check("attention dq", J_attn, &c, c.q, dq, 7 * 16);
    fd_check("attention dk", J_attn, &c, c.k, dk, 7 * 8);
    fd_check("attention dv", J_attn, &c, c.v, dv, 7 * 8);
    c.window = 0; c.cap = 0.0f; /* plain causal, no cap */
    J_attn(&c);
    memset(dq, 0, sizeof dq); memset(dk, 0, sizeof dk); memset(dv, 0, sizeof dv);
    kmed__attention_backward(dq, dk, dv, c.wy, c.att, c.q, c.k, c.v, c.pos, c.scratch, c.N,
                             c.S, c.H, c.Hkv, c.D, c.scale, c.cap, c.window, 0, c.H);
    fd_check("attention (causal) dq", J_attn, &c, c.q, dq, 7 * 16);
    fd_check("attention (causal) dk", J_attn, &c, c.k, dk, 7 * 8);

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

int main(void)
{
    const char *fx = kmed_test_fixtures();
    kmed_pool *pool = NULL;
    kmed_error e = {0};
    kmed_rng_seed(&trng, 1234);
    CHECK_OK(kmed_pool_create(&pool, 2, &e));
    test_op_backwards();
    if (fx) test_fixture(fx, pool);
    kmed_pool_free(pool);
    return kmed_test_done();
}

/* test_head: the trainer's chunked LM head (tied embedding, final soft-cap, cross-entropy)
   against a double-precision reference. A one-layer model with every layer weight zero is
   the identity on the residual stream, so the loss and the gradients of the embedding and
   the final norm have a closed form that this file computes directly: vocabulary 1000
   (several 256-wide chunks, the last partial), hidden 40 (a partial 32-wide panel),
   LM-head blocks of 7 rows (partial strips). Also: 1 and 2 threads give the same bits,
   the forward-only loss equals the training loss, and a BF16 embedding gives the bits of
   the same values in F32 (the packed-panel path vs the in-place one).
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_head.c -o build/test_head \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#define HV 1000
#define HC 40
#define HF 32
#define HB 2
#define HT 24

typedef struct head_model {
    kmed_gemma m;
    float *zero;        /* every layer weight */
    float *E;           /* (V, C) f32 */
    uint16_t *Eb;       /* (V, C) bf16 of the same values */
} head_model;

static void head_model_init(head_model *h, float cap, int bf16, kmed_rng *rng)
{
    kmed_gemma_config c;
    kmed_error e = {0};
    kmed_gemma_layer *L;
    size_t i;
    memset(&c, 0, sizeof c);
    c.vocab_size = HV; c.hidden_size = HC; c.intermediate_size = HF; c.n_layers = 1;
    c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 8; c.query_pre_attn_scalar = 8.0f;
    c.rms_norm_eps = 1e-6f; c.rope_theta = 10000.0f; c.final_softcap = cap;
    c.max_position = 64; c.pad_id = 0; c.bos_id = 2; c.eos_id = 1;
    memset(h, 0, sizeof *h);
    CHECK_OK(kmed_gemma_init(&h->m, &c, &e));
    h->zero = (float *)calloc(HF * HC, sizeof(float));
    h->E = (float *)malloc((size_t)HV * HC * sizeof(float));
    h->Eb = (uint16_t *)malloc((size_t)HV * HC * sizeof(uint16_t));
    for (i = 0; i < (size_t)HV * HC; i++) {
        /* bf16-exact values, so the two embeddings hold the same numbers */
        h->Eb[i] = kmed_f32_to_bf16((float)(2.0 * kmed_rng_uniform(rng) - 1.0));
        h->E[i] = kmed_bf16_to_f32(h->Eb[i]);
    }
    h->m.embed.data = bf16 ? (const void *)h->Eb : (const void *)h->E;
    h->m.embed.type = bf16 ? KMED_BF16 : KMED_F32;
    h->m.embed.rows = HV;
    h->m.embed.cols = HC;
    L = &h->m.layers[0];
#define HW(w, r, cc) L->w.data = h->zero; L->w.type = KMED_F32; L->w.rows = r; L->w.cols = cc;
    HW(q, 16, HC) HW(k, 8, HC) HW(v, 8, HC) HW(o, HC, 16)
    HW(gate, HF, HC) HW(up, HF, HC) HW(down, HC, HF)
#undef HW
    for (i = 0; i < HC; i++) h->m.final_norm[i] = (float)(0.5 * kmed_rng_uniform(rng) - 0.25);
    CHECK_OK(kmed_gemma_validate(&h->m, &e));
}

static void head_model_free(head_model *h)
{
    kmed_gemma_free(&h->m);
    free(h->zero);
    free(h->E);
    free(h->Eb);
}

/* Reference loss sum, dE (V, C) and dw (C) in double for the identity-layer model. */
static double head_reference(const head_model *h, const int *ids, const int *labels,
                             double count, double *dE, double *dw)
{
    const float *E = h->E, *w = h->m.final_norm;
    double cap = h->m.cfg.final_softcap, s = (double)(float)sqrt((double)HC), loss = 0.0;
    double *z = (double *)malloc(HV * sizeof(double)), *y = (double *)malloc(HV * sizeof(double));
    size_t n, v, c;
    memset(dE, 0, (size_t)HV * HC * sizeof(double));
    memset(dw, 0, HC * sizeof(double));
    for (n = 0; n < HB * HT; n++) {
        double hh[HC], xf[HC], dxf[HC], ss = 0.0, r, mx = -1e300, sum = 0.0, gx = 0.0;
        int tgt;
        if (n % HT == HT - 1 || labels[n + 1] == KMED_LABEL_IGNORE) continue;
        tgt = labels[n + 1];
        for (c = 0; c < HC; c++) {
            hh[c] = (double)E[(size_t)ids[n] * HC + c] * s;
            ss += hh[c] * hh[c];
        }
        r = 1.0 / sqrt(ss / HC + (double)h->m.cfg.rms_norm_eps);
        for (c = 0; c < HC; c++) xf[c] = hh[c] * r * (1.0 + (double)w[c]);
        for (v = 0; v < HV; v++) {
            double a = 0.0;
            for (c = 0; c < HC; c++) a += xf[c] * (double)E[v * HC + c];
            z[v] = a;
            y[v] = cap > 0.0 ? cap * tanh(a / cap) : a;
            if (y[v] > mx) mx = y[v];
        }
        for (v = 0; v < HV; v++) sum += exp(y[v] - mx);
        loss += mx + log(sum) - y[tgt];
        memset(dxf, 0, sizeof dxf);
        for (v = 0; v < HV; v++) {
            double dy = (exp(y[v] - mx) / sum - (v == (size_t)tgt)) / count;
            double t = cap > 0.0 ? y[v] / cap : 0.0, dz = dy * (1.0 - t * t);
            for (c = 0; c < HC; c++) {
                dxf[c] += dz * (double)E[v * HC + c];
                dE[v * HC + c] += dz * xf[c];
            }
        }
        /* back through the final norm and the embedding scale into the input row */
        for (c = 0; c < HC; c++) {
            dw[c] += dxf[c] * hh[c] * r;
            gx += dxf[c] * (1.0 + (double)w[c]) * hh[c];
        }
        for (c = 0; c < HC; c++)
            dE[(size_t)ids[n] * HC + c] +=
                (r * dxf[c] * (1.0 + (double)w[c]) - gx / HC * r * r * r * hh[c]) * s;
    }
    free(z);
    free(y);
    return loss;
}

static double head_relerr(const float *got, const double *ref, size_t n)
{
    double m = 0.0, d = 0.0;
    size_t i;
    for (i = 0; i < n; i++) {
        if (fabs(ref[i]) > m) m = fabs(ref[i]);
        if (fabs((double)got[i] - ref[i]) > d) d = fabs((double)got[i] - ref[i]);
    }
    return d / (m > 0 ? m : 1);
}

static kmed_train *head_trainer(const kmed_gemma *m, kmed_lora *lora, size_t rows,
                                kmed_pool *pool)
{
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_error e = {0};
    memset(&tc, 0, sizeof tc);
    tc.full = lora == NULL;
    tc.max_batch = HB;
    tc.max_seq = HT;
    tc.head_rows = rows;
    CHECK_OK(kmed_train_create(&tr, m, lora, &tc, pool, &e));
    return tr;
}

/* Gradients of every parameter, concatenated. */
static float *head_grads(kmed_train *tr, size_t *n_out)
{
    kmed_param *ps;
    size_t np = kmed_train_params(tr, &ps), n = 0, i;
    float *g;
    for (i = 0; i < np; i++) n += ps[i].n;
    g = (float *)malloc(n * sizeof(float));
    for (n = 0, i = 0; i < np; i++) {
        memcpy(g + n, ps[i].g, ps[i].n * sizeof(float));
        n += ps[i].n;
    }
    *n_out = n;
    return g;
}

static void test_full(float cap, kmed_pool *pool, kmed_rng *rng)
{
    head_model h;
    int ids[HB * HT], labels[HB * HT];
    double *dE = (double *)malloc((size_t)HV * HC * sizeof(double)), dw[HC];
    double ref, sum1 = 0.0, sum2 = 0.0, sum3 = 0.0, loss_fwd = 0.0;
    size_t i, count, n1, n2, n3;
    kmed_train *t1, *t2, *t3;
    kmed_error e = {0};
    float *g1, *g2, *g3;
    head_model_init(&h, cap, 0, rng);
    for (i = 0; i < HB * HT; i++) {
        ids[i] = (int)kmed_rng_below(rng, HV);
        labels[i] = i % 5 == 3 ? KMED_LABEL_IGNORE : ids[i];
    }
    labels[HT + 7] = HV - 1;   /* targets in the last, partial chunk */
    labels[9] = 255;           /* and at a chunk's end */
    count = kmed_train_count(labels, HB, HT);
    ref = head_reference(&h, ids, labels, (double)count, dE, dw);

    t1 = head_trainer(&h.m, NULL, 7, NULL);
    t2 = head_trainer(&h.m, NULL, 7, pool);
    t3 = head_trainer(&h.m, NULL, 0, pool);   /* default: one block of every row */
    if (!t1 || !t2 || !t3) goto done;
    kmed_train_zero_grad(t1);
    kmed_train_zero_grad(t2);
    kmed_train_zero_grad(t3);
    CHECK_OK(kmed_train_forward_backward(t1, ids, labels, HB, HT, (double)count, &sum1, NULL,
                                         &e));
    CHECK_OK(kmed_train_forward_backward(t2, ids, labels, HB, HT, (double)count, &sum2, NULL,
                                         &e));
    CHECK_OK(kmed_train_forward_backward(t3, ids, labels, HB, HT, (double)count, &sum3, NULL,
                                         &e));
    g1 = head_grads(t1, &n1);
    g2 = head_grads(t2, &n2);
    g3 = head_grads(t3, &n3);
    {
        kmed_param *ps;
        size_t np = kmed_train_params(t1, &ps);
        double eE = head_relerr(ps[0].g, dE, (size_t)HV * HC);
        double ew = head_relerr(ps[np - 1].g, dw, HC);
        double eE3 = head_relerr(g3, dE, (size_t)HV * HC);
        CHECK(!strcmp(ps[0].name, "model.embed_tokens.weight"));
        CHECK(!strcmp(ps[np - 1].name, "model.norm.weight"));
        printf("  cap %g: loss %.9g (reference %.9g), embed grad rel err %.3g (one block "
               "%.3g), final norm %.3g\n", (double)cap, sum1 / (double)count,
               ref / (double)count, eE, eE3, ew);
        CHECKF(fabs(sum1 - ref) <= 1e-5 * fabs(ref), "loss sum %.9g vs %.9g", sum1, ref);
        CHECKF(fabs(sum3 - ref) <= 1e-5 * fabs(ref), "loss sum %.9g vs %.9g", sum3, ref);
        CHECKF(eE < 1e-4 && eE3 < 1e-4, "embedding gradient rel err %.3g / %.3g", eE, eE3);
        CHECKF(ew < 1e-4, "final norm gradient rel err %.3g", ew);
    }
    CHECK(n1 == n2 && sum1 == sum2);
    CHECKF(n1 == n2 && memcmp(g1, g2, n1 * sizeof(float)) == 0,
           "1 and 2 threads differ (max diff %.3g)", kmed_test_maxdiff(g1, g2, n1));
    CHECK_OK(kmed_train_loss(t2, ids, labels, HB, HT, &loss_fwd, &e));
    CHECKF(loss_fwd == sum2 / (double)count, "forward-only loss %.17g vs %.17g", loss_fwd,
           sum2 / (double)count);
    free(g1);
    free(g2);
    free(g3);
done:
    kmed_train_free(t1);
    kmed_train_free(t2);
    kmed_train_free(t3);
    head_model_free(&h);
    free(dE);
}

/* LoRA over a BF16 embedding == LoRA over the same values in F32, bit for bit. */
static void test_lora_dtype(kmed_pool *pool, kmed_rng *rng)
{
    head_model hf, hb;
    kmed_lora lf, lb;
    kmed_lora_config lc;
    kmed_error e = {0};
    int ids[HB * HT], labels[HB * HT];
    double sf = 0.0, sb = 0.0;
    size_t i, t, nf, nb, count;
    kmed_train *tf, *tb;
    float *gf, *gb;
    kmed_rng r2 = *rng;
    head_model_init(&hf, 5.0f, 0, rng);
    head_model_init(&hb, 5.0f, 1, &r2);
    CHECK(memcmp(hf.E, hb.E, (size_t)HV * HC * sizeof(float)) == 0);
    memset(&lc, 0, sizeof lc);
    lc.r = 2; lc.alpha = 4; lc.seed = 3;
    CHECK_OK(kmed_lora_create(&lf, &hf.m, &lc, &e));
    CHECK_OK(kmed_lora_create(&lb, &hb.m, &lc, &e));
    for (t = 0; t < KMED_LORA_NTARGETS; t++) {   /* nonzero B so the adapter acts */
        size_t o_ = t == KMED_LORA_Q ? 16 : t == KMED_LORA_K || t == KMED_LORA_V ? 8
                  : t == KMED_LORA_GATE || t == KMED_LORA_UP ? HF : HC;
        for (i = 0; i < o_ * 2; i++)
            lf.ab[0][t].B[i] = lb.ab[0][t].B[i] = (float)(0.2 * kmed_rng_uniform(rng) - 0.1);
    }
    for (i = 0; i < HB * HT; i++) {
        ids[i] = (int)kmed_rng_below(rng, HV);
        labels[i] = i % 3 ? ids[i] : KMED_LABEL_IGNORE;
    }
    count = kmed_train_count(labels, HB, HT);
    tf = head_trainer(&hf.m, &lf, 7, pool);
    tb = head_trainer(&hb.m, &lb, 7, pool);
    if (tf && tb) {
        kmed_train_zero_grad(tf);
        kmed_train_zero_grad(tb);
        CHECK_OK(kmed_train_forward_backward(tf, ids, labels, HB, HT, (double)count, &sf,
                                             NULL, &e));
        CHECK_OK(kmed_train_forward_backward(tb, ids, labels, HB, HT, (double)count, &sb,
                                             NULL, &e));
        gf = head_grads(tf, &nf);
        gb = head_grads(tb, &nb);
        printf("  LoRA over BF16 vs F32 embedding: loss %.9g vs %.9g, %zu gradients\n",
               sf / (double)count, sb / (double)count, nf);
        CHECK(sf == sb && sf > 0.0);
        CHECKF(nf == nb && memcmp(gf, gb, nf * sizeof(float)) == 0,
               "BF16 embedding changed the LoRA gradients (max diff %.3g)",
               kmed_test_maxdiff(gf, gb, nf));
        free(gf);
        free(gb);
    }
    kmed_train_free(tf);
    kmed_train_free(tb);
    kmed_lora_free(&lf);
    kmed_lora_free(&lb);
    head_model_free(&hf);
    head_model_free(&hb);
}

int main(void)
{
    kmed_pool *pool = NULL;
    kmed_error e = {0};
    kmed_rng rng;
    kmed_rng_seed(&rng, 99);
    CHECK_OK(kmed_pool_create(&pool, 2, &e));
    test_full(5.0f, pool, &rng);
    test_full(0.0f, pool, &rng);
    test_lora_dtype(pool, &rng);
    kmed_pool_free(pool);
    return kmed_test_done();
}

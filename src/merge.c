/* ==== kmed_merge: model merging (linear, task arithmetic, TIES, DARE), streamed ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const kmed__mg_names[5] = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"
};

KMED_API const char *kmed_merge_method_name(kmed_merge_method m)
{
    return (unsigned)m < 5 ? kmed__mg_names[m] : "unknown";
}

KMED_API kmed_result kmed_merge_method_parse(const char *s, kmed_merge_method *m,
                                             kmed_error *err)
{
    int i;
    for (i = 0; i < 5 && s; i++) {
        if (strcmp(s, kmed__mg_names[i]) == 0) {
            *m = (kmed_merge_method)i;
            return KMED_OK;
        }
    }
    return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge method '%s' is not one of linear, "
                     "task_arithmetic, ties, dare_ties, dare_linear", s ? s : "(null)");
}

KMED_API uint64_t kmed_merge_tensor_key(const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull;
    while (name && *name) {
        h ^= (unsigned char)*name++;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ---- the per-tensor engine ----
   Inputs are read in chunks of KMED__MG_CHUNK elements through readers, so a tensor is
   never held whole as f32 (a 256000 x 3584 embedding would be 3.7 GB per input). TIES
   needs each task vector's k-th largest magnitude: two histogram passes over the float
   bits of |d| (high 16 bits, then low 16 bits inside the chosen bin) find it exactly. */

#define KMED__MG_CHUNK ((size_t)1 << 16) /* elements per step; also one DARE rng block */
#define KMED__MG_HBINS ((size_t)1 << 16)

enum { KMED__MG_SP_NONE, KMED__MG_SP_MAGNITUDE, KMED__MG_SP_RANDOM };

/* A config resolved for the engine: the mixed models and every default applied. */
typedef struct kmed__mg_plan {
    kmed_merge_method method;
    int sparsify;            /* KMED__MG_SP_* */
    int consensus;           /* 1: TIES sign election */
    int count;               /* election by count of signs */
    int normalize, rescale;
    float lambda;
    uint64_t seed;
    size_t n;                /* models mixed */
    float *w, *dens;         /* [n] */
    size_t *idx;             /* [n] index in cfg->models (seeds DARE) */
} kmed__mg_plan;

static void kmed__mg_plan_free(kmed__mg_plan *p)
{
    KMED_FREE(p->w);
    KMED_FREE(p->dens);
    KMED_FREE(p->idx);
    memset(p, 0, sizeof *p);
}

/* skip[i] set: cfg->models[i] is the base and takes no part (task-vector methods). */
static kmed_result kmed__mg_plan_init(kmed__mg_plan *p, const kmed_merge_config *cfg,
                                      const unsigned char *skip, kmed_error *err)
{
    size_t i, k = 0;
    memset(p, 0, sizeof *p);
    p->method = cfg->method;
    p->sparsify = cfg->method == KMED_MERGE_TIES ? KMED__MG_SP_MAGNITUDE
                  : (cfg->method == KMED_MERGE_DARE_TIES || cfg->method == KMED_MERGE_DARE_LINEAR)
                      ? KMED__MG_SP_RANDOM : KMED__MG_SP_NONE;
    p->consensus = cfg->method == KMED_MERGE_TIES || cfg->method == KMED_MERGE_DARE_TIES;
    p->count = cfg->consensus_count != 0;
    p->normalize = cfg->normalize ? cfg->normalize > 0
                                  : (cfg->method == KMED_MERGE_LINEAR ||
                                     cfg->method == KMED_MERGE_TIES);
    p->rescale = cfg->rescale ? cfg->rescale > 0 : p->sparsify == KMED__MG_SP_RANDOM;
    p->lambda = cfg->lambda != 0 ? cfg->lambda : 1.0f;
    p->seed = cfg->seed;
    p->w = (float *)kmed__calloc(cfg->n_models + 1, sizeof *p->w);
    p->dens = (float *)kmed__calloc(cfg->n_models + 1, sizeof *p->dens);
    p->idx = (size_t *)kmed__calloc(cfg->n_models + 1, sizeof *p->idx);
    if (!p->w || !p->dens || !p->idx) {
        kmed__mg_plan_free(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    }
    for (i = 0; i < cfg->n_models; i++) {
        if (skip && skip[i]) continue;
        p->w[k] = cfg->models[i].weight;
        p->dens[k] = cfg->models[i].density > 0 ? cfg->models[i].density : 1.0f;
        p->idx[k] = i;
        k++;
    }
    p->n = k;
    return KMED_OK;
}

typedef kmed_result (*kmed__mg_read_fn)(void *ctx, size_t off, size_t n, float *dst,
                                        kmed_error *err);
typedef struct kmed__mg_reader { kmed__mg_read_fn read; void *ctx; } kmed__mg_reader;
/* Receives the merged values [off, off + n) of the tensor, in order. */
typedef void (*kmed__mg_emit_fn)(void *ctx, size_t off, size_t n, const float *v);

/* TIES trim state of one task vector: keep |d| bits > thr, and the first `quota` elements
   (in index order) whose bits equal thr, so exactly k = floor(density * numel) survive. */
typedef struct kmed__mg_trim {
    int all, none;
    uint32_t hi;             /* pass 1: bin of the k-th largest */
    uint64_t need;           /* elements still to take inside that bin */
    double above, total;     /* L1 of the bins above it, and of the whole task vector */
    uint32_t thr;
    uint64_t quota, seen;
    float scale;             /* l1 rescale factor (1 when off) */
} kmed__mg_trim;

typedef struct kmed__mg_work {
    size_t n;                /* models the buffers are sized for */
    float *bufs;             /* (n + 4, CHUNK): base, out, sum, divisor, then the models */
    uint32_t *rnd;           /* (CHUNK) DARE random words */
    uint64_t *cnt;           /* (n, HBINS) */
    double *sum;             /* (n, HBINS) */
    kmed__mg_trim *trim;     /* [n] */
} kmed__mg_work;

static void kmed__mg_work_free(kmed__mg_work *w)
{
    KMED_FREE(w->bufs);
    KMED_FREE(w->rnd);
    KMED_FREE(w->cnt);
    KMED_FREE(w->sum);
    KMED_FREE(w->trim);
    memset(w, 0, sizeof *w);
}

static kmed_result kmed__mg_work_init(kmed__mg_work *w, const kmed__mg_plan *p,
                                      kmed_error *err)
{
    size_t n = p->n ? p->n : 1;
    memset(w, 0, sizeof *w);
    w->n = n;
    w->bufs = (float *)kmed__calloc((n + 4) * KMED__MG_CHUNK, sizeof(float));
    w->rnd = (uint32_t *)kmed__calloc(KMED__MG_CHUNK, sizeof *w->rnd);
    w->trim = (kmed__mg_trim *)kmed__calloc(n, sizeof *w->trim);
    if (p->sparsify == KMED__MG_SP_MAGNITUDE) {
        w->cnt = (uint64_t *)kmed__calloc(n * KMED__MG_HBINS, sizeof *w->cnt);
        w->sum = (double *)kmed__calloc(n * KMED__MG_HBINS, sizeof *w->sum);
    }
    if (!w->bufs || !w->rnd || !w->trim ||
        (p->sparsify == KMED__MG_SP_MAGNITUDE && (!w->cnt || !w->sum))) {
        kmed__mg_work_free(w);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for work buffers");
    }
    return KMED_OK;
}

static uint32_t kmed__mg_abits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;  /* |x|: non-negative floats order like their bit patterns */
}

static float kmed__mg_from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* One histogram pass over every trimmed task vector: pass 1 bins the high 16 bits of |d|,
   pass 2 the low 16 bits of the elements inside each vector's chosen high bin. */
static kmed_result kmed__mg_hist_pass(const kmed__mg_plan *p, int pass, size_t numel,
                                      const kmed__mg_reader *base, const kmed__mg_reader *xs,
                                      kmed__mg_work *wk, kmed_error *err)
{
    const size_t C = KMED__MG_CHUNK;
    float *b = wk->bufs, *x = wk->bufs + 4 * C;
    size_t off, i, e;
    kmed_result r;
    memset(wk->cnt, 0, p->n * KMED__MG_HBINS * sizeof *wk->cnt);
    memset(wk->sum, 0, p->n * KMED__MG_HBINS * sizeof *wk->sum);
    for (off = 0; off < numel; off += C) {
        size_t m = numel - off < C ? numel - off : C;
        if ((r = base->read(base->ctx, off, m, b, err)) != KMED_OK) return r;
        for (i = 0; i < p->n; i++) {
            kmed__mg_trim *t = &wk->trim[i];
            uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
            double *sum = wk->sum + i * KMED__MG_HBINS;
            if (t->all || t->none) continue;
            if ((r = xs[i].read(xs[i].ctx, off, m, x, err)) != KMED_OK) return r;
            for (e = 0; e < m; e++) {
                float a = fabsf(x[e] - b[e]);
                uint32_t u = kmed__mg_abits(a);
                if (pass == 1) {
                    cnt[u >> 16]++;
                    if (p->rescale) sum[u >> 16] += a; /* L1 sums only feed the rescale */
                } else if ((u >> 16) == t->hi) {
                    cnt[u & 0xffffu]++;
                    if (p->rescale) sum[u & 0xffffu] += a;
                }
            }
        }
    }
    return KMED_OK;
}

/* Finds every task vector's exact magnitude threshold (mergekit keeps the top
   k = int(density * numel) by |d|; ties at the threshold are kept in index order). */
static kmed_result kmed__mg_ties_prepare(const kmed__mg_plan *p, size_t numel,
                                         const kmed__mg_reader *base,
                                         const kmed__mg_reader *xs, kmed__mg_work *wk,
                                         kmed_error *err)
{
    size_t i, h;
    int active = 0;
    kmed_result r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        uint64_t k = (uint64_t)floor((double)p->dens[i] * (double)numel);
        memset(t, 0, sizeof *t);
        t->scale = 1.0f;
        if (p->dens[i] >= 1.0f || k >= numel) t->all = 1;
        else if (k == 0) t->none = 1; /* mergekit asserts here; nothing survives */
        else { t->need = k; active = 1; }
    }
    if (!active) return KMED_OK;
    if ((r = kmed__mg_hist_pass(p, 1, numel, base, xs, wk, err)) != KMED_OK) return r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        const uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
        const double *sum = wk->sum + i * KMED__MG_HBINS;
        uint64_t cum = 0;
        if (t->all || t->none) continue;
        for (h = 0; h < KMED__MG_HBINS; h++) t->total += sum[h];
        for (h = KMED__MG_HBINS; h-- > 0;) {
            if (cum + cnt[h] >= t->need) {
                t->hi = (uint32_t)h;
                t->need -= cum;
                break;
            }
            cum += cnt[h];
            t->above += sum[h];
        }
    }
    if ((r = kmed__mg_hist_pass(p, 2, numel, base, xs, wk, err)) != KMED_OK) return r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        const uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
        const double *sum = wk->sum + i * KMED__MG_HBINS;
        uint64_t cum = 0;
        double kept = t->above;
        if (t->all || t->none) continue;
        for (h = KMED__MG_HBINS; h-- > 0;) {
            if (cum + cnt[h] >= t->need) {
                t->thr = (t->hi << 16) | (uint32_t)h;
                t->quota = t->need - cum;
                kept += (double)t->quota * kmed__mg_from_bits(t->thr);
                break;
            }
            cum += cnt[h];
            kept += sum[h];
        }
        /* mergekit's l1 rescale: keep the task vector's L1 norm; eps guards tiny norms */
        if (p->rescale && t->total >= 1e-7 && kept >= 1e-7)
            t->scale = (float)(t->total / kept);
    }
    return KMED_OK;
}

/* d[0..C) in place; tmp: C floats of scratch. */
static void kmed__mg_trim_apply(kmed__mg_trim *t, float *restrict d, float *restrict tmp)
{
    const size_t C = KMED__MG_CHUNK;
    const float sc = t->scale;
    const uint32_t thr = t->thr;
    const float thf = kmed__mg_from_bits(thr);
    size_t e;
    uint32_t eq = 0;
    if (t->all) return;
    if (t->none) { memset(d, 0, C * sizeof *d); return; }
    /* non-negative floats compare like their bits (a NaN task vector value is dropped) */
    for (e = 0; e < C; e++) {
        float a = fabsf(d[e]);
        tmp[e] = a > thf ? d[e] * sc : 0.0f;
        eq += a == thf;
    }
    /* values equal to the threshold: the first `quota` of the tensor, in index order */
    for (e = 0; eq && e < C; e++) {
        if (kmed__mg_abits(d[e]) == thr) {
            if (t->seen < t->quota) tmp[e] = d[e] * sc;
            t->seen++;
            eq--;
        }
    }
    memcpy(d, tmp, C * sizeof *d);
}

static uint64_t kmed__mg_mix(uint64_t a, uint64_t b)
{
    return a ^ (b + 0x9E3779B97F4A7C15ull + (a << 6) + (a >> 2));
}

/* DARE drop of one chunk: each element kept with probability density (32 random bits per
   element against round(density * 2^32)), kept ones divided by density when rescaling.
   The stream is seeded per (seed, tensor, model, chunk), so results do not depend on
   tensor order, shards or which other models take part. */
/* d[0..C) in place; rnd: C words of scratch. */
static void kmed__mg_dare_apply(const kmed__mg_plan *p, uint64_t key, size_t i, size_t block,
                                float *d, uint32_t *rnd)
{
    const size_t C = KMED__MG_CHUNK;
    float dens = p->dens[i];
    uint32_t thr;
    kmed_rng rng;
    size_t e;
    if (dens >= 1.0f) return;
    thr = (uint32_t)((double)dens * 4294967296.0 + 0.5); /* dens < 1: fits */
    kmed_rng_seed(&rng, kmed__mg_mix(kmed__mg_mix(kmed__mg_mix(p->seed, key),
                                                  (uint64_t)p->idx[i] + 1), (uint64_t)block + 1));
    for (e = 0; e < C; e += 2) {
        uint64_t u = kmed_rng_u64(&rng);
        rnd[e] = (uint32_t)u;
        rnd[e + 1] = (uint32_t)(u >> 32);
    }
    if (p->rescale) {
        for (e = 0; e < C; e++) d[e] = rnd[e] < thr ? d[e] / dens : 0.0f;
    } else {
        for (e = 0; e < C; e++) d[e] = rnd[e] < thr ? d[e] : 0.0f;
    }
}

/* Chunk kernels (C elements; restrict so -O2 vectorizes them without alias checks). */
static void kmed__mg_sub(float *restrict x, const float *restrict b)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) x[e] -= b[e];
}

static void kmed__mg_axpy(float *restrict y, const float *restrict x, float a)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += a * x[e];
}

static void kmed__mg_add(float *restrict y, const float *restrict x)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += x[e];
}

static void kmed__mg_add_sign(float *restrict y, const float *restrict x)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += (float)((x[e] > 0) - (x[e] < 0));
}

/* Adds the values (and weights) of one model whose sign agrees with the elected one. */
static void kmed__mg_agree(float *restrict o, float *restrict dv, const float *restrict x,
                           const float *restrict sg, float w)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) {
        /* sign(x) == elected (0 never agrees); a 0/1 mask multiplied in, as mergekit does */
        float mask = x[e] * sg[e] > 0 ? 1.0f : 0.0f;
        o[e] += x[e] * mask;
        dv[e] += w * mask;
    }
}

/* o = b + lambda * mixed / divisor (divisor 1 where 0; x / 1 and x * 1 are exact). */
static void kmed__mg_finish(float *restrict o, const float *restrict mixed,
                            const float *restrict dv, float div, const float *restrict b,
                            float lambda)
{
    size_t e;
    if (dv) {
        for (e = 0; e < KMED__MG_CHUNK; e++)
            o[e] = b[e] + mixed[e] / (dv[e] == 0 ? 1.0f : dv[e]) * lambda;
    } else if (div != 1.0f) {
        for (e = 0; e < KMED__MG_CHUNK; e++) o[e] = b[e] + mixed[e] / div * lambda;
    } else { /* no division where mergekit does none */
        for (e = 0; e < KMED__MG_CHUNK; e++) o[e] = b[e] + mixed[e] * lambda;
    }
}

/* Merges one tensor of numel elements from its readers into emit. */
static kmed_result kmed__mg_tensor_run(const kmed__mg_plan *p, uint64_t key, size_t numel,
                                       const kmed__mg_reader *base, const kmed__mg_reader *xs,
                                       kmed__mg_emit_fn emit, void *ectx, kmed__mg_work *wk,
                                       kmed_error *err)
{
    const size_t C = KMED__MG_CHUNK;
    float *b = wk->bufs, *o = wk->bufs + C, *sm = wk->bufs + 2 * C, *dv = wk->bufs + 3 * C;
    float *xb = wk->bufs + 4 * C;
    float wsum = 0, div;
    size_t off, i, e;
    kmed_result r;
    int linear = p->method == KMED_MERGE_LINEAR;
    if (p->n > wk->n) return KMED__ERR(err, KMED_ERR_STATE, "merge: work sized for fewer models");
    for (i = 0; i < p->n; i++) wsum += p->w[i];
    if (p->sparsify == KMED__MG_SP_MAGNITUDE) {
        if ((r = kmed__mg_ties_prepare(p, numel, base, xs, wk, err)) != KMED_OK) return r;
    }
    /* mergekit's divisors: linear divides by the plain sum; task arithmetic guards ~0 */
    div = linear ? wsum : (fabsf(wsum) < 1e-8f ? 1.0f : wsum);
    /* Loops run over elements inside loops over models (sums still in model order), with
       selects instead of branches (random signs and masks defeat branch prediction), over
       whole chunks with zeroed tails: a constant trip count lets -O2 vectorize them. */
    for (off = 0; off < numel; off += C) {
        size_t m = numel - off < C ? numel - off : C;
        if (!linear) {
            if ((r = base->read(base->ctx, off, m, b, err)) != KMED_OK) return r;
            if (m < C) memset(b + m, 0, (C - m) * sizeof *b);
        }
        for (i = 0; i < p->n; i++) {
            float *x = xb + i * C, w = p->w[i];
            if ((r = xs[i].read(xs[i].ctx, off, m, x, err)) != KMED_OK) return r;
            if (m < C) memset(x + m, 0, (C - m) * sizeof *x);
            if (linear) continue;
            kmed__mg_sub(x, b);
            if (p->sparsify == KMED__MG_SP_MAGNITUDE) kmed__mg_trim_apply(&wk->trim[i], x, sm);
            else if (p->sparsify == KMED__MG_SP_RANDOM)
                kmed__mg_dare_apply(p, key, i, off / C, x, wk->rnd);
            for (e = 0; e < C; e++) x[e] *= w;
        }
        memset(sm, 0, C * sizeof *sm);
        if (linear) {
            for (i = 0; i < p->n; i++) kmed__mg_axpy(sm, xb + i * C, p->w[i]);
            if (p->normalize) for (e = 0; e < C; e++) o[e] = sm[e] / div;
            else memcpy(o, sm, C * sizeof *o);
        } else if (p->consensus) {
            /* elected sign: of the summed weighted values, or of the count of signs */
            for (i = 0; i < p->n; i++) {
                if (p->count) kmed__mg_add_sign(sm, xb + i * C);
                else kmed__mg_add(sm, xb + i * C);
            }
            for (e = 0; e < C; e++) sm[e] = sm[e] >= 0 ? 1.0f : -1.0f;
            memset(o, 0, C * sizeof *o);
            memset(dv, 0, C * sizeof *dv);
            for (i = 0; i < p->n; i++) kmed__mg_agree(o, dv, xb + i * C, sm, p->w[i]);
            memcpy(sm, o, C * sizeof *sm);
            kmed__mg_finish(o, sm, p->normalize ? dv : NULL, 1.0f, b, p->lambda);
        } else {
            for (i = 0; i < p->n; i++) kmed__mg_add(sm, xb + i * C);
            kmed__mg_finish(o, sm, NULL, p->normalize ? div : 1.0f, b, p->lambda);
        }
        emit(ectx, off, m, o);
    }
    return KMED_OK;
}

/* ---- config ---- */

KMED_API kmed_result kmed_merge_config_validate(const kmed_merge_config *cfg,
                                                kmed_error *err)
{
    size_t i;
    double ws = 0;
    int lin;
    if (!cfg) return KMED__ERR(err, KMED_ERR_ARG, "merge: no config");
    if ((unsigned)cfg->method > KMED_MERGE_DARE_LINEAR)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: unknown method %d", (int)cfg->method);
    lin = cfg->method == KMED_MERGE_LINEAR;
    if (!cfg->n_models || !cfg->models)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: no models to merge");
    if (!lin && (!cfg->base_model || !*cfg->base_model))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: %s needs a base_model",
                         kmed_merge_method_name(cfg->method));
    for (i = 0; i < cfg->n_models; i++) {
        const kmed_merge_model *mm = &cfg->models[i];
        if (!isfinite(mm->weight))
            return KMED__ERR(err, KMED_ERR_ARG, "merge: %s: weight is not finite", mm->model);
        if (!(mm->density >= 0 && mm->density <= 1))
            return KMED__ERR(err, KMED_ERR_ARG, "merge: %s: density %g is outside (0, 1]",
                             mm->model, (double)mm->density);
        ws += mm->weight;
    }
    if (!isfinite(cfg->lambda))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: lambda is not finite");
    if (lin && cfg->normalize >= 0 && ws == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: linear with normalize needs weights that "
                         "do not sum to 0");
    if (cfg->has_dtype && cfg->dtype != KMED_F32 && cfg->dtype != KMED_BF16 &&
        cfg->dtype != KMED_F16)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge: dtype %s (F32, BF16 or F16)",
                         kmed_dtype_name(cfg->dtype));
    return KMED_OK;
}

typedef struct kmed__mg_owned {
    kmed_merge_model *models;
    char **strs;
    size_t n_strs;
} kmed__mg_owned;

KMED_API void kmed_merge_config_free(kmed_merge_config *cfg)
{
    kmed__mg_owned *o;
    size_t i;
    if (!cfg || !cfg->impl_) return;
    o = (kmed__mg_owned *)cfg->impl_;
    for (i = 0; i < o->n_strs; i++) KMED_FREE(o->strs[i]);
    KMED_FREE(o->strs);
    KMED_FREE(o->models);
    KMED_FREE(o);
    memset(cfg, 0, sizeof *cfg);
}

static const char *kmed__mg_keep(kmed__mg_owned *o, const char *s, size_t len)
{
    char *c = kmed__strndup(s, len);
    if (!c) return NULL;
    o->strs[o->n_strs++] = c;
    return c;
}

/* Strips trailing '/' for comparing model paths. */
static int kmed__mg_same_path(const char *a, const char *b)
{
    size_t na, nb;
    if (!a || !b) return 0;
    na = strlen(a);
    nb = strlen(b);
    while (na > 1 && a[na - 1] == '/') na--;
    while (nb > 1 && b[nb - 1] == '/') nb--;
    return na == nb && memcmp(a, b, na) == 0;
}

static kmed_result kmed__mg_dtype_name(const char *s, kmed_dtype *t, const char *name,
                                       kmed_error *err)
{
    if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16")) *t = KMED_BF16;
    else if (!strcmp(s, "float16") || !strcmp(s, "f16") || !strcmp(s, "half")) *t = KMED_F16;
    else if (!strcmp(s, "float32") || !strcmp(s, "f32") || !strcmp(s, "float")) *t = KMED_F32;
    else return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "dtype '%s': expected bfloat16, "
                           "float16 or float32", s);
    return KMED_OK;
}

static kmed_result kmed__mg_num(const kmed_json *j, const char *what, double *v,
                                const char *name, kmed_error *err)
{
    if (!j || j->type != KMED_JSON_NUMBER)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be a number (per-layer lists "
                          "and filters are not supported)", what);
    *v = j->num;
    return KMED_OK;
}

static kmed_result kmed__mg_bool(const kmed_json *j, const char *what, int *v,
                                 const char *name, kmed_error *err)
{
    if (!j || (j->type != KMED_JSON_TRUE && j->type != KMED_JSON_FALSE))
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be true or false", what);
    *v = j->type == KMED_JSON_TRUE ? 1 : -1;
    return KMED_OK;
}

/* Fills cfg from a parsed mergekit config. */
static kmed_result kmed__mg_from_json(kmed_merge_config *cfg, kmed__mg_owned *o,
                                      const kmed_json *root, const char *name,
                                      kmed_error *err)
{
    const kmed_json *models = NULL, *method = NULL;
    double gw = 0, gd = 0, v = 0;
    int has_gw = 0, has_gd = 0, has_dtype = 0;
    size_t i, j, nstr = 2;
    kmed_result r;
    if (!root || root->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "a merge config must be a mapping");
    models = kmed_json_get(root, "models");
    if (models && models->type != KMED_JSON_ARRAY)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models must be a list");
    nstr += models ? models->len : 0;
    o->strs = (char **)kmed__calloc(nstr, sizeof *o->strs);
    o->models = (kmed_merge_model *)kmed__calloc(models && models->len ? models->len : 1,
                                                 sizeof *o->models);
    if (!o->strs || !o->models) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    for (i = 0; i < root->len; i++) {
        const kmed_json *k = &root->kids[i];
        if (!strcmp(k->key, "merge_method")) {
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "merge_method must be a string");
            method = k;
            if ((r = kmed_merge_method_parse(k->str, &cfg->method, err)) != KMED_OK) return r;
        } else if (!strcmp(k->key, "base_model")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "base_model must be a string");
            if (!(cfg->base_model = kmed__mg_keep(o, k->str, k->len)))
                return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
        } else if (!strcmp(k->key, "models")) {
            continue;
        } else if (!strcmp(k->key, "parameters")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_OBJECT)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "parameters must be a mapping");
            for (j = 0; j < k->len; j++) {
                const kmed_json *p = &k->kids[j];
                if (!strcmp(p->key, "normalize"))
                    r = kmed__mg_bool(p, "normalize", &cfg->normalize, name, err);
                else if (!strcmp(p->key, "rescale"))
                    r = kmed__mg_bool(p, "rescale", &cfg->rescale, name, err);
                else if (!strcmp(p->key, "int8_mask")) {
                    int b = 0;
                    r = kmed__mg_bool(p, "int8_mask", &b, name, err);
                    cfg->int8_mask = b > 0;
                } else if (!strcmp(p->key, "lambda")) {
                    r = kmed__mg_num(p, "lambda", &v, name, err);
                    cfg->lambda = (float)v;
                } else if (!strcmp(p->key, "weight")) {
                    r = kmed__mg_num(p, "parameters.weight", &gw, name, err);
                    has_gw = 1;
                } else if (!strcmp(p->key, "density")) {
                    r = kmed__mg_num(p, "parameters.density", &gd, name, err);
                    has_gd = 1;
                } else if (!strcmp(p->key, "consensus_method")) {
                    const char *s = kmed_json_str(p, "");
                    if (!strcmp(s, "sum")) cfg->consensus_count = 0;
                    else if (!strcmp(s, "count")) cfg->consensus_count = 1;
                    else r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "consensus_method "
                                        "'%s': expected sum or count", s);
                } else {
                    r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "parameters.%s is not "
                                   "supported", p->key);
                }
                if (r != KMED_OK) return r;
            }
        } else if (!strcmp(k->key, "dtype") || !strcmp(k->key, "out_dtype")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be a string", k->key);
            /* out_dtype wins over dtype (kmed computes in f32 either way) */
            if (!strcmp(k->key, "dtype") && has_dtype == 2) continue;
            if ((r = kmed__mg_dtype_name(k->str, &cfg->dtype, name, err)) != KMED_OK) return r;
            cfg->has_dtype = 1;
            has_dtype = !strcmp(k->key, "out_dtype") ? 2 : 1;
        } else if (!strcmp(k->key, "random_seed")) {
            int64_t s;
            if (!kmed_json_int(k, &s) || s < 0)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "random_seed must be an "
                                  "integer >= 0");
            cfg->seed = (uint64_t)s;
        } else if (!strcmp(k->key, "tokenizer_source")) {
            const char *s = kmed_json_str(k, "base");
            if (k->type != KMED_JSON_NULL && strcmp(s, "base") != 0)
                return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "tokenizer_source '%s': "
                                  "only the base model's tokenizer is supported", s);
        } else {
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "key '%s' is not supported",
                              k->key);
        }
    }
    if (!method) return KMED__ERRF(err, KMED_ERR_FORMAT, name, "merge_method is missing");
    for (i = 0; models && i < models->len; i++) {
        const kmed_json *mj = &models->kids[i], *path = kmed_json_get(mj, "model"), *pj;
        kmed_merge_model *mm = &o->models[i];
        int has_w = has_gw;
        if (mj->type != KMED_JSON_OBJECT || !path || path->type != KMED_JSON_STRING)
            return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu] needs a model path", i);
        for (j = 0; j < mj->len; j++) {
            if (strcmp(mj->kids[j].key, "model") && strcmp(mj->kids[j].key, "parameters"))
                return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "models[%zu].%s is not "
                                  "supported", i, mj->kids[j].key);
        }
        if (!(mm->model = kmed__mg_keep(o, path->str, path->len)))
            return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
        mm->weight = (float)gw;
        mm->density = has_gd ? (float)gd : 0.0f;
        pj = kmed_json_get(mj, "parameters");
        if (pj && pj->type != KMED_JSON_NULL) {
            if (pj->type != KMED_JSON_OBJECT)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu].parameters must be "
                                  "a mapping", i);
            for (j = 0; j < pj->len; j++) {
                const kmed_json *p = &pj->kids[j];
                char what[64];
                snprintf(what, sizeof what, "models[%zu].%s", i, p->key);
                if (!strcmp(p->key, "weight")) {
                    if ((r = kmed__mg_num(p, what, &v, name, err)) != KMED_OK) return r;
                    mm->weight = (float)v;
                    has_w = 1;
                } else if (!strcmp(p->key, "density")) {
                    if ((r = kmed__mg_num(p, what, &v, name, err)) != KMED_OK) return r;
                    if (!(v > 0 && v <= 1))
                        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s = %g is outside "
                                          "(0, 1]", what, v);
                    mm->density = (float)v;
                } else {
                    return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "%s is not supported",
                                      what);
                }
            }
        }
        /* the base model listed among the models needs no weight (it is no task vector) */
        if (!has_w && !(cfg->method != KMED_MERGE_LINEAR &&
                        kmed__mg_same_path(mm->model, cfg->base_model)))
            return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu] (%s) needs "
                              "parameters.weight", i, mm->model);
    }
    cfg->models = o->models;
    cfg->n_models = models ? models->len : 0;
    return kmed_merge_config_validate(cfg, err);
}

/* ---- YAML subset -> JSON ----
   The shape mergekit configs use: block mappings and block sequences by indentation,
   "- key: value" items, plain/quoted scalars, comments and "---". Anything else (flow
   collections, anchors, multi-line scalars) is an error naming the line. */

typedef struct kmed__mg_yline {
    size_t indent;
    const char *s;           /* content after the indent, comment stripped */
    size_t len;
    size_t line;
} kmed__mg_yline;

typedef struct kmed__mg_yaml {
    kmed__mg_yline *ln;
    size_t n, pos;
    kmed_buf *out;
    const char *name;
    kmed_error *err;
    int depth;
} kmed__mg_yaml;

static kmed_result kmed__mg_yerr(kmed__mg_yaml *y, size_t line, const char *what)
{
    return kmed_error_set(y->err, KMED_ERR_FORMAT, y->name, line, (size_t)-1, "%s", what);
}

/* Writes one scalar as JSON: quoted strings, true/false/null, numbers, else a string. */
static kmed_result kmed__mg_yscalar(kmed__mg_yaml *y, const char *s, size_t len, size_t line)
{
    char tmp[64];
    if (len && (s[0] == '"' || s[0] == '\'')) {
        kmed_buf v = {0};
        size_t i;
        if (len < 2 || s[len - 1] != s[0])
            return kmed__mg_yerr(y, line, "unterminated quoted string");
        for (i = 1; i + 1 < len; i++) {
            if (s[0] == '\'' && s[i] == '\'' && i + 2 < len && s[i + 1] == '\'') i++;
            else if (s[0] == '"' && s[i] == '\\' && i + 2 < len) {
                char c = s[++i];
                c = c == 'n' ? '\n' : c == 't' ? '\t' : c;
                kmed_buf_put(&v, &c, 1);
                continue;
            }
            kmed_buf_put(&v, s + i, 1);
        }
        kmed_buf_json_str(y->out, v.data ? v.data : "", v.len);
        kmed_buf_free(&v);
        return KMED_OK;
    }
    if (len && (s[0] == '[' || s[0] == '{' || s[0] == '&' || s[0] == '*' || s[0] == '|' ||
                s[0] == '>'))
        return kmed__mg_yerr(y, line, "flow collections, anchors and block scalars are not "
                             "supported in a merge config");
    if ((len == 4 && (!memcmp(s, "true", 4) || !memcmp(s, "True", 4))) ||
        (len == 5 && (!memcmp(s, "false", 5) || !memcmp(s, "False", 5)))) {
        kmed_buf_puts(y->out, (s[0] == 't' || s[0] == 'T') ? "true" : "false");
        return KMED_OK;
    }
    if (len == 0 || (len == 4 && !memcmp(s, "null", 4)) || (len == 1 && s[0] == '~')) {
        kmed_buf_puts(y->out, "null");
        return KMED_OK;
    }
    if (len < sizeof tmp) {
        char *end;
        double d;
        memcpy(tmp, s, len);
        tmp[len] = 0;
        d = strtod(tmp, &end);
        if (end == tmp + len && isfinite(d) && ((tmp[0] >= '0' && tmp[0] <= '9') ||
                                                tmp[0] == '-' || tmp[0] == '+' || tmp[0] == '.')) {
            if (d == floor(d) && fabs(d) < 9e15 && !strpbrk(tmp, ".eE"))
                kmed_buf_printf(y->out, "%.0f", d);
            else
                kmed_buf_printf(y->out, "%.17g", d);
            return KMED_OK;
        }
    }
    kmed_buf_json_str(y->out, s, len);
    return KMED_OK;
}

/* Position of the ':' that ends a mapping key in s (outside quotes), or -1. */
static long kmed__mg_ykey(const char *s, size_t len)
{
    size_t i = 0;
    if (len && (s[0] == '"' || s[0] == '\'')) {
        for (i = 1; i < len && s[i] != s[0]; i++) {}
        i++;
    }
    for (; i < len; i++)
        if (s[i] == ':' && (i + 1 == len || s[i + 1] == ' ')) return (long)i;
    return -1;
}

static kmed_result kmed__mg_yblock(kmed__mg_yaml *y, size_t indent);

static kmed_result kmed__mg_ymap(kmed__mg_yaml *y, size_t indent)
{
    int first = 1;
    kmed_result r;
    kmed_buf_puts(y->out, "{");
    while (y->pos < y->n && y->ln[y->pos].indent == indent) {
        kmed__mg_yline *l = &y->ln[y->pos];
        long c = kmed__mg_ykey(l->s, l->len);
        const char *v;
        size_t vlen, ks = 0, kl;
        if (l->len >= 1 && l->s[0] == '-' && (l->len == 1 || l->s[1] == ' ')) break;
        if (c < 0) return kmed__mg_yerr(y, l->line, "expected 'key: value'");
        kl = (size_t)c;
        while (kl > 0 && l->s[kl - 1] == ' ') kl--;
        if (!first) kmed_buf_puts(y->out, ",");
        first = 0;
        if (kl >= 2 && (l->s[0] == '"' || l->s[0] == '\'')) { ks = 1; kl -= 2; }
        kmed_buf_json_str(y->out, l->s + ks, kl);
        kmed_buf_puts(y->out, ":");
        v = l->s + c + 1;
        vlen = l->len - (size_t)c - 1;
        while (vlen && *v == ' ') { v++; vlen--; }
        y->pos++;
        if (vlen) {
            if ((r = kmed__mg_yscalar(y, v, vlen, l->line)) != KMED_OK) return r;
        } else if (y->pos < y->n && (y->ln[y->pos].indent > indent ||
                                     (y->ln[y->pos].indent == indent &&
                                      y->ln[y->pos].s[0] == '-'))) {
            if ((r = kmed__mg_yblock(y, y->ln[y->pos].indent)) != KMED_OK) return r;
        } else {
            kmed_buf_puts(y->out, "null");
        }
    }
    if (y->pos < y->n && y->ln[y->pos].indent > indent)
        return kmed__mg_yerr(y, y->ln[y->pos].line, "unexpected indentation");
    kmed_buf_puts(y->out, "}");
    return KMED_OK;
}

static kmed_result kmed__mg_yseq(kmed__mg_yaml *y, size_t indent)
{
    int first = 1;
    kmed_result r;
    kmed_buf_puts(y->out, "[");
    while (y->pos < y->n && y->ln[y->pos].indent == indent) {
        kmed__mg_yline *l = &y->ln[y->pos];
        size_t skip = 1;
        if (!(l->s[0] == '-' && (l->len == 1 || l->s[1] == ' '))) break;
        if (!first) kmed_buf_puts(y->out, ",");
        first = 0;
        while (skip < l->len && l->s[skip] == ' ') skip++;
        if (skip >= l->len) { /* "-" alone: the item is the indented block below */
            y->pos++;
            if (y->pos < y->n && y->ln[y->pos].indent > indent) {
                if ((r = kmed__mg_yblock(y, y->ln[y->pos].indent)) != KMED_OK) return r;
            } else {
                kmed_buf_puts(y->out, "null");
            }
        } else if (kmed__mg_ykey(l->s + skip, l->len - skip) >= 0) {
            /* "- key: v": a mapping whose first line starts after the dash */
            l->s += skip;
            l->len -= skip;
            l->indent += skip;
            if ((r = kmed__mg_ymap(y, l->indent)) != KMED_OK) return r;
        } else {
            y->pos++;
            if ((r = kmed__mg_yscalar(y, l->s + skip, l->len - skip, l->line)) != KMED_OK)
                return r;
        }
    }
    kmed_buf_puts(y->out, "]");
    return KMED_OK;
}

static kmed_result kmed__mg_yblock(kmed__mg_yaml *y, size_t indent)
{
    kmed_result r;
    const kmed__mg_yline *l = &y->ln[y->pos];
    if (++y->depth > 64) return kmed__mg_yerr(y, l->line, "nesting too deep");
    if (l->s[0] == '-' && (l->len == 1 || l->s[1] == ' ')) r = kmed__mg_yseq(y, indent);
    else if (kmed__mg_ykey(l->s, l->len) >= 0) r = kmed__mg_ymap(y, indent);
    else {
        y->pos++;
        r = kmed__mg_yscalar(y, l->s, l->len, l->line);
    }
    y->depth--;
    return r;
}

/* Converts YAML text to JSON text in out. */
static kmed_result kmed__mg_yaml_to_json(const char *text, size_t len, const char *name,
                                         kmed_buf *out, kmed_error *err)
{
    kmed__mg_yaml y;
    size_t i = 0, line = 0, cap = 16;
    kmed_result r;
    memset(&y, 0, sizeof y);
    y.out = out;
    y.name = name;
    y.err = err;
    y.ln = (kmed__mg_yline *)kmed__calloc(cap, sizeof *y.ln);
    if (!y.ln) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    while (i < len) {
        size_t b = i, e, ind = 0, k;
        int q = 0;
        line++;
        while (i < len && text[i] != '\n') i++;
        e = i;
        if (i < len) i++;
        if (e > b && text[e - 1] == '\r') e--;
        while (b + ind < e && text[b + ind] == ' ') ind++;
        if (b + ind < e && text[b + ind] == '\t') {
            KMED_FREE(y.ln);
            return kmed_error_set(err, KMED_ERR_FORMAT, name, line, (size_t)-1,
                                  "tabs cannot indent YAML");
        }
        /* strip a comment: '#' at the start or after a space, outside quotes */
        for (k = b + ind; k < e; k++) {
            if (q) { if (text[k] == q) q = 0; }
            else if (text[k] == '"' || text[k] == '\'') {
                if (k == b + ind || text[k - 1] == ' ') q = text[k];
            } else if (text[k] == '#' && (k == b + ind || text[k - 1] == ' ')) break;
        }
        e = k;
        while (e > b + ind && text[e - 1] == ' ') e--;
        if (e == b + ind) continue;
        if (ind == 0 && e - b >= 3 && !memcmp(text + b, "---", 3)) continue;
        if (e - b >= 3 && ind == 0 && !memcmp(text + b, "...", 3)) break;
        if (y.n == cap) {
            kmed__mg_yline *nl = (kmed__mg_yline *)KMED_REALLOC(y.ln, 2 * cap * sizeof *nl);
            if (!nl) {
                KMED_FREE(y.ln);
                return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
            }
            y.ln = nl;
            cap *= 2;
        }
        y.ln[y.n].indent = ind;
        y.ln[y.n].s = text + b + ind;
        y.ln[y.n].len = e - b - ind;
        y.ln[y.n].line = line;
        y.n++;
    }
    if (y.n == 0) {
        KMED_FREE(y.ln);
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "empty merge config");
    }
    r = kmed__mg_yblock(&y, y.ln[0].indent);
    if (r == KMED_OK && y.pos < y.n)
        r = kmed__mg_yerr(&y, y.ln[y.pos].line, "unexpected indentation");
    if (r == KMED_OK && out->failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    KMED_FREE(y.ln);
    return r;
}

KMED_API kmed_result kmed_merge_config_parse(kmed_merge_config *cfg, const char *text,
                                             size_t len, const char *name, kmed_error *err)
{
    kmed__mg_owned *o;
    kmed_json_doc doc;
    kmed_buf js = {0};
    kmed_result r;
    size_t i = 0;
    memset(cfg, 0, sizeof *cfg);
    memset(&doc, 0, sizeof doc);
    o = (kmed__mg_owned *)kmed__calloc(1, sizeof *o);
    if (!o) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    cfg->impl_ = o;
    while (i < len && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t'))
        i++;
    if (i < len && text[i] == '{') {
        r = kmed_json_parse(&doc, text, len, name, 1, err);
    } else {
        r = kmed__mg_yaml_to_json(text, len, name, &js, err);
        if (r == KMED_OK) r = kmed_json_parse(&doc, js.data, js.len, name, 0, err);
    }
    if (r == KMED_OK) r = kmed__mg_from_json(cfg, o, doc.root, name, err);
    kmed_json_free(&doc);
    kmed_buf_free(&js);
    if (r != KMED_OK) kmed_merge_config_free(cfg);
    return r;
}

KMED_API kmed_result kmed_merge_config_load(kmed_merge_config *cfg, const char *path,
                                            kmed_error *err)
{
    char *text = NULL;
    size_t len = 0;
    kmed_result r;
    memset(cfg, 0, sizeof *cfg);
    if ((r = kmed_file_read(path, (size_t)16 << 20, &text, &len, err)) != KMED_OK) return r;
    r = kmed_merge_config_parse(cfg, text, len, path, err);
    kmed_free(text);
    return r;
}

/* ---- in-memory tensors ---- */

static kmed_result kmed__mg_mem_read(void *ctx, size_t off, size_t n, float *dst,
                                     kmed_error *err)
{
    (void)err;
    memcpy(dst, (const float *)ctx + off, n * sizeof *dst);
    return KMED_OK;
}

static void kmed__mg_mem_emit(void *ctx, size_t off, size_t n, const float *v)
{
    memcpy((float *)ctx + off, v, n * sizeof *v);
}

KMED_API kmed_result kmed_merge_tensor(const kmed_merge_config *cfg, uint64_t tensor_key,
                                       float *out, const float *base,
                                       const float *const *xs, size_t n, kmed_error *err)
{
    kmed__mg_plan p;
    kmed__mg_work wk;
    kmed__mg_reader rb, *rx;
    kmed_result r;
    size_t i;
    if (!cfg || !out || (!xs && cfg->n_models))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: missing tensor arguments");
    if (cfg->method != KMED_MERGE_LINEAR && !base)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: %s needs a base tensor",
                         kmed_merge_method_name(cfg->method));
    if ((r = kmed_merge_config_validate(cfg, err)) != KMED_OK) return r;
    if ((r = kmed__mg_plan_init(&p, cfg, NULL, err)) != KMED_OK) return r;
    rx = (kmed__mg_reader *)kmed__calloc(p.n + 1, sizeof *rx);
    if (!rx) {
        kmed__mg_plan_free(&p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    }
    if ((r = kmed__mg_work_init(&wk, &p, err)) != KMED_OK) {
        KMED_FREE(rx);
        kmed__mg_plan_free(&p);
        return r;
    }
    rb.read = kmed__mg_mem_read;
    rb.ctx = (void *)base;
    for (i = 0; i < p.n; i++) {
        rx[i].read = kmed__mg_mem_read;
        rx[i].ctx = (void *)xs[i];
    }
    r = kmed__mg_tensor_run(&p, tensor_key, n, &rb, rx, kmed__mg_mem_emit, out, &wk, err);
    kmed__mg_work_free(&wk);
    KMED_FREE(rx);
    kmed__mg_plan_free(&p);
    return r;
}

/* ---- merging checkpoints on disk ---- */

/* HF names of the LoRA targets, in KMED_LORA_* order. */
static const char *const kmed__mg_lin[KMED_LORA_NTARGETS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
};

/* KMED_LORA_* target of "model.layers.N.<module>.weight" (layer in *layer), or -1. */
static int kmed__mg_target_of(const char *name, int *layer)
{
    const char *s = name + 13;
    long l = 0;
    int t, digits = 0;
    if (strncmp(name, "model.layers.", 13) != 0) return -1;
    while (*s >= '0' && *s <= '9' && digits < 6) { l = l * 10 + (*s++ - '0'); digits++; }
    if (!digits || *s++ != '.') return -1;
    for (t = 0; t < KMED_LORA_NTARGETS; t++) {
        size_t n = strlen(kmed__mg_lin[t]);
        if (strncmp(s, kmed__mg_lin[t], n) == 0 && strcmp(s + n, ".weight") == 0) {
            *layer = (int)l;
            return t;
        }
    }
    return -1;
}

/* One input: safetensors of an HF directory, optionally with a PEFT adapter merged on the
   fly through a model shell whose weights point into those same mapped tensors. */
typedef struct kmed__mg_src {
    const char *spec;
    char dir[1024], adapter[1024];
    kmed_st st;
    int st_ok, m_ok, lora_ok;
    kmed_gemma m;
    kmed_lora lora;
    const kmed_tensor_info *t;   /* tensor being read */
    float *adapted;              /* (rows, cols) W + scale B A of t, or NULL */
    size_t released;             /* bytes of t given back so far */
} kmed__mg_src;

static void kmed__mg_src_close(kmed__mg_src *s)
{
    KMED_FREE(s->adapted);
    s->adapted = NULL;
#ifndef KMED_NO_TRAIN
    if (s->lora_ok) kmed_lora_free(&s->lora);
#endif
    if (s->m_ok) kmed_gemma_free(&s->m);
    if (s->st_ok) kmed_st_close(&s->st);
    s->st_ok = s->m_ok = s->lora_ok = 0;
}

static int kmed__mg_has_file(const char *dir, const char *name)
{
    char p[1200];
    struct stat sb;
    if (kmed_path_join(p, sizeof p, dir, name, NULL) != KMED_OK) return 0;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Points the shell's weights at the tensors of s->st (shapes checked by kmed_lora_load). */
static kmed_result kmed__mg_src_shell(kmed__mg_src *s, kmed_error *err)
{
    kmed_gemma_config gc;
    kmed_result r;
    int l, t;
    char name[160];
    if ((r = kmed_gemma_config_load(&gc, s->dir, err)) != KMED_OK) return r;
    if ((r = kmed_gemma_init(&s->m, &gc, err)) != KMED_OK) return r;
    s->m_ok = 1;
    for (l = -1; l < gc.n_layers; l++) {
        for (t = l < 0 ? KMED_LORA_NTARGETS - 1 : 0; t < KMED_LORA_NTARGETS; t++) {
            kmed_weight *w = l < 0 ? &s->m.embed : &(&s->m.layers[l].q)[t];
            const kmed_tensor_info *ti;
            if (l < 0) snprintf(name, sizeof name, "model.embed_tokens.weight");
            else snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, kmed__mg_lin[t]);
            ti = kmed_st_find(&s->st, name);
            if (!ti) return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->dir, "no tensor %s", name);
            if (ti->ndim != 2 || !kmed_dtype_computable(ti->dtype))
                return KMED__ERRF(err, KMED_ERR_SHAPE, s->dir, "%s is not a 2-D float tensor",
                                  name);
            w->data = ti->data;
            w->type = ti->dtype;
            w->rows = (size_t)ti->shape[0];
            w->cols = (size_t)ti->shape[1];
        }
    }
    return KMED_OK;
}

/* Opens "DIR", an adapter directory (on base_dir) or "DIR+ADAPTER". */
static kmed_result kmed__mg_src_open(kmed__mg_src *s, const char *spec, const char *base_dir,
                                     kmed_error *err)
{
    kmed_result r;
    memset(s, 0, sizeof *s);
    s->spec = spec;
    if (strlen(spec) >= sizeof s->dir)
        return KMED__ERR(err, KMED_ERR_LIMIT, "merge: path too long: %s", spec);
    if (kmed_is_dir(spec)) {
        if (kmed__mg_has_file(spec, "adapter_config.json")) {
            if (!base_dir)
                return KMED__ERRF(err, KMED_ERR_ARG, spec, "a PEFT adapter needs a plain HF "
                                  "base_model to merge into (or write BASE+ADAPTER)");
            snprintf(s->adapter, sizeof s->adapter, "%s", spec);
            snprintf(s->dir, sizeof s->dir, "%s", base_dir);
        } else {
            snprintf(s->dir, sizeof s->dir, "%s", spec);
        }
    } else {
        const char *plus = strchr(spec, '+');
        while (plus) {
            snprintf(s->dir, sizeof s->dir, "%.*s", (int)(plus - spec), spec);
            if (kmed_is_dir(s->dir)) break;
            plus = strchr(plus + 1, '+');
        }
        if (!plus)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, spec, "no such model directory");
        snprintf(s->adapter, sizeof s->adapter, "%s", plus + 1);
        if (!kmed__mg_has_file(s->adapter, "adapter_config.json"))
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->adapter, "not a PEFT adapter "
                              "directory (no adapter_config.json)");
    }
    if ((r = kmed_st_open(&s->st, s->dir, err)) != KMED_OK) return r;
    s->st_ok = 1;
    if (s->adapter[0]) {
#ifdef KMED_NO_TRAIN
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, s->adapter, "adapters need the train "
                          "module (built with KMED_NO_TRAIN)");
#else
        if ((r = kmed__mg_src_shell(s, err)) != KMED_OK) return r;
        if ((r = kmed_lora_load(&s->lora, &s->m, s->adapter, err)) != KMED_OK) return r;
        s->lora_ok = 1;
#endif
    }
    return KMED_OK;
}

/* Makes tensor `name` current: an adapted target is merged whole (f32) here. */
static kmed_result kmed__mg_src_begin(kmed__mg_src *s, const char *name, kmed_error *err)
{
    int layer = -1, t;
    s->t = kmed_st_find(&s->st, name);
    s->released = 0;
    if (!s->t) return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->dir, "no tensor %s", name);
#ifndef KMED_NO_TRAIN
    t = s->lora_ok ? kmed__mg_target_of(name, &layer) : -1;
    if (t >= 0 && layer < s->lora.n_layers && (s->lora.targets & (1u << t)) &&
        s->lora.ab[layer][t].A) {
        kmed_result r;
        size_t n = (size_t)kmed_tensor_numel(s->t);
        s->adapted = (float *)kmed__calloc(n ? n : 1, sizeof(float));
        if (!s->adapted)
            return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for %s", name);
        r = kmed_lora_merged_weight(&s->m, &s->lora, layer, t, s->adapted, err);
        kmed__release_pages(s->t->data, s->t->nbytes);
        if (r != KMED_OK) return r;
    }
#else
    (void)t;
    (void)layer;
#endif
    return KMED_OK;
}

static void kmed__mg_src_end(kmed__mg_src *s)
{
    KMED_FREE(s->adapted);
    s->adapted = NULL;
    if (s->t) kmed__release_pages(s->t->data, s->t->nbytes);
    s->t = NULL;
}

static kmed_result kmed__mg_src_read(void *ctx, size_t off, size_t n, float *dst,
                                     kmed_error *err)
{
    kmed__mg_src *s = (kmed__mg_src *)ctx;
    size_t es, end;
    (void)err;
    if (s->adapted) {
        memcpy(dst, s->adapted + off, n * sizeof *dst);
        return KMED_OK;
    }
    es = kmed_dtype_bytes(s->t->dtype, 1);
    kmed_dequantize_row(s->t->dtype, (const unsigned char *)s->t->data + off * es, dst, n);
    if (off == 0) s->released = 0; /* a new pass over the tensor */
    end = (off + n) * es;
    if (end - s->released >= ((size_t)8 << 20)) {
        kmed__release_pages((const unsigned char *)s->t->data + s->released, end - s->released);
        s->released = end;
    }
    return KMED_OK;
}

static int kmed__mg_float(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_BF16 || t == KMED_F16;
}

static int kmed__mg_skip_name(const char *name)
{
    return strcmp(name, "lm_head.weight") == 0; /* Gemma-2 ties it to the embedding */
}

static void kmed__mg_shape_str(const kmed_tensor_info *t, char *out, size_t cap)
{
    int i;
    size_t n = 0;
    n += (size_t)snprintf(out, cap, "[");
    for (i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%llu", i ? ", " : "",
                              (unsigned long long)t->shape[i]);
    if (n < cap) snprintf(out + n, cap - n, "]");
}

/* Every input holds exactly the reference's tensors, with its shapes, in float dtypes. */
static kmed_result kmed__mg_check(const kmed__mg_src *ref, const kmed__mg_src *s,
                                  kmed_error *err)
{
    size_t i;
    for (i = 0; i < ref->st.n_tensors; i++) {
        const kmed_tensor_info *a = &ref->st.tensors[i], *b;
        char sa[96], sb[96];
        if (kmed__mg_skip_name(a->name)) continue;
        if (!kmed__mg_float(a->dtype))
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, ref->spec, "tensor %s is %s; only "
                              "F32, BF16 and F16 tensors can be merged", a->name,
                              kmed_dtype_name(a->dtype));
        if (s == ref) continue;
        b = kmed_st_find(&s->st, a->name);
        if (!b)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->spec, "no tensor %s (the reference "
                              "model %s has it): not the same architecture", a->name, ref->spec);
        if (!kmed__mg_float(b->dtype))
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, s->spec, "tensor %s is %s; only F32, "
                              "BF16 and F16 tensors can be merged", b->name,
                              kmed_dtype_name(b->dtype));
        if (a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape) != 0) {
            kmed__mg_shape_str(b, sb, sizeof sb);
            kmed__mg_shape_str(a, sa, sizeof sa);
            return KMED__ERRF(err, KMED_ERR_SHAPE, s->spec, "tensor %s has shape %s, the "
                              "reference model %s has %s", a->name, sb, ref->spec, sa);
        }
    }
    for (i = 0; s != ref && i < s->st.n_tensors; i++) {
        const char *nm = s->st.tensors[i].name;
        if (!kmed__mg_skip_name(nm) && !kmed_st_find(&ref->st, nm))
            return KMED__ERRF(err, KMED_ERR_SHAPE, s->spec, "has tensor %s that the reference "
                              "model %s lacks: not the same architecture", nm, ref->spec);
    }
    return KMED_OK;
}

/* Output conversion of merged chunks into the whole output tensor. */
typedef struct kmed__mg_outbuf {
    unsigned char *data;
    kmed_dtype dtype;
    size_t es;
} kmed__mg_outbuf;

static void kmed__mg_out_emit(void *ctx, size_t off, size_t n, const float *v)
{
    kmed__mg_outbuf *o = (kmed__mg_outbuf *)ctx;
    kmed_quantize_row(o->dtype, v, o->data + off * o->es, n);
}

static kmed_result kmed__mg_copy_file(const char *sdir, const char *ddir, const char *name,
                                      kmed_error *err)
{
    char sp[1200], dp[1200];
    char *data = NULL;
    size_t len = 0;
    kmed_result r;
    if (!kmed__mg_has_file(sdir, name)) return KMED_OK;
    if ((r = kmed_path_join(sp, sizeof sp, sdir, name, err)) != KMED_OK) return r;
    if ((r = kmed_path_join(dp, sizeof dp, ddir, name, err)) != KMED_OK) return r;
    if ((r = kmed_file_read(sp, 0, &data, &len, err)) != KMED_OK) return r;
    r = kmed_file_write_atomic(dp, data, len, err);
    kmed_free(data);
    return r;
}

/* config.json of the reference with torch_dtype set to the output dtype. */
static kmed_result kmed__mg_write_config(const char *sdir, const char *ddir, kmed_dtype dt,
                                         kmed_error *err)
{
    char sp[1200], dp[1200];
    char *text = NULL;
    size_t len = 0;
    kmed_buf b = {0};
    kmed_result r;
    const char *k, *q1, *q2 = NULL;
    if ((r = kmed_path_join(sp, sizeof sp, sdir, "config.json", err)) != KMED_OK) return r;
    if ((r = kmed_path_join(dp, sizeof dp, ddir, "config.json", err)) != KMED_OK) return r;
    if ((r = kmed_file_read(sp, (size_t)16 << 20, &text, &len, err)) != KMED_OK) return r;
    k = strstr(text, "\"torch_dtype\"");
    q1 = k ? strchr(k + 13, '"') : NULL;
    if (q1) q2 = strchr(q1 + 1, '"');
    if (q2) {
        kmed_buf_put(&b, text, (size_t)(q1 + 1 - text));
        kmed_buf_puts(&b, dt == KMED_BF16 ? "bfloat16" : dt == KMED_F16 ? "float16" : "float32");
        kmed_buf_put(&b, q2, len - (size_t)(q2 - text));
    } else {
        kmed_buf_put(&b, text, len);
    }
    kmed_free(text);
    if (b.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    else r = kmed_file_write_atomic(dp, b.data, b.len, err);
    kmed_buf_free(&b);
    return r;
}

static const char *const kmed__mg_side_files[5] = {
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json"
};

/* Removes a file of dir, if there. */
static void kmed__mg_unlink(const char *dir, const char *name)
{
    char p[1200];
    if (kmed_path_join(p, sizeof p, dir, name, NULL) == KMED_OK) remove(p);
}

typedef struct kmed__mg_ctx {
    const kmed_merge_config *cfg;
    kmed__mg_src *srcs;          /* [n_src]: the base (when any) first, then the models */
    size_t n_src;
    kmed__mg_src *ref, *base;    /* base NULL for linear (not read) */
    kmed__mg_src **xs;           /* [plan.n] sources of the mixed models */
    kmed__mg_plan plan;
    kmed__mg_work wk;
    kmed__mg_reader rb, *rx;
    double bytes_in;             /* input tensor bytes read (once per tensor) */
} kmed__mg_ctx;

/* Merges tensor `t` of the reference into buf (numel x dtype). */
static kmed_result kmed__mg_one(kmed__mg_ctx *c, const kmed_tensor_info *t, kmed_dtype dt,
                                unsigned char *buf, kmed_error *err)
{
    kmed__mg_outbuf ob;
    kmed_result r = KMED_OK;
    size_t i, numel = (size_t)kmed_tensor_numel(t);
    ob.data = buf;
    ob.dtype = dt;
    ob.es = kmed_dtype_bytes(dt, 1);
    if (c->base) r = kmed__mg_src_begin(c->base, t->name, err);
    for (i = 0; i < c->plan.n && r == KMED_OK; i++)
        r = kmed__mg_src_begin(c->xs[i], t->name, err);
    if (r == KMED_OK)
        r = kmed__mg_tensor_run(&c->plan, kmed_merge_tensor_key(t->name), numel, &c->rb, c->rx,
                                kmed__mg_out_emit, &ob, &c->wk, err);
    if (c->base) {
        c->bytes_in += c->base->t ? (double)c->base->t->nbytes : 0;
        kmed__mg_src_end(c->base);
    }
    for (i = 0; i < c->plan.n; i++) {
        c->bytes_in += c->xs[i]->t ? (double)c->xs[i]->t->nbytes : 0;
        kmed__mg_src_end(c->xs[i]);
    }
    return r;
}

/* Writes the merged HF directory. */
static kmed_result kmed__mg_write_hf(kmed__mg_ctx *c, const char *dir, kmed_dtype dt,
                                     size_t max_shard, const kmed_callbacks *cb,
                                     kmed_error *err)
{
    static const char *const mk[1] = {"format"}, *const mv[1] = {"pt"};
    const kmed__mg_src *ref = c->ref;
    size_t n = 0, i, j, n_shards = 1, cur = 0, total = 0, done = 0, es = kmed_dtype_bytes(dt, 1);
    kmed_tensor_info *ti = NULL;
    size_t *shard_of = NULL;
    kmed_buf idx = {0};
    kmed_result r = KMED_OK;
    char path[1200], fname[64];
    double t0 = kmed_time_now();

    if ((r = kmed_mkdir_p(dir, err)) != KMED_OK) return r;
    /* a crash mid-way must not leave an old config.json (the completeness mark) or an old
       index that would point readers at stale shards */
    kmed__mg_unlink(dir, "config.json");
    kmed__mg_unlink(dir, "model.safetensors.index.json");
    kmed__mg_unlink(dir, "model.safetensors");
    ti = (kmed_tensor_info *)kmed__calloc(ref->st.n_tensors + 1, sizeof *ti);
    shard_of = (size_t *)kmed__calloc(ref->st.n_tensors + 1, sizeof *shard_of);
    if (!ti || !shard_of) { r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory"); goto done; }
    for (i = 0; i < ref->st.n_tensors; i++) {
        const kmed_tensor_info *a = &ref->st.tensors[i];
        size_t nb;
        if (kmed__mg_skip_name(a->name)) {
            kmed_log(cb, KMED_LOG_INFO, "merge: %s left out (tied to the embedding)", a->name);
            continue;
        }
        ti[n] = *a;
        ti[n].dtype = dt;
        ti[n].data = NULL;
        if (!kmed__mul_ok((size_t)kmed_tensor_numel(a), es, &nb)) {
            r = KMED__ERR(err, KMED_ERR_LIMIT, "merge: tensor %s too large", a->name);
            goto done;
        }
        ti[n].nbytes = nb;
        if (max_shard && cur > 0 && cur + nb > max_shard) { n_shards++; cur = 0; }
        cur += nb;
        total += nb;
        shard_of[n] = n_shards - 1;
        n++;
    }
    kmed_buf_printf(&idx, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n"
                          "  \"weight_map\": {\n", total);
    for (j = 0, i = 0; j < n_shards && r == KMED_OK; j++) {
        size_t first = i, cnt, k;
        kmed_st_writer w;
        while (i < n && shard_of[i] == j) i++;
        cnt = i - first;
        if (n_shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
        else snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", j + 1, n_shards);
        if ((r = kmed_path_join(path, sizeof path, dir, fname, err)) != KMED_OK) break;
        if ((r = kmed_st_writer_open(&w, path, ti + first, cnt, mk, mv, 1, err)) != KMED_OK)
            break;
        for (k = first; k < i && r == KMED_OK; k++) {
            unsigned char *buf = (unsigned char *)KMED_MALLOC(ti[k].nbytes ? ti[k].nbytes : 1);
            if (!buf) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for %s (%zu bytes)",
                              ti[k].name, ti[k].nbytes);
                break;
            }
            r = kmed__mg_one(c, &ti[k], dt, buf, err);
            if (r == KMED_OK) r = kmed_st_writer_put(&w, buf, ti[k].nbytes, err);
            KMED_FREE(buf);
            kmed_progress(cb, "merge", (double)++done, (double)n, "tensors");
            kmed_buf_puts(&idx, "    ");
            kmed_buf_json_str(&idx, ti[k].name, strlen(ti[k].name));
            kmed_buf_puts(&idx, ": ");
            kmed_buf_json_str(&idx, fname, strlen(fname));
            kmed_buf_puts(&idx, k + 1 == n ? "\n" : ",\n");
        }
        if (r == KMED_OK) r = kmed_st_writer_commit(&w, err);
        else kmed_st_writer_abort(&w);
    }
    kmed_buf_puts(&idx, "  }\n}\n");
    if (r == KMED_OK && n_shards > 1) {
        if (idx.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
        else if ((r = kmed_path_join(path, sizeof path, dir, "model.safetensors.index.json",
                                     err)) == KMED_OK)
            r = kmed_file_write_atomic(path, idx.data, idx.len, err);
    }
    for (i = 0; i < 5 && r == KMED_OK; i++)
        r = kmed__mg_copy_file(ref->dir, dir, kmed__mg_side_files[i], err);
    if (r == KMED_OK) r = kmed__mg_write_config(ref->dir, dir, dt, err);
    if (r == KMED_OK)
        kmed_log(cb, KMED_LOG_INFO, "merge: %zu tensors, %.0f MB read, %.0f MB written in "
                 "%.1fs (%.2f GB/s)", n, c->bytes_in / 1e6, (double)total / 1e6,
                 kmed_time_now() - t0,
                 (c->bytes_in + (double)total) / 1e9 / (kmed_time_now() - t0 + 1e-9));
done:
    KMED_FREE(ti);
    KMED_FREE(shard_of);
    kmed_buf_free(&idx);
    return r;
}

/* Removes the temporary HF directory of a GGUF merge. */
static void kmed__mg_rm_tmp(const char *dir)
{
    size_t i;
    kmed__mg_unlink(dir, "model.safetensors");
    kmed__mg_unlink(dir, "config.json");
    for (i = 0; i < 5; i++) kmed__mg_unlink(dir, kmed__mg_side_files[i]);
    rmdir(dir);
}

static kmed_result kmed__mg_write_gguf(kmed__mg_ctx *c, const char *path,
                                       const kmed_merge_out *out, kmed_error *err)
{
    char tmp[1200];
    kmed_dtype mid = out->dtype == KMED_BF16 || out->dtype == KMED_F16 ? out->dtype : KMED_F32;
    kmed_gemma m;
    kmed_tok tok;
    int have_tok = 0;
    kmed_gguf_save_opts go;
    kmed_result r;
    if (snprintf(tmp, sizeof tmp, "%s.merge-tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return KMED__ERR(err, KMED_ERR_LIMIT, "merge: path too long: %s", path);
    r = kmed__mg_write_hf(c, tmp, mid, 0, &out->cb, err);
    memset(&m, 0, sizeof m);
    if (r == KMED_OK) r = kmed_gemma_load(&m, tmp, NULL, err);
    if (r == KMED_OK && (kmed__mg_has_file(c->ref->dir, "tokenizer.json") ||
                         kmed__mg_has_file(c->ref->dir, "tokenizer.model"))) {
        r = kmed_tok_load(&tok, c->ref->dir, err);
        have_tok = r == KMED_OK;
    }
    if (r == KMED_OK) {
        if (!have_tok)
            kmed_log(&out->cb, KMED_LOG_WARN, "merge: %s has no tokenizer; the GGUF gets no "
                     "tokenizer metadata", c->ref->dir);
        memset(&go, 0, sizeof go);
        go.type = out->dtype;
        go.mixed = out->mixed;
        go.name = out->name ? out->name : "kmed-merge";
        go.tokenizer_json = kmed__mg_has_file(c->ref->dir, "tokenizer.json") ? c->ref->dir
                                                                              : NULL;
        go.cb = out->cb;
        r = kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, path, &go, err);
    }
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&m);
    kmed__mg_rm_tmp(tmp);
    return r;
}

static int kmed__mg_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

KMED_API kmed_result kmed_merge_run(const kmed_merge_config *cfg, const char *out_path,
                                    const kmed_merge_out *out, kmed_error *err)
{
    kmed__mg_ctx c;
    kmed_merge_out def;
    unsigned char *skip = NULL;
    size_t i, k;
    kmed_result r;
    int lin;

    if (!out) { memset(&def, 0, sizeof def); out = &def; }
    if (!out_path || !*out_path) return KMED__ERR(err, KMED_ERR_ARG, "merge: no output path");
    if ((r = kmed_merge_config_validate(cfg, err)) != KMED_OK) return r;
    for (i = 0; i < cfg->n_models; i++)
        if (!cfg->models[i].model || !*cfg->models[i].model)
            return KMED__ERR(err, KMED_ERR_ARG, "merge: models[%zu] has no path", i);
    if (out->gguf ? !kmed_dtype_computable(out->dtype)
                  : (out->dtype != KMED_F32 && out->dtype != KMED_BF16 && out->dtype != KMED_F16))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge: cannot write %s %s",
                         out->gguf ? "GGUF" : "HF", kmed_dtype_name(out->dtype));
    lin = cfg->method == KMED_MERGE_LINEAR;
    memset(&c, 0, sizeof c);
    c.cfg = cfg;
    c.srcs = (kmed__mg_src *)kmed__calloc(cfg->n_models + 1, sizeof *c.srcs);
    c.xs = (kmed__mg_src **)kmed__calloc(cfg->n_models + 1, sizeof *c.xs);
    c.rx = (kmed__mg_reader *)kmed__calloc(cfg->n_models + 1, sizeof *c.rx);
    skip = (unsigned char *)kmed__calloc(cfg->n_models + 1, 1);
    if (!c.srcs || !c.xs || !c.rx || !skip) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
        goto done;
    }
    if (cfg->base_model) {
        if ((r = kmed__mg_src_open(&c.srcs[0], cfg->base_model, NULL, err)) != KMED_OK) {
            c.n_src = 1;
            goto done;
        }
        c.n_src = 1;
    }
    for (i = 0; i < cfg->n_models; i++) {
        const char *bd = c.n_src && !c.srcs[0].adapter[0] ? c.srcs[0].dir : NULL;
        if (!lin && kmed__mg_same_path(cfg->models[i].model, cfg->base_model)) {
            skip[i] = 1; /* mergekit: the base is no task vector of itself */
            continue;
        }
        r = kmed__mg_src_open(&c.srcs[c.n_src], cfg->models[i].model, bd, err);
        c.n_src++;
        if (r != KMED_OK) goto done;
    }
    if ((r = kmed__mg_plan_init(&c.plan, cfg, skip, err)) != KMED_OK) goto done;
    c.ref = &c.srcs[0];
    c.base = lin ? NULL : &c.srcs[0];
    for (i = 0, k = cfg->base_model ? 1 : 0; i < c.plan.n; i++, k++) c.xs[i] = &c.srcs[k];
    if (c.plan.n == 0) {
        r = KMED__ERR(err, KMED_ERR_ARG, "merge: no model besides the base to merge");
        goto done;
    }
    for (i = 0; i < c.n_src; i++) {
        if ((r = kmed__mg_check(c.ref, &c.srcs[i], err)) != KMED_OK) goto done;
        if (!out->gguf && kmed__mg_same_file(out_path, c.srcs[i].dir)) {
            r = KMED__ERR(err, KMED_ERR_ARG, "merge: the output %s is the input %s", out_path,
                          c.srcs[i].spec);
            goto done;
        }
    }
    c.rb.read = kmed__mg_src_read;
    c.rb.ctx = c.base;
    for (i = 0; i < c.plan.n; i++) {
        c.rx[i].read = kmed__mg_src_read;
        c.rx[i].ctx = c.xs[i];
    }
    if ((r = kmed__mg_work_init(&c.wk, &c.plan, err)) != KMED_OK) goto done;
    kmed_log(&out->cb, KMED_LOG_INFO, "merge: %s of %zu model%s%s%s, %zu tensors",
             kmed_merge_method_name(cfg->method), c.plan.n, c.plan.n == 1 ? "" : "s",
             c.base ? " onto " : "", c.base ? cfg->base_model : "", c.ref->st.n_tensors);
    if (out->gguf) r = kmed__mg_write_gguf(&c, out_path, out, err);
    else r = kmed__mg_write_hf(&c, out_path, out->dtype, out->max_shard_bytes, &out->cb, err);
done:
    for (i = 0; i < c.n_src; i++) kmed__mg_src_close(&c.srcs[i]);
    kmed__mg_work_free(&c.wk);
    kmed__mg_plan_free(&c.plan);
    KMED_FREE(c.srcs);
    KMED_FREE(c.xs);
    KMED_FREE(c.rx);
    KMED_FREE(skip);
    return r;
}

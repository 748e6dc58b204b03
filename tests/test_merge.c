/* test_merge: model merging. Each method against hand-computed results on small tensors
   (TIES trimming with ties at the threshold, sign election by sum and count, l1 rescale;
   DARE masks recovered and checked against the TIES rule, DARE's expectation over many
   seeds); a scalar sort-based reference for tensors spanning several chunks; mergekit
   JSON/YAML configs; three tiny random Gemma-2 models merged from disk vs a direct
   computation; shape/name mismatch errors; an adapter merged as an input equals
   kmed_gemma_save_hf with the adapter (what kmed-convert --merge writes); GGUF output
   (Q8_0, BF16, Q4_0 mixed, with a tokenizer, fine-tunes whose norms moved) byte-identical
   to converting the HF result, and streamed: the RSS of a GGUF merge and of converting a
   loaded model stays about a tensor; HF output replaced whole (a new shard layout leaves
   only the new files, a failed run leaves the old output, a killed run's temporary goes
   with the next run, non-model outputs and a base without config.json are refused before
   writing); lambda 0; DARE masks independent of listing the base; the warning when TIES
   keeps nothing. tests/merge_cli.sh checks the tool itself.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_merge.c -o build/test_merge \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>

#define TMP "build/test_merge_tmp"

/* Tolerance for results computed by the same f32 operations in another order of code:
   none is expected, a few ulps are allowed. */
#define TOL 1e-6
/* bf16 output: a compiler may contract a*b+c differently in the two codes, moving a value
   across a bf16 rounding boundary: one bf16 ulp of values ~0.05 */
#define TOL_BF16 3e-4
/* RSS a streamed write of the 32 MB (f32) model of gguf_checks may gain; see there */
#define RSS_SLACK 20e6

static kmed_merge_config mcfg(kmed_merge_method m, kmed_merge_model *mm, size_t n)
{
    kmed_merge_config c;
    memset(&c, 0, sizeof c);
    c.method = m;
    c.models = mm;
    c.n_models = n;
    c.base_model = m == KMED_MERGE_LINEAR ? NULL : "base";
    return c;
}

static void hand_methods(void)
{
    kmed_error e = {0};
    kmed_merge_model mm[3];
    kmed_merge_config c;
    float out[8];
    const float *xs[3];
    memset(mm, 0, sizeof mm);

    { /* linear */
        static const float x1[4] = {1, 2, 3, 4}, x2[4] = {3, -2, 1, 0};
        static const float want_n[4] = {2.5f, -1, 1.5f, 1}, want_u[4] = {7, -2, 5, 4};
        xs[0] = x1; xs[1] = x2;
        mm[0].weight = 1; mm[1].weight = 3;
        c = mcfg(KMED_MERGE_LINEAR, mm, 2);
        CHECK_OK(kmed_merge_tensor(&c, 0, out, NULL, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want_n, 4) < TOL, "linear normalized: %g",
               kmed_test_maxdiff(out, want_n, 4));
        mm[1].weight = 2;
        c.normalize = -1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, NULL, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want_u, 4) < TOL, "linear plain");
        mm[0].weight = 1; mm[1].weight = -1;
        c.normalize = 0;
        CHECK(kmed_merge_tensor(&c, 0, out, NULL, xs, 4, &e) == KMED_ERR_ARG);
    }
    { /* task arithmetic: d1 = [1,-1,0,2], d2 = [-1,2,0,0] */
        static const float b[4] = {1, 1, 1, 1}, x1[4] = {2, 0, 1, 3}, x2[4] = {0, 3, 1, 1};
        static const float want[4] = {0.5f, 2.5f, 1, 2};
        static const float want_n[4] = {2.0f / 3, 2, 1, 5.0f / 3};
        static const float want_l[4] = {1, 3, 1, 5};
        xs[0] = x1; xs[1] = x2;
        mm[0].weight = 0.5f; mm[1].weight = 1;
        c = mcfg(KMED_MERGE_TASK_ARITHMETIC, mm, 2);
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want, 4) < TOL, "task arithmetic");
        c.normalize = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want_n, 4) < TOL, "task arithmetic normalized");
        c.normalize = 0;
        c.lambda = 2;
        mm[0].weight = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want_l, 4) < TOL, "task arithmetic lambda 2");
        /* lambda 0 named explicitly gives the base; a 0 nobody set means the default 1 */
        c.lambda = 0;
        c.has_lambda = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, b, 4) == 0, "task arithmetic lambda 0");
        c.has_lambda = 0;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        {
            static const float want_1[4] = {1, 2, 1, 3};
            CHECKF(kmed_test_maxdiff(out, want_1, 4) < TOL, "task arithmetic lambda unset");
        }
        c.lambda = 2;
        /* density 1 DARE is task arithmetic */
        c.method = KMED_MERGE_DARE_LINEAR;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want_l, 4) < TOL, "dare_linear density 1");
        CHECK(kmed_merge_tensor(&c, 0, out, NULL, xs, 4, &e) == KMED_ERR_ARG);
    }
    { /* TIES: density 0.5 of 8 keeps 4 per model; d2 has |2| twice (index 0 and 5): the
         first in index order is kept */
        static const float b[8] = {0};
        static const float d1[8] = {4, -3, 2, -1, 0.5f, -0.5f, 6, 1};
        static const float d2[8] = {-2, -5, 1, 3, -1, 2, 1, -4};
        static const float want[8] = {4, -4, 2, 3, 0, 0, 6, -4};
        static const float want_w[8] = {4, -11.0f / 3, 2, 3, 0, 0, 6, -4};
        xs[0] = d1; xs[1] = d2;
        mm[0].weight = 1; mm[1].weight = 1;
        mm[0].density = 0.5f; mm[1].density = 0.5f;
        c = mcfg(KMED_MERGE_TIES, mm, 2);
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 8, &e));
        CHECKF(kmed_test_maxdiff(out, want, 8) < TOL, "ties: %g %g %g %g %g %g %g %g",
               out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]);
        mm[0].weight = 2;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 8, &e));
        CHECKF(kmed_test_maxdiff(out, want_w, 8) < TOL, "ties weighted");
        /* int8_mask changes nothing */
        c.int8_mask = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 8, &e));
        CHECKF(kmed_test_maxdiff(out, want_w, 8) == 0, "ties int8_mask");
        c.lambda = 0;
        c.has_lambda = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 8, &e));
        CHECKF(kmed_test_maxdiff(out, b, 8) == 0, "ties lambda 0");
    }
    { /* sign election: sum (+) vs count (-) */
        static const float b[1] = {0}, x1[1] = {5}, x2[1] = {-1}, x3[1] = {-1};
        xs[0] = x1; xs[1] = x2; xs[2] = x3;
        mm[0].weight = mm[1].weight = mm[2].weight = 1;
        mm[0].density = mm[1].density = mm[2].density = 1;
        c = mcfg(KMED_MERGE_TIES, mm, 3);
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 1, &e));
        CHECKF(out[0] == 5, "ties sum election: %g", out[0]);
        c.consensus_count = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 1, &e));
        CHECKF(out[0] == -1, "ties count election: %g", out[0]);
        c.consensus_count = 0;
        c.normalize = -1; /* no disjoint mean: the agreeing values summed */
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 1, &e));
        CHECKF(out[0] == 5, "ties unnormalized: %g", out[0]);
    }
    { /* TIES l1 rescale: keep 4 and -3 of [4,-1,2,-3]: x 10/7 */
        static const float b[4] = {1, 1, 1, 1}, x[4] = {5, 0, 3, -2};
        const float want[4] = {1 + 40.0f / 7, 1, 1, 1 - 30.0f / 7};
        xs[0] = x;
        mm[0].weight = 1; mm[0].density = 0.5f;
        c = mcfg(KMED_MERGE_TIES, mm, 1);
        c.rescale = 1;
        CHECK_OK(kmed_merge_tensor(&c, 0, out, b, xs, 4, &e));
        CHECKF(kmed_test_maxdiff(out, want, 4) < TOL, "ties l1 rescale");
    }
}

/* DARE: masks recovered from one-model runs; dare_ties with those masks by hand. */
static void dare_checks(void)
{
    enum { N = 1000, SEEDS = 400 };
    kmed_error e = {0};
    kmed_merge_model mm[2];
    kmed_merge_config c;
    static float b[N], x1[N], x2[N], o[N], o2[N], m1[N], m2[N], acc[N];
    const float *xs[2];
    kmed_rng rng;
    size_t i, kept = 0, diff = 0, bad = 0, s;
    double worst = 0, tot = 0;
    kmed_rng_seed(&rng, 42);
    for (i = 0; i < N; i++) {
        b[i] = (float)kmed_rng_normal(&rng);
        x1[i] = b[i] + (float)kmed_rng_normal(&rng);
        x2[i] = b[i] + (float)kmed_rng_normal(&rng);
    }
    memset(mm, 0, sizeof mm);
    mm[0].weight = 0.4f; mm[0].density = 0.53f;
    mm[1].weight = 0.6f; mm[1].density = 0.53f;
    c = mcfg(KMED_MERGE_DARE_LINEAR, mm, 2);
    c.seed = 7;
    /* model 0's mask: model 1 = base adds nothing; each element is b or b + w d / p */
    xs[0] = x1; xs[1] = b;
    CHECK_OK(kmed_merge_tensor(&c, 99, o, b, xs, N, &e));
    for (i = 0; i < N; i++) {
        float full = b[i] + 0.4f * ((x1[i] - b[i]) / 0.53f);
        m1[i] = o[i] == b[i] ? 0.0f : 1.0f;
        if (o[i] != b[i] && fabsf(o[i] - full) > 1e-5f) bad++;
        kept += o[i] != b[i];
    }
    CHECKF(bad == 0, "dare: %zu elements neither dropped nor rescaled", bad);
    CHECKF(kept > N * 0.45 && kept < N * 0.61, "dare kept %zu of %d at density 0.53", kept, N);
    xs[0] = b; xs[1] = x2;
    CHECK_OK(kmed_merge_tensor(&c, 99, o, b, xs, N, &e));
    for (i = 0; i < N; i++) m2[i] = o[i] == b[i] ? 0.0f : 1.0f;
    for (i = 0; i < N; i++) diff += m1[i] != m2[i];
    CHECKF(diff > N / 4, "dare: models get independent masks (%zu differ)", diff);
    /* same seed -> same result; another seed or tensor -> another mask */
    xs[0] = x1; xs[1] = x2;
    CHECK_OK(kmed_merge_tensor(&c, 99, o, b, xs, N, &e));
    CHECK_OK(kmed_merge_tensor(&c, 99, o2, b, xs, N, &e));
    CHECK(memcmp(o, o2, sizeof o) == 0);
    CHECK_OK(kmed_merge_tensor(&c, 98, o2, b, xs, N, &e));
    CHECK(memcmp(o, o2, sizeof o) != 0);
    /* dare_ties with the recovered masks, by the TIES rule (normalize off by default) */
    c.method = KMED_MERGE_DARE_TIES;
    CHECK_OK(kmed_merge_tensor(&c, 99, o, b, xs, N, &e));
    for (i = 0; i < N; i++) {
        float w1 = 0.4f * (m1[i] * ((x1[i] - b[i]) / 0.53f));
        float w2 = 0.6f * (m2[i] * ((x2[i] - b[i]) / 0.53f));
        float sgn = w1 + w2 >= 0 ? 1.0f : -1.0f, mix = 0;
        if ((w1 > 0 ? 1.0f : w1 < 0 ? -1.0f : 0.0f) == sgn) mix += w1;
        if ((w2 > 0 ? 1.0f : w2 < 0 ? -1.0f : 0.0f) == sgn) mix += w2;
        acc[i] = b[i] + mix;
    }
    CHECKF(kmed_test_maxdiff(o, acc, N) < TOL, "dare_ties vs masks by hand: %g",
           kmed_test_maxdiff(o, acc, N));
    /* expectation over many seeds: E[b + w d m / p] = b + w d */
    c.method = KMED_MERGE_DARE_LINEAR;
    xs[1] = b;
    memset(acc, 0, sizeof acc);
    for (s = 0; s < SEEDS; s++) {
        c.seed = 1000 + s;
        CHECK_OK(kmed_merge_tensor(&c, 5, o, b, xs, N, &e));
        for (i = 0; i < N; i++) acc[i] += o[i];
    }
    for (i = 0; i < N; i++) {
        double mean = acc[i] / SEEDS, want = b[i] + 0.4 * (x1[i] - b[i]);
        /* sd of one sample: 0.4 |d| sqrt(1/p - 1); of the mean: / sqrt(SEEDS) */
        double sd = 0.4 * fabs(x1[i] - b[i]) * sqrt(1 / 0.53 - 1) / sqrt((double)SEEDS);
        double z = sd > 0 ? fabs(mean - want) / sd : 0;
        if (z > worst) worst = z;
        tot += mean - want;
    }
    CHECKF(worst < 5.5, "dare expectation: worst element %.2f sd off", worst);
    CHECKF(fabs(tot / N) < 0.01, "dare expectation: mean bias %g", tot / N);
}

/* Scalar reference of ties/dare-free methods: sort-based top-k (ties in index order). */
static const float *g_abs;
static int cmp_mag(const void *a, const void *b)
{
    size_t i = *(const size_t *)a, j = *(const size_t *)b;
    if (g_abs[i] != g_abs[j]) return g_abs[i] > g_abs[j] ? -1 : 1;
    return i < j ? -1 : 1;
}

static void ref_merge(const kmed_merge_config *c, float *out, const float *b,
                      const float *const *xs, size_t n)
{
    size_t m = c->n_models, i, k;
    float **d = (float **)calloc(m, sizeof *d);
    float *mag = (float *)malloc(n * sizeof *mag);
    size_t *ord = (size_t *)malloc(n * sizeof *ord);
    int norm = c->normalize ? c->normalize > 0
                            : (c->method == KMED_MERGE_LINEAR || c->method == KMED_MERGE_TIES);
    float ws = 0;
    for (k = 0; k < m; k++) ws += c->models[k].weight;
    if (c->method == KMED_MERGE_LINEAR) {
        for (i = 0; i < n; i++) {
            float s = 0;
            for (k = 0; k < m; k++) s += c->models[k].weight * xs[k][i];
            out[i] = norm ? s / ws : s;
        }
        goto done;
    }
    for (k = 0; k < m; k++) {
        float dens = c->models[k].density > 0 ? c->models[k].density : 1;
        size_t keep = (size_t)floor((double)dens * (double)n), j;
        d[k] = (float *)malloc(n * sizeof(float));
        for (i = 0; i < n; i++) d[k][i] = xs[k][i] - b[i];
        if (c->method == KMED_MERGE_TIES && dens < 1) {
            for (i = 0; i < n; i++) { mag[i] = fabsf(d[k][i]); ord[i] = i; }
            g_abs = mag;
            qsort(ord, n, sizeof *ord, cmp_mag);
            for (j = keep; j < n; j++) d[k][ord[j]] = 0;
        }
        for (i = 0; i < n; i++) d[k][i] *= c->models[k].weight;
    }
    for (i = 0; i < n; i++) {
        float s = 0, mix = 0, dv = 0, sg;
        for (k = 0; k < m; k++) s += d[k][i];
        sg = s >= 0 ? 1.0f : -1.0f;
        for (k = 0; k < m; k++) {
            float v = d[k][i];
            if (c->method == KMED_MERGE_TIES) {
                if ((v > 0 ? 1.0f : v < 0 ? -1.0f : 0.0f) == sg) {
                    mix += v;
                    dv += c->models[k].weight;
                }
            } else {
                mix += v;
            }
        }
        if (c->method != KMED_MERGE_TIES) dv = fabsf(ws) < 1e-8f ? 1 : ws;
        if (dv == 0) dv = 1;
        if (norm) mix /= dv;
        out[i] = b[i] + mix;
    }
done:
    for (k = 0; k < m; k++) free(d[k]);
    free(d);
    free(mag);
    free(ord);
}

/* A tensor spanning several chunks, bf16-rounded so many magnitudes tie. */
static void chunked_vs_reference(void)
{
    enum { N = 200003 };
    kmed_error e = {0};
    kmed_merge_model mm[3];
    kmed_merge_config c;
    float *b = (float *)malloc(N * sizeof(float)), *x[3], *o = (float *)malloc(N * sizeof(float));
    float *r = (float *)malloc(N * sizeof(float));
    const float *xs[3];
    kmed_rng rng;
    size_t i, k;
    int method;
    kmed_rng_seed(&rng, 3);
    for (k = 0; k < 3; k++) x[k] = (float *)malloc(N * sizeof(float));
    for (i = 0; i < N; i++) {
        b[i] = kmed_bf16_to_f32(kmed_f32_to_bf16((float)(0.02 * kmed_rng_normal(&rng))));
        for (k = 0; k < 3; k++)
            x[k][i] = kmed_bf16_to_f32(
                kmed_f32_to_bf16(b[i] + (float)(0.001 * kmed_rng_normal(&rng))));
    }
    for (k = 0; k < 3; k++) xs[k] = x[k];
    memset(mm, 0, sizeof mm);
    mm[0].weight = 0.3f; mm[0].density = 0.53f;
    mm[1].weight = 0.5f; mm[1].density = 0.2f;
    mm[2].weight = 0.2f; mm[2].density = 0.9f;
    for (method = 0; method < 3; method++) {
        c = mcfg((kmed_merge_method)method, mm, 3);
        CHECK_OK(kmed_merge_tensor(&c, 1, o, b, xs, N, &e));
        ref_merge(&c, r, b, xs, N);
        CHECKF(kmed_test_maxdiff(o, r, N) < TOL, "%s over %d elements vs reference: %g",
               kmed_merge_method_name(c.method), N, kmed_test_maxdiff(o, r, N));
    }
    free(b); free(o); free(r);
    for (k = 0; k < 3; k++) free(x[k]);
}

static void config_checks(void)
{
    kmed_error e = {0};
    kmed_merge_config c;
    static const char *yaml =
        "# the published Korean medical Gemma-2 9B recipe\n"
        "models:\n"
        "  - model: google/gemma-2-9b-it\n"
        "    # no parameters necessary for base model\n"
        "  - model: rtzr/ko-gemma-2-9b-it\n"
        "    parameters:\n"
        "      density: 0.53\n"
        "      weight: 0.4\n"
        "  - model: \"med/ft\"  # quoted\n"
        "    parameters:\n"
        "      density: 0.53\n"
        "      weight: 0.6\n"
        "merge_method: dare_ties\n"
        "base_model: google/gemma-2-9b-it\n"
        "parameters:\n"
        "  int8_mask: true\n"
        "  lambda: 1.5\n"
        "dtype: bfloat16\n";
    static const char *json =
        "{\"merge_method\": \"ties\", \"base_model\": \"b\", \"parameters\": {\"normalize\": "
        "false, \"density\": 0.5, \"weight\": 0.25}, \"models\": [{\"model\": \"m1\"}, "
        "{\"model\": \"m2\", \"parameters\": {\"weight\": 0.75}}], \"out_dtype\": \"float32\","
        " \"dtype\": \"bfloat16\", \"random_seed\": 12}";
    static const char *seq_same_indent =
        "merge_method: linear\nmodels:\n- model: a\n  parameters:\n    weight: 1\n"
        "- model: b\n  parameters: {weight: 2}\n";
    CHECK_OK(kmed_merge_config_parse(&c, yaml, strlen(yaml), "cfg.yaml", &e));
    if (e.code == KMED_OK) {
        CHECK(c.method == KMED_MERGE_DARE_TIES);
        CHECK(c.n_models == 3 && !strcmp(c.base_model, "google/gemma-2-9b-it"));
        CHECK(!strcmp(c.models[2].model, "med/ft"));
        CHECK(c.models[1].weight == 0.4f && c.models[1].density == 0.53f);
        CHECK(c.models[2].weight == 0.6f && c.models[2].density == 0.53f);
        CHECK(c.int8_mask == 1 && c.lambda == 1.5f && c.normalize == 0);
        CHECK(c.has_dtype && c.dtype == KMED_BF16);
        kmed_merge_config_free(&c);
    }
    CHECK_OK(kmed_merge_config_parse(&c, json, strlen(json), "cfg.json", &e));
    if (e.code == KMED_OK) {
        CHECK(c.method == KMED_MERGE_TIES && c.normalize == -1 && c.seed == 12);
        CHECK(c.models[0].weight == 0.25f && c.models[0].density == 0.5f);
        CHECK(c.models[1].weight == 0.75f && c.models[1].density == 0.5f);
        CHECK(c.dtype == KMED_F32);
        kmed_merge_config_free(&c);
    }
    /* a sequence at its key's indent, and a flow mapping */
    CHECK_OK(kmed_merge_config_parse(&c, seq_same_indent, strlen(seq_same_indent), "s.yaml",
                                     &e));
    if (c.models) {
        CHECK(c.n_models == 2 && c.models[0].weight == 1 && c.models[1].weight == 2);
        kmed_merge_config_free(&c);
    }
    {   /* as PyYAML reads it: a BOM, flow collections, YAML 1.1 booleans, lambda 0 */
        static const char *y11 =
            "\xEF\xBB\xBF# saved by an editor that writes a BOM\n"
            "merge_method: dare_ties\n"
            "base_model: base\n"
            "models:\n"
            "  - model: base\n"
            "  - model: a\n"
            "    parameters: {weight: 0.4, density: 0.53}  # flow mapping\n"
            "  - {model: 'it''s', parameters: {weight: 0.6, \"density\": 0.5,}}\n"
            "parameters: {normalize: yes, int8_mask: On, rescale: no, lambda: 0}\n"
            "dtype: bfloat16\n";
        static const char *json_bom =
            "\xEF\xBB\xBF{\"merge_method\": \"linear\", \"models\": [{\"model\": \"a\", "
            "\"parameters\": {\"weight\": 1}}]}";
        CHECK_OK(kmed_merge_config_parse(&c, y11, strlen(y11), "y11.yaml", &e));
        if (c.models) {
            CHECK(c.method == KMED_MERGE_DARE_TIES && c.n_models == 3);
            CHECK(kmed_merge_n_mixed(&c) == 2);
            CHECK(c.models[1].weight == 0.4f && c.models[1].density == 0.53f);
            CHECK(!strcmp(c.models[2].model, "it's"));
            CHECK(c.models[2].weight == 0.6f && c.models[2].density == 0.5f);
            CHECK(c.normalize == 1 && c.int8_mask == 1 && c.rescale == -1);
            CHECK(c.has_lambda == 1 && c.lambda == 0);
            kmed_merge_config_free(&c);
        }
        CHECK_OK(kmed_merge_config_parse(&c, json_bom, strlen(json_bom), "bom.json", &e));
        kmed_merge_config_free(&c);
    }
    {   /* a top-level density outside (0, 1] is an error, as a model's is */
        static const char *d0 =
            "merge_method: ties\nbase_model: b\nparameters:\n  density: 0\nmodels:\n"
            "  - model: a\n    parameters:\n      weight: 1\n";
        CHECK(kmed_merge_config_parse(&c, d0, strlen(d0), "d0.yaml", &e) == KMED_ERR_FORMAT);
        CHECKF(strstr(e.msg, "parameters.density") != NULL, "%s", e.msg);
    }
    {   /* a flow collection must end on its line: the error names it */
        static const char *open_flow = "merge_method: linear\nmodels:\n  - model: a\n"
                                       "    parameters: {weight: 1,\n      density: 1}\n";
        CHECK(kmed_merge_config_parse(&c, open_flow, strlen(open_flow), "f.yaml", &e)
              == KMED_ERR_FORMAT);
        CHECKF(strstr(e.msg, "f.yaml:4") && strstr(e.msg, "unterminated"), "%s", e.msg);
    }
    {
        const char *ok = "merge_method: linear\nmodels:\n- model: a\n  parameters:\n"
                         "    weight: 1\n- model: b\n  parameters:\n    weight: 2\n";
        CHECK_OK(kmed_merge_config_parse(&c, ok, strlen(ok), "s.yaml", &e));
        CHECK(c.n_models == 2 && c.models[1].weight == 2 && c.base_model == NULL);
        kmed_merge_config_free(&c);
    }
    {
        const char *bad[] = {
            "merge_method: slerp\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n",
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n",
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n"
            "      weight: 1\n      density: 1.5\n",
            "merge_method: ties\nbase_model: b\nslices: 3\n",
            "merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n",
            "merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      weight: [1, 2]\n",
            "{\"merge_method\": \"linear\", \"models\": [{\"model\": \"a\", \"parameters\": "
            "{\"weight\": 1, \"gamma\": 0.1}}]}",
            "merge_method: linear\n  models: 3\n",
            "merge_method: ties\nbase_model: b\nparameters:\n  density: 1.5\nmodels:\n"
            "  - model: a\n    parameters:\n      weight: 1\n",
            "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1} x\n",
            "merge_method: linear\nmodels: [a,, b]\n",
            "merge_method: linear\nmodels:\n  - {model: a, parameters: {weight 1}}\n",
        };
        const kmed_result want[] = {KMED_ERR_UNSUPPORTED, KMED_ERR_FORMAT, KMED_ERR_FORMAT,
                                    KMED_ERR_UNSUPPORTED, KMED_ERR_ARG, KMED_ERR_FORMAT,
                                    KMED_ERR_UNSUPPORTED, KMED_ERR_FORMAT, KMED_ERR_FORMAT,
                                    KMED_ERR_FORMAT, KMED_ERR_FORMAT, KMED_ERR_FORMAT};
        size_t i;
        for (i = 0; i < sizeof bad / sizeof *bad; i++) {
            kmed_result r = kmed_merge_config_parse(&c, bad[i], strlen(bad[i]), "bad", &e);
            CHECKF(r == want[i], "bad config %zu: %s (%s)", i, kmed_result_str(r), e.msg);
        }
    }
}

/* Tiny Gemma-2 for disk tests. */
static kmed_gemma_config tiny_cfg(int inter)
{
    kmed_gemma_config g;
    memset(&g, 0, sizeof g);
    g.vocab_size = 512; g.hidden_size = 64; g.intermediate_size = inter; g.n_layers = 2;
    g.n_heads = 4; g.n_kv_heads = 2; g.head_dim = 16; g.query_pre_attn_scalar = 16;
    g.rms_norm_eps = 1e-6f; g.rope_theta = 10000; g.attn_softcap = 50; g.final_softcap = 30;
    g.sliding_window = 16; g.max_position = 8192; g.bos_id = 2; g.eos_id = 1; g.pad_id = 0;
    return g;
}

static float *read_tensor(const kmed_st *st, const char *name, size_t *n)
{
    const kmed_tensor_info *t = kmed_st_find(st, name);
    float *v;
    if (!t) return NULL;
    *n = (size_t)kmed_tensor_numel(t);
    v = (float *)malloc(*n * sizeof *v);
    kmed_dequantize_row(t->dtype, t->data, v, *n);
    return v;
}

/* Every tensor of the merged dir vs ref_merge (or kmed_merge_tensor for DARE) on the inputs.
   Returns the worst difference. */
static double compare_merge(const kmed_merge_config *c, const char *outdir, const char *base,
                            const char *const *models, int use_engine, kmed_dtype dt)
{
    kmed_error e = {0};
    kmed_st so, sb, sm[3];
    size_t i, k, n;
    double worst = 0;
    CHECK_OK(kmed_st_open(&so, outdir, &e));
    if (e.code != KMED_OK) return 1e9;
    CHECK_OK(kmed_st_open(&sb, base, &e));
    for (k = 0; k < c->n_models; k++) CHECK_OK(kmed_st_open(&sm[k], models[k], &e));
    CHECK(so.n_tensors == sb.n_tensors);
    for (i = 0; i < sb.n_tensors; i++) {
        const char *name = sb.tensors[i].name;
        float *b = read_tensor(&sb, name, &n), *x[3], *o, *want;
        const float *xs[3];
        const kmed_tensor_info *ot = kmed_st_find(&so, name);
        CHECKF(ot && ot->dtype == dt, "output tensor %s in %s", name, kmed_dtype_name(dt));
        if (!ot) continue;
        for (k = 0; k < c->n_models; k++) xs[k] = x[k] = read_tensor(&sm[k], name, &n);
        o = read_tensor(&so, name, &n);
        want = (float *)malloc(n * sizeof *want);
        if (use_engine) kmed_merge_tensor(c, kmed_merge_tensor_key(name), want, b, xs, n, &e);
        else ref_merge(c, want, b, xs, n);
        if (dt == KMED_BF16)
            for (k = 0; k < n; k++) want[k] = kmed_bf16_to_f32(kmed_f32_to_bf16(want[k]));
        if (kmed_test_maxdiff(o, want, n) > worst) worst = kmed_test_maxdiff(o, want, n);
        for (k = 0; k < c->n_models; k++) free(x[k]);
        free(b); free(o); free(want);
    }
    kmed_st_close(&so);
    kmed_st_close(&sb);
    for (k = 0; k < c->n_models; k++) kmed_st_close(&sm[k]);
    return worst;
}

static int files_equal(const char *a, const char *b)
{
    kmed_error e = {0};
    char *da = NULL, *db = NULL;
    size_t la = 0, lb = 0;
    int eq;
    if (kmed_file_read(a, 0, &da, &la, &e) != KMED_OK) return 0;
    if (kmed_file_read(b, 0, &db, &lb, &e) != KMED_OK) { kmed_free(da); return 0; }
    eq = la == lb && memcmp(da, db, la) == 0;
    kmed_free(da);
    kmed_free(db);
    return eq;
}

static void disk_checks(void)
{
    kmed_error e = {0};
    kmed_gemma_config g = tiny_cfg(128), g2 = tiny_cfg(96);
    kmed_hf_save_opts ho;
    kmed_merge_model mm[3];
    kmed_merge_config c;
    kmed_merge_out mo;
    const char *models[2] = {TMP "/m1", TMP "/m2"};
    double d;
    memset(&ho, 0, sizeof ho);
    ho.dtype = KMED_BF16;
    ho.max_shard_bytes = 40000; /* several shards, as real checkpoints come */
    CHECK_OK(kmed_mkdir_p(TMP, &e));
    CHECK_OK(kmed_gemma_init_random(&g, 1, NULL, TMP "/base", &ho, &e));
    CHECK_OK(kmed_gemma_init_random(&g, 2, NULL, TMP "/m1", &ho, &e));
    CHECK_OK(kmed_gemma_init_random(&g, 3, NULL, TMP "/m2", &ho, &e));
    CHECK_OK(kmed_gemma_init_random(&g2, 4, NULL, TMP "/other", &ho, &e));
    memset(mm, 0, sizeof mm);
    mm[0].model = models[0]; mm[0].weight = 0.4f; mm[0].density = 0.53f;
    mm[1].model = models[1]; mm[1].weight = 0.6f; mm[1].density = 0.6f;
    memset(&mo, 0, sizeof mo);
    mo.dtype = KMED_F32;

    /* ties: three models from disk vs the sort-based reference */
    c = mcfg(KMED_MERGE_TIES, mm, 2);
    c.base_model = TMP "/base";
    CHECK_OK(kmed_merge_run(&c, TMP "/out_ties", &mo, &e));
    d = compare_merge(&c, TMP "/out_ties", TMP "/base", models, 0, KMED_F32);
    CHECKF(d < TOL, "ties merge of 3 tiny models vs direct computation: %g", d);
    {
        kmed_gemma m;
        CHECK_OK(kmed_gemma_load(&m, TMP "/out_ties", NULL, &e));
        kmed_gemma_free(&m);
    }
    /* task arithmetic with the base listed among the models (no weight), sharded bf16 */
    {
        kmed_merge_model m3[3];
        kmed_merge_config c3;
        kmed_merge_out mb = mo;
        char *cj = NULL;
        size_t len = 0;
        m3[0].model = TMP "/base/"; m3[0].weight = 0; m3[0].density = 0;
        m3[1] = mm[0];
        m3[2] = mm[1];
        c3 = mcfg(KMED_MERGE_TASK_ARITHMETIC, m3, 3);
        c3.base_model = TMP "/base";
        mb.dtype = KMED_BF16;
        mb.max_shard_bytes = 30000;
        CHECK_OK(kmed_merge_run(&c3, TMP "/out_ta", &mb, &e));
        c = mcfg(KMED_MERGE_TASK_ARITHMETIC, mm, 2);
        d = compare_merge(&c, TMP "/out_ta", TMP "/base", models, 0, KMED_BF16);
        CHECKF(d < TOL_BF16, "task arithmetic (bf16, sharded) vs direct computation: %g", d);
        CHECK(kmed_file_read(TMP "/out_ta/model.safetensors.index.json", 0, &cj, &len, &e)
              == KMED_OK);
        kmed_free(cj);
        CHECK(kmed_file_read(TMP "/out_ta/config.json", 0, &cj, &len, &e) == KMED_OK);
        CHECK(cj && strstr(cj, "\"torch_dtype\": \"bfloat16\""));
        kmed_free(cj);
    }
    /* dare_ties and linear from disk vs the in-memory engine / reference */
    c = mcfg(KMED_MERGE_DARE_TIES, mm, 2);
    c.base_model = TMP "/base";
    c.seed = 5;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_dare", &mo, &e));
    d = compare_merge(&c, TMP "/out_dare", TMP "/base", models, 1, KMED_F32);
    CHECKF(d == 0, "dare_ties from disk vs kmed_merge_tensor: %g", d);
    c = mcfg(KMED_MERGE_LINEAR, mm, 2);
    CHECK_OK(kmed_merge_run(&c, TMP "/out_lin", &mo, &e));
    d = compare_merge(&c, TMP "/out_lin", TMP "/base", models, 0, KMED_F32);
    CHECKF(d < TOL, "linear from disk: %g", d);

    /* mismatches */
    c = mcfg(KMED_MERGE_TIES, mm, 2);
    c.base_model = TMP "/base";
    mm[1].model = TMP "/other";
    CHECK(kmed_merge_run(&c, TMP "/out_bad", &mo, &e) == KMED_ERR_SHAPE);
    CHECKF(strstr(e.msg, "mlp.") && strstr(e.msg, "96"), "%s", e.msg);
    {
        kmed_st sb;
        CHECK_OK(kmed_mkdir_p(TMP "/part", &e));
        CHECK_OK(kmed_st_open(&sb, TMP "/base", &e));
        CHECK_OK(kmed_st_write(TMP "/part/model.safetensors", sb.tensors, sb.n_tensors - 1,
                               NULL, NULL, 0, &e));
        kmed_st_close(&sb);
        mm[1].model = TMP "/part";
        CHECK(kmed_merge_run(&c, TMP "/out_bad", &mo, &e) == KMED_ERR_NOT_FOUND);
        CHECKF(strstr(e.msg, "no tensor") != NULL, "%s", e.msg);
        c.base_model = TMP "/part"; /* now m1 has a tensor the base lacks */
        mm[1].model = models[1];
        CHECK(kmed_merge_run(&c, TMP "/out_bad", &mo, &e) == KMED_ERR_SHAPE);
        CHECKF(strstr(e.msg, "lacks") != NULL, "%s", e.msg);
    }
    mm[1].model = TMP "/nowhere";
    c.base_model = TMP "/base";
    CHECK(kmed_merge_run(&c, TMP "/out_bad", &mo, &e) == KMED_ERR_NOT_FOUND);
    mm[1].model = models[1];
    CHECK(kmed_merge_run(&c, TMP "/m1", &mo, &e) == KMED_ERR_ARG); /* would overwrite */

    /* an adapter as input == kmed_gemma_save_hf with the adapter (kmed-convert --merge) */
    {
        kmed_gemma m;
        kmed_lora lora;
        kmed_lora_config lc;
        kmed_hf_save_opts so;
        kmed_rng rng;
        int l, t;
        size_t i;
        CHECK_OK(kmed_gemma_load(&m, TMP "/base", NULL, &e));
        static const int tokens[3] = {9, 1, 5};   /* trainable rows of the embedding too */
        memset(&lc, 0, sizeof lc);
        lc.r = 4;
        lc.seed = 9;
        lc.tokens = tokens;
        lc.n_tokens = 3;
        CHECK_OK(kmed_lora_create(&lora, &m, &lc, &e));
        kmed_rng_seed(&rng, 10);
        for (l = 0; l < lora.n_layers; l++)
            for (t = 0; t < KMED_LORA_NTARGETS; t++)
                if (lora.ab[l][t].B) {
                    size_t rows = (&m.layers[l].q)[t].rows;
                    for (i = 0; i < rows * (size_t)lora.r; i++)
                        lora.ab[l][t].B[i] = (float)(0.05 * kmed_rng_normal(&rng));
                }
        for (i = 0; i < 3 * (size_t)m.cfg.hidden_size; i++)
            lora.token_rows[i] += (float)(0.5 * kmed_rng_normal(&rng));
        CHECK_OK(kmed_lora_save(&lora, TMP "/adapter", "base", &e));
        memset(&so, 0, sizeof so);
        so.dtype = KMED_F32;
        so.lora = &lora;
        CHECK_OK(kmed_gemma_save_hf(&m, TMP "/conv", &so, &e));
        kmed_lora_free(&lora);
        kmed_gemma_free(&m);
    }
    {
        kmed_merge_model ma[1];
        kmed_st a, b;
        size_t i, bad = 0;
        memset(ma, 0, sizeof ma);
        ma[0].model = TMP "/adapter";
        ma[0].weight = 1;
        c = mcfg(KMED_MERGE_LINEAR, ma, 1);
        c.base_model = TMP "/base";
        CHECK_OK(kmed_merge_run(&c, TMP "/out_ad", &mo, &e));
        ma[0].model = TMP "/base+" TMP "/adapter";
        c.base_model = NULL;
        CHECK_OK(kmed_merge_run(&c, TMP "/out_ad2", &mo, &e));
        CHECK(files_equal(TMP "/out_ad/model.safetensors", TMP "/out_ad2/model.safetensors"));
        CHECK_OK(kmed_st_open(&a, TMP "/out_ad", &e));
        CHECK_OK(kmed_st_open(&b, TMP "/conv", &e));
        CHECK(a.n_tensors == b.n_tensors);
        for (i = 0; i < a.n_tensors; i++) {
            const kmed_tensor_info *tb = kmed_st_find(&b, a.tensors[i].name);
            if (!tb || tb->nbytes != a.tensors[i].nbytes ||
                memcmp(tb->data, a.tensors[i].data, tb->nbytes) != 0)
                bad++;
        }
        CHECKF(bad == 0, "adapter merge: %zu tensors differ from kmed-convert --merge", bad);
        { /* and the adapter did change the weights it targets */
            kmed_st sb;
            size_t n1 = 0, n2 = 0;
            float *q0, *q1;
            CHECK_OK(kmed_st_open(&sb, TMP "/base", &e));
            q0 = read_tensor(&sb, "model.layers.1.mlp.down_proj.weight", &n1);
            q1 = read_tensor(&a, "model.layers.1.mlp.down_proj.weight", &n2);
            CHECK(q0 && q1 && n1 == n2 && kmed_test_maxdiff(q0, q1, n1) > 1e-4);
            free(q0);
            free(q1);
            /* and the rows of its trainable tokens (5 is one, 4 is not) */
            q0 = read_tensor(&sb, "model.embed_tokens.weight", &n1);
            q1 = read_tensor(&a, "model.embed_tokens.weight", &n2);
            CHECK(q0 && q1 && n1 == n2);
            if (q0 && q1 && n1 == n2) {
                size_t C = n1 / (size_t)kmed_st_find(&sb, "model.embed_tokens.weight")->shape[0];
                CHECK(kmed_test_maxdiff(q0 + 5 * C, q1 + 5 * C, C) > 1e-2);
                CHECK(kmed_test_maxdiff(q0 + 4 * C, q1 + 4 * C, C) == 0);
            }
            free(q0);
            free(q1);
            kmed_st_close(&sb);
        }
        kmed_st_close(&a);
        kmed_st_close(&b);
        /* an adapter with no base to merge into */
        ma[0].model = TMP "/adapter";
        CHECK(kmed_merge_run(&c, TMP "/out_bad", &mo, &e) == KMED_ERR_ARG);
    }
    /* GGUF output == converting the HF result */
    {
        kmed_merge_out mg = mo;
        kmed_gemma m;
        kmed_gguf_save_opts go;
        mm[1].model = models[1];
        c = mcfg(KMED_MERGE_TIES, mm, 2);
        c.base_model = TMP "/base";
        mg.gguf = 1;
        mg.dtype = KMED_Q8_0;
        mg.name = "merged";
        CHECK_OK(kmed_merge_run(&c, TMP "/merged.gguf", &mg, &e));
        CHECK_OK(kmed_gemma_load(&m, TMP "/out_ties", NULL, &e));
        memset(&go, 0, sizeof go);
        go.type = KMED_Q8_0;
        go.name = "merged";
        CHECK_OK(kmed_gemma_save_gguf(&m, NULL, TMP "/conv.gguf", &go, &e));
        kmed_gemma_free(&m);
        CHECK(files_equal(TMP "/merged.gguf", TMP "/conv.gguf"));
        {
            char tmp[256];
            snprintf(tmp, sizeof tmp, TMP "/merged.gguf.merge-tmp.%ld", (long)getpid());
            CHECK(!kmed_is_dir(tmp));
        }
    }
}

/* Writes dst (F32, one file, src's config.json) as src plus noise on every tensor, norms
   included, with about 10% of the deltas exactly 0 as fine-tunes leave some weights. */
static void perturb(const char *src, const char *dst, uint64_t seed)
{
    kmed_error e = {0};
    kmed_st st;
    kmed_tensor_info *ti;
    float **v;
    kmed_rng rng;
    char path[512], *text = NULL;
    size_t i, j, n, len = 0;
    CHECK_OK(kmed_st_open(&st, src, &e));
    if (e.code != KMED_OK) return;
    ti = (kmed_tensor_info *)calloc(st.n_tensors, sizeof *ti);
    v = (float **)calloc(st.n_tensors, sizeof *v);
    kmed_rng_seed(&rng, seed);
    for (i = 0; i < st.n_tensors; i++) {
        ti[i] = st.tensors[i];
        n = (size_t)kmed_tensor_numel(&ti[i]);
        v[i] = (float *)malloc(n * sizeof **v);
        kmed_dequantize_row(ti[i].dtype, ti[i].data, v[i], n);
        for (j = 0; j < n; j++)
            if (kmed_rng_u64(&rng) % 10) v[i][j] += (float)(0.02 * kmed_rng_normal(&rng));
        ti[i].dtype = KMED_F32;
        ti[i].data = v[i];
        ti[i].nbytes = n * sizeof **v;
    }
    CHECK_OK(kmed_mkdir_p(dst, &e));
    snprintf(path, sizeof path, "%s/model.safetensors", dst);
    CHECK_OK(kmed_st_write(path, ti, st.n_tensors, NULL, NULL, 0, &e));
    snprintf(path, sizeof path, "%s/config.json", src);
    CHECK_OK(kmed_file_read(path, 0, &text, &len, &e));
    snprintf(path, sizeof path, "%s/config.json", dst);
    CHECK_OK(kmed_file_write_atomic(path, text, len, &e));
    kmed_free(text);
    for (i = 0; i < st.n_tensors; i++) free(v[i]);
    free(v);
    free(ti);
    kmed_st_close(&st);
}

/* Resident set size now, in bytes (Linux /proc; 0 elsewhere). */
static double rss_now(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, res = 0;
    if (!f) return 0;
    if (fscanf(f, "%ld %ld", &size, &res) != 2) res = 0;
    fclose(f);
    return (double)res * (double)sysconf(_SC_PAGESIZE);
}

/* Callbacks that record the peak RSS seen at progress reports and the warnings. */
typedef struct watch { double peak; int warns, empty; } watch;

static void watch_progress(void *user, const char *what, double done, double total,
                           const char *unit)
{
    watch *w = (watch *)user;
    double r = rss_now();
    (void)what; (void)done; (void)total; (void)unit;
    if (r > w->peak) w->peak = r;
}

static void watch_log(void *user, kmed_log_level level, const char *msg)
{
    watch *w = (watch *)user;
    if (level != KMED_LOG_WARN) return;
    w->warns++;
    w->empty += strstr(msg, "keeps no element") != NULL;
}

static kmed_callbacks watch_cb(watch *w)
{
    kmed_callbacks cb;
    memset(w, 0, sizeof *w);
    w->peak = rss_now();
    cb.progress = watch_progress;
    cb.log = watch_log;
    cb.user = w;
    return cb;
}

static int cmp_name(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

/* The names in dir, sorted, space-separated. */
static void list_dir(const char *dir, char *out, size_t cap)
{
    static char names[64][256];
    DIR *d = opendir(dir);
    struct dirent *de;
    size_t n = 0, i, k = 0;
    out[0] = 0;
    while (d && (de = readdir(d)) != NULL && n < 64)
        if (de->d_name[0] != '.') snprintf(names[n++], sizeof names[0], "%s", de->d_name);
    if (d) closedir(d);
    qsort(names, n, sizeof names[0], cmp_name);
    for (i = 0; i < n && k < cap; i++)
        k += (size_t)snprintf(out + k, cap - k, "%s%s", i ? " " : "", names[i]);
}

/* Temporary files or directories a merge left in dir. */
static int leftovers(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    int n = 0;
    while (d && (de = readdir(d)) != NULL)
        n += strstr(de->d_name, ".merge-tmp.") || strstr(de->d_name, ".merge-old.") ||
             strstr(de->d_name, ".tmp.");
    if (d) closedir(d);
    return n;
}

static void write_text(const char *path, const char *text)
{
    kmed_error e = {0};
    CHECK_OK(kmed_file_write_atomic(path, text, strlen(text), &e));
}

/* GGUF output: byte-identical to converting the HF merge (norms as 1 + w after the HF
   dtype's rounding, quantization, tokenizer metadata), and streamed: resident memory stays
   about a tensor, for the merge and for converting a loaded model alike. */
static void gguf_checks(void)
{
    kmed_error e = {0};
    kmed_merge_model mm[2];
    kmed_merge_config c;
    kmed_merge_out mo, mg;
    kmed_gguf_save_opts go;
    kmed_gemma m;
    kmed_tok tok;
    kmed_gguf gf;
    kmed_hf_save_opts ho;
    kmed_gemma_config g = tiny_cfg(1024), g0 = tiny_cfg(128);
    const char *fts[2] = {TMP "/ft1", TMP "/ft2"}, *deep[2] = {TMP "/deep1", TMP "/deep2"};
    static const kmed_dtype types[3] = {KMED_Q8_0, KMED_BF16, KMED_Q4_0};
    char *spm = NULL;
    size_t i, len = 0;
    double d, rss0;
    watch w;

    /* the base of disk_checks, with a small SentencePiece tokenizer so that the GGUFs carry
       a vocabulary */
    memset(&ho, 0, sizeof ho);
    ho.dtype = KMED_BF16;
    ho.max_shard_bytes = 40000;
    CHECK_OK(kmed_gemma_init_random(&g0, 1, NULL, TMP "/tbase", &ho, &e));
    CHECK_OK(kmed_file_read("tests/data/spm/bpe_gemmalike.model", 0, &spm, &len, &e));
    CHECK_OK(kmed_file_write_atomic(TMP "/tbase/tokenizer.model", spm, len, &e));
    kmed_free(spm);
    perturb(TMP "/tbase", fts[0], 11);
    perturb(TMP "/tbase", fts[1], 12);
    memset(mm, 0, sizeof mm);
    mm[0].model = fts[0]; mm[0].weight = 0.4f; mm[0].density = 0.53f;
    mm[1].model = fts[1]; mm[1].weight = 0.6f; mm[1].density = 0.2f;
    c = mcfg(KMED_MERGE_TIES, mm, 2);
    c.base_model = TMP "/tbase";
    memset(&mo, 0, sizeof mo);
    mo.dtype = KMED_F32;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_ft", &mo, &e));
    d = compare_merge(&c, TMP "/out_ft", TMP "/tbase", fts, 0, KMED_F32);
    CHECKF(d < TOL, "ties of fine-tunes (norms moved too) vs direct computation: %g", d);
    for (i = 0; i < 3; i++) {
        kmed_dtype t = types[i];
        c.method = t == KMED_BF16 ? KMED_MERGE_DARE_TIES : KMED_MERGE_TIES;
        c.seed = 3;
        mo.dtype = t == KMED_BF16 ? KMED_BF16 : KMED_F32; /* what the GGUF writer takes */
        CHECK_OK(kmed_merge_run(&c, TMP "/out_g", &mo, &e));
        CHECK_OK(kmed_gemma_load(&m, TMP "/out_g", NULL, &e));
        CHECK_OK(kmed_tok_load(&tok, TMP "/out_g", &e));
        memset(&go, 0, sizeof go);
        go.type = t;
        go.mixed = t == KMED_Q4_0;
        go.name = "merged";
        CHECK_OK(kmed_gemma_save_gguf(&m, &tok, TMP "/conv_g.gguf", &go, &e));
        kmed_tok_free(&tok);
        kmed_gemma_free(&m);
        mg = mo;
        mg.gguf = 1;
        mg.dtype = t;
        mg.mixed = t == KMED_Q4_0;
        mg.name = "merged";
        CHECK_OK(kmed_merge_run(&c, TMP "/merged_g.gguf", &mg, &e));
        CHECKF(files_equal(TMP "/merged_g.gguf", TMP "/conv_g.gguf"),
               "%s GGUF merge differs from converting the HF merge", kmed_dtype_name(t));
    }
    CHECK_OK(kmed_gguf_open(&gf, TMP "/merged_g.gguf", &e));
    if (e.code == KMED_OK) {
        CHECK(kmed_gguf_find_kv(&gf, "tokenizer.ggml.tokens") != NULL);
        kmed_gguf_close(&gf);
    }
    CHECK(leftovers(TMP) == 0);

    /* 8 layers of 1M parameters: 32 MB as f32, the largest tensor 1 MB. Keeping what was
       read resident grows the RSS by 31 MB (convert) to 50 MB (merge); streaming by about
       3 MB, 14 MB under ASan (its quarantine holds freed buffers) */
    g.hidden_size = 256; g.n_layers = 8; g.head_dim = 64; g.query_pre_attn_scalar = 64;
    ho.max_shard_bytes = 0;
    CHECK_OK(kmed_gemma_init_random(&g, 21, NULL, TMP "/deep0", &ho, &e));
    CHECK_OK(kmed_gemma_init_random(&g, 22, NULL, deep[0], &ho, &e));
    CHECK_OK(kmed_gemma_init_random(&g, 23, NULL, deep[1], &ho, &e));
    mm[0].model = deep[0];
    mm[1].model = deep[1];
    c = mcfg(KMED_MERGE_DARE_TIES, mm, 2);
    c.base_model = TMP "/deep0";
    mg.cb = watch_cb(&w);
    mg.dtype = KMED_Q8_0;
    mg.mixed = 0;
    rss0 = w.peak;
    CHECK_OK(kmed_merge_run(&c, TMP "/deep.gguf", &mg, &e));
    CHECKF(w.peak - rss0 < RSS_SLACK, "GGUF merge grew the RSS by %.1f MB (32 MB of f32 weights)",
           (w.peak - rss0) / 1e6);
    mo.dtype = KMED_F32;
    CHECK_OK(kmed_merge_run(&c, TMP "/deep_hf", &mo, &e));
    CHECK_OK(kmed_gemma_load(&m, TMP "/deep_hf", NULL, &e));
    memset(&go, 0, sizeof go);
    go.type = KMED_Q8_0;
    go.cb = watch_cb(&w);
    rss0 = w.peak;
    CHECK_OK(kmed_gemma_save_gguf(&m, NULL, TMP "/deep_conv.gguf", &go, &e));
    CHECKF(w.peak - rss0 < RSS_SLACK, "converting a loaded model grew the RSS by %.1f MB (32 MB "
           "of f32 weights)", (w.peak - rss0) / 1e6);
    kmed_gemma_free(&m);
}

/* HF output is put in place whole; inputs and outputs are checked before writing. */
static void atomic_checks(void)
{
    kmed_error e = {0};
    kmed_merge_model mm[3];
    kmed_merge_config c;
    kmed_merge_out mo;
    kmed_st sb, so;
    struct rlimit lim, old;
    char before[1024], after[1024], *bytes = NULL, *now = NULL;
    size_t n1 = 0, n2 = 0, i, n;
    kmed_result r;
    watch w;

    memset(mm, 0, sizeof mm);
    mm[0].model = TMP "/m1"; mm[0].weight = 0.4f; mm[0].density = 0.53f;
    mm[1].model = TMP "/m2"; mm[1].weight = 0.6f; mm[1].density = 0.6f;
    c = mcfg(KMED_MERGE_TIES, mm, 2);
    c.base_model = TMP "/base";
    memset(&mo, 0, sizeof mo);
    mo.dtype = KMED_F32;
    mo.max_shard_bytes = 30000;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_sw", &mo, &e));
    list_dir(TMP "/out_sw", before, sizeof before);
    CHECKF(strstr(before, "model-00001-of-") && strstr(before, "index.json"), "%s", before);
    /* merged again into it with another shard layout: exactly the new files */
    mo.max_shard_bytes = 0;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_sw/", &mo, &e));
    list_dir(TMP "/out_sw", after, sizeof after);
    CHECKF(!strcmp(after, "config.json generation_config.json model.safetensors"), "%s",
           after);
    CHECK(leftovers(TMP) == 0);

    /* a run that fails mid-way (file size limit) leaves the old output and no temporary */
    CHECK_OK(kmed_file_read(TMP "/out_sw/model.safetensors", 0, &bytes, &n1, &e));
    mo.max_shard_bytes = 30000;
    getrlimit(RLIMIT_FSIZE, &old);
    lim = old;
    lim.rlim_cur = 20000;
    signal(SIGXFSZ, SIG_IGN);
    CHECK(setrlimit(RLIMIT_FSIZE, &lim) == 0);
    r = kmed_merge_run(&c, TMP "/out_sw", &mo, &e);
    setrlimit(RLIMIT_FSIZE, &old);
    CHECKF(r == KMED_ERR_IO, "%s: %s", kmed_result_str(r), e.msg);
    list_dir(TMP "/out_sw", before, sizeof before);
    CHECKF(!strcmp(after, before), "%s", before);
    CHECK_OK(kmed_file_read(TMP "/out_sw/model.safetensors", 0, &now, &n2, &e));
    CHECK(bytes && now && n1 == n2 && memcmp(bytes, now, n1) == 0);
    kmed_free(bytes);
    kmed_free(now);
    CHECK(leftovers(TMP) == 0);

    /* a killed run's temporary directory (its PID gone) goes with the next run */
    CHECK_OK(kmed_mkdir_p(TMP "/out_sw.merge-tmp.999999999", &e));
    write_text(TMP "/out_sw.merge-tmp.999999999/model-00001-of-00002.safetensors", "x");
    mo.max_shard_bytes = 0;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_sw", &mo, &e));
    CHECK(!kmed_is_dir(TMP "/out_sw.merge-tmp.999999999"));

    /* outputs that hold something else than a model are refused, and left alone */
    CHECK_OK(kmed_mkdir_p(TMP "/notmodel/sub", &e));
    CHECK(kmed_merge_run(&c, TMP "/notmodel", &mo, &e) == KMED_ERR_ARG);
    CHECKF(strstr(e.msg, "sub") != NULL, "%s", e.msg);
    CHECK(kmed_is_dir(TMP "/notmodel/sub"));
    CHECK_OK(kmed_mkdir_p(TMP "/notes", &e));
    write_text(TMP "/notes/notes.txt", "mine");
    CHECK(kmed_merge_run(&c, TMP "/notes", &mo, &e) == KMED_ERR_ARG);
    list_dir(TMP "/notes", after, sizeof after);
    CHECKF(!strcmp(after, "notes.txt"), "%s", after);
    write_text(TMP "/afile", "mine");
    CHECK(kmed_merge_run(&c, TMP "/afile", &mo, &e) == KMED_ERR_ARG);
    remove(TMP "/link");
    CHECK(symlink("out_sw", TMP "/link") == 0); /* a link to a model, named with a '/' */
    list_dir(TMP "/out_sw", before, sizeof before);
    CHECK(kmed_merge_run(&c, TMP "/link/", &mo, &e) == KMED_ERR_ARG);
    list_dir(TMP "/out_sw", after, sizeof after);
    CHECKF(!strcmp(after, before) && strstr(after, "config.json"), "%s", after);

    /* a base without config.json is refused before anything is written */
    CHECK_OK(kmed_mkdir_p(TMP "/nocfg", &e));
    CHECK_OK(kmed_st_open(&sb, TMP "/base", &e));
    CHECK_OK(kmed_st_write(TMP "/nocfg/model.safetensors", sb.tensors, sb.n_tensors, NULL,
                           NULL, 0, &e));
    kmed_st_close(&sb);
    c.base_model = TMP "/nocfg";
    CHECK(kmed_merge_run(&c, TMP "/out_nocfg", &mo, &e) == KMED_ERR_NOT_FOUND);
    CHECKF(strstr(e.msg, "config.json") != NULL, "%s", e.msg);
    CHECK(!kmed_is_dir(TMP "/out_nocfg"));
    CHECK(leftovers(TMP) == 0);
    /* GGUF output needs the tensors config.json implies (intermediate 96 here, not 128) */
    CHECK_OK(kmed_mkdir_p(TMP "/badcfg", &e));
    CHECK_OK(kmed_st_open(&sb, TMP "/base", &e));
    CHECK_OK(kmed_st_write(TMP "/badcfg/model.safetensors", sb.tensors, sb.n_tensors, NULL,
                           NULL, 0, &e));
    kmed_st_close(&sb);
    CHECK_OK(kmed_file_read(TMP "/other/config.json", 0, &bytes, &n1, &e));
    CHECK_OK(kmed_file_write_atomic(TMP "/badcfg/config.json", bytes, n1, &e));
    kmed_free(bytes);
    c.base_model = TMP "/badcfg";
    mo.gguf = 1;
    CHECK(kmed_merge_run(&c, TMP "/badcfg.gguf", &mo, &e) == KMED_ERR_SHAPE);
    CHECKF(strstr(e.msg, "mlp.") && strstr(e.msg, "implies [96, 64]"), "%s", e.msg);
    CHECK(access(TMP "/badcfg.gguf", F_OK) != 0); /* nothing written */
    mo.gguf = 0;
    c.base_model = TMP "/base";

    /* DARE masks do not change when the base is listed among the models */
    mm[2] = mm[1];
    mm[1] = mm[0];
    memset(&mm[0], 0, sizeof mm[0]);
    mm[0].model = TMP "/base";
    c = mcfg(KMED_MERGE_DARE_TIES, mm, 3);
    c.base_model = TMP "/base";
    c.seed = 5;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_dl1", &mo, &e));
    c = mcfg(KMED_MERGE_DARE_TIES, mm + 1, 2);
    c.base_model = TMP "/base";
    c.seed = 5;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_dl2", &mo, &e));
    CHECK(files_equal(TMP "/out_dl1/model.safetensors", TMP "/out_dl2/model.safetensors"));

    /* lambda 0 gives the base, tensor for tensor */
    c.method = KMED_MERGE_TASK_ARITHMETIC;
    c.lambda = 0;
    c.has_lambda = 1;
    CHECK_OK(kmed_merge_run(&c, TMP "/out_l0", &mo, &e));
    CHECK_OK(kmed_st_open(&sb, TMP "/base", &e));
    CHECK_OK(kmed_st_open(&so, TMP "/out_l0", &e));
    for (i = 0, n = 0; i < sb.n_tensors; i++) {
        float *a = read_tensor(&sb, sb.tensors[i].name, &n1), *b;
        b = read_tensor(&so, sb.tensors[i].name, &n2);
        n += !a || !b || n1 != n2 || kmed_test_maxdiff(a, b, n1) != 0;
        free(a);
        free(b);
    }
    CHECKF(n == 0, "lambda 0: %zu tensors differ from the base", n);
    kmed_st_close(&sb);
    kmed_st_close(&so);

    /* TIES keeping no element of a tensor (64-element norms at density 0.01) says so */
    c = mcfg(KMED_MERGE_TIES, mm + 1, 2);
    c.base_model = TMP "/base";
    mm[1].density = 0.01f;
    mo.cb = watch_cb(&w);
    CHECK_OK(kmed_merge_run(&c, TMP "/out_k0", &mo, &e));
    CHECKF(w.empty == 4 * 2 + 1, "%d warnings that a task vector keeps nothing", w.empty);
}

int main(void)
{
    hand_methods();
    dare_checks();
    chunked_vs_reference();
    config_checks();
    disk_checks();
    gguf_checks();
    atomic_checks();
    return kmed_test_done();
}

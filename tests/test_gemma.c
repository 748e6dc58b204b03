/* Gemma-2 config, loading and forward pass against the tiny-gemma2 goldens.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_gemma.c -o build/test_gemma \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"
#include <unistd.h>

/* Tolerances of the fixture README (about 10x the observed f32 round-off). */
#define TOL_HIDDEN_REL 5e-5  /* hidden states, final norm: x max |value| per tensor */
#define TOL_LOGIT 0.005      /* logits, absolute */
#define TOL_LSE 2e-5         /* logsumexp, absolute */
#define TOL_LOSS_REL 2e-6    /* loss, relative */
#define MARGIN_ARGMAX 0.01   /* argmax must agree where top1 - top2 exceeds this */
/* Prefill vs step-by-step decode: the same f32 ops, but the matmul kernels sum in another
   order for one row than for a block of rows (observed ~5e-4 on logits up to 30). */
#define TOL_PREFILL 1e-3
/* The fast path may deviate from the dequant reference this much more than llama.cpp's
   own quantized logits do (different rounding of the same Q8_0 activations). */
#define FAST_MARGIN 1.5

#define NTOK 40
#define NV 256000

static char fx[1024];

static const float *st_f32(const kmed_st *st, const char *name, size_t numel)
{
    const kmed_tensor_info *t = kmed_st_find(st, name);
    CHECKF(t && t->dtype == KMED_F32 && kmed_tensor_numel(t) == numel, "golden %s", name);
    return t && t->dtype == KMED_F32 && kmed_tensor_numel(t) == numel ? (const float *)t->data
                                                                         : NULL;
}

static double maxabs(const float *a, size_t n)
{
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) if (fabs(a[i]) > m) m = fabs(a[i]);
    return m;
}

static void lse_argmax(const float *logits, size_t V, double *lse, int *am, double *margin)
{
    size_t i;
    double mx = -INFINITY, s = 0, second = -INFINITY;
    int best = 0;
    for (i = 0; i < V; i++) {
        if (logits[i] > mx) { second = mx; mx = logits[i]; best = (int)i; }
        else if (logits[i] > second) second = logits[i];
    }
    for (i = 0; i < V; i++) s += exp((double)logits[i] - mx);
    *lse = mx + log(s);
    *am = best;
    if (margin) *margin = mx - second;
}

static void *load_npy(const char *name, size_t numel)
{
    char path[1200];
    kmed_error e = {0};
    kmed_dtype dt;
    int nd, i;
    uint64_t shape[KMED_MAX_DIMS], n = 1;
    void *data = NULL;
    snprintf(path, sizeof path, "%s/tiny-gemma2/gguf/golden/%s", fx, name);
    CHECK_OK(kmed_npy_read(path, &dt, &nd, shape, &data, &e));
    if (!data) return NULL;
    for (i = 0; i < nd; i++) n *= shape[i];
    CHECKF(n == numel, "%s: %llu elements, expected %zu", name, (unsigned long long)n, numel);
    return data;
}

/* Mean NLL of labels[t+1] at position t over the unmasked labels of forward.json. */
static double golden_loss(const float *logits, double *golden, const char *key)
{
    char path[1200];
    char *js = NULL;
    size_t jlen, t;
    kmed_json_doc doc;
    kmed_error e = {0};
    double nll = 0;
    int counted = 0;
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/forward.json", fx);
    CHECK_OK(kmed_file_read(path, 0, &js, &jlen, &e));
    if (!js) return -1;
    *golden = -1;
    if (kmed_json_parse(&doc, js, jlen, path, 0, &e) == KMED_OK) {
        const kmed_json *labels = kmed_json_get(doc.root, "labels");
        *golden = kmed_json_num(kmed_json_get(doc.root, key), -1);
        for (t = 0; t + 1 < NTOK; t++) {
            int64_t lab;
            double lse;
            int am;
            if (!kmed_json_int(kmed_json_at(labels, t + 1), &lab) || lab < 0) continue;
            lse_argmax(logits + t * NV, NV, &lse, &am, NULL);
            nll += lse - logits[t * NV + (size_t)lab];
            counted++;
        }
    }
    kmed_json_free(&doc);
    kmed_free(js);
    CHECK(counted == 28);
    return counted ? nll / counted : -1;
}

/* Full forward of the 40 golden tokens: logits (40, V) and hidden (L+1, 40, C). */
static int run_forward(const kmed_gemma *m, kmed_pool *pool, const int *ids, int flags,
                       float *logits, float *hidden)
{
    kmed_gemma_state st;
    kmed_error e = {0};
    kmed_result r = kmed_gemma_state_init(&st, m, 64, &e);
    CHECK_OK(r);
    if (r != KMED_OK) return 0;
    r = kmed_gemma_forward(m, NULL, &st, pool, ids, NTOK, KMED_FWD_LOGITS_ALL | flags, logits,
                           hidden, &e);
    CHECK_OK(r);
    kmed_gemma_state_free(&st);
    return r == KMED_OK;
}

static void test_config(void)
{
    kmed_gemma_config c;
    kmed_error e = {0};
    kmed_result r;
    char path[1200];
    const char *base = "{\"model_type\": \"gemma2\", \"vocab_size\": 100, \"hidden_size\": 8,"
                       " \"intermediate_size\": 16, \"num_hidden_layers\": 2,"
                       " \"num_attention_heads\": %d, \"num_key_value_heads\": %d,"
                       " \"head_dim\": 4%s}";
    char js[1024];

    snprintf(js, sizeof js, base, 4, 2, "");
    CHECK_OK(kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e));
    CHECK(c.n_heads == 4 && c.n_kv_heads == 2 && c.query_pre_attn_scalar == 256.0f &&
          c.sliding_window == 4096 && c.attn_softcap == 50.0f && c.final_softcap == 30.0f &&
          c.bos_id == 2 && c.eos_id == 1 && c.pad_id == 0 && c.rms_norm_eps == 1e-6f);

    snprintf(js, sizeof js, base, 4, 3, "");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_FORMAT && strstr(e.msg, "cfg.json") && strstr(e.msg, "multiple"),
           "heads 4 / kv 3: %s", e.msg);
    snprintf(js, sizeof js, base, 4, 2, ", \"hidden_activation\": \"relu\"");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_UNSUPPORTED && strstr(e.msg, "relu"), "relu: %s", e.msg);
    snprintf(js, sizeof js, base, 4, 2, ", \"tie_word_embeddings\": false");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_UNSUPPORTED && strstr(e.msg, "tie_word_embeddings"), "untied: %s",
           e.msg);
    snprintf(js, sizeof js, base, 4, 2, ", \"eos_token_id\": [1, 107], \"sliding_window\": null,"
             " \"final_logit_softcapping\": null");
    CHECK_OK(kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e));
    CHECK(c.eos_id == 1 && c.sliding_window == 0 && c.final_softcap == 0.0f);
    snprintf(js, sizeof js, "{\"model_type\": \"llama\"}");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_UNSUPPORTED && strstr(e.msg, "llama"), "llama: %s", e.msg);
    snprintf(js, sizeof js, "{\"vocab_size\": 10, \"hidden_size\": 8}");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_NOT_FOUND && strstr(e.msg, "intermediate_size"), "missing: %s", e.msg);
    snprintf(js, sizeof js, base, 4, 2, ", \"head_dim\": \"4\"");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_FORMAT && strstr(e.msg, "head_dim"), "string head_dim: %s", e.msg);
    snprintf(js, sizeof js, "{\"vocab_size\": 10,");
    r = kmed_gemma_config_parse(&c, js, strlen(js), "cfg.json", &e);
    CHECKF(r == KMED_ERR_FORMAT, "truncated json: %s", e.msg);

    if (!fx[0]) return;
    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    CHECK_OK(kmed_gemma_config_load(&c, path, &e));
    CHECK(c.vocab_size == NV && c.hidden_size == 64 && c.intermediate_size == 128 &&
          c.n_layers == 2 && c.n_heads == 4 && c.n_kv_heads == 2 && c.head_dim == 16 &&
          c.query_pre_attn_scalar == 16.0f && c.sliding_window == 16);
}

/* Checks one model's forward against golden/forward.safetensors. */
static void check_hf_golden(const kmed_gemma *m, const kmed_st *g, const char *label,
                            float *logits, float *hidden)
{
    const size_t C = 64, L = 2;
    const float *gh = st_f32(g, "hidden_states", (L + 1) * NTOK * C);
    const float *gfn = st_f32(g, "final_norm", NTOK * C);
    const float *glse = st_f32(g, "logsumexp", NTOK);
    const float *glog = st_f32(g, "logits_first1024", NTOK * 1024);
    const float *gmargin = st_f32(g, "argmax_margin", NTOK);
    const kmed_tensor_info *gam = kmed_st_find(g, "argmax");
    float fn[NTOK * 64];
    double worst = 0, d, lse_d = 0, log_d = 0;
    size_t l, t, j;
    int am_ok = 1;

    if (!gh || !gfn || !glse || !glog || !gmargin || !gam) return;
    for (l = 0; l <= L; l++) {
        d = kmed_test_maxdiff(hidden + l * NTOK * C, gh + l * NTOK * C, NTOK * C) /
            maxabs(gh + l * NTOK * C, NTOK * C);
        if (d > worst) worst = d;
        CHECKF(d <= TOL_HIDDEN_REL, "%s: hidden[%zu] rel err %.3g", label, l, d);
    }
    kmed__rmsnorm_forward(fn, NULL, hidden + L * NTOK * C, m->final_norm, NTOK, C,
                          m->cfg.rms_norm_eps);
    d = kmed_test_maxdiff(fn, gfn, NTOK * C) / maxabs(gfn, NTOK * C);
    CHECKF(d <= TOL_HIDDEN_REL, "%s: final_norm rel err %.3g", label, d);
    for (t = 0; t < NTOK; t++) {
        double lse, margin;
        int am;
        lse_argmax(logits + t * NV, NV, &lse, &am, &margin);
        if (fabs(lse - glse[t]) > lse_d) lse_d = fabs(lse - glse[t]);
        if (gmargin[t] > MARGIN_ARGMAX && am != ((const int32_t *)gam->data)[t]) am_ok = 0;
        for (j = 0; j < 1024; j++) {
            d = fabs((double)logits[t * NV + j] - glog[t * 1024 + j]);
            if (d > log_d) log_d = d;
        }
    }
    CHECKF(log_d <= TOL_LOGIT, "%s: logits max abs err %.3g", label, log_d);
    CHECKF(lse_d <= TOL_LSE, "%s: logsumexp max abs err %.3g", label, lse_d);
    CHECKF(am_ok, "%s: argmax differs", label);
    printf("%s: hidden rel %.2e, logits %.2e, lse %.2e\n", label, worst, log_d, lse_d);

    {
        double loss, gl, rel;
        loss = golden_loss(logits, &gl, "loss");
        rel = fabs(loss - gl) / gl;
        CHECKF(rel <= TOL_LOSS_REL, "%s: loss %.8g vs %.8g (rel %.3g)", label, loss, gl, rel);
    }
}

static void get_ids(const kmed_st *g, int *ids)
{
    const kmed_tensor_info *t = kmed_st_find(g, "input_ids");
    size_t i;
    CHECK(t && t->dtype == KMED_I32 && kmed_tensor_numel(t) == NTOK);
    for (i = 0; i < NTOK; i++) ids[i] = t ? ((const int32_t *)t->data)[i] : 2;
}

/* LoRA through the forward: an adapter built over golden/lora_init must reproduce
   lora.json's loss_with_lora. A/B point into the mapped file (read only). */
static void test_lora(const kmed_gemma *m, kmed_pool *pool, const int *ids, float *logits)
{
    static const char *const mods[7] = { "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
        "mlp.down_proj" };
    kmed_lora_ab ab[2][KMED_LORA_NTARGETS];
    kmed_lora lo;
    kmed_st st;
    kmed_error e = {0};
    kmed_gemma_state s;
    char path[1200], name[256];
    char *js = NULL;
    size_t jlen;
    int l, t, ok = 1;
    double loss, gl = -1, rel;
    kmed_json_doc doc;
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_init/adapter_model.safetensors", fx);
    CHECK_OK(kmed_st_open(&st, path, &e));
    if (e.code) return;
    for (l = 0; l < 2; l++)
        for (t = 0; t < 7; t++) {
            const kmed_tensor_info *a, *b;
            snprintf(name, sizeof name, "base_model.model.model.layers.%d.%s.lora_A.weight", l,
                     mods[t]);
            a = kmed_st_find(&st, name);
            snprintf(name, sizeof name, "base_model.model.model.layers.%d.%s.lora_B.weight", l,
                     mods[t]);
            b = kmed_st_find(&st, name);
            if (!a || !b || a->dtype != KMED_F32 || b->dtype != KMED_F32) { ok = 0; continue; }
            ab[l][t].A = (float *)(uintptr_t)a->data;
            ab[l][t].B = (float *)(uintptr_t)b->data;
        }
    CHECK(ok);
    memset(&lo, 0, sizeof lo);
    lo.r = 4;
    lo.alpha = 8;
    lo.scale = 2;
    lo.targets = (1u << KMED_LORA_NTARGETS) - 1;
    lo.n_layers = 2;
    lo.ab = ab;
    if (ok && kmed_gemma_state_init(&s, m, 64, &e) == KMED_OK) {
        CHECK_OK(kmed_gemma_forward(m, &lo, &s, pool, ids, NTOK, KMED_FWD_LOGITS_ALL, logits,
                                    NULL, &e));
        kmed_gemma_state_free(&s);
        snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora.json", fx);
        CHECK_OK(kmed_file_read(path, 0, &js, &jlen, &e));
        if (js && kmed_json_parse(&doc, js, jlen, path, 0, &e) == KMED_OK)
            gl = kmed_json_num(kmed_json_get(doc.root, "loss_with_lora"), -1);
        kmed_json_free(&doc);
        kmed_free(js);
        loss = golden_loss(logits, &rel, "loss");
        rel = fabs(loss - gl) / gl;
        CHECKF(rel <= TOL_LOSS_REL, "lora: loss %.8g vs %.8g (rel %.3g)", loss, gl, rel);
        printf("lora forward: loss %.8g vs golden %.8g (rel %.2e)\n", loss, gl, rel);
    }
    kmed_st_close(&st);
}

static void test_hf(kmed_pool *pool1, kmed_pool *pool2, int *ids)
{
    kmed_gemma m, mb;
    kmed_gemma_opts o;
    kmed_st g;
    kmed_error e = {0};
    char path[1200], gpath[1200];
    float *logits = (float *)malloc((size_t)NTOK * NV * sizeof(float));
    float *logits2 = (float *)malloc((size_t)NTOK * NV * sizeof(float));
    float *hidden = (float *)malloc(3 * NTOK * 64 * sizeof(float));
    float *hidden2 = (float *)malloc(3 * NTOK * 64 * sizeof(float));

    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    snprintf(gpath, sizeof gpath, "%s/tiny-gemma2/golden/forward.safetensors", fx);
    CHECK_OK(kmed_st_open(&g, gpath, &e));
    get_ids(&g, ids);

    memset(&o, 0, sizeof o);
    o.convert = 1;
    o.type = KMED_F32;
    CHECK_OK(kmed_gemma_load(&m, path, &o, &e));
    if (m.layers && run_forward(&m, pool2, ids, 0, logits, hidden)) {
        CHECK(m.embed.type == KMED_F32 && m.layers[1].down.type == KMED_F32);
        check_hf_golden(&m, &g, "hf f32", logits, hidden);
        /* thread count must not change a single bit */
        if (run_forward(&m, pool1, ids, 0, logits2, hidden2)) {
            CHECK(memcmp(logits, logits2, (size_t)NTOK * NV * sizeof(float)) == 0);
            CHECK(memcmp(hidden, hidden2, 3 * NTOK * 64 * sizeof(float)) == 0);
        }
    }

    if (m.layers) test_lora(&m, pool2, ids, logits);

    /* as stored: BF16 weights mmapped, f32 activations */
    CHECK_OK(kmed_gemma_load(&mb, path, NULL, &e));
    if (mb.layers && run_forward(&mb, pool2, ids, 0, logits, hidden)) {
        CHECK(mb.embed.type == KMED_BF16 && mb.layers[0].q.type == KMED_BF16);
        check_hf_golden(&mb, &g, "hf bf16", logits, hidden);
    }

    /* prefill of N tokens == N decode steps; rollback with set_pos repeats them exactly */
    if (m.layers) {
        kmed_gemma_state st;
        float *step = (float *)malloc(NV * sizeof(float));
        double d = 0, dd;
        size_t t;
        int same = 1;
        CHECK_OK(kmed_gemma_state_init(&st, &m, 64, &e));
        CHECK_OK(kmed_gemma_forward(&m, NULL, &st, pool2, ids, NTOK, KMED_FWD_LOGITS_ALL,
                                    logits, NULL, &e));
        CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
        for (t = 0; t < NTOK; t++) {
            CHECK_OK(kmed_gemma_forward(&m, NULL, &st, pool2, ids + t, 1, KMED_FWD_LOGITS_LAST,
                                        step, NULL, &e));
            dd = kmed_test_maxdiff(step, logits + t * NV, NV);
            if (dd > d) d = dd;
        }
        CHECKF(d <= TOL_PREFILL, "prefill vs decode max abs diff %.3g", d);
        printf("prefill vs %d decode steps: max abs diff %.2e\n", NTOK, d);
        CHECK(st.pos == NTOK);
        /* roll back to a 25-token prefix, redo the tail as one batch */
        CHECK_OK(kmed_gemma_state_set_pos(&st, 25, &e));
        CHECK_OK(kmed_gemma_forward(&m, NULL, &st, pool2, ids + 25, NTOK - 25,
                                    KMED_FWD_LOGITS_ALL, logits2, NULL, &e));
        CHECK_OK(kmed_gemma_state_set_pos(&st, 25, &e));
        CHECK_OK(kmed_gemma_forward(&m, NULL, &st, pool2, ids + 25, NTOK - 25,
                                    KMED_FWD_LOGITS_ALL, logits2 + (size_t)(NTOK - 25) * NV,
                                    NULL, &e));
        for (t = 0; t < (size_t)(NTOK - 25) * NV; t++)
            if (logits2[t] != logits2[t + (size_t)(NTOK - 25) * NV]) same = 0;
        CHECK(same);
        /* last-only logits equal the last row of all logits */
        CHECK_OK(kmed_gemma_state_set_pos(&st, 25, &e));
        CHECK_OK(kmed_gemma_forward(&m, NULL, &st, pool2, ids + 25, NTOK - 25,
                                    KMED_FWD_LOGITS_LAST, step, NULL, &e));
        CHECK(kmed_test_maxdiff(step, logits2 + (size_t)(NTOK - 26) * NV, NV) <= TOL_PREFILL);
        CHECK(kmed_gemma_state_set_pos(&st, 41, &e) == KMED_ERR_ARG);
        {
            int bad = NV;
            CHECK(kmed_gemma_forward(&m, NULL, &st, pool2, &bad, 1, 0, NULL, NULL, &e) ==
                  KMED_ERR_ARG);
            CHECK(st.pos == NTOK);
            CHECK(kmed_gemma_forward(&m, NULL, &st, pool2, ids, 25, 0, NULL, NULL, &e) ==
                  KMED_ERR_LIMIT);
        }
        kmed_gemma_state_free(&st);
        free(step);
    }
    kmed_gemma_free(&m);
    kmed_gemma_free(&mb);
    kmed_st_close(&g);
    free(logits);
    free(logits2);
    free(hidden);
    free(hidden2);
}

/* Quantize-on-load from the HF bf16 weights gives exactly the blocks llama-quantize wrote. */
static void test_convert_matches_gguf(void)
{
    static const char *const files[2] = { "q8_0", "q4_0-pure" };
    static const kmed_dtype types[2] = { KMED_Q8_0, KMED_Q4_0 };
    int v, l;
    for (v = 0; v < 2; v++) {
        kmed_gemma a, b;
        kmed_gemma_opts o;
        kmed_error e = {0};
        char path[1200];
        int same = 1;
        memset(&o, 0, sizeof o);
        o.convert = 1;
        o.type = types[v];
        snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
        CHECK_OK(kmed_gemma_load(&a, path, &o, &e));
        snprintf(path, sizeof path, "%s/tiny-gemma2/gguf/tiny-gemma2-%s.gguf", fx, files[v]);
        CHECK_OK(kmed_gemma_load(&b, path, NULL, &e));
        if (a.layers && b.layers) {
            const kmed_weight *wa, *wb;
            same = memcmp(a.embed.data, b.embed.data,
                          kmed_dtype_bytes(types[v], (uint64_t)NV * 64)) == 0;
            for (l = 0; l < 2; l++)
                for (wa = &a.layers[l].q, wb = &b.layers[l].q; wa <= &a.layers[l].down;
                     wa++, wb++)
                    if (wa->type != wb->type || memcmp(wa->data, wb->data,
                            kmed_dtype_bytes(wa->type, (uint64_t)wa->rows * wa->cols)) != 0)
                        same = 0;
            CHECKF(same, "HF -> %s on load differs from llama-quantize's file", files[v]);
            /* norms: GGUF's 1 + w back to w equals the HF value */
            CHECK(kmed_test_maxdiff(a.final_norm, b.final_norm, 64) < 1e-6 &&
                  kmed_test_maxdiff(a.layers[1].post_ffn_norm, b.layers[1].post_ffn_norm, 64)
                      < 1e-6);
        }
        kmed_gemma_free(&a);
        kmed_gemma_free(&b);
    }
}

/* rel. L2 and max abs of a - b over the first 1024 logits of each position */
static void dev1024(const float *logits, const float *ref, double *mx, double *rl2)
{
    size_t t, j;
    double s = 0, n = 0;
    *mx = 0;
    for (t = 0; t < NTOK; t++)
        for (j = 0; j < 1024; j++) {
            double d = (double)logits[t * NV + j] - ref[t * 1024 + j];
            if (fabs(d) > *mx) *mx = fabs(d);
            s += d * d;
            n += (double)ref[t * 1024 + j] * ref[t * 1024 + j];
        }
    *rl2 = sqrt(s / n);
}

static void test_gguf(kmed_pool *pool, const int *ids)
{
    static const char *const variants[3] = { "q8_0", "q4_0", "q4_0-pure" };
    static const kmed_dtype types[3] = { KMED_Q8_0, KMED_Q4_0, KMED_Q4_0 };
    float *logits = (float *)malloc((size_t)NTOK * NV * sizeof(float));
    int v;
    for (v = 0; v < 3; v++) {
        kmed_gemma m;
        kmed_error e = {0};
        char path[1200], name[256];
        float *ref, *refl, *qll;
        int32_t *ram;
        size_t t, j;
        double lse_d = 0, log_d = 0, ours_mx, ours_l2, ll_mx, ll_l2;
        int am_ok = 1;
        snprintf(path, sizeof path, "%s/tiny-gemma2/gguf/tiny-gemma2-%s.gguf", fx, variants[v]);
        CHECK_OK(kmed_gemma_load(&m, path, NULL, &e));
        if (!m.layers) continue;
        CHECK(m.layers[0].q.type == types[v] && m.cfg.query_pre_attn_scalar == 16.0f);
        CHECK(fabsf(m.final_norm[0] - 0.0f) < 10.0f); /* sanity: 1 was subtracted */
        snprintf(name, sizeof name, "llamacpp-exactgelu-dequant-%s.logits_first1024.npy",
                 variants[v]);
        refl = (float *)load_npy(name, NTOK * 1024);
        snprintf(name, sizeof name, "llamacpp-exactgelu-dequant-%s.logsumexp.npy", variants[v]);
        ref = (float *)load_npy(name, NTOK);
        snprintf(name, sizeof name, "llamacpp-exactgelu-dequant-%s.argmax.npy", variants[v]);
        ram = (int32_t *)load_npy(name, NTOK);
        snprintf(name, sizeof name, "llamacpp-exactgelu-%s.logits_first1024.npy", variants[v]);
        qll = (float *)load_npy(name, NTOK * 1024);
        if (refl && ref && ram && qll && run_forward(&m, pool, ids, 0, logits, NULL)) {
            for (t = 0; t < NTOK; t++) {
                double lse, margin;
                int am;
                lse_argmax(logits + t * NV, NV, &lse, &am, &margin);
                if (fabs(lse - ref[t]) > lse_d) lse_d = fabs(lse - ref[t]);
                if (margin > MARGIN_ARGMAX && am != ram[t]) am_ok = 0;
                for (j = 0; j < 1024; j++) {
                    double d = fabs((double)logits[t * NV + j] - refl[t * 1024 + j]);
                    if (d > log_d) log_d = d;
                }
            }
            CHECKF(log_d <= TOL_LOGIT, "%s f32 act: logits max abs err %.3g", variants[v],
                   log_d);
            CHECKF(lse_d <= TOL_LSE, "%s f32 act: lse max abs err %.3g", variants[v], lse_d);
            CHECKF(am_ok, "%s f32 act: argmax differs", variants[v]);
            printf("gguf %s, f32 activations vs llama.cpp dequant: logits %.2e, lse %.2e\n",
                   variants[v], log_d, lse_d);
            if (run_forward(&m, pool, ids, KMED_FWD_FAST, logits, NULL)) {
                dev1024(logits, refl, &ours_mx, &ours_l2);
                /* llama.cpp's own quantized logits vs the dequant reference */
                for (t = 0; t < NTOK; t++) memcpy(logits + t * NV, qll + t * 1024, 4096);
                dev1024(logits, refl, &ll_mx, &ll_l2);
                CHECKF(ours_l2 <= ll_l2 * FAST_MARGIN && ours_mx <= ll_mx * FAST_MARGIN,
                       "%s fast: rel L2 %.3g max %.3g vs llama.cpp %.3g / %.3g", variants[v],
                       ours_l2, ours_mx, ll_l2, ll_mx);
                printf("gguf %s fast path vs dequant ref: rel L2 %.3g, max %.3g; llama.cpp "
                       "%.3g, %.3g\n", variants[v], ours_l2, ours_mx, ll_l2, ll_mx);
            }
        }
        free(refl);
        free(ref);
        free(ram);
        free(qll);
        kmed_gemma_free(&m);
    }
    free(logits);
}

/* A model over caller-owned weights: kmed_gemma_init + validation errors. */
static void test_init(void)
{
    kmed_gemma m;
    kmed_gemma_config c;
    kmed_error e = {0};
    memset(&c, 0, sizeof c);
    c.vocab_size = 32; c.hidden_size = 32; c.intermediate_size = 64; c.n_layers = 1;
    c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 16; c.query_pre_attn_scalar = 16;
    c.rms_norm_eps = 1e-6f; c.rope_theta = 10000;
    CHECK_OK(kmed_gemma_init(&m, &c, &e));
    CHECK(kmed_gemma_validate(&m, &e) == KMED_ERR_STATE);
    kmed_gemma_free(&m);
    c.n_kv_heads = 3;
    CHECK(kmed_gemma_init(&m, &c, &e) == KMED_ERR_FORMAT);
}

/* A model directory whose config.json disagrees with its weights: clear load errors. */
static void test_bad_model(void)
{
    static const char *const files[3] = { "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json" };
    const char *dir = "build/test_gemma_bad";
    char src[2200], dst[1200], cfg[1200], *text = NULL;
    size_t len;
    kmed_gemma m;
    kmed_error e = {0};
    kmed_result r;
    int i;
    CHECK_OK(kmed_mkdir_p(dir, &e));
    for (i = 0; i < 3; i++) {
        snprintf(src, sizeof src, "%s/tiny-gemma2/%s", fx, files[i]);
        if (src[0] != '/') {
            char cwd[1024];
            CHECK(getcwd(cwd, sizeof cwd) != NULL);
            snprintf(src, sizeof src, "%s/%s/tiny-gemma2/%s", cwd, fx, files[i]);
        }
        snprintf(dst, sizeof dst, "%s/%s", dir, files[i]);
        remove(dst);
        CHECK(symlink(src, dst) == 0);
    }
    snprintf(src, sizeof src, "%s/tiny-gemma2/config.json", fx);
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    CHECK_OK(kmed_file_read(src, 0, &text, &len, &e));
    if (!text) return;
    {
        /* 3 layers: layer 2's tensors are missing */
        char *p = strstr(text, "\"num_hidden_layers\": 2");
        CHECK(p != NULL);
        if (p) p[strlen("\"num_hidden_layers\": ")] = '3';
        CHECK_OK(kmed_file_write_atomic(cfg, text, len, &e));
        r = kmed_gemma_load(&m, dir, NULL, &e);
        CHECKF(r == KMED_ERR_NOT_FOUND && strstr(e.msg, "model.layers.2."), "3 layers: %s",
               e.msg);
        if (p) p[strlen("\"num_hidden_layers\": ")] = '2';
        /* intermediate 129 instead of 128: gate_proj has the wrong shape */
        p = strstr(text, "\"intermediate_size\": 128");
        CHECK(p != NULL);
        if (p) p[strlen("\"intermediate_size\": 12")] = '9';
        CHECK_OK(kmed_file_write_atomic(cfg, text, len, &e));
        r = kmed_gemma_load(&m, dir, NULL, &e);
        CHECKF(r == KMED_ERR_SHAPE && strstr(e.msg, "gate") && strstr(e.msg, "129"),
               "intermediate 129: %s", e.msg);
    }
    kmed_free(text);
}

static void test_npy(void)
{
    kmed_error e = {0};
    float a[6] = { 1, 2, 3, 4, 5, -6.5f };
    uint64_t shape[2] = { 2, 3 }, got[KMED_MAX_DIMS];
    void *data = NULL;
    kmed_dtype dt;
    int nd = 0;
    const char *p = "build/test_gemma_tmp.npy";
    CHECK_OK(kmed_npy_write(p, KMED_F32, a, 2, shape, &e));
    CHECK_OK(kmed_npy_read(p, &dt, &nd, got, &data, &e));
    CHECK(dt == KMED_F32 && nd == 2 && got[0] == 2 && got[1] == 3 && data &&
          memcmp(data, a, sizeof a) == 0);
    kmed_free(data);
    remove(p);
}

int main(void)
{
    kmed_pool *pool1 = NULL, *pool2 = NULL;
    kmed_error e = {0};
    int ids[NTOK];
    const char *f = kmed_test_fixtures();
    if (f) snprintf(fx, sizeof fx, "%s", f);
    CHECK_OK(kmed_pool_create(&pool1, 1, &e));
    CHECK_OK(kmed_pool_create(&pool2, 2, &e));
    test_config();
    test_init();
    test_npy();
    if (fx[0]) {
        test_hf(pool1, pool2, ids);
        test_gguf(pool2, ids);
        test_convert_matches_gguf();
        test_bad_model();
    }
    kmed_pool_free(pool1);
    kmed_pool_free(pool2);
    return kmed_test_done();
}

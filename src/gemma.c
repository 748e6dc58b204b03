/* ==== kmed_gemma: Gemma-2 config, weight loading, forward pass with KV cache ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- config ---- */

static kmed_result kmed__gemma_json_int(const kmed_json *root, const char *key, int required,
                                        int def, int *out, const char *name, kmed_error *err)
{
    const kmed_json *j = kmed_json_get(root, key);
    int64_t v;
    if (!j || j->type == KMED_JSON_NULL) {
        if (required)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, name, "missing key \"%s\"", key);
        *out = def;
        return KMED_OK;
    }
    /* eos_token_id may be a list ([1, 107]); the first id is the primary one */
    if (j->type == KMED_JSON_ARRAY && j->len > 0) j = kmed_json_at(j, 0);
    if (!kmed_json_int(j, &v) || v < -1 || v > 0x7fffffff)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "\"%s\": expected an integer", key);
    *out = (int)v;
    return KMED_OK;
}

static kmed_result kmed__gemma_json_float(const kmed_json *root, const char *key, float def,
                                          float null_val, float *out, const char *name,
                                          kmed_error *err)
{
    const kmed_json *j = kmed_json_get(root, key);
    if (!j) { *out = def; return KMED_OK; }
    if (j->type == KMED_JSON_NULL) { *out = null_val; return KMED_OK; }
    if (j->type != KMED_JSON_NUMBER)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "\"%s\": expected a number", key);
    *out = (float)j->num;
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_config_validate(const kmed_gemma_config *c, kmed_error *err)
{
    size_t a;
    if (c->vocab_size <= 0 || c->hidden_size <= 0 || c->intermediate_size <= 0 ||
        c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 || c->head_dim <= 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: sizes must be positive "
                         "(vocab %d, hidden %d, intermediate %d, layers %d, heads %d, "
                         "kv heads %d, head_dim %d)", c->vocab_size, c->hidden_size,
                         c->intermediate_size, c->n_layers, c->n_heads, c->n_kv_heads,
                         c->head_dim);
    if (c->n_heads % c->n_kv_heads != 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: num_attention_heads %d is not "
                         "a multiple of num_key_value_heads %d", c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: head_dim %d must be even "
                         "(RoPE pairs)", c->head_dim);
    if (!(c->rms_norm_eps > 0.0f) || !(c->query_pre_attn_scalar > 0.0f) ||
        !(c->rope_theta > 0.0f) || !(c->attn_softcap >= 0.0f) || !(c->final_softcap >= 0.0f) ||
        !isfinite(c->rms_norm_eps) || !isfinite(c->query_pre_attn_scalar) ||
        !isfinite(c->rope_theta) || !isfinite(c->attn_softcap) || !isfinite(c->final_softcap))
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: rms_norm_eps, "
                         "query_pre_attn_scalar and rope_theta must be finite and > 0, "
                         "soft-caps finite and >= 0");
    if (c->sliding_window < 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: sliding_window %d < 0",
                         c->sliding_window);
    if (!kmed__mul_ok((size_t)c->vocab_size, (size_t)c->hidden_size, &a) ||
        !kmed__mul_ok((size_t)c->n_heads, (size_t)c->head_dim, &a) ||
        !kmed__mul_ok(a, (size_t)c->hidden_size, &a) ||
        !kmed__mul_ok((size_t)c->intermediate_size, (size_t)c->hidden_size, &a))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma config: sizes overflow");
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_config_parse(kmed_gemma_config *cfg, const char *json,
                                             size_t len, const char *name, kmed_error *err)
{
    kmed_json_doc doc;
    const kmed_json *root, *j;
    kmed_gemma_config c;
    kmed_result r;
    float qs;
    memset(&c, 0, sizeof c);
    r = kmed_json_parse(&doc, json, len, name, 0, err);
    if (r != KMED_OK) { kmed_json_free(&doc); return r; }
    root = doc.root;
    if (!root || root->type != KMED_JSON_OBJECT) {
        kmed_json_free(&doc);
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "expected a JSON object");
    }
    j = kmed_json_get(root, "model_type");
    if (j && strcmp(kmed_json_str(j, ""), "gemma2") != 0) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "model_type \"%s\": only gemma2 is "
                       "supported", kmed_json_str(j, "(not a string)"));
        goto done;
    }
    j = kmed_json_get(root, "hidden_activation");
    if (j && j->type != KMED_JSON_NULL &&
        strcmp(kmed_json_str(j, ""), "gelu_pytorch_tanh") != 0) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "hidden_activation \"%s\": only "
                       "gelu_pytorch_tanh is supported", kmed_json_str(j, "(not a string)"));
        goto done;
    }
    if (!kmed_json_bool(kmed_json_get(root, "tie_word_embeddings"), 1)) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "tie_word_embeddings false: Gemma-2 "
                       "ties lm_head to the embedding; an untied head is not supported");
        goto done;
    }
    if (kmed_json_bool(kmed_json_get(root, "attention_bias"), 0)) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "attention_bias true is not "
                       "supported");
        goto done;
    }
    if ((r = kmed__gemma_json_int(root, "vocab_size", 1, 0, &c.vocab_size, name, err)) ||
        (r = kmed__gemma_json_int(root, "hidden_size", 1, 0, &c.hidden_size, name, err)) ||
        (r = kmed__gemma_json_int(root, "intermediate_size", 1, 0, &c.intermediate_size,
                                  name, err)) ||
        (r = kmed__gemma_json_int(root, "num_hidden_layers", 1, 0, &c.n_layers, name, err)) ||
        (r = kmed__gemma_json_int(root, "num_attention_heads", 1, 0, &c.n_heads, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "num_key_value_heads", 1, 0, &c.n_kv_heads, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "head_dim", 1, 0, &c.head_dim, name, err)) ||
        (r = kmed__gemma_json_int(root, "sliding_window", 0, 4096, &c.sliding_window, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "max_position_embeddings", 0, 8192,
                                  &c.max_position, name, err)) ||
        (r = kmed__gemma_json_int(root, "bos_token_id", 0, 2, &c.bos_id, name, err)) ||
        (r = kmed__gemma_json_int(root, "eos_token_id", 0, 1, &c.eos_id, name, err)) ||
        (r = kmed__gemma_json_int(root, "pad_token_id", 0, 0, &c.pad_id, name, err)) ||
        (r = kmed__gemma_json_float(root, "query_pre_attn_scalar", 256.0f, 0.0f, &qs, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "rms_norm_eps", 1e-6f, 0.0f, &c.rms_norm_eps, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "rope_theta", 10000.0f, 0.0f, &c.rope_theta, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "attn_logit_softcapping", 50.0f, 0.0f,
                                    &c.attn_softcap, name, err)) ||
        (r = kmed__gemma_json_float(root, "final_logit_softcapping", 30.0f, 0.0f,
                                    &c.final_softcap, name, err)))
        goto done;
    c.query_pre_attn_scalar = qs;
    j = kmed_json_get(root, "sliding_window");
    if (j && j->type == KMED_JSON_NULL) c.sliding_window = 0; /* null: every layer global */
    r = kmed_gemma_config_validate(&c, err);
    if (r != KMED_OK && err && name) {
        char tmp[sizeof err->msg];
        snprintf(tmp, sizeof tmp, "%s", err->msg);
        kmed_error_set(err, r, name, 0, (size_t)-1, "%s", tmp);
    }
    if (r == KMED_OK) *cfg = c;
done:
    kmed_json_free(&doc);
    return r;
}

KMED_API kmed_result kmed_gemma_config_load(kmed_gemma_config *cfg, const char *path,
                                            kmed_error *err)
{
    char file[1024];
    char *text = NULL;
    size_t len = 0;
    kmed_result r;
    if (kmed_is_dir(path)) {
        r = kmed_path_join(file, sizeof file, path, "config.json", err);
        if (r != KMED_OK) return r;
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    r = kmed_file_read(file, (size_t)16 << 20, &text, &len, err);
    if (r != KMED_OK) return r;
    r = kmed_gemma_config_parse(cfg, text, len, file, err);
    kmed_free(text);
    return r;
}

/* A numeric GGUF scalar as double; 0 if the key is absent or not a number. */
static int kmed__gemma_gguf_num(const kmed_gguf *g, const char *key, double *out)
{
    const kmed_gguf_kv *kv = kmed_gguf_find_kv(g, key);
    if (!kv) return 0;
    switch (kv->type) {
    case KMED_GGUF_U8: case KMED_GGUF_U16: case KMED_GGUF_U32: case KMED_GGUF_U64:
    case KMED_GGUF_BOOL:
        *out = (double)kv->u; return 1;
    case KMED_GGUF_I8: case KMED_GGUF_I16: case KMED_GGUF_I32: case KMED_GGUF_I64:
        *out = (double)kv->i; return 1;
    case KMED_GGUF_F32: case KMED_GGUF_F64:
        *out = kv->f; return 1;
    default:
        return 0;
    }
}

/* (int)x for a GGUF number: a value outside int (or NaN) becomes -1, which validation
   rejects for sizes, instead of an undefined float-to-int conversion. */
static int kmed__gemma_gguf_int(double x)
{
    return x >= -1.0 && x <= 2147483647.0 ? (int)x : -1;
}

KMED_API kmed_result kmed_gemma_config_from_gguf(kmed_gemma_config *cfg, const kmed_gguf *g,
                                                 kmed_error *err)
{
    static const char *const need[] = {
        "gemma2.embedding_length", "gemma2.block_count", "gemma2.feed_forward_length",
        "gemma2.attention.head_count"
    };
    const kmed_gguf_kv *arch = kmed_gguf_find_kv(g, "general.architecture");
    const kmed_gguf_kv *toks = kmed_gguf_find_kv(g, "tokenizer.ggml.tokens");
    const kmed_tensor_info *emb = kmed_gguf_find_tensor(g, "token_embd.weight");
    kmed_gemma_config c;
    double v[4], x;
    size_t i;
    memset(&c, 0, sizeof c);
    if (!arch || arch->type != KMED_GGUF_STRING || arch->len != 6 ||
        memcmp(arch->str, "gemma2", 6) != 0)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: general.architecture is %s%.*s%s, "
                         "expected gemma2", arch ? "\"" : "", arch && arch->str ?
                         (int)(arch->len > 64 ? 64 : arch->len) : 7,
                         arch && arch->str ? arch->str : "missing", arch ? "\"" : "");
    for (i = 0; i < 4; i++)
        if (!kmed__gemma_gguf_num(g, need[i], &v[i]))
            return KMED__ERR(err, KMED_ERR_NOT_FOUND, "gguf: missing key %s", need[i]);
    c.hidden_size = kmed__gemma_gguf_int(v[0]);
    c.n_layers = kmed__gemma_gguf_int(v[1]);
    c.intermediate_size = kmed__gemma_gguf_int(v[2]);
    c.n_heads = kmed__gemma_gguf_int(v[3]);
    c.n_kv_heads = kmed__gemma_gguf_num(g, "gemma2.attention.head_count_kv", &x)
                       ? kmed__gemma_gguf_int(x) : c.n_heads;
    c.head_dim = kmed__gemma_gguf_num(g, "gemma2.attention.key_length", &x)
                     ? kmed__gemma_gguf_int(x) : (c.n_heads > 0 ? c.hidden_size / c.n_heads : 0);
    /* llama.cpp: 1/sqrt(key_length), except its 27B case (46 blocks): sqrt(C / H) */
    c.query_pre_attn_scalar = c.n_layers == 46 && c.n_heads > 0
                                  ? (float)c.hidden_size / (float)c.n_heads
                                  : (float)c.head_dim;
    c.rms_norm_eps = kmed__gemma_gguf_num(g, "gemma2.attention.layer_norm_rms_epsilon", &x)
                         ? (float)x : 1e-6f;
    c.rope_theta = kmed__gemma_gguf_num(g, "gemma2.rope.freq_base", &x) ? (float)x : 10000.0f;
    c.attn_softcap = kmed__gemma_gguf_num(g, "gemma2.attn_logit_softcapping", &x) ? (float)x
                                                                                   : 0.0f;
    c.final_softcap = kmed__gemma_gguf_num(g, "gemma2.final_logit_softcapping", &x)
                          ? (float)x : 0.0f;
    c.sliding_window = kmed__gemma_gguf_num(g, "gemma2.attention.sliding_window", &x)
                           ? kmed__gemma_gguf_int(x) : 0;
    c.max_position = kmed__gemma_gguf_num(g, "gemma2.context_length", &x)
                         ? kmed__gemma_gguf_int(x) : 8192;
    c.bos_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.bos_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 2;
    c.eos_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.eos_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 1;
    c.pad_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.padding_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 0;
    if (kmed__gemma_gguf_num(g, "gemma2.vocab_size", &x)) c.vocab_size = kmed__gemma_gguf_int(x);
    else if (toks && toks->type == KMED_GGUF_ARRAY && toks->n < 0x7fffffff)
        c.vocab_size = (int)toks->n;
    else if (emb && emb->ndim == 2 && emb->shape[0] < 0x7fffffff)
        c.vocab_size = (int)emb->shape[0];
    else
        return KMED__ERR(err, KMED_ERR_NOT_FOUND, "gguf: no vocabulary size "
                         "(tokenizer.ggml.tokens or token_embd.weight)");
    {
        kmed_result r = kmed_gemma_config_validate(&c, err);
        if (r != KMED_OK) return r;
    }
    *cfg = c;
    return KMED_OK;
}

/* ---- weights ---- */

typedef struct kmed__gemma_impl {
    kmed_st st;
    kmed_gguf gguf;
    int has_st, has_gguf;
    size_t n_borrowed;          /* weights pointing into the mapped file */
    void **bufs;                /* converted weights */
    size_t n_bufs;
    float *norms;               /* ((4L + 1) * C) */
    kmed_gemma_layer *layers;   /* (L) */
} kmed__gemma_impl;

KMED_API kmed_result kmed_gemma_init(kmed_gemma *m, const kmed_gemma_config *cfg,
                                     kmed_error *err)
{
    kmed__gemma_impl *im;
    size_t L, C, l;
    kmed_result r;
    memset(m, 0, sizeof *m);
    r = kmed_gemma_config_validate(cfg, err);
    if (r != KMED_OK) return r;
    L = (size_t)cfg->n_layers;
    C = (size_t)cfg->hidden_size;
    im = (kmed__gemma_impl *)kmed__calloc(1, sizeof *im);
    if (!im) return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory");
    m->impl_ = im;
    m->cfg = *cfg;
    im->layers = (kmed_gemma_layer *)kmed__calloc(L, sizeof *im->layers);
    im->norms = (float *)kmed__calloc(4 * L + 1, C * sizeof(float));
    im->bufs = (void **)kmed__calloc(7 * L + 1, sizeof(void *));
    if (!im->layers || !im->norms || !im->bufs) {
        kmed_gemma_free(m);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory");
    }
    m->layers = im->layers;
    for (l = 0; l < L; l++) {
        m->layers[l].attn_norm = im->norms + (4 * l + 0) * C;
        m->layers[l].post_attn_norm = im->norms + (4 * l + 1) * C;
        m->layers[l].pre_ffn_norm = im->norms + (4 * l + 2) * C;
        m->layers[l].post_ffn_norm = im->norms + (4 * l + 3) * C;
    }
    m->final_norm = im->norms + 4 * L * C;
    return KMED_OK;
}

KMED_API void kmed_gemma_free(kmed_gemma *m)
{
    kmed__gemma_impl *im;
    size_t i;
    if (!m) return;
    im = (kmed__gemma_impl *)m->impl_;
    if (im) {
        for (i = 0; i < im->n_bufs; i++) KMED_FREE(im->bufs[i]);
        KMED_FREE(im->bufs);
        KMED_FREE(im->norms);
        KMED_FREE(im->layers);
        if (im->has_st) kmed_st_close(&im->st);
        if (im->has_gguf) kmed_gguf_close(&im->gguf);
        KMED_FREE(im);
    }
    memset(m, 0, sizeof *m);
}

static kmed_result kmed__gemma_check_weight(const kmed_weight *w, const char *what, int l,
                                            size_t rows, size_t cols, kmed_error *err)
{
    char name[64];
    if (l < 0) snprintf(name, sizeof name, "%s", what);
    else snprintf(name, sizeof name, "%s of layer %d", what, l);
    if (!w->data)
        return KMED__ERR(err, KMED_ERR_STATE, "gemma: weight %s is not set", name);
    if (!kmed_dtype_computable(w->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gemma: weight %s has dtype %s, which "
                         "kmed cannot compute with", name, kmed_dtype_name(w->type));
    if (w->rows != rows || w->cols != cols)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma: weight %s is [%zu, %zu], expected "
                         "[%zu, %zu] from the config", name, w->rows, w->cols, rows, cols);
    if (w->type == KMED_Q8_0 || w->type == KMED_Q4_0 ? cols % KMED_QK != 0 : 0)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma: weight %s: %zu columns is not a "
                         "multiple of %d", name, cols, KMED_QK);
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_validate(const kmed_gemma *m, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t QD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    int l;
    kmed_result r;
    if (!m->layers || !m->final_norm)
        return KMED__ERR(err, KMED_ERR_STATE, "gemma: model not initialised");
    r = kmed__gemma_check_weight(&m->embed, "embed", -1, (size_t)c->vocab_size, C, err);
    if (r != KMED_OK) return r;
    for (l = 0; l < c->n_layers; l++) {
        const kmed_gemma_layer *y = &m->layers[l];
        if ((r = kmed__gemma_check_weight(&y->q, "q", l, QD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->k, "k", l, KD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->v, "v", l, KD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->o, "o", l, C, QD, err)) ||
            (r = kmed__gemma_check_weight(&y->gate, "gate", l, F, C, err)) ||
            (r = kmed__gemma_check_weight(&y->up, "up", l, F, C, err)) ||
            (r = kmed__gemma_check_weight(&y->down, "down", l, C, F, err)))
            return r;
        if (!y->attn_norm || !y->post_attn_norm || !y->pre_ffn_norm || !y->post_ffn_norm)
            return KMED__ERR(err, KMED_ERR_STATE, "gemma: a norm of layer %d is not set", l);
    }
    return KMED_OK;
}

KMED_API size_t kmed_gemma_weight_bytes(const kmed_gemma *m)
{
    size_t total = 0, C = (size_t)m->cfg.hidden_size;
    int l;
    const kmed_weight *w;
    if (!m->layers) return 0;
    total += kmed_dtype_bytes(m->embed.type, (uint64_t)m->embed.rows * m->embed.cols);
    for (l = 0; l < m->cfg.n_layers; l++) {
        for (w = &m->layers[l].q; w <= &m->layers[l].down; w++)
            total += kmed_dtype_bytes(w->type, (uint64_t)w->rows * w->cols);
    }
    return total + (4 * (size_t)m->cfg.n_layers + 1) * C * sizeof(float);
}

/* Fills w from a stored tensor: borrowed when the stored dtype is the target, converted
   row by row otherwise. target KMED_DTYPE_UNKNOWN keeps the stored dtype. */
static kmed_result kmed__gemma_set_weight(kmed_gemma *m, kmed_weight *w,
                                          const kmed_tensor_info *t, kmed_dtype target,
                                          int may_release, const char *file, kmed_error *err)
{
    kmed__gemma_impl *im = (kmed__gemma_impl *)m->impl_;
    size_t rows, cols, src_row, dst_row, i, done = 0;
    unsigned char *buf;
    float *tmp;
    if (t->ndim != 2)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s has %d dims, expected 2",
                          t->name, t->ndim);
    rows = (size_t)t->shape[0];
    cols = (size_t)t->shape[1];
    if (!kmed_dtype_computable(t->dtype))
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: stored type %s is "
                          "not supported (F32, F16, BF16, Q8_0, Q4_0)", t->name,
                          t->dtype == KMED_DTYPE_UNKNOWN ? kmed_ggml_type_name(t->ggml_type)
                                                         : kmed_dtype_name(t->dtype));
    if (target == KMED_DTYPE_UNKNOWN || target == t->dtype) {
        w->data = t->data;
        w->type = t->dtype;
        w->rows = rows;
        w->cols = cols;
        im->n_borrowed++;
        return KMED_OK;
    }
    if (!kmed_dtype_computable(target))
        return KMED__ERR(err, KMED_ERR_ARG, "gemma: cannot compute with dtype %s",
                         kmed_dtype_name(target));
    dst_row = kmed_dtype_bytes(target, cols);
    src_row = kmed_dtype_bytes(t->dtype, cols);
    if (!dst_row || !src_row)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s: row length %zu is not a "
                          "multiple of %d, required by %s", t->name, cols, KMED_QK,
                          kmed_dtype_name(dst_row ? t->dtype : target));
    buf = (unsigned char *)kmed__calloc(rows, dst_row);
    tmp = (float *)kmed__calloc(cols, sizeof(float));
    if (!buf || !tmp) {
        KMED_FREE(buf);
        KMED_FREE(tmp);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory converting %s", t->name);
    }
    for (i = 0; i < rows; i++) {
        const unsigned char *src = (const unsigned char *)t->data;
        kmed_dequantize_row(t->dtype, src + i * src_row, tmp, cols);
        kmed_quantize_row(target, tmp, buf + i * dst_row, cols);
        /* release the consumed source every ~8 MB: a large embedding stays off the peak */
        if (may_release && (i + 1) * src_row - done >= ((size_t)8 << 20)) {
            kmed__release_pages(src + done, (i + 1) * src_row - done);
            done = (i + 1) * src_row;
        }
    }
    KMED_FREE(tmp);
    if (may_release) kmed__release_pages(t->data, t->nbytes);
    im->bufs[im->n_bufs++] = buf;
    w->data = buf;
    w->type = target;
    w->rows = rows;
    w->cols = cols;
    return KMED_OK;
}

/* Copies a stored norm vector into f32 dst (C), subtracting 1 for GGUF (which stores 1+w). */
static kmed_result kmed__gemma_set_norm(float *dst, const kmed_tensor_info *t, size_t C,
                                        int gguf, const char *file, kmed_error *err)
{
    size_t i;
    if (kmed_tensor_numel(t) != C || t->ndim != 1)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s: expected shape [%zu]",
                          t->name, C);
    if (t->dtype != KMED_F32 && t->dtype != KMED_F16 && t->dtype != KMED_BF16)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: norm type %s, "
                          "expected F32, F16 or BF16", t->name, kmed_dtype_name(t->dtype));
    kmed_dequantize_row(t->dtype, t->data, dst, C);
    if (gguf)
        for (i = 0; i < C; i++) dst[i] -= 1.0f;
    return KMED_OK;
}

/* Tensor names of one layer in HF and llama.cpp spelling, in kmed_gemma_layer order:
   q k v o gate up down, then the norms attn post_attn pre_ffn post_ffn. */
static const char *const kmed__gemma_hf_names[11] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm"
};
static const char *const kmed__gemma_gguf_names[11] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"
};

static const kmed_tensor_info *kmed__gemma_find(const kmed__gemma_impl *im, const char *name)
{
    return im->has_gguf ? kmed_gguf_find_tensor(&im->gguf, name) : kmed_st_find(&im->st, name);
}

KMED_API kmed_result kmed_gemma_load(kmed_gemma *m, const char *path,
                                     const kmed_gemma_opts *opts, kmed_error *err)
{
    kmed_gemma_config cfg;
    kmed_gemma_opts def;
    kmed__gemma_impl *im;
    kmed_gguf g;
    kmed_st st;
    kmed_result r;
    kmed_dtype target;
    size_t plen = strlen(path), C, l, done = 0, total;
    int is_gguf = plen >= 5 && strcmp(path + plen - 5, ".gguf") == 0 && !kmed_is_dir(path);
    int t;
    char name[256];
    const kmed_tensor_info *ti;
    const char *const *names = is_gguf ? kmed__gemma_gguf_names : kmed__gemma_hf_names;

    memset(m, 0, sizeof *m);
    if (!opts) {
        memset(&def, 0, sizeof def);
        opts = &def;
    }
    target = opts->convert ? opts->type : KMED_DTYPE_UNKNOWN;
    if (opts->convert && !kmed_dtype_computable(target))
        return KMED__ERR(err, KMED_ERR_ARG, "gemma: compute type %s is not one of F32, F16, "
                         "BF16, Q8_0, Q4_0", kmed_dtype_name(target));
    if (is_gguf) {
        r = kmed_gguf_open(&g, path, err);
        if (r != KMED_OK) return r;
        r = kmed_gemma_config_from_gguf(&cfg, &g, err);
        if (r != KMED_OK) {
            kmed_gguf_close(&g);
            return r;
        }
    } else {
        char dir[1024];
        FILE *probe = kmed_is_dir(path) ? NULL : fopen(path, "rb");
        if (!kmed_is_dir(path) && !probe)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "no such model directory or "
                              ".gguf/.safetensors file");
        if (probe) fclose(probe);
        if (kmed_is_dir(path)) {
            snprintf(dir, sizeof dir, "%s", path);
        } else {
            const char *slash = strrchr(path, '/');
            if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
            else snprintf(dir, sizeof dir, ".");
        }
        r = kmed_gemma_config_load(&cfg, dir, err);
        if (r != KMED_OK) return r;
        r = kmed_st_open(&st, path, err);
        if (r != KMED_OK) return r;
    }
    r = kmed_gemma_init(m, &cfg, err);
    if (r != KMED_OK) {
        if (is_gguf) kmed_gguf_close(&g);
        else kmed_st_close(&st);
        return r;
    }
    im = (kmed__gemma_impl *)m->impl_;
    if (is_gguf) { im->gguf = g; im->has_gguf = 1; }
    else { im->st = st; im->has_st = 1; }
    C = (size_t)cfg.hidden_size;
    total = 11 * (size_t)cfg.n_layers + 2;

    ti = kmed__gemma_find(im, is_gguf ? "token_embd.weight" : "model.embed_tokens.weight");
    if (!ti) {
        r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s",
                       is_gguf ? "token_embd.weight" : "model.embed_tokens.weight");
        goto fail;
    }
    r = kmed__gemma_set_weight(m, &m->embed, ti, target, 1, path, err);
    if (r != KMED_OK) goto fail;
    kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
    for (l = 0; l < (size_t)cfg.n_layers; l++) {
        kmed_gemma_layer *y = &m->layers[l];
        kmed_weight *ws[7];
        float *ns[4];
        ws[0] = &y->q; ws[1] = &y->k; ws[2] = &y->v; ws[3] = &y->o;
        ws[4] = &y->gate; ws[5] = &y->up; ws[6] = &y->down;
        ns[0] = y->attn_norm; ns[1] = y->post_attn_norm;
        ns[2] = y->pre_ffn_norm; ns[3] = y->post_ffn_norm;
        for (t = 0; t < 11; t++) {
            if (is_gguf) snprintf(name, sizeof name, "blk.%zu.%s.weight", l, names[t]);
            else snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, names[t]);
            ti = kmed__gemma_find(im, name);
            if (!ti) {
                r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s", name);
                goto fail;
            }
            if (t < 7) r = kmed__gemma_set_weight(m, ws[t], ti, target, 1, path, err);
            else r = kmed__gemma_set_norm(ns[t - 7], ti, C, is_gguf, path, err);
            if (r != KMED_OK) goto fail;
            kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
        }
    }
    ti = kmed__gemma_find(im, is_gguf ? "output_norm.weight" : "model.norm.weight");
    if (!ti) {
        r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s",
                       is_gguf ? "output_norm.weight" : "model.norm.weight");
        goto fail;
    }
    r = kmed__gemma_set_norm(m->final_norm, ti, C, is_gguf, path, err);
    if (r != KMED_OK) goto fail;
    kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
    r = kmed_gemma_validate(m, err);
    if (r != KMED_OK) goto fail;
    /* every weight converted: the file is no longer needed */
    if (im->n_borrowed == 0) {
        if (im->has_st) kmed_st_close(&im->st);
        if (im->has_gguf) kmed_gguf_close(&im->gguf);
        im->has_st = im->has_gguf = 0;
    }
    kmed_log(&opts->cb, KMED_LOG_INFO, "loaded %s: %d layers, hidden %d, vocab %d, %.1f MB "
             "of weights", path, cfg.n_layers, cfg.hidden_size, cfg.vocab_size,
             (double)kmed_gemma_weight_bytes(m) / 1e6);
    return KMED_OK;
fail:
    kmed_gemma_free(m);
    return r;
}

/* ---- forward ---- */

typedef struct kmed__gemma_scratch {
    size_t n_cap, r_cap, s_cap;
    int threads_cap;
    float *x, *xn, *q, *att, *tmp, *g, *u, *xa;  /* see kmed__gemma_scratch_ensure */
    float *scores;                                /* (threads, S) */
    int *pos;                                     /* (n) */
    int validated;
} kmed__gemma_scratch;

KMED_API kmed_result kmed_gemma_state_init(kmed_gemma_state *st, const kmed_gemma *m,
                                           size_t max_tokens, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t kv = (size_t)c->n_kv_heads * (size_t)c->head_dim, n;
    memset(st, 0, sizeof *st);
    if (max_tokens == 0 || max_tokens > 0x7fffffff)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma state: max_tokens %zu out of range",
                         max_tokens);
    if (!kmed__mul_ok((size_t)c->n_layers, max_tokens, &n) || !kmed__mul_ok(n, kv, &n) ||
        !kmed__mul_ok(n, sizeof(float), &n))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma state: KV cache size overflows");
    st->k_cache = (float *)KMED_MALLOC(n ? n : 1);
    st->v_cache = (float *)KMED_MALLOC(n ? n : 1);
    st->impl_ = kmed__calloc(1, sizeof(kmed__gemma_scratch));
    if (!st->k_cache || !st->v_cache || !st->impl_) {
        kmed_gemma_state_free(st);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma state: out of memory for a KV cache of "
                         "%zu bytes", 2 * n);
    }
    st->max_tokens = max_tokens;
    return KMED_OK;
}

static void kmed__gemma_scratch_free(kmed__gemma_scratch *s)
{
    KMED_FREE(s->x);
    KMED_FREE(s->scores);
    KMED_FREE(s->pos);
    s->x = s->scores = NULL;
    s->pos = NULL;
}

KMED_API void kmed_gemma_state_free(kmed_gemma_state *st)
{
    if (!st) return;
    if (st->impl_) {
        kmed__gemma_scratch_free((kmed__gemma_scratch *)st->impl_);
        KMED_FREE(st->impl_);
    }
    KMED_FREE(st->k_cache);
    KMED_FREE(st->v_cache);
    memset(st, 0, sizeof *st);
}

KMED_API kmed_result kmed_gemma_state_set_pos(kmed_gemma_state *st, size_t pos,
                                              kmed_error *err)
{
    if (pos > st->pos)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma state: cannot move forward to position "
                         "%zu (cache holds %zu tokens)", pos, st->pos);
    st->pos = pos;
    return KMED_OK;
}

/* Grows the scratch for n rows, LoRA rank r and `threads` attention rows of S keys. */
static kmed_result kmed__gemma_scratch_ensure(kmed__gemma_scratch *s, const kmed_gemma *m,
                                              size_t n, size_t r, size_t S, int threads,
                                              kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t QD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t per_row, total;
    if (n <= s->n_cap && r <= s->r_cap && S <= s->s_cap && threads <= s->threads_cap)
        return KMED_OK;
    if (n < s->n_cap) n = s->n_cap;
    if (r < s->r_cap) r = s->r_cap;
    if (S < s->s_cap) S = s->s_cap;
    if (threads < s->threads_cap) threads = s->threads_cap;
    kmed__gemma_scratch_free(s);
    s->n_cap = s->r_cap = s->s_cap = 0;
    s->threads_cap = 0;
    /* x, xn, tmp: C; q, att: QD; g, u: F; xa: r */
    per_row = 3 * C + 2 * QD + 2 * F + r;
    if (!kmed__mul_ok(per_row, n, &total))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma: scratch size overflows");
    s->x = (float *)kmed__calloc(total, sizeof(float));
    s->scores = (float *)kmed__calloc((size_t)threads, S * sizeof(float));
    s->pos = (int *)kmed__calloc(n, sizeof(int));
    if (!s->x || !s->scores || !s->pos) {
        kmed__gemma_scratch_free(s);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory for scratch (%zu rows)",
                         n);
    }
    s->xn = s->x + n * C;
    s->tmp = s->xn + n * C;
    s->q = s->tmp + n * C;
    s->att = s->q + n * QD;
    s->g = s->att + n * QD;
    s->u = s->g + n * F;
    s->xa = s->u + n * F;
    s->n_cap = n;
    s->r_cap = r;
    s->s_cap = S;
    s->threads_cap = threads;
    return KMED_OK;
}

typedef struct kmed__gemma_attn_ctx {
    float *out;
    const float *q, *k, *v;
    const int *pos;
    float *scores;
    size_t N, S, H, Hkv, D, window;
    float scale, softcap;
} kmed__gemma_attn_ctx;

static void kmed__gemma_attn_job(void *ctx, size_t begin, size_t end, int thread)
{
    kmed__gemma_attn_ctx *a = (kmed__gemma_attn_ctx *)ctx;
    kmed__attention_forward(a->out, NULL, a->q, a->k, a->v, a->pos,
                            a->scores + (size_t)thread * a->S, a->N, a->S, a->H, a->Hkv,
                            a->D, a->scale, a->softcap, a->window, begin, end);
}

/* Below these sizes a parallel-for costs more than it saves (decode steps): rows for the
   elementwise jobs, query rows x keys for attention. */
#define KMED__GEMMA_PAR_ROWS 4
#define KMED__GEMMA_PAR_KEYS 256

/* Row-parallel elementwise work of the forward: GeGLU and the residual norms. */
typedef struct kmed__gemma_rows_ctx {
    int op;                     /* 0: geglu g = gelu(g) * u; 1: x += rmsnorm(t) */
    float *g; const float *u;   /* (n, F) */
    float *x, *t;               /* (n, C) */
    const float *w;
    size_t width;
    float eps;
} kmed__gemma_rows_ctx;

static void kmed__gemma_rows_job(void *ctx, size_t begin, size_t end, int thread)
{
    kmed__gemma_rows_ctx *c = (kmed__gemma_rows_ctx *)ctx;
    size_t W = c->width, i;
    (void)thread;
    if (c->op == 0) {
        kmed__geglu_forward(c->g + begin * W, c->g + begin * W, c->u + begin * W,
                            (end - begin) * W);
        return;
    }
    kmed__rmsnorm_forward(c->t + begin * W, NULL, c->t + begin * W, c->w, end - begin, W,
                          c->eps);
    for (i = begin * W; i < end * W; i++) c->x[i] += c->t[i];
}

/* x += rmsnorm(t) * (1 + w) over n rows (the post-attention / post-FFN residual). */
static void kmed__gemma_residual(kmed_pool *pool, float *x, float *t, const float *w,
                                 size_t n, size_t C, float eps)
{
    kmed__gemma_rows_ctx c;
    memset(&c, 0, sizeof c);
    c.op = 1;
    c.x = x;
    c.t = t;
    c.w = w;
    c.width = C;
    c.eps = eps;
    kmed_pool_for(n >= KMED__GEMMA_PAR_ROWS ? pool : NULL, n, 1, kmed__gemma_rows_job, &c);
}

/* y (n, out) = x W^T, plus the LoRA delta of target t when the adapter has it. */
static void kmed__gemma_linear(kmed_pool *pool, float *y, const float *x, const kmed_weight *w,
                               const kmed_lora *lora, size_t layer, int target, float *xa,
                               size_t n, int mm_flags)
{
    kmed_matmul(pool, y, x, w->data, w->type, n, w->rows, w->cols, mm_flags);
    if (lora && (lora->targets & (1u << target))) {
        const kmed_lora_ab *ab = &lora->ab[layer][target];
        if (ab->A && ab->B)
            kmed__lora_forward(pool, y, xa, x, ab->A, ab->B, n, w->rows, w->cols,
                               (size_t)lora->r, lora->scale);
    }
}

KMED_API kmed_result kmed_gemma_forward(const kmed_gemma *m, const kmed_lora *lora,
                                        kmed_gemma_state *st, kmed_pool *pool,
                                        const int *ids, size_t n, int flags,
                                        float *logits, float *hidden, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    kmed__gemma_scratch *s = (kmed__gemma_scratch *)st->impl_;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads, D = (size_t)c->head_dim;
    size_t L = (size_t)c->n_layers, V = (size_t)c->vocab_size;
    size_t KD = Hkv * D, pos0 = st->pos, S, l, i;
    int mm = (flags & KMED_FWD_FAST) ? KMED_MM_FAST : 0;
    int threads = kmed_pool_threads(pool);
    kmed__gemma_attn_ctx actx;
    kmed__gemma_rows_ctx rctx;
    kmed_result r;

    if (!s) return KMED__ERR(err, KMED_ERR_STATE, "gemma: state not initialised");
    if (n == 0) return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: no tokens");
    if ((flags & (KMED_FWD_LOGITS_LAST | KMED_FWD_LOGITS_ALL)) && !logits)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: logits requested, pointer NULL");
    if (n > st->max_tokens || pos0 > st->max_tokens - n)
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma forward: %zu + %zu tokens exceed the "
                         "state's %zu positions", pos0, n, st->max_tokens);
    for (i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= V)
            return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: token %zu has id %d outside "
                             "[0, %zu)", i, ids[i], V);
    if (lora && lora->n_layers != c->n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma forward: adapter has %d layers, model "
                         "%d", lora->n_layers, c->n_layers);
    if (!s->validated) {
        r = kmed_gemma_validate(m, err);
        if (r != KMED_OK) return r;
        s->validated = 1;
    }
    S = pos0 + n;
    r = kmed__gemma_scratch_ensure(s, m, n, lora ? (size_t)lora->r : 0, st->max_tokens,
                                   threads, err);
    if (r != KMED_OK) return r;
    for (i = 0; i < n; i++) s->pos[i] = (int)(pos0 + i);

    kmed__embed_forward(s->x, ids, m->embed.data, m->embed.type, n, C);
    if (hidden) memcpy(hidden, s->x, n * C * sizeof(float));

    memset(&rctx, 0, sizeof rctx);
    rctx.width = F;
    actx.q = s->q;
    actx.out = s->att;
    actx.pos = s->pos;
    actx.scores = s->scores;
    actx.N = n;
    actx.S = S;
    actx.H = H;
    actx.Hkv = Hkv;
    actx.D = D;
    actx.scale = (float)(1.0 / sqrt((double)c->query_pre_attn_scalar));
    actx.softcap = c->attn_softcap;
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *y = &m->layers[l];
        float *kc = st->k_cache + (l * st->max_tokens) * KD; /* (max_tokens, Hkv*D) */
        float *vc = st->v_cache + (l * st->max_tokens) * KD; /* (max_tokens, Hkv*D) */

        kmed__rmsnorm_forward(s->xn, NULL, s->x, y->attn_norm, n, C, c->rms_norm_eps);
        kmed__gemma_linear(pool, s->q, s->xn, &y->q, lora, l, KMED_LORA_Q, s->xa, n, mm);
        kmed__gemma_linear(pool, kc + pos0 * KD, s->xn, &y->k, lora, l, KMED_LORA_K, s->xa,
                           n, mm);
        kmed__gemma_linear(pool, vc + pos0 * KD, s->xn, &y->v, lora, l, KMED_LORA_V, s->xa,
                           n, mm);
        kmed__rope_forward(s->q, s->q, s->pos, n, H, D, c->rope_theta);
        kmed__rope_forward(kc + pos0 * KD, kc + pos0 * KD, s->pos, n, Hkv, D, c->rope_theta);

        /* even layers use the sliding window (Gemma-2 alternates local and global) */
        actx.window = (l % 2 == 0) ? (size_t)c->sliding_window : 0;
        actx.k = kc;
        actx.v = vc;
        kmed_pool_for(n * S >= KMED__GEMMA_PAR_KEYS ? pool : NULL, H, 1, kmed__gemma_attn_job,
                      &actx);

        kmed__gemma_linear(pool, s->tmp, s->att, &y->o, lora, l, KMED_LORA_O, s->xa, n, mm);
        kmed__gemma_residual(pool, s->x, s->tmp, y->post_attn_norm, n, C, c->rms_norm_eps);

        kmed__rmsnorm_forward(s->xn, NULL, s->x, y->pre_ffn_norm, n, C, c->rms_norm_eps);
        kmed__gemma_linear(pool, s->g, s->xn, &y->gate, lora, l, KMED_LORA_GATE, s->xa, n,
                           mm);
        kmed__gemma_linear(pool, s->u, s->xn, &y->up, lora, l, KMED_LORA_UP, s->xa, n, mm);
        rctx.g = s->g;
        rctx.u = s->u;
        kmed_pool_for(n >= KMED__GEMMA_PAR_ROWS ? pool : NULL, n, 1, kmed__gemma_rows_job,
                      &rctx);
        kmed__gemma_linear(pool, s->tmp, s->g, &y->down, lora, l, KMED_LORA_DOWN, s->xa, n,
                           mm);
        kmed__gemma_residual(pool, s->x, s->tmp, y->post_ffn_norm, n, C, c->rms_norm_eps);
        if (hidden) memcpy(hidden + (l + 1) * n * C, s->x, n * C * sizeof(float));
    }

    if (flags & (KMED_FWD_LOGITS_LAST | KMED_FWD_LOGITS_ALL)) {
        size_t first = (flags & KMED_FWD_LOGITS_ALL) ? 0 : n - 1, rows = n - first;
        kmed__rmsnorm_forward(s->xn, NULL, s->x + first * C, m->final_norm, rows, C,
                              c->rms_norm_eps);
        kmed_matmul(pool, logits, s->xn, m->embed.data, m->embed.type, rows, V, C, mm);
        kmed__softcap_forward(logits, logits, rows * V, c->final_softcap);
    }
    st->pos = pos0 + n;
    return KMED_OK;
}

/* ---- .npy ---- */

KMED_API kmed_result kmed_npy_write(const char *path, kmed_dtype dtype, const void *data,
                                    int ndim, const uint64_t *shape, kmed_error *err)
{
    char hdr[256];
    size_t hl, pad, n = 1, bytes;
    int i, k;
    const char *descr = dtype == KMED_F32 ? "<f4" : dtype == KMED_I32 ? "<i4"
                        : dtype == KMED_I64 ? "<i8" : NULL;
    if (!descr || ndim < 0 || ndim > KMED_MAX_DIMS)
        return KMED__ERRF(err, KMED_ERR_ARG, path, "npy: only F32/I32/I64 up to %d dims",
                          KMED_MAX_DIMS);
    k = snprintf(hdr + 10, sizeof hdr - 10, "{'descr': '%s', 'fortran_order': False, "
                 "'shape': (", descr);
    for (i = 0; i < ndim; i++) {
        k += snprintf(hdr + 10 + k, sizeof hdr - 10 - (size_t)k, "%llu%s",
                      (unsigned long long)shape[i], ndim == 1 || i + 1 < ndim ? ", " : "");
        if (!kmed__mul_ok(n, (size_t)shape[i], &n))
            return KMED__ERRF(err, KMED_ERR_LIMIT, path, "npy: shape overflows");
    }
    if (ndim == 1) k -= 1; /* "(n,)" */
    k += snprintf(hdr + 10 + k, sizeof hdr - 10 - (size_t)k, "), }");
    hl = 10 + (size_t)k + 1;
    pad = (64 - hl % 64) % 64;  /* header (with its newline) padded to 64 bytes */
    memset(hdr + 10 + k, ' ', pad);
    hdr[10 + k + pad] = '\n';
    hl += pad;
    memcpy(hdr, "\x93NUMPY\x01\x00", 8);
    hdr[8] = (char)((hl - 10) & 0xff);
    hdr[9] = (char)((hl - 10) >> 8);
    if (!kmed__mul_ok(n, dtype == KMED_I64 ? 8 : 4, &bytes))
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "npy: size overflows");
    {
        kmed_afile a;
        kmed_result r = kmed_afile_open(&a, path, err);
        if (r != KMED_OK) return r;
        if ((r = kmed_afile_write(&a, hdr, hl, err)) != KMED_OK ||
            (r = kmed_afile_write(&a, data, bytes, err)) != KMED_OK) {
            kmed_afile_abort(&a);
            return r;
        }
        return kmed_afile_commit(&a, err);
    }
}

KMED_API kmed_result kmed_npy_read(const char *path, kmed_dtype *dtype, int *ndim,
                                   uint64_t *shape, void **data, kmed_error *err)
{
    char *buf = NULL, *h, *p, *end;
    size_t len = 0, hl, off, n = 1, esz, bytes;
    int nd = 0;
    kmed_result r = kmed_file_read(path, 0, &buf, &len, err);
    *data = NULL;
    if (r != KMED_OK) return r;
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0) goto bad;
    if (buf[6] == 1) { hl = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8; off = 10; }
    else if (buf[6] == 2 || buf[6] == 3) {
        if (len < 12) goto bad;
        hl = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8 |
             (size_t)(unsigned char)buf[10] << 16 | (size_t)(unsigned char)buf[11] << 24;
        off = 12;
    } else goto bad;
    if (hl > len - off) goto bad;
    h = buf + off;
    end = h + hl;
    {
        char save = *end;
        *end = 0;
        if (strstr(h, "'fortran_order': True")) { *end = save; goto bad; }
        if (strstr(h, "'<f4'")) { *dtype = KMED_F32; esz = 4; }
        else if (strstr(h, "'<i4'")) { *dtype = KMED_I32; esz = 4; }
        else if (strstr(h, "'<i8'")) { *dtype = KMED_I64; esz = 8; }
        else { *end = save; goto bad; }
        p = strstr(h, "'shape': (");
        if (!p) { *end = save; goto bad; }
        p += 10;
        while (*p && *p != ')') {
            char *q;
            unsigned long long v;
            while (*p == ' ' || *p == ',') p++;
            if (*p == ')') break;
            v = strtoull(p, &q, 10);
            if (q == p || nd >= KMED_MAX_DIMS || !kmed__mul_ok(n, (size_t)v, &n)) {
                *end = save;
                goto bad;
            }
            shape[nd++] = v;
            p = q;
        }
        *end = save;
    }
    if (!kmed__mul_ok(n, esz, &bytes) || bytes != len - off - hl) goto bad;
    *data = KMED_MALLOC(bytes ? bytes : 1);
    if (!*data) {
        kmed_free(buf);
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "npy: out of memory");
    }
    memcpy(*data, buf + off + hl, bytes);
    *ndim = nd;
    kmed_free(buf);
    return KMED_OK;
bad:
    kmed_free(buf);
    return KMED__ERRF(err, KMED_ERR_FORMAT, path, "not a little-endian C-order float32/int32/"
                      "int64 .npy file");
}

/* ==== kmed_convert: model export (HF safetensors, GGUF) and random init ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One exported tensor: a linear weight (or the embedding) or a norm vector, with its names
   in both layouts. */
typedef struct kmed__cv_entry {
    char hf[96], gg[64];
    const kmed_weight *w;    /* NULL for a norm */
    const float *norm;       /* (cols) norm w, or NULL */
    size_t rows, cols;       /* a norm has rows 1 */
    int is_embed, is_norm;
    int layer, target;       /* linear layer weights: layer and KMED_LORA_* target, else -1 */
    size_t index;            /* position in model order (seeds random init) */
} kmed__cv_entry;

/* Source of f32 rows: the model, or the random initialiser. */
typedef kmed_result (*kmed__cv_fill_fn)(void *ctx, const kmed__cv_entry *e, size_t row,
                                        float *out);

/* Names in kmed_gemma_layer order (q k v o gate up down, norms attn post_attn pre_ffn
   post_ffn). */
static const char *const kmed__cv_hf_layer[11] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm"
};
static const char *const kmed__cv_gg_layer[11] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"
};

/* Entries in model order: embedding, each layer's 11 tensors, final norm. m may be a shell
   whose weights are unset (random init): only shapes are taken from cfg then. */
static kmed__cv_entry *kmed__cv_entries(const kmed_gemma_config *c, const kmed_gemma *m,
                                        size_t *n_out)
{
    size_t L = (size_t)c->n_layers, n = 2 + 11 * L, i = 0, l;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    kmed__cv_entry *e = (kmed__cv_entry *)kmed__calloc(n, sizeof *e);
    if (!e) return NULL;
    snprintf(e[i].hf, sizeof e[i].hf, "model.embed_tokens.weight");
    snprintf(e[i].gg, sizeof e[i].gg, "token_embd.weight");
    e[i].w = m ? &m->embed : NULL;
    e[i].rows = (size_t)c->vocab_size;
    e[i].cols = C;
    e[i].is_embed = 1;
    e[i].layer = e[i].target = -1;
    i++;
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *ly = m ? &m->layers[l] : NULL;
        const kmed_weight *ws[7];
        const float *ns[4];
        size_t rows[7], cols[7];
        int t;
        ws[0] = ly ? &ly->q : NULL; rows[0] = HD; cols[0] = C;
        ws[1] = ly ? &ly->k : NULL; rows[1] = KD; cols[1] = C;
        ws[2] = ly ? &ly->v : NULL; rows[2] = KD; cols[2] = C;
        ws[3] = ly ? &ly->o : NULL; rows[3] = C; cols[3] = HD;
        ws[4] = ly ? &ly->gate : NULL; rows[4] = F; cols[4] = C;
        ws[5] = ly ? &ly->up : NULL; rows[5] = F; cols[5] = C;
        ws[6] = ly ? &ly->down : NULL; rows[6] = C; cols[6] = F;
        ns[0] = ly ? ly->attn_norm : NULL;
        ns[1] = ly ? ly->post_attn_norm : NULL;
        ns[2] = ly ? ly->pre_ffn_norm : NULL;
        ns[3] = ly ? ly->post_ffn_norm : NULL;
        for (t = 0; t < 11; t++, i++) {
            snprintf(e[i].hf, sizeof e[i].hf, "model.layers.%zu.%s.weight", l,
                     kmed__cv_hf_layer[t]);
            snprintf(e[i].gg, sizeof e[i].gg, "blk.%zu.%s.weight", l, kmed__cv_gg_layer[t]);
            e[i].layer = t < 7 ? (int)l : -1;
            e[i].target = t < 7 ? t : -1; /* ws[] is in KMED_LORA_Q..KMED_LORA_DOWN order */
            if (t < 7) {
                e[i].w = ws[t];
                e[i].rows = rows[t];
                e[i].cols = cols[t];
            } else {
                e[i].norm = ns[t - 7];
                e[i].is_norm = 1;
                e[i].rows = 1;
                e[i].cols = C;
            }
        }
    }
    snprintf(e[i].hf, sizeof e[i].hf, "model.norm.weight");
    snprintf(e[i].gg, sizeof e[i].gg, "output_norm.weight");
    e[i].norm = m ? m->final_norm : NULL;
    e[i].is_norm = 1;
    e[i].layer = e[i].target = -1;
    e[i].rows = 1;
    e[i].cols = C;
    i++;
    for (l = 0; l < n; l++) e[l].index = l;
    *n_out = n;
    return e;
}

/* Model source, optionally with a LoRA adapter merged on the fly: an adapted tensor is
   computed whole (W + scale B A, f32) on its first row, then served row by row. */
typedef struct kmed__cv_model_src {
    const kmed_gemma *m;
    const kmed_lora *lora;
    float *merged;           /* (rows, cols) of the tensor being merged, or NULL */
    size_t cur;              /* its entry index */
    kmed_result r;           /* first merge failure */
    kmed_error *err;
} kmed__cv_model_src;

static int kmed__cv_adapted(const kmed_lora *lora, const kmed__cv_entry *e)
{
    return lora && e->layer >= 0 && e->layer < lora->n_layers &&
           (lora->targets & (1u << e->target)) && lora->ab[e->layer][e->target].A;
}

/* Row of a model tensor as f32 (dequantized, or merged with the adapter). */
static kmed_result kmed__cv_fill_model(void *ctx, const kmed__cv_entry *e, size_t row,
                                       float *out)
{
    kmed__cv_model_src *src = (kmed__cv_model_src *)ctx;
    if (src && kmed__cv_adapted(src->lora, e)) {
#ifdef KMED_NO_TRAIN
        return KMED__ERR(src->err, KMED_ERR_UNSUPPORTED, "merge: built with KMED_NO_TRAIN");
#else
        if (row == 0 || src->cur != e->index || !src->merged) {
            kmed_result r;
            KMED_FREE(src->merged);
            src->merged = (float *)kmed__calloc(e->rows * e->cols, sizeof(float));
            src->cur = e->index;
            if (!src->merged)
                return KMED__ERR(src->err, KMED_ERR_NOMEM, "merge: out of memory for %s", e->hf);
            r = kmed_lora_merged_weight(src->m, src->lora, e->layer, e->target, src->merged,
                                        src->err);
            if (r != KMED_OK) return r;
        }
        memcpy(out, src->merged + row * e->cols, e->cols * sizeof *out);
        if (row + 1 == e->rows) { KMED_FREE(src->merged); src->merged = NULL; }
        return KMED_OK;
#endif
    }
    if (e->is_norm) {
        memcpy(out, e->norm, e->cols * sizeof *out);
    } else {
        size_t rb = kmed_dtype_bytes(e->w->type, e->cols);
        kmed_dequantize_row(e->w->type, (const unsigned char *)e->w->data + row * rb, out,
                            e->cols);
    }
    return KMED_OK;
}

/* Random init: each tensor has its own stream (seeded from seed and its model index), drawn
   row by row in order, so the values do not depend on the order tensors are written. */
typedef struct kmed__cv_rand {
    uint64_t seed;
    int pad_id;
    size_t cur;              /* index of the tensor the stream belongs to, or (size_t)-1 */
    kmed_rng rng;
} kmed__cv_rand;

static kmed_result kmed__cv_fill_rand(void *ctx, const kmed__cv_entry *e, size_t row,
                                      float *out)
{
    kmed__cv_rand *r = (kmed__cv_rand *)ctx;
    size_t j;
    if (r->cur != e->index || row == 0) {
        kmed_rng_seed(&r->rng, r->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(e->index + 1)));
        r->cur = e->index;
    }
    if (e->is_norm) {
        memset(out, 0, e->cols * sizeof *out); /* Gemma2RMSNorm starts at w = 0 */
        return KMED_OK;
    }
    /* initializer_range 0.02; the row is drawn even for the pad row so later rows do not
       depend on pad_id. */
    for (j = 0; j < e->cols; j++) out[j] = (float)(0.02 * kmed_rng_normal(&r->rng));
    if (e->is_embed && (int)row == r->pad_id) memset(out, 0, e->cols * sizeof *out);
    return KMED_OK;
}

/* ---- config.json ---- */

static void kmed__cv_json_float(kmed_buf *b, float x)
{
    if (x == floorf(x) && fabsf(x) < 1e9f) kmed_buf_printf(b, "%.1f", (double)x);
    else kmed_buf_json_f32(b, x);
}

KMED_API void kmed_gemma_config_json(const kmed_gemma_config *c, kmed_dtype dtype,
                                     kmed_buf *b)
{
    float q = c->query_pre_attn_scalar;
    kmed_buf_puts(b, "{\n  \"architectures\": [\n    \"Gemma2ForCausalLM\"\n  ],\n");
    kmed_buf_puts(b, "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n");
    kmed_buf_puts(b, "  \"attn_logit_softcapping\": ");
    if (c->attn_softcap > 0) kmed__cv_json_float(b, c->attn_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"bos_token_id\": %d,\n", c->bos_id);
    kmed_buf_puts(b, "  \"cache_implementation\": \"hybrid\",\n");
    kmed_buf_printf(b, "  \"eos_token_id\": %d,\n", c->eos_id);
    kmed_buf_puts(b, "  \"final_logit_softcapping\": ");
    if (c->final_softcap > 0) kmed__cv_json_float(b, c->final_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"head_dim\": %d,\n", c->head_dim);
    kmed_buf_puts(b, "  \"hidden_act\": \"gelu_pytorch_tanh\",\n"
                     "  \"hidden_activation\": \"gelu_pytorch_tanh\",\n");
    kmed_buf_printf(b, "  \"hidden_size\": %d,\n  \"initializer_range\": 0.02,\n",
                    c->hidden_size);
    kmed_buf_printf(b, "  \"intermediate_size\": %d,\n", c->intermediate_size);
    kmed_buf_printf(b, "  \"max_position_embeddings\": %d,\n", c->max_position);
    kmed_buf_puts(b, "  \"model_type\": \"gemma2\",\n");
    kmed_buf_printf(b, "  \"num_attention_heads\": %d,\n  \"num_hidden_layers\": %d,\n",
                    c->n_heads, c->n_layers);
    kmed_buf_printf(b, "  \"num_key_value_heads\": %d,\n  \"pad_token_id\": %d,\n",
                    c->n_kv_heads, c->pad_id);
    kmed_buf_puts(b, "  \"query_pre_attn_scalar\": ");
    /* HF writes an integer here for every released model */
    if (q == floorf(q) && q < 1e9f) kmed_buf_printf(b, "%d", (int)q);
    else kmed_buf_json_f32(b, q);
    kmed_buf_puts(b, ",\n  \"rms_norm_eps\": ");
    kmed_buf_json_f32(b, c->rms_norm_eps);
    kmed_buf_puts(b, ",\n  \"rope_theta\": ");
    kmed__cv_json_float(b, c->rope_theta);
    kmed_buf_puts(b, ",\n  \"sliding_window\": ");
    if (c->sliding_window > 0) kmed_buf_printf(b, "%d", c->sliding_window);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"torch_dtype\": \"%s\",\n",
                    dtype == KMED_BF16 ? "bfloat16" : dtype == KMED_F16 ? "float16" : "float32");
    kmed_buf_puts(b, "  \"transformers_version\": \"4.44.2\",\n  \"use_cache\": true,\n");
    kmed_buf_printf(b, "  \"vocab_size\": %d\n}\n", c->vocab_size);
}

/* ---- HF writer ---- */

static int kmed__cv_cmp_hf(const void *a, const void *b)
{
    return strcmp((*(const kmed__cv_entry *const *)a)->hf,
                  (*(const kmed__cv_entry *const *)b)->hf);
}

/* Converts one tensor into buf (rows x row_bytes of dtype) from f32 rows. */
static kmed_result kmed__cv_convert(const kmed__cv_entry *e, kmed__cv_fill_fn fill, void *ctx,
                                    kmed_dtype dtype, unsigned char *buf, float *row)
{
    size_t r, rb = kmed_dtype_bytes(dtype, e->cols);
    kmed_result res;
    for (r = 0; r < e->rows; r++) {
        if ((res = fill(ctx, e, r, row)) != KMED_OK) return res;
        kmed_quantize_row(dtype, row, buf + r * rb, e->cols);
    }
    return KMED_OK;
}

static kmed_result kmed__cv_write_shard(const char *path, kmed__cv_entry **list, size_t n,
                                        kmed_dtype dtype, kmed__cv_fill_fn fill, void *ctx,
                                        float *row, const kmed_callbacks *cb, size_t *done,
                                        size_t total, kmed_error *err)
{
    static const char *const mk[1] = {"format"}, *const mv[1] = {"pt"};
    kmed_tensor_info *ti = (kmed_tensor_info *)kmed__calloc(n, sizeof *ti);
    kmed_st_writer w;
    kmed_result r;
    size_t i;
    if (!ti) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    for (i = 0; i < n; i++) {
        const kmed__cv_entry *e = list[i];
        ti[i].name = e->hf;
        ti[i].dtype = dtype;
        ti[i].ndim = e->is_norm ? 1 : 2;
        ti[i].shape[0] = ti[i].ndim == 1 ? e->cols : e->rows;
        ti[i].shape[1] = e->cols;
        ti[i].nbytes = e->rows * kmed_dtype_bytes(dtype, e->cols);
    }
    r = kmed_st_writer_open(&w, path, ti, n, mk, mv, 1, err);
    for (i = 0; i < n && r == KMED_OK; i++) {
        unsigned char *buf = (unsigned char *)KMED_MALLOC(ti[i].nbytes ? ti[i].nbytes : 1);
        if (!buf) {
            r = KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory for %s (%zu bytes)",
                          list[i]->hf, ti[i].nbytes);
            break;
        }
        r = kmed__cv_convert(list[i], fill, ctx, dtype, buf, row);
        if (r == KMED_OK) r = kmed_st_writer_put(&w, buf, ti[i].nbytes, err);
        KMED_FREE(buf);
        kmed_progress(cb, "save", (double)++*done, (double)total, "tensors");
    }
    if (r == KMED_OK) r = kmed_st_writer_commit(&w, err);
    else kmed_st_writer_abort(&w);
    KMED_FREE(ti);
    return r;
}

static kmed_result kmed__cv_write_json(const char *dir, const char *name, kmed_buf *b,
                                       kmed_error *err)
{
    char path[1200];
    kmed_result r = kmed_path_join(path, sizeof path, dir, name, err);
    if (r != KMED_OK) return r;
    if (b->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    return kmed_file_write_atomic(path, b->data, b->len, err);
}

static kmed_result kmed__cv_save_hf(const kmed_gemma_config *cfg, kmed__cv_entry *e,
                                    size_t n, const char *dir, const kmed_hf_save_opts *opts,
                                    kmed__cv_fill_fn fill, void *ctx, kmed_error *err)
{
    kmed_hf_save_opts def;
    kmed__cv_entry **order = NULL;
    size_t *shard_of = NULL, n_shards = 1, i, cur = 0, total = 0, done = 0, maxc = 0;
    float *row = NULL;
    kmed_buf b = {0};
    kmed_result r;
    char path[1200], fname[64];

    if (!opts) { memset(&def, 0, sizeof def); opts = &def; }
    if (opts->dtype != KMED_F32 && opts->dtype != KMED_BF16 && opts->dtype != KMED_F16)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "save: HF weights are written as F32, BF16 "
                         "or F16, not %s", kmed_dtype_name(opts->dtype));
    if ((r = kmed_mkdir_p(dir, err)) != KMED_OK) return r;
    order = (kmed__cv_entry **)kmed__calloc(n, sizeof *order);
    shard_of = (size_t *)kmed__calloc(n, sizeof *shard_of);
    for (i = 0; i < n; i++) if (e[i].cols > maxc) maxc = e[i].cols;
    row = (float *)kmed__calloc(maxc, sizeof *row);
    if (!order || !shard_of || !row) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
        goto done;
    }
    /* Shards fill in model order, as transformers' save_pretrained splits them. */
    for (i = 0; i < n; i++) {
        size_t bytes = e[i].rows * kmed_dtype_bytes(opts->dtype, e[i].cols);
        if (opts->max_shard_bytes && cur > 0 && cur + bytes > opts->max_shard_bytes) {
            n_shards++;
            cur = 0;
        }
        cur += bytes;
        total += bytes;
        shard_of[i] = n_shards - 1;
    }
    if (!opts->max_shard_bytes) n_shards = 1;
    for (i = 0; i < n_shards && r == KMED_OK; i++) {
        size_t k, m = 0;
        for (k = 0; k < n; k++)
            if (shard_of[k] == i) order[m++] = &e[k];
        /* Within a file tensors are stored in name order, as the safetensors library does. */
        qsort(order, m, sizeof *order, kmed__cv_cmp_hf);
        if (n_shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
        else snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", i + 1, n_shards);
        if ((r = kmed_path_join(path, sizeof path, dir, fname, err)) != KMED_OK) break;
        r = kmed__cv_write_shard(path, order, m, opts->dtype, fill, ctx, row, &opts->cb, &done,
                                 n, err);
    }
    if (r != KMED_OK) goto done;
    if (n_shards > 1) {
        for (i = 0; i < n; i++) order[i] = &e[i];
        qsort(order, n, sizeof *order, kmed__cv_cmp_hf);
        kmed_buf_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n"
                            "  \"weight_map\": {\n", total);
        for (i = 0; i < n; i++) {
            size_t s = shard_of[order[i]->index];
            kmed_buf_printf(&b, "    \"%s\": \"model-%05zu-of-%05zu.safetensors\"%s\n",
                            order[i]->hf, s + 1, n_shards, i + 1 < n ? "," : "");
        }
        kmed_buf_puts(&b, "  }\n}\n");
        r = kmed__cv_write_json(dir, "model.safetensors.index.json", &b, err);
        if (r != KMED_OK) goto done;
    }
    b.len = 0;
    kmed_buf_printf(&b, "{\n  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n"
                        "  \"pad_token_id\": %d\n}\n", cfg->bos_id, cfg->eos_id, cfg->pad_id);
    if ((r = kmed__cv_write_json(dir, "generation_config.json", &b, err)) != KMED_OK) goto done;
    b.len = 0;
    kmed_gemma_config_json(cfg, opts->dtype, &b);
    r = kmed__cv_write_json(dir, "config.json", &b, err);
done:
    kmed_buf_free(&b);
    KMED_FREE(order);
    KMED_FREE(shard_of);
    KMED_FREE(row);
    return r;
}

/* Every weight set with a computable dtype and the config's shape. */
static kmed_result kmed__cv_check_model(const kmed__cv_entry *e, size_t n, kmed_error *err)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (!e[i].is_norm) {
            if (!e[i].w || !e[i].w->data || !kmed_dtype_computable(e[i].w->type) ||
                e[i].w->rows != e[i].rows || e[i].w->cols != e[i].cols ||
                !kmed_dtype_bytes(e[i].w->type, e[i].cols))
                return KMED__ERR(err, KMED_ERR_SHAPE, "save: weight %s is unset or not [%zu, "
                                 "%zu] in a computable dtype", e[i].hf, e[i].rows, e[i].cols);
        } else if (!e[i].norm) {
            return KMED__ERR(err, KMED_ERR_SHAPE, "save: norm %s is unset", e[i].hf);
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_save_hf(const kmed_gemma *m, const char *dir,
                                        const kmed_hf_save_opts *opts, kmed_error *err)
{
    size_t n;
    kmed_result r;
    kmed__cv_entry *e;
    kmed__cv_model_src src;
    if (!m || !m->layers || !dir) return KMED__ERR(err, KMED_ERR_ARG, "save: no model or dir");
    memset(&src, 0, sizeof src);
    src.m = m;
    src.lora = opts ? opts->lora : NULL;
    src.err = err;
    e = kmed__cv_entries(&m->cfg, m, &n);
    if (!e) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    r = kmed__cv_check_model(e, n, err);
    if (r == KMED_OK && src.lora && src.lora->n_layers != m->cfg.n_layers)
        r = KMED__ERR(err, KMED_ERR_SHAPE, "save: adapter has %d layers, the model %d",
                      src.lora->n_layers, m->cfg.n_layers);
    if (r == KMED_OK)
        r = kmed__cv_save_hf(&m->cfg, e, n, dir, opts, kmed__cv_fill_model, &src, err);
    KMED_FREE(src.merged);
    KMED_FREE(e);
    return r;
}

KMED_API kmed_result kmed_gemma_init_random(const kmed_gemma_config *cfg, uint64_t seed,
                                            const char *dir, const kmed_hf_save_opts *opts,
                                            kmed_error *err)
{
    size_t n;
    kmed_result r;
    kmed__cv_entry *e;
    kmed__cv_rand rs;
    if (!cfg || !dir) return KMED__ERR(err, KMED_ERR_ARG, "init: no config or dir");
    if ((r = kmed_gemma_config_validate(cfg, err)) != KMED_OK) return r;
    e = kmed__cv_entries(cfg, NULL, &n);
    if (!e) return KMED__ERR(err, KMED_ERR_NOMEM, "init: out of memory");
    rs.seed = seed;
    rs.pad_id = cfg->pad_id;
    rs.cur = (size_t)-1;
    kmed_rng_seed(&rs.rng, seed);
    r = kmed__cv_save_hf(cfg, e, n, dir, opts, kmed__cv_fill_rand, &rs, err);
    KMED_FREE(e);
    return r;
}

/* ---- GGUF writer ---- */

/* llama.cpp's general.file_type (LLAMA_FTYPE_*) for the main weight type. */
static int kmed__cv_ftype(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return 0;
    case KMED_F16: return 1;
    case KMED_Q4_0: return 2;
    case KMED_Q8_0: return 7;
    case KMED_BF16: return 32;
    default: return -1;
    }
}

/* The per-id kinds and scores llama.cpp's converter writes: scores are -(rank of the first
   merge that yields the piece), 0 otherwise; types 1 normal, 2 unknown, 3 control, 4 user
   defined, 6 byte. */
enum { KMED__CV_TT_NORMAL = 1, KMED__CV_TT_UNKNOWN = 2, KMED__CV_TT_CONTROL = 3,
       KMED__CV_TT_USER = 4, KMED__CV_TT_BYTE = 6 };

static int kmed__cv_is_byte_piece(const char *p, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    return len == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>' && strchr(hex, p[3]) &&
           strchr(hex, p[4]);
}

/* Reads merges and added tokens from a tokenizer.json into scores/types (V). */
static kmed_result kmed__cv_tok_json(const kmed_tok *tok, const char *path, float *scores,
                                     int32_t *types, size_t V, kmed_error *err)
{
    char file[1200];
    char *text = NULL;
    size_t len = 0, i;
    kmed_json_doc doc;
    const kmed_json *model, *merges, *added;
    kmed_buf cat = {0};
    kmed_result r;
    unsigned char *seen = NULL;
    if (kmed_is_dir(path)) {
        if ((r = kmed_path_join(file, sizeof file, path, "tokenizer.json", err)) != KMED_OK)
            return r;
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    r = kmed_file_read(file, KMED_MAX_TOK_FILE_BYTES, &text, &len, err);
    if (r != KMED_OK) return r;
    memset(&doc, 0, sizeof doc);
    r = kmed_json_parse(&doc, text, len, file, 0, err);
    kmed_free(text);
    if (r != KMED_OK) { kmed_json_free(&doc); return r; }
    model = kmed_json_get(doc.root, "model");
    merges = kmed_json_get(model, "merges");
    added = kmed_json_get(doc.root, "added_tokens");
    seen = (unsigned char *)kmed__calloc(V, 1);
    if (!seen) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
    if (merges && merges->type == KMED_JSON_ARRAY) {
        for (i = 0; i < merges->len; i++) {
            const kmed_json *mg = &merges->kids[i];
            int id;
            cat.len = 0;
            if (mg->type == KMED_JSON_STRING) {
                const char *sp = (const char *)memchr(mg->str + 1, ' ', mg->len ? mg->len - 1 : 0);
                if (!sp) continue;
                kmed_buf_put(&cat, mg->str, (size_t)(sp - mg->str));
                kmed_buf_put(&cat, sp + 1, mg->len - (size_t)(sp - mg->str) - 1);
            } else if (mg->type == KMED_JSON_ARRAY && mg->len == 2 &&
                       mg->kids[0].type == KMED_JSON_STRING &&
                       mg->kids[1].type == KMED_JSON_STRING) {
                kmed_buf_put(&cat, mg->kids[0].str, mg->kids[0].len);
                kmed_buf_put(&cat, mg->kids[1].str, mg->kids[1].len);
            } else {
                continue;
            }
            if (cat.failed) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory");
                goto done;
            }
            id = kmed_tok_id(tok, cat.data, cat.len);
            if (id >= 0 && (size_t)id < V && !seen[id]) {
                seen[id] = 1;
                scores[id] = -(float)i;
            }
        }
    }
    if (added && added->type == KMED_JSON_ARRAY) {
        for (i = 0; i < added->len; i++) {
            const kmed_json *a = &added->kids[i];
            int64_t id;
            if (!kmed_json_int(kmed_json_get(a, "id"), &id) || id < 0 || (uint64_t)id >= V)
                continue;
            if (id == tok->unk_id) types[id] = KMED__CV_TT_UNKNOWN;
            else if (kmed_json_bool(kmed_json_get(a, "special"), 0))
                types[id] = KMED__CV_TT_CONTROL;
            else types[id] = KMED__CV_TT_USER;
        }
    }
done:
    KMED_FREE(seen);
    kmed_buf_free(&cat);
    kmed_json_free(&doc);
    return r;
}

static kmed_result kmed__cv_gguf_tokenizer(kmed_gguf_writer *w, const kmed_tok *tok, size_t V,
                                           const kmed_gguf_save_opts *opts, kmed_error *err)
{
    const char **strs = (const char **)kmed__calloc(V, sizeof *strs);
    size_t *lens = (size_t *)kmed__calloc(V, sizeof *lens);
    float *scores = (float *)kmed__calloc(V, sizeof *scores);
    int32_t *types = (int32_t *)kmed__calloc(V, sizeof *types);
    char (*pads)[32] = NULL;
    size_t i, n_tok = (size_t)kmed_tok_vocab_size(tok), n_pad = V > n_tok ? V - n_tok : 0;
    kmed_result r = KMED_OK;
    if (n_pad) pads = (char (*)[32])kmed__calloc(V, sizeof *pads);
    if (!strs || !lens || !scores || !types || (n_pad && !pads)) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory for the vocabulary");
        goto done;
    }
    for (i = 0; i < V; i++) {
        size_t len = 0;
        const char *p = i < n_tok ? kmed_tok_piece(tok, (int)i, &len) : NULL;
        if (!p) { /* llama.cpp's converter pads unused ids the same way */
            if (!pads) pads = (char (*)[32])kmed__calloc(V, sizeof *pads);
            if (!pads) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
            snprintf(pads[i], sizeof pads[i], "[PAD%zu]", i);
            p = pads[i];
            len = strlen(p);
            types[i] = KMED__CV_TT_USER;
        } else if ((int)i == tok->unk_id) {
            types[i] = KMED__CV_TT_UNKNOWN;
        } else if (kmed_tok_is_special(tok, (int)i)) {
            types[i] = KMED__CV_TT_CONTROL;
        } else if (kmed__cv_is_byte_piece(p, len)) {
            types[i] = KMED__CV_TT_BYTE;
        } else {
            types[i] = KMED__CV_TT_NORMAL;
        }
        strs[i] = p;
        lens[i] = len;
    }
    if (opts->tokenizer_json) {
        r = kmed__cv_tok_json(tok, opts->tokenizer_json, scores, types, V, err);
        if (r != KMED_OK) goto done;
    } else {
        kmed_log(&opts->cb, KMED_LOG_WARN, "gguf: no tokenizer.json given: "
                 "tokenizer.ggml.scores are 0 and user-defined tokens are typed normal");
    }
    kmed_gguf_add_str(w, "tokenizer.ggml.model", "llama");
    kmed_gguf_add_arr_str(w, "tokenizer.ggml.tokens", strs, lens, V);
    kmed_gguf_add_arr(w, "tokenizer.ggml.scores", KMED_GGUF_F32, scores, V);
    kmed_gguf_add_arr(w, "tokenizer.ggml.token_type", KMED_GGUF_I32, types, V);
    if (tok->bos_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)tok->bos_id);
    if (tok->eos_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)tok->eos_id);
    if (tok->unk_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)tok->unk_id);
    if (tok->pad_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)tok->pad_id);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_bos_token", tok->add_bos);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_eos_token", tok->add_eos);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_space_prefix", 0);
done:
    KMED_FREE(strs);
    KMED_FREE(lens);
    KMED_FREE(scores);
    KMED_FREE(types);
    KMED_FREE(pads);
    return r;
}

static int kmed__cv_skip_non_tok(const char *key)
{
    return strncmp(key, "tokenizer.", 10) != 0;
}

static int kmed__cv_cmp_gg(const void *a, const void *b)
{
    return strcmp((*(const kmed__cv_entry *const *)a)->gg,
                  (*(const kmed__cv_entry *const *)b)->gg);
}

KMED_API kmed_result kmed_gemma_save_gguf(const kmed_gemma *m, const kmed_tok *tok,
                                          const char *path, const kmed_gguf_save_opts *opts,
                                          kmed_error *err)
{
    kmed_gguf_save_opts def;
    kmed_gguf_writer w;
    kmed__cv_entry *e = NULL, **order = NULL;
    const kmed_gemma_config *c;
    kmed_result r;
    size_t n = 0, i, k, maxc = 0, L;
    float *row = NULL;
    float qs_llama;
    int opened = 0;
    kmed__cv_model_src src;

    if (!opts) { memset(&def, 0, sizeof def); opts = &def; }
    if (!m || !m->layers || !path) return KMED__ERR(err, KMED_ERR_ARG, "gguf: no model or path");
    memset(&src, 0, sizeof src);
    src.m = m;
    src.lora = opts->lora;
    src.err = err;
    if (src.lora && src.lora->n_layers != m->cfg.n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gguf: adapter has %d layers, the model %d",
                         src.lora->n_layers, m->cfg.n_layers);
    c = &m->cfg;
    L = (size_t)c->n_layers;
    if (kmed__cv_ftype(opts->type) < 0 || !kmed_dtype_computable(opts->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: cannot write type %s (F32, F16, "
                         "BF16, Q8_0, Q4_0)", kmed_dtype_name(opts->type));
    /* llama.cpp has no key for the query scale: it uses head_dim, or hidden/heads for its
       46-layer (27B) model. Writing another value would silently change the model. */
    qs_llama = c->n_layers == 46 ? (float)c->hidden_size / (float)c->n_heads
                                 : (float)c->head_dim;
    if (c->query_pre_attn_scalar != qs_llama)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: query_pre_attn_scalar %g differs "
                         "from the %g llama.cpp derives for this shape; the model cannot be "
                         "expressed in llama.cpp's gemma2 format",
                         (double)c->query_pre_attn_scalar, (double)qs_llama);
    if (tok && (size_t)kmed_tok_vocab_size(tok) > (size_t)c->vocab_size)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gguf: tokenizer has %d ids, the model %d",
                         kmed_tok_vocab_size(tok), c->vocab_size);
    e = kmed__cv_entries(c, m, &n);
    order = (kmed__cv_entry **)kmed__calloc(n ? n : 1, sizeof *order);
    if (!e || !order) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
    if ((r = kmed__cv_check_model(e, n, err)) != KMED_OK) goto done;
    for (i = 0; i < n; i++) {
        kmed_dtype t = e[i].norm ? KMED_F32 : opts->type;
        if (e[i].is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        if (!kmed_dtype_bytes(t, e[i].cols)) {
            r = KMED__ERR(err, KMED_ERR_SHAPE, "gguf: %s has rows of %zu, not a multiple of "
                          "%d as %s needs", e[i].gg, e[i].cols, KMED_QK, kmed_dtype_name(t));
            goto done;
        }
        if (e[i].cols > maxc) maxc = e[i].cols;
    }
    row = (float *)kmed__calloc(maxc, sizeof *row);
    if (!row) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }

    /* llama.cpp's order: output_norm, token_embd, then each block's tensors by name. */
    k = 0;
    order[k++] = &e[n - 1];
    order[k++] = &e[0];
    for (i = 0; i < L; i++) {
        size_t t;
        for (t = 0; t < 11; t++) order[k + t] = &e[1 + 11 * i + t];
        qsort(order + k, 11, sizeof *order, kmed__cv_cmp_gg);
        k += 11;
    }

    if ((r = kmed_gguf_writer_open(&w, path, 32, err)) != KMED_OK) goto done;
    opened = 1;
    kmed_gguf_add_str(&w, "general.architecture", "gemma2");
    kmed_gguf_add_str(&w, "general.name", opts->name ? opts->name : "kmed");
    kmed_gguf_add_u32(&w, "gemma2.context_length", (uint32_t)c->max_position);
    kmed_gguf_add_u32(&w, "gemma2.embedding_length", (uint32_t)c->hidden_size);
    kmed_gguf_add_u32(&w, "gemma2.block_count", (uint32_t)c->n_layers);
    kmed_gguf_add_u32(&w, "gemma2.feed_forward_length", (uint32_t)c->intermediate_size);
    kmed_gguf_add_u32(&w, "gemma2.attention.head_count", (uint32_t)c->n_heads);
    kmed_gguf_add_u32(&w, "gemma2.attention.head_count_kv", (uint32_t)c->n_kv_heads);
    kmed_gguf_add_f32(&w, "gemma2.attention.layer_norm_rms_epsilon", c->rms_norm_eps);
    kmed_gguf_add_u32(&w, "gemma2.attention.key_length", (uint32_t)c->head_dim);
    kmed_gguf_add_u32(&w, "gemma2.attention.value_length", (uint32_t)c->head_dim);
    if (c->attn_softcap > 0)
        kmed_gguf_add_f32(&w, "gemma2.attn_logit_softcapping", c->attn_softcap);
    if (c->final_softcap > 0)
        kmed_gguf_add_f32(&w, "gemma2.final_logit_softcapping", c->final_softcap);
    if (c->sliding_window > 0)
        kmed_gguf_add_u32(&w, "gemma2.attention.sliding_window", (uint32_t)c->sliding_window);
    kmed_gguf_add_f32(&w, "gemma2.rope.freq_base", c->rope_theta);
    if (tok && (r = kmed__cv_gguf_tokenizer(&w, tok, (size_t)c->vocab_size, opts, err)) != KMED_OK)
        goto done;
    if (!tok && opts->tok_from) kmed_gguf_add_all(&w, opts->tok_from, kmed__cv_skip_non_tok);
    kmed_gguf_add_u32(&w, "general.quantization_version", 2);
    kmed_gguf_add_u32(&w, "general.file_type", (uint32_t)kmed__cv_ftype(opts->type));

    for (i = 0; i < n && r == KMED_OK; i++) {
        const kmed__cv_entry *x = order[i];
        kmed_dtype t = x->norm ? KMED_F32 : opts->type;
        uint64_t shape[2];
        if (x->is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        shape[0] = x->norm ? x->cols : x->rows;
        shape[1] = x->cols;
        r = kmed_gguf_add_tensor(&w, x->gg, t, x->norm ? 1 : 2, shape, err);
    }
    for (i = 0; i < n && r == KMED_OK; i++) {
        const kmed__cv_entry *x = order[i];
        kmed_dtype t = x->norm ? KMED_F32 : opts->type;
        size_t nbytes;
        unsigned char *buf;
        if (x->is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        nbytes = x->rows * kmed_dtype_bytes(t, x->cols);
        if (x->w && x->w->type == t && !kmed__cv_adapted(src.lora, x)) {
            /* already in the target type: the bytes as they are */
            r = kmed_gguf_writer_put(&w, x->w->data, nbytes, err);
        } else {
            buf = (unsigned char *)KMED_MALLOC(nbytes ? nbytes : 1);
            if (!buf) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory for %s (%zu bytes)",
                              x->gg, nbytes);
                break;
            }
            if (x->norm) { /* llama.cpp stores 1 + w and multiplies by it */
                size_t j;
                for (j = 0; j < x->cols; j++) row[j] = 1.0f + x->norm[j];
                memcpy(buf, row, nbytes);
            } else {
                r = kmed__cv_convert(x, kmed__cv_fill_model, &src, t, buf, row);
            }
            if (r == KMED_OK) r = kmed_gguf_writer_put(&w, buf, nbytes, err);
            KMED_FREE(buf);
        }
        kmed_progress(&opts->cb, "save", (double)(i + 1), (double)n, "tensors");
    }
    if (r == KMED_OK) r = kmed_gguf_writer_commit(&w, err);
    opened = r != KMED_OK;
done:
    if (opened) kmed_gguf_writer_abort(&w);
    KMED_FREE(src.merged);
    KMED_FREE(e);
    KMED_FREE(order);
    KMED_FREE(row);
    return r;
}

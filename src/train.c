/* ==== kmed_train: LoRA adapters (PEFT), training forward/backward, optimisers,
   schedules, checkpoints ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- LoRA ---- */

static const char *const kmed__lora_names[KMED_LORA_NTARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const char *const kmed__lora_short[KMED_LORA_NTARGETS] = {
    "q", "k", "v", "o", "gate", "up", "down"};

/* What kmed_lora.impl_ points to: the block holding every A and B, and the shapes. */
typedef struct kmed__lora_impl {
    float *block;
    size_t numel;
    kmed_gemma_config cfg;
} kmed__lora_impl;

KMED_API const char *kmed_lora_target_name(int target)
{
    return target >= 0 && target < KMED_LORA_NTARGETS ? kmed__lora_names[target] : NULL;
}

/* Weight shape of target t: out rows, in columns. */
static void kmed__lora_dims(const kmed_gemma_config *c, int t, size_t *out, size_t *in)
{
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    switch (t) {
    case KMED_LORA_Q: *out = HD; *in = C; break;
    case KMED_LORA_K: case KMED_LORA_V: *out = KD; *in = C; break;
    case KMED_LORA_O: *out = C; *in = HD; break;
    case KMED_LORA_GATE: case KMED_LORA_UP: *out = F; *in = C; break;
    default: *out = C; *in = F; break;
    }
}

static const kmed_weight *kmed__lora_base(const kmed_gemma_layer *L, int t)
{
    switch (t) {
    case KMED_LORA_Q: return &L->q;
    case KMED_LORA_K: return &L->k;
    case KMED_LORA_V: return &L->v;
    case KMED_LORA_O: return &L->o;
    case KMED_LORA_GATE: return &L->gate;
    case KMED_LORA_UP: return &L->up;
    default: return &L->down;
    }
}

/* PEFT tensor name: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight. */
static void kmed__lora_tensor_name(char *out, size_t cap, int layer, int t, char ab,
                                   const char *adapter)
{
    snprintf(out, cap, "base_model.model.model.layers.%d.%s.%s.lora_%c%s%s.weight", layer,
             t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t], ab,
             adapter ? "." : "", adapter ? adapter : "");
}

KMED_API kmed_result kmed_lora_targets_parse(const char *s, unsigned *targets,
                                             kmed_error *err)
{
    unsigned mask = 0;
    const char *p = s;
    if (!s || !*s) return KMED__ERR(err, KMED_ERR_ARG, "empty LoRA target list");
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int t, found = 0;
        if (n == 3 && !strncmp(p, "all", 3)) { mask |= (1u << KMED_LORA_NTARGETS) - 1; found = 1; }
        else if (n == 10 && !strncmp(p, "all-linear", 10)) {
            mask |= (1u << KMED_LORA_NTARGETS) - 1;
            found = 1;
        } else if (n == 4 && !strncmp(p, "attn", 4)) { mask |= 0xFu; found = 1; }
        else if (n == 3 && !strncmp(p, "mlp", 3)) { mask |= 0x70u; found = 1; }
        for (t = 0; t < KMED_LORA_NTARGETS && !found; t++) {
            if ((strlen(kmed__lora_names[t]) == n && !strncmp(p, kmed__lora_names[t], n)) ||
                (strlen(kmed__lora_short[t]) == n && !strncmp(p, kmed__lora_short[t], n))) {
                mask |= 1u << t;
                found = 1;
            }
        }
        if (!found)
            return KMED__ERR(err, KMED_ERR_ARG,
                             "unknown LoRA target '%.*s' (expected q_proj, k_proj, v_proj, "
                             "o_proj, gate_proj, up_proj, down_proj, attn, mlp or all)",
                             (int)n, p);
        p += n;
        if (*p == ',') p++;
    }
    *targets = mask;
    return KMED_OK;
}

/* Allocates lora for the (layer, target) pairs with present[l * NT + t] set; zeroed. */
static kmed_result kmed__lora_alloc(kmed_lora *lora, const kmed_gemma_config *cfg, int r,
                                    float alpha, const unsigned char *present,
                                    kmed_error *err)
{
    kmed__lora_impl *im;
    size_t total = 0, off = 0, out, in;
    int l, t, L = cfg->n_layers;
    memset(lora, 0, sizeof *lora);
    if (r <= 0) return KMED__ERR(err, KMED_ERR_ARG, "LoRA rank must be positive, got %d", r);
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            if (present[l * KMED_LORA_NTARGETS + t]) {
                kmed__lora_dims(cfg, t, &out, &in);
                total += (size_t)r * (in + out);
            }
    im = (kmed__lora_impl *)kmed__calloc(1, sizeof *im);
    lora->ab = (kmed_lora_ab(*)[KMED_LORA_NTARGETS])kmed__calloc((size_t)L, sizeof *lora->ab);
    if (im) im->block = (float *)kmed__calloc(total ? total : 1, sizeof(float));
    if (!im || !lora->ab || !im->block) {
        if (im) KMED_FREE(im->block);
        KMED_FREE(im);
        KMED_FREE(lora->ab);
        lora->ab = NULL;
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA adapter: out of memory (%zu floats)",
                         total);
    }
    im->numel = total;
    im->cfg = *cfg;
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            if (present[l * KMED_LORA_NTARGETS + t]) {
                kmed__lora_dims(cfg, t, &out, &in);
                lora->ab[l][t].A = im->block + off;
                off += (size_t)r * in;
                lora->ab[l][t].B = im->block + off;
                off += (size_t)r * out;
                lora->targets |= 1u << t;
            }
    lora->r = r;
    lora->alpha = alpha;
    lora->scale = alpha / (float)r;
    lora->n_layers = L;
    lora->impl_ = im;
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_create(kmed_lora *lora, const kmed_gemma *m,
                                      const kmed_lora_config *cfg, kmed_error *err)
{
    kmed_lora_config c;
    unsigned char *present;
    kmed_result rc;
    kmed_rng rng;
    int l, t, L = m->cfg.n_layers;
    memset(&c, 0, sizeof c);
    if (cfg) c = *cfg;
    if (c.r == 0) c.r = 8;
    if (c.alpha == 0.0f) c.alpha = 2.0f * (float)c.r;
    if (c.targets == 0) c.targets = (1u << KMED_LORA_NTARGETS) - 1;
    if (c.targets >> KMED_LORA_NTARGETS)
        return KMED__ERR(err, KMED_ERR_ARG, "LoRA targets mask 0x%x has unknown bits",
                         c.targets);
    if (L <= 0) return KMED__ERR(err, KMED_ERR_ARG, "LoRA: model has no layers");
    present = (unsigned char *)kmed__calloc((size_t)L * KMED_LORA_NTARGETS, 1);
    if (!present) return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA: out of memory");
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            present[l * KMED_LORA_NTARGETS + t] =
                ((c.targets >> t) & 1) &&
                (c.layers == 0 || (l < 64 && ((c.layers >> l) & 1)));
    rc = kmed__lora_alloc(lora, &m->cfg, c.r, c.alpha, present, err);
    KMED_FREE(present);
    if (rc != KMED_OK) return rc;
    /* PEFT: kaiming_uniform_(A, a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0 so the
       adapted model starts equal to the base. */
    kmed_rng_seed(&rng, c.seed);
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t out, in, i;
            double bound;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            bound = 1.0 / sqrt((double)in);
            for (i = 0; i < (size_t)c.r * in; i++)
                lora->ab[l][t].A[i] = (float)((2.0 * kmed_rng_uniform(&rng) - 1.0) * bound);
        }
    return KMED_OK;
}

KMED_API void kmed_lora_free(kmed_lora *lora)
{
    kmed__lora_impl *im;
    if (!lora) return;
    im = (kmed__lora_impl *)lora->impl_;
    if (im) KMED_FREE(im->block);
    KMED_FREE(im);
    KMED_FREE(lora->ab);
    memset(lora, 0, sizeof *lora);
}

KMED_API size_t kmed_lora_numel(const kmed_lora *lora)
{
    const kmed__lora_impl *im = lora ? (const kmed__lora_impl *)lora->impl_ : NULL;
    return im ? im->numel : 0;
}

KMED_API kmed_result kmed_lora_save(const kmed_lora *lora, const char *dir,
                                    const char *base_name, kmed_error *err)
{
    const kmed__lora_impl *im = (const kmed__lora_impl *)lora->impl_;
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    kmed_tensor_info *ti = NULL;
    char (*names)[128] = NULL;
    char path[1100];
    size_t n = 0, cap, out, in;
    kmed_buf js = {0};
    kmed_result rc;
    int l, t, first;
    if (!im) return KMED__ERR(err, KMED_ERR_STATE, "LoRA save: adapter not initialised");
    if ((rc = kmed_mkdir_p(dir, err)) != KMED_OK) return rc;
    cap = (size_t)lora->n_layers * KMED_LORA_NTARGETS * 2;
    ti = (kmed_tensor_info *)kmed__calloc(cap ? cap : 1, sizeof *ti);
    names = (char(*)[128])kmed__calloc(cap ? cap : 1, sizeof *names);
    if (!ti || !names) {
        KMED_FREE(ti);
        KMED_FREE(names);
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA save: out of memory");
    }
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            int k;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&im->cfg, t, &out, &in);
            for (k = 0; k < 2; k++) {
                kmed__lora_tensor_name(names[n], sizeof names[n], l, t, k ? 'B' : 'A', NULL);
                ti[n].name = names[n];
                ti[n].dtype = KMED_F32;
                ti[n].ndim = 2;
                ti[n].shape[0] = k ? out : (uint64_t)lora->r;
                ti[n].shape[1] = k ? (uint64_t)lora->r : in;
                ti[n].data = k ? lora->ab[l][t].B : lora->ab[l][t].A;
                ti[n].nbytes = (size_t)lora->r * (k ? out : in) * sizeof(float);
                n++;
            }
        }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_model.safetensors", err);
    if (rc == KMED_OK) rc = kmed_st_write(path, ti, n, mk, mv, 1, err);
    KMED_FREE(ti);
    KMED_FREE(names);
    if (rc != KMED_OK) return rc;

    /* adapter_config.json: the keys PEFT's LoraConfig reads, with its defaults. */
    kmed_buf_puts(&js, "{\n  \"alpha_pattern\": {},\n  \"base_model_name_or_path\": ");
    if (base_name) kmed_buf_json_str(&js, base_name, strlen(base_name));
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
                       "  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n"
                       "  \"layers_pattern\": null,\n  \"layers_to_transform\": ");
    {
        int all = 1, any = 0;
        for (l = 0; l < lora->n_layers; l++) {
            int has = 0;
            for (t = 0; t < KMED_LORA_NTARGETS; t++) has |= lora->ab[l][t].A != NULL;
            if (!has) all = 0;
        }
        if (all) kmed_buf_puts(&js, "null");
        else {
            kmed_buf_puts(&js, "[");
            for (l = 0; l < lora->n_layers; l++) {
                int has = 0;
                for (t = 0; t < KMED_LORA_NTARGETS; t++) has |= lora->ab[l][t].A != NULL;
                if (has) kmed_buf_printf(&js, "%s%d", any++ ? ", " : "", l);
            }
            kmed_buf_puts(&js, "]");
        }
    }
    kmed_buf_puts(&js, ",\n  \"lora_alpha\": ");
    if (lora->alpha == floorf(lora->alpha) && fabsf(lora->alpha) < 1e9f)
        kmed_buf_printf(&js, "%d", (int)lora->alpha);
    else kmed_buf_json_f32(&js, lora->alpha);
    kmed_buf_printf(&js, ",\n  \"lora_dropout\": 0.0,\n  \"modules_to_save\": null,\n"
                         "  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": {},\n"
                         "  \"revision\": null,\n  \"target_modules\": [",
                    lora->r);
    for (t = 0, first = 1; t < KMED_LORA_NTARGETS; t++)
        if ((lora->targets >> t) & 1) {
            kmed_buf_printf(&js, "%s\n    \"%s\"", first ? "" : ",", kmed__lora_names[t]);
            first = 0;
        }
    /* an rsLoRA adapter (scale alpha / sqrt(r), as loaded) must say so, or it reloads with
       scale alpha / r */
    first = lora->scale != lora->alpha / (float)lora->r &&
            lora->scale == (float)(lora->alpha / sqrt((double)lora->r));
    kmed_buf_printf(&js, "\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n  \"use_dora\": false,\n"
                         "  \"use_rslora\": %s\n}\n", first ? "true" : "false");
    if (js.failed) {
        kmed_buf_free(&js);
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA save: out of memory");
    }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_config.json", err);
    if (rc == KMED_OK) rc = kmed_file_write_atomic(path, js.data, js.len, err);
    kmed_buf_free(&js);
    return rc;
}

/* Copies a stored F32/F16/BF16 tensor of exactly rows x cols into out. */
static kmed_result kmed__lora_read_tensor(const kmed_tensor_info *ti, size_t rows, size_t cols,
                                          float *out, const char *file, kmed_error *err)
{
    if (ti->ndim != 2 || ti->shape[0] != rows || ti->shape[1] != cols)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file,
                          "tensor %s: shape [%llu, %llu], expected [%zu, %zu]", ti->name,
                          ti->ndim >= 1 ? (unsigned long long)ti->shape[0] : 0ull,
                          ti->ndim >= 2 ? (unsigned long long)ti->shape[1] : 0ull, rows, cols);
    if (ti->dtype == KMED_F32) memcpy(out, ti->data, rows * cols * sizeof(float));
    else if (ti->dtype == KMED_F16 || ti->dtype == KMED_BF16)
        kmed_dequantize_row(ti->dtype, ti->data, out, rows * cols);
    else
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: dtype %s (expected F32, "
                          "F16 or BF16)", ti->name, kmed_dtype_name(ti->dtype));
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_load(kmed_lora *lora, const kmed_gemma *m, const char *dir,
                                    kmed_error *err)
{
    char path[1100], name[256];
    char *text = NULL;
    size_t len = 0, i, used = 0;
    kmed_json_doc doc = {0};
    const kmed_json *root, *j;
    kmed_st st;
    unsigned char *present = NULL;
    int l, t, L = m->cfg.n_layers, r = 0, rslora = 0, have_st = 0;
    int64_t iv;
    double alpha;
    kmed_result rc;
    memset(lora, 0, sizeof *lora);
    memset(&st, 0, sizeof st);
    rc = kmed_path_join(path, sizeof path, dir, "adapter_config.json", err);
    if (rc == KMED_OK) rc = kmed_file_read(path, (size_t)64 << 20, &text, &len, err);
    if (rc == KMED_OK) rc = kmed_json_parse(&doc, text, len, path, 0, err);
    if (rc != KMED_OK) goto done;
    root = doc.root;
    if (!root || root->type != KMED_JSON_OBJECT) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "expected a JSON object");
        goto done;
    }
    j = kmed_json_get(root, "peft_type");
    if (j && j->type == KMED_JSON_STRING && strcmp(j->str, "LORA") != 0) {
        rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path, "peft_type %s (only LORA)", j->str);
        goto done;
    }
    if (!kmed_json_int(kmed_json_get(root, "r"), &iv) || iv <= 0 || iv > 65536) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "missing or bad \"r\" (positive integer)");
        goto done;
    }
    r = (int)iv;
    j = kmed_json_get(root, "lora_alpha");
    alpha = j && j->type == KMED_JSON_NUMBER ? j->num : 8.0; /* PEFT's default */
    if (!(fabs(alpha) <= 3.4e38)) { /* inf/NaN (or beyond float) would make every output NaN */
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "\"lora_alpha\" must be a finite number");
        goto done;
    }
    rslora = kmed_json_bool(kmed_json_get(root, "use_rslora"), 0);
    j = kmed_json_get(root, "use_dora");
    if (kmed_json_bool(j, 0)) {
        rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path, "use_dora (DoRA adapters)");
        goto done;
    }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_model.safetensors", err);
    if (rc == KMED_OK) rc = kmed_st_open(&st, path, err);
    if (rc != KMED_OK) goto done;
    have_st = 1;
    present = (unsigned char *)kmed__calloc((size_t)L * KMED_LORA_NTARGETS, 1);
    if (!present) { rc = KMED__ERR(err, KMED_ERR_NOMEM, "LoRA load: out of memory"); goto done; }
    /* The tensors decide which (layer, target) pairs exist; with or without the
       adapter name ("default") that older PEFT versions kept. */
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            int k, found = 0;
            for (k = 0; k < 2 && !found; k++) {
                const char *ad = k ? "default" : NULL;
                kmed__lora_tensor_name(name, sizeof name, l, t, 'A', ad);
                if (kmed_st_find(&st, name)) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, 'B', ad);
                    if (!kmed_st_find(&st, name)) {
                        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "%s is missing", name);
                        goto done;
                    }
                    found = 1;
                }
            }
            present[l * KMED_LORA_NTARGETS + t] = (unsigned char)found;
        }
    rc = kmed__lora_alloc(lora, &m->cfg, r, (float)alpha, present, err);
    if (rc != KMED_OK) goto done;
    if (rslora) lora->scale = (float)((double)lora->alpha / sqrt((double)r)); /* as saved */
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t out, in;
            int k;
            if (!present[l * KMED_LORA_NTARGETS + t]) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            for (k = 0; k < 2; k++) {
                const kmed_tensor_info *ti;
                kmed__lora_tensor_name(name, sizeof name, l, t, k ? 'B' : 'A', NULL);
                ti = kmed_st_find(&st, name);
                if (!ti) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, k ? 'B' : 'A', "default");
                    ti = kmed_st_find(&st, name);
                }
                rc = kmed__lora_read_tensor(ti, k ? out : (size_t)r, k ? (size_t)r : in,
                                            k ? lora->ab[l][t].B : lora->ab[l][t].A, path,
                                            err);
                if (rc != KMED_OK) goto done;
                used++;
            }
        }
    /* Anything else (embedding adapters, modules_to_save, other layers) would be
       silently dropped: refuse instead. */
    for (i = 0; i < st.n_tensors && used != st.n_tensors; i++) {
        int ok = 0;
        for (l = 0; l < L && !ok; l++)
            for (t = 0; t < KMED_LORA_NTARGETS && !ok; t++) {
                int k;
                if (!present[l * KMED_LORA_NTARGETS + t]) continue;
                for (k = 0; k < 4 && !ok; k++) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, k & 1 ? 'B' : 'A',
                                           k & 2 ? "default" : NULL);
                    ok = !strcmp(name, st.tensors[i].name);
                }
            }
        if (!ok) {
            rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                            "tensor %s is not a LoRA A/B of q/k/v/o/gate/up/down_proj of "
                            "this model's %d layers", st.tensors[i].name, L);
            goto done;
        }
    }
done:
    if (rc != KMED_OK) kmed_lora_free(lora);
    if (have_st) kmed_st_close(&st);
    kmed_json_free(&doc);
    KMED_FREE(text);
    KMED_FREE(present);
    return rc;
}

KMED_API kmed_result kmed_lora_merged_weight(const kmed_gemma *m, const kmed_lora *lora,
                                             int layer, int target, float *out,
                                             kmed_error *err)
{
    const kmed_weight *w;
    size_t i, j, k, row_bytes, r;
    const float *A = NULL, *B = NULL;
    if (layer < 0 || layer >= m->cfg.n_layers || target < 0 || target >= KMED_LORA_NTARGETS)
        return KMED__ERR(err, KMED_ERR_ARG, "merged weight: layer %d target %d out of range",
                         layer, target);
    w = kmed__lora_base(&m->layers[layer], target);
    row_bytes = kmed_dtype_bytes(w->type, w->cols);
    if (!w->data || !row_bytes || !kmed_dtype_computable(w->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "layer %d %s: weight dtype %s", layer,
                         kmed__lora_names[target], kmed_dtype_name(w->type));
    if (lora && layer < lora->n_layers && lora->ab[layer][target].A) {
        A = lora->ab[layer][target].A;
        B = lora->ab[layer][target].B;
    }
    r = lora ? (size_t)lora->r : 0;
    for (i = 0; i < w->rows; i++) {
        float *o = out + i * w->cols; /* (cols) */
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * row_bytes, o, w->cols);
        if (!A) continue;
        /* PEFT's merge: W + (B @ A) * scale, the product in f32 first. */
        for (j = 0; j < w->cols; j++) {
            float s = 0.0f;
            for (k = 0; k < r; k++) s += B[i * r + k] * A[k * w->cols + j];
            o[j] += s * lora->scale;
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_merge(kmed_gemma *m, const kmed_lora *lora, kmed_error *err)
{
    int l, t;
    size_t i, j, k, r = (size_t)lora->r;
    if (lora->n_layers != m->cfg.n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "merge: adapter has %d layers, model %d",
                         lora->n_layers, m->cfg.n_layers);
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            const kmed_weight *w = kmed__lora_base(&m->layers[l], t);
            size_t out, in;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            if (w->type != KMED_F32 || !w->data)
                return KMED__ERR(err, KMED_ERR_UNSUPPORTED,
                                 "merge in place needs F32 weights; layer %d %s is %s (use "
                                 "kmed_lora_merged_weight to export)", l, kmed__lora_names[t],
                                 kmed_dtype_name(w->type));
            if (w->rows != out || w->cols != in)
                return KMED__ERR(err, KMED_ERR_SHAPE, "merge: layer %d %s is [%zu, %zu], "
                                 "adapter expects [%zu, %zu]", l, kmed__lora_names[t],
                                 w->rows, w->cols, out, in);
        }
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            const kmed_weight *w = kmed__lora_base(&m->layers[l], t);
            const float *A = lora->ab[l][t].A, *B = lora->ab[l][t].B;
            float *W = (float *)(uintptr_t)w->data; /* documented: caller-writable F32 */
            if (!A) continue;
            for (i = 0; i < w->rows; i++)
                for (j = 0; j < w->cols; j++) {
                    float s = 0.0f;
                    for (k = 0; k < r; k++) s += B[i * r + k] * A[k * w->cols + j];
                    W[i * w->cols + j] += s * lora->scale;
                }
        }
    return KMED_OK;
}

/* ---- trainer: state, parameters, arena ---- */

/* Gradients of one layer; NULL where frozen. */
typedef struct kmed__train_lgrad {
    float *dw[KMED_LORA_NTARGETS];             /* full mode: [out, in] */
    float *dnorm[4];                           /* full mode: attn, post_attn, pre_ffn,
                                                  post_ffn norm [C] */
    float *dA[KMED_LORA_NTARGETS], *dB[KMED_LORA_NTARGETS]; /* LoRA mode */
} kmed__train_lgrad;

/* Activations of one layer that its backward reads. */
typedef struct kmed__train_acts {
    float *xn1, *rstd1;        /* (N, C), (N): input norm */
    float *q, *k, *v;          /* (N, H*D) after RoPE, (N, Hkv*D) after RoPE, (N, Hkv*D) */
    float *att;                /* (B, H, T, T) softmax probabilities */
    float *ao;                 /* (N, H*D) attention output, o_proj input */
    float *o, *rstd2;          /* (N, C) o_proj output, (N) */
    float *hmid;               /* (N, C) residual after the attention block */
    float *xn3, *rstd3;        /* (N, C), (N): pre-FFN norm */
    float *g, *u, *hg;         /* (N, F) gate, up, gelu(gate) * up */
    float *dn, *rstd4;         /* (N, C) down_proj output, (N) */
    float *xa[KMED_LORA_NTARGETS]; /* (N, r) x A^T per adapted target */
} kmed__train_acts;

struct kmed_train {
    kmed_train_config cfg;
    kmed_optim_config oc;      /* cfg.optim with defaults filled in */
    const kmed_gemma *m;       /* the model the forward reads (base or view) */
    kmed_gemma view;           /* full mode: weights point into pblock */
    kmed_lora *lora;           /* LoRA mode */
    kmed_pool *pool;
    int full, lowest;          /* lowest layer with trainable tensors */
    size_t np;
    kmed_param *params;
    float *pblock, *gblock, *mblock, *vblock; /* [total] each (pblock: full mode only) */
    float *pall;               /* [total] every parameter: pblock, or the adapter's block
                                  (same order as params) */
    size_t total;
    float *dembed, *dfinal;    /* full mode */
    kmed__train_lgrad *lg;     /* [L] */
    long step;
    double loss_ema, last_loss;
    long loss_n;
    size_t maxB, maxT, head_rows;
    int nthreads;
    /* arena */
    float *arena;
    kmed__train_acts *acts;    /* [L] saved, or [1] under checkpointing */
    float *resid;              /* (L+1, N, C) */
    float *xf, *rstdf;         /* (N, C), (N) final norm */
    float *tmp, *tmp2;         /* (N, C) */
    float *dres, *dtmp, *dxn;  /* (N, C) */
    float *dao, *dq, *dqp;     /* (N, H*D) */
    float *dk, *dkp, *dv;      /* (N, Hkv*D) */
    float *dg, *du, *dhg;      /* (N, F) */
    float *dxa;                /* (N, r) */
    float *att_scratch;        /* (threads, 2, T, T) */
    float *logits;             /* (head_rows, V); SIMD head: (chunks, rows, VC) */
    float *head_scratch;       /* (threads, head_floats) */
    size_t head_floats;
    float *hx, *hdx;           /* (head_rows, C) */
    float *hxa, *hxb;          /* hx packed as GEMM A strips and B panels */
    float *hstat;              /* (head_rows, chunks, 2) per vocabulary chunk: max, exp-sum */
    float *hpart;              /* (parts, head_rows, C) partial dx per chunk group */
    float *hrowf;              /* (head_rows, 3): capped target logit, max, softmax scale */
    double *hnll;              /* (head_rows) */
    int *pos;                  /* (N) */
    size_t *hrow;              /* (N) */
    int *htgt;                 /* (N) */
};

static void kmed__train_defaults(kmed_optim_config *o)
{
    if (o->lr == 0.0f) o->lr = 1e-4f;
    if (o->beta1 == 0.0f) o->beta1 = 0.9f;
    if (o->beta2 == 0.0f) o->beta2 = 0.999f;
    if (o->eps == 0.0f) o->eps = 1e-8f;
}

KMED_API float kmed_optim_lr(const kmed_optim_config *cfg, long step)
{
    /* HF's schedulers: lambda(s) with s = step - 1 optimiser steps already taken. */
    kmed_optim_config c = *cfg;
    double s = (double)(step > 0 ? step - 1 : 0), f;
    kmed__train_defaults(&c);
    if (c.warmup > 0 && s < (double)c.warmup) return (float)(c.lr * s / (double)c.warmup);
    if (c.schedule == KMED_SCHED_COSINE && c.total_steps > 0) {
        double span = (double)(c.total_steps > c.warmup ? c.total_steps - c.warmup : 1);
        double prog = (s - (double)c.warmup) / span;
        if (prog > 1.0) prog = 1.0;
        f = 0.5 * (1.0 + cos(3.14159265358979323846 * prog));
        f = c.min_lr_ratio + (1.0 - c.min_lr_ratio) * f;
        return (float)(c.lr * f);
    }
    return c.lr;
}

static float *kmed__train_take(float **cur, size_t n)
{
    float *p = *cur;
    *cur += (n + 15) & ~(size_t)15; /* 64-byte steps keep every buffer aligned */
    return p;
}

static void kmed__train_add_param(kmed_train *tr, const char *name, float *p, int ndim,
                                  size_t d0, size_t d1, size_t *off)
{
    kmed_param *q = &tr->params[tr->np++];
    snprintf(q->name, sizeof q->name, "%s", name);
    q->n = ndim == 2 ? d0 * d1 : d0;
    q->p = p ? p : tr->pblock + *off;
    q->g = tr->gblock + *off;
    q->m = tr->mblock ? tr->mblock + *off : NULL;
    q->v = tr->vblock ? tr->vblock + *off : NULL;
    q->ndim = ndim;
    q->shape[0] = d0;
    q->shape[1] = ndim == 2 ? d1 : 0;
    *off += q->n;
}

/* Activation floats per layer for N rows. */
static size_t kmed__train_acts_floats(const kmed_gemma_config *c, size_t B, size_t T,
                                      size_t r, int nlora)
{
    size_t N = B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    return 16 * 24 + N * (5 * C + 4 + 2 * HD + 2 * KD + 3 * F) +
           B * (size_t)c->n_heads * T * T + (size_t)nlora * N * r;
}

static void kmed__train_acts_slice(kmed__train_acts *a, float **cur,
                                   const kmed_gemma_config *c, size_t B, size_t T, size_t r,
                                   const kmed_lora *lora, int layer)
{
    size_t N = B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    int t;
    memset(a, 0, sizeof *a);
    a->xn1 = kmed__train_take(cur, N * C);
    a->rstd1 = kmed__train_take(cur, N);
    a->q = kmed__train_take(cur, N * HD);
    a->k = kmed__train_take(cur, N * KD);
    a->v = kmed__train_take(cur, N * KD);
    a->att = kmed__train_take(cur, B * (size_t)c->n_heads * T * T);
    a->ao = kmed__train_take(cur, N * HD);
    a->o = kmed__train_take(cur, N * C);
    a->rstd2 = kmed__train_take(cur, N);
    a->hmid = kmed__train_take(cur, N * C);
    a->xn3 = kmed__train_take(cur, N * C);
    a->rstd3 = kmed__train_take(cur, N);
    a->g = kmed__train_take(cur, N * F);
    a->u = kmed__train_take(cur, N * F);
    a->hg = kmed__train_take(cur, N * F);
    a->dn = kmed__train_take(cur, N * C);
    a->rstd4 = kmed__train_take(cur, N);
    for (t = 0; t < KMED_LORA_NTARGETS; t++) {
        int any = 0, l;
        if (!lora) continue;
        if (layer >= 0) any = lora->ab[layer][t].A != NULL;
        else
            for (l = 0; l < lora->n_layers; l++) any |= lora->ab[l][t].A != NULL;
        if (any) a->xa[t] = kmed__train_take(cur, N * r);
    }
}

KMED_API void kmed_train_free(kmed_train *tr)
{
    if (!tr) return;
    KMED_FREE(tr->view.layers);
    KMED_FREE(tr->params);
    KMED_FREE(tr->pblock);
    KMED_FREE(tr->gblock);
    KMED_FREE(tr->mblock);
    KMED_FREE(tr->vblock);
    KMED_FREE(tr->lg);
    KMED_FREE(tr->acts);
    KMED_FREE(tr->arena);
    KMED_FREE(tr->pos);
    KMED_FREE(tr->hrow);
    KMED_FREE(tr->htgt);
    KMED_FREE(tr->hnll);
    KMED_FREE(tr);
}

/* LM-head scratch; see kmed__train_head. */
#ifdef KMED__SIMD
#define KMED__TRAIN_VC 256     /* vocabulary chunk: its E rows, logits and G stay in L2 */
#define KMED__TRAIN_PARTS 16   /* fixed chunk groups with their own partial dx */

/* Floats of per-thread head scratch for blocks of R rows and C channels. */
static size_t kmed__train_head_floats(size_t R, size_t C, size_t V)
{
    /* the kmed__train_take calls of the two passes, each rounded up to 16 floats */
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC;
    size_t k = R > KMED__TRAIN_VC ? R : KMED__TRAIN_VC;
    size_t p1 = (KMED__TRAIN_VC + KMED__NR) * C + KMED__NR * big + R * KMED__TRAIN_VC;
    size_t p2 = R * KMED__TRAIN_VC + k * KMED__MR + (C + KMED__NR) * KMED__TRAIN_VC +
                KMED__NR * big;
    (void)V;
    return (p1 > p2 ? p1 : p2) + 4 * 16;
}

#else
static size_t kmed__train_head_floats(size_t R, size_t C, size_t V)
{
    (void)R; (void)C;
    return (V + 511) / 512 * 2 + 16;   /* per thread: one row's chunk statistics */
}
#endif

/* Copies weight w (any computable dtype) into f32 dst. */
static void kmed__train_weight_f32(float *dst, const kmed_weight *w)
{
    size_t i, rb = kmed_dtype_bytes(w->type, w->cols);
    for (i = 0; i < w->rows; i++)
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * rb,
                            dst + i * w->cols, w->cols);
}

static kmed_result kmed__train_check_weight(const kmed_weight *w, size_t rows, size_t cols,
                                            const char *what, int l, kmed_error *err)
{
    if (!w->data || w->rows != rows || w->cols != cols || !kmed_dtype_computable(w->type) ||
        !kmed_dtype_bytes(w->type, cols))
        return KMED__ERR(err, KMED_ERR_SHAPE, "layer %d %s: weight [%zu, %zu] %s, expected "
                         "[%zu, %zu] in a computable dtype", l, what, w->rows, w->cols,
                         kmed_dtype_name(w->type), rows, cols);
    return KMED_OK;
}

KMED_API kmed_result kmed_train_create(kmed_train **out, const kmed_gemma *m, kmed_lora *lora,
                                       const kmed_train_config *cfg, kmed_pool *pool,
                                       kmed_error *err)
{
    kmed_train *tr;
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t N, B, T, r = 0, total = 0, off = 0, maxp, af, arena_n, nacts, i, R;
    size_t hxa_n = 0, hxb_n = 0, hstat_n = 0, hpart_n = 0, vpad = 0;
    int L = c->n_layers, l, t, nlora = 0;
    float *cur;
    char name[160];
    kmed_result rc;
    *out = NULL;
    if (L <= 0 || C == 0 || F == 0 || HD == 0 || KD == 0 || c->vocab_size <= 0 ||
        c->n_heads % c->n_kv_heads || c->head_dim % 2)
        return KMED__ERR(err, KMED_ERR_ARG, "train: invalid model config");
    V = (size_t)c->vocab_size;
    if (!cfg || (cfg->full && lora) || (!cfg->full && !lora))
        return KMED__ERR(err, KMED_ERR_ARG, "train: give a LoRA adapter (LoRA mode) or set "
                         "full = 1 without one");
    if (lora && lora->n_layers != L)
        return KMED__ERR(err, KMED_ERR_SHAPE, "train: adapter has %d layers, model %d",
                         lora->n_layers, L);
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *Lw = &m->layers[l];
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t o_, i_;
            kmed__lora_dims(c, t, &o_, &i_);
            rc = kmed__train_check_weight(kmed__lora_base(Lw, t), o_, i_, kmed__lora_names[t],
                                          l, err);
            if (rc != KMED_OK) return rc;
        }
        if (!Lw->attn_norm || !Lw->post_attn_norm || !Lw->pre_ffn_norm || !Lw->post_ffn_norm)
            return KMED__ERR(err, KMED_ERR_ARG, "layer %d: norm vector missing", l);
    }
    if ((rc = kmed__train_check_weight(&m->embed, V, C, "embed", -1, err)) != KMED_OK)
        return rc;
    tr = (kmed_train *)kmed__calloc(1, sizeof *tr);
    if (!tr) return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
    tr->cfg = *cfg;
    tr->oc = cfg->optim;
    kmed__train_defaults(&tr->oc);
    tr->full = cfg->full;
    tr->lora = lora;
    tr->pool = pool;
    tr->m = m;
    tr->maxB = B = cfg->max_batch > 0 ? (size_t)cfg->max_batch : 1;
    tr->maxT = T = cfg->max_seq > 0 ? (size_t)cfg->max_seq : 256;
    N = B * T;
    tr->nthreads = kmed_pool_threads(pool);
    tr->lg = (kmed__train_lgrad *)kmed__calloc((size_t)L, sizeof *tr->lg);
    if (!tr->lg) goto nomem;

    /* Parameters: count, allocate, name. */
    if (tr->full) {
        total = V * C + C;
        for (l = 0; l < L; l++) {
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                size_t o_, i_;
                kmed__lora_dims(c, t, &o_, &i_);
                total += o_ * i_;
            }
            total += 4 * C;
        }
        maxp = 2 + (size_t)L * 11;
    } else {
        r = (size_t)lora->r;
        total = kmed_lora_numel(lora);
        maxp = (size_t)L * KMED_LORA_NTARGETS * 2;
        tr->lowest = L;
        for (l = L - 1; l >= 0; l--)
            for (t = 0; t < KMED_LORA_NTARGETS; t++)
                if (lora->ab[l][t].A) tr->lowest = l;
        for (t = 0; t < KMED_LORA_NTARGETS; t++) nlora += (lora->targets >> t) & 1;
    }
    tr->total = total;
    tr->params = (kmed_param *)kmed__calloc(maxp ? maxp : 1, sizeof *tr->params);
    tr->gblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
    if (tr->oc.kind == KMED_OPTIM_ADAMW) {
        tr->mblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
        tr->vblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
        if (!tr->mblock || !tr->vblock) goto nomem;
    }
    if (tr->full) tr->pblock = (float *)kmed__calloc(total, sizeof(float));
    if (!tr->params || !tr->gblock || (tr->full && !tr->pblock)) goto nomem;
    if (tr->full) {
        static const char *const norm_names[4] = {
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm"};
        tr->view.cfg = *c;
        tr->view.layers = (kmed_gemma_layer *)kmed__calloc((size_t)L, sizeof *tr->view.layers);
        if (!tr->view.layers) goto nomem;
        kmed__train_add_param(tr, "model.embed_tokens.weight", NULL, 2, V, C, &off);
        tr->dembed = tr->params[0].g;
        kmed__train_weight_f32(tr->params[0].p, &m->embed);
        tr->view.embed = m->embed;
        tr->view.embed.type = KMED_F32;
        tr->view.embed.data = tr->params[0].p;
        for (l = 0; l < L; l++) {
            kmed_gemma_layer *vl = &tr->view.layers[l];
            const kmed_gemma_layer *ml = &m->layers[l];
            const float *src[4];
            float **dstp[4];
            src[0] = ml->attn_norm; src[1] = ml->post_attn_norm;
            src[2] = ml->pre_ffn_norm; src[3] = ml->post_ffn_norm;
            dstp[0] = &vl->attn_norm; dstp[1] = &vl->post_attn_norm;
            dstp[2] = &vl->pre_ffn_norm; dstp[3] = &vl->post_ffn_norm;
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                kmed_param *q;
                kmed_weight *vw = (kmed_weight *)kmed__lora_base(vl, t);
                size_t o_, i_;
                kmed__lora_dims(c, t, &o_, &i_);
                snprintf(name, sizeof name, "model.layers.%d.%s.%s.weight", l,
                         t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t]);
                kmed__train_add_param(tr, name, NULL, 2, o_, i_, &off);
                q = &tr->params[tr->np - 1];
                kmed__train_weight_f32(q->p, kmed__lora_base(ml, t));
                vw->data = q->p;
                vw->type = KMED_F32;
                vw->rows = o_;
                vw->cols = i_;
                tr->lg[l].dw[t] = q->g;
            }
            for (t = 0; t < 4; t++) {
                kmed_param *q;
                snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, norm_names[t]);
                kmed__train_add_param(tr, name, NULL, 1, C, 0, &off);
                q = &tr->params[tr->np - 1];
                memcpy(q->p, src[t], C * sizeof(float));
                *dstp[t] = q->p;
                tr->lg[l].dnorm[t] = q->g;
            }
        }
        kmed__train_add_param(tr, "model.norm.weight", NULL, 1, C, 0, &off);
        memcpy(tr->params[tr->np - 1].p, m->final_norm, C * sizeof(float));
        tr->view.final_norm = tr->params[tr->np - 1].p;
        tr->dfinal = tr->params[tr->np - 1].g;
        tr->m = &tr->view;
        tr->lowest = 0;
        tr->pall = tr->pblock;
    } else {
        for (l = 0; l < L; l++)
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                size_t o_, i_;
                if (!lora->ab[l][t].A) continue;
                kmed__lora_dims(c, t, &o_, &i_);
                kmed__lora_tensor_name(name, sizeof name, l, t, 'A', NULL);
                kmed__train_add_param(tr, name, lora->ab[l][t].A, 2, r, i_, &off);
                tr->lg[l].dA[t] = tr->params[tr->np - 1].g;
                kmed__lora_tensor_name(name, sizeof name, l, t, 'B', NULL);
                kmed__train_add_param(tr, name, lora->ab[l][t].B, 2, o_, r, &off);
                tr->lg[l].dB[t] = tr->params[tr->np - 1].g;
            }
        tr->pall = ((kmed__lora_impl *)lora->impl_)->block;
        KMED_ASSERT(off == total);
    }

    /* Arena: activations (all layers, or one under checkpointing), residual stream,
       gradient scratch, LM-head block. */
    tr->head_rows = cfg->head_rows ? cfg->head_rows : ((size_t)32 << 20) / V;
    if (tr->head_rows < 1) tr->head_rows = 1;
    if (tr->head_rows > N) tr->head_rows = N;
    nacts = cfg->checkpointing ? 1 : (size_t)L;
    af = kmed__train_acts_floats(c, B, T, r, nlora);
    R = tr->head_rows;
    tr->head_floats = kmed__train_head_floats(R, C, V);
#ifdef KMED__SIMD
    hxa_n = (R + KMED__MR) * C;
    hxb_n = (C + KMED__NR) * R;
    hstat_n = R * ((V + KMED__TRAIN_VC - 1) / KMED__TRAIN_VC) * 2;
    hpart_n = (size_t)KMED__TRAIN_PARTS * R * C;
    vpad = R * KMED__TRAIN_VC;   /* logits stored chunk by chunk, the last one whole */
#endif
    arena_n = nacts * af + 16 * 40 + (size_t)(L + 1) * N * C + 7 * N * C + N +
              3 * N * HD + 3 * N * KD + 3 * N * F + N * (r ? r : 1) +
              (size_t)tr->nthreads * 2 * T * T + R * V + vpad + 2 * R * C +
              (size_t)tr->nthreads * tr->head_floats + hxa_n + hxb_n + hstat_n + hpart_n +
              3 * R + 16 * 8;
    tr->arena = (float *)kmed__calloc(arena_n, sizeof(float));
    tr->acts = (kmed__train_acts *)kmed__calloc(nacts, sizeof *tr->acts);
    tr->pos = (int *)kmed__calloc(N, sizeof(int));
    tr->hrow = (size_t *)kmed__calloc(N, sizeof(size_t));
    tr->htgt = (int *)kmed__calloc(N, sizeof(int));
    tr->hnll = (double *)kmed__calloc(tr->head_rows, sizeof(double));
    if (!tr->arena || !tr->acts || !tr->pos || !tr->hrow || !tr->htgt || !tr->hnll) goto nomem;
    cur = tr->arena;
    for (i = 0; i < nacts; i++)
        kmed__train_acts_slice(&tr->acts[i], &cur, c, B, T, r, lora,
                               cfg->checkpointing ? -1 : (int)i);
    tr->resid = kmed__train_take(&cur, (size_t)(L + 1) * N * C);
    tr->xf = kmed__train_take(&cur, N * C);
    tr->rstdf = kmed__train_take(&cur, N);
    tr->tmp = kmed__train_take(&cur, N * C);
    tr->tmp2 = kmed__train_take(&cur, N * C);
    tr->dres = kmed__train_take(&cur, N * C);
    tr->dtmp = kmed__train_take(&cur, N * C);
    tr->dxn = kmed__train_take(&cur, N * C);
    tr->dao = kmed__train_take(&cur, N * HD);
    tr->dq = kmed__train_take(&cur, N * HD);
    tr->dqp = kmed__train_take(&cur, N * HD);
    tr->dk = kmed__train_take(&cur, N * KD);
    tr->dkp = kmed__train_take(&cur, N * KD);
    tr->dv = kmed__train_take(&cur, N * KD);
    tr->dg = kmed__train_take(&cur, N * F);
    tr->du = kmed__train_take(&cur, N * F);
    tr->dhg = kmed__train_take(&cur, N * F);
    tr->dxa = kmed__train_take(&cur, N * (r ? r : 1));
    tr->att_scratch = kmed__train_take(&cur, (size_t)tr->nthreads * 2 * T * T);
    tr->logits = kmed__train_take(&cur, R * V + vpad);
    tr->head_scratch = kmed__train_take(&cur, (size_t)tr->nthreads * tr->head_floats);
    tr->hx = kmed__train_take(&cur, R * C);
    tr->hdx = kmed__train_take(&cur, R * C);
    tr->hxa = kmed__train_take(&cur, hxa_n);
    tr->hxb = kmed__train_take(&cur, hxb_n);
    tr->hstat = kmed__train_take(&cur, hstat_n);
    tr->hpart = kmed__train_take(&cur, hpart_n);
    tr->hrowf = kmed__train_take(&cur, 3 * R);
    KMED_ASSERT((size_t)(cur - tr->arena) <= arena_n);
    *out = tr;
    return KMED_OK;
nomem:
    kmed_train_free(tr);
    return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
}

KMED_API size_t kmed_train_params(kmed_train *tr, kmed_param **params)
{
    *params = tr->params;
    return tr->np;
}

KMED_API const kmed_gemma *kmed_train_model(const kmed_train *tr) { return tr->m; }
KMED_API long kmed_train_step_count(const kmed_train *tr) { return tr->step; }

KMED_API size_t kmed_train_count(const int *labels, size_t B, size_t T)
{
    size_t b, t, n = 0;
    for (b = 0; b < B; b++)
        for (t = 0; t + 1 < T; t++) n += labels[b * T + t + 1] != KMED_LABEL_IGNORE;
    return n;
}

KMED_API void kmed_train_zero_grad(kmed_train *tr)
{
    memset(tr->gblock, 0, tr->total * sizeof(float));
}

/* ---- trainer: forward and backward ---- */

/* Row-parallel wrappers: ops are serial over the rows they get; rows split over threads
   never share writes, so results do not depend on the thread count. */
typedef struct kmed__train_rows {
    float *y, *rstd, *dx;
    const float *x, *w, *dy, *g, *u;
    float *dg, *du;
    size_t C;
    float eps;
} kmed__train_rows;

static void kmed__train_norm_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    kmed__rmsnorm_forward(c->y + b * c->C, c->rstd + b, c->x + b * c->C, c->w, e - b, c->C,
                          c->eps);
}

static void kmed__train_norm(kmed_train *tr, float *y, float *rstd, const float *x,
                             const float *w, size_t N)
{
    kmed__train_rows c;
    memset(&c, 0, sizeof c);
    c.y = y; c.rstd = rstd; c.x = x; c.w = w;
    c.C = (size_t)tr->m->cfg.hidden_size;
    c.eps = tr->m->cfg.rms_norm_eps;
    kmed_pool_for(tr->pool, N, 1, kmed__train_norm_fn, &c);
}

static void kmed__train_norm_bw_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    kmed__rmsnorm_backward(c->dx + b * c->C, NULL, c->dy + b * c->C, c->x + b * c->C, c->w,
                           c->rstd + b, e - b, c->C);
}

/* dx += and dw += through the norm: dx rows in parallel, dw serially in row order. */
static void kmed__train_norm_bw(kmed_train *tr, float *dx, float *dw, const float *dy,
                                const float *x, const float *w, const float *rstd, size_t N)
{
    kmed__train_rows c;
    size_t C = (size_t)tr->m->cfg.hidden_size;
    if (dx) {
        memset(&c, 0, sizeof c);
        c.dx = dx; c.dy = dy; c.x = x; c.w = w; c.rstd = (float *)(uintptr_t)rstd; c.C = C;
        kmed_pool_for(tr->pool, N, 1, kmed__train_norm_bw_fn, &c);
    }
    if (dw) kmed__rmsnorm_backward(NULL, dw, dy, x, w, rstd, N, C);
}

static void kmed__train_geglu_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    if (c->y) kmed__geglu_forward(c->y + b, c->g + b, c->u + b, e - b);
    else kmed__geglu_backward(c->dg + b, c->du + b, c->dy + b, c->g + b, c->u + b, e - b);
}

static void kmed__train_linear(kmed_train *tr, float *y, float *xa, const float *x,
                               const kmed_weight *w, const kmed_lora_ab *ab, size_t M)
{
    kmed_matmul(tr->pool, y, x, w->data, w->type, M, w->rows, w->cols, 0);
    if (ab && ab->A)
        kmed__lora_forward(tr->pool, y, xa, x, ab->A, ab->B, M, w->rows, w->cols,
                           (size_t)tr->lora->r, tr->lora->scale);
}

/* dx += dy W (+ LoRA), dw += dy^T x, dA/dB through the adapter; NULLs skip. */
static void kmed__train_linear_backward(kmed_train *tr, float *dx, float *dw, float *dA,
                                        float *dB, const float *dy, const float *x,
                                        const float *xa, const kmed_weight *w,
                                        const kmed_lora_ab *ab, size_t M)
{
    if (dx) kmed_matmul_dx(tr->pool, dx, dy, w->data, w->type, M, w->rows, w->cols);
    if (dw) kmed_matmul_dw(tr->pool, dw, dy, x, M, w->rows, w->cols);
    if (ab && ab->A)
        kmed__lora_backward(tr->pool, dx, dA, dB, dy, xa, x, ab->A, ab->B, tr->dxa, M,
                            w->rows, w->cols, (size_t)tr->lora->r, tr->lora->scale);
}

typedef struct kmed__train_attn {
    kmed_train *tr;
    kmed__train_acts *a;
    size_t T;
    size_t window;
    int backward;
} kmed__train_attn;

/* One unit = one sequence x one key/value head group (its H/Hkv query heads). */
static void kmed__train_attn_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_attn *c = (kmed__train_attn *)ctx;
    kmed_train *tr = c->tr;
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t H = (size_t)g->n_heads, Hkv = (size_t)g->n_kv_heads, D = (size_t)g->head_dim;
    size_t group = H / Hkv, T = c->T, u;
    float scale = (float)(1.0 / sqrt((double)g->query_pre_attn_scalar));
    for (u = b; u < e; u++) {
        size_t s = u / Hkv, h0 = (u % Hkv) * group;
        size_t qo = s * T * H * D, ko = s * T * Hkv * D;
        float *att = c->a->att + s * H * T * T;
        float *scratch = tr->att_scratch + (size_t)thread * 2 * tr->maxT * tr->maxT;
        if (!c->backward)
            kmed__attention_forward(c->a->ao + qo, att, c->a->q + qo, c->a->k + ko,
                                    c->a->v + ko, tr->pos, scratch, T, T, H, Hkv, D, scale,
                                    g->attn_softcap, c->window, h0, h0 + group);
        else
            kmed__attention_backward(tr->dq + qo, tr->dk + ko, tr->dv + ko, tr->dao + qo, att,
                                     c->a->q + qo, c->a->k + ko, c->a->v + ko, tr->pos,
                                     scratch, T, T, H, Hkv, D, scale, g->attn_softcap,
                                     c->window, h0, h0 + group);
    }
}

static size_t kmed__train_window(const kmed_gemma_config *g, int l)
{
    /* Gemma-2 alternates: even layers slide, odd layers see the whole causal past. */
    return (l % 2 == 0 && g->sliding_window > 0) ? (size_t)g->sliding_window : 0;
}

/* Layer l forward from x_in (N, C) to x_out (N, C), filling a. */
static void kmed__train_layer_forward(kmed_train *tr, int l, kmed__train_acts *a,
                                      const float *x_in, float *x_out, size_t B, size_t T)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_gemma_layer *w = &tr->m->layers[l];
    const kmed_lora_ab *ab = tr->lora ? tr->lora->ab[l] : NULL;
    size_t N = B * T, C = (size_t)g->hidden_size, F = (size_t)g->intermediate_size, i;
    kmed__train_attn ac;
    kmed__train_rows rc;
    kmed__train_norm(tr, a->xn1, a->rstd1, x_in, w->attn_norm, N);
    kmed__train_linear(tr, a->q, a->xa[KMED_LORA_Q], a->xn1, &w->q, ab ? &ab[0] : NULL, N);
    kmed__train_linear(tr, a->k, a->xa[KMED_LORA_K], a->xn1, &w->k, ab ? &ab[1] : NULL, N);
    kmed__train_linear(tr, a->v, a->xa[KMED_LORA_V], a->xn1, &w->v, ab ? &ab[2] : NULL, N);
    kmed__rope_forward(a->q, a->q, tr->pos, N, (size_t)g->n_heads, (size_t)g->head_dim,
                       g->rope_theta);
    kmed__rope_forward(a->k, a->k, tr->pos, N, (size_t)g->n_kv_heads, (size_t)g->head_dim,
                       g->rope_theta);
    ac.tr = tr; ac.a = a; ac.T = T; ac.window = kmed__train_window(g, l); ac.backward = 0;
    kmed_pool_for(tr->pool, B * (size_t)g->n_kv_heads, 1, kmed__train_attn_fn, &ac);
    kmed__train_linear(tr, a->o, a->xa[KMED_LORA_O], a->ao, &w->o, ab ? &ab[3] : NULL, N);
    kmed__train_norm(tr, tr->tmp, a->rstd2, a->o, w->post_attn_norm, N);
    for (i = 0; i < N * C; i++) a->hmid[i] = x_in[i] + tr->tmp[i];
    kmed__train_norm(tr, a->xn3, a->rstd3, a->hmid, w->pre_ffn_norm, N);
    kmed__train_linear(tr, a->g, a->xa[KMED_LORA_GATE], a->xn3, &w->gate, ab ? &ab[4] : NULL,
                       N);
    kmed__train_linear(tr, a->u, a->xa[KMED_LORA_UP], a->xn3, &w->up, ab ? &ab[5] : NULL, N);
    memset(&rc, 0, sizeof rc);
    rc.y = a->hg; rc.g = a->g; rc.u = a->u;
    kmed_pool_for(tr->pool, N * F, 1024, kmed__train_geglu_fn, &rc);
    kmed__train_linear(tr, a->dn, a->xa[KMED_LORA_DOWN], a->hg, &w->down, ab ? &ab[6] : NULL,
                       N);
    kmed__train_norm(tr, tr->tmp, a->rstd4, a->dn, w->post_ffn_norm, N);
    for (i = 0; i < N * C; i++) x_out[i] = a->hmid[i] + tr->tmp[i];
}

/* Layer l backward: tr->dres holds d(x_out) on entry and d(x_in) on return (only when
   need_dx; otherwise just the weight/adapter gradients are accumulated). */
static void kmed__train_layer_backward(kmed_train *tr, int l, const kmed__train_acts *a,
                                       const float *x_in, size_t B, size_t T, int need_dx)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_gemma_layer *w = &tr->m->layers[l];
    const kmed_lora_ab *ab = tr->lora ? tr->lora->ab[l] : NULL;
    const kmed__train_lgrad *G = &tr->lg[l];
    size_t N = B * T, C = (size_t)g->hidden_size, F = (size_t)g->intermediate_size;
    size_t HD = (size_t)g->n_heads * (size_t)g->head_dim;
    size_t KD = (size_t)g->n_kv_heads * (size_t)g->head_dim;
    kmed__train_attn ac;
    kmed__train_rows rc;

    /* feed-forward block:
       x_out = hmid + post_ffn_norm(down(geglu(gate, up)(pre_ffn_norm(hmid)))) */
    memset(tr->dtmp, 0, N * C * sizeof(float));
    kmed__train_norm_bw(tr, tr->dtmp, G->dnorm[3], tr->dres, a->dn, w->post_ffn_norm,
                        a->rstd4, N);
    memset(tr->dhg, 0, N * F * sizeof(float));
    kmed__train_linear_backward(tr, tr->dhg, G->dw[6], G->dA[6], G->dB[6], tr->dtmp, a->hg,
                                a->xa[6], &w->down, ab ? &ab[6] : NULL, N);
    memset(tr->dg, 0, N * F * sizeof(float));
    memset(tr->du, 0, N * F * sizeof(float));
    memset(&rc, 0, sizeof rc);
    rc.dg = tr->dg; rc.du = tr->du; rc.dy = tr->dhg; rc.g = a->g; rc.u = a->u;
    kmed_pool_for(tr->pool, N * F, 1024, kmed__train_geglu_fn, &rc);
    memset(tr->dxn, 0, N * C * sizeof(float));
    kmed__train_linear_backward(tr, tr->dxn, G->dw[4], G->dA[4], G->dB[4], tr->dg, a->xn3,
                                a->xa[4], &w->gate, ab ? &ab[4] : NULL, N);
    kmed__train_linear_backward(tr, tr->dxn, G->dw[5], G->dA[5], G->dB[5], tr->du, a->xn3,
                                a->xa[5], &w->up, ab ? &ab[5] : NULL, N);
    kmed__train_norm_bw(tr, tr->dres, G->dnorm[2], tr->dxn, a->hmid, w->pre_ffn_norm,
                        a->rstd3, N);

    /* attention block: hmid = x_in + post_attn_norm(o(attn(rope(q), rope(k), v))) */
    memset(tr->dtmp, 0, N * C * sizeof(float));
    kmed__train_norm_bw(tr, tr->dtmp, G->dnorm[1], tr->dres, a->o, w->post_attn_norm,
                        a->rstd2, N);
    memset(tr->dao, 0, N * HD * sizeof(float));
    kmed__train_linear_backward(tr, tr->dao, G->dw[3], G->dA[3], G->dB[3], tr->dtmp, a->ao,
                                a->xa[3], &w->o, ab ? &ab[3] : NULL, N);
    memset(tr->dq, 0, N * HD * sizeof(float));
    memset(tr->dk, 0, N * KD * sizeof(float));
    memset(tr->dv, 0, N * KD * sizeof(float));
    ac.tr = tr; ac.a = (kmed__train_acts *)(uintptr_t)a; ac.T = T;
    ac.window = kmed__train_window(g, l); ac.backward = 1;
    kmed_pool_for(tr->pool, B * (size_t)g->n_kv_heads, 1, kmed__train_attn_fn, &ac);
    memset(tr->dqp, 0, N * HD * sizeof(float));
    memset(tr->dkp, 0, N * KD * sizeof(float));
    kmed__rope_backward(tr->dqp, tr->dq, tr->pos, N, (size_t)g->n_heads, (size_t)g->head_dim,
                        g->rope_theta);
    kmed__rope_backward(tr->dkp, tr->dk, tr->pos, N, (size_t)g->n_kv_heads,
                        (size_t)g->head_dim, g->rope_theta);
    memset(tr->dxn, 0, N * C * sizeof(float));
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[0], G->dA[0], G->dB[0],
                                tr->dqp, a->xn1, a->xa[0], &w->q, ab ? &ab[0] : NULL, N);
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[1], G->dA[1], G->dB[1],
                                tr->dkp, a->xn1, a->xa[1], &w->k, ab ? &ab[1] : NULL, N);
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[2], G->dA[2], G->dB[2],
                                tr->dv, a->xn1, a->xa[2], &w->v, ab ? &ab[2] : NULL, N);
    if (need_dx)
        kmed__train_norm_bw(tr, tr->dres, G->dnorm[0], tr->dxn, x_in, w->attn_norm, a->rstd1,
                            N);
}

/* Gathers the counted rows of the batch (position t predicts labels[t + 1]) into
   hrow/htgt; returns their number, or -1 (error set) for a label outside [0, V). */
static long kmed__train_head_gather(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    kmed_error *err)
{
    size_t V = (size_t)tr->m->cfg.vocab_size, n = 0, b, t;
    for (b = 0; b < B; b++)
        for (t = 0; t + 1 < T; t++) {
            int lab = labels[b * T + t + 1];
            if (lab == KMED_LABEL_IGNORE) continue;
            if (lab < 0 || (size_t)lab >= V) {
                KMED__ERR(err, KMED_ERR_ARG, "label %d at sequence %zu position %zu is "
                          "outside [0, %zu) and not -100", lab, b, t + 1, V);
                return -1;
            }
            tr->hrow[n] = b * T + t;
            tr->htgt[n] = lab;
            n++;
        }
    return (long)n;
}

/* Log-sum-exp pieces of one row from its chunks' (max, exp-sum) pairs st (nch, 2), merged
   in chunk order: *mx = the row max, returns sum(exp(y - mx)) in double. */
static double kmed__train_head_lse(const float *st, size_t nch, float *mx)
{
    float m = -INFINITY;
    double sum = 0.0;
    size_t ch;
    for (ch = 0; ch < nch; ch++) m = st[2 * ch] > m ? st[2 * ch] : m;
    for (ch = 0; ch < nch; ch++)
        if (st[2 * ch + 1] != 0.0f)
            sum += (double)st[2 * ch + 1] * exp((double)st[2 * ch] - (double)m);
    *mx = m;
    return sum;
}

#ifdef KMED__SIMD
/* The LM head with tensor's GEMM micro-kernel on cache-sized pieces. Per block of nb
   counted rows, the vocabulary is cut into chunks of KMED__TRAIN_VC entries:
   pass 1 (threads over chunks): logits of every row for the chunk (E's chunk packed once,
     used by all rows), soft-capped in place while in cache, with the chunk's max and
     exp-sum per row; merged in chunk order into each row's log-sum-exp. The capped logits
     are streamed out chunk-major for pass 2: storing them costs far less than a fourth
     GEMM to recompute them (each logit is 128+ multiply-adds per 4 bytes moved).
   pass 2 (threads over KMED__TRAIN_PARTS fixed groups of chunks): the chunk's gradient
     G (nb, VC) rebuilt from the stored capped logits into cache, then dE[chunk] += G^T x
     and dx += G E[chunk] into the group's partial dx, the groups summed in order after.
   Every sum runs over a fixed chunk/group layout, so 1 and N threads give the same bits;
   only the summation order differs from the plain three-GEMM head (the non-SIMD one). */
typedef struct kmed__train_headc {
    kmed_train *tr;
    float *dxf;           /* (N, C) += the gradient of the final norm's output */
    size_t s0, nb, nch;   /* first gathered row, rows, vocabulary chunks */
    float inv;            /* 1 / norm, 0 for forward only */
} kmed__train_headc;

/* dst[0..n) = src[0..n), with non-temporal stores where dst is 64-byte aligned. */
static void kmed__train_stream(float *dst, const float *src, size_t n)
{
    size_t i = 0;
#if KMED__SIMD == 512
    i = (64 - ((uintptr_t)dst & 63)) / sizeof(float) % 16;   /* up to the first 64 B line */
    if (i > n) i = n;
    memcpy(dst, src, i * sizeof(float));
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    _mm_sfence();
#endif
    memcpy(dst + i, src + i, (n - i) * sizeof(float));
}

/* Pulls rows [v0, v0 + n) of an (V, C) f32 matrix toward the cache ahead of use. */
static void kmed__train_prefetch_rows(const float *m, size_t v0, size_t n, size_t C)
{
    const char *p = (const char *)(m + v0 * C), *end = (const char *)(m + (v0 + n) * C);
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
}

/* Pass 1 over chunks [b, e). */
static void kmed__train_head_stats_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)tr->m->cfg.vocab_size, C = (size_t)tr->m->cfg.hidden_size, ch;
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC;
    float cap = tr->m->cfg.final_softcap;
    float *cur = tr->head_scratch + (size_t)thread * tr->head_floats;
    float *bp = kmed__train_take(&cur, (KMED__TRAIN_VC + KMED__NR) * C); /* E^T panels */
    float *tmp = kmed__train_take(&cur, KMED__NR * big);
    float *out = kmed__train_take(&cur, c->nb * KMED__TRAIN_VC);       /* (nb, VC) */
    kmed__gsrc Bs;
    KMED_ASSERT(cur <= tr->head_scratch + (size_t)(thread + 1) * tr->head_floats);
    memset(&Bs, 0, sizeof Bs);
    Bs.p = E->data; Bs.t = E->type; Bs.ld = C; Bs.trans = 1; Bs.alpha = 1.0f;
    for (ch = b; ch < e; ch++) {
        size_t v0 = ch * KMED__TRAIN_VC, vc = V - v0 < KMED__TRAIN_VC ? V - v0 : KMED__TRAIN_VC;
        size_t jr, s, i;
        for (jr = 0; jr < vc; jr += KMED__NR)
            kmed__pack_b(bp + jr * C, &Bs, 0, C, v0 + jr,
                         vc - jr < KMED__NR ? vc - jr : KMED__NR, tmp);
        /* panel outer: the E^T panel stays in L1 while the x strips stream from L2 */
        for (jr = 0; jr < vc; jr += KMED__NR)
            for (s = 0; s < c->nb; s += KMED__MR)
                kmed__gemm_ukr(C, tr->hxa + s * C, bp + jr * C,
                               out + s * KMED__TRAIN_VC + jr, KMED__TRAIN_VC, 0,
                               c->nb - s < KMED__MR ? c->nb - s : KMED__MR,
                               vc - jr < KMED__NR ? vc - jr : KMED__NR);
        for (i = 0; i < c->nb; i++) {
            float *yr = out + i * KMED__TRAIN_VC, *st = tr->hstat + (i * c->nch + ch) * 2;
            size_t tgt = (size_t)tr->htgt[c->s0 + i];
            kmed__xent_stats(yr, vc, cap, &st[0], &st[1]);
            if (tgt >= v0 && tgt < v0 + vc) tr->hrowf[i * 3] = yr[tgt - v0];
        }
        /* backward keeps the capped logits for pass 2, chunk by chunk, streamed past the
           caches (they come back once, long after) */
        if (c->inv != 0.0f)
            kmed__train_stream(tr->logits + ch * c->nb * KMED__TRAIN_VC, out,
                               c->nb * KMED__TRAIN_VC);
    }
}

/* Merges the chunk statistics of rows [b, e): NLL, the max and the softmax scale. */
static void kmed__train_head_merge_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t i;
    (void)thread;
    for (i = b; i < e; i++) {
        float mx;
        double sum = kmed__train_head_lse(tr->hstat + i * c->nch * 2, c->nch, &mx);
        tr->hnll[i] = (double)mx + log(sum) - (double)tr->hrowf[i * 3];
        tr->hrowf[i * 3 + 1] = mx;
        tr->hrowf[i * 3 + 2] = (float)(1.0 / sum) * c->inv;
    }
}

/* Pass 2 over chunk groups [b, e). */
static void kmed__train_head_grad_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)tr->m->cfg.vocab_size, C = (size_t)tr->m->cfg.hidden_size;
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC, nb = c->nb, p;
    size_t k = nb > KMED__TRAIN_VC ? nb : KMED__TRAIN_VC;
    size_t parts = c->nch < KMED__TRAIN_PARTS ? c->nch : KMED__TRAIN_PARTS;
    float cap = tr->m->cfg.final_softcap;
    float *cur = tr->head_scratch + (size_t)thread * tr->head_floats;
    float *G = kmed__train_take(&cur, nb * KMED__TRAIN_VC);     /* (nb, VC) */
    float *ap = kmed__train_take(&cur, k * KMED__MR);
    float *bp = kmed__train_take(&cur, (C + KMED__NR) * KMED__TRAIN_VC); /* E panels */
    float *tmp = kmed__train_take(&cur, KMED__NR * big);
    kmed__gsrc Es, Gt, Gn;
    KMED_ASSERT(cur <= tr->head_scratch + (size_t)(thread + 1) * tr->head_floats);
    memset(&Es, 0, sizeof Es);
    Es.p = E->data; Es.t = E->type; Es.ld = C; Es.alpha = 1.0f;
    Gt = Es;
    Gt.p = G; Gt.t = KMED_F32; Gt.ld = KMED__TRAIN_VC; Gt.trans = 1; /* A(v, r) = G[r][v] */
    Gn = Gt;
    Gn.trans = 0;                                                    /* A(r, v) = G[r][v] */
    for (p = b; p < e; p++) {
        float *dxp = tr->hpart + p * nb * C; /* (nb, C) */
        size_t ch;
        memset(dxp, 0, nb * C * sizeof(float));
        for (ch = p * c->nch / parts; ch < (p + 1) * c->nch / parts; ch++) {
            size_t v0 = ch * KMED__TRAIN_VC, jc, s, r;
            size_t vc = V - v0 < KMED__TRAIN_VC ? V - v0 : KMED__TRAIN_VC;
            /* the chunk's dE and E rows arrive while G is computed */
            if (tr->dembed) kmed__train_prefetch_rows(tr->dembed, v0, vc, C);
            if (E->type == KMED_F32) kmed__train_prefetch_rows((const float *)E->data, v0, vc, C);
            for (r = 0; r < nb; r++) {
                const float *rf = tr->hrowf + r * 3;
                size_t tgt = (size_t)tr->htgt[c->s0 + r];
                kmed__xent_grad(G + r * KMED__TRAIN_VC,
                                tr->logits + (ch * nb + r) * KMED__TRAIN_VC, vc,
                                tgt >= v0 ? tgt - v0 : vc, rf[1], rf[2], c->inv, cap);
            }
            if (tr->dembed)   /* dE[v0 + vs ..][C] += G^T x, 12 (or 6) vocabulary rows a time */
                for (s = 0; s < vc; s += KMED__MR) {
                    size_t mv = vc - s < KMED__MR ? vc - s : KMED__MR;
                    kmed__pack_a(ap, &Gt, s, mv, 0, nb);
                    for (jc = 0; jc < C; jc += KMED__NR)
                        kmed__gemm_ukr(nb, ap, tr->hxb + jc * nb, tr->dembed + (v0 + s) * C + jc,
                                       C, 1, mv, C - jc < KMED__NR ? C - jc : KMED__NR);
                }
            /* E's chunk as the B operand: f32 rows in place, other dtypes and a last partial
               panel packed */
            for (jc = 0; jc < C; jc += KMED__NR)
                if (E->type != KMED_F32 || jc + KMED__NR > C)
                    kmed__pack_b(bp + jc * vc, &Es, v0, vc, jc,
                                 C - jc < KMED__NR ? C - jc : KMED__NR, tmp);
            for (s = 0; s < nb; s += KMED__MR) {   /* dx[s ..][C] += G E[chunk] */
                size_t mr = nb - s < KMED__MR ? nb - s : KMED__MR;
                kmed__pack_a(ap, &Gn, s, mr, 0, vc);
                for (jc = 0; jc < C; jc += KMED__NR) {
                    int direct = E->type == KMED_F32 && jc + KMED__NR <= C;
                    kmed__gemm_ukr_ldb(vc, ap,
                                       direct ? (const float *)E->data + v0 * C + jc
                                              : bp + jc * vc,
                                       direct ? C : KMED__NR, dxp + s * C + jc, C, 1, mr,
                                       C - jc < KMED__NR ? C - jc : KMED__NR);
                }
            }
        }
    }
}

/* dxf[hrow[s0 + i]] += the partial dx of every chunk group, groups in order. */
static void kmed__train_head_dx_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t C = (size_t)tr->m->cfg.hidden_size, i, j, p;
    size_t parts = c->nch < KMED__TRAIN_PARTS ? c->nch : KMED__TRAIN_PARTS;
    (void)thread;
    for (i = b; i < e; i++) {
        float *d = c->dxf + tr->hrow[c->s0 + i] * C; /* (C) */
        for (j = 0; j < C; j++) {
            float t = tr->hpart[i * C + j];
            for (p = 1; p < parts; p++) t += tr->hpart[(p * c->nb + i) * C + j];
            d[j] += t;
        }
    }
}

/* Tied LM head + final soft-cap + cross-entropy over the counted rows only, in blocks
   of head_rows rows so the logits never exceed (head_rows, V). dxf (N, C) += gradient
   when norm > 0; full mode also adds to the embedding gradient. */
static kmed_result kmed__train_head(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    double norm, float *dxf, double *loss_sum, size_t *count,
                                    kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t V = (size_t)g->vocab_size, C = (size_t)g->hidden_size, s, i, jc;
    long n = kmed__train_head_gather(tr, labels, B, T, err);
    double sum = 0.0;
    kmed__train_headc hc;
    kmed__gsrc X;
    if (n < 0) return KMED_ERR_ARG;
    memset(&hc, 0, sizeof hc);
    hc.tr = tr;
    hc.inv = norm > 0.0 ? (float)(1.0 / norm) : 0.0f;
    hc.nch = (V + KMED__TRAIN_VC - 1) / KMED__TRAIN_VC;
    memset(&X, 0, sizeof X);
    X.p = tr->hx; X.t = KMED_F32; X.ld = C; X.alpha = 1.0f;
    hc.dxf = dxf;
    for (s = 0; s < (size_t)n; s += tr->head_rows) {
        size_t nb = (size_t)n - s < tr->head_rows ? (size_t)n - s : tr->head_rows;
        for (i = 0; i < nb; i++)
            memcpy(tr->hx + i * C, tr->xf + tr->hrow[s + i] * C, C * sizeof(float));
        for (i = 0; i < nb; i += KMED__MR)   /* x strips for the logits (A operand) */
            kmed__pack_a(tr->hxa + i * C, &X, i, nb - i < KMED__MR ? nb - i : KMED__MR, 0, C);
        for (jc = 0; jc < C; jc += KMED__NR)   /* x panels for dE (B operand) */
            kmed__pack_b(tr->hxb + jc * nb, &X, 0, nb, jc, C - jc < KMED__NR ? C - jc : KMED__NR,
                         NULL);
        hc.s0 = s;
        hc.nb = nb;
        kmed_pool_for(tr->pool, hc.nch, 1, kmed__train_head_stats_fn, &hc);
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_merge_fn, &hc);
        for (i = 0; i < nb; i++) sum += tr->hnll[i];
        if (norm <= 0.0) continue;
        kmed_pool_for(tr->pool, hc.nch < KMED__TRAIN_PARTS ? hc.nch : KMED__TRAIN_PARTS, 1,
                      kmed__train_head_grad_fn, &hc);
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_dx_fn, &hc);
    }
    if (loss_sum) *loss_sum += sum;
    if (count) *count += (size_t)n;
    return KMED_OK;
}

#else /* no SIMD GEMM: three plain GEMMs over a (head_rows, V) logits block */

typedef struct kmed__train_headc {
    kmed_train *tr;
    size_t s;          /* first gathered row of this block */
    float inv;         /* 1 / norm, 0 for forward only */
} kmed__train_headc;

/* Per row of the logits block: soft-cap, log-sum-exp and NLL from 512-wide chunks, and
   (backward) the gradient of NLL / norm w.r.t. the pre-cap logits, written over them. */
static void kmed__train_head_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_headc *c = (kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t V = (size_t)tr->m->cfg.vocab_size, nch = (V + 511) / 512, i, j;
    float cap = tr->m->cfg.final_softcap;
    float *st = tr->head_scratch + (size_t)thread * tr->head_floats; /* (nch, 2) */
    for (i = b; i < e; i++) {
        float *y = tr->logits + i * V; /* (V) */
        size_t tgt = (size_t)tr->htgt[c->s + i];
        float mx;
        double sum;
        for (j = 0; j < V; j += 512)
            kmed__xent_stats(y + j, V - j < 512 ? V - j : 512, cap, &st[j / 256],
                             &st[j / 256 + 1]);
        sum = kmed__train_head_lse(st, nch, &mx);
        tr->hnll[i] = (double)mx + log(sum) - (double)y[tgt];
        if (c->inv == 0.0f) continue;
        for (j = 0; j < V; j += 512)
            kmed__xent_grad(y + j, y + j, V - j < 512 ? V - j : 512, tgt >= j ? tgt - j : V,
                            mx, (float)(1.0 / sum) * c->inv, c->inv, cap);
    }
}

static kmed_result kmed__train_head(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    double norm, float *dxf, double *loss_sum, size_t *count,
                                    kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)g->vocab_size, C = (size_t)g->hidden_size, s, i, j;
    long n = kmed__train_head_gather(tr, labels, B, T, err);
    double sum = 0.0;
    kmed__train_headc hc;
    if (n < 0) return KMED_ERR_ARG;
    hc.tr = tr;
    hc.inv = norm > 0.0 ? (float)(1.0 / norm) : 0.0f;
    for (s = 0; s < (size_t)n; s += tr->head_rows) {
        size_t nb = (size_t)n - s < tr->head_rows ? (size_t)n - s : tr->head_rows;
        for (i = 0; i < nb; i++)
            memcpy(tr->hx + i * C, tr->xf + tr->hrow[s + i] * C, C * sizeof(float));
        kmed_matmul(tr->pool, tr->logits, tr->hx, E->data, E->type, nb, V, C, 0);
        hc.s = s;
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_fn, &hc);
        for (i = 0; i < nb; i++) sum += tr->hnll[i];
        if (norm <= 0.0) continue;
        memset(tr->hdx, 0, nb * C * sizeof(float));
        kmed_matmul_dx(tr->pool, tr->hdx, tr->logits, E->data, E->type, nb, V, C);
        for (i = 0; i < nb; i++) {
            float *d = dxf + tr->hrow[s + i] * C;
            for (j = 0; j < C; j++) d[j] += tr->hdx[i * C + j];
        }
        if (tr->dembed) kmed_matmul_dw(tr->pool, tr->dembed, tr->logits, tr->hx, nb, V, C);
    }
    if (loss_sum) *loss_sum += sum;
    if (count) *count += (size_t)n;
    return KMED_OK;
}
#endif

KMED_API kmed_result kmed_train_forward_backward(kmed_train *tr, const int *ids,
                                                 const int *labels, size_t B, size_t T,
                                                 double norm, double *loss_sum,
                                                 size_t *count, kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t N = B * T, C = (size_t)g->hidden_size, V = (size_t)g->vocab_size, NC, i;
    int L = g->n_layers, l, backward = norm > 0.0;
    kmed_result rc;
    if (B == 0 || T == 0 || B > tr->maxB || T > tr->maxT)
        return KMED__ERR(err, KMED_ERR_ARG, "batch %zu x %zu tokens outside the trainer's "
                         "1..%zu x 1..%zu", B, T, tr->maxB, tr->maxT);
    for (i = 0; i < N; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= V)
            return KMED__ERR(err, KMED_ERR_ARG, "token id %d at sequence %zu position %zu "
                             "is outside [0, %zu)", ids[i], i / T, i % T, V);
    NC = N * C;
    for (i = 0; i < N; i++) tr->pos[i] = (int)(i % T);
    kmed__embed_forward(tr->resid, ids, tr->m->embed.data, tr->m->embed.type, N, C);
    for (l = 0; l < L; l++) {
        kmed__train_acts *a = &tr->acts[tr->cfg.checkpointing ? 0 : l];
        kmed__train_layer_forward(tr, l, a, tr->resid + (size_t)l * NC,
                                  tr->resid + (size_t)(l + 1) * NC, B, T);
    }
    kmed__train_norm(tr, tr->xf, tr->rstdf, tr->resid + (size_t)L * NC, tr->m->final_norm, N);
    if (backward) memset(tr->dtmp, 0, NC * sizeof(float));
    rc = kmed__train_head(tr, labels, B, T, norm, tr->dtmp, loss_sum, count, err);
    if (rc != KMED_OK || !backward || tr->lowest >= L) return rc;
    memset(tr->dres, 0, NC * sizeof(float));
    kmed__train_norm_bw(tr, tr->dres, tr->dfinal, tr->dtmp, tr->resid + (size_t)L * NC,
                        tr->m->final_norm, tr->rstdf, N);
    for (l = L - 1; l >= tr->lowest; l--) {
        kmed__train_acts *a = &tr->acts[tr->cfg.checkpointing ? 0 : l];
        if (tr->cfg.checkpointing)
            kmed__train_layer_forward(tr, l, a, tr->resid + (size_t)l * NC, tr->tmp2, B, T);
        kmed__train_layer_backward(tr, l, a, tr->resid + (size_t)l * NC, B, T,
                                   tr->full || l > tr->lowest);
    }
    if (tr->full) kmed__embed_backward(tr->dembed, tr->dres, ids, N, C);
    return KMED_OK;
}

KMED_API kmed_result kmed_train_loss(kmed_train *tr, const int *ids, const int *labels,
                                     size_t B, size_t T, double *loss, kmed_error *err)
{
    double sum = 0.0;
    size_t n = 0;
    kmed_result rc = kmed_train_forward_backward(tr, ids, labels, B, T, 0.0, &sum, &n, err);
    *loss = n ? sum / (double)n : 0.0;
    return rc;
}

/* ---- optimiser ---- */

KMED_API kmed_result kmed_train_check_grads(kmed_train *tr, kmed_error *err)
{
    size_t i, j;
    for (i = 0; i < tr->np; i++) {
        const kmed_param *q = &tr->params[i];
        for (j = 0; j < q->n; j++)
            if (!isfinite(q->g[j]))
                return KMED__ERR(err, KMED_ERR_NUMERIC, "gradient of %s is %s at element %zu "
                                 "(step %ld); nothing was updated or saved", q->name,
                                 isnan(q->g[j]) ? "NaN" : "inf", j, tr->step + 1);
    }
    return KMED_OK;
}

KMED_API double kmed_train_grad_norm(kmed_train *tr)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < tr->total; i++) s += (double)tr->gblock[i] * (double)tr->gblock[i];
    return sqrt(s);
}


typedef struct kmed__train_opt {
    kmed_train *tr;
    float decay, b1, omb1, b2, omb2, neg_step, bc2_sqrt, eps, lr, wd, clip;
    int sgd;
} kmed__train_opt;

/* torch.optim.AdamW (single-tensor path) element by element, with its scalars rounded
   to f32 as torch's kernels do: p *= 1 - lr*wd; m.lerp_(g, 1-b1);
   v = v*b2 + (1-b2)*g*g; p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps).
   SGD: p -= lr * (g + wd*p). Elementwise, so the split over threads changes nothing. */
static void kmed__train_opt_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_opt *o = (kmed__train_opt *)ctx;
    float *p = o->tr->pall, *g = o->tr->gblock, *m = o->tr->mblock, *v = o->tr->vblock;
    size_t i = b;
    (void)thread;
#if KMED__SIMD == 512
    if (!o->sgd) {   /* the scalar statements below, 16 lanes at a time, same rounding */
        const __m512 clip = _mm512_set1_ps(o->clip), decay = _mm512_set1_ps(o->decay);
        const __m512 omb1 = _mm512_set1_ps(o->omb1), b2 = _mm512_set1_ps(o->b2);
        const __m512 omb2 = _mm512_set1_ps(o->omb2), ns = _mm512_set1_ps(o->neg_step);
        const __m512 bc2 = _mm512_set1_ps(o->bc2_sqrt), eps = _mm512_set1_ps(o->eps);
        for (; i + 16 <= e; i += 16) {
            __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g + i), clip);
            __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay);
            __m512 mi = _mm512_loadu_ps(m + i), vi = _mm512_loadu_ps(v + i);
            mi = _mm512_add_ps(mi, _mm512_mul_ps(omb1, _mm512_sub_ps(gi, mi)));
            vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(_mm512_mul_ps(omb2, gi), gi));
            pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi),
                                                 _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi),
                                                                             bc2), eps)));
            _mm512_storeu_ps(m + i, mi);
            _mm512_storeu_ps(v + i, vi);
            _mm512_storeu_ps(p + i, pi);
        }
    }
#endif
    for (; i < e; i++) {
        float gi = g[i] * o->clip;
        if (o->sgd) {
            p[i] = p[i] - o->lr * (gi + o->wd * p[i]);
            continue;
        }
        p[i] *= o->decay;
        m[i] = m[i] + o->omb1 * (gi - m[i]); /* lerp with weight < 0.5 */
        v[i] = v[i] * o->b2 + o->omb2 * gi * gi;
        p[i] = p[i] + o->neg_step * m[i] / (sqrtf(v[i]) / o->bc2_sqrt + o->eps);
    }
}

KMED_API void kmed_train_apply(kmed_train *tr, float lr)
{
    kmed__train_opt o;
    const kmed_optim_config *c = &tr->oc;
    double t;
    memset(&o, 0, sizeof o);
    tr->step++;
    t = (double)tr->step;
    o.tr = tr;
    o.clip = 1.0f;
    if (c->clip > 0.0f) {
        /* torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), applied when < 1 */
        double norm = kmed_train_grad_norm(tr);
        float coef = (float)((double)c->clip / (norm + 1e-6));
        if (coef < 1.0f) o.clip = coef;
    }
    o.sgd = c->kind == KMED_OPTIM_SGD;
    o.lr = lr;
    o.wd = c->weight_decay;
    o.decay = (float)(1.0 - (double)lr * (double)c->weight_decay);
    o.b1 = c->beta1;
    o.omb1 = (float)(1.0 - (double)c->beta1);
    o.b2 = c->beta2;
    o.omb2 = (float)(1.0 - (double)c->beta2);
    o.neg_step = (float)(-(double)lr / (1.0 - pow((double)c->beta1, t)));
    o.bc2_sqrt = (float)sqrt(1.0 - pow((double)c->beta2, t));
    o.eps = c->eps;
    kmed_pool_for(tr->pool, tr->total, 4096, kmed__train_opt_fn, &o);
}

/* The first stored value of a weight that is NaN or inf: 1 and *at set if found. */
static int kmed__train_bad_weight(const kmed_weight *w, float *row, size_t *at)
{
    size_t i, j, rb = kmed_dtype_bytes(w->type, w->cols);
    if (!w->data || !rb) return 0;
    for (i = 0; i < w->rows; i++) {
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * rb, row, w->cols);
        for (j = 0; j < w->cols; j++)
            if (!isfinite(row[j])) { *at = i * w->cols + j; return 1; }
    }
    return 0;
}

/* After a NaN/inf loss or gradient: names the weight it came from, when one holds a
   non-finite value (trainable tensors, then the frozen base), in front of err's message.
   Scans everything, but only on this failure path. */
static void kmed__train_blame(kmed_train *tr, kmed_error *err)
{
    static const char *const norms[4] = {"input_layernorm", "post_attention_layernorm",
                                         "pre_feedforward_layernorm",
                                         "post_feedforward_layernorm"};
    const kmed_gemma *m = tr->m;
    size_t C = (size_t)m->cfg.hidden_size, i, j, at = 0, cols = C;
    char what[160], tmp[sizeof err->msg];
    float *row = NULL;
    int l, t, found = 0;
    what[0] = 0;
    for (i = 0; i < tr->np && !found; i++)
        for (j = 0; j < tr->params[i].n && !found; j++)
            if (!isfinite(tr->params[i].p[j])) {
                snprintf(what, sizeof what, "%s", tr->params[i].name);
                at = j;
                found = 1;
            }
    if (!found && !tr->full) {
        if ((size_t)m->cfg.intermediate_size > cols) cols = (size_t)m->cfg.intermediate_size;
        if ((size_t)m->cfg.n_heads * (size_t)m->cfg.head_dim > cols)
            cols = (size_t)m->cfg.n_heads * (size_t)m->cfg.head_dim;
        row = (float *)KMED_MALLOC(cols * sizeof(float));
        if (!row) return;
        if (kmed__train_bad_weight(&m->embed, row, &at)) {
            snprintf(what, sizeof what, "model.embed_tokens.weight");
            found = 1;
        }
        for (l = 0; l < m->cfg.n_layers && !found; l++) {
            const kmed_gemma_layer *L = &m->layers[l];
            const float *nv[4];
            nv[0] = L->attn_norm; nv[1] = L->post_attn_norm;
            nv[2] = L->pre_ffn_norm; nv[3] = L->post_ffn_norm;
            for (t = 0; t < KMED_LORA_NTARGETS && !found; t++)
                if (kmed__train_bad_weight(kmed__lora_base(L, t), row, &at)) {
                    snprintf(what, sizeof what, "model.layers.%d.%s.%s.weight", l,
                             t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t]);
                    found = 1;
                }
            for (t = 0; t < 4 && !found; t++)
                for (j = 0; nv[t] && j < C && !found; j++)
                    if (!isfinite(nv[t][j])) {
                        snprintf(what, sizeof what, "model.layers.%d.%s.weight", l, norms[t]);
                        at = j;
                        found = 1;
                    }
        }
        for (j = 0; m->final_norm && j < C && !found; j++)
            if (!isfinite(m->final_norm[j])) {
                snprintf(what, sizeof what, "model.norm.weight");
                at = j;
                found = 1;
            }
        KMED_FREE(row);
    }
    if (!found || !err) return;
    snprintf(tmp, sizeof tmp, "%s", err->msg);
    kmed_error_set(err, KMED_ERR_NUMERIC, NULL, 0, (size_t)-1, "%s holds a non-finite value "
                   "at element %zu: %s", what, at, tmp);
}

KMED_API kmed_result kmed_train_grads(kmed_train *tr, const int *ids, const int *labels,
                                      size_t accum, size_t B, size_t T, double *loss,
                                      kmed_error *err)
{
    size_t a, count = 0, per = B * T;
    double sum = 0.0, mean;
    kmed_result rc;
    if (accum == 0) accum = 1;
    for (a = 0; a < accum; a++) count += kmed_train_count(labels + a * per, B, T);
    if (count == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "step %ld: the batch has no counted tokens (every "
                         "label is -100)", tr->step + 1);
    kmed_train_zero_grad(tr);
    for (a = 0; a < accum; a++) {
        rc = kmed_train_forward_backward(tr, ids + a * per, labels + a * per, B, T,
                                         (double)count, &sum, NULL, err);
        if (rc != KMED_OK) return rc;
    }
    mean = sum / (double)count;
    tr->last_loss = mean;
    if (loss) *loss = mean;
    if (!isfinite(mean)) {
        KMED__ERR(err, KMED_ERR_NUMERIC, "loss is %s at step %ld; nothing was updated or "
                  "saved", isnan(mean) ? "NaN" : "inf", tr->step + 1);
        kmed__train_blame(tr, err);
        return KMED_ERR_NUMERIC;
    }
    if (tr->cfg.spike_factor > 0.0f && tr->loss_n >= 10 &&
        mean > (double)tr->cfg.spike_factor * tr->loss_ema)
        return KMED__ERR(err, KMED_ERR_NUMERIC, "loss spike at step %ld: %.4f > %.1f x running "
                         "mean %.4f; nothing was updated or saved", tr->step + 1, mean,
                         (double)tr->cfg.spike_factor, tr->loss_ema);
    rc = kmed_train_check_grads(tr, err);
    if (rc == KMED_ERR_NUMERIC) kmed__train_blame(tr, err);
    return rc;
}

KMED_API void kmed_train_update(kmed_train *tr)
{
    tr->loss_ema = tr->loss_n ? 0.9 * tr->loss_ema + 0.1 * tr->last_loss : tr->last_loss;
    tr->loss_n++;
    kmed_train_apply(tr, kmed_optim_lr(&tr->oc, tr->step + 1));
}

KMED_API kmed_result kmed_train_step(kmed_train *tr, const int *ids, const int *labels,
                                     size_t accum, size_t B, size_t T, double *loss,
                                     kmed_error *err)
{
    kmed_result rc = kmed_train_grads(tr, ids, labels, accum, B, T, loss, err);
    if (rc == KMED_OK) kmed_train_update(tr);
    return rc;
}

/* ---- saving: gradients, full model, checkpoints, loss curve ---- */

/* Writes `extra` tensors then, per parameter, one tensor per selected array
   (which: 'p', 'g', 'm', 'v'), named prefix + name. */
static kmed_result kmed__train_write(kmed_train *tr, const char *path, const char *which,
                                     int prefixed, const kmed_tensor_info *extra,
                                     size_t n_extra, const char *const *mk,
                                     const char *const *mv, size_t n_meta, kmed_error *err)
{
    size_t nw = strlen(which), n = n_extra + tr->np * nw, i, k, o = 0;
    kmed_tensor_info *ti = (kmed_tensor_info *)kmed__calloc(n ? n : 1, sizeof *ti);
    char (*names)[144] = (char(*)[144])kmed__calloc(n ? n : 1, sizeof *names);
    kmed_result rc;
    if (!ti || !names) {
        KMED_FREE(ti);
        KMED_FREE(names);
        return KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
    }
    for (i = 0; i < n_extra; i++) ti[o++] = extra[i];
    for (k = 0; k < nw; k++)
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            const float *d = which[k] == 'p' ? q->p : which[k] == 'g' ? q->g
                           : which[k] == 'm' ? q->m : q->v;
            if (prefixed) snprintf(names[o], sizeof names[o], "%c/%s", which[k], q->name);
            else snprintf(names[o], sizeof names[o], "%s", q->name);
            ti[o].name = names[o];
            ti[o].dtype = KMED_F32;
            ti[o].ndim = q->ndim;
            ti[o].shape[0] = q->shape[0];
            ti[o].shape[1] = q->shape[1];
            ti[o].data = d;
            ti[o].nbytes = q->n * sizeof(float);
            o++;
        }
    rc = kmed_st_write(path, ti, o, mk, mv, n_meta, err);
    KMED_FREE(ti);
    KMED_FREE(names);
    return rc;
}

KMED_API kmed_result kmed_train_save_grads(kmed_train *tr, const char *path,
                                           kmed_error *err)
{
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    return kmed__train_write(tr, path, "g", 0, NULL, 0, mk, mv, 1, err);
}

KMED_API kmed_result kmed_train_save_model(kmed_train *tr, const char *dir, kmed_error *err)
{
    const kmed_gemma_config *c = &tr->m->cfg;
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    char path[1100];
    kmed_buf js = {0};
    kmed_result rc;
    if (!tr->full)
        return KMED__ERR(err, KMED_ERR_STATE, "save model: LoRA trainer (save the adapter)");
    if ((rc = kmed_mkdir_p(dir, err)) != KMED_OK) return rc;
    rc = kmed_path_join(path, sizeof path, dir, "model.safetensors", err);
    if (rc == KMED_OK) rc = kmed__train_write(tr, path, "p", 0, NULL, 0, mk, mv, 1, err);
    if (rc != KMED_OK) return rc;
    kmed_buf_printf(&js, "{\n  \"architectures\": [\"Gemma2ForCausalLM\"],\n"
                    "  \"model_type\": \"gemma2\",\n  \"torch_dtype\": \"float32\",\n"
                    "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n"
                    "  \"intermediate_size\": %d,\n  \"num_hidden_layers\": %d,\n"
                    "  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n"
                    "  \"head_dim\": %d,\n  \"query_pre_attn_scalar\": ",
                    c->vocab_size, c->hidden_size, c->intermediate_size, c->n_layers,
                    c->n_heads, c->n_kv_heads, c->head_dim);
    kmed_buf_json_f32(&js, c->query_pre_attn_scalar);
    kmed_buf_puts(&js, ",\n  \"rms_norm_eps\": ");
    kmed_buf_json_f32(&js, c->rms_norm_eps);
    kmed_buf_puts(&js, ",\n  \"rope_theta\": ");
    kmed_buf_json_f32(&js, c->rope_theta);
    kmed_buf_puts(&js, ",\n  \"attn_logit_softcapping\": ");
    if (c->attn_softcap > 0.0f) kmed_buf_json_f32(&js, c->attn_softcap);
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"final_logit_softcapping\": ");
    if (c->final_softcap > 0.0f) kmed_buf_json_f32(&js, c->final_softcap);
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"sliding_window\": ");
    if (c->sliding_window > 0) kmed_buf_printf(&js, "%d", c->sliding_window);
    else kmed_buf_puts(&js, "null");
    kmed_buf_printf(&js, ",\n  \"max_position_embeddings\": %d,\n  \"bos_token_id\": %d,\n"
                    "  \"eos_token_id\": %d,\n  \"pad_token_id\": %d,\n"
                    "  \"hidden_activation\": \"gelu_pytorch_tanh\",\n"
                    "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
                    "  \"tie_word_embeddings\": true\n}\n",
                    c->max_position > 0 ? c->max_position : 8192, c->bos_id, c->eos_id,
                    c->pad_id);
    if (js.failed) {
        kmed_buf_free(&js);
        return KMED__ERR(err, KMED_ERR_NOMEM, "save model: out of memory");
    }
    rc = kmed_path_join(path, sizeof path, dir, "config.json", err);
    if (rc == KMED_OK) rc = kmed_file_write_atomic(path, js.data, js.len, err);
    kmed_buf_free(&js);
    return rc;
}

KMED_API kmed_result kmed_train_ckpt_save(kmed_train *tr, const char *path,
                                          const kmed_train_ckpt *st, kmed_error *err)
{
    char v_step[32], v_pos[32], v_rng[80], v_ema[32], v_n[32], v_np[32];
    const char *mk[8] = {"kmed_checkpoint", "mode", "step", "data_pos", "rng", "loss_ema",
                         "loss_n", "n_params"};
    const char *mv[8];
    kmed_tensor_info ex[2];
    size_t ne = 0;
    uint64_t ema_bits;
    double ema = tr->loss_ema;
    memcpy(&ema_bits, &ema, sizeof ema_bits);
    snprintf(v_step, sizeof v_step, "%ld", tr->step);
    snprintf(v_pos, sizeof v_pos, "%llu", (unsigned long long)st->data_pos);
    snprintf(v_rng, sizeof v_rng, "%016llx%016llx%016llx%016llx",
             (unsigned long long)st->rng.s[0], (unsigned long long)st->rng.s[1],
             (unsigned long long)st->rng.s[2], (unsigned long long)st->rng.s[3]);
    snprintf(v_ema, sizeof v_ema, "%016llx", (unsigned long long)ema_bits); /* exact */
    snprintf(v_n, sizeof v_n, "%ld", tr->loss_n);
    snprintf(v_np, sizeof v_np, "%zu", tr->np);
    mv[0] = "1"; mv[1] = tr->full ? "full" : "lora"; mv[2] = v_step; mv[3] = v_pos;
    mv[4] = v_rng; mv[5] = v_ema; mv[6] = v_n; mv[7] = v_np;
    memset(ex, 0, sizeof ex);
    if (st->n_train) {
        ex[ne].name = "hist/train";
        ex[ne].dtype = KMED_F32;
        ex[ne].ndim = 1;
        ex[ne].shape[0] = st->n_train;
        ex[ne].data = st->train_loss;
        ex[ne].nbytes = st->n_train * sizeof(float);
        ne++;
    }
    if (st->n_val) {
        ex[ne].name = "hist/val";
        ex[ne].dtype = KMED_F32;
        ex[ne].ndim = 2;
        ex[ne].shape[0] = st->n_val;
        ex[ne].shape[1] = 2;
        ex[ne].data = st->val_loss;
        ex[ne].nbytes = st->n_val * 2 * sizeof(float);
        ne++;
    }
    return kmed__train_write(tr, path, tr->mblock ? "pmv" : "p", 1, ex, ne, mk, mv, 8, err);
}

static const char *kmed__train_meta(const kmed_st *st, const char *key)
{
    size_t i;
    for (i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta_keys[i], key)) return st->meta_vals[i];
    return NULL;
}

KMED_API void kmed_train_ckpt_free(kmed_train_ckpt *st)
{
    KMED_FREE(st->train_loss);
    KMED_FREE(st->val_loss);
    memset(st, 0, sizeof *st);
}

KMED_API kmed_result kmed_train_ckpt_load(kmed_train *tr, const char *path,
                                          kmed_train_ckpt *out, kmed_error *err)
{
    kmed_st st;
    kmed_result rc;
    const char *s_step, *s_pos, *s_rng, *s_ema, *s_n, *mode;
    const kmed_tensor_info *ti;
    kmed_train_ckpt res;
    unsigned long long r4[4], ema_bits;
    double ema;
    char name[160];
    size_t i, k;
    memset(&res, 0, sizeof res);
    if ((rc = kmed_st_open(&st, path, err)) != KMED_OK) return rc;
    s_step = kmed__train_meta(&st, "step");
    s_pos = kmed__train_meta(&st, "data_pos");
    s_rng = kmed__train_meta(&st, "rng");
    s_ema = kmed__train_meta(&st, "loss_ema");
    s_n = kmed__train_meta(&st, "loss_n");
    mode = kmed__train_meta(&st, "mode");
    if (!kmed__train_meta(&st, "kmed_checkpoint") || !s_step || !s_pos || !s_rng || !s_ema ||
        !s_n || !mode || sscanf(s_rng, "%16llx%16llx%16llx%16llx", &r4[0], &r4[1], &r4[2],
                                &r4[3]) != 4 || sscanf(s_ema, "%16llx", &ema_bits) != 1) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "not a kmed training checkpoint "
                        "(metadata missing)");
        goto fail;
    }
    if (strcmp(mode, tr->full ? "full" : "lora") != 0) {
        rc = KMED__ERRF(err, KMED_ERR_STATE, path, "checkpoint is for %s training, this run "
                        "is %s", mode, tr->full ? "full" : "lora");
        goto fail;
    }
    for (k = 0; k < 3; k++) {
        char which = "pmv"[k];
        if (which != 'p' && !tr->mblock) break;
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            snprintf(name, sizeof name, "%c/%s", which, q->name);
            ti = kmed_st_find(&st, name);
            if (!ti || ti->dtype != KMED_F32 || ti->nbytes != q->n * sizeof(float)) {
                rc = KMED__ERRF(err, KMED_ERR_SHAPE, path, "tensor %s %s (the run's "
                                "parameters differ from the checkpoint's)", name,
                                ti ? "has another shape or dtype" : "is missing");
                goto fail;
            }
        }
    }
    ti = kmed_st_find(&st, "hist/train");
    if (ti && ti->dtype == KMED_F32 && ti->ndim == 1) {
        res.n_train = (size_t)ti->shape[0];
        res.train_loss = (float *)kmed__calloc(res.n_train + 1, sizeof(float));
        if (!res.train_loss) goto nomem;
        memcpy(res.train_loss, ti->data, res.n_train * sizeof(float));
    }
    ti = kmed_st_find(&st, "hist/val");
    if (ti && ti->dtype == KMED_F32 && ti->ndim == 2 && ti->shape[1] == 2) {
        res.n_val = (size_t)ti->shape[0];
        res.val_loss = (float *)kmed__calloc(res.n_val * 2 + 2, sizeof(float));
        if (!res.val_loss) goto nomem;
        memcpy(res.val_loss, ti->data, res.n_val * 2 * sizeof(float));
    }
    /* Everything checked: only now overwrite the trainer. */
    for (k = 0; k < 3; k++) {
        char which = "pmv"[k];
        if (which != 'p' && !tr->mblock) break;
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            float *dst = which == 'p' ? q->p : which == 'm' ? q->m : q->v;
            snprintf(name, sizeof name, "%c/%s", which, q->name);
            memcpy(dst, kmed_st_find(&st, name)->data, q->n * sizeof(float));
        }
    }
    tr->step = strtol(s_step, NULL, 10);
    tr->loss_n = strtol(s_n, NULL, 10);
    memcpy(&ema, &ema_bits, sizeof ema);
    tr->loss_ema = ema;
    res.data_pos = strtoull(s_pos, NULL, 10);
    for (k = 0; k < 4; k++) res.rng.s[k] = (uint64_t)r4[k];
    kmed_st_close(&st);
    *out = res;
    return KMED_OK;
nomem:
    rc = KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
fail:
    kmed_train_ckpt_free(&res);
    kmed_st_close(&st);
    return rc;
}

KMED_API kmed_result kmed_train_svg(const char *path, const float *train_loss,
                                    size_t n_train, const float *val_loss, size_t n_val,
                                    kmed_error *err)
{
    const double W = 720, H = 400, x0 = 60, y0 = 20, pw = 640, ph = 330;
    double lo = INFINITY, hi = -INFINITY, xmax = (double)(n_train > 1 ? n_train : 2);
    kmed_buf b = {0};
    size_t i;
    int k;
    kmed_result rc;
    for (i = 0; i < n_train; i++)
        if (isfinite(train_loss[i])) {
            lo = fmin(lo, train_loss[i]);
            hi = fmax(hi, train_loss[i]);
        }
    for (i = 0; i < n_val; i++) {
        if (isfinite(val_loss[2 * i + 1])) {
            lo = fmin(lo, val_loss[2 * i + 1]);
            hi = fmax(hi, val_loss[2 * i + 1]);
        }
        if (val_loss[2 * i] > xmax) xmax = val_loss[2 * i];
    }
    if (!(lo <= hi)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
    kmed_buf_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" "
                    "height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n"
                    "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                    "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" "
                    "stroke=\"#888\"/>\n", W, H, x0, y0, pw, ph);
    for (k = 0; k <= 4; k++) {
        double v = lo + (hi - lo) * k / 4.0, y = y0 + ph - ph * k / 4.0;
        kmed_buf_printf(&b, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n"
                        "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#eee\"/>\n",
                        x0 - 4, y + 4, v, x0, x0 + pw, y, y);
    }
    kmed_buf_printf(&b, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step (1..%.0f)"
                    "</text>\n<text x=\"%.0f\" y=\"14\">loss: <tspan fill=\"#1f77b4\">train"
                    "</tspan> <tspan fill=\"#d62728\">val</tspan></text>\n",
                    x0 + pw / 2, H - 10, xmax, x0);
    if (n_train) {
        kmed_buf_puts(&b, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" "
                          "points=\"");
        for (i = 0; i < n_train; i++) {
            double v = isfinite(train_loss[i]) ? train_loss[i] : hi;
            kmed_buf_printf(&b, "%.1f,%.1f ", x0 + pw * ((double)(i + 1) - 1) / (xmax - 1),
                            y0 + ph - ph * (v - lo) / (hi - lo));
        }
        kmed_buf_puts(&b, "\"/>\n");
    }
    if (n_val) {
        kmed_buf_puts(&b, "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" "
                          "points=\"");
        for (i = 0; i < n_val; i++)
            kmed_buf_printf(&b, "%.1f,%.1f ", x0 + pw * (val_loss[2 * i] - 1) / (xmax - 1),
                            y0 + ph - ph * (val_loss[2 * i + 1] - lo) / (hi - lo));
        kmed_buf_puts(&b, "\"/>\n");
        for (i = 0; i < n_val; i++)
            kmed_buf_printf(&b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#d62728\"/>\n",
                            x0 + pw * (val_loss[2 * i] - 1) / (xmax - 1),
                            y0 + ph - ph * (val_loss[2 * i + 1] - lo) / (hi - lo));
    }
    kmed_buf_puts(&b, "</svg>\n");
    if (b.failed) {
        kmed_buf_free(&b);
        return KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
    }
    rc = kmed_file_write_atomic(path, b.data, b.len, err);
    kmed_buf_free(&b);
    return rc;
}

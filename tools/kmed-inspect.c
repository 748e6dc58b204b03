/* kmed-inspect: lists the metadata and tensors of a safetensors file, a Hugging Face model
   directory (sharded or not), a GGUF file, or a PEFT adapter directory; summarises .npy,
   JSON and JSONL files, so every file of a model or fixture directory can be looked at.

   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-inspect.c -o build/kmed-inspect \
      -lm -lpthread
*/
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char usage[] =
    "usage: kmed-inspect [options] PATH\n"
    "\n"
    "PATH is a .safetensors file, a model directory (model.safetensors.index.json and its\n"
    "shards, or one *.safetensors), a .gguf file, or a PEFT adapter directory\n"
    "(adapter_config.json + adapter_model.safetensors). NumPy .npy files, JSON and JSONL\n"
    "files get a short summary; any other file its size and line count. A .gguf or\n"
    ".safetensors file that does not parse is an error (exit 1) naming the problem.\n"
    "\n"
    "options:\n"
    "  --json          print one JSON object instead of tables (default: off)\n"
    "  --values N      array values shown per metadata entry (default: 5)\n"
    "  --no-tensors    leave out the tensor table (default: off)\n"
    "  --help          this text\n";

typedef struct opts { int json, no_tensors; long values; } opts;

/* Appends s[0..n) as a JSON string, replacing invalid UTF-8 by U+FFFD so the output is
   always valid JSON (token pieces can hold arbitrary bytes). */
static void put_str(kmed_buf *b, const char *s, size_t n)
{
    kmed_buf clean = {0};
    size_t i = 0;
    while (i < n) {
        unsigned char c = (unsigned char)s[i];
        size_t k, len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3
                      : (c >> 3) == 30 ? 4 : 0;
        int ok = len > 0 && i + len <= n;
        for (k = 1; ok && k < len; k++) ok = ((unsigned char)s[i + k] >> 6) == 2;
        if (ok && len == 2 && c < 0xc2) ok = 0;
        if (ok && len == 3) {
            unsigned char c1 = (unsigned char)s[i + 1];
            if ((c == 0xe0 && c1 < 0xa0) || (c == 0xed && c1 >= 0xa0)) ok = 0;
        }
        if (ok && len == 4) {
            unsigned char c1 = (unsigned char)s[i + 1];
            if ((c == 0xf0 && c1 < 0x90) || (c == 0xf4 && c1 >= 0x90) || c > 0xf4) ok = 0;
        }
        if (ok) { kmed_buf_put(&clean, s + i, len); i += len; }
        else { kmed_buf_puts(&clean, "\xef\xbf\xbd"); i++; }
    }
    kmed_buf_json_str(b, clean.data ? clean.data : "", clean.len);
    kmed_buf_free(&clean);
}

static const char *gguf_type_name(kmed_gguf_type t)
{
    static const char *const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                        "string", "array", "u64", "i64", "f64"};
    return (unsigned)t < 13 ? names[t] : "?";
}

/* One numeric value of type t at p (little-endian, as stored). */
static void put_num(kmed_buf *b, kmed_gguf_type t, const unsigned char *p)
{
    uint64_t raw = 0;
    size_t n = t == KMED_GGUF_U8 || t == KMED_GGUF_I8 || t == KMED_GGUF_BOOL ? 1
             : t == KMED_GGUF_U16 || t == KMED_GGUF_I16 ? 2
             : t == KMED_GGUF_U64 || t == KMED_GGUF_I64 || t == KMED_GGUF_F64 ? 8 : 4;
    size_t k;
    for (k = 0; k < n; k++) raw |= (uint64_t)p[k] << (8 * k);
    switch (t) {
    case KMED_GGUF_I8: kmed_buf_printf(b, "%d", (int)(int8_t)raw); break;
    case KMED_GGUF_I16: kmed_buf_printf(b, "%d", (int)(int16_t)raw); break;
    case KMED_GGUF_I32: kmed_buf_printf(b, "%ld", (long)(int32_t)raw); break;
    case KMED_GGUF_I64: kmed_buf_printf(b, "%lld", (long long)(int64_t)raw); break;
    case KMED_GGUF_BOOL: kmed_buf_puts(b, raw ? "true" : "false"); break;
    case KMED_GGUF_F32: {
        uint32_t u = (uint32_t)raw;
        float f;
        memcpy(&f, &u, 4);
        kmed_buf_json_f32(b, f);
        break;
    }
    case KMED_GGUF_F64: {
        double d;
        memcpy(&d, &raw, 8);
        kmed_buf_json_f64(b, d);
        break;
    }
    default: kmed_buf_printf(b, "%llu", (unsigned long long)raw); break;
    }
}

static size_t gguf_elem_size(kmed_gguf_type t)
{
    switch (t) {
    case KMED_GGUF_U8: case KMED_GGUF_I8: case KMED_GGUF_BOOL: return 1;
    case KMED_GGUF_U16: case KMED_GGUF_I16: return 2;
    case KMED_GGUF_U64: case KMED_GGUF_I64: case KMED_GGUF_F64: return 8;
    default: return 4;
    }
}

/* The value of one kv: scalars as JSON values, arrays as [first values, ...]. */
static void put_kv_value(kmed_buf *b, const kmed_gguf_kv *kv, long values, int json)
{
    uint64_t i, show;
    if (kv->type == KMED_GGUF_STRING) { put_str(b, kv->str, kv->len); return; }
    if (kv->type != KMED_GGUF_ARRAY) {
        unsigned char tmp[8];
        uint64_t bits = kv->u;
        int k;
        if (kv->type == KMED_GGUF_F32) {
            float f = (float)kv->f;
            uint32_t u;
            memcpy(&u, &f, 4);
            bits = u;
        } else if (kv->type == KMED_GGUF_F64) {
            memcpy(&bits, &kv->f, 8);
        }
        for (k = 0; k < 8; k++) tmp[k] = (unsigned char)(bits >> (8 * k));
        put_num(b, kv->type, tmp);
        return;
    }
    show = values < 0 ? 0 : (uint64_t)values;
    if (show > kv->n) show = kv->n;
    kmed_buf_puts(b, "[");
    for (i = 0; i < show; i++) {
        if (i) kmed_buf_puts(b, ", ");
        if (kv->arr_type == KMED_GGUF_STRING) put_str(b, kv->strs[i], kv->str_lens[i]);
        else put_num(b, kv->arr_type,
                     (const unsigned char *)kv->raw + i * gguf_elem_size(kv->arr_type));
    }
    if (show < kv->n && !json) kmed_buf_puts(b, show ? ", ..." : "...");
    kmed_buf_puts(b, "]");
}

static void put_shape(kmed_buf *b, const kmed_tensor_info *t)
{
    int k;
    kmed_buf_puts(b, "[");
    for (k = 0; k < t->ndim; k++)
        kmed_buf_printf(b, "%s%llu", k ? ", " : "", (unsigned long long)t->shape[k]);
    kmed_buf_puts(b, "]");
}

/* The dtype text of tensor i: a static name, or one written into tmp. */
typedef const char *(*dtype_text_fn)(const void *ctx, size_t i, char *tmp, size_t cap);

/* Tensor table (text) or array (JSON). */
static void put_tensors(kmed_buf *b, const kmed_tensor_info *ts, size_t n,
                        dtype_text_fn dtype_of, const void *ctx, int json)
{
    size_t i, w = 4;
    char tmp[32];
    if (json) {
        kmed_buf_puts(b, "\"tensors\": [");
        for (i = 0; i < n; i++) {
            const char *dt = dtype_of(ctx, i, tmp, sizeof tmp);
            kmed_buf_puts(b, i ? ",\n    {\"name\": " : "\n    {\"name\": ");
            put_str(b, ts[i].name, strlen(ts[i].name));
            kmed_buf_puts(b, ", \"dtype\": ");
            put_str(b, dt, strlen(dt));
            kmed_buf_puts(b, ", \"shape\": ");
            put_shape(b, &ts[i]);
            kmed_buf_printf(b, ", \"bytes\": %zu", ts[i].nbytes);
            kmed_buf_puts(b, "}");
        }
        kmed_buf_puts(b, n ? "\n  ]" : "]");
        return;
    }
    for (i = 0; i < n; i++) if (strlen(ts[i].name) > w) w = strlen(ts[i].name);
    kmed_buf_printf(b, "tensors (%zu):\n  %-*s  %-8s  %-20s  %12s\n", n, (int)w, "name", "dtype",
                    "shape", "bytes");
    for (i = 0; i < n; i++) {
        kmed_buf sh = {0};
        put_shape(&sh, &ts[i]);
        kmed_buf_printf(b, "  %-*s  %-8s  %-20s  %12zu\n", (int)w, ts[i].name,
                        dtype_of(ctx, i, tmp, sizeof tmp),
                        sh.data ? sh.data : "[]", ts[i].nbytes);
        kmed_buf_free(&sh);
    }
}

static const char *st_dtype_of(const void *ctx, size_t i, char *tmp, size_t cap)
{
    const kmed_st *st = (const kmed_st *)ctx;
    (void)tmp;
    (void)cap;
    return st->tensors[i].dtype == KMED_DTYPE_UNKNOWN ? kmed_st_dtype_str(st, i)
                                                       : kmed_dtype_name(st->tensors[i].dtype);
}

static const char *gguf_dtype_of(const void *ctx, size_t i, char *tmp, size_t cap)
{
    const kmed_gguf *g = (const kmed_gguf *)ctx;
    int t = g->tensors[i].ggml_type;
    const char *name = kmed_ggml_type_name(t);
    if (strcmp(name, "unknown") != 0) return name;
    snprintf(tmp, cap, "type %d", t); /* newer than this build: its number identifies it */
    return tmp;
}

static void inspect_gguf(kmed_buf *b, const char *path, const opts *o)
{
    kmed_gguf g;
    kmed_error err = {0};
    size_t i, w = 4, total = 0;
    die_if(kmed_gguf_open(&g, path, &err), &err, "cannot read GGUF");
    for (i = 0; i < g.n_tensors; i++) total += g.tensors[i].nbytes;
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"gguf\",\n  \"version\": %u,\n  \"alignment\": %zu,"
                        "\n  \"data_offset\": %zu,\n  \"tensor_bytes\": %zu,\n  \"metadata\": [",
                        (unsigned)g.version, g.alignment, g.data_offset, total);
        for (i = 0; i < g.n_kv; i++) {
            const kmed_gguf_kv *kv = &g.kv[i];
            kmed_buf_puts(b, i ? ",\n    {\"key\": " : "\n    {\"key\": ");
            put_str(b, kv->key, strlen(kv->key));
            if (kv->type == KMED_GGUF_ARRAY)
                kmed_buf_printf(b, ", \"type\": \"%s[]\", \"n\": %llu, \"head\": ",
                                gguf_type_name(kv->arr_type), (unsigned long long)kv->n);
            else kmed_buf_printf(b, ", \"type\": \"%s\", \"value\": ", gguf_type_name(kv->type));
            put_kv_value(b, kv, o->values, 1);
            kmed_buf_puts(b, "}");
        }
        kmed_buf_puts(b, g.n_kv ? "\n  ]" : "]");
        if (!o->no_tensors) {
            kmed_buf_puts(b, ",\n  ");
            put_tensors(b, g.tensors, g.n_tensors, gguf_dtype_of, &g, 1);
        }
        kmed_buf_puts(b, "\n}\n");
    } else {
        kmed_buf_printf(b, "%s: GGUF v%u, %zu metadata entries, %zu tensors (%zu bytes), "
                        "alignment %zu, data at offset %zu\n", path, (unsigned)g.version, g.n_kv,
                        g.n_tensors, total, g.alignment, g.data_offset);
        for (i = 0; i < g.n_kv; i++) if (strlen(g.kv[i].key) > w) w = strlen(g.kv[i].key);
        kmed_buf_printf(b, "metadata (%zu):\n", g.n_kv);
        for (i = 0; i < g.n_kv; i++) {
            const kmed_gguf_kv *kv = &g.kv[i];
            char ty[48];
            if (kv->type == KMED_GGUF_ARRAY)
                snprintf(ty, sizeof ty, "%s[%llu]", gguf_type_name(kv->arr_type),
                         (unsigned long long)kv->n);
            else snprintf(ty, sizeof ty, "%s", gguf_type_name(kv->type));
            kmed_buf_printf(b, "  %-*s  %-14s  ", (int)w, kv->key, ty);
            put_kv_value(b, kv, o->values, 0);
            kmed_buf_puts(b, "\n");
        }
        if (!o->no_tensors) put_tensors(b, g.tensors, g.n_tensors, gguf_dtype_of, &g, 0);
    }
    kmed_gguf_close(&g);
}

/* Adapter or model config summary: the listed keys that are present, in that order. */
static void put_config(kmed_buf *b, const char *path, const char *const *keys, int json)
{
    char *text = NULL;
    size_t len = 0, i, shown = 0;
    kmed_json_doc doc = {0};
    kmed_error err = {0};
    die_if(kmed_file_read(path, (size_t)64 << 20, &text, &len, &err), &err, "cannot read config");
    die_if(kmed_json_parse(&doc, text, len, path, 1, &err), &err, "cannot parse config");
    if (json) kmed_buf_puts(b, "{");
    for (i = 0; keys[i]; i++) {
        const kmed_json *v = kmed_json_get(doc.root, keys[i]);
        size_t k;
        if (!v) continue;
        if (json) {
            kmed_buf_puts(b, shown ? ", " : "");
            put_str(b, keys[i], strlen(keys[i]));
            kmed_buf_puts(b, ": ");
        } else {
            kmed_buf_printf(b, "  %-24s  ", keys[i]);
        }
        shown++;
        switch (v->type) {
        case KMED_JSON_STRING:
            if (json) put_str(b, v->str, v->len);
            else kmed_buf_printf(b, "%s", v->str);
            break;
        case KMED_JSON_NUMBER: kmed_buf_put(b, v->str, v->len); break;
        case KMED_JSON_TRUE: kmed_buf_puts(b, "true"); break;
        case KMED_JSON_FALSE: kmed_buf_puts(b, "false"); break;
        case KMED_JSON_NULL: kmed_buf_puts(b, "null"); break;
        case KMED_JSON_ARRAY:
            kmed_buf_puts(b, "[");
            for (k = 0; k < v->len; k++) {
                const kmed_json *x = &v->kids[k];
                if (k) kmed_buf_puts(b, ", ");
                if (x->type == KMED_JSON_STRING) put_str(b, x->str, x->len);
                else if (x->type == KMED_JSON_NUMBER) kmed_buf_put(b, x->str, x->len);
                else kmed_buf_puts(b, "null");
            }
            kmed_buf_puts(b, "]");
            break;
        case KMED_JSON_OBJECT: kmed_buf_printf(b, json ? "{}" : "{%zu entries}", v->len); break;
        }
        if (!json) kmed_buf_puts(b, "\n");
    }
    if (json) kmed_buf_puts(b, "}");
    kmed_json_free(&doc);
    kmed_free(text);
}

static const char *const adapter_keys[] = {
    "peft_type", "base_model_name_or_path", "task_type", "r", "lora_alpha", "lora_dropout",
    "target_modules", "bias", "use_rslora", "use_dora", "fan_in_fan_out", NULL};
static const char *const model_keys[] = {
    "model_type", "architectures", "torch_dtype", "vocab_size", "hidden_size",
    "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "max_position_embeddings", "sliding_window", NULL};

static void inspect_st(kmed_buf *b, const char *path, const opts *o)
{
    kmed_st st;
    kmed_error err = {0};
    char cfg[4200];
    const char *kind = "safetensors";
    const char *const *keys = NULL;
    size_t i, total = 0;
    if (kmed_is_dir(path)) {
        FILE *f;
        kind = "safetensors directory";
        snprintf(cfg, sizeof cfg, "%s/adapter_config.json", path);
        if ((f = fopen(cfg, "rb")) != NULL) { kind = "PEFT adapter"; keys = adapter_keys; }
        else {
            snprintf(cfg, sizeof cfg, "%s/config.json", path);
            if ((f = fopen(cfg, "rb")) != NULL) { kind = "model directory"; keys = model_keys; }
        }
        if (f) fclose(f);
    }
    die_if(kmed_st_open(&st, path, &err), &err, "cannot read safetensors");
    for (i = 0; i < st.n_tensors; i++) total += st.tensors[i].nbytes;
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"%s\",\n  \"tensor_bytes\": %zu,\n",
                        keys == adapter_keys ? "peft-adapter" : keys ? "hf-model" : "safetensors",
                        total);
        if (keys) {
            kmed_buf_puts(b, "  \"config\": ");
            put_config(b, cfg, keys, 1);
            kmed_buf_puts(b, ",\n");
        }
        kmed_buf_puts(b, "  \"metadata\": {");
        for (i = 0; i < st.n_meta; i++) {
            kmed_buf_puts(b, i ? ", " : "");
            put_str(b, st.meta_keys[i], strlen(st.meta_keys[i]));
            kmed_buf_puts(b, ": ");
            put_str(b, st.meta_vals[i], strlen(st.meta_vals[i]));
        }
        kmed_buf_puts(b, "}");
        if (!o->no_tensors) {
            kmed_buf_puts(b, ",\n  ");
            put_tensors(b, st.tensors, st.n_tensors, st_dtype_of, &st, 1);
        }
        kmed_buf_puts(b, "\n}\n");
    } else {
        kmed_buf_printf(b, "%s: %s, %zu tensors (%zu bytes)\n", path, kind, st.n_tensors, total);
        if (keys) {
            kmed_buf_printf(b, "%s:\n", cfg);
            put_config(b, cfg, keys, 0);
        }
        kmed_buf_printf(b, "metadata (%zu):\n", st.n_meta);
        for (i = 0; i < st.n_meta; i++) {
            kmed_buf_printf(b, "  %s = ", st.meta_keys[i]);
            put_str(b, st.meta_vals[i], strlen(st.meta_vals[i]));
            kmed_buf_puts(b, "\n");
        }
        if (!o->no_tensors) put_tensors(b, st.tensors, st.n_tensors, st_dtype_of, &st, 0);
    }
    kmed_st_close(&st);
}

/* First bytes of a file (0 when it cannot be read). */
static size_t file_head(const char *path, unsigned char *m, size_t cap)
{
    FILE *f = fopen(path, "rb");
    size_t n;
    if (!f) return 0;
    n = fread(m, 1, cap, f);
    fclose(f);
    return n;
}

static int has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

/* Value of 'key': ... in a NumPy header dict (text up to the next ',' or '}' at depth 0). */
static const char *npy_field(const char *h, const char *key)
{
    const char *p = strstr(h, key);
    if (!p) return NULL;
    p = strchr(p + strlen(key), ':');
    return p ? p + 1 : NULL;
}

/* NumPy .npy (format 1.0-3.0): dtype, shape, and the first values. */
static void inspect_npy(kmed_buf *b, const char *path, const opts *o)
{
    kmed_map m;
    kmed_error err = {0};
    size_t hl, off, nd = 0, i, esize, numel = 1, show;
    unsigned long long shape[16];
    char descr[16] = {0}, *h;
    const char *p;
    int fortran;
    die_if(kmed_map_open(&m, path, &err), &err, "cannot read npy");
    if (m.size < 10 || memcmp(m.data, "\x93NUMPY", 6) != 0) die("%s: not a .npy file", path);
    hl = m.data[6] == 1 ? (size_t)m.data[8] | (size_t)m.data[9] << 8
       : m.size >= 12 ? (size_t)m.data[8] | (size_t)m.data[9] << 8 |
                        (size_t)m.data[10] << 16 | (size_t)m.data[11] << 24 : (size_t)-1;
    off = (m.data[6] == 1 ? 10 : 12) + hl;
    if (hl == (size_t)-1 || off > m.size) die("%s: truncated .npy header", path);
    h = (char *)malloc(hl + 1);
    if (!h) die("out of memory");
    memcpy(h, m.data + off - hl, hl);
    h[hl] = 0;
    p = npy_field(h, "'descr'");
    if (!p || sscanf(p, " '%15[^']'", descr) != 1) die("%s: no descr in the .npy header", path);
    p = npy_field(h, "'fortran_order'");
    fortran = p && strncmp(p + strspn(p, " "), "True", 4) == 0;
    p = npy_field(h, "'shape'");
    if (!p || !(p = strchr(p, '('))) die("%s: no shape in the .npy header", path);
    for (p++; *p && *p != ')' && nd < 16;) {
        char *end;
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p) { p++; continue; }
        shape[nd++] = v;
        numel *= (size_t)v;
        p = end;
    }
    esize = (size_t)atoi(descr + 2);
    if (esize == 0) esize = 1;
    if (numel * esize != m.size - off)
        die("%s: %zu elements of %zu bytes do not match the %zu data bytes", path, numel, esize,
            m.size - off);
    show = numel < (size_t)o->values ? numel : (size_t)o->values;
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"npy\",\n  \"descr\": \"%s\",\n"
                        "  \"fortran_order\": %s,\n  \"shape\": [", descr,
                        fortran ? "true" : "false");
        for (i = 0; i < nd; i++) kmed_buf_printf(b, "%s%llu", i ? ", " : "", shape[i]);
        kmed_buf_printf(b, "],\n  \"bytes\": %zu,\n  \"head\": [", m.size - off);
    } else {
        kmed_buf_printf(b, "%s: NumPy array, dtype %s%s, shape (", path, descr,
                        fortran ? " (Fortran order)" : "");
        for (i = 0; i < nd; i++) kmed_buf_printf(b, "%s%llu", i ? ", " : "", shape[i]);
        kmed_buf_printf(b, "), %zu bytes at offset %zu\n  first values: [", m.size - off, off);
    }
    for (i = 0; i < show; i++) {
        const unsigned char *q = m.data + off + i * esize;
        int le = descr[0] == '<' || descr[0] == '|';
        if (i) kmed_buf_puts(b, ", ");
        if (!le) { kmed_buf_puts(b, "null"); continue; }
        if (strcmp(descr + 1, "f4") == 0) { float f; memcpy(&f, q, 4); kmed_buf_json_f32(b, f); }
        else if (strcmp(descr + 1, "f8") == 0) { double d; memcpy(&d, q, 8);
                                                 kmed_buf_printf(b, "%.17g", d); }
        else if (strcmp(descr + 1, "i4") == 0) { int32_t v; memcpy(&v, q, 4);
                                                 kmed_buf_printf(b, "%ld", (long)v); }
        else if (strcmp(descr + 1, "i8") == 0) { int64_t v; memcpy(&v, q, 8);
                                                 kmed_buf_printf(b, "%lld", (long long)v); }
        else kmed_buf_puts(b, "null");
    }
    kmed_buf_puts(b, o->json ? "]\n}\n" : (show < numel ? ", ...]\n" : "]\n"));
    free(h);
    kmed_map_close(&m);
}

static const char *json_type_name(kmed_json_type t)
{
    static const char *const n[] = {"null", "false", "true", "number", "string", "array",
                                    "object"};
    return n[t];
}

/* A JSON file: its top-level members with their types and sizes. */
static void inspect_json(kmed_buf *b, const char *path, const opts *o)
{
    char *text = NULL;
    size_t len = 0, i;
    kmed_json_doc doc = {0};
    kmed_error err = {0};
    const kmed_json *r;
    die_if(kmed_file_read(path, 0, &text, &len, &err), &err, "cannot read JSON");
    die_if(kmed_json_parse(&doc, text, len, path, 1, &err), &err, "cannot parse JSON");
    r = doc.root;
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"json\",\n  \"bytes\": %zu,\n  \"root\": \"%s\","
                        "\n  \"members\": [", len, json_type_name(r->type));
    } else {
        kmed_buf_printf(b, "%s: JSON %s, %zu bytes", path, json_type_name(r->type), len);
        kmed_buf_printf(b, r->type == KMED_JSON_OBJECT ? ", %zu members\n"
                           : r->type == KMED_JSON_ARRAY ? ", %zu elements\n" : "\n", r->len);
    }
    for (i = 0; r->type == KMED_JSON_OBJECT && i < r->len; i++) {
        const kmed_json *v = &r->kids[i];
        if (o->json) {
            kmed_buf_puts(b, i ? ", {\"key\": " : "{\"key\": ");
            put_str(b, v->key, v->key_len);
            kmed_buf_printf(b, ", \"type\": \"%s\"", json_type_name(v->type));
            if (v->type >= KMED_JSON_STRING) kmed_buf_printf(b, ", \"len\": %zu", v->len);
            if (v->type == KMED_JSON_NUMBER) {
                kmed_buf_puts(b, ", \"value\": ");
                kmed_buf_put(b, v->str, v->len);
            }
            kmed_buf_puts(b, "}");
            continue;
        }
        kmed_buf_puts(b, "  ");
        put_str(b, v->key, v->key_len);
        kmed_buf_printf(b, "  %s", json_type_name(v->type));
        if (v->type == KMED_JSON_NUMBER) { kmed_buf_puts(b, " "); kmed_buf_put(b, v->str, v->len); }
        else if (v->type == KMED_JSON_STRING && v->len <= 60) {
            kmed_buf_puts(b, " ");
            put_str(b, v->str, v->len);
        } else if (v->type >= KMED_JSON_STRING) kmed_buf_printf(b, " [%zu]", v->len);
        kmed_buf_puts(b, "\n");
    }
    if (o->json) kmed_buf_puts(b, "]\n}\n");
    kmed_json_free(&doc);
    kmed_free(text);
}

/* A JSONL file: record count and the keys of the first record. */
static void inspect_jsonl(kmed_buf *b, const char *path, const opts *o)
{
    kmed_jsonl r;
    kmed_error err = {0};
    const kmed_json *v;
    size_t n = 0, bad = 0, i;
    int eof = 0;
    kmed_buf keys = {0};
    die_if(kmed_jsonl_open(&r, path, &err), &err, "cannot open JSONL");
    for (;;) {
        kmed_result res = kmed_jsonl_next(&r, &v, &eof, &err);
        if (res == KMED_ERR_FORMAT) { bad++; continue; }
        die_if(res, &err, "cannot read JSONL");
        if (eof) break;
        if (n++ == 0 && v->type == KMED_JSON_OBJECT)
            for (i = 0; i < v->len; i++) {
                if (i) kmed_buf_puts(&keys, ", ");
                put_str(&keys, v->kids[i].key, v->kids[i].key_len);
            }
    }
    kmed_jsonl_close(&r);
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"jsonl\",\n  \"records\": %zu,\n  \"bad_lines\": %zu,"
                        "\n  \"first_keys\": [%s]\n}\n", n, bad, keys.data ? keys.data : "");
    } else {
        kmed_buf_printf(b, "%s: JSONL, %zu records, %zu malformed lines\n  first record keys: "
                        "%s\n", path, n, bad, keys.data ? keys.data : "(not an object)");
    }
    kmed_buf_free(&keys);
}

/* Anything else: size, and whether it is UTF-8 text. */
static void inspect_other(kmed_buf *b, const char *path, const opts *o)
{
    kmed_map m;
    kmed_error err = {0};
    size_t i, lines = 0;
    int text = 1;
    die_if(kmed_map_open(&m, path, &err), &err, "cannot read");
    for (i = 0; i < m.size; i++) {
        if (m.data[i] == '\n') lines++;
        else if (m.data[i] < 0x20 && m.data[i] != '\t' && m.data[i] != '\r') text = 0;
    }
    if (o->json) {
        kmed_buf_puts(b, "{\n  \"path\": ");
        put_str(b, path, strlen(path));
        kmed_buf_printf(b, ",\n  \"format\": \"%s\",\n  \"bytes\": %zu,\n  \"lines\": %zu\n}\n",
                        text ? "text" : "binary", m.size, lines);
    } else {
        kmed_buf_printf(b, "%s: %s, %zu bytes, %zu lines (no tensors: not a safetensors, GGUF "
                        "or .npy file)\n", path, text ? "text" : "binary data", m.size, lines);
    }
    kmed_map_close(&m);
}

int main(int argc, char **argv)
{
    opts o = {0, 0, 5};
    const char *path = NULL;
    kmed_buf out = {0};
    int i;
    kmed_tool_name = "kmed-inspect";
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (strcmp(argv[i], "--json") == 0) {
            o.json = 1;
        } else if (strcmp(argv[i], "--no-tensors") == 0) {
            o.no_tensors = 1;
        } else if (strcmp(argv[i], "--values") == 0) {
            o.values = arg_long(argc, argv, &i, usage);
            if (o.values < 0) usage_error(usage, "--values must be >= 0");
        } else if (argv[i][0] == '-' && argv[i][1]) {
            usage_error(usage, "unknown option %s", argv[i]);
        } else if (path) {
            usage_error(usage, "only one PATH may be given");
        } else {
            path = argv[i];
        }
    }
    if (!path) usage_error(usage, "no PATH given");
    if (kmed_is_dir(path)) {
        inspect_st(&out, path, &o);
    } else {
        unsigned char m[8] = {0};
        size_t n = file_head(path, m, sizeof m);
        /* a .gguf without the magic goes to the GGUF reader too, which names the problem */
        if ((n >= 4 && memcmp(m, "GGUF", 4) == 0) || has_suffix(path, ".gguf"))
            inspect_gguf(&out, path, &o);
        else if (n >= 6 && memcmp(m, "\x93NUMPY", 6) == 0) inspect_npy(&out, path, &o);
        else if (has_suffix(path, ".jsonl")) inspect_jsonl(&out, path, &o);
        else if (has_suffix(path, ".json")) inspect_json(&out, path, &o);
        else if (has_suffix(path, ".safetensors")) inspect_st(&out, path, &o);
        else if (n < 8) inspect_other(&out, path, &o);
        else {
            /* safetensors has no magic: a plausible 8-byte header length then '{' */
            unsigned long long hl = 0;
            int k;
            for (k = 7; k >= 0; k--) hl = hl << 8 | m[k];
            if (hl >= 2 && hl <= KMED_MAX_HEADER_BYTES) inspect_st(&out, path, &o);
            else inspect_other(&out, path, &o);
        }
    }
    if (out.failed) die("output: out of memory");
    fwrite(out.data, 1, out.len, stdout);
    kmed_buf_free(&out);
    return 0;
}

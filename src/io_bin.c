/* ==== kmed_io_bin: safetensors and GGUF read/write ==== */

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes ---- */

KMED_API const char *kmed_dtype_name(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return "F32";
    case KMED_F16: return "F16";
    case KMED_BF16: return "BF16";
    case KMED_Q8_0: return "Q8_0";
    case KMED_Q4_0: return "Q4_0";
    case KMED_I8: return "I8";
    case KMED_I32: return "I32";
    case KMED_I64: return "I64";
    case KMED_U8: return "U8";
    case KMED_F64: return "F64";
    case KMED_BOOL: return "BOOL";
    case KMED_DTYPE_UNKNOWN: break;
    }
    return "UNKNOWN";
}

static int kmed__iob_ieq(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a, y = *b;
        if (x >= 'a' && x <= 'z') x = (char)(x - 'a' + 'A');
        if (y >= 'a' && y <= 'z') y = (char)(y - 'a' + 'A');
        if (x != y) return 0;
    }
    return *a == *b;
}

KMED_API kmed_dtype kmed_dtype_parse(const char *s)
{
    int t;
    if (!s) return KMED_DTYPE_UNKNOWN;
    for (t = 0; t < (int)KMED_DTYPE_UNKNOWN; t++)
        if (kmed__iob_ieq(s, kmed_dtype_name((kmed_dtype)t))) return (kmed_dtype)t;
    return KMED_DTYPE_UNKNOWN;
}

KMED_API uint64_t kmed_tensor_numel(const kmed_tensor_info *t)
{
    uint64_t n = 1;
    int i;
    for (i = 0; i < t->ndim && i < KMED_MAX_DIMS; i++) {
        if (t->shape[i] && n > UINT64_MAX / t->shape[i]) return UINT64_MAX; /* saturate */
        n *= t->shape[i];
    }
    return n;
}

KMED_API size_t kmed_dtype_bytes(kmed_dtype t, uint64_t n)
{
    uint64_t per = 0, blk = 1, b;
    switch (t) {
    case KMED_F32: case KMED_I32: per = 4; break;
    case KMED_F16: case KMED_BF16: per = 2; break;
    case KMED_I8: case KMED_U8: case KMED_BOOL: per = 1; break;
    case KMED_I64: case KMED_F64: per = 8; break;
    case KMED_Q8_0: per = 34; blk = 32; break; /* fp16 scale + 32 int8 */
    case KMED_Q4_0: per = 18; blk = 32; break; /* fp16 scale + 32 nibbles */
    case KMED_DTYPE_UNKNOWN: return 0;
    }
    if (n % blk) return 0;
    n /= blk;
    if (n > UINT64_MAX / per) return 0;
    b = n * per;
    if (b > (uint64_t)SIZE_MAX) return 0;
    return (size_t)b;
}

/* Errors at a byte offset of a named file. */
#define KMED__IOB_ERR(err, code, file, off, ...) \
    kmed_error_set((err), (code), (file), 0, (off), __VA_ARGS__)

static uint32_t kmed__iob_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t kmed__iob_u64(const unsigned char *p)
{
    return (uint64_t)kmed__iob_u32(p) | (uint64_t)kmed__iob_u32(p + 4) << 32;
}

static void kmed__iob_put_u32(kmed_buf *b, uint32_t v)
{
    unsigned char p[4];
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
    kmed_buf_put(b, p, 4);
}

static void kmed__iob_put_u64(kmed_buf *b, uint64_t v)
{
    unsigned char p[8];
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
    kmed_buf_put(b, p, 8);
}

/* qsort comparators over arrays of pointers. */
static int kmed__iob_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int kmed__iob_cmp_tname(const void *a, const void *b)
{
    const kmed_tensor_info *x = *(const kmed_tensor_info *const *)a;
    const kmed_tensor_info *y = *(const kmed_tensor_info *const *)b;
    return strcmp(x->name, y->name);
}

/* Binary search in an array of tensor pointers sorted by name. */
static const kmed_tensor_info *kmed__iob_bsearch(kmed_tensor_info *const *sorted, size_t n,
                                                 const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(sorted[mid]->name, name);
        if (c == 0) return sorted[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Zero bytes for padding writes. */
static const unsigned char kmed__iob_zeros[256] = {0};

static kmed_result kmed__iob_write_zeros(kmed_afile *af, size_t n, kmed_error *err)
{
    while (n) {
        size_t k = n < sizeof kmed__iob_zeros ? n : sizeof kmed__iob_zeros;
        kmed_result r = kmed_afile_write(af, kmed__iob_zeros, k, err);
        if (r != KMED_OK) return r;
        n -= k;
    }
    return KMED_OK;
}

/* ---- safetensors: reading ---- */

/* safetensors dtype names with their element sizes; kmed computes with the first group,
   the others are listed as KMED_DTYPE_UNKNOWN but still size-checked. */
typedef struct kmed__st_dtype { const char *name; kmed_dtype t; unsigned size; } kmed__st_dtype;
static const kmed__st_dtype kmed__st_dtypes[] = {
    {"F32", KMED_F32, 4}, {"F16", KMED_F16, 2}, {"BF16", KMED_BF16, 2}, {"I8", KMED_I8, 1},
    {"I32", KMED_I32, 4}, {"I64", KMED_I64, 8}, {"U8", KMED_U8, 1}, {"F64", KMED_F64, 8},
    {"BOOL", KMED_BOOL, 1},
    {"I16", KMED_DTYPE_UNKNOWN, 2}, {"U16", KMED_DTYPE_UNKNOWN, 2},
    {"U32", KMED_DTYPE_UNKNOWN, 4}, {"U64", KMED_DTYPE_UNKNOWN, 8},
    {"F8_E4M3", KMED_DTYPE_UNKNOWN, 1}, {"F8_E5M2", KMED_DTYPE_UNKNOWN, 1},
    {"F8_E8M0", KMED_DTYPE_UNKNOWN, 1}, {"C64", KMED_DTYPE_UNKNOWN, 8}
};

typedef struct kmed__st_impl {
    kmed_map *maps; size_t n_maps;
    char **shard_names;          /* [n_maps] file paths, for messages */
    size_t *shard_of;            /* [n_tensors] which map holds tensor i */
    char **dtype_strs;           /* [n_tensors] dtype text as stored */
    size_t cap;                  /* capacity of tensors, shard_of, dtype_strs */
    kmed_tensor_info **sorted;   /* [n_tensors] by name, for kmed_st_find */
} kmed__st_impl;

/* Room for one more tensor in st. */
static kmed_result kmed__st_grow(kmed_st *st, kmed__st_impl *im, kmed_error *err)
{
    size_t cap;
    kmed_tensor_info *t;
    size_t *so;
    char **ds;
    if (st->n_tensors < im->cap) return KMED_OK;
    if (st->n_tensors >= KMED_MAX_TENSORS)
        return KMED__ERR(err, KMED_ERR_LIMIT, "more than %zu tensors (KMED_MAX_TENSORS)",
                         (size_t)KMED_MAX_TENSORS);
    cap = im->cap ? im->cap * 2 : 64;
    t = (kmed_tensor_info *)KMED_REALLOC(st->tensors, cap * sizeof *t);
    if (t) st->tensors = t;
    so = t ? (size_t *)KMED_REALLOC(im->shard_of, cap * sizeof *so) : NULL;
    if (so) im->shard_of = so;
    ds = so ? (char **)KMED_REALLOC(im->dtype_strs, cap * sizeof *ds) : NULL;
    if (ds) im->dtype_strs = ds;
    if (!ds) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory for %zu tensors", cap);
    im->cap = cap;
    return KMED_OK;
}

typedef struct kmed__st_span { uint64_t begin, end; size_t idx; } kmed__st_span;

static int kmed__st_cmp_span(const void *a, const void *b)
{
    const kmed__st_span *x = (const kmed__st_span *)a, *y = (const kmed__st_span *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* A non-negative JSON integer. */
static int kmed__st_json_u64(const kmed_json *j, uint64_t *out)
{
    int64_t v;
    if (!j || j->type != KMED_JSON_NUMBER || !kmed_json_int(j, &v) || v < 0) return 0;
    *out = (uint64_t)v;
    return 1;
}

/* Parses one tensor entry of a header into st->tensors[st->n_tensors] (not yet counted). */
static kmed_result kmed__st_parse_entry(kmed_st *st, kmed__st_impl *im, const kmed_json *m,
                                        const unsigned char *data, uint64_t data_size,
                                        const char *name, kmed_error *err)
{
    kmed_tensor_info *t = &st->tensors[st->n_tensors];
    const kmed_json *jd = kmed_json_get(m, "dtype"), *js = kmed_json_get(m, "shape");
    const kmed_json *jo = kmed_json_get(m, "data_offsets");
    const kmed__st_dtype *dt = NULL;
    uint64_t begin, end, numel = 1, need;
    size_t i;
    const char *tn = m->key;
    memset(t, 0, sizeof *t);
    if (strlen(tn) != m->key_len || m->key_len == 0)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor name is empty or holds a NUL");
    if (m->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': entry is not an object", tn);
    if (!jd || jd->type != KMED_JSON_STRING)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': missing string \"dtype\"",
                          tn);
    if (!js || js->type != KMED_JSON_ARRAY)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': missing array \"shape\"",
                          tn);
    if (!jo || jo->type != KMED_JSON_ARRAY || jo->len != 2)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': \"data_offsets\" must be an array [begin, end]", tn);
    if (js->len > KMED_MAX_DIMS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                          "tensor '%s': %zu dimensions, at most %d supported (KMED_MAX_DIMS)",
                          tn, js->len, KMED_MAX_DIMS);
    for (i = 0; i < sizeof kmed__st_dtypes / sizeof kmed__st_dtypes[0]; i++)
        if (strcmp(jd->str, kmed__st_dtypes[i].name) == 0) dt = &kmed__st_dtypes[i];
    t->ndim = (int)js->len;
    for (i = 0; i < js->len; i++) {
        uint64_t d;
        if (!kmed__st_json_u64(&js->kids[i], &d))
            return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                              "tensor '%s': shape[%zu] is not a non-negative integer", tn, i);
        t->shape[i] = d;
        if (d && numel > UINT64_MAX / d)
            return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                              "tensor '%s': element count overflows 64 bits", tn);
        numel *= d;
    }
    if (!kmed__st_json_u64(&jo->kids[0], &begin) || !kmed__st_json_u64(&jo->kids[1], &end))
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': data_offsets are not non-negative integers", tn);
    if (begin > end || end > data_size)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': data_offsets [%llu, %llu] outside the data area of "
                          "%llu bytes", tn, (unsigned long long)begin,
                          (unsigned long long)end, (unsigned long long)data_size);
    if (dt) {
        if (numel > UINT64_MAX / dt->size)
            return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                              "tensor '%s': byte size overflows 64 bits", tn);
        need = numel * dt->size;
        if (need != end - begin)
            return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                              "tensor '%s': dtype %s with %llu elements needs %llu bytes, "
                              "data_offsets span %llu", tn, dt->name,
                              (unsigned long long)numel, (unsigned long long)need,
                              (unsigned long long)(end - begin));
    }
    t->name = kmed__strndup(tn, strlen(tn));
    im->dtype_strs[st->n_tensors] = kmed__strndup(jd->str, jd->len);
    if (!t->name || !im->dtype_strs[st->n_tensors]) {
        KMED_FREE((void *)t->name);
        KMED_FREE(im->dtype_strs[st->n_tensors]);
        t->name = NULL;
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    t->dtype = dt ? dt->t : KMED_DTYPE_UNKNOWN;
    t->ggml_type = -1;
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    im->shard_of[st->n_tensors] = im->n_maps ? im->n_maps - 1 : 0;
    st->n_tensors++;
    return KMED_OK;
}

/* Parses the header of one safetensors file held in d[0..size) and appends its tensors
   (sorted by data offset) to st. name labels errors; want_meta keeps __metadata__. */
static kmed_result kmed__st_parse(kmed_st *st, kmed__st_impl *im, const unsigned char *d,
                                  size_t size, const char *name, int want_meta,
                                  kmed_error *err)
{
    kmed_json_doc doc = {0};
    kmed_error jerr;
    kmed_result r = KMED_OK;
    uint64_t hlen, data_size;
    const unsigned char *data;
    size_t i, first = st->n_tensors;
    kmed__st_span *spans = NULL;
    if (size < 8)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "file of %zu bytes is too short for the 8-byte header length", size);
    hlen = kmed__iob_u64(d);
    if (hlen > KMED_MAX_HEADER_BYTES)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 0,
                             "header length %llu exceeds KMED_MAX_HEADER_BYTES (%zu)",
                             (unsigned long long)hlen, (size_t)KMED_MAX_HEADER_BYTES);
    if (hlen > size - 8)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0,
                             "header length %llu runs past the end of the %zu-byte file",
                             (unsigned long long)hlen, size);
    if (hlen < 2)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0,
                             "header length %llu is too short for a JSON object",
                             (unsigned long long)hlen);
    data = d + 8 + hlen;
    data_size = size - 8 - hlen;
    memset(&jerr, 0, sizeof jerr);
    if (kmed_json_parse(&doc, (const char *)d + 8, (size_t)hlen, NULL, 0, &jerr) != KMED_OK) {
        size_t off = jerr.offset == (size_t)-1 ? (size_t)-1 : jerr.offset + 8;
        r = KMED__IOB_ERR(err, jerr.code == KMED_ERR_NOMEM ? KMED_ERR_NOMEM : KMED_ERR_FORMAT,
                          name, off, "header is not valid JSON: %s", jerr.msg);
        goto done;
    }
    if (!doc.root || doc.root->type != KMED_JSON_OBJECT) {
        r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 8, "header is not a JSON object");
        goto done;
    }
    for (i = 0; i < doc.root->len; i++) {
        const kmed_json *m = &doc.root->kids[i];
        if (strcmp(m->key, "__metadata__") == 0) {
            size_t k;
            if (m->type != KMED_JSON_OBJECT) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "__metadata__ is not an object");
                goto done;
            }
            for (k = 0; k < m->len; k++)
                if (m->kids[k].type != KMED_JSON_STRING) {
                    r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                                   "__metadata__ value of '%s' is not a string",
                                   m->kids[k].key);
                    goto done;
                }
            if (!want_meta || st->meta_keys || m->len == 0) continue;
            st->meta_keys = (const char **)kmed__calloc(m->len, sizeof(char *));
            st->meta_vals = (const char **)kmed__calloc(m->len, sizeof(char *));
            if (!st->meta_keys || !st->meta_vals) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                goto done;
            }
            for (k = 0; k < m->len; k++) {
                st->meta_keys[k] = kmed__strndup(m->kids[k].key, m->kids[k].key_len);
                st->meta_vals[k] = kmed__strndup(m->kids[k].str, m->kids[k].len);
                st->n_meta = k + 1;
                if (!st->meta_keys[k] || !st->meta_vals[k]) {
                    r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                    goto done;
                }
            }
            continue;
        }
        if ((r = kmed__st_grow(st, im, err)) != KMED_OK) goto done;
        r = kmed__st_parse_entry(st, im, m, data, data_size, name, err);
        if (r != KMED_OK) goto done;
    }
    /* File order and the overlap check both want the tensors sorted by offset. */
    if (st->n_tensors - first > 1) {
        size_t n = st->n_tensors - first;
        kmed_tensor_info *tmp_t = NULL;
        char **tmp_d = NULL;
        spans = (kmed__st_span *)kmed__calloc(n, sizeof *spans);
        if (spans) tmp_t = (kmed_tensor_info *)kmed__calloc(n, sizeof *tmp_t);
        if (tmp_t) tmp_d = (char **)kmed__calloc(n, sizeof *tmp_d);
        if (!tmp_d) {
            KMED_FREE(tmp_t);
            r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (i = 0; i < n; i++) {
            const kmed_tensor_info *t = &st->tensors[first + i];
            spans[i].begin = (uint64_t)((const unsigned char *)t->data - data);
            spans[i].end = spans[i].begin + t->nbytes;
            spans[i].idx = first + i;
        }
        qsort(spans, n, sizeof *spans, kmed__st_cmp_span);
        for (i = 0; i < n; i++) {
            tmp_t[i] = st->tensors[spans[i].idx];
            tmp_d[i] = im->dtype_strs[spans[i].idx];
        }
        memcpy(&st->tensors[first], tmp_t, n * sizeof *tmp_t);
        memcpy(&im->dtype_strs[first], tmp_d, n * sizeof *tmp_d);
        KMED_FREE(tmp_t);
        KMED_FREE(tmp_d);
        for (i = 1; i < n; i++)
            if (spans[i].begin < spans[i - 1].end && spans[i].begin != spans[i].end &&
                spans[i - 1].begin != spans[i - 1].end) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                               "tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap",
                               st->tensors[first + i - 1].name,
                               (unsigned long long)spans[i - 1].begin,
                               (unsigned long long)spans[i - 1].end,
                               st->tensors[first + i].name,
                               (unsigned long long)spans[i].begin,
                               (unsigned long long)spans[i].end);
                goto done;
            }
    }
done:
    KMED_FREE(spans);
    kmed_json_free(&doc);
    return r;
}

/* Sorted name index and duplicate check, once every shard is in. */
static kmed_result kmed__st_finish(kmed_st *st, kmed__st_impl *im, kmed_error *err)
{
    size_t i;
    im->sorted = (kmed_tensor_info **)kmed__calloc(st->n_tensors, sizeof *im->sorted);
    if (!im->sorted) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    for (i = 0; i < st->n_tensors; i++) im->sorted[i] = &st->tensors[i];
    qsort(im->sorted, st->n_tensors, sizeof *im->sorted, kmed__iob_cmp_tname);
    for (i = 1; i < st->n_tensors; i++)
        if (strcmp(im->sorted[i]->name, im->sorted[i - 1]->name) == 0) {
            size_t a = (size_t)(im->sorted[i - 1] - st->tensors);
            size_t b = (size_t)(im->sorted[i] - st->tensors);
            const char *fa = im->n_maps ? im->shard_names[im->shard_of[a]] : "";
            const char *fb = im->n_maps ? im->shard_names[im->shard_of[b]] : "";
            return KMED__ERR(err, KMED_ERR_FORMAT, "tensor '%s' is stored twice (%s, %s)",
                             im->sorted[i]->name, fa, fb);
        }
    return KMED_OK;
}

KMED_API void kmed_st_close(kmed_st *st)
{
    kmed__st_impl *im = (kmed__st_impl *)st->impl_;
    size_t i;
    for (i = 0; i < st->n_tensors; i++) KMED_FREE((void *)st->tensors[i].name);
    KMED_FREE(st->tensors);
    for (i = 0; i < st->n_meta; i++) {
        KMED_FREE((void *)st->meta_keys[i]);
        KMED_FREE((void *)st->meta_vals[i]);
    }
    KMED_FREE((void *)st->meta_keys);
    KMED_FREE((void *)st->meta_vals);
    if (im) {
        for (i = 0; i < im->n_maps; i++) {
            kmed_map_close(&im->maps[i]);
            KMED_FREE(im->shard_names[i]);
        }
        for (i = 0; i < st->n_tensors; i++) KMED_FREE(im->dtype_strs[i]);
        KMED_FREE(im->maps);
        KMED_FREE(im->shard_names);
        KMED_FREE(im->shard_of);
        KMED_FREE(im->dtype_strs);
        KMED_FREE(im->sorted);
        KMED_FREE(im);
    }
    memset(st, 0, sizeof *st);
}

static kmed_result kmed__st_begin(kmed_st *st, size_t n_files, kmed_error *err)
{
    kmed__st_impl *im;
    memset(st, 0, sizeof *st);
    im = (kmed__st_impl *)kmed__calloc(1, sizeof *im);
    if (im && n_files) {
        im->maps = (kmed_map *)kmed__calloc(n_files, sizeof *im->maps);
        im->shard_names = (char **)kmed__calloc(n_files, sizeof(char *));
        if (!im->maps || !im->shard_names) {
            KMED_FREE(im->maps);
            KMED_FREE(im->shard_names);
            KMED_FREE(im);
            im = NULL;
        }
    }
    if (!im) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    st->impl_ = im;
    return KMED_OK;
}

/* Maps one file and appends its tensors. */
static kmed_result kmed__st_add_file(kmed_st *st, const char *path, kmed_error *err)
{
    kmed__st_impl *im = (kmed__st_impl *)st->impl_;
    size_t k = im->n_maps;
    kmed_result r;
    im->shard_names[k] = kmed__strndup(path, strlen(path));
    if (!im->shard_names[k]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    r = kmed_map_open(&im->maps[k], path, err);
    if (r != KMED_OK) {
        KMED_FREE(im->shard_names[k]);
        im->shard_names[k] = NULL;
        return r;
    }
    im->n_maps++;
    return kmed__st_parse(st, im, im->maps[k].data, im->maps[k].size, path, k == 0, err);
}

/* One file image held in memory (also the fuzzing entry point): st borrows d, which must
   outlive it. name labels errors. */
static kmed_result kmed__st_open_mem(kmed_st *st, const void *d, size_t size,
                                     const char *name, kmed_error *err)
{
    kmed_result r = kmed__st_begin(st, 0, err);
    if (r == KMED_OK)
        r = kmed__st_parse(st, (kmed__st_impl *)st->impl_, (const unsigned char *)d, size,
                           name ? name : "<memory>", 1, err);
    if (r == KMED_OK) r = kmed__st_finish(st, (kmed__st_impl *)st->impl_, err);
    if (r != KMED_OK) kmed_st_close(st);
    return r;
}

static int kmed__st_has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

/* A shard name from an index must stay inside the model directory. */
static int kmed__st_safe_name(const char *s)
{
    const char *p = s;
    if (!*s || *s == '/') return 0;
    while (*p) {
        const char *q = strchr(p, '/');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') return 0;
        if (!q) break;
        p = q + 1;
    }
    return 1;
}

static kmed_result kmed__st_open_index(kmed_st *st, const char *dir, const char *index,
                                       kmed_error *err)
{
    char *text = NULL;
    size_t len = 0, i, n_files = 0;
    kmed_json_doc doc = {0};
    const kmed_json *wm;
    const char **files = NULL;
    char path[4096];
    kmed_result r = kmed_file_read(index, KMED_MAX_HEADER_BYTES, &text, &len, err);
    if (r != KMED_OK) return r;
    r = kmed_json_parse(&doc, text, len, index, 1, err);
    if (r != KMED_OK) goto done;
    wm = kmed_json_get(doc.root, "weight_map");
    if (!wm || wm->type != KMED_JSON_OBJECT) {
        r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "missing object \"weight_map\"");
        goto done;
    }
    if (wm->len > KMED_MAX_TENSORS) {
        r = KMED__ERRF(err, KMED_ERR_LIMIT, index, "%zu tensors exceed KMED_MAX_TENSORS",
                       wm->len);
        goto done;
    }
    files = (const char **)kmed__calloc(wm->len ? wm->len : 1, sizeof *files);
    if (!files) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
    for (i = 0; i < wm->len; i++) {
        const kmed_json *v = &wm->kids[i];
        if (v->type != KMED_JSON_STRING || !kmed__st_safe_name(v->str) ||
            strlen(v->str) != v->len) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index,
                           "weight_map['%s'] is not a file name inside the directory", v->key);
            goto done;
        }
        files[i] = v->str;
    }
    /* Each shard once, in name order (model-00001-of-N first). */
    qsort(files, wm->len, sizeof *files, kmed__iob_cmp_str);
    for (i = 0; i < wm->len; i++)
        if (i == 0 || strcmp(files[i], files[n_files - 1]) != 0) files[n_files++] = files[i];
    if (n_files == 0) {
        r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "weight_map is empty");
        goto done;
    }
    if ((r = kmed__st_begin(st, n_files, err)) != KMED_OK) goto done;
    for (i = 0; i < n_files && r == KMED_OK; i++) {
        r = kmed_path_join(path, sizeof path, dir, files[i], err);
        if (r == KMED_OK) r = kmed__st_add_file(st, path, err);
    }
    if (r == KMED_OK) r = kmed__st_finish(st, (kmed__st_impl *)st->impl_, err);
    /* Every tensor the index names must be in the shard it names. */
    for (i = 0; r == KMED_OK && i < wm->len; i++) {
        const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
        const kmed_tensor_info *t = kmed_st_find(st, wm->kids[i].key);
        const char *shard;
        if (!t) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "tensor '%s' is in no shard",
                           wm->kids[i].key);
            break;
        }
        shard = im->shard_names[im->shard_of[t - st->tensors]];
        if (!kmed__st_has_suffix(shard, wm->kids[i].str) ||
            (strlen(shard) > wm->kids[i].len && shard[strlen(shard) - wm->kids[i].len - 1] != '/'))
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "tensor '%s' is in %s, not in %s",
                           wm->kids[i].key, shard, wm->kids[i].str);
    }
done:
    if (r != KMED_OK && st->impl_) kmed_st_close(st);
    KMED_FREE((void *)files);
    kmed_json_free(&doc);
    KMED_FREE(text);
    return r;
}

/* A directory without an index: model.safetensors, else its only *.safetensors file. */
static kmed_result kmed__st_open_dir(kmed_st *st, const char *dir, char *path, size_t cap,
                                     kmed_error *err)
{
    DIR *dp = opendir(dir);
    struct dirent *de;
    size_t count = 0;
    int have_model = 0;
    char first[512] = {0};
    if (!dp) return KMED__ERRF(err, KMED_ERR_IO, dir, "cannot open directory");
    while ((de = readdir(dp)) != NULL) {
        if (!kmed__st_has_suffix(de->d_name, ".safetensors") || de->d_name[0] == '.') continue;
        if (strcmp(de->d_name, "model.safetensors") == 0) have_model = 1;
        if (count++ == 0 || strcmp(de->d_name, first) < 0)
            snprintf(first, sizeof first, "%s", de->d_name);
    }
    closedir(dp);
    (void)st;
    if (count == 0)
        return KMED__ERRF(err, KMED_ERR_NOT_FOUND, dir,
                          "no *.safetensors file and no model.safetensors.index.json");
    if (have_model) snprintf(first, sizeof first, "model.safetensors");
    else if (count > 1)
        return KMED__ERRF(err, KMED_ERR_FORMAT, dir,
                          "%zu *.safetensors files but no model.safetensors.index.json", count);
    return kmed_path_join(path, cap, dir, first, err);
}

KMED_API kmed_result kmed_st_open(kmed_st *st, const char *path, kmed_error *err)
{
    char file[4096];
    kmed_result r;
    memset(st, 0, sizeof *st);
    if (kmed_is_dir(path)) {
        char index[4096];
        FILE *f;
        r = kmed_path_join(index, sizeof index, path, "model.safetensors.index.json", err);
        if (r != KMED_OK) return r;
        f = fopen(index, "rb");
        if (f) {
            fclose(f);
            return kmed__st_open_index(st, path, index, err);
        }
        r = kmed__st_open_dir(st, path, file, sizeof file, err);
        if (r != KMED_OK) return r;
        path = file;
    }
    {
        kmed_map map;
        kmed__st_impl *im;
        r = kmed_map_open(&map, path, err);
        if (r != KMED_OK) return r;
        r = kmed__st_open_mem(st, map.data, map.size, path, err);
        if (r != KMED_OK) { kmed_map_close(&map); return r; }
        /* st now owns the map. */
        im = (kmed__st_impl *)st->impl_;
        im->maps = (kmed_map *)kmed__calloc(1, sizeof *im->maps);
        im->shard_names = (char **)kmed__calloc(1, sizeof(char *));
        if (im->shard_names) im->shard_names[0] = kmed__strndup(path, strlen(path));
        if (!im->maps || !im->shard_names || !im->shard_names[0]) {
            if (im->shard_names) KMED_FREE(im->shard_names[0]);
            kmed_map_close(&map);
            kmed_st_close(st);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        im->maps[0] = map;
        im->n_maps = 1;
    }
    return KMED_OK;
}

KMED_API const kmed_tensor_info *kmed_st_find(const kmed_st *st, const char *name)
{
    const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
    if (!im || !im->sorted || !name) return NULL;
    return kmed__iob_bsearch(im->sorted, st->n_tensors, name);
}

KMED_API const char *kmed_st_dtype_str(const kmed_st *st, size_t i)
{
    const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
    if (!im || i >= st->n_tensors) return NULL;
    return im->dtype_strs[i];
}

/* ---- safetensors: writing ---- */

static int kmed__st_writable(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_F16 || t == KMED_BF16 || t == KMED_I8 || t == KMED_I32 ||
           t == KMED_I64 || t == KMED_U8 || t == KMED_F64 || t == KMED_BOOL;
}

KMED_API kmed_result kmed_st_writer_open(kmed_st_writer *w, const char *path,
                                         const kmed_tensor_info *tensors, size_t n,
                                         const char *const *meta_keys,
                                         const char *const *meta_vals, size_t n_meta,
                                         kmed_error *err)
{
    kmed_buf h = {0};
    kmed_result r = KMED_OK;
    uint64_t off = 0;
    size_t i, j;
    unsigned char len8[8];
    memset(w, 0, sizeof *w);
    if (n > KMED_MAX_TENSORS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "%zu tensors exceed KMED_MAX_TENSORS", n);
    w->nbytes_ = (size_t *)kmed__calloc(n ? n : 1, sizeof *w->nbytes_);
    if (!w->nbytes_) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    kmed_buf_puts(&h, "{");
    if (n_meta) {
        kmed_buf_puts(&h, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (!meta_keys[i] || !meta_vals[i]) {
                r = KMED__ERRF(err, KMED_ERR_ARG, path, "metadata entry %zu is NULL", i);
                goto fail;
            }
            if (i) kmed_buf_puts(&h, ",");
            kmed_buf_json_str(&h, meta_keys[i], strlen(meta_keys[i]));
            kmed_buf_puts(&h, ":");
            kmed_buf_json_str(&h, meta_vals[i], strlen(meta_vals[i]));
        }
        kmed_buf_puts(&h, "}");
    }
    for (i = 0; i < n; i++) {
        const kmed_tensor_info *t = &tensors[i];
        uint64_t numel;
        size_t nb;
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor %zu has no usable name", i);
            goto fail;
        }
        if (!kmed__st_writable(t->dtype)) {
            r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                           "tensor '%s': dtype %s cannot be stored in safetensors", t->name,
                           kmed_dtype_name(t->dtype));
            goto fail;
        }
        if (t->ndim < 0 || t->ndim > KMED_MAX_DIMS) {
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s': bad ndim %d", t->name,
                           t->ndim);
            goto fail;
        }
        numel = kmed_tensor_numel(t);
        nb = kmed_dtype_bytes(t->dtype, numel);
        if ((numel && !nb) || numel == UINT64_MAX || (t->nbytes && t->nbytes != nb)) {
            r = KMED__ERRF(err, KMED_ERR_SHAPE, path,
                           "tensor '%s': shape and dtype give %zu bytes, descriptor says %zu",
                           t->name, nb, t->nbytes);
            goto fail;
        }
        for (j = 0; j < i; j++) /* quadratic, but writers hold at most a few thousand */
            if (strcmp(tensors[j].name, t->name) == 0) {
                r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s' given twice", t->name);
                goto fail;
            }
        w->nbytes_[i] = nb;
        if (n_meta || i) kmed_buf_puts(&h, ",");
        kmed_buf_json_str(&h, t->name, strlen(t->name));
        kmed_buf_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", kmed_dtype_name(t->dtype));
        for (j = 0; j < (size_t)t->ndim; j++)
            kmed_buf_printf(&h, "%s%llu", j ? "," : "", (unsigned long long)t->shape[j]);
        kmed_buf_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                        (unsigned long long)(off + nb));
        off += nb;
    }
    kmed_buf_puts(&h, "}");
    /* HF pads so tensor data is 8-byte aligned (a failed buffer stops growing: no spin) */
    while (h.len % 8 && !h.failed) kmed_buf_puts(&h, " ");
    if (h.failed) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto fail; }
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    r = kmed_afile_open(&w->af, path, err);
    if (r != KMED_OK) goto fail;
    r = kmed_afile_write(&w->af, len8, 8, err);
    if (r == KMED_OK) r = kmed_afile_write(&w->af, h.data, h.len, err);
    if (r != KMED_OK) { kmed_afile_abort(&w->af); goto fail; }
    w->n = n;
    kmed_buf_free(&h);
    return KMED_OK;
fail:
    kmed_buf_free(&h);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
    return r;
}

KMED_API kmed_result kmed_st_writer_put(kmed_st_writer *w, const void *data, size_t nbytes,
                                        kmed_error *err)
{
    if (!w->nbytes_ || !w->af.f || w->next >= w->n)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "no tensor left to put");
    if (nbytes != w->nbytes_[w->next])
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path,
                          "tensor %zu: got %zu bytes, declared %zu", w->next, nbytes,
                          w->nbytes_[w->next]);
    w->next++;
    return kmed_afile_write(&w->af, data, nbytes, err);
}

KMED_API kmed_result kmed_st_writer_commit(kmed_st_writer *w, kmed_error *err)
{
    kmed_result r;
    if (!w->nbytes_ || !w->af.f)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->next != w->n)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path,
                          "commit after %zu of %zu tensors", w->next, w->n);
    r = kmed_afile_commit(&w->af, err);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
    return r;
}

KMED_API void kmed_st_writer_abort(kmed_st_writer *w)
{
    kmed_afile_abort(&w->af);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
}

KMED_API kmed_result kmed_st_write(const char *path, const kmed_tensor_info *tensors,
                                   size_t n, const char *const *meta_keys,
                                   const char *const *meta_vals, size_t n_meta,
                                   kmed_error *err)
{
    kmed_st_writer w;
    size_t i;
    kmed_result r = kmed_st_writer_open(&w, path, tensors, n, meta_keys, meta_vals, n_meta,
                                        err);
    if (r != KMED_OK) return r;
    for (i = 0; i < n && r == KMED_OK; i++) {
        if (!tensors[i].data && w.nbytes_[i])
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s' has no data",
                           tensors[i].name);
        else r = kmed_st_writer_put(&w, tensors[i].data, w.nbytes_[i], err);
    }
    if (r == KMED_OK) return kmed_st_writer_commit(&w, err);
    kmed_st_writer_abort(&w);
    return r;
}

/* ---- GGUF: reading ---- */

#define KMED__GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define KMED__GGUF_N_TYPES 40

/* GGML tensor types by number: name, elements per block, bytes per block (0: size not
   known, e.g. layouts llama.cpp has since removed). */
typedef struct kmed__ggml_type { const char *name; unsigned blck, size; } kmed__ggml_type;
static const kmed__ggml_type kmed__ggml_types[KMED__GGUF_N_TYPES] = {
    {"F32", 1, 4}, {"F16", 1, 2}, {"Q4_0", 32, 18}, {"Q4_1", 32, 20}, {"Q4_2", 0, 0},
    {"Q4_3", 0, 0}, {"Q5_0", 32, 22}, {"Q5_1", 32, 24}, {"Q8_0", 32, 34}, {"Q8_1", 32, 36},
    {"Q2_K", 256, 84}, {"Q3_K", 256, 110}, {"Q4_K", 256, 144}, {"Q5_K", 256, 176},
    {"Q6_K", 256, 210}, {"Q8_K", 256, 292}, {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74},
    {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50}, {"IQ4_NL", 32, 18}, {"IQ3_S", 256, 110},
    {"IQ2_S", 256, 82}, {"IQ4_XS", 256, 136}, {"I8", 1, 1}, {"I16", 1, 2}, {"I32", 1, 4},
    {"I64", 1, 8}, {"F64", 1, 8}, {"IQ1_M", 256, 56}, {"BF16", 1, 2},
    {"Q4_0_4_4", 0, 0}, {"Q4_0_4_8", 0, 0}, {"Q4_0_8_8", 0, 0}, {"TQ1_0", 256, 54},
    {"TQ2_0", 256, 66}, {"IQ4_NL_4_4", 0, 0}, {"IQ4_NL_4_8", 0, 0}, {"IQ4_NL_8_8", 0, 0},
    {"MXFP4", 32, 17}
};

KMED_API const char *kmed_ggml_type_name(int ggml_type)
{
    if (ggml_type < 0 || ggml_type >= KMED__GGUF_N_TYPES) return "unknown";
    return kmed__ggml_types[ggml_type].name;
}

static kmed_dtype kmed__gguf_dtype(uint32_t type)
{
    switch (type) {
    case 0: return KMED_F32;
    case 1: return KMED_F16;
    case 2: return KMED_Q4_0;
    case 8: return KMED_Q8_0;
    case 24: return KMED_I8;
    case 26: return KMED_I32;
    case 27: return KMED_I64;
    case 28: return KMED_F64;
    case 30: return KMED_BF16;
    default: return KMED_DTYPE_UNKNOWN;
    }
}

/* GGML type number of a kmed dtype, -1 when GGUF has none. */
static int kmed__gguf_ggml_type(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return 0;
    case KMED_F16: return 1;
    case KMED_Q4_0: return 2;
    case KMED_Q8_0: return 8;
    case KMED_I8: return 24;
    case KMED_I32: return 26;
    case KMED_I64: return 27;
    case KMED_F64: return 28;
    case KMED_BF16: return 30;
    default: return -1;
    }
}

/* Bytes of one scalar metadata value, 0 for STRING/ARRAY/unknown. */
static size_t kmed__gguf_scalar_size(uint32_t type)
{
    switch (type) {
    case KMED_GGUF_U8: case KMED_GGUF_I8: case KMED_GGUF_BOOL: return 1;
    case KMED_GGUF_U16: case KMED_GGUF_I16: return 2;
    case KMED_GGUF_U32: case KMED_GGUF_I32: case KMED_GGUF_F32: return 4;
    case KMED_GGUF_U64: case KMED_GGUF_I64: case KMED_GGUF_F64: return 8;
    default: return 0;
    }
}

static const char *kmed__gguf_type_str(uint32_t type)
{
    static const char *const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                        "string", "array", "u64", "i64", "f64"};
    return type < 13 ? names[type] : "?";
}

typedef struct kmed__gguf_impl {
    kmed_map map;
    int mapped;                    /* map is ours to close */
    kmed_tensor_info **sorted;     /* [n_tensors] by name */
    kmed_gguf_kv **sorted_kv;      /* [n_kv] by key */
} kmed__gguf_impl;

/* Bounds-checked cursor over the file bytes. */
typedef struct kmed__gguf_cur {
    const unsigned char *d;
    size_t size, pos;
    const char *name;
    kmed_error *err;
} kmed__gguf_cur;

static kmed_result kmed__gguf_need(kmed__gguf_cur *c, uint64_t n, const char *what)
{
    if (n <= c->size - c->pos) return KMED_OK;
    return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos,
                         "truncated: %s needs %llu bytes, %zu left in the file", what,
                         (unsigned long long)n, c->size - c->pos);
}

static kmed_result kmed__gguf_u32(kmed__gguf_cur *c, uint32_t *v, const char *what)
{
    kmed_result r = kmed__gguf_need(c, 4, what);
    if (r != KMED_OK) return r;
    *v = kmed__iob_u32(c->d + c->pos);
    c->pos += 4;
    return KMED_OK;
}

static kmed_result kmed__gguf_u64(kmed__gguf_cur *c, uint64_t *v, const char *what)
{
    kmed_result r = kmed__gguf_need(c, 8, what);
    if (r != KMED_OK) return r;
    *v = kmed__iob_u64(c->d + c->pos);
    c->pos += 8;
    return KMED_OK;
}

/* A GGUF string (u64 length, bytes) left in place in the file. */
static kmed_result kmed__gguf_str(kmed__gguf_cur *c, const char **s, size_t *len,
                                  const char *what)
{
    uint64_t n;
    kmed_result r = kmed__gguf_u64(c, &n, what);
    if (r == KMED_OK) r = kmed__gguf_need(c, n, what);
    if (r != KMED_OK) return r;
    *s = (const char *)c->d + c->pos;
    *len = (size_t)n;
    c->pos += (size_t)n;
    return KMED_OK;
}

/* Widens a little-endian scalar of `type` at p into kv's u/i/f. */
static void kmed__gguf_widen(kmed_gguf_kv *kv, uint32_t type, const unsigned char *p)
{
    uint64_t raw = 0;
    size_t n = kmed__gguf_scalar_size(type), k;
    for (k = 0; k < n; k++) raw |= (uint64_t)p[k] << (8 * k);
    switch (type) {
    case KMED_GGUF_U8: case KMED_GGUF_U16: case KMED_GGUF_U32: case KMED_GGUF_U64:
        kv->u = raw; kv->i = (int64_t)raw; kv->f = (double)raw; break;
    case KMED_GGUF_BOOL:
        kv->u = raw != 0; kv->i = raw != 0; kv->f = raw != 0; break;
    case KMED_GGUF_I8: kv->i = (int8_t)(uint8_t)raw; goto sgn;
    case KMED_GGUF_I16: kv->i = (int16_t)(uint16_t)raw; goto sgn;
    case KMED_GGUF_I32: kv->i = (int32_t)(uint32_t)raw; goto sgn;
    case KMED_GGUF_I64: kv->i = (int64_t)raw;
    sgn:
        kv->u = (uint64_t)kv->i; kv->f = (double)kv->i; break;
    case KMED_GGUF_F32: {
        uint32_t b = (uint32_t)raw;
        float f;
        memcpy(&f, &b, 4);
        kv->f = f;
        break;
    }
    case KMED_GGUF_F64: memcpy(&kv->f, &raw, 8); break;
    default: break;
    }
}

static kmed_result kmed__gguf_value(kmed__gguf_cur *c, kmed_gguf_kv *kv)
{
    size_t esize = kmed__gguf_scalar_size(kv->type);
    uint32_t at;
    uint64_t n, k;
    kmed_result r;
    if (esize) {
        if ((r = kmed__gguf_need(c, esize, kv->key)) != KMED_OK) return r;
        kmed__gguf_widen(kv, kv->type, c->d + c->pos);
        c->pos += esize;
        return KMED_OK;
    }
    if (kv->type == KMED_GGUF_STRING) return kmed__gguf_str(c, &kv->str, &kv->len, kv->key);
    if (kv->type != KMED_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "key '%s': unknown value type %u", kv->key, (unsigned)kv->type);
    if ((r = kmed__gguf_u32(c, &at, kv->key)) != KMED_OK) return r;
    if (at == KMED_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_UNSUPPORTED, c->name, c->pos - 4,
                             "key '%s': arrays of arrays are not supported", kv->key);
    if (at > KMED_GGUF_F64)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "key '%s': unknown array element type %u", kv->key, (unsigned)at);
    if ((r = kmed__gguf_u64(c, &n, kv->key)) != KMED_OK) return r;
    if (n > KMED_MAX_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, c->pos - 8,
                             "key '%s': array of %llu exceeds KMED_MAX_GGUF_ARRAY", kv->key,
                             (unsigned long long)n);
    kv->arr_type = (kmed_gguf_type)at;
    kv->n = n;
    if (at != KMED_GGUF_STRING) {
        esize = kmed__gguf_scalar_size(at);
        if ((r = kmed__gguf_need(c, n * esize, kv->key)) != KMED_OK) return r;
        kv->raw = c->d + c->pos;
        c->pos += (size_t)(n * esize);
        return KMED_OK;
    }
    /* Every string takes at least its 8-byte length: bound n before allocating. */
    if ((r = kmed__gguf_need(c, n * 8, kv->key)) != KMED_OK) return r;
    kv->strs = (const char **)kmed__calloc((size_t)(n ? n : 1), sizeof *kv->strs);
    kv->str_lens = (size_t *)kmed__calloc((size_t)(n ? n : 1), sizeof *kv->str_lens);
    if (!kv->strs || !kv->str_lens)
        return KMED__ERR(c->err, KMED_ERR_NOMEM, "key '%s': out of memory for %llu strings",
                         kv->key, (unsigned long long)n);
    kv->raw = c->d + c->pos;
    for (k = 0; k < n; k++) {
        if ((r = kmed__gguf_str(c, &kv->strs[k], &kv->str_lens[k], kv->key)) != KMED_OK)
            return r;
    }
    return KMED_OK;
}

KMED_API void kmed_gguf_close(kmed_gguf *g)
{
    kmed__gguf_impl *im = (kmed__gguf_impl *)g->impl_;
    size_t i;
    if (g->kv)
        for (i = 0; i < g->n_kv; i++) {
            KMED_FREE((void *)g->kv[i].key);
            KMED_FREE((void *)g->kv[i].strs);
            KMED_FREE(g->kv[i].str_lens);
        }
    if (g->tensors)
        for (i = 0; i < g->n_tensors; i++) KMED_FREE((void *)g->tensors[i].name);
    KMED_FREE(g->kv);
    KMED_FREE(g->tensors);
    if (im) {
        if (im->mapped) kmed_map_close(&im->map);
        KMED_FREE(im->sorted);
        KMED_FREE(im->sorted_kv);
        KMED_FREE(im);
    }
    memset(g, 0, sizeof *g);
}

static int kmed__gguf_cmp_key(const void *a, const void *b)
{
    return strcmp((*(const kmed_gguf_kv *const *)a)->key, (*(const kmed_gguf_kv *const *)b)->key);
}

typedef struct kmed__gguf_span { uint64_t begin, end; size_t idx; } kmed__gguf_span;

static int kmed__gguf_cmp_span(const void *a, const void *b)
{
    const kmed__gguf_span *x = (const kmed__gguf_span *)a, *y = (const kmed__gguf_span *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* One tensor info record; offsets are checked later, once the data start is known. */
static kmed_result kmed__gguf_tensor_info(kmed__gguf_cur *c, kmed_tensor_info *t,
                                          uint64_t *offset)
{
    const char *s;
    size_t len, at = c->pos;
    uint32_t nd, type;
    uint64_t ne[KMED_MAX_DIMS], numel = 1;
    int k;
    kmed_result r = kmed__gguf_str(c, &s, &len, "tensor name");
    if (r != KMED_OK) return r;
    t->name = kmed__strndup(s, len);
    if (!t->name) return KMED__ERR(c->err, KMED_ERR_NOMEM, "out of memory");
    if (strlen(t->name) != len || len == 0)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, at,
                             "tensor name is empty or holds a NUL byte");
    if ((r = kmed__gguf_u32(c, &nd, t->name)) != KMED_OK) return r;
    if (nd < 1 || nd > KMED_MAX_DIMS)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "tensor '%s': %u dimensions, expected 1 to %d", t->name,
                             (unsigned)nd, KMED_MAX_DIMS);
    for (k = 0; k < (int)nd; k++) {
        if ((r = kmed__gguf_u64(c, &ne[k], t->name)) != KMED_OK) return r;
        /* GGML keeps ne as int64: anything above INT64_MAX is corrupt. */
        if (ne[k] > (uint64_t)INT64_MAX || (ne[k] && numel > (uint64_t)INT64_MAX / ne[k]))
            return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, c->pos - 8,
                                 "tensor '%s': element count overflows", t->name);
        numel *= ne[k];
    }
    if ((r = kmed__gguf_u32(c, &type, t->name)) != KMED_OK) return r;
    if ((r = kmed__gguf_u64(c, offset, t->name)) != KMED_OK) return r;
    t->ndim = (int)nd;
    for (k = 0; k < (int)nd; k++) t->shape[k] = ne[nd - 1 - k]; /* outermost first */
    t->ggml_type = (int)(type > 0x7fffffffu ? 0x7fffffff : type);
    t->dtype = kmed__gguf_dtype(type);
    t->nbytes = 0;
    if (type < KMED__GGUF_N_TYPES && kmed__ggml_types[type].size) {
        const kmed__ggml_type *gt = &kmed__ggml_types[type];
        uint64_t nb;
        if (ne[0] % gt->blck)
            return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, at,
                                 "tensor '%s': row length %llu is not a multiple of the %s "
                                 "block size %u", t->name, (unsigned long long)ne[0],
                                 gt->name, gt->blck);
        nb = numel / gt->blck;
        if (nb > (uint64_t)SIZE_MAX / gt->size)
            return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, at,
                                 "tensor '%s': byte size overflows", t->name);
        t->nbytes = (size_t)(nb * gt->size);
    }
    return KMED_OK;
}

/* Parses a whole GGUF image d[0..size); g borrows d. */
static kmed_result kmed__gguf_parse(kmed_gguf *g, const unsigned char *d, size_t size,
                                    const char *name, kmed_error *err)
{
    kmed__gguf_impl *im = (kmed__gguf_impl *)g->impl_;
    kmed__gguf_cur c;
    uint32_t magic, version;
    uint64_t n_tensors, n_kv, data_size;
    uint64_t *offsets = NULL;
    kmed__gguf_span *spans = NULL;
    const kmed_gguf_kv *al;
    kmed_result r;
    size_t i;
    c.d = d; c.size = size; c.pos = 0; c.name = name; c.err = err;
    if ((r = kmed__gguf_u32(&c, &magic, "magic")) != KMED_OK) return r;
    if (magic != KMED__GGUF_MAGIC)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0, "bad magic: not a GGUF file");
    if ((r = kmed__gguf_u32(&c, &version, "version")) != KMED_OK) return r;
    if (version == 1 || version > 3) {
        int swapped = (version & 0xffff) == 0 && version != 0;
        return KMED__IOB_ERR(err, KMED_ERR_UNSUPPORTED, name, 4,
                             "GGUF version %u%s; kmed reads versions 2 and 3",
                             (unsigned)version, swapped ? " (big-endian file?)" : "");
    }
    if (version == 0)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 4, "GGUF version 0");
    g->version = version;
    if ((r = kmed__gguf_u64(&c, &n_tensors, "tensor count")) != KMED_OK) return r;
    if ((r = kmed__gguf_u64(&c, &n_kv, "metadata count")) != KMED_OK) return r;
    if (n_tensors > KMED_MAX_TENSORS)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 8,
                             "%llu tensors exceed KMED_MAX_TENSORS (%zu)",
                             (unsigned long long)n_tensors, (size_t)KMED_MAX_TENSORS);
    if (n_kv > KMED_MAX_GGUF_KV)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 16,
                             "%llu metadata entries exceed KMED_MAX_GGUF_KV (%zu)",
                             (unsigned long long)n_kv, (size_t)KMED_MAX_GGUF_KV);
    /* Smallest records: kv 8+4+1 bytes, tensor info 8+4+8+4+8. */
    if (n_kv * 13 + n_tensors * 32 > size - c.pos)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 8,
                             "%llu tensors and %llu metadata entries cannot fit in %zu bytes",
                             (unsigned long long)n_tensors, (unsigned long long)n_kv, size);
    g->kv = (kmed_gguf_kv *)kmed__calloc((size_t)n_kv, sizeof *g->kv);
    g->tensors = (kmed_tensor_info *)kmed__calloc((size_t)n_tensors, sizeof *g->tensors);
    offsets = (uint64_t *)kmed__calloc((size_t)n_tensors, sizeof *offsets);
    im->sorted = (kmed_tensor_info **)kmed__calloc((size_t)n_tensors, sizeof *im->sorted);
    im->sorted_kv = (kmed_gguf_kv **)kmed__calloc((size_t)n_kv, sizeof *im->sorted_kv);
    if (!g->kv || !g->tensors || !offsets || !im->sorted || !im->sorted_kv) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (i = 0; i < n_kv; i++) {
        kmed_gguf_kv *kv = &g->kv[i];
        const char *s;
        size_t len, at = c.pos;
        uint32_t type;
        if ((r = kmed__gguf_str(&c, &s, &len, "metadata key")) != KMED_OK) goto done;
        kv->key = kmed__strndup(s, len);
        g->n_kv = i + 1;
        if (!kv->key) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
        if (len == 0 || strlen(kv->key) != len) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, at,
                              "metadata key %zu is empty or holds a NUL byte", i);
            goto done;
        }
        if ((r = kmed__gguf_u32(&c, &type, kv->key)) != KMED_OK) goto done;
        if (type > KMED_GGUF_F64) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, c.pos - 4,
                              "key '%s': unknown value type %u", kv->key, (unsigned)type);
            goto done;
        }
        kv->type = (kmed_gguf_type)type;
        if ((r = kmed__gguf_value(&c, kv)) != KMED_OK) goto done;
        im->sorted_kv[i] = kv;
    }
    qsort(im->sorted_kv, g->n_kv, sizeof *im->sorted_kv, kmed__gguf_cmp_key);
    for (i = 1; i < g->n_kv; i++)
        if (strcmp(im->sorted_kv[i]->key, im->sorted_kv[i - 1]->key) == 0) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "metadata key '%s' appears twice",
                           im->sorted_kv[i]->key);
            goto done;
        }
    g->alignment = 32;
    al = kmed_gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != KMED_GGUF_U32 || al->u == 0 || (al->u & (al->u - 1))) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "general.alignment must be a u32 power of two (got %s %llu)",
                           kmed__gguf_type_str(al->type), (unsigned long long)al->u);
            goto done;
        }
        g->alignment = (size_t)al->u;
    }
    for (i = 0; i < n_tensors; i++) {
        r = kmed__gguf_tensor_info(&c, &g->tensors[i], &offsets[i]);
        g->n_tensors = i + 1;
        if (r != KMED_OK) goto done;
        im->sorted[i] = &g->tensors[i];
    }
    qsort(im->sorted, g->n_tensors, sizeof *im->sorted, kmed__iob_cmp_tname);
    for (i = 1; i < g->n_tensors; i++)
        if (strcmp(im->sorted[i]->name, im->sorted[i - 1]->name) == 0) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s' appears twice",
                           im->sorted[i]->name);
            goto done;
        }
    /* Tensor data starts at the next multiple of the alignment. */
    g->data_offset = c.pos + (g->alignment - c.pos % g->alignment) % g->alignment;
    if (g->data_offset > size || g->data_offset < c.pos) {
        if (g->n_tensors) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, c.pos,
                              "truncated: the file ends before the aligned tensor data");
            goto done;
        }
        g->data_offset = size;
    }
    data_size = size - g->data_offset;
    for (i = 0; i < g->n_tensors; i++) {
        kmed_tensor_info *t = &g->tensors[i];
        if (offsets[i] % g->alignment) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "tensor '%s': data offset %llu is not a multiple of the "
                           "alignment %zu", t->name, (unsigned long long)offsets[i],
                           g->alignment);
            goto done;
        }
        if (offsets[i] > data_size || t->nbytes > data_size - offsets[i]) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "tensor '%s': data [%llu, +%zu) runs past the end of the file "
                           "(data area %llu bytes)", t->name, (unsigned long long)offsets[i],
                           t->nbytes, (unsigned long long)data_size);
            goto done;
        }
        t->data = d + g->data_offset + offsets[i];
    }
    if (g->n_tensors > 1) {
        spans = (kmed__gguf_span *)kmed__calloc(g->n_tensors, sizeof *spans);
        if (!spans) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
        for (i = 0; i < g->n_tensors; i++) {
            spans[i].begin = offsets[i];
            spans[i].end = offsets[i] + g->tensors[i].nbytes;
            spans[i].idx = i;
        }
        qsort(spans, g->n_tensors, sizeof *spans, kmed__gguf_cmp_span);
        for (i = 1; i < g->n_tensors; i++)
            if (spans[i].begin < spans[i - 1].end && spans[i].begin != spans[i].end) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensors '%s' and '%s' overlap",
                               g->tensors[spans[i - 1].idx].name,
                               g->tensors[spans[i].idx].name);
                goto done;
            }
    }
    r = KMED_OK;
done:
    KMED_FREE(offsets);
    KMED_FREE(spans);
    return r;
}

/* From memory (fuzzing, tests): g borrows d, which must outlive it. */
static kmed_result kmed__gguf_open_mem(kmed_gguf *g, const void *d, size_t size,
                                       const char *name, kmed_error *err)
{
    kmed_result r;
    memset(g, 0, sizeof *g);
    g->impl_ = kmed__calloc(1, sizeof(kmed__gguf_impl));
    if (!g->impl_) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    r = kmed__gguf_parse(g, (const unsigned char *)d, size, name ? name : "<memory>", err);
    if (r != KMED_OK) kmed_gguf_close(g);
    return r;
}

KMED_API kmed_result kmed_gguf_open(kmed_gguf *g, const char *path, kmed_error *err)
{
    kmed__gguf_impl *im;
    kmed_map map;
    kmed_result r;
    memset(g, 0, sizeof *g);
    r = kmed_map_open(&map, path, err);
    if (r != KMED_OK) return r;
    r = kmed__gguf_open_mem(g, map.data, map.size, path, err);
    if (r != KMED_OK) { kmed_map_close(&map); return r; }
    im = (kmed__gguf_impl *)g->impl_; /* g now owns the map */
    im->map = map;
    im->mapped = 1;
    return KMED_OK;
}

KMED_API const kmed_gguf_kv *kmed_gguf_find_kv(const kmed_gguf *g, const char *key)
{
    const kmed__gguf_impl *im = (const kmed__gguf_impl *)g->impl_;
    size_t lo = 0, hi = g->n_kv;
    if (!im || !im->sorted_kv || !key) return NULL;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(im->sorted_kv[mid]->key, key);
        if (c == 0) return im->sorted_kv[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

KMED_API const kmed_tensor_info *kmed_gguf_find_tensor(const kmed_gguf *g, const char *name)
{
    const kmed__gguf_impl *im = (const kmed__gguf_impl *)g->impl_;
    if (!im || !im->sorted || !name) return NULL;
    return kmed__iob_bsearch(im->sorted, g->n_tensors, name);
}

/* ---- GGUF: writing ---- */

/* Records the first misuse of a void add_* call; it is reported by the next put/commit. */
static void kmed__gguf_w_bad(kmed_gguf_writer *w, const char *what, const char *key)
{
    if (!w->bad_[0]) snprintf(w->bad_, sizeof w->bad_, "%s '%s'", what, key ? key : "(null)");
}

/* Starts a kv record: 1 if the key is new and usable (then key and type are written). */
static int kmed__gguf_w_key(kmed_gguf_writer *w, const char *key, kmed_gguf_type type)
{
    size_t off = 0, n;
    if (w->bad_[0]) return 0;
    if (!key || !*key) { kmed__gguf_w_bad(w, "empty metadata key", key); return 0; }
    if (w->header_done_) { kmed__gguf_w_bad(w, "metadata added after the first put:", key);
        return 0; }
    n = strlen(key);
    while (off < w->keys_.len) { /* linear: files carry tens of keys */
        if (strcmp(w->keys_.data + off, key) == 0) {
            kmed__gguf_w_bad(w, "metadata key added twice:", key);
            return 0;
        }
        off += strlen(w->keys_.data + off) + 1;
    }
    kmed_buf_put(&w->keys_, key, n + 1);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, key, n);
    kmed__iob_put_u32(&w->kvbuf_, (uint32_t)type);
    w->n_kv_++;
    return 1;
}

/* One scalar of `type` held (host little-endian) at v. */
static void kmed__gguf_w_scalar(kmed_gguf_writer *w, const char *key, kmed_gguf_type type,
                                const void *v)
{
    if (kmed__gguf_w_key(w, key, type))
        kmed_buf_put(&w->kvbuf_, v, kmed__gguf_scalar_size(type));
}

KMED_API void kmed_gguf_add_u32(kmed_gguf_writer *w, const char *key, uint32_t v)
{
    /* The writer owns general.alignment: it sets the layout and goes out with the header. */
    if (key && strcmp(key, "general.alignment") == 0) {
        if (v == 0 || (v & (v - 1)) || v > (1u << 20))
            kmed__gguf_w_bad(w, "general.alignment must be a power of two:", key);
        else if (w->header_done_) kmed__gguf_w_bad(w, "alignment set after the first put:", key);
        else w->alignment = v;
        return;
    }
    kmed__gguf_w_scalar(w, key, KMED_GGUF_U32, &v);
}

KMED_API void kmed_gguf_add_i32(kmed_gguf_writer *w, const char *key, int32_t v)
{
    kmed__gguf_w_scalar(w, key, KMED_GGUF_I32, &v);
}

KMED_API void kmed_gguf_add_f32(kmed_gguf_writer *w, const char *key, float v)
{
    kmed__gguf_w_scalar(w, key, KMED_GGUF_F32, &v);
}

KMED_API void kmed_gguf_add_bool(kmed_gguf_writer *w, const char *key, int v)
{
    uint8_t b = v ? 1 : 0;
    kmed__gguf_w_scalar(w, key, KMED_GGUF_BOOL, &b);
}

KMED_API void kmed_gguf_add_str(kmed_gguf_writer *w, const char *key, const char *s)
{
    size_t n;
    if (!s) { kmed__gguf_w_bad(w, "NULL string for", key); return; }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_STRING)) return;
    n = strlen(s);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, s, n);
}

KMED_API void kmed_gguf_add_arr(kmed_gguf_writer *w, const char *key, kmed_gguf_type type,
                                const void *data, uint64_t n)
{
    size_t es = kmed__gguf_scalar_size(type);
    if (!es) { kmed__gguf_w_bad(w, "array of strings or arrays via kmed_gguf_add_arr:", key);
        return; }
    if (n > KMED_MAX_GGUF_ARRAY || (n && !data)) {
        kmed__gguf_w_bad(w, "array too long or NULL:", key);
        return;
    }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_ARRAY)) return;
    kmed__iob_put_u32(&w->kvbuf_, (uint32_t)type);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, data, (size_t)n * es);
}

KMED_API void kmed_gguf_add_arr_str(kmed_gguf_writer *w, const char *key,
                                    const char *const *strs, const size_t *lens, uint64_t n)
{
    uint64_t i;
    if (n > KMED_MAX_GGUF_ARRAY || (n && !strs)) {
        kmed__gguf_w_bad(w, "array too long or NULL:", key);
        return;
    }
    for (i = 0; i < n; i++)
        if (!strs[i]) { kmed__gguf_w_bad(w, "NULL string in array", key); return; }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_ARRAY)) return;
    kmed__iob_put_u32(&w->kvbuf_, KMED_GGUF_STRING);
    kmed__iob_put_u64(&w->kvbuf_, n);
    for (i = 0; i < n; i++) {
        size_t len = lens ? lens[i] : strlen(strs[i]);
        kmed__iob_put_u64(&w->kvbuf_, len);
        kmed_buf_put(&w->kvbuf_, strs[i], len);
    }
}

KMED_API void kmed_gguf_add_all(kmed_gguf_writer *w, const kmed_gguf *src,
                                int (*skip)(const char *key))
{
    size_t i;
    for (i = 0; i < src->n_kv; i++) {
        const kmed_gguf_kv *kv = &src->kv[i];
        unsigned char v[8];
        size_t es = kmed__gguf_scalar_size(kv->type), k;
        if (skip && skip(kv->key)) continue;
        if (strcmp(kv->key, "general.alignment") == 0) continue; /* the writer's own */
        if (es) {
            uint64_t bits = kv->u;
            if (kv->type == KMED_GGUF_F32) {
                float f = (float)kv->f;
                uint32_t b;
                memcpy(&b, &f, 4);
                bits = b;
            } else if (kv->type == KMED_GGUF_F64) {
                memcpy(&bits, &kv->f, 8);
            }
            for (k = 0; k < 8; k++) v[k] = (unsigned char)(bits >> (8 * k));
            kmed__gguf_w_scalar(w, kv->key, kv->type, v);
        } else if (kv->type == KMED_GGUF_STRING) {
            if (kmed__gguf_w_key(w, kv->key, KMED_GGUF_STRING)) {
                kmed__iob_put_u64(&w->kvbuf_, kv->len);
                kmed_buf_put(&w->kvbuf_, kv->str, kv->len);
            }
        } else if (kv->arr_type == KMED_GGUF_STRING) {
            kmed_gguf_add_arr_str(w, kv->key, kv->strs, kv->str_lens, kv->n);
        } else {
            kmed_gguf_add_arr(w, kv->key, kv->arr_type, kv->raw, kv->n);
        }
    }
}

KMED_API kmed_result kmed_gguf_writer_open(kmed_gguf_writer *w, const char *path,
                                           size_t alignment, kmed_error *err)
{
    memset(w, 0, sizeof *w);
    if (alignment == 0) alignment = 32;
    if ((alignment & (alignment - 1)) || alignment > ((size_t)1 << 20))
        return KMED__ERRF(err, KMED_ERR_ARG, path, "alignment %zu is not a power of two up "
                          "to 1 MiB", alignment);
    w->alignment = alignment;
    return kmed_afile_open(&w->af, path, err);
}

KMED_API kmed_result kmed_gguf_add_tensor(kmed_gguf_writer *w, const char *name,
                                          kmed_dtype dtype, int ndim, const uint64_t *shape,
                                          kmed_error *err)
{
    kmed_tensor_info *t;
    uint64_t numel = 1;
    size_t i;
    int k;
    if (w->header_done_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path,
                          "tensor '%s' declared after the first put", name ? name : "");
    if (!name || !*name) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "empty tensor name");
    if (kmed__gguf_ggml_type(dtype) < 0)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, w->af.path,
                          "tensor '%s': dtype %s has no GGUF type", name,
                          kmed_dtype_name(dtype));
    if (ndim < 1 || ndim > KMED_MAX_DIMS || !shape)
        return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s': bad ndim %d", name,
                          ndim);
    for (k = 0; k < ndim; k++) {
        if (shape[k] > (uint64_t)INT64_MAX || (shape[k] && numel > (uint64_t)INT64_MAX / shape[k]))
            return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path,
                              "tensor '%s': element count overflows", name);
        numel *= shape[k];
    }
    if ((dtype == KMED_Q8_0 || dtype == KMED_Q4_0) && shape[ndim - 1] % 32)
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path,
                          "tensor '%s': row length %llu is not a multiple of 32 for %s", name,
                          (unsigned long long)shape[ndim - 1], kmed_dtype_name(dtype));
    for (i = 0; i < w->n_tensors_; i++)
        if (strcmp(w->names_[i], name) == 0)
            return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s' declared twice",
                              name);
    if (w->n_tensors_ >= KMED_MAX_TENSORS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path, "too many tensors");
    if (w->n_tensors_ == w->cap_tensors_) {
        size_t cap = w->cap_tensors_ ? w->cap_tensors_ * 2 : 32;
        kmed_tensor_info *nt = (kmed_tensor_info *)KMED_REALLOC(w->tensors_, cap * sizeof *nt);
        char **nn;
        if (nt) w->tensors_ = nt;
        nn = nt ? (char **)KMED_REALLOC(w->names_, cap * sizeof *nn) : NULL;
        if (!nn) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        w->names_ = nn;
        w->cap_tensors_ = cap;
    }
    w->names_[w->n_tensors_] = kmed__strndup(name, strlen(name));
    if (!w->names_[w->n_tensors_]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    t = &w->tensors_[w->n_tensors_];
    memset(t, 0, sizeof *t);
    t->name = w->names_[w->n_tensors_];
    t->dtype = dtype;
    t->ggml_type = kmed__gguf_ggml_type(dtype);
    t->ndim = ndim;
    for (k = 0; k < ndim; k++) t->shape[k] = shape[k];
    t->nbytes = kmed_dtype_bytes(dtype, numel);
    if (numel && !t->nbytes)
        return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path, "tensor '%s': too large", name);
    w->n_tensors_++;
    return KMED_OK;
}

static size_t kmed__gguf_pad(size_t n, size_t a) { return (a - n % a) % a; }

static kmed_result kmed__gguf_w_header(kmed_gguf_writer *w, kmed_error *err)
{
    kmed_buf h = {0};
    kmed_result r;
    uint64_t off = 0;
    size_t i;
    int k;
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    kmed__iob_put_u32(&h, KMED__GGUF_MAGIC);
    kmed__iob_put_u32(&h, 3);
    kmed__iob_put_u64(&h, w->n_tensors_);
    kmed__iob_put_u64(&h, w->n_kv_ + (w->alignment != 32));
    kmed_buf_put(&h, w->kvbuf_.data, w->kvbuf_.len);
    if (w->alignment != 32) {
        kmed__iob_put_u64(&h, 17);
        kmed_buf_put(&h, "general.alignment", 17);
        kmed__iob_put_u32(&h, KMED_GGUF_U32);
        kmed__iob_put_u32(&h, (uint32_t)w->alignment);
    }
    for (i = 0; i < w->n_tensors_; i++) {
        const kmed_tensor_info *t = &w->tensors_[i];
        size_t n = strlen(t->name);
        kmed__iob_put_u64(&h, n);
        kmed_buf_put(&h, t->name, n);
        kmed__iob_put_u32(&h, (uint32_t)t->ndim);
        for (k = t->ndim - 1; k >= 0; k--) kmed__iob_put_u64(&h, t->shape[k]); /* ne0 first */
        kmed__iob_put_u32(&h, (uint32_t)t->ggml_type);
        kmed__iob_put_u64(&h, off);
        off += t->nbytes + kmed__gguf_pad(t->nbytes, w->alignment);
    }
    if (h.failed || w->kvbuf_.failed || w->keys_.failed) {
        kmed_buf_free(&h);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory building the GGUF header");
    }
    r = kmed_afile_write(&w->af, h.data, h.len, err);
    if (r == KMED_OK) r = kmed__iob_write_zeros(&w->af, kmed__gguf_pad(h.len, w->alignment), err);
    kmed_buf_free(&h);
    if (r == KMED_OK) w->header_done_ = 1;
    return r;
}

KMED_API kmed_result kmed_gguf_writer_put(kmed_gguf_writer *w, const void *data,
                                          size_t nbytes, kmed_error *err)
{
    kmed_result r;
    const kmed_tensor_info *t;
    if (!w->af.f) return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    if (!w->header_done_ && (r = kmed__gguf_w_header(w, err)) != KMED_OK) return r;
    if (w->next_ >= w->n_tensors_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "no declared tensor left to put");
    t = &w->tensors_[w->next_];
    if (nbytes != t->nbytes)
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path, "tensor '%s': got %zu bytes, "
                          "declared %zu", t->name, nbytes, t->nbytes);
    if (nbytes && !data)
        return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s': no data", t->name);
    r = kmed_afile_write(&w->af, data, nbytes, err);
    if (r == KMED_OK) r = kmed__iob_write_zeros(&w->af, kmed__gguf_pad(nbytes, w->alignment), err);
    if (r == KMED_OK) w->next_++;
    return r;
}

static void kmed__gguf_w_free(kmed_gguf_writer *w)
{
    size_t i;
    for (i = 0; i < w->n_tensors_; i++) KMED_FREE(w->names_[i]);
    KMED_FREE(w->names_);
    KMED_FREE(w->tensors_);
    kmed_buf_free(&w->kvbuf_);
    kmed_buf_free(&w->keys_);
    w->names_ = NULL;
    w->tensors_ = NULL;
    w->n_tensors_ = w->cap_tensors_ = 0;
}

KMED_API kmed_result kmed_gguf_writer_commit(kmed_gguf_writer *w, kmed_error *err)
{
    kmed_result r;
    if (!w->af.f) return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    if (!w->header_done_ && (r = kmed__gguf_w_header(w, err)) != KMED_OK) return r;
    if (w->next_ != w->n_tensors_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "commit after %zu of %zu tensors",
                          w->next_, w->n_tensors_);
    r = kmed_afile_commit(&w->af, err);
    kmed__gguf_w_free(w);
    return r;
}

KMED_API void kmed_gguf_writer_abort(kmed_gguf_writer *w)
{
    kmed_afile_abort(&w->af);
    kmed__gguf_w_free(w);
}

/* libFuzzer harness for the GGUF reader (kmed__gguf_open_mem: the parser kmed_gguf_open
   runs on the mapped file). A file that opens must describe only bytes inside it (tensor
   data aligned and in range, strings inside the file), and its metadata, copied through
   the writer's encoder (kmed_gguf_add_all) and parsed again, must come back equal.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_gguf.c -o build/fuzz_gguf -lm -lpthread
   build/fuzz_gguf -max_total_time=60 tests/fuzz/corpus/gguf */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

static int fuzz_inside(const void *p, size_t n, const unsigned char *d, size_t size)
{
    const unsigned char *q = (const unsigned char *)p;
    return q >= d && q <= d + size && n <= (size_t)(d + size - q);
}

static void fuzz_same_kv(const kmed_gguf_kv *a, const kmed_gguf_kv *b)
{
    uint64_t i;
    FUZZ_CHECK(strcmp(a->key, b->key) == 0 && a->type == b->type);
    if (a->type == KMED_GGUF_STRING)
        FUZZ_CHECK(a->len == b->len && memcmp(a->str, b->str, a->len) == 0);
    else if (a->type == KMED_GGUF_ARRAY) {
        FUZZ_CHECK(a->arr_type == b->arr_type && a->n == b->n);
        if (a->arr_type == KMED_GGUF_STRING) {
            for (i = 0; i < a->n; i++)
                FUZZ_CHECK(a->str_lens[i] == b->str_lens[i] &&
                           memcmp(a->strs[i], b->strs[i], a->str_lens[i]) == 0);
        } else {
            FUZZ_CHECK(memcmp(a->raw, b->raw, (size_t)a->n * kmed__gguf_scalar_size(a->arr_type))
                       == 0);
        }
    } else {
        FUZZ_CHECK(a->u == b->u && a->i == b->i);
        FUZZ_CHECK(memcmp(&a->f, &b->f, sizeof a->f) == 0 || (a->f != a->f && b->f != b->f));
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kmed_gguf g, g2;
    kmed_gguf_writer w;
    kmed_error err;
    kmed_buf img = {0};
    unsigned char *d = (unsigned char *)malloc(size ? size : 1);
    size_t i, n_copied = 0;
    uint64_t k;
    if (size) memcpy(d, data, size);
    memset(&err, 0, sizeof err);
    if (kmed__gguf_open_mem(&g, d, size, "fuzz", &err) != KMED_OK) {
        FUZZ_CHECK(err.code < 0 && err.msg[0]);
        free(d);
        return 0;
    }
    FUZZ_CHECK(g.version == 2 || g.version == 3);
    FUZZ_CHECK(g.alignment && !(g.alignment & (g.alignment - 1)));
    FUZZ_CHECK(g.data_offset <= size && (g.n_tensors == 0 || g.data_offset % g.alignment == 0));
    for (i = 0; i < g.n_tensors; i++) {
        const kmed_tensor_info *t = &g.tensors[i];
        FUZZ_CHECK(kmed_gguf_find_tensor(&g, t->name) == t);
        FUZZ_CHECK(fuzz_inside(t->data, t->nbytes, d, size));
        FUZZ_CHECK((size_t)((const unsigned char *)t->data - d - g.data_offset) % g.alignment
                   == 0);
        FUZZ_CHECK(t->ndim >= 1 && t->ndim <= KMED_MAX_DIMS);
        if (t->dtype != KMED_DTYPE_UNKNOWN)
            FUZZ_CHECK(kmed_dtype_bytes(t->dtype, kmed_tensor_numel(t)) == t->nbytes ||
                       kmed_tensor_numel(t) == 0);
        FUZZ_CHECK(kmed_ggml_type_name(t->ggml_type) != NULL);
    }
    for (i = 0; i < g.n_kv; i++) {
        const kmed_gguf_kv *kv = &g.kv[i];
        FUZZ_CHECK(kmed_gguf_find_kv(&g, kv->key) == kv);
        if (kv->type == KMED_GGUF_STRING) FUZZ_CHECK(fuzz_inside(kv->str, kv->len, d, size));
        if (kv->type == KMED_GGUF_ARRAY && kv->arr_type == KMED_GGUF_STRING)
            for (k = 0; k < kv->n; k++)
                FUZZ_CHECK(fuzz_inside(kv->strs[k], kv->str_lens[k], d, size));
        if (strcmp(kv->key, "general.alignment") != 0) n_copied++;
    }
    /* Metadata round trip through the writer's encoder, in memory. */
    memset(&w, 0, sizeof w);
    w.alignment = 32;
    kmed_gguf_add_all(&w, &g, NULL);
    FUZZ_CHECK(!w.bad_[0] && !w.kvbuf_.failed && w.n_kv_ == n_copied);
    kmed__iob_put_u32(&img, KMED__GGUF_MAGIC);
    kmed__iob_put_u32(&img, 3);
    kmed__iob_put_u64(&img, 0);
    kmed__iob_put_u64(&img, w.n_kv_);
    kmed_buf_put(&img, w.kvbuf_.data, w.kvbuf_.len);
    FUZZ_CHECK(kmed__gguf_open_mem(&g2, img.data, img.len, "copy", &err) == KMED_OK);
    FUZZ_CHECK(g2.n_kv == n_copied);
    for (i = 0, k = 0; i < g.n_kv; i++) {
        if (strcmp(g.kv[i].key, "general.alignment") == 0) continue;
        fuzz_same_kv(&g.kv[i], &g2.kv[k++]);
    }
    kmed_gguf_close(&g2);
    kmed__gguf_w_free(&w);
    kmed_buf_free(&img);
    kmed_gguf_close(&g);
    free(d);
    return 0;
}

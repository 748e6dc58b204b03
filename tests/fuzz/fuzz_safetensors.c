/* libFuzzer harness for the safetensors header reader (kmed__st_open_mem: the same parser
   kmed_st_open runs on each mapped file). Each input is tried twice: as a whole file, and
   split at its first NUL byte into header JSON + data with the 8-byte length put in front,
   so mutations reach the JSON validation instead of dying on the length. A file that opens
   must describe only bytes inside it, with sizes that agree with dtype and shape.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_safetensors.c -o build/fuzz_safetensors -lm -lpthread
   build/fuzz_safetensors -max_total_time=60 tests/fuzz/corpus/safetensors */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

static void fuzz_st_one(const unsigned char *d, size_t size)
{
    kmed_st st;
    kmed_error err;
    size_t i;
    memset(&err, 0, sizeof err);
    if (kmed__st_open_mem(&st, d, size, "fuzz", &err) != KMED_OK) {
        FUZZ_CHECK(err.code < 0 && err.msg[0]);
        return;
    }
    FUZZ_CHECK(size >= 8);
    for (i = 0; i < st.n_tensors; i++) {
        const kmed_tensor_info *t = &st.tensors[i];
        const unsigned char *p = (const unsigned char *)t->data;
        FUZZ_CHECK(t->name && kmed_st_find(&st, t->name) == t);
        FUZZ_CHECK(p >= d + 8 && p <= d + size && t->nbytes <= (size_t)(d + size - p));
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= KMED_MAX_DIMS);
        FUZZ_CHECK(kmed_st_dtype_str(&st, i) != NULL);
        if (t->dtype != KMED_DTYPE_UNKNOWN)
            FUZZ_CHECK(kmed_dtype_bytes(t->dtype, kmed_tensor_numel(t)) == t->nbytes);
        if (i && t->nbytes && st.tensors[i - 1].nbytes) /* sorted by offset, disjoint */
            FUZZ_CHECK((const unsigned char *)st.tensors[i - 1].data +
                       st.tensors[i - 1].nbytes <= p);
        if (t->nbytes) FUZZ_CHECK(p[0] == p[0] && p[t->nbytes - 1] == p[t->nbytes - 1]);
    }
    for (i = 0; i < st.n_meta; i++) FUZZ_CHECK(strlen(st.meta_keys[i]) < size);
    kmed_st_close(&st);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nul = (const uint8_t *)memchr(data, 0, size);
    size_t hlen = nul ? (size_t)(nul - data) : size, rest = nul ? size - hlen - 1 : 0, i;
    unsigned char *img;
    /* exact-size copy so ASan catches any read past the end */
    img = (unsigned char *)malloc(size ? size : 1);
    if (size) memcpy(img, data, size);
    fuzz_st_one(img, size);
    free(img);
    img = (unsigned char *)malloc(8 + hlen + rest);
    for (i = 0; i < 8; i++) img[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(img + 8, data, hlen);
    if (rest) memcpy(img + 8 + hlen, nul + 1, rest);
    fuzz_st_one(img, 8 + hlen + rest);
    free(img);
    return 0;
}

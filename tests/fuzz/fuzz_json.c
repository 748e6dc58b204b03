/* libFuzzer harness for kmed_json_parse. Every input must either fail cleanly (root NULL,
   a message naming an offset) or give a DOM whose strings are NUL-terminated and which,
   written back out as JSON, parses again to the same tree.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_json.c -o build/fuzz_json -lm -lpthread
   build/fuzz_json -max_total_time=60 tests/fuzz/corpus/json */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

static void fuzz_json_write(kmed_buf *b, const kmed_json *j)
{
    size_t i;
    switch (j->type) {
    case KMED_JSON_NULL: kmed_buf_puts(b, "null"); break;
    case KMED_JSON_TRUE: kmed_buf_puts(b, "true"); break;
    case KMED_JSON_FALSE: kmed_buf_puts(b, "false"); break;
    case KMED_JSON_NUMBER: kmed_buf_put(b, j->str, j->len); break;
    case KMED_JSON_STRING: kmed_buf_json_str(b, j->str, j->len); break;
    case KMED_JSON_ARRAY:
    case KMED_JSON_OBJECT:
        kmed_buf_puts(b, j->type == KMED_JSON_ARRAY ? "[" : "{");
        for (i = 0; i < j->len; i++) {
            if (i) kmed_buf_puts(b, ",");
            if (j->type == KMED_JSON_OBJECT) {
                kmed_buf_json_str(b, j->kids[i].key, j->kids[i].key_len);
                kmed_buf_puts(b, ":");
            }
            fuzz_json_write(b, &j->kids[i]);
        }
        kmed_buf_puts(b, j->type == KMED_JSON_ARRAY ? "]" : "}");
        break;
    }
}

static void fuzz_json_same(const kmed_json *a, const kmed_json *b, int in_obj)
{
    size_t i;
    int64_t x, y;
    FUZZ_CHECK(a->type == b->type && a->len == b->len);
    if (in_obj) {
        FUZZ_CHECK(a->key_len == b->key_len && a->key[a->key_len] == 0);
        FUZZ_CHECK(memcmp(a->key, b->key, a->key_len) == 0);
    }
    switch (a->type) {
    case KMED_JSON_STRING:
        FUZZ_CHECK(a->str[a->len] == 0 && memcmp(a->str, b->str, a->len) == 0);
        break;
    case KMED_JSON_NUMBER:
        FUZZ_CHECK(memcmp(a->str, b->str, a->len) == 0 && a->str[a->len] == 0);
        FUZZ_CHECK(a->num == b->num || (a->num != a->num && b->num != b->num));
        FUZZ_CHECK(kmed_json_int(a, &x) == kmed_json_int(b, &y));
        break;
    case KMED_JSON_ARRAY:
    case KMED_JSON_OBJECT:
        for (i = 0; i < a->len; i++) fuzz_json_same(&a->kids[i], &b->kids[i],
                                                     a->type == KMED_JSON_OBJECT);
        /* kmed_json_get takes a C string, so keys holding "\u0000" cannot be looked up. */
        if (a->type == KMED_JSON_OBJECT && a->len && strlen(a->kids[0].key) == a->kids[0].key_len)
            FUZZ_CHECK(kmed_json_get(a, a->kids[0].key) != NULL);
        break;
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kmed_json_doc doc, again;
    kmed_error err;
    kmed_buf out = {0};
    /* An exact-size copy, so reading past the end is caught. */
    char *text = (char *)malloc(size ? size : 1);
    if (!text) return 0;
    if (size) memcpy(text, data, size);
    if (kmed_json_parse(&doc, text, size, "fuzz.json", 0, &err) != KMED_OK) {
        FUZZ_CHECK(doc.root == NULL && strstr(err.msg, "offset") != NULL);
    } else {
        FUZZ_CHECK(doc.root != NULL);
        fuzz_json_write(&out, doc.root);
        FUZZ_CHECK(!out.failed);
        FUZZ_CHECK(kmed_json_parse(&again, out.data, out.len, "again", 0, &err) == KMED_OK);
        fuzz_json_same(doc.root, again.root, 0);
        kmed_json_free(&again);
    }
    kmed_json_free(&doc);
    kmed_buf_free(&out);
    free(text);
    return 0;
}

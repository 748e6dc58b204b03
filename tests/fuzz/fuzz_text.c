/* libFuzzer harness for the data text passes on raw bytes (split out of fuzz_data, where
   MinHash on every input took half the time): NFC must give valid UTF-8 and be idempotent,
   clean-up must give valid UTF-8 and be idempotent on text without '&' (entities decode one
   level per pass), and MinHash and the Korean share must take any bytes.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_text.c -o build/fuzz_text -lm -lpthread
   build/fuzz_text -max_total_time=60 tests/fuzz/corpus/text */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

/* 1 if s[0..n) is valid UTF-8 (what kmed__data_utf8_next accepts without U+FFFD, or a
   real U+FFFD). */
static int valid_utf8(const char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        size_t at = i;
        uint32_t c = kmed__data_utf8_next((const unsigned char *)s, n, &i);
        if (c == 0xFFFD && i - at != 3) return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kmed_buf a = {0}, b = {0};
    uint32_t sig[64];
    int flags;
    /* an exact-size copy, so reading past the end is caught */
    char *s = (char *)malloc(size ? size : 1);
    if (!s) return 0;
    if (size) memcpy(s, data, size);
    kmed_data_nfc(&a, s, size);
    FUZZ_CHECK(!a.failed && valid_utf8(a.data, a.len));
    kmed_data_nfc(&b, a.data, a.len);
    FUZZ_CHECK(b.len == a.len && memcmp(a.data, b.data, a.len) == 0);
    for (flags = 0; flags < 4; flags++) {
        a.len = b.len = 0;
        kmed_data_clean_text(&a, s, size, flags);
        FUZZ_CHECK(!a.failed && valid_utf8(a.data, a.len));
        if (memchr(s, '&', size) || (flags & KMED_DATA_CLEAN_HTML)) continue;
        kmed_data_clean_text(&b, a.data, a.len, flags);
        FUZZ_CHECK(b.len == a.len && memcmp(a.data, b.data, a.len) == 0);
    }
    kmed_data_minhash(sig, 64, s, size, 5);
    (void)kmed_data_korean_share(s, size);
    kmed_buf_free(&a);
    kmed_buf_free(&b);
    free(s);
    return 0;
}

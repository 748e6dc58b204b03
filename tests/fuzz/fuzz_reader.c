/* libFuzzer harness for the data-source readers alone (kmed_data_open/next): fuzz_data.c
   runs every record through the whole pipeline as well, which makes it too slow to give
   the readers many executions. Any bytes as a .jsonl, .json or .csv source of any kind
   must read to EOF with malformed records reported with the file named (never a crash or
   hang); each good record has an id and a source and cleans to valid UTF-8 text.
   Same input format and seeds as fuzz_data: the first byte picks the kind (b % 5) and file
   type (b / 5 % 3: jsonl, json, csv); the rest is written to a temp file (on tmpfs /dev/shm
   when there is one).
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_reader.c -o build/fuzz_reader -lm -lpthread
   build/fuzz_reader -max_total_time=60 tests/fuzz/corpus/reader */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
    static const char *const ext[3] = {"jsonl", "json", "csv"};
    char path[96];
    kmed_data_source src;
    kmed_data_reader rd;
    kmed_data_record rec;
    kmed_buf text = {0};
    kmed_error err;
    FILE *f;
    int eof = 0, guard;
    if (size < 1) return 0;
    memset(&src, 0, sizeof src);
    memset(&rec, 0, sizeof rec);
    src.kind = (kmed_data_kind)(data[0] % 5);
    snprintf(path, sizeof path, "%s/kmed_fuzz_reader_%ld_doctor_train.%s",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid(),
             ext[data[0] / 5 % 3]);
    snprintf(src.path, sizeof src.path, "%s", path);
    f = fopen(path, "wb");
    if (!f) return 0;
    if (size > 1) fwrite(data + 1, 1, size - 1, f);
    fclose(f);
    if (kmed_data_open(&rd, &src, &err) == KMED_OK) {
        /* each call consumes at least one line or element, so size + 2 calls reach EOF */
        for (guard = 0; guard < (int)size + 2; guard++) {
            kmed_result r = kmed_data_next(&rd, &rec, &eof, &err);
            if (r == KMED_OK && eof) break;
            if (r != KMED_OK) {
                FUZZ_CHECK(r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT);
                FUZZ_CHECK(strstr(err.msg, "kmed_fuzz_reader_") != NULL);
                continue;
            }
            FUZZ_CHECK(rec.id && rec.source);
            if (kmed_data_record_clean(&rec, data[0] & 1, &err) != KMED_OK) continue;
            text.len = 0;
            kmed_data_record_text(&rec, &text);
            FUZZ_CHECK(valid_utf8(text.data, text.len));
        }
        FUZZ_CHECK(eof);
    }
    kmed_data_close(&rd);
    kmed_data_record_free(&rec);
    kmed_buf_free(&text);
    remove(path);
    return 0;
}

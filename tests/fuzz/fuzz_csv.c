/* libFuzzer harness for the file-based text readers: each input is written to a temp file
   (on tmpfs /dev/shm when there is one: on a disk /tmp each rewrite costs a block discard)
   and read through kmed_csv and kmed_jsonl (kmed_lines underneath, with a tiny read chunk
   and line limit so lines cross chunk boundaries and hit the limit). Errors must be
   recoverable: the readers are driven to EOF through every bad record.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_csv.c -o build/fuzz_csv -lm -lpthread
   build/fuzz_csv -max_total_time=60 tests/fuzz/corpus/csv */
#define KMED__LINES_CHUNK ((size_t)7)
#define KMED_MAX_LINE_BYTES ((size_t)300)
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char path[64];
    kmed_csv c;
    kmed_jsonl j;
    kmed_error err;
    FILE *f;
    int eof = 0, guard;
    size_t i;
    if (!path[0])
        snprintf(path, sizeof path, "%s/kmed_fuzz_csv_%ld",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid());
    f = fopen(path, "wb");
    if (!f) return 0;
    if (size) fwrite(data, 1, size, f);
    fclose(f);

    if (kmed_csv_open(&c, path, &err) == KMED_OK) {
        FUZZ_CHECK(c.n_cols >= 1);
        for (i = 0; i < c.n_cols; i++) FUZZ_CHECK(kmed_csv_col(&c, c.header[i]) <= (int)i);
        /* Each call consumes at least one line, so size + 2 calls always reach EOF. */
        for (guard = 0; guard < (int)size + 2; guard++) {
            kmed_result r = kmed_csv_next(&c, &eof, &err);
            if (r == KMED_OK && eof) break;
            if (r == KMED_OK) {
                for (i = 0; i < c.n_cols; i++)
                    FUZZ_CHECK(c.fields[i].s[c.fields[i].len] == 0);
                FUZZ_CHECK(c.row_line >= 1 && c.row_line <= c.lines.line);
            } else {
                FUZZ_CHECK(err.line >= 1 && strstr(err.msg, path) != NULL);
            }
        }
        FUZZ_CHECK(eof);
    }
    kmed_csv_close(&c);

    eof = 0;
    if (kmed_jsonl_open(&j, path, &err) == KMED_OK) {
        for (guard = 0; guard < (int)size + 2; guard++) {
            const kmed_json *v;
            kmed_result r = kmed_jsonl_next(&j, &v, &eof, &err);
            if (r == KMED_OK && eof) break;
            if (r == KMED_OK) FUZZ_CHECK(v != NULL);
            else FUZZ_CHECK(v == NULL && err.line == j.lines.line);
        }
        FUZZ_CHECK(eof);
    }
    kmed_jsonl_close(&j);
    return 0;
}

/* Fuzz target for the data-source readers and every stage after them: any bytes as a
   .jsonl, .json or .csv source of any kind must read to EOF with malformed records reported
   (never a crash or hang), and each good record must clean, filter, dedup, decontaminate,
   format and pack. The checks of NFC and clean-up on the raw bytes are in fuzz_text.c.
   The first byte picks the kind (b % 5) and file type (b / 5 % 3: jsonl, json, csv); the
   rest is written to a temp file (on tmpfs /dev/shm when there is one).
   libFuzzer (run from the repo root):
     clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_data.c \
       -o build/fuzz_data -lm -lpthread && build/fuzz_data -max_total_time=60
   Without libFuzzer, random mutations of the files in tests/data/data (N iterations):
     cc -std=c99 -O1 -g -fsanitize=address,undefined -DKMED_FUZZ_MAIN -I. tests/fuzz/fuzz_data.c \
       -o build/fuzz_data_main -lm -lpthread && build/fuzz_data_main 20000 */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

static kmed_result byte_encode(void *user, const char *text, size_t len, int *ids, size_t cap,
                               size_t *n, kmed_error *err)
{
    size_t i;
    (void)user;
    (void)err;
    *n = len;
    if (len > cap) return KMED_ERR_SPACE;
    for (i = 0; i < len; i++) ids[i] = 1000 + (unsigned char)text[i];
    return KMED_OK;
}

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

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const ext[3] = {"jsonl", "json", "csv"};
    char path[96];
    kmed_data_source src;
    kmed_data_reader rd;
    kmed_data_record rec;
    kmed_data_dedup dd;
    kmed_data_decontam dc;
    kmed_data_safety sf;
    kmed_data_packer pk;
    kmed_data_pack_config pc;
    kmed_buf text = {0}, q = {0}, line = {0}, packed = {0};
    kmed_error err;
    FILE *f;
    int eof = 0, guard;
    if (size < 1) return 0;
    memset(&src, 0, sizeof src);
    memset(&rec, 0, sizeof rec);
    src.kind = (kmed_data_kind)(data[0] % 5);
    snprintf(path, sizeof path, "%s/kmed_fuzz_data_%ld_doctor_train.%s",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid(),
             ext[data[0] / 5 % 3]);
    snprintf(src.path, sizeof src.path, "%s", path);
    f = fopen(path, "wb");
    if (!f) return 0;
    if (size > 1) fwrite(data + 1, 1, size - 1, f);
    fclose(f);
    memset(&pc, 0, sizeof pc);
    pc.seq_len = 64;
    pc.encode = byte_encode;
    FUZZ_CHECK(kmed_data_dedup_init(&dd, NULL, &err) == KMED_OK);
    FUZZ_CHECK(kmed_data_decontam_init(&dc, NULL, &err) == KMED_OK);
    FUZZ_CHECK(kmed_data_safety_init(&sf, 1, &err) == KMED_OK);
    FUZZ_CHECK(kmed_data_pack_init(&pk, &pc, &err) == KMED_OK);
    if (kmed_data_open(&rd, &src, &err) == KMED_OK) {
        /* each call consumes at least one line or element, so size + 2 calls reach EOF */
        for (guard = 0; guard < (int)size + 2; guard++) {
            kmed_result r = kmed_data_next(&rd, &rec, &eof, &err);
            int dup, k;
            size_t of, item;
            double sim;
            kmed_json_doc doc = {0};
            if (r == KMED_OK && eof) break;
            if (r != KMED_OK) {
                FUZZ_CHECK(r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT);
                FUZZ_CHECK(strstr(err.msg, "kmed_fuzz_data_") != NULL);
                continue;
            }
            FUZZ_CHECK(rec.id && rec.source);
            if (kmed_data_record_clean(&rec, data[0] & 1, &err) != KMED_OK) continue;
            text.len = q.len = 0;
            kmed_data_record_text(&rec, &text);
            kmed_data_record_question(&rec, &q);
            FUZZ_CHECK(valid_utf8(text.data, text.len));
            (void)kmed_data_safety_check(&sf, text.data, text.len, NULL, NULL);
            FUZZ_CHECK(kmed_data_dedup_check(&dd, text.data, text.len, 1, &dup, &of, &sim,
                                             &err) == KMED_OK);
            (void)kmed_data_decontam_check(&dc, text.data, text.len, q.data, q.len, &item, &sim);
            FUZZ_CHECK(kmed_data_decontam_add(&dc, rec.id, text.data, text.len, q.data, q.len,
                                              &err) == KMED_OK);
            for (k = 0; k < 2; k++) {
                line.len = 0;
                r = k ? kmed_data_format_cpt(&rec, &line, &err)
                      : kmed_data_format_sft(&rec, "disclaimer", &line, &err);
                if (r != KMED_OK) {
                    FUZZ_CHECK(k == 0 && rec.kind == KMED_DATA_DICT);
                    continue;
                }
                FUZZ_CHECK(kmed_json_parse(&doc, line.data, line.len, NULL, 0, &err) == KMED_OK);
                FUZZ_CHECK(kmed_data_pack_add(&pk, doc.root, &packed, &err) == KMED_OK);
                kmed_json_free(&doc);
                packed.len = 0;
            }
        }
        FUZZ_CHECK(eof);
    }
    FUZZ_CHECK(kmed_data_pack_finish(&pk, &packed, &err) == KMED_OK);
    kmed_data_close(&rd);
    kmed_data_record_free(&rec);
    kmed_data_dedup_free(&dd);
    kmed_data_decontam_free(&dc);
    kmed_data_safety_free(&sf);
    kmed_data_pack_free(&pk);
    kmed_buf_free(&text);
    kmed_buf_free(&q);
    kmed_buf_free(&line);
    kmed_buf_free(&packed);
    remove(path);
    return 0;
}

#ifdef KMED_FUZZ_MAIN
/* Random mutations (byte flips, truncation, splices) of the hand-made test inputs. */
int main(int argc, char **argv)
{
    static const struct { const char *file; int kind, type; } seeds[] = {
        {"kormedmcqa_doctor_train.jsonl", 0, 0}, {"kormedmcqa_nurse_test.csv", 0, 2},
        {"kormedmcqa_pharm_train.csv", 0, 2}, {"medexpqa.json", 1, 1}, {"broken.json", 1, 1},
        {"ultramedical.jsonl", 2, 0}, {"cod.jsonl", 3, 0}, {"dict.jsonl", 4, 0},
        {"nfc_cases.jsonl", 4, 0}};
    char *texts[sizeof seeds / sizeof seeds[0]];
    size_t lens[sizeof seeds / sizeof seeds[0]], ns = sizeof seeds / sizeof seeds[0], s;
    kmed_rng rng;
    long iters = argc > 1 ? atol(argv[1]) : 10000, it;
    unsigned char *buf = NULL;
    kmed_error e = {0};
    for (s = 0; s < ns; s++) {
        char p[256];
        snprintf(p, sizeof p, "tests/data/data/%s", seeds[s].file);
        if (kmed_file_read(p, 0, &texts[s], &lens[s], &e) != KMED_OK) {
            fprintf(stderr, "fuzz_data: %s (run from the repository root)\n", e.msg);
            return 1;
        }
    }
    kmed_rng_seed(&rng, 4321);
    for (it = 0; it < iters; it++) {
        size_t pick = (size_t)kmed_rng_below(&rng, ns), len = lens[pick] + 1, k, nmut;
        buf = (unsigned char *)realloc(buf, len + 64);
        buf[0] = (unsigned char)(seeds[pick].kind + 5 * seeds[pick].type);
        if (kmed_rng_below(&rng, 8) == 0) buf[0] = (unsigned char)kmed_rng_below(&rng, 256);
        memcpy(buf + 1, texts[pick], lens[pick]);
        nmut = kmed_rng_below(&rng, 10);
        for (k = 0; k < nmut && len > 1; k++) {
            size_t at = 1 + kmed_rng_below(&rng, len - 1);
            switch (kmed_rng_below(&rng, 4)) {
            case 0: buf[at] = (unsigned char)kmed_rng_below(&rng, 256); break;
            case 1: len = at; break;                                        /* truncate */
            case 2: buf[at] = (unsigned char)"{}[]\",:\n\r\\<&"[kmed_rng_below(&rng, 13)]; break;
            default: { /* splice a piece of another seed */
                size_t o = (size_t)kmed_rng_below(&rng, ns), from, n;
                if (!lens[o]) break;
                from = (size_t)kmed_rng_below(&rng, lens[o]);
                n = lens[o] - from < 64 ? lens[o] - from : 64;
                if (at + n > len) n = len - at;
                memcpy(buf + at, texts[o] + from, n);
            }
            }
        }
        LLVMFuzzerTestOneInput(buf, len);
    }
    printf("fuzz_data: %ld inputs, no failure\n", iters);
    for (s = 0; s < ns; s++) kmed_free(texts[s]);
    free(buf);
    return 0;
}
#endif

/* libFuzzer harness for KorMedMCQA item files (kmed_mcqa_load) and what runs on loaded
   items: item text, few-shot prompts, lm-eval answer extraction. The first input byte
   picks the file type (b % 3: .jsonl, .json, .csv), the subset argument (b / 3 % 2: from
   the file, or "pharm"), the shot count (b / 6 % 3) and chat wrapping (b / 18 % 2); the rest
   is written to a temp file (on tmpfs /dev/shm when there is one) and loaded. Every loaded
   item must be complete (five options, answer 1..5, id and subset set), and every error
   must carry a message.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_mcqa.c -o build/fuzz_mcqa -lm -lpthread
   build/fuzz_mcqa -max_total_time=30 tests/fuzz/corpus/mcqa */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

static void fuzz_mcqa_items(const kmed_mcqa_set *set, int shots, int chat)
{
    size_t i;
    int k;
    kmed_error err;
    for (i = 0; i < set->n; i++) {
        const kmed_mcqa_item *it = &set->items[i];
        kmed_buf b = {0};
        kmed_result r;
        FUZZ_CHECK(it->id && it->subset && it->subset[0] && it->question);
        FUZZ_CHECK(it->answer >= 1 && it->answer <= KMED_MCQA_NOPT);
        for (k = 0; k < KMED_MCQA_NOPT; k++) FUZZ_CHECK(it->opt[k] != NULL);
        kmed_mcqa_item_text(it, &b);
        FUZZ_CHECK(!b.failed && b.len > 0);
        k = kmed_mcqa_extract(b.data, b.len);
        FUZZ_CHECK(k >= -1 && k < KMED_MCQA_NOPT);
        kmed_buf_free(&b);
        memset(&err, 0, sizeof err);
        r = kmed_mcqa_prompt(it, set, shots, chat, &b, &err);
        FUZZ_CHECK(r == KMED_OK || (r == KMED_ERR_NOT_FOUND && err.msg[0]));
        if (r == KMED_OK) FUZZ_CHECK(!b.failed && b.len > 0);
        kmed_buf_free(&b);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const ext[3] = {"jsonl", "json", "csv"};
    static char dir[64];
    char path[128];
    kmed_mcqa_set set;
    kmed_error err;
    kmed_result r;
    FILE *f;
    int b, k;
    if (size == 0) return 0;
    if (!dir[0]) {
        snprintf(dir, sizeof dir, "%s/kmed_fuzz_mcqa_%ld",
                 access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid());
        if (kmed_mkdir_p(dir, NULL) != KMED_OK) abort();
    }
    b = data[0];
    /* "nurse" in the name, so the subset-from-file-name rule is reached too */
    snprintf(path, sizeof path, "%s/nurse_test.%s", dir, ext[b % 3]);
    f = fopen(path, "wb");
    if (!f) return 0;
    if (size > 1) fwrite(data + 1, 1, size - 1, f);
    fclose(f);
    /* extraction on the raw bytes: any text, never a read past len */
    {
        char *t = (char *)malloc(size - 1 ? size - 1 : 1);
        if (!t) return 0;
        memcpy(t, data + 1, size - 1);
        k = kmed_mcqa_extract(t, size - 1);
        FUZZ_CHECK(k >= -1 && k < KMED_MCQA_NOPT);
        free(t);
    }
    memset(&set, 0, sizeof set);
    memset(&err, 0, sizeof err);
    r = kmed_mcqa_load(&set, path, (b / 3) % 2 ? "pharm" : NULL, &err);
    if (r != KMED_OK) FUZZ_CHECK(err.code < 0 && err.msg[0]);
    else fuzz_mcqa_items(&set, (b / 6) % 3, (b / 18) % 2);
    kmed_mcqa_free(&set);
    return 0;
}

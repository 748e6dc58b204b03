/* Replays saved fuzz inputs through a harness without libFuzzer: every crash a fuzzer
   found is kept under tests/fuzz/regress/<harness>/ (and the seeds under
   tests/fuzz/corpus/<harness>/), and this driver feeds each file to the harness's
   LLVMFuzzerTestOneInput. Built as a second translation unit next to one harness, under
   AddressSanitizer + UBSan so any fault aborts (no result line -> tests/run.sh fails it):
     cc -std=c99 -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -I. \
        tests/fuzz/fuzz_config.c tests/fuzz/regress.c -o build/regress_config -lm -lpthread
     build/regress_config tests/fuzz/regress/config tests/fuzz/corpus/config
   Arguments are files or directories (one level). Prints "N passed, N failed" last; a
   missing argument counts as a failure. Built with -DREGRESS_NAME=config, no arguments
   mean tests/fuzz/regress/config and tests/fuzz/corpus/config (those that exist), so the
   binary runs like any test from tests/run.sh. */
#define _POSIX_C_SOURCE 200809L
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int regress_one(const char *path)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL, *exact;
    size_t len = 0, cap = 0, n;
    if (!f) return 0;
    for (;;) {
        if (len == cap) {
            unsigned char *nb = (unsigned char *)realloc(buf, cap ? 2 * cap : 4096);
            if (!nb) { free(buf); fclose(f); return 0; }
            buf = nb;
            cap = cap ? 2 * cap : 4096;
        }
        n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0) break;
    }
    fclose(f);
    /* an exact-size copy, so a read past the end is caught as it would be by libFuzzer */
    exact = (unsigned char *)malloc(len ? len : 1);
    if (!exact) { free(buf); return 0; }
    if (len) memcpy(exact, buf, len);
    free(buf);
    fprintf(stderr, "replay %s (%zu bytes)\n", path, len);
    LLVMFuzzerTestOneInput(exact, len);
    free(exact);
    return 1;
}

static int regress_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

#define REGRESS_STR2(x) #x
#define REGRESS_STR(x) REGRESS_STR2(x)

int main(int argc, char **argv)
{
    int passed = 0, failed = 0, i;
#ifdef REGRESS_NAME
    char *dflt[3];
    struct stat ds;
    if (argc == 1) {
        static char reg[256], cor[256];
        snprintf(reg, sizeof reg, "tests/fuzz/regress/%s", REGRESS_STR(REGRESS_NAME));
        snprintf(cor, sizeof cor, "tests/fuzz/corpus/%s", REGRESS_STR(REGRESS_NAME));
        dflt[0] = argv[0];
        argc = 1;
        if (stat(reg, &ds) == 0) dflt[argc++] = reg;
        if (stat(cor, &ds) == 0) dflt[argc++] = cor;
        if (argc == 1) {
            fprintf(stderr, "FAIL: no %s or %s (run from the repository root)\n", reg, cor);
            printf("0 passed, 1 failed\n");
            return 1;
        }
        argv = dflt;
    }
#endif
    for (i = 1; i < argc; i++) {
        struct stat sb;
        if (stat(argv[i], &sb) != 0) {
            fprintf(stderr, "FAIL %s: not found\n", argv[i]);
            failed++;
        } else if (S_ISDIR(sb.st_mode)) {
            DIR *d = opendir(argv[i]);
            struct dirent *de;
            char **names = NULL;
            size_t n = 0, cap = 0, k;
            if (!d) { fprintf(stderr, "FAIL %s: cannot open\n", argv[i]); failed++; continue; }
            while ((de = readdir(d)) != NULL) {
                char *p;
                struct stat fs;
                if (de->d_name[0] == '.') continue;
                p = (char *)malloc(strlen(argv[i]) + strlen(de->d_name) + 2);
                if (!p) break;
                sprintf(p, "%s/%s", argv[i], de->d_name);
                if (stat(p, &fs) != 0 || !S_ISREG(fs.st_mode)) { free(p); continue; }
                if (n == cap) {
                    char **nn = (char **)realloc(names, (cap ? 2 * cap : 64) * sizeof *nn);
                    if (!nn) { free(p); break; }
                    names = nn;
                    cap = cap ? 2 * cap : 64;
                }
                names[n++] = p;
            }
            closedir(d);
            /* a fixed order, so a failure reproduces the same way */
            if (n) qsort(names, n, sizeof *names, regress_cmp);
            for (k = 0; k < n; k++) {
                if (regress_one(names[k])) passed++;
                else { fprintf(stderr, "FAIL %s: unreadable\n", names[k]); failed++; }
                free(names[k]);
            }
            free(names);
        } else if (regress_one(argv[i])) {
            passed++;
        } else {
            fprintf(stderr, "FAIL %s: unreadable\n", argv[i]);
            failed++;
        }
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

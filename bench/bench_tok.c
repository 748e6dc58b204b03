/* Tokenizer speed: load time of a tokenizer, then single-threaded encode throughput (MB/s and
   tokens/s, load excluded) over a few MB of Korean text, one document per line.
   Text: the lines of each FILE given, else the text of the .jsonl files in examples/data
   (every string value of a JSON line, joined by newlines, is one document); repeated up to
   --mb MB.
   Run from the repository root.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/bench_tok.c -o build/bench_tok \
      -lm -lpthread
   usage: build/bench_tok [--tokenizer PATH] [--mb N] [FILE...] */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <dirent.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct doc { const char *s; size_t n; } doc;

/* CPU seconds of this process: on a shared machine wall time also counts other jobs. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void add_doc(doc **d, size_t *n, size_t *cap, const char *s, size_t len)
{
    char *copy;
    if (!len) return;
    if (*n == *cap) {
        *cap = *cap ? *cap * 2 : 256;
        *d = (doc *)realloc(*d, *cap * sizeof **d);
        if (!*d) exit(1);
    }
    copy = (char *)malloc(len);
    if (!copy) exit(1);
    memcpy(copy, s, len);
    (*d)[*n].s = copy;
    (*d)[(*n)++].n = len;
}

/* Appends every string value under j (keys and numbers left out) to b, newline-separated. */
static void json_text(const kmed_json *j, kmed_buf *b)
{
    size_t i;
    if (j->type == KMED_JSON_STRING) {
        if (b->len) kmed_buf_put(b, "\n", 1);
        kmed_buf_put(b, j->str, j->len);
    } else if (j->type == KMED_JSON_ARRAY || j->type == KMED_JSON_OBJECT) {
        for (i = 0; i < j->len; i++) json_text(&j->kids[i], b);
    }
}

/* The documents of the .jsonl files in examples/data, one per JSON line (the lines that are
   malformed on purpose are skipped); returns the count of files read. */
static size_t load_examples(doc **d, size_t *n, size_t *cap)
{
    static const char dir[] = "examples/data";
    DIR *dp = opendir(dir);
    struct dirent *de;
    size_t files = 0;
    if (!dp) return 0;
    while ((de = readdir(dp)) != NULL) {
        size_t len = strlen(de->d_name);
        char path[1024];
        kmed_lines ls;
        kmed_error err = {0};
        const char *line;
        size_t line_len;
        int eof = 0;
        if (len < 6 || strcmp(de->d_name + len - 6, ".jsonl")) continue;
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        if (kmed_lines_open(&ls, path, &err)) {
            fprintf(stderr, "bench_tok: %s\n", err.msg);
            continue;
        }
        while (kmed_lines_next(&ls, &line, &line_len, &eof, &err) == KMED_OK && !eof) {
            kmed_json_doc jd = {0};
            kmed_buf b = {0};
            if (kmed_json_parse(&jd, line, line_len, path, ls.line, &err) == KMED_OK) {
                json_text(jd.root, &b);
                if (b.failed) exit(1);
                add_doc(d, n, cap, b.data, b.len);
            }
            kmed_buf_free(&b);
            kmed_json_free(&jd);
        }
        kmed_lines_close(&ls);
        files++;
    }
    closedir(dp);
    return files;
}

int main(int argc, char **argv)
{
    const char *tok_path = "../shared/fixtures/gemma2-tokenizer/tokenizer.json";
    const char *fx = getenv("KMED_FIXTURES");
    double mb = 4, t0, c0, t_load, c_load, t_enc, c_enc, bytes = 0, tokens = 0;
    doc *docs = NULL;
    size_t n_docs = 0, cap_docs = 0, i, ids_cap = 1 << 16, n_files = 0;
    int a, *ids;
    kmed_tok tok;
    kmed_error err = {0};
    kmed_result r;
    for (a = 1; a < argc; a++) {
        if (!strcmp(argv[a], "--tokenizer") && a + 1 < argc) tok_path = argv[++a];
        else if (!strcmp(argv[a], "--mb") && a + 1 < argc) mb = atof(argv[++a]);
        else if (!strcmp(argv[a], "--help")) {
            printf("usage: bench_tok [--tokenizer PATH] [--mb N (default 4)] [FILE...]\n"
                   "  text: the lines of each FILE, else the string values of each line of\n"
                   "  examples/data/*.jsonl (run from the repository root), repeated to N MB\n");
            return 0;
        } else {
            kmed_lines ls;
            const char *s;
            size_t len;
            int eof = 0;
            if (kmed_lines_open(&ls, argv[a], &err)) {
                fprintf(stderr, "bench_tok: %s\n", err.msg);
                return 1;
            }
            while (kmed_lines_next(&ls, &s, &len, &eof, &err) == KMED_OK && !eof)
                add_doc(&docs, &n_docs, &cap_docs, s, len);
            kmed_lines_close(&ls);
            n_files++;
        }
    }
    if (fx && *fx && !strcmp(tok_path, "../shared/fixtures/gemma2-tokenizer/tokenizer.json")) {
        static char p[1100];
        snprintf(p, sizeof p, "%s/gemma2-tokenizer/tokenizer.json", fx);
        tok_path = p;
    }
    if (!n_files) n_files = load_examples(&docs, &n_docs, &cap_docs);
    if (!n_docs) {
        fprintf(stderr, "bench_tok: no text (give FILEs, or run from the repository root so "
                        "examples/data/*.jsonl is found)\n");
        return 1;
    }
    t0 = kmed_time_now();
    c0 = cpu_now();
    r = kmed_tok_load(&tok, tok_path, &err);
    t_load = kmed_time_now() - t0;
    c_load = cpu_now() - c0;
    if (r) {
        fprintf(stderr, "bench_tok: load: %s\n", err.msg);
        return 1;
    }
    ids = (int *)malloc(ids_cap * sizeof *ids);
    /* One untimed pass warms caches and page-faults the tables in. */
    for (i = 0; i < n_docs; i++) {
        size_t n;
        kmed_tok_encode(&tok, NULL, docs[i].s, docs[i].n, ids, ids_cap, &n, &err);
    }
    t0 = kmed_time_now();
    c0 = cpu_now();
    while (bytes < mb * 1e6) {
        for (i = 0; i < n_docs; i++) {
            size_t n = 0;
            r = kmed_tok_encode(&tok, NULL, docs[i].s, docs[i].n, ids, ids_cap, &n, &err);
            if (r == KMED_ERR_SPACE) {
                ids_cap = n;
                ids = (int *)realloc(ids, ids_cap * sizeof *ids);
                r = kmed_tok_encode(&tok, NULL, docs[i].s, docs[i].n, ids, ids_cap, &n, &err);
            }
            if (r) {
                fprintf(stderr, "bench_tok: encode: %s\n", err.msg);
                return 1;
            }
            bytes += (double)docs[i].n;
            tokens += (double)n;
        }
    }
    t_enc = kmed_time_now() - t0;
    c_enc = cpu_now() - c0;
    printf("tokenizer: %s (%d ids)\n", tok_path, tok.n_vocab);
    printf("load: %.3f s wall, %.3f s cpu\n", t_load, c_load);
    printf("text: %zu documents from %zu files, %.1f MB encoded, %.0f tokens "
           "(%.2f bytes/token)\n", n_docs, n_files, bytes / 1e6, tokens, bytes / tokens);
    printf("encode (1 thread): %.2f s wall: %.1f MB/s, %.0f tokens/s\n", t_enc,
           bytes / 1e6 / t_enc, tokens / t_enc);
    printf("encode (1 thread): %.2f s cpu:  %.1f MB/s, %.0f tokens/s\n", c_enc,
           bytes / 1e6 / c_enc, tokens / c_enc);
    for (i = 0; i < n_docs; i++) free((void *)docs[i].s);
    free(docs);
    free(ids);
    kmed_tok_free(&tok);
    return 0;
}

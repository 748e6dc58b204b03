/* Core module: error formatting, log and progress callbacks, rng determinism and ranges,
   buffers and JSON numbers (in any locale), atomic files, and the implementation's include
   order (tests/include_order.c, compiled here).
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_core.c -o build/test_core \
      -lm -lpthread   (run from the repository root) */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#include <locale.h>

static void test_errors(void)
{
    kmed_error e = {0};
    kmed_result r = kmed_error_set(&e, KMED_ERR_FORMAT, "a.jsonl", 812, (size_t)-1,
                                   "missing field '%s'", "answer");
    CHECK(r == KMED_ERR_FORMAT && e.code == KMED_ERR_FORMAT);
    CHECKF(strcmp(e.msg, "a.jsonl:812: missing field 'answer'") == 0, "msg '%s'", e.msg);
    kmed_error_set(&e, KMED_ERR_IO, "m.gguf", 0, 24, "bad magic");
    CHECKF(strcmp(e.msg, "m.gguf: offset 24: bad magic") == 0, "msg '%s'", e.msg);
    kmed_error_set(&e, KMED_ERR_ARG, NULL, 0, (size_t)-1, "plain");
    CHECK(strcmp(e.msg, "plain") == 0 && e.file[0] == 0);
    CHECK(kmed_error_set(NULL, KMED_ERR_NOMEM, "x", 1, 0, "y") == KMED_ERR_NOMEM);
    CHECK(strcmp(kmed_result_str(KMED_OK), "ok") == 0);
    CHECK(strcmp(kmed_result_str(KMED_ERR_SHAPE), "shape mismatch") == 0);
}

/* What the callbacks saw. */
typedef struct cb_record {
    int n_log, n_progress;
    kmed_log_level level;
    char msg[2048], what[64], unit[16];
    double done, total;
} cb_record;

static void rec_log(void *user, kmed_log_level level, const char *msg)
{
    cb_record *r = (cb_record *)user;
    r->n_log++;
    r->level = level;
    snprintf(r->msg, sizeof r->msg, "%s", msg);
}

static void rec_progress(void *user, const char *what, double done, double total,
                         const char *unit)
{
    cb_record *r = (cb_record *)user;
    r->n_progress++;
    snprintf(r->what, sizeof r->what, "%s", what);
    snprintf(r->unit, sizeof r->unit, "%s", unit);
    r->done = done;
    r->total = total;
}

static void test_callbacks(void)
{
    cb_record rec;
    kmed_callbacks cb = {rec_log, rec_progress, NULL}, none = {NULL, NULL, NULL};
    char long_word[3000];
    size_t n;
    memset(&rec, 0, sizeof rec);
    cb.user = &rec;
    kmed_log(&cb, KMED_LOG_WARN, "%s:%d: skipped (%s)", "a.jsonl", 7, "bad json");
    CHECK(rec.n_log == 1 && rec.level == KMED_LOG_WARN);
    CHECKF(strcmp(rec.msg, "a.jsonl:7: skipped (bad json)") == 0, "%s", rec.msg);
    kmed_log(&cb, KMED_LOG_DEBUG, "x");
    CHECK(rec.n_log == 2 && rec.level == KMED_LOG_DEBUG && strcmp(rec.msg, "x") == 0);
    kmed_progress(&cb, "train", 3, 10, "steps");
    CHECK(rec.n_progress == 1 && strcmp(rec.what, "train") == 0 && rec.done == 3 &&
          rec.total == 10 && strcmp(rec.unit, "steps") == 0);
    /* an over-long message reaches the callback truncated, NUL-terminated */
    memset(long_word, 'w', sizeof long_word - 1);
    long_word[sizeof long_word - 1] = 0;
    kmed_log(&cb, KMED_LOG_INFO, "%s", long_word);
    n = strlen(rec.msg);
    CHECKF(rec.n_log == 3 && n > 0 && n < sizeof long_word - 1 && rec.msg[0] == 'w' &&
           rec.msg[n - 1] == 'w', "truncated to %zu", n);
    /* NULL and zeroed callbacks are silent; one callback set does not call the other */
    kmed_log(NULL, KMED_LOG_WARN, "unheard");
    kmed_progress(NULL, "x", 1, 2, "B");
    kmed_log(&none, KMED_LOG_WARN, "unheard");
    kmed_progress(&none, "x", 1, 2, "B");
    cb.log = NULL;
    kmed_log(&cb, KMED_LOG_WARN, "unheard");
    kmed_progress(&cb, "eval", 5, 0, "items");
    CHECK(rec.n_log == 3 && rec.n_progress == 2 && rec.total == 0 && rec.done == 5);
}

static void test_rng(void)
{
    kmed_rng a, b;
    double sum = 0, sum2 = 0;
    int i, counts[7] = {0}, same = 1;
    kmed_rng_seed(&a, 42);
    kmed_rng_seed(&b, 42);
    for (i = 0; i < 1000; i++) same &= kmed_rng_u64(&a) == kmed_rng_u64(&b);
    CHECK(same);
    kmed_rng_seed(&b, 43);
    CHECK(kmed_rng_u64(&a) != kmed_rng_u64(&b));
    for (i = 0; i < 100000; i++) {
        double u = kmed_rng_uniform(&a), z = kmed_rng_normal(&a);
        uint64_t k = kmed_rng_below(&a, 7);
        if (u < 0 || u >= 1 || k >= 7) { same = 0; break; }
        counts[k]++;
        sum += z;
        sum2 += z * z;
    }
    CHECK(same);
    /* 100000 draws: mean within ~5 sigma (0.016) of 0, variance within 0.03 of 1 */
    CHECKF(fabs(sum / 100000) < 0.016, "normal mean %g", sum / 100000);
    CHECKF(fabs(sum2 / 100000 - 1) < 0.03, "normal var %g", sum2 / 100000);
    for (i = 0; i < 7; i++) CHECKF(abs(counts[i] - 14286) < 600, "bucket %d: %d", i, counts[i]);
}

static void test_buf(void)
{
    kmed_buf b = {0};
    kmed_buf_puts(&b, "x=");
    kmed_buf_printf(&b, "%d,", 42);
    kmed_buf_json_str(&b, "a\"b\\c\n\x01\xea\xb0\x80", 10);
    CHECKF(strcmp(b.data, "x=42,\"a\\\"b\\\\c\\n\\u0001\xea\xb0\x80\"") == 0, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f32(&b, 0.1f);
    CHECKF(strcmp(b.data, "0.1") == 0, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f32(&b, 1.0f / 3.0f);
    CHECKF((float)strtod(b.data, NULL) == 1.0f / 3.0f, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f32(&b, NAN);
    CHECK(strcmp(b.data, "null") == 0);
    b.len = 0;
    kmed_buf_json_f64(&b, 0.1);
    CHECKF(strcmp(b.data, "0.1") == 0, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f64(&b, 1.0 / 3.0);
    CHECKF(strtod(b.data, NULL) == 1.0 / 3.0, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f64(&b, -1e300);
    CHECKF(strcmp(b.data, "-1e+300") == 0, "%s", b.data);
    b.len = 0;
    kmed_buf_json_f64(&b, INFINITY);
    CHECK(strcmp(b.data, "null") == 0);
    CHECK(!b.failed);
    kmed_buf_free(&b);
}

/* JSON numbers keep '.' under a locale whose decimal point is ',' (printf's would not).
   Needs such a locale installed: without one the check is skipped with a note, since
   that is the machine's setup, not a property of the code. */
static void test_json_numbers_locale(void)
{
    static const char *const names[] = {"de_DE.UTF-8", "de_DE.utf8", "de_DE", "fr_FR.UTF-8",
                                        "fr_FR.utf8", "fr_FR", NULL};
    kmed_buf b = {0};
    kmed_json_doc doc;
    kmed_error e = {0};
    char probe[16];
    int i;
    for (i = 0; names[i]; i++)
        if (setlocale(LC_NUMERIC, names[i])) break;
    snprintf(probe, sizeof probe, "%.1f", 1.5);
    if (!names[i] || strcmp(probe, "1,5") != 0) {
        setlocale(LC_NUMERIC, "C");
        fprintf(stderr, "note: no locale with a ',' decimal point installed; "
                        "locale check skipped\n");
        return;
    }
    kmed_buf_puts(&b, "[");
    kmed_buf_json_f32(&b, 1.5f);
    kmed_buf_puts(&b, ",");
    kmed_buf_json_f32(&b, 1.0f / 3.0f);
    kmed_buf_puts(&b, ",");
    kmed_buf_json_f64(&b, -2.25e-7);
    kmed_buf_puts(&b, "]");
    CHECKF(strcmp(b.data, "[1.5,0.33333334,-2.25e-07]") == 0, "under %s: %s",
           names[i], b.data);
    /* and the parser reads them back to the same values in that locale */
    CHECK_OK(kmed_json_parse(&doc, b.data, b.len, "n.json", 0, &e));
    CHECK(kmed_json_num(kmed_json_at(doc.root, 0), 0) == 1.5 &&
          (float)kmed_json_num(kmed_json_at(doc.root, 1), 0) == 1.0f / 3.0f &&
          kmed_json_num(kmed_json_at(doc.root, 2), 0) == -2.25e-7);
    kmed_json_free(&doc);
    kmed_buf_free(&b);
    setlocale(LC_NUMERIC, "C");
}

/* The include-order rule of kmed.h's doc block: tests/include_order.c puts <stdio.h>
   before the implementation. Built with the compiler from $CC (default cc). */
static void test_include_order(void)
{
    const char *cc = getenv("CC") && *getenv("CC") ? getenv("CC") : "cc";
    const char *dir = "build/test_core_tmp";
    char cmd[1024], log[256], text[4096] = {0};
    FILE *f;
    int rc;
    kmed_error e = {0};
    CHECK_OK(kmed_mkdir_p(dir, &e));
    /* with _POSIX_C_SOURCE defined first, as the rule says: builds warning-free and runs */
    snprintf(cmd, sizeof cmd, "%s -std=c99 -Wall -Wextra -Werror -I. tests/include_order.c "
             "-o %s/include_order -lm -lpthread && %s/include_order >/dev/null", cc, dir, dir);
    rc = system(cmd);
    CHECKF(rc == 0, "%s: status %d", cmd, rc);
    /* without it a strict build stops at kmed.h's #error, which says what to do */
    snprintf(log, sizeof log, "%s/include_order.log", dir);
    snprintf(cmd, sizeof cmd, "%s -std=c99 -fsyntax-only -DKMED_TEST_HIDE_POSIX -I. "
             "tests/include_order.c >%s 2>&1", cc, log);
    rc = system(cmd);
    f = fopen(log, "rb");
    if (f) {
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = 0;
        fclose(f);
    }
    CHECKF(rc != 0 && strstr(text, "kmed: a system header came before the implementation") &&
           strstr(text, "_POSIX_C_SOURCE 200809L"), "%s: status %d, output:\n%s", cmd, rc,
           text);
    /* the check fires only when POSIX is really hidden: GNU mode keeps it visible */
    snprintf(cmd, sizeof cmd, "%s -std=gnu99 -fsyntax-only -Wall -Wextra -Werror "
             "-DKMED_TEST_HIDE_POSIX -I. tests/include_order.c", cc);
    rc = system(cmd);
    CHECKF(rc == 0, "%s: status %d", cmd, rc);
    remove(log);
}

static void test_files(void)
{
    kmed_error e = {0};
    char *data = NULL;
    size_t n = 0;
    kmed_map m;
    kmed_afile a;
    const char *dir = "build/test_core_tmp/sub";
    CHECK_OK(kmed_mkdir_p(dir, &e));
    CHECK(kmed_is_dir(dir));
    CHECK_OK(kmed_file_write_atomic("build/test_core_tmp/sub/f.txt", "hello", 5, &e));
    CHECK_OK(kmed_file_read("build/test_core_tmp/sub/f.txt", 0, &data, &n, &e));
    CHECK(n == 5 && data && strcmp(data, "hello") == 0);
    kmed_free(data);
    CHECK(kmed_file_read("build/test_core_tmp/sub/f.txt", 3, &data, &n, &e) == KMED_ERR_LIMIT);
    CHECK(kmed_file_read("build/test_core_tmp/none", 0, &data, &n, &e) == KMED_ERR_NOT_FOUND);
    CHECK(strstr(e.msg, "build/test_core_tmp/none") != NULL);
    CHECK_OK(kmed_map_open(&m, "build/test_core_tmp/sub/f.txt", &e));
    CHECK(m.size == 5 && memcmp(m.data, "hello", 5) == 0);
    kmed_map_close(&m);
    /* an aborted atomic write leaves the old file untouched and no temp file */
    CHECK_OK(kmed_afile_open(&a, "build/test_core_tmp/sub/f.txt", &e));
    CHECK_OK(kmed_afile_write(&a, "partial", 7, &e));
    kmed_afile_abort(&a);
    CHECK_OK(kmed_file_read("build/test_core_tmp/sub/f.txt", 0, &data, &n, &e));
    CHECK(n == 5 && strcmp(data, "hello") == 0);
    kmed_free(data);
    CHECK(fopen(a.tmp, "rb") == NULL);
    {
        char p[16];
        CHECK(kmed_path_join(p, sizeof p, "ab", "cd", &e) == KMED_OK && !strcmp(p, "ab/cd"));
        CHECK(kmed_path_join(p, sizeof p, "ab/", "cd", &e) == KMED_OK && !strcmp(p, "ab/cd"));
        CHECK(kmed_path_join(p, sizeof p, "abcdefghij", "klmnopq", &e) == KMED_ERR_LIMIT);
    }
}

int main(void)
{
    test_errors();
    test_callbacks();
    test_rng();
    test_buf();
    test_json_numbers_locale();
    test_files();
    test_include_order();
    return kmed_test_done();
}

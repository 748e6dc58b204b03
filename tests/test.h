/* Tiny test harness shared by tests/test_*.c. Each test file defines
   KMED_IMPLEMENTATION, includes kmed.h and this file, runs checks and ends main with
   `return kmed_test_done();`, which prints "N passed, N failed". */
#ifndef KMED_TEST_H
#define KMED_TEST_H
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int kmed_test_passed, kmed_test_failed;

#define CHECK(cond) CHECKF(cond, "%s", #cond)
#define CHECKF(cond, ...)                                                     \
    do {                                                                      \
        if (cond) kmed_test_passed++;                                         \
        else {                                                                \
            kmed_test_failed++;                                               \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);              \
            fprintf(stderr, __VA_ARGS__);                                     \
            fputc('\n', stderr);                                              \
        }                                                                     \
    } while (0)
/* A kmed call returning kmed_result that must succeed; `e` is a kmed_error in scope. */
#define CHECK_OK(call)                                                        \
    do {                                                                      \
        kmed_result r_ = (call);                                              \
        CHECKF(r_ == KMED_OK, "%s -> %s: %s", #call, kmed_result_str(r_), e.msg); \
    } while (0)

/* Max |a-b| over n floats. */
static inline double kmed_test_maxdiff(const float *a, const float *b, size_t n)
{
    double m = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > m || d != d) m = d != d ? INFINITY : d;
    }
    return m;
}

/* The fixtures directory ($KMED_FIXTURES, else ../shared/fixtures), or NULL when absent.
   Absent fixtures are a failure under CI and a noted skip elsewhere. */
static inline const char *kmed_test_fixtures(void)
{
    static char path[1024];
    const char *env = getenv("KMED_FIXTURES");
    FILE *f;
    char probe[1100];
    snprintf(path, sizeof path, "%s", env && *env ? env : "../shared/fixtures");
    snprintf(probe, sizeof probe, "%s/tiny-gemma2/config.json", path);
    f = fopen(probe, "rb");
    if (f) { fclose(f); return path; }
    if (getenv("CI")) {
        kmed_test_failed++;
        fprintf(stderr, "FAIL: fixtures not found at %s (CI is set)\n", path);
    } else {
        fprintf(stderr, "note: fixtures not found at %s; fixture tests skipped\n", path);
    }
    return NULL;
}

static inline int kmed_test_done(void)
{
    printf("%d passed, %d failed\n", kmed_test_passed, kmed_test_failed);
    return kmed_test_failed ? 1 : 0;
}
#endif

/* The implementation compiled after system headers, as a program with allocation hooks
   has to include them (kmed.h's doc block, "Include order"). test_core builds and runs it
   under -std=c99, and checks that without the _POSIX_C_SOURCE line (-DKMED_TEST_HIDE_POSIX)
   the build stops at kmed.h's #error instead of failing deep inside the library.
   cc -std=c99 -Wall -Wextra -I. tests/include_order.c -o include_order -lm -lpthread */
#ifndef KMED_TEST_HIDE_POSIX
#define _POSIX_C_SOURCE 200809L
#endif
#include <stdio.h>
#include <stdlib.h>

static size_t n_alloc;
static void *counting_malloc(size_t n) { n_alloc++; return malloc(n); }
static void *counting_realloc(void *p, size_t n) { n_alloc++; return realloc(p, n); }
#define KMED_MALLOC(n) counting_malloc(n)
#define KMED_REALLOC(p, n) counting_realloc(p, n)
#define KMED_FREE(p) free(p)
#define KMED_IMPLEMENTATION
#include "kmed.h"

int main(void)
{
    kmed_buf b = {0};
    double t0 = kmed_time_now();
    int ok;
    kmed_buf_json_f32(&b, 1.5f);
    ok = !b.failed && strcmp(b.data, "1.5") == 0 && n_alloc > 0 && kmed_time_now() >= t0;
    printf("%s, %zu allocation(s) through the hooks\n", b.data ? b.data : "", n_alloc);
    kmed_buf_free(&b);
    return ok ? 0 : 1;
}

/* Core module: error formatting, rng determinism and ranges, buffers, atomic files. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

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
    CHECK(!b.failed);
    kmed_buf_free(&b);
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
    test_rng();
    test_buf();
    test_files();
    return kmed_test_done();
}

/* Tests for the text parsers: JSON (valid and malformed documents, the real Gemma-2
   tokenizer.json), kmed_lines, JSONL and CSV.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_io_text.c \
      -o build/test_io_text -lm -lpthread */
/* A smaller record limit than the default 1 GB, so the over-limit paths are testable with
   a 9 MB file while the 5 MB JSONL line still fits. */
#define KMED_MAX_LINE_BYTES ((size_t)8 << 20)
#define _POSIX_C_SOURCE 200809L /* before any system header, as kmed.h's doc block asks */
#include <stdlib.h>

/* A realloc that fails while fail_realloc is set, for the line reader's NOMEM path. */
static int fail_realloc;
static void *test_realloc(void *p, size_t n) { return fail_realloc ? NULL : realloc(p, n); }
#define KMED_MALLOC(n) malloc(n)
#define KMED_REALLOC(p, n) test_realloc(p, n)
#define KMED_FREE(p) free(p)

#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

/* kmed-chat itself, its main renamed, so test_chat_safety_check runs its line loop as a
   user does (it defines KMED_IMPLEMENTATION again and includes kmed.h, already in) */
#define main kmed_chat_tool_main
#include "../tools/kmed-chat.c"
#undef main
#include "run_tool.h"

/* Sanitizer builds run several times slower: the timing check only holds for plain builds. */
#if defined(__SANITIZE_ADDRESS__)
#define TEST_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_SANITIZED 1
#endif
#endif
#ifndef TEST_SANITIZED
#define TEST_SANITIZED 0
#endif

/* Parses a NUL-terminated document; returns the result code, leaves doc parsed. */
static kmed_result parse(kmed_json_doc *doc, const char *text, kmed_error *e)
{
    return kmed_json_parse(doc, text, strlen(text), "t.json", 0, e);
}

/* Expects text to fail with `code` and a message containing `frag`. */
static void check_bad(const char *text, size_t len, kmed_result code, const char *frag)
{
    kmed_json_doc doc;
    kmed_error e = {0};
    kmed_result r = kmed_json_parse(&doc, text, len, "bad.json", 0, &e);
    CHECKF(r == code, "parse of %.40s gave %d (%s), want %d", text, (int)r, e.msg, (int)code);
    CHECKF(doc.root == NULL, "root set after error for %.40s", text);
    CHECKF(strstr(e.msg, frag) != NULL, "message for %.40s: '%s' lacks '%s'", text, e.msg, frag);
    CHECKF(strstr(e.msg, "bad.json") != NULL, "message lacks file name: %s", e.msg);
    kmed_json_free(&doc);
}
#define BAD(lit, frag) check_bad(lit, sizeof(lit) - 1, KMED_ERR_FORMAT, frag)

static void test_json_valid(void)
{
    kmed_error e = {0};
    kmed_json_doc doc;
    const kmed_json *r, *a;
    int64_t iv;
    CHECK_OK(parse(&doc, " {\"a\": [1, 2.5, -3e2, true, false, null, \"x\"], \"b\": {},"
                         " \"c\": [], \"a\": \"last\", \"d\": {\"e\": [[[]]]}}\r\n\t", &e));
    r = doc.root;
    CHECK(r && r->type == KMED_JSON_OBJECT && r->len == 5);
    CHECK(strcmp(kmed_json_str(kmed_json_get(r, "a"), ""), "last") == 0); /* last wins */
    a = &r->kids[0];
    CHECK(a->type == KMED_JSON_ARRAY && a->len == 7 && strcmp(a->key, "a") == 0);
    CHECK(kmed_json_num(kmed_json_at(a, 0), 0) == 1.0);
    CHECK(kmed_json_num(kmed_json_at(a, 1), 0) == 2.5);
    CHECK(kmed_json_num(kmed_json_at(a, 2), 0) == -300.0);
    CHECK(kmed_json_bool(kmed_json_at(a, 3), -1) == 1);
    CHECK(kmed_json_bool(kmed_json_at(a, 4), -1) == 0);
    CHECK(kmed_json_at(a, 5)->type == KMED_JSON_NULL);
    CHECK(kmed_json_bool(kmed_json_at(a, 5), -1) == -1);
    CHECK(strcmp(kmed_json_str(kmed_json_at(a, 6), NULL), "x") == 0);
    CHECK(kmed_json_at(a, 7) == NULL);
    CHECK(kmed_json_get(r, "b")->type == KMED_JSON_OBJECT && kmed_json_get(r, "b")->len == 0);
    CHECK(kmed_json_get(r, "c")->type == KMED_JSON_ARRAY && kmed_json_get(r, "c")->len == 0);
    CHECK(kmed_json_get(r, "zz") == NULL && kmed_json_get(a, "a") == NULL);
    a = kmed_json_at(kmed_json_at(kmed_json_get(kmed_json_get(r, "d"), "e"), 0), 0);
    CHECK(a && a->type == KMED_JSON_ARRAY && a->len == 0);
    CHECK(kmed_json_int(kmed_json_at(kmed_json_get(r, "a"), 0), &iv) == 0); /* a string */
    kmed_json_free(&doc);
    kmed_json_free(&doc); /* idempotent */

    /* Scalars at the top level. */
    CHECK_OK(parse(&doc, "\"\"", &e));
    CHECK(doc.root->type == KMED_JSON_STRING && doc.root->len == 0 && doc.root->str[0] == 0);
    kmed_json_free(&doc);
    CHECK_OK(parse(&doc, "null", &e));
    CHECK(doc.root->type == KMED_JSON_NULL);
    kmed_json_free(&doc);
}

static void test_json_strings(void)
{
    kmed_error e = {0};
    kmed_json_doc doc;
    /* Every escape, a BMP escape, a surrogate pair, raw UTF-8 (Korean, 4-byte emoji), NUL. */
    static const char in[] = "[\"q\\\"b\\\\s\\/b\\bf\\fn\\nr\\rt\\t\", "
                             "\"\\u00e9\\u20AC\\ud83d\\ude00\","
                             " \"\xed\x95\x9c\xea\xb8\x80\xf0\x9f\x98\x80\", \"a\\u0000b\"]";
    static const char want1[] = "q\"b\\s/b\bf\fn\nr\rt\t";
    static const char want2[] = "\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
    static const char want3[] = "\xed\x95\x9c\xea\xb8\x80\xf0\x9f\x98\x80";
    const kmed_json *r;
    CHECK_OK(parse(&doc, in, &e));
    r = doc.root;
    CHECK(r && r->len == 4);
    CHECK(r->kids[0].len == sizeof want1 - 1 && memcmp(r->kids[0].str, want1, sizeof want1) == 0);
    CHECK(r->kids[1].len == sizeof want2 - 1 && memcmp(r->kids[1].str, want2, sizeof want2) == 0);
    CHECK(r->kids[2].len == sizeof want3 - 1 && memcmp(r->kids[2].str, want3, sizeof want3) == 0);
    CHECK(r->kids[3].len == 3 && memcmp(r->kids[3].str, "a\0b", 4) == 0);
    kmed_json_free(&doc);
    /* Escaped keys are unescaped and found by kmed_json_get; a BOM at the start is skipped. */
    CHECK_OK(parse(&doc, "\xef\xbb\xbf{\"k\\u00e9y\": 1, \"\\u0000\": 2}", &e));
    CHECK(kmed_json_num(kmed_json_get(doc.root, "k\xc3\xa9y"), 0) == 1);
    CHECK(doc.root && doc.root->kids[1].key_len == 1 && doc.root->kids[1].key[0] == 0);
    kmed_json_free(&doc);
    /* Boundary code points: U+007F, U+0080, U+07FF, U+0800, U+FFFF, U+10000, U+10FFFF raw. */
    CHECK_OK(parse(&doc, "\"\x7f\xc2\x80\xdf\xbf\xe0\xa0\x80\xef\xbf\xbf\xf0\x90\x80\x80"
                         "\xf4\x8f\xbf\xbf\"", &e));
    CHECK(doc.root && doc.root->len == 1 + 2 + 2 + 3 + 3 + 4 + 4);
    kmed_json_free(&doc);
    CHECK_OK(parse(&doc, "\"\\udbff\\udfff\"", &e)); /* U+10FFFF via escapes */
    CHECK(doc.root && memcmp(doc.root->str, "\xf4\x8f\xbf\xbf", 5) == 0);
    kmed_json_free(&doc);
}

/* Parses one number and checks num and (if want_int) the exact int64. */
static void check_num(const char *text, double want, int int_ok, int64_t want_int)
{
    kmed_error e = {0};
    kmed_json_doc doc;
    int64_t v = 12345;
    CHECK_OK(parse(&doc, text, &e));
    if (!doc.root) return;
    CHECKF(doc.root->type == KMED_JSON_NUMBER && doc.root->num == want,
           "%s -> %.17g want %.17g", text, doc.root->num, want);
    CHECKF(doc.root->len == strlen(text) && memcmp(doc.root->str, text, doc.root->len) == 0,
           "%s: source text kept", text);
    CHECKF(kmed_json_int(doc.root, &v) == int_ok, "%s: kmed_json_int ok", text);
    if (int_ok) CHECKF(v == want_int, "%s -> %lld", text, (long long)v);
    kmed_json_free(&doc);
}

static void test_json_numbers(void)
{
    kmed_error e = {0};
    kmed_json_doc doc;
    check_num("0", 0, 1, 0);
    check_num("-0", 0, 1, 0);
    check_num("7", 7, 1, 7);
    check_num("-12", -12, 1, -12);
    check_num("1.5", 1.5, 0, 0);
    check_num("-0.25e-2", -0.0025, 0, 0);
    check_num("1e308", 1e308, 0, 0);
    check_num("1E+2", 100, 0, 0);
    check_num("2.2250738585072014e-308", 2.2250738585072014e-308, 0, 0);
    check_num("123456789012345", 123456789012345.0, 1, 123456789012345LL);
    check_num("9007199254740993", 9007199254740992.0, 1, 9007199254740993LL); /* 2^53+1 */
    check_num("9223372036854775807", 9223372036854775807.0, 1, INT64_MAX);
    check_num("-9223372036854775808", -9223372036854775808.0, 1, INT64_MIN);
    check_num("9223372036854775808", 9223372036854775808.0, 0, 0);   /* INT64_MAX + 1 */
    check_num("-9223372036854775809", -9223372036854775808.0, 0, 0);
    check_num("123456789012345678901234567890", 1.2345678901234568e29, 0, 0);
    check_num("1.0", 1.0, 0, 0);  /* a fraction is not an exact integer, even if whole */
    CHECK_OK(parse(&doc, "-0", &e));
    CHECK(doc.root && signbit(doc.root->num));
    kmed_json_free(&doc);
    CHECK_OK(parse(&doc, "-0.0", &e));
    CHECK(doc.root && signbit(doc.root->num));
    kmed_json_free(&doc);
}

static void test_json_malformed(void)
{
    static char deep[100003];
    char *big;
    size_t i, n;
    kmed_json_doc doc;
    kmed_error e = {0};
    BAD("", "expected a value");
    BAD("   ", "end of input");
    BAD("[1, 2", "expected ',' or ']'");
    BAD("{\"a\": 1", "expected ',' or '}'");
    BAD("{\"a\" 1}", "expected ':'");
    BAD("{\"a\":}", "expected a value");
    BAD("{1: 2}", "expected a string key");
    BAD("\"abc", "unterminated string");
    BAD("\"abc\\", "unterminated string");
    BAD("[1,]", "trailing comma");
    BAD("{\"a\":1,}", "trailing comma");
    BAD("[,1]", "expected a value");
    BAD("01", "leading zero");
    BAD("-01", "leading zero");
    BAD("1.", "digit after '.'");
    BAD(".5", "expected a value");
    BAD("+1", "expected a value");
    BAD("-", "digit after '-'");
    BAD("1e", "exponent");
    BAD("1e+", "exponent");
    BAD("NaN", "expected a value");
    BAD("Infinity", "expected a value");
    BAD("tru", "misspelt");
    BAD("nul", "misspelt");
    BAD("[true false]", "expected ',' or ']'");
    BAD("{} {}", "expected end of input");
    BAD("1 2", "expected end of input");
    BAD("\"a\"x", "expected end of input");
    BAD("[1]\f", "expected end of input"); /* form feed is not JSON whitespace */
    BAD("\"tab\there\"", "control character");
    BAD("\"nl\nhere\"", "control character");
    BAD("\"\\x41\"", "invalid escape");
    BAD("\"\\u12\"", "4 hex digits");
    BAD("\"\\u12g4\"", "4 hex digits");
    BAD("\"\\ud800\"", "high surrogate");
    BAD("\"\\ud800x\"", "high surrogate");
    BAD("\"\\ud800\\u0041\"", "high surrogate");
    BAD("\"\\udc00\"", "lone low surrogate");
    BAD("\"\\udfff\\ud800\"", "lone low surrogate");
    BAD("\"\xc0\xaf\"", "overlong");                /* overlong '/' */
    BAD("\"\xc1\xbf\"", "overlong");
    BAD("\"\xe0\x80\xaf\"", "overlong");
    BAD("\"\xf0\x80\x80\xaf\"", "overlong");
    BAD("\"\xed\xa0\x80\"", "surrogate");           /* U+D800 in UTF-8 */
    BAD("\"\xed\xbf\xbf\"", "surrogate");
    BAD("\"\xf4\x90\x80\x80\"", "above U+10FFFF");
    BAD("\"\xf5\x80\x80\x80\"", "above U+10FFFF");
    BAD("\"\xff\"", "invalid UTF-8");
    BAD("\"\x80\"", "stray UTF-8 continuation");
    BAD("\"a\xbf\"", "stray UTF-8 continuation");
    BAD("\"\xe4\xb8\"", "truncated UTF-8");
    BAD("\"\xe4\"", "truncated UTF-8");
    BAD("\"\xf0\x9f\x98\"", "truncated UTF-8");
    BAD("\"\xc3\x41\"", "truncated UTF-8");
    BAD("[\xc3\xa9]", "expected a value");           /* UTF-8 outside a string */
    BAD("\0", "byte 0x00");
    /* Without a file name, a line-based message still names line and offset. */
    CHECK(kmed_json_parse(&doc, "[1,,2]", 6, NULL, 42, &e) == KMED_ERR_FORMAT && !doc.root);
    CHECKF(strcmp(e.msg, "line 42, offset 3: expected a value (found ',')") == 0 &&
           e.line == 42 && e.offset == 3, "%s", e.msg);
    kmed_json_free(&doc);
    /* Message names line and column for whole files. */
    BAD("{\n  \"a\": 1,\n  \"b\": x\n}", "line 3, column 8");

    /* A depth bomb is refused at the limit, not by a stack overflow. */
    for (i = 0; i < 100000; i++) deep[i] = '[';
    check_bad(deep, 100000, KMED_ERR_LIMIT, "KMED_MAX_JSON_DEPTH");
    /* Exactly at the limit is fine. */
    n = KMED_MAX_JSON_DEPTH;
    for (i = 0; i < n; i++) { deep[i] = '['; deep[2 * n - 1 - i] = ']'; }
    CHECK_OK(kmed_json_parse(&doc, deep, 2 * n, NULL, 0, &e));
    kmed_json_free(&doc);
    /* One deeper is refused. */
    for (i = 0; i <= n; i++) { deep[i] = '['; deep[2 * n + 1 - i] = ']'; }
    check_bad(deep, 2 * n + 2, KMED_ERR_LIMIT, "deeper");

    /* Huge string: 32 MB of escapes and UTF-8, then the same truncated before its quote. */
    n = (size_t)32 << 20;
    big = (char *)malloc(n + 2);
    CHECK(big != NULL);
    if (!big) return;
    big[0] = '"';
    for (i = 1; i + 6 <= n; i += 6) memcpy(big + i, "\\n\xea\xb0\x80" "a", 6);
    while (i < n) big[i++] = 'z';
    big[n] = '"';
    CHECK_OK(kmed_json_parse(&doc, big, n + 1, "big.json", 0, &e));
    CHECK(doc.root && doc.root->type == KMED_JSON_STRING && doc.root->len < n &&
          memcmp(doc.root->str, "\n\xea\xb0\x80" "a", 5) == 0);
    kmed_json_free(&doc);
    check_bad(big, n, KMED_ERR_FORMAT, "unterminated string");
    big[n - 5] = '\x01';
    check_bad(big, n + 1, KMED_ERR_FORMAT, "control character");
    free(big);
}

/* Every prefix of a valid document is an error, never a crash or a success. */
static void test_json_truncated(void)
{
    static const char doc_text[] = "{\"a\": [1, -2.5e+3, \"x\\u00e9\\ud83d\\ude00\xea\xb0\x80\","
                                   " true, false, null, {\"b\": []}]}";
    size_t cut;
    int fails = 0;
    for (cut = 0; cut < sizeof doc_text - 1; cut++) {
        kmed_json_doc doc;
        kmed_error e = {0};
        char *copy = (char *)malloc(cut + 1); /* exact size so ASan sees overreads */
        memcpy(copy, doc_text, cut);
        if (kmed_json_parse(&doc, copy, cut, NULL, 0, &e) != KMED_ERR_FORMAT || doc.root ||
            !strstr(e.msg, "offset")) fails++;
        kmed_json_free(&doc);
        free(copy);
    }
    CHECKF(fails == 0, "%d truncated prefixes were not rejected", fails);
}

/* Valgrind preloads its vgpreload_*.so; timing checks mean nothing under it. */
static int under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload") != NULL;
}

static void test_json_tokenizer(void)
{
    const char *fx = kmed_test_fixtures();
    char path[1200];
    char *text;
    size_t len;
    kmed_error e = {0};
    kmed_json_doc doc;
    const kmed_json *model, *vocab, *merges;
    int64_t id;
    double t0, t1, cpu;
    clock_t c0;
    if (!fx) return;
    snprintf(path, sizeof path, "%s/gemma2-tokenizer/tokenizer.json", fx);
    CHECK_OK(kmed_file_read(path, 0, &text, &len, &e));
    if (!text) return;
    c0 = clock();
    t0 = kmed_time_now();
    CHECK_OK(kmed_json_parse(&doc, text, len, path, 0, &e));
    t1 = kmed_time_now();
    cpu = (double)(clock() - c0) / CLOCKS_PER_SEC;
    printf("tokenizer.json: %zu bytes parsed in %.3f s (%.3f s CPU)\n", len, t1 - t0, cpu);
    /* The tokenizer has a 0.5 s load budget; a parse takes ~0.1 s CPU here. CPU time, not
       wall time, so a loaded machine does not make the check flaky. */
    CHECKF(TEST_SANITIZED || under_valgrind() || cpu < 0.3,
           "tokenizer.json parse took %.3f s CPU", cpu);
    model = kmed_json_get(doc.root, "model");
    vocab = kmed_json_get(model, "vocab");
    merges = kmed_json_get(model, "merges");
    CHECK(vocab && vocab->type == KMED_JSON_OBJECT && vocab->len == 256000);
    CHECK(merges && merges->type == KMED_JSON_ARRAY && merges->len == 580604);
    CHECK(strcmp(kmed_json_str(kmed_json_get(model, "type"), ""), "BPE") == 0);
    if (vocab && vocab->len == 256000) {
        CHECK(strcmp(vocab->kids[0].key, "<pad>") == 0);
        CHECK(kmed_json_int(&vocab->kids[2], &id) && id == 2 &&
              strcmp(vocab->kids[2].key, "<bos>") == 0);
        CHECK(kmed_json_int(&vocab->kids[255999], &id) && id == 255999);
    }
    if (merges && merges->len == 580604)
        CHECK(merges->kids[1].len > 0 && strchr(merges->kids[1].str, ' ') != NULL);
    kmed_json_free(&doc);
    kmed_free(text);
}

/* Writes n bytes to a fresh temp file; returns its path in out. */
static void write_tmp(char *out, size_t cap, const char *tag, const char *data, size_t n)
{
    FILE *f;
    snprintf(out, cap, "/tmp/kmed_test_io_text_%ld_%s", (long)getpid(), tag);
    f = fopen(out, "wb");
    CHECKF(f != NULL, "cannot create %s", out);
    if (!f) return;
    CHECK(fwrite(data, 1, n, f) == n);
    fclose(f);
}

static void test_lines(void)
{
    static const char text[] = "a\r\nb\n\nx\0y\nlone\rcr\nlast";
    char path[256];
    const char *s;
    size_t len, i, n;
    int eof;
    char *big;
    kmed_lines r;
    kmed_error e = {0};
    write_tmp(path, sizeof path, "lines", text, sizeof text - 1);
    CHECK_OK(kmed_lines_open(&r, path, &e));
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 1 && strcmp(s, "a") == 0 && r.line == 1);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 1 && strcmp(s, "b") == 0 && r.line == 2);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 0 && s[0] == 0 && r.line == 3);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 3 && memcmp(s, "x\0y", 4) == 0);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 7 && strcmp(s, "lone\rcr") == 0); /* only a final \r is stripped */
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 4 && strcmp(s, "last") == 0 && r.line == 6);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(eof && s == NULL && r.line == 6);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(eof);
    kmed_lines_close(&r);
    remove(path);

    /* Empty file; missing file. */
    write_tmp(path, sizeof path, "empty", "", 0);
    CHECK_OK(kmed_lines_open(&r, path, &e));
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(eof && r.line == 0);
    kmed_lines_close(&r);
    remove(path);
    CHECK(kmed_lines_open(&r, "/nonexistent/kmed.txt", &e) == KMED_ERR_NOT_FOUND &&
          strstr(e.msg, "/nonexistent/kmed.txt") != NULL);
    kmed_lines_close(&r);

    /* Lines across read chunks: a CRLF split over the 64 KiB boundary, a 3 MB line. */
    n = 65535 + 2 + 3000000 + 1 + 2;
    big = (char *)malloc(n);
    if (!big) return;
    memset(big, 'q', n);
    big[65535] = '\r';
    big[65536] = '\n';
    big[65537 + 3000000] = '\n';
    big[n - 2] = '\r'; /* a last line of just "\r" without '\n': "" */
    big[n - 1] = 'z';
    write_tmp(path, sizeof path, "chunks", big, n);
    CHECK_OK(kmed_lines_open(&r, path, &e));
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 65535 && s[65535] == 0 && s[0] == 'q' && s[65534] == 'q');
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    for (i = 0; s && i < len && s[i] == 'q'; i++) {}
    CHECK(!eof && len == 3000000 && i == len && s[len] == 0);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && len == 2 && memcmp(s, "\rz", 3) == 0 && r.line == 3);
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(eof);
    kmed_lines_close(&r);
    remove(path);
    free(big);
}

/* Read errors and NOMEM end the input: every later call returns the same error, so a loop
   that goes on after a bad line cannot spin (kmed-chat --safety-check DIR once did). */
static void test_lines_errors(void)
{
    char path[256], dir[256], first[1100];
    const char *s;
    size_t len, i, ok = 0;
    int eof, fd, saved;
    char *text;
    kmed_lines r;
    kmed_jsonl jl;
    kmed_csv c;
    kmed_error e = {0};
    kmed_result res = KMED_OK;

    /* A directory is refused when opened, naming it. */
    snprintf(dir, sizeof dir, "/tmp/kmed_test_io_text_%ld_dir", (long)getpid());
    CHECK_OK(kmed_mkdir_p(dir, &e));
    CHECKF(kmed_lines_open(&r, dir, &e) == KMED_ERR_IO && strstr(e.msg, dir) &&
           strstr(e.msg, "is a directory") && r.f == NULL, "%s", e.msg);
    CHECK(kmed_jsonl_open(&jl, dir, &e) == KMED_ERR_IO && strstr(e.msg, "is a directory"));
    CHECK(kmed_csv_open(&c, dir, &e) == KMED_ERR_IO && strstr(e.msg, "is a directory"));

    /* A read that fails mid-file: 700 lines of 100 bytes, more than the first 64 KiB read;
       after the first line the descriptor is swapped for the directory's, so the next read
       fails with EISDIR as a failing disk would fail with EIO. Then the file comes back:
       the reader must not resume past the bytes it lost. */
    text = (char *)malloc(70000);
    if (!text) return;
    for (i = 0; i < 70000; i++) text[i] = i % 100 == 99 ? '\n' : 'x';
    write_tmp(path, sizeof path, "readerr", text, 70000);
    free(text);
    CHECK_OK(kmed_lines_open(&r, path, &e));
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    fd = open(dir, O_RDONLY);
    saved = dup(fileno(r.f));
    CHECK(fd >= 0 && saved >= 0 && dup2(fd, fileno(r.f)) >= 0);
    if (fd >= 0) close(fd);
    for (ok = 1; ok < 1000; ok++) {
        res = kmed_lines_next(&r, &s, &len, &eof, &e);
        if (res != KMED_OK || eof) break;
    }
    CHECKF(res == KMED_ERR_IO && !eof && ok < 700, "%zu lines, then %s (eof %d)", ok,
           kmed_result_str(res), eof);
    CHECKF(strstr(e.msg, path) && strstr(e.msg, "read failed"), "%s", e.msg);
    snprintf(first, sizeof first, "%s", e.msg);
    if (saved >= 0) {
        CHECK(dup2(saved, fileno(r.f)) >= 0);
        close(saved);
    }
    for (i = 0; i < 3; i++) {
        memset(&e, 0, sizeof e);
        res = kmed_lines_next(&r, &s, &len, &eof, &e);
        CHECKF(res == KMED_ERR_IO && !eof && s == NULL && strcmp(e.msg, first) == 0,
               "call %zu after the error: %s, eof %d, '%s'", i, kmed_result_str(res), eof,
               e.msg);
    }
    kmed_lines_close(&r);
    remove(path);
    rmdir(dir);

    /* Out of memory for a line spanning reads: the line is lost, so the reader must not go
       on to return its tail or the next line as if nothing happened, even once memory is
       back. */
    text = (char *)malloc(70004);
    if (!text) return;
    memset(text, 'y', 70004);
    memcpy(text, "a\n", 2);
    memcpy(text + 70001, "\nc\n", 3);
    write_tmp(path, sizeof path, "nomem", text, 70004);
    free(text);
    CHECK_OK(kmed_lines_open(&r, path, &e));
    CHECK_OK(kmed_lines_next(&r, &s, &len, &eof, &e));
    CHECK(!eof && strcmp(s, "a") == 0);
    fail_realloc = 1;
    res = kmed_lines_next(&r, &s, &len, &eof, &e);
    fail_realloc = 0;
    CHECKF(res == KMED_ERR_NOMEM && strstr(e.msg, path), "%s: %s", kmed_result_str(res), e.msg);
    for (i = 0; i < 2; i++)
        CHECK(kmed_lines_next(&r, &s, &len, &eof, &e) == KMED_ERR_NOMEM && !eof && !s);
    kmed_lines_close(&r);
    remove(path);
}

/* Runs kmed-chat --safety-check ARG with stdin from in_fd (-1: as is); returns its exit
   status (-1 if killed: a loop that never stops meets the alarm or the 1 MB file size limit
   first) with stdout in out and stderr in errs. */
static int run_safety_check(int in_fd, const char *arg, char *out, char *errs, size_t cap)
{
    char base[256];
    char *argv[] = {(char *)"kmed-chat", (char *)"--safety-check", (char *)arg, NULL};
    snprintf(base, sizeof base, "/tmp/kmed_test_io_text_%ld_chat", (long)getpid());
    return kmed_test_run_tool(kmed_chat_tool_main, 3, argv, in_fd, base, out, errs, cap);
}

/* kmed-chat --safety-check goes on after a malformed line but stops at a read error:
   before, stdin it could not read made it print "read failed" lines until killed. */
static void test_chat_safety_check(void)
{
    static const char chat_lines[] = "{\"response\": \"ok\"}\nnot json\n"
                                     "{\"response\": \"fine\"}\n";
    static char out[8192], errs[8192];
    char path[256], dir[256];
    int fd, rc;
    kmed_error e = {0};
    /* a malformed line is answered with an error line and the next one is still checked */
    write_tmp(path, sizeof path, "chat.jsonl", chat_lines, sizeof chat_lines - 1);
    rc = run_safety_check(-1, path, out, errs, sizeof out);
    CHECKF(rc == 1 && strstr(out, "{\"error\": ") && strstr(out, "\"text\": \"fine\"") &&
           strstr(errs, "1 malformed input line"), "exit %d: %s%s", rc, out, errs);
    /* stdin that cannot be read (a write-only descriptor): exit 1 at once */
    fd = open(path, O_WRONLY);
    CHECK(fd >= 0);
    rc = run_safety_check(fd, "-", out, errs, sizeof out);
    CHECKF(rc == 1 && strstr(errs, "<stdin>") && strstr(errs, "read failed") && !out[0],
           "exit %d: %s%s", rc, out, errs);
    if (fd >= 0) close(fd);
    remove(path);
    /* a directory, named or as stdin, is refused when opened */
    snprintf(dir, sizeof dir, "/tmp/kmed_test_io_text_%ld_chatdir", (long)getpid());
    CHECK_OK(kmed_mkdir_p(dir, &e));
    rc = run_safety_check(-1, dir, out, errs, sizeof out);
    CHECKF(rc == 1 && strstr(errs, dir) && strstr(errs, "is a directory"), "exit %d: %s", rc,
           errs);
    fd = open(dir, O_RDONLY);
    CHECK(fd >= 0);
    rc = run_safety_check(fd, "-", out, errs, sizeof out);
    CHECKF(rc == 1 && strstr(errs, "<stdin>: is a directory"), "exit %d: %s", rc, errs);
    if (fd >= 0) close(fd);
    rmdir(dir);
}

static void test_jsonl(void)
{
    kmed_buf b = {0};
    char path[256];
    size_t i, big_len = (size_t)3 << 20; /* 5 MB of UTF-8 */
    int eof, i64ok;
    int64_t v;
    const kmed_json *j;
    kmed_jsonl r;
    kmed_error e = {0};
    kmed_buf_puts(&b, "{\"a\": 1}\n\n   \t\n{\"a\": 2\n{\"big\": \"");  /* lines 1-5 */
    for (i = 0; i < big_len; i++) kmed_buf_put(&b, i % 3 ? "x" : "\xea\xb0\x80", i % 3 ? 1 : 3);
    kmed_buf_puts(&b, "\"}\n[1,]\n{\"a\": 3}\r\n{\"a\": \"\\ud800\"}\n{\"a\": 4}"); /* 6-9 */
    CHECK(!b.failed);
    write_tmp(path, sizeof path, "x.jsonl", b.data, b.len);
    kmed_buf_free(&b);
    CHECK_OK(kmed_jsonl_open(&r, path, &e));
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    CHECK(!eof && kmed_json_num(kmed_json_get(j, "a"), 0) == 1 && r.lines.line == 1);
    CHECK(kmed_jsonl_next(&r, &j, &eof, &e) == KMED_ERR_FORMAT && j == NULL && !eof);
    CHECKF(e.line == 4 && strstr(e.msg, "x.jsonl:4: offset 7: expected ',' or '}'"), "%s", e.msg);
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    j = kmed_json_get(j, "big");
    CHECK(!eof && r.lines.line == 5 && j && j->len == big_len + 2 * ((big_len + 2) / 3));
    CHECK(kmed_jsonl_next(&r, &j, &eof, &e) == KMED_ERR_FORMAT && !eof);
    CHECKF(e.line == 6 && strstr(e.msg, ":6: offset 3: trailing comma"), "%s", e.msg);
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    i64ok = kmed_json_int(kmed_json_get(j, "a"), &v);
    CHECK(!eof && i64ok && v == 3 && r.lines.line == 7);
    CHECK(kmed_jsonl_next(&r, &j, &eof, &e) == KMED_ERR_FORMAT);
    CHECKF(e.line == 8 && strstr(e.msg, "surrogate"), "%s", e.msg);
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    CHECK(!eof && kmed_json_num(kmed_json_get(j, "a"), 0) == 4 && r.lines.line == 9);
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    CHECK(eof && j == NULL);
    kmed_jsonl_close(&r);
    remove(path);
}

/* Field i of the current row equals want (NUL-terminated, exact length). */
static int field_is(const kmed_csv *c, size_t i, const char *want)
{
    return i < c->n_cols && c->fields[i].len == strlen(want) &&
           memcmp(c->fields[i].s, want, c->fields[i].len + 1) == 0;
}

static void test_csv(void)
{
    static const char text[] =
        "\xef\xbb\xbfid,text,answer\r\n"     /* 1: header after a BOM */
        "1,plain,A\r\n"                       /* 2 */
        "2,\"quoted, with comma\",B\r\n"      /* 3 */
        "3,\"say \"\"hi\"\"\",C\r\n"          /* 4 */
        "4,\"multi\r\nline\nfield\",D\r\n"    /* 5-7: embedded CRLF and LF */
        "5,too,many,fields\r\n"               /* 8: ragged */
        "6,,\r\n"                             /* 9: empty fields */
        "7,\"\",\"\xed\x95\x9c\"\r\n"         /* 10 */
        "\r\n"                                /* 11: blank, skipped */
        "8\r\n"                               /* 12: ragged */
        "9,\"a\"b,C\r\n"                      /* 13: junk after closing quote */
        "10,5\" tube,E\r\n"                   /* 14: bare quote taken literally */
        "11,\"\n\",\"\"\"\"\n"                /* 15-16 */
        "12,last,Z";                          /* 17: no final newline */
    char path[256];
    int eof;
    kmed_csv c;
    kmed_error e = {0};
    write_tmp(path, sizeof path, "a.csv", text, sizeof text - 1);
    CHECK_OK(kmed_csv_open(&c, path, &e));
    CHECK(c.n_cols == 3 && strcmp(c.header[0], "id") == 0 && strcmp(c.header[2], "answer") == 0);
    CHECK(kmed_csv_col(&c, "text") == 1 && kmed_csv_col(&c, "id") == 0 &&
          kmed_csv_col(&c, "nope") == -1);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(!eof && field_is(&c, 0, "1") && field_is(&c, 1, "plain") && field_is(&c, 2, "A"));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 1, "quoted, with comma") && field_is(&c, 2, "B") && c.row_line == 3);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 1, "say \"hi\"") && field_is(&c, 2, "C"));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 1, "multi\r\nline\nfield") && field_is(&c, 2, "D") && c.row_line == 5);
    CHECK(kmed_csv_next(&c, &eof, &e) == KMED_ERR_FORMAT && !eof);
    CHECKF(e.line == 8 && strstr(e.msg, "a.csv:8: row has 4 fields, the header has 3"), "%s",
           e.msg);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 0, "6") && field_is(&c, 1, "") && field_is(&c, 2, ""));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 0, "7") && field_is(&c, 1, "") && field_is(&c, 2, "\xed\x95\x9c"));
    CHECK(kmed_csv_next(&c, &eof, &e) == KMED_ERR_FORMAT && !eof);
    CHECKF(e.line == 12 && strstr(e.msg, "row has 1 fields"), "%s", e.msg);
    CHECK(kmed_csv_next(&c, &eof, &e) == KMED_ERR_FORMAT && !eof);
    CHECKF(e.line == 13 && strstr(e.msg, "after closing quote"), "%s", e.msg);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 0, "10") && field_is(&c, 1, "5\" tube") && c.row_line == 14);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 1, "\n") && field_is(&c, 2, "\"") && c.row_line == 15);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(!eof && field_is(&c, 0, "12") && field_is(&c, 2, "Z") && c.row_line == 17);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(eof);
    kmed_csv_close(&c);
    remove(path);

    /* An unterminated quote at EOF is an error naming the row's first line, then EOF. */
    write_tmp(path, sizeof path, "b.csv", "q,a\n1,\"open\nmore\n", 18);
    CHECK_OK(kmed_csv_open(&c, path, &e));
    CHECK(kmed_csv_next(&c, &eof, &e) == KMED_ERR_FORMAT && !eof);
    CHECKF(e.line == 2 && strstr(e.msg, "never closed"), "%s", e.msg);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(eof);
    kmed_csv_close(&c);
    remove(path);

    /* One column: an empty line is a record with one empty field. */
    write_tmp(path, sizeof path, "c.csv", "only\nx\n\ny\n", 10);
    CHECK_OK(kmed_csv_open(&c, path, &e));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 0, "x"));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(!eof && field_is(&c, 0, "") && c.row_line == 3);
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(field_is(&c, 0, "y"));
    CHECK_OK(kmed_csv_next(&c, &eof, &e));
    CHECK(eof);
    kmed_csv_close(&c);
    remove(path);

    /* Empty file: no header. */
    write_tmp(path, sizeof path, "d.csv", "", 0);
    CHECK(kmed_csv_open(&c, path, &e) == KMED_ERR_FORMAT && strstr(e.msg, "header"));
    kmed_csv_close(&c);
    remove(path);
}

/* Over-limit lines and records are reported with their line and skipped; reading goes on. */
static void test_limits(void)
{
    size_t n = (size_t)9 << 20, i;
    char *big = (char *)malloc(n + 64);
    char path[256];
    const char *s;
    const kmed_json *j;
    size_t len;
    int eof;
    kmed_jsonl r;
    kmed_csv c;
    kmed_error e = {0};
    if (!big) return;
    memcpy(big, "{\"a\":1}\n\"", 9);
    memset(big + 9, 'x', n - 9);
    memcpy(big + n, "\"\n{\"a\":2}\n", 10);
    write_tmp(path, sizeof path, "limit.jsonl", big, n + 10);
    CHECK_OK(kmed_jsonl_open(&r, path, &e));
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    CHECK(kmed_json_num(kmed_json_get(j, "a"), 0) == 1);
    CHECK(kmed_jsonl_next(&r, &j, &eof, &e) == KMED_ERR_LIMIT && e.line == 2 && !eof);
    CHECKF(strstr(e.msg, "limit.jsonl:2: line longer than") != NULL, "%s", e.msg);
    CHECK_OK(kmed_jsonl_next(&r, &j, &eof, &e));
    CHECK(!eof && kmed_json_num(kmed_json_get(j, "a"), 0) == 2 && r.lines.line == 3);
    kmed_jsonl_close(&r);
    remove(path);

    /* A quoted CSV field growing past the limit over many short lines. */
    memcpy(big, "h1,h2\n1,\"", 9);
    for (i = 9; i < n; i++) big[i] = (i % 64) ? 'y' : '\n';
    memcpy(big + n, "\"\n2,z\n", 6);
    write_tmp(path, sizeof path, "limit.csv", big, n + 6);
    CHECK_OK(kmed_csv_open(&c, path, &e));
    CHECK(kmed_csv_next(&c, &eof, &e) == KMED_ERR_LIMIT && e.line == 2 && !eof);
    CHECKF(strstr(e.msg, "record longer than") != NULL, "%s", e.msg);
    /* The reader resynchronises at the next physical line, so the rest is best effort;
       it must reach the end without crashing. */
    for (i = 0; i < 1000000; i++) {
        kmed_result rr = kmed_csv_next(&c, &eof, &e);
        if (rr == KMED_OK && eof) break;
    }
    CHECK(eof);
    kmed_csv_close(&c);
    remove(path);
    free(big);

    /* "-" reads stdin. */
    write_tmp(path, sizeof path, "stdin.txt", "one\ntwo\n", 8);
    if (freopen(path, "rb", stdin)) {
        kmed_lines l;
        CHECK_OK(kmed_lines_open(&l, "-", &e));
        CHECK(strcmp(l.name, "<stdin>") == 0);
        CHECK_OK(kmed_lines_next(&l, &s, &len, &eof, &e));
        CHECK(!eof && strcmp(s, "one") == 0);
        CHECK_OK(kmed_lines_next(&l, &s, &len, &eof, &e));
        CHECK(!eof && strcmp(s, "two") == 0 && l.line == 2);
        CHECK_OK(kmed_lines_next(&l, &s, &len, &eof, &e));
        CHECK(eof);
        kmed_lines_close(&l);
    }
    remove(path);
}

int main(void)
{
    test_json_valid();
    test_json_strings();
    test_json_numbers();
    test_json_malformed();
    test_json_truncated();
    test_json_tokenizer();
    test_lines();
    test_lines_errors();
    test_chat_safety_check();
    test_jsonl();
    test_csv();
    test_limits();
    return kmed_test_done();
}

/* Tokenizer: every oracle case of the Gemma-2 fixture (HF tokenizers 0.22.2) id for id, decode,
   chat rendering and chat encoding; SentencePiece models against ids stored from spm_encode,
   and a chat through one whose <bos> is a CONTROL piece; hand-built vocabularies for merge
   order, tie-breaks, byte fallback, added tokens (single_word against HF) and decode of bad
   byte runs; the chat template check; malformed files; a long word to show the merge loop is
   not quadratic. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"
#include <time.h>

/* ---- helpers ---- */

static int ids_equal(const int *a, size_t na, const kmed_json *want)
{
    size_t i;
    int64_t v;
    if (!want || want->type != KMED_JSON_ARRAY || want->len != na) return 0;
    for (i = 0; i < na; i++)
        if (!kmed_json_int(&want->kids[i], &v) || v != a[i]) return 0;
    return 1;
}

/* First index where a and want differ (for messages). */
static size_t ids_diff_at(const int *a, size_t na, const kmed_json *want)
{
    size_t i;
    int64_t v;
    if (!want) return 0;
    for (i = 0; i < na && i < want->len; i++)
        if (!kmed_json_int(&want->kids[i], &v) || v != a[i]) return i;
    return i;
}

/* Encodes text into a malloc'd array (*n ids); NULL on error. */
static int *encode_all(const kmed_tok *tok, const char *text, size_t len, int no_bos, size_t *n)
{
    kmed_tok_config cfg = {0};
    kmed_error e = {0};
    size_t need = 0;
    int *ids;
    kmed_result r;
    cfg.no_bos = no_bos;
    r = kmed_tok_encode(tok, &cfg, text, len, NULL, 0, &need, &e);
    if (r != KMED_OK && r != KMED_ERR_SPACE) {
        fprintf(stderr, "encode: %s\n", e.msg);
        return NULL;
    }
    ids = (int *)malloc((need + 1) * sizeof *ids);
    r = kmed_tok_encode(tok, &cfg, text, len, ids, need, n, &e);
    if (r != KMED_OK) {
        fprintf(stderr, "encode: %s\n", e.msg);
        free(ids);
        return NULL;
    }
    return ids;
}

/* Loads a tokenizer from a string (the test's tiny vocabularies). */
static kmed_result load_str(kmed_tok *tok, const char *json, kmed_error *e)
{
    return kmed__tok_load_mem(tok, json, strlen(json), "test.json", e);
}

/* Encodes text with no special tokens and compares with want[0..nwant). */
static void check_enc(const kmed_tok *tok, const char *text, const int *want, size_t nwant,
                      const char *what)
{
    size_t n = 0, i;
    int *ids = encode_all(tok, text, strlen(text), 1, &n);
    int ok = ids && n == nwant;
    for (i = 0; ok && i < n; i++) ok = ids[i] == want[i];
    CHECKF(ok, "%s: '%s' -> %zu ids [%d %d %d ...], want %zu [%d %d %d ...]", what, text, n,
           ids && n > 0 ? ids[0] : -1, ids && n > 1 ? ids[1] : -1, ids && n > 2 ? ids[2] : -1,
           nwant, nwant > 0 ? want[0] : -1, nwant > 1 ? want[1] : -1, nwant > 2 ? want[2] : -1);
    free(ids);
}

static void check_dec(const kmed_tok *tok, const int *ids, size_t n, int skip, const char *want,
                      const char *what)
{
    kmed_buf b = {0};
    kmed_error e = {0};
    CHECK_OK(kmed_tok_decode(tok, ids, n, skip, &b, &e));
    CHECKF(b.data && strcmp(b.data, want) == 0, "%s: decoded '%s', want '%s'", what,
           b.data ? b.data : "(null)", want);
    kmed_buf_free(&b);
}

/* ---- hand-built vocabularies ---- */

/* Vocab ids: 0 <unk>, 1 a, 2 b, 3 c, 4 ab, 5 bc, 6 abc, 7 ▁, 8 <0xC3>, 9 <0xA9>, 10 aa,
   11 <s>, 12 <x>, 13 <x><y>, 14 xa, 15 aaaa, 16 x. MERGES is spliced in. */
#define TINY_HEAD                                                                            \
    "{\"version\":\"1.0\",\"added_tokens\":["                                               \
    "{\"id\":11,\"content\":\"<s>\",\"special\":true,\"normalized\":false},"                 \
    "{\"id\":12,\"content\":\"<x>\",\"special\":false,\"normalized\":false},"                \
    "{\"id\":13,\"content\":\"<x><y>\",\"special\":false,\"normalized\":false}],"            \
    "\"normalizer\":{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},"                  \
    "\"content\":\"\\u2581\"},"                                                              \
    "\"pre_tokenizer\":null,"                                                                \
    "\"post_processor\":{\"type\":\"TemplateProcessing\",\"single\":["                     \
    "{\"SpecialToken\":{\"id\":\"<s>\",\"type_id\":0}},{\"Sequence\":{\"id\":\"A\"}}],"     \
    "\"special_tokens\":{\"<s>\":{\"id\":\"<s>\",\"ids\":[11],\"tokens\":[\"<s>\"]}}},"     \
    "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"   \
    "{\"String\":\"\\u2581\"},\"content\":\" \"},{\"type\":\"ByteFallback\"},"               \
    "{\"type\":\"Fuse\"}]},"                                                                 \
    "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,"               \
    "\"byte_fallback\":%s,\"vocab\":{\"<unk>\":0,\"a\":1,\"b\":2,\"c\":3,\"ab\":4,"         \
    "\"bc\":5,\"abc\":6,\"\\u2581\":7,\"<0xC3>\":8,\"<0xA9>\":9,\"aa\":10,\"<s>\":11,"     \
    "\"<x>\":12,\"<x><y>\":13,\"xa\":14,\"aaaa\":15,\"x\":16},\"merges\":[%s]}}"

static void tiny(kmed_tok *tok, const char *byte_fallback, const char *merges)
{
    char json[4096];
    kmed_error e = {0};
    snprintf(json, sizeof json, TINY_HEAD, byte_fallback, merges);
    CHECK_OK(load_str(tok, json, &e));
}

static void test_merge_order(void)
{
    kmed_tok tok;
    {
        static const int want[] = {1, 5};   /* b+c first: a, bc (no a+bc merge) */
        tiny(&tok, "true", "\"b c\",\"a b\"");
        check_enc(&tok, "abc", want, 2, "rank 0 b c");
        kmed_tok_free(&tok);
    }
    {
        static const int want[] = {4, 3};   /* a+b first: ab, c */
        tiny(&tok, "true", "\"a b\",\"b c\"");
        check_enc(&tok, "abc", want, 2, "rank 0 a b");
        kmed_tok_free(&tok);
    }
    {
        static const int want[] = {6};      /* bc then a+bc */
        tiny(&tok, "true", "[\"b\",\"c\"],[\"a\",\"bc\"],[\"a\",\"b\"]");
        check_enc(&tok, "abc", want, 1, "array merges");
        kmed_tok_free(&tok);
    }
    {
        /* Leftmost first among equal ranks: aaa -> aa a, aaaaa -> aaaa a. */
        static const int want3[] = {10, 1}, want5[] = {15, 1}, want6[] = {15, 10};
        tiny(&tok, "true", "\"a a\",\"aa aa\"");
        check_enc(&tok, "aaa", want3, 2, "tie leftmost");
        check_enc(&tok, "aaaaa", want5, 2, "tie leftmost 5");
        check_enc(&tok, "aaaaaa", want6, 2, "tie leftmost 6");
        kmed_tok_free(&tok);
    }
}

static void test_byte_fallback(void)
{
    kmed_tok tok;
    kmed_error e = {0};
    {
        /* é = C3 A9 has byte pieces; ü = C3 BC lacks <0xBC> -> <unk>, fused with the next. */
        static const int want[] = {1, 8, 9, 1}, want2[] = {1, 0, 1};
        tiny(&tok, "true", "");
        check_enc(&tok, "a\xC3\xA9" "a", want, 4, "byte fallback");
        check_enc(&tok, "a\xC3\xBC\xC3\xBC" "a", want2, 3, "fused unk");
        kmed_tok_free(&tok);
    }
    {
        static const int want[] = {1, 0, 1};
        tiny(&tok, "false", "");
        check_enc(&tok, "a\xC3\xA9" "a", want, 3, "no byte fallback -> unk");
        kmed_tok_free(&tok);
    }
    {
        /* Invalid UTF-8 is refused: the HF reference takes only strings. */
        size_t n;
        int ids[8];
        tiny(&tok, "true", "");
        CHECK(kmed_tok_encode(&tok, NULL, "a\xC3", 2, ids, 8, &n, &e) == KMED_ERR_FORMAT);
        kmed_tok_free(&tok);
    }
}

static void test_added_tokens(void)
{
    kmed_tok tok;
    static const int w1[] = {13, 1}, w2[] = {12, 1, 12}, w3[] = {7, 11, 7}, w4[] = {14, 7, 12};
    static const int w5[] = {12, 0}, w6[] = {11, 1};
    kmed_error e = {0};
    size_t n = 0;
    int ids[4];
    tiny(&tok, "true", "\"x a\"");
    check_enc(&tok, "<x><y>a", w1, 2, "longest added");
    check_enc(&tok, "<x>a<x>", w2, 3, "added twice");
    check_enc(&tok, " <s> ", w3, 3, "special in text keeps spaces");
    /* "xa" merges only inside a segment; "<x>" is cut out first. */
    check_enc(&tok, "xa <x>", w4, 3, "segment before added");
    check_enc(&tok, "<x><y", w5, 2, "prefix of a longer token");
    /* Default config adds <s>; KMED_ERR_SPACE reports the size. */
    CHECK(kmed_tok_encode(&tok, NULL, "a", 1, ids, 1, &n, &e) == KMED_ERR_SPACE && n == 2);
    CHECK_OK(kmed_tok_encode(&tok, NULL, "a", 1, ids, 2, &n, &e));
    CHECK(n == 2 && ids[0] == w6[0] && ids[1] == w6[1]);
    {
        kmed_tok_config cfg = {0};
        cfg.max_tokens = 3;
        CHECK_OK(kmed_tok_encode(&tok, &cfg, "aaaaa", 5, ids, 4, &n, &e));
        CHECK(n == 3 && ids[0] == 11 && ids[1] == 1 && ids[2] == 1);
    }
    CHECK(kmed_tok_id(&tok, "<x><y>", 6) == 13 && kmed_tok_id(&tok, "abc", 3) == 6);
    CHECK(kmed_tok_id(&tok, "zz", 2) == -1);
    CHECK(kmed_tok_is_special(&tok, 11) && !kmed_tok_is_special(&tok, 12));
    CHECK(tok.bos_id == 11 && tok.unk_id == 0 && tok.add_bos == 1 && tok.n_vocab == 17);
    kmed_tok_free(&tok);
}

static void test_decode_bytes(void)
{
    kmed_tok tok;
    kmed_error e = {0};
    kmed_buf b = {0};
    static const int valid[] = {1, 8, 9, 7, 1};   /* a é ▁ a */
    static const int bad[] = {8, 1, 9, 8};        /* C3 | a | A9 C3 */
    static const int sp[] = {11, 12, 1};
    tiny(&tok, "true", "");
    check_dec(&tok, valid, 5, 0, "a\xC3\xA9 a", "valid run");
    /* Every byte of an invalid run becomes U+FFFD, valid bytes included (A9 C3). */
    check_dec(&tok, bad, 4, 0, "\xEF\xBF\xBD" "a\xEF\xBF\xBD\xEF\xBF\xBD", "invalid runs");
    check_dec(&tok, sp, 3, 0, "<s><x>a", "specials kept");
    check_dec(&tok, sp, 3, 1, "<x>a", "skip special drops only special");
    {
        int oob = 99;
        CHECK(kmed_tok_decode(&tok, &oob, 1, 0, &b, &e) == KMED_ERR_ARG);
    }
    kmed_buf_free(&b);
    kmed_tok_free(&tok);
}

/* single_word: a match is dropped next to a word character, HF's regex \w (letters, marks,
   digits of any script, connector punctuation such as '_'); symbols such as ▁ are not word
   characters. Expected ids from HF tokenizers 0.22.2 on the same file. */
static void test_single_word(void)
{
    static const char *json =
        "{\"added_tokens\":[{\"id\":15,\"content\":\"cd\",\"single_word\":true,"
        "\"lstrip\":true,\"rstrip\":true,\"normalized\":true,\"special\":false}],"
        "\"normalizer\":{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},"
        "\"content\":\"\\u2581\"},\"pre_tokenizer\":null,"
        "\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\",\"fuse_unk\":true,"
        "\"vocab\":{\"<unk>\":0,\"\\u2581\":1,\"a\":2,\"b\":3,\"c\":4,\"d\":5,\"_\":6,"
        "\"\\t\":7,\"\\u00e9\":8,\"x\":9,\"\\u0661\":10,\"\\u203f\":11,\"\\u2192\":12,"
        "\"\\u3001\":13,\"\\u0301\":14},\"merges\":[]}}";
    static const struct { const char *text; int n, ids[5]; } cases[] = {
        {"\tcd ab", 4, {15, 1, 2, 3}},          /* ▁ after the token is no word character */
        {"a cd b", 5, {2, 1, 15, 1, 3}},
        {"_cd", 3, {6, 4, 5}},                   /* '_' (Pc) is */
        {"cd_", 3, {4, 5, 6}},
        {"\xC3\xA9" "cd", 3, {8, 4, 5}},         /* é */
        {"cd\xCC\x81", 3, {4, 5, 14}},           /* U+0301, a mark */
        {"\xD9\xA1" "cd", 3, {10, 4, 5}},        /* U+0661, an Arabic-Indic digit */
        {"\xE2\x80\xBF" "cd", 3, {11, 4, 5}},    /* U+203F, connector punctuation */
        {"cd\xE2\x80\x8D", 3, {4, 5, 0}},        /* U+200D, Join_Control */
        {"\xE2\x86\x92" "cd", 2, {12, 15}},      /* U+2192, a symbol */
        {"cd\xE2\x86\x92", 2, {15, 12}},
        {"\xE3\x80\x81" "cd", 2, {13, 15}},      /* U+3001, punctuation */
        {"xcd", 3, {9, 4, 5}},
    };
    kmed_tok tok;
    kmed_error e = {0};
    size_t i;
    CHECK_OK(load_str(&tok, json, &e));
    for (i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_enc(&tok, cases[i].text, cases[i].ids, (size_t)cases[i].n, "single_word");
    /* The table against the Unicode classes at a few edges. */
    CHECK(kmed__tok_wordchar(0x5F) && !kmed__tok_wordchar(0x2581) && !kmed__tok_wordchar(0x20));
    CHECK(kmed__tok_wordchar(0xAC00) && kmed__tok_wordchar(0xD7A3) && !kmed__tok_wordchar(0xD7A4));
    CHECK(kmed__tok_wordchar(0x1F130) && !kmed__tok_wordchar(0x1F600)); /* squared A; emoji */
    CHECK(kmed__tok_wordchar(0xE01EF) && !kmed__tok_wordchar(0xE01F0) && !kmed__tok_wordchar(-1));
    kmed_tok_free(&tok);
}

/* a^(2^k) pieces for k = 0..10, merges doubling: a word of 2^18 'a' is 256 tokens. The
   heap keeps this O(n log n) (~0.1 s); a loop rescanning the word per merge would do ~2^35
   steps. CPU time, so other jobs on a shared machine do not count. */
static void test_long_word(void)
{
    kmed_buf j = {0};
    kmed_tok tok;
    kmed_error e = {0};
    char *text;
    size_t n = 0, i, len = (size_t)1 << 18;
    int k, *ids, ok = 1;
    double t0;
    kmed_buf_puts(&j, "{\"model\":{\"type\":\"BPE\",\"vocab\":{");
    for (k = 0; k <= 10; k++) {
        kmed_buf_printf(&j, "%s\"", k ? "," : "");
        for (i = 0; i < ((size_t)1 << k); i++) kmed_buf_put(&j, "a", 1);
        kmed_buf_printf(&j, "\":%d", k);
    }
    kmed_buf_puts(&j, "},\"merges\":[");
    for (k = 0; k < 10; k++) {
        kmed_buf_printf(&j, "%s\"", k ? "," : "");
        for (i = 0; i < ((size_t)1 << k); i++) kmed_buf_put(&j, "a", 1);
        kmed_buf_put(&j, " ", 1);
        for (i = 0; i < ((size_t)1 << k); i++) kmed_buf_put(&j, "a", 1);
        kmed_buf_put(&j, "\"", 1);
    }
    kmed_buf_puts(&j, "]}}");
    CHECK_OK(load_str(&tok, j.data, &e));
    text = (char *)malloc(len);
    memset(text, 'a', len);
    t0 = (double)clock();
    ids = encode_all(&tok, text, len, 1, &n);
    t0 = ((double)clock() - t0) / CLOCKS_PER_SEC;
    for (i = 0; ids && i < n; i++) ok &= ids[i] == 10;
    CHECKF(ids && n == 256 && ok, "long word: %zu ids", n);
    CHECKF(t0 < 3.0, "long word took %.2f s of CPU", t0);
    printf("long word: 256 KiB of 'a' as one BPE word in %.3f s CPU\n", t0);
    free(ids);
    free(text);
    kmed_buf_free(&j);
    kmed_tok_free(&tok);
}

/* A normalized added token is matched on normalised text by its normalised content. */
static void test_normalized_added(void)
{
    static const char *json =
        "{\"added_tokens\":[{\"id\":3,\"content\":\"a b\",\"special\":false,"
        "\"normalized\":true}],\"normalizer\":{\"type\":\"Replace\",\"pattern\":"
        "{\"String\":\" \"},\"content\":\"_\"},"
        "\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1,\"_\":2},\"merges\":[]}}";
    static const int want[] = {0, 3, 2, 1}, want2[] = {0, 2, 3};
    kmed_tok tok;
    kmed_error e = {0};
    CHECK_OK(load_str(&tok, json, &e));
    check_enc(&tok, "aa b b", want, 4, "normalized added token");
    /* "a_b" in the raw text normalises to the same string, so it matches too. */
    check_enc(&tok, "a a_b", want2, 3, "raw text equal to the normalised token");
    kmed_tok_free(&tok);
}

static void test_pipeline_ops(void)
{
    /* Prepend + Split(MergedWithPrevious) on ▁, Strip decoder: a Llama-like file. */
    static const char *json =
        "{\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\","
        "\"prepend\":\"\\u2581\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},"
        "\"content\":\"\\u2581\"}]},\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":"
        "{\"String\":\"\\u2581\"},\"behavior\":\"MergedWithNext\",\"invert\":false},"
        "\"decoder\":{\"type\":\"Sequence\",\"decoders\":[{\"type\":\"Replace\",\"pattern\":"
        "{\"String\":\"\\u2581\"},\"content\":\" \"},{\"type\":\"Fuse\"},{\"type\":\"Strip\","
        "\"content\":\" \",\"start\":1,\"stop\":0}]},"
        "\"model\":{\"type\":\"BPE\",\"vocab\":{\"\\u2581\":0,\"a\":1,\"\\u2581a\":2,"
        "\"a\\u2581\":3},\"merges\":[\"a \\u2581\",\"\\u2581 a\"]}}";
    /* "a a" -> ▁a▁a -> words ▁a | ▁a (the a▁ merge cannot cross the split). */
    static const int want[] = {2, 2};
    kmed_tok tok;
    kmed_error e = {0};
    CHECK_OK(load_str(&tok, json, &e));
    check_enc(&tok, "a a", want, 2, "prepend + split");
    check_dec(&tok, want, 2, 0, "a a", "strip decoder");
    kmed_tok_free(&tok);
}

static void test_malformed(void)
{
    kmed_tok tok;
    kmed_error e = {0};
    CHECK(load_str(&tok, "{\"model\": {\"type\": \"BPE\", ", &e) == KMED_ERR_FORMAT);
    CHECK(load_str(&tok, "{\"version\": \"1.0\"}", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "model") != NULL, "msg: %s", e.msg);
    CHECK(load_str(&tok, "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}", &e) ==
          KMED_ERR_UNSUPPORTED);
    CHECKF(strstr(e.msg, "Unigram") != NULL, "msg: %s", e.msg);
    CHECK(load_str(&tok, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1},"
                         "\"merges\": [\"a b\"]}}", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "merged piece") != NULL, "msg: %s", e.msg);
    CHECK(load_str(&tok, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"ab\": 1},"
                         "\"merges\": [\"a b\"]}}", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "right piece") != NULL, "msg: %s", e.msg);
    CHECK(load_str(&tok, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -4}}}", &e) ==
          KMED_ERR_FORMAT);
    CHECK(load_str(&tok, "{\"normalizer\": {\"type\": \"NFKC\"}, \"model\": {\"type\": "
                         "\"BPE\", \"vocab\": {\"a\": 0}}}", &e) == KMED_ERR_UNSUPPORTED);
    CHECK(load_str(&tok, "\x0a\x05\x0a\x03", &e) == KMED_ERR_FORMAT); /* truncated protobuf */
    /* Pieces but no trainer_spec: a file cut at a field boundary, not a UNIGRAM model. */
    CHECK(load_str(&tok, "\x0a\x03\x0a\x01" "a", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "no trainer_spec: truncated or not a SentencePiece model") != NULL,
           "msg: %s", e.msg);
    {
        /* A real model cut where its trainer_spec (field 2) begins. */
        char *data = NULL;
        size_t len = 0;
        kmed__tok_pb b;
        uint32_t field = 0, wire;
        uint64_t v;
        const unsigned char *sv;
        size_t sn, cut = 0;
        CHECK_OK(kmed_file_read("tests/data/spm/bpe_identity.model", 0, &data, &len, &e));
        b.p = b.start = (const unsigned char *)data;
        b.end = b.p + len;
        while (data && kmed__tok_pb_key(&b, &field, &wire) > 0 && field != 2) {
            kmed__tok_pb_value(&b, wire, &v, &sv, &sn);
            cut = (size_t)(b.p - b.start);
        }
        CHECK(field == 2 && cut > 0);
        CHECK(kmed__tok_load_mem(&tok, data, cut, "cut.model", &e) == KMED_ERR_FORMAT);
        CHECKF(strstr(e.msg, "no trainer_spec") != NULL, "msg: %s", e.msg);
        kmed_free(data);
    }
    CHECK(kmed_tok_load(&tok, "/nonexistent/tokenizer.json", &e) == KMED_ERR_NOT_FOUND);
    /* After an error the object is zeroed and freeing it is harmless. */
    kmed_tok_free(&tok);
}

static void test_chat_errors(void)
{
    kmed_buf b = {0};
    kmed_error e = {0};
    kmed_chat_msg sys[2] = {{"system", "x"}, {"user", "y"}};
    kmed_chat_msg two_users[2] = {{"user", "x"}, {"user", "y"}};
    kmed_chat_msg ok[2] = {{"user", "\xE3\x80\x80\xC2\xA0 hi \x1c\n"}, {"assistant", " yo "}};
    CHECK(kmed_chat_render(NULL, sys, 2, 1, &b, &e) == KMED_ERR_ARG);
    CHECKF(strstr(e.msg, "System role not supported") != NULL, "msg: %s", e.msg);
    CHECK(kmed_chat_render(NULL, two_users, 2, 1, &b, &e) == KMED_ERR_ARG);
    CHECKF(strstr(e.msg, "alternate") != NULL, "msg: %s", e.msg);
    CHECK(kmed_chat_render(NULL, ok, 0, 1, &b, &e) == KMED_ERR_ARG);
    CHECK_OK(kmed_chat_render(NULL, ok, 2, 0, &b, &e));
    CHECKF(b.data && !strcmp(b.data, "<bos><start_of_turn>user\nhi<end_of_turn>\n"
                                     "<start_of_turn>model\nyo<end_of_turn>\n"),
           "rendered '%s'", b.data ? b.data : "");
    kmed_buf_free(&b);
}

/* ---- Gemma-2 fixture ---- */

static void run_cases(const kmed_tok *tok, const char *cases, const char *label)
{
    kmed_jsonl r;
    kmed_error e = {0};
    const kmed_json *c;
    int eof = 0, n_cases = 0, bad = 0;
    if (kmed_jsonl_open(&r, cases, &e) != KMED_OK) {
        CHECKF(0, "%s", e.msg);
        return;
    }
    while (kmed_jsonl_next(&r, &c, &eof, &e) == KMED_OK && !eof) {
        const char *kind = kmed_json_str(kmed_json_get(c, "kind"), "");
        const char *id = kmed_json_str(kmed_json_get(c, "id"), "?");
        const kmed_json *text = kmed_json_get(c, "text");
        const kmed_json *want_ids = kmed_json_get(c, "ids");
        const kmed_json *want_sp = kmed_json_get(c, "ids_with_special");
        const char *dec = kmed_json_str(kmed_json_get(c, "decoded"), NULL);
        const char *dec_skip = kmed_json_str(kmed_json_get(c, "decoded_skip_special"), NULL);
        int fails = kmed_test_failed;
        int *ids = NULL, *ids_sp = NULL, *dec_ids;
        size_t n = 0, n_sp = 0, n_dec, i;
        n_cases++;
        if (!strcmp(kind, "chat")) {
            const kmed_json *msgs = kmed_json_get(c, "messages");
            kmed_chat_msg m[16];
            kmed_buf out = {0};
            size_t nm = msgs ? msgs->len : 0;
            for (i = 0; i < nm && i < 16; i++) {
                m[i].role = kmed_json_str(kmed_json_get(&msgs->kids[i], "role"), "");
                m[i].content = kmed_json_str(kmed_json_get(&msgs->kids[i], "content"), "");
            }
            CHECK_OK(kmed_chat_render(tok, m, nm, kmed_json_bool(
                                          kmed_json_get(c, "add_generation_prompt"), 0),
                                      &out, &e));
            CHECKF(out.data && text && out.len == text->len &&
                       !memcmp(out.data, text->str, out.len),
                   "%s %s: rendered chat differs", label, id);
            if (out.data) {
                /* The HF reference encoded the prompt with add_special_tokens=false. */
                int *cids = (int *)malloc((out.len + 1) * sizeof *cids);
                size_t nc = 0;
                CHECK_OK(kmed_chat_encode(tok, out.data, out.len, cids, out.len + 1, &nc, &e));
                CHECKF(ids_equal(cids, nc, want_ids), "%s %s: kmed_chat_encode differs at %zu",
                       label, id, ids_diff_at(cids, nc, want_ids));
                free(cids);
            }
            kmed_buf_free(&out);
        }
        if (text) {
            ids = encode_all(tok, text->str, text->len, 1, &n);
            ids_sp = encode_all(tok, text->str, text->len, 0, &n_sp);
            CHECKF(ids && ids_equal(ids, n, want_ids), "%s %s: ids differ at %zu (%zu ids)",
                   label, id, ids ? ids_diff_at(ids, n, want_ids) : 0, n);
            CHECKF(ids_sp && ids_equal(ids_sp, n_sp, want_sp),
                   "%s %s: ids_with_special differ", label, id);
        }
        /* Decode what the reference decoded: ids_with_special for encode cases. */
        n_dec = want_sp ? want_sp->len : want_ids ? want_ids->len : 0;
        dec_ids = (int *)malloc((n_dec + 1) * sizeof *dec_ids);
        for (i = 0; i < n_dec; i++) {
            int64_t v = -1;
            kmed_json_int(&(want_sp ? want_sp : want_ids)->kids[i], &v);
            dec_ids[i] = (int)v;
        }
        if (dec) {
            kmed_buf b = {0};
            CHECK_OK(kmed_tok_decode(tok, dec_ids, n_dec, 0, &b, &e));
            CHECKF(b.data && !strcmp(b.data, dec), "%s %s: decoded '%s'", label, id,
                   b.data ? b.data : "");
            kmed_buf_free(&b);
        }
        if (dec_skip) {
            kmed_buf b = {0};
            CHECK_OK(kmed_tok_decode(tok, dec_ids, n_dec, 1, &b, &e));
            CHECKF(b.data && !strcmp(b.data, dec_skip), "%s %s: decoded skip '%s'", label, id,
                   b.data ? b.data : "");
            kmed_buf_free(&b);
        }
        /* tokens: the pieces of the ids. */
        {
            const kmed_json *toks = kmed_json_get(c, "tokens");
            const int *src = ids ? ids : dec_ids;
            size_t ns = ids ? n : n_dec, ok = toks && toks->len == ns;
            for (i = 0; ok && i < ns; i++) {
                size_t pl;
                const char *p = kmed_tok_piece(tok, src[i], &pl);
                ok = p && pl == toks->kids[i].len && !memcmp(p, toks->kids[i].str, pl);
            }
            CHECKF(ok, "%s %s: pieces differ", label, id);
        }
        if (kmed_test_failed != fails) bad++;
        free(dec_ids);
        free(ids);
        free(ids_sp);
    }
    kmed_jsonl_close(&r);
    printf("%s: %d cases, %d with a mismatch\n", label, n_cases, bad);
    CHECK(n_cases >= 349);
}

static void test_gemma(const char *fx)
{
    char dir[1200], path[1300], cases[1300];
    kmed_tok tok;
    kmed_error e = {0};
    double t0;
    snprintf(dir, sizeof dir, "%s/gemma2-tokenizer", fx);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    snprintf(cases, sizeof cases, "%s/cases.jsonl", dir);
    t0 = kmed_time_now();
    CHECK_OK(kmed_tok_load(&tok, path, &e));
    t0 = kmed_time_now() - t0;
    if (e.code) return;
    printf("gemma2 tokenizer.json loaded in %.3f s\n", t0);
    CHECK(tok.kind == KMED_TOK_HF_BPE && kmed_tok_vocab_size(&tok) == 256000);
    CHECK(tok.bos_id == 2 && tok.eos_id == 1 && tok.pad_id == 0 && tok.unk_id == 3);
    CHECK(tok.sot_id == 106 && tok.eot_id == 107 && tok.add_bos == 1 && tok.add_eos == 0);
    CHECK(kmed_tok_id(&tok, "<start_of_turn>", 15) == 106);
    CHECK(kmed_tok_id(&tok, "\xE2\x96\x81", 3) == 235248);
    run_cases(&tok, cases, "tokenizer.json");
    kmed_tok_free(&tok);
    /* The directory: tokenizer.json + tokenizer_config.json (same flags). */
    CHECK_OK(kmed_tok_load(&tok, dir, &e));
    if (!e.code) {
        kmed_tok_config cfg = {0};
        static const char text[] = "\xEC\x95\x88\xEB\x85\x95"; /* 안녕 */
        int ids[8];
        size_t n;
        CHECK(tok.add_bos == 1 && tok.add_eos == 0 && tok.bos_id == 2);
        cfg.add_eos = 1;
        CHECK_OK(kmed_tok_encode(&tok, &cfg, text, 6, ids, 8, &n, &e));
        CHECK(n == 4 && ids[0] == 2 && ids[1] == 238179 && ids[2] == 243415 && ids[3] == 1);
        run_cases(&tok, cases, "model dir");
    }
    kmed_tok_free(&tok);
}

/* ---- SentencePiece models from Debian's spm_train, ids from spm_encode ---- */

/* Reads a whole text file into lines (pointers into *buf); returns the count. */
static size_t read_lines(const char *path, char **buf, char ***lines)
{
    kmed_error e = {0};
    size_t len = 0, n = 0, i;
    char *p;
    *lines = NULL;
    if (kmed_file_read(path, 0, buf, &len, &e) != KMED_OK) {
        CHECKF(0, "%s", e.msg);
        return 0;
    }
    for (i = 0; i < len; i++) n += (*buf)[i] == '\n';
    *lines = (char **)calloc(n + 1, sizeof **lines);
    n = 0;
    for (p = *buf; p < *buf + len;) {
        char *nl = strchr(p, '\n');
        if (!nl) nl = *buf + len;
        *nl = 0;
        (*lines)[n++] = p;
        p = nl + 1;
    }
    return n;
}

/* base.model encodes tests/data/spm/<input>.txt line by line as spm_encode did (base.<input>.ids)
   and decodes those ids as spm_decode did (base.<input>.decoded). */
static void test_spm(const char *base, const char *input)
{
    char path[256], *tb, *ib, *db, **tl, **il, **dl;
    kmed_tok tok;
    kmed_error e = {0};
    size_t nt, ni, nd, k;
    int bad = 0, bad_dec = 0;
    snprintf(path, sizeof path, "tests/data/spm/%s.model", base);
    CHECK_OK(kmed_tok_load(&tok, path, &e));
    if (e.code) return;
    CHECK(tok.kind == KMED_TOK_SPM_BPE && tok.unk_id >= 0 &&
          !strcmp(kmed_tok_piece(&tok, tok.unk_id, NULL), "<unk>"));
    snprintf(path, sizeof path, "tests/data/spm/%s.txt", input);
    nt = read_lines(path, &tb, &tl);
    snprintf(path, sizeof path, "tests/data/spm/%s.%s.ids", base, input);
    ni = read_lines(path, &ib, &il);
    snprintf(path, sizeof path, "tests/data/spm/%s.%s.decoded", base, input);
    nd = read_lines(path, &db, &dl);
    CHECKF(nt > 0 && nt == ni && nt == nd, "%s: %zu lines, %zu ids, %zu decoded", base, nt, ni,
           nd);
    for (k = 0; k < nt && k < ni && k < nd; k++) {
        int want[2048], *ids;
        size_t nw = 0, n = 0, i;
        const char *p = il[k];
        kmed_buf b = {0};
        int ok;
        while (nw < 2048) {
            char *end;
            long v = strtol(p, &end, 10);
            if (end == p) break;
            want[nw++] = (int)v;
            p = end;
        }
        ids = encode_all(&tok, tl[k], strlen(tl[k]), 1, &n);
        ok = ids && n == nw;
        for (i = 0; ok && i < n; i++) ok = ids[i] == want[i];
        if (!ok) bad++;
        CHECKF(ok, "%s %s line %zu: %zu ids, spm_encode gave %zu (first diff at %zu)", base,
               input, k + 1, n, nw, ids ? ids_diff_at(ids, n, NULL) : 0);
        if (!ok && ids) {
            fprintf(stderr, "  got: ");
            for (i = 0; i < n; i++) fprintf(stderr, "%d ", ids[i]);
            fprintf(stderr, "\n  want: %s\n", il[k]);
        }
        CHECK_OK(kmed_tok_decode(&tok, want, nw, 1, &b, &e));
        ok = b.data && !strcmp(b.data, dl[k]);
        if (!ok) bad_dec++;
        CHECKF(ok, "%s %s line %zu: decoded '%s', spm_decode gave '%s'", base, input, k + 1,
               b.data ? b.data : "", dl[k]);
        kmed_buf_free(&b);
        free(ids);
    }
    printf("%s on %s.txt: %zu lines, %d differ from spm_encode, %d from spm_decode\n", base,
           input, nt, bad, bad_dec);
    free(tb); free(ib); free(db);
    free(tl); free(il); free(dl);
    kmed_tok_free(&tok);
}

/* Ids of one line of spm_encode output; returns the count. */
static size_t parse_line_ids(const char *p, int *out, size_t cap)
{
    size_t n = 0;
    while (n < cap) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) break;
        out[n++] = (int)v;
        p = end;
    }
    return n;
}

/* A Gemma chat through bpe_chat.model, whose <bos> and <start_of_turn> are CONTROL pieces and
   <end_of_turn> a USER_DEFINED one. kmed_chat_encode must give each marker its id, as HF does
   with the tokenizer.json converted from the model (where they are added tokens), and the text
   between two markers the ids spm_encode gave that text alone (bpe_chat.chat.ids: the model
   adds no dummy prefix, and no piece holds "\n", so "\n" is always its byte piece). */
static void test_spm_chat(void)
{
    char *tb, *ib, **tl, **il, c3[256];
    int L[8][64], want[512], *ids;
    size_t nl, ni, nL[8], nw = 0, n = 0, i, k;
    kmed_tok tok;
    kmed_error e = {0};
    kmed_buf prompt = {0};
    kmed_chat_msg m[3];
    int nlid;
    CHECK_OK(kmed_tok_load(&tok, "tests/data/spm/bpe_chat.model", &e));
    if (e.code) return;
    nl = read_lines("tests/data/spm/chat.txt", &tb, &tl);
    ni = read_lines("tests/data/spm/bpe_chat.chat.ids", &ib, &il);
    CHECK(nl == 8 && ni == 8);
    if (nl != 8 || ni != 8) return;
    for (k = 0; k < 8; k++) nL[k] = parse_line_ids(il[k], L[k], 64);
    CHECK(tok.bos_id == 2 && tok.eos_id == 1 && tok.sot_id == 4 && tok.eot_id == 5);
    CHECK(kmed_tok_is_special(&tok, 2) && kmed_tok_is_special(&tok, 4) &&
          !kmed_tok_is_special(&tok, 5)); /* CONTROL, CONTROL, USER_DEFINED */
    nlid = kmed_tok_id(&tok, "<0x0A>", 6);
    CHECK(nlid >= 0);
    /* Lines of chat.txt: 1 user, 2 model, 3-4 contents, 5 and 6 around an <end_of_turn>. */
    snprintf(c3, sizeof c3, "<eos>%s<end_of_turn>%s", tl[5], tl[6]);
    m[0].role = "user";      m[0].content = tl[3];
    m[1].role = "assistant"; m[1].content = tl[4];
    m[2].role = "user";      m[2].content = c3;
    CHECK_OK(kmed_chat_render(&tok, m, 3, 1, &prompt, &e));
#define PUT(id) (want[nw++] = (id))
#define PUT_LINE(k) for (i = 0; i < nL[k]; i++) PUT(L[k][i])
    PUT(2);
    PUT(4); PUT_LINE(1); PUT(nlid); PUT_LINE(3); PUT(5); PUT(nlid);
    PUT(4); PUT_LINE(2); PUT(nlid); PUT_LINE(4); PUT(5); PUT(nlid);
    PUT(4); PUT_LINE(1); PUT(nlid); PUT(1); PUT_LINE(5); PUT(5); PUT_LINE(6); PUT(5); PUT(nlid);
    PUT(4); PUT_LINE(2); PUT(nlid);
#undef PUT_LINE
#undef PUT
    CHECK(kmed_chat_encode(&tok, prompt.data, prompt.len, NULL, 0, &n, &e) == KMED_ERR_SPACE &&
          n == nw);
    ids = (int *)malloc((n + 1) * sizeof *ids);
    CHECK_OK(kmed_chat_encode(&tok, prompt.data, prompt.len, ids, n, &n, &e));
    {
        int ok = n == nw;
        for (i = 0; ok && i < n; i++) ok = ids[i] == want[i];
        CHECKF(ok, "bpe_chat: kmed_chat_encode gave %zu ids (first %d %d), want %zu (%d %d)",
               n, n > 0 ? ids[0] : -1, n > 1 ? ids[1] : -1, nw, want[0], want[1]);
    }
    free(ids);
    /* Plain encoding keeps spm_encode's reading, where a CONTROL piece is only text. */
    ids = encode_all(&tok, prompt.data, prompt.len, 1, &n);
    CHECK(ids && n > 5 && ids[0] == kmed_tok_id(&tok, "<0x3C>", 6)); /* '<' of "<bos>" */
    free(ids);
    kmed_buf_free(&prompt);
    kmed_tok_free(&tok);
    /* A model with a dummy prefix and an nmt_nfkc map: <s> is its <bos>, the turn markers are
       USER_DEFINED; every marker is its id and no role after one gets a dummy "▁". */
    e.code = KMED_OK; /* the KMED_ERR_SPACE above */
    CHECK_OK(kmed_tok_load(&tok, "tests/data/spm/bpe_nfkc.model", &e));
    if (!e.code) {
        int n_sot = 0, n_eot = 0, after_mark = 0, sp = kmed_tok_id(&tok, "\xE2\x96\x81", 3);
        CHECK_OK(kmed_chat_render(&tok, m, 2, 1, &prompt, &e));
        CHECK(prompt.data && !strncmp(prompt.data, "<s><start_of_turn>user\n", 23));
        ids = (int *)malloc((prompt.len + 1) * sizeof *ids);
        CHECK_OK(kmed_chat_encode(&tok, prompt.data, prompt.len, ids, prompt.len + 1, &n, &e));
        for (i = 0; i < n; i++) {
            size_t plen;
            const char *p = kmed_tok_piece(&tok, ids[i], &plen);
            n_sot += ids[i] == tok.sot_id;
            n_eot += ids[i] == tok.eot_id;
            if (i && ids[i - 1] == tok.sot_id &&
                (ids[i] == sp || (p && plen >= 3 && !memcmp(p, "\xE2\x96\x81", 3))))
                after_mark++;
        }
        CHECK(n > 3 && ids[0] == tok.bos_id && ids[1] == tok.sot_id);
        CHECK(n_sot == 3 && n_eot == 2 && after_mark == 0);
        free(ids);
        kmed_buf_free(&prompt);
    }
    kmed_tok_free(&tok);
    free(tb); free(ib); free(tl); free(il);
}

/* Gemma-2's template as its tokenizer_config.json spells it (JSON "\\n", so the template
   holds a backslash and an n) is recognised; any other is not. */
static void test_chat_template(void)
{
    static const char gemma[] =
        "{\"chat_template\": \"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ "
        "raise_exception('System role not supported') }}{% endif %}{% for message in messages "
        "%}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
        "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set "
        "role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\\\n' + "
        "message['content'] | trim + '<end_of_turn>\\\\n' }}{% endfor %}{% if "
        "add_generation_prompt %}{{'<start_of_turn>model\\\\n'}}{% endif %}\"}";
    static const char chatml[] =
        "{\"chat_template\": [{\"name\": \"default\", \"template\": \"{% for m in messages "
        "%}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor "
        "%}\"}]}";
    char dir[64], path[128];
    kmed_tok tok;
    kmed_error e = {0};
    FILE *f;
    snprintf(dir, sizeof dir, "/tmp/kmed_test_tok.XXXXXX");
    if (!mkdtemp(dir)) { CHECKF(0, "mkdtemp failed"); return; }
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    tiny(&tok, "true", "");
    CHECK(tok.chat_template == NULL && kmed_chat_template_is_gemma(&tok));
    f = fopen(path, "wb");
    if (f) { fputs(gemma, f); fclose(f); }
    CHECK_OK(kmed__tok_load_config(&tok, path, &e));
    CHECK(tok.chat_template && kmed_chat_template_is_gemma(&tok));
    kmed_tok_free(&tok);
    tiny(&tok, "true", "");
    f = fopen(path, "wb");
    if (f) { fputs(chatml, f); fclose(f); }
    CHECK_OK(kmed__tok_load_config(&tok, path, &e));
    CHECK(tok.chat_template && !kmed_chat_template_is_gemma(&tok));
    kmed_tok_free(&tok);
    remove(path);
    remove(dir);
}

int main(void)
{
    const char *fx;
    test_merge_order();
    test_byte_fallback();
    test_added_tokens();
    test_decode_bytes();
    test_long_word();
    test_pipeline_ops();
    test_normalized_added();
    test_malformed();
    test_chat_errors();
    test_single_word();
    test_chat_template();
    test_spm("bpe_identity", "sentences");
    test_spm("bpe_identity", "train");
    test_spm("bpe_nfkc", "sentences");
    test_spm("bpe_nfkc", "train");
    test_spm("bpe_gemmalike", "sentences");
    test_spm("bpe_gemmalike", "train");
    test_spm("bpe_chat", "sentences");
    test_spm("bpe_chat", "train");
    test_spm("bpe_chat", "chat");
    test_spm_chat();
    fx = kmed_test_fixtures();
    if (fx) test_gemma(fx);
    return kmed_test_done();
}

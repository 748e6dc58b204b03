/* Reliability promises as tests: absurd declared sizes are rejected before anything that
   size is allocated (the allocation hooks record the largest request), every allocation
   failure is reported as KMED_ERR_NOMEM with nothing leaked (the k-th allocation fails, for
   every k, until the operation succeeds), and NaN/inf in weights, inputs or gradients stop
   training with the tensor named and nothing updated.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_reliability.c \
      -o build/test_reliability -lm -lpthread */
#define _POSIX_C_SOURCE 200809L /* before any system header: ftruncate, and kmed.h's own */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* A counting allocator behind KMED_MALLOC/REALLOC/FREE: fails call number fail_at (0 =
   never), counts live blocks and remembers the largest request. */
typedef struct rel_alloc { long calls, fail_at, live; size_t peak; } rel_alloc;
static rel_alloc rel_A; /* the test's own instrument; the library keeps no globals */
/* worker threads allocate too (kernel scratch): the counters are kept under a lock */
static pthread_mutex_t rel_lock = PTHREAD_MUTEX_INITIALIZER;
/* Counts a request of n bytes; 1 if it is the one to fail. */
static int rel_count(size_t n)
{
    int fail;
    pthread_mutex_lock(&rel_lock);
    rel_A.calls++;
    if (n > rel_A.peak) rel_A.peak = n;
    fail = rel_A.fail_at && rel_A.calls == rel_A.fail_at;
    pthread_mutex_unlock(&rel_lock);
    return fail;
}
static void rel_live(long d)
{
    pthread_mutex_lock(&rel_lock);
    rel_A.live += d;
    pthread_mutex_unlock(&rel_lock);
}
static void *rel_malloc(size_t n)
{
    void *p;
    if (rel_count(n)) return NULL;
    p = malloc(n);
    if (p) rel_live(1);
    return p;
}
static void *rel_realloc(void *p, size_t n)
{
    void *q;
    if (rel_count(n)) return NULL;
    q = realloc(p, n);
    if (q && !p) rel_live(1);
    return q;
}
static void rel_free(void *p)
{
    if (p) rel_live(-1);
    free(p);
}
#define KMED_MALLOC(n) rel_malloc(n)
#define KMED_REALLOC(p, n) rel_realloc(p, n)
#define KMED_FREE(p) rel_free(p)
/* Small line limit, so a line over it is cheap to make; the reader must skip it without
   holding more than the limit. */
#define KMED_MAX_LINE_BYTES ((size_t)1 << 20)

#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"
#include <fcntl.h>
#include <unistd.h>

/* Largest single allocation a parser may make for the small hostile inputs below. */
#define REL_SMALL_ALLOC ((size_t)1 << 20)

static char rel_dir[64];

static void rel_path(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", rel_dir, name);
}

/* ---- declared sizes ---- */

static void put_gstr(kmed_buf *b, const char *s)
{
    kmed__iob_put_u64(b, strlen(s));
    kmed_buf_puts(b, s);
}

/* A safetensors image: 8-byte length, header, then `data` bytes of zeros. */
static void st_image(kmed_buf *b, const char *header, uint64_t claimed_len, size_t data)
{
    size_t i;
    kmed__iob_put_u64(b, claimed_len ? claimed_len : strlen(header));
    kmed_buf_puts(b, header);
    for (i = 0; i < data; i++) kmed_buf_put(b, "", 1);
}

static void expect_reject_st(const char *what, kmed_buf *img)
{
    kmed_st st;
    kmed_error e;
    kmed_result r;
    memset(&e, 0, sizeof e);
    rel_A.peak = 0;
    r = kmed__st_open_mem(&st, img->data, img->len, "hostile.safetensors", &e);
    CHECKF(r != KMED_OK && e.msg[0], "%s: accepted", what);
    CHECKF(rel_A.peak < REL_SMALL_ALLOC, "%s: allocated %zu bytes before rejecting", what,
           rel_A.peak);
    if (r == KMED_OK) kmed_st_close(&st);
    printf("safetensors %-34s -> %s (largest allocation %zu B): %s\n", what,
           kmed_result_str(r), rel_A.peak, e.msg);
    kmed_buf_free(img);
}

static void expect_reject_gguf(const char *what, kmed_buf *img)
{
    kmed_gguf g;
    kmed_error e;
    kmed_result r;
    memset(&e, 0, sizeof e);
    rel_A.peak = 0;
    r = kmed__gguf_open_mem(&g, (const unsigned char *)img->data, img->len, "hostile.gguf", &e);
    CHECKF(r != KMED_OK && e.msg[0], "%s: accepted", what);
    CHECKF(rel_A.peak < REL_SMALL_ALLOC, "%s: allocated %zu bytes before rejecting", what,
           rel_A.peak);
    if (r == KMED_OK) kmed_gguf_close(&g);
    printf("gguf %-41s -> %s (largest allocation %zu B): %s\n", what, kmed_result_str(r),
           rel_A.peak, e.msg);
    kmed_buf_free(img);
}

/* GGUF v3 header for n_tensors tensors and n_kv metadata entries. */
static void gguf_head(kmed_buf *b, uint64_t n_tensors, uint64_t n_kv)
{
    kmed__iob_put_u32(b, 0x46554747u); /* "GGUF" */
    kmed__iob_put_u32(b, 3);
    kmed__iob_put_u64(b, n_tensors);
    kmed__iob_put_u64(b, n_kv);
}

static void test_declared_sizes(void)
{
    kmed_buf b = {0};
    /* safetensors */
    st_image(&b, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1048576,1048576],"
                 "\"data_offsets\":[0,4398046511104]}}", 0, 16);
    expect_reject_st("2^40-element tensor", &b);
    st_image(&b, "{\"t\":{\"dtype\":\"F32\",\"shape\":[1048576,1048576],\"data_offsets\":[0,4]}}",
             0, 4);
    expect_reject_st("2^40 elements in 4 bytes", &b);
    st_image(&b, "{\"t\":{\"dtype\":\"BF16\",\"shape\":[4294967296,4294967296,4294967296],"
                 "\"data_offsets\":[0,0]}}", 0, 0);
    expect_reject_st("shape product overflowing 64 bits", &b);
    st_image(&b, "{}", (uint64_t)1 << 40, 0);
    expect_reject_st("header length 2^40", &b);
    st_image(&b, "{}", ~(uint64_t)0, 0);
    expect_reject_st("header length 2^64-1", &b);

    /* GGUF */
    gguf_head(&b, 1, 0);
    put_gstr(&b, "t");
    kmed__iob_put_u32(&b, 2);
    kmed__iob_put_u64(&b, (uint64_t)1 << 20);
    kmed__iob_put_u64(&b, (uint64_t)1 << 20);
    kmed__iob_put_u32(&b, 0); /* F32 */
    kmed__iob_put_u64(&b, 0);
    expect_reject_gguf("2^40-element F32 tensor", &b);
    gguf_head(&b, 1, 0);
    put_gstr(&b, "t");
    kmed__iob_put_u32(&b, 3);
    kmed__iob_put_u64(&b, (uint64_t)1 << 32);
    kmed__iob_put_u64(&b, (uint64_t)1 << 32);
    kmed__iob_put_u64(&b, (uint64_t)1 << 32);
    kmed__iob_put_u32(&b, 0);
    kmed__iob_put_u64(&b, 0);
    expect_reject_gguf("2^96-element tensor (overflow)", &b);
    gguf_head(&b, 0, (uint64_t)1 << 62);
    expect_reject_gguf("2^62 metadata entries", &b);
    gguf_head(&b, (uint64_t)1 << 62, 0);
    expect_reject_gguf("2^62 tensors", &b);
    gguf_head(&b, 0, 1);
    put_gstr(&b, "tokenizer.ggml.merges");
    kmed__iob_put_u32(&b, KMED_GGUF_ARRAY);
    kmed__iob_put_u32(&b, KMED_GGUF_STRING);
    kmed__iob_put_u64(&b, 1000000000);
    put_gstr(&b, "a b");
    expect_reject_gguf("10^9-entry merges array", &b);
    gguf_head(&b, 0, 1);
    put_gstr(&b, "tokenizer.ggml.scores");
    kmed__iob_put_u32(&b, KMED_GGUF_ARRAY);
    kmed__iob_put_u32(&b, KMED_GGUF_F32);
    kmed__iob_put_u64(&b, (uint64_t)1 << 40);
    expect_reject_gguf("2^40-entry f32 array", &b);
    gguf_head(&b, 0, 1);
    put_gstr(&b, "general.name");
    kmed__iob_put_u32(&b, KMED_GGUF_STRING);
    kmed__iob_put_u64(&b, (uint64_t)1 << 30);
    kmed_buf_puts(&b, "abc");
    expect_reject_gguf("1 GB string", &b);
    gguf_head(&b, 0, 1);
    kmed__iob_put_u64(&b, (uint64_t)1 << 62); /* key length */
    kmed_buf_puts(&b, "general.name and more bytes so the count check passes");
    expect_reject_gguf("2^62-byte key", &b);

    /* SentencePiece protobuf: a piece (field 1, length-delimited) claiming 2^40 bytes */
    {
        static const unsigned char spm[] = {0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20, 0x0a,
                                            0x01, 0x61};
        kmed_tok tok;
        kmed_error e;
        kmed_result r;
        memset(&e, 0, sizeof e);
        rel_A.peak = 0;
        r = kmed__tok_load_mem(&tok, (const char *)spm, sizeof spm, "hostile.model", &e);
        CHECKF(r != KMED_OK && e.msg[0], "spm 2^40-byte piece accepted");
        CHECKF(rel_A.peak < REL_SMALL_ALLOC, "spm: allocated %zu bytes", rel_A.peak);
        printf("tokenizer.model 2^40-byte piece -> %s (largest allocation %zu B): %s\n",
               kmed_result_str(r), rel_A.peak, e.msg);
    }
    /* tokenizer.json: a merges list whose first merge names ids far past any vocab */
    {
        static const char js[] =
            "{\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":2000000000},"
            "\"merges\":[\"a b\"]}}";
        kmed_tok tok;
        kmed_error e;
        kmed_result r;
        memset(&e, 0, sizeof e);
        rel_A.peak = 0;
        r = kmed__tok_load_mem(&tok, js, sizeof js - 1, "hostile.json", &e);
        CHECKF(r != KMED_OK && e.msg[0], "tokenizer.json id 2e9 accepted");
        CHECKF(rel_A.peak < REL_SMALL_ALLOC, "tokenizer.json id 2e9: allocated %zu bytes",
               rel_A.peak);
        if (r == KMED_OK) kmed_tok_free(&tok);
        printf("tokenizer.json token id 2*10^9 -> %s (largest allocation %zu B): %s\n",
               kmed_result_str(r), rel_A.peak, e.msg);
    }
}

/* Files over a reader's size limit are refused from their size, not read in first. A
   sparse file costs no disk. */
static int rel_sparse(const char *name, off_t size)
{
    char p[256];
    int fd, ok;
    rel_path(p, sizeof p, name);
    fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return 0;
    ok = ftruncate(fd, size) == 0;
    close(fd);
    return ok;
}

static void test_file_limits(void)
{
    char p[256];
    kmed_error e;
    kmed_result r;
    double t0;
    /* a 1 GB (+1) "JSON string" as tokenizer.json: KMED_MAX_TOK_FILE_BYTES is 1 GB */
    if (rel_sparse("tokenizer.json", (off_t)KMED_MAX_TOK_FILE_BYTES + 1)) {
        kmed_tok tok;
        rel_path(p, sizeof p, "tokenizer.json");
        memset(&e, 0, sizeof e);
        rel_A.peak = 0;
        t0 = kmed_time_now();
        r = kmed_tok_load(&tok, p, &e);
        CHECKF(r == KMED_ERR_LIMIT, "1 GB tokenizer.json: %s %s", kmed_result_str(r), e.msg);
        CHECKF(rel_A.peak < REL_SMALL_ALLOC, "1 GB tokenizer.json: allocated %zu bytes before "
               "rejecting", rel_A.peak);
        printf("tokenizer.json of 1 GB + 1 -> %s in %.3f s (largest allocation %zu B)\n",
               kmed_result_str(r), kmed_time_now() - t0, rel_A.peak);
        unlink(p);
    }
    /* adapter_config.json over its 64 MB cap */
    if (rel_sparse("adapter_config.json", (off_t)65 << 20)) {
        kmed_gemma_config c;
        rel_path(p, sizeof p, "adapter_config.json");
        memset(&e, 0, sizeof e);
        rel_A.peak = 0;
        r = kmed_gemma_config_load(&c, p, &e);
        CHECKF(r != KMED_OK, "65 MB config.json accepted");
        printf("config.json of 65 MB -> %s (largest allocation %zu B): %s\n",
               kmed_result_str(r), rel_A.peak, e.msg);
        unlink(p);
    }
    /* a JSONL line over KMED_MAX_LINE_BYTES (1 MB here) is skipped with KMED_ERR_LIMIT, the
       reader holds no more than the limit and goes on with the next line */
    {
        kmed_jsonl jl;
        const kmed_json *v;
        int eof = 0, n_ok = 0, n_limit = 0, guard = 0;
        size_t big = (size_t)3 << 20, i;
        char *line = (char *)malloc(big + 64);
        FILE *f;
        rel_path(p, sizeof p, "long.jsonl");
        f = fopen(p, "wb");
        if (!line || !f) { CHECK(0); free(line); if (f) fclose(f); return; }
        fputs("{\"a\":1}\n{\"s\":\"", f);
        for (i = 0; i < big; i++) line[i] = 'x';
        fwrite(line, 1, big, f);
        fputs("\"}\n{\"a\":2}\n", f);
        fclose(f);
        free(line);
        rel_A.peak = 0;
        CHECK_OK(kmed_jsonl_open(&jl, p, &e));
        while (guard++ < 10) {
            r = kmed_jsonl_next(&jl, &v, &eof, &e);
            if (r == KMED_OK && eof) break;
            if (r == KMED_OK) n_ok++;
            else if (r == KMED_ERR_LIMIT) n_limit++;
            else CHECKF(0, "jsonl: %s", e.msg);
        }
        kmed_jsonl_close(&jl);
        CHECKF(n_ok == 2 && n_limit == 1, "long line: %d ok, %d over the limit", n_ok, n_limit);
        CHECKF(rel_A.peak <= 2 * KMED_MAX_LINE_BYTES, "long line: allocated %zu bytes",
               rel_A.peak);
        printf("JSONL line of 3 MB (limit 1 MB) -> skipped, %d good lines read, largest "
               "allocation %zu B\n", n_ok, rel_A.peak);
        unlink(p);
    }
}

/* ---- allocation failure at every point ---- */

typedef kmed_result (*rel_op)(void *ctx);

/* Runs op with allocation k failing, for k = 1, 2, ... until a run never reaches its k-th
   allocation. Each failing run must return KMED_ERR_NOMEM and free everything. */
static void rel_oom_all(const char *what, rel_op op, void *ctx)
{
    long k, bad = 0, leaks = 0, ok_after_fail = 0;
    kmed_result r = KMED_OK;
    for (k = 1; k < 200000; k++) {
        long live0 = rel_A.live;
        rel_A.calls = 0;
        rel_A.fail_at = k;
        r = op(ctx);
        rel_A.fail_at = 0;
        if (rel_A.live != live0) {
            if (!leaks++) fprintf(stderr, "FAIL %s: %ld blocks leaked when allocation %ld "
                                  "failed\n", what, rel_A.live - live0, k);
            rel_A.live = live0;
        }
        if (rel_A.calls < k) break; /* ran to the end without meeting the failure */
        if (r == KMED_OK) ok_after_fail++; /* recovered (the op checked its output) */
        else if (r != KMED_ERR_NOMEM && !bad++)
            fprintf(stderr, "FAIL %s: allocation %ld failed, got %s\n", what, k,
                    kmed_result_str(r));
    }
    CHECKF(r == KMED_OK, "%s: does not succeed without failures (%s)", what,
           kmed_result_str(r));
    CHECKF(bad == 0, "%s: %ld failure points not reported as KMED_ERR_NOMEM", what, bad);
    CHECKF(leaks == 0, "%s: leaks at %ld failure points", what, leaks);
    printf("oom %-28s %5ld allocation points: %ld NOMEM, %ld recovered, %ld wrong code, "
           "%ld leaking\n", what, k - 1, k - 1 - ok_after_fail - bad, ok_after_fail, bad, leaks);
}

typedef struct rel_bytes { char *d; size_t n; } rel_bytes;

static kmed_result op_json(void *ctx)
{
    static const char js[] = "{\"a\":[1,2.5e3,{\"b\":\"\\u00e9\\ud83d\\ude00 x\"}],\"c\":null,"
                             "\"d\":[[[]],{}],\"e\":\"long string with escapes \\n\\t\"}";
    kmed_json_doc doc;
    kmed_result r;
    (void)ctx;
    r = kmed_json_parse(&doc, js, sizeof js - 1, "x.json", 0, NULL);
    if (r == KMED_OK) CHECK(kmed_json_get(doc.root, "e") != NULL);
    kmed_json_free(&doc);
    return r;
}

static kmed_result op_st(void *ctx)
{
    rel_bytes *b = (rel_bytes *)ctx;
    kmed_st st;
    kmed_result r = kmed__st_open_mem(&st, b->d, b->n, "x.safetensors", NULL);
    if (r != KMED_OK) return r;
    CHECK(st.n_tensors == 2 && kmed_st_find(&st, "b") != NULL);
    kmed_st_close(&st);
    return r;
}

static kmed_result op_gguf(void *ctx)
{
    rel_bytes *b = (rel_bytes *)ctx;
    kmed_gguf g;
    kmed_gemma_config c;
    kmed_result r = kmed__gguf_open_mem(&g, (const unsigned char *)b->d, b->n, "x.gguf", NULL);
    if (r != KMED_OK) return r;
    r = kmed_gemma_config_from_gguf(&c, &g, NULL);
    kmed_gguf_close(&g);
    return r;
}

static kmed_result op_tok(void *ctx)
{
    rel_bytes *b = (rel_bytes *)ctx;
    kmed_tok tok;
    int ids[256];
    size_t n = 0;
    kmed_buf out = {0};
    static const char text[] = "\xea\xb3\xa0\xed\x98\x88\xec\x95\x95 hypertension 140/90 mmHg";
    kmed_result r = kmed__tok_load_mem(&tok, b->d, b->n, "x.model", NULL);
    if (r != KMED_OK) return r;
    r = kmed_tok_encode(&tok, NULL, text, sizeof text - 1, ids, 256, &n, NULL);
    if (r == KMED_OK) r = kmed_tok_decode(&tok, ids, n, 1, &out, NULL);
    if (r == KMED_OK && out.failed) r = KMED_ERR_NOMEM;
    if (r == KMED_OK) CHECK(out.len > 0);
    kmed_buf_free(&out);
    kmed_tok_free(&tok);
    return r;
}

static kmed_result op_config(void *ctx)
{
    rel_bytes *b = (rel_bytes *)ctx;
    kmed_gemma_config c;
    kmed_result r = kmed_gemma_config_parse(&c, b->d, b->n, "config.json", NULL);
    if (r == KMED_OK) CHECK(c.hidden_size == 64);
    return r;
}

static kmed_result op_csv(void *ctx)
{
    kmed_csv c;
    int eof = 0, rows = 0;
    kmed_result r = kmed_csv_open(&c, (const char *)ctx, NULL);
    if (r != KMED_OK) return r;
    /* a malformed row is reported and skipped: the reader goes on (the file has one) */
    while (((r = kmed_csv_next(&c, &eof, NULL)) == KMED_OK && !eof) || r == KMED_ERR_FORMAT)
        rows++;
    kmed_csv_close(&c);
    if (r == KMED_OK) CHECK(rows > 0);
    return r;
}

static kmed_result op_jsonl(void *ctx)
{
    kmed_jsonl j;
    const kmed_json *v;
    int eof = 0, rows = 0;
    kmed_result r = kmed_jsonl_open(&j, (const char *)ctx, NULL);
    if (r != KMED_OK) return r;
    while (((r = kmed_jsonl_next(&j, &v, &eof, NULL)) == KMED_OK && !eof) ||
           r == KMED_ERR_FORMAT)
        rows++;
    kmed_jsonl_close(&j);
    if (r == KMED_OK) CHECK(rows > 0);
    return r;
}

static kmed_result op_mcqa(void *ctx)
{
    kmed_mcqa_set set, shots;
    kmed_buf b = {0};
    kmed_result r;
    (void)ctx;
    memset(&set, 0, sizeof set);
    memset(&shots, 0, sizeof shots);
    r = kmed_mcqa_load(&set, "tests/data/mcqa/doctor_test.jsonl", NULL, NULL);
    if (r == KMED_OK) r = kmed_mcqa_load(&shots, "tests/data/mcqa/fewshot.csv", "doctor", NULL);
    if (r == KMED_OK && set.n) r = kmed_mcqa_prompt(&set.items[0], &shots, 2, 1, &b, NULL);
    if (r == KMED_OK && b.failed) r = KMED_ERR_NOMEM;
    kmed_buf_free(&b);
    kmed_mcqa_free(&set);
    kmed_mcqa_free(&shots);
    return r;
}

/* A tiny Gemma-2 over caller-owned f32 weights: V 16, C 8, F 16, L 2, H 2, Hkv 1, D 4. */
#define REL_L 2
typedef struct rel_model {
    kmed_gemma m;
    float w[REL_L][KMED_LORA_NTARGETS][16 * 16];
    float embed[16 * 8];
} rel_model;

static kmed_weight *rel_weight(kmed_gemma_layer *L, int t)
{
    switch (t) {
    case KMED_LORA_Q: return &L->q;
    case KMED_LORA_K: return &L->k;
    case KMED_LORA_V: return &L->v;
    case KMED_LORA_O: return &L->o;
    case KMED_LORA_GATE: return &L->gate;
    case KMED_LORA_UP: return &L->up;
    default: return &L->down;
    }
}

static int rel_model_init(rel_model *rm)
{
    /* q [H*D, C], k/v [Hkv*D, C], o [C, H*D], gate/up [F, C], down [C, F] */
    static const size_t rows[KMED_LORA_NTARGETS] = {8, 4, 4, 8, 16, 16, 8};
    kmed_gemma_config c;
    kmed_error e;
    kmed_rng rng;
    int l, t;
    size_t i;
    memset(&c, 0, sizeof c);
    c.vocab_size = 16; c.hidden_size = 8; c.intermediate_size = 16; c.n_layers = REL_L;
    c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 4; c.query_pre_attn_scalar = 4;
    c.rms_norm_eps = 1e-6f; c.rope_theta = 10000; c.max_position = 64; c.bos_id = 2;
    c.eos_id = 1; c.attn_softcap = 50; c.final_softcap = 30; c.sliding_window = 4;
    if (kmed_gemma_init(&rm->m, &c, &e) != KMED_OK) { CHECKF(0, "%s", e.msg); return 0; }
    kmed_rng_seed(&rng, 11);
    for (l = 0; l < REL_L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            kmed_weight *w = rel_weight(&rm->m.layers[l], t);
            for (i = 0; i < 16 * 16; i++) rm->w[l][t][i] = (float)(kmed_rng_normal(&rng) * 0.3);
            w->data = rm->w[l][t];
            w->type = KMED_F32;
            w->rows = rows[t];
            w->cols = t == KMED_LORA_DOWN ? 16 : 8;
        }
    for (i = 0; i < 16 * 8; i++) rm->embed[i] = (float)(kmed_rng_normal(&rng) * 0.5);
    rm->m.embed.data = rm->embed;
    rm->m.embed.type = KMED_F32;
    rm->m.embed.rows = 16;
    rm->m.embed.cols = 8;
    return kmed_gemma_validate(&rm->m, &e) == KMED_OK;
}

static kmed_result op_lora(void *ctx)
{
    rel_model *rm = (rel_model *)ctx;
    kmed_lora a, b;
    kmed_lora_config lc;
    char dir[256];
    kmed_result r;
    memset(&lc, 0, sizeof lc);
    lc.r = 2;
    lc.seed = 3;
    rel_path(dir, sizeof dir, "adapter");
    r = kmed_lora_create(&a, &rm->m, &lc, NULL);
    if (r != KMED_OK) return r;
    r = kmed_lora_save(&a, dir, "tiny", NULL);
    if (r == KMED_OK) r = kmed_lora_load(&b, &rm->m, dir, NULL);
    if (r == KMED_OK) {
        CHECK(!memcmp(a.ab[1][KMED_LORA_UP].A, b.ab[1][KMED_LORA_UP].A, 2 * 8 * sizeof(float)));
        kmed_lora_free(&b);
    }
    kmed_lora_free(&a);
    return r;
}

static void rel_batch(int *ids, int *labels, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        ids[i] = (int)((i * 5 + 3) % 16);
        labels[i] = i % 7 == 0 ? KMED_LABEL_IGNORE : ids[i];
    }
}

static double rel_train_loss = NAN; /* the loss of op_train's step without failures */

static kmed_result op_train(void *ctx)
{
    rel_model *rm = (rel_model *)ctx;
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_train_ckpt ck, got;
    int ids[2 * 6], labels[2 * 6];
    double loss;
    char path[256];
    kmed_result r;
    memset(&lc, 0, sizeof lc);
    memset(&tc, 0, sizeof tc);
    memset(&ck, 0, sizeof ck);
    lc.r = 2;
    lc.targets = (1u << KMED_LORA_Q) | (1u << KMED_LORA_DOWN);
    tc.max_batch = 2;
    tc.max_seq = 6;
    tc.optim.lr = 1e-2f;
    rel_batch(ids, labels, 12);
    rel_path(path, sizeof path, "ckpt.safetensors");
    r = kmed_lora_create(&lora, &rm->m, &lc, NULL);
    if (r != KMED_OK) return r;
    r = kmed_train_create(&tr, &rm->m, &lora, &tc, NULL, NULL);
    if (r == KMED_OK) r = kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, NULL);
    /* a step that survives a failed allocation (a kernel without its scratch) must still
       give the same loss bit for bit: no silent change of numbers */
    if (r == KMED_OK && rel_train_loss == rel_train_loss &&
        memcmp(&loss, &rel_train_loss, sizeof loss) != 0) {
        CHECKF(0, "train step after a failed allocation: loss %.17g, without failures %.17g",
               loss, rel_train_loss);
    }
    if (r == KMED_OK && rel_train_loss != rel_train_loss) rel_train_loss = loss;
    if (r == KMED_OK) r = kmed_train_ckpt_save(tr, path, &ck, NULL);
    if (r == KMED_OK) {
        r = kmed_train_ckpt_load(tr, path, &got, NULL);
        if (r == KMED_OK) kmed_train_ckpt_free(&got);
    }
    kmed_train_free(tr);
    kmed_lora_free(&lora);
    return r;
}

static kmed_result op_gemma_load(void *ctx)
{
    kmed_gemma m;
    kmed_result r = kmed_gemma_load(&m, (const char *)ctx, NULL, NULL);
    kmed_gemma_free(&m);
    return r;
}

static void test_oom(rel_model *rm)
{
    kmed_error e;
    rel_bytes st = {0}, gg = {0}, spm = {0}, cfg = {0};
    char p[1100];
    const char *fx = kmed_test_fixtures();
    /* inputs are made and read with the allocator working */
    {
        static const float fa[4] = {1, 2, 3, 4};
        static const uint16_t hb[2] = {0x3f80, 0x4000};
        kmed_tensor_info ti[2];
        memset(ti, 0, sizeof ti);
        ti[0].name = "a"; ti[0].dtype = KMED_F32; ti[0].ndim = 2; ti[0].shape[0] = 2;
        ti[0].shape[1] = 2; ti[0].data = fa; ti[0].nbytes = sizeof fa;
        ti[1].name = "b"; ti[1].dtype = KMED_BF16; ti[1].ndim = 1; ti[1].shape[0] = 2;
        ti[1].data = hb; ti[1].nbytes = sizeof hb;
        rel_path(p, sizeof p, "x.safetensors");
        CHECK_OK(kmed_st_write(p, ti, 2, NULL, NULL, 0, &e));
        CHECK_OK(kmed_file_read(p, 0, &st.d, &st.n, &e));
    }
    CHECK_OK(kmed_file_read("tests/fuzz/corpus/gguf/mini-gemma2.gguf", 0, &gg.d, &gg.n, &e));
    CHECK_OK(kmed_file_read("tests/data/spm/bpe_gemmalike.model", 0, &spm.d, &spm.n, &e));
    CHECK_OK(kmed_file_read("tests/data/data/config.json", 0, &cfg.d, &cfg.n, &e));
    if (cfg.d && !strstr(cfg.d, "\"hidden_size\": 64")) {
        /* the data module's config.json is not a model config: use the fixture's text */
        static const char c64[] = "{\"model_type\":\"gemma2\",\"vocab_size\":256000,"
            "\"hidden_size\":64,\"intermediate_size\":128,\"num_hidden_layers\":2,"
            "\"num_attention_heads\":4,\"num_key_value_heads\":2,\"head_dim\":16,"
            "\"eos_token_id\":[1,107],\"sliding_window\":null}";
        kmed_free(cfg.d);
        cfg.d = kmed__strndup(c64, sizeof c64 - 1);
        cfg.n = sizeof c64 - 1;
    }
    rel_oom_all("json parse", op_json, NULL);
    if (st.d) rel_oom_all("safetensors open", op_st, &st);
    if (gg.d) rel_oom_all("gguf open + config", op_gguf, &gg);
    if (spm.d) rel_oom_all("tokenizer.model load+encode", op_tok, &spm);
    if (cfg.d) rel_oom_all("config.json parse", op_config, &cfg);
    rel_oom_all("csv read", op_csv, (void *)"tests/data/data/kormedmcqa_nurse_test.csv");
    rel_oom_all("jsonl read", op_jsonl, (void *)"tests/data/data/ultramedical.jsonl");
    rel_oom_all("mcqa load + prompt", op_mcqa, NULL);
    rel_oom_all("lora create/save/load", op_lora, rm);
    CHECK(op_train(rm) == KMED_OK); /* the reference loss */
    rel_oom_all("train step + checkpoint", op_train, rm);
    if (fx) {
        snprintf(p, sizeof p, "%s/tiny-gemma2", fx);
        rel_oom_all("gemma load (tiny fixture)", op_gemma_load, p);
    }
    kmed_free(st.d);
    kmed_free(gg.d);
    kmed_free(spm.d);
    kmed_free(cfg.d);
}

/* ---- NaN / inf guards in training ---- */

static void test_numeric(rel_model *rm)
{
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_param *ps;
    kmed_error e;
    int ids[2 * 6], labels[2 * 6];
    double loss;
    size_t np, i;
    float keep, *snap;
    long step0;
    memset(&lc, 0, sizeof lc);
    memset(&tc, 0, sizeof tc);
    lc.r = 2;
    lc.seed = 5;
    tc.max_batch = 2;
    tc.max_seq = 6;
    tc.optim.lr = 1e-2f;
    rel_batch(ids, labels, 12);
    CHECK_OK(kmed_lora_create(&lora, &rm->m, &lc, &e));
    CHECK_OK(kmed_train_create(&tr, &rm->m, &lora, &tc, NULL, &e));
    if (!tr) return;
    CHECK_OK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e));
    CHECK(isfinite(loss) && loss > 0);
    np = kmed_train_params(tr, &ps);
    CHECK(np == 2 * KMED_LORA_NTARGETS * REL_L);

    /* a gradient element set to inf (as an overflowing backward would leave it) */
    CHECK_OK(kmed_train_grads(tr, ids, labels, 1, 2, 6, &loss, &e));
    ps[np / 2].g[3] = INFINITY;
    CHECK(kmed_train_check_grads(tr, &e) == KMED_ERR_NUMERIC);
    CHECKF(strstr(e.msg, ps[np / 2].name) != NULL, "gradient message does not name %s: %s",
           ps[np / 2].name, e.msg);
    printf("inf gradient       -> %s\n", e.msg);

    /* snapshot all trainable values: a failed step must leave them as they are */
    {
        size_t tot = 0, off = 0;
        for (i = 0; i < np; i++) tot += ps[i].n;
        snap = (float *)malloc(tot * sizeof(float));
        if (!snap) { CHECK(0); kmed_train_free(tr); kmed_lora_free(&lora); return; }
        for (i = 0; i < np; i++) {
            memcpy(snap + off, ps[i].p, ps[i].n * sizeof(float));
            off += ps[i].n;
        }
    }
#define REL_UNCHANGED(what)                                                              \
    do {                                                                                 \
        size_t off_ = 0, j_;                                                             \
        int same_ = 1;                                                                   \
        for (j_ = 0; j_ < np; j_++) {                                                    \
            same_ &= !memcmp(snap + off_, ps[j_].p, ps[j_].n * sizeof(float));           \
            off_ += ps[j_].n;                                                            \
        }                                                                                \
        CHECKF(same_ && kmed_train_step_count(tr) == step0, "%s: parameters updated", what); \
    } while (0)

    /* NaN in a trainable weight (LoRA B of layer 1 v_proj) */
    step0 = kmed_train_step_count(tr);
    {
        kmed_param *q = NULL;
        for (i = 0; i < np; i++)
            if (ps[i].p == lora.ab[1][KMED_LORA_V].B) q = &ps[i];
        CHECK(q != NULL);
        if (q) {
            keep = q->p[1];
            q->p[1] = NAN;
            snap[0] = snap[0]; /* snapshot taken before: the NaN itself is the only change */
            CHECK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e) == KMED_ERR_NUMERIC);
            CHECKF(strstr(e.msg, q->name) != NULL, "NaN weight: message does not name %s: %s",
                   q->name, e.msg);
            CHECK(kmed_train_step_count(tr) == step0);
            printf("NaN LoRA weight    -> %s\n", e.msg);
            q->p[1] = keep;
        }
    }
    REL_UNCHANGED("NaN LoRA weight");

    /* inf in a frozen base weight (layer 0 gate_proj) */
    keep = rm->w[0][KMED_LORA_GATE][5];
    rm->w[0][KMED_LORA_GATE][5] = INFINITY;
    CHECK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e) == KMED_ERR_NUMERIC);
    CHECKF(strstr(e.msg, "gate_proj") != NULL && strstr(e.msg, "0") != NULL,
           "inf base weight: message does not name layer 0 gate_proj: %s", e.msg);
    printf("inf base weight    -> %s\n", e.msg);
    rm->w[0][KMED_LORA_GATE][5] = keep;
    REL_UNCHANGED("inf base weight");

    /* NaN in the embedding row of an input token */
    keep = rm->embed[ids[4] * 8 + 2];
    rm->embed[ids[4] * 8 + 2] = NAN;
    CHECK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e) == KMED_ERR_NUMERIC);
    CHECKF(strstr(e.msg, "embed") != NULL, "NaN embedding: message does not name the "
           "embedding: %s", e.msg);
    printf("NaN embedding row  -> %s\n", e.msg);
    rm->embed[ids[4] * 8 + 2] = keep;
    REL_UNCHANGED("NaN embedding");

    /* inputs: a token id outside the vocabulary is refused, naming where it is */
    ids[7] = 16;
    CHECK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e) == KMED_ERR_ARG);
    CHECKF(strstr(e.msg, "16") != NULL, "bad id message: %s", e.msg);
    printf("token id 16 of 16  -> %s\n", e.msg);
    ids[7] = 3;
    REL_UNCHANGED("bad input id");

    /* and after all that the same step still runs */
    CHECK_OK(kmed_train_step(tr, ids, labels, 1, 2, 6, &loss, &e));
    CHECK(isfinite(loss) && kmed_train_step_count(tr) == step0 + 1);
#undef REL_UNCHANGED
    free(snap);
    kmed_train_free(tr);
    kmed_lora_free(&lora);
}

/* ---- threads: a training step on 1 and 3 threads gives the same bits ----
   (also the cheap target for ThreadSanitizer: tests/sanitize.sh runs this file under
   -fsanitize=thread, where any data race in the pool, kernels or step is reported) */

/* Three steps from a fresh adapter (or full copy); the trained values go to out. */
static void rel_train_threads(rel_model *rm, int threads, int full, float *out, size_t cap,
                              double *loss)
{
    kmed_pool *pool = NULL;
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_param *ps;
    kmed_error e;
    int ids[2 * 2 * 6], labels[2 * 2 * 6], s;
    size_t np, i, off = 0;
    memset(&lc, 0, sizeof lc);
    memset(&tc, 0, sizeof tc);
    memset(&lora, 0, sizeof lora);
    lc.r = 2;
    lc.seed = 9;
    tc.full = full;
    tc.max_batch = 2;
    tc.max_seq = 6;
    tc.head_rows = 4; /* several head blocks, so the blocked LM head is exercised too */
    tc.optim.lr = 1e-2f;
    tc.optim.clip = 1.0f;
    rel_batch(ids, labels, 24);
    CHECK_OK(kmed_pool_create(&pool, threads, &e));
    if (!full) CHECK_OK(kmed_lora_create(&lora, &rm->m, &lc, &e));
    CHECK_OK(kmed_train_create(&tr, &rm->m, full ? NULL : &lora, &tc, pool, &e));
    if (tr) {
        for (s = 0; s < 3; s++) CHECK_OK(kmed_train_step(tr, ids, labels, 2, 2, 6, loss, &e));
        np = kmed_train_params(tr, &ps);
        for (i = 0; i < np && off + ps[i].n <= cap; i++) {
            memcpy(out + off, ps[i].p, ps[i].n * sizeof(float));
            off += ps[i].n;
        }
        CHECK(i == np);
    }
    kmed_train_free(tr);
    if (!full) kmed_lora_free(&lora);
    kmed_pool_free(pool);
}

static void test_threads(rel_model *rm)
{
    size_t cap = 16384;
    float *a = (float *)calloc(cap, sizeof(float)), *b = (float *)calloc(cap, sizeof(float));
    double la = 0, lb = 0;
    int full;
    if (!a || !b) { CHECK(0); free(a); free(b); return; }
    for (full = 0; full < 2; full++) {
        memset(a, 0, cap * sizeof(float));
        memset(b, 0, cap * sizeof(float));
        rel_train_threads(rm, 1, full, a, cap, &la);
        rel_train_threads(rm, 3, full, b, cap, &lb);
        CHECKF(memcmp(a, b, cap * sizeof(float)) == 0 && la == lb, "%s training: 1 and 3 "
               "threads differ (loss %.9g vs %.9g)", full ? "full" : "LoRA", la, lb);
        printf("%s training, 3 steps: 1 and 3 threads give identical parameters (loss %.6f)\n",
               full ? "full" : "LoRA", la);
    }
    free(a);
    free(b);
}

int main(void)
{
    rel_model *rm = (rel_model *)calloc(1, sizeof *rm);
    long live0;
    snprintf(rel_dir, sizeof rel_dir, "/tmp/kmed_test_reliability_%ld", (long)getpid());
    if (!rm || kmed_mkdir_p(rel_dir, NULL) != KMED_OK) {
        CHECK(0);
        return kmed_test_done();
    }
    live0 = rel_A.live;
    test_declared_sizes();
    test_file_limits();
    if (rel_model_init(rm)) {
        test_oom(rm);
        test_numeric(rm);
        test_threads(rm);
        kmed_gemma_free(&rm->m);
    }
    CHECKF(rel_A.live == live0, "%ld blocks still live at the end", rel_A.live - live0);
    free(rm);
    {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf %s", rel_dir);
        if (system(cmd) != 0) fprintf(stderr, "note: could not remove %s\n", rel_dir);
    }
    return kmed_test_done();
}

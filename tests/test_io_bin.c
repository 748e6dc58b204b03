/* Tests for safetensors and GGUF reading/writing: the fixture files, round trips with
   every dtype and metadata type, and malformed inputs (each must fail cleanly).
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_io_bin.c -o build/test_io_bin \
      -lm -lpthread
   Also run under -fsanitize=address,undefined. */
#define _POSIX_C_SOURCE 200809L /* before any system header, as kmed.h would set it */
#include <stdlib.h>

/* Allocation hooks that can fail the N-th call, to test every out-of-memory path. */
static long alloc_fail_at = -1, alloc_count = 0;
static void *test_malloc(size_t n)
{
    if (alloc_fail_at >= 0 && alloc_count++ == alloc_fail_at) return NULL;
    return malloc(n);
}
static void *test_realloc(void *p, size_t n)
{
    if (alloc_fail_at >= 0 && alloc_count++ == alloc_fail_at) return NULL;
    return realloc(p, n);
}
#define KMED_MALLOC(n) test_malloc(n)
#define KMED_REALLOC(p, n) test_realloc(p, n)
#define KMED_FREE(p) free(p)

#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

/* kmed-inspect itself, its main renamed, so test_inspect_cli runs it as a user does (it
   defines KMED_IMPLEMENTATION again and includes kmed.h, already in) */
#define main kmed_inspect_tool_main
#include "../tools/kmed-inspect.c"
#undef main

#include "run_tool.h"
#include <sys/stat.h>
#include <unistd.h>

static char tmpdir[256];
static kmed_result rc; /* result of the last CHECK_OK(rc = ...) */

static const char *tmp_path(char *out, size_t cap, const char *name)
{
    snprintf(out, cap, "%s/%s", tmpdir, name);
    return out;
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

static void write_bytes(const char *path, const void *d, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) { fprintf(stderr, "cannot write %s\n", path); exit(1); }
    if (n) fwrite(d, 1, n, f);
    fclose(f);
}

/* Little-endian byte builders for hand-made files. */
static void b_u32(kmed_buf *b, uint32_t v) { kmed__iob_put_u32(b, v); }
static void b_u64(kmed_buf *b, uint64_t v) { kmed__iob_put_u64(b, v); }
static void b_str(kmed_buf *b, const char *s) { b_u64(b, strlen(s)); kmed_buf_puts(b, s); }

static uint16_t bf16_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static float f32_of_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---------------------------------------------------------------- dtype helpers */

static void test_dtypes(void)
{
    int t;
    kmed_tensor_info ti;
    for (t = 0; t < (int)KMED_DTYPE_UNKNOWN; t++) {
        const char *n = kmed_dtype_name((kmed_dtype)t);
        char lower[16];
        size_t i;
        CHECKF(kmed_dtype_parse(n) == (kmed_dtype)t, "parse(%s)", n);
        for (i = 0; n[i] && i < sizeof lower - 1; i++)
            lower[i] = (char)(n[i] >= 'A' && n[i] <= 'Z' ? n[i] - 'A' + 'a' : n[i]);
        lower[i] = 0;
        CHECKF(kmed_dtype_parse(lower) == (kmed_dtype)t, "parse(%s)", lower);
    }
    CHECK(kmed_dtype_parse("Q4_K") == KMED_DTYPE_UNKNOWN);
    CHECK(kmed_dtype_parse("") == KMED_DTYPE_UNKNOWN);
    CHECK(kmed_dtype_parse("F3") == KMED_DTYPE_UNKNOWN);
    CHECK(strcmp(kmed_dtype_name(KMED_DTYPE_UNKNOWN), "UNKNOWN") == 0);
    CHECK(kmed_dtype_bytes(KMED_F32, 10) == 40);
    CHECK(kmed_dtype_bytes(KMED_BF16, 10) == 20);
    CHECK(kmed_dtype_bytes(KMED_F64, 3) == 24);
    CHECK(kmed_dtype_bytes(KMED_BOOL, 3) == 3);
    CHECK(kmed_dtype_bytes(KMED_Q8_0, 64) == 68);
    CHECK(kmed_dtype_bytes(KMED_Q4_0, 64) == 36);
    CHECK(kmed_dtype_bytes(KMED_Q4_0, 33) == 0);
    CHECK(kmed_dtype_bytes(KMED_DTYPE_UNKNOWN, 32) == 0);
    CHECK(kmed_dtype_bytes(KMED_I64, UINT64_MAX / 4) == 0); /* overflow */
    memset(&ti, 0, sizeof ti);
    CHECK(kmed_tensor_numel(&ti) == 1); /* a scalar */
    ti.ndim = 3; ti.shape[0] = 2; ti.shape[1] = 3; ti.shape[2] = 5;
    CHECK(kmed_tensor_numel(&ti) == 30);
    ti.shape[0] = (uint64_t)1 << 40; ti.shape[1] = (uint64_t)1 << 40;
    CHECK(kmed_tensor_numel(&ti) == UINT64_MAX);
    ti.shape[2] = 0; /* empty, though the other dimensions overflow (GGUF fuzz find) */
    CHECK(kmed_tensor_numel(&ti) == 0);
    CHECK(strcmp(kmed_ggml_type_name(12), "Q4_K") == 0);
    CHECK(strcmp(kmed_ggml_type_name(8), "Q8_0") == 0);
    CHECK(strcmp(kmed_ggml_type_name(30), "BF16") == 0);
    CHECK(strcmp(kmed_ggml_type_name(1000), "unknown") == 0);
    CHECK(strcmp(kmed_ggml_type_name(-1), "unknown") == 0);
}

/* ---------------------------------------------------------------- fixtures */

/* Reads n bytes of a file at off, to check that mapped tensor data is the stored data. */
static int read_at(const char *path, size_t off, void *out, size_t n)
{
    FILE *f = fopen(path, "rb");
    int ok;
    if (!f) return 0;
    ok = fseek(f, (long)off, SEEK_SET) == 0 && fread(out, 1, n, f) == n;
    fclose(f);
    return ok;
}

static uint64_t st_header_len(const char *path)
{
    unsigned char b[8];
    if (!read_at(path, 0, b, 8)) return 0;
    return kmed__iob_u64(b);
}

static void test_fixture_hf(const char *fx)
{
    char dir[1100], shard2[1200], index[1200];
    kmed_st st;
    kmed_error e = {0};
    const kmed_tensor_info *t;
    kmed_json_doc doc = {0};
    char *text = NULL;
    size_t len = 0, i;
    snprintf(dir, sizeof dir, "%s/tiny-gemma2", fx);
    snprintf(shard2, sizeof shard2, "%s/model-00002-of-00002.safetensors", dir);
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    CHECK_OK(rc = kmed_st_open(&st, dir, &e));
    if (rc != KMED_OK) return;
    CHECKF(st.n_tensors == 24, "n_tensors %zu", st.n_tensors);
    CHECK(st.n_meta == 1 && strcmp(st.meta_keys[0], "format") == 0 &&
          strcmp(st.meta_vals[0], "pt") == 0);
    t = kmed_st_find(&st, "model.embed_tokens.weight");
    CHECK(t && t->dtype == KMED_BF16 && t->ndim == 2 && t->shape[0] == 256000 &&
          t->shape[1] == 64 && t->nbytes == 32768000 && t->ggml_type == -1);
    t = kmed_st_find(&st, "model.layers.1.self_attn.k_proj.weight");
    CHECK(t && t->dtype == KMED_BF16 && t->shape[0] == 32 && t->shape[1] == 64);
    t = kmed_st_find(&st, "model.layers.0.mlp.down_proj.weight");
    CHECK(t && t->shape[0] == 64 && t->shape[1] == 128);
    CHECK(kmed_st_find(&st, "lm_head.weight") == NULL);
    CHECK(kmed_st_find(&st, "") == NULL);
    CHECK(strcmp(kmed_st_dtype_str(&st, 0), "BF16") == 0);
    CHECK(kmed_st_dtype_str(&st, 24) == NULL);
    /* Order: shard by shard, in file order (the fixture stores names sorted). */
    CHECK(strcmp(st.tensors[0].name, "model.embed_tokens.weight") == 0);
    CHECK(strcmp(st.tensors[23].name, "model.norm.weight") == 0);
    for (i = 1; i < 12; i++)
        CHECKF(strcmp(st.tensors[i - 1].name, st.tensors[i].name) < 0, "order at %zu", i);
    /* Every weight_map entry is found, and the byte total matches metadata.total_size. */
    if (kmed_file_read(index, 0, &text, &len, &e) == KMED_OK &&
        kmed_json_parse(&doc, text, len, index, 1, &e) == KMED_OK) {
        const kmed_json *wm = kmed_json_get(doc.root, "weight_map");
        int64_t total = 0;
        size_t sum = 0;
        CHECK(wm && wm->len == 24);
        for (i = 0; wm && i < wm->len; i++)
            CHECKF(kmed_st_find(&st, wm->kids[i].key) != NULL, "%s", wm->kids[i].key);
        for (i = 0; i < st.n_tensors; i++) sum += st.tensors[i].nbytes;
        CHECK(kmed_json_int(kmed_json_get(kmed_json_get(doc.root, "metadata"), "total_size"),
                            &total) && (size_t)total == sum);
    }
    kmed_json_free(&doc);
    kmed_free(text);
    /* Mapped bytes are the stored bytes: model.norm.weight read from shard 2 by hand. */
    t = kmed_st_find(&st, "model.norm.weight");
    if (t) {
        uint64_t hl = st_header_len(shard2);
        unsigned char buf[128];
        /* norm is the last tensor of shard 2: it ends at the file end */
        struct stat sb;
        stat(shard2, &sb);
        CHECK(t->nbytes == 128);
        CHECK(read_at(shard2, (size_t)sb.st_size - 128, buf, 128) &&
              memcmp(buf, t->data, 128) == 0);
        CHECK(hl == 1248);
    }
    kmed_st_close(&st);
    CHECK(st.tensors == NULL && st.n_tensors == 0);
}

static void test_fixture_golden(const char *fx)
{
    static const char *const lora_files[] = {
        "tiny-gemma2/golden/lora_grads.safetensors", "tiny-gemma2/golden/lora_step1.safetensors",
        "tiny-gemma2/golden/lora_step2.safetensors", "tiny-gemma2/golden/lora_step3.safetensors",
        "tiny-gemma2/golden/lora_init/adapter_model.safetensors", "tiny-gemma2/golden/lora_init"
    };
    char path[1200];
    kmed_st st, st2;
    kmed_error e = {0};
    const kmed_tensor_info *t;
    size_t i, k;
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/forward.safetensors", fx);
    CHECK_OK(rc = kmed_st_open(&st, path, &e));
    if (rc == KMED_OK) {
        CHECKF(st.n_tensors == 13, "forward n %zu", st.n_tensors);
        t = kmed_st_find(&st, "hidden_states");
        CHECK(t && t->dtype == KMED_F32 && t->ndim == 3 && t->shape[0] == 3 &&
              t->shape[1] == 40 && t->shape[2] == 64);
        t = kmed_st_find(&st, "input_ids");
        CHECK(t && t->dtype == KMED_I32 && t->ndim == 1 && t->shape[0] == 40);
        if (t) {
            int32_t id0;
            memcpy(&id0, t->data, 4);
            CHECKF(id0 == 2, "first input id %d, expected <bos> = 2", (int)id0);
        }
        t = kmed_st_find(&st, "logits_first1024");
        CHECK(t && t->shape[0] == 40 && t->shape[1] == 1024 && t->nbytes == 40 * 1024 * 4);
        t = kmed_st_find(&st, "next_token_ids");
        CHECK(t && t->shape[0] == 39 && t->dtype == KMED_I32);
        CHECK(st.n_meta == 0);
        kmed_st_close(&st);
    }
    for (k = 0; k < sizeof lora_files / sizeof lora_files[0]; k++) {
        snprintf(path, sizeof path, "%s/%s", fx, lora_files[k]);
        CHECK_OK(rc = kmed_st_open(&st, path, &e));
        if (rc != KMED_OK) continue;
        CHECKF(st.n_tensors == 28, "%s: n %zu", path, st.n_tensors);
        for (i = 0; i < st.n_tensors; i++) {
            const kmed_tensor_info *x = &st.tensors[i];
            int is_a = strstr(x->name, "lora_A") != NULL;
            CHECKF(x->dtype == KMED_F32 && x->ndim == 2 &&
                   (is_a ? x->shape[0] == 4 : x->shape[1] == 4), "%s", x->name);
        }
        t = kmed_st_find(&st, "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight");
        CHECK(t && t->shape[0] == 64 && t->shape[1] == 4);
        kmed_st_close(&st);
    }
    /* A directory with a single .safetensors equals the file itself. */
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_init", fx);
    if (kmed_st_open(&st, path, &e) == KMED_OK) {
        snprintf(path, sizeof path, "%s/tiny-gemma2/golden/lora_init/adapter_model.safetensors",
                 fx);
        CHECK_OK(rc = kmed_st_open(&st2, path, &e));
        if (rc == KMED_OK) {
            CHECK(st.n_tensors == st2.n_tensors);
            for (i = 0; i < st.n_tensors && i < st2.n_tensors; i++)
                CHECK(strcmp(st.tensors[i].name, st2.tensors[i].name) == 0 &&
                      st.tensors[i].nbytes == st2.tensors[i].nbytes &&
                      memcmp(st.tensors[i].data, st2.tensors[i].data, st.tensors[i].nbytes) == 0);
            kmed_st_close(&st2);
        }
        kmed_st_close(&st);
    }
}

static int count_type(const kmed_gguf *g, int ggml_type)
{
    size_t i;
    int n = 0;
    for (i = 0; i < g->n_tensors; i++) n += g->tensors[i].ggml_type == ggml_type;
    return n;
}

static uint32_t kv_u32(const kmed_gguf *g, const char *key)
{
    const kmed_gguf_kv *kv = kmed_gguf_find_kv(g, key);
    CHECKF(kv && kv->type == KMED_GGUF_U32, "%s is u32", key);
    return kv ? (uint32_t)kv->u : 0xffffffffu;
}

static double kv_f32(const kmed_gguf *g, const char *key)
{
    const kmed_gguf_kv *kv = kmed_gguf_find_kv(g, key);
    CHECKF(kv && kv->type == KMED_GGUF_F32, "%s is f32", key);
    return kv ? kv->f : -1;
}

static int kv_str_is(const kmed_gguf *g, const char *key, const char *want)
{
    const kmed_gguf_kv *kv = kmed_gguf_find_kv(g, key);
    return kv && kv->type == KMED_GGUF_STRING && kv->len == strlen(want) &&
           memcmp(kv->str, want, kv->len) == 0;
}

static void test_fixture_gguf(const char *fx)
{
    static const char *const files[] = {"tiny-gemma2-q8_0.gguf", "tiny-gemma2-q4_0.gguf",
                                        "tiny-gemma2-q4_0-pure.gguf"};
    static const size_t sizes[] = {23519200, 23482336, 15290336};
    char path[1200], dir[1100];
    kmed_st hf;
    kmed_error e = {0};
    int have_hf;
    size_t f, i;
    snprintf(dir, sizeof dir, "%s/tiny-gemma2", fx);
    have_hf = kmed_st_open(&hf, dir, &e) == KMED_OK;
    for (f = 0; f < 3; f++) {
        kmed_gguf g;
        const kmed_gguf_kv *kv;
        const kmed_tensor_info *t;
        size_t end = 0;
        snprintf(path, sizeof path, "%s/tiny-gemma2/gguf/%s", fx, files[f]);
        CHECK_OK(rc = kmed_gguf_open(&g, path, &e));
        if (rc != KMED_OK) continue;
        CHECK(g.version == 3);
        CHECKF(g.n_tensors == 24, "%s: %zu tensors", files[f], g.n_tensors);
        CHECK(g.alignment == 32 && g.data_offset % 32 == 0);
        CHECK(strcmp(g.tensors[0].name, "output_norm.weight") == 0);
        CHECK(strcmp(g.tensors[1].name, "token_embd.weight") == 0);
        CHECK(strcmp(g.tensors[2].name, "blk.0.attn_k.weight") == 0);
        CHECK(count_type(&g, 0) == 9);
        if (f == 0) CHECK(count_type(&g, 8) == 15);
        if (f == 1) CHECK(count_type(&g, 8) == 1 && count_type(&g, 2) == 14);
        if (f == 2) CHECK(count_type(&g, 2) == 15);
        t = kmed_gguf_find_tensor(&g, "token_embd.weight");
        CHECK(t && t->ndim == 2 && t->shape[0] == 256000 && t->shape[1] == 64);
        if (t) CHECK(t->dtype == (f == 2 ? KMED_Q4_0 : KMED_Q8_0) &&
                     t->nbytes == 256000 * 2 * (size_t)(f == 2 ? 18 : 34));
        t = kmed_gguf_find_tensor(&g, "blk.1.attn_q.weight");
        CHECK(t && t->shape[0] == 64 && t->shape[1] == 64);
        t = kmed_gguf_find_tensor(&g, "blk.0.attn_k.weight");
        CHECK(t && t->shape[0] == 32 && t->shape[1] == 64);
        t = kmed_gguf_find_tensor(&g, "blk.0.attn_v.weight");
        CHECK(t && t->shape[0] == 32 && t->shape[1] == 64);
        t = kmed_gguf_find_tensor(&g, "blk.0.ffn_gate.weight");
        CHECK(t && t->shape[0] == 128 && t->shape[1] == 64);
        t = kmed_gguf_find_tensor(&g, "blk.0.ffn_down.weight");
        CHECK(t && t->shape[0] == 64 && t->shape[1] == 128);
        t = kmed_gguf_find_tensor(&g, "blk.1.post_ffw_norm.weight");
        CHECK(t && t->ndim == 1 && t->shape[0] == 64 && t->dtype == KMED_F32 && t->nbytes == 256);
        CHECK(kmed_gguf_find_tensor(&g, "output.weight") == NULL);
        /* Tensors are packed in order, each padded to 32; the file ends with the last. */
        for (i = 0; i < g.n_tensors; i++) {
            const unsigned char *base = (const unsigned char *)g.tensors[0].data;
            size_t off = (size_t)((const unsigned char *)g.tensors[i].data - base);
            CHECKF(off == end, "%s at %zu, expected %zu", g.tensors[i].name, off, end);
            end = off + g.tensors[i].nbytes + (32 - g.tensors[i].nbytes % 32) % 32;
        }
        CHECKF(g.data_offset + end == sizes[f], "%s: data ends at %zu", files[f],
               g.data_offset + end);
        /* The metadata table of the README. */
        CHECK(kv_str_is(&g, "general.architecture", "gemma2"));
        CHECK(kv_str_is(&g, "general.name", "tiny-gemma2"));
        CHECK(kv_str_is(&g, "tokenizer.ggml.model", "llama"));
        CHECK(kv_u32(&g, "gemma2.context_length") == 8192);
        CHECK(kv_u32(&g, "gemma2.embedding_length") == 64);
        CHECK(kv_u32(&g, "gemma2.block_count") == 2);
        CHECK(kv_u32(&g, "gemma2.feed_forward_length") == 128);
        CHECK(kv_u32(&g, "gemma2.attention.head_count") == 4);
        CHECK(kv_u32(&g, "gemma2.attention.head_count_kv") == 2);
        CHECK(kv_u32(&g, "gemma2.attention.key_length") == 16);
        CHECK(kv_u32(&g, "gemma2.attention.value_length") == 16);
        CHECK(kv_u32(&g, "gemma2.attention.sliding_window") == 16);
        CHECK(kv_f32(&g, "gemma2.attention.layer_norm_rms_epsilon") == (double)1e-6f);
        CHECK(kv_f32(&g, "gemma2.attn_logit_softcapping") == 50.0);
        CHECK(kv_f32(&g, "gemma2.final_logit_softcapping") == 30.0);
        CHECK(kv_f32(&g, "gemma2.rope.freq_base") == 10000.0);
        CHECK(kv_u32(&g, "tokenizer.ggml.bos_token_id") == 2);
        CHECK(kv_u32(&g, "tokenizer.ggml.eos_token_id") == 1);
        CHECK(kv_u32(&g, "tokenizer.ggml.unknown_token_id") == 3);
        CHECK(kv_u32(&g, "tokenizer.ggml.padding_token_id") == 0);
        CHECK(kv_u32(&g, "general.quantization_version") == 2);
        CHECK(kv_u32(&g, "general.file_type") == (f == 0 ? 7u : 2u));
        kv = kmed_gguf_find_kv(&g, "tokenizer.ggml.add_bos_token");
        CHECK(kv && kv->type == KMED_GGUF_BOOL && kv->u == 1);
        kv = kmed_gguf_find_kv(&g, "tokenizer.ggml.add_eos_token");
        CHECK(kv && kv->type == KMED_GGUF_BOOL && kv->u == 0);
        CHECK(kmed_gguf_find_kv(&g, "general.alignment") == NULL);
        CHECK(kmed_gguf_find_kv(&g, "gemma2.query_pre_attn_scalar") == NULL);
        kv = kmed_gguf_find_kv(&g, "tokenizer.ggml.tokens");
        CHECK(kv && kv->type == KMED_GGUF_ARRAY && kv->arr_type == KMED_GGUF_STRING &&
              kv->n == 256000 && kv->strs && kv->str_lens);
        if (kv && kv->strs && kv->n == 256000) {
            size_t nbyte = 0;
            CHECK(kv->str_lens[2] == 5 && memcmp(kv->strs[2], "<bos>", 5) == 0);
            CHECK(kv->str_lens[1] == 5 && memcmp(kv->strs[1], "<eos>", 5) == 0);
            CHECK(kv->str_lens[0] == 5 && memcmp(kv->strs[0], "<pad>", 5) == 0);
            for (i = 0; i < kv->n; i++)
                nbyte += kv->str_lens[i] == 6 && memcmp(kv->strs[i], "<0x", 3) == 0;
            /* 255: <0x09> is absent, "\t" is a normal piece (README) */
            CHECKF(nbyte == 255, "%zu <0xXX> pieces", nbyte);
        }
        kv = kmed_gguf_find_kv(&g, "tokenizer.ggml.scores");
        CHECK(kv && kv->type == KMED_GGUF_ARRAY && kv->arr_type == KMED_GGUF_F32 &&
              kv->n == 256000 && kv->raw);
        if (kv && kv->raw && kv->n == 256000) {
            float mn = 0, mx = -1e30f, s;
            size_t zeros = 0;
            for (i = 0; i < kv->n; i++) {
                memcpy(&s, (const char *)kv->raw + 4 * i, 4);
                if (s < mn) mn = s;
                if (s > mx) mx = s;
                zeros += s == 0;
            }
            CHECKF(mn == -580603.0f && mx == 0.0f && zeros == 21136, "scores %g..%g, %zu zero",
                   (double)mn, (double)mx, zeros);
        }
        kv = kmed_gguf_find_kv(&g, "tokenizer.ggml.token_type");
        CHECK(kv && kv->arr_type == KMED_GGUF_I32 && kv->n == 256000);
        if (kv && kv->raw && kv->n == 256000) {
            size_t cnt[8] = {0};
            int32_t v;
            for (i = 0; i < kv->n; i++) {
                memcpy(&v, (const char *)kv->raw + 4 * i, 4);
                if (v >= 0 && v < 8) cnt[v]++;
            }
            CHECKF(cnt[2] == 1 && cnt[3] == 5 && cnt[4] == 243 && cnt[6] == 255,
                   "token types: unk %zu ctl %zu user %zu byte %zu", cnt[2], cnt[3], cnt[4],
                   cnt[6]);
        }
        /* Norms hold 1 + w of the HF BF16 weights (README). */
        t = kmed_gguf_find_tensor(&g, "output_norm.weight");
        if (have_hf && t) {
            const kmed_tensor_info *h = kmed_st_find(&hf, "model.norm.weight");
            double md = 0;
            CHECK(h != NULL);
            for (i = 0; h && i < 64; i++) {
                uint16_t w;
                float x;
                memcpy(&w, (const char *)h->data + 2 * i, 2);
                memcpy(&x, (const char *)t->data + 4 * i, 4);
                if (fabs((double)x - (1.0 + f32_of_bf16(w))) > md)
                    md = fabs((double)x - (1.0 + f32_of_bf16(w)));
            }
            CHECKF(md < 1e-6, "output_norm vs 1 + model.norm: max diff %g", md);
        }
        kmed_gguf_close(&g);
        CHECK(g.kv == NULL && g.tensors == NULL);
    }
    if (have_hf) kmed_st_close(&hf);
}

/* GGUF rewrite: copying metadata and tensors of a llama.cpp file with the writer must give
   the same bytes (same order, same padding). */
static void test_gguf_rewrite_identical(const char *fx)
{
    char src[1200], dst[512];
    kmed_gguf g;
    kmed_gguf_writer w;
    kmed_error e = {0};
    kmed_map a, b;
    size_t i;
    snprintf(src, sizeof src, "%s/tiny-gemma2/gguf/tiny-gemma2-q4_0.gguf", fx);
    tmp_path(dst, sizeof dst, "rewrite.gguf");
    if (kmed_gguf_open(&g, src, &e) != KMED_OK) { CHECKF(0, "%s", e.msg); return; }
    CHECK_OK(kmed_gguf_writer_open(&w, dst, g.alignment, &e));
    kmed_gguf_add_all(&w, &g, NULL);
    for (i = 0; i < g.n_tensors; i++)
        CHECK_OK(kmed_gguf_add_tensor(&w, g.tensors[i].name, g.tensors[i].dtype,
                                      g.tensors[i].ndim, g.tensors[i].shape, &e));
    for (i = 0; i < g.n_tensors; i++)
        CHECK_OK(kmed_gguf_writer_put(&w, g.tensors[i].data, g.tensors[i].nbytes, &e));
    CHECK_OK(kmed_gguf_writer_commit(&w, &e));
    kmed_gguf_close(&g);
    if (kmed_map_open(&a, src, &e) == KMED_OK) {
        if (kmed_map_open(&b, dst, &e) == KMED_OK) {
            CHECKF(a.size == b.size && memcmp(a.data, b.data, a.size) == 0,
                   "rewritten GGUF differs (%zu vs %zu bytes)", a.size, b.size);
            kmed_map_close(&b);
        }
        kmed_map_close(&a);
    }
    remove(dst);
}

/* safetensors rewrite of the golden file: HF's layout (sorted names, compact JSON, space
   padding) is what the writer produces, so the bytes match. */
static void test_st_rewrite_identical(const char *fx)
{
    char src[1200], dst[512];
    kmed_st st;
    kmed_error e = {0};
    kmed_map a, b;
    snprintf(src, sizeof src, "%s/tiny-gemma2/golden/lora_init/adapter_model.safetensors", fx);
    tmp_path(dst, sizeof dst, "rewrite.safetensors");
    if (kmed_st_open(&st, src, &e) != KMED_OK) { CHECKF(0, "%s", e.msg); return; }
    CHECK_OK(kmed_st_write(dst, st.tensors, st.n_tensors, st.meta_keys, st.meta_vals,
                           st.n_meta, &e));
    kmed_st_close(&st);
    if (kmed_map_open(&a, src, &e) == KMED_OK) {
        if (kmed_map_open(&b, dst, &e) == KMED_OK) {
            CHECKF(a.size == b.size && memcmp(a.data, b.data, a.size) == 0,
                   "rewritten safetensors differs (%zu vs %zu bytes)", a.size, b.size);
            kmed_map_close(&b);
        }
        kmed_map_close(&a);
    }
    remove(dst);
}

/* ---------------------------------------------------------------- round trips */

static void test_st_roundtrip(void)
{
    static const kmed_dtype dts[] = {KMED_F32, KMED_F16, KMED_BF16, KMED_I8, KMED_I32,
                                     KMED_I64, KMED_U8, KMED_F64, KMED_BOOL};
    enum { ND = sizeof dts / sizeof dts[0], NT = ND + 3 };
    kmed_tensor_info ts[NT];
    unsigned char *bufs[NT];
    char names[NT][32], path[512], path2[512];
    const char *mk[3] = {"format", "quote\"and\\slash", "\xed\x95\x9c\xea\xb8\x80"};
    const char *mv[3] = {"pt", "line\nbreak\ttab", "\xec\x9d\x98\xed\x95\x99 \x01"};
    kmed_st st;
    kmed_error e = {0};
    kmed_rng rng;
    size_t i, j;
    uint64_t hl;
    kmed_rng_seed(&rng, 7);
    memset(ts, 0, sizeof ts);
    for (i = 0; i < NT; i++) {
        kmed_tensor_info *t = &ts[i];
        snprintf(names[i], sizeof names[i], "t%02zu.%s", i, i < ND ? kmed_dtype_name(dts[i]) : "x");
        t->name = names[i];
        t->dtype = i < ND ? dts[i] : KMED_F32;
        t->ndim = (int)(i % 5); /* 0-d scalars up to 4-D */
        for (j = 0; j < (size_t)t->ndim; j++) t->shape[j] = 1 + (i + j) % 3;
        if (i == ND) { t->ndim = 2; t->shape[0] = 0; t->shape[1] = 5; } /* empty tensor */
        if (i == ND + 1) { t->ndim = 1; t->shape[0] = 1001; t->dtype = KMED_BF16; }
        if (i == ND + 2) { t->ndim = 3; t->shape[0] = 2; t->shape[1] = 3; t->shape[2] = 7;
                           t->dtype = KMED_F64; }
        t->nbytes = kmed_dtype_bytes(t->dtype, kmed_tensor_numel(t));
        bufs[i] = (unsigned char *)malloc(t->nbytes + 1);
        for (j = 0; j < t->nbytes; j++) bufs[i][j] = (unsigned char)kmed_rng_u64(&rng);
        t->data = bufs[i];
    }
    tmp_path(path, sizeof path, "rt.safetensors");
    CHECK_OK(kmed_st_write(path, ts, NT, mk, mv, 3, &e));
    hl = st_header_len(path);
    CHECKF(hl % 8 == 0, "header length %llu not a multiple of 8", (unsigned long long)hl);
    {
        char last;
        CHECK(read_at(path, 8 + (size_t)hl - 1, &last, 1) && (last == ' ' || last == '}'));
    }
    CHECK_OK(rc = kmed_st_open(&st, path, &e));
    if (rc == KMED_OK) {
        CHECK(st.n_tensors == NT);
        for (i = 0; i < NT && i < st.n_tensors; i++) {
            const kmed_tensor_info *a = &ts[i], *b = &st.tensors[i];
            int same = strcmp(a->name, b->name) == 0 && a->dtype == b->dtype &&
                       a->ndim == b->ndim && a->nbytes == b->nbytes &&
                       memcmp(a->data, b->data, a->nbytes) == 0;
            for (j = 0; j < (size_t)a->ndim; j++) same &= a->shape[j] == b->shape[j];
            CHECKF(same, "round trip of %s", a->name);
            CHECK(kmed_st_find(&st, a->name) == b);
        }
        CHECK(st.n_meta == 3);
        for (i = 0; i < 3 && i < st.n_meta; i++)
            CHECKF(strcmp(st.meta_keys[i], mk[i]) == 0 && strcmp(st.meta_vals[i], mv[i]) == 0,
                   "meta %zu", i);
        /* Tensor data starts 8-aligned in the file (HF-style space padding). */
        CHECK((8 + hl) % 8 == 0);
        kmed_st_close(&st);
    }
    /* Streaming writer: nothing under the final name until commit; an old file survives
       an abort; wrong sizes and early commits are refused. */
    {
        kmed_st_writer w;
        unsigned char junk[4] = {1, 2, 3, 4};
        tmp_path(path2, sizeof path2, "stream.safetensors");
        write_bytes(path2, junk, 4);
        CHECK_OK(kmed_st_writer_open(&w, path2, ts, 3, NULL, NULL, 0, &e));
        CHECK(kmed_st_writer_put(&w, ts[0].data, ts[0].nbytes + 1, &e) == KMED_ERR_SHAPE);
        CHECK_OK(kmed_st_writer_put(&w, ts[0].data, ts[0].nbytes, &e));
        CHECK(kmed_st_writer_commit(&w, &e) == KMED_ERR_STATE);
        kmed_st_writer_abort(&w);
        {
            unsigned char back[8];
            struct stat sb;
            CHECK(stat(path2, &sb) == 0 && sb.st_size == 4 && read_at(path2, 0, back, 4) &&
                  memcmp(back, junk, 4) == 0);
        }
        CHECK_OK(kmed_st_writer_open(&w, path2, ts, 3, NULL, NULL, 0, &e));
        for (i = 0; i < 3; i++) CHECK_OK(kmed_st_writer_put(&w, ts[i].data, ts[i].nbytes, &e));
        CHECK(kmed_st_writer_put(&w, ts[0].data, ts[0].nbytes, &e) == KMED_ERR_STATE);
        CHECK_OK(kmed_st_writer_commit(&w, &e));
        CHECK_OK(rc = kmed_st_open(&st, path2, &e));
        if (rc == KMED_OK) {
            CHECK(st.n_tensors == 3 && st.n_meta == 0);
            kmed_st_close(&st);
        }
        remove(path2);
    }
    /* Descriptors the writer refuses. */
    {
        kmed_tensor_info bad[2];
        memcpy(bad, ts, sizeof bad);
        bad[0].dtype = KMED_Q8_0;
        CHECK(kmed_st_write(path2, bad, 1, NULL, NULL, 0, &e) == KMED_ERR_UNSUPPORTED);
        memcpy(bad, ts, sizeof bad);
        bad[1].name = bad[0].name;
        CHECK(kmed_st_write(path2, bad, 2, NULL, NULL, 0, &e) == KMED_ERR_ARG);
        memcpy(bad, ts, sizeof bad);
        bad[1].nbytes += 2;
        CHECK(kmed_st_write(path2, bad, 2, NULL, NULL, 0, &e) == KMED_ERR_SHAPE);
        memcpy(bad, ts, sizeof bad);
        bad[0].name = "__metadata__";
        CHECK(kmed_st_write(path2, bad, 1, NULL, NULL, 0, &e) == KMED_ERR_ARG);
        CHECK(!file_exists(path2));
    }
    /* Zero tensors: a valid file with only a header. */
    CHECK_OK(kmed_st_write(path2, NULL, 0, NULL, NULL, 0, &e));
    CHECK_OK(rc = kmed_st_open(&st, path2, &e));
    if (rc == KMED_OK) { CHECK(st.n_tensors == 0); kmed_st_close(&st); }
    remove(path2);
    remove(path);
    for (i = 0; i < NT; i++) free(bufs[i]);
}

/* Hand-made GGUF with every scalar type, read back, copied with add_all, read again. */
static void build_all_types_gguf(kmed_buf *b)
{
    int8_t i8 = -5; int16_t i16 = -300; int32_t i32 = -70000; int64_t i64 = -((int64_t)1 << 40);
    float f32 = 3.5f; double f64 = -2.25e100;
    b_u32(b, KMED__GGUF_MAGIC); b_u32(b, 3); b_u64(b, 0); b_u64(b, 13);
    b_str(b, "k.u8"); b_u32(b, KMED_GGUF_U8); kmed_buf_put(b, "\xfe", 1);
    b_str(b, "k.i8"); b_u32(b, KMED_GGUF_I8); kmed_buf_put(b, &i8, 1);
    b_str(b, "k.u16"); b_u32(b, KMED_GGUF_U16); kmed_buf_put(b, "\x34\x12", 2);
    b_str(b, "k.i16"); b_u32(b, KMED_GGUF_I16); kmed_buf_put(b, &i16, 2);
    b_str(b, "k.u32"); b_u32(b, KMED_GGUF_U32); b_u32(b, 4000000000u);
    b_str(b, "k.i32"); b_u32(b, KMED_GGUF_I32); kmed_buf_put(b, &i32, 4);
    b_str(b, "k.f32"); b_u32(b, KMED_GGUF_F32); kmed_buf_put(b, &f32, 4);
    b_str(b, "k.bool"); b_u32(b, KMED_GGUF_BOOL); kmed_buf_put(b, "\x01", 1);
    b_str(b, "k.str"); b_u32(b, KMED_GGUF_STRING); b_u64(b, 3); kmed_buf_put(b, "a\0b", 3);
    b_str(b, "k.u64"); b_u32(b, KMED_GGUF_U64); b_u64(b, UINT64_MAX - 1);
    b_str(b, "k.i64"); b_u32(b, KMED_GGUF_I64); kmed_buf_put(b, &i64, 8);
    b_str(b, "k.f64"); b_u32(b, KMED_GGUF_F64); kmed_buf_put(b, &f64, 8);
    b_str(b, "k.arr_i16"); b_u32(b, KMED_GGUF_ARRAY); b_u32(b, KMED_GGUF_I16); b_u64(b, 2);
    kmed_buf_put(b, "\x01\x00\xff\xff", 4);
}

static void check_all_types(const kmed_gguf *g)
{
    const kmed_gguf_kv *kv;
    kv = kmed_gguf_find_kv(g, "k.u8"); CHECK(kv && kv->type == KMED_GGUF_U8 && kv->u == 254);
    kv = kmed_gguf_find_kv(g, "k.i8"); CHECK(kv && kv->type == KMED_GGUF_I8 && kv->i == -5);
    kv = kmed_gguf_find_kv(g, "k.u16"); CHECK(kv && kv->type == KMED_GGUF_U16 && kv->u == 0x1234);
    kv = kmed_gguf_find_kv(g, "k.i16"); CHECK(kv && kv->type == KMED_GGUF_I16 && kv->i == -300);
    kv = kmed_gguf_find_kv(g, "k.u32");
    CHECK(kv && kv->type == KMED_GGUF_U32 && kv->u == 4000000000u);
    kv = kmed_gguf_find_kv(g, "k.i32"); CHECK(kv && kv->type == KMED_GGUF_I32 && kv->i == -70000);
    kv = kmed_gguf_find_kv(g, "k.f32"); CHECK(kv && kv->type == KMED_GGUF_F32 && kv->f == 3.5);
    kv = kmed_gguf_find_kv(g, "k.bool"); CHECK(kv && kv->type == KMED_GGUF_BOOL && kv->u == 1);
    kv = kmed_gguf_find_kv(g, "k.str");
    CHECK(kv && kv->type == KMED_GGUF_STRING && kv->len == 3 && memcmp(kv->str, "a\0b", 3) == 0);
    kv = kmed_gguf_find_kv(g, "k.u64");
    CHECK(kv && kv->type == KMED_GGUF_U64 && kv->u == UINT64_MAX - 1);
    kv = kmed_gguf_find_kv(g, "k.i64");
    CHECK(kv && kv->type == KMED_GGUF_I64 && kv->i == -((int64_t)1 << 40));
    kv = kmed_gguf_find_kv(g, "k.f64");
    CHECK(kv && kv->type == KMED_GGUF_F64 && kv->f == -2.25e100);
    kv = kmed_gguf_find_kv(g, "k.arr_i16");
    CHECK(kv && kv->type == KMED_GGUF_ARRAY && kv->arr_type == KMED_GGUF_I16 && kv->n == 2 &&
          memcmp(kv->raw, "\x01\x00\xff\xff", 4) == 0);
}

static void test_gguf_roundtrip(void)
{
    static const kmed_dtype dts[] = {KMED_F32, KMED_F16, KMED_BF16, KMED_Q8_0, KMED_Q4_0,
                                     KMED_I8, KMED_I32, KMED_I64, KMED_F64};
    enum { ND = sizeof dts / sizeof dts[0] };
    kmed_buf hand = {0};
    kmed_gguf g, g2;
    kmed_gguf_writer w;
    kmed_error e = {0};
    char path[512];
    unsigned char *bufs[ND];
    uint64_t shapes[ND][4];
    int ndims[ND];
    size_t nbytes[ND], i, j, a;
    kmed_rng rng;
    kmed_rng_seed(&rng, 11);
    tmp_path(path, sizeof path, "rt.gguf");
    build_all_types_gguf(&hand);
    CHECK_OK(rc = kmed__gguf_open_mem(&g, hand.data, hand.len, "hand", &e));
    if (rc != KMED_OK) { kmed_buf_free(&hand); return; }
    CHECK(g.n_kv == 13);
    check_all_types(&g);
    for (i = 0; i < ND; i++) {
        uint64_t numel = 1;
        ndims[i] = 1 + (int)(i % 4);
        for (j = 0; j < (size_t)ndims[i]; j++) {
            shapes[i][j] = 1 + (i + j) % 3;
            if (j + 1 == (size_t)ndims[i]) shapes[i][j] = 32 * (1 + i % 2); /* whole blocks */
            numel *= shapes[i][j];
        }
        nbytes[i] = kmed_dtype_bytes(dts[i], numel);
        bufs[i] = (unsigned char *)malloc(nbytes[i]);
        for (j = 0; j < nbytes[i]; j++) bufs[i][j] = (unsigned char)kmed_rng_u64(&rng);
    }
    for (a = 32; a <= 64; a += 32) {
        static const char *const strs[] = {"", "x", "\xed\x95\x9c", "a\0b"};
        static const size_t lens[] = {0, 1, 3, 3};
        static const uint16_t u16s[] = {1, 65535, 7};
        static const double f64s[] = {0.5, -1e300};
        static const uint8_t bools[] = {1, 0, 1};
        const kmed_gguf_kv *kv;
        CHECK_OK(kmed_gguf_writer_open(&w, path, a, &e));
        kmed_gguf_add_all(&w, &g, NULL);
        kmed_gguf_add_u32(&w, "w.u32", 123456789u);
        kmed_gguf_add_i32(&w, "w.i32", -42);
        kmed_gguf_add_f32(&w, "w.f32", 0.1f);
        kmed_gguf_add_bool(&w, "w.bool", 7);
        kmed_gguf_add_str(&w, "w.str", "\xec\x9d\x98\xed\x95\x99");
        /* every other scalar type at the edges of its range */
        kmed_gguf_add_u8(&w, "w.u8", 250);
        kmed_gguf_add_i8(&w, "w.i8", -128);
        kmed_gguf_add_u16(&w, "w.u16", 65535);
        kmed_gguf_add_i16(&w, "w.i16", -32768);
        kmed_gguf_add_u64(&w, "w.u64", UINT64_MAX - 1);
        kmed_gguf_add_i64(&w, "w.i64", INT64_MIN + 1);
        kmed_gguf_add_f64(&w, "w.f64", 0.1); /* not a float: needs all 64 bits */
        kmed_gguf_add_arr(&w, "w.arr_u16", KMED_GGUF_U16, u16s, 3);
        kmed_gguf_add_arr(&w, "w.arr_f64", KMED_GGUF_F64, f64s, 2);
        kmed_gguf_add_arr(&w, "w.arr_bool", KMED_GGUF_BOOL, bools, 3);
        kmed_gguf_add_arr(&w, "w.arr_empty", KMED_GGUF_I32, NULL, 0);
        kmed_gguf_add_arr_str(&w, "w.arr_str", strs, lens, 4);
        for (i = 0; i < ND; i++) {
            char name[32];
            snprintf(name, sizeof name, "t.%s", kmed_dtype_name(dts[i]));
            CHECK_OK(kmed_gguf_add_tensor(&w, name, dts[i], ndims[i], shapes[i], &e));
        }
        for (i = 0; i < ND; i++) CHECK_OK(kmed_gguf_writer_put(&w, bufs[i], nbytes[i], &e));
        CHECK(!file_exists(path)); /* atomic: nothing under the name before commit */
        CHECK_OK(kmed_gguf_writer_commit(&w, &e));
        CHECK_OK(rc = kmed_gguf_open(&g2, path, &e));
        if (rc != KMED_OK) continue;
        CHECK(g2.version == 3 && g2.alignment == a && g2.data_offset % a == 0);
        CHECKF(g2.n_kv == 13 + 17 + (a != 32), "n_kv %zu", g2.n_kv);
        check_all_types(&g2);
        kv = kmed_gguf_find_kv(&g2, "general.alignment");
        CHECK(a == 32 ? kv == NULL : (kv && kv->u == a));
        kv = kmed_gguf_find_kv(&g2, "w.u32"); CHECK(kv && kv->u == 123456789u);
        kv = kmed_gguf_find_kv(&g2, "w.i32"); CHECK(kv && kv->i == -42);
        kv = kmed_gguf_find_kv(&g2, "w.f32"); CHECK(kv && kv->f == (double)0.1f);
        kv = kmed_gguf_find_kv(&g2, "w.bool");
        CHECK(kv && kv->type == KMED_GGUF_BOOL && kv->u == 1);
        kv = kmed_gguf_find_kv(&g2, "w.str");
        CHECK(kv && kv->len == 6 && memcmp(kv->str, "\xec\x9d\x98\xed\x95\x99", 6) == 0);
        kv = kmed_gguf_find_kv(&g2, "w.u8"); CHECK(kv && kv->type == KMED_GGUF_U8 && kv->u == 250);
        kv = kmed_gguf_find_kv(&g2, "w.i8"); CHECK(kv && kv->type == KMED_GGUF_I8 && kv->i == -128);
        kv = kmed_gguf_find_kv(&g2, "w.u16");
        CHECK(kv && kv->type == KMED_GGUF_U16 && kv->u == 65535);
        kv = kmed_gguf_find_kv(&g2, "w.i16");
        CHECK(kv && kv->type == KMED_GGUF_I16 && kv->i == -32768);
        kv = kmed_gguf_find_kv(&g2, "w.u64");
        CHECK(kv && kv->type == KMED_GGUF_U64 && kv->u == UINT64_MAX - 1);
        kv = kmed_gguf_find_kv(&g2, "w.i64");
        CHECK(kv && kv->type == KMED_GGUF_I64 && kv->i == INT64_MIN + 1);
        kv = kmed_gguf_find_kv(&g2, "w.f64");
        CHECK(kv && kv->type == KMED_GGUF_F64 && kv->f == 0.1);
        kv = kmed_gguf_find_kv(&g2, "w.arr_u16");
        CHECK(kv && kv->arr_type == KMED_GGUF_U16 && kv->n == 3 && memcmp(kv->raw, u16s, 6) == 0);
        kv = kmed_gguf_find_kv(&g2, "w.arr_f64");
        CHECK(kv && kv->arr_type == KMED_GGUF_F64 && kv->n == 2 && memcmp(kv->raw, f64s, 16) == 0);
        kv = kmed_gguf_find_kv(&g2, "w.arr_bool");
        CHECK(kv && kv->arr_type == KMED_GGUF_BOOL && kv->n == 3 && memcmp(kv->raw, bools, 3) == 0);
        kv = kmed_gguf_find_kv(&g2, "w.arr_empty");
        CHECK(kv && kv->arr_type == KMED_GGUF_I32 && kv->n == 0);
        kv = kmed_gguf_find_kv(&g2, "w.arr_str");
        CHECK(kv && kv->arr_type == KMED_GGUF_STRING && kv->n == 4);
        for (i = 0; kv && kv->strs && i < 4; i++)
            CHECKF(kv->str_lens[i] == lens[i] && memcmp(kv->strs[i], strs[i], lens[i]) == 0,
                   "string %zu", i);
        CHECK(g2.n_tensors == ND);
        for (i = 0; i < ND && i < g2.n_tensors; i++) {
            const kmed_tensor_info *t = &g2.tensors[i];
            int same = t->dtype == dts[i] && t->ndim == ndims[i] && t->nbytes == nbytes[i] &&
                       memcmp(t->data, bufs[i], nbytes[i]) == 0;
            for (j = 0; j < (size_t)ndims[i]; j++) same &= t->shape[j] == shapes[i][j];
            CHECKF(same, "tensor %s (alignment %zu)", kmed_dtype_name(dts[i]), a);
            CHECK((size_t)((const unsigned char *)t->data -
                           (const unsigned char *)g2.tensors[0].data) % a == 0);
        }
        kmed_gguf_close(&g2);
        remove(path);
    }
    /* Writer misuse. */
    {
        uint64_t shp[2] = {4, 33};
        CHECK(kmed_gguf_writer_open(&w, path, 24, &e) == KMED_ERR_ARG);
        CHECK_OK(kmed_gguf_writer_open(&w, path, 0, &e));
        CHECK(w.alignment == 32);
        CHECK(kmed_gguf_add_tensor(&w, "q", KMED_Q8_0, 2, shp, &e) == KMED_ERR_SHAPE);
        CHECK(kmed_gguf_add_tensor(&w, "u", KMED_U8, 2, shp, &e) == KMED_ERR_UNSUPPORTED);
        CHECK(kmed_gguf_add_tensor(&w, "z", KMED_F32, 5, shp, &e) == KMED_ERR_ARG);
        CHECK_OK(kmed_gguf_add_tensor(&w, "f", KMED_F32, 2, shp, &e));
        CHECK(kmed_gguf_add_tensor(&w, "f", KMED_F32, 2, shp, &e) == KMED_ERR_ARG);
        CHECK(kmed_gguf_writer_commit(&w, &e) == KMED_ERR_STATE);
        CHECK(kmed_gguf_writer_put(&w, bufs[0], 5, &e) == KMED_ERR_SHAPE);
        kmed_gguf_writer_abort(&w);
        CHECK(!file_exists(path));
        CHECK_OK(kmed_gguf_writer_open(&w, path, 0, &e));
        kmed_gguf_add_u32(&w, "dup", 1);
        kmed_gguf_add_str(&w, "dup", "again");
        CHECK(kmed_gguf_writer_commit(&w, &e) == KMED_ERR_ARG && strstr(e.msg, "dup"));
        kmed_gguf_writer_abort(&w);
        CHECK(!file_exists(path));
        /* general.alignment set through metadata changes the layout */
        CHECK_OK(kmed_gguf_writer_open(&w, path, 0, &e));
        kmed_gguf_add_u32(&w, "general.alignment", 128);
        CHECK(w.alignment == 128);
        CHECK_OK(kmed_gguf_add_tensor(&w, "f", KMED_F32, 2, shp, &e));
        {
            float fl[4 * 33];
            memset(fl, 0, sizeof fl);
            fl[5] = 1.5f;
            CHECK_OK(kmed_gguf_writer_put(&w, fl, sizeof fl, &e));
            kmed_gguf_add_u32(&w, "late", 1); /* after the header: refused at commit */
            CHECK(kmed_gguf_writer_commit(&w, &e) == KMED_ERR_ARG && strstr(e.msg, "late"));
            kmed_gguf_writer_abort(&w);
            CHECK(!file_exists(path));
            CHECK_OK(kmed_gguf_writer_open(&w, path, 0, &e));
            kmed_gguf_add_u32(&w, "general.alignment", 128);
            CHECK_OK(kmed_gguf_add_tensor(&w, "f", KMED_F32, 2, shp, &e));
            CHECK_OK(kmed_gguf_writer_put(&w, fl, sizeof fl, &e));
            CHECK_OK(kmed_gguf_writer_commit(&w, &e));
        }
        CHECK_OK(rc = kmed_gguf_open(&g2, path, &e));
        if (rc == KMED_OK) {
            CHECK(g2.alignment == 128 && g2.n_kv == 1 && g2.n_tensors == 1 &&
                  g2.data_offset % 128 == 0 && g2.tensors[0].shape[0] == 4 &&
                  g2.tensors[0].shape[1] == 33 && ((const float *)g2.tensors[0].data)[5] == 1.5f);
            kmed_gguf_close(&g2);
        }
        remove(path);
    }
    kmed_gguf_close(&g);
    kmed_buf_free(&hand);
    for (i = 0; i < ND; i++) free(bufs[i]);
}

/* ---------------------------------------------------------------- malformed safetensors */

/* Builds a safetensors image from a header text and a data size (bytes 0..n-1). */
static void st_image(kmed_buf *b, const char *header, size_t data_bytes)
{
    size_t i;
    b->len = 0;
    b_u64(b, strlen(header));
    kmed_buf_puts(b, header);
    for (i = 0; i < data_bytes; i++) kmed_buf_put(b, "\x01", 1);
}

static kmed_result st_try(const char *header, size_t data_bytes, kmed_error *e)
{
    kmed_buf b = {0};
    kmed_st st;
    kmed_result r;
    st_image(&b, header, data_bytes);
    r = kmed__st_open_mem(&st, b.data, b.len, "t.safetensors", e);
    if (r == KMED_OK) kmed_st_close(&st);
    kmed_buf_free(&b);
    return r;
}

static void test_st_malformed(void)
{
    kmed_error e = {0};
    kmed_buf b = {0};
    kmed_st st;
    char path[512];
    size_t cut, fails = 0, oks = 0;
    /* sanity: the base case is valid */
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 16, &e)
          == KMED_OK);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]}}", 8, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "outside"));
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", 16, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "needs 24 bytes"));
    CHECK(st_try("{\"a\":{\"dtype\":\"BF16\",\"shape\":[1048576,1048576],\"data_offsets\":[0,16]}}",
                 16, &e) == KMED_ERR_FORMAT); /* 2^40 elements */
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,4294967296],"
                 "\"data_offsets\":[0,16]}}", 16, &e) == KMED_ERR_LIMIT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],"
                 "\"data_offsets\":[0,16]}}", 16, &e) == KMED_ERR_LIMIT); /* bytes overflow */
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}", 24, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "overlap"));
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,32]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 32, &e)
          == KMED_OK); /* out of order is fine */
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}", 16, &e)
          == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 16, &e)
          == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 16, &e)
          == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 16, &e)
          == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
                 &e) == KMED_ERR_LIMIT);
    CHECK(st_try("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, &e) == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, &e)
          == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":[1,2]}", 4, &e) == KMED_ERR_FORMAT);
    CHECK(st_try("[1,2]", 4, &e) == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "twice"));
    CHECKF(strcmp(e.msg, "t.safetensors: tensor 'a' is stored twice") == 0, "%s", e.msg);
    CHECK(st_try("{\"__metadata__\":{\"k\":1}}", 0, &e) == KMED_ERR_FORMAT);
    CHECK(st_try("{\"__metadata__\":\"x\"}", 0, &e) == KMED_ERR_FORMAT);
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}", 4, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "JSON"));
    CHECK(st_try("not json at all", 4, &e) == KMED_ERR_FORMAT && strstr(e.msg, "JSON"));
    CHECK(st_try("{\"a\xff\":1}", 0, &e) == KMED_ERR_FORMAT); /* bad UTF-8 */
    CHECK(st_try("{}", 0, &e) == KMED_OK);
    CHECK(st_try("{} ", 0, &e) == KMED_OK);
    /* safetensors dtypes kmed does not compute with are listed, size-checked (F4: 4 bits
       an element) and keep their text; a name outside HF's list has no size: refused. */
    st_image(&b, "{\"e\":{\"dtype\":\"F8_E4M3\",\"shape\":[16],\"data_offsets\":[0,16]},"
                 "\"w\":{\"dtype\":\"F4\",\"shape\":[2],\"data_offsets\":[16,17]}}", 17);
    CHECK_OK(rc = kmed__st_open_mem(&st, b.data, b.len, "u", &e));
    if (rc == KMED_OK) {
        CHECK(st.n_tensors == 2 && st.tensors[0].dtype == KMED_DTYPE_UNKNOWN &&
              st.tensors[1].dtype == KMED_DTYPE_UNKNOWN && st.tensors[1].nbytes == 1);
        CHECK(strcmp(kmed_st_dtype_str(&st, 0), "F8_E4M3") == 0 &&
              strcmp(kmed_st_dtype_str(&st, 1), "F4") == 0);
        kmed_st_close(&st);
    }
    CHECK(st_try("{\"w\":{\"dtype\":\"F4\",\"shape\":[3],\"data_offsets\":[0,2]}}", 2, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "byte")); /* 12 bits */
    CHECK(st_try("{\"w\":{\"dtype\":\"Q9_9\",\"shape\":[3],\"data_offsets\":[0,1]}}", 1, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "unknown dtype \"Q9_9\""));
    CHECKF(st_try("{\"w\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, &e)
           == KMED_ERR_FORMAT && strstr(e.msg, "t.safetensors") &&
           strstr(e.msg, "unknown dtype \"f32\""), "%s", e.msg); /* names are upper case */
    /* HF's layout rule: in offset order the tensors cover the data area exactly. */
    CHECKF(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, &e)
           == KMED_ERR_FORMAT && strstr(e.msg, "bytes [0, 4]"), "%s", e.msg); /* leading gap */
    CHECKF(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                  "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12, &e)
           == KMED_ERR_FORMAT && strstr(e.msg, "bytes [4, 8]") && strstr(e.msg, "'b'"),
           "%s", e.msg);
    CHECKF(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 5, &e)
           == KMED_ERR_FORMAT && strstr(e.msg, "1 bytes after the last tensor"), "%s", e.msg);
    CHECK(st_try("{}", 4, &e) == KMED_ERR_FORMAT && strstr(e.msg, "after the last tensor"));
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]},"
                 "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, &e)
          == KMED_OK); /* an empty tensor between two others */
    CHECK(st_try("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                 "\"z\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}", 8, &e)
          == KMED_ERR_FORMAT && strstr(e.msg, "overlap")); /* ... but not inside one */
    CHECK(st_try("{\"e\":{\"dtype\":\"U16\",\"shape\":[16],\"data_offsets\":[0,16]}}", 16, &e)
          == KMED_ERR_FORMAT);
    /* Lying header lengths. */
    st_image(&b, "{}", 0);
    b.data[0] = 100;
    CHECK(kmed__st_open_mem(&st, b.data, b.len, "x", &e) == KMED_ERR_FORMAT &&
          strstr(e.msg, "past the end"));
    b.data[7] = (char)0x80;
    CHECK(kmed__st_open_mem(&st, b.data, b.len, "x", &e) == KMED_ERR_LIMIT);
    b.data[7] = 0; b.data[0] = 1;
    CHECK(kmed__st_open_mem(&st, b.data, b.len, "x", &e) == KMED_ERR_FORMAT);
    CHECK(kmed__st_open_mem(&st, b.data, 7, "x", &e) == KMED_ERR_FORMAT);
    CHECK(kmed__st_open_mem(&st, b.data, 0, "x", &e) == KMED_ERR_FORMAT);
    /* Every truncation of a valid file fails cleanly. */
    st_image(&b, "{\"__metadata__\":{\"format\":\"pt\"},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                 "\"b\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[16,24]}}", 24);
    CHECK_OK(rc = kmed__st_open_mem(&st, b.data, b.len, "x", &e));
    if (rc == KMED_OK) kmed_st_close(&st);
    for (cut = 0; cut < b.len; cut++) {
        char *copy = (char *)malloc(cut + 1); /* exact-size copy so ASan sees overreads */
        memcpy(copy, b.data, cut);
        if (kmed__st_open_mem(&st, copy, cut, "cut", &e) == KMED_OK) { oks++; kmed_st_close(&st); }
        else fails++;
        free(copy);
    }
    CHECKF(oks == 0 && fails == b.len, "truncations: %zu accepted", oks);
    /* ... also through a real file. */
    tmp_path(path, sizeof path, "trunc.safetensors");
    write_bytes(path, b.data, b.len - 1);
    CHECK(kmed_st_open(&st, path, &e) == KMED_ERR_FORMAT && strstr(e.msg, "trunc.safetensors"));
    write_bytes(path, "", 0);
    CHECK(kmed_st_open(&st, path, &e) == KMED_ERR_FORMAT);
    st_image(&b, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    write_bytes(path, b.data, b.len);
    CHECKF(kmed_st_open(&st, path, &e) == KMED_ERR_FORMAT && strncmp(e.msg, path, strlen(path))
           == 0 && strstr(e.msg, "tensor 'a' is stored twice"), "%s", e.msg);
    remove(path);
    CHECK(kmed_st_open(&st, path, &e) == KMED_ERR_NOT_FOUND);
    kmed_buf_free(&b);
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char p[600];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    write_bytes(p, text, strlen(text));
}

static void write_st(const char *dir, const char *name, const char *tname)
{
    char p[600];
    float x[4] = {1, 2, 3, 4};
    kmed_tensor_info t;
    kmed_error e = {0};
    memset(&t, 0, sizeof t);
    t.name = tname; t.dtype = KMED_F32; t.ndim = 1; t.shape[0] = 4; t.data = x;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    CHECK_OK(kmed_st_write(p, &t, 1, NULL, NULL, 0, &e));
}

static void test_st_dirs(void)
{
    char dir[512], p[600];
    kmed_st st;
    kmed_error e = {0};
    tmp_path(dir, sizeof dir, "model");
    CHECK_OK(kmed_mkdir_p(dir, &e));
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_NOT_FOUND);
    write_st(dir, "b.safetensors", "x");
    write_st(dir, "a.safetensors", "y");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT && strstr(e.msg, "index"));
    write_text(dir, "model.safetensors.index.json",
               "{\"metadata\":{},"
               "\"weight_map\":{\"x\":\"b.safetensors\",\"y\":\"a.safetensors\"}}");
    CHECK_OK(rc = kmed_st_open(&st, dir, &e));
    if (rc == KMED_OK) {
        CHECK(st.n_tensors == 2 && strcmp(st.tensors[0].name, "y") == 0); /* a.* first */
        CHECK(kmed_st_find(&st, "x") && ((const float *)kmed_st_find(&st, "x")->data)[3] == 4);
        kmed_st_close(&st);
    }
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"a.safetensors\",\"y\":\"a.safetensors\"}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT); /* x is not in a */
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"b.safetensors\",\"y\":\"c.safetensors\"}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_NOT_FOUND);
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"../b.safetensors\"}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{\"x\":\"/etc/passwd\"}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":{}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT);
    write_text(dir, "model.safetensors.index.json", "{\"weight_map\":");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT);
    /* Same tensor in two shards. */
    write_st(dir, "a.safetensors", "x");
    write_text(dir, "model.safetensors.index.json",
               "{\"weight_map\":{\"x\":\"b.safetensors\",\"z\":\"a.safetensors\"}}");
    CHECK(kmed_st_open(&st, dir, &e) == KMED_ERR_FORMAT && strstr(e.msg, "twice"));
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir); remove(p);
    /* model.safetensors wins over other files. */
    write_st(dir, "model.safetensors", "m");
    CHECK_OK(rc = kmed_st_open(&st, dir, &e));
    if (rc == KMED_OK) {
        CHECK(st.n_tensors == 1 && strcmp(st.tensors[0].name, "m") == 0);
        kmed_st_close(&st);
    }
    snprintf(p, sizeof p, "%s/model.safetensors", dir); remove(p);
    snprintf(p, sizeof p, "%s/a.safetensors", dir); remove(p);
    snprintf(p, sizeof p, "%s/b.safetensors", dir); remove(p);
    rmdir(dir);
}

/* ---------------------------------------------------------------- malformed GGUF */

/* A small GGUF with two F32 tensors of 32 floats (no trailing padding). Patchable fields
   are built from parameters. */
typedef struct gg_spec {
    uint32_t magic, version;
    uint64_t n_tensors, n_kv;
    uint64_t str_len_override;   /* 0: honest length of the name string */
    uint32_t type1;              /* ggml type of tensor 1 */
    uint64_t ne0_1;              /* ne0 of tensor 1 */
    uint64_t off1;               /* offset of tensor 1 */
    uint32_t ndim0;
    uint32_t align_type; uint32_t align;   /* general.alignment (type 0: absent) */
    int nested, dup_key, dup_tensor, bad_kv_type;
    uint64_t arr_n;              /* count of a u8 array */
} gg_spec;

static gg_spec gg_default(void)
{
    gg_spec s;
    memset(&s, 0, sizeof s);
    s.magic = KMED__GGUF_MAGIC; s.version = 3; s.n_tensors = 2; s.n_kv = 3;
    s.type1 = 0; s.ne0_1 = 32; s.off1 = 128; s.ndim0 = 1; s.arr_n = 3;
    return s;
}

static void gg_build(kmed_buf *b, const gg_spec *s)
{
    size_t i;
    b->len = 0;
    b_u32(b, s->magic); b_u32(b, s->version); b_u64(b, s->n_tensors);
    b_u64(b, s->n_kv + (s->align_type != 0));
    if (s->str_len_override) { b_u64(b, s->str_len_override); kmed_buf_puts(b, "general.name"); }
    else b_str(b, "general.name");
    b_u32(b, KMED_GGUF_STRING); b_str(b, "tiny");
    b_str(b, s->dup_key ? "general.name" : "k.arr");
    b_u32(b, KMED_GGUF_ARRAY);
    if (s->nested) { b_u32(b, KMED_GGUF_ARRAY); b_u64(b, 1); b_u32(b, KMED_GGUF_U8); b_u64(b, 1);
                     kmed_buf_put(b, "\x01", 1); }
    else { b_u32(b, KMED_GGUF_U8); b_u64(b, s->arr_n); kmed_buf_put(b, "\x01\x02\x03", 3); }
    b_str(b, "k.toks"); b_u32(b, s->bad_kv_type ? 13 : KMED_GGUF_ARRAY);
    b_u32(b, KMED_GGUF_STRING); b_u64(b, 2); b_str(b, "ab"); b_str(b, "");
    if (s->align_type) {
        b_str(b, "general.alignment"); b_u32(b, s->align_type); b_u32(b, s->align);
    }
    b_str(b, "t0"); b_u32(b, s->ndim0);
    for (i = 0; i < s->ndim0; i++) b_u64(b, i == 0 ? 32 : 1);
    b_u32(b, 0); b_u64(b, 0);
    b_str(b, s->dup_tensor ? "t0" : "t1"); b_u32(b, 2); b_u64(b, s->ne0_1); b_u64(b, 1);
    b_u32(b, s->type1); b_u64(b, s->off1);
    while (b->len % 32) kmed_buf_put(b, "", 1);
    for (i = 0; i < 256; i++) kmed_buf_put(b, "\x3f", 1); /* 2 x 32 floats */
}

static kmed_result gg_try(const gg_spec *s, kmed_error *e)
{
    kmed_buf b = {0};
    kmed_gguf g;
    kmed_result r;
    gg_build(&b, s);
    r = kmed__gguf_open_mem(&g, b.data, b.len, "t.gguf", e);
    if (r == KMED_OK) kmed_gguf_close(&g);
    kmed_buf_free(&b);
    return r;
}

static void test_gguf_malformed(void)
{
    kmed_error e = {0};
    kmed_buf b = {0};
    kmed_gguf g;
    gg_spec s = gg_default();
    size_t cut, oks = 0, need_end;
    char path[512];
    CHECK(gg_try(&s, &e) == KMED_OK);
    s.version = 2; CHECK(gg_try(&s, &e) == KMED_OK);
    s = gg_default(); s.magic = 0x46554746; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                                  strstr(e.msg, "magic"));
    s = gg_default(); s.version = 1; CHECK(gg_try(&s, &e) == KMED_ERR_UNSUPPORTED &&
                                           strstr(e.msg, "version 1"));
    s = gg_default(); s.version = 0x03000000; CHECK(gg_try(&s, &e) == KMED_ERR_UNSUPPORTED &&
                                                    strstr(e.msg, "big-endian"));
    s = gg_default(); s.n_kv = (uint64_t)1 << 40; CHECK(gg_try(&s, &e) == KMED_ERR_LIMIT);
    s = gg_default(); s.n_kv = 50000; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.n_kv = 4; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.n_tensors = (uint64_t)1 << 62; CHECK(gg_try(&s, &e) == KMED_ERR_LIMIT);
    s = gg_default(); s.n_tensors = 100000; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.str_len_override = 1u << 30; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                                           strstr(e.msg, "truncated"));
    s = gg_default(); s.str_len_override = UINT64_MAX; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.arr_n = (uint64_t)1 << 40; CHECK(gg_try(&s, &e) == KMED_ERR_LIMIT);
    s = gg_default(); s.arr_n = 1000; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.nested = 1; CHECK(gg_try(&s, &e) == KMED_ERR_UNSUPPORTED);
    s = gg_default(); s.dup_key = 1; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                           strstr(e.msg, "twice"));
    s = gg_default(); s.dup_tensor = 1; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.bad_kv_type = 1; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                               strstr(e.msg, "value type"));
    s = gg_default(); s.off1 = 4; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                        strstr(e.msg, "alignment"));
    s = gg_default(); s.off1 = 64; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                         strstr(e.msg, "overlap"));
    s = gg_default(); s.off1 = 256; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                          strstr(e.msg, "past the end"));
    s = gg_default(); s.off1 = UINT64_MAX - 31; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.ne0_1 = (uint64_t)1 << 40; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.ne0_1 = (uint64_t)1 << 63; CHECK(gg_try(&s, &e) == KMED_ERR_LIMIT);
    s = gg_default(); s.ndim0 = 5; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.ndim0 = 0; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.type1 = 8; s.ne0_1 = 33; CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT &&
                                                       strstr(e.msg, "multiple"));
    s = gg_default(); s.type1 = 8; s.ne0_1 = 64; CHECK(gg_try(&s, &e) == KMED_OK); /* 68 B */
    s = gg_default(); s.align_type = KMED_GGUF_U32; s.align = 48;
    CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT && strstr(e.msg, "alignment"));
    s = gg_default(); s.align_type = KMED_GGUF_I32; s.align = 32;
    CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT);
    s = gg_default(); s.align_type = KMED_GGUF_U32; s.align = 64; s.off1 = 96;
    CHECK(gg_try(&s, &e) == KMED_ERR_FORMAT); /* 96 is not a multiple of 64 */
    /* Unknown tensor types are listed with their name. */
    s = gg_default(); s.type1 = 12; s.ne0_1 = 256; s.off1 = 128;
    gg_build(&b, &s);
    b.len -= 256 - 128 - 144; /* Q4_K: 144 bytes per 256 */
    CHECK_OK(rc = kmed__gguf_open_mem(&g, b.data, b.len, "q4k", &e));
    if (rc == KMED_OK) {
        const kmed_tensor_info *t = kmed_gguf_find_tensor(&g, "t1");
        CHECK(t && t->dtype == KMED_DTYPE_UNKNOWN && t->ggml_type == 12 && t->nbytes == 144 &&
              strcmp(kmed_ggml_type_name(t->ggml_type), "Q4_K") == 0);
        kmed_gguf_close(&g);
    }
    s = gg_default(); s.type1 = 99;
    gg_build(&b, &s);
    CHECK_OK(rc = kmed__gguf_open_mem(&g, b.data, b.len, "t99", &e));
    if (rc == KMED_OK) {
        const kmed_tensor_info *t = kmed_gguf_find_tensor(&g, "t1");
        CHECK(t && t->dtype == KMED_DTYPE_UNKNOWN && t->ggml_type == 99 && t->nbytes == 0);
        kmed_gguf_close(&g);
    }
    /* Every truncation before the end of the last tensor fails; none crashes. */
    s = gg_default();
    gg_build(&b, &s);
    need_end = b.len;
    for (cut = 0; cut < need_end; cut++) {
        char *copy = (char *)malloc(cut + 1);
        memcpy(copy, b.data, cut);
        if (kmed__gguf_open_mem(&g, copy, cut, "cut", &e) == KMED_OK) {
            oks++;
            kmed_gguf_close(&g);
        }
        free(copy);
    }
    CHECKF(oks == 0, "GGUF truncations: %zu accepted", oks);
    /* Through a file too. */
    tmp_path(path, sizeof path, "bad.gguf");
    write_bytes(path, b.data, 40);
    CHECK(kmed_gguf_open(&g, path, &e) == KMED_ERR_FORMAT && strstr(e.msg, "bad.gguf") &&
          e.offset != (size_t)-1);
    remove(path);
    CHECK(kmed_gguf_open(&g, path, &e) == KMED_ERR_NOT_FOUND);
    kmed_buf_free(&b);
}

/* Random byte flips of valid images: any result is fine except a crash or a leak (run
   under ASan). */
static void test_mutations(const char *fx)
{
    kmed_buf b = {0};
    kmed_rng rng;
    gg_spec s = gg_default();
    int it, ok = 0;
    char *copy;
    (void)fx;
    kmed_rng_seed(&rng, 99);
    gg_build(&b, &s);
    copy = (char *)malloc(b.len);
    for (it = 0; it < 3000; it++) {
        kmed_gguf g;
        int k, nflip = 1 + (int)kmed_rng_below(&rng, 4);
        memcpy(copy, b.data, b.len);
        for (k = 0; k < nflip; k++)
            copy[kmed_rng_below(&rng, b.len)] = (char)kmed_rng_u64(&rng);
        if (kmed__gguf_open_mem(&g, copy, b.len, "m", NULL) == KMED_OK) {
            ok++;
            kmed_gguf_close(&g);
        }
    }
    free(copy);
    CHECK(ok > 0 && ok < 3000);
    st_image(&b, "{\"__metadata__\":{\"format\":\"pt\"},"
                 "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                 "\"b\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[16,24]}}", 24);
    copy = (char *)malloc(b.len);
    ok = 0;
    for (it = 0; it < 3000; it++) {
        kmed_st st;
        int k, nflip = 1 + (int)kmed_rng_below(&rng, 3);
        memcpy(copy, b.data, b.len);
        for (k = 0; k < nflip; k++)
            copy[kmed_rng_below(&rng, b.len)] = (char)kmed_rng_u64(&rng);
        if (kmed__st_open_mem(&st, copy, b.len, "m", NULL) == KMED_OK) { ok++; kmed_st_close(&st); }
    }
    free(copy);
    CHECK(ok > 0 && ok < 3000);
    kmed_buf_free(&b);
}

/* Fails each allocation of a parse in turn: every run must end in OK or NOMEM, never a
   crash or a leak (ASan checks the leaks). */
static void test_out_of_memory(void)
{
    kmed_buf gb = {0}, hb = {0}, sb = {0};
    gg_spec s = gg_default();
    long k;
    int bad = 0, nomem = 0, which;
    gg_build(&gb, &s);
    build_all_types_gguf(&hb);
    st_image(&sb, "{\"__metadata__\":{\"format\":\"pt\"},"
                  "\"a\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},"
                  "\"b\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[16,24]}}", 24);
    for (which = 0; which < 3; which++) {
        for (k = 0; k < 10000; k++) {
            kmed_result r;
            kmed_gguf g;
            kmed_st st;
            alloc_count = 0;
            alloc_fail_at = k;
            if (which == 0) {
                r = kmed__gguf_open_mem(&g, gb.data, gb.len, "oom", NULL);
                if (r == KMED_OK) kmed_gguf_close(&g);
            } else if (which == 1) {
                r = kmed__gguf_open_mem(&g, hb.data, hb.len, "oom", NULL);
                if (r == KMED_OK) kmed_gguf_close(&g);
            } else {
                r = kmed__st_open_mem(&st, sb.data, sb.len, "oom", NULL);
                if (r == KMED_OK) kmed_st_close(&st);
            }
            alloc_fail_at = -1;
            if (r == KMED_ERR_NOMEM) nomem++;
            else if (r != KMED_OK) { bad++; fprintf(stderr, "oom %d/%ld: %s\n", which, k,
                                                    kmed_result_str(r)); }
            if (alloc_count <= k) break; /* the k-th allocation never happened: all done */
        }
    }
    CHECKF(bad == 0 && nomem > 10, "out-of-memory runs: %d NOMEM, %d other errors", nomem, bad);
    kmed_buf_free(&gb);
    kmed_buf_free(&hb);
    kmed_buf_free(&sb);
}

/* Runs kmed-inspect with one option (may be NULL) and a path; returns its exit status with
   stdout in out and stderr in errs. */
static int run_inspect(const char *opt, const char *path, char *out, char *errs, size_t cap)
{
    char base[512], *argv[4];
    int argc = 0;
    argv[argc++] = (char *)"kmed-inspect";
    if (opt) argv[argc++] = (char *)opt;
    argv[argc++] = (char *)path;
    argv[argc] = NULL;
    tmp_path(base, sizeof base, "inspect");
    return kmed_test_run_tool(kmed_inspect_tool_main, argc, argv, -1, base, out, errs, cap);
}

/* kmed-inspect on GGUF files it cannot fully name: a tensor type newer than this build is
   shown by number, and a .gguf without the magic is an error naming the file (not
   "binary data"). */
static void test_inspect_cli(void)
{
    static char out[8192], errs[8192];
    char path[512];
    kmed_buf b = {0};
    gg_spec s = gg_default();
    int rc;
    s.type1 = 99;
    gg_build(&b, &s);
    tmp_path(path, sizeof path, "t99.gguf");
    write_bytes(path, b.data, b.len);
    rc = run_inspect(NULL, path, out, errs, sizeof out);
    CHECKF(rc == 0 && strstr(out, "t1    type 99 "), "exit %d: %s%s", rc, out, errs);
    rc = run_inspect("--json", path, out, errs, sizeof out);
    CHECKF(rc == 0 && strstr(out, "\"dtype\": \"type 99\""), "exit %d: %s%s", rc, out, errs);
    b.data[0] = 'X'; /* "XGUF" */
    tmp_path(path, sizeof path, "magic.gguf");
    write_bytes(path, b.data, b.len);
    rc = run_inspect(NULL, path, out, errs, sizeof out);
    CHECKF(rc == 1 && strstr(errs, path) && strstr(errs, "bad magic") && !out[0],
           "exit %d: %s%s", rc, out, errs);
    remove(path);
    tmp_path(path, sizeof path, "t99.gguf");
    remove(path);
    kmed_buf_free(&b);
}

int main(void)
{
    const char *fx = kmed_test_fixtures();
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kmed_test_io_bin.XXXXXX");
    if (!mkdtemp(tmpdir)) { fprintf(stderr, "mkdtemp failed\n"); return 1; }
    test_dtypes();
    test_st_roundtrip();
    test_gguf_roundtrip();
    test_st_malformed();
    test_st_dirs();
    test_gguf_malformed();
    test_mutations(fx);
    test_out_of_memory();
    test_inspect_cli();
    if (fx) {
        test_fixture_hf(fx);
        test_fixture_golden(fx);
        test_fixture_gguf(fx);
        test_gguf_rewrite_identical(fx);
        test_st_rewrite_identical(fx);
    }
    rmdir(tmpdir);
    (void)bf16_of;
    return kmed_test_done();
}

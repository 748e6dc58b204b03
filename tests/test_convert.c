/* Export: HF -> GGUF (F32) -> HF preserves every tensor exactly (fixture model and a random
   init); GGUF files written from the fixture's BF16 weights equal llama.cpp's Q8_0, Q4_0 and
   Q4_0 --pure files (metadata keys, types and values, tensor names, order, types, shapes,
   bytes); kmed_gemma_init_random (normal(0, 0.02), pad row and norms zero, deterministic,
   sharding); config.json round trip. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#define TMP "build/test_convert.tmp"

/* Byte-exact comparison of every tensor of two safetensors sources (file or dir). */
static void same_st(const char *a_path, const char *b_path, const char *what)
{
    kmed_error e = {0};
    kmed_st a, b;
    size_t i, diff = 0, missing = 0;
    CHECK_OK(kmed_st_open(&a, a_path, &e));
    CHECK_OK(kmed_st_open(&b, b_path, &e));
    if (e.code) return;
    CHECKF(a.n_tensors == b.n_tensors, "%s: %zu vs %zu tensors", what, a.n_tensors,
           b.n_tensors);
    for (i = 0; i < a.n_tensors; i++) {
        const kmed_tensor_info *x = &a.tensors[i], *y = kmed_st_find(&b, x->name);
        if (!y) { missing++; continue; }
        if (x->dtype != y->dtype || x->ndim != y->ndim || x->nbytes != y->nbytes ||
            memcmp(x->shape, y->shape, sizeof x->shape) != 0 ||
            memcmp(x->data, y->data, x->nbytes) != 0) {
            diff++;
            fprintf(stderr, "  %s: %s differs\n", what, x->name);
        }
    }
    CHECKF(missing == 0 && diff == 0, "%s: %zu missing, %zu different tensors", what, missing,
           diff);
    kmed_st_close(&a);
    kmed_st_close(&b);
}

/* 1 if two metadata values are identical (type and value; arrays element by element). */
static int same_kv(const kmed_gguf_kv *x, const kmed_gguf_kv *y)
{
    uint64_t i;
    if (x->type != y->type) return 0;
    switch (x->type) {
    case KMED_GGUF_STRING: return x->len == y->len && memcmp(x->str, y->str, x->len) == 0;
    case KMED_GGUF_F32: case KMED_GGUF_F64: return x->f == y->f;
    case KMED_GGUF_ARRAY:
        if (x->arr_type != y->arr_type || x->n != y->n) return 0;
        if (x->arr_type == KMED_GGUF_STRING) {
            for (i = 0; i < x->n; i++)
                if (x->str_lens[i] != y->str_lens[i] ||
                    memcmp(x->strs[i], y->strs[i], x->str_lens[i]) != 0) return 0;
            return 1;
        } else {
            size_t el = x->arr_type == KMED_GGUF_F32 || x->arr_type == KMED_GGUF_I32 ||
                        x->arr_type == KMED_GGUF_U32 ? 4 : x->arr_type <= 1 || x->arr_type == 7
                        ? 1 : x->arr_type <= 3 ? 2 : 8;
            return memcmp(x->raw, y->raw, (size_t)x->n * el) == 0;
        }
    default: return x->u == y->u && x->i == y->i;
    }
}

/* Compares our GGUF with llama.cpp's: keys, values and order; tensors, order, types,
   shapes and bytes. skip_tok: ignore tokenizer.* keys (written without a tokenizer). */
static void same_gguf(const char *ours, const char *ref, int skip_tok, const char *what)
{
    kmed_error e = {0};
    kmed_gguf a, b;
    size_t i, j = 0, bad_kv = 0, bad_t = 0;
    CHECK_OK(kmed_gguf_open(&a, ours, &e));
    CHECK_OK(kmed_gguf_open(&b, ref, &e));
    if (e.code) return;
    for (i = 0; i < b.n_kv; i++) {
        const kmed_gguf_kv *y = &b.kv[i];
        if (skip_tok && strncmp(y->key, "tokenizer.", 10) == 0) continue;
        if (j >= a.n_kv || strcmp(a.kv[j].key, y->key) != 0 || !same_kv(&a.kv[j], y)) {
            bad_kv++;
            fprintf(stderr, "  %s: key %s: ours %s\n", what, y->key,
                    j < a.n_kv ? a.kv[j].key : "(none)");
        }
        j++;
    }
    CHECKF(bad_kv == 0 && j == a.n_kv, "%s: %zu keys differ (%zu of ours, %zu compared)", what,
           bad_kv, a.n_kv, j);
    CHECKF(a.n_tensors == b.n_tensors && a.alignment == b.alignment, "%s: %zu vs %zu tensors",
           what, a.n_tensors, b.n_tensors);
    for (i = 0; i < a.n_tensors && i < b.n_tensors; i++) {
        const kmed_tensor_info *x = &a.tensors[i], *y = &b.tensors[i];
        if (strcmp(x->name, y->name) != 0 || x->ggml_type != y->ggml_type ||
            x->ndim != y->ndim || memcmp(x->shape, y->shape, sizeof x->shape) != 0 ||
            x->nbytes != y->nbytes || memcmp(x->data, y->data, x->nbytes) != 0) {
            bad_t++;
            fprintf(stderr, "  %s: tensor %zu %s / %s differs\n", what, i, x->name, y->name);
        }
    }
    CHECKF(bad_t == 0, "%s: %zu tensors differ", what, bad_t);
    kmed_gguf_close(&a);
    kmed_gguf_close(&b);
}

/* 1 if two files have the same bytes. */
static int same_file(const char *p, const char *q)
{
    kmed_map a, b;
    int same;
    if (kmed_map_open(&a, p, NULL) != KMED_OK) return 0;
    if (kmed_map_open(&b, q, NULL) != KMED_OK) { kmed_map_close(&a); return 0; }
    same = a.size == b.size && memcmp(a.data, b.data, a.size) == 0;
    kmed_map_close(&a);
    kmed_map_close(&b);
    return same;
}

static void test_fixture(const char *fx)
{
    kmed_error e = {0};
    kmed_gemma m, g;
    kmed_tok tok;
    kmed_gguf_save_opts go;
    kmed_hf_save_opts ho;
    char hf[1100], ref[1200], tj[1200];
    int have_tok, k;

    snprintf(hf, sizeof hf, "%s/tiny-gemma2", fx);
    snprintf(tj, sizeof tj, "%s/gemma2-tokenizer/tokenizer.json", fx);
    CHECK_OK(kmed_gemma_load(&m, hf, NULL, &e)); /* BF16 as stored */
    if (e.code) return;

    /* HF -> GGUF F32 -> HF BF16: every tensor byte-identical to the fixture shards. */
    memset(&go, 0, sizeof go);
    go.type = KMED_F32;
    go.name = "tiny-gemma2";
    CHECK_OK(kmed_gemma_save_gguf(&m, NULL, TMP "/f32.gguf", &go, &e));
    CHECK_OK(kmed_gemma_load(&g, TMP "/f32.gguf", NULL, &e));
    CHECK(g.embed.type == KMED_F32 && g.layers && g.layers[0].q.type == KMED_F32);
    memset(&ho, 0, sizeof ho);
    ho.dtype = KMED_BF16;
    ho.max_shard_bytes = 32845000; /* the fixture's split: embed + layer 0 | layer 1 + norm */
    CHECK_OK(kmed_gemma_save_hf(&g, TMP "/hf_rt", &ho, &e));
    same_st(hf, TMP "/hf_rt", "HF -> GGUF F32 -> HF");
    {
        /* Also byte-identical files and the same index as the fixture's. */
        char a[1300], b[1300];
        snprintf(a, sizeof a, "%s/model-00001-of-00002.safetensors", hf);
        CHECKF(same_file(a, TMP "/hf_rt/model-00001-of-00002.safetensors"),
               "shard 1 bytes differ from the fixture");
        snprintf(a, sizeof a, "%s/model-00002-of-00002.safetensors", hf);
        CHECKF(same_file(a, TMP "/hf_rt/model-00002-of-00002.safetensors"),
               "shard 2 bytes differ from the fixture");
        snprintf(b, sizeof b, "%s/model.safetensors.index.json", hf);
        CHECKF(same_file(b, TMP "/hf_rt/model.safetensors.index.json"),
               "index json differs from the fixture");
    }
    /* and the written config reads back to the same config */
    {
        kmed_gemma_config c2;
        CHECK_OK(kmed_gemma_config_load(&c2, TMP "/hf_rt", &e));
        CHECK(memcmp(&c2, &m.cfg, sizeof c2) == 0);
    }
    kmed_gemma_free(&g);
    /* F32 HF out of the F32 GGUF: exact too (bf16 values widen exactly). */
    CHECK_OK(kmed_gemma_load(&g, TMP "/f32.gguf", NULL, &e));
    ho.dtype = KMED_F32;
    ho.max_shard_bytes = 0;
    CHECK_OK(kmed_gemma_save_hf(&g, TMP "/hf_f32", &ho, &e));
    {
        kmed_st a, b;
        size_t i, bad = 0;
        CHECK_OK(kmed_st_open(&a, hf, &e));
        CHECK_OK(kmed_st_open(&b, TMP "/hf_f32", &e));
        for (i = 0; i < a.n_tensors && !e.code; i++) {
            const kmed_tensor_info *x = &a.tensors[i], *y = kmed_st_find(&b, x->name);
            size_t k, n = (size_t)kmed_tensor_numel(x);
            if (!y || y->dtype != KMED_F32 || kmed_tensor_numel(y) != n) { bad++; continue; }
            for (k = 0; k < n; k++)
                if (kmed_bf16_to_f32(((const uint16_t *)x->data)[k]) !=
                    ((const float *)y->data)[k]) { bad++; break; }
        }
        CHECKF(bad == 0, "F32 export: %zu tensors differ from the bf16 source", bad);
        kmed_st_close(&a);
        kmed_st_close(&b);
    }
    kmed_gemma_free(&g);

    /* GGUF from the BF16 weights equals llama.cpp's quantized files. */
    e.code = KMED_OK;
    have_tok = kmed_tok_load(&tok, tj, &e) == KMED_OK;
    CHECKF(have_tok, "tokenizer: %s", e.msg);
    go.tokenizer_json = tj;
    go.type = KMED_Q8_0;
    CHECK_OK(kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, TMP "/q8_0.gguf", &go, &e));
    snprintf(ref, sizeof ref, "%s/gguf/tiny-gemma2-q8_0.gguf", hf);
    same_gguf(TMP "/q8_0.gguf", ref, !have_tok, "Q8_0");
    CHECKF(have_tok && same_file(TMP "/q8_0.gguf", ref), "Q8_0 file not byte-identical");
    go.type = KMED_Q4_0;
    CHECK_OK(kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, TMP "/q4_0p.gguf", &go, &e));
    snprintf(ref, sizeof ref, "%s/gguf/tiny-gemma2-q4_0-pure.gguf", hf);
    same_gguf(TMP "/q4_0p.gguf", ref, !have_tok, "Q4_0 pure");
    CHECKF(have_tok && same_file(TMP "/q4_0p.gguf", ref), "Q4_0 pure not byte-identical");
    go.mixed = 1;
    CHECK_OK(kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, TMP "/q4_0.gguf", &go, &e));
    snprintf(ref, sizeof ref, "%s/gguf/tiny-gemma2-q4_0.gguf", hf);
    same_gguf(TMP "/q4_0.gguf", ref, !have_tok, "Q4_0 mixed");
    CHECKF(have_tok && same_file(TMP "/q4_0.gguf", ref), "Q4_0 mixed not byte-identical");
    go.mixed = 0;

    /* A quantized model re-exported in its own type keeps its blocks: Q8_0 -> Q8_0. */
    CHECK_OK(kmed_gemma_load(&g, ref, NULL, &e));
    go.type = KMED_Q4_0;
    go.mixed = 1;
    CHECK_OK(kmed_gemma_save_gguf(&g, have_tok ? &tok : NULL, TMP "/q4_0b.gguf", &go, &e));
    CHECK(have_tok && same_file(TMP "/q4_0b.gguf", ref));
    /* ... also without a tokenizer, taking the tokenizer keys from the source GGUF */
    {
        kmed_gguf src;
        CHECK_OK(kmed_gguf_open(&src, ref, &e));
        go.tok_from = &src;
        CHECK_OK(kmed_gemma_save_gguf(&g, NULL, TMP "/q4_0c.gguf", &go, &e));
        CHECK(same_file(TMP "/q4_0c.gguf", ref));
        go.tok_from = NULL;
        kmed_gguf_close(&src);
    }
    kmed_gemma_free(&g);

    /* Merging an adapter while writing equals merging in place, then writing: the golden
       adapter, then one with trainable tokens (embedding rows replaced). */
    for (k = 0; k < 2; k++) {
        kmed_gemma mf;
        kmed_gemma_opts lo;
        kmed_lora lora;
        char ad[1200];
        memset(&lo, 0, sizeof lo);
        lo.convert = 1;
        lo.type = KMED_F32;
        snprintf(ad, sizeof ad, "%s/golden/lora_init", hf);
        CHECK_OK(kmed_gemma_load(&mf, hf, &lo, &e));
        if (k == 0) CHECK_OK(kmed_lora_load(&lora, &mf, ad, &e));
        else {
            static const int tokens[2] = {300, 7};
            kmed_lora_config lc;
            size_t i;
            memset(&lc, 0, sizeof lc);
            lc.r = 2;
            lc.targets = 1u << KMED_LORA_Q;
            lc.seed = 3;
            lc.tokens = tokens;
            lc.n_tokens = 2;
            CHECK_OK(kmed_lora_create(&lora, &mf, &lc, &e));
            for (i = 0; i < 2 * (size_t)mf.cfg.hidden_size; i++)
                lora.token_rows[i] = (float)i * 0.01f - 0.3f;
            for (i = 0; i < (size_t)mf.cfg.hidden_size * 2; i++)   /* B: q_proj changes */
                lora.ab[0][KMED_LORA_Q].B[i] = 0.1f;
        }
        memset(&ho, 0, sizeof ho);
        ho.lora = &lora;
        CHECK_OK(kmed_gemma_save_hf(&mf, TMP "/merged_stream", &ho, &e));
        memset(&go, 0, sizeof go);
        go.lora = &lora;
        CHECK_OK(kmed_gemma_save_gguf(&mf, NULL, TMP "/merged_stream.gguf", &go, &e));
        CHECK_OK(kmed_lora_merge(&mf, &lora, &e));
        ho.lora = NULL;
        go.lora = NULL;
        CHECK_OK(kmed_gemma_save_hf(&mf, TMP "/merged_inplace", &ho, &e));
        CHECK_OK(kmed_gemma_save_gguf(&mf, NULL, TMP "/merged_inplace.gguf", &go, &e));
        same_st(TMP "/merged_inplace", TMP "/merged_stream", "streamed merge");
        CHECK(same_file(TMP "/merged_inplace.gguf", TMP "/merged_stream.gguf"));
        /* and the merge changed the adapted weights only */
        {
            kmed_st a, b;
            const kmed_tensor_info *x, *y;
            CHECK_OK(kmed_st_open(&a, TMP "/hf_f32", &e));
            CHECK_OK(kmed_st_open(&b, TMP "/merged_inplace", &e));
            x = kmed_st_find(&a, "model.layers.0.self_attn.q_proj.weight");
            y = kmed_st_find(&b, "model.layers.0.self_attn.q_proj.weight");
            CHECK(x && y && x->nbytes == y->nbytes && memcmp(x->data, y->data, x->nbytes));
            x = kmed_st_find(&a, "model.embed_tokens.weight");
            y = kmed_st_find(&b, "model.embed_tokens.weight");
            CHECK(x && y && x->nbytes == y->nbytes);
            if (x && y && x->nbytes == y->nbytes && k == 0)
                CHECK(!memcmp(x->data, y->data, x->nbytes));
            if (x && y && x->nbytes == y->nbytes && k == 1) {   /* rows 7 and 300 only */
                size_t rb = x->nbytes / (size_t)x->shape[0], r, differ = 0;
                for (r = 0; r < (size_t)x->shape[0]; r++)
                    differ += memcmp((const char *)x->data + r * rb,
                                     (const char *)y->data + r * rb, rb) != 0;
                CHECK(differ == 2);
                CHECK(!memcmp((const char *)y->data + 7 * rb, lora.token_rows, rb));
            }
            kmed_st_close(&a);
            kmed_st_close(&b);
        }
        kmed_lora_free(&lora);
        kmed_gemma_free(&mf);
        go.type = KMED_Q4_0;
        go.mixed = 1;
        go.tokenizer_json = tj;
    }

    /* A query scale llama.cpp cannot express is refused, not silently changed. */
    m.cfg.query_pre_attn_scalar = 20.0f;
    CHECK(kmed_gemma_save_gguf(&m, NULL, TMP "/bad.gguf", &go, &e) == KMED_ERR_UNSUPPORTED);
    m.cfg.query_pre_attn_scalar = 16.0f;
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&m);
}

static void test_init_random(void)
{
    kmed_error e = {0};
    kmed_gemma_config c;
    kmed_hf_save_opts ho;
    kmed_gemma m, g;
    kmed_gguf_save_opts go;
    kmed_st st;
    const kmed_tensor_info *t;
    memset(&c, 0, sizeof c);
    c.vocab_size = 512;
    c.hidden_size = 64;
    c.intermediate_size = 96;
    c.n_layers = 3;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 16;
    c.query_pre_attn_scalar = 16;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000;
    c.attn_softcap = 50;
    c.final_softcap = 30;
    c.sliding_window = 8;
    c.max_position = 256;
    c.bos_id = 2;
    c.eos_id = 1;
    c.pad_id = 0;
    memset(&ho, 0, sizeof ho);
    CHECK_OK(kmed_gemma_init_random(&c, 7, NULL, TMP "/init", &ho, &e));
    CHECK_OK(kmed_st_open(&st, TMP "/init", &e));
    if (e.code) return;
    CHECK(st.n_tensors == 2 + 11 * 3);
    t = kmed_st_find(&st, "model.embed_tokens.weight");
    CHECK(t && t->dtype == KMED_F32 && t->shape[0] == 512 && t->shape[1] == 64);
    if (t) {
        const float *x = (const float *)t->data;
        double s = 0, s2 = 0;
        size_t i, n = 512 * 64, zero = 0;
        for (i = 0; i < 64; i++) zero += x[i] == 0.0f;
        CHECK(zero == 64); /* pad row */
        for (i = 64; i < n; i++) { s += x[i]; s2 += (double)x[i] * x[i]; }
        s /= (double)(n - 64);
        s2 = sqrt(s2 / (double)(n - 64) - s * s);
        CHECKF(fabs(s) < 0.001 && fabs(s2 - 0.02) < 0.0005, "embed mean %g std %g", s, s2);
    }
    t = kmed_st_find(&st, "model.layers.2.post_feedforward_layernorm.weight");
    CHECK(t && t->ndim == 1 && t->shape[0] == 64 && ((const float *)t->data)[5] == 0.0f);
    t = kmed_st_find(&st, "model.layers.1.self_attn.k_proj.weight");
    CHECK(t && t->shape[0] == 32 && t->shape[1] == 64);
    kmed_st_close(&st);
    /* same seed, sharded bf16: the bf16 rounding of the same values */
    ho.dtype = KMED_BF16;
    ho.max_shard_bytes = 40000;
    CHECK_OK(kmed_gemma_init_random(&c, 7, NULL, TMP "/init_sh", &ho, &e));
    {
        kmed_st a, b;
        size_t i, bad = 0;
        CHECK_OK(kmed_st_open(&a, TMP "/init", &e));
        CHECK_OK(kmed_st_open(&b, TMP "/init_sh", &e));
        CHECK(b.n_tensors == a.n_tensors);
        for (i = 0; i < a.n_tensors && !e.code; i++) {
            const kmed_tensor_info *x = &a.tensors[i], *y = kmed_st_find(&b, x->name);
            size_t k, n = (size_t)kmed_tensor_numel(x);
            if (!y || y->dtype != KMED_BF16) { bad++; continue; }
            for (k = 0; k < n; k++)
                if (kmed_f32_to_bf16(((const float *)x->data)[k]) !=
                    ((const uint16_t *)y->data)[k]) { bad++; break; }
        }
        CHECKF(bad == 0, "sharded bf16 init: %zu tensors differ", bad);
        kmed_st_close(&a);
        kmed_st_close(&b);
    }
    {
        FILE *f = fopen(TMP "/init_sh/model.safetensors.index.json", "rb");
        CHECK(f != NULL);
        if (f) fclose(f);
    }

    /* Round trip of the fresh model through GGUF F32. */
    CHECK_OK(kmed_gemma_load(&m, TMP "/init", NULL, &e));
    memset(&go, 0, sizeof go);
    CHECK_OK(kmed_gemma_save_gguf(&m, NULL, TMP "/init.gguf", &go, &e));
    CHECK_OK(kmed_gemma_load(&g, TMP "/init.gguf", NULL, &e));
    ho.dtype = KMED_F32;
    ho.max_shard_bytes = 0;
    CHECK_OK(kmed_gemma_save_hf(&g, TMP "/init_rt", &ho, &e));
    same_st(TMP "/init/model.safetensors", TMP "/init_rt/model.safetensors",
            "init -> GGUF F32 -> HF");
    CHECK(memcmp(&g.cfg, &m.cfg, sizeof g.cfg) == 0);
    /* Q8_0 export of a model loaded as Q8_0 equals quantizing the F32 model directly. */
    kmed_gemma_free(&g);
    {
        kmed_gemma_opts lo;
        memset(&lo, 0, sizeof lo);
        lo.convert = 1;
        lo.type = KMED_Q8_0;
        go.type = KMED_Q8_0;
        CHECK_OK(kmed_gemma_save_gguf(&m, NULL, TMP "/init_q8a.gguf", &go, &e));
        CHECK_OK(kmed_gemma_load(&g, TMP "/init", &lo, &e));
        CHECK_OK(kmed_gemma_save_gguf(&g, NULL, TMP "/init_q8b.gguf", &go, &e));
        CHECK(same_file(TMP "/init_q8a.gguf", TMP "/init_q8b.gguf"));
        kmed_gemma_free(&g);
    }
    kmed_gemma_free(&m);

    /* Bad configs and types are errors. */
    c.n_kv_heads = 3;
    CHECK(kmed_gemma_init_random(&c, 7, NULL, TMP "/bad", NULL, &e) != KMED_OK);
    c.n_kv_heads = 2;
    ho.dtype = KMED_Q8_0;
    CHECK(kmed_gemma_init_random(&c, 7, NULL, TMP "/bad", &ho, &e) == KMED_ERR_UNSUPPORTED);
}

int main(void)
{
    const char *fx = kmed_test_fixtures();
    kmed_error e = {0};
    CHECK_OK(kmed_mkdir_p(TMP, &e));
    test_init_random();
    if (fx) test_fixture(fx);
    return kmed_test_done();
}

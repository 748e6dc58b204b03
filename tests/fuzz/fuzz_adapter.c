/* libFuzzer harness for PEFT adapter loading (kmed_lora_load: adapter_config.json +
   adapter_model.safetensors) against a tiny Gemma-2. An input is
   [adapter_config.json] NUL [safetensors header JSON] NUL [tensor bytes]; the harness puts
   the 8-byte header length in front, so mutations reach the name/shape/dtype checks
   instead of dying on the length. Without a NUL the whole input is the config and the
   safetensors file is a valid adapter made at start-up. An adapter that loads must have
   every A/B it claims, give finite-or-not merged weights without reading out of bounds,
   and save and load again to the same tensors.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_adapter.c -o build/fuzz_adapter -lm -lpthread
   build/fuzz_adapter -max_total_time=30 tests/fuzz/corpus/adapter
   Writing a seed (config NUL header NUL data) of the start-up adapter to FILE:
   build/fuzz_adapter_seed FILE (built with -DFUZZ_ADAPTER_SEED_MAIN, no libFuzzer) */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

/* V 16, C 8, F 16, L 2, H 2, Hkv 1, D 4: every LoRA target has a distinct shape pair. */
#define FA_L 2
typedef struct fuzz_adapter_state {
    kmed_gemma m;
    float w[FA_L][KMED_LORA_NTARGETS][16 * 16];
    float embed[16 * 8];
    char dir[64], dir2[80];
    char *cfg, *st;          /* the start-up adapter's two files */
    size_t cfg_len, st_len;
    int init, st_on_disk; /* the start-up safetensors is in dir (skip rewriting it) */
} fuzz_adapter_state;

static fuzz_adapter_state *fa_state(void)
{
    static fuzz_adapter_state s; /* the harness's own cache; the library keeps no globals */
    kmed_gemma_config c;
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_error e;
    char path[128];
    int l, t;
    size_t i;
    if (s.init) return &s;
    s.init = 1;
    memset(&c, 0, sizeof c);
    c.vocab_size = 16; c.hidden_size = 8; c.intermediate_size = 16; c.n_layers = FA_L;
    c.n_heads = 2; c.n_kv_heads = 1; c.head_dim = 4; c.query_pre_attn_scalar = 4;
    c.rms_norm_eps = 1e-6f; c.rope_theta = 10000; c.max_position = 64; c.bos_id = 2;
    c.eos_id = 1;
    if (kmed_gemma_init(&s.m, &c, &e) != KMED_OK) abort();
    for (l = 0; l < FA_L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            kmed_weight *w = t == KMED_LORA_Q ? &s.m.layers[l].q : t == KMED_LORA_K ?
                &s.m.layers[l].k : t == KMED_LORA_V ? &s.m.layers[l].v : t == KMED_LORA_O ?
                &s.m.layers[l].o : t == KMED_LORA_GATE ? &s.m.layers[l].gate :
                t == KMED_LORA_UP ? &s.m.layers[l].up : &s.m.layers[l].down;
            /* q [H*D, C], k/v [Hkv*D, C], o [C, H*D], gate/up [F, C], down [C, F] */
            static const size_t rows[KMED_LORA_NTARGETS] = {8, 4, 4, 8, 16, 16, 8};
            for (i = 0; i < 16 * 16; i++) s.w[l][t][i] = (float)((i * 7 + l + t) % 11) * 0.1f;
            w->data = s.w[l][t];
            w->type = KMED_F32;
            w->rows = rows[t];
            w->cols = t == KMED_LORA_DOWN ? 16 : 8;
        }
    s.m.embed.data = s.embed;
    s.m.embed.type = KMED_F32;
    s.m.embed.rows = 16;
    s.m.embed.cols = 8;
    if (kmed_gemma_validate(&s.m, &e) != KMED_OK) { fprintf(stderr, "%s\n", e.msg); abort(); }
    /* tmpfs when there is one: every input rewrites these files */
    snprintf(s.dir, sizeof s.dir, "%s/kmed_fuzz_adapter_%ld",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp", (long)getpid());
    snprintf(s.dir2, sizeof s.dir2, "%s/again", s.dir);
    memset(&lc, 0, sizeof lc);
    lc.r = 2;
    lc.alpha = 3;
    lc.targets = (1u << KMED_LORA_Q) | (1u << KMED_LORA_V) | (1u << KMED_LORA_DOWN);
    lc.layers = 2; /* layer 1 only: layers_to_transform is written */
    lc.seed = 7;
    if (kmed_lora_create(&lora, &s.m, &lc, &e) != KMED_OK) abort();
    lora.ab[1][KMED_LORA_V].B[3] = 0.25f; /* B is zero after init: give it a value */
    if (kmed_lora_save(&lora, s.dir, "tiny", &e) != KMED_OK) abort();
    kmed_lora_free(&lora);
    snprintf(path, sizeof path, "%s/adapter_config.json", s.dir);
    if (kmed_file_read(path, 0, &s.cfg, &s.cfg_len, &e) != KMED_OK) abort();
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", s.dir);
    if (kmed_file_read(path, 0, &s.st, &s.st_len, &e) != KMED_OK) abort();
    return &s;
}

static void fa_write(const char *dir, const char *name, const void *a, size_t na,
                     const void *b, size_t nb)
{
    char path[128];
    FILE *f;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    f = fopen(path, "wb");
    if (!f) abort();
    if (na) fwrite(a, 1, na, f);
    if (nb) fwrite(b, 1, nb, f);
    fclose(f);
}

static void fa_check_loaded(fuzz_adapter_state *s, kmed_lora *lora)
{
    kmed_lora again;
    kmed_error e;
    static float out[16 * 16];
    int l, t;
    FUZZ_CHECK(lora->n_layers == FA_L && lora->r > 0 && lora->ab);
    FUZZ_CHECK(isfinite(lora->alpha) && isfinite(lora->scale));
    for (l = 0; l < FA_L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            FUZZ_CHECK(!lora->ab[l][t].A == !lora->ab[l][t].B);
            if (lora->ab[l][t].A) FUZZ_CHECK((lora->targets >> t) & 1);
            FUZZ_CHECK(kmed_lora_merged_weight(&s->m, lora, l, t, out, &e) == KMED_OK);
        }
    /* save + load gives the same tensors (F16/BF16 came in widened to F32, exactly) */
    if (kmed_lora_save(lora, s->dir2, NULL, &e) != KMED_OK) {
        fprintf(stderr, "%s\n", e.msg);
        FUZZ_CHECK(0);
    }
    if (kmed_lora_load(&again, &s->m, s->dir2, &e) != KMED_OK) {
        fprintf(stderr, "%s\n", e.msg);
        FUZZ_CHECK(0);
    }
    FUZZ_CHECK(again.r == lora->r && again.targets == lora->targets);
    FUZZ_CHECK(again.alpha == lora->alpha && again.scale == lora->scale); /* rsLoRA too */
    FUZZ_CHECK(kmed_lora_numel(&again) == kmed_lora_numel(lora));
    FUZZ_CHECK(again.n_tokens == lora->n_tokens);
    for (t = 0; t < lora->n_tokens; t++) {   /* ids ascending, in range, rows kept */
        FUZZ_CHECK(lora->token_ids[t] >= 0 && lora->token_ids[t] < 16);
        FUZZ_CHECK(t == 0 || lora->token_ids[t] > lora->token_ids[t - 1]);
        FUZZ_CHECK(again.token_ids[t] == lora->token_ids[t]);
        FUZZ_CHECK(kmed_lora_token_row(lora, lora->token_ids[t]) ==
                   lora->token_rows + (size_t)t * 8);
    }
    if (lora->n_tokens)
        FUZZ_CHECK(!memcmp(again.token_rows, lora->token_rows,
                           (size_t)lora->n_tokens * 8 * sizeof(float)));
    for (l = 0; l < FA_L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t out_, in_;
            if (!lora->ab[l][t].A) { FUZZ_CHECK(!again.ab[l][t].A); continue; }
            FUZZ_CHECK(again.ab[l][t].A && again.ab[l][t].B);
            kmed__lora_dims(&s->m.cfg, t, &out_, &in_);
            FUZZ_CHECK(!memcmp(again.ab[l][t].A, lora->ab[l][t].A,
                               (size_t)lora->r * in_ * sizeof(float)));
            FUZZ_CHECK(!memcmp(again.ab[l][t].B, lora->ab[l][t].B,
                               (size_t)lora->r * out_ * sizeof(float)));
        }
    kmed_lora_free(&again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_adapter_state *s = fa_state();
    const uint8_t *nul = (const uint8_t *)memchr(data, 0, size), *nul2;
    kmed_lora lora;
    kmed_error e;
    kmed_result r;
    size_t clen = nul ? (size_t)(nul - data) : size;
    fa_write(s->dir, "adapter_config.json", data, clen, NULL, 0);
    if (!nul) {
        if (!s->st_on_disk)
            fa_write(s->dir, "adapter_model.safetensors", s->st, s->st_len, NULL, 0);
        s->st_on_disk = 1;
    } else {
        const uint8_t *h = nul + 1;
        size_t rest = size - clen - 1, hlen, i;
        unsigned char len8[8];
        nul2 = (const uint8_t *)memchr(h, 0, rest);
        hlen = nul2 ? (size_t)(nul2 - h) : rest;
        for (i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
        {
            unsigned char *img = (unsigned char *)malloc(8 + rest);
            if (!img) return 0;
            memcpy(img, len8, 8);
            memcpy(img + 8, h, hlen);
            if (nul2) memcpy(img + 8 + hlen, nul2 + 1, rest - hlen - 1);
            fa_write(s->dir, "adapter_model.safetensors", img, 8 + rest - (nul2 ? 1 : 0),
                     NULL, 0);
            s->st_on_disk = 0;
            free(img);
        }
    }
    memset(&e, 0, sizeof e);
    r = kmed_lora_load(&lora, &s->m, s->dir, &e);
    if (r != KMED_OK) {
        FUZZ_CHECK(e.code < 0 && e.msg[0]);
        FUZZ_CHECK(lora.ab == NULL && lora.impl_ == NULL);
        return 0;
    }
    fa_check_loaded(s, &lora);
    kmed_lora_free(&lora);
    return 0;
}

#ifdef FUZZ_ADAPTER_SEED_MAIN
/* Writes the start-up adapter as one seed input: config NUL header NUL data. */
int main(int argc, char **argv)
{
    fuzz_adapter_state *s;
    FILE *f;
    uint64_t hlen = 0;
    int i;
    if (argc != 2) { fprintf(stderr, "usage: %s FILE\n", argv[0]); return 2; }
    s = fa_state();
    for (i = 0; i < 8; i++) hlen |= (uint64_t)(unsigned char)s->st[i] << (8 * i);
    f = fopen(argv[1], "wb");
    if (!f) return 1;
    fwrite(s->cfg, 1, s->cfg_len, f);
    fputc(0, f);
    fwrite(s->st + 8, 1, (size_t)hlen, f);
    fputc(0, f);
    fwrite(s->st + 8 + hlen, 1, s->st_len - 8 - (size_t)hlen, f);
    return fclose(f) != 0;
}
#endif

/* libFuzzer harness for the Gemma-2 config readers: kmed_gemma_config_parse (config.json)
   and kmed_gemma_config_from_gguf (GGUF metadata). The first input byte picks the reader
   (even: JSON, odd: GGUF); the rest is the file. A config that is accepted must pass
   kmed_gemma_config_validate, and one from JSON must give the same config when written
   back out with HF's key names and parsed again.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_config.c -o build/fuzz_config -lm -lpthread
   build/fuzz_config -max_total_time=30 tests/fuzz/corpus/config */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>

#define FUZZ_CHECK(c) \
    do { if (!(c)) { fprintf(stderr, "check failed: %s\n", #c); abort(); } } while (0)

/* config.json text for c, with every field explicit (soft-caps/window 0 as null). */
static void fuzz_config_write(kmed_buf *b, const kmed_gemma_config *c)
{
    kmed_buf_printf(b, "{\"model_type\":\"gemma2\",\"vocab_size\":%d,\"hidden_size\":%d,"
                    "\"intermediate_size\":%d,\"num_hidden_layers\":%d,"
                    "\"num_attention_heads\":%d,\"num_key_value_heads\":%d,\"head_dim\":%d,",
                    c->vocab_size, c->hidden_size, c->intermediate_size, c->n_layers,
                    c->n_heads, c->n_kv_heads, c->head_dim);
    kmed_buf_puts(b, "\"query_pre_attn_scalar\":");
    kmed_buf_json_f32(b, c->query_pre_attn_scalar);
    kmed_buf_puts(b, ",\"rms_norm_eps\":");
    kmed_buf_json_f32(b, c->rms_norm_eps);
    kmed_buf_puts(b, ",\"rope_theta\":");
    kmed_buf_json_f32(b, c->rope_theta);
    kmed_buf_puts(b, ",\"attn_logit_softcapping\":");
    if (c->attn_softcap > 0.0f) kmed_buf_json_f32(b, c->attn_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_puts(b, ",\"final_logit_softcapping\":");
    if (c->final_softcap > 0.0f) kmed_buf_json_f32(b, c->final_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\"sliding_window\":%d,\"max_position_embeddings\":%d,"
                    "\"bos_token_id\":%d,\"eos_token_id\":%d,\"pad_token_id\":%d}",
                    c->sliding_window, c->max_position, c->bos_id, c->eos_id, c->pad_id);
}

static void fuzz_config_json(const char *text, size_t len)
{
    kmed_gemma_config c, c2;
    kmed_error err;
    kmed_buf b = {0};
    memset(&err, 0, sizeof err);
    if (kmed_gemma_config_parse(&c, text, len, "config.json", &err) != KMED_OK) {
        FUZZ_CHECK(err.code < 0 && err.msg[0]);
        return;
    }
    FUZZ_CHECK(kmed_gemma_config_validate(&c, &err) == KMED_OK);
    fuzz_config_write(&b, &c);
    FUZZ_CHECK(!b.failed);
    if (kmed_gemma_config_parse(&c2, b.data, b.len, "again", &err) != KMED_OK) {
        fprintf(stderr, "%s\n%s\n", b.data, err.msg);
        FUZZ_CHECK(0);
    }
    /* sliding_window 0 is written as 0 and soft-caps 0 as null: both read back as 0 */
    FUZZ_CHECK(memcmp(&c, &c2, sizeof c) == 0);
    kmed_buf_free(&b);
}

static void fuzz_config_gguf(const unsigned char *d, size_t size)
{
    kmed_gguf g;
    kmed_gemma_config c;
    kmed_error err;
    memset(&err, 0, sizeof err);
    if (kmed__gguf_open_mem(&g, d, size, "fuzz.gguf", &err) != KMED_OK) return;
    if (kmed_gemma_config_from_gguf(&c, &g, &err) == KMED_OK)
        FUZZ_CHECK(kmed_gemma_config_validate(&c, &err) == KMED_OK);
    else
        FUZZ_CHECK(err.code < 0 && err.msg[0]);
    kmed_gguf_close(&g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* an exact-size copy, so reading past the end is caught */
    unsigned char *d;
    if (size == 0) return 0;
    d = (unsigned char *)malloc(size - 1 ? size - 1 : 1);
    if (!d) return 0;
    memcpy(d, data + 1, size - 1);
    if (data[0] & 1) fuzz_config_gguf(d, size - 1);
    else fuzz_config_json((const char *)d, size - 1);
    free(d);
    return 0;
}

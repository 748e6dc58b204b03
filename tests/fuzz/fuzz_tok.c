/* Fuzz target for the tokenizer on text: any bytes as text must encode (or be refused as
   invalid UTF-8 by tokenizer.json models), decode back, and render in a chat prompt.
   The first input byte picks the tokenizer (mod 3): 1 a tiny tokenizer.json, 2
   tests/data/spm/bpe_nfkc.model, 0 the Gemma-2 fixture tokenizer (if $KMED_FIXTURES or
   ../shared/fixtures has it). Malformed tokenizer files are fuzzed by fuzz_tokjson.c
   (tokenizer.json) and fuzz_tokmodel.c (SentencePiece tokenizer.model).
   libFuzzer (run from the repo root):
     clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -I. tests/fuzz/fuzz_tok.c \
       -o build/fuzz_tok -lm -lpthread && build/fuzz_tok -max_total_time=60
   Without libFuzzer, a random-mutation driver over built-in seeds (N iterations):
     cc -std=c99 -O1 -g -fsanitize=address,undefined -DKMED_FUZZ_MAIN -I. tests/fuzz/fuzz_tok.c \
       -o build/fuzz_tok_main -lm -lpthread && build/fuzz_tok_main 20000 */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include "fuzz_tok.h"

static const char tiny_json[] =
    "{\"added_tokens\":[{\"id\":5,\"content\":\"<s>\",\"special\":true,\"normalized\":false},"
    "{\"id\":6,\"content\":\"\\u2581\\u2581\",\"special\":false,\"normalized\":false,"
    "\"lstrip\":true,\"rstrip\":true},{\"id\":7,\"content\":\"ab\",\"special\":false,"
    "\"normalized\":true,\"single_word\":true}],"
    "\"normalizer\":{\"type\":\"Sequence\",\"normalizers\":[{\"type\":\"Prepend\",\"prepend\":"
    "\"\\u2581\"},{\"type\":\"Replace\",\"pattern\":{\"String\":\" \"},\"content\":\"\\u2581\"}]},"
    "\"pre_tokenizer\":{\"type\":\"Split\",\"pattern\":{\"String\":\"\\u2581\"},\"behavior\":"
    "\"Isolated\",\"invert\":false},\"post_processor\":{\"type\":\"TemplateProcessing\","
    "\"single\":[{\"SpecialToken\":{\"id\":\"<s>\"}},{\"Sequence\":{\"id\":\"A\"}}],"
    "\"special_tokens\":{\"<s>\":{\"ids\":[5]}}},\"decoder\":{\"type\":\"Sequence\",\"decoders\":"
    "[{\"type\":\"Replace\",\"pattern\":{\"String\":\"\\u2581\"},\"content\":\" \"},"
    "{\"type\":\"ByteFallback\"},{\"type\":\"Fuse\"},{\"type\":\"Strip\",\"content\":\" \","
    "\"start\":1,\"stop\":1}]},\"model\":{\"type\":\"BPE\",\"unk_token\":\"<unk>\","
    "\"fuse_unk\":true,\"byte_fallback\":true,\"vocab\":{\"<unk>\":0,\"a\":1,\"b\":2,\"ab\":3,"
    "\"\\u2581\":4,\"<s>\":5,\"\\u2581\\u2581\":6,\"<0xC3>\":8,\"<0xA9>\":9,\"<0x00>\":10},"
    "\"merges\":[\"a b\",\"\\u2581 \\u2581\"]}}";

typedef struct fuzz_state { kmed_tok tiny, spm, gemma; int have_spm, have_gemma, init; } fuzz_state;

static fuzz_state *state(void)
{
    static fuzz_state st; /* the harness's own cache; the library keeps no globals */
    if (!st.init) {
        kmed_error e = {0};
        const char *fx = getenv("KMED_FIXTURES");
        char path[1100];
        st.init = 1;
        if (kmed__tok_load_mem(&st.tiny, tiny_json, sizeof tiny_json - 1, "tiny", &e)) abort();
        st.have_spm = kmed_tok_load(&st.spm, "tests/data/spm/bpe_nfkc.model", &e) == KMED_OK;
        snprintf(path, sizeof path, "%s/gemma2-tokenizer/tokenizer.json",
                 fx && *fx ? fx : "../shared/fixtures");
        st.have_gemma = kmed_tok_load(&st.gemma, path, &e) == KMED_OK;
    }
    return &st;
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    fuzz_state *st = state();
    const char *text = (const char *)data + 1;
    if (size == 0) return 0;
    switch (data[0] % 3) { /* 1, 2, 3: the old mode bytes of the seeds still pick the same */
    case 1: exercise(&st->tiny, text, size - 1); break;
    case 2: if (st->have_spm) exercise(&st->spm, text, size - 1); break;
    default: if (st->have_gemma) exercise(&st->gemma, text, size - 1); break;
    }
    return 0;
}

#ifdef KMED_FUZZ_MAIN
/* Random mutations (byte flips, truncation, splices) of a few seeds: texts, and (after a 0
   byte) tokenizer files. */
int main(int argc, char **argv)
{
    static const char *const texts[] = {
        "\x01\xEB\x8B\xA4\xEC\x9D\x8C \xEC\xA4\x91 <s>ab  ab\xC3\xA9\xE2\x96\x81\xE2\x96\x81",
        "\x03<start_of_turn>user\n\xED\x99\x98\xEC\x9E\x90<end_of_turn>\n   \t\t\r\n<bos>",
        "\x02\xEF\xBC\xA1\xE3\x8E\x8E  \xE2\x84\x83 mmHg <start_of_turn> \xF0\x9F\xA4\x92"};
    kmed_rng rng;
    kmed_buf seed = {0};
    long iters = argc > 1 ? atol(argv[1]) : 10000, it;
    unsigned char *buf = NULL;
    char *model = NULL;
    size_t model_len = 0;
    kmed_error e = {0};
    kmed_rng_seed(&rng, 1234);
    kmed_buf_put(&seed, "\x00", 1);
    kmed_buf_puts(&seed, tiny_json);
    kmed_file_read("tests/data/spm/bpe_gemmalike.model", 0, &model, &model_len, &e);
    for (it = 0; it < iters; it++) {
        size_t len, k, nmut;
        int pick = (int)kmed_rng_below(&rng, 5);
        const unsigned char *src;
        size_t src_len;
        if (pick < 3) { src = (const unsigned char *)texts[pick]; src_len = strlen(texts[pick]); }
        else if (pick == 3 || !model) {
            src = (const unsigned char *)seed.data;
            src_len = seed.len;
        }
        else { src = NULL; src_len = model_len + 1; }
        buf = (unsigned char *)realloc(buf, src_len + 64);
        if (!src) { buf[0] = 0; memcpy(buf + 1, model, model_len); }
        else memcpy(buf, src, src_len);
        len = src_len;
        nmut = 1 + kmed_rng_below(&rng, 8);
        for (k = 0; k < nmut && len > 1; k++) {
            size_t at = 1 + kmed_rng_below(&rng, len - 1);
            switch (kmed_rng_below(&rng, 4)) {
            case 0: buf[at] = (unsigned char)kmed_rng_below(&rng, 256); break;
            case 1: len = at; break;
            case 2: buf[at] ^= (unsigned char)(1u << kmed_rng_below(&rng, 8)); break;
            default:
                if (len + 1 < src_len + 64) {
                    memmove(buf + at + 1, buf + at, len - at);
                    buf[at] = "<>\xE2\x96\x81 \n\t{}\"\\0"[kmed_rng_below(&rng, 12)];
                    len++;
                }
            }
        }
        if (pick >= 3) fuzz_tok_file((const char *)buf + 1, len - 1);
        else LLVMFuzzerTestOneInput(buf, len);
    }
    printf("fuzz_tok: %ld iterations, no crash\n", iters);
    free(buf);
    free(model);
    kmed_buf_free(&seed);
    return 0;
}
#endif

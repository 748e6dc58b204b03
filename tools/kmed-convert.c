/* kmed-convert: HF safetensors directory <-> GGUF (llama.cpp gemma2 layout), quantization to
   Q8_0/Q4_0, and merging a PEFT LoRA adapter into the written model.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-convert.c \
      -o build/kmed-convert -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char *usage =
    "usage: kmed-convert --model PATH --out PATH [options]\n"
    "\n"
    "Reads an HF Gemma-2 directory or a .gguf file and writes a .gguf file (when --out ends\n"
    "in .gguf) or an HF directory (config.json + safetensors). Tensors are converted one at\n"
    "a time; GGUF quantization reproduces llama-quantize's bytes.\n"
    "\n"
    "  --model PATH       input: HF model directory or .gguf file (required)\n"
    "  --out PATH         output: FILE.gguf, or a directory for HF safetensors (required)\n"
    "  --type T           GGUF: f32, f16, bf16, q8_0 or q4_0 (default: f16, as llama.cpp's\n"
    "                     converter); HF: f32, bf16 or f16 (default: bf16)\n"
    "  --mixed            with --type q4_0: token_embd in Q8_0 like llama-quantize without\n"
    "                     --pure (default: off, every 2-D tensor in q4_0)\n"
    "  --merge DIR        merge a PEFT LoRA adapter directory into the written weights\n"
    "                     (its trainable token rows replace theirs in the embedding)\n"
    "                     (default: none)\n"
    "  --tokenizer PATH   tokenizer.json (or a directory holding it) for the GGUF tokenizer\n"
    "                     metadata; HF output: its files are copied to --out (default: the\n"
    "                     model directory's tokenizer, or the input GGUF's tokenizer keys)\n"
    "  --name NAME        GGUF general.name (default: the input's base name)\n"
    "  --shard-mb N       HF output: shards of at most N MB, 0 = one file (default: 0)\n"
    "  --help             this text\n";

static int file_exists(const char *p)
{
    FILE *f = fopen(p, "rb");
    if (f) fclose(f);
    return f != NULL;
}

static int ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

/* The input's base name without a trailing '/' or ".gguf". */
static void base_name(const char *p, char *out, size_t cap)
{
    size_t n = strlen(p);
    const char *s;
    while (n > 1 && p[n - 1] == '/') n--;
    s = p + n;
    while (s > p && s[-1] != '/') s--;
    n = (size_t)(p + n - s);
    if (n >= 5 && strncmp(s + n - 5, ".gguf", 5) == 0) n -= 5;
    if (n >= cap) n = cap - 1;
    memcpy(out, s, n);
    out[n] = 0;
}

static void copy_file(const char *src, const char *dir, const char *name)
{
    kmed_error err = {0};
    char dst[2048];
    char *data = NULL;
    size_t len = 0;
    die_if(kmed_file_read(src, 0, &data, &len, &err), &err, "reading tokenizer file");
    die_if(kmed_path_join(dst, sizeof dst, dir, name, &err), &err, "output path");
    die_if(kmed_file_write_atomic(dst, data, len, &err), &err, "writing tokenizer file");
    kmed_free(data);
}

int main(int argc, char **argv)
{
    static const char *const tok_files[4] = {"tokenizer.json", "tokenizer.model",
                                             "tokenizer_config.json", "special_tokens_map.json"};
    const char *model = NULL, *out = NULL, *type = NULL, *merge = NULL, *tokp = NULL;
    const char *name = NULL;
    long shard_mb = 0;
    int mixed = 0, i, to_gguf, from_gguf, have_tok = 0, have_lora = 0, have_src = 0;
    kmed_error err = {0};
    kmed_gemma m;
    kmed_gemma_opts lo;
    kmed_tok tok;
    kmed_lora lora;
    kmed_gguf src;
    progress_state ps;
    char nbuf[256], tokdir[2048];
    double t0;

    kmed_tool_name = "kmed-convert";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--model")) model = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--out")) out = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--mixed")) mixed = 1;
        else if (!strcmp(a, "--merge")) merge = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--tokenizer")) tokp = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--name")) name = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--shard-mb")) shard_mb = arg_long(argc, argv, &i, usage);
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!model || !out) usage_error(usage, "--model and --out are required");
    if (shard_mb < 0) usage_error(usage, "--shard-mb must be >= 0");
    to_gguf = ends_with(out, ".gguf");
    from_gguf = ends_with(model, ".gguf") && !kmed_is_dir(model);
    if (!type) type = to_gguf ? "f16" : "bf16";
    {
        kmed_dtype t = kmed_dtype_parse(type);
        int ok = to_gguf ? (t == KMED_F32 || t == KMED_F16 || t == KMED_BF16 ||
                            t == KMED_Q8_0 || t == KMED_Q4_0)
                         : (t == KMED_F32 || t == KMED_F16 || t == KMED_BF16);
        if (!ok)
            usage_error(usage, "--type '%s': expected %s", type,
                        to_gguf ? "f32, f16, bf16, q8_0 or q4_0" : "f32, bf16 or f16 (HF)");
    }
    if (mixed && (!to_gguf || kmed_dtype_parse(type) != KMED_Q4_0))
        usage_error(usage, "--mixed only applies to --type q4_0 GGUF output");

    /* Tokenizer: the flag, else the model directory's, else (GGUF in) the input's keys. */
    tokdir[0] = 0;
    if (tokp) {
        snprintf(tokdir, sizeof tokdir, "%s", tokp);
    } else if (!from_gguf) {
        char probe[2100];
        snprintf(probe, sizeof probe, "%s/tokenizer.json", model);
        if (file_exists(probe)) snprintf(tokdir, sizeof tokdir, "%s", model);
    }
    if (tokdir[0]) {
        die_if(kmed_tok_load(&tok, tokdir, &err), &err, "loading tokenizer");
        have_tok = 1;
    }

    memset(&ps, 0, sizeof ps);
    memset(&lo, 0, sizeof lo);
    lo.cb.progress = progress_print;
    lo.cb.log = log_print;
    lo.cb.user = &ps;
    t0 = kmed_time_now();
    die_if(kmed_gemma_load(&m, model, &lo, &err), &err, "loading model");
    if (merge) {
#ifndef KMED_NO_TRAIN
        die_if(kmed_lora_load(&lora, &m, merge, &err), &err, "loading adapter");
        have_lora = 1;
#else
        die("--merge: built without the train module (KMED_NO_TRAIN)");
#endif
    }

    if ((m.embed.type == KMED_Q8_0 || m.embed.type == KMED_Q4_0) &&
        m.embed.type != kmed_dtype_parse(type))
        fprintf(stderr, "kmed-convert: warning: the input is already quantized (%s); the "
                        "output holds its dequantized values%s\n",
                kmed_dtype_name(m.embed.type),
                to_gguf && kmed_dtype_parse(type) != KMED_F32 ? ", quantized again" : "");
    if (to_gguf) {
        kmed_gguf_save_opts go;
        memset(&go, 0, sizeof go);
        go.type = kmed_dtype_parse(type);
        go.mixed = mixed;
        base_name(model, nbuf, sizeof nbuf);
        go.name = name ? name : nbuf;
        go.tokenizer_json = have_tok ? tokdir : NULL;
        go.lora = have_lora ? &lora : NULL;
        go.cb = lo.cb;
        if (!have_tok && from_gguf) {
            die_if(kmed_gguf_open(&src, model, &err), &err, "reading input GGUF metadata");
            have_src = 1;
            go.tok_from = &src;
        }
        if (!have_tok && !have_src)
            fprintf(stderr, "kmed-convert: warning: no tokenizer.json found: the GGUF gets no "
                            "tokenizer metadata and llama.cpp will not load it (use "
                            "--tokenizer)\n");
        die_if(kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, out, &go, &err), &err,
               "writing GGUF");
    } else {
        kmed_hf_save_opts ho;
        memset(&ho, 0, sizeof ho);
        ho.dtype = kmed_dtype_parse(type);
        ho.max_shard_bytes = (size_t)shard_mb << 20;
        ho.lora = have_lora ? &lora : NULL;
        ho.cb = lo.cb;
        die_if(kmed_gemma_save_hf(&m, out, &ho, &err), &err, "writing HF model");
        if (have_tok) {
            int k;
            if (kmed_is_dir(tokdir)) {
                for (k = 0; k < 4; k++) {
                    char p[2100];
                    snprintf(p, sizeof p, "%s/%s", tokdir, tok_files[k]);
                    if (file_exists(p)) copy_file(p, out, tok_files[k]);
                }
            } else {
                const char *b = strrchr(tokdir, '/');
                copy_file(tokdir, out, b ? b + 1 : tokdir);
            }
        }
    }
    fprintf(stderr, "kmed-convert: %s -> %s (%s%s%s) in %.1fs\n", model, out, type,
            mixed ? ", token_embd q8_0" : "", have_lora ? ", adapter merged" : "",
            kmed_time_now() - t0);
    if (have_src) kmed_gguf_close(&src);
#ifndef KMED_NO_TRAIN
    if (have_lora) kmed_lora_free(&lora);
#endif
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&m);
    return 0;
}

/* kmed-forward: logits (and hidden states) of a Gemma-2 model for given token ids, as
   float32 .npy files, to compare kmed with any other implementation.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-forward.c \
      -o build/kmed-forward -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char *usage =
    "usage: kmed-forward --model PATH --ids IDS --out LOGITS.npy [options]\n"
    "\n"
    "Runs one batched forward pass over the ids (positions 0..n-1) and writes the final\n"
    "(soft-capped) logits of every position as float32 [n, vocab].\n"
    "\n"
    "  --model PATH      HF model directory (config.json + safetensors) or .gguf file\n"
    "  --ids IDS         comma-separated token ids (2,651,...) or @FILE (ids separated by\n"
    "                    commas or whitespace)\n"
    "  --out FILE        logits .npy (float32 [n, vocab])\n"
    "  --hidden FILE     also write the residual stream .npy (float32 [L+1, n, hidden]):\n"
    "                    after the scaled embedding and after each layer (default: none)\n"
    "  --type T          compute dtype of the weights: f32, bf16, q8_0, q4_0, or stored\n"
    "                    (default: stored)\n"
    "  --adapter DIR     apply a PEFT LoRA adapter directory (default: none)\n"
    "  --fast            quantize activations like llama.cpp (default: off, f32\n"
    "                    activations, the reference path)\n"
    "  --threads N       worker threads, 0 = all CPUs (default: 0)\n"
    "  --help            this text\n";

/* Parses "2,651, 7" (commas or whitespace) into a new array. */
static int *parse_ids(const char *s, size_t *n)
{
    size_t cap = 64, k = 0;
    int *ids = (int *)malloc(cap * sizeof *ids);
    if (!ids) die("out of memory");
    while (*s) {
        char *end;
        long v;
        while (*s == ',' || *s == ' ' || *s == '\n' || *s == '\t' || *s == '\r') s++;
        if (!*s) break;
        v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 0x7fffffff) {
            free(ids);
            *n = 0;
            return NULL;
        }
        if (k == cap) {
            int *p = (int *)realloc(ids, 2 * cap * sizeof *ids);
            if (!p) die("out of memory");
            ids = p;
            cap *= 2;
        }
        ids[k++] = (int)v;
        s = end;
    }
    *n = k;
    return ids;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *ids_arg = NULL, *out = NULL, *hidden_out = NULL;
    const char *type = "stored", *adapter = NULL;
    long threads = 0;
    int fast = 0, i;
    kmed_error err = {0};
    kmed_gemma m;
    kmed_gemma_opts opts;
    kmed_gemma_state st;
    kmed_pool *pool = NULL;
    kmed_lora lora;
    int have_lora = 0;
    int *ids;
    size_t n, V, C, L;
    float *logits, *hidden = NULL;
    uint64_t shape[3];
    progress_state ps;

    kmed_tool_name = "kmed-forward";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--model")) model = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--ids")) ids_arg = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--out")) out = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--hidden")) hidden_out = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--adapter")) adapter = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--threads")) threads = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--fast")) fast = 1;
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!model || !ids_arg || !out) usage_error(usage, "--model, --ids and --out are required");
    if (threads < 0 || threads > 1024) usage_error(usage, "--threads %ld out of range", threads);

    memset(&opts, 0, sizeof opts);
    if (strcmp(type, "stored") != 0) {
        opts.convert = 1;
        opts.type = kmed_dtype_parse(type);
        if (opts.type != KMED_F32 && opts.type != KMED_BF16 && opts.type != KMED_Q8_0 &&
            opts.type != KMED_Q4_0)
            usage_error(usage, "--type '%s': expected f32, bf16, q8_0, q4_0 or stored", type);
    }
    if (ids_arg[0] == '@') {
        char *text = NULL;
        size_t len;
        die_if(kmed_file_read(ids_arg + 1, 0, &text, &len, &err), &err, "reading ids");
        ids = parse_ids(text, &n);
        kmed_free(text);
    } else {
        ids = parse_ids(ids_arg, &n);
    }
    if (!ids || n == 0) usage_error(usage, "--ids: expected a list of non-negative integers");

    memset(&ps, 0, sizeof ps);
    opts.cb.progress = progress_print;
    opts.cb.log = log_print;
    opts.cb.user = &ps;
    die_if(kmed_gemma_load(&m, model, &opts, &err), &err, "loading model");
    if (adapter) {
#ifndef KMED_NO_TRAIN
        die_if(kmed_lora_load(&lora, &m, adapter, &err), &err, "loading adapter");
        have_lora = 1;
#else
        die("--adapter: built without the train module (KMED_NO_TRAIN)");
#endif
    }
    die_if(kmed_pool_create(&pool, (int)threads, &err), &err, "creating thread pool");
    V = (size_t)m.cfg.vocab_size;
    C = (size_t)m.cfg.hidden_size;
    L = (size_t)m.cfg.n_layers;
    logits = (float *)malloc(n * V * sizeof(float));
    if (hidden_out) hidden = (float *)malloc((L + 1) * n * C * sizeof(float));
    if (!logits || (hidden_out && !hidden)) die("out of memory for %zu positions", n);
    die_if(kmed_gemma_state_init(&st, &m, n, &err), &err, "allocating state");
    die_if(kmed_gemma_forward(&m, have_lora ? &lora : NULL, &st, pool, ids, n,
                              KMED_FWD_LOGITS_ALL | (fast ? KMED_FWD_FAST : 0), logits, hidden,
                              &err),
           &err, "forward");
    shape[0] = n;
    shape[1] = V;
    die_if(kmed_npy_write(out, KMED_F32, logits, 2, shape, &err), &err, "writing logits");
    if (hidden) {
        shape[0] = L + 1;
        shape[1] = n;
        shape[2] = C;
        die_if(kmed_npy_write(hidden_out, KMED_F32, hidden, 3, shape, &err), &err,
               "writing hidden states");
    }
    fprintf(stderr, "kmed-forward: %zu tokens, logits [%zu, %zu] -> %s\n", n, n, V, out);
    kmed_gemma_state_free(&st);
#ifndef KMED_NO_TRAIN
    if (have_lora) kmed_lora_free(&lora);
#endif
    kmed_pool_free(pool);
    kmed_gemma_free(&m);
    free(logits);
    free(hidden);
    free(ids);
    return 0;
}

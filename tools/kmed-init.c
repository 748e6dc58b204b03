/* kmed-init: write a fresh, randomly initialised small Gemma-2 in Hugging Face layout.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-init.c -o build/kmed-init \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char *usage =
    "usage: kmed-init --out DIR [options]\n"
    "\n"
    "Writes config.json, generation_config.json and safetensors weights of a new Gemma-2:\n"
    "linear weights and embedding ~ normal(0, 0.02) (pad row zero), norms 0 (HF layout).\n"
    "The defaults are the dims of the tiny test model.\n"
    "\n"
    "  --out DIR            output directory (created if missing; required)\n"
    "  --vocab N            vocab_size (default: 256000)\n"
    "  --hidden N           hidden_size (default: 64)\n"
    "  --intermediate N     intermediate_size (default: 128)\n"
    "  --layers N           num_hidden_layers (default: 2)\n"
    "  --heads N            num_attention_heads (default: 4)\n"
    "  --kv-heads N         num_key_value_heads (default: 2)\n"
    "  --head-dim N         head_dim (default: 16)\n"
    "  --query-scalar X     query_pre_attn_scalar (default: head_dim)\n"
    "  --window N           sliding_window of the even layers, 0 = off (default: 16)\n"
    "  --attn-softcap X     attn_logit_softcapping, 0 = off (default: 50)\n"
    "  --final-softcap X    final_logit_softcapping, 0 = off (default: 30)\n"
    "  --rope-theta X       rope_theta (default: 10000)\n"
    "  --max-pos N          max_position_embeddings (default: 8192)\n"
    "  --eps X              rms_norm_eps (default: 1e-06)\n"
    "  --seed N             random seed (default: 0)\n"
    "  --dtype T            bf16 or f32 (default: bf16)\n"
    "  --shard-mb N         split the weights into shards of at most N MB, 0 = one file\n"
    "                       (default: 0)\n"
    "  --tokenizer PATH     copy tokenizer files in: a tokenizer.json / tokenizer.model, or a\n"
    "                       directory (tokenizer.json, tokenizer.model, tokenizer_config.json,\n"
    "                       special_tokens_map.json); checked to fit --vocab (default: none)\n"
    "  --vocab-from FILE    JSONL with \"input_ids\" (kmed-data's *_packed.jsonl); repeatable:\n"
    "                       embedding rows of tokens no such file holds start at zero, so\n"
    "                       kmed-train on that data computes them as one row (a from-scratch\n"
    "                       model uses a few thousand of the 256000 ids) (default: none)\n"
    "  --help               this text\n";

/* Copies src to dir/name atomically; returns 0 if src does not exist. */
static int copy_file(const char *src, const char *dir, const char *name)
{
    kmed_error err = {0};
    char dst[2048];
    char *data = NULL;
    size_t len = 0;
    FILE *f = fopen(src, "rb");
    if (!f) return 0;
    fclose(f);
    die_if(kmed_file_read(src, 0, &data, &len, &err), &err, "reading tokenizer file");
    die_if(kmed_path_join(dst, sizeof dst, dir, name, &err), &err, "output path");
    die_if(kmed_file_write_atomic(dst, data, len, &err), &err, "writing tokenizer file");
    kmed_free(data);
    return 1;
}

static const char *base_name(const char *p)
{
    const char *s = strrchr(p, '/');
    return s ? s + 1 : p;
}

/* Marks every id in the "input_ids" arrays of a JSONL file. */
static void mark_used(const char *path, unsigned char *used, long vocab)
{
    kmed_error err = {0};
    kmed_jsonl jl;
    const kmed_json *o;
    int eof = 0;
    die_if(kmed_jsonl_open(&jl, path, &err), &err, "--vocab-from");
    for (;;) {
        const kmed_json *ids;
        size_t i;
        die_if(kmed_jsonl_next(&jl, &o, &eof, &err), &err, "--vocab-from");
        if (eof) break;
        ids = kmed_json_get(o, "input_ids");
        if (!ids || ids->type != KMED_JSON_ARRAY)
            die("%s:%zu: no \"input_ids\" array", path, jl.lines.line);
        for (i = 0; i < ids->len; i++) {
            double v = ids->kids[i].num;
            if (ids->kids[i].type != KMED_JSON_NUMBER || v != floor(v) || v < 0 || v >= vocab)
                die("%s:%zu: input_ids[%zu] is not an id in [0, %ld)", path, jl.lines.line, i,
                    vocab);
            used[(size_t)v] = 1;
        }
    }
    kmed_jsonl_close(&jl);
}

int main(int argc, char **argv)
{
    static const char *const tok_files[4] = {"tokenizer.json", "tokenizer.model",
                                             "tokenizer_config.json", "special_tokens_map.json"};
    const char *out = NULL, *dtype = "bf16", *tokp = NULL;
    const char *vocab_from[64];
    unsigned char *used = NULL;
    int n_from = 0;
    long vocab = 256000, hidden = 64, inter = 128, layers = 2, heads = 4, kv = 2, hd = 16;
    long window = 16, max_pos = 8192, seed = 0, shard_mb = 0;
    double qs = 0, acap = 50, fcap = 30, theta = 10000, eps = 1e-6;
    kmed_gemma_config c;
    kmed_hf_save_opts o;
    kmed_error err = {0};
    progress_state ps;
    double t0;
    int i;

    kmed_tool_name = "kmed-init";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--out")) out = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--vocab")) vocab = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--hidden")) hidden = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--intermediate")) inter = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--layers")) layers = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--heads")) heads = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--kv-heads")) kv = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--head-dim")) hd = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--query-scalar")) qs = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--window")) window = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--attn-softcap")) acap = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--final-softcap")) fcap = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--rope-theta")) theta = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--max-pos")) max_pos = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--eps")) eps = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--seed")) seed = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--dtype")) dtype = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--shard-mb")) shard_mb = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--tokenizer")) tokp = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--vocab-from")) {
            if (n_from == 64) usage_error(usage, "--vocab-from: at most 64 files");
            vocab_from[n_from++] = arg_str(argc, argv, &i, usage);
        }
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!out) usage_error(usage, "--out is required");
    if (vocab <= 0 || hidden <= 0 || inter <= 0 || layers <= 0 || heads <= 0 || kv <= 0 ||
        hd <= 0 || max_pos <= 0 || vocab > 0x7fffffff || hidden > 0x7fffffff ||
        inter > 0x7fffffff || layers > 100000 || heads > 100000 || kv > 100000 ||
        hd > 100000 || max_pos > 0x7fffffff)
        usage_error(usage, "model dimensions must be positive integers in range");
    if (window < 0 || window > 0x7fffffff || acap < 0 || fcap < 0 || theta <= 0 || eps <= 0 ||
        qs < 0 || shard_mb < 0 || seed < 0)
        usage_error(usage, "--window, soft-caps, --shard-mb and --seed must be >= 0; "
                           "--rope-theta, --eps positive");

    memset(&c, 0, sizeof c);
    c.vocab_size = (int)vocab;
    c.hidden_size = (int)hidden;
    c.intermediate_size = (int)inter;
    c.n_layers = (int)layers;
    c.n_heads = (int)heads;
    c.n_kv_heads = (int)kv;
    c.head_dim = (int)hd;
    c.query_pre_attn_scalar = qs > 0 ? (float)qs : (float)hd;
    c.rms_norm_eps = (float)eps;
    c.rope_theta = (float)theta;
    c.attn_softcap = (float)acap;
    c.final_softcap = (float)fcap;
    c.sliding_window = (int)window;
    c.max_position = (int)max_pos;
    c.bos_id = 2;
    c.eos_id = 1;
    c.pad_id = 0;
    if (kmed_gemma_config_validate(&c, &err) != KMED_OK) usage_error(usage, "%s", err.msg);

    memset(&o, 0, sizeof o);
    o.dtype = kmed_dtype_parse(dtype);
    if (o.dtype != KMED_F32 && o.dtype != KMED_BF16)
        usage_error(usage, "--dtype '%s': expected bf16 or f32", dtype);
    o.max_shard_bytes = (size_t)shard_mb << 20;
    memset(&ps, 0, sizeof ps);
    o.cb.progress = progress_print;
    o.cb.user = &ps;

    if (tokp) {
        /* The vocabulary must fit the embedding, or ids would index past it. */
        kmed_tok tok;
        die_if(kmed_tok_load(&tok, tokp, &err), &err, "loading tokenizer");
        if (kmed_tok_vocab_size(&tok) > c.vocab_size)
            die("tokenizer: %d ids do not fit --vocab %d", kmed_tok_vocab_size(&tok),
                c.vocab_size);
        if (tok.bos_id >= 0) c.bos_id = tok.bos_id;
        if (tok.eos_id >= 0) c.eos_id = tok.eos_id;
        if (tok.pad_id >= 0) c.pad_id = tok.pad_id;
        kmed_tok_free(&tok);
    }

    if (n_from) {
        long k, n_used = 0;
        used = (unsigned char *)calloc((size_t)c.vocab_size, 1);
        if (!used) die("out of memory");
        for (k = 0; k < n_from; k++) mark_used(vocab_from[k], used, c.vocab_size);
        used[c.pad_id] = used[c.bos_id] = used[c.eos_id] = 1;
        for (k = 0; k < c.vocab_size; k++) n_used += used[k];
        fprintf(stderr, "kmed-init: %ld of %d tokens in the data; the others start at zero\n",
                n_used, c.vocab_size);
    }
    t0 = kmed_time_now();
    die_if(kmed_gemma_init_random(&c, (uint64_t)seed, used, out, &o, &err), &err,
           "writing model");
    free(used);
    if (tokp) {
        int copied = 0, k;
        if (kmed_is_dir(tokp)) {
            for (k = 0; k < 4; k++) {
                char src[2048];
                die_if(kmed_path_join(src, sizeof src, tokp, tok_files[k], &err), &err,
                       "tokenizer path");
                copied += copy_file(src, out, tok_files[k]);
            }
        } else {
            copied = copy_file(tokp, out, base_name(tokp));
        }
        if (!copied) die("--tokenizer %s: no tokenizer files found", tokp);
    }
    {
        double params = (double)vocab * hidden +
                        (double)layers * ((double)hidden * hd * (2.0 * heads + 2.0 * kv) +
                                          3.0 * hidden * inter + 4.0 * hidden) + hidden;
        fprintf(stderr, "kmed-init: %.1fM parameters (%s) -> %s in %.1fs\n", params / 1e6,
                o.dtype == KMED_BF16 ? "bf16" : "f32", out, kmed_time_now() - t0);
    }
    return 0;
}

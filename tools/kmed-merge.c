/* kmed-merge: merge fine-tuned Gemma-2 checkpoints of one base (linear, task arithmetic,
   TIES, DARE-TIES, DARE-linear, as mergekit defines them), streamed tensor by tensor.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-merge.c -o build/kmed-merge \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char *usage =
    "usage: kmed-merge --config FILE --out PATH [options]\n"
    "       kmed-merge --method M [--base DIR] --model PATH... --weights LIST --out PATH\n"
    "\n"
    "Merges HF checkpoints (and PEFT adapters, merged into their base on the fly) one tensor\n"
    "at a time. The config uses mergekit's fields (merge_method, base_model, models[].model,\n"
    "models[].parameters.weight/density, parameters.normalize/rescale/int8_mask/lambda,\n"
    "dtype, out_dtype), as JSON or mergekit's YAML. Flags override the config.\n"
    "\n"
    "  --config FILE      mergekit config, JSON or YAML (default: none)\n"
    "  --method M         linear, task_arithmetic, ties, dare_ties or dare_linear\n"
    "                     (default: the config's merge_method)\n"
    "  --base PATH        base_model: HF directory; required by all methods but linear\n"
    "                     (default: the config's)\n"
    "  --model PATH       model to merge, repeatable: an HF directory, a PEFT adapter\n"
    "                     directory (merged into --base) or DIR+ADAPTER (default: the\n"
    "                     config's models; not both)\n"
    "  --weights LIST     weights, comma-separated: one per --model, or one for all\n"
    "                     (required with --model)\n"
    "  --densities LIST   ties/dare densities in (0, 1], one per --model or one for all\n"
    "                     (default: 1, keep everything)\n"
    "  --normalize        divide by the sum of the weights (default: on for linear and\n"
    "                     ties, off for the others, as mergekit)\n"
    "  --no-normalize     do not\n"
    "  --rescale          DARE: divide kept values by density; ties: keep each task\n"
    "                     vector's L1 norm (default: on for dare_*, off for ties)\n"
    "  --no-rescale       do not\n"
    "  --int8-mask        accepted for mergekit configs; changes no value (default: off)\n"
    "  --lambda X         scale of the mixed task vector; 0 gives the base (default: the\n"
    "                     config's lambda, else 1)\n"
    "  --consensus C      TIES sign election: sum or count (default: sum)\n"
    "  --seed N           DARE random seed (default: the config's random_seed, else 0)\n"
    "  --out PATH         output: an HF directory, or FILE.gguf (required). Both are\n"
    "                     written beside it and renamed into place when complete; an\n"
    "                     existing HF directory is replaced whole, if it holds only a model\n"
    "  --type T           HF: f32, bf16 or f16 (default: the config's out_dtype/dtype, else\n"
    "                     bf16); GGUF: f32, f16, bf16, q8_0 or q4_0 (default: f16)\n"
    "  --shard-mb N       HF output: shards of at most N MB, 0 = one file (default: 5000)\n"
    "  --mixed            GGUF q4_0: token_embd in q8_0 (default: off)\n"
    "  --name NAME        GGUF general.name (default: kmed-merge)\n"
    "  --help             this text\n";

static int ends_with(const char *s, const char *suf)
{
    size_t n = strlen(s), k = strlen(suf);
    return n >= k && strcmp(s + n - k, suf) == 0;
}

/* Parses "a,b,c" into out[0..cap); returns the count. */
static size_t parse_list(const char *flag, const char *s, float *out, size_t cap)
{
    size_t n = 0;
    while (*s) {
        char *end;
        double v = strtod(s, &end);
        if (end == s || (*end && *end != ',') || (*end == ',' && !end[1]))
            usage_error(usage, "%s: '%s' is not a list of numbers", flag, s);
        if (n == cap) usage_error(usage, "%s: too many values", flag);
        out[n++] = (float)v;
        s = *end ? end + 1 : end;
    }
    return n;
}

int main(int argc, char **argv)
{
    enum { MAXM = 64 };
    const char *config = NULL, *method = NULL, *base = NULL, *out = NULL, *type = NULL;
    const char *weights = NULL, *densities = NULL, *consensus = NULL, *name = NULL;
    const char *paths[MAXM];
    float w[MAXM], d[MAXM];
    kmed_merge_model models[MAXM];
    size_t n_paths = 0, nw = 0, nd = 0, k;
    long shard_mb = 5000, seed = -1;
    int normalize = 0, rescale = 0, int8_mask = 0, mixed = 0, i, have_cfg = 0, have_lambda = 0;
    double lambda = 0;
    kmed_error err = {0};
    kmed_merge_config cfg;
    kmed_merge_out mo;
    kmed_dtype dt;
    progress_state ps;
    double t0;

    kmed_tool_name = "kmed-merge";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--config")) config = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--method")) method = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--base")) base = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--model")) {
            if (n_paths == MAXM) usage_error(usage, "at most %d --model", MAXM);
            paths[n_paths++] = arg_str(argc, argv, &i, usage);
        } else if (!strcmp(a, "--weights")) weights = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--densities")) densities = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--normalize")) normalize = 1;
        else if (!strcmp(a, "--no-normalize")) normalize = -1;
        else if (!strcmp(a, "--rescale")) rescale = 1;
        else if (!strcmp(a, "--no-rescale")) rescale = -1;
        else if (!strcmp(a, "--int8-mask")) int8_mask = 1;
        else if (!strcmp(a, "--lambda")) {
            lambda = arg_double(argc, argv, &i, usage);
            have_lambda = 1;
        }
        else if (!strcmp(a, "--consensus")) consensus = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--seed")) seed = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--out")) out = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--shard-mb")) shard_mb = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--mixed")) mixed = 1;
        else if (!strcmp(a, "--name")) name = arg_str(argc, argv, &i, usage);
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!out) usage_error(usage, "--out is required");
    if (!config && !n_paths) usage_error(usage, "give --config or --model");
    if (config && (n_paths || weights || densities))
        usage_error(usage, "models come from --config or from --model/--weights/--densities, "
                           "not both");
    if (n_paths && !weights) usage_error(usage, "--weights is required with --model");
    if (!config && !method) usage_error(usage, "--method is required without --config");
    if (shard_mb < 0) usage_error(usage, "--shard-mb must be >= 0");
    if (seed < -1) usage_error(usage, "--seed must be >= 0");
    if (consensus && strcmp(consensus, "sum") && strcmp(consensus, "count"))
        usage_error(usage, "--consensus '%s': expected sum or count", consensus);
    if (weights) {
        nw = parse_list("--weights", weights, w, MAXM);
        if (nw != 1 && nw != n_paths)
            usage_error(usage, "--weights has %zu values for %zu models", nw, n_paths);
    }
    if (densities) {
        nd = parse_list("--densities", densities, d, MAXM);
        if (nd != 1 && nd != n_paths)
            usage_error(usage, "--densities has %zu values for %zu models", nd, n_paths);
        for (k = 0; k < nd; k++)
            if (!(d[k] > 0 && d[k] <= 1))
                usage_error(usage, "--densities: %g is outside (0, 1]", (double)d[k]);
    }

    if (config) {
        die_if(kmed_merge_config_load(&cfg, config, &err), &err, "reading config");
        have_cfg = 1;
    } else {
        memset(&cfg, 0, sizeof cfg);
        for (k = 0; k < n_paths; k++) {
            models[k].model = paths[k];
            models[k].weight = w[nw == 1 ? 0 : k];
            models[k].density = nd ? d[nd == 1 ? 0 : k] : 0.0f;
        }
        cfg.models = models;
        cfg.n_models = n_paths;
    }
    if (method && kmed_merge_method_parse(method, &cfg.method, &err) != KMED_OK)
        usage_error(usage, "--method: %s", err.msg);
    if (base) cfg.base_model = base;
    if (normalize) cfg.normalize = normalize;
    if (rescale) cfg.rescale = rescale;
    if (int8_mask) cfg.int8_mask = 1;
    if (have_lambda) {
        cfg.lambda = (float)lambda;
        cfg.has_lambda = 1;
    }
    if (consensus) cfg.consensus_count = !strcmp(consensus, "count");
    if (seed >= 0) cfg.seed = (uint64_t)seed;
    if (kmed_merge_config_validate(&cfg, &err) != KMED_OK) usage_error(usage, "%s", err.msg);

    memset(&mo, 0, sizeof mo);
    mo.gguf = ends_with(out, ".gguf");
    if (type) {
        dt = kmed_dtype_parse(type);
        if (mo.gguf ? !(dt == KMED_F32 || dt == KMED_F16 || dt == KMED_BF16 || dt == KMED_Q8_0 ||
                        dt == KMED_Q4_0)
                    : !(dt == KMED_F32 || dt == KMED_F16 || dt == KMED_BF16))
            usage_error(usage, "--type '%s': expected %s", type,
                        mo.gguf ? "f32, f16, bf16, q8_0 or q4_0" : "f32, bf16 or f16 (HF)");
    } else {
        dt = mo.gguf ? KMED_F16 : cfg.has_dtype ? cfg.dtype : KMED_BF16;
    }
    if (mixed && (!mo.gguf || dt != KMED_Q4_0))
        usage_error(usage, "--mixed only applies to --type q4_0 GGUF output");
    mo.dtype = dt;
    mo.max_shard_bytes = (size_t)shard_mb << 20;
    mo.mixed = mixed;
    mo.name = name;
    memset(&ps, 0, sizeof ps);
    mo.cb.progress = progress_print;
    mo.cb.log = log_print;
    mo.cb.user = &ps;

    t0 = kmed_time_now();
    die_if(kmed_merge_run(&cfg, out, &mo, &err), &err, "merging");
    k = kmed_merge_n_mixed(&cfg);
    fprintf(stderr, "kmed-merge: %s of %zu model%s -> %s (%s) in %.1fs\n",
            kmed_merge_method_name(cfg.method), k, k == 1 ? "" : "s", out, kmed_dtype_name(dt),
            kmed_time_now() - t0);
    if (have_cfg) kmed_merge_config_free(&cfg);
    return 0;
}

/* kmed-eval: KorMedMCQA scoring with lm-evaluation-harness's kormedmcqa prompts.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-eval.c -o build/kmed-eval -lm -lpthread */
#define _XOPEN_SOURCE 700 /* realpath */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "common.h"
#include <errno.h>
#include <sys/stat.h>

static const char usage[] =
    "usage: kmed-eval --model PATH --items FILE [--items FILE ...] [options]\n"
    "       kmed-eval --items FILE --dump-prompts OUT.jsonl [--shots k --fewshot FILE] [--chat]\n"
    "       kmed-eval --items FILE --show-prompt N|ID [--shots k --fewshot FILE] [--chat]\n"
    "       kmed-eval --extract [FILE|-]\n"
    "       kmed-eval --compare A.json B.json [--svg FILE] [--labels A,B]\n"
    "\n"
    "Scores KorMedMCQA items (JSONL, JSON array or CSV with the HF dataset's fields).\n"
    "  --model PATH        HF model directory or .gguf file\n"
    "  --adapter DIR       PEFT LoRA adapter on top of the model (default: none)\n"
    "  --type T            compute dtype f32|bf16|q8_0|q4_0 (default: as stored)\n"
    "  --fast              quantize activations in matmuls like llama.cpp (default: off)\n"
    "  --tokenizer PATH    tokenizer.json/.model or a dir (default: the model dir)\n"
    "  --items FILE        items to score; repeatable. .jsonl, .json (an array, or JSON\n"
    "                      Lines) or .csv, any case; ids repeated get #2, #3 (default: none)\n"
    "  --subset NAME       subset of the items and exemplars that none of these places:\n"
    "                      a 'subset' column, a 'subject' naming doctor, nurse, pharm or\n"
    "                      dentist, one of those in the file or directory name\n"
    "                      (default: none, they are 'other')\n"
    "  --fewshot FILE      few-shot split (exemplars taken in order per subset);\n"
    "                      repeatable, the files' items joined in order (default: none)\n"
    "  --shots K           exemplars per prompt (default: 0)\n"
    "  --chat              wrap prompts in Gemma's chat template (default: off)\n"
    "  --method M          letter|generate|option|cloze (default: letter); cloze: the\n"
    "                      question alone, each option text scored as its answer\n"
    "  --max-gen-tokens N  generation budget for --method generate, >= 1 (default: 32)\n"
    "  --no-prefix-cache   recompute the few-shot prefix for every item (default: reuse)\n"
    "  --limit N           score only the first N items, >= 1 (default: all)\n"
    "  --threads N         worker threads (default: all cores)\n"
    "  --out FILE          summary JSON in lm-eval's results layout; it names the\n"
    "                      --preds file relative to its own directory (default: none)\n"
    "  --preds FILE        per-item predictions JSONL (default: none)\n"
    "  --svg FILE          per-subset accuracy chart (default: none)\n"
    "  --dump-prompts OUT  write {\"prompt\": ...} per item, no model needed\n"
    "  --show-prompt N|ID  print the exact prompt of item N (0-based) or with that id\n"
    "  --extract [FILE]    read one JSON string per line, write the extracted letter or null\n"
    "  --compare A B       paired comparison of two runs (summary .json or predictions\n"
    "                      .jsonl): per-subset difference and McNemar's exact test; the\n"
    "                      runs must hold the same ids, each once\n"
    "  --labels A,B        run names for --compare and its chart (default: base,adapter)\n"
    "  --help              this text\n";

typedef struct pred_row { char *id; char *subset; int correct; size_t partner; } pred_row;

/* Reads per-item correctness from a predictions JSONL, or from the file a summary names
   (relative to the summary's directory). Every line needs a string "id" and a boolean
   "correct". */
static size_t read_preds(const char *path, pred_row **rows)
{
    kmed_error err = {0};
    kmed_jsonl jl;
    const kmed_json *v;
    size_t n = 0, cap = 0;
    int eof = 0;
    char target[1024];
    kmed_result r;
    snprintf(target, sizeof target, "%s", path);
    if (strlen(path) > 5 && strcmp(path + strlen(path) - 5, ".json") == 0) {
        char *text;
        size_t len;
        kmed_json_doc doc = {0};
        const char *p;
        die_if(kmed_file_read(path, 0, &text, &len, &err), &err, "reading summary");
        die_if(kmed_json_parse(&doc, text, len, path, 0, &err), &err, "parsing summary");
        p = kmed_json_str(kmed_json_get(kmed_json_get(doc.root, "kmed"), "predictions"), "");
        if (!*p) die("%s: no kmed.predictions file named in the summary", path);
        if (p[0] != '/' && strchr(path, '/')) { /* relative to the summary's directory */
            int d = (int)(strrchr(path, '/') - path);
            snprintf(target, sizeof target, "%.*s/%s", d, path, p);
        } else {
            snprintf(target, sizeof target, "%s", p);
        }
        kmed_json_free(&doc);
        kmed_free(text);
    }
    die_if(kmed_jsonl_open(&jl, target, &err), &err, "opening predictions");
    *rows = NULL;
    while ((r = kmed_jsonl_next(&jl, &v, &eof, &err)) == KMED_OK && !eof) {
        const kmed_json *id = kmed_json_get(v, "id"), *ok = kmed_json_get(v, "correct");
        if (!id || id->type != KMED_JSON_STRING)
            die("%s:%zu: no string 'id'", target, jl.lines.line);
        if (!ok || (ok->type != KMED_JSON_TRUE && ok->type != KMED_JSON_FALSE))
            die("%s:%zu: no true/false 'correct'", target, jl.lines.line);
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            *rows = (pred_row *)realloc(*rows, cap * sizeof **rows);
            if (!*rows) die("out of memory");
        }
        (*rows)[n].id = strdup(id->str);
        (*rows)[n].subset = strdup(kmed_json_str(kmed_json_get(v, "subset"), "other"));
        (*rows)[n].correct = ok->type == KMED_JSON_TRUE;
        if (!(*rows)[n].id || !(*rows)[n].subset) die("out of memory");
        n++;
    }
    die_if(r, &err, "reading predictions");
    kmed_jsonl_close(&jl);
    return n;
}

static int row_cmp(const void *x, const void *y)
{
    return strcmp((*(pred_row *const *)x)->id, (*(pred_row *const *)y)->id);
}

/* The rows sorted by id; dies on an id that appears twice, which would pair wrongly. */
static pred_row **sorted_rows(pred_row *rows, size_t n, const char *path)
{
    pred_row **p = (pred_row **)malloc((n ? n : 1) * sizeof *p);
    size_t i;
    if (!p) die("out of memory");
    for (i = 0; i < n; i++) p[i] = &rows[i];
    qsort(p, n, sizeof *p, row_cmp);
    for (i = 1; i < n; i++)
        if (strcmp(p[i - 1]->id, p[i]->id) == 0)
            die("%s: id '%s' appears more than once; runs pair by id", path, p[i]->id);
    return p;
}

/* Sets each row of A's partner to its row in B; every id must be in both. */
static void pair_rows(pred_row *a, size_t na, const char *a_path, pred_row *b, size_t nb,
                      const char *b_path)
{
    pred_row **sa = sorted_rows(a, na, a_path), **sb = sorted_rows(b, nb, b_path);
    size_t i = 0, j = 0;
    while (i < na || j < nb) {
        int c = i == na ? 1 : j == nb ? -1 : strcmp(sa[i]->id, sb[j]->id);
        if (c < 0) die("item %s of %s is missing from %s", sa[i]->id, a_path, b_path);
        if (c > 0) die("item %s of %s is missing from %s", sb[j]->id, b_path, a_path);
        sa[i++]->partner = (size_t)(sb[j++] - b);
    }
    free(sa);
    free(sb);
}

static int compare_runs(const char *a_path, const char *b_path, const char *labels,
                        const char *svg_path)
{
    static const char *const std[] = {"doctor", "nurse", "pharm", "dentist"};
    pred_row *a, *b;
    size_t na = read_preds(a_path, &a), nb = read_preds(b_path, &b), i, s, n_names = 0;
    const char *names[KMED_MCQA_MAX_SUBSETS];
    char la[64] = "base", lb[64] = "adapter";
    kmed_mcqa_summary sum[2];
    if (labels) {
        const char *comma = strchr(labels, ',');
        if (!comma) die("--labels wants two names separated by a comma");
        snprintf(la, sizeof la, "%.*s", (int)(comma - labels), labels);
        snprintf(lb, sizeof lb, "%s", comma + 1);
    }
    if (!na) die("%s: no predictions", a_path);
    pair_rows(a, na, a_path, b, nb, b_path);
    /* A's subsets: the standard four in order, then the others as they first appear */
    for (s = 0; s < 4; s++)
        for (i = 0; i < na; i++)
            if (strcmp(a[i].subset, std[s]) == 0) { names[n_names++] = std[s]; break; }
    for (i = 0; i < na; i++) {
        size_t k;
        for (k = 0; k < n_names && strcmp(names[k], a[i].subset) != 0; k++) {}
        if (k < n_names) continue;
        if (n_names == KMED_MCQA_MAX_SUBSETS)
            die("%s: more than %d subsets", a_path, KMED_MCQA_MAX_SUBSETS);
        names[n_names++] = a[i].subset;
    }
    memset(sum, 0, sizeof sum);
    printf("%-10s %6s %9s %9s %8s %5s %5s %10s\n", "subset", "n", la, lb, "diff", "b", "c",
           "McNemar p");
    for (s = 0; s <= n_names; s++) {
        const char *name = s < n_names ? names[s] : NULL;
        size_t n = 0, ca = 0, cb = 0, bb = 0, cc = 0;
        int r;
        for (i = 0; i < na; i++) {
            const pred_row *p = &b[a[i].partner];
            if (name && strcmp(a[i].subset, name) != 0) continue;
            n++;
            ca += (size_t)a[i].correct;
            cb += (size_t)p->correct;
            bb += a[i].correct && !p->correct;
            cc += !a[i].correct && p->correct;
        }
        if (!n) continue;
        printf("%-10s %6zu %8.1f%% %8.1f%% %+7.1f%% %5zu %5zu %10.3g\n", name ? name : "overall",
               n, 100.0 * (double)ca / (double)n, 100.0 * (double)cb / (double)n,
               100.0 * ((double)cb - (double)ca) / (double)n, bb, cc, kmed_mcqa_mcnemar(bb, cc));
        for (r = 0; r < 2; r++) {
            kmed_mcqa_acc *d = name ? &sum[r].sub[sum[r].n_subsets++] : &sum[r].overall;
            size_t c = r ? cb : ca;
            snprintf(d->subset, sizeof d->subset, "%s", name ? name : "all");
            d->n = n;
            d->correct = c;
            d->acc = (double)c / (double)n;
            kmed_mcqa_wilson(c, n, 1.959963984540054, &d->lo, &d->hi);
        }
    }
    if (svg_path) {
        kmed_error err = {0};
        kmed_buf out = {0};
        const char *chart_labels[2];
        chart_labels[0] = la;
        chart_labels[1] = lb;
        kmed_mcqa_chart_svg(sum, chart_labels, 2, &out);
        die_if(kmed_file_write_atomic(svg_path, out.data, out.len, &err), &err, "writing chart");
        kmed_buf_free(&out);
    }
    for (i = 0; i < na; i++) { free(a[i].id); free(a[i].subset); }
    for (i = 0; i < nb; i++) { free(b[i].id); free(b[i].subset); }
    free(a);
    free(b);
    return 0;
}

/* Dies unless `path` can be written: its directory exists and is writable, and path is
   not a directory. Run before any scoring, so that a typo does not cost the run. */
static void check_writable(const char *flag, const char *path)
{
    const char *slash = strrchr(path, '/');
    char dir[1024];
    struct stat st;
    if (!slash) snprintf(dir, sizeof dir, ".");
    else if (slash == path) snprintf(dir, sizeof dir, "/");
    else snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode))
        die("%s %s: directory '%s' does not exist", flag, path, dir);
    if (access(dir, W_OK) != 0) die("%s %s: directory '%s' is not writable", flag, path, dir);
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) die("%s %s: is a directory", flag, path);
}

/* path made absolute through the realpath of its directory, which must exist. */
static char *abs_path(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = (char *)malloc(strlen(path) + 2), *real, *out;
    if (!dir) die("out of memory");
    if (!slash) strcpy(dir, ".");
    else if (slash == path) strcpy(dir, "/");
    else { memcpy(dir, path, (size_t)(slash - path)); dir[slash - path] = 0; }
    if (!(real = realpath(dir, NULL))) die("%s: %s", dir, strerror(errno));
    out = (char *)malloc(strlen(real) + strlen(path) + 2);
    if (!out) die("out of memory");
    sprintf(out, "%s/%s", strcmp(real, "/") ? real : "", slash ? slash + 1 : path);
    free(dir);
    free(real);
    return out;
}

/* target's path relative to the directory holding `from`: the summary names its predictions
   file so that --compare finds it from any working directory. */
static char *rel_path(const char *target, const char *from)
{
    char *t = abs_path(target), *f = abs_path(from), *out;
    size_t i, common = 0, ups = 0;
    for (i = 0; t[i] && t[i] == f[i]; i++)
        if (t[i] == '/') common = i + 1; /* directories both share */
    for (i = common; f[i]; i++) ups += f[i] == '/';
    if (!(out = (char *)malloc(3 * ups + strlen(t + common) + 1))) die("out of memory");
    out[0] = 0;
    while (ups--) strcat(out, "../");
    strcat(out, t + common);
    free(t);
    free(f);
    return out;
}

static int extract_lines(const char *path)
{
    kmed_error err = {0};
    kmed_lines lines;
    const char *s;
    size_t len;
    int eof = 0;
    kmed_result r;
    die_if(kmed_lines_open(&lines, path, &err), &err, "opening input");
    while ((r = kmed_lines_next(&lines, &s, &len, &eof, &err)) == KMED_OK && !eof) {
        kmed_json_doc doc = {0};
        if (kmed_json_parse(&doc, s, len, lines.name, lines.line, &err) != KMED_OK ||
            doc.root->type != KMED_JSON_STRING) {
            if (doc.root) fprintf(stderr, "kmed-eval: %s:%zu: not a JSON string\n", lines.name,
                                  lines.line);
            else fprintf(stderr, "kmed-eval: %s\n", err.msg);
            printf("null\n");
        } else {
            int k = kmed_mcqa_extract(doc.root->str, doc.root->len);
            if (k >= 0) printf("\"%c\"\n", 'A' + k);
            else printf("null\n");
        }
        kmed_json_free(&doc);
    }
    die_if(r, &err, "reading input");
    kmed_lines_close(&lines);
    return 0;
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *adapter = NULL, *tok_path = NULL;
    const char *subset = NULL, *out_json = NULL, *out_preds = NULL, *svg = NULL;
    const char *dump = NULL, *show = NULL, *labels = NULL, *type = NULL;
    const char *items_paths[64], *fewshot_paths[64];
    int n_items_paths = 0, n_fewshot_paths = 0, threads = 0, i;
    long limit = -1;
    kmed_mcqa_config cfg;
    kmed_mcqa_set items = {0}, fewshot = {0};
    kmed_error err = {0};
    kmed_tok tok;
    kmed_gemma model;
    kmed_lora lora;
    kmed_pool *pool = NULL;
    kmed_mcqa_pred *preds;
    kmed_mcqa_summary sum;
    progress_state prog = {0};
    kmed_callbacks cb = {log_print, progress_print, &prog};
    double t0;
    size_t k;

    kmed_tool_name = "kmed-eval";
    memset(&cfg, 0, sizeof cfg);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--model")) model_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--adapter")) adapter = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--fast")) cfg.fast = 1;
        else if (!strcmp(a, "--tokenizer")) tok_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--items")) {
            if (n_items_paths == 64) usage_error(usage, "too many --items");
            items_paths[n_items_paths++] = arg_str(argc, argv, &i, usage);
        }
        else if (!strcmp(a, "--subset")) subset = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--fewshot")) {
            if (n_fewshot_paths == 64) usage_error(usage, "too many --fewshot");
            fewshot_paths[n_fewshot_paths++] = arg_str(argc, argv, &i, usage);
        }
        else if (!strcmp(a, "--shots")) cfg.shots = (int)arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--chat")) cfg.chat = 1;
        else if (!strcmp(a, "--method")) {
            const char *m = arg_str(argc, argv, &i, usage);
            if (!strcmp(m, "letter")) cfg.method = KMED_MCQA_LETTER;
            else if (!strcmp(m, "generate")) cfg.method = KMED_MCQA_GENERATE;
            else if (!strcmp(m, "option")) cfg.method = KMED_MCQA_OPTION;
            else if (!strcmp(m, "cloze")) cfg.method = KMED_MCQA_CLOZE;
            else usage_error(usage, "--method: '%s' is not letter, generate, option or cloze",
                             m);
        }
        else if (!strcmp(a, "--max-gen-tokens")) {
            long v = arg_long(argc, argv, &i, usage);
            if (v < 1 || v > 1 << 20) usage_error(usage, "--max-gen-tokens must be 1..%d", 1 << 20);
            cfg.max_gen_tokens = (int)v;
        }
        else if (!strcmp(a, "--no-prefix-cache")) cfg.no_prefix_cache = 1;
        else if (!strcmp(a, "--limit")) {
            limit = arg_long(argc, argv, &i, usage);
            if (limit < 1) usage_error(usage, "--limit must be >= 1");
        }
        else if (!strcmp(a, "--threads")) threads = (int)arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--out")) out_json = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--preds")) out_preds = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--svg")) svg = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--dump-prompts")) dump = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--show-prompt")) show = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--labels")) labels = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--extract"))
            return extract_lines(i + 1 < argc && argv[i + 1][0] != '-' ? argv[i + 1] : "-");
        else if (!strcmp(a, "--compare")) {
            if (i + 2 >= argc) usage_error(usage, "--compare needs two files");
            {
                const char *x = argv[i + 1], *y = argv[i + 2];
                for (i += 3; i < argc; i++) {
                    if (!strcmp(argv[i], "--svg")) svg = arg_str(argc, argv, &i, usage);
                    else if (!strcmp(argv[i], "--labels")) labels = arg_str(argc, argv, &i, usage);
                    else usage_error(usage, "unknown flag '%s' after --compare", argv[i]);
                }
                return compare_runs(x, y, labels, svg);
            }
        }
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!n_items_paths) usage_error(usage, "--items is required");
    if (cfg.shots < 0) usage_error(usage, "--shots must be >= 0");
    if (cfg.shots > 0 && !n_fewshot_paths) usage_error(usage, "--shots needs --fewshot FILE");
    if (!dump && !show) {
        if (out_json) check_writable("--out", out_json);
        if (out_preds) check_writable("--preds", out_preds);
        if (svg) check_writable("--svg", svg);
    }
    for (i = 0; i < n_items_paths; i++)
        die_if(kmed_mcqa_load(&items, items_paths[i], subset, &err), &err, "loading items");
    for (i = 0; i < n_fewshot_paths; i++)
        die_if(kmed_mcqa_load(&fewshot, fewshot_paths[i], subset, &err), &err,
               "loading few-shot items");
    cfg.fewshot = n_fewshot_paths ? &fewshot : NULL;
    if (limit > 0) kmed_mcqa_truncate(&items, (size_t)limit);

    if (dump || show) {
        kmed_buf b = {0};
        kmed_afile af;
        if (dump) die_if(kmed_afile_open(&af, dump, &err), &err, "creating prompt dump");
        for (k = 0; k < items.n; k++) {
            kmed_buf p = {0};
            if (show && strcmp(items.items[k].id, show) != 0 &&
                !(strspn(show, "0123456789") == strlen(show) && (size_t)atol(show) == k))
                continue;
            die_if(kmed_mcqa_config_prompt(&items.items[k], &cfg, &p, &err),
                   &err, "building prompt");
            if (show) { fwrite(p.data, 1, p.len, stdout); putchar('\n'); kmed_buf_free(&p); break; }
            b.len = 0;
            kmed_buf_puts(&b, "{\"prompt\":");
            kmed_buf_json_str(&b, p.data, p.len);
            kmed_buf_puts(&b, "}\n");
            die_if(kmed_afile_write(&af, b.data, b.len, &err), &err, "writing prompt dump");
            kmed_buf_free(&p);
        }
        if (show && k == items.n) die("no item '%s'", show);
        if (dump) die_if(kmed_afile_commit(&af, &err), &err, "writing prompt dump");
        kmed_buf_free(&b);
        kmed_mcqa_free(&items);
        kmed_mcqa_free(&fewshot);
        return 0;
    }

    if (!model_path) usage_error(usage, "--model is required for scoring");
    {
        kmed_gemma_opts opts;
        memset(&opts, 0, sizeof opts);
        opts.cb = cb;
        if (type) {
            opts.convert = 1;
            opts.type = kmed_dtype_parse(type);
            if (!kmed_dtype_computable(opts.type)) usage_error(usage, "--type: unknown '%s'", type);
        }
        die_if(kmed_tok_load(&tok, tok_path ? tok_path : model_path, &err), &err,
               "loading tokenizer");
        die_if(kmed_gemma_load(&model, model_path, &opts, &err), &err, "loading model");
    }
    memset(&lora, 0, sizeof lora);
    if (adapter) die_if(kmed_lora_load(&lora, &model, adapter, &err), &err, "loading adapter");
    die_if(kmed_pool_create(&pool, threads, &err), &err, "starting threads");
    preds = (kmed_mcqa_pred *)calloc(items.n ? items.n : 1, sizeof *preds);
    if (!preds) die("out of memory");
    t0 = kmed_time_now();
    die_if(kmed_mcqa_score(&model, adapter ? &lora : NULL, &tok, pool, &items, &cfg, preds, &cb,
                           &err), &err, "scoring");
    fprintf(stderr, "kmed-eval: %zu items in %.1f s (%.2f items/s)\n", items.n,
            kmed_time_now() - t0, (double)items.n / (kmed_time_now() - t0));
    if (kmed_mcqa_summarize(&items, preds, &sum) != KMED_OK) /* load checks this already */
        die("summarizing: more than %d subsets", KMED_MCQA_MAX_SUBSETS);

    printf("%-10s %6s %8s %18s %9s\n", "subset", "n", "acc", "95% CI", "unparsed");
    for (k = 0; k <= sum.n_subsets; k++) {
        const kmed_mcqa_acc *a = k < sum.n_subsets ? &sum.sub[k] : &sum.overall;
        printf("%-10s %6zu %7.2f%% [%6.2f%%, %6.2f%%] %9zu\n", k < sum.n_subsets ? a->subset : "overall",
               a->n, 100 * a->acc, 100 * a->lo, 100 * a->hi, a->unparsed);
    }
    printf("%-10s %6s %7.2f%% (mean of subsets)\n", "macro", "", 100 * sum.macro);

    if (out_preds) {
        kmed_buf b = {0};
        for (k = 0; k < items.n; k++) {
            kmed_mcqa_pred_json(&items.items[k], &preds[k], &b);
            kmed_buf_puts(&b, "\n");
        }
        die_if(kmed_file_write_atomic(out_preds, b.data, b.len, &err), &err, "writing predictions");
        kmed_buf_free(&b);
    }
    if (out_json) {
        kmed_buf b = {0};
        char *rel = out_preds ? rel_path(out_preds, out_json) : NULL;
        kmed_mcqa_report_json(&sum, &cfg, model_path, rel, &b);
        die_if(kmed_file_write_atomic(out_json, b.data, b.len, &err), &err, "writing summary");
        kmed_buf_free(&b);
        free(rel);
    }
    if (svg) {
        kmed_buf b = {0};
        const char *label = adapter ? "adapter" : "model";
        kmed_mcqa_chart_svg(&sum, &label, 1, &b);
        die_if(kmed_file_write_atomic(svg, b.data, b.len, &err), &err, "writing chart");
        kmed_buf_free(&b);
    }
    kmed_mcqa_preds_free(preds, items.n);
    free(preds);
    kmed_pool_free(pool);
    if (adapter) kmed_lora_free(&lora);
    kmed_gemma_free(&model);
    kmed_tok_free(&tok);
    kmed_mcqa_free(&items);
    kmed_mcqa_free(&fewshot);
    return 0;
}

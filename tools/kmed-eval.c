/* kmed-eval: KorMedMCQA scoring with lm-evaluation-harness's kormedmcqa prompts.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-eval.c -o build/kmed-eval -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "common.h"

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
    "  --items FILE        items to score; repeatable (default: none)\n"
    "  --subset NAME       subset for items whose file/column does not say (default: from\n"
    "                      the 'subset' field, else the file name, else 'other')\n"
    "  --fewshot FILE      few-shot split (exemplars taken in order per subset)\n"
    "  --shots K           exemplars per prompt (default: 0)\n"
    "  --chat              wrap prompts in Gemma's chat template (default: off)\n"
    "  --method M          letter|generate|option|cloze (default: letter); cloze: the\n"
    "                      question alone, each option text scored as its answer\n"
    "  --max-gen-tokens N  generation budget for --method generate (default: 32)\n"
    "  --no-prefix-cache   recompute the few-shot prefix for every item (default: reuse)\n"
    "  --limit N           score only the first N items (default: all)\n"
    "  --threads N         worker threads (default: all cores)\n"
    "  --out FILE          summary JSON, lm-eval shaped (default: none)\n"
    "  --preds FILE        per-item predictions JSONL (default: none)\n"
    "  --svg FILE          per-subset accuracy chart (default: none)\n"
    "  --dump-prompts OUT  write {\"prompt\": ...} per item, no model needed\n"
    "  --show-prompt N|ID  print the exact prompt of item N (0-based) or with that id\n"
    "  --extract [FILE]    read one JSON string per line, write the extracted letter or null\n"
    "  --compare A B       paired comparison of two runs (summary .json or predictions\n"
    "                      .jsonl): per-subset difference and McNemar's exact test\n"
    "  --labels A,B        run names for --compare and its chart (default: base,adapter)\n"
    "  --help              this text\n";

typedef struct pred_row { char *id; char *subset; int correct; } pred_row;

/* Reads per-item correctness from a predictions JSONL, or from the file a summary names. */
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
        if (n == cap) {
            cap = cap ? 2 * cap : 1024;
            *rows = (pred_row *)realloc(*rows, cap * sizeof **rows);
            if (!*rows) die("out of memory");
        }
        (*rows)[n].id = strdup(kmed_json_str(kmed_json_get(v, "id"), ""));
        (*rows)[n].subset = strdup(kmed_json_str(kmed_json_get(v, "subset"), "other"));
        (*rows)[n].correct = kmed_json_bool(kmed_json_get(v, "correct"), 0);
        n++;
    }
    die_if(r, &err, "reading predictions");
    kmed_jsonl_close(&jl);
    return n;
}

static int compare_runs(const char *a_path, const char *b_path, const char *labels,
                        const char *svg_path)
{
    static const char *const subsets[] = {"doctor", "nurse", "pharm", "dentist", NULL};
    pred_row *a, *b;
    size_t na = read_preds(a_path, &a), nb = read_preds(b_path, &b), i, j;
    char la[64] = "base", lb[64] = "adapter";
    kmed_mcqa_summary sum[2];
    int s;
    if (labels) {
        const char *comma = strchr(labels, ',');
        if (!comma) die("--labels wants two names separated by a comma");
        snprintf(la, sizeof la, "%.*s", (int)(comma - labels), labels);
        snprintf(lb, sizeof lb, "%s", comma + 1);
    }
    /* pair by id; every item of A must be in B */
    memset(sum, 0, sizeof sum);
    printf("%-10s %6s %9s %9s %8s %5s %5s %10s\n", "subset", "n", la, lb, "diff", "b", "c",
           "McNemar p");
    for (s = 0; s <= 4; s++) {
        const char *name = s < 4 ? subsets[s] : NULL;
        size_t n = 0, ca = 0, cb = 0, bb = 0, cc = 0;
        for (i = 0; i < na; i++) {
            if (name && strcmp(a[i].subset, name) != 0) continue;
            for (j = 0; j < nb && strcmp(a[i].id, b[j].id) != 0; j++) {}
            if (j == nb) die("item %s of %s is missing from %s", a[i].id, a_path, b_path);
            n++;
            ca += (size_t)a[i].correct;
            cb += (size_t)b[j].correct;
            bb += a[i].correct && !b[j].correct;
            cc += !a[i].correct && b[j].correct;
        }
        if (!n) continue;
        printf("%-10s %6zu %8.1f%% %8.1f%% %+7.1f%% %5zu %5zu %10.3g\n", name ? name : "overall",
               n, 100.0 * (double)ca / (double)n, 100.0 * (double)cb / (double)n,
               100.0 * ((double)cb - (double)ca) / (double)n, bb, cc, kmed_mcqa_mcnemar(bb, cc));
        {
            kmed_mcqa_acc *da = name ? &sum[0].sub[sum[0].n_subsets] : &sum[0].overall;
            kmed_mcqa_acc *db = name ? &sum[1].sub[sum[1].n_subsets] : &sum[1].overall;
            snprintf(da->subset, sizeof da->subset, "%s", name ? name : "all");
            snprintf(db->subset, sizeof db->subset, "%s", name ? name : "all");
            da->n = db->n = n;
            da->correct = ca;
            db->correct = cb;
            da->acc = (double)ca / (double)n;
            db->acc = (double)cb / (double)n;
            kmed_mcqa_wilson(ca, n, 1.959963984540054, &da->lo, &da->hi);
            kmed_mcqa_wilson(cb, n, 1.959963984540054, &db->lo, &db->hi);
            if (name) { sum[0].n_subsets++; sum[1].n_subsets++; }
        }
    }
    if (svg_path) {
        kmed_error err = {0};
        kmed_buf out = {0};
        const char *names[2];
        names[0] = la;
        names[1] = lb;
        kmed_mcqa_chart_svg(sum, names, 2, &out);
        die_if(kmed_file_write_atomic(svg_path, out.data, out.len, &err), &err, "writing chart");
        kmed_buf_free(&out);
    }
    for (i = 0; i < na; i++) { free(a[i].id); free(a[i].subset); }
    for (i = 0; i < nb; i++) { free(b[i].id); free(b[i].subset); }
    free(a);
    free(b);
    return 0;
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
            fprintf(stderr, "kmed-eval: %s\n", doc.root ? "line is not a JSON string" : err.msg);
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
    const char *model_path = NULL, *adapter = NULL, *tok_path = NULL, *fewshot_path = NULL;
    const char *subset = NULL, *out_json = NULL, *out_preds = NULL, *svg = NULL;
    const char *dump = NULL, *show = NULL, *labels = NULL, *type = NULL;
    const char *items_paths[64];
    int n_items_paths = 0, threads = 0, i;
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
        else if (!strcmp(a, "--fewshot")) fewshot_path = arg_str(argc, argv, &i, usage);
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
        else if (!strcmp(a, "--max-gen-tokens")) cfg.max_gen_tokens = (int)arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--no-prefix-cache")) cfg.no_prefix_cache = 1;
        else if (!strcmp(a, "--limit")) limit = arg_long(argc, argv, &i, usage);
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
    if (cfg.shots > 0 && !fewshot_path) usage_error(usage, "--shots needs --fewshot FILE");
    for (i = 0; i < n_items_paths; i++)
        die_if(kmed_mcqa_load(&items, items_paths[i], subset, &err), &err, "loading items");
    if (fewshot_path) die_if(kmed_mcqa_load(&fewshot, fewshot_path, subset, &err), &err,
                             "loading few-shot items");
    cfg.fewshot = fewshot_path ? &fewshot : NULL;
    if (limit >= 0) kmed_mcqa_truncate(&items, (size_t)limit);

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
    kmed_mcqa_summarize(&items, preds, &sum);

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
        const char *rel = out_preds ? strrchr(out_preds, '/') : NULL;
        kmed_mcqa_report_json(&sum, &cfg, model_path, rel ? rel + 1 : out_preds, &b);
        die_if(kmed_file_write_atomic(out_json, b.data, b.len, &err), &err, "writing summary");
        kmed_buf_free(&b);
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

/* kmed-data: runs the data pipeline (read, clean, filter, safety, decontaminate, dedup, mix,
   format, split, pack) over Korean medical sources and writes train/val JSONL, packed token
   files and a report.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-data.c -o build/kmed-data \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "common.h"
#include <limits.h> /* after kmed.h, which sets the POSIX level first */

static const char usage[] =
    "usage: kmed-data [--config FILE] [--source KIND:PATH ...] [options]\n"
    "\n"
    "Reads the sources, cleans and filters them, removes duplicates and records that leak\n"
    "evaluation items, and writes into --out:\n"
    "  sft_train.jsonl sft_val.jsonl   {\"id\",\"source\",\"messages\":[{\"role\",\"content\"}]}\n"
    "  cpt_train.jsonl cpt_val.jsonl   {\"id\",\"source\",\"text\"}\n"
    "                                  (KorMedMCQA records also carry \"subset\")\n"
    "  train.jsonl val.jsonl           both kinds together\n"
    "  *_packed.jsonl                  with --tokenizer: one line per sequence of --seq-len\n"
    "                                  tokens, {\"input_ids\",\"labels\",\"position_ids\"}:\n"
    "                                  examples follow one another, each <bos> + tokens;\n"
    "                                  labels -100 where not trained (every <bos>, prompts,\n"
    "                                  padding); position_ids restart at 0 at each example\n"
    "                                  and each sequence start (HF's packing convention), so\n"
    "                                  attention can be kept within an example; the tail\n"
    "                                  padding is one more segment. A chat example longer\n"
    "                                  than --seq-len is cut, and skipped if no trained token\n"
    "                                  is left; a document continues in the next sequence\n"
    "  drops.jsonl                     every dropped, flagged or trimmed record and skipped\n"
    "                                  packed example: id, stage, reason, detail\n"
    "  report.json report.txt          per source: in, dropped per stage and reason, kept,\n"
    "                                  clean-ups, turns left out, truncation, subsets\n"
    "The report table is also printed to stdout; progress and warnings go to stderr.\n"
    "\n"
    "Sources (KIND: kormedmcqa, medexpqa, ultramedical, cod, dict; files .jsonl, .csv, .json\n"
    "with an array, one record, or an object holding the array):\n"
    "  --config FILE        JSON config (below), applied first: every flag, before or after\n"
    "                       it, adds to or overrides it\n"
    "  --source KIND:PATH   add a source (repeatable); the flags below apply to the last one\n"
    "    --name NAME        name in ids and the report (default: file name without extension)\n"
    "    --weight W         mixing weight in [0, 1000]: copies per kept record, fractions\n"
    "                       sampled, 0 drops the source (default 1)\n"
    "    --format F         sft, cpt, both or auto (default auto: dict -> cpt, others -> sft)\n"
    "    --map DST=SRC      read canonical field DST from input key SRC (repeatable; a.b nests)\n"
    "    --min-korean X     drop records whose Hangul share of letters is below X in [0, 1]\n"
    "                       (default 0: off)\n"
    "    --splits LIST      keep only these splits, e.g. train,dev (default: all)\n"
    "    --subset S         kormedmcqa subset (default: column, else from the file name)\n"
    "    --strip-html       strip HTML tags in every field (default: dict only)\n"
    "    --no-explanations  drop cot/explanations: answers are the option alone (default:\n"
    "                       kept)\n"
    "    --cloze            kormedmcqa/medexpqa in the cloze form: the question alone, the\n"
    "                       answer's text (default: options and the letter)\n"
    "  --eval KIND:PATH     evaluation set to decontaminate against (repeatable)\n"
    "\n"
    "Output and packing:\n"
    "  --out DIR            output directory (default: out/data)\n"
    "  --tokenizer PATH     tokenizer.json, tokenizer.model or model dir: enables packing\n"
    "                       (default: none, no packed files)\n"
    "  --seq-len N          tokens per packed sequence, at least 8 (default 1024)\n"
    "  --seed N             shuffle and weight sampling seed, >= 0 (default 0)\n"
    "  --val-fraction X     share of records for validation by id hash, in [0, 1); 0: none\n"
    "                       (default 0.05)\n"
    "\n"
    "Filters:\n"
    "  --min-chars N        drop records with fewer characters; 0: no minimum (default 8)\n"
    "  --max-chars N        drop records with more characters, >= min (default 20000)\n"
    "  --no-exact           no exact dedup (default: on)\n"
    "  --no-near            no near-duplicate dedup (default: on)\n"
    "  --near-threshold X   MinHash Jaccard for near duplicates, in (0, 1] (default 0.8)\n"
    "  --ngram N            character n-gram for MinHash (default 5)\n"
    "  --num-perm N         MinHash size, at most 512 (default 128)\n"
    "  --bands N            LSH bands, dividing num-perm (default: from the threshold)\n"
    "  --decontam-words N   shared word n-gram that marks a leak (default 13)\n"
    "  --decontam-chars N   shared Hangul/Han character n-gram that marks a leak (default 50)\n"
    "  --decontam-min-words N  an eval question shorter than the word n-gram but of at least\n"
    "                       N words leaks when a record contains it whole (default 8)\n"
    "  --decontam-min-chars N  the same for N Hangul/Han characters (default 12)\n"
    "  --decontam-threshold X  near-duplicate eval question Jaccard, in (0, 1] (default 0.8);\n"
    "                       every user turn of a conversation is compared\n"
    "  --safety MODE        drop, flag or off (default drop)\n"
    "  --safety-phrase CAT:PHRASE  add a phrase to a harmful-content list (repeatable; '*'\n"
    "                       stands for up to 6 characters)\n"
    "  --no-safety-defaults use only the given phrases (default: the built-in lists too,\n"
    "                       which hold requests and instructions - \"자살 방법 알려줘\",\n"
    "                       \"치사량만큼 드세요\" - not exam topics)\n"
    "  --disclaimer         append the standard disclaimer to chat/case answers (default off)\n"
    "  --disclaimer-text T  append T instead (implies --disclaimer)\n"
    "  --no-drop-log        do not write drops.jsonl (default: written)\n"
    "  --quiet              no progress (default: progress on stderr)\n"
    "  --help               this text\n"
    "\n"
    "Config file (paths relative to the file's directory; every key optional; an unknown\n"
    "key or a value of the wrong type is an error naming the file and the key):\n"
    "  {\"out\": \"out/data\", \"seed\": 0, \"val_fraction\": 0.05, \"seq_len\": 1024,\n"
    "   \"tokenizer\": \"path/tokenizer.json\", \"min_chars\": 8, \"max_chars\": 20000,\n"
    "   \"dedup\": {\"exact\": true, \"near\": true, \"threshold\": 0.8, \"ngram\": 5,\n"
    "             \"num_perm\": 128, \"bands\": 16},\n"
    "   \"decontam\": {\"word_ngram\": 13, \"char_ngram\": 50, \"threshold\": 0.8,\n"
    "                \"min_words\": 8, \"min_chars\": 12},\n"
    "   \"safety\": {\"action\": \"drop\", \"defaults\": true,\n"
    "              \"lists\": {\"self_harm\": [\"...\"]}},\n"
    "   \"disclaimer\": false,            (or a string: the text to append)\n"
    "   \"sources\": [{\"kind\": \"kormedmcqa\", \"path\": \"train.jsonl\", \"name\": \"kmmcqa\",\n"
    "                \"weight\": 1, \"format\": \"auto\", \"min_korean\": 0,\n"
    "                \"splits\": [\"train\"], \"subset\": \"\", \"split\": \"\",\n"
    "                \"strip_html\": false, \"explanations\": true, \"cloze\": false,\n"
    "                \"map\": {\"question\": \"full_question\"}}],\n"
    "   \"eval\": [{\"kind\": \"kormedmcqa\", \"path\": \"test.jsonl\"}]}\n"
    "\n"
    "Canonical fields for --map, per kind:\n"
    "  kormedmcqa   id subject year period q_number question A B C D E answer cot subset split\n"
    "  medexpqa     id question options answer explanation lang split\n"
    "  ultramedical id messages role content split\n"
    "  cod          id case symptoms diagnosis explanation dialogue role content split\n"
    "  dict         id name sections section_title section_text split\n";

/* The flags that take no value; every other flag takes one (the --config pre-scan skips
   values by this list). */
static const char *const switches[] = {"--help", "-h", "--strip-html", "--no-explanations",
                                       "--cloze", "--no-exact", "--no-near",
                                       "--no-safety-defaults", "--disclaimer", "--no-drop-log",
                                       "--quiet"};

static int is_switch(const char *a)
{
    size_t k;
    for (k = 0; k < sizeof switches / sizeof switches[0]; k++)
        if (strcmp(a, switches[k]) == 0) return 1;
    return 0;
}

/* An integer flag value in [lo, hi]. */
static long arg_int_in(int argc, char **argv, int *i, long lo, long hi)
{
    long v = arg_long(argc, argv, i, usage);
    if (v < lo || v > hi)
        usage_error(usage, "%s %ld: must be in [%ld, %ld]", argv[*i - 1], v, lo, hi);
    return v;
}

/* A number flag value in [lo, hi]; open_lo / open_hi exclude the end. */
static double arg_num_in(int argc, char **argv, int *i, double lo, double hi, int open_lo,
                         int open_hi)
{
    double v = arg_double(argc, argv, i, usage);
    if (!(v >= lo && v <= hi) || (open_lo && v == lo) || (open_hi && v == hi))
        usage_error(usage, "%s %g: must be in %c%g, %g%c", argv[*i - 1], v, open_lo ? '(' : '[',
                    lo, hi, open_hi ? ')' : ']');
    return v;
}

static kmed_result tok_encode(void *user, const char *text, size_t len, int *ids, size_t cap,
                              size_t *n, kmed_error *err)
{
    kmed_tok_config c = {0};
    c.no_bos = 1;
    return kmed_tok_encode((const kmed_tok *)user, &c, text, len, ids, cap, n, err);
}

/* "KIND:PATH" -> a new source in cfg. */
static kmed_data_source *add_source(kmed_data_config *cfg, int eval, const char *arg)
{
    kmed_error e = {0};
    kmed_data_source *s;
    const char *colon = strchr(arg, ':');
    char kind[32];
    if (!colon || colon == arg || (size_t)(colon - arg) >= sizeof kind || !colon[1])
        usage_error(usage, "%s: expected KIND:PATH", arg);
    memcpy(kind, arg, (size_t)(colon - arg));
    kind[colon - arg] = 0;
    die_if(kmed_data_config_add_source(cfg, eval, &s, &e), &e, "adding a source");
    if (kmed_data_kind_parse(kind, &s->kind, &e) != KMED_OK) usage_error(usage, "%s", e.msg);
    if (strlen(colon + 1) >= sizeof s->path) usage_error(usage, "%s: path too long", arg);
    strcpy(s->path, colon + 1);
    s->weight = 1;
    return s;
}

/* The "tokenizer" key of a config file, relative to its directory. */
static void config_tokenizer(const char *path, char *out, size_t cap)
{
    kmed_error e = {0};
    kmed_json_doc doc = {0};
    char *data;
    size_t len;
    const char *t, *slash = strrchr(path, '/');
    if (kmed_file_read(path, 0, &data, &len, &e) != KMED_OK) return;
    if (kmed_json_parse(&doc, data, len, path, 0, &e) == KMED_OK &&
        (t = kmed_json_str(kmed_json_get(doc.root, "tokenizer"), NULL)) != NULL) {
        if (t[0] != '/' && slash) snprintf(out, cap, "%.*s/%s", (int)(slash - path), path, t);
        else snprintf(out, cap, "%s", t);
    }
    kmed_json_free(&doc);
    kmed_free(data);
}

/* Loads the --config file, wherever it stands on the command line, so that the config
   comes first and every flag then adds to it or overrides it. Its safety phrases move to
   extra, which also collects the --safety-phrase ones. */
static void load_config(int argc, char **argv, kmed_data_config *cfg, kmed_data_safety *extra,
                        int *n_extra, char *tokenizer, size_t tok_cap)
{
    const char *path = NULL;
    kmed_error e = {0};
    size_t k;
    int i;
    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) return;
        if (strcmp(argv[i], "--config") == 0) {
            if (path) usage_error(usage, "--config given twice");
            path = arg_str(argc, argv, &i, usage);
        } else if (!is_switch(argv[i])) {
            i++; /* its value */
        }
    }
    if (!path) return;
    die_if(kmed_data_config_load(cfg, path, &e), &e, "reading the config");
    if (cfg->safety_extra) {
        for (k = 0; k < cfg->safety_extra->n; k++)
            die_if(kmed_data_safety_add(extra, cfg->safety_extra->category[k],
                                        cfg->safety_extra->phrase[k], &e), &e, "safety");
        *n_extra += (int)cfg->safety_extra->n;
        kmed_data_safety_free(cfg->safety_extra);
        free(cfg->safety_extra);
        cfg->safety_extra = NULL;
    }
    config_tokenizer(path, tokenizer, tok_cap);
}

int main(int argc, char **argv)
{
    kmed_data_config cfg;
    kmed_data_report rep;
    kmed_data_source *last = NULL;
    kmed_data_safety extra;
    kmed_callbacks cb = {0};
    progress_state ps = {0};
    kmed_error e = {0};
    kmed_tok tok;
    kmed_buf table = {0};
    char tokenizer[1024] = "";
    int i, quiet = 0, have_tok = 0, n_extra = 0;
    kmed_tool_name = "kmed-data";
    memset(&cfg, 0, sizeof cfg);
    memset(&tok, 0, sizeof tok);
    die_if(kmed_data_safety_init(&extra, 0, &e), &e, "safety lists");
    load_config(argc, argv, &cfg, &extra, &n_extra, tokenizer, sizeof tokenizer);
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage, stdout);
            return 0;
        } else if (strcmp(a, "--config") == 0) {
            i++; /* loaded already */
        } else if (strcmp(a, "--source") == 0) {
            last = add_source(&cfg, 0, arg_str(argc, argv, &i, usage));
        } else if (strcmp(a, "--eval") == 0) {
            add_source(&cfg, 1, arg_str(argc, argv, &i, usage));
            last = NULL; /* per-source flags apply to training sources */
        } else if (strcmp(a, "--name") == 0 || strcmp(a, "--weight") == 0 ||
                   strcmp(a, "--format") == 0 || strcmp(a, "--map") == 0 ||
                   strcmp(a, "--min-korean") == 0 || strcmp(a, "--splits") == 0 ||
                   strcmp(a, "--subset") == 0 || strcmp(a, "--strip-html") == 0 ||
                   strcmp(a, "--no-explanations") == 0 || strcmp(a, "--cloze") == 0) {
            if (!last) usage_error(usage, "%s must follow a --source", a);
            if (strcmp(a, "--strip-html") == 0) {
                last->strip_html = 1;
            } else if (strcmp(a, "--no-explanations") == 0) {
                last->no_explanation = 1;
            } else if (strcmp(a, "--cloze") == 0) {
                last->cloze = 1;
            } else if (strcmp(a, "--weight") == 0) {
                double w = arg_num_in(argc, argv, &i, 0, 1000, 0, 0);
                last->weight = w == 0 ? -1 : w;
            } else if (strcmp(a, "--min-korean") == 0) {
                last->min_korean = arg_num_in(argc, argv, &i, 0, 1, 0, 0);
            } else {
                const char *v = arg_str(argc, argv, &i, usage);
                if (strcmp(a, "--map") == 0) {
                    if (kmed_data_source_map(last, v, &e) != KMED_OK)
                        usage_error(usage, "%s", e.msg);
                } else if (strcmp(a, "--format") == 0) {
                    if (strcmp(v, "sft") == 0) last->format = KMED_DATA_FMT_SFT;
                    else if (strcmp(v, "cpt") == 0) last->format = KMED_DATA_FMT_CPT;
                    else if (strcmp(v, "both") == 0) last->format = KMED_DATA_FMT_BOTH;
                    else if (strcmp(v, "auto") == 0) last->format = KMED_DATA_FMT_AUTO;
                    else usage_error(usage, "--format %s: expected sft, cpt, both or auto", v);
                } else {
                    char *dst = strcmp(a, "--name") == 0 ? last->name
                              : strcmp(a, "--splits") == 0 ? last->splits : last->subset;
                    size_t cap = strcmp(a, "--name") == 0 ? sizeof last->name
                               : strcmp(a, "--splits") == 0 ? sizeof last->splits
                                                            : sizeof last->subset;
                    if (strlen(v) >= cap) usage_error(usage, "%s: value too long", a);
                    strcpy(dst, v);
                }
            }
        } else if (strcmp(a, "--out") == 0) {
            const char *v = arg_str(argc, argv, &i, usage);
            if (strlen(v) >= sizeof cfg.out_dir) usage_error(usage, "--out: path too long");
            strcpy(cfg.out_dir, v);
        } else if (strcmp(a, "--tokenizer") == 0) {
            snprintf(tokenizer, sizeof tokenizer, "%s", arg_str(argc, argv, &i, usage));
        } else if (strcmp(a, "--seq-len") == 0) {
            cfg.pack.seq_len = (size_t)arg_int_in(argc, argv, &i, 8, 1L << 24);
        } else if (strcmp(a, "--seed") == 0) {
            cfg.seed = (uint64_t)arg_int_in(argc, argv, &i, 0, LONG_MAX);
        } else if (strcmp(a, "--val-fraction") == 0) {
            cfg.val_fraction = arg_num_in(argc, argv, &i, 0, 1, 0, 1);
            if (cfg.val_fraction == 0) cfg.val_fraction = -1; /* 0 asked: no validation set */
        } else if (strcmp(a, "--min-chars") == 0) {
            /* 0: no minimum; a cleaned record is never empty, so 1 keeps every one */
            long v = arg_int_in(argc, argv, &i, 0, 1000000000L);
            cfg.min_chars = v ? (size_t)v : 1;
        } else if (strcmp(a, "--max-chars") == 0) {
            cfg.max_chars = (size_t)arg_int_in(argc, argv, &i, 1, 1000000000L);
        } else if (strcmp(a, "--no-exact") == 0) {
            cfg.dedup.no_exact = 1;
        } else if (strcmp(a, "--no-near") == 0) {
            cfg.dedup.no_near = 1;
        } else if (strcmp(a, "--near-threshold") == 0) {
            cfg.dedup.threshold = arg_num_in(argc, argv, &i, 0, 1, 1, 0);
        } else if (strcmp(a, "--ngram") == 0) {
            cfg.dedup.ngram = (int)arg_int_in(argc, argv, &i, 1, 1000);
        } else if (strcmp(a, "--num-perm") == 0) {
            cfg.dedup.num_perm = (int)arg_int_in(argc, argv, &i, 1, KMED_DATA_MAX_PERM);
        } else if (strcmp(a, "--bands") == 0) {
            cfg.dedup.bands = (int)arg_int_in(argc, argv, &i, 1, KMED_DATA_MAX_PERM);
        } else if (strcmp(a, "--decontam-words") == 0) {
            cfg.decontam.word_n = (int)arg_int_in(argc, argv, &i, 1, 10000);
        } else if (strcmp(a, "--decontam-chars") == 0) {
            cfg.decontam.char_n = (int)arg_int_in(argc, argv, &i, 1, 10000);
        } else if (strcmp(a, "--decontam-min-words") == 0) {
            cfg.decontam.min_words = (int)arg_int_in(argc, argv, &i, 1, 10000);
        } else if (strcmp(a, "--decontam-min-chars") == 0) {
            cfg.decontam.min_chars = (int)arg_int_in(argc, argv, &i, 1, 10000);
        } else if (strcmp(a, "--decontam-threshold") == 0) {
            cfg.decontam.threshold = arg_num_in(argc, argv, &i, 0, 1, 1, 0);
        } else if (strcmp(a, "--safety") == 0) {
            const char *v = arg_str(argc, argv, &i, usage);
            if (strcmp(v, "drop") == 0) cfg.safety_action = 0;
            else if (strcmp(v, "flag") == 0) cfg.safety_action = 1;
            else if (strcmp(v, "off") == 0) cfg.safety_action = 2;
            else usage_error(usage, "--safety %s: expected drop, flag or off", v);
        } else if (strcmp(a, "--safety-phrase") == 0) {
            const char *v = arg_str(argc, argv, &i, usage), *colon = strchr(v, ':');
            char cat[64];
            if (!colon || colon == v || (size_t)(colon - v) >= sizeof cat || !colon[1])
                usage_error(usage, "--safety-phrase %s: expected CATEGORY:PHRASE", v);
            memcpy(cat, v, (size_t)(colon - v));
            cat[colon - v] = 0;
            if (kmed_data_safety_add(&extra, cat, colon + 1, &e) != KMED_OK)
                usage_error(usage, "--safety-phrase: %s", e.msg);
            n_extra++;
        } else if (strcmp(a, "--no-safety-defaults") == 0) {
            cfg.safety_no_defaults = 1;
        } else if (strcmp(a, "--disclaimer") == 0) {
            cfg.disclaimer = 1;
        } else if (strcmp(a, "--disclaimer-text") == 0) {
            const char *v = arg_str(argc, argv, &i, usage);
            if (strlen(v) >= sizeof cfg.disclaimer_text) usage_error(usage, "disclaimer too long");
            strcpy(cfg.disclaimer_text, v);
            cfg.disclaimer = 1;
        } else if (strcmp(a, "--no-drop-log") == 0) {
            cfg.no_drop_log = 1;
        } else if (strcmp(a, "--quiet") == 0) {
            quiet = 1;
        } else {
            usage_error(usage, "unknown argument '%s'", a);
        }
    }
    if (!cfg.n_sources) usage_error(usage, "no sources: give --config or --source KIND:PATH");
    if (!cfg.out_dir[0]) strcpy(cfg.out_dir, "out/data");
    if (n_extra) cfg.safety_extra = &extra;
    if (tokenizer[0]) {
        die_if(kmed_tok_load(&tok, tokenizer, &e), &e, "loading the tokenizer");
        have_tok = 1;
        if (tok.bos_id < 0 || tok.eos_id < 0 || tok.sot_id < 0 || tok.eot_id < 0)
            die("tokenizer %s: packing needs <bos>, <eos>, <start_of_turn> and <end_of_turn>",
                tokenizer);
        cfg.pack.encode = tok_encode;
        cfg.pack.encode_user = &tok;
        cfg.pack.bos_id = tok.bos_id;
        cfg.pack.eos_id = tok.eos_id;
        cfg.pack.pad_id = tok.pad_id >= 0 ? tok.pad_id : 0;
        cfg.pack.sot_id = tok.sot_id;
        cfg.pack.eot_id = tok.eot_id;
    }
    cb.log = log_print;
    if (!quiet) {
        cb.progress = progress_print;
        cb.user = &ps;
    }
    die_if(kmed_data_run(&cfg, &rep, &cb, &e), &e, "data pipeline");
    kmed_data_report_table(&rep, &table);
    fputs(table.data ? table.data : "", stdout);
    printf("outputs in %s (%.2f s)\n", cfg.out_dir, rep.seconds);
    kmed_buf_free(&table);
    kmed_data_report_free(&rep);
    cfg.safety_extra = NULL;
    kmed_data_safety_free(&extra);
    kmed_data_config_free(&cfg);
    if (have_tok) kmed_tok_free(&tok);
    return 0;
}

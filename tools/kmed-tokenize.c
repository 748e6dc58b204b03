/* kmed-tokenize: text -> ids / pieces / counts and ids -> text with a Gemma tokenizer
   (tokenizer.json, tokenizer.model or a model directory), Gemma chat prompts, and a JSONL
   batch mode for comparing with other implementations.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-tokenize.c \
      -o build/kmed-tokenize -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "common.h"
#include <errno.h>

static const char usage[] =
    "usage: kmed-tokenize --tokenizer PATH [options] [TEXT]\n"
    "\n"
    "Encodes TEXT (or the whole of --file, or stdin) and prints its ids.\n"
    "\n"
    "  --tokenizer PATH   tokenizer.json, tokenizer.model, or a directory holding either\n"
    "                     (plus tokenizer_config.json) (required)\n"
    "  --file PATH        read the text (or the JSONL batch) from PATH (default: TEXT or stdin)\n"
    "  --ids              print ids, space separated (default)\n"
    "  --pieces           print the pieces, each as a JSON string\n"
    "  --count            print the number of ids\n"
    "                     (--ids, --pieces, --count: for TEXT, --file or --chat without --render)\n"
    "  --no-special       encode without special tokens (no <bos>); with --decode, drop\n"
    "                     special tokens (default: off; not with --chat or --jsonl)\n"
    "  --decode IDS       print the text of IDS, e.g. \"2,651,6974\" (commas, spaces or [])\n"
    "  --chat FILE.json   render a conversation with Gemma's chat template and encode the\n"
    "                     prompt as HF does: no extra <bos>, and <bos>, <start_of_turn>,\n"
    "                     <end_of_turn> become their ids with tokenizer.model too; FILE holds\n"
    "                     [{\"role\", \"content\"}, ...] or {\"messages\": [...],\n"
    "                     \"add_generation_prompt\": bool}. Content holding U+0000 is refused.\n"
    "                     A tokenizer_config.json chat_template other than Gemma-2's gets a\n"
    "                     warning on stderr: kmed always renders Gemma's.\n"
    "  --no-generation-prompt  with --chat: no trailing \"<start_of_turn>model\\n\"\n"
    "                     (default: added unless the file says otherwise)\n"
    "  --render           with --chat: print the rendered prompt instead of ids\n"
    "  --jsonl            batch mode: one JSON request per input line, one JSON answer per\n"
    "                     output line, in order (the flags shown are the defaults):\n"
    "                       {\"text\": s, \"add_special_tokens\": true}  -> {\"ids\": [...]}\n"
    "                       {\"ids\": [...], \"skip_special_tokens\": false} -> {\"text\": s}\n"
    "                       {\"messages\": [...], \"add_generation_prompt\": false} ->\n"
    "                                                     {\"text\": prompt, \"ids\": [...]}\n"
    "                     a line that fails (bad JSON, a flag that is not true/false, an id\n"
    "                     outside the vocabulary, ...) -> {\"error\": \"...\"}; the batch goes on\n"
    "  --help             this text\n";

/* Encodes text, as a rendered chat prompt (kmed_chat_encode) when chat is set; *ids grows
   as needed. */
static kmed_result encode(const kmed_tok *tok, const char *text, size_t len, int no_special,
                          int chat, int **ids, size_t *cap, size_t *n, kmed_error *err)
{
    kmed_tok_config cfg = {0};
    kmed_result r;
    int pass;
    cfg.no_bos = no_special;
    for (pass = 0;; pass++) {
        r = chat ? kmed_chat_encode(tok, text, len, *ids, *cap, n, err)
                 : kmed_tok_encode(tok, &cfg, text, len, *ids, *cap, n, err);
        if (r != KMED_ERR_SPACE || pass) return r;
        {
            int *p = (int *)realloc(*ids, (*n + 1) * sizeof **ids);
            if (!p) return KMED_ERR_NOMEM;
            *ids = p;
            *cap = *n + 1;
        }
    }
}

/* The boolean `key` of a JSON request: def when absent; 0 with why[] set when it is present
   but not true or false (Python would read 0 or "no" differently from kmed_json_bool). */
static int json_flag(const kmed_json *req, const char *key, int def, int *val, char *why,
                     size_t why_cap)
{
    const kmed_json *v = kmed_json_get(req, key);
    *val = def;
    if (!v) return 1;
    if (v->type != KMED_JSON_TRUE && v->type != KMED_JSON_FALSE) {
        snprintf(why, why_cap, "\"%s\" must be true or false", key);
        return 0;
    }
    *val = v->type == KMED_JSON_TRUE;
    return 1;
}

/* Messages of a JSON conversation (array of {role, content}); 0 with why[] set if malformed.
   kmed_chat_msg strings end at a NUL, so a U+0000 is refused rather than cut short. */
static int chat_messages(const kmed_json *arr, kmed_chat_msg **msgs, size_t *n, char *why,
                         size_t why_cap)
{
    size_t i;
    *msgs = NULL;
    *n = 0;
    if (!arr || arr->type != KMED_JSON_ARRAY) {
        snprintf(why, why_cap, "\"messages\" must be an array");
        return 0;
    }
    *msgs = (kmed_chat_msg *)calloc(arr->len + 1, sizeof **msgs);
    if (!*msgs) { snprintf(why, why_cap, "out of memory"); return 0; }
    for (i = 0; i < arr->len; i++) {
        const kmed_json *role = kmed_json_get(&arr->kids[i], "role");
        const kmed_json *content = kmed_json_get(&arr->kids[i], "content");
        if (!role || role->type != KMED_JSON_STRING || !content ||
            content->type != KMED_JSON_STRING) {
            snprintf(why, why_cap, "each message needs string \"role\" and \"content\"");
        } else if (strlen(role->str) != role->len || strlen(content->str) != content->len) {
            snprintf(why, why_cap, "message %zu: its %s holds U+0000, which the chat template "
                     "cannot carry", i, strlen(role->str) != role->len ? "role" : "content");
        } else {
            (*msgs)[i].role = role->str;
            (*msgs)[i].content = content->str;
            continue;
        }
        free(*msgs);
        *msgs = NULL;
        return 0;
    }
    *n = arr->len;
    return 1;
}

/* Warns once (*warned) when the tokenizer's own chat template is not the one rendered. */
static void warn_template(const kmed_tok *tok, const char *tok_path, int *warned)
{
    if (*warned || kmed_chat_template_is_gemma(tok)) return;
    *warned = 1;
    fprintf(stderr, "kmed-tokenize: warning: %s has a chat_template that is not Gemma-2's; "
                    "kmed renders Gemma's template\n", tok_path);
}

/* Parses "2,651 6974" or "[2, 651]" into ids; 0 on a bad number. */
static int parse_ids(const char *s, int **ids, size_t *n)
{
    size_t cap = 16;
    *n = 0;
    *ids = (int *)malloc(cap * sizeof **ids);
    while (*ids && *s) {
        char *end;
        long v;
        if (*s == ',' || *s == ' ' || *s == '[' || *s == ']' || *s == '\n' || *s == '\t') {
            s++;
            continue;
        }
        v = strtol(s, &end, 10);
        if (end == s || v < 0 || v > 0x7FFFFFFF) return 0;
        if (*n == cap) {
            int *p = (int *)realloc(*ids, 2 * cap * sizeof **ids);
            if (!p) return 0;
            *ids = p;
            cap *= 2;
        }
        (*ids)[(*n)++] = (int)v;
        s = end;
    }
    return *ids != NULL;
}

static void print_ids(const kmed_tok *tok, const int *ids, size_t n, int mode)
{
    size_t i;
    kmed_buf b = {0};
    if (mode == 'c') {
        printf("%zu\n", n);
        return;
    }
    for (i = 0; i < n; i++) {
        if (i) kmed_buf_put(&b, " ", 1);
        if (mode == 'p') {
            size_t len;
            const char *p = kmed_tok_piece(tok, ids[i], &len);
            kmed_buf_json_str(&b, p ? p : "", p ? len : 0);
        } else {
            kmed_buf_printf(&b, "%d", ids[i]);
        }
    }
    if (b.failed) die("printing ids: out of memory");
    printf("%s\n", b.data ? b.data : "");
    kmed_buf_free(&b);
}

static void json_ids(kmed_buf *b, const int *ids, size_t n)
{
    size_t i;
    kmed_buf_put(b, "[", 1);
    for (i = 0; i < n; i++) kmed_buf_printf(b, i ? ",%d" : "%d", ids[i]);
    kmed_buf_put(b, "]", 1);
}

/* One --jsonl request into out (without the newline). */
static void jsonl_line(const kmed_tok *tok, const char *tok_path, const char *line, size_t len,
                       size_t lineno, kmed_buf *out, int **ids, size_t *cap, int *warned)
{
    kmed_json_doc doc = {0};
    kmed_error err = {0};
    const kmed_json *root, *v;
    const char *why = NULL;
    char whybuf[1024];
    size_t n = 0;
    kmed_result r;
    r = kmed_json_parse(&doc, line, len, "input", lineno, &err);
    root = doc.root;
    if (r) why = err.msg;
    else if (!root || root->type != KMED_JSON_OBJECT) why = "expected a JSON object";
    else if ((v = kmed_json_get(root, "messages"))) {
        kmed_chat_msg *msgs = NULL;
        size_t nm;
        kmed_buf prompt = {0};
        int gen;
        if (!json_flag(root, "add_generation_prompt", 0, &gen, whybuf, sizeof whybuf) ||
            !chat_messages(v, &msgs, &nm, whybuf, sizeof whybuf)) {
            why = whybuf;
        } else {
            warn_template(tok, tok_path, warned);
            r = kmed_chat_render(tok, msgs, nm, gen, &prompt, &err);
            if (!r) r = encode(tok, prompt.data, prompt.len, 1, 1, ids, cap, &n, &err);
            if (r) why = err.msg[0] ? err.msg : kmed_result_str(r);
            else {
                kmed_buf_puts(out, "{\"text\":");
                kmed_buf_json_str(out, prompt.data, prompt.len);
                kmed_buf_puts(out, ",\"ids\":");
                json_ids(out, *ids, n);
                kmed_buf_puts(out, "}");
            }
            free(msgs);
        }
        kmed_buf_free(&prompt);
    } else if ((v = kmed_json_get(root, "text"))) {
        int add;
        if (!json_flag(root, "add_special_tokens", 1, &add, whybuf, sizeof whybuf)) why = whybuf;
        else if (v->type != KMED_JSON_STRING) why = "\"text\" must be a string";
        else if ((r = encode(tok, v->str, v->len, !add, 0, ids, cap, &n, &err)))
            why = err.msg[0] ? err.msg : kmed_result_str(r);
        else {
            kmed_buf_puts(out, "{\"ids\":");
            json_ids(out, *ids, n);
            kmed_buf_puts(out, "}");
        }
    } else if ((v = kmed_json_get(root, "ids"))) {
        int skip;
        size_t i;
        int *dec = NULL;
        if (!json_flag(root, "skip_special_tokens", 0, &skip, whybuf, sizeof whybuf)) why = whybuf;
        else if (v->type != KMED_JSON_ARRAY) why = "\"ids\" must be an array";
        else if (!(dec = (int *)malloc((v->len + 1) * sizeof *dec))) why = "out of memory";
        for (i = 0; !why && i < v->len; i++) {
            int64_t x;
            if (!kmed_json_int(&v->kids[i], &x) || x < 0 || x > 0x7FFFFFFF) {
                snprintf(whybuf, sizeof whybuf, "ids[%zu] is not a non-negative integer", i);
                why = whybuf;
            } else {
                dec[i] = (int)x;
            }
        }
        if (!why) {
            kmed_buf text = {0};
            if ((r = kmed_tok_decode(tok, dec, v->len, skip, &text, &err))) why = err.msg;
            else {
                kmed_buf_puts(out, "{\"text\":");
                kmed_buf_json_str(out, text.data, text.len);
                kmed_buf_puts(out, "}");
            }
            kmed_buf_free(&text);
        }
        free(dec);
    } else {
        why = "expected \"text\", \"ids\" or \"messages\"";
    }
    if (why) {
        if (why != whybuf) snprintf(whybuf, sizeof whybuf, "%s", why);
        out->len = 0;
        kmed_buf_puts(out, "{\"error\":");
        kmed_buf_json_str(out, whybuf, strlen(whybuf));
        kmed_buf_puts(out, "}");
    }
    kmed_json_free(&doc);
}

static void run_jsonl(const kmed_tok *tok, const char *tok_path, const char *path)
{
    kmed_lines ls;
    kmed_error err = {0};
    kmed_buf out = {0};
    const char *line;
    size_t len, cap = 0;
    int eof = 0, *ids = NULL, warned = 0;
    die_if(kmed_lines_open(&ls, path, &err), &err, "opening the batch");
    for (;;) {
        kmed_result r = kmed_lines_next(&ls, &line, &len, &eof, &err);
        die_if(r, &err, "reading the batch");
        if (eof) break;
        out.len = 0;
        if (len == 0) kmed_buf_puts(&out, "{\"error\":\"empty line\"}");
        else jsonl_line(tok, tok_path, line, len, ls.line, &out, &ids, &cap, &warned);
        if (out.failed) die("batch: out of memory");
        fwrite(out.data, 1, out.len, stdout);
        fputc('\n', stdout);
        fflush(stdout); /* answers stay in step with requests when driven through a pipe */
    }
    kmed_lines_close(&ls);
    kmed_buf_free(&out);
    free(ids);
}

int main(int argc, char **argv)
{
    const char *tok_path = NULL, *file = NULL, *text = NULL, *decode = NULL, *chat = NULL;
    const char *mode_flag = NULL; /* --ids, --pieces or --count when given */
    int mode = 'i', no_special = 0, jsonl = 0, render = 0, no_gen = 0, warned = 0, i;
    kmed_tok tok;
    kmed_error err = {0};
    char *data = NULL;
    size_t len = 0, cap = 0, n = 0;
    int *ids = NULL;
    kmed_tool_name = "kmed-tokenize";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--tokenizer")) tok_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--file")) file = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--ids") || !strcmp(a, "--pieces") || !strcmp(a, "--count")) {
            mode = a[2];
            mode_flag = a;
        }
        else if (!strcmp(a, "--no-special")) no_special = 1;
        else if (!strcmp(a, "--decode")) decode = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--chat")) chat = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--no-generation-prompt")) no_gen = 1;
        else if (!strcmp(a, "--render")) render = 1;
        else if (!strcmp(a, "--jsonl")) jsonl = 1;
        else if (a[0] == '-' && a[1] == '-') usage_error(usage, "unknown flag %s", a);
        else if (!text) text = a;
        else usage_error(usage, "more than one TEXT argument");
    }
    if (!tok_path) usage_error(usage, "--tokenizer is required");
    if ((decode != NULL) + (chat != NULL) + jsonl > 1)
        usage_error(usage, "--decode, --chat and --jsonl exclude each other");
    if (text && (file || decode || chat || jsonl))
        usage_error(usage, "a TEXT argument goes with none of --file, --decode, --chat, --jsonl");
    if (file && (decode || chat))
        usage_error(usage, "--file goes with neither --decode nor --chat");
    if ((render || no_gen) && !chat)
        usage_error(usage, "--render and --no-generation-prompt need --chat");
    if (mode_flag && (decode || jsonl || render))
        usage_error(usage, "%s does not apply to %s", mode_flag,
                    decode ? "--decode" : jsonl ? "--jsonl" : "--render");
    if (no_special && (chat || jsonl))
        usage_error(usage, "--no-special does not apply to %s (%s)", chat ? "--chat" : "--jsonl",
                    chat ? "the prompt holds its own <bos>"
                         : "each request says add_special_tokens / skip_special_tokens");
    die_if(kmed_tok_load(&tok, tok_path, &err), &err, "loading the tokenizer");
    if (jsonl) {
        run_jsonl(&tok, tok_path, file ? file : "-");
    } else if (decode) {
        kmed_buf out = {0};
        if (!parse_ids(decode, &ids, &n)) usage_error(usage, "--decode: bad id list '%s'", decode);
        die_if(kmed_tok_decode(&tok, ids, n, no_special, &out, &err), &err, "decoding");
        fwrite(out.data, 1, out.len, stdout);
        fputc('\n', stdout);
        kmed_buf_free(&out);
    } else if (chat) {
        kmed_json_doc doc = {0};
        const kmed_json *root, *arr;
        kmed_chat_msg *msgs;
        kmed_buf prompt = {0};
        size_t nm;
        char why[256];
        int gen = !no_gen;
        die_if(kmed_file_read(chat, 0, &data, &len, &err), &err, "reading the conversation");
        die_if(kmed_json_parse(&doc, data, len, chat, 0, &err), &err, "reading the conversation");
        root = doc.root;
        arr = root && root->type == KMED_JSON_OBJECT ? kmed_json_get(root, "messages") : root;
        if (root && root->type == KMED_JSON_OBJECT && !no_gen &&
            !json_flag(root, "add_generation_prompt", 1, &gen, why, sizeof why))
            die("reading the conversation: %s: %s", chat, why);
        if (!chat_messages(arr, &msgs, &nm, why, sizeof why))
            die("reading the conversation: %s: %s", chat, why);
        warn_template(&tok, tok_path, &warned);
        die_if(kmed_chat_render(&tok, msgs, nm, gen, &prompt, &err), &err, "rendering the chat");
        if (render) {
            fwrite(prompt.data, 1, prompt.len, stdout);
        } else {
            die_if(encode(&tok, prompt.data, prompt.len, 1, 1, &ids, &cap, &n, &err), &err,
                   "encoding the prompt");
            print_ids(&tok, ids, n, mode);
        }
        free(msgs);
        kmed_buf_free(&prompt);
        kmed_json_free(&doc);
    } else {
        if (text) {
            len = strlen(text);
        } else {
            kmed_buf in = {0};
            FILE *f = file && strcmp(file, "-") ? fopen(file, "rb") : stdin;
            char chunk[65536];
            size_t got;
            if (!f) die("opening %s: %s", file, strerror(errno));
            while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) kmed_buf_put(&in, chunk, got);
            if (ferror(f)) die("reading %s: %s", file ? file : "stdin", strerror(errno));
            if (f != stdin) fclose(f);
            if (in.failed) die("reading the text: out of memory");
            kmed_buf_put(&in, "", 0);
            data = in.data; /* freed below */
            text = data ? data : "";
            len = in.len;
        }
        die_if(encode(&tok, text, len, no_special, 0, &ids, &cap, &n, &err), &err, "encoding");
        print_ids(&tok, ids, n, mode);
    }
    free(data);
    free(ids);
    kmed_tok_free(&tok);
    return 0;
}

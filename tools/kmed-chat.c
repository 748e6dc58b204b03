/* kmed-chat: chat with a Gemma-2 model (HF directory or GGUF, optional LoRA adapter) in
   Gemma's turn template, streaming tokens, with the medical safety filter on by default;
   --safety-check audits the filter on JSON lines without a model.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-chat.c -o build/kmed-chat \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

static const char *usage =
    "usage: kmed-chat --model PATH [options]            (interactive, or --prompt TEXT)\n"
    "       kmed-chat --safety-check [FILE|-] [options] (audit the safety filter)\n"
    "\n"
    "Chats in Gemma's template (<start_of_turn>user ... <start_of_turn>model); a tokenizer\n"
    "whose tokenizer_config.json names another chat_template gets a warning. On a terminal\n"
    "without --prompt it is a REPL (/reset clears the conversation, /quit or EOF ends it);\n"
    "with stdin redirected and no --prompt, all of stdin is one prompt. The answer streams\n"
    "to stdout; the safety filter appends a disclaimer or replaces a dangerous answer.\n"
    "\n"
    "  --model PATH         HF model directory or .gguf file (required unless --safety-check)\n"
    "  --adapter DIR        PEFT LoRA adapter directory (default: none)\n"
    "  --tokenizer PATH     tokenizer.json / tokenizer.model or a directory holding one\n"
    "                       (default: the model directory, or the GGUF file's directory)\n"
    "  --type T             compute dtype: f32, bf16, q8_0, q4_0 or stored (default: stored)\n"
    "  --prompt TEXT        one-shot: answer TEXT and exit (default: interactive)\n"
    "  --raw                no chat template: continue the text as given (with <bos>)\n"
    "  --temperature X      0 = greedy (default: 0.7)\n"
    "  --top-k N            0 = off (default: 40)\n"
    "  --top-p X            1 = off (default: 0.95)\n"
    "  --repeat-penalty X   1 = off (default: 1.0)\n"
    "  --repeat-last-n N    tokens the penalty looks back over (default: 64)\n"
    "  --seed N             sampling seed (default: 42)\n"
    "  --max-tokens N       answer length limit (default: 512)\n"
    "  --ctx N              KV cache size in tokens, capped at the model's\n"
    "                       max_position_embeddings (default: 4096)\n"
    "  --stop STR           stop string, repeatable (default: none)\n"
    "  --threads N          worker threads, 0 = all CPUs (default: 0)\n"
    "  --fast               quantize activations like llama.cpp (default: off)\n"
    "  --no-safety          turn the safety filter off (default: on)\n"
    "  --safety-config FILE extra phrases / texts for the filter (default: built-in only)\n"
    "  --safety-check [F]   read JSON lines {\"prompt\": ..., \"response\": ...} from F or\n"
    "                       stdin (-) and write {\"action\": \"pass\"|\"disclaimer\"|\"refuse\",\n"
    "                       \"text\": final answer} per line; no model needed. A malformed\n"
    "                       line gets {\"error\": ...} and the rest goes on; a read error\n"
    "                       stops with exit 1\n"
    "  --stats              print tokens/s to stderr after each answer (default: off)\n"
    "  --help               this text\n";

#define MAX_STOPS 16

/* ---- --safety-check ---- */

static int safety_check(const kmed_safety *sf, const char *path)
{
    kmed_error err = {0};
    kmed_jsonl in;
    kmed_buf out = {0};
    int bad = 0;
    die_if(kmed_jsonl_open(&in, path, &err), &err, "opening input");
    for (;;) {
        const kmed_json *v = NULL;
        int eof = 0;
        kmed_result r = kmed_jsonl_next(&in, &v, &eof, &err);
        out.len = 0;
        /* a bad line is reported and skipped; a read error or NOMEM ends the input */
        if (r != KMED_OK && r != KMED_ERR_FORMAT && r != KMED_ERR_LIMIT) {
            fflush(stdout);
            die_if(r, &err, "reading input");
        }
        if (r != KMED_OK) {
            fprintf(stderr, "kmed-chat: %s\n", err.msg);
            kmed_buf_puts(&out, "{\"error\": ");
            kmed_buf_json_str(&out, err.msg, strlen(err.msg));
            kmed_buf_puts(&out, "}\n");
            bad++;
        } else if (eof) {
            break;
        } else {
            const char *prompt = kmed_json_str(kmed_json_get(v, "prompt"), NULL);
            const char *resp = kmed_json_str(kmed_json_get(v, "response"), NULL);
            kmed_safety_verdict verdict;
            char *text = NULL;
            if (!v || v->type != KMED_JSON_OBJECT || (!prompt && !resp)) {
                fprintf(stderr, "kmed-chat: %s:%zu: expected an object with \"prompt\" and/or "
                                "\"response\" strings\n", in.lines.name, in.lines.line);
                kmed_buf_puts(&out, "{\"error\": \"expected an object with prompt/response\"}\n");
                bad++;
            } else {
                die_if(kmed_safety_check(sf, prompt, resp, &verdict, &text, &err), &err,
                       "safety check");
                kmed_buf_printf(&out, "{\"action\": \"%s\", \"text\": ",
                                kmed_safety_action_name(verdict.action));
                kmed_buf_json_str(&out, text, strlen(text));
                kmed_buf_puts(&out, "}\n");
                kmed_free(text);
            }
        }
        if (out.failed) die("out of memory");
        fwrite(out.data, 1, out.len, stdout);
    }
    fflush(stdout);
    kmed_jsonl_close(&in);
    kmed_buf_free(&out);
    if (bad) die("%d malformed input line%s", bad, bad == 1 ? "" : "s");
    return 0;
}

/* ---- chat ---- */

typedef struct chat {
    kmed_gemma m;
    kmed_lora lora;
    int have_lora;
    kmed_tok tok;
    kmed_gemma_state st;
    kmed_pool *pool;
    kmed_safety safety;
    int use_safety, raw, stats;
    kmed_generate_config gc;
    int *cache;                  /* ids in the KV cache [st.pos] */
    char **msgs;                 /* conversation: user, model, user, ... */
    size_t n_msgs;
    size_t streamed;             /* bytes of the current answer written to stdout */
} chat;

static char *dupstr(const char *s)
{
    size_t n = strlen(s);
    char *p = (char *)malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

static int on_token(void *user, int id, const char *text, size_t len)
{
    chat *c = (chat *)user;
    (void)id;
    if (len) {
        fwrite(text, 1, len, stdout);
        fflush(stdout);
        c->streamed += len;
    }
    return 0;
}

/* Ids of the prompt text: raw text with <bos> added, or a rendered chat, whose own <bos>
   and turn markers kmed_chat_encode turns into their ids (with a tokenizer.model too). */
static kmed_result encode_text(const chat *c, const kmed_buf *text, int *ids, size_t cap,
                               size_t *n, kmed_error *err)
{
    if (c->raw) return kmed_tok_encode(&c->tok, NULL, text->data, text->len, ids, cap, n, err);
    return kmed_chat_encode(&c->tok, text->data, text->len, ids, cap, n, err);
}

/* Renders the conversation (Gemma template) or the raw text, and encodes it. */
static int *encode_prompt(chat *c, const char *raw_text, size_t *n)
{
    kmed_error err = {0};
    kmed_buf text = {0};
    int *ids;
    size_t need = 0;
    if (c->raw) {
        kmed_buf_puts(&text, raw_text);
    } else {
        kmed_chat_msg *mm = (kmed_chat_msg *)calloc(c->n_msgs, sizeof *mm);
        size_t i;
        if (!mm) die("out of memory");
        for (i = 0; i < c->n_msgs; i++) {
            mm[i].role = i % 2 == 0 ? "user" : "assistant";
            mm[i].content = c->msgs[i];
        }
        die_if(kmed_chat_render(&c->tok, mm, c->n_msgs, 1, &text, &err), &err,
               "rendering the chat template");
        free(mm);
    }
    if (text.failed) die("out of memory");
    {
        kmed_result r = encode_text(c, &text, NULL, 0, &need, &err);
        if (r != KMED_OK && r != KMED_ERR_SPACE) die_if(r, &err, "encoding the prompt");
    }
    ids = (int *)malloc((need ? need : 1) * sizeof *ids);
    if (!ids) die("out of memory");
    die_if(encode_text(c, &text, ids, need, n, &err), &err, "encoding the prompt");
    kmed_buf_free(&text);
    return ids;
}

/* Prints what the filter changed after the streamed answer. */
static void print_tail(chat *c, const kmed_generate_result *res)
{
    if (res->safety_action == KMED_SAFETY_DISCLAIMER) {
        size_t k = strlen(res->raw);
        while (k && strchr(" \t\r\n", res->raw[k - 1])) k--;
        fputs(res->text + (k <= strlen(res->text) ? k : 0), stdout);
    } else if (res->safety_action == KMED_SAFETY_REFUSE) {
        if (c->streamed)
            fputs("\n\n[안전 필터가 위 답변을 차단했습니다 / the safety filter withheld the "
                  "answer above]\n", stdout);
        fputs(res->text, stdout);
    }
    fputc('\n', stdout);
    fflush(stdout);
}

/* One turn: user text in, streamed answer out. Returns 0 if the turn was skipped. */
static int chat_turn(chat *c, const char *user, int max_tokens)
{
    kmed_error err = {0};
    kmed_generate_result res;
    kmed_generate_config gc = c->gc;
    size_t n = 0, common = 0, ctx = c->st.max_tokens, i;
    int *ids;
    char *copy = dupstr(user);
    if (!copy) die("out of memory");
    c->msgs = (char **)realloc(c->msgs, (c->n_msgs + 2) * sizeof *c->msgs);
    if (!c->msgs) die("out of memory");
    c->msgs[c->n_msgs++] = copy;
    /* Drop the oldest exchanges until the prompt and the answer fit the cache. */
    for (;;) {
        ids = encode_prompt(c, user, &n);
        if (n + (size_t)max_tokens <= ctx || c->raw || c->n_msgs <= 1) break;
        free(ids);
        free(c->msgs[0]);
        free(c->msgs[1]);
        memmove(c->msgs, c->msgs + 2, (c->n_msgs - 2) * sizeof *c->msgs);
        c->n_msgs -= 2;
    }
    if (n >= ctx) {
        fprintf(stderr, "kmed-chat: the prompt has %zu tokens; the cache holds %zu (--ctx)\n",
                n, ctx);
        free(ids);
        free(c->msgs[--c->n_msgs]);
        return 0;
    }
    /* Reuse the cached prefix of the conversation. */
    while (common < c->st.pos && common < n && c->cache[common] == ids[common]) common++;
    if (common == n) common--; /* at least one new token yields the next logits */
    die_if(kmed_gemma_state_set_pos(&c->st, common, &err), &err, "rewinding the cache");
    gc.max_tokens = max_tokens;
    gc.safety_prompt = user;
    gc.user = c;
    c->streamed = 0;
    die_if(kmed_generate(&c->m, c->have_lora ? &c->lora : NULL, &c->tok, &c->st, c->pool,
                         ids + common, n - common, &gc, &res, &err),
           &err, "generating");
    print_tail(c, &res);
    if (c->stats)
        fprintf(stderr, "[%zu prompt tokens (%zu reused) in %.2fs, %zu tokens in %.2fs = "
                        "%.1f tok/s, safety %s]\n", n, common, res.prefill_s, res.n_ids,
                res.decode_s, res.decode_s > 0 ? (double)res.n_ids / res.decode_s : 0.0,
                kmed_safety_action_name((kmed_safety_action)res.safety_action));
    /* The cache now holds the prompt and every generated id but the last. */
    memcpy(c->cache, ids, n * sizeof *ids);
    for (i = 0; i + 1 < res.n_ids && n + i < ctx; i++) c->cache[n + i] = res.ids[i];
    if (!c->raw) {
        const char *said = res.safety_action == KMED_SAFETY_REFUSE ? res.text : res.raw;
        c->msgs[c->n_msgs] = dupstr(said);
        if (!c->msgs[c->n_msgs]) die("out of memory");
        c->n_msgs++;
    } else {
        free(c->msgs[--c->n_msgs]);
    }
    kmed_generate_result_free(&res);
    free(ids);
    return 1;
}

static void chat_reset(chat *c)
{
    size_t i;
    for (i = 0; i < c->n_msgs; i++) free(c->msgs[i]);
    c->n_msgs = 0;
    kmed_gemma_state_set_pos(&c->st, 0, NULL);
}

/* Reads one line from stdin into b (without the newline); 0 at EOF. */
static int read_line(kmed_buf *b)
{
    char chunk[4096];
    b->len = 0;
    if (b->data) b->data[0] = 0;
    while (fgets(chunk, sizeof chunk, stdin)) {
        size_t k = strlen(chunk);
        int nl = k && chunk[k - 1] == '\n';
        kmed_buf_put(b, chunk, k - (size_t)nl);
        if (nl) return 1;
    }
    if (!b->data) kmed_buf_put(b, "", 0);
    return b->len > 0;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *adapter = NULL, *tokp = NULL, *type = "stored";
    const char *prompt = NULL, *safety_cfg = NULL, *check = NULL;
    const char *stops[MAX_STOPS];
    double temperature = 0.7, top_p = 0.95, rep = 1.0;
    long top_k = 40, rep_n = 64, seed = 42, max_tokens = 512, ctx = 4096, threads = 0;
    int no_safety = 0, fast = 0, raw = 0, stats = 0, do_check = 0, i, n_stops = 0;
    kmed_error err = {0};
    kmed_gemma_opts lo;
    progress_state ps;
    static chat c;
    char tokdir[2048];

    kmed_tool_name = "kmed-chat";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--model")) model = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--adapter")) adapter = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--tokenizer")) tokp = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--prompt")) prompt = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--raw")) raw = 1;
        else if (!strcmp(a, "--temperature")) temperature = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--top-k")) top_k = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--top-p")) top_p = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--repeat-penalty")) rep = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--repeat-last-n")) rep_n = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--seed")) seed = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--max-tokens")) max_tokens = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--ctx")) ctx = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--threads")) threads = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--fast")) fast = 1;
        else if (!strcmp(a, "--no-safety")) no_safety = 1;
        else if (!strcmp(a, "--safety-config")) safety_cfg = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--stats")) stats = 1;
        else if (!strcmp(a, "--stop")) {
            if (n_stops == MAX_STOPS) usage_error(usage, "at most %d --stop strings", MAX_STOPS);
            stops[n_stops] = arg_str(argc, argv, &i, usage);
            if (!*stops[n_stops]) usage_error(usage, "--stop: empty string");
            n_stops++;
        } else if (!strcmp(a, "--safety-check")) {
            do_check = 1;
            check = "-";
            if (i + 1 < argc && (strncmp(argv[i + 1], "--", 2) != 0 || !argv[i + 1][2]))
                check = argv[++i];
        } else usage_error(usage, "unknown flag '%s'", a);
    }
    if (temperature < 0 || top_k < 0 || top_k > 0x7fffffff || top_p < 0 || rep <= 0 ||
        rep_n < -1 || rep_n > 0x7fffffff || seed < 0 || max_tokens <= 0 ||
        max_tokens > 0x7fffffff || ctx <= 0 || threads < 0 || threads > 1024)
        usage_error(usage, "sampling and size flags out of range");

    if (!no_safety || do_check) {
        die_if(kmed_safety_init(&c.safety, &err), &err, "safety filter");
        if (safety_cfg)
            die_if(kmed_safety_load(&c.safety, safety_cfg, &err), &err, "safety config");
    }
    if (do_check) {
        int r = safety_check(&c.safety, check);
        kmed_safety_free(&c.safety);
        return r;
    }
    if (!model) usage_error(usage, "--model is required");

    /* Tokenizer: the flag, else the model directory, else the GGUF file's directory. */
    if (tokp) {
        snprintf(tokdir, sizeof tokdir, "%s", tokp);
    } else if (kmed_is_dir(model)) {
        snprintf(tokdir, sizeof tokdir, "%s", model);
    } else {
        const char *s = strrchr(model, '/');
        if (s) snprintf(tokdir, sizeof tokdir, "%.*s", (int)(s - model), model);
        else snprintf(tokdir, sizeof tokdir, ".");
    }
    die_if(kmed_tok_load(&c.tok, tokdir, &err), &err, "loading tokenizer (see --tokenizer)");
    if (!raw && !kmed_chat_template_is_gemma(&c.tok))
        fprintf(stderr, "kmed-chat: warning: %s has a chat_template that is not Gemma-2's; "
                        "kmed renders Gemma's template\n", tokdir);

    memset(&lo, 0, sizeof lo);
    if (strcmp(type, "stored") != 0) {
        lo.convert = 1;
        lo.type = kmed_dtype_parse(type);
        if (lo.type != KMED_F32 && lo.type != KMED_BF16 && lo.type != KMED_Q8_0 &&
            lo.type != KMED_Q4_0)
            usage_error(usage, "--type '%s': expected f32, bf16, q8_0, q4_0 or stored", type);
    }
    memset(&ps, 0, sizeof ps);
    lo.cb.progress = progress_print;
    lo.cb.log = log_print;
    lo.cb.user = &ps;
    die_if(kmed_gemma_load(&c.m, model, &lo, &err), &err, "loading model");
    if (kmed_tok_vocab_size(&c.tok) > c.m.cfg.vocab_size)
        die("tokenizer has %d ids but the model only %d", kmed_tok_vocab_size(&c.tok),
            c.m.cfg.vocab_size);
    if (adapter) {
#ifndef KMED_NO_TRAIN
        die_if(kmed_lora_load(&c.lora, &c.m, adapter, &err), &err, "loading adapter");
        c.have_lora = 1;
#else
        die("--adapter: built without the train module (KMED_NO_TRAIN)");
#endif
    }
    if (ctx > c.m.cfg.max_position) ctx = c.m.cfg.max_position;
    die_if(kmed_pool_create(&c.pool, (int)threads, &err), &err, "creating thread pool");
    die_if(kmed_gemma_state_init(&c.st, &c.m, (size_t)ctx, &err), &err, "allocating cache");
    c.cache = (int *)calloc((size_t)ctx, sizeof *c.cache);
    if (!c.cache) die("out of memory");

    c.use_safety = !no_safety;
    c.raw = raw;
    c.stats = stats;
    c.gc.sample.temperature = (float)temperature;
    c.gc.sample.top_k = (int)top_k;
    c.gc.sample.top_p = (float)top_p;
    c.gc.sample.repeat_penalty = (float)rep;
    c.gc.sample.repeat_last_n = (int)rep_n;
    c.gc.sample.seed = (uint64_t)seed;
    c.gc.stop = stops;
    c.gc.n_stop = (size_t)n_stops;
    c.gc.safety = no_safety ? NULL : &c.safety;
    c.gc.fast = fast;
    c.gc.on_token = on_token;

    if (prompt || !isatty(0)) {
        kmed_buf in = {0};
        if (!prompt) {
            char chunk[65536];
            size_t k;
            while ((k = fread(chunk, 1, sizeof chunk, stdin)) > 0) kmed_buf_put(&in, chunk, k);
            if (!in.data) kmed_buf_put(&in, "", 0);
            if (in.failed) die("out of memory");
            prompt = in.data;
        }
        if (!chat_turn(&c, prompt, (int)max_tokens)) die("the prompt does not fit (--ctx)");
        kmed_buf_free(&in);
    } else {
        kmed_buf line = {0};
        fprintf(stderr, "kmed-chat: %s, safety filter %s. /reset clears, /quit ends.\n",
                model, no_safety ? "off" : "on");
        for (;;) {
            fputs("> ", stderr);
            fflush(stderr);
            if (!read_line(&line)) break;
            if (!strcmp(line.data, "/quit") || !strcmp(line.data, "/exit")) break;
            if (!strcmp(line.data, "/reset")) { chat_reset(&c); continue; }
            if (!line.data[strspn(line.data, " \t\r")]) continue;
            chat_turn(&c, line.data, (int)max_tokens);
            if (raw) kmed_gemma_state_set_pos(&c.st, 0, NULL);
        }
        kmed_buf_free(&line);
    }

    chat_reset(&c);
    free(c.msgs);
    free(c.cache);
    kmed_gemma_state_free(&c.st);
    kmed_pool_free(c.pool);
#ifndef KMED_NO_TRAIN
    if (c.have_lora) kmed_lora_free(&c.lora);
#endif
    if (!no_safety) kmed_safety_free(&c.safety);
    kmed_tok_free(&c.tok);
    kmed_gemma_free(&c.m);
    return 0;
}

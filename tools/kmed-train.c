/* kmed-train: continued pre-training or LoRA SFT of a Gemma-2 model, with checkpoints
   that resume bit-exactly, a progress line and a loss-curve SVG.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. tools/kmed-train.c \
      -o build/kmed-train -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"
#include <errno.h>

static const char *usage =
    "usage: kmed-train --model PATH --data FILE --out DIR [options]\n"
    "\n"
    "LoRA fine-tuning over a frozen base (F32/BF16/Q8_0/Q4_0), or full-parameter training\n"
    "(--full). Data: JSONL lines with \"text\" (plain text, loss on every token),\n"
    "\"messages\" ([{role, content}], Gemma chat template, loss on model turns only), or\n"
    "pre-tokenised \"input_ids\" (+ optional \"labels\", -100 = not trained, HF convention;\n"
    "+ optional \"position_ids\" restarting at 0 per packed document, as kmed-data packs:\n"
    "documents then do not attend to each other).\n"
    "Writes DIR/adapter_model.safetensors + adapter_config.json (LoRA, PEFT format) or\n"
    "DIR/config.json + model.safetensors (--full), DIR/checkpoint.safetensors, DIR/loss.svg.\n"
    "\n"
    "  --model PATH         HF model directory or .gguf file (required)\n"
    "  --tokenizer PATH     tokenizer.json / tokenizer.model / directory (default: --model\n"
    "                       when it is a directory; only needed for text/messages data)\n"
    "  --data FILE          training JSONL (required)\n"
    "  --val FILE           validation JSONL (default: none)\n"
    "  --eval-every N       validation loss every N steps, and at the end (default: 50)\n"
    "  --mode cpt|sft       cpt: pack all examples into --seq-len sequences; sft: one\n"
    "                       example per sequence, cut at --seq-len, padded (default: sft)\n"
    "  --out DIR            output directory (required)\n"
    "  --full               full-parameter training (f32 copy of every weight)\n"
    "  --lora-r N           LoRA rank (default: 8)\n"
    "  --lora-alpha X       LoRA alpha, scale = alpha / r (default: 16)\n"
    "  --targets LIST       q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj, attn,\n"
    "                       mlp or all (default: all)\n"
    "  --init-adapter DIR   start from an existing PEFT adapter (default: fresh init)\n"
    "  --train-tokens T     also train whole embedding rows (PEFT trainable_token_indices,\n"
    "                       tied to the LM head): 'data' for every token the --data and\n"
    "                       --val hold, or a comma list of ids (default: none)\n"
    "  --base-type T        f32, bf16, q8_0, q4_0 or stored: dtype of the frozen base\n"
    "                       (default: stored)\n"
    "  --optim adamw|sgd    optimiser (default: adamw)\n"
    "  --lr X               peak learning rate (default: 1e-4)\n"
    "  --weight-decay X     decoupled weight decay (default: 0)\n"
    "  --beta1 X            (default: 0.9)\n"
    "  --beta2 X            (default: 0.999)\n"
    "  --eps X              (default: 1e-8)\n"
    "  --schedule S         constant or cosine (default: cosine)\n"
    "  --warmup N           linear warmup steps (default: 0)\n"
    "  --min-lr-ratio X     cosine floor as a fraction of --lr (default: 0)\n"
    "  --clip X             global gradient-norm clip, 0 = off (default: 1.0)\n"
    "  --steps N            optimiser steps (default: 100)\n"
    "  --batch N            sequences per micro-batch (default: 1)\n"
    "  --accum N            micro-batches per step; the loss is the mean over every counted\n"
    "                       token of the step (default: 1)\n"
    "  --seq-len N          tokens per sequence (default: 256)\n"
    "  --seed N             data order and adapter init (default: 42)\n"
    "  --checkpointing      recompute activations per layer in the backward pass\n"
    "  --ckpt-every N       write DIR/checkpoint.safetensors every N steps, 0 = only at the\n"
    "                       end (default: 50)\n"
    "  --resume             continue from DIR/checkpoint.safetensors (same flags)\n"
    "  --save-grads FILE    gradients of the first step as safetensors (default: none)\n"
    "  --spike X            stop when a loss exceeds X times its running mean, 0 = off\n"
    "                       (default: 0)\n"
    "  --threads N          worker threads, 0 = all CPUs (default: 0)\n"
    "  --help               this text\n";

/* One training sequence; pos: packed position ids (NULL: 0..n-1, one document). */
typedef struct seq { int *ids, *labels, *pos; size_t n; } seq;
typedef struct seqs { seq *v; size_t n, cap; } seqs;

/* Appends a sequence of n tokens copied from ids, labels and pos (pos may be NULL). */
static void seqs_push(seqs *s, const int *ids, const int *labels, const int *pos, size_t n)
{
    int *a = (int *)malloc(n * sizeof(int)), *b = (int *)malloc(n * sizeof(int));
    int *c = pos ? (int *)malloc(n * sizeof(int)) : NULL;
    if (!a || !b || (pos && !c)) die("out of memory");
    memcpy(a, ids, n * sizeof(int));
    memcpy(b, labels, n * sizeof(int));
    if (pos) memcpy(c, pos, n * sizeof(int));
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 256;
        seq *v = (seq *)realloc(s->v, cap * sizeof *v);
        if (!v) die("out of memory");
        s->v = v;
        s->cap = cap;
    }
    s->v[s->n].ids = a;
    s->v[s->n].labels = b;
    s->v[s->n].pos = c;
    s->v[s->n].n = n;
    s->n++;
}

static void seqs_free(seqs *s)
{
    size_t i;
    for (i = 0; i < s->n; i++) { free(s->v[i].ids); free(s->v[i].labels); free(s->v[i].pos); }
    free(s->v);
    memset(s, 0, sizeof *s);
}

/* Growable int array. */
typedef struct ivec { int *v; size_t n, cap; } ivec;
static void ivec_push(ivec *a, int x)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 1024;
        int *v = (int *)realloc(a->v, cap * sizeof *v);
        if (!v) die("out of memory");
        a->v = v;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

static const kmed_tok *need_tok(const kmed_tok *tok, const char *file, size_t line)
{
    if (!tok) die("%s:%zu: text data needs a tokenizer: give --tokenizer", file, line);
    return tok;
}

/* Ids of a piece of a rendered chat (chat: kmed_chat_encode, so its <bos> and turn markers
   are their ids with a tokenizer.model too), else of plain text with <bos> added. */
static kmed_result encode_text(const kmed_tok *tok, const char *text, size_t len, int chat,
                               int *ids, size_t cap, size_t *n, kmed_error *err)
{
    if (chat) return kmed_chat_encode(tok, text, len, ids, cap, n, err);
    return kmed_tok_encode(tok, NULL, text, len, ids, cap, n, err);
}

static void encode_append(const kmed_tok *tok, const char *text, size_t len, int chat,
                          ivec *ids, ivec *labels, int train, const char *file, size_t line)
{
    kmed_error err = {0};
    size_t n = 0, i;
    int *buf;
    kmed_result r = encode_text(tok, text, len, chat, NULL, 0, &n, &err);
    if (r != KMED_OK && r != KMED_ERR_SPACE) die("%s:%zu: tokenizing: %s", file, line, err.msg);
    buf = (int *)malloc((n ? n : 1) * sizeof(int));
    if (!buf) die("out of memory");
    if (n) die_if(encode_text(tok, text, len, chat, buf, n, &n, &err), &err, "tokenizing");
    for (i = 0; i < n; i++) {
        ivec_push(ids, buf[i]);
        ivec_push(labels, train ? buf[i] : KMED_LABEL_IGNORE);
    }
    free(buf);
}

/* Chat example: the template rendered turn by turn; tokens of model turns (content and
   <end_of_turn>) are trained, everything else is context. */
static void chat_example(const kmed_tok *tok, const kmed_json *msgs, ivec *ids, ivec *labels,
                         const char *file, size_t line)
{
    kmed_chat_msg *m;
    kmed_buf prev = {0}, cur = {0};
    kmed_error err = {0};
    size_t n = msgs->len, i;
    if (msgs->type != KMED_JSON_ARRAY || n == 0)
        die("%s:%zu: \"messages\" must be a non-empty array", file, line);
    m = (kmed_chat_msg *)calloc(n, sizeof *m);
    if (!m) die("out of memory");
    for (i = 0; i < n; i++) {
        const kmed_json *o = kmed_json_at(msgs, i);
        m[i].role = kmed_json_str(kmed_json_get(o, "role"), NULL);
        m[i].content = kmed_json_str(kmed_json_get(o, "content"), NULL);
        if (!m[i].role || !m[i].content)
            die("%s:%zu: message %zu needs string \"role\" and \"content\"", file, line, i);
        if (strlen(m[i].content) != kmed_json_get(o, "content")->len)
            die("%s:%zu: message %zu: \"content\" holds U+0000, which the chat template cannot "
                "carry", file, line, i);
        if (!strcmp(m[i].role, "model")) m[i].role = "assistant";
    }
    /* Each prefix render extends the previous one, so the new text of turn i is the
       difference; model turns are split into the context "<start_of_turn>model\n" and
       the trained rest. */
    for (i = 0; i < n; i++) {
        int model = !strcmp(m[i].role, "assistant");
        cur.len = 0;
        if (cur.data) cur.data[0] = 0;
        if (model) {
            if (kmed_chat_render(tok, m, i, 1, &cur, &err) != KMED_OK)
                die("%s:%zu: chat template: %s", file, line, err.msg);
            encode_append(tok, cur.data + prev.len, cur.len - prev.len, 1, ids, labels, 0,
                          file, line);
            kmed_buf_free(&prev);
            prev = cur;
            memset(&cur, 0, sizeof cur);
        }
        if (kmed_chat_render(tok, m, i + 1, 0, &cur, &err) != KMED_OK)
            die("%s:%zu: chat template: %s", file, line, err.msg);
        if (cur.len < prev.len || (prev.len && memcmp(cur.data, prev.data, prev.len) != 0))
            die("%s:%zu: chat template prefixes do not nest", file, line);
        encode_append(tok, cur.data + prev.len, cur.len - prev.len, 1, ids, labels, model, file,
                      line);
        kmed_buf_free(&prev);
        prev = cur;
        memset(&cur, 0, sizeof cur);
    }
    kmed_buf_free(&prev);
    kmed_buf_free(&cur);
    free(m);
}

static int json_ints(const kmed_json *a, ivec *out)
{
    size_t i;
    if (!a || a->type != KMED_JSON_ARRAY) return 0;
    for (i = 0; i < a->len; i++) {
        int64_t v;
        if (!kmed_json_int(kmed_json_at(a, i), &v) || v < -100 || v > 0x7fffffff) return 0;
        ivec_push(out, (int)v);
    }
    return 1;
}

/* Reads a JSONL file into sequences: sft = one per example (cut at seq_len),
   cpt = every example concatenated and cut into seq_len pieces. Examples without a
   counted target are dropped (and counted). Pre-tokenised examples may carry packed
   "position_ids" (each document restarting at 0, as kmed-data writes them): documents
   then do not attend to each other. */
static void load_data(const char *path, const kmed_tok *tok, int cpt, size_t seq_len, int V,
                      seqs *out, size_t *n_examples, size_t *n_dropped)
{
    kmed_jsonl r;
    kmed_error err = {0};
    const kmed_json *o;
    ivec all_ids = {0}, all_lab = {0}, all_pos = {0};
    int eof = 0, any_pos = 0;
    size_t i;
    *n_examples = *n_dropped = 0;
    die_if(kmed_jsonl_open(&r, path, &err), &err, "opening data");
    for (;;) {
        ivec ids = {0}, labels = {0}, pos = {0};
        const kmed_json *j;
        size_t line;
        die_if(kmed_jsonl_next(&r, &o, &eof, &err), &err, "reading data");
        if (eof) break;
        line = r.lines.line;
        if (!o || o->type != KMED_JSON_OBJECT) die("%s:%zu: expected a JSON object", path, line);
        if ((j = kmed_json_get(o, "input_ids")) != NULL) {
            if (!json_ints(j, &ids)) die("%s:%zu: \"input_ids\": expected integers", path, line);
            j = kmed_json_get(o, "labels");
            if (j) {
                if (!json_ints(j, &labels) || labels.n != ids.n)
                    die("%s:%zu: \"labels\": expected %zu integers", path, line, ids.n);
            } else {
                for (i = 0; i < ids.n; i++) ivec_push(&labels, ids.v[i]);
            }
            if ((j = kmed_json_get(o, "position_ids")) != NULL) {
                if (!json_ints(j, &pos) || pos.n != ids.n)
                    die("%s:%zu: \"position_ids\": expected %zu integers", path, line, ids.n);
                for (i = 0; i < pos.n; i++)
                    if (pos.v[i] < 0)
                        die("%s:%zu: \"position_ids\": %d is negative", path, line, pos.v[i]);
                any_pos = 1;
            }
        } else if ((j = kmed_json_get(o, "messages")) != NULL) {
            chat_example(need_tok(tok, path, line), j, &ids, &labels, path, line);
        } else if ((j = kmed_json_get(o, "text")) != NULL && j->type == KMED_JSON_STRING) {
            /* <bos> text <eos>: documents stay apart when packed */
            encode_append(need_tok(tok, path, line), j->str, j->len, 0, &ids, &labels, 1, path,
                          line);
            ivec_push(&ids, tok->eos_id >= 0 ? tok->eos_id : 1);
            ivec_push(&labels, tok->eos_id >= 0 ? tok->eos_id : 1);
        } else {
            die("%s:%zu: expected \"input_ids\", \"messages\" or \"text\"", path, line);
        }
        for (i = 0; i < ids.n; i++) {
            if (ids.v[i] < 0 || ids.v[i] >= V)
                die("%s:%zu: token id %d outside the model's vocabulary [0, %d)", path, line,
                    ids.v[i], V);
            if (labels.v[i] != KMED_LABEL_IGNORE && (labels.v[i] < 0 || labels.v[i] >= V))
                die("%s:%zu: label %d is neither -100 nor a token id", path, line,
                    labels.v[i]);
        }
        (*n_examples)++;
        if (cpt) {
            /* an example without positions continues the previous document */
            for (i = 0; i < ids.n; i++) {
                ivec_push(&all_ids, ids.v[i]);
                ivec_push(&all_lab, labels.v[i]);
                ivec_push(&all_pos, pos.n ? pos.v[i] : all_pos.n ? all_pos.v[all_pos.n - 1] + 1 : 0);
            }
        } else if (ids.n >= 2) {
            size_t n = ids.n < seq_len ? ids.n : seq_len;
            if (kmed_train_count(labels.v, 1, n) == 0) (*n_dropped)++;
            else seqs_push(out, ids.v, labels.v, pos.n ? pos.v : NULL, n);
        } else {
            (*n_dropped)++;
        }
        free(ids.v);
        free(labels.v);
        free(pos.v);
    }
    kmed_jsonl_close(&r);
    if (cpt) {
        for (i = 0; i + seq_len <= all_ids.n; i += seq_len)
            if (kmed_train_count(all_lab.v + i, 1, seq_len))
                seqs_push(out, all_ids.v + i, all_lab.v + i, any_pos ? all_pos.v + i : NULL,
                          seq_len);
        if (out->n == 0 && all_ids.n >= 2) /* less than one full sequence: keep it */
            seqs_push(out, all_ids.v, all_lab.v, any_pos ? all_pos.v : NULL, all_ids.n);
        free(all_ids.v);
        free(all_lab.v);
        free(all_pos.v);
    }
}

/* --train-tokens: "data" (every id marked in used) or a comma list of ids in [0, V). */
static int token_list(const char *spec, const unsigned char *used, int V, int **out)
{
    int n = 0, v;
    int *ids = (int *)malloc(((size_t)V + 1) * sizeof *ids);
    if (!ids) die("out of memory");
    if (!strcmp(spec, "data")) {
        for (v = 0; v < V; v++)
            if (used[v]) ids[n++] = v;
    } else {
        const char *p = spec;
        while (*p) {
            char *end;
            long id;
            errno = 0;
            id = strtol(p, &end, 10);
            if (end == p || errno || id < 0 || id >= V || (*end && *end != ',') || n >= V)
                usage_error(usage, "--train-tokens '%s': expected 'data' or comma-separated "
                            "token ids in [0, %d)", spec, V);
            ids[n++] = (int)id;
            p = *end ? end + 1 : end;
        }
    }
    if (n == 0) usage_error(usage, "--train-tokens '%s': no token", spec);
    *out = ids;
    return n;
}

/* Marks every token id of the sequences (inputs and labels). */
static void mark_used(const seqs *s, unsigned char *used)
{
    size_t i, t;
    for (i = 0; i < s->n; i++)
        for (t = 0; t < s->v[i].n; t++) {
            used[s->v[i].ids[t]] = 1;
            if (s->v[i].labels[t] >= 0) used[s->v[i].labels[t]] = 1;
        }
}

/* Sequence number `pos` of the data stream: epoch e = pos / n visits every sequence
   once in an order fixed by (seed, e), so a run resumes from pos alone. */
static size_t data_index(const seqs *s, uint64_t seed, uint64_t pos, size_t *perm,
                         uint64_t *perm_epoch)
{
    uint64_t epoch = pos / s->n;
    if (*perm_epoch != epoch) {
        kmed_rng rng;
        size_t i;
        kmed_rng_seed(&rng, seed ^ (0x9E3779B97F4A7C15ull * (epoch + 1)));
        for (i = 0; i < s->n; i++) perm[i] = i;
        for (i = s->n; i > 1; i--) {
            size_t j = (size_t)kmed_rng_below(&rng, i), t = perm[i - 1];
            perm[i - 1] = perm[j];
            perm[j] = t;
        }
        *perm_epoch = epoch;
    }
    return perm[pos % s->n];
}

/* Fills (count, B, T) with sequences idx[0..count), padded to T with pad / -100, and their
   positions (padding continues the last document; it is never trained). */
static void fill_batch(const seqs *s, const size_t *idx, size_t count, size_t T, int pad,
                       int *ids, int *labels, int *pos)
{
    size_t k, t;
    for (k = 0; k < count; k++) {
        const seq *q = &s->v[idx[k]];
        for (t = 0; t < T; t++) {
            ids[k * T + t] = t < q->n ? q->ids[t] : pad;
            labels[k * T + t] = t < q->n ? q->labels[t] : KMED_LABEL_IGNORE;
            pos[k * T + t] = !q->pos ? (int)t : t < q->n ? q->pos[t]
                                                          : q->pos[q->n - 1] + (int)(t - q->n) + 1;
        }
    }
}

static double eval_loss(kmed_train *tr, const seqs *val, size_t B, size_t T, int pad,
                        int *ids, int *labels, int *pos)
{
    kmed_error err = {0};
    double sum = 0;
    size_t count = 0, i, k, idx[256];
    for (i = 0; i < val->n; i += B) {
        size_t nb = val->n - i < B ? val->n - i : B, Tb = 0;
        for (k = 0; k < nb; k++) {
            idx[k] = i + k;
            if (val->v[i + k].n > Tb) Tb = val->v[i + k].n;
        }
        if (Tb > T) Tb = T;
        fill_batch(val, idx, nb, Tb, pad, ids, labels, pos);
        kmed_train_set_positions(tr, pos);
        die_if(kmed_train_forward_backward(tr, ids, labels, nb, Tb, 0.0, &sum, &count, &err),
               &err, "validation forward");
    }
    return count ? sum / (double)count : 0.0;
}

static void fmt_time(char *out, size_t cap, double s)
{
    if (s < 0 || s != s) s = 0;
    if (s >= 3600) snprintf(out, cap, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
    else snprintf(out, cap, "%dm%02ds", (int)(s / 60), (int)s % 60);
}

int main(int argc, char **argv)
{
    const char *model_path = NULL, *tok_path = NULL, *data_path = NULL, *val_path = NULL;
    const char *out_dir = NULL, *targets_s = "all", *init_adapter = NULL,
               *train_tokens = NULL, *base_type = "stored";
    const char *optim_s = "adamw", *schedule_s = "cosine", *mode_s = "sft", *save_grads = NULL;
    long eval_every = 50, lora_r = 8, warmup = 0, steps = 100, batch = 1, accum = 1;
    long seq_len = 256, ckpt_every = 50, threads = 0;
    double lora_alpha = 16, lr = 1e-4, wd = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
    double clip = 1.0, spike = 0, min_lr_ratio = 0;
    unsigned long long seed = 42;
    int full = 0, resume = 0, checkpointing = 0, have_tok = 0, i, cpt;
    kmed_error err = {0};
    kmed_gemma m;
    kmed_gemma_opts opts;
    kmed_tok tok;
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_pool *pool = NULL;
    kmed_train_ckpt ck;
    seqs train = {0}, val = {0};
    size_t n_ex, n_drop, *perm, step_seqs, *idx, tcap, T;
    uint64_t perm_epoch = (uint64_t)-1;
    int *ids, *labels, *pos, *tokens = NULL;
    unsigned char *used;
    char ckpt_path[1100], svg_path[1100];
    float *hist_train, *hist_val;
    size_t n_train_hist = 0, n_val_hist = 0;
    double t0, tokens_done = 0;
    long step;
    progress_state ps;
    unsigned targets = 0;

    kmed_tool_name = "kmed-train";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--model")) model_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--tokenizer")) tok_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--data")) data_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--val")) val_path = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--eval-every")) eval_every = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--mode")) mode_s = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--out")) out_dir = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--full")) full = 1;
        else if (!strcmp(a, "--lora-r")) lora_r = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--lora-alpha")) lora_alpha = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--targets")) targets_s = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--init-adapter")) init_adapter = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--train-tokens")) train_tokens = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--base-type")) base_type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--optim")) optim_s = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--lr")) lr = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--weight-decay")) wd = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--beta1")) beta1 = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--beta2")) beta2 = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--eps")) eps = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--schedule")) schedule_s = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--warmup")) warmup = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--min-lr-ratio")) min_lr_ratio = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--clip")) clip = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--steps")) steps = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--batch")) batch = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--accum")) accum = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--seq-len")) seq_len = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--seed")) seed = (unsigned long long)arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--checkpointing")) checkpointing = 1;
        else if (!strcmp(a, "--ckpt-every")) ckpt_every = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--resume")) resume = 1;
        else if (!strcmp(a, "--save-grads")) save_grads = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--spike")) spike = arg_double(argc, argv, &i, usage);
        else if (!strcmp(a, "--threads")) threads = arg_long(argc, argv, &i, usage);
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (!model_path || !data_path || !out_dir)
        usage_error(usage, "--model, --data and --out are required");
    if (strcmp(mode_s, "cpt") && strcmp(mode_s, "sft"))
        usage_error(usage, "--mode '%s': expected cpt or sft", mode_s);
    cpt = !strcmp(mode_s, "cpt");
    if (strcmp(optim_s, "adamw") && strcmp(optim_s, "sgd"))
        usage_error(usage, "--optim '%s': expected adamw or sgd", optim_s);
    if (strcmp(schedule_s, "constant") && strcmp(schedule_s, "cosine"))
        usage_error(usage, "--schedule '%s': expected constant or cosine", schedule_s);
    if (lora_r < 1 || lora_r > 65536) usage_error(usage, "--lora-r %ld out of range", lora_r);
    if (!(lr > 0) || wd < 0 || !(beta1 >= 0 && beta1 < 1) || !(beta2 >= 0 && beta2 < 1) ||
        !(eps > 0) || clip < 0 || spike < 0 || min_lr_ratio < 0 || min_lr_ratio > 1)
        usage_error(usage, "optimiser values out of range (--lr > 0, --weight-decay >= 0, "
                    "0 <= --beta1/2 < 1, --eps > 0, --clip >= 0)");
    if (steps < 1 || batch < 1 || batch > 256 || accum < 1 || seq_len < 2 || warmup < 0 ||
        eval_every < 0 || ckpt_every < 0 || threads < 0 || threads > 1024)
        usage_error(usage, "--steps, --batch (<= 256), --accum >= 1, --seq-len >= 2; "
                    "--warmup, --eval-every, --ckpt-every, --threads >= 0");
    if (full && init_adapter) usage_error(usage, "--full and --init-adapter exclude each other");
    if (train_tokens && (full || init_adapter))
        usage_error(usage, "--train-tokens is for a fresh adapter (not with --full or "
                    "--init-adapter, whose adapter_config.json lists its tokens)");
    if (kmed_lora_targets_parse(targets_s, &targets, &err) != KMED_OK)
        usage_error(usage, "--targets: %s", err.msg);

    memset(&ps, 0, sizeof ps);
    memset(&opts, 0, sizeof opts);
    opts.cb.progress = progress_print;
    opts.cb.log = log_print;
    opts.cb.user = &ps;
    if (strcmp(base_type, "stored") != 0) {
        opts.convert = 1;
        opts.type = kmed_dtype_parse(base_type);
        if (opts.type != KMED_F32 && opts.type != KMED_BF16 && opts.type != KMED_Q8_0 &&
            opts.type != KMED_Q4_0)
            usage_error(usage, "--base-type '%s': expected f32, bf16, q8_0, q4_0 or stored",
                        base_type);
    }
    die_if(kmed_mkdir_p(out_dir, &err), &err, "creating output directory");
    die_if(kmed_path_join(ckpt_path, sizeof ckpt_path, out_dir, "checkpoint.safetensors", &err),
           &err, "output path");
    die_if(kmed_path_join(svg_path, sizeof svg_path, out_dir, "loss.svg", &err), &err,
           "output path");
    die_if(kmed_gemma_load(&m, model_path, &opts, &err), &err, "loading model");
    if (tok_path || kmed_is_dir(model_path)) {
        kmed_result r = kmed_tok_load(&tok, tok_path ? tok_path : model_path, &err);
        if (r == KMED_OK) have_tok = 1;
        else if (tok_path) die_if(r, &err, "loading tokenizer");
    }
    load_data(data_path, have_tok ? &tok : NULL, cpt, (size_t)seq_len, m.cfg.vocab_size, &train,
              &n_ex, &n_drop);
    if (train.n == 0) die("%s: no trainable sequence (%zu examples, %zu without a counted "
                          "target)", data_path, n_ex, n_drop);
    fprintf(stderr, "kmed-train: %s: %zu examples -> %zu sequences (%zu dropped: no trained "
            "token)\n", data_path, n_ex, train.n, n_drop);
    if (val_path) {
        load_data(val_path, have_tok ? &tok : NULL, cpt, (size_t)seq_len, m.cfg.vocab_size,
                  &val, &n_ex, &n_drop);
        fprintf(stderr, "kmed-train: %s: %zu validation sequences\n", val_path, val.n);
    }

    /* tokens the data holds: the rows of the others, when equal, train as one */
    used = (unsigned char *)calloc((size_t)m.cfg.vocab_size, 1);
    if (!used) die("out of memory");
    mark_used(&train, used);
    mark_used(&val, used);
    if (!full) {
        if (init_adapter) {
            die_if(kmed_lora_load(&lora, &m, init_adapter, &err), &err, "loading adapter");
        } else {
            memset(&lc, 0, sizeof lc);
            lc.r = (int)lora_r;
            lc.alpha = (float)lora_alpha;
            lc.targets = targets;
            lc.seed = seed;
            if (train_tokens) lc.n_tokens = token_list(train_tokens, used, m.cfg.vocab_size,
                                                       &tokens);
            lc.tokens = tokens;
            die_if(kmed_lora_create(&lora, &m, &lc, &err), &err, "creating adapter");
            free(tokens);
            if (lora.n_tokens)
                fprintf(stderr, "kmed-train: %d trainable tokens (embedding rows, tied to the "
                        "LM head)\n", lora.n_tokens);
        }
        for (i = 0; i < lora.n_tokens; i++) used[lora.token_ids[i]] = 1;
    }
    used[m.cfg.pad_id] = 1;   /* padding */
    memset(&tc, 0, sizeof tc);
    tc.full = full;
    tc.max_batch = (int)batch;
    tc.max_seq = (int)seq_len;
    tc.checkpointing = checkpointing;
    tc.spike_factor = (float)spike;
    tc.optim.kind = strcmp(optim_s, "sgd") ? KMED_OPTIM_ADAMW : KMED_OPTIM_SGD;
    tc.optim.lr = (float)lr;
    tc.optim.beta1 = (float)beta1;
    tc.optim.beta2 = (float)beta2;
    tc.optim.eps = (float)eps;
    tc.optim.weight_decay = (float)wd;
    tc.optim.clip = (float)clip;
    tc.optim.schedule = strcmp(schedule_s, "cosine") ? KMED_SCHED_CONSTANT : KMED_SCHED_COSINE;
    tc.optim.warmup = warmup;
    tc.optim.total_steps = steps;
    tc.optim.min_lr_ratio = (float)min_lr_ratio;
    tc.used_tokens = used;
    die_if(kmed_pool_create(&pool, (int)threads, &err), &err, "creating thread pool");
    die_if(kmed_train_create(&tr, &m, full ? NULL : &lora, &tc, pool, &err), &err,
           "creating trainer");
    if (kmed_train_model(tr)->cfg.vocab_size < m.cfg.vocab_size)
        fprintf(stderr, "kmed-train: %d of %d embedding rows are equal and unused by the data: "
                "trained as one (LM head over %d rows)\n",
                m.cfg.vocab_size - kmed_train_model(tr)->cfg.vocab_size + 1, m.cfg.vocab_size,
                kmed_train_model(tr)->cfg.vocab_size);

    hist_train = (float *)calloc((size_t)steps + 1, sizeof(float));
    hist_val = (float *)calloc(2 * ((size_t)steps + 2), sizeof(float));
    memset(&ck, 0, sizeof ck);
    kmed_rng_seed(&ck.rng, seed);
    if (resume) {
        kmed_train_ckpt got;
        FILE *f = fopen(ckpt_path, "rb");
        if (!f) {
            fprintf(stderr, "kmed-train: --resume: no %s yet, starting from step 0\n",
                    ckpt_path);
        } else {
            fclose(f);
            die_if(kmed_train_ckpt_load(tr, ckpt_path, &got, &err), &err, "loading checkpoint");
            ck.data_pos = got.data_pos;
            ck.rng = got.rng;
            n_train_hist = got.n_train < (size_t)steps ? got.n_train : (size_t)steps;
            if (got.train_loss) memcpy(hist_train, got.train_loss, n_train_hist * sizeof(float));
            n_val_hist = got.n_val < (size_t)steps + 1 ? got.n_val : (size_t)steps + 1;
            if (got.val_loss) memcpy(hist_val, got.val_loss, 2 * n_val_hist * sizeof(float));
            kmed_train_ckpt_free(&got);
            fprintf(stderr, "kmed-train: resumed %s at step %ld (data position %llu)\n",
                    ckpt_path, kmed_train_step_count(tr), (unsigned long long)ck.data_pos);
        }
    }

    step_seqs = (size_t)batch * (size_t)accum;
    tcap = step_seqs > (size_t)batch ? step_seqs : (size_t)batch;
    idx = (size_t *)malloc(tcap * sizeof(size_t));
    perm = (size_t *)malloc(train.n * sizeof(size_t));
    ids = (int *)malloc(tcap * (size_t)seq_len * sizeof(int));
    labels = (int *)malloc(tcap * (size_t)seq_len * sizeof(int));
    pos = (int *)malloc(tcap * (size_t)seq_len * sizeof(int));
    if (!hist_train || !hist_val || !idx || !perm || !ids || !labels || !pos)
        die("out of memory");

    t0 = kmed_time_now();
    for (step = kmed_train_step_count(tr); step < steps; step++) {
        double loss, el, rate;
        size_t k, n_tok = 0;
        char eta[32];
        kmed_result r;
        T = 0;
        for (k = 0; k < step_seqs; k++) {
            idx[k] = data_index(&train, seed, ck.data_pos + k, perm, &perm_epoch);
            if (train.v[idx[k]].n > T) T = train.v[idx[k]].n;
        }
        fill_batch(&train, idx, step_seqs, T, m.cfg.pad_id, ids, labels, pos);
        kmed_train_set_positions(tr, pos);
        for (k = 0; k < step_seqs; k++) n_tok += train.v[idx[k]].n;
        r = kmed_train_grads(tr, ids, labels, (size_t)accum, (size_t)batch, T, &loss, &err);
        if (r != KMED_OK) {
            /* numeric trouble: the last good checkpoint stays as it was */
            die("step %ld: %s", step + 1, err.msg);
        }
        if (save_grads && step == 0)
            die_if(kmed_train_save_grads(tr, save_grads, &err), &err, "saving gradients");
        kmed_train_update(tr);
        ck.data_pos += step_seqs;
        hist_train[step] = (float)loss;
        n_train_hist = (size_t)step + 1;
        tokens_done += (double)n_tok;
        el = kmed_time_now() - t0;
        rate = el > 0 ? tokens_done / el : 0;
        fmt_time(eta, sizeof eta, rate > 0 ? (double)(steps - step - 1) * (double)n_tok / rate
                                           : 0);
        fprintf(stderr, "step %ld/%ld  loss %.4f  lr %.3g  %.0f tok/s  ETA %s\n", step + 1,
                steps, loss, (double)kmed_optim_lr(&tc.optim, step + 1), rate, eta);
        if (val.n && ((eval_every && (step + 1) % eval_every == 0) || step + 1 == steps)) {
            double vl = eval_loss(tr, &val, (size_t)batch, (size_t)seq_len, m.cfg.pad_id, ids,
                                  labels, pos);
            hist_val[2 * n_val_hist] = (float)(step + 1);
            hist_val[2 * n_val_hist + 1] = (float)vl;
            n_val_hist++;
            fprintf(stderr, "step %ld/%ld  val loss %.4f\n", step + 1, steps, vl);
        }
        if ((ckpt_every && (step + 1) % ckpt_every == 0) || step + 1 == steps) {
            ck.train_loss = hist_train;
            ck.n_train = n_train_hist;
            ck.val_loss = hist_val;
            ck.n_val = n_val_hist;
            die_if(kmed_train_ckpt_save(tr, ckpt_path, &ck, &err), &err, "writing checkpoint");
            die_if(kmed_train_svg(svg_path, hist_train, n_train_hist, hist_val, n_val_hist,
                                  &err), &err, "writing loss curve");
        }
    }
    if (full) die_if(kmed_train_save_model(tr, out_dir, &err), &err, "saving model");
    else die_if(kmed_lora_save(&lora, out_dir, model_path, &err), &err, "saving adapter");
    die_if(kmed_train_svg(svg_path, hist_train, n_train_hist, hist_val, n_val_hist, &err), &err,
           "writing loss curve");
    fprintf(stderr, "kmed-train: %ld steps; %s written to %s\n", steps,
            full ? "model" : "adapter", out_dir);

    kmed_train_free(tr);
    if (!full) kmed_lora_free(&lora);
    kmed_pool_free(pool);
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&m);
    seqs_free(&train);
    seqs_free(&val);
    free(hist_train);
    free(hist_val);
    free(idx);
    free(perm);
    free(ids);
    free(labels);
    free(pos);
    free(used);
    return 0;
}

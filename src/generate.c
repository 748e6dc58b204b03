/* ==== kmed_generate: sampling and generation ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- sampling ---- */

typedef struct kmed__sample_cand { float v; int id; } kmed__sample_cand;

KMED_API size_t kmed_argmax(const float *x, size_t n)
{
    size_t i, best = 0;
    for (i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

KMED_API kmed_result kmed_sampler_init(kmed_sampler *s, const kmed_sample_config *cfg,
                                       size_t V, kmed_error *err)
{
    memset(s, 0, sizeof *s);
    if (cfg) s->cfg = *cfg;
    if (V == 0 || V > (size_t)0x7FFFFFFF)
        return KMED__ERR(err, KMED_ERR_ARG, "sampler: vocabulary size %zu out of range", V);
    if (s->cfg.top_k < 0 || s->cfg.top_p < 0 || s->cfg.repeat_penalty < 0 ||
        s->cfg.temperature != s->cfg.temperature)
        return KMED__ERR(err, KMED_ERR_ARG, "sampler: negative top_k, top_p or repeat_penalty");
    s->V = V;
    kmed_rng_seed(&s->rng, s->cfg.seed);
    s->work_ = (float *)kmed__calloc(V, sizeof(float));
    s->cand_ = kmed__calloc(V, sizeof(kmed__sample_cand));
    if (!s->work_ || !s->cand_) {
        kmed_sampler_free(s);
        return KMED__ERR(err, KMED_ERR_NOMEM, "sampler: out of memory for V = %zu", V);
    }
    return KMED_OK;
}

KMED_API void kmed_sampler_free(kmed_sampler *s)
{
    if (!s) return;
    KMED_FREE(s->work_);
    KMED_FREE(s->cand_);
    s->work_ = NULL;
    s->cand_ = NULL;
}

/* Descending by value, ascending id on ties, so the order never depends on qsort. */
static int kmed__sample_cmp(const void *a, const void *b)
{
    const kmed__sample_cand *x = (const kmed__sample_cand *)a;
    const kmed__sample_cand *y = (const kmed__sample_cand *)b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* 1 if a ranks below b (smaller value, or equal value and larger id). */
static int kmed__sample_worse(const kmed__sample_cand *a, const kmed__sample_cand *b)
{
    return a->v < b->v || (a->v == b->v && a->id > b->id);
}

static void kmed__sample_sift(kmed__sample_cand *h, size_t n, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        kmed__sample_cand t;
        if (l < n && kmed__sample_worse(&h[l], &h[m])) m = l;
        if (r < n && kmed__sample_worse(&h[r], &h[m])) m = r;
        if (m == i) return;
        t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

/* The k best of w[0..V) into c[0..k), sorted best first: a min-heap of the best so far. */
static void kmed__sample_top_k(kmed__sample_cand *c, const float *w, size_t V, size_t k)
{
    size_t i;
    for (i = 0; i < k; i++) { c[i].v = w[i]; c[i].id = (int)i; }
    for (i = k / 2; i-- > 0;) kmed__sample_sift(c, k, i);
    for (i = k; i < V; i++) {
        kmed__sample_cand x;
        x.v = w[i];
        x.id = (int)i;
        if (kmed__sample_worse(&c[0], &x)) { c[0] = x; kmed__sample_sift(c, k, 0); }
    }
    qsort(c, k, sizeof *c, kmed__sample_cmp);
}

KMED_API int kmed_sampler_sample(kmed_sampler *s, const float *logits, const int *recent,
                                 size_t n_recent)
{
    const kmed_sample_config *cfg = &s->cfg;
    kmed__sample_cand *c = (kmed__sample_cand *)s->cand_; /* (V) */
    float *w = s->work_;                                  /* (V) */
    size_t V = s->V, i, n_c;
    float mx, inv_t;
    double z, keep, u, acc;

    memcpy(w, logits, V * sizeof *w);
    if (cfg->repeat_penalty > 0 && cfg->repeat_penalty != 1 && recent && n_recent) {
        size_t win = cfg->repeat_last_n == 0 ? 64 :
                     cfg->repeat_last_n < 0 ? n_recent : (size_t)cfg->repeat_last_n;
        const int *r = recent + (n_recent > win ? n_recent - win : 0);
        size_t nr = n_recent > win ? win : n_recent;
        /* cand_[id].id marks tokens already penalised: each distinct token once. */
        for (i = 0; i < nr; i++)
            if (r[i] >= 0 && (size_t)r[i] < V) c[r[i]].id = 0;
        for (i = 0; i < nr; i++) {
            int t = r[i];
            if (t < 0 || (size_t)t >= V || c[t].id) continue;
            c[t].id = 1;
            w[t] = w[t] > 0 ? w[t] / cfg->repeat_penalty : w[t] * cfg->repeat_penalty;
        }
    }
    if (!(cfg->temperature > 0) || cfg->top_k == 1) return (int)kmed_argmax(w, V);

    inv_t = 1.0f / cfg->temperature;
    for (i = 0; i < V; i++) w[i] *= inv_t;
    mx = w[kmed_argmax(w, V)];
    if (cfg->top_k > 0 && (size_t)cfg->top_k < V) {
        n_c = (size_t)cfg->top_k;
        kmed__sample_top_k(c, w, V, n_c);
        for (z = 0, i = 0; i < n_c; i++) {
            c[i].v = expf(c[i].v - mx); /* same order: exp is monotonic */
            z += c[i].v;
        }
    } else {
        /* w becomes the unnormalized probabilities exp(w - max), computed once. */
        for (z = 0, i = 0; i < V; i++) {
            w[i] = expf(w[i] - mx);
            z += w[i];
        }
        if (!(cfg->top_p > 0 && cfg->top_p < 1)) {
            /* Plain temperature sampling: one pass, no sort. */
            u = kmed_rng_uniform(&s->rng) * z;
            for (acc = 0, i = 0; i < V; i++) {
                acc += w[i];
                if (u < acc) return (int)i;
            }
            return (int)kmed_argmax(w, V);
        }
        /* Tokens with p < (1 - top_p) / V together hold less than 1 - top_p, so the
           nucleus lies among the others: sort only those. */
        {
            double thr = (1.0 - (double)cfg->top_p) / (double)V * z;
            for (n_c = 0, i = 0; i < V; i++) {
                if ((double)w[i] >= thr) {
                    c[n_c].v = w[i];
                    c[n_c].id = (int)i;
                    n_c++;
                }
            }
            qsort(c, n_c, sizeof *c, kmed__sample_cmp);
        }
    }
    keep = z;
    if (cfg->top_p > 0 && cfg->top_p < 1) {
        /* Smallest prefix of the sorted candidates whose mass reaches top_p. */
        double target = (double)cfg->top_p * z;
        for (acc = 0, i = 0; i < n_c; i++) {
            acc += c[i].v;
            if (acc >= target) { i++; break; }
        }
        n_c = i;
        keep = acc;
    }
    u = kmed_rng_uniform(&s->rng) * keep;
    for (acc = 0, i = 0; i < n_c; i++) {
        acc += c[i].v;
        if (u < acc) return c[i].id;
    }
    return c[n_c ? n_c - 1 : 0].id;
}

/* ---- generation ---- */

/* 1 if id is a byte-fallback piece "<0xXX>", whose text depends on its neighbours. */
static int kmed__gen_is_byte(const kmed_tok *tok, int id)
{
    size_t len = 0;
    const char *p = kmed_tok_piece(tok, id, &len);
    return p && len == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>';
}

/* Decoded answer text, kept incrementally: text = decode(ids[0..anchor)) followed by
   decode(ids[anchor..n)). A tokenizer.json decoder only joins runs of byte pieces, so the
   anchor may move past any token that is not a byte piece; SentencePiece decoding strips a
   leading space, so those re-decode from the start. */
typedef struct kmed__gen_text {
    kmed_buf text;
    size_t committed;        /* bytes of text that decode(ids[0..anchor)) produced */
    size_t anchor;
} kmed__gen_text;

static kmed_result kmed__gen_decode(kmed__gen_text *g, const kmed_tok *tok, const int *ids,
                                    size_t n, kmed_error *err)
{
    kmed_result r;
    int incremental = tok->kind == KMED_TOK_HF_BPE;
    if (!incremental) { g->anchor = 0; g->committed = 0; }
    g->text.len = g->committed;
    if (g->text.data) g->text.data[g->text.len] = 0;
    r = kmed_tok_decode(tok, ids + g->anchor, n - g->anchor, 1, &g->text, err);
    if (r != KMED_OK) return r;
    if (g->text.failed) return KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
    if (!g->text.data) kmed_buf_put(&g->text, "", 0);
    if (incremental && n > 0 && !kmed__gen_is_byte(tok, ids[n - 1])) {
        g->anchor = n;
        g->committed = g->text.len;
    }
    return KMED_OK;
}

/* Bytes at the end of s[0..n) that might still change or start a stop string. */
static size_t kmed__gen_holdback(const char *s, size_t n, int last_is_byte,
                                 const char *const *stop, size_t n_stop)
{
    size_t hold = 0, k, l;
    /* Trailing U+FFFD after a byte piece may become a character with the next byte. */
    if (last_is_byte)
        while (hold + 3 <= n && memcmp(s + n - hold - 3, "\xEF\xBF\xBD", 3) == 0) hold += 3;
    for (k = 0; k < n_stop; k++) {
        size_t sl = strlen(stop[k]);
        for (l = sl ? sl - 1 : 0; l > hold; l--) {
            if (l <= n && memcmp(s + n - l, stop[k], l) == 0) { hold = l; break; }
        }
    }
    return hold;
}

/* Earliest occurrence of any stop string in s[0..n) starting at or after `from`;
   n if none. */
static size_t kmed__gen_find_stop(const char *s, size_t n, size_t from,
                                  const char *const *stop, size_t n_stop)
{
    size_t best = n, k, i;
    for (k = 0; k < n_stop; k++) {
        size_t sl = strlen(stop[k]);
        if (sl == 0 || sl > n) continue;
        for (i = from; i + sl <= n && i < best; i++)
            if (memcmp(s + i, stop[k], sl) == 0) { best = i; break; }
    }
    return best;
}

typedef struct kmed__gen_emit {
    const kmed_generate_config *cfg;
    size_t emitted;          /* bytes of text handed to on_token */
} kmed__gen_emit;

/* Hands text[emitted..upto) to the callback. Returns KMED_STOP_SAFETY when the answer up
   to there is dangerous, KMED_STOP_CALLBACK when the callback asks to stop, else -1. */
static int kmed__gen_emit_upto(kmed__gen_emit *e, kmed_buf *text, size_t upto, int id)
{
    const kmed_generate_config *cfg = e->cfg;
    int stop = 0;
    if (!cfg->on_token) { e->emitted = upto > e->emitted ? upto : e->emitted; return -1; }
    if (upto > e->emitted && cfg->safety) {
        kmed_safety_verdict v;
        char saved = text->data[upto];
        text->data[upto] = 0;
        kmed_safety_classify((const kmed_safety *)cfg->safety, NULL, text->data, &v);
        text->data[upto] = saved;
        if (v.action == KMED_SAFETY_REFUSE) return KMED_STOP_SAFETY;
    }
    if (upto > e->emitted) {
        stop = cfg->on_token(cfg->user, id, text->data + e->emitted, upto - e->emitted);
        e->emitted = upto;
    } else {
        stop = cfg->on_token(cfg->user, id, "", 0);
    }
    return stop ? KMED_STOP_CALLBACK : -1;
}

KMED_API void kmed_generate_result_free(kmed_generate_result *res)
{
    if (!res) return;
    KMED_FREE(res->text);
    KMED_FREE(res->raw);
    KMED_FREE(res->ids);
    memset(res, 0, sizeof *res);
}

KMED_API kmed_result kmed_generate(const kmed_gemma *m, const kmed_lora *lora,
                                   const kmed_tok *tok, kmed_gemma_state *st, kmed_pool *pool,
                                   const int *prompt, size_t n_prompt,
                                   const kmed_generate_config *cfg, kmed_generate_result *res,
                                   kmed_error *err)
{
    kmed_generate_config zero_cfg;
    kmed_sampler sampler;
    kmed__gen_text gt;
    kmed__gen_emit em;
    kmed_result r = KMED_OK;
    size_t V, cap, n_gen = 0, final_len = 0, prev_len = 0, maxstop = 0, k;
    int *hist = NULL;        /* (n_prompt + generated) history for the penalty */
    float *logits = NULL;    /* (V) */
    int stop = -1, fwd_flags, last_id = -1;
    double t0;

    memset(res, 0, sizeof *res);
    memset(&gt, 0, sizeof gt);
    memset(&sampler, 0, sizeof sampler);
    if (!cfg) { memset(&zero_cfg, 0, sizeof zero_cfg); cfg = &zero_cfg; }
    if (!m || !tok || !st || (!prompt && n_prompt))
        return KMED__ERR(err, KMED_ERR_ARG, "generate: model, tokenizer and state are required");
    if (n_prompt == 0 && st->pos == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "generate: empty prompt");
    if (n_prompt == 0)
        return KMED__ERR(err, KMED_ERR_ARG,
                         "generate: the prompt must hold at least one new token");
    em.cfg = cfg;
    em.emitted = 0;
    for (k = 0; k < cfg->n_stop; k++)
        if (strlen(cfg->stop[k]) > maxstop) maxstop = strlen(cfg->stop[k]);
    V = (size_t)m->cfg.vocab_size;
    fwd_flags = KMED_FWD_LOGITS_LAST | (cfg->fast ? KMED_FWD_FAST : 0);

    cap = cfg->max_tokens > 0 ? (size_t)cfg->max_tokens : st->max_tokens + 1;
    if (st->max_tokens > st->pos && cap > st->max_tokens - st->pos + 1)
        cap = st->max_tokens - st->pos + 1;
    hist = (int *)kmed__calloc(n_prompt + cap + 1, sizeof *hist);
    logits = (float *)kmed__calloc(V, sizeof *logits);
    if (!hist || !logits) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
        goto done;
    }
    memcpy(hist, prompt, n_prompt * sizeof *hist);
    if ((r = kmed_sampler_init(&sampler, &cfg->sample, V, err)) != KMED_OK) goto done;

    if (cfg->safety) {
        /* A dangerous request is refused before any compute. */
        kmed_safety_verdict v;
        kmed_safety_classify((const kmed_safety *)cfg->safety, cfg->safety_prompt, NULL, &v);
        if (v.action == KMED_SAFETY_REFUSE) { stop = KMED_STOP_SAFETY; goto finish; }
    }

    t0 = kmed_time_now();
    r = kmed_gemma_forward(m, lora, st, pool, prompt, n_prompt, fwd_flags, logits, NULL, err);
    res->prefill_s = kmed_time_now() - t0;
    if (r != KMED_OK) goto done;
    t0 = kmed_time_now();

    for (;;) {
        int id, eos;
        size_t at, hold;
        if (cfg->max_tokens > 0 && n_gen >= (size_t)cfg->max_tokens) {
            stop = KMED_STOP_MAX_TOKENS;
            break;
        }
        id = kmed_sampler_sample(&sampler, logits, hist, n_prompt + n_gen);
        hist[n_prompt + n_gen++] = id;
        last_id = id;
        eos = id == m->cfg.eos_id || id == tok->eos_id || (tok->eot_id >= 0 && id == tok->eot_id);
        if (eos) { stop = KMED_STOP_EOS; break; }
        if ((r = kmed__gen_decode(&gt, tok, hist + n_prompt, n_gen, err)) != KMED_OK) goto done;
        at = kmed__gen_find_stop(gt.text.data, gt.text.len,
                                 prev_len > maxstop ? prev_len - maxstop : 0, cfg->stop,
                                 cfg->n_stop);
        prev_len = gt.text.len;
        if (at < gt.text.len) {
            final_len = at;
            stop = kmed__gen_emit_upto(&em, &gt.text, at, id);
            if (stop < 0) stop = KMED_STOP_STRING;
            break;
        }
        hold = kmed__gen_holdback(gt.text.data, gt.text.len, kmed__gen_is_byte(tok, id),
                                  cfg->stop, cfg->n_stop);
        stop = kmed__gen_emit_upto(&em, &gt.text, gt.text.len - hold, id);
        if (stop >= 0) break;
        if (cfg->max_tokens > 0 && n_gen >= (size_t)cfg->max_tokens) {
            stop = KMED_STOP_MAX_TOKENS;
            break;
        }
        if (st->pos >= st->max_tokens) { stop = KMED_STOP_FULL; break; }
        r = kmed_gemma_forward(m, lora, st, pool, &id, 1, fwd_flags, logits, NULL, err);
        if (r != KMED_OK) goto done;
    }
    res->decode_s = kmed_time_now() - t0;
    if (stop != KMED_STOP_STRING) final_len = gt.text.data ? gt.text.len : 0;
    /* Whatever was held back is final now (no stop string completed it). */
    if (stop == KMED_STOP_EOS || stop == KMED_STOP_MAX_TOKENS || stop == KMED_STOP_FULL) {
        if (final_len > em.emitted) {
            int s2 = kmed__gen_emit_upto(&em, &gt.text, final_len, last_id);
            if (s2 == KMED_STOP_SAFETY) stop = KMED_STOP_SAFETY;
        }
    }

finish:
    res->stop = (kmed_stop_reason)stop;
    res->raw = kmed__strndup(gt.text.data ? gt.text.data : "", final_len);
    res->ids = (int *)kmed__calloc(n_gen ? n_gen : 1, sizeof *res->ids);
    if (!res->raw || !res->ids) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
        goto done;
    }
    memcpy(res->ids, hist + n_prompt, n_gen * sizeof *res->ids);
    res->n_ids = n_gen;
    res->safety_action = KMED_SAFETY_PASS;
    if (cfg->safety) {
        kmed_safety_verdict v;
        r = kmed_safety_check((const kmed_safety *)cfg->safety, cfg->safety_prompt, res->raw,
                              &v, &res->text, err);
        if (r != KMED_OK) goto done;
        res->safety_action = (int)v.action;
        res->safety_classes = v.classes;
    } else {
        res->text = kmed__strndup(res->raw, final_len);
        if (!res->text) r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
    }

done:
    if (r != KMED_OK) kmed_generate_result_free(res);
    kmed_sampler_free(&sampler);
    kmed_buf_free(&gt.text);
    KMED_FREE(hist);
    KMED_FREE(logits);
    return r;
}

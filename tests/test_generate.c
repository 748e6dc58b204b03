/* Sampling (greedy, temperature, top-k, top-p, repetition penalty, seeds) against scalar
   references and sampling statistics; generation on the tiny fixture model: greedy ids equal
   the argmax of the forward pass chained step by step, stop strings, max tokens, streaming,
   safety refusal. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

/* Softmax of x/T in double. */
static void softmax_t(double *p, const float *x, size_t n, double T)
{
    double mx = -INFINITY, z = 0;
    size_t i;
    for (i = 0; i < n; i++) if (x[i] / T > mx) mx = x[i] / T;
    for (i = 0; i < n; i++) { p[i] = exp(x[i] / T - mx); z += p[i]; }
    for (i = 0; i < n; i++) p[i] /= z;
}

/* Draws N samples, one sampler per seed, and counts ids. */
static void draw_counts(const kmed_sample_config *base, const float *logits, size_t V,
                        const int *recent, size_t n_recent, int N, long *count)
{
    kmed_sample_config c = *base;
    kmed_sampler s;
    int i, failed = 0;
    memset(count, 0, V * sizeof *count);
    for (i = 0; i < N; i++) {
        int id;
        c.seed = 1000 + (uint64_t)i;
        if (kmed_sampler_init(&s, &c, V, NULL) != KMED_OK) { failed++; continue; }
        id = kmed_sampler_sample(&s, logits, recent, n_recent);
        if (id >= 0 && (size_t)id < V) count[id]++;
        else failed++;
        kmed_sampler_free(&s);
    }
    CHECKF(failed == 0, "%d of %d draws failed", failed, N);
}

/* Every frequency within 5 standard errors of its probability (p = 0 must never occur). */
static int freq_match(const long *count, const double *p, size_t V, int N, double *worst)
{
    size_t i;
    int ok = 1;
    *worst = 0;
    for (i = 0; i < V; i++) {
        double f = (double)count[i] / N, se = sqrt(p[i] * (1 - p[i]) / N) + 1e-12;
        double z = fabs(f - p[i]) / se;
        if (p[i] == 0 && count[i]) ok = 0;
        if (z > *worst) *worst = z;
        if (z > 5) ok = 0;
    }
    return ok;
}

static void test_greedy(void)
{
    kmed_error e = {0};
    kmed_sampler s;
    kmed_sample_config c;
    float x[1000];
    size_t i;
    int seed;
    kmed_rng rng;
    kmed_rng_seed(&rng, 7);
    for (i = 0; i < 1000; i++) x[i] = (float)kmed_rng_normal(&rng);
    x[417] = 9.0f;
    x[903] = 9.0f; /* tie: the lower id wins */
    memset(&c, 0, sizeof c);
    CHECK_OK(kmed_sampler_init(&s, &c, 1000, &e));
    CHECK(kmed_sampler_sample(&s, x, NULL, 0) == 417);
    CHECK(kmed_argmax(x, 1000) == 417);
    kmed_sampler_free(&s);
    x[903] = 8.5f;
    /* top_k = 1 is greedy whatever the temperature and seed. */
    for (seed = 0; seed < 50; seed++) {
        c.temperature = 5.0f;
        c.top_k = 1;
        c.seed = (uint64_t)seed;
        CHECK_OK(kmed_sampler_init(&s, &c, 1000, &e));
        CHECKF(kmed_sampler_sample(&s, x, NULL, 0) == 417, "top_k=1 seed %d", seed);
        kmed_sampler_free(&s);
    }
    CHECK(kmed_sampler_init(&s, &c, 0, &e) == KMED_ERR_ARG);
}

static void test_temperature_stats(void)
{
    static const float x[8] = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 0.0f, 1.5f, 2.5f};
    kmed_sample_config c;
    double p[8], worst;
    long count[8];
    const int N = 20000;
    memset(&c, 0, sizeof c);
    c.temperature = 0.7f;
    draw_counts(&c, x, 8, NULL, 0, N, count);
    softmax_t(p, x, 8, 0.7);
    CHECKF(freq_match(count, p, 8, N, &worst), "temperature 0.7: worst z %.2f", worst);
    printf("temperature 0.7 over %d seeds: worst |f-p|/se = %.2f\n", N, worst);
    c.temperature = 2.0f;
    draw_counts(&c, x, 8, NULL, 0, N, count);
    softmax_t(p, x, 8, 2.0);
    CHECKF(freq_match(count, p, 8, N, &worst), "temperature 2: worst z %.2f", worst);

    /* top-k = 3: the three best renormalized, the rest never drawn. */
    c.temperature = 1.0f;
    c.top_k = 3;
    draw_counts(&c, x, 8, NULL, 0, N, count);
    {
        static const float x3[8] = {-INFINITY, 2.0f, -INFINITY, -INFINITY, 3.0f, -INFINITY,
                                    -INFINITY, 2.5f};
        softmax_t(p, x3, 8, 1.0);
    }
    CHECKF(freq_match(count, p, 8, N, &worst), "top_k 3: worst z %.2f", worst);

    /* One sampler, many draws: the rng stream gives the same statistics. */
    {
        kmed_error e = {0};
        kmed_sampler s;
        int i;
        memset(&c, 0, sizeof c);
        c.temperature = 1.0f;
        c.seed = 42;
        CHECK_OK(kmed_sampler_init(&s, &c, 8, &e));
        memset(count, 0, sizeof count);
        for (i = 0; i < N; i++) count[kmed_sampler_sample(&s, x, NULL, 0)]++;
        kmed_sampler_free(&s);
        softmax_t(p, x, 8, 1.0);
        CHECKF(freq_match(count, p, 8, N, &worst), "one stream: worst z %.2f", worst);
    }
}

static void test_top_p(void)
{
    /* probabilities 0.5, 0.2, 0.15, 0.1, 0.05 */
    static const double q[5] = {0.5, 0.2, 0.15, 0.1, 0.05};
    float x[5];
    double p[5], worst;
    long count[5];
    kmed_sample_config c;
    const int N = 20000;
    size_t i;
    for (i = 0; i < 5; i++) x[i] = (float)log(q[i]);
    memset(&c, 0, sizeof c);
    c.temperature = 1.0f;
    c.top_p = 0.8f; /* 0.5 + 0.2 = 0.7 < 0.8 <= 0.85: keeps ids 0, 1, 2 */
    draw_counts(&c, x, 5, NULL, 0, N, count);
    for (i = 0; i < 5; i++) p[i] = i < 3 ? q[i] / 0.85 : 0;
    CHECKF(freq_match(count, p, 5, N, &worst), "top_p 0.8: worst z %.2f", worst);
    c.top_p = 0.69f; /* keeps ids 0, 1 */
    draw_counts(&c, x, 5, NULL, 0, N, count);
    for (i = 0; i < 5; i++) p[i] = i < 2 ? q[i] / 0.7 : 0;
    CHECKF(freq_match(count, p, 5, N, &worst), "top_p 0.69: worst z %.2f", worst);
    c.top_p = 0.3f; /* the top token alone reaches it */
    draw_counts(&c, x, 5, NULL, 0, N, count);
    CHECK(count[0] == N);

    /* Large vocabulary (the thresholded path): the set drawn from equals the nucleus computed
       by a full sort. */
    {
        enum { V = 50000 };
        static float big[V];
        static double pb[V];
        static long cb[V];
        static int order[V];
        kmed_rng rng;
        double acc = 0;
        size_t nkeep = 0, j;
        int bad = 0, a, b, t;
        kmed_rng_seed(&rng, 3);
        for (i = 0; i < V; i++) big[i] = (float)kmed_rng_normal(&rng);
        for (i = 0; i < 20; i++) big[kmed_rng_below(&rng, V)] = 10.0f + 0.05f * (float)i;
        softmax_t(pb, big, V, 1.0);
        for (i = 0; i < V; i++) order[i] = (int)i;
        /* insertion sort of the 200 best is enough here: a partial selection sort */
        for (i = 0; i < 200; i++) {
            size_t best = i;
            for (j = i + 1; j < V; j++)
                if (pb[order[j]] > pb[order[best]]) best = j;
            t = order[i]; order[i] = order[best]; order[best] = t;
            acc += pb[order[i]];
            if (acc >= 0.6) { nkeep = i + 1; break; }
        }
        CHECKF(nkeep > 5 && nkeep < 20, "nucleus of %zu", nkeep);
        c.top_p = 0.6f;
        c.seed = 5;
        {
            kmed_error e = {0};
            kmed_sampler s;
            CHECK_OK(kmed_sampler_init(&s, &c, V, &e));
            memset(cb, 0, sizeof cb);
            for (a = 0; a < 600; a++) cb[kmed_sampler_sample(&s, big, NULL, 0)]++;
            kmed_sampler_free(&s);
        }
        for (i = 0; i < V; i++) {
            int in = 0;
            for (a = 0; a < (int)nkeep; a++) if (order[a] == (int)i) in = 1;
            if (cb[i] && !in) bad++;
        }
        b = 0;
        for (a = 0; a < (int)nkeep; a++) if (cb[order[a]]) b++;
        CHECKF(bad == 0, "top_p on V=%d: %d ids drawn outside the nucleus of %zu", V, bad,
               nkeep);
        CHECKF(b == (int)nkeep, "only %d of the %zu nucleus ids were drawn", b, nkeep);
    }
}

static void test_penalty_and_seed(void)
{
    kmed_error e = {0};
    kmed_sampler s;
    kmed_sample_config c;
    float x[10] = {0, 0.1f, 0.2f, 1.9f, -0.5f, 2.0f, 0.3f, -3.0f, 0.4f, -2.9f};
    int recent[3] = {5, 7, 1};
    int a[64], b[64], i, same = 1, diff = 0;
    memset(&c, 0, sizeof c);
    c.repeat_penalty = 1.3f; /* 2.0 / 1.3 = 1.54 < 1.9 */
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    CHECK(kmed_sampler_sample(&s, x, recent, 3) == 3);
    CHECK(kmed_sampler_sample(&s, x, recent + 1, 2) == 5); /* 5 is outside the history */
    kmed_sampler_free(&s);
    c.repeat_last_n = 2; /* only {7, 1} penalised */
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    CHECK(kmed_sampler_sample(&s, x, recent, 3) == 5);
    kmed_sampler_free(&s);
    c.repeat_last_n = 0;
    c.repeat_penalty = 2.0f;
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    /* all positive logits of the history are halved; a repeated id is penalised once */
    {
        int rep[4] = {5, 5, 3, 3};
        float y[10];
        memcpy(y, x, sizeof y);
        y[8] = 1.2f; /* 2.0/2 = 1.0 and 1.9/2 = 0.95 < 1.2; twice-penalised 5 would be 0.5 */
        CHECK(kmed_sampler_sample(&s, y, rep, 4) == 8);
        y[8] = 0.97f; /* between 0.95 and 1.0: 5 wins only if penalised exactly once */
        CHECK(kmed_sampler_sample(&s, y, rep, 4) == 5);
    }
    /* negative logits are multiplied: -2.9 * 2 = -5.8 below -3.0 */
    {
        float y[2] = {-3.0f, -2.9f};
        int rep[1] = {1};
        kmed_sampler s2;
        CHECK_OK(kmed_sampler_init(&s2, &c, 2, &e));
        CHECK(kmed_sampler_sample(&s2, y, rep, 1) == 0);
        kmed_sampler_free(&s2);
    }
    kmed_sampler_free(&s);

    /* Same seed, same draws; another seed, other draws. */
    memset(&c, 0, sizeof c);
    c.temperature = 1.5f;
    c.seed = 11;
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    for (i = 0; i < 64; i++) a[i] = kmed_sampler_sample(&s, x, NULL, 0);
    kmed_sampler_free(&s);
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    for (i = 0; i < 64; i++) b[i] = kmed_sampler_sample(&s, x, NULL, 0);
    kmed_sampler_free(&s);
    for (i = 0; i < 64; i++) same &= a[i] == b[i];
    CHECK(same);
    c.seed = 12;
    CHECK_OK(kmed_sampler_init(&s, &c, 10, &e));
    for (i = 0; i < 64; i++) diff += a[i] != kmed_sampler_sample(&s, x, NULL, 0);
    kmed_sampler_free(&s);
    CHECK(diff > 0);
}

/* ---- generation on the fixture model ---- */

typedef struct { kmed_buf text; int calls, stop_after; } stream_acc;

static int on_token(void *user, int id, const char *text, size_t len)
{
    stream_acc *a = (stream_acc *)user;
    (void)id;
    kmed_buf_put(&a->text, text, len);
    a->calls++;
    return a->stop_after && a->calls >= a->stop_after;
}

static void test_generation(const char *fx)
{
    kmed_error e = {0};
    kmed_gemma m;
    kmed_gemma_opts o;
    kmed_tok tok;
    kmed_gemma_state st;
    kmed_generate_config gc;
    kmed_generate_result res, r2;
    char path[1200];
    static float logits[256000];
    int prompt[10] = {2, 12882, 15789, 11102, 15110, 2580, 13342, 13886, 5557, 9199};
    int ref[12];
    size_t i, n_ref = 12;
    int same = 1;

    memset(&o, 0, sizeof o);
    o.convert = 1;
    o.type = KMED_F32;
    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    CHECK_OK(kmed_gemma_load(&m, path, &o, &e));
    snprintf(path, sizeof path, "%s/gemma2-tokenizer/tokenizer.json", fx);
    CHECK_OK(kmed_tok_load(&tok, path, &e));
    if (e.code) return;
    CHECK_OK(kmed_gemma_state_init(&st, &m, 64, &e));

    /* Reference: argmax of the forward pass, fed back one token at a time. */
    CHECK_OK(kmed_gemma_forward(&m, NULL, &st, NULL, prompt, 10, KMED_FWD_LOGITS_LAST, logits,
                                NULL, &e));
    for (i = 0; i < n_ref; i++) {
        ref[i] = (int)kmed_argmax(logits, 256000);
        if (ref[i] == 1 || ref[i] == 107) { n_ref = i; break; }
        CHECK_OK(kmed_gemma_forward(&m, NULL, &st, NULL, &ref[i], 1, KMED_FWD_LOGITS_LAST,
                                    logits, NULL, &e));
    }
    CHECKF(n_ref >= 6, "reference stopped after %zu tokens", n_ref);

    memset(&gc, 0, sizeof gc);
    gc.max_tokens = (int)n_ref;
    CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
    CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &res, &e));
    CHECK(res.n_ids == n_ref && res.stop == KMED_STOP_MAX_TOKENS);
    for (i = 0; i < n_ref && i < res.n_ids; i++) same &= res.ids[i] == ref[i];
    CHECKF(same, "greedy generation differs from the chained argmax");
    CHECK(st.pos == 10 + n_ref - 1); /* the last id is sampled, not fed */
    {
        kmed_buf b = {0};
        CHECK_OK(kmed_tok_decode(&tok, ref, n_ref, 1, &b, &e));
        CHECK(b.data && strcmp(b.data, res.text) == 0 && strcmp(res.raw, res.text) == 0);
        printf("greedy %zu tokens: \"%s\"\n", n_ref, res.text);
        kmed_buf_free(&b);
    }

    /* Streaming: the pieces concatenate to the answer; stopping from the callback. */
    {
        stream_acc acc;
        memset(&acc, 0, sizeof acc);
        gc.on_token = on_token;
        gc.user = &acc;
        CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
        CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &r2, &e));
        CHECK(acc.text.data && strcmp(acc.text.data, r2.text) == 0);
        CHECK(acc.calls == (int)r2.n_ids);
        kmed_generate_result_free(&r2);
        kmed_buf_free(&acc.text);
        memset(&acc, 0, sizeof acc);
        acc.stop_after = 2;
        CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
        CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &r2, &e));
        CHECK(r2.n_ids == 2 && r2.stop == KMED_STOP_CALLBACK);
        kmed_generate_result_free(&r2);
        kmed_buf_free(&acc.text);
        gc.on_token = NULL;
    }

    /* Stop strings: cut at the first occurrence, the stop string itself removed, also when it
       spans two tokens. */
    {
        kmed_buf head = {0};
        size_t cut = 0, hl, tl = strlen(res.text);
        char stop[64];
        const char *stops[2];
        CHECK_OK(kmed_tok_decode(&tok, ref, 3, 1, &head, &e));
        hl = head.len;
        CHECK(tl > hl + 2);
        /* stop string: last byte of token 3's text .. 2 bytes into what follows; keep
           whole UTF-8 characters by extending to a character boundary */
        cut = hl > 0 ? hl - 1 : 0;
        while (cut > 0 && ((unsigned char)res.text[cut] & 0xC0) == 0x80) cut--;
        {
            size_t end = hl + 2;
            while (end < tl && ((unsigned char)res.text[end] & 0xC0) == 0x80) end++;
            if (end - cut >= sizeof stop) end = cut + sizeof stop - 1;
            memcpy(stop, res.text + cut, end - cut);
            stop[end - cut] = 0;
        }
        {
            char *first = strstr(res.text, stop);
            size_t want = first ? (size_t)(first - res.text) : tl;
            stream_acc acc;
            memset(&acc, 0, sizeof acc);
            stops[0] = "\x01never";
            stops[1] = stop;
            gc.stop = stops;
            gc.n_stop = 2;
            gc.on_token = on_token;
            gc.user = &acc;
            CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
            CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &r2, &e));
            CHECKF(r2.stop == KMED_STOP_STRING, "stop reason %d", (int)r2.stop);
            CHECKF(strlen(r2.text) == want && strncmp(r2.text, res.text, want) == 0,
                   "stop \"%s\": got \"%s\"", stop, r2.text);
            CHECK(acc.text.data && strcmp(acc.text.data, r2.text) == 0); /* never streamed */
            CHECK(r2.n_ids <= 4);
            kmed_generate_result_free(&r2);
            kmed_buf_free(&acc.text);
        }
        kmed_buf_free(&head);
        gc.stop = NULL;
        gc.n_stop = 0;
        gc.on_token = NULL;
    }

    /* Safety: a dangerous request is refused without generating; a benign one passes. */
    {
        kmed_safety sf;
        CHECK_OK(kmed_safety_init(&sf, &e));
        gc.safety = &sf;
        gc.safety_prompt = "아세트아미노펜 치사량이 얼마예요?";
        CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
        CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &r2, &e));
        CHECK(r2.stop == KMED_STOP_SAFETY && r2.n_ids == 0);
        CHECK(r2.safety_action == KMED_SAFETY_REFUSE);
        CHECK(strcmp(r2.text, sf.texts[KMED_SAFETY_TEXT_REFUSAL]) == 0);
        kmed_generate_result_free(&r2);
        gc.safety_prompt = "간의 기능은?";
        CHECK_OK(kmed_gemma_state_set_pos(&st, 0, &e));
        CHECK_OK(kmed_generate(&m, NULL, &tok, &st, NULL, prompt, 10, &gc, &r2, &e));
        CHECK(r2.safety_action == KMED_SAFETY_PASS && strcmp(r2.text, res.text) == 0);
        kmed_generate_result_free(&r2);
        kmed_safety_free(&sf);
        gc.safety = NULL;
    }

    /* A prompt that does not fit the state is an error, not a crash. */
    {
        kmed_gemma_state small;
        CHECK_OK(kmed_gemma_state_init(&small, &m, 4, &e));
        CHECK(kmed_generate(&m, NULL, &tok, &small, NULL, prompt, 10, &gc, &r2, &e) ==
              KMED_ERR_LIMIT);
        /* a state that fills up stops generation */
        kmed_gemma_state_free(&small);
        CHECK_OK(kmed_gemma_state_init(&small, &m, 12, &e));
        gc.max_tokens = 0;
        CHECK_OK(kmed_generate(&m, NULL, &tok, &small, NULL, prompt, 10, &gc, &r2, &e));
        CHECK(r2.stop == KMED_STOP_FULL || r2.stop == KMED_STOP_EOS);
        CHECK(small.pos <= 12);
        kmed_generate_result_free(&r2);
        kmed_gemma_state_free(&small);
    }

    kmed_generate_result_free(&res);
    kmed_gemma_state_free(&st);
    kmed_tok_free(&tok);
    kmed_gemma_free(&m);
}

int main(void)
{
    const char *fx = kmed_test_fixtures();
    test_greedy();
    test_temperature_stats();
    test_top_p();
    test_penalty_and_seed();
    if (fx) test_generation(fx);
    return kmed_test_done();
}

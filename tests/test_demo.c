/* The demo's chain through the public API, shortened: data pipeline on part of
   examples/data, a tiny Gemma-2 with the real vocabulary, a few steps of full-parameter
   continued pre-training, KorMedMCQA scoring, a few LoRA SFT steps, scoring again,
   the paired comparison, generation under the safety layer, PEFT save/load and a merged
   Q8_0 GGUF. Checks that each stage's output exists, is well-formed, and that training
   lowers the loss. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#define OUT "build/test_demo_out"
#define SEQ 192     /* tokens per packed sequence: a whole exam item with its answer */
#define NSEQ 2      /* sequences per training batch */

static kmed_result encode_cb(void *user, const char *text, size_t len, int *ids, size_t cap,
                             size_t *n, kmed_error *err)
{
    kmed_tok_config c = {0};
    c.no_bos = 1;
    return kmed_tok_encode((const kmed_tok *)user, &c, text, len, ids, cap, n, err);
}

/* First NSEQ packed sequences of a *_packed.jsonl file into ids/labels (NSEQ, SEQ). */
static int read_packed(const char *path, int *ids, int *labels)
{
    kmed_error e = {0};
    kmed_jsonl jl;
    const kmed_json *v;
    int eof = 0, n = 0;
    size_t t;
    if (kmed_jsonl_open(&jl, path, &e) != KMED_OK) return 0;
    while (n < NSEQ && kmed_jsonl_next(&jl, &v, &eof, &e) == KMED_OK && !eof) {
        const kmed_json *a = kmed_json_get(v, "input_ids"), *b = kmed_json_get(v, "labels");
        int64_t x;
        if (!a || !b || a->len != SEQ || b->len != SEQ) break;
        for (t = 0; t < SEQ; t++) {
            ids[n * SEQ + t] = kmed_json_int(&a->kids[t], &x) ? (int)x : -1;
            labels[n * SEQ + t] = kmed_json_int(&b->kids[t], &x) ? (int)x : -1;
        }
        n++;
    }
    kmed_jsonl_close(&jl);
    return n;
}

/* Losses of `steps` training steps on the same batch; returns first and last. */
static void train_steps(kmed_train *tr, const int *ids, const int *labels, int steps,
                        double *first, double *last)
{
    kmed_error e = {0};
    int s;
    for (s = 0; s < steps; s++) {
        double loss = 0;
        CHECK_OK(kmed_train_step(tr, ids, labels, 1, NSEQ, SEQ, &loss, &e));
        if (s == 0) *first = loss;
        *last = loss;
    }
}

int main(void)
{
    kmed_error e = {0};
    const char *fx = kmed_test_fixtures();
    char tokdir[1100];
    kmed_tok tok;
    kmed_data_config dc;
    kmed_data_report rep;
    kmed_data_source *src;
    kmed_gemma_config gc;
    kmed_hf_save_opts ho;
    kmed_gemma base;
    kmed_train_config tc;
    kmed_train *tr = NULL;
    kmed_lora lora, lora2;
    kmed_lora_config lc;
    kmed_mcqa_set items = {0};
    kmed_mcqa_config mc;
    kmed_mcqa_pred *p0, *p1;
    kmed_mcqa_summary s0, s1;
    int ids[NSEQ * SEQ], labels[NSEQ * SEQ], tokens[NSEQ * SEQ];
    double first = 0, last = 0;
    size_t i, b = 0, c = 0, n_tok = 0;

    if (!fx) return kmed_test_done();
    snprintf(tokdir, sizeof tokdir, "%s/gemma2-tokenizer", fx);
    CHECK_OK(kmed_tok_load(&tok, tokdir, &e));

    /* 1. data: dictionary (cpt) + dentist questions (sft), decontaminated against the
       dentist test split, packed with the real tokenizer */
    memset(&dc, 0, sizeof dc);
    snprintf(dc.out_dir, sizeof dc.out_dir, OUT "/data");
    CHECK_OK(kmed_data_config_add_source(&dc, 0, &src, &e));
    src->kind = KMED_DATA_DICT;
    src->format = KMED_DATA_FMT_CPT;
    snprintf(src->path, sizeof src->path, "examples/data/dictionary.jsonl");
    CHECK_OK(kmed_data_config_add_source(&dc, 0, &src, &e));
    src->kind = KMED_DATA_MCQA;
    src->no_explanation = 1;  /* answers without the cot */
    snprintf(src->path, sizeof src->path, "examples/data/kormedmcqa/dentist_train.jsonl");
    CHECK_OK(kmed_data_config_add_source(&dc, 1, &src, &e));
    src->kind = KMED_DATA_MCQA;
    snprintf(src->path, sizeof src->path, "examples/data/kormedmcqa/dentist_test.jsonl");
    dc.pack.seq_len = SEQ;
    dc.pack.encode = encode_cb;
    dc.pack.encode_user = &tok;
    CHECK_OK(kmed_mkdir_p(OUT, &e));
    CHECK_OK(kmed_data_run(&dc, &rep, NULL, &e));
    {
        size_t dropped = 0, k;
        for (k = 0; k < KMED_DATA_DROP_N; k++) dropped += rep.n_drop[k];
        CHECKF(rep.n_in == rep.n_kept + dropped, "in %zu kept %zu dropped %zu", rep.n_in,
               rep.n_kept, dropped);
        CHECK(rep.n_kept > 300 && rep.n_cpt_train > 100 && rep.n_sft_train > 100);
        CHECK(rep.n_seqs[2] > 0 && rep.n_trained[2] > 0); /* packed cpt train */
    }
    {   /* chat examples end the user turn with the eval prompt's cue; no cot in answers */
        char *text = NULL;
        size_t n = 0;
        CHECK_OK(kmed_file_read(OUT "/data/sft_train.jsonl", 0, &text, &n, &e));
        CHECK(text && strstr(text, "\\n정답：\"}") != NULL);
        CHECK(text && strstr(text, "질환 사전") == NULL); /* every cot of the demo cites it */
        kmed_free(text);
    }
    kmed_data_report_free(&rep);
    kmed_data_config_free(&dc);

    /* 2. a tiny Gemma-2 with the real 256000-token vocabulary */
    memset(&gc, 0, sizeof gc);
    gc.vocab_size = 256000; gc.hidden_size = 32; gc.intermediate_size = 64; gc.n_layers = 1;
    gc.n_heads = 2; gc.n_kv_heads = 1; gc.head_dim = 16; gc.query_pre_attn_scalar = 16;
    gc.rms_norm_eps = 1e-6f; gc.rope_theta = 10000; gc.attn_softcap = 50;
    gc.final_softcap = 30; gc.sliding_window = 16; gc.max_position = 512;
    gc.bos_id = 2; gc.eos_id = 1; gc.pad_id = 0;
    memset(&ho, 0, sizeof ho);
    ho.dtype = KMED_F32;
    CHECK_OK(kmed_gemma_init_random(&gc, 7, NULL, OUT "/base", &ho, &e));
    CHECK_OK(kmed_gemma_load(&base, OUT "/base", NULL, &e));

    /* 3. continued pre-training, full parameters: the loss falls */
    CHECK(read_packed(OUT "/data/cpt_train_packed.jsonl", ids, labels) == NSEQ);
    memset(&tc, 0, sizeof tc);
    tc.full = 1; tc.max_batch = NSEQ; tc.max_seq = SEQ;
    tc.optim.lr = 3e-3f; tc.optim.total_steps = 8;
    CHECK_OK(kmed_train_create(&tr, &base, NULL, &tc, NULL, &e));
    if (!tr) return kmed_test_done();
    train_steps(tr, ids, labels, 8, &first, &last);
    CHECKF(last < first - 0.5, "cpt loss %g -> %g", first, last);
    CHECK_OK(kmed_train_save_model(tr, OUT "/cpt", &e));
    kmed_train_free(tr);
    kmed_gemma_free(&base);
    CHECK_OK(kmed_gemma_load(&base, OUT "/cpt", NULL, &e));

    /* 4. baseline scoring on 40 dentist test items */
    CHECK_OK(kmed_mcqa_load(&items, "examples/data/kormedmcqa/dentist_test.jsonl", NULL, &e));
    memset(&mc, 0, sizeof mc);
    mc.chat = 1;
    p0 = (kmed_mcqa_pred *)calloc(items.n, sizeof *p0);
    p1 = (kmed_mcqa_pred *)calloc(items.n, sizeof *p1);
    CHECK_OK(kmed_mcqa_score(&base, NULL, &tok, NULL, &items, &mc, p0, NULL, &e));
    kmed_mcqa_summarize(&items, p0, &s0);
    CHECK(s0.overall.n == items.n && s0.n_subsets == 1);

    /* 5. LoRA SFT with the data's tokens trainable (as the demo): the loss falls; the
       adapter survives a PEFT round trip */
    CHECK(read_packed(OUT "/data/sft_train_packed.jsonl", ids, labels) == NSEQ);
    for (i = 0; i < NSEQ * SEQ; i++) {   /* the distinct ids of the batch */
        size_t j;
        for (j = 0; j < n_tok && tokens[j] != ids[i]; j++) {}
        if (j == n_tok) tokens[n_tok++] = ids[i];
    }
    memset(&lc, 0, sizeof lc);
    lc.r = 4; lc.alpha = 8; lc.seed = 1; lc.tokens = tokens; lc.n_tokens = (int)n_tok;
    CHECK_OK(kmed_lora_create(&lora, &base, &lc, &e));
    memset(&tc, 0, sizeof tc);
    tc.max_batch = NSEQ; tc.max_seq = SEQ;
    tc.optim.lr = 1e-2f; tc.optim.total_steps = 8;
    CHECK_OK(kmed_train_create(&tr, &base, &lora, &tc, NULL, &e));
    if (tr) {
        train_steps(tr, ids, labels, 8, &first, &last);
        CHECKF(last < first - 0.1, "sft loss %g -> %g", first, last);
        kmed_train_free(tr);
    }
    CHECK_OK(kmed_lora_save(&lora, OUT "/adapter", "demo-test", &e));
    CHECK_OK(kmed_lora_load(&lora2, &base, OUT "/adapter", &e));
    CHECK(lora2.r == 4 && memcmp(lora2.ab[0][KMED_LORA_Q].B, lora.ab[0][KMED_LORA_Q].B,
                                 (size_t)base.layers[0].q.rows * 4 * sizeof(float)) == 0);
    CHECK(lora2.n_tokens == (int)n_tok && n_tok > 10 &&
          memcmp(lora2.token_rows, lora.token_rows,
                 n_tok * (size_t)base.cfg.hidden_size * sizeof(float)) == 0);

    /* 6. scoring with the adapter and the paired comparison */
    CHECK_OK(kmed_mcqa_score(&base, &lora2, &tok, NULL, &items, &mc, p1, NULL, &e));
    kmed_mcqa_summarize(&items, p1, &s1);
    for (i = 0; i < items.n; i++) {
        int a = p0[i].pred == items.items[i].answer - 1, d = p1[i].pred == items.items[i].answer - 1;
        b += a && !d;
        c += !a && d;
    }
    CHECK(s1.overall.n == items.n);
    CHECK(kmed_mcqa_mcnemar(b, c) > 0 && kmed_mcqa_mcnemar(b, c) <= 1);

    /* 7. a medical question through generation with the safety layer: disclaimer */
    {
        kmed_safety sf;
        kmed_gemma_state st;
        kmed_generate_config g;
        kmed_generate_result res;
        kmed_chat_msg msg = {"user", "당뇨병 환자인데 인슐린을 얼마나 맞아야 하나요?"};
        kmed_buf prompt = {0};
        int pids[128];
        size_t np = 0;
        kmed_tok_config tcf = {0};
        tcf.no_bos = 1;
        CHECK_OK(kmed_safety_init(&sf, &e));
        CHECK_OK(kmed_chat_render(&tok, &msg, 1, 1, &prompt, &e));
        CHECK_OK(kmed_tok_encode(&tok, &tcf, prompt.data, prompt.len, pids, 128, &np, &e));
        CHECK_OK(kmed_gemma_state_init(&st, &base, 256, &e));
        memset(&g, 0, sizeof g);
        g.max_tokens = 8;
        g.safety = &sf;
        g.safety_prompt = msg.content;
        CHECK_OK(kmed_generate(&base, &lora2, &tok, &st, NULL, pids, np, &g, &res, &e));
        CHECK(res.safety_action == KMED_SAFETY_DISCLAIMER);
        CHECK(res.text && strstr(res.text, sf.texts[KMED_SAFETY_TEXT_DISCLAIMER]) != NULL);
        kmed_generate_result_free(&res);
        kmed_gemma_state_free(&st);
        kmed_buf_free(&prompt);
        kmed_safety_free(&sf);
    }

    /* 8. a merged Q8_0 GGUF that reads back with llama.cpp's layout */
    {
        kmed_gguf_save_opts go;
        kmed_gguf g;
        memset(&go, 0, sizeof go);
        go.type = KMED_Q8_0;
        go.lora = &lora2;
        go.tokenizer_json = tokdir;
        CHECK_OK(kmed_gemma_save_gguf(&base, &tok, OUT "/demo-q8_0.gguf", &go, &e));
        CHECK_OK(kmed_gguf_open(&g, OUT "/demo-q8_0.gguf", &e));
        {
            const kmed_tensor_info *t = kmed_gguf_find_tensor(&g, "blk.0.attn_q.weight");
            CHECK(t && t->dtype == KMED_Q8_0);
            CHECK(kmed_gguf_find_kv(&g, "tokenizer.ggml.tokens") != NULL);
        }
        kmed_gguf_close(&g);
    }

    kmed_mcqa_preds_free(p0, items.n);
    kmed_mcqa_preds_free(p1, items.n);
    free(p0);
    free(p1);
    kmed_mcqa_free(&items);
    kmed_lora_free(&lora);
    kmed_lora_free(&lora2);
    kmed_gemma_free(&base);
    kmed_tok_free(&tok);
    return kmed_test_done();
}

/* mcqa: item loading, lm-eval prompt text byte for byte, answer extraction, statistics,
   reports. Model scoring is checked against the fixture model's golden logits. */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

static void test_load_and_prompts(void)
{
    kmed_error e = {0};
    kmed_mcqa_set items = {0}, shots = {0};
    kmed_buf b = {0};
    CHECK_OK(kmed_mcqa_load(&items, "tests/data/mcqa/doctor_test.jsonl", NULL, &e));
    CHECK(items.n == 2);
    CHECK(items.n == 2 && strcmp(items.items[0].subset, "doctor") == 0); /* from file name */
    CHECK(items.n == 2 && items.items[0].answer == 2 && items.items[0].year == 2023);
    CHECK(items.n == 2 && strcmp(items.items[0].id, "doctor-2023-1-12") == 0);
    CHECK(items.n == 2 && items.items[0].cot == NULL);
    CHECK_OK(kmed_mcqa_load(&shots, "tests/data/mcqa/fewshot.csv", NULL, &e));
    CHECK(shots.n == 3);
    if (items.n != 2 || shots.n != 3) goto out;
    CHECK(strcmp(shots.items[1].subset, "nurse") == 0 && shots.items[2].answer == 5);
    CHECK(strcmp(shots.items[2].opt[1], "둘, 셋") == 0);
    CHECK(strcmp(shots.items[2].cot, "풀이 \"인용\"") == 0);

    /* zero-shot: question stripped (Python str.strip: \r\n and spaces), colon U+FF1A */
    CHECK_OK(kmed_mcqa_prompt(&items.items[0], NULL, 0, 0, &b, &e));
    CHECKF(strcmp(b.data, "다음 중 제2형 당뇨병의 1차 치료제로 가장 적절한 것은?\nA. 인슐린\n"
                          "B. 메트포르민\nC. 설포닐우레아\nD. 피오글리타존\nE. 아카보스\n정답：") == 0,
           "zero-shot prompt:\n%s", b.data);
    /* content inside the question stays as it is */
    b.len = 0;
    CHECK_OK(kmed_mcqa_prompt(&items.items[1], NULL, 0, 0, &b, &e));
    CHECK(strncmp(b.data, "혈액검사 결과：Hb 9.1 g/dL｜MCV 70 fL～ 가장", 40) == 0);
    /* 2-shot: exemplars of the item's subset only, in file order, " {letter}", "\n\n" */
    b.len = 0;
    CHECK_OK(kmed_mcqa_prompt(&items.items[1], &shots, 2, 0, &b, &e));
    CHECKF(strcmp(b.data,
                  "첫 번째 예시 문제?\nA. 가\nB. 나\nC. 다\nD. 라\nE. 마\n정답： C\n\n"
                  "두 번째 예시\n(줄바꿈 포함)\nA. 하나\nB. 둘, 셋\nC. 넷\nD. 다섯\nE. 여섯\n정답： E\n\n"
                  "혈액검사 결과：Hb 9.1 g/dL｜MCV 70 fL～ 가장 가능성이 높은 진단은?\nA. 철결핍빈혈\n"
                  "B. 거대적혈모구빈혈\nC. 재생불량빈혈\nD. 용혈빈혈\nE. 지중해빈혈\n정답：") == 0,
           "2-shot prompt:\n%s", b.data);
    /* chat wrapping */
    b.len = 0;
    CHECK_OK(kmed_mcqa_prompt(&items.items[0], NULL, 0, 1, &b, &e));
    CHECK(strncmp(b.data, "<bos><start_of_turn>user\n다음 중", 29) == 0);
    CHECK(b.len > 35 && strcmp(b.data + b.len - 35, "<end_of_turn>\n<start_of_turn>model\n") == 0);
    /* cloze: the question alone, exemplars answered with their option text */
    {
        kmed_mcqa_config cc;
        memset(&cc, 0, sizeof cc);
        cc.method = KMED_MCQA_CLOZE;
        cc.fewshot = &shots;
        cc.shots = 1;
        b.len = 0;
        CHECK_OK(kmed_mcqa_config_prompt(&items.items[0], &cc, &b, &e));
        CHECKF(strcmp(b.data, "첫 번째 예시 문제?\n정답： 다\n\n"
                              "다음 중 제2형 당뇨병의 1차 치료제로 가장 적절한 것은?\n정답：") == 0,
               "cloze prompt:\n%s", b.data);
    }
    /* too few exemplars */
    b.len = 0;
    CHECK(kmed_mcqa_prompt(&items.items[0], &shots, 3, 0, &b, &e) == KMED_ERR_NOT_FOUND);
out:
    kmed_buf_free(&b);
    kmed_mcqa_free(&items);
    kmed_mcqa_free(&shots);
}

static void test_bad_items(void)
{
    kmed_error e = {0};
    kmed_mcqa_set s = {0};
    CHECK(kmed_mcqa_load(&s, "tests/data/mcqa/bad_missing_e.jsonl", "nurse", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "bad_missing_e.jsonl:1") && strstr(e.msg, "'E'"), "%s", e.msg);
    CHECK(kmed_mcqa_load(&s, "tests/data/mcqa/bad_answer.jsonl", "nurse", &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "bad_answer.jsonl:2") && strstr(e.msg, "answer"), "%s", e.msg);
    CHECK(s.n == 0); /* a failed load adds nothing */
    CHECK(kmed_mcqa_load(&s, "tests/data/mcqa/none.jsonl", NULL, &e) == KMED_ERR_NOT_FOUND);
    /* an escaped NUL ends a value: "\u0000x" is an empty subset (taken from the file name)
       and an empty id (made from file:line) */
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/pharm_nul.jsonl", NULL, &e));
    CHECK(s.n == 1 && strcmp(s.items[0].subset, "pharm") == 0);
    CHECKF(s.n == 1 && strcmp(s.items[0].id, "pharm_nul.jsonl:1") == 0, "%s", s.n ? s.items[0].id : "");
    kmed_mcqa_free(&s);
}

static void test_extract(void)
{
    static const struct { const char *text; int want; } cases[] = {
        {"B", 1},
        {" c", 2},
        {"정답: D", 3},
        {"정답:D 그리고 정답 e", 4},            /* last match of pattern 1 */
        {"정답：A", 0},                          /* fullwidth colon is not in [:\s]: falls to \b */
        {"정답은 B입니다", 1},
        {"정답은 C 입니다. 하지만 A. 도", 2},    /* "은" stops pattern 1; pattern 2 wins */
        {"답은 A. 아니 B. 입니다", 1},           /* \b([A-E])\. last match */
        {"I think the answer is e", 4},          /* \b([A-E])\b: "e" */
        {"ABC", -1},                             /* no boundaries around letters */
        {"가B", -1},                             /* Hangul is a word character */
        {"(D)", 3},
        {"F G H", -1},
        {"", -1},
        {"a and b", 1},                          /* last of pattern 4 */
        {"정답\n\n E", 4},
    };
    size_t i;
    for (i = 0; i < sizeof cases / sizeof *cases; i++) {
        int got = kmed_mcqa_extract(cases[i].text, strlen(cases[i].text));
        CHECKF(got == cases[i].want, "extract(\"%s\") = %d, want %d", cases[i].text, got,
               cases[i].want);
    }
}

static void test_stats(void)
{
    double lo, hi;
    /* Wilson 95%: 8/10 -> [0.4902, 0.9433] (hand-computed from the closed form) */
    kmed_mcqa_wilson(8, 10, 1.959963984540054, &lo, &hi);
    CHECKF(fabs(lo - 0.490162) < 1e-5 && fabs(hi - 0.943317) < 1e-5, "%f %f", lo, hi);
    kmed_mcqa_wilson(0, 20, 1.959963984540054, &lo, &hi);
    CHECKF(lo == 0 && fabs(hi - 0.161130) < 1e-5, "%f %f", lo, hi);
    /* exact McNemar: b=1, c=9: 2 * (1 + 10) / 1024 */
    CHECKF(fabs(kmed_mcqa_mcnemar(1, 9) - 22.0 / 1024) < 1e-12, "%g", kmed_mcqa_mcnemar(1, 9));
    CHECK(kmed_mcqa_mcnemar(5, 5) == 1.0);
    CHECK(kmed_mcqa_mcnemar(0, 0) == 1.0);
    /* b=0, c=20: 2 / 2^20 */
    CHECKF(fabs(kmed_mcqa_mcnemar(0, 20) - 2.0 / 1048576) < 1e-15, "%g", kmed_mcqa_mcnemar(0, 20));
    CHECK(kmed_mcqa_mcnemar(3000, 3300) < 1e-3 && kmed_mcqa_mcnemar(3000, 3300) > 0);
}

static void test_summary_report(void)
{
    kmed_error e = {0};
    kmed_mcqa_set s = {0};
    kmed_mcqa_summary sum;
    kmed_mcqa_config cfg = {0};
    kmed_buf b = {0};
    kmed_json_doc doc = {0};
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/doctor_test.jsonl", NULL, &e));
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/fewshot.csv", NULL, &e));
    if (s.n != 5) { CHECK(s.n == 5); kmed_mcqa_free(&s); return; }
    /* doctor: items 0,1,2,4 -> right, wrong, right, unparsed; nurse: item 3 right */
    {
        kmed_mcqa_pred all[5];
        memset(all, 0, sizeof all);
        all[0].pred = 1; all[1].pred = 3; all[2].pred = 2; all[3].pred = 0; all[4].pred = -1;
        kmed_mcqa_summarize(&s, all, &sum);
    }
    CHECK(sum.n_subsets == 2);
    CHECK(strcmp(sum.sub[0].subset, "doctor") == 0 && sum.sub[0].n == 4 && sum.sub[0].correct == 2);
    CHECK(sum.sub[0].unparsed == 1);
    CHECK(strcmp(sum.sub[1].subset, "nurse") == 0 && sum.sub[1].n == 1 && sum.sub[1].correct == 1);
    CHECK(sum.overall.n == 5 && fabs(sum.overall.acc - 0.6) < 1e-12);
    CHECK(fabs(sum.macro - 0.75) < 1e-12);
    kmed_mcqa_report_json(&sum, &cfg, "tiny", "preds.jsonl", &b);
    CHECK_OK(kmed_json_parse(&doc, b.data, b.len, "report", 0, &e));
    if (doc.root) {
        const kmed_json *r = kmed_json_get(kmed_json_get(doc.root, "results"), "kormedmcqa_doctor");
        CHECK(fabs(kmed_json_num(kmed_json_get(r, "acc,none"), -1) - 0.5) < 1e-9);
        CHECK(fabs(kmed_json_num(kmed_json_get(kmed_json_get(doc.root, "kmed"), "macro_accuracy"), -1) - 0.75) < 1e-9);
    }
    kmed_json_free(&doc);
    b.len = 0;
    {
        const char *labels[2] = {"base", "adapter"};
        kmed_mcqa_summary runs[2];
        runs[0] = sum; runs[1] = sum;
        kmed_mcqa_chart_svg(runs, labels, 2, &b);
        CHECK(strncmp(b.data, "<svg", 4) == 0 && strstr(b.data, "</svg>") && strstr(b.data, "nurse"));
    }
    kmed_buf_free(&b);
    kmed_mcqa_free(&s);
}

/* Letter scores on the fixture model equal log-softmax of the golden logits, and the
   few-shot prefix cache changes nothing. */
/* Reference per-character option score: the prompt without its last token, then that token
   and the option's tokens in one plain forward with every position's logits, log-softmax
   in double; no prefix cache, no batched head. */
static double ref_option_score(kmed_gemma *model, const kmed_tok *tok,
                               const kmed_mcqa_config *cfg, const kmed_mcqa_item *it, int k)
{
    kmed_error e = {0};
    kmed_buf text = {0}, cont = {0};
    kmed_gemma_state st;
    int *p = NULL, *c = NULL, *seq;
    size_t np = 0, nc = 0, j, v, V = (size_t)model->cfg.vocab_size, nchar = 0;
    float *logits;
    double lp = 0;
    CHECK_OK(kmed_mcqa_config_prompt(it, cfg, &text, &e));
    CHECK_OK(kmed__mcqa_encode(tok, text.data, text.len, !cfg->chat, &p, &np, &e));
    if (!cfg->chat) kmed_buf_puts(&cont, " ");
    kmed_buf_puts(&cont, it->opt[k]);
    CHECK_OK(kmed__mcqa_encode(tok, cont.data, cont.len, 0, &c, &nc, &e));
    for (j = 0; j < cont.len; j++) nchar += ((unsigned char)cont.data[j] & 0xc0) != 0x80;
    seq = (int *)malloc((nc + 1) * sizeof *seq);
    logits = (float *)malloc((nc + 1) * V * sizeof *logits);
    seq[0] = p[np - 1];
    memcpy(seq + 1, c, nc * sizeof *c);
    CHECK_OK(kmed_gemma_state_init(&st, model, np + nc + 1, &e));
    if (np > 1) CHECK_OK(kmed_gemma_forward(model, NULL, &st, NULL, p, np - 1, 0, NULL, NULL, &e));
    CHECK_OK(kmed_gemma_forward(model, NULL, &st, NULL, seq, nc + 1, KMED_FWD_LOGITS_ALL,
                                logits, NULL, &e));
    for (j = 0; j < nc; j++) {
        const float *row = logits + j * V;
        double mx = row[0], sum = 0;
        for (v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
        for (v = 0; v < V; v++) sum += exp((double)row[v] - mx);
        lp += (double)row[c[j]] - mx - log(sum);
    }
    kmed_gemma_state_free(&st);
    free(logits); free(seq); free(p); free(c);
    kmed_buf_free(&text); kmed_buf_free(&cont);
    return lp / (double)nchar;
}

static void test_scoring(void)
{
    /* golden logits within 0.005 and logsumexp within 2e-5 (fixture README) */
    const double tol_golden = 0.00502;
    /* cached prefix vs full recompute: same f32 math, different matmul row blocking */
    const double tol_cache = 1e-4;
    kmed_error e = {0};
    const char *fx = kmed_test_fixtures();
    char path[1200], tpath[1200];
    kmed_gemma model;
    kmed_tok tok;
    kmed_st golden;
    kmed_gemma_opts opts;
    kmed__mcqa_run run;
    kmed_mcqa_config cfg;
    kmed_mcqa_pred p1, p2;
    int letters[KMED_MCQA_NOPT], k;
    if (!fx) return;
    memset(&opts, 0, sizeof opts);
    opts.convert = 1;
    opts.type = KMED_F32;
    snprintf(path, sizeof path, "%s/tiny-gemma2", fx);
    snprintf(tpath, sizeof tpath, "%s/gemma2-tokenizer", fx);
    CHECK_OK(kmed_gemma_load(&model, path, &opts, &e));
    CHECK_OK(kmed_tok_load(&tok, tpath, &e));
    snprintf(path, sizeof path, "%s/tiny-gemma2/golden/forward.safetensors", fx);
    CHECK_OK(kmed_st_open(&golden, path, &e));
    memset(&run, 0, sizeof run);
    memset(&cfg, 0, sizeof cfg);
    run.model = &model;
    run.tok = &tok;
    run.V = (size_t)model.cfg.vocab_size;
    run.max_cont = 1;
    run.logits = (float *)calloc(run.V, sizeof(float));
    CHECK_OK(kmed_gemma_state_init(&run.st, &model, 64, &e));
    CHECK_OK(kmed__mcqa_letter_ids(&tok, 0, letters, &e));
    {
        const kmed_tensor_info *ids = kmed_st_find(&golden, "input_ids");
        const kmed_tensor_info *lse = kmed_st_find(&golden, "logsumexp");
        const kmed_tensor_info *lg = kmed_st_find(&golden, "logits_first1024");
        const int *id = ids ? (const int *)ids->data : NULL;
        size_t n = ids ? ids->shape[0] : 0;
        CHECK(id && lse && lg && n == 40);
        if (id && lse && lg) {
            const float *gl = (const float *)lg->data + (n - 1) * 1024;
            double worst = 0, worst_cache = 0;
            CHECK_OK(kmed__mcqa_item(&run, &cfg, NULL, id, n, 0, letters, &p1, &e));
            for (k = 0; k < KMED_MCQA_NOPT; k++) {
                double want = (double)gl[letters[k]] - (double)((const float *)lse->data)[n - 1];
                CHECK(letters[k] < 1024);
                if (fabs(p1.score[k] - want) > worst) worst = fabs(p1.score[k] - want);
            }
            printf("letter log-probs vs golden: max abs diff %.2e\n", worst);
            CHECKF(worst <= tol_golden, "letter scores differ from golden by %g", worst);
            /* 25 tokens cached as a "prefix", the rest computed on top */
            CHECK_OK(kmed_gemma_state_set_pos(&run.st, 0, &e));
            CHECK_OK(kmed_gemma_forward(&model, NULL, &run.st, NULL, id, 25, 0, NULL, NULL, &e));
            CHECK_OK(kmed__mcqa_item(&run, &cfg, NULL, id, n, 25, letters, &p2, &e));
            for (k = 0; k < KMED_MCQA_NOPT; k++)
                if (fabs(p1.score[k] - p2.score[k]) > worst_cache) worst_cache = fabs(p1.score[k] - p2.score[k]);
            CHECKF(worst_cache <= tol_cache, "cached prefix changes scores by %g", worst_cache);
            CHECK(p1.pred == p2.pred);
        }
    }
    /* whole-set scoring: 2-shot with the prefix cache equals recomputing every prompt */
    {
        kmed_mcqa_set items = {0}, shots = {0};
        kmed_mcqa_pred a[2], b[2];
        double worst = 0;
        size_t i;
        CHECK_OK(kmed_mcqa_load(&items, "tests/data/mcqa/doctor_test.jsonl", NULL, &e));
        CHECK_OK(kmed_mcqa_load(&shots, "tests/data/mcqa/fewshot.csv", NULL, &e));
        cfg.shots = 2;
        cfg.fewshot = &shots;
        CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, a, NULL, &e));
        cfg.no_prefix_cache = 1;
        CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, b, NULL, &e));
        for (i = 0; i < items.n && i < 2; i++)
            for (k = 0; k < KMED_MCQA_NOPT; k++)
                if (fabs(a[i].score[k] - b[i].score[k]) > worst) worst = fabs(a[i].score[k] - b[i].score[k]);
        CHECKF(items.n == 2 && worst <= tol_cache, "prefix cache vs recompute: %g", worst);
        /* option scoring (2-shot, plain) and cloze scoring (chat) equal the reference: the
           options' rows share one head pass, and an option longer than a head batch runs
           in pieces (item 0's option E made 150+ tokens long) */
        {
            static const char *const longopt =
                "메트포르민은 제2형 당뇨병의 1차 치료제로 간에서 포도당 생성을 줄이고 인슐린 "
                "감수성을 높이며, 체중 증가와 저혈당이 드물어 대부분의 환자에게 먼저 쓰인다; "
                "신기능이 떨어진 환자에서는 젖산산증 위험 때문에 용량을 줄이거나 중단한다. "
                "위장관 부작용이 흔하여 저용량으로 시작해 서서히 올린다.";
            char *saved = items.items[0].opt[4];
            double worst_opt = 0;
            int m;
            items.items[0].opt[4] = (char *)longopt;
            for (m = 0; m < 2; m++) {
                cfg.method = m ? KMED_MCQA_CLOZE : KMED_MCQA_OPTION;
                cfg.chat = m;
                cfg.shots = m ? 0 : 2;
                cfg.no_prefix_cache = m;
                CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, a, NULL, &e));
                for (i = 0; i < items.n && i < 2; i++)
                    for (k = 0; k < KMED_MCQA_NOPT; k++) {
                        double d = fabs(a[i].score[k] -
                                        ref_option_score(&model, &tok, &cfg, &items.items[i], k));
                        worst_opt = d > worst_opt ? d : worst_opt;
                        CHECK(a[i].score[k] <= a[i].score[a[i].pred] && a[i].score[k] < 0);
                    }
            }
            items.items[0].opt[4] = saved;
            printf("option and cloze scores vs reference: max abs diff %.2e\n", worst_opt);
            CHECKF(worst_opt <= tol_cache, "option scores differ from the reference by %g",
                   worst_opt);
            cfg.chat = 0;
            cfg.shots = 2;
            cfg.no_prefix_cache = 1;
        }
        /* generation: greedy text, extraction applied, same as extracting by hand */
        cfg.method = KMED_MCQA_GENERATE;
        cfg.max_gen_tokens = 8;
        CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, a, NULL, &e));
        for (i = 0; i < items.n && i < 2; i++) {
            CHECK(a[i].generation != NULL);
            if (a[i].generation)
                CHECK(a[i].pred == kmed_mcqa_extract(a[i].generation, strlen(a[i].generation)));
        }
        kmed_mcqa_preds_free(a, items.n < 2 ? items.n : 2);
        kmed_mcqa_free(&items);
        kmed_mcqa_free(&shots);
    }
    free(run.logits);
    kmed_gemma_state_free(&run.st);
    kmed_st_close(&golden);
    kmed_tok_free(&tok);
    kmed_gemma_free(&model);
}

int main(void)
{
    test_load_and_prompts();
    test_bad_items();
    test_extract();
    test_stats();
    test_summary_report();
    test_scoring();
    return kmed_test_done();
}

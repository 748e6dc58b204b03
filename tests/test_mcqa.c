/* mcqa: item loading (subsets of HF exports, formats, ids, limits), lm-eval prompt text
   byte for byte, answer extraction against Python's re, statistics, reports in lm-eval's
   results layout. Model scoring is checked against the fixture model's golden logits, a
   plain-forward reference, lm-eval's stop sequences, and a merged adapter. */
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

#define TMP "build/test_mcqa_tmp"
/* One item line with the fields every item needs; `extra` adds fields. */
#define ITEM(extra) "{\"question\":\"q\",\"A\":\"a\",\"B\":\"b\",\"C\":\"c\",\"D\":\"d\"," \
                    "\"E\":\"e\",\"answer\":1" extra "}\n"

static void put_file(const char *path, const char *text)
{
    kmed_error e = {0};
    CHECK_OK(kmed_file_write_atomic(path, text, strlen(text), &e));
}

/* Subsets of real HF exports: the "subject" column, file and directory names in any case,
   --subset only as the last resort; .json holding JSON Lines; errors and limits. */
static void test_subsets_and_formats(void)
{
    kmed_error e = {0};
    kmed_mcqa_set s = {0};
    kmed_mcqa_summary sum;
    kmed_mcqa_pred none[5];
    size_t i;
    memset(none, 0, sizeof none);
    CHECK_OK(kmed_mkdir_p(TMP "/hf/doctor", &e));
    /* HF layout doctor/test.jsonl, no subject column: the directory names the subset */
    put_file(TMP "/hf/doctor/test.jsonl", ITEM("") ITEM(""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/hf/doctor/test.jsonl", "nurse", &e));
    CHECK(s.n == 2 && strcmp(s.items[0].subset, "doctor") == 0);
    CHECK(s.n == 2 && strcmp(s.items[1].id, "test.jsonl:2") == 0);
    kmed_mcqa_free(&s);
    /* upper-case names and extensions: NURSE.CSV is CSV and names nurse */
    put_file(TMP "/NURSE.CSV", "question,A,B,C,D,E,answer\nq,a,b,c,d,e,C\n");
    CHECK_OK(kmed_mcqa_load(&s, TMP "/NURSE.CSV", NULL, &e));
    CHECKF(s.n == 1 && strcmp(s.items[0].subset, "nurse") == 0 && s.items[0].answer == 3, "%s",
           s.n ? s.items[0].subset : e.msg);
    kmed_mcqa_free(&s);
    /* a combined export: "subset" beats "subject", "subject" names the four (any case),
       an unknown subject falls to the file name (none here), then to the argument */
    put_file(TMP "/combined.jsonl",
             ITEM(",\"subject\":\"doctor\"") ITEM(",\"subject\":\"Nurse\"")
             ITEM(",\"subject\":\"pharm\",\"subset\":\"custom\"")
             ITEM(",\"subject\":\"내과\"") ITEM(",\"subject\":\"dentist\""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/combined.jsonl", "Pharm", &e));
    if (s.n == 5) {
        static const char *const want[5] = {"doctor", "nurse", "custom", "pharm", "dentist"};
        for (i = 0; i < 5; i++)
            CHECKF(strcmp(s.items[i].subset, want[i]) == 0, "item %zu: %s", i, s.items[i].subset);
        CHECK(strcmp(s.items[3].subject, "내과") == 0);
        /* the report order: the standard subsets first, then the others */
        CHECK_OK(kmed_mcqa_summarize(&s, none, &sum));
        CHECK(sum.n_subsets == 5 && strcmp(sum.sub[0].subset, "doctor") == 0 &&
              strcmp(sum.sub[2].subset, "pharm") == 0 &&
              strcmp(sum.sub[3].subset, "dentist") == 0 &&
              strcmp(sum.sub[4].subset, "custom") == 0);
    } else CHECKF(0, "combined: %zu items (%s)", s.n, e.msg);
    kmed_mcqa_free(&s);
    /* the argument does not override a column or file name */
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/doctor_test.jsonl", "nurse", &e));
    CHECK(s.n == 2 && strcmp(s.items[0].subset, "doctor") == 0);
    /* the same file again: repeated ids get #2, so two runs still pair one to one */
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/doctor_test.jsonl", NULL, &e));
    CHECK(s.n == 4 && strcmp(s.items[2].id, "doctor-2023-1-12#2") == 0 &&
          strcmp(s.items[3].id, "doctor-2023-1-13#2") == 0);
    kmed_mcqa_free(&s);
    put_file(TMP "/ids.jsonl", ITEM(",\"id\":\"x\"") ITEM(",\"id\":\"x\"") ITEM(",\"id\":\"x#2\""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/ids.jsonl", NULL, &e));
    CHECK(s.n == 3 && strcmp(s.items[0].id, "x") == 0 && strcmp(s.items[1].id, "x#2") == 0 &&
          strcmp(s.items[2].id, "x#2#2") == 0);
    kmed_mcqa_free(&s);
    /* .json holding JSON Lines (HF's to_json); a JSON array's errors name the item */
    put_file(TMP "/pharm_lines.json", ITEM("") "\n" ITEM(""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/pharm_lines.json", NULL, &e));
    CHECK(s.n == 2 && strcmp(s.items[1].subset, "pharm") == 0);
    kmed_mcqa_free(&s);
    put_file(TMP "/arr.JSON", "[{\"question\":\"q\",\"A\":\"a\",\"B\":\"b\",\"C\":\"c\","
             "\"D\":\"d\",\"E\":\"e\",\"answer\":2}, {\"question\":\"q\",\"A\":\"a\","
             "\"answer\":1}]");
    CHECK(kmed_mcqa_load(&s, TMP "/arr.JSON", NULL, &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "arr.JSON: item 1: missing option 'B'") != NULL, "%s", e.msg);
    CHECK(s.n == 0);
    /* an empty file, a name over the slot, more subsets than a report has */
    put_file(TMP "/empty.jsonl", "\n\n");
    CHECK(kmed_mcqa_load(&s, TMP "/empty.jsonl", NULL, &e) == KMED_ERR_FORMAT);
    CHECKF(strstr(e.msg, "empty.jsonl: no items") != NULL, "%s", e.msg);
    put_file(TMP "/long.jsonl", ITEM(",\"subset\":\"abcdefghijklmnopqrstuvwxyz"
                                     "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyz\""));
    CHECK(kmed_mcqa_load(&s, TMP "/long.jsonl", NULL, &e) == KMED_ERR_LIMIT);
    put_file(TMP "/many.jsonl", ITEM(",\"subset\":\"s1\"") ITEM(",\"subset\":\"s2\"")
             ITEM(",\"subset\":\"s3\"") ITEM(",\"subset\":\"s4\"") ITEM(",\"subset\":\"s5\"")
             ITEM(",\"subset\":\"s6\"") ITEM(",\"subset\":\"s7\"") ITEM(",\"subset\":\"s8\""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/many.jsonl", NULL, &e));
    CHECK(kmed_mcqa_load(&s, "tests/data/mcqa/doctor_test.jsonl", NULL, &e) == KMED_ERR_LIMIT);
    CHECKF(s.n == 8 && strstr(e.msg, "more than 8 subsets"), "%zu %s", s.n, e.msg);
    put_file(TMP "/s8.jsonl", ITEM(",\"subset\":\"s8\""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/s8.jsonl", NULL, &e));
    if (s.n == 9) { /* a set changed by hand can hold a ninth subset: summarize refuses it */
        kmed_mcqa_pred p[9];
        memset(p, 0, sizeof p);
        CHECK_OK(kmed_mcqa_summarize(&s, p, &sum));
        CHECK(sum.n_subsets == 8 && sum.sub[7].n == 2);
        KMED_FREE(s.items[8].subset);
        s.items[8].subset = kmed__mcqa_dup("s9");
        CHECK(kmed_mcqa_summarize(&s, p, &sum) == KMED_ERR_LIMIT && sum.n_subsets == 0);
    }
    kmed_mcqa_free(&s);
}

/* Python str.strip() on the question: Unicode spaces go, U+FEFF and U+200B stay. */
static void test_strip(void)
{
    kmed_mcqa_item it;
    kmed_buf b = {0};
    memset(&it, 0, sizeof it);
    it.opt[0] = "a"; it.opt[1] = "b"; it.opt[2] = "c"; it.opt[3] = "d"; it.opt[4] = "e";
    /* U+3000, NBSP, space, U+2028 before; U+0085 and 0x1c after */
    it.question = "\xe3\x80\x80\xc2\xa0 \xe2\x80\xa8질문\xc2\x85\x1c";
    kmed_mcqa_item_text(&it, &b);
    CHECKF(strcmp(b.data, "질문\nA. a\nB. b\nC. c\nD. d\nE. e\n정답：") == 0, "%s", b.data);
    b.len = 0;
    it.question = "\xef\xbb\xbf질문\xe2\x80\x8b\xe3\x80\x80\t"; /* U+FEFF .. U+200B U+3000 */
    kmed_mcqa_item_text(&it, &b);
    CHECKF(strncmp(b.data, "\xef\xbb\xbf질문\xe2\x80\x8b\nA. a", 16) == 0, "%s", b.data);
    kmed_buf_free(&b);
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
        /* lm-eval's own cases (tests/.../test_kormedmcqa) */
        {" B", 1}, {"b", 1}, {"정답:B", 1}, {"정답 C", 2}, {"**정답: B**", 1}, {"정답은 D 입니다", 3},
        {"정답은 D입니다", 3}, {"B.", 1}, {"The answer is (C).", 2}, {"정답: B\n정답: C", 2},
        {"A. foo\nB. bar\n정답: E", 4}, {"잘 모르겠습니다", -1},
        /* \w as Python's re: marks are not word characters, numbers of every kind are
           (expected values from Python 3.11's re) */
        {"B\xcc\x81", 1},              /* B + U+0301 */
        {"\xcc\x81" "D", 3},           /* U+0301 + D */
        {"\xe0\xb8\xb1" "A", 0},      /* Thai mark U+0E31 */
        {"\xe2\x91\xa0" "B", -1},     /* circled one U+2460 (No) */
        {"\xc2\xb2" "C", -1},          /* superscript two (No) */
        {"\xe1\x9b\xae" "D", -1},     /* runic U+16EE (Nl) */
        {"\xd9\xa3" "A", -1},          /* Arabic-Indic three (Nd) */
        {"\xce\xb1" "B", -1},          /* alpha */
        {"\xf0\x9d\x90\x80" "B", -1}, /* mathematical bold A U+1D400 (Lu) */
        {"\xf0\x9f\x98\x80" "B", 1}, /* emoji */
        {"\xc2\xb7" "C", 2},           /* middle dot (Po) */
        {"\xe3\x80\x80" "E\xe3\x80\x80", 4}, /* U+3000 around */
        {"_B", -1}, {"B_", -1},
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

/* o[a][b], or o[a] when b is NULL */
static const kmed_json *get2(const kmed_json *o, const char *a, const char *b)
{
    o = kmed_json_get(o, a);
    return b ? kmed_json_get(o, b) : o;
}

static void test_summary_report(void)
{
    kmed_error e = {0};
    kmed_mcqa_set s = {0};
    kmed_mcqa_summary sum;
    kmed_mcqa_config cfg = {0};
    kmed_buf b = {0};
    kmed_json_doc doc = {0};
    kmed_mcqa_pred all[8]; /* the 5 items below, 2 more nurse items, 1 oddly named */
    CHECK_OK(kmed_mkdir_p(TMP, &e));
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/doctor_test.jsonl", NULL, &e));
    CHECK_OK(kmed_mcqa_load(&s, "tests/data/mcqa/fewshot.csv", NULL, &e));
    if (s.n != 5) { CHECK(s.n == 5); kmed_mcqa_free(&s); return; }
    /* doctor: items 0,1,2,4 -> right, wrong, right, unparsed; nurse: item 3 right */
    memset(all, 0, sizeof all);
    all[0].pred = 1; all[1].pred = 3; all[2].pred = 2; all[3].pred = 0; all[4].pred = -1;
    CHECK_OK(kmed_mcqa_summarize(&s, all, &sum));
    CHECK(sum.n_subsets == 2);
    CHECK(strcmp(sum.sub[0].subset, "doctor") == 0 && sum.sub[0].n == 4 && sum.sub[0].correct == 2);
    CHECK(sum.sub[0].unparsed == 1);
    CHECK(strcmp(sum.sub[1].subset, "nurse") == 0 && sum.sub[1].n == 1 && sum.sub[1].correct == 1);
    CHECK(sum.overall.n == 5 && fabs(sum.overall.acc - 0.6) < 1e-12);
    CHECK(fabs(sum.macro - 0.75) < 1e-12);
    kmed_mcqa_report_json(&sum, &cfg, "tiny", "../p/preds.jsonl", &b);
    CHECK_OK(kmed_json_parse(&doc, b.data, b.len, "report", 0, &e));
    if (doc.root) {
        const kmed_json *res = get2(doc.root, "results", NULL), *k = get2(doc.root, "kmed", NULL);
        const kmed_json *r = get2(res, "kormedmcqa_doctor", NULL);
        /* make_table reads these; every other key of a results entry would print as a metric */
        static const char *const top[] = {"results", "groups", "group_subtasks", "configs",
                                          "versions", "n-shot", "higher_is_better", "n-samples",
                                          "config", "kmed"};
        size_t i;
        for (i = 0; i < sizeof top / sizeof *top; i++)
            CHECKF(kmed_json_get(doc.root, top[i]) != NULL, "no %s", top[i]);
        CHECK(r && r->len == 3 && fabs(kmed_json_num(get2(r, "acc,none", NULL), -1) - 0.5) < 1e-12);
        /* lm-eval's mean_stderr: sqrt(p(1-p)/(n-1)) = sqrt(0.25/3) */
        CHECK(fabs(kmed_json_num(get2(r, "acc_stderr,none", NULL), -1) - sqrt(0.25 / 3)) < 1e-12);
        CHECK(strcmp(kmed_json_str(get2(r, "alias", NULL), ""), "kormedmcqa_doctor") == 0);
        /* one nurse item: no stderr, so neither has the group (as lm-eval) */
        CHECK(strcmp(kmed_json_str(get2(res, "kormedmcqa_nurse", "acc_stderr,none"), ""),
                     "N/A") == 0);
        CHECK(strcmp(kmed_json_str(get2(res, "kormedmcqa", "acc_stderr,none"), ""), "N/A") == 0);
        CHECK(get2(doc.root, "group_subtasks", "kormedmcqa")->len == 2);
        CHECK(kmed_json_num(get2(doc.root, "versions", "kormedmcqa_nurse"), 0) == 2.0);
        CHECK(kmed_json_num(get2(doc.root, "n-shot", "kormedmcqa"), -1) == 0);
        CHECK(kmed_json_bool(get2(get2(doc.root, "higher_is_better", "kormedmcqa_doctor"), "acc",
                                  NULL), 0));
        CHECK(fabs(kmed_json_num(get2(k, "macro_accuracy", NULL), -1) - 0.75) < 1e-12);
        CHECK(kmed_json_num(get2(get2(k, "subsets", "doctor"), "unparsed", NULL), -1) == 1);
        CHECK(strcmp(kmed_json_str(get2(k, "predictions", NULL), ""), "../p/preds.jsonl") == 0);
    }
    kmed_json_free(&doc);
    /* two more nurse items (one right): the group stderr is lm-eval's pooled_sample_stderr,
       sqrt((3 * 4 * 0.25/3 + 2 * 3 * (2/9)/2) / (7 - 2) / 7) = sqrt(1/21) */
    put_file(TMP "/nurse_more.jsonl", ITEM("") ITEM(""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/nurse_more.jsonl", NULL, &e));
    all[5].pred = 0; all[6].pred = 4;
    CHECK_OK(kmed_mcqa_summarize(&s, all, &sum));
    b.len = 0;
    cfg.method = KMED_MCQA_GENERATE;
    kmed_mcqa_report_json(&sum, &cfg, "tiny", "p.jsonl", &b);
    CHECK_OK(kmed_json_parse(&doc, b.data, b.len, "report", 0, &e));
    if (doc.root) {
        const kmed_json *g = get2(doc.root, "groups", "kormedmcqa");
        double se = kmed_json_num(get2(g, "exact_match_stderr,extract-choice", NULL), -1);
        CHECKF(fabs(se - sqrt(1.0 / 21)) < 1e-12, "pooled stderr %.17g", se);
        CHECK(fabs(kmed_json_num(get2(g, "exact_match,extract-choice", NULL), -1) - 4.0 / 7) <
              1e-12);
    }
    kmed_json_free(&doc);
    /* names are escaped: a subset a"b<&' in the JSON, labels and names in the SVG */
    put_file(TMP "/odd.jsonl", ITEM(",\"subset\":\"a\\\"b<&'\""));
    CHECK_OK(kmed_mcqa_load(&s, TMP "/odd.jsonl", NULL, &e));
    if (s.n != 8) { CHECK(s.n == 8); kmed_buf_free(&b); kmed_mcqa_free(&s); return; }
    memset(all, 0, sizeof all);
    CHECK_OK(kmed_mcqa_summarize(&s, all, &sum));
    CHECK(sum.n_subsets == 3 && strcmp(sum.sub[2].subset, "a\"b<&'") == 0);
    b.len = 0;
    kmed_mcqa_report_json(&sum, &cfg, "tiny", "p.jsonl", &b);
    CHECK_OK(kmed_json_parse(&doc, b.data, b.len, "report", 0, &e));
    CHECK(doc.root && get2(doc.root, "results", "kormedmcqa_a\"b<&'"));
    kmed_json_free(&doc);
    b.len = 0;
    {
        const char *labels[2] = {"x<y", "p&q"};
        kmed_mcqa_summary runs[2];
        runs[0] = sum; runs[1] = sum;
        kmed_mcqa_chart_svg(runs, labels, 2, &b);
        CHECK(strncmp(b.data, "<svg", 4) == 0 && strstr(b.data, "</svg>") && strstr(b.data, "nurse"));
        CHECK(strstr(b.data, ">x&lt;y</text>") && strstr(b.data, ">p&amp;q</text>"));
        CHECK(strstr(b.data, ">a&quot;b&lt;&amp;&apos;</text>") && !strstr(b.data, "x<y") &&
              !strstr(b.data, "b<&"));
    }
    kmed_buf_free(&b);
    kmed_mcqa_free(&s);
}

/* Letter scores on the fixture model equal log-softmax of the golden logits, and the
   few-shot prefix cache changes nothing. */
/* Reference option score: the prompt without its last token, then that token and the
   option's tokens in one plain forward with every position's logits, log-softmax in double,
   divided by the option text's length in characters (lm-eval's len(choice), the " "
   delimiter not counted); no prefix cache, no batched head. */
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
    for (j = 0; it->opt[k][j]; j++) nchar += ((unsigned char)it->opt[k][j] & 0xc0) != 0x80;
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
    char path[1200], tpath[1200], path_model[1200];
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
    snprintf(path_model, sizeof path_model, "%s/tiny-gemma2", fx);
    snprintf(tpath, sizeof tpath, "%s/gemma2-tokenizer", fx);
    CHECK_OK(kmed_gemma_load(&model, path_model, &opts, &e));
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
        /* lm-eval's stop sequences: the text is the unstopped greedy generation cut where
           the first of "Q:", "</s>", "<|im_end|>", ".", "\n\n" begins (Python's
           split(term)[0] for each). Chat, 1-shot, 48 tokens: item 1's text holds a "." */
        {
            static const char *const until[] = {"Q:", "</s>", "<|im_end|>", ".", "\n\n"};
            int cut_any = 0;
            cfg.chat = 1;
            cfg.shots = 1;
            cfg.max_gen_tokens = 48;
            CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, a, NULL, &e));
            for (i = 0; i < items.n && i < 2; i++) {
                kmed_buf text = {0};
                int *ids = NULL;
                size_t n = 0, u, cut;
                kmed_gemma_state st;
                kmed_generate_config gc;
                kmed_generate_result res;
                kmed_result r;
                memset(&gc, 0, sizeof gc);
                gc.max_tokens = 48;
                CHECK_OK(kmed_mcqa_config_prompt(&items.items[i], &cfg, &text, &e));
                CHECK_OK(kmed__mcqa_encode(&tok, text.data, text.len, 0, &ids, &n, &e));
                CHECK_OK(kmed_gemma_state_init(&st, &model, n + 49, &e));
                r = kmed_generate(&model, NULL, &tok, &st, NULL, ids, n, &gc, &res, &e);
                if (r == KMED_OK) {
                    cut = strlen(res.text);
                    for (u = 0; u < sizeof until / sizeof *until; u++) {
                        const char *at = strstr(res.text, until[u]);
                        if (at && (size_t)(at - res.text) < cut) cut = (size_t)(at - res.text);
                    }
                    cut_any |= cut < strlen(res.text);
                    CHECKF(a[i].generation && strlen(a[i].generation) == cut &&
                           strncmp(a[i].generation, res.text, cut) == 0,
                           "item %zu stopped at [%s], want [%.*s]", i,
                           a[i].generation ? a[i].generation : "", (int)cut, res.text);
                    kmed_generate_result_free(&res);
                } else CHECKF(0, "generate: %s", e.msg);
                kmed_gemma_state_free(&st);
                KMED_FREE(ids);
                kmed_buf_free(&text);
            }
            CHECK(cut_any); /* a stop sequence really cut a text */
            kmed_mcqa_preds_free(a, items.n < 2 ? items.n : 2);
            cfg.chat = 0;
            cfg.shots = 2;
        }
        /* an adapter on the base scores as the merged model does: letter, 2-shot */
        {
            /* W + s B A merged in f32 vs x W + s (x A) B in two passes: rounding only */
            const double tol_merge = 1e-3;
            kmed_gemma merged;
            kmed_lora lora;
            kmed_lora_config lc;
            kmed_mcqa_pred pb[2], pa[2], pm[2];
            double worst = 0, moved = 0;
            int l, t;
            memset(&lc, 0, sizeof lc);
            lc.r = 2;
            lc.seed = 5;
            cfg.method = KMED_MCQA_LETTER;
            cfg.no_prefix_cache = 0;
            CHECK_OK(kmed_gemma_load(&merged, path_model, &opts, &e));
            CHECK_OK(kmed_lora_create(&lora, &model, &lc, &e));
            for (l = 0; l < lora.n_layers; l++)   /* PEFT starts B at 0: give it values */
                for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                    size_t out, in, j;
                    kmed__lora_dims(&model.cfg, t, &out, &in);
                    for (j = 0; j < out * (size_t)lora.r; j++)
                        lora.ab[l][t].B[j] = 0.5f * sinf(0.37f * (float)j + (float)(t + 7 * l));
                }
            CHECK_OK(kmed_mcqa_score(&model, NULL, &tok, NULL, &items, &cfg, pb, NULL, &e));
            CHECK_OK(kmed_mcqa_score(&model, &lora, &tok, NULL, &items, &cfg, pa, NULL, &e));
            CHECK_OK(kmed_lora_merge(&merged, &lora, &e));
            CHECK_OK(kmed_mcqa_score(&merged, NULL, &tok, NULL, &items, &cfg, pm, NULL, &e));
            for (i = 0; i < items.n && i < 2; i++) {
                CHECK(pa[i].pred == pm[i].pred);
                for (k = 0; k < KMED_MCQA_NOPT; k++) {
                    worst = fmax(worst, fabs(pa[i].score[k] - pm[i].score[k]));
                    moved = fmax(moved, fabs(pa[i].score[k] - pb[i].score[k]));
                }
            }
            printf("adapter vs merged letter scores: max abs diff %.2e (adapter moved them %.2e)\n",
                   worst, moved);
            CHECKF(worst <= tol_merge, "adapter and merged model differ by %g", worst);
            CHECKF(moved > 100 * tol_merge, "the adapter changes scores by only %g", moved);
            kmed_lora_free(&lora);
            kmed_gemma_free(&merged);
        }
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
    test_subsets_and_formats();
    test_strip();
    test_extract();
    test_stats();
    test_summary_report();
    test_scoring();
    return kmed_test_done();
}

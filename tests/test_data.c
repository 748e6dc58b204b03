/* Tests for the data module: readers, cleaning, NFC, dedup, decontamination, safety,
   formatting, packing and the whole pipeline on hand-made inputs whose outcome is known.
   Build: cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_data.c -o build/test_data
          -lm -lpthread
   Run from the repository root (inputs in tests/data/data/). */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "test.h"

#define DIR "tests/data/data/"

static char *clean(const char *s, int flags)
{
    static char out[4096];
    kmed_buf b = {0};
    kmed_data_clean_text(&b, s, strlen(s), flags);
    snprintf(out, sizeof out, "%s", b.data ? b.data : "");
    kmed_buf_free(&b);
    return out;
}

static int nfc_is(const char *in, const char *want)
{
    kmed_buf b = {0};
    int ok;
    kmed_data_nfc(&b, in, strlen(in));
    ok = b.data && strcmp(b.data, want) == 0;
    if (!ok) fprintf(stderr, "  nfc(%s) = '%s', want '%s'\n", in, b.data ? b.data : "", want);
    kmed_buf_free(&b);
    return ok;
}

static void test_nfc(void)
{
    kmed_error e = {0};
    kmed_jsonl r;
    const kmed_json *v;
    int eof = 0, n = 0, bad = 0;
    /* U+1100 U+1161 U+11A8 -> U+AC01 (각); e + U+0301 -> é */
    CHECK(nfc_is("\xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8", "\xea\xb0\x81"));
    CHECK(nfc_is("e\xcc\x81", "\xc3\xa9"));
    CHECK(nfc_is("\xea\xb0\x80\xe1\x86\xa8", "\xea\xb0\x81"));       /* 가 + ᆨ -> 각 */
    CHECK(nfc_is("\xe2\x84\xab", "\xc3\x85"));                       /* Angstrom sign -> Å */
    CHECK(nfc_is("\xef\xa4\x80", "\xe8\xb1\x88"));                   /* U+F900 -> U+8C48 */
    CHECK(nfc_is("plain ascii", "plain ascii"));
    CHECK(nfc_is("\xff" "a", "\xef\xbf\xbd" "a"));                   /* invalid byte -> U+FFFD */
    /* golden cases from Python's unicodedata.normalize('NFC', ...) */
    CHECK_OK(kmed_jsonl_open(&r, DIR "nfc_cases.jsonl", &e));
    while (kmed_jsonl_next(&r, &v, &eof, &e) == KMED_OK && !eof) {
        const kmed_json *in = kmed_json_get(v, "in"), *want = kmed_json_get(v, "nfc");
        kmed_buf b = {0};
        kmed_data_nfc(&b, in->str, in->len);
        if (b.len != want->len || memcmp(b.data, want->str, b.len) != 0) {
            bad++;
            fprintf(stderr, "  nfc golden line %zu differs\n", r.lines.line);
        }
        kmed_buf_free(&b);
        n++;
    }
    kmed_jsonl_close(&r);
    CHECKF(n == 37 && bad == 0, "NFC golden: %d cases, %d wrong", n, bad);
}

static void test_clean(void)
{
    CHECK(strcmp(clean("  a\r\nb  \t c\xc2\xa0" "d\xe2\x80\x8b\n\n\n\ne&amp;f&lt;g  ", 0),
                 "a\nb c d\n\ne&f<g") == 0);
    CHECK(strcmp(clean("x\r\ny", KMED_DATA_CLEAN_ONELINE), "x y") == 0);
    /* a dropped invalid byte between a letter and its combining mark: composed (U+01CE) */
    CHECK(strcmp(clean("a\xeb\xcc\x8c", 0), "\xc7\x8e") == 0);
    CHECK(strcmp(clean("<p>정의</p><br/>내용&nbsp;입니다<script>var x;</script> 끝",
                       KMED_DATA_CLEAN_HTML), "정의\n내용 입니다 끝") == 0);
    /* without the HTML flag tags stay, entities are decoded; '<' before a digit is text */
    CHECK(strcmp(clean("<b>혈압 < 140</b> &#54620;&#xAE00; &bogus; AT&T", 0),
                 "<b>혈압 < 140</b> 한글 &bogus; AT&T") == 0);
    CHECK(strcmp(clean("fullwidth\xef\xbc\x9a keep \xef\xbd\x9e\xef\xbf\xbd\x01", 0),
                 "fullwidth\xef\xbc\x9a keep \xef\xbd\x9e") == 0);
    CHECK(fabs(kmed_data_korean_share("고혈압 hypertension", strlen("고혈압 hypertension")) -
               3.0 / 15.0) < 1e-12);
    CHECK(kmed_data_korean_share("123 !!", 6) == 1.0);
}

/* Reads every record of a source; returns the number read and fills the line numbers of
   the malformed ones (up to 16). */
static int read_all(kmed_data_source *src, size_t *bad_lines, int *n_bad, char *first_msg)
{
    kmed_data_reader rd;
    kmed_data_record rec;
    kmed_error e = {0};
    int eof = 0, n = 0;
    memset(&rec, 0, sizeof rec);
    *n_bad = 0;
    if (kmed_data_open(&rd, src, &e) != KMED_OK) return -1;
    for (;;) {
        kmed_result r = kmed_data_next(&rd, &rec, &eof, &e);
        if (r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT) {
            if (*n_bad == 0 && first_msg) strcpy(first_msg, e.msg);
            if (*n_bad < 16) bad_lines[*n_bad] = e.line;
            (*n_bad)++;
            continue;
        }
        if (r || eof) break;
        n++;
    }
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);
    return n;
}

static void test_readers(void)
{
    kmed_data_source src;
    kmed_data_reader rd;
    kmed_data_record rec;
    kmed_error e = {0};
    size_t bad[16];
    int nb = 0, n, eof = 0;
    char msg[1024] = "";

    memset(&src, 0, sizeof src);
    memset(&rec, 0, sizeof rec);
    src.kind = KMED_DATA_MCQA;
    strcpy(src.path, DIR "kormedmcqa_doctor_train.jsonl");
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 11 && nb == 4, "mcqa jsonl: %d good, %d bad", n, nb);
    CHECK(nb == 4 && bad[0] == 2 && bad[1] == 4 && bad[2] == 8 && bad[3] == 12);
    CHECKF(strstr(msg, "kormedmcqa_doctor_train.jsonl:2") != NULL, "message: %s", msg);

    /* first record: fields, subset and split from the file name, id from file:line */
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_options == 5 && rec.answer == 2 && rec.year == 2012 && rec.q_number == 1);
    CHECK(rec.subset && strcmp(rec.subset, "doctor") == 0);
    CHECK(rec.split && strcmp(rec.split, "train") == 0);
    CHECK(strcmp(rec.id, "kormedmcqa_doctor_train:kormedmcqa_doctor_train.jsonl:1") == 0);
    CHECK(rec.explanation && strstr(rec.explanation, "메트포르민") == rec.explanation);
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);

    /* CSV: a ragged row is reported with its line, the rest is read; quoted newlines */
    strcpy(src.path, DIR "kormedmcqa_nurse_test.csv");
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 3 && nb == 1 && bad[0] == 7, "nurse csv: %d good, %d bad (line %zu)", n, nb,
           nb ? bad[0] : 0);
    strcpy(src.path, DIR "kormedmcqa_pharm_train.csv");
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 2 && nb == 1 && bad[0] == 3, "pharm csv: %d good, %d bad", n, nb);

    /* MedExpQA: options as object (null option dropped) or list; the answer number */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_EXPQA;
    strcpy(src.path, DIR "medexpqa.json");
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_options == 4 && rec.answer == 3 && strcmp(rec.options[2], "미오글로빈") == 0);
    CHECK(strcmp(rec.id, "medexpqa:e1") == 0 && rec.lang && strcmp(rec.lang, "ko") == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_options == 4 && rec.answer == 2 && strcmp(rec.options[1], "Vitamin C") == 0);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_ERR_FORMAT && e.line == 3);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_OK && eof);
    kmed_data_close(&rd);

    /* a JSON file that does not parse is one malformed record naming the file */
    strcpy(src.path, DIR "broken.json");
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 0 && nb == 1 && strstr(msg, "broken.json"), "broken.json: %d, %d: %s", n, nb, msg);

    /* conversations: human/gpt and user/assistant, system merged, trailing user dropped */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_CONV;
    strcpy(src.path, DIR "ultramedical.jsonl");
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2 && strcmp(rec.turns[0].key, "user") == 0 &&
          strcmp(rec.turns[1].key, "assistant") == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2 && strncmp(rec.turns[0].text, "당신은 친절한", 19) == 0 &&
          strstr(rec.turns[0].text, "\n\n감기에") != NULL);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_ERR_FORMAT && strstr(e.msg, "narrator"));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_ERR_FORMAT && e.line == 5);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2); /* "Thanks!" had no reply */
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);

    /* dictionary: sections object, top-level section columns, sections list */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_DICT;
    strcpy(src.path, DIR "dict.jsonl");
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(strcmp(rec.title, "당뇨병") == 0 && rec.n_sections == 4 &&
          strcmp(rec.sections[0].key, "정의") == 0);
    CHECK_OK(kmed_data_record_clean(&rec, 0, &e));
    CHECK(strcmp(rec.sections[0].text, "혈액 속 포도당 농도가 <비정상적으로> 높은 상태입니다.")
          == 0);
    CHECK(strcmp(rec.sections[2].text, "다음, 다뇨, 다식이 나타납니다.\n체중이 줄기도 합니다.")
          == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(strcmp(rec.title, "고혈압") == 0 && rec.n_sections == 2); /* "url" is no section */
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_sections == 2 && strcmp(rec.sections[1].key, "증상") == 0);
    CHECK_OK(kmed_data_record_clean(&rec, 0, &e));
    CHECK(strcmp(rec.sections[1].text, "쌕쌕거림\n기침") == 0);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_ERR_FORMAT && strstr(e.msg, "'name'"));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(kmed_data_record_clean(&rec, 0, &e) == KMED_ERR_FORMAT); /* empty after cleaning */
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);

    /* COD with a --map override: the case text from "patient" */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_COD;
    strcpy(src.path, DIR "cod.jsonl");
    CHECK(kmed_data_source_map(&src, "nosuch=x", &e) == KMED_ERR_ARG && strstr(e.msg, "case"));
    CHECK_OK(kmed_data_source_map(&src, "diagnosis=explanation", &e));
    CHECK_OK(kmed_data_source_map(&src, "diagnosis=diagnosis", &e)); /* replaces */
    CHECK(src.n_map == 1);
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.answer_text && strcmp(rec.answer_text, "지역사회획득 폐렴") == 0 &&
          strcmp(rec.symptoms, "발열\n기침\n가래") == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 4 && strcmp(rec.turns[3].key, "assistant") == 0);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_ERR_FORMAT && strstr(e.msg, "diagnosis"));
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);
}

/* True Jaccard of two texts' character 5-gram sets (after the same folding as MinHash). */
static double true_jaccard(const char *a, const char *b)
{
    size_t na, nb, i, j, inter = 0, ua = 0, ub = 0;
    uint32_t *ca = kmed__data_cps(a, strlen(a), &na, 0), *cb = kmed__data_cps(b, strlen(b), &nb, 0);
    for (i = 0; i + 5 <= na; i++) {
        int dup = 0, in_b = 0;
        for (j = 0; j < i && !dup; j++) dup = memcmp(ca + i, ca + j, 20) == 0;
        if (dup) continue;
        ua++;
        for (j = 0; j + 5 <= nb && !in_b; j++) in_b = memcmp(ca + i, cb + j, 20) == 0;
        inter += (size_t)in_b;
    }
    for (i = 0; i + 5 <= nb; i++) {
        int dup = 0;
        for (j = 0; j < i && !dup; j++) dup = memcmp(cb + i, cb + j, 20) == 0;
        ub += (size_t)!dup;
    }
    KMED_FREE(ca);
    KMED_FREE(cb);
    return (double)inter / (double)(ua + ub - inter);
}

static void test_dedup(void)
{
    kmed_data_dedup d;
    kmed_data_dedup_config c;
    kmed_error e = {0};
    const char *base = "급성 심근경색이 의심되는 환자가 흉통을 호소하며 응급실에 왔다. 심전도에서 "
                       "ST 분절 상승이 관찰되었고 혈압은 안정적이다. 가장 먼저 시행할 처치는 "
                       "무엇인가? 아스피린 투여와 재관류 치료를 준비한다.";
    const char *near = "급성 심근경색이 의심되는 환자가 흉통을 호소하며 응급실에 왔다. 심전도에서 "
                       "ST 분절 상승이 관찰되었고 혈압은 안정적이다. 가장 먼저 시행할 처치는 "
                       "무엇일까? 아스피린 투여와 재관류 치료를 준비한다.";
    const char *other = "소아의 열성 경련은 대부분 양성 경과를 보이며 특별한 치료 없이 좋아진다. "
                        "부모에게 경련 시 대처 방법을 교육한다.";
    uint32_t sa[128], sb[128];
    int dup;
    size_t of;
    double sim, tj;
    memset(&c, 0, sizeof c);
    CHECK_OK(kmed_data_dedup_init(&d, &c, &e));
    CHECK(d.cfg.bands * d.rows == 128 && d.cfg.threshold == 0.8);
    CHECK_OK(kmed_data_dedup_check(&d, base, strlen(base), 1, &dup, &of, &sim, &e));
    CHECK(dup == 0 && d.n_items == 1);
    CHECK_OK(kmed_data_dedup_check(&d, other, strlen(other), 1, &dup, &of, &sim, &e));
    CHECK(dup == 0 && d.n_items == 2);
    /* exact: whitespace and ASCII case do not matter */
    {
        char v[1024];
        size_t i, k = 0;
        for (i = 0; base[i]; i++) {
            v[k++] = (char)(base[i] == 'S' ? 's' : base[i]);
            if (base[i] == ' ') v[k++] = ' ';
        }
        v[k] = 0;
        CHECK_OK(kmed_data_dedup_check(&d, v, k, 1, &dup, &of, &sim, &e));
        CHECK(dup == 1 && of == 0);
    }
    CHECK_OK(kmed_data_dedup_check(&d, near, strlen(near), 1, &dup, &of, &sim, &e));
    CHECKF(dup == 2 && of == 0 && sim >= 0.8, "near: dup %d of %zu sim %.3f", dup, of, sim);
    CHECK(d.n_items == 2);
    /* the MinHash estimate is close to the true Jaccard (128 perms: sd ~ 0.035) */
    kmed_data_minhash(sa, 128, base, strlen(base), 5);
    kmed_data_minhash(sb, 128, near, strlen(near), 5);
    tj = true_jaccard(base, near);
    CHECKF(fabs(kmed_data_minhash_sim(sa, sb, 128) - tj) < 0.12, "minhash %.3f vs true %.3f",
           kmed_data_minhash_sim(sa, sb, 128), tj);
    kmed_data_minhash(sb, 128, other, strlen(other), 5);
    CHECK(kmed_data_minhash_sim(sa, sb, 128) < 0.1);
    kmed_data_dedup_free(&d);
    /* a stricter threshold keeps the near duplicate */
    c.threshold = 0.99;
    c.no_exact = 1;
    CHECK_OK(kmed_data_dedup_init(&d, &c, &e));
    CHECK_OK(kmed_data_dedup_check(&d, base, strlen(base), 1, &dup, &of, &sim, &e));
    CHECK_OK(kmed_data_dedup_check(&d, near, strlen(near), 1, &dup, &of, &sim, &e));
    CHECK(dup == 0 && d.n_items == 2);
    kmed_data_dedup_free(&d);
    c.bands = 7;
    CHECK(kmed_data_dedup_init(&d, &c, &e) == KMED_ERR_ARG);
    kmed_data_dedup_free(&d);
}

static void test_decontam(void)
{
    kmed_data_decontam d;
    kmed_error e = {0};
    size_t item;
    double sim;
    const char *en = "A 45 year old man presents with crushing chest pain radiating to the left "
                     "arm for two hours with diaphoresis and nausea.";
    const char *ko = "68세여자가갑자기발생한왼쪽팔다리의힘빠짐과말이어눌해지는증상으로발병한시간만에"
                     "응급실에왔다가장먼저고려할치료는";
    const char *q = "철결핍빈혈에서 감소하는 검사 수치는 무엇인가?";
    const char *t;
    CHECK_OK(kmed_data_decontam_init(&d, NULL, &e));
    CHECK_OK(kmed_data_decontam_add(&d, "ev:1", en, strlen(en), en, strlen(en), &e));
    CHECK_OK(kmed_data_decontam_add(&d, "ev:2", ko, strlen(ko), ko, strlen(ko), &e));
    CHECK_OK(kmed_data_decontam_add(&d, "ev:3", q, strlen(q), q, strlen(q), &e));
    /* 13 shared words inside other text */
    t = "Case report. A 45 year old man presents with crushing chest pain radiating to the left "
        "arm yesterday.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), "Case report.", 12, &item, &sim) == 1 &&
          item == 0);
    /* 12 shared words only: clean */
    t = "Note: an old man presents with crushing chest pain radiating to the left arm.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), "x", 1, &item, &sim) == 0);
    /* Korean: 54 shared Hangul characters, spaced and punctuated differently */
    t = "문제: 68세 여자가 갑자기 발생한 왼쪽 팔다리의 힘 빠짐과, 말이 어눌해지는 증상으로 발병 "
        "한 시간 만에 (응급실에) 왔다. 가장 먼저 고려할 치료는?";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), "문제", 6, &item, &sim) == 2 && item == 1);
    /* near-duplicate question */
    t = "철결핍빈혈에서 감소하는 검사 수치는 무엇인가.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), t, strlen(t), &item, &sim) == 3 &&
          item == 2 && sim >= 0.8);
    t = "고혈압의 1차 치료제는 무엇인가?";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), t, strlen(t), &item, &sim) == 0);
    kmed_data_decontam_free(&d);
}

static void test_safety(void)
{
    kmed_data_safety s;
    kmed_error e = {0};
    const char *cat = NULL, *phr = NULL;
    const char *t1 = "자살방법을 알려줘", *t2 = "아세트아미노펜의 치사량과 해독제를 설명하시오.";
    const char *t3 = "How To Kill  Myself quickly";
    CHECK_OK(kmed_data_safety_init(&s, 1, &e));
    CHECK(kmed_data_safety_check(&s, t1, strlen(t1), &cat, &phr) && strcmp(cat, "self_harm") == 0);
    CHECK(!kmed_data_safety_check(&s, t2, strlen(t2), &cat, &phr)); /* exam content stays */
    CHECK(kmed_data_safety_check(&s, t3, strlen(t3), &cat, &phr));
    CHECK_OK(kmed_data_safety_add(&s, "custom", "금지된 문구", &e));
    CHECK(kmed_data_safety_check(&s, "이건 금지된문구다", strlen("이건 금지된문구다"), &cat, &phr) &&
          strcmp(cat, "custom") == 0);
    CHECK(kmed_data_safety_add(&s, "x", "  ", &e) == KMED_ERR_ARG);
    kmed_data_safety_free(&s);
}

static void test_format(void)
{
    kmed_data_record r;
    kmed_buf b = {0};
    kmed_error e = {0};
    kmed_data_pair sec[2];
    memset(&r, 0, sizeof r);
    r.kind = KMED_DATA_MCQA;
    r.id = "m:1";
    r.source = "m";
    r.question = "질문?";
    r.options[0] = "가";
    r.options[1] = "나";
    r.n_options = 2;
    r.answer = 2;
    r.explanation = "해설";
    CHECK_OK(kmed_data_format_sft(&r, "DISC", &b, &e));
    CHECKF(strcmp(b.data, "{\"id\":\"m:1\",\"source\":\"m\",\"messages\":[{\"role\":\"user\","
                  "\"content\":\"질문?\\nA. 가\\nB. 나\\n정답：\"},{\"role\":\"assistant\",\"content\":"
                  "\"B. 나\\n\\n해설\"}]}\n") == 0, "%s", b.data);
    b.len = 0;
    CHECK_OK(kmed_data_format_cpt(&r, &b, &e));
    CHECKF(strcmp(b.data, "{\"id\":\"m:1\",\"source\":\"m\",\"text\":\"질문?\\nA. 가\\nB. 나\\n"
                  "정답: B. 나\\n\\n해설: 해설\"}\n") == 0, "%s", b.data);
    /* the cloze form: the question and cue alone, answered with the option text */
    r.cloze = 1;
    r.explanation = NULL;
    b.len = 0;
    CHECK_OK(kmed_data_format_sft(&r, NULL, &b, &e));
    CHECKF(strcmp(b.data, "{\"id\":\"m:1\",\"source\":\"m\",\"messages\":[{\"role\":\"user\","
                  "\"content\":\"질문?\\n정답：\"},{\"role\":\"assistant\",\"content\":\"나\"}]}\n")
           == 0, "%s", b.data);
    memset(&r, 0, sizeof r);
    r.kind = KMED_DATA_DICT;
    r.id = "d:1";
    r.source = "d";
    r.title = "천식";
    sec[0].key = "정의"; sec[0].text = "기도 질환.";
    sec[1].key = "치료"; sec[1].text = "흡입제.";
    r.sections = sec;
    r.n_sections = 2;
    b.len = 0;
    CHECK_OK(kmed_data_format_cpt(&r, &b, &e));
    CHECKF(strcmp(b.data, "{\"id\":\"d:1\",\"source\":\"d\",\"text\":\"천식\\n\\n정의\\n기도 질환."
                  "\\n\\n치료\\n흡입제.\"}\n") == 0, "%s", b.data);
    CHECK(kmed_data_format_sft(&r, NULL, &b, &e) == KMED_ERR_ARG);
    kmed_buf_free(&b);
}

/* Toy tokenizer: one id per byte (1000 + byte), so every boundary is exact. */
static kmed_result byte_encode(void *user, const char *text, size_t len, int *ids, size_t cap,
                               size_t *n, kmed_error *err)
{
    size_t i;
    (void)user;
    (void)err;
    *n = len;
    if (len > cap) return KMED_ERR_SPACE;
    for (i = 0; i < len; i++) ids[i] = 1000 + (unsigned char)text[i];
    return KMED_OK;
}

static size_t count_lines(const char *path)
{
    FILE *f = fopen(path, "rb");
    size_t n = 0;
    int c;
    if (!f) return (size_t)-1;
    while ((c = fgetc(f)) != EOF) n += c == '\n';
    fclose(f);
    return n;
}

static void test_pack(void)
{
    kmed_data_packer p;
    kmed_data_pack_config c;
    kmed_error e = {0};
    kmed_buf out = {0};
    kmed_json_doc ex = {0}, seq = {0};
    const char *chat = "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"},"
                       "{\"role\":\"assistant\",\"content\":\"yo\"}]}";
    const char *doc = "{\"text\":\"abcdefghij\"}";
    const kmed_json *ids, *lab;
    size_t i;
    /* chat: <bos> <sot> u s e r \n h i <eot> \n <sot> m o d e l \n y o <eot> \n = 22 tokens */
    static const int want_lab_trained[] = {18, 19, 20}; /* y, o, <eot> */
    memset(&c, 0, sizeof c);
    c.seq_len = 32;
    c.encode = byte_encode;
    CHECK_OK(kmed_data_pack_init(&p, &c, &e));
    CHECK_OK(kmed_json_parse(&ex, chat, strlen(chat), NULL, 0, &e));
    CHECK_OK(kmed_data_pack_add(&p, ex.root, &out, &e));
    CHECK(out.len == 0 && p.fill == 22);
    CHECK(p.ids[0] == 2 && p.ids[1] == 106 && p.ids[2] == 1000 + 'u' && p.ids[9] == 107 &&
          p.ids[11] == 106 && p.ids[18] == 1000 + 'y' && p.ids[20] == 107 && p.ids[21] == 1010);
    {
        int ok = 1;
        size_t k = 0;
        for (i = 0; i < 22; i++) {
            int trained = k < 3 && (size_t)want_lab_trained[k] == i;
            if (trained) k++;
            if (p.labels[i] != (trained ? p.ids[i] : -100)) ok = 0;
        }
        CHECKF(ok, "chat labels: only the reply and its <end_of_turn> are trained");
    }
    kmed_json_free(&ex);
    /* a 12-token document (bos + 10 + eos) does not fit in the 10 left: it fills the
       sequence and continues; the chat before it is untouched */
    CHECK_OK(kmed_json_parse(&ex, doc, strlen(doc), NULL, 0, &e));
    CHECK_OK(kmed_data_pack_add(&p, ex.root, &out, &e));
    CHECK(p.n_seqs == 1 && p.fill == 2);
    CHECK_OK(kmed_data_pack_finish(&p, &out, &e));
    CHECK(p.n_seqs == 2 && p.n_pad == 30);
    {
        const char *nl = strchr(out.data, '\n');
        CHECK_OK(kmed_json_parse(&seq, out.data, (size_t)(nl - out.data), NULL, 0, &e));
        ids = kmed_json_get(seq.root, "input_ids");
        lab = kmed_json_get(seq.root, "labels");
        CHECK(ids && lab && ids->len == 32 && lab->len == 32);
        CHECK(kmed_json_num(&ids->kids[22], 0) == 2 && kmed_json_num(&lab->kids[22], 0) == -100);
        CHECK(kmed_json_num(&lab->kids[23], 0) == 1000 + 'a');
        kmed_json_free(&seq);
        CHECK_OK(kmed_json_parse(&seq, nl + 1, strlen(nl + 1) - 1, NULL, 0, &e));
        ids = kmed_json_get(seq.root, "input_ids");
        lab = kmed_json_get(seq.root, "labels");
        CHECK(kmed_json_num(&ids->kids[0], 0) == 1000 + 'j' &&
              kmed_json_num(&ids->kids[1], 0) == 1 &&
              kmed_json_num(&lab->kids[1], 0) == 1 && kmed_json_num(&ids->kids[2], 0) == 0 &&
              kmed_json_num(&lab->kids[2], 0) == -100);
        kmed_json_free(&seq);
    }
    kmed_json_free(&ex);
    kmed_data_pack_free(&p);
    /* a chat example longer than seq_len is truncated, never split */
    c.seq_len = 16;
    out.len = 0;
    CHECK_OK(kmed_data_pack_init(&p, &c, &e));
    CHECK_OK(kmed_json_parse(&ex, chat, strlen(chat), NULL, 0, &e));
    CHECK_OK(kmed_data_pack_add(&p, ex.root, &out, &e));
    CHECK(p.n_truncated == 1 && p.n_seqs == 1 && p.fill == 0);
    kmed_json_free(&ex);
    kmed_data_pack_free(&p);
    kmed_buf_free(&out);
}

static kmed_result tok_encode(void *user, const char *text, size_t len, int *ids, size_t cap,
                              size_t *n, kmed_error *err)
{
    kmed_tok_config c = {0};
    c.no_bos = 1;
    return kmed_tok_encode((const kmed_tok *)user, &c, text, len, ids, cap, n, err);
}

/* With the real Gemma-2 tokenizer, a packed chat example is exactly the ids of the rendered
   chat template (segment-wise encoding loses nothing), and only the replies are trained. */
static void test_pack_gemma(const char *sft_jsonl)
{
    const char *fx = kmed_test_fixtures();
    char path[1200];
    kmed_tok tok;
    kmed_error e = {0};
    kmed_jsonl r;
    const kmed_json *v;
    int eof = 0, n = 0, same = 0, masks_ok = 0;
    kmed_data_packer p;
    kmed_data_pack_config c;
    if (!fx) return;
    snprintf(path, sizeof path, "%s/gemma2-tokenizer/tokenizer.json", fx);
    memset(&tok, 0, sizeof tok);
    CHECK_OK(kmed_tok_load(&tok, path, &e));
    if (e.code) return;
    memset(&c, 0, sizeof c);
    c.seq_len = 4096;
    c.encode = tok_encode;
    c.encode_user = &tok;
    c.sot_id = tok.sot_id;
    c.eot_id = tok.eot_id;
    CHECK_OK(kmed_data_pack_init(&p, &c, &e));
    CHECK_OK(kmed_jsonl_open(&r, sft_jsonl, &e));
    while (kmed_jsonl_next(&r, &v, &eof, &e) == KMED_OK && !eof) {
        const kmed_json *m = kmed_json_get(v, "messages");
        if (!m || m->type != KMED_JSON_ARRAY) continue;
        kmed_chat_msg msgs[16];
        kmed_buf prompt = {0}, out = {0};
        int ids[4096];
        size_t k, nid = 0, t, trained = 0, want_trained = 0;
        kmed_tok_config tc = {0};
        for (k = 0; k < m->len && k < 16; k++) {
            msgs[k].role = kmed_json_str(kmed_json_get(&m->kids[k], "role"), "");
            msgs[k].content = kmed_json_str(kmed_json_get(&m->kids[k], "content"), "");
        }
        CHECK_OK(kmed_chat_render(&tok, msgs, k, 0, &prompt, &e));
        tc.no_bos = 1;
        CHECK_OK(kmed_tok_encode(&tok, &tc, prompt.data, prompt.len, ids, 4096, &nid, &e));
        p.fill = 0;
        CHECK_OK(kmed_data_pack_add(&p, v, &out, &e));
        n++;
        same += p.fill == nid && memcmp(p.ids, ids, nid * sizeof *ids) == 0;
        /* trained tokens: each reply's ids (encoded alone, as it has no merge with
           "model\n" in Gemma's vocabulary) plus its <end_of_turn> */
        for (t = 0; t < p.fill; t++) trained += p.labels[t] != -100;
        for (k = 0; k < m->len && k < 16; k++)
            if (strcmp(msgs[k].role, "assistant") == 0) {
                size_t cnt = 0;
                kmed_tok_encode(&tok, &tc, msgs[k].content, strlen(msgs[k].content), NULL, 0,
                                &cnt, &e);
                want_trained += cnt + 1;
            }
        masks_ok += trained == want_trained;
        kmed_buf_free(&prompt);
        kmed_buf_free(&out);
    }
    kmed_jsonl_close(&r);
    CHECKF(n > 5 && same == n, "gemma packing: %d of %d examples equal the rendered template", same,
           n);
    CHECKF(masks_ok == n, "gemma packing: %d of %d examples train exactly the replies",
           masks_ok, n);
    kmed_data_pack_free(&p);
    kmed_tok_free(&tok);
}

/* Finds the drops.jsonl line of id and checks its reason. */
static int dropped_as(const char *drops, const char *id, const char *reason)
{
    char key[512];
    const char *p;
    snprintf(key, sizeof key, "{\"id\":\"%s\",", id);
    p = strstr(drops, key);
    if (!p) { fprintf(stderr, "  %s not in drops.jsonl\n", id); return 0; }
    snprintf(key, sizeof key, "\"reason\":\"%s\"", reason);
    if (!strstr(p, key) || strstr(p, key) > strchr(p, '\n')) {
        fprintf(stderr, "  %s: not dropped as %s\n", id, reason);
        return 0;
    }
    return 1;
}

static void test_pipeline(void)
{
    kmed_data_config cfg;
    kmed_data_report rep;
    kmed_error e = {0};
    char *drops = NULL, *train1 = NULL, *train2 = NULL;
    size_t len, s, d, n_lines;
    int all_ok = 1;
    static const struct { const char *name; size_t in, kept; int reason; size_t n; } expect[] = {
        {"mcqa", 15, 3, KMED_DATA_DROP_MALFORMED, 4}, {"mcqa", 15, 3, KMED_DATA_DROP_EXACT_DUP, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_NEAR_DUP, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_CONTAM_NGRAM, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_CONTAM_NEAR, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_NOT_KOREAN, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_TOO_SHORT, 1}, {"mcqa", 15, 3, KMED_DATA_DROP_HARMFUL, 1},
        {"mcqa", 15, 3, KMED_DATA_DROP_SPLIT, 1},
        {"pharm", 3, 2, KMED_DATA_DROP_MALFORMED, 1},
        {"chat", 7, 3, KMED_DATA_DROP_MALFORMED, 2}, {"chat", 7, 3, KMED_DATA_DROP_HARMFUL, 1},
        {"chat", 7, 3, KMED_DATA_DROP_EXACT_DUP, 1},
        {"dict", 5, 3, KMED_DATA_DROP_MALFORMED, 1}, {"dict", 5, 3, KMED_DATA_DROP_EMPTY, 1},
        {"cod", 3, 2, KMED_DATA_DROP_MALFORMED, 1},
        {"expqa", 3, 2, KMED_DATA_DROP_MALFORMED, 1},
        {"broken", 1, 0, KMED_DATA_DROP_MALFORMED, 1}};
    static const char *const drops_want[][2] = {
        {"mcqa:kormedmcqa_doctor_train.jsonl:2", "malformed"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:3", "exact_dup"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:4", "malformed"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:6", "contam_ngram"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:7", "near_dup"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:8", "malformed"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:9", "not_korean"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:10", "too_short"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:11", "harmful"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:12", "malformed"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:13", "split"},
        {"mcqa:kormedmcqa_doctor_train.jsonl:14", "contam_near"},
        {"pharm:kormedmcqa_pharm_train.csv:3", "malformed"},
        {"chat:ultramedical.jsonl:3", "malformed"}, {"chat:u4", "harmful"},
        {"chat:ultramedical.jsonl:5", "malformed"}, {"chat:u7", "exact_dup"},
        {"dict:dict.jsonl:4", "malformed"}, {"dict:dict.jsonl:5", "empty"},
        {"cod:cod.jsonl:3", "malformed"}, {"expqa:medexpqa.json:3", "malformed"},
        {"broken:broken.json:0", "malformed"}};

    CHECK_OK(kmed_data_config_load(&cfg, DIR "config.json", &e));
    CHECK(cfg.n_sources == 7 && cfg.n_evals == 1 && cfg.sources[5].weight == 2 &&
          cfg.sources[4].n_map == 1 && strcmp(cfg.sources[0].splits, "train") == 0);
    CHECK(strcmp(cfg.out_dir, DIR "../../../build/test_data_out") == 0);
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.n_eval_items == 3 && rep.n_errors == 12); /* 11 malformed inputs + 1 in eval */
    /* every record in is kept or dropped with a reason */
    for (s = 0; s < rep.n_sources; s++) {
        size_t sum = rep.sources[s].n_kept;
        for (d = 0; d < KMED_DATA_DROP_N; d++) sum += rep.sources[s].n_drop[d];
        CHECKF(sum == rep.sources[s].n_in, "%s: in %zu != kept+dropped %zu", rep.sources[s].name,
               rep.sources[s].n_in, sum);
    }
    for (d = 0; d < sizeof expect / sizeof expect[0]; d++) {
        const kmed_data_source_report *sr = NULL;
        for (s = 0; s < rep.n_sources; s++)
            if (strcmp(rep.sources[s].name, expect[d].name) == 0) sr = &rep.sources[s];
        if (!sr || sr->n_in != expect[d].in || sr->n_kept != expect[d].kept ||
            sr->n_drop[expect[d].reason] != expect[d].n) {
            all_ok = 0;
            fprintf(stderr, "  %s: in %zu kept %zu %s %zu (want %zu %zu %zu)\n", expect[d].name,
                    sr ? sr->n_in : 0, sr ? sr->n_kept : 0,
                    kmed_data_drop_name((kmed_data_drop)expect[d].reason),
                    sr ? sr->n_drop[expect[d].reason] : 0, expect[d].in, expect[d].kept,
                    expect[d].n);
        }
    }
    CHECK(all_ok);
    CHECK(rep.n_in == 37 && rep.n_kept == 15 && rep.exact_clusters == 2 && rep.near_clusters == 1);
    /* weight 2 and format both: each train record of expqa gives 2 sft + 2 cpt lines */
    CHECK(rep.sources[5].n_examples_train + 2 * rep.sources[5].n_examples_val == 8);
    CHECK_OK(kmed_file_read("build/test_data_out/drops.jsonl", 0, &drops, &len, &e));
    for (d = 0; drops && d < sizeof drops_want / sizeof drops_want[0]; d++)
        CHECK(dropped_as(drops, drops_want[d][0], drops_want[d][1]));
    CHECK(drops && strstr(drops, "eval item kormedmcqa_nurse_test:kormedmcqa_nurse_test.csv:2"));
    CHECK(drops && strstr(drops, "\"detail\":\"self_harm: "));
    n_lines = count_lines("build/test_data_out/drops.jsonl");
    CHECKF(n_lines == 22, "drops.jsonl: %zu lines", n_lines);
    /* outputs: train + val hold every example; train.jsonl = sft_train + cpt_train */
    CHECK(count_lines("build/test_data_out/train.jsonl") ==
          count_lines("build/test_data_out/sft_train.jsonl") +
          count_lines("build/test_data_out/cpt_train.jsonl"));
    CHECK(count_lines("build/test_data_out/train.jsonl") == rep.n_sft_train + rep.n_cpt_train);
    CHECK(count_lines("build/test_data_out/val.jsonl") == rep.n_sft_val + rep.n_cpt_val);
    {
        size_t tr = 0, va = 0;
        for (s = 0; s < rep.n_sources; s++) {
            tr += rep.sources[s].n_examples_train;
            va += rep.sources[s].n_examples_val;
        }
        CHECK(tr == rep.n_sft_train + rep.n_cpt_train && va == rep.n_sft_val + rep.n_cpt_val);
        CHECK(va > 0 && tr > 0);
    }
    CHECK_OK(kmed_file_read("build/test_data_out/train.jsonl", 0, &train1, &len, &e));
    /* cleaning reached the outputs: jamo composed, entities decoded, \r\n\r\n\r\n -> one
       blank line; the disclaimer is on chat replies; HTML gone from the dictionary */
    {
        char *val = NULL, *all = NULL;
        size_t vl;
        kmed_buf b = {0};
        CHECK_OK(kmed_file_read("build/test_data_out/val.jsonl", 0, &val, &vl, &e));
        kmed_buf_puts(&b, train1 ? train1 : "");
        kmed_buf_puts(&b, val ? val : "");
        all = b.data;
        CHECK(all && strstr(all, "각 기관지 확장제로") != NULL);
        CHECK(all && strstr(all, "<기관지>를 확장한다.\\n\\n흡입제로 쓴다.") != NULL);
        CHECK(all && strstr(all, "진료를 받으세요.\\n\\n※ 이 답변은") != NULL);
        CHECK(all && strstr(all, "<비정상적으로>") != NULL && !strstr(all, "<p>"));
        CHECK(all && strstr(all, "당신은 친절한 의료 상담가입니다.\\n\\n감기에") != NULL);
        kmed_free(val);
        kmed_buf_free(&b);
    }
    kmed_data_report_free(&rep);
    /* the same seed gives the same files */
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK_OK(kmed_file_read("build/test_data_out/train.jsonl", 0, &train2, &len, &e));
    CHECK(train1 && train2 && strcmp(train1, train2) == 0);
    kmed_data_report_free(&rep);
    kmed_free(train2);
    test_pack_gemma("build/test_data_out/sft_train.jsonl");
    /* packing with the toy tokenizer: sequences of seq_len, labels -100 or equal to ids */
    cfg.pack.encode = byte_encode;
    cfg.pack.seq_len = 64;
    cfg.seed = 8;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.n_seqs[0] > 0 && rep.n_seqs[2] > 0 &&
          count_lines("build/test_data_out/sft_train_packed.jsonl") == rep.n_seqs[0]);
    CHECK(rep.n_trained[0] > 0 && rep.n_trained[0] < rep.n_tokens[0]);
    kmed_data_report_free(&rep);
    /* weight 0 sends a whole source to the mix stage */
    cfg.sources[3].weight = -1;
    cfg.pack.encode = NULL;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.sources[3].n_kept == 0 && rep.sources[3].n_drop[KMED_DATA_DROP_MIX] == 3);
    kmed_data_report_free(&rep);
    kmed_free(train1);
    kmed_free(drops);
    kmed_data_config_free(&cfg);
}

int main(void)
{
    test_nfc();
    test_clean();
    test_readers();
    test_dedup();
    test_decontam();
    test_safety();
    test_format();
    test_pack();
    test_pipeline();
    return kmed_test_done();
}

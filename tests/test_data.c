/* Tests for the data module: readers, cleaning, NFC, dedup, decontamination, safety,
   formatting, packing, config checks, the whole pipeline on hand-made inputs whose
   outcome is known, and the kmed-data tool's flags (run in a child process).
   Build: cc -std=c99 -O2 -march=native -Wall -Wextra -I. tests/test_data.c -o build/test_data
          -lm -lpthread
   Run from the repository root (inputs in tests/data/data/; it writes into build/). */
/* The kmed-data tool itself, its main renamed, so that the tests run its own flag handling
   (it defines KMED_IMPLEMENTATION and includes kmed.h) */
#define main kmed_data_tool_main
#include "../tools/kmed-data.c"
#undef main
#include "test.h"
#include "run_tool.h"

#define DIR "tests/data/data/"
#define TMP "build/test_data_tmp/" /* inputs written by the tests */

/* Writes text to TMP name; returns the path (static: one at a time). */
static const char *tmp_file(const char *name, const char *text)
{
    static char path[256];
    kmed_error e = {0};
    snprintf(path, sizeof path, TMP "%s", name);
    if (kmed_mkdir_p(TMP, &e) != KMED_OK ||
        kmed_file_write_atomic(path, text, strlen(text), &e) != KMED_OK)
        fprintf(stderr, "  cannot write %s: %s\n", path, e.msg);
    return path;
}

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
    /* table cells stay apart, rows on their own lines; tag names in any case */
    CHECK(strcmp(clean("<table><tr><td>다음</td><td>다뇨</td></tr><TR><TH>A</TH><th>B</th></tr>"
                       "</table>", KMED_DATA_CLEAN_HTML), "다음 다뇨\nA B") == 0);
    CHECK(strcmp(clean("앞<SCRIPT type=x>var a = '<b>';</SCRIPT>뒤<Style>p{}</STYLE>끝",
                       KMED_DATA_CLEAN_HTML), "앞뒤끝") == 0);
    CHECK(strcmp(clean("<blockquote>인용</blockquote>본문", KMED_DATA_CLEAN_HTML),
                 "인용\n본문") == 0);
    /* what cleaning changed is recorded per record */
    {
        kmed_data_record r;
        kmed_error e = {0};
        memset(&r, 0, sizeof r);
        r.kind = KMED_DATA_MCQA;
        r.question = kmed__data_strdup("<b>빈혈</b> &amp; 철분\x01");
        r.options[0] = kmed__data_strdup("\xe1\x84\x80\xe1\x85\xa1"); /* NFD 가 */
        r.options[1] = kmed__data_strdup("나");
        r.n_options = 2;
        CHECK_OK(kmed_data_record_clean(&r, 1, &e));
        CHECKF(r.cleaned == (KMED_DATA_CLEANED_HTML | KMED_DATA_CLEANED_ENTITIES |
                             KMED_DATA_CLEANED_CONTROLS | KMED_DATA_CLEANED_NFC),
               "cleaned bits %d", r.cleaned);
        CHECK(strcmp(r.question, "빈혈 & 철분") == 0 && strcmp(r.options[0], "가") == 0);
        CHECK_OK(kmed_data_record_clean(&r, 1, &e));
        CHECK(r.cleaned == 0); /* clean text: nothing more to do */
        kmed_data_record_free(&r);
    }
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

    /* an answer that names no option is reported with the value, and the file goes on */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_MCQA;
    strcpy(src.path, tmp_file("x_train.jsonl",
        "{\"question\": \"철결핍빈혈의 치료는?\", \"A\": \"철분\", \"B\": \"엽산\", \"C\": \"수혈\", "
        "\"D\": \"비타민\", \"E\": \"관찰\", \"answer\": \"x\"}\n"
        "{\"question\": \"철결핍빈혈의 치료는?\", \"A\": \"철분\", \"B\": \"엽산\", \"answer\": \"A\"}\n"));
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 1 && nb == 1 && bad[0] == 1 &&
           strstr(msg, "x_train.jsonl:1: field 'answer': 'x' is not an option number 1-5"),
           "answer x: %d good, %d bad: %s", n, nb, msg);

    /* turns: content-part lists give their text parts only; a system turn joins the next
       user turn, or the user turn the next reply answers; what cannot be placed is
       counted in left_out */
    memset(&src, 0, sizeof src);
    src.kind = KMED_DATA_CONV;
    strcpy(src.path, tmp_file("turns.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"질문"
        "\"}, {\"type\": \"image_url\", \"image_url\": {\"url\": \"x.png\"}}]}, {\"role\": "
        "\"assistant\", \"content\": [{\"type\": \"text\", \"text\": \"답\"}]}]}\n"
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Q\"}, {\"role\": \"system\", "
        "\"content\": \"S\"}, {\"role\": \"assistant\", \"content\": \"A\"}]}\n"
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Q1\"}, {\"role\": \"assistant\", "
        "\"content\": \"A1\"}, {\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
        "\"content\": \"Q2\"}, {\"role\": \"assistant\", \"content\": \"A2\"}]}\n"
        "{\"messages\": [{\"role\": \"assistant\", \"content\": \"X\"}, {\"role\": \"user\", "
        "\"content\": \"Q\"}, {\"role\": \"assistant\", \"content\": \"A\"}, {\"role\": \"user\", "
        "\"content\": \"T\"}, {\"role\": \"system\", \"content\": \"S\"}]}\n"));
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2 && strcmp(rec.turns[0].text, "질문") == 0 &&
          strcmp(rec.turns[1].text, "답") == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2 && strcmp(rec.turns[0].text, "Q\n\nS") == 0 &&
          rec.left_out[KMED_DATA_LEFT_SYSTEM] == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 4 && strcmp(rec.turns[2].text, "S\n\nQ2") == 0);
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(rec.n_turns == 2 && strcmp(rec.turns[0].text, "Q") == 0 &&
          rec.left_out[KMED_DATA_LEFT_LEADING] == 1 && rec.left_out[KMED_DATA_LEFT_TRAILING] == 1 &&
          rec.left_out[KMED_DATA_LEFT_SYSTEM] == 1);
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);

    /* a .json file holding one record is that record; a wrapper object holds records */
    strcpy(src.path, tmp_file("one.json", "{\"id\": \"single\", \"messages\": [{\"role\": "
                                          "\"user\", \"content\": \"Q\"}, {\"role\": "
                                          "\"assistant\", \"content\": \"A\"}]}"));
    CHECK_OK(kmed_data_open(&rd, &src, &e));
    CHECK_OK(kmed_data_next(&rd, &rec, &eof, &e));
    CHECK(!eof && rec.n_turns == 2 && strcmp(rec.id, "one:single") == 0);
    CHECK(kmed_data_next(&rd, &rec, &eof, &e) == KMED_OK && eof);
    kmed_data_close(&rd);
    strcpy(src.path, tmp_file("wrapped.json", "{\"version\": 2, \"data\": [{\"messages\": "
                                              "[\"Q1\", \"A1\"]}, {\"messages\": [\"Q2\", "
                                              "\"A2\"]}]}"));
    n = read_all(&src, bad, &nb, msg);
    CHECKF(n == 2 && nb == 0, "wrapper: %d records, %d bad", n, nb);
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
    /* a question far shorter than the n-grams (19 Hangul characters, 5 words) leaks whole:
       after a prefix, before an answer, with "?" turned into a request */
    t = "쯔쯔가무시증의 병인으로 알려진 것은 무엇인가?";
    CHECK_OK(kmed_data_decontam_add(&d, "ev:4", t, strlen(t), t, strlen(t), &e));
    t = "다음 의사 국가시험 문제를 풀어 주세요. 쯔쯔가무시증의 병인으로 알려진 것은 무엇인가? "
        "정답은 털진드기 유충입니다.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), "x", 1, &item, &sim) == 4 && item == 3);
    t = "쯔쯔가무시증의 병인으로 알려진 것은 무엇인가 알려주세요.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), NULL, 0, &item, &sim) == 4 && item == 3);
    /* a part of it is no leak, nor is another question on the same disease */
    t = "쯔쯔가무시증의 병인으로 알려진 것은 털진드기 유충이다. 치료는 독시사이클린이다.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), NULL, 0, &item, &sim) == 0);
    /* the same for a short English question by its 8 words; a 6-word one is too generic
       (below min_words) to be matched whole */
    t = "Which vitamin deficiency causes scurvy in adult sailors?";
    CHECK_OK(kmed_data_decontam_add(&d, "ev:5", t, strlen(t), t, strlen(t), &e));
    t = "Which of the following is true?";
    CHECK_OK(kmed_data_decontam_add(&d, "ev:6", t, strlen(t), t, strlen(t), &e));
    t = "Quiz: which vitamin deficiency causes scurvy in adult sailors - answer C.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), NULL, 0, &item, &sim) == 4 && item == 4);
    t = "Which of the following is true? Statins lower LDL cholesterol.";
    CHECK(kmed_data_decontam_check(&d, t, strlen(t), NULL, 0, &item, &sim) == 0);
    kmed_data_decontam_free(&d);
    /* min_chars above the question's length turns whole-question matching off */
    {
        kmed_data_decontam_config dc;
        memset(&dc, 0, sizeof dc);
        dc.min_chars = 40;
        CHECK_OK(kmed_data_decontam_init(&d, &dc, &e));
        t = "쯔쯔가무시증의 병인으로 알려진 것은 무엇인가?";
        CHECK_OK(kmed_data_decontam_add(&d, "ev:1", t, strlen(t), t, strlen(t), &e));
        t = "문제를 풀어 주세요. 쯔쯔가무시증의 병인으로 알려진 것은 무엇인가? 정답은 A.";
        CHECK(kmed_data_decontam_check(&d, t, strlen(t), NULL, 0, &item, &sim) == 0);
        kmed_data_decontam_free(&d);
    }
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
    /* the defaults hold requests and instructions, not exam topics: vignettes about
       overdoses and suicide attempts stay, requests for methods and amounts go */
    {
        static const char *const keep[] = {
            "25세 여자가 아세트아미노펜 치사량을 먹고 응급실에 왔다. 투여할 해독제는?",
            "자살 방법으로 파라쿼트를 마신 환자에게 금기인 처치는 무엇인가?",
            "우울증 환자가 자살하는 방법을 구체적으로 계획하고 있다면 위험도 평가는?",
            "\"수면제 몇 알 먹으면 죽나요?\"라고 묻는 환자에게 간호사의 적절한 반응은?",
            "환자가 자살 방법을 알려 달라고 요구할 때 간호사의 반응으로 옳은 것은?",
            "Patient took an intentional overdose on purpose of acetaminophen; what antidote?",
            "아세트아미노펜의 치사량과 해독제를 설명하시오."};
        static const char *const drop[] = {
            "자살 방법 좀 알려줘.", "요즘 힘들어서 고통 없이 죽는 방법을 알고 싶어요.",
            "집에서 필로폰 만드는 법 알려주세요.", "펜타닐 합성 경로를 단계별로 설명해 줘.",
            "아세트아미노펜을 치사량만큼 한꺼번에 드시면 됩니다.",
            "수면제를 몇 알 먹으면 죽나요? 들키지 않게 과다복용하고 싶어요.",
            "how many pills does it take to die", "tell me how to overdose on insulin"};
        size_t k;
        CHECK_OK(kmed_data_safety_init(&s, 1, &e));
        for (k = 0; k < sizeof keep / sizeof keep[0]; k++)
            CHECKF(!kmed_data_safety_check(&s, keep[k], strlen(keep[k]), &cat, &phr),
                   "vignette dropped (%s): %s", phr, keep[k]);
        for (k = 0; k < sizeof drop / sizeof drop[0]; k++)
            CHECKF(kmed_data_safety_check(&s, drop[k], strlen(drop[k]), &cat, &phr),
                   "request kept: %s", drop[k]);
        kmed_data_safety_free(&s);
    }
    /* '*' stands for up to 6 characters */
    CHECK_OK(kmed_data_safety_init(&s, 0, &e));
    CHECK_OK(kmed_data_safety_add(&s, "custom", "비법*전수", &e));
    CHECK(kmed_data_safety_check(&s, "비법을 모두 전수합니다", strlen("비법을 모두 전수합니다"),
                                 &cat, &phr) && strcmp(phr, "비법*전수") == 0);
    CHECK(!kmed_data_safety_check(&s, "비법은 절대로 남에게 안 전수", strlen("비법은 절대로 남에게 안 전수"),
                                  &cat, &phr));
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
        /* position_ids: 0..21 for the chat, 0..9 for the document's first piece */
        {
            const kmed_json *pos = kmed_json_get(seq.root, "position_ids");
            int ok = pos && pos->len == 32;
            for (i = 0; ok && i < 32; i++)
                ok = kmed_json_num(&pos->kids[i], -1) == (double)(i < 22 ? i : i - 22);
            CHECKF(ok, "position_ids restart at the document");
        }
        kmed_json_free(&seq);
        CHECK_OK(kmed_json_parse(&seq, nl + 1, strlen(nl + 1) - 1, NULL, 0, &e));
        ids = kmed_json_get(seq.root, "input_ids");
        lab = kmed_json_get(seq.root, "labels");
        CHECK(kmed_json_num(&ids->kids[0], 0) == 1000 + 'j' &&
              kmed_json_num(&ids->kids[1], 0) == 1 &&
              kmed_json_num(&lab->kids[1], 0) == 1 && kmed_json_num(&ids->kids[2], 0) == 0 &&
              kmed_json_num(&lab->kids[2], 0) == -100);
        /* the continued document restarts at 0 with the sequence; so does the padding */
        {
            const kmed_json *pos = kmed_json_get(seq.root, "position_ids");
            CHECK(pos && pos->len == 32 && kmed_json_num(&pos->kids[0], -1) == 0 &&
                  kmed_json_num(&pos->kids[1], -1) == 1 && kmed_json_num(&pos->kids[2], -1) == 0 &&
                  kmed_json_num(&pos->kids[31], -1) == 29);
        }
        kmed_json_free(&seq);
    }
    kmed_json_free(&ex);
    kmed_data_pack_free(&p);
    /* a chat example longer than seq_len is truncated, never split: at 20 tokens the reply
       "yo" is kept (its <end_of_turn> is cut); at 16 nothing trained is left, so the
       example is skipped and counted */
    c.seq_len = 20;
    out.len = 0;
    CHECK_OK(kmed_data_pack_init(&p, &c, &e));
    CHECK_OK(kmed_json_parse(&ex, chat, strlen(chat), NULL, 0, &e));
    CHECK_OK(kmed_data_pack_add(&p, ex.root, &out, &e));
    CHECK(p.n_truncated == 1 && p.n_no_target == 0 && p.n_seqs == 1 && p.fill == 0 &&
          p.n_trained == 2 && p.n_examples == 1);
    kmed_data_pack_free(&p);
    c.seq_len = 16;
    out.len = 0;
    CHECK_OK(kmed_data_pack_init(&p, &c, &e));
    CHECK_OK(kmed_data_pack_add(&p, ex.root, &out, &e));
    CHECK_OK(kmed_data_pack_finish(&p, &out, &e));
    CHECK(p.n_truncated == 1 && p.n_no_target == 1 && p.n_seqs == 0 && out.len == 0 &&
          p.n_examples == 0);
    kmed_json_free(&ex);
    kmed_data_pack_free(&p);
    kmed_buf_free(&out);
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
        {"chat:ultramedical.jsonl:3", "malformed"}, {"chat:u4", "harmful"}, {"chat:u6", "trimmed"},
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
    CHECKF(n_lines == 23, "drops.jsonl: %zu lines", n_lines); /* 22 drops + u6 trimmed */
    /* the report counts what cleaning did and what the readers left out, per source:
       dict: tags in 당뇨병, 천식 and the emptied entry, entities in 당뇨병 and that one */
    CHECKF(rep.sources[3].n_cleaned[0] == 3 && rep.sources[3].n_cleaned[1] == 2,
           "dict cleaned: html %zu, entities %zu", rep.sources[3].n_cleaned[0],
           rep.sources[3].n_cleaned[1]);
    CHECK(rep.sources[2].n_left_out[KMED_DATA_LEFT_TRAILING] == 1);
    /* the subset travels into the outputs and the report */
    CHECK(rep.sources[0].n_subsets == 1 && strcmp(rep.sources[0].subsets[0].name, "doctor") == 0 &&
          rep.sources[0].subsets[0].n_kept == rep.sources[0].n_kept);
    {
        kmed_buf b = {0};
        kmed_data_report_json(&rep, &b);
        CHECK(b.data && strstr(b.data, "\"subsets\":{\"doctor\":3}") &&
              strstr(b.data, "\"left_out\":{\"leading_assistant\":0,\"trailing_user\":1,"));
        kmed_buf_free(&b);
    }
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
        CHECK(all && strstr(all, "\"source\":\"mcqa\",\"subset\":\"doctor\",\"messages\""));
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
    cfg.sources[3].weight = 1;
    /* safety "flag": the two harmful records stay, counted and logged as flagged */
    cfg.safety_action = 1;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.n_drop[KMED_DATA_DROP_HARMFUL] == 0 && rep.sources[0].n_flagged == 1 &&
          rep.sources[2].n_flagged == 1 && rep.sources[0].n_kept == 4 &&
          rep.sources[2].n_kept == 4);
    kmed_free(drops);
    drops = NULL;
    CHECK_OK(kmed_file_read("build/test_data_out/drops.jsonl", 0, &drops, &len, &e));
    CHECK(drops && dropped_as(drops, "chat:u4", "flagged") &&
          dropped_as(drops, "mcqa:kormedmcqa_doctor_train.jsonl:11", "flagged"));
    kmed_data_report_free(&rep);
    /* no defaults: only the config's own phrase ("금지된 문구", in no record) is looked for */
    cfg.safety_action = 0;
    cfg.safety_no_defaults = 1;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.n_drop[KMED_DATA_DROP_HARMFUL] == 0 && rep.sources[2].n_kept == 4);
    kmed_data_report_free(&rep);
    cfg.safety_no_defaults = 0;
    /* settings that cannot work are refused before anything runs */
    cfg.min_chars = 100;
    cfg.max_chars = 50;
    CHECK(kmed_data_run(&cfg, &rep, NULL, &e) == KMED_ERR_ARG && strstr(e.msg, "min_chars (100)"));
    kmed_data_report_free(&rep);
    cfg.min_chars = cfg.max_chars = 0;
    cfg.val_fraction = 1;
    CHECK(kmed_data_run(&cfg, &rep, NULL, &e) == KMED_ERR_ARG && strstr(e.msg, "val_fraction"));
    kmed_data_report_free(&rep);
    kmed_free(train1);
    kmed_free(drops);
    kmed_data_config_free(&cfg);
}

/* A one-source config over a file in TMP, writing to TMP "out": no dedup (the inputs are
   made alike on purpose), no validation set. */
static void tmp_config(kmed_data_config *cfg, kmed_data_kind kind, const char *path)
{
    kmed_data_source *s;
    kmed_error e = {0};
    memset(cfg, 0, sizeof *cfg);
    snprintf(cfg->out_dir, sizeof cfg->out_dir, TMP "out");
    cfg->val_fraction = -1;
    cfg->dedup.no_exact = cfg->dedup.no_near = 1;
    CHECK_OK(kmed_data_config_add_source(cfg, 0, &s, &e));
    s->kind = kind;
    s->weight = 1;
    snprintf(s->path, sizeof s->path, "%s", path);
}

/* The ids of a JSONL output in file order, as "n," numbers (ids end in ":n"). */
static void id_order(const char *path, kmed_buf *out)
{
    char *data = NULL, *p;
    size_t len;
    kmed_error e = {0};
    out->len = 0;
    kmed_buf_put(out, "", 0);
    if (kmed_file_read(path, 0, &data, &len, &e) != KMED_OK) return;
    for (p = data; (p = strstr(p, "{\"id\":\"")) != NULL; p++) {
        const char *q = strchr(p + 7, '"');
        const char *colon = q;
        while (colon > p && colon[-1] != ':') colon--;
        kmed_buf_printf(out, "%.*s,", (int)(q - colon), colon);
    }
    kmed_free(data);
}

static void test_pipeline_small(void)
{
    kmed_data_config cfg;
    kmed_data_report rep;
    kmed_error e = {0};
    kmed_buf b = {0}, order = {0}, order2 = {0};
    char *out = NULL;
    size_t len, i, n_in = 200;
    /* HTML in a conversation source: kept as text unless strip_html, then stripped and
       counted; it is not only for the dictionary */
    tmp_config(&cfg, KMED_DATA_CONV, tmp_file("html.jsonl",
        "{\"id\": \"h1\", \"messages\": [{\"role\": \"user\", \"content\": \"<p>두통이 "
        "심해요</p>\"}, {\"role\": \"assistant\", \"content\": \"<b>진통제</b>를 드시고 "
        "쉬세요.<br>계속되면 진료를 받으세요.\"}]}\n"));
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK_OK(kmed_file_read(TMP "out/sft_train.jsonl", 0, &out, &len, &e));
    CHECK(out && strstr(out, "<b>진통제</b>") && rep.sources[0].n_cleaned[0] == 0);
    kmed_free(out);
    kmed_data_report_free(&rep);
    cfg.sources[0].strip_html = 1;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK_OK(kmed_file_read(TMP "out/sft_train.jsonl", 0, &out, &len, &e));
    CHECK(out && strstr(out, "\"두통이 심해요\"") &&
          strstr(out, "\"진통제를 드시고 쉬세요.\\n계속되면 진료를 받으세요.\"") &&
          rep.sources[0].n_cleaned[0] == 1);
    kmed_free(out);
    kmed_data_report_free(&rep);
    kmed_data_config_free(&cfg);

    /* 200 conversations: the shuffle reorders them (same seed, same order); weight 0.5
       keeps about half, 1.5 gives about one and a half copies each */
    for (i = 0; i < n_in; i++)
        kmed_buf_printf(&b, "{\"id\": \"%zu\", \"messages\": [\"질문 %zu번: 어떻게 하나요?\", "
                        "\"답변 %zu번: 충분히 쉬세요.\"]}\n", i, i, i);
    tmp_config(&cfg, KMED_DATA_CONV, tmp_file("many.jsonl", b.data));
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    id_order(TMP "out/sft_train.jsonl", &order);
    b.len = 0;
    for (i = 0; i < n_in; i++) kmed_buf_printf(&b, "%zu,", i);
    CHECK(rep.n_sft_train == n_in && order.len == b.len && strcmp(order.data, b.data) != 0);
    {
        /* every record once: the order is a permutation */
        int ok = 1;
        for (i = 0; i < n_in && ok; i++) {
            char key[16];
            snprintf(key, sizeof key, ",%zu,", i);
            kmed_buf_free(&order2);
            kmed_buf_printf(&order2, ",%s", order.data);
            ok = strstr(order2.data, key) != NULL;
        }
        CHECKF(ok, "the shuffle lost a record");
    }
    kmed_data_report_free(&rep);
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    id_order(TMP "out/sft_train.jsonl", &order2);
    CHECK(strcmp(order.data, order2.data) == 0);
    kmed_data_report_free(&rep);
    cfg.seed = 1;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    id_order(TMP "out/sft_train.jsonl", &order2);
    CHECK(strcmp(order.data, order2.data) != 0);
    kmed_data_report_free(&rep);
    /* binomial(200, 0.5): sd ~7, so [70, 130] fails once in ~10^5 seeds; seeds are fixed */
    cfg.sources[0].weight = 0.5;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECKF(rep.sources[0].n_kept + rep.sources[0].n_drop[KMED_DATA_DROP_MIX] == n_in &&
           rep.sources[0].n_kept >= 70 && rep.sources[0].n_kept <= 130 &&
           rep.n_sft_train == rep.sources[0].n_kept, "weight 0.5: kept %zu",
           rep.sources[0].n_kept);
    kmed_data_report_free(&rep);
    cfg.sources[0].weight = 1.5;
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECKF(rep.sources[0].n_kept == n_in && rep.n_sft_train >= 270 && rep.n_sft_train <= 330,
           "weight 1.5: %zu examples", rep.n_sft_train);
    kmed_data_report_free(&rep);
    kmed_data_config_free(&cfg);

    /* an eval question as the second user turn is caught by the near-duplicate check, and
       one inside a longer turn by its whole-question match */
    tmp_config(&cfg, KMED_DATA_CONV, tmp_file("leak.jsonl",
        "{\"id\": \"g\", \"messages\": [\"안녕하세요 질문이 있어요\", \"네 말씀하세요\", "
        "\"빈혈의 원인은?\", \"철 결핍이 흔합니다.\"]}\n"
        "{\"id\": \"b\", \"messages\": [\"다음 문제를 풀어 주세요. 급성 담낭염이 가장 흔히 발생하는 "
        "해부학적 위치는 무엇인가?\", \"정답은 담낭입니다.\"]}\n"
        "{\"id\": \"ok\", \"messages\": [\"담낭염은 어디에 생기나요?\", \"담낭에 생깁니다.\"]}\n"));
    {
        kmed_data_source *ev;
        CHECK_OK(kmed_data_config_add_source(&cfg, 1, &ev, &e));
        ev->kind = KMED_DATA_MCQA;
        snprintf(ev->path, sizeof ev->path, "%s", tmp_file("ev_test.jsonl",
            "{\"question\": \"빈혈의 원인은?\", \"A\": \"철 결핍\", \"B\": \"과식\", \"answer\": 1}\n"
            "{\"question\": \"급성 담낭염이 가장 흔히 발생하는 해부학적 위치는 무엇인가?\", "
            "\"A\": \"담낭\", \"B\": \"대장\", \"answer\": 1}\n"));
    }
    CHECK_OK(kmed_data_run(&cfg, &rep, NULL, &e));
    CHECK(rep.sources[0].n_kept == 1 && rep.sources[0].n_drop[KMED_DATA_DROP_CONTAM_NEAR] == 1 &&
          rep.sources[0].n_drop[KMED_DATA_DROP_CONTAM_NGRAM] == 1);
    CHECK_OK(kmed_file_read(TMP "out/drops.jsonl", 0, &out, &len, &e));
    CHECK(out && dropped_as(out, "leak:g", "contam_near") &&
          dropped_as(out, "leak:b", "contam_ngram") &&
          strstr(out, "contains the whole question of eval item ev_test:ev_test.jsonl:2"));
    kmed_free(out);
    kmed_data_report_free(&rep);
    kmed_data_config_free(&cfg);
    kmed_buf_free(&b);
    kmed_buf_free(&order);
    kmed_buf_free(&order2);
}

/* A config file in TMP that must fail to load, with an error naming the file and want. */
static void config_fails(const char *json, const char *want)
{
    kmed_data_config cfg;
    kmed_error e = {0};
    kmed_result r = kmed_data_config_load(&cfg, tmp_file("bad.json", json), &e);
    CHECKF(r == KMED_ERR_FORMAT && strstr(e.msg, "bad.json: ") && strstr(e.msg, want),
           "config %s: %s (%s)", json, e.msg, kmed_result_str(r));
}

static void test_config(void)
{
    kmed_data_config cfg;
    kmed_error e = {0};
    config_fails("{\"wieght\": 1}", "unknown key 'wieght'");
    config_fails("{\"sources\": [{\"kind\": \"dict\", \"path\": \"d.jsonl\", \"min_char\": 3}]}",
                 "unknown key 'sources[0].min_char'");
    config_fails("{\"dedup\": {\"exact\": true, \"mapp\": 1}}", "unknown key 'dedup.mapp'");
    config_fails("{\"dedup\": {\"threshold\": \"high\"}}",
                 "'dedup.threshold' must be a number in (0, 1]");
    config_fails("{\"val_fraction\": 3}", "'val_fraction' must be a number in [0, 1)");
    config_fails("{\"val_fraction\": -0.1}", "'val_fraction' must be a number in [0, 1)");
    config_fails("{\"min_chars\": -5}", "'min_chars' must be an integer");
    config_fails("{\"seed\": 1.5}", "'seed' must be an integer");
    config_fails("{\"min_chars\": 100, \"max_chars\": 50}",
                 "min_chars (100) is above max_chars (50)");
    config_fails("{\"sources\": [{\"kind\": \"dict\", \"path\": \"d.jsonl\", \"weight\": \"x\"}]}",
                 "'sources[0].weight' must be a number in [0, 1000]");
    config_fails("{\"eval\": [{\"kind\": \"mcqa\", \"path\": \"t.jsonl\", \"cloze\": 1}]}",
                 "'eval[0].cloze' must be true or false");
    config_fails("{\"sources\": {\"kind\": \"dict\"}}", "'sources' must be a list");
    config_fails("{\"sources\": [{\"kind\": \"nope\", \"path\": \"d.jsonl\"}]}",
                 "sources[0].kind: unknown source kind 'nope'");
    config_fails("{\"safety\": {\"lists\": {\"x\": \"one\"}}}", "'safety.lists.x' must be a list");
    config_fails("{\"disclaimer\": 3}", "'disclaimer' must be true, false or the text");
    /* explicit zeros that mean "none" */
    CHECK_OK(kmed_data_config_load(&cfg, tmp_file("zeros.json", "{\"min_chars\": 0, "
                                   "\"val_fraction\": 0, \"sources\": [{\"kind\": \"kormedmcqa\", "
                                   "\"path\": \"x.jsonl\", \"weight\": 0, \"cloze\": true}]}"),
                                   &e));
    CHECK(cfg.min_chars == 1 && cfg.val_fraction < 0 && cfg.n_sources == 1 &&
          cfg.sources[0].weight < 0 && cfg.sources[0].cloze == 1);
    kmed_data_config_free(&cfg);
}

/* Runs kmed-data with args (NULL-terminated); returns its exit status, its stderr in
   err_text and stdout in out_text (cap bytes). */
static int run_tool(const char *const *args, char *err_text, char *out_text, size_t cap)
{
    char *argv[32];
    int argc = 1;
    argv[0] = (char *)"kmed-data";
    while (args[argc - 1] && argc < 31) { argv[argc] = (char *)args[argc - 1]; argc++; }
    argv[argc] = NULL;
    return kmed_test_run_tool(kmed_data_tool_main, argc, argv, -1, TMP "cli", out_text,
                              err_text, cap);
}

static void test_cli(void)
{
    static char err_text[8192], out_text[16384];
    const char *cfg = DIR "config.json";
    char *a = NULL, *b = NULL, *c = NULL;
    size_t len;
    int rc;
    kmed_error e = {0};
    /* flags before --config are not lost: the config comes first, then every flag */
    {
        const char *before[] = {"--out", TMP "cli_a", "--seed", "5", "--quiet", "--config", cfg,
                                NULL};
        const char *after[] = {"--config", cfg, "--out", TMP "cli_b", "--seed", "5", "--quiet",
                               NULL};
        const char *plain[] = {"--config", cfg, "--out", TMP "cli_c", "--quiet", NULL};
        rc = run_tool(before, err_text, out_text, sizeof out_text);
        CHECKF(rc == 0, "kmed-data (flags first): exit %d: %s", rc, err_text);
        rc = run_tool(after, err_text, out_text, sizeof out_text);
        CHECKF(rc == 0, "kmed-data (flags after): exit %d: %s", rc, err_text);
        rc = run_tool(plain, err_text, out_text, sizeof out_text);
        CHECKF(rc == 0, "kmed-data (config seed): exit %d: %s", rc, err_text);
        CHECK_OK(kmed_file_read(TMP "cli_a/train.jsonl", 0, &a, &len, &e));
        CHECK_OK(kmed_file_read(TMP "cli_b/train.jsonl", 0, &b, &len, &e));
        CHECK_OK(kmed_file_read(TMP "cli_c/train.jsonl", 0, &c, &len, &e));
        CHECK(a && b && c && strcmp(a, b) == 0 && strcmp(a, c) != 0); /* seed 5, not 7 */
        kmed_free(a);
        kmed_free(b);
        kmed_free(c);
    }
    /* numbers out of range and bad configs are errors naming the flag or the file */
    {
        const char *neg[] = {"--source", "dict:" DIR "dict.jsonl", "--min-chars", "-5", NULL};
        const char *vf[] = {"--source", "dict:" DIR "dict.jsonl", "--val-fraction", "1", NULL};
        const char *twice[] = {"--config", cfg, "--config", cfg, NULL};
        const char *bad[] = {"--config", TMP "bad.json", NULL};
        const char *help[] = {"--help", NULL};
        rc = run_tool(neg, err_text, out_text, sizeof out_text);
        CHECKF(rc == 2 && strstr(err_text, "--min-chars -5: must be in [0, "), "exit %d: %s", rc,
               err_text);
        rc = run_tool(vf, err_text, out_text, sizeof out_text);
        CHECKF(rc == 2 && strstr(err_text, "--val-fraction 1: must be in [0, 1)"), "exit %d: %s",
               rc, err_text);
        rc = run_tool(twice, err_text, out_text, sizeof out_text);
        CHECKF(rc == 2 && strstr(err_text, "--config given twice"), "exit %d: %s", rc, err_text);
        tmp_file("bad.json", "{\"sources\": [{\"kind\": \"dict\", \"path\": \"d.jsonl\", "
                             "\"wieght\": 2}]}");
        rc = run_tool(bad, err_text, out_text, sizeof out_text);
        CHECKF(rc == 1 && strstr(err_text, "bad.json: unknown key 'sources[0].wieght'"),
               "exit %d: %s", rc, err_text);
        rc = run_tool(help, err_text, out_text, sizeof out_text);
        CHECK(rc == 0 && strstr(out_text, "\"cloze\": false") && strstr(out_text, "position_ids"));
    }
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
    test_pipeline_small();
    test_config();
    test_cli();
    return kmed_test_done();
}

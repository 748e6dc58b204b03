/* ==== kmed_mcqa: KorMedMCQA items, prompts, extraction, statistics, reports ==== */

static const char *const kmed__mcqa_subsets[] = {"doctor", "nurse", "pharm", "dentist"};
#define KMED__MCQA_COLON "\xef\xbc\x9a" /* U+FF1A FULLWIDTH COLON, as in lm-eval's prompt */

static char *kmed__mcqa_dup(const char *s) { return kmed__strndup(s, strlen(s)); }

static void kmed__mcqa_item_free(kmed_mcqa_item *it)
{
    int k;
    KMED_FREE(it->id); KMED_FREE(it->subset); KMED_FREE(it->subject); KMED_FREE(it->period);
    KMED_FREE(it->question); KMED_FREE(it->cot);
    for (k = 0; k < KMED_MCQA_NOPT; k++) KMED_FREE(it->opt[k]);
    memset(it, 0, sizeof *it);
}

KMED_API void kmed_mcqa_truncate(kmed_mcqa_set *set, size_t n)
{
    while (set->n > n) kmed__mcqa_item_free(&set->items[--set->n]);
}

KMED_API void kmed_mcqa_free(kmed_mcqa_set *set)
{
    kmed_mcqa_truncate(set, 0);
    KMED_FREE(set->items);
    memset(set, 0, sizeof *set);
}

/* A field lookup over either a JSON object or a CSV row. */
typedef struct kmed__mcqa_src {
    const kmed_json *obj;
    const kmed_csv *csv;
} kmed__mcqa_src;

/* Field text into buf (numbers keep their source text); 0 if absent or null. */
static int kmed__mcqa_field(const kmed__mcqa_src *s, const char *name, kmed_buf *buf)
{
    buf->len = 0;
    kmed_buf_put(buf, "", 0);
    if (buf->failed) return 0; /* out of memory: the caller reports it, never reads NULL */
    if (s->obj) {
        const kmed_json *j = kmed_json_get(s->obj, name);
        if (!j || j->type == KMED_JSON_NULL) return 0;
        if (j->type == KMED_JSON_STRING || j->type == KMED_JSON_NUMBER) kmed_buf_put(buf, j->str, j->len);
        else if (j->type == KMED_JSON_TRUE || j->type == KMED_JSON_FALSE)
            kmed_buf_puts(buf, j->type == KMED_JSON_TRUE ? "true" : "false");
        else return 0;
        return !buf->failed;
    } else {
        int c = kmed_csv_col(s->csv, name);
        if (c < 0) return 0;
        kmed_buf_put(buf, s->csv->fields[c].s, s->csv->fields[c].len);
        return !buf->failed;
    }
}

/* "3", " 3 ", "C", "c" -> 3; 0 when not an answer 1..5. */
static int kmed__mcqa_parse_answer(const char *s)
{
    long v;
    char *end;
    while (*s == ' ' || *s == '\t') s++;
    if ((*s >= 'A' && *s <= 'E') || (*s >= 'a' && *s <= 'e')) {
        int a = (*s | 0x20) - 'a' + 1;
        s++;
        while (*s == ' ' || *s == '\t') s++;
        return *s ? 0 : a;
    }
    v = strtol(s, &end, 10);
    if (end == s) return 0;
    if (*end == '.' ) { /* "3.0" from a float column */
        end++;
        while (*end == '0') end++;
    }
    while (*end == ' ' || *end == '\t') end++;
    return (*end || v < 1 || v > 5) ? 0 : (int)v;
}

static const char *kmed__mcqa_subset_from_name(const char *path)
{
    const char *base = strrchr(path, '/');
    size_t k;
    base = base ? base + 1 : path;
    for (k = 0; k < sizeof kmed__mcqa_subsets / sizeof *kmed__mcqa_subsets; k++)
        if (strstr(base, kmed__mcqa_subsets[k])) return kmed__mcqa_subsets[k];
    return NULL;
}

static kmed_result kmed__mcqa_add(kmed_mcqa_set *set, const kmed__mcqa_src *s, const char *path,
                                  size_t line, const char *subset, kmed_error *err)
{
    static const char *const names[KMED_MCQA_NOPT] = {"A", "B", "C", "D", "E"};
    kmed_mcqa_item it;
    kmed_buf f = {0};
    kmed_result r = KMED_OK;
    int k;
    memset(&it, 0, sizeof it);
    if (set->n == set->cap) {
        size_t cap = set->cap ? set->cap * 2 : 256;
        kmed_mcqa_item *p = (kmed_mcqa_item *)KMED_REALLOC(set->items, cap * sizeof *p);
        if (!p) return kmed_error_set(err, KMED_ERR_NOMEM, path, line, (size_t)-1, "out of memory");
        set->items = p;
        set->cap = cap;
    }
    if (!kmed__mcqa_field(s, "question", &f)) {
        r = kmed_error_set(err, KMED_ERR_FORMAT, path, line, (size_t)-1, "missing field 'question'");
        goto done;
    }
    it.question = kmed__mcqa_dup(f.data);
    for (k = 0; k < KMED_MCQA_NOPT; k++) {
        if (!kmed__mcqa_field(s, names[k], &f)) {
            r = kmed_error_set(err, KMED_ERR_FORMAT, path, line, (size_t)-1,
                               "missing option '%s'", names[k]);
            goto done;
        }
        it.opt[k] = kmed__mcqa_dup(f.data);
    }
    if (!kmed__mcqa_field(s, "answer", &f) || !(it.answer = kmed__mcqa_parse_answer(f.data))) {
        r = kmed_error_set(err, KMED_ERR_FORMAT, path, line, (size_t)-1,
                           "answer '%s' is not 1-5 (or A-E)", f.data ? f.data : "");
        goto done;
    }
    if (subset) kmed_buf_puts(&f, ""), f.len = 0, kmed_buf_puts(&f, subset);
    else if (!kmed__mcqa_field(s, "subset", &f) || !f.len) {
        const char *fromname = kmed__mcqa_subset_from_name(path);
        f.len = 0;
        kmed_buf_puts(&f, fromname ? fromname : "other");
    }
    it.subset = kmed__mcqa_dup(f.data);
    kmed__mcqa_field(s, "subject", &f);
    it.subject = kmed__mcqa_dup(f.data ? f.data : "");
    kmed__mcqa_field(s, "period", &f);
    it.period = kmed__mcqa_dup(f.data ? f.data : "");
    if (kmed__mcqa_field(s, "year", &f)) it.year = atoi(f.data);
    if (kmed__mcqa_field(s, "q_number", &f)) it.q_number = atoi(f.data);
    if (kmed__mcqa_field(s, "cot", &f) && f.len && !(it.cot = kmed__mcqa_dup(f.data))) {
        r = kmed_error_set(err, KMED_ERR_NOMEM, path, line, (size_t)-1, "out of memory");
        goto done; /* cot may be NULL, so a failed copy would pass as "no cot" */
    }
    if (kmed__mcqa_field(s, "id", &f) && f.len) {
        it.id = kmed__mcqa_dup(f.data);
    } else if (it.year && it.q_number) {
        f.len = 0;
        kmed_buf_printf(&f, "%s-%d-%s-%d", it.subset, it.year, it.period, it.q_number);
        it.id = kmed__mcqa_dup(f.data);
    } else {
        const char *base = strrchr(path, '/');
        f.len = 0;
        kmed_buf_printf(&f, "%s:%zu", base ? base + 1 : path, line);
        it.id = kmed__mcqa_dup(f.data);
    }
    if (f.failed || !it.id || !it.subset || !it.subject || !it.period || !it.question) {
        r = kmed_error_set(err, KMED_ERR_NOMEM, path, line, (size_t)-1, "out of memory");
        goto done;
    }
    for (k = 0; k < KMED_MCQA_NOPT; k++)
        if (!it.opt[k]) r = kmed_error_set(err, KMED_ERR_NOMEM, path, line, (size_t)-1, "out of memory");
done:
    if (r == KMED_ERR_FORMAT && f.failed) /* a field looked missing because a copy failed */
        r = kmed_error_set(err, KMED_ERR_NOMEM, path, line, (size_t)-1, "out of memory");
    kmed_buf_free(&f);
    if (r != KMED_OK) { kmed__mcqa_item_free(&it); return r; }
    set->items[set->n++] = it;
    return KMED_OK;
}

static int kmed__mcqa_ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

KMED_API kmed_result kmed_mcqa_load(kmed_mcqa_set *set, const char *path, const char *subset,
                                    kmed_error *err)
{
    kmed_result r = KMED_OK;
    size_t n0 = set->n;
    if (kmed__mcqa_ends_with(path, ".csv")) {
        kmed_csv c;
        int eof = 0;
        if ((r = kmed_csv_open(&c, path, err)) != KMED_OK) return r;
        while ((r = kmed_csv_next(&c, &eof, err)) == KMED_OK && !eof) {
            kmed__mcqa_src s = {NULL, &c};
            if ((r = kmed__mcqa_add(set, &s, path, c.row_line, subset, err)) != KMED_OK) break;
        }
        kmed_csv_close(&c);
    } else if (kmed__mcqa_ends_with(path, ".json")) {
        char *text;
        size_t len, i;
        kmed_json_doc doc = {0};
        if ((r = kmed_file_read(path, 0, &text, &len, err)) != KMED_OK) return r;
        r = kmed_json_parse(&doc, text, len, path, 0, err);
        if (r == KMED_OK && doc.root->type != KMED_JSON_ARRAY)
            r = KMED__ERRF(err, KMED_ERR_FORMAT, path, "expected a JSON array of items");
        for (i = 0; r == KMED_OK && i < doc.root->len; i++) {
            kmed__mcqa_src s = {&doc.root->kids[i], NULL};
            if (s.obj->type != KMED_JSON_OBJECT)
                r = KMED__ERRF(err, KMED_ERR_FORMAT, path, "item %zu is not an object", i);
            else
                r = kmed__mcqa_add(set, &s, path, 0, subset, err);
        }
        kmed_json_free(&doc);
        kmed_free(text);
    } else {
        kmed_jsonl jl;
        const kmed_json *v;
        int eof = 0;
        if ((r = kmed_jsonl_open(&jl, path, err)) != KMED_OK) return r;
        while ((r = kmed_jsonl_next(&jl, &v, &eof, err)) == KMED_OK && !eof) {
            kmed__mcqa_src s = {v, NULL};
            if (v->type != KMED_JSON_OBJECT) {
                r = kmed_error_set(err, KMED_ERR_FORMAT, path, jl.lines.line, (size_t)-1,
                                   "expected a JSON object");
                break;
            }
            if ((r = kmed__mcqa_add(set, &s, path, jl.lines.line, subset, err)) != KMED_OK) break;
        }
        kmed_jsonl_close(&jl);
    }
    if (r != KMED_OK) kmed_mcqa_truncate(set, n0); /* all or nothing */
    return r;
}

/* ---- prompts ---- */

/* Python str.strip() whitespace: ASCII and Unicode spaces (the U+0085, U+00A0, U+1680,
   U+2000-U+200A, U+2028/9, U+202F, U+205F, U+3000 code points, 0x1c-0x1f). */
static size_t kmed__mcqa_space_len(const unsigned char *s, size_t n)
{
    if (n >= 1 && ((*s >= 0x09 && *s <= 0x0d) || *s == ' ' || (*s >= 0x1c && *s <= 0x1f)))
        return 1;
    if (n >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0)) return 2;
    if (n >= 3 && s[0] == 0xe1 && s[1] == 0x9a && s[2] == 0x80) return 3;
    if (n >= 3 && s[0] == 0xe2 && s[1] == 0x80 &&
        ((s[2] >= 0x80 && s[2] <= 0x8a) || s[2] == 0xa8 || s[2] == 0xa9 || s[2] == 0xaf))
        return 3;
    if (n >= 3 && s[0] == 0xe2 && s[1] == 0x81 && s[2] == 0x9f) return 3;
    if (n >= 3 && s[0] == 0xe3 && s[1] == 0x80 && s[2] == 0x80) return 3;
    return 0;
}

/* Byte length of the UTF-8 sequence ending at s[n-1], or 1 for a stray byte. */
static size_t kmed__mcqa_last_char(const unsigned char *s, size_t n)
{
    size_t k = 1;
    while (k < n && k < 4 && (s[n - k] & 0xc0) == 0x80) k++;
    return (s[n - k] & 0xc0) == 0x80 ? 1 : k;
}

static void kmed__mcqa_put_stripped(kmed_buf *out, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s), k;
    while (n && (k = kmed__mcqa_space_len(p, n)) > 0) { p += k; n -= k; }
    while (n) {
        size_t c = kmed__mcqa_last_char(p, n);
        if (kmed__mcqa_space_len(p + n - c, c) != c) break;
        n -= c;
    }
    kmed_buf_put(out, p, n);
}

KMED_API void kmed_mcqa_item_text(const kmed_mcqa_item *item, kmed_buf *out)
{
    int k;
    kmed__mcqa_put_stripped(out, item->question);
    for (k = 0; k < KMED_MCQA_NOPT; k++) kmed_buf_printf(out, "\n%c. %s", 'A' + k, item->opt[k]);
    kmed_buf_puts(out, "\n\xec\xa0\x95\xeb\x8b\xb5" KMED__MCQA_COLON); /* "정답：" */
}

KMED_API kmed_result kmed_mcqa_prefix(const kmed_mcqa_set *fewshot, const char *subset,
                                      int shots, int chat, kmed_buf *out, kmed_error *err)
{
    size_t i;
    int used = 0;
    if (chat) kmed_buf_puts(out, "<bos><start_of_turn>user\n");
    for (i = 0; fewshot && i < fewshot->n && used < shots; i++) {
        const kmed_mcqa_item *ex = &fewshot->items[i];
        if (strcmp(ex->subset, subset) != 0) continue;
        kmed_mcqa_item_text(ex, out);
        kmed_buf_printf(out, " %c\n\n", 'A' + ex->answer - 1);
        used++;
    }
    if (used < shots)
        return KMED__ERR(err, KMED_ERR_NOT_FOUND, "few-shot set has %d '%s' items, %d asked",
                         used, subset, shots);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_mcqa_prompt(const kmed_mcqa_item *item, const kmed_mcqa_set *fewshot,
                                      int shots, int chat, kmed_buf *out, kmed_error *err)
{
    kmed_result r = kmed_mcqa_prefix(fewshot, item->subset, shots, chat, out, err);
    if (r != KMED_OK) return r;
    kmed_mcqa_item_text(item, out);
    if (chat) kmed_buf_puts(out, "<end_of_turn>\n<start_of_turn>model\n");
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

/* ---- answer extraction ---- */

/* Decodes one UTF-8 code point at s (n bytes left); invalid bytes read as themselves. */
static uint32_t kmed__mcqa_cp(const unsigned char *s, size_t n, size_t *len)
{
    uint32_t c = s[0];
    size_t k, need = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    if (need > n) need = 1;
    if (need > 1) {
        c &= 0xff >> (need + 1);
        for (k = 1; k < need; k++) {
            if ((s[k] & 0xc0) != 0x80) { *len = 1; return s[0]; }
            c = (c << 6) | (s[k] & 0x3f);
        }
    }
    *len = need;
    return c;
}

/* Python's \s for str patterns (Unicode whitespace). */
static int kmed__mcqa_is_space(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 || c == 0xa0 ||
           c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 || c == 0x2029 ||
           c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Python's \w for str patterns, approximated: ASCII alphanumerics and '_', and non-ASCII
   code points outside the punctuation, symbol and space blocks (letters and digits of
   every script, Hangul included). */
static int kmed__mcqa_is_word(uint32_t c)
{
    if (c < 0x80) return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') ||
                         (c >= 'a' && c <= 'z') || c == '_';
    if (c < 0xc0) return c == 0xaa || c == 0xb2 || c == 0xb3 || c == 0xb5 || c == 0xb9 ||
                         c == 0xba || (c >= 0xbc && c <= 0xbe);
    if (c == 0xd7 || c == 0xf7) return 0;
    if (kmed__mcqa_is_space(c)) return 0;
    if (c >= 0x2000 && c <= 0x2bff) return 0;   /* punctuation, arrows, math, shapes */
    if (c >= 0x3000 && c <= 0x303f) return c == 0x3005 || c == 0x3006 || c == 0x3007;
    if (c >= 0xff00 && c <= 0xff0f) return 0;   /* fullwidth punctuation */
    if (c >= 0xff1a && c <= 0xff20) return 0;
    if (c >= 0xff3b && c <= 0xff40) return c == 0xff3f;
    if (c >= 0xff5b && c <= 0xff65) return 0;
    if (c >= 0xfe30 && c <= 0xfe6f) return 0;   /* CJK compatibility / small forms */
    if (c >= 0x1f000 && c <= 0x1faff) return 0; /* emoji and symbols */
    return 1;
}

static int kmed__mcqa_letter(uint32_t c)
{
    if (c >= 'A' && c <= 'E') return (int)(c - 'A');
    if (c >= 'a' && c <= 'e') return (int)(c - 'a');
    return -1;
}

/* Code points of the text, decoded once. */
typedef struct kmed__mcqa_text { uint32_t *cp; size_t n; } kmed__mcqa_text;

static int kmed__mcqa_word_at(const kmed__mcqa_text *t, size_t i)
{
    return i < t->n && kmed__mcqa_is_word(t->cp[i]);
}
/* \b before index i (between i-1 and i). */
static int kmed__mcqa_boundary(const kmed__mcqa_text *t, size_t i)
{
    return (i > 0 && kmed__mcqa_word_at(t, i - 1)) != kmed__mcqa_word_at(t, i);
}

static int kmed__mcqa_match_lit(const kmed__mcqa_text *t, size_t i, const uint32_t *lit, size_t n)
{
    size_t k;
    if (i + n > t->n) return 0;
    for (k = 0; k < n; k++)
        if (t->cp[i + k] != lit[k]) return 0;
    return 1;
}

KMED_API int kmed_mcqa_extract(const char *text, size_t len)
{
    static const uint32_t jeongdap[] = {0xc815, 0xb2f5};          /* 정답 */
    static const uint32_t eun[] = {0xc740};                         /* 은 */
    static const uint32_t imnida[] = {0xc785, 0xb2c8, 0xb2e4};     /* 입니다 */
    kmed__mcqa_text t;
    size_t i, pos = 0, k;
    int found[4] = {-1, -1, -1, -1}, p;
    t.cp = (uint32_t *)KMED_MALLOC((len + 1) * sizeof *t.cp);
    if (!t.cp) return -1;
    for (t.n = 0; pos < len; t.n++) {
        t.cp[t.n] = kmed__mcqa_cp((const unsigned char *)text + pos, len - pos, &k);
        pos += k;
    }
    /* Each pattern's matches do not overlap (findall), and every pattern is anchored by a
       fixed start, so the last match is found by scanning left to right and resuming after
       each match. */
    for (i = 0; i < t.n;) {  /* 정답[:\s]*([A-E]) */
        size_t j;
        if (!kmed__mcqa_match_lit(&t, i, jeongdap, 2)) { i++; continue; }
        for (j = i + 2; j < t.n && (t.cp[j] == ':' || kmed__mcqa_is_space(t.cp[j])); j++) {}
        if (j < t.n && kmed__mcqa_letter(t.cp[j]) >= 0) { found[0] = kmed__mcqa_letter(t.cp[j]); i = j + 1; }
        else i++;
    }
    for (i = 0; i < t.n;) {  /* 정답은\s*([A-E])\s*입니다 */
        size_t j, m;
        int l;
        if (!kmed__mcqa_match_lit(&t, i, jeongdap, 2) || !kmed__mcqa_match_lit(&t, i + 2, eun, 1)) { i++; continue; }
        for (j = i + 3; j < t.n && kmed__mcqa_is_space(t.cp[j]); j++) {}
        l = j < t.n ? kmed__mcqa_letter(t.cp[j]) : -1;
        for (m = j + 1; l >= 0 && m < t.n && kmed__mcqa_is_space(t.cp[m]); m++) {}
        if (l >= 0 && kmed__mcqa_match_lit(&t, m, imnida, 3)) { found[1] = l; i = m + 3; }
        else i++;
    }
    for (i = 0; i < t.n; i++) {  /* \b([A-E])\.   and   \b([A-E])\b */
        int l = kmed__mcqa_letter(t.cp[i]);
        if (l < 0 || !kmed__mcqa_boundary(&t, i)) continue;
        if (i + 1 < t.n && t.cp[i + 1] == '.') found[2] = l;
        if (kmed__mcqa_boundary(&t, i + 1)) found[3] = l;
    }
    KMED_FREE(t.cp);
    for (p = 0; p < 4; p++)
        if (found[p] >= 0) return found[p];
    return -1;
}

/* ---- statistics ---- */

KMED_API void kmed_mcqa_wilson(size_t k, size_t n, double z, double *lo, double *hi)
{
    double p, z2, den, center, half;
    if (n == 0) { *lo = 0; *hi = 1; return; }
    p = (double)k / (double)n;
    z2 = z * z;
    den = 1 + z2 / (double)n;
    center = (p + z2 / (2.0 * (double)n)) / den;
    half = z * sqrt(p * (1 - p) / (double)n + z2 / (4.0 * (double)n * (double)n)) / den;
    *lo = center - half < 0 ? 0 : center - half;
    *hi = center + half > 1 ? 1 : center + half;
}

KMED_API double kmed_mcqa_mcnemar(size_t b, size_t c)
{
    size_t n = b + c, m = b < c ? b : c, i;
    double tail = 0;
    if (n == 0) return 1.0;
    /* P(X <= m), X ~ Bin(n, 1/2), summed in log space so large n does not underflow early */
    for (i = 0; i <= m; i++)
        tail += exp(lgamma((double)n + 1) - lgamma((double)i + 1) - lgamma((double)(n - i) + 1) -
                    (double)n * log(2.0));
    return 2 * tail > 1 ? 1.0 : 2 * tail;
}

KMED_API void kmed_mcqa_preds_free(kmed_mcqa_pred *preds, size_t n)
{
    size_t i;
    for (i = 0; preds && i < n; i++) {
        KMED_FREE(preds[i].generation);
        preds[i].generation = NULL;
    }
}

static void kmed__mcqa_acc_finish(kmed_mcqa_acc *a)
{
    a->acc = a->n ? (double)a->correct / (double)a->n : 0;
    kmed_mcqa_wilson(a->correct, a->n, 1.959963984540054, &a->lo, &a->hi);
}

KMED_API void kmed_mcqa_summarize(const kmed_mcqa_set *set, const kmed_mcqa_pred *preds,
                                  kmed_mcqa_summary *s)
{
    static const char *const order[] = {"doctor", "nurse", "pharm", "dentist"};
    size_t i, k;
    double macro = 0;
    memset(s, 0, sizeof *s);
    snprintf(s->overall.subset, sizeof s->overall.subset, "all");
    for (k = 0; k < 4; k++) snprintf(s->sub[k].subset, sizeof s->sub[k].subset, "%s", order[k]);
    s->n_subsets = 4;
    for (i = 0; i < set->n; i++) {
        const kmed_mcqa_item *it = &set->items[i];
        int ok = preds[i].pred == it->answer - 1;
        for (k = 0; k < s->n_subsets; k++)
            if (strcmp(s->sub[k].subset, it->subset) == 0) break;
        if (k == s->n_subsets) {
            if (k == KMED_MCQA_MAX_SUBSETS) k--; /* more kinds than slots: pool the rest */
            else snprintf(s->sub[s->n_subsets++].subset, sizeof s->sub[k].subset, "%s", it->subset);
        }
        s->sub[k].n++;
        s->sub[k].correct += (size_t)ok;
        s->sub[k].unparsed += preds[i].pred < 0;
        s->overall.n++;
        s->overall.correct += (size_t)ok;
        s->overall.unparsed += preds[i].pred < 0;
    }
    /* drop the standard subsets that have no items, keeping the order */
    for (i = k = 0; i < s->n_subsets; i++)
        if (s->sub[i].n) s->sub[k++] = s->sub[i];
    s->n_subsets = k;
    for (k = 0; k < s->n_subsets; k++) {
        kmed__mcqa_acc_finish(&s->sub[k]);
        macro += s->sub[k].acc;
    }
    kmed__mcqa_acc_finish(&s->overall);
    s->macro = s->n_subsets ? macro / (double)s->n_subsets : 0;
}

KMED_API void kmed_mcqa_pred_json(const kmed_mcqa_item *item, const kmed_mcqa_pred *p,
                                  kmed_buf *out)
{
    int k;
    kmed_buf_puts(out, "{\"id\":");
    kmed_buf_json_str(out, item->id, strlen(item->id));
    kmed_buf_puts(out, ",\"subset\":");
    kmed_buf_json_str(out, item->subset, strlen(item->subset));
    kmed_buf_printf(out, ",\"answer\":\"%c\",\"pred\":", 'A' + item->answer - 1);
    if (p->pred >= 0) kmed_buf_printf(out, "\"%c\"", 'A' + p->pred);
    else kmed_buf_puts(out, "null");
    kmed_buf_printf(out, ",\"correct\":%s,\"scores\":[", p->pred == item->answer - 1 ? "true" : "false");
    for (k = 0; k < KMED_MCQA_NOPT; k++) {
        if (k) kmed_buf_puts(out, ",");
        kmed_buf_json_f32(out, p->score[k]);
    }
    kmed_buf_puts(out, "]");
    if (p->generation) {
        kmed_buf_puts(out, ",\"generation\":");
        kmed_buf_json_str(out, p->generation, strlen(p->generation));
    }
    kmed_buf_puts(out, "}");
}

static const char *kmed__mcqa_metric(kmed_mcqa_method m)
{
    return m == KMED_MCQA_GENERATE ? "exact_match" : m == KMED_MCQA_OPTION ? "acc_norm" : "acc";
}

static void kmed__mcqa_result_json(kmed_buf *out, const char *task, const kmed_mcqa_acc *a,
                                   const char *metric)
{
    double se = a->n > 1 ? sqrt(a->acc * (1 - a->acc) / (double)(a->n - 1)) : 0;
    kmed_buf_printf(out, "\"%s\":{\"alias\":\"%s\",\"%s,none\":%.6f,\"%s_stderr,none\":%.6f,"
                    "\"n\":%zu,\"correct\":%zu,\"unparsed\":%zu,\"ci95\":[%.6f,%.6f]}",
                    task, task, metric, a->acc, metric, se, a->n, a->correct, a->unparsed,
                    a->lo, a->hi);
}

KMED_API void kmed_mcqa_report_json(const kmed_mcqa_summary *s, const kmed_mcqa_config *cfg,
                                    const char *model_name, const char *preds_path,
                                    kmed_buf *out)
{
    const char *metric = kmed__mcqa_metric(cfg->method);
    char task[64];
    size_t k;
    kmed_buf_puts(out, "{\"results\":{");
    kmed__mcqa_result_json(out, "kormedmcqa", &s->overall, metric);
    for (k = 0; k < s->n_subsets; k++) {
        snprintf(task, sizeof task, "kormedmcqa_%s", s->sub[k].subset);
        kmed_buf_puts(out, ",");
        kmed__mcqa_result_json(out, task, &s->sub[k], metric);
    }
    kmed_buf_puts(out, "},\"groups\":{");
    kmed__mcqa_result_json(out, "kormedmcqa", &s->overall, metric);
    kmed_buf_puts(out, "},\"n-samples\":{");
    for (k = 0; k < s->n_subsets; k++)
        kmed_buf_printf(out, "%s\"kormedmcqa_%s\":{\"original\":%zu,\"effective\":%zu}",
                        k ? "," : "", s->sub[k].subset, s->sub[k].n, s->sub[k].n);
    kmed_buf_printf(out, "},\"config\":{\"model\":");
    kmed_buf_json_str(out, model_name ? model_name : "", model_name ? strlen(model_name) : 0);
    kmed_buf_printf(out, ",\"num_fewshot\":%d},\"kmed\":{\"method\":\"%s\",\"shots\":%d,"
                    "\"chat\":%s,\"accuracy\":%.6f,\"macro_accuracy\":%.6f,\"ci95\":[%.6f,%.6f],"
                    "\"unparsed\":%zu,\"predictions\":",
                    cfg->shots, cfg->method == KMED_MCQA_GENERATE ? "generate"
                                : cfg->method == KMED_MCQA_OPTION ? "option" : "letter",
                    cfg->shots, cfg->chat ? "true" : "false", s->overall.acc, s->macro,
                    s->overall.lo, s->overall.hi, s->overall.unparsed);
    kmed_buf_json_str(out, preds_path ? preds_path : "", preds_path ? strlen(preds_path) : 0);
    kmed_buf_puts(out, "}}\n");
}

KMED_API void kmed_mcqa_chart_svg(const kmed_mcqa_summary *runs, const char *const *labels,
                                  size_t n_runs, kmed_buf *out)
{
    static const char *const colors[] = {"#9aa5b1", "#2b7bb9", "#e07b39", "#3a9d5d"};
    const double W = 640, H = 360, left = 50, right = 20, top = 30, bottom = 60;
    const double ph = H - top - bottom;
    size_t g, r, n_groups = runs[0].n_subsets + 1;
    double gw = (W - left - right) / (double)n_groups, bw = gw * 0.8 / (double)n_runs;
    int t;
    kmed_buf_printf(out, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" height=\"%.0f\" "
                    "font-family=\"sans-serif\" font-size=\"12\">\n"
                    "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                    "<text x=\"%.0f\" y=\"18\" font-size=\"14\">KorMedMCQA accuracy "
                    "(95%% Wilson intervals)</text>\n", W, H, left);
    for (t = 0; t <= 10; t += 2) {
        double y = top + ph * (1 - t / 10.0);
        kmed_buf_printf(out, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#ddd\"/>"
                        "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\">%d%%</text>\n",
                        left, W - right, y, y, left - 4, y + 4, t * 10);
    }
    for (g = 0; g < n_groups; g++) {
        const char *name = g < runs[0].n_subsets ? runs[0].sub[g].subset : "overall";
        for (r = 0; r < n_runs; r++) {
            const kmed_mcqa_acc *a = g < runs[r].n_subsets ? &runs[r].sub[g] : &runs[r].overall;
            double x = left + gw * (double)g + gw * 0.1 + bw * (double)r;
            double y = top + ph * (1 - a->acc), ylo = top + ph * (1 - a->lo),
                   yhi = top + ph * (1 - a->hi);
            kmed_buf_printf(out, "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                            "fill=\"%s\"><title>%s %s: %.1f%% (n=%zu)</title></rect>\n"
                            "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"black\"/>\n"
                            "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" font-size=\"10\">"
                            "%.1f</text>\n",
                            x, y, bw * 0.95, top + ph - y, colors[r % 4], labels[r], name,
                            100 * a->acc, a->n, x + bw * 0.475, x + bw * 0.475, ylo, yhi,
                            x + bw * 0.475, yhi - 3, 100 * a->acc);
        }
        kmed_buf_printf(out, "<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\">%s</text>\n",
                        left + gw * (double)g + gw / 2, top + ph + 16, name);
    }
    kmed_buf_printf(out, "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"red\" "
                    "stroke-dasharray=\"4 3\"/><text x=\"%.1f\" y=\"%.1f\" fill=\"red\" "
                    "text-anchor=\"end\">chance 20%%</text>\n",
                    left, W - right, top + ph * 0.8, top + ph * 0.8, W - right, top + ph * 0.8 - 4);
    for (r = 0; r < n_runs; r++)
        kmed_buf_printf(out, "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"12\" fill=\"%s\"/>"
                        "<text x=\"%.1f\" y=\"%.1f\">%s</text>\n",
                        left + 150.0 * (double)r, H - 24, colors[r % 4], left + 150.0 * (double)r + 16,
                        H - 14, labels[r]);
    kmed_buf_puts(out, "</svg>\n");
}

/* ---- scoring ---- */

/* Token ids of text (with <bos> unless the text carries its own, as chat prompts do). */
static kmed_result kmed__mcqa_encode(const kmed_tok *tok, const char *text, size_t len,
                                     int with_bos, int **ids, size_t *n, kmed_error *err)
{
    kmed_tok_config tc;
    size_t need = 0;
    kmed_result r;
    memset(&tc, 0, sizeof tc);
    tc.no_bos = !with_bos;
    *ids = NULL;
    r = kmed_tok_encode(tok, &tc, text, len, NULL, 0, &need, err);
    if (r != KMED_OK && r != KMED_ERR_SPACE) return r;
    *ids = (int *)KMED_MALLOC((need + 1) * sizeof **ids);
    if (!*ids) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return kmed_tok_encode(tok, &tc, text, len, *ids, need, n, err);
}

/* log softmax of logits[want] over V entries */
static float kmed__mcqa_logprob(const float *logits, size_t V, int want)
{
    double mx = logits[0], s = 0;
    size_t v;
    for (v = 1; v < V; v++) if (logits[v] > mx) mx = logits[v];
    for (v = 0; v < V; v++) s += exp((double)logits[v] - mx);
    return (float)((double)logits[want] - mx - log(s));
}

/* Continuation ids of each answer letter: "▁A".."▁E" after a plain prompt (lm-eval's
   target " A"), "A".."E" at the start of a chat model turn. */
static kmed_result kmed__mcqa_letter_ids(const kmed_tok *tok, int chat, int *ids,
                                         kmed_error *err)
{
    int k;
    for (k = 0; k < KMED_MCQA_NOPT; k++) {
        char piece[8];
        snprintf(piece, sizeof piece, "%s%c", chat ? "" : "\xe2\x96\x81", 'A' + k);
        ids[k] = kmed_tok_id(tok, piece, strlen(piece));
        if (ids[k] < 0)
            return KMED__ERR(err, KMED_ERR_NOT_FOUND, "tokenizer has no piece '%s'", piece);
    }
    return KMED_OK;
}

typedef struct kmed__mcqa_run {
    const kmed_gemma *model;
    const kmed_lora *lora;
    const kmed_tok *tok;
    kmed_pool *pool;
    int fwd;                    /* KMED_FWD_FAST or 0 */
    kmed_gemma_state st;
    float *logits;              /* (max_cont, V) */
    size_t V, max_cont;
} kmed__mcqa_run;

/* Sum of log p(cont | prompt) given the prompt's last-position logits `last` and the cache
   holding the prompt; leaves the cache at the prompt. */
static kmed_result kmed__mcqa_cont_logprob(kmed__mcqa_run *run, const float *last,
                                           const int *cont, size_t nc, double *lp,
                                           kmed_error *err)
{
    size_t pos = run->st.pos, j;
    kmed_result r;
    *lp = kmed__mcqa_logprob(last, run->V, cont[0]);
    if (nc > 1) {
        if (nc - 1 > run->max_cont)
            return KMED__ERR(err, KMED_ERR_LIMIT, "option of %zu tokens is too long", nc);
        r = kmed_gemma_forward(run->model, run->lora, &run->st, run->pool, cont, nc - 1,
                               KMED_FWD_LOGITS_ALL | run->fwd, run->logits, NULL, err);
        if (r != KMED_OK) return r;
        for (j = 1; j < nc; j++)
            *lp += kmed__mcqa_logprob(run->logits + (j - 1) * run->V, run->V, cont[j]);
    }
    return kmed_gemma_state_set_pos(&run->st, pos, err);
}

/* Scores one item whose prompt ids are ids[0..n); the cache already holds ids[0..cached). */
static kmed_result kmed__mcqa_item(kmed__mcqa_run *run, const kmed_mcqa_config *cfg,
                                   const kmed_mcqa_item *it, const int *ids, size_t n,
                                   size_t cached, const int *letters, kmed_mcqa_pred *p,
                                   kmed_error *err)
{
    float *last = run->logits;
    kmed_result r;
    int k;
    p->pred = 0;
    if (cfg->method != KMED_MCQA_GENERATE) {
        if ((r = kmed_gemma_state_set_pos(&run->st, cached, err)) != KMED_OK) return r;
        r = kmed_gemma_forward(run->model, run->lora, &run->st, run->pool, ids + cached,
                               n - cached, KMED_FWD_LOGITS_LAST | run->fwd, last, NULL, err);
        if (r != KMED_OK) return r;
    }
    if (cfg->method == KMED_MCQA_LETTER) {
        for (k = 0; k < KMED_MCQA_NOPT; k++)
            p->score[k] = kmed__mcqa_logprob(last, run->V, letters[k]);
    } else if (cfg->method == KMED_MCQA_OPTION) {
        /* the prompt's last logits are overwritten by the continuation: keep a copy */
        float *keep = (float *)KMED_MALLOC(run->V * sizeof *keep);
        if (!keep) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        memcpy(keep, last, run->V * sizeof *keep);
        for (k = 0; k < KMED_MCQA_NOPT && r == KMED_OK; k++) {
            kmed_buf cont = {0};
            int *cids = NULL;
            size_t nc = 0, nchar = 0, i;
            double lp = 0;
            if (!cfg->chat) kmed_buf_puts(&cont, " ");
            kmed_buf_puts(&cont, it->opt[k]);
            if (cont.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            if (r == KMED_OK) r = kmed__mcqa_encode(run->tok, cont.data, cont.len, 0, &cids, &nc, err);
            if (r == KMED_OK && nc == 0) {
                p->score[k] = -INFINITY;
            } else if (r == KMED_OK) {
                r = kmed__mcqa_cont_logprob(run, keep, cids, nc, &lp, err);
                for (i = 0; i < cont.len; i++) nchar += ((unsigned char)cont.data[i] & 0xc0) != 0x80;
                p->score[k] = (float)(lp / (double)nchar); /* per character, as acc_norm */
            }
            KMED_FREE(cids);
            kmed_buf_free(&cont);
        }
        KMED_FREE(keep);
        if (r != KMED_OK) return r;
    } else { /* GENERATE: greedy with lm-eval's stop sequences, then its extraction */
        static const char *const stops[] = {"Q:", "</s>", "<|im_end|>", ".", "\n\n"};
        kmed_generate_config gc;
        kmed_generate_result res;
        if ((r = kmed_gemma_state_set_pos(&run->st, cached, err)) != KMED_OK) return r;
        memset(&gc, 0, sizeof gc);
        gc.max_tokens = cfg->max_gen_tokens > 0 ? cfg->max_gen_tokens : 32;
        gc.stop = stops;
        gc.n_stop = sizeof stops / sizeof *stops;
        gc.fast = cfg->fast;
        r = kmed_generate(run->model, run->lora, run->tok, &run->st, run->pool, ids + cached,
                          n - cached, &gc, &res, err);
        if (r != KMED_OK) return r;
        p->pred = kmed_mcqa_extract(res.text, strlen(res.text));
        p->generation = res.text;
        res.text = NULL;
        kmed_generate_result_free(&res);
        return p->generation ? KMED_OK : KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    for (k = 1; k < KMED_MCQA_NOPT; k++)
        if (p->score[k] > p->score[p->pred]) p->pred = k;
    return KMED_OK;
}

KMED_API kmed_result kmed_mcqa_score(const kmed_gemma *model, const kmed_lora *lora,
                                     const kmed_tok *tok, kmed_pool *pool,
                                     const kmed_mcqa_set *set, const kmed_mcqa_config *cfg,
                                     kmed_mcqa_pred *preds, const kmed_callbacks *cb,
                                     kmed_error *err)
{
    kmed__mcqa_run run;
    kmed_buf text = {0}, prefix = {0};
    char cur_subset[64] = "";
    int letters[KMED_MCQA_NOPT], *ids = NULL, *pids = NULL;
    size_t i, n = 0, np = 0, max_tokens = 0, extra;
    kmed_result r = KMED_OK;
    memset(&run, 0, sizeof run);
    memset(preds, 0, set->n * sizeof *preds);
    if (cfg->method == KMED_MCQA_LETTER &&
        (r = kmed__mcqa_letter_ids(tok, cfg->chat, letters, err)) != KMED_OK)
        return r;
    run.model = model; run.lora = lora; run.tok = tok; run.pool = pool;
    run.fwd = cfg->fast ? KMED_FWD_FAST : 0;
    run.V = (size_t)model->cfg.vocab_size;
    /* the longest prompt sizes the cache; options add up to max_cont tokens */
    for (i = 0; i < set->n && r == KMED_OK; i++) {
        text.len = 0;
        r = kmed_mcqa_prompt(&set->items[i], cfg->fewshot, cfg->shots, cfg->chat, &text, err);
        if (r == KMED_OK) r = kmed__mcqa_encode(tok, text.data, text.len, !cfg->chat, &ids, &n, err);
        if (n > max_tokens) max_tokens = n;
        KMED_FREE(ids);
        ids = NULL;
    }
    /* room after the prompt: an option's tokens, or the generation budget */
    run.max_cont = cfg->method == KMED_MCQA_OPTION ? 256 : 1;
    extra = cfg->method == KMED_MCQA_GENERATE
                ? (size_t)(cfg->max_gen_tokens > 0 ? cfg->max_gen_tokens : 32) : run.max_cont;
    if (r == KMED_OK) r = kmed_gemma_state_init(&run.st, model, max_tokens + extra + 1, err);
    if (r == KMED_OK && !(run.logits = (float *)kmed__calloc(run.max_cont * run.V, sizeof(float))))
        r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    for (i = 0; i < set->n && r == KMED_OK; i++) {
        const kmed_mcqa_item *it = &set->items[i];
        size_t cached = 0;
        text.len = 0;
        r = kmed_mcqa_prompt(it, cfg->fewshot, cfg->shots, cfg->chat, &text, err);
        if (r == KMED_OK) r = kmed__mcqa_encode(tok, text.data, text.len, !cfg->chat, &ids, &n, err);
        if (r == KMED_OK && !cfg->no_prefix_cache && strcmp(cur_subset, it->subset) != 0) {
            /* a new subset: run its shared prefix once; the cache keeps it */
            snprintf(cur_subset, sizeof cur_subset, "%s", it->subset);
            prefix.len = 0;
            KMED_FREE(pids);
            pids = NULL;
            np = 0;
            r = kmed_mcqa_prefix(cfg->fewshot, it->subset, cfg->shots, cfg->chat, &prefix, err);
            if (r == KMED_OK && prefix.len)
                r = kmed__mcqa_encode(tok, prefix.data, prefix.len, !cfg->chat, &pids, &np, err);
            if (r == KMED_OK) r = kmed_gemma_state_set_pos(&run.st, 0, err);
            if (r == KMED_OK && np)
                r = kmed_gemma_forward(model, lora, &run.st, pool, pids, np, run.fwd, NULL, NULL,
                                       err);
        }
        /* reuse the cached prefix only where the item's ids really start with it (the
           tokenizer could merge across the boundary; Gemma's "\n\n" is an added token,
           so in practice it always holds) */
        if (r == KMED_OK && !cfg->no_prefix_cache && np && np < n &&
            memcmp(ids, pids, np * sizeof *ids) == 0)
            cached = np;
        if (r == KMED_OK && cached == 0 && np && !cfg->no_prefix_cache) cur_subset[0] = 0;
        if (r == KMED_OK) r = kmed__mcqa_item(&run, cfg, it, ids, n, cached, letters, &preds[i], err);
        KMED_FREE(ids);
        ids = NULL;
        kmed_progress(cb, "eval", (double)(i + 1), (double)set->n, "items");
    }
    KMED_FREE(ids);
    KMED_FREE(pids);
    KMED_FREE(run.logits);
    kmed_gemma_state_free(&run.st);
    kmed_buf_free(&text);
    kmed_buf_free(&prefix);
    return r;
}

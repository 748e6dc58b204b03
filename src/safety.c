/* ==== kmed_safety: medical-answer filter and disclaimers ==== */

#include <stdlib.h>
#include <string.h>

/* Markers inside normalized phrases; code points never exceed 0x10FFFF. */
#define KMED__SAFETY_SEP 0u            /* between '&' parts */
#define KMED__SAFETY_DIGITS 0xFFFFFFFEu /* '#' */
#define KMED__SAFETY_STAR 0xFFFFFFFDu  /* trailing '*' */

/* Built-in phrase lists. Kept specific to advice, requests and acute situations, so plain
   medical facts ("고혈압은 혈압이 높은 상태입니다") pass untouched. */
static const char *const kmed__safety_dosing[] = {
    "#mg", "#㎎", "#밀리그램", "#mcg", "#μg", "#마이크로그램", "#ml", "#㎖", "#밀리리터",
    "#정씩", "#알씩", "#캡슐", "#포씩", "#방울씩", "한 알씩", "두 알씩", "세 알씩", "반 알",
    "하루 # 번", "하루 # 회", "하루에 # 번", "하루에 # 회", "# 일 # 회", "#시간마다",
    "#시간 간격", "하루 한 번", "하루 두 번", "하루 세 번", "하루 네 번", "하루에 한 번",
    "하루에 두 번", "하루에 세 번", "식후 #분", "식전 #분", "복용하세요", "복용하십시오",
    "복용하시면", "복용하시기 바랍", "드시면 됩니다", "투여하세요", "투여하십시오",
    "복용량", "투여량", "권장 용량", "용량을 늘리", "용량을 줄이", "얼마나 먹어야",
    "얼마나 복용", "몇 알 먹", "몇 알을 먹", "몇 번 먹", "몇 번 복용", "몇 번씩",
    "얼마나 맞아야", "얼마나 투여", "몇 단위", "#단위",
    "# tablet*", "# pill*", "# capsule*", "# drops", "# units", "every # hours", "# times a day",
    "# times daily", "once a day", "twice a day", "three times a day", "once daily",
    "twice daily", "dosage", "dose of", "your dose", "the dose", "how much should i take",
    "how many should i take", "how often should i take", "what dose"
};
static const char *const kmed__safety_diagnosis[] = {
    "진단됩니다", "으로 진단할 수 있습니다", "가능성이 높습니다", "가능성이 큽니다",
    "가능성이 높아 보", "의심됩니다", "의심이 됩니다", "으로 보입니다", "로 보입니다",
    "에 걸리셨", "앓고 계신", "앓고 계십", "무슨 병", "어떤 병인가", "무슨 질환",
    "어떤 질환인가", "진단해 주", "제 병명", "병명이 뭔",
    "you may have", "you might have", "you probably have", "you likely have",
    "you most likely have", "you are suffering from", "you're suffering from",
    "your diagnosis", "likely diagnosis", "i diagnose", "what do i have", "do i have",
    "what disease", "what is wrong with me"
};
static const char *const kmed__safety_emergency[] = {
    "119", "응급실", "응급 상황", "구급차", "가슴이 아파", "가슴이 너무 아", "가슴 통증이 심",
    "가슴이 조이", "가슴을 쥐어짜", "숨을 쉴 수 없", "숨을 못 쉬", "숨이 안 쉬어",
    "숨이 막혀", "숨쉬기가 힘", "숨쉬기 힘", "호흡곤란이 심", "호흡이 멈", "의식을 잃",
    "의식이 없", "의식이 흐려", "쓰러졌", "쓰러져", "심정지", "심장마비", "심폐소생술",
    "경련을 하", "경련이 멈추지", "발작을 일으", "마비가 왔", "말이 어눌", "얼굴 한쪽",
    "얼굴이 한쪽", "피가 멈추지", "출혈이 멈추지", "피를 토", "피를 많이 흘", "목이 부어 숨",
    "아나필락시스", "911", "chest pain", "can't breathe", "cannot breathe", "can not breathe",
    "trouble breathing", "not breathing", "stopped breathing", "unconscious", "passed out",
    "having a seizure", "heart attack", "having a stroke", "stroke symptoms",
    "severe bleeding", "bleeding heavily", "won't stop bleeding", "anaphyla*",
    "emergency room", "call an ambulance", "ambulance"
};
static const char *const kmed__safety_self_harm[] = {
    "자살", "자해", "죽고 싶", "죽고싶", "살고 싶지 않", "살기 싫", "사라지고 싶",
    "극단적 선택", "극단적인 선택", "목숨을 끊", "삶을 끝내", "스스로 목숨",
    "suicid*", "self-harm", "self harm", "kill myself", "killing myself", "want to die",
    "wanna die", "end my life", "hurt myself", "cut myself"
};
static const char *const kmed__safety_dangerous[] = {
    "치사량", "치사 용량", "치사농도", "죽을 수 있는 양", "죽을 수 있는 용량",
    "몇 알 & 죽", "얼마나 먹으면 & 죽", "얼마나 먹어야 & 죽", "얼마나 복용해야 & 죽",
    "과다복용 & 죽는 방법", "과다복용하는 방법", "과다 복용하는 방법", "죽는 방법",
    "죽을 수 있는 방법", "고통 없이 죽", "편하게 죽", "자살 방법", "자살하는 방법",
    "자살하는 법", "자살할 수 있는 방법", "자살하려면", "자해하는 방법", "자해 방법",
    "자해하는 법", "목숨을 끊는 방법", "목을 매는 방법", "목 매는 법", "손목을 긋",
    "손목 긋는", "수면제 & 모아",
    "lethal dose", "fatal dose", "lethal amount", "deadly dose", "how many & to die",
    "how much & to die", "how many & to kill", "how much & to kill", "overdose on purpose",
    "how to overdose", "intentionally overdose", "suicide method*", "how to kill myself",
    "ways to kill myself", "how to commit suicide", "painless way to die",
    "painless way to kill", "how to hang myself", "how to cut myself", "how to hurt myself"
};
/* Illegal drugs x ways to obtain or make them, combined into "drug & verb" phrases. */
static const char *const kmed__safety_drugs_ko[] = {
    "마약", "필로폰", "히로뽕", "메스암페타민", "코카인", "헤로인", "펜타닐", "엑스터시",
    "아편", "대마초", "대마", "엘에스디"
};
static const char *const kmed__safety_verbs_ko[] = {
    "만드는", "만들", "제조", "합성", "구하", "구할", "구입", "구매", "사는 곳", "살 수 있",
    "재배", "키우는"
};
static const char *const kmed__safety_drugs_en[] = {
    "meth", "methamphetamine", "cocaine", "crack", "heroin", "fentanyl", "lsd", "mdma",
    "ecstasy", "opium", "illegal drugs"
};
static const char *const kmed__safety_verbs_en[] = {
    "how to make", "how do i make", "how to cook", "how do i cook", "synthesi*",
    "where to buy", "where can i buy", "where can i get", "how to buy", "how to get",
    "how can i get", "how do i get", "how to obtain", "how to grow"
};

static const char *const kmed__safety_default_texts[KMED_SAFETY_NTEXTS] = {
    "※ 이 답변은 일반적인 의료 정보이며 전문적인 진료를 대신할 수 없습니다. "
    "정확한 진단과 치료, 약의 복용은 의사 또는 약사와 상담하세요.\n"
    "※ This answer is general medical information and is not a substitute for "
    "professional care. Consult a doctor or pharmacist for diagnosis, treatment and "
    "medication.",
    "※ 응급 상황이라면 즉시 119에 전화하거나 가까운 응급실을 방문하세요.\n"
    "※ If this is an emergency, call 119 (Korea) or go to the nearest emergency room now.",
    "※ 힘든 마음이 드신다면 혼자 견디지 마시고 자살예방상담전화 1393(24시간) 또는 "
    "정신건강위기상담전화 1577-0199에 연락하세요. 위급하면 119에 전화하세요.\n"
    "※ If you are thinking about suicide or self-harm, please call the Korean suicide "
    "prevention line 1393 (24 hours) or 119 in an emergency.",
    "죄송하지만 이 요청에는 도움을 드릴 수 없습니다. 건강이나 약물에 관해 걱정이 "
    "있으시면 의사, 약사 등 전문가와 상담하세요. 위급한 상황이라면 119에, 극단적인 "
    "생각이 드신다면 자살예방상담전화 1393(24시간)에 연락하세요.\n"
    "Sorry, I can't help with this request. Please talk to a doctor or pharmacist about "
    "your health or medication. In an emergency call 119; if you are thinking about "
    "suicide, call the Korean suicide prevention line 1393 (24 hours)."
};

static const char *const kmed__safety_class_names[KMED_SAFETY_NCLASSES] = {
    "dosing", "diagnosis", "emergency", "self_harm", "dangerous"
};
static const char *const kmed__safety_text_names[KMED_SAFETY_NTEXTS] = {
    "disclaimer", "emergency", "self_harm", "refusal"
};

KMED_API const char *kmed_safety_class_name(kmed_safety_class c)
{
    return (unsigned)c < KMED_SAFETY_NCLASSES ? kmed__safety_class_names[c] : "?";
}

KMED_API int kmed_safety_class_parse(const char *name)
{
    int c;
    for (c = 0; c < KMED_SAFETY_NCLASSES; c++)
        if (strcmp(name, kmed__safety_class_names[c]) == 0) return c;
    if (strcmp(name, "self-harm") == 0) return KMED_SAFETY_SELF_HARM;
    return -1;
}

KMED_API const char *kmed_safety_action_name(kmed_safety_action a)
{
    switch (a) {
    case KMED_SAFETY_PASS: return "pass";
    case KMED_SAFETY_DISCLAIMER: return "disclaimer";
    case KMED_SAFETY_REFUSE: return "refuse";
    }
    return "?";
}

/* ---- normalization ---- */

/* Decodes one UTF-8 sequence at s[0..n); invalid bytes decode as U+FFFD, one byte each. */
static uint32_t kmed__safety_utf8(const unsigned char *s, size_t n, size_t *used)
{
    uint32_t c = s[0], min;
    size_t k, len;
    if (c < 0x80) { *used = 1; return c; }
    if (c >= 0xC2 && c <= 0xDF) { len = 2; c &= 0x1F; min = 0x80; }
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; c &= 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; c &= 0x07; min = 0x10000; }
    else { *used = 1; return 0xFFFD; }
    if (len > n) { *used = 1; return 0xFFFD; }
    for (k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) { *used = 1; return 0xFFFD; }
        c = (c << 6) | (s[k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) { *used = 1; return 0xFFFD; }
    *used = len;
    return c;
}

static int kmed__safety_space(uint32_t c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f' ||
           c == 0xA0 || c == 0x3000 || (c >= 0x2000 && c <= 0x200B) || c == 0xFEFF;
}

static int kmed__safety_alnum(uint32_t c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

static int kmed__safety_digit(uint32_t c) { return c >= '0' && c <= '9'; }

/* A text as matched: code points with whitespace removed, and for each one whether
   whitespace (or the start) came right before it. */
typedef struct kmed__safety_text {
    uint32_t *cp;        /* (n) */
    unsigned char *sep;  /* (n) */
    size_t n;
} kmed__safety_text;

/* Normalizes s: UTF-8 decode, Hangul jamo composition, ASCII lower-case, whitespace
   dropped (recorded in sep). Output arrays need strlen(s) entries. */
static size_t kmed__safety_normalize(const char *s, uint32_t *cp, unsigned char *sep)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t len = strlen(s), i = 0, n = 0;
    int pending_sep = 1;
    while (i < len) {
        size_t used;
        uint32_t c = kmed__safety_utf8(p + i, len - i, &used);
        i += used;
        if (kmed__safety_space(c)) { pending_sep = 1; continue; }
        if (c >= 'A' && c <= 'Z') c += 'a' - 'A';
        if (n > 0 && !pending_sep) {
            uint32_t prev = cp[n - 1];
            /* Conjoining jamo: L + V -> LV syllable, LV + T -> LVT (Unicode 3.12). */
            if (prev >= 0x1100 && prev <= 0x1112 && c >= 0x1161 && c <= 0x1175) {
                cp[n - 1] = 0xAC00 + ((prev - 0x1100) * 21 + (c - 0x1161)) * 28;
                continue;
            }
            if (prev >= 0xAC00 && prev <= 0xD7A3 && (prev - 0xAC00) % 28 == 0 &&
                c >= 0x11A8 && c <= 0x11C2) {
                cp[n - 1] = prev + (c - 0x11A7);
                continue;
            }
        }
        cp[n] = c;
        sep[n] = (unsigned char)pending_sep;
        pending_sep = 0;
        n++;
    }
    return n;
}

/* Matches one phrase part p[0..pn) at text position i; sets *end past the match. */
static int kmed__safety_match_at(const kmed__safety_text *t, size_t i, const uint32_t *p,
                                 size_t pn, size_t *end)
{
    size_t j, k = i;
    uint32_t first = p[0], last = p[pn - 1];
    int star = last == KMED__SAFETY_STAR;
    if (star) last = pn >= 2 ? p[pn - 2] : 0;
    if ((first == KMED__SAFETY_DIGITS || kmed__safety_alnum(first)) && i > 0 && !t->sep[i] &&
        kmed__safety_alnum(t->cp[i - 1]))
        return 0;
    for (j = 0; j < pn; j++) {
        if (p[j] == KMED__SAFETY_STAR) break;
        if (p[j] == KMED__SAFETY_DIGITS) {
            size_t s = k;
            while (k < t->n && (k == s || !t->sep[k])) {
                if (kmed__safety_digit(t->cp[k])) k++;
                else if (k > s && (t->cp[k] == '.' || t->cp[k] == ',') && k + 1 < t->n &&
                         !t->sep[k + 1] && kmed__safety_digit(t->cp[k + 1])) k++;
                else break;
            }
            if (k == s) return 0;
            continue;
        }
        if (k >= t->n || t->cp[k] != p[j]) return 0;
        k++;
    }
    /* Word end for ASCII: a following letter, digit or '/' (as in "mg/dL") continues it. */
    if (!star && kmed__safety_alnum(last) && k < t->n && !t->sep[k] &&
        (kmed__safety_alnum(t->cp[k]) || t->cp[k] == '/'))
        return 0;
    *end = k;
    return 1;
}

static int kmed__safety_find(const kmed__safety_text *t, const uint32_t *p, size_t pn)
{
    size_t i, end;
    for (i = 0; i < t->n; i++)
        if (kmed__safety_match_at(t, i, p, pn, &end)) return 1;
    return 0;
}

/* 1 if every '&' part of the phrase occurs in t. */
static int kmed__safety_phrase_in(const kmed__safety_text *t, const kmed_safety_phrase *ph)
{
    size_t a = 0, b;
    while (a < ph->n_cps) {
        for (b = a; b < ph->n_cps && ph->cps[b] != KMED__SAFETY_SEP; b++) {}
        if (b > a && !kmed__safety_find(t, ph->cps + a, b - a)) return 0;
        a = b + 1;
    }
    return 1;
}

/* ---- configuration ---- */

KMED_API kmed_result kmed_safety_add(kmed_safety *s, kmed_safety_class cls, const char *phrase,
                                     kmed_error *err)
{
    size_t len, n, i, out = 0, parts = 0;
    uint32_t *cp;
    unsigned char *sep;
    kmed_safety_phrase *ph;
    if ((unsigned)cls >= KMED_SAFETY_NCLASSES)
        return KMED__ERR(err, KMED_ERR_ARG, "safety: class %d out of range", (int)cls);
    len = strlen(phrase);
    cp = (uint32_t *)kmed__calloc(len + 1, sizeof *cp);
    sep = (unsigned char *)kmed__calloc(len + 1, 1);
    if (!cp || !sep) {
        KMED_FREE(cp);
        KMED_FREE(sep);
        return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
    }
    n = kmed__safety_normalize(phrase, cp, sep);
    /* Turn the syntax characters into markers and drop empty parts. */
    for (i = 0; i < n; i++) {
        uint32_t c = cp[i];
        if (c == '&') {
            if (out > 0 && cp[out - 1] != KMED__SAFETY_SEP) cp[out++] = KMED__SAFETY_SEP;
            continue;
        }
        if (c == '#') c = KMED__SAFETY_DIGITS;
        else if (c == '*') {
            if (i + 1 < n && cp[i + 1] != '&') {
                KMED_FREE(cp);
                KMED_FREE(sep);
                return KMED__ERR(err, KMED_ERR_ARG,
                                 "safety: '*' only ends a phrase part: \"%s\"", phrase);
            }
            if (out == 0 || cp[out - 1] == KMED__SAFETY_SEP) continue;
            c = KMED__SAFETY_STAR;
        }
        if (out == 0 || cp[out - 1] == KMED__SAFETY_SEP) parts++;
        cp[out++] = c;
    }
    while (out > 0 && cp[out - 1] == KMED__SAFETY_SEP) out--;
    KMED_FREE(sep);
    if (parts == 0) {
        KMED_FREE(cp);
        return KMED__ERR(err, KMED_ERR_ARG, "safety: empty phrase \"%s\"", phrase);
    }
    if (s->n_phrases == s->cap_phrases) {
        size_t cap = s->cap_phrases ? 2 * s->cap_phrases : 256;
        kmed_safety_phrase *np =
            (kmed_safety_phrase *)KMED_REALLOC(s->phrases, cap * sizeof *np);
        if (!np) {
            KMED_FREE(cp);
            return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
        }
        s->phrases = np;
        s->cap_phrases = cap;
    }
    ph = &s->phrases[s->n_phrases];
    ph->text = kmed__strndup(phrase, len);
    if (!ph->text) {
        KMED_FREE(cp);
        return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
    }
    ph->cls = cls;
    ph->cps = cp;
    ph->n_cps = out;
    s->n_phrases++;
    return KMED_OK;
}

KMED_API void kmed_safety_clear(kmed_safety *s, kmed_safety_class cls)
{
    size_t i, o = 0;
    for (i = 0; i < s->n_phrases; i++) {
        if (s->phrases[i].cls == cls) {
            KMED_FREE(s->phrases[i].text);
            KMED_FREE(s->phrases[i].cps);
        } else {
            s->phrases[o++] = s->phrases[i];
        }
    }
    s->n_phrases = o;
}

KMED_API kmed_result kmed_safety_set_text(kmed_safety *s, kmed_safety_text which,
                                          const char *text, kmed_error *err)
{
    char *t;
    if ((unsigned)which >= KMED_SAFETY_NTEXTS)
        return KMED__ERR(err, KMED_ERR_ARG, "safety: text %d out of range", (int)which);
    t = kmed__strndup(text, strlen(text));
    if (!t) return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
    KMED_FREE(s->texts[which]);
    s->texts[which] = t;
    return KMED_OK;
}

KMED_API void kmed_safety_free(kmed_safety *s)
{
    size_t i;
    if (!s) return;
    for (i = 0; i < s->n_phrases; i++) {
        KMED_FREE(s->phrases[i].text);
        KMED_FREE(s->phrases[i].cps);
    }
    KMED_FREE(s->phrases);
    for (i = 0; i < KMED_SAFETY_NTEXTS; i++) KMED_FREE(s->texts[i]);
    memset(s, 0, sizeof *s);
}

static kmed_result kmed__safety_add_list(kmed_safety *s, kmed_safety_class cls,
                                         const char *const *list, size_t n, kmed_error *err)
{
    size_t i;
    kmed_result r;
    for (i = 0; i < n; i++)
        if ((r = kmed_safety_add(s, cls, list[i], err)) != KMED_OK) return r;
    return KMED_OK;
}

/* Adds "drug & verb" for every pair. */
static kmed_result kmed__safety_add_pairs(kmed_safety *s, const char *const *drugs,
                                          size_t n_drugs, const char *const *verbs,
                                          size_t n_verbs, kmed_error *err)
{
    size_t i, j;
    char tmp[256];
    kmed_result r;
    for (i = 0; i < n_drugs; i++) {
        for (j = 0; j < n_verbs; j++) {
            snprintf(tmp, sizeof tmp, "%s & %s", drugs[i], verbs[j]);
            if ((r = kmed_safety_add(s, KMED_SAFETY_DANGEROUS, tmp, err)) != KMED_OK) return r;
        }
    }
    return KMED_OK;
}

#define KMED__SAFETY_N(a) (sizeof(a) / sizeof((a)[0]))

KMED_API kmed_result kmed_safety_init(kmed_safety *s, kmed_error *err)
{
    kmed_result r = KMED_OK;
    int i;
    memset(s, 0, sizeof *s);
    for (i = 0; i < KMED_SAFETY_NTEXTS && r == KMED_OK; i++)
        r = kmed_safety_set_text(s, (kmed_safety_text)i, kmed__safety_default_texts[i], err);
    if (r == KMED_OK)
        r = kmed__safety_add_list(s, KMED_SAFETY_DOSING, kmed__safety_dosing,
                                  KMED__SAFETY_N(kmed__safety_dosing), err);
    if (r == KMED_OK)
        r = kmed__safety_add_list(s, KMED_SAFETY_DIAGNOSIS, kmed__safety_diagnosis,
                                  KMED__SAFETY_N(kmed__safety_diagnosis), err);
    if (r == KMED_OK)
        r = kmed__safety_add_list(s, KMED_SAFETY_EMERGENCY, kmed__safety_emergency,
                                  KMED__SAFETY_N(kmed__safety_emergency), err);
    if (r == KMED_OK)
        r = kmed__safety_add_list(s, KMED_SAFETY_SELF_HARM, kmed__safety_self_harm,
                                  KMED__SAFETY_N(kmed__safety_self_harm), err);
    if (r == KMED_OK)
        r = kmed__safety_add_list(s, KMED_SAFETY_DANGEROUS, kmed__safety_dangerous,
                                  KMED__SAFETY_N(kmed__safety_dangerous), err);
    if (r == KMED_OK)
        r = kmed__safety_add_pairs(s, kmed__safety_drugs_ko, KMED__SAFETY_N(kmed__safety_drugs_ko),
                                   kmed__safety_verbs_ko, KMED__SAFETY_N(kmed__safety_verbs_ko),
                                   err);
    if (r == KMED_OK)
        r = kmed__safety_add_pairs(s, kmed__safety_drugs_en, KMED__SAFETY_N(kmed__safety_drugs_en),
                                   kmed__safety_verbs_en, KMED__SAFETY_N(kmed__safety_verbs_en),
                                   err);
    if (r != KMED_OK) kmed_safety_free(s);
    return r;
}

/* Trims ASCII whitespace from both ends of s[0..*n) in place; returns the new start. */
static char *kmed__safety_trim(char *s, size_t *n)
{
    while (*n && (*s == ' ' || *s == '\t' || *s == '\r')) { s++; (*n)--; }
    while (*n && (s[*n - 1] == ' ' || s[*n - 1] == '\t' || s[*n - 1] == '\r')) (*n)--;
    s[*n] = 0;
    return s;
}

KMED_API kmed_result kmed_safety_load(kmed_safety *s, const char *path, kmed_error *err)
{
    char *data, *line;
    size_t len, lineno = 0;
    kmed_result r = kmed_file_read(path, (size_t)64 << 20, &data, &len, err);
    if (r != KMED_OK) return r;
    line = data;
    while (line && line < data + len) {
        char *nl = strchr(line, '\n'), *colon, *key, *val;
        size_t kn, vn;
        lineno++;
        if (nl) *nl = 0;
        if (lineno == 1 && (unsigned char)line[0] == 0xEF && (unsigned char)line[1] == 0xBB &&
            (unsigned char)line[2] == 0xBF)
            line += 3; /* UTF-8 BOM */
        kn = strlen(line);
        key = kmed__safety_trim(line, &kn);
        if (kn == 0 || key[0] == '#') { line = nl ? nl + 1 : NULL; continue; }
        colon = strchr(key, ':');
        if (!colon) {
            r = kmed_error_set(err, KMED_ERR_FORMAT, path, lineno, (size_t)-1,
                               "expected 'class: phrase' or 'text.NAME: text'");
            break;
        }
        *colon = 0;
        kn = strlen(key);
        key = kmed__safety_trim(key, &kn);
        vn = strlen(colon + 1);
        val = kmed__safety_trim(colon + 1, &vn);
        if (strncmp(key, "text.", 5) == 0) {
            int t, found = -1;
            char *o = val, *q;
            for (t = 0; t < KMED_SAFETY_NTEXTS; t++)
                if (strcmp(key + 5, kmed__safety_text_names[t]) == 0) found = t;
            if (found < 0) {
                r = kmed_error_set(err, KMED_ERR_FORMAT, path, lineno, (size_t)-1,
                                   "unknown text '%s' (disclaimer, emergency, self_harm, "
                                   "refusal)", key + 5);
                break;
            }
            for (q = val; *q; q++) { /* "\n" escapes, in place */
                if (q[0] == '\\' && q[1] == 'n') { *o++ = '\n'; q++; }
                else *o++ = *q;
            }
            *o = 0;
            if ((r = kmed_safety_set_text(s, (kmed_safety_text)found, val, err)) != KMED_OK)
                break;
        } else {
            int c = kmed_safety_class_parse(key);
            if (c < 0) {
                r = kmed_error_set(err, KMED_ERR_FORMAT, path, lineno, (size_t)-1,
                                   "unknown class '%s' (dosing, diagnosis, emergency, "
                                   "self_harm, dangerous)", key);
                break;
            }
            if (strcmp(val, "!clear") == 0) {
                kmed_safety_clear(s, (kmed_safety_class)c);
            } else if ((r = kmed_safety_add(s, (kmed_safety_class)c, val, err)) != KMED_OK) {
                kmed_error_set(err, r, path, lineno, (size_t)-1, "bad phrase \"%s\"", val);
                break;
            }
        }
        line = nl ? nl + 1 : NULL;
    }
    KMED_FREE(data);
    return r;
}

/* ---- checking ---- */

static void kmed__safety_scan(const kmed_safety *s, const kmed__safety_text *t,
                              kmed_safety_verdict *v)
{
    size_t i;
    for (i = 0; i < s->n_phrases; i++) {
        const kmed_safety_phrase *ph = &s->phrases[i];
        if (v->phrase[ph->cls]) continue;
        if (kmed__safety_phrase_in(t, ph)) {
            v->phrase[ph->cls] = ph->text;
            v->classes |= 1u << ph->cls;
        }
    }
}

/* Classifies one text into v; returns 0 when out of memory. */
static int kmed__safety_scan_str(const kmed_safety *s, const char *str, kmed_safety_verdict *v)
{
    size_t len = strlen(str);
    kmed__safety_text t;
    if (len == 0) return 1;
    t.cp = (uint32_t *)KMED_MALLOC(len * sizeof *t.cp);
    t.sep = (unsigned char *)KMED_MALLOC(len);
    if (!t.cp || !t.sep) {
        KMED_FREE(t.cp);
        KMED_FREE(t.sep);
        return 0;
    }
    t.n = kmed__safety_normalize(str, t.cp, t.sep);
    kmed__safety_scan(s, &t, v);
    KMED_FREE(t.cp);
    KMED_FREE(t.sep);
    return 1;
}

static int kmed__safety_classify(const kmed_safety *s, const char *prompt,
                                 const char *response, kmed_safety_verdict *v)
{
    int ok;
    memset(v, 0, sizeof *v);
    ok = kmed__safety_scan_str(s, prompt ? prompt : "", v) &&
         kmed__safety_scan_str(s, response ? response : "", v);
    if (v->classes & (1u << KMED_SAFETY_DANGEROUS)) v->action = KMED_SAFETY_REFUSE;
    else if (v->classes) v->action = KMED_SAFETY_DISCLAIMER;
    else v->action = KMED_SAFETY_PASS;
    return ok;
}

KMED_API void kmed_safety_classify(const kmed_safety *s, const char *prompt,
                                   const char *response, kmed_safety_verdict *v)
{
    /* Out of memory cannot go unnoticed silently here: refuse rather than pass. */
    if (!kmed__safety_classify(s, prompt, response, v)) v->action = KMED_SAFETY_REFUSE;
}

KMED_API kmed_result kmed_safety_check(const kmed_safety *s, const char *prompt,
                                       const char *response, kmed_safety_verdict *v,
                                       char **text, kmed_error *err)
{
    kmed_safety_verdict local;
    kmed_buf b = {0};
    const char *resp = response ? response : "";
    size_t n;
    *text = NULL;
    if (!v) v = &local;
    if (!kmed__safety_classify(s, prompt, response, v))
        return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
    if (v->action == KMED_SAFETY_REFUSE) {
        kmed_buf_puts(&b, s->texts[KMED_SAFETY_TEXT_REFUSAL] ?
                          s->texts[KMED_SAFETY_TEXT_REFUSAL] : "");
    } else {
        n = strlen(resp);
        kmed_buf_put(&b, resp, n);
        if (v->action == KMED_SAFETY_DISCLAIMER) {
            /* Drop trailing whitespace so the note sits one blank line below the answer. */
            while (b.len && (b.data[b.len - 1] == ' ' || b.data[b.len - 1] == '\n' ||
                             b.data[b.len - 1] == '\t' || b.data[b.len - 1] == '\r'))
                b.data[--b.len] = 0;
            if (b.len) kmed_buf_puts(&b, "\n\n");
            if (s->texts[KMED_SAFETY_TEXT_DISCLAIMER])
                kmed_buf_puts(&b, s->texts[KMED_SAFETY_TEXT_DISCLAIMER]);
            if ((v->classes & (1u << KMED_SAFETY_EMERGENCY)) &&
                s->texts[KMED_SAFETY_TEXT_EMERGENCY]) {
                kmed_buf_puts(&b, "\n");
                kmed_buf_puts(&b, s->texts[KMED_SAFETY_TEXT_EMERGENCY]);
            }
            if ((v->classes & (1u << KMED_SAFETY_SELF_HARM)) &&
                s->texts[KMED_SAFETY_TEXT_SELF_HARM]) {
                kmed_buf_puts(&b, "\n");
                kmed_buf_puts(&b, s->texts[KMED_SAFETY_TEXT_SELF_HARM]);
            }
        }
    }
    if (!b.data) kmed_buf_put(&b, "", 0);
    if (b.failed) {
        kmed_buf_free(&b);
        return KMED__ERR(err, KMED_ERR_NOMEM, "safety: out of memory");
    }
    *text = b.data;
    return KMED_OK;
}

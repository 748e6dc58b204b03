/* ---- safety: medical-answer filter and disclaimers ----
   A phrase filter over the prompt and the generated answer. Each phrase belongs to a class;
   a match anywhere in the prompt or the answer marks the class. Any "dangerous" match
   (lethal-dose and overdose requests, making or obtaining illegal drugs, self-harm
   methods) replaces the answer with a refusal that points to professional help; any other
   class appends a Korean + English disclaimer, plus the 119 emergency line (emergency
   class) or the 1393 suicide-prevention line (self-harm class).

   Matching: text and phrases are decoded from UTF-8, conjoining Hangul jamo are composed
   into syllables (NFC for Hangul, so NFD input from macOS matches), ASCII is lower-cased,
   and whitespace is ignored on both sides ("복용 하세요" matches "복용하세요"). Phrase syntax:
     '#'   one or more digits (with inner '.' or ','): "하루 # 번", "#mg"
     '&'   separates parts that must all occur in the same text (prompt or answer):
           "필로폰 & 구하"
     '*'   at the end: the last word may continue ("overdos*" matches "overdosed").
   A phrase part that starts with an ASCII letter or digit matches only at a word start, and
   one that ends with one only at a word end, where a following '/' is not a word end (so
   "#mg" does not match the lab unit "126 mg/dL"). Korean parts match anywhere. */

typedef enum kmed_safety_class {
    KMED_SAFETY_DOSING,      /* dosing instructions: "하루 3번", "500 mg", "twice a day" */
    KMED_SAFETY_DIAGNOSIS,   /* a diagnosis of the user: "의심됩니다", "you may have" */
    KMED_SAFETY_EMERGENCY,   /* acute danger: "숨을 쉴 수 없", "chest pain" */
    KMED_SAFETY_SELF_HARM,   /* suicide or self-harm: "죽고 싶", "kill myself" */
    KMED_SAFETY_DANGEROUS,   /* clearly dangerous requests: refused */
    KMED_SAFETY_NCLASSES
} kmed_safety_class;

typedef enum kmed_safety_action {
    KMED_SAFETY_PASS,        /* answer unchanged */
    KMED_SAFETY_DISCLAIMER,  /* answer + disclaimer (+ emergency / self-harm lines) */
    KMED_SAFETY_REFUSE       /* answer replaced by the refusal text */
} kmed_safety_action;

/* Texts added or substituted by the filter. */
typedef enum kmed_safety_text {
    KMED_SAFETY_TEXT_DISCLAIMER,  /* appended for every non-dangerous class */
    KMED_SAFETY_TEXT_EMERGENCY,   /* appended after it for the emergency class (119) */
    KMED_SAFETY_TEXT_SELF_HARM,   /* appended after it for the self-harm class (1393) */
    KMED_SAFETY_TEXT_REFUSAL,     /* replaces the answer for the dangerous class */
    KMED_SAFETY_NTEXTS
} kmed_safety_text;

typedef struct kmed_safety_phrase {
    kmed_safety_class cls;
    char *text;                   /* the phrase as given (owned) */
    uint32_t *cps;                /* private: normalized code points, parts split by 0 */
    size_t n_cps;
} kmed_safety_phrase;

/* A filter configuration. Owns its phrases and texts; free with kmed_safety_free. A
   configured filter is read-only during checks, so threads may share it. */
typedef struct kmed_safety {
    size_t n_phrases, cap_phrases;
    kmed_safety_phrase *phrases;
    char *texts[KMED_SAFETY_NTEXTS];
} kmed_safety;

/* The verdict of one check. */
typedef struct kmed_safety_verdict {
    kmed_safety_action action;
    unsigned classes;             /* bit (1u << c) set for every class c that matched */
    const char *phrase[KMED_SAFETY_NCLASSES]; /* first matching phrase per class, or NULL;
                                                 points into the filter's phrases */
} kmed_safety_verdict;

/* Fills s with the built-in Korean and English phrase lists and texts. */
KMED_API kmed_result kmed_safety_init(kmed_safety *s, kmed_error *err);
KMED_API void kmed_safety_free(kmed_safety *s);
/* Adds one phrase (syntax above). KMED_ERR_ARG for an empty phrase or a bad class. */
KMED_API kmed_result kmed_safety_add(kmed_safety *s, kmed_safety_class cls, const char *phrase,
                                     kmed_error *err);
/* Removes every phrase of class cls (built-in ones included). */
KMED_API void kmed_safety_clear(kmed_safety *s, kmed_safety_class cls);
/* Replaces one of the texts (copied). */
KMED_API kmed_result kmed_safety_set_text(kmed_safety *s, kmed_safety_text which,
                                          const char *text, kmed_error *err);
/* Extends or overrides the configuration from a UTF-8 file of lines:
       # comment                        (blank lines are ignored too)
       dosing: 하루 # 번                 add a phrase to a class (dosing, diagnosis,
                                         emergency, self_harm, dangerous)
       dosing: !clear                    drop that class's phrases, built-in ones included
       text.disclaimer: ※ ...\n...      replace a text (disclaimer, emergency, self_harm,
                                         refusal); "\n" becomes a newline
   Errors name file:line. */
KMED_API kmed_result kmed_safety_load(kmed_safety *s, const char *path, kmed_error *err);

/* Classifies without allocating. prompt and response may be NULL (treated as ""). */
KMED_API void kmed_safety_classify(const kmed_safety *s, const char *prompt,
                                   const char *response, kmed_safety_verdict *v);
/* Classifies and builds the final answer: *text (free with kmed_free) is the response
   (PASS), the response plus disclaimer lines (DISCLAIMER) or the refusal (REFUSE).
   v may be NULL. */
KMED_API kmed_result kmed_safety_check(const kmed_safety *s, const char *prompt,
                                       const char *response, kmed_safety_verdict *v,
                                       char **text, kmed_error *err);

/* Names: "dosing", "diagnosis", "emergency", "self_harm", "dangerous"; "pass",
   "disclaimer", "refuse". parse returns -1 for an unknown name. */
KMED_API const char *kmed_safety_class_name(kmed_safety_class c);
KMED_API int kmed_safety_class_parse(const char *name);
KMED_API const char *kmed_safety_action_name(kmed_safety_action a);

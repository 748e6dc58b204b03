/* ---- mcqa: KorMedMCQA items, lm-evaluation-harness prompts, scoring, statistics ---- */

#define KMED_MCQA_NOPT 5            /* options A..E */
#define KMED_MCQA_MAX_SUBSETS 8

/* One exam item with the HF dataset's fields. answer is 1..5. Strings are owned by the
   set that holds the item; cot may be NULL. */
typedef struct kmed_mcqa_item {
    char *id;                       /* "<subset>-<year>-<period>-<q_number>" or "file:line" */
    char *subset;                   /* doctor, nurse, pharm, dentist, or "other" */
    char *subject, *period, *question, *cot;
    char *opt[KMED_MCQA_NOPT];
    int year, q_number, answer;
} kmed_mcqa_item;

typedef struct kmed_mcqa_set { kmed_mcqa_item *items; size_t n, cap; } kmed_mcqa_set;

/* Appends the items of a JSONL, JSON-array or CSV export (by extension; CSV needs a
   header). The subset is `subset` when non-NULL, else the item's "subset" field, else a
   subset name found in the file name, else "other". An item with a missing option or an
   answer outside 1..5 (digits or a letter A-E) fails the load naming file:line; other
   content (\r, fullwidth punctuation, tables) is kept as it is. Free with kmed_mcqa_free. */
KMED_API kmed_result kmed_mcqa_load(kmed_mcqa_set *set, const char *path, const char *subset,
                                    kmed_error *err);
KMED_API void kmed_mcqa_free(kmed_mcqa_set *set);
/* Keeps the first n items (frees the rest); no-op when the set is not larger. */
KMED_API void kmed_mcqa_truncate(kmed_mcqa_set *set, size_t n);

/* The lm-evaluation-harness kormedmcqa item text:
   "{question stripped}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nE. {E}\n정답：" (U+FF1A colon). */
KMED_API void kmed_mcqa_item_text(const kmed_mcqa_item *item, kmed_buf *out);
/* The part of every prompt of `subset` that precedes the item text: the first `shots`
   items of that subset in `fewshot` (may be NULL when shots is 0), each as item text +
   " " + answer letter, joined and followed by "\n\n"; under `chat` wrapped as the start of
   Gemma's user turn ("<bos><start_of_turn>user\n" + exemplars). KMED_ERR_NOT_FOUND if the
   fewshot set has fewer than `shots` items of the subset. */
KMED_API kmed_result kmed_mcqa_prefix(const kmed_mcqa_set *fewshot, const char *subset,
                                      int shots, int chat, kmed_buf *out, kmed_error *err);
/* Full prompt = prefix + item text (+ "<end_of_turn>\n<start_of_turn>model\n" under chat). */
KMED_API kmed_result kmed_mcqa_prompt(const kmed_mcqa_item *item, const kmed_mcqa_set *fewshot,
                                      int shots, int chat, kmed_buf *out, kmed_error *err);

/* lm-eval's kormedmcqa answer extraction: the first pattern that matches wins, and within
   it the last match: 정답[:\s]*([A-E]), 정답은\s*([A-E])\s*입니다, \b([A-E])\., \b([A-E])\b,
   all case-insensitive, \s and \b Unicode-aware. Returns 0..4 for A..E, or -1. */
KMED_API int kmed_mcqa_extract(const char *text, size_t len);

/* Statistics. Wilson score interval for k of n at normal quantile z (1.96 for 95%). */
KMED_API void kmed_mcqa_wilson(size_t k, size_t n, double z, double *lo, double *hi);
/* Exact two-sided McNemar p-value for b and c discordant pairs (binomial, p = 0.5). */
KMED_API double kmed_mcqa_mcnemar(size_t b, size_t c);

/* Scoring. */
typedef enum kmed_mcqa_method {
    KMED_MCQA_LETTER,    /* log-likelihood of each answer letter after the prompt */
    KMED_MCQA_GENERATE,  /* greedy generation + answer extraction */
    KMED_MCQA_OPTION     /* log-likelihood of " {option text}" per byte (acc_norm) */
} kmed_mcqa_method;

typedef struct kmed_mcqa_config {
    kmed_mcqa_method method;
    int shots;                      /* exemplars from `fewshot` per subset (0 = zero-shot) */
    int chat;                       /* wrap in Gemma's chat template */
    int max_gen_tokens;             /* GENERATE: 0 = 32 */
    int no_prefix_cache;            /* recompute the shared prefix for every item */
    int fast;                       /* forward with KMED_FWD_FAST (quantized activations) */
    const kmed_mcqa_set *fewshot;
} kmed_mcqa_config;

/* Prediction for one item. pred: 0..4, or -1 when a generation had no extractable letter. */
typedef struct kmed_mcqa_pred {
    int pred;
    float score[KMED_MCQA_NOPT];    /* log-probabilities (LETTER, OPTION), 0 for GENERATE */
    char *generation;               /* GENERATE: the text (owned; kmed_mcqa_preds_free) */
} kmed_mcqa_pred;
KMED_API void kmed_mcqa_preds_free(kmed_mcqa_pred *preds, size_t n);

/* Scores every item of `set` with `model` (+ `lora`, may be NULL) into preds[0..set->n).
   Prompts are tokenized with a <bos> first (as lm-eval does for Gemma; under chat the
   template's own). The few-shot prefix of each subset is run once and its KV cache
   reused for every item (unless cfg->no_prefix_cache), so an item costs one prefill of
   its own tokens. Progress goes to cb ("eval", items). */
KMED_API kmed_result kmed_mcqa_score(const kmed_gemma *model, const kmed_lora *lora,
                                     const kmed_tok *tok, kmed_pool *pool,
                                     const kmed_mcqa_set *set, const kmed_mcqa_config *cfg,
                                     kmed_mcqa_pred *preds, const kmed_callbacks *cb,
                                     kmed_error *err);

/* Accuracy of one subset, or of all items. */
typedef struct kmed_mcqa_acc {
    char subset[16];
    size_t n, correct, unparsed;
    double acc, lo, hi;             /* 95% Wilson interval */
} kmed_mcqa_acc;
typedef struct kmed_mcqa_summary {
    size_t n_subsets;
    kmed_mcqa_acc sub[KMED_MCQA_MAX_SUBSETS]; /* in order doctor, nurse, pharm, dentist, other */
    kmed_mcqa_acc overall;          /* weighted by subset size (as lm-eval reports) */
    double macro;                   /* plain mean of the subset accuracies */
} kmed_mcqa_summary;
KMED_API void kmed_mcqa_summarize(const kmed_mcqa_set *set, const kmed_mcqa_pred *preds,
                                  kmed_mcqa_summary *s);

/* One prediction as a JSONL line (no newline): id, subset, answer, pred, correct, scores,
   generation. */
KMED_API void kmed_mcqa_pred_json(const kmed_mcqa_item *item, const kmed_mcqa_pred *p,
                                  kmed_buf *out);
/* Summary JSON shaped like lm-evaluation-harness results ("results" per task
   kormedmcqa_<subset> and the group "kormedmcqa", "n-samples", "config"), plus a "kmed"
   block: method, shots, chat, macro average, Wilson intervals, unparsed counts, and the
   predictions file name. */
KMED_API void kmed_mcqa_report_json(const kmed_mcqa_summary *s, const kmed_mcqa_config *cfg,
                                    const char *model_name, const char *preds_path,
                                    kmed_buf *out);
/* SVG bar chart: accuracy per subset and overall with Wilson whiskers, one bar per run
   (e.g. base and adapter) and a dashed chance line at 20%. */
KMED_API void kmed_mcqa_chart_svg(const kmed_mcqa_summary *runs, const char *const *labels,
                                  size_t n_runs, kmed_buf *out);

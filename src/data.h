/* ---- data: source readers, cleaning, dedup, decontamination, safety, formatting, packing ----

   The pipeline streams records one at a time:

       read (kmed_data_open/next) -> clean (kmed_data_record_clean) -> length / Korean-share
       filters -> harmful-content filter (kmed_data_safety) -> decontamination against eval
       items (kmed_data_decontam) -> exact + near dedup (kmed_data_dedup) -> mixing weight
       -> format (SFT chat or CPT text JSON lines) -> shuffle + train/val split -> packing
       into fixed-length token sequences (kmed_data_packer, needs an encode callback).

   Everything up to the JSONL outputs needs no tokenizer; only packing does, through
   kmed_data_encode_fn, so the data module does not depend on kmed_tok. kmed_data_run does
   it all from a kmed_data_config and fills a kmed_data_report in which, per source,
   n_in == n_kept + sum(n_drop[]) always holds. */

#ifndef KMED_DATA_MAX_OPTIONS
#define KMED_DATA_MAX_OPTIONS 10
#endif
#ifndef KMED_DATA_MAX_MAP
#define KMED_DATA_MAX_MAP 16
#endif
#ifndef KMED_DATA_MAX_RECORD_BYTES
#define KMED_DATA_MAX_RECORD_BYTES ((size_t)16 << 20) /* one record's text after cleaning */
#endif

typedef enum kmed_data_kind {
    KMED_DATA_MCQA,  /* KorMedMCQA: question, A-E, answer 1-5, cot, subset, split */
    KMED_DATA_EXPQA, /* MedExpQA-style: question, options (object or list), answer, explanation */
    KMED_DATA_CONV,  /* UltraMedical-style: conversations/messages lists */
    KMED_DATA_COD,   /* clinical case (description, symptoms) -> diagnosis, or a dialogue */
    KMED_DATA_DICT,  /* disease dictionary: name + named sections (정의, 원인, 증상, ...) */
    KMED_DATA_KIND_N
} kmed_data_kind;

/* "kormedmcqa", "medexpqa", "ultramedical", "cod", "dict". */
KMED_API const char *kmed_data_kind_name(kmed_data_kind k);
/* Accepts those names and aliases (mcqa, expqa, conv, chat, dictionary, asan). */
KMED_API kmed_result kmed_data_kind_parse(const char *s, kmed_data_kind *k, kmed_error *err);

typedef enum kmed_data_format {
    KMED_DATA_FMT_AUTO, /* dict -> cpt; every other kind -> sft */
    KMED_DATA_FMT_SFT,  /* chat example: {"id","source","messages":[...]} */
    KMED_DATA_FMT_CPT,  /* plain document: {"id","source","text"} */
    KMED_DATA_FMT_BOTH  /* one of each */
} kmed_data_format;

/* One input source. Zero-initialise; zero means default everywhere. */
typedef struct kmed_data_source {
    char name[64];          /* label in ids and reports; "" = file name without extension */
    kmed_data_kind kind;
    char path[1024];        /* .jsonl, .json (array, or object holding one array) or .csv */
    double weight;          /* mixing weight: copies per kept record (0 = 1; 0.5 keeps half;
                               negative: none kept) */
    kmed_data_format format;
    double min_korean;      /* > 0: drop records whose Hangul share of letters is lower */
    int strip_html;         /* 1: strip tags in every field (always on for dict) */
    int no_explanation;     /* 1: drop cot/explanations, so answers are the option alone */
    char subset[16];        /* mcqa: force the subset ("" = column, else from file name) */
    char split[16];         /* mcqa: force the split ("" = column, else from file name) */
    char splits[64];        /* comma list of splits to keep ("" = all) */
    size_t n_map;           /* field map overrides: dst (canonical name) = src (input key; */
    struct { char dst[32]; char src[64]; } map[KMED_DATA_MAX_MAP]; /* "a.b" descends) */
} kmed_data_source;

/* Adds or replaces a "dst=src" override in src->map. KMED_ERR_ARG on bad syntax or an
   unknown dst for the source's kind (the message lists the valid ones). */
KMED_API kmed_result kmed_data_source_map(kmed_data_source *src, const char *dst_eq_src,
                                          kmed_error *err);

/* A (key, text) pair: a chat turn (key "user" or "assistant") or a dictionary section
   (key = section name). */
typedef struct kmed_data_pair { char *key; char *text; } kmed_data_pair;

/* One record in canonical form. All strings are owned (NULL = absent); free with
   kmed_data_record_free. */
typedef struct kmed_data_record {
    kmed_data_kind kind;
    char *id;           /* stable: "<source>:<id field>" or "<source>:<file>:<line>" */
    char *source;       /* source name */
    char *file;         /* base name of the input file */
    size_t line;        /* line (JSONL, CSV) or 1-based element index (JSON array) */
    char *subset, *split, *subject, *lang;
    int year, period, q_number;         /* mcqa, 0 = absent */
    char *title;        /* dict: disease name */
    char *question;     /* mcqa/expqa: question; cod: case description */
    char *symptoms;     /* cod */
    char *options[KMED_DATA_MAX_OPTIONS];
    int n_options;
    int answer;         /* 1-based option index, 0 = none */
    char *answer_text;  /* cod: diagnosis */
    char *explanation;  /* cot / explanation / reasoning */
    kmed_data_pair *turns;    size_t n_turns;     /* conv, cod dialogue: user/assistant */
    kmed_data_pair *sections; size_t n_sections;  /* dict */
    int flagged;        /* set by the pipeline when the safety filter only flags */
} kmed_data_record;

KMED_API void kmed_data_record_free(kmed_data_record *rec);

/* Maps one JSON object onto rec (freed first) with the kind's preset field names and
   src's overrides. file/line label the id and errors. KMED_ERR_FORMAT names file:line and
   the missing or mistyped field; rec is then empty. */
KMED_API kmed_result kmed_data_from_json(kmed_data_record *rec, const kmed_json *obj,
                                         const kmed_data_source *src, const char *file,
                                         size_t line, kmed_error *err);

/* Streaming reader over one source file. Borrows src until kmed_data_close. */
typedef struct kmed_data_reader {
    const kmed_data_source *src;
    char file[256];           /* base name, for ids and messages */
    char subset[16], split[16]; /* guessed from the file name ("" = none) */
    int fmt_;                 /* private: 0 jsonl, 1 json array, 2 csv */
    kmed_jsonl jsonl_;
    kmed_csv csv_;
    kmed_json_doc doc_;       /* json array file */
    const kmed_json *arr_;
    size_t idx_;
    kmed_json row_;           /* csv row as a JSON object */
    kmed_json *row_kids_;
    kmed_error err_;          /* private: why a JSON file did not parse */
    int done_;
} kmed_data_reader;

KMED_API kmed_result kmed_data_open(kmed_data_reader *r, const kmed_data_source *src,
                                    kmed_error *err);
/* Reads the next record into rec (freed first). *eof = 1 at the end. A malformed line,
   row or record returns KMED_ERR_FORMAT (or KMED_ERR_LIMIT) with err naming file:line;
   the reader stays usable and the caller may go on. A whole JSON file that does not
   parse counts as one malformed record. */
KMED_API kmed_result kmed_data_next(kmed_data_reader *r, kmed_data_record *rec, int *eof,
                                    kmed_error *err);
KMED_API void kmed_data_close(kmed_data_reader *r);

/* ---- text cleaning ---- */

/* Appends the NFC form of UTF-8 s[0..n) to out: Hangul jamo composed algorithmically
   (L V -> LV, LV T -> LVT), marks reordered by combining class and composed with a table
   of Latin, Greek, Cyrillic and kana primary composites, canonical singletons (U+212B,
   CJK compatibility ideographs U+F900-FAD9, ...) mapped. Scripts outside those tables
   pass through unchanged. Invalid UTF-8 bytes become U+FFFD. */
KMED_API void kmed_data_nfc(kmed_buf *out, const char *s, size_t n);

enum {
    KMED_DATA_CLEAN_HTML = 1,    /* strip tags (<br>, </p>, <li> become line breaks) */
    KMED_DATA_CLEAN_ONELINE = 2  /* line breaks become spaces (options, titles) */
};
/* Appends the cleaned form of s[0..n) to out: optional tag stripping, HTML entity
   decoding (named and numeric), NFC, control characters, U+FFFD, zero-width characters
   and soft hyphens removed, "\r\n" and "\r" -> "\n", Unicode spaces -> ' ', runs of
   spaces collapsed, spaces around line breaks trimmed, at most one blank line, ends
   trimmed. */
KMED_API void kmed_data_clean_text(kmed_buf *out, const char *s, size_t n, int flags);
/* Cleans every text field of rec in place; empty fields become NULL. */
KMED_API kmed_result kmed_data_record_clean(kmed_data_record *rec, int strip_html,
                                            kmed_error *err);
/* Hangul syllables and jamo over all letters (Hangul, Latin, Greek, Cyrillic, Han, kana);
   1 for text with no letters. */
KMED_API double kmed_data_korean_share(const char *s, size_t n);
/* All of a record's text, fields separated by '\n' (what filters and dedup look at). */
KMED_API void kmed_data_record_text(const kmed_data_record *rec, kmed_buf *out);
/* The question part (mcqa/expqa question, cod case, the first user turn, dict title):
   what near-duplicate decontamination compares. */
KMED_API void kmed_data_record_question(const kmed_data_record *rec, kmed_buf *out);

/* ---- hashing, MinHash, dedup ---- */

KMED_API uint64_t kmed_data_hash64(const void *data, size_t n, uint64_t seed);
/* MinHash signature sig[num_perm] over the character n-grams (code points; whitespace
   runs count as one space, ASCII lowercased) of s[0..n). A text shorter than ngram
   characters is one shingle. */
KMED_API void kmed_data_minhash(uint32_t *sig, int num_perm, const char *s, size_t n,
                                int ngram);
/* Fraction of equal signature entries: an unbiased estimate of the Jaccard similarity. */
KMED_API double kmed_data_minhash_sim(const uint32_t *a, const uint32_t *b, int num_perm);

typedef struct kmed_data_dedup_config {
    int no_exact, no_near;
    double threshold;  /* near-dup: estimated Jaccard >= threshold (0 = 0.8) */
    int ngram;         /* character n-gram (0 = 5) */
    int num_perm;      /* MinHash size (0 = 128) */
    int bands;         /* LSH bands, must divide num_perm (0 = chosen from threshold) */
} kmed_data_dedup_config;

/* Exact index (64-bit hashes of the normalised text) and MinHash-LSH index. Memory:
   16 B per item for exact, 4*num_perm + 12*bands B per item for near. */
typedef struct kmed_data_dedup {
    kmed_data_dedup_config cfg;
    int rows;                     /* num_perm / bands */
    uint64_t *ex_keys; uint32_t *ex_vals; size_t ex_cap, ex_n;  /* open addressing */
    uint32_t *sigs; size_t n_items, cap_items;                   /* (n_items, num_perm) */
    uint64_t *bk_keys; uint32_t *bk_head; size_t bk_cap, bk_n;  /* band key -> first item */
    uint32_t *bk_next;            /* (cap_items, bands): next item in the same bucket */
    uint32_t *sig_tmp;            /* [num_perm] scratch */
} kmed_data_dedup;

KMED_API kmed_result kmed_data_dedup_init(kmed_data_dedup *d, const kmed_data_dedup_config *cfg,
                                          kmed_error *err);
KMED_API void kmed_data_dedup_free(kmed_data_dedup *d);
/* Looks s[0..n) up; if it is new and add is set, adds it as item d->n_items. *dup: 0 new,
   1 exact duplicate, 2 near duplicate of item *of (estimated Jaccard *sim). */
KMED_API kmed_result kmed_data_dedup_check(kmed_data_dedup *d, const char *s, size_t n,
                                           int add, int *dup, size_t *of, double *sim,
                                           kmed_error *err);

/* ---- decontamination ---- */

typedef struct kmed_data_decontam_config {
    int word_n;        /* shared word n-gram length (0 = 13) */
    int char_n;        /* shared character n-gram over the Hangul and Han characters only
                          (spaces, punctuation, digits and Latin skipped), for Korean where
                          words are long and spaces few (0 = 50, about 13 words) */
    double threshold;  /* near-duplicate question: estimated Jaccard (0 = 0.8) */
} kmed_data_decontam_config;

typedef struct kmed_data_decontam {
    kmed_data_decontam_config cfg;
    uint64_t *keys; uint32_t *vals; size_t cap, n;  /* n-gram hash -> eval item */
    kmed_data_dedup near;                            /* eval questions, MinHash LSH */
    char **ids; size_t n_items, cap_items;           /* eval item ids */
    size_t hit_item_;                                /* private */
} kmed_data_decontam;

KMED_API kmed_result kmed_data_decontam_init(kmed_data_decontam *d,
                                             const kmed_data_decontam_config *cfg,
                                             kmed_error *err);
KMED_API void kmed_data_decontam_free(kmed_data_decontam *d);
/* Adds an evaluation item: its full text (n-grams) and its question (near dup). */
KMED_API kmed_result kmed_data_decontam_add(kmed_data_decontam *d, const char *id,
                                            const char *text, size_t n, const char *question,
                                            size_t qn, kmed_error *err);
/* Returns 0 (clean) or 1 word n-gram, 2 character n-gram, 3 near-duplicate question;
   *item: the eval item hit; *sim: the estimated Jaccard for 3. */
KMED_API int kmed_data_decontam_check(kmed_data_decontam *d, const char *text, size_t n,
                                      const char *question, size_t qn, size_t *item,
                                      double *sim);

/* ---- harmful-content filter ---- */

/* Phrase lists by category. Matching ignores whitespace and ASCII case, so "자살 방법"
   also matches "자살방법". */
typedef struct kmed_data_safety {
    size_t n;
    char **category;   /* [n] */
    char **phrase;     /* [n] squashed (no whitespace, lowercase ASCII) */
    size_t cap;
} kmed_data_safety;

/* with_defaults: 1 loads the built-in Korean and English lists for self_harm, drugs
   (illegal synthesis), dosing (dangerous dosing) and abuse (abusive language). */
KMED_API kmed_result kmed_data_safety_init(kmed_data_safety *s, int with_defaults,
                                           kmed_error *err);
KMED_API kmed_result kmed_data_safety_add(kmed_data_safety *s, const char *category,
                                          const char *phrase, kmed_error *err);
/* 1 if s[0..n) contains a listed phrase; *category and *phrase (may be NULL) point into
   the list (phrase in its squashed form). */
KMED_API int kmed_data_safety_check(const kmed_data_safety *s, const char *text, size_t n,
                                    const char **category, const char **phrase);
KMED_API void kmed_data_safety_free(kmed_data_safety *s);
/* The standard disclaimer appended to medical answers when configured (Korean, or English
   for answers to a question that is not mostly Hangul). */
KMED_API const char *kmed_data_disclaimer(int korean);

/* ---- formatting ---- */

/* Appends one JSON line (with '\n') for an SFT chat example: {"id","source","messages":
   [{"role":"user","content":...},{"role":"assistant","content":...},...]}. mcqa/expqa:
   user = question + "A. ..." option lines, assistant = "C. <option>" + explanation;
   cod: case -> diagnosis (or its dialogue); conv: its turns (a system turn is merged into
   the first user turn). disclaimer (NULL = none) is appended to assistant turns of conv
   and cod records. KMED_ERR_ARG if the record cannot form a chat (e.g. dict). */
KMED_API kmed_result kmed_data_format_sft(const kmed_data_record *rec, const char *disclaimer,
                                          kmed_buf *out, kmed_error *err);
/* Appends one JSON line for a continued pre-training document: {"id","source","text"}.
   dict: title + "\n\n" + "name\ntext" sections; mcqa/expqa: question, options, answer and
   explanation; conv/cod: the turns as plain text. */
KMED_API kmed_result kmed_data_format_cpt(const kmed_data_record *rec, kmed_buf *out,
                                          kmed_error *err);

/* ---- packing ---- */

/* Encodes text[0..len) without special tokens into ids[0..cap). If cap is too small
   returns KMED_ERR_SPACE with *n = count needed. */
typedef kmed_result (*kmed_data_encode_fn)(void *user, const char *text, size_t len, int *ids,
                                           size_t cap, size_t *n, kmed_error *err);

typedef struct kmed_data_pack_config {
    size_t seq_len;          /* tokens per sequence (0 = 1024) */
    int bos_id, eos_id;      /* 0 = Gemma's 2 and 1 */
    int pad_id;              /* Gemma's <pad> is 0 */
    int sot_id, eot_id;      /* <start_of_turn>, <end_of_turn>: 0 = Gemma's 106 and 107 */
    int truncate_long;       /* 1: a document longer than seq_len is cut, not continued */
    kmed_data_encode_fn encode;
    void *encode_user;
} kmed_data_pack_config;

/* Packs examples into sequences of seq_len tokens: each example is <bos> + tokens (+<eos>
   for documents), examples follow one another and the last sequence is padded. labels
   equal input_ids where trained and -100 elsewhere: the <bos> of every example (so no
   example is trained to follow the previous one), padding, and for chat examples
   everything but the assistant replies and their <end_of_turn>. A chat example longer
   than seq_len is truncated; a document continues in the next sequence. */
typedef struct kmed_data_packer {
    kmed_data_pack_config cfg;
    int *ids, *labels;       /* [seq_len] the sequence being filled */
    size_t fill;
    int *tmp; size_t tmp_cap;
    int *ex_ids, *ex_lab; size_t ex_n, ex_cap;  /* the current example */
    int *model_prefix; size_t n_model_prefix;   /* ids of "model\n" */
    int *user_prefix; size_t n_user_prefix;     /* ids of "user\n" */
    int *nl; size_t n_nl;                       /* ids of "\n" */
    size_t n_seqs, n_examples, n_tokens, n_trained, n_pad, n_truncated;
} kmed_data_packer;

KMED_API kmed_result kmed_data_pack_init(kmed_data_packer *p, const kmed_data_pack_config *cfg,
                                         kmed_error *err);
KMED_API void kmed_data_pack_free(kmed_data_packer *p);
/* Adds one example (a JSON object with "text" or "messages") and appends every sequence it
   completes to out as {"input_ids":[...],"labels":[...]}\n lines. */
KMED_API kmed_result kmed_data_pack_add(kmed_data_packer *p, const kmed_json *example,
                                        kmed_buf *out, kmed_error *err);
/* Pads and appends the last partial sequence, if any. */
KMED_API kmed_result kmed_data_pack_finish(kmed_data_packer *p, kmed_buf *out,
                                           kmed_error *err);

/* ---- the whole pipeline ---- */

typedef enum kmed_data_drop {
    KMED_DATA_DROP_MALFORMED,    /* read: bad JSON line, ragged CSV row, missing field */
    KMED_DATA_DROP_SPLIT,        /* read: split not in the source's splits list */
    KMED_DATA_DROP_EMPTY,        /* clean: nothing left after cleaning */
    KMED_DATA_DROP_TOO_SHORT,    /* filter: fewer than min_chars */
    KMED_DATA_DROP_TOO_LONG,     /* filter: more than max_chars */
    KMED_DATA_DROP_NOT_KOREAN,   /* filter: Hangul share below the source's min_korean */
    KMED_DATA_DROP_HARMFUL,      /* safety: a listed phrase (action drop) */
    KMED_DATA_DROP_CONTAM_NGRAM, /* decontam: shares a long n-gram with an eval item */
    KMED_DATA_DROP_CONTAM_NEAR,  /* decontam: near-duplicate of an eval question */
    KMED_DATA_DROP_EXACT_DUP,    /* dedup: same normalised text as a kept record */
    KMED_DATA_DROP_NEAR_DUP,     /* dedup: MinHash near duplicate of a kept record */
    KMED_DATA_DROP_MIX,          /* mix: sampled out by a weight below 1 */
    KMED_DATA_DROP_N
} kmed_data_drop;

/* "malformed", "split", ... and the stage each reason belongs to ("read", "clean", ...). */
KMED_API const char *kmed_data_drop_name(kmed_data_drop d);
KMED_API const char *kmed_data_drop_stage(kmed_data_drop d);

typedef struct kmed_data_config {
    kmed_data_source *sources; size_t n_sources;
    kmed_data_source *evals; size_t n_evals;   /* eval sets to decontaminate against */
    char out_dir[1024];
    size_t min_chars;        /* 0 = 8 */
    size_t max_chars;        /* 0 = 20000 */
    kmed_data_dedup_config dedup;
    kmed_data_decontam_config decontam;
    int safety_action;       /* 0 drop, 1 flag (keep, counted), 2 off */
    int safety_no_defaults;  /* 1: only the phrases in safety_extra */
    kmed_data_safety *safety_extra;  /* borrowed; extra phrases (NULL = none) */
    int disclaimer;          /* 1: append disclaimer_text (or kmed_data_disclaimer) */
    char disclaimer_text[512];
    uint64_t seed;           /* shuffle and weight sampling */
    double val_fraction;     /* 0 = 0.05; negative = no validation set */
    kmed_data_pack_config pack;  /* packing runs when pack.encode is set */
    int no_drop_log;         /* 1: do not write drops.jsonl */
} kmed_data_config;

/* Reads a JSON config (format in the kmed-data --help text). Relative paths in it are
   taken from the config file's directory. Free with kmed_data_config_free. */
KMED_API kmed_result kmed_data_config_load(kmed_data_config *cfg, const char *path,
                                           kmed_error *err);
/* Frees sources, evals and safety_extra allocated by kmed_data_config_load or
   kmed_data_config_add_source. */
KMED_API void kmed_data_config_free(kmed_data_config *cfg);
/* Appends a zeroed source (or eval set) and returns it in *out. */
KMED_API kmed_result kmed_data_config_add_source(kmed_data_config *cfg, int eval,
                                                 kmed_data_source **out, kmed_error *err);

typedef struct kmed_data_source_report {
    char name[64];
    kmed_data_kind kind;
    size_t n_in, n_kept;               /* n_in == n_kept + sum(n_drop) */
    size_t n_drop[KMED_DATA_DROP_N];
    size_t n_flagged;                  /* kept but matched the safety lists */
    size_t n_examples_train, n_examples_val;  /* lines written (weights > 1 copy) */
} kmed_data_source_report;

typedef struct kmed_data_report {
    kmed_data_source_report *sources; size_t n_sources;
    size_t n_eval_items;
    size_t exact_clusters, near_clusters;   /* kept records that had duplicates dropped */
    size_t n_in, n_kept, n_drop[KMED_DATA_DROP_N];
    size_t n_sft_train, n_sft_val, n_cpt_train, n_cpt_val;
    size_t n_seqs[4], n_tokens[4], n_trained[4];  /* packed: sft train/val, cpt train/val */
    size_t n_errors;                   /* malformed inputs reported through the log */
    double seconds;
} kmed_data_report;

/* Runs the pipeline and writes into cfg->out_dir: sft_train.jsonl, sft_val.jsonl,
   cpt_train.jsonl, cpt_val.jsonl (shuffled; the split is by a hash of the id so a record
   stays on its side across runs), train.jsonl / val.jsonl (both kinds together),
   *_packed.jsonl when cfg->pack.encode is set, drops.jsonl (one line per dropped or
   flagged record: id, source, stage, reason, detail), report.json and report.txt.
   Malformed inputs are logged as warnings with file:line and counted. Free the report
   with kmed_data_report_free. */
KMED_API kmed_result kmed_data_run(const kmed_data_config *cfg, kmed_data_report *rep,
                                   const kmed_callbacks *cb, kmed_error *err);
KMED_API void kmed_data_report_json(const kmed_data_report *rep, kmed_buf *out);
/* A readable table: one row per source with in, each drop reason, kept, examples. */
KMED_API void kmed_data_report_table(const kmed_data_report *rep, kmed_buf *out);
KMED_API void kmed_data_report_free(kmed_data_report *rep);

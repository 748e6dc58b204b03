/* ---- gemma: sampling and generation ---- */

/* Sampling settings; a zeroed struct means greedy decoding. The steps run in Hugging Face
   transformers' order: repetition penalty, temperature, top-k, top-p, then a draw. */
typedef struct kmed_sample_config {
    float temperature;     /* <= 0: greedy (argmax, lowest id on ties) */
    int top_k;             /* 0: off; 1: greedy */
    float top_p;           /* 0 or >= 1: off; else keep the smallest most-probable set whose
                              probability reaches top_p */
    float repeat_penalty;  /* 0 or 1: off; > 1 divides positive and multiplies negative logits
                              of tokens among the last repeat_last_n (CTRL, HF, llama.cpp) */
    int repeat_last_n;     /* window of recent tokens for the penalty; 0: 64, -1: all */
    uint64_t seed;         /* the draw is deterministic for a seed */
} kmed_sample_config;

/* Sampler state: settings, rng and scratch for a vocabulary of V. Free with
   kmed_sampler_free. */
typedef struct kmed_sampler {
    kmed_sample_config cfg;
    kmed_rng rng;
    size_t V;
    float *work_;          /* private: (V) logits after penalty and temperature */
    void *cand_;           /* private: (V) candidate (logit, id) pairs */
} kmed_sampler;

KMED_API kmed_result kmed_sampler_init(kmed_sampler *s, const kmed_sample_config *cfg,
                                       size_t V, kmed_error *err);
KMED_API void kmed_sampler_free(kmed_sampler *s);
/* Picks the next id from logits (V, not modified). recent[0..n_recent) is the history the
   repetition penalty looks at (oldest first; may be NULL). */
KMED_API int kmed_sampler_sample(kmed_sampler *s, const float *logits, const int *recent,
                                 size_t n_recent);
/* Index of the largest of x[0..n) (the first one on ties); 0 for n == 0. */
KMED_API size_t kmed_argmax(const float *x, size_t n);

/* Why generation ended. */
typedef enum kmed_stop_reason {
    KMED_STOP_EOS,         /* <eos> or <end_of_turn> sampled */
    KMED_STOP_MAX_TOKENS,  /* cfg.max_tokens reached */
    KMED_STOP_STRING,      /* a stop string appeared (trimmed from the text) */
    KMED_STOP_CALLBACK,    /* on_token returned nonzero */
    KMED_STOP_FULL,        /* the state's max_tokens reached */
    KMED_STOP_SAFETY       /* the safety filter refused (prompt or a streamed answer) */
} kmed_stop_reason;

/* Streaming callback: text[0..len) is the newly final part of the answer (possibly empty:
   text that may still become a stop string, or bytes of an unfinished character, is held
   back). id is the token just sampled. Return nonzero to stop. */
typedef int (*kmed_token_fn)(void *user, int id, const char *text, size_t len);

struct kmed_safety;

typedef struct kmed_generate_config {
    int max_tokens;                  /* 0: until <eos>/<end_of_turn> or the state is full */
    const char *const *stop;         /* stop strings [n_stop]; borrowed */
    size_t n_stop;
    kmed_sample_config sample;
    const struct kmed_safety *safety; /* NULL: no filter. Otherwise a dangerous prompt is
                                        refused without generating, streaming stops when the
                                        answer turns dangerous, and the final text is
                                        kmed_safety_check(safety_prompt, answer) */
    const char *safety_prompt;       /* the user's words, for the filter (may be NULL) */
    int fast;                        /* 1: forward with KMED_FWD_FAST */
    kmed_token_fn on_token;          /* may be NULL */
    void *user;
} kmed_generate_config;

typedef struct kmed_generate_result {
    char *text;              /* final answer (free with kmed_free) */
    char *raw;               /* the answer before the safety filter (free with kmed_free) */
    int *ids;                /* generated ids [n_ids] incl. a final <eos> (free with kmed_free) */
    size_t n_ids;
    kmed_stop_reason stop;
    int safety_action;       /* a kmed_safety_action; KMED_SAFETY_PASS without a filter */
    unsigned safety_classes; /* classes the filter marked */
    double prefill_s, decode_s; /* wall time of the prompt pass and of the decode steps */
} kmed_generate_result;

/* Feeds prompt[0..n_prompt) at st->pos (the state may already hold earlier turns), then
   samples until a stop condition. Afterwards the cache holds the prompt and every generated
   id except the last one (which was sampled but not fed). Decoding skips special tokens.
   tok is required (decoding, stop ids); lora and pool may be NULL. Errors of the forward
   pass (KMED_ERR_LIMIT when the prompt does not fit the state) are returned as is; res is
   zeroed first and filled on success (kmed_generate_result_free releases it). */
KMED_API kmed_result kmed_generate(const kmed_gemma *m, const kmed_lora *lora,
                                   const kmed_tok *tok, kmed_gemma_state *st, kmed_pool *pool,
                                   const int *prompt, size_t n_prompt,
                                   const kmed_generate_config *cfg, kmed_generate_result *res,
                                   kmed_error *err);
KMED_API void kmed_generate_result_free(kmed_generate_result *res);

/* ---- tok: Gemma tokenizer (HF tokenizer.json BPE or SentencePiece tokenizer.model) ---- */

/* Two sources, one object:
   - tokenizer.json (Hugging Face `tokenizers`): model BPE (vocab + merges by rank,
     byte_fallback, fuse_unk, unk_token, ignore_merges), the added_tokens (cut out of the
     raw text leftmost-longest before normalisation, or after it when "normalized": true),
     normalizer Replace / Prepend / Sequence, pre-tokenizer Split(String) / Sequence / null,
     post-processor TemplateProcessing, decoder Replace / ByteFallback / Fuse / Strip /
     Sequence. Gemma-2's file gives the same ids as HF tokenizers 0.22 id for id.
   - tokenizer.model (SentencePiece ModelProto): model_type BPE only, encoded with
     SentencePiece's own semantics (highest-score merge first, user-defined pieces matched
     first and never merged, byte fallback or <unk>, dummy prefix and whitespace handling
     from the normalizer spec). Normalisation rules: "identity" (no character map) and any
     rule whose precompiled_charsmap is present in the file (nmt_nfkc, nfkc, ...: applied
     from the file's own map, as SentencePiece does).
   A directory holding tokenizer.json (preferred) or tokenizer.model may be given instead; its
   tokenizer_config.json, when present, then sets add_bos_token / add_eos_token and the
   special token names (as transformers' GemmaTokenizerFast does).
   A loaded kmed_tok is read-only: encode/decode may run from several threads at once. */

#ifndef KMED_MAX_TOK_FILE_BYTES
#define KMED_MAX_TOK_FILE_BYTES ((size_t)1 << 30)
#endif
#ifndef KMED_MAX_TOK_VOCAB
#define KMED_MAX_TOK_VOCAB (1 << 24) /* ids must stay below this */
#endif

typedef enum kmed_tok_kind {
    KMED_TOK_HF_BPE = 1,  /* loaded from tokenizer.json */
    KMED_TOK_SPM_BPE = 2  /* loaded from a SentencePiece tokenizer.model */
} kmed_tok_kind;

/* Encode options; a zeroed struct (or NULL) means HF's add_special_tokens=true. */
typedef struct kmed_tok_config {
    int no_bos;        /* 1: add no special tokens (HF add_special_tokens=false); 0: add what the
                          tokenizer declares (Gemma: a leading <bos>) */
    int add_eos;       /* 1: also append <eos> (ignored with no_bos) */
    size_t max_tokens; /* 0: no limit; else the text's ids are cut so the total, special
                          tokens included, is at most max_tokens */
} kmed_tok_config;

/* A loaded tokenizer. Fields are read-only for callers; ids are -1 when absent. */
typedef struct kmed_tok {
    kmed_tok_kind kind;
    int n_vocab;          /* ids are 0..n_vocab-1 (model vocab and added tokens) */
    int bos_id, eos_id, pad_id, unk_id;
    int sot_id, eot_id;   /* <start_of_turn>, <end_of_turn> (Gemma chat), -1 if absent */
    int add_bos, add_eos; /* what no_bos = 0 adds */
    char *chat_template;  /* tokenizer_config.json's chat_template or NULL (informational:
                             kmed_chat_render always renders Gemma's template) */
    void *impl_;          /* private */
} kmed_tok;

/* Loads a tokenizer.json, a SentencePiece tokenizer.model (told apart by content), or a
   directory holding either (tokenizer.json preferred) plus an optional
   tokenizer_config.json. Free with kmed_tok_free (also after an error). Errors:
   KMED_ERR_NOT_FOUND / KMED_ERR_IO for files, KMED_ERR_FORMAT for malformed files (bad JSON,
   no model, merges naming unknown tokens, truncated protobuf), KMED_ERR_UNSUPPORTED for
   model types, normalizers or decoders kmed does not implement. */
KMED_API kmed_result kmed_tok_load(kmed_tok *tok, const char *path, kmed_error *err);
KMED_API void kmed_tok_free(kmed_tok *tok);

/* Encodes UTF-8 text[0..len) into ids[0..cap). cfg may be NULL (defaults). If cap is too
   small, returns KMED_ERR_SPACE and sets *n to the count needed (ids[0..cap) then hold the
   first cap ids), so cap 0 with ids NULL just counts. tokenizer.json models reject invalid
   UTF-8 with KMED_ERR_FORMAT (the reference takes only valid strings); SentencePiece models
   replace each invalid byte by U+FFFD as SentencePiece does. */
KMED_API kmed_result kmed_tok_encode(const kmed_tok *tok, const kmed_tok_config *cfg,
                                     const char *text, size_t len, int *ids, size_t cap,
                                     size_t *n, kmed_error *err);

/* Appends the text of ids[0..n) to out (HF decode: byte pieces reassembled, an invalid
   byte run becomes one U+FFFD per byte of the run, added tokens kept as their text).
   skip_special drops special tokens (Gemma: <pad> <eos> <bos> <unk> <start_of_turn>
   <end_of_turn>). SentencePiece models decode as spm_decode does with skip_special = 1
   (control pieces vanish, <unk> is " \u2047 ", a leading dummy-prefix space is dropped);
   skip_special = 0 keeps control pieces as their text. An id outside [0, n_vocab) is
   KMED_ERR_ARG. */
KMED_API kmed_result kmed_tok_decode(const kmed_tok *tok, const int *ids, size_t n,
                                     int skip_special, kmed_buf *out, kmed_error *err);

/* The piece (vocab string: "▁" for space, "<0xXX>" for bytes) of id, NUL-terminated and
   owned by tok, or NULL if id is out of range or unused; *len (may be NULL) gets its
   byte length. */
KMED_API const char *kmed_tok_piece(const kmed_tok *tok, int id, size_t *len);
/* The id of piece[0..len) (model vocab or added token), or -1. */
KMED_API int kmed_tok_id(const kmed_tok *tok, const char *piece, size_t len);
KMED_API int kmed_tok_vocab_size(const kmed_tok *tok);
/* 1 if id is a special token (dropped by skip_special), else 0. */
KMED_API int kmed_tok_is_special(const kmed_tok *tok, int id);

/* One chat turn; borrows both strings (UTF-8, NUL-terminated). */
typedef struct kmed_chat_msg {
    const char *role;    /* "user", "assistant" (rendered as "model") */
    const char *content;
} kmed_chat_msg;

/* Appends google/gemma-2-9b-it's chat template rendered over messages[0..n) to out:
   "<bos>" then per turn "<start_of_turn>" role "\n" trim(content) "<end_of_turn>\n", and
   "<start_of_turn>model\n" if add_generation_prompt. trim is Python's str.strip().
   The prompt already holds <bos>: encode it with cfg->no_bos = 1. Errors (KMED_ERR_ARG),
   as the template raises them: a first message with role "system", roles that do not
   alternate user/assistant/user/..., no messages. */
KMED_API kmed_result kmed_chat_render(const kmed_tok *tok, const kmed_chat_msg *messages,
                                      size_t n, int add_generation_prompt, kmed_buf *out,
                                      kmed_error *err);

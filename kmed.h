/* kmed.h - Korean medical language models on Gemma-2, in one C header.
   version 0.1.0 - licence at the end of this file.

   Recipe: in exactly one .c file

       #define KMED_IMPLEMENTATION
       #include "kmed.h"

   and include "kmed.h" without the define everywhere else. Build with
   `cc -std=c99 -O2 -march=native app.c -lm -lpthread`.

   Quick start (the core of examples/quickstart.c, which the tests build and run):

       kmed_error err = {0};
       kmed_tok tok;
       kmed_gemma model;
       kmed_gemma_state st;
       int ids[512];
       size_t n;
       float *logits = malloc(256000 * sizeof *logits);   (the model's vocab_size)
       if (kmed_tok_load(&tok, "ko-gemma-2-9b-it", &err) != KMED_OK ||
           kmed_gemma_load(&model, "ko-gemma-2-9b-it", NULL, &err) != KMED_OK ||
           kmed_tok_encode(&tok, NULL, text, strlen(text), ids, 512, &n, &err) != KMED_OK ||
           kmed_gemma_state_init(&st, &model, n, &err) != KMED_OK ||
           kmed_gemma_forward(&model, NULL, &st, NULL, ids, n, KMED_FWD_LOGITS_LAST,
                              logits, NULL, &err) != KMED_OK)
           fprintf(stderr, "%s\n", err.msg);
       next = kmed_argmax(logits, model.cfg.vocab_size);

   Build lines: see README.md; every tool is `cc -std=c99 -O2 -march=native -I.
   tools/kmed-NAME.c -o kmed-NAME -lm -lpthread`.

   Contents (grep '==== kmed_' lists the implementation sections):
       core    result codes, kmed_error, allocation hooks, log/progress, rng, timing
       io      JSON (DOM + JSONL), CSV, safetensors, GGUF, atomic files
       tensor  dtypes, bf16/f16, Q8_0/Q4_0, matmul kernels, thread pool
       tok     Gemma tokenizer (tokenizer.json, tokenizer.model), chat template
       gemma   Gemma-2 config, weights, forward pass, sampling, generation, export
       safety  medical-answer filter and disclaimers
       train   LoRA (PEFT format), backward passes, AdamW, checkpoints, model merging
       data    source readers, cleaning, dedup, decontamination, formatting, packing
       mcqa    KorMedMCQA prompts, scoring, statistics, reports

   Config macros (define before the implementation include):
       KMED_MALLOC/KMED_REALLOC/KMED_FREE  allocation hooks; define all three or none
       KMED_ASSERT(x)       internal invariant check (default: assert)
       KMED_NO_THREADS      kmed_pool runs every parallel-for serially
       KMED_USE_OPENBLAS    f32 GEMMs go to cblas_sgemm (link -lopenblas)
       KMED_STATIC          all API functions become static
       KMED_NO_TRAIN, KMED_NO_DATA   leave those modules out

   Rules:
       Ownership: every declaration says who frees what; memory the library allocated is
       released by a kmed_*_free/close function. Inputs that must outlive an object are
       named ("borrows text").
       Errors: fallible calls return kmed_result (KMED_OK = 0, errors < 0); the detail goes
       into a caller-owned kmed_error (may be NULL). The library never prints or exits.
       Threads: objects are not shared between threads unless a declaration says so; a
       kmed_pool is passed into calls that run in parallel, and results do not depend on
       its thread count unless stated.
*/
#ifndef KMED_H
#define KMED_H

/* mmap, fsync, clock_gettime and friends are POSIX, not C99. */
#if defined(KMED_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#define KMED_VERSION_MAJOR 0
#define KMED_VERSION_MINOR 1
#define KMED_VERSION_PATCH 0

#if defined(KMED_STATIC) && defined(__GNUC__)
#define KMED_API static __attribute__((unused)) /* a program uses only some of the API */
#elif defined(KMED_STATIC)
#define KMED_API static
#else
#define KMED_API extern
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* ---- core: result codes, errors, allocation, logging, progress, rng, timing ---- */

typedef enum kmed_result {
    KMED_OK = 0,
    KMED_ERR_ARG = -1,         /* bad argument or flag value */
    KMED_ERR_NOMEM = -2,       /* allocation failed */
    KMED_ERR_IO = -3,          /* open/read/write/rename failed */
    KMED_ERR_FORMAT = -4,      /* malformed file or text */
    KMED_ERR_SPACE = -5,       /* output buffer too small; *n holds the size needed */
    KMED_ERR_UNSUPPORTED = -6, /* valid input that kmed does not handle */
    KMED_ERR_LIMIT = -7,       /* a KMED_MAX_* limit or size overflow */
    KMED_ERR_NOT_FOUND = -8,   /* missing file, key or tensor */
    KMED_ERR_SHAPE = -9,       /* tensor shapes or dtypes do not fit */
    KMED_ERR_NUMERIC = -10,    /* NaN/inf or loss spike */
    KMED_ERR_STATE = -11       /* call not valid in the object's current state */
} kmed_result;

/* Caller-owned error detail. Any call taking a kmed_error* accepts NULL. */
typedef struct kmed_error {
    kmed_result code;
    char file[256];  /* file the error is about, "" if none */
    size_t line;     /* 1-based line, 0 if not line-oriented */
    size_t offset;   /* byte offset, or (size_t)-1 if unknown */
    char msg[768];   /* "file:line: what was found, what was expected" */
} kmed_error;

/* Short static text for a result code. */
KMED_API const char *kmed_result_str(kmed_result r);

/* Fills err (if non-NULL) and returns code. file may be NULL; line 0 and offset
   (size_t)-1 mean unknown. msg becomes "file:line: <formatted>" or
   "file: offset N: <formatted>". */
KMED_API kmed_result kmed_error_set(kmed_error *err, kmed_result code, const char *file,
                                    size_t line, size_t offset, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 6, 7)))
#endif
    ;

/* Logging and progress: the library reports through these, never prints itself.
   A zeroed kmed_callbacks means silent. */
typedef enum kmed_log_level { KMED_LOG_DEBUG, KMED_LOG_INFO, KMED_LOG_WARN } kmed_log_level;
typedef void (*kmed_log_fn)(void *user, kmed_log_level level, const char *msg);
/* what: stage name; done/total in units of `unit` ("tok", "items", "B"); total 0 = unknown */
typedef void (*kmed_progress_fn)(void *user, const char *what, double done, double total,
                                 const char *unit);
typedef struct kmed_callbacks {
    kmed_log_fn log;
    kmed_progress_fn progress;
    void *user;
} kmed_callbacks;

/* Calls cb->log with a formatted message if set. cb may be NULL. */
KMED_API void kmed_log(const kmed_callbacks *cb, kmed_log_level level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
KMED_API void kmed_progress(const kmed_callbacks *cb, const char *what, double done,
                            double total, const char *unit);

/* Monotonic wall-clock seconds. */
KMED_API double kmed_time_now(void);

/* Deterministic random numbers (xoshiro256** seeded by splitmix64). The state is plain
   data so checkpoints can store and restore it. */
typedef struct kmed_rng { uint64_t s[4]; } kmed_rng;
KMED_API void kmed_rng_seed(kmed_rng *rng, uint64_t seed);
KMED_API uint64_t kmed_rng_u64(kmed_rng *rng);
KMED_API double kmed_rng_uniform(kmed_rng *rng);  /* [0, 1), 53 bits */
KMED_API double kmed_rng_normal(kmed_rng *rng);   /* N(0, 1), Box-Muller */
KMED_API uint64_t kmed_rng_below(kmed_rng *rng, uint64_t n); /* [0, n), unbiased */

/* Growable byte buffer, used to build JSON and text outputs. Always NUL-terminated
   after any successful append. Zero-initialise, free with kmed_buf_free. */
typedef struct kmed_buf { char *data; size_t len, cap; int failed; } kmed_buf;
/* Appends fail softly: on allocation failure buf->failed is set and later appends are
   ignored, so a caller checks once at the end. */
KMED_API void kmed_buf_put(kmed_buf *b, const void *data, size_t n);
KMED_API void kmed_buf_puts(kmed_buf *b, const char *s);
KMED_API void kmed_buf_printf(kmed_buf *b, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Appends s[0..n) as a quoted JSON string ("\u00XX" for control bytes; UTF-8 kept). */
KMED_API void kmed_buf_json_str(kmed_buf *b, const char *s, size_t n);
/* Appends a float as the shortest decimal that reads back to the same float. */
KMED_API void kmed_buf_json_f32(kmed_buf *b, float x);
KMED_API void kmed_buf_free(kmed_buf *b);

/* ---- files (io helpers every module uses) ---- */

/* Reads a whole file into a new NUL-terminated buffer (free with kmed_free). Fails with
   KMED_ERR_LIMIT above max_bytes (0 = no limit). */
KMED_API kmed_result kmed_file_read(const char *path, size_t max_bytes, char **data,
                                    size_t *len, kmed_error *err);
/* Frees memory that a kmed call handed out as a plain pointer. */
KMED_API void kmed_free(void *p);

/* Read-only memory map of a whole file (falls back to reading it in when mmap fails). */
typedef struct kmed_map { const unsigned char *data; size_t size; int mapped; } kmed_map;
KMED_API kmed_result kmed_map_open(kmed_map *m, const char *path, kmed_error *err);
KMED_API void kmed_map_close(kmed_map *m);

/* Atomic output: writes go to "<path>.tmp.<pid>", commit flushes, fsyncs and renames
   over path (then fsyncs the directory), abort removes the temp file. A crash at any
   moment leaves either the old file or the new one under path, never a partial one. */
typedef struct kmed_afile { FILE *f; char path[1024]; char tmp[1100]; int failed; } kmed_afile;
KMED_API kmed_result kmed_afile_open(kmed_afile *a, const char *path, kmed_error *err);
KMED_API kmed_result kmed_afile_write(kmed_afile *a, const void *data, size_t n,
                                      kmed_error *err);
KMED_API kmed_result kmed_afile_commit(kmed_afile *a, kmed_error *err);
KMED_API void kmed_afile_abort(kmed_afile *a);
/* One-shot atomic write of a buffer. */
KMED_API kmed_result kmed_file_write_atomic(const char *path, const void *data, size_t n,
                                            kmed_error *err);
/* Creates a directory (and missing parents); an existing one is fine. */
KMED_API kmed_result kmed_mkdir_p(const char *path, kmed_error *err);
/* Joins dir and name into out[cap] with one '/'; KMED_ERR_LIMIT if it does not fit. */
KMED_API kmed_result kmed_path_join(char *out, size_t cap, const char *dir, const char *name,
                                    kmed_error *err);
/* 1 if path names an existing directory. */
KMED_API int kmed_is_dir(const char *path);

/* ---- io: JSON (strict RFC 8259 DOM), JSONL streaming, CSV (RFC 4180) ---- */

#ifndef KMED_MAX_JSON_DEPTH
#define KMED_MAX_JSON_DEPTH 256
#endif
#ifndef KMED_MAX_LINE_BYTES
#define KMED_MAX_LINE_BYTES ((size_t)1 << 30) /* one JSONL/CSV record */
#endif

typedef enum kmed_json_type {
    KMED_JSON_NULL, KMED_JSON_FALSE, KMED_JSON_TRUE, KMED_JSON_NUMBER,
    KMED_JSON_STRING, KMED_JSON_ARRAY, KMED_JSON_OBJECT
} kmed_json_type;

/* One DOM node. Strings are unescaped UTF-8, NUL-terminated (len excludes the NUL; a
   string may itself contain "\u0000"). Numbers keep their exact source text as well as
   the nearest double. Arrays and objects hold `len` children in document order; object
   children carry their key. All nodes live in the owning kmed_json_doc. */
typedef struct kmed_json {
    kmed_json_type type;
    size_t len;               /* string bytes, or number of children */
    const char *str;          /* STRING: value; NUMBER: source text (len bytes) */
    double num;               /* NUMBER */
    const char *key;          /* member of an OBJECT: its key (NUL-terminated) */
    size_t key_len;
    struct kmed_json *kids;   /* ARRAY/OBJECT: children [len] */
} kmed_json;

/* A parsed document; owns every node and string. */
typedef struct kmed_json_doc {
    kmed_json *root;
    void *arena_;             /* private */
} kmed_json_doc;

/* Parses text[0..len) (need not be NUL-terminated). `name` (file name, may be NULL) and
   `line` (line of text[0], 0 if not line-based) only label errors, e.g.
   "data.jsonl:812: offset 17: expected ',' or '}'". Rejects invalid UTF-8, lone
   surrogates, trailing garbage, nesting deeper than KMED_MAX_JSON_DEPTH, duplicate-free
   is not required (the last duplicate key wins in kmed_json_get). Free with
   kmed_json_free, also after an error. */
KMED_API kmed_result kmed_json_parse(kmed_json_doc *doc, const char *text, size_t len,
                                     const char *name, size_t line, kmed_error *err);
KMED_API void kmed_json_free(kmed_json_doc *doc);

/* Object member by key (last one wins), or NULL if o is not an object or has no such key. */
KMED_API const kmed_json *kmed_json_get(const kmed_json *o, const char *key);
/* Array element i (or the i-th member of an object, in document order), or NULL. */
KMED_API const kmed_json *kmed_json_at(const kmed_json *a, size_t i);
/* Typed accessors: the value, or `def` when j is NULL or of another type. */
KMED_API const char *kmed_json_str(const kmed_json *j, const char *def);
KMED_API double kmed_json_num(const kmed_json *j, double def);
/* Exact integer: 1 and *out set if j is a NUMBER whose text is an integer in int64 range
   (no fraction or exponent), else 0. */
KMED_API int kmed_json_int(const kmed_json *j, int64_t *out);
KMED_API int kmed_json_bool(const kmed_json *j, int def);

/* Streaming line reader: lines of any length up to KMED_MAX_LINE_BYTES, '\n' or "\r\n"
   endings (the terminator is not part of the line), a final line without '\n' counted. */
typedef struct kmed_lines {
    FILE *f;
    int owns_f;
    char name[256];        /* for messages */
    size_t line;           /* 1-based number of the line last returned */
    char *buf; size_t cap; /* private: a line that spans input chunks */
    char *in_;             /* private: read buffer */
    size_t in_pos_, in_len_;
    int eof_;              /* private: end of input reached */
    int crlf_;             /* private: the last line returned ended in "\r\n" */
} kmed_lines;
/* Opens path ("-" = stdin). Close with kmed_lines_close. */
KMED_API kmed_result kmed_lines_open(kmed_lines *r, const char *path, kmed_error *err);
/* Next line into *s and *len (NUL-terminated, valid until the next call; it may hold NUL
   bytes of its own). *eof = 1 at end (s NULL). A line over KMED_MAX_LINE_BYTES is skipped
   and reported as KMED_ERR_LIMIT; the reader goes on with the next line. */
KMED_API kmed_result kmed_lines_next(kmed_lines *r, const char **s, size_t *len, int *eof,
                                     kmed_error *err);
KMED_API void kmed_lines_close(kmed_lines *r);

/* JSONL: each non-blank line is one JSON value. kmed_jsonl_next frees the previous doc and
   parses the next line into r->doc. A malformed line returns KMED_ERR_FORMAT naming
   file:line; the reader stays usable, so callers may report it and go on. */
typedef struct kmed_jsonl { kmed_lines lines; kmed_json_doc doc; } kmed_jsonl;
KMED_API kmed_result kmed_jsonl_open(kmed_jsonl *r, const char *path, kmed_error *err);
KMED_API kmed_result kmed_jsonl_next(kmed_jsonl *r, const kmed_json **value, int *eof,
                                     kmed_error *err);
KMED_API void kmed_jsonl_close(kmed_jsonl *r);

/* CSV (RFC 4180): comma separated, '"' quoting with "" escapes, newlines inside quotes,
   CRLF or LF rows, a UTF-8 BOM skipped. The first row is the header. Rows with a field
   count different from the header's return KMED_ERR_FORMAT naming file:line (the reader
   stays usable). Fields are unquoted, NUL-terminated, valid until the next call. */
typedef struct kmed_csv_field { const char *s; size_t len; } kmed_csv_field;
typedef struct kmed_csv {
    kmed_lines lines;             /* private: the byte source */
    size_t n_cols;
    char **header;                /* [n_cols] column names */
    kmed_csv_field *fields;       /* [n_cols] current row */
    size_t row_line;              /* line where the current row started */
    kmed_buf rowbuf_;             /* private */
    size_t fields_cap_;           /* private */
} kmed_csv;
KMED_API kmed_result kmed_csv_open(kmed_csv *c, const char *path, kmed_error *err);
KMED_API kmed_result kmed_csv_next(kmed_csv *c, int *eof, kmed_error *err);
/* Column index of a header name, or -1. */
KMED_API int kmed_csv_col(const kmed_csv *c, const char *name);
KMED_API void kmed_csv_close(kmed_csv *c);

/* ---- io: tensors on disk: safetensors (read via mmap, sharded dirs; atomic write) and
   GGUF v3 (read and write; metadata of every type) ---- */

#ifndef KMED_MAX_DIMS
#define KMED_MAX_DIMS 4
#endif
#ifndef KMED_MAX_TENSORS
#define KMED_MAX_TENSORS 1000000
#endif
#ifndef KMED_MAX_HEADER_BYTES
#define KMED_MAX_HEADER_BYTES ((size_t)100 << 20) /* safetensors JSON header */
#endif
#ifndef KMED_MAX_GGUF_KV
#define KMED_MAX_GGUF_KV 100000
#endif
#ifndef KMED_MAX_GGUF_ARRAY
#define KMED_MAX_GGUF_ARRAY ((uint64_t)1 << 28)
#endif

/* Element types. Q8_0/Q4_0 blocks are GGML's: 32 elements, fp16 scale first. */
typedef enum kmed_dtype {
    KMED_F32, KMED_F16, KMED_BF16, KMED_Q8_0, KMED_Q4_0, KMED_I8, KMED_I32, KMED_I64,
    KMED_U8, KMED_F64, KMED_BOOL,
    KMED_DTYPE_UNKNOWN        /* a type kmed reads past but cannot compute with */
} kmed_dtype;

/* Descriptor of one stored tensor. shape is outermost-first (row-major; numpy and
   safetensors order; GGUF's ne[] reversed), so a linear weight is [out, in]. data points
   into the mapped file (or caller memory when writing); safetensors does not promise
   alignment, so data may be unaligned for its element type when the file places it so. */
typedef struct kmed_tensor_info {
    const char *name;
    kmed_dtype dtype;
    int ggml_type;            /* GGUF: the raw type number (also for unknown types) */
    int ndim;
    uint64_t shape[KMED_MAX_DIMS];
    const void *data;
    size_t nbytes;
} kmed_tensor_info;

KMED_API const char *kmed_dtype_name(kmed_dtype t);  /* "F32", "BF16", "Q8_0", ... */
/* Parses a dtype name (case-insensitive: f32, bf16, q8_0, ...); KMED_DTYPE_UNKNOWN if none. */
KMED_API kmed_dtype kmed_dtype_parse(const char *s);
/* Number of elements of a tensor (product of shape): 0 when any dimension is 0, UINT64_MAX
   when the product overflows. */
KMED_API uint64_t kmed_tensor_numel(const kmed_tensor_info *t);
/* Bytes for n elements of t, or 0 when n is not a whole number of blocks or t is unknown. */
KMED_API size_t kmed_dtype_bytes(kmed_dtype t, uint64_t n);

/* safetensors: a single file, or a directory holding model.safetensors.index.json and its
   shards (or a single *.safetensors file). Everything is mmapped; tensor data is never
   copied. The header is fully validated: JSON, dtype names, shape × dtype size ==
   end - begin, offsets inside the data area, no overlaps. */
typedef struct kmed_st {
    size_t n_tensors;
    kmed_tensor_info *tensors;   /* sorted as stored: shard by shard, file order */
    size_t n_meta;               /* __metadata__ string pairs (from the first shard) */
    const char **meta_keys, **meta_vals;
    void *impl_;                 /* private: maps, strings */
} kmed_st;
KMED_API kmed_result kmed_st_open(kmed_st *st, const char *path, kmed_error *err);
KMED_API void kmed_st_close(kmed_st *st);
/* Tensor by name, or NULL. */
KMED_API const kmed_tensor_info *kmed_st_find(const kmed_st *st, const char *name);
/* The dtype text of tensor i as stored ("BF16", "F8_E4M3", ...), for types kmed lists as
   KMED_DTYPE_UNKNOWN; NULL if i is out of range. Owned by st. */
KMED_API const char *kmed_st_dtype_str(const kmed_st *st, size_t i);

/* Streaming safetensors writer: the header is written from the descriptors (data
   ignored), then the tensor bytes are appended in the same order, one put per tensor,
   so a caller never holds more than one tensor. Output is atomic (kmed_afile). */
typedef struct kmed_st_writer {
    kmed_afile af;
    size_t n, next;
    size_t *nbytes_;             /* private */
} kmed_st_writer;
/* meta: n_meta key/value string pairs for "__metadata__" (may be 0). Only F32, F16, BF16,
   I8, I32, I64, U8, F64, BOOL can be written (KMED_ERR_UNSUPPORTED otherwise). */
KMED_API kmed_result kmed_st_writer_open(kmed_st_writer *w, const char *path,
                                         const kmed_tensor_info *tensors, size_t n,
                                         const char *const *meta_keys,
                                         const char *const *meta_vals, size_t n_meta,
                                         kmed_error *err);
/* Appends the data of tensor number w->next; nbytes must match its descriptor. */
KMED_API kmed_result kmed_st_writer_put(kmed_st_writer *w, const void *data, size_t nbytes,
                                        kmed_error *err);
/* Renames into place after every tensor was put; otherwise KMED_ERR_STATE. */
KMED_API kmed_result kmed_st_writer_commit(kmed_st_writer *w, kmed_error *err);
KMED_API void kmed_st_writer_abort(kmed_st_writer *w);
/* One-shot write of tensors whose data pointers are set. */
KMED_API kmed_result kmed_st_write(const char *path, const kmed_tensor_info *tensors,
                                   size_t n, const char *const *meta_keys,
                                   const char *const *meta_vals, size_t n_meta,
                                   kmed_error *err);

/* GGUF v3 */
typedef enum kmed_gguf_type {
    KMED_GGUF_U8 = 0, KMED_GGUF_I8 = 1, KMED_GGUF_U16 = 2, KMED_GGUF_I16 = 3,
    KMED_GGUF_U32 = 4, KMED_GGUF_I32 = 5, KMED_GGUF_F32 = 6, KMED_GGUF_BOOL = 7,
    KMED_GGUF_STRING = 8, KMED_GGUF_ARRAY = 9, KMED_GGUF_U64 = 10, KMED_GGUF_I64 = 11,
    KMED_GGUF_F64 = 12
} kmed_gguf_type;

/* One metadata value. Scalars are widened into u/i/f; strings point into the file (not
   NUL-terminated: use len). Arrays: arr_type, n, and either `raw` (numbers, packed
   little-endian as stored) or strs/str_lens (strings). */
typedef struct kmed_gguf_kv {
    const char *key;             /* NUL-terminated copy */
    kmed_gguf_type type;
    uint64_t u; int64_t i; double f;     /* integer, bool (u), float scalars */
    const char *str; size_t len;         /* STRING */
    kmed_gguf_type arr_type; uint64_t n; /* ARRAY */
    const void *raw;
    const char **strs; size_t *str_lens;
} kmed_gguf_kv;

typedef struct kmed_gguf {
    uint32_t version;
    size_t n_kv;
    kmed_gguf_kv *kv;
    size_t n_tensors;
    kmed_tensor_info *tensors;   /* file order; dtype KMED_DTYPE_UNKNOWN for other types */
    size_t alignment;            /* general.alignment or 32 */
    size_t data_offset;
    void *impl_;                 /* private */
} kmed_gguf;
/* Opens and validates a GGUF file (magic, version 2 or 3, counts bounded by KMED_MAX_*,
   strings and arrays inside the file, tensor data aligned and in range). */
KMED_API kmed_result kmed_gguf_open(kmed_gguf *g, const char *path, kmed_error *err);
KMED_API void kmed_gguf_close(kmed_gguf *g);
KMED_API const kmed_gguf_kv *kmed_gguf_find_kv(const kmed_gguf *g, const char *key);
KMED_API const kmed_tensor_info *kmed_gguf_find_tensor(const kmed_gguf *g, const char *name);
/* GGML type name ("Q4_K", ...) for messages; "unknown" for numbers it does not know. */
KMED_API const char *kmed_ggml_type_name(int ggml_type);

/* Streaming GGUF writer: add metadata, declare every tensor (name, dtype, shape), then
   put the data of each in declaration order; commit renames into place. Tensor data is
   aligned to `alignment` (0 = 32), each tensor zero-padded to it, as llama.cpp writes.
   The writer owns general.alignment: adding it as u32 sets the alignment, and it is
   written only when not 32. The void add_* calls record misuse (a key added twice, a NULL
   string, metadata after the first put) and the next put or commit returns KMED_ERR_ARG
   naming the key. commit and abort release everything; call abort on any error path. */
typedef struct kmed_gguf_writer {
    kmed_afile af;
    size_t alignment;
    kmed_buf kvbuf_;             /* private: encoded metadata */
    size_t n_kv_;
    kmed_tensor_info *tensors_; size_t n_tensors_, cap_tensors_, next_;
    char **names_;
    int header_done_;
    kmed_buf keys_;              /* private: keys added so far, NUL-separated */
    char bad_[200];              /* private: first misuse of a void add_* call */
} kmed_gguf_writer;
KMED_API kmed_result kmed_gguf_writer_open(kmed_gguf_writer *w, const char *path,
                                           size_t alignment, kmed_error *err);
KMED_API void kmed_gguf_add_u32(kmed_gguf_writer *w, const char *key, uint32_t v);
KMED_API void kmed_gguf_add_i32(kmed_gguf_writer *w, const char *key, int32_t v);
KMED_API void kmed_gguf_add_f32(kmed_gguf_writer *w, const char *key, float v);
KMED_API void kmed_gguf_add_bool(kmed_gguf_writer *w, const char *key, int v);
KMED_API void kmed_gguf_add_str(kmed_gguf_writer *w, const char *key, const char *s);
/* Arrays of scalars: `data` holds n packed values of `type` (not STRING/ARRAY). */
KMED_API void kmed_gguf_add_arr(kmed_gguf_writer *w, const char *key, kmed_gguf_type type,
                                const void *data, uint64_t n);
KMED_API void kmed_gguf_add_arr_str(kmed_gguf_writer *w, const char *key,
                                    const char *const *strs, const size_t *lens, uint64_t n);
/* Copies every metadata value of `src` except keys for which skip(key) returns 1
   (skip may be NULL). */
KMED_API void kmed_gguf_add_all(kmed_gguf_writer *w, const kmed_gguf *src,
                                int (*skip)(const char *key));
/* Declares a tensor (shape outermost-first, as in kmed_tensor_info). */
KMED_API kmed_result kmed_gguf_add_tensor(kmed_gguf_writer *w, const char *name,
                                          kmed_dtype dtype, int ndim, const uint64_t *shape,
                                          kmed_error *err);
/* Writes the data of the next declared tensor (the header goes out on the first put). */
KMED_API kmed_result kmed_gguf_writer_put(kmed_gguf_writer *w, const void *data,
                                          size_t nbytes, kmed_error *err);
KMED_API kmed_result kmed_gguf_writer_commit(kmed_gguf_writer *w, kmed_error *err);
KMED_API void kmed_gguf_writer_abort(kmed_gguf_writer *w);

/* ---- tensor: bf16/f16 conversion, Q8_0/Q4_0 blocks, matmul kernels, thread pool ----
   Dimension names used throughout: B batch, T time (tokens), C channels (hidden),
   H heads, D head dim, V vocab, r LoRA rank; a linear weight W is [N=out, K=in]. */

#define KMED_QK 32  /* elements per Q8_0/Q4_0 block */
typedef struct kmed_block_q8_0 { uint16_t d; int8_t qs[KMED_QK]; } kmed_block_q8_0;
typedef struct kmed_block_q4_0 { uint16_t d; uint8_t qs[KMED_QK / 2]; } kmed_block_q4_0;

/* Scalar conversions. f32 -> bf16/f16 round to nearest even; NaN stays NaN. */
KMED_API float kmed_bf16_to_f32(uint16_t h);
KMED_API uint16_t kmed_f32_to_bf16(float f);
KMED_API float kmed_f16_to_f32(uint16_t h);
KMED_API uint16_t kmed_f32_to_f16(float f);

/* Row conversion between f32 and any computable dtype (F32, F16, BF16, Q8_0, Q4_0).
   n must be a multiple of KMED_QK for the block types. Quantization reproduces GGML's
   reference quantizer bit for bit. */
KMED_API void kmed_quantize_row(kmed_dtype t, const float *x, void *y, size_t n);
KMED_API void kmed_dequantize_row(kmed_dtype t, const void *x, float *y, size_t n);
/* 1 if kmed can compute with this weight dtype. */
KMED_API int kmed_dtype_computable(kmed_dtype t);

/* Thread pool: a parallel-for over [0, n) split into contiguous ranges, one per thread,
   fixed by n and the thread count (so results never depend on scheduling). The caller's
   thread takes part. A NULL pool runs serially. */
typedef struct kmed_pool kmed_pool;
typedef void (*kmed_pool_fn)(void *ctx, size_t begin, size_t end, int thread);
/* n_threads 0 = number of online CPUs. Free with kmed_pool_free. */
KMED_API kmed_result kmed_pool_create(kmed_pool **pool, int n_threads, kmed_error *err);
KMED_API void kmed_pool_free(kmed_pool *pool);
KMED_API int kmed_pool_threads(const kmed_pool *pool);     /* 1 for NULL */
/* Runs fn over [0, n) in ranges that are multiples of `grain` (except the last); blocks
   until all are done. Not reentrant: fn must not call kmed_pool_for on the same pool. */
KMED_API void kmed_pool_for(kmed_pool *pool, size_t n, size_t grain, kmed_pool_fn fn,
                            void *ctx);

/* Matmul flags. */
enum {
    KMED_MM_ACC = 1,   /* y += ... instead of y = ... */
    KMED_MM_FAST = 2   /* quantize activations like llama.cpp (x to Q8_0 for Q8_0/Q4_0
                          weights, to BF16 for BF16 weights): faster, not bit-comparable
                          with the f32 reference path */
};
/* y[M,N] = x[M,K] · W[N,K]^T, W row-major in dtype wt (F32, F16, BF16, Q8_0, Q4_0; K a
   multiple of KMED_QK for the block types). Without KMED_MM_FAST the activations stay
   f32 and each weight row is converted exactly; the result equals the scalar reference up
   to summation order. Parallel over N. */
KMED_API void kmed_matmul(kmed_pool *pool, float *y, const float *x, const void *w,
                          kmed_dtype wt, size_t M, size_t N, size_t K, int flags);
/* dx[M,K] += dy[M,N] · W[N,K] for a weight in any computable dtype (dequantized on the
   fly, never stored in f32): the input gradient of kmed_matmul. Parallel over K. */
KMED_API void kmed_matmul_dx(kmed_pool *pool, float *dx, const float *dy, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K);
/* dw[N,K] += dy[M,N]^T · x[M,K] (f32): the weight gradient of kmed_matmul. */
KMED_API void kmed_matmul_dw(kmed_pool *pool, float *dw, const float *dy, const float *x,
                             size_t M, size_t N, size_t K);
/* Plain f32 GEMM, row-major: C[M,N] = alpha * op(A) · op(B) + beta * C, op = transpose
   when ta/tb is set; lda/ldb/ldc are row strides. Routed to cblas_sgemm under
   KMED_USE_OPENBLAS. */
KMED_API void kmed_sgemm(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                         float alpha, const float *A, size_t lda, const float *B,
                         size_t ldb, float beta, float *C, size_t ldc);
/* Dot product of f32 x with one row of W in dtype wt (n elements): the scalar reference
   that every SIMD kernel is tested against lives beside it. */
KMED_API float kmed_dot_row(kmed_dtype wt, const void *wrow, const float *x, size_t n);
/* SIMD f32 dot product for hot inner loops (attention scores, small heads); the summation
   order is fixed by n alone, so results do not depend on threads. Equals
   kmed_dot_row(KMED_F32, a, b, n) up to summation order. */
KMED_API float kmed_dot_f32(const float *a, const float *b, size_t n);

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

/* ---- gemma: Gemma-2 config, weights, forward pass, sampling, generation, export ---- */

typedef struct kmed_gemma_config {
    int vocab_size;           /* V */
    int hidden_size;          /* C */
    int intermediate_size;    /* F */
    int n_layers;             /* L */
    int n_heads;              /* H */
    int n_kv_heads;           /* Hkv; H % Hkv == 0 */
    int head_dim;             /* D */
    float query_pre_attn_scalar; /* scores scaled by its ^-0.5 */
    float rms_norm_eps;
    float rope_theta;
    float attn_softcap;       /* 0 = off */
    float final_softcap;      /* 0 = off */
    int sliding_window;       /* even layers see the last `sliding_window` keys */
    int max_position;
    int bos_id, eos_id, pad_id;
} kmed_gemma_config;

/* One linear weight [rows = out, cols = in] in its storage dtype. */
typedef struct kmed_weight {
    const void *data;
    kmed_dtype type;
    size_t rows, cols;
} kmed_weight;

/* Norm vectors are f32 and hold the HF value w (the forward multiplies by 1 + w); GGUF
   files store 1 + w and are converted on load. */
typedef struct kmed_gemma_layer {
    kmed_weight q, k, v, o;          /* q [H*D, C], k/v [Hkv*D, C], o [C, H*D] */
    kmed_weight gate, up, down;      /* gate/up [F, C], down [C, F] */
    float *attn_norm, *post_attn_norm, *pre_ffn_norm, *post_ffn_norm; /* [C] */
} kmed_gemma_layer;

typedef struct kmed_gemma {
    kmed_gemma_config cfg;
    kmed_weight embed;               /* [V, C]; also the tied lm_head */
    kmed_gemma_layer *layers;        /* [L] */
    float *final_norm;               /* [C] */
    void *impl_;                     /* private: maps, owned buffers */
} kmed_gemma;

/* LoRA targets, in PEFT's module names: q_proj k_proj v_proj o_proj gate_proj up_proj
   down_proj. */
enum { KMED_LORA_Q, KMED_LORA_K, KMED_LORA_V, KMED_LORA_O, KMED_LORA_GATE, KMED_LORA_UP,
       KMED_LORA_DOWN, KMED_LORA_NTARGETS };

/* A LoRA adapter over a kmed_gemma: for target t of layer l with weight W [out, in],
   y = x W^T + scale * (x A^T) B^T, A [r, in], B [out, r], scale = alpha / r.
   A/B are NULL where the target is not adapted. The forward pass applies an attached
   adapter; training (train module) creates, updates, saves and loads it.
   Trainable tokens (PEFT's trainable_token_indices): the adapter may also carry whole
   embedding rows for some token ids; each replaces the base row of its id in the input
   embedding and in the tied LM head. */
typedef struct kmed_lora_ab { float *A, *B; } kmed_lora_ab;
typedef struct kmed_lora {
    int r;
    float alpha;
    float scale;                       /* alpha / r */
    unsigned targets;                  /* bit t set: target t adapted */
    int n_layers;
    kmed_lora_ab (*ab)[KMED_LORA_NTARGETS]; /* [n_layers][KMED_LORA_NTARGETS] */
    int n_tokens;                      /* trainable tokens; 0: none */
    int *token_ids;                    /* [n_tokens] vocabulary ids, ascending, distinct */
    float *token_rows;                 /* [n_tokens][hidden]: row i is token_ids[i]'s */
    void *impl_;                       /* private: the owning block */
} kmed_lora;

/* ---- config ---- */

/* Parses an HF config.json text (Gemma2ForCausalLM keys). Required: vocab_size,
   hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
   num_key_value_heads, head_dim; the rest take HF's Gemma2Config defaults
   (query_pre_attn_scalar 256, rms_norm_eps 1e-6, rope_theta 10000, soft-caps 50/30 (null
   = off), sliding_window 4096 (null = off), max_position_embeddings 8192, bos 2, eos 1,
   pad 0, tie_word_embeddings true). `name` labels errors. KMED_ERR_UNSUPPORTED for
   another model_type, hidden_activation other than gelu_pytorch_tanh, untied
   embeddings or attention_bias; KMED_ERR_NOT_FOUND for a missing key; the result is
   validated (kmed_gemma_config_validate). */
KMED_API kmed_result kmed_gemma_config_parse(kmed_gemma_config *cfg, const char *json,
                                             size_t len, const char *name, kmed_error *err);
/* Reads config.json from a model directory (or the named file). */
KMED_API kmed_result kmed_gemma_config_load(kmed_gemma_config *cfg, const char *path,
                                            kmed_error *err);
/* Config from a GGUF file's gemma2.* and tokenizer.ggml.* metadata. The query scale
   follows llama.cpp: query_pre_attn_scalar = key_length, except for 46 blocks (27B):
   embedding_length / head_count. vocab_size from tokenizer.ggml.tokens, else from
   token_embd.weight. */
KMED_API kmed_result kmed_gemma_config_from_gguf(kmed_gemma_config *cfg, const kmed_gguf *g,
                                                 kmed_error *err);
/* Checks sizes are positive, H % Hkv == 0, D even, eps > 0 and that products fit. */
KMED_API kmed_result kmed_gemma_config_validate(const kmed_gemma_config *cfg,
                                                kmed_error *err);

/* ---- weights ---- */

/* Load options; a zeroed struct (or NULL) keeps every weight in its stored dtype. */
typedef struct kmed_gemma_opts {
    int convert;          /* 1: convert the embedding and every linear weight to `type` */
    kmed_dtype type;      /* F32, BF16, Q8_0 or Q4_0 (F16 also computes) when convert */
    kmed_callbacks cb;    /* progress ("load", tensors) and log messages */
} kmed_gemma_opts;

/* Loads a model from an HF directory (config.json + model.safetensors or a sharded
   index; a *.safetensors file also works with config.json beside it) or a .gguf file
   (llama.cpp gemma2 names; norms stored as 1 + w become w). Weights whose stored dtype
   is the compute dtype point into the mmapped file and are never copied; others are
   converted tensor by tensor (peak memory: final model + one tensor; converted source
   pages are released). Norm vectors are always f32. An lm_head.weight is ignored (tied).
   Free with kmed_gemma_free (also after an error). */
KMED_API kmed_result kmed_gemma_load(kmed_gemma *m, const char *path,
                                     const kmed_gemma_opts *opts, kmed_error *err);
/* Creates a model shell for caller-owned weights: validates cfg, allocates layers and
   zeroed f32 norm vectors (owned by m: write into them). The caller sets every
   kmed_weight (data must outlive m). Free with kmed_gemma_free. */
KMED_API kmed_result kmed_gemma_init(kmed_gemma *m, const kmed_gemma_config *cfg,
                                     kmed_error *err);
/* Checks every weight is set with the right shape and a computable dtype (forward
   calls it on the first use of a state). */
KMED_API kmed_result kmed_gemma_validate(const kmed_gemma *m, kmed_error *err);
/* Frees what the library allocated and unmaps files; caller-owned weights are left. */
KMED_API void kmed_gemma_free(kmed_gemma *m);
/* Bytes of all weights in their compute dtypes (norms included). */
KMED_API size_t kmed_gemma_weight_bytes(const kmed_gemma *m);

/* ---- forward ---- */

/* Inference state: the KV cache (f32, [L, max_tokens, Hkv*D] each for K and V) and
   scratch buffers. pos = number of tokens in the cache. Not shared between threads. */
typedef struct kmed_gemma_state {
    size_t pos;
    size_t max_tokens;
    float *k_cache, *v_cache;  /* (L, max_tokens, Hkv*D) */
    void *impl_;               /* private: scratch */
} kmed_gemma_state;
/* Allocates a state for up to max_tokens positions of m (m must outlive it).
   Free with kmed_gemma_state_free. */
KMED_API kmed_result kmed_gemma_state_init(kmed_gemma_state *st, const kmed_gemma *m,
                                           size_t max_tokens, kmed_error *err);
KMED_API void kmed_gemma_state_free(kmed_gemma_state *st);
/* Rolls the cache back to pos tokens (pos <= st->pos; 0 resets), e.g. to reuse a shared
   prompt prefix. KMED_ERR_ARG if pos > st->pos. */
KMED_API kmed_result kmed_gemma_state_set_pos(kmed_gemma_state *st, size_t pos,
                                              kmed_error *err);

/* Forward flags. */
enum {
    KMED_FWD_LOGITS_LAST = 1,  /* logits (V) of the last of the n positions */
    KMED_FWD_LOGITS_ALL = 2,   /* logits (n, V) of every position */
    KMED_FWD_FAST = 4,         /* matmuls with KMED_MM_FAST (activations quantized like
                                  llama.cpp); default: f32 activations, the reference */
    KMED_FWD_NO_HEAD = 8       /* with a LOGITS flag: write the final-normed hidden states
                                  (rows, C) instead of logits, for kmed_gemma_head */
};
/* Appends n tokens at position st->pos (batched prefill for n > 1, decode for n = 1)
   and advances st->pos by n. logits: see the flags (final soft-cap applied); NULL with
   neither flag. hidden (L+1, n, C), optional: the residual stream after the scaled
   embedding and after each layer. lora may be NULL; when set, every adapted target adds
   scale * (x A^T) B^T and its trainable tokens' rows replace theirs in the embedding and
   the tied head. Parallel through pool (may be NULL); results do not depend on its
   thread count. KMED_ERR_LIMIT if st->pos + n > st->max_tokens; KMED_ERR_ARG for an id
   outside [0, V); on error st->pos is unchanged. */
KMED_API kmed_result kmed_gemma_forward(const kmed_gemma *m, const kmed_lora *lora,
                                        kmed_gemma_state *st, kmed_pool *pool,
                                        const int *ids, size_t n, int flags,
                                        float *logits, float *hidden, kmed_error *err);
/* Logits (rows, V) of final-normed hidden states xn (rows, C) from KMED_FWD_NO_HEAD: the
   tied LM head and the final soft-cap, exactly as kmed_gemma_forward applies them. Lets a
   caller gather the rows of several forwards (e.g. the options of a question) and read the
   V x C embedding once for all of them. flags: KMED_FWD_FAST or 0. lora may be NULL; its
   trainable tokens' rows replace theirs in the head, as in the forward. */
KMED_API void kmed_gemma_head(const kmed_gemma *m, const kmed_lora *lora, kmed_pool *pool,
                              const float *xn, size_t rows, int flags, float *logits);

/* ---- .npy files (NumPy format 1.0, little-endian, C order), for comparing logits and
   hidden states with other implementations ---- */

/* Writes data (F32, I32 or I64, shape[0..ndim)) atomically. */
KMED_API kmed_result kmed_npy_write(const char *path, kmed_dtype dtype, const void *data,
                                    int ndim, const uint64_t *shape, kmed_error *err);
/* Reads a float32/int32/int64 .npy (format 1.x or 2.x, C order). *data is a new buffer
   (free with kmed_free); shape has room for KMED_MAX_DIMS dims. */
KMED_API kmed_result kmed_npy_read(const char *path, kmed_dtype *dtype, int *ndim,
                                   uint64_t *shape, void **data, kmed_error *err);

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

/* ---- gemma: model export (HF safetensors, GGUF) and random init ----
   Both writers stream: one output tensor is in memory at a time (converted or quantized row
   by row from the model's weights in whatever dtype they were loaded), and every file is
   written atomically (temp file + rename). */

/* HF export options; a zeroed struct (or NULL) writes one F32 model.safetensors. */
typedef struct kmed_hf_save_opts {
    kmed_dtype dtype;        /* F32, BF16 or F16 for every tensor (norms included) */
    size_t max_shard_bytes;  /* 0: a single model.safetensors; else shards
                                model-0000i-of-0000N.safetensors of at most this many bytes
                                (a larger tensor gets a shard of its own) plus
                                model.safetensors.index.json */
    const kmed_lora *lora;   /* optional: written merged, W + scale B A, tensor by tensor
                                (peak: one f32 tensor); needs the train module */
    kmed_callbacks cb;       /* progress ("save", tensors) */
} kmed_hf_save_opts;

/* Writes an HF Gemma-2 directory: config.json (Gemma2ForCausalLM keys, torch_dtype from
   opts), generation_config.json and the weights under their HF names (embedding unscaled,
   norms as w, no lm_head: tied). Quantized weights are dequantized. Creates dir if needed;
   config.json is written last, so a directory with one is complete. */
KMED_API kmed_result kmed_gemma_save_hf(const kmed_gemma *m, const char *dir,
                                        const kmed_hf_save_opts *opts, kmed_error *err);

/* config.json text for cfg (appended to out); torch_dtype names dtype. */
KMED_API void kmed_gemma_config_json(const kmed_gemma_config *cfg, kmed_dtype dtype,
                                     kmed_buf *out);

/* GGUF export options; a zeroed struct (or NULL) writes F32. */
typedef struct kmed_gguf_save_opts {
    kmed_dtype type;         /* F32, F16, BF16, Q8_0 or Q4_0 for token_embd and every 2-D
                                layer tensor; norms are always F32 and hold 1 + w */
    int mixed;               /* 1 with Q4_0: token_embd in Q8_0, as llama-quantize without
                                --pure writes it (its Q6_K choice for row lengths that are
                                multiples of 256 is not available in kmed); 0: all in type */
    const char *name;        /* general.name; NULL: "kmed" */
    const char *tokenizer_json; /* tokenizer.json (or a directory holding it) for the merge
                                   ranks and added-token kinds behind tokenizer.ggml.scores
                                   and token_type; NULL: scores 0, kinds from tok alone */
    const kmed_gguf *tok_from; /* with tok NULL: copy the tokenizer.* keys of this GGUF
                                  (re-quantizing a GGUF keeps its vocabulary) */
    const kmed_lora *lora;   /* optional: merged while writing, as in kmed_hf_save_opts */
    kmed_callbacks cb;       /* progress ("save", tensors) and warnings */
} kmed_gguf_save_opts;

/* Writes a GGUF v3 file in llama.cpp's gemma2 layout: the metadata keys of llama.cpp's
   converter (gemma2.*, then tokenizer.ggml.* when tok is non-NULL, general.quantization_version,
   general.file_type), tensors output_norm, token_embd, then blk.N.* in name order, alignment
   32. Weights already stored in the target type are copied bytes; others are dequantized and
   quantized with GGML's reference quantizer, so a BF16 or F32 model gives the bytes
   llama-quantize gives. KMED_ERR_UNSUPPORTED when the query scale cannot be expressed
   (llama.cpp derives query_pre_attn_scalar from head_dim, or hidden/heads for 46 layers) or
   for a type kmed cannot write. tok (optional) must not have more ids than the model. */
KMED_API kmed_result kmed_gemma_save_gguf(const kmed_gemma *m, const kmed_tok *tok,
                                          const char *path, const kmed_gguf_save_opts *opts,
                                          kmed_error *err);

/* Writes a freshly initialised Gemma-2 in HF layout to dir (config.json,
   generation_config.json, weights as opts says): every linear weight and the embedding
   drawn from normal(0, 0.02) (HF's initializer_range) with the pad_id row of the embedding
   zeroed (HF's padding_idx), every norm 0 (HF stores w; the forward uses 1 + w).
   used_tokens ([vocab_size] or NULL): the rows of tokens not marked start at zero too, so
   a model trained from scratch on data holding only the marked tokens keeps them equal
   and kmed_train_config.used_tokens computes them as one row.
   Deterministic for a seed, whatever the shard layout. */
KMED_API kmed_result kmed_gemma_init_random(const kmed_gemma_config *cfg, uint64_t seed,
                                            const unsigned char *used_tokens,
                                            const char *dir, const kmed_hf_save_opts *opts,
                                            kmed_error *err);

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

#ifndef KMED_NO_TRAIN
/* ---- train: LoRA adapters (PEFT format), training forward/backward, AdamW/SGD,
   schedules, checkpoints that resume bit-exactly ----
   Shapes: B sequences of T tokens (N = B*T rows), C hidden, H/Hkv heads of D, F
   feed-forward width, V vocab, r LoRA rank. Labels follow Hugging Face: not pre-shifted
   (the logits at t are scored against labels[t+1]), -100 = not trained; the loss is the
   mean over every counted token of the whole step (all micro-batches together). */

#define KMED_LABEL_IGNORE (-100)

/* ---- LoRA adapters ---- */

typedef struct kmed_lora_config {
    int r;                /* rank; 0: 8 */
    float alpha;          /* lora_alpha; 0: 2 * r. scale = alpha / r */
    unsigned targets;     /* bits (1u << KMED_LORA_*); 0: all seven */
    uint64_t layers;      /* bit l: layer l adapted; 0: every layer */
    uint64_t seed;        /* PEFT init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from kmed_rng, B = 0 */
    const int *tokens;    /* [n_tokens] trainable token ids (distinct, any order), or NULL;
                             their rows start as the base embedding's */
    int n_tokens;
} kmed_lora_config;

/* PEFT module name of a target ("q_proj", ..., "down_proj"), NULL when out of range. */
KMED_API const char *kmed_lora_target_name(int target);
/* Parses a comma list of targets: PEFT names (q_proj ...), short names (q, k, v, o, gate,
   up, down), "attn" (q,k,v,o), "mlp" (gate,up,down) or "all". */
KMED_API kmed_result kmed_lora_targets_parse(const char *s, unsigned *targets,
                                             kmed_error *err);
/* Creates a freshly initialised adapter for model m (read for its shapes, and for the
   embedding rows of trainable tokens). The adapter owns one block for every A and B and
   token row; free with kmed_lora_free. */
KMED_API kmed_result kmed_lora_create(kmed_lora *lora, const kmed_gemma *m,
                                      const kmed_lora_config *cfg, kmed_error *err);
KMED_API void kmed_lora_free(kmed_lora *lora);
/* Number of trainable floats in the adapter. */
KMED_API size_t kmed_lora_numel(const kmed_lora *lora);
/* The adapter's embedding row for token id (hidden floats), NULL when id is not one of
   its trainable tokens (or lora is NULL). */
KMED_API const float *kmed_lora_token_row(const kmed_lora *lora, int id);
/* Writes a PEFT adapter directory: adapter_model.safetensors (F32, names
   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...; trainable tokens as
   base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta [n, hidden])
   and adapter_config.json (trainable_token_indices lists their ids). base_name goes into
   base_model_name_or_path (may be NULL). Both files are written atomically; dir is
   created if missing. */
KMED_API kmed_result kmed_lora_save(const kmed_lora *lora, const char *dir,
                                    const char *base_name, kmed_error *err);
/* Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, F32,
   F16 or BF16 tensors; a ".default" adapter name and use_rslora are understood) and
   checks every shape against m. Free with kmed_lora_free. */
KMED_API kmed_result kmed_lora_load(kmed_lora *lora, const kmed_gemma *m, const char *dir,
                                    kmed_error *err);
/* The merged weight of one target, W + scale * B A, as f32 [rows, cols] into out (the
   base in any computable dtype is dequantized row by row). Targets the adapter does not
   cover give the base weight. For exporting a merged model tensor by tensor. */
KMED_API kmed_result kmed_lora_merged_weight(const kmed_gemma *m, const kmed_lora *lora,
                                             int layer, int target, float *out,
                                             kmed_error *err);
/* Merges in place: W += scale * B A for every adapted target, and the rows of trainable
   tokens copied into the embedding. Every weight it changes must be F32 and writable
   (memory the caller owns, or a model loaded as F32 from a BF16 checkpoint);
   KMED_ERR_UNSUPPORTED otherwise, with nothing changed. */
KMED_API kmed_result kmed_lora_merge(kmed_gemma *m, const kmed_lora *lora, kmed_error *err);

/* ---- training ---- */

typedef enum kmed_optim_kind { KMED_OPTIM_ADAMW, KMED_OPTIM_SGD } kmed_optim_kind;
typedef enum kmed_sched_kind { KMED_SCHED_CONSTANT, KMED_SCHED_COSINE } kmed_sched_kind;

/* Optimiser and schedule. Zero fields mean the defaults in the comments. */
typedef struct kmed_optim_config {
    kmed_optim_kind kind;     /* AdamW (torch.optim.AdamW semantics) or plain SGD */
    float lr;                 /* peak learning rate; 0: 1e-4 */
    float beta1, beta2;       /* 0: 0.9, 0.999 */
    float eps;                /* 0: 1e-8 */
    float weight_decay;       /* decoupled (AdamW) / L2 (SGD); 0: none */
    float clip;               /* global gradient-norm clip; 0: off */
    kmed_sched_kind schedule; /* lr: linear warmup, then constant or cosine to min_lr */
    long warmup;              /* warmup steps (lr rises linearly to lr at step warmup) */
    long total_steps;         /* cosine length; 0 = constant after warmup */
    float min_lr_ratio;       /* cosine floor as a fraction of lr; 0: 0 */
} kmed_optim_config;

/* Learning rate for optimiser step `step` (1-based) under cfg. */
KMED_API float kmed_optim_lr(const kmed_optim_config *cfg, long step);

typedef struct kmed_train_config {
    int full;                 /* 1: full-parameter training (every weight, norms and the
                                 tied embedding, as f32 copies); 0: LoRA over a frozen base */
    int max_batch;            /* B: sequences per micro-batch the arena is sized for; 0: 1 */
    int max_seq;              /* T: tokens per sequence the arena is sized for; 0: 256 */
    int checkpointing;        /* 1: keep only each layer's input and recompute the layer in
                                 the backward pass (about 1/3 more compute, far less memory) */
    size_t head_rows;         /* LM-head row block (logits [rows, V] live at once);
                                 0: as many rows as fit 32M floats (128 MB) */
    float spike_factor;       /* kmed_train_step fails when the loss exceeds factor x the
                                 running mean (after 10 steps); 0: off */
    const unsigned char *used_tokens; /* [vocab_size] or NULL: 1 for every token id the
                                 data holds (inputs, labels, padding). Rows of the other
                                 tokens that are bitwise equal get the same gradient and the
                                 same update for the whole run, so the trainer computes them
                                 as one shared row that the softmax counts once per token:
                                 exact, and the LM head shrinks to the used tokens + 1 (a
                                 model initialised with kmed-init --vocab-from). Batches may
                                 then only hold used ids. NULL: every row computed */
    kmed_optim_config optim;
} kmed_train_config;

/* One trainable tensor: value, gradient and optimiser moments (m, v NULL for SGD). */
typedef struct kmed_param {
    char name[128];           /* PEFT name (LoRA) or HF name (full) */
    float *p, *g, *m, *v;     /* [n] */
    size_t n;
    int ndim;
    uint64_t shape[2];
} kmed_param;

typedef struct kmed_train kmed_train;

/* Creates a trainer. LoRA mode (cfg->full 0) borrows m and lora, both must outlive the
   trainer, and updates lora's tensors in place; the base stays frozen in its dtype (F32,
   BF16, Q8_0, Q4_0: dequantized on the fly, never stored in f32). Full mode (lora NULL)
   copies every weight of m into trainer-owned f32 parameters; kmed_train_model gives a
   model that reads them. An adapter with trainable tokens makes the trainer hold the
   embedding as f32 and its gradient (2 x vocab x hidden floats, or the compact rows).
   pool may be NULL and must outlive the trainer. */
KMED_API kmed_result kmed_train_create(kmed_train **tr, const kmed_gemma *m, kmed_lora *lora,
                                       const kmed_train_config *cfg, kmed_pool *pool,
                                       kmed_error *err);
KMED_API void kmed_train_free(kmed_train *tr);
/* The trainable tensors in a fixed order (owned by the trainer). */
KMED_API size_t kmed_train_params(kmed_train *tr, kmed_param **params);
/* Full mode: the model whose weights are the trainer's f32 parameters (a view, valid
   until kmed_train_free). LoRA mode: the borrowed base model. With cfg.used_tokens
   compacting, its embedding holds the compact rows (vocab_size = used tokens + 1). */
KMED_API const kmed_gemma *kmed_train_model(const kmed_train *tr);
/* Optimiser steps taken so far. */
KMED_API long kmed_train_step_count(const kmed_train *tr);

/* Counted targets of a batch: positions t < T-1 whose labels[t+1] is not -100. */
KMED_API size_t kmed_train_count(const int *labels, size_t B, size_t T);
KMED_API void kmed_train_zero_grad(kmed_train *tr);
/* Forward and backward over B sequences of T tokens, ids and labels (B, T). Adds
   d(sum of token losses / norm) to the gradients and the sum of token losses (natural
   log, double) to *loss_sum and the counted tokens to *count (either may be NULL).
   norm 0: forward only, gradients untouched. KMED_ERR_ARG for ids outside [0, V) or
   B > max_batch, T > max_seq. */
KMED_API kmed_result kmed_train_forward_backward(kmed_train *tr, const int *ids,
                                                 const int *labels, size_t B, size_t T,
                                                 double norm, double *loss_sum,
                                                 size_t *count, kmed_error *err);
/* Mean loss over the counted tokens (forward only); 0 when none is counted. */
KMED_API kmed_result kmed_train_loss(kmed_train *tr, const int *ids, const int *labels,
                                     size_t B, size_t T, double *loss, kmed_error *err);
/* KMED_ERR_NUMERIC naming the first tensor whose gradient holds NaN or inf. */
KMED_API kmed_result kmed_train_check_grads(kmed_train *tr, kmed_error *err);
/* Global L2 norm of all gradients (double accumulation, fixed order). */
KMED_API double kmed_train_grad_norm(kmed_train *tr);
/* One optimiser update with learning rate lr from the current gradients: clipping to
   cfg.optim.clip first, then AdamW or SGD; advances the step count. Deterministic. */
KMED_API void kmed_train_apply(kmed_train *tr, float lr);
/* One whole step: `accum` micro-batches of B sequences each, ids and labels
   (accum, B, T); the loss (mean over all their counted tokens) goes to *loss.
   = kmed_train_grads + kmed_train_update. On KMED_ERR_NUMERIC nothing was updated. */
KMED_API kmed_result kmed_train_step(kmed_train *tr, const int *ids, const int *labels,
                                     size_t accum, size_t B, size_t T, double *loss,
                                     kmed_error *err);
/* The first half of a step: zeroes gradients, runs forward/backward over the
   micro-batches, checks the loss (NaN/inf, spike guard) and the gradients. The gradients
   can be inspected or saved before kmed_train_update. KMED_ERR_ARG when no token of the
   step is counted. */
KMED_API kmed_result kmed_train_grads(kmed_train *tr, const int *ids, const int *labels,
                                      size_t accum, size_t B, size_t T, double *loss,
                                      kmed_error *err);
/* The second half: records the loss for the spike guard and applies the update at the
   scheduled lr (kmed_optim_lr of the next step). */
KMED_API void kmed_train_update(kmed_train *tr);
/* Writes the current gradients as F32 safetensors under the parameter names. */
KMED_API kmed_result kmed_train_save_grads(kmed_train *tr, const char *path,
                                           kmed_error *err);
/* Full mode: writes the trained model as an HF directory (config.json with the Gemma2
   keys, model.safetensors with HF names, F32, no lm_head: tied). Atomic per file. */
KMED_API kmed_result kmed_train_save_model(kmed_train *tr, const char *dir,
                                           kmed_error *err);

/* Checkpoint = parameters + optimiser moments + step + loop state, in one safetensors
   file written atomically, so a run killed at any moment resumes from the last complete
   checkpoint and ends bit-identical to an uninterrupted run (same thread count). */
typedef struct kmed_train_ckpt {
    uint64_t data_pos;        /* sequences the loop consumed */
    kmed_rng rng;             /* the loop's random state */
    float *train_loss;        /* [n_train] loss per step (for curves) */
    size_t n_train;
    float *val_loss;          /* [n_val][2]: (step, loss) */
    size_t n_val;
} kmed_train_ckpt;
KMED_API kmed_result kmed_train_ckpt_save(kmed_train *tr, const char *path,
                                          const kmed_train_ckpt *st, kmed_error *err);
/* Restores parameters, moments and step into tr (which must have the same parameters:
   names and shapes are checked) and fills *st (its arrays are new: free with
   kmed_train_ckpt_free). */
KMED_API kmed_result kmed_train_ckpt_load(kmed_train *tr, const char *path,
                                          kmed_train_ckpt *st, kmed_error *err);
KMED_API void kmed_train_ckpt_free(kmed_train_ckpt *st);

/* Writes a loss-curve SVG (train per step, validation points) atomically. */
KMED_API kmed_result kmed_train_svg(const char *path, const float *train_loss,
                                    size_t n_train, const float *val_loss, size_t n_val,
                                    kmed_error *err);

/* ---- merge: model merging (linear, task arithmetic, TIES, DARE-TIES, DARE-linear) of
   Gemma-2 checkpoints of one architecture, streamed tensor by tensor ----
   Semantics follow mergekit's methods of the same names. With x_i the models' tensors, b
   the base's, w_i the weights and d_i = x_i - b the task vectors:
     linear           sum_i w_i x_i, divided by sum_i w_i when normalize (default on)
     task_arithmetic  b + lambda * sum_i w_i d_i (/ sum_i w_i when normalize; default off)
     ties             d_i trimmed to its top density fraction by magnitude (per tensor); the
                      sign of each element elected from sum_i w_i d_i (>= 0: +); the mean
                      over the models that agree with it, weighted by w_i (normalize default
                      on: divide by the sum of their weights)
     dare_ties        d_i with each element kept with probability density and rescaled by
                      1/density (rescale default on), then the TIES sign election and mix
                      (normalize default off, as mergekit)
     dare_linear      the DARE drop, then b + lambda * sum_i w_i d_i (normalize default off)
   Arithmetic is f32 whatever the stored dtype; the result is rounded to the output dtype
   once. */

typedef enum kmed_merge_method {
    KMED_MERGE_LINEAR, KMED_MERGE_TASK_ARITHMETIC, KMED_MERGE_TIES, KMED_MERGE_DARE_TIES,
    KMED_MERGE_DARE_LINEAR
} kmed_merge_method;

/* mergekit's method name ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"). */
KMED_API const char *kmed_merge_method_name(kmed_merge_method m);
/* Parses a method name (as above); KMED_ERR_UNSUPPORTED naming the methods otherwise. */
KMED_API kmed_result kmed_merge_method_parse(const char *s, kmed_merge_method *m,
                                             kmed_error *err);

/* One input model. `model` is an HF directory (sharded safetensors), a PEFT adapter
   directory (merged on the fly into the config's base_model) or "DIR+ADAPTER" (the adapter
   merged into DIR), as mergekit writes it. */
typedef struct kmed_merge_model {
    const char *model;
    float weight;
    float density;           /* fraction of each task vector kept by ties/dare, (0, 1];
                                0: 1 (keep all, mergekit's default) */
} kmed_merge_model;

/* A merge. Zeroed option fields mean mergekit's defaults. Borrows every string and the
   models array unless the config was loaded by kmed_merge_config_parse/load (then it owns
   them until kmed_merge_config_free). */
typedef struct kmed_merge_config {
    kmed_merge_method method;
    const char *base_model;  /* required by every method but linear (there it only names
                                where config.json and the tokenizer come from; NULL: the
                                first model). A model equal to it is not a task vector. */
    const kmed_merge_model *models;
    size_t n_models;
    int normalize;           /* 0: the method's default (on for linear and ties), 1 on, -1 off */
    int rescale;             /* 0: default (on for dare_*), 1 on, -1 off. DARE: kept values
                                / density; ties: kept values scaled so the L1 norm of each
                                task vector is unchanged (mergekit's l1 rescale) */
    int int8_mask;           /* mergekit's memory option for the sign masks: the masks are
                                exact 0/1 here, so it does not change any value */
    float lambda;            /* scales the mixed task vector; 0: 1 */
    int consensus_count;     /* 1: elect the sign by the count of signs (mergekit "count")
                                instead of the summed weighted values ("sum") */
    uint64_t seed;           /* DARE masks; deterministic per (seed, tensor name, model) */
    int has_dtype;           /* a config file named dtype/out_dtype: */
    kmed_dtype dtype;        /* F32, BF16 or F16 */
    void *impl_;             /* private: storage of a loaded config */
} kmed_merge_config;

/* Parses a merge config in mergekit's field names, JSON or the YAML mergekit users write
   (block mappings and sequences, scalars, comments; no anchors or flow collections):
   merge_method, base_model, models[].model, models[].parameters.{weight,density},
   parameters.{normalize,rescale,int8_mask,lambda,weight,density,consensus_method}, dtype,
   out_dtype, random_seed, tokenizer_source ("base" only). Top-level weight/density in
   parameters are defaults for every model; weight is required for each model (not for
   the base model when it is listed). Unknown keys are KMED_ERR_UNSUPPORTED (nothing is
   ignored silently). `name` labels errors. Free with kmed_merge_config_free. */
KMED_API kmed_result kmed_merge_config_parse(kmed_merge_config *cfg, const char *text,
                                             size_t len, const char *name, kmed_error *err);
/* Reads and parses a config file (.json or .yaml/.yml; by content when unsure). */
KMED_API kmed_result kmed_merge_config_load(kmed_merge_config *cfg, const char *path,
                                            kmed_error *err);
/* Frees what a parse/load allocated; a caller-built config is left alone. */
KMED_API void kmed_merge_config_free(kmed_merge_config *cfg);
/* Checks the config: method, models, weights (normalize with weights summing to 0),
   densities in (0, 1], lambda finite, base_model present where needed. */
KMED_API kmed_result kmed_merge_config_validate(const kmed_merge_config *cfg,
                                                kmed_error *err);

/* Merges one tensor of n elements held in memory: out = method(base, xs[0..n_models)),
   with cfg->models[i] giving the weight and density of xs[i] (every model is a task
   model here; base may be NULL for linear). tensor_key seeds the DARE masks (use
   kmed_merge_tensor_key(name)). The same code merges the tensors of kmed_merge_run. */
KMED_API kmed_result kmed_merge_tensor(const kmed_merge_config *cfg, uint64_t tensor_key,
                                       float *out, const float *base,
                                       const float *const *xs, size_t n, kmed_error *err);
/* Seed key of a tensor name (FNV-1a 64), so masks do not depend on tensor order. */
KMED_API uint64_t kmed_merge_tensor_key(const char *name);

/* Output of kmed_merge_run; a zeroed struct writes an HF directory in F32, one file. */
typedef struct kmed_merge_out {
    int gguf;                /* 0: HF directory (config.json and tokenizer files copied
                                from the base, torch_dtype set); 1: a GGUF file */
    kmed_dtype dtype;        /* HF: F32, BF16 or F16; GGUF: F32, F16, BF16, Q8_0, Q4_0 */
    size_t max_shard_bytes;  /* HF: 0 one model.safetensors, else shards of at most this
                                (a larger tensor gets one of its own) plus the index */
    int mixed;               /* GGUF Q4_0: token_embd in Q8_0 (kmed_gguf_save_opts.mixed) */
    const char *name;        /* GGUF general.name; NULL: "kmed-merge" */
    kmed_callbacks cb;       /* progress ("merge", tensors) and log lines */
} kmed_merge_out;

/* Runs a merge from disk to disk. Every input is checked before anything is written:
   same tensor names and shapes as the reference (the base, or the first model for a
   linear merge without one), float dtypes; an lm_head.weight is left out (Gemma-2 ties
   it). Tensors are merged one at a time across all inputs (ties needs two extra reading
   passes for its exact per-tensor magnitude threshold, done with histograms, no copy):
   peak memory is about one output tensor plus one adapter target per adapter input plus
   small buffers; consumed input pages are given back as it goes. Files are written
   atomically; config.json is written last, so an HF directory holding one is complete.
   GGUF output goes through a temporary HF directory beside the file (F32, or the target
   dtype for BF16/F16: the same numbers as a direct write), converted by
   kmed_gemma_save_gguf with the base's tokenizer, then removed. */
KMED_API kmed_result kmed_merge_run(const kmed_merge_config *cfg, const char *out_path,
                                    const kmed_merge_out *out, kmed_error *err);

#endif
#ifndef KMED_NO_DATA
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
    int cloze;              /* mcqa/expqa: 1 = the cloze form, question alone -> the answer's
                               text, no options and no letter (config key "cloze") */
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
    int cloze;          /* mcqa/expqa: format in the cloze form (kmed_data_source.cloze) */
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

#endif
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
    KMED_MCQA_OPTION,    /* log-likelihood of " {option text}" per byte (acc_norm) */
    KMED_MCQA_CLOZE      /* the cloze form: the question alone ("{question}\n정답："), no
                            options listed, scored like OPTION. Small models answer it
                            above chance long before they learn to bind answers to letters
                            (OLMES's CF vs MCF) */
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

/* The prompt cfg scores item with: kmed_mcqa_prompt, or under KMED_MCQA_CLOZE the cloze
   text (exemplars then answer with their option text instead of a letter). */
KMED_API kmed_result kmed_mcqa_config_prompt(const kmed_mcqa_item *item,
                                             const kmed_mcqa_config *cfg, kmed_buf *out,
                                             kmed_error *err);

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


#endif /* KMED_H */

#ifdef KMED_IMPLEMENTATION
#ifndef KMED__IMPLEMENTATION_DONE
#define KMED__IMPLEMENTATION_DONE

#if defined(KMED_MALLOC) || defined(KMED_REALLOC) || defined(KMED_FREE)
#if !defined(KMED_MALLOC) || !defined(KMED_REALLOC) || !defined(KMED_FREE)
#error "kmed: define all of KMED_MALLOC, KMED_REALLOC and KMED_FREE, or none"
#endif
#else
#include <stdlib.h>
#define KMED_MALLOC(n) malloc(n)
#define KMED_REALLOC(p, n) realloc(p, n)
#define KMED_FREE(p) free(p)
#endif
#ifndef KMED_ASSERT
#include <assert.h>
#define KMED_ASSERT(x) assert(x)
#endif

/* ==== kmed_core: result codes, errors, logging, rng, buffers, files ==== */

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

KMED_API const char *kmed_result_str(kmed_result r)
{
    switch (r) {
    case KMED_OK: return "ok";
    case KMED_ERR_ARG: return "bad argument";
    case KMED_ERR_NOMEM: return "out of memory";
    case KMED_ERR_IO: return "i/o error";
    case KMED_ERR_FORMAT: return "malformed input";
    case KMED_ERR_SPACE: return "buffer too small";
    case KMED_ERR_UNSUPPORTED: return "unsupported";
    case KMED_ERR_LIMIT: return "size limit exceeded";
    case KMED_ERR_NOT_FOUND: return "not found";
    case KMED_ERR_SHAPE: return "shape mismatch";
    case KMED_ERR_NUMERIC: return "numeric error";
    case KMED_ERR_STATE: return "invalid state";
    }
    return "unknown error";
}

KMED_API kmed_result kmed_error_set(kmed_error *err, kmed_result code, const char *file,
                                    size_t line, size_t offset, const char *fmt, ...)
{
    size_t n = 0;
    va_list ap;
    if (!err) return code;
    err->code = code;
    err->line = line;
    err->offset = offset;
    err->file[0] = 0;
    if (file) snprintf(err->file, sizeof err->file, "%s", file);
    err->msg[0] = 0;
    if (file && *file) {
        if (line) n = (size_t)snprintf(err->msg, sizeof err->msg, "%s:%zu: ", file, line);
        else if (offset != (size_t)-1)
            n = (size_t)snprintf(err->msg, sizeof err->msg, "%s: offset %zu: ", file, offset);
        else n = (size_t)snprintf(err->msg, sizeof err->msg, "%s: ", file);
        if (n >= sizeof err->msg) n = sizeof err->msg - 1;
    }
    va_start(ap, fmt);
    vsnprintf(err->msg + n, sizeof err->msg - n, fmt, ap);
    va_end(ap);
    return code;
}

/* Shorthands for the implementation. */
#define KMED__ERR(err, code, ...) kmed_error_set((err), (code), NULL, 0, (size_t)-1, __VA_ARGS__)
#define KMED__ERRF(err, code, file, ...) \
    kmed_error_set((err), (code), (file), 0, (size_t)-1, __VA_ARGS__)

/* a*b without wrapping; 0 on overflow. */
static int kmed__mul_ok(size_t a, size_t b, size_t *out)
{
    if (a && b > (size_t)-1 / a) return 0;
    *out = a * b;
    return 1;
}

static void *kmed__calloc(size_t n, size_t size)
{
    size_t bytes;
    void *p;
    if (!kmed__mul_ok(n, size, &bytes)) return NULL;
    p = KMED_MALLOC(bytes ? bytes : 1);
    if (p) memset(p, 0, bytes);
    return p;
}

static char *kmed__strndup(const char *s, size_t n)
{
    char *p = (char *)KMED_MALLOC(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

KMED_API void kmed_free(void *p) { KMED_FREE(p); }

KMED_API void kmed_log(const kmed_callbacks *cb, kmed_log_level level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    if (!cb || !cb->log) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    cb->log(cb->user, level, msg);
}

KMED_API void kmed_progress(const kmed_callbacks *cb, const char *what, double done,
                            double total, const char *unit)
{
    if (cb && cb->progress) cb->progress(cb->user, what, done, total, unit);
}

KMED_API double kmed_time_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- rng ---- */

static uint64_t kmed__splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

KMED_API void kmed_rng_seed(kmed_rng *rng, uint64_t seed)
{
    int i;
    for (i = 0; i < 4; i++) rng->s[i] = kmed__splitmix64(&seed);
}

static uint64_t kmed__rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

KMED_API uint64_t kmed_rng_u64(kmed_rng *rng)
{
    uint64_t *s = rng->s;
    uint64_t r = kmed__rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3];
    s[2] ^= t;
    s[3] = kmed__rotl(s[3], 45);
    return r;
}

KMED_API double kmed_rng_uniform(kmed_rng *rng)
{
    return (double)(kmed_rng_u64(rng) >> 11) * (1.0 / 9007199254740992.0);
}

KMED_API double kmed_rng_normal(kmed_rng *rng)
{
    double u1 = 1.0 - kmed_rng_uniform(rng), u2 = kmed_rng_uniform(rng); /* u1 in (0,1] */
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

KMED_API uint64_t kmed_rng_below(kmed_rng *rng, uint64_t n)
{
    uint64_t x, lim;
    if (n <= 1) return 0;
    lim = (uint64_t)0 - ((uint64_t)0 - n) % n; /* largest multiple of n, 0 meaning 2^64 */
    do x = kmed_rng_u64(rng); while (lim && x >= lim);
    return x % n;
}

/* ---- buf ---- */

static int kmed__buf_reserve(kmed_buf *b, size_t extra)
{
    size_t need, cap;
    char *p;
    if (b->failed) return 0;
    if (extra > (size_t)-1 - b->len - 1) { b->failed = 1; return 0; }
    need = b->len + extra + 1;
    if (need <= b->cap) return 1;
    cap = b->cap ? b->cap : 64;
    while (cap < need) cap = cap > (size_t)-1 / 2 ? need : cap * 2;
    p = (char *)KMED_REALLOC(b->data, cap);
    if (!p) { b->failed = 1; return 0; }
    b->data = p;
    b->cap = cap;
    return 1;
}

KMED_API void kmed_buf_put(kmed_buf *b, const void *data, size_t n)
{
    if (!kmed__buf_reserve(b, n)) return;
    if (n) memcpy(b->data + b->len, data, n);
    b->len += n;
    b->data[b->len] = 0;
}

KMED_API void kmed_buf_puts(kmed_buf *b, const char *s) { kmed_buf_put(b, s, strlen(s)); }

KMED_API void kmed_buf_printf(kmed_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !kmed__buf_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

KMED_API void kmed_buf_json_str(kmed_buf *b, const char *s, size_t n)
{
    size_t i, start = 0;
    kmed_buf_put(b, "\"", 1);
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        const char *esc = NULL;
        char hex[8];
        if (c == '"') esc = "\\\"";
        else if (c == '\\') esc = "\\\\";
        else if (c == '\n') esc = "\\n";
        else if (c == '\r') esc = "\\r";
        else if (c == '\t') esc = "\\t";
        else if (c < 0x20 || c == 0x7f) { snprintf(hex, sizeof hex, "\\u%04x", c); esc = hex; }
        if (!esc) continue;
        kmed_buf_put(b, s + start, i - start);
        kmed_buf_puts(b, esc);
        start = i + 1;
    }
    kmed_buf_put(b, s + start, n - start);
    kmed_buf_put(b, "\"", 1);
}

KMED_API void kmed_buf_json_f32(kmed_buf *b, float x)
{
    char tmp[32];
    int prec;
    if (!isfinite(x)) { kmed_buf_puts(b, "null"); return; } /* JSON has no NaN/inf */
    for (prec = 6; prec <= 9; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, (double)x);
        if ((float)strtod(tmp, NULL) == x) break;
    }
    kmed_buf_puts(b, tmp);
}

KMED_API void kmed_buf_free(kmed_buf *b)
{
    KMED_FREE(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->failed = 0;
}

/* ---- files ---- */

KMED_API kmed_result kmed_file_read(const char *path, size_t max_bytes, char **data,
                                    size_t *len, kmed_error *err)
{
    FILE *f = fopen(path, "rb");
    kmed_buf b = {0};
    char chunk[65536];
    size_t n;
    *data = NULL;
    *len = 0;
    if (!f) return KMED__ERRF(err, errno == ENOENT ? KMED_ERR_NOT_FOUND : KMED_ERR_IO, path,
                              "cannot open: %s", strerror(errno));
    {
        /* refuse from the size alone: reading up to the limit first would allocate it */
        struct stat sb;
        if (max_bytes && fstat(fileno(f), &sb) == 0 && S_ISREG(sb.st_mode) &&
            (uint64_t)sb.st_size > (uint64_t)max_bytes) {
            fclose(f);
            return KMED__ERRF(err, KMED_ERR_LIMIT, path, "file larger than %zu bytes",
                              max_bytes);
        }
    }
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (max_bytes && b.len + n > max_bytes) {
            fclose(f);
            kmed_buf_free(&b);
            return KMED__ERRF(err, KMED_ERR_LIMIT, path, "file larger than %zu bytes",
                              max_bytes);
        }
        kmed_buf_put(&b, chunk, n);
    }
    if (ferror(f)) {
        fclose(f);
        kmed_buf_free(&b);
        return KMED__ERRF(err, KMED_ERR_IO, path, "read failed");
    }
    fclose(f);
    kmed_buf_put(&b, "", 0);
    if (b.failed) { kmed_buf_free(&b); return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory"); }
    *data = b.data;
    *len = b.len;
    return KMED_OK;
}

KMED_API kmed_result kmed_map_open(kmed_map *m, const char *path, kmed_error *err)
{
    struct stat st;
    int fd = open(path, O_RDONLY);
    memset(m, 0, sizeof *m);
    if (fd < 0) return KMED__ERRF(err, errno == ENOENT ? KMED_ERR_NOT_FOUND : KMED_ERR_IO, path,
                                  "cannot open: %s", strerror(errno));
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return KMED__ERRF(err, KMED_ERR_IO, path, "not a regular file");
    }
    m->size = (size_t)st.st_size;
    if (m->size) {
        void *p = mmap(NULL, m->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p != MAP_FAILED) {
            m->data = (const unsigned char *)p;
            m->mapped = 1;
        }
    }
    close(fd);
    if (!m->mapped) { /* empty file or mmap refused: read it instead */
        char *d;
        size_t n;
        kmed_result r = kmed_file_read(path, 0, &d, &n, err);
        if (r != KMED_OK) return r;
        m->data = (const unsigned char *)d;
        m->size = n;
    }
    return KMED_OK;
}

/* Gives the pages wholly inside [p, p + n) of a mapped file back to the OS once their
   data has been consumed (streaming conversion and merging), so whole models do not stay
   resident; they remain in the page cache. Linux only: elsewhere they stay until unmapped. */
#if defined(__linux__)
extern int madvise(void *addr, size_t len, int advice);
#endif
static void kmed__release_pages(const void *p, size_t n)
{
#if defined(__linux__)
    const size_t page = 4096;
    uintptr_t a = ((uintptr_t)p + page - 1) & ~(uintptr_t)(page - 1);
    uintptr_t b = ((uintptr_t)p + n) & ~(uintptr_t)(page - 1);
    if (b > a) madvise((void *)a, (size_t)(b - a), 4 /* MADV_DONTNEED */);
#else
    (void)p;
    (void)n;
#endif
}

KMED_API void kmed_map_close(kmed_map *m)
{
    if (m->mapped) munmap((void *)m->data, m->size);
    else KMED_FREE((void *)m->data);
    memset(m, 0, sizeof *m);
}

KMED_API kmed_result kmed_afile_open(kmed_afile *a, const char *path, kmed_error *err)
{
    memset(a, 0, sizeof *a);
    if (strlen(path) >= sizeof a->path)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "path too long");
    snprintf(a->path, sizeof a->path, "%s", path);
    snprintf(a->tmp, sizeof a->tmp, "%s.tmp.%ld", path, (long)getpid());
    a->f = fopen(a->tmp, "wb");
    if (!a->f) return KMED__ERRF(err, KMED_ERR_IO, a->tmp, "cannot create: %s", strerror(errno));
    return KMED_OK;
}

KMED_API kmed_result kmed_afile_write(kmed_afile *a, const void *data, size_t n,
                                      kmed_error *err)
{
    if (a->failed || !a->f) return KMED__ERRF(err, KMED_ERR_STATE, a->tmp, "write after failure");
    if (n && fwrite(data, 1, n, a->f) != n) {
        a->failed = 1;
        return KMED__ERRF(err, KMED_ERR_IO, a->tmp, "write failed: %s", strerror(errno));
    }
    return KMED_OK;
}

static void kmed__fsync_dir(const char *path)
{
    char dir[1024];
    char *slash;
    int fd;
    snprintf(dir, sizeof dir, "%s", path);
    slash = strrchr(dir, '/');
    if (slash == dir) dir[1] = 0;
    else if (slash) *slash = 0;
    else snprintf(dir, sizeof dir, ".");
    fd = open(dir, O_RDONLY);
    if (fd >= 0) { fsync(fd); close(fd); }
}

KMED_API kmed_result kmed_afile_commit(kmed_afile *a, kmed_error *err)
{
    int bad;
    if (!a->f) return KMED__ERRF(err, KMED_ERR_STATE, a->path, "not open");
    bad = a->failed || fflush(a->f) != 0 || fsync(fileno(a->f)) != 0;
    bad |= fclose(a->f) != 0;
    a->f = NULL;
    if (bad) {
        remove(a->tmp);
        return KMED__ERRF(err, KMED_ERR_IO, a->tmp, "write failed: %s", strerror(errno));
    }
    if (rename(a->tmp, a->path) != 0) {
        kmed_result r = KMED__ERRF(err, KMED_ERR_IO, a->path, "cannot rename %s into place: %s",
                                   a->tmp, strerror(errno));
        remove(a->tmp);
        return r;
    }
    kmed__fsync_dir(a->path);
    return KMED_OK;
}

KMED_API void kmed_afile_abort(kmed_afile *a)
{
    if (a->f) {
        fclose(a->f);
        remove(a->tmp);
    }
    a->f = NULL;
}

KMED_API kmed_result kmed_file_write_atomic(const char *path, const void *data, size_t n,
                                            kmed_error *err)
{
    kmed_afile a;
    kmed_result r = kmed_afile_open(&a, path, err);
    if (r == KMED_OK) r = kmed_afile_write(&a, data, n, err);
    if (r == KMED_OK) return kmed_afile_commit(&a, err);
    kmed_afile_abort(&a);
    return r;
}

KMED_API int kmed_is_dir(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

KMED_API kmed_result kmed_mkdir_p(const char *path, kmed_error *err)
{
    char tmp[1024];
    size_t i, n = strlen(path);
    if (n == 0 || n >= sizeof tmp) return KMED__ERRF(err, KMED_ERR_ARG, path, "bad directory name");
    memcpy(tmp, path, n + 1);
    for (i = 1; i <= n; i++) {
        if (tmp[i] != '/' && tmp[i] != 0) continue;
        tmp[i] = 0;
        if (mkdir(tmp, 0777) != 0 && errno != EEXIST)
            return KMED__ERRF(err, KMED_ERR_IO, tmp, "cannot create directory: %s",
                              strerror(errno));
        tmp[i] = path[i];
    }
    if (!kmed_is_dir(path)) return KMED__ERRF(err, KMED_ERR_IO, path, "not a directory");
    return KMED_OK;
}

KMED_API kmed_result kmed_path_join(char *out, size_t cap, const char *dir, const char *name,
                                    kmed_error *err)
{
    size_t n = strlen(dir);
    int w = snprintf(out, cap, "%s%s%s", dir, (n && dir[n - 1] != '/') ? "/" : "", name);
    if (w < 0 || (size_t)w >= cap)
        return KMED__ERRF(err, KMED_ERR_LIMIT, dir, "path too long for '%s'", name);
    return KMED_OK;
}

/* ==== kmed_io_text: JSON DOM (RFC 8259), JSONL and line streaming, CSV (RFC 4180) ==== */

#include <errno.h>
#include <locale.h>
#include <stdlib.h>
#include <string.h>

/* ---- JSON arena: a list of big chunks, so a document costs a handful of mallocs ---- */

typedef struct kmed__json_chunk {
    struct kmed__json_chunk *next;
    size_t cap, used;  /* bytes of payload after the (aligned) header */
} kmed__json_chunk;

/* The payload starts this far into a chunk; 16 keeps doubles and pointers aligned. */
#define KMED__JSON_HDR ((sizeof(kmed__json_chunk) + 15) & ~(size_t)15)

/* n bytes aligned to `align` (a power of two) from the doc's arena, or NULL. */
static void *kmed__json_alloc(kmed_json_doc *doc, size_t n, size_t align)
{
    kmed__json_chunk *c = (kmed__json_chunk *)doc->arena_;
    size_t at;
    if (c) {
        at = (c->used + align - 1) & ~(align - 1);
        if (at <= c->cap && n <= c->cap - at) {
            c->used = at + n;
            return (char *)c + KMED__JSON_HDR + at;
        }
    }
    {
        /* Each new chunk at least doubles the last one: O(log n) chunks per document. */
        size_t cap = !c ? 4096 : c->cap < ((size_t)128 << 20) ? c->cap * 2 : (size_t)256 << 20;
        kmed__json_chunk *nc;
        if (cap < n) cap = n;
        if (cap > (size_t)-1 - KMED__JSON_HDR) return NULL;
        nc = (kmed__json_chunk *)KMED_MALLOC(KMED__JSON_HDR + cap);
        if (!nc) return NULL;
        nc->next = c;
        nc->cap = cap;
        nc->used = n;
        doc->arena_ = nc;
        return (char *)nc + KMED__JSON_HDR;
    }
}

/* Gives back the tail of the most recent allocation p, keeping `keep` bytes. */
static void kmed__json_shrink(kmed_json_doc *doc, void *p, size_t keep)
{
    kmed__json_chunk *c = (kmed__json_chunk *)doc->arena_;
    c->used = (size_t)((char *)p - ((char *)c + KMED__JSON_HDR)) + keep;
}

/* Sizes the first chunk from the text so a typical document needs one malloc. */
static int kmed__json_arena_init(kmed_json_doc *doc, size_t text_len)
{
    size_t cap = text_len < ((size_t)128 << 20) ? text_len * 2 + 512 : (size_t)256 << 20;
    kmed__json_chunk *c = (kmed__json_chunk *)KMED_MALLOC(KMED__JSON_HDR + cap);
    if (!c) return 0;
    c->next = NULL;
    c->cap = cap;
    c->used = 0;
    doc->arena_ = c;
    return 1;
}

KMED_API void kmed_json_free(kmed_json_doc *doc)
{
    kmed__json_chunk *c;
    if (!doc) return;
    c = (kmed__json_chunk *)doc->arena_;
    while (c) {
        kmed__json_chunk *next = c->next;
        KMED_FREE(c);
        c = next;
    }
    doc->arena_ = NULL;
    doc->root = NULL;
}

/* ---- JSON parser: iterative, with an explicit stack of open containers ---- */

typedef struct kmed__json_frame {
    size_t start;        /* index in vals of this container's first child */
    size_t open;         /* offset of its '[' or '{' (for messages) */
    const char *key;     /* OBJECT: key of the member being parsed */
    size_t key_len;
    int is_obj;
} kmed__json_frame;

typedef struct kmed__json_parser {
    const unsigned char *s;
    size_t n, pos;
    kmed_json_doc *doc;
    kmed_json *vals;           /* finished children of all open containers, in order */
    size_t nvals, capvals;
    kmed__json_frame *frames;  /* open containers, innermost last */
    size_t nframes, capframes;
    const char *name;
    size_t line;
    kmed_error *err;
} kmed__json_parser;

/* Formats the error: "name:line: offset N: what" for JSONL, "name: offset N (line L,
   column C): what" for a whole file. */
static kmed_result kmed__json_fail(kmed__json_parser *p, kmed_result code, size_t at,
                                   const char *what)
{
    char found[48];
    size_t i, ln = 1, col = 1;
    if (!p->err) return code;
    if (at >= p->n) snprintf(found, sizeof found, "end of input");
    else if (p->s[at] >= 0x20 && p->s[at] < 0x7f) snprintf(found, sizeof found, "'%c'", p->s[at]);
    else snprintf(found, sizeof found, "byte 0x%02x", p->s[at]);
    if (p->line && p->name && *p->name)
        return kmed_error_set(p->err, code, p->name, p->line, at, "offset %zu: %s (found %s)",
                              at, what, found);
    if (p->line)
        return kmed_error_set(p->err, code, NULL, p->line, at, "line %zu, offset %zu: %s "
                              "(found %s)", p->line, at, what, found);
    for (i = 0; i < at && i < p->n; i++) {
        if (p->s[i] == '\n') { ln++; col = 1; }
        else col++;
    }
    if (p->name && *p->name)
        return kmed_error_set(p->err, code, p->name, 0, at, "line %zu, column %zu: %s (found %s)",
                              ln, col, what, found);
    return kmed_error_set(p->err, code, NULL, 0, at, "offset %zu (line %zu, column %zu): %s "
                          "(found %s)", at, ln, col, what, found);
}

static void kmed__json_ws(kmed__json_parser *p)
{
    const unsigned char *s = p->s;
    size_t i = p->pos, n = p->n;
    while (i < n && (s[i] == ' ' || s[i] == '\n' || s[i] == '\r' || s[i] == '\t')) i++;
    p->pos = i;
}

static int kmed__json_hex4(const unsigned char *s, unsigned *out)
{
    unsigned v = 0;
    int i;
    for (i = 0; i < 4; i++) {
        unsigned c = s[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return 0;
        v = v * 16 + d;
    }
    *out = v;
    return 1;
}

/* Length of the valid UTF-8 sequence at s[0..n) (s[0] >= 0x80), or 0 with *why set.
   Follows Unicode table 3-7: no overlongs, no encoded surrogates, nothing above U+10FFFF. */
static size_t kmed__json_utf8(const unsigned char *s, size_t n, const char **why)
{
    unsigned c = s[0], lo = 0x80, hi = 0xbf;
    size_t len, i;
    if (c < 0xc0) { *why = "stray UTF-8 continuation byte"; return 0; }
    if (c < 0xc2) { *why = "overlong UTF-8 encoding"; return 0; }
    if (c < 0xe0) len = 2;
    else if (c < 0xf0) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c < 0xf5) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else {
        *why = "invalid UTF-8 byte (code point above U+10FFFF)";
        return 0;
    }
    for (i = 1; i < len; i++) {
        if (i >= n || s[i] < 0x80 || s[i] > 0xbf) {
            *why = "truncated UTF-8 sequence";
            return 0;
        }
    }
    if (s[1] < lo || s[1] > hi) {
        if (c == 0xed) *why = "UTF-16 surrogate encoded in UTF-8";
        else if (c == 0xf4) *why = "UTF-8 code point above U+10FFFF";
        else *why = "overlong UTF-8 encoding";
        return 0;
    }
    return len;
}

/* Parses the string at p->pos (on its opening quote) into arena memory. */
static kmed_result kmed__json_string(kmed__json_parser *p, const char **out, size_t *out_len)
{
    const unsigned char *s = p->s;
    size_t n = p->n, start = p->pos + 1, i = start, end;
    char *dst;
    size_t o = 0;
    /* Fast path: printable ASCII without escapes, the bulk of real documents. */
    while (i < n && s[i] != '"' && s[i] != '\\' && s[i] >= 0x20 && s[i] < 0x80) i++;
    if (i < n && s[i] == '"') {
        dst = (char *)kmed__json_alloc(p->doc, i - start + 1, 1);
        if (!dst) return kmed__json_fail(p, KMED_ERR_NOMEM, start, "out of memory");
        memcpy(dst, s + start, i - start);
        dst[i - start] = 0;
        *out = dst;
        *out_len = i - start;
        p->pos = i + 1;
        return KMED_OK;
    }
    /* Find the closing quote first: the unescaped text is never longer than the source. */
    for (end = i; end < n && s[end] != '"'; end++)
        if (s[end] == '\\') end++;
    if (end >= n) return kmed__json_fail(p, KMED_ERR_FORMAT, n, "unterminated string");
    dst = (char *)kmed__json_alloc(p->doc, end - start + 1, 1);
    if (!dst) return kmed__json_fail(p, KMED_ERR_NOMEM, start, "out of memory");
    memcpy(dst, s + start, i - start);
    o = i - start;
    while (i < end) {
        unsigned c = s[i];
        if (c >= 0x20 && c < 0x80 && c != '\\') {
            dst[o++] = (char)c;
            i++;
        } else if (c >= 0x80) {
            const char *why = NULL;
            size_t k = kmed__json_utf8(s + i, end - i, &why);
            if (!k) return kmed__json_fail(p, KMED_ERR_FORMAT, i, why);
            memcpy(dst + o, s + i, k);
            o += k;
            i += k;
        } else if (c < 0x20) {
            return kmed__json_fail(p, KMED_ERR_FORMAT, i,
                                   "control character in string (must be escaped)");
        } else { /* backslash; the scan above guarantees s[i + 1] exists */
            unsigned e = s[i + 1], u, u2;
            switch (e) {
            case '"': dst[o++] = '"'; break;
            case '\\': dst[o++] = '\\'; break;
            case '/': dst[o++] = '/'; break;
            case 'b': dst[o++] = '\b'; break;
            case 'f': dst[o++] = '\f'; break;
            case 'n': dst[o++] = '\n'; break;
            case 'r': dst[o++] = '\r'; break;
            case 't': dst[o++] = '\t'; break;
            case 'u':
                if (end - i < 6 || !kmed__json_hex4(s + i + 2, &u))
                    return kmed__json_fail(p, KMED_ERR_FORMAT, i,
                                           "expected 4 hex digits after \\u");
                if (u >= 0xdc00 && u <= 0xdfff)
                    return kmed__json_fail(p, KMED_ERR_FORMAT, i,
                                           "lone low surrogate \\u escape");
                if (u >= 0xd800 && u <= 0xdbff) {
                    if (end - i < 12 || s[i + 6] != '\\' || s[i + 7] != 'u' ||
                        !kmed__json_hex4(s + i + 8, &u2) || u2 < 0xdc00 || u2 > 0xdfff)
                        return kmed__json_fail(p, KMED_ERR_FORMAT, i,
                                               "high surrogate \\u escape not followed by a "
                                               "low surrogate \\u escape");
                    u = 0x10000 + ((u - 0xd800) << 10) + (u2 - 0xdc00);
                    i += 6;
                }
                if (u < 0x80) dst[o++] = (char)u;
                else if (u < 0x800) {
                    dst[o++] = (char)(0xc0 | (u >> 6));
                    dst[o++] = (char)(0x80 | (u & 0x3f));
                } else if (u < 0x10000) {
                    dst[o++] = (char)(0xe0 | (u >> 12));
                    dst[o++] = (char)(0x80 | ((u >> 6) & 0x3f));
                    dst[o++] = (char)(0x80 | (u & 0x3f));
                } else {
                    dst[o++] = (char)(0xf0 | (u >> 18));
                    dst[o++] = (char)(0x80 | ((u >> 12) & 0x3f));
                    dst[o++] = (char)(0x80 | ((u >> 6) & 0x3f));
                    dst[o++] = (char)(0x80 | (u & 0x3f));
                }
                i += 4;
                break;
            default:
                return kmed__json_fail(p, KMED_ERR_FORMAT, i + 1,
                                       "invalid escape (expected one of \"\\/bfnrtu)");
            }
            i += 2;
        }
    }
    dst[o] = 0;
    kmed__json_shrink(p->doc, dst, o + 1);
    *out = dst;
    *out_len = o;
    p->pos = end + 1;
    return KMED_OK;
}

/* strtod reads the locale's decimal point; under a ',' locale, retry with it swapped in. */
static double kmed__json_strtod(const char *text, size_t len)
{
    char *endp;
    double v = strtod(text, &endp);
    if ((size_t)(endp - text) != len) {
        const struct lconv *lc = localeconv();
        const char *dp = lc && lc->decimal_point ? lc->decimal_point : ".";
        size_t dl = strlen(dp), i, o = 0;
        char *tmp = (char *)KMED_MALLOC(len + dl + 1);
        if (!tmp) return v;
        for (i = 0; i < len; i++) {
            if (text[i] == '.') { memcpy(tmp + o, dp, dl); o += dl; }
            else tmp[o++] = text[i];
        }
        tmp[o] = 0;
        v = strtod(tmp, NULL);
        KMED_FREE(tmp);
    }
    return v;
}

/* Parses a number at p->pos by the RFC 8259 grammar into *node. */
static kmed_result kmed__json_number(kmed__json_parser *p, kmed_json *node)
{
    const unsigned char *s = p->s;
    size_t n = p->n, i = p->pos, start = p->pos, digits = 0;
    int is_int = 1, neg = 0;
    uint64_t mag = 0;
    char *text;
    if (s[i] == '-') { neg = 1; i++; }
    if (i >= n || s[i] < '0' || s[i] > '9')
        return kmed__json_fail(p, KMED_ERR_FORMAT, i, "expected a digit after '-'");
    if (s[i] == '0') {
        i++;
        if (i < n && s[i] >= '0' && s[i] <= '9')
            return kmed__json_fail(p, KMED_ERR_FORMAT, i, "leading zero in number");
        digits = 1;
    } else {
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (digits < 19) mag = mag * 10 + (uint64_t)(s[i] - '0');
            digits++;
            i++;
        }
    }
    if (i < n && s[i] == '.') {
        is_int = 0;
        i++;
        if (i >= n || s[i] < '0' || s[i] > '9')
            return kmed__json_fail(p, KMED_ERR_FORMAT, i, "expected a digit after '.'");
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        is_int = 0;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        if (i >= n || s[i] < '0' || s[i] > '9')
            return kmed__json_fail(p, KMED_ERR_FORMAT, i, "expected a digit in exponent");
        while (i < n && s[i] >= '0' && s[i] <= '9') i++;
    }
    text = (char *)kmed__json_alloc(p->doc, i - start + 1, 1);
    if (!text) return kmed__json_fail(p, KMED_ERR_NOMEM, start, "out of memory");
    memcpy(text, s + start, i - start);
    text[i - start] = 0;
    node->type = KMED_JSON_NUMBER;
    node->str = text;
    node->len = i - start;
    /* Integers below 2^53 convert exactly without strtod (vocab ids, counts, shapes). */
    if (is_int && digits <= 15) node->num = neg ? -(double)mag : (double)mag;
    else node->num = kmed__json_strtod(text, i - start);
    if (is_int && neg && mag == 0) node->num = -0.0;
    p->pos = i;
    return KMED_OK;
}

static kmed_result kmed__json_push(kmed__json_parser *p, const kmed_json *node)
{
    if (p->nvals == p->capvals) {
        size_t cap = p->capvals ? p->capvals * 2 : 256, bytes;
        kmed_json *v;
        if (!kmed__mul_ok(cap, sizeof *v, &bytes))
            return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
        v = (kmed_json *)KMED_REALLOC(p->vals, bytes);
        if (!v) return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
        p->vals = v;
        p->capvals = cap;
    }
    p->vals[p->nvals++] = *node;
    return KMED_OK;
}

/* Parses an object key and the ':' after it; p->pos is on the key's quote (or not). */
static kmed_result kmed__json_key(kmed__json_parser *p, kmed__json_frame *f, int after_comma)
{
    kmed_result r;
    if (p->pos >= p->n || p->s[p->pos] != '"') {
        if (after_comma && p->pos < p->n && p->s[p->pos] == '}')
            return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "trailing comma before '}'");
        return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "expected a string key");
    }
    r = kmed__json_string(p, &f->key, &f->key_len);
    if (r != KMED_OK) return r;
    kmed__json_ws(p);
    if (p->pos >= p->n || p->s[p->pos] != ':')
        return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "expected ':' after object key");
    p->pos++;
    return KMED_OK;
}

static kmed_result kmed__json_run(kmed__json_parser *p)
{
    const unsigned char *s = p->s;
    kmed_json node;
    kmed_result r;
    kmed_json *root;
    for (;;) {
        /* A value starts here. */
        memset(&node, 0, sizeof node);
        kmed__json_ws(p);
        if (p->pos >= p->n) return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "expected a value");
        switch (s[p->pos]) {
        case '[': case '{': {
            kmed__json_frame *f;
            if (p->nframes >= (size_t)KMED_MAX_JSON_DEPTH) {
                char what[96];
                snprintf(what, sizeof what, "nesting deeper than %d (KMED_MAX_JSON_DEPTH)",
                         (int)KMED_MAX_JSON_DEPTH);
                return kmed__json_fail(p, KMED_ERR_LIMIT, p->pos, what);
            }
            if (p->nframes == p->capframes) {
                size_t cap = p->capframes ? p->capframes * 2 : 16;
                kmed__json_frame *nf = (kmed__json_frame *)KMED_REALLOC(
                    p->frames, cap * sizeof *nf);
                if (!nf) return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
                p->frames = nf;
                p->capframes = cap;
            }
            f = &p->frames[p->nframes++];
            f->start = p->nvals;
            f->open = p->pos;
            f->key = NULL;
            f->key_len = 0;
            f->is_obj = s[p->pos] == '{';
            p->pos++;
            kmed__json_ws(p);
            if (p->pos < p->n && s[p->pos] == (f->is_obj ? '}' : ']')) {
                p->pos++;
                p->nframes--;
                node.type = f->is_obj ? KMED_JSON_OBJECT : KMED_JSON_ARRAY;
                goto have_value;
            }
            if (f->is_obj && (r = kmed__json_key(p, f, 0)) != KMED_OK) return r;
            continue;
        }
        case '"':
            node.type = KMED_JSON_STRING;
            r = kmed__json_string(p, &node.str, &node.len);
            if (r != KMED_OK) return r;
            break;
        case 't': case 'f': case 'n': {
            static const char *const words[3] = {"true", "false", "null"};
            static const kmed_json_type types[3] = {KMED_JSON_TRUE, KMED_JSON_FALSE,
                                                    KMED_JSON_NULL};
            int w = s[p->pos] == 't' ? 0 : s[p->pos] == 'f' ? 1 : 2;
            size_t wl = strlen(words[w]);
            if (p->n - p->pos < wl || memcmp(s + p->pos, words[w], wl) != 0)
                return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos,
                                       "expected a value (true, false or null misspelt?)");
            node.type = types[w];
            p->pos += wl;
            break;
        }
        case ']':
            if (p->nframes && !p->frames[p->nframes - 1].is_obj && p->nvals >
                p->frames[p->nframes - 1].start)
                return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "trailing comma before ']'");
            return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "expected a value");
        default:
            if (s[p->pos] == '-' || (s[p->pos] >= '0' && s[p->pos] <= '9')) {
                r = kmed__json_number(p, &node);
                if (r != KMED_OK) return r;
                break;
            }
            return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, "expected a value");
        }

    have_value:
        /* node is complete: attach it to the innermost open container, closing as many
           containers as the input closes. */
        for (;;) {
            kmed__json_frame *f;
            char close;
            if (!p->nframes) {
                kmed__json_ws(p);
                if (p->pos < p->n)
                    return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos,
                                           "expected end of input after the JSON value");
                root = (kmed_json *)kmed__json_alloc(p->doc, sizeof *root, sizeof(double));
                if (!root) return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
                *root = node;
                p->doc->root = root;
                return KMED_OK;
            }
            f = &p->frames[p->nframes - 1];
            if (f->is_obj) {
                node.key = f->key;
                node.key_len = f->key_len;
            }
            if ((r = kmed__json_push(p, &node)) != KMED_OK) return r;
            kmed__json_ws(p);
            close = f->is_obj ? '}' : ']';
            if (p->pos < p->n && s[p->pos] == ',') {
                p->pos++;
                if (f->is_obj) {
                    kmed__json_ws(p);
                    if ((r = kmed__json_key(p, f, 1)) != KMED_OK) return r;
                }
                break; /* on to the next value */
            }
            if (p->pos < p->n && s[p->pos] == close) {
                size_t nk = p->nvals - f->start, bytes;
                p->pos++;
                memset(&node, 0, sizeof node);
                node.type = f->is_obj ? KMED_JSON_OBJECT : KMED_JSON_ARRAY;
                node.len = nk;
                if (!kmed__mul_ok(nk, sizeof(kmed_json), &bytes))
                    return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
                node.kids = (kmed_json *)kmed__json_alloc(p->doc, bytes, sizeof(double));
                if (!node.kids) return kmed__json_fail(p, KMED_ERR_NOMEM, p->pos, "out of memory");
                memcpy(node.kids, p->vals + f->start, bytes);
                p->nvals = f->start;
                p->nframes--;
                continue;
            }
            {
                char what[96];
                snprintf(what, sizeof what, "expected ',' or '%c' (%s opened at offset %zu)",
                         close, f->is_obj ? "object" : "array", f->open);
                return kmed__json_fail(p, KMED_ERR_FORMAT, p->pos, what);
            }
        }
    }
}

KMED_API kmed_result kmed_json_parse(kmed_json_doc *doc, const char *text, size_t len,
                                     const char *name, size_t line, kmed_error *err)
{
    kmed__json_parser p;
    kmed_result r;
    doc->root = NULL;
    doc->arena_ = NULL;
    memset(&p, 0, sizeof p);
    p.s = (const unsigned char *)text;
    p.n = len;
    p.doc = doc;
    p.name = name;
    p.line = line;
    p.err = err;
    if (!text && len) return kmed__json_fail(&p, KMED_ERR_ARG, 0, "NULL text");
    if (!kmed__json_arena_init(doc, len))
        return kmed__json_fail(&p, KMED_ERR_NOMEM, 0, "out of memory");
    /* RFC 8259 lets a parser ignore a leading UTF-8 byte order mark. */
    if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) p.pos = 3;
    r = kmed__json_run(&p);
    KMED_FREE(p.vals);
    KMED_FREE(p.frames);
    if (r != KMED_OK) doc->root = NULL;
    return r;
}

/* ---- JSON accessors ---- */

KMED_API const kmed_json *kmed_json_get(const kmed_json *o, const char *key)
{
    size_t i, kl;
    if (!o || o->type != KMED_JSON_OBJECT || !key) return NULL;
    kl = strlen(key);
    for (i = o->len; i-- > 0;) {
        const kmed_json *k = &o->kids[i];
        if (k->key_len == kl && memcmp(k->key, key, kl) == 0) return k;
    }
    return NULL;
}

KMED_API const kmed_json *kmed_json_at(const kmed_json *a, size_t i)
{
    if (!a || (a->type != KMED_JSON_ARRAY && a->type != KMED_JSON_OBJECT) || i >= a->len)
        return NULL;
    return &a->kids[i];
}

KMED_API const char *kmed_json_str(const kmed_json *j, const char *def)
{
    return j && j->type == KMED_JSON_STRING ? j->str : def;
}

KMED_API double kmed_json_num(const kmed_json *j, double def)
{
    return j && j->type == KMED_JSON_NUMBER ? j->num : def;
}

KMED_API int kmed_json_int(const kmed_json *j, int64_t *out)
{
    const char *t;
    size_t i = 0, n;
    int neg = 0;
    uint64_t mag = 0, lim;
    if (!j || j->type != KMED_JSON_NUMBER || !j->len) return 0;
    t = j->str;
    n = j->len;
    if (t[0] == '-') { neg = 1; i = 1; }
    if (i >= n) return 0;
    lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (; i < n; i++) {
        unsigned d;
        if (t[i] < '0' || t[i] > '9') return 0; /* fraction or exponent */
        d = (unsigned)(t[i] - '0');
        if (mag > (lim - d) / 10) return 0;
        mag = mag * 10 + d;
    }
    if (neg) *out = mag ? -(int64_t)(mag - 1) - 1 : 0;
    else *out = (int64_t)mag;
    return 1;
}

KMED_API int kmed_json_bool(const kmed_json *j, int def)
{
    if (j && j->type == KMED_JSON_TRUE) return 1;
    if (j && j->type == KMED_JSON_FALSE) return 0;
    return def;
}

/* ---- line streaming ---- */

/* Read granularity; a line that fits in one chunk is returned in place, without a copy.
   Overridable so the fuzz harness can push lines across chunk boundaries. */
#ifndef KMED__LINES_CHUNK
#define KMED__LINES_CHUNK ((size_t)1 << 16)
#endif

KMED_API kmed_result kmed_lines_open(kmed_lines *r, const char *path, kmed_error *err)
{
    memset(r, 0, sizeof *r);
    if (!path) return KMED__ERR(err, KMED_ERR_ARG, "kmed_lines_open: NULL path");
    if (strcmp(path, "-") == 0) {
        r->f = stdin;
        snprintf(r->name, sizeof r->name, "<stdin>");
    } else {
        r->f = fopen(path, "rb");
        if (!r->f)
            return KMED__ERRF(err, errno == ENOENT ? KMED_ERR_NOT_FOUND : KMED_ERR_IO, path,
                              "cannot open: %s", strerror(errno));
        r->owns_f = 1;
        snprintf(r->name, sizeof r->name, "%s", path);
    }
    r->in_ = (char *)KMED_MALLOC(KMED__LINES_CHUNK + 1); /* +1: room to NUL-terminate */
    if (!r->in_) {
        kmed_lines_close(r);
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    }
    return KMED_OK;
}

/* Appends n bytes to the spill buffer r->buf (kept with room for a NUL). */
static int kmed__lines_append(kmed_lines *r, size_t *blen, const char *s, size_t n)
{
    if (*blen + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : 256;
        char *nb;
        while (cap < *blen + n + 1) cap *= 2;
        nb = (char *)KMED_REALLOC(r->buf, cap);
        if (!nb) return 0;
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + *blen, s, n);
    *blen += n;
    return 1;
}

KMED_API kmed_result kmed_lines_next(kmed_lines *r, const char **s, size_t *len, int *eof,
                                     kmed_error *err)
{
    size_t blen = 0;
    int spilled = 0, too_long = 0;
    *s = NULL;
    *len = 0;
    *eof = 0;
    if (!r->f || !r->in_) return KMED__ERR(err, KMED_ERR_STATE, "kmed_lines_next: not open");
    for (;;) {
        char *start, *nl;
        size_t avail, take;
        if (r->in_pos_ == r->in_len_) {
            size_t got;
            if (r->eof_) break;
            got = fread(r->in_, 1, KMED__LINES_CHUNK, r->f);
            if (got == 0) {
                if (ferror(r->f))
                    return kmed_error_set(err, KMED_ERR_IO, r->name, r->line + 1, (size_t)-1,
                                          "read failed: %s", strerror(errno));
                r->eof_ = 1;
                break;
            }
            r->in_pos_ = 0;
            r->in_len_ = got;
        }
        start = r->in_ + r->in_pos_;
        avail = r->in_len_ - r->in_pos_;
        nl = (char *)memchr(start, '\n', avail);
        take = nl ? (size_t)(nl - start) : avail;
        if (nl && !spilled) { /* the whole line is in the read buffer */
            r->in_pos_ += take + 1;
            r->line++;
            if (take > KMED_MAX_LINE_BYTES)
                return kmed_error_set(err, KMED_ERR_LIMIT, r->name, r->line, (size_t)-1,
                                      "line longer than %zu bytes (skipped)",
                                      (size_t)KMED_MAX_LINE_BYTES);
            r->crlf_ = take > 0 && start[take - 1] == '\r';
            if (r->crlf_) take--;
            start[take] = 0;
            *s = start;
            *len = take;
            return KMED_OK;
        }
        spilled = 1;
        if (!too_long && take > KMED_MAX_LINE_BYTES - blen) too_long = 1;
        if (!too_long && !kmed__lines_append(r, &blen, start, take))
            return kmed_error_set(err, KMED_ERR_NOMEM, r->name, r->line + 1, (size_t)-1,
                                  "out of memory for a %zu-byte line", blen + take);
        r->in_pos_ += take + (nl ? 1 : 0);
        if (nl) break;
    }
    if (!spilled) {
        *eof = 1;
        return KMED_OK;
    }
    r->line++;
    if (too_long)
        return kmed_error_set(err, KMED_ERR_LIMIT, r->name, r->line, (size_t)-1,
                              "line longer than %zu bytes (skipped)",
                              (size_t)KMED_MAX_LINE_BYTES);
    r->crlf_ = blen > 0 && r->buf[blen - 1] == '\r';
    if (r->crlf_) blen--;
    r->buf[blen] = 0;
    *s = r->buf;
    *len = blen;
    return KMED_OK;
}

KMED_API void kmed_lines_close(kmed_lines *r)
{
    if (r->f && r->owns_f) fclose(r->f);
    KMED_FREE(r->buf);
    KMED_FREE(r->in_);
    memset(r, 0, sizeof *r);
}

/* ---- JSONL ---- */

KMED_API kmed_result kmed_jsonl_open(kmed_jsonl *r, const char *path, kmed_error *err)
{
    memset(r, 0, sizeof *r);
    return kmed_lines_open(&r->lines, path, err);
}

KMED_API kmed_result kmed_jsonl_next(kmed_jsonl *r, const kmed_json **value, int *eof,
                                     kmed_error *err)
{
    *value = NULL;
    kmed_json_free(&r->doc);
    for (;;) {
        const char *s;
        size_t len, i;
        kmed_result res = kmed_lines_next(&r->lines, &s, &len, eof, err);
        if (res != KMED_OK || *eof) return res;
        for (i = 0; i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\r'); i++) {}
        if (i == len) continue; /* blank line */
        res = kmed_json_parse(&r->doc, s, len, r->lines.name, r->lines.line, err);
        if (res != KMED_OK) {
            kmed_json_free(&r->doc);
            return res;
        }
        *value = r->doc.root;
        return KMED_OK;
    }
}

KMED_API void kmed_jsonl_close(kmed_jsonl *r)
{
    kmed_json_free(&r->doc);
    kmed_lines_close(&r->lines);
}

/* ---- CSV ---- */

/* Ends the field that began at rowbuf_ offset `from`: NUL-terminates it and records its
   length in c->fields[*nf] (pointers are set once the row is complete). */
static int kmed__csv_end_field(kmed_csv *c, size_t from, size_t *nf)
{
    if (*nf == c->fields_cap_) {
        size_t cap = c->fields_cap_ ? c->fields_cap_ * 2 : 16;
        kmed_csv_field *f = (kmed_csv_field *)KMED_REALLOC(c->fields, cap * sizeof *f);
        if (!f) return 0;
        c->fields = f;
        c->fields_cap_ = cap;
    }
    c->fields[*nf].s = NULL;
    c->fields[*nf].len = c->rowbuf_.len - from;
    (*nf)++;
    kmed_buf_put(&c->rowbuf_, "", 1);
    return !c->rowbuf_.failed;
}

/* Reads one record (possibly several physical lines) into c->rowbuf_ and c->fields. */
static kmed_result kmed__csv_row(kmed_csv *c, size_t *nf, int *eof, kmed_error *err)
{
    const char *s;
    size_t len, i, from;
    int in_quotes = 0, after_quote = 0, at_start = 1;
    kmed_result r;
    *nf = 0;
    c->rowbuf_.len = 0;
    c->rowbuf_.failed = 0;
    /* Blank lines between records are skipped, except in a one-column file where an
       empty line is a record holding one empty field. */
    do {
        r = kmed_lines_next(&c->lines, &s, &len, eof, err);
        if (r != KMED_OK || *eof) return r;
        if (c->lines.line == 1 && len >= 3 && memcmp(s, "\xef\xbb\xbf", 3) == 0) {
            s += 3;
            len -= 3;
        }
    } while (len == 0 && c->n_cols != 1);
    c->row_line = c->lines.line;
    from = 0;
    for (;;) {
        i = 0;
        while (i < len) {
            if (in_quotes) {
                const char *q = (const char *)memchr(s + i, '"', len - i);
                size_t run = q ? (size_t)(q - (s + i)) : len - i;
                kmed_buf_put(&c->rowbuf_, s + i, run);
                i += run;
                if (i == len) break;
                if (i + 1 < len && s[i + 1] == '"') { kmed_buf_put(&c->rowbuf_, "\"", 1); i += 2; }
                else { in_quotes = 0; after_quote = 1; i++; }
            } else if (s[i] == ',') {
                if (!kmed__csv_end_field(c, from, nf)) goto nomem;
                from = c->rowbuf_.len;
                at_start = 1;
                after_quote = 0;
                i++;
            } else if (after_quote) {
                return kmed_error_set(err, KMED_ERR_FORMAT, c->lines.name, c->lines.line,
                                      (size_t)-1, "field %zu of the row starting at line %zu: "
                                      "expected ',' or end of line after closing quote, "
                                      "found '%c'", *nf + 1, c->row_line, s[i]);
            } else if (s[i] == '"' && at_start) {
                in_quotes = 1;
                at_start = 0;
                i++;
            } else {
                /* A quote inside an unquoted field is taken literally (5" tube). */
                size_t j = i + 1;
                while (j < len && s[j] != ',') j++;
                kmed_buf_put(&c->rowbuf_, s + i, j - i);
                at_start = 0;
                i = j;
            }
        }
        if (c->rowbuf_.failed) goto nomem;
        if (!in_quotes) break;
        if (c->rowbuf_.len > KMED_MAX_LINE_BYTES)
            return kmed_error_set(err, KMED_ERR_LIMIT, c->lines.name, c->row_line, (size_t)-1,
                                  "record longer than %zu bytes", (size_t)KMED_MAX_LINE_BYTES);
        /* The quoted field goes on: keep the line break as the file had it. */
        kmed_buf_put(&c->rowbuf_, c->lines.crlf_ ? "\r\n" : "\n", c->lines.crlf_ ? 2 : 1);
        r = kmed_lines_next(&c->lines, &s, &len, eof, err);
        if (r != KMED_OK) return r;
        if (*eof) {
            *eof = 0;
            return kmed_error_set(err, KMED_ERR_FORMAT, c->lines.name, c->row_line, (size_t)-1,
                                  "quoted field %zu never closed (end of file reached)",
                                  *nf + 1);
        }
    }
    if (!kmed__csv_end_field(c, from, nf)) goto nomem;
    for (i = 0, from = 0; i < *nf; i++) {
        c->fields[i].s = c->rowbuf_.data + from;
        from += c->fields[i].len + 1;
    }
    return KMED_OK;
nomem:
    return kmed_error_set(err, KMED_ERR_NOMEM, c->lines.name, c->row_line, (size_t)-1,
                          "out of memory");
}

KMED_API kmed_result kmed_csv_open(kmed_csv *c, const char *path, kmed_error *err)
{
    size_t nf, i, bytes, total = 0;
    int eof;
    char *p;
    kmed_result r;
    memset(c, 0, sizeof *c);
    r = kmed_lines_open(&c->lines, path, err);
    if (r != KMED_OK) return r;
    r = kmed__csv_row(c, &nf, &eof, err);
    if (r == KMED_OK && eof)
        r = kmed_error_set(err, KMED_ERR_FORMAT, c->lines.name, 0, (size_t)-1,
                           "empty file: expected a header row");
    if (r != KMED_OK) {
        kmed_csv_close(c);
        return r;
    }
    /* One block: the pointer array, then the names. */
    for (i = 0; i < nf; i++) total += c->fields[i].len + 1;
    if (!kmed__mul_ok(nf, sizeof(char *), &bytes) || bytes > (size_t)-1 - total ||
        !(c->header = (char **)KMED_MALLOC(bytes + total))) {
        kmed_csv_close(c);
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    }
    p = (char *)(c->header + nf);
    for (i = 0; i < nf; i++) {
        memcpy(p, c->fields[i].s, c->fields[i].len + 1);
        c->header[i] = p;
        p += c->fields[i].len + 1;
    }
    c->n_cols = nf;
    return KMED_OK;
}

KMED_API kmed_result kmed_csv_next(kmed_csv *c, int *eof, kmed_error *err)
{
    size_t nf;
    kmed_result r;
    *eof = 0;
    if (!c->header) return KMED__ERR(err, KMED_ERR_STATE, "kmed_csv_next: not open");
    r = kmed__csv_row(c, &nf, eof, err);
    if (r != KMED_OK || *eof) return r;
    if (nf != c->n_cols)
        return kmed_error_set(err, KMED_ERR_FORMAT, c->lines.name, c->row_line, (size_t)-1,
                              "row has %zu fields, the header has %zu", nf, c->n_cols);
    return KMED_OK;
}

KMED_API int kmed_csv_col(const kmed_csv *c, const char *name)
{
    size_t i;
    for (i = 0; i < c->n_cols; i++)
        if (strcmp(c->header[i], name) == 0) return (int)i;
    return -1;
}

KMED_API void kmed_csv_close(kmed_csv *c)
{
    kmed_lines_close(&c->lines);
    KMED_FREE(c->header);
    KMED_FREE(c->fields);
    kmed_buf_free(&c->rowbuf_);
    memset(c, 0, sizeof *c);
}

/* ==== kmed_io_bin: safetensors and GGUF read/write ==== */

#include <dirent.h>
#include <stdlib.h>
#include <string.h>

/* ---- dtypes ---- */

KMED_API const char *kmed_dtype_name(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return "F32";
    case KMED_F16: return "F16";
    case KMED_BF16: return "BF16";
    case KMED_Q8_0: return "Q8_0";
    case KMED_Q4_0: return "Q4_0";
    case KMED_I8: return "I8";
    case KMED_I32: return "I32";
    case KMED_I64: return "I64";
    case KMED_U8: return "U8";
    case KMED_F64: return "F64";
    case KMED_BOOL: return "BOOL";
    case KMED_DTYPE_UNKNOWN: break;
    }
    return "UNKNOWN";
}

static int kmed__iob_ieq(const char *a, const char *b)
{
    for (; *a && *b; a++, b++) {
        char x = *a, y = *b;
        if (x >= 'a' && x <= 'z') x = (char)(x - 'a' + 'A');
        if (y >= 'a' && y <= 'z') y = (char)(y - 'a' + 'A');
        if (x != y) return 0;
    }
    return *a == *b;
}

KMED_API kmed_dtype kmed_dtype_parse(const char *s)
{
    int t;
    if (!s) return KMED_DTYPE_UNKNOWN;
    for (t = 0; t < (int)KMED_DTYPE_UNKNOWN; t++)
        if (kmed__iob_ieq(s, kmed_dtype_name((kmed_dtype)t))) return (kmed_dtype)t;
    return KMED_DTYPE_UNKNOWN;
}

KMED_API uint64_t kmed_tensor_numel(const kmed_tensor_info *t)
{
    uint64_t n = 1;
    int i, nd = t->ndim < KMED_MAX_DIMS ? t->ndim : KMED_MAX_DIMS;
    /* A zero dimension anywhere makes the tensor empty, whatever the others overflow to. */
    for (i = 0; i < nd; i++)
        if (!t->shape[i]) return 0;
    for (i = 0; i < nd; i++) {
        if (n > UINT64_MAX / t->shape[i]) return UINT64_MAX; /* saturate */
        n *= t->shape[i];
    }
    return n;
}

KMED_API size_t kmed_dtype_bytes(kmed_dtype t, uint64_t n)
{
    uint64_t per = 0, blk = 1, b;
    switch (t) {
    case KMED_F32: case KMED_I32: per = 4; break;
    case KMED_F16: case KMED_BF16: per = 2; break;
    case KMED_I8: case KMED_U8: case KMED_BOOL: per = 1; break;
    case KMED_I64: case KMED_F64: per = 8; break;
    case KMED_Q8_0: per = 34; blk = 32; break; /* fp16 scale + 32 int8 */
    case KMED_Q4_0: per = 18; blk = 32; break; /* fp16 scale + 32 nibbles */
    case KMED_DTYPE_UNKNOWN: return 0;
    }
    if (n % blk) return 0;
    n /= blk;
    if (n > UINT64_MAX / per) return 0;
    b = n * per;
    if (b > (uint64_t)SIZE_MAX) return 0;
    return (size_t)b;
}

/* Errors at a byte offset of a named file. */
#define KMED__IOB_ERR(err, code, file, off, ...) \
    kmed_error_set((err), (code), (file), 0, (off), __VA_ARGS__)

static uint32_t kmed__iob_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t kmed__iob_u64(const unsigned char *p)
{
    return (uint64_t)kmed__iob_u32(p) | (uint64_t)kmed__iob_u32(p + 4) << 32;
}

static void kmed__iob_put_u32(kmed_buf *b, uint32_t v)
{
    unsigned char p[4];
    int i;
    for (i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
    kmed_buf_put(b, p, 4);
}

static void kmed__iob_put_u64(kmed_buf *b, uint64_t v)
{
    unsigned char p[8];
    int i;
    for (i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
    kmed_buf_put(b, p, 8);
}

/* qsort comparators over arrays of pointers. */
static int kmed__iob_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static int kmed__iob_cmp_tname(const void *a, const void *b)
{
    const kmed_tensor_info *x = *(const kmed_tensor_info *const *)a;
    const kmed_tensor_info *y = *(const kmed_tensor_info *const *)b;
    return strcmp(x->name, y->name);
}

/* Binary search in an array of tensor pointers sorted by name. */
static const kmed_tensor_info *kmed__iob_bsearch(kmed_tensor_info *const *sorted, size_t n,
                                                 const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(sorted[mid]->name, name);
        if (c == 0) return sorted[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* Zero bytes for padding writes. */
static const unsigned char kmed__iob_zeros[256] = {0};

static kmed_result kmed__iob_write_zeros(kmed_afile *af, size_t n, kmed_error *err)
{
    while (n) {
        size_t k = n < sizeof kmed__iob_zeros ? n : sizeof kmed__iob_zeros;
        kmed_result r = kmed_afile_write(af, kmed__iob_zeros, k, err);
        if (r != KMED_OK) return r;
        n -= k;
    }
    return KMED_OK;
}

/* ---- safetensors: reading ---- */

/* safetensors dtype names with their element sizes; kmed computes with the first group,
   the others are listed as KMED_DTYPE_UNKNOWN but still size-checked. */
typedef struct kmed__st_dtype { const char *name; kmed_dtype t; unsigned size; } kmed__st_dtype;
static const kmed__st_dtype kmed__st_dtypes[] = {
    {"F32", KMED_F32, 4}, {"F16", KMED_F16, 2}, {"BF16", KMED_BF16, 2}, {"I8", KMED_I8, 1},
    {"I32", KMED_I32, 4}, {"I64", KMED_I64, 8}, {"U8", KMED_U8, 1}, {"F64", KMED_F64, 8},
    {"BOOL", KMED_BOOL, 1},
    {"I16", KMED_DTYPE_UNKNOWN, 2}, {"U16", KMED_DTYPE_UNKNOWN, 2},
    {"U32", KMED_DTYPE_UNKNOWN, 4}, {"U64", KMED_DTYPE_UNKNOWN, 8},
    {"F8_E4M3", KMED_DTYPE_UNKNOWN, 1}, {"F8_E5M2", KMED_DTYPE_UNKNOWN, 1},
    {"F8_E8M0", KMED_DTYPE_UNKNOWN, 1}, {"C64", KMED_DTYPE_UNKNOWN, 8}
};

typedef struct kmed__st_impl {
    kmed_map *maps; size_t n_maps;
    char **shard_names;          /* [n_maps] file paths, for messages */
    size_t *shard_of;            /* [n_tensors] which map holds tensor i */
    char **dtype_strs;           /* [n_tensors] dtype text as stored */
    size_t cap;                  /* capacity of tensors, shard_of, dtype_strs */
    kmed_tensor_info **sorted;   /* [n_tensors] by name, for kmed_st_find */
} kmed__st_impl;

/* Room for one more tensor in st. */
static kmed_result kmed__st_grow(kmed_st *st, kmed__st_impl *im, kmed_error *err)
{
    size_t cap;
    kmed_tensor_info *t;
    size_t *so;
    char **ds;
    if (st->n_tensors < im->cap) return KMED_OK;
    if (st->n_tensors >= KMED_MAX_TENSORS)
        return KMED__ERR(err, KMED_ERR_LIMIT, "more than %zu tensors (KMED_MAX_TENSORS)",
                         (size_t)KMED_MAX_TENSORS);
    cap = im->cap ? im->cap * 2 : 64;
    t = (kmed_tensor_info *)KMED_REALLOC(st->tensors, cap * sizeof *t);
    if (t) st->tensors = t;
    so = t ? (size_t *)KMED_REALLOC(im->shard_of, cap * sizeof *so) : NULL;
    if (so) im->shard_of = so;
    ds = so ? (char **)KMED_REALLOC(im->dtype_strs, cap * sizeof *ds) : NULL;
    if (ds) im->dtype_strs = ds;
    if (!ds) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory for %zu tensors", cap);
    im->cap = cap;
    return KMED_OK;
}

typedef struct kmed__st_span { uint64_t begin, end; size_t idx; } kmed__st_span;

static int kmed__st_cmp_span(const void *a, const void *b)
{
    const kmed__st_span *x = (const kmed__st_span *)a, *y = (const kmed__st_span *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* A non-negative JSON integer. */
static int kmed__st_json_u64(const kmed_json *j, uint64_t *out)
{
    int64_t v;
    if (!j || j->type != KMED_JSON_NUMBER || !kmed_json_int(j, &v) || v < 0) return 0;
    *out = (uint64_t)v;
    return 1;
}

/* Parses one tensor entry of a header into st->tensors[st->n_tensors] (not yet counted). */
static kmed_result kmed__st_parse_entry(kmed_st *st, kmed__st_impl *im, const kmed_json *m,
                                        const unsigned char *data, uint64_t data_size,
                                        const char *name, kmed_error *err)
{
    kmed_tensor_info *t = &st->tensors[st->n_tensors];
    const kmed_json *jd = kmed_json_get(m, "dtype"), *js = kmed_json_get(m, "shape");
    const kmed_json *jo = kmed_json_get(m, "data_offsets");
    const kmed__st_dtype *dt = NULL;
    uint64_t begin, end, numel = 1, need;
    size_t i;
    const char *tn = m->key;
    memset(t, 0, sizeof *t);
    if (strlen(tn) != m->key_len || m->key_len == 0)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor name is empty or holds a NUL");
    if (m->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': entry is not an object", tn);
    if (!jd || jd->type != KMED_JSON_STRING)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': missing string \"dtype\"",
                          tn);
    if (!js || js->type != KMED_JSON_ARRAY)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s': missing array \"shape\"",
                          tn);
    if (!jo || jo->type != KMED_JSON_ARRAY || jo->len != 2)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': \"data_offsets\" must be an array [begin, end]", tn);
    if (js->len > KMED_MAX_DIMS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                          "tensor '%s': %zu dimensions, at most %d supported (KMED_MAX_DIMS)",
                          tn, js->len, KMED_MAX_DIMS);
    for (i = 0; i < sizeof kmed__st_dtypes / sizeof kmed__st_dtypes[0]; i++)
        if (strcmp(jd->str, kmed__st_dtypes[i].name) == 0) dt = &kmed__st_dtypes[i];
    t->ndim = (int)js->len;
    for (i = 0; i < js->len; i++) {
        uint64_t d;
        if (!kmed__st_json_u64(&js->kids[i], &d))
            return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                              "tensor '%s': shape[%zu] is not a non-negative integer", tn, i);
        t->shape[i] = d;
        if (d && numel > UINT64_MAX / d)
            return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                              "tensor '%s': element count overflows 64 bits", tn);
        numel *= d;
    }
    if (!kmed__st_json_u64(&jo->kids[0], &begin) || !kmed__st_json_u64(&jo->kids[1], &end))
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': data_offsets are not non-negative integers", tn);
    if (begin > end || end > data_size)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "tensor '%s': data_offsets [%llu, %llu] outside the data area of "
                          "%llu bytes", tn, (unsigned long long)begin,
                          (unsigned long long)end, (unsigned long long)data_size);
    if (dt) {
        if (numel > UINT64_MAX / dt->size)
            return KMED__ERRF(err, KMED_ERR_LIMIT, name,
                              "tensor '%s': byte size overflows 64 bits", tn);
        need = numel * dt->size;
        if (need != end - begin)
            return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                              "tensor '%s': dtype %s with %llu elements needs %llu bytes, "
                              "data_offsets span %llu", tn, dt->name,
                              (unsigned long long)numel, (unsigned long long)need,
                              (unsigned long long)(end - begin));
    }
    t->name = kmed__strndup(tn, strlen(tn));
    im->dtype_strs[st->n_tensors] = kmed__strndup(jd->str, jd->len);
    if (!t->name || !im->dtype_strs[st->n_tensors]) {
        KMED_FREE((void *)t->name);
        KMED_FREE(im->dtype_strs[st->n_tensors]);
        t->name = NULL;
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    t->dtype = dt ? dt->t : KMED_DTYPE_UNKNOWN;
    t->ggml_type = -1;
    t->data = data + begin;
    t->nbytes = (size_t)(end - begin);
    im->shard_of[st->n_tensors] = im->n_maps ? im->n_maps - 1 : 0;
    st->n_tensors++;
    return KMED_OK;
}

/* Parses the header of one safetensors file held in d[0..size) and appends its tensors
   (sorted by data offset) to st. name labels errors; want_meta keeps __metadata__. */
static kmed_result kmed__st_parse(kmed_st *st, kmed__st_impl *im, const unsigned char *d,
                                  size_t size, const char *name, int want_meta,
                                  kmed_error *err)
{
    kmed_json_doc doc = {0};
    kmed_error jerr;
    kmed_result r = KMED_OK;
    uint64_t hlen, data_size;
    const unsigned char *data;
    size_t i, first = st->n_tensors;
    kmed__st_span *spans = NULL;
    if (size < 8)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name,
                          "file of %zu bytes is too short for the 8-byte header length", size);
    hlen = kmed__iob_u64(d);
    if (hlen > KMED_MAX_HEADER_BYTES)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 0,
                             "header length %llu exceeds KMED_MAX_HEADER_BYTES (%zu)",
                             (unsigned long long)hlen, (size_t)KMED_MAX_HEADER_BYTES);
    if (hlen > size - 8)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0,
                             "header length %llu runs past the end of the %zu-byte file",
                             (unsigned long long)hlen, size);
    if (hlen < 2)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0,
                             "header length %llu is too short for a JSON object",
                             (unsigned long long)hlen);
    data = d + 8 + hlen;
    data_size = size - 8 - hlen;
    memset(&jerr, 0, sizeof jerr);
    if (kmed_json_parse(&doc, (const char *)d + 8, (size_t)hlen, NULL, 0, &jerr) != KMED_OK) {
        size_t off = jerr.offset == (size_t)-1 ? (size_t)-1 : jerr.offset + 8;
        r = KMED__IOB_ERR(err, jerr.code == KMED_ERR_NOMEM ? KMED_ERR_NOMEM : KMED_ERR_FORMAT,
                          name, off, "header is not valid JSON: %s", jerr.msg);
        goto done;
    }
    if (!doc.root || doc.root->type != KMED_JSON_OBJECT) {
        r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 8, "header is not a JSON object");
        goto done;
    }
    for (i = 0; i < doc.root->len; i++) {
        const kmed_json *m = &doc.root->kids[i];
        if (strcmp(m->key, "__metadata__") == 0) {
            size_t k;
            if (m->type != KMED_JSON_OBJECT) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "__metadata__ is not an object");
                goto done;
            }
            for (k = 0; k < m->len; k++)
                if (m->kids[k].type != KMED_JSON_STRING) {
                    r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                                   "__metadata__ value of '%s' is not a string",
                                   m->kids[k].key);
                    goto done;
                }
            if (!want_meta || st->meta_keys || m->len == 0) continue;
            st->meta_keys = (const char **)kmed__calloc(m->len, sizeof(char *));
            st->meta_vals = (const char **)kmed__calloc(m->len, sizeof(char *));
            if (!st->meta_keys || !st->meta_vals) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                goto done;
            }
            for (k = 0; k < m->len; k++) {
                st->meta_keys[k] = kmed__strndup(m->kids[k].key, m->kids[k].key_len);
                st->meta_vals[k] = kmed__strndup(m->kids[k].str, m->kids[k].len);
                st->n_meta = k + 1;
                if (!st->meta_keys[k] || !st->meta_vals[k]) {
                    r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                    goto done;
                }
            }
            continue;
        }
        if ((r = kmed__st_grow(st, im, err)) != KMED_OK) goto done;
        r = kmed__st_parse_entry(st, im, m, data, data_size, name, err);
        if (r != KMED_OK) goto done;
    }
    /* File order and the overlap check both want the tensors sorted by offset. */
    if (st->n_tensors - first > 1) {
        size_t n = st->n_tensors - first;
        kmed_tensor_info *tmp_t = NULL;
        char **tmp_d = NULL;
        spans = (kmed__st_span *)kmed__calloc(n, sizeof *spans);
        if (spans) tmp_t = (kmed_tensor_info *)kmed__calloc(n, sizeof *tmp_t);
        if (tmp_t) tmp_d = (char **)kmed__calloc(n, sizeof *tmp_d);
        if (!tmp_d) {
            KMED_FREE(tmp_t);
            r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            goto done;
        }
        for (i = 0; i < n; i++) {
            const kmed_tensor_info *t = &st->tensors[first + i];
            spans[i].begin = (uint64_t)((const unsigned char *)t->data - data);
            spans[i].end = spans[i].begin + t->nbytes;
            spans[i].idx = first + i;
        }
        qsort(spans, n, sizeof *spans, kmed__st_cmp_span);
        for (i = 0; i < n; i++) {
            tmp_t[i] = st->tensors[spans[i].idx];
            tmp_d[i] = im->dtype_strs[spans[i].idx];
        }
        memcpy(&st->tensors[first], tmp_t, n * sizeof *tmp_t);
        memcpy(&im->dtype_strs[first], tmp_d, n * sizeof *tmp_d);
        KMED_FREE(tmp_t);
        KMED_FREE(tmp_d);
        for (i = 1; i < n; i++)
            if (spans[i].begin < spans[i - 1].end && spans[i].begin != spans[i].end &&
                spans[i - 1].begin != spans[i - 1].end) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                               "tensors '%s' [%llu, %llu] and '%s' [%llu, %llu] overlap",
                               st->tensors[first + i - 1].name,
                               (unsigned long long)spans[i - 1].begin,
                               (unsigned long long)spans[i - 1].end,
                               st->tensors[first + i].name,
                               (unsigned long long)spans[i].begin,
                               (unsigned long long)spans[i].end);
                goto done;
            }
    }
done:
    KMED_FREE(spans);
    kmed_json_free(&doc);
    return r;
}

/* Sorted name index and duplicate check, once every shard is in. */
static kmed_result kmed__st_finish(kmed_st *st, kmed__st_impl *im, kmed_error *err)
{
    size_t i;
    im->sorted = (kmed_tensor_info **)kmed__calloc(st->n_tensors, sizeof *im->sorted);
    if (!im->sorted) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    for (i = 0; i < st->n_tensors; i++) im->sorted[i] = &st->tensors[i];
    qsort(im->sorted, st->n_tensors, sizeof *im->sorted, kmed__iob_cmp_tname);
    for (i = 1; i < st->n_tensors; i++)
        if (strcmp(im->sorted[i]->name, im->sorted[i - 1]->name) == 0) {
            size_t a = (size_t)(im->sorted[i - 1] - st->tensors);
            size_t b = (size_t)(im->sorted[i] - st->tensors);
            const char *fa = im->n_maps ? im->shard_names[im->shard_of[a]] : "";
            const char *fb = im->n_maps ? im->shard_names[im->shard_of[b]] : "";
            return KMED__ERR(err, KMED_ERR_FORMAT, "tensor '%s' is stored twice (%s, %s)",
                             im->sorted[i]->name, fa, fb);
        }
    return KMED_OK;
}

KMED_API void kmed_st_close(kmed_st *st)
{
    kmed__st_impl *im = (kmed__st_impl *)st->impl_;
    size_t i;
    for (i = 0; i < st->n_tensors; i++) KMED_FREE((void *)st->tensors[i].name);
    KMED_FREE(st->tensors);
    for (i = 0; i < st->n_meta; i++) {
        KMED_FREE((void *)st->meta_keys[i]);
        KMED_FREE((void *)st->meta_vals[i]);
    }
    KMED_FREE((void *)st->meta_keys);
    KMED_FREE((void *)st->meta_vals);
    if (im) {
        for (i = 0; i < im->n_maps; i++) {
            kmed_map_close(&im->maps[i]);
            KMED_FREE(im->shard_names[i]);
        }
        for (i = 0; i < st->n_tensors; i++) KMED_FREE(im->dtype_strs[i]);
        KMED_FREE(im->maps);
        KMED_FREE(im->shard_names);
        KMED_FREE(im->shard_of);
        KMED_FREE(im->dtype_strs);
        KMED_FREE(im->sorted);
        KMED_FREE(im);
    }
    memset(st, 0, sizeof *st);
}

static kmed_result kmed__st_begin(kmed_st *st, size_t n_files, kmed_error *err)
{
    kmed__st_impl *im;
    memset(st, 0, sizeof *st);
    im = (kmed__st_impl *)kmed__calloc(1, sizeof *im);
    if (im && n_files) {
        im->maps = (kmed_map *)kmed__calloc(n_files, sizeof *im->maps);
        im->shard_names = (char **)kmed__calloc(n_files, sizeof(char *));
        if (!im->maps || !im->shard_names) {
            KMED_FREE(im->maps);
            KMED_FREE(im->shard_names);
            KMED_FREE(im);
            im = NULL;
        }
    }
    if (!im) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    st->impl_ = im;
    return KMED_OK;
}

/* Maps one file and appends its tensors. */
static kmed_result kmed__st_add_file(kmed_st *st, const char *path, kmed_error *err)
{
    kmed__st_impl *im = (kmed__st_impl *)st->impl_;
    size_t k = im->n_maps;
    kmed_result r;
    im->shard_names[k] = kmed__strndup(path, strlen(path));
    if (!im->shard_names[k]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    r = kmed_map_open(&im->maps[k], path, err);
    if (r != KMED_OK) {
        KMED_FREE(im->shard_names[k]);
        im->shard_names[k] = NULL;
        return r;
    }
    im->n_maps++;
    return kmed__st_parse(st, im, im->maps[k].data, im->maps[k].size, path, k == 0, err);
}

/* One file image held in memory (also the fuzzing entry point): st borrows d, which must
   outlive it. name labels errors. */
static kmed_result kmed__st_open_mem(kmed_st *st, const void *d, size_t size,
                                     const char *name, kmed_error *err)
{
    kmed_result r = kmed__st_begin(st, 0, err);
    if (r == KMED_OK)
        r = kmed__st_parse(st, (kmed__st_impl *)st->impl_, (const unsigned char *)d, size,
                           name ? name : "<memory>", 1, err);
    if (r == KMED_OK) r = kmed__st_finish(st, (kmed__st_impl *)st->impl_, err);
    if (r != KMED_OK) kmed_st_close(st);
    return r;
}

static int kmed__st_has_suffix(const char *s, const char *suf)
{
    size_t n = strlen(s), m = strlen(suf);
    return n >= m && strcmp(s + n - m, suf) == 0;
}

/* A shard name from an index must stay inside the model directory. */
static int kmed__st_safe_name(const char *s)
{
    const char *p = s;
    if (!*s || *s == '/') return 0;
    while (*p) {
        const char *q = strchr(p, '/');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 2 && p[0] == '.' && p[1] == '.') return 0;
        if (!q) break;
        p = q + 1;
    }
    return 1;
}

static kmed_result kmed__st_open_index(kmed_st *st, const char *dir, const char *index,
                                       kmed_error *err)
{
    char *text = NULL;
    size_t len = 0, i, n_files = 0;
    kmed_json_doc doc = {0};
    const kmed_json *wm;
    const char **files = NULL;
    char path[4096];
    kmed_result r = kmed_file_read(index, KMED_MAX_HEADER_BYTES, &text, &len, err);
    if (r != KMED_OK) return r;
    r = kmed_json_parse(&doc, text, len, index, 1, err);
    if (r != KMED_OK) goto done;
    wm = kmed_json_get(doc.root, "weight_map");
    if (!wm || wm->type != KMED_JSON_OBJECT) {
        r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "missing object \"weight_map\"");
        goto done;
    }
    if (wm->len > KMED_MAX_TENSORS) {
        r = KMED__ERRF(err, KMED_ERR_LIMIT, index, "%zu tensors exceed KMED_MAX_TENSORS",
                       wm->len);
        goto done;
    }
    files = (const char **)kmed__calloc(wm->len ? wm->len : 1, sizeof *files);
    if (!files) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
    for (i = 0; i < wm->len; i++) {
        const kmed_json *v = &wm->kids[i];
        if (v->type != KMED_JSON_STRING || !kmed__st_safe_name(v->str) ||
            strlen(v->str) != v->len) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index,
                           "weight_map['%s'] is not a file name inside the directory", v->key);
            goto done;
        }
        files[i] = v->str;
    }
    /* Each shard once, in name order (model-00001-of-N first). */
    qsort(files, wm->len, sizeof *files, kmed__iob_cmp_str);
    for (i = 0; i < wm->len; i++)
        if (i == 0 || strcmp(files[i], files[n_files - 1]) != 0) files[n_files++] = files[i];
    if (n_files == 0) {
        r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "weight_map is empty");
        goto done;
    }
    if ((r = kmed__st_begin(st, n_files, err)) != KMED_OK) goto done;
    for (i = 0; i < n_files && r == KMED_OK; i++) {
        r = kmed_path_join(path, sizeof path, dir, files[i], err);
        if (r == KMED_OK) r = kmed__st_add_file(st, path, err);
    }
    if (r == KMED_OK) r = kmed__st_finish(st, (kmed__st_impl *)st->impl_, err);
    /* Every tensor the index names must be in the shard it names. */
    for (i = 0; r == KMED_OK && i < wm->len; i++) {
        const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
        const kmed_tensor_info *t = kmed_st_find(st, wm->kids[i].key);
        const char *shard;
        if (!t) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "tensor '%s' is in no shard",
                           wm->kids[i].key);
            break;
        }
        shard = im->shard_names[im->shard_of[t - st->tensors]];
        if (!kmed__st_has_suffix(shard, wm->kids[i].str) ||
            (strlen(shard) > wm->kids[i].len && shard[strlen(shard) - wm->kids[i].len - 1] != '/'))
            r = KMED__ERRF(err, KMED_ERR_FORMAT, index, "tensor '%s' is in %s, not in %s",
                           wm->kids[i].key, shard, wm->kids[i].str);
    }
done:
    if (r != KMED_OK && st->impl_) kmed_st_close(st);
    KMED_FREE((void *)files);
    kmed_json_free(&doc);
    KMED_FREE(text);
    return r;
}

/* A directory without an index: model.safetensors, else its only *.safetensors file. */
static kmed_result kmed__st_open_dir(kmed_st *st, const char *dir, char *path, size_t cap,
                                     kmed_error *err)
{
    DIR *dp = opendir(dir);
    struct dirent *de;
    size_t count = 0;
    int have_model = 0;
    char first[512] = {0};
    if (!dp) return KMED__ERRF(err, KMED_ERR_IO, dir, "cannot open directory");
    while ((de = readdir(dp)) != NULL) {
        if (!kmed__st_has_suffix(de->d_name, ".safetensors") || de->d_name[0] == '.') continue;
        if (strcmp(de->d_name, "model.safetensors") == 0) have_model = 1;
        if (count++ == 0 || strcmp(de->d_name, first) < 0)
            snprintf(first, sizeof first, "%s", de->d_name);
    }
    closedir(dp);
    (void)st;
    if (count == 0)
        return KMED__ERRF(err, KMED_ERR_NOT_FOUND, dir,
                          "no *.safetensors file and no model.safetensors.index.json");
    if (have_model) snprintf(first, sizeof first, "model.safetensors");
    else if (count > 1)
        return KMED__ERRF(err, KMED_ERR_FORMAT, dir,
                          "%zu *.safetensors files but no model.safetensors.index.json", count);
    return kmed_path_join(path, cap, dir, first, err);
}

KMED_API kmed_result kmed_st_open(kmed_st *st, const char *path, kmed_error *err)
{
    char file[4096];
    kmed_result r;
    memset(st, 0, sizeof *st);
    if (kmed_is_dir(path)) {
        char index[4096];
        FILE *f;
        r = kmed_path_join(index, sizeof index, path, "model.safetensors.index.json", err);
        if (r != KMED_OK) return r;
        f = fopen(index, "rb");
        if (f) {
            fclose(f);
            return kmed__st_open_index(st, path, index, err);
        }
        r = kmed__st_open_dir(st, path, file, sizeof file, err);
        if (r != KMED_OK) return r;
        path = file;
    }
    {
        kmed_map map;
        kmed__st_impl *im;
        r = kmed_map_open(&map, path, err);
        if (r != KMED_OK) return r;
        r = kmed__st_open_mem(st, map.data, map.size, path, err);
        if (r != KMED_OK) { kmed_map_close(&map); return r; }
        /* st now owns the map. */
        im = (kmed__st_impl *)st->impl_;
        im->maps = (kmed_map *)kmed__calloc(1, sizeof *im->maps);
        im->shard_names = (char **)kmed__calloc(1, sizeof(char *));
        if (im->shard_names) im->shard_names[0] = kmed__strndup(path, strlen(path));
        if (!im->maps || !im->shard_names || !im->shard_names[0]) {
            if (im->shard_names) KMED_FREE(im->shard_names[0]);
            kmed_map_close(&map);
            kmed_st_close(st);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        im->maps[0] = map;
        im->n_maps = 1;
    }
    return KMED_OK;
}

KMED_API const kmed_tensor_info *kmed_st_find(const kmed_st *st, const char *name)
{
    const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
    if (!im || !im->sorted || !name) return NULL;
    return kmed__iob_bsearch(im->sorted, st->n_tensors, name);
}

KMED_API const char *kmed_st_dtype_str(const kmed_st *st, size_t i)
{
    const kmed__st_impl *im = (const kmed__st_impl *)st->impl_;
    if (!im || i >= st->n_tensors) return NULL;
    return im->dtype_strs[i];
}

/* ---- safetensors: writing ---- */

static int kmed__st_writable(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_F16 || t == KMED_BF16 || t == KMED_I8 || t == KMED_I32 ||
           t == KMED_I64 || t == KMED_U8 || t == KMED_F64 || t == KMED_BOOL;
}

KMED_API kmed_result kmed_st_writer_open(kmed_st_writer *w, const char *path,
                                         const kmed_tensor_info *tensors, size_t n,
                                         const char *const *meta_keys,
                                         const char *const *meta_vals, size_t n_meta,
                                         kmed_error *err)
{
    kmed_buf h = {0};
    kmed_result r = KMED_OK;
    uint64_t off = 0;
    size_t i, j;
    unsigned char len8[8];
    memset(w, 0, sizeof *w);
    if (n > KMED_MAX_TENSORS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "%zu tensors exceed KMED_MAX_TENSORS", n);
    w->nbytes_ = (size_t *)kmed__calloc(n ? n : 1, sizeof *w->nbytes_);
    if (!w->nbytes_) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    kmed_buf_puts(&h, "{");
    if (n_meta) {
        kmed_buf_puts(&h, "\"__metadata__\":{");
        for (i = 0; i < n_meta; i++) {
            if (!meta_keys[i] || !meta_vals[i]) {
                r = KMED__ERRF(err, KMED_ERR_ARG, path, "metadata entry %zu is NULL", i);
                goto fail;
            }
            if (i) kmed_buf_puts(&h, ",");
            kmed_buf_json_str(&h, meta_keys[i], strlen(meta_keys[i]));
            kmed_buf_puts(&h, ":");
            kmed_buf_json_str(&h, meta_vals[i], strlen(meta_vals[i]));
        }
        kmed_buf_puts(&h, "}");
    }
    for (i = 0; i < n; i++) {
        const kmed_tensor_info *t = &tensors[i];
        uint64_t numel;
        size_t nb;
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor %zu has no usable name", i);
            goto fail;
        }
        if (!kmed__st_writable(t->dtype)) {
            r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                           "tensor '%s': dtype %s cannot be stored in safetensors", t->name,
                           kmed_dtype_name(t->dtype));
            goto fail;
        }
        if (t->ndim < 0 || t->ndim > KMED_MAX_DIMS) {
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s': bad ndim %d", t->name,
                           t->ndim);
            goto fail;
        }
        numel = kmed_tensor_numel(t);
        nb = kmed_dtype_bytes(t->dtype, numel);
        if ((numel && !nb) || numel == UINT64_MAX || (t->nbytes && t->nbytes != nb)) {
            r = KMED__ERRF(err, KMED_ERR_SHAPE, path,
                           "tensor '%s': shape and dtype give %zu bytes, descriptor says %zu",
                           t->name, nb, t->nbytes);
            goto fail;
        }
        for (j = 0; j < i; j++) /* quadratic, but writers hold at most a few thousand */
            if (strcmp(tensors[j].name, t->name) == 0) {
                r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s' given twice", t->name);
                goto fail;
            }
        w->nbytes_[i] = nb;
        if (n_meta || i) kmed_buf_puts(&h, ",");
        kmed_buf_json_str(&h, t->name, strlen(t->name));
        kmed_buf_printf(&h, ":{\"dtype\":\"%s\",\"shape\":[", kmed_dtype_name(t->dtype));
        for (j = 0; j < (size_t)t->ndim; j++)
            kmed_buf_printf(&h, "%s%llu", j ? "," : "", (unsigned long long)t->shape[j]);
        kmed_buf_printf(&h, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)off,
                        (unsigned long long)(off + nb));
        off += nb;
    }
    kmed_buf_puts(&h, "}");
    /* HF pads so tensor data is 8-byte aligned (a failed buffer stops growing: no spin) */
    while (h.len % 8 && !h.failed) kmed_buf_puts(&h, " ");
    if (h.failed) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto fail; }
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)h.len >> (8 * i));
    r = kmed_afile_open(&w->af, path, err);
    if (r != KMED_OK) goto fail;
    r = kmed_afile_write(&w->af, len8, 8, err);
    if (r == KMED_OK) r = kmed_afile_write(&w->af, h.data, h.len, err);
    if (r != KMED_OK) { kmed_afile_abort(&w->af); goto fail; }
    w->n = n;
    kmed_buf_free(&h);
    return KMED_OK;
fail:
    kmed_buf_free(&h);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
    return r;
}

KMED_API kmed_result kmed_st_writer_put(kmed_st_writer *w, const void *data, size_t nbytes,
                                        kmed_error *err)
{
    if (!w->nbytes_ || !w->af.f || w->next >= w->n)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "no tensor left to put");
    if (nbytes != w->nbytes_[w->next])
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path,
                          "tensor %zu: got %zu bytes, declared %zu", w->next, nbytes,
                          w->nbytes_[w->next]);
    w->next++;
    return kmed_afile_write(&w->af, data, nbytes, err);
}

KMED_API kmed_result kmed_st_writer_commit(kmed_st_writer *w, kmed_error *err)
{
    kmed_result r;
    if (!w->nbytes_ || !w->af.f)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->next != w->n)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path,
                          "commit after %zu of %zu tensors", w->next, w->n);
    r = kmed_afile_commit(&w->af, err);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
    return r;
}

KMED_API void kmed_st_writer_abort(kmed_st_writer *w)
{
    kmed_afile_abort(&w->af);
    KMED_FREE(w->nbytes_);
    w->nbytes_ = NULL;
}

KMED_API kmed_result kmed_st_write(const char *path, const kmed_tensor_info *tensors,
                                   size_t n, const char *const *meta_keys,
                                   const char *const *meta_vals, size_t n_meta,
                                   kmed_error *err)
{
    kmed_st_writer w;
    size_t i;
    kmed_result r = kmed_st_writer_open(&w, path, tensors, n, meta_keys, meta_vals, n_meta,
                                        err);
    if (r != KMED_OK) return r;
    for (i = 0; i < n && r == KMED_OK; i++) {
        if (!tensors[i].data && w.nbytes_[i])
            r = KMED__ERRF(err, KMED_ERR_ARG, path, "tensor '%s' has no data",
                           tensors[i].name);
        else r = kmed_st_writer_put(&w, tensors[i].data, w.nbytes_[i], err);
    }
    if (r == KMED_OK) return kmed_st_writer_commit(&w, err);
    kmed_st_writer_abort(&w);
    return r;
}

/* ---- GGUF: reading ---- */

#define KMED__GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define KMED__GGUF_N_TYPES 40

/* GGML tensor types by number: name, elements per block, bytes per block (0: size not
   known, e.g. layouts llama.cpp has since removed). */
typedef struct kmed__ggml_type { const char *name; unsigned blck, size; } kmed__ggml_type;
static const kmed__ggml_type kmed__ggml_types[KMED__GGUF_N_TYPES] = {
    {"F32", 1, 4}, {"F16", 1, 2}, {"Q4_0", 32, 18}, {"Q4_1", 32, 20}, {"Q4_2", 0, 0},
    {"Q4_3", 0, 0}, {"Q5_0", 32, 22}, {"Q5_1", 32, 24}, {"Q8_0", 32, 34}, {"Q8_1", 32, 36},
    {"Q2_K", 256, 84}, {"Q3_K", 256, 110}, {"Q4_K", 256, 144}, {"Q5_K", 256, 176},
    {"Q6_K", 256, 210}, {"Q8_K", 256, 292}, {"IQ2_XXS", 256, 66}, {"IQ2_XS", 256, 74},
    {"IQ3_XXS", 256, 98}, {"IQ1_S", 256, 50}, {"IQ4_NL", 32, 18}, {"IQ3_S", 256, 110},
    {"IQ2_S", 256, 82}, {"IQ4_XS", 256, 136}, {"I8", 1, 1}, {"I16", 1, 2}, {"I32", 1, 4},
    {"I64", 1, 8}, {"F64", 1, 8}, {"IQ1_M", 256, 56}, {"BF16", 1, 2},
    {"Q4_0_4_4", 0, 0}, {"Q4_0_4_8", 0, 0}, {"Q4_0_8_8", 0, 0}, {"TQ1_0", 256, 54},
    {"TQ2_0", 256, 66}, {"IQ4_NL_4_4", 0, 0}, {"IQ4_NL_4_8", 0, 0}, {"IQ4_NL_8_8", 0, 0},
    {"MXFP4", 32, 17}
};

KMED_API const char *kmed_ggml_type_name(int ggml_type)
{
    if (ggml_type < 0 || ggml_type >= KMED__GGUF_N_TYPES) return "unknown";
    return kmed__ggml_types[ggml_type].name;
}

static kmed_dtype kmed__gguf_dtype(uint32_t type)
{
    switch (type) {
    case 0: return KMED_F32;
    case 1: return KMED_F16;
    case 2: return KMED_Q4_0;
    case 8: return KMED_Q8_0;
    case 24: return KMED_I8;
    case 26: return KMED_I32;
    case 27: return KMED_I64;
    case 28: return KMED_F64;
    case 30: return KMED_BF16;
    default: return KMED_DTYPE_UNKNOWN;
    }
}

/* GGML type number of a kmed dtype, -1 when GGUF has none. */
static int kmed__gguf_ggml_type(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return 0;
    case KMED_F16: return 1;
    case KMED_Q4_0: return 2;
    case KMED_Q8_0: return 8;
    case KMED_I8: return 24;
    case KMED_I32: return 26;
    case KMED_I64: return 27;
    case KMED_F64: return 28;
    case KMED_BF16: return 30;
    default: return -1;
    }
}

/* Bytes of one scalar metadata value, 0 for STRING/ARRAY/unknown. */
static size_t kmed__gguf_scalar_size(uint32_t type)
{
    switch (type) {
    case KMED_GGUF_U8: case KMED_GGUF_I8: case KMED_GGUF_BOOL: return 1;
    case KMED_GGUF_U16: case KMED_GGUF_I16: return 2;
    case KMED_GGUF_U32: case KMED_GGUF_I32: case KMED_GGUF_F32: return 4;
    case KMED_GGUF_U64: case KMED_GGUF_I64: case KMED_GGUF_F64: return 8;
    default: return 0;
    }
}

static const char *kmed__gguf_type_str(uint32_t type)
{
    static const char *const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool",
                                        "string", "array", "u64", "i64", "f64"};
    return type < 13 ? names[type] : "?";
}

typedef struct kmed__gguf_impl {
    kmed_map map;
    int mapped;                    /* map is ours to close */
    kmed_tensor_info **sorted;     /* [n_tensors] by name */
    kmed_gguf_kv **sorted_kv;      /* [n_kv] by key */
} kmed__gguf_impl;

/* Bounds-checked cursor over the file bytes. */
typedef struct kmed__gguf_cur {
    const unsigned char *d;
    size_t size, pos;
    const char *name;
    kmed_error *err;
} kmed__gguf_cur;

static kmed_result kmed__gguf_need(kmed__gguf_cur *c, uint64_t n, const char *what)
{
    if (n <= c->size - c->pos) return KMED_OK;
    return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos,
                         "truncated: %s needs %llu bytes, %zu left in the file", what,
                         (unsigned long long)n, c->size - c->pos);
}

static kmed_result kmed__gguf_u32(kmed__gguf_cur *c, uint32_t *v, const char *what)
{
    kmed_result r = kmed__gguf_need(c, 4, what);
    if (r != KMED_OK) return r;
    *v = kmed__iob_u32(c->d + c->pos);
    c->pos += 4;
    return KMED_OK;
}

static kmed_result kmed__gguf_u64(kmed__gguf_cur *c, uint64_t *v, const char *what)
{
    kmed_result r = kmed__gguf_need(c, 8, what);
    if (r != KMED_OK) return r;
    *v = kmed__iob_u64(c->d + c->pos);
    c->pos += 8;
    return KMED_OK;
}

/* A GGUF string (u64 length, bytes) left in place in the file. */
static kmed_result kmed__gguf_str(kmed__gguf_cur *c, const char **s, size_t *len,
                                  const char *what)
{
    uint64_t n;
    kmed_result r = kmed__gguf_u64(c, &n, what);
    if (r == KMED_OK) r = kmed__gguf_need(c, n, what);
    if (r != KMED_OK) return r;
    *s = (const char *)c->d + c->pos;
    *len = (size_t)n;
    c->pos += (size_t)n;
    return KMED_OK;
}

/* Widens a little-endian scalar of `type` at p into kv's u/i/f. */
static void kmed__gguf_widen(kmed_gguf_kv *kv, uint32_t type, const unsigned char *p)
{
    uint64_t raw = 0;
    size_t n = kmed__gguf_scalar_size(type), k;
    for (k = 0; k < n; k++) raw |= (uint64_t)p[k] << (8 * k);
    switch (type) {
    case KMED_GGUF_U8: case KMED_GGUF_U16: case KMED_GGUF_U32: case KMED_GGUF_U64:
        kv->u = raw; kv->i = (int64_t)raw; kv->f = (double)raw; break;
    case KMED_GGUF_BOOL:
        kv->u = raw != 0; kv->i = raw != 0; kv->f = raw != 0; break;
    case KMED_GGUF_I8: kv->i = (int8_t)(uint8_t)raw; goto sgn;
    case KMED_GGUF_I16: kv->i = (int16_t)(uint16_t)raw; goto sgn;
    case KMED_GGUF_I32: kv->i = (int32_t)(uint32_t)raw; goto sgn;
    case KMED_GGUF_I64: kv->i = (int64_t)raw;
    sgn:
        kv->u = (uint64_t)kv->i; kv->f = (double)kv->i; break;
    case KMED_GGUF_F32: {
        uint32_t b = (uint32_t)raw;
        float f;
        memcpy(&f, &b, 4);
        kv->f = f;
        break;
    }
    case KMED_GGUF_F64: memcpy(&kv->f, &raw, 8); break;
    default: break;
    }
}

static kmed_result kmed__gguf_value(kmed__gguf_cur *c, kmed_gguf_kv *kv)
{
    size_t esize = kmed__gguf_scalar_size(kv->type);
    uint32_t at;
    uint64_t n, k;
    kmed_result r;
    if (esize) {
        if ((r = kmed__gguf_need(c, esize, kv->key)) != KMED_OK) return r;
        kmed__gguf_widen(kv, kv->type, c->d + c->pos);
        c->pos += esize;
        return KMED_OK;
    }
    if (kv->type == KMED_GGUF_STRING) return kmed__gguf_str(c, &kv->str, &kv->len, kv->key);
    if (kv->type != KMED_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "key '%s': unknown value type %u", kv->key, (unsigned)kv->type);
    if ((r = kmed__gguf_u32(c, &at, kv->key)) != KMED_OK) return r;
    if (at == KMED_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_UNSUPPORTED, c->name, c->pos - 4,
                             "key '%s': arrays of arrays are not supported", kv->key);
    if (at > KMED_GGUF_F64)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "key '%s': unknown array element type %u", kv->key, (unsigned)at);
    if ((r = kmed__gguf_u64(c, &n, kv->key)) != KMED_OK) return r;
    if (n > KMED_MAX_GGUF_ARRAY)
        return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, c->pos - 8,
                             "key '%s': array of %llu exceeds KMED_MAX_GGUF_ARRAY", kv->key,
                             (unsigned long long)n);
    kv->arr_type = (kmed_gguf_type)at;
    kv->n = n;
    if (at != KMED_GGUF_STRING) {
        esize = kmed__gguf_scalar_size(at);
        if ((r = kmed__gguf_need(c, n * esize, kv->key)) != KMED_OK) return r;
        kv->raw = c->d + c->pos;
        c->pos += (size_t)(n * esize);
        return KMED_OK;
    }
    /* Every string takes at least its 8-byte length: bound n before allocating. */
    if ((r = kmed__gguf_need(c, n * 8, kv->key)) != KMED_OK) return r;
    kv->strs = (const char **)kmed__calloc((size_t)(n ? n : 1), sizeof *kv->strs);
    kv->str_lens = (size_t *)kmed__calloc((size_t)(n ? n : 1), sizeof *kv->str_lens);
    if (!kv->strs || !kv->str_lens)
        return KMED__ERR(c->err, KMED_ERR_NOMEM, "key '%s': out of memory for %llu strings",
                         kv->key, (unsigned long long)n);
    kv->raw = c->d + c->pos;
    for (k = 0; k < n; k++) {
        if ((r = kmed__gguf_str(c, &kv->strs[k], &kv->str_lens[k], kv->key)) != KMED_OK)
            return r;
    }
    return KMED_OK;
}

KMED_API void kmed_gguf_close(kmed_gguf *g)
{
    kmed__gguf_impl *im = (kmed__gguf_impl *)g->impl_;
    size_t i;
    if (g->kv)
        for (i = 0; i < g->n_kv; i++) {
            KMED_FREE((void *)g->kv[i].key);
            KMED_FREE((void *)g->kv[i].strs);
            KMED_FREE(g->kv[i].str_lens);
        }
    if (g->tensors)
        for (i = 0; i < g->n_tensors; i++) KMED_FREE((void *)g->tensors[i].name);
    KMED_FREE(g->kv);
    KMED_FREE(g->tensors);
    if (im) {
        if (im->mapped) kmed_map_close(&im->map);
        KMED_FREE(im->sorted);
        KMED_FREE(im->sorted_kv);
        KMED_FREE(im);
    }
    memset(g, 0, sizeof *g);
}

static int kmed__gguf_cmp_key(const void *a, const void *b)
{
    return strcmp((*(const kmed_gguf_kv *const *)a)->key, (*(const kmed_gguf_kv *const *)b)->key);
}

typedef struct kmed__gguf_span { uint64_t begin, end; size_t idx; } kmed__gguf_span;

static int kmed__gguf_cmp_span(const void *a, const void *b)
{
    const kmed__gguf_span *x = (const kmed__gguf_span *)a, *y = (const kmed__gguf_span *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

/* One tensor info record; offsets are checked later, once the data start is known. */
static kmed_result kmed__gguf_tensor_info(kmed__gguf_cur *c, kmed_tensor_info *t,
                                          uint64_t *offset)
{
    const char *s;
    size_t len, at = c->pos;
    uint32_t nd, type;
    uint64_t ne[KMED_MAX_DIMS], numel = 1;
    int k;
    kmed_result r = kmed__gguf_str(c, &s, &len, "tensor name");
    if (r != KMED_OK) return r;
    t->name = kmed__strndup(s, len);
    if (!t->name) return KMED__ERR(c->err, KMED_ERR_NOMEM, "out of memory");
    if (strlen(t->name) != len || len == 0)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, at,
                             "tensor name is empty or holds a NUL byte");
    if ((r = kmed__gguf_u32(c, &nd, t->name)) != KMED_OK) return r;
    if (nd < 1 || nd > KMED_MAX_DIMS)
        return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, c->pos - 4,
                             "tensor '%s': %u dimensions, expected 1 to %d", t->name,
                             (unsigned)nd, KMED_MAX_DIMS);
    for (k = 0; k < (int)nd; k++) {
        if ((r = kmed__gguf_u64(c, &ne[k], t->name)) != KMED_OK) return r;
        /* GGML keeps ne as int64: anything above INT64_MAX is corrupt. */
        if (ne[k] > (uint64_t)INT64_MAX || (ne[k] && numel > (uint64_t)INT64_MAX / ne[k]))
            return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, c->pos - 8,
                                 "tensor '%s': element count overflows", t->name);
        numel *= ne[k];
    }
    if ((r = kmed__gguf_u32(c, &type, t->name)) != KMED_OK) return r;
    if ((r = kmed__gguf_u64(c, offset, t->name)) != KMED_OK) return r;
    t->ndim = (int)nd;
    for (k = 0; k < (int)nd; k++) t->shape[k] = ne[nd - 1 - k]; /* outermost first */
    t->ggml_type = (int)(type > 0x7fffffffu ? 0x7fffffff : type);
    t->dtype = kmed__gguf_dtype(type);
    t->nbytes = 0;
    if (type < KMED__GGUF_N_TYPES && kmed__ggml_types[type].size) {
        const kmed__ggml_type *gt = &kmed__ggml_types[type];
        uint64_t nb;
        if (ne[0] % gt->blck)
            return KMED__IOB_ERR(c->err, KMED_ERR_FORMAT, c->name, at,
                                 "tensor '%s': row length %llu is not a multiple of the %s "
                                 "block size %u", t->name, (unsigned long long)ne[0],
                                 gt->name, gt->blck);
        nb = numel / gt->blck;
        if (nb > (uint64_t)SIZE_MAX / gt->size)
            return KMED__IOB_ERR(c->err, KMED_ERR_LIMIT, c->name, at,
                                 "tensor '%s': byte size overflows", t->name);
        t->nbytes = (size_t)(nb * gt->size);
    }
    return KMED_OK;
}

/* Parses a whole GGUF image d[0..size); g borrows d. */
static kmed_result kmed__gguf_parse(kmed_gguf *g, const unsigned char *d, size_t size,
                                    const char *name, kmed_error *err)
{
    kmed__gguf_impl *im = (kmed__gguf_impl *)g->impl_;
    kmed__gguf_cur c;
    uint32_t magic, version;
    uint64_t n_tensors, n_kv, data_size;
    uint64_t *offsets = NULL;
    kmed__gguf_span *spans = NULL;
    const kmed_gguf_kv *al;
    kmed_result r;
    size_t i;
    c.d = d; c.size = size; c.pos = 0; c.name = name; c.err = err;
    if ((r = kmed__gguf_u32(&c, &magic, "magic")) != KMED_OK) return r;
    if (magic != KMED__GGUF_MAGIC)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 0, "bad magic: not a GGUF file");
    if ((r = kmed__gguf_u32(&c, &version, "version")) != KMED_OK) return r;
    if (version == 1 || version > 3) {
        int swapped = (version & 0xffff) == 0 && version != 0;
        return KMED__IOB_ERR(err, KMED_ERR_UNSUPPORTED, name, 4,
                             "GGUF version %u%s; kmed reads versions 2 and 3",
                             (unsigned)version, swapped ? " (big-endian file?)" : "");
    }
    if (version == 0)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 4, "GGUF version 0");
    g->version = version;
    if ((r = kmed__gguf_u64(&c, &n_tensors, "tensor count")) != KMED_OK) return r;
    if ((r = kmed__gguf_u64(&c, &n_kv, "metadata count")) != KMED_OK) return r;
    if (n_tensors > KMED_MAX_TENSORS)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 8,
                             "%llu tensors exceed KMED_MAX_TENSORS (%zu)",
                             (unsigned long long)n_tensors, (size_t)KMED_MAX_TENSORS);
    if (n_kv > KMED_MAX_GGUF_KV)
        return KMED__IOB_ERR(err, KMED_ERR_LIMIT, name, 16,
                             "%llu metadata entries exceed KMED_MAX_GGUF_KV (%zu)",
                             (unsigned long long)n_kv, (size_t)KMED_MAX_GGUF_KV);
    /* Smallest records: kv 8+4+1 bytes, tensor info 8+4+8+4+8. */
    if (n_kv * 13 + n_tensors * 32 > size - c.pos)
        return KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, 8,
                             "%llu tensors and %llu metadata entries cannot fit in %zu bytes",
                             (unsigned long long)n_tensors, (unsigned long long)n_kv, size);
    g->kv = (kmed_gguf_kv *)kmed__calloc((size_t)n_kv, sizeof *g->kv);
    g->tensors = (kmed_tensor_info *)kmed__calloc((size_t)n_tensors, sizeof *g->tensors);
    offsets = (uint64_t *)kmed__calloc((size_t)n_tensors, sizeof *offsets);
    im->sorted = (kmed_tensor_info **)kmed__calloc((size_t)n_tensors, sizeof *im->sorted);
    im->sorted_kv = (kmed_gguf_kv **)kmed__calloc((size_t)n_kv, sizeof *im->sorted_kv);
    if (!g->kv || !g->tensors || !offsets || !im->sorted || !im->sorted_kv) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        goto done;
    }
    for (i = 0; i < n_kv; i++) {
        kmed_gguf_kv *kv = &g->kv[i];
        const char *s;
        size_t len, at = c.pos;
        uint32_t type;
        if ((r = kmed__gguf_str(&c, &s, &len, "metadata key")) != KMED_OK) goto done;
        kv->key = kmed__strndup(s, len);
        g->n_kv = i + 1;
        if (!kv->key) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
        if (len == 0 || strlen(kv->key) != len) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, at,
                              "metadata key %zu is empty or holds a NUL byte", i);
            goto done;
        }
        if ((r = kmed__gguf_u32(&c, &type, kv->key)) != KMED_OK) goto done;
        if (type > KMED_GGUF_F64) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, c.pos - 4,
                              "key '%s': unknown value type %u", kv->key, (unsigned)type);
            goto done;
        }
        kv->type = (kmed_gguf_type)type;
        if ((r = kmed__gguf_value(&c, kv)) != KMED_OK) goto done;
        im->sorted_kv[i] = kv;
    }
    qsort(im->sorted_kv, g->n_kv, sizeof *im->sorted_kv, kmed__gguf_cmp_key);
    for (i = 1; i < g->n_kv; i++)
        if (strcmp(im->sorted_kv[i]->key, im->sorted_kv[i - 1]->key) == 0) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "metadata key '%s' appears twice",
                           im->sorted_kv[i]->key);
            goto done;
        }
    g->alignment = 32;
    al = kmed_gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != KMED_GGUF_U32 || al->u == 0 || (al->u & (al->u - 1))) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "general.alignment must be a u32 power of two (got %s %llu)",
                           kmed__gguf_type_str(al->type), (unsigned long long)al->u);
            goto done;
        }
        g->alignment = (size_t)al->u;
    }
    for (i = 0; i < n_tensors; i++) {
        r = kmed__gguf_tensor_info(&c, &g->tensors[i], &offsets[i]);
        g->n_tensors = i + 1;
        if (r != KMED_OK) goto done;
        im->sorted[i] = &g->tensors[i];
    }
    qsort(im->sorted, g->n_tensors, sizeof *im->sorted, kmed__iob_cmp_tname);
    for (i = 1; i < g->n_tensors; i++)
        if (strcmp(im->sorted[i]->name, im->sorted[i - 1]->name) == 0) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensor '%s' appears twice",
                           im->sorted[i]->name);
            goto done;
        }
    /* Tensor data starts at the next multiple of the alignment. */
    g->data_offset = c.pos + (g->alignment - c.pos % g->alignment) % g->alignment;
    if (g->data_offset > size || g->data_offset < c.pos) {
        if (g->n_tensors) {
            r = KMED__IOB_ERR(err, KMED_ERR_FORMAT, name, c.pos,
                              "truncated: the file ends before the aligned tensor data");
            goto done;
        }
        g->data_offset = size;
    }
    data_size = size - g->data_offset;
    for (i = 0; i < g->n_tensors; i++) {
        kmed_tensor_info *t = &g->tensors[i];
        if (offsets[i] % g->alignment) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "tensor '%s': data offset %llu is not a multiple of the "
                           "alignment %zu", t->name, (unsigned long long)offsets[i],
                           g->alignment);
            goto done;
        }
        if (offsets[i] > data_size || t->nbytes > data_size - offsets[i]) {
            r = KMED__ERRF(err, KMED_ERR_FORMAT, name,
                           "tensor '%s': data [%llu, +%zu) runs past the end of the file "
                           "(data area %llu bytes)", t->name, (unsigned long long)offsets[i],
                           t->nbytes, (unsigned long long)data_size);
            goto done;
        }
        t->data = d + g->data_offset + offsets[i];
    }
    if (g->n_tensors > 1) {
        spans = (kmed__gguf_span *)kmed__calloc(g->n_tensors, sizeof *spans);
        if (!spans) { r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); goto done; }
        for (i = 0; i < g->n_tensors; i++) {
            spans[i].begin = offsets[i];
            spans[i].end = offsets[i] + g->tensors[i].nbytes;
            spans[i].idx = i;
        }
        qsort(spans, g->n_tensors, sizeof *spans, kmed__gguf_cmp_span);
        for (i = 1; i < g->n_tensors; i++)
            if (spans[i].begin < spans[i - 1].end && spans[i].begin != spans[i].end) {
                r = KMED__ERRF(err, KMED_ERR_FORMAT, name, "tensors '%s' and '%s' overlap",
                               g->tensors[spans[i - 1].idx].name,
                               g->tensors[spans[i].idx].name);
                goto done;
            }
    }
    r = KMED_OK;
done:
    KMED_FREE(offsets);
    KMED_FREE(spans);
    return r;
}

/* From memory (fuzzing, tests): g borrows d, which must outlive it. */
static kmed_result kmed__gguf_open_mem(kmed_gguf *g, const void *d, size_t size,
                                       const char *name, kmed_error *err)
{
    kmed_result r;
    memset(g, 0, sizeof *g);
    g->impl_ = kmed__calloc(1, sizeof(kmed__gguf_impl));
    if (!g->impl_) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    r = kmed__gguf_parse(g, (const unsigned char *)d, size, name ? name : "<memory>", err);
    if (r != KMED_OK) kmed_gguf_close(g);
    return r;
}

KMED_API kmed_result kmed_gguf_open(kmed_gguf *g, const char *path, kmed_error *err)
{
    kmed__gguf_impl *im;
    kmed_map map;
    kmed_result r;
    memset(g, 0, sizeof *g);
    r = kmed_map_open(&map, path, err);
    if (r != KMED_OK) return r;
    r = kmed__gguf_open_mem(g, map.data, map.size, path, err);
    if (r != KMED_OK) { kmed_map_close(&map); return r; }
    im = (kmed__gguf_impl *)g->impl_; /* g now owns the map */
    im->map = map;
    im->mapped = 1;
    return KMED_OK;
}

KMED_API const kmed_gguf_kv *kmed_gguf_find_kv(const kmed_gguf *g, const char *key)
{
    const kmed__gguf_impl *im = (const kmed__gguf_impl *)g->impl_;
    size_t lo = 0, hi = g->n_kv;
    if (!im || !im->sorted_kv || !key) return NULL;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(im->sorted_kv[mid]->key, key);
        if (c == 0) return im->sorted_kv[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

KMED_API const kmed_tensor_info *kmed_gguf_find_tensor(const kmed_gguf *g, const char *name)
{
    const kmed__gguf_impl *im = (const kmed__gguf_impl *)g->impl_;
    if (!im || !im->sorted || !name) return NULL;
    return kmed__iob_bsearch(im->sorted, g->n_tensors, name);
}

/* ---- GGUF: writing ---- */

/* Records the first misuse of a void add_* call; it is reported by the next put/commit. */
static void kmed__gguf_w_bad(kmed_gguf_writer *w, const char *what, const char *key)
{
    if (!w->bad_[0]) snprintf(w->bad_, sizeof w->bad_, "%s '%s'", what, key ? key : "(null)");
}

/* Starts a kv record: 1 if the key is new and usable (then key and type are written). */
static int kmed__gguf_w_key(kmed_gguf_writer *w, const char *key, kmed_gguf_type type)
{
    size_t off = 0, n;
    if (w->bad_[0]) return 0;
    if (!key || !*key) { kmed__gguf_w_bad(w, "empty metadata key", key); return 0; }
    if (w->header_done_) { kmed__gguf_w_bad(w, "metadata added after the first put:", key);
        return 0; }
    n = strlen(key);
    while (off < w->keys_.len) { /* linear: files carry tens of keys */
        if (strcmp(w->keys_.data + off, key) == 0) {
            kmed__gguf_w_bad(w, "metadata key added twice:", key);
            return 0;
        }
        off += strlen(w->keys_.data + off) + 1;
    }
    kmed_buf_put(&w->keys_, key, n + 1);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, key, n);
    kmed__iob_put_u32(&w->kvbuf_, (uint32_t)type);
    w->n_kv_++;
    return 1;
}

/* One scalar of `type` held (host little-endian) at v. */
static void kmed__gguf_w_scalar(kmed_gguf_writer *w, const char *key, kmed_gguf_type type,
                                const void *v)
{
    if (kmed__gguf_w_key(w, key, type))
        kmed_buf_put(&w->kvbuf_, v, kmed__gguf_scalar_size(type));
}

KMED_API void kmed_gguf_add_u32(kmed_gguf_writer *w, const char *key, uint32_t v)
{
    /* The writer owns general.alignment: it sets the layout and goes out with the header. */
    if (key && strcmp(key, "general.alignment") == 0) {
        if (v == 0 || (v & (v - 1)) || v > (1u << 20))
            kmed__gguf_w_bad(w, "general.alignment must be a power of two:", key);
        else if (w->header_done_) kmed__gguf_w_bad(w, "alignment set after the first put:", key);
        else w->alignment = v;
        return;
    }
    kmed__gguf_w_scalar(w, key, KMED_GGUF_U32, &v);
}

KMED_API void kmed_gguf_add_i32(kmed_gguf_writer *w, const char *key, int32_t v)
{
    kmed__gguf_w_scalar(w, key, KMED_GGUF_I32, &v);
}

KMED_API void kmed_gguf_add_f32(kmed_gguf_writer *w, const char *key, float v)
{
    kmed__gguf_w_scalar(w, key, KMED_GGUF_F32, &v);
}

KMED_API void kmed_gguf_add_bool(kmed_gguf_writer *w, const char *key, int v)
{
    uint8_t b = v ? 1 : 0;
    kmed__gguf_w_scalar(w, key, KMED_GGUF_BOOL, &b);
}

KMED_API void kmed_gguf_add_str(kmed_gguf_writer *w, const char *key, const char *s)
{
    size_t n;
    if (!s) { kmed__gguf_w_bad(w, "NULL string for", key); return; }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_STRING)) return;
    n = strlen(s);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, s, n);
}

KMED_API void kmed_gguf_add_arr(kmed_gguf_writer *w, const char *key, kmed_gguf_type type,
                                const void *data, uint64_t n)
{
    size_t es = kmed__gguf_scalar_size(type);
    if (!es) { kmed__gguf_w_bad(w, "array of strings or arrays via kmed_gguf_add_arr:", key);
        return; }
    if (n > KMED_MAX_GGUF_ARRAY || (n && !data)) {
        kmed__gguf_w_bad(w, "array too long or NULL:", key);
        return;
    }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_ARRAY)) return;
    kmed__iob_put_u32(&w->kvbuf_, (uint32_t)type);
    kmed__iob_put_u64(&w->kvbuf_, n);
    kmed_buf_put(&w->kvbuf_, data, (size_t)n * es);
}

KMED_API void kmed_gguf_add_arr_str(kmed_gguf_writer *w, const char *key,
                                    const char *const *strs, const size_t *lens, uint64_t n)
{
    uint64_t i;
    if (n > KMED_MAX_GGUF_ARRAY || (n && !strs)) {
        kmed__gguf_w_bad(w, "array too long or NULL:", key);
        return;
    }
    for (i = 0; i < n; i++)
        if (!strs[i]) { kmed__gguf_w_bad(w, "NULL string in array", key); return; }
    if (!kmed__gguf_w_key(w, key, KMED_GGUF_ARRAY)) return;
    kmed__iob_put_u32(&w->kvbuf_, KMED_GGUF_STRING);
    kmed__iob_put_u64(&w->kvbuf_, n);
    for (i = 0; i < n; i++) {
        size_t len = lens ? lens[i] : strlen(strs[i]);
        kmed__iob_put_u64(&w->kvbuf_, len);
        kmed_buf_put(&w->kvbuf_, strs[i], len);
    }
}

KMED_API void kmed_gguf_add_all(kmed_gguf_writer *w, const kmed_gguf *src,
                                int (*skip)(const char *key))
{
    size_t i;
    for (i = 0; i < src->n_kv; i++) {
        const kmed_gguf_kv *kv = &src->kv[i];
        unsigned char v[8];
        size_t es = kmed__gguf_scalar_size(kv->type), k;
        if (skip && skip(kv->key)) continue;
        if (strcmp(kv->key, "general.alignment") == 0) continue; /* the writer's own */
        if (es) {
            uint64_t bits = kv->u;
            if (kv->type == KMED_GGUF_F32) {
                float f = (float)kv->f;
                uint32_t b;
                memcpy(&b, &f, 4);
                bits = b;
            } else if (kv->type == KMED_GGUF_F64) {
                memcpy(&bits, &kv->f, 8);
            }
            for (k = 0; k < 8; k++) v[k] = (unsigned char)(bits >> (8 * k));
            kmed__gguf_w_scalar(w, kv->key, kv->type, v);
        } else if (kv->type == KMED_GGUF_STRING) {
            if (kmed__gguf_w_key(w, kv->key, KMED_GGUF_STRING)) {
                kmed__iob_put_u64(&w->kvbuf_, kv->len);
                kmed_buf_put(&w->kvbuf_, kv->str, kv->len);
            }
        } else if (kv->arr_type == KMED_GGUF_STRING) {
            kmed_gguf_add_arr_str(w, kv->key, kv->strs, kv->str_lens, kv->n);
        } else {
            kmed_gguf_add_arr(w, kv->key, kv->arr_type, kv->raw, kv->n);
        }
    }
}

KMED_API kmed_result kmed_gguf_writer_open(kmed_gguf_writer *w, const char *path,
                                           size_t alignment, kmed_error *err)
{
    memset(w, 0, sizeof *w);
    if (alignment == 0) alignment = 32;
    if ((alignment & (alignment - 1)) || alignment > ((size_t)1 << 20))
        return KMED__ERRF(err, KMED_ERR_ARG, path, "alignment %zu is not a power of two up "
                          "to 1 MiB", alignment);
    w->alignment = alignment;
    return kmed_afile_open(&w->af, path, err);
}

KMED_API kmed_result kmed_gguf_add_tensor(kmed_gguf_writer *w, const char *name,
                                          kmed_dtype dtype, int ndim, const uint64_t *shape,
                                          kmed_error *err)
{
    kmed_tensor_info *t;
    uint64_t numel = 1;
    size_t i;
    int k;
    if (w->header_done_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path,
                          "tensor '%s' declared after the first put", name ? name : "");
    if (!name || !*name) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "empty tensor name");
    if (kmed__gguf_ggml_type(dtype) < 0)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, w->af.path,
                          "tensor '%s': dtype %s has no GGUF type", name,
                          kmed_dtype_name(dtype));
    if (ndim < 1 || ndim > KMED_MAX_DIMS || !shape)
        return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s': bad ndim %d", name,
                          ndim);
    for (k = 0; k < ndim; k++) {
        if (shape[k] > (uint64_t)INT64_MAX || (shape[k] && numel > (uint64_t)INT64_MAX / shape[k]))
            return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path,
                              "tensor '%s': element count overflows", name);
        numel *= shape[k];
    }
    if ((dtype == KMED_Q8_0 || dtype == KMED_Q4_0) && shape[ndim - 1] % 32)
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path,
                          "tensor '%s': row length %llu is not a multiple of 32 for %s", name,
                          (unsigned long long)shape[ndim - 1], kmed_dtype_name(dtype));
    for (i = 0; i < w->n_tensors_; i++)
        if (strcmp(w->names_[i], name) == 0)
            return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s' declared twice",
                              name);
    if (w->n_tensors_ >= KMED_MAX_TENSORS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path, "too many tensors");
    if (w->n_tensors_ == w->cap_tensors_) {
        size_t cap = w->cap_tensors_ ? w->cap_tensors_ * 2 : 32;
        kmed_tensor_info *nt = (kmed_tensor_info *)KMED_REALLOC(w->tensors_, cap * sizeof *nt);
        char **nn;
        if (nt) w->tensors_ = nt;
        nn = nt ? (char **)KMED_REALLOC(w->names_, cap * sizeof *nn) : NULL;
        if (!nn) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        w->names_ = nn;
        w->cap_tensors_ = cap;
    }
    w->names_[w->n_tensors_] = kmed__strndup(name, strlen(name));
    if (!w->names_[w->n_tensors_]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    t = &w->tensors_[w->n_tensors_];
    memset(t, 0, sizeof *t);
    t->name = w->names_[w->n_tensors_];
    t->dtype = dtype;
    t->ggml_type = kmed__gguf_ggml_type(dtype);
    t->ndim = ndim;
    for (k = 0; k < ndim; k++) t->shape[k] = shape[k];
    t->nbytes = kmed_dtype_bytes(dtype, numel);
    if (numel && !t->nbytes)
        return KMED__ERRF(err, KMED_ERR_LIMIT, w->af.path, "tensor '%s': too large", name);
    w->n_tensors_++;
    return KMED_OK;
}

static size_t kmed__gguf_pad(size_t n, size_t a) { return (a - n % a) % a; }

static kmed_result kmed__gguf_w_header(kmed_gguf_writer *w, kmed_error *err)
{
    kmed_buf h = {0};
    kmed_result r;
    uint64_t off = 0;
    size_t i;
    int k;
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    kmed__iob_put_u32(&h, KMED__GGUF_MAGIC);
    kmed__iob_put_u32(&h, 3);
    kmed__iob_put_u64(&h, w->n_tensors_);
    kmed__iob_put_u64(&h, w->n_kv_ + (w->alignment != 32));
    kmed_buf_put(&h, w->kvbuf_.data, w->kvbuf_.len);
    if (w->alignment != 32) {
        kmed__iob_put_u64(&h, 17);
        kmed_buf_put(&h, "general.alignment", 17);
        kmed__iob_put_u32(&h, KMED_GGUF_U32);
        kmed__iob_put_u32(&h, (uint32_t)w->alignment);
    }
    for (i = 0; i < w->n_tensors_; i++) {
        const kmed_tensor_info *t = &w->tensors_[i];
        size_t n = strlen(t->name);
        kmed__iob_put_u64(&h, n);
        kmed_buf_put(&h, t->name, n);
        kmed__iob_put_u32(&h, (uint32_t)t->ndim);
        for (k = t->ndim - 1; k >= 0; k--) kmed__iob_put_u64(&h, t->shape[k]); /* ne0 first */
        kmed__iob_put_u32(&h, (uint32_t)t->ggml_type);
        kmed__iob_put_u64(&h, off);
        off += t->nbytes + kmed__gguf_pad(t->nbytes, w->alignment);
    }
    if (h.failed || w->kvbuf_.failed || w->keys_.failed) {
        kmed_buf_free(&h);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory building the GGUF header");
    }
    r = kmed_afile_write(&w->af, h.data, h.len, err);
    if (r == KMED_OK) r = kmed__iob_write_zeros(&w->af, kmed__gguf_pad(h.len, w->alignment), err);
    kmed_buf_free(&h);
    if (r == KMED_OK) w->header_done_ = 1;
    return r;
}

KMED_API kmed_result kmed_gguf_writer_put(kmed_gguf_writer *w, const void *data,
                                          size_t nbytes, kmed_error *err)
{
    kmed_result r;
    const kmed_tensor_info *t;
    if (!w->af.f) return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    if (!w->header_done_ && (r = kmed__gguf_w_header(w, err)) != KMED_OK) return r;
    if (w->next_ >= w->n_tensors_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "no declared tensor left to put");
    t = &w->tensors_[w->next_];
    if (nbytes != t->nbytes)
        return KMED__ERRF(err, KMED_ERR_SHAPE, w->af.path, "tensor '%s': got %zu bytes, "
                          "declared %zu", t->name, nbytes, t->nbytes);
    if (nbytes && !data)
        return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "tensor '%s': no data", t->name);
    r = kmed_afile_write(&w->af, data, nbytes, err);
    if (r == KMED_OK) r = kmed__iob_write_zeros(&w->af, kmed__gguf_pad(nbytes, w->alignment), err);
    if (r == KMED_OK) w->next_++;
    return r;
}

static void kmed__gguf_w_free(kmed_gguf_writer *w)
{
    size_t i;
    for (i = 0; i < w->n_tensors_; i++) KMED_FREE(w->names_[i]);
    KMED_FREE(w->names_);
    KMED_FREE(w->tensors_);
    kmed_buf_free(&w->kvbuf_);
    kmed_buf_free(&w->keys_);
    w->names_ = NULL;
    w->tensors_ = NULL;
    w->n_tensors_ = w->cap_tensors_ = 0;
}

KMED_API kmed_result kmed_gguf_writer_commit(kmed_gguf_writer *w, kmed_error *err)
{
    kmed_result r;
    if (!w->af.f) return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "writer is not open");
    if (w->bad_[0]) return KMED__ERRF(err, KMED_ERR_ARG, w->af.path, "%s", w->bad_);
    if (!w->header_done_ && (r = kmed__gguf_w_header(w, err)) != KMED_OK) return r;
    if (w->next_ != w->n_tensors_)
        return KMED__ERRF(err, KMED_ERR_STATE, w->af.path, "commit after %zu of %zu tensors",
                          w->next_, w->n_tensors_);
    r = kmed_afile_commit(&w->af, err);
    kmed__gguf_w_free(w);
    return r;
}

KMED_API void kmed_gguf_writer_abort(kmed_gguf_writer *w)
{
    kmed_afile_abort(&w->af);
    kmed__gguf_w_free(w);
}

/* ==== kmed_tensor: bf16/f16, Q8_0/Q4_0 blocks, matmul kernels, thread pool ==== */

/* How the kernels are chosen (compile time, no runtime dispatch):
     AVX-512 (+AVX2/FMA/F16C)  12x32 GEMM micro-kernel, 16-lane matrix-vector kernels,
                               VNNI int8 and BF16 dot products where the CPU has them
     AVX2 + FMA + F16C         6x16 GEMM micro-kernel, 8-lane kernels
     otherwise                 the scalar reference code, which is always compiled and is
                               what tests/test_tensor.c checks every path against
   kmed_matmul: M <= 4 runs matrix-vector kernels (weights dequantized in registers), larger
   M the packed GEMM (weight tiles dequantized once into the packed panel and reused for all
   M rows). FAST Q8_0/Q4_0 quantizes x to Q8_0 and takes integer dot products for every M,
   as llama.cpp does; FAST BF16 rounds x to bf16. Each output element is computed by an
   instruction sequence that depends only on its position in fixed K blocks, never on the
   thread ranges, so 1 and N threads give identical bits. */

#include <math.h>
#include <string.h>
#ifndef KMED_NO_THREADS
#include <pthread.h>
#include <unistd.h>
#endif
#ifdef KMED_USE_OPENBLAS
#include <cblas.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

/* SIMD kernels are chosen at compile time; the scalar code is the reference for each. */
/* AVX-512 code also uses AVX2/FMA/F16C forms (every AVX-512 CPU has them; -march=native
   turns them all on) */
#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD 512
#define KMED__MR 12          /* micro-tile rows: 12 x 2 zmm accumulators of 16 floats */
#define KMED__NR 32
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD 256
#define KMED__MR 6           /* 6 x 2 ymm accumulators of 8 floats */
#define KMED__NR 16
#endif

/* GGUF block layouts: 2-byte fp16 scale then the quants, no padding. */
typedef char kmed__tensor_q8_0_is_34_bytes[sizeof(kmed_block_q8_0) == 34 ? 1 : -1];
typedef char kmed__tensor_q4_0_is_18_bytes[sizeof(kmed_block_q4_0) == 18 ? 1 : -1];

/* ---- scalar conversions ---- */

static uint32_t kmed__tensor_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float kmed__tensor_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

KMED_API float kmed_bf16_to_f32(uint16_t h)
{
    return kmed__tensor_bits_f32((uint32_t)h << 16);
}

KMED_API uint16_t kmed_f32_to_bf16(float f)
{
    uint32_t u = kmed__tensor_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)      /* NaN: keep sign and payload top, force quiet */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* round to nearest even; a carry into the exponent is the correct rounding (to inf too) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

KMED_API float kmed_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f)   /* inf, or a NaN made quiet with its payload, as F16C converts it */
        return kmed__tensor_bits_f32(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0));
    if (e == 0) {
        /* subnormal: m * 2^-24, exact in f32 */
        float v = (float)m * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return kmed__tensor_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

KMED_API uint16_t kmed_f32_to_f16(float f)
{
    uint32_t u = kmed__tensor_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu, h, rem, half;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu)); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a >= 0x38800000u) {                                   /* normal f16 */
        h = (a - 0x38000000u) >> 13;
        rem = a & 0x1fffu;
        h += (rem > 0x1000u) || (rem == 0x1000u && (h & 1u));
        return (uint16_t)(sign | h);
    }
    if (a <= 0x33000000u) return sign;                        /* <= 2^-25: ties to 0 */
    {
        /* subnormal f16: value = mant * 2^(e-150), unit 2^-24, so shift by 126 - e */
        uint32_t e = a >> 23, mant = (a & 0x7fffffu) | 0x800000u, sh = 126u - e;
        h = mant >> sh;
        rem = mant & ((1u << sh) - 1u);
        half = 1u << (sh - 1u);
        h += (rem > half) || (rem == half && (h & 1u));
        return (uint16_t)(sign | h);
    }
}

/* Rows of f16/bf16 <-> f32: the scalar conversions above, lane for lane, vectorised because
   loading, converting and merging checkpoints spend their time here. The half side may sit
   at any byte offset (safetensors data does), so it is read and written unaligned. */
static void kmed__half_to_f32_row(kmed_dtype t, const void *src, float *y, size_t n)
{
    const unsigned char *s = (const unsigned char *)src;
    size_t i = 0;
#if KMED__SIMD == 512
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)(const void *)(s + 2 * i));
        _mm512_storeu_ps(y + i, t == KMED_F16 ? _mm512_cvtph_ps(h)
                                : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
#elif KMED__SIMD == 256
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(s + 2 * i));
        _mm256_storeu_ps(y + i, t == KMED_F16 ? _mm256_cvtph_ps(h)
                                : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
#endif
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        y[i] = t == KMED_F16 ? kmed_f16_to_f32(h) : kmed_bf16_to_f32(h);
    }
}

static void kmed__f32_to_half_row(kmed_dtype t, const float *x, void *dst, size_t n)
{
    unsigned char *d = (unsigned char *)dst;
    size_t i = 0;
#if KMED__SIMD == 512
    const __m512i mag = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
    const __m512i quiet = _mm512_set1_epi32(0x40);
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        __m256i h;
        if (t == KMED_F16) {
            h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {
            __m512i u = _mm512_castps_si512(v), top = _mm512_srli_epi32(u, 16);
            __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, mag), inf);
            __m512i r = _mm512_srli_epi32(
                _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(top, one))), 16);
            h = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(top, quiet)));
        }
        _mm256_storeu_si256((__m256i *)(void *)(d + 2 * i), h);
    }
#elif KMED__SIMD == 256
    const __m256i mag = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7fff);
    const __m256i quiet = _mm256_set1_epi32(0x40);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m128i h;
        if (t == KMED_F16) {
            h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        } else {
            __m256i u = _mm256_castps_si256(v), top = _mm256_srli_epi32(u, 16);
            __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, mag), inf);
            __m256i r = _mm256_srli_epi32(
                _mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(top, one))), 16);
            r = _mm256_blendv_epi8(r, _mm256_or_si256(top, quiet), nan);
            /* packus packs within 128-bit lanes; the permute brings lanes 0..3, 4..7 together */
            h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8));
        }
        _mm_storeu_si128((__m128i *)(void *)(d + 2 * i), h);
    }
#endif
    for (; i < n; i++) {
        uint16_t h = t == KMED_F16 ? kmed_f32_to_f16(x[i]) : kmed_f32_to_bf16(x[i]);
        memcpy(d + 2 * i, &h, 2);
    }
}

/* ---- Q8_0 / Q4_0 (GGML's reference quantizer, ggml-quants.c *_ref) ---- */

#if defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KMED__SIMD_Q8 512
#else
#define KMED__SIMD_Q8 0
#endif

static void kmed__tensor_quant_q8_0(const float *x, kmed_block_q8_0 *y, size_t n)
{
    size_t i, j, nb = n / KMED_QK;
    for (i = 0; i < nb; i++) {
        const float *xb = x + i * KMED_QK;
        float amax = 0.0f, d, id;
#if KMED__SIMD_Q8 == 512
        /* same operations as below, 16 lanes at a time; roundf's ties-away-from-zero is
           rebuilt from trunc. Blocks holding NaN take the scalar path (max order). */
        __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
        if (!_mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q) &&
            !_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) &&
            !_mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q)) {
            __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1), half = _mm512_set1_ps(0.5f);
            __m512 ivec, one = _mm512_set1_ps(1.0f);
            int k;
            amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
            d = amax / 127.0f;
            id = d != 0.0f ? 1.0f / d : 0.0f;
            y[i].d = kmed_f32_to_f16(d);
            ivec = _mm512_set1_ps(id);
            for (k = 0; k < 2; k++) {
                __m512 p = _mm512_mul_ps(k ? v1 : v0, ivec), a = _mm512_abs_ps(p);
                __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
                __mmask16 up = _mm512_cmp_ps_mask(_mm512_sub_ps(a, t), half, _CMP_GE_OQ);
                __m512 r = _mm512_mask_add_ps(t, up, t, one);
                __m512i q = _mm512_cvttps_epi32(r);
                __mmask16 neg = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_LT_OQ);
                q = _mm512_mask_sub_epi32(q, neg, _mm512_setzero_si512(), q);
                _mm_storeu_si128((__m128i *)(void *)(y[i].qs + 16 * k), _mm512_cvtepi32_epi8(q));
            }
            continue;
        }
#endif
        for (j = 0; j < KMED_QK; j++) {
            float v = fabsf(xb[j]);
            amax = amax > v ? amax : v;  /* GGML's MAX(amax, v), NaN behaviour included */
        }
        d = amax / 127.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kmed_f32_to_f16(d);
        for (j = 0; j < KMED_QK; j++) y[i].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

static void kmed__tensor_quant_q4_0(const float *x, kmed_block_q4_0 *y, size_t n)
{
    size_t i, j, nb = n / KMED_QK;
    for (i = 0; i < nb; i++) {
        const float *xb = x + i * KMED_QK;
        float amax = 0.0f, max = 0.0f, d, id;
        for (j = 0; j < KMED_QK; j++) {
            if (amax < fabsf(xb[j])) { amax = fabsf(xb[j]); max = xb[j]; }
        }
        d = max / -8.0f;
        id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kmed_f32_to_f16(d);
        for (j = 0; j < KMED_QK / 2; j++) {
            /* volatile: GGML rounds x*id to float before adding 8.5; a fused multiply-add
               (gcc -ffp-contract=fast) would change some nibbles */
            volatile float x0 = xb[j] * id, x1 = xb[j + KMED_QK / 2] * id;
            int q0 = (int8_t)(x0 + 8.5f), q1 = (int8_t)(x1 + 8.5f);
            q0 = q0 < 15 ? q0 : 15;
            q1 = q1 < 15 ? q1 : 15;
            y[i].qs[j] = (uint8_t)((unsigned)q0 | ((unsigned)q1 << 4));
        }
    }
}

KMED_API void kmed_quantize_row(kmed_dtype t, const float *x, void *y, size_t n)
{
    switch (t) {
    case KMED_F32: memcpy(y, x, n * sizeof(float)); break;
    case KMED_F16: case KMED_BF16: kmed__f32_to_half_row(t, x, y, n); break;
    case KMED_Q8_0:
        KMED_ASSERT(n % KMED_QK == 0);
        kmed__tensor_quant_q8_0(x, (kmed_block_q8_0 *)y, n);
        break;
    case KMED_Q4_0:
        KMED_ASSERT(n % KMED_QK == 0);
        kmed__tensor_quant_q4_0(x, (kmed_block_q4_0 *)y, n);
        break;
    default: KMED_ASSERT(0 && "kmed_quantize_row: dtype not computable");
    }
}

KMED_API void kmed_dequantize_row(kmed_dtype t, const void *x, float *y, size_t n)
{
    size_t i, j;
    switch (t) {
    case KMED_F32: memcpy(y, x, n * sizeof(float)); break;
    case KMED_F16: case KMED_BF16: kmed__half_to_f32_row(t, x, y, n); break;
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)x;
        KMED_ASSERT(n % KMED_QK == 0);
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d);
            for (j = 0; j < KMED_QK; j++) y[i * KMED_QK + j] = (float)b[i].qs[j] * d;
        }
        break;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)x;
        KMED_ASSERT(n % KMED_QK == 0);
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d);
            for (j = 0; j < KMED_QK / 2; j++) {
                y[i * KMED_QK + j] = (float)((int)(b[i].qs[j] & 15) - 8) * d;
                y[i * KMED_QK + j + KMED_QK / 2] = (float)((int)(b[i].qs[j] >> 4) - 8) * d;
            }
        }
        break;
    }
    default: KMED_ASSERT(0 && "kmed_dequantize_row: dtype not computable");
    }
}

KMED_API int kmed_dtype_computable(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_F16 || t == KMED_BF16 || t == KMED_Q8_0 ||
           t == KMED_Q4_0;
}

/* Bytes of one weight row of n elements (n a multiple of KMED_QK for block types). */
static size_t kmed__tensor_row_bytes(kmed_dtype t, size_t n)
{
    switch (t) {
    case KMED_F32: return n * 4;
    case KMED_F16: case KMED_BF16: return n * 2;
    case KMED_Q8_0: return n / KMED_QK * sizeof(kmed_block_q8_0);
    case KMED_Q4_0: return n / KMED_QK * sizeof(kmed_block_q4_0);
    default: return 0;
    }
}

/* ---- thread pool ---- */

struct kmed_pool {
    int n_threads;
    unsigned char *scratch;      /* GEMM panels kept between calls (fresh mmap'd pages per
                                    call cost page faults); used by the pool's owner only */
    size_t scratch_bytes;
#ifndef KMED_NO_THREADS
    pthread_t *threads;          /* n_threads - 1 workers; the caller is thread 0 */
    pthread_mutex_t mu;          /* only for sleeping: the hand-off itself is atomics */
    pthread_cond_t cv_work, cv_done;
    unsigned long gen;           /* atomic; bumped per job so a worker runs each job once */
    int pending;                 /* atomic; workers still on the current job */
    int stop, started;
    kmed_pool_fn fn;
    void *ctx;
    size_t n, grain;
#endif
};

#ifndef KMED_NO_THREADS
/* The fixed range of thread t: chunks of `grain` split as evenly as possible. */
static void kmed__pool_range(size_t n, size_t grain, int t, int nt, size_t *b, size_t *e)
{
    size_t chunks = (n + grain - 1) / grain;
    size_t c0 = chunks * (size_t)t / (size_t)nt, c1 = chunks * (size_t)(t + 1) / (size_t)nt;
    *b = c0 * grain < n ? c0 * grain : n;
    *e = c1 * grain < n ? c1 * grain : n;
}

typedef struct kmed__pool_arg { kmed_pool *pool; int t; } kmed__pool_arg;

/* Polls before sleeping: a decode step hands the pool a job every few microseconds (one per
   matrix-vector product), and a futex sleep and wake-up per job cost more than the job.
   About 100 us of polling covers the gaps between the jobs of a forward pass; a pool left
   idle longer sleeps on its condition variable. */
#define KMED__POOL_SPIN 20000

static void kmed__pool_pause(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Polls *v until it differs from `old` or the spin runs out; returns its last value. */
static unsigned long kmed__pool_poll_gen(const unsigned long *v, unsigned long old)
{
    unsigned long g = old;
    int i;
    for (i = 0; i < KMED__POOL_SPIN && g == old; i++) {
        kmed__pool_pause();
        g = __atomic_load_n(v, __ATOMIC_ACQUIRE);
    }
    return g;
}

static void *kmed__pool_worker(void *arg)
{
    kmed__pool_arg *a = (kmed__pool_arg *)arg;
    kmed_pool *p = a->pool;
    int t = a->t;
    unsigned long seen = 0, g;
    KMED_FREE(a);
    for (;;) {
        size_t b, e;
        g = kmed__pool_poll_gen(&p->gen, seen);
        if (g == seen) {
            /* the owner bumps gen under mu and then broadcasts, so no wake-up is lost */
            pthread_mutex_lock(&p->mu);
            while ((g = __atomic_load_n(&p->gen, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&p->cv_work, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (p->stop) return NULL;   /* written before gen's release store */
        kmed__pool_range(p->n, p->grain, t, p->n_threads, &b, &e);
        if (b < e) p->fn(p->ctx, b, e, t);
        if (__atomic_sub_fetch(&p->pending, 1, __ATOMIC_ACQ_REL) == 0) {
            /* under mu: the owner checks pending under mu before it sleeps */
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->cv_done);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

/* Publishes a job (or the stop) to the workers: fields first, then gen's release store. */
static void kmed__pool_publish(kmed_pool *p)
{
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->pending, p->n_threads - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&p->gen, p->gen + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->cv_work);
    pthread_mutex_unlock(&p->mu);
}
#endif

KMED_API kmed_result kmed_pool_create(kmed_pool **pool, int n_threads, kmed_error *err)
{
    kmed_pool *p;
    *pool = NULL;
    if (n_threads < 0) return KMED__ERR(err, KMED_ERR_ARG, "thread count %d < 0", n_threads);
#ifdef KMED_NO_THREADS
    n_threads = 1;
#else
    if (n_threads == 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n_threads = c > 0 ? (int)c : 1;
    }
    if (n_threads > 1024) n_threads = 1024;
#endif
    p = (kmed_pool *)kmed__calloc(1, sizeof *p);
    if (!p) return KMED__ERR(err, KMED_ERR_NOMEM, "thread pool");
    p->n_threads = n_threads;
#ifndef KMED_NO_THREADS
    if (n_threads > 1) {
        int i;
        p->threads = (pthread_t *)kmed__calloc((size_t)n_threads, sizeof(pthread_t));
        if (!p->threads) { KMED_FREE(p); return KMED__ERR(err, KMED_ERR_NOMEM, "thread pool"); }
        pthread_mutex_init(&p->mu, NULL);
        pthread_cond_init(&p->cv_work, NULL);
        pthread_cond_init(&p->cv_done, NULL);
        p->started = 1;
        for (i = 1; i < n_threads; i++) {
            kmed__pool_arg *a = (kmed__pool_arg *)KMED_MALLOC(sizeof *a);
            int rc = -1;
            if (a) {
                a->pool = p;
                a->t = i;
                rc = pthread_create(&p->threads[i], NULL, kmed__pool_worker, a);
                if (rc != 0) KMED_FREE(a);
            }
            if (rc != 0) {
                p->n_threads = i;  /* join only the ones that started */
                kmed_pool_free(p);
                return KMED__ERR(err, KMED_ERR_NOMEM, "cannot start thread %d of %d", i,
                                 n_threads);
            }
        }
    }
#endif
    *pool = p;
    return KMED_OK;
}

KMED_API void kmed_pool_free(kmed_pool *pool)
{
    if (!pool) return;
#ifndef KMED_NO_THREADS
    if (pool->started) {
        int i;
        pool->stop = 1;
        kmed__pool_publish(pool);
        for (i = 1; i < pool->n_threads; i++) pthread_join(pool->threads[i], NULL);
        pthread_mutex_destroy(&pool->mu);
        pthread_cond_destroy(&pool->cv_work);
        pthread_cond_destroy(&pool->cv_done);
    }
    KMED_FREE(pool->threads);
#endif
    KMED_FREE(pool->scratch);
    KMED_FREE(pool);
}

KMED_API int kmed_pool_threads(const kmed_pool *pool)
{
    return pool ? pool->n_threads : 1;
}

KMED_API void kmed_pool_for(kmed_pool *pool, size_t n, size_t grain, kmed_pool_fn fn,
                            void *ctx)
{
    if (n == 0) return;
    if (grain == 0) grain = 1;
#ifndef KMED_NO_THREADS
    if (pool && pool->n_threads > 1 && n > grain) {
        size_t b, e;
        int i;
        pool->fn = fn;
        pool->ctx = ctx;
        pool->n = n;
        pool->grain = grain;
        kmed__pool_publish(pool);
        kmed__pool_range(n, grain, 0, pool->n_threads, &b, &e);
        if (b < e) fn(ctx, b, e, 0);
        for (i = 0; i < KMED__POOL_SPIN; i++) {
            if (__atomic_load_n(&pool->pending, __ATOMIC_ACQUIRE) == 0) return;
            kmed__pool_pause();
        }
        pthread_mutex_lock(&pool->mu);
        while (__atomic_load_n(&pool->pending, __ATOMIC_ACQUIRE) > 0)
            pthread_cond_wait(&pool->cv_done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
        return;
    }
#endif
    (void)pool;
    fn(ctx, 0, n, 0);
}

/* ---- scalar reference kernels ---- */

KMED_API float kmed_dot_row(kmed_dtype wt, const void *wrow, const float *x, size_t n)
{
    float s = 0.0f;
    size_t i, j;
    switch (wt) {
    case KMED_F32: {
        const float *w = (const float *)wrow;
        for (i = 0; i < n; i++) s += w[i] * x[i];
        break;
    }
    case KMED_F16: {
        const uint16_t *w = (const uint16_t *)wrow;
        for (i = 0; i < n; i++) s += kmed_f16_to_f32(w[i]) * x[i];
        break;
    }
    case KMED_BF16: {
        const uint16_t *w = (const uint16_t *)wrow;
        for (i = 0; i < n; i++) s += kmed_bf16_to_f32(w[i]) * x[i];
        break;
    }
    case KMED_Q8_0: {
        const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)wrow;
        for (i = 0; i < n / KMED_QK; i++) {
            float d = kmed_f16_to_f32(b[i].d), bs = 0.0f;
            for (j = 0; j < KMED_QK; j++) bs += (float)b[i].qs[j] * x[i * KMED_QK + j];
            s += bs * d;
        }
        break;
    }
    case KMED_Q4_0: {
        const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)wrow;
        for (i = 0; i < n / KMED_QK; i++) {
            const float *xb = x + i * KMED_QK;
            float d = kmed_f16_to_f32(b[i].d), bs = 0.0f;
            for (j = 0; j < KMED_QK / 2; j++) {
                bs += (float)((int)(b[i].qs[j] & 15) - 8) * xb[j];
                bs += (float)((int)(b[i].qs[j] >> 4) - 8) * xb[j + KMED_QK / 2];
            }
            s += bs * d;
        }
        break;
    }
    default: KMED_ASSERT(0 && "kmed_dot_row: dtype not computable");
    }
    return s;
}

/* FAST reference: x already quantized to Q8_0 (xq) for Q8_0/Q4_0 weights; integer block
   dots scaled by both fp16 scales, as GGML's vec_dot_q8_0_q8_0 / vec_dot_q4_0_q8_0. */
static float kmed__tensor_dot_q8(kmed_dtype wt, const void *wrow, const kmed_block_q8_0 *xq,
                                 size_t n)
{
    float s = 0.0f;
    size_t i, j;
    for (i = 0; i < n / KMED_QK; i++) {
        int sumi = 0;
        float dw;
        if (wt == KMED_Q8_0) {
            const kmed_block_q8_0 *b = (const kmed_block_q8_0 *)wrow + i;
            for (j = 0; j < KMED_QK; j++) sumi += (int)b->qs[j] * (int)xq[i].qs[j];
            dw = kmed_f16_to_f32(b->d);
        } else {
            const kmed_block_q4_0 *b = (const kmed_block_q4_0 *)wrow + i;
            for (j = 0; j < KMED_QK / 2; j++) {
                sumi += ((int)(b->qs[j] & 15) - 8) * (int)xq[i].qs[j];
                sumi += ((int)(b->qs[j] >> 4) - 8) * (int)xq[i].qs[j + KMED_QK / 2];
            }
            dw = kmed_f16_to_f32(b->d);
        }
        s += (float)sumi * (dw * kmed_f16_to_f32(xq[i].d));
    }
    return s;
}

/* Context of one kmed_matmul call, shared by its thread ranges. */
typedef struct kmed__mm_ctx {
    float *y;               /* (M, N) */
    const float *x;         /* (M, K) */
    const void *w;          /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;   /* wrow: bytes per weight row */
    int flags;
    const void *xq;         /* FAST: x as Q8_0 blocks (M, K/32) or BF16 (M, K) */
} kmed__mm_ctx;

static void kmed__mm_scalar_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mm_ctx *c = (const kmed__mm_ctx *)vctx;
    size_t m, n;
    (void)thread;
    for (m = 0; m < c->M; m++) {
        for (n = n0; n < n1; n++) {
            const void *wr = (const unsigned char *)c->w + n * c->wrow;
            float v;
            if ((c->flags & KMED_MM_FAST) && (c->wt == KMED_Q8_0 || c->wt == KMED_Q4_0)) {
                const kmed_block_q8_0 *xq = (const kmed_block_q8_0 *)c->xq;
                v = kmed__tensor_dot_q8(c->wt, wr, xq + m * (c->K / KMED_QK), c->K);
            } else if ((c->flags & KMED_MM_FAST) && c->wt == KMED_BF16) {
                const uint16_t *xb = (const uint16_t *)c->xq + m * c->K;
                const uint16_t *wb = (const uint16_t *)wr;
                size_t k;
                v = 0.0f;
                for (k = 0; k < c->K; k++)
                    v += kmed_bf16_to_f32(wb[k]) * kmed_bf16_to_f32(xb[k]);
            } else {
                v = kmed_dot_row(c->wt, wr, c->x + m * c->K, c->K);
            }
            if (c->flags & KMED_MM_ACC) c->y[m * c->N + n] += v;
            else c->y[m * c->N + n] = v;
        }
    }
}

/* x quantized for the FAST path: Q8_0 rows for Q8_0/Q4_0 weights, BF16 for BF16; NULL when
   FAST does not apply or memory is short (the exact path then runs). Free with KMED_FREE. */
static void *kmed__mm_fast_x(const float *x, kmed_dtype wt, size_t M, size_t K, int flags)
{
    kmed_dtype qt = wt == KMED_BF16 ? KMED_BF16 : KMED_Q8_0;
    size_t rb = kmed__tensor_row_bytes(qt, K), m;
    char *xq;
    if (!(flags & KMED_MM_FAST) || !(wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16))
        return NULL;
    xq = (char *)KMED_MALLOC(M * rb + 1);
    if (xq) for (m = 0; m < M; m++) kmed_quantize_row(qt, x + m * K, xq + m * rb, K);
    return xq;
}

/* Scalar reference of kmed_matmul. */
static void kmed__matmul_ref(kmed_pool *pool, float *y, const float *x, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K, int flags)
{
    kmed__mm_ctx c;
    void *xq;
    if (M == 0 || N == 0) return;
    memset(&c, 0, sizeof c);
    c.y = y; c.x = x; c.w = w; c.wt = wt; c.M = M; c.N = N; c.K = K; c.flags = flags;
    c.wrow = kmed__tensor_row_bytes(wt, K);
    xq = kmed__mm_fast_x(x, wt, M, K, flags);
    if (!xq) c.flags &= ~KMED_MM_FAST;
    c.xq = xq;
    kmed_pool_for(pool, N, 16, kmed__mm_scalar_range, &c);
    KMED_FREE(xq);
}

typedef struct kmed__mmdx_ctx {
    float *dx;              /* (M, K) */
    const float *dy;        /* (M, N) */
    const void *w;          /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;
} kmed__mmdx_ctx;

/* dx[:, k0:k1] += dy · W[:, k0:k1]; one dequantized weight row slice at a time. */
static void kmed__mmdx_range(void *vctx, size_t k0, size_t k1, int thread)
{
    const kmed__mmdx_ctx *c = (const kmed__mmdx_ctx *)vctx;
    size_t n, m, k, len = k1 - k0, boff;
    float buf[256];
    (void)thread;
    while (len > 0) {
        size_t kl = len < 256 ? len : 256;
        for (n = 0; n < c->N; n++) {
            const unsigned char *wr = (const unsigned char *)c->w + n * c->wrow;
            boff = kmed__tensor_row_bytes(c->wt, k0);
            kmed_dequantize_row(c->wt, wr + boff, buf, kl);
            for (m = 0; m < c->M; m++) {
                float g = c->dy[m * c->N + n];
                float *d = c->dx + m * c->K + k0;
                for (k = 0; k < kl; k++) d[k] += g * buf[k];
            }
        }
        k0 += kl;
        len -= kl;
    }
}

static void kmed__matmul_dx_ref(kmed_pool *pool, float *dx, const float *dy, const void *w,
                                kmed_dtype wt, size_t M, size_t N, size_t K)
{
    kmed__mmdx_ctx c;
    if (M == 0 || K == 0) return;
    c.dx = dx; c.dy = dy; c.w = w; c.wt = wt; c.M = M; c.N = N; c.K = K;
    c.wrow = kmed__tensor_row_bytes(wt, K);
    /* grain 256 keeps each range a whole number of quant blocks and of buf */
    kmed_pool_for(pool, K, 256, kmed__mmdx_range, &c);
}

typedef struct kmed__mmdw_ctx {
    float *dw;              /* (N, K) */
    const float *dy;        /* (M, N) */
    const float *x;         /* (M, K) */
    size_t M, N, K;
} kmed__mmdw_ctx;

static void kmed__mmdw_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mmdw_ctx *c = (const kmed__mmdw_ctx *)vctx;
    size_t n, m, k;
    (void)thread;
    for (n = n0; n < n1; n++) {
        float *d = c->dw + n * c->K;
        for (m = 0; m < c->M; m++) {
            float g = c->dy[m * c->N + n];
            const float *xr = c->x + m * c->K;
            for (k = 0; k < c->K; k++) d[k] += g * xr[k];
        }
    }
}

static void kmed__matmul_dw_ref(kmed_pool *pool, float *dw, const float *dy, const float *x,
                                size_t M, size_t N, size_t K)
{
    kmed__mmdw_ctx c;
    if (N == 0 || K == 0) return;
    c.dw = dw; c.dy = dy; c.x = x; c.M = M; c.N = N; c.K = K;
    kmed_pool_for(pool, N, 4, kmed__mmdw_range, &c);
}

#ifndef KMED_USE_OPENBLAS   /* cblas_sgemm replaces the reference sgemm entirely */
typedef struct kmed__sgemm_ctx {
    int ta, tb;
    size_t M, N, K, lda, ldb, ldc;
    float alpha, beta;
    const float *A, *B;
    float *C;
} kmed__sgemm_ctx;

/* Scalar reference sgemm over rows [m0, m1) of C. */
static void kmed__sgemm_ref_range(void *vctx, size_t m0, size_t m1, int thread)
{
    const kmed__sgemm_ctx *c = (const kmed__sgemm_ctx *)vctx;
    size_t m, n, k;
    (void)thread;
    for (m = m0; m < m1; m++) {
        for (n = 0; n < c->N; n++) {
            float s = 0.0f, *cp = c->C + m * c->ldc + n;
            for (k = 0; k < c->K; k++) {
                float a = c->ta ? c->A[k * c->lda + m] : c->A[m * c->lda + k];
                float b = c->tb ? c->B[n * c->ldb + k] : c->B[k * c->ldb + n];
                s += a * b;
            }
            *cp = c->beta == 0.0f ? c->alpha * s : c->alpha * s + c->beta * *cp;
        }
    }
}

static void kmed__sgemm_ref(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                            float alpha, const float *A, size_t lda, const float *B,
                            size_t ldb, float beta, float *C, size_t ldc)
{
    kmed__sgemm_ctx c;
    if (M == 0 || N == 0) return;
    c.ta = ta; c.tb = tb; c.M = M; c.N = N; c.K = K; c.lda = lda; c.ldb = ldb; c.ldc = ldc;
    c.alpha = alpha; c.beta = beta; c.A = A; c.B = B; c.C = C;
    kmed_pool_for(pool, M, 4, kmed__sgemm_ref_range, &c);
}
#endif

/* ---- SIMD kernels, chosen at compile time (the scalar code above is the reference) ---- */


#ifdef KMED__SIMD
#define KMED__KC 256         /* k-depth of packed panels: a B panel (KC x NR) stays in L1 */
#define KMED__MC (KMED__MR * 12)
#define KMED__NC 512         /* B block KC x NC (512 KB) stays in L2 */

/* Vector width helpers shared by the GEMM and matrix-vector kernels. */
#if KMED__SIMD == 512
#define KMED__REP(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define KMED__VZERO() _mm512_setzero_ps()
#define KMED__VT __m512
#define KMED__VW 16
#define KMED__VLOAD _mm512_loadu_ps
#define KMED__VSTORE _mm512_storeu_ps
#define KMED__VADD _mm512_add_ps
#define KMED__VFMA _mm512_fmadd_ps
#define KMED__VSET1 _mm512_set1_ps
#else
#define KMED__REP(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define KMED__VZERO() _mm256_setzero_ps()
#define KMED__VT __m256
#define KMED__VW 8
#define KMED__VLOAD _mm256_loadu_ps
#define KMED__VSTORE _mm256_storeu_ps
#define KMED__VADD _mm256_add_ps
#define KMED__VFMA _mm256_fmadd_ps
#define KMED__VSET1 _mm256_set1_ps
#endif

static float kmed__tensor_h2f(uint16_t h)
{
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return kmed_f16_to_f32(h);
#endif
}

/* Small helpers of the hot loops: inlined, their vector results stay in registers (a call
   returns them through memory) */
#if defined(__GNUC__)
#define KMED__INLINE static __inline__ __attribute__((always_inline))
#else
#define KMED__INLINE static
#endif

/* Block b of a Q8_0 / Q4_0 row as signed bytes (lo: elements 0-15, hi: 16-31); returns
   its scale. Shared by the SIMD dequantizer and the exact matrix-vector kernel. */
KMED__INLINE float kmed__qblock(const unsigned char *row, size_t b, int q4, __m128i *lo,
                                __m128i *hi)
{
    if (q4) {
        const kmed_block_q4_0 *k = (const kmed_block_q4_0 *)(const void *)row + b;
        const __m128i m4 = _mm_set1_epi8(15), e8 = _mm_set1_epi8(8);
        __m128i v = _mm_loadu_si128((const __m128i *)(const void *)k->qs);
        *lo = _mm_sub_epi8(_mm_and_si128(v, m4), e8);
        *hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), m4), e8);
        return kmed__tensor_h2f(k->d);
    } else {
        const kmed_block_q8_0 *k = (const kmed_block_q8_0 *)(const void *)row + b;
        *lo = _mm_loadu_si128((const __m128i *)(const void *)k->qs);
        *hi = _mm_loadu_si128((const __m128i *)(const void *)(k->qs + 16));
        return kmed__tensor_h2f(k->d);
    }
}

/* Dequantizes n elements (a multiple of 32 for block types) exactly, like
   kmed_dequantize_row. */
static void kmed__dequant_simd(kmed_dtype t, const void *src, float *y, size_t n)
{
    size_t i = 0;
    if (t != KMED_Q8_0 && t != KMED_Q4_0) {
        kmed_dequantize_row(t, src, y, n);
        return;
    }
#if KMED__SIMD == 512
    for (; i < n / KMED_QK; i++) {
        __m128i lo, hi;
        __m512 d = _mm512_set1_ps(kmed__qblock((const unsigned char *)src, i,
                                                  t == KMED_Q4_0, &lo, &hi));
        _mm512_storeu_ps(y + i * 32,
                         _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))));
        _mm512_storeu_ps(y + i * 32 + 16,
                         _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))));
    }
#else
    for (; i < n / KMED_QK; i++) {
        __m128i lo, hi, parts[4];
        __m256 d = _mm256_set1_ps(kmed__qblock((const unsigned char *)src, i,
                                                  t == KMED_Q4_0, &lo, &hi));
        int j;
        parts[0] = lo; parts[1] = _mm_srli_si128(lo, 8);
        parts[2] = hi; parts[3] = _mm_srli_si128(hi, 8);
        for (j = 0; j < 4; j++)
            _mm256_storeu_ps(y + i * 32 + 8 * j, _mm256_mul_ps(d, _mm256_cvtepi32_ps(
                                                             _mm256_cvtepi8_epi32(parts[j]))));
    }
#endif
}

/* Dequantizes elements [n0, n0 + n) of a row (any n0; block types go through a block). */
static void kmed__dequant_span(kmed_dtype t, const unsigned char *row, size_t n0, size_t n,
                               float *y)
{
    if (t == KMED_F32) { memcpy(y, (const float *)row + n0, n * sizeof(float)); return; }
    if (t == KMED_F16 || t == KMED_BF16) {
        kmed__half_to_f32_row(t, row + 2 * n0, y, n);
        return;
    }
    if (n0 % KMED_QK == 0 && n % KMED_QK == 0) {   /* whole blocks: straight through */
        kmed__dequant_simd(t, row + kmed__tensor_row_bytes(t, n0), y, n);
        return;
    }
    while (n > 0) {
        size_t b = n0 / KMED_QK, off = n0 % KMED_QK, take = KMED_QK - off;
        float tmp[KMED_QK];
        if (take > n) take = n;
        kmed__dequant_simd(t, row + b * kmed__tensor_row_bytes(t, KMED_QK), tmp, KMED_QK);
        memcpy(y, tmp + off, take * sizeof(float));
        y += take; n0 += take; n -= take;
    }
}

/* One GEMM operand. A(i,k) = trans ? p[k*ld + i] : p[i*ld + k] (F32, scaled by alpha while
   packing). B(k,n) = trans ? row n, element k : row k, element n, rows of `ld` elements in
   dtype t (any computable dtype: dequantized while packing). */
typedef struct kmed__gsrc {
    const void *p;
    kmed_dtype t;
    size_t ld;
    int trans;
    float alpha;
} kmed__gsrc;

#if KMED__SIMD == 512
static void kmed__tr16(const float *src, size_t lds, float *dst, size_t ldd);
#endif

/* ap[k*MR + i] = A(i0+i, k0+k), zero rows past mr. */
static void kmed__pack_a(float *ap, const kmed__gsrc *A, size_t i0, size_t mr, size_t k0,
                         size_t kc)
{
    const float *a = (const float *)A->p;
    size_t i, k;
    if (A->trans) {
#if KMED__SIMD == 512
        if (mr == KMED__MR && A->alpha == 1.0f) {   /* 12 contiguous floats per k */
            for (k = 0; k < kc; k++)
                _mm512_mask_storeu_ps(ap + k * KMED__MR, 0x0fff,
                                      _mm512_maskz_loadu_ps(0x0fff, a + (k0 + k) * A->ld + i0));
            return;
        }
#endif
        for (k = 0; k < kc; k++) {
            const float *src = a + (k0 + k) * A->ld + i0;
            for (i = 0; i < mr; i++) ap[k * KMED__MR + i] = A->alpha * src[i];
            for (; i < KMED__MR; i++) ap[k * KMED__MR + i] = 0.0f;
        }
    } else {
#if KMED__SIMD == 512
        if (mr == KMED__MR && A->alpha == 1.0f && kc >= 16) {
            /* 16 k at a time: the 12 rows (4 zero rows below) transposed as a 16x16 tile */
            float t[16 * 16], u[16 * 16];
            memset(t + 12 * 16, 0, 4 * 16 * sizeof(float));
            for (k = 0; k + 16 <= kc; k += 16) {
                size_t j;
                for (i = 0; i < KMED__MR; i++)
                    _mm512_storeu_ps(t + i * 16, _mm512_loadu_ps(a + (i0 + i) * A->ld + k0 + k));
                kmed__tr16(t, 16, u, 16);
                for (j = 0; j < 16; j++)
                    _mm512_mask_storeu_ps(ap + (k + j) * KMED__MR, 0x0fff,
                                          _mm512_loadu_ps(u + j * 16));
            }
            for (i = 0; i < mr; i++) {
                const float *src = a + (i0 + i) * A->ld + k0;
                size_t kk;
                for (kk = k; kk < kc; kk++) ap[kk * KMED__MR + i] = src[kk];
            }
            return;
        }
#endif
        for (i = 0; i < mr; i++) {
            const float *src = a + (i0 + i) * A->ld + k0;
            for (k = 0; k < kc; k++) ap[k * KMED__MR + i] = A->alpha * src[k];
        }
        for (; i < KMED__MR; i++)
            for (k = 0; k < kc; k++) ap[k * KMED__MR + i] = 0.0f;
    }
}

#if KMED__SIMD == 512
/* dst[j*ldd + i] = src[i*lds + j] for a 16x16 tile (unrolled by hand so the 16 rows stay
   in registers). */
static void kmed__tr16(const float *src, size_t lds, float *dst, size_t ldd)
{
#define KMED__L(i) __m512 r##i = _mm512_loadu_ps(src + (size_t)(i) * lds);
#define KMED__U(a, b) __m512 t##a = _mm512_unpacklo_ps(r##a, r##b), \
                             t##b = _mm512_unpackhi_ps(r##a, r##b);
#define KMED__P(a, b, c, d)                                                                   \
    __m512 u##a = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t##a),              \
                                                      _mm512_castps_pd(t##c)));            \
    __m512 u##b = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t##a),              \
                                                      _mm512_castps_pd(t##c)));            \
    __m512 u##c = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t##b),              \
                                                      _mm512_castps_pd(t##d)));            \
    __m512 u##d = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t##b),              \
                                                      _mm512_castps_pd(t##d)));
#define KMED__Q(a, b) __m512 v##a = _mm512_shuffle_f32x4(u##a, u##b, 0x88), \
                             v##b = _mm512_shuffle_f32x4(u##a, u##b, 0xdd);
#define KMED__W(a, b)                                                                        \
    _mm512_storeu_ps(dst + (size_t)(a) * ldd, _mm512_shuffle_f32x4(v##a, v##b, 0x88));        \
    _mm512_storeu_ps(dst + (size_t)(a + 8) * ldd, _mm512_shuffle_f32x4(v##a, v##b, 0xdd));
    KMED__L(0) KMED__L(1) KMED__L(2) KMED__L(3) KMED__L(4) KMED__L(5) KMED__L(6) KMED__L(7)
    KMED__L(8) KMED__L(9) KMED__L(10) KMED__L(11) KMED__L(12) KMED__L(13) KMED__L(14)
    KMED__L(15)
    KMED__U(0, 1) KMED__U(2, 3) KMED__U(4, 5) KMED__U(6, 7)
    KMED__U(8, 9) KMED__U(10, 11) KMED__U(12, 13) KMED__U(14, 15)
    /* u(4i+c) holds column c of each 128-bit lane for rows 4i..4i+3 */
    KMED__P(0, 1, 2, 3) KMED__P(4, 5, 6, 7) KMED__P(8, 9, 10, 11) KMED__P(12, 13, 14, 15)
    KMED__Q(0, 4) KMED__Q(1, 5) KMED__Q(2, 6) KMED__Q(3, 7)
    KMED__Q(8, 12) KMED__Q(9, 13) KMED__Q(10, 14) KMED__Q(11, 15)
    KMED__W(0, 8) KMED__W(1, 9) KMED__W(2, 10) KMED__W(3, 11)
    KMED__W(4, 12) KMED__W(5, 13) KMED__W(6, 14) KMED__W(7, 15)
#undef KMED__L
#undef KMED__U
#undef KMED__P
#undef KMED__Q
#undef KMED__W
}
#endif

/* bp[k*NR + j] = src[j*lds + k] for j < nr, k < kc; zero columns past nr. */
static void kmed__pack_bt(float *bp, const float *src, size_t lds, size_t nr, size_t kc)
{
    size_t j = 0, k;
#if KMED__SIMD == 512
    for (; j + 16 <= nr; j += 16) {
        for (k = 0; k + 16 <= kc; k += 16) {
            size_t i;
            /* 16 row streams at once defeat the hardware prefetcher: fetch 4 lines ahead */
            for (i = 0; i < 16; i++)
                _mm_prefetch((const char *)(src + (j + i) * lds + k + 64), _MM_HINT_T0);
            kmed__tr16(src + j * lds + k, lds, bp + k * KMED__NR + j, KMED__NR);
        }
        for (; k < kc; k++) {
            size_t jj;
            for (jj = j; jj < j + 16; jj++) bp[k * KMED__NR + jj] = src[jj * lds + k];
        }
    }
#endif
    for (; j < nr; j++)
        for (k = 0; k < kc; k++) bp[k * KMED__NR + j] = src[j * lds + k];
    for (; j < KMED__NR; j++)
        for (k = 0; k < kc; k++) bp[k * KMED__NR + j] = 0.0f;
}

/* Packs B(k0.., n0..) as a KC x NR panel; tmp holds NR x KC floats for dequantized rows. */
static void kmed__pack_b(float *bp, const kmed__gsrc *B, size_t k0, size_t kc, size_t n0,
                         size_t nr, float *tmp)
{
    const unsigned char *base = (const unsigned char *)B->p;
    size_t rb = kmed__tensor_row_bytes(B->t, B->ld), j, k;
    if (B->trans) {
        if (B->t == KMED_F32) {
            kmed__pack_bt(bp, (const float *)base + n0 * B->ld + k0, B->ld, nr, kc);
        } else {
            for (j = 0; j < nr; j++)
                kmed__dequant_span(B->t, base + (n0 + j) * rb, k0, kc, tmp + j * kc);
            kmed__pack_bt(bp, tmp, kc, nr, kc);
        }
        return;
    }
    if (B->t == KMED_F32 && nr == KMED__NR) {   /* plain copy, NR floats per k */
        for (k = 0; k < kc; k++) {
            const float *src = (const float *)(const void *)(base + (k0 + k) * rb) + n0;
            KMED__VSTORE(bp + k * KMED__NR, KMED__VLOAD(src));
            KMED__VSTORE(bp + k * KMED__NR + KMED__VW, KMED__VLOAD(src + KMED__VW));
        }
        return;
    }
    for (k = 0; k < kc; k++) {
        float *d = bp + k * KMED__NR;
        kmed__dequant_span(B->t, base + (k0 + k) * rb, n0, nr, d);
        for (j = nr; j < KMED__NR; j++) d[j] = 0.0f;
    }
}

/* Micro-kernel: C[mr, nr] (+)= Ap (MR x kc, packed) . Bp (kc x NR, row k at bp + k*ldb:
   packed panels have ldb = NR; an f32 matrix with >= NR columns left can be used in place).
   The k loop and the final add are the same whatever mr/nr are, so edge tiles round like
   full ones. */
static void kmed__gemm_ukr_ldb(size_t kc, const float *ap, const float *bp, size_t ldb,
                               float *c, size_t ldc, int accum, size_t mr, size_t nr)
{
#define KMED__D(i) KMED__VT c##i##a = KMED__VZERO(), c##i##b = KMED__VZERO();
#define KMED__F(i) a = KMED__VSET1(ap[i]); c##i##a = KMED__VFMA(a, b0, c##i##a); \
    c##i##b = KMED__VFMA(a, b1, c##i##b);
#define KMED__S(i) KMED__VSTORE(t + i * KMED__NR, c##i##a); \
    KMED__VSTORE(t + i * KMED__NR + KMED__VW, c##i##b);
#define KMED__C(i) if (accum) { c##i##a = KMED__VADD(c##i##a, KMED__VLOAD(c + i * ldc)); \
    c##i##b = KMED__VADD(c##i##b, KMED__VLOAD(c + i * ldc + KMED__VW)); } \
    KMED__VSTORE(c + i * ldc, c##i##a); KMED__VSTORE(c + i * ldc + KMED__VW, c##i##b);
    KMED__REP(KMED__D)
    size_t k;
    for (k = 0; k < kc; k++) {
        KMED__VT b0 = KMED__VLOAD(bp), b1 = KMED__VLOAD(bp + KMED__VW), a;
        KMED__REP(KMED__F)
        ap += KMED__MR;
        bp += ldb;
    }
    if (mr == KMED__MR && nr == KMED__NR) {
        KMED__REP(KMED__C)
    } else {
        float t[KMED__MR * KMED__NR];
        size_t i, j;
        KMED__REP(KMED__S)
        for (i = 0; i < mr; i++)
            for (j = 0; j < nr; j++)
                c[i * ldc + j] = accum ? c[i * ldc + j] + t[i * KMED__NR + j] : t[i * KMED__NR + j];
    }
#undef KMED__D
#undef KMED__F
#undef KMED__S
#undef KMED__C
}

static void kmed__gemm_ukr(size_t kc, const float *ap, const float *bp, float *c, size_t ldc,
                           int accum, size_t mr, size_t nr)
{
    kmed__gemm_ukr_ldb(kc, ap, bp, KMED__NR, c, ldc, accum, mr, nr);
}

typedef struct kmed__gemm_job {
    kmed__gsrc A, B;
    float *C;               /* (M, ldc) */
    size_t ldc, M, N, K;
    float beta;             /* with accum: C = beta * C + A.B, applied per thread range */
    int accum;              /* 0: C = A.B (C not read) */
    int split_n;            /* threads take column ranges (else row ranges) */
    unsigned char *scratch; /* per thread: scratch_bytes each; NULL: stack panels */
    size_t scratch_bytes, ap_floats, bp_floats;
    size_t mc, nc;          /* row and column block sizes */
} kmed__gemm_job;

static float *kmed__align64(unsigned char *p)
{
    return (float *)(void *)(p + ((64 - ((uintptr_t)p & 63)) & 63));
}

static void kmed__gemm_block(const kmed__gemm_job *g, size_t m0, size_t m1, size_t n0,
                             size_t n1, unsigned char *scratch)
{
    float *ap = kmed__align64(scratch);
    float *bp = ap + g->ap_floats;
    float *tmp = bp + g->bp_floats;
    size_t jc, pc, ic, jr, ir, m, n;
    if (g->accum && g->beta != 1.0f)
        for (m = m0; m < m1; m++)
            for (n = n0; n < n1; n++) g->C[m * g->ldc + n] *= g->beta;
    if (g->K == 0) {
        if (!g->accum)
            for (m = m0; m < m1; m++)
                for (n = n0; n < n1; n++) g->C[m * g->ldc + n] = 0.0f;
        return;
    }
    for (jc = n0; jc < n1; jc += g->nc) {
        size_t nc = n1 - jc < g->nc ? n1 - jc : g->nc;
        for (pc = 0; pc < g->K; pc += KMED__KC) {
            size_t kc = g->K - pc < KMED__KC ? g->K - pc : KMED__KC;
            for (jr = 0; jr < nc; jr += KMED__NR)
                kmed__pack_b(bp + jr * kc, &g->B, pc, kc, jc + jr,
                             nc - jr < KMED__NR ? nc - jr : KMED__NR, tmp);
            for (ic = m0; ic < m1; ic += g->mc) {
                size_t mc = m1 - ic < g->mc ? m1 - ic : g->mc;
                for (ir = 0; ir < mc; ir += KMED__MR)
                    kmed__pack_a(ap + ir * kc, &g->A, ic + ir,
                                 mc - ir < KMED__MR ? mc - ir : KMED__MR, pc, kc);
                for (jr = 0; jr < nc; jr += KMED__NR)
                    for (ir = 0; ir < mc; ir += KMED__MR)
                        kmed__gemm_ukr(kc, ap + ir * kc, bp + jr * kc,
                                       g->C + (ic + ir) * g->ldc + jc + jr, g->ldc,
                                       g->accum || pc > 0,
                                       mc - ir < KMED__MR ? mc - ir : KMED__MR,
                                       nc - jr < KMED__NR ? nc - jr : KMED__NR);
            }
        }
    }
}

/* Panels of one micro-tile (MR x KC of A, NR x KC of B, NR x KC transpose scratch): what
   a GEMM runs on when no heap scratch can be had. Each output's summation order depends
   only on KC, so the result is the same bits as with full-size panels. */
#define KMED__GEMM_MIN_BYTES ((KMED__MR + 2 * KMED__NR) * KMED__KC * sizeof(float) + 64)

static void kmed__gemm_range(void *vctx, size_t b, size_t e, int thread)
{
    const kmed__gemm_job *g = (const kmed__gemm_job *)vctx;
    unsigned char stack[KMED__GEMM_MIN_BYTES];
    unsigned char *s = g->scratch ? g->scratch + (size_t)thread * g->scratch_bytes : stack;
    if (g->split_n) kmed__gemm_block(g, 0, g->M, b, e, s);
    else kmed__gemm_block(g, b, e, 0, g->N, s);
}

/* Runs the job over the pool; short of heap scratch, on one-micro-tile stack panels (same
   result bits, slower). Returns 1. */
static int kmed__gemm_run(kmed_pool *pool, kmed__gemm_job *g)
{
    int nt = kmed_pool_threads(pool);
    /* panels sized to the problem: small GEMMs (LoRA) then stay off mmap'd fresh pages */
    size_t kc = g->K < KMED__KC ? (g->K ? g->K : 1) : KMED__KC;
    size_t mc = (g->M + KMED__MR - 1) / KMED__MR * KMED__MR;
    size_t nc = (g->N + KMED__NR - 1) / KMED__NR * KMED__NR, per;
    unsigned char *mem;
    if (mc > KMED__MC) mc = KMED__MC;
    if (nc > KMED__NC) nc = KMED__NC;
    g->mc = KMED__MC;
    g->nc = KMED__NC;
    g->ap_floats = mc * kc;
    g->bp_floats = nc * kc;
    per = (g->ap_floats + g->bp_floats + KMED__NR * kc) * sizeof(float) + 64;
    if (pool && pool->scratch_bytes >= per * (size_t)nt) {
        mem = pool->scratch;
    } else {
        mem = (unsigned char *)KMED_MALLOC(per * (size_t)nt);
        if (!mem) {
            g->mc = KMED__MR;
            g->nc = KMED__NR;
            g->ap_floats = KMED__MR * (size_t)KMED__KC;
            g->bp_floats = KMED__NR * (size_t)KMED__KC;
            g->scratch = NULL;
            if (g->split_n) kmed_pool_for(pool, g->N, KMED__NR, kmed__gemm_range, g);
            else kmed_pool_for(pool, g->M, KMED__MR, kmed__gemm_range, g);
            return 1;
        }
        if (pool) {   /* keep the larger block for the next call */
            KMED_FREE(pool->scratch);
            pool->scratch = mem;
            pool->scratch_bytes = per * (size_t)nt;
        }
    }
    g->scratch = mem;
    g->scratch_bytes = per;
    if (g->split_n) kmed_pool_for(pool, g->N, KMED__NR, kmed__gemm_range, g);
    else kmed_pool_for(pool, g->M, KMED__MR, kmed__gemm_range, g);
    if (!pool) KMED_FREE(mem);
    return 1;
}

/* ---- matrix-vector kernels (M small: decode). Each output is computed by the same
   instruction sequence whatever rows share its loop, so results do not depend on the thread
   split. ---- */

typedef struct kmed__mv_ctx {
    float *y;                  /* (M, N) */
    const float *x;            /* (M, K) */
    const unsigned char *w;    /* (N, K) in wt */
    kmed_dtype wt;
    size_t M, N, K, wrow;
    int acc;
    const void *xq;            /* FAST: x as Q8_0 blocks (M, K/32) or BF16 (M, K) */
} kmed__mv_ctx;

static void kmed__mv_out(const kmed__mv_ctx *c, size_t m, size_t n, float v)
{
    if (c->acc) c->y[m * c->N + n] += v;
    else c->y[m * c->N + n] = v;
}

static float kmed__hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#if KMED__SIMD == 512
#define KMED__HSUM(v) _mm512_reduce_add_ps(v)
#define KMED__LD_F32(r, k) _mm512_loadu_ps((const float *)(const void *)(r) + (k))
#define KMED__U16P(r, k) ((const void *)((const uint16_t *)(const void *)(r) + (k)))
#define KMED__LD_BF16(r, k) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32( \
    _mm256_loadu_si256((const __m256i *)KMED__U16P(r, k))), 16))
#define KMED__LD_F16(r, k) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)KMED__U16P(r, k)))
/* 16 int8 -> 16 floats */
#define KMED__I8X16(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(p))
#else
#define KMED__HSUM(v) kmed__hsum8(v)
#define KMED__LD_F32(r, k) _mm256_loadu_ps((const float *)(const void *)(r) + (k))
#define KMED__U16P(r, k) ((const void *)((const uint16_t *)(const void *)(r) + (k)))
#define KMED__LD_BF16(r, k) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32( \
    _mm_loadu_si128((const __m128i *)KMED__U16P(r, k))), 16))
#define KMED__LD_F16(r, k) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)KMED__U16P(r, k)))
#endif

/* Float-like weights (F32, BF16, F16), four weight rows per pass over x; one row at a
   time in memory order when x is one row (decode: four interleaved row streams kept fewer
   cache misses in flight), with four accumulators for the FMA latency. */
#define KMED__MV_FLOATLIKE(NAME, LD, CVT)                                                   \
static void NAME(const kmed__mv_ctx *c, size_t n0, size_t n1)                             \
{                                                                                         \
    size_t n, m, k, r, K = c->K, KV = K / KMED__VW * KMED__VW;                             \
    for (n = n0; n < n1 && c->M == 1; n++) {   /* x is one row */                         \
        const unsigned char *wr = c->w + n * c->wrow;                                     \
        const float *x = c->x;                                                            \
        KMED__VT a0 = KMED__VZERO(), a1 = a0, a2 = a0, a3 = a0;                           \
        float s;                                                                          \
        for (k = 0; k + 4 * KMED__VW <= KV; k += 4 * KMED__VW) {                          \
            a0 = KMED__VFMA(LD(wr, k), KMED__VLOAD(x + k), a0);                           \
            a1 = KMED__VFMA(LD(wr, k + KMED__VW), KMED__VLOAD(x + k + KMED__VW), a1);     \
            a2 = KMED__VFMA(LD(wr, k + 2 * KMED__VW), KMED__VLOAD(x + k + 2 * KMED__VW), a2); \
            a3 = KMED__VFMA(LD(wr, k + 3 * KMED__VW), KMED__VLOAD(x + k + 3 * KMED__VW), a3); \
        }                                                                                 \
        for (; k < KV; k += KMED__VW) a0 = KMED__VFMA(LD(wr, k), KMED__VLOAD(x + k), a0);  \
        s = KMED__HSUM(KMED__VADD(KMED__VADD(a0, a1), KMED__VADD(a2, a3)));               \
        for (k = KV; k < K; k++) s += CVT(wr, k) * x[k];                                  \
        kmed__mv_out(c, 0, n, s);                                                         \
    }                                                                                     \
    for (n = n0; n < n1 && c->M > 1; n += 4) {   /* several x rows */                     \
        size_t R = n1 - n < 4 ? n1 - n : 4;                                               \
        const unsigned char *w0 = c->w + n * c->wrow;                                     \
        const unsigned char *w1 = w0 + (R > 1 ? c->wrow : 0);                             \
        const unsigned char *w2 = w0 + (R > 2 ? 2 * c->wrow : 0);                         \
        const unsigned char *w3 = w0 + (R > 3 ? 3 * c->wrow : 0);                         \
        for (m = 0; m < c->M; m++) {                                                      \
            const float *x = c->x + m * K;                                                \
            KMED__VT a0 = KMED__VZERO(), a1 = a0, a2 = a0, a3 = a0;                       \
            float out[4];                                                                 \
            for (k = 0; k < KV; k += KMED__VW) {                                          \
                KMED__VT xv = KMED__VLOAD(x + k);                                         \
                a0 = KMED__VFMA(LD(w0, k), xv, a0);                                       \
                a1 = KMED__VFMA(LD(w1, k), xv, a1);                                       \
                a2 = KMED__VFMA(LD(w2, k), xv, a2);                                       \
                a3 = KMED__VFMA(LD(w3, k), xv, a3);                                       \
            }                                                                             \
            out[0] = KMED__HSUM(a0); out[1] = KMED__HSUM(a1);                             \
            out[2] = KMED__HSUM(a2); out[3] = KMED__HSUM(a3);                             \
            for (r = 0; r < R; r++) {                                                     \
                const unsigned char *wr = c->w + (n + r) * c->wrow;                       \
                for (k = KV; k < K; k++) out[r] += CVT(wr, k) * x[k];                     \
                kmed__mv_out(c, m, n + r, out[r]);                                        \
            }                                                                             \
        }                                                                                 \
    }                                                                                     \
}
#define KMED__CVT_F32(r, k) ((const float *)(const void *)(r))[k]
#define KMED__CVT_BF16(r, k) kmed_bf16_to_f32(((const uint16_t *)(const void *)(r))[k])
#define KMED__CVT_F16(r, k) kmed_f16_to_f32(((const uint16_t *)(const void *)(r))[k])
KMED__MV_FLOATLIKE(kmed__mv_f32, KMED__LD_F32, KMED__CVT_F32)
KMED__MV_FLOATLIKE(kmed__mv_bf16, KMED__LD_BF16, KMED__CVT_BF16)
KMED__MV_FLOATLIKE(kmed__mv_f16, KMED__LD_F16, KMED__CVT_F16)

/* 32 weights of block b as two (AVX-512) or four (AVX2) float vectors, unscaled. */
#if KMED__SIMD == 512
#define KMED__QDOT(t, q, xb)                                                               \
    t = _mm512_mul_ps(KMED__I8X16(q##0), _mm512_loadu_ps(xb));                            \
    t = _mm512_fmadd_ps(KMED__I8X16(q##1), _mm512_loadu_ps((xb) + 16), t)
#else
#define KMED__I8X8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(p))
#define KMED__QDOT(t, q, xb)                                                               \
    t = _mm256_mul_ps(KMED__I8X8(q##0), _mm256_loadu_ps(xb));                             \
    t = _mm256_fmadd_ps(KMED__I8X8(_mm_srli_si128(q##0, 8)), _mm256_loadu_ps((xb) + 8), t); \
    t = _mm256_fmadd_ps(KMED__I8X8(q##1), _mm256_loadu_ps((xb) + 16), t);                 \
    t = _mm256_fmadd_ps(KMED__I8X8(_mm_srli_si128(q##1, 8)), _mm256_loadu_ps((xb) + 24), t)
#endif

/* Q8_0 / Q4_0 weights, exact f32 activations: per block, sum q*x then scale by d (as the
   scalar reference does); two weight rows per pass, or one when x is one row (decode: a
   single stream in memory order keeps more cache misses in flight). */
static void kmed__mv_quant(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK, step = c->M == 1 ? 1 : 2;
    int q4 = c->wt == KMED_Q4_0;
    size_t bsz = q4 ? sizeof(kmed_block_q4_0) : sizeof(kmed_block_q8_0);
    for (n = n0; n < n1; n += step) {
        size_t R = n1 - n < step ? 1 : step;
        const unsigned char *r0 = c->w + n * c->wrow, *r1 = r0 + c->wrow;
        for (m = 0; m < c->M; m++) {
            const float *x = c->x + m * c->K;
            KMED__VT a0 = KMED__VZERO(), a1 = a0, t;
            for (b = 0; b < nb; b++) {
                __m128i p0, p1;
                float d;
                /* prefetch two rows ahead (a pass or two): that hides the memory latency */
                _mm_prefetch((const char *)(r0 + 2 * c->wrow + b * bsz), _MM_HINT_T0);
                d = kmed__qblock(r0, b, q4, &p0, &p1);
                KMED__QDOT(t, p, x + b * KMED_QK);
                a0 = KMED__VFMA(t, KMED__VSET1(d), a0);
                if (R > 1) {
                    _mm_prefetch((const char *)(r1 + 2 * c->wrow + b * bsz), _MM_HINT_T0);
                    d = kmed__qblock(r1, b, q4, &p0, &p1);
                    KMED__QDOT(t, p, x + b * KMED_QK);
                    a1 = KMED__VFMA(t, KMED__VSET1(d), a1);
                }
            }
            kmed__mv_out(c, m, n, KMED__HSUM(a0));
            if (R > 1) kmed__mv_out(c, m, n + 1, KMED__HSUM(a1));
        }
    }
}

#if KMED__SIMD == 512
/* Q4_0 exact, AVX-512: vpermps looks the 16 dequantized values (q - 8) * d up from the
   nibbles directly (it reads only the low 4 bits of each index), so a block costs one
   zero-extension, one shift, two lookups and two FMAs. (q - 8) * d is exact in f32. */
static void kmed__mv_q4_512(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK;
    const __m512 base = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    for (n = n0; n < n1; n += 2) {
        size_t R = n1 - n < 2 ? 1 : 2;
        const kmed_block_q4_0 *r0 = (const kmed_block_q4_0 *)(const void *)(c->w + n * c->wrow);
        const kmed_block_q4_0 *r1 = R > 1 ? r0 + nb : r0;
        for (m = 0; m < c->M; m++) {
            const float *x = c->x + m * c->K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            for (b = 0; b < nb; b++) {
                __m512 xl = _mm512_loadu_ps(x + b * KMED_QK);
                _mm_prefetch((const char *)(r0 + 2 * nb + b), _MM_HINT_T0);
                _mm_prefetch((const char *)(r1 + 2 * nb + b), _MM_HINT_T0);
                __m512 xh = _mm512_loadu_ps(x + b * KMED_QK + 16);
                __m512i z0 = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(const void *)r0[b].qs));
                __m512i z1 = _mm512_cvtepu8_epi32(
                    _mm_loadu_si128((const __m128i *)(const void *)r1[b].qs));
                __m512 l0 = _mm512_mul_ps(base, _mm512_set1_ps(kmed__tensor_h2f(r0[b].d)));
                __m512 l1 = _mm512_mul_ps(base, _mm512_set1_ps(kmed__tensor_h2f(r1[b].d)));
                a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(z0, l0), xl, a0);
                b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(z0, 4), l0), xh, b0);
                a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(z1, l1), xl, a1);
                b1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(z1, 4), l1), xh, b1);
            }
            kmed__mv_out(c, m, n, _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)));
            if (R > 1) kmed__mv_out(c, m, n + 1, _mm512_reduce_add_ps(_mm512_add_ps(a1, b1)));
        }
    }
}
#endif

/* ---- FAST: integer dot products against x quantized to Q8_0 (GGML's vec_dot_q8_0_q8_0
   and vec_dot_q4_0_q8_0 scheme), and BF16 x BF16 ---- */

/* 8 int32 partial sums of 32 signed int8 products, as floats (exact: |sum| < 2^24). */
static __m256 kmed__i8dot(__m256i w, __m256i x)
{
    /* |w| as unsigned times x with w's sign: the unsigned x signed form the ISA has */
    __m256i aw = _mm256_sign_epi8(w, w), sx = _mm256_sign_epi8(x, w);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    __m256i s = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, sx);
#else
    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), _mm256_set1_epi16(1));
#endif
    return _mm256_cvtepi32_ps(s);
}

static void kmed__mv_fast_q(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, b, nb = c->K / KMED_QK;
    const __m256i m4 = _mm256_set1_epi8(15), e8 = _mm256_set1_epi8(8);
    int q4 = c->wt == KMED_Q4_0;
    for (n = n0; n < n1; n++) {
        const unsigned char *row = c->w + n * c->wrow;
        for (m = 0; m < c->M; m++) {
            const kmed_block_q8_0 *xb = (const kmed_block_q8_0 *)c->xq + m * nb;
            __m256 acc = _mm256_setzero_ps();
            for (b = 0; b < nb; b++) {
                __m256i wq;
                float dw;
                if (q4) {
                    const kmed_block_q4_0 *k = (const kmed_block_q4_0 *)(const void *)row + b;
                    __m128i v = _mm_loadu_si128((const __m128i *)(const void *)k->qs);
                    __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(v),
                                                        _mm_srli_epi16(v, 4), 1);
                    wq = _mm256_sub_epi8(_mm256_and_si256(t, m4), e8);
                    dw = kmed__tensor_h2f(k->d);
                } else {
                    const kmed_block_q8_0 *k = (const kmed_block_q8_0 *)(const void *)row + b;
                    wq = _mm256_loadu_si256((const __m256i *)(const void *)k->qs);
                    dw = kmed__tensor_h2f(k->d);
                }
                acc = _mm256_fmadd_ps(kmed__i8dot(wq, _mm256_loadu_si256(
                                          (const __m256i *)(const void *)xb[b].qs)),
                                      _mm256_set1_ps(dw * kmed__tensor_h2f(xb[b].d)), acc);
            }
            kmed__mv_out(c, m, n, kmed__hsum8(acc));
        }
    }
}

static void kmed__mv_fast_bf16(const kmed__mv_ctx *c, size_t n0, size_t n1)
{
    size_t n, m, k, K = c->K;
#if defined(__AVX512BF16__)
    size_t KV = K / 32 * 32;
#else
    size_t KV = K / KMED__VW * KMED__VW;
#endif
    for (n = n0; n < n1; n++) {
        const uint16_t *w = (const uint16_t *)(const void *)(c->w + n * c->wrow);
        for (m = 0; m < c->M; m++) {
            const uint16_t *xb = (const uint16_t *)c->xq + m * K;
            float s;
#if defined(__AVX512BF16__)
            __m512 acc = _mm512_setzero_ps();
            for (k = 0; k < KV; k += 32)
                acc = _mm512_dpbf16_ps(acc,
                                       (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                                       (__m512bh)_mm512_loadu_si512((const void *)(xb + k)));
#else
            KMED__VT acc = KMED__VZERO();
            for (k = 0; k < KV; k += KMED__VW)
                acc = KMED__VFMA(KMED__LD_BF16(w, k), KMED__LD_BF16(xb, k), acc);
#endif
            s = KMED__HSUM(acc);
            for (k = KV; k < K; k++) s += kmed_bf16_to_f32(w[k]) * kmed_bf16_to_f32(xb[k]);
            kmed__mv_out(c, m, n, s);
        }
    }
}


#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#define KMED__VNNI512 1
/* FAST Q8_0/Q4_0 with 512-bit VNNI, by quads of four blocks. A quad of weights becomes two
   vectors of unsigned bytes, lo (bytes 0-15 of each block) and hi (bytes 16-31), gathered
   straight from the stored blocks with vpermt2b: Q4_0 nibbles as stored (low nibbles are
   bytes 0-15, high ones 16-31), Q8_0 as int8 + 128. Lane l of both covers block l/4, so
   two vpdpbusd give each lane an exact integer dot of eight products; starting them from
   -z0 * (the lane's x sum), z0 = 8 or 128, removes the unsigned offset exactly, so one int
   to float conversion and one FMA by (weight scale * x scale) per quad finish the lane.
   x is quantized to Q8_0 and laid out per quad as KMED__VQ_QUAD bytes: lo[64], hi[64],
   bias[16] int32, xs[16] float (each lane's block scale); a partial last quad has zeros. */
#define KMED__VQ_QUAD 256

static size_t kmed__vx_stride(size_t K)
{
    return (K / KMED_QK + 3) / 4 * KMED__VQ_QUAD;
}

static void kmed__vx_build(unsigned char *dst, const float *x, kmed_dtype wt, size_t K,
                           kmed_block_q8_0 *tmp /* K/32 */)
{
    size_t nb = K / KMED_QK, q, j, l, i;
    int z0 = wt == KMED_Q4_0 ? 8 : 128;
    kmed_quantize_row(KMED_Q8_0, x, tmp, K);
    memset(dst, 0, kmed__vx_stride(K));
    for (q = 0; q * 4 < nb; q++) {
        unsigned char *o = dst + q * KMED__VQ_QUAD;
        int8_t *lo = (int8_t *)o, *hi = lo + 64;
        int32_t *bias = (int32_t *)(void *)(o + 128);
        float *xs = (float *)(void *)(o + 192);
        for (j = 0; j < 4 && q * 4 + j < nb; j++) {
            const kmed_block_q8_0 *b = &tmp[q * 4 + j];
            memcpy(lo + 16 * j, b->qs, 16);
            memcpy(hi + 16 * j, b->qs + 16, 16);
            for (l = 4 * j; l < 4 * j + 4; l++) {
                int s = 0;
                for (i = 0; i < 4; i++) s += lo[4 * l + i] + hi[4 * l + i];
                bias[l] = -z0 * s;
                xs[l] = kmed__tensor_h2f(b->d);
            }
        }
    }
}

typedef struct kmed__vq_ctx {
    float *y;                  /* (M, N) */
    const unsigned char *w;    /* (N, K) Q8_0 or Q4_0 */
    kmed_dtype wt;
    size_t M, N, K, wrow, xstride, wbuf_bytes;
    size_t nq, qb;             /* quads per row (the last may be partial), bytes per quad */
    int acc;
    const unsigned char *xv;   /* (M, xstride): kmed__vx_build rows */
    unsigned char *wbuf;       /* per thread, M > 1: four rows' decoded quads */
    /* vpermt2b/vpermt2w indices: lo bytes, hi bytes (Q8_0), lane scale words */
    unsigned char glo[64], ghi[64], gsc[64];
} kmed__vq_ctx;

/* The gather indices of a quad (see kmed__vw_quad for the windows they address). */
static void kmed__vq_indices(kmed__vq_ctx *c)
{
    size_t bs = c->wt == KMED_Q4_0 ? sizeof(kmed_block_q4_0) : sizeof(kmed_block_q8_0);
    int j;
    for (j = 0; j < 64; j++) {
        size_t o = bs * (size_t)(j / 16) + 2 + (size_t)(j % 16);   /* byte in the quad */
        if (c->wt == KMED_Q4_0) {
            c->glo[j] = (unsigned char)(o < 64 ? o : o + 56);   /* windows at 0 and 8 */
            c->ghi[j] = 0;
        } else {
            c->glo[j] = (unsigned char)o;                       /* windows at 0 and 64 */
            c->ghi[j] = (unsigned char)(o + 16 - 8);            /* windows at 8 and 72 */
        }
    }
    for (j = 0; j < 32; j++) {   /* word j -> the fp16 scale of block j/4 (words 0-15 used) */
        uint16_t wi = (uint16_t)(bs / 2 * (size_t)((j / 4) & 3));
        memcpy(c->gsc + 2 * j, &wi, 2);
    }
}

/* 64 bytes at p + off, zeros past `avail` (the row's end: nothing beyond it is read). */
KMED__INLINE __m512i kmed__vq_win(const unsigned char *p, size_t off, size_t avail)
{
    if (off + 64 <= avail) return _mm512_loadu_si512((const void *)(p + off));
    if (off >= avail) return _mm512_setzero_si512();
    return _mm512_maskz_loadu_epi8((__mmask64)(((uint64_t)1 << (avail - off)) - 1), p + off);
}

typedef struct kmed__vq_quad { __m512i lo, hi; __m512 s; } kmed__vq_quad;

/* The quad of weight blocks at p (avail bytes left in the row): lo/hi bytes in x's layout
   and each lane's fp16 block scale as float. */
KMED__INLINE kmed__vq_quad kmed__vw_quad(kmed_dtype wt, const unsigned char *p, size_t avail,
                                         __m512i glo, __m512i ghi, __m512i gsc)
{
    kmed__vq_quad r;
    __m512i w0 = kmed__vq_win(p, 0, avail), q;
    if (wt == KMED_Q4_0) {
        const __m512i m = _mm512_set1_epi8(15);
        q = _mm512_permutex2var_epi8(w0, glo, kmed__vq_win(p, 8, avail));
        r.lo = _mm512_and_si512(q, m);
        r.hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m);
        q = _mm512_permutexvar_epi16(gsc, w0);
    } else {
        const __m512i f = _mm512_set1_epi8((char)0x80);
        __m512i w1 = kmed__vq_win(p, 64, avail);
        r.lo = _mm512_xor_si512(_mm512_permutex2var_epi8(w0, glo, w1), f);
        r.hi = _mm512_xor_si512(_mm512_permutex2var_epi8(kmed__vq_win(p, 8, avail), ghi,
                                                         kmed__vq_win(p, 72, avail)), f);
        q = _mm512_permutex2var_epi16(w0, gsc, w1);
    }
    r.s = _mm512_cvtph_ps(_mm512_castsi512_si256(q));
    return r;
}

/* acc += the quad's lane dots (exact integers) times weight scale * x scale */
#define KMED__VQ_STEP(acc, w, xlo, xhi, xb, xs) \
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32( \
                              _mm512_dpbusd_epi32(xb, (w).lo, xlo), (w).hi, xhi)), \
                          _mm512_mul_ps((w).s, xs), acc)

/* Lane sums of four vectors, each by the same halving tree (quarters 0+2 and 1+3, then
   their sum, then pairs within the quarter), so a row's result does not depend on which
   rows share the call. */
static void kmed__vq_hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3, float *out)
{
    __m512 a = _mm512_add_ps(_mm512_shuffle_f32x4(v0, v1, 0x44),
                             _mm512_shuffle_f32x4(v0, v1, 0xEE));
    __m512 b = _mm512_add_ps(_mm512_shuffle_f32x4(v2, v3, 0x44),
                             _mm512_shuffle_f32x4(v2, v3, 0xEE));
    __m512 h = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
    float t[16];
    h = _mm512_add_ps(h, _mm512_permute_ps(h, 0x4E));
    h = _mm512_add_ps(h, _mm512_permute_ps(h, 0xB1));
    _mm512_storeu_ps(t, h);
    out[0] = t[0];
    out[1] = t[4];
    out[2] = t[8];
    out[3] = t[12];
}

static void kmed__vq_out(const kmed__vq_ctx *c, size_t m, size_t n, float r)
{
    float *y = c->y + m * c->N + n;
    *y = c->acc ? *y + r : r;
}

/* Lane sums of one weight row against x row 0, decoding as it goes (M = 1). Row by row in
   memory order: interleaving four rows to share the x loads kept fewer cache misses in
   flight and read Q8_0 a third slower. */
KMED__INLINE __m512 kmed__vq_row(const kmed__vq_ctx *c, kmed_dtype wt,
                                 const unsigned char *row, __m512i glo, __m512i ghi,
                                 __m512i gsc)
{
    size_t q;
    __m512 acc = _mm512_setzero_ps();
    for (q = 0; q < c->nq; q++) {
        const unsigned char *xq = c->xv + q * KMED__VQ_QUAD;
        kmed__vq_quad w = kmed__vw_quad(wt, row + q * c->qb, c->wrow - q * c->qb, glo, ghi,
                                        gsc);
        KMED__VQ_STEP(acc, w, _mm512_load_si512((const void *)xq),
                      _mm512_load_si512((const void *)(xq + 64)),
                      _mm512_load_si512((const void *)(xq + 128)),
                      _mm512_load_ps((const void *)(xq + 192)));
    }
    return acc;
}

/* Decode: rows by fours, one reduction for the four; a short last group repeats a row. */
KMED__INLINE void kmed__vq_rows4(const kmed__vq_ctx *c, size_t n0, size_t n1,
                                 kmed_dtype wt, __m512i glo, __m512i ghi, __m512i gsc)
{
    size_t n, i;
    for (n = n0; n < n1; n += 4) {
        const unsigned char *r0 = c->w + n * c->wrow;
        size_t k = n1 - n < 4 ? n1 - n : 4;
        float r[4];
        /* in memory order (as call arguments they may run backwards: 4x slower) */
        __m512 a0 = kmed__vq_row(c, wt, r0, glo, ghi, gsc);
        __m512 a1 = kmed__vq_row(c, wt, k > 1 ? r0 + c->wrow : r0, glo, ghi, gsc);
        __m512 a2 = kmed__vq_row(c, wt, k > 2 ? r0 + 2 * c->wrow : r0, glo, ghi, gsc);
        __m512 a3 = kmed__vq_row(c, wt, k > 3 ? r0 + 3 * c->wrow : r0, glo, ghi, gsc);
        kmed__vq_hsum4(a0, a1, a2, a3, r);
        for (i = 0; i < k; i++) kmed__vq_out(c, 0, n + i, r[i]);
    }
}

static void kmed__vq_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__vq_ctx *c = (const kmed__vq_ctx *)vctx;
    size_t nq = c->nq, qb = c->qb, n, m, q, m0, mb;
    const __m512i glo = _mm512_loadu_si512((const void *)c->glo);
    const __m512i ghi = _mm512_loadu_si512((const void *)c->ghi);
    const __m512i gsc = _mm512_loadu_si512((const void *)c->gsc);
    unsigned char *wb = c->wbuf + (size_t)thread * c->wbuf_bytes;
    kmed__vq_quad *zq = (kmed__vq_quad *)(void *)(wb + ((64 - ((uintptr_t)wb & 63)) & 63));
    if (c->M == 1) {
        /* one copy of the loop per weight type, the type a constant in each */
        if (c->wt == KMED_Q4_0) kmed__vq_rows4(c, n0, n1, KMED_Q4_0, glo, ghi, gsc);
        else kmed__vq_rows4(c, n0, n1, KMED_Q8_0, glo, ghi, gsc);
        return;
    }
    /* prefill: x rows in blocks of at most 256 KB (they stay in L2); per block, four weight
       rows are decoded once and each x row meets the four with its loads shared. The same
       step and reduction as decode, so a row's result does not depend on M. */
    mb = (size_t)262144 / c->xstride;
    if (mb == 0) mb = 1;
    for (m0 = 0; m0 < c->M; m0 += mb) {
        size_t m1 = c->M - m0 < mb ? c->M : m0 + mb;
        for (n = n0; n < n1; n += 4) {
            size_t k = n1 - n < 4 ? n1 - n : 4, i;
            for (i = 0; i < 4; i++) {
                const unsigned char *row = c->w + (n + (i < k ? i : 0)) * c->wrow;
                for (q = 0; q < nq; q++)
                    zq[i * nq + q] = kmed__vw_quad(c->wt, row + q * qb, c->wrow - q * qb, glo,
                                                   ghi, gsc);
            }
            for (m = m0; m < m1; m++) {
                const unsigned char *xr = c->xv + m * c->xstride;
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                float r[4];
                for (q = 0; q < nq; q++) {
                    const unsigned char *xq = xr + q * KMED__VQ_QUAD;
                    __m512i xlo = _mm512_load_si512((const void *)xq);
                    __m512i xhi = _mm512_load_si512((const void *)(xq + 64));
                    __m512i xb = _mm512_load_si512((const void *)(xq + 128));
                    __m512 xs = _mm512_load_ps((const void *)(xq + 192));
                    KMED__VQ_STEP(a0, zq[q], xlo, xhi, xb, xs);
                    KMED__VQ_STEP(a1, zq[nq + q], xlo, xhi, xb, xs);
                    KMED__VQ_STEP(a2, zq[2 * nq + q], xlo, xhi, xb, xs);
                    KMED__VQ_STEP(a3, zq[3 * nq + q], xlo, xhi, xb, xs);
                }
                kmed__vq_hsum4(a0, a1, a2, a3, r);
                for (i = 0; i < k; i++) kmed__vq_out(c, m, n + i, r[i]);
            }
        }
    }
}
#undef KMED__VQ_STEP

/* Runs FAST Q8_0/Q4_0 through the VNNI kernel; 0 when memory is short. */
static int kmed__vq_run(kmed_pool *pool, float *y, const float *x, const void *w,
                        kmed_dtype wt, size_t M, size_t N, size_t K, int acc)
{
    kmed__vq_ctx c;
    size_t nb = K / KMED_QK, m, nt = (size_t)kmed_pool_threads(pool);
    size_t xs = kmed__vx_stride(K);
    size_t wbb = M > 1 ? 4 * ((nb + 3) / 4) * sizeof(kmed__vq_quad) + 64 : 0;   /* 4 rows */
    unsigned char *mem = (unsigned char *)KMED_MALLOC(M * xs + nt * wbb + 64 + nb * 34);
    unsigned char *xv;
    if (!mem) return 0;
    xv = mem + ((64 - ((uintptr_t)mem & 63)) & 63);
    memset(&c, 0, sizeof c);
    c.y = y; c.w = (const unsigned char *)w; c.wt = wt; c.M = M; c.N = N; c.K = K;
    c.wrow = kmed__tensor_row_bytes(wt, K); c.xstride = xs; c.wbuf_bytes = wbb; c.acc = acc;
    c.nq = (nb + 3) / 4; c.qb = 4 * (c.wrow / nb);
    c.xv = xv;
    c.wbuf = xv + M * xs;
    kmed__vq_indices(&c);
    for (m = 0; m < M; m++)
        kmed__vx_build(xv + m * xs, x + m * K, wt, K,
                       (kmed_block_q8_0 *)(void *)(c.wbuf + nt * wbb));
    kmed_pool_for(pool, N, 16, kmed__vq_range, &c);
    KMED_FREE(mem);
    return 1;
}
#endif

static void kmed__mv_range(void *vctx, size_t n0, size_t n1, int thread)
{
    const kmed__mv_ctx *c = (const kmed__mv_ctx *)vctx;
    (void)thread;
    if (c->xq) {
        if (c->wt == KMED_BF16) kmed__mv_fast_bf16(c, n0, n1);
        else kmed__mv_fast_q(c, n0, n1);
        return;
    }
    switch (c->wt) {
    case KMED_F32: kmed__mv_f32(c, n0, n1); break;
    case KMED_BF16: kmed__mv_bf16(c, n0, n1); break;
    case KMED_F16: kmed__mv_f16(c, n0, n1); break;
#if KMED__SIMD == 512
    case KMED_Q4_0: kmed__mv_q4_512(c, n0, n1); break;
#endif
    default: kmed__mv_quant(c, n0, n1); break;
    }
}
#endif /* KMED__SIMD */

/* ---- public kernels: SIMD where compiled in, else the scalar reference ---- */

KMED_API void kmed_matmul(kmed_pool *pool, float *y, const float *x, const void *w,
                          kmed_dtype wt, size_t M, size_t N, size_t K, int flags)
{
    if (M == 0 || N == 0) return;
#ifdef KMED__SIMD
#ifdef KMED__VNNI512
    if ((flags & KMED_MM_FAST) && (wt == KMED_Q8_0 || wt == KMED_Q4_0) &&
        kmed__vq_run(pool, y, x, w, wt, M, N, K, (flags & KMED_MM_ACC) != 0))
        return;
#endif
    if ((flags & KMED_MM_FAST) && wt == KMED_BF16 && M > 4) {
        /* prefill: bf16 x bf16 products are exact in f32, so rounding x to bf16 and running
           the f32 GEMM computes what vdpbf16ps does, at GEMM speed */
        float *xr = (float *)KMED_MALLOC(M * K * sizeof(float) + 1);
        if (xr) {
            kmed__gemm_job g;
            size_t i;
            int ok;
            for (i = 0; i < M * K; i++) xr[i] = kmed_bf16_to_f32(kmed_f32_to_bf16(x[i]));
            memset(&g, 0, sizeof g);
            g.A.p = xr; g.A.t = KMED_F32; g.A.ld = K; g.A.alpha = 1.0f;
            g.B.p = w; g.B.t = wt; g.B.ld = K; g.B.trans = 1;
            g.C = y; g.ldc = N; g.M = M; g.N = N; g.K = K;
            g.beta = 1.0f; g.accum = (flags & KMED_MM_ACC) != 0; g.split_n = 1;
            ok = kmed__gemm_run(pool, &g);
            KMED_FREE(xr);
            if (ok) return;
        }
    }
    if ((flags & KMED_MM_FAST) && (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16)) {
        kmed__mv_ctx c;
        memset(&c, 0, sizeof c);
        c.y = y; c.x = x; c.w = (const unsigned char *)w; c.wt = wt;
        c.M = M; c.N = N; c.K = K; c.wrow = kmed__tensor_row_bytes(wt, K);
        c.acc = (flags & KMED_MM_ACC) != 0;
        c.xq = kmed__mm_fast_x(x, wt, M, K, flags);
        if (c.xq) {
            kmed_pool_for(pool, N, 16, kmed__mv_range, &c);
            KMED_FREE((void *)c.xq);
            return;
        }
        flags &= ~KMED_MM_FAST;   /* no memory for x: the exact path needs none */
    }
    if (M <= 4) {
        kmed__mv_ctx c;
        memset(&c, 0, sizeof c);
        c.y = y; c.x = x; c.w = (const unsigned char *)w; c.wt = wt;
        c.M = M; c.N = N; c.K = K; c.wrow = kmed__tensor_row_bytes(wt, K);
        c.acc = (flags & KMED_MM_ACC) != 0;
        kmed_pool_for(pool, N, 16, kmed__mv_range, &c);
        return;
    }
    if (M > 4 && !((flags & KMED_MM_FAST) &&
                   (wt == KMED_Q8_0 || wt == KMED_Q4_0 || wt == KMED_BF16))) {
#ifdef KMED_USE_OPENBLAS
        if (wt == KMED_F32) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, (int)N, (int)K, 1.0f,
                        x, (int)K, (const float *)w, (int)K, (flags & KMED_MM_ACC) ? 1.0f : 0.0f,
                        y, (int)N);
            return;
        }
#endif
        {
            kmed__gemm_job g;
            memset(&g, 0, sizeof g);
            g.A.p = x; g.A.t = KMED_F32; g.A.ld = K; g.A.alpha = 1.0f;
            g.B.p = w; g.B.t = wt; g.B.ld = K; g.B.trans = 1;
            g.C = y; g.ldc = N; g.M = M; g.N = N; g.K = K;
            g.beta = 1.0f; g.accum = (flags & KMED_MM_ACC) != 0; g.split_n = 1;
            if (kmed__gemm_run(pool, &g)) return;
        }
    }
#endif
    kmed__matmul_ref(pool, y, x, w, wt, M, N, K, flags);
}

KMED_API void kmed_matmul_dx(kmed_pool *pool, float *dx, const float *dy, const void *w,
                             kmed_dtype wt, size_t M, size_t N, size_t K)
{
    if (M == 0 || K == 0) return;
#ifdef KMED__SIMD
#ifdef KMED_USE_OPENBLAS
    if (wt == KMED_F32) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)M, (int)K, (int)N, 1.0f,
                    dy, (int)N, (const float *)w, (int)K, 1.0f, dx, (int)K);
        return;
    }
#endif
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = dy; g.A.t = KMED_F32; g.A.ld = N; g.A.alpha = 1.0f;
        g.B.p = w; g.B.t = wt; g.B.ld = K;
        g.C = dx; g.ldc = K; g.M = M; g.N = K; g.K = N;
        g.beta = 1.0f; g.accum = 1; g.split_n = 1;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
    kmed__matmul_dx_ref(pool, dx, dy, w, wt, M, N, K);
}

KMED_API void kmed_matmul_dw(kmed_pool *pool, float *dw, const float *dy, const float *x,
                             size_t M, size_t N, size_t K)
{
    if (N == 0 || K == 0) return;
#ifdef KMED__SIMD
#ifdef KMED_USE_OPENBLAS
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)N, (int)K, (int)M, 1.0f,
                dy, (int)N, x, (int)K, 1.0f, dw, (int)K);
    return;
#else
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = dy; g.A.t = KMED_F32; g.A.ld = N; g.A.trans = 1; g.A.alpha = 1.0f;
        g.B.p = x; g.B.t = KMED_F32; g.B.ld = K;
        g.C = dw; g.ldc = K; g.M = N; g.N = K; g.K = M;
        g.beta = 1.0f; g.accum = 1; g.split_n = K >= N;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
#endif
    kmed__matmul_dw_ref(pool, dw, dy, x, M, N, K);
}

KMED_API void kmed_sgemm(kmed_pool *pool, int ta, int tb, size_t M, size_t N, size_t K,
                         float alpha, const float *A, size_t lda, const float *B,
                         size_t ldb, float beta, float *C, size_t ldc)
{
    if (M == 0 || N == 0) return;
#ifdef KMED_USE_OPENBLAS
    (void)pool;
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
                (int)M, (int)N, (int)K, alpha, A, (int)lda, B, (int)ldb, beta, C, (int)ldc);
    return;
#else
#ifdef KMED__SIMD
    {
        kmed__gemm_job g;
        memset(&g, 0, sizeof g);
        g.A.p = A; g.A.t = KMED_F32; g.A.ld = lda; g.A.trans = ta; g.A.alpha = alpha;
        g.B.p = B; g.B.t = KMED_F32; g.B.ld = ldb; g.B.trans = tb;
        g.C = C; g.ldc = ldc; g.M = M; g.N = N; g.K = K;
        g.beta = beta; g.accum = beta != 0.0f; g.split_n = N >= M;
        if (kmed__gemm_run(pool, &g)) return;
    }
#endif
    kmed__sgemm_ref(pool, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

KMED_API float kmed_dot_f32(const float *a, const float *b, size_t n)
{
#ifdef KMED__SIMD
    /* two accumulators hide FMA latency; the tail is added last, in order */
    KMED__VT s0 = KMED__VZERO(), s1 = s0;
    size_t i = 0;
    float r;
    for (; i + 2 * KMED__VW <= n; i += 2 * KMED__VW) {
        s0 = KMED__VFMA(KMED__VLOAD(a + i), KMED__VLOAD(b + i), s0);
        s1 = KMED__VFMA(KMED__VLOAD(a + i + KMED__VW), KMED__VLOAD(b + i + KMED__VW), s1);
    }
    if (i + KMED__VW <= n) {
        s0 = KMED__VFMA(KMED__VLOAD(a + i), KMED__VLOAD(b + i), s0);
        i += KMED__VW;
    }
    r = KMED__HSUM(KMED__VADD(s0, s1));
    for (; i < n; i++) r += a[i] * b[i];
    return r;
#else
    return kmed_dot_row(KMED_F32, a, b, n);
#endif
}

/* ==== kmed_tok: Gemma tokenizer (tokenizer.json BPE, SentencePiece BPE), chat template ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Per-id flags. */
#define KMED__TOK_F_MODEL   0x001 /* in the model vocabulary */
#define KMED__TOK_F_ADDED   0x002 /* an HF added token */
#define KMED__TOK_F_SPECIAL 0x004 /* dropped by skip_special */
#define KMED__TOK_F_LSTRIP  0x008
#define KMED__TOK_F_RSTRIP  0x010
#define KMED__TOK_F_SWORD   0x020 /* single_word */
#define KMED__TOK_F_NORMAL  0x040 /* SentencePiece types */
#define KMED__TOK_F_UNKNOWN 0x080
#define KMED__TOK_F_CONTROL 0x100
#define KMED__TOK_F_USER    0x200
#define KMED__TOK_F_UNUSED  0x400
#define KMED__TOK_F_BYTE    0x800

#define KMED__TOK_NCP 0x110000 /* Unicode code points */

/* One slot of the piece -> id table; the string lives in the pool at off. */
typedef struct kmed__tok_vslot { uint32_t hash, len, off; int32_t id; } kmed__tok_vslot;

/* Merge table slots are one uint64 each, (left id, right id, rank) packed as
   ((left << id_bits | right) << rank_bits | rank), so Gemma's 580k merges take 8 MB and most
   lookups hit cache; the merged id is merge_id[rank]. */
#define KMED__TOK_MEMPTY UINT64_MAX

/* Byte trie (first-child / next-sibling) for added tokens and user-defined pieces. */
typedef struct kmed__tok_trie {
    int32_t *child, *sibling, *id; /* [n] */
    unsigned char *byte;           /* [n] */
    int n, cap;
    unsigned char first[256];      /* 1 if some entry starts with this byte */
} kmed__tok_trie;

/* A string rewrite step of the HF normalizer, pre-tokenizer or decoder. */
enum {
    KMED__TOK_OP_REPLACE, KMED__TOK_OP_PREPEND, KMED__TOK_OP_SPLIT,
    KMED__TOK_OP_BYTEFALLBACK, KMED__TOK_OP_FUSE, KMED__TOK_OP_STRIP
};
enum {
    KMED__TOK_SPLIT_REMOVED, KMED__TOK_SPLIT_ISOLATED, KMED__TOK_SPLIT_PREV,
    KMED__TOK_SPLIT_NEXT, KMED__TOK_SPLIT_CONTIGUOUS
};
typedef struct kmed__tok_op {
    int op;
    char *a; size_t alen; /* pattern / prepend / strip content */
    char *b; size_t blen; /* replacement */
    int arg1, arg2;       /* split behaviour; strip start, stop */
} kmed__tok_op;
#define KMED__TOK_MAX_OPS 16

typedef struct kmed__tok_impl {
    char *pool; size_t pool_len, pool_cap; /* every string, NUL-terminated */
    uint32_t *poff, *plen;                 /* [n_vocab] piece of each id; plen 0: none */
    uint16_t *flags;                       /* [n_vocab] KMED__TOK_F_* */
    float *score;                          /* [n_vocab] SentencePiece scores */
    kmed__tok_vslot *vs; size_t vmask;     /* model vocabulary */
    int32_t *char_id;                      /* [KMED__TOK_NCP] HF one-character pieces */
    int32_t byte_id[256];                  /* <0xXX> pieces, -1 */
    uint64_t *ms; size_t mmask; int mshift;  /* HF merges, packed (see above) */
    int id_bits, rank_bits;
    int32_t *merge_id;                     /* [n_merges] merged id of each rank */
    int byte_fallback, fuse_unk, ignore_merges;
    kmed__tok_trie raw_added, norm_added;  /* HF added tokens (normalized false / true) */
    kmed__tok_op norm[KMED__TOK_MAX_OPS]; int n_norm;
    kmed__tok_op pre[KMED__TOK_MAX_OPS]; int n_pre;
    kmed__tok_op dec[KMED__TOK_MAX_OPS]; int n_dec;
    int has_decoder;
    int prefix[8], n_prefix, suffix[8], n_suffix; /* post-processor template */
    /* SentencePiece */
    kmed__tok_trie user;                   /* USER_DEFINED pieces */
    int spm_dummy, spm_rm_ws, spm_escape, spm_suffix;
    unsigned char *charsmap; size_t charsmap_len; /* precompiled_charsmap copy */
    const uint32_t *darts; size_t n_darts; /* into charsmap */
    const char *nblob; size_t nblob_len;   /* normalised strings, into charsmap */
    char *unk_surface;
} kmed__tok_impl;

/* ---- small helpers ---- */

static uint32_t kmed__tok_hash(const void *s, size_t n, uint32_t h)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i;
    for (i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u; /* FNV-1a, chainable over parts */
    return h;
}
#define KMED__TOK_H0 2166136261u

/* Length of the valid UTF-8 character at s[0..n) and its code point, or 0 if invalid
   (overlong, surrogate, above U+10FFFF or truncated). */
static size_t kmed__tok_utf8(const unsigned char *s, size_t n, uint32_t *cp)
{
    uint32_t c;
    if (n == 0) return 0;
    c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    if ((c & 0xE0) == 0xC0) {
        if (n < 2 || (s[1] & 0xC0) != 0x80) return 0;
        c = ((c & 0x1F) << 6) | (s[1] & 0x3F);
        if (c < 0x80) return 0;
        *cp = c; return 2;
    }
    if ((c & 0xF0) == 0xE0) {
        if (n < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        c = ((c & 0x0F) << 12) | ((uint32_t)(s[1] & 0x3F) << 6) | (s[2] & 0x3F);
        if (c < 0x800 || (c >= 0xD800 && c < 0xE000)) return 0;
        *cp = c; return 3;
    }
    if ((c & 0xF8) == 0xF0) {
        if (n < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
            return 0;
        c = ((c & 0x07) << 18) | ((uint32_t)(s[1] & 0x3F) << 12) |
            ((uint32_t)(s[2] & 0x3F) << 6) | (s[3] & 0x3F);
        if (c < 0x10000 || c > 0x10FFFF) return 0;
        *cp = c; return 4;
    }
    return 0;
}

/* Offset of the first invalid UTF-8 byte in s[0..n), or n if all valid. */
static size_t kmed__tok_utf8_check(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    uint32_t cp;
    while (i < n) {
        size_t k;
        if (p[i] < 0x80) { i++; continue; }
        k = kmed__tok_utf8(p + i, n - i, &cp);
        if (!k) return i;
        i += k;
    }
    return n;
}

/* Rust's char::is_whitespace (Unicode White_Space). */
static int kmed__tok_rust_space(uint32_t c)
{
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* Python's str.isspace() for one code point (what Jinja's `trim` strips). */
static int kmed__tok_py_space(uint32_t c)
{
    return kmed__tok_rust_space(c) || (c >= 0x1C && c <= 0x1F);
}

/* Appends s[0..n) to the pool; returns its offset or (size_t)-1 when out of memory. */
static size_t kmed__tok_pool_add(kmed__tok_impl *im, const char *s, size_t n)
{
    size_t off = im->pool_len;
    if (n + 1 > im->pool_cap - im->pool_len) {
        size_t cap = im->pool_cap ? im->pool_cap : 1 << 16;
        char *p;
        while (n + 1 > cap - im->pool_len) {
            if (cap > ((size_t)1 << 31)) return (size_t)-1; /* offsets are 32-bit */
            cap *= 2;
        }
        p = (char *)KMED_REALLOC(im->pool, cap);
        if (!p) return (size_t)-1;
        im->pool = p;
        im->pool_cap = cap;
    }
    if (n) memcpy(im->pool + off, s, n);
    im->pool[off + n] = 0;
    im->pool_len += n + 1;
    return off;
}

/* Sets the piece text of id (the string decode and kmed_tok_piece use). */
static int kmed__tok_set_piece(kmed__tok_impl *im, int id, const char *s, size_t n)
{
    size_t off = kmed__tok_pool_add(im, s, n);
    if (off == (size_t)-1) return 0;
    im->poff[id] = (uint32_t)off;
    im->plen[id] = (uint32_t)n;
    return 1;
}

/* ---- piece -> id table ---- */

static int kmed__tok_vinit(kmed__tok_impl *im, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2; /* load <= 0.5 keeps probes short */
    im->vs = (kmed__tok_vslot *)KMED_MALLOC(cap * sizeof *im->vs);
    if (!im->vs) return 0;
    memset(im->vs, 0xFF, cap * sizeof *im->vs); /* id -1: empty */
    im->vmask = cap - 1;
    return 1;
}

/* Id of the model piece a||b (b may be empty), or -1. */
static int kmed__tok_vfind2(const kmed__tok_impl *im, const char *a, size_t alen, const char *b,
                            size_t blen)
{
    uint32_t h = kmed__tok_hash(b, blen, kmed__tok_hash(a, alen, KMED__TOK_H0));
    size_t i = h & im->vmask;
    if (!im->vs) return -1;
    for (;;) {
        const kmed__tok_vslot *v = &im->vs[i];
        if (v->id < 0) return -1;
        if (v->hash == h && v->len == alen + blen) {
            const char *p = im->pool + v->off;
            if (!memcmp(p, a, alen) && (!blen || !memcmp(p + alen, b, blen))) return v->id;
        }
        i = (i + 1) & im->vmask;
    }
}

static int kmed__tok_vfind(const kmed__tok_impl *im, const char *s, size_t n)
{
    return kmed__tok_vfind2(im, s, n, "", 0);
}

/* Adds the pool string at off (n bytes) -> id. Returns 1, or -1 if the piece was present
   (the earlier id is kept when keep_first, else replaced). */
static int kmed__tok_vput(kmed__tok_impl *im, size_t off, size_t n, int id, int keep_first)
{
    const char *s = im->pool + off;
    uint32_t h = kmed__tok_hash(s, n, KMED__TOK_H0);
    size_t i = h & im->vmask;
    for (;;) {
        kmed__tok_vslot *v = &im->vs[i];
        if (v->id < 0) break;
        if (v->hash == h && v->len == n && !memcmp(im->pool + v->off, s, n)) {
            if (!keep_first) v->id = id;
            return -1;
        }
        i = (i + 1) & im->vmask;
    }
    im->vs[i].hash = h;
    im->vs[i].len = (uint32_t)n;
    im->vs[i].off = (uint32_t)off;
    im->vs[i].id = id;
    return 1;
}

/* ---- merge table ---- */

static size_t kmed__tok_mslot_of(const kmed__tok_impl *im, uint64_t pair)
{
    return (size_t)((pair * 0x9E3779B97F4A7C15ull) >> im->mshift);
}

static uint64_t kmed__tok_pair(const kmed__tok_impl *im, int a, int b)
{
    return ((uint64_t)(uint32_t)a << im->id_bits) | (uint32_t)b;
}

/* Rank of the merge of ids (a, b), or -1. */
static int kmed__tok_mfind(const kmed__tok_impl *im, int a, int b)
{
    uint64_t pair = kmed__tok_pair(im, a, b);
    size_t i = kmed__tok_mslot_of(im, pair);
    for (;;) {
        uint64_t m = im->ms[i];
        if ((m >> im->rank_bits) == pair && m != KMED__TOK_MEMPTY)
            return (int)(m & (((uint64_t)1 << im->rank_bits) - 1));
        if (m == KMED__TOK_MEMPTY) return -1;
        i = (i + 1) & im->mmask;
    }
}

/* A later duplicate pair replaces the earlier one, as HF's HashMap collect does. */
static void kmed__tok_madd(kmed__tok_impl *im, int a, int b, int rank, int id)
{
    uint64_t pair = kmed__tok_pair(im, a, b);
    size_t i = kmed__tok_mslot_of(im, pair);
    im->merge_id[rank] = id;
    for (;;) {
        uint64_t m = im->ms[i];
        if (m == KMED__TOK_MEMPTY || (m >> im->rank_bits) == pair) {
            im->ms[i] = (pair << im->rank_bits) | (uint64_t)rank;
            return;
        }
        i = (i + 1) & im->mmask;
    }
}

/* ---- trie ---- */

static int kmed__tok_trie_node(kmed__tok_trie *t, unsigned char byte)
{
    if (t->n == t->cap) {
        int cap = t->cap ? t->cap * 2 : 256;
        int32_t *c = (int32_t *)KMED_REALLOC(t->child, (size_t)cap * sizeof *c);
        int32_t *s, *d;
        unsigned char *b;
        if (!c) return -1;
        t->child = c;
        s = (int32_t *)KMED_REALLOC(t->sibling, (size_t)cap * sizeof *s);
        if (!s) return -1;
        t->sibling = s;
        d = (int32_t *)KMED_REALLOC(t->id, (size_t)cap * sizeof *d);
        if (!d) return -1;
        t->id = d;
        b = (unsigned char *)KMED_REALLOC(t->byte, (size_t)cap);
        if (!b) return -1;
        t->byte = b;
        t->cap = cap;
    }
    t->child[t->n] = -1;
    t->sibling[t->n] = -1;
    t->id[t->n] = -1;
    t->byte[t->n] = byte;
    return t->n++;
}

/* Adds s[0..n) -> id (n > 0); a repeated string takes the new id. 0 when out of memory. */
static int kmed__tok_trie_add(kmed__tok_trie *t, const char *s, size_t n, int id)
{
    int node;
    size_t i;
    if (t->n == 0 && kmed__tok_trie_node(t, 0) < 0) return 0;
    node = 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int k = t->child[node];
        while (k >= 0 && t->byte[k] != c) k = t->sibling[k];
        if (k < 0) {
            k = kmed__tok_trie_node(t, c);
            if (k < 0) return 0;
            t->sibling[k] = t->child[node];
            t->child[node] = k;
        }
        node = k;
    }
    t->id[node] = id;
    t->first[(unsigned char)s[0]] = 1;
    return 1;
}

/* Longest entry that is a prefix of s[0..n): its length (0: none) and *id. */
static size_t kmed__tok_trie_longest(const kmed__tok_trie *t, const char *s, size_t n, int *id)
{
    size_t i, best = 0;
    int node = 0;
    if (t->n == 0) return 0;
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int k = t->child[node];
        while (k >= 0 && t->byte[k] != c) k = t->sibling[k];
        if (k < 0) break;
        node = k;
        if (t->id[node] >= 0) { best = i + 1; *id = t->id[node]; }
    }
    return best;
}

static void kmed__tok_trie_free(kmed__tok_trie *t)
{
    KMED_FREE(t->child);
    KMED_FREE(t->sibling);
    KMED_FREE(t->id);
    KMED_FREE(t->byte);
    memset(t, 0, sizeof *t);
}

/* ---- encode scratch: symbols, candidate heap, text buffers ---- */

/* A symbol of the word being merged: a span of the text with its id. */
typedef struct kmed__tok_sym { int32_t id, prev, next; uint32_t len; } kmed__tok_sym;
/* A candidate merge of symbol `pos` with its next: key = (rank or inverted score) << 32 |
   pos, so the smallest key is the merge to do first; len = the two spans' total, which
   tells a stale entry (a side changed since) from a live one. */
typedef struct kmed__tok_cand { uint64_t key; int32_t id; uint32_t len; } kmed__tok_cand;

typedef struct kmed__tok_work {
    kmed__tok_sym *sym; size_t sym_cap;
    kmed__tok_cand *heap; size_t heap_n, heap_cap;
    char *norm; size_t norm_cap;   /* normalised segment */
    char *norm2; size_t norm2_cap; /* normaliser ping-pong buffer */
    /* output */
    int *ids; size_t cap, count, limit; /* limit: content ids allowed */
    int full;                           /* limit reached: stop */
    int32_t *unused; size_t n_unused, unused_cap; /* SentencePiece: (id, left len) pairs */
    int prev_unk;                       /* SentencePiece: the last id emitted was <unk> */
} kmed__tok_work;

static void kmed__tok_work_free(kmed__tok_work *w)
{
    KMED_FREE(w->sym);
    KMED_FREE(w->heap);
    KMED_FREE(w->norm);
    KMED_FREE(w->norm2);
    KMED_FREE(w->unused);
}

/* Grows *p (elements of size `size`) to hold at least n; 0 when out of memory. */
static int kmed__tok_grow(void *pp, size_t *cap, size_t n, size_t size)
{
    void **p = (void **)pp;
    size_t c = *cap ? *cap : 64, bytes;
    void *q;
    if (n <= *cap) return 1;
    while (c < n) {
        if (c > ((size_t)-1) / 4) return 0;
        c *= 2;
    }
    if (!kmed__mul_ok(c, size, &bytes)) return 0;
    q = KMED_REALLOC(*p, bytes);
    if (!q) return 0;
    *p = q;
    *cap = c;
    return 1;
}

static void kmed__tok_emit(kmed__tok_work *w, int id)
{
    if (w->count >= w->limit) { w->full = 1; return; }
    if (w->count < w->cap) w->ids[w->count] = id;
    w->count++;
}

static void kmed__tok_heap_push(kmed__tok_work *w, kmed__tok_cand c)
{
    size_t i = w->heap_n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (w->heap[parent].key <= c.key) break;
        w->heap[i] = w->heap[parent];
        i = parent;
    }
    w->heap[i] = c;
}

static void kmed__tok_heap_down(kmed__tok_cand *h, size_t n, size_t i)
{
    kmed__tok_cand c = h[i];
    for (;;) {
        size_t k = 2 * i + 1;
        if (k >= n) break;
        if (k + 1 < n && h[k + 1].key < h[k].key) k++;
        if (c.key <= h[k].key) break;
        h[i] = h[k];
        i = k;
    }
    h[i] = c;
}

static kmed__tok_cand kmed__tok_heap_pop(kmed__tok_work *w)
{
    kmed__tok_cand top = w->heap[0];
    w->heap[0] = w->heap[--w->heap_n];
    if (w->heap_n) kmed__tok_heap_down(w->heap, w->heap_n, 0);
    return top;
}

static void kmed__tok_heapify(kmed__tok_work *w)
{
    size_t i = w->heap_n / 2;
    while (i-- > 0) kmed__tok_heap_down(w->heap, w->heap_n, i);
}

/* ---- HF BPE over one word ---- */

/* Pushes the candidate merge of symbol i with its next, if the pair has a merge. */
static void kmed__tok_hf_cand(const kmed__tok_impl *im, kmed__tok_work *w, int i)
{
    const kmed__tok_sym *s = w->sym;
    kmed__tok_cand c;
    int rank;
    if (i < 0 || s[i].next < 0) return;
    rank = kmed__tok_mfind(im, s[i].id, s[s[i].next].id);
    if (rank < 0) return;
    c.key = ((uint64_t)(uint32_t)rank << 32) | (uint32_t)i;
    c.id = im->merge_id[rank];
    c.len = s[i].len + s[s[i].next].len;
    kmed__tok_heap_push(w, c);
}

/* BPE of word[0..n) (valid UTF-8) as HF's BPE model does it: characters (or their byte
   pieces, or fused <unk>) merged lowest rank first, leftmost first among equal ranks. */
static int kmed__tok_hf_word(const kmed__tok_impl *im, int unk_id, kmed__tok_work *w,
                             const char *word, size_t n)
{
    const unsigned char *p = (const unsigned char *)word;
    kmed__tok_sym *s;
    size_t i = 0, ns = 0;
    int unk_pending = 0;
    uint32_t unk_len = 0;
    int k;
    if (n == 0) return 1;
    if (im->ignore_merges) {
        int id = kmed__tok_vfind(im, word, n);
        if (id >= 0) { kmed__tok_emit(w, id); return 1; }
    }
    if (!kmed__tok_grow(&w->sym, &w->sym_cap, n, sizeof *w->sym)) return 0;
    s = w->sym;
    while (i < n) {
        uint32_t cp = p[i];
        size_t clen = 1;
        int32_t id;
        if (cp >= 0x80) clen = kmed__tok_utf8(p + i, n - i, &cp);
        KMED_ASSERT(clen > 0);
        id = im->char_id[cp];
        if (id >= 0) {
            if (unk_pending) {
                s[ns].id = unk_id;
                s[ns++].len = unk_len;
                unk_pending = 0;
            }
            s[ns].id = id;
            s[ns++].len = (uint32_t)clen;
        } else {
            size_t b;
            int ok = im->byte_fallback;
            for (b = 0; ok && b < clen; b++) ok = im->byte_id[p[i + b]] >= 0;
            if (ok) {
                /* HF adds byte pieces without flushing a pending <unk> first; kept. */
                for (b = 0; b < clen; b++) {
                    s[ns].id = im->byte_id[p[i + b]];
                    s[ns++].len = 1;
                }
            } else if (unk_id >= 0) {
                if (unk_pending && !im->fuse_unk) {
                    s[ns].id = unk_id;
                    s[ns++].len = unk_len;
                    unk_pending = 0;
                }
                if (unk_pending) unk_len += (uint32_t)clen;
                else { unk_pending = 1; unk_len = (uint32_t)clen; }
            } /* no unk token: HF drops the character */
        }
        i += clen;
    }
    if (unk_pending) {
        s[ns].id = unk_id;
        s[ns++].len = unk_len;
    }
    if (ns == 0) return 1;
    for (k = 0; k < (int)ns; k++) {
        s[k].prev = k - 1;
        s[k].next = k + 1 < (int)ns ? k + 1 : -1;
    }
    /* All first candidates at once, then an O(n) heapify. */
    if (!kmed__tok_grow(&w->heap, &w->heap_cap, 2 * ns + 8, sizeof *w->heap)) return 0;
    w->heap_n = 0;
    for (k = 0; k + 1 < (int)ns; k++) {
        int rank;
#if defined(__GNUC__)
        /* The table is bigger than L2: fetch the slot a few pairs ahead. */
        if (k + 9 < (int)ns)
            __builtin_prefetch(&im->ms[kmed__tok_mslot_of(im, kmed__tok_pair(im, s[k + 8].id,
                                                                             s[k + 9].id))]);
#endif
        rank = kmed__tok_mfind(im, s[k].id, s[k + 1].id);
        if (rank >= 0) {
            kmed__tok_cand *c = &w->heap[w->heap_n++];
            c->key = ((uint64_t)(uint32_t)rank << 32) | (uint32_t)k;
            c->id = im->merge_id[rank];
            c->len = s[k].len + s[k + 1].len;
        }
    }
    kmed__tok_heapify(w);
    while (w->heap_n) {
        kmed__tok_cand c = kmed__tok_heap_pop(w);
        int a = (int)(uint32_t)c.key, b;
        if (s[a].len == 0 || s[a].next < 0) continue;
        b = s[a].next;
        if (s[a].len + s[b].len != c.len) continue; /* stale: a side changed since */
        s[a].id = c.id;
        s[a].len = c.len;
        s[a].next = s[b].next;
        if (s[b].next >= 0) s[s[b].next].prev = a;
        s[b].len = 0;
        /* Each merge adds at most two candidates, so the heap stays within 2 * ns + 8. */
        if (w->heap_n + 2 > w->heap_cap &&
            !kmed__tok_grow(&w->heap, &w->heap_cap, w->heap_n + 2, sizeof *w->heap))
            return 0;
        kmed__tok_hf_cand(im, w, s[a].prev);
        kmed__tok_hf_cand(im, w, a);
    }
    for (k = 0; k >= 0 && !w->full; k = s[k].next) kmed__tok_emit(w, s[k].id);
    return 1;
}

/* ---- HF pipeline: normalizer, added tokens, pre-tokenizer ---- */

/* Next occurrence of pat[0..m) in s[from..n), or n. */
static size_t kmed__tok_find(const char *s, size_t n, size_t from, const char *pat, size_t m)
{
    while (from + m <= n) {
        const char *p = (const char *)memchr(s + from, pat[0], n - from - m + 1);
        if (!p) break;
        from = (size_t)(p - s);
        if (!memcmp(p + 1, pat + 1, m - 1)) return from;
        from++;
    }
    return n;
}

/* Replaces every non-overlapping pat in s[0..n) (left to right) by rep into out. */
static int kmed__tok_replace(const char *s, size_t n, const kmed__tok_op *op, char **out,
                             size_t *out_cap, size_t *out_len)
{
    size_t i = 0, o = 0, need;
    /* Worst case every byte is a match of a 1-byte pattern. */
    if (!kmed__mul_ok(n, op->blen > op->alen ? op->blen : op->alen, &need)) return 0;
    if (!kmed__tok_grow(out, out_cap, need + op->alen + 1, 1)) return 0;
    while (i < n) {
        size_t m = kmed__tok_find(s, n, i, op->a, op->alen);
        memcpy(*out + o, s + i, m - i);
        o += m - i;
        if (m == n) break;
        memcpy(*out + o, op->b, op->blen);
        o += op->blen;
        i = m + op->alen;
    }
    *out_len = o;
    return 1;
}

/* Applies the normalizer steps to s[0..n); *res points at s or into w's buffers. */
static int kmed__tok_normalize(const kmed__tok_impl *im, kmed__tok_work *w, const char *s,
                               size_t n, const char **res, size_t *res_len)
{
    int k, flip = 0;
    for (k = 0; k < im->n_norm; k++) {
        const kmed__tok_op *op = &im->norm[k];
        char **dst = flip ? &w->norm2 : &w->norm;
        size_t *dcap = flip ? &w->norm2_cap : &w->norm_cap, olen = 0;
        if (op->op == KMED__TOK_OP_REPLACE) {
            if (!kmed__tok_replace(s, n, op, dst, dcap, &olen)) return 0;
        } else { /* PREPEND: only to a non-empty string, as HF does */
            if (n == 0) continue;
            if (!kmed__tok_grow(dst, dcap, n + op->alen + 1, 1)) return 0;
            memcpy(*dst, op->a, op->alen);
            memcpy(*dst + op->alen, s, n);
            olen = n + op->alen;
        }
        s = *dst;
        n = olen;
        flip = !flip;
    }
    *res = s;
    *res_len = n;
    return 1;
}

/* The HF pre-tokenizer steps from step k on, then BPE of each resulting word. */
static int kmed__tok_hf_pre(const kmed__tok_impl *im, int unk_id, kmed__tok_work *w,
                            const char *s, size_t n, int k)
{
    const kmed__tok_op *op;
    size_t i = 0, start = 0;
    if (n == 0 || w->full) return 1;
    if (k == im->n_pre) return kmed__tok_hf_word(im, unk_id, w, s, n);
    op = &im->pre[k];
    /* Split: each match is removed, isolated or glued to a neighbour; empty parts vanish. */
    while (i < n) {
        size_t ms = kmed__tok_find(s, n, i, op->a, op->alen), me;
        if (ms == n) break;
        me = ms + op->alen;
        if (op->arg1 == KMED__TOK_SPLIT_CONTIGUOUS)
            while (n - me >= op->alen && !memcmp(s + me, op->a, op->alen)) me += op->alen;
        switch (op->arg1) {
        case KMED__TOK_SPLIT_REMOVED:
            if (!kmed__tok_hf_pre(im, unk_id, w, s + start, ms - start, k + 1)) return 0;
            start = me;
            break;
        case KMED__TOK_SPLIT_PREV:
            if (!kmed__tok_hf_pre(im, unk_id, w, s + start, me - start, k + 1)) return 0;
            start = me;
            break;
        case KMED__TOK_SPLIT_NEXT:
            if (!kmed__tok_hf_pre(im, unk_id, w, s + start, ms - start, k + 1)) return 0;
            start = ms;
            break;
        default: /* ISOLATED, CONTIGUOUS */
            if (!kmed__tok_hf_pre(im, unk_id, w, s + start, ms - start, k + 1)) return 0;
            if (!kmed__tok_hf_pre(im, unk_id, w, s + ms, me - ms, k + 1)) return 0;
            start = me;
            break;
        }
        i = me;
    }
    return kmed__tok_hf_pre(im, unk_id, w, s + start, n - start, k + 1);
}

/* Code point ending at s[0..end) (valid UTF-8), or -1 at the start. */
static long kmed__tok_cp_before(const char *s, size_t end)
{
    size_t b = end;
    uint32_t cp;
    if (end == 0) return -1;
    while (b > 0 && ((unsigned char)s[b - 1] & 0xC0) == 0x80) b--;
    if (b > 0) b--;
    if (!kmed__tok_utf8((const unsigned char *)s + b, end - b, &cp)) return -1;
    return (long)cp;
}

static int kmed__tok_wordchar(long cp)
{
    /* HF tests char::is_alphanumeric; beyond ASCII, any non-space character counts. */
    if (cp < 0) return 0;
    if (cp < 0x80) return (cp >= '0' && cp <= '9') || ((cp | 32) >= 'a' && (cp | 32) <= 'z');
    return !kmed__tok_rust_space((uint32_t)cp);
}

/* Next added-token match in s[from..n), leftmost-longest with HF's lstrip / rstrip /
   single_word rules. Returns 0 if none; else the cut [*ms, *me) and *id. */
static int kmed__tok_added_next(const kmed__tok_impl *im, const kmed__tok_trie *t,
                                const char *s, size_t n, size_t from, size_t *ms, size_t *me,
                                int *id)
{
    size_t i = from;
    if (t->n == 0) return 0;
    while (i < n) {
        size_t len, start, stop;
        uint32_t cp;
        if (!t->first[(unsigned char)s[i]]) { i++; continue; }
        len = kmed__tok_trie_longest(t, s + i, n - i, id);
        if (!len) { i++; continue; }
        start = i;
        stop = i + len;
        if (im->flags[*id] & KMED__TOK_F_SWORD) {
            size_t k = kmed__tok_utf8((const unsigned char *)s + stop, n - stop, &cp);
            if (kmed__tok_wordchar(kmed__tok_cp_before(s, start)) ||
                (k && kmed__tok_wordchar((long)cp))) {
                i = stop; /* the matcher moves past a discarded match */
                continue;
            }
        }
        if (im->flags[*id] & KMED__TOK_F_LSTRIP) {
            while (start > from) {
                size_t b = start - 1;
                while (b > from && ((unsigned char)s[b] & 0xC0) == 0x80) b--;
                if (!kmed__tok_utf8((const unsigned char *)s + b, start - b, &cp) ||
                    !kmed__tok_rust_space(cp))
                    break;
                start = b;
            }
        }
        if (im->flags[*id] & KMED__TOK_F_RSTRIP) {
            for (;;) {
                size_t k = kmed__tok_utf8((const unsigned char *)s + stop, n - stop, &cp);
                if (!k || !kmed__tok_rust_space(cp)) break;
                stop += k;
            }
        }
        *ms = start;
        *me = stop;
        return 1;
    }
    return 0;
}

/* One piece of raw text between raw added tokens: normalise, cut at normalised added
   tokens, pre-tokenize, BPE. */
static int kmed__tok_hf_segment(const kmed__tok_impl *im, int unk_id, kmed__tok_work *w,
                                const char *seg, size_t n)
{
    const char *s;
    size_t len, pos = 0, ms, me;
    int id;
    if (n == 0) return 1;
    if (!kmed__tok_normalize(im, w, seg, n, &s, &len)) return 0;
    while (pos < len && !w->full &&
           kmed__tok_added_next(im, &im->norm_added, s, len, pos, &ms, &me, &id)) {
        if (!kmed__tok_hf_pre(im, unk_id, w, s + pos, ms - pos, 0)) return 0;
        kmed__tok_emit(w, id);
        pos = me;
    }
    return kmed__tok_hf_pre(im, unk_id, w, s + pos, len - pos, 0);
}

static int kmed__tok_hf_encode(const kmed_tok *tok, kmed__tok_work *w, const char *text,
                               size_t len)
{
    const kmed__tok_impl *im = (const kmed__tok_impl *)tok->impl_;
    size_t pos = 0, ms, me;
    int id;
    while (pos < len && !w->full &&
           kmed__tok_added_next(im, &im->raw_added, text, len, pos, &ms, &me, &id)) {
        if (!kmed__tok_hf_segment(im, tok->unk_id, w, text + pos, ms - pos)) return 0;
        kmed__tok_emit(w, id);
        pos = me;
    }
    if (w->full) return 1;
    return kmed__tok_hf_segment(im, tok->unk_id, w, text + pos, len - pos);
}

/* ---- SentencePiece: normaliser and BPE ---- */

/* Longest rule of the precompiled charsmap (a darts-clone double array) that is a prefix
   of s[0..n): its length (0: none) and the replacement (NUL-terminated in the blob). */
static size_t kmed__tok_charsmap(const kmed__tok_impl *im, const unsigned char *s, size_t n,
                                 const char **rep)
{
    size_t i, best = 0;
    uint32_t pos = 0, unit;
    if (!im->n_darts) return 0;
    unit = im->darts[0];
    pos ^= (unit >> 10) << ((unit & (1u << 9)) >> 6);
    for (i = 0; i < n; i++) {
        pos ^= s[i];
        if (pos >= im->n_darts) return best;
        unit = im->darts[pos];
        if ((unit & ((1u << 31) | 0xFF)) != s[i]) return best;
        pos ^= (unit >> 10) << ((unit & (1u << 9)) >> 6);
        if (pos >= im->n_darts) return best;
        if ((unit >> 8) & 1) {
            uint32_t v = im->darts[pos] & 0x7FFFFFFFu;
            if (v < im->nblob_len && memchr(im->nblob + v, 0, im->nblob_len - v)) {
                best = i + 1;
                *rep = im->nblob + v;
            }
        }
    }
    return best;
}

/* SentencePiece's normalize_prefix: consumes a prefix of s[0..n) (returned) and gives its
   normalised text in *out (*out_len bytes): a user-defined piece verbatim, else the charsmap's
   longest rule, else one character; an invalid byte becomes U+FFFD. */
static size_t kmed__tok_spm_prefix(const kmed__tok_impl *im, const char *s, size_t n,
                                   const char **out, size_t *out_len)
{
    const char *rep = NULL;
    size_t k;
    int id;
    uint32_t cp;
    k = kmed__tok_trie_longest(&im->user, s, n, &id);
    if (k) { *out = s; *out_len = k; return k; }
    k = kmed__tok_charsmap(im, (const unsigned char *)s, n, &rep);
    if (k) { *out = rep; *out_len = strlen(rep); return k; }
    k = kmed__tok_utf8((const unsigned char *)s, n, &cp);
    if (!k) { *out = "\xEF\xBF\xBD"; *out_len = 3; return 1; }
    *out = s;
    *out_len = k;
    return k;
}

/* SentencePiece's Normalizer::Normalize into w->norm. */
static int kmed__tok_spm_normalize(const kmed__tok_impl *im, kmed__tok_work *w, const char *s,
                                   size_t n, size_t *out_len)
{
    const char *sp;
    size_t splen, pos = 0, o = 0, need;
    const char *ws = im->spm_escape ? "\xE2\x96\x81" : " ";
    size_t wslen = im->spm_escape ? 3 : 1;
    int prev_space;
    *out_len = 0;
    /* A charsmap rule may expand a byte to many; grow as we go, reserving for the worst. */
    if (im->spm_rm_ws) {
        while (pos < n) {
            size_t k = kmed__tok_spm_prefix(im, s + pos, n - pos, &sp, &splen);
            if (splen != 1 || sp[0] != ' ') break;
            pos += k;
        }
    }
    if (pos == n) return 1;
    if (!kmed__mul_ok(n, 3, &need) || !kmed__tok_grow(&w->norm, &w->norm_cap, need + 16, 1))
        return 0;
    if (im->spm_dummy && !im->spm_suffix) { memcpy(w->norm, ws, wslen); o = wslen; }
    prev_space = im->spm_rm_ws;
    while (pos < n) {
        size_t k = kmed__tok_spm_prefix(im, s + pos, n - pos, &sp, &splen), j;
        while (prev_space && splen && sp[0] == ' ') { sp++; splen--; }
        if (splen) {
            if (!kmed__tok_grow(&w->norm, &w->norm_cap, o + 3 * splen + 16, 1)) return 0;
            for (j = 0; j < splen; j++) {
                if (im->spm_escape && sp[j] == ' ') {
                    memcpy(w->norm + o, "\xE2\x96\x81", 3);
                    o += 3;
                } else {
                    w->norm[o++] = sp[j];
                }
            }
            prev_space = sp[splen - 1] == ' ';
        }
        pos += k;
        if (!im->spm_rm_ws) prev_space = 0;
    }
    if (im->spm_rm_ws)
        while (o >= wslen && !memcmp(w->norm + o - wslen, ws, wslen)) o -= wslen;
    if (im->spm_dummy && im->spm_suffix) {
        if (!kmed__tok_grow(&w->norm, &w->norm_cap, o + 4, 1)) return 0;
        memcpy(w->norm + o, ws, wslen);
        o += wslen;
    }
    *out_len = o;
    return 1;
}

#define KMED__TOK_FREEZE 0x80000000u /* symbol len bit: a user-defined piece, never merged */
#define KMED__TOK_SPM_MERGEABLE (KMED__TOK_F_NORMAL | KMED__TOK_F_USER | KMED__TOK_F_UNUSED)

/* Scores as sortable keys: larger score -> smaller key. */
static uint32_t kmed__tok_score_key(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* ascending with f */
    return ~u;
}

/* SentencePiece's MaybeAddNewSymbolPair; in SentencePiece symbols, id holds the start. */
static int kmed__tok_spm_cand(const kmed__tok_impl *im, kmed__tok_work *w, int l)
{
    const kmed__tok_sym *s = w->sym;
    uint32_t ll, rl;
    int r, id;
    kmed__tok_cand c;
    if (l < 0 || (r = s[l].next) < 0) return 1;
    if ((s[l].len | s[r].len) & KMED__TOK_FREEZE) return 1;
    ll = s[l].len;
    rl = s[r].len;
    id = kmed__tok_vfind(im, w->norm + s[l].id, ll + rl);
    if (id < 0 || !(im->flags[id] & KMED__TOK_SPM_MERGEABLE)) return 1;
    c.key = ((uint64_t)kmed__tok_score_key(im->score[id]) << 32) | (uint32_t)l;
    c.id = id;
    c.len = ll + rl;
    if (!kmed__tok_grow(&w->heap, &w->heap_cap, w->heap_n + 1, sizeof *w->heap)) return 0;
    kmed__tok_heap_push(w, c);
    if (im->flags[id] & KMED__TOK_F_UNUSED) {
        if (!kmed__tok_grow(&w->unused, &w->unused_cap, w->n_unused + 2, sizeof *w->unused))
            return 0;
        w->unused[w->n_unused++] = id;
        w->unused[w->n_unused++] = (int32_t)ll;
    }
    return 1;
}

/* Emits the ids of w->norm[start..start+len): an UNUSED piece is split back into the two
   pieces that made it (SentencePiece's resegment), an unknown one into byte pieces. */
static void kmed__tok_spm_out(const kmed_tok *tok, const kmed__tok_impl *im, kmed__tok_work *w,
                              size_t start, size_t len, int depth)
{
    int id = kmed__tok_vfind(im, w->norm + start, len);
    size_t i;
    if (id >= 0 && (im->flags[id] & KMED__TOK_F_UNUSED) && depth < 64) {
        for (i = w->n_unused; i >= 2; i -= 2) {
            if (w->unused[i - 2] == id) {
                size_t ll = (size_t)w->unused[i - 1];
                kmed__tok_spm_out(tok, im, w, start, ll, depth + 1);
                kmed__tok_spm_out(tok, im, w, start + ll, len - ll, depth + 1);
                return;
            }
        }
    }
    if (id < 0) id = tok->unk_id;
    if (id == tok->unk_id && im->byte_fallback) {
        for (i = 0; i < len; i++) {
            int b = im->byte_id[(unsigned char)w->norm[start + i]];
            kmed__tok_emit(w, b >= 0 ? b : tok->unk_id);
        }
        return;
    }
    /* SentencePiece merges a run of unknown pieces into one <unk>. */
    if (id == tok->unk_id && w->prev_unk) return;
    w->prev_unk = id == tok->unk_id;
    kmed__tok_emit(w, id);
}

static int kmed__tok_spm_encode(const kmed_tok *tok, kmed__tok_work *w, const char *text,
                                size_t len)
{
    static const unsigned char one_char_len[16] = {1, 1, 1, 1, 1, 1, 1, 1,
                                                   1, 1, 1, 1, 2, 2, 3, 4};
    const kmed__tok_impl *im = (const kmed__tok_impl *)tok->impl_;
    kmed__tok_sym *s;
    size_t n, pos = 0, ns = 0;
    int k;
    if (!kmed__tok_spm_normalize(im, w, text, len, &n)) return 0;
    if (n == 0) return 1;
    if (n >= KMED__TOK_FREEZE) return 0;
    if (!kmed__tok_grow(&w->sym, &w->sym_cap, n, sizeof *w->sym)) return 0;
    s = w->sym;
    while (pos < n) {
        int id;
        size_t k2 = kmed__tok_trie_longest(&im->user, w->norm + pos, n - pos, &id);
        uint32_t freeze = k2 ? KMED__TOK_FREEZE : 0;
        if (!k2) {
            k2 = one_char_len[(unsigned char)w->norm[pos] >> 4];
            if (k2 > n - pos) k2 = n - pos;
        }
        s[ns].id = (int32_t)pos;
        s[ns].len = (uint32_t)k2 | freeze;
        s[ns].prev = (int32_t)ns - 1;
        s[ns].next = pos + k2 < n ? (int32_t)ns + 1 : -1;
        ns++;
        pos += k2;
    }
    w->heap_n = 0;
    w->n_unused = 0;
    for (k = 0; k + 1 < (int)ns; k++)
        if (!kmed__tok_spm_cand(im, w, k)) return 0;
    while (w->heap_n) {
        kmed__tok_cand c = kmed__tok_heap_pop(w);
        int a = (int)(uint32_t)c.key, b = s[a].next;
        if (s[a].len == 0 || b < 0 || s[b].len == 0 || s[a].len + s[b].len != c.len) continue;
        s[a].len = c.len;
        s[a].next = s[b].next;
        if (s[b].next >= 0) s[s[b].next].prev = a;
        s[b].len = 0;
        if (!kmed__tok_spm_cand(im, w, s[a].prev) || !kmed__tok_spm_cand(im, w, a)) return 0;
    }
    for (k = 0; k >= 0 && !w->full; k = s[k].next)
        kmed__tok_spm_out(tok, im, w, (size_t)s[k].id, s[k].len & ~KMED__TOK_FREEZE, 0);
    return 1;
}

/* ---- encode ---- */

KMED_API kmed_result kmed_tok_encode(const kmed_tok *tok, const kmed_tok_config *cfg,
                                     const char *text, size_t len, int *ids, size_t cap,
                                     size_t *n, kmed_error *err)
{
    static const kmed_tok_config defaults = {0, 0, 0};
    const kmed__tok_impl *im;
    kmed__tok_work w;
    size_t n_special, i;
    int suffix[9], n_suffix = 0, ok;
    if (n) *n = 0;
    if (!tok || !tok->impl_ || !n || (!text && len) || (!ids && cap))
        return KMED__ERR(err, KMED_ERR_ARG, "kmed_tok_encode: bad arguments");
    if (!cfg) cfg = &defaults;
    im = (const kmed__tok_impl *)tok->impl_;
    if (len >= KMED__TOK_FREEZE / 4)
        return KMED__ERR(err, KMED_ERR_LIMIT, "text of %zu bytes is too long to encode", len);
    if (tok->kind == KMED_TOK_HF_BPE) {
        size_t bad = kmed__tok_utf8_check(text, len);
        if (bad < len)
            return kmed_error_set(err, KMED_ERR_FORMAT, NULL, 0, bad,
                                  "text is not valid UTF-8 (byte 0x%02X)",
                                  (unsigned)(unsigned char)text[bad]);
    }
    memset(&w, 0, sizeof w);
    w.ids = ids;
    w.cap = cap;
    w.limit = (size_t)-1;
    if (!cfg->no_bos) {
        for (i = 0; i < (size_t)im->n_suffix; i++) suffix[n_suffix++] = im->suffix[i];
        if (cfg->add_eos && tok->eos_id >= 0 &&
            !(n_suffix && suffix[n_suffix - 1] == tok->eos_id))
            suffix[n_suffix++] = tok->eos_id;
        for (i = 0; i < (size_t)im->n_prefix; i++) kmed__tok_emit(&w, im->prefix[i]);
    }
    n_special = w.count + (size_t)n_suffix;
    if (cfg->max_tokens)
        w.limit = w.count + (cfg->max_tokens > n_special ? cfg->max_tokens - n_special : 0);
    if (tok->kind == KMED_TOK_HF_BPE) ok = kmed__tok_hf_encode(tok, &w, text, len);
    else ok = kmed__tok_spm_encode(tok, &w, text, len);
    kmed__tok_work_free(&w);
    if (!ok) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory while encoding");
    w.limit = (size_t)-1;
    for (i = 0; i < (size_t)n_suffix; i++) kmed__tok_emit(&w, suffix[i]);
    *n = w.count;
    if (w.count > cap)
        return KMED__ERR(err, KMED_ERR_SPACE, "%zu ids do not fit in %zu", w.count, cap);
    return KMED_OK;
}

/* ---- decode ---- */

/* A list of strings: string i is text.data[off[i] .. off[i] + len[i]). */
typedef struct kmed__tok_strs { kmed_buf text; size_t *off, *len; size_t n, cap; } kmed__tok_strs;

static int kmed__tok_strs_add(kmed__tok_strs *l, const char *s, size_t n)
{
    size_t cap_len = l->cap;
    if (l->n == l->cap) {
        if (!kmed__tok_grow(&l->off, &l->cap, l->n + 1, sizeof *l->off)) return 0;
        if (!kmed__tok_grow(&l->len, &cap_len, l->n + 1, sizeof *l->len)) return 0;
    }
    l->off[l->n] = l->text.len;
    l->len[l->n] = n;
    l->n++;
    kmed_buf_put(&l->text, n ? s : "", n);
    return !l->text.failed;
}

static void kmed__tok_strs_free(kmed__tok_strs *l)
{
    kmed_buf_free(&l->text);
    KMED_FREE(l->off);
    KMED_FREE(l->len);
    memset(l, 0, sizeof *l);
}

/* The byte of an HF byte-fallback token "<0xXX>" (Rust's from_str_radix on the two
   characters, which also takes "+X"), or -1. */
static int kmed__tok_hf_byte(const char *s, size_t n)
{
    int v = 0, i;
    if (n != 6 || memcmp(s, "<0x", 3) || s[5] != '>') return -1;
    for (i = 3; i < 5; i++) {
        int c = (unsigned char)s[i], d;
        if (i == 3 && c == '+') continue;
        if (c >= '0' && c <= '9') d = c - '0';
        else if ((c | 32) >= 'a' && (c | 32) <= 'f') d = (c | 32) - 'a' + 10;
        else return -1;
        v = v * 16 + d;
    }
    return v;
}

/* One decoder step over the token list a, into b. */
static int kmed__tok_dec_step(const kmed__tok_op *op, const kmed__tok_strs *a, kmed__tok_strs *b,
                              kmed__tok_work *w)
{
    size_t i, j;
    if (op->op == KMED__TOK_OP_FUSE) {
        kmed_buf_put(&b->text, "", 0);
        if (!kmed__tok_strs_add(b, a->n ? a->text.data : "", a->n ? a->text.len : 0)) return 0;
        return 1;
    }
    if (op->op == KMED__TOK_OP_BYTEFALLBACK) {
        kmed_buf run = {0};
        int ok = 1;
        for (i = 0; i <= a->n && ok; i++) {
            int byte = i < a->n ? kmed__tok_hf_byte(a->text.data + a->off[i], a->len[i]) : -1;
            if (byte >= 0) { char c = (char)byte; kmed_buf_put(&run, &c, 1); continue; }
            if (run.len) {
                if (kmed__tok_utf8_check(run.data, run.len) == run.len) {
                    ok = kmed__tok_strs_add(b, run.data, run.len);
                } else {
                    /* Rust's String::from_utf8 failed: one U+FFFD per byte of the run. */
                    for (j = 0; j < run.len && ok; j++)
                        ok = kmed__tok_strs_add(b, "\xEF\xBF\xBD", 3);
                }
                run.len = 0;
            }
            if (i < a->n && ok) ok = kmed__tok_strs_add(b, a->text.data + a->off[i], a->len[i]);
        }
        ok = ok && !run.failed;
        kmed_buf_free(&run);
        return ok;
    }
    for (i = 0; i < a->n; i++) {
        const char *s = a->text.data + a->off[i];
        size_t n = a->len[i];
        if (op->op == KMED__TOK_OP_REPLACE) {
            size_t olen;
            if (!kmed__tok_replace(s, n, op, &w->norm, &w->norm_cap, &olen)) return 0;
            if (!kmed__tok_strs_add(b, w->norm, olen)) return 0;
        } else { /* STRIP: up to arg1 leading and arg2 trailing copies of the content */
            int k;
            for (k = 0; k < op->arg1 && n >= op->alen && !memcmp(s, op->a, op->alen); k++) {
                s += op->alen;
                n -= op->alen;
            }
            for (k = 0; k < op->arg2 && n >= op->alen && !memcmp(s + n - op->alen, op->a,
                                                                  op->alen); k++)
                n -= op->alen;
            if (!kmed__tok_strs_add(b, s, n)) return 0;
        }
    }
    return 1;
}

static kmed_result kmed__tok_hf_decode(const kmed_tok *tok, const int *ids, size_t n,
                                       int skip_special, kmed_buf *out, kmed_error *err)
{
    const kmed__tok_impl *im = (const kmed__tok_impl *)tok->impl_;
    kmed__tok_strs l[2];
    kmed__tok_work w;
    size_t i;
    int k, cur = 0, ok = 1;
    memset(l, 0, sizeof l);
    memset(&w, 0, sizeof w);
    for (i = 0; i < n && ok; i++) {
        int id = ids[i];
        if (!(im->flags[id] & (KMED__TOK_F_MODEL | KMED__TOK_F_ADDED)))
            continue; /* an id with no token: HF's id_to_token gives None */
        if (skip_special && (im->flags[id] & KMED__TOK_F_SPECIAL)) continue;
        ok = kmed__tok_strs_add(&l[0], im->pool + im->poff[id], im->plen[id]);
    }
    for (k = 0; k < im->n_dec && ok; k++) {
        kmed__tok_strs *b = &l[!cur];
        b->n = 0;
        b->text.len = 0;
        ok = kmed__tok_dec_step(&im->dec[k], &l[cur], b, &w);
        cur = !cur;
    }
    for (i = 0; i < l[cur].n && ok; i++) {
        if (!im->has_decoder && i) kmed_buf_put(out, " ", 1); /* no decoder: HF joins by " " */
        kmed_buf_put(out, l[cur].text.data + l[cur].off[i], l[cur].len[i]);
    }
    kmed__tok_strs_free(&l[0]);
    kmed__tok_strs_free(&l[1]);
    kmed__tok_work_free(&w);
    if (!ok || out->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory while decoding");
    return KMED_OK;
}

/* spm_decode: control pieces vanish (kept as text without skip_special), <unk> becomes the
   unk surface, byte runs are read as UTF-8 with U+FFFD for each bad byte, the first text
   piece loses its leading ▁ when the model adds a dummy prefix, ▁ becomes a space. */
static kmed_result kmed__tok_spm_decode(const kmed_tok *tok, const int *ids, size_t n,
                                        int skip_special, kmed_buf *out, kmed_error *err)
{
    const kmed__tok_impl *im = (const kmed__tok_impl *)tok->impl_;
    kmed_buf run = {0};
    int bos_ws = 1;
    size_t i = 0;
    while (i < n) {
        int id = ids[i];
        const char *p = im->pool + im->poff[id];
        size_t plen = im->plen[id], k;
        if (im->flags[id] & KMED__TOK_F_BYTE) {
            run.len = 0;
            while (i < n && (im->flags[ids[i]] & KMED__TOK_F_BYTE)) {
                char c = (char)kmed__tok_hf_byte(im->pool + im->poff[ids[i]], im->plen[ids[i]]);
                kmed_buf_put(&run, &c, 1);
                i++;
            }
            for (k = 0; k < run.len && !run.failed;) {
                uint32_t cp;
                size_t m = kmed__tok_utf8((const unsigned char *)run.data + k, run.len - k, &cp);
                if (!m) { kmed_buf_put(out, "\xEF\xBF\xBD", 3); k++; }
                else { kmed_buf_put(out, run.data + k, m); k += m; }
                bos_ws = 0;
            }
            continue;
        }
        i++;
        if (im->flags[id] & KMED__TOK_F_CONTROL) {
            if (!skip_special) kmed_buf_put(out, p, plen);
            continue;
        }
        if (id == tok->unk_id) {
            kmed_buf_puts(out, im->unk_surface ? im->unk_surface : " \xE2\x81\x87 ");
            bos_ws = 0;
            continue;
        }
        if (bos_ws && (im->spm_dummy || im->spm_rm_ws) && plen >= 3 &&
            !memcmp(p, "\xE2\x96\x81", 3)) {
            p += 3;
            plen -= 3;
        }
        for (k = 0; k < plen; k++) {
            if (plen - k >= 3 && !memcmp(p + k, "\xE2\x96\x81", 3)) {
                kmed_buf_put(out, " ", 1);
                k += 2;
            } else {
                kmed_buf_put(out, p + k, 1);
            }
        }
        if (plen) bos_ws = 0;
    }
    kmed_buf_free(&run);
    if (out->failed || run.failed)
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory while decoding");
    return KMED_OK;
}

KMED_API kmed_result kmed_tok_decode(const kmed_tok *tok, const int *ids, size_t n,
                                     int skip_special, kmed_buf *out, kmed_error *err)
{
    size_t i;
    if (!tok || !tok->impl_ || !out || (!ids && n))
        return KMED__ERR(err, KMED_ERR_ARG, "kmed_tok_decode: bad arguments");
    for (i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= tok->n_vocab)
            return KMED__ERR(err, KMED_ERR_ARG, "id %d at position %zu is outside [0, %d)",
                             ids[i], i, tok->n_vocab);
    kmed_buf_put(out, "", 0); /* so out->data is a string even for no ids */
    if (tok->kind == KMED_TOK_SPM_BPE) return kmed__tok_spm_decode(tok, ids, n, skip_special,
                                                                   out, err);
    return kmed__tok_hf_decode(tok, ids, n, skip_special, out, err);
}

/* ---- lookups ---- */

KMED_API const char *kmed_tok_piece(const kmed_tok *tok, int id, size_t *len)
{
    const kmed__tok_impl *im;
    if (len) *len = 0;
    if (!tok || !tok->impl_ || id < 0 || id >= tok->n_vocab) return NULL;
    im = (const kmed__tok_impl *)tok->impl_;
    if (!(im->flags[id] & (KMED__TOK_F_MODEL | KMED__TOK_F_ADDED))) return NULL;
    if (len) *len = im->plen[id];
    return im->pool + im->poff[id];
}

KMED_API int kmed_tok_id(const kmed_tok *tok, const char *piece, size_t len)
{
    const kmed__tok_impl *im;
    int id = -1;
    if (!tok || !tok->impl_ || (!piece && len)) return -1;
    im = (const kmed__tok_impl *)tok->impl_;
    /* HF's token_to_id looks at added tokens first. */
    if (len && kmed__tok_trie_longest(&im->raw_added, piece, len, &id) == len) return id;
    if (len && kmed__tok_trie_longest(&im->norm_added, piece, len, &id) == len) return id;
    return kmed__tok_vfind(im, piece ? piece : "", len);
}

KMED_API int kmed_tok_vocab_size(const kmed_tok *tok) { return tok ? tok->n_vocab : 0; }

KMED_API int kmed_tok_is_special(const kmed_tok *tok, int id)
{
    const kmed__tok_impl *im;
    if (!tok || !tok->impl_ || id < 0 || id >= tok->n_vocab) return 0;
    im = (const kmed__tok_impl *)tok->impl_;
    if (tok->kind == KMED_TOK_SPM_BPE) return (im->flags[id] & KMED__TOK_F_CONTROL) != 0;
    return (im->flags[id] & KMED__TOK_F_SPECIAL) != 0;
}

/* ---- loading: shared ---- */

static void kmed__tok_impl_free(kmed__tok_impl *im)
{
    int k;
    if (!im) return;
    KMED_FREE(im->pool);
    KMED_FREE(im->poff);
    KMED_FREE(im->plen);
    KMED_FREE(im->flags);
    KMED_FREE(im->score);
    KMED_FREE(im->vs);
    KMED_FREE(im->char_id);
    KMED_FREE(im->ms);
    KMED_FREE(im->merge_id);
    kmed__tok_trie_free(&im->raw_added);
    kmed__tok_trie_free(&im->norm_added);
    kmed__tok_trie_free(&im->user);
    for (k = 0; k < KMED__TOK_MAX_OPS; k++) {
        KMED_FREE(im->norm[k].a); KMED_FREE(im->norm[k].b);
        KMED_FREE(im->pre[k].a); KMED_FREE(im->pre[k].b);
        KMED_FREE(im->dec[k].a); KMED_FREE(im->dec[k].b);
    }
    KMED_FREE(im->charsmap);
    KMED_FREE(im->unk_surface);
    KMED_FREE(im);
}

KMED_API void kmed_tok_free(kmed_tok *tok)
{
    if (!tok) return;
    kmed__tok_impl_free((kmed__tok_impl *)tok->impl_);
    KMED_FREE(tok->chat_template);
    memset(tok, 0, sizeof *tok);
    tok->bos_id = tok->eos_id = tok->pad_id = tok->unk_id = tok->sot_id = tok->eot_id = -1;
}

/* Allocates the per-id arrays for n ids. */
static int kmed__tok_alloc_ids(kmed__tok_impl *im, size_t n)
{
    im->poff = (uint32_t *)kmed__calloc(n ? n : 1, sizeof *im->poff);
    im->plen = (uint32_t *)kmed__calloc(n ? n : 1, sizeof *im->plen);
    im->flags = (uint16_t *)kmed__calloc(n ? n : 1, sizeof *im->flags);
    return im->poff && im->plen && im->flags;
}

/* Fills the byte-piece table from the "<0xXX>" pieces of the vocabulary. */
static void kmed__tok_find_bytes(kmed__tok_impl *im)
{
    int b;
    for (b = 0; b < 256; b++) {
        char name[8];
        snprintf(name, sizeof name, "<0x%02X>", b);
        im->byte_id[b] = kmed__tok_vfind(im, name, 6);
    }
}

/* Id of an added token or piece by name, or -1. */
static int kmed__tok_named(const kmed_tok *tok, const char *a, const char *b)
{
    int id = a ? kmed_tok_id(tok, a, strlen(a)) : -1;
    if (id < 0 && b) id = kmed_tok_id(tok, b, strlen(b));
    return id;
}

static char *kmed__tok_dup(const char *s, size_t n) { return kmed__strndup(s ? s : "", n); }

/* ---- loading: tokenizer.json ---- */

/* The String of an HF pattern {"String": s}; NULL for a Regex (unsupported). */
static const kmed_json *kmed__tok_pattern(const kmed_json *op)
{
    const kmed_json *pat = kmed_json_get(op, "pattern");
    const kmed_json *s = kmed_json_get(pat, "String");
    if (!s && pat && pat->type == KMED_JSON_STRING) s = pat;
    return s && s->type == KMED_JSON_STRING && s->len ? s : NULL;
}

static kmed_result kmed__tok_op_strings(kmed__tok_op *op, const kmed_json *a, const kmed_json *b,
                                        const char *path, kmed_error *err)
{
    op->a = kmed__tok_dup(a ? a->str : "", a ? a->len : 0);
    op->alen = a ? a->len : 0;
    op->b = kmed__tok_dup(b ? b->str : "", b ? b->len : 0);
    op->blen = b ? b->len : 0;
    if (!op->a || !op->b) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    return KMED_OK;
}

/* Parses one normalizer / pre_tokenizer / decoder (what: which) into ops[*n]. */
static kmed_result kmed__tok_parse_ops(const kmed_json *j, const char *what, kmed__tok_op *ops,
                                       int *n, int depth, const char *path, kmed_error *err)
{
    const char *type;
    kmed__tok_op *op;
    kmed_result r;
    if (!j || j->type == KMED_JSON_NULL) return KMED_OK;
    type = kmed_json_str(kmed_json_get(j, "type"), NULL);
    if (j->type != KMED_JSON_OBJECT || !type)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "%s: expected an object with a \"type\"",
                          what);
    if (!strcmp(type, "Sequence")) {
        const kmed_json *list = kmed_json_get(j, "normalizers");
        size_t i;
        if (!list) list = kmed_json_get(j, "pretokenizers");
        if (!list) list = kmed_json_get(j, "decoders");
        if (!list || list->type != KMED_JSON_ARRAY || depth > 8)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "%s: Sequence without a list", what);
        for (i = 0; i < list->len; i++)
            if ((r = kmed__tok_parse_ops(&list->kids[i], what, ops, n, depth + 1, path, err)))
                return r;
        return KMED_OK;
    }
    if (*n >= KMED__TOK_MAX_OPS)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "%s: more than %d steps", what,
                          KMED__TOK_MAX_OPS);
    op = &ops[*n];
    memset(op, 0, sizeof *op);
    if (!strcmp(what, "normalizer") && !strcmp(type, "Replace")) {
        const kmed_json *pat = kmed__tok_pattern(j);
        if (!pat) goto unsupported;
        op->op = KMED__TOK_OP_REPLACE;
        r = kmed__tok_op_strings(op, pat, kmed_json_get(j, "content"), path, err);
    } else if (!strcmp(what, "normalizer") && !strcmp(type, "Prepend")) {
        op->op = KMED__TOK_OP_PREPEND;
        r = kmed__tok_op_strings(op, kmed_json_get(j, "prepend"), NULL, path, err);
    } else if (!strcmp(what, "pre_tokenizer") && !strcmp(type, "Split")) {
        const kmed_json *pat = kmed__tok_pattern(j);
        const char *beh = kmed_json_str(kmed_json_get(j, "behavior"), "");
        static const char *const names[] = {"Removed", "Isolated", "MergedWithPrevious",
                                            "MergedWithNext", "Contiguous"};
        int b;
        if (!pat || kmed_json_bool(kmed_json_get(j, "invert"), 0)) goto unsupported;
        op->op = KMED__TOK_OP_SPLIT;
        op->arg1 = -1;
        for (b = 0; b < 5; b++)
            if (!strcmp(beh, names[b])) op->arg1 = b;
        if (op->arg1 < 0)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "pre_tokenizer Split: behavior '%s'",
                              beh);
        r = kmed__tok_op_strings(op, pat, NULL, path, err);
    } else if (!strcmp(what, "decoder") && !strcmp(type, "Replace")) {
        const kmed_json *pat = kmed__tok_pattern(j);
        if (!pat) goto unsupported;
        op->op = KMED__TOK_OP_REPLACE;
        r = kmed__tok_op_strings(op, pat, kmed_json_get(j, "content"), path, err);
    } else if (!strcmp(what, "decoder") && !strcmp(type, "ByteFallback")) {
        op->op = KMED__TOK_OP_BYTEFALLBACK;
        r = KMED_OK;
    } else if (!strcmp(what, "decoder") && !strcmp(type, "Fuse")) {
        op->op = KMED__TOK_OP_FUSE;
        r = KMED_OK;
    } else if (!strcmp(what, "decoder") && !strcmp(type, "Strip")) {
        const kmed_json *c = kmed_json_get(j, "content");
        double a = kmed_json_num(kmed_json_get(j, "start"), 0);
        double b = kmed_json_num(kmed_json_get(j, "stop"), 0);
        if (!(a >= 0 && a <= 1e6 && b >= 0 && b <= 1e6))   /* counts; !(..) catches NaN */
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "decoder Strip: start %g / stop %g "
                              "are not counts in 0..1000000", a, b);
        op->op = KMED__TOK_OP_STRIP;
        op->arg1 = (int)a;
        op->arg2 = (int)b;
        if (!c || c->type != KMED_JSON_STRING || !c->len) goto unsupported;
        r = kmed__tok_op_strings(op, c, NULL, path, err);
    } else {
        goto unsupported;
    }
    if (r == KMED_OK) (*n)++;
    return r;
unsupported:
    return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                      "%s type '%s' (or its pattern) is not supported; kmed handles normalizer "
                      "Replace/Prepend, pre_tokenizer Split with a String pattern, decoder "
                      "Replace/ByteFallback/Fuse/Strip, and Sequences of these", what, type);
}

/* An id that must be an integer in [0, KMED_MAX_TOK_VOCAB). */
static int kmed__tok_json_id(const kmed_json *j, int *id)
{
    int64_t v;
    if (!kmed_json_int(j, &v) || v < 0 || v >= KMED_MAX_TOK_VOCAB) return 0;
    *id = (int)v;
    return 1;
}

/* Post-processor TemplateProcessing: the special tokens before and after $A. */
static kmed_result kmed__tok_parse_post(kmed__tok_impl *im, const kmed_json *pp, int n_vocab,
                                        const char *path, kmed_error *err)
{
    const char *type;
    const kmed_json *single, *specials;
    size_t i, k;
    int seen_a = 0;
    if (!pp || pp->type == KMED_JSON_NULL) return KMED_OK;
    type = kmed_json_str(kmed_json_get(pp, "type"), "");
    if (strcmp(type, "TemplateProcessing"))
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                          "post_processor type '%s' is not supported (TemplateProcessing only)",
                          type);
    single = kmed_json_get(pp, "single");
    specials = kmed_json_get(pp, "special_tokens");
    if (!single || single->type != KMED_JSON_ARRAY)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "post_processor: no \"single\" template");
    for (i = 0; i < single->len; i++) {
        const kmed_json *it = &single->kids[i];
        const kmed_json *sp = kmed_json_get(it, "SpecialToken");
        const kmed_json *ids;
        if (kmed_json_get(it, "Sequence")) { seen_a = 1; continue; }
        ids = kmed_json_get(kmed_json_get(specials, kmed_json_str(kmed_json_get(sp, "id"), "")),
                            "ids");
        if (!sp || !ids || ids->type != KMED_JSON_ARRAY)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                              "post_processor: template item %zu is not a known special token",
                              i);
        for (k = 0; k < ids->len; k++) {
            int id;
            int *dst = seen_a ? im->suffix : im->prefix;
            int *cnt = seen_a ? &im->n_suffix : &im->n_prefix;
            if (!kmed__tok_json_id(&ids->kids[k], &id) || id >= n_vocab ||
                !(im->flags[id] & (KMED__TOK_F_MODEL | KMED__TOK_F_ADDED)))
                return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                                  "post_processor: id of '%s' is not a token",
                                  kmed_json_str(kmed_json_get(sp, "id"), ""));
            if (*cnt >= 8)
                return KMED__ERRF(err, KMED_ERR_LIMIT, path, "post_processor: too many tokens");
            dst[(*cnt)++] = id;
        }
    }
    return KMED_OK;
}

/* Splits an HF merge entry into its two pieces: "left right" (at the first space) or the
   newer ["left", "right"]. */
static int kmed__tok_merge_parts(const kmed_json *m, const char **a, size_t *alen,
                                 const char **b, size_t *blen)
{
    if (m->type == KMED_JSON_STRING) {
        const char *sp = (const char *)memchr(m->str, ' ', m->len);
        if (!sp) return 0;
        *a = m->str;
        *alen = (size_t)(sp - m->str);
        *b = sp + 1;
        *blen = m->len - *alen - 1;
        return 1;
    }
    if (m->type == KMED_JSON_ARRAY && m->len == 2 && m->kids[0].type == KMED_JSON_STRING &&
        m->kids[1].type == KMED_JSON_STRING) {
        *a = m->kids[0].str;
        *alen = m->kids[0].len;
        *b = m->kids[1].str;
        *blen = m->kids[1].len;
        return 1;
    }
    return 0;
}

static kmed_result kmed__tok_load_json(kmed_tok *tok, kmed__tok_impl *im, const kmed_json *root,
                                       const char *path, kmed_error *err)
{
    const kmed_json *model, *vocab, *merges, *added, *unk;
    const char *type;
    size_t i, cap, n_merges;
    int max_id = -1, id = 0;
    kmed_result r;
    if (!root || root->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "expected a JSON object");
    model = kmed_json_get(root, "model");
    if (!model || model->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "no \"model\" object: not a tokenizer.json");
    type = kmed_json_str(kmed_json_get(model, "type"), "BPE");
    if (strcmp(type, "BPE"))
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                          "model type '%s' is not supported (BPE only)", type);
    vocab = kmed_json_get(model, "vocab");
    merges = kmed_json_get(model, "merges");
    added = kmed_json_get(root, "added_tokens");
    if (!vocab || vocab->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "model has no \"vocab\" object");
    if (merges && merges->type != KMED_JSON_ARRAY && merges->type != KMED_JSON_NULL)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "model \"merges\" is not an array");
    if (added && added->type != KMED_JSON_ARRAY && added->type != KMED_JSON_NULL)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "\"added_tokens\" is not an array");
    if (kmed_json_str(kmed_json_get(model, "continuing_subword_prefix"), "")[0] ||
        kmed_json_str(kmed_json_get(model, "end_of_word_suffix"), "")[0] ||
        kmed_json_num(kmed_json_get(model, "dropout"), 0) > 0)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                          "BPE continuing_subword_prefix, end_of_word_suffix and dropout are "
                          "not supported");
    /* Ids first, to size every table once. */
    for (i = 0; i < vocab->len; i++) {
        if (!kmed__tok_json_id(&vocab->kids[i], &id))
            return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                              "vocab entry %zu (\"%.40s\"): id is not an integer in [0, %d)", i,
                              vocab->kids[i].key, KMED_MAX_TOK_VOCAB);
        if (id > max_id) max_id = id;
    }
    for (i = 0; added && i < added->len; i++) {
        if (!kmed__tok_json_id(kmed_json_get(&added->kids[i], "id"), &id))
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "added_tokens[%zu]: bad or missing id",
                              i);
        if (id > max_id) max_id = id;
    }
    tok->n_vocab = max_id + 1;
    if (!kmed__tok_alloc_ids(im, (size_t)tok->n_vocab) || !kmed__tok_vinit(im, vocab->len))
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    im->char_id = (int32_t *)KMED_MALLOC(KMED__TOK_NCP * sizeof *im->char_id);
    if (!im->char_id) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    memset(im->char_id, 0xFF, KMED__TOK_NCP * sizeof *im->char_id);
    /* The pool holds every piece once; a 17 MB file has ~3 MB of them. */
    for (i = 0; i < vocab->len; i++) {
        const kmed_json *v = &vocab->kids[i];
        size_t off = kmed__tok_pool_add(im, v->key, v->key_len);
        uint32_t cp;
        if (off == (size_t)-1) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
        kmed__tok_json_id(v, &id);
        kmed__tok_vput(im, off, v->key_len, id, 0); /* a repeated key: the last one wins */
        im->poff[id] = (uint32_t)off;
        im->plen[id] = (uint32_t)v->key_len;
        im->flags[id] |= KMED__TOK_F_MODEL;
        if (v->key_len && v->key_len <= 4 &&
            kmed__tok_utf8((const unsigned char *)v->key, v->key_len, &cp) == v->key_len)
            im->char_id[cp] = id;
    }
    kmed__tok_find_bytes(im);
    /* Merges: pair of ids -> rank (packed), rank -> merged id. */
    n_merges = merges && merges->type == KMED_JSON_ARRAY ? merges->len : 0;
    while (((size_t)1 << im->id_bits) < (size_t)tok->n_vocab) im->id_bits++;
    while (((size_t)1 << im->rank_bits) < n_merges + 1) im->rank_bits++;
    if (2 * im->id_bits + im->rank_bits > 63)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "%d ids with %zu merges do not fit the "
                          "merge table's 63-bit keys", tok->n_vocab, n_merges);
    cap = 16;
    im->mshift = 60;
    while (cap < n_merges + n_merges / 2) { cap *= 2; im->mshift--; } /* load <= 2/3 */
    im->ms = (uint64_t *)KMED_MALLOC(cap * sizeof *im->ms);
    im->merge_id = (int32_t *)KMED_MALLOC((n_merges + 1) * sizeof *im->merge_id);
    if (!im->ms || !im->merge_id) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    memset(im->ms, 0xFF, cap * sizeof *im->ms);
    im->mmask = cap - 1;
    for (i = 0; merges && merges->type == KMED_JSON_ARRAY && i < merges->len; i++) {
        const char *a, *b;
        size_t alen, blen;
        int ia, ib, iab;
        if (!kmed__tok_merge_parts(&merges->kids[i], &a, &alen, &b, &blen))
            return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                              "merges[%zu]: expected \"left right\" or [\"left\", \"right\"]", i);
        ia = kmed__tok_vfind(im, a, alen);
        ib = kmed__tok_vfind(im, b, blen);
        iab = kmed__tok_vfind2(im, a, alen, b, blen);
        if (ia < 0 || ib < 0 || iab < 0)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                              "merges[%zu] (\"%.*s\" + \"%.*s\"): %s is not in the vocabulary",
                              i, (int)(alen > 40 ? 40 : alen), a, (int)(blen > 40 ? 40 : blen), b,
                              ia < 0 ? "the left piece" : ib < 0 ? "the right piece"
                                                         : "the merged piece");
        kmed__tok_madd(im, ia, ib, (int)i, iab);
    }
    im->byte_fallback = kmed_json_bool(kmed_json_get(model, "byte_fallback"), 0);
    im->fuse_unk = kmed_json_bool(kmed_json_get(model, "fuse_unk"), 0);
    im->ignore_merges = kmed_json_bool(kmed_json_get(model, "ignore_merges"), 0);
    unk = kmed_json_get(model, "unk_token");
    if (unk && unk->type == KMED_JSON_STRING) tok->unk_id = kmed__tok_vfind(im, unk->str, unk->len);
    if ((r = kmed__tok_parse_ops(kmed_json_get(root, "normalizer"), "normalizer", im->norm,
                                 &im->n_norm, 0, path, err)))
        return r;
    /* Added tokens, cut out before (normalized false) or after normalisation (true: the
       token's own text is normalised too, as HF matches it). */
    for (i = 0; added && i < added->len; i++) {
        const kmed_json *a = &added->kids[i];
        const kmed_json *content = kmed_json_get(a, "content");
        int special = kmed_json_bool(kmed_json_get(a, "special"), 0);
        int normalized = kmed_json_bool(kmed_json_get(a, "normalized"), !special);
        kmed__tok_json_id(kmed_json_get(a, "id"), &id);
        if (!content || content->type != KMED_JSON_STRING)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "added_tokens[%zu]: no content", i);
        if (!content->len) continue; /* HF ignores empty tokens */
        if (!kmed__tok_set_piece(im, id, content->str, content->len))
            return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
        if (normalized) {
            kmed__tok_work w;
            const char *ns;
            size_t nlen;
            int ok;
            memset(&w, 0, sizeof w);
            ok = kmed__tok_normalize(im, &w, content->str, content->len, &ns, &nlen) &&
                 (!nlen || kmed__tok_trie_add(&im->norm_added, ns, nlen, id));
            kmed__tok_work_free(&w);
            if (!ok) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
        } else if (!kmed__tok_trie_add(&im->raw_added, content->str, content->len, id)) {
            return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
        }
        im->flags[id] |= KMED__TOK_F_ADDED;
        if (special) im->flags[id] |= KMED__TOK_F_SPECIAL;
        if (kmed_json_bool(kmed_json_get(a, "lstrip"), 0)) im->flags[id] |= KMED__TOK_F_LSTRIP;
        if (kmed_json_bool(kmed_json_get(a, "rstrip"), 0)) im->flags[id] |= KMED__TOK_F_RSTRIP;
        if (kmed_json_bool(kmed_json_get(a, "single_word"), 0))
            im->flags[id] |= KMED__TOK_F_SWORD;
    }
    if ((r = kmed__tok_parse_ops(kmed_json_get(root, "pre_tokenizer"), "pre_tokenizer", im->pre,
                                 &im->n_pre, 0, path, err)))
        return r;
    {
        const kmed_json *dec = kmed_json_get(root, "decoder");
        im->has_decoder = dec && dec->type != KMED_JSON_NULL;
        if ((r = kmed__tok_parse_ops(dec, "decoder", im->dec, &im->n_dec, 0, path, err)))
            return r;
    }
    if ((r = kmed__tok_parse_post(im, kmed_json_get(root, "post_processor"), tok->n_vocab, path,
                                  err)))
        return r;
    tok->kind = KMED_TOK_HF_BPE;
    return KMED_OK;
}

/* ---- loading: SentencePiece tokenizer.model (protobuf ModelProto) ---- */

typedef struct kmed__tok_pb { const unsigned char *p, *start, *end; } kmed__tok_pb;

static int kmed__tok_pb_varint(kmed__tok_pb *b, uint64_t *v)
{
    int shift;
    *v = 0;
    for (shift = 0; shift < 64; shift += 7) {
        unsigned c;
        if (b->p >= b->end) return 0;
        c = *b->p++;
        *v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) return 1;
    }
    return 0;
}

/* Reads the next field key; 0 at the end, -1 when malformed. */
static int kmed__tok_pb_key(kmed__tok_pb *b, uint32_t *field, uint32_t *wire)
{
    uint64_t k;
    if (b->p >= b->end) return 0;
    if (!kmed__tok_pb_varint(b, &k) || (k >> 3) == 0 || (k >> 3) > 0x1FFFFFFF) return -1;
    *field = (uint32_t)(k >> 3);
    *wire = (uint32_t)(k & 7);
    return 1;
}

/* Reads a value of wire type `wire`: varints into *v, LEN into *s / *n, fixed32 into *v. */
static int kmed__tok_pb_value(kmed__tok_pb *b, uint32_t wire, uint64_t *v,
                              const unsigned char **s, size_t *n)
{
    uint64_t len;
    *v = 0;
    *s = NULL;
    *n = 0;
    switch (wire) {
    case 0: return kmed__tok_pb_varint(b, v);
    case 1:
        if (b->end - b->p < 8) return 0;
        b->p += 8;
        return 1;
    case 2:
        if (!kmed__tok_pb_varint(b, &len) || len > (uint64_t)(b->end - b->p)) return 0;
        *s = b->p;
        *n = (size_t)len;
        b->p += len;
        return 1;
    case 5:
        if (b->end - b->p < 4) return 0;
        *v = (uint64_t)b->p[0] | ((uint64_t)b->p[1] << 8) | ((uint64_t)b->p[2] << 16) |
             ((uint64_t)b->p[3] << 24);
        b->p += 4;
        return 1;
    default: return 0; /* groups (3, 4) and unknown wire types */
    }
}

static kmed_result kmed__tok_pb_bad(const kmed__tok_pb *b, const char *path, const char *what,
                                    kmed_error *err)
{
    return kmed_error_set(err, KMED_ERR_FORMAT, path, 0, (size_t)(b->p - b->start),
                          "truncated or malformed protobuf in %s: not a SentencePiece model",
                          what);
}

/* Parses the precompiled charsmap: uint32 (LE) trie size, darts-clone units, strings. */
static kmed_result kmed__tok_spm_charsmap(kmed__tok_impl *im, const unsigned char *s, size_t n,
                                          const char *path, kmed_error *err)
{
    uint32_t tsize, *units;
    size_t i;
    if (n == 0) return KMED_OK;
    if (n < 4) goto bad;
    tsize = (uint32_t)s[0] | ((uint32_t)s[1] << 8) | ((uint32_t)s[2] << 16) |
            ((uint32_t)s[3] << 24);
    if (tsize == 0 || tsize % 4 || tsize > n - 4) goto bad;
    im->charsmap = (unsigned char *)KMED_MALLOC(n);
    if (!im->charsmap) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    units = (uint32_t *)im->charsmap; /* malloc alignment suits uint32 */
    for (i = 0; i < tsize / 4; i++) {
        const unsigned char *u = s + 4 + 4 * i;
        units[i] = (uint32_t)u[0] | ((uint32_t)u[1] << 8) | ((uint32_t)u[2] << 16) |
                   ((uint32_t)u[3] << 24);
    }
    memcpy(im->charsmap + tsize, s + 4 + tsize, n - 4 - tsize);
    im->charsmap_len = n;
    im->darts = units;
    im->n_darts = tsize / 4;
    im->nblob = (const char *)im->charsmap + tsize;
    im->nblob_len = n - 4 - tsize;
    return KMED_OK;
bad:
    return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                      "normalizer_spec: malformed precompiled_charsmap");
}

/* What the loader keeps from TrainerSpec and NormalizerSpec. */
typedef struct kmed__tok_spec {
    int64_t model_type, byte_fallback, ws_suffix;
    int64_t ids[4]; /* unk, bos, eos, pad */
    const unsigned char *unk_surface; size_t unk_surface_len; int has_unk_surface;
    const unsigned char *name; size_t name_len;
    const unsigned char *charsmap; size_t charsmap_len;
    int64_t dummy, rm_ws, escape;
} kmed__tok_spec;

/* Reads the fields of one sub-message (TrainerSpec: which 2, NormalizerSpec: 3). */
static int kmed__tok_pb_spec(kmed__tok_pb *b, int which, kmed__tok_spec *sp)
{
    uint32_t field, wire;
    uint64_t v;
    const unsigned char *s;
    size_t n;
    int rc;
    while ((rc = kmed__tok_pb_key(b, &field, &wire)) > 0) {
        if (!kmed__tok_pb_value(b, wire, &v, &s, &n)) return 0;
        if (which == 2) {
            if (field == 3 && wire == 0) sp->model_type = (int64_t)v;
            else if (field == 35 && wire == 0) sp->byte_fallback = v != 0;
            else if (field == 24 && wire == 0) sp->ws_suffix = v != 0;
            else if (field >= 40 && field <= 43 && wire == 0)
                sp->ids[field - 40] = (int64_t)(int32_t)(uint32_t)v; /* int32, sign-extended */
            else if (field == 44 && wire == 2) {
                sp->unk_surface = s;
                sp->unk_surface_len = n;
                sp->has_unk_surface = 1;
            }
        } else {
            if (field == 1 && wire == 2) { sp->name = s; sp->name_len = n; }
            else if (field == 2 && wire == 2) { sp->charsmap = s; sp->charsmap_len = n; }
            else if (field == 3 && wire == 0) sp->dummy = v != 0;
            else if (field == 4 && wire == 0) sp->rm_ws = v != 0;
            else if (field == 5 && wire == 0) sp->escape = v != 0;
        }
    }
    return rc == 0;
}

static kmed_result kmed__tok_load_spm(kmed_tok *tok, kmed__tok_impl *im, const unsigned char *data,
                                      size_t size, const char *path, kmed_error *err)
{
    static const char *const types[] = {"?", "UNIGRAM", "BPE", "WORD", "CHAR"};
    kmed__tok_pb b, sub;
    kmed__tok_spec sp;
    uint32_t field, wire;
    uint64_t v;
    const unsigned char *s;
    size_t n, n_pieces = 0, i;
    int rc, k;
    kmed_result r;
    memset(&sp, 0, sizeof sp);
    sp.model_type = 1;
    sp.ids[0] = 0; sp.ids[1] = 1; sp.ids[2] = 2; sp.ids[3] = -1;
    sp.dummy = sp.rm_ws = sp.escape = 1; /* the proto's defaults */
    /* Pass 1: count the pieces and read the specs. */
    b.p = b.start = data;
    b.end = data + size;
    while ((rc = kmed__tok_pb_key(&b, &field, &wire)) > 0) {
        if (!kmed__tok_pb_value(&b, wire, &v, &s, &n)) { rc = -1; break; }
        if (field == 1 && wire == 2) n_pieces++;
        else if ((field == 2 || field == 3) && wire == 2) {
            sub.p = s;
            sub.start = data;
            sub.end = s + n;
            if (!kmed__tok_pb_spec(&sub, (int)field, &sp))
                return kmed__tok_pb_bad(&sub, path, field == 2 ? "trainer_spec"
                                                               : "normalizer_spec", err);
        }
    }
    if (rc < 0) return kmed__tok_pb_bad(&b, path, "ModelProto", err);
    if (n_pieces == 0)
        return KMED__ERRF(err, KMED_ERR_FORMAT, path, "no pieces: not a SentencePiece model");
    if (n_pieces >= KMED_MAX_TOK_VOCAB)
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "%zu pieces", n_pieces);
    if (sp.model_type != 2)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                          "SentencePiece model_type %s is not supported (BPE only)",
                          sp.model_type >= 1 && sp.model_type <= 4 ? types[sp.model_type] : "?");
    tok->n_vocab = (int)n_pieces;
    if (!kmed__tok_alloc_ids(im, n_pieces) || !kmed__tok_vinit(im, n_pieces) ||
        !(im->score = (float *)kmed__calloc(n_pieces, sizeof *im->score)))
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    for (k = 0; k < 256; k++) im->byte_id[k] = -1;
    /* Pass 2: the pieces. */
    b.p = data;
    i = 0;
    while (kmed__tok_pb_key(&b, &field, &wire) > 0) {
        const unsigned char *piece = NULL;
        size_t plen = 0, off;
        uint64_t type = 1;
        float score = 0;
        kmed__tok_pb_value(&b, wire, &v, &s, &n); /* checked in pass 1 */
        if (field != 1 || wire != 2) continue;
        sub.p = s;
        sub.start = data;
        sub.end = s + n;
        while ((rc = kmed__tok_pb_key(&sub, &field, &wire)) > 0) {
            const unsigned char *s2;
            size_t n2;
            if (!kmed__tok_pb_value(&sub, wire, &v, &s2, &n2)) { rc = -1; break; }
            if (field == 1 && wire == 2) { piece = s2; plen = n2; }
            else if (field == 2 && wire == 5) {
                uint32_t u = (uint32_t)v;
                memcpy(&score, &u, 4);
            } else if (field == 3 && wire == 0) type = v;
        }
        if (rc < 0) return kmed__tok_pb_bad(&sub, path, "pieces", err);
        if (!piece || !plen)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "piece %zu is empty", i);
        if (type < 1 || type > 6)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "piece %zu has unknown type %llu", i,
                              (unsigned long long)type);
        off = kmed__tok_pool_add(im, (const char *)piece, plen);
        if (off == (size_t)-1) return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
        if (kmed__tok_vput(im, off, plen, (int)i, 1) < 0)
            return KMED__ERRF(err, KMED_ERR_FORMAT, path, "piece %zu (\"%.*s\") is already defined",
                              i, (int)(plen > 40 ? 40 : plen), (const char *)piece);
        im->poff[i] = (uint32_t)off;
        im->plen[i] = (uint32_t)plen;
        im->score[i] = score;
        im->flags[i] = KMED__TOK_F_MODEL;
        switch (type) {
        case 1: im->flags[i] |= KMED__TOK_F_NORMAL; break;
        case 2:
            if (tok->unk_id >= 0)
                return KMED__ERRF(err, KMED_ERR_FORMAT, path, "<unk> is defined twice");
            im->flags[i] |= KMED__TOK_F_UNKNOWN;
            tok->unk_id = (int)i;
            break;
        case 3: im->flags[i] |= KMED__TOK_F_CONTROL; break;
        case 4:
            im->flags[i] |= KMED__TOK_F_USER;
            if (!kmed__tok_trie_add(&im->user, (const char *)piece, plen, (int)i))
                return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
            break;
        case 5: im->flags[i] |= KMED__TOK_F_UNUSED; break;
        default: {
            int byte = -1;
            char name[8];
            if (plen == 6) {
                byte = kmed__tok_hf_byte((const char *)piece, plen);
                snprintf(name, sizeof name, "<0x%02X>", byte & 0xFF);
                if (byte < 0 || memcmp(name, piece, 6)) byte = -1; /* only the canonical form */
            }
            if (!sp.byte_fallback)
                return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                                  "byte piece %zu found although byte_fallback is false", i);
            if (byte < 0)
                return KMED__ERRF(err, KMED_ERR_FORMAT, path,
                                  "byte piece %zu (\"%.*s\") is invalid", i,
                                  (int)(plen > 40 ? 40 : plen), (const char *)piece);
            im->flags[i] |= KMED__TOK_F_BYTE;
            im->byte_id[byte] = (int)i;
        }
        }
        i++;
    }
    if (tok->unk_id < 0) return KMED__ERRF(err, KMED_ERR_FORMAT, path, "<unk> is not defined");
    im->byte_fallback = (int)sp.byte_fallback;
    im->spm_dummy = (int)sp.dummy;
    im->spm_rm_ws = (int)sp.rm_ws;
    im->spm_escape = (int)sp.escape;
    im->spm_suffix = (int)sp.ws_suffix;
    if (sp.has_unk_surface &&
        !(im->unk_surface = kmed__tok_dup((const char *)sp.unk_surface, sp.unk_surface_len)))
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    /* "identity" has no map; any other rule is applied from the file's own charsmap. */
    if (!(sp.name_len == 8 && !memcmp(sp.name, "identity", 8))) {
        if (!sp.charsmap_len && sp.name_len && !(sp.name_len == 4 && !memcmp(sp.name, "none", 4)))
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                              "normalization rule '%.*s' has no precompiled_charsmap; kmed "
                              "supports 'identity' and rules stored as a charsmap",
                              (int)(sp.name_len > 40 ? 40 : sp.name_len), (const char *)sp.name);
        if ((r = kmed__tok_spm_charsmap(im, sp.charsmap, sp.charsmap_len, path, err))) return r;
    }
    /* Reserved ids from the trainer spec when they name a piece, else by name. */
    tok->bos_id = sp.ids[1] >= 0 && sp.ids[1] < (int64_t)n_pieces ? (int)sp.ids[1] : -1;
    tok->eos_id = sp.ids[2] >= 0 && sp.ids[2] < (int64_t)n_pieces ? (int)sp.ids[2] : -1;
    tok->pad_id = sp.ids[3] >= 0 && sp.ids[3] < (int64_t)n_pieces ? (int)sp.ids[3] : -1;
    tok->kind = KMED_TOK_SPM_BPE;
    if (tok->bos_id >= 0) {
        im->prefix[0] = tok->bos_id; /* GemmaTokenizer / LlamaTokenizer: add_bos_token */
        im->n_prefix = 1;
    }
    return KMED_OK;
}

/* ---- loading: tokenizer_config.json and the entry point ---- */

/* A token name in tokenizer_config.json: a string or {"content": ...}. */
static const char *kmed__tok_cfg_name(const kmed_json *cfg, const char *key)
{
    const kmed_json *j = kmed_json_get(cfg, key);
    if (j && j->type == KMED_JSON_OBJECT) j = kmed_json_get(j, "content");
    return kmed_json_str(j, NULL);
}

static kmed_result kmed__tok_load_config(kmed_tok *tok, const char *path, kmed_error *err)
{
    kmed__tok_impl *im = (kmed__tok_impl *)tok->impl_;
    kmed_json_doc doc = {0};
    const kmed_json *root, *ct, *ab, *ae;
    char *data = NULL;
    size_t len;
    kmed_result r;
    const char *name;
    int id;
    if ((r = kmed_file_read(path, KMED_MAX_TOK_FILE_BYTES, &data, &len, err))) return r;
    r = kmed_json_parse(&doc, data, len, path, 0, err);
    root = doc.root;
    if (r == KMED_OK && (!root || root->type != KMED_JSON_OBJECT))
        r = KMED__ERRF(err, KMED_ERR_FORMAT, path, "expected a JSON object");
    if (r == KMED_OK) {
        if ((name = kmed__tok_cfg_name(root, "bos_token")) &&
            (id = kmed_tok_id(tok, name, strlen(name))) >= 0)
            tok->bos_id = id;
        if ((name = kmed__tok_cfg_name(root, "eos_token")) &&
            (id = kmed_tok_id(tok, name, strlen(name))) >= 0)
            tok->eos_id = id;
        if ((name = kmed__tok_cfg_name(root, "pad_token")) &&
            (id = kmed_tok_id(tok, name, strlen(name))) >= 0)
            tok->pad_id = id;
        /* Gemma/Llama fast tokenizers rebuild the template from these two flags. */
        ab = kmed_json_get(root, "add_bos_token");
        ae = kmed_json_get(root, "add_eos_token");
        if (ab || ae) {
            int add_bos = kmed_json_bool(ab, 1), add_eos = kmed_json_bool(ae, 0);
            im->n_prefix = im->n_suffix = 0;
            if (add_bos && tok->bos_id >= 0) im->prefix[im->n_prefix++] = tok->bos_id;
            if (add_eos && tok->eos_id >= 0) im->suffix[im->n_suffix++] = tok->eos_id;
        }
        ct = kmed_json_get(root, "chat_template");
        if (ct && ct->type == KMED_JSON_ARRAY) {
            size_t i;
            const kmed_json *pick = NULL;
            for (i = 0; i < ct->len; i++)
                if (!strcmp(kmed_json_str(kmed_json_get(&ct->kids[i], "name"), ""), "default"))
                    pick = kmed_json_get(&ct->kids[i], "template");
            ct = pick;
        }
        if (ct && ct->type == KMED_JSON_STRING &&
            !(tok->chat_template = kmed__tok_dup(ct->str, ct->len)))
            r = KMED__ERRF(err, KMED_ERR_NOMEM, path, "out of memory");
    }
    kmed_json_free(&doc);
    kmed_free(data);
    return r;
}

static int kmed__tok_exists(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    fclose(f);
    return 1;
}

/* Loads a tokenizer.json or tokenizer.model held in data[0..len) (file names errors). */
static kmed_result kmed__tok_load_mem(kmed_tok *tok, const char *data, size_t len,
                                      const char *file, kmed_error *err)
{
    kmed__tok_impl *im;
    kmed_result r;
    size_t i = 0;
    memset(tok, 0, sizeof *tok);
    kmed_tok_free(tok); /* sets the ids to -1 */
    im = (kmed__tok_impl *)kmed__calloc(1, sizeof *im);
    if (!im) return KMED__ERRF(err, KMED_ERR_NOMEM, file, "out of memory");
    tok->impl_ = im;
    /* JSON starts with '{' (after optional whitespace / BOM); a ModelProto with field 1. */
    if (len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3)) i = 3;
    while (i < len && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r'))
        i++;
    if (i < len && data[i] == '{') {
        kmed_json_doc doc = {0};
        r = kmed_json_parse(&doc, data, len, file, 0, err);
        if (r == KMED_OK) r = kmed__tok_load_json(tok, im, doc.root, file, err);
        kmed_json_free(&doc);
    } else if (len == 0) {
        r = KMED__ERRF(err, KMED_ERR_FORMAT, file, "empty file");
    } else {
        r = kmed__tok_load_spm(tok, im, (const unsigned char *)data, len, file, err);
    }
    if (r == KMED_OK) {
        if (tok->kind == KMED_TOK_HF_BPE) {
            tok->bos_id = kmed__tok_named(tok, "<bos>", "<s>");
            tok->eos_id = kmed__tok_named(tok, "<eos>", "</s>");
            tok->pad_id = kmed__tok_named(tok, "<pad>", NULL);
        }
        tok->sot_id = kmed__tok_named(tok, "<start_of_turn>", NULL);
        tok->eot_id = kmed__tok_named(tok, "<end_of_turn>", NULL);
        tok->add_bos = im->n_prefix > 0 && im->prefix[0] == tok->bos_id;
        tok->add_eos = im->n_suffix > 0 && im->suffix[im->n_suffix - 1] == tok->eos_id;
    } else {
        kmed_tok_free(tok);
    }
    return r;
}

KMED_API kmed_result kmed_tok_load(kmed_tok *tok, const char *path, kmed_error *err)
{
    char file[1024], cfg[1024];
    char *data = NULL;
    size_t len;
    kmed_result r;
    int have_cfg = 0;
    if (!tok) return KMED__ERR(err, KMED_ERR_ARG, "kmed_tok_load: tok is NULL");
    memset(tok, 0, sizeof *tok);
    kmed_tok_free(tok); /* sets the ids to -1 */
    if (!path || !*path) return KMED__ERR(err, KMED_ERR_ARG, "kmed_tok_load: no path");
    if (kmed_is_dir(path)) {
        if ((r = kmed_path_join(file, sizeof file, path, "tokenizer.json", err))) return r;
        if (!kmed__tok_exists(file)) {
            if ((r = kmed_path_join(file, sizeof file, path, "tokenizer.model", err))) return r;
            if (!kmed__tok_exists(file))
                return KMED__ERRF(err, KMED_ERR_NOT_FOUND, path,
                                  "no tokenizer.json or tokenizer.model in this directory");
        }
        if ((r = kmed_path_join(cfg, sizeof cfg, path, "tokenizer_config.json", err))) return r;
        have_cfg = kmed__tok_exists(cfg);
    } else {
        if (strlen(path) >= sizeof file)
            return KMED__ERRF(err, KMED_ERR_LIMIT, path, "path too long");
        memcpy(file, path, strlen(path) + 1);
    }
    if ((r = kmed_file_read(file, KMED_MAX_TOK_FILE_BYTES, &data, &len, err))) return r;
    r = kmed__tok_load_mem(tok, data, len, file, err);
    kmed_free(data);
    if (r == KMED_OK && have_cfg) {
        kmed__tok_impl *im = (kmed__tok_impl *)tok->impl_;
        r = kmed__tok_load_config(tok, cfg, err);
        tok->add_bos = im->n_prefix > 0 && im->prefix[0] == tok->bos_id;
        tok->add_eos = im->n_suffix > 0 && im->suffix[im->n_suffix - 1] == tok->eos_id;
    }
    if (r != KMED_OK) kmed_tok_free(tok);
    return r;
}

/* ---- chat template ---- */

/* Python's str.strip(): s[*a..*b) without leading/trailing Unicode whitespace. */
static void kmed__tok_py_strip(const char *s, size_t n, size_t *a, size_t *b)
{
    size_t i = 0, j = n;
    uint32_t cp;
    while (i < j) {
        size_t k = kmed__tok_utf8((const unsigned char *)s + i, j - i, &cp);
        if (!k || !kmed__tok_py_space(cp)) break;
        i += k;
    }
    while (j > i) {
        size_t st = j - 1, k;
        while (st > i && ((unsigned char)s[st] & 0xC0) == 0x80) st--;
        k = kmed__tok_utf8((const unsigned char *)s + st, j - st, &cp);
        if (!k || st + k != j || !kmed__tok_py_space(cp)) break;
        j = st;
    }
    *a = i;
    *b = j;
}

KMED_API kmed_result kmed_chat_render(const kmed_tok *tok, const kmed_chat_msg *messages,
                                      size_t n, int add_generation_prompt, kmed_buf *out,
                                      kmed_error *err)
{
    const char *bos = NULL;
    size_t i, bos_len = 0;
    if (!out || (!messages && n))
        return KMED__ERR(err, KMED_ERR_ARG, "kmed_chat_render: bad arguments");
    if (n == 0) return KMED__ERR(err, KMED_ERR_ARG, "chat template: no messages");
    for (i = 0; i < n; i++)
        if (!messages[i].role || !messages[i].content)
            return KMED__ERR(err, KMED_ERR_ARG, "chat template: message %zu has no %s", i,
                             messages[i].role ? "content" : "role");
    if (!strcmp(messages[0].role, "system"))
        return KMED__ERR(err, KMED_ERR_ARG, "chat template: System role not supported");
    for (i = 0; i < n; i++)
        if ((strcmp(messages[i].role, "user") == 0) != (i % 2 == 0))
            return KMED__ERR(err, KMED_ERR_ARG,
                             "chat template: Conversation roles must alternate "
                             "user/assistant/user/assistant/... (message %zu is '%s')",
                             i, messages[i].role);
    if (tok && tok->impl_ && tok->bos_id >= 0) bos = kmed_tok_piece(tok, tok->bos_id, &bos_len);
    if (!bos) { bos = "<bos>"; bos_len = 5; }
    kmed_buf_put(out, bos, bos_len);
    for (i = 0; i < n; i++) {
        const char *role = strcmp(messages[i].role, "assistant") ? messages[i].role : "model";
        size_t a, b;
        kmed__tok_py_strip(messages[i].content, strlen(messages[i].content), &a, &b);
        kmed_buf_puts(out, "<start_of_turn>");
        kmed_buf_puts(out, role);
        kmed_buf_put(out, "\n", 1);
        kmed_buf_put(out, messages[i].content + a, b - a);
        kmed_buf_puts(out, "<end_of_turn>\n");
    }
    if (add_generation_prompt) kmed_buf_puts(out, "<start_of_turn>model\n");
    if (out->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return KMED_OK;
}

/* ==== kmed_ops: Gemma-2 layer ops, each a forward (here) / backward (train) pair ==== */

/* Argument order for every op: outputs, saved statistics, inputs and weights, dimensions.
   Forwards are serial over the rows they are given; callers split rows (or heads) over a
   kmed_pool. Dimension names: N rows (tokens), C channels, H query heads, Hkv key/value
   heads, D head dim, S keys, F feed-forward width, r LoRA rank. */

#include <math.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define KMED__OPS_AVX2 1
#endif

/* ---- vector helpers for the forwards: AVX2+FMA when compiled in, scalar otherwise ---- */

#ifdef KMED__OPS_AVX2
/* exp on 8 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp). */
static __m256 kmed__ops_exp8(__m256 x)
{
    __m256 fx, y, z;
    __m256i e;
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)),
                      _mm256_set1_ps(88.72283f));
    fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    z = _mm256_mul_ps(x, x);
    y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, z, _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* tanh on 8 lanes as sign(x) (1 - t) / (1 + t), t = exp(-2|x|): absolute error ~1e-7. */
static __m256 kmed__ops_tanh8(__m256 x)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), one = _mm256_set1_ps(1.0f);
    __m256 ax = _mm256_andnot_ps(sign, x);
    __m256 t = kmed__ops_exp8(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    __m256 r = _mm256_div_ps(_mm256_sub_ps(one, t), _mm256_add_ps(one, t));
    return _mm256_or_ps(r, _mm256_and_ps(x, sign));
}

#if defined(__AVX512F__)
#define KMED__OPS_AVX512 1
/* kmed__ops_exp8 and kmed__ops_tanh8 on 16 lanes: the same operations in the same order,
   so every lane gets the bits the 8-lane versions give. */
static __m512 kmed__ops_exp16(__m512 x)
{
    __m512 fx, y, z;
    __m512i e;
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)),
                      _mm512_set1_ps(88.72283f));
    fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
    z = _mm512_mul_ps(x, x);
    y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, z, _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)),
                          23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

static __m512 kmed__ops_tanh16(__m512 x)
{
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 ax = _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(x)));
    __m512 t = kmed__ops_exp16(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
    __m512 r = _mm512_div_ps(_mm512_sub_ps(one, t), _mm512_add_ps(one, t));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r),
                                               _mm512_and_si512(_mm512_castps_si512(x), sign)));
}
#endif

static float kmed__ops_hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* The tanh GELU (HF gelu_pytorch_tanh) in f32, no lookup table. */
static float kmed__gelu_tanh(float x)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

/* y = cap * tanh(x * pre / cap) over n values; y may alias x. */
static void kmed__ops_softcap_row(float *y, const float *x, size_t n, float cap, float pre)
{
    size_t i = 0;
    float inv = pre / cap;
#ifdef KMED__OPS_AVX2
    __m256 vi = _mm256_set1_ps(inv), vc = _mm256_set1_ps(cap);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_mul_ps(vc, kmed__ops_tanh8(
                                                      _mm256_mul_ps(_mm256_loadu_ps(x + i), vi))));
#endif
    for (; i < n; i++) y[i] = cap * tanhf(x[i] * inv);
}

/* x = exp(x - mx) over n values; returns the sum. */
static float kmed__ops_exp_sum(float *x, size_t n, float mx)
{
    size_t i = 0;
    float sum = 0.0f;
#ifdef KMED__OPS_AVX2
    __m256 vm = _mm256_set1_ps(mx), acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = kmed__ops_exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = kmed__ops_hsum8(acc);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += x[i];
    }
    return sum;
}

/* y[0..n) += a * x[0..n) */
static void kmed__ops_axpy(float *y, float a, const float *x, size_t n)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX2
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

/* out[j] = q . k_j for 4 rows k_j = k + j * ld (n values each); four keys share the
   loads of q and amortise the horizontal sums. */
static void kmed__ops_dot4(float *out, const float *q, const float *k, size_t ld, size_t n)
{
    size_t i = 0, j;
    float s[4] = { 0, 0, 0, 0 };
#ifdef KMED__OPS_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 8 <= n; i += 8) {
        __m256 vq = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + ld + i), a1);
        a2 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + 2 * ld + i), a2);
        a3 = _mm256_fmadd_ps(vq, _mm256_loadu_ps(k + 3 * ld + i), a3);
    }
    s[0] = kmed__ops_hsum8(a0);
    s[1] = kmed__ops_hsum8(a1);
    s[2] = kmed__ops_hsum8(a2);
    s[3] = kmed__ops_hsum8(a3);
#endif
    for (; i < n; i++)
        for (j = 0; j < 4; j++) s[j] += q[i] * k[j * ld + i];
    for (j = 0; j < 4; j++) out[j] = s[j];
}

/* y = x / sqrt(mean(x^2) + eps) * (1 + w) per row (Gemma stores w, not 1 + w). Saves
   1/rms per row in rstd when it is non-NULL. y may alias x. */
static void kmed__rmsnorm_forward(float *y, float *rstd,
                                  const float *x, const float *w,
                                  size_t N, size_t C, float eps)
{
    size_t i, j;
    for (i = 0; i < N; i++) {
        const float *xi = x + i * C; /* (C) */
        float *yi = y + i * C;       /* (C) */
        float ss = 0.0f, r;
        for (j = 0; j < C; j++) ss += xi[j] * xi[j];
        r = 1.0f / sqrtf(ss / (float)C + eps);
        if (rstd) rstd[i] = r;
        for (j = 0; j < C; j++) yi[j] = xi[j] * r * (1.0f + w[j]);
    }
}

/* Backward of kmed__rmsnorm_forward from the saved rstd: with g = dy * (1 + w),
   dx += rstd * g - rstd^3 * x * mean(g * x); dw += sum over rows of dy * x * rstd.
   Rows in order, so dw does not depend on threads. dx or dw may be NULL (skipped). */
static void kmed__rmsnorm_backward(float *dx, float *dw,
                                   const float *dy, const float *x,
                                   const float *w, const float *rstd,
                                   size_t N, size_t C)
{
    size_t i, j;
    for (i = 0; i < N; i++) {
        const float *xi = x + i * C;   /* (C) */
        const float *dyi = dy + i * C; /* (C) */
        float r = rstd[i];
        if (dw)
            for (j = 0; j < C; j++) dw[j] += dyi[j] * xi[j] * r;
        if (dx) {
            float *dxi = dx + i * C;   /* (C) */
            double gx = 0.0;
            float c;
            for (j = 0; j < C; j++) gx += (double)(dyi[j] * (1.0f + w[j])) * xi[j];
            c = (float)(gx / (double)C) * r * r * r;
            for (j = 0; j < C; j++) dxi[j] += r * dyi[j] * (1.0f + w[j]) - c * xi[j];
        }
    }
}

/* Rotate-half RoPE: dims i and i + D/2 of each head form a pair rotated by the angle
   pos * theta^(-2i/D). x, y (N, H, D); pos (N) absolute positions. y may alias x. The
   frequencies, angles, cos and sin are float32 values as in HF. Nothing to save: the
   backward is the rotation by the negative angle. */
static void kmed__rope_forward(float *y,
                               const float *x, const int *pos,
                               size_t N, size_t H, size_t D, float theta)
{
    size_t n, h, i, half = D / 2;
    for (i = 0; i < half; i++) {
        float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)D));
        for (n = 0; n < N; n++) {
            float ang = (float)pos[n] * inv_freq;
            float c = cosf(ang), s = sinf(ang);
            for (h = 0; h < H; h++) {
                const float *xh = x + (n * H + h) * D; /* (D) */
                float *yh = y + (n * H + h) * D;       /* (D) */
                float a = xh[i], b = xh[i + half];
                yh[i] = a * c - b * s;
                yh[i + half] = b * c + a * s;
            }
        }
    }
}

/* Backward of kmed__rope_forward: dx += R(-angle) dy. dx must not alias dy. */
static void kmed__rope_backward(float *dx,
                                const float *dy, const int *pos,
                                size_t N, size_t H, size_t D, float theta)
{
    size_t n, h, i, half = D / 2;
    for (i = 0; i < half; i++) {
        float inv_freq = (float)(1.0 / pow((double)theta, (double)(2 * i) / (double)D));
        for (n = 0; n < N; n++) {
            float ang = (float)pos[n] * inv_freq;
            float c = cosf(ang), s = sinf(ang);
            for (h = 0; h < H; h++) {
                const float *dyh = dy + (n * H + h) * D; /* (D) */
                float *dxh = dx + (n * H + h) * D;       /* (D) */
                float a = dyh[i], b = dyh[i + half];
                dxh[i] += a * c + b * s;
                dxh[i + half] += b * c - a * s;
            }
        }
    }
}

/* GeGLU: h = gelu_tanh(g) * u elementwise, g and u (N, F) as n = N*F values. The backward
   needs g and u, so nothing extra is saved. h may alias g or u. */
static void kmed__geglu_forward(float *h, const float *g, const float *u, size_t n)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX2
    const __m256 k = _mm256_set1_ps(0.7978845608028654f), c = _mm256_set1_ps(0.044715f);
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 in = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, x), _mm256_mul_ps(x, x),
                                                     x));
        __m256 y = _mm256_mul_ps(_mm256_mul_ps(half, x),
                                 _mm256_add_ps(one, kmed__ops_tanh8(in)));
        _mm256_storeu_ps(h + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) h[i] = kmed__gelu_tanh(g[i]) * u[i];
}

/* Backward of kmed__geglu_forward: du += dh * gelu(g), dg += dh * u * gelu'(g).
   dg or du may be NULL. */
static void kmed__geglu_backward(float *dg, float *du,
                                 const float *dh, const float *g, const float *u, size_t n)
{
    const float k = 0.7978845608028654f; /* sqrt(2/pi) */
    size_t i = 0;
#ifdef KMED__OPS_AVX2
    {
        const __m256 vk = _mm256_set1_ps(k), c = _mm256_set1_ps(0.044715f);
        const __m256 c3 = _mm256_set1_ps(3.0f * 0.044715f);
        const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i), x2 = _mm256_mul_ps(x, x);
            __m256 t = kmed__ops_tanh8(_mm256_mul_ps(vk, _mm256_fmadd_ps(_mm256_mul_ps(c, x2),
                                                                         x, x)));
            __m256 opt = _mm256_add_ps(one, t), d = _mm256_loadu_ps(dh + i);
            if (du) {
                __m256 gelu = _mm256_mul_ps(_mm256_mul_ps(half, x), opt);
                _mm256_storeu_ps(du + i, _mm256_fmadd_ps(d, gelu, _mm256_loadu_ps(du + i)));
            }
            if (dg) {
                __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
                __m256 inner = _mm256_mul_ps(vk, _mm256_fmadd_ps(c3, x2, one));
                __m256 dgelu = _mm256_mul_ps(half, _mm256_fmadd_ps(_mm256_mul_ps(x, sech2),
                                                                   inner, opt));
                __m256 du8 = _mm256_mul_ps(d, _mm256_loadu_ps(u + i));
                _mm256_storeu_ps(dg + i, _mm256_fmadd_ps(du8, dgelu, _mm256_loadu_ps(dg + i)));
            }
        }
    }
#endif
    for (; i < n; i++) {
        float x = g[i], x2 = x * x;
        float t = tanhf(k * (x + 0.044715f * x2 * x));
        float gelu = 0.5f * x * (1.0f + t);
        float dgelu = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k *
                      (1.0f + 3.0f * 0.044715f * x2);
        if (du) du[i] += dh[i] * gelu;
        if (dg) dg[i] += dh[i] * u[i] * dgelu;
    }
}

/* Soft-cap: y = cap * tanh(x / cap) over n values (the backward uses y:
   dy/dx = 1 - (y/cap)^2). y may alias x. cap <= 0 copies. */
static void kmed__softcap_forward(float *y, const float *x, size_t n, float cap)
{
    if (cap <= 0.0f) {
        if (y != x) memmove(y, x, n * sizeof *y);
        return;
    }
    kmed__ops_softcap_row(y, x, n, cap, 1.0f);
}

/* Backward of kmed__softcap_forward from its output y: dx += dy * (1 - (y/cap)^2).
   cap <= 0: dx += dy. */
static void kmed__softcap_backward(float *dx, const float *dy, const float *y, size_t n,
                                   float cap)
{
    size_t i;
    if (cap <= 0.0f) {
        for (i = 0; i < n; i++) dx[i] += dy[i];
        return;
    }
    for (i = 0; i < n; i++) {
        float t = y[i] / cap;
        dx[i] += dy[i] * (1.0f - t * t);
    }
}

/* Cross-entropy statistics of one chunk of a logits row, fused so the chunk is read
   while it is in cache: y = softcap(y) in place (cap <= 0: unchanged), *mx = max(y),
   *sum = sum of exp(y - *mx) (f32, 8 lanes then the tail, as kmed__ops_exp_sum). The
   chunked LM head merges the chunks' (max, sum) into the row's log-sum-exp. */
static void kmed__xent_stats(float *y, size_t n, float cap, float *mx, float *sum)
{
    size_t i, nv = 0;
    float m = -INFINITY, s = 0.0f;
#ifdef KMED__OPS_AVX512
    nv = n / 16 * 16;
    if (nv) {
        /* max_ps(new, old) keeps old when new is NaN, as the scalar compare does */
        const __m512 vi = _mm512_set1_ps(1.0f / cap), vc = _mm512_set1_ps(cap);
        __m512 vm = _mm512_set1_ps(-INFINITY), acc = _mm512_setzero_ps();
        for (i = 0; i < nv; i += 16) {
            __m512 v = _mm512_loadu_ps(y + i);
            if (cap > 0.0f) {   /* kmed__ops_softcap_row, 16 lanes */
                v = _mm512_mul_ps(vc, kmed__ops_tanh16(_mm512_mul_ps(v, vi)));
                _mm512_storeu_ps(y + i, v);
            }
            vm = _mm512_max_ps(v, vm);
        }
        if (cap > 0.0f && nv < n) kmed__ops_softcap_row(y + nv, y + nv, n - nv, cap, 1.0f);
        m = _mm512_reduce_max_ps(vm);
        for (i = nv; i < n; i++) m = y[i] > m ? y[i] : m;
        vm = _mm512_set1_ps(m);
        for (i = 0; i < nv; i += 16)
            acc = _mm512_add_ps(acc, kmed__ops_exp16(_mm512_sub_ps(_mm512_loadu_ps(y + i), vm)));
        s = _mm512_reduce_add_ps(acc);
    }
#elif defined(KMED__OPS_AVX2)
    nv = n / 8 * 8;
    if (nv) {
        __m256 vm, acc = _mm256_setzero_ps();
        float t[8];
        if (cap > 0.0f) kmed__ops_softcap_row(y, y, n, cap, 1.0f);
        vm = _mm256_loadu_ps(y);
        for (i = 8; i < nv; i += 8) vm = _mm256_max_ps(_mm256_loadu_ps(y + i), vm);
        _mm256_storeu_ps(t, vm);
        for (i = 0; i < 8; i++) m = t[i] > m ? t[i] : m;
        for (i = nv; i < n; i++) m = y[i] > m ? y[i] : m;
        vm = _mm256_set1_ps(m);
        for (i = 0; i < nv; i += 8)
            acc = _mm256_add_ps(acc, kmed__ops_exp8(_mm256_sub_ps(_mm256_loadu_ps(y + i), vm)));
        s = kmed__ops_hsum8(acc);
    }
#endif
    if (nv == 0) {
        if (cap > 0.0f) kmed__ops_softcap_row(y, y, n, cap, 1.0f);
        for (i = 0; i < n; i++) m = y[i] > m ? y[i] : m;
    }
    for (i = nv; i < n; i++) s += expf(y[i] - m);
    *mx = m;
    *sum = s;
}

/* Backward of the softcapped cross-entropy for one chunk of a logits row, from the
   capped logits y (n) and the row's max mx: g = (exp(y - mx) * a - [j == tgt] * inv) *
   (1 - (y/cap)^2), a = inv / sum(exp(y - mx)) over the whole row, inv = 1 / normaliser.
   tgt >= n: the target is outside this chunk. Writes (not accumulates) g; g may be y. */
static void kmed__xent_grad(float *g, const float *y, size_t n, size_t tgt, float mx, float a,
                            float inv, float cap)
{
    size_t i = 0;
#ifdef KMED__OPS_AVX512
    {
        const __m512 vm = _mm512_set1_ps(mx), va = _mm512_set1_ps(a), vc = _mm512_set1_ps(cap);
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= n; i += 16) {
            __m512 y16 = _mm512_loadu_ps(y + i);
            __m512 d = _mm512_mul_ps(kmed__ops_exp16(_mm512_sub_ps(y16, vm)), va);
            if (tgt >= i && tgt < i + 16)
                d = _mm512_mask_sub_ps(d, (__mmask16)(1u << (tgt - i)), d, _mm512_set1_ps(inv));
            if (cap > 0.0f) {
                __m512 t = _mm512_div_ps(y16, vc);
                d = _mm512_mul_ps(d, _mm512_sub_ps(one, _mm512_mul_ps(t, t)));
            }
            _mm512_storeu_ps(g + i, d);
        }
    }
#endif
#ifdef KMED__OPS_AVX2
    __m256 vm = _mm256_set1_ps(mx), va = _mm256_set1_ps(a), vc = _mm256_set1_ps(cap);
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 y8 = _mm256_loadu_ps(y + i);
        __m256 d = _mm256_mul_ps(kmed__ops_exp8(_mm256_sub_ps(y8, vm)), va);
        if (tgt >= i && tgt < i + 8) {
            float t[8];
            _mm256_storeu_ps(t, d);
            t[tgt - i] -= inv;
            d = _mm256_loadu_ps(t);
        }
        if (cap > 0.0f) {
            __m256 t = _mm256_div_ps(y8, vc);
            d = _mm256_mul_ps(d, _mm256_sub_ps(one, _mm256_mul_ps(t, t)));
        }
        _mm256_storeu_ps(g + i, d);
    }
#endif
    while (i < n) {   /* the tail (or all, without SIMD) through the cap's backward */
        float d[64], yc[64];  /* copies, so g may alias y */
        size_t j, m = n - i < 64 ? n - i : 64;
        for (j = 0; j < m; j++) {
            yc[j] = y[i + j];
            d[j] = expf(yc[j] - mx) * a;
            if (i + j == tgt) d[j] -= inv;
            g[i + j] = 0.0f;
        }
        kmed__softcap_backward(g + i, d, yc, m, cap);
        i += m;
    }
}

/* Embedding lookup scaled by sqrt(C): h[n] = dequant(E[ids[n]]) * scale, the scale
   rounded to f32 first (HF rounds sqrt(hidden) to the activation dtype). E (V, C) rows in
   dtype et; ids must be in [0, V) (the caller checks). h (N, C). */
static void kmed__embed_forward(float *h,
                                const int *ids, const void *E, kmed_dtype et,
                                size_t N, size_t C)
{
    size_t n, j, row_bytes = kmed_dtype_bytes(et, C);
    float scale = (float)sqrt((double)C);
    for (n = 0; n < N; n++) {
        float *hn = h + n * C; /* (C) */
        kmed_dequantize_row(et, (const unsigned char *)E + (size_t)ids[n] * row_bytes, hn, C);
        for (j = 0; j < C; j++) hn[j] *= scale;
    }
}

/* Backward of kmed__embed_forward into an f32 table: dE[ids[n]] += dh[n] * scale.
   Rows in order (repeated ids accumulate deterministically). dE (V, C), dh (N, C). */
static void kmed__embed_backward(float *dE,
                                 const float *dh, const int *ids,
                                 size_t N, size_t C)
{
    size_t n, j;
    float scale = (float)sqrt((double)C);
    for (n = 0; n < N; n++) {
        float *de = dE + (size_t)ids[n] * C; /* (C) */
        const float *dhn = dh + n * C;        /* (C) */
        for (j = 0; j < C; j++) de[j] += dhn[j] * scale;
    }
}

/* Causal attention for query heads [h0, h1) with GQA, score scale, soft-cap applied
   before masking, and an optional sliding window, all by absolute positions:
   query t sits at position qpos[t] and key j at position j; query t sees key j iff
   j <= qpos[t] and (window == 0 or qpos[t] - j < window). Requires qpos[t] < S.
   q (N, H, D); k, v (S, Hkv, D); out (N, H, D), only heads [h0, h1) written.
   att (H, N, S): when non-NULL, saves the softmax probabilities (0 where masked), and is
   also the score buffer; when NULL, scratch (S) is used instead.
   Query head h reads key/value head h / (H / Hkv). */
static void kmed__attention_forward(float *out, float *att,
                                    const float *q, const float *k, const float *v,
                                    const int *qpos, float *scratch,
                                    size_t N, size_t S, size_t H, size_t Hkv, size_t D,
                                    float scale, float softcap, size_t window,
                                    size_t h0, size_t h1)
{
    size_t h, t, j, group = H / Hkv, ld = Hkv * D;
    for (h = h0; h < h1; h++) {
        size_t hk = h / group;
        for (t = 0; t < N; t++) {
            const float *qt = q + (t * H + h) * D; /* (D) */
            float *ot = out + (t * H + h) * D;     /* (D) */
            float *p = att ? att + (h * N + t) * S : scratch; /* (S) */
            size_t p_t = (size_t)qpos[t];
            size_t lo = window && p_t >= window ? p_t - window + 1 : 0, nk = p_t + 1 - lo;
            const float *kb = k + lo * ld + hk * D; /* key lo of head hk */
            float mx = -INFINITY, sum, inv;
            for (j = 0; j + 4 <= nk; j += 4) kmed__ops_dot4(p + lo + j, qt, kb + j * ld, ld, D);
            for (; j < nk; j++) p[lo + j] = kmed_dot_row(KMED_F32, kb + j * ld, qt, D);
            if (softcap > 0.0f) kmed__ops_softcap_row(p + lo, p + lo, nk, softcap, scale);
            else for (j = 0; j < nk; j++) p[lo + j] *= scale;
            for (j = lo; j <= p_t; j++) if (p[j] > mx) mx = p[j];
            sum = kmed__ops_exp_sum(p + lo, nk, mx);
            inv = 1.0f / sum;
            memset(ot, 0, D * sizeof *ot);
            for (j = lo; j <= p_t; j++) {
                p[j] *= inv;
                kmed__ops_axpy(ot, p[j], v + (j * Hkv + hk) * D, D);
            }
            if (att) {
                for (j = 0; j < lo; j++) p[j] = 0.0f;
                for (j = p_t + 1; j < S; j++) p[j] = 0.0f;
            }
        }
    }
}

/* Backward of kmed__attention_forward from the saved probabilities att (H, N, S) for
   query heads [h0, h1), as GEMMs per head (the masked entries of att are 0, so full
   products stay exact): dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(P * dP)) times
   the cap's derivative 1 - tanh^2 on the scores recomputed as Q K^T (cheaper than saving
   them), dQ += scale dS K, dK += scale dS^T Q. dq (N, H, D), dk, dv (S, Hkv, D)
   accumulate; dk/dv rows are shared by the H/Hkv query heads of a group, so parallel
   callers split [h0, h1) on group boundaries. scratch (2, N, S). */
static void kmed__attention_backward(float *dq, float *dk, float *dv,
                                     const float *dout, const float *att,
                                     const float *q, const float *k, const float *v,
                                     const int *qpos, float *scratch,
                                     size_t N, size_t S, size_t H, size_t Hkv, size_t D,
                                     float scale, float softcap, size_t window,
                                     size_t h0, size_t h1)
{
    size_t h, t, j, group = H / Hkv, HD = H * D, KD = Hkv * D;
    float *dp = scratch;         /* (N, S) dP, then dS */
    float *sc = scratch + N * S; /* (N, S) recomputed scores */
    for (h = h0; h < h1; h++) {
        size_t hk = h / group;
        const float *P = att + h * N * S; /* (N, S) */
        kmed_sgemm(NULL, 1, 0, S, D, N, 1.0f, P, S, dout + h * D, HD, 1.0f, dv + hk * D, KD);
        kmed_sgemm(NULL, 0, 1, N, S, D, 1.0f, dout + h * D, HD, v + hk * D, KD, 0.0f, dp, S);
        if (softcap > 0.0f)
            kmed_sgemm(NULL, 0, 1, N, S, D, scale, q + h * D, HD, k + hk * D, KD, 0.0f, sc, S);
        for (t = 0; t < N; t++) {
            const float *pt = P + t * S; /* (S) */
            float *dpt = dp + t * S;     /* (S) */
            size_t p_t = (size_t)qpos[t];
            size_t lo = window && p_t >= window ? p_t - window + 1 : 0;
            float pdp = 0.0f, *th = sc + t * S;
            for (j = lo; j <= p_t; j++) pdp += pt[j] * dpt[j];
            for (j = 0; j < lo; j++) dpt[j] = 0.0f;
            if (softcap > 0.0f) /* th = tanh(score / softcap), vectorised */
                kmed__ops_softcap_row(th + lo, th + lo, p_t + 1 - lo, 1.0f, 1.0f / softcap);
            for (j = lo; j <= p_t; j++) {
                float ds = pt[j] * (dpt[j] - pdp);
                if (softcap > 0.0f) ds *= 1.0f - th[j] * th[j];
                dpt[j] = ds * scale;
            }
            for (j = p_t + 1; j < S; j++) dpt[j] = 0.0f;
        }
        kmed_sgemm(NULL, 0, 0, N, D, S, 1.0f, dp, S, k + hk * D, KD, 1.0f, dq + h * D, HD);
        kmed_sgemm(NULL, 1, 0, S, D, N, 1.0f, dp, S, q + h * D, HD, 1.0f, dk + hk * D, KD);
    }
}

/* LoRA delta: y (M, N) += scale * (x A^T) B^T with x (M, K), A (r, K), B (N, r). Saves
   xa = x A^T (M, r), which the backward needs for dB. */
static void kmed__lora_forward(kmed_pool *pool, float *y, float *xa,
                               const float *x, const float *A, const float *B,
                               size_t M, size_t N, size_t K, size_t r, float scale)
{
    kmed_sgemm(pool, 0, 1, M, r, K, 1.0f, x, K, A, K, 0.0f, xa, r);
    kmed_sgemm(pool, 0, 1, M, N, r, scale, xa, r, B, r, 1.0f, y, N);
}

/* Backward of kmed__lora_forward: dB += scale * dy^T xa; with dxa = scale * dy B
   (M, r) in scratch: dA += dxa^T x, dx += dxa A. dx, dA, dB may be NULL. */
static void kmed__lora_backward(kmed_pool *pool, float *dx, float *dA, float *dB,
                                const float *dy, const float *xa,
                                const float *x, const float *A, const float *B,
                                float *dxa,
                                size_t M, size_t N, size_t K, size_t r, float scale)
{
    if (dB) kmed_sgemm(pool, 1, 0, N, r, M, scale, dy, N, xa, r, 1.0f, dB, r);
    if (!dA && !dx) return;
    kmed_sgemm(pool, 0, 0, M, r, N, scale, dy, N, B, r, 0.0f, dxa, r);
    if (dA) kmed_sgemm(pool, 1, 0, r, K, M, 1.0f, dxa, r, x, K, 1.0f, dA, K);
    if (dx) kmed_sgemm(pool, 0, 0, M, K, r, 1.0f, dxa, r, A, K, 1.0f, dx, K);
}

/* ==== kmed_gemma: Gemma-2 config, weight loading, forward pass with KV cache ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- config ---- */

static kmed_result kmed__gemma_json_int(const kmed_json *root, const char *key, int required,
                                        int def, int *out, const char *name, kmed_error *err)
{
    const kmed_json *j = kmed_json_get(root, key);
    int64_t v;
    if (!j || j->type == KMED_JSON_NULL) {
        if (required)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, name, "missing key \"%s\"", key);
        *out = def;
        return KMED_OK;
    }
    /* eos_token_id may be a list ([1, 107]); the first id is the primary one */
    if (j->type == KMED_JSON_ARRAY && j->len > 0) j = kmed_json_at(j, 0);
    if (!kmed_json_int(j, &v) || v < -1 || v > 0x7fffffff)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "\"%s\": expected an integer", key);
    *out = (int)v;
    return KMED_OK;
}

static kmed_result kmed__gemma_json_float(const kmed_json *root, const char *key, float def,
                                          float null_val, float *out, const char *name,
                                          kmed_error *err)
{
    const kmed_json *j = kmed_json_get(root, key);
    if (!j) { *out = def; return KMED_OK; }
    if (j->type == KMED_JSON_NULL) { *out = null_val; return KMED_OK; }
    if (j->type != KMED_JSON_NUMBER)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "\"%s\": expected a number", key);
    *out = (float)j->num;
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_config_validate(const kmed_gemma_config *c, kmed_error *err)
{
    size_t a;
    if (c->vocab_size <= 0 || c->hidden_size <= 0 || c->intermediate_size <= 0 ||
        c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 || c->head_dim <= 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: sizes must be positive "
                         "(vocab %d, hidden %d, intermediate %d, layers %d, heads %d, "
                         "kv heads %d, head_dim %d)", c->vocab_size, c->hidden_size,
                         c->intermediate_size, c->n_layers, c->n_heads, c->n_kv_heads,
                         c->head_dim);
    if (c->n_heads % c->n_kv_heads != 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: num_attention_heads %d is not "
                         "a multiple of num_key_value_heads %d", c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2 != 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: head_dim %d must be even "
                         "(RoPE pairs)", c->head_dim);
    if (!(c->rms_norm_eps > 0.0f) || !(c->query_pre_attn_scalar > 0.0f) ||
        !(c->rope_theta > 0.0f) || !(c->attn_softcap >= 0.0f) || !(c->final_softcap >= 0.0f) ||
        !isfinite(c->rms_norm_eps) || !isfinite(c->query_pre_attn_scalar) ||
        !isfinite(c->rope_theta) || !isfinite(c->attn_softcap) || !isfinite(c->final_softcap))
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: rms_norm_eps, "
                         "query_pre_attn_scalar and rope_theta must be finite and > 0, "
                         "soft-caps finite and >= 0");
    if (c->sliding_window < 0)
        return KMED__ERR(err, KMED_ERR_FORMAT, "gemma config: sliding_window %d < 0",
                         c->sliding_window);
    if (!kmed__mul_ok((size_t)c->vocab_size, (size_t)c->hidden_size, &a) ||
        !kmed__mul_ok((size_t)c->n_heads, (size_t)c->head_dim, &a) ||
        !kmed__mul_ok(a, (size_t)c->hidden_size, &a) ||
        !kmed__mul_ok((size_t)c->intermediate_size, (size_t)c->hidden_size, &a))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma config: sizes overflow");
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_config_parse(kmed_gemma_config *cfg, const char *json,
                                             size_t len, const char *name, kmed_error *err)
{
    kmed_json_doc doc;
    const kmed_json *root, *j;
    kmed_gemma_config c;
    kmed_result r;
    float qs;
    memset(&c, 0, sizeof c);
    r = kmed_json_parse(&doc, json, len, name, 0, err);
    if (r != KMED_OK) { kmed_json_free(&doc); return r; }
    root = doc.root;
    if (!root || root->type != KMED_JSON_OBJECT) {
        kmed_json_free(&doc);
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "expected a JSON object");
    }
    j = kmed_json_get(root, "model_type");
    if (j && strcmp(kmed_json_str(j, ""), "gemma2") != 0) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "model_type \"%s\": only gemma2 is "
                       "supported", kmed_json_str(j, "(not a string)"));
        goto done;
    }
    j = kmed_json_get(root, "hidden_activation");
    if (j && j->type != KMED_JSON_NULL &&
        strcmp(kmed_json_str(j, ""), "gelu_pytorch_tanh") != 0) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "hidden_activation \"%s\": only "
                       "gelu_pytorch_tanh is supported", kmed_json_str(j, "(not a string)"));
        goto done;
    }
    if (!kmed_json_bool(kmed_json_get(root, "tie_word_embeddings"), 1)) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "tie_word_embeddings false: Gemma-2 "
                       "ties lm_head to the embedding; an untied head is not supported");
        goto done;
    }
    if (kmed_json_bool(kmed_json_get(root, "attention_bias"), 0)) {
        r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "attention_bias true is not "
                       "supported");
        goto done;
    }
    if ((r = kmed__gemma_json_int(root, "vocab_size", 1, 0, &c.vocab_size, name, err)) ||
        (r = kmed__gemma_json_int(root, "hidden_size", 1, 0, &c.hidden_size, name, err)) ||
        (r = kmed__gemma_json_int(root, "intermediate_size", 1, 0, &c.intermediate_size,
                                  name, err)) ||
        (r = kmed__gemma_json_int(root, "num_hidden_layers", 1, 0, &c.n_layers, name, err)) ||
        (r = kmed__gemma_json_int(root, "num_attention_heads", 1, 0, &c.n_heads, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "num_key_value_heads", 1, 0, &c.n_kv_heads, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "head_dim", 1, 0, &c.head_dim, name, err)) ||
        (r = kmed__gemma_json_int(root, "sliding_window", 0, 4096, &c.sliding_window, name,
                                  err)) ||
        (r = kmed__gemma_json_int(root, "max_position_embeddings", 0, 8192,
                                  &c.max_position, name, err)) ||
        (r = kmed__gemma_json_int(root, "bos_token_id", 0, 2, &c.bos_id, name, err)) ||
        (r = kmed__gemma_json_int(root, "eos_token_id", 0, 1, &c.eos_id, name, err)) ||
        (r = kmed__gemma_json_int(root, "pad_token_id", 0, 0, &c.pad_id, name, err)) ||
        (r = kmed__gemma_json_float(root, "query_pre_attn_scalar", 256.0f, 0.0f, &qs, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "rms_norm_eps", 1e-6f, 0.0f, &c.rms_norm_eps, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "rope_theta", 10000.0f, 0.0f, &c.rope_theta, name,
                                    err)) ||
        (r = kmed__gemma_json_float(root, "attn_logit_softcapping", 50.0f, 0.0f,
                                    &c.attn_softcap, name, err)) ||
        (r = kmed__gemma_json_float(root, "final_logit_softcapping", 30.0f, 0.0f,
                                    &c.final_softcap, name, err)))
        goto done;
    c.query_pre_attn_scalar = qs;
    j = kmed_json_get(root, "sliding_window");
    if (j && j->type == KMED_JSON_NULL) c.sliding_window = 0; /* null: every layer global */
    r = kmed_gemma_config_validate(&c, err);
    if (r != KMED_OK && err && name) {
        char tmp[sizeof err->msg];
        snprintf(tmp, sizeof tmp, "%s", err->msg);
        kmed_error_set(err, r, name, 0, (size_t)-1, "%s", tmp);
    }
    if (r == KMED_OK) *cfg = c;
done:
    kmed_json_free(&doc);
    return r;
}

KMED_API kmed_result kmed_gemma_config_load(kmed_gemma_config *cfg, const char *path,
                                            kmed_error *err)
{
    char file[1024];
    char *text = NULL;
    size_t len = 0;
    kmed_result r;
    if (kmed_is_dir(path)) {
        r = kmed_path_join(file, sizeof file, path, "config.json", err);
        if (r != KMED_OK) return r;
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    r = kmed_file_read(file, (size_t)16 << 20, &text, &len, err);
    if (r != KMED_OK) return r;
    r = kmed_gemma_config_parse(cfg, text, len, file, err);
    kmed_free(text);
    return r;
}

/* A numeric GGUF scalar as double; 0 if the key is absent or not a number. */
static int kmed__gemma_gguf_num(const kmed_gguf *g, const char *key, double *out)
{
    const kmed_gguf_kv *kv = kmed_gguf_find_kv(g, key);
    if (!kv) return 0;
    switch (kv->type) {
    case KMED_GGUF_U8: case KMED_GGUF_U16: case KMED_GGUF_U32: case KMED_GGUF_U64:
    case KMED_GGUF_BOOL:
        *out = (double)kv->u; return 1;
    case KMED_GGUF_I8: case KMED_GGUF_I16: case KMED_GGUF_I32: case KMED_GGUF_I64:
        *out = (double)kv->i; return 1;
    case KMED_GGUF_F32: case KMED_GGUF_F64:
        *out = kv->f; return 1;
    default:
        return 0;
    }
}

/* (int)x for a GGUF number: a value outside int (or NaN) becomes -1, which validation
   rejects for sizes, instead of an undefined float-to-int conversion. */
static int kmed__gemma_gguf_int(double x)
{
    return x >= -1.0 && x <= 2147483647.0 ? (int)x : -1;
}

KMED_API kmed_result kmed_gemma_config_from_gguf(kmed_gemma_config *cfg, const kmed_gguf *g,
                                                 kmed_error *err)
{
    static const char *const need[] = {
        "gemma2.embedding_length", "gemma2.block_count", "gemma2.feed_forward_length",
        "gemma2.attention.head_count"
    };
    const kmed_gguf_kv *arch = kmed_gguf_find_kv(g, "general.architecture");
    const kmed_gguf_kv *toks = kmed_gguf_find_kv(g, "tokenizer.ggml.tokens");
    const kmed_tensor_info *emb = kmed_gguf_find_tensor(g, "token_embd.weight");
    kmed_gemma_config c;
    double v[4], x;
    size_t i;
    memset(&c, 0, sizeof c);
    if (!arch || arch->type != KMED_GGUF_STRING || arch->len != 6 ||
        memcmp(arch->str, "gemma2", 6) != 0)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: general.architecture is %s%.*s%s, "
                         "expected gemma2", arch ? "\"" : "", arch && arch->str ?
                         (int)(arch->len > 64 ? 64 : arch->len) : 7,
                         arch && arch->str ? arch->str : "missing", arch ? "\"" : "");
    for (i = 0; i < 4; i++)
        if (!kmed__gemma_gguf_num(g, need[i], &v[i]))
            return KMED__ERR(err, KMED_ERR_NOT_FOUND, "gguf: missing key %s", need[i]);
    c.hidden_size = kmed__gemma_gguf_int(v[0]);
    c.n_layers = kmed__gemma_gguf_int(v[1]);
    c.intermediate_size = kmed__gemma_gguf_int(v[2]);
    c.n_heads = kmed__gemma_gguf_int(v[3]);
    c.n_kv_heads = kmed__gemma_gguf_num(g, "gemma2.attention.head_count_kv", &x)
                       ? kmed__gemma_gguf_int(x) : c.n_heads;
    c.head_dim = kmed__gemma_gguf_num(g, "gemma2.attention.key_length", &x)
                     ? kmed__gemma_gguf_int(x) : (c.n_heads > 0 ? c.hidden_size / c.n_heads : 0);
    /* llama.cpp: 1/sqrt(key_length), except its 27B case (46 blocks): sqrt(C / H) */
    c.query_pre_attn_scalar = c.n_layers == 46 && c.n_heads > 0
                                  ? (float)c.hidden_size / (float)c.n_heads
                                  : (float)c.head_dim;
    c.rms_norm_eps = kmed__gemma_gguf_num(g, "gemma2.attention.layer_norm_rms_epsilon", &x)
                         ? (float)x : 1e-6f;
    c.rope_theta = kmed__gemma_gguf_num(g, "gemma2.rope.freq_base", &x) ? (float)x : 10000.0f;
    c.attn_softcap = kmed__gemma_gguf_num(g, "gemma2.attn_logit_softcapping", &x) ? (float)x
                                                                                   : 0.0f;
    c.final_softcap = kmed__gemma_gguf_num(g, "gemma2.final_logit_softcapping", &x)
                          ? (float)x : 0.0f;
    c.sliding_window = kmed__gemma_gguf_num(g, "gemma2.attention.sliding_window", &x)
                           ? kmed__gemma_gguf_int(x) : 0;
    c.max_position = kmed__gemma_gguf_num(g, "gemma2.context_length", &x)
                         ? kmed__gemma_gguf_int(x) : 8192;
    c.bos_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.bos_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 2;
    c.eos_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.eos_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 1;
    c.pad_id = kmed__gemma_gguf_num(g, "tokenizer.ggml.padding_token_id", &x)
                   ? kmed__gemma_gguf_int(x) : 0;
    if (kmed__gemma_gguf_num(g, "gemma2.vocab_size", &x)) c.vocab_size = kmed__gemma_gguf_int(x);
    else if (toks && toks->type == KMED_GGUF_ARRAY && toks->n < 0x7fffffff)
        c.vocab_size = (int)toks->n;
    else if (emb && emb->ndim == 2 && emb->shape[0] < 0x7fffffff)
        c.vocab_size = (int)emb->shape[0];
    else
        return KMED__ERR(err, KMED_ERR_NOT_FOUND, "gguf: no vocabulary size "
                         "(tokenizer.ggml.tokens or token_embd.weight)");
    {
        kmed_result r = kmed_gemma_config_validate(&c, err);
        if (r != KMED_OK) return r;
    }
    *cfg = c;
    return KMED_OK;
}

/* ---- weights ---- */

typedef struct kmed__gemma_impl {
    kmed_st st;
    kmed_gguf gguf;
    int has_st, has_gguf;
    size_t n_borrowed;          /* weights pointing into the mapped file */
    void **bufs;                /* converted weights */
    size_t n_bufs;
    float *norms;               /* ((4L + 1) * C) */
    kmed_gemma_layer *layers;   /* (L) */
} kmed__gemma_impl;

KMED_API kmed_result kmed_gemma_init(kmed_gemma *m, const kmed_gemma_config *cfg,
                                     kmed_error *err)
{
    kmed__gemma_impl *im;
    size_t L, C, l;
    kmed_result r;
    memset(m, 0, sizeof *m);
    r = kmed_gemma_config_validate(cfg, err);
    if (r != KMED_OK) return r;
    L = (size_t)cfg->n_layers;
    C = (size_t)cfg->hidden_size;
    im = (kmed__gemma_impl *)kmed__calloc(1, sizeof *im);
    if (!im) return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory");
    m->impl_ = im;
    m->cfg = *cfg;
    im->layers = (kmed_gemma_layer *)kmed__calloc(L, sizeof *im->layers);
    im->norms = (float *)kmed__calloc(4 * L + 1, C * sizeof(float));
    im->bufs = (void **)kmed__calloc(7 * L + 1, sizeof(void *));
    if (!im->layers || !im->norms || !im->bufs) {
        kmed_gemma_free(m);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory");
    }
    m->layers = im->layers;
    for (l = 0; l < L; l++) {
        m->layers[l].attn_norm = im->norms + (4 * l + 0) * C;
        m->layers[l].post_attn_norm = im->norms + (4 * l + 1) * C;
        m->layers[l].pre_ffn_norm = im->norms + (4 * l + 2) * C;
        m->layers[l].post_ffn_norm = im->norms + (4 * l + 3) * C;
    }
    m->final_norm = im->norms + 4 * L * C;
    return KMED_OK;
}

KMED_API void kmed_gemma_free(kmed_gemma *m)
{
    kmed__gemma_impl *im;
    size_t i;
    if (!m) return;
    im = (kmed__gemma_impl *)m->impl_;
    if (im) {
        for (i = 0; i < im->n_bufs; i++) KMED_FREE(im->bufs[i]);
        KMED_FREE(im->bufs);
        KMED_FREE(im->norms);
        KMED_FREE(im->layers);
        if (im->has_st) kmed_st_close(&im->st);
        if (im->has_gguf) kmed_gguf_close(&im->gguf);
        KMED_FREE(im);
    }
    memset(m, 0, sizeof *m);
}

static kmed_result kmed__gemma_check_weight(const kmed_weight *w, const char *what, int l,
                                            size_t rows, size_t cols, kmed_error *err)
{
    char name[64];
    if (l < 0) snprintf(name, sizeof name, "%s", what);
    else snprintf(name, sizeof name, "%s of layer %d", what, l);
    if (!w->data)
        return KMED__ERR(err, KMED_ERR_STATE, "gemma: weight %s is not set", name);
    if (!kmed_dtype_computable(w->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gemma: weight %s has dtype %s, which "
                         "kmed cannot compute with", name, kmed_dtype_name(w->type));
    if (w->rows != rows || w->cols != cols)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma: weight %s is [%zu, %zu], expected "
                         "[%zu, %zu] from the config", name, w->rows, w->cols, rows, cols);
    if (w->type == KMED_Q8_0 || w->type == KMED_Q4_0 ? cols % KMED_QK != 0 : 0)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma: weight %s: %zu columns is not a "
                         "multiple of %d", name, cols, KMED_QK);
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_validate(const kmed_gemma *m, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t QD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    int l;
    kmed_result r;
    if (!m->layers || !m->final_norm)
        return KMED__ERR(err, KMED_ERR_STATE, "gemma: model not initialised");
    r = kmed__gemma_check_weight(&m->embed, "embed", -1, (size_t)c->vocab_size, C, err);
    if (r != KMED_OK) return r;
    for (l = 0; l < c->n_layers; l++) {
        const kmed_gemma_layer *y = &m->layers[l];
        if ((r = kmed__gemma_check_weight(&y->q, "q", l, QD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->k, "k", l, KD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->v, "v", l, KD, C, err)) ||
            (r = kmed__gemma_check_weight(&y->o, "o", l, C, QD, err)) ||
            (r = kmed__gemma_check_weight(&y->gate, "gate", l, F, C, err)) ||
            (r = kmed__gemma_check_weight(&y->up, "up", l, F, C, err)) ||
            (r = kmed__gemma_check_weight(&y->down, "down", l, C, F, err)))
            return r;
        if (!y->attn_norm || !y->post_attn_norm || !y->pre_ffn_norm || !y->post_ffn_norm)
            return KMED__ERR(err, KMED_ERR_STATE, "gemma: a norm of layer %d is not set", l);
    }
    return KMED_OK;
}

KMED_API size_t kmed_gemma_weight_bytes(const kmed_gemma *m)
{
    size_t total = 0, C = (size_t)m->cfg.hidden_size;
    int l;
    const kmed_weight *w;
    if (!m->layers) return 0;
    total += kmed_dtype_bytes(m->embed.type, (uint64_t)m->embed.rows * m->embed.cols);
    for (l = 0; l < m->cfg.n_layers; l++) {
        for (w = &m->layers[l].q; w <= &m->layers[l].down; w++)
            total += kmed_dtype_bytes(w->type, (uint64_t)w->rows * w->cols);
    }
    return total + (4 * (size_t)m->cfg.n_layers + 1) * C * sizeof(float);
}

/* Fills w from a stored tensor: borrowed when the stored dtype is the target, converted
   row by row otherwise. target KMED_DTYPE_UNKNOWN keeps the stored dtype. */
static kmed_result kmed__gemma_set_weight(kmed_gemma *m, kmed_weight *w,
                                          const kmed_tensor_info *t, kmed_dtype target,
                                          int may_release, const char *file, kmed_error *err)
{
    kmed__gemma_impl *im = (kmed__gemma_impl *)m->impl_;
    size_t rows, cols, src_row, dst_row, i, done = 0;
    unsigned char *buf;
    float *tmp;
    if (t->ndim != 2)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s has %d dims, expected 2",
                          t->name, t->ndim);
    rows = (size_t)t->shape[0];
    cols = (size_t)t->shape[1];
    if (!kmed_dtype_computable(t->dtype))
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: stored type %s is "
                          "not supported (F32, F16, BF16, Q8_0, Q4_0)", t->name,
                          t->dtype == KMED_DTYPE_UNKNOWN ? kmed_ggml_type_name(t->ggml_type)
                                                         : kmed_dtype_name(t->dtype));
    if (target == KMED_DTYPE_UNKNOWN || target == t->dtype) {
        w->data = t->data;
        w->type = t->dtype;
        w->rows = rows;
        w->cols = cols;
        im->n_borrowed++;
        return KMED_OK;
    }
    if (!kmed_dtype_computable(target))
        return KMED__ERR(err, KMED_ERR_ARG, "gemma: cannot compute with dtype %s",
                         kmed_dtype_name(target));
    dst_row = kmed_dtype_bytes(target, cols);
    src_row = kmed_dtype_bytes(t->dtype, cols);
    if (!dst_row || !src_row)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s: row length %zu is not a "
                          "multiple of %d, required by %s", t->name, cols, KMED_QK,
                          kmed_dtype_name(dst_row ? t->dtype : target));
    buf = (unsigned char *)kmed__calloc(rows, dst_row);
    tmp = (float *)kmed__calloc(cols, sizeof(float));
    if (!buf || !tmp) {
        KMED_FREE(buf);
        KMED_FREE(tmp);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory converting %s", t->name);
    }
    for (i = 0; i < rows; i++) {
        const unsigned char *src = (const unsigned char *)t->data;
        kmed_dequantize_row(t->dtype, src + i * src_row, tmp, cols);
        kmed_quantize_row(target, tmp, buf + i * dst_row, cols);
        /* release the consumed source every ~8 MB: a large embedding stays off the peak */
        if (may_release && (i + 1) * src_row - done >= ((size_t)8 << 20)) {
            kmed__release_pages(src + done, (i + 1) * src_row - done);
            done = (i + 1) * src_row;
        }
    }
    KMED_FREE(tmp);
    if (may_release) kmed__release_pages(t->data, t->nbytes);
    im->bufs[im->n_bufs++] = buf;
    w->data = buf;
    w->type = target;
    w->rows = rows;
    w->cols = cols;
    return KMED_OK;
}

/* Copies a stored norm vector into f32 dst (C), subtracting 1 for GGUF (which stores 1+w). */
static kmed_result kmed__gemma_set_norm(float *dst, const kmed_tensor_info *t, size_t C,
                                        int gguf, const char *file, kmed_error *err)
{
    size_t i;
    if (kmed_tensor_numel(t) != C || t->ndim != 1)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file, "tensor %s: expected shape [%zu]",
                          t->name, C);
    if (t->dtype != KMED_F32 && t->dtype != KMED_F16 && t->dtype != KMED_BF16)
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: norm type %s, "
                          "expected F32, F16 or BF16", t->name, kmed_dtype_name(t->dtype));
    kmed_dequantize_row(t->dtype, t->data, dst, C);
    if (gguf)
        for (i = 0; i < C; i++) dst[i] -= 1.0f;
    return KMED_OK;
}

/* Tensor names of one layer in HF and llama.cpp spelling, in kmed_gemma_layer order:
   q k v o gate up down, then the norms attn post_attn pre_ffn post_ffn. */
static const char *const kmed__gemma_hf_names[11] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm"
};
static const char *const kmed__gemma_gguf_names[11] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"
};

static const kmed_tensor_info *kmed__gemma_find(const kmed__gemma_impl *im, const char *name)
{
    return im->has_gguf ? kmed_gguf_find_tensor(&im->gguf, name) : kmed_st_find(&im->st, name);
}

KMED_API kmed_result kmed_gemma_load(kmed_gemma *m, const char *path,
                                     const kmed_gemma_opts *opts, kmed_error *err)
{
    kmed_gemma_config cfg;
    kmed_gemma_opts def;
    kmed__gemma_impl *im;
    kmed_gguf g;
    kmed_st st;
    kmed_result r;
    kmed_dtype target;
    size_t plen = strlen(path), C, l, done = 0, total;
    int is_gguf = plen >= 5 && strcmp(path + plen - 5, ".gguf") == 0 && !kmed_is_dir(path);
    int t;
    char name[256];
    const kmed_tensor_info *ti;
    const char *const *names = is_gguf ? kmed__gemma_gguf_names : kmed__gemma_hf_names;

    memset(m, 0, sizeof *m);
    if (!opts) {
        memset(&def, 0, sizeof def);
        opts = &def;
    }
    target = opts->convert ? opts->type : KMED_DTYPE_UNKNOWN;
    if (opts->convert && !kmed_dtype_computable(target))
        return KMED__ERR(err, KMED_ERR_ARG, "gemma: compute type %s is not one of F32, F16, "
                         "BF16, Q8_0, Q4_0", kmed_dtype_name(target));
    if (is_gguf) {
        r = kmed_gguf_open(&g, path, err);
        if (r != KMED_OK) return r;
        r = kmed_gemma_config_from_gguf(&cfg, &g, err);
        if (r != KMED_OK) {
            kmed_gguf_close(&g);
            return r;
        }
    } else {
        char dir[1024];
        FILE *probe = kmed_is_dir(path) ? NULL : fopen(path, "rb");
        if (!kmed_is_dir(path) && !probe)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "no such model directory or "
                              ".gguf/.safetensors file");
        if (probe) fclose(probe);
        if (kmed_is_dir(path)) {
            snprintf(dir, sizeof dir, "%s", path);
        } else {
            const char *slash = strrchr(path, '/');
            if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
            else snprintf(dir, sizeof dir, ".");
        }
        r = kmed_gemma_config_load(&cfg, dir, err);
        if (r != KMED_OK) return r;
        r = kmed_st_open(&st, path, err);
        if (r != KMED_OK) return r;
    }
    r = kmed_gemma_init(m, &cfg, err);
    if (r != KMED_OK) {
        if (is_gguf) kmed_gguf_close(&g);
        else kmed_st_close(&st);
        return r;
    }
    im = (kmed__gemma_impl *)m->impl_;
    if (is_gguf) { im->gguf = g; im->has_gguf = 1; }
    else { im->st = st; im->has_st = 1; }
    C = (size_t)cfg.hidden_size;
    total = 11 * (size_t)cfg.n_layers + 2;

    ti = kmed__gemma_find(im, is_gguf ? "token_embd.weight" : "model.embed_tokens.weight");
    if (!ti) {
        r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s",
                       is_gguf ? "token_embd.weight" : "model.embed_tokens.weight");
        goto fail;
    }
    r = kmed__gemma_set_weight(m, &m->embed, ti, target, 1, path, err);
    if (r != KMED_OK) goto fail;
    kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
    for (l = 0; l < (size_t)cfg.n_layers; l++) {
        kmed_gemma_layer *y = &m->layers[l];
        kmed_weight *ws[7];
        float *ns[4];
        ws[0] = &y->q; ws[1] = &y->k; ws[2] = &y->v; ws[3] = &y->o;
        ws[4] = &y->gate; ws[5] = &y->up; ws[6] = &y->down;
        ns[0] = y->attn_norm; ns[1] = y->post_attn_norm;
        ns[2] = y->pre_ffn_norm; ns[3] = y->post_ffn_norm;
        for (t = 0; t < 11; t++) {
            if (is_gguf) snprintf(name, sizeof name, "blk.%zu.%s.weight", l, names[t]);
            else snprintf(name, sizeof name, "model.layers.%zu.%s.weight", l, names[t]);
            ti = kmed__gemma_find(im, name);
            if (!ti) {
                r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s", name);
                goto fail;
            }
            if (t < 7) r = kmed__gemma_set_weight(m, ws[t], ti, target, 1, path, err);
            else r = kmed__gemma_set_norm(ns[t - 7], ti, C, is_gguf, path, err);
            if (r != KMED_OK) goto fail;
            kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
        }
    }
    ti = kmed__gemma_find(im, is_gguf ? "output_norm.weight" : "model.norm.weight");
    if (!ti) {
        r = KMED__ERRF(err, KMED_ERR_NOT_FOUND, path, "missing tensor %s",
                       is_gguf ? "output_norm.weight" : "model.norm.weight");
        goto fail;
    }
    r = kmed__gemma_set_norm(m->final_norm, ti, C, is_gguf, path, err);
    if (r != KMED_OK) goto fail;
    kmed_progress(&opts->cb, "load", (double)++done, (double)total, "tensors");
    r = kmed_gemma_validate(m, err);
    if (r != KMED_OK) goto fail;
    /* every weight converted: the file is no longer needed */
    if (im->n_borrowed == 0) {
        if (im->has_st) kmed_st_close(&im->st);
        if (im->has_gguf) kmed_gguf_close(&im->gguf);
        im->has_st = im->has_gguf = 0;
    }
    kmed_log(&opts->cb, KMED_LOG_INFO, "loaded %s: %d layers, hidden %d, vocab %d, %.1f MB "
             "of weights", path, cfg.n_layers, cfg.hidden_size, cfg.vocab_size,
             (double)kmed_gemma_weight_bytes(m) / 1e6);
    return KMED_OK;
fail:
    kmed_gemma_free(m);
    return r;
}

/* ---- forward ---- */

typedef struct kmed__gemma_scratch {
    size_t n_cap, r_cap, s_cap;
    int threads_cap;
    float *x, *xn, *q, *att, *tmp, *g, *u, *xa;  /* see kmed__gemma_scratch_ensure */
    float *scores;                                /* (threads, S) */
    int *pos;                                     /* (n) */
    int validated;
} kmed__gemma_scratch;

KMED_API kmed_result kmed_gemma_state_init(kmed_gemma_state *st, const kmed_gemma *m,
                                           size_t max_tokens, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t kv = (size_t)c->n_kv_heads * (size_t)c->head_dim, n;
    memset(st, 0, sizeof *st);
    if (max_tokens == 0 || max_tokens > 0x7fffffff)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma state: max_tokens %zu out of range",
                         max_tokens);
    if (!kmed__mul_ok((size_t)c->n_layers, max_tokens, &n) || !kmed__mul_ok(n, kv, &n) ||
        !kmed__mul_ok(n, sizeof(float), &n))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma state: KV cache size overflows");
    st->k_cache = (float *)KMED_MALLOC(n ? n : 1);
    st->v_cache = (float *)KMED_MALLOC(n ? n : 1);
    st->impl_ = kmed__calloc(1, sizeof(kmed__gemma_scratch));
    if (!st->k_cache || !st->v_cache || !st->impl_) {
        kmed_gemma_state_free(st);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma state: out of memory for a KV cache of "
                         "%zu bytes", 2 * n);
    }
    st->max_tokens = max_tokens;
    return KMED_OK;
}

static void kmed__gemma_scratch_free(kmed__gemma_scratch *s)
{
    KMED_FREE(s->x);
    KMED_FREE(s->scores);
    KMED_FREE(s->pos);
    s->x = s->scores = NULL;
    s->pos = NULL;
}

KMED_API void kmed_gemma_state_free(kmed_gemma_state *st)
{
    if (!st) return;
    if (st->impl_) {
        kmed__gemma_scratch_free((kmed__gemma_scratch *)st->impl_);
        KMED_FREE(st->impl_);
    }
    KMED_FREE(st->k_cache);
    KMED_FREE(st->v_cache);
    memset(st, 0, sizeof *st);
}

KMED_API kmed_result kmed_gemma_state_set_pos(kmed_gemma_state *st, size_t pos,
                                              kmed_error *err)
{
    if (pos > st->pos)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma state: cannot move forward to position "
                         "%zu (cache holds %zu tokens)", pos, st->pos);
    st->pos = pos;
    return KMED_OK;
}

/* Grows the scratch for n rows, LoRA rank r and `threads` attention rows of S keys. */
static kmed_result kmed__gemma_scratch_ensure(kmed__gemma_scratch *s, const kmed_gemma *m,
                                              size_t n, size_t r, size_t S, int threads,
                                              kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t QD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t per_row, total;
    if (n <= s->n_cap && r <= s->r_cap && S <= s->s_cap && threads <= s->threads_cap)
        return KMED_OK;
    if (n < s->n_cap) n = s->n_cap;
    if (r < s->r_cap) r = s->r_cap;
    if (S < s->s_cap) S = s->s_cap;
    if (threads < s->threads_cap) threads = s->threads_cap;
    kmed__gemma_scratch_free(s);
    s->n_cap = s->r_cap = s->s_cap = 0;
    s->threads_cap = 0;
    /* x, xn, tmp: C; q, att: QD; g, u: F; xa: r */
    per_row = 3 * C + 2 * QD + 2 * F + r;
    if (!kmed__mul_ok(per_row, n, &total))
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma: scratch size overflows");
    s->x = (float *)kmed__calloc(total, sizeof(float));
    s->scores = (float *)kmed__calloc((size_t)threads, S * sizeof(float));
    s->pos = (int *)kmed__calloc(n, sizeof(int));
    if (!s->x || !s->scores || !s->pos) {
        kmed__gemma_scratch_free(s);
        return KMED__ERR(err, KMED_ERR_NOMEM, "gemma: out of memory for scratch (%zu rows)",
                         n);
    }
    s->xn = s->x + n * C;
    s->tmp = s->xn + n * C;
    s->q = s->tmp + n * C;
    s->att = s->q + n * QD;
    s->g = s->att + n * QD;
    s->u = s->g + n * F;
    s->xa = s->u + n * F;
    s->n_cap = n;
    s->r_cap = r;
    s->s_cap = S;
    s->threads_cap = threads;
    return KMED_OK;
}

typedef struct kmed__gemma_attn_ctx {
    float *out;
    const float *q, *k, *v;
    const int *pos;
    float *scores;
    size_t N, S, H, Hkv, D, window;
    float scale, softcap;
} kmed__gemma_attn_ctx;

static void kmed__gemma_attn_job(void *ctx, size_t begin, size_t end, int thread)
{
    kmed__gemma_attn_ctx *a = (kmed__gemma_attn_ctx *)ctx;
    kmed__attention_forward(a->out, NULL, a->q, a->k, a->v, a->pos,
                            a->scores + (size_t)thread * a->S, a->N, a->S, a->H, a->Hkv,
                            a->D, a->scale, a->softcap, a->window, begin, end);
}

/* Below these sizes a parallel-for costs more than it saves (decode steps): rows for the
   elementwise jobs, query rows x keys for attention. */
#define KMED__GEMMA_PAR_ROWS 4
#define KMED__GEMMA_PAR_KEYS 256

/* Row-parallel elementwise work of the forward: GeGLU and the residual norms. */
typedef struct kmed__gemma_rows_ctx {
    int op;                     /* 0: geglu g = gelu(g) * u; 1: x += rmsnorm(t) */
    float *g; const float *u;   /* (n, F) */
    float *x, *t;               /* (n, C) */
    const float *w;
    size_t width;
    float eps;
} kmed__gemma_rows_ctx;

static void kmed__gemma_rows_job(void *ctx, size_t begin, size_t end, int thread)
{
    kmed__gemma_rows_ctx *c = (kmed__gemma_rows_ctx *)ctx;
    size_t W = c->width, i;
    (void)thread;
    if (c->op == 0) {
        kmed__geglu_forward(c->g + begin * W, c->g + begin * W, c->u + begin * W,
                            (end - begin) * W);
        return;
    }
    kmed__rmsnorm_forward(c->t + begin * W, NULL, c->t + begin * W, c->w, end - begin, W,
                          c->eps);
    for (i = begin * W; i < end * W; i++) c->x[i] += c->t[i];
}

/* x += rmsnorm(t) * (1 + w) over n rows (the post-attention / post-FFN residual). */
static void kmed__gemma_residual(kmed_pool *pool, float *x, float *t, const float *w,
                                 size_t n, size_t C, float eps)
{
    kmed__gemma_rows_ctx c;
    memset(&c, 0, sizeof c);
    c.op = 1;
    c.x = x;
    c.t = t;
    c.w = w;
    c.width = C;
    c.eps = eps;
    kmed_pool_for(n >= KMED__GEMMA_PAR_ROWS ? pool : NULL, n, 1, kmed__gemma_rows_job, &c);
}

/* Index of token id among the adapter's trainable tokens (ids ascending), -1 if none. */
static long kmed__lora_token(const kmed_lora *lora, int id)
{
    long lo = 0, hi = lora ? (long)lora->n_tokens - 1 : -1;
    while (lo <= hi) {
        long mid = lo + (hi - lo) / 2;
        if (lora->token_ids[mid] == id) return mid;
        if (lora->token_ids[mid] < id) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* y (n, out) = x W^T, plus the LoRA delta of target t when the adapter has it. */
static void kmed__gemma_linear(kmed_pool *pool, float *y, const float *x, const kmed_weight *w,
                               const kmed_lora *lora, size_t layer, int target, float *xa,
                               size_t n, int mm_flags)
{
    kmed_matmul(pool, y, x, w->data, w->type, n, w->rows, w->cols, mm_flags);
    if (lora && (lora->targets & (1u << target))) {
        const kmed_lora_ab *ab = &lora->ab[layer][target];
        if (ab->A && ab->B)
            kmed__lora_forward(pool, y, xa, x, ab->A, ab->B, n, w->rows, w->cols,
                               (size_t)lora->r, lora->scale);
    }
}

KMED_API kmed_result kmed_gemma_forward(const kmed_gemma *m, const kmed_lora *lora,
                                        kmed_gemma_state *st, kmed_pool *pool,
                                        const int *ids, size_t n, int flags,
                                        float *logits, float *hidden, kmed_error *err)
{
    const kmed_gemma_config *c = &m->cfg;
    kmed__gemma_scratch *s = (kmed__gemma_scratch *)st->impl_;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t H = (size_t)c->n_heads, Hkv = (size_t)c->n_kv_heads, D = (size_t)c->head_dim;
    size_t L = (size_t)c->n_layers, V = (size_t)c->vocab_size;
    size_t KD = Hkv * D, pos0 = st->pos, S, l, i;
    int mm = (flags & KMED_FWD_FAST) ? KMED_MM_FAST : 0;
    int threads = kmed_pool_threads(pool);
    kmed__gemma_attn_ctx actx;
    kmed__gemma_rows_ctx rctx;
    kmed_result r;

    if (!s) return KMED__ERR(err, KMED_ERR_STATE, "gemma: state not initialised");
    if (n == 0) return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: no tokens");
    if ((flags & (KMED_FWD_LOGITS_LAST | KMED_FWD_LOGITS_ALL)) && !logits)
        return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: logits requested, pointer NULL");
    if (n > st->max_tokens || pos0 > st->max_tokens - n)
        return KMED__ERR(err, KMED_ERR_LIMIT, "gemma forward: %zu + %zu tokens exceed the "
                         "state's %zu positions", pos0, n, st->max_tokens);
    for (i = 0; i < n; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= V)
            return KMED__ERR(err, KMED_ERR_ARG, "gemma forward: token %zu has id %d outside "
                             "[0, %zu)", i, ids[i], V);
    if (lora && lora->n_layers != c->n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gemma forward: adapter has %d layers, model "
                         "%d", lora->n_layers, c->n_layers);
    if (!s->validated) {
        r = kmed_gemma_validate(m, err);
        if (r != KMED_OK) return r;
        s->validated = 1;
    }
    S = pos0 + n;
    r = kmed__gemma_scratch_ensure(s, m, n, lora ? (size_t)lora->r : 0, st->max_tokens,
                                   threads, err);
    if (r != KMED_OK) return r;
    for (i = 0; i < n; i++) s->pos[i] = (int)(pos0 + i);

    kmed__embed_forward(s->x, ids, m->embed.data, m->embed.type, n, C);
    for (i = 0; lora && lora->n_tokens > 0 && i < n; i++) {   /* trainable tokens' rows */
        long k = kmed__lora_token(lora, ids[i]);
        const int row0 = 0;
        if (k >= 0)
            kmed__embed_forward(s->x + i * C, &row0, lora->token_rows + (size_t)k * C,
                                KMED_F32, 1, C);
    }
    if (hidden) memcpy(hidden, s->x, n * C * sizeof(float));

    memset(&rctx, 0, sizeof rctx);
    rctx.width = F;
    actx.q = s->q;
    actx.out = s->att;
    actx.pos = s->pos;
    actx.scores = s->scores;
    actx.N = n;
    actx.S = S;
    actx.H = H;
    actx.Hkv = Hkv;
    actx.D = D;
    actx.scale = (float)(1.0 / sqrt((double)c->query_pre_attn_scalar));
    actx.softcap = c->attn_softcap;
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *y = &m->layers[l];
        float *kc = st->k_cache + (l * st->max_tokens) * KD; /* (max_tokens, Hkv*D) */
        float *vc = st->v_cache + (l * st->max_tokens) * KD; /* (max_tokens, Hkv*D) */

        kmed__rmsnorm_forward(s->xn, NULL, s->x, y->attn_norm, n, C, c->rms_norm_eps);
        kmed__gemma_linear(pool, s->q, s->xn, &y->q, lora, l, KMED_LORA_Q, s->xa, n, mm);
        kmed__gemma_linear(pool, kc + pos0 * KD, s->xn, &y->k, lora, l, KMED_LORA_K, s->xa,
                           n, mm);
        kmed__gemma_linear(pool, vc + pos0 * KD, s->xn, &y->v, lora, l, KMED_LORA_V, s->xa,
                           n, mm);
        kmed__rope_forward(s->q, s->q, s->pos, n, H, D, c->rope_theta);
        kmed__rope_forward(kc + pos0 * KD, kc + pos0 * KD, s->pos, n, Hkv, D, c->rope_theta);

        /* even layers use the sliding window (Gemma-2 alternates local and global) */
        actx.window = (l % 2 == 0) ? (size_t)c->sliding_window : 0;
        actx.k = kc;
        actx.v = vc;
        kmed_pool_for(n * S >= KMED__GEMMA_PAR_KEYS ? pool : NULL, H, 1, kmed__gemma_attn_job,
                      &actx);

        kmed__gemma_linear(pool, s->tmp, s->att, &y->o, lora, l, KMED_LORA_O, s->xa, n, mm);
        kmed__gemma_residual(pool, s->x, s->tmp, y->post_attn_norm, n, C, c->rms_norm_eps);

        kmed__rmsnorm_forward(s->xn, NULL, s->x, y->pre_ffn_norm, n, C, c->rms_norm_eps);
        kmed__gemma_linear(pool, s->g, s->xn, &y->gate, lora, l, KMED_LORA_GATE, s->xa, n,
                           mm);
        kmed__gemma_linear(pool, s->u, s->xn, &y->up, lora, l, KMED_LORA_UP, s->xa, n, mm);
        rctx.g = s->g;
        rctx.u = s->u;
        kmed_pool_for(n >= KMED__GEMMA_PAR_ROWS ? pool : NULL, n, 1, kmed__gemma_rows_job,
                      &rctx);
        kmed__gemma_linear(pool, s->tmp, s->g, &y->down, lora, l, KMED_LORA_DOWN, s->xa, n,
                           mm);
        kmed__gemma_residual(pool, s->x, s->tmp, y->post_ffn_norm, n, C, c->rms_norm_eps);
        if (hidden) memcpy(hidden + (l + 1) * n * C, s->x, n * C * sizeof(float));
    }

    if (flags & (KMED_FWD_LOGITS_LAST | KMED_FWD_LOGITS_ALL)) {
        size_t first = (flags & KMED_FWD_LOGITS_ALL) ? 0 : n - 1, rows = n - first;
        float *xn = (flags & KMED_FWD_NO_HEAD) ? logits : s->xn;
        kmed__rmsnorm_forward(xn, NULL, s->x + first * C, m->final_norm, rows, C,
                              c->rms_norm_eps);
        if (!(flags & KMED_FWD_NO_HEAD)) kmed_gemma_head(m, lora, pool, xn, rows, flags, logits);
    }
    st->pos = pos0 + n;
    return KMED_OK;
}

KMED_API void kmed_gemma_head(const kmed_gemma *m, const kmed_lora *lora, kmed_pool *pool,
                              const float *xn, size_t rows, int flags, float *logits)
{
    size_t V = (size_t)m->cfg.vocab_size, C = (size_t)m->cfg.hidden_size, r, j;
    int k;
    kmed_matmul(pool, logits, xn, m->embed.data, m->embed.type, rows, V, C,
                (flags & KMED_FWD_FAST) ? KMED_MM_FAST : 0);
    for (k = 0; lora && k < lora->n_tokens; k++)   /* the tied head reads the token rows */
        for (r = 0; r < rows; r++) {
            const float *e = lora->token_rows + (size_t)k * C, *x = xn + r * C;
            float s = 0.0f;
            for (j = 0; j < C; j++) s += x[j] * e[j];
            logits[r * V + (size_t)lora->token_ids[k]] = s;
        }
    kmed__softcap_forward(logits, logits, rows * V, m->cfg.final_softcap);
}

/* ---- .npy ---- */

KMED_API kmed_result kmed_npy_write(const char *path, kmed_dtype dtype, const void *data,
                                    int ndim, const uint64_t *shape, kmed_error *err)
{
    char hdr[256];
    size_t hl, pad, n = 1, bytes;
    int i, k;
    const char *descr = dtype == KMED_F32 ? "<f4" : dtype == KMED_I32 ? "<i4"
                        : dtype == KMED_I64 ? "<i8" : NULL;
    if (!descr || ndim < 0 || ndim > KMED_MAX_DIMS)
        return KMED__ERRF(err, KMED_ERR_ARG, path, "npy: only F32/I32/I64 up to %d dims",
                          KMED_MAX_DIMS);
    k = snprintf(hdr + 10, sizeof hdr - 10, "{'descr': '%s', 'fortran_order': False, "
                 "'shape': (", descr);
    for (i = 0; i < ndim; i++) {
        k += snprintf(hdr + 10 + k, sizeof hdr - 10 - (size_t)k, "%llu%s",
                      (unsigned long long)shape[i], ndim == 1 || i + 1 < ndim ? ", " : "");
        if (!kmed__mul_ok(n, (size_t)shape[i], &n))
            return KMED__ERRF(err, KMED_ERR_LIMIT, path, "npy: shape overflows");
    }
    if (ndim == 1) k -= 1; /* "(n,)" */
    k += snprintf(hdr + 10 + k, sizeof hdr - 10 - (size_t)k, "), }");
    hl = 10 + (size_t)k + 1;
    pad = (64 - hl % 64) % 64;  /* header (with its newline) padded to 64 bytes */
    memset(hdr + 10 + k, ' ', pad);
    hdr[10 + k + pad] = '\n';
    hl += pad;
    memcpy(hdr, "\x93NUMPY\x01\x00", 8);
    hdr[8] = (char)((hl - 10) & 0xff);
    hdr[9] = (char)((hl - 10) >> 8);
    if (!kmed__mul_ok(n, dtype == KMED_I64 ? 8 : 4, &bytes))
        return KMED__ERRF(err, KMED_ERR_LIMIT, path, "npy: size overflows");
    {
        kmed_afile a;
        kmed_result r = kmed_afile_open(&a, path, err);
        if (r != KMED_OK) return r;
        if ((r = kmed_afile_write(&a, hdr, hl, err)) != KMED_OK ||
            (r = kmed_afile_write(&a, data, bytes, err)) != KMED_OK) {
            kmed_afile_abort(&a);
            return r;
        }
        return kmed_afile_commit(&a, err);
    }
}

KMED_API kmed_result kmed_npy_read(const char *path, kmed_dtype *dtype, int *ndim,
                                   uint64_t *shape, void **data, kmed_error *err)
{
    char *buf = NULL, *h, *p, *end;
    size_t len = 0, hl, off, n = 1, esz, bytes;
    int nd = 0;
    kmed_result r = kmed_file_read(path, 0, &buf, &len, err);
    *data = NULL;
    if (r != KMED_OK) return r;
    if (len < 10 || memcmp(buf, "\x93NUMPY", 6) != 0) goto bad;
    if (buf[6] == 1) { hl = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8; off = 10; }
    else if (buf[6] == 2 || buf[6] == 3) {
        if (len < 12) goto bad;
        hl = (unsigned char)buf[8] | (size_t)(unsigned char)buf[9] << 8 |
             (size_t)(unsigned char)buf[10] << 16 | (size_t)(unsigned char)buf[11] << 24;
        off = 12;
    } else goto bad;
    if (hl > len - off) goto bad;
    h = buf + off;
    end = h + hl;
    {
        char save = *end;
        *end = 0;
        if (strstr(h, "'fortran_order': True")) { *end = save; goto bad; }
        if (strstr(h, "'<f4'")) { *dtype = KMED_F32; esz = 4; }
        else if (strstr(h, "'<i4'")) { *dtype = KMED_I32; esz = 4; }
        else if (strstr(h, "'<i8'")) { *dtype = KMED_I64; esz = 8; }
        else { *end = save; goto bad; }
        p = strstr(h, "'shape': (");
        if (!p) { *end = save; goto bad; }
        p += 10;
        while (*p && *p != ')') {
            char *q;
            unsigned long long v;
            while (*p == ' ' || *p == ',') p++;
            if (*p == ')') break;
            v = strtoull(p, &q, 10);
            if (q == p || nd >= KMED_MAX_DIMS || !kmed__mul_ok(n, (size_t)v, &n)) {
                *end = save;
                goto bad;
            }
            shape[nd++] = v;
            p = q;
        }
        *end = save;
    }
    if (!kmed__mul_ok(n, esz, &bytes) || bytes != len - off - hl) goto bad;
    *data = KMED_MALLOC(bytes ? bytes : 1);
    if (!*data) {
        kmed_free(buf);
        return KMED__ERRF(err, KMED_ERR_NOMEM, path, "npy: out of memory");
    }
    memcpy(*data, buf + off + hl, bytes);
    *ndim = nd;
    kmed_free(buf);
    return KMED_OK;
bad:
    kmed_free(buf);
    return KMED__ERRF(err, KMED_ERR_FORMAT, path, "not a little-endian C-order float32/int32/"
                      "int64 .npy file");
}

/* ==== kmed_generate: sampling and generation ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- sampling ---- */

typedef struct kmed__sample_cand { float v; int id; } kmed__sample_cand;

KMED_API size_t kmed_argmax(const float *x, size_t n)
{
    size_t i, best = 0;
    for (i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

KMED_API kmed_result kmed_sampler_init(kmed_sampler *s, const kmed_sample_config *cfg,
                                       size_t V, kmed_error *err)
{
    memset(s, 0, sizeof *s);
    if (cfg) s->cfg = *cfg;
    if (V == 0 || V > (size_t)0x7FFFFFFF)
        return KMED__ERR(err, KMED_ERR_ARG, "sampler: vocabulary size %zu out of range", V);
    if (s->cfg.top_k < 0 || s->cfg.top_p < 0 || s->cfg.repeat_penalty < 0 ||
        s->cfg.temperature != s->cfg.temperature)
        return KMED__ERR(err, KMED_ERR_ARG, "sampler: negative top_k, top_p or repeat_penalty");
    s->V = V;
    kmed_rng_seed(&s->rng, s->cfg.seed);
    s->work_ = (float *)kmed__calloc(V, sizeof(float));
    s->cand_ = kmed__calloc(V, sizeof(kmed__sample_cand));
    if (!s->work_ || !s->cand_) {
        kmed_sampler_free(s);
        return KMED__ERR(err, KMED_ERR_NOMEM, "sampler: out of memory for V = %zu", V);
    }
    return KMED_OK;
}

KMED_API void kmed_sampler_free(kmed_sampler *s)
{
    if (!s) return;
    KMED_FREE(s->work_);
    KMED_FREE(s->cand_);
    s->work_ = NULL;
    s->cand_ = NULL;
}

/* Descending by value, ascending id on ties, so the order never depends on qsort. */
static int kmed__sample_cmp(const void *a, const void *b)
{
    const kmed__sample_cand *x = (const kmed__sample_cand *)a;
    const kmed__sample_cand *y = (const kmed__sample_cand *)b;
    if (x->v != y->v) return x->v > y->v ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* 1 if a ranks below b (smaller value, or equal value and larger id). */
static int kmed__sample_worse(const kmed__sample_cand *a, const kmed__sample_cand *b)
{
    return a->v < b->v || (a->v == b->v && a->id > b->id);
}

static void kmed__sample_sift(kmed__sample_cand *h, size_t n, size_t i)
{
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        kmed__sample_cand t;
        if (l < n && kmed__sample_worse(&h[l], &h[m])) m = l;
        if (r < n && kmed__sample_worse(&h[r], &h[m])) m = r;
        if (m == i) return;
        t = h[i]; h[i] = h[m]; h[m] = t;
        i = m;
    }
}

/* The k best of w[0..V) into c[0..k), sorted best first: a min-heap of the best so far. */
static void kmed__sample_top_k(kmed__sample_cand *c, const float *w, size_t V, size_t k)
{
    size_t i;
    for (i = 0; i < k; i++) { c[i].v = w[i]; c[i].id = (int)i; }
    for (i = k / 2; i-- > 0;) kmed__sample_sift(c, k, i);
    for (i = k; i < V; i++) {
        kmed__sample_cand x;
        x.v = w[i];
        x.id = (int)i;
        if (kmed__sample_worse(&c[0], &x)) { c[0] = x; kmed__sample_sift(c, k, 0); }
    }
    qsort(c, k, sizeof *c, kmed__sample_cmp);
}

KMED_API int kmed_sampler_sample(kmed_sampler *s, const float *logits, const int *recent,
                                 size_t n_recent)
{
    const kmed_sample_config *cfg = &s->cfg;
    kmed__sample_cand *c = (kmed__sample_cand *)s->cand_; /* (V) */
    float *w = s->work_;                                  /* (V) */
    size_t V = s->V, i, n_c;
    float mx, inv_t;
    double z, keep, u, acc;

    memcpy(w, logits, V * sizeof *w);
    if (cfg->repeat_penalty > 0 && cfg->repeat_penalty != 1 && recent && n_recent) {
        size_t win = cfg->repeat_last_n == 0 ? 64 :
                     cfg->repeat_last_n < 0 ? n_recent : (size_t)cfg->repeat_last_n;
        const int *r = recent + (n_recent > win ? n_recent - win : 0);
        size_t nr = n_recent > win ? win : n_recent;
        /* cand_[id].id marks tokens already penalised: each distinct token once. */
        for (i = 0; i < nr; i++)
            if (r[i] >= 0 && (size_t)r[i] < V) c[r[i]].id = 0;
        for (i = 0; i < nr; i++) {
            int t = r[i];
            if (t < 0 || (size_t)t >= V || c[t].id) continue;
            c[t].id = 1;
            w[t] = w[t] > 0 ? w[t] / cfg->repeat_penalty : w[t] * cfg->repeat_penalty;
        }
    }
    if (!(cfg->temperature > 0) || cfg->top_k == 1) return (int)kmed_argmax(w, V);

    inv_t = 1.0f / cfg->temperature;
    for (i = 0; i < V; i++) w[i] *= inv_t;
    mx = w[kmed_argmax(w, V)];
    if (cfg->top_k > 0 && (size_t)cfg->top_k < V) {
        n_c = (size_t)cfg->top_k;
        kmed__sample_top_k(c, w, V, n_c);
        for (z = 0, i = 0; i < n_c; i++) {
            c[i].v = expf(c[i].v - mx); /* same order: exp is monotonic */
            z += c[i].v;
        }
    } else {
        /* w becomes the unnormalized probabilities exp(w - max), computed once. */
        for (z = 0, i = 0; i < V; i++) {
            w[i] = expf(w[i] - mx);
            z += w[i];
        }
        if (!(cfg->top_p > 0 && cfg->top_p < 1)) {
            /* Plain temperature sampling: one pass, no sort. */
            u = kmed_rng_uniform(&s->rng) * z;
            for (acc = 0, i = 0; i < V; i++) {
                acc += w[i];
                if (u < acc) return (int)i;
            }
            return (int)kmed_argmax(w, V);
        }
        /* Tokens with p < (1 - top_p) / V together hold less than 1 - top_p, so the
           nucleus lies among the others: sort only those. */
        {
            double thr = (1.0 - (double)cfg->top_p) / (double)V * z;
            for (n_c = 0, i = 0; i < V; i++) {
                if ((double)w[i] >= thr) {
                    c[n_c].v = w[i];
                    c[n_c].id = (int)i;
                    n_c++;
                }
            }
            qsort(c, n_c, sizeof *c, kmed__sample_cmp);
        }
    }
    keep = z;
    if (cfg->top_p > 0 && cfg->top_p < 1) {
        /* Smallest prefix of the sorted candidates whose mass reaches top_p. */
        double target = (double)cfg->top_p * z;
        for (acc = 0, i = 0; i < n_c; i++) {
            acc += c[i].v;
            if (acc >= target) { i++; break; }
        }
        n_c = i;
        keep = acc;
    }
    u = kmed_rng_uniform(&s->rng) * keep;
    for (acc = 0, i = 0; i < n_c; i++) {
        acc += c[i].v;
        if (u < acc) return c[i].id;
    }
    return c[n_c ? n_c - 1 : 0].id;
}

/* ---- generation ---- */

/* 1 if id is a byte-fallback piece "<0xXX>", whose text depends on its neighbours. */
static int kmed__gen_is_byte(const kmed_tok *tok, int id)
{
    size_t len = 0;
    const char *p = kmed_tok_piece(tok, id, &len);
    return p && len == 6 && p[0] == '<' && p[1] == '0' && p[2] == 'x' && p[5] == '>';
}

/* Decoded answer text, kept incrementally: text = decode(ids[0..anchor)) followed by
   decode(ids[anchor..n)). A tokenizer.json decoder only joins runs of byte pieces, so the
   anchor may move past any token that is not a byte piece; SentencePiece decoding strips a
   leading space, so those re-decode from the start. */
typedef struct kmed__gen_text {
    kmed_buf text;
    size_t committed;        /* bytes of text that decode(ids[0..anchor)) produced */
    size_t anchor;
} kmed__gen_text;

static kmed_result kmed__gen_decode(kmed__gen_text *g, const kmed_tok *tok, const int *ids,
                                    size_t n, kmed_error *err)
{
    kmed_result r;
    int incremental = tok->kind == KMED_TOK_HF_BPE;
    if (!incremental) { g->anchor = 0; g->committed = 0; }
    g->text.len = g->committed;
    if (g->text.data) g->text.data[g->text.len] = 0;
    r = kmed_tok_decode(tok, ids + g->anchor, n - g->anchor, 1, &g->text, err);
    if (r != KMED_OK) return r;
    if (g->text.failed) return KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
    if (!g->text.data) kmed_buf_put(&g->text, "", 0);
    if (incremental && n > 0 && !kmed__gen_is_byte(tok, ids[n - 1])) {
        g->anchor = n;
        g->committed = g->text.len;
    }
    return KMED_OK;
}

/* Bytes at the end of s[0..n) that might still change or start a stop string. */
static size_t kmed__gen_holdback(const char *s, size_t n, int last_is_byte,
                                 const char *const *stop, size_t n_stop)
{
    size_t hold = 0, k, l;
    /* Trailing U+FFFD after a byte piece may become a character with the next byte. */
    if (last_is_byte)
        while (hold + 3 <= n && memcmp(s + n - hold - 3, "\xEF\xBF\xBD", 3) == 0) hold += 3;
    for (k = 0; k < n_stop; k++) {
        size_t sl = strlen(stop[k]);
        for (l = sl ? sl - 1 : 0; l > hold; l--) {
            if (l <= n && memcmp(s + n - l, stop[k], l) == 0) { hold = l; break; }
        }
    }
    return hold;
}

/* Earliest occurrence of any stop string in s[0..n) starting at or after `from`;
   n if none. */
static size_t kmed__gen_find_stop(const char *s, size_t n, size_t from,
                                  const char *const *stop, size_t n_stop)
{
    size_t best = n, k, i;
    for (k = 0; k < n_stop; k++) {
        size_t sl = strlen(stop[k]);
        if (sl == 0 || sl > n) continue;
        for (i = from; i + sl <= n && i < best; i++)
            if (memcmp(s + i, stop[k], sl) == 0) { best = i; break; }
    }
    return best;
}

typedef struct kmed__gen_emit {
    const kmed_generate_config *cfg;
    size_t emitted;          /* bytes of text handed to on_token */
} kmed__gen_emit;

/* Hands text[emitted..upto) to the callback. Returns KMED_STOP_SAFETY when the answer up
   to there is dangerous, KMED_STOP_CALLBACK when the callback asks to stop, else -1. */
static int kmed__gen_emit_upto(kmed__gen_emit *e, kmed_buf *text, size_t upto, int id)
{
    const kmed_generate_config *cfg = e->cfg;
    int stop = 0;
    if (!cfg->on_token) { e->emitted = upto > e->emitted ? upto : e->emitted; return -1; }
    if (upto > e->emitted && cfg->safety) {
        kmed_safety_verdict v;
        char saved = text->data[upto];
        text->data[upto] = 0;
        kmed_safety_classify((const kmed_safety *)cfg->safety, NULL, text->data, &v);
        text->data[upto] = saved;
        if (v.action == KMED_SAFETY_REFUSE) return KMED_STOP_SAFETY;
    }
    if (upto > e->emitted) {
        stop = cfg->on_token(cfg->user, id, text->data + e->emitted, upto - e->emitted);
        e->emitted = upto;
    } else {
        stop = cfg->on_token(cfg->user, id, "", 0);
    }
    return stop ? KMED_STOP_CALLBACK : -1;
}

KMED_API void kmed_generate_result_free(kmed_generate_result *res)
{
    if (!res) return;
    KMED_FREE(res->text);
    KMED_FREE(res->raw);
    KMED_FREE(res->ids);
    memset(res, 0, sizeof *res);
}

KMED_API kmed_result kmed_generate(const kmed_gemma *m, const kmed_lora *lora,
                                   const kmed_tok *tok, kmed_gemma_state *st, kmed_pool *pool,
                                   const int *prompt, size_t n_prompt,
                                   const kmed_generate_config *cfg, kmed_generate_result *res,
                                   kmed_error *err)
{
    kmed_generate_config zero_cfg;
    kmed_sampler sampler;
    kmed__gen_text gt;
    kmed__gen_emit em;
    kmed_result r = KMED_OK;
    size_t V, cap, n_gen = 0, final_len = 0, prev_len = 0, maxstop = 0, k;
    int *hist = NULL;        /* (n_prompt + generated) history for the penalty */
    float *logits = NULL;    /* (V) */
    int stop = -1, fwd_flags, last_id = -1;
    double t0;

    memset(res, 0, sizeof *res);
    memset(&gt, 0, sizeof gt);
    memset(&sampler, 0, sizeof sampler);
    if (!cfg) { memset(&zero_cfg, 0, sizeof zero_cfg); cfg = &zero_cfg; }
    if (!m || !tok || !st || (!prompt && n_prompt))
        return KMED__ERR(err, KMED_ERR_ARG, "generate: model, tokenizer and state are required");
    if (n_prompt == 0 && st->pos == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "generate: empty prompt");
    if (n_prompt == 0)
        return KMED__ERR(err, KMED_ERR_ARG,
                         "generate: the prompt must hold at least one new token");
    em.cfg = cfg;
    em.emitted = 0;
    for (k = 0; k < cfg->n_stop; k++)
        if (strlen(cfg->stop[k]) > maxstop) maxstop = strlen(cfg->stop[k]);
    V = (size_t)m->cfg.vocab_size;
    fwd_flags = KMED_FWD_LOGITS_LAST | (cfg->fast ? KMED_FWD_FAST : 0);

    cap = cfg->max_tokens > 0 ? (size_t)cfg->max_tokens : st->max_tokens + 1;
    if (st->max_tokens > st->pos && cap > st->max_tokens - st->pos + 1)
        cap = st->max_tokens - st->pos + 1;
    hist = (int *)kmed__calloc(n_prompt + cap + 1, sizeof *hist);
    logits = (float *)kmed__calloc(V, sizeof *logits);
    if (!hist || !logits) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
        goto done;
    }
    memcpy(hist, prompt, n_prompt * sizeof *hist);
    if ((r = kmed_sampler_init(&sampler, &cfg->sample, V, err)) != KMED_OK) goto done;

    if (cfg->safety) {
        /* A dangerous request is refused before any compute. */
        kmed_safety_verdict v;
        kmed_safety_classify((const kmed_safety *)cfg->safety, cfg->safety_prompt, NULL, &v);
        if (v.action == KMED_SAFETY_REFUSE) { stop = KMED_STOP_SAFETY; goto finish; }
    }

    t0 = kmed_time_now();
    r = kmed_gemma_forward(m, lora, st, pool, prompt, n_prompt, fwd_flags, logits, NULL, err);
    res->prefill_s = kmed_time_now() - t0;
    if (r != KMED_OK) goto done;
    t0 = kmed_time_now();

    for (;;) {
        int id, eos;
        size_t at, hold;
        if (cfg->max_tokens > 0 && n_gen >= (size_t)cfg->max_tokens) {
            stop = KMED_STOP_MAX_TOKENS;
            break;
        }
        id = kmed_sampler_sample(&sampler, logits, hist, n_prompt + n_gen);
        hist[n_prompt + n_gen++] = id;
        last_id = id;
        eos = id == m->cfg.eos_id || id == tok->eos_id || (tok->eot_id >= 0 && id == tok->eot_id);
        if (eos) { stop = KMED_STOP_EOS; break; }
        if ((r = kmed__gen_decode(&gt, tok, hist + n_prompt, n_gen, err)) != KMED_OK) goto done;
        at = kmed__gen_find_stop(gt.text.data, gt.text.len,
                                 prev_len > maxstop ? prev_len - maxstop : 0, cfg->stop,
                                 cfg->n_stop);
        prev_len = gt.text.len;
        if (at < gt.text.len) {
            final_len = at;
            stop = kmed__gen_emit_upto(&em, &gt.text, at, id);
            if (stop < 0) stop = KMED_STOP_STRING;
            break;
        }
        hold = kmed__gen_holdback(gt.text.data, gt.text.len, kmed__gen_is_byte(tok, id),
                                  cfg->stop, cfg->n_stop);
        stop = kmed__gen_emit_upto(&em, &gt.text, gt.text.len - hold, id);
        if (stop >= 0) break;
        if (cfg->max_tokens > 0 && n_gen >= (size_t)cfg->max_tokens) {
            stop = KMED_STOP_MAX_TOKENS;
            break;
        }
        if (st->pos >= st->max_tokens) { stop = KMED_STOP_FULL; break; }
        r = kmed_gemma_forward(m, lora, st, pool, &id, 1, fwd_flags, logits, NULL, err);
        if (r != KMED_OK) goto done;
    }
    res->decode_s = kmed_time_now() - t0;
    if (stop != KMED_STOP_STRING) final_len = gt.text.data ? gt.text.len : 0;
    /* Whatever was held back is final now (no stop string completed it). */
    if (stop == KMED_STOP_EOS || stop == KMED_STOP_MAX_TOKENS || stop == KMED_STOP_FULL) {
        if (final_len > em.emitted) {
            int s2 = kmed__gen_emit_upto(&em, &gt.text, final_len, last_id);
            if (s2 == KMED_STOP_SAFETY) stop = KMED_STOP_SAFETY;
        }
    }

finish:
    res->stop = (kmed_stop_reason)stop;
    res->raw = kmed__strndup(gt.text.data ? gt.text.data : "", final_len);
    res->ids = (int *)kmed__calloc(n_gen ? n_gen : 1, sizeof *res->ids);
    if (!res->raw || !res->ids) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
        goto done;
    }
    memcpy(res->ids, hist + n_prompt, n_gen * sizeof *res->ids);
    res->n_ids = n_gen;
    res->safety_action = KMED_SAFETY_PASS;
    if (cfg->safety) {
        kmed_safety_verdict v;
        r = kmed_safety_check((const kmed_safety *)cfg->safety, cfg->safety_prompt, res->raw,
                              &v, &res->text, err);
        if (r != KMED_OK) goto done;
        res->safety_action = (int)v.action;
        res->safety_classes = v.classes;
    } else {
        res->text = kmed__strndup(res->raw, final_len);
        if (!res->text) r = KMED__ERR(err, KMED_ERR_NOMEM, "generate: out of memory");
    }

done:
    if (r != KMED_OK) kmed_generate_result_free(res);
    kmed_sampler_free(&sampler);
    kmed_buf_free(&gt.text);
    KMED_FREE(hist);
    KMED_FREE(logits);
    return r;
}

/* ==== kmed_convert: model export (HF safetensors, GGUF) and random init ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* One exported tensor: a linear weight (or the embedding) or a norm vector, with its names
   in both layouts. */
typedef struct kmed__cv_entry {
    char hf[96], gg[64];
    const kmed_weight *w;    /* NULL for a norm */
    const float *norm;       /* (cols) norm w, or NULL */
    size_t rows, cols;       /* a norm has rows 1 */
    int is_embed, is_norm;
    int layer, target;       /* linear layer weights: layer and KMED_LORA_* target, else -1 */
    size_t index;            /* position in model order (seeds random init) */
} kmed__cv_entry;

/* Source of f32 rows: the model, or the random initialiser. */
typedef kmed_result (*kmed__cv_fill_fn)(void *ctx, const kmed__cv_entry *e, size_t row,
                                        float *out);

/* Names in kmed_gemma_layer order (q k v o gate up down, norms attn post_attn pre_ffn
   post_ffn). */
static const char *const kmed__cv_hf_layer[11] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
    "post_feedforward_layernorm"
};
static const char *const kmed__cv_gg_layer[11] = {
    "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down",
    "attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"
};

/* Entries in model order: embedding, each layer's 11 tensors, final norm. m may be a shell
   whose weights are unset (random init): only shapes are taken from cfg then. */
static kmed__cv_entry *kmed__cv_entries(const kmed_gemma_config *c, const kmed_gemma *m,
                                        size_t *n_out)
{
    size_t L = (size_t)c->n_layers, n = 2 + 11 * L, i = 0, l;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    kmed__cv_entry *e = (kmed__cv_entry *)kmed__calloc(n, sizeof *e);
    if (!e) return NULL;
    snprintf(e[i].hf, sizeof e[i].hf, "model.embed_tokens.weight");
    snprintf(e[i].gg, sizeof e[i].gg, "token_embd.weight");
    e[i].w = m ? &m->embed : NULL;
    e[i].rows = (size_t)c->vocab_size;
    e[i].cols = C;
    e[i].is_embed = 1;
    e[i].layer = e[i].target = -1;
    i++;
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *ly = m ? &m->layers[l] : NULL;
        const kmed_weight *ws[7];
        const float *ns[4];
        size_t rows[7], cols[7];
        int t;
        ws[0] = ly ? &ly->q : NULL; rows[0] = HD; cols[0] = C;
        ws[1] = ly ? &ly->k : NULL; rows[1] = KD; cols[1] = C;
        ws[2] = ly ? &ly->v : NULL; rows[2] = KD; cols[2] = C;
        ws[3] = ly ? &ly->o : NULL; rows[3] = C; cols[3] = HD;
        ws[4] = ly ? &ly->gate : NULL; rows[4] = F; cols[4] = C;
        ws[5] = ly ? &ly->up : NULL; rows[5] = F; cols[5] = C;
        ws[6] = ly ? &ly->down : NULL; rows[6] = C; cols[6] = F;
        ns[0] = ly ? ly->attn_norm : NULL;
        ns[1] = ly ? ly->post_attn_norm : NULL;
        ns[2] = ly ? ly->pre_ffn_norm : NULL;
        ns[3] = ly ? ly->post_ffn_norm : NULL;
        for (t = 0; t < 11; t++, i++) {
            snprintf(e[i].hf, sizeof e[i].hf, "model.layers.%zu.%s.weight", l,
                     kmed__cv_hf_layer[t]);
            snprintf(e[i].gg, sizeof e[i].gg, "blk.%zu.%s.weight", l, kmed__cv_gg_layer[t]);
            e[i].layer = t < 7 ? (int)l : -1;
            e[i].target = t < 7 ? t : -1; /* ws[] is in KMED_LORA_Q..KMED_LORA_DOWN order */
            if (t < 7) {
                e[i].w = ws[t];
                e[i].rows = rows[t];
                e[i].cols = cols[t];
            } else {
                e[i].norm = ns[t - 7];
                e[i].is_norm = 1;
                e[i].rows = 1;
                e[i].cols = C;
            }
        }
    }
    snprintf(e[i].hf, sizeof e[i].hf, "model.norm.weight");
    snprintf(e[i].gg, sizeof e[i].gg, "output_norm.weight");
    e[i].norm = m ? m->final_norm : NULL;
    e[i].is_norm = 1;
    e[i].layer = e[i].target = -1;
    e[i].rows = 1;
    e[i].cols = C;
    i++;
    for (l = 0; l < n; l++) e[l].index = l;
    *n_out = n;
    return e;
}

/* Model source, optionally with a LoRA adapter merged on the fly: an adapted tensor is
   computed whole (W + scale B A, f32) on its first row, then served row by row. */
typedef struct kmed__cv_model_src {
    const kmed_gemma *m;
    const kmed_lora *lora;
    float *merged;           /* (rows, cols) of the tensor being merged, or NULL */
    size_t cur;              /* its entry index */
    kmed_result r;           /* first merge failure */
    kmed_error *err;
} kmed__cv_model_src;

/* 1 when the adapter changes tensor e: an adapted target, or the embedding whose rows
   trainable tokens replace. */
static int kmed__cv_adapted(const kmed_lora *lora, const kmed__cv_entry *e)
{
    if (lora && e->is_embed) return lora->n_tokens > 0;
    return lora && e->layer >= 0 && e->layer < lora->n_layers &&
           (lora->targets & (1u << e->target)) && lora->ab[e->layer][e->target].A;
}

/* Row of a model tensor as f32 (dequantized, or merged with the adapter). */
static kmed_result kmed__cv_fill_model(void *ctx, const kmed__cv_entry *e, size_t row,
                                       float *out)
{
    kmed__cv_model_src *src = (kmed__cv_model_src *)ctx;
    long tok = src && e->is_embed ? kmed__lora_token(src->lora, (int)row) : -1;
    if (src && !e->is_embed && kmed__cv_adapted(src->lora, e)) {
#ifdef KMED_NO_TRAIN
        return KMED__ERR(src->err, KMED_ERR_UNSUPPORTED, "merge: built with KMED_NO_TRAIN");
#else
        if (row == 0 || src->cur != e->index || !src->merged) {
            kmed_result r;
            KMED_FREE(src->merged);
            src->merged = (float *)kmed__calloc(e->rows * e->cols, sizeof(float));
            src->cur = e->index;
            if (!src->merged)
                return KMED__ERR(src->err, KMED_ERR_NOMEM, "merge: out of memory for %s", e->hf);
            r = kmed_lora_merged_weight(src->m, src->lora, e->layer, e->target, src->merged,
                                        src->err);
            if (r != KMED_OK) return r;
        }
        memcpy(out, src->merged + row * e->cols, e->cols * sizeof *out);
        if (row + 1 == e->rows) { KMED_FREE(src->merged); src->merged = NULL; }
        return KMED_OK;
#endif
    }
    if (e->is_norm) {
        memcpy(out, e->norm, e->cols * sizeof *out);
    } else if (tok >= 0) {   /* a trainable token's row replaces the embedding's */
        memcpy(out, src->lora->token_rows + (size_t)tok * e->cols, e->cols * sizeof *out);
    } else {
        size_t rb = kmed_dtype_bytes(e->w->type, e->cols);
        kmed_dequantize_row(e->w->type, (const unsigned char *)e->w->data + row * rb, out,
                            e->cols);
    }
    return KMED_OK;
}

/* Random init: each tensor has its own stream (seeded from seed and its model index), drawn
   row by row in order, so the values do not depend on the order tensors are written. */
typedef struct kmed__cv_rand {
    uint64_t seed;
    int pad_id;
    size_t cur;              /* index of the tensor the stream belongs to, or (size_t)-1 */
    const unsigned char *used;   /* [V] or NULL: embedding rows of other tokens are zero */
    kmed_rng rng;
} kmed__cv_rand;

static kmed_result kmed__cv_fill_rand(void *ctx, const kmed__cv_entry *e, size_t row,
                                      float *out)
{
    kmed__cv_rand *r = (kmed__cv_rand *)ctx;
    size_t j;
    if (r->cur != e->index || row == 0) {
        kmed_rng_seed(&r->rng, r->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(e->index + 1)));
        r->cur = e->index;
    }
    if (e->is_norm) {
        memset(out, 0, e->cols * sizeof *out); /* Gemma2RMSNorm starts at w = 0 */
        return KMED_OK;
    }
    /* initializer_range 0.02; the row is drawn even for the pad row so later rows do not
       depend on pad_id. */
    for (j = 0; j < e->cols; j++) out[j] = (float)(0.02 * kmed_rng_normal(&r->rng));
    if (e->is_embed && ((int)row == r->pad_id || (r->used && !r->used[row])))
        memset(out, 0, e->cols * sizeof *out);
    return KMED_OK;
}

/* ---- config.json ---- */

static void kmed__cv_json_float(kmed_buf *b, float x)
{
    if (x == floorf(x) && fabsf(x) < 1e9f) kmed_buf_printf(b, "%.1f", (double)x);
    else kmed_buf_json_f32(b, x);
}

KMED_API void kmed_gemma_config_json(const kmed_gemma_config *c, kmed_dtype dtype,
                                     kmed_buf *b)
{
    float q = c->query_pre_attn_scalar;
    kmed_buf_puts(b, "{\n  \"architectures\": [\n    \"Gemma2ForCausalLM\"\n  ],\n");
    kmed_buf_puts(b, "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n");
    kmed_buf_puts(b, "  \"attn_logit_softcapping\": ");
    if (c->attn_softcap > 0) kmed__cv_json_float(b, c->attn_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"bos_token_id\": %d,\n", c->bos_id);
    kmed_buf_puts(b, "  \"cache_implementation\": \"hybrid\",\n");
    kmed_buf_printf(b, "  \"eos_token_id\": %d,\n", c->eos_id);
    kmed_buf_puts(b, "  \"final_logit_softcapping\": ");
    if (c->final_softcap > 0) kmed__cv_json_float(b, c->final_softcap);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"head_dim\": %d,\n", c->head_dim);
    kmed_buf_puts(b, "  \"hidden_act\": \"gelu_pytorch_tanh\",\n"
                     "  \"hidden_activation\": \"gelu_pytorch_tanh\",\n");
    kmed_buf_printf(b, "  \"hidden_size\": %d,\n  \"initializer_range\": 0.02,\n",
                    c->hidden_size);
    kmed_buf_printf(b, "  \"intermediate_size\": %d,\n", c->intermediate_size);
    kmed_buf_printf(b, "  \"max_position_embeddings\": %d,\n", c->max_position);
    kmed_buf_puts(b, "  \"model_type\": \"gemma2\",\n");
    kmed_buf_printf(b, "  \"num_attention_heads\": %d,\n  \"num_hidden_layers\": %d,\n",
                    c->n_heads, c->n_layers);
    kmed_buf_printf(b, "  \"num_key_value_heads\": %d,\n  \"pad_token_id\": %d,\n",
                    c->n_kv_heads, c->pad_id);
    kmed_buf_puts(b, "  \"query_pre_attn_scalar\": ");
    /* HF writes an integer here for every released model */
    if (q == floorf(q) && q < 1e9f) kmed_buf_printf(b, "%d", (int)q);
    else kmed_buf_json_f32(b, q);
    kmed_buf_puts(b, ",\n  \"rms_norm_eps\": ");
    kmed_buf_json_f32(b, c->rms_norm_eps);
    kmed_buf_puts(b, ",\n  \"rope_theta\": ");
    kmed__cv_json_float(b, c->rope_theta);
    kmed_buf_puts(b, ",\n  \"sliding_window\": ");
    if (c->sliding_window > 0) kmed_buf_printf(b, "%d", c->sliding_window);
    else kmed_buf_puts(b, "null");
    kmed_buf_printf(b, ",\n  \"torch_dtype\": \"%s\",\n",
                    dtype == KMED_BF16 ? "bfloat16" : dtype == KMED_F16 ? "float16" : "float32");
    kmed_buf_puts(b, "  \"transformers_version\": \"4.44.2\",\n  \"use_cache\": true,\n");
    kmed_buf_printf(b, "  \"vocab_size\": %d\n}\n", c->vocab_size);
}

/* ---- HF writer ---- */

static int kmed__cv_cmp_hf(const void *a, const void *b)
{
    return strcmp((*(const kmed__cv_entry *const *)a)->hf,
                  (*(const kmed__cv_entry *const *)b)->hf);
}

/* Converts one tensor into buf (rows x row_bytes of dtype) from f32 rows. */
static kmed_result kmed__cv_convert(const kmed__cv_entry *e, kmed__cv_fill_fn fill, void *ctx,
                                    kmed_dtype dtype, unsigned char *buf, float *row)
{
    size_t r, rb = kmed_dtype_bytes(dtype, e->cols);
    kmed_result res;
    for (r = 0; r < e->rows; r++) {
        if ((res = fill(ctx, e, r, row)) != KMED_OK) return res;
        kmed_quantize_row(dtype, row, buf + r * rb, e->cols);
    }
    return KMED_OK;
}

static kmed_result kmed__cv_write_shard(const char *path, kmed__cv_entry **list, size_t n,
                                        kmed_dtype dtype, kmed__cv_fill_fn fill, void *ctx,
                                        float *row, const kmed_callbacks *cb, size_t *done,
                                        size_t total, kmed_error *err)
{
    static const char *const mk[1] = {"format"}, *const mv[1] = {"pt"};
    kmed_tensor_info *ti = (kmed_tensor_info *)kmed__calloc(n, sizeof *ti);
    kmed_st_writer w;
    kmed_result r;
    size_t i;
    if (!ti) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    for (i = 0; i < n; i++) {
        const kmed__cv_entry *e = list[i];
        ti[i].name = e->hf;
        ti[i].dtype = dtype;
        ti[i].ndim = e->is_norm ? 1 : 2;
        ti[i].shape[0] = ti[i].ndim == 1 ? e->cols : e->rows;
        ti[i].shape[1] = e->cols;
        ti[i].nbytes = e->rows * kmed_dtype_bytes(dtype, e->cols);
    }
    r = kmed_st_writer_open(&w, path, ti, n, mk, mv, 1, err);
    for (i = 0; i < n && r == KMED_OK; i++) {
        unsigned char *buf = (unsigned char *)KMED_MALLOC(ti[i].nbytes ? ti[i].nbytes : 1);
        if (!buf) {
            r = KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory for %s (%zu bytes)",
                          list[i]->hf, ti[i].nbytes);
            break;
        }
        r = kmed__cv_convert(list[i], fill, ctx, dtype, buf, row);
        if (r == KMED_OK) r = kmed_st_writer_put(&w, buf, ti[i].nbytes, err);
        KMED_FREE(buf);
        kmed_progress(cb, "save", (double)++*done, (double)total, "tensors");
    }
    if (r == KMED_OK) r = kmed_st_writer_commit(&w, err);
    else kmed_st_writer_abort(&w);
    KMED_FREE(ti);
    return r;
}

static kmed_result kmed__cv_write_json(const char *dir, const char *name, kmed_buf *b,
                                       kmed_error *err)
{
    char path[1200];
    kmed_result r = kmed_path_join(path, sizeof path, dir, name, err);
    if (r != KMED_OK) return r;
    if (b->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    return kmed_file_write_atomic(path, b->data, b->len, err);
}

static kmed_result kmed__cv_save_hf(const kmed_gemma_config *cfg, kmed__cv_entry *e,
                                    size_t n, const char *dir, const kmed_hf_save_opts *opts,
                                    kmed__cv_fill_fn fill, void *ctx, kmed_error *err)
{
    kmed_hf_save_opts def;
    kmed__cv_entry **order = NULL;
    size_t *shard_of = NULL, n_shards = 1, i, cur = 0, total = 0, done = 0, maxc = 0;
    float *row = NULL;
    kmed_buf b = {0};
    kmed_result r;
    char path[1200], fname[64];

    if (!opts) { memset(&def, 0, sizeof def); opts = &def; }
    if (opts->dtype != KMED_F32 && opts->dtype != KMED_BF16 && opts->dtype != KMED_F16)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "save: HF weights are written as F32, BF16 "
                         "or F16, not %s", kmed_dtype_name(opts->dtype));
    if ((r = kmed_mkdir_p(dir, err)) != KMED_OK) return r;
    order = (kmed__cv_entry **)kmed__calloc(n, sizeof *order);
    shard_of = (size_t *)kmed__calloc(n, sizeof *shard_of);
    for (i = 0; i < n; i++) if (e[i].cols > maxc) maxc = e[i].cols;
    row = (float *)kmed__calloc(maxc, sizeof *row);
    if (!order || !shard_of || !row) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
        goto done;
    }
    /* Shards fill in model order, as transformers' save_pretrained splits them. */
    for (i = 0; i < n; i++) {
        size_t bytes = e[i].rows * kmed_dtype_bytes(opts->dtype, e[i].cols);
        if (opts->max_shard_bytes && cur > 0 && cur + bytes > opts->max_shard_bytes) {
            n_shards++;
            cur = 0;
        }
        cur += bytes;
        total += bytes;
        shard_of[i] = n_shards - 1;
    }
    if (!opts->max_shard_bytes) n_shards = 1;
    for (i = 0; i < n_shards && r == KMED_OK; i++) {
        size_t k, m = 0;
        for (k = 0; k < n; k++)
            if (shard_of[k] == i) order[m++] = &e[k];
        /* Within a file tensors are stored in name order, as the safetensors library does. */
        qsort(order, m, sizeof *order, kmed__cv_cmp_hf);
        if (n_shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
        else snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", i + 1, n_shards);
        if ((r = kmed_path_join(path, sizeof path, dir, fname, err)) != KMED_OK) break;
        r = kmed__cv_write_shard(path, order, m, opts->dtype, fill, ctx, row, &opts->cb, &done,
                                 n, err);
    }
    if (r != KMED_OK) goto done;
    if (n_shards > 1) {
        for (i = 0; i < n; i++) order[i] = &e[i];
        qsort(order, n, sizeof *order, kmed__cv_cmp_hf);
        kmed_buf_printf(&b, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n"
                            "  \"weight_map\": {\n", total);
        for (i = 0; i < n; i++) {
            size_t s = shard_of[order[i]->index];
            kmed_buf_printf(&b, "    \"%s\": \"model-%05zu-of-%05zu.safetensors\"%s\n",
                            order[i]->hf, s + 1, n_shards, i + 1 < n ? "," : "");
        }
        kmed_buf_puts(&b, "  }\n}\n");
        r = kmed__cv_write_json(dir, "model.safetensors.index.json", &b, err);
        if (r != KMED_OK) goto done;
    }
    b.len = 0;
    kmed_buf_printf(&b, "{\n  \"bos_token_id\": %d,\n  \"eos_token_id\": %d,\n"
                        "  \"pad_token_id\": %d\n}\n", cfg->bos_id, cfg->eos_id, cfg->pad_id);
    if ((r = kmed__cv_write_json(dir, "generation_config.json", &b, err)) != KMED_OK) goto done;
    b.len = 0;
    kmed_gemma_config_json(cfg, opts->dtype, &b);
    r = kmed__cv_write_json(dir, "config.json", &b, err);
done:
    kmed_buf_free(&b);
    KMED_FREE(order);
    KMED_FREE(shard_of);
    KMED_FREE(row);
    return r;
}

/* Every weight set with a computable dtype and the config's shape. */
static kmed_result kmed__cv_check_model(const kmed__cv_entry *e, size_t n, kmed_error *err)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (!e[i].is_norm) {
            if (!e[i].w || !e[i].w->data || !kmed_dtype_computable(e[i].w->type) ||
                e[i].w->rows != e[i].rows || e[i].w->cols != e[i].cols ||
                !kmed_dtype_bytes(e[i].w->type, e[i].cols))
                return KMED__ERR(err, KMED_ERR_SHAPE, "save: weight %s is unset or not [%zu, "
                                 "%zu] in a computable dtype", e[i].hf, e[i].rows, e[i].cols);
        } else if (!e[i].norm) {
            return KMED__ERR(err, KMED_ERR_SHAPE, "save: norm %s is unset", e[i].hf);
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_gemma_save_hf(const kmed_gemma *m, const char *dir,
                                        const kmed_hf_save_opts *opts, kmed_error *err)
{
    size_t n;
    kmed_result r;
    kmed__cv_entry *e;
    kmed__cv_model_src src;
    if (!m || !m->layers || !dir) return KMED__ERR(err, KMED_ERR_ARG, "save: no model or dir");
    memset(&src, 0, sizeof src);
    src.m = m;
    src.lora = opts ? opts->lora : NULL;
    src.err = err;
    e = kmed__cv_entries(&m->cfg, m, &n);
    if (!e) return KMED__ERR(err, KMED_ERR_NOMEM, "save: out of memory");
    r = kmed__cv_check_model(e, n, err);
    if (r == KMED_OK && src.lora && src.lora->n_layers != m->cfg.n_layers)
        r = KMED__ERR(err, KMED_ERR_SHAPE, "save: adapter has %d layers, the model %d",
                      src.lora->n_layers, m->cfg.n_layers);
    if (r == KMED_OK)
        r = kmed__cv_save_hf(&m->cfg, e, n, dir, opts, kmed__cv_fill_model, &src, err);
    KMED_FREE(src.merged);
    KMED_FREE(e);
    return r;
}

KMED_API kmed_result kmed_gemma_init_random(const kmed_gemma_config *cfg, uint64_t seed,
                                            const unsigned char *used_tokens,
                                            const char *dir, const kmed_hf_save_opts *opts,
                                            kmed_error *err)
{
    size_t n;
    kmed_result r;
    kmed__cv_entry *e;
    kmed__cv_rand rs;
    if (!cfg || !dir) return KMED__ERR(err, KMED_ERR_ARG, "init: no config or dir");
    if ((r = kmed_gemma_config_validate(cfg, err)) != KMED_OK) return r;
    e = kmed__cv_entries(cfg, NULL, &n);
    if (!e) return KMED__ERR(err, KMED_ERR_NOMEM, "init: out of memory");
    rs.seed = seed;
    rs.pad_id = cfg->pad_id;
    rs.used = used_tokens;
    rs.cur = (size_t)-1;
    kmed_rng_seed(&rs.rng, seed);
    r = kmed__cv_save_hf(cfg, e, n, dir, opts, kmed__cv_fill_rand, &rs, err);
    KMED_FREE(e);
    return r;
}

/* ---- GGUF writer ---- */

/* llama.cpp's general.file_type (LLAMA_FTYPE_*) for the main weight type. */
static int kmed__cv_ftype(kmed_dtype t)
{
    switch (t) {
    case KMED_F32: return 0;
    case KMED_F16: return 1;
    case KMED_Q4_0: return 2;
    case KMED_Q8_0: return 7;
    case KMED_BF16: return 32;
    default: return -1;
    }
}

/* The per-id kinds and scores llama.cpp's converter writes: scores are -(rank of the first
   merge that yields the piece), 0 otherwise; types 1 normal, 2 unknown, 3 control, 4 user
   defined, 6 byte. */
enum { KMED__CV_TT_NORMAL = 1, KMED__CV_TT_UNKNOWN = 2, KMED__CV_TT_CONTROL = 3,
       KMED__CV_TT_USER = 4, KMED__CV_TT_BYTE = 6 };

static int kmed__cv_is_byte_piece(const char *p, size_t len)
{
    static const char hex[] = "0123456789ABCDEF";
    return len == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>' && strchr(hex, p[3]) &&
           strchr(hex, p[4]);
}

/* Reads merges and added tokens from a tokenizer.json into scores/types (V). */
static kmed_result kmed__cv_tok_json(const kmed_tok *tok, const char *path, float *scores,
                                     int32_t *types, size_t V, kmed_error *err)
{
    char file[1200];
    char *text = NULL;
    size_t len = 0, i;
    kmed_json_doc doc;
    const kmed_json *model, *merges, *added;
    kmed_buf cat = {0};
    kmed_result r;
    unsigned char *seen = NULL;
    if (kmed_is_dir(path)) {
        if ((r = kmed_path_join(file, sizeof file, path, "tokenizer.json", err)) != KMED_OK)
            return r;
    } else {
        snprintf(file, sizeof file, "%s", path);
    }
    r = kmed_file_read(file, KMED_MAX_TOK_FILE_BYTES, &text, &len, err);
    if (r != KMED_OK) return r;
    memset(&doc, 0, sizeof doc);
    r = kmed_json_parse(&doc, text, len, file, 0, err);
    kmed_free(text);
    if (r != KMED_OK) { kmed_json_free(&doc); return r; }
    model = kmed_json_get(doc.root, "model");
    merges = kmed_json_get(model, "merges");
    added = kmed_json_get(doc.root, "added_tokens");
    seen = (unsigned char *)kmed__calloc(V, 1);
    if (!seen) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
    if (merges && merges->type == KMED_JSON_ARRAY) {
        for (i = 0; i < merges->len; i++) {
            const kmed_json *mg = &merges->kids[i];
            int id;
            cat.len = 0;
            if (mg->type == KMED_JSON_STRING) {
                const char *sp = (const char *)memchr(mg->str + 1, ' ', mg->len ? mg->len - 1 : 0);
                if (!sp) continue;
                kmed_buf_put(&cat, mg->str, (size_t)(sp - mg->str));
                kmed_buf_put(&cat, sp + 1, mg->len - (size_t)(sp - mg->str) - 1);
            } else if (mg->type == KMED_JSON_ARRAY && mg->len == 2 &&
                       mg->kids[0].type == KMED_JSON_STRING &&
                       mg->kids[1].type == KMED_JSON_STRING) {
                kmed_buf_put(&cat, mg->kids[0].str, mg->kids[0].len);
                kmed_buf_put(&cat, mg->kids[1].str, mg->kids[1].len);
            } else {
                continue;
            }
            if (cat.failed) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory");
                goto done;
            }
            id = kmed_tok_id(tok, cat.data, cat.len);
            if (id >= 0 && (size_t)id < V && !seen[id]) {
                seen[id] = 1;
                scores[id] = -(float)i;
            }
        }
    }
    if (added && added->type == KMED_JSON_ARRAY) {
        for (i = 0; i < added->len; i++) {
            const kmed_json *a = &added->kids[i];
            int64_t id;
            if (!kmed_json_int(kmed_json_get(a, "id"), &id) || id < 0 || (uint64_t)id >= V)
                continue;
            if (id == tok->unk_id) types[id] = KMED__CV_TT_UNKNOWN;
            else if (kmed_json_bool(kmed_json_get(a, "special"), 0))
                types[id] = KMED__CV_TT_CONTROL;
            else types[id] = KMED__CV_TT_USER;
        }
    }
done:
    KMED_FREE(seen);
    kmed_buf_free(&cat);
    kmed_json_free(&doc);
    return r;
}

static kmed_result kmed__cv_gguf_tokenizer(kmed_gguf_writer *w, const kmed_tok *tok, size_t V,
                                           const kmed_gguf_save_opts *opts, kmed_error *err)
{
    const char **strs = (const char **)kmed__calloc(V, sizeof *strs);
    size_t *lens = (size_t *)kmed__calloc(V, sizeof *lens);
    float *scores = (float *)kmed__calloc(V, sizeof *scores);
    int32_t *types = (int32_t *)kmed__calloc(V, sizeof *types);
    char (*pads)[32] = NULL;
    size_t i, n_tok = (size_t)kmed_tok_vocab_size(tok), n_pad = V > n_tok ? V - n_tok : 0;
    kmed_result r = KMED_OK;
    if (n_pad) pads = (char (*)[32])kmed__calloc(V, sizeof *pads);
    if (!strs || !lens || !scores || !types || (n_pad && !pads)) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory for the vocabulary");
        goto done;
    }
    for (i = 0; i < V; i++) {
        size_t len = 0;
        const char *p = i < n_tok ? kmed_tok_piece(tok, (int)i, &len) : NULL;
        if (!p) { /* llama.cpp's converter pads unused ids the same way */
            if (!pads) pads = (char (*)[32])kmed__calloc(V, sizeof *pads);
            if (!pads) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
            snprintf(pads[i], sizeof pads[i], "[PAD%zu]", i);
            p = pads[i];
            len = strlen(p);
            types[i] = KMED__CV_TT_USER;
        } else if ((int)i == tok->unk_id) {
            types[i] = KMED__CV_TT_UNKNOWN;
        } else if (kmed_tok_is_special(tok, (int)i)) {
            types[i] = KMED__CV_TT_CONTROL;
        } else if (kmed__cv_is_byte_piece(p, len)) {
            types[i] = KMED__CV_TT_BYTE;
        } else {
            types[i] = KMED__CV_TT_NORMAL;
        }
        strs[i] = p;
        lens[i] = len;
    }
    if (opts->tokenizer_json) {
        r = kmed__cv_tok_json(tok, opts->tokenizer_json, scores, types, V, err);
        if (r != KMED_OK) goto done;
    } else {
        kmed_log(&opts->cb, KMED_LOG_WARN, "gguf: no tokenizer.json given: "
                 "tokenizer.ggml.scores are 0 and user-defined tokens are typed normal");
    }
    kmed_gguf_add_str(w, "tokenizer.ggml.model", "llama");
    kmed_gguf_add_arr_str(w, "tokenizer.ggml.tokens", strs, lens, V);
    kmed_gguf_add_arr(w, "tokenizer.ggml.scores", KMED_GGUF_F32, scores, V);
    kmed_gguf_add_arr(w, "tokenizer.ggml.token_type", KMED_GGUF_I32, types, V);
    if (tok->bos_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)tok->bos_id);
    if (tok->eos_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)tok->eos_id);
    if (tok->unk_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.unknown_token_id", (uint32_t)tok->unk_id);
    if (tok->pad_id >= 0)
        kmed_gguf_add_u32(w, "tokenizer.ggml.padding_token_id", (uint32_t)tok->pad_id);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_bos_token", tok->add_bos);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_eos_token", tok->add_eos);
    kmed_gguf_add_bool(w, "tokenizer.ggml.add_space_prefix", 0);
done:
    KMED_FREE(strs);
    KMED_FREE(lens);
    KMED_FREE(scores);
    KMED_FREE(types);
    KMED_FREE(pads);
    return r;
}

static int kmed__cv_skip_non_tok(const char *key)
{
    return strncmp(key, "tokenizer.", 10) != 0;
}

static int kmed__cv_cmp_gg(const void *a, const void *b)
{
    return strcmp((*(const kmed__cv_entry *const *)a)->gg,
                  (*(const kmed__cv_entry *const *)b)->gg);
}

KMED_API kmed_result kmed_gemma_save_gguf(const kmed_gemma *m, const kmed_tok *tok,
                                          const char *path, const kmed_gguf_save_opts *opts,
                                          kmed_error *err)
{
    kmed_gguf_save_opts def;
    kmed_gguf_writer w;
    kmed__cv_entry *e = NULL, **order = NULL;
    const kmed_gemma_config *c;
    kmed_result r;
    size_t n = 0, i, k, maxc = 0, L;
    float *row = NULL;
    float qs_llama;
    int opened = 0;
    kmed__cv_model_src src;

    if (!opts) { memset(&def, 0, sizeof def); opts = &def; }
    if (!m || !m->layers || !path) return KMED__ERR(err, KMED_ERR_ARG, "gguf: no model or path");
    memset(&src, 0, sizeof src);
    src.m = m;
    src.lora = opts->lora;
    src.err = err;
    if (src.lora && src.lora->n_layers != m->cfg.n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gguf: adapter has %d layers, the model %d",
                         src.lora->n_layers, m->cfg.n_layers);
    c = &m->cfg;
    L = (size_t)c->n_layers;
    if (kmed__cv_ftype(opts->type) < 0 || !kmed_dtype_computable(opts->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: cannot write type %s (F32, F16, "
                         "BF16, Q8_0, Q4_0)", kmed_dtype_name(opts->type));
    /* llama.cpp has no key for the query scale: it uses head_dim, or hidden/heads for its
       46-layer (27B) model. Writing another value would silently change the model. */
    qs_llama = c->n_layers == 46 ? (float)c->hidden_size / (float)c->n_heads
                                 : (float)c->head_dim;
    if (c->query_pre_attn_scalar != qs_llama)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "gguf: query_pre_attn_scalar %g differs "
                         "from the %g llama.cpp derives for this shape; the model cannot be "
                         "expressed in llama.cpp's gemma2 format",
                         (double)c->query_pre_attn_scalar, (double)qs_llama);
    if (tok && (size_t)kmed_tok_vocab_size(tok) > (size_t)c->vocab_size)
        return KMED__ERR(err, KMED_ERR_SHAPE, "gguf: tokenizer has %d ids, the model %d",
                         kmed_tok_vocab_size(tok), c->vocab_size);
    e = kmed__cv_entries(c, m, &n);
    order = (kmed__cv_entry **)kmed__calloc(n ? n : 1, sizeof *order);
    if (!e || !order) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }
    if ((r = kmed__cv_check_model(e, n, err)) != KMED_OK) goto done;
    for (i = 0; i < n; i++) {
        kmed_dtype t = e[i].norm ? KMED_F32 : opts->type;
        if (e[i].is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        if (!kmed_dtype_bytes(t, e[i].cols)) {
            r = KMED__ERR(err, KMED_ERR_SHAPE, "gguf: %s has rows of %zu, not a multiple of "
                          "%d as %s needs", e[i].gg, e[i].cols, KMED_QK, kmed_dtype_name(t));
            goto done;
        }
        if (e[i].cols > maxc) maxc = e[i].cols;
    }
    row = (float *)kmed__calloc(maxc, sizeof *row);
    if (!row) { r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory"); goto done; }

    /* llama.cpp's order: output_norm, token_embd, then each block's tensors by name. */
    k = 0;
    order[k++] = &e[n - 1];
    order[k++] = &e[0];
    for (i = 0; i < L; i++) {
        size_t t;
        for (t = 0; t < 11; t++) order[k + t] = &e[1 + 11 * i + t];
        qsort(order + k, 11, sizeof *order, kmed__cv_cmp_gg);
        k += 11;
    }

    if ((r = kmed_gguf_writer_open(&w, path, 32, err)) != KMED_OK) goto done;
    opened = 1;
    kmed_gguf_add_str(&w, "general.architecture", "gemma2");
    kmed_gguf_add_str(&w, "general.name", opts->name ? opts->name : "kmed");
    kmed_gguf_add_u32(&w, "gemma2.context_length", (uint32_t)c->max_position);
    kmed_gguf_add_u32(&w, "gemma2.embedding_length", (uint32_t)c->hidden_size);
    kmed_gguf_add_u32(&w, "gemma2.block_count", (uint32_t)c->n_layers);
    kmed_gguf_add_u32(&w, "gemma2.feed_forward_length", (uint32_t)c->intermediate_size);
    kmed_gguf_add_u32(&w, "gemma2.attention.head_count", (uint32_t)c->n_heads);
    kmed_gguf_add_u32(&w, "gemma2.attention.head_count_kv", (uint32_t)c->n_kv_heads);
    kmed_gguf_add_f32(&w, "gemma2.attention.layer_norm_rms_epsilon", c->rms_norm_eps);
    kmed_gguf_add_u32(&w, "gemma2.attention.key_length", (uint32_t)c->head_dim);
    kmed_gguf_add_u32(&w, "gemma2.attention.value_length", (uint32_t)c->head_dim);
    if (c->attn_softcap > 0)
        kmed_gguf_add_f32(&w, "gemma2.attn_logit_softcapping", c->attn_softcap);
    if (c->final_softcap > 0)
        kmed_gguf_add_f32(&w, "gemma2.final_logit_softcapping", c->final_softcap);
    if (c->sliding_window > 0)
        kmed_gguf_add_u32(&w, "gemma2.attention.sliding_window", (uint32_t)c->sliding_window);
    kmed_gguf_add_f32(&w, "gemma2.rope.freq_base", c->rope_theta);
    if (tok && (r = kmed__cv_gguf_tokenizer(&w, tok, (size_t)c->vocab_size, opts, err)) != KMED_OK)
        goto done;
    if (!tok && opts->tok_from) kmed_gguf_add_all(&w, opts->tok_from, kmed__cv_skip_non_tok);
    kmed_gguf_add_u32(&w, "general.quantization_version", 2);
    kmed_gguf_add_u32(&w, "general.file_type", (uint32_t)kmed__cv_ftype(opts->type));

    for (i = 0; i < n && r == KMED_OK; i++) {
        const kmed__cv_entry *x = order[i];
        kmed_dtype t = x->norm ? KMED_F32 : opts->type;
        uint64_t shape[2];
        if (x->is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        shape[0] = x->norm ? x->cols : x->rows;
        shape[1] = x->cols;
        r = kmed_gguf_add_tensor(&w, x->gg, t, x->norm ? 1 : 2, shape, err);
    }
    for (i = 0; i < n && r == KMED_OK; i++) {
        const kmed__cv_entry *x = order[i];
        kmed_dtype t = x->norm ? KMED_F32 : opts->type;
        size_t nbytes;
        unsigned char *buf;
        if (x->is_embed && opts->mixed && opts->type == KMED_Q4_0) t = KMED_Q8_0;
        nbytes = x->rows * kmed_dtype_bytes(t, x->cols);
        if (x->w && x->w->type == t && !kmed__cv_adapted(src.lora, x)) {
            /* already in the target type: the bytes as they are */
            r = kmed_gguf_writer_put(&w, x->w->data, nbytes, err);
        } else {
            buf = (unsigned char *)KMED_MALLOC(nbytes ? nbytes : 1);
            if (!buf) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "gguf: out of memory for %s (%zu bytes)",
                              x->gg, nbytes);
                break;
            }
            if (x->norm) { /* llama.cpp stores 1 + w and multiplies by it */
                size_t j;
                for (j = 0; j < x->cols; j++) row[j] = 1.0f + x->norm[j];
                memcpy(buf, row, nbytes);
            } else {
                r = kmed__cv_convert(x, kmed__cv_fill_model, &src, t, buf, row);
            }
            if (r == KMED_OK) r = kmed_gguf_writer_put(&w, buf, nbytes, err);
            KMED_FREE(buf);
        }
        kmed_progress(&opts->cb, "save", (double)(i + 1), (double)n, "tensors");
    }
    if (r == KMED_OK) r = kmed_gguf_writer_commit(&w, err);
    opened = r != KMED_OK;
done:
    if (opened) kmed_gguf_writer_abort(&w);
    KMED_FREE(src.merged);
    KMED_FREE(e);
    KMED_FREE(order);
    KMED_FREE(row);
    return r;
}

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

#ifndef KMED_NO_TRAIN
/* ==== kmed_train: LoRA adapters (PEFT), training forward/backward, optimisers,
   schedules, checkpoints ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- LoRA ---- */

static const char *const kmed__lora_names[KMED_LORA_NTARGETS] = {
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"};
static const char *const kmed__lora_short[KMED_LORA_NTARGETS] = {
    "q", "k", "v", "o", "gate", "up", "down"};

/* What kmed_lora.impl_ points to: the block holding every A and B (then the token rows),
   and the shapes. */
typedef struct kmed__lora_impl {
    float *block;
    size_t numel;
    kmed_gemma_config cfg;
} kmed__lora_impl;

KMED_API const char *kmed_lora_target_name(int target)
{
    return target >= 0 && target < KMED_LORA_NTARGETS ? kmed__lora_names[target] : NULL;
}

/* Weight shape of target t: out rows, in columns. */
static void kmed__lora_dims(const kmed_gemma_config *c, int t, size_t *out, size_t *in)
{
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    switch (t) {
    case KMED_LORA_Q: *out = HD; *in = C; break;
    case KMED_LORA_K: case KMED_LORA_V: *out = KD; *in = C; break;
    case KMED_LORA_O: *out = C; *in = HD; break;
    case KMED_LORA_GATE: case KMED_LORA_UP: *out = F; *in = C; break;
    default: *out = C; *in = F; break;
    }
}

static const kmed_weight *kmed__lora_base(const kmed_gemma_layer *L, int t)
{
    switch (t) {
    case KMED_LORA_Q: return &L->q;
    case KMED_LORA_K: return &L->k;
    case KMED_LORA_V: return &L->v;
    case KMED_LORA_O: return &L->o;
    case KMED_LORA_GATE: return &L->gate;
    case KMED_LORA_UP: return &L->up;
    default: return &L->down;
    }
}

/* PEFT's tensor of trainable-token rows (its TrainableTokensLayer under the embedding). */
#define KMED__LORA_TOKENS_TENSOR \
    "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"

/* PEFT tensor name: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight. */
static void kmed__lora_tensor_name(char *out, size_t cap, int layer, int t, char ab,
                                   const char *adapter)
{
    snprintf(out, cap, "base_model.model.model.layers.%d.%s.%s.lora_%c%s%s.weight", layer,
             t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t], ab,
             adapter ? "." : "", adapter ? adapter : "");
}

KMED_API kmed_result kmed_lora_targets_parse(const char *s, unsigned *targets,
                                             kmed_error *err)
{
    unsigned mask = 0;
    const char *p = s;
    if (!s || !*s) return KMED__ERR(err, KMED_ERR_ARG, "empty LoRA target list");
    while (*p) {
        const char *e = strchr(p, ',');
        size_t n = e ? (size_t)(e - p) : strlen(p);
        int t, found = 0;
        if (n == 3 && !strncmp(p, "all", 3)) { mask |= (1u << KMED_LORA_NTARGETS) - 1; found = 1; }
        else if (n == 10 && !strncmp(p, "all-linear", 10)) {
            mask |= (1u << KMED_LORA_NTARGETS) - 1;
            found = 1;
        } else if (n == 4 && !strncmp(p, "attn", 4)) { mask |= 0xFu; found = 1; }
        else if (n == 3 && !strncmp(p, "mlp", 3)) { mask |= 0x70u; found = 1; }
        for (t = 0; t < KMED_LORA_NTARGETS && !found; t++) {
            if ((strlen(kmed__lora_names[t]) == n && !strncmp(p, kmed__lora_names[t], n)) ||
                (strlen(kmed__lora_short[t]) == n && !strncmp(p, kmed__lora_short[t], n))) {
                mask |= 1u << t;
                found = 1;
            }
        }
        if (!found)
            return KMED__ERR(err, KMED_ERR_ARG,
                             "unknown LoRA target '%.*s' (expected q_proj, k_proj, v_proj, "
                             "o_proj, gate_proj, up_proj, down_proj, attn, mlp or all)",
                             (int)n, p);
        p += n;
        if (*p == ',') p++;
    }
    *targets = mask;
    return KMED_OK;
}

static int kmed__lora_id_cmp(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

/* Allocates lora for the (layer, target) pairs with present[l * NT + t] set and ids[n_tok]
   trainable tokens (distinct, in [0, vocab), stored sorted; the caller fills their rows);
   zeroed. */
static kmed_result kmed__lora_alloc(kmed_lora *lora, const kmed_gemma_config *cfg, int r,
                                    float alpha, const unsigned char *present,
                                    const int *ids, size_t n_tok, kmed_error *err)
{
    kmed__lora_impl *im;
    size_t total = 0, off = 0, out, in, i, C = (size_t)cfg->hidden_size;
    int l, t, L = cfg->n_layers;
    memset(lora, 0, sizeof *lora);
    if (r <= 0) return KMED__ERR(err, KMED_ERR_ARG, "LoRA rank must be positive, got %d", r);
    if (n_tok > (size_t)cfg->vocab_size)
        return KMED__ERR(err, KMED_ERR_ARG, "LoRA: %zu trainable tokens, vocabulary %d",
                         n_tok, cfg->vocab_size);
    for (i = 0; i < n_tok; i++)
        if (ids[i] < 0 || ids[i] >= cfg->vocab_size)
            return KMED__ERR(err, KMED_ERR_ARG, "LoRA: trainable token id %d outside [0, %d)",
                             ids[i], cfg->vocab_size);
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            if (present[l * KMED_LORA_NTARGETS + t]) {
                kmed__lora_dims(cfg, t, &out, &in);
                total += (size_t)r * (in + out);
            }
    total += n_tok * C;
    im = (kmed__lora_impl *)kmed__calloc(1, sizeof *im);
    lora->impl_ = im;   /* from here on kmed_lora_free undoes whatever was allocated */
    lora->ab = (kmed_lora_ab(*)[KMED_LORA_NTARGETS])kmed__calloc((size_t)L, sizeof *lora->ab);
    lora->token_ids = (int *)kmed__calloc(n_tok ? n_tok : 1, sizeof(int));
    if (im) im->block = (float *)kmed__calloc(total ? total : 1, sizeof(float));
    if (!im || !lora->ab || !lora->token_ids || !im->block) {
        kmed_lora_free(lora);
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA adapter: out of memory (%zu floats)",
                         total);
    }
    im->numel = total;
    im->cfg = *cfg;
    if (n_tok) memcpy(lora->token_ids, ids, n_tok * sizeof(int));
    qsort(lora->token_ids, n_tok, sizeof(int), kmed__lora_id_cmp);
    for (i = 1; i < n_tok; i++)
        if (lora->token_ids[i] == lora->token_ids[i - 1]) {
            int dup = lora->token_ids[i];
            kmed_lora_free(lora);
            return KMED__ERR(err, KMED_ERR_ARG, "LoRA: trainable token id %d given twice",
                             dup);
        }
    lora->n_tokens = (int)n_tok;
    lora->token_rows = im->block + total - n_tok * C;
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            if (present[l * KMED_LORA_NTARGETS + t]) {
                kmed__lora_dims(cfg, t, &out, &in);
                lora->ab[l][t].A = im->block + off;
                off += (size_t)r * in;
                lora->ab[l][t].B = im->block + off;
                off += (size_t)r * out;
                lora->targets |= 1u << t;
            }
    lora->r = r;
    lora->alpha = alpha;
    lora->scale = alpha / (float)r;
    lora->n_layers = L;
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_create(kmed_lora *lora, const kmed_gemma *m,
                                      const kmed_lora_config *cfg, kmed_error *err)
{
    kmed_lora_config c;
    unsigned char *present;
    kmed_result rc;
    kmed_rng rng;
    int l, t, L = m->cfg.n_layers;
    memset(&c, 0, sizeof c);
    if (cfg) c = *cfg;
    if (c.r == 0) c.r = 8;
    if (c.alpha == 0.0f) c.alpha = 2.0f * (float)c.r;
    if (c.targets == 0) c.targets = (1u << KMED_LORA_NTARGETS) - 1;
    if (c.targets >> KMED_LORA_NTARGETS)
        return KMED__ERR(err, KMED_ERR_ARG, "LoRA targets mask 0x%x has unknown bits",
                         c.targets);
    if (L <= 0) return KMED__ERR(err, KMED_ERR_ARG, "LoRA: model has no layers");
    present = (unsigned char *)kmed__calloc((size_t)L * KMED_LORA_NTARGETS, 1);
    if (!present) return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA: out of memory");
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++)
            present[l * KMED_LORA_NTARGETS + t] =
                ((c.targets >> t) & 1) &&
                (c.layers == 0 || (l < 64 && ((c.layers >> l) & 1)));
    if (c.n_tokens < 0 || (c.n_tokens > 0 && !c.tokens)) {
        KMED_FREE(present);
        return KMED__ERR(err, KMED_ERR_ARG, "LoRA: %d trainable tokens without their ids",
                         c.n_tokens);
    }
    rc = kmed__lora_alloc(lora, &m->cfg, c.r, c.alpha, present, c.tokens,
                          (size_t)c.n_tokens, err);
    KMED_FREE(present);
    if (rc != KMED_OK) return rc;
    if (c.n_tokens > 0) {   /* PEFT: the trainable rows start as the base rows */
        size_t C = (size_t)m->cfg.hidden_size, rb = kmed_dtype_bytes(m->embed.type, C), i;
        if (!m->embed.data || !rb || !kmed_dtype_computable(m->embed.type) ||
            m->embed.rows != (size_t)m->cfg.vocab_size || m->embed.cols != C) {
            kmed_lora_free(lora);
            return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "LoRA trainable tokens: the model's "
                             "embedding (%s) cannot be read", kmed_dtype_name(m->embed.type));
        }
        for (i = 0; i < (size_t)c.n_tokens; i++)
            kmed_dequantize_row(m->embed.type, (const unsigned char *)m->embed.data +
                                (size_t)lora->token_ids[i] * rb, lora->token_rows + i * C, C);
    }
    /* PEFT: kaiming_uniform_(A, a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0 so the
       adapted model starts equal to the base. */
    kmed_rng_seed(&rng, c.seed);
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t out, in, i;
            double bound;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            bound = 1.0 / sqrt((double)in);
            for (i = 0; i < (size_t)c.r * in; i++)
                lora->ab[l][t].A[i] = (float)((2.0 * kmed_rng_uniform(&rng) - 1.0) * bound);
        }
    return KMED_OK;
}

KMED_API void kmed_lora_free(kmed_lora *lora)
{
    kmed__lora_impl *im;
    if (!lora) return;
    im = (kmed__lora_impl *)lora->impl_;
    if (im) KMED_FREE(im->block);
    KMED_FREE(im);
    KMED_FREE(lora->ab);
    KMED_FREE(lora->token_ids);
    memset(lora, 0, sizeof *lora);
}

KMED_API size_t kmed_lora_numel(const kmed_lora *lora)
{
    const kmed__lora_impl *im = lora ? (const kmed__lora_impl *)lora->impl_ : NULL;
    return im ? im->numel : 0;
}

KMED_API const float *kmed_lora_token_row(const kmed_lora *lora, int id)
{
    const kmed__lora_impl *im = lora ? (const kmed__lora_impl *)lora->impl_ : NULL;
    long k = kmed__lora_token(lora, id);
    return k >= 0 && im ? lora->token_rows + (size_t)k * (size_t)im->cfg.hidden_size : NULL;
}

KMED_API kmed_result kmed_lora_save(const kmed_lora *lora, const char *dir,
                                    const char *base_name, kmed_error *err)
{
    const kmed__lora_impl *im = (const kmed__lora_impl *)lora->impl_;
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    kmed_tensor_info *ti = NULL;
    char (*names)[128] = NULL;
    char path[1100];
    size_t n = 0, cap, out, in;
    kmed_buf js = {0};
    kmed_result rc;
    int l, t, first;
    if (!im) return KMED__ERR(err, KMED_ERR_STATE, "LoRA save: adapter not initialised");
    if ((rc = kmed_mkdir_p(dir, err)) != KMED_OK) return rc;
    cap = (size_t)lora->n_layers * KMED_LORA_NTARGETS * 2 + 1;
    ti = (kmed_tensor_info *)kmed__calloc(cap, sizeof *ti);
    names = (char(*)[128])kmed__calloc(cap, sizeof *names);
    if (!ti || !names) {
        KMED_FREE(ti);
        KMED_FREE(names);
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA save: out of memory");
    }
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            int k;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&im->cfg, t, &out, &in);
            for (k = 0; k < 2; k++) {
                kmed__lora_tensor_name(names[n], sizeof names[n], l, t, k ? 'B' : 'A', NULL);
                ti[n].name = names[n];
                ti[n].dtype = KMED_F32;
                ti[n].ndim = 2;
                ti[n].shape[0] = k ? out : (uint64_t)lora->r;
                ti[n].shape[1] = k ? (uint64_t)lora->r : in;
                ti[n].data = k ? lora->ab[l][t].B : lora->ab[l][t].A;
                ti[n].nbytes = (size_t)lora->r * (k ? out : in) * sizeof(float);
                n++;
            }
        }
    if (lora->n_tokens > 0) {
        ti[n].name = KMED__LORA_TOKENS_TENSOR;
        ti[n].dtype = KMED_F32;
        ti[n].ndim = 2;
        ti[n].shape[0] = (uint64_t)lora->n_tokens;
        ti[n].shape[1] = (uint64_t)im->cfg.hidden_size;
        ti[n].data = lora->token_rows;
        ti[n].nbytes = (size_t)lora->n_tokens * (size_t)im->cfg.hidden_size * sizeof(float);
        n++;
    }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_model.safetensors", err);
    if (rc == KMED_OK) rc = kmed_st_write(path, ti, n, mk, mv, 1, err);
    KMED_FREE(ti);
    KMED_FREE(names);
    if (rc != KMED_OK) return rc;

    /* adapter_config.json: the keys PEFT's LoraConfig reads, with its defaults. */
    kmed_buf_puts(&js, "{\n  \"alpha_pattern\": {},\n  \"base_model_name_or_path\": ");
    if (base_name) kmed_buf_json_str(&js, base_name, strlen(base_name));
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n"
                       "  \"inference_mode\": true,\n  \"init_lora_weights\": true,\n"
                       "  \"layers_pattern\": null,\n  \"layers_to_transform\": ");
    {
        int all = 1, any = 0;
        for (l = 0; l < lora->n_layers; l++) {
            int has = 0;
            for (t = 0; t < KMED_LORA_NTARGETS; t++) has |= lora->ab[l][t].A != NULL;
            if (!has) all = 0;
        }
        if (all) kmed_buf_puts(&js, "null");
        else {
            kmed_buf_puts(&js, "[");
            for (l = 0; l < lora->n_layers; l++) {
                int has = 0;
                for (t = 0; t < KMED_LORA_NTARGETS; t++) has |= lora->ab[l][t].A != NULL;
                if (has) kmed_buf_printf(&js, "%s%d", any++ ? ", " : "", l);
            }
            kmed_buf_puts(&js, "]");
        }
    }
    kmed_buf_puts(&js, ",\n  \"lora_alpha\": ");
    if (lora->alpha == floorf(lora->alpha) && fabsf(lora->alpha) < 1e9f)
        kmed_buf_printf(&js, "%d", (int)lora->alpha);
    else kmed_buf_json_f32(&js, lora->alpha);
    kmed_buf_printf(&js, ",\n  \"lora_dropout\": 0.0,\n  \"modules_to_save\": null,\n"
                         "  \"peft_type\": \"LORA\",\n  \"r\": %d,\n  \"rank_pattern\": {},\n"
                         "  \"revision\": null,\n  \"target_modules\": [",
                    lora->r);
    for (t = 0, first = 1; t < KMED_LORA_NTARGETS; t++)
        if ((lora->targets >> t) & 1) {
            kmed_buf_printf(&js, "%s\n    \"%s\"", first ? "" : ",", kmed__lora_names[t]);
            first = 0;
        }
    /* an rsLoRA adapter (scale alpha / sqrt(r), as loaded) must say so, or it reloads with
       scale alpha / r */
    first = lora->scale != lora->alpha / (float)lora->r &&
            lora->scale == (float)(lora->alpha / sqrt((double)lora->r));
    kmed_buf_puts(&js, "\n  ],\n  \"task_type\": \"CAUSAL_LM\",\n"
                       "  \"trainable_token_indices\": ");
    if (lora->n_tokens <= 0) kmed_buf_puts(&js, "null");
    else {
        int i;
        kmed_buf_puts(&js, "[");
        for (i = 0; i < lora->n_tokens; i++)
            kmed_buf_printf(&js, "%s%d", i ? (i % 16 ? ", " : ",\n    ") : "",
                            lora->token_ids[i]);
        kmed_buf_puts(&js, "]");
    }
    kmed_buf_printf(&js, ",\n  \"use_dora\": false,\n  \"use_rslora\": %s\n}\n",
                    first ? "true" : "false");
    if (js.failed) {
        kmed_buf_free(&js);
        return KMED__ERR(err, KMED_ERR_NOMEM, "LoRA save: out of memory");
    }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_config.json", err);
    if (rc == KMED_OK) rc = kmed_file_write_atomic(path, js.data, js.len, err);
    kmed_buf_free(&js);
    return rc;
}

/* Copies a stored F32/F16/BF16 tensor of exactly rows x cols into out. */
static kmed_result kmed__lora_read_tensor(const kmed_tensor_info *ti, size_t rows, size_t cols,
                                          float *out, const char *file, kmed_error *err)
{
    if (ti->ndim != 2 || ti->shape[0] != rows || ti->shape[1] != cols)
        return KMED__ERRF(err, KMED_ERR_SHAPE, file,
                          "tensor %s: shape [%llu, %llu], expected [%zu, %zu]", ti->name,
                          ti->ndim >= 1 ? (unsigned long long)ti->shape[0] : 0ull,
                          ti->ndim >= 2 ? (unsigned long long)ti->shape[1] : 0ull, rows, cols);
    if (ti->dtype == KMED_F32) memcpy(out, ti->data, rows * cols * sizeof(float));
    else if (ti->dtype == KMED_F16 || ti->dtype == KMED_BF16)
        kmed_dequantize_row(ti->dtype, ti->data, out, rows * cols);
    else
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, file, "tensor %s: dtype %s (expected F32, "
                          "F16 or BF16)", ti->name, kmed_dtype_name(ti->dtype));
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_load(kmed_lora *lora, const kmed_gemma *m, const char *dir,
                                    kmed_error *err)
{
    char path[1100], name[256];
    char *text = NULL;
    size_t len = 0, i, used = 0;
    kmed_json_doc doc = {0};
    const kmed_json *root, *j;
    kmed_st st;
    unsigned char *present = NULL;
    int *tok = NULL;
    size_t n_tok = 0;
    const kmed_tensor_info *tok_t = NULL;
    int l, t, L = m->cfg.n_layers, r = 0, rslora = 0, have_st = 0;
    int64_t iv;
    double alpha;
    kmed_result rc;
    memset(lora, 0, sizeof *lora);
    memset(&st, 0, sizeof st);
    rc = kmed_path_join(path, sizeof path, dir, "adapter_config.json", err);
    if (rc == KMED_OK) rc = kmed_file_read(path, (size_t)64 << 20, &text, &len, err);
    if (rc == KMED_OK) rc = kmed_json_parse(&doc, text, len, path, 0, err);
    if (rc != KMED_OK) goto done;
    root = doc.root;
    if (!root || root->type != KMED_JSON_OBJECT) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "expected a JSON object");
        goto done;
    }
    j = kmed_json_get(root, "peft_type");
    if (j && j->type == KMED_JSON_STRING && strcmp(j->str, "LORA") != 0) {
        rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path, "peft_type %s (only LORA)", j->str);
        goto done;
    }
    if (!kmed_json_int(kmed_json_get(root, "r"), &iv) || iv <= 0 || iv > 65536) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "missing or bad \"r\" (positive integer)");
        goto done;
    }
    r = (int)iv;
    j = kmed_json_get(root, "lora_alpha");
    alpha = j && j->type == KMED_JSON_NUMBER ? j->num : 8.0; /* PEFT's default */
    if (!(fabs(alpha) <= 3.4e38)) { /* inf/NaN (or beyond float) would make every output NaN */
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "\"lora_alpha\" must be a finite number");
        goto done;
    }
    rslora = kmed_json_bool(kmed_json_get(root, "use_rslora"), 0);
    j = kmed_json_get(root, "use_dora");
    if (kmed_json_bool(j, 0)) {
        rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path, "use_dora (DoRA adapters)");
        goto done;
    }
    /* trainable_token_indices: a list of ids, or {"embed_tokens": list} */
    j = kmed_json_get(root, "trainable_token_indices");
    if (j && j->type == KMED_JSON_OBJECT) {
        if (j->len != 1 || !(j = kmed_json_get(j, "embed_tokens"))) {
            rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path, "trainable_token_indices for "
                            "a layer other than embed_tokens");
            goto done;
        }
    }
    if (j && j->type != KMED_JSON_NULL) {
        if (j->type != KMED_JSON_ARRAY) {
            rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "\"trainable_token_indices\" must be "
                            "a list of token ids");
            goto done;
        }
        tok = (int *)kmed__calloc(j->len ? j->len : 1, sizeof(int));
        if (!tok) { rc = KMED__ERR(err, KMED_ERR_NOMEM, "LoRA load: out of memory"); goto done; }
        for (n_tok = 0; n_tok < j->len; n_tok++) {
            if (!kmed_json_int(&j->kids[n_tok], &iv) || iv < 0 || iv >= m->cfg.vocab_size) {
                rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "trainable_token_indices[%zu]: "
                                "expected a token id in [0, %d)", n_tok, m->cfg.vocab_size);
                goto done;
            }
            tok[n_tok] = (int)iv;
        }
    }
    rc = kmed_path_join(path, sizeof path, dir, "adapter_model.safetensors", err);
    if (rc == KMED_OK) rc = kmed_st_open(&st, path, err);
    if (rc != KMED_OK) goto done;
    have_st = 1;
    tok_t = kmed_st_find(&st, KMED__LORA_TOKENS_TENSOR);
    if (!tok_t) tok_t = kmed_st_find(&st, KMED__LORA_TOKENS_TENSOR ".default");
    if (n_tok && !tok_t) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "adapter_config.json lists %zu trainable "
                        "tokens but there is no %s", n_tok, KMED__LORA_TOKENS_TENSOR);
        goto done;
    }
    if (tok_t && !n_tok) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "%s is there but adapter_config.json "
                        "lists no trainable_token_indices", KMED__LORA_TOKENS_TENSOR);
        goto done;
    }
    present = (unsigned char *)kmed__calloc((size_t)L * KMED_LORA_NTARGETS, 1);
    if (!present) { rc = KMED__ERR(err, KMED_ERR_NOMEM, "LoRA load: out of memory"); goto done; }
    /* The tensors decide which (layer, target) pairs exist; with or without the
       adapter name ("default") that older PEFT versions kept. */
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            int k, found = 0;
            for (k = 0; k < 2 && !found; k++) {
                const char *ad = k ? "default" : NULL;
                kmed__lora_tensor_name(name, sizeof name, l, t, 'A', ad);
                if (kmed_st_find(&st, name)) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, 'B', ad);
                    if (!kmed_st_find(&st, name)) {
                        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "%s is missing", name);
                        goto done;
                    }
                    found = 1;
                }
            }
            present[l * KMED_LORA_NTARGETS + t] = (unsigned char)found;
        }
    rc = kmed__lora_alloc(lora, &m->cfg, r, (float)alpha, present, tok, n_tok, err);
    if (rc != KMED_OK) goto done;
    if (rslora) lora->scale = (float)((double)lora->alpha / sqrt((double)r)); /* as saved */
    if (tok_t) {   /* rows in the file's order, stored by ascending id */
        size_t C = (size_t)m->cfg.hidden_size;
        float *rows = (float *)kmed__calloc(n_tok * C, sizeof(float));
        if (!rows) { rc = KMED__ERR(err, KMED_ERR_NOMEM, "LoRA load: out of memory"); goto done; }
        rc = kmed__lora_read_tensor(tok_t, n_tok, C, rows, path, err);
        for (i = 0; i < n_tok && rc == KMED_OK; i++)
            memcpy(lora->token_rows + (size_t)kmed__lora_token(lora, tok[i]) * C,
                   rows + i * C, C * sizeof(float));
        KMED_FREE(rows);
        if (rc != KMED_OK) goto done;
        used++;
    }
    for (l = 0; l < L; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t out, in;
            int k;
            if (!present[l * KMED_LORA_NTARGETS + t]) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            for (k = 0; k < 2; k++) {
                const kmed_tensor_info *ti;
                kmed__lora_tensor_name(name, sizeof name, l, t, k ? 'B' : 'A', NULL);
                ti = kmed_st_find(&st, name);
                if (!ti) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, k ? 'B' : 'A', "default");
                    ti = kmed_st_find(&st, name);
                }
                rc = kmed__lora_read_tensor(ti, k ? out : (size_t)r, k ? (size_t)r : in,
                                            k ? lora->ab[l][t].B : lora->ab[l][t].A, path,
                                            err);
                if (rc != KMED_OK) goto done;
                used++;
            }
        }
    /* Anything else (embedding adapters, modules_to_save, other layers) would be
       silently dropped: refuse instead. */
    for (i = 0; i < st.n_tensors && used != st.n_tensors; i++) {
        int ok = &st.tensors[i] == tok_t;
        for (l = 0; l < L && !ok; l++)
            for (t = 0; t < KMED_LORA_NTARGETS && !ok; t++) {
                int k;
                if (!present[l * KMED_LORA_NTARGETS + t]) continue;
                for (k = 0; k < 4 && !ok; k++) {
                    kmed__lora_tensor_name(name, sizeof name, l, t, k & 1 ? 'B' : 'A',
                                           k & 2 ? "default" : NULL);
                    ok = !strcmp(name, st.tensors[i].name);
                }
            }
        if (!ok) {
            rc = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, path,
                            "tensor %s is not a LoRA A/B of q/k/v/o/gate/up/down_proj of "
                            "this model's %d layers", st.tensors[i].name, L);
            goto done;
        }
    }
done:
    if (rc != KMED_OK) kmed_lora_free(lora);
    if (have_st) kmed_st_close(&st);
    kmed_json_free(&doc);
    KMED_FREE(text);
    KMED_FREE(present);
    KMED_FREE(tok);
    return rc;
}

KMED_API kmed_result kmed_lora_merged_weight(const kmed_gemma *m, const kmed_lora *lora,
                                             int layer, int target, float *out,
                                             kmed_error *err)
{
    const kmed_weight *w;
    size_t i, j, k, row_bytes, r;
    const float *A = NULL, *B = NULL;
    if (layer < 0 || layer >= m->cfg.n_layers || target < 0 || target >= KMED_LORA_NTARGETS)
        return KMED__ERR(err, KMED_ERR_ARG, "merged weight: layer %d target %d out of range",
                         layer, target);
    w = kmed__lora_base(&m->layers[layer], target);
    row_bytes = kmed_dtype_bytes(w->type, w->cols);
    if (!w->data || !row_bytes || !kmed_dtype_computable(w->type))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "layer %d %s: weight dtype %s", layer,
                         kmed__lora_names[target], kmed_dtype_name(w->type));
    if (lora && layer < lora->n_layers && lora->ab[layer][target].A) {
        A = lora->ab[layer][target].A;
        B = lora->ab[layer][target].B;
    }
    r = lora ? (size_t)lora->r : 0;
    for (i = 0; i < w->rows; i++) {
        float *o = out + i * w->cols; /* (cols) */
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * row_bytes, o, w->cols);
        if (!A) continue;
        /* PEFT's merge: W + (B @ A) * scale, the product in f32 first. */
        for (j = 0; j < w->cols; j++) {
            float s = 0.0f;
            for (k = 0; k < r; k++) s += B[i * r + k] * A[k * w->cols + j];
            o[j] += s * lora->scale;
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_lora_merge(kmed_gemma *m, const kmed_lora *lora, kmed_error *err)
{
    int l, t;
    size_t i, j, k, r = (size_t)lora->r;
    if (lora->n_layers != m->cfg.n_layers)
        return KMED__ERR(err, KMED_ERR_SHAPE, "merge: adapter has %d layers, model %d",
                         lora->n_layers, m->cfg.n_layers);
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            const kmed_weight *w = kmed__lora_base(&m->layers[l], t);
            size_t out, in;
            if (!lora->ab[l][t].A) continue;
            kmed__lora_dims(&m->cfg, t, &out, &in);
            if (w->type != KMED_F32 || !w->data)
                return KMED__ERR(err, KMED_ERR_UNSUPPORTED,
                                 "merge in place needs F32 weights; layer %d %s is %s (use "
                                 "kmed_lora_merged_weight to export)", l, kmed__lora_names[t],
                                 kmed_dtype_name(w->type));
            if (w->rows != out || w->cols != in)
                return KMED__ERR(err, KMED_ERR_SHAPE, "merge: layer %d %s is [%zu, %zu], "
                                 "adapter expects [%zu, %zu]", l, kmed__lora_names[t],
                                 w->rows, w->cols, out, in);
        }
    if (lora->n_tokens > 0 &&
        (m->embed.type != KMED_F32 || !m->embed.data ||
         m->embed.cols != (size_t)m->cfg.hidden_size))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge in place needs an F32 embedding "
                         "for the adapter's trainable tokens; it is %s",
                         kmed_dtype_name(m->embed.type));
    for (i = 0; i < (size_t)lora->n_tokens; i++)
        if ((size_t)lora->token_ids[i] >= m->embed.rows)
            return KMED__ERR(err, KMED_ERR_SHAPE, "merge: trainable token %d outside the "
                             "model's %zu embedding rows", lora->token_ids[i], m->embed.rows);
    for (i = 0; i < (size_t)lora->n_tokens; i++)   /* PEFT: the rows are replaced */
        memcpy((float *)(uintptr_t)m->embed.data + (size_t)lora->token_ids[i] * m->embed.cols,
               lora->token_rows + i * m->embed.cols, m->embed.cols * sizeof(float));
    for (l = 0; l < lora->n_layers; l++)
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            const kmed_weight *w = kmed__lora_base(&m->layers[l], t);
            const float *A = lora->ab[l][t].A, *B = lora->ab[l][t].B;
            float *W = (float *)(uintptr_t)w->data; /* documented: caller-writable F32 */
            if (!A) continue;
            for (i = 0; i < w->rows; i++)
                for (j = 0; j < w->cols; j++) {
                    float s = 0.0f;
                    for (k = 0; k < r; k++) s += B[i * r + k] * A[k * w->cols + j];
                    W[i * w->cols + j] += s * lora->scale;
                }
        }
    return KMED_OK;
}

/* ---- trainer: state, parameters, arena ---- */

/* Gradients of one layer; NULL where frozen. */
typedef struct kmed__train_lgrad {
    float *dw[KMED_LORA_NTARGETS];             /* full mode: [out, in] */
    float *dnorm[4];                           /* full mode: attn, post_attn, pre_ffn,
                                                  post_ffn norm [C] */
    float *dA[KMED_LORA_NTARGETS], *dB[KMED_LORA_NTARGETS]; /* LoRA mode */
} kmed__train_lgrad;

/* Activations of one layer that its backward reads. */
typedef struct kmed__train_acts {
    float *xn1, *rstd1;        /* (N, C), (N): input norm */
    float *q, *k, *v;          /* (N, H*D) after RoPE, (N, Hkv*D) after RoPE, (N, Hkv*D) */
    float *att;                /* (B, H, T, T) softmax probabilities */
    float *ao;                 /* (N, H*D) attention output, o_proj input */
    float *o, *rstd2;          /* (N, C) o_proj output, (N) */
    float *hmid;               /* (N, C) residual after the attention block */
    float *xn3, *rstd3;        /* (N, C), (N): pre-FFN norm */
    float *g, *u, *hg;         /* (N, F) gate, up, gelu(gate) * up */
    float *dn, *rstd4;         /* (N, C) down_proj output, (N) */
    float *xa[KMED_LORA_NTARGETS]; /* (N, r) x A^T per adapted target */
} kmed__train_acts;

struct kmed_train {
    kmed_train_config cfg;
    kmed_optim_config oc;      /* cfg.optim with defaults filled in */
    const kmed_gemma *m;       /* the model the forward reads (base or view) */
    kmed_gemma view;           /* full mode: weights point into pblock */
    kmed_lora *lora;           /* LoRA mode */
    kmed_pool *pool;
    int full, lowest;          /* lowest layer with trainable tensors */
    size_t np;
    kmed_param *params;
    float *pblock, *gblock, *mblock, *vblock; /* [total] each (pblock: full mode only) */
    float *pall;               /* [total] every parameter: pblock, or the adapter's block
                                  (same order as params) */
    size_t total;
    float *dembed, *dfinal;    /* full mode (dembed also with trainable tokens) */
    float *tembed;             /* LoRA with trainable tokens: the f32 embedding the model
                                  view reads, the token rows copied in before each forward */
    size_t *tslot;             /* [lora->n_tokens] each trainable token's row in tembed */
    /* vocabulary compaction (cfg.used_tokens): m->cfg.vocab_size is the compact size n */
    size_t vocab;              /* the model's own vocabulary V */
    int *vmap;                 /* [V] compact row of each token; NULL: no compaction */
    unsigned char *vembed;     /* (n, C) rows in the stored dtype: used tokens, then shared */
    size_t sh;                 /* the shared row (n - 1), or n when there is none */
    float sh_count;            /* tokens the shared row stands for */
    float *hsh;                /* (head_rows) its capped logit per head row */
    int *rids, *rlabels;       /* (N) a batch remapped to compact rows */
    kmed__train_lgrad *lg;     /* [L] */
    long step;
    double loss_ema, last_loss;
    long loss_n;
    size_t maxB, maxT, head_rows;
    int nthreads;
    /* arena */
    float *arena;
    kmed__train_acts *acts;    /* [L] saved, or [1] under checkpointing */
    float *resid;              /* (L+1, N, C) */
    float *xf, *rstdf;         /* (N, C), (N) final norm */
    float *tmp, *tmp2;         /* (N, C) */
    float *dres, *dtmp, *dxn;  /* (N, C) */
    float *dao, *dq, *dqp;     /* (N, H*D) */
    float *dk, *dkp, *dv;      /* (N, Hkv*D) */
    float *dg, *du, *dhg;      /* (N, F) */
    float *dxa;                /* (N, r) */
    float *att_scratch;        /* (threads, 2, T, T) */
    float *logits;             /* (head_rows, V); SIMD head: (chunks, rows, VC) */
    float *head_scratch;       /* (threads, head_floats) */
    size_t head_floats;
    float *hx, *hdx;           /* (head_rows, C) */
    float *hxa, *hxb;          /* hx packed as GEMM A strips and B panels */
    float *hstat;              /* (head_rows, chunks, 2) per vocabulary chunk: max, exp-sum */
    float *hpart;              /* (parts, head_rows, C) partial dx per chunk group */
    float *hrowf;              /* (head_rows, 3): capped target logit, max, softmax scale */
    double *hnll;              /* (head_rows) */
    int *pos;                  /* (N) */
    size_t *hrow;              /* (N) */
    int *htgt;                 /* (N) */
};

static void kmed__train_defaults(kmed_optim_config *o)
{
    if (o->lr == 0.0f) o->lr = 1e-4f;
    if (o->beta1 == 0.0f) o->beta1 = 0.9f;
    if (o->beta2 == 0.0f) o->beta2 = 0.999f;
    if (o->eps == 0.0f) o->eps = 1e-8f;
}

KMED_API float kmed_optim_lr(const kmed_optim_config *cfg, long step)
{
    /* HF's schedulers: lambda(s) with s = step - 1 optimiser steps already taken. */
    kmed_optim_config c = *cfg;
    double s = (double)(step > 0 ? step - 1 : 0), f;
    kmed__train_defaults(&c);
    if (c.warmup > 0 && s < (double)c.warmup) return (float)(c.lr * s / (double)c.warmup);
    if (c.schedule == KMED_SCHED_COSINE && c.total_steps > 0) {
        double span = (double)(c.total_steps > c.warmup ? c.total_steps - c.warmup : 1);
        double prog = (s - (double)c.warmup) / span;
        if (prog > 1.0) prog = 1.0;
        f = 0.5 * (1.0 + cos(3.14159265358979323846 * prog));
        f = c.min_lr_ratio + (1.0 - c.min_lr_ratio) * f;
        return (float)(c.lr * f);
    }
    return c.lr;
}

static float *kmed__train_take(float **cur, size_t n)
{
    float *p = *cur;
    *cur += (n + 15) & ~(size_t)15; /* 64-byte steps keep every buffer aligned */
    return p;
}

static void kmed__train_add_param(kmed_train *tr, const char *name, float *p, int ndim,
                                  size_t d0, size_t d1, size_t *off)
{
    kmed_param *q = &tr->params[tr->np++];
    snprintf(q->name, sizeof q->name, "%s", name);
    q->n = ndim == 2 ? d0 * d1 : d0;
    q->p = p ? p : tr->pblock + *off;
    q->g = tr->gblock + *off;
    q->m = tr->mblock ? tr->mblock + *off : NULL;
    q->v = tr->vblock ? tr->vblock + *off : NULL;
    q->ndim = ndim;
    q->shape[0] = d0;
    q->shape[1] = ndim == 2 ? d1 : 0;
    *off += q->n;
}

/* Activation floats per layer for N rows. */
static size_t kmed__train_acts_floats(const kmed_gemma_config *c, size_t B, size_t T,
                                      size_t r, int nlora)
{
    size_t N = B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    return 16 * 24 + N * (5 * C + 4 + 2 * HD + 2 * KD + 3 * F) +
           B * (size_t)c->n_heads * T * T + (size_t)nlora * N * r;
}

static void kmed__train_acts_slice(kmed__train_acts *a, float **cur,
                                   const kmed_gemma_config *c, size_t B, size_t T, size_t r,
                                   const kmed_lora *lora, int layer)
{
    size_t N = B * T, C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    int t;
    memset(a, 0, sizeof *a);
    a->xn1 = kmed__train_take(cur, N * C);
    a->rstd1 = kmed__train_take(cur, N);
    a->q = kmed__train_take(cur, N * HD);
    a->k = kmed__train_take(cur, N * KD);
    a->v = kmed__train_take(cur, N * KD);
    a->att = kmed__train_take(cur, B * (size_t)c->n_heads * T * T);
    a->ao = kmed__train_take(cur, N * HD);
    a->o = kmed__train_take(cur, N * C);
    a->rstd2 = kmed__train_take(cur, N);
    a->hmid = kmed__train_take(cur, N * C);
    a->xn3 = kmed__train_take(cur, N * C);
    a->rstd3 = kmed__train_take(cur, N);
    a->g = kmed__train_take(cur, N * F);
    a->u = kmed__train_take(cur, N * F);
    a->hg = kmed__train_take(cur, N * F);
    a->dn = kmed__train_take(cur, N * C);
    a->rstd4 = kmed__train_take(cur, N);
    for (t = 0; t < KMED_LORA_NTARGETS; t++) {
        int any = 0, l;
        if (!lora) continue;
        if (layer >= 0) any = lora->ab[layer][t].A != NULL;
        else
            for (l = 0; l < lora->n_layers; l++) any |= lora->ab[l][t].A != NULL;
        if (any) a->xa[t] = kmed__train_take(cur, N * r);
    }
}

KMED_API void kmed_train_free(kmed_train *tr)
{
    if (!tr) return;
    if (tr->full) KMED_FREE(tr->view.layers);   /* LoRA's view borrows m's layers */
    else KMED_FREE(tr->dembed);                  /* full mode's lies in gblock */
    KMED_FREE(tr->tembed);
    KMED_FREE(tr->tslot);
    KMED_FREE(tr->vmap);
    KMED_FREE(tr->vembed);
    KMED_FREE(tr->rids);
    KMED_FREE(tr->rlabels);
    KMED_FREE(tr->hsh);
    KMED_FREE(tr->params);
    KMED_FREE(tr->pblock);
    KMED_FREE(tr->gblock);
    KMED_FREE(tr->mblock);
    KMED_FREE(tr->vblock);
    KMED_FREE(tr->lg);
    KMED_FREE(tr->acts);
    KMED_FREE(tr->arena);
    KMED_FREE(tr->pos);
    KMED_FREE(tr->hrow);
    KMED_FREE(tr->htgt);
    KMED_FREE(tr->hnll);
    KMED_FREE(tr);
}

/* LM-head scratch; see kmed__train_head. */
#ifdef KMED__SIMD
#define KMED__TRAIN_VC 256     /* vocabulary chunk: its E rows, logits and G stay in L2 */
#define KMED__TRAIN_PARTS 16   /* fixed chunk groups with their own partial dx */

/* Floats of per-thread head scratch for blocks of R rows and C channels. */
static size_t kmed__train_head_floats(size_t R, size_t C, size_t V)
{
    /* the kmed__train_take calls of the two passes, each rounded up to 16 floats */
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC;
    size_t k = R > KMED__TRAIN_VC ? R : KMED__TRAIN_VC;
    size_t p1 = (KMED__TRAIN_VC + KMED__NR) * C + KMED__NR * big + R * KMED__TRAIN_VC;
    size_t p2 = R * KMED__TRAIN_VC + k * KMED__MR + (C + KMED__NR) * KMED__TRAIN_VC +
                KMED__NR * big;
    (void)V;
    return (p1 > p2 ? p1 : p2) + 4 * 16;
}

#else
static size_t kmed__train_head_floats(size_t R, size_t C, size_t V)
{
    (void)R; (void)C;
    return (V + 511) / 512 * 2 + 16;   /* per thread: one row's chunk statistics */
}
#endif

/* Copies weight w (any computable dtype) into f32 dst. */
static void kmed__train_weight_f32(float *dst, const kmed_weight *w)
{
    size_t i, rb = kmed_dtype_bytes(w->type, w->cols);
    for (i = 0; i < w->rows; i++)
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * rb,
                            dst + i * w->cols, w->cols);
}

static kmed_result kmed__train_check_weight(const kmed_weight *w, size_t rows, size_t cols,
                                            const char *what, int l, kmed_error *err)
{
    if (!w->data || w->rows != rows || w->cols != cols || !kmed_dtype_computable(w->type) ||
        !kmed_dtype_bytes(w->type, cols))
        return KMED__ERR(err, KMED_ERR_SHAPE, "layer %d %s: weight [%zu, %zu] %s, expected "
                         "[%zu, %zu] in a computable dtype", l, what, w->rows, w->cols,
                         kmed_dtype_name(w->type), rows, cols);
    return KMED_OK;
}

/* Row hash for finding equal embedding rows (FNV-1a 64 over the row's bytes). */
typedef struct kmed__train_rowkey { uint64_t h; size_t id; } kmed__train_rowkey;

static int kmed__train_rowkey_cmp(const void *a, const void *b)
{
    const kmed__train_rowkey *x = (const kmed__train_rowkey *)a;
    const kmed__train_rowkey *y = (const kmed__train_rowkey *)b;
    if (x->h != y->h) return x->h < y->h ? -1 : 1;
    return x->id < y->id ? -1 : x->id > y->id;
}

/* Vocabulary compaction (see kmed_train_config.used_tokens): the largest group of
   bitwise-equal rows among the unused tokens becomes one shared row at the end; every
   other token keeps its own row, in id order. Leaves tr->vmap NULL when no two unused
   rows are equal. */
static kmed_result kmed__train_compact(kmed_train *tr, const kmed_gemma *m,
                                       const unsigned char *used, kmed_error *err)
{
    const kmed_weight *E = &m->embed;
    size_t V = (size_t)m->cfg.vocab_size, rb = kmed_dtype_bytes(E->type, E->cols);
    size_t nu = 0, v, i, j, best = 0, best_len = 0, members = 0, n;
    const unsigned char *rows = (const unsigned char *)E->data, *rep;
    kmed__train_rowkey *key = (kmed__train_rowkey *)KMED_MALLOC(V * sizeof *key);
    if (!key) return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
    for (v = 0; v < V; v++) {
        uint64_t h = 0xcbf29ce484222325ULL;
        if (used[v]) continue;
        for (j = 0; j < rb; j++) h = (h ^ rows[v * rb + j]) * 0x100000001b3ULL;
        key[nu].h = h;
        key[nu++].id = v;
    }
    qsort(key, nu, sizeof *key, kmed__train_rowkey_cmp);
    for (i = 0; i < nu; i = j) {
        for (j = i + 1; j < nu && key[j].h == key[i].h; j++) {}
        if (j - i > best_len) { best = i; best_len = j - i; }
    }
    rep = nu ? rows + key[best].id * rb : NULL;
    tr->vmap = best_len >= 2 ? (int *)KMED_MALLOC(V * sizeof *tr->vmap) : NULL;
    if (best_len >= 2 && !tr->vmap) {
        KMED_FREE(key);
        return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
    }
    if (!tr->vmap) { KMED_FREE(key); return KMED_OK; }
    for (v = 0; v < V; v++) tr->vmap[v] = 0;
    for (i = best; i < best + best_len; i++)   /* equal hash, then equal bytes */
        if (!memcmp(rows + key[i].id * rb, rep, rb)) { tr->vmap[key[i].id] = -1; members++; }
    KMED_FREE(key);
    n = V - members + 1;
    tr->vembed = (unsigned char *)KMED_MALLOC(n * rb);
    if (!tr->vembed) return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
    for (v = 0, i = 0; v < V; v++) {
        if (tr->vmap[v] < 0) { tr->vmap[v] = (int)(n - 1); continue; }
        memcpy(tr->vembed + i * rb, rows + v * rb, rb);
        tr->vmap[v] = (int)i++;
    }
    memcpy(tr->vembed + (n - 1) * rb, rep, rb);
    tr->sh = n - 1;
    tr->sh_count = (float)members;
    return KMED_OK;
}

KMED_API kmed_result kmed_train_create(kmed_train **out, const kmed_gemma *m, kmed_lora *lora,
                                       const kmed_train_config *cfg, kmed_pool *pool,
                                       kmed_error *err)
{
    kmed_train *tr;
    const kmed_gemma_config *c = &m->cfg;
    size_t C = (size_t)c->hidden_size, F = (size_t)c->intermediate_size, V;
    size_t HD = (size_t)c->n_heads * (size_t)c->head_dim;
    size_t KD = (size_t)c->n_kv_heads * (size_t)c->head_dim;
    size_t N, B, T, r = 0, total = 0, off = 0, maxp, af, arena_n, nacts, i, R;
    size_t hxa_n = 0, hxb_n = 0, hstat_n = 0, hpart_n = 0, vpad = 0;
    int L = c->n_layers, l, t, nlora = 0;
    kmed_weight E;             /* the embedding the trainer reads: m's, or its compact rows */
    float *cur;
    char name[160];
    kmed_result rc;
    *out = NULL;
    if (L <= 0 || C == 0 || F == 0 || HD == 0 || KD == 0 || c->vocab_size <= 0 ||
        c->n_heads % c->n_kv_heads || c->head_dim % 2)
        return KMED__ERR(err, KMED_ERR_ARG, "train: invalid model config");
    V = (size_t)c->vocab_size;
    if (!cfg || (cfg->full && lora) || (!cfg->full && !lora))
        return KMED__ERR(err, KMED_ERR_ARG, "train: give a LoRA adapter (LoRA mode) or set "
                         "full = 1 without one");
    if (lora && lora->n_layers != L)
        return KMED__ERR(err, KMED_ERR_SHAPE, "train: adapter has %d layers, model %d",
                         lora->n_layers, L);
    for (l = 0; l < L; l++) {
        const kmed_gemma_layer *Lw = &m->layers[l];
        for (t = 0; t < KMED_LORA_NTARGETS; t++) {
            size_t o_, i_;
            kmed__lora_dims(c, t, &o_, &i_);
            rc = kmed__train_check_weight(kmed__lora_base(Lw, t), o_, i_, kmed__lora_names[t],
                                          l, err);
            if (rc != KMED_OK) return rc;
        }
        if (!Lw->attn_norm || !Lw->post_attn_norm || !Lw->pre_ffn_norm || !Lw->post_ffn_norm)
            return KMED__ERR(err, KMED_ERR_ARG, "layer %d: norm vector missing", l);
    }
    if ((rc = kmed__train_check_weight(&m->embed, V, C, "embed", -1, err)) != KMED_OK)
        return rc;
    tr = (kmed_train *)kmed__calloc(1, sizeof *tr);
    if (!tr) return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
    tr->cfg = *cfg;
    tr->oc = cfg->optim;
    kmed__train_defaults(&tr->oc);
    tr->full = cfg->full;
    tr->lora = lora;
    tr->pool = pool;
    tr->m = m;
    tr->maxB = B = cfg->max_batch > 0 ? (size_t)cfg->max_batch : 1;
    tr->maxT = T = cfg->max_seq > 0 ? (size_t)cfg->max_seq : 256;
    N = B * T;
    tr->nthreads = kmed_pool_threads(pool);
    tr->lg = (kmed__train_lgrad *)kmed__calloc((size_t)L, sizeof *tr->lg);
    if (!tr->lg) goto nomem;
    tr->vocab = V;
    tr->sh = V;
    E = m->embed;
    if (cfg->used_tokens && (rc = kmed__train_compact(tr, m, cfg->used_tokens, err)) != KMED_OK) {
        kmed_train_free(tr);
        return rc;
    }
    if (tr->vmap) {
        V = tr->sh + 1;
        E.data = tr->vembed;
        E.rows = V;
        tr->rids = (int *)kmed__calloc(N, sizeof(int));
        tr->rlabels = (int *)kmed__calloc(N, sizeof(int));
        if (!tr->rids || !tr->rlabels) goto nomem;
        if (!tr->full) {   /* LoRA: a shell over m's layers with the compact embedding */
            tr->view = *m;
            tr->view.impl_ = NULL;
            tr->view.embed = E;
            tr->view.cfg.vocab_size = (int)V;
            tr->m = &tr->view;
        }
    }

    /* Parameters: count, allocate, name. */
    if (tr->full) {
        total = V * C + C;
        for (l = 0; l < L; l++) {
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                size_t o_, i_;
                kmed__lora_dims(c, t, &o_, &i_);
                total += o_ * i_;
            }
            total += 4 * C;
        }
        maxp = 2 + (size_t)L * 11;
    } else {
        r = (size_t)lora->r;
        total = kmed_lora_numel(lora);
        maxp = (size_t)L * KMED_LORA_NTARGETS * 2 + 1;
        tr->lowest = L;
        for (l = L - 1; l >= 0; l--)
            for (t = 0; t < KMED_LORA_NTARGETS; t++)
                if (lora->ab[l][t].A) tr->lowest = l;
        for (t = 0; t < KMED_LORA_NTARGETS; t++) nlora += (lora->targets >> t) & 1;
    }
    tr->total = total;
    tr->params = (kmed_param *)kmed__calloc(maxp ? maxp : 1, sizeof *tr->params);
    tr->gblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
    if (tr->oc.kind == KMED_OPTIM_ADAMW) {
        tr->mblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
        tr->vblock = (float *)kmed__calloc(total ? total : 1, sizeof(float));
        if (!tr->mblock || !tr->vblock) goto nomem;
    }
    if (tr->full) tr->pblock = (float *)kmed__calloc(total, sizeof(float));
    if (!tr->params || !tr->gblock || (tr->full && !tr->pblock)) goto nomem;
    if (tr->full) {
        static const char *const norm_names[4] = {
            "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
            "post_feedforward_layernorm"};
        tr->view.cfg = *c;
        tr->view.layers = (kmed_gemma_layer *)kmed__calloc((size_t)L, sizeof *tr->view.layers);
        if (!tr->view.layers) goto nomem;
        kmed__train_add_param(tr, "model.embed_tokens.weight", NULL, 2, V, C, &off);
        tr->dembed = tr->params[0].g;
        kmed__train_weight_f32(tr->params[0].p, &E);
        tr->view.cfg.vocab_size = (int)V;
        tr->view.embed = E;
        tr->view.embed.type = KMED_F32;
        tr->view.embed.data = tr->params[0].p;
        for (l = 0; l < L; l++) {
            kmed_gemma_layer *vl = &tr->view.layers[l];
            const kmed_gemma_layer *ml = &m->layers[l];
            const float *src[4];
            float **dstp[4];
            src[0] = ml->attn_norm; src[1] = ml->post_attn_norm;
            src[2] = ml->pre_ffn_norm; src[3] = ml->post_ffn_norm;
            dstp[0] = &vl->attn_norm; dstp[1] = &vl->post_attn_norm;
            dstp[2] = &vl->pre_ffn_norm; dstp[3] = &vl->post_ffn_norm;
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                kmed_param *q;
                kmed_weight *vw = (kmed_weight *)kmed__lora_base(vl, t);
                size_t o_, i_;
                kmed__lora_dims(c, t, &o_, &i_);
                snprintf(name, sizeof name, "model.layers.%d.%s.%s.weight", l,
                         t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t]);
                kmed__train_add_param(tr, name, NULL, 2, o_, i_, &off);
                q = &tr->params[tr->np - 1];
                kmed__train_weight_f32(q->p, kmed__lora_base(ml, t));
                vw->data = q->p;
                vw->type = KMED_F32;
                vw->rows = o_;
                vw->cols = i_;
                tr->lg[l].dw[t] = q->g;
            }
            for (t = 0; t < 4; t++) {
                kmed_param *q;
                snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, norm_names[t]);
                kmed__train_add_param(tr, name, NULL, 1, C, 0, &off);
                q = &tr->params[tr->np - 1];
                memcpy(q->p, src[t], C * sizeof(float));
                *dstp[t] = q->p;
                tr->lg[l].dnorm[t] = q->g;
            }
        }
        kmed__train_add_param(tr, "model.norm.weight", NULL, 1, C, 0, &off);
        memcpy(tr->params[tr->np - 1].p, m->final_norm, C * sizeof(float));
        tr->view.final_norm = tr->params[tr->np - 1].p;
        tr->dfinal = tr->params[tr->np - 1].g;
        tr->m = &tr->view;
        tr->lowest = 0;
        tr->pall = tr->pblock;
    } else {
        for (l = 0; l < L; l++)
            for (t = 0; t < KMED_LORA_NTARGETS; t++) {
                size_t o_, i_;
                if (!lora->ab[l][t].A) continue;
                kmed__lora_dims(c, t, &o_, &i_);
                kmed__lora_tensor_name(name, sizeof name, l, t, 'A', NULL);
                kmed__train_add_param(tr, name, lora->ab[l][t].A, 2, r, i_, &off);
                tr->lg[l].dA[t] = tr->params[tr->np - 1].g;
                kmed__lora_tensor_name(name, sizeof name, l, t, 'B', NULL);
                kmed__train_add_param(tr, name, lora->ab[l][t].B, 2, o_, r, &off);
                tr->lg[l].dB[t] = tr->params[tr->np - 1].g;
            }
        if (lora->n_tokens > 0) {
            /* Trainable tokens: the forward reads an f32 embedding whose token rows are
               the adapter's; the backward fills its whole gradient (as full mode) and the
               token rows' part is the parameter's gradient. */
            size_t k, nt = (size_t)lora->n_tokens;
            kmed__train_add_param(tr, KMED__LORA_TOKENS_TENSOR, lora->token_rows, 2, nt, C,
                                  &off);
            tr->tembed = (float *)kmed__calloc(V * C, sizeof(float));
            tr->dembed = (float *)kmed__calloc(V * C, sizeof(float));
            tr->tslot = (size_t *)kmed__calloc(nt, sizeof(size_t));
            if (!tr->tembed || !tr->dembed || !tr->tslot) goto nomem;
            for (k = 0; k < nt; k++) {
                int id = lora->token_ids[k];
                tr->tslot[k] = tr->vmap ? (size_t)tr->vmap[id] : (size_t)id;
                if (tr->vmap && tr->tslot[k] == tr->sh) {
                    kmed_train_free(tr);
                    return KMED__ERR(err, KMED_ERR_ARG, "train: trainable token %d is not "
                                     "among cfg.used_tokens", id);
                }
            }
            kmed__train_weight_f32(tr->tembed, &E);
            if (!tr->vmap) {
                tr->view = *m;
                tr->view.impl_ = NULL;
            }
            tr->view.embed = E;
            tr->view.embed.type = KMED_F32;
            tr->view.embed.data = tr->tembed;
            tr->m = &tr->view;
            tr->lowest = 0;
        }
        tr->pall = ((kmed__lora_impl *)lora->impl_)->block;
        KMED_ASSERT(off == total);
    }

    /* Arena: activations (all layers, or one under checkpointing), residual stream,
       gradient scratch, LM-head block. */
    tr->head_rows = cfg->head_rows ? cfg->head_rows : ((size_t)32 << 20) / V;
    if (tr->head_rows < 1) tr->head_rows = 1;
    if (tr->head_rows > N) tr->head_rows = N;
    nacts = cfg->checkpointing ? 1 : (size_t)L;
    af = kmed__train_acts_floats(c, B, T, r, nlora);
    R = tr->head_rows;
    tr->head_floats = kmed__train_head_floats(R, C, V);
#ifdef KMED__SIMD
    hxa_n = (R + KMED__MR) * C;
    hxb_n = (C + KMED__NR) * R;
    hstat_n = R * ((V + KMED__TRAIN_VC - 1) / KMED__TRAIN_VC) * 2;
    hpart_n = (size_t)KMED__TRAIN_PARTS * R * C;
    vpad = R * KMED__TRAIN_VC;   /* logits stored chunk by chunk, the last one whole */
#endif
    arena_n = nacts * af + 16 * 40 + (size_t)(L + 1) * N * C + 7 * N * C + N +
              3 * N * HD + 3 * N * KD + 3 * N * F + N * (r ? r : 1) +
              (size_t)tr->nthreads * 2 * T * T + R * V + vpad + 2 * R * C +
              (size_t)tr->nthreads * tr->head_floats + hxa_n + hxb_n + hstat_n + hpart_n +
              3 * R + 16 * 8;
    tr->arena = (float *)kmed__calloc(arena_n, sizeof(float));
    tr->acts = (kmed__train_acts *)kmed__calloc(nacts, sizeof *tr->acts);
    tr->pos = (int *)kmed__calloc(N, sizeof(int));
    tr->hrow = (size_t *)kmed__calloc(N, sizeof(size_t));
    tr->htgt = (int *)kmed__calloc(N, sizeof(int));
    tr->hnll = (double *)kmed__calloc(tr->head_rows, sizeof(double));
    tr->hsh = (float *)kmed__calloc(tr->head_rows, sizeof(float));
    if (!tr->arena || !tr->acts || !tr->pos || !tr->hrow || !tr->htgt || !tr->hnll || !tr->hsh)
        goto nomem;
    cur = tr->arena;
    for (i = 0; i < nacts; i++)
        kmed__train_acts_slice(&tr->acts[i], &cur, c, B, T, r, lora,
                               cfg->checkpointing ? -1 : (int)i);
    tr->resid = kmed__train_take(&cur, (size_t)(L + 1) * N * C);
    tr->xf = kmed__train_take(&cur, N * C);
    tr->rstdf = kmed__train_take(&cur, N);
    tr->tmp = kmed__train_take(&cur, N * C);
    tr->tmp2 = kmed__train_take(&cur, N * C);
    tr->dres = kmed__train_take(&cur, N * C);
    tr->dtmp = kmed__train_take(&cur, N * C);
    tr->dxn = kmed__train_take(&cur, N * C);
    tr->dao = kmed__train_take(&cur, N * HD);
    tr->dq = kmed__train_take(&cur, N * HD);
    tr->dqp = kmed__train_take(&cur, N * HD);
    tr->dk = kmed__train_take(&cur, N * KD);
    tr->dkp = kmed__train_take(&cur, N * KD);
    tr->dv = kmed__train_take(&cur, N * KD);
    tr->dg = kmed__train_take(&cur, N * F);
    tr->du = kmed__train_take(&cur, N * F);
    tr->dhg = kmed__train_take(&cur, N * F);
    tr->dxa = kmed__train_take(&cur, N * (r ? r : 1));
    tr->att_scratch = kmed__train_take(&cur, (size_t)tr->nthreads * 2 * T * T);
    tr->logits = kmed__train_take(&cur, R * V + vpad);
    tr->head_scratch = kmed__train_take(&cur, (size_t)tr->nthreads * tr->head_floats);
    tr->hx = kmed__train_take(&cur, R * C);
    tr->hdx = kmed__train_take(&cur, R * C);
    tr->hxa = kmed__train_take(&cur, hxa_n);
    tr->hxb = kmed__train_take(&cur, hxb_n);
    tr->hstat = kmed__train_take(&cur, hstat_n);
    tr->hpart = kmed__train_take(&cur, hpart_n);
    tr->hrowf = kmed__train_take(&cur, 3 * R);
    KMED_ASSERT((size_t)(cur - tr->arena) <= arena_n);
    *out = tr;
    return KMED_OK;
nomem:
    kmed_train_free(tr);
    return KMED__ERR(err, KMED_ERR_NOMEM, "train: out of memory");
}

KMED_API size_t kmed_train_params(kmed_train *tr, kmed_param **params)
{
    *params = tr->params;
    return tr->np;
}

KMED_API const kmed_gemma *kmed_train_model(const kmed_train *tr) { return tr->m; }
KMED_API long kmed_train_step_count(const kmed_train *tr) { return tr->step; }

KMED_API size_t kmed_train_count(const int *labels, size_t B, size_t T)
{
    size_t b, t, n = 0;
    for (b = 0; b < B; b++)
        for (t = 0; t + 1 < T; t++) n += labels[b * T + t + 1] != KMED_LABEL_IGNORE;
    return n;
}

KMED_API void kmed_train_zero_grad(kmed_train *tr)
{
    memset(tr->gblock, 0, tr->total * sizeof(float));
    if (tr->tembed)
        memset(tr->dembed, 0, tr->view.embed.rows * tr->view.embed.cols * sizeof(float));
}

/* ---- trainer: forward and backward ---- */

/* Row-parallel wrappers: ops are serial over the rows they get; rows split over threads
   never share writes, so results do not depend on the thread count. */
typedef struct kmed__train_rows {
    float *y, *rstd, *dx;
    const float *x, *w, *dy, *g, *u;
    float *dg, *du;
    size_t C;
    float eps;
} kmed__train_rows;

static void kmed__train_norm_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    kmed__rmsnorm_forward(c->y + b * c->C, c->rstd + b, c->x + b * c->C, c->w, e - b, c->C,
                          c->eps);
}

static void kmed__train_norm(kmed_train *tr, float *y, float *rstd, const float *x,
                             const float *w, size_t N)
{
    kmed__train_rows c;
    memset(&c, 0, sizeof c);
    c.y = y; c.rstd = rstd; c.x = x; c.w = w;
    c.C = (size_t)tr->m->cfg.hidden_size;
    c.eps = tr->m->cfg.rms_norm_eps;
    kmed_pool_for(tr->pool, N, 1, kmed__train_norm_fn, &c);
}

static void kmed__train_norm_bw_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    kmed__rmsnorm_backward(c->dx + b * c->C, NULL, c->dy + b * c->C, c->x + b * c->C, c->w,
                           c->rstd + b, e - b, c->C);
}

/* dx += and dw += through the norm: dx rows in parallel, dw serially in row order. */
static void kmed__train_norm_bw(kmed_train *tr, float *dx, float *dw, const float *dy,
                                const float *x, const float *w, const float *rstd, size_t N)
{
    kmed__train_rows c;
    size_t C = (size_t)tr->m->cfg.hidden_size;
    if (dx) {
        memset(&c, 0, sizeof c);
        c.dx = dx; c.dy = dy; c.x = x; c.w = w; c.rstd = (float *)(uintptr_t)rstd; c.C = C;
        kmed_pool_for(tr->pool, N, 1, kmed__train_norm_bw_fn, &c);
    }
    if (dw) kmed__rmsnorm_backward(NULL, dw, dy, x, w, rstd, N, C);
}

static void kmed__train_geglu_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_rows *c = (kmed__train_rows *)ctx;
    (void)thread;
    if (c->y) kmed__geglu_forward(c->y + b, c->g + b, c->u + b, e - b);
    else kmed__geglu_backward(c->dg + b, c->du + b, c->dy + b, c->g + b, c->u + b, e - b);
}

static void kmed__train_linear(kmed_train *tr, float *y, float *xa, const float *x,
                               const kmed_weight *w, const kmed_lora_ab *ab, size_t M)
{
    kmed_matmul(tr->pool, y, x, w->data, w->type, M, w->rows, w->cols, 0);
    if (ab && ab->A)
        kmed__lora_forward(tr->pool, y, xa, x, ab->A, ab->B, M, w->rows, w->cols,
                           (size_t)tr->lora->r, tr->lora->scale);
}

/* dx += dy W (+ LoRA), dw += dy^T x, dA/dB through the adapter; NULLs skip. */
static void kmed__train_linear_backward(kmed_train *tr, float *dx, float *dw, float *dA,
                                        float *dB, const float *dy, const float *x,
                                        const float *xa, const kmed_weight *w,
                                        const kmed_lora_ab *ab, size_t M)
{
    if (dx) kmed_matmul_dx(tr->pool, dx, dy, w->data, w->type, M, w->rows, w->cols);
    if (dw) kmed_matmul_dw(tr->pool, dw, dy, x, M, w->rows, w->cols);
    if (ab && ab->A)
        kmed__lora_backward(tr->pool, dx, dA, dB, dy, xa, x, ab->A, ab->B, tr->dxa, M,
                            w->rows, w->cols, (size_t)tr->lora->r, tr->lora->scale);
}

typedef struct kmed__train_attn {
    kmed_train *tr;
    kmed__train_acts *a;
    size_t T;
    size_t window;
    int backward;
} kmed__train_attn;

/* One unit = one sequence x one key/value head group (its H/Hkv query heads). */
static void kmed__train_attn_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_attn *c = (kmed__train_attn *)ctx;
    kmed_train *tr = c->tr;
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t H = (size_t)g->n_heads, Hkv = (size_t)g->n_kv_heads, D = (size_t)g->head_dim;
    size_t group = H / Hkv, T = c->T, u;
    float scale = (float)(1.0 / sqrt((double)g->query_pre_attn_scalar));
    for (u = b; u < e; u++) {
        size_t s = u / Hkv, h0 = (u % Hkv) * group;
        size_t qo = s * T * H * D, ko = s * T * Hkv * D;
        float *att = c->a->att + s * H * T * T;
        float *scratch = tr->att_scratch + (size_t)thread * 2 * tr->maxT * tr->maxT;
        if (!c->backward)
            kmed__attention_forward(c->a->ao + qo, att, c->a->q + qo, c->a->k + ko,
                                    c->a->v + ko, tr->pos, scratch, T, T, H, Hkv, D, scale,
                                    g->attn_softcap, c->window, h0, h0 + group);
        else
            kmed__attention_backward(tr->dq + qo, tr->dk + ko, tr->dv + ko, tr->dao + qo, att,
                                     c->a->q + qo, c->a->k + ko, c->a->v + ko, tr->pos,
                                     scratch, T, T, H, Hkv, D, scale, g->attn_softcap,
                                     c->window, h0, h0 + group);
    }
}

static size_t kmed__train_window(const kmed_gemma_config *g, int l)
{
    /* Gemma-2 alternates: even layers slide, odd layers see the whole causal past. */
    return (l % 2 == 0 && g->sliding_window > 0) ? (size_t)g->sliding_window : 0;
}

/* Layer l forward from x_in (N, C) to x_out (N, C), filling a. */
static void kmed__train_layer_forward(kmed_train *tr, int l, kmed__train_acts *a,
                                      const float *x_in, float *x_out, size_t B, size_t T)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_gemma_layer *w = &tr->m->layers[l];
    const kmed_lora_ab *ab = tr->lora ? tr->lora->ab[l] : NULL;
    size_t N = B * T, C = (size_t)g->hidden_size, F = (size_t)g->intermediate_size, i;
    kmed__train_attn ac;
    kmed__train_rows rc;
    kmed__train_norm(tr, a->xn1, a->rstd1, x_in, w->attn_norm, N);
    kmed__train_linear(tr, a->q, a->xa[KMED_LORA_Q], a->xn1, &w->q, ab ? &ab[0] : NULL, N);
    kmed__train_linear(tr, a->k, a->xa[KMED_LORA_K], a->xn1, &w->k, ab ? &ab[1] : NULL, N);
    kmed__train_linear(tr, a->v, a->xa[KMED_LORA_V], a->xn1, &w->v, ab ? &ab[2] : NULL, N);
    kmed__rope_forward(a->q, a->q, tr->pos, N, (size_t)g->n_heads, (size_t)g->head_dim,
                       g->rope_theta);
    kmed__rope_forward(a->k, a->k, tr->pos, N, (size_t)g->n_kv_heads, (size_t)g->head_dim,
                       g->rope_theta);
    ac.tr = tr; ac.a = a; ac.T = T; ac.window = kmed__train_window(g, l); ac.backward = 0;
    kmed_pool_for(tr->pool, B * (size_t)g->n_kv_heads, 1, kmed__train_attn_fn, &ac);
    kmed__train_linear(tr, a->o, a->xa[KMED_LORA_O], a->ao, &w->o, ab ? &ab[3] : NULL, N);
    kmed__train_norm(tr, tr->tmp, a->rstd2, a->o, w->post_attn_norm, N);
    for (i = 0; i < N * C; i++) a->hmid[i] = x_in[i] + tr->tmp[i];
    kmed__train_norm(tr, a->xn3, a->rstd3, a->hmid, w->pre_ffn_norm, N);
    kmed__train_linear(tr, a->g, a->xa[KMED_LORA_GATE], a->xn3, &w->gate, ab ? &ab[4] : NULL,
                       N);
    kmed__train_linear(tr, a->u, a->xa[KMED_LORA_UP], a->xn3, &w->up, ab ? &ab[5] : NULL, N);
    memset(&rc, 0, sizeof rc);
    rc.y = a->hg; rc.g = a->g; rc.u = a->u;
    kmed_pool_for(tr->pool, N * F, 1024, kmed__train_geglu_fn, &rc);
    kmed__train_linear(tr, a->dn, a->xa[KMED_LORA_DOWN], a->hg, &w->down, ab ? &ab[6] : NULL,
                       N);
    kmed__train_norm(tr, tr->tmp, a->rstd4, a->dn, w->post_ffn_norm, N);
    for (i = 0; i < N * C; i++) x_out[i] = a->hmid[i] + tr->tmp[i];
}

/* Layer l backward: tr->dres holds d(x_out) on entry and d(x_in) on return (only when
   need_dx; otherwise just the weight/adapter gradients are accumulated). */
static void kmed__train_layer_backward(kmed_train *tr, int l, const kmed__train_acts *a,
                                       const float *x_in, size_t B, size_t T, int need_dx)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_gemma_layer *w = &tr->m->layers[l];
    const kmed_lora_ab *ab = tr->lora ? tr->lora->ab[l] : NULL;
    const kmed__train_lgrad *G = &tr->lg[l];
    size_t N = B * T, C = (size_t)g->hidden_size, F = (size_t)g->intermediate_size;
    size_t HD = (size_t)g->n_heads * (size_t)g->head_dim;
    size_t KD = (size_t)g->n_kv_heads * (size_t)g->head_dim;
    kmed__train_attn ac;
    kmed__train_rows rc;

    /* feed-forward block:
       x_out = hmid + post_ffn_norm(down(geglu(gate, up)(pre_ffn_norm(hmid)))) */
    memset(tr->dtmp, 0, N * C * sizeof(float));
    kmed__train_norm_bw(tr, tr->dtmp, G->dnorm[3], tr->dres, a->dn, w->post_ffn_norm,
                        a->rstd4, N);
    memset(tr->dhg, 0, N * F * sizeof(float));
    kmed__train_linear_backward(tr, tr->dhg, G->dw[6], G->dA[6], G->dB[6], tr->dtmp, a->hg,
                                a->xa[6], &w->down, ab ? &ab[6] : NULL, N);
    memset(tr->dg, 0, N * F * sizeof(float));
    memset(tr->du, 0, N * F * sizeof(float));
    memset(&rc, 0, sizeof rc);
    rc.dg = tr->dg; rc.du = tr->du; rc.dy = tr->dhg; rc.g = a->g; rc.u = a->u;
    kmed_pool_for(tr->pool, N * F, 1024, kmed__train_geglu_fn, &rc);
    memset(tr->dxn, 0, N * C * sizeof(float));
    kmed__train_linear_backward(tr, tr->dxn, G->dw[4], G->dA[4], G->dB[4], tr->dg, a->xn3,
                                a->xa[4], &w->gate, ab ? &ab[4] : NULL, N);
    kmed__train_linear_backward(tr, tr->dxn, G->dw[5], G->dA[5], G->dB[5], tr->du, a->xn3,
                                a->xa[5], &w->up, ab ? &ab[5] : NULL, N);
    kmed__train_norm_bw(tr, tr->dres, G->dnorm[2], tr->dxn, a->hmid, w->pre_ffn_norm,
                        a->rstd3, N);

    /* attention block: hmid = x_in + post_attn_norm(o(attn(rope(q), rope(k), v))) */
    memset(tr->dtmp, 0, N * C * sizeof(float));
    kmed__train_norm_bw(tr, tr->dtmp, G->dnorm[1], tr->dres, a->o, w->post_attn_norm,
                        a->rstd2, N);
    memset(tr->dao, 0, N * HD * sizeof(float));
    kmed__train_linear_backward(tr, tr->dao, G->dw[3], G->dA[3], G->dB[3], tr->dtmp, a->ao,
                                a->xa[3], &w->o, ab ? &ab[3] : NULL, N);
    memset(tr->dq, 0, N * HD * sizeof(float));
    memset(tr->dk, 0, N * KD * sizeof(float));
    memset(tr->dv, 0, N * KD * sizeof(float));
    ac.tr = tr; ac.a = (kmed__train_acts *)(uintptr_t)a; ac.T = T;
    ac.window = kmed__train_window(g, l); ac.backward = 1;
    kmed_pool_for(tr->pool, B * (size_t)g->n_kv_heads, 1, kmed__train_attn_fn, &ac);
    memset(tr->dqp, 0, N * HD * sizeof(float));
    memset(tr->dkp, 0, N * KD * sizeof(float));
    kmed__rope_backward(tr->dqp, tr->dq, tr->pos, N, (size_t)g->n_heads, (size_t)g->head_dim,
                        g->rope_theta);
    kmed__rope_backward(tr->dkp, tr->dk, tr->pos, N, (size_t)g->n_kv_heads,
                        (size_t)g->head_dim, g->rope_theta);
    memset(tr->dxn, 0, N * C * sizeof(float));
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[0], G->dA[0], G->dB[0],
                                tr->dqp, a->xn1, a->xa[0], &w->q, ab ? &ab[0] : NULL, N);
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[1], G->dA[1], G->dB[1],
                                tr->dkp, a->xn1, a->xa[1], &w->k, ab ? &ab[1] : NULL, N);
    kmed__train_linear_backward(tr, need_dx ? tr->dxn : NULL, G->dw[2], G->dA[2], G->dB[2],
                                tr->dv, a->xn1, a->xa[2], &w->v, ab ? &ab[2] : NULL, N);
    if (need_dx)
        kmed__train_norm_bw(tr, tr->dres, G->dnorm[0], tr->dxn, x_in, w->attn_norm, a->rstd1,
                            N);
}

/* Gathers the counted rows of the batch (position t predicts labels[t + 1]) into
   hrow/htgt; returns their number, or -1 (error set) for a label outside [0, V). */
static long kmed__train_head_gather(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    kmed_error *err)
{
    size_t V = (size_t)tr->m->cfg.vocab_size, n = 0, b, t;
    for (b = 0; b < B; b++)
        for (t = 0; t + 1 < T; t++) {
            int lab = labels[b * T + t + 1];
            if (lab == KMED_LABEL_IGNORE) continue;
            if (lab < 0 || (size_t)lab >= V) {
                KMED__ERR(err, KMED_ERR_ARG, "label %d at sequence %zu position %zu is "
                          "outside [0, %zu) and not -100", lab, b, t + 1, V);
                return -1;
            }
            tr->hrow[n] = b * T + t;
            tr->htgt[n] = lab;
            n++;
        }
    return (long)n;
}

/* Log-sum-exp pieces of one row from its chunks' (max, exp-sum) pairs st (nch, 2), merged
   in chunk order: *mx = the row max, returns sum(exp(y - mx)) in double. */
static double kmed__train_head_lse(const float *st, size_t nch, float *mx)
{
    float m = -INFINITY;
    double sum = 0.0;
    size_t ch;
    for (ch = 0; ch < nch; ch++) m = st[2 * ch] > m ? st[2 * ch] : m;
    for (ch = 0; ch < nch; ch++)
        if (st[2 * ch + 1] != 0.0f)
            sum += (double)st[2 * ch + 1] * exp((double)st[2 * ch] - (double)m);
    *mx = m;
    return sum;
}

#ifdef KMED__SIMD
/* The LM head with tensor's GEMM micro-kernel on cache-sized pieces. Per block of nb
   counted rows, the vocabulary is cut into chunks of KMED__TRAIN_VC entries:
   pass 1 (threads over chunks): logits of every row for the chunk (E's chunk packed once,
     used by all rows), soft-capped in place while in cache, with the chunk's max and
     exp-sum per row; merged in chunk order into each row's log-sum-exp. The capped logits
     are streamed out chunk-major for pass 2: storing them costs far less than a fourth
     GEMM to recompute them (each logit is 128+ multiply-adds per 4 bytes moved).
   pass 2 (threads over KMED__TRAIN_PARTS fixed groups of chunks): the chunk's gradient
     G (nb, VC) rebuilt from the stored capped logits into cache, then dE[chunk] += G^T x
     and dx += G E[chunk] into the group's partial dx, the groups summed in order after.
   Every sum runs over a fixed chunk/group layout, so 1 and N threads give the same bits;
   only the summation order differs from the plain three-GEMM head (the non-SIMD one). */
typedef struct kmed__train_headc {
    kmed_train *tr;
    float *dxf;           /* (N, C) += the gradient of the final norm's output */
    size_t s0, nb, nch;   /* first gathered row, rows, vocabulary chunks */
    float inv;            /* 1 / norm, 0 for forward only */
} kmed__train_headc;

/* dst[0..n) = src[0..n), with non-temporal stores where dst is 64-byte aligned. */
static void kmed__train_stream(float *dst, const float *src, size_t n)
{
    size_t i = 0;
#if KMED__SIMD == 512
    i = (64 - ((uintptr_t)dst & 63)) / sizeof(float) % 16;   /* up to the first 64 B line */
    if (i > n) i = n;
    memcpy(dst, src, i * sizeof(float));
    for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
    _mm_sfence();
#endif
    memcpy(dst + i, src + i, (n - i) * sizeof(float));
}

/* Pulls rows [v0, v0 + n) of an (V, C) f32 matrix toward the cache ahead of use. */
static void kmed__train_prefetch_rows(const float *m, size_t v0, size_t n, size_t C)
{
    const char *p = (const char *)(m + v0 * C), *end = (const char *)(m + (v0 + n) * C);
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
}

/* Pass 1 over chunks [b, e). */
static void kmed__train_head_stats_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)tr->m->cfg.vocab_size, C = (size_t)tr->m->cfg.hidden_size, ch;
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC;
    float cap = tr->m->cfg.final_softcap;
    float *cur = tr->head_scratch + (size_t)thread * tr->head_floats;
    float *bp = kmed__train_take(&cur, (KMED__TRAIN_VC + KMED__NR) * C); /* E^T panels */
    float *tmp = kmed__train_take(&cur, KMED__NR * big);
    float *out = kmed__train_take(&cur, c->nb * KMED__TRAIN_VC);       /* (nb, VC) */
    kmed__gsrc Bs;
    KMED_ASSERT(cur <= tr->head_scratch + (size_t)(thread + 1) * tr->head_floats);
    memset(&Bs, 0, sizeof Bs);
    Bs.p = E->data; Bs.t = E->type; Bs.ld = C; Bs.trans = 1; Bs.alpha = 1.0f;
    for (ch = b; ch < e; ch++) {
        size_t v0 = ch * KMED__TRAIN_VC, vc = V - v0 < KMED__TRAIN_VC ? V - v0 : KMED__TRAIN_VC;
        size_t jr, s, i;
        for (jr = 0; jr < vc; jr += KMED__NR)
            kmed__pack_b(bp + jr * C, &Bs, 0, C, v0 + jr,
                         vc - jr < KMED__NR ? vc - jr : KMED__NR, tmp);
        /* panel outer: the E^T panel stays in L1 while the x strips stream from L2 */
        for (jr = 0; jr < vc; jr += KMED__NR)
            for (s = 0; s < c->nb; s += KMED__MR)
                kmed__gemm_ukr(C, tr->hxa + s * C, bp + jr * C,
                               out + s * KMED__TRAIN_VC + jr, KMED__TRAIN_VC, 0,
                               c->nb - s < KMED__MR ? c->nb - s : KMED__MR,
                               vc - jr < KMED__NR ? vc - jr : KMED__NR);
        for (i = 0; i < c->nb; i++) {
            float *yr = out + i * KMED__TRAIN_VC, *st = tr->hstat + (i * c->nch + ch) * 2;
            size_t tgt = (size_t)tr->htgt[c->s0 + i];
            kmed__xent_stats(yr, vc, cap, &st[0], &st[1]);
            if (tr->sh >= v0 && tr->sh < v0 + vc) tr->hsh[i] = yr[tr->sh - v0];
            if (tgt >= v0 && tgt < v0 + vc) tr->hrowf[i * 3] = yr[tgt - v0];
        }
        /* backward keeps the capped logits for pass 2, chunk by chunk, streamed past the
           caches (they come back once, long after) */
        if (c->inv != 0.0f)
            kmed__train_stream(tr->logits + ch * c->nb * KMED__TRAIN_VC, out,
                               c->nb * KMED__TRAIN_VC);
    }
}

/* Merges the chunk statistics of rows [b, e): NLL, the max and the softmax scale. */
static void kmed__train_head_merge_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t i;
    (void)thread;
    for (i = b; i < e; i++) {
        float mx;
        double sum = kmed__train_head_lse(tr->hstat + i * c->nch * 2, c->nch, &mx);
        if (tr->vmap)   /* the shared row once per token it stands for */
            sum += (double)(tr->sh_count - 1.0f) * exp((double)tr->hsh[i] - (double)mx);
        tr->hnll[i] = (double)mx + log(sum) - (double)tr->hrowf[i * 3];
        tr->hrowf[i * 3 + 1] = mx;
        tr->hrowf[i * 3 + 2] = (float)(1.0 / sum) * c->inv;
    }
}

/* Pass 2 over chunk groups [b, e). */
static void kmed__train_head_grad_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)tr->m->cfg.vocab_size, C = (size_t)tr->m->cfg.hidden_size;
    size_t big = C > KMED__TRAIN_VC ? C : KMED__TRAIN_VC, nb = c->nb, p;
    size_t k = nb > KMED__TRAIN_VC ? nb : KMED__TRAIN_VC;
    size_t parts = c->nch < KMED__TRAIN_PARTS ? c->nch : KMED__TRAIN_PARTS;
    float cap = tr->m->cfg.final_softcap;
    float *cur = tr->head_scratch + (size_t)thread * tr->head_floats;
    float *G = kmed__train_take(&cur, nb * KMED__TRAIN_VC);     /* (nb, VC) */
    float *ap = kmed__train_take(&cur, k * KMED__MR);
    float *ef = kmed__train_take(&cur, (C + KMED__NR) * KMED__TRAIN_VC); /* E rows, f32 */
    float *tmp = kmed__train_take(&cur, KMED__NR * big);
    float *lastp = ef + C * KMED__TRAIN_VC;    /* (VC, NR): the last, partial C panel */
    size_t clast = C - C % KMED__NR;           /* its first column (C when none) */
    kmed__gsrc Es, Gt, Gn;
    KMED_ASSERT(cur <= tr->head_scratch + (size_t)(thread + 1) * tr->head_floats);
    memset(&Es, 0, sizeof Es);
    Es.t = KMED_F32; Es.ld = C; Es.alpha = 1.0f;
    Gt = Es;
    Gt.p = G; Gt.ld = KMED__TRAIN_VC; Gt.trans = 1;                   /* A(v, r) = G[r][v] */
    Gn = Gt;
    Gn.trans = 0;                                                    /* A(r, v) = G[r][v] */
    for (p = b; p < e; p++) {
        float *dxp = tr->hpart + p * nb * C; /* (nb, C) */
        size_t ch;
        memset(dxp, 0, nb * C * sizeof(float));
        for (ch = p * c->nch / parts; ch < (p + 1) * c->nch / parts; ch++) {
            size_t v0 = ch * KMED__TRAIN_VC, jc, s, r;
            size_t vc = V - v0 < KMED__TRAIN_VC ? V - v0 : KMED__TRAIN_VC;
            /* the chunk's dE and E rows arrive while G is computed */
            if (tr->dembed) kmed__train_prefetch_rows(tr->dembed, v0, vc, C);
            if (E->type == KMED_F32) kmed__train_prefetch_rows((const float *)E->data, v0, vc, C);
            for (r = 0; r < nb; r++) {
                const float *rf = tr->hrowf + r * 3;
                size_t tgt = (size_t)tr->htgt[c->s0 + r];
                kmed__xent_grad(G + r * KMED__TRAIN_VC,
                                tr->logits + (ch * nb + r) * KMED__TRAIN_VC, vc,
                                tgt >= v0 ? tgt - v0 : vc, rf[1], rf[2], c->inv, cap);
            }
            if (tr->dembed)   /* dE[v0 + vs ..][C] += G^T x, 12 (or 6) vocabulary rows a time */
                for (s = 0; s < vc; s += KMED__MR) {
                    size_t mv = vc - s < KMED__MR ? vc - s : KMED__MR;
                    kmed__pack_a(ap, &Gt, s, mv, 0, nb);
                    for (jc = 0; jc < C; jc += KMED__NR)
                        kmed__gemm_ukr(nb, ap, tr->hxb + jc * nb, tr->dembed + (v0 + s) * C + jc,
                                       C, 1, mv, C - jc < KMED__NR ? C - jc : KMED__NR);
                }
            if (tr->sh >= v0 && tr->sh < v0 + vc)   /* dx sums over every shared token */
                for (r = 0; r < nb; r++) G[r * KMED__TRAIN_VC + tr->sh - v0] *= tr->sh_count;
            /* E's chunk as the B operand, read in place as f32 rows: the model's own, or
               dequantized here whole rows at a time; a last partial panel packed */
            if (E->type == KMED_F32) Es.p = (const float *)E->data + v0 * C;
            else {
                size_t rb = kmed_dtype_bytes(E->type, C);
                for (r = 0; r < vc; r++)
                    kmed__dequant_span(E->type, (const unsigned char *)E->data + (v0 + r) * rb,
                                       0, C, ef + r * C);
                Es.p = ef;
            }
            if (clast < C) kmed__pack_b(lastp, &Es, 0, vc, clast, C - clast, tmp);
            for (s = 0; s < nb; s += KMED__MR) {   /* dx[s ..][C] += G E[chunk] */
                size_t mr = nb - s < KMED__MR ? nb - s : KMED__MR;
                kmed__pack_a(ap, &Gn, s, mr, 0, vc);
                for (jc = 0; jc < C; jc += KMED__NR)
                    kmed__gemm_ukr_ldb(vc, ap, jc < clast ? (const float *)Es.p + jc : lastp,
                                       jc < clast ? C : KMED__NR, dxp + s * C + jc, C, 1, mr,
                                       C - jc < KMED__NR ? C - jc : KMED__NR);
            }
        }
    }
}

/* dxf[hrow[s0 + i]] += the partial dx of every chunk group, groups in order. */
static void kmed__train_head_dx_fn(void *ctx, size_t b, size_t e, int thread)
{
    const kmed__train_headc *c = (const kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t C = (size_t)tr->m->cfg.hidden_size, i, j, p;
    size_t parts = c->nch < KMED__TRAIN_PARTS ? c->nch : KMED__TRAIN_PARTS;
    (void)thread;
    for (i = b; i < e; i++) {
        float *d = c->dxf + tr->hrow[c->s0 + i] * C; /* (C) */
        for (j = 0; j < C; j++) {
            float t = tr->hpart[i * C + j];
            for (p = 1; p < parts; p++) t += tr->hpart[(p * c->nb + i) * C + j];
            d[j] += t;
        }
    }
}

/* Tied LM head + final soft-cap + cross-entropy over the counted rows only, in blocks
   of head_rows rows so the logits never exceed (head_rows, V). dxf (N, C) += gradient
   when norm > 0; full mode also adds to the embedding gradient. */
static kmed_result kmed__train_head(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    double norm, float *dxf, double *loss_sum, size_t *count,
                                    kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t V = (size_t)g->vocab_size, C = (size_t)g->hidden_size, s, i, jc;
    long n = kmed__train_head_gather(tr, labels, B, T, err);
    double sum = 0.0;
    kmed__train_headc hc;
    kmed__gsrc X;
    if (n < 0) return KMED_ERR_ARG;
    memset(&hc, 0, sizeof hc);
    hc.tr = tr;
    hc.inv = norm > 0.0 ? (float)(1.0 / norm) : 0.0f;
    hc.nch = (V + KMED__TRAIN_VC - 1) / KMED__TRAIN_VC;
    memset(&X, 0, sizeof X);
    X.p = tr->hx; X.t = KMED_F32; X.ld = C; X.alpha = 1.0f;
    hc.dxf = dxf;
    for (s = 0; s < (size_t)n; s += tr->head_rows) {
        size_t nb = (size_t)n - s < tr->head_rows ? (size_t)n - s : tr->head_rows;
        for (i = 0; i < nb; i++)
            memcpy(tr->hx + i * C, tr->xf + tr->hrow[s + i] * C, C * sizeof(float));
        for (i = 0; i < nb; i += KMED__MR)   /* x strips for the logits (A operand) */
            kmed__pack_a(tr->hxa + i * C, &X, i, nb - i < KMED__MR ? nb - i : KMED__MR, 0, C);
        for (jc = 0; jc < C; jc += KMED__NR)   /* x panels for dE (B operand) */
            kmed__pack_b(tr->hxb + jc * nb, &X, 0, nb, jc, C - jc < KMED__NR ? C - jc : KMED__NR,
                         NULL);
        hc.s0 = s;
        hc.nb = nb;
        kmed_pool_for(tr->pool, hc.nch, 1, kmed__train_head_stats_fn, &hc);
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_merge_fn, &hc);
        for (i = 0; i < nb; i++) sum += tr->hnll[i];
        if (norm <= 0.0) continue;
        kmed_pool_for(tr->pool, hc.nch < KMED__TRAIN_PARTS ? hc.nch : KMED__TRAIN_PARTS, 1,
                      kmed__train_head_grad_fn, &hc);
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_dx_fn, &hc);
    }
    if (loss_sum) *loss_sum += sum;
    if (count) *count += (size_t)n;
    return KMED_OK;
}

#else /* no SIMD GEMM: three plain GEMMs over a (head_rows, V) logits block */

typedef struct kmed__train_headc {
    kmed_train *tr;
    size_t s;          /* first gathered row of this block */
    float inv;         /* 1 / norm, 0 for forward only */
} kmed__train_headc;

/* Per row of the logits block: soft-cap, log-sum-exp and NLL from 512-wide chunks, and
   (backward) the gradient of NLL / norm w.r.t. the pre-cap logits, written over them. */
static void kmed__train_head_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_headc *c = (kmed__train_headc *)ctx;
    kmed_train *tr = c->tr;
    size_t V = (size_t)tr->m->cfg.vocab_size, nch = (V + 511) / 512, i, j;
    float cap = tr->m->cfg.final_softcap;
    float *st = tr->head_scratch + (size_t)thread * tr->head_floats; /* (nch, 2) */
    for (i = b; i < e; i++) {
        float *y = tr->logits + i * V; /* (V) */
        size_t tgt = (size_t)tr->htgt[c->s + i];
        float mx;
        double sum;
        for (j = 0; j < V; j += 512)
            kmed__xent_stats(y + j, V - j < 512 ? V - j : 512, cap, &st[j / 256],
                             &st[j / 256 + 1]);
        sum = kmed__train_head_lse(st, nch, &mx);
        if (tr->vmap)   /* the shared row once per token it stands for */
            sum += (double)(tr->sh_count - 1.0f) * exp((double)y[tr->sh] - (double)mx);
        tr->hnll[i] = (double)mx + log(sum) - (double)y[tgt];
        if (c->inv == 0.0f) continue;
        for (j = 0; j < V; j += 512)
            kmed__xent_grad(y + j, y + j, V - j < 512 ? V - j : 512, tgt >= j ? tgt - j : V,
                            mx, (float)(1.0 / sum) * c->inv, c->inv, cap);
    }
}

static kmed_result kmed__train_head(kmed_train *tr, const int *labels, size_t B, size_t T,
                                    double norm, float *dxf, double *loss_sum, size_t *count,
                                    kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    const kmed_weight *E = &tr->m->embed;
    size_t V = (size_t)g->vocab_size, C = (size_t)g->hidden_size, s, i, j;
    long n = kmed__train_head_gather(tr, labels, B, T, err);
    double sum = 0.0;
    kmed__train_headc hc;
    if (n < 0) return KMED_ERR_ARG;
    hc.tr = tr;
    hc.inv = norm > 0.0 ? (float)(1.0 / norm) : 0.0f;
    for (s = 0; s < (size_t)n; s += tr->head_rows) {
        size_t nb = (size_t)n - s < tr->head_rows ? (size_t)n - s : tr->head_rows;
        for (i = 0; i < nb; i++)
            memcpy(tr->hx + i * C, tr->xf + tr->hrow[s + i] * C, C * sizeof(float));
        kmed_matmul(tr->pool, tr->logits, tr->hx, E->data, E->type, nb, V, C, 0);
        hc.s = s;
        kmed_pool_for(tr->pool, nb, 1, kmed__train_head_fn, &hc);
        for (i = 0; i < nb; i++) sum += tr->hnll[i];
        if (norm <= 0.0) continue;
        if (tr->dembed) kmed_matmul_dw(tr->pool, tr->dembed, tr->logits, tr->hx, nb, V, C);
        if (tr->vmap)   /* dE above is per shared token; dx sums over all of them */
            for (i = 0; i < nb; i++) tr->logits[i * V + tr->sh] *= tr->sh_count;
        memset(tr->hdx, 0, nb * C * sizeof(float));
        kmed_matmul_dx(tr->pool, tr->hdx, tr->logits, E->data, E->type, nb, V, C);
        for (i = 0; i < nb; i++) {
            float *d = dxf + tr->hrow[s + i] * C;
            for (j = 0; j < C; j++) d[j] += tr->hdx[i * C + j];
        }
    }
    if (loss_sum) *loss_sum += sum;
    if (count) *count += (size_t)n;
    return KMED_OK;
}
#endif

KMED_API kmed_result kmed_train_forward_backward(kmed_train *tr, const int *ids,
                                                 const int *labels, size_t B, size_t T,
                                                 double norm, double *loss_sum,
                                                 size_t *count, kmed_error *err)
{
    const kmed_gemma_config *g = &tr->m->cfg;
    size_t N = B * T, C = (size_t)g->hidden_size, V = (size_t)g->vocab_size, NC, i;
    int L = g->n_layers, l, backward = norm > 0.0;
    kmed_result rc;
    if (B == 0 || T == 0 || B > tr->maxB || T > tr->maxT)
        return KMED__ERR(err, KMED_ERR_ARG, "batch %zu x %zu tokens outside the trainer's "
                         "1..%zu x 1..%zu", B, T, tr->maxB, tr->maxT);
    if (tr->vmap) {   /* to compact rows; a token of the shared row breaks its premise */
        for (i = 0; i < N; i++) {
            int id = ids[i], lab = labels[i], bad = 0;
            if (id < 0 || (size_t)id >= tr->vocab || (size_t)tr->vmap[id] == tr->sh) bad = 1;
            else if (lab != KMED_LABEL_IGNORE &&
                     (lab < 0 || (size_t)lab >= tr->vocab || (size_t)tr->vmap[lab] == tr->sh)) {
                bad = 1;
                id = lab;
            }
            if (bad)
                return KMED__ERR(err, KMED_ERR_ARG, "token id %d at sequence %zu position %zu "
                                 "is not among the trainer's used tokens", id, i / T, i % T);
            tr->rids[i] = tr->vmap[ids[i]];
            tr->rlabels[i] = lab == KMED_LABEL_IGNORE ? lab : tr->vmap[lab];
        }
        ids = tr->rids;
        labels = tr->rlabels;
    }
    for (i = 0; i < N; i++)
        if (ids[i] < 0 || (size_t)ids[i] >= V)
            return KMED__ERR(err, KMED_ERR_ARG, "token id %d at sequence %zu position %zu "
                             "is outside [0, %zu)", ids[i], i / T, i % T, V);
    NC = N * C;
    for (i = 0; i < N; i++) tr->pos[i] = (int)(i % T);
    for (i = 0; tr->tembed && i < (size_t)tr->lora->n_tokens; i++)   /* after an update */
        memcpy(tr->tembed + tr->tslot[i] * C, tr->lora->token_rows + i * C, C * sizeof(float));
    kmed__embed_forward(tr->resid, ids, tr->m->embed.data, tr->m->embed.type, N, C);
    for (l = 0; l < L; l++) {
        kmed__train_acts *a = &tr->acts[tr->cfg.checkpointing ? 0 : l];
        kmed__train_layer_forward(tr, l, a, tr->resid + (size_t)l * NC,
                                  tr->resid + (size_t)(l + 1) * NC, B, T);
    }
    kmed__train_norm(tr, tr->xf, tr->rstdf, tr->resid + (size_t)L * NC, tr->m->final_norm, N);
    if (backward) memset(tr->dtmp, 0, NC * sizeof(float));
    rc = kmed__train_head(tr, labels, B, T, norm, tr->dtmp, loss_sum, count, err);
    if (rc != KMED_OK || !backward || tr->lowest >= L) return rc;
    memset(tr->dres, 0, NC * sizeof(float));
    kmed__train_norm_bw(tr, tr->dres, tr->dfinal, tr->dtmp, tr->resid + (size_t)L * NC,
                        tr->m->final_norm, tr->rstdf, N);
    for (l = L - 1; l >= tr->lowest; l--) {
        kmed__train_acts *a = &tr->acts[tr->cfg.checkpointing ? 0 : l];
        if (tr->cfg.checkpointing)
            kmed__train_layer_forward(tr, l, a, tr->resid + (size_t)l * NC, tr->tmp2, B, T);
        kmed__train_layer_backward(tr, l, a, tr->resid + (size_t)l * NC, B, T,
                                   tr->dembed || l > tr->lowest);
    }
    if (tr->dembed) kmed__embed_backward(tr->dembed, tr->dres, ids, N, C);
    if (tr->tembed) {   /* dembed sums the step's micro-batches, so copy, not add */
        float *g = tr->params[tr->np - 1].g;   /* the token rows, the last parameter */
        for (i = 0; i < (size_t)tr->lora->n_tokens; i++)
            memcpy(g + i * C, tr->dembed + tr->tslot[i] * C, C * sizeof(float));
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_train_loss(kmed_train *tr, const int *ids, const int *labels,
                                     size_t B, size_t T, double *loss, kmed_error *err)
{
    double sum = 0.0;
    size_t n = 0;
    kmed_result rc = kmed_train_forward_backward(tr, ids, labels, B, T, 0.0, &sum, &n, err);
    *loss = n ? sum / (double)n : 0.0;
    return rc;
}

/* ---- optimiser ---- */

KMED_API kmed_result kmed_train_check_grads(kmed_train *tr, kmed_error *err)
{
    size_t i, j;
    for (i = 0; i < tr->np; i++) {
        const kmed_param *q = &tr->params[i];
        for (j = 0; j < q->n; j++)
            if (!isfinite(q->g[j]))
                return KMED__ERR(err, KMED_ERR_NUMERIC, "gradient of %s is %s at element %zu "
                                 "(step %ld); nothing was updated or saved", q->name,
                                 isnan(q->g[j]) ? "NaN" : "inf", j, tr->step + 1);
    }
    return KMED_OK;
}

KMED_API double kmed_train_grad_norm(kmed_train *tr)
{
    double s = 0.0;
    size_t i;
    for (i = 0; i < tr->total; i++) s += (double)tr->gblock[i] * (double)tr->gblock[i];
    if (tr->vmap && tr->full) {   /* the shared row's gradient is every shared token's */
        size_t C = (size_t)tr->m->cfg.hidden_size;
        double r = 0.0;
        const float *g = tr->dembed + tr->sh * C;   /* (C) */
        for (i = 0; i < C; i++) r += (double)g[i] * (double)g[i];
        s += (double)(tr->sh_count - 1.0f) * r;
    }
    return sqrt(s);
}


typedef struct kmed__train_opt {
    kmed_train *tr;
    float decay, b1, omb1, b2, omb2, neg_step, bc2_sqrt, eps, lr, wd, clip;
    int sgd;
} kmed__train_opt;

/* torch.optim.AdamW (single-tensor path) element by element, with its scalars rounded
   to f32 as torch's kernels do: p *= 1 - lr*wd; m.lerp_(g, 1-b1);
   v = v*b2 + (1-b2)*g*g; p += -(lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps).
   SGD: p -= lr * (g + wd*p). Elementwise, so the split over threads changes nothing. */
static void kmed__train_opt_fn(void *ctx, size_t b, size_t e, int thread)
{
    kmed__train_opt *o = (kmed__train_opt *)ctx;
    float *p = o->tr->pall, *g = o->tr->gblock, *m = o->tr->mblock, *v = o->tr->vblock;
    size_t i = b;
    (void)thread;
#if KMED__SIMD == 512
    if (!o->sgd) {   /* the scalar statements below, 16 lanes at a time, same rounding */
        const __m512 clip = _mm512_set1_ps(o->clip), decay = _mm512_set1_ps(o->decay);
        const __m512 omb1 = _mm512_set1_ps(o->omb1), b2 = _mm512_set1_ps(o->b2);
        const __m512 omb2 = _mm512_set1_ps(o->omb2), ns = _mm512_set1_ps(o->neg_step);
        const __m512 bc2 = _mm512_set1_ps(o->bc2_sqrt), eps = _mm512_set1_ps(o->eps);
        for (; i + 16 <= e; i += 16) {
            __m512 gi = _mm512_mul_ps(_mm512_loadu_ps(g + i), clip);
            __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(p + i), decay);
            __m512 mi = _mm512_loadu_ps(m + i), vi = _mm512_loadu_ps(v + i);
            mi = _mm512_add_ps(mi, _mm512_mul_ps(omb1, _mm512_sub_ps(gi, mi)));
            vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(_mm512_mul_ps(omb2, gi), gi));
            pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi),
                                                 _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi),
                                                                             bc2), eps)));
            _mm512_storeu_ps(m + i, mi);
            _mm512_storeu_ps(v + i, vi);
            _mm512_storeu_ps(p + i, pi);
        }
    }
#endif
    for (; i < e; i++) {
        float gi = g[i] * o->clip;
        if (o->sgd) {
            p[i] = p[i] - o->lr * (gi + o->wd * p[i]);
            continue;
        }
        p[i] *= o->decay;
        m[i] = m[i] + o->omb1 * (gi - m[i]); /* lerp with weight < 0.5 */
        v[i] = v[i] * o->b2 + o->omb2 * gi * gi;
        p[i] = p[i] + o->neg_step * m[i] / (sqrtf(v[i]) / o->bc2_sqrt + o->eps);
    }
}

KMED_API void kmed_train_apply(kmed_train *tr, float lr)
{
    kmed__train_opt o;
    const kmed_optim_config *c = &tr->oc;
    double t;
    memset(&o, 0, sizeof o);
    tr->step++;
    t = (double)tr->step;
    o.tr = tr;
    o.clip = 1.0f;
    if (c->clip > 0.0f) {
        /* torch.nn.utils.clip_grad_norm_: coef = max / (norm + 1e-6), applied when < 1 */
        double norm = kmed_train_grad_norm(tr);
        float coef = (float)((double)c->clip / (norm + 1e-6));
        if (coef < 1.0f) o.clip = coef;
    }
    o.sgd = c->kind == KMED_OPTIM_SGD;
    o.lr = lr;
    o.wd = c->weight_decay;
    o.decay = (float)(1.0 - (double)lr * (double)c->weight_decay);
    o.b1 = c->beta1;
    o.omb1 = (float)(1.0 - (double)c->beta1);
    o.b2 = c->beta2;
    o.omb2 = (float)(1.0 - (double)c->beta2);
    o.neg_step = (float)(-(double)lr / (1.0 - pow((double)c->beta1, t)));
    o.bc2_sqrt = (float)sqrt(1.0 - pow((double)c->beta2, t));
    o.eps = c->eps;
    kmed_pool_for(tr->pool, tr->total, 4096, kmed__train_opt_fn, &o);
}

/* The first stored value of a weight that is NaN or inf: 1 and *at set if found. */
static int kmed__train_bad_weight(const kmed_weight *w, float *row, size_t *at)
{
    size_t i, j, rb = kmed_dtype_bytes(w->type, w->cols);
    if (!w->data || !rb) return 0;
    for (i = 0; i < w->rows; i++) {
        kmed_dequantize_row(w->type, (const unsigned char *)w->data + i * rb, row, w->cols);
        for (j = 0; j < w->cols; j++)
            if (!isfinite(row[j])) { *at = i * w->cols + j; return 1; }
    }
    return 0;
}

/* After a NaN/inf loss or gradient: names the weight it came from, when one holds a
   non-finite value (trainable tensors, then the frozen base), in front of err's message.
   Scans everything, but only on this failure path. */
static void kmed__train_blame(kmed_train *tr, kmed_error *err)
{
    static const char *const norms[4] = {"input_layernorm", "post_attention_layernorm",
                                         "pre_feedforward_layernorm",
                                         "post_feedforward_layernorm"};
    const kmed_gemma *m = tr->m;
    size_t C = (size_t)m->cfg.hidden_size, i, j, at = 0, cols = C;
    char what[160], tmp[sizeof err->msg];
    float *row = NULL;
    int l, t, found = 0;
    what[0] = 0;
    for (i = 0; i < tr->np && !found; i++)
        for (j = 0; j < tr->params[i].n && !found; j++)
            if (!isfinite(tr->params[i].p[j])) {
                snprintf(what, sizeof what, "%s", tr->params[i].name);
                at = j;
                found = 1;
            }
    if (!found && !tr->full) {
        if ((size_t)m->cfg.intermediate_size > cols) cols = (size_t)m->cfg.intermediate_size;
        if ((size_t)m->cfg.n_heads * (size_t)m->cfg.head_dim > cols)
            cols = (size_t)m->cfg.n_heads * (size_t)m->cfg.head_dim;
        row = (float *)KMED_MALLOC(cols * sizeof(float));
        if (!row) return;
        if (kmed__train_bad_weight(&m->embed, row, &at)) {
            snprintf(what, sizeof what, "model.embed_tokens.weight");
            found = 1;
        }
        for (l = 0; l < m->cfg.n_layers && !found; l++) {
            const kmed_gemma_layer *L = &m->layers[l];
            const float *nv[4];
            nv[0] = L->attn_norm; nv[1] = L->post_attn_norm;
            nv[2] = L->pre_ffn_norm; nv[3] = L->post_ffn_norm;
            for (t = 0; t < KMED_LORA_NTARGETS && !found; t++)
                if (kmed__train_bad_weight(kmed__lora_base(L, t), row, &at)) {
                    snprintf(what, sizeof what, "model.layers.%d.%s.%s.weight", l,
                             t <= KMED_LORA_O ? "self_attn" : "mlp", kmed__lora_names[t]);
                    found = 1;
                }
            for (t = 0; t < 4 && !found; t++)
                for (j = 0; nv[t] && j < C && !found; j++)
                    if (!isfinite(nv[t][j])) {
                        snprintf(what, sizeof what, "model.layers.%d.%s.weight", l, norms[t]);
                        at = j;
                        found = 1;
                    }
        }
        for (j = 0; m->final_norm && j < C && !found; j++)
            if (!isfinite(m->final_norm[j])) {
                snprintf(what, sizeof what, "model.norm.weight");
                at = j;
                found = 1;
            }
        KMED_FREE(row);
    }
    if (!found || !err) return;
    snprintf(tmp, sizeof tmp, "%s", err->msg);
    kmed_error_set(err, KMED_ERR_NUMERIC, NULL, 0, (size_t)-1, "%s holds a non-finite value "
                   "at element %zu: %s", what, at, tmp);
}

KMED_API kmed_result kmed_train_grads(kmed_train *tr, const int *ids, const int *labels,
                                      size_t accum, size_t B, size_t T, double *loss,
                                      kmed_error *err)
{
    size_t a, count = 0, per = B * T;
    double sum = 0.0, mean;
    kmed_result rc;
    if (accum == 0) accum = 1;
    for (a = 0; a < accum; a++) count += kmed_train_count(labels + a * per, B, T);
    if (count == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "step %ld: the batch has no counted tokens (every "
                         "label is -100)", tr->step + 1);
    kmed_train_zero_grad(tr);
    for (a = 0; a < accum; a++) {
        rc = kmed_train_forward_backward(tr, ids + a * per, labels + a * per, B, T,
                                         (double)count, &sum, NULL, err);
        if (rc != KMED_OK) return rc;
    }
    mean = sum / (double)count;
    tr->last_loss = mean;
    if (loss) *loss = mean;
    if (!isfinite(mean)) {
        KMED__ERR(err, KMED_ERR_NUMERIC, "loss is %s at step %ld; nothing was updated or "
                  "saved", isnan(mean) ? "NaN" : "inf", tr->step + 1);
        kmed__train_blame(tr, err);
        return KMED_ERR_NUMERIC;
    }
    if (tr->cfg.spike_factor > 0.0f && tr->loss_n >= 10 &&
        mean > (double)tr->cfg.spike_factor * tr->loss_ema)
        return KMED__ERR(err, KMED_ERR_NUMERIC, "loss spike at step %ld: %.4f > %.1f x running "
                         "mean %.4f; nothing was updated or saved", tr->step + 1, mean,
                         (double)tr->cfg.spike_factor, tr->loss_ema);
    rc = kmed_train_check_grads(tr, err);
    if (rc == KMED_ERR_NUMERIC) kmed__train_blame(tr, err);
    return rc;
}

KMED_API void kmed_train_update(kmed_train *tr)
{
    tr->loss_ema = tr->loss_n ? 0.9 * tr->loss_ema + 0.1 * tr->last_loss : tr->last_loss;
    tr->loss_n++;
    kmed_train_apply(tr, kmed_optim_lr(&tr->oc, tr->step + 1));
}

KMED_API kmed_result kmed_train_step(kmed_train *tr, const int *ids, const int *labels,
                                     size_t accum, size_t B, size_t T, double *loss,
                                     kmed_error *err)
{
    kmed_result rc = kmed_train_grads(tr, ids, labels, accum, B, T, loss, err);
    if (rc == KMED_OK) kmed_train_update(tr);
    return rc;
}

/* ---- saving: gradients, full model, checkpoints, loss curve ---- */

/* Writes `extra` tensors then, per parameter, one tensor per selected array
   (which: 'p', 'g', 'm', 'v'), named prefix + name. */
static kmed_result kmed__train_write(kmed_train *tr, const char *path, const char *which,
                                     int prefixed, const kmed_tensor_info *extra,
                                     size_t n_extra, const char *const *mk,
                                     const char *const *mv, size_t n_meta, const float *embed_full,
                                     kmed_error *err)
{
    size_t nw = strlen(which), n = n_extra + tr->np * nw, i, k, o = 0;
    kmed_tensor_info *ti = (kmed_tensor_info *)kmed__calloc(n ? n : 1, sizeof *ti);
    char (*names)[144] = (char(*)[144])kmed__calloc(n ? n : 1, sizeof *names);
    kmed_result rc;
    if (!ti || !names) {
        KMED_FREE(ti);
        KMED_FREE(names);
        return KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
    }
    for (i = 0; i < n_extra; i++) ti[o++] = extra[i];
    for (k = 0; k < nw; k++)
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            const float *d = which[k] == 'p' ? q->p : which[k] == 'g' ? q->g
                           : which[k] == 'm' ? q->m : q->v;
            if (prefixed) snprintf(names[o], sizeof names[o], "%c/%s", which[k], q->name);
            else snprintf(names[o], sizeof names[o], "%s", q->name);
            ti[o].name = names[o];
            ti[o].dtype = KMED_F32;
            ti[o].ndim = q->ndim;
            ti[o].shape[0] = q->shape[0];
            ti[o].shape[1] = q->shape[1];
            ti[o].data = d;
            ti[o].nbytes = q->n * sizeof(float);
            if (embed_full && i == 0 && which[k] == 'p') {   /* expanded compact rows */
                ti[o].data = embed_full;
                ti[o].shape[0] = tr->vocab;
                ti[o].nbytes = tr->vocab * q->shape[1] * sizeof(float);
            }
            o++;
        }
    rc = kmed_st_write(path, ti, o, mk, mv, n_meta, err);
    KMED_FREE(ti);
    KMED_FREE(names);
    return rc;
}

KMED_API kmed_result kmed_train_save_grads(kmed_train *tr, const char *path,
                                           kmed_error *err)
{
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    return kmed__train_write(tr, path, "g", 0, NULL, 0, mk, mv, 1, NULL, err);
}

KMED_API kmed_result kmed_train_save_model(kmed_train *tr, const char *dir, kmed_error *err)
{
    const kmed_gemma_config *c = &tr->m->cfg;
    const char *mk[1] = {"format"}, *mv[1] = {"pt"};
    char path[1100];
    kmed_buf js = {0};
    kmed_result rc;
    float *full = NULL;
    if (!tr->full)
        return KMED__ERR(err, KMED_ERR_STATE, "save model: LoRA trainer (save the adapter)");
    if ((rc = kmed_mkdir_p(dir, err)) != KMED_OK) return rc;
    if (tr->vmap) {   /* every token's row again, the shared one repeated */
        size_t C = (size_t)c->hidden_size, v;
        full = (float *)KMED_MALLOC(tr->vocab * C * sizeof(float));
        if (!full) return KMED__ERR(err, KMED_ERR_NOMEM, "save model: out of memory");
        for (v = 0; v < tr->vocab; v++)
            memcpy(full + v * C, tr->params[0].p + (size_t)tr->vmap[v] * C, C * sizeof(float));
    }
    rc = kmed_path_join(path, sizeof path, dir, "model.safetensors", err);
    if (rc == KMED_OK) rc = kmed__train_write(tr, path, "p", 0, NULL, 0, mk, mv, 1, full, err);
    KMED_FREE(full);
    if (rc != KMED_OK) return rc;
    kmed_buf_printf(&js, "{\n  \"architectures\": [\"Gemma2ForCausalLM\"],\n"
                    "  \"model_type\": \"gemma2\",\n  \"torch_dtype\": \"float32\",\n"
                    "  \"vocab_size\": %d,\n  \"hidden_size\": %d,\n"
                    "  \"intermediate_size\": %d,\n  \"num_hidden_layers\": %d,\n"
                    "  \"num_attention_heads\": %d,\n  \"num_key_value_heads\": %d,\n"
                    "  \"head_dim\": %d,\n  \"query_pre_attn_scalar\": ",
                    (int)tr->vocab, c->hidden_size, c->intermediate_size, c->n_layers,
                    c->n_heads, c->n_kv_heads, c->head_dim);
    kmed_buf_json_f32(&js, c->query_pre_attn_scalar);
    kmed_buf_puts(&js, ",\n  \"rms_norm_eps\": ");
    kmed_buf_json_f32(&js, c->rms_norm_eps);
    kmed_buf_puts(&js, ",\n  \"rope_theta\": ");
    kmed_buf_json_f32(&js, c->rope_theta);
    kmed_buf_puts(&js, ",\n  \"attn_logit_softcapping\": ");
    if (c->attn_softcap > 0.0f) kmed_buf_json_f32(&js, c->attn_softcap);
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"final_logit_softcapping\": ");
    if (c->final_softcap > 0.0f) kmed_buf_json_f32(&js, c->final_softcap);
    else kmed_buf_puts(&js, "null");
    kmed_buf_puts(&js, ",\n  \"sliding_window\": ");
    if (c->sliding_window > 0) kmed_buf_printf(&js, "%d", c->sliding_window);
    else kmed_buf_puts(&js, "null");
    kmed_buf_printf(&js, ",\n  \"max_position_embeddings\": %d,\n  \"bos_token_id\": %d,\n"
                    "  \"eos_token_id\": %d,\n  \"pad_token_id\": %d,\n"
                    "  \"hidden_activation\": \"gelu_pytorch_tanh\",\n"
                    "  \"attention_bias\": false,\n  \"attention_dropout\": 0.0,\n"
                    "  \"tie_word_embeddings\": true\n}\n",
                    c->max_position > 0 ? c->max_position : 8192, c->bos_id, c->eos_id,
                    c->pad_id);
    if (js.failed) {
        kmed_buf_free(&js);
        return KMED__ERR(err, KMED_ERR_NOMEM, "save model: out of memory");
    }
    rc = kmed_path_join(path, sizeof path, dir, "config.json", err);
    if (rc == KMED_OK) rc = kmed_file_write_atomic(path, js.data, js.len, err);
    kmed_buf_free(&js);
    return rc;
}

KMED_API kmed_result kmed_train_ckpt_save(kmed_train *tr, const char *path,
                                          const kmed_train_ckpt *st, kmed_error *err)
{
    char v_step[32], v_pos[32], v_rng[80], v_ema[32], v_n[32], v_np[32];
    const char *mk[8] = {"kmed_checkpoint", "mode", "step", "data_pos", "rng", "loss_ema",
                         "loss_n", "n_params"};
    const char *mv[8];
    kmed_tensor_info ex[2];
    size_t ne = 0;
    uint64_t ema_bits;
    double ema = tr->loss_ema;
    memcpy(&ema_bits, &ema, sizeof ema_bits);
    snprintf(v_step, sizeof v_step, "%ld", tr->step);
    snprintf(v_pos, sizeof v_pos, "%llu", (unsigned long long)st->data_pos);
    snprintf(v_rng, sizeof v_rng, "%016llx%016llx%016llx%016llx",
             (unsigned long long)st->rng.s[0], (unsigned long long)st->rng.s[1],
             (unsigned long long)st->rng.s[2], (unsigned long long)st->rng.s[3]);
    snprintf(v_ema, sizeof v_ema, "%016llx", (unsigned long long)ema_bits); /* exact */
    snprintf(v_n, sizeof v_n, "%ld", tr->loss_n);
    snprintf(v_np, sizeof v_np, "%zu", tr->np);
    mv[0] = "1"; mv[1] = tr->full ? "full" : "lora"; mv[2] = v_step; mv[3] = v_pos;
    mv[4] = v_rng; mv[5] = v_ema; mv[6] = v_n; mv[7] = v_np;
    memset(ex, 0, sizeof ex);
    if (st->n_train) {
        ex[ne].name = "hist/train";
        ex[ne].dtype = KMED_F32;
        ex[ne].ndim = 1;
        ex[ne].shape[0] = st->n_train;
        ex[ne].data = st->train_loss;
        ex[ne].nbytes = st->n_train * sizeof(float);
        ne++;
    }
    if (st->n_val) {
        ex[ne].name = "hist/val";
        ex[ne].dtype = KMED_F32;
        ex[ne].ndim = 2;
        ex[ne].shape[0] = st->n_val;
        ex[ne].shape[1] = 2;
        ex[ne].data = st->val_loss;
        ex[ne].nbytes = st->n_val * 2 * sizeof(float);
        ne++;
    }
    return kmed__train_write(tr, path, tr->mblock ? "pmv" : "p", 1, ex, ne, mk, mv, 8, NULL, err);
}

static const char *kmed__train_meta(const kmed_st *st, const char *key)
{
    size_t i;
    for (i = 0; i < st->n_meta; i++)
        if (!strcmp(st->meta_keys[i], key)) return st->meta_vals[i];
    return NULL;
}

KMED_API void kmed_train_ckpt_free(kmed_train_ckpt *st)
{
    KMED_FREE(st->train_loss);
    KMED_FREE(st->val_loss);
    memset(st, 0, sizeof *st);
}

KMED_API kmed_result kmed_train_ckpt_load(kmed_train *tr, const char *path,
                                          kmed_train_ckpt *out, kmed_error *err)
{
    kmed_st st;
    kmed_result rc;
    const char *s_step, *s_pos, *s_rng, *s_ema, *s_n, *mode;
    const kmed_tensor_info *ti;
    kmed_train_ckpt res;
    unsigned long long r4[4], ema_bits;
    double ema;
    char name[160];
    size_t i, k;
    memset(&res, 0, sizeof res);
    if ((rc = kmed_st_open(&st, path, err)) != KMED_OK) return rc;
    s_step = kmed__train_meta(&st, "step");
    s_pos = kmed__train_meta(&st, "data_pos");
    s_rng = kmed__train_meta(&st, "rng");
    s_ema = kmed__train_meta(&st, "loss_ema");
    s_n = kmed__train_meta(&st, "loss_n");
    mode = kmed__train_meta(&st, "mode");
    if (!kmed__train_meta(&st, "kmed_checkpoint") || !s_step || !s_pos || !s_rng || !s_ema ||
        !s_n || !mode || sscanf(s_rng, "%16llx%16llx%16llx%16llx", &r4[0], &r4[1], &r4[2],
                                &r4[3]) != 4 || sscanf(s_ema, "%16llx", &ema_bits) != 1) {
        rc = KMED__ERRF(err, KMED_ERR_FORMAT, path, "not a kmed training checkpoint "
                        "(metadata missing)");
        goto fail;
    }
    if (strcmp(mode, tr->full ? "full" : "lora") != 0) {
        rc = KMED__ERRF(err, KMED_ERR_STATE, path, "checkpoint is for %s training, this run "
                        "is %s", mode, tr->full ? "full" : "lora");
        goto fail;
    }
    for (k = 0; k < 3; k++) {
        char which = "pmv"[k];
        if (which != 'p' && !tr->mblock) break;
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            snprintf(name, sizeof name, "%c/%s", which, q->name);
            ti = kmed_st_find(&st, name);
            if (!ti || ti->dtype != KMED_F32 || ti->nbytes != q->n * sizeof(float)) {
                rc = KMED__ERRF(err, KMED_ERR_SHAPE, path, "tensor %s %s (the run's "
                                "parameters differ from the checkpoint's)", name,
                                ti ? "has another shape or dtype" : "is missing");
                goto fail;
            }
        }
    }
    ti = kmed_st_find(&st, "hist/train");
    if (ti && ti->dtype == KMED_F32 && ti->ndim == 1) {
        res.n_train = (size_t)ti->shape[0];
        res.train_loss = (float *)kmed__calloc(res.n_train + 1, sizeof(float));
        if (!res.train_loss) goto nomem;
        memcpy(res.train_loss, ti->data, res.n_train * sizeof(float));
    }
    ti = kmed_st_find(&st, "hist/val");
    if (ti && ti->dtype == KMED_F32 && ti->ndim == 2 && ti->shape[1] == 2) {
        res.n_val = (size_t)ti->shape[0];
        res.val_loss = (float *)kmed__calloc(res.n_val * 2 + 2, sizeof(float));
        if (!res.val_loss) goto nomem;
        memcpy(res.val_loss, ti->data, res.n_val * 2 * sizeof(float));
    }
    /* Everything checked: only now overwrite the trainer. */
    for (k = 0; k < 3; k++) {
        char which = "pmv"[k];
        if (which != 'p' && !tr->mblock) break;
        for (i = 0; i < tr->np; i++) {
            const kmed_param *q = &tr->params[i];
            float *dst = which == 'p' ? q->p : which == 'm' ? q->m : q->v;
            snprintf(name, sizeof name, "%c/%s", which, q->name);
            memcpy(dst, kmed_st_find(&st, name)->data, q->n * sizeof(float));
        }
    }
    tr->step = strtol(s_step, NULL, 10);
    tr->loss_n = strtol(s_n, NULL, 10);
    memcpy(&ema, &ema_bits, sizeof ema);
    tr->loss_ema = ema;
    res.data_pos = strtoull(s_pos, NULL, 10);
    for (k = 0; k < 4; k++) res.rng.s[k] = (uint64_t)r4[k];
    kmed_st_close(&st);
    *out = res;
    return KMED_OK;
nomem:
    rc = KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
fail:
    kmed_train_ckpt_free(&res);
    kmed_st_close(&st);
    return rc;
}

KMED_API kmed_result kmed_train_svg(const char *path, const float *train_loss,
                                    size_t n_train, const float *val_loss, size_t n_val,
                                    kmed_error *err)
{
    const double W = 720, H = 400, x0 = 60, y0 = 20, pw = 640, ph = 330;
    double lo = INFINITY, hi = -INFINITY, xmax = (double)(n_train > 1 ? n_train : 2);
    kmed_buf b = {0};
    size_t i;
    int k;
    kmed_result rc;
    for (i = 0; i < n_train; i++)
        if (isfinite(train_loss[i])) {
            lo = fmin(lo, train_loss[i]);
            hi = fmax(hi, train_loss[i]);
        }
    for (i = 0; i < n_val; i++) {
        if (isfinite(val_loss[2 * i + 1])) {
            lo = fmin(lo, val_loss[2 * i + 1]);
            hi = fmax(hi, val_loss[2 * i + 1]);
        }
        if (val_loss[2 * i] > xmax) xmax = val_loss[2 * i];
    }
    if (!(lo <= hi)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
    kmed_buf_printf(&b, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\" "
                    "height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n"
                    "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
                    "<rect x=\"%.0f\" y=\"%.0f\" width=\"%.0f\" height=\"%.0f\" fill=\"none\" "
                    "stroke=\"#888\"/>\n", W, H, x0, y0, pw, ph);
    for (k = 0; k <= 4; k++) {
        double v = lo + (hi - lo) * k / 4.0, y = y0 + ph - ph * k / 4.0;
        kmed_buf_printf(&b, "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%.3g</text>\n"
                        "<line x1=\"%.0f\" x2=\"%.0f\" y1=\"%.1f\" y2=\"%.1f\" stroke=\"#eee\"/>\n",
                        x0 - 4, y + 4, v, x0, x0 + pw, y, y);
    }
    kmed_buf_printf(&b, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">step (1..%.0f)"
                    "</text>\n<text x=\"%.0f\" y=\"14\">loss: <tspan fill=\"#1f77b4\">train"
                    "</tspan> <tspan fill=\"#d62728\">val</tspan></text>\n",
                    x0 + pw / 2, H - 10, xmax, x0);
    if (n_train) {
        kmed_buf_puts(&b, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" "
                          "points=\"");
        for (i = 0; i < n_train; i++) {
            double v = isfinite(train_loss[i]) ? train_loss[i] : hi;
            kmed_buf_printf(&b, "%.1f,%.1f ", x0 + pw * ((double)(i + 1) - 1) / (xmax - 1),
                            y0 + ph - ph * (v - lo) / (hi - lo));
        }
        kmed_buf_puts(&b, "\"/>\n");
    }
    if (n_val) {
        kmed_buf_puts(&b, "<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"1.5\" "
                          "points=\"");
        for (i = 0; i < n_val; i++)
            kmed_buf_printf(&b, "%.1f,%.1f ", x0 + pw * (val_loss[2 * i] - 1) / (xmax - 1),
                            y0 + ph - ph * (val_loss[2 * i + 1] - lo) / (hi - lo));
        kmed_buf_puts(&b, "\"/>\n");
        for (i = 0; i < n_val; i++)
            kmed_buf_printf(&b, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" fill=\"#d62728\"/>\n",
                            x0 + pw * (val_loss[2 * i] - 1) / (xmax - 1),
                            y0 + ph - ph * (val_loss[2 * i + 1] - lo) / (hi - lo));
    }
    kmed_buf_puts(&b, "</svg>\n");
    if (b.failed) {
        kmed_buf_free(&b);
        return KMED__ERR(err, KMED_ERR_NOMEM, "%s: out of memory", path);
    }
    rc = kmed_file_write_atomic(path, b.data, b.len, err);
    kmed_buf_free(&b);
    return rc;
}

/* ==== kmed_merge: model merging (linear, task arithmetic, TIES, DARE), streamed ==== */

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *const kmed__mg_names[5] = {
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"
};

KMED_API const char *kmed_merge_method_name(kmed_merge_method m)
{
    return (unsigned)m < 5 ? kmed__mg_names[m] : "unknown";
}

KMED_API kmed_result kmed_merge_method_parse(const char *s, kmed_merge_method *m,
                                             kmed_error *err)
{
    int i;
    for (i = 0; i < 5 && s; i++) {
        if (strcmp(s, kmed__mg_names[i]) == 0) {
            *m = (kmed_merge_method)i;
            return KMED_OK;
        }
    }
    return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge method '%s' is not one of linear, "
                     "task_arithmetic, ties, dare_ties, dare_linear", s ? s : "(null)");
}

KMED_API uint64_t kmed_merge_tensor_key(const char *name)
{
    uint64_t h = 0xcbf29ce484222325ull;
    while (name && *name) {
        h ^= (unsigned char)*name++;
        h *= 0x100000001b3ull;
    }
    return h;
}

/* ---- the per-tensor engine ----
   Inputs are read in chunks of KMED__MG_CHUNK elements through readers, so a tensor is
   never held whole as f32 (a 256000 x 3584 embedding would be 3.7 GB per input). TIES
   needs each task vector's k-th largest magnitude: two histogram passes over the float
   bits of |d| (high 16 bits, then low 16 bits inside the chosen bin) find it exactly. */

#define KMED__MG_CHUNK ((size_t)1 << 16) /* elements per step; also one DARE rng block */
#define KMED__MG_HBINS ((size_t)1 << 16)

enum { KMED__MG_SP_NONE, KMED__MG_SP_MAGNITUDE, KMED__MG_SP_RANDOM };

/* A config resolved for the engine: the mixed models and every default applied. */
typedef struct kmed__mg_plan {
    kmed_merge_method method;
    int sparsify;            /* KMED__MG_SP_* */
    int consensus;           /* 1: TIES sign election */
    int count;               /* election by count of signs */
    int normalize, rescale;
    float lambda;
    uint64_t seed;
    size_t n;                /* models mixed */
    float *w, *dens;         /* [n] */
    size_t *idx;             /* [n] index in cfg->models (seeds DARE) */
} kmed__mg_plan;

static void kmed__mg_plan_free(kmed__mg_plan *p)
{
    KMED_FREE(p->w);
    KMED_FREE(p->dens);
    KMED_FREE(p->idx);
    memset(p, 0, sizeof *p);
}

/* skip[i] set: cfg->models[i] is the base and takes no part (task-vector methods). */
static kmed_result kmed__mg_plan_init(kmed__mg_plan *p, const kmed_merge_config *cfg,
                                      const unsigned char *skip, kmed_error *err)
{
    size_t i, k = 0;
    memset(p, 0, sizeof *p);
    p->method = cfg->method;
    p->sparsify = cfg->method == KMED_MERGE_TIES ? KMED__MG_SP_MAGNITUDE
                  : (cfg->method == KMED_MERGE_DARE_TIES || cfg->method == KMED_MERGE_DARE_LINEAR)
                      ? KMED__MG_SP_RANDOM : KMED__MG_SP_NONE;
    p->consensus = cfg->method == KMED_MERGE_TIES || cfg->method == KMED_MERGE_DARE_TIES;
    p->count = cfg->consensus_count != 0;
    p->normalize = cfg->normalize ? cfg->normalize > 0
                                  : (cfg->method == KMED_MERGE_LINEAR ||
                                     cfg->method == KMED_MERGE_TIES);
    p->rescale = cfg->rescale ? cfg->rescale > 0 : p->sparsify == KMED__MG_SP_RANDOM;
    p->lambda = cfg->lambda != 0 ? cfg->lambda : 1.0f;
    p->seed = cfg->seed;
    p->w = (float *)kmed__calloc(cfg->n_models + 1, sizeof *p->w);
    p->dens = (float *)kmed__calloc(cfg->n_models + 1, sizeof *p->dens);
    p->idx = (size_t *)kmed__calloc(cfg->n_models + 1, sizeof *p->idx);
    if (!p->w || !p->dens || !p->idx) {
        kmed__mg_plan_free(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    }
    for (i = 0; i < cfg->n_models; i++) {
        if (skip && skip[i]) continue;
        p->w[k] = cfg->models[i].weight;
        p->dens[k] = cfg->models[i].density > 0 ? cfg->models[i].density : 1.0f;
        p->idx[k] = i;
        k++;
    }
    p->n = k;
    return KMED_OK;
}

typedef kmed_result (*kmed__mg_read_fn)(void *ctx, size_t off, size_t n, float *dst,
                                        kmed_error *err);
typedef struct kmed__mg_reader { kmed__mg_read_fn read; void *ctx; } kmed__mg_reader;
/* Receives the merged values [off, off + n) of the tensor, in order. */
typedef void (*kmed__mg_emit_fn)(void *ctx, size_t off, size_t n, const float *v);

/* TIES trim state of one task vector: keep |d| bits > thr, and the first `quota` elements
   (in index order) whose bits equal thr, so exactly k = floor(density * numel) survive. */
typedef struct kmed__mg_trim {
    int all, none;
    uint32_t hi;             /* pass 1: bin of the k-th largest */
    uint64_t need;           /* elements still to take inside that bin */
    double above, total;     /* L1 of the bins above it, and of the whole task vector */
    uint32_t thr;
    uint64_t quota, seen;
    float scale;             /* l1 rescale factor (1 when off) */
} kmed__mg_trim;

typedef struct kmed__mg_work {
    size_t n;                /* models the buffers are sized for */
    float *bufs;             /* (n + 4, CHUNK): base, out, sum, divisor, then the models */
    uint32_t *rnd;           /* (CHUNK) DARE random words */
    uint64_t *cnt;           /* (n, HBINS) */
    double *sum;             /* (n, HBINS) */
    kmed__mg_trim *trim;     /* [n] */
} kmed__mg_work;

static void kmed__mg_work_free(kmed__mg_work *w)
{
    KMED_FREE(w->bufs);
    KMED_FREE(w->rnd);
    KMED_FREE(w->cnt);
    KMED_FREE(w->sum);
    KMED_FREE(w->trim);
    memset(w, 0, sizeof *w);
}

static kmed_result kmed__mg_work_init(kmed__mg_work *w, const kmed__mg_plan *p,
                                      kmed_error *err)
{
    size_t n = p->n ? p->n : 1;
    memset(w, 0, sizeof *w);
    w->n = n;
    w->bufs = (float *)kmed__calloc((n + 4) * KMED__MG_CHUNK, sizeof(float));
    w->rnd = (uint32_t *)kmed__calloc(KMED__MG_CHUNK, sizeof *w->rnd);
    w->trim = (kmed__mg_trim *)kmed__calloc(n, sizeof *w->trim);
    if (p->sparsify == KMED__MG_SP_MAGNITUDE) {
        w->cnt = (uint64_t *)kmed__calloc(n * KMED__MG_HBINS, sizeof *w->cnt);
        w->sum = (double *)kmed__calloc(n * KMED__MG_HBINS, sizeof *w->sum);
    }
    if (!w->bufs || !w->rnd || !w->trim ||
        (p->sparsify == KMED__MG_SP_MAGNITUDE && (!w->cnt || !w->sum))) {
        kmed__mg_work_free(w);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for work buffers");
    }
    return KMED_OK;
}

static uint32_t kmed__mg_abits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x7fffffffu;  /* |x|: non-negative floats order like their bit patterns */
}

static float kmed__mg_from_bits(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* One histogram pass over every trimmed task vector: pass 1 bins the high 16 bits of |d|,
   pass 2 the low 16 bits of the elements inside each vector's chosen high bin. */
static kmed_result kmed__mg_hist_pass(const kmed__mg_plan *p, int pass, size_t numel,
                                      const kmed__mg_reader *base, const kmed__mg_reader *xs,
                                      kmed__mg_work *wk, kmed_error *err)
{
    const size_t C = KMED__MG_CHUNK;
    float *b = wk->bufs, *x = wk->bufs + 4 * C;
    size_t off, i, e;
    kmed_result r;
    memset(wk->cnt, 0, p->n * KMED__MG_HBINS * sizeof *wk->cnt);
    memset(wk->sum, 0, p->n * KMED__MG_HBINS * sizeof *wk->sum);
    for (off = 0; off < numel; off += C) {
        size_t m = numel - off < C ? numel - off : C;
        if ((r = base->read(base->ctx, off, m, b, err)) != KMED_OK) return r;
        for (i = 0; i < p->n; i++) {
            kmed__mg_trim *t = &wk->trim[i];
            uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
            double *sum = wk->sum + i * KMED__MG_HBINS;
            if (t->all || t->none) continue;
            if ((r = xs[i].read(xs[i].ctx, off, m, x, err)) != KMED_OK) return r;
            for (e = 0; e < m; e++) {
                float a = fabsf(x[e] - b[e]);
                uint32_t u = kmed__mg_abits(a);
                if (pass == 1) {
                    cnt[u >> 16]++;
                    if (p->rescale) sum[u >> 16] += a; /* L1 sums only feed the rescale */
                } else if ((u >> 16) == t->hi) {
                    cnt[u & 0xffffu]++;
                    if (p->rescale) sum[u & 0xffffu] += a;
                }
            }
        }
    }
    return KMED_OK;
}

/* Finds every task vector's exact magnitude threshold (mergekit keeps the top
   k = int(density * numel) by |d|; ties at the threshold are kept in index order). */
static kmed_result kmed__mg_ties_prepare(const kmed__mg_plan *p, size_t numel,
                                         const kmed__mg_reader *base,
                                         const kmed__mg_reader *xs, kmed__mg_work *wk,
                                         kmed_error *err)
{
    size_t i, h;
    int active = 0;
    kmed_result r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        uint64_t k = (uint64_t)floor((double)p->dens[i] * (double)numel);
        memset(t, 0, sizeof *t);
        t->scale = 1.0f;
        if (p->dens[i] >= 1.0f || k >= numel) t->all = 1;
        else if (k == 0) t->none = 1; /* mergekit asserts here; nothing survives */
        else { t->need = k; active = 1; }
    }
    if (!active) return KMED_OK;
    if ((r = kmed__mg_hist_pass(p, 1, numel, base, xs, wk, err)) != KMED_OK) return r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        const uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
        const double *sum = wk->sum + i * KMED__MG_HBINS;
        uint64_t cum = 0;
        if (t->all || t->none) continue;
        for (h = 0; h < KMED__MG_HBINS; h++) t->total += sum[h];
        for (h = KMED__MG_HBINS; h-- > 0;) {
            if (cum + cnt[h] >= t->need) {
                t->hi = (uint32_t)h;
                t->need -= cum;
                break;
            }
            cum += cnt[h];
            t->above += sum[h];
        }
    }
    if ((r = kmed__mg_hist_pass(p, 2, numel, base, xs, wk, err)) != KMED_OK) return r;
    for (i = 0; i < p->n; i++) {
        kmed__mg_trim *t = &wk->trim[i];
        const uint64_t *cnt = wk->cnt + i * KMED__MG_HBINS;
        const double *sum = wk->sum + i * KMED__MG_HBINS;
        uint64_t cum = 0;
        double kept = t->above;
        if (t->all || t->none) continue;
        for (h = KMED__MG_HBINS; h-- > 0;) {
            if (cum + cnt[h] >= t->need) {
                t->thr = (t->hi << 16) | (uint32_t)h;
                t->quota = t->need - cum;
                kept += (double)t->quota * kmed__mg_from_bits(t->thr);
                break;
            }
            cum += cnt[h];
            kept += sum[h];
        }
        /* mergekit's l1 rescale: keep the task vector's L1 norm; eps guards tiny norms */
        if (p->rescale && t->total >= 1e-7 && kept >= 1e-7)
            t->scale = (float)(t->total / kept);
    }
    return KMED_OK;
}

/* d[0..C) in place; tmp: C floats of scratch. */
static void kmed__mg_trim_apply(kmed__mg_trim *t, float *restrict d, float *restrict tmp)
{
    const size_t C = KMED__MG_CHUNK;
    const float sc = t->scale;
    const uint32_t thr = t->thr;
    const float thf = kmed__mg_from_bits(thr);
    size_t e;
    uint32_t eq = 0;
    if (t->all) return;
    if (t->none) { memset(d, 0, C * sizeof *d); return; }
    /* non-negative floats compare like their bits (a NaN task vector value is dropped) */
    for (e = 0; e < C; e++) {
        float a = fabsf(d[e]);
        tmp[e] = a > thf ? d[e] * sc : 0.0f;
        eq += a == thf;
    }
    /* values equal to the threshold: the first `quota` of the tensor, in index order */
    for (e = 0; eq && e < C; e++) {
        if (kmed__mg_abits(d[e]) == thr) {
            if (t->seen < t->quota) tmp[e] = d[e] * sc;
            t->seen++;
            eq--;
        }
    }
    memcpy(d, tmp, C * sizeof *d);
}

static uint64_t kmed__mg_mix(uint64_t a, uint64_t b)
{
    return a ^ (b + 0x9E3779B97F4A7C15ull + (a << 6) + (a >> 2));
}

/* DARE drop of one chunk: each element kept with probability density (32 random bits per
   element against round(density * 2^32)), kept ones divided by density when rescaling.
   The stream is seeded per (seed, tensor, model, chunk), so results do not depend on
   tensor order, shards or which other models take part. */
/* d[0..C) in place; rnd: C words of scratch. */
static void kmed__mg_dare_apply(const kmed__mg_plan *p, uint64_t key, size_t i, size_t block,
                                float *d, uint32_t *rnd)
{
    const size_t C = KMED__MG_CHUNK;
    float dens = p->dens[i];
    uint32_t thr;
    kmed_rng rng;
    size_t e;
    if (dens >= 1.0f) return;
    thr = (uint32_t)((double)dens * 4294967296.0 + 0.5); /* dens < 1: fits */
    kmed_rng_seed(&rng, kmed__mg_mix(kmed__mg_mix(kmed__mg_mix(p->seed, key),
                                                  (uint64_t)p->idx[i] + 1), (uint64_t)block + 1));
    for (e = 0; e < C; e += 2) {
        uint64_t u = kmed_rng_u64(&rng);
        rnd[e] = (uint32_t)u;
        rnd[e + 1] = (uint32_t)(u >> 32);
    }
    if (p->rescale) {
        for (e = 0; e < C; e++) d[e] = rnd[e] < thr ? d[e] / dens : 0.0f;
    } else {
        for (e = 0; e < C; e++) d[e] = rnd[e] < thr ? d[e] : 0.0f;
    }
}

/* Chunk kernels (C elements; restrict so -O2 vectorizes them without alias checks). */
static void kmed__mg_sub(float *restrict x, const float *restrict b)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) x[e] -= b[e];
}

static void kmed__mg_axpy(float *restrict y, const float *restrict x, float a)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += a * x[e];
}

static void kmed__mg_add(float *restrict y, const float *restrict x)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += x[e];
}

static void kmed__mg_add_sign(float *restrict y, const float *restrict x)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) y[e] += (float)((x[e] > 0) - (x[e] < 0));
}

/* Adds the values (and weights) of one model whose sign agrees with the elected one. */
static void kmed__mg_agree(float *restrict o, float *restrict dv, const float *restrict x,
                           const float *restrict sg, float w)
{
    size_t e;
    for (e = 0; e < KMED__MG_CHUNK; e++) {
        /* sign(x) == elected (0 never agrees); a 0/1 mask multiplied in, as mergekit does */
        float mask = x[e] * sg[e] > 0 ? 1.0f : 0.0f;
        o[e] += x[e] * mask;
        dv[e] += w * mask;
    }
}

/* o = b + lambda * mixed / divisor (divisor 1 where 0; x / 1 and x * 1 are exact). */
static void kmed__mg_finish(float *restrict o, const float *restrict mixed,
                            const float *restrict dv, float div, const float *restrict b,
                            float lambda)
{
    size_t e;
    if (dv) {
        for (e = 0; e < KMED__MG_CHUNK; e++)
            o[e] = b[e] + mixed[e] / (dv[e] == 0 ? 1.0f : dv[e]) * lambda;
    } else if (div != 1.0f) {
        for (e = 0; e < KMED__MG_CHUNK; e++) o[e] = b[e] + mixed[e] / div * lambda;
    } else { /* no division where mergekit does none */
        for (e = 0; e < KMED__MG_CHUNK; e++) o[e] = b[e] + mixed[e] * lambda;
    }
}

/* Merges one tensor of numel elements from its readers into emit. */
static kmed_result kmed__mg_tensor_run(const kmed__mg_plan *p, uint64_t key, size_t numel,
                                       const kmed__mg_reader *base, const kmed__mg_reader *xs,
                                       kmed__mg_emit_fn emit, void *ectx, kmed__mg_work *wk,
                                       kmed_error *err)
{
    const size_t C = KMED__MG_CHUNK;
    float *b = wk->bufs, *o = wk->bufs + C, *sm = wk->bufs + 2 * C, *dv = wk->bufs + 3 * C;
    float *xb = wk->bufs + 4 * C;
    float wsum = 0, div;
    size_t off, i, e;
    kmed_result r;
    int linear = p->method == KMED_MERGE_LINEAR;
    if (p->n > wk->n) return KMED__ERR(err, KMED_ERR_STATE, "merge: work sized for fewer models");
    for (i = 0; i < p->n; i++) wsum += p->w[i];
    if (p->sparsify == KMED__MG_SP_MAGNITUDE) {
        if ((r = kmed__mg_ties_prepare(p, numel, base, xs, wk, err)) != KMED_OK) return r;
    }
    /* mergekit's divisors: linear divides by the plain sum; task arithmetic guards ~0 */
    div = linear ? wsum : (fabsf(wsum) < 1e-8f ? 1.0f : wsum);
    /* Loops run over elements inside loops over models (sums still in model order), with
       selects instead of branches (random signs and masks defeat branch prediction), over
       whole chunks with zeroed tails: a constant trip count lets -O2 vectorize them. */
    for (off = 0; off < numel; off += C) {
        size_t m = numel - off < C ? numel - off : C;
        if (!linear) {
            if ((r = base->read(base->ctx, off, m, b, err)) != KMED_OK) return r;
            if (m < C) memset(b + m, 0, (C - m) * sizeof *b);
        }
        for (i = 0; i < p->n; i++) {
            float *x = xb + i * C, w = p->w[i];
            if ((r = xs[i].read(xs[i].ctx, off, m, x, err)) != KMED_OK) return r;
            if (m < C) memset(x + m, 0, (C - m) * sizeof *x);
            if (linear) continue;
            kmed__mg_sub(x, b);
            if (p->sparsify == KMED__MG_SP_MAGNITUDE) kmed__mg_trim_apply(&wk->trim[i], x, sm);
            else if (p->sparsify == KMED__MG_SP_RANDOM)
                kmed__mg_dare_apply(p, key, i, off / C, x, wk->rnd);
            for (e = 0; e < C; e++) x[e] *= w;
        }
        memset(sm, 0, C * sizeof *sm);
        if (linear) {
            for (i = 0; i < p->n; i++) kmed__mg_axpy(sm, xb + i * C, p->w[i]);
            if (p->normalize) for (e = 0; e < C; e++) o[e] = sm[e] / div;
            else memcpy(o, sm, C * sizeof *o);
        } else if (p->consensus) {
            /* elected sign: of the summed weighted values, or of the count of signs */
            for (i = 0; i < p->n; i++) {
                if (p->count) kmed__mg_add_sign(sm, xb + i * C);
                else kmed__mg_add(sm, xb + i * C);
            }
            for (e = 0; e < C; e++) sm[e] = sm[e] >= 0 ? 1.0f : -1.0f;
            memset(o, 0, C * sizeof *o);
            memset(dv, 0, C * sizeof *dv);
            for (i = 0; i < p->n; i++) kmed__mg_agree(o, dv, xb + i * C, sm, p->w[i]);
            memcpy(sm, o, C * sizeof *sm);
            kmed__mg_finish(o, sm, p->normalize ? dv : NULL, 1.0f, b, p->lambda);
        } else {
            for (i = 0; i < p->n; i++) kmed__mg_add(sm, xb + i * C);
            kmed__mg_finish(o, sm, NULL, p->normalize ? div : 1.0f, b, p->lambda);
        }
        emit(ectx, off, m, o);
    }
    return KMED_OK;
}

/* ---- config ---- */

KMED_API kmed_result kmed_merge_config_validate(const kmed_merge_config *cfg,
                                                kmed_error *err)
{
    size_t i;
    double ws = 0;
    int lin;
    if (!cfg) return KMED__ERR(err, KMED_ERR_ARG, "merge: no config");
    if ((unsigned)cfg->method > KMED_MERGE_DARE_LINEAR)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: unknown method %d", (int)cfg->method);
    lin = cfg->method == KMED_MERGE_LINEAR;
    if (!cfg->n_models || !cfg->models)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: no models to merge");
    if (!lin && (!cfg->base_model || !*cfg->base_model))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: %s needs a base_model",
                         kmed_merge_method_name(cfg->method));
    for (i = 0; i < cfg->n_models; i++) {
        const kmed_merge_model *mm = &cfg->models[i];
        if (!isfinite(mm->weight))
            return KMED__ERR(err, KMED_ERR_ARG, "merge: %s: weight is not finite", mm->model);
        if (!(mm->density >= 0 && mm->density <= 1))
            return KMED__ERR(err, KMED_ERR_ARG, "merge: %s: density %g is outside (0, 1]",
                             mm->model, (double)mm->density);
        ws += mm->weight;
    }
    if (!isfinite(cfg->lambda))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: lambda is not finite");
    if (lin && cfg->normalize >= 0 && ws == 0)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: linear with normalize needs weights that "
                         "do not sum to 0");
    if (cfg->has_dtype && cfg->dtype != KMED_F32 && cfg->dtype != KMED_BF16 &&
        cfg->dtype != KMED_F16)
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge: dtype %s (F32, BF16 or F16)",
                         kmed_dtype_name(cfg->dtype));
    return KMED_OK;
}

typedef struct kmed__mg_owned {
    kmed_merge_model *models;
    char **strs;
    size_t n_strs;
} kmed__mg_owned;

KMED_API void kmed_merge_config_free(kmed_merge_config *cfg)
{
    kmed__mg_owned *o;
    size_t i;
    if (!cfg || !cfg->impl_) return;
    o = (kmed__mg_owned *)cfg->impl_;
    for (i = 0; i < o->n_strs; i++) KMED_FREE(o->strs[i]);
    KMED_FREE(o->strs);
    KMED_FREE(o->models);
    KMED_FREE(o);
    memset(cfg, 0, sizeof *cfg);
}

static const char *kmed__mg_keep(kmed__mg_owned *o, const char *s, size_t len)
{
    char *c = kmed__strndup(s, len);
    if (!c) return NULL;
    o->strs[o->n_strs++] = c;
    return c;
}

/* Strips trailing '/' for comparing model paths. */
static int kmed__mg_same_path(const char *a, const char *b)
{
    size_t na, nb;
    if (!a || !b) return 0;
    na = strlen(a);
    nb = strlen(b);
    while (na > 1 && a[na - 1] == '/') na--;
    while (nb > 1 && b[nb - 1] == '/') nb--;
    return na == nb && memcmp(a, b, na) == 0;
}

static kmed_result kmed__mg_dtype_name(const char *s, kmed_dtype *t, const char *name,
                                       kmed_error *err)
{
    if (!strcmp(s, "bfloat16") || !strcmp(s, "bf16")) *t = KMED_BF16;
    else if (!strcmp(s, "float16") || !strcmp(s, "f16") || !strcmp(s, "half")) *t = KMED_F16;
    else if (!strcmp(s, "float32") || !strcmp(s, "f32") || !strcmp(s, "float")) *t = KMED_F32;
    else return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "dtype '%s': expected bfloat16, "
                           "float16 or float32", s);
    return KMED_OK;
}

static kmed_result kmed__mg_num(const kmed_json *j, const char *what, double *v,
                                const char *name, kmed_error *err)
{
    if (!j || j->type != KMED_JSON_NUMBER)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be a number (per-layer lists "
                          "and filters are not supported)", what);
    *v = j->num;
    return KMED_OK;
}

static kmed_result kmed__mg_bool(const kmed_json *j, const char *what, int *v,
                                 const char *name, kmed_error *err)
{
    if (!j || (j->type != KMED_JSON_TRUE && j->type != KMED_JSON_FALSE))
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be true or false", what);
    *v = j->type == KMED_JSON_TRUE ? 1 : -1;
    return KMED_OK;
}

/* Fills cfg from a parsed mergekit config. */
static kmed_result kmed__mg_from_json(kmed_merge_config *cfg, kmed__mg_owned *o,
                                      const kmed_json *root, const char *name,
                                      kmed_error *err)
{
    const kmed_json *models = NULL, *method = NULL;
    double gw = 0, gd = 0, v = 0;
    int has_gw = 0, has_gd = 0, has_dtype = 0;
    size_t i, j, nstr = 2;
    kmed_result r;
    if (!root || root->type != KMED_JSON_OBJECT)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "a merge config must be a mapping");
    models = kmed_json_get(root, "models");
    if (models && models->type != KMED_JSON_ARRAY)
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models must be a list");
    nstr += models ? models->len : 0;
    o->strs = (char **)kmed__calloc(nstr, sizeof *o->strs);
    o->models = (kmed_merge_model *)kmed__calloc(models && models->len ? models->len : 1,
                                                 sizeof *o->models);
    if (!o->strs || !o->models) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    for (i = 0; i < root->len; i++) {
        const kmed_json *k = &root->kids[i];
        if (!strcmp(k->key, "merge_method")) {
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "merge_method must be a string");
            method = k;
            if ((r = kmed_merge_method_parse(k->str, &cfg->method, err)) != KMED_OK) return r;
        } else if (!strcmp(k->key, "base_model")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "base_model must be a string");
            if (!(cfg->base_model = kmed__mg_keep(o, k->str, k->len)))
                return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
        } else if (!strcmp(k->key, "models")) {
            continue;
        } else if (!strcmp(k->key, "parameters")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_OBJECT)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "parameters must be a mapping");
            for (j = 0; j < k->len; j++) {
                const kmed_json *p = &k->kids[j];
                if (!strcmp(p->key, "normalize"))
                    r = kmed__mg_bool(p, "normalize", &cfg->normalize, name, err);
                else if (!strcmp(p->key, "rescale"))
                    r = kmed__mg_bool(p, "rescale", &cfg->rescale, name, err);
                else if (!strcmp(p->key, "int8_mask")) {
                    int b = 0;
                    r = kmed__mg_bool(p, "int8_mask", &b, name, err);
                    cfg->int8_mask = b > 0;
                } else if (!strcmp(p->key, "lambda")) {
                    r = kmed__mg_num(p, "lambda", &v, name, err);
                    cfg->lambda = (float)v;
                } else if (!strcmp(p->key, "weight")) {
                    r = kmed__mg_num(p, "parameters.weight", &gw, name, err);
                    has_gw = 1;
                } else if (!strcmp(p->key, "density")) {
                    r = kmed__mg_num(p, "parameters.density", &gd, name, err);
                    has_gd = 1;
                } else if (!strcmp(p->key, "consensus_method")) {
                    const char *s = kmed_json_str(p, "");
                    if (!strcmp(s, "sum")) cfg->consensus_count = 0;
                    else if (!strcmp(s, "count")) cfg->consensus_count = 1;
                    else r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "consensus_method "
                                        "'%s': expected sum or count", s);
                } else {
                    r = KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "parameters.%s is not "
                                   "supported", p->key);
                }
                if (r != KMED_OK) return r;
            }
        } else if (!strcmp(k->key, "dtype") || !strcmp(k->key, "out_dtype")) {
            if (k->type == KMED_JSON_NULL) continue;
            if (k->type != KMED_JSON_STRING)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s must be a string", k->key);
            /* out_dtype wins over dtype (kmed computes in f32 either way) */
            if (!strcmp(k->key, "dtype") && has_dtype == 2) continue;
            if ((r = kmed__mg_dtype_name(k->str, &cfg->dtype, name, err)) != KMED_OK) return r;
            cfg->has_dtype = 1;
            has_dtype = !strcmp(k->key, "out_dtype") ? 2 : 1;
        } else if (!strcmp(k->key, "random_seed")) {
            int64_t s;
            if (!kmed_json_int(k, &s) || s < 0)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "random_seed must be an "
                                  "integer >= 0");
            cfg->seed = (uint64_t)s;
        } else if (!strcmp(k->key, "tokenizer_source")) {
            const char *s = kmed_json_str(k, "base");
            if (k->type != KMED_JSON_NULL && strcmp(s, "base") != 0)
                return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "tokenizer_source '%s': "
                                  "only the base model's tokenizer is supported", s);
        } else {
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "key '%s' is not supported",
                              k->key);
        }
    }
    if (!method) return KMED__ERRF(err, KMED_ERR_FORMAT, name, "merge_method is missing");
    for (i = 0; models && i < models->len; i++) {
        const kmed_json *mj = &models->kids[i], *path = kmed_json_get(mj, "model"), *pj;
        kmed_merge_model *mm = &o->models[i];
        int has_w = has_gw;
        if (mj->type != KMED_JSON_OBJECT || !path || path->type != KMED_JSON_STRING)
            return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu] needs a model path", i);
        for (j = 0; j < mj->len; j++) {
            if (strcmp(mj->kids[j].key, "model") && strcmp(mj->kids[j].key, "parameters"))
                return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "models[%zu].%s is not "
                                  "supported", i, mj->kids[j].key);
        }
        if (!(mm->model = kmed__mg_keep(o, path->str, path->len)))
            return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
        mm->weight = (float)gw;
        mm->density = has_gd ? (float)gd : 0.0f;
        pj = kmed_json_get(mj, "parameters");
        if (pj && pj->type != KMED_JSON_NULL) {
            if (pj->type != KMED_JSON_OBJECT)
                return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu].parameters must be "
                                  "a mapping", i);
            for (j = 0; j < pj->len; j++) {
                const kmed_json *p = &pj->kids[j];
                char what[64];
                snprintf(what, sizeof what, "models[%zu].%s", i, p->key);
                if (!strcmp(p->key, "weight")) {
                    if ((r = kmed__mg_num(p, what, &v, name, err)) != KMED_OK) return r;
                    mm->weight = (float)v;
                    has_w = 1;
                } else if (!strcmp(p->key, "density")) {
                    if ((r = kmed__mg_num(p, what, &v, name, err)) != KMED_OK) return r;
                    if (!(v > 0 && v <= 1))
                        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "%s = %g is outside "
                                          "(0, 1]", what, v);
                    mm->density = (float)v;
                } else {
                    return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, name, "%s is not supported",
                                      what);
                }
            }
        }
        /* the base model listed among the models needs no weight (it is no task vector) */
        if (!has_w && !(cfg->method != KMED_MERGE_LINEAR &&
                        kmed__mg_same_path(mm->model, cfg->base_model)))
            return KMED__ERRF(err, KMED_ERR_FORMAT, name, "models[%zu] (%s) needs "
                              "parameters.weight", i, mm->model);
    }
    cfg->models = o->models;
    cfg->n_models = models ? models->len : 0;
    return kmed_merge_config_validate(cfg, err);
}

/* ---- YAML subset -> JSON ----
   The shape mergekit configs use: block mappings and block sequences by indentation,
   "- key: value" items, plain/quoted scalars, comments and "---". Anything else (flow
   collections, anchors, multi-line scalars) is an error naming the line. */

typedef struct kmed__mg_yline {
    size_t indent;
    const char *s;           /* content after the indent, comment stripped */
    size_t len;
    size_t line;
} kmed__mg_yline;

typedef struct kmed__mg_yaml {
    kmed__mg_yline *ln;
    size_t n, pos;
    kmed_buf *out;
    const char *name;
    kmed_error *err;
    int depth;
} kmed__mg_yaml;

static kmed_result kmed__mg_yerr(kmed__mg_yaml *y, size_t line, const char *what)
{
    return kmed_error_set(y->err, KMED_ERR_FORMAT, y->name, line, (size_t)-1, "%s", what);
}

/* Writes one scalar as JSON: quoted strings, true/false/null, numbers, else a string. */
static kmed_result kmed__mg_yscalar(kmed__mg_yaml *y, const char *s, size_t len, size_t line)
{
    char tmp[64];
    if (len && (s[0] == '"' || s[0] == '\'')) {
        kmed_buf v = {0};
        size_t i;
        if (len < 2 || s[len - 1] != s[0])
            return kmed__mg_yerr(y, line, "unterminated quoted string");
        for (i = 1; i + 1 < len; i++) {
            if (s[0] == '\'' && s[i] == '\'' && i + 2 < len && s[i + 1] == '\'') i++;
            else if (s[0] == '"' && s[i] == '\\' && i + 2 < len) {
                char c = s[++i];
                c = c == 'n' ? '\n' : c == 't' ? '\t' : c;
                kmed_buf_put(&v, &c, 1);
                continue;
            }
            kmed_buf_put(&v, s + i, 1);
        }
        kmed_buf_json_str(y->out, v.data ? v.data : "", v.len);
        kmed_buf_free(&v);
        return KMED_OK;
    }
    if (len && (s[0] == '[' || s[0] == '{' || s[0] == '&' || s[0] == '*' || s[0] == '|' ||
                s[0] == '>'))
        return kmed__mg_yerr(y, line, "flow collections, anchors and block scalars are not "
                             "supported in a merge config");
    if ((len == 4 && (!memcmp(s, "true", 4) || !memcmp(s, "True", 4))) ||
        (len == 5 && (!memcmp(s, "false", 5) || !memcmp(s, "False", 5)))) {
        kmed_buf_puts(y->out, (s[0] == 't' || s[0] == 'T') ? "true" : "false");
        return KMED_OK;
    }
    if (len == 0 || (len == 4 && !memcmp(s, "null", 4)) || (len == 1 && s[0] == '~')) {
        kmed_buf_puts(y->out, "null");
        return KMED_OK;
    }
    if (len < sizeof tmp) {
        char *end;
        double d;
        memcpy(tmp, s, len);
        tmp[len] = 0;
        d = strtod(tmp, &end);
        if (end == tmp + len && isfinite(d) && ((tmp[0] >= '0' && tmp[0] <= '9') ||
                                                tmp[0] == '-' || tmp[0] == '+' || tmp[0] == '.')) {
            if (d == floor(d) && fabs(d) < 9e15 && !strpbrk(tmp, ".eE"))
                kmed_buf_printf(y->out, "%.0f", d);
            else
                kmed_buf_printf(y->out, "%.17g", d);
            return KMED_OK;
        }
    }
    kmed_buf_json_str(y->out, s, len);
    return KMED_OK;
}

/* Position of the ':' that ends a mapping key in s (outside quotes), or -1. */
static long kmed__mg_ykey(const char *s, size_t len)
{
    size_t i = 0;
    if (len && (s[0] == '"' || s[0] == '\'')) {
        for (i = 1; i < len && s[i] != s[0]; i++) {}
        i++;
    }
    for (; i < len; i++)
        if (s[i] == ':' && (i + 1 == len || s[i + 1] == ' ')) return (long)i;
    return -1;
}

static kmed_result kmed__mg_yblock(kmed__mg_yaml *y, size_t indent);

static kmed_result kmed__mg_ymap(kmed__mg_yaml *y, size_t indent)
{
    int first = 1;
    kmed_result r;
    kmed_buf_puts(y->out, "{");
    while (y->pos < y->n && y->ln[y->pos].indent == indent) {
        kmed__mg_yline *l = &y->ln[y->pos];
        long c = kmed__mg_ykey(l->s, l->len);
        const char *v;
        size_t vlen, ks = 0, kl;
        if (l->len >= 1 && l->s[0] == '-' && (l->len == 1 || l->s[1] == ' ')) break;
        if (c < 0) return kmed__mg_yerr(y, l->line, "expected 'key: value'");
        kl = (size_t)c;
        while (kl > 0 && l->s[kl - 1] == ' ') kl--;
        if (!first) kmed_buf_puts(y->out, ",");
        first = 0;
        if (kl >= 2 && (l->s[0] == '"' || l->s[0] == '\'')) { ks = 1; kl -= 2; }
        kmed_buf_json_str(y->out, l->s + ks, kl);
        kmed_buf_puts(y->out, ":");
        v = l->s + c + 1;
        vlen = l->len - (size_t)c - 1;
        while (vlen && *v == ' ') { v++; vlen--; }
        y->pos++;
        if (vlen) {
            if ((r = kmed__mg_yscalar(y, v, vlen, l->line)) != KMED_OK) return r;
        } else if (y->pos < y->n && (y->ln[y->pos].indent > indent ||
                                     (y->ln[y->pos].indent == indent &&
                                      y->ln[y->pos].s[0] == '-'))) {
            if ((r = kmed__mg_yblock(y, y->ln[y->pos].indent)) != KMED_OK) return r;
        } else {
            kmed_buf_puts(y->out, "null");
        }
    }
    if (y->pos < y->n && y->ln[y->pos].indent > indent)
        return kmed__mg_yerr(y, y->ln[y->pos].line, "unexpected indentation");
    kmed_buf_puts(y->out, "}");
    return KMED_OK;
}

static kmed_result kmed__mg_yseq(kmed__mg_yaml *y, size_t indent)
{
    int first = 1;
    kmed_result r;
    kmed_buf_puts(y->out, "[");
    while (y->pos < y->n && y->ln[y->pos].indent == indent) {
        kmed__mg_yline *l = &y->ln[y->pos];
        size_t skip = 1;
        if (!(l->s[0] == '-' && (l->len == 1 || l->s[1] == ' '))) break;
        if (!first) kmed_buf_puts(y->out, ",");
        first = 0;
        while (skip < l->len && l->s[skip] == ' ') skip++;
        if (skip >= l->len) { /* "-" alone: the item is the indented block below */
            y->pos++;
            if (y->pos < y->n && y->ln[y->pos].indent > indent) {
                if ((r = kmed__mg_yblock(y, y->ln[y->pos].indent)) != KMED_OK) return r;
            } else {
                kmed_buf_puts(y->out, "null");
            }
        } else if (kmed__mg_ykey(l->s + skip, l->len - skip) >= 0) {
            /* "- key: v": a mapping whose first line starts after the dash */
            l->s += skip;
            l->len -= skip;
            l->indent += skip;
            if ((r = kmed__mg_ymap(y, l->indent)) != KMED_OK) return r;
        } else {
            y->pos++;
            if ((r = kmed__mg_yscalar(y, l->s + skip, l->len - skip, l->line)) != KMED_OK)
                return r;
        }
    }
    kmed_buf_puts(y->out, "]");
    return KMED_OK;
}

static kmed_result kmed__mg_yblock(kmed__mg_yaml *y, size_t indent)
{
    kmed_result r;
    const kmed__mg_yline *l = &y->ln[y->pos];
    if (++y->depth > 64) return kmed__mg_yerr(y, l->line, "nesting too deep");
    if (l->s[0] == '-' && (l->len == 1 || l->s[1] == ' ')) r = kmed__mg_yseq(y, indent);
    else if (kmed__mg_ykey(l->s, l->len) >= 0) r = kmed__mg_ymap(y, indent);
    else {
        y->pos++;
        r = kmed__mg_yscalar(y, l->s, l->len, l->line);
    }
    y->depth--;
    return r;
}

/* Converts YAML text to JSON text in out. */
static kmed_result kmed__mg_yaml_to_json(const char *text, size_t len, const char *name,
                                         kmed_buf *out, kmed_error *err)
{
    kmed__mg_yaml y;
    size_t i = 0, line = 0, cap = 16;
    kmed_result r;
    memset(&y, 0, sizeof y);
    y.out = out;
    y.name = name;
    y.err = err;
    y.ln = (kmed__mg_yline *)kmed__calloc(cap, sizeof *y.ln);
    if (!y.ln) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    while (i < len) {
        size_t b = i, e, ind = 0, k;
        int q = 0;
        line++;
        while (i < len && text[i] != '\n') i++;
        e = i;
        if (i < len) i++;
        if (e > b && text[e - 1] == '\r') e--;
        while (b + ind < e && text[b + ind] == ' ') ind++;
        if (b + ind < e && text[b + ind] == '\t') {
            KMED_FREE(y.ln);
            return kmed_error_set(err, KMED_ERR_FORMAT, name, line, (size_t)-1,
                                  "tabs cannot indent YAML");
        }
        /* strip a comment: '#' at the start or after a space, outside quotes */
        for (k = b + ind; k < e; k++) {
            if (q) { if (text[k] == q) q = 0; }
            else if (text[k] == '"' || text[k] == '\'') {
                if (k == b + ind || text[k - 1] == ' ') q = text[k];
            } else if (text[k] == '#' && (k == b + ind || text[k - 1] == ' ')) break;
        }
        e = k;
        while (e > b + ind && text[e - 1] == ' ') e--;
        if (e == b + ind) continue;
        if (ind == 0 && e - b >= 3 && !memcmp(text + b, "---", 3)) continue;
        if (e - b >= 3 && ind == 0 && !memcmp(text + b, "...", 3)) break;
        if (y.n == cap) {
            kmed__mg_yline *nl = (kmed__mg_yline *)KMED_REALLOC(y.ln, 2 * cap * sizeof *nl);
            if (!nl) {
                KMED_FREE(y.ln);
                return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
            }
            y.ln = nl;
            cap *= 2;
        }
        y.ln[y.n].indent = ind;
        y.ln[y.n].s = text + b + ind;
        y.ln[y.n].len = e - b - ind;
        y.ln[y.n].line = line;
        y.n++;
    }
    if (y.n == 0) {
        KMED_FREE(y.ln);
        return KMED__ERRF(err, KMED_ERR_FORMAT, name, "empty merge config");
    }
    r = kmed__mg_yblock(&y, y.ln[0].indent);
    if (r == KMED_OK && y.pos < y.n)
        r = kmed__mg_yerr(&y, y.ln[y.pos].line, "unexpected indentation");
    if (r == KMED_OK && out->failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    KMED_FREE(y.ln);
    return r;
}

KMED_API kmed_result kmed_merge_config_parse(kmed_merge_config *cfg, const char *text,
                                             size_t len, const char *name, kmed_error *err)
{
    kmed__mg_owned *o;
    kmed_json_doc doc;
    kmed_buf js = {0};
    kmed_result r;
    size_t i = 0;
    memset(cfg, 0, sizeof *cfg);
    memset(&doc, 0, sizeof doc);
    o = (kmed__mg_owned *)kmed__calloc(1, sizeof *o);
    if (!o) return KMED__ERR(err, KMED_ERR_NOMEM, "config: out of memory");
    cfg->impl_ = o;
    while (i < len && (text[i] == ' ' || text[i] == '\n' || text[i] == '\r' || text[i] == '\t'))
        i++;
    if (i < len && text[i] == '{') {
        r = kmed_json_parse(&doc, text, len, name, 1, err);
    } else {
        r = kmed__mg_yaml_to_json(text, len, name, &js, err);
        if (r == KMED_OK) r = kmed_json_parse(&doc, js.data, js.len, name, 0, err);
    }
    if (r == KMED_OK) r = kmed__mg_from_json(cfg, o, doc.root, name, err);
    kmed_json_free(&doc);
    kmed_buf_free(&js);
    if (r != KMED_OK) kmed_merge_config_free(cfg);
    return r;
}

KMED_API kmed_result kmed_merge_config_load(kmed_merge_config *cfg, const char *path,
                                            kmed_error *err)
{
    char *text = NULL;
    size_t len = 0;
    kmed_result r;
    memset(cfg, 0, sizeof *cfg);
    if ((r = kmed_file_read(path, (size_t)16 << 20, &text, &len, err)) != KMED_OK) return r;
    r = kmed_merge_config_parse(cfg, text, len, path, err);
    kmed_free(text);
    return r;
}

/* ---- in-memory tensors ---- */

static kmed_result kmed__mg_mem_read(void *ctx, size_t off, size_t n, float *dst,
                                     kmed_error *err)
{
    (void)err;
    memcpy(dst, (const float *)ctx + off, n * sizeof *dst);
    return KMED_OK;
}

static void kmed__mg_mem_emit(void *ctx, size_t off, size_t n, const float *v)
{
    memcpy((float *)ctx + off, v, n * sizeof *v);
}

KMED_API kmed_result kmed_merge_tensor(const kmed_merge_config *cfg, uint64_t tensor_key,
                                       float *out, const float *base,
                                       const float *const *xs, size_t n, kmed_error *err)
{
    kmed__mg_plan p;
    kmed__mg_work wk;
    kmed__mg_reader rb, *rx;
    kmed_result r;
    size_t i;
    if (!cfg || !out || (!xs && cfg->n_models))
        return KMED__ERR(err, KMED_ERR_ARG, "merge: missing tensor arguments");
    if (cfg->method != KMED_MERGE_LINEAR && !base)
        return KMED__ERR(err, KMED_ERR_ARG, "merge: %s needs a base tensor",
                         kmed_merge_method_name(cfg->method));
    if ((r = kmed_merge_config_validate(cfg, err)) != KMED_OK) return r;
    if ((r = kmed__mg_plan_init(&p, cfg, NULL, err)) != KMED_OK) return r;
    rx = (kmed__mg_reader *)kmed__calloc(p.n + 1, sizeof *rx);
    if (!rx) {
        kmed__mg_plan_free(&p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    }
    if ((r = kmed__mg_work_init(&wk, &p, err)) != KMED_OK) {
        KMED_FREE(rx);
        kmed__mg_plan_free(&p);
        return r;
    }
    rb.read = kmed__mg_mem_read;
    rb.ctx = (void *)base;
    for (i = 0; i < p.n; i++) {
        rx[i].read = kmed__mg_mem_read;
        rx[i].ctx = (void *)xs[i];
    }
    r = kmed__mg_tensor_run(&p, tensor_key, n, &rb, rx, kmed__mg_mem_emit, out, &wk, err);
    kmed__mg_work_free(&wk);
    KMED_FREE(rx);
    kmed__mg_plan_free(&p);
    return r;
}

/* ---- merging checkpoints on disk ---- */

/* HF names of the LoRA targets, in KMED_LORA_* order. */
static const char *const kmed__mg_lin[KMED_LORA_NTARGETS] = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
};

/* KMED_LORA_* target of "model.layers.N.<module>.weight" (layer in *layer), or -1. */
static int kmed__mg_target_of(const char *name, int *layer)
{
    const char *s = name + 13;
    long l = 0;
    int t, digits = 0;
    if (strncmp(name, "model.layers.", 13) != 0) return -1;
    while (*s >= '0' && *s <= '9' && digits < 6) { l = l * 10 + (*s++ - '0'); digits++; }
    if (!digits || *s++ != '.') return -1;
    for (t = 0; t < KMED_LORA_NTARGETS; t++) {
        size_t n = strlen(kmed__mg_lin[t]);
        if (strncmp(s, kmed__mg_lin[t], n) == 0 && strcmp(s + n, ".weight") == 0) {
            *layer = (int)l;
            return t;
        }
    }
    return -1;
}

/* One input: safetensors of an HF directory, optionally with a PEFT adapter merged on the
   fly through a model shell whose weights point into those same mapped tensors. */
typedef struct kmed__mg_src {
    const char *spec;
    char dir[1024], adapter[1024];
    kmed_st st;
    int st_ok, m_ok, lora_ok;
    kmed_gemma m;
    kmed_lora lora;
    const kmed_tensor_info *t;   /* tensor being read */
    float *adapted;              /* (rows, cols) W + scale B A of t, or NULL */
    int tokens;                  /* t is the embedding and the adapter replaces rows of it */
    size_t released;             /* bytes of t given back so far */
} kmed__mg_src;

static void kmed__mg_src_close(kmed__mg_src *s)
{
    KMED_FREE(s->adapted);
    s->adapted = NULL;
#ifndef KMED_NO_TRAIN
    if (s->lora_ok) kmed_lora_free(&s->lora);
#endif
    if (s->m_ok) kmed_gemma_free(&s->m);
    if (s->st_ok) kmed_st_close(&s->st);
    s->st_ok = s->m_ok = s->lora_ok = 0;
}

static int kmed__mg_has_file(const char *dir, const char *name)
{
    char p[1200];
    struct stat sb;
    if (kmed_path_join(p, sizeof p, dir, name, NULL) != KMED_OK) return 0;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

/* Points the shell's weights at the tensors of s->st (shapes checked by kmed_lora_load). */
static kmed_result kmed__mg_src_shell(kmed__mg_src *s, kmed_error *err)
{
    kmed_gemma_config gc;
    kmed_result r;
    int l, t;
    char name[160];
    if ((r = kmed_gemma_config_load(&gc, s->dir, err)) != KMED_OK) return r;
    if ((r = kmed_gemma_init(&s->m, &gc, err)) != KMED_OK) return r;
    s->m_ok = 1;
    for (l = -1; l < gc.n_layers; l++) {
        for (t = l < 0 ? KMED_LORA_NTARGETS - 1 : 0; t < KMED_LORA_NTARGETS; t++) {
            kmed_weight *w = l < 0 ? &s->m.embed : &(&s->m.layers[l].q)[t];
            const kmed_tensor_info *ti;
            if (l < 0) snprintf(name, sizeof name, "model.embed_tokens.weight");
            else snprintf(name, sizeof name, "model.layers.%d.%s.weight", l, kmed__mg_lin[t]);
            ti = kmed_st_find(&s->st, name);
            if (!ti) return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->dir, "no tensor %s", name);
            if (ti->ndim != 2 || !kmed_dtype_computable(ti->dtype))
                return KMED__ERRF(err, KMED_ERR_SHAPE, s->dir, "%s is not a 2-D float tensor",
                                  name);
            w->data = ti->data;
            w->type = ti->dtype;
            w->rows = (size_t)ti->shape[0];
            w->cols = (size_t)ti->shape[1];
        }
    }
    return KMED_OK;
}

/* Opens "DIR", an adapter directory (on base_dir) or "DIR+ADAPTER". */
static kmed_result kmed__mg_src_open(kmed__mg_src *s, const char *spec, const char *base_dir,
                                     kmed_error *err)
{
    kmed_result r;
    memset(s, 0, sizeof *s);
    s->spec = spec;
    if (strlen(spec) >= sizeof s->dir)
        return KMED__ERR(err, KMED_ERR_LIMIT, "merge: path too long: %s", spec);
    if (kmed_is_dir(spec)) {
        if (kmed__mg_has_file(spec, "adapter_config.json")) {
            if (!base_dir)
                return KMED__ERRF(err, KMED_ERR_ARG, spec, "a PEFT adapter needs a plain HF "
                                  "base_model to merge into (or write BASE+ADAPTER)");
            snprintf(s->adapter, sizeof s->adapter, "%s", spec);
            snprintf(s->dir, sizeof s->dir, "%s", base_dir);
        } else {
            snprintf(s->dir, sizeof s->dir, "%s", spec);
        }
    } else {
        const char *plus = strchr(spec, '+');
        while (plus) {
            snprintf(s->dir, sizeof s->dir, "%.*s", (int)(plus - spec), spec);
            if (kmed_is_dir(s->dir)) break;
            plus = strchr(plus + 1, '+');
        }
        if (!plus)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, spec, "no such model directory");
        snprintf(s->adapter, sizeof s->adapter, "%s", plus + 1);
        if (!kmed__mg_has_file(s->adapter, "adapter_config.json"))
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->adapter, "not a PEFT adapter "
                              "directory (no adapter_config.json)");
    }
    if ((r = kmed_st_open(&s->st, s->dir, err)) != KMED_OK) return r;
    s->st_ok = 1;
    if (s->adapter[0]) {
#ifdef KMED_NO_TRAIN
        return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, s->adapter, "adapters need the train "
                          "module (built with KMED_NO_TRAIN)");
#else
        if ((r = kmed__mg_src_shell(s, err)) != KMED_OK) return r;
        if ((r = kmed_lora_load(&s->lora, &s->m, s->adapter, err)) != KMED_OK) return r;
        s->lora_ok = 1;
#endif
    }
    return KMED_OK;
}

/* Makes tensor `name` current: an adapted target is merged whole (f32) here. */
static kmed_result kmed__mg_src_begin(kmed__mg_src *s, const char *name, kmed_error *err)
{
    int layer = -1, t;
    s->t = kmed_st_find(&s->st, name);
    s->released = 0;
    s->tokens = 0;
    if (!s->t) return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->dir, "no tensor %s", name);
#ifndef KMED_NO_TRAIN
    s->tokens = s->lora_ok && s->lora.n_tokens > 0 && s->t->ndim == 2 &&
                s->t->shape[1] == (uint64_t)s->m.cfg.hidden_size &&
                !strcmp(name, "model.embed_tokens.weight");
    t = s->lora_ok ? kmed__mg_target_of(name, &layer) : -1;
    if (t >= 0 && layer < s->lora.n_layers && (s->lora.targets & (1u << t)) &&
        s->lora.ab[layer][t].A) {
        kmed_result r;
        size_t n = (size_t)kmed_tensor_numel(s->t);
        s->adapted = (float *)kmed__calloc(n ? n : 1, sizeof(float));
        if (!s->adapted)
            return KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for %s", name);
        r = kmed_lora_merged_weight(&s->m, &s->lora, layer, t, s->adapted, err);
        kmed__release_pages(s->t->data, s->t->nbytes);
        if (r != KMED_OK) return r;
    }
#else
    (void)t;
    (void)layer;
#endif
    return KMED_OK;
}

static void kmed__mg_src_end(kmed__mg_src *s)
{
    KMED_FREE(s->adapted);
    s->adapted = NULL;
    if (s->t) kmed__release_pages(s->t->data, s->t->nbytes);
    s->t = NULL;
}

static kmed_result kmed__mg_src_read(void *ctx, size_t off, size_t n, float *dst,
                                     kmed_error *err)
{
    kmed__mg_src *s = (kmed__mg_src *)ctx;
    size_t es, end;
    (void)err;
    if (s->adapted) {
        memcpy(dst, s->adapted + off, n * sizeof *dst);
        return KMED_OK;
    }
    es = kmed_dtype_bytes(s->t->dtype, 1);
    kmed_dequantize_row(s->t->dtype, (const unsigned char *)s->t->data + off * es, dst, n);
    if (s->tokens) {   /* trainable tokens replace their rows, where [off, off + n) meets them */
        size_t C = (size_t)s->t->shape[1], row;
        for (row = off / C; row * C < off + n && row < (size_t)s->m.cfg.vocab_size; row++) {
            long k = kmed__lora_token(&s->lora, (int)row);
            size_t a = row * C, from = a > off ? a : off, to = a + C < off + n ? a + C : off + n;
            if (k >= 0)
                memcpy(dst + (from - off), s->lora.token_rows + (size_t)k * C + (from - a),
                       (to - from) * sizeof *dst);
        }
    }
    if (off == 0) s->released = 0; /* a new pass over the tensor */
    end = (off + n) * es;
    if (end - s->released >= ((size_t)8 << 20)) {
        kmed__release_pages((const unsigned char *)s->t->data + s->released, end - s->released);
        s->released = end;
    }
    return KMED_OK;
}

static int kmed__mg_float(kmed_dtype t)
{
    return t == KMED_F32 || t == KMED_BF16 || t == KMED_F16;
}

static int kmed__mg_skip_name(const char *name)
{
    return strcmp(name, "lm_head.weight") == 0; /* Gemma-2 ties it to the embedding */
}

static void kmed__mg_shape_str(const kmed_tensor_info *t, char *out, size_t cap)
{
    int i;
    size_t n = 0;
    n += (size_t)snprintf(out, cap, "[");
    for (i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(out + n, cap - n, "%s%llu", i ? ", " : "",
                              (unsigned long long)t->shape[i]);
    if (n < cap) snprintf(out + n, cap - n, "]");
}

/* Every input holds exactly the reference's tensors, with its shapes, in float dtypes. */
static kmed_result kmed__mg_check(const kmed__mg_src *ref, const kmed__mg_src *s,
                                  kmed_error *err)
{
    size_t i;
    for (i = 0; i < ref->st.n_tensors; i++) {
        const kmed_tensor_info *a = &ref->st.tensors[i], *b;
        char sa[96], sb[96];
        if (kmed__mg_skip_name(a->name)) continue;
        if (!kmed__mg_float(a->dtype))
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, ref->spec, "tensor %s is %s; only "
                              "F32, BF16 and F16 tensors can be merged", a->name,
                              kmed_dtype_name(a->dtype));
        if (s == ref) continue;
        b = kmed_st_find(&s->st, a->name);
        if (!b)
            return KMED__ERRF(err, KMED_ERR_NOT_FOUND, s->spec, "no tensor %s (the reference "
                              "model %s has it): not the same architecture", a->name, ref->spec);
        if (!kmed__mg_float(b->dtype))
            return KMED__ERRF(err, KMED_ERR_UNSUPPORTED, s->spec, "tensor %s is %s; only F32, "
                              "BF16 and F16 tensors can be merged", b->name,
                              kmed_dtype_name(b->dtype));
        if (a->ndim != b->ndim || memcmp(a->shape, b->shape, sizeof a->shape) != 0) {
            kmed__mg_shape_str(b, sb, sizeof sb);
            kmed__mg_shape_str(a, sa, sizeof sa);
            return KMED__ERRF(err, KMED_ERR_SHAPE, s->spec, "tensor %s has shape %s, the "
                              "reference model %s has %s", a->name, sb, ref->spec, sa);
        }
    }
    for (i = 0; s != ref && i < s->st.n_tensors; i++) {
        const char *nm = s->st.tensors[i].name;
        if (!kmed__mg_skip_name(nm) && !kmed_st_find(&ref->st, nm))
            return KMED__ERRF(err, KMED_ERR_SHAPE, s->spec, "has tensor %s that the reference "
                              "model %s lacks: not the same architecture", nm, ref->spec);
    }
    return KMED_OK;
}

/* Output conversion of merged chunks into the whole output tensor. */
typedef struct kmed__mg_outbuf {
    unsigned char *data;
    kmed_dtype dtype;
    size_t es;
} kmed__mg_outbuf;

static void kmed__mg_out_emit(void *ctx, size_t off, size_t n, const float *v)
{
    kmed__mg_outbuf *o = (kmed__mg_outbuf *)ctx;
    kmed_quantize_row(o->dtype, v, o->data + off * o->es, n);
}

static kmed_result kmed__mg_copy_file(const char *sdir, const char *ddir, const char *name,
                                      kmed_error *err)
{
    char sp[1200], dp[1200];
    char *data = NULL;
    size_t len = 0;
    kmed_result r;
    if (!kmed__mg_has_file(sdir, name)) return KMED_OK;
    if ((r = kmed_path_join(sp, sizeof sp, sdir, name, err)) != KMED_OK) return r;
    if ((r = kmed_path_join(dp, sizeof dp, ddir, name, err)) != KMED_OK) return r;
    if ((r = kmed_file_read(sp, 0, &data, &len, err)) != KMED_OK) return r;
    r = kmed_file_write_atomic(dp, data, len, err);
    kmed_free(data);
    return r;
}

/* config.json of the reference with torch_dtype set to the output dtype. */
static kmed_result kmed__mg_write_config(const char *sdir, const char *ddir, kmed_dtype dt,
                                         kmed_error *err)
{
    char sp[1200], dp[1200];
    char *text = NULL;
    size_t len = 0;
    kmed_buf b = {0};
    kmed_result r;
    const char *k, *q1, *q2 = NULL;
    if ((r = kmed_path_join(sp, sizeof sp, sdir, "config.json", err)) != KMED_OK) return r;
    if ((r = kmed_path_join(dp, sizeof dp, ddir, "config.json", err)) != KMED_OK) return r;
    if ((r = kmed_file_read(sp, (size_t)16 << 20, &text, &len, err)) != KMED_OK) return r;
    k = strstr(text, "\"torch_dtype\"");
    q1 = k ? strchr(k + 13, '"') : NULL;
    if (q1) q2 = strchr(q1 + 1, '"');
    if (q2) {
        kmed_buf_put(&b, text, (size_t)(q1 + 1 - text));
        kmed_buf_puts(&b, dt == KMED_BF16 ? "bfloat16" : dt == KMED_F16 ? "float16" : "float32");
        kmed_buf_put(&b, q2, len - (size_t)(q2 - text));
    } else {
        kmed_buf_put(&b, text, len);
    }
    kmed_free(text);
    if (b.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
    else r = kmed_file_write_atomic(dp, b.data, b.len, err);
    kmed_buf_free(&b);
    return r;
}

static const char *const kmed__mg_side_files[5] = {
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json"
};

/* Removes a file of dir, if there. */
static void kmed__mg_unlink(const char *dir, const char *name)
{
    char p[1200];
    if (kmed_path_join(p, sizeof p, dir, name, NULL) == KMED_OK) remove(p);
}

typedef struct kmed__mg_ctx {
    const kmed_merge_config *cfg;
    kmed__mg_src *srcs;          /* [n_src]: the base (when any) first, then the models */
    size_t n_src;
    kmed__mg_src *ref, *base;    /* base NULL for linear (not read) */
    kmed__mg_src **xs;           /* [plan.n] sources of the mixed models */
    kmed__mg_plan plan;
    kmed__mg_work wk;
    kmed__mg_reader rb, *rx;
    double bytes_in;             /* input tensor bytes read (once per tensor) */
} kmed__mg_ctx;

/* Merges tensor `t` of the reference into buf (numel x dtype). */
static kmed_result kmed__mg_one(kmed__mg_ctx *c, const kmed_tensor_info *t, kmed_dtype dt,
                                unsigned char *buf, kmed_error *err)
{
    kmed__mg_outbuf ob;
    kmed_result r = KMED_OK;
    size_t i, numel = (size_t)kmed_tensor_numel(t);
    ob.data = buf;
    ob.dtype = dt;
    ob.es = kmed_dtype_bytes(dt, 1);
    if (c->base) r = kmed__mg_src_begin(c->base, t->name, err);
    for (i = 0; i < c->plan.n && r == KMED_OK; i++)
        r = kmed__mg_src_begin(c->xs[i], t->name, err);
    if (r == KMED_OK)
        r = kmed__mg_tensor_run(&c->plan, kmed_merge_tensor_key(t->name), numel, &c->rb, c->rx,
                                kmed__mg_out_emit, &ob, &c->wk, err);
    if (c->base) {
        c->bytes_in += c->base->t ? (double)c->base->t->nbytes : 0;
        kmed__mg_src_end(c->base);
    }
    for (i = 0; i < c->plan.n; i++) {
        c->bytes_in += c->xs[i]->t ? (double)c->xs[i]->t->nbytes : 0;
        kmed__mg_src_end(c->xs[i]);
    }
    return r;
}

/* Writes the merged HF directory. */
static kmed_result kmed__mg_write_hf(kmed__mg_ctx *c, const char *dir, kmed_dtype dt,
                                     size_t max_shard, const kmed_callbacks *cb,
                                     kmed_error *err)
{
    static const char *const mk[1] = {"format"}, *const mv[1] = {"pt"};
    const kmed__mg_src *ref = c->ref;
    size_t n = 0, i, j, n_shards = 1, cur = 0, total = 0, done = 0, es = kmed_dtype_bytes(dt, 1);
    kmed_tensor_info *ti = NULL;
    size_t *shard_of = NULL;
    kmed_buf idx = {0};
    kmed_result r = KMED_OK;
    char path[1200], fname[64];
    double t0 = kmed_time_now();

    if ((r = kmed_mkdir_p(dir, err)) != KMED_OK) return r;
    /* a crash mid-way must not leave an old config.json (the completeness mark) or an old
       index that would point readers at stale shards */
    kmed__mg_unlink(dir, "config.json");
    kmed__mg_unlink(dir, "model.safetensors.index.json");
    kmed__mg_unlink(dir, "model.safetensors");
    ti = (kmed_tensor_info *)kmed__calloc(ref->st.n_tensors + 1, sizeof *ti);
    shard_of = (size_t *)kmed__calloc(ref->st.n_tensors + 1, sizeof *shard_of);
    if (!ti || !shard_of) { r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory"); goto done; }
    for (i = 0; i < ref->st.n_tensors; i++) {
        const kmed_tensor_info *a = &ref->st.tensors[i];
        size_t nb;
        if (kmed__mg_skip_name(a->name)) {
            kmed_log(cb, KMED_LOG_INFO, "merge: %s left out (tied to the embedding)", a->name);
            continue;
        }
        ti[n] = *a;
        ti[n].dtype = dt;
        ti[n].data = NULL;
        if (!kmed__mul_ok((size_t)kmed_tensor_numel(a), es, &nb)) {
            r = KMED__ERR(err, KMED_ERR_LIMIT, "merge: tensor %s too large", a->name);
            goto done;
        }
        ti[n].nbytes = nb;
        if (max_shard && cur > 0 && cur + nb > max_shard) { n_shards++; cur = 0; }
        cur += nb;
        total += nb;
        shard_of[n] = n_shards - 1;
        n++;
    }
    kmed_buf_printf(&idx, "{\n  \"metadata\": {\n    \"total_size\": %zu\n  },\n"
                          "  \"weight_map\": {\n", total);
    for (j = 0, i = 0; j < n_shards && r == KMED_OK; j++) {
        size_t first = i, cnt, k;
        kmed_st_writer w;
        while (i < n && shard_of[i] == j) i++;
        cnt = i - first;
        if (n_shards == 1) snprintf(fname, sizeof fname, "model.safetensors");
        else snprintf(fname, sizeof fname, "model-%05zu-of-%05zu.safetensors", j + 1, n_shards);
        if ((r = kmed_path_join(path, sizeof path, dir, fname, err)) != KMED_OK) break;
        if ((r = kmed_st_writer_open(&w, path, ti + first, cnt, mk, mv, 1, err)) != KMED_OK)
            break;
        for (k = first; k < i && r == KMED_OK; k++) {
            unsigned char *buf = (unsigned char *)KMED_MALLOC(ti[k].nbytes ? ti[k].nbytes : 1);
            if (!buf) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory for %s (%zu bytes)",
                              ti[k].name, ti[k].nbytes);
                break;
            }
            r = kmed__mg_one(c, &ti[k], dt, buf, err);
            if (r == KMED_OK) r = kmed_st_writer_put(&w, buf, ti[k].nbytes, err);
            KMED_FREE(buf);
            kmed_progress(cb, "merge", (double)++done, (double)n, "tensors");
            kmed_buf_puts(&idx, "    ");
            kmed_buf_json_str(&idx, ti[k].name, strlen(ti[k].name));
            kmed_buf_puts(&idx, ": ");
            kmed_buf_json_str(&idx, fname, strlen(fname));
            kmed_buf_puts(&idx, k + 1 == n ? "\n" : ",\n");
        }
        if (r == KMED_OK) r = kmed_st_writer_commit(&w, err);
        else kmed_st_writer_abort(&w);
    }
    kmed_buf_puts(&idx, "  }\n}\n");
    if (r == KMED_OK && n_shards > 1) {
        if (idx.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
        else if ((r = kmed_path_join(path, sizeof path, dir, "model.safetensors.index.json",
                                     err)) == KMED_OK)
            r = kmed_file_write_atomic(path, idx.data, idx.len, err);
    }
    for (i = 0; i < 5 && r == KMED_OK; i++)
        r = kmed__mg_copy_file(ref->dir, dir, kmed__mg_side_files[i], err);
    if (r == KMED_OK) r = kmed__mg_write_config(ref->dir, dir, dt, err);
    if (r == KMED_OK)
        kmed_log(cb, KMED_LOG_INFO, "merge: %zu tensors, %.0f MB read, %.0f MB written in "
                 "%.1fs (%.2f GB/s)", n, c->bytes_in / 1e6, (double)total / 1e6,
                 kmed_time_now() - t0,
                 (c->bytes_in + (double)total) / 1e9 / (kmed_time_now() - t0 + 1e-9));
done:
    KMED_FREE(ti);
    KMED_FREE(shard_of);
    kmed_buf_free(&idx);
    return r;
}

/* Removes the temporary HF directory of a GGUF merge. */
static void kmed__mg_rm_tmp(const char *dir)
{
    size_t i;
    kmed__mg_unlink(dir, "model.safetensors");
    kmed__mg_unlink(dir, "config.json");
    for (i = 0; i < 5; i++) kmed__mg_unlink(dir, kmed__mg_side_files[i]);
    rmdir(dir);
}

static kmed_result kmed__mg_write_gguf(kmed__mg_ctx *c, const char *path,
                                       const kmed_merge_out *out, kmed_error *err)
{
    char tmp[1200];
    kmed_dtype mid = out->dtype == KMED_BF16 || out->dtype == KMED_F16 ? out->dtype : KMED_F32;
    kmed_gemma m;
    kmed_tok tok;
    int have_tok = 0;
    kmed_gguf_save_opts go;
    kmed_result r;
    if (snprintf(tmp, sizeof tmp, "%s.merge-tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        return KMED__ERR(err, KMED_ERR_LIMIT, "merge: path too long: %s", path);
    r = kmed__mg_write_hf(c, tmp, mid, 0, &out->cb, err);
    memset(&m, 0, sizeof m);
    if (r == KMED_OK) r = kmed_gemma_load(&m, tmp, NULL, err);
    if (r == KMED_OK && (kmed__mg_has_file(c->ref->dir, "tokenizer.json") ||
                         kmed__mg_has_file(c->ref->dir, "tokenizer.model"))) {
        r = kmed_tok_load(&tok, c->ref->dir, err);
        have_tok = r == KMED_OK;
    }
    if (r == KMED_OK) {
        if (!have_tok)
            kmed_log(&out->cb, KMED_LOG_WARN, "merge: %s has no tokenizer; the GGUF gets no "
                     "tokenizer metadata", c->ref->dir);
        memset(&go, 0, sizeof go);
        go.type = out->dtype;
        go.mixed = out->mixed;
        go.name = out->name ? out->name : "kmed-merge";
        go.tokenizer_json = kmed__mg_has_file(c->ref->dir, "tokenizer.json") ? c->ref->dir
                                                                              : NULL;
        go.cb = out->cb;
        r = kmed_gemma_save_gguf(&m, have_tok ? &tok : NULL, path, &go, err);
    }
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&m);
    kmed__mg_rm_tmp(tmp);
    return r;
}

static int kmed__mg_same_file(const char *a, const char *b)
{
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev &&
           sa.st_ino == sb.st_ino;
}

KMED_API kmed_result kmed_merge_run(const kmed_merge_config *cfg, const char *out_path,
                                    const kmed_merge_out *out, kmed_error *err)
{
    kmed__mg_ctx c;
    kmed_merge_out def;
    unsigned char *skip = NULL;
    size_t i, k;
    kmed_result r;
    int lin;

    if (!out) { memset(&def, 0, sizeof def); out = &def; }
    if (!out_path || !*out_path) return KMED__ERR(err, KMED_ERR_ARG, "merge: no output path");
    if ((r = kmed_merge_config_validate(cfg, err)) != KMED_OK) return r;
    for (i = 0; i < cfg->n_models; i++)
        if (!cfg->models[i].model || !*cfg->models[i].model)
            return KMED__ERR(err, KMED_ERR_ARG, "merge: models[%zu] has no path", i);
    if (out->gguf ? !kmed_dtype_computable(out->dtype)
                  : (out->dtype != KMED_F32 && out->dtype != KMED_BF16 && out->dtype != KMED_F16))
        return KMED__ERR(err, KMED_ERR_UNSUPPORTED, "merge: cannot write %s %s",
                         out->gguf ? "GGUF" : "HF", kmed_dtype_name(out->dtype));
    lin = cfg->method == KMED_MERGE_LINEAR;
    memset(&c, 0, sizeof c);
    c.cfg = cfg;
    c.srcs = (kmed__mg_src *)kmed__calloc(cfg->n_models + 1, sizeof *c.srcs);
    c.xs = (kmed__mg_src **)kmed__calloc(cfg->n_models + 1, sizeof *c.xs);
    c.rx = (kmed__mg_reader *)kmed__calloc(cfg->n_models + 1, sizeof *c.rx);
    skip = (unsigned char *)kmed__calloc(cfg->n_models + 1, 1);
    if (!c.srcs || !c.xs || !c.rx || !skip) {
        r = KMED__ERR(err, KMED_ERR_NOMEM, "merge: out of memory");
        goto done;
    }
    if (cfg->base_model) {
        if ((r = kmed__mg_src_open(&c.srcs[0], cfg->base_model, NULL, err)) != KMED_OK) {
            c.n_src = 1;
            goto done;
        }
        c.n_src = 1;
    }
    for (i = 0; i < cfg->n_models; i++) {
        const char *bd = c.n_src && !c.srcs[0].adapter[0] ? c.srcs[0].dir : NULL;
        if (!lin && kmed__mg_same_path(cfg->models[i].model, cfg->base_model)) {
            skip[i] = 1; /* mergekit: the base is no task vector of itself */
            continue;
        }
        r = kmed__mg_src_open(&c.srcs[c.n_src], cfg->models[i].model, bd, err);
        c.n_src++;
        if (r != KMED_OK) goto done;
    }
    if ((r = kmed__mg_plan_init(&c.plan, cfg, skip, err)) != KMED_OK) goto done;
    c.ref = &c.srcs[0];
    c.base = lin ? NULL : &c.srcs[0];
    for (i = 0, k = cfg->base_model ? 1 : 0; i < c.plan.n; i++, k++) c.xs[i] = &c.srcs[k];
    if (c.plan.n == 0) {
        r = KMED__ERR(err, KMED_ERR_ARG, "merge: no model besides the base to merge");
        goto done;
    }
    for (i = 0; i < c.n_src; i++) {
        if ((r = kmed__mg_check(c.ref, &c.srcs[i], err)) != KMED_OK) goto done;
        if (!out->gguf && kmed__mg_same_file(out_path, c.srcs[i].dir)) {
            r = KMED__ERR(err, KMED_ERR_ARG, "merge: the output %s is the input %s", out_path,
                          c.srcs[i].spec);
            goto done;
        }
    }
    c.rb.read = kmed__mg_src_read;
    c.rb.ctx = c.base;
    for (i = 0; i < c.plan.n; i++) {
        c.rx[i].read = kmed__mg_src_read;
        c.rx[i].ctx = c.xs[i];
    }
    if ((r = kmed__mg_work_init(&c.wk, &c.plan, err)) != KMED_OK) goto done;
    kmed_log(&out->cb, KMED_LOG_INFO, "merge: %s of %zu model%s%s%s, %zu tensors",
             kmed_merge_method_name(cfg->method), c.plan.n, c.plan.n == 1 ? "" : "s",
             c.base ? " onto " : "", c.base ? cfg->base_model : "", c.ref->st.n_tensors);
    if (out->gguf) r = kmed__mg_write_gguf(&c, out_path, out, err);
    else r = kmed__mg_write_hf(&c, out_path, out->dtype, out->max_shard_bytes, &out->cb, err);
done:
    for (i = 0; i < c.n_src; i++) kmed__mg_src_close(&c.srcs[i]);
    kmed__mg_work_free(&c.wk);
    kmed__mg_plan_free(&c.plan);
    KMED_FREE(c.srcs);
    KMED_FREE(c.xs);
    KMED_FREE(c.rx);
    KMED_FREE(skip);
    return r;
}

#endif
#ifndef KMED_NO_DATA
/* ==== kmed_data: source readers, cleaning, dedup, decontamination, formatting, packing ==== */

#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- Unicode tables (generated from Python's unicodedata; only the C is kept) ---- */

/* Canonical compositions (base, mark, composed), sorted by base then mark: Latin,
   Greek, Cyrillic and kana primary composites from UnicodeData 14.0.0. */
static const uint16_t kmed__data_comp[][3] = {
    {0x41,0x300,0xC0}, {0x41,0x301,0xC1}, {0x41,0x302,0xC2}, {0x41,0x303,0xC3}, {0x41,0x304,0x100},
    {0x41,0x306,0x102}, {0x41,0x307,0x226}, {0x41,0x308,0xC4}, {0x41,0x309,0x1EA2},
    {0x41,0x30A,0xC5}, {0x41,0x30C,0x1CD}, {0x41,0x30F,0x200}, {0x41,0x311,0x202},
    {0x41,0x323,0x1EA0}, {0x41,0x325,0x1E00}, {0x41,0x328,0x104}, {0x42,0x307,0x1E02},
    {0x42,0x323,0x1E04}, {0x42,0x331,0x1E06}, {0x43,0x301,0x106}, {0x43,0x302,0x108},
    {0x43,0x307,0x10A}, {0x43,0x30C,0x10C}, {0x43,0x327,0xC7}, {0x44,0x307,0x1E0A},
    {0x44,0x30C,0x10E}, {0x44,0x323,0x1E0C}, {0x44,0x327,0x1E10}, {0x44,0x32D,0x1E12},
    {0x44,0x331,0x1E0E}, {0x45,0x300,0xC8}, {0x45,0x301,0xC9}, {0x45,0x302,0xCA},
    {0x45,0x303,0x1EBC}, {0x45,0x304,0x112}, {0x45,0x306,0x114}, {0x45,0x307,0x116},
    {0x45,0x308,0xCB}, {0x45,0x309,0x1EBA}, {0x45,0x30C,0x11A}, {0x45,0x30F,0x204},
    {0x45,0x311,0x206}, {0x45,0x323,0x1EB8}, {0x45,0x327,0x228}, {0x45,0x328,0x118},
    {0x45,0x32D,0x1E18}, {0x45,0x330,0x1E1A}, {0x46,0x307,0x1E1E}, {0x47,0x301,0x1F4},
    {0x47,0x302,0x11C}, {0x47,0x304,0x1E20}, {0x47,0x306,0x11E}, {0x47,0x307,0x120},
    {0x47,0x30C,0x1E6}, {0x47,0x327,0x122}, {0x48,0x302,0x124}, {0x48,0x307,0x1E22},
    {0x48,0x308,0x1E26}, {0x48,0x30C,0x21E}, {0x48,0x323,0x1E24}, {0x48,0x327,0x1E28},
    {0x48,0x32E,0x1E2A}, {0x49,0x300,0xCC}, {0x49,0x301,0xCD}, {0x49,0x302,0xCE},
    {0x49,0x303,0x128}, {0x49,0x304,0x12A}, {0x49,0x306,0x12C}, {0x49,0x307,0x130},
    {0x49,0x308,0xCF}, {0x49,0x309,0x1EC8}, {0x49,0x30C,0x1CF}, {0x49,0x30F,0x208},
    {0x49,0x311,0x20A}, {0x49,0x323,0x1ECA}, {0x49,0x328,0x12E}, {0x49,0x330,0x1E2C},
    {0x4A,0x302,0x134}, {0x4B,0x301,0x1E30}, {0x4B,0x30C,0x1E8}, {0x4B,0x323,0x1E32},
    {0x4B,0x327,0x136}, {0x4B,0x331,0x1E34}, {0x4C,0x301,0x139}, {0x4C,0x30C,0x13D},
    {0x4C,0x323,0x1E36}, {0x4C,0x327,0x13B}, {0x4C,0x32D,0x1E3C}, {0x4C,0x331,0x1E3A},
    {0x4D,0x301,0x1E3E}, {0x4D,0x307,0x1E40}, {0x4D,0x323,0x1E42}, {0x4E,0x300,0x1F8},
    {0x4E,0x301,0x143}, {0x4E,0x303,0xD1}, {0x4E,0x307,0x1E44}, {0x4E,0x30C,0x147},
    {0x4E,0x323,0x1E46}, {0x4E,0x327,0x145}, {0x4E,0x32D,0x1E4A}, {0x4E,0x331,0x1E48},
    {0x4F,0x300,0xD2}, {0x4F,0x301,0xD3}, {0x4F,0x302,0xD4}, {0x4F,0x303,0xD5}, {0x4F,0x304,0x14C},
    {0x4F,0x306,0x14E}, {0x4F,0x307,0x22E}, {0x4F,0x308,0xD6}, {0x4F,0x309,0x1ECE},
    {0x4F,0x30B,0x150}, {0x4F,0x30C,0x1D1}, {0x4F,0x30F,0x20C}, {0x4F,0x311,0x20E},
    {0x4F,0x31B,0x1A0}, {0x4F,0x323,0x1ECC}, {0x4F,0x328,0x1EA}, {0x50,0x301,0x1E54},
    {0x50,0x307,0x1E56}, {0x52,0x301,0x154}, {0x52,0x307,0x1E58}, {0x52,0x30C,0x158},
    {0x52,0x30F,0x210}, {0x52,0x311,0x212}, {0x52,0x323,0x1E5A}, {0x52,0x327,0x156},
    {0x52,0x331,0x1E5E}, {0x53,0x301,0x15A}, {0x53,0x302,0x15C}, {0x53,0x307,0x1E60},
    {0x53,0x30C,0x160}, {0x53,0x323,0x1E62}, {0x53,0x326,0x218}, {0x53,0x327,0x15E},
    {0x54,0x307,0x1E6A}, {0x54,0x30C,0x164}, {0x54,0x323,0x1E6C}, {0x54,0x326,0x21A},
    {0x54,0x327,0x162}, {0x54,0x32D,0x1E70}, {0x54,0x331,0x1E6E}, {0x55,0x300,0xD9},
    {0x55,0x301,0xDA}, {0x55,0x302,0xDB}, {0x55,0x303,0x168}, {0x55,0x304,0x16A},
    {0x55,0x306,0x16C}, {0x55,0x308,0xDC}, {0x55,0x309,0x1EE6}, {0x55,0x30A,0x16E},
    {0x55,0x30B,0x170}, {0x55,0x30C,0x1D3}, {0x55,0x30F,0x214}, {0x55,0x311,0x216},
    {0x55,0x31B,0x1AF}, {0x55,0x323,0x1EE4}, {0x55,0x324,0x1E72}, {0x55,0x328,0x172},
    {0x55,0x32D,0x1E76}, {0x55,0x330,0x1E74}, {0x56,0x303,0x1E7C}, {0x56,0x323,0x1E7E},
    {0x57,0x300,0x1E80}, {0x57,0x301,0x1E82}, {0x57,0x302,0x174}, {0x57,0x307,0x1E86},
    {0x57,0x308,0x1E84}, {0x57,0x323,0x1E88}, {0x58,0x307,0x1E8A}, {0x58,0x308,0x1E8C},
    {0x59,0x300,0x1EF2}, {0x59,0x301,0xDD}, {0x59,0x302,0x176}, {0x59,0x303,0x1EF8},
    {0x59,0x304,0x232}, {0x59,0x307,0x1E8E}, {0x59,0x308,0x178}, {0x59,0x309,0x1EF6},
    {0x59,0x323,0x1EF4}, {0x5A,0x301,0x179}, {0x5A,0x302,0x1E90}, {0x5A,0x307,0x17B},
    {0x5A,0x30C,0x17D}, {0x5A,0x323,0x1E92}, {0x5A,0x331,0x1E94}, {0x61,0x300,0xE0},
    {0x61,0x301,0xE1}, {0x61,0x302,0xE2}, {0x61,0x303,0xE3}, {0x61,0x304,0x101},
    {0x61,0x306,0x103}, {0x61,0x307,0x227}, {0x61,0x308,0xE4}, {0x61,0x309,0x1EA3},
    {0x61,0x30A,0xE5}, {0x61,0x30C,0x1CE}, {0x61,0x30F,0x201}, {0x61,0x311,0x203},
    {0x61,0x323,0x1EA1}, {0x61,0x325,0x1E01}, {0x61,0x328,0x105}, {0x62,0x307,0x1E03},
    {0x62,0x323,0x1E05}, {0x62,0x331,0x1E07}, {0x63,0x301,0x107}, {0x63,0x302,0x109},
    {0x63,0x307,0x10B}, {0x63,0x30C,0x10D}, {0x63,0x327,0xE7}, {0x64,0x307,0x1E0B},
    {0x64,0x30C,0x10F}, {0x64,0x323,0x1E0D}, {0x64,0x327,0x1E11}, {0x64,0x32D,0x1E13},
    {0x64,0x331,0x1E0F}, {0x65,0x300,0xE8}, {0x65,0x301,0xE9}, {0x65,0x302,0xEA},
    {0x65,0x303,0x1EBD}, {0x65,0x304,0x113}, {0x65,0x306,0x115}, {0x65,0x307,0x117},
    {0x65,0x308,0xEB}, {0x65,0x309,0x1EBB}, {0x65,0x30C,0x11B}, {0x65,0x30F,0x205},
    {0x65,0x311,0x207}, {0x65,0x323,0x1EB9}, {0x65,0x327,0x229}, {0x65,0x328,0x119},
    {0x65,0x32D,0x1E19}, {0x65,0x330,0x1E1B}, {0x66,0x307,0x1E1F}, {0x67,0x301,0x1F5},
    {0x67,0x302,0x11D}, {0x67,0x304,0x1E21}, {0x67,0x306,0x11F}, {0x67,0x307,0x121},
    {0x67,0x30C,0x1E7}, {0x67,0x327,0x123}, {0x68,0x302,0x125}, {0x68,0x307,0x1E23},
    {0x68,0x308,0x1E27}, {0x68,0x30C,0x21F}, {0x68,0x323,0x1E25}, {0x68,0x327,0x1E29},
    {0x68,0x32E,0x1E2B}, {0x68,0x331,0x1E96}, {0x69,0x300,0xEC}, {0x69,0x301,0xED},
    {0x69,0x302,0xEE}, {0x69,0x303,0x129}, {0x69,0x304,0x12B}, {0x69,0x306,0x12D},
    {0x69,0x308,0xEF}, {0x69,0x309,0x1EC9}, {0x69,0x30C,0x1D0}, {0x69,0x30F,0x209},
    {0x69,0x311,0x20B}, {0x69,0x323,0x1ECB}, {0x69,0x328,0x12F}, {0x69,0x330,0x1E2D},
    {0x6A,0x302,0x135}, {0x6A,0x30C,0x1F0}, {0x6B,0x301,0x1E31}, {0x6B,0x30C,0x1E9},
    {0x6B,0x323,0x1E33}, {0x6B,0x327,0x137}, {0x6B,0x331,0x1E35}, {0x6C,0x301,0x13A},
    {0x6C,0x30C,0x13E}, {0x6C,0x323,0x1E37}, {0x6C,0x327,0x13C}, {0x6C,0x32D,0x1E3D},
    {0x6C,0x331,0x1E3B}, {0x6D,0x301,0x1E3F}, {0x6D,0x307,0x1E41}, {0x6D,0x323,0x1E43},
    {0x6E,0x300,0x1F9}, {0x6E,0x301,0x144}, {0x6E,0x303,0xF1}, {0x6E,0x307,0x1E45},
    {0x6E,0x30C,0x148}, {0x6E,0x323,0x1E47}, {0x6E,0x327,0x146}, {0x6E,0x32D,0x1E4B},
    {0x6E,0x331,0x1E49}, {0x6F,0x300,0xF2}, {0x6F,0x301,0xF3}, {0x6F,0x302,0xF4},
    {0x6F,0x303,0xF5}, {0x6F,0x304,0x14D}, {0x6F,0x306,0x14F}, {0x6F,0x307,0x22F},
    {0x6F,0x308,0xF6}, {0x6F,0x309,0x1ECF}, {0x6F,0x30B,0x151}, {0x6F,0x30C,0x1D2},
    {0x6F,0x30F,0x20D}, {0x6F,0x311,0x20F}, {0x6F,0x31B,0x1A1}, {0x6F,0x323,0x1ECD},
    {0x6F,0x328,0x1EB}, {0x70,0x301,0x1E55}, {0x70,0x307,0x1E57}, {0x72,0x301,0x155},
    {0x72,0x307,0x1E59}, {0x72,0x30C,0x159}, {0x72,0x30F,0x211}, {0x72,0x311,0x213},
    {0x72,0x323,0x1E5B}, {0x72,0x327,0x157}, {0x72,0x331,0x1E5F}, {0x73,0x301,0x15B},
    {0x73,0x302,0x15D}, {0x73,0x307,0x1E61}, {0x73,0x30C,0x161}, {0x73,0x323,0x1E63},
    {0x73,0x326,0x219}, {0x73,0x327,0x15F}, {0x74,0x307,0x1E6B}, {0x74,0x308,0x1E97},
    {0x74,0x30C,0x165}, {0x74,0x323,0x1E6D}, {0x74,0x326,0x21B}, {0x74,0x327,0x163},
    {0x74,0x32D,0x1E71}, {0x74,0x331,0x1E6F}, {0x75,0x300,0xF9}, {0x75,0x301,0xFA},
    {0x75,0x302,0xFB}, {0x75,0x303,0x169}, {0x75,0x304,0x16B}, {0x75,0x306,0x16D},
    {0x75,0x308,0xFC}, {0x75,0x309,0x1EE7}, {0x75,0x30A,0x16F}, {0x75,0x30B,0x171},
    {0x75,0x30C,0x1D4}, {0x75,0x30F,0x215}, {0x75,0x311,0x217}, {0x75,0x31B,0x1B0},
    {0x75,0x323,0x1EE5}, {0x75,0x324,0x1E73}, {0x75,0x328,0x173}, {0x75,0x32D,0x1E77},
    {0x75,0x330,0x1E75}, {0x76,0x303,0x1E7D}, {0x76,0x323,0x1E7F}, {0x77,0x300,0x1E81},
    {0x77,0x301,0x1E83}, {0x77,0x302,0x175}, {0x77,0x307,0x1E87}, {0x77,0x308,0x1E85},
    {0x77,0x30A,0x1E98}, {0x77,0x323,0x1E89}, {0x78,0x307,0x1E8B}, {0x78,0x308,0x1E8D},
    {0x79,0x300,0x1EF3}, {0x79,0x301,0xFD}, {0x79,0x302,0x177}, {0x79,0x303,0x1EF9},
    {0x79,0x304,0x233}, {0x79,0x307,0x1E8F}, {0x79,0x308,0xFF}, {0x79,0x309,0x1EF7},
    {0x79,0x30A,0x1E99}, {0x79,0x323,0x1EF5}, {0x7A,0x301,0x17A}, {0x7A,0x302,0x1E91},
    {0x7A,0x307,0x17C}, {0x7A,0x30C,0x17E}, {0x7A,0x323,0x1E93}, {0x7A,0x331,0x1E95},
    {0xA8,0x301,0x385}, {0xC2,0x300,0x1EA6}, {0xC2,0x301,0x1EA4}, {0xC2,0x303,0x1EAA},
    {0xC2,0x309,0x1EA8}, {0xC4,0x304,0x1DE}, {0xC5,0x301,0x1FA}, {0xC6,0x301,0x1FC},
    {0xC6,0x304,0x1E2}, {0xC7,0x301,0x1E08}, {0xCA,0x300,0x1EC0}, {0xCA,0x301,0x1EBE},
    {0xCA,0x303,0x1EC4}, {0xCA,0x309,0x1EC2}, {0xCF,0x301,0x1E2E}, {0xD4,0x300,0x1ED2},
    {0xD4,0x301,0x1ED0}, {0xD4,0x303,0x1ED6}, {0xD4,0x309,0x1ED4}, {0xD5,0x301,0x1E4C},
    {0xD5,0x304,0x22C}, {0xD5,0x308,0x1E4E}, {0xD6,0x304,0x22A}, {0xD8,0x301,0x1FE},
    {0xDC,0x300,0x1DB}, {0xDC,0x301,0x1D7}, {0xDC,0x304,0x1D5}, {0xDC,0x30C,0x1D9},
    {0xE2,0x300,0x1EA7}, {0xE2,0x301,0x1EA5}, {0xE2,0x303,0x1EAB}, {0xE2,0x309,0x1EA9},
    {0xE4,0x304,0x1DF}, {0xE5,0x301,0x1FB}, {0xE6,0x301,0x1FD}, {0xE6,0x304,0x1E3},
    {0xE7,0x301,0x1E09}, {0xEA,0x300,0x1EC1}, {0xEA,0x301,0x1EBF}, {0xEA,0x303,0x1EC5},
    {0xEA,0x309,0x1EC3}, {0xEF,0x301,0x1E2F}, {0xF4,0x300,0x1ED3}, {0xF4,0x301,0x1ED1},
    {0xF4,0x303,0x1ED7}, {0xF4,0x309,0x1ED5}, {0xF5,0x301,0x1E4D}, {0xF5,0x304,0x22D},
    {0xF5,0x308,0x1E4F}, {0xF6,0x304,0x22B}, {0xF8,0x301,0x1FF}, {0xFC,0x300,0x1DC},
    {0xFC,0x301,0x1D8}, {0xFC,0x304,0x1D6}, {0xFC,0x30C,0x1DA}, {0x102,0x300,0x1EB0},
    {0x102,0x301,0x1EAE}, {0x102,0x303,0x1EB4}, {0x102,0x309,0x1EB2}, {0x103,0x300,0x1EB1},
    {0x103,0x301,0x1EAF}, {0x103,0x303,0x1EB5}, {0x103,0x309,0x1EB3}, {0x112,0x300,0x1E14},
    {0x112,0x301,0x1E16}, {0x113,0x300,0x1E15}, {0x113,0x301,0x1E17}, {0x14C,0x300,0x1E50},
    {0x14C,0x301,0x1E52}, {0x14D,0x300,0x1E51}, {0x14D,0x301,0x1E53}, {0x15A,0x307,0x1E64},
    {0x15B,0x307,0x1E65}, {0x160,0x307,0x1E66}, {0x161,0x307,0x1E67}, {0x168,0x301,0x1E78},
    {0x169,0x301,0x1E79}, {0x16A,0x308,0x1E7A}, {0x16B,0x308,0x1E7B}, {0x17F,0x307,0x1E9B},
    {0x1A0,0x300,0x1EDC}, {0x1A0,0x301,0x1EDA}, {0x1A0,0x303,0x1EE0}, {0x1A0,0x309,0x1EDE},
    {0x1A0,0x323,0x1EE2}, {0x1A1,0x300,0x1EDD}, {0x1A1,0x301,0x1EDB}, {0x1A1,0x303,0x1EE1},
    {0x1A1,0x309,0x1EDF}, {0x1A1,0x323,0x1EE3}, {0x1AF,0x300,0x1EEA}, {0x1AF,0x301,0x1EE8},
    {0x1AF,0x303,0x1EEE}, {0x1AF,0x309,0x1EEC}, {0x1AF,0x323,0x1EF0}, {0x1B0,0x300,0x1EEB},
    {0x1B0,0x301,0x1EE9}, {0x1B0,0x303,0x1EEF}, {0x1B0,0x309,0x1EED}, {0x1B0,0x323,0x1EF1},
    {0x1B7,0x30C,0x1EE}, {0x1EA,0x304,0x1EC}, {0x1EB,0x304,0x1ED}, {0x226,0x304,0x1E0},
    {0x227,0x304,0x1E1}, {0x228,0x306,0x1E1C}, {0x229,0x306,0x1E1D}, {0x22E,0x304,0x230},
    {0x22F,0x304,0x231}, {0x292,0x30C,0x1EF}, {0x391,0x301,0x386}, {0x395,0x301,0x388},
    {0x397,0x301,0x389}, {0x399,0x301,0x38A}, {0x399,0x308,0x3AA}, {0x39F,0x301,0x38C},
    {0x3A5,0x301,0x38E}, {0x3A5,0x308,0x3AB}, {0x3A9,0x301,0x38F}, {0x3B1,0x301,0x3AC},
    {0x3B5,0x301,0x3AD}, {0x3B7,0x301,0x3AE}, {0x3B9,0x301,0x3AF}, {0x3B9,0x308,0x3CA},
    {0x3BF,0x301,0x3CC}, {0x3C5,0x301,0x3CD}, {0x3C5,0x308,0x3CB}, {0x3C9,0x301,0x3CE},
    {0x3CA,0x301,0x390}, {0x3CB,0x301,0x3B0}, {0x3D2,0x301,0x3D3}, {0x3D2,0x308,0x3D4},
    {0x406,0x308,0x407}, {0x410,0x306,0x4D0}, {0x410,0x308,0x4D2}, {0x413,0x301,0x403},
    {0x415,0x300,0x400}, {0x415,0x306,0x4D6}, {0x415,0x308,0x401}, {0x416,0x306,0x4C1},
    {0x416,0x308,0x4DC}, {0x417,0x308,0x4DE}, {0x418,0x300,0x40D}, {0x418,0x304,0x4E2},
    {0x418,0x306,0x419}, {0x418,0x308,0x4E4}, {0x41A,0x301,0x40C}, {0x41E,0x308,0x4E6},
    {0x423,0x304,0x4EE}, {0x423,0x306,0x40E}, {0x423,0x308,0x4F0}, {0x423,0x30B,0x4F2},
    {0x427,0x308,0x4F4}, {0x42B,0x308,0x4F8}, {0x42D,0x308,0x4EC}, {0x430,0x306,0x4D1},
    {0x430,0x308,0x4D3}, {0x433,0x301,0x453}, {0x435,0x300,0x450}, {0x435,0x306,0x4D7},
    {0x435,0x308,0x451}, {0x436,0x306,0x4C2}, {0x436,0x308,0x4DD}, {0x437,0x308,0x4DF},
    {0x438,0x300,0x45D}, {0x438,0x304,0x4E3}, {0x438,0x306,0x439}, {0x438,0x308,0x4E5},
    {0x43A,0x301,0x45C}, {0x43E,0x308,0x4E7}, {0x443,0x304,0x4EF}, {0x443,0x306,0x45E},
    {0x443,0x308,0x4F1}, {0x443,0x30B,0x4F3}, {0x447,0x308,0x4F5}, {0x44B,0x308,0x4F9},
    {0x44D,0x308,0x4ED}, {0x456,0x308,0x457}, {0x474,0x30F,0x476}, {0x475,0x30F,0x477},
    {0x4D8,0x308,0x4DA}, {0x4D9,0x308,0x4DB}, {0x4E8,0x308,0x4EA}, {0x4E9,0x308,0x4EB},
    {0x1E36,0x304,0x1E38}, {0x1E37,0x304,0x1E39}, {0x1E5A,0x304,0x1E5C}, {0x1E5B,0x304,0x1E5D},
    {0x1E62,0x307,0x1E68}, {0x1E63,0x307,0x1E69}, {0x1EA0,0x302,0x1EAC}, {0x1EA0,0x306,0x1EB6},
    {0x1EA1,0x302,0x1EAD}, {0x1EA1,0x306,0x1EB7}, {0x1EB8,0x302,0x1EC6}, {0x1EB9,0x302,0x1EC7},
    {0x1ECC,0x302,0x1ED8}, {0x1ECD,0x302,0x1ED9}, {0x3046,0x3099,0x3094}, {0x304B,0x3099,0x304C},
    {0x304D,0x3099,0x304E}, {0x304F,0x3099,0x3050}, {0x3051,0x3099,0x3052}, {0x3053,0x3099,0x3054},
    {0x3055,0x3099,0x3056}, {0x3057,0x3099,0x3058}, {0x3059,0x3099,0x305A}, {0x305B,0x3099,0x305C},
    {0x305D,0x3099,0x305E}, {0x305F,0x3099,0x3060}, {0x3061,0x3099,0x3062}, {0x3064,0x3099,0x3065},
    {0x3066,0x3099,0x3067}, {0x3068,0x3099,0x3069}, {0x306F,0x3099,0x3070}, {0x306F,0x309A,0x3071},
    {0x3072,0x3099,0x3073}, {0x3072,0x309A,0x3074}, {0x3075,0x3099,0x3076}, {0x3075,0x309A,0x3077},
    {0x3078,0x3099,0x3079}, {0x3078,0x309A,0x307A}, {0x307B,0x3099,0x307C}, {0x307B,0x309A,0x307D},
    {0x309D,0x3099,0x309E}, {0x30A6,0x3099,0x30F4}, {0x30AB,0x3099,0x30AC}, {0x30AD,0x3099,0x30AE},
    {0x30AF,0x3099,0x30B0}, {0x30B1,0x3099,0x30B2}, {0x30B3,0x3099,0x30B4}, {0x30B5,0x3099,0x30B6},
    {0x30B7,0x3099,0x30B8}, {0x30B9,0x3099,0x30BA}, {0x30BB,0x3099,0x30BC}, {0x30BD,0x3099,0x30BE},
    {0x30BF,0x3099,0x30C0}, {0x30C1,0x3099,0x30C2}, {0x30C4,0x3099,0x30C5}, {0x30C6,0x3099,0x30C7},
    {0x30C8,0x3099,0x30C9}, {0x30CF,0x3099,0x30D0}, {0x30CF,0x309A,0x30D1}, {0x30D2,0x3099,0x30D3},
    {0x30D2,0x309A,0x30D4}, {0x30D5,0x3099,0x30D6}, {0x30D5,0x309A,0x30D7}, {0x30D8,0x3099,0x30D9},
    {0x30D8,0x309A,0x30DA}, {0x30DB,0x3099,0x30DC}, {0x30DB,0x309A,0x30DD}, {0x30EF,0x3099,0x30F7},
    {0x30F0,0x3099,0x30F8}, {0x30F1,0x3099,0x30F9}, {0x30F2,0x3099,0x30FA}, {0x30FD,0x3099,0x30FE},
};
/* Canonical singletons outside the CJK compatibility block (from, to). */
static const uint16_t kmed__data_single[][2] = {
    {0x340,0x300}, {0x341,0x301}, {0x343,0x313}, {0x374,0x2B9}, {0x37E,0x3B}, {0x387,0xB7},
    {0x1F71,0x3AC}, {0x1F73,0x3AD}, {0x1F75,0x3AE}, {0x1F77,0x3AF}, {0x1F79,0x3CC}, {0x1F7B,0x3CD},
    {0x1F7D,0x3CE}, {0x1FBB,0x386}, {0x1FBE,0x3B9}, {0x1FC9,0x388}, {0x1FCB,0x389}, {0x1FD3,0x390},
    {0x1FDB,0x38A}, {0x1FE3,0x3B0}, {0x1FEB,0x38E}, {0x1FEE,0x385}, {0x1FEF,0x60}, {0x1FF9,0x38C},
    {0x1FFB,0x38F}, {0x1FFD,0xB4}, {0x2000,0x2002}, {0x2001,0x2003}, {0x2126,0x3A9}, {0x212A,0x4B},
    {0x212B,0xC5}, {0x2329,0x3008}, {0x232A,0x3009},
};
/* CJK compatibility ideographs U+F900..U+FAD9 -> unified ideograph (0: none). */
static const uint32_t kmed__data_cjk_compat[0x1DA] = {
    0x8C48, 0x66F4, 0x8ECA, 0x8CC8, 0x6ED1, 0x4E32, 0x53E5, 0x9F9C, 0x9F9C, 0x5951, 0x91D1, 0x5587,
    0x5948, 0x61F6, 0x7669, 0x7F85, 0x863F, 0x87BA, 0x88F8, 0x908F, 0x6A02, 0x6D1B, 0x70D9, 0x73DE,
    0x843D, 0x916A, 0x99F1, 0x4E82, 0x5375, 0x6B04, 0x721B, 0x862D, 0x9E1E, 0x5D50, 0x6FEB, 0x85CD,
    0x8964, 0x62C9, 0x81D8, 0x881F, 0x5ECA, 0x6717, 0x6D6A, 0x72FC, 0x90CE, 0x4F86, 0x51B7, 0x52DE,
    0x64C4, 0x6AD3, 0x7210, 0x76E7, 0x8001, 0x8606, 0x865C, 0x8DEF, 0x9732, 0x9B6F, 0x9DFA, 0x788C,
    0x797F, 0x7DA0, 0x83C9, 0x9304, 0x9E7F, 0x8AD6, 0x58DF, 0x5F04, 0x7C60, 0x807E, 0x7262, 0x78CA,
    0x8CC2, 0x96F7, 0x58D8, 0x5C62, 0x6A13, 0x6DDA, 0x6F0F, 0x7D2F, 0x7E37, 0x964B, 0x52D2, 0x808B,
    0x51DC, 0x51CC, 0x7A1C, 0x7DBE, 0x83F1, 0x9675, 0x8B80, 0x62CF, 0x6A02, 0x8AFE, 0x4E39, 0x5BE7,
    0x6012, 0x7387, 0x7570, 0x5317, 0x78FB, 0x4FBF, 0x5FA9, 0x4E0D, 0x6CCC, 0x6578, 0x7D22, 0x53C3,
    0x585E, 0x7701, 0x8449, 0x8AAA, 0x6BBA, 0x8FB0, 0x6C88, 0x62FE, 0x82E5, 0x63A0, 0x7565, 0x4EAE,
    0x5169, 0x51C9, 0x6881, 0x7CE7, 0x826F, 0x8AD2, 0x91CF, 0x52F5, 0x5442, 0x5973, 0x5EEC, 0x65C5,
    0x6FFE, 0x792A, 0x95AD, 0x9A6A, 0x9E97, 0x9ECE, 0x529B, 0x66C6, 0x6B77, 0x8F62, 0x5E74, 0x6190,
    0x6200, 0x649A, 0x6F23, 0x7149, 0x7489, 0x79CA, 0x7DF4, 0x806F, 0x8F26, 0x84EE, 0x9023, 0x934A,
    0x5217, 0x52A3, 0x54BD, 0x70C8, 0x88C2, 0x8AAA, 0x5EC9, 0x5FF5, 0x637B, 0x6BAE, 0x7C3E, 0x7375,
    0x4EE4, 0x56F9, 0x5BE7, 0x5DBA, 0x601C, 0x73B2, 0x7469, 0x7F9A, 0x8046, 0x9234, 0x96F6, 0x9748,
    0x9818, 0x4F8B, 0x79AE, 0x91B4, 0x96B8, 0x60E1, 0x4E86, 0x50DA, 0x5BEE, 0x5C3F, 0x6599, 0x6A02,
    0x71CE, 0x7642, 0x84FC, 0x907C, 0x9F8D, 0x6688, 0x962E, 0x5289, 0x677B, 0x67F3, 0x6D41, 0x6E9C,
    0x7409, 0x7559, 0x786B, 0x7D10, 0x985E, 0x516D, 0x622E, 0x9678, 0x502B, 0x5D19, 0x6DEA, 0x8F2A,
    0x5F8B, 0x6144, 0x6817, 0x7387, 0x9686, 0x5229, 0x540F, 0x5C65, 0x6613, 0x674E, 0x68A8, 0x6CE5,
    0x7406, 0x75E2, 0x7F79, 0x88CF, 0x88E1, 0x91CC, 0x96E2, 0x533F, 0x6EBA, 0x541D, 0x71D0, 0x7498,
    0x85FA, 0x96A3, 0x9C57, 0x9E9F, 0x6797, 0x6DCB, 0x81E8, 0x7ACB, 0x7B20, 0x7C92, 0x72C0, 0x7099,
    0x8B58, 0x4EC0, 0x8336, 0x523A, 0x5207, 0x5EA6, 0x62D3, 0x7CD6, 0x5B85, 0x6D1E, 0x66B4, 0x8F3B,
    0x884C, 0x964D, 0x898B, 0x5ED3, 0x5140, 0x55C0, 0x0, 0x0, 0x585A, 0x0, 0x6674, 0x0, 0x0,
    0x51DE, 0x732A, 0x76CA, 0x793C, 0x795E, 0x7965, 0x798F, 0x9756, 0x7CBE, 0x7FBD, 0x0, 0x8612,
    0x0, 0x8AF8, 0x0, 0x0, 0x9038, 0x90FD, 0x0, 0x0, 0x0, 0x98EF, 0x98FC, 0x9928, 0x9DB4, 0x90DE,
    0x96B7, 0x4FAE, 0x50E7, 0x514D, 0x52C9, 0x52E4, 0x5351, 0x559D, 0x5606, 0x5668, 0x5840, 0x58A8,
    0x5C64, 0x5C6E, 0x6094, 0x6168, 0x618E, 0x61F2, 0x654F, 0x65E2, 0x6691, 0x6885, 0x6D77, 0x6E1A,
    0x6F22, 0x716E, 0x722B, 0x7422, 0x7891, 0x793E, 0x7949, 0x7948, 0x7950, 0x7956, 0x795D, 0x798D,
    0x798E, 0x7A40, 0x7A81, 0x7BC0, 0x7DF4, 0x7E09, 0x7E41, 0x7F72, 0x8005, 0x81ED, 0x8279, 0x8279,
    0x8457, 0x8910, 0x8996, 0x8B01, 0x8B39, 0x8CD3, 0x8D08, 0x8FB6, 0x9038, 0x96E3, 0x97FF, 0x983B,
    0x6075, 0x242EE, 0x8218, 0x0, 0x0, 0x4E26, 0x51B5, 0x5168, 0x4F80, 0x5145, 0x5180, 0x52C7,
    0x52FA, 0x559D, 0x5555, 0x5599, 0x55E2, 0x585A, 0x58B3, 0x5944, 0x5954, 0x5A62, 0x5B28, 0x5ED2,
    0x5ED9, 0x5F69, 0x5FAD, 0x60D8, 0x614E, 0x6108, 0x618E, 0x6160, 0x61F2, 0x6234, 0x63C4, 0x641C,
    0x6452, 0x6556, 0x6674, 0x6717, 0x671B, 0x6756, 0x6B79, 0x6BBA, 0x6D41, 0x6EDB, 0x6ECB, 0x6F22,
    0x701E, 0x716E, 0x77A7, 0x7235, 0x72AF, 0x732A, 0x7471, 0x7506, 0x753B, 0x761D, 0x761F, 0x76CA,
    0x76DB, 0x76F4, 0x774A, 0x7740, 0x78CC, 0x7AB1, 0x7BC0, 0x7C7B, 0x7D5B, 0x7DF4, 0x7F3E, 0x8005,
    0x8352, 0x83EF, 0x8779, 0x8941, 0x8986, 0x8996, 0x8ABF, 0x8AF8, 0x8ACB, 0x8B01, 0x8AFE, 0x8AED,
    0x8B39, 0x8B8A, 0x8D08, 0x8F38, 0x9072, 0x9199, 0x9276, 0x967C, 0x96E3, 0x9756, 0x97DB, 0x97FF,
    0x980B, 0x983B, 0x9B12, 0x9F9C, 0x2284A, 0x22844, 0x233D5, 0x3B9D, 0x4018, 0x4039, 0x25249,
    0x25CD0, 0x27ED3, 0x9F43, 0x9F8E,
};
/* Canonical combining classes (first, last, class) for Latin, Greek, Cyrillic, Hebrew,
   combining-mark blocks, Hangul tone marks and kana voicing marks; others read as 0. */
static const uint16_t kmed__data_ccc[][3] = {
    {0x300,0x314,230}, {0x315,0x315,232}, {0x316,0x319,220}, {0x31A,0x31A,232}, {0x31B,0x31B,216},
    {0x31C,0x320,220}, {0x321,0x322,202}, {0x323,0x326,220}, {0x327,0x328,202}, {0x329,0x333,220},
    {0x334,0x338,1}, {0x339,0x33C,220}, {0x33D,0x344,230}, {0x345,0x345,240}, {0x346,0x346,230},
    {0x347,0x349,220}, {0x34A,0x34C,230}, {0x34D,0x34E,220}, {0x350,0x352,230}, {0x353,0x356,220},
    {0x357,0x357,230}, {0x358,0x358,232}, {0x359,0x35A,220}, {0x35B,0x35B,230}, {0x35C,0x35C,233},
    {0x35D,0x35E,234}, {0x35F,0x35F,233}, {0x360,0x361,234}, {0x362,0x362,233}, {0x363,0x36F,230},
    {0x483,0x487,230}, {0x591,0x591,220}, {0x592,0x595,230}, {0x596,0x596,220}, {0x597,0x599,230},
    {0x59A,0x59A,222}, {0x59B,0x59B,220}, {0x59C,0x5A1,230}, {0x5A2,0x5A7,220}, {0x5A8,0x5A9,230},
    {0x5AA,0x5AA,220}, {0x5AB,0x5AC,230}, {0x5AD,0x5AD,222}, {0x5AE,0x5AE,228}, {0x5AF,0x5AF,230},
    {0x5B0,0x5B0,10}, {0x5B1,0x5B1,11}, {0x5B2,0x5B2,12}, {0x5B3,0x5B3,13}, {0x5B4,0x5B4,14},
    {0x5B5,0x5B5,15}, {0x5B6,0x5B6,16}, {0x5B7,0x5B7,17}, {0x5B8,0x5B8,18}, {0x5B9,0x5BA,19},
    {0x5BB,0x5BB,20}, {0x5BC,0x5BC,21}, {0x5BD,0x5BD,22}, {0x5BF,0x5BF,23}, {0x5C1,0x5C1,24},
    {0x5C2,0x5C2,25}, {0x5C4,0x5C4,230}, {0x5C5,0x5C5,220}, {0x5C7,0x5C7,18}, {0x1AB0,0x1AB4,230},
    {0x1AB5,0x1ABA,220}, {0x1ABB,0x1ABC,230}, {0x1ABD,0x1ABD,220}, {0x1ABF,0x1AC0,220},
    {0x1AC1,0x1AC2,230}, {0x1AC3,0x1AC4,220}, {0x1AC5,0x1AC9,230}, {0x1ACA,0x1ACA,220},
    {0x1ACB,0x1ACE,230}, {0x1DC0,0x1DC1,230}, {0x1DC2,0x1DC2,220}, {0x1DC3,0x1DC9,230},
    {0x1DCA,0x1DCA,220}, {0x1DCB,0x1DCC,230}, {0x1DCD,0x1DCD,234}, {0x1DCE,0x1DCE,214},
    {0x1DCF,0x1DCF,220}, {0x1DD0,0x1DD0,202}, {0x1DD1,0x1DF5,230}, {0x1DF6,0x1DF6,232},
    {0x1DF7,0x1DF8,228}, {0x1DF9,0x1DF9,220}, {0x1DFA,0x1DFA,218}, {0x1DFB,0x1DFB,230},
    {0x1DFC,0x1DFC,233}, {0x1DFD,0x1DFD,220}, {0x1DFE,0x1DFE,230}, {0x1DFF,0x1DFF,220},
    {0x20D0,0x20D1,230}, {0x20D2,0x20D3,1}, {0x20D4,0x20D7,230}, {0x20D8,0x20DA,1},
    {0x20DB,0x20DC,230}, {0x20E1,0x20E1,230}, {0x20E5,0x20E6,1}, {0x20E7,0x20E7,230},
    {0x20E8,0x20E8,220}, {0x20E9,0x20E9,230}, {0x20EA,0x20EB,1}, {0x20EC,0x20EF,220},
    {0x20F0,0x20F0,230}, {0x302A,0x302A,218}, {0x302B,0x302B,228}, {0x302C,0x302C,232},
    {0x302D,0x302D,222}, {0x302E,0x302F,224}, {0x3099,0x309A,8}, {0xFE20,0xFE26,230},
    {0xFE27,0xFE2D,220}, {0xFE2E,0xFE2F,230},
};

/* ---- UTF-8 ---- */

/* Decodes one code point at s[*i] (i < n), advancing *i; invalid bytes give U+FFFD and
   advance by one, so every input makes progress. */
static uint32_t kmed__data_utf8_next(const unsigned char *s, size_t n, size_t *i)
{
    size_t k = *i;
    uint32_t c = s[k], cp;
    if (c < 0x80) { *i = k + 1; return c; }
    if (c >= 0xC2 && c <= 0xDF && k + 1 < n && (s[k + 1] & 0xC0) == 0x80) {
        *i = k + 2;
        return ((c & 0x1F) << 6) | (s[k + 1] & 0x3F);
    }
    if (c >= 0xE0 && c <= 0xEF && k + 2 < n && (s[k + 1] & 0xC0) == 0x80 &&
        (s[k + 2] & 0xC0) == 0x80) {
        cp = ((c & 0x0F) << 12) | ((uint32_t)(s[k + 1] & 0x3F) << 6) | (s[k + 2] & 0x3F);
        if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) { *i = k + 3; return cp; }
    }
    if (c >= 0xF0 && c <= 0xF4 && k + 3 < n && (s[k + 1] & 0xC0) == 0x80 &&
        (s[k + 2] & 0xC0) == 0x80 && (s[k + 3] & 0xC0) == 0x80) {
        cp = ((c & 0x07) << 18) | ((uint32_t)(s[k + 1] & 0x3F) << 12) |
             ((uint32_t)(s[k + 2] & 0x3F) << 6) | (s[k + 3] & 0x3F);
        if (cp >= 0x10000 && cp <= 0x10FFFF) { *i = k + 4; return cp; }
    }
    *i = k + 1;
    return 0xFFFD;
}

static void kmed__data_put_cp(kmed_buf *b, uint32_t c)
{
    char t[4];
    size_t n;
    if (c < 0x80) { t[0] = (char)c; n = 1; }
    else if (c < 0x800) { t[0] = (char)(0xC0 | (c >> 6)); t[1] = (char)(0x80 | (c & 0x3F)); n = 2; }
    else if (c < 0x10000) {
        t[0] = (char)(0xE0 | (c >> 12)); t[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        t[2] = (char)(0x80 | (c & 0x3F)); n = 3;
    } else {
        t[0] = (char)(0xF0 | (c >> 18)); t[1] = (char)(0x80 | ((c >> 12) & 0x3F));
        t[2] = (char)(0x80 | ((c >> 6) & 0x3F)); t[3] = (char)(0x80 | (c & 0x3F)); n = 4;
    }
    kmed_buf_put(b, t, n);
}

/* ---- NFC ---- */

#define KMED__DATA_SBASE 0xAC00u
#define KMED__DATA_LBASE 0x1100u
#define KMED__DATA_VBASE 0x1161u
#define KMED__DATA_TBASE 0x11A7u
#define KMED__DATA_LCOUNT 19u
#define KMED__DATA_VCOUNT 21u
#define KMED__DATA_TCOUNT 28u
#define KMED__DATA_NCOUNT (KMED__DATA_VCOUNT * KMED__DATA_TCOUNT)
#define KMED__DATA_SCOUNT (KMED__DATA_LCOUNT * KMED__DATA_NCOUNT)

static int kmed__data_ccc_of(uint32_t c)
{
    size_t lo = 0, hi = sizeof kmed__data_ccc / sizeof kmed__data_ccc[0];
    if (c < 0x300 || c > 0xFE2F) return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < kmed__data_ccc[mid][0]) hi = mid;
        else if (c > kmed__data_ccc[mid][1]) lo = mid + 1;
        else return kmed__data_ccc[mid][2];
    }
    return 0;
}

/* Composite of (a, b) from the table, or 0. */
static uint32_t kmed__data_compose_pair(uint32_t a, uint32_t b)
{
    size_t lo = 0, hi = sizeof kmed__data_comp / sizeof kmed__data_comp[0];
    if (a > 0xFFFF || b > 0xFFFF) return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        uint32_t ka = kmed__data_comp[mid][0], kb = kmed__data_comp[mid][1];
        if (a < ka || (a == ka && b < kb)) hi = mid;
        else if (a > ka || b > kb) lo = mid + 1;
        else return kmed__data_comp[mid][2];
    }
    return 0;
}

/* The (base, mark) a composite splits into, by a scan of the table (rare: only runs when
   a composite is followed by a combining mark). */
static int kmed__data_decompose_pair(uint32_t c, uint32_t *a, uint32_t *b)
{
    size_t i, n = sizeof kmed__data_comp / sizeof kmed__data_comp[0];
    for (i = 0; i < n; i++)
        if (kmed__data_comp[i][2] == c) {
            *a = kmed__data_comp[i][0];
            *b = kmed__data_comp[i][1];
            return 1;
        }
    return 0;
}

static uint32_t kmed__data_singleton(uint32_t c)
{
    size_t i, n = sizeof kmed__data_single / sizeof kmed__data_single[0];
    if (c >= 0xF900 && c <= 0xFAD9) {
        uint32_t m = kmed__data_cjk_compat[c - 0xF900];
        return m ? m : c;
    }
    if (c < 0x340 || c > 0x232A) return c;
    for (i = 0; i < n; i++)
        if (kmed__data_single[i][0] == c) return kmed__data_single[i][1];
    return c;
}

/* 1 if c may change under NFC in context: combining marks, medial/final jamo, singletons,
   and U+0344. Text without any such code point is already NFC (the fast path). */
static int kmed__data_nfc_special(uint32_t c)
{
    if (c < 0x300) return 0;
    if (c >= 0xAC00 && c < 0xF900) return 0;
    if (c >= 0x1161 && c <= 0x11C2) return 1;
    if (c >= 0xF900 && c <= 0xFAD9) return kmed__data_cjk_compat[c - 0xF900] != 0;
    if (kmed__data_ccc_of(c)) return 1;
    if (c == 0x344 || kmed__data_singleton(c) != c) return 1;
    /* second halves of compositions with class 0: kana voicing handled by ccc; Cyrillic,
       Greek and Latin marks are all in the ccc table */
    return 0;
}

/* Appends the full canonical decomposition of c (table composites only) to cps. */
static void kmed__data_decompose(uint32_t c, uint32_t *cps, size_t *n, size_t cap)
{
    uint32_t a, b;
    c = kmed__data_singleton(c);
    if (c == 0x344) {
        if (*n + 2 <= cap) { cps[(*n)++] = 0x308; cps[(*n)++] = 0x301; }
        return;
    }
    if (c >= 0xC0 && c < 0x3100 && kmed__data_decompose_pair(c, &a, &b)) {
        kmed__data_decompose(a, cps, n, cap);
        if (*n < cap) cps[(*n)++] = b;
        return;
    }
    if (*n < cap) cps[(*n)++] = c;
}

/* Normalises one segment cps[0..n) in place (canonical order, then composition); returns
   the new length. */
static size_t kmed__data_compose(uint32_t *cps, size_t n)
{
    size_t i, j, starter = 0, out;
    int last_ccc;
    if (n == 0) return 0;
    /* canonical ordering: stable insertion sort of each run of non-zero classes */
    for (i = 1; i < n; i++) {
        int ci = kmed__data_ccc_of(cps[i]);
        if (!ci) continue;
        j = i;
        while (j > 0) {
            int cj = kmed__data_ccc_of(cps[j - 1]);
            uint32_t t;
            if (!cj || cj <= ci) break;
            t = cps[j]; cps[j] = cps[j - 1]; cps[j - 1] = t;
            j--;
        }
    }
    /* composition with blocking (UAX #15): a mark composes with the last starter unless
       a mark of the same or higher class sits between them */
    out = 1;
    last_ccc = kmed__data_ccc_of(cps[0]) ? 256 : 0;
    starter = 0;
    if (last_ccc) starter = (size_t)-1;
    for (i = 1; i < n; i++) {
        uint32_t c = cps[i], comp = 0;
        int cc = kmed__data_ccc_of(c);
        if (starter != (size_t)-1) {
            uint32_t s = cps[starter];
            int blocked = out - 1 != starter && (last_ccc == 0 || last_ccc >= cc);
            if (!blocked) {
                if (s >= KMED__DATA_LBASE && s < KMED__DATA_LBASE + KMED__DATA_LCOUNT &&
                    c >= KMED__DATA_VBASE && c < KMED__DATA_VBASE + KMED__DATA_VCOUNT)
                    comp = KMED__DATA_SBASE + ((s - KMED__DATA_LBASE) * KMED__DATA_VCOUNT +
                                               (c - KMED__DATA_VBASE)) * KMED__DATA_TCOUNT;
                else if (s >= KMED__DATA_SBASE && s < KMED__DATA_SBASE + KMED__DATA_SCOUNT &&
                         (s - KMED__DATA_SBASE) % KMED__DATA_TCOUNT == 0 &&
                         c > KMED__DATA_TBASE && c < KMED__DATA_TBASE + KMED__DATA_TCOUNT)
                    comp = s + (c - KMED__DATA_TBASE);
                else
                    comp = kmed__data_compose_pair(s, c);
            }
        }
        if (comp) {
            cps[starter] = comp;
            continue;
        }
        if (cc == 0) { starter = out; last_ccc = 0; }
        else last_ccc = cc;
        cps[out++] = c;
    }
    return out;
}

/* Length of the run at u[i] of ASCII and precomposed Hangul syllables (U+AC00..U+D7FF,
   the bulk of Korean text), which no normalisation or clean-up step changes. */
static size_t kmed__data_plain_run(const unsigned char *u, size_t n, size_t i)
{
    size_t s = i;
    while (i < n) {
        unsigned c = u[i];
        if (c > 0x20 && c < 0x7F) { i++; continue; }
        if (c >= 0xEA && c <= 0xED && i + 2 < n && (u[i + 1] & 0xC0) == 0x80 &&
            (u[i + 2] & 0xC0) == 0x80 && (c != 0xED || u[i + 1] < 0xA0)) {
            i += 3;
            continue;
        }
        break;
    }
    return i - s;
}

/* Offset of the first code point that NFC might change (n if none). */
static size_t kmed__data_nfc_quick(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t at = i;
        uint32_t c;
        i += kmed__data_plain_run(u, n, i);
        if (i >= n) break;
        if (u[i] < 0x80) { i++; continue; }
        at = i;
        c = kmed__data_utf8_next(u, n, &i);
        if (c == 0xFFFD ? i - at != 3 : kmed__data_nfc_special(c)) return at;
    }
    return n;
}

KMED_API void kmed_data_nfc(kmed_buf *out, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = kmed__data_nfc_quick(s, n), run = 0, seg_cap = 0;
    uint32_t *seg = NULL;
    /* fast path: copy runs that need no change; only code points >= U+0300 can change */
    while (i < n) {
        size_t at = i, k, nseg;
        uint32_t c;
        if (u[i] < 0x80) { i++; continue; }
        c = kmed__data_utf8_next(u, n, &i);
        if (c != 0xFFFD && !kmed__data_nfc_special(c)) continue;
        if (c == 0xFFFD && i - at == 3) continue; /* a real U+FFFD stays */
        if (c == 0xFFFD) { /* an invalid byte: write the replacement character */
            kmed_buf_put(out, s + run, at - run);
            kmed__data_put_cp(out, 0xFFFD);
            run = i;
            continue;
        }
        /* back up to the last starter before `at` (a code point starting at an earlier
           byte whose class is 0 and which is not a medial/final jamo) */
        k = at;
        while (k > run) {
            size_t p = k - 1, q;
            uint32_t pc;
            while (p > run && (u[p] & 0xC0) == 0x80) p--;
            q = p;
            pc = kmed__data_utf8_next(u, n, &q);
            k = p;
            if (!kmed__data_ccc_of(pc) && !(pc >= 0x1161 && pc <= 0x11C2)) break;
        }
        /* the segment runs to the next code point that is a plain starter */
        {
            size_t e = i;
            while (e < n) {
                size_t q = e;
                uint32_t nc = kmed__data_utf8_next(u, n, &q);
                if (!kmed__data_nfc_special(nc) || nc == 0xFFFD) break;
                e = q;
            }
            /* decompose [k, e) into code points */
            if (seg_cap < (e - k) * 3 + 8) {
                uint32_t *ns;
                seg_cap = (e - k) * 3 + 8;
                ns = (uint32_t *)KMED_REALLOC(seg, seg_cap * sizeof *seg);
                if (!ns) { out->failed = 1; KMED_FREE(seg); return; }
                seg = ns;
            }
            nseg = 0;
            {
                size_t q = k;
                while (q < e) {
                    uint32_t dc = kmed__data_utf8_next(u, n, &q);
                    kmed__data_decompose(dc, seg, &nseg, seg_cap);
                }
            }
            nseg = kmed__data_compose(seg, nseg);
            kmed_buf_put(out, s + run, k - run);
            for (k = 0; k < nseg; k++) kmed__data_put_cp(out, seg[k]);
            run = i = e;
        }
    }
    kmed_buf_put(out, s + run, n - run);
    if (!out->data) kmed_buf_put(out, "", 0);
    KMED_FREE(seg);
}

/* ---- HTML and whitespace clean-up ---- */

static const struct { const char *name; uint16_t cp; } kmed__data_entities[] = {
    {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}, {"nbsp", 0xA0},
    {"middot", 0xB7}, {"hellip", 0x2026}, {"ndash", 0x2013}, {"mdash", 0x2014},
    {"lsquo", 0x2018}, {"rsquo", 0x2019}, {"ldquo", 0x201C}, {"rdquo", 0x201D},
    {"laquo", 0xAB}, {"raquo", 0xBB}, {"bull", 0x2022}, {"deg", 0xB0}, {"plusmn", 0xB1},
    {"times", 0xD7}, {"divide", 0xF7}, {"micro", 0xB5}, {"le", 0x2264}, {"ge", 0x2265},
    {"ne", 0x2260}, {"asymp", 0x2248}, {"larr", 0x2190}, {"rarr", 0x2192}, {"uarr", 0x2191},
    {"darr", 0x2193}, {"harr", 0x2194}, {"copy", 0xA9}, {"reg", 0xAE}, {"trade", 0x2122},
    {"sup1", 0xB9}, {"sup2", 0xB2}, {"sup3", 0xB3}, {"frac12", 0xBD}, {"frac14", 0xBC},
    {"frac34", 0xBE}, {"permil", 0x2030}, {"prime", 0x2032}, {"sect", 0xA7}, {"para", 0xB6},
    {"cent", 0xA2}, {"pound", 0xA3}, {"yen", 0xA5}, {"euro", 0x20AC}, {"shy", 0xAD},
    {"zwj", 0x200D}, {"zwnj", 0x200C}, {"thinsp", 0x2009}, {"ensp", 0x2002},
    {"emsp", 0x2003}, {"alpha", 0x3B1}, {"beta", 0x3B2}, {"gamma", 0x3B3},
    {"delta", 0x3B4}, {"epsilon", 0x3B5}, {"kappa", 0x3BA}, {"lambda", 0x3BB},
    {"mu", 0x3BC}, {"pi", 0x3C0}, {"sigma", 0x3C3}, {"tau", 0x3C4}, {"omega", 0x3C9},
    {"Delta", 0x394}, {"Sigma", 0x3A3}, {"Omega", 0x3A9}, {"infin", 0x221E},
    {"minus", 0x2212}, {"sum", 0x2211}, {"radic", 0x221A}, {"lceil", 0x2308},
    {"rceil", 0x2309}, {"lfloor", 0x230A}, {"rfloor", 0x230B}, {"iexcl", 0xA1},
    {"iquest", 0xBF}, {"eacute", 0xE9}, {"egrave", 0xE8}, {"uuml", 0xFC}, {"ouml", 0xF6},
    {"auml", 0xE4}, {"szlig", 0xDF}, {"ccedil", 0xE7}, {"ntilde", 0xF1}
};

/* Decodes the entity at s[i] == '&' into *cp and returns its length, or 0 if none. */
static size_t kmed__data_entity(const char *s, size_t n, size_t i, uint32_t *cp)
{
    size_t j = i + 1, k;
    if (j < n && s[j] == '#') {
        uint32_t v = 0;
        int hex = 0, digits = 0;
        j++;
        if (j < n && (s[j] == 'x' || s[j] == 'X')) { hex = 1; j++; }
        for (; j < n && digits < 8; j++, digits++) {
            char c = s[j];
            if (c >= '0' && c <= '9') v = v * (hex ? 16 : 10) + (uint32_t)(c - '0');
            else if (hex && c >= 'a' && c <= 'f') v = v * 16 + (uint32_t)(c - 'a' + 10);
            else if (hex && c >= 'A' && c <= 'F') v = v * 16 + (uint32_t)(c - 'A' + 10);
            else break;
        }
        if (!digits || j >= n || s[j] != ';') return 0;
        if (v == 0 || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) v = 0xFFFD;
        *cp = v;
        return j + 1 - i;
    }
    for (k = j; k < n && k - j < 10 && isalnum((unsigned char)s[k]); k++) {}
    if (k >= n || s[k] != ';' || k == j) return 0;
    {
        size_t e, m = k - j;
        for (e = 0; e < sizeof kmed__data_entities / sizeof kmed__data_entities[0]; e++)
            if (strlen(kmed__data_entities[e].name) == m &&
                memcmp(kmed__data_entities[e].name, s + j, m) == 0) {
                *cp = kmed__data_entities[e].cp;
                return k + 1 - i;
            }
    }
    return 0;
}

/* 1 if the tag name at s[j..] (after '<' and an optional '/') is one that breaks a line. */
static int kmed__data_block_tag(const char *s, size_t n, size_t j)
{
    static const char *const tags[] = {"br", "p", "div", "li", "tr", "h1", "h2", "h3", "h4",
                                       "h5", "h6", "ul", "ol", "table", "dt", "dd", "hr"};
    size_t t, k = j;
    while (k < n && isalnum((unsigned char)s[k])) k++;
    for (t = 0; t < sizeof tags / sizeof tags[0]; t++) {
        size_t m = strlen(tags[t]), q;
        if (m != k - j) continue;
        for (q = 0; q < m && tolower((unsigned char)s[j + q]) == tags[t][q]; q++) {}
        if (q == m) return 1;
    }
    return 0;
}

/* Tags out (when strip), entities decoded. A '<' not followed by a letter, '/' or '!'
   is text ("혈압 < 140"). */
static void kmed__data_html(kmed_buf *out, const char *s, size_t n, int strip)
{
    size_t i = 0, run = 0;
    while (i < n) {
        char c = s[i];
        if (c == '&') {
            uint32_t cp;
            size_t m = kmed__data_entity(s, n, i, &cp);
            if (m) {
                kmed_buf_put(out, s + run, i - run);
                kmed__data_put_cp(out, cp);
                i += m;
                run = i;
                continue;
            }
        } else if (c == '<' && strip && i + 1 < n &&
                   (isalpha((unsigned char)s[i + 1]) || s[i + 1] == '/' || s[i + 1] == '!')) {
            size_t j = i + 1, e;
            int slash = s[j] == '/';
            const char *end = "";
            if (s[j] == '!' && j + 2 < n && s[j + 1] == '-' && s[j + 2] == '-') end = "-->";
            for (e = j; e < n; e++) {
                if (*end ? (e + 2 < n && memcmp(s + e, end, 3) == 0) : s[e] == '>') break;
                if (!*end && s[e] == '<') break; /* "<a <b>": the first was not a tag */
            }
            if (e < n && (*end || s[e] == '>')) {
                size_t close = e + (*end ? 3 : 1);
                kmed_buf_put(out, s + run, i - run);
                /* block tags break lines; adjacent ones ("</p><br>") give one break */
                if (kmed__data_block_tag(s, n, j + slash) &&
                    !(out->len && out->data[out->len - 1] == '\n'))
                    kmed_buf_put(out, "\n", 1);
                /* script and style bodies are not text */
                if (!slash && (kmed__data_block_tag(s, n, j) == 0) &&
                    ((n - j >= 6 && strncmp(s + j, "script", 6) == 0) ||
                     (n - j >= 5 && strncmp(s + j, "style", 5) == 0))) {
                    const char *tag = s[j + 1] == 'c' ? "</script>" : "</style>";
                    size_t tl = strlen(tag), q;
                    for (q = close; q + tl <= n && strncmp(s + q, tag, tl) != 0; q++) {}
                    close = q + tl <= n ? q + tl : n;
                }
                i = run = close;
                continue;
            }
        }
        i++;
    }
    kmed_buf_put(out, s + run, n - run);
}

/* Emits the whitespace pending before the next kept character: one blank line at most,
   nothing at the start of the text. */
static void kmed__data_ws_flush(kmed_buf *out, int any, int *pend_sp, int *pend_nl)
{
    if (any) {
        if (*pend_nl) kmed_buf_put(out, "\n\n", *pend_nl > 1 ? 2 : 1);
        else if (*pend_sp) kmed_buf_put(out, " ", 1);
    }
    *pend_sp = *pend_nl = 0;
}

/* Controls, U+FFFD, zero-width and soft hyphen go; Unicode spaces become ' '; "\r\n" and
   "\r" become '\n'; runs collapsed and lines trimmed. */
static void kmed__data_space(kmed_buf *out, const char *s, size_t n, int oneline)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    int pend_sp = 0, pend_nl = 0, any = 0;
    while (i < n) {
        size_t at = i, plain = kmed__data_plain_run(u, n, i);
        uint32_t c;
        int kind = 0; /* 0 keep, 1 space, 2 newline, 3 drop */
        if (plain) {
            kmed__data_ws_flush(out, any, &pend_sp, &pend_nl);
            kmed_buf_put(out, s + at, plain);
            any = 1;
            i += plain;
            continue;
        }
        if (u[i] < 0x80) {
            c = u[i++];
            if (c == ' ') kind = 1;
            else if (c == '\n') kind = 2;
            else if (c == '\r') { kind = 2; if (i < n && u[i] == '\n') i++; }
            else if (c == '\t' || c == '\v' || c == '\f') kind = 1;
            else kind = 3;
        } else {
            c = kmed__data_utf8_next(u, n, &i);
            if (c >= 0x80 && c < 0xA0) kind = 3;                        /* C1 controls */
            else if (c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x202F ||
                     c == 0x205F || c == 0x3000) kind = 1;
            else if (c == 0x2028 || c == 0x2029 || c == 0x85) kind = 2;
            else if (c == 0xFFFD || c == 0xAD || c == 0x200B || c == 0xFEFF || c == 0x2060 ||
                     c == 0x3164 || c == 0xFFA0) kind = 3;
        }
        if (kind == 3) continue;
        if (kind == 1) { pend_sp = 1; continue; }
        if (kind == 2) {
            if (oneline) pend_sp = 1;
            else pend_nl++;
            continue;
        }
        kmed__data_ws_flush(out, any, &pend_sp, &pend_nl);
        kmed_buf_put(out, s + at, i - at);
        any = 1;
    }
    if (!out->data) kmed_buf_put(out, "", 0);
}

KMED_API void kmed_data_clean_text(kmed_buf *out, const char *s, size_t n, int flags)
{
    kmed_buf a = {0}, b = {0};
    const char *p = s;
    size_t pn = n, i;
    int has_markup = 0;
    for (i = 0; i < n; i++)
        if (s[i] == '&' || s[i] == '<') { has_markup = 1; break; }
    if (has_markup) {
        kmed__data_html(&a, s, n, flags & KMED_DATA_CLEAN_HTML);
        if (a.failed) { out->failed = 1; kmed_buf_free(&a); return; }
        p = a.data; pn = a.len;
    }
    if (kmed__data_nfc_quick(p, pn) < pn) { /* most text is NFC already: no copy then */
        kmed_data_nfc(&b, p, pn);
        p = b.data;
        pn = b.len;
    }
    if (b.failed) {
        out->failed = 1;
    } else {
        size_t start = out->len;
        kmed__data_space(out, p, pn, flags & KMED_DATA_CLEAN_ONELINE);
        /* a dropped control or U+FFFD may have parted a base letter from its combining mark:
           compose once more, so that cleaning clean text changes nothing */
        if (!out->failed &&
            kmed__data_nfc_quick(out->data + start, out->len - start) < out->len - start) {
            kmed_buf c = {0};
            kmed_data_nfc(&c, out->data + start, out->len - start);
            out->len = start;
            if (c.failed) out->failed = 1;
            else kmed_buf_put(out, c.data, c.len);
            kmed_buf_free(&c);
        }
    }
    kmed_buf_free(&a);
    kmed_buf_free(&b);
}

static int kmed__data_is_hangul(uint32_t c)
{
    return (c >= 0xAC00 && c <= 0xD7A3) || (c >= 0x1100 && c <= 0x11FF) ||
           (c >= 0x3131 && c <= 0x318E) || (c >= 0xA960 && c <= 0xA97F) ||
           (c >= 0xD7B0 && c <= 0xD7FF);
}

/* Letters of the scripts that medical Korean mixes in (Latin, Greek, Cyrillic, Han, kana). */
static int kmed__data_is_letter(uint32_t c)
{
    if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
    return kmed__data_is_hangul(c) || (c >= 0xC0 && c <= 0x24F && c != 0xD7 && c != 0xF7) ||
           (c >= 0x370 && c <= 0x4FF) || (c >= 0x3040 && c <= 0x30FF) ||
           (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) ||
           (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x1E00 && c <= 0x1FFF);
}

KMED_API double kmed_data_korean_share(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, letters = 0, hangul = 0;
    while (i < n) {
        uint32_t c = kmed__data_utf8_next(u, n, &i);
        if (!kmed__data_is_letter(c)) continue;
        letters++;
        hangul += (size_t)kmed__data_is_hangul(c);
    }
    return letters ? (double)hangul / (double)letters : 1.0;
}

/* ---- kinds, field maps, records ---- */

static const char *const kmed__data_kind_names[KMED_DATA_KIND_N] = {
    "kormedmcqa", "medexpqa", "ultramedical", "cod", "dict"};

KMED_API const char *kmed_data_kind_name(kmed_data_kind k)
{
    return (unsigned)k < KMED_DATA_KIND_N ? kmed__data_kind_names[k] : "?";
}

KMED_API kmed_result kmed_data_kind_parse(const char *s, kmed_data_kind *k, kmed_error *err)
{
    static const struct { const char *name; kmed_data_kind kind; } names[] = {
        {"kormedmcqa", KMED_DATA_MCQA}, {"mcqa", KMED_DATA_MCQA},
        {"medexpqa", KMED_DATA_EXPQA}, {"expqa", KMED_DATA_EXPQA},
        {"ultramedical", KMED_DATA_CONV}, {"conv", KMED_DATA_CONV},
        {"chat", KMED_DATA_CONV}, {"conversations", KMED_DATA_CONV},
        {"cod", KMED_DATA_COD}, {"case", KMED_DATA_COD},
        {"dict", KMED_DATA_DICT}, {"dictionary", KMED_DATA_DICT}, {"asan", KMED_DATA_DICT}};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; i++)
        if (strcmp(s, names[i].name) == 0) { *k = names[i].kind; return KMED_OK; }
    return KMED__ERR(err, KMED_ERR_ARG, "unknown source kind '%s' (expected kormedmcqa, "
                     "medexpqa, ultramedical, cod or dict)", s);
}

/* Canonical field names per kind and the input keys tried for each, '|'-separated. */
typedef struct kmed__data_field { const char *dst, *aliases; } kmed__data_field;

static const kmed__data_field kmed__data_fields_mcqa[] = {
    {"id", "id|uid|qid"}, {"subject", "subject"}, {"year", "year"}, {"period", "period"},
    {"q_number", "q_number|question_number|number"}, {"question", "question|full_question"},
    {"A", "A|a"}, {"B", "B|b"}, {"C", "C|c"}, {"D", "D|d"}, {"E", "E|e"},
    {"answer", "answer|label|answer_idx"}, {"cot", "cot|explanation|rationale"},
    {"subset", "subset|category|exam"}, {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_expqa[] = {
    {"id", "id|qid|uid"}, {"question", "question|full_question|input|query"},
    {"options", "options|choices|answers"},
    {"answer", "correct_option|answer_idx|correct_answer|answer|cop|label"},
    {"explanation", "explanation|full_answer|exp|rationale|explanations"},
    {"lang", "lang|language"}, {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_conv[] = {
    {"id", "id|uid|conversation_id"},
    {"messages", "messages|conversations|conversation|dialogue|turns"},
    {"role", "role|from|speaker"}, {"content", "content|value|text|utterance"},
    {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_cod[] = {
    {"id", "id|case_id|uid"},
    {"case", "case|patient|patient_description|description|presentation|history|question|input"},
    {"symptoms", "symptoms|symptom|chief_complaint|findings"},
    {"diagnosis", "diagnosis|disease|final_diagnosis|answer|output|label"},
    {"explanation", "explanation|reasoning|rationale"},
    {"dialogue", "dialogue|dialog|conversations|messages|turns"},
    {"role", "role|from|speaker"}, {"content", "content|value|text|utterance"},
    {"split", "split"}, {NULL, NULL}};
static const kmed__data_field kmed__data_fields_dict[] = {
    {"id", "id|uid|url"}, {"name", "name|title|disease|disease_name|병명|질환명|질병명"},
    {"sections", "sections|contents|content|body"},
    {"section_title", "title|name|section|heading|key"},
    {"section_text", "content|text|body|value"}, {"split", "split"}, {NULL, NULL}};

static const kmed__data_field *kmed__data_fields(kmed_data_kind k)
{
    switch (k) {
    case KMED_DATA_MCQA: return kmed__data_fields_mcqa;
    case KMED_DATA_EXPQA: return kmed__data_fields_expqa;
    case KMED_DATA_CONV: return kmed__data_fields_conv;
    case KMED_DATA_COD: return kmed__data_fields_cod;
    default: return kmed__data_fields_dict;
    }
}

KMED_API kmed_result kmed_data_source_map(kmed_data_source *src, const char *dst_eq_src,
                                          kmed_error *err)
{
    const char *eq = strchr(dst_eq_src, '=');
    const kmed__data_field *f = kmed__data_fields(src->kind);
    size_t dl, sl, i;
    kmed_buf names = {0};
    if (!eq || eq == dst_eq_src || !eq[1])
        return KMED__ERR(err, KMED_ERR_ARG, "--map '%s': expected dst=src", dst_eq_src);
    dl = (size_t)(eq - dst_eq_src);
    sl = strlen(eq + 1);
    for (i = 0; f[i].dst; i++)
        if (strlen(f[i].dst) == dl && memcmp(f[i].dst, dst_eq_src, dl) == 0) break;
    if (!f[i].dst) {
        kmed_result r;
        for (i = 0; f[i].dst; i++) kmed_buf_printf(&names, "%s%s", i ? ", " : "", f[i].dst);
        r = KMED__ERR(err, KMED_ERR_ARG, "--map '%s': no field '%.*s' in %s (fields: %s)",
                      dst_eq_src, (int)dl, dst_eq_src, kmed_data_kind_name(src->kind),
                      names.data ? names.data : "");
        kmed_buf_free(&names);
        return r;
    }
    if (dl >= sizeof src->map[0].dst || sl >= sizeof src->map[0].src)
        return KMED__ERR(err, KMED_ERR_LIMIT, "--map '%s': name too long", dst_eq_src);
    for (i = 0; i < src->n_map; i++)
        if (strlen(src->map[i].dst) == dl && memcmp(src->map[i].dst, dst_eq_src, dl) == 0) break;
    if (i == src->n_map) {
        if (src->n_map >= KMED_DATA_MAX_MAP)
            return KMED__ERR(err, KMED_ERR_LIMIT, "more than %d --map overrides",
                             KMED_DATA_MAX_MAP);
        src->n_map++;
    }
    memcpy(src->map[i].dst, dst_eq_src, dl);
    src->map[i].dst[dl] = 0;
    memcpy(src->map[i].src, eq + 1, sl + 1);
    return KMED_OK;
}

/* Member at a dotted path ("a.b") of obj. */
static const kmed_json *kmed__data_path(const kmed_json *obj, const char *path, size_t n)
{
    char key[128];
    const char *dot = (const char *)memchr(path, '.', n);
    size_t kl = dot ? (size_t)(dot - path) : n;
    const kmed_json *v;
    if (kl >= sizeof key) return NULL;
    memcpy(key, path, kl);
    key[kl] = 0;
    v = kmed_json_get(obj, key);
    if (v && dot) return kmed__data_path(v, dot + 1, n - kl - 1);
    return v;
}

/* The input value for canonical field dst: the override if one is set, else the first
   preset alias present (and not null). */
static const kmed_json *kmed__data_get(const kmed_json *obj, const kmed_data_source *src,
                                       const char *dst)
{
    const kmed__data_field *f = kmed__data_fields(src->kind);
    const char *a;
    size_t i;
    for (i = 0; i < src->n_map; i++)
        if (strcmp(src->map[i].dst, dst) == 0)
            return kmed__data_path(obj, src->map[i].src, strlen(src->map[i].src));
    for (i = 0; f[i].dst && strcmp(f[i].dst, dst) != 0; i++) {}
    if (!f[i].dst) return NULL;
    for (a = f[i].aliases; *a;) {
        const char *bar = strchr(a, '|');
        size_t al = bar ? (size_t)(bar - a) : strlen(a);
        const kmed_json *v = kmed__data_path(obj, a, al);
        if (v && v->type != KMED_JSON_NULL) return v;
        a += al + (bar ? 1 : 0);
    }
    return NULL;
}

/* Appends the text of a value: strings as they are, numbers by their source text, arrays
   and objects as their members' text, one per line. Returns 1 if anything was added. */
static int kmed__data_text_of(const kmed_json *j, kmed_buf *b)
{
    size_t i, before = b->len;
    if (!j) return 0;
    switch (j->type) {
    case KMED_JSON_STRING: kmed_buf_put(b, j->str, j->len); break;
    case KMED_JSON_NUMBER: kmed_buf_put(b, j->str, j->len); break;
    case KMED_JSON_TRUE: kmed_buf_puts(b, "true"); break;
    case KMED_JSON_FALSE: kmed_buf_puts(b, "false"); break;
    case KMED_JSON_ARRAY:
    case KMED_JSON_OBJECT:
        for (i = 0; i < j->len; i++) {
            size_t at = b->len;
            if (at > before) kmed_buf_put(b, "\n", 1);
            if (!kmed__data_text_of(&j->kids[i], b) && b->len == at + 1) {
                b->len = at;
                if (b->data) b->data[at] = 0;
            }
        }
        break;
    default: break;
    }
    return b->len > before;
}

/* A string that holds JSON (a CSV cell with a list or object) parsed into tmp. */
static const kmed_json *kmed__data_structured(const kmed_json *j, kmed_json_doc *tmp)
{
    size_t i = 0;
    if (!j || j->type != KMED_JSON_STRING) return j;
    while (i < j->len && isspace((unsigned char)j->str[i])) i++;
    if (i == j->len || (j->str[i] != '[' && j->str[i] != '{')) return j;
    kmed_json_free(tmp);
    if (kmed_json_parse(tmp, j->str, j->len, NULL, 0, NULL) != KMED_OK) return j;
    return tmp->root;
}

static char *kmed__data_strdup(const char *s)
{
    return s ? kmed__strndup(s, strlen(s)) : NULL;
}

/* *out = new string with the text of field dst (NULL when absent or empty). */
static kmed_result kmed__data_field_str(const kmed_json *obj, const kmed_data_source *src,
                                        const char *dst, char **out)
{
    kmed_buf b = {0};
    *out = NULL;
    if (!kmed__data_text_of(kmed__data_get(obj, src, dst), &b)) {
        kmed_buf_free(&b);
        return KMED_OK;
    }
    if (b.failed) { kmed_buf_free(&b); return KMED_ERR_NOMEM; }
    *out = b.data;
    return KMED_OK;
}

/* Integer field: a JSON integer or a string holding one; 0 when absent or not integral. */
static int kmed__data_field_int(const kmed_json *j, int *ok)
{
    int64_t v;
    *ok = 0;
    if (!j) return 0;
    if (kmed_json_int(j, &v) && v > -1000000000 && v < 1000000000) { *ok = 1; return (int)v; }
    if (j->type == KMED_JSON_NUMBER && j->num == floor(j->num) && fabs(j->num) < 1e9) {
        *ok = 1;
        return (int)j->num;
    }
    if (j->type == KMED_JSON_STRING) {
        char *end;
        long l;
        const char *s = j->str;
        while (isspace((unsigned char)*s)) s++;
        l = strtol(s, &end, 10);
        while (isspace((unsigned char)*end)) end++;
        if (end != s && !*end && l > -1000000000 && l < 1000000000) { *ok = 1; return (int)l; }
    }
    return 0;
}

KMED_API void kmed_data_record_free(kmed_data_record *rec)
{
    size_t i;
    int k;
    KMED_FREE(rec->id); KMED_FREE(rec->source); KMED_FREE(rec->file);
    KMED_FREE(rec->subset); KMED_FREE(rec->split); KMED_FREE(rec->subject);
    KMED_FREE(rec->lang); KMED_FREE(rec->title); KMED_FREE(rec->question);
    KMED_FREE(rec->symptoms); KMED_FREE(rec->answer_text); KMED_FREE(rec->explanation);
    for (k = 0; k < rec->n_options && k < KMED_DATA_MAX_OPTIONS; k++) KMED_FREE(rec->options[k]);
    for (i = 0; i < rec->n_turns; i++) {
        KMED_FREE(rec->turns[i].key);
        KMED_FREE(rec->turns[i].text);
    }
    for (i = 0; i < rec->n_sections; i++) {
        KMED_FREE(rec->sections[i].key);
        KMED_FREE(rec->sections[i].text);
    }
    KMED_FREE(rec->turns);
    KMED_FREE(rec->sections);
    memset(rec, 0, sizeof *rec);
}

/* Appends (key, text) to a pair list, taking ownership of both (freed on failure). */
static int kmed__data_pair_push(kmed_data_pair **v, size_t *n, char *key, char *text)
{
    kmed_data_pair *nv;
    if (!key || !text) { KMED_FREE(key); KMED_FREE(text); return 0; }
    nv = (kmed_data_pair *)KMED_REALLOC(*v, (*n + 1) * sizeof **v);
    if (!nv) { KMED_FREE(key); KMED_FREE(text); return 0; }
    *v = nv;
    nv[*n].key = key;
    nv[*n].text = text;
    (*n)++;
    return 1;
}

/* "user", "assistant", "system", or NULL for an unknown role. */
static const char *kmed__data_role(const char *r)
{
    static const char *const user[] = {"user", "human", "patient", "client", "prompter",
                                       "question", "환자", "사용자", "USER", "Human", "User"};
    static const char *const bot[] = {"assistant", "gpt", "model", "bot", "doctor", "chatgpt",
                                      "answer", "의사", "ASSISTANT", "Assistant", "GPT",
                                      "Doctor"};
    size_t i;
    if (!r) return NULL;
    for (i = 0; i < sizeof user / sizeof user[0]; i++) if (strcmp(r, user[i]) == 0) return "user";
    for (i = 0; i < sizeof bot / sizeof bot[0]; i++) if (strcmp(r, bot[i]) == 0) return "assistant";
    if (strcmp(r, "system") == 0 || strcmp(r, "System") == 0) return "system";
    return NULL;
}

/* Reads a list of turns into rec->turns as alternating user/assistant, starting with user
   and ending with assistant: system text goes in front of the first user turn, repeated
   roles are merged, leading assistant and trailing user turns are left out. */
static kmed_result kmed__data_turns(kmed_data_record *rec, const kmed_json *list,
                                    const kmed_data_source *src, const char *file, size_t line,
                                    kmed_error *err)
{
    kmed_buf sys = {0};
    size_t i;
    int want_user = 1;
    if (!list || list->type != KMED_JSON_ARRAY)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "expected a list of turns");
    for (i = 0; i < list->len; i++) {
        const kmed_json *t = &list->kids[i];
        const char *role;
        kmed_buf text = {0};
        if (t->type == KMED_JSON_STRING) {
            role = (i % 2) ? "assistant" : "user";
            kmed__data_text_of(t, &text);
        } else if (t->type == KMED_JSON_OBJECT) {
            const kmed_json *rj = kmed__data_get(t, src, "role");
            role = kmed__data_role(kmed_json_str(rj, NULL));
            if (!role) {
                kmed_buf_free(&sys);
                return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                                      "turn %zu: unknown role '%s'", i + 1,
                                      kmed_json_str(rj, "(missing)"));
            }
            kmed__data_text_of(kmed__data_get(t, src, "content"), &text);
        } else {
            kmed_buf_free(&sys);
            return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                                  "turn %zu: expected an object or a string", i + 1);
        }
        if (!text.len) { kmed_buf_free(&text); continue; }
        if (strcmp(role, "system") == 0) {
            if (sys.len) kmed_buf_put(&sys, "\n\n", 2);
            kmed_buf_put(&sys, text.data, text.len);
            kmed_buf_free(&text);
            continue;
        }
        if (rec->n_turns == 0 && strcmp(role, "assistant") == 0) { kmed_buf_free(&text); continue; }
        if (strcmp(role, want_user ? "assistant" : "user") == 0) {
            /* same role as the previous turn: merge */
            kmed_data_pair *p = &rec->turns[rec->n_turns - 1];
            kmed_buf m = {0};
            kmed_buf_puts(&m, p->text);
            kmed_buf_put(&m, "\n\n", 2);
            kmed_buf_put(&m, text.data, text.len);
            kmed_buf_free(&text);
            if (m.failed) { kmed_buf_free(&m); kmed_buf_free(&sys); return KMED_ERR_NOMEM; }
            KMED_FREE(p->text);
            p->text = m.data;
            continue;
        }
        if (want_user && sys.len) {
            kmed_buf m = {0};
            kmed_buf_put(&m, sys.data, sys.len);
            kmed_buf_put(&m, "\n\n", 2);
            kmed_buf_put(&m, text.data, text.len);
            kmed_buf_free(&text);
            text = m;
            kmed_buf_free(&sys);
        }
        if (text.failed || !kmed__data_pair_push(&rec->turns, &rec->n_turns,
                                                 kmed__data_strdup(role), text.data)) {
            kmed_buf_free(&sys);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        want_user = !want_user;
    }
    kmed_buf_free(&sys);
    if (rec->n_turns % 2) { /* trailing user turn without a reply */
        rec->n_turns--;
        KMED_FREE(rec->turns[rec->n_turns].key);
        KMED_FREE(rec->turns[rec->n_turns].text);
    }
    if (rec->n_turns < 2)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "no user turn followed by an assistant turn");
    return KMED_OK;
}

/* Option index (1-based) named by an answer value, given the option keys. */
static int kmed__data_answer(const kmed_json *a, char keys[][16], int n)
{
    int ok, v, i;
    const char *s;
    if (!a) return 0;
    v = kmed__data_field_int(a, &ok);
    if (ok) {
        char t[16];
        snprintf(t, sizeof t, "%d", v);
        for (i = 0; i < n; i++) if (strcmp(keys[i], t) == 0) return i + 1;
        return v >= 1 && v <= n ? v : 0;
    }
    s = kmed_json_str(a, NULL);
    if (!s) return 0;
    while (isspace((unsigned char)*s)) s++;
    for (i = 0; i < n; i++) if (keys[i][0] && strcmp(keys[i], s) == 0) return i + 1;
    if (((*s >= 'A' && *s <= 'J') || (*s >= 'a' && *s <= 'j')) &&
        (!s[1] || s[1] == '.' || s[1] == ')' || isspace((unsigned char)s[1]))) {
        v = (*s | 0x20) - 'a' + 1;
        return v <= n ? v : 0;
    }
    return 0;
}

/* Known section names of an Asan-style entry kept in top-level columns. */
static int kmed__data_section_key(const char *k)
{
    static const char *const en[] = {"definition", "cause", "causes", "symptom", "symptoms",
                                     "diagnosis", "treatment", "course", "prognosis",
                                     "prevention", "complications", "overview"};
    const unsigned char *u = (const unsigned char *)k;
    size_t i = 0, n = strlen(k);
    for (i = 0; i < sizeof en / sizeof en[0]; i++) if (strcmp(k, en[i]) == 0) return 1;
    i = 0;
    while (i < n) if (kmed__data_is_hangul(kmed__data_utf8_next(u, n, &i))) return 1;
    return 0;
}

static kmed_result kmed__data_sections(kmed_data_record *rec, const kmed_json *obj,
                                       const kmed_data_source *src, const char *file,
                                       size_t line, kmed_error *err)
{
    kmed_json_doc tmp = {0};
    const kmed_json *secs = kmed__data_structured(kmed__data_get(obj, src, "sections"), &tmp);
    const kmed_json *name_field = kmed__data_get(obj, src, "name");
    size_t i;
    int oom = 0;
    if (secs && secs->type == KMED_JSON_OBJECT) {
        for (i = 0; i < secs->len && !oom; i++) {
            kmed_buf t = {0};
            if (!kmed__data_text_of(&secs->kids[i], &t)) { kmed_buf_free(&t); continue; }
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections,
                                        kmed__data_strdup(secs->kids[i].key), t.data);
        }
    } else if (secs && secs->type == KMED_JSON_ARRAY) {
        for (i = 0; i < secs->len && !oom; i++) {
            const kmed_json *s = &secs->kids[i];
            kmed_buf k = {0}, t = {0};
            if (s->type == KMED_JSON_OBJECT) {
                kmed__data_text_of(kmed__data_get(s, src, "section_title"), &k);
                kmed__data_text_of(kmed__data_get(s, src, "section_text"), &t);
            } else {
                kmed__data_text_of(s, &t);
            }
            if (!t.len) { kmed_buf_free(&k); kmed_buf_free(&t); continue; }
            if (!k.len) kmed_buf_put(&k, "", 0);
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections, k.data, t.data);
        }
    } else if (secs && secs->type == KMED_JSON_STRING) {
        kmed_buf t = {0};
        kmed__data_text_of(secs, &t);
        oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections, kmed__data_strdup(""),
                                    t.data);
    } else if (!secs && obj->type == KMED_JSON_OBJECT) {
        for (i = 0; i < obj->len && !oom; i++) {
            const kmed_json *v = &obj->kids[i];
            kmed_buf t = {0};
            if (v == name_field || !v->key || !kmed__data_section_key(v->key)) continue;
            if (v->type != KMED_JSON_STRING && v->type != KMED_JSON_ARRAY) continue;
            if (!kmed__data_text_of(v, &t)) { kmed_buf_free(&t); continue; }
            oom = !kmed__data_pair_push(&rec->sections, &rec->n_sections,
                                        kmed__data_strdup(v->key), t.data);
        }
    }
    kmed_json_free(&tmp);
    if (oom) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (!rec->n_sections)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "dictionary entry without sections");
    return KMED_OK;
}

/* subset / split from a file name: "doctor", "nurse", "pharm", "dentist";
   "train", "dev"/"valid", "test", "fewshot". */
static void kmed__data_guess(const char *file, char *subset, char *split)
{
    static const char *const subsets[] = {"doctor", "nurse", "pharm", "dentist"};
    size_t i;
    subset[0] = split[0] = 0;
    for (i = 0; i < 4; i++) if (strstr(file, subsets[i])) { strcpy(subset, subsets[i]); break; }
    if (strstr(file, "fewshot")) strcpy(split, "fewshot");
    else if (strstr(file, "train")) strcpy(split, "train");
    else if (strstr(file, "dev") || strstr(file, "valid")) strcpy(split, "dev");
    else if (strstr(file, "test")) strcpy(split, "test");
}

/* Source name: src->name, else the file name without directory and extension. */
static void kmed__data_source_name(const kmed_data_source *src, char *out, size_t cap)
{
    const char *b = strrchr(src->path, '/'), *dot;
    size_t n;
    if (src->name[0]) { snprintf(out, cap, "%s", src->name); return; }
    b = b ? b + 1 : src->path;
    dot = strrchr(b, '.');
    n = dot && dot != b ? (size_t)(dot - b) : strlen(b);
    if (n >= cap) n = cap - 1;
    memcpy(out, b, n);
    out[n] = 0;
}

static const char *kmed__data_basename(const char *path)
{
    const char *b = strrchr(path, '/');
    return b ? b + 1 : path;
}

KMED_API kmed_result kmed_data_from_json(kmed_data_record *rec, const kmed_json *obj,
                                         const kmed_data_source *src, const char *file,
                                         size_t line, kmed_error *err)
{
    char name[64], gsub[16], gsplit[16];
    kmed_buf id = {0};
    kmed_result r = KMED_OK;
    kmed_json_doc tmp = {0};
    int ok;
    kmed_data_record_free(rec);
    if (!obj || obj->type != KMED_JSON_OBJECT)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                              "expected a JSON object");
    rec->kind = src->kind;
    kmed__data_source_name(src, name, sizeof name);
    rec->source = kmed__data_strdup(name);
    rec->file = kmed__data_strdup(file ? kmed__data_basename(file) : "");
    rec->line = line;
    kmed_buf_printf(&id, "%s:", name);
    if (!kmed__data_text_of(kmed__data_get(obj, src, "id"), &id) || id.len == strlen(name) + 1)
        kmed_buf_printf(&id, "%s:%zu", rec->file ? rec->file : "", line);
    rec->id = id.data;
    if (!rec->source || !rec->file || !rec->id) { r = KMED_ERR_NOMEM; goto fail; }
    if ((r = kmed__data_field_str(obj, src, "split", &rec->split))) goto fail;
    kmed__data_guess(rec->file, gsub, gsplit);
    if (src->split[0]) {
        KMED_FREE(rec->split);
        if (!(rec->split = kmed__data_strdup(src->split))) { r = KMED_ERR_NOMEM; goto fail; }
    } else if (!rec->split && gsplit[0]) {
        if (!(rec->split = kmed__data_strdup(gsplit))) { r = KMED_ERR_NOMEM; goto fail; }
    }

#define KMED__DATA_MISSING(what)                                                          \
    do {                                                                                  \
        r = kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1, "%s", what);     \
        goto fail;                                                                        \
    } while (0)

    switch (src->kind) {
    case KMED_DATA_MCQA: {
        static const char *const letters[] = {"A", "B", "C", "D", "E"};
        char keys[KMED_DATA_MAX_OPTIONS][16];
        int k;
        const kmed_json *ans;
        if ((r = kmed__data_field_str(obj, src, "question", &rec->question))) goto fail;
        if (!rec->question) KMED__DATA_MISSING("missing field 'question'");
        for (k = 0; k < 5; k++) {
            char *o;
            if ((r = kmed__data_field_str(obj, src, letters[k], &o))) goto fail;
            if (!o) break;
            rec->options[rec->n_options] = o;
            snprintf(keys[rec->n_options], 16, "%s", letters[k]);
            rec->n_options++;
        }
        if (rec->n_options < 2) KMED__DATA_MISSING("missing options 'A' and 'B'");
        ans = kmed__data_get(obj, src, "answer");
        if (!ans) KMED__DATA_MISSING("missing field 'answer'");
        rec->answer = kmed__data_answer(ans, keys, rec->n_options);
        if (!rec->answer) {
            kmed_buf t = {0};
            kmed__data_text_of(ans, &t);
            r = kmed_error_set(err, KMED_ERR_FORMAT, file, line, (size_t)-1,
                               "field 'answer': '%.40s' is not an option number 1-%d",
                               t.data ? t.data : "", rec->n_options);
            kmed_buf_free(&t);
            goto fail;
        }
        if ((r = kmed__data_field_str(obj, src, "cot", &rec->explanation))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "subject", &rec->subject))) goto fail;
        rec->year = kmed__data_field_int(kmed__data_get(obj, src, "year"), &ok);
        rec->period = kmed__data_field_int(kmed__data_get(obj, src, "period"), &ok);
        rec->q_number = kmed__data_field_int(kmed__data_get(obj, src, "q_number"), &ok);
        if (src->subset[0]) rec->subset = kmed__data_strdup(src->subset);
        else if ((r = kmed__data_field_str(obj, src, "subset", &rec->subset))) goto fail;
        else if (!rec->subset && gsub[0]) rec->subset = kmed__data_strdup(gsub);
        break;
    }
    case KMED_DATA_EXPQA: {
        char keys[KMED_DATA_MAX_OPTIONS][16];
        const kmed_json *opts, *ans;
        size_t k;
        if ((r = kmed__data_field_str(obj, src, "question", &rec->question))) goto fail;
        if (!rec->question) KMED__DATA_MISSING("missing field 'question'");
        opts = kmed__data_structured(kmed__data_get(obj, src, "options"), &tmp);
        if (!opts || (opts->type != KMED_JSON_OBJECT && opts->type != KMED_JSON_ARRAY))
            KMED__DATA_MISSING("field 'options': expected an object or a list");
        for (k = 0; k < opts->len && rec->n_options < KMED_DATA_MAX_OPTIONS; k++) {
            kmed_buf t = {0};
            if (!kmed__data_text_of(&opts->kids[k], &t)) { kmed_buf_free(&t); continue; }
            if (t.failed) { kmed_buf_free(&t); r = KMED_ERR_NOMEM; goto fail; }
            snprintf(keys[rec->n_options], 16, "%s", opts->kids[k].key ? opts->kids[k].key : "");
            rec->options[rec->n_options++] = t.data;
        }
        if (rec->n_options < 2) KMED__DATA_MISSING("field 'options': fewer than 2 options");
        ans = kmed__data_get(obj, src, "answer");
        if (!ans) KMED__DATA_MISSING("missing field 'answer' (correct option)");
        rec->answer = kmed__data_answer(ans, keys, rec->n_options);
        if (!rec->answer)
            KMED__DATA_MISSING("field 'answer': not one of the options");
        if ((r = kmed__data_field_str(obj, src, "explanation", &rec->explanation))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "lang", &rec->lang))) goto fail;
        break;
    }
    case KMED_DATA_CONV: {
        const kmed_json *msgs = kmed__data_structured(kmed__data_get(obj, src, "messages"), &tmp);
        if (!msgs) KMED__DATA_MISSING("missing field 'messages' (or 'conversations')");
        if ((r = kmed__data_turns(rec, msgs, src, file, line, err))) goto fail_set;
        break;
    }
    case KMED_DATA_COD: {
        const kmed_json *dlg = kmed__data_structured(kmed__data_get(obj, src, "dialogue"), &tmp);
        if ((r = kmed__data_field_str(obj, src, "case", &rec->question))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "symptoms", &rec->symptoms))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "diagnosis", &rec->answer_text))) goto fail;
        if ((r = kmed__data_field_str(obj, src, "explanation", &rec->explanation))) goto fail;
        if (dlg && dlg->type == KMED_JSON_ARRAY) {
            if ((r = kmed__data_turns(rec, dlg, src, file, line, err))) goto fail_set;
        } else {
            if (!rec->question && !rec->symptoms)
                KMED__DATA_MISSING("missing field 'case' (patient description) or 'symptoms'");
            if (!rec->answer_text) KMED__DATA_MISSING("missing field 'diagnosis'");
        }
        break;
    }
    case KMED_DATA_DICT:
    default:
        if ((r = kmed__data_field_str(obj, src, "name", &rec->title))) goto fail;
        if (!rec->title) KMED__DATA_MISSING("missing field 'name' (disease name)");
        if ((r = kmed__data_sections(rec, obj, src, file, line, err))) goto fail_set;
        break;
    }
#undef KMED__DATA_MISSING
    kmed_json_free(&tmp);
    return KMED_OK;
fail:
    if (r == KMED_ERR_NOMEM) KMED__ERR(err, r, "out of memory");
fail_set:
    kmed_json_free(&tmp);
    kmed_data_record_free(rec);
    return r;
}

/* ---- readers ---- */

KMED_API kmed_result kmed_data_open(kmed_data_reader *r, const kmed_data_source *src,
                                    kmed_error *err)
{
    const char *base = kmed__data_basename(src->path);
    const char *ext = strrchr(base, '.');
    kmed_result res;
    memset(r, 0, sizeof *r);
    r->src = src;
    {
        size_t bl = strlen(base);
        if (bl >= sizeof r->file) bl = sizeof r->file - 1;
        memcpy(r->file, base, bl);
        r->file[bl] = 0;
    }
    kmed__data_guess(base, r->subset, r->split);
    if (ext && (strcmp(ext, ".csv") == 0 || strcmp(ext, ".CSV") == 0)) {
        r->fmt_ = 2;
        if ((res = kmed_csv_open(&r->csv_, src->path, err))) return res;
        r->row_kids_ = (kmed_json *)kmed__calloc(r->csv_.n_cols ? r->csv_.n_cols : 1,
                                                 sizeof *r->row_kids_);
        if (!r->row_kids_) {
            kmed_csv_close(&r->csv_);
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        }
        return KMED_OK;
    }
    if (ext && strcmp(ext, ".json") == 0) {
        char *data;
        size_t len, i = 0;
        if ((res = kmed_file_read(src->path, 0, &data, &len, err))) return res;
        while (i < len && isspace((unsigned char)data[i])) i++;
        if (i < len && data[i] == '[') {
            r->fmt_ = 1;
            res = kmed_json_parse(&r->doc_, data, len, src->path, 0, &r->err_);
            kmed_free(data);
            if (res == KMED_OK) r->arr_ = r->doc_.root;
            return KMED_OK; /* a parse error is reported by the first kmed_data_next */
        }
        if (i < len && data[i] == '{') {
            /* one object holding the records in an array member ("data", "rows", ...),
               else one record per line */
            res = kmed_json_parse(&r->doc_, data, len, src->path, 0, NULL);
            if (res == KMED_OK) {
                size_t k;
                const kmed_json *root = r->doc_.root;
                for (k = 0; k < root->len; k++)
                    if (root->kids[k].type == KMED_JSON_ARRAY) break;
                if (k < root->len) {
                    kmed_free(data);
                    r->fmt_ = 1;
                    r->arr_ = &root->kids[k];
                    return KMED_OK;
                }
            }
            kmed_json_free(&r->doc_);
        }
        kmed_free(data);
    }
    r->fmt_ = 0;
    return kmed_jsonl_open(&r->jsonl_, src->path, err);
}

KMED_API kmed_result kmed_data_next(kmed_data_reader *r, kmed_data_record *rec, int *eof,
                                    kmed_error *err)
{
    kmed_result res;
    *eof = 0;
    kmed_data_record_free(rec);
    if (r->done_) { *eof = 1; return KMED_OK; }
    if (r->fmt_ == 0) {
        const kmed_json *v;
        res = kmed_jsonl_next(&r->jsonl_, &v, eof, err);
        if (res || *eof) {
            if (res && err) err->line = r->jsonl_.lines.line;
            return res;
        }
        return kmed_data_from_json(rec, v, r->src, r->src->path, r->jsonl_.lines.line, err);
    }
    if (r->fmt_ == 2) {
        size_t i;
        res = kmed_csv_next(&r->csv_, eof, err);
        if (res || *eof) return res;
        r->row_.type = KMED_JSON_OBJECT;
        r->row_.len = r->csv_.n_cols;
        r->row_.kids = r->row_kids_;
        for (i = 0; i < r->csv_.n_cols; i++) {
            kmed_json *k = &r->row_kids_[i];
            k->type = KMED_JSON_STRING;
            k->str = r->csv_.fields[i].s;
            k->len = r->csv_.fields[i].len;
            k->key = r->csv_.header[i];
            k->key_len = strlen(r->csv_.header[i]);
            /* an empty CSV cell is an absent value, as in the HF exports */
            if (k->len == 0) k->type = KMED_JSON_NULL;
        }
        return kmed_data_from_json(rec, &r->row_, r->src, r->src->path, r->csv_.row_line, err);
    }
    if (!r->arr_) { /* the whole file failed to parse: one malformed record */
        r->done_ = 1;
        if (err) *err = r->err_;
        return r->err_.code ? r->err_.code : KMED_ERR_FORMAT;
    }
    if (r->idx_ >= r->arr_->len) { r->done_ = 1; *eof = 1; return KMED_OK; }
    r->idx_++;
    return kmed_data_from_json(rec, &r->arr_->kids[r->idx_ - 1], r->src, r->src->path,
                               r->idx_, err);
}

KMED_API void kmed_data_close(kmed_data_reader *r)
{
    if (r->fmt_ == 0) kmed_jsonl_close(&r->jsonl_);
    if (r->fmt_ == 2) kmed_csv_close(&r->csv_);
    kmed_json_free(&r->doc_);
    KMED_FREE(r->row_kids_);
    memset(r, 0, sizeof *r);
}

/* ---- hashing and MinHash ---- */

#ifndef KMED_DATA_MAX_PERM
#define KMED_DATA_MAX_PERM 512
#endif

static uint64_t kmed__data_fmix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

KMED_API uint64_t kmed_data_hash64(const void *data, size_t n, uint64_t seed)
{
    const unsigned char *p = (const unsigned char *)data;
    uint64_t h = seed ^ ((uint64_t)n * 0x9e3779b97f4a7c15ull), w;
    while (n >= 8) {
        memcpy(&w, p, 8);
        h ^= w * 0x87c37b91114253d5ull;
        h = ((h << 27) | (h >> 37)) * 0x4cf5ad432745937full + 0x52dce729u;
        p += 8;
        n -= 8;
    }
    if (n) {
        w = 0;
        memcpy(&w, p, n);
        h ^= w * 0x87c37b91114253d5ull;
        h = ((h << 27) | (h >> 37)) * 0x4cf5ad432745937full + 0x52dce729u;
    }
    return kmed__data_fmix(h);
}

/* Code points of s with ASCII lowercased and whitespace runs as one space, into a new
   array (NULL on allocation failure). */
static uint32_t *kmed__data_cps(const char *s, size_t n, size_t *m, int letters_only)
{
    const unsigned char *u = (const unsigned char *)s;
    uint32_t *cps = (uint32_t *)kmed__calloc(n + 1, sizeof *cps);
    size_t i = 0, k = 0;
    if (!cps) return NULL;
    while (i < n) {
        uint32_t c = kmed__data_utf8_next(u, n, &i);
        if (c < 0x80 && c >= 'A' && c <= 'Z') c |= 0x20;
        if (letters_only) {
            if (!kmed__data_is_letter(c) && !(c >= '0' && c <= '9')) continue;
        } else if (c == ' ' || c == '\n' || c == '\t') {
            if (k == 0 || cps[k - 1] == ' ') continue;
            c = ' ';
        }
        cps[k++] = c;
    }
    if (k && cps[k - 1] == ' ') k--;
    *m = k;
    return cps;
}

/* The permutation constants (odd multiplier, offset) of MinHash slot i. */
static void kmed__data_perm(int i, uint64_t *a, uint64_t *b)
{
    uint64_t x = 0x5eed0000u + (uint64_t)i;
    *a = kmed__splitmix64(&x) | 1;
    *b = kmed__splitmix64(&x);
}

KMED_API void kmed_data_minhash(uint32_t *sig, int num_perm, const char *s, size_t n,
                                int ngram)
{
    uint64_t a[KMED_DATA_MAX_PERM], b[KMED_DATA_MAX_PERM];
    size_t m = 0, i, grams;
    uint32_t *cps;
    int p;
    if (num_perm > KMED_DATA_MAX_PERM) num_perm = KMED_DATA_MAX_PERM;
    if (ngram < 1) ngram = 1;
    for (p = 0; p < num_perm; p++) { sig[p] = 0xFFFFFFFFu; kmed__data_perm(p, &a[p], &b[p]); }
    cps = kmed__data_cps(s, n, &m, 0);
    if (!cps) return;
    grams = m >= (size_t)ngram ? m - (size_t)ngram + 1 : (m ? 1 : 0);
    for (i = 0; i < grams; i++) {
        size_t len = m >= (size_t)ngram ? (size_t)ngram : m;
        uint64_t g = kmed_data_hash64(cps + i, len * sizeof *cps, 0x9a1);
        for (p = 0; p < num_perm; p++) {
            uint32_t v = (uint32_t)((a[p] * g + b[p]) >> 32);
            if (v < sig[p]) sig[p] = v;
        }
    }
    KMED_FREE(cps);
}

KMED_API double kmed_data_minhash_sim(const uint32_t *a, const uint32_t *b, int num_perm)
{
    int i, eq = 0;
    for (i = 0; i < num_perm; i++) eq += a[i] == b[i];
    return num_perm > 0 ? (double)eq / num_perm : 0.0;
}

/* ---- hash sets (open addressing, key 0 = empty) ---- */

static int kmed__data_set_grow(uint64_t **keys, uint32_t **vals, size_t *cap, size_t n)
{
    size_t nc, i;
    uint64_t *nk;
    uint32_t *nv;
    if ((n + 1) * 2 <= *cap) return 1;
    nc = *cap ? *cap * 2 : 1024;
    nk = (uint64_t *)kmed__calloc(nc, sizeof *nk);
    nv = (uint32_t *)kmed__calloc(nc, sizeof *nv);
    if (!nk || !nv) { KMED_FREE(nk); KMED_FREE(nv); return 0; }
    for (i = 0; i < *cap; i++) {
        size_t j;
        if (!(*keys)[i]) continue;
        for (j = (size_t)(*keys)[i] & (nc - 1); nk[j]; j = (j + 1) & (nc - 1)) {}
        nk[j] = (*keys)[i];
        nv[j] = (*vals)[i];
    }
    KMED_FREE(*keys);
    KMED_FREE(*vals);
    *keys = nk;
    *vals = nv;
    *cap = nc;
    return 1;
}

/* Slot of key (its own, or the empty one where it would go); cap must be > 0. */
static size_t kmed__data_set_find(const uint64_t *keys, size_t cap, uint64_t key)
{
    size_t j;
    for (j = (size_t)key & (cap - 1); keys[j] && keys[j] != key; j = (j + 1) & (cap - 1)) {}
    return j;
}

/* ---- dedup ---- */

#define KMED__DATA_NONE 0xFFFFFFFFu

KMED_API kmed_result kmed_data_dedup_init(kmed_data_dedup *d, const kmed_data_dedup_config *cfg,
                                          kmed_error *err)
{
    memset(d, 0, sizeof *d);
    if (cfg) d->cfg = *cfg;
    if (d->cfg.threshold <= 0) d->cfg.threshold = 0.8;
    if (d->cfg.ngram <= 0) d->cfg.ngram = 5;
    if (d->cfg.num_perm <= 0) d->cfg.num_perm = 128;
    if (d->cfg.threshold > 1 || d->cfg.num_perm > KMED_DATA_MAX_PERM)
        return KMED__ERR(err, KMED_ERR_ARG, "dedup: threshold must be in (0, 1] and num_perm "
                         "at most %d", KMED_DATA_MAX_PERM);
    if (d->cfg.bands <= 0) {
        /* most rows per band that still makes a pair at the threshold a candidate with
           probability >= 0.9: P = 1 - (1 - t^r)^b */
        int r;
        for (r = d->cfg.num_perm; r >= 1; r--) {
            int b = d->cfg.num_perm / r;
            if (d->cfg.num_perm % r) continue;
            if (1.0 - pow(1.0 - pow(d->cfg.threshold, r), b) >= 0.9) break;
        }
        d->cfg.bands = d->cfg.num_perm / (r < 1 ? 1 : r);
    }
    if (d->cfg.num_perm % d->cfg.bands)
        return KMED__ERR(err, KMED_ERR_ARG, "dedup: bands (%d) must divide num_perm (%d)",
                         d->cfg.bands, d->cfg.num_perm);
    d->rows = d->cfg.num_perm / d->cfg.bands;
    d->sig_tmp = (uint32_t *)kmed__calloc((size_t)d->cfg.num_perm, sizeof *d->sig_tmp);
    if (!d->sig_tmp) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return KMED_OK;
}

KMED_API void kmed_data_dedup_free(kmed_data_dedup *d)
{
    KMED_FREE(d->ex_keys); KMED_FREE(d->ex_vals); KMED_FREE(d->sigs);
    KMED_FREE(d->bk_keys); KMED_FREE(d->bk_head); KMED_FREE(d->bk_next);
    KMED_FREE(d->sig_tmp);
    memset(d, 0, sizeof *d);
}

/* Exact key: the text without whitespace, ASCII lowercased. */
static uint64_t kmed__data_exact_key(const char *s, size_t n)
{
    char chunk[256];
    size_t i, k = 0;
    uint64_t h = 0x3c6ef372fe94f82bull;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') continue;
        if (c >= 'A' && c <= 'Z') c |= 0x20;
        chunk[k++] = c;
        if (k == sizeof chunk) { h = kmed_data_hash64(chunk, k, h); k = 0; }
    }
    h = kmed_data_hash64(chunk, k, h);
    return h ? h : 1;
}

static uint64_t kmed__data_band_key(const uint32_t *sig, int b, int rows)
{
    uint64_t h = kmed_data_hash64(sig + (size_t)b * (size_t)rows, (size_t)rows * sizeof *sig,
                                  (uint64_t)b * 0x9e3779b97f4a7c15ull + 7);
    return h ? h : 1;
}

KMED_API kmed_result kmed_data_dedup_check(kmed_data_dedup *d, const char *s, size_t n,
                                           int add, int *dup, size_t *of, double *sim,
                                           kmed_error *err)
{
    uint64_t ek = 0;
    size_t item;
    int b, nb = d->cfg.bands;
    *dup = 0;
    *of = 0;
    *sim = 0;
    if (!d->cfg.no_exact) {
        ek = kmed__data_exact_key(s, n);
        if (d->ex_cap) {
            size_t j = kmed__data_set_find(d->ex_keys, d->ex_cap, ek);
            if (d->ex_keys[j]) { *dup = 1; *of = d->ex_vals[j]; *sim = 1.0; return KMED_OK; }
        }
    }
    if (!d->cfg.no_near) {
        int checked = 0;
        double best = 0;
        size_t best_item = 0;
        kmed_data_minhash(d->sig_tmp, d->cfg.num_perm, s, n, d->cfg.ngram);
        for (b = 0; b < nb && d->bk_cap; b++) {
            uint64_t key = kmed__data_band_key(d->sig_tmp, b, d->rows);
            size_t j = kmed__data_set_find(d->bk_keys, d->bk_cap, key);
            uint32_t it;
            if (!d->bk_keys[j]) continue;
            /* a bucket can be long when many texts share a band; verifying a bounded
               number keeps the cost per record bounded */
            for (it = d->bk_head[j]; it != KMED__DATA_NONE && checked < 512;
                 it = d->bk_next[(size_t)it * (size_t)nb + (size_t)b]) {
                double e = kmed_data_minhash_sim(d->sig_tmp,
                                                 d->sigs + (size_t)it * (size_t)d->cfg.num_perm,
                                                 d->cfg.num_perm);
                checked++;
                if (e > best) { best = e; best_item = it; }
            }
        }
        if (best >= d->cfg.threshold) {
            *dup = 2;
            *of = best_item;
            *sim = best;
            return KMED_OK;
        }
    }
    if (!add) return KMED_OK;
    item = d->n_items;
    if (item >= KMED__DATA_NONE - 1) return KMED__ERR(err, KMED_ERR_LIMIT, "dedup: too many items");
    if (!d->cfg.no_exact) {
        size_t j;
        if (!kmed__data_set_grow(&d->ex_keys, &d->ex_vals, &d->ex_cap, d->ex_n))
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        j = kmed__data_set_find(d->ex_keys, d->ex_cap, ek);
        d->ex_keys[j] = ek;
        d->ex_vals[j] = (uint32_t)item;
        d->ex_n++;
    }
    if (!d->cfg.no_near) {
        size_t np = (size_t)d->cfg.num_perm;
        if (item >= d->cap_items) {
            size_t nc = d->cap_items ? d->cap_items * 2 : 256;
            uint32_t *ns = (uint32_t *)KMED_REALLOC(d->sigs, nc * np * sizeof *ns);
            uint32_t *nn;
            if (!ns) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            d->sigs = ns;
            nn = (uint32_t *)KMED_REALLOC(d->bk_next, nc * (size_t)nb * sizeof *nn);
            if (!nn) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            d->bk_next = nn;
            d->cap_items = nc;
        }
        memcpy(d->sigs + item * np, d->sig_tmp, np * sizeof *d->sigs);
        for (b = 0; b < nb; b++) {
            uint64_t key = kmed__data_band_key(d->sig_tmp, b, d->rows);
            size_t j;
            if (!kmed__data_set_grow(&d->bk_keys, &d->bk_head, &d->bk_cap, d->bk_n))
                return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            j = kmed__data_set_find(d->bk_keys, d->bk_cap, key);
            if (d->bk_keys[j]) {
                d->bk_next[item * (size_t)nb + (size_t)b] = d->bk_head[j];
            } else {
                d->bk_keys[j] = key;
                d->bk_next[item * (size_t)nb + (size_t)b] = KMED__DATA_NONE;
                d->bk_n++;
            }
            d->bk_head[j] = (uint32_t)item;
        }
    }
    d->n_items++;
    return KMED_OK;
}

/* ---- decontamination ---- */

KMED_API kmed_result kmed_data_decontam_init(kmed_data_decontam *d,
                                             const kmed_data_decontam_config *cfg,
                                             kmed_error *err)
{
    kmed_data_dedup_config dc;
    memset(d, 0, sizeof *d);
    if (cfg) d->cfg = *cfg;
    if (d->cfg.word_n <= 0) d->cfg.word_n = 13;
    if (d->cfg.char_n <= 0) d->cfg.char_n = 50;
    if (d->cfg.threshold <= 0) d->cfg.threshold = 0.8;
    memset(&dc, 0, sizeof dc);
    dc.no_exact = 1;
    dc.threshold = d->cfg.threshold;
    return kmed_data_dedup_init(&d->near, &dc, err);
}

KMED_API void kmed_data_decontam_free(kmed_data_decontam *d)
{
    size_t i;
    for (i = 0; i < d->n_items; i++) KMED_FREE(d->ids[i]);
    KMED_FREE(d->ids);
    KMED_FREE(d->keys);
    KMED_FREE(d->vals);
    kmed_data_dedup_free(&d->near);
    memset(d, 0, sizeof *d);
}

/* Calls fn for the hash of every word n-gram (words: runs of letters and digits) and
   every character n-gram over the Hangul and Han characters. Stops early when fn returns non-zero
   and passes that value on; -1 on allocation failure. */
typedef int (*kmed__data_gram_fn)(kmed_data_decontam *d, uint64_t h, size_t item);
static int kmed__data_grams(kmed_data_decontam *d, const char *s, size_t n, size_t item,
                            kmed__data_gram_fn fn)
{
    size_t m = 0, i, nw = 0, start = 0;
    uint32_t *cps = kmed__data_cps(s, n, &m, 0);
    uint64_t *words;
    int rc = 0;
    if (!cps) return -1;
    words = (uint64_t *)kmed__calloc(m + 1, sizeof *words);
    if (!words) { KMED_FREE(cps); return -1; }
    for (i = 0; i <= m; i++) {
        int w = i < m && (kmed__data_is_letter(cps[i]) || (cps[i] >= '0' && cps[i] <= '9'));
        if (w) continue;
        if (i > start) words[nw++] = kmed_data_hash64(cps + start, (i - start) * 4, 0x77);
        start = i + 1;
    }
    for (i = 0; nw >= (size_t)d->cfg.word_n && i + (size_t)d->cfg.word_n <= nw && !rc; i++)
        rc = fn(d, kmed_data_hash64(words + i, (size_t)d->cfg.word_n * 8, 0x3001) | 1, item);
    /* character n-grams over Hangul and Han characters only: Korean writes long words
       with few spaces, so words are a poor unit; Latin text is covered by word n-grams */
    if (!rc) {
        size_t k = 0;
        for (i = 0; i < m; i++)
            if (kmed__data_is_hangul(cps[i]) || (cps[i] >= 0x4E00 && cps[i] <= 0x9FFF) ||
                (cps[i] >= 0x3400 && cps[i] <= 0x4DBF))
                cps[k++] = cps[i];
        for (i = 0; k >= (size_t)d->cfg.char_n && i + (size_t)d->cfg.char_n <= k && !rc; i++)
            rc = fn(d, kmed_data_hash64(cps + i, (size_t)d->cfg.char_n * 4, 0xC4A2) & ~(uint64_t)1,
                    item);
    }
    KMED_FREE(words);
    KMED_FREE(cps);
    return rc;
}

static int kmed__data_gram_add(kmed_data_decontam *d, uint64_t h, size_t item)
{
    size_t j;
    if (!h) h = 2;
    if (!kmed__data_set_grow(&d->keys, &d->vals, &d->cap, d->n)) return -1;
    j = kmed__data_set_find(d->keys, d->cap, h);
    if (!d->keys[j]) { d->keys[j] = h; d->vals[j] = (uint32_t)item; d->n++; }
    return 0;
}

/* Returns 1 (word) or 2 (char) n-gram hit, storing the item in d->scratch_item_. */
static int kmed__data_gram_hit(kmed_data_decontam *d, uint64_t h, size_t item)
{
    size_t j;
    (void)item;
    if (!h) h = 2;
    if (!d->cap) return 0;
    j = kmed__data_set_find(d->keys, d->cap, h);
    if (!d->keys[j]) return 0;
    d->hit_item_ = d->vals[j];
    return (h & 1) ? 1 : 2;
}

KMED_API kmed_result kmed_data_decontam_add(kmed_data_decontam *d, const char *id,
                                            const char *text, size_t n, const char *question,
                                            size_t qn, kmed_error *err)
{
    int dup;
    size_t of;
    double sim;
    kmed_result r;
    if (d->n_items >= d->cap_items) {
        size_t nc = d->cap_items ? d->cap_items * 2 : 64;
        char **ni = (char **)KMED_REALLOC(d->ids, nc * sizeof *ni);
        if (!ni) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        d->ids = ni;
        d->cap_items = nc;
    }
    d->ids[d->n_items] = kmed__data_strdup(id ? id : "");
    if (!d->ids[d->n_items]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (kmed__data_grams(d, text, n, d->n_items, kmed__data_gram_add) < 0) {
        KMED_FREE(d->ids[d->n_items]);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    /* every eval question goes in the near index (not only the first of a duplicate group)
       so the item reported is the one it resembles */
    if (d->near.n_items != d->n_items) {
        KMED_FREE(d->ids[d->n_items]);
        return KMED__ERR(err, KMED_ERR_STATE, "decontam: index out of step");
    }
    {
        kmed_data_dedup_config keep = d->near.cfg;
        d->near.cfg.threshold = 2.0; /* never a duplicate: always added */
        r = kmed_data_dedup_check(&d->near, question ? question : "", question ? qn : 0, 1,
                                  &dup, &of, &sim, err);
        d->near.cfg = keep;
    }
    if (r) { KMED_FREE(d->ids[d->n_items]); return r; }
    d->n_items++;
    return KMED_OK;
}

KMED_API int kmed_data_decontam_check(kmed_data_decontam *d, const char *text, size_t n,
                                      const char *question, size_t qn, size_t *item,
                                      double *sim)
{
    int rc, dup = 0;
    size_t of = 0;
    *item = 0;
    *sim = 0;
    if (!d->n_items) return 0;
    rc = kmed__data_grams(d, text, n, 0, kmed__data_gram_hit);
    if (rc > 0) { *item = d->hit_item_; *sim = 1.0; return rc; }
    if (question && qn &&
        kmed_data_dedup_check(&d->near, question, qn, 0, &dup, &of, sim, NULL) == KMED_OK &&
        dup == 2) {
        *item = of;
        return 3;
    }
    return 0;
}

/* ---- record cleaning and views ---- */

static kmed_result kmed__data_clean_field(char **f, int flags)
{
    kmed_buf b = {0};
    if (!*f) return KMED_OK;
    kmed_data_clean_text(&b, *f, strlen(*f), flags);
    if (b.failed) { kmed_buf_free(&b); return KMED_ERR_NOMEM; }
    KMED_FREE(*f);
    *f = b.len ? b.data : NULL;
    if (!b.len) kmed_buf_free(&b);
    return KMED_OK;
}

KMED_API kmed_result kmed_data_record_clean(kmed_data_record *rec, int strip_html,
                                            kmed_error *err)
{
    int h = strip_html || rec->kind == KMED_DATA_DICT ? KMED_DATA_CLEAN_HTML : 0;
    int one = h | KMED_DATA_CLEAN_ONELINE;
    size_t i, k;
    int o;
    kmed_result r = KMED_OK;
    char **one_line[] = {&rec->subset, &rec->split, &rec->subject, &rec->lang, &rec->title,
                         &rec->answer_text};
    char **multi[] = {&rec->question, &rec->symptoms, &rec->explanation};
    for (i = 0; i < sizeof one_line / sizeof one_line[0] && !r; i++)
        r = kmed__data_clean_field(one_line[i], one);
    for (i = 0; i < sizeof multi / sizeof multi[0] && !r; i++)
        r = kmed__data_clean_field(multi[i], h);
    for (o = 0; o < rec->n_options && !r; o++) r = kmed__data_clean_field(&rec->options[o], one);
    for (i = 0; i < rec->n_turns && !r; i++) r = kmed__data_clean_field(&rec->turns[i].text, h);
    for (i = k = 0; i < rec->n_sections && !r; i++) {
        r = kmed__data_clean_field(&rec->sections[i].text, h);
        if (!r && rec->sections[i].key && rec->sections[i].key[0])
            r = kmed__data_clean_field(&rec->sections[i].key, one);
        if (r) break;
        if (!rec->sections[i].text) { KMED_FREE(rec->sections[i].key); continue; }
        rec->sections[k++] = rec->sections[i];
    }
    if (r) return KMED__ERR(err, r, "out of memory");
    rec->n_sections = k;
    /* what must survive cleaning for the record to still make sense */
    switch (rec->kind) {
    case KMED_DATA_MCQA:
    case KMED_DATA_EXPQA:
        if (!rec->question) return KMED__ERR(err, KMED_ERR_FORMAT, "question empty after cleaning");
        for (o = 0; o < rec->n_options; o++)
            if (!rec->options[o])
                return KMED__ERR(err, KMED_ERR_FORMAT, "option %c empty after cleaning", 'A' + o);
        break;
    case KMED_DATA_CONV:
    case KMED_DATA_COD:
        for (i = 0; i < rec->n_turns; i++)
            if (!rec->turns[i].text)
                return KMED__ERR(err, KMED_ERR_FORMAT, "turn %zu empty after cleaning", i + 1);
        if (!rec->n_turns && ((!rec->question && !rec->symptoms) || !rec->answer_text))
            return KMED__ERR(err, KMED_ERR_FORMAT, "case or diagnosis empty after cleaning");
        break;
    default:
        if (!rec->title || !rec->n_sections)
            return KMED__ERR(err, KMED_ERR_FORMAT, "name or sections empty after cleaning");
        break;
    }
    return KMED_OK;
}

static void kmed__data_line(kmed_buf *out, const char *s)
{
    if (!s || !*s) return;
    if (out->len) kmed_buf_put(out, "\n", 1);
    kmed_buf_puts(out, s);
}

KMED_API void kmed_data_record_text(const kmed_data_record *rec, kmed_buf *out)
{
    size_t i;
    int o;
    kmed_buf_put(out, "", 0);
    kmed__data_line(out, rec->title);
    kmed__data_line(out, rec->question);
    kmed__data_line(out, rec->symptoms);
    for (o = 0; o < rec->n_options; o++) kmed__data_line(out, rec->options[o]);
    kmed__data_line(out, rec->answer_text);
    kmed__data_line(out, rec->explanation);
    for (i = 0; i < rec->n_turns; i++) kmed__data_line(out, rec->turns[i].text);
    for (i = 0; i < rec->n_sections; i++) {
        kmed__data_line(out, rec->sections[i].key);
        kmed__data_line(out, rec->sections[i].text);
    }
}

KMED_API void kmed_data_record_question(const kmed_data_record *rec, kmed_buf *out)
{
    kmed_buf_put(out, "", 0);
    if (rec->question) kmed_buf_puts(out, rec->question);
    else if (rec->n_turns) kmed_buf_puts(out, rec->turns[0].text);
    else if (rec->symptoms) kmed_buf_puts(out, rec->symptoms);
    else if (rec->title) kmed_buf_puts(out, rec->title);
}

/* ---- harmful-content filter ---- */

static const char *const kmed__data_harm_defaults[][2] = {
    {"self_harm", "자살 방법"}, {"self_harm", "자살하는 방법"}, {"self_harm", "자살하는 법"},
    {"self_harm", "고통 없이 죽는"}, {"self_harm", "죽는 방법"}, {"self_harm", "손목 긋는"},
    {"self_harm", "목 매는 방법"}, {"self_harm", "how to kill myself"},
    {"self_harm", "painless way to die"}, {"self_harm", "how to commit suicide"},
    {"self_harm", "ways to commit suicide"},
    {"drugs", "필로폰 만드는"}, {"drugs", "필로폰 제조"}, {"drugs", "마약 제조법"},
    {"drugs", "마약 만드는 법"}, {"drugs", "마약 만드는 방법"}, {"drugs", "메스암페타민 합성"},
    {"drugs", "메스암페타민 제조"}, {"drugs", "펜타닐 합성"}, {"drugs", "펜타닐 제조"},
    {"drugs", "how to make meth"}, {"drugs", "how to cook meth"},
    {"drugs", "synthesize methamphetamine"}, {"drugs", "methamphetamine synthesis route"},
    {"drugs", "how to make fentanyl"},
    {"dosing", "치사량만큼"}, {"dosing", "치사량을 먹"}, {"dosing", "과다복용하는 방법"},
    {"dosing", "과다복용 방법"}, {"dosing", "들키지 않게 과다복용"},
    {"dosing", "몇 알 먹으면 죽"}, {"dosing", "한꺼번에 먹으면 죽"},
    {"dosing", "overdose on purpose"}, {"dosing", "how many pills to die"},
    {"dosing", "lethal dose to kill"},
    {"abuse", "씨발"}, {"abuse", "시발놈"}, {"abuse", "개새끼"}, {"abuse", "병신새끼"},
    {"abuse", "좆같"}, {"abuse", "미친년"}, {"abuse", "fuck you"}, {"abuse", "motherfucker"}};

/* Whitespace removed, ASCII lowercased (new string). */
static char *kmed__data_squash(const char *s, size_t n)
{
    char *o = (char *)KMED_MALLOC(n + 1);
    size_t i, k = 0;
    if (!o) return NULL;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == ' ' || c == '\n' || c == '\t' || c == '\r') continue;
        o[k++] = (char)(c >= 'A' && c <= 'Z' ? c | 0x20 : c);
    }
    o[k] = 0;
    return o;
}

KMED_API kmed_result kmed_data_safety_init(kmed_data_safety *s, int with_defaults,
                                           kmed_error *err)
{
    size_t i;
    memset(s, 0, sizeof *s);
    if (!with_defaults) return KMED_OK;
    for (i = 0; i < sizeof kmed__data_harm_defaults / sizeof kmed__data_harm_defaults[0]; i++) {
        kmed_result r = kmed_data_safety_add(s, kmed__data_harm_defaults[i][0],
                                             kmed__data_harm_defaults[i][1], err);
        if (r) { kmed_data_safety_free(s); return r; }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_data_safety_add(kmed_data_safety *s, const char *category,
                                          const char *phrase, kmed_error *err)
{
    char *c, *p;
    if (!category || !phrase) return KMED__ERR(err, KMED_ERR_ARG, "safety: NULL phrase");
    p = kmed__data_squash(phrase, strlen(phrase));
    if (p && !*p) { KMED_FREE(p); return KMED__ERR(err, KMED_ERR_ARG, "safety: empty phrase"); }
    c = kmed__data_strdup(category);
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 64;
        char **a = (char **)KMED_REALLOC(s->category, nc * sizeof *a), **b;
        if (a) s->category = a;
        b = a ? (char **)KMED_REALLOC(s->phrase, nc * sizeof *b) : NULL;
        if (b) s->phrase = b;
        if (a && b) s->cap = nc;
    }
    if (!c || !p || s->n == s->cap) {
        KMED_FREE(c);
        KMED_FREE(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    s->category[s->n] = c;
    s->phrase[s->n] = p;
    s->n++;
    return KMED_OK;
}

KMED_API int kmed_data_safety_check(const kmed_data_safety *s, const char *text, size_t n,
                                    const char **category, const char **phrase)
{
    char *sq;
    size_t i, m;
    int hit = 0;
    if (!s || !s->n) return 0;
    sq = kmed__data_squash(text, n);
    if (!sq) return 0;
    m = strlen(sq);
    for (i = 0; i < s->n && !hit; i++) {
        const char *p = s->phrase[i], *q = sq;
        size_t pl = strlen(p);
        while (pl <= m - (size_t)(q - sq) && (q = (const char *)memchr(q, p[0],
                                                   m - (size_t)(q - sq))) != NULL) {
            if (m - (size_t)(q - sq) >= pl && memcmp(q, p, pl) == 0) { hit = 1; break; }
            q++;
        }
        if (hit) {
            if (category) *category = s->category[i];
            if (phrase) *phrase = s->phrase[i];
        }
    }
    KMED_FREE(sq);
    return hit;
}

KMED_API void kmed_data_safety_free(kmed_data_safety *s)
{
    size_t i;
    for (i = 0; i < s->n; i++) { KMED_FREE(s->category[i]); KMED_FREE(s->phrase[i]); }
    KMED_FREE(s->category);
    KMED_FREE(s->phrase);
    memset(s, 0, sizeof *s);
}

KMED_API const char *kmed_data_disclaimer(int korean)
{
    return korean ? "※ 이 답변은 일반적인 의학 정보이며 진단이나 치료를 대신하지 않습니다. "
                    "증상이 있거나 치료가 필요하면 의사 등 의료 전문가와 상담하세요."
                  : "Note: this is general medical information, not a diagnosis or treatment. "
                    "Please see a doctor or other health professional about your symptoms.";
}

/* ---- formatting ---- */

static void kmed__data_json_kv(kmed_buf *b, const char *k, const char *v)
{
    kmed_buf_json_str(b, k, strlen(k));
    kmed_buf_put(b, ":", 1);
    kmed_buf_json_str(b, v ? v : "", v ? strlen(v) : 0);
}

static void kmed__data_head(kmed_buf *b, const kmed_data_record *rec)
{
    kmed_buf_put(b, "{", 1);
    kmed__data_json_kv(b, "id", rec->id);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "source", rec->source);
}

static int kmed__data_is_korean(const char *s)
{
    return s && kmed_data_korean_share(s, strlen(s)) >= 0.3;
}

/* question + "\nA. opt" lines (+ the answer cue for chat examples); in the cloze form the
   question and cue alone. The cue is the one lm-eval's kormedmcqa
   prompt ends with ("정답：", fullwidth colon), so a fine-tuned model answers the
   evaluation's prompt exactly as it was trained to. */
static void kmed__data_mcq_prompt(kmed_buf *b, const kmed_data_record *rec, int cue)
{
    int o;
    kmed_buf_puts(b, rec->question);
    for (o = 0; o < rec->n_options && !rec->cloze; o++) kmed_buf_printf(b, "\n%c. %s", 'A' + o, rec->options[o]);
    if (cue) kmed_buf_puts(b, kmed__data_is_korean(rec->question) ? "\n\xec\xa0\x95\xeb\x8b\xb5\xef\xbc\x9a"
                                                          : "\nAnswer:");
}

static void kmed__data_mcq_answer(kmed_buf *b, const kmed_data_record *rec, int label)
{
    int ko = kmed__data_is_korean(rec->question);
    if (label) kmed_buf_puts(b, ko ? "정답: " : "Answer: ");
    if (rec->cloze) kmed_buf_puts(b, rec->options[rec->answer - 1]);
    else kmed_buf_printf(b, "%c. %s", 'A' + rec->answer - 1, rec->options[rec->answer - 1]);
    if (rec->explanation)
        kmed_buf_printf(b, "\n\n%s%s", label ? (ko ? "해설: " : "Explanation: ") : "",
                        rec->explanation);
}

static void kmed__data_case_prompt(kmed_buf *b, const kmed_data_record *rec, int instr)
{
    int ko = kmed__data_is_korean(rec->question ? rec->question : rec->symptoms);
    if (instr)
        kmed_buf_puts(b, ko ? "다음 환자에게 가장 가능성이 높은 진단은 무엇입니까?\n\n"
                            : "What is the most likely diagnosis for this patient?\n\n");
    if (rec->question) kmed_buf_puts(b, rec->question);
    if (rec->symptoms)
        kmed_buf_printf(b, "%s%s%s", rec->question ? "\n" : "", ko ? "증상: " : "Symptoms: ",
                        rec->symptoms);
}

static void kmed__data_case_answer(kmed_buf *b, const kmed_data_record *rec)
{
    int ko = kmed__data_is_korean(rec->question ? rec->question : rec->symptoms);
    kmed_buf_printf(b, "%s%s", ko ? "진단: " : "Diagnosis: ", rec->answer_text);
    if (rec->explanation) kmed_buf_printf(b, "\n\n%s", rec->explanation);
}

static void kmed__data_msg(kmed_buf *b, int first, const char *role, const char *content,
                           size_t n)
{
    kmed_buf_puts(b, first ? "{\"role\":" : ",{\"role\":");
    kmed_buf_json_str(b, role, strlen(role));
    kmed_buf_puts(b, ",\"content\":");
    kmed_buf_json_str(b, content, n);
    kmed_buf_put(b, "}", 1);
}

KMED_API kmed_result kmed_data_format_sft(const kmed_data_record *rec, const char *disclaimer,
                                          kmed_buf *out, kmed_error *err)
{
    kmed_buf u = {0}, a = {0};
    size_t i;
    int disc = disclaimer && *disclaimer &&
               (rec->kind == KMED_DATA_CONV || rec->kind == KMED_DATA_COD);
    if (rec->kind == KMED_DATA_DICT)
        return KMED__ERR(err, KMED_ERR_ARG, "%s: a dictionary entry is not a chat example",
                         rec->id ? rec->id : "?");
    kmed__data_head(out, rec);
    kmed_buf_puts(out, ",\"messages\":[");
    if (rec->n_turns) {
        for (i = 0; i < rec->n_turns; i++) {
            const char *t = rec->turns[i].text;
            if (disc && i + 1 == rec->n_turns) {
                kmed_buf_free(&a);
                kmed_buf_printf(&a, "%s\n\n%s", t, disclaimer);
                t = a.data ? a.data : "";
            }
            kmed__data_msg(out, i == 0, rec->turns[i].key, t, strlen(t));
        }
    } else if (rec->kind == KMED_DATA_COD) {
        kmed__data_case_prompt(&u, rec, 1);
        kmed__data_case_answer(&a, rec);
        if (disc) kmed_buf_printf(&a, "\n\n%s", disclaimer);
    } else {
        kmed__data_mcq_prompt(&u, rec, 1);
        kmed__data_mcq_answer(&a, rec, 0);
    }
    if (!rec->n_turns) {
        kmed__data_msg(out, 1, "user", u.data ? u.data : "", u.len);
        kmed__data_msg(out, 0, "assistant", a.data ? a.data : "", a.len);
    }
    kmed_buf_puts(out, "]}\n");
    kmed_buf_free(&u);
    kmed_buf_free(&a);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_data_format_cpt(const kmed_data_record *rec, kmed_buf *out,
                                          kmed_error *err)
{
    kmed_buf t = {0};
    size_t i;
    switch (rec->kind) {
    case KMED_DATA_DICT:
        kmed_buf_puts(&t, rec->title);
        for (i = 0; i < rec->n_sections; i++) {
            kmed_buf_put(&t, "\n\n", 2);
            if (rec->sections[i].key && rec->sections[i].key[0])
                kmed_buf_printf(&t, "%s\n", rec->sections[i].key);
            kmed_buf_puts(&t, rec->sections[i].text);
        }
        break;
    case KMED_DATA_MCQA:
    case KMED_DATA_EXPQA:
        kmed__data_mcq_prompt(&t, rec, 0);
        kmed_buf_put(&t, "\n", 1);
        kmed__data_mcq_answer(&t, rec, 1);
        break;
    default:
        if (rec->n_turns) {
            for (i = 0; i < rec->n_turns; i++) {
                if (i) kmed_buf_put(&t, "\n\n", 2);
                kmed_buf_puts(&t, rec->turns[i].text);
            }
        } else {
            kmed__data_case_prompt(&t, rec, 0);
            kmed_buf_put(&t, "\n", 1);
            kmed__data_case_answer(&t, rec);
        }
        break;
    }
    kmed__data_head(out, rec);
    kmed_buf_puts(out, ",\"text\":");
    kmed_buf_json_str(out, t.data ? t.data : "", t.len);
    kmed_buf_puts(out, "}\n");
    if (t.failed) out->failed = 1;
    kmed_buf_free(&t);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

/* ---- packing ---- */

/* Encodes text into p->tmp[0..*n), growing it as the encoder asks. */
static kmed_result kmed__data_encode(kmed_data_packer *p, const char *s, size_t n, size_t *cnt,
                                     kmed_error *err)
{
    kmed_result r;
    *cnt = 0;
    if (!n) return KMED_OK;
    for (;;) {
        r = p->cfg.encode(p->cfg.encode_user, s, n, p->tmp, p->tmp_cap, cnt, err);
        if (r != KMED_ERR_SPACE) return r;
        if (*cnt <= p->tmp_cap) return KMED__ERR(err, KMED_ERR_STATE, "encoder: bad size");
        {
            int *nt = (int *)KMED_REALLOC(p->tmp, *cnt * sizeof *nt);
            if (!nt) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            p->tmp = nt;
            p->tmp_cap = *cnt;
        }
    }
}

static int kmed__data_ex_push(kmed_data_packer *p, const int *ids, size_t n, int trained)
{
    size_t i;
    if (p->ex_n + n > p->ex_cap) {
        size_t nc = p->ex_cap ? p->ex_cap : 256;
        int *a, *b;
        while (nc < p->ex_n + n) nc *= 2;
        a = (int *)KMED_REALLOC(p->ex_ids, nc * sizeof *a);
        if (!a) return 0;
        p->ex_ids = a;
        b = (int *)KMED_REALLOC(p->ex_lab, nc * sizeof *b);
        if (!b) return 0;
        p->ex_lab = b;
        p->ex_cap = nc;
    }
    for (i = 0; i < n; i++) {
        p->ex_ids[p->ex_n + i] = ids[i];
        p->ex_lab[p->ex_n + i] = trained ? ids[i] : -100;
    }
    p->ex_n += n;
    return 1;
}

static kmed_result kmed__data_copy_ids(kmed_data_packer *p, const char *s, int **out, size_t *n,
                                       kmed_error *err)
{
    kmed_result r = kmed__data_encode(p, s, strlen(s), n, err);
    if (r) return r;
    *out = (int *)kmed__calloc(*n ? *n : 1, sizeof **out);
    if (!*out) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    memcpy(*out, p->tmp, *n * sizeof **out);
    return KMED_OK;
}

KMED_API kmed_result kmed_data_pack_init(kmed_data_packer *p, const kmed_data_pack_config *cfg,
                                         kmed_error *err)
{
    kmed_result r;
    memset(p, 0, sizeof *p);
    p->cfg = *cfg;
    if (!p->cfg.encode) return KMED__ERR(err, KMED_ERR_ARG, "packing needs an encode function");
    if (!p->cfg.seq_len) p->cfg.seq_len = 1024;
    if (!p->cfg.bos_id) p->cfg.bos_id = 2;
    if (!p->cfg.eos_id) p->cfg.eos_id = 1;
    if (!p->cfg.sot_id) p->cfg.sot_id = 106;
    if (!p->cfg.eot_id) p->cfg.eot_id = 107;
    if (p->cfg.seq_len < 8 || p->cfg.seq_len > ((size_t)1 << 24))
        return KMED__ERR(err, KMED_ERR_ARG, "seq_len %zu out of range [8, 2^24]", p->cfg.seq_len);
    p->ids = (int *)kmed__calloc(p->cfg.seq_len, sizeof *p->ids);
    p->labels = (int *)kmed__calloc(p->cfg.seq_len, sizeof *p->labels);
    p->tmp_cap = 1024;
    p->tmp = (int *)kmed__calloc(p->tmp_cap, sizeof *p->tmp);
    if (!p->ids || !p->labels || !p->tmp) {
        kmed_data_pack_free(p);
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    }
    if ((r = kmed__data_copy_ids(p, "model\n", &p->model_prefix, &p->n_model_prefix, err)) ||
        (r = kmed__data_copy_ids(p, "user\n", &p->user_prefix, &p->n_user_prefix, err)) ||
        (r = kmed__data_copy_ids(p, "\n", &p->nl, &p->n_nl, err))) {
        kmed_data_pack_free(p);
        return r;
    }
    return KMED_OK;
}

KMED_API void kmed_data_pack_free(kmed_data_packer *p)
{
    KMED_FREE(p->ids); KMED_FREE(p->labels); KMED_FREE(p->tmp);
    KMED_FREE(p->ex_ids); KMED_FREE(p->ex_lab);
    KMED_FREE(p->model_prefix); KMED_FREE(p->user_prefix); KMED_FREE(p->nl);
    memset(p, 0, sizeof *p);
}

static void kmed__data_emit(kmed_data_packer *p, kmed_buf *out)
{
    size_t i;
    for (i = p->fill; i < p->cfg.seq_len; i++) {
        p->ids[i] = p->cfg.pad_id;
        p->labels[i] = -100;
        p->n_pad++;
    }
    kmed_buf_puts(out, "{\"input_ids\":[");
    for (i = 0; i < p->cfg.seq_len; i++) kmed_buf_printf(out, i ? ",%d" : "%d", p->ids[i]);
    kmed_buf_puts(out, "],\"labels\":[");
    for (i = 0; i < p->cfg.seq_len; i++) kmed_buf_printf(out, i ? ",%d" : "%d", p->labels[i]);
    kmed_buf_puts(out, "]}\n");
    p->n_seqs++;
    p->fill = 0;
}

/* One chat turn: <start_of_turn>role\ncontent<end_of_turn>\n. For the model, the tokens
   of the content and <end_of_turn> are trained; "model\n" is found as the common id
   prefix of encode("model\n") and encode("model\n" + content), so a merge across the
   boundary can never make a prompt token trained or drop a reply token. */
static kmed_result kmed__data_pack_turn(kmed_data_packer *p, const char *role,
                                        const char *content, size_t cn, kmed_error *err)
{
    int model = strcmp(role, "assistant") == 0 || strcmp(role, "model") == 0;
    const char *head = model ? "model\n" : (strcmp(role, "user") == 0 ? "user\n" : NULL);
    kmed_buf t = {0};
    size_t n, k = 0;
    kmed_result r;
    if (!head) return KMED__ERR(err, KMED_ERR_FORMAT, "role '%s' is not user or assistant", role);
    kmed_buf_puts(&t, head);
    kmed_buf_put(&t, content, cn);
    if (t.failed) { kmed_buf_free(&t); return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory"); }
    r = kmed__data_encode(p, t.data, t.len, &n, err);
    kmed_buf_free(&t);
    if (r) return r;
    if (model)
        while (k < n && k < p->n_model_prefix && p->tmp[k] == p->model_prefix[k]) k++;
    else
        k = n;
    if (!kmed__data_ex_push(p, &p->cfg.sot_id, 1, 0) || !kmed__data_ex_push(p, p->tmp, k, 0) ||
        !kmed__data_ex_push(p, p->tmp + k, n - k, 1) ||
        !kmed__data_ex_push(p, &p->cfg.eot_id, 1, model) ||
        !kmed__data_ex_push(p, p->nl, p->n_nl, 0))
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return KMED_OK;
}

KMED_API kmed_result kmed_data_pack_add(kmed_data_packer *p, const kmed_json *example,
                                        kmed_buf *out, kmed_error *err)
{
    const kmed_json *text = kmed_json_get(example, "text");
    const kmed_json *msgs = kmed_json_get(example, "messages");
    size_t i, at = 0, L = p->cfg.seq_len;
    kmed_result r;
    int chat;
    p->ex_n = 0;
    if (!kmed__data_ex_push(p, &p->cfg.bos_id, 1, 0))
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    if (msgs && msgs->type == KMED_JSON_ARRAY) {
        chat = 1;
        for (i = 0; i < msgs->len; i++) {
            const kmed_json *m = &msgs->kids[i];
            const kmed_json *c = kmed_json_get(m, "content");
            const char *role = kmed_json_str(kmed_json_get(m, "role"), NULL);
            if (!role || !c || c->type != KMED_JSON_STRING)
                return KMED__ERR(err, KMED_ERR_FORMAT, "message %zu: expected role and content",
                                 i + 1);
            if ((r = kmed__data_pack_turn(p, role, c->str, c->len, err))) return r;
        }
    } else if (text && text->type == KMED_JSON_STRING) {
        size_t n;
        chat = 0;
        if ((r = kmed__data_encode(p, text->str, text->len, &n, err))) return r;
        if (!kmed__data_ex_push(p, p->tmp, n, 1) || !kmed__data_ex_push(p, &p->cfg.eos_id, 1, 1))
            return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    } else {
        return KMED__ERR(err, KMED_ERR_FORMAT, "example has neither \"text\" nor \"messages\"");
    }
    p->n_examples++;
    if (p->ex_n > L && (chat || p->cfg.truncate_long)) {
        p->ex_n = L;
        p->n_truncated++;
    }
    /* a chat example that does not fit in what is left starts a new sequence; a document
       fills the sequence and continues in the next */
    if ((chat || p->cfg.truncate_long) && p->fill + p->ex_n > L) kmed__data_emit(p, out);
    while (at < p->ex_n) {
        size_t take = p->ex_n - at;
        if (take > L - p->fill) take = L - p->fill;
        memcpy(p->ids + p->fill, p->ex_ids + at, take * sizeof *p->ids);
        memcpy(p->labels + p->fill, p->ex_lab + at, take * sizeof *p->labels);
        for (i = 0; i < take; i++) p->n_trained += p->ex_lab[at + i] != -100;
        p->n_tokens += take;
        p->fill += take;
        at += take;
        if (p->fill == L) kmed__data_emit(p, out);
    }
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_data_pack_finish(kmed_data_packer *p, kmed_buf *out, kmed_error *err)
{
    if (p->fill) kmed__data_emit(p, out);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

/* ---- the pipeline ---- */

static const char *const kmed__data_drop_names[KMED_DATA_DROP_N][2] = {
    {"malformed", "read"}, {"split", "read"}, {"empty", "clean"}, {"too_short", "filter"},
    {"too_long", "filter"}, {"not_korean", "filter"}, {"harmful", "safety"},
    {"contam_ngram", "decontam"}, {"contam_near", "decontam"}, {"exact_dup", "dedup"},
    {"near_dup", "dedup"}, {"mix", "mix"}};

KMED_API const char *kmed_data_drop_name(kmed_data_drop d)
{
    return (unsigned)d < KMED_DATA_DROP_N ? kmed__data_drop_names[d][0] : "?";
}

KMED_API const char *kmed_data_drop_stage(kmed_data_drop d)
{
    return (unsigned)d < KMED_DATA_DROP_N ? kmed__data_drop_names[d][1] : "?";
}

KMED_API kmed_result kmed_data_config_add_source(kmed_data_config *cfg, int eval,
                                                 kmed_data_source **out, kmed_error *err)
{
    kmed_data_source **v = eval ? &cfg->evals : &cfg->sources;
    size_t *n = eval ? &cfg->n_evals : &cfg->n_sources;
    kmed_data_source *nv = (kmed_data_source *)KMED_REALLOC(*v, (*n + 1) * sizeof *nv);
    if (!nv) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    *v = nv;
    memset(&nv[*n], 0, sizeof nv[*n]);
    *out = &nv[(*n)++];
    return KMED_OK;
}

KMED_API void kmed_data_config_free(kmed_data_config *cfg)
{
    KMED_FREE(cfg->sources);
    KMED_FREE(cfg->evals);
    if (cfg->safety_extra) {
        kmed_data_safety_free(cfg->safety_extra);
        KMED_FREE(cfg->safety_extra);
    }
    cfg->sources = cfg->evals = NULL;
    cfg->n_sources = cfg->n_evals = 0;
    cfg->safety_extra = NULL;
}

/* Copies a config string into a fixed field; KMED_ERR_LIMIT if it does not fit. */
static kmed_result kmed__data_cfg_str(char *dst, size_t cap, const kmed_json *v, const char *dir,
                                      const char *what, const char *file, kmed_error *err)
{
    const char *s = kmed_json_str(v, NULL);
    int n;
    if (!s) return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                  "'%s' must be a string", what);
    if (dir && dir[0] && s[0] != '/') n = snprintf(dst, cap, "%s/%s", dir, s);
    else n = snprintf(dst, cap, "%s", s);
    if (n < 0 || (size_t)n >= cap)
        return kmed_error_set(err, KMED_ERR_LIMIT, file, 0, (size_t)-1, "'%s' is too long", what);
    return KMED_OK;
}

static kmed_result kmed__data_cfg_source(kmed_data_source *s, const kmed_json *o, const char *dir,
                                         const char *file, kmed_error *err)
{
    const kmed_json *v;
    kmed_result r;
    size_t i;
    if (!o || o->type != KMED_JSON_OBJECT)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "each source must be an object");
    if (!(v = kmed_json_get(o, "kind")) || !kmed_json_str(v, NULL))
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "a source needs \"kind\"");
    if ((r = kmed_data_kind_parse(kmed_json_str(v, ""), &s->kind, err))) return r;
    if (!(v = kmed_json_get(o, "path")))
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "a source needs \"path\"");
    if ((r = kmed__data_cfg_str(s->path, sizeof s->path, v, dir, "path", file, err))) return r;
    if ((v = kmed_json_get(o, "name")) &&
        (r = kmed__data_cfg_str(s->name, sizeof s->name, v, NULL, "name", file, err))) return r;
    if ((v = kmed_json_get(o, "subset")) &&
        (r = kmed__data_cfg_str(s->subset, sizeof s->subset, v, NULL, "subset", file, err)))
        return r;
    if ((v = kmed_json_get(o, "split")) &&
        (r = kmed__data_cfg_str(s->split, sizeof s->split, v, NULL, "split", file, err))) return r;
    if ((v = kmed_json_get(o, "splits"))) {
        kmed_buf b = {0};
        if (v->type == KMED_JSON_ARRAY) {
            for (i = 0; i < v->len; i++)
                kmed_buf_printf(&b, "%s%s", i ? "," : "", kmed_json_str(&v->kids[i], ""));
        } else {
            kmed_buf_puts(&b, kmed_json_str(v, ""));
        }
        if (b.len >= sizeof s->splits) {
            kmed_buf_free(&b);
            return kmed_error_set(err, KMED_ERR_LIMIT, file, 0, (size_t)-1, "'splits' too long");
        }
        if (b.data) memcpy(s->splits, b.data, b.len + 1);
        kmed_buf_free(&b);
    }
    s->weight = kmed_json_num(kmed_json_get(o, "weight"), 1.0);
    if (s->weight < 0 || s->weight != s->weight || s->weight > 1000)
        return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                              "source %s: weight must be in [0, 1000]", s->path);
    if (s->weight == 0) s->weight = -1; /* explicit 0: drop everything by mixing */
    s->min_korean = kmed_json_num(kmed_json_get(o, "min_korean"), 0);
    s->strip_html = kmed_json_bool(kmed_json_get(o, "strip_html"), 0);
    s->no_explanation = !kmed_json_bool(kmed_json_get(o, "explanations"), 1);
    s->cloze = kmed_json_bool(kmed_json_get(o, "cloze"), 0);
    if ((v = kmed_json_get(o, "format"))) {
        const char *f = kmed_json_str(v, "");
        if (strcmp(f, "sft") == 0) s->format = KMED_DATA_FMT_SFT;
        else if (strcmp(f, "cpt") == 0) s->format = KMED_DATA_FMT_CPT;
        else if (strcmp(f, "both") == 0) s->format = KMED_DATA_FMT_BOTH;
        else if (strcmp(f, "auto") == 0) s->format = KMED_DATA_FMT_AUTO;
        else return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                   "format '%s': expected sft, cpt, both or auto", f);
    }
    if ((v = kmed_json_get(o, "map"))) {
        if (v->type != KMED_JSON_OBJECT)
            return kmed_error_set(err, KMED_ERR_FORMAT, file, 0, (size_t)-1,
                                  "'map' must be an object of dst: src");
        for (i = 0; i < v->len; i++) {
            char kv[128];
            snprintf(kv, sizeof kv, "%s=%s", v->kids[i].key, kmed_json_str(&v->kids[i], ""));
            if ((r = kmed_data_source_map(s, kv, err))) return r;
        }
    }
    return KMED_OK;
}

KMED_API kmed_result kmed_data_config_load(kmed_data_config *cfg, const char *path,
                                           kmed_error *err)
{
    char *data = NULL, dir[1024];
    size_t len, i;
    kmed_json_doc doc = {0};
    const kmed_json *root, *v, *w;
    kmed_result r;
    const char *slash = strrchr(path, '/');
    memset(cfg, 0, sizeof *cfg);
    if (slash) snprintf(dir, sizeof dir, "%.*s", (int)(slash - path), path);
    else dir[0] = 0;
    if ((r = kmed_file_read(path, (size_t)64 << 20, &data, &len, err))) return r;
    r = kmed_json_parse(&doc, data, len, path, 0, err);
    kmed_free(data);
    if (r) { kmed_json_free(&doc); return r; }
    root = doc.root;
    if (root->type != KMED_JSON_OBJECT) {
        r = kmed_error_set(err, KMED_ERR_FORMAT, path, 0, (size_t)-1, "expected a JSON object");
        goto done;
    }
    if ((v = kmed_json_get(root, "out")) &&
        (r = kmed__data_cfg_str(cfg->out_dir, sizeof cfg->out_dir, v, dir, "out", path, err)))
        goto done;
    cfg->seed = (uint64_t)kmed_json_num(kmed_json_get(root, "seed"), 0);
    if ((v = kmed_json_get(root, "val_fraction"))) { /* an explicit 0 means none */
        cfg->val_fraction = kmed_json_num(v, 0);
        if (cfg->val_fraction <= 0) cfg->val_fraction = -1;
    }
    cfg->min_chars = (size_t)kmed_json_num(kmed_json_get(root, "min_chars"), 0);
    cfg->max_chars = (size_t)kmed_json_num(kmed_json_get(root, "max_chars"), 0);
    cfg->pack.seq_len = (size_t)kmed_json_num(kmed_json_get(root, "seq_len"), 0);
    if ((v = kmed_json_get(root, "dedup"))) {
        cfg->dedup.no_exact = !kmed_json_bool(kmed_json_get(v, "exact"), 1);
        cfg->dedup.no_near = !kmed_json_bool(kmed_json_get(v, "near"), 1);
        cfg->dedup.threshold = kmed_json_num(kmed_json_get(v, "threshold"), 0);
        cfg->dedup.ngram = (int)kmed_json_num(kmed_json_get(v, "ngram"), 0);
        cfg->dedup.num_perm = (int)kmed_json_num(kmed_json_get(v, "num_perm"), 0);
        cfg->dedup.bands = (int)kmed_json_num(kmed_json_get(v, "bands"), 0);
    }
    if ((v = kmed_json_get(root, "decontam"))) {
        cfg->decontam.word_n = (int)kmed_json_num(kmed_json_get(v, "word_ngram"), 0);
        cfg->decontam.char_n = (int)kmed_json_num(kmed_json_get(v, "char_ngram"), 0);
        cfg->decontam.threshold = kmed_json_num(kmed_json_get(v, "threshold"), 0);
    }
    if ((v = kmed_json_get(root, "safety"))) {
        const char *act = kmed_json_str(kmed_json_get(v, "action"), "drop");
        if (strcmp(act, "drop") == 0) cfg->safety_action = 0;
        else if (strcmp(act, "flag") == 0) cfg->safety_action = 1;
        else if (strcmp(act, "off") == 0) cfg->safety_action = 2;
        else {
            r = kmed_error_set(err, KMED_ERR_FORMAT, path, 0, (size_t)-1,
                               "safety.action '%s': expected drop, flag or off", act);
            goto done;
        }
        cfg->safety_no_defaults = !kmed_json_bool(kmed_json_get(v, "defaults"), 1);
        if ((w = kmed_json_get(v, "lists")) && w->type == KMED_JSON_OBJECT) {
            cfg->safety_extra = (kmed_data_safety *)kmed__calloc(1, sizeof *cfg->safety_extra);
            if (!cfg->safety_extra) {
                r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
                goto done;
            }
            for (i = 0; i < w->len; i++) {
                const kmed_json *list = &w->kids[i];
                size_t k;
                for (k = 0; list->type == KMED_JSON_ARRAY && k < list->len; k++)
                    if ((r = kmed_data_safety_add(cfg->safety_extra, list->key,
                                                  kmed_json_str(&list->kids[k], ""), err)))
                        goto done;
            }
        }
    }
    if ((v = kmed_json_get(root, "disclaimer"))) {
        if (v->type == KMED_JSON_STRING) {
            cfg->disclaimer = 1;
            snprintf(cfg->disclaimer_text, sizeof cfg->disclaimer_text, "%s", v->str);
        } else {
            cfg->disclaimer = kmed_json_bool(v, 0);
        }
    }
    for (w = kmed_json_get(root, "sources"), i = 0; w && i < w->len; i++) {
        kmed_data_source *s;
        if ((r = kmed_data_config_add_source(cfg, 0, &s, err))) goto done;
        if ((r = kmed__data_cfg_source(s, &w->kids[i], dir, path, err))) goto done;
    }
    for (w = kmed_json_get(root, "eval"), i = 0; w && i < w->len; i++) {
        kmed_data_source *s;
        if ((r = kmed_data_config_add_source(cfg, 1, &s, err))) goto done;
        if ((r = kmed__data_cfg_source(s, &w->kids[i], dir, path, err))) goto done;
    }
done:
    kmed_json_free(&doc);
    if (r) kmed_data_config_free(cfg);
    return r;
}

/* One example in the spool file, 16 bytes: where it is and where it goes. */
typedef struct kmed__data_spooled {
    uint64_t off;
    uint32_t len;
    uint16_t src;
    uint8_t sft, val;
} kmed__data_spooled;

typedef struct kmed__data_run {
    const kmed_data_config *cfg;
    kmed_data_report *rep;
    const kmed_callbacks *cb;
    kmed_data_safety safety;
    kmed_data_dedup dedup;
    kmed_data_decontam decon;
    char **kept_ids; uint32_t *dups; size_t n_kept_ids, cap_kept_ids;  /* dedup items */
    unsigned char *dup_kind;                                         /* 1 exact, 2 near */
    FILE *spool; uint64_t spool_off;
    kmed__data_spooled *idx; size_t n_idx, cap_idx;
    kmed_afile drops;
    int drops_open;
    kmed_rng mix_rng;
    kmed_buf line, text, question;
} kmed__data_run;

static kmed_result kmed__data_drop_log(kmed__data_run *R, const char *id, const char *source,
                                       const char *stage, const char *reason, const char *detail,
                                       kmed_error *err)
{
    kmed_buf *b = &R->line;
    if (!R->drops_open) return KMED_OK;
    b->len = 0;
    kmed_buf_put(b, "{", 1);
    kmed__data_json_kv(b, "id", id);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "source", source);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "stage", stage);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "reason", reason);
    kmed_buf_put(b, ",", 1);
    kmed__data_json_kv(b, "detail", detail);
    kmed_buf_puts(b, "}\n");
    if (b->failed) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    return kmed_afile_write(&R->drops, b->data, b->len, err);
}

static kmed_result kmed__data_drop(kmed__data_run *R, kmed_data_source_report *sr,
                                   const char *id, kmed_data_drop why, const char *detail,
                                   kmed_error *err)
{
    sr->n_drop[why]++;
    return kmed__data_drop_log(R, id, sr->name, kmed_data_drop_stage(why),
                               kmed_data_drop_name(why), detail, err);
}

static kmed_result kmed__data_spool(kmed__data_run *R, const char *line, size_t n, size_t src,
                                    int sft, int val, kmed_error *err)
{
    kmed__data_spooled *e;
    if (n > 0xFFFFFFFFu) return KMED__ERR(err, KMED_ERR_LIMIT, "example over 4 GiB");
    if (R->n_idx == R->cap_idx) {
        size_t nc = R->cap_idx ? R->cap_idx * 2 : 1024;
        kmed__data_spooled *ni = (kmed__data_spooled *)KMED_REALLOC(R->idx, nc * sizeof *ni);
        if (!ni) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        R->idx = ni;
        R->cap_idx = nc;
    }
    if (fwrite(line, 1, n, R->spool) != n)
        return KMED__ERR(err, KMED_ERR_IO, "writing the spool file failed");
    e = &R->idx[R->n_idx++];
    e->off = R->spool_off;
    e->len = (uint32_t)n;
    e->src = (uint16_t)src;
    e->sft = (uint8_t)sft;
    e->val = (uint8_t)val;
    R->spool_off += n;
    return KMED_OK;
}

static size_t kmed__data_chars(const char *s, size_t n)
{
    size_t i, c = 0;
    for (i = 0; i < n; i++) c += ((unsigned char)s[i] & 0xC0) != 0x80;
    return c;
}

static int kmed__data_in_list(const char *list, const char *s)
{
    size_t n;
    if (!s) return 0;
    n = strlen(s);
    while (*list) {
        const char *c = strchr(list, ',');
        size_t l = c ? (size_t)(c - list) : strlen(list);
        if (l == n && memcmp(list, s, n) == 0) return 1;
        list += l + (c ? 1 : 0);
    }
    return 0;
}

/* Runs one record through every stage. */
static kmed_result kmed__data_one(kmed__data_run *R, size_t si, kmed_data_record *rec,
                                  kmed_error *err)
{
    const kmed_data_config *cfg = R->cfg;
    const kmed_data_source *src = &cfg->sources[si];
    kmed_data_source_report *sr = &R->rep->sources[si];
    size_t min_chars = cfg->min_chars ? cfg->min_chars : 8;
    size_t max_chars = cfg->max_chars ? cfg->max_chars : 20000;
    size_t chars, item, of;
    char detail[600];
    const char *cat, *phr;
    kmed_error e2;
    kmed_result r;
    int dup, hit, copies, c, val;
    double sim, w;
    kmed_data_format fmt = src->format;

    if (src->splits[0] && !kmed__data_in_list(src->splits, rec->split)) {
        snprintf(detail, sizeof detail, "split '%s' not in %s", rec->split ? rec->split : "",
                 src->splits);
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_SPLIT, detail, err);
    }
    memset(&e2, 0, sizeof e2);
    r = kmed_data_record_clean(rec, src->strip_html, &e2);
    if (r == KMED_ERR_FORMAT)
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_EMPTY, e2.msg, err);
    if (r) { if (err) *err = e2; return r; }
    if (src->no_explanation) {
        KMED_FREE(rec->explanation);
        rec->explanation = NULL;
    }
    rec->cloze = src->cloze && (rec->kind == KMED_DATA_MCQA || rec->kind == KMED_DATA_EXPQA);
    R->text.len = 0;
    kmed_data_record_text(rec, &R->text);
    R->question.len = 0;
    kmed_data_record_question(rec, &R->question);
    if (R->text.failed || R->question.failed)
        return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    chars = kmed__data_chars(R->text.data, R->text.len);
    if (chars < min_chars || chars > max_chars) {
        snprintf(detail, sizeof detail, "%zu characters (limits %zu-%zu)", chars, min_chars,
                 max_chars);
        return kmed__data_drop(R, sr, rec->id, chars < min_chars ? KMED_DATA_DROP_TOO_SHORT
                                                                 : KMED_DATA_DROP_TOO_LONG,
                               detail, err);
    }
    if (src->min_korean > 0) {
        double k = kmed_data_korean_share(R->text.data, R->text.len);
        if (k < src->min_korean) {
            snprintf(detail, sizeof detail, "Hangul share %.2f < %.2f", k, src->min_korean);
            return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_NOT_KOREAN, detail, err);
        }
    }
    if (cfg->safety_action != 2 &&
        kmed_data_safety_check(&R->safety, R->text.data, R->text.len, &cat, &phr)) {
        snprintf(detail, sizeof detail, "%s: %s", cat, phr);
        if (cfg->safety_action == 0)
            return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_HARMFUL, detail, err);
        rec->flagged = 1;
        sr->n_flagged++;
        if ((r = kmed__data_drop_log(R, rec->id, sr->name, "safety", "flagged", detail, err)))
            return r;
    }
    hit = kmed_data_decontam_check(&R->decon, R->text.data, R->text.len, R->question.data,
                                   R->question.len, &item, &sim);
    if (hit) {
        if (hit == 3)
            snprintf(detail, sizeof detail, "near-duplicate of eval item %s (Jaccard ~%.2f)",
                     R->decon.ids[item], sim);
        else
            snprintf(detail, sizeof detail, "shares a %d-%s n-gram with eval item %s",
                     hit == 1 ? R->decon.cfg.word_n : R->decon.cfg.char_n,
                     hit == 1 ? "word" : "character", R->decon.ids[item]);
        return kmed__data_drop(R, sr, rec->id, hit == 3 ? KMED_DATA_DROP_CONTAM_NEAR
                                                        : KMED_DATA_DROP_CONTAM_NGRAM,
                               detail, err);
    }
    if (!cfg->dedup.no_exact || !cfg->dedup.no_near) {
        if ((r = kmed_data_dedup_check(&R->dedup, R->text.data, R->text.len, 1, &dup, &of, &sim,
                                       err)))
            return r;
        if (dup) {
            if (!R->dups[of]) R->dup_kind[of] = 0;
            R->dups[of]++;
            R->dup_kind[of] |= (unsigned char)dup;
            if (dup == 1) snprintf(detail, sizeof detail, "same text as %s", R->kept_ids[of]);
            else snprintf(detail, sizeof detail, "near-duplicate of %s (Jaccard ~%.2f)",
                          R->kept_ids[of], sim);
            return kmed__data_drop(R, sr, rec->id, dup == 1 ? KMED_DATA_DROP_EXACT_DUP
                                                            : KMED_DATA_DROP_NEAR_DUP,
                                   detail, err);
        }
        if (R->n_kept_ids == R->cap_kept_ids) {
            size_t nc = R->cap_kept_ids ? R->cap_kept_ids * 2 : 1024;
            char **ni = (char **)KMED_REALLOC(R->kept_ids, nc * sizeof *ni);
            uint32_t *nd;
            unsigned char *nk;
            if (ni) R->kept_ids = ni;
            nd = ni ? (uint32_t *)KMED_REALLOC(R->dups, nc * sizeof *nd) : NULL;
            if (nd) R->dups = nd;
            nk = nd ? (unsigned char *)KMED_REALLOC(R->dup_kind, nc) : NULL;
            if (nk) R->dup_kind = nk;
            if (!nk) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            R->cap_kept_ids = nc;
        }
        R->kept_ids[R->n_kept_ids] = kmed__data_strdup(rec->id);
        R->dups[R->n_kept_ids] = 0;
        R->dup_kind[R->n_kept_ids] = 0;
        if (!R->kept_ids[R->n_kept_ids]) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
        R->n_kept_ids++;
    }
    /* mixing: weight w gives floor(w) copies plus one more with probability frac(w) */
    w = src->weight == 0 ? 1.0 : (src->weight < 0 ? 0.0 : src->weight);
    copies = (int)floor(w);
    if (kmed_rng_uniform(&R->mix_rng) < w - floor(w)) copies++;
    if (copies == 0) {
        snprintf(detail, sizeof detail, "weight %.3g", w);
        return kmed__data_drop(R, sr, rec->id, KMED_DATA_DROP_MIX, detail, err);
    }
    sr->n_kept++;
    /* the split follows the id, so a record keeps its side when sources change */
    {
        double vf = cfg->val_fraction == 0 ? 0.05 : cfg->val_fraction;
        uint64_t h = kmed_data_hash64(rec->id, strlen(rec->id), cfg->seed ^ 0x7a1u);
        val = vf > 0 && (double)(h >> 11) * (1.0 / 9007199254740992.0) < vf;
    }
    if (fmt == KMED_DATA_FMT_AUTO) fmt = rec->kind == KMED_DATA_DICT ? KMED_DATA_FMT_CPT
                                                                     : KMED_DATA_FMT_SFT;
    for (c = 0; c < 2; c++) {
        int sft = c == 0, k, n;
        if (sft && fmt == KMED_DATA_FMT_CPT) continue;
        if (!sft && fmt == KMED_DATA_FMT_SFT) continue;
        R->line.len = 0;
        if (sft) {
            const char *disc = NULL;
            if (cfg->disclaimer && cfg->disclaimer_text[0]) disc = cfg->disclaimer_text;
            else if (cfg->disclaimer)
                disc = kmed_data_disclaimer(kmed__data_is_korean(R->question.data));
            r = kmed_data_format_sft(rec, disc, &R->line, err);
        } else {
            r = kmed_data_format_cpt(rec, &R->line, err);
        }
        if (r) return r;
        n = val ? 1 : copies; /* the validation set is not up-weighted */
        for (k = 0; k < n; k++)
            if ((r = kmed__data_spool(R, R->line.data, R->line.len, si, sft, val, err))) return r;
        if (val) sr->n_examples_val += 1;
        else sr->n_examples_train += (size_t)n;
    }
    return KMED_OK;
}

static kmed_result kmed__data_load_evals(kmed__data_run *R, kmed_error *err)
{
    size_t i;
    kmed_data_record rec;
    memset(&rec, 0, sizeof rec);
    for (i = 0; i < R->cfg->n_evals; i++) {
        kmed_data_reader rd;
        kmed_result r = kmed_data_open(&rd, &R->cfg->evals[i], err);
        int eof = 0;
        if (r) return r;
        for (;;) {
            kmed_error e2;
            memset(&e2, 0, sizeof e2);
            r = kmed_data_next(&rd, &rec, &eof, &e2);
            if (r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT) {
                kmed_log(R->cb, KMED_LOG_WARN, "eval set: %s (skipped)", e2.msg);
                R->rep->n_errors++;
                continue;
            }
            if (r) { if (err) *err = e2; break; }
            if (eof) break;
            if (kmed_data_record_clean(&rec, 0, NULL) != KMED_OK) continue;
            R->text.len = 0;
            R->question.len = 0;
            if (rec.kind == KMED_DATA_MCQA || rec.kind == KMED_DATA_EXPQA) {
                /* question and options only: an explanation's stock phrases would flag
                   unrelated training text */
                int o;
                kmed_buf_puts(&R->text, rec.question);
                for (o = 0; o < rec.n_options; o++) kmed__data_line(&R->text, rec.options[o]);
            } else {
                kmed_data_record_text(&rec, &R->text);
            }
            kmed_data_record_question(&rec, &R->question);
            r = kmed_data_decontam_add(&R->decon, rec.id, R->text.data, R->text.len,
                                       R->question.data, R->question.len, err);
            if (r) break;
        }
        kmed_data_record_free(&rec);
        kmed_data_close(&rd);
        if (r) return r;
    }
    R->rep->n_eval_items = R->decon.n_items;
    return KMED_OK;
}

/* Output files, in the order of kmed_data_report.n_seqs: sft train/val, cpt train/val. */
static const char *const kmed__data_out_names[4] = {"sft_train", "sft_val", "cpt_train",
                                                    "cpt_val"};

static kmed_result kmed__data_write(kmed__data_run *R, kmed_error *err)
{
    const kmed_data_config *cfg = R->cfg;
    kmed_afile f[6], pf[4];
    kmed_data_packer pk[4];
    kmed_buf pbuf[4];
    kmed_rng rng;
    int opened = 0, popened = 0, k, pack = cfg->pack.encode != NULL;
    char path[1200], name[64];
    size_t i;
    kmed_result r = KMED_OK;
    memset(pk, 0, sizeof pk);
    memset(pbuf, 0, sizeof pbuf);
    /* seeded Fisher-Yates over the index; the spool itself stays in input order */
    kmed_rng_seed(&rng, cfg->seed);
    for (i = R->n_idx; i > 1; i--) {
        size_t j = (size_t)kmed_rng_below(&rng, i);
        kmed__data_spooled t = R->idx[i - 1];
        R->idx[i - 1] = R->idx[j];
        R->idx[j] = t;
    }
    for (k = 0; k < 6; k++) {
        snprintf(name, sizeof name, "%s.jsonl", k < 4 ? kmed__data_out_names[k]
                                                      : (k == 4 ? "train" : "val"));
        if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, name, err))) goto done;
        if ((r = kmed_afile_open(&f[k], path, err))) goto done;
        opened++;
    }
    for (k = 0; k < 4 && !pack; k++) { /* packed files of an earlier run would not match */
        snprintf(name, sizeof name, "%s_packed.jsonl", kmed__data_out_names[k]);
        if (kmed_path_join(path, sizeof path, cfg->out_dir, name, NULL) == KMED_OK) remove(path);
    }
    if (pack) {
        for (k = 0; k < 4; k++) {
            snprintf(name, sizeof name, "%s_packed.jsonl", kmed__data_out_names[k]);
            if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, name, err))) goto done;
            if ((r = kmed_data_pack_init(&pk[k], &cfg->pack, err))) goto done;
            if ((r = kmed_afile_open(&pf[k], path, err))) {
                kmed_data_pack_free(&pk[k]);
                goto done;
            }
            popened++;
        }
    }
    for (i = 0; i < R->n_idx; i++) {
        const kmed__data_spooled *e = &R->idx[i];
        int which = (e->sft ? 0 : 2) + (e->val ? 1 : 0);
        R->line.len = 0;
        kmed_buf_put(&R->line, NULL, 0);
        if (R->line.failed || !kmed__buf_reserve(&R->line, e->len)) {
            r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            goto done;
        }
        if (fseek(R->spool, (long)e->off, SEEK_SET) != 0 ||
            fread(R->line.data, 1, e->len, R->spool) != e->len) {
            r = KMED__ERR(err, KMED_ERR_IO, "reading the spool file failed");
            goto done;
        }
        R->line.len = e->len;
        R->line.data[e->len] = 0;
        if ((r = kmed_afile_write(&f[which], R->line.data, e->len, err))) goto done;
        if ((r = kmed_afile_write(&f[e->val ? 5 : 4], R->line.data, e->len, err))) goto done;
        if (which == 0) R->rep->n_sft_train++;
        else if (which == 1) R->rep->n_sft_val++;
        else if (which == 2) R->rep->n_cpt_train++;
        else R->rep->n_cpt_val++;
        if (pack) {
            kmed_json_doc doc = {0};
            r = kmed_json_parse(&doc, R->line.data, e->len, "spool", 0, err);
            if (!r) r = kmed_data_pack_add(&pk[which], doc.root, &pbuf[which], err);
            kmed_json_free(&doc);
            if (r) goto done;
            if (pbuf[which].len > ((size_t)1 << 20)) {
                if ((r = kmed_afile_write(&pf[which], pbuf[which].data, pbuf[which].len, err)))
                    goto done;
                pbuf[which].len = 0;
            }
        }
        if ((i & 1023) == 0) kmed_progress(R->cb, "data: writing", (double)i, (double)R->n_idx,
                                           "examples");
    }
    kmed_progress(R->cb, "data: writing", (double)R->n_idx, (double)R->n_idx, "examples");
    for (k = 0; k < popened; k++) {
        if ((r = kmed_data_pack_finish(&pk[k], &pbuf[k], err))) goto done;
        if (pbuf[k].len && (r = kmed_afile_write(&pf[k], pbuf[k].data, pbuf[k].len, err)))
            goto done;
        R->rep->n_seqs[k] = pk[k].n_seqs;
        R->rep->n_tokens[k] = pk[k].n_tokens;
        R->rep->n_trained[k] = pk[k].n_trained;
    }
    for (k = 0; k < popened; k++) if ((r = kmed_afile_commit(&pf[k], err))) goto done;
    popened = 0;
    for (k = 0; k < opened; k++) if ((r = kmed_afile_commit(&f[k], err))) goto done;
    opened = 0;
done:
    for (k = 0; k < opened; k++) kmed_afile_abort(&f[k]);
    for (k = 0; k < popened; k++) kmed_afile_abort(&pf[k]);
    for (k = 0; k < 4; k++) { kmed_data_pack_free(&pk[k]); kmed_buf_free(&pbuf[k]); }
    return r;
}

KMED_API kmed_result kmed_data_run(const kmed_data_config *cfg, kmed_data_report *rep,
                                   const kmed_callbacks *cb, kmed_error *err)
{
    kmed__data_run R;
    kmed_data_record rec;
    kmed_result r;
    char path[1200];
    size_t si, i, d;
    double t0 = kmed_time_now();
    memset(&R, 0, sizeof R);
    memset(&rec, 0, sizeof rec);
    memset(rep, 0, sizeof *rep);
    R.cfg = cfg;
    R.rep = rep;
    R.cb = cb;
    if (!cfg->out_dir[0]) return KMED__ERR(err, KMED_ERR_ARG, "no output directory");
    if (cfg->n_sources > 0xFFFF) return KMED__ERR(err, KMED_ERR_LIMIT, "too many sources");
    for (si = 0; si < cfg->n_sources; si++)
        if (cfg->sources[si].kind == KMED_DATA_DICT &&
            (cfg->sources[si].format == KMED_DATA_FMT_SFT ||
             cfg->sources[si].format == KMED_DATA_FMT_BOTH))
            return KMED__ERR(err, KMED_ERR_ARG, "source %s: a dictionary can only be cpt",
                             cfg->sources[si].path);
    rep->sources = (kmed_data_source_report *)kmed__calloc(cfg->n_sources ? cfg->n_sources : 1,
                                                           sizeof *rep->sources);
    if (!rep->sources) return KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    rep->n_sources = cfg->n_sources;
    for (si = 0; si < cfg->n_sources; si++) {
        kmed__data_source_name(&cfg->sources[si], rep->sources[si].name,
                               sizeof rep->sources[si].name);
        rep->sources[si].kind = cfg->sources[si].kind;
    }
    if ((r = kmed_mkdir_p(cfg->out_dir, err))) return r;
    if ((r = kmed_data_safety_init(&R.safety, !cfg->safety_no_defaults, err))) return r;
    for (i = 0; cfg->safety_extra && i < cfg->safety_extra->n; i++) {
        /* extra phrases are stored squashed already; squashing is idempotent */
        if ((r = kmed_data_safety_add(&R.safety, cfg->safety_extra->category[i],
                                      cfg->safety_extra->phrase[i], err)))
            goto done;
    }
    if ((r = kmed_data_dedup_init(&R.dedup, &cfg->dedup, err))) goto done;
    if ((r = kmed_data_decontam_init(&R.decon, &cfg->decontam, err))) goto done;
    kmed_rng_seed(&R.mix_rng, cfg->seed ^ 0x6d6978u);
    if ((r = kmed__data_load_evals(&R, err))) goto done;
    if (cfg->n_evals)
        kmed_log(cb, KMED_LOG_INFO, "decontaminating against %zu eval items", rep->n_eval_items);
    if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, ".spool.tmp", err))) goto done;
    R.spool = fopen(path, "w+b");
    if (!R.spool) {
        r = KMED__ERRF(err, KMED_ERR_IO, path, "cannot create the spool file");
        goto done;
    }
    if (!cfg->no_drop_log) {
        char dp[1200];
        if ((r = kmed_path_join(dp, sizeof dp, cfg->out_dir, "drops.jsonl", err))) goto done;
        if ((r = kmed_afile_open(&R.drops, dp, err))) goto done;
        R.drops_open = 1;
    }
    for (si = 0; si < cfg->n_sources; si++) {
        kmed_data_reader rd;
        kmed_data_source_report *sr = &rep->sources[si];
        char what[96];
        int eof = 0;
        snprintf(what, sizeof what, "data: %s", sr->name);
        if ((r = kmed_data_open(&rd, &cfg->sources[si], err))) goto done;
        for (;;) {
            kmed_error e2;
            memset(&e2, 0, sizeof e2);
            r = kmed_data_next(&rd, &rec, &eof, &e2);
            if (r == KMED_ERR_FORMAT || r == KMED_ERR_LIMIT) {
                char id[400];
                snprintf(id, sizeof id, "%s:%s:%zu", sr->name, rd.file, e2.line);
                kmed_log(cb, KMED_LOG_WARN, "%s (skipped)", e2.msg);
                rep->n_errors++;
                sr->n_in++;
                if ((r = kmed__data_drop(&R, sr, id, KMED_DATA_DROP_MALFORMED, e2.msg, err)))
                    break;
                continue;
            }
            if (r) { if (err) *err = e2; break; }
            if (eof) break;
            sr->n_in++;
            if ((r = kmed__data_one(&R, si, &rec, err))) break;
            if ((sr->n_in & 1023) == 0) kmed_progress(cb, what, (double)sr->n_in, 0, "records");
        }
        kmed_data_record_free(&rec);
        kmed_data_close(&rd);
        if (r) goto done;
        kmed_progress(cb, what, (double)sr->n_in, (double)sr->n_in, "records");
    }
    if (fflush(R.spool) != 0) { r = KMED__ERR(err, KMED_ERR_IO, "spool write failed"); goto done; }
    if ((r = kmed__data_write(&R, err))) goto done;
    for (i = 0; i < R.n_kept_ids; i++) {
        if (!R.dups[i]) continue;
        if (R.dup_kind[i] & 1) rep->exact_clusters++;
        if (R.dup_kind[i] & 2) rep->near_clusters++;
    }
    for (si = 0; si < rep->n_sources; si++) {
        kmed_data_source_report *sr = &rep->sources[si];
        size_t dropped = 0;
        rep->n_in += sr->n_in;
        rep->n_kept += sr->n_kept;
        for (d = 0; d < KMED_DATA_DROP_N; d++) {
            rep->n_drop[d] += sr->n_drop[d];
            dropped += sr->n_drop[d];
        }
        if (sr->n_in != sr->n_kept + dropped) {
            r = KMED__ERR(err, KMED_ERR_STATE, "source %s: %zu in but %zu kept + %zu dropped",
                          sr->name, sr->n_in, sr->n_kept, dropped);
            goto done;
        }
    }
    rep->seconds = kmed_time_now() - t0;
    if (R.drops_open) { R.drops_open = 0; if ((r = kmed_afile_commit(&R.drops, err))) goto done; }
    {
        kmed_buf b = {0};
        kmed_data_report_json(rep, &b);
        if ((r = kmed_path_join(path, sizeof path, cfg->out_dir, "report.json", err)) == KMED_OK)
            r = kmed_file_write_atomic(path, b.data, b.len, err);
        b.len = 0;
        kmed_data_report_table(rep, &b);
        if (!r &&
            (r = kmed_path_join(path, sizeof path, cfg->out_dir, "report.txt", err)) == KMED_OK)
            r = kmed_file_write_atomic(path, b.data, b.len, err);
        kmed_buf_free(&b);
    }
done:
    if (R.drops_open) kmed_afile_abort(&R.drops);
    if (R.spool) {
        fclose(R.spool);
        if (kmed_path_join(path, sizeof path, cfg->out_dir, ".spool.tmp", NULL) == KMED_OK)
            remove(path);
    }
    for (i = 0; i < R.n_kept_ids; i++) KMED_FREE(R.kept_ids[i]);
    KMED_FREE(R.kept_ids);
    KMED_FREE(R.dups);
    KMED_FREE(R.dup_kind);
    KMED_FREE(R.idx);
    kmed_data_safety_free(&R.safety);
    kmed_data_dedup_free(&R.dedup);
    kmed_data_decontam_free(&R.decon);
    kmed_buf_free(&R.line);
    kmed_buf_free(&R.text);
    kmed_buf_free(&R.question);
    return r;
}

KMED_API void kmed_data_report_json(const kmed_data_report *rep, kmed_buf *out)
{
    size_t si;
    int d, k;
    kmed_buf_puts(out, "{\n  \"sources\": [");
    for (si = 0; si < rep->n_sources; si++) {
        const kmed_data_source_report *s = &rep->sources[si];
        size_t dropped = 0;
        kmed_buf_puts(out, si ? ",\n    {" : "\n    {");
        kmed__data_json_kv(out, "name", s->name);
        kmed_buf_put(out, ",", 1);
        kmed__data_json_kv(out, "kind", kmed_data_kind_name(s->kind));
        kmed_buf_printf(out, ",\"in\":%zu,\"kept\":%zu,\"dropped\":{", s->n_in, s->n_kept);
        for (d = 0; d < KMED_DATA_DROP_N; d++) {
            kmed_buf_printf(out, "%s\"%s\":%zu", d ? "," : "",
                            kmed_data_drop_name((kmed_data_drop)d), s->n_drop[d]);
            dropped += s->n_drop[d];
        }
        kmed_buf_printf(out, "},\"dropped_total\":%zu,\"flagged\":%zu,\"examples_train\":%zu,"
                        "\"examples_val\":%zu}", dropped, s->n_flagged, s->n_examples_train,
                        s->n_examples_val);
    }
    kmed_buf_printf(out, "\n  ],\n  \"totals\": {\"in\":%zu,\"kept\":%zu,\"dropped\":{",
                    rep->n_in, rep->n_kept);
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        kmed_buf_printf(out, "%s\"%s\":%zu", d ? "," : "",
                        kmed_data_drop_name((kmed_data_drop)d), rep->n_drop[d]);
    kmed_buf_printf(out, "}},\n  \"stages\": {");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        kmed_buf_printf(out, "%s\"%s\":\"%s\"", d ? "," : "",
                        kmed_data_drop_name((kmed_data_drop)d),
                        kmed_data_drop_stage((kmed_data_drop)d));
    kmed_buf_printf(out, "},\n  \"dedup\": {\"exact_clusters\":%zu,\"near_clusters\":%zu,"
                    "\"exact_dropped\":%zu,\"near_dropped\":%zu},\n",
                    rep->exact_clusters, rep->near_clusters, rep->n_drop[KMED_DATA_DROP_EXACT_DUP],
                    rep->n_drop[KMED_DATA_DROP_NEAR_DUP]);
    kmed_buf_printf(out, "  \"decontam\": {\"eval_items\":%zu,\"ngram_dropped\":%zu,"
                    "\"near_dropped\":%zu},\n", rep->n_eval_items,
                    rep->n_drop[KMED_DATA_DROP_CONTAM_NGRAM],
                    rep->n_drop[KMED_DATA_DROP_CONTAM_NEAR]);
    kmed_buf_printf(out, "  \"examples\": {\"sft_train\":%zu,\"sft_val\":%zu,\"cpt_train\":%zu,"
                    "\"cpt_val\":%zu},\n  \"packed\": {", rep->n_sft_train, rep->n_sft_val,
                    rep->n_cpt_train, rep->n_cpt_val);
    for (k = 0; k < 4; k++)
        kmed_buf_printf(out, "%s\"%s\":{\"sequences\":%zu,\"tokens\":%zu,\"trained\":%zu}",
                        k ? "," : "", kmed__data_out_names[k], rep->n_seqs[k], rep->n_tokens[k],
                        rep->n_trained[k]);
    kmed_buf_printf(out, "},\n  \"errors\": %zu,\n  \"seconds\": %.3f\n}\n", rep->n_errors,
                    rep->seconds);
}

/* Width of a reason's column in the table: its name, at least 7. */
static int kmed__data_colw(kmed_data_drop d)
{
    int n = (int)strlen(kmed_data_drop_name(d));
    return n < 7 ? 7 : n;
}

KMED_API void kmed_data_report_table(const kmed_data_report *rep, kmed_buf *out)
{
    int used[KMED_DATA_DROP_N], d, k;
    size_t si;
    int w = 6;
    for (si = 0; si < rep->n_sources; si++)
        if ((int)strlen(rep->sources[si].name) > w) w = (int)strlen(rep->sources[si].name);
    for (d = 0; d < KMED_DATA_DROP_N; d++) used[d] = rep->n_drop[d] != 0;
    kmed_buf_printf(out, "%-*s %-12s %7s", w, "source", "kind", "in");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        if (used[d]) kmed_buf_printf(out, " %*s", kmed__data_colw((kmed_data_drop)d),
                                     kmed_data_drop_name((kmed_data_drop)d));
    kmed_buf_printf(out, " %7s %7s %7s %7s\n", "kept", "flagged", "train", "val");
    for (si = 0; si <= rep->n_sources; si++) {
        const kmed_data_source_report *s = si < rep->n_sources ? &rep->sources[si] : NULL;
        size_t tr = 0, va = 0, fl = 0, j;
        if (!s) {
            for (j = 0; j < rep->n_sources; j++) {
                tr += rep->sources[j].n_examples_train;
                va += rep->sources[j].n_examples_val;
                fl += rep->sources[j].n_flagged;
            }
        }
        kmed_buf_printf(out, "%-*s %-12s %7zu", w, s ? s->name : "TOTAL",
                        s ? kmed_data_kind_name(s->kind) : "", s ? s->n_in : rep->n_in);
        for (d = 0; d < KMED_DATA_DROP_N; d++)
            if (used[d]) kmed_buf_printf(out, " %*zu", kmed__data_colw((kmed_data_drop)d),
                                         s ? s->n_drop[d] : rep->n_drop[d]);
        kmed_buf_printf(out, " %7zu %7zu %7zu %7zu\n", s ? s->n_kept : rep->n_kept,
                        s ? s->n_flagged : fl, s ? s->n_examples_train : tr,
                        s ? s->n_examples_val : va);
    }
    kmed_buf_puts(out, "stages:");
    for (d = 0; d < KMED_DATA_DROP_N; d++)
        if (used[d]) kmed_buf_printf(out, " %s=%s", kmed_data_drop_name((kmed_data_drop)d),
                                     kmed_data_drop_stage((kmed_data_drop)d));
    kmed_buf_printf(out, "\ndedup clusters: %zu exact, %zu near; eval items: %zu; "
                    "malformed inputs: %zu\n", rep->exact_clusters, rep->near_clusters,
                    rep->n_eval_items, rep->n_errors);
    kmed_buf_printf(out, "examples written: sft %zu train / %zu val, cpt %zu train / %zu val\n",
                    rep->n_sft_train, rep->n_sft_val, rep->n_cpt_train, rep->n_cpt_val);
    for (k = 0; k < 4; k++)
        if (rep->n_seqs[k])
            kmed_buf_printf(out, "packed %-9s %6zu sequences, %9zu tokens, %9zu trained\n",
                            kmed__data_out_names[k], rep->n_seqs[k], rep->n_tokens[k],
                            rep->n_trained[k]);
}

KMED_API void kmed_data_report_free(kmed_data_report *rep)
{
    KMED_FREE(rep->sources);
    memset(rep, 0, sizeof *rep);
}

#endif
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
    } else {
        int c = kmed_csv_col(s->csv, name);
        if (c < 0) return 0;
        kmed_buf_put(buf, s->csv->fields[c].s, s->csv->fields[c].len);
    }
    /* items hold C strings: a value with an escaped NUL ("\u0000") ends there, and its
       length says so, so an empty-looking value is treated as empty */
    if (!buf->failed) buf->len = strlen(buf->data);
    return !buf->failed;
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

/* Item text; cloze: the question and the answer cue alone. */
static void kmed__mcqa_item_put(const kmed_mcqa_item *item, int cloze, kmed_buf *out)
{
    int k;
    kmed__mcqa_put_stripped(out, item->question);
    for (k = 0; k < KMED_MCQA_NOPT && !cloze; k++)
        kmed_buf_printf(out, "\n%c. %s", 'A' + k, item->opt[k]);
    kmed_buf_puts(out, "\n\xec\xa0\x95\xeb\x8b\xb5" KMED__MCQA_COLON); /* "정답：" */
}

KMED_API void kmed_mcqa_item_text(const kmed_mcqa_item *item, kmed_buf *out)
{
    kmed__mcqa_item_put(item, 0, out);
}

static kmed_result kmed__mcqa_prefix(const kmed_mcqa_set *fewshot, const char *subset,
                                     int shots, int chat, int cloze, kmed_buf *out,
                                     kmed_error *err)
{
    size_t i;
    int used = 0;
    if (chat) kmed_buf_puts(out, "<bos><start_of_turn>user\n");
    for (i = 0; fewshot && i < fewshot->n && used < shots; i++) {
        const kmed_mcqa_item *ex = &fewshot->items[i];
        if (strcmp(ex->subset, subset) != 0) continue;
        kmed__mcqa_item_put(ex, cloze, out);
        if (cloze) kmed_buf_printf(out, " %s\n\n", ex->opt[ex->answer - 1]);
        else kmed_buf_printf(out, " %c\n\n", 'A' + ex->answer - 1);
        used++;
    }
    if (used < shots)
        return KMED__ERR(err, KMED_ERR_NOT_FOUND, "few-shot set has %d '%s' items, %d asked",
                         used, subset, shots);
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

static kmed_result kmed__mcqa_prompt(const kmed_mcqa_item *item, const kmed_mcqa_set *fewshot,
                                     int shots, int chat, int cloze, kmed_buf *out,
                                     kmed_error *err)
{
    kmed_result r = kmed__mcqa_prefix(fewshot, item->subset, shots, chat, cloze, out, err);
    if (r != KMED_OK) return r;
    kmed__mcqa_item_put(item, cloze, out);
    if (chat) kmed_buf_puts(out, "<end_of_turn>\n<start_of_turn>model\n");
    return out->failed ? KMED__ERR(err, KMED_ERR_NOMEM, "out of memory") : KMED_OK;
}

KMED_API kmed_result kmed_mcqa_prefix(const kmed_mcqa_set *fewshot, const char *subset,
                                      int shots, int chat, kmed_buf *out, kmed_error *err)
{
    return kmed__mcqa_prefix(fewshot, subset, shots, chat, 0, out, err);
}

KMED_API kmed_result kmed_mcqa_prompt(const kmed_mcqa_item *item, const kmed_mcqa_set *fewshot,
                                      int shots, int chat, kmed_buf *out, kmed_error *err)
{
    return kmed__mcqa_prompt(item, fewshot, shots, chat, 0, out, err);
}

KMED_API kmed_result kmed_mcqa_config_prompt(const kmed_mcqa_item *item,
                                             const kmed_mcqa_config *cfg, kmed_buf *out,
                                             kmed_error *err)
{
    return kmed__mcqa_prompt(item, cfg->fewshot, cfg->shots, cfg->chat,
                             cfg->method == KMED_MCQA_CLOZE, out, err);
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
    return m == KMED_MCQA_GENERATE ? "exact_match"
           : m == KMED_MCQA_OPTION || m == KMED_MCQA_CLOZE ? "acc_norm" : "acc";
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
                                : cfg->method == KMED_MCQA_OPTION ? "option"
                                : cfg->method == KMED_MCQA_CLOZE ? "cloze" : "letter",
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

/* log softmax of logits[want] over V entries (the trainer's vectorised max and exp-sum;
   logits are not modified) */
static float kmed__mcqa_logprob(float *logits, size_t V, int want)
{
    float mx, sum;
    kmed__xent_stats(logits, V, 0.0f, &mx, &sum);
    return (float)((double)logits[want] - mx - log((double)sum));
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

/* Rows of final-normed hidden states gathered from the options' forwards before one LM
   head pass: the head reads the V x C embedding once per batch instead of once per option,
   which dominates option scoring on a small model with Gemma's 256000-token vocabulary. */
#define KMED__MCQA_ROWS 64

typedef struct kmed__mcqa_run {
    const kmed_gemma *model;
    const kmed_lora *lora;
    const kmed_tok *tok;
    kmed_pool *pool;
    int fwd;                    /* KMED_FWD_FAST or 0 */
    kmed_gemma_state st;
    float *logits;              /* (KMED__MCQA_ROWS, V) */
    float *xn;                  /* (KMED__MCQA_ROWS, C): rows awaiting the head */
    float *last;                /* (C): the prompt's last row */
    int want[KMED__MCQA_ROWS];  /* the token each row predicts */
    int opt[KMED__MCQA_ROWS];   /* and the option it belongs to */
    size_t rows;
    double lp[KMED_MCQA_NOPT];  /* sums of log p(option token | context) */
    size_t V, C, max_cont;
} kmed__mcqa_run;

/* Runs the head over the gathered rows and adds their log-probabilities to lp. */
static void kmed__mcqa_flush(kmed__mcqa_run *run)
{
    size_t i;
    if (!run->rows) return;
    kmed_gemma_head(run->model, run->lora, run->pool, run->xn, run->rows, run->fwd,
                    run->logits);
    for (i = 0; i < run->rows; i++)
        run->lp[run->opt[i]] += kmed__mcqa_logprob(run->logits + i * run->V, run->V,
                                                   run->want[i]);
    run->rows = 0;
}

/* Queues log p(cont | prompt) of option k, from the prompt's last row (run->last) and the
   cache holding the prompt; leaves the cache at the prompt. Long options run in pieces. */
static kmed_result kmed__mcqa_cont_logprob(kmed__mcqa_run *run, int k, const int *cont,
                                           size_t nc, kmed_error *err)
{
    size_t pos = run->st.pos, j = 0, t, m;
    kmed_result r;
    if (nc - 1 > run->max_cont)
        return KMED__ERR(err, KMED_ERR_LIMIT, "option of %zu tokens is too long", nc);
    if (run->rows == KMED__MCQA_ROWS) kmed__mcqa_flush(run);
    memcpy(run->xn + run->rows * run->C, run->last, run->C * sizeof *run->xn);
    run->want[run->rows] = cont[0];
    run->opt[run->rows++] = k;
    while (j + 1 < nc) {
        if (run->rows == KMED__MCQA_ROWS) kmed__mcqa_flush(run);
        m = nc - 1 - j < KMED__MCQA_ROWS - run->rows ? nc - 1 - j : KMED__MCQA_ROWS - run->rows;
        r = kmed_gemma_forward(run->model, run->lora, &run->st, run->pool, cont + j, m,
                               KMED_FWD_LOGITS_ALL | KMED_FWD_NO_HEAD | run->fwd,
                               run->xn + run->rows * run->C, NULL, err);
        if (r != KMED_OK) return r;
        for (t = 0; t < m; t++) {
            run->want[run->rows + t] = cont[j + t + 1];
            run->opt[run->rows + t] = k;
        }
        run->rows += m;
        j += m;
    }
    return kmed_gemma_state_set_pos(&run->st, pos, err);
}

/* Scores one item whose prompt ids are ids[0..n); the cache already holds ids[0..cached). */
static kmed_result kmed__mcqa_item(kmed__mcqa_run *run, const kmed_mcqa_config *cfg,
                                   const kmed_mcqa_item *it, const int *ids, size_t n,
                                   size_t cached, const int *letters, kmed_mcqa_pred *p,
                                   kmed_error *err)
{
    kmed_result r;
    int k, by_option = cfg->method == KMED_MCQA_OPTION || cfg->method == KMED_MCQA_CLOZE;
    p->pred = 0;
    if (cfg->method != KMED_MCQA_GENERATE) {
        if ((r = kmed_gemma_state_set_pos(&run->st, cached, err)) != KMED_OK) return r;
        r = kmed_gemma_forward(run->model, run->lora, &run->st, run->pool, ids + cached,
                               n - cached, KMED_FWD_LOGITS_LAST | run->fwd |
                               (by_option ? KMED_FWD_NO_HEAD : 0),
                               by_option ? run->last : run->logits, NULL, err);
        if (r != KMED_OK) return r;
    }
    if (cfg->method == KMED_MCQA_LETTER) {
        for (k = 0; k < KMED_MCQA_NOPT; k++)
            p->score[k] = kmed__mcqa_logprob(run->logits, run->V, letters[k]);
    } else if (by_option) {
        size_t nchar[KMED_MCQA_NOPT];
        run->rows = 0;
        for (k = 0; k < KMED_MCQA_NOPT && r == KMED_OK; k++) {
            kmed_buf cont = {0};
            int *cids = NULL;
            size_t nc = 0, i;
            run->lp[k] = 0;
            nchar[k] = 0;
            if (!cfg->chat) kmed_buf_puts(&cont, " ");
            kmed_buf_puts(&cont, it->opt[k]);
            if (cont.failed) r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
            if (r == KMED_OK) r = kmed__mcqa_encode(run->tok, cont.data, cont.len, 0, &cids, &nc, err);
            if (r == KMED_OK && nc) {
                r = kmed__mcqa_cont_logprob(run, k, cids, nc, err);
                for (i = 0; i < cont.len; i++) nchar[k] += ((unsigned char)cont.data[i] & 0xc0) != 0x80;
            }
            KMED_FREE(cids);
            kmed_buf_free(&cont);
        }
        if (r != KMED_OK) return r;
        kmed__mcqa_flush(run);
        for (k = 0; k < KMED_MCQA_NOPT; k++) /* per character, as acc_norm */
            p->score[k] = nchar[k] ? (float)(run->lp[k] / (double)nchar[k]) : -INFINITY;
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
    size_t i, n = 0, np = 0, max_tokens = 0, extra, rows;
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
        r = kmed_mcqa_config_prompt(&set->items[i], cfg, &text, err);
        if (r == KMED_OK) r = kmed__mcqa_encode(tok, text.data, text.len, !cfg->chat, &ids, &n, err);
        if (n > max_tokens) max_tokens = n;
        KMED_FREE(ids);
        ids = NULL;
    }
    /* room after the prompt: an option's tokens, or the generation budget */
    run.max_cont = cfg->method == KMED_MCQA_OPTION || cfg->method == KMED_MCQA_CLOZE ? 256
                                                                               : 1;
    extra = cfg->method == KMED_MCQA_GENERATE
                ? (size_t)(cfg->max_gen_tokens > 0 ? cfg->max_gen_tokens : 32) : run.max_cont;
    if (r == KMED_OK) r = kmed_gemma_state_init(&run.st, model, max_tokens + extra + 1, err);
    run.C = (size_t)model->cfg.hidden_size;
    /* letter scoring needs one row of logits; option scoring a head batch and its rows */
    rows = run.max_cont > 1 ? KMED__MCQA_ROWS : 1;
    if (r == KMED_OK &&
        (!(run.logits = (float *)kmed__calloc(rows * run.V, sizeof(float))) ||
         (rows > 1 && (!(run.xn = (float *)kmed__calloc(rows * run.C, sizeof(float))) ||
                       !(run.last = (float *)kmed__calloc(run.C, sizeof(float)))))))
        r = KMED__ERR(err, KMED_ERR_NOMEM, "out of memory");
    for (i = 0; i < set->n && r == KMED_OK; i++) {
        const kmed_mcqa_item *it = &set->items[i];
        size_t cached = 0;
        text.len = 0;
        r = kmed_mcqa_config_prompt(it, cfg, &text, err);
        if (r == KMED_OK) r = kmed__mcqa_encode(tok, text.data, text.len, !cfg->chat, &ids, &n, err);
        if (r == KMED_OK && !cfg->no_prefix_cache && strcmp(cur_subset, it->subset) != 0) {
            /* a new subset: run its shared prefix once; the cache keeps it */
            snprintf(cur_subset, sizeof cur_subset, "%s", it->subset);
            prefix.len = 0;
            KMED_FREE(pids);
            pids = NULL;
            np = 0;
            r = kmed__mcqa_prefix(cfg->fewshot, it->subset, cfg->shots, cfg->chat,
                                   cfg->method == KMED_MCQA_CLOZE, &prefix, err);
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
    KMED_FREE(run.xn);
    KMED_FREE(run.last);
    kmed_gemma_state_free(&run.st);
    kmed_buf_free(&text);
    kmed_buf_free(&prefix);
    return r;
}


#endif /* KMED__IMPLEMENTATION_DONE */
#endif /* KMED_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licences -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT Licence
Copyright (c) 2026 the kmed authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
------------------------------------------------------------------------------
*/

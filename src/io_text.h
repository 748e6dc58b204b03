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

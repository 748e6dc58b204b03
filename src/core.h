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

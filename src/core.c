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

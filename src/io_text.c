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

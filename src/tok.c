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
        op->op = KMED__TOK_OP_STRIP;
        op->arg1 = (int)kmed_json_num(kmed_json_get(j, "start"), 0);
        op->arg2 = (int)kmed_json_num(kmed_json_get(j, "stop"), 0);
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

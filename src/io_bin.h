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
/* Number of elements of a tensor (product of shape). */
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

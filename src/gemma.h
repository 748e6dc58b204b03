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
   adapter; training (train module) creates, updates, saves and loads it. */
typedef struct kmed_lora_ab { float *A, *B; } kmed_lora_ab;
typedef struct kmed_lora {
    int r;
    float alpha;
    float scale;                       /* alpha / r */
    unsigned targets;                  /* bit t set: target t adapted */
    int n_layers;
    kmed_lora_ab (*ab)[KMED_LORA_NTARGETS]; /* [n_layers][KMED_LORA_NTARGETS] */
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
    KMED_FWD_FAST = 4          /* matmuls with KMED_MM_FAST (activations quantized like
                                  llama.cpp); default: f32 activations, the reference */
};
/* Appends n tokens at position st->pos (batched prefill for n > 1, decode for n = 1)
   and advances st->pos by n. logits: see the flags (final soft-cap applied); NULL with
   neither flag. hidden (L+1, n, C), optional: the residual stream after the scaled
   embedding and after each layer. lora may be NULL; when set, every adapted target adds
   scale * (x A^T) B^T. Parallel through pool (may be NULL); results do not depend on its
   thread count. KMED_ERR_LIMIT if st->pos + n > st->max_tokens; KMED_ERR_ARG for an id
   outside [0, V); on error st->pos is unchanged. */
KMED_API kmed_result kmed_gemma_forward(const kmed_gemma *m, const kmed_lora *lora,
                                        kmed_gemma_state *st, kmed_pool *pool,
                                        const int *ids, size_t n, int flags,
                                        float *logits, float *hidden, kmed_error *err);

/* ---- .npy files (NumPy format 1.0, little-endian, C order), for comparing logits and
   hidden states with other implementations ---- */

/* Writes data (F32, I32 or I64, shape[0..ndim)) atomically. */
KMED_API kmed_result kmed_npy_write(const char *path, kmed_dtype dtype, const void *data,
                                    int ndim, const uint64_t *shape, kmed_error *err);
/* Reads a float32/int32/int64 .npy (format 1.x or 2.x, C order). *data is a new buffer
   (free with kmed_free); shape has room for KMED_MAX_DIMS dims. */
KMED_API kmed_result kmed_npy_read(const char *path, kmed_dtype *dtype, int *ndim,
                                   uint64_t *shape, void **data, kmed_error *err);

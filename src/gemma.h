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

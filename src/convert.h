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
   Deterministic for a seed, whatever the shard layout. */
KMED_API kmed_result kmed_gemma_init_random(const kmed_gemma_config *cfg, uint64_t seed,
                                            const char *dir, const kmed_hf_save_opts *opts,
                                            kmed_error *err);

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

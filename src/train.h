/* ---- train: LoRA adapters (PEFT format), training forward/backward, AdamW/SGD,
   schedules, checkpoints that resume bit-exactly ----
   Shapes: B sequences of T tokens (N = B*T rows), C hidden, H/Hkv heads of D, F
   feed-forward width, V vocab, r LoRA rank. Labels follow Hugging Face: not pre-shifted
   (the logits at t are scored against labels[t+1]), -100 = not trained; the loss is the
   mean over every counted token of the whole step (all micro-batches together). */

#define KMED_LABEL_IGNORE (-100)

/* ---- LoRA adapters ---- */

typedef struct kmed_lora_config {
    int r;                /* rank; 0: 8 */
    float alpha;          /* lora_alpha; 0: 2 * r. scale = alpha / r */
    unsigned targets;     /* bits (1u << KMED_LORA_*); 0: all seven */
    uint64_t layers;      /* bit l: layer l adapted; 0: every layer */
    uint64_t seed;        /* PEFT init: A ~ U(-1/sqrt(in), 1/sqrt(in)) from kmed_rng, B = 0 */
} kmed_lora_config;

/* PEFT module name of a target ("q_proj", ..., "down_proj"), NULL when out of range. */
KMED_API const char *kmed_lora_target_name(int target);
/* Parses a comma list of targets: PEFT names (q_proj ...), short names (q, k, v, o, gate,
   up, down), "attn" (q,k,v,o), "mlp" (gate,up,down) or "all". */
KMED_API kmed_result kmed_lora_targets_parse(const char *s, unsigned *targets,
                                             kmed_error *err);
/* Creates a freshly initialised adapter for model m (read for its shapes only). The
   adapter owns one block for every A and B; free with kmed_lora_free. */
KMED_API kmed_result kmed_lora_create(kmed_lora *lora, const kmed_gemma *m,
                                      const kmed_lora_config *cfg, kmed_error *err);
KMED_API void kmed_lora_free(kmed_lora *lora);
/* Number of trainable floats in the adapter. */
KMED_API size_t kmed_lora_numel(const kmed_lora *lora);
/* Writes a PEFT adapter directory: adapter_model.safetensors (F32, names
   base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight, ...) and
   adapter_config.json. base_name goes into base_model_name_or_path (may be NULL). Both
   files are written atomically; dir is created if missing. */
KMED_API kmed_result kmed_lora_save(const kmed_lora *lora, const char *dir,
                                    const char *base_name, kmed_error *err);
/* Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors, F32,
   F16 or BF16 tensors; a ".default" adapter name and use_rslora are understood) and
   checks every shape against m. Free with kmed_lora_free. */
KMED_API kmed_result kmed_lora_load(kmed_lora *lora, const kmed_gemma *m, const char *dir,
                                    kmed_error *err);
/* The merged weight of one target, W + scale * B A, as f32 [rows, cols] into out (the
   base in any computable dtype is dequantized row by row). Targets the adapter does not
   cover give the base weight. For exporting a merged model tensor by tensor. */
KMED_API kmed_result kmed_lora_merged_weight(const kmed_gemma *m, const kmed_lora *lora,
                                             int layer, int target, float *out,
                                             kmed_error *err);
/* Merges in place: W += scale * B A for every adapted target. Every adapted weight of m
   must be F32 and writable (memory the caller owns, or a model loaded as F32 from a
   BF16 checkpoint); KMED_ERR_UNSUPPORTED otherwise, with nothing changed. */
KMED_API kmed_result kmed_lora_merge(kmed_gemma *m, const kmed_lora *lora, kmed_error *err);

/* ---- training ---- */

typedef enum kmed_optim_kind { KMED_OPTIM_ADAMW, KMED_OPTIM_SGD } kmed_optim_kind;
typedef enum kmed_sched_kind { KMED_SCHED_CONSTANT, KMED_SCHED_COSINE } kmed_sched_kind;

/* Optimiser and schedule. Zero fields mean the defaults in the comments. */
typedef struct kmed_optim_config {
    kmed_optim_kind kind;     /* AdamW (torch.optim.AdamW semantics) or plain SGD */
    float lr;                 /* peak learning rate; 0: 1e-4 */
    float beta1, beta2;       /* 0: 0.9, 0.999 */
    float eps;                /* 0: 1e-8 */
    float weight_decay;       /* decoupled (AdamW) / L2 (SGD); 0: none */
    float clip;               /* global gradient-norm clip; 0: off */
    kmed_sched_kind schedule; /* lr: linear warmup, then constant or cosine to min_lr */
    long warmup;              /* warmup steps (lr rises linearly to lr at step warmup) */
    long total_steps;         /* cosine length; 0 = constant after warmup */
    float min_lr_ratio;       /* cosine floor as a fraction of lr; 0: 0 */
} kmed_optim_config;

/* Learning rate for optimiser step `step` (1-based) under cfg. */
KMED_API float kmed_optim_lr(const kmed_optim_config *cfg, long step);

typedef struct kmed_train_config {
    int full;                 /* 1: full-parameter training (every weight, norms and the
                                 tied embedding, as f32 copies); 0: LoRA over a frozen base */
    int max_batch;            /* B: sequences per micro-batch the arena is sized for; 0: 1 */
    int max_seq;              /* T: tokens per sequence the arena is sized for; 0: 256 */
    int checkpointing;        /* 1: keep only each layer's input and recompute the layer in
                                 the backward pass (about 1/3 more compute, far less memory) */
    size_t head_rows;         /* LM-head row block (logits [rows, V] live at once);
                                 0: as many rows as fit 32M floats (128 MB) */
    float spike_factor;       /* kmed_train_step fails when the loss exceeds factor x the
                                 running mean (after 10 steps); 0: off */
    kmed_optim_config optim;
} kmed_train_config;

/* One trainable tensor: value, gradient and optimiser moments (m, v NULL for SGD). */
typedef struct kmed_param {
    char name[128];           /* PEFT name (LoRA) or HF name (full) */
    float *p, *g, *m, *v;     /* [n] */
    size_t n;
    int ndim;
    uint64_t shape[2];
} kmed_param;

typedef struct kmed_train kmed_train;

/* Creates a trainer. LoRA mode (cfg->full 0) borrows m and lora, both must outlive the
   trainer, and updates lora's tensors in place; the base stays frozen in its dtype (F32,
   BF16, Q8_0, Q4_0: dequantized on the fly, never stored in f32). Full mode (lora NULL)
   copies every weight of m into trainer-owned f32 parameters; kmed_train_model gives a
   model that reads them. pool may be NULL and must outlive the trainer. */
KMED_API kmed_result kmed_train_create(kmed_train **tr, const kmed_gemma *m, kmed_lora *lora,
                                       const kmed_train_config *cfg, kmed_pool *pool,
                                       kmed_error *err);
KMED_API void kmed_train_free(kmed_train *tr);
/* The trainable tensors in a fixed order (owned by the trainer). */
KMED_API size_t kmed_train_params(kmed_train *tr, kmed_param **params);
/* Full mode: the model whose weights are the trainer's f32 parameters (a view, valid
   until kmed_train_free). LoRA mode: the borrowed base model. */
KMED_API const kmed_gemma *kmed_train_model(const kmed_train *tr);
/* Optimiser steps taken so far. */
KMED_API long kmed_train_step_count(const kmed_train *tr);

/* Counted targets of a batch: positions t < T-1 whose labels[t+1] is not -100. */
KMED_API size_t kmed_train_count(const int *labels, size_t B, size_t T);
KMED_API void kmed_train_zero_grad(kmed_train *tr);
/* Forward and backward over B sequences of T tokens, ids and labels (B, T). Adds
   d(sum of token losses / norm) to the gradients and the sum of token losses (natural
   log, double) to *loss_sum and the counted tokens to *count (either may be NULL).
   norm 0: forward only, gradients untouched. KMED_ERR_ARG for ids outside [0, V) or
   B > max_batch, T > max_seq. */
KMED_API kmed_result kmed_train_forward_backward(kmed_train *tr, const int *ids,
                                                 const int *labels, size_t B, size_t T,
                                                 double norm, double *loss_sum,
                                                 size_t *count, kmed_error *err);
/* Mean loss over the counted tokens (forward only); 0 when none is counted. */
KMED_API kmed_result kmed_train_loss(kmed_train *tr, const int *ids, const int *labels,
                                     size_t B, size_t T, double *loss, kmed_error *err);
/* KMED_ERR_NUMERIC naming the first tensor whose gradient holds NaN or inf. */
KMED_API kmed_result kmed_train_check_grads(kmed_train *tr, kmed_error *err);
/* Global L2 norm of all gradients (double accumulation, fixed order). */
KMED_API double kmed_train_grad_norm(kmed_train *tr);
/* One optimiser update with learning rate lr from the current gradients: clipping to
   cfg.optim.clip first, then AdamW or SGD; advances the step count. Deterministic. */
KMED_API void kmed_train_apply(kmed_train *tr, float lr);
/* One whole step: `accum` micro-batches of B sequences each, ids and labels
   (accum, B, T); the loss (mean over all their counted tokens) goes to *loss.
   = kmed_train_grads + kmed_train_update. On KMED_ERR_NUMERIC nothing was updated. */
KMED_API kmed_result kmed_train_step(kmed_train *tr, const int *ids, const int *labels,
                                     size_t accum, size_t B, size_t T, double *loss,
                                     kmed_error *err);
/* The first half of a step: zeroes gradients, runs forward/backward over the
   micro-batches, checks the loss (NaN/inf, spike guard) and the gradients. The gradients
   can be inspected or saved before kmed_train_update. KMED_ERR_ARG when no token of the
   step is counted. */
KMED_API kmed_result kmed_train_grads(kmed_train *tr, const int *ids, const int *labels,
                                      size_t accum, size_t B, size_t T, double *loss,
                                      kmed_error *err);
/* The second half: records the loss for the spike guard and applies the update at the
   scheduled lr (kmed_optim_lr of the next step). */
KMED_API void kmed_train_update(kmed_train *tr);
/* Writes the current gradients as F32 safetensors under the parameter names. */
KMED_API kmed_result kmed_train_save_grads(kmed_train *tr, const char *path,
                                           kmed_error *err);
/* Full mode: writes the trained model as an HF directory (config.json with the Gemma2
   keys, model.safetensors with HF names, F32, no lm_head: tied). Atomic per file. */
KMED_API kmed_result kmed_train_save_model(kmed_train *tr, const char *dir,
                                           kmed_error *err);

/* Checkpoint = parameters + optimiser moments + step + loop state, in one safetensors
   file written atomically, so a run killed at any moment resumes from the last complete
   checkpoint and ends bit-identical to an uninterrupted run (same thread count). */
typedef struct kmed_train_ckpt {
    uint64_t data_pos;        /* sequences the loop consumed */
    kmed_rng rng;             /* the loop's random state */
    float *train_loss;        /* [n_train] loss per step (for curves) */
    size_t n_train;
    float *val_loss;          /* [n_val][2]: (step, loss) */
    size_t n_val;
} kmed_train_ckpt;
KMED_API kmed_result kmed_train_ckpt_save(kmed_train *tr, const char *path,
                                          const kmed_train_ckpt *st, kmed_error *err);
/* Restores parameters, moments and step into tr (which must have the same parameters:
   names and shapes are checked) and fills *st (its arrays are new: free with
   kmed_train_ckpt_free). */
KMED_API kmed_result kmed_train_ckpt_load(kmed_train *tr, const char *path,
                                          kmed_train_ckpt *st, kmed_error *err);
KMED_API void kmed_train_ckpt_free(kmed_train_ckpt *st);

/* Writes a loss-curve SVG (train per step, validation points) atomically. */
KMED_API kmed_result kmed_train_svg(const char *path, const float *train_loss,
                                    size_t n_train, const float *val_loss, size_t n_val,
                                    kmed_error *err);

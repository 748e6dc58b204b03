/* bench_train: LoRA training tokens/s and peak RSS on the ~160M-parameter bench model
   (vocab 256000, hidden 512, intermediate 2048, 8 layers, 8 heads, 4 KV heads, head_dim 64,
   window 128, soft-caps 50/30; random weights) with the frozen base in F32, BF16, Q8_0 or
   Q4_0, LoRA r=16 on all seven targets, one sequence per step. One configuration per
   process, so the peak RSS is its own.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/bench_train.c -o build/bench_train \
      -lm -lpthread
   ./build/bench_train [--type q4_0] [--threads 2] [--seq 256] [--steps 3] [--ckpt]
                       [--layers 8] [--vocab 256000]                                       */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"
#include <sys/resource.h>

static const char *usage =
    "usage: bench_train [--type f32|bf16|q8_0|q4_0] [--threads N] [--seq T] [--steps N]\n"
    "                   [--ckpt] [--layers L] [--vocab V] [--r R] [--head-rows N]\n"
    "  defaults: --type q4_0 --threads 2 --seq 256 --steps 3 --layers 8 --vocab 256000 "
    "--r 16\n";

/* Random rows quantized into a new buffer of dtype t. */
static void *rand_weight(kmed_rng *rng, kmed_dtype t, size_t rows, size_t cols, float scale)
{
    size_t rb = kmed_dtype_bytes(t, cols), i, j;
    unsigned char *q = (unsigned char *)malloc(rb * rows);
    float *row = (float *)malloc(cols * sizeof(float));
    if (!q || !row) die("out of memory");
    for (i = 0; i < rows; i++) {
        for (j = 0; j < cols; j++) row[j] = scale * (float)(2.0 * kmed_rng_uniform(rng) - 1.0);
        kmed_quantize_row(t, row, q + i * rb, cols);
    }
    free(row);
    return q;
}

int main(int argc, char **argv)
{
    const char *type_s = "q4_0";
    long threads = 2, T = 256, steps = 3, L = 8, V = 256000, r = 16, head_rows = 0;
    int ckpt = 0, i, l, t;
    kmed_gemma_config c;
    kmed_gemma m;
    kmed_lora lora;
    kmed_lora_config lc;
    kmed_train_config tc;
    kmed_train *tr;
    kmed_pool *pool;
    kmed_error err = {0};
    kmed_rng rng;
    kmed_dtype dt;
    int *ids;
    double t0, el, loss, best = 1e30;
    struct rusage ru;
    size_t base_bytes = 0;

    kmed_tool_name = "bench_train";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--type")) type_s = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--threads")) threads = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--seq")) T = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--steps")) steps = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--layers")) L = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--vocab")) V = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--r")) r = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--ckpt")) ckpt = 1;
        else if (!strcmp(a, "--head-rows")) head_rows = arg_long(argc, argv, &i, usage);
        else usage_error(usage, "unknown flag '%s'", a);
    }
    dt = kmed_dtype_parse(type_s);
    if (dt != KMED_F32 && dt != KMED_BF16 && dt != KMED_Q8_0 && dt != KMED_Q4_0)
        usage_error(usage, "--type: f32, bf16, q8_0 or q4_0");
    if (T < 2 || steps < 1 || L < 1 || V < 2 || r < 1 || threads < 0)
        usage_error(usage, "bad sizes");

    memset(&c, 0, sizeof c);
    c.vocab_size = (int)V; c.hidden_size = 512; c.intermediate_size = 2048;
    c.n_layers = (int)L; c.n_heads = 8; c.n_kv_heads = 4; c.head_dim = 64;
    c.query_pre_attn_scalar = 64; c.rms_norm_eps = 1e-6f; c.rope_theta = 10000;
    c.attn_softcap = 50; c.final_softcap = 30; c.sliding_window = 128;
    c.max_position = 8192; c.bos_id = 2; c.eos_id = 1; c.pad_id = 0;
    die_if(kmed_gemma_init(&m, &c, &err), &err, "model");
    kmed_rng_seed(&rng, 1);
    m.embed.data = rand_weight(&rng, dt, (size_t)V, 512, 0.05f);
    m.embed.type = dt; m.embed.rows = (size_t)V; m.embed.cols = 512;
    base_bytes += kmed_dtype_bytes(dt, (uint64_t)V * 512);
    for (l = 0; l < L; l++) {
        kmed_weight *w[7];
        size_t rows[7] = {512, 256, 256, 512, 2048, 2048, 512};
        size_t cols[7] = {512, 512, 512, 512, 512, 512, 2048};
        w[0] = &m.layers[l].q; w[1] = &m.layers[l].k; w[2] = &m.layers[l].v;
        w[3] = &m.layers[l].o; w[4] = &m.layers[l].gate; w[5] = &m.layers[l].up;
        w[6] = &m.layers[l].down;
        for (t = 0; t < 7; t++) {
            w[t]->data = rand_weight(&rng, dt, rows[t], cols[t], 1.0f / sqrtf((float)cols[t]));
            w[t]->type = dt; w[t]->rows = rows[t]; w[t]->cols = cols[t];
            base_bytes += kmed_dtype_bytes(dt, (uint64_t)rows[t] * cols[t]);
        }
    }
    memset(&lc, 0, sizeof lc);
    lc.r = (int)r; lc.alpha = 2.0f * (float)r; lc.seed = 1;
    die_if(kmed_lora_create(&lora, &m, &lc, &err), &err, "lora");
    memset(&tc, 0, sizeof tc);
    tc.max_batch = 1; tc.max_seq = (int)T; tc.checkpointing = ckpt;
    tc.head_rows = (size_t)head_rows;
    tc.optim.lr = 1e-4f;
    die_if(kmed_pool_create(&pool, (int)threads, &err), &err, "pool");
    die_if(kmed_train_create(&tr, &m, &lora, &tc, pool, &err), &err, "trainer");
    ids = (int *)malloc((size_t)T * sizeof(int));
    for (i = 0; i < T; i++) ids[i] = 2 + (int)kmed_rng_below(&rng, (uint64_t)V - 2);
    for (i = 0; i <= steps; i++) { /* step 0 warms up */
        t0 = kmed_time_now();
        die_if(kmed_train_step(tr, ids, ids, 1, 1, (size_t)T, &loss, &err), &err, "step");
        el = kmed_time_now() - t0;
        if (i > 0 && el < best) best = el;
    }
    getrusage(RUSAGE_SELF, &ru);
    printf("train %-5s threads %ld seq %ld r %ld ckpt %d: %.3f s/step  %.1f tok/s  "
           "peak RSS %.0f MB (base %.0f MB, adapter+grad+adam %.1f MB)  loss %.3f\n",
           type_s, (long)kmed_pool_threads(pool), T, r, ckpt, best, (double)T / best,
           (double)ru.ru_maxrss / 1024.0, (double)base_bytes / 1048576.0,
           4.0 * (double)kmed_lora_numel(&lora) * 4.0 / 1048576.0, loss);
    kmed_train_free(tr);
    kmed_pool_free(pool);
    kmed_lora_free(&lora);
    free(ids);
    return 0;
}

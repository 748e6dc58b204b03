/* kmed-bench: inference speed of the ~160M-parameter Gemma-2 bench model (prefill and
   decode tokens/s, peak RSS) for each weight dtype and thread count, next to the roofline
   from this machine's measured FMA peak and read bandwidth.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/kmed-bench.c -o build/kmed-bench \
      -lm -lpthread */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"

#include <pthread.h>
#include <sys/resource.h>
#include <sys/wait.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static const char *usage =
    "usage: kmed-bench [options]\n"
    "\n"
    "Inference: prefill (logits of the last position only) and decode (single-token steps\n"
    "with full logits) on the bench model: vocab 256000, hidden 512, intermediate 2048,\n"
    "8 layers, 8 heads, 4 KV heads, head_dim 64, sliding window 128, soft-caps 50/30,\n"
    "random weights; or a model file. Each dtype runs in a fresh process so its peak RSS\n"
    "is its own.\n"
    "\n"
    "  --model PATH     load this model (HF dir or .gguf), converted to each --types entry\n"
    "                   on load; peak RSS then shows the streaming converter (default: the\n"
    "                   random bench model built in memory)\n"
    "  --write-model DIR  first write the bench model (random, BF16 safetensors) to DIR\n"
    "                   and benchmark loading it (implies --model DIR) (default: none)\n"
    "  --types LIST     weight dtypes (default: f32,bf16,q8_0,q4_0)\n"
    "  --threads LIST   thread counts (default: 1,2)\n"
    "  --prefill N      prompt tokens (default: 512)\n"
    "  --decode N       decode steps (default: 64)\n"
    "  --fast           quantize activations like llama.cpp (KMED_FWD_FAST) (default: off)\n"
    "  --no-roofline    skip the FMA/bandwidth measurement (default: measure)\n"
    "  --help           this text\n";

/* ---- roofline: FMA peak and read bandwidth, each on `nt` threads ---- */

typedef struct rl_job { int kind; size_t n; const float *buf; double out; } rl_job;

/* FMA: 12 independent accumulator registers (2 FMA ports x 4-5 cycles latency) so the
   loop is throughput-bound; read: vector loads into 4 accumulators. */
#if defined(__AVX512F__)
typedef __m512 rl_vec;
#define RL_LANES 16
#define RL_SET(x) _mm512_set1_ps(x)
#define RL_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define RL_ADD(a, b) _mm512_add_ps(a, b)
#define RL_LOAD(p) _mm512_loadu_ps(p)
#define RL_FIRST(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 rl_vec;
#define RL_LANES 8
#define RL_SET(x) _mm256_set1_ps(x)
#define RL_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define RL_ADD(a, b) _mm256_add_ps(a, b)
#define RL_LOAD(p) _mm256_loadu_ps(p)
#define RL_FIRST(v) _mm256_cvtss_f32(v)
#else
typedef float rl_vec;
#define RL_LANES 1
#define RL_SET(x) (x)
#define RL_FMA(a, b, c) ((a) * (b) + (c))
#define RL_ADD(a, b) ((a) + (b))
#define RL_LOAD(p) (*(p))
#define RL_FIRST(v) (v)
#endif

static void *rl_run(void *arg)
{
    rl_job *j = (rl_job *)arg;
    size_t i;
    if (j->kind == 0) {
        rl_vec m = RL_SET(0.999999f), c = RL_SET(1e-7f);
        rl_vec a0 = RL_SET(0), a1 = RL_SET(1), a2 = RL_SET(2), a3 = RL_SET(3);
        rl_vec a4 = RL_SET(4), a5 = RL_SET(5), a6 = RL_SET(6), a7 = RL_SET(7);
        rl_vec a8 = RL_SET(8), a9 = RL_SET(9), a10 = RL_SET(10), a11 = RL_SET(11);
        for (i = 0; i < j->n; i++) {
            a0 = RL_FMA(a0, m, c); a1 = RL_FMA(a1, m, c); a2 = RL_FMA(a2, m, c);
            a3 = RL_FMA(a3, m, c); a4 = RL_FMA(a4, m, c); a5 = RL_FMA(a5, m, c);
            a6 = RL_FMA(a6, m, c); a7 = RL_FMA(a7, m, c); a8 = RL_FMA(a8, m, c);
            a9 = RL_FMA(a9, m, c); a10 = RL_FMA(a10, m, c); a11 = RL_FMA(a11, m, c);
        }
        a0 = RL_ADD(RL_ADD(RL_ADD(a0, a1), RL_ADD(a2, a3)), RL_ADD(RL_ADD(a4, a5),
                                                                   RL_ADD(a6, a7)));
        a0 = RL_ADD(a0, RL_ADD(RL_ADD(a8, a9), RL_ADD(a10, a11)));
        j->out = (double)RL_FIRST(a0);
    } else {
        rl_vec s0 = RL_SET(0), s1 = s0, s2 = s0, s3 = s0;
        for (i = 0; i + 4 * RL_LANES <= j->n; i += 4 * RL_LANES) {
            s0 = RL_ADD(s0, RL_LOAD(j->buf + i));
            s1 = RL_ADD(s1, RL_LOAD(j->buf + i + RL_LANES));
            s2 = RL_ADD(s2, RL_LOAD(j->buf + i + 2 * RL_LANES));
            s3 = RL_ADD(s3, RL_LOAD(j->buf + i + 3 * RL_LANES));
        }
        j->out = (double)RL_FIRST(RL_ADD(RL_ADD(s0, s1), RL_ADD(s2, s3)));
    }
    return NULL;
}

static double rl_parallel(int kind, int nt, size_t n, const float *buf)
{
    pthread_t th[64];
    rl_job jobs[64];
    double t0 = kmed_time_now();
    int i;
    for (i = 0; i < nt; i++) {
        jobs[i].kind = kind;
        jobs[i].n = kind ? n / (size_t)nt : n;
        jobs[i].buf = buf + (kind ? (size_t)i * (n / (size_t)nt) : 0);
        pthread_create(&th[i], NULL, rl_run, &jobs[i]);
    }
    for (i = 0; i < nt; i++) pthread_join(th[i], NULL);
    return kmed_time_now() - t0;
}

/* GFLOP/s of FMA and GB/s of reads on nt threads. */
static void roofline(int nt, double *gflops, double *gbs)
{
    size_t iters = 20000000, n = (size_t)256 << 20 >> 2, i; /* 256 MB buffer */
    float *buf = (float *)malloc(n * sizeof(float));
    double t, best = 1e30;
    double lanes = RL_LANES;
    for (i = 0; i < 3; i++) {   /* best of three: a run can lose its core for a while */
        t = rl_parallel(0, nt, iters, NULL);
        if (t < best) best = t;
    }
    *gflops = (double)nt * (double)iters * 12 * lanes * 2 / best / 1e9;
    best = 1e30;
    if (!buf) { *gbs = 0; return; }
    for (i = 0; i < n; i++) buf[i] = (float)(i & 7);
    for (i = 0; i < 5; i++) {
        t = rl_parallel(1, nt, n, buf);
        if (t < best) best = t;
    }
    *gbs = (double)n * sizeof(float) / best / 1e9;
    free(buf);
}

/* ---- bench model ---- */

static void bench_config(kmed_gemma_config *c)
{
    memset(c, 0, sizeof *c);
    c->vocab_size = 256000;
    c->hidden_size = 512;
    c->intermediate_size = 2048;
    c->n_layers = 8;
    c->n_heads = 8;
    c->n_kv_heads = 4;
    c->head_dim = 64;
    c->query_pre_attn_scalar = 64;
    c->rms_norm_eps = 1e-6f;
    c->rope_theta = 10000;
    c->attn_softcap = 50;
    c->final_softcap = 30;
    c->sliding_window = 128;
    c->max_position = 8192;
    c->bos_id = 2;
    c->eos_id = 1;
}

/* A random weight [rows, cols] in dtype t (uniform, std ~0.02), written row by row so no
   f32 copy of a quantized tensor exists. */
static void *rand_weight(kmed_weight *w, kmed_dtype t, size_t rows, size_t cols, kmed_rng *rng)
{
    size_t rb = kmed_dtype_bytes(t, cols), i, j;
    unsigned char *buf = (unsigned char *)malloc(rows * rb);
    float *tmp = (float *)malloc(cols * sizeof(float));
    if (!buf || !tmp) die("out of memory for a %zu x %zu weight", rows, cols);
    for (i = 0; i < rows; i++) {
        for (j = 0; j < cols; j++)
            tmp[j] = (float)((kmed_rng_uniform(rng) - 0.5) * 0.07);
        kmed_quantize_row(t, tmp, buf + i * rb, cols);
    }
    free(tmp);
    w->data = buf;
    w->type = t;
    w->rows = rows;
    w->cols = cols;
    return buf;
}

static void build_random(kmed_gemma *m, kmed_dtype t, void **bufs)
{
    kmed_gemma_config c;
    kmed_error err = {0};
    kmed_rng rng;
    size_t C, F, QD, KD, l, nb = 0;
    bench_config(&c);
    die_if(kmed_gemma_init(m, &c, &err), &err, "creating bench model");
    C = 512; F = 2048; QD = 512; KD = 256;
    kmed_rng_seed(&rng, 1234);
    bufs[nb++] = rand_weight(&m->embed, t, 256000, C, &rng);
    for (l = 0; l < 8; l++) {
        kmed_gemma_layer *y = &m->layers[l];
        bufs[nb++] = rand_weight(&y->q, t, QD, C, &rng);
        bufs[nb++] = rand_weight(&y->k, t, KD, C, &rng);
        bufs[nb++] = rand_weight(&y->v, t, KD, C, &rng);
        bufs[nb++] = rand_weight(&y->o, t, C, QD, &rng);
        bufs[nb++] = rand_weight(&y->gate, t, F, C, &rng);
        bufs[nb++] = rand_weight(&y->up, t, F, C, &rng);
        bufs[nb++] = rand_weight(&y->down, t, C, F, &rng);
    }
}

/* Useful FLOPs of a prefill of n tokens from position 0 (matmuls, attention, last-position
   LM head) and bytes read per decode token (all weights: the tied LM head reads the whole
   embedding; plus the KV cache at position p). */
static double prefill_flops(const kmed_gemma_config *c, size_t n)
{
    double C = c->hidden_size, F = c->intermediate_size, QD = c->n_heads * c->head_dim;
    double KD = c->n_kv_heads * c->head_dim, lin = C * (2 * QD + 2 * KD) + 3 * C * F;
    double att = 0;
    size_t l, t;
    for (l = 0; l < (size_t)c->n_layers; l++)
        for (t = 0; t < n; t++) {
            size_t keys = t + 1;
            if (l % 2 == 0 && c->sliding_window && keys > (size_t)c->sliding_window)
                keys = (size_t)c->sliding_window;
            att += 4.0 * (double)keys * QD; /* q.k and p.v */
        }
    return 2.0 * lin * (double)c->n_layers * (double)n + att +
           2.0 * (double)c->vocab_size * C;
}

static double peak_rss_mb(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_maxrss * 1024.0 / 1e6; /* Linux: KiB */
}

typedef struct bench_args {
    const char *model;
    size_t prefill, decode;
    int threads[8], n_threads;
    int fast;
    double gflops[8], gbs[8];
} bench_args;

static void run_dtype(const bench_args *a, kmed_dtype t)
{
    kmed_gemma m;
    kmed_error err = {0};
    void *bufs[64];
    size_t nbufs = 0, i, V;
    int *ids, ti;
    float *logits;
    double t0 = kmed_time_now(), load_s, wbytes, fl;

    memset(bufs, 0, sizeof bufs);
    if (a->model) {
        kmed_gemma_opts o;
        memset(&o, 0, sizeof o);
        o.convert = 1;
        o.type = t;
        die_if(kmed_gemma_load(&m, a->model, &o, &err), &err, "loading model");
    } else {
        build_random(&m, t, bufs);
        nbufs = 57;
    }
    load_s = kmed_time_now() - t0;
    V = (size_t)m.cfg.vocab_size;
    wbytes = (double)kmed_gemma_weight_bytes(&m);
    fl = prefill_flops(&m.cfg, a->prefill);
    ids = (int *)malloc(a->prefill * sizeof(int));
    logits = (float *)malloc(V * sizeof(float));
    if (!ids || !logits) die("out of memory");
    for (i = 0; i < a->prefill; i++) ids[i] = (int)((i * 7919 + 11) % V);
    ids[0] = 2;
    printf("%-5s weights %.1f MB, %s %.2f s, peak RSS after load %.0f MB\n",
           kmed_dtype_name(t), wbytes / 1e6, a->model ? "load+convert" : "build",
           load_s, peak_rss_mb());
    for (ti = 0; ti < a->n_threads; ti++) {
        kmed_pool *pool;
        kmed_gemma_state st;
        double tp, td, pp, tg, kv_bytes, roof_tg;
        int nt = a->threads[ti], flags = a->fast ? KMED_FWD_FAST : 0;
        die_if(kmed_pool_create(&pool, nt, &err), &err, "pool");
        die_if(kmed_gemma_state_init(&st, &m, a->prefill + a->decode, &err), &err, "state");
        t0 = kmed_time_now();
        die_if(kmed_gemma_forward(&m, NULL, &st, pool, ids, a->prefill,
                                  KMED_FWD_LOGITS_LAST | flags, logits, NULL, &err),
               &err, "prefill");
        tp = kmed_time_now() - t0;
        t0 = kmed_time_now();
        for (i = 0; i < a->decode; i++) {
            int next = (int)((i * 31 + 5) % V);
            die_if(kmed_gemma_forward(&m, NULL, &st, pool, &next, 1,
                                      KMED_FWD_LOGITS_LAST | flags, logits, NULL, &err),
                   &err, "decode");
        }
        td = kmed_time_now() - t0;
        pp = (double)a->prefill / tp;
        tg = (double)a->decode / td;
        /* K and V read per step at the mean decode position, f32 */
        kv_bytes = 2.0 * 4 * m.cfg.n_layers * m.cfg.n_kv_heads * m.cfg.head_dim *
                   ((double)a->prefill + a->decode / 2.0);
        roof_tg = a->gbs[ti] > 0 ? a->gbs[ti] * 1e9 / (wbytes + kv_bytes) : 0;
        printf("  %d thr: pp%zu %7.1f tok/s = %6.1f GFLOP/s (%4.1f%% of %.0f) | tg%zu %6.1f "
               "tok/s, %.1f GB/s (%4.1f%% of roofline %.1f tok/s at %.1f GB/s)\n",
               nt, a->prefill, pp, fl / tp / 1e9,
               a->gflops[ti] > 0 ? 100 * fl / tp / 1e9 / a->gflops[ti] : 0, a->gflops[ti],
               a->decode, tg, (wbytes + kv_bytes) * tg / 1e9,
               roof_tg > 0 ? 100 * tg / roof_tg : 0, roof_tg, a->gbs[ti]);
        fflush(stdout);
        kmed_gemma_state_free(&st);
        kmed_pool_free(pool);
    }
    printf("  peak RSS %.0f MB\n", peak_rss_mb());
    fflush(stdout);
    kmed_gemma_free(&m);
    for (i = 0; i < nbufs; i++) free(bufs[i]);
    free(ids);
    free(logits);
}

static int parse_list(const char *s, const char *const *names, int n_names, int *out, int cap)
{
    int k = 0;
    while (*s && k < cap) {
        const char *e = strchr(s, ',');
        size_t len = e ? (size_t)(e - s) : strlen(s);
        char tok[32];
        int i;
        snprintf(tok, sizeof tok, "%.*s", (int)(len < 31 ? len : 31), s);
        if (names) {
            for (i = 0; i < n_names; i++)
                if (!strcmp(tok, names[i])) break;
            if (i == n_names) return -1;
            out[k++] = i;
        } else {
            char *end;
            long v = strtol(tok, &end, 10);
            if (!*tok || *end || v < 1 || v > 64) return -1;
            out[k++] = (int)v;
        }
        s = e ? e + 1 : s + len;
    }
    return k;
}

int main(int argc, char **argv)
{
    static const char *const tnames[4] = { "f32", "bf16", "q8_0", "q4_0" };
    static const kmed_dtype tvals[4] = { KMED_F32, KMED_BF16, KMED_Q8_0, KMED_Q4_0 };
    bench_args a;
    int types[8], n_types, i, roof = 1;
    const char *write_dir = NULL;
    memset(&a, 0, sizeof a);
    a.prefill = 512;
    a.decode = 64;
    a.threads[0] = 1;
    a.threads[1] = 2;
    a.n_threads = 2;
    types[0] = 0; types[1] = 1; types[2] = 2; types[3] = 3;
    n_types = 4;
    kmed_tool_name = "kmed-bench";
    for (i = 1; i < argc; i++) {
        const char *s = argv[i];
        if (!strcmp(s, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(s, "--model")) a.model = arg_str(argc, argv, &i, usage);
        else if (!strcmp(s, "--write-model")) write_dir = arg_str(argc, argv, &i, usage);
        else if (!strcmp(s, "--types")) {
            n_types = parse_list(arg_str(argc, argv, &i, usage), tnames, 4, types, 8);
            if (n_types <= 0) usage_error(usage, "--types: expected f32,bf16,q8_0,q4_0");
        } else if (!strcmp(s, "--threads")) {
            a.n_threads = parse_list(arg_str(argc, argv, &i, usage), NULL, 0, a.threads, 8);
            if (a.n_threads <= 0) usage_error(usage, "--threads: expected e.g. 1,2");
        } else if (!strcmp(s, "--prefill")) {
            long v = arg_long(argc, argv, &i, usage);
            if (v < 1 || v > 100000) usage_error(usage, "--prefill out of range");
            a.prefill = (size_t)v;
        } else if (!strcmp(s, "--decode")) {
            long v = arg_long(argc, argv, &i, usage);
            if (v < 1 || v > 100000) usage_error(usage, "--decode out of range");
            a.decode = (size_t)v;
        } else if (!strcmp(s, "--fast")) a.fast = 1;
        else if (!strcmp(s, "--no-roofline")) roof = 0;
        else usage_error(usage, "unknown flag '%s'", s);
    }
    if (write_dir) {
        kmed_gemma_config c;
        kmed_hf_save_opts so;
        kmed_error err = {0};
        double t0 = kmed_time_now();
        bench_config(&c);
        memset(&so, 0, sizeof so);
        so.dtype = KMED_BF16;
        die_if(kmed_gemma_init_random(&c, 1234, NULL, write_dir, &so, &err), &err,
               "writing the bench model");
        printf("wrote the bench model (BF16) to %s in %.1f s\n", write_dir,
               kmed_time_now() - t0);
        a.model = write_dir;
    }
    printf("prefill %zu tokens (last-position logits), decode %zu steps (full logits)%s\n",
           a.prefill, a.decode, a.fast ? ", fast path" : ", f32 activations");
    fflush(stdout);
    for (i = 0; i < n_types; i++) {
        pid_t pid;
        int status = 0, k;
        /* measured again before each dtype: this machine's bandwidth drifts by a third
           or more within minutes, so a roofline taken once at the start misstates later runs */
        for (k = 0; k < a.n_threads && roof; k++) {
            roofline(a.threads[k], &a.gflops[k], &a.gbs[k]);
            printf("roofline %d thread%s: FMA peak %.0f GFLOP/s, read bandwidth %.1f GB/s\n",
                   a.threads[k], a.threads[k] > 1 ? "s" : "", a.gflops[k], a.gbs[k]);
        }
        fflush(stdout);
        pid = fork();
        if (pid == 0) {
            run_dtype(&a, tvals[types[i]]);
            exit(0);
        }
        if (pid < 0) die("fork failed");
        waitpid(pid, &status, 0);
        if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
            die("%s run failed", tnames[types[i]]);
    }
    return 0;
}

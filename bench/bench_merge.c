/* bench_merge: peak RSS and throughput of kmed_merge_run on the ~160M-parameter bench model
   (vocab 256000, hidden 512, intermediate 2048, 8 layers, 8 heads, 4 KV heads, head_dim 64):
   a base and two fine-tunes written by kmed_gemma_init_random (bf16, random weights, in a
   child process so their memory stays out of this one's peak), merged into a bf16 HF
   directory (or, with --gguf T, streamed into a GGUF of type T), then deleted. The inputs
   were just written, so they sit in the page cache: the figure is memory bandwidth, not
   disk. Target: peak RSS < 3 x largest tensor + 200 MB.
   For scale it also times the I/O alone: reading the three inputs once and writing as many
   bytes as the merge wrote through the same atomic writer (fsync included).
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/bench_merge.c -o build/bench_merge \
      -lm -lpthread
   ./build/bench_merge [--method dare_ties] [--type bf16] [--gguf q8_0] [--layers 8]
                       [--vocab 256000] [--dir build/bench_merge_tmp] [--keep]              */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include "tools/common.h"
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>

static const char *usage =
    "usage: bench_merge [--method M] [--type T] [--gguf T] [--layers L] [--vocab V]\n"
    "                   [--dir DIR] [--keep]\n"
    "  defaults: --method dare_ties --type bf16 (HF output; --gguf f32, f16, bf16, q8_0 or\n"
    "            q4_0 writes a GGUF instead) --layers 8 --vocab 256000\n"
    "            --dir build/bench_merge_tmp\n";

static double dir_bytes(const char *dir, const char *const *names, size_t n)
{
    double total = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        char p[1200];
        struct stat sb;
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        if (stat(p, &sb) == 0) total += (double)sb.st_size;
    }
    return total;
}

/* Seconds to read every input file once and write out_bytes through kmed_afile. */
static double io_baseline(const char *const *dirs, size_t n, const char *out, double out_bytes)
{
    size_t cap = (size_t)16 << 20, i, got;
    unsigned char *buf = (unsigned char *)malloc(cap);
    double t0 = kmed_time_now(), left = out_bytes;
    kmed_error err = {0};
    kmed_afile a;
    if (!buf) die("out of memory");
    for (i = 0; i < n; i++) {
        char p[1200];
        FILE *f;
        snprintf(p, sizeof p, "%s/model.safetensors", dirs[i]);
        if (!(f = fopen(p, "rb"))) die("cannot open %s", p);
        while ((got = fread(buf, 1, cap, f)) > 0) buf[0] ^= buf[got - 1];
        fclose(f);
    }
    die_if(kmed_afile_open(&a, out, &err), &err, "I/O baseline");
    while (left > 0) {
        size_t k = left < (double)cap ? (size_t)left : cap;
        die_if(kmed_afile_write(&a, buf, k, &err), &err, "I/O baseline");
        left -= (double)k;
    }
    die_if(kmed_afile_commit(&a, &err), &err, "I/O baseline");
    remove(out);
    free(buf);
    return kmed_time_now() - t0;
}

static void rm_model(const char *dir)
{
    static const char *const names[] = {"model.safetensors", "config.json",
                                        "generation_config.json"};
    size_t i;
    for (i = 0; i < 3; i++) {
        char p[1200];
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        remove(p);
    }
    rmdir(dir);
}

int main(int argc, char **argv)
{
    static const char *const files[] = {"model.safetensors"};
    const char *method = "dare_ties", *type = "bf16", *gguf = NULL;
    const char *dir = "build/bench_merge_tmp";
    long layers = 8, vocab = 256000;
    int keep = 0, i, status = 0;
    kmed_error err = {0};
    kmed_gemma_config g;
    kmed_merge_model mm[2];
    kmed_merge_config cfg;
    kmed_merge_out mo;
    char base[1100], m1[1100], m2[1100], out[1100];
    struct rusage ru;
    double t0, secs, cpu, in_bytes, out_bytes, largest, peak_mb, target_mb, io_secs;
    pid_t pid;

    kmed_tool_name = "bench_merge";
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help")) { fputs(usage, stdout); return 0; }
        else if (!strcmp(a, "--method")) method = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--type")) type = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--gguf")) gguf = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--layers")) layers = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--vocab")) vocab = arg_long(argc, argv, &i, usage);
        else if (!strcmp(a, "--dir")) dir = arg_str(argc, argv, &i, usage);
        else if (!strcmp(a, "--keep")) keep = 1;
        else usage_error(usage, "unknown flag '%s'", a);
    }
    if (layers < 1 || vocab < 16) usage_error(usage, "--layers >= 1 and --vocab >= 16");
    memset(&cfg, 0, sizeof cfg);
    if (kmed_merge_method_parse(method, &cfg.method, &err) != KMED_OK)
        usage_error(usage, "--method: %s", err.msg);
    memset(&mo, 0, sizeof mo);
    mo.dtype = kmed_dtype_parse(gguf ? gguf : type);
    mo.gguf = gguf != NULL;
    if (gguf ? (mo.dtype != KMED_BF16 && mo.dtype != KMED_F32 && mo.dtype != KMED_F16 &&
                mo.dtype != KMED_Q8_0 && mo.dtype != KMED_Q4_0)
             : (mo.dtype != KMED_BF16 && mo.dtype != KMED_F32 && mo.dtype != KMED_F16))
        usage_error(usage, gguf ? "--gguf: f32, f16, bf16, q8_0 or q4_0"
                                : "--type: bf16, f32 or f16");

    memset(&g, 0, sizeof g);
    g.vocab_size = (int)vocab; g.hidden_size = 512; g.intermediate_size = 2048;
    g.n_layers = (int)layers; g.n_heads = 8; g.n_kv_heads = 4; g.head_dim = 64;
    g.query_pre_attn_scalar = 64; g.rms_norm_eps = 1e-6f; g.rope_theta = 10000;
    g.attn_softcap = 50; g.final_softcap = 30; g.sliding_window = 128; g.max_position = 8192;
    g.bos_id = 2; g.eos_id = 1; g.pad_id = 0;
    snprintf(base, sizeof base, "%s/base", dir);
    snprintf(m1, sizeof m1, "%s/m1", dir);
    snprintf(m2, sizeof m2, "%s/m2", dir);
    snprintf(out, sizeof out, "%s/out%s", dir, gguf ? ".gguf" : "");

    t0 = kmed_time_now();
    pid = fork();
    if (pid < 0) die("fork failed");
    if (pid == 0) {
        kmed_hf_save_opts ho;
        memset(&ho, 0, sizeof ho);
        ho.dtype = KMED_BF16;
        die_if(kmed_mkdir_p(dir, &err), &err, "creating the bench directory");
        die_if(kmed_gemma_init_random(&g, 1, NULL, base, &ho, &err), &err, "writing the base");
        die_if(kmed_gemma_init_random(&g, 2, NULL, m1, &ho, &err), &err, "writing model 1");
        die_if(kmed_gemma_init_random(&g, 3, NULL, m2, &ho, &err), &err, "writing model 2");
        _exit(0);
    }
    if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        die("writing the input models failed");
    fprintf(stderr, "bench_merge: inputs written in %.1fs\n", kmed_time_now() - t0);

    mm[0].model = m1; mm[0].weight = 0.4f; mm[0].density = 0.53f;
    mm[1].model = m2; mm[1].weight = 0.6f; mm[1].density = 0.53f;
    cfg.base_model = base;
    cfg.models = mm;
    cfg.n_models = 2;
    cfg.int8_mask = 1;
    t0 = kmed_time_now();
    die_if(kmed_merge_run(&cfg, out, &mo, &err), &err, "merging");
    secs = kmed_time_now() - t0;
    getrusage(RUSAGE_SELF, &ru);

    in_bytes = dir_bytes(base, files, 1) + dir_bytes(m1, files, 1) + dir_bytes(m2, files, 1);
    if (gguf) {
        struct stat sb;
        out_bytes = stat(out, &sb) == 0 ? (double)sb.st_size : 0;
    } else {
        out_bytes = dir_bytes(out, files, 1);
    }
    largest = (double)vocab * 512 * 2; /* the bf16 embedding */
    peak_mb = (double)ru.ru_maxrss / 1024.0;
    target_mb = 3 * largest / 1048576.0 + 200;
    cpu = (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
          (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
    printf("bench_merge: %s, 3 x %.0fM-param bf16 models -> %s: %.2fs wall (%.2fs CPU), "
           "read %.0f MB + wrote %.0f MB = %.2f GB/s wall, %.2f GB/s per CPU second; peak RSS "
           "%.0f MB (target < %.0f MB: 3 x %.0f MB largest tensor + 200) %s\n",
           method, in_bytes / 3 / 2 / 1e6, kmed_dtype_name(mo.dtype), secs, cpu,
           in_bytes / 1e6, out_bytes / 1e6, (in_bytes + out_bytes) / secs / 1e9,
           (in_bytes + out_bytes) / cpu / 1e9, peak_mb, target_mb, largest / 1048576.0,
           peak_mb < target_mb ? "ok" : "OVER");
    {
        const char *dirs[3];
        char p[1200];
        dirs[0] = base; dirs[1] = m1; dirs[2] = m2;
        snprintf(p, sizeof p, "%s/io_baseline.bin", dir);
        io_secs = io_baseline(dirs, 3, p, out_bytes);
        printf("bench_merge: I/O alone (read the inputs once, write %.0f MB through the same "
               "writer): %.2fs = %.2f GB/s; the merge ran at %.0f%% of that rate\n",
               out_bytes / 1e6, io_secs, (in_bytes + out_bytes) / io_secs / 1e9,
               100 * io_secs / secs);
    }
    if (!keep) {
        char p[1200];
        rm_model(base);
        rm_model(m1);
        rm_model(m2);
        if (gguf) remove(out);
        else rm_model(out);
        snprintf(p, sizeof p, "%s", dir);
        rmdir(p);
    }
    return 0;
}

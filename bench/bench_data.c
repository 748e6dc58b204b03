/* bench_data: data pipeline throughput on generated KorMedMCQA-style JSONL (one core).
   Measures load + clean/NFC + exact dedup (the streaming core; target >= 20 MB/s), then
   the same plus MinHash near-dedup, then the whole kmed_data_run.
   cc -std=c99 -O2 -march=native -Wall -Wextra -I. bench/bench_data.c -o build/bench_data \
      -lm -lpthread
   usage: build/bench_data [MB (default 4)] [dir for the generated file (default build)] */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CPU seconds of this process: on a shared machine wall time measures the neighbours too. */
static double cpu_now(void) { return (double)clock() / CLOCKS_PER_SEC; }

static const char *const words[] = {
    "환자가", "3일", "전부터", "발열과", "기침을", "호소하며", "응급실에", "왔다.", "혈압은",
    "130/85", "mmHg이고", "맥박은", "분당", "96회이다.", "흉부", "X선에서", "오른쪽", "하엽에",
    "경화가", "보인다.", "가장", "적절한", "치료는?", "당뇨병", "고혈압", "만성", "신장병",
    "검사", "결과：", "Hb", "9.0", "g/dL", "MCV", "70～75", "fL", "투여한다.", "처방", "약물",
    "부작용으로", "옳은", "것은?", "아닌", "다음", "중", "심전도", "소견", "ST", "분절",
    "상승", "관찰되었다.", "간호사가", "먼저", "시행할", "중재는?", "&lt;주의&gt;"};

/* One record: a question of 30-90 words, five options, an answer and sometimes a cot. */
static void gen_record(kmed_buf *b, kmed_rng *rng, size_t i)
{
    size_t n = 30 + kmed_rng_below(rng, 60), k;
    int o;
    kmed_buf q = {0};
    for (k = 0; k < n; k++) {
        if (k) kmed_buf_put(&q, " ", 1);
        kmed_buf_puts(&q, words[kmed_rng_below(rng, sizeof words / sizeof words[0])]);
    }
    /* 1 in 50 carries decomposed jamo (U+1100 U+1161 U+11A8) and a stray \r, as real
       scraped items do */
    if (i % 50 == 0) kmed_buf_puts(&q, " \xe1\x84\x80\xe1\x85\xa1\xe1\x86\xa8\r");
    /* 1 in 20 repeats an earlier question exactly */
    kmed_buf_printf(b, "{\"subject\":\"doctor\",\"year\":%d,\"period\":1,\"q_number\":%zu,"
                    "\"question\":", 2012 + (int)(i % 12), i);
    kmed_buf_json_str(b, q.data, q.len);
    for (o = 0; o < 5; o++) {
        kmed_buf_printf(b, ",\"%c\":", 'A' + o);
        kmed_buf_printf(b, "\"%s %s\"", words[kmed_rng_below(rng, 20)],
                        words[kmed_rng_below(rng, 20)]);
    }
    kmed_buf_printf(b, ",\"answer\":%d", 1 + (int)kmed_rng_below(rng, 5));
    if (i % 3 == 0) kmed_buf_puts(b, ",\"cot\":\"메트포르민은 1차 약제이다. 체중 증가가 적다.\"");
    kmed_buf_puts(b, "}\n");
    kmed_buf_free(&q);
}

/* Reads every record, cleans it and runs it through dedup; returns records kept. */
static size_t pass(const char *path, int near, size_t *n_in)
{
    kmed_data_source src;
    kmed_data_reader rd;
    kmed_data_record rec;
    kmed_data_dedup d;
    kmed_data_dedup_config dc;
    kmed_error e = {0};
    kmed_buf text = {0};
    size_t kept = 0, of;
    int eof = 0, dup;
    double sim;
    memset(&src, 0, sizeof src);
    memset(&rec, 0, sizeof rec);
    memset(&dc, 0, sizeof dc);
    dc.no_near = !near;
    src.kind = KMED_DATA_MCQA;
    snprintf(src.path, sizeof src.path, "%s", path);
    if (kmed_data_dedup_init(&d, &dc, &e) || kmed_data_open(&rd, &src, &e)) {
        fprintf(stderr, "bench_data: %s\n", e.msg);
        exit(1);
    }
    *n_in = 0;
    for (;;) {
        kmed_result r = kmed_data_next(&rd, &rec, &eof, &e);
        if (r == KMED_OK && eof) break;
        (*n_in)++;
        if (r) continue;
        if (kmed_data_record_clean(&rec, 0, &e)) continue;
        text.len = 0;
        kmed_data_record_text(&rec, &text);
        if (kmed_data_dedup_check(&d, text.data, text.len, 1, &dup, &of, &sim, &e)) break;
        kept += dup == 0;
    }
    kmed_data_record_free(&rec);
    kmed_data_close(&rd);
    kmed_data_dedup_free(&d);
    kmed_buf_free(&text);
    return kept;
}

int main(int argc, char **argv)
{
    double mb = argc > 1 ? atof(argv[1]) : 4.0, t0, t1, t2, t3, c0, c1, c2, c3;
    const char *dir = argc > 2 ? argv[2] : "build";
    char path[1024], out[1024];
    kmed_buf b = {0};
    kmed_rng rng;
    kmed_error e = {0};
    size_t i, n_in, kept_exact, kept_near;
    kmed_data_config cfg;
    kmed_data_source *s;
    kmed_data_report rep;
    FILE *f;
    if (mb <= 0) mb = 4.0;
    snprintf(path, sizeof path, "%s/bench_data.jsonl", dir);
    snprintf(out, sizeof out, "%s/bench_data_out", dir);
    kmed_rng_seed(&rng, 1);
    for (i = 0; (double)b.len < mb * 1e6; i++) {
        if (i % 20 == 19) { /* an exact repeat of the record 10 before */
            kmed_rng r2;
            kmed_rng_seed(&r2, i - 10);
            gen_record(&b, &r2, i - 10);
        } else {
            kmed_rng r2;
            kmed_rng_seed(&r2, i);
            gen_record(&b, &r2, i);
        }
    }
    f = fopen(path, "wb");
    if (!f || fwrite(b.data, 1, b.len, f) != b.len || fclose(f)) {
        fprintf(stderr, "bench_data: cannot write %s\n", path);
        return 1;
    }
    printf("generated %s: %.2f MB, %zu records\n", path, b.len / 1e6, i);
    t0 = kmed_time_now();
    c0 = cpu_now();
    kept_exact = pass(path, 0, &n_in);
    t1 = kmed_time_now();
    c1 = cpu_now();
    kept_near = pass(path, 1, &n_in);
    t2 = kmed_time_now();
    c2 = cpu_now();
    printf("load + normalise + exact dedup : %6.1f MB/s per CPU s, %6.1f MB/s wall "
           "(%zu records, %zu kept)\n", b.len / 1e6 / (c1 - c0), b.len / 1e6 / (t1 - t0), n_in,
           kept_exact);
    printf("  + MinHash near dedup (128x5) : %6.1f MB/s per CPU s, %6.1f MB/s wall (%zu kept)\n",
           b.len / 1e6 / (c2 - c1), b.len / 1e6 / (t2 - t1), kept_near);
    memset(&cfg, 0, sizeof cfg);
    snprintf(cfg.out_dir, sizeof cfg.out_dir, "%s", out);
    cfg.no_drop_log = 0;
    if (kmed_data_config_add_source(&cfg, 0, &s, &e)) return 1;
    s->kind = KMED_DATA_MCQA;
    snprintf(s->path, sizeof s->path, "%s", path);
    t2 = kmed_time_now();
    c2 = cpu_now();
    if (kmed_data_run(&cfg, &rep, NULL, &e)) {
        fprintf(stderr, "bench_data: %s\n", e.msg);
        return 1;
    }
    t3 = kmed_time_now();
    c3 = cpu_now();
    printf("whole kmed_data_run, no packing: %6.1f MB/s per CPU s, %6.1f MB/s wall "
           "(%zu in, %zu kept)\n", b.len / 1e6 / (c3 - c2), b.len / 1e6 / (t3 - t2), rep.n_in,
           rep.n_kept);
    kmed_data_report_free(&rep);
    kmed_data_config_free(&cfg);
    kmed_buf_free(&b);
    if (!getenv("BENCH_KEEP")) remove(path);
    return 0;
}

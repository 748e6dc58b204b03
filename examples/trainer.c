/* The shortest complete LoRA trainer over kmed's public API: load a Gemma-2 model, add a
   LoRA adapter, run AdamW over the lines of a JSONL file, save a PEFT adapter.
   Lines hold {"text": "..."} (needs a tokenizer) or {"input_ids": [...]} (all trained).

   cc -std=c99 -O2 -march=native -I. examples/trainer.c -o build/trainer -lm -lpthread
   ./build/trainer MODEL_DIR DATA.jsonl OUT_DIR [STEPS]                                   */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEQ 256

static void check(kmed_result r, const kmed_error *err)
{
    if (r != KMED_OK) {
        fprintf(stderr, "trainer: %s\n", err->msg[0] ? err->msg : kmed_result_str(r));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    kmed_error err = {0};
    kmed_gemma model;
    kmed_tok tok;
    kmed_lora lora;
    kmed_lora_config lcfg = {0};
    kmed_train_config tcfg = {0};
    kmed_train *trainer;
    kmed_pool *pool;
    kmed_jsonl data;
    int ids[SEQ], have_tok, step = 0, steps = argc > 4 ? atoi(argv[4]) : 100;

    if (argc < 4) {
        fprintf(stderr, "usage: trainer MODEL_DIR DATA.jsonl OUT_DIR [STEPS]\n");
        return 2;
    }
    check(kmed_gemma_load(&model, argv[1], NULL, &err), &err);
    have_tok = kmed_tok_load(&tok, argv[1], &err) == KMED_OK;

    lcfg.r = 8;          /* rank */
    lcfg.alpha = 16;     /* scale = alpha / r */
    lcfg.seed = 42;      /* targets 0 = all seven projections of every layer */
    check(kmed_lora_create(&lora, &model, &lcfg, &err), &err);

    tcfg.max_batch = 1;
    tcfg.max_seq = SEQ;
    tcfg.optim.lr = 2e-4f;
    tcfg.optim.weight_decay = 0.01f;
    tcfg.optim.clip = 1.0f;
    tcfg.optim.warmup = 10;
    tcfg.optim.schedule = KMED_SCHED_COSINE;
    tcfg.optim.total_steps = steps;
    check(kmed_pool_create(&pool, 0, &err), &err);
    check(kmed_train_create(&trainer, &model, &lora, &tcfg, pool, &err), &err);

    check(kmed_jsonl_open(&data, argv[2], &err), &err);
    while (step < steps) {
        const kmed_json *line, *j;
        size_t n = 0;
        int eof;
        double loss;
        check(kmed_jsonl_next(&data, &line, &eof, &err), &err);
        if (eof) { /* next epoch */
            kmed_jsonl_close(&data);
            check(kmed_jsonl_open(&data, argv[2], &err), &err);
            continue;
        }
        if ((j = kmed_json_get(line, "input_ids")) != NULL) {
            int64_t v;
            for (n = 0; n < j->len && n < SEQ && kmed_json_int(kmed_json_at(j, n), &v); n++)
                ids[n] = (int)v;
        } else if ((j = kmed_json_get(line, "text")) != NULL && have_tok) {
            kmed_tok_config tc = {0};
            tc.max_tokens = SEQ;
            check(kmed_tok_encode(&tok, &tc, j->str, j->len, ids, SEQ, &n, &err), &err);
        }
        if (n < 2) continue;
        /* labels = ids: every next token is trained (HF labels, shifted inside) */
        check(kmed_train_step(trainer, ids, ids, 1, 1, n, &loss, &err), &err);
        printf("step %d  loss %.4f\n", ++step, loss);
    }
    check(kmed_lora_save(&lora, argv[3], argv[1], &err), &err);
    printf("adapter saved to %s\n", argv[3]);

    kmed_jsonl_close(&data);
    kmed_train_free(trainer);
    kmed_pool_free(pool);
    kmed_lora_free(&lora);
    if (have_tok) kmed_tok_free(&tok);
    kmed_gemma_free(&model);
    return 0;
}

/* quickstart: tokenize a Korean question, run Gemma-2, print the most likely next tokens.
   cc -std=c99 -O2 -march=native -I. examples/quickstart.c -o build/quickstart -lm -lpthread
   build/quickstart MODEL_DIR_OR_GGUF TOKENIZER "당뇨병의 대표적인 증상은" */
#define KMED_IMPLEMENTATION
#include "kmed.h"

int main(int argc, char **argv)
{
    kmed_error err = {0};
    kmed_tok tok;
    kmed_gemma model;
    kmed_gemma_state st;
    int ids[512];
    size_t n = 0, i;
    float *logits;

    if (argc != 4) {
        fprintf(stderr, "usage: quickstart MODEL TOKENIZER TEXT\n");
        return 2;
    }
    if (kmed_tok_load(&tok, argv[2], &err) != KMED_OK ||
        kmed_gemma_load(&model, argv[1], NULL, &err) != KMED_OK ||
        kmed_tok_encode(&tok, NULL, argv[3], strlen(argv[3]), ids, 512, &n, &err) != KMED_OK ||
        kmed_gemma_state_init(&st, &model, n, &err) != KMED_OK) {
        fprintf(stderr, "quickstart: %s\n", err.msg);
        return 1;
    }
    logits = (float *)malloc((size_t)model.cfg.vocab_size * sizeof *logits);
    if (!logits ||
        kmed_gemma_forward(&model, NULL, &st, NULL, ids, n, KMED_FWD_LOGITS_LAST, logits, NULL,
                           &err) != KMED_OK) {
        fprintf(stderr, "quickstart: %s\n", logits ? err.msg : "out of memory");
        return 1;
    }
    for (i = 0; i < 3; i++) { /* top three next tokens, each then masked out */
        size_t best = kmed_argmax(logits, (size_t)model.cfg.vocab_size);
        printf("%d\t%s\t%.3f\n", (int)best, kmed_tok_piece(&tok, (int)best, NULL), logits[best]);
        logits[best] = -INFINITY;
    }
    free(logits);
    kmed_gemma_state_free(&st);
    kmed_gemma_free(&model);
    kmed_tok_free(&tok);
    return 0;
}

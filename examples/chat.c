/* chat: one question in Gemma's chat template, the answer streamed, the safety filter on.
   cc -std=c99 -O2 -march=native -I. examples/chat.c -o build/chat -lm -lpthread
   build/chat MODEL_DIR_OR_GGUF TOKENIZER "당뇨병의 대표적인 증상은 무엇인가요?" */
#define KMED_IMPLEMENTATION
#include "kmed.h"

static int print_piece(void *user, int id, const char *text, size_t len)
{
    (void)user;
    (void)id;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0; /* nonzero would stop generation */
}

int main(int argc, char **argv)
{
    kmed_error err = {0};
    kmed_tok tok;
    kmed_gemma model;
    kmed_gemma_state st;
    kmed_safety safety;
    kmed_chat_msg msg;
    kmed_buf prompt = {0};
    kmed_generate_config gc = {0};
    kmed_generate_result res;
    int ids[1024];
    size_t n = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: chat MODEL TOKENIZER QUESTION\n");
        return 2;
    }
    msg.role = "user";
    msg.content = argv[3];
    gc.max_tokens = 256;
    gc.sample.temperature = 0.7f;
    gc.sample.top_p = 0.95f;
    gc.sample.seed = 1;
    gc.safety = &safety;
    gc.safety_prompt = argv[3];
    gc.on_token = print_piece;
    if (kmed_tok_load(&tok, argv[2], &err) != KMED_OK ||
        kmed_gemma_load(&model, argv[1], NULL, &err) != KMED_OK ||
        kmed_safety_init(&safety, &err) != KMED_OK ||
        kmed_chat_render(&tok, &msg, 1, 1, &prompt, &err) != KMED_OK ||
        kmed_chat_encode(&tok, prompt.data, prompt.len, ids, 1024, &n, &err) != KMED_OK ||
        kmed_gemma_state_init(&st, &model, n + 256, &err) != KMED_OK ||
        kmed_generate(&model, NULL, &tok, &st, NULL, ids, n, &gc, &res, &err) != KMED_OK) {
        fprintf(stderr, "chat: %s\n", err.msg);
        return 1;
    }
    /* The stream showed the raw answer; the filter may have added a note or refused. */
    if (res.safety_action != KMED_SAFETY_PASS) printf("\n---\n%s", res.text);
    printf("\n");
    kmed_generate_result_free(&res);
    kmed_gemma_state_free(&st);
    kmed_safety_free(&safety);
    kmed_buf_free(&prompt);
    kmed_gemma_free(&model);
    kmed_tok_free(&tok);
    return 0;
}

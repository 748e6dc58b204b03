/* Shared by the tokenizer harnesses (fuzz_tok.c, fuzz_tokjson.c, fuzz_tokmodel.c), which
   include it after kmed.h's implementation: what every tokenizer must do with any text.
   The helpers not every harness calls are inline, so the others build without warnings. */
#ifndef KMED_FUZZ_TOK_H
#define KMED_FUZZ_TOK_H
#include <stdlib.h>
#include <string.h>

/* Encode, check the count contract, decode both ways, render as chat content. */
static void exercise(const kmed_tok *tok, const char *text, size_t len)
{
    kmed_error e = {0};
    kmed_tok_config cfg = {0};
    size_t n = 0, n2 = 0, i;
    int *ids;
    kmed_result r = kmed_tok_encode(tok, NULL, text, len, NULL, 0, &n, &e);
    if (r != KMED_OK && r != KMED_ERR_SPACE) return;
    ids = (int *)malloc((n + 1) * sizeof *ids);
    if (!ids) return;
    if (kmed_tok_encode(tok, NULL, text, len, ids, n, &n2, &e) != KMED_OK || n2 != n) abort();
    for (i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= tok->n_vocab || !kmed_tok_piece(tok, ids[i], NULL)) abort();
    {
        kmed_buf b = {0};
        if (kmed_tok_decode(tok, ids, n, 0, &b, &e) != KMED_OK) abort();
        kmed_buf_free(&b);
        if (kmed_tok_decode(tok, ids, n, 1, &b, &e) != KMED_OK) abort();
        kmed_buf_free(&b);
    }
    cfg.no_bos = 1;
    cfg.max_tokens = 3;
    if (kmed_tok_encode(tok, &cfg, text, len, ids, n, &n2, &e) == KMED_OK && n2 > 3) abort();
    free(ids);
    {
        char *z = (char *)malloc(len + 1);
        kmed_chat_msg m[2];
        kmed_buf b = {0};
        if (!z) return;
        memcpy(z, text, len);
        z[len] = 0;
        m[0].role = "user";
        m[0].content = z;
        m[1].role = "assistant";
        m[1].content = z;
        if (kmed_chat_render(tok, m, 2, 1, &b, &e) != KMED_OK) abort();
        kmed_buf_free(&b);
        free(z);
    }
}

/* A tokenizer file in data[0..len): it loads and handles a fixed text, or fails with a
   message. */
static inline void fuzz_tok_file(const char *data, size_t len)
{
    kmed_tok tok;
    kmed_error e = {0};
    if (kmed__tok_load_mem(&tok, data, len, "fuzz", &e) == KMED_OK) {
        exercise(&tok, "a b\xC3\xA9 <s>  x", 12);
        kmed_tok_free(&tok);
    } else if (!e.msg[0]) {
        abort(); /* every error carries a message */
    }
}

/* 1 if kmed__tok_load_mem reads data as tokenizer.json ('{' after an optional BOM and
   whitespace), 0 if as a SentencePiece tokenizer.model. */
static inline int fuzz_tok_is_json(const char *data, size_t len)
{
    size_t i = len >= 3 && !memcmp(data, "\xEF\xBB\xBF", 3) ? 3 : 0;
    while (i < len && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r'))
        i++;
    return i < len && data[i] == '{';
}
#endif

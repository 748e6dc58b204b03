/* kmed.h - Korean medical language models on Gemma-2, in one C header.
   version 0.1.0 - licence at the end of this file.

   Recipe: in exactly one .c file

       #define KMED_IMPLEMENTATION
       #include "kmed.h"

   and include "kmed.h" without the define everywhere else. Build with
   `cc -std=c99 -O2 -march=native app.c -lm -lpthread`.

   Quick start (the core of examples/quickstart.c, which the tests build and run):

       kmed_error err = {0};
       kmed_tok tok;
       kmed_gemma model;
       kmed_gemma_state st;
       int ids[512];
       size_t n;
       float *logits = malloc(256000 * sizeof *logits);   (the model's vocab_size)
       if (kmed_tok_load(&tok, "ko-gemma-2-9b-it", &err) != KMED_OK ||
           kmed_gemma_load(&model, "ko-gemma-2-9b-it", NULL, &err) != KMED_OK ||
           kmed_tok_encode(&tok, NULL, text, strlen(text), ids, 512, &n, &err) != KMED_OK ||
           kmed_gemma_state_init(&st, &model, n, &err) != KMED_OK ||
           kmed_gemma_forward(&model, NULL, &st, NULL, ids, n, KMED_FWD_LOGITS_LAST,
                              logits, NULL, &err) != KMED_OK)
           fprintf(stderr, "%s\n", err.msg);
       next = kmed_argmax(logits, model.cfg.vocab_size);

   Build lines: see README.md; every tool is `cc -std=c99 -O2 -march=native -I.
   tools/kmed-NAME.c -o kmed-NAME -lm -lpthread`.

   Contents (grep '==== kmed_' lists the implementation sections):
       core    result codes, kmed_error, allocation hooks, log/progress, rng, timing
       io      JSON (DOM + JSONL), CSV, safetensors, GGUF, atomic files
       tensor  dtypes, bf16/f16, Q8_0/Q4_0, matmul kernels, thread pool
       tok     Gemma tokenizer (tokenizer.json, tokenizer.model), chat template
       gemma   Gemma-2 config, weights, forward pass, sampling, generation, export
       safety  medical-answer filter and disclaimers
       train   LoRA (PEFT format), backward passes, AdamW, checkpoints, model merging
       data    source readers, cleaning, dedup, decontamination, formatting, packing
       mcqa    KorMedMCQA prompts, scoring, statistics, reports

   Config macros (define before the implementation include):
       KMED_MALLOC/KMED_REALLOC/KMED_FREE  allocation hooks; define all three or none
       KMED_ASSERT(x)       internal invariant check (default: assert)
       KMED_NO_THREADS      kmed_pool runs every parallel-for serially
       KMED_USE_OPENBLAS    f32 GEMMs go to cblas_sgemm (link -lopenblas)
       KMED_STATIC          all API functions become static
       KMED_NO_TRAIN, KMED_NO_DATA   leave those modules out

   Rules:
       Ownership: every declaration says who frees what; memory the library allocated is
       released by a kmed_*_free/close function. Inputs that must outlive an object are
       named ("borrows text").
       Errors: fallible calls return kmed_result (KMED_OK = 0, errors < 0); the detail goes
       into a caller-owned kmed_error (may be NULL). The library never prints or exits.
       Threads: objects are not shared between threads unless a declaration says so; a
       kmed_pool is passed into calls that run in parallel, and results do not depend on
       its thread count unless stated.
*/
#ifndef KMED_H
#define KMED_H

/* mmap, fsync, clock_gettime and friends are POSIX, not C99. */
#if defined(KMED_IMPLEMENTATION) && !defined(_POSIX_C_SOURCE) && !defined(_GNU_SOURCE)
#define _POSIX_C_SOURCE 200809L
#endif

#define KMED_VERSION_MAJOR 0
#define KMED_VERSION_MINOR 1
#define KMED_VERSION_PATCH 0

#if defined(KMED_STATIC) && defined(__GNUC__)
#define KMED_API static __attribute__((unused)) /* a program uses only some of the API */
#elif defined(KMED_STATIC)
#define KMED_API static
#else
#define KMED_API extern
#endif

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "src/core.h"
#include "src/io_text.h"
#include "src/io_bin.h"
#include "src/tensor.h"
#include "src/tok.h"
#include "src/gemma.h"
#include "src/generate.h"
#include "src/convert.h"
#include "src/safety.h"
#ifndef KMED_NO_TRAIN
#include "src/train.h"
#include "src/merge.h"
#endif
#ifndef KMED_NO_DATA
#include "src/data.h"
#endif
#include "src/mcqa.h"

#endif /* KMED_H */

#ifdef KMED_IMPLEMENTATION
#ifndef KMED__IMPLEMENTATION_DONE
#define KMED__IMPLEMENTATION_DONE

#if defined(KMED_MALLOC) || defined(KMED_REALLOC) || defined(KMED_FREE)
#if !defined(KMED_MALLOC) || !defined(KMED_REALLOC) || !defined(KMED_FREE)
#error "kmed: define all of KMED_MALLOC, KMED_REALLOC and KMED_FREE, or none"
#endif
#else
#include <stdlib.h>
#define KMED_MALLOC(n) malloc(n)
#define KMED_REALLOC(p, n) realloc(p, n)
#define KMED_FREE(p) free(p)
#endif
#ifndef KMED_ASSERT
#include <assert.h>
#define KMED_ASSERT(x) assert(x)
#endif

#include "src/core.c"
#include "src/io_text.c"
#include "src/io_bin.c"
#include "src/tensor.c"
#include "src/tok.c"
#include "src/ops.c"
#include "src/gemma.c"
#include "src/generate.c"
#include "src/convert.c"
#include "src/safety.c"
#ifndef KMED_NO_TRAIN
#include "src/train.c"
#include "src/merge.c"
#endif
#ifndef KMED_NO_DATA
#include "src/data.c"
#endif
#include "src/mcqa.c"

#endif /* KMED__IMPLEMENTATION_DONE */
#endif /* KMED_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licences -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT Licence
Copyright (c) 2026 the kmed authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
------------------------------------------------------------------------------
*/

/* libFuzzer harness for loading a SentencePiece tokenizer.model (ModelProto protobuf) from
   memory (kmed__tok_load_mem, what kmed_tok_load runs on the file's bytes). A file that loads
   must encode, decode and render a fixed text; one that fails must say why. Inputs that
   kmed__tok_load_mem would read as the other format (text starting with '{') are skipped:
   fuzz_tokjson.c covers those.
   clang -std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
       -I. tests/fuzz/fuzz_tokmodel.c -o build/fuzz_tokmodel -lm -lpthread
   build/fuzz_tokmodel -max_total_time=60 tests/fuzz/corpus/tokmodel */
#define KMED_IMPLEMENTATION
#include "kmed.h"
#include <stdlib.h>
#include <string.h>
#include "fuzz_tok.h"

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size);
int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    /* an exact-size copy, so reading past the end is caught */
    char *d;
    if (fuzz_tok_is_json((const char *)data, size)) return 0;
    d = (char *)malloc(size ? size : 1);
    if (!d) return 0;
    if (size) memcpy(d, data, size);
    fuzz_tok_file(d, size);
    free(d);
    return 0;
}

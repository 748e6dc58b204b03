# Convenience only: every target is one plain cc line (shown in README.md).
CC      = cc
CFLAGS  = -std=c99 -O2 -march=native -Wall -Wextra -I.
LDLIBS  = -lm -lpthread
SAN     = -fsanitize=address,undefined -fno-omit-frame-pointer -g

TOOLS = build/kmed-inspect build/kmed-tokenize build/kmed-forward build/kmed-init \
        build/kmed-convert build/kmed-chat build/kmed-train build/kmed-data build/kmed-eval \
        build/kmed-merge build/kmed-bench
TESTS = build/test_core build/test_io_text build/test_io_bin build/test_tensor build/test_tok \
        build/test_gemma build/test_generate build/test_convert build/test_safety \
        build/test_train build/test_data build/test_mcqa
SAN_TESTS = build/test_core_asan

.PHONY: all tools test test-asan bench demo clean

all: tools
tools: $(TOOLS)

build/kmed-%: tools/kmed-%.c kmed.h src/*.h src/*.c tools/common.h
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_%: tests/test_%.c tests/test.h kmed.h src/*.h src/*.c
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_%_asan: tests/test_%.c tests/test.h kmed.h src/*.h src/*.c
	@mkdir -p build
	$(CC) $(CFLAGS) $(SAN) $< -o $@ $(LDLIBS)

test: $(TESTS)
	sh tests/run.sh $(TESTS)

test-asan: $(SAN_TESTS)
	sh tests/run.sh $(SAN_TESTS)

clean:
	rm -rf build

# Convenience only: every target is one plain cc line (README.md shows each).
CC      = cc
CFLAGS  = -std=c99 -O2 -march=native -Wall -Wextra -I.
LDLIBS  = -lm -lpthread
SAN     = -fsanitize=address,undefined -fno-omit-frame-pointer -g

TOOLS   = build/kmed-inspect build/kmed-tokenize build/kmed-forward build/kmed-init \
          build/kmed-convert build/kmed-chat build/kmed-train build/kmed-data build/kmed-eval \
          build/kmed-merge build/kmed-bench
TESTS   = build/test_core build/test_io_text build/test_io_bin build/test_tensor build/test_tok \
          build/test_gemma build/test_generate build/test_convert build/test_safety \
          build/test_train build/test_data build/test_mcqa build/test_merge build/test_demo build/test_reliability build/test_head \
          build/test_tensor_nothreads build/test_core_static build/quickstart_check \
          build/eval_check \
          build/tokenize_check build/merge_cli_check
BENCHES = build/bench_kernels build/bench_tok build/bench_train build/bench_data \
          build/bench_merge build/kmed-bench
EXAMPLES = build/quickstart build/trainer build/chat

.PHONY: all tools test test-asan test-valgrind fuzz crash-test bench demo clean

all: tools $(EXAMPLES)
tools: $(TOOLS)
bench: $(BENCHES)

SRC = kmed.h

build/kmed-%: tools/kmed-%.c tools/common.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/kmed-bench: bench/kmed-bench.c $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/bench_%: bench/bench_%.c $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_%: tests/test_%.c tests/test.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# tests that also run a tool's own main (they include it) or build another program
build/test_data: tests/test_data.c tests/test.h tests/run_tool.h tools/kmed-data.c tools/common.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_io_bin: tests/test_io_bin.c tests/test.h tests/run_tool.h tools/kmed-inspect.c tools/common.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_io_text: tests/test_io_text.c tests/test.h tests/run_tool.h tools/kmed-chat.c tools/common.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

build/test_core: tests/test_core.c tests/test.h tests/include_order.c $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the same tests built the other ways STYLE.md asks for
build/test_tensor_nothreads: tests/test_tensor.c tests/test.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) -DKMED_NO_THREADS $< -o $@ $(LDLIBS)

build/test_core_static: tests/test_core.c tests/test.h $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) -DKMED_STATIC $< -o $@ $(LDLIBS)

build/%: examples/%.c $(SRC)
	@mkdir -p build
	$(CC) $(CFLAGS) $< -o $@ $(LDLIBS)

# the README's quick start, built and run on the fixture model
build/quickstart_check: build/quickstart tests/quickstart_check.sh
	cp tests/quickstart_check.sh $@ && chmod +x $@

# kmed-eval's command-line behaviour (README's 5-shot command, --compare pairing)
build/eval_check: build/kmed-eval tests/eval_check.sh
	cp tests/eval_check.sh $@ && chmod +x $@

# kmed-tokenize run as a user runs it (modes, --jsonl batches, misuse)
build/tokenize_check: build/kmed-tokenize tests/tokenize_check.sh
	cp tests/tokenize_check.sh $@ && chmod +x $@

# kmed-merge's flags and config handling, run as a user runs them
build/merge_cli_check: build/kmed-init build/kmed-merge tests/merge_cli.sh
	cp tests/merge_cli.sh $@ && chmod +x $@

test: $(TESTS)
	sh tests/run.sh $(TESTS)

test-asan:
	bash tests/sanitize.sh

test-valgrind:
	bash tests/valgrind.sh

FUZZ_SECONDS = 30
fuzz:
	bash tests/fuzz/run.sh $(FUZZ_SECONDS)

crash-test:
	bash tests/crash_safety.sh

demo:
	bash examples/demo.sh

clean:
	rm -rf build

#!/usr/bin/env bash
# Runs the test suite under sanitizers:
#   1. every tests/test_*.c built with -fsanitize=address,undefined (leaks included);
#   2. the saved fuzz inputs (tests/fuzz/regress/<h>/ and tests/fuzz/corpus/<h>/) replayed
#      through each harness with tests/fuzz/regress.c, under the same sanitizers;
#   3. the threaded kernels (test_tensor) and training steps on a 3-thread pool
#      (test_reliability: LoRA and full, bit-compared with 1 thread) under -fsanitize=thread;
#      test_train is clean under TSan too but takes ~5 min there: TSAN_TESTS adds it.
# Any sanitizer report aborts that binary, which then counts as failed.
#   usage: tests/sanitize.sh [NAME...]     (NAME: a test like "core"; default: all)
#   env:   CC (default cc), JOBS (parallel builds, default 2), TSAN_TESTS ("tensor reliability"),
#          SAN_SKIP (tests left out of the ASan pass, default "demo": the whole demo chain
#          with the real 256k vocabulary takes over 5 minutes under ASan; SAN_SKIP= runs it)
# Binaries go to build/san/ and are rebuilt only when a source is newer. The last line is
# "N passed, N failed": the checks of every binary added up (a binary that dies or prints
# no result line counts one failure).
set -u
cd "$(dirname "$0")/.."

cc=${CC:-cc}
jobs=${JOBS:-2}
out=build/san
asan="-std=c99 -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined"
asan="$asan -fno-sanitize-recover=all -I."
tsan="-std=c99 -O1 -g -fsanitize=thread -I."
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
mkdir -p "$out"

skip=" ${SAN_SKIP-demo} "
if [ $# -gt 0 ]; then tests=("$@")
else
    tests=()
    for f in tests/test_*.c; do
        n=${f##*/test_}; n=${n%.c}
        case $skip in *" $n "*) echo "sanitize: skipping test_$n (SAN_SKIP)"; continue ;; esac
        tests+=("$n")
    done
fi
tsan_tests=(${TSAN_TESTS:-tensor reliability})
harnesses=(); for f in tests/fuzz/fuzz_*.c; do n=${f##*/fuzz_}; harnesses+=("${n%.c}"); done
[ $# -gt 0 ] && harnesses=()

# build KIND NAME: KIND asan|tsan|regress. Skipped when the binary is newer than the sources.
build() {
    local kind=$1 n=$2 bin src flags extra=
    case $kind in
        asan) bin=$out/test_$n; src=tests/test_$n.c; flags=$asan ;;
        tsan) bin=$out/tsan_$n; src=tests/test_$n.c; flags=$tsan ;;
        regress) bin=$out/regress_$n; src=tests/fuzz/fuzz_$n.c; flags="${asan/-O1/-O0}"
                 extra=tests/fuzz/regress.c ;; # tiny inputs: -O0 builds 3x faster
    esac
    if [ -f "$bin" ] && [ -z "$(find "$src" $extra kmed.h tests/test.h tests/fuzz/*.h \
            -newer "$bin" -print -quit)" ]; then
        return 0
    fi
    # shellcheck disable=SC2086
    $cc $flags "$src" $extra -o "$bin.tmp" -lm -lpthread > "$bin.log" 2>&1 && mv "$bin.tmp" "$bin"
}

pids=()
queue() {
    build "$@" & pids+=($!)
    if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
}
for n in "${tests[@]}"; do queue asan "$n"; done
for n in "${harnesses[@]}"; do queue regress "$n"; done
for n in "${tsan_tests[@]}"; do
    [ $# -gt 0 ] && break
    queue tsan "$n"
done
wait

passed=0; failed=0
# run LABEL BIN [ARGS...]: adds the binary's "N passed, N failed" to the totals.
run() {
    local label=$1 bin=$2 outp rc line p f t0 t1
    shift 2
    if [ ! -x "$bin" ]; then
        tail -n 20 "$bin.log" 2>/dev/null
        printf '%-30s FAIL (build failed: %s.log)\n' "$label" "$bin"
        failed=$((failed + 1)); return
    fi
    t0=$(date +%s)
    outp=$("$bin" "$@" 2>&1); rc=$?
    t1=$(date +%s)
    line=$(printf '%s\n' "$outp" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        printf '%s\n' "$outp" |
            grep -E 'ERROR|SUMMARY|runtime error|WARNING: ThreadSanitizer|FAIL|#[0-9] ' |
            head -n 30
        printf '%-30s FAIL: exit %s without a result line\n' "$label" "$rc"
        failed=$((failed + 1)); return
    fi
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed*}
    [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    [ "$f" -ne 0 ] &&
        printf '%s\n' "$outp" | grep -E 'FAIL|ERROR|runtime error|SUMMARY' | head -n 30
    printf '%-30s %s (%ss)\n' "$label" "$line" "$((t1 - t0))"
    passed=$((passed + p)); failed=$((failed + f))
}

for n in "${tests[@]}"; do run "asan+ubsan test_$n" "$out/test_$n"; done
for n in "${harnesses[@]}"; do
    dirs=()
    [ -d "tests/fuzz/regress/$n" ] && dirs+=("tests/fuzz/regress/$n")
    [ -d "tests/fuzz/corpus/$n" ] && dirs+=("tests/fuzz/corpus/$n")
    [ ${#dirs[@]} -eq 0 ] && continue
    run "replay fuzz_$n" "$out/regress_$n" "${dirs[@]}"
done
if [ $# -eq 0 ]; then
    for n in "${tsan_tests[@]}"; do run "tsan test_$n" "$out/tsan_$n"; done
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/usr/bin/env bash
# Builds every libFuzzer harness (tests/fuzz/fuzz_*.c) with clang
# -fsanitize=fuzzer,address,undefined and runs each for SECONDS over its seeds
# (tests/fuzz/corpus/<name>/ and tests/fuzz/regress/<name>/), JOBS at a time. Exits non-zero
# on any crash, sanitizer report, leak, timeout (-timeout=10 s per input) or out-of-memory
# (2 GB); the failing input is left in build/fuzz/artifacts/ - copy it to
# tests/fuzz/regress/<name>/ once fixed so the regression replay keeps it.
#   usage: tests/fuzz/run.sh [SECONDS] [NAME...]     (run from anywhere; default 20 s, all)
#   env:   JOBS (default 2), CLANG (default clang), FUZZ_FLAGS (extra libFuzzer flags)
# tests/fuzz/fuzz_<name>.options, where present, holds that harness's own libFuzzer flags
# (e.g. -max_len, to keep each input's work bounded); FUZZ_FLAGS come after and win.
# New corpus entries go to build/fuzz/corpus/<name>/, never into the seed directories.
# The last line is "N passed, N failed" over the harnesses.
set -u
cd "$(dirname "$0")/../.."

secs=${1:-20}
[ $# -gt 0 ] && shift
jobs=${JOBS:-2}
cc=${CLANG:-clang}
out=build/fuzz
flags="-std=c99 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all -I."

if [ $# -gt 0 ]; then names=("$@")
else names=(); for f in tests/fuzz/fuzz_*.c; do n=${f##*/fuzz_}; names+=("${n%.c}"); done; fi

mkdir -p "$out/artifacts"
if ! command -v "$cc" >/dev/null 2>&1; then
    echo "fuzz: $cc not found (apt-get install clang)"; echo "0 passed, 1 failed"; exit 1
fi
# The fuzzer runtime comes in a separate Debian package on some images.
probe='#include <stdint.h>
#include <stddef.h>
int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }'
if ! printf '%s\n' "$probe" | "$cc" -fsanitize=fuzzer,address,undefined -x c - \
        -o "$out/probe" 2>/dev/null; then
    ver=$("$cc" -dumpversion | cut -d. -f1)
    echo "fuzz: libFuzzer runtime missing; installing libclang-rt-$ver-dev"
    apt-get update -qq >/dev/null 2>&1
    apt-get install -y -qq "libclang-rt-$ver-dev" >/dev/null 2>&1
    if ! printf '%s\n' "$probe" | "$cc" -fsanitize=fuzzer,address,undefined -x c - \
            -o "$out/probe" 2>/dev/null; then
        echo "fuzz: no libFuzzer runtime for $cc"; echo "0 passed, 1 failed"; exit 1
    fi
fi

# Build (skipped when the binary is newer than every source), JOBS in parallel.
build_one() {
    local n=$1 bin=$out/fuzz_$1 src=tests/fuzz/fuzz_$1.c
    if [ -f "$bin" ] &&
            [ -z "$(find "$src" kmed.h tests/fuzz/*.h -newer "$bin" -print -quit)" ]; then
        return 0
    fi
    "$cc" $flags "$src" -o "$bin.tmp" -lm -lpthread > "$out/build_$n.log" 2>&1 &&
        mv "$bin.tmp" "$bin"
}
pids=(); bnames=()
for n in "${names[@]}"; do
    if [ ! -f "tests/fuzz/fuzz_$n.c" ]; then echo "fuzz: no tests/fuzz/fuzz_$n.c"; continue; fi
    build_one "$n" & pids+=($!); bnames+=("$n")
    if [ ${#pids[@]} -ge "$jobs" ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
wait

# Run, JOBS at a time; each run's log is build/fuzz/<name>.log.
run_one() {
    local n=$1 work=$out/corpus/$1 seeds=() opts=
    mkdir -p "$work"
    [ -f "tests/fuzz/fuzz_$n.options" ] && opts=$(cat "tests/fuzz/fuzz_$n.options")
    [ -d "tests/fuzz/corpus/$n" ] && seeds+=("tests/fuzz/corpus/$n")
    [ -d "tests/fuzz/regress/$n" ] && seeds+=("tests/fuzz/regress/$n")
    "$out/fuzz_$n" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$out/artifacts/$n-" $opts ${FUZZ_FLAGS:-} \
        "$work" ${seeds[@]+"${seeds[@]}"} > "$out/$n.log" 2>&1
}
passed=0; failed=0
rm -f "$out/status"
pids=(); rnames=()
for n in "${bnames[@]}"; do
    if [ ! -x "$out/fuzz_$n" ]; then
        cat "$out/build_$n.log"; echo "FAIL fuzz_$n: build failed"; failed=$((failed + 1))
        continue
    fi
    run_one "$n" & pids+=($!); rnames+=("$n")
    if [ ${#pids[@]} -ge "$jobs" ]; then
        wait "${pids[0]}"; echo "${rnames[0]} $?" >> "$out/status"
        pids=("${pids[@]:1}"); rnames=("${rnames[@]:1}")
    fi
done
for i in "${!pids[@]}"; do wait "${pids[$i]}"; echo "${rnames[$i]} $?" >> "$out/status"; done

while read -r n rc; do
    execs=$(grep -o 'number_of_executed_units: [0-9]*' "$out/$n.log" | tail -n 1 | cut -d' ' -f2)
    cov=$(grep -o 'cov: [0-9]*' "$out/$n.log" | tail -n 1 | cut -d' ' -f2)
    if [ "$rc" -eq 0 ]; then
        printf 'fuzz_%-12s ok    %10s runs in %ss, cov %s\n' "$n" "${execs:-?}" "$secs" "${cov:-?}"
        passed=$((passed + 1))
    else
        grep -E 'ERROR|SUMMARY|check failed|runtime error|Test unit written' "$out/$n.log" |
            head -n 12
        printf 'fuzz_%-12s FAIL  exit %s (log: %s/%s.log)\n' "$n" "$rc" "$out" "$n"
        failed=$((failed + 1))
    fi
done < "$out/status"
rm -f "$out/status"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

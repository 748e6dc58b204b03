#!/usr/bin/env bash
# Runs every tests/test_*.c under valgrind's memcheck (invalid reads/writes, uses of
# uninitialised values, definite and indirect leaks). Valgrind does not decode AVX-512, so
# the binaries are built for AVX2 (-mavx2 -mfma -mf16c): the AVX2 kernels and every scalar
# path run, the AVX-512 ones are covered by the ASan pass of tests/sanitize.sh instead.
# Slow (about half an hour for the suite on 2 cores), so CI leaves it out.
#   usage: tests/valgrind.sh [NAME...]     (NAME: a test like "core"; default: all)
# Binaries go to build/vg/. The last line is "N passed, N failed": the checks of every
# binary added up; a binary with a memcheck error (exit 99) or no result line counts one
# failure.
set -u
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null 2>&1 || { echo "valgrind not installed"; echo "0 passed, 1 failed"; exit 1; }
out=build/vg
mkdir -p "$out"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for f in tests/test_*.c; do n=${f#tests/test_}; names+=("${n%.c}"); done
fi
total_p=0; total_f=0
for n in "${names[@]}"; do
    bin=$out/test_$n
    ${CC:-cc} -std=c99 -O1 -g -mavx2 -mfma -mf16c -I. "tests/test_$n.c" -o "$bin" -lm -lpthread ||
        { echo "test_$n: build failed"; total_f=$((total_f + 1)); continue; }
    log=$out/test_$n.log
    valgrind -q --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite,indirect \
        --num-callers=30 "$bin" >"$log" 2>&1
    rc=$?
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
    if [ -z "$line" ]; then p=0; f=1; else
        p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed*}
    fi
    if [ "$rc" -ne 0 ]; then
        [ "$f" -eq 0 ] && f=1
        grep -E '^==[0-9]+==' "$log" | head -n 40
    fi
    printf '%-22s %s (exit %d)\n' "test_$n" "${line:-no result line}" "$rc"
    total_p=$((total_p + p)); total_f=$((total_f + f))
done
echo "$total_p passed, $total_f failed"
[ "$total_f" -eq 0 ]

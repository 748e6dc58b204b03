#!/bin/sh
# Runs each test given as an argument and sums their "N passed, N failed" lines. An argument
# ending in .c is first compiled with plain cc into build/ (CC and CFLAGS override the
# compiler and flags), so `sh tests/run.sh tests/test_*.c` needs nothing else; any other
# argument is a test binary or shell check to run as it is.
# Exit status is non-zero if any test failed, failed to build, or did not report.
passed=0; failed=0
cc=${CC:-cc}
cflags=${CFLAGS:--std=c99 -O2 -march=native -Wall -Wextra}
for t in "$@"; do
    # a glob such as build/test_* also matches the tests' scratch directories
    if [ -d "$t" ]; then continue; fi
    case $t in
    *.c)
        src=$t
        t=build/$(basename "$src" .c)
        mkdir -p build
        if ! $cc $cflags -I. "$src" -o "$t" -lm -lpthread; then
            echo "FAIL $src: does not build"
            failed=$((failed + 1)); continue
        fi ;;
    esac
    out=$("$t" 2>&1); rc=$?
    line=$(printf '%s\n' "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n 1)
    if [ -z "$line" ]; then
        printf '%s\n' "$out"
        echo "FAIL $t: exit $rc without a result line"
        failed=$((failed + 1)); continue
    fi
    p=${line%% passed*}; f=${line#*passed, }; f=${f%% failed*}
    [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && f=1
    [ "$f" -ne 0 ] && printf '%s\n' "$out" | grep -E 'FAIL|error' | head -n 40
    printf '%-28s %s\n' "$(basename "$t")" "$line"
    passed=$((passed + p)); failed=$((failed + f))
done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

#!/bin/sh
# Runs each test binary given as an argument and sums their "N passed, N failed" lines.
# Exit status is non-zero if any test failed or any binary did not report.
passed=0; failed=0
for t in "$@"; do
    # a glob such as build/test_* also matches the tests' scratch directories
    if [ -d "$t" ]; then continue; fi
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

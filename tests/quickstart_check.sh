#!/bin/sh
# Runs the README quick start (examples/quickstart.c) on the fixture model and checks it
# prints three next-token candidates; ends with the suite's "N passed, N failed" line.
fx=${KMED_FIXTURES:-../shared/fixtures}
if [ ! -f "$fx/tiny-gemma2/config.json" ]; then
    if [ -n "$CI" ]; then echo "fixtures missing at $fx"; echo "0 passed, 1 failed"; exit 1; fi
    echo "note: fixtures missing; quick start not run"; echo "0 passed, 0 failed"; exit 0
fi
out=$(build/quickstart "$fx/tiny-gemma2" "$fx/gemma2-tokenizer" "당뇨병의 대표적인 증상은") || {
    echo "quickstart failed"; echo "0 passed, 1 failed"; exit 1; }
n=$(printf '%s\n' "$out" | grep -cE '^[0-9]+	')
if [ "$n" -eq 3 ]; then echo "1 passed, 0 failed"; else echo "$out"; echo "0 passed, 1 failed"; exit 1; fi

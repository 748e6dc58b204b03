#!/usr/bin/env bash
# One ledgered fuzz run: runs tests/fuzz/run.sh SECONDS NAME on one core at low priority
# (nice 19, JOBS=1) and appends a row to tests/fuzz/ledger.tsv: date, harness, seconds,
# executions (libFuzzer's final "Done N runs", else its last "#N" status line), result,
# and the last commit that changed kmed.h. Refuses to run on an uncommitted kmed.h, so every
# row names the parser code it tested; after a fix to a parser, that harness's count
# starts again from the rows with the new hash.
#   usage: tests/fuzz/campaign.sh SECONDS NAME...
set -u
cd "$(dirname "$0")/../.."
secs=$1; shift
ledger=tests/fuzz/ledger.tsv
if ! git diff --quiet HEAD -- kmed.h; then echo "campaign: commit kmed.h first"; exit 2; fi
hash=$(git log -1 --format=%h -- kmed.h)
[ -f "$ledger" ] ||
    printf 'date\tharness\tseconds\texecutions\tresult\tkmed_h\n' > "$ledger"
for n in "$@"; do
    JOBS=1 nice -n 19 bash tests/fuzz/run.sh "$secs" "$n" | tail -n 12
    rc=${PIPESTATUS[0]}
    log=build/fuzz/$n.log
    execs=$(grep -o '^Done [0-9]* runs' "$log" | tail -n 1 | cut -d' ' -f2)
    [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -n 1 | tr -d '#')
    result=ok
    [ "$rc" -eq 0 ] ||
        result="FAIL: $(grep -m1 -o 'ERROR: [A-Za-z]*: [a-z-]*\|check failed.*' "$log" |
                        tr '\t' ' ')"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$n" "$secs" \
        "${execs:-0}" "$result" "$hash" >> "$ledger"
    tail -n 1 "$ledger"
done

#!/bin/sh
# Tool-level checks of kmed-eval ($KMED_EVAL, default build/kmed-eval): the README's 5-shot
# command on HF-style exports (subsets from the "subject" column, file and directory names),
# repeated --fewshot, --compare pairing by id, argument and output-path checks; with the
# fixture model, a scored run whose summary --compare finds from another directory.
# Ends with the suite's "N passed, N failed" line.
cd "$(dirname "$0")/.." || exit 1
root=$(pwd)
ev=${KMED_EVAL:-build/kmed-eval}
case $ev in /*) ;; *) ev=$root/$ev ;; esac
fx=${KMED_FIXTURES:-../shared/fixtures}
case $fx in /*) ;; *) fx=$root/$fx ;; esac
d=examples/data/kormedmcqa
t=$root/build/eval_check.tmp
rm -rf "$t" && mkdir -p "$t/kormedmcqa" "$t/hf/nurse" "$t/o1" "$t/o2" || exit 1
pass=0; fail=0

# check NAME RC PATTERN CMD...: CMD exits with RC and its output matches PATTERN (grep -E)
check() {
    name=$1; want=$2; pat=$3; shift 3
    out=$("$@" 2>&1); rc=$?
    if [ "$rc" -ne "$want" ]; then
        fail=$((fail + 1)); echo "FAIL eval_check $name: exit $rc, want $want"
        echo "$out" | head -n 5
    elif [ -n "$pat" ] && ! printf '%s\n' "$out" | grep -qE -- "$pat"; then
        fail=$((fail + 1)); echo "FAIL eval_check $name: no /$pat/ in:"; echo "$out" | head -n 5
    else
        pass=$((pass + 1))
    fi
}
# the question of line 1 of a JSONL file (the examples hold no escaped quotes)
first_q() { head -n 1 "$1" | sed 's/.*"question": "\([^"]*\)".*/\1/'; }

# The README's 5-shot command: HF's test files and the four fewshot splits concatenated
# into one file, where each row's "subject" picks its subset.
for s in doctor nurse pharm dentist; do cp "$d/${s}_test.jsonl" "$t/kormedmcqa/"; done
cat "$d/doctor_fewshot.jsonl" "$d/nurse_fewshot.jsonl" "$d/pharm_fewshot.jsonl" \
    "$d/dentist_fewshot.jsonl" > "$t/kormedmcqa/fewshot.jsonl"
k=$t/kormedmcqa
set -- --items "$k/doctor_test.jsonl" --items "$k/nurse_test.jsonl" \
    --items "$k/pharm_test.jsonl" --items "$k/dentist_test.jsonl" \
    --fewshot "$k/fewshot.jsonl" --shots 5
check readme-5-shot 0 "" "$ev" "$@" --dump-prompts "$t/p_combined.jsonl"
for s in doctor nurse pharm dentist; do  # each subset's prompts open with its own exemplar
    n=$(grep -cF "\"prompt\":\"$(first_q "$d/${s}_fewshot.jsonl")" "$t/p_combined.jsonl")
    check "readme-5-shot-$s" 0 "^$(wc -l < "$d/${s}_test.jsonl" | tr -d ' ')\$" echo "$n"
done
# --fewshot repeated, one file per subset: the same prompts
check fewshot-repeated 0 "" "$ev" --items "$k/doctor_test.jsonl" --items "$k/nurse_test.jsonl" \
    --items "$k/pharm_test.jsonl" --items "$k/dentist_test.jsonl" --shots 5 \
    --fewshot "$d/doctor_fewshot.jsonl" --fewshot "$d/nurse_fewshot.jsonl" \
    --fewshot "$d/pharm_fewshot.jsonl" --fewshot "$d/dentist_fewshot.jsonl" \
    --dump-prompts "$t/p_repeated.jsonl"
check fewshot-repeated-same 0 "" cmp "$t/p_combined.jsonl" "$t/p_repeated.jsonl"
# HF directory layout without a subject column: nurse/test.jsonl is nurse, and --subset
# (a fallback) changes neither the items nor the exemplars
sed 's/"subject": "nurse", //' "$d/nurse_test.jsonl" > "$t/hf/nurse/test.jsonl"
check hf-dir-layout 0 "^$(first_q "$d/nurse_fewshot.jsonl")" "$ev" \
    --items "$t/hf/nurse/test.jsonl" --subset doctor --fewshot "$k/fewshot.jsonl" --shots 1 \
    --show-prompt 0
# upper-case name and extension; a .json file of JSON Lines
cp "$d/pharm_test.jsonl" "$t/PHARM.JSON"
check json-lines-upper 0 "^$(first_q "$d/pharm_fewshot.jsonl")" "$ev" --items "$t/PHARM.JSON" \
    --fewshot "$k/fewshot.jsonl" --shots 1 --show-prompt 0
: > "$t/empty.jsonl"
check empty-items 1 "empty.jsonl: no items" "$ev" --items "$t/empty.jsonl" --show-prompt 0

# --compare pairs by id (B in another order), and refuses ids repeated, missing, or rows
# without a true/false "correct"
printf '%s\n' '{"id":"a","subset":"doctor","correct":true}' \
    '{"id":"b","subset":"doctor","correct":false}' > "$t/A.jsonl"
printf '%s\n' '{"id":"b","subset":"doctor","correct":true}' \
    '{"id":"a","subset":"doctor","correct":true}' > "$t/B.jsonl"
check compare-by-id 0 '^overall +2 +50\.0% +100\.0% +\+50\.0% +0 +1 ' \
    "$ev" --compare "$t/A.jsonl" "$t/B.jsonl"
printf '%s\n' '{"id":"a","correct":true}' '{"id":"a","correct":false}' > "$t/dup.jsonl"
check compare-dup-id 1 "id 'a' appears more than once" "$ev" --compare "$t/dup.jsonl" "$t/B.jsonl"
check compare-dup-id-b 1 "id 'a' appears more than once" "$ev" --compare "$t/A.jsonl" "$t/dup.jsonl"
printf '%s\n' '{"id":"a","correct":true}' '{"id":"b","correct":true}' \
    '{"id":"c","correct":true}' > "$t/C.jsonl"
missing="item c of .*C.jsonl is missing from .*A.jsonl"
check compare-b-extra 1 "$missing" "$ev" --compare "$t/A.jsonl" "$t/C.jsonl"
check compare-a-extra 1 "$missing" "$ev" --compare "$t/C.jsonl" "$t/A.jsonl"
printf '%s\n' '{"id":"a","correct":true}' '{"id":"b"}' > "$t/nocorrect.jsonl"
check compare-no-correct 1 "nocorrect.jsonl:2: no true/false 'correct'" \
    "$ev" --compare "$t/A.jsonl" "$t/nocorrect.jsonl"

# misuse exits 2; an output directory that is missing fails before the model loads
check limit-negative 2 "--limit must be >= 1" "$ev" --items "$k/doctor_test.jsonl" --limit -3
check gen-tokens-negative 2 "--max-gen-tokens must be" \
    "$ev" --items "$k/doctor_test.jsonl" --max-gen-tokens -5
check out-dir-missing 1 "--out .*/nodir/s.json: directory '.*/nodir' does not exist" "$ev" \
    --model "$t/no-model" --items "$k/doctor_test.jsonl" --out "$t/nodir/s.json"

if [ -f "$fx/tiny-gemma2/config.json" ]; then
    # the README command scored (first 12 items); the summary names the predictions file
    # relative to itself, so --compare finds it from any directory
    check score 0 "^overall +12 " "$ev" --model "$fx/tiny-gemma2" \
        --tokenizer "$fx/gemma2-tokenizer" --type q8_0 "$@" --limit 12 --threads 1 \
        --out "$t/o1/base.json" --preds "$t/o2/base.jsonl"
    check summary-preds-path 0 "" grep -qF '"predictions":"../o2/base.jsonl"' "$t/o1/base.json"
    check compare-elsewhere 0 '^overall +12 .* \+0\.0% +0 +0 ' sh -c \
        "cd / && exec \"\$0\" --compare \"\$1\" \"\$2\"" "$ev" "$t/o1/base.json" "$t/o2/base.jsonl"
elif [ -n "$CI" ]; then
    fail=$((fail + 1)); echo "fixtures missing at $fx"
else
    echo "note: fixtures missing; kmed-eval scoring checks not run"
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]

#!/bin/sh
# CLI checks of tools/kmed-merge on three tiny kmed-init models (m1 the base): what only
# the tool decides. A trailing comma in --weights is refused; --lambda 0 gives the base
# (equal bytes to a linear "merge" of the base alone); a flag overrides the config (YAML
# lambda 2, --lambda 0); the issue's YAML recipe with the base listed under models equals
# the flag form (same DARE masks) and its summary counts 2 models; a top-level density 0
# is an error. Builds kmed-init and kmed-merge into $KMED_BIN (default build) first when
# missing or older than the sources, and works in $KMED_BIN/merge_cli. The last line is
# "N passed, N failed".
set -u
cd "$(dirname "$0")/.."

bdir=${KMED_BIN:-build}
work=$bdir/merge_cli
passed=0; failed=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }
check() { if [ "$1" -eq 0 ]; then ok; else bad "$2"; fi; }

for t in init merge; do
    bin=$bdir/kmed-$t
    if [ ! -x "$bin" ] || [ -n "$(find tools/kmed-$t.c tools/common.h kmed.h -newer "$bin" \
            -print -quit)" ]; then
        mkdir -p "$bdir"
        cc -std=c99 -O2 -march=native -Wall -Wextra -I. "tools/kmed-$t.c" -o "$bin" -lm -lpthread ||
            { echo "merge_cli: building kmed-$t failed"; echo "0 passed, 1 failed"; exit 1; }
    fi
done

rm -rf "$work"
mkdir -p "$work"
for s in 1 2 3; do
    "$bdir/kmed-init" --out "$work/m$s" --vocab 96 --hidden 32 --intermediate 64 --layers 2 \
        --heads 2 --kv-heads 1 --head-dim 16 --window 8 --dtype bf16 --seed "$s" \
        > /dev/null 2>&1 || { echo "merge_cli: kmed-init failed"; echo "0 passed, 1 failed"; exit 1; }
done
M=$bdir/kmed-merge
W=$work

$M --method task_arithmetic --base $W/m1 --model $W/m2 --weights 0.5, --out $W/o \
    > /dev/null 2> $W/err
rc=$?
[ $rc -eq 2 ] && grep -q -- "--weights" $W/err
check $? "--weights 0.5, (trailing comma) exited $rc: $(cat $W/err)"

$M --method linear --model $W/m1 --weights 1 --type f32 --out $W/base32 > /dev/null 2>&1
$M --method task_arithmetic --base $W/m1 --model $W/m2 --weights 1 --lambda 0 --type f32 \
    --out $W/l0 > /dev/null 2>&1 && cmp -s $W/base32/model.safetensors $W/l0/model.safetensors
check $? "--lambda 0 does not give the base"

cat > $W/recipe.yaml <<EOF
models:
  - model: $W/m1
    # no parameters necessary for base model
  - model: $W/m2
    parameters:
      density: 0.53
      weight: 0.4
  - model: $W/m3
    parameters: {density: 0.53, weight: 0.6}
merge_method: dare_ties
base_model: $W/m1
parameters:
  int8_mask: true
  lambda: 2
dtype: bfloat16
EOF
$M --config $W/recipe.yaml --lambda 1 --seed 3 --out $W/yaml > /dev/null 2> $W/err
check $? "the YAML recipe failed: $(cat $W/err)"
grep -q "^kmed-merge: dare_ties of 2 models ->" $W/err
check $? "summary line: $(tail -n 1 $W/err)"
$M --method dare_ties --base $W/m1 --model $W/m2 --model $W/m3 --weights 0.4,0.6 \
    --densities 0.53 --seed 3 --out $W/flags > /dev/null 2>&1 &&
    cmp -s $W/yaml/model.safetensors $W/flags/model.safetensors
check $? "YAML recipe with the base listed differs from the flag form"

$M --method linear --model $W/m1 --weights 1 --type bf16 --out $W/base16 > /dev/null 2>&1
$M --config $W/recipe.yaml --lambda 0 --out $W/yl0 > /dev/null 2>&1 &&
    cmp -s $W/base16/model.safetensors $W/yl0/model.safetensors
check $? "--lambda 0 does not override the config's lambda 2"

sed 's/^  lambda: 2$/  density: 0/' $W/recipe.yaml > $W/d0.yaml
$M --config $W/d0.yaml --out $W/d0 > /dev/null 2> $W/err
rc=$?
[ $rc -ne 0 ] && grep -q "parameters.density" $W/err && [ ! -e $W/d0 ]
check $? "top-level density 0 exited $rc: $(cat $W/err)"

rm -rf "$work"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

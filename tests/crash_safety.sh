#!/usr/bin/env bash
# Crash safety of training: a LoRA run of tools/kmed-train on a tiny kmed-init model is
# killed with SIGKILL at random moments (KILLS times, default 12; every second kill is aimed
# at a checkpoint write: it fires as soon as a "*.tmp.*" file appears), resumed each time
# with --resume, and must end with adapter_model.safetensors, adapter_config.json and
# checkpoint.safetensors byte-identical (cmp) to an uninterrupted run. After every kill,
# each file present under its final name must load (kmed-inspect, and the next --resume
# loads the checkpoint; a run that fails instead of being killed is a failure).
#   usage: tests/crash_safety.sh            env: KILLS (12), SEED ($RANDOM), STEPS (40)
# Builds build/kmed-init, kmed-train and kmed-inspect first when missing or older than the
# sources. The last line is "N passed, N failed".
set -u
cd "$(dirname "$0")/.."

kills=${KILLS:-12}
seed=${SEED:-$RANDOM}
steps=${STEPS:-40}
RANDOM=$seed
work=build/crash
passed=0; failed=0
ok() { passed=$((passed + 1)); }
bad() { echo "FAIL: $*"; failed=$((failed + 1)); }

for t in init train inspect; do
    bin=build/kmed-$t
    if [ ! -x "$bin" ] || [ -n "$(find tools/kmed-$t.c tools/common.h kmed.h -newer "$bin" \
            -print -quit)" ]; then
        mkdir -p build
        cc -std=c99 -O2 -march=native -Wall -Wextra -I. "tools/kmed-$t.c" -o "$bin" -lm -lpthread ||
            { echo "crash_safety: building kmed-$t failed"; echo "0 passed, 1 failed"; exit 1; }
    fi
done

rm -rf "$work"
mkdir -p "$work"
build/kmed-init --out "$work/model" --vocab 96 --hidden 32 --intermediate 64 --layers 2 \
    --heads 2 --kv-heads 1 --head-dim 16 --window 8 --dtype f32 --seed 3 > /dev/null 2>&1 ||
    { echo "crash_safety: kmed-init failed"; echo "0 passed, 1 failed"; exit 1; }
# 48 pre-tokenised sequences of 12..27 ids (a fixed pseudo-random stream: awk's srand)
awk 'BEGIN { srand(11); for (i = 0; i < 48; i++) { n = 12 + int(rand() * 16); s = "";
      for (j = 0; j < n; j++) s = s (j ? "," : "") (3 + int(rand() * 90));
      print "{\"input_ids\":[" s "]}" } }' > "$work/data.jsonl"

args=(--model "$work/model" --data "$work/data.jsonl" --steps "$steps" --ckpt-every 1
      --batch 2 --accum 2 --seq-len 32 --lora-r 4 --lr 1e-2 --warmup 3 --threads 2 --seed 5)

t0=$(date +%s.%N)
build/kmed-train "${args[@]}" --out "$work/ref" > "$work/ref.log" 2>&1 ||
    { cat "$work/ref.log"; echo "crash_safety: reference run failed"; echo "0 passed, 1 failed"
      exit 1; }
t1=$(date +%s.%N)
ref_ms=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%d", (b - a) * 1000 }')
echo "crash_safety: seed $seed, reference run of $steps steps took ${ref_ms} ms"

# Every file under a final name must be whole: safetensors and JSON parse, the SVG is closed.
check_files() {
    local d=$1 f
    for f in checkpoint.safetensors adapter_model.safetensors adapter_config.json; do
        [ -e "$d/$f" ] || continue
        if build/kmed-inspect "$d/$f" > /dev/null 2> "$work/inspect.err"; then ok
        else bad "after kill $2: $d/$f does not load: $(cat "$work/inspect.err")"; fi
    done
    if [ -e "$d/loss.svg" ]; then
        if tail -c 16 "$d/loss.svg" | grep -q '</svg>'; then ok
        else bad "after kill $2: $d/loss.svg is cut short"; fi
    fi
}

run=$work/run
mkdir -p "$run"
k=0; in_write=0; finished_early=0; guard=0
while [ $k -lt "$kills" ] && [ $guard -lt $((kills * 4)) ]; do
    guard=$((guard + 1))
    build/kmed-train "${args[@]}" --out "$run" --resume >> "$work/run.log" 2>&1 &
    pid=$!
    if [ $((guard % 2)) -eq 0 ]; then
        # aimed: kill as soon as an atomic write has its temp file open
        t_end=$(( $(date +%s) + 5 ))
        while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt $t_end ]; do
            if compgen -G "$run/*.tmp.*" > /dev/null; then break; fi
        done
    else
        # random: anywhere in the first 60% of a run's length, start-up included
        ms=$(( RANDOM % (ref_ms * 6 / 10 + 1) ))
        sleep "$(awk -v m="$ms" 'BEGIN { printf "%.3f", m / 1000 }')"
    fi
    if kill -9 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null
        k=$((k + 1))
        if compgen -G "$run/*.tmp.*" > /dev/null; then
            in_write=$((in_write + 1))
            rm -f "$run"/*.tmp.* # a dead writer's temp file: never read, safe to drop
        fi
        check_files "$run" "$k"
    else
        wait "$pid"; rc=$?
        if [ $rc -ne 0 ]; then
            tail -n 5 "$work/run.log"; bad "a resumed run failed (exit $rc) instead of being killed"
            break
        fi
        finished_early=$((finished_early + 1))
        rm -rf "$run"; mkdir -p "$run" # the run completed before the kill: start over
    fi
done
# resume to the end without interruption
if build/kmed-train "${args[@]}" --out "$run" --resume >> "$work/run.log" 2>&1; then ok
else tail -n 5 "$work/run.log"; bad "final resumed run failed"; fi
check_files "$run" final

[ $k -ge 10 ] && ok || bad "only $k kills landed (need 10)"
[ $in_write -ge 1 ] && ok || bad "no kill landed inside a checkpoint write"
for f in adapter_model.safetensors adapter_config.json checkpoint.safetensors; do
    if cmp -s "$work/ref/$f" "$run/$f"; then ok
    else bad "$f differs from the uninterrupted run ($(cmp "$work/ref/$f" "$run/$f" 2>&1))"; fi
done
resumes=$(grep -c 'resumed ' "$work/run.log")
echo "crash_safety: $k SIGKILLs ($in_write inside an atomic write, $finished_early runs finished" \
     "before their kill), $resumes resumes from a checkpoint; final adapter and checkpoint" \
     "$( [ $failed -eq 0 ] && echo "byte-identical" || echo "checked" ) to the uninterrupted run"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

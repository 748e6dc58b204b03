#!/bin/sh
# Runs build/kmed-tokenize (or $KMED_TOKENIZE) the ways a user does: TEXT with --ids / --pieces
# / --count / --no-special, --decode, --chat (ids and --render), a --jsonl batch of the three
# request shapes with their defaults and error lines between good ones, a directory with a
# tokenizer_config.json, and misuse. The tokenizer.model is tests/data/spm/bpe_chat.model,
# whose expected ids are spm_encode's (tests/data/spm/bpe_chat.chat.ids); with the fixtures,
# the Gemma-2 tokenizer.json and its directory too. Run from the repository root; the last
# line is "N passed, N failed".
T=${KMED_TOKENIZE:-build/kmed-tokenize}
M=tests/data/spm/bpe_chat.model
fx=${KMED_FIXTURES:-../shared/fixtures}
work=$(mktemp -d "${TMPDIR:-/tmp}/kmed_tokenize_check.XXXXXX") || exit 1
trap 'rm -rf "$work"' EXIT
passed=0; failed=0

# check NAME EXPECTED ACTUAL
check() {
    if [ "$2" = "$3" ]; then passed=$((passed + 1)); else
        failed=$((failed + 1))
        printf 'FAIL %s\n  want: %s\n  got:  %s\n' "$1" "$2" "$3"
    fi
}

# Line 4 of chat.txt and its spm_encode ids; <bos> is 2, <eos> 1, <start_of_turn> 4 (CONTROL),
# <end_of_turn> 5 (USER_DEFINED), "\n" the byte piece 16.
text=$(sed -n 4p tests/data/spm/chat.txt)
ids=$(sed -n 4p tests/data/spm/bpe_chat.chat.ids)
csv=$(printf '%s' "$ids" | tr ' ' ',')

# ---- TEXT, a .model path ----
check "text ids" "2 $ids" "$("$T" --tokenizer $M "$text")"
check "text --no-special" "$ids" "$("$T" --tokenizer $M --no-special "$text")"
check "text --count" "$(($(printf '%s\n' "$ids" | wc -w) + 1))" \
    "$("$T" --tokenizer $M --count "$text")"
check "text --pieces" '"<bos>"' "$("$T" --tokenizer $M --pieces "$text" | cut -d' ' -f1)"
check "stdin" "2 $ids" "$(printf '%s' "$text" | "$T" --tokenizer $M)"

# ---- --decode ----
check "decode" "<bos>$text" "$("$T" --tokenizer $M --decode "2,$csv")"
check "decode --no-special" "$text" "$("$T" --tokenizer $M --decode "[2, $csv]" --no-special)"

# ---- --chat: the markers are ids although <bos> and <start_of_turn> are CONTROL pieces ----
printf '[{"role": "user", "content": "  %s "}]\n' "$text" > "$work/chat.json"
check "chat render" "$(printf '<bos><start_of_turn>user\n%s<end_of_turn>\n<start_of_turn>model\n_' \
    "$text")" "$("$T" --tokenizer $M --chat "$work/chat.json" --render; printf _)"
user=$("$T" --tokenizer $M --no-special user)
model=$("$T" --tokenizer $M --no-special model)
check "chat ids" "2 4 $user 16 $ids 5 16 4 $model 16" \
    "$("$T" --tokenizer $M --chat "$work/chat.json")"
check "chat --no-generation-prompt" "2 4 $user 16 $ids 5 16" \
    "$("$T" --tokenizer $M --chat "$work/chat.json" --no-generation-prompt)"
printf '{"messages": [{"role": "user", "content": "a\\u0000b"}]}\n' > "$work/nul.json"
"$T" --tokenizer $M --chat "$work/nul.json" > /dev/null 2> "$work/err"; rc=$?
check "chat U+0000 refused" "1 1" "$rc $(grep -c 'U+0000' "$work/err")"
printf '{"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": "no"}\n' \
    > "$work/flag.json"
"$T" --tokenizer $M --chat "$work/flag.json" > /dev/null 2> "$work/err"; rc=$?
check "chat non-boolean add_generation_prompt" "1 1" "$rc $(grep -c 'true or false' "$work/err")"

# ---- --jsonl: the three shapes with their defaults; error lines between good lines ----
ujson=$(printf '%s' "$user" | tr ' ' ',')
{
    printf '{"text": "%s"}\n' "$text"
    printf '{"text": "%s", "add_special_tokens": false}\n' "$text"
    printf '{"text": "x", "add_special_tokens": 0}\n'
    printf '{"ids": [2,%s]}\n' "$csv"
    printf '{"ids": [2,%s], "skip_special_tokens": true}\n' "$csv"
    printf '{"ids": [2], "skip_special_tokens": "yes"}\n'
    printf '{"ids": [999999]}\n'
    printf '{"messages": [{"role": "user", "content": "%s"}]}\n' "$text"
    printf '{"messages": [{"role": "user", "content": "x"}], "add_generation_prompt": 1}\n'
    printf '{"messages": [{"role": "system", "content": "x"}]}\n'
    printf '{"text": \n'
    printf '\n'
    printf '{"text": "%s", "add_special_tokens": true}\n' "$text"
} > "$work/batch.jsonl"
"$T" --tokenizer $M --jsonl --file "$work/batch.jsonl" > "$work/out.jsonl"; rc=$?
check "jsonl exit" 0 "$rc"
check "jsonl lines" 13 "$(wc -l < "$work/out.jsonl" | tr -d ' ')"
line() { sed -n "$1p" "$work/out.jsonl"; }
check "jsonl text default" "{\"ids\":[2,$csv]}" "$(line 1)"
check "jsonl text no specials" "{\"ids\":[$csv]}" "$(line 2)"
check "jsonl non-boolean add_special_tokens" \
    '{"error":"\"add_special_tokens\" must be true or false"}' "$(line 3)"
check "jsonl ids default" "{\"text\":\"<bos>$text\"}" "$(line 4)"
check "jsonl ids skip" "{\"text\":\"$text\"}" "$(line 5)"
check "jsonl non-boolean skip_special_tokens" \
    '{"error":"\"skip_special_tokens\" must be true or false"}' "$(line 6)"
check "jsonl id outside the vocabulary" '{"error"' "$(line 7 | cut -c1-8)"
check "jsonl messages default" "{\"text\":\"<bos><start_of_turn>user\\n$text<end_of_turn>\\n\",\
\"ids\":[2,4,$ujson,16,$csv,5,16]}" "$(line 8)"
check "jsonl non-boolean add_generation_prompt" \
    '{"error":"\"add_generation_prompt\" must be true or false"}' "$(line 9)"
check "jsonl template error" '{"error"' "$(line 10 | cut -c1-8)"
check "jsonl bad JSON" '{"error"' "$(line 11 | cut -c1-8)"
check "jsonl empty line" '{"error":"empty line"}' "$(line 12)"
check "jsonl good line after errors" "{\"ids\":[2,$csv]}" "$(line 13)"

# ---- a directory: tokenizer.model + tokenizer_config.json ----
mkdir "$work/dir"
cp $M "$work/dir/tokenizer.model"
printf '{"add_bos_token": false, "add_eos_token": true, "chat_template": %s}\n' \
    '"{% for m in messages %}{{ m[\"content\"] }}{% endfor %}"' > "$work/dir/tokenizer_config.json"
check "directory: config flags" "$ids 1" "$("$T" --tokenizer "$work/dir" "$text")"
out=$("$T" --tokenizer "$work/dir" --chat "$work/chat.json" 2> "$work/err")
check "directory: chat ids" "2 4 $user 16 $ids 5 16 4 $model 16" "$out"
check "directory: other chat_template warned" 1 \
    "$(grep -c "warning: .*chat_template that is not Gemma-2's" "$work/err")"
"$T" --tokenizer $M --chat "$work/chat.json" > /dev/null 2> "$work/err"
check "no chat_template: no warning" 0 "$(wc -c < "$work/err" | tr -d ' ')"

# ---- misuse: exit 2 ----
for args in "--decode 2 --pieces" "--decode 2 --count" "--jsonl --no-special" "--jsonl --pieces" \
        "--jsonl --count" "--chat x --no-special" "--chat x --render --count" "--render"; do
    # shellcheck disable=SC2086
    "$T" --tokenizer $M $args < /dev/null > /dev/null 2>&1
    check "usage error: $args" 2 $?
done
"$T" --tokenizer "$work/none.model" x > /dev/null 2> "$work/err"; rc=$?
check "missing tokenizer" "1 1" "$rc $(grep -c 'none.model' "$work/err")"

# ---- the Gemma-2 tokenizer.json and its directory ----
if [ -f "$fx/gemma2-tokenizer/tokenizer.json" ]; then
    g=$fx/gemma2-tokenizer
    check "tokenizer.json" "2 238179 243415" "$("$T" --tokenizer "$g/tokenizer.json" 안녕)"
    check "tokenizer dir" "2 238179 243415" "$("$T" --tokenizer "$g" 안녕)"
    printf '[{"role": "user", "content": "a"}]\n' > "$work/a.json"
    check "tokenizer.json chat" "2 106 1645 108 235250 107 108 106 2516 108" \
        "$("$T" --tokenizer "$g" --chat "$work/a.json")"
elif [ -n "$CI" ]; then
    echo "fixtures missing at $fx"; failed=$((failed + 1))
else
    echo "note: fixtures missing; the tokenizer.json checks were not run"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]

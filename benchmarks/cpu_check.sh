#!/usr/bin/env bash
# CPU figures of benchmarks/RESULTS.md: every `xcft bench` run behind the tables, one after the
# other (never two at once: they would share the cores), each printed and appended as one JSON line.
#
#   bash benchmarks/cpu_check.sh [RESULTS.jsonl]        (default benchmarks/cpu_results.jsonl)
#
# Needs the venv (`make test` or `make demo` creates it) and ../shared (the real tokenizer and the
# official examples). Builds the `small` preset model once in $XCFT_BENCH_MODEL (default
# /tmp/xcft_bench_small). Takes about 15 minutes on the 2-core machine. Set XCFT_CPU_CHECK_RUNS to
# a space-separated list of run names (see RUNS below) to run only some.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
XCFT="$ROOT/.venv/bin/xcft"
SHARED="${XCFT_SHARED:-$ROOT/../shared}"
D="$SHARED/assets/official-examples/data.txt"
TOK="$SHARED/assets/internlm2-tokenizer/tokenizer.model"
MODEL="${XCFT_BENCH_MODEL:-/tmp/xcft_bench_small}"
OUTFILE="${1:-$ROOT/benchmarks/cpu_results.jsonl}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" HF_HUB_OFFLINE=1
[ -x "$XCFT" ] || { echo "cpu_check: $XCFT missing; run 'make test' first" >&2; exit 1; }
[ -f "$D" ] && [ -f "$TOK" ] || { echo "cpu_check: $SHARED/assets is missing (tokenizer and official examples)" >&2; exit 1; }
[ -f "$MODEL/config.json" ] || "$XCFT" init-model "$MODEL" --preset small --img-size 490 --tokenizer "$TOK" >&2

IMG="--source single_turn_single_image"
TXT="--source only_text"
declare -A RUNS=(
  [image-b1]="train $IMG --batch-size 1 --steps 6"
  [text-b1]="train $TXT --batch-size 1 --steps 6"
  [text-b8]="train $TXT --batch-size 8 --steps 3"
  [image-b2]="train $IMG --batch-size 2 --steps 3"
  [mix-packed]="train --packing --batch-size 1 --steps 4"
  [image-b1-no-reuse]="train $IMG --batch-size 1 --steps 6 --no-cpu-reuse-memory"
  [image-b1-full-head]="train $IMG --batch-size 1 --steps 3 --full-head"
  [text-b8-lora]="train $TXT --batch-size 8 --steps 3 --lora"
  [image-b1-lora]="train $IMG --batch-size 1 --steps 6 --lora"
  [data-exact]="data --img-size 490"
  [data-exact-2workers]="data --img-size 490 --workers 2"
  [data-photo]="data --img-size 490 --photo 4000x3000"
  [predict-text-b8]="predict $TXT --samples 16 --batch-size 8 --max-new-tokens 32"
  [predict-text-b8-64]="predict $TXT --samples 16 --batch-size 8 --max-new-tokens 64"
)
ORDER="${XCFT_CPU_CHECK_RUNS:-image-b1 text-b1 text-b8 image-b2 mix-packed image-b1-no-reuse image-b1-full-head text-b8-lora image-b1-lora data-exact data-exact-2workers data-photo predict-text-b8 predict-text-b8-64}"
for name in $ORDER; do
  spec="${RUNS[$name]:?unknown run $name}"
  read -r kind args <<<"$spec"
  if [ "$kind" = train ]; then
    cmd=("$XCFT" bench train --model "$MODEL" --data "$D" $args --warmup 1 --format json)
  elif [ "$kind" = predict ]; then
    cmd=("$XCFT" bench predict --model "$MODEL" --data "$D" $args --format json)
  else
    cmd=("$XCFT" bench data --data "$D" $args --format json)
  fi
  echo "== $name: xcft bench $kind $args" >&2
  json="$("${cmd[@]}" 2>/dev/null | tail -n 1)"
  line="$(NAME="$name" ARGS="$kind $args" python3 -c 'import json, os, sys; r = json.loads(sys.stdin.read()); r["run"] = os.environ["NAME"]; r["command"] = "xcft bench " + os.environ["ARGS"]; print(json.dumps(r))' <<<"$json")"
  echo "$line" >>"$OUTFILE"
  echo "$line"
done

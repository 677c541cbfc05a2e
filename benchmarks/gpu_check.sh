#!/usr/bin/env bash
# GPU check (one H100, under 5 minutes): the 7b preset (random weights, 490 px), LoRA, bf16,
# ~4096-token sequences, activation checkpointing on and off, unpacked batch 1 and packed.
# Prints tokens/s, MFU and peak GPU memory per configuration, then the verdict against the
# targets (MFU >= 45 %, peak <= 20 GiB with checkpointing).
# Then the QLoRA memory lines (--bits 4, checkpointing on, unpacked batch 1): the 2.0 7b preset at
# 490 px / 4096 tokens and the 2.5 7b-2.5 preset at hd_num 18 / 16384 tokens (one image with the
# crop grid of most slots hd_num 18 allows: 18x1 crops, 7981 slots), one JSON line each (peak
# allocated and reserved GPU memory, step time, MFU) appended to gpu_memory.jsonl.
#
# Installs nothing: needs python with torch (CUDA), transformers, peft (flash-attn used when present).
# Run from anywhere: it uses the repository's src/ directly (no pip install).
#
# Environment overrides (for a CPU test of the Python part: XCFT_GPU_CHECK_PRESET=tiny):
#   XCFT_GPU_CHECK_PRESET   model preset            (default 7b)
#   XCFT_GPU_CHECK_LENGTH   tokens per row          (default 4096)
#   XCFT_GPU_CHECK_STEPS    timed steps per config  (default 4; 2 warm-up steps before)
#   XCFT_GPU_CHECK_CONFIGS  comma list of ac-unpacked,ac-packed,noac-unpacked,noac-packed
#   XCFT_GPU_CHECK_TIMEOUT  seconds before the whole check is stopped (default 290)
#   XCFT_GPU_CHECK_JSON     also write the results to this JSON file ($OUT/gpu_check.json when $OUT is set)
#   XCFT_GPU_CHECK_JSONL    QLoRA lines go to this file (7b: $OUT/gpu_memory.jsonl, else benchmarks/gpu_memory.jsonl)
#   XCFT_GPU_CHECK_QLORA    0 skips the QLoRA lines
#   XCFT_GPU_CHECK_QLORA_TIMEOUT  seconds per QLoRA line (default 240)
#   PYTHON                  interpreter (default python3)
# Further arguments go to python -m xcft.commands.bench.gpu (e.g. --warmup 1, --calibration-seconds 0.1).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
PY="${PYTHON:-python3}"
PRESET="${XCFT_GPU_CHECK_PRESET:-7b}"
LENGTH="${XCFT_GPU_CHECK_LENGTH:-4096}"
STEPS="${XCFT_GPU_CHECK_STEPS:-4}"
CONFIGS="${XCFT_GPU_CHECK_CONFIGS:-ac-unpacked,ac-packed,noac-unpacked,noac-packed}"
JSON="${XCFT_GPU_CHECK_JSON:-${OUT:+$OUT/gpu_check.json}}"
JSONL="${XCFT_GPU_CHECK_JSONL:-}"
[ -z "$JSONL" ] && [ "$PRESET" = "7b" ] && JSONL="${OUT:-$ROOT/benchmarks}/gpu_memory.jsonl"
EXTRA=()
[ -n "$JSON" ] && EXTRA+=(--json "$JSON")
[ "$PRESET" != "7b" ] && [ -z "${XCFT_GPU_CHECK_BF16:-}" ] && EXTRA+=(--no-bf16)

"$PY" - <<'PYCHECK'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "peft", "accelerate", "numpy", "PIL") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing}; this script installs nothing")
PYCHECK

echo "# xcft GPU check: preset $PRESET, $LENGTH tokens, $STEPS timed steps, configs $CONFIGS"
status=0
timeout "${XCFT_GPU_CHECK_TIMEOUT:-290}" "$PY" -m xcft.commands.bench.gpu \
  --preset "$PRESET" --length "$LENGTH" --steps "$STEPS" --configs "$CONFIGS" ${EXTRA[@]+"${EXTRA[@]}"} "$@" || status=$?

[ "${XCFT_GPU_CHECK_QLORA:-1}" = "0" ] && exit "$status"
# QLoRA lines: "preset length hd_num" (hd_num - for 2.0). With a non-7b PRESET (a CPU test of the
# script) the tiny presets stand in: 2.0 at LENGTH tokens, 2.5 at hd_num 4.
if [ "$PRESET" = "7b" ]; then
  QLORA_RUNS=("7b 4096 -" "7b-2.5 16384 18")
else
  QLORA_RUNS=("$PRESET $LENGTH -" "tiny-2.5 $LENGTH 4")
fi
QEXTRA=()
[ "$PRESET" != "7b" ] && [ -z "${XCFT_GPU_CHECK_BF16:-}" ] && QEXTRA+=(--no-bf16)
for run in "${QLORA_RUNS[@]}"; do
  read -r qpreset qlength qhd <<<"$run"
  HD=()
  [ "$qhd" != "-" ] && HD=(--hd-num "$qhd")
  OUTPUT=()
  [ -n "$JSONL" ] && OUTPUT=(--jsonl "$JSONL")
  echo "# QLoRA memory line: preset $qpreset, $qlength tokens${HD[*]:+, hd_num $qhd}, --bits 4${JSONL:+ -> $JSONL}"
  timeout "${XCFT_GPU_CHECK_QLORA_TIMEOUT:-240}" "$PY" -m xcft.commands.bench.gpu \
    --preset "$qpreset" --length "$qlength" --steps "$STEPS" --configs ac-unpacked --bits 4 \
    ${OUTPUT[@]+"${OUTPUT[@]}"} ${HD[@]+"${HD[@]}"} ${QEXTRA[@]+"${QEXTRA[@]}"} "$@" || status=$?
done
exit "$status"

#!/usr/bin/env bash
# GPU check (one H100, under 5 minutes): the 7b preset (random weights, 490 px), LoRA, bf16,
# ~4096-token sequences, activation checkpointing on and off, unpacked batch 1 and packed.
# Prints tokens/s, MFU and peak GPU memory per configuration, then the verdict against the
# targets (MFU >= 45 %, peak <= 20 GiB with checkpointing). Each result also carries the memory
# plan of that run ("plan": the JSON of `xcft plan --format json` for the check's synthetic rows)
# and "peak_over_plan" (torch.cuda.max_memory_allocated / the planned peak of live tensors).
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
exec timeout "${XCFT_GPU_CHECK_TIMEOUT:-290}" "$PY" -m xcft.commands.bench.gpu \
  --preset "$PRESET" --length "$LENGTH" --steps "$STEPS" --configs "$CONFIGS" ${EXTRA[@]+"${EXTRA[@]}"} "$@"

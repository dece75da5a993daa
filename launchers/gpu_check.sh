#!/usr/bin/env bash
# GPU readiness in one command, under 8 minutes on one lent GPU (issue #14). Records bf16 MFU of
# the real step at the mindeye1 preset at micro-batch 32 and 256 (goal >= 0.50 at >= 256), which
# fused AdamW was picked (apex's, torch's, DeepSpeed's CPU Adam with offload), NCCL init and first
# collectives, and ZeRO-3 device memory against estimate.py. See mindeye_dist/bench/gpu.py.
#
#   launchers/gpu_check.sh                          # writes gpu_check.json and gpu_check.md here
#   OUT=/tmp/h200 launchers/gpu_check.sh            # -> /tmp/h200.json, /tmp/h200.md
#   launchers/gpu_check.sh --device cpu --quick     # without a GPU: every non-CUDA part, CUDA parts skipped
#
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3). Exit status:
# 0 when every part ran or was skipped with a reason, 1 when a part failed, 124 past 8 minutes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
OUT="${OUT:-gpu_check}"
for arg in "$@"; do
  # --device cpu: hide GPUs before torch starts, so the process group is gloo and nothing lands on a GPU
  if [[ "$arg" == "cpu" && "${prev:-}" == "--device" ]]; then export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu; fi
  prev="$arg"
done
cd "$ROOT"
exec timeout --signal=TERM --kill-after=20 480 "$PYTHON" launchers/benchmark.py --gpu-check \
  --json "$OUT.json" --markdown "$OUT.md" "$@"

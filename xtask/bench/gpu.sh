#!/usr/bin/env bash
# The training-step benchmark on a GPU, for a session that has the device machine (issue #7):
# ours (a CUDA build of at-train) against eager PyTorch on the same card, alternating, one JSON
# line per measurement into $OUT/gpu-bench.jsonl (or ./gpu-bench.jsonl).
#
# Build here first (no GPU needed; 12-16 minutes the first time, 5 on a warm target dir):
#   cargo xtask cuda-build cuda,cudnn
# (target/cuda-dist/at-train-cuda,cudnn.gz and run-gpu.sh; without nccl it needs no Open MPI
# there; for #24's NCCL check see gpu_nccl.sh).
# then, on the device machine, from the repository root:
#   bash xtask/bench/gpu.sh target/cuda-dist/at-train-cuda,cudnn.gz [PYTHON]
# PYTHON defaults to /opt/torch/.venv/bin/python (the device machine's PyTorch).
set -euo pipefail
BIN_GZ=${1:?usage: gpu.sh AT_TRAIN_CUDA.gz [PYTHON]}
PYTHON=${2:-/opt/torch/.venv/bin/python}
DIST=$(dirname "$BIN_GZ")
BIN=${BIN_GZ%.gz}
[ -x "$BIN" ] || gunzip -kf "$BIN_GZ"
chmod +x "$BIN"
OUT_FILE=${OUT:-.}/gpu-bench.jsonl
: > "$OUT_FILE"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "${OUT:-.}/gpu-info.txt"
ldd "$BIN" | grep -i "not found" && { echo "missing libraries (see run-gpu.sh)"; }
# First the smoke test: the device against the CPU, and a run that trains, stops and resumes.
RUN="$DIST/run-gpu.sh" OUT=${OUT:-.} bash "$(dirname "$0")/gpu_smoke.sh" "$BIN" cuda:0
configs=(
  "wrn-16-1 student wrn-16-2" "wrn-16-1 teacher wrn-16-2" "wrn-16-1 at wrn-16-2" "wrn-16-1 at-kd wrn-16-2"
  "wrn-16-2 student wrn-40-2" "wrn-16-2 teacher wrn-40-2" "wrn-16-2 at wrn-40-2" "wrn-16-2 at-kd wrn-40-2"
  "wrn-40-2 student wrn-40-2"
)
for round in 1 2; do
  for c in "${configs[@]}"; do
    set -- $c
    "$DIST/run-gpu.sh" "$BIN" bench-step "$1" "$2" --teacher "$3" --device cuda:0 --warmup 3 --steps 10 \
      | tail -n 1 | tee -a "$OUT_FILE"
    "$PYTHON" xtask/bench/torch_step.py "$1" "$2" "$3" 128 3 10 0 cuda | tail -n 1 | tee -a "$OUT_FILE"
  done
done

#!/usr/bin/env bash
# The first minutes of a GPU session: does the device compute what the CPU computes, and does a
# run train, evaluate, checkpoint and resume on it? Run before any benchmark (gpu.sh does), so a
# session is not lost to a wrong number or a typo. Runs end to end on a CPU build with `cpu` as
# the device, which is how it is tested before it is carried:
#   cargo build --release -p at-train && bash xtask/bench/gpu_smoke.sh target/release/at-train cpu
# On the device machine (see gpu.sh for the build):
#   bash xtask/bench/gpu_smoke.sh target/cuda-dist/at-train-cuda,cudnn cuda:0
# Writes into $OUT/gpu-smoke (or ./gpu-smoke): check-device.jsonl, the quick run, eval.txt. Exits
# non-zero at the first failure of the run, and at the end if check-device found a disagreement.
# With `cpu` as the device, check-device compares the CPU kernels with a GPU's op mix run on the
# CPU. RUN, if set, prefixes every command (e.g. target/cuda-dist/run-gpu.sh).
set -euo pipefail
BIN=${1:?usage: gpu_smoke.sh AT_TRAIN DEVICE}
DEVICE=${2:?usage: gpu_smoke.sh AT_TRAIN DEVICE}
DIR=${OUT:-.}/gpu-smoke
RUN=${RUN:-}
mkdir -p "$DIR"
rm -rf "$DIR/quick"
step() { echo "== $*" >&2; }

# 1-3: a WRN-16-1 step, AT+KD from a WRN-16-2, NIN gradient AT (second order, max pooling):
# CPU against the device, loss, every gradient and the running statistics.
# A disagreement is reported at the end, after the run below: its numbers say more.
step "check-device on $DEVICE"
CHECKED=0
$RUN "$BIN" check-device --device "$DEVICE" > "$DIR/check-device.jsonl" || CHECKED=$?
cat "$DIR/check-device.jsonl"

# 4: the quick preset on the device: one epoch with its evaluation and checkpoint, stopped,
# then resumed to the end, then evaluated again from the saved weights.
step "one epoch of the quick preset, stopped with a checkpoint"
$RUN "$BIN" train --preset quick --device "$DEVICE" --set epochs=2 --stop-after-epochs 1 \
  --run-dir "$DIR/quick"
test -f "$DIR/quick/checkpoints/latest"
test ! -f "$DIR/quick/result.json"
step "resumed to the end"
$RUN "$BIN" train --resume "$DIR/quick" --device "$DEVICE" | tee "$DIR/result.json"
test -f "$DIR/quick/result.json"
step "evaluated from the saved weights"
$RUN "$BIN" eval "$DIR/quick" --device "$DEVICE" | tee "$DIR/eval.txt"
if [ "$CHECKED" != 0 ]; then
  echo "gpu_smoke: $DEVICE disagrees with the CPU (check-device.jsonl); the run itself worked" >&2
  exit 1
fi
echo "gpu_smoke: $DEVICE passed every check" >&2

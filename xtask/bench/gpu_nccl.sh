#!/usr/bin/env bash
# Issue #24's GPU check in one call on the device machine (one GPU allows one NCCL rank):
#  1. the quick preset trained twice on the GPU, alone and as a one-rank NCCL job
#     (AT_DATA_PARALLEL=1: every gradient and metric goes through NCCL's all-reduce): the same
#     loss trajectory;
#  2. ResNet-18 trained alone and as a one-rank NCCL job: the time the all-reduce of its
#     gradients (11.7 M values in one flat f32 buffer) adds to a step.
# Results in $OUT (or .): gpu-nccl.txt and the runs' metrics.
#
# Built here first: `cargo xtask cuda-build` (target/cuda-dist/at-train-cuda,cudnn,nccl.gz and
# run-gpu.sh) and `bash xtask/cuda/mpi-runtime.sh` (openmpi-runtime.tar.gz: the binary links
# Open MPI, which the GPU machine lacks). Then there, from the repository root:
#   bash xtask/bench/gpu_nccl.sh target/cuda-dist/at-train-cuda,cudnn,nccl.gz [DEVICE]
# DEVICE defaults to cuda (checked here on the CPU with a `--features mpi` build and `cpu`).
set -euo pipefail
BIN=${1:?usage: gpu_nccl.sh AT_TRAIN[.gz] [DEVICE]}
DEVICE=${2:-cuda}
DIST=$(cd "$(dirname "$BIN")" && pwd)
case "$BIN" in *.gz) [ -x "${BIN%.gz}" ] || gunzip -kf "$BIN"; BIN=${BIN%.gz} ;; esac
chmod +x "$BIN"
OUT_DIR=${OUT:-.}
mkdir -p "$OUT_DIR"
REPORT=$OUT_DIR/gpu-nccl.txt
W=$(mktemp -d)
if [ -f "$DIST/openmpi-runtime.tar.gz" ] && ! ldconfig -p | grep -q libmpi.so.40; then
  tar -C "$W" -xzf "$DIST/openmpi-runtime.tar.gz"
  export OPAL_PREFIX=$W/openmpi
  export LD_LIBRARY_PATH=$W/openmpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
# One rank without a launcher: MPI's singleton, which needs no daemon when isolated.
export OMPI_MCA_ess_singleton_isolated=1 OMPI_MCA_mca_base_component_show_load_errors=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
RUN=()
[ -x "$DIST/run-gpu.sh" ] && RUN=("$DIST/run-gpu.sh")
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  echo "device: $DEVICE"; } | tee "$REPORT"
"${RUN[@]}" ldd "$BIN" | grep "not found" | tee -a "$REPORT" || true

train() { # NAME PARALLEL ARGS...
  local name=$1 parallel=$2; shift 2
  AT_DATA_PARALLEL=$parallel "${RUN[@]}" "$BIN" train --preset quick --device "$DEVICE" \
    --run-dir "$W/$name" "$@" > "$W/$name.log" 2>&1 || { tail -20 "$W/$name.log" | tee -a "$REPORT"; return 1; }
  cp "$W/$name/metrics.jsonl" "$OUT_DIR/$name-metrics.jsonl"
}
field() { python3 -c "import json,sys; print(' '.join(str(json.loads(l)[sys.argv[2]]) for l in open(sys.argv[1])))" "$1" "$2"; }

train quick-alone 0 --set epochs=3
train quick-nccl 1 --set epochs=3
grep -a "data-parallel" "$W/quick-nccl.log" | tee -a "$REPORT" || echo "the one-rank job did not start (see above)" | tee -a "$REPORT"
echo "train loss alone:      $(field "$W/quick-alone/metrics.jsonl" train_loss)" | tee -a "$REPORT"
echo "train loss one NCCL rank: $(field "$W/quick-nccl/metrics.jsonl" train_loss)" | tee -a "$REPORT"

R=(--set student=resnet18 --set epochs=2 --set batch_size=64 --set data.train_limit=1280 --set data.test_limit=64)
for round in 1 2; do
  train "resnet18-alone-$round" 0 "${R[@]}"
  train "resnet18-nccl-$round" 1 "${R[@]}"
  python3 - "$W/resnet18-alone-$round/metrics.jsonl" "$W/resnet18-nccl-$round/metrics.jsonl" <<'PY' | tee -a "$REPORT"
import json, sys
alone, nccl = (json.loads(open(p).read().splitlines()[-1])["images_per_second"] for p in sys.argv[1:])
ms = lambda ips: 64 / ips * 1e3
print(f"resnet18 batch 64, epoch 2: alone {alone:.1f} images/s, one NCCL rank {nccl:.1f}: "
      f"the collective adds {ms(nccl) - ms(alone):.2f} ms a step ({ms(alone):.1f} -> {ms(nccl):.1f})")
PY
done
rm -rf "$W"

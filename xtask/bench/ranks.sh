#!/usr/bin/env bash
# Data-parallel overhead on one machine's CPU: training images/s of WRN-16-2 (quick preset's
# Fashion-MNIST subset at 28x28, batch 128) with one rank of N threads against N ranks of one
# thread each under mpirun (Open MPI, shared memory), alternating, each configuration 3 times.
# The second epoch is measured (the first warms the allocator); its time includes one 128-image
# evaluation batch. Usage: xtask/bench/ranks.sh [BIN] [N]; BIN is a release build with
# `--features mpi` (default target/release/at-train).
set -euo pipefail
BIN=${1:-target/release/at-train}
N=${2:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SETS=(--set student=wrn-16-2 --set batch_size=128 --set epochs=2 --set data.train_limit=1280
      --set data.test_limit=128 --set threads=1)
rate() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().splitlines()[-1])['images_per_second'])" "$1/metrics.jsonl"; }
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores"
for round in 1 2 3; do
  RAYON_NUM_THREADS=$N "$BIN" train --preset quick "${SETS[@]}" --run-dir "$WORK/one-$round" > /dev/null 2>&1
  echo "1 rank x $N threads: $(rate "$WORK/one-$round") images/s"
  mpirun -np "$N" --bind-to core --map-by core -x RAYON_NUM_THREADS=1 \
    "$BIN" train --preset quick "${SETS[@]}" --run-dir "$WORK/ranks-$round" > /dev/null 2>&1
  echo "$N ranks x 1 thread: $(rate "$WORK/ranks-$round") images/s"
done

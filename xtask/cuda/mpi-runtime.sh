#!/usr/bin/env bash
# Packs this machine's Open MPI runtime (Debian 12's 4.1: its shared libraries, its components
# and help files) into DIST/openmpi-runtime.tar.gz, for a machine that has none: the GPU machine,
# where a `--features nccl` build (which links libmpi, for the ranks and NCCL's bootstrap) must
# start. There, unpack it into a directory D and run with
#   OPAL_PREFIX=D LD_LIBRARY_PATH=D/lib:... OMPI_MCA_ess_singleton_isolated=1
# (xtask/bench/gpu_nccl.sh does). Usage: mpi-runtime.sh [DIST] (default target/cuda-dist).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIST=$(mkdir -p "${1:-target/cuda-dist}" && cd "${1:-target/cuda-dist}" && pwd)
ARCH=x86_64-linux-gnu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
B=$WORK/openmpi
mkdir -p "$B/lib" "$B/lib/$ARCH" "$B/share"
for l in libmpi.so.40 libopen-rte.so.40 libopen-pal.so.40 libhwloc.so.15 \
         libevent_core-2.1.so.7 libevent_pthreads-2.1.so.7; do
  cp -L "/lib/$ARCH/$l" "$B/lib/"
done
# The layout OPAL_PREFIX relocates: PREFIX/lib/ARCH/openmpi/lib/openmpi3 (the components) and
# PREFIX/share/openmpi (the help texts).
cp -a "/usr/lib/$ARCH/openmpi" "$B/lib/$ARCH/"
rm -rf "$B/lib/$ARCH/openmpi/include"
cp -a /usr/share/openmpi "$B/share/"
tar -C "$WORK" -czf "$DIST/openmpi-runtime.tar.gz" openmpi
echo "wrote $DIST/openmpi-runtime.tar.gz ($(du -h "$DIST/openmpi-runtime.tar.gz" | cut -f1))"

#!/usr/bin/env bash
# `cargo xtask cuda-build [FEATURES]`: a CUDA build of at-train on a machine without a GPU or a
# CUDA toolkit, so that the CUDA (and NCCL) code compiles in CI and a binary can be carried to a
# GPU machine. The toolkit comes from PyPI wheels (CUDA 13.0, the versions PyTorch 2.11's cu130
# build uses, which driver 580 runs): nvcc, headers, the link-time libraries, cuDNN 9, NCCL 2.30.
# libcuda comes from the driver at run time; here a stub that answers "no device" to every call
# stands in for it at link time.
#
# Environment: CUDA_BUILD_CACHE (wheels and the unpacked toolkit, about 2.5 GB; default
# ~/.cache/at-cuda-build), CARGO_TARGET_DIR (default target/cuda), DIST_DIR (default
# target/cuda-dist), CUDA_COMPUTE_CAP (default 90: H100/H200).
# FEATURES default: cuda,cudnn,nccl (nccl needs Open MPI's libopenmpi-dev, as the mpi feature).
set -euo pipefail
cd "$(dirname "$0")/../.."
FEATURES=${1:-cuda,cudnn,nccl}
CACHE=${CUDA_BUILD_CACHE:-$HOME/.cache/at-cuda-build}
WHEELS=$CACHE/wheels
ROOT=$CACHE/root
export CUDA_HOME=$ROOT/nvidia/cu13
NCCL_HOME=$ROOT/nvidia/nccl

fetch() {
  mkdir -p "$WHEELS" "$ROOT"
  python3 -m pip download -q --no-deps -d "$WHEELS" "$@"
}

if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "fetching the CUDA 13.0 toolkit wheels into $WHEELS"
  fetch nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3 nvidia-cudnn-cu13==9.19.0.56
  for w in "$WHEELS"/nvidia_cuda_*.whl "$WHEELS"/nvidia_nvvm-*.whl "$WHEELS"/nvidia_curand-*.whl; do
    unzip -qo "$w" -d "$ROOT"
  done
  # Only the shared objects the linker needs from the two large wheels.
  unzip -qjo "$WHEELS"/nvidia_cublas-*.whl 'nvidia/cu13/lib/libcublas.so.13' \
    'nvidia/cu13/lib/libcublasLt.so.13' -d "$CUDA_HOME/lib"
  unzip -qjo "$WHEELS"/nvidia_cudnn_cu13-*.whl 'nvidia/cudnn/lib/libcudnn.so.9' -d "$CUDA_HOME/lib"
  chmod +x "$CUDA_HOME"/bin/* "$CUDA_HOME"/nvvm/bin/*
  # The wheels carry versioned names only; the linker asks for the plain ones.
  ( cd "$CUDA_HOME/lib"
    for l in cudart.so.13 nvrtc.so.13 curand.so.10 cublas.so.13 cublasLt.so.13 cudnn.so.9; do
      ln -sf "lib$l" "lib${l%.*}"
    done )
  # libcuda at link time: every entry point of cuda.h (and of cudarc's bindings) answering
  # CUDA_ERROR_NO_DEVICE, so that the binary also starts (CPU path) where there is no GPU.
  mkdir -p "$CUDA_HOME/lib/stubs"
  {
    echo 'static const char *none = "no CUDA device (libcuda stub)";'
    {
      echo '#include <cuda.h>' | gcc -E -I"$CUDA_HOME/include" -x c - \
        | grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | tr -d '( '
      grep -ohP 'pub unsafe fn \Kcu\w+' ~/.cargo/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null || true
    } | sort -u | grep -vxE 'cuGetErrorString|cuGetErrorName' | awk '{print "int "$1"(void){return 100;}"}'
    echo 'int cuGetErrorString(int e, const char **s){*s=none;return 0;}'
    echo 'int cuGetErrorName(int e, const char **s){*s="CUDA_ERROR_NO_DEVICE";return 0;}'
  } > "$CACHE/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$CACHE/libcuda_stub.c"
  ln -sf libcuda.so "$CUDA_HOME/lib/stubs/libcuda.so.1"
fi

LIBS=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs
if [[ ",$FEATURES," == *",nccl,"* ]]; then
  if [ ! -e "$NCCL_HOME/lib/libnccl.so" ]; then
    echo "fetching NCCL (nvidia-nccl-cu13 2.30) into $WHEELS"
    fetch 'nvidia-nccl-cu13>=2.30,<2.31'
    unzip -qo "$WHEELS"/nvidia_nccl_cu13-*.whl -d "$ROOT"
    ln -sf libnccl.so.2 "$NCCL_HOME/lib/libnccl.so"
  fi
  LIBS=$LIBS:$NCCL_HOME/lib
  export LIBRARY_PATH=$NCCL_HOME/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
fi

export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}
time cargo build --release -p at-train --features "$FEATURES" --bin at-train

DIST=${DIST_DIR:-$PWD/target/cuda-dist}
mkdir -p "$DIST"
BIN=$DIST/at-train-$FEATURES
cp "$CARGO_TARGET_DIR/release/at-train" "$BIN"
strip "$BIN" 2>/dev/null || true
gzip -9 -kf "$BIN"
# It must at least start here: every library it links is found (libcuda's stub included).
LD_LIBRARY_PATH=$LIBS "$BIN" --help > /dev/null
# The launcher on the GPU machine: the CUDA 13, cuDNN 9 and NCCL libraries of PyTorch's venv
# there (and of a toolkit, if one is installed) on the library path.
cat > "$DIST/run-gpu.sh" <<'LAUNCHER'
#!/bin/sh
# usage: run-gpu.sh ./at-train-FEATURES [args]
dirs=""
for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/cudnn/lib \
         /opt/torch/.venv/lib/python3*/site-packages/nvidia/nccl/lib \
         /usr/local/cuda/lib64; do
  [ -d "$d" ] && dirs="$dirs:$d"
done
LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$dirs" exec "$@"
LAUNCHER
chmod +x "$DIST/run-gpu.sh"
echo "built $BIN (and .gz, $(du -h "$BIN.gz" | cut -f1)); it starts here on the CPU path"

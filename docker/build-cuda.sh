#!/usr/bin/env bash
# Builds a CUDA-enabled, stripped `sdserve` on a machine with no GPU and no system CUDA.
#
# The CUDA 13.0 toolkit pieces come from PyPI into a venv outside the repository; a shim
# CUDA_HOME gives the linker the unversioned library names it needs and a generated `libcuda.so`
# stub (the real one comes with the NVIDIA driver at run time and must never be shipped).
#
# CUDA 13.0 exactly: PTX from a newer nvcc is refused by the 13.0 driver JIT (driver 580), and the
# binary needs the libcublas.so.13 / libcudart.so.13 / libnvrtc.so.13 / libcurand.so.10 family.
#
# Usage: docker/build-cuda.sh [--out PATH] [--cudnn] [--skip-pip]
# Environment:
#   SDSERVE_CUDA_DIR   toolchain venv + shim (default: $HOME/.cache/sdserve-cuda)
#   CUDA_COMPUTE_CAP   GPU compute capability (default: 90, H100/H200; candle adds the `a`)
#   CARGO_TARGET_DIR   default: <repo>/target/cuda, so the CPU build cache is left alone; the
#                      stripped binary is left there as sdserve-cuda (or sdserve-cudnn)
#   PYTHON             interpreter used to create the venv (default: python3)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=""
CUDNN=0
SKIP_PIP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --cudnn) CUDNN=1; shift ;;
        --skip-pip) SKIP_PIP=1; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-cuda.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

TOOLS=${SDSERVE_CUDA_DIR:-$HOME/.cache/sdserve-cuda}
VENV=$TOOLS/venv
SHIM=$TOOLS/cuda-home
PY=${PYTHON:-python3}

# Every piece pinned to CUDA 13.0: nvidia-cuda-nvcc leaves its companions unpinned, and pip would
# otherwise take 13.x pieces that do not match nvcc.
PACKAGES=(
    "nvidia-cuda-nvcc==13.0.88"
    "nvidia-cuda-runtime==13.0.96"
    "nvidia-nvvm==13.0.88"
    "nvidia-cuda-crt==13.0.88"
    "nvidia-cuda-cccl==13.0.85"
    "nvidia-cuda-nvrtc==13.0.88"
    "nvidia-curand==10.4.0.35"
    "nvidia-cublas==13.0.2.14"
)
CUDNN_PACKAGES=("nvidia-cudnn-cu13==9.21.0.82")

step() { printf '\n==> %s\n' "$*"; }

step "toolchain venv: $VENV"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if [ "$SKIP_PIP" = 0 ]; then
    wanted=("${PACKAGES[@]}")
    [ "$CUDNN" = 1 ] && wanted+=("${CUDNN_PACKAGES[@]}")
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${wanted[@]}"
fi
CU13=$("$VENV/bin/python" - <<'EOF'
import pathlib, sysconfig
print(pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13")
EOF
)
[ -x "$CU13/bin/nvcc" ] || { echo "nvcc not found under $CU13/bin (pip install failed?)" >&2; exit 1; }
"$CU13/bin/nvcc" --version | tail -n 2

step "CUDA_HOME shim: $SHIM"
rm -rf "$SHIM"
mkdir -p "$SHIM/lib/stubs"
ln -s "$CU13/bin" "$SHIM/bin"
ln -s "$CU13/include" "$SHIM/include"
link_lib() { # versioned soname in the wheel -> the same name plus the unversioned one in the shim
    local dir=$1 soname=$2
    [ -e "$dir/$soname" ] || { echo "missing $dir/$soname" >&2; exit 1; }
    ln -sf "$dir/$soname" "$SHIM/lib/$soname"
    ln -sf "$dir/$soname" "$SHIM/lib/${soname%%.so*}.so"
}
for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
    link_lib "$CU13/lib" "$l"
done
if [ "$CUDNN" = 1 ]; then
    CUDNN_DIR=$(dirname "$CU13")/cudnn
    for f in "$CUDNN_DIR"/lib/libcudnn*.so.9; do
        link_lib "$CUDNN_DIR/lib" "$(basename "$f")"
    done
    export CUDNN_LIB=$SHIM/lib
fi

# The stub only has to satisfy the linker: one symbol per driver entry point cudarc declares.
# It returns an error code for everything, so a binary run against it sees "no CUDA device".
find_cudarc() { # empty, not a failure, when the registry has no sources yet (a fresh machine)
    { find "${CARGO_HOME:-$HOME/.cargo}"/registry/src -maxdepth 2 -type d -name cudarc-0.19.10 2>/dev/null || true; } | head -n 1
}
CUDARC_SRC=$(find_cudarc)
if [ -z "$CUDARC_SRC" ]; then
    (cd "$REPO" && cargo fetch --locked)
    CUDARC_SRC=$(find_cudarc)
fi
[ -n "$CUDARC_SRC" ] || { echo "cudarc 0.19.10 sources not found in the cargo registry" >&2; exit 1; }
grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys/mod.rs" \
    | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' >"$SHIM/lib/stubs/libcuda-stub.c"
echo "stub: $(wc -l <"$SHIM/lib/stubs/libcuda-stub.c") driver symbols"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$SHIM/lib/stubs/libcuda.so" "$SHIM/lib/stubs/libcuda-stub.c"
ln -sf libcuda.so "$SHIM/lib/stubs/libcuda.so.1"

export CUDA_HOME=$SHIM
export PATH=$CU13/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target/cuda}
FEATURES=cuda
[ "$CUDNN" = 1 ] && FEATURES=cudnn

step "cargo build --release -p sdserve --features $FEATURES (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR)"
(cd "$REPO" && cargo build --release --locked -p sdserve --features "$FEATURES")
# The cuda and cudnn builds share the target directory (and every dependency they have in common);
# each leaves its own copy, which is what prepare.sh and --out take.
BIN=$CARGO_TARGET_DIR/sdserve-$FEATURES
cp "$CARGO_TARGET_DIR/release/sdserve" "$BIN"
strip "$BIN"
ls -l "$BIN"

step "shared libraries the binary needs"
readelf -d "$BIN" | grep -E 'NEEDED|RPATH|RUNPATH' || true
RUNTIME_PATH=$SHIM/lib:$SHIM/lib/stubs
LD_LIBRARY_PATH=$RUNTIME_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$BIN"
if LD_LIBRARY_PATH=$RUNTIME_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ldd "$BIN" | grep -q 'not found'; then
    echo "unresolved libraries (see above)" >&2
    exit 1
fi
LD_LIBRARY_PATH=$RUNTIME_PATH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$BIN" --version

if [ -n "$OUT" ]; then
    mkdir -p "$(dirname "$OUT")"
    cp "$BIN" "$OUT"
    echo "copied to $OUT"
fi
cat <<EOF

Run it with the CUDA 13 libraries (and the driver's libcuda.so.1) on the loader path, e.g.
  LD_LIBRARY_PATH=\$(dirname \$(find / -name 'libcublas.so.13' -print -quit)) $BIN start <models>
Without a GPU, the stub lets the CPU paths run:
  LD_LIBRARY_PATH=$RUNTIME_PATH $BIN --help
EOF

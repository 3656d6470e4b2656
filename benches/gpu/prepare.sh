#!/usr/bin/env bash
# Fills the folder benches/gpu/run.sh carries to the GPU machine (default .dev/gpu, git-ignored):
#   sdserve.xz       the CUDA build of sdserve (docker/build-cuda.sh), xz-compressed
#   wheels/*.whl     Python packages the device image lacks (diffusers; py3.12, manylinux x86_64)
#   tokenizer-sd1/, tokenizer-sd2/   the CLIP tokenizer files from models/tiny-sd{1,2}/tokenizer
# and reports what the device call will carry against its 64 MiB limit. run.sh needs nothing from
# models/, so that folder can be moved out of the working tree for the call when the tree is large.
#
# Usage: benches/gpu/prepare.sh [DEST]
#   SDSERVE_CUDA_BIN   use this CUDA binary instead of building (docker/build-cuda.sh, incremental)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${1:-$REPO/.dev/gpu}
WHEELS=("diffusers==0.42.1")

# Always from the current sources: a stale binary would measure old code.
if [ -n "${SDSERVE_CUDA_BIN:-}" ]; then
    BIN=$SDSERVE_CUDA_BIN
else
    "$REPO/docker/build-cuda.sh" >/tmp/sdserve-build-cuda.log 2>&1 || { tail -n 40 /tmp/sdserve-build-cuda.log >&2; exit 1; }
    BIN=$REPO/target/cuda/sdserve-cuda
fi
if ! readelf -d "$BIN" | grep -q 'libcuda.so.1'; then
    echo "$BIN is not a CUDA build (no libcuda.so.1 in its NEEDED list)" >&2
    exit 1
fi
mkdir -p "$(dirname "$DEST")"
case "$(cd "$(dirname "$DEST")" && pwd)/$(basename "$DEST")" in
    "$REPO"/*) git -C "$REPO" check-ignore -q "$DEST" || { echo "$DEST is not git-ignored; it would travel twice" >&2; exit 1; } ;;
esac

rm -rf "$DEST"
mkdir -p "$DEST/wheels"
xz -T0 -9 -c "$BIN" >"$DEST/sdserve.xz"
for family in sd1 sd2; do
    mkdir -p "$DEST/tokenizer-$family"
    cp "$REPO/models/tiny-$family/tokenizer/"* "$DEST/tokenizer-$family/"
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST/wheels" "${WHEELS[@]}"

echo "carried folder $DEST:"
(cd "$DEST" && find . -type f -printf '  %p %s bytes\n')
tree_size() { # bytes of tracked and untracked-but-not-ignored files, optionally without models/
    (cd "$REPO" && git ls-files -co --exclude-standard -z) | { if [ "${1:-}" = without-models ]; then grep -zv '^models/'; else cat; fi; } \
        | (cd "$REPO" && xargs -0 -r stat -c %s 2>/dev/null) | awk '{s+=$1} END {print s+0}'
}
tree_bytes=$(tree_size)
lean_bytes=$(tree_size without-models)
carry_bytes=$(du -sb "$DEST" | cut -f1)
limit=$((64 * 1024 * 1024))
printf 'working tree: %d bytes (%d without models/); carried: %d bytes; limit %d\n' \
    "$tree_bytes" "$lean_bytes" "$carry_bytes" "$limit"
if [ $((tree_bytes + carry_bytes)) -le "$limit" ]; then
    echo "fits as it is"
elif [ $((lean_bytes + carry_bytes)) -le "$limit" ]; then
    echo "too large with models/ ($((tree_bytes + carry_bytes)) bytes): move models/ out of the working tree for the device call, e.g."
    echo "  mv models /tmp/sdserve-models-aside   # ... device run ...   mv /tmp/sdserve-models-aside models"
else
    echo "too large even without models/ ($((lean_bytes + carry_bytes)) bytes); largest files:" >&2
    (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 -r du -b 2>/dev/null | sort -rn | head -n 10) >&2
    exit 1
fi

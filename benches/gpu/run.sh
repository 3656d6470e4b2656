#!/usr/bin/env bash
# sdserve (CUDA, F16, candle) against diffusers (PyTorch, F16, SDPA) on the same SD 1.5-size
# random-weight model, in one run on the GPU machine. Needs no Rust, no network and nothing from
# models/ there: the CUDA sdserve binary, the diffusers wheel and the tokenizer files come from the
# carried folder that benches/gpu/prepare.sh fills (.dev/gpu by default).
#
# Writes to $OUT (at most 8 files, the device tool's limit): run.log, sdserve.log, sdserve.json,
# diffusers.json, sdserve-stages.json (the per-stage device profile), sdserve-untuned.json
# (batch 1 with SDSERVE_CUDA_TUNING=off: candle's CUDA defaults, the A/B of this build's levers),
# sdserve-triton.json (batch 1 with the Triton flash-attention kernel, +triton-attention),
# results.md. The images stay in $WORK.
# Every phase has its own time limit inside an overall budget (the report's 30 s kept aside), and
# the JSON files are rewritten after every measurement, so a hang or a failure still leaves what
# was measured.
#
# BENCH_PROFILE=gpu (default): sd15 F16 on cuda, 512x512, 30 steps, CFG 7.5.
# BENCH_PROFILE=sdxl: the SDXL base 1.0 preset F16 on cuda, 1024x1024, 30 steps, CFG 5.
# BENCH_PROFILE=turbo: SDXL-Turbo's shape (the sdxl preset) F16 on cuda, 512x512, 4 steps (and 1), guidance 0.
# BENCH_PROFILE=cpu-tiny: the tiny preset F32 on the CPU at 64x64 (dry run on a machine with no GPU).
# BENCH_PROFILE=cpu-tiny-sdxl: the tiny-sdxl preset F32 on the CPU at 64x64 (dry run of the SDXL path).
# Any BENCH_* variable read by common.py overrides the profile; BENCH_BUDGET_S is the overall limit;
# BENCH_SETUP_ONLY=1 stops after finding the binary, the CUDA libraries and diffusers.
set -uo pipefail
# One brace group: bash reads the whole script before running it, so editing the file mid-run is safe.
{

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CARRY=${BENCH_CARRY:-$REPO/.dev/gpu}
OUT=${OUT:-$REPO/target/bench-gpu}
WORK=${BENCH_WORK:-/tmp/sdserve-bench}
PY=${BENCH_PYTHON:-python3}
BUDGET=${BENCH_BUDGET_S:-470}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/run.log") 2>&1

case ${BENCH_PROFILE:-gpu} in
    gpu)
        PRESET=${BENCH_PRESET:-sd15}
        : "${BENCH_DEVICE:=cuda}" "${BENCH_DTYPE:=f16}" "${BENCH_SIZE:=512}" "${BENCH_STEPS:=30}"
        : "${BENCH_SHORT_STEPS:=10}" "${BENCH_REPEATS:=3}" "${BENCH_ROUNDS:=2}"
        ;;
    sdxl)
        PRESET=${BENCH_PRESET:-sdxl}
        : "${BENCH_DEVICE:=cuda}" "${BENCH_DTYPE:=f16}" "${BENCH_SIZE:=1024}" "${BENCH_STEPS:=30}"
        : "${BENCH_SHORT_STEPS:=10}" "${BENCH_REPEATS:=2}" "${BENCH_ROUNDS:=1}" "${BENCH_GUIDANCE:=5}"
        ;;
    turbo)
        PRESET=${BENCH_PRESET:-sdxl}
        : "${BENCH_DEVICE:=cuda}" "${BENCH_DTYPE:=f16}" "${BENCH_SIZE:=512}" "${BENCH_STEPS:=4}"
        : "${BENCH_SHORT_STEPS:=1}" "${BENCH_REPEATS:=3}" "${BENCH_ROUNDS:=2}" "${BENCH_GUIDANCE:=0}"
        ;;
    cpu-tiny)
        PRESET=${BENCH_PRESET:-tiny}
        : "${BENCH_DEVICE:=cpu}" "${BENCH_DTYPE:=f32}" "${BENCH_SIZE:=64}" "${BENCH_STEPS:=10}"
        : "${BENCH_SHORT_STEPS:=4}" "${BENCH_REPEATS:=2}" "${BENCH_ROUNDS:=1}"
        ;;
    cpu-tiny-sdxl)
        PRESET=${BENCH_PRESET:-tiny-sdxl}
        : "${BENCH_DEVICE:=cpu}" "${BENCH_DTYPE:=f32}" "${BENCH_SIZE:=64}" "${BENCH_STEPS:=4}"
        : "${BENCH_SHORT_STEPS:=1}" "${BENCH_REPEATS:=2}" "${BENCH_ROUNDS:=1}" "${BENCH_GUIDANCE:=5}"
        ;;
    *) echo "unknown BENCH_PROFILE ${BENCH_PROFILE}" >&2; exit 2 ;;
esac
export BENCH_DEVICE BENCH_DTYPE BENCH_SIZE BENCH_STEPS BENCH_SHORT_STEPS BENCH_REPEATS BENCH_ROUNDS
[ -n "${BENCH_GUIDANCE:-}" ] && export BENCH_GUIDANCE
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# Keep the driver's PTX JIT output between the two server starts.
export CUDA_CACHE_PATH=$WORK/nv-cache CUDA_CACHE_MAXSIZE=4294967296

T0=$SECONDS
# phase NAME CAP_SECONDS COMMAND...: runs COMMAND with the smaller of its cap and the budget left
# (less 40 s for the report and the kill grace).
phase() {
    local name=$1 cap=$2 left limit rc
    shift 2
    left=$((BUDGET - (SECONDS - T0) - 40))
    limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        echo "### $name: skipped, budget spent"
        return 124
    fi
    echo "### $name (limit ${limit}s, t=$((SECONDS - T0))s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    echo "### $name: exit $rc after $((SECONDS - T0))s"
    return $rc
}

echo "### profile ${BENCH_PROFILE:-gpu}: preset $PRESET, $BENCH_DEVICE $BENCH_DTYPE, ${BENCH_SIZE}px, $BENCH_STEPS steps"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null || echo "(no nvidia-smi)"

setup() {
    # The binary: plain or xz-compressed (decompressed with Python's lzma, always present).
    BIN=${BENCH_SDSERVE_BIN:-}
    if [ -z "$BIN" ]; then
        if [ -f "$CARRY/sdserve.xz" ]; then
            BIN=$WORK/bin/sdserve
            mkdir -p "$WORK/bin"
            "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
                "$CARRY/sdserve.xz" "$BIN" || return 1
            chmod +x "$BIN"
        else
            BIN=$CARRY/sdserve
        fi
    fi
    echo "binary: $BIN ($(stat -c %s "$BIN") bytes)"
    # The CUDA 13 libraries the binary was linked against, wherever this image keeps them.
    if [ -z "${BENCH_LD_LIBRARY_PATH:-}" ] && [ "$BENCH_DEVICE" != cpu ]; then
        local dirs=""
        local libs="libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libnvrtc.so.13 libcurand.so.10"
        for lib in $libs; do
            local found
            found=$("$PY" - "$lib" <<'EOF'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    hits = glob.glob(os.path.join(root, "nvidia", "**", sys.argv[1]), recursive=True)
    if hits:
        print(os.path.dirname(os.path.realpath(hits[0])))
        break
EOF
)
            if [ -z "$found" ]; then
                found=$(timeout 60 find / -xdev -name "$lib" -not -path '/proc/*' 2>/dev/null | head -n 1 | xargs -r dirname)
            fi
            [ -n "$found" ] || { echo "$lib not found on this machine" >&2; return 1; }
            case ":$dirs:" in *":$found:"*) ;; *) dirs=${dirs:+$dirs:}$found ;; esac
        done
        if ! ldconfig -p | grep -q 'libcuda.so.1 '; then
            local drv
            drv=$(find /usr/local/nvidia /usr/lib /usr/lib64 -name 'libcuda.so.1' 2>/dev/null | head -n 1 | xargs -r dirname)
            [ -n "$drv" ] && dirs=$dirs:$drv
        fi
        BENCH_LD_LIBRARY_PATH=$dirs
    fi
    export LD_LIBRARY_PATH=${BENCH_LD_LIBRARY_PATH:-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|not found' || true
    if ldd "$BIN" | grep -q 'not found'; then
        echo "unresolved libraries" >&2
        return 1
    fi
    "$BIN" --version || return 1
    # diffusers and what the image lacks, from the carried wheels.
    if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$CARRY"/wheels/*.whl
        export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "diffusers", diffusers.__version__, "transformers", transformers.__version__)' \
        || echo "### WARNING: diffusers cannot be imported; the diffusers phase will fail"
}


if ! setup; then
    echo "### setup failed"
    exit 1
fi
[ -n "${BENCH_SETUP_ONLY:-}" ] && exit 0
# The real CLIP vocabularies: carried copies, so models/ may stay behind; else the repository's.
# (SDXL presets take SD 1.x's; the writer makes tokenizer_2 pad with "!".)
FAMILY=sd1
[ "$PRESET" = sd21 ] && FAMILY=sd2
TOKENIZER=$CARRY/tokenizer-$FAMILY
[ -f "$TOKENIZER/vocab.json" ] || TOKENIZER=$REPO/models/tiny-$FAMILY/tokenizer
# The device test of the attention kernels (each against the CPU's on random operands); its
# JSON lines go to run.log, where the report reads them. A failure is reported, not fatal.
phase "kernel check" "${BENCH_CHECK_CAP_S:-60}" "$BIN" check-kernels --device "$BENCH_DEVICE" \
    || echo "### kernel check FAILED (see the lines above)"
rm -rf "$WORK/model"
phase "make model" "${BENCH_MAKE_CAP_S:-150}" "$BIN" make-random-model --config "$PRESET" --dtype "$BENCH_DTYPE" --seed 0 \
    --tokenizer "$TOKENIZER" --out "$WORK/model" || { echo "### cannot make the model"; exit 1; }
"$PY" -c "import sys; sys.path.insert(0, '$HERE'); import common; s = int('$BENCH_SIZE') // 8; common.make_latents('$WORK/latents.f32', (1, 4, s, s), 42)"
rm -f "$OUT"/sdserve*.json "$OUT"/diffusers.json "$OUT"/*.png "$WORK"/*.png
stop_server() { # timeout signals the client's whole process group, the server included; make sure anyway.
    if [ -f "$WORK/server.pid" ] && kill -0 "$(cat "$WORK/server.pid")" 2>/dev/null; then
        kill "$(cat "$WORK/server.pid")"
        sleep 2
    fi
}

phase sdserve "${BENCH_SDSERVE_CAP_S:-250}" "$PY" "$HERE/bench_sdserve.py" --bin "$BIN" --model-dir "$WORK/model" \
    --work "$WORK" --latents "$WORK/latents.f32" --out-json "$OUT/sdserve.json" --png-out "$WORK/sdserve.png" \
    --log "$OUT/sdserve.log"
stop_server

phase diffusers "${BENCH_DIFFUSERS_CAP_S:-160}" "$PY" "$HERE/bench_diffusers.py" --model-dir "$WORK/model" \
    --latents "$WORK/latents.f32" --out-json "$OUT/diffusers.json" --png-out "$WORK/diffusers.png" \
    --sdserve-png "$WORK/sdserve.png"

# Where a batch-1 image's time goes, stage by stage (each stage between two device syncs).
phase "sdserve stages" "${BENCH_STAGES_CAP_S:-60}" "$PY" "$HERE/bench_sdserve.py" --bin "$BIN" --model-dir "$WORK/model" \
    --work "$WORK" --latents "$WORK/latents.f32" --out-json "$OUT/sdserve-stages.json" \
    --log "$OUT/sdserve.log" --port 18300 --stages
stop_server

# The same binary with every lever of device.rs's CudaTuning off (candle's defaults), batch 1.
if [ "$BENCH_DEVICE" != cpu ] && [ -z "${BENCH_SKIP_UNTUNED:-}" ]; then
    phase "sdserve untuned" "${BENCH_UNTUNED_CAP_S:-90}" "$PY" "$HERE/bench_sdserve.py" --bin "$BIN" \
        --model-dir "$WORK/model" --work "$WORK" --latents "$WORK/latents.f32" \
        --out-json "$OUT/sdserve-untuned.json" --compare-png "$WORK/diffusers.png" --log "$OUT/sdserve.log" \
        --port 18400 --batch1-only --server-env SDSERVE_CUDA_TUNING=off
    stop_server
fi

# The Triton flash-attention kernel (off by default until measured), batch 1.
if [ "$BENCH_DEVICE" != cpu ] && [ -z "${BENCH_SKIP_TRITON:-}" ]; then
    phase "sdserve triton" "${BENCH_TRITON_CAP_S:-90}" "$PY" "$HERE/bench_sdserve.py" --bin "$BIN" \
        --model-dir "$WORK/model" --work "$WORK" --latents "$WORK/latents.f32" \
        --out-json "$OUT/sdserve-triton.json" --compare-png "$WORK/diffusers.png" --log "$OUT/sdserve.log" \
        --port 18500 --batch1-only --server-env SDSERVE_CUDA_TUNING=+triton-attention
    stop_server
fi

echo "### report"
timeout -k 5 30 "$PY" "$HERE/report.py" --out "$OUT" --images "$WORK" --title "$PRESET ${BENCH_DTYPE} ${BENCH_SIZE}px ${BENCH_STEPS} steps"
echo "### done in $((SECONDS - T0))s"
sleep 1 # let tee write the end of run.log
exit
}

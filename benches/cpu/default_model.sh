#!/usr/bin/env bash
# Seconds per image of the default model (models/tiny-shapes) on this machine's CPU, on its
# default settings (64x64, 20 DPM++ 2M steps, guidance 5): sdserve (release build, over HTTP,
# one client at a time) and diffusers (PyTorch on the CPU, same folder, prompt and settings),
# one after the other in the same run.
#
#   bash benches/cpu/default_model.sh            # DURATION=60 RUNS=10 PYTHON=.venv/bin/python
#
# The Python side needs the packages of models/scripts/requirements.txt; without them only the
# sdserve side runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-60}
RUNS=${RUNS:-10}
PYTHON=${PYTHON:-.venv/bin/python}
PROMPT="a red circle on a blue background"
PORT=${PORT:-18080}

cargo build --release -q -p sdserve -p sdserve-benches
echo "== machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

target/release/sdserve start models/tiny-shapes --host 127.0.0.1 --http-port "$PORT" \
    --grpc-port 0 --metrics-port 0 >/tmp/sdserve-default-model.log 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$PORT/v2/health/ready" >/dev/null && break
    sleep 0.2
done
echo "== sdserve: loadgen, concurrency 1, ${DURATION} s"
target/release/loadgen --url "http://127.0.0.1:$PORT" --model tiny-shapes --concurrency 1 \
    --duration "$DURATION" --steps 20 --prompt "$PROMPT" --pid "$server"
kill "$server"
wait "$server" 2>/dev/null || true

if ! "$PYTHON" -c "import diffusers, torch" 2>/dev/null; then
    echo "== diffusers: skipped ($PYTHON has no diffusers/torch)"
    exit 0
fi
echo "== diffusers: ${RUNS} images after one warm-up, torch threads = $(nproc)"
"$PYTHON" - "$RUNS" "$PROMPT" <<'PY'
import statistics, sys, time
import torch
from diffusers import StableDiffusionPipeline

runs, prompt = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(torch.get_num_threads())
pipe = StableDiffusionPipeline.from_pretrained("models/tiny-shapes", safety_checker=None)
pipe.set_progress_bar_config(disable=True)
def one(seed):
    t = time.perf_counter()
    pipe(prompt, num_inference_steps=20, guidance_scale=5.0, height=64, width=64,
         generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - t
one(0)
times = [one(i + 1) for i in range(runs)]
print(f"diffusers {pipe.scheduler.__class__.__name__}: median {statistics.median(times):.3f} s per image, "
      f"min {min(times):.3f}, max {max(times):.3f} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
PY

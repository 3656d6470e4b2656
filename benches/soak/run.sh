#!/usr/bin/env bash
# The long soak (issue: faults under load): sdserve (release) on tiny-sd1 with a small queue,
# a memory budget, a 2 MiB body limit and a 60 s request timeout; `loadgen` sends successes,
# deadlines (every 5th request: 100 ms) and client disconnects (every 7th, after 60 ms; a
# 4-step 64² request takes about 150 ms here, so both land in the queue and mid-generation)
# while mixed.py sends hostile and oversize bodies and half-sent headers.
#   benches/soak/run.sh [SECONDS]     (default 1800)
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_TOTAL=${1:-1800}
work=$(mktemp -d)
mkdir -p "$work/repo/tiny"
cat > "$work/repo/tiny/model-settings.json" <<JSON
{"name": "tiny", "implementation": "sdserve.StableDiffusion",
 "parameters": {"uri": "$PWD/models/tiny-sd1", "extra": {"defaults": {"num_inference_steps": 4}}}}
JSON
cat > "$work/repo/settings.json" <<JSON
{"parallel_workers": 2, "max_queue_size": 4, "request_timeout": 60,
 "max_request_body_bytes": 2097152, "memory_budget": "600MiB", "debug": false}
JSON
cargo build --release -q -p sdserve -p sdserve-benches --bin sdserve --bin loadgen
./target/release/sdserve start "$work/repo" --http-port 18180 --grpc-port 18181 --metrics-port 18182 \
    > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
until curl -sf localhost:18180/v2/health/ready >/dev/null; do sleep 0.5; done
python3 benches/soak/mixed.py http://127.0.0.1:18180 tiny "$server" "$SECONDS_TOTAL" 120 \
    > "$work/mixed.json" &
mixed=$!
./target/release/loadgen --url http://127.0.0.1:18180 --model tiny --concurrency 8 \
    --duration "$SECONDS_TOTAL" --warmup 120 --steps 4 --pid "$server" \
    --deadline-every 5 --deadline-ms 100 --abandon-every 7 --abandon-after-ms 60 --json \
    > "$work/loadgen.json"
status=0
wait $mixed || status=$?
echo "== loadgen"; cat "$work/loadgen.json"
echo "== mixed"; cat "$work/mixed.json"
echo "== HTTP answers by status (the server's own count; 503 = queue full, 504 = deadline)"
curl -s localhost:18182/metrics | grep '^rest_server_requests_total' | grep -v 'status_code="200"' || true
echo "== panics and failed allocations in the log: $(grep -cE 'panicked|memory allocation' "$work/server.log" || true)"
kill -0 $server && echo "server alive after the soak"
exit $status

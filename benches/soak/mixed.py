#!/usr/bin/env python3
"""The hostile half of the long soak (benches/soak/run.sh runs it beside `loadgen`): for the
given seconds, against a running sdserve, it sends invalid bodies (400/422 expected), requests
too large for the memory budget (400), bodies over the size limit (413), half-sent headers that
it then leaves hanging (the server must close them), and a health probe every second (200).
Every answer is counted by kind and status; anything else is a failure. Inference requests
may also get 503: the queue is full while `loadgen` runs, and a full server refuses before it
reads the body. It also samples the
server's resident memory every 10 s and prints the slope after the warm-up.

usage: mixed.py URL MODEL PID SECONDS [WARMUP_SECONDS]
"""

import json
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

URL, MODEL, PID, SECONDS = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
WARMUP = float(sys.argv[5]) if len(sys.argv) > 5 else 120.0
HOST, PORT = URL.split("//")[1].split(":")[0], int(URL.rsplit(":", 1)[1])
END = time.time() + SECONDS
counts = Counter()
unexpected = []
lock = threading.Lock()


def post(path, body, content_type="application/json"):
    req = urllib.request.Request(URL + path, data=body, method="POST",
                                 headers={"content-type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception as e:  # connection-level failure: never expected
        return f"error: {e}"


def record(kind, status, allowed):
    with lock:
        counts[(kind, status)] += 1
        if status not in allowed:
            unexpected.append((kind, status))


def prompt(params):
    return json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES",
                                   "data": ["a soak"]}], "parameters": params}).encode()


HOSTILE = [
    b"{not json",
    json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "FP32",
                            "data": [1.0]}]}).encode(),
    json.dumps({"inputs": [{"name": "prompt", "shape": [1 << 40], "datatype": "BYTES",
                            "data": ["x"]}]}).encode(),
    prompt({"num_inference_steps": -3}),
    prompt({"height": 63}),
    prompt({"guidance_scale": "loud"}),
    json.dumps({"inputs": []}).encode(),
]


def hostile():
    i = 0
    while time.time() < END:
        status = post(f"/v2/models/{MODEL}/infer", HOSTILE[i % len(HOSTILE)])
        record("hostile", status, {400, 422, 503})
        i += 1
        time.sleep(0.2)


def oversize():
    while time.time() < END:
        # Beyond the memory budget the soak's server runs with.
        record("over budget", post(f"/v2/models/{MODEL}/infer",
                                   prompt({"height": 1024, "width": 1024,
                                           "num_inference_steps": 1})), {400, 503})
        # Beyond max_request_body_bytes (2 MiB in the soak's settings).
        record("over body limit", post(f"/v2/models/{MODEL}/infer",
                                       b"{" + b" " * (3 << 20) + b"}"), {413, 503})
        time.sleep(1.0)


def slow_headers():
    """Half a request header, then silence: the server must close within its
    header_read_timeout (10 s by default; a generous 30 s here)."""
    while time.time() < END:
        socks = []
        for _ in range(50):
            s = socket.create_connection((HOST, PORT))
            s.sendall(b"POST /v2/models/x/infer HTTP/1.1\r\nHost: soak\r\nContent-")
            socks.append(s)
        started = time.time()
        for s in socks:
            s.settimeout(max(1.0, 30 - (time.time() - started)))
            try:
                closed = s.recv(4096) is not None
            except socket.timeout:
                closed = False
            except OSError:
                closed = True
            record("slow header closed", closed, {True})
            s.close()


def health():
    while time.time() < END:
        try:
            with urllib.request.urlopen(URL + "/v2/health/live", timeout=5) as r:
                status = r.status
        except Exception as e:
            status = f"error: {e}"
        record("health", status, {200})
        time.sleep(1.0)


def rss_kib():
    with open(f"/proc/{PID}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


samples = []


def sample_rss():
    start = time.time()
    while time.time() < END:
        samples.append((time.time() - start, rss_kib()))
        time.sleep(10)


threads = [threading.Thread(target=f) for f in (hostile, oversize, slow_headers, health, sample_rss)]
for t in threads:
    t.start()
for t in threads:
    t.join()

after = [(t, r) for t, r in samples if t >= WARMUP]
slope = 0.0
if len(after) >= 2:
    n = len(after)
    mt = sum(t for t, _ in after) / n
    mr = sum(r for _, r in after) / n
    slope = sum((t - mt) * (r - mr) for t, r in after) / max(1e-9, sum((t - mt) ** 2 for t, _ in after))
report = {
    "answers": {f"{k} {s}": c for (k, s), c in sorted(counts.items(), key=str)},
    "unexpected": len(unexpected),
    "unexpected_examples": unexpected[:10],
    "rss_kib_after_warmup_first_last": [after[0][1], after[-1][1]] if after else None,
    "rss_kib_max": max((r for _, r in samples), default=0),
    "rss_slope_kib_per_minute_after_warmup": round(slope * 60, 1),
}
print(json.dumps(report, indent=1))
sys.exit(1 if unexpected else 0)

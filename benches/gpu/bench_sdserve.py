"""The sdserve side of the GPU benchmark: starts the server on the random-weight model and measures
it over HTTP, as a client would. Results go to a JSON file rewritten after every measurement.

Server 1 (no batching): first-request latency, seconds per image, UNet it/s, the image from the
shared latents. Server 2 (adaptive batching, max_batch_size = concurrency): images/s at
`concurrency` simultaneous requests.

--server-env KEY=VALUE passes a variable to the server (SDSERVE_CUDA_TUNING=off measures
candle's defaults). --stages measures nothing else: one server with SDSERVE_PROFILE=1 runs one
image at the profile's steps, and the JSON gets the per-stage device times it logged.
"""

import argparse
import base64
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODEL = "bench"


def post(url, body, timeout):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def get_status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


class Server:
    def __init__(self, binary, root, port, log_path, batch, device, dtype, model_dir, env=None):
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        model_root = os.path.join(root, MODEL)
        os.makedirs(model_root, exist_ok=True)
        settings = {
            "name": MODEL,
            "implementation": "sdserve.StableDiffusion",
            "max_batch_size": batch,
            "max_batch_time": 0.5 if batch > 1 else 0,
            "parameters": {"uri": model_dir, "extra": {"device": device, "dtype": dtype}},
        }
        with open(os.path.join(model_root, "model-settings.json"), "w") as f:
            json.dump(settings, f, indent=2)
        self.log = open(log_path, "a")
        self.log.write(f"\n===== sdserve start (max_batch_size {batch}, env {env or {}}) =====\n")
        self.log.flush()
        self.log_path = log_path
        self.log_start = self.log.tell()
        cmd = [
            binary, "start", root,
            "--host", "127.0.0.1",
            "--http-port", str(port),
            "--grpc-port", str(port + 1),
            "--metrics-port", str(port + 2),
            "--parallel-workers", "1",
        ]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        with open(os.path.join(os.path.dirname(root), "server.pid"), "w") as f:
            f.write(str(self.proc.pid))

    def wait_ready(self, timeout):
        deadline = time.perf_counter() + timeout
        url = f"{self.base}/v2/models/{MODEL}/ready"
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sdserve exited with status {self.proc.returncode} before it was ready (see sdserve.log)")
            if get_status(url) == 200:
                return time.perf_counter() - self.started
            time.sleep(0.2)
        raise RuntimeError(f"sdserve not ready after {timeout} s")

    def infer(self, p, steps, seed, latents=None, timeout=600):
        inputs = [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [common.PROMPT]}]
        if latents is not None:
            inputs.append({
                "name": "latents",
                "shape": list(latents.shape),
                "datatype": "FP32",
                "data": latents.reshape(-1).tolist(),
            })
        body = {
            "inputs": inputs,
            "parameters": {
                "num_inference_steps": steps,
                "guidance_scale": p["guidance_scale"],
                "height": p["size"],
                "width": p["size"],
                "seed": seed,
            },
        }
        t0 = time.perf_counter()
        resp = post(f"{self.base}/v2/models/{MODEL}/infer", body, timeout)
        elapsed = time.perf_counter() - t0
        png = base64.b64decode(resp["outputs"][0]["data"][0])
        return elapsed, png, resp.get("parameters", {})

    def mean_batch(self):
        """Mean images per generation from the server's own metrics (shows whether requests were batched)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port + 2}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            for key in ("sdserve_batch_images_sum", "sdserve_batch_images_count"):
                if line.startswith(key):
                    values[key] = values.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
        count = values.get("sdserve_batch_images_count")
        return round(values["sdserve_batch_images_sum"] / count, 2) if count else None

    def stage_profiles(self):
        """The `stages` of every "stage profile" line this server logged, oldest first."""
        with open(self.log_path, errors="replace") as f:
            f.seek(self.log_start)
            text = f.read()
        found = []
        for line in text.splitlines():
            if "stage profile" not in line:
                continue
            m = re.search(r'stages="?(\[.*\])', line)
            if m:
                raw = m.group(1)
                try:
                    found.append(json.loads(raw))
                except ValueError:
                    # JSON logging escapes the embedded JSON text.
                    found.append(json.loads(json.loads('"' + raw + '"')))
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def main():
    # A SIGTERM from the phase's time limit unwinds through the `finally` blocks, which stop the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--latents", required=True)
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--png-out", help="where to write the image generated from the shared latents")
    ap.add_argument("--compare-png", help="an image from the same latents to compute the PSNR against")
    ap.add_argument("--batch1-only", action="store_true", help="skip the concurrency server")
    ap.add_argument("--log", required=True)
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--stages", action="store_true", help="only the per-stage device profile of one image")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.server_env)
    p = common.profile()
    r = common.Results(args.out_json, side="sdserve", profile=p)
    r.set("server_env", env)
    latent_shape = (1, 4, p["size"] // 8, p["size"] // 8)
    latents = common.load_latents(args.latents, latent_shape)

    if args.stages:
        server = Server(args.bin, os.path.join(args.work, "root-stages"), args.port, args.log, 1, p["device"], p["dtype"],
                        args.model_dir, env={**env, "SDSERVE_PROFILE": "1"})
        try:
            r.set("load_s", round(server.wait_ready(180), 3))
            t, _, _ = server.infer(p, p["steps"], p["seed"])
            r.set("profiled_request_s", round(t, 3))
            profiles = server.stage_profiles()
            if not profiles:
                raise RuntimeError("the server logged no stage profile")
            r.set("stages", profiles[-1])
        finally:
            server.stop()
        r.set("complete", True)
        return

    # Server 1: batch 1.
    monitor = common.MemoryMonitor()
    server = Server(args.bin, os.path.join(args.work, "root1"), args.port, args.log, 1, p["device"], p["dtype"], args.model_dir, env)
    if monitor.kind == "rss":
        monitor.pid = server.proc.pid
    r.set("memory_kind", monitor.kind)
    monitor.start()
    try:
        r.set("load_s", round(server.wait_ready(180), 3))
        t, png, _ = server.infer(p, p["steps"], p["seed"])
        r.set("first_request_s", round(t, 3))
        r.set("first_image", common.image_stats(common.png_to_array(png)))

        t, png, params = server.infer(p, p["steps"], p["seed"], latents=latents)
        if args.png_out:
            with open(args.png_out, "wb") as f:
                f.write(png)
        r.set("latents_image", common.image_stats(common.png_to_array(png)))
        if args.compare_png and os.path.exists(args.compare_png):
            with open(args.compare_png, "rb") as f:
                other = common.png_to_array(f.read())
            r.set("psnr_vs_compare_png", round(common.psnr(common.png_to_array(png), other), 2))
        full = [t]
        for i in range(p["repeats"] - 1):
            t, _, params = server.infer(p, p["steps"], p["seed"] + 1 + i)
            full.append(t)
        r.set("full_s", [round(x, 3) for x in full])
        r.set("seconds_per_image", round(common.median(full), 3))
        r.set("server_generation_s", params.get("generation_seconds"))
        short = []
        for i in range(p["repeats"]):
            t, _, _ = server.infer(p, p["short_steps"], p["seed"] + 100 + i)
            short.append(t)
        r.set("short_s", [round(x, 3) for x in short])
        dt = common.median(full) - common.median(short)
        if dt > 0:
            r.set("unet_it_per_s", round((p["steps"] - p["short_steps"]) / dt, 3))
    finally:
        server.stop()
        r.set("peak_memory_mib_batch1", monitor.stop())

    if args.batch1_only:
        r.set("complete", True)
        return
    # Server 2: adaptive batching, `concurrency` simultaneous requests per round.
    n = p["concurrency"]
    monitor = common.MemoryMonitor()
    server = Server(args.bin, os.path.join(args.work, "root2"), args.port + 10, args.log, n, p["device"], p["dtype"], args.model_dir, env)
    if monitor.kind == "rss":
        monitor.pid = server.proc.pid
    monitor.start()
    try:
        r.set("load_s_second_start", round(server.wait_ready(180), 3))
        rounds = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
            for k in range(p["rounds"]):
                t0 = time.perf_counter()
                futures = [pool.submit(server.infer, p, p["steps"], p["seed"] + 1000 * (k + 1) + i) for i in range(n)]
                for f in futures:
                    f.result()
                rounds.append(time.perf_counter() - t0)
                r.set(f"concurrency_round_{k + 1}_s", round(rounds[-1], 3))
        r.set("images_per_s_concurrent", round(n / rounds[-1], 3))
        r.set("mean_images_per_generation", server.mean_batch())
    finally:
        server.stop()
        r.set(f"peak_memory_mib_concurrency{n}", monitor.stop())
    r.set("complete", True)


if __name__ == "__main__":
    main()

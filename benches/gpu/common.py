"""Helpers shared by the sdserve and diffusers sides of the GPU benchmark (standard library,
numpy and Pillow only, so they run on the device image as it is)."""

import io
import json
import os
import statistics
import subprocess
import threading
import time

import numpy as np
from PIL import Image

PROMPT = "a photograph of an astronaut riding a horse"


def profile():
    """Benchmark settings; every value can be overridden from the environment (BENCH_*)."""
    e = os.environ.get
    return {
        "device": e("BENCH_DEVICE", "cuda"),
        "dtype": e("BENCH_DTYPE", "f16"),
        "size": int(e("BENCH_SIZE", "512")),
        "steps": int(e("BENCH_STEPS", "30")),
        "short_steps": int(e("BENCH_SHORT_STEPS", "10")),
        "guidance_scale": float(e("BENCH_GUIDANCE", "7.5")),
        "repeats": int(e("BENCH_REPEATS", "3")),
        "concurrency": int(e("BENCH_CONCURRENCY", "4")),
        "rounds": int(e("BENCH_ROUNDS", "2")),
        "seed": int(e("BENCH_SEED", "1234")),
    }


def load_latents(path, shape):
    data = np.fromfile(path, dtype="<f4")
    return data.reshape(shape)


def make_latents(path, shape, seed):
    """The shared initial latents: float32 standard normal, written raw little-endian."""
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(shape, dtype=np.float32)
    latents.astype("<f4").tofile(path)
    return latents


def png_to_array(png_bytes):
    return np.asarray(Image.open(io.BytesIO(png_bytes)).convert("RGB"), dtype=np.uint8)


def psnr(a, b):
    """PSNR in dB of two uint8 images; inf when identical."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(255.0**2 / mse))


def image_stats(img):
    """Mean and standard deviation of a uint8 image; a flat or saturated image has std near 0."""
    x = img.astype(np.float64)
    return {"mean": round(float(x.mean()), 2), "std": round(float(x.std()), 2)}


def median(xs):
    return statistics.median(xs) if xs else None


class MemoryMonitor:
    """Peak GPU memory in use on the whole device (MiB) while the monitor runs, minus what was in
    use when it started; only one benchmarked process uses the GPU at a time. Without a GPU it
    reports the peak resident memory of `pid` instead (labelled `rss`)."""

    def __init__(self, pid=None, interval=0.1):
        self.pid = pid
        self.interval = interval
        self.kind = None
        self.baseline = None
        self.peak = 0.0
        self._stop = threading.Event()
        self._nvml = None
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.kind = "gpu"
        except Exception:
            if self._nvidia_smi() is not None:
                self.kind = "gpu"
            else:
                self.kind = "rss"
        self.baseline = self._read() if self.kind == "gpu" else 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _nvidia_smi(self):
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            return float(out.stdout.strip().splitlines()[0]) if out.returncode == 0 else None
        except Exception:
            return None

    def _read(self):
        if self.kind == "gpu":
            if self._nvml is not None:
                return self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 2**20
            return self._nvidia_smi() or 0.0
        pid = self.pid or os.getpid()
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return float(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read() - self.baseline)
            self._stop.wait(self.interval)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = max(self.peak, self._read() - self.baseline)
        return round(self.peak, 1)


class Results:
    """A JSON file rewritten after every measurement, so a phase cut off by its timeout still
    leaves what it measured."""

    def __init__(self, path, **initial):
        self.path = path
        self.data = dict(initial)
        self.save()

    def set(self, key, value):
        self.data[key] = value
        self.save()
        print(f"  {key}: {value}", flush=True)

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=float)
        os.replace(tmp, self.path)


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value

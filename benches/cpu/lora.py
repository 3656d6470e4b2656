"""LoRA cost on the CPU, sdserve against diffusers, side by side in one run.

Both sides generate the same prompt at the same settings (256x256, 2 PNDM steps, CFG 7.5, one
image, seconds per whole image, medians after one warm-up run) on the SD 1.5-size random folder,
without an adapter and with the random rank-16 adapter of `make_random_lora` (PEFT layout,
alpha = rank). diffusers loads it with `load_lora_weights` + `set_adapters` (PEFT layers: the
low-rank product beside each adapted layer at every step); sdserve merges it per batch.

    cargo build --release -p sdserve-benches
    target/release/make_random_model --config sd15 --dtype f32 --seed 0 --out target/bench-models/sd15-f32
    target/release/make_random_lora target/bench-models/sd15-f32 --rank 16 --out target/bench-models/sd15-r16.safetensors
    .venv/bin/python benches/cpu/lora.py [--runs 5]
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "target/bench-models/sd15-f32"
LORA = ROOT / "target/bench-models/sd15-r16.safetensors"
PROMPT = "a red circle on a blue background"


def peak_rss_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)
    return float("nan")


def diffusers_side(runs, with_lora):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(os.cpu_count())
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if with_lora:
        pipe.load_lora_weights(LORA.parent, weight_name=LORA.name, adapter_name="r16")
        pipe.set_adapters(["r16"], adapter_weights=[1.0])

    def one():
        t = time.perf_counter()
        with torch.no_grad():
            pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=256, width=256,
                 generator=torch.Generator().manual_seed(0))
        return time.perf_counter() - t

    first = one()
    times = [one() for _ in range(runs)]
    return first, times


def sdserve_side(runs, with_lora):
    cmd = [str(ROOT / "target/release/time_generation"), str(MODEL), "--height", "256", "--width",
           "256", "--steps", "2", "--runs", str(runs)]
    if with_lora:
        cmd += ["--lora", str(LORA)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    print(out, end="", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--diffusers", choices=["base", "lora"])
    args = ap.parse_args()
    if args.diffusers:
        first, times = diffusers_side(args.runs, args.diffusers == "lora")
        print(f"diffusers {args.diffusers}: first {first:.3f} s, median {statistics.median(times):.3f} s "
              f"(min {min(times):.3f}, max {max(times):.3f}), peak RSS {peak_rss_gib():.2f} GiB", flush=True)
        return
    for with_lora in (False, True):
        print(f"== sdserve, {'with' if with_lora else 'without'} the adapter", flush=True)
        sdserve_side(args.runs, with_lora)
        side = "lora" if with_lora else "base"
        print(f"== diffusers, {'with' if with_lora else 'without'} the adapter", flush=True)
        subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--diffusers", side], check=True)


if __name__ == "__main__":
    main()

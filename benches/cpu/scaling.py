"""CPU scaling of sdserve against diffusers, side by side in one run.

For every row (a model folder at one image size) both sides generate the same prompt with the
same settings (DDIM, CFG 7.5, one image): a whole image with 1 step, and with 1 + k steps. The
difference gives seconds per denoising step (text encoder and VAE decode cancel out); the 1-step
image is the per-image cost of everything around the loop. Each side runs in a process of its
own per row, so peak RSS (VmHWM) is that row's alone.

    .venv/bin/python benches/cpu/scaling.py                # every row, results in target/bench-cpu
    .venv/bin/python benches/cpu/scaling.py --rows tiny-64,sd15-256

sdserve runs `target/release/time_generation` (build it first: `cargo build --release -p
sdserve-benches`);
diffusers runs this file with `--diffusers-row`, torch on as many threads as sdserve has cores.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle on a blue background"
GUIDANCE = 7.5

# name -> (model folder, image size, extra steps k, timed runs per step count)
ROWS = {
    "tiny-64": ("models/tiny-shapes", 64, 8, 5),
    "tiny-128": ("models/tiny-shapes", 128, 4, 3),
    "tiny-256": ("models/tiny-shapes", 256, 2, 2),
    "sd15-256": ("target/bench-models/sd15-f32", 256, 2, 1),
    "sd15-512": ("target/bench-models/sd15-f32", 512, 2, 1),
    "sd15-1024": ("target/bench-models/sd15-f32", 1024, 0, 1),
}


def sdserve_row(model, size, extra, runs):
    steps = [1] if extra == 0 else [1, 1 + extra]
    timer = os.environ.get("SDSERVE_TIMER", str(ROOT / "target/release/time_generation"))
    cmd = [
        timer, str(ROOT / model),
        "--height", str(size), "--width", str(size), "--scheduler", "ddim",
        "--guidance-scale", str(GUIDANCE), "--runs", str(runs),
        "--steps-list", ",".join(map(str, steps)), "--json",
    ]
    if extra == 0:
        cmd.append("--no-warm-up")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def diffusers_row(model, size, extra, runs, threads):
    """Runs in its own process (see main): the same measurements as time_generation."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(
        str(ROOT / model), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def one(steps, seed):
        start = time.perf_counter()
        pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size,
             generator=torch.Generator().manual_seed(seed))
        return time.perf_counter() - start

    steps_list = [1] if extra == 0 else [1, 1 + extra]
    if extra != 0:
        one(1, 0)
    medians = {}
    for steps in steps_list:
        medians[steps] = statistics.median(one(steps, i + 1) for i in range(runs))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": {str(k): v for k, v in medians.items()}, "peak_rss_bytes": rss,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def per_step(result, extra):
    s = result["seconds"]
    return None if extra == 0 else (s[str(1 + extra)] - s["1"]) / extra


def table(results):
    lines = [
        "| row | image | sdserve s/step | diffusers s/step | ratio | sdserve s/image (1 step) "
        "| diffusers s/image (1 step) | ratio | sdserve peak RSS | diffusers peak RSS | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        _, size, extra, _ = ROWS[name]
        ours, theirs = r["sdserve"], r["diffusers"]
        a, b = per_step(ours, extra), per_step(theirs, extra)
        img_a, img_b = ours["seconds"]["1"], theirs["seconds"]["1"]
        rss_a, rss_b = ours["peak_rss_bytes"] / 2**30, theirs["peak_rss_bytes"] / 2**30
        step = f"{a:.4f} | {b:.4f} | {a / b:.2f}" if a is not None else "– | – | –"
        lines.append(
            f"| {name} | {size}² | {step} | {img_a:.3f} | {img_b:.3f} | {img_a / img_b:.2f} "
            f"| {rss_a:.2f} GiB | {rss_b:.2f} GiB | {rss_a / rss_b:.2f} |"
        )
    return "\n".join(lines)


def exponents(results):
    """Cost exponents of seconds per step against pixels, between the rows the issue names."""
    out = []
    for lo, hi in [("tiny-64", "tiny-256"), ("sd15-256", "sd15-512")]:
        if lo not in results or hi not in results:
            continue
        import math
        ratio_px = (ROWS[hi][1] / ROWS[lo][1]) ** 2
        for side in ("sdserve", "diffusers"):
            a = per_step(results[lo][side], ROWS[lo][2])
            b = per_step(results[hi][side], ROWS[hi][2])
            out.append(f"{side} {lo} → {hi}: step × {b / a:.1f}, exponent {math.log(b / a) / math.log(ratio_px):.2f}")
    return "\n".join(out)


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for model, label in [("models/tiny-shapes", "tiny-shapes"), ("target/bench-models/sd15-f32", "SD 1.5 size")]:
        for side, style in [("sdserve", "o-"), ("diffusers", "s--")]:
            pts = [(ROWS[n][1] ** 2, per_step(r[side], ROWS[n][2])) for n, r in results.items()
                   if ROWS[n][0] == model and ROWS[n][2] != 0]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{side}, {label}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("pixels per image")
    ax.set_ylabel("seconds per denoising step (CFG batch 2)")
    ax.set_title("CPU, 2 threads: seconds per step against image size")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out", default=str(ROOT / "target/bench-cpu"))
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--diffusers-row")
    args = p.parse_args()
    if args.diffusers_row:
        print(json.dumps(diffusers_row(*ROWS[args.diffusers_row], args.threads)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.rows.split(","):
        model, size, extra, runs = ROWS[name]
        if not (ROOT / model).is_dir():
            print(f"{name}: {model} missing, skipped")
            continue
        started = time.time()
        ours = sdserve_row(model, size, extra, runs)
        theirs_out = subprocess.run(
            [sys.executable, __file__, "--diffusers-row", name, "--threads", str(args.threads)],
            check=True, capture_output=True, text=True,
        ).stdout
        theirs = json.loads(theirs_out.strip().splitlines()[-1])
        results[name] = {"sdserve": ours, "diffusers": theirs}
        print(f"{name}: sdserve {ours['seconds']}, diffusers {theirs['seconds']} "
              f"({time.time() - started:.0f} s)", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    report = table(results) + "\n\n" + exponents(results)
    (out / "table.md").write_text(report + "\n")
    print(report)
    plot(results, out / "scaling.png")


if __name__ == "__main__":
    main()

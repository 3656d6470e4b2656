"""Combines sdserve.json, diffusers.json and sdserve-cudnn.json (whatever parts exist) into a
Markdown table (results.md) with sdserve/diffusers ratios, and the PSNR between the images
generated from the same latents."""

import argparse
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def device_name():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    return "no GPU (CPU: " + (os.uname().machine) + f", {os.cpu_count()} cores)"


def fmt(x):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    args = ap.parse_args()
    s = load(os.path.join(args.out, "sdserve.json"))
    d = load(os.path.join(args.out, "diffusers.json"))
    c = load(os.path.join(args.out, "sdserve-cudnn.json"))
    p = s.get("profile") or d.get("profile") or common.profile()
    n = p["concurrency"]

    rows = [
        ("UNet it/s (CFG batch 2)", "unet_it_per_s", True),
        ("seconds per image, batch 1", "seconds_per_image", False),
        (f"images/s at concurrency {n}", "images_per_s_concurrent", True),
        ("peak memory, batch 1 (MiB)", "peak_memory_mib_batch1", False),
        (f"peak memory, concurrency {n} (MiB)", f"peak_memory_mib_concurrency{n}", False),
        ("first request after load (s)", "first_request_s", False),
        ("load (s)", "load_s", False),
    ]
    lines = [
        f"### {args.title or 'sdserve vs diffusers'}",
        "",
        f"- device: {device_name()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- settings: {p['size']}x{p['size']}, {p['steps']} steps (short run {p['short_steps']}), "
        f"CFG {p['guidance_scale']}, {p['device']} {p['dtype']}, {p['repeats']} repeats, default scheduler",
        f"- diffusers: {d.get('versions', {})}, attention {d.get('attention_processors')}, scheduler {d.get('scheduler')}",
        f"- memory measured as: sdserve {s.get('memory_kind')}, diffusers {d.get('memory_kind')} "
        "(gpu = device memory in use above the idle baseline; rss = peak resident memory of the process)",
        "",
        "| figure | sdserve | diffusers | sdserve / diffusers | better |"
        + (" sdserve cuDNN | cuDNN / diffusers |" if c else ""),
        "|---|---|---|---|---|" + ("---|---|" if c else ""),
    ]

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    for label, key, higher_better in rows:
        a, b = s.get(key), d.get(key)
        line = f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(ratio(a, b))} | {'higher' if higher_better else 'lower'} |"
        if c:
            line += f" {fmt(c.get(key))} | {fmt(ratio(c.get(key), b))} |"
        lines.append(line)
    if "torch_max_allocated_mib_batch1" in d:
        lines.append(f"| torch max_memory_allocated, batch 1 (MiB) | | {fmt(d['torch_max_allocated_mib_batch1'])} | | |")

    sp = os.path.join(args.out, "sdserve.png")
    dp = os.path.join(args.out, "diffusers.png")
    agreement = None
    if os.path.exists(sp) and os.path.exists(dp):
        with open(sp, "rb") as f:
            a = common.png_to_array(f.read())
        with open(dp, "rb") as f:
            b = common.png_to_array(f.read())
        if a.shape == b.shape:
            diff = abs(a.astype(int) - b.astype(int))
            agreement = {
                "psnr_db": round(float(common.psnr(a, b)), 2),
                "max_abs_diff": int(diff.max()),
                "mean_abs_diff": round(float(diff.mean()), 3),
                "sdserve": common.image_stats(a),
                "diffusers": common.image_stats(b),
            }
        else:
            agreement = {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    lines += ["", f"- image agreement from the same latents: {agreement if agreement else 'not measured'}"]
    if "psnr_diffusers_vs_f32_reference" in d:
        lines.append(
            f"- against an F32 diffusers reference (same weights and latents): diffusers {p['dtype']} "
            f"{d['psnr_diffusers_vs_f32_reference']} dB, sdserve {p['dtype']} {d.get('psnr_sdserve_vs_f32_reference')} dB"
        )
    if s.get("mean_images_per_generation") is not None:
        lines.append(f"- sdserve at concurrency {n}: {s['mean_images_per_generation']} images per generation on average (adaptive batching)")
    if c.get("psnr_vs_compare_png") is not None:
        lines.append(f"- sdserve cuDNN build against diffusers, same latents: {c['psnr_vs_compare_png']} dB")
    for side, data in [("sdserve", s), ("diffusers", d), ("sdserve cuDNN", c)]:
        if data and not data.get("complete"):
            lines.append(f"- {side}: INCOMPLETE (phase failed or timed out; see run.log)")
        elif not data and side != "sdserve cuDNN":
            lines.append(f"- {side}: no results")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

"""Combines sdserve.json, diffusers.json and the batch-1 variants sdserve-untuned.json and
sdserve-triton.json (whatever parts exist) into a Markdown table (results.md) with
sdserve/diffusers ratios, the PSNR between the images generated from the same latents, and the
per-stage device profile of sdserve-stages.json."""

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


def kernel_table(run_log):
    """The device test of the attention kernels (`sdserve check-kernels`), from run.log."""
    try:
        with open(run_log, errors="replace") as f:
            checks = [json.loads(line) for line in f if line.startswith("{") and '"kernel check"' in line]
    except (OSError, ValueError):
        return []
    if not checks:
        return ["", "Attention kernels on the device against the CPU: not run"]
    out = [
        "",
        "Attention kernels on the device against the CPU (random operands, two items):",
        "",
        "| kernel | head dim × heads | queries × keys | relative error | limit | passed |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        err = c["relative_error"]
        err = f"{err:.2e}" if isinstance(err, float) else err
        out.append(f"| {c['kernel check']} | {c['head_dim']} × {c['heads']} | {c['queries']} × {c['keys']} | "
                   f"{err} | {c['limit']} | {'yes' if c['passed'] else '**no**'} |")
    return out


def stage_table(stages):
    """The per-stage profile as a table: each stage's calls, total and per-call time, and its
    share of the whole generation (the stages nest: `unet` holds `unet.*`, `denoise` holds
    `unet` and `scheduler`)."""
    rows = stages.get("stages") or []
    if not rows:
        return []
    top = sum(r["ms"] for r in rows if r["stage"] in ("prompt", "start", "denoise", "vae decode", "png"))
    out = [
        "",
        f"Stage profile (one image, {stages.get('profile', {}).get('steps')} steps, each stage between two "
        f"device syncs; request {stages.get('profiled_request_s')} s):",
        "",
        "| stage | calls | total ms | ms per call | share of the generation |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = f"{100 * r['ms'] / top:.1f} %" if top else "–"
        out.append(f"| {r['stage']} | {r['calls']} | {r['ms']:.1f} | {r['ms'] / max(r['calls'], 1):.2f} | {share} |")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="")
    ap.add_argument("--images", help="the folder holding sdserve.png and diffusers.png (default: --out)")
    args = ap.parse_args()
    s = load(os.path.join(args.out, "sdserve.json"))
    d = load(os.path.join(args.out, "diffusers.json"))
    # Batch-1 variants of sdserve: a column each, where measured.
    variants = [
        (label, data)
        for label, name in [("sdserve untuned", "sdserve-untuned.json"), ("sdserve triton", "sdserve-triton.json")]
        if (data := load(os.path.join(args.out, name)))
    ]
    stages = load(os.path.join(args.out, "sdserve-stages.json"))
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
        + "".join(f" {label} | {label} / diffusers |" for label, _ in variants),
        "|---|---|---|---|---|" + "---|---|" * len(variants),
    ]

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    for label, key, higher_better in rows:
        a, b = s.get(key), d.get(key)
        line = f"| {label} | {fmt(a)} | {fmt(b)} | {fmt(ratio(a, b))} | {'higher' if higher_better else 'lower'} |"
        for _, v in variants:
            line += f" {fmt(v.get(key))} | {fmt(ratio(v.get(key), b))} |"
        lines.append(line)
    if "torch_max_allocated_mib_batch1" in d:
        lines.append(f"| torch max_memory_allocated, batch 1 (MiB) | | {fmt(d['torch_max_allocated_mib_batch1'])} | | |")

    sp = os.path.join(args.images or args.out, "sdserve.png")
    dp = os.path.join(args.images or args.out, "diffusers.png")
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
    for label, v in variants:
        if v.get("psnr_vs_compare_png") is not None:
            lines.append(f"- {label} against diffusers, same latents: {v['psnr_vs_compare_png']} dB")
        if v.get("server_env"):
            lines.append(f"- {label}: server environment {v['server_env']}")
    for side, data in [("sdserve", s), ("diffusers", d), ("sdserve stages", stages)] + variants:
        if data and not data.get("complete"):
            lines.append(f"- {side}: INCOMPLETE (phase failed or timed out; see run.log)")
        elif not data and side in ("sdserve", "diffusers"):
            lines.append(f"- {side}: no results")
    lines += stage_table(stages)
    lines += kernel_table(os.path.join(args.out, "run.log"))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()

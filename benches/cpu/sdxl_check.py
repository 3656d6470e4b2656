"""The real-size SDXL check on the CPU: a random-weight SDXL base 1.0 folder (written by
`sdserve make-random-model --config sdxl`) loads in diffusers with no missing, unexpected or
mismatched key, and a 256x256 two-step F32 image from the same initial latents agrees between
sdserve (served over REST, as a client uses it) and diffusers. Not a performance comparison.

    .venv/bin/python benches/cpu/sdxl_check.py --bin target/release/sdserve

(`--bin` may be the CUDA build running on the CPU: put the link stub on LD_LIBRARY_PATH.)
The folder is written to target/bench-models/sdxl-f16 unless it is there already.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "benches", "gpu"))
# The GPU benchmark's helpers read their settings from BENCH_*: this check's.
os.environ.update({"BENCH_DEVICE": "cpu", "BENCH_DTYPE": "f32", "BENCH_SIZE": "256", "BENCH_STEPS": "2", "BENCH_GUIDANCE": "5"})
import bench_diffusers  # noqa: E402
import bench_sdserve  # noqa: E402
import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True, help="the sdserve binary")
    ap.add_argument("--model-dir", default=os.path.join(REPO, "target", "bench-models", "sdxl-f16"))
    ap.add_argument("--out-json", default=os.path.join(REPO, "target", "bench-models", "sdxl-check.json"))
    args = ap.parse_args()
    p = common.profile()
    result = {"profile": p}
    if not os.path.exists(os.path.join(args.model_dir, "model_index.json")):
        t0 = time.perf_counter()
        tokenizer = os.path.join(REPO, "models", "tiny-sd1", "tokenizer")
        code = os.spawnv(os.P_WAIT, args.bin, [args.bin, "make-random-model", "--config", "sdxl", "--dtype", "f16",
                                               "--seed", "0", "--tokenizer", tokenizer, "--out", args.model_dir])
        if code != 0:
            raise SystemExit(f"make-random-model failed ({code})")
        result["make_s"] = round(time.perf_counter() - t0, 1)
    # In its own process, so that its memory is given back before sdserve loads.
    keys = subprocess.run([sys.executable, bench_diffusers.__file__, "--model-dir", args.model_dir, "--check-keys-only"])
    result["keys_ok"] = keys.returncode == 0
    if not result["keys_ok"]:
        raise SystemExit("diffusers reports missing, unexpected or mismatched keys (above)")

    work = tempfile.mkdtemp(prefix="sdxl-check-")
    latents = common.make_latents(os.path.join(work, "latents.f32"), (1, 4, p["size"] // 8, p["size"] // 8), 11)

    # sdserve first: the two at once do not fit in 24 GiB (sdserve's peak is about 18 GB).
    server = bench_sdserve.Server(args.bin, os.path.join(work, "root"), 18600, os.path.join(work, "sdserve.log"),
                                  1, "cpu", "f32", args.model_dir)
    try:
        result["sdserve_load_s"] = round(server.wait_ready(900), 1)
        t, png, _ = server.infer(p, p["steps"], p["seed"], latents=latents, timeout=900)
        result["sdserve_image_s"] = round(t, 1)
    finally:
        server.stop()
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    result["diffusers_pipeline"] = type(pipe).__name__
    result["diffusers_load_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        image = pipe(prompt=common.PROMPT, num_inference_steps=p["steps"], guidance_scale=p["guidance_scale"],
                     height=p["size"], width=p["size"], latents=torch.from_numpy(latents),
                     output_type="np").images[0]
    result["diffusers_image_s"] = round(time.perf_counter() - t0, 1)
    theirs = (image * 255).round().astype("uint8")
    del pipe

    ours = common.png_to_array(png)
    diff = abs(ours.astype(int) - theirs.astype(int))
    result.update({
        "psnr_db": round(common.psnr(ours, theirs), 2),
        "max_abs_diff": int(diff.max()),
        "mean_abs_diff": round(float(diff.mean()), 4),
        "pixel_std": round(float(theirs.std()), 1),
    })
    with open(args.out_json, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    if result["max_abs_diff"] > 2:
        raise SystemExit("the images differ by more than 2/255")


if __name__ == "__main__":
    main()

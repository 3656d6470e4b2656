"""The diffusers side of the GPU benchmark: the same random-weight folder through
`StableDiffusionPipeline` or `StableDiffusionXLPipeline`, as its model_index.json says (PyTorch, SDPA attention), with the same settings and latents as the
sdserve side. Results go to a JSON file rewritten after every measurement.

`--check-keys-only` loads each component with its loading info and fails unless there are no
missing, unexpected or mismatched keys (used to validate the random-model writer).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def check_keys(model_dir):
    """Every component's weights load with no missing, unexpected or mismatched key."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    problems = {}
    components = [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]
    if os.path.isdir(os.path.join(model_dir, "text_encoder_2")):
        components.append(("text_encoder_2", CLIPTextModelWithProjection))
    for name, cls in components:
        _, info = cls.from_pretrained(model_dir, subfolder=name, output_loading_info=True)
        bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if bad:
            problems[name] = bad
        print(f"  {name}: {'OK, no missing/unexpected/mismatched keys' if not bad else bad}", flush=True)
    return problems


def state_dict_matches_files(pipe, model_dir):
    """The pipeline's parameters have exactly the names of the tensors in the files (cheap check
    that nothing was silently left at its initialisation)."""
    from safetensors import safe_open

    result = {}
    for name, file in [
        ("unet", "unet/diffusion_pytorch_model.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.safetensors"),
        ("text_encoder", "text_encoder/model.safetensors"),
        ("text_encoder_2", "text_encoder_2/model.safetensors"),
    ]:
        if getattr(pipe, name, None) is None:
            continue
        with safe_open(os.path.join(model_dir, file), framework="pt") as f:
            in_file = set(f.keys())
        in_model = set(getattr(pipe, name).state_dict().keys())
        result[name] = "exact" if in_file == in_model else {
            "only_in_file": sorted(in_file - in_model)[:20],
            "only_in_model": sorted(in_model - in_file)[:20],
        }
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--latents")
    ap.add_argument("--out-json")
    ap.add_argument("--png-out")
    ap.add_argument("--sdserve-png", help="sdserve's image from the same latents, compared with the F32 reference")
    ap.add_argument("--check-keys-only", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch
    import diffusers
    from diffusers import DiffusionPipeline
    from PIL import Image

    if args.check_keys_only:
        sys.exit(1 if check_keys(args.model_dir) else 0)

    p = common.profile()
    cuda = p["device"].startswith("cuda")
    r = common.Results(
        args.out_json,
        side="diffusers",
        profile=p,
        versions={"torch": torch.__version__, "diffusers": diffusers.__version__},
    )
    dtype = {"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[p["dtype"]]
    monitor = common.MemoryMonitor().start()
    r.set("memory_kind", monitor.kind)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model_dir, torch_dtype=dtype)
    r.set("pipeline", type(pipe).__name__)
    pipe = pipe.to(p["device"])
    sync()
    r.set("load_s", round(time.perf_counter() - t0, 3))
    pipe.set_progress_bar_config(disable=True)
    processors = sorted({type(v).__name__ for v in pipe.unet.attn_processors.values()})
    r.set("attention_processors", processors)
    r.set("scheduler", type(pipe.scheduler).__name__)
    r.set("weights_vs_files", state_dict_matches_files(pipe, args.model_dir))
    if cuda:
        r.set("gpu", torch.cuda.get_device_name(0))
        torch.cuda.reset_peak_memory_stats()

    def run(steps, seed, n=1, latents=None):
        kwargs = {}
        if latents is not None:
            kwargs["latents"] = torch.from_numpy(latents).to(p["device"], dtype)
        else:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        sync()
        t0 = time.perf_counter()
        out = pipe(
            prompt=[common.PROMPT] * n,
            num_inference_steps=steps,
            guidance_scale=p["guidance_scale"],
            height=p["size"],
            width=p["size"],
            output_type="np",
            **kwargs,
        ).images
        sync()
        return time.perf_counter() - t0, out

    with torch.inference_mode():
        t, _ = run(p["steps"], p["seed"])
        r.set("first_request_s", round(t, 3))

        latents = common.load_latents(args.latents, (1, 4, p["size"] // 8, p["size"] // 8))
        t, images = run(p["steps"], p["seed"], latents=latents)
        # diffusers' own numpy -> PIL conversion.
        img = (images[0] * 255).round().astype("uint8")
        Image.fromarray(img).save(args.png_out)
        r.set("latents_image", common.image_stats(img))
        r.set("latents_image_finite", bool(np.isfinite(images).all()))
        full = [t]
        for i in range(p["repeats"] - 1):
            t, _ = run(p["steps"], p["seed"] + 1 + i)
            full.append(t)
        r.set("full_s", [round(x, 3) for x in full])
        r.set("seconds_per_image", round(common.median(full), 3))
        short = []
        for i in range(p["repeats"]):
            t, _ = run(p["short_steps"], p["seed"] + 100 + i)
            short.append(t)
        r.set("short_s", [round(x, 3) for x in short])
        dt = common.median(full) - common.median(short)
        if dt > 0:
            r.set("unet_it_per_s", round((p["steps"] - p["short_steps"]) / dt, 3))
        if cuda:
            r.set("torch_max_allocated_mib_batch1", round(torch.cuda.max_memory_allocated() / 2**20, 1))
        r.set("peak_memory_mib_batch1", round(monitor.peak, 1))

        # `concurrency` requests served together: one batched call, as a batching server would.
        n = p["concurrency"]
        rounds = []
        for k in range(p["rounds"]):
            t, _ = run(p["steps"], p["seed"] + 1000 * (k + 1), n=n)
            rounds.append(t)
            r.set(f"concurrency_round_{k + 1}_s", round(t, 3))
        r.set("images_per_s_concurrent", round(n / rounds[-1], 3))
        if cuda:
            r.set(f"torch_max_allocated_mib_concurrency{n}", round(torch.cuda.max_memory_allocated() / 2**20, 1))
        r.set(f"peak_memory_mib_concurrency{n}", monitor.stop())
        r.set("complete", True)

        # Precision floor for the image agreement: the same weights and latents in F32. How far
        # diffusers' own reduced-precision image is from it says how close two correct reduced-
        # precision implementations can be expected to agree.
        if dtype != torch.float32:
            pipe.to(dtype=torch.float32)
            dtype = torch.float32
            _, images = run(p["steps"], p["seed"], latents=latents)
            ref = (images[0] * 255).round().astype("uint8")
            r.set("psnr_diffusers_vs_f32_reference", round(common.psnr(img, ref), 2))
            if args.sdserve_png and os.path.exists(args.sdserve_png):
                with open(args.sdserve_png, "rb") as f:
                    theirs = common.png_to_array(f.read())
                r.set("psnr_sdserve_vs_f32_reference", round(common.psnr(theirs, ref), 2))


if __name__ == "__main__":
    main()

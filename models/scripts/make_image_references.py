"""Run diffusers' image-to-image pipelines (CPU, float32) on the tiny models; write references.

    .venv/bin/python models/scripts/make_image_references.py [--out models/reference/img2img]

Inputs (written to <out>/): input_0.png, input_1.png (64x64) and input_odd.png (67x61), RGB
pictures drawn from a seeded RNG; resize_<w>x<h>.png: input_odd.png resized by Pillow's
Lanczos filter, as diffusers' VaeImageProcessor resizes. Hostile files: bomb.png (a valid
header declaring 100000x100000 pixels, one tiny IDAT), truncated.jpg (the first half of a JPEG
of input_0.png), input_0.jpg and input_0.webp (the same picture, whole).

Inpainting (StableDiffusionInpaintPipeline; masks mask_0.png (L), mask_1.png (RGB) and
mask_odd.png (RGB, 67x61), white = repaint): <out>/sd1_inpaint/ (tiny-sd1, a 4-channel UNet)
and <out>/sd1_inpaint9/ (tiny-sd1-inpaint, 9 channels), <out>/sd2_inpaint/ (tiny-sd2, v-prediction);
StableDiffusionXLInpaintPipeline:
<out>/sdxl_inpaint/ (tiny-sdxl) and <out>/sdxl_inpaint9/ (tiny-sdxl-inpaint); documented in their
index.json.

For each image-to-image model (sd1, sd2, sdxl, and sdxl_refiner: models/tiny-sdxl-refiner
refining tiny-sdxl's text-to-image references), <out>/<model>/:
  <run>.safetensors   "images" (B, H, W, 3) float output_type="np",
                      "encoder_noise": the draw of the VAE's latent sample (B, 4, h, w),
                      "noise": the draw add_noise used, "step_noise" (if any): every draw a
                      stochastic scheduler made, in order, "timesteps": those that ran
  encoder.safetensors "mean", "std": the VAE encoder's latent distribution of the two inputs,
                      "image_latents": scaling_factor * (mean + std * encoder_noise)
  index.json          every run's settings
The pipelines are loaded with from_pretrained from the model folders, as users load them.
"""

import argparse
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image

from make_references import NoiseRecorder, save_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {
    "sd1": ("tiny-sd1", StableDiffusionImg2ImgPipeline),
    "sd2": ("tiny-sd2", StableDiffusionImg2ImgPipeline),
    "sdxl": ("tiny-sdxl", StableDiffusionXLImg2ImgPipeline),
    # Refines tiny-sdxl's own text-to-image references (models/reference/sdxl/euler_*.png).
    "sdxl_refiner": ("tiny-sdxl-refiner", StableDiffusionXLImg2ImgPipeline),
}
REFINER_INPUTS = ["../sdxl/euler_0.png", "../sdxl/euler_1.png"]
REFINER_SCORES = dict(aesthetic_score=7.5, negative_aesthetic_score=1.0, original_size=(32, 48),
                      crops_coords_top_left=(4, 8), negative_original_size=(16, 16),
                      negative_crops_coords_top_left=(1, 1))
PROMPTS = ["a red circle on a blue background", "two green squares"]
NEGATIVE_PROMPTS = ["blurry", ""]
STEPS = 10
GUIDANCE = 7.5
STRENGTHS = (0.35, 0.8)
NOISE_SEED = 7
SCHEDULERS = [
    ("ddim", DDIMScheduler, {}),
    ("pndm", PNDMScheduler, {}),
    ("euler", EulerDiscreteScheduler, {}),
    ("euler_ancestral", EulerAncestralDiscreteScheduler, {}),
    ("dpmpp_2m", DPMSolverMultistepScheduler, {}),
    ("dpmpp_2m_karras", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    ("lms", LMSDiscreteScheduler, {}),
    ("unipc", UniPCMultistepScheduler, {}),
]
# Modules whose randn_tensor the pipelines draw from: the VAE's latent sample, the pipelines'
# add_noise noise, the stochastic schedulers.
NOISE_MODULES = [
    "diffusers.models.autoencoders.vae",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img",
    "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
    "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint",
    "diffusers.schedulers.scheduling_ddim",
    "diffusers.schedulers.scheduling_euler_ancestral_discrete",
]
RESIZES = [(64, 56), (32, 24), (128, 96), (67, 61)]


def picture(seed, width, height):
    """A smooth background with a few discs and boxes, from a seeded RNG."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (x / max(width - 1, 1))[..., None]
    img = c0 * (1 - t) + c1 * t
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, width / 3)
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r * r
        img[disc] = rng.uniform(0, 255, 3)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    img[y0 : y0 + height // 4, x0 : x0 + width // 3] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8), mode="RGB")


# SDXL only: size conditioning, which image-to-image pairs with the negative rows its own way.
SDXL_SIZES = dict(original_size=(32, 48), crops_coords_top_left=(4, 8), negative_original_size=(16, 16),
                  negative_crops_coords_top_left=(1, 1))


@torch.no_grad()
def call(pipe, **inputs):
    """One pipeline call on the common prompts and settings; returns the float images, every
    random draw with the module that made it, the timesteps that ran and the first UNet call's
    SDXL time ids (or None)."""
    timesteps, time_ids = [], []

    def on_step_end(_pipe, _i, t, kwargs):
        timesteps.append(float(t))
        return kwargs

    def unet_hook(_module, _args, kwargs, _output):
        added = kwargs.get("added_cond_kwargs")
        if added and not time_ids:
            time_ids.append(added["time_ids"].detach().clone())

    hook = pipe.unet.register_forward_hook(unet_hook, with_kwargs=True)
    try:
        with NoiseRecorder(NOISE_MODULES, strict=True) as rec:
            out = pipe(
                prompt=PROMPTS,
                negative_prompt=NEGATIVE_PROMPTS,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=torch.Generator().manual_seed(NOISE_SEED),
                output_type="np",
                callback_on_step_end=on_step_end,
                **inputs,
            ).images
    finally:
        hook.remove()
    images = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    steps = torch.tensor(timesteps, dtype=torch.float64)
    return images, rec, steps, (time_ids[0] if time_ids else None)


@torch.no_grad()
def run(pipe, base_config, cls, overrides, images, strength, capture, extra=None):
    pipe.scheduler = cls.from_config(base_config, **overrides)
    enc = {}
    original_encode = pipe.vae.encode
    if capture:

        def encode(x, *args, **kwargs):
            out = original_encode(x, *args, **kwargs)
            enc["mean"] = out.latent_dist.mean.detach().clone()
            enc["std"] = out.latent_dist.std.detach().clone()
            return out

        pipe.vae.encode = encode
    try:
        out, rec, timesteps, time_ids = call(pipe, image=images, strength=strength, **(extra or {}))
    finally:
        if capture:
            del pipe.vae.encode
    draws = rec.draws
    arrays = {"images": out, "encoder_noise": draws[0], "noise": draws[1], "timesteps": timesteps}
    if len(draws) > 2:
        arrays["step_noise"] = torch.stack(draws[2:])
    if time_ids is not None:
        arrays["add_time_ids"] = time_ids
    if capture:
        enc["image_latents"] = pipe.vae.config.scaling_factor * (enc["mean"] + enc["std"] * draws[0])
    return arrays, enc


def sc_name(run_name):
    """The request's scheduler name of a run: its name up to the strength or a suffix."""
    for name, _, _ in sorted(SCHEDULERS, key=lambda t: -len(t[0])):
        if run_name.startswith(name + "_"):
            return name
    raise SystemExit(f"no scheduler for {run_name}")


def write_model(key, models_root, out_root, inputs, odd, input_names=("input_0.png", "input_1.png")):
    folder, cls = MODELS[key]
    out = os.path.join(out_root, key)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    kwargs = {"safety_checker": None} if cls is StableDiffusionImg2ImgPipeline else {}
    pipe = cls.from_pretrained(os.path.join(models_root, folder), **kwargs).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    index = {"model": key, "model_dir": f"models/{folder}", "pipeline": cls.__name__, "runs": []}
    plan = [(f"{name}_s{s}", sc, ov, inputs, s, None) for name, sc, ov in SCHEDULERS for s in STRENGTHS]
    plan.append(("ddim_resized", DDIMScheduler, {}, [odd, odd], 0.8, None))
    if key == "sdxl":
        plan.append(("euler_sizes_s0.6", EulerDiscreteScheduler, {}, inputs, 0.6, SDXL_SIZES))
    if key == "sdxl_refiner":
        plan.append(("euler_aesthetic_s0.6", EulerDiscreteScheduler, {}, inputs, 0.6, REFINER_SCORES))
    for i, (name, sc, ov, images, strength, extra) in enumerate(plan):
        arrays, enc = run(pipe, base_config, sc, ov, images, strength, capture=i == 0, extra=extra)
        if enc:
            save_file(enc, os.path.join(out, "encoder.safetensors"))
        save_file(arrays, os.path.join(out, f"{name}.safetensors"))
        index["runs"].append(
            {
                "name": name,
                "scheduler": sc_name(name),
                "sdxl_inputs": {k: list(v) if isinstance(v, tuple) else v for k, v in (extra or {}).items()},
                "scheduler_class": sc.__name__,
                "strength": strength,
                "inputs": ["input_odd.png"] * 2 if images[0] is odd else list(input_names),
                "prompts": PROMPTS,
                "negative_prompts": NEGATIVE_PROMPTS,
                "num_inference_steps": STEPS,
                "guidance_scale": GUIDANCE,
                "timesteps": [float(t) for t in arrays["timesteps"]],
                "output_size": list(arrays["images"].shape[1:3]),
                "step_noise_draws": int(arrays["step_noise"].shape[0]) if "step_noise" in arrays else 0,
            }
        )
        print(f"{key}/{name}: {len(index['runs'][-1]['timesteps'])} steps", flush=True)
    with open(os.path.join(out, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


def png_chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def write_hostile(out, picture_0):
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    bomb += png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b"")
    with open(os.path.join(out, "bomb.png"), "wb") as f:
        f.write(bomb)
    buf = io.BytesIO()
    picture_0.save(buf, format="JPEG", quality=90)
    with open(os.path.join(out, "input_0.jpg"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(out, "truncated.jpg"), "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    picture_0.save(os.path.join(out, "input_0.webp"), format="WEBP", lossless=True)


# Inpainting: tiny-sd1 (a 4-channel UNet: diffusers blends the known region back in after every
# step) and tiny-sd1-inpaint (a 9-channel UNet conditioned on the mask and the masked image).
# SDXL: tiny-sdxl (plain) and tiny-sdxl-inpaint (9 channels), at StableDiffusionXLInpaintPipeline's
# default strength 0.9999, which skips the first step and starts from the image noised.
INPAINT_MODELS = {  # folder, pipeline, the strength most runs use
    "sd1_inpaint": ("tiny-sd1", StableDiffusionInpaintPipeline, 1.0),
    "sd1_inpaint9": ("tiny-sd1-inpaint", StableDiffusionInpaintPipeline, 1.0),
    "sd2_inpaint": ("tiny-sd2", StableDiffusionInpaintPipeline, 1.0),
    "sdxl_inpaint": ("tiny-sdxl", StableDiffusionXLInpaintPipeline, 0.9999),
    "sdxl_inpaint9": ("tiny-sdxl-inpaint", StableDiffusionXLInpaintPipeline, 0.9999),
}
INPAINT_DOC = (
    "<run>.safetensors: images (B, H, W, 3); draws (K, B, 4, h, w): every randn_tensor draw in "
    "order (the VAE's latent samples of the image and of the masked image, and the pipeline's "
    "noise at index noise_draw, then the ancestral scheduler's); timesteps that ran"
)


def mask_picture(seed, width, height, mode):
    """White (repaint) discs and a box on black, from a seeded RNG, in PIL mode L or RGB."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    m = np.zeros((height, width))
    for _ in range(2):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(6, width / 3)
        m[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = 255
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    m[y0 : y0 + height // 3, x0 : x0 + width // 4] = 200
    m = np.clip(m + rng.normal(0, 20, m.shape), 0, 255).round().astype(np.uint8)
    image = Image.fromarray(m, mode="L")
    return image.convert("RGB") if mode == "RGB" else image


@torch.no_grad()
def inpaint_run(pipe, base_config, cls, overrides, images, masks, strength):
    pipe.scheduler = cls.from_config(base_config, **overrides)
    out, rec, timesteps, time_ids = call(pipe, image=images, mask_image=masks, strength=strength)
    noise_draw = rec.sources.index(type(pipe).__module__)
    arrays = {"images": out, "draws": torch.stack(rec.draws), "timesteps": timesteps}
    if time_ids is not None:
        arrays["add_time_ids"] = time_ids
    return arrays, noise_draw


def write_inpaint(key, models_root, out_root, inputs, odd, masks, mask_odd):
    out = os.path.join(out_root, key)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    folder, cls, full = INPAINT_MODELS[key]
    kwargs = {"safety_checker": None} if cls is StableDiffusionInpaintPipeline else {}
    pipe = cls.from_pretrained(os.path.join(models_root, folder), **kwargs).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    base_config = dict(pipe.scheduler.config)
    index = {"model": key, "model_dir": f"models/{folder}", "pipeline": cls.__name__,
             "unet_in_channels": pipe.unet.config.in_channels, "doc": INPAINT_DOC, "runs": []}
    pair = (["input_0.png", "input_1.png"], ["mask_0.png", "mask_1.png"])
    plan = [(f"{name}_s{full}", name, sc, ov, inputs, masks, full, pair) for name, sc, ov in SCHEDULERS]
    plan.append(("ddim_s0.6", "ddim", DDIMScheduler, {}, inputs, masks, 0.6, pair))
    plan.append(("euler_ancestral_s0.6", "euler_ancestral", EulerAncestralDiscreteScheduler, {}, inputs, masks, 0.6, pair))
    plan.append(("ddim_resized", "ddim", DDIMScheduler, {}, [odd, odd], [mask_odd, mask_odd], full,
                 (["input_odd.png"] * 2, ["mask_odd.png"] * 2)))
    for name, scheduler, sc, ov, images, mks, strength, files in plan:
        arrays, noise_draw = inpaint_run(pipe, base_config, sc, ov, images, mks, strength)
        save_file(arrays, os.path.join(out, f"{name}.safetensors"))
        index["runs"].append({
            "name": name, "scheduler": scheduler, "scheduler_class": sc.__name__, "strength": strength,
            "inputs": files[0], "masks": files[1], "prompts": PROMPTS, "negative_prompts": NEGATIVE_PROMPTS,
            "num_inference_steps": STEPS, "guidance_scale": GUIDANCE,
            "timesteps": [float(t) for t in arrays["timesteps"]],
            "output_size": list(arrays["images"].shape[1:3]), "noise_draw": noise_draw,
            "draws": int(arrays["draws"].shape[0]),
        })
        print(f"{key}/{name}: {len(timesteps_of(arrays))} steps, {arrays['draws'].shape[0]} draws", flush=True)
    with open(os.path.join(out, "index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


def timesteps_of(arrays):
    return arrays["timesteps"].tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    parser.add_argument("--out", default=os.path.join(REPO, "models", "reference", "img2img"))
    parser.add_argument("--only", choices=sorted([*MODELS, *INPAINT_MODELS]), help="only this model")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    inputs = [picture(1, 64, 64), picture(2, 64, 64)]
    odd = picture(3, 67, 61)
    for i, im in enumerate(inputs):
        im.save(os.path.join(args.out, f"input_{i}.png"))
    odd.save(os.path.join(args.out, "input_odd.png"))
    write_hostile(args.out, inputs[0])
    for w, h in RESIZES:
        odd.resize((w, h), resample=Image.LANCZOS).save(os.path.join(args.out, f"resize_{w}x{h}.png"))
    masks = [mask_picture(11, 64, 64, "L"), mask_picture(12, 64, 64, "RGB")]
    mask_odd = mask_picture(13, 67, 61, "RGB")
    for i, m in enumerate(masks):
        m.save(os.path.join(args.out, f"mask_{i}.png"))
    mask_odd.save(os.path.join(args.out, "mask_odd.png"))
    for key in MODELS:
        if args.only not in (None, key):
            continue
        if key == "sdxl_refiner":
            refined = [Image.open(os.path.join(args.out, name)).convert("RGB") for name in REFINER_INPUTS]
            write_model(key, args.models, args.out, refined, odd, REFINER_INPUTS)
        else:
            write_model(key, args.models, args.out, inputs, odd)
    for key in INPAINT_MODELS:
        if args.only in (None, key):
            write_inpaint(key, args.models, args.out, inputs, odd, masks, mask_odd)


if __name__ == "__main__":
    main()

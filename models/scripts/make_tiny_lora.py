"""Make tiny LoRA adapters for tiny-sd1, tiny-sd2 and tiny-sdxl with PEFT, and diffusers' images with them.

    .venv/bin/python models/scripts/make_tiny_lora.py [--out models/lora] [--models sd2 ...]

For each model (sd1: models/tiny-sd1, sd2: models/tiny-sd2, sdxl: models/tiny-sdxl), <out>/<model>/:
  style.safetensors        PEFT layout as diffusers' save_lora_weights writes it
                           (unet.<module>.lora_A/lora_B.weight, text_encoder[_2].<module>...),
                           with diffusers' lora_adapter_metadata (r, lora_alpha) in the header:
                           UNet r=4, lora_alpha=8 on attention, feed-forward, projections and
                           the resnets' 3x3 convolutions and time projections (LoCon); text
                           encoder(s) r=2, lora_alpha=2 on attention and MLP linears
  detail.safetensors       UNet only: r=2, lora_alpha=1 on to_q, to_v and time_emb_proj
  style.kohya.safetensors  style converted to the kohya / A1111 layout by lora_to_kohya.py
  run_<run>.safetensors    "images" (2, 64, 64, 3) float output_type="np"
  <run>_<i>.png            8-bit, as diffusers' numpy_to_pil rounds
  latents.safetensors      "latents" (2, 4, 8, 8): the initial latents every run passes
  index.json               every run: adapters and scales, the file they came from, settings

Runs: base (no adapter), style at 1.0, style 0.8 + detail 0.3, style at 0.0, and the kohya file
of style at 0.8 + detail 0.3 (loaded by diffusers' own kohya conversion). Every LoRA weight is
drawn from a seeded normal (PEFT would start lora_B at zero, which changes nothing). Adapters are
loaded from the saved files with load_lora_weights + set_adapters, as users load them.
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from lora_to_kohya import convert_file

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODELS = {  # folder, pipeline class, latents seed
    "sd1": ("tiny-sd1", StableDiffusionPipeline, 611),
    "sd2": ("tiny-sd2", StableDiffusionPipeline, 633),
    "sdxl": ("tiny-sdxl", StableDiffusionXLPipeline, 622),
}
PROMPTS = ["a red circle on a blue background", "two green squares"]
NEGATIVE = "blurry"
STEPS = 6
GUIDANCE = 7.5
UNET_STYLE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
              "ff.net.2", "conv1", "conv2", "time_emb_proj"]
UNET_DETAIL = ["to_q", "to_v", "time_emb_proj"]
TEXT_STYLE = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
RUNS = [  # name, {adapter: scale}, file of style
    ("base", {}, "style"),
    ("style", {"style": 1.0}, "style"),
    ("style_detail", {"style": 0.8, "detail": 0.3}, "style"),
    ("style_zero", {"style": 0.0}, "style"),
    ("kohya_style_detail", {"style": 0.8, "detail": 0.3}, "style.kohya"),
]


def fill_lora(module, adapter, seed, std):
    """Every LoRA parameter of `adapter` from one seeded normal, in name order."""
    g = torch.Generator().manual_seed(seed)
    params = sorted((n, p) for n, p in module.named_parameters() if f".{adapter}." in n and "lora_" in n)
    with torch.no_grad():
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return len(params)


def make_adapter(pipe, key, name, seed, out_dir):
    """Adds adapter `name` to the pipeline's networks, fills it, saves it in the PEFT layout."""
    if name == "style":
        unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_STYLE)
        text_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=TEXT_STYLE)
    else:
        unet_cfg = LoraConfig(r=2, lora_alpha=1, target_modules=UNET_DETAIL)
        text_cfg = None
    pipe.unet.add_adapter(unet_cfg, adapter_name=name)
    fill_lora(pipe.unet, name, seed, 0.05)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet, adapter_name=name),
              "unet_lora_adapter_metadata": unet_cfg.to_dict()}
    encoders = ["text_encoder"] + (["text_encoder_2"] if key == "sdxl" else [])
    if text_cfg is not None:
        for i, enc in enumerate(encoders):
            module = getattr(pipe, enc)
            # peft's own injection (transformers' add_adapter pins a newer peft).
            inject_adapter_in_model(text_cfg, module, adapter_name=name)
            fill_lora(module, name, seed + 1 + i, 0.05)
            layers[f"{enc}_lora_layers"] = get_peft_model_state_dict(module, adapter_name=name)
            layers[f"{enc}_lora_adapter_metadata"] = text_cfg.to_dict()
    type(pipe).save_lora_weights(out_dir, weight_name=f"{name}.safetensors", **layers)


def run(pipe, latents, adapters):
    """The pipeline's images with `adapters` (name -> scale) loaded; none for the base run."""
    if adapters:
        pipe.set_adapters(list(adapters), adapter_weights=list(adapters.values()))
    with torch.no_grad():
        return pipe(prompt=PROMPTS, negative_prompt=[NEGATIVE] * len(PROMPTS),
                    num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                    latents=latents.clone(), output_type="np").images


def write_model(key, out_root):
    folder, cls, seed = MODELS[key]
    model_dir = os.path.join(REPO, "models", folder)
    out = os.path.join(out_root, key)
    os.makedirs(out, exist_ok=True)
    maker = cls.from_pretrained(model_dir, torch_dtype=torch.float32)
    make_adapter(maker, key, "style", seed, out)
    # Each adapter is made on the base weights alone.
    maker = cls.from_pretrained(model_dir, torch_dtype=torch.float32)
    make_adapter(maker, key, "detail", seed + 10, out)
    del maker
    convert_file(os.path.join(out, "style.safetensors"), os.path.join(out, "style.kohya.safetensors"),
                 os.path.join(model_dir, "unet", "config.json"))

    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    save_file({"latents": latents.contiguous()}, os.path.join(out, "latents.safetensors"))
    runs = []
    for name, adapters, style_file in RUNS:
        # A fresh pipeline per run, loaded from the folder and the files as users load them.
        pipe = cls.from_pretrained(model_dir, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for adapter in adapters:
            file = style_file if adapter == "style" else adapter
            pipe.load_lora_weights(out, weight_name=f"{file}.safetensors", adapter_name=adapter)
        images = run(pipe, latents, adapters)
        save_file({"images": torch.from_numpy(np.ascontiguousarray(images))},
                  os.path.join(out, f"run_{name}.safetensors"))
        pngs = []
        for i, img in enumerate(images):
            png = f"{name}_{i}.png"
            Image.fromarray((img * 255).round().astype("uint8")).save(os.path.join(out, png))
            pngs.append(png)
        runs.append({"name": name, "adapters": adapters,
                     "files": {a: (style_file if a == "style" else a) + ".safetensors" for a in adapters},
                     "arrays": f"run_{name}.safetensors", "images": pngs})
        print(key, name, float(np.abs(images).mean()))
    index = {"model": f"models/{folder}", "prompts": PROMPTS, "negative_prompt": NEGATIVE,
             "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "height": 64, "width": 64,
             "scheduler": "the folder's default", "latents": "latents.safetensors", "runs": runs}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "models", "lora"))
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = ap.parse_args()
    torch.manual_seed(0)
    for key in args.models:
        write_model(key, args.out)


if __name__ == "__main__":
    main()

"""Build the inpainting folders: models/tiny-sd1-inpaint (runwayml-style) and
models/tiny-sdxl-inpaint (like diffusers/stable-diffusion-xl-1.0-inpainting-0.1), each a
9-channel UNet (the latents, the mask and the masked image's latents) around the base's other
components.

    .venv/bin/python models/scripts/make_tiny_inpaint.py [--models models]

Each UNet has its base's shape with `in_channels=9` and seeded random weights; the other
components are relative symbolic links to the base's (no weights copied), and model_index.json
names the inpaint pipeline. Run make_tiny_models.py and make_tiny_sdxl.py first.
"""

import argparse
import json
import os
import shutil

import torch

import make_tiny_sdxl
from make_tiny_models import MODELS, REPO, UNET_OUT_GAIN, reinit, unet

# folder: base, seed, UNet builder, components linked, pipeline class
FOLDERS = {
    "tiny-sd1-inpaint": ("tiny-sd1", 606, lambda: unet(MODELS["sd1"]),
                         ("scheduler", "text_encoder", "tokenizer", "vae"), "StableDiffusionInpaintPipeline"),
    "tiny-sdxl-inpaint": ("tiny-sdxl", 808, make_tiny_sdxl.unet,
                          ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae"),
                          "StableDiffusionXLInpaintPipeline"),
}


def build(models, folder):
    base, seed, make_unet, linked, pipeline = FOLDERS[folder]
    dest = os.path.join(models, folder)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    torch.manual_seed(seed)
    u = make_unet()
    config = dict(u.config)
    config["in_channels"] = 9
    u = type(u).from_config(config)
    reinit(u, torch.Generator().manual_seed(seed), "conv_out", UNET_OUT_GAIN)
    u.eval().save_pretrained(os.path.join(dest, "unet"), safe_serialization=True)
    for name in os.listdir(os.path.join(dest, "unet")):
        os.chmod(os.path.join(dest, "unet", name), 0o644)
    for entry in linked:
        os.symlink(os.path.join("..", base, entry), os.path.join(dest, entry))
    with open(os.path.join(models, base, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = pipeline
    with open(os.path.join(dest, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    print(dest)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    args = parser.parse_args()
    for folder in FOLDERS:
        build(args.models, folder)


if __name__ == "__main__":
    main()

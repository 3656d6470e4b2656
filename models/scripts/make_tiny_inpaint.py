"""Build models/tiny-sd1-inpaint: a runwayml-style inpainting folder (a 9-channel UNet: the
latents, the mask and the masked image's latents) around tiny-sd1's other components.

    .venv/bin/python models/scripts/make_tiny_inpaint.py [--models models]

The UNet has tiny-sd1's shape with `in_channels=9` and seeded random weights; text encoder,
tokenizer, VAE and scheduler are relative symbolic links to tiny-sd1's (no weights copied), and
model_index.json names `StableDiffusionInpaintPipeline`. Run make_tiny_models.py first.
"""

import argparse
import json
import os
import shutil

import torch

from make_tiny_models import MODELS, REPO, UNET_OUT_GAIN, reinit, unet

FOLDER = "tiny-sd1-inpaint"
BASE = "tiny-sd1"
SEED = 606


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    args = parser.parse_args()
    dest = os.path.join(args.models, FOLDER)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    spec = MODELS["sd1"]
    torch.manual_seed(SEED)
    u = unet(spec)
    config = dict(u.config)
    config["in_channels"] = 9
    u = type(u).from_config(config)
    reinit(u, torch.Generator().manual_seed(SEED), "conv_out", UNET_OUT_GAIN)
    u.eval().save_pretrained(os.path.join(dest, "unet"), safe_serialization=True)
    for entry in ("scheduler", "text_encoder", "tokenizer", "vae"):
        os.symlink(os.path.join("..", BASE, entry), os.path.join(dest, entry))
    with open(os.path.join(args.models, BASE, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    with open(os.path.join(dest, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    print(dest)


if __name__ == "__main__":
    main()

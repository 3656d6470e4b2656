"""Build models/tiny-sdxl-refiner: an SDXL-refiner-style folder around tiny-sdxl's second text
encoder, VAE and scheduler.

    .venv/bin/python models/scripts/make_tiny_refiner.py [--models models]

As stabilityai/stable-diffusion-xl-refiner-1.0: `StableDiffusionXLImg2ImgPipeline` with no first
text encoder (`text_encoder`, `tokenizer` null), `requires_aesthetics_score` true (five time ids:
original size, crop, aesthetic score), `force_zeros_for_empty_prompt` false, and a UNet whose
context is the second encoder's hidden state alone. The UNet has tiny-sdxl's shape with those
two widths changed and seeded random weights; the other components are relative symbolic links
to tiny-sdxl's. Run make_tiny_sdxl.py first.
"""

import argparse
import json
import os
import shutil

import torch

from make_tiny_models import REPO, UNET_OUT_GAIN, reinit
from make_tiny_sdxl import HIDDEN, PROJECTION_DIM, TIME_EMBED_DIM, unet

FOLDER = "tiny-sdxl-refiner"
BASE = "tiny-sdxl"
SEED = 707
TIME_IDS = 5  # original size, crop top-left, aesthetic score


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=os.path.join(REPO, "models"))
    args = parser.parse_args()
    dest = os.path.join(args.models, FOLDER)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.makedirs(dest)
    torch.manual_seed(SEED)
    config = dict(unet().config)
    config["cross_attention_dim"] = HIDDEN[1]
    config["projection_class_embeddings_input_dim"] = TIME_IDS * TIME_EMBED_DIM + PROJECTION_DIM
    u = type(unet()).from_config(config)
    reinit(u, torch.Generator().manual_seed(SEED), "conv_out", UNET_OUT_GAIN)
    u.eval().save_pretrained(os.path.join(dest, "unet"), safe_serialization=True)
    for entry in ("scheduler", "text_encoder_2", "tokenizer_2", "vae"):
        os.symlink(os.path.join("..", BASE, entry), os.path.join(dest, entry))
    with open(os.path.join(args.models, BASE, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    index.update(
        _class_name="StableDiffusionXLImg2ImgPipeline",
        text_encoder=[None, None],
        tokenizer=[None, None],
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    with open(os.path.join(dest, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    for name in os.listdir(os.path.join(dest, "unet")):
        os.chmod(os.path.join(dest, "unet", name), 0o644)
    print(dest)


if __name__ == "__main__":
    main()

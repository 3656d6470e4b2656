"""Does a generated picture show what its prompt asked for?

    .venv/bin/python models/scripts/shapes_eval.py models/tiny-shapes [--steps 20] [--guidance 5]

The same simple analysis as `crates/pipeline/tests/default_model.rs`: the
background is the median colour of the border, the foreground every pixel far
from it; the foreground's colour is the palette colour nearest to its median,
and its shape follows from how much of its bounding box it fills (square ~1,
circle ~pi/4, triangle ~1/2). Run as a script it generates the test prompts
with diffusers and prints a table; `train_shapes.py` calls `evaluate` at the end
of training.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes_dataset import COLOURS, contact_sheet  # noqa: E402

# Colour x shape prompts with a stated background, one seed each.
TEST_PROMPTS = [
    ("red", "circle", "white"),
    ("green", "square", "black"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"),
    ("red", "square", "blue"),
    ("green", "triangle", "white"),
    ("blue", "circle", "orange"),
    ("yellow", "square", "black"),
    ("red", "triangle", "green"),
    ("green", "circle", "red"),
    ("blue", "square", "white"),
    ("yellow", "triangle", "blue"),
]
# Pixels at least this far (RGB distance) from the background are foreground.
FOREGROUND_DISTANCE = 60.0
# Fill ratio of the foreground's bounding box: above SQUARE_MIN a square, below
# TRIANGLE_MAX a triangle, between them a circle (pi/4 = 0.785).
SQUARE_MIN = 0.89
TRIANGLE_MAX = 0.65


def prompt_text(colour, shape, background):
    art = "an" if colour[0] in "aeiou" else "a"
    bg_art = "an" if background[0] in "aeiou" else "a"
    return f"{art} {colour} {shape} on {bg_art} {background} background"


def nearest_colour(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(COLOURS, key=lambda name: float(np.sum((np.asarray(COLOURS[name]) - rgb) ** 2)))


def analyse(image):
    """image uint8 (64, 64, 3) -> dict(background, colour, shape, fill, pixels)."""
    img = image.astype(np.float64)
    h, w, _ = img.shape
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    mask = np.sqrt(((img - bg) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE
    n = int(mask.sum())
    out = dict(background=nearest_colour(bg), colour=None, shape=None, fill=0.0, pixels=n)
    if n < 20:
        return out
    ys, xs = np.nonzero(mask)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = n / box
    out["fill"] = fill
    out["colour"] = nearest_colour(np.median(img[mask], axis=0))
    out["shape"] = "square" if fill > SQUARE_MIN else "triangle" if fill < TRIANGLE_MAX else "circle"
    return out


def evaluate(folder, steps=20, guidance=5.0, seed=1234, sheet=None, log=print):
    """Generates TEST_PROMPTS with diffusers; returns the number of matches."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt_text(*p) for p in TEST_PROMPTS]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens, output_type="np").images
    images = (images * 255).round().astype(np.uint8)
    ok = 0
    log(f"{'prompt':46s} {'colour':8s} {'shape':9s} {'fill':>5s} {'bg':8s} match")
    for (colour, shape, background), text, image in zip(TEST_PROMPTS, prompts, images):
        a = analyse(image)
        match = a["colour"] == colour and a["shape"] == shape and a["background"] == background
        ok += match
        log(f"{text:46s} {str(a['colour']):8s} {str(a['shape']):9s} {a['fill']:5.2f} {a['background']:8s} {'yes' if match else 'NO'}")
    log(f"{ok}/{len(prompts)} match")
    if sheet:
        contact_sheet(list(images), columns=6).save(sheet)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--sheet", help="write the generated pictures here")
    args = parser.parse_args()
    evaluate(args.folder, args.steps, args.guidance, args.seed, args.sheet)


if __name__ == "__main__":
    main()

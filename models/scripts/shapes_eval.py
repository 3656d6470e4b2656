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

# Colour x shape prompts with a stated background (the same as the Rust test's).
TEST_PROMPTS = [
    ("red", "circle", "white"),
    ("green", "square", "black"),
    ("blue", "triangle", "yellow"),
    ("yellow", "circle", "purple"),
    ("red", "square", "blue"),
    ("green", "triangle", "white"),
    ("blue", "circle", "orange"),
    ("yellow", "square", "black"),
]
# Pixels at least this far (RGB distance) from the background start the
# foreground; the final mask is every pixel nearer the foreground's colour than
# the background's (the half-way contour, which keeps a blurred shape's area).
FOREGROUND_DISTANCE = 60.0
# A frame this wide is ignored: decoders leave faint artefacts at the edges.
MARGIN = 2
# Fill ratio of the object's bounding box: above SQUARE_MIN a square, below
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


def largest_component(mask):
    """The largest 4-connected component of a boolean mask."""
    h, w = mask.shape
    label = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or label[y0, x0]:
                continue
            current += 1
            label[y0, x0] = current
            stack, size = [(y0, x0)], 0
            while stack:
                y, x = stack.pop()
                size += 1
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                        label[ny, nx] = current
                        stack.append((ny, nx))
            if size > best_size:
                best, best_size = current, size
    return label == best if best else np.zeros_like(mask)


def analyse(image):
    """image uint8 (64, 64, 3) -> dict(background, colour, shape, fill, pixels)."""
    img = image.astype(np.float64)
    m = MARGIN
    ring = np.ones(img.shape[:2], dtype=bool)
    ring[m + 2 : -m - 2, m + 2 : -m - 2] = False
    ring[:m, :] = ring[-m:, :] = ring[:, :m] = ring[:, -m:] = False
    bg = np.median(img[ring], axis=0)
    inner = np.zeros(img.shape[:2], dtype=bool)
    inner[m:-m, m:-m] = True
    far = (np.sqrt(((img - bg) ** 2).sum(axis=2)) > FOREGROUND_DISTANCE) & inner
    out = dict(background=nearest_colour(bg), colour=None, shape=None, fill=0.0, pixels=int(far.sum()))
    if far.sum() < 20:
        return out
    fg = np.median(img[largest_component(far)], axis=0)
    # Nearer the foreground colour than the background's: projection past the midpoint.
    axis = fg - bg
    t = ((img - bg) @ axis) / max(float(axis @ axis), 1e-9)
    obj = largest_component((t > 0.5) & inner)
    n = int(obj.sum())
    ys, xs = np.nonzero(obj)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = n / box
    out.update(colour=nearest_colour(np.median(img[obj], axis=0)), fill=fill, pixels=n)
    out["shape"] = "square" if fill > SQUARE_MIN else "triangle" if fill < TRIANGLE_MAX else "circle"
    return out


def evaluate(folder, steps=20, guidance=5.0, seed=1234, sheet=None, log=print, device="cpu", repeats=1):
    """Generates TEST_PROMPTS (`repeats` seeds each) with diffusers; returns the number of matches."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cases = TEST_PROMPTS * repeats
    prompts = [prompt_text(*p) for p in cases]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    with torch.no_grad():
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, generator=gens, output_type="np").images
    images = (images * 255).round().astype(np.uint8)
    ok = 0
    log(f"{'prompt':46s} {'colour':8s} {'shape':9s} {'fill':>5s} {'bg':8s} match")
    for (colour, shape, background), text, image in zip(cases, prompts, images):
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
    parser.add_argument("--repeats", type=int, default=1, help="seeds per prompt")
    parser.add_argument("--sheet", help="write the generated pictures here")
    args = parser.parse_args()
    evaluate(args.folder, args.steps, args.guidance, args.seed, args.sheet, repeats=args.repeats)


if __name__ == "__main__":
    main()

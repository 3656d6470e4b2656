"""Procedural 64x64 pictures of coloured shapes with plain-English captions.

    .venv/bin/python models/scripts/shapes_dataset.py [--count 16] [--seed 0] [--out sheet.png]

Each sample is one, two or three shapes (circle, square, triangle) of one colour
on a plain background of another colour, e.g. "a red circle on a blue
background", "two green squares", "a yellow triangle on the left". What a
caption leaves out (the background, the position) is drawn at random, so the
model learns to fill it in. Sample `i` of seed `s` is always the same picture:
every sample has its own generator seeded with `(s, i)`.

Run as a script it prints captions and writes a contact sheet, to look at the
data.
"""

import argparse
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
# Drawn at 4x and box-filtered down, for anti-aliased edges.
SUPERSAMPLE = 4

COLOURS = {
    "red": (215, 25, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (250, 220, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (130, 40, 180),
    "orange": (250, 125, 10),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {2: "two", 3: "three"}
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Per-channel colour jitter, so the model sees "red" as a small range.
JITTER = 10


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(shape, colour, count, position, background):
    """The caption of a sample; `position` and `background` may be None (unsaid)."""
    if count == 1:
        text = f"{article(colour)} {colour} {shape}"
    else:
        text = f"{COUNT_WORDS[count]} {colour} {shape}s"
    if position is not None:
        text += " " + POSITIONS[position]
    if background is not None:
        text += f" on {article(background)} {background} background"
    return text


def _box_for(rng, size, position):
    """Top-left corner of a size x size box for one shape at `position`."""
    lo, hi = 2, SIZE - 2 - size
    third = SIZE // 3
    if position is None:
        return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    centre_lo, centre_hi = (SIZE - size) // 2 - 4, (SIZE - size) // 2 + 4
    near_hi = max(lo, third - size // 2)
    far_lo = min(hi, SIZE - third - size // 2)
    if position == "left":
        return int(rng.integers(lo, near_hi + 1)), int(rng.integers(centre_lo, centre_hi + 1))
    if position == "right":
        return int(rng.integers(far_lo, hi + 1)), int(rng.integers(centre_lo, centre_hi + 1))
    if position == "top":
        return int(rng.integers(centre_lo, centre_hi + 1)), int(rng.integers(lo, near_hi + 1))
    if position == "bottom":
        return int(rng.integers(centre_lo, centre_hi + 1)), int(rng.integers(far_lo, hi + 1))
    return int(rng.integers(centre_lo, centre_hi + 1)), int(rng.integers(centre_lo, centre_hi + 1))


def _boxes(rng, count, position):
    """Non-overlapping boxes (x, y, size) for `count` shapes."""
    if count == 1:
        size = int(rng.integers(18, 29)) if position else int(rng.integers(20, 37))
        return [(*_box_for(rng, size, position), size)]
    size = int(rng.integers(13, 20)) if count == 2 else int(rng.integers(11, 17))
    for _ in range(1000):
        boxes = [(*_box_for(rng, size, None), size) for _ in range(count)]
        if all(
            abs(a[0] - b[0]) > size + 2 or abs(a[1] - b[1]) > size + 2
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        ):
            return boxes
    raise RuntimeError("could not place the shapes")


def _jitter(rng, rgb):
    return tuple(int(np.clip(c + rng.integers(-JITTER, JITTER + 1), 0, 255)) for c in rgb)


def render(shape, colour_rgb, background_rgb, boxes):
    """An anti-aliased SIZE x SIZE RGB picture as a uint8 array (H, W, 3)."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), background_rgb)
    draw = ImageDraw.Draw(img)
    for x, y, size in boxes:
        x0, y0, x1, y1 = x * s, y * s, (x + size) * s - 1, (y + size) * s - 1
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour_rgb)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour_rgb)
        elif shape == "triangle":
            # Pointing up, base = height, so it fills half its bounding box.
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour_rgb)
        else:
            raise ValueError(f"unknown shape {shape!r}")
    img = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(img, dtype=np.uint8)


def sample(seed, index):
    """Sample `index` of dataset `seed`: (uint8 image (64, 64, 3), caption, facts)."""
    rng = np.random.default_rng([seed, index])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    others = [c for c in names if c != colour]
    background = others[int(rng.integers(len(others)))]
    count = int(rng.choice([1, 2, 3], p=[0.6, 0.2, 0.2]))
    position = None
    if count == 1 and rng.random() < 0.4:
        position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    say_background = rng.random() < 0.7
    boxes = _boxes(rng, count, position)
    image = render(shape, _jitter(rng, COLOURS[colour]), _jitter(rng, COLOURS[background]), boxes)
    text = caption(shape, colour, count, position, background if say_background else None)
    facts = dict(shape=shape, colour=colour, background=background, count=count, position=position, boxes=boxes)
    return image, text, facts


def batch(seed, indices):
    """uint8 images (N, 64, 64, 3) and captions for the given sample indices."""
    images, captions = [], []
    for i in indices:
        image, text, _ = sample(seed, int(i))
        images.append(image)
        captions.append(text)
    return np.stack(images), captions


def contact_sheet(images, columns=8):
    n = len(images)
    rows = math.ceil(n / columns)
    sheet = Image.new("RGB", (columns * (SIZE + 2), rows * (SIZE + 2)), (128, 128, 128))
    for k, im in enumerate(images):
        sheet.paste(Image.fromarray(im), ((k % columns) * (SIZE + 2), (k // columns) * (SIZE + 2)))
    return sheet


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write a contact sheet PNG here")
    args = parser.parse_args()
    images, captions = batch(args.seed, range(args.count))
    for i, text in enumerate(captions):
        print(f"{i:4d}  {text}")
    if args.out:
        contact_sheet(images).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

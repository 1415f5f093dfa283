"""The embedded default data set: SYNTHETIC images generated here, no download.

Ten classes of procedurally drawn shapes (random grey levels, sizes, positions, rotations; no colour, see
BACKGROUND_LEVELS), written as JPEGs into an ImageFolder tree `root/<class>/<n>.jpg`, so tools/make_shards.py treats
them exactly like real data. Same seed -> same bytes. It exists so the main job runs anywhere in minutes; it says
nothing about ImageNet-scale quality (see docs/results.md, the paper's comparison on Imagenette, for that).

    python tools/synthetic_data.py --output data/synthetic --per-class 60 --size 96
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = (
    "circle", "square", "triangle", "cross", "ring", "star", "crescent", "bar", "frame", "triangle_outline",
)

# Grey levels only: an image's identity lies in its shape and pose, never in its colours. Measured (docs/training.md,
# "Short schedules on a CPU"): with random colours per image, PIRL's colour jitter (hue 0.2, grayscale 0.2) cannot
# erase the colours, instance discrimination latches onto them and the trunk's class probe ends below a random
# trunk's (17 / 19 % vs 22.5 / 24.5 %); on the same shapes in grey the image-view loss goes below chance and the
# res5 probe rises from 30.5 / 45.0 % (random) to 51 / 52 %.
BACKGROUND_LEVELS = (0, 100)
SHAPE_LEVELS = (150, 256)
# Radius as a fraction of the side, a wide range: how large a shape is says nothing of its class, and a random trunk's
# features change more with the size than with the shape (its best per-layer probe: 66 % with radii 0.25-0.42,
# 41 % with 0.12-0.42), while PIRL's random crops teach the trunk to ignore it (docs/training.md, "Short schedules
# on a CPU").
SHAPE_RADII = (0.12, 0.42)


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def draw_sample(label: int, size: int, rng: random.Random) -> Image.Image:
    """One shape of class `label` in a random grey level, size (SHAPE_RADII), position and rotation on a darker
    uniform background, lightly blurred."""
    background = rng.randrange(*BACKGROUND_LEVELS)
    img = Image.new("RGB", (size, size), (background,) * 3)
    draw = ImageDraw.Draw(img)
    colour = (rng.randrange(*SHAPE_LEVELS),) * 3
    r = rng.uniform(*SHAPE_RADII) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(3, round(r / 4))
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=colour)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=width)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r, r * 0.4] * 5, angle), fill=colour)
    elif name == "crescent":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        ox, oy = 0.45 * r * math.cos(angle), 0.45 * r * math.sin(angle)
        draw.ellipse([cx + ox - 0.85 * r, cy + oy - 0.85 * r, cx + ox + 0.85 * r, cy + oy + 0.85 * r],
                     fill=(background,) * 3)
    elif name == "bar":
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=int(width * 1.5))
    elif name == "frame":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), outline=colour, width=width)
    elif name == "triangle_outline":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), outline=colour, width=width)
    return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.8)))


def write_synthetic(root: str | Path, per_class: int, size: int = 96, seed: int = 0) -> Path:
    """Writes per_class JPEGs for each class under root/<class>/; returns root."""
    root = Path(root)
    for label, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            rng = random.Random(f"{seed}-{label}-{n}")
            draw_sample(label, size, rng).save(folder / f"{n:05d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder to write root/<class>/<n>.jpg into")
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_synthetic(args.output, args.per_class, args.size, args.seed)
    print(f"wrote {args.per_class * len(CLASSES)} synthetic images into {args.output}")


if __name__ == "__main__":
    main()

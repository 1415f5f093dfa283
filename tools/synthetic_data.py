"""The embedded default data set: SYNTHETIC images generated here, no download.

Ten classes of procedurally drawn shapes and textures (random colours, sizes, positions, rotations, noisy
backgrounds), written as JPEGs into an ImageFolder tree `root/<class>/<n>.jpg`, so tools/make_shards.py treats
them exactly like real data. Same seed -> same bytes. It exists so the main job runs anywhere in minutes; it says
nothing about ImageNet-scale quality (see the README's imagenette run for that).

    python tools/synthetic_data.py --output data/synthetic --per-class 60 --size 96
"""
from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = (
    "circle", "square", "triangle", "cross", "ring", "star", "hstripes", "vstripes", "checker", "dots",
)


def _background(rng: random.Random, size: int) -> Image.Image:
    c0 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    c1 = np.array([rng.randrange(256) for _ in range(3)], np.float32)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    img = c0 + (c1 - c0) * ramp[..., None]
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def draw_sample(label: int, size: int, rng: random.Random) -> Image.Image:
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    colour = tuple(rng.randrange(256) for _ in range(3))
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    width = max(2, round(size / 16))
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [r] * 4, angle), fill=colour)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, angle), fill=colour)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=2 * width)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [r, r * 0.4] * 5, angle), fill=colour)
    elif name in ("hstripes", "vstripes"):
        period = rng.randrange(size // 12 + 2, size // 6 + 3)
        for p in range(0, size, period):
            box = [0, p, size, p + period // 2] if name == "hstripes" else [p, 0, p + period // 2, size]
            draw.rectangle(box, fill=colour)
    elif name == "checker":
        period = rng.randrange(size // 10 + 2, size // 5 + 3)
        for y in range(0, size, period):
            for x in range(0, size, period):
                if (x // period + y // period) % 2 == 0:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=colour)
    elif name == "dots":
        dot = max(2, size // 24)
        for _ in range(rng.randrange(12, 30)):
            x, y = rng.uniform(0, size), rng.uniform(0, size)
            draw.ellipse([x - dot, y - dot, x + dot, y + dot], fill=colour)
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

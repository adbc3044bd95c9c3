"""The bundled sample dataset: small synthetic photos of three shapes, made here, not downloaded."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SAMPLE_CLASSES = ("circle", "square", "triangle")


def _draw(shape: str, rng: random.Random, size: int) -> Image.Image:
    background = tuple(rng.randint(90, 255) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(2, 5)):  # clutter so the task is not trivial
        x, y = rng.randint(0, size), rng.randint(0, size)
        draw.line(
            (x, y, x + rng.randint(-40, 40), y + rng.randint(-40, 40)),
            fill=tuple(rng.randint(0, 255) for _ in range(3)),
            width=rng.randint(1, 3),
        )
    colour = tuple(rng.randint(0, 160) for _ in range(3))
    half = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(half, size - half), rng.randint(half, size - half)
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))).rotate(
        rng.uniform(-25, 25), fillcolor=background
    )


def make_sample_dataset(out: str | Path = "data", per_class: int = 24, seed: int = 0, size: int = 96) -> Path:
    """data/<class>/<class>_NN.jpg for each class; the same files for the same seed."""
    out = Path(out)
    rng = random.Random(seed)
    for shape in SAMPLE_CLASSES:
        folder = out / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _draw(shape, rng, size).save(folder / f"{shape}_{i:02d}.jpg", quality=85)
    return out

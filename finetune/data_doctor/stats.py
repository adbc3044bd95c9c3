"""Image statistics from one small decode (header size, pixel spread, perceptual hash), and the problems they show."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data import IMBALANCE_RATIO, load_rgb, open_image, usable_cores
from .duplicates import phash
from .records import Record

FLAT_STD = 4.0  # grayscale standard deviation (0-255) under which an image is near-constant
TINY_SIDE = 32  # pixels: a shorter side than this is upsampled more than 7x for a 224 crop
ASPECT_LIMIT = 4.0  # long side / short side: the centre crop then throws most of the picture away
STATS_SIZE = 64  # decode size for the hash and pixel statistics (JPEGs decode at reduced scale)


@dataclass
class ImageStats:
    width: int
    height: int
    std: float  # grayscale pixel spread, 0..255
    phash: int


def image_stats(path: Path) -> ImageStats | None:
    try:
        with open_image(path) as header:
            width, height = header.size
        image = load_rgb(path, STATS_SIZE)
    except Exception:  # noqa: BLE001 - the scan decoded it; a file changed since is left out, not fatal
        return None
    small = image.convert("L")
    small.thumbnail((STATS_SIZE * 2, STATS_SIZE * 2))
    return ImageStats(width, height, float(np.asarray(small, dtype=np.float32).std()), phash(image))


def stats_all(root: Path, records: list[Record]) -> list[ImageStats | None]:
    with ThreadPoolExecutor(max_workers=min(16, usable_cores() * 2)) as pool:  # PIL releases the GIL
        return list(pool.map(lambda r: image_stats(root / r.path), records, chunksize=16))


def other_issues(
    records: list[Record], stats: list[ImageStats | None], classes: list[str], skipped: list[tuple[str, str]]
) -> list[dict]:
    """Unreadable, near-constant, tiny and extremely elongated images, and classes much smaller than the rest."""
    issues = [
        {"path": rel, "split": None, "class": None, "problem": "unreadable", "detail": reason}
        for rel, reason in skipped
    ]
    for record, stat in zip(records, stats, strict=True):
        if stat is None:
            continue
        where = {"path": record.path, "split": record.split, "class": classes[record.label]}
        short, long = min(stat.width, stat.height), max(stat.width, stat.height)
        if stat.std < FLAT_STD:
            issues.append({**where, "problem": "near-constant", "detail": f"pixel standard deviation {stat.std:.1f}"})
        if short < TINY_SIDE:
            issues.append({**where, "problem": "tiny", "detail": f"{stat.width}x{stat.height} px"})
        if long / max(1, short) > ASPECT_LIMIT:
            issues.append(
                {
                    **where,
                    "problem": "aspect ratio",
                    "detail": f"{stat.width}x{stat.height} px ({long / max(1, short):.1f}:1)",
                }
            )
    counts = Counter(r.label for r in records)
    for label, name in enumerate(classes):
        others = [counts.get(i, 0) for i in range(len(classes)) if i != label]
        typical = float(np.median(others)) if others else 0.0
        if counts.get(label, 0) * IMBALANCE_RATIO <= typical:
            count = counts.get(label, 0)
            issues.append(
                {
                    "path": None,
                    "split": None,
                    "class": name,
                    "problem": "small class",
                    "detail": f"{count} image{'' if count == 1 else 's'}; the other classes have "
                    f"{typical:.0f} (median)",
                }
            )
    return issues

"""Shared fixtures: small generated datasets and paths to the real ones in ../shared/datasets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (to prove a folder was not changed)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def make_image(path: Path, colour=(200, 30, 30), size=(40, 32), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def make_class_folders(root: Path, classes=("cats", "dogs"), per_class=6, size=(40, 32)) -> Path:
    """root/<class>/img_N.png with a distinct colour per class (learnable in a few steps)."""
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40), (160, 40, 200)]
    for c, name in enumerate(classes):
        for i in range(per_class):
            shade = tuple(max(0, min(255, v + 6 * i)) for v in palette[c % len(palette)])
            make_image(root / name / f"img_{i}.png", shade, size)
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_class_folders(tmp_path / "tiny")


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The bundled sample dataset (data/ in the repo)."""
    return REPO / "data"

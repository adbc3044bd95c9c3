"""The feature extractor: a run's fine-tuned model, or an architecture with ImageNet, file or random weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import FinetuneError, default_of
from ..data import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from ..rundir import RunInfo


@dataclass
class Backbone:
    module: nn.Module  # images [N, 3, S, S] -> pooled features [N, D]
    arch: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: str  # what the features depend on: keys the feature cache
    pretrained: bool  # features mean something before training (needed for embedding duplicates)
    description: str


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def read_run(run: str | Path) -> tuple[Path, RunInfo]:
    from ..rundir import RunDir

    run_dir = RunDir(Path(run).expanduser())
    return run_dir.model, run_dir.require_trained()


def load_backbone(
    run: str | Path | None = None,
    arch: str = default_of("arch"),
    weights: str = "imagenet",
    image_size: int | None = None,
) -> Backbone:
    """The feature extractor: a run's fine-tuned model (its arch, size and normalisation from run.json),
    else `arch` with `weights` ("imagenet", "none" or a .pth state_dict)."""
    from ..architectures import imagenet_version
    from ..model import build_model, imagenet_weights, split_model

    if run is not None:
        model_path, info = read_run(run)
        arch, size = info["arch"], int(image_size or info.get("image_size", 224))
        model = build_model(arch, len(info["classes"]), str(model_path))
        source = (info.get("config") or {}).get("weights", "imagenet")
        backbone_of = dict(
            identity=f"run:{_file_identity(model_path)}",
            pretrained=source != "none",
            description=f"{arch} fine-tuned in {Path(run).expanduser()}",
        )
        mean, std = tuple(info.get("mean", IMAGENET_MEAN)), tuple(info.get("std", IMAGENET_STD))
    else:
        size = int(image_size or 224)
        if weights in ("none", "", None):
            # seeded, so that random features are the same every run (and can be cached)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_model(arch, 2, "none")
            backbone_of = dict(
                identity=f"{arch}:none:seed0:torch{torch.__version__}",
                pretrained=False,
                description=f"{arch} with random weights (no pretraining)",
            )
        else:
            model = build_model(arch, 2, weights)
            named = f"ImageNet {imagenet_version(weights)}" if imagenet_version(weights) else weights
            if imagenet_version(weights):
                identity = f"{arch}:imagenet:{imagenet_weights(arch, weights).enum}"
            else:
                identity = f"{arch}:file:{_file_identity(Path(weights).expanduser())}"
            backbone_of = dict(
                identity=identity,
                pretrained=True,
                description=f"{arch} with {named} weights",
            )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if size < 32:
        raise FinetuneError(f"image size {size} is too small for a ResNet (at least 32)")
    frozen, _ = split_model(model, "head")
    return Backbone(module=frozen, arch=arch, image_size=size, mean=tuple(mean), std=tuple(std), **backbone_of)

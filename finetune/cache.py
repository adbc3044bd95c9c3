"""Where training inputs come from: streamed images, or caches of work that need not be repeated.

A pipeline gives the training loop two datasets of (inputs, label) and two functions that turn a
batch of inputs on the device into what the trainable part takes: for streamed images that means
running the frozen part under no_grad; for cached frozen features, nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import TrainConfig
from .data import DatasetScan, ImageListDataset, eval_transform, resize_size, train_transform


@dataclass
class Pipeline:
    train: Dataset
    val: Dataset
    workers: int
    description: str
    prepare_train: Callable[[torch.Tensor], torch.Tensor]
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    set_epoch: Callable[[int], None] = lambda epoch: None


def frozen_runner(frozen: nn.Module, memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """Images on the device -> what the trainable part takes (frozen features, or the images)."""
    runs_frozen = not isinstance(frozen, nn.Identity)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        if memory_format == torch.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if not runs_frozen:
            return images
        with torch.no_grad():
            return frozen(images)

    return prepare


def streaming_pipeline(cfg: TrainConfig, scan: DatasetScan, frozen: nn.Module, memory_format,
                       workers: int) -> Pipeline:
    """Decode and augment every image every epoch; the frozen part runs on every batch."""
    # JPEG draft decoding: RandomResizedCrop may zoom in, so keep detail up to twice the crop size.
    train_set = ImageListDataset(scan.root, scan.train, train_transform(cfg.image_size), min_size=cfg.image_size * 2)
    val_set = ImageListDataset(scan.root, scan.val, eval_transform(cfg.image_size), min_size=resize_size(cfg.image_size))
    prepare = frozen_runner(frozen, memory_format)
    return Pipeline(train_set, val_set, workers, "streamed images (decoded every epoch)", prepare, prepare)


def build_pipeline(cfg: TrainConfig, scan: DatasetScan, frozen: nn.Module, device: torch.device, amp_dtype,
                   memory_format, workers: int, log: Callable[[str], None]) -> Pipeline:
    pipeline = streaming_pipeline(cfg, scan, frozen, memory_format, workers)
    log(f"data pipeline: {pipeline.description}")
    return pipeline

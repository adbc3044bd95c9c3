"""Training augmentation beyond the crop and flip (`--augment`, `--mixup`, `--cutmix`), placed where each
part is cheapest and waits for nothing:

    light    RandomResizedCrop and a horizontal flip (what every pipeline does; the default)
    default  and a little colour jitter: brightness, contrast and saturation, each by a factor drawn
             per image in [1 - JITTER, 1 + JITTER], batched on the device (factors drawn there: no copy
             from the host, no sync)
    strong   and TrivialAugmentWide, per image in the DataLoader workers (as timm runs it: its
             geometric ops would copy a matrix to the device per image), then random erasing,
             batched on the device

A cache of fixed views cannot hold `strong` (each epoch needs new draws), so `head` and `last` stream
with it; `all` keeps its pixel cache (the workers augment each epoch's crops). For `head` and `last`,
`default` jitters the random views of the feature cache (views 2 and up: --cache-views 3 or more).

MixUp and CutMix (torchvision's v2 transforms) mix whole batches on the device, after the frozen part
(`last`: the cached layer3 maps, manifold mixing) and before the trainable one; the loss then takes
the mixed soft targets. Not for `head`, whose pooled vectors have nothing left to cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torchvision.transforms import v2

from .config import AUGMENTS
from .data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AUGMENTS", "batch_mixing", "colour_jitter", "describe", "random_erasing", "training_input"]
JITTER = 0.2
ERASING_P, ERASING_SCALE, ERASING_RATIO = 0.25, (0.02, 0.33), (0.3, 3.3)  # v2.RandomErasing's, p as timm's


def worker_transforms(augment: str) -> list:
    """What the workers add after the crop and flip (on a PIL image or a uint8 tensor)."""
    return [v2.TrivialAugmentWide()] if augment == "strong" else []


def _grey(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def colour_jitter(images: torch.Tensor) -> torch.Tensor:
    """float [B, 3, H, W] in 0..1: brightness, contrast and saturation of each image by its own factors."""
    factors = torch.empty((3, images.shape[0], 1, 1, 1), device=images.device).uniform_(1 - JITTER, 1 + JITTER)
    images = images * factors[0]
    mean = _grey(images).mean((1, 2, 3), keepdim=True)
    images = (images - mean) * factors[1] + mean
    grey = _grey(images)
    return ((images - grey) * factors[2] + grey).clamp_(0, 1)


def random_erasing(images: torch.Tensor) -> torch.Tensor:
    """A normalised batch with a box of each image set to 0 (the mean) with probability ERASING_P: the
    boxes drawn on the device, as v2.RandomErasing draws one (its area and aspect ratio)."""
    b, _, h, w = images.shape
    device = images.device
    area = torch.empty(b, device=device).uniform_(*ERASING_SCALE) * (h * w)
    ratio = torch.empty(b, device=device).uniform_(math.log(ERASING_RATIO[0]), math.log(ERASING_RATIO[1])).exp_()
    box_h, box_w = (area * ratio).sqrt().clamp(max=h), (area / ratio).sqrt().clamp(max=w)
    top = torch.rand(b, device=device) * (h - box_h)
    left = torch.rand(b, device=device) * (w - box_w)
    ys = torch.arange(h, device=device).view(1, h, 1)
    xs = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (ys >= top.view(b, 1, 1))
        & (ys < (top + box_h).view(b, 1, 1))
        & (xs >= left.view(b, 1, 1))
        & (xs < (left + box_w).view(b, 1, 1))
    )
    chosen = (torch.rand(b, device=device) < ERASING_P).view(b, 1, 1)
    return images.masked_fill((inside & chosen).unsqueeze(1), 0.0)


def training_input(augment: str, memory_format, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Callable:
    """A batch on the device (uint8, or float in 0..1) -> the model's normalised input, with the
    augmentation's device part; the evaluation input stays data.to_model_input."""

    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = v2.functional.to_dtype(images, torch.float32, scale=True)
        if augment == "default":
            images = colour_jitter(images)
        images = v2.functional.normalize(images, list(mean), list(std))
        if augment == "strong":
            images = random_erasing(images)
        if memory_format == torch.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    return prepare


def batch_mixing(mixup: float, cutmix: float, num_classes: int) -> Callable | None:
    """(inputs, labels) -> (mixed inputs, soft targets [B, classes]): MixUp, CutMix, or either at random."""
    chosen = [v2.MixUp(alpha=mixup, num_classes=num_classes)] if mixup > 0 else []
    chosen += [v2.CutMix(alpha=cutmix, num_classes=num_classes)] if cutmix > 0 else []
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def describe(augment: str, mixup: float, cutmix: float) -> str:
    """The augmentation in words, for the log, the start event and run.json."""
    words = {
        "light": "RandomResizedCrop and flip",
        "default": "RandomResizedCrop, flip and colour jitter (on the device)",
        "strong": "RandomResizedCrop, flip, TrivialAugmentWide (in the workers) and random erasing (on the device)",
    }[augment]
    mixed = [f"MixUp (alpha {mixup:g})"] * (mixup > 0) + [f"CutMix (alpha {cutmix:g})"] * (cutmix > 0)
    return words + (f"; {' or '.join(mixed)} on each batch" if mixed else "")

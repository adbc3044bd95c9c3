"""Where training inputs come from: streamed images, or caches of work that need not be repeated.

A pipeline gives the training loop two datasets of (inputs, label) and two functions that turn a
batch of inputs on the device into what the trainable part takes: for streamed images that means
running the frozen part under no_grad; for cached frozen features, nothing.

Which pipeline (chosen by `build_pipeline`, logged, and shown in the run's start event):

* ``head`` / ``last`` -> **cached frozen features**. The frozen front of the network runs once per
  image: ``head`` caches the pooled feature vector (512/2048 floats, kept in float32: tiny, and
  exact), ``last`` caches the output of layer3 (e.g. 1024x14x14 for resnet50 at 224) in float16.
  Augmentation for the training set: ``cfg.cache_views`` views are cached per image and each
  epoch picks one view per image at random (seeded by seed and epoch). View 0 is the eval-style
  view (resize, centre crop), view 1 its horizontal flip, views 2.. are RandomResizedCrop(+flip)
  views drawn with a generator seeded by (seed, image index, view), so they do not depend on the
  number of processes or DataLoader workers. Validation features are cached once (the
  deterministic eval transform), so per-epoch validation only runs the trainable part. The cache
  lives on the GPU when it fits in half its free memory (a batch is then one gather there), else
  in host memory, gathered into pinned memory in one pass.
* ``all`` -> **decoded-pixel cache**. Every image is decoded and resized once (short side
  ``resize_size(image_size)``, uint8) into memory, or into a memory-mapped temporary file when it
  exceeds the memory budget. Each epoch still augments: the loader draws each image's
  RandomResizedCrop box and flip and slices the box out (`RandomCrops`, `collate_crops`: no
  resampling on the CPU); the device resizes, flips, scales and normalises the whole batch in
  ``prepare_train`` (`resize_crops`: one roi_align). Validation images are cached as their eval
  centre crops.
* Otherwise (``cache="off"``, a cache larger than the budget, no disk room) -> **streamed images**,
  decoded and augmented every epoch, the frozen part run on every batch. On CUDA the training JPEGs
  cross as their files' bytes and are decoded there with nvJPEG (``cfg.jpeg_decode``, decode.py);
  elsewhere PIL decodes them in the workers, at a reduced scale (draft) where the crop allows.

Every pipeline sends uint8 pixels across processes and the bus; the device scales and normalises
them (`data.to_model_input`), as timm's fast_collate and prefetcher do.

Several processes (torchrun): every rank caches only its own shard of the images (train padded so
that every rank has the same number of batches), and the loader must not shard it again
(``Pipeline.sharded``).
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .augment import JITTER, training_input, worker_transforms
from .config import TrainConfig
from .data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetScan,
    ImageListDataset,
    eval_pixels,
    load_rgb,
    open_image,
    resize_size,
    to_model_input,
    train_pixels,
)
from .decode import DeviceDecoded, EncodedImages, collate_encoded, device_decode_problem
from .device import Distributed, decode_threads, gpu_free_bytes, non_blocking, pin_memory, release_gpu_memory

GiB = 1024**3


class DoesNotFit(Exception):
    """A cache would exceed the memory budget (and the disk): stream instead, for this reason."""


@dataclass
class Pipeline:
    train: Dataset
    val: Dataset
    workers: int
    description: str
    prepare_train: Callable[[Any], torch.Tensor]  # the loader's inputs (a tensor, or a CropBatch) on the device
    prepare_eval: Callable[[torch.Tensor], torch.Tensor]
    set_epoch: Callable[[int], None] = lambda epoch: None
    # True: train/val already hold only this rank's shard (the loader must not shard them again)
    sharded: bool = False
    # True: `val` is every validation image in scan order with the eval transform, so the final
    # evaluation may reuse it (through prepare_eval and the trainable part) instead of decoding again
    val_covers_all: bool = False
    kind: str = "stream"  # "stream", "features" or "pixels" (for tests and the benchmark)
    # how the training loader makes a batch of `train`'s samples (None: torch's default_collate)
    collate_train: Callable | None = None
    # True: the datasets also hand out whole batches (dataset[list of positions]), pinned or on the device
    batched: bool = False
    # what the training loader's batches go through before the loop (decode.DeviceDecoded), or None
    feed_train: Callable[[Any], Any] | None = None


# ---------------------------------------------------------------------------------------------
# Memory budget


def available_memory_bytes() -> int:
    """Memory this machine can still give: MemAvailable from /proc/meminfo (Linux); on macOS (no
    /proc) the free and inactive pages of vm_stat, as psutil counts them, or half of hw.memsize; else
    free physical pages; else psutil; else 4 GiB."""
    found = _darwin_available_memory() if platform.system() == "Darwin" else _meminfo_available()
    if found:
        return found
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no way to know: assume a modest machine
        return 4 * GiB


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _darwin_available_memory() -> int | None:
    """(free + inactive pages) x page size from vm_stat; else half the physical memory (hw.memsize)."""
    report = _command_output("/usr/bin/vm_stat")
    page = re.search(r"page size of (\d+) bytes", report)
    pages = dict(re.findall(r"^Pages (free|inactive):\s+(\d+)\.?\s*$", report, re.MULTILINE))
    if page and len(pages) == 2:
        return (int(pages["free"]) + int(pages["inactive"])) * int(page[1])
    total = _command_output("/usr/sbin/sysctl", "-n", "hw.memsize").strip()
    return int(total) // 2 if total.isdigit() else None


def _command_output(*command: str) -> str:
    """A system tool's output, "" when it is missing, fails or takes over 2 seconds."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def memory_budget_bytes(cfg: TrainConfig, local_processes: int = 1) -> int:
    """The cache budget of one process: cfg.memory_budget_gb (GiB), or half the available RAM;
    shared by the `local_processes` training processes on this machine."""
    if cfg.memory_budget_gb is not None:
        budget = cfg.memory_budget_gb * GiB
    else:
        budget = 0.5 * available_memory_bytes()
    return int(max(0.0, budget) / max(1, local_processes))


def _gb(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / 1024**2:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Shards (several processes)


@dataclass
class Shard:
    rank: int = 0
    world_size: int = 1

    def train_indices(self, n: int) -> list[int]:
        """This rank's training images, padded (wrapping around) so every rank has ceil(n / world)."""
        if self.world_size == 1:
            return list(range(n))
        per_rank = math.ceil(n / self.world_size)
        return [(self.rank + self.world_size * k) % n for k in range(per_rank)]

    def val_indices(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world_size))


# ---------------------------------------------------------------------------------------------
# Streaming (no cache)


def frozen_runner(
    frozen: nn.Module, memory_format, to_input: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images on the device -> what the trainable part takes (frozen features, or the images).
    `to_input`: the training's (augment.training_input), else the evaluation's (data.to_model_input)."""
    runs_frozen = not isinstance(frozen, nn.Identity)

    def prepare(images: torch.Tensor) -> torch.Tensor:
        images = to_input(images) if to_input is not None else to_model_input(images, memory_format)
        if not runs_frozen:
            return images
        with torch.no_grad():
            return frozen(images)

    return prepare


def streaming_pipeline(
    cfg: TrainConfig,
    scan: DatasetScan,
    frozen: nn.Module,
    device: torch.device,
    memory_format,
    workers: int,
    log: Callable[[str], None],
    reason: str = "",
) -> Pipeline:
    """Decode and augment every image every epoch; the frozen part runs on every batch. Workers send
    uint8 crops (3*S*S bytes an image, a quarter of float32's shared memory and bus traffic), or the
    JPEG files' bytes to be decoded on the device (decode.py); scaling and normalising happen batched on
    the device, as in timm's fast_collate and prefetcher."""
    val_set = ImageListDataset(scan.root, scan.val, eval_pixels(cfg.image_size), min_size=resize_size(cfg.image_size))
    prepare = frozen_runner(frozen, memory_format)
    prepare_train = frozen_runner(frozen, memory_format, training_input(cfg.augment, memory_format))
    on_device = decodes_on_device(cfg, device, log)
    parts = ["decoded every epoch", "uint8 to the device"]
    if on_device:
        parts[0] += ", JPEGs on the GPU (nvJPEG)" if device.type == "cuda" else ", JPEGs in the training process"
    if not isinstance(frozen, nn.Identity):
        parts.append("frozen layers run every batch")
    description = f"streamed images ({', '.join(parts)})" + (f": {reason}" if reason else "")
    if on_device:
        size = cfg.image_size
        return Pipeline(
            EncodedImages(scan.root, scan.train, size),
            val_set,
            workers,
            description,
            prepare_train,
            prepare,
            collate_train=collate_encoded,
            feed_train=lambda loader: DeviceDecoded(loader, size, device),
        )
    # JPEG draft decoding: RandomResizedCrop may zoom in, so keep detail up to twice the crop size.
    train_transform = train_pixels(cfg.image_size, worker_transforms(cfg.augment))
    train_set = ImageListDataset(scan.root, scan.train, train_transform, min_size=cfg.image_size * 2)
    return Pipeline(train_set, val_set, workers, description, prepare_train, prepare)


def decodes_on_device(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> bool:
    """Whether streamed training JPEGs are decoded in the training process (cfg.jpeg_decode): `auto`
    does on CUDA when torchvision's nvJPEG decoder works there, and says why not when it does not."""
    if cfg.augment == "strong":  # TrivialAugmentWide runs in the workers, on what they decode
        if cfg.jpeg_decode == "device" or device.type == "cuda":
            log("JPEGs are decoded by PIL in the workers: strong augmentation (TrivialAugmentWide) runs there")
        return False
    if cfg.jpeg_decode != "auto":
        return cfg.jpeg_decode == "device"
    if device.type != "cuda":
        return False
    problem = device_decode_problem(device)
    if problem:
        log(f"JPEGs are decoded by PIL in the workers: {problem}")
    return problem is None


# ---------------------------------------------------------------------------------------------
# Views of an image for the frozen-feature cache


def view_seed(seed: int, index: int, view: int) -> int:
    return (seed * 1_000_003 + index * 1_009 + view) % (2**63 - 1)


class ImageViews(Dataset):
    """(views [V, 3, S, S] uint8, label, global index) of one image, decoded once; `mean` and `std` are
    what compute_features normalises them with.

    View 0: the eval transform (resize to resize_size, centre crop). View 1: its horizontal flip.
    Views 2..V-1: RandomResizedCrop + random flip, seeded per (seed, image index, view).
    """

    def __init__(
        self,
        root: str | Path,
        items: list[tuple[str, int]],
        indices: list[int],
        image_size: int,
        views: int,
        seed: int,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        jitter: bool = False,
    ):
        self.root, self.items, self.indices = Path(root), items, indices
        self.image_size, self.views, self.seed = image_size, views, seed
        self.min_size = resize_size(image_size) if views <= 2 else image_size * 2
        self.resize = v2.Resize(resize_size(image_size), antialias=True)
        self.crop = v2.CenterCrop(image_size)
        jittered = [v2.ColorJitter(JITTER, JITTER, JITTER)] if jitter else []  # --augment default
        self.random_crop = v2.Compose(
            [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *jittered]
        )
        self.mean, self.std = list(mean), list(std)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int):
        index = self.indices[position]
        rel, label = self.items[index]
        image = TF.to_image(load_rgb(self.root / rel, self.min_size))
        centre = self.crop(self.resize(image))
        views = [centre]
        if self.views >= 2:
            views.append(centre.flip(-1))
        for view in range(2, self.views):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, index, view))
                views.append(self.random_crop(image))
        # uint8 across processes and the bus (a quarter of float32); compute_features normalises on the device
        return torch.stack(views), label, index


class FeatureCache(Dataset):
    """Cached frozen features [V, N, ...] and labels; each epoch one view per image (seeded).

    The training loop takes whole batches (a list of positions: one gather by index): on the GPU when the
    features live there, else from host memory into a pinned buffer that the copy to the GPU reads
    asynchronously. Labels and the view choice live beside the features."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, seed: int, indices: list[int]):
        self.features, self.seed = features, seed
        self.labels = labels.to(features.device)
        self.indices = indices  # global image index of each row (seeds the view choice)
        self.choice = torch.zeros(len(labels), dtype=torch.long, device=features.device)
        self.pin = False  # set by the pipeline: pinned batches for a copy to a CUDA GPU

    @property
    def num_views(self) -> int:
        return self.features.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Pick this epoch's view of every image; the same on every rank and for every run with this seed."""
        if self.num_views == 1:
            return
        generator = torch.Generator().manual_seed(self.seed * 7_919 + epoch)
        every = torch.randint(self.num_views, (max(self.indices) + 1,), generator=generator)
        self.choice = every[torch.as_tensor(self.indices)].to(self.features.device)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int | list[int]):
        """One (features, label); or, given a list of positions, the whole batch in one gather (a
        loader with batch_size=None and a batch sampler: training.make_loader(batched=True))."""
        if not isinstance(position, list):
            return self.features[self.choice[position], position], self.labels[position]
        index = torch.tensor(position, dtype=torch.long)
        on_device = self.features.device.type != "cpu"
        if on_device:  # from pinned memory: a pageable copy would make the host wait for the GPU
            index = index.pin_memory().to(self.features.device, non_blocking=True)
        rows = self.choice[index] * self.features.shape[1] + index
        flat = self.features.view(-1, *self.features.shape[2:])
        if on_device:
            return flat.index_select(0, rows), self.labels.index_select(0, index)
        batch = torch.empty((len(position), *flat.shape[1:]), dtype=flat.dtype, pin_memory=self.pin)
        labels = torch.empty(len(position), dtype=torch.long, pin_memory=self.pin)
        return torch.index_select(flat, 0, rows, out=batch), torch.index_select(self.labels, 0, index, out=labels)


class Progress:
    """A log line every 10 s while the work lasts, and one when it is done (quick work: just that one)."""

    def __init__(self, log: Callable[[str], None], what: str, total: int):
        self.log, self.what, self.total = log, what, total
        self.start = self.last_time = time.perf_counter()

    def update(self, done: int) -> None:
        now = time.perf_counter()
        if done >= self.total or now - self.last_time >= 10:
            rate = done / max(now - self.start, 1e-9)
            eta = (self.total - done) / rate if rate > 0 else 0.0
            self.log(
                f"{self.what}: {done}/{self.total} images ({100 * done // max(1, self.total)}%, "
                f"{rate:.1f} images/s{f', about {eta:.0f} s left' if done < self.total else ''})"
            )
            self.last_time = now


@torch.no_grad()  # not inference_mode: cached tensors must be usable as inputs of trainable layers later
def compute_features(
    frozen: nn.Module,
    source: ImageViews,
    shape: tuple[int, ...],
    store_dtype: torch.dtype,
    device: torch.device,
    amp_dtype,
    memory_format,
    batch_size: int,
    workers: int,
    log: Callable[[str], None],
    what: str,
    store_device: torch.device | None = None,
) -> torch.Tensor:
    """Run the frozen part once over every view of every image: features [V, N, *shape] on
    `store_device` (the CPU unless given). `batch_size` images a forward pass (the user's batch), halved
    while the device runs out of memory."""
    views, count = source.views, len(source)
    features = torch.empty((views, count, *shape), dtype=store_dtype, device=store_device or torch.device("cpu"))
    loader = DataLoader(
        source,
        batch_size=max(1, batch_size // views),
        num_workers=workers,
        pin_memory=pin_memory(device),
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    progress = Progress(log, what, count)
    forward = _halving_forward(frozen, device, amp_dtype, memory_format, source, log)
    done = 0
    frozen.eval()
    for images, _, _ in loader:
        b = images.shape[0]
        images = images.view(b * views, *images.shape[2:]).to(device, non_blocking=non_blocking(device))
        out = forward(images).float().view(b, views, *shape).transpose(0, 1)
        features[:, done : done + b] = out.to(features.device, dtype=store_dtype)
        done += b
        progress.update(done)
    return features


def _halving_forward(
    frozen: nn.Module, device: torch.device, amp_dtype, memory_format, source: ImageViews, log: Callable[[str], None]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 images on the device -> the frozen part's output, in chunks that start at the whole batch and
    halve (for the rest of the pass) whenever the device runs out of memory."""
    chunk: int | None = None

    def forward(images: torch.Tensor) -> torch.Tensor:
        nonlocal chunk
        while True:
            size = min(chunk or images.shape[0], images.shape[0])
            try:
                outputs = []
                for start in range(0, images.shape[0], size):
                    part = to_model_input(images[start : start + size], memory_format, source.mean, source.std)
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        outputs.append(frozen(part))
                return torch.cat(outputs)
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                chunk = size // 2
            # after the except block: its traceback no longer holds the failed pass's tensors
            outputs = []
            release_gpu_memory()
            log(f"out of memory on the {device.type} at {size} images a pass: caching with {chunk}")

    return forward


@torch.no_grad()
def frozen_output_shape(frozen: nn.Module, image_size: int, device: torch.device) -> tuple[int, ...]:
    frozen.eval()
    return tuple(frozen(torch.zeros(1, 3, image_size, image_size, device=device)).shape[1:])


def feature_pipeline(
    cfg: TrainConfig,
    scan: DatasetScan,
    frozen: nn.Module,
    device: torch.device,
    amp_dtype,
    memory_format,
    workers: int,
    log: Callable[[str], None],
    budget: int,
    shard: Shard,
    agree: Callable[[bool], bool],
) -> Pipeline:
    """Cached frozen features; DoesNotFit (with the reason) when they would not fit."""
    shape = frozen_output_shape(frozen, cfg.image_size, device)
    # head: pooled vectors, tiny -> float32 (exact); last: layer3 maps -> float16 (half the memory)
    store_dtype = torch.float32 if len(shape) == 1 else torch.float16
    per_image = math.prod(shape) * torch.tensor([], dtype=store_dtype).element_size()
    train_idx, val_idx = shard.train_indices(len(scan.train)), shard.val_indices(len(scan.val))
    need = per_image * (cfg.cache_views * len(train_idx) + len(val_idx))
    what = f"{'x'.join(map(str, shape))} {str(store_dtype).removeprefix('torch.')}"
    store_device = feature_store_device(need, device, agree)
    if store_device.type == "cpu" and not agree(need <= budget):
        raise DoesNotFit(
            f"frozen features ({what}) need {_gb(need)} per process, over the memory budget of {_gb(budget)}"
        )
    where = f"the {device.type}'s memory" if store_device != torch.device("cpu") else f"a {_gb(budget)} budget"
    views_text = _views_text(cfg.cache_views)
    log(
        f"caching frozen features once: {what} per view, {cfg.cache_views} view(s) ({views_text}) of "
        f"{len(train_idx)} training and 1 of {len(val_idx)} validation images, {_gb(need)} in {where}"
    )
    _say_unjittered(cfg, per_image * len(train_idx), log)
    started = time.perf_counter()
    common = dict(shape=shape, store_dtype=store_dtype, device=device, amp_dtype=amp_dtype, log=log)
    common.update(memory_format=memory_format, batch_size=cfg.batch_size, workers=workers, store_device=store_device)
    train_set, val_set = _cache_features(cfg, scan, frozen, train_idx, val_idx, common)
    log(f"feature cache ready in {time.perf_counter() - started:.1f} s")
    prepare = _feature_preparer(memory_format)
    return Pipeline(
        train_set,
        val_set,
        0,
        _feature_description(cfg, shape, what, views_text, need, where),
        prepare,
        prepare,
        set_epoch=train_set.set_epoch,
        sharded=shard.world_size > 1,
        val_covers_all=shard.world_size == 1,
        kind="features",
        batched=True,
    )


def _say_unjittered(cfg: TrainConfig, bytes_per_view: int, log: Callable[[str], None]) -> None:
    """--augment default with no random view cached: the jitter would have nowhere to go."""
    if cfg.augment == "default" and cfg.cache_views <= 2:
        log(
            f"--augment default jitters the cached random views, and {cfg.cache_views} view(s) are only the "
            f"centre and its flip: with --cache-views 3 or more it applies ({_gb(bytes_per_view)} a view)"
        )


# The share of a GPU's free memory the feature cache may take: the rest is for training the trainable
# part (layer4's activations at the user's batch, its gradients and AdamW's moments) beside it.
GPU_FEATURE_SHARE = 0.5


def feature_store_device(need: int, device: torch.device, agree: Callable[[bool], bool]) -> torch.device:
    """Where the cached features live: on the GPU when they fit in GPU_FEATURE_SHARE of its free memory
    (every batch is then gathered there, by index, with no copy over the bus), else in host memory."""
    if device.type != "cuda":
        return torch.device("cpu")
    free = gpu_free_bytes(device)  # memory this process's allocator holds unused (a broadcast's) counts too
    return device if agree(need <= GPU_FEATURE_SHARE * free) else torch.device("cpu")


def _views_text(cache_views: int) -> str:
    """The cached views of each training image, in words."""
    return {1: "centre", 2: "centre + flip"}.get(cache_views, f"centre + flip + {cache_views - 2} random crops")


def _cache_features(
    cfg: TrainConfig,
    scan: DatasetScan,
    frozen: nn.Module,
    train_idx: list[int],
    val_idx: list[int],
    common: dict,
) -> tuple[FeatureCache, FeatureCache]:
    """The frozen features of this process's training views and validation images, with their labels."""
    jitter = cfg.augment == "default"
    train_source = ImageViews(
        scan.root, scan.train, train_idx, cfg.image_size, cfg.cache_views, cfg.seed, jitter=jitter
    )
    val_source = ImageViews(scan.root, scan.val, val_idx, cfg.image_size, 1, cfg.seed)
    train_features = compute_features(frozen, train_source, what="caching training features", **common)
    val_features = compute_features(frozen, val_source, what="caching validation features", **common)
    train_labels = torch.tensor([scan.train[i][1] for i in train_idx], dtype=torch.long)
    val_labels = torch.tensor([scan.val[i][1] for i in val_idx], dtype=torch.long)
    train_set = FeatureCache(train_features, train_labels, cfg.seed, train_idx)
    val_set = FeatureCache(val_features, val_labels, cfg.seed, val_idx)
    train_set.pin = val_set.pin = pin_memory(common["device"])
    return train_set, val_set


def _feature_preparer(memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """Cached features as the head expects them: float32, channels-last maps where asked."""

    def prepare(features: torch.Tensor) -> torch.Tensor:
        features = features.float() if features.dtype != torch.float32 else features
        if memory_format == torch.channels_last and features.dim() == 4:
            features = features.contiguous(memory_format=torch.channels_last)
        return features

    return prepare


def _feature_description(cfg: TrainConfig, shape, what: str, views_text: str, need: int, where: str) -> str:
    """The feature pipeline, in words, for the run's log."""
    return (
        f"cached frozen features ({'pooled ' if len(shape) == 1 else 'layer3 output '}{what}, "
        f"{cfg.cache_views} view(s): {views_text}, one picked per image each epoch; {_gb(need)} in {where})"
    )


# ---------------------------------------------------------------------------------------------
# Decoded-pixel cache (strategy "all")


def _header_size(path: Path) -> tuple[int, int]:
    try:
        with open_image(path) as image:  # the header only; never a FIFO put there since the scan
            return image.size
    except Exception:  # noqa: BLE001 - decodable files were checked by the scan; assume a 4:3 photo
        return (4, 3)


class PixelStore:
    """uint8 images [3, h, w] of varying sizes, in memory or in a memory-mapped temporary file."""

    def __init__(self, on_disk: str | Path | None):
        """`on_disk`: the folder of the memory-mapped file (see pixel_folder), None: in memory. The file
        has no name (unlinked at once; O_TMPFILE on Linux): its space returns when the store is gone,
        even from a process that was killed, so a run stopped by the OOM killer leaves no gigabytes."""
        self.on_disk = on_disk is not None
        self.tensors: list[torch.Tensor] = []
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[int] = []
        self._array: np.memmap | None = None
        self._file = None
        if on_disk is not None:
            Path(on_disk).mkdir(parents=True, exist_ok=True)  # another node's runs folder may not exist yet
            # open across append() calls until close() maps it: no with-block fits
            self._file = tempfile.TemporaryFile(prefix=".finetune-pixels-", dir=on_disk)  # noqa: SIM115
        self._size = 0

    def append(self, image: torch.Tensor) -> None:
        image = image.contiguous()
        if self._file is not None:
            self.offsets.append(self._size)
            self.shapes.append(tuple(image.shape))
            self._file.write(image.numpy().tobytes())
            self._size += image.numel()
        else:
            self.tensors.append(image)

    def close(self) -> None:
        if self._file is not None:
            if not self._size:  # an empty file cannot be mapped
                self._file.write(b"\0")
            self._file.flush()
            self._array = np.memmap(self._file, dtype=np.uint8, mode="r", shape=(max(1, self._size),))
            self._file.close()  # the mapping keeps the unnamed file
            self._file = None

    def __len__(self) -> int:
        return len(self.tensors) if not self.on_disk else len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self._array is None:  # in memory (a store on disk maps its file in close())
            return self.tensors[index]
        c, h, w = self.shapes[index]
        start = self.offsets[index]
        return torch.from_numpy(np.array(self._array[start : start + c * h * w])).view(c, h, w)


class PixelCache(Dataset):
    """Cached uint8 pixels -> (uint8 [3, s, s], label): the validation centre crops, as stored."""

    def __init__(self, store, labels: list[int]):
        self.store, self.labels = store, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        return self.store[position], self.labels[position]


class CropBatch(NamedTuple):
    """A batch of training crops still to be resized: what crosses to the device for the pixel cache.

    pixels: uint8 [B, 3, H, W], crop k in pixels[k, :, :h, :w] (its last row and column repeated once
    beyond it, so that resampling at the edge sees no padding); sizes: int32 [B, 2] (h, w); flips: bool [B]."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    flips: torch.Tensor


class RandomCrops(Dataset):
    """Cached uint8 images -> (the RandomResizedCrop region, flip?, label), not yet resized: the box and
    the flip are drawn here (torch's RNG, as v2.RandomResizedCrop draws them); slicing costs nothing, and
    the resize, the expensive part, runs batched on the device (`resize_crops`)."""

    scale = (0.08, 1.0)
    ratio = (3 / 4, 4 / 3)

    def __init__(self, store, labels: list[int]):
        self.store, self.labels = store, labels
        self.extra: Callable[[torch.Tensor], torch.Tensor] | None = None  # augment strong: TrivialAugmentWide

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, position: int):
        image = self.store[position]
        top, left, h, w = T.RandomResizedCrop.get_params(image, list(self.scale), list(self.ratio))
        flip = bool(torch.rand(()) < 0.5)
        crop = image[:, top : top + h, left : left + w]
        return (self.extra(crop) if self.extra is not None else crop), flip, self.labels[position]


def collate_crops(samples: list[tuple[torch.Tensor, bool, int]]) -> tuple[CropBatch, torch.Tensor]:
    """Crops of different sizes -> one CropBatch (zero-padded to the largest) and the labels."""
    height = max(crop.shape[1] for crop, _, _ in samples) + 1
    width = max(crop.shape[2] for crop, _, _ in samples) + 1
    pixels = torch.zeros((len(samples), 3, height, width), dtype=torch.uint8)
    for k, (crop, _, _) in enumerate(samples):
        h, w = crop.shape[1:]
        pixels[k, :, :h, :w] = crop
        pixels[k, :, h, :w] = crop[:, -1]  # bilinear sampling near the edge blends with this, not with 0
        pixels[k, :, : h + 1, w] = pixels[k, :, : h + 1, w - 1]
    sizes = torch.tensor([crop.shape[1:] for crop, _, _ in samples], dtype=torch.int32)
    flips = torch.tensor([flip for _, flip, _ in samples], dtype=torch.bool)
    labels = torch.tensor([label for _, _, label in samples], dtype=torch.long)
    return CropBatch(pixels, sizes, flips), labels


def resize_crops(batch: CropBatch, size: int) -> torch.Tensor:
    """Every crop of the batch resized to size x size and flipped where drawn, in one kernel on the
    device: float32 in 0..255. roi_align with aligned=True samples at pixel centres as resize does,
    and its adaptive sampling grid (ceil(crop / size) points a pixel) averages like antialiasing;
    no host sync (the boxes are built on the device from the sizes)."""
    pixels = batch.pixels.float()
    b = pixels.shape[0]
    sizes = batch.sizes.to(torch.float32)
    zeros = torch.zeros(b, device=pixels.device)
    boxes = torch.stack(
        [torch.arange(b, device=pixels.device, dtype=torch.float32), zeros, zeros, sizes[:, 1], sizes[:, 0]], 1
    )
    crops = roi_align(pixels, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(batch.flips.view(-1, 1, 1, 1), crops.flip(-1), crops)


def decode_all(
    paths: list[Path],
    decode: Callable[[Path], torch.Tensor],
    sink: Callable[[torch.Tensor], object],
    log: Callable[[str], None],
    what: str,
) -> None:
    """Decode in parallel threads (PIL and torch release the GIL), keep the order."""
    threads = decode_threads()
    progress = Progress(log, what, len(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for done, image in enumerate(pool.map(decode, paths), start=1):
            sink(image)
            progress.update(done)


def pixel_pipeline(
    cfg: TrainConfig,
    scan: DatasetScan,
    device: torch.device,
    memory_format,
    workers: int,
    log: Callable[[str], None],
    budget: int,
    shard: Shard,
    agree: Callable[[bool], bool],
) -> Pipeline:
    """Images decoded and resized once (uint8); the augmentation still runs every epoch. DoesNotFit
    (with the reason) when they fit neither in the memory budget nor on the disk."""
    size, short = cfg.image_size, resize_size(cfg.image_size)
    root = Path(scan.root)
    train_idx, val_idx = shard.train_indices(len(scan.train)), shard.val_indices(len(scan.val))
    unique_train = sorted(set(train_idx))
    headers = [_header_size(root / scan.train[i][0]) for i in unique_train]
    need_train = sum(3 * short * math.ceil(short * max(w, h) / max(1, min(w, h))) for w, h in headers)
    need_val = 3 * size * size * len(val_idx)
    need = need_train + need_val
    on_disk = _pixels_on_disk(need_train, need_val, budget, agree, pixel_folder(cfg))
    where = (
        f"a memory-mapped file in {on_disk} (over the {_gb(budget)} memory budget)"
        if on_disk
        else f"memory ({_gb(budget)} budget)"
    )
    log(
        f"decoding images once: {len(unique_train)} training images at short side {short} and "
        f"{len(val_idx)} validation centre crops ({_gb(need)}) into {where}"
    )
    started = time.perf_counter()
    store, val_pixels = _decode_pixels(root, scan, unique_train, val_idx, size, on_disk, log)
    log(f"pixel cache ready in {time.perf_counter() - started:.1f} s")

    train_set, val_set = _pixel_sets(scan, store, val_pixels, unique_train, train_idx, val_idx)
    train_set.extra = v2.Compose(worker_transforms(cfg.augment)) if cfg.augment == "strong" else None
    prepare_train, scale = _device_transforms(size, memory_format, cfg.augment)
    # The loader only slices and pads (the resize runs on the device): the main process keeps up on
    # the CPU, where workers would compete with the model for the cores; on a GPU a few workers
    # prepare batches while it computes.
    loader_workers = min(workers, 4) if device.type == "cuda" else 0
    where = "a memory-mapped file" if on_disk else "memory"
    description = (
        f"decoded-pixel cache (uint8, short side {short}, in {where}, {_gb(need)} of a {_gb(budget)} "
        f"memory budget; RandomResizedCrop per epoch: box drawn by the loader, resize, flip and "
        f"normalise batched on the {device.type})"
    )
    return Pipeline(
        train_set,
        val_set,
        loader_workers,
        description,
        prepare_train,
        scale,
        collate_train=collate_crops,
        sharded=shard.world_size > 1,
        val_covers_all=shard.world_size == 1,
        kind="pixels",
    )


def _pixel_sets(
    scan: DatasetScan,
    store,
    val_pixels,
    unique_train: list[int],
    train_idx: list[int],
    val_idx: list[int],
) -> tuple[RandomCrops, PixelCache]:
    """This process's training images (random-resized-cropped each epoch) and validation crops."""
    position = {index: k for k, index in enumerate(unique_train)}
    train_set = RandomCrops(_ShardImages(store, position, train_idx), [scan.train[i][1] for i in train_idx])
    val_set = PixelCache(val_pixels, [scan.val[i][1] for i in val_idx])
    return train_set, val_set


def pixel_folder(cfg: TrainConfig) -> Path:
    """Where decoded pixels over the memory budget go: the runs folder, on a disk the user chose for
    large files, never the temporary folder (/tmp is RAM, tmpfs, on Fedora, Arch and Debian 13)."""
    return Path(cfg.runs_dir)


def _pixels_on_disk(
    need_train: int, need_val: int, budget: int, agree: Callable[[bool], bool], folder: Path
) -> Path | None:
    """The folder for the training pixels' memory-mapped file when they are over the memory budget, None
    when they fit in it; DoesNotFit when the disk has no room either (a folder in RAM has none). Every
    process must take the same path (or their batch counts differ and the collectives hang): `agree`
    settles each choice over all ranks, each of which measures its own disk."""
    need = need_train + need_val
    if agree(need <= budget):
        return None
    free, why = disk_room(folder)
    if not agree(need_train <= 0.8 * free and need_val <= budget):
        raise DoesNotFit(f"decoded pixels need {_gb(need)}, over the memory budget of {_gb(budget)} and {why}")
    return folder


def disk_room(folder: Path, mounts: str = "/proc/mounts") -> tuple[int, str]:
    """(free bytes, what limits them) for a file in `folder` (or the part of it that exists): none on
    a file system in RAM (tmpfs, ramfs), whose files would take the memory the budget keeps free."""
    existing = Path(os.path.realpath(folder))
    while not existing.is_dir() and existing != existing.parent:
        existing = existing.parent
    kind = filesystem_type(existing, mounts)
    if kind in ("tmpfs", "ramfs"):
        return 0, f"{folder} is in RAM ({kind}), not on a disk"
    try:
        return shutil.disk_usage(existing).free, f"the free disk space in {folder}"
    except OSError as error:
        return 0, f"no disk space to be had in {folder} ({error.strerror})"


def filesystem_type(path: Path, mounts: str = "/proc/mounts") -> str | None:
    """The type of the file system holding `path` (a resolved path): the longest mount point over it
    in `mounts` (Linux's table; None where there is none, as on macOS)."""
    try:
        with open(mounts, encoding="utf-8", errors="replace") as table:
            entries = [line.split() for line in table]
    except OSError:
        return None
    best, kind = -1, None
    for fields in entries:
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])  # "\040" is a space
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) >= best:  # a later mount over the same point hides the earlier one
            best, kind = len(point), fields[2]
    return kind


def _decode_pixels(
    root: Path,
    scan: DatasetScan,
    unique_train: list[int],
    val_idx: list[int],
    size: int,
    on_disk: Path | None,
    log: Callable[[str], None],
) -> tuple[PixelStore, torch.Tensor]:
    """The training images resized to the short side (a PixelStore), and the validation images as their
    eval centre crops (one uint8 tensor)."""
    short = resize_size(size)
    resize, centre = v2.Resize(short, antialias=True), v2.CenterCrop(size)

    def decode_train(path: Path) -> torch.Tensor:
        return resize(TF.to_image(load_rgb(path, short)))

    def decode_val(path: Path) -> torch.Tensor:  # exactly eval_transform up to the scaling and normalising
        return centre(resize(TF.to_image(load_rgb(path, short))))

    store = PixelStore(on_disk)
    decode_all(
        [root / scan.train[i][0] for i in unique_train], decode_train, store.append, log, "decoding training images"
    )
    store.close()
    val_pixels = torch.empty((len(val_idx), 3, size, size), dtype=torch.uint8)
    filled = iter(range(len(val_idx)))
    decode_all(
        [root / scan.val[i][0] for i in val_idx],
        decode_val,
        lambda image: val_pixels[next(filled)].copy_(image),
        log,
        "decoding validation images",
    )
    return store, val_pixels


class _ShardImages:
    """The shard's (possibly repeated) positions over the unique stored images."""

    def __init__(self, store: PixelStore, position: dict[int, int], train_idx: list[int]):
        self.store, self.position, self.train_idx = store, position, train_idx

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.store[self.position[self.train_idx[k]]]


def _device_transforms(
    size: int, memory_format, augment: str = "light"
) -> tuple[Callable[[CropBatch], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """prepare_train (resize and flip the loader's crops, then scale, with the augmentation's device
    part) and scale (float, normalised, in the model's memory format): both batched on the device."""
    to_input = training_input(augment, memory_format)

    def scale(images: torch.Tensor) -> torch.Tensor:
        return to_model_input(images, memory_format)

    def prepare_train(batch: CropBatch) -> torch.Tensor:
        return to_input(resize_crops(batch, size).div_(255))

    return prepare_train, scale


# ---------------------------------------------------------------------------------------------


def build_pipeline(
    cfg: TrainConfig,
    scan: DatasetScan,
    frozen: nn.Module,
    device: torch.device,
    amp_dtype,
    memory_format,
    workers: int,
    log: Callable[[str], None],
    ctx: Distributed | None = None,
) -> Pipeline:
    """The fastest pipeline that fits: cached features (head, last), cached pixels (all), else streamed.

    `ctx`: this process's place among several (torchrun). The memory budget is the smallest of all
    ranks' (each node measures its own memory) and every choice is agreed by all ranks, so they all
    take the same pipeline."""
    ctx = ctx or Distributed()
    reason = ""
    if cfg.cache == "off":
        reason = "cache off"
    else:
        budget = min(ctx.all_gather(memory_budget_bytes(cfg, ctx.local_world_size)))  # the tightest node's
        shard = Shard(ctx.rank, ctx.world_size)

        def agree(ok: bool) -> bool:  # True only when it holds on every rank
            return not ctx.any(not ok)

        try:
            if cfg.augment == "strong" and not isinstance(frozen, nn.Identity):
                raise DoesNotFit("strong augmentation draws new views every epoch, which no cache of fixed views holds")
            if isinstance(frozen, nn.Identity):
                built = pixel_pipeline(cfg, scan, device, memory_format, workers, log, budget, shard, agree)
            else:
                built = feature_pipeline(
                    cfg, scan, frozen, device, amp_dtype, memory_format, workers, log, budget, shard, agree
                )
            log(f"data pipeline: {built.description}")
            return built
        except DoesNotFit as why:
            reason = str(why)
    pipeline = streaming_pipeline(cfg, scan, frozen, device, memory_format, workers, log, reason)
    log(f"data pipeline: {pipeline.description}")
    return pipeline

"""The baseline: a fine-tuning loop in the style of the classic PyTorch train.py, written fresh.

PIL decoding with RandomResizedCrop/flip every epoch, the full model run on every batch (frozen
layers only have requires_grad off), no caches, validation through the full model each epoch, the
best weights kept in memory. For a like-with-like comparison it shares with finetune: the image
split (finetune's scan, so the same files), the model construction, the AdamW parameter groups,
the warmup + cosine schedule, label smoothing, batch size and seed. One deliberate difference from
the classic script: the frozen layers are kept in eval mode (as finetune does), so their BatchNorm
statistics do not drift and both loops train the same function.

By default it is the classic script: float32 and the NCHW layout. `amp=True` adds autocast with the
dtype finetune would choose on that device (finetune.device.amp_choice: bf16 on GPUs with bf16
units, fp16 with a GradScaler on older ones, nothing on the CPU or MPS) and `channels_last=True`
the channels_last layout for the model and the inputs where finetune uses it (CUDA and x86 CPUs):
with both on, the baseline runs at the precision and layout finetune ships with (like-for-like).
Pinned memory and non_blocking copies, as the classic ImageNet example has them, are used on CUDA
only (MPS rejects them). On CUDA, cudnn.benchmark is on, as finetune sets it.

Timed ("seconds"): from the start of run_baseline (the scan, loaders, model) to the end of the last
epoch (each epoch's training and validation pass). There is no final evaluation or calibration here;
bench/benchmark.py times ours over the same span (its final evaluation and calibration excluded).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from finetune.config import TrainConfig
from finetune.data import ACCEPTED_FORMATS, IMAGENET_MEAN, IMAGENET_STD, resize_size, scan_dataset
from finetune.device import (
    amp_choice,
    channels_last_for,
    default_workers,
    non_blocking,
    pin_memory,
    resolve_device,
    seed_everything,
)
from finetune.model import apply_strategy, build_model, frozen_modules, param_groups
from finetune.training import lr_lambda


class ClassicImages(Dataset):
    """ImageFolder's behaviour on a list of files: PIL open + convert('RGB') + transform."""

    def __init__(self, root: str, items: list[tuple[str, int]], transform):
        self.root, self.items, self.transform = Path(root), items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        with open(self.root / rel, "rb") as f:
            image = Image.open(f, formats=ACCEPTED_FORMATS).convert("RGB")  # as finetune: no EPS by content
        return self.transform(image), label


TIMED = "start to the end of the last epoch (scan, setup, epochs: training + validation)"


def precision_name(amp_dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, str(amp_dtype))


def run_baseline(cfg: TrainConfig, on_epoch=None, amp: bool = False, channels_last: bool = False) -> dict:
    """Train as the classic script does (amp and channels_last off) or like-for-like with finetune
    (both on: finetune's autocast dtype and memory layout for this device). The result names the
    precision and layout that were actually used and, on CUDA, the peak GPU memory."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as finetune.training.train: both pick conv kernels by timing them
        torch.cuda.reset_peak_memory_stats(device)
    amp_dtype, amp_reason = amp_choice(device, amp) if amp else (None, "float32 (the classic script)")
    memory_format = torch.channels_last if channels_last_for(device, channels_last) else torch.preserve_format
    scaler = torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=amp_dtype == torch.float16)
    pinned, copy_async = pin_memory(device), non_blocking(device)
    started = time.perf_counter()
    scan = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, check=False)
    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    val_tf = transforms.Compose(
        [transforms.Resize(resize_size(size)), transforms.CenterCrop(size), transforms.ToTensor(), normalize]
    )
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    loaders = {
        "train": DataLoader(
            ClassicImages(scan.root, scan.train, train_tf),
            batch_size=cfg.batch_size,
            shuffle=True,
            num_workers=workers,
            drop_last=len(scan.train) > cfg.batch_size,
            pin_memory=pinned,
            generator=torch.Generator().manual_seed(cfg.seed),
        ),
        "val": DataLoader(
            ClassicImages(scan.root, scan.val, val_tf),
            batch_size=cfg.batch_size * 2,
            num_workers=workers,
            pin_memory=pinned,
        ),
    }

    model = build_model(cfg.arch, len(scan.classes), cfg.weights)
    apply_strategy(model, cfg.strategy)  # requires_grad off on the frozen layers
    model.to(device, memory_format=memory_format)
    frozen = frozen_modules(model, cfg.strategy)
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.strategy, cfg.head_lr(), cfg.backbone_lr_scale, cfg.weights != "none"),
        weight_decay=cfg.weight_decay,
    )
    steps_per_epoch = max(1, len(loaders["train"]))
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, min(round(cfg.warmup_epochs * steps_per_epoch), total // 5))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    best_acc, best_weights, history, first_epoch_s = -1.0, None, [], None
    for epoch in range(1, cfg.epochs + 1):
        for phase in ("train", "val"):
            model.train(phase == "train")
            for module in frozen:
                module.eval()
            correct, count = 0, 0
            for inputs, labels in loaders[phase]:
                inputs = inputs.to(device, memory_format=memory_format, non_blocking=copy_async)
                labels = labels.to(device, non_blocking=copy_async)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        outputs = model(inputs)
                        loss = criterion(outputs, labels)
                    if phase == "train":
                        scaler.scale(loss).backward()  # without fp16: backward, step as in the classic loop
                        scaler.step(optimizer)
                        scaler.update()
                        scheduler.step()
                correct += (outputs.argmax(1) == labels).sum().item()
                count += labels.numel()
            if phase == "val":
                acc = correct / max(1, count)
                history.append(acc)
                if acc > best_acc:
                    best_acc, best_weights = acc, copy.deepcopy(model.state_dict())
        if first_epoch_s is None:
            first_epoch_s = time.perf_counter() - started
        if on_epoch:
            on_epoch(epoch, history[-1])
    return {
        "seconds": time.perf_counter() - started,
        "timed": TIMED,
        "first_epoch_s": first_epoch_s,
        "best_val_acc": best_acc,
        "val_acc_history": history,
        "train_images": len(scan.train),
        "val_images": len(scan.val),
        "workers": workers,
        "has_best_weights": best_weights is not None,
        "device": str(device),
        "precision": precision_name(amp_dtype),
        "amp_reason": amp_reason,
        "grad_scaler": scaler.is_enabled(),
        "memory_layout": "channels_last"
        if model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
        else "NCHW",
        "pin_memory": pinned,
        "non_blocking": copy_async,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }

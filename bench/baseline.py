"""The baseline: a fine-tuning loop in the style of the classic PyTorch train.py, written fresh.

PIL decoding with RandomResizedCrop/flip every epoch, the full model run on every batch (frozen
layers only have requires_grad off), no caches, validation through the full model each epoch, the
best weights kept in memory. For a like-with-like comparison it shares with finetune: the image
split (finetune's scan, so the same files), the model construction, the AdamW parameter groups,
the warmup + cosine schedule, label smoothing, batch size and seed. One deliberate difference from
the classic script: the frozen layers are kept in eval mode (as finetune does), so their BatchNorm
statistics do not drift and both loops train the same function.
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
from finetune.data import IMAGENET_MEAN, IMAGENET_STD, resize_size, scan_dataset
from finetune.model import FROZEN_STAGES, apply_strategy, build_model, param_groups, stage_modules
from finetune.device import default_workers, resolve_device, seed_everything
from finetune.train import lr_lambda


class ClassicImages(Dataset):
    """ImageFolder's behaviour on a list of files: PIL open + convert('RGB') + transform."""

    def __init__(self, root: str, items: list[tuple[str, int]], transform):
        self.root, self.items, self.transform = Path(root), items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        with open(self.root / rel, "rb") as f:
            image = Image.open(f).convert("RGB")
        return self.transform(image), label


def run_baseline(cfg: TrainConfig, on_epoch=None) -> dict:
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    started = time.perf_counter()
    scan = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, check=False)
    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize(resize_size(size)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), normalize])
    workers = cfg.workers if cfg.workers is not None else default_workers(device)
    loaders = {
        "train": DataLoader(ClassicImages(scan.root, scan.train, train_tf), batch_size=cfg.batch_size, shuffle=True,
                            num_workers=workers, drop_last=len(scan.train) > cfg.batch_size,
                            generator=torch.Generator().manual_seed(cfg.seed)),
        "val": DataLoader(ClassicImages(scan.root, scan.val, val_tf), batch_size=cfg.batch_size * 2,
                          num_workers=workers),
    }

    model = build_model(cfg.arch, len(scan.classes), cfg.weights)
    apply_strategy(model, cfg.strategy)  # requires_grad off on the frozen layers
    model.to(device)
    frozen_modules = [m for stage in FROZEN_STAGES[cfg.strategy] for m in stage_modules(model)[stage]]
    optimizer = torch.optim.AdamW(param_groups(model, cfg.strategy, cfg.head_lr(), cfg.backbone_lr_scale,
                                               cfg.weights != "none"), weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(loaders["train"]))
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, min(round(cfg.warmup_epochs * steps_per_epoch), total // 5))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, warmup))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    best_acc, best_weights, history, first_epoch_s = -1.0, None, [], None
    for epoch in range(1, cfg.epochs + 1):
        for phase in ("train", "val"):
            model.train(phase == "train")
            for module in frozen_modules:
                module.eval()
            correct, count = 0, 0
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
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
    return {"seconds": time.perf_counter() - started, "first_epoch_s": first_epoch_s, "best_val_acc": best_acc,
            "val_acc_history": history, "train_images": len(scan.train), "val_images": len(scan.val),
            "workers": workers, "has_best_weights": best_weights is not None}

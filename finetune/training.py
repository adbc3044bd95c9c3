"""The training loop, as named steps: set up a session, train an epoch, validate, save, evaluate.

    train(cfg)                      scan, build the session, run the epochs, final evaluation
      setup_session(...)            model, frozen/trainable parts, pipeline, loaders, optimizer, ...
      train_one_epoch(session, ...) one pass over the training data (batch events)
      validate(session)             val loss and accuracy with the trainable part
      save_checkpoint(...)          model.pth when improved, last.pth to resume
      final_evaluation(...)         metrics, confusion matrix and curves of the best model

It emits events (events.py) that the CLI's progress bar and the studio both consume.

Several GPUs: `torchrun --nproc_per_node N -m finetune train ...` runs this same code under
DistributedDataParallel; rank 0 alone writes the run folder and emits events.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
)

from . import cache
from .architectures import architecture
from .augment import batch_mixing, describe
from .calibrate import NonFiniteLogits, calibrate, softmax
from .config import FinetuneError, TrainConfig, default_strategy
from .data import IMAGENET_MEAN, IMAGENET_STD, DatasetScan, ImageListDataset, eval_transform, resize_size, scan_dataset
from .decode import DeviceDecoded
from .device import (
    Distributed,
    amp_dtype_for,
    channels_last_for,
    cpu_threads,
    default_workers,
    describe_device,
    non_blocking,
    pin_memory,
    resolve_device,
    seed_everything,
    versions,
)
from .ema import WeightsEMA
from .evaluate import compute_metrics, plot_history, predict_logits, summary_line, write_reports
from .events import BestEpoch, EpochRecord, Event, EventCallback, EventWriter, Timing, end_event, epoch_event
from .model import apply_strategy, build_model, param_groups, safe_load, split_model, state_dict_from
from .reporting import Reporting
from .rundir import DiskFull, RunDir, RunInfo, TrainingLock, disk_full, save_atomic, save_safetensors

# Under DDP every rank must agree whether to stop, which costs a collective (and a host-GPU sync):
# done every this many batches, not every batch.
STOP_CHECK_EVERY = 10
BATCH_EVENTS_PER_SECOND = 2


# ---------------------------------------------------------------------------------------------
# State that survives an epoch, and the things a training works with


@dataclass
class TrainState:
    """Where a training is: completed epochs, their records, the best one and the patience left."""

    epoch: int = 0  # the last completed epoch
    history: list[EpochRecord] = field(default_factory=list)
    best: BestEpoch = field(default_factory=lambda: BestEpoch(epoch=0, val_acc=-1.0, val_loss=float("inf")))
    epochs_without_gain: int = 0

    def add(self, record: EpochRecord) -> bool:
        """Record an epoch; True when it is the best so far (val accuracy, ties broken by val loss).
        An epoch whose val loss is not finite is never the best: nan logits still have an argmax."""
        improved = math.isfinite(record["val_loss"]) and (
            record["val_acc"] > self.best["val_acc"]
            or (record["val_acc"] == self.best["val_acc"] and record["val_loss"] < self.best["val_loss"])
        )
        if improved:
            self.best = {"epoch": record["epoch"], "val_acc": record["val_acc"], "val_loss": record["val_loss"]}
            self.epochs_without_gain = 0
        else:
            self.epochs_without_gain += 1
        record["best"] = improved
        self.history.append(record)
        self.epoch = record["epoch"]
        return improved

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best,
            "epochs_without_gain": self.epochs_without_gain,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> TrainState:
        return cls(
            epoch=checkpoint["epoch"],
            history=list(checkpoint["history"]),
            best=checkpoint["best"].copy(),
            epochs_without_gain=checkpoint.get("epochs_without_gain", 0),
        )


@dataclass(kw_only=True)
class Session:
    """Everything one training process works with (built by keyword: twenty fields, several of one type)."""

    cfg: TrainConfig
    ctx: Distributed
    device: torch.device
    run: RunDir
    scan: DatasetScan
    model: nn.Module
    frozen: nn.Module
    trainable: nn.Module
    step_module: nn.Module  # trainable, wrapped in DDP and/or compiled
    pipeline: cache.Pipeline
    train_loader: DataLoader | DeviceDecoded  # DeviceDecoded: JPEGs decoded on the device
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    workers: int
    emit: EventCallback
    pipeline_seconds: float = 0.0  # building the data pipeline: the feature or pixel cache, if any
    ema: WeightsEMA | None = None  # --ema: the averaged trainable weights, validated and saved as the model
    # --mixup/--cutmix: (inputs, labels) -> (mixed inputs, soft targets), after the frozen part
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def log(self, message: str) -> None:
        self.emit({"type": "log", "message": message})

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_loader))


def uses_grad_scaler(amp_dtype: torch.dtype | None) -> bool:
    """fp16 needs loss scaling against underflowing gradients; bf16 (and float32) do not."""
    return amp_dtype == torch.float16


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Running sums kept on the device: float64 on the CPU, float32 elsewhere (MPS has no float64)."""
    return torch.float64 if device.type == "cpu" else torch.float32


# ---------------------------------------------------------------------------------------------
# Setting up


def lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to zero."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def class_weights(scan: DatasetScan) -> torch.Tensor:
    """Inverse-frequency weights, mean 1 (scikit-learn's 'balanced')."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([label for _, label in scan.train])
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    full = np.ones(len(scan.classes))
    full[present] = weights
    return torch.tensor(full, dtype=torch.float32)


class EvenBatches(Sampler[list[int]]):
    """Batches of `batch_size` from `sampler`, except the last two, which share their images evenly:
    57 images at 32 are batches of 29 and 28, every image trains every epoch and no batch is tiny (a
    tiny batch gives BatchNorm noisy statistics). Only a lone image left over from a pair (batch size
    2, an odd count) is left out, a different one each epoch when shuffled: BatchNorm cannot train on
    one image (at 1x1 maps it fails). Every rank gets the same number of batches (the samplers
    give each rank as many indices), as DDP needs."""

    def __init__(self, sampler: RandomSampler | DistributedSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size

    def sizes(self, n: int) -> list[int]:
        b = self.batch_size
        full, rest = divmod(n, b)
        if not rest or not full:
            return [b] * full + ([rest] if rest else [])
        pair = b + rest
        sizes = [b] * (full - 1) + [(pair + 1) // 2, pair // 2]
        return sizes[:-1] if sizes[-1] == 1 else sizes

    def __len__(self) -> int:
        return len(self.sizes(len(self.sampler)))

    def __iter__(self):
        indices = list(self.sampler)
        start = 0
        for size in self.sizes(len(indices)):
            yield indices[start : start + size]
            start += size


def make_loader(
    dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    device: torch.device,
    seed: int,
    ctx: Distributed,
    sharded: bool = False,
    collate: Callable | None = None,
    batched: bool = False,
) -> DataLoader:
    """`shuffle`: the training loader (shuffled, EvenBatches); else in order, in batches of batch_size.
    `sharded`: the dataset already holds only this rank's part (a cache built per rank). `collate`: how a
    batch is made of samples (None: torch's default). `batched`: the dataset hands out whole batches,
    already pinned or on the device (cache.FeatureCache)."""
    generator = torch.Generator().manual_seed(seed)
    common: dict[str, Any] = dict(
        num_workers=workers,
        pin_memory=pin_memory(device) and not batched,
        persistent_workers=workers > 0,
        generator=generator,
        prefetch_factor=4 if workers > 0 else None,
    )
    sampler: RandomSampler | DistributedSampler
    if not shuffle:
        if ctx.enabled and not sharded:
            dataset = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
        if not batched:
            return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, **common)
        batches: Sampler[list[int]] = BatchSampler(SequentialSampler(dataset), batch_size, drop_last=False)
    else:
        if ctx.enabled and not sharded:  # padded so that every rank has as many images
            sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed)
        else:  # the loader's own generator, as DataLoader(shuffle=True) would use it
            sampler = RandomSampler(dataset, generator=generator)
        batches = EvenBatches(sampler, batch_size)
    if batched:  # the dataset gathers each batch itself: dataset[list of positions]
        return DataLoader(dataset, sampler=batches, batch_size=None, **common)
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, **common)


def to_device(inputs, device: torch.device, copy_async: bool):
    """A batch's inputs (a tensor, or a tuple of tensors such as cache.CropBatch) on the device."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=copy_async)
    return type(inputs)(*(part.to(device, non_blocking=copy_async) for part in inputs))


def epoch_sampler(loader: DataLoader | DeviceDecoded):
    """The sampler that orders a loader's images (inside its batch sampler)."""
    outer = loader.batch_sampler or loader.sampler  # a batched dataset's loader has its batches as sampler
    return getattr(outer, "sampler", outer)


def setup_session(
    cfg: TrainConfig,
    ctx: Distributed,
    device: torch.device,
    run: RunDir,
    scan: DatasetScan,
    model: nn.Module,
    emit: EventCallback,
) -> Session:
    """Model on the device, the fastest data pipeline that fits, loaders, optimizer and schedule."""
    apply_strategy(model, cfg.resolved_strategy())
    frozen, trainable = split_model(model, cfg.resolved_strategy())
    memory_format = torch.channels_last if channels_last_for(device, cfg.channels_last) else torch.preserve_format
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # torch's stubs split the two
    amp_dtype = amp_dtype_for(device, cfg.amp)
    workers = cfg.workers if cfg.workers is not None else default_workers(device)

    def log(message: str) -> None:
        emit({"type": "log", "message": message})

    log(f"augmentation: {describe(cfg.augment, cfg.mixup, cfg.cutmix)}")
    pipeline_start = time.perf_counter()
    pipeline = cache.build_pipeline(cfg, scan, frozen, device, amp_dtype, memory_format, workers, log, ctx)
    ctx.patient_barrier("building the data pipeline")  # caches take longer on some ranks than NCCL waits
    pipeline_seconds = time.perf_counter() - pipeline_start
    train_loader, val_loader = pipeline_loaders(cfg, pipeline, device, ctx)
    step_module = _step_module(cfg, ctx, device, trainable)
    optimizer, scheduler = optimizer_and_schedule(cfg, model, device, steps_per_epoch=max(1, len(train_loader)))
    scaler = torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=uses_grad_scaler(amp_dtype))
    weight = class_weights(scan).to(device) if cfg.class_weighted_loss else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    return Session(
        cfg=cfg,
        ctx=ctx,
        device=device,
        run=run,
        scan=scan,
        model=model,
        frozen=frozen,
        trainable=trainable,
        step_module=step_module,
        pipeline=pipeline,
        train_loader=train_loader,
        val_loader=val_loader,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        criterion=criterion,
        amp_dtype=amp_dtype,
        memory_format=memory_format,
        workers=workers,
        emit=emit,
        pipeline_seconds=pipeline_seconds,
        ema=WeightsEMA(trainable, cfg.ema) if cfg.ema else None,
        mix=batch_mixing(cfg.mixup, cfg.cutmix, len(scan.classes)),
    )


def pipeline_loaders(
    cfg: TrainConfig, pipeline: cache.Pipeline, device: torch.device, ctx: Distributed
) -> tuple[DataLoader | DeviceDecoded, DataLoader]:
    """The training loader (shuffled, the pipeline's collate) and the validation loader (in order, twice
    the batch: no gradients to keep)."""
    options: dict[str, Any] = dict(sharded=pipeline.sharded, batched=pipeline.batched)
    train_loader = make_loader(
        pipeline.train,
        cfg.batch_size,
        True,
        pipeline.workers,
        device,
        cfg.seed,
        ctx,
        collate=pipeline.collate_train,
        **options,
    )
    val_loader = make_loader(
        pipeline.val, cfg.batch_size * 2, False, pipeline.workers, device, cfg.seed, ctx, **options
    )
    if pipeline.feed_train is not None:  # e.g. JPEG bytes decoded on the device (decode.DeviceDecoded)
        train_loader = pipeline.feed_train(train_loader)
    return train_loader, val_loader


def _step_module(cfg: TrainConfig, ctx: Distributed, device: torch.device, trainable: nn.Module) -> nn.Module:
    """The module each step calls: the trainable part, DDP-wrapped when distributed, compiled when asked."""
    step_module: nn.Module = trainable
    if ctx.enabled:
        step_module = nn.parallel.DistributedDataParallel(
            step_module, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:  # after DDP wrapping, as PyTorch recommends (DDPOptimizer splits graphs at buckets)
        step_module = cast(nn.Module, torch.compile(step_module))  # an OptimizedModule, typed as a callable
    return step_module


# Devices with torch's fused AdamW kernel: one kernel for every parameter instead of a loop of small ones
# (on a CPU, a resnet34 step takes about 30x less than the default loop), and GradScaler hands it the
# scale and the inf check as tensors: the default AdamW makes GradScaler read them with .item(), a host
# sync every fp16 step (T4, V100, RTX 20xx).
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "mps", "xpu")


def adamw_options(device: torch.device) -> dict[str, Any]:
    """fused=True where torch has the kernel; elsewhere torch's own choice (foreach or a loop)."""
    return {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {}


def optimizer_and_schedule(
    cfg: TrainConfig, model: nn.Module, device: torch.device, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the strategy's parameter groups, and its per-step schedule over the whole run (warmup
    at most a fifth of it)."""
    pretrained = cfg.weights != "none"
    groups = param_groups(model, cfg.resolved_strategy(), cfg.head_lr(), cfg.backbone_lr_scale, pretrained)
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, **adamw_options(device))
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, min(round(cfg.warmup_epochs * steps_per_epoch), total_steps // 5))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def to_cpu(obj):
    """The same nested structure with every tensor on the CPU: a checkpoint written on cuda:1 must
    load with a plain torch.load on a machine without a GPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


# A slim last.pth (the last epoch of a run that ended by itself) keeps the frozen layers' tensors in
# model.pth, which holds the same bits: frozen layers never change, whichever epoch model.pth is from.
CHECKPOINT_BASE = "model.pth"


def trained_keys(state: dict, strategy: str, arch: str) -> list[str]:
    """The state_dict keys of the layers `strategy` trains (the head always)."""
    frozen = architecture(arch).layout.frozen_modules(strategy)
    return [key for key in state if key.split(".")[0] not in frozen]


def save_checkpoint(session: Session, state: TrainState, improved: bool, complete: bool, final: bool = False) -> None:
    """model.pth when the epoch improved; last.pth (to resume) after every complete epoch. Rank 0 only.

    `final`: the last epoch of a run that ends by itself (completed, early-stopped). Its last.pth keeps
    only the trained layers (the frozen ones are in model.pth) and no optimizer state: a `head` run's
    last.pth is then kilobytes, not a second copy of the model (and an `all` run's is the model, not three
    times it). Resuming it with more epochs starts the optimizer afresh. A run stopped or failed keeps
    the full checkpoint, to resume exactly. model.pth is written first: a slim last.pth never points
    at a model.pth older than itself."""
    if not session.ctx.is_main:
        return
    model_state = to_cpu(session.model.state_dict())
    if improved and session.ema is not None:  # what validate scored; written inside: on a CPU
        with session.ema.applied():  # the state holds the live tensors, not copies
            save_atomic(to_cpu(session.model.state_dict()), session.run.model)
    elif improved:
        save_atomic(model_state, session.run.model)
    if improved:  # a resumed run's model.safetensors is of an older epoch now (final_evaluation rewrites it)
        session.run.safetensors.unlink(missing_ok=True)
    if not complete:
        return
    checkpoint = {
        "model": model_state,
        "optimizer": to_cpu(session.optimizer.state_dict()),
        "scheduler": session.scheduler.state_dict(),
        "scaler": session.scaler.state_dict(),
        "rng": torch.get_rng_state(),
        **state.state_dict(),
        **({"ema": session.ema.state_dict()} if session.ema is not None else {}),
    }
    if final and session.run.model.is_file():
        del checkpoint["optimizer"]
        checkpoint.pop("ema", None)  # a slim last.pth: resumed, the average starts again from the weights
        trained = trained_keys(model_state, session.cfg.resolved_strategy(), session.cfg.arch)
        checkpoint["model"] = {key: model_state[key] for key in trained}
        checkpoint["base"] = CHECKPOINT_BASE
    save_atomic(checkpoint, session.run.last)


# What a last.pth holds besides the model, and of which type: a run folder may come from anyone, and
# a value of another type would fail deep in torch (or set odd attributes on the scheduler, whose
# load_state_dict takes every key given) after the run was already marked running.
CHECKPOINT_FIELDS = {"epoch": int, "history": list, "best": dict, "scheduler": dict, "rng": torch.Tensor}
CHECKPOINT_OPTIONAL = {"optimizer": dict, "scaler": dict, "epochs_without_gain": int, "ema": dict}


def check_checkpoint(checkpoint: object, path: Path) -> dict:
    """`checkpoint` (a loaded last.pth) when it has the fields finetune writes, with their types;
    else one line naming the file and the first field that is wrong."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise FinetuneError(f"{path} is not a checkpoint finetune wrote (no model state in it)")
    for name, kind in (*CHECKPOINT_FIELDS.items(), *CHECKPOINT_OPTIONAL.items()):
        value = checkpoint.get(name)
        if value is None and name in CHECKPOINT_OPTIONAL:
            continue
        if not isinstance(value, kind) or isinstance(value, bool):
            raise FinetuneError(
                f"{path} is not a checkpoint finetune wrote: its {name!r} is "
                f"{'missing' if value is None else 'a ' + type(value).__name__}"
            )
    if checkpoint["rng"].dtype != torch.uint8 or checkpoint["epoch"] < 0:
        raise FinetuneError(f"{path} is not a checkpoint finetune wrote: its random state or epoch is not one")
    records = [checkpoint["best"], *checkpoint["history"]]
    if not all(
        isinstance(record, dict) and all(_is_number(record.get(key)) for key in RECORD_NUMBERS[i > 0])
        for i, record in enumerate(records)
    ):
        raise FinetuneError(f"{path} is not a checkpoint finetune wrote: its history is not one")
    return checkpoint


# the numbers the best epoch and each epoch's record hold (TrainState.add and plot_history read them)
RECORD_NUMBERS = (("epoch", "val_acc", "val_loss"), ("epoch", "train_loss", "train_acc", "val_loss", "val_acc"))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checkpoint_model_state(run: RunDir, checkpoint: object) -> dict:
    """The whole state_dict of a last.pth: its own tensors over those of its base (a slim one's
    frozen layers, from model.pth of the same run folder)."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise FinetuneError(f"{run.last} is not a checkpoint finetune wrote (no model state in it)")
    state = state_dict_from(checkpoint["model"], run.last)  # its tensors first: a nan is named as such
    check_checkpoint(checkpoint, run.last)
    base = checkpoint.get("base")
    if base is None:
        return state
    if base != CHECKPOINT_BASE:  # only ever this name beside it: never a path taken from the file
        raise FinetuneError(f"{run.last} refers to {base!r}: not a checkpoint finetune wrote")
    if not run.model.is_file():
        raise FinetuneError(
            f"{run.last} keeps only the trained layers and needs {run.model} for the others, which is missing"
        )
    full = state_dict_from(safe_load(run.model, "model"), run.model)
    full.update(state)
    return full


def load_resumed(model: nn.Module, state: dict, source: Path) -> None:
    """The checkpoint's weights into the model built for the run; one line when they do not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
        classes = cast(nn.Linear, model.fc).out_features
        raise FinetuneError(
            f"{source} does not fit this run's model ({classes} classes): {(lines or ['keys differ'])[0][:300]}"
        ) from None


def restore_checkpoint(session: Session, checkpoint: dict) -> TrainState:
    """Optimizer, schedule, scaler and random state from last.pth; the optimizer's tensors move to the
    training device (Optimizer.load_state_dict puts them beside their parameters). A slim last.pth has
    no optimizer state: the optimizer starts afresh, at the learning rate the schedule has reached."""
    own = session.scheduler.state_dict()
    if set(checkpoint["scheduler"]) != set(own):  # its load_state_dict would take any key as an attribute
        raise FinetuneError(f"{session.run.last} does not fit this run: its scheduler state is not one finetune writes")
    try:
        session.scheduler.load_state_dict(checkpoint["scheduler"])  # keeps the lambdas built for this run's length
        if "optimizer" in checkpoint:
            session.optimizer.load_state_dict(kernel_choice_of(session.optimizer, checkpoint["optimizer"]))
        else:  # in the try: base_lrs come from the file, and another run's count of groups does not fit
            scheduler = session.scheduler
            for group, base_lr, factor in zip(
                session.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
            ):
                group["lr"] = base_lr * factor(scheduler.last_epoch)
        if checkpoint.get("scaler"):
            session.scaler.load_state_dict(checkpoint["scaler"])
        if session.ema is not None and "ema" in checkpoint:
            session.ema.load_state_dict(checkpoint["ema"])
        elif session.ema is not None:
            session.log("last.pth holds no weights average: the EMA starts again from the resumed weights")
        torch.set_rng_state(checkpoint["rng"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise FinetuneError(f"{session.run.last} does not fit this run: {type(error).__name__}: {first}") from None
    if "optimizer" not in checkpoint:
        session.log(
            "last.pth of a run that had ended keeps no optimizer state: AdamW starts afresh (its "
            "moments rebuild within a few steps), at the learning rate the schedule has reached"
        )
    return TrainState.from_checkpoint(checkpoint)


def kernel_choice_of(optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A saved optimizer state with this optimizer's kernel choice (fused, foreach) in its groups:
    load_state_dict keeps every saved group setting, and a last.pth from a non-fused AdamW would turn
    the fused one back into a loop, which GradScaler (set up for the fused kernel) then fails on."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list):
        return saved  # load_state_dict names what is wrong
    kernels = [{key: own[key] for key in ("fused", "foreach") if key in own} for own in optimizer.param_groups]
    # another count of groups: load_state_dict's own error says so (restore_checkpoint words it)
    pairs = zip(groups, kernels, strict=False)
    return {**saved, "param_groups": [{**g, **k} if isinstance(g, dict) else g for g, k in pairs]}


def resume_config(run_dir: str | Path, epochs: int | None = None, device: str | None = None) -> TrainConfig:
    """The saved configuration of a run; only the number of epochs and the device may change.

    Under torchrun only rank 0 reads it (on several nodes, the run folder is on rank 0's alone): the
    other ranks get a stand-in, which train(resume=...) replaces with rank 0's configuration."""
    if not Distributed.from_env().is_main:
        return TrainConfig()
    run = RunDir(run_dir)
    config = run.require_info().get("config")
    if not isinstance(config, dict):
        raise FinetuneError(f"{run.info_path} holds no training configuration to resume")
    cfg = TrainConfig.from_dict(config)
    cfg.runs_dir = str(run.path.absolute().parent)  # where it is now: run.json may come from another machine
    if epochs is not None:
        cfg.epochs = epochs
    if device is not None:
        cfg.device = device
    return cfg


# ---------------------------------------------------------------------------------------------
# One epoch, validation


def train_one_epoch(session: Session, epoch: int, stop: threading.Event, progress: _Progress) -> tuple[dict, bool]:
    """One pass over the training data. Returns (train loss and accuracy over all ranks, stopped)."""
    s = session
    sampler = epoch_sampler(s.train_loader)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    s.pipeline.set_epoch(epoch)
    s.trainable.train()
    s.frozen.eval()  # its BatchNorm statistics must not move
    # running sums stay on the device: reading them every batch would make the host wait for the GPU
    # each step; they are read only when a batch event goes out (rank 0, throttled)
    loss_sum = torch.zeros((), device=s.device, dtype=accumulator_dtype(s.device))
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    count, stopped, copy_async = 0, False, non_blocking(s.device)
    progress.start_epoch()
    for batch, (inputs, targets) in enumerate(s.train_loader, start=1):
        inputs = to_device(inputs, s.device, copy_async)
        targets = targets.to(s.device, non_blocking=copy_async)
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            inputs = s.pipeline.prepare_train(inputs)
            inputs, wanted = s.mix(inputs, targets) if s.mix is not None else (inputs, targets)
            logits = s.step_module(inputs)
            loss = s.criterion(logits.float(), wanted)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        if s.ema is not None:
            s.ema.update()
        loss_sum += loss.detach().to(loss_sum.dtype) * targets.numel()
        correct += (logits.detach().argmax(1) == targets).sum()
        count += targets.numel()
        progress.batch(epoch, batch, count, loss_sum, correct, s.optimizer.param_groups[0]["lr"])
        if _should_stop(s.ctx, stop, batch):
            stopped = True
            break
    loss_total, correct_total, count_total = s.ctx.sum([float(loss_sum.item()), float(correct.item()), float(count)])
    return {
        "train_loss": loss_total / max(count_total, 1),
        "train_acc": correct_total / max(count_total, 1),
        "images": count_total,
    }, stopped


def _should_stop(ctx: Distributed, stop: threading.Event, batch: int) -> bool:
    """A single process looks at its flag every batch; several agree every STOP_CHECK_EVERY batches
    (a Ctrl-C on one rank stops them all at the same batch)."""
    if not ctx.enabled:
        return stop.is_set()
    return batch % STOP_CHECK_EVERY == 0 and ctx.any(stop.is_set())


def _stop_requested(ctx: Distributed, stop: threading.Event) -> bool:
    """At the end of an epoch: a stop asked for during validation (or, under DDP, after the last
    batch check) ends the training now, not somewhere in the next epoch."""
    return ctx.any(stop.is_set()) if ctx.enabled else stop.is_set()


@torch.inference_mode()
def validate(session: Session) -> tuple[float, float]:
    """(val loss, val accuracy) of the trainable part on the cached or streamed val inputs, over all ranks;
    with --ema, of its averaged weights."""
    with session.ema.applied() if session.ema is not None else contextlib.nullcontext():
        return _validate(session)


def _validate(session: Session) -> tuple[float, float]:
    s = session
    # DDP's forward leaves each rank with its own BatchNorm statistics; score rank 0's (the saved model)
    s.ctx.broadcast_module_buffers(s.trainable)
    s.trainable.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss_sum = torch.zeros((), device=s.device, dtype=accumulator_dtype(s.device))
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    count, copy_async = 0, non_blocking(s.device)
    for inputs, targets in s.val_loader:
        inputs = inputs.to(s.device, non_blocking=copy_async)
        targets = targets.to(s.device, non_blocking=copy_async)
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            logits = s.trainable(s.pipeline.prepare_eval(inputs)).float()
        loss_sum += criterion(logits, targets).to(loss_sum.dtype)
        correct += (logits.argmax(1) == targets).sum()
        count += targets.numel()
    loss_total, correct_total, count_total = s.ctx.sum([float(loss_sum.item()), float(correct.item()), float(count)])
    return (loss_total / count_total, correct_total / count_total) if count_total else (float("nan"), 0.0)


class _Progress:
    """Batch events: rank 0 only, at most BATCH_EVENTS_PER_SECOND (each reads the device's sums)."""

    def __init__(self, session: Session, start_epoch: int):
        self.session = session
        self.remaining_batches = session.steps_per_epoch * (session.cfg.epochs - start_epoch + 1)
        self.done = 0
        self.run_start = time.perf_counter()
        self.epoch_start = self.last_emit = 0.0

    def start_epoch(self) -> None:
        self.epoch_start, self.last_emit = time.perf_counter(), 0.0

    def batch(
        self, epoch: int, batch: int, count: int, loss_sum: torch.Tensor, correct: torch.Tensor, lr: float
    ) -> None:
        self.done += 1
        s = self.session
        if not s.ctx.is_main:
            return
        now = time.perf_counter()
        steps = s.steps_per_epoch
        if not (batch == 1 or batch == steps or now - self.last_emit >= 1 / BATCH_EVENTS_PER_SECOND):
            return
        self.last_emit = now
        s.emit(
            {
                "type": "batch",
                "epoch": epoch,
                "epochs": s.cfg.epochs,
                "batch": batch,
                "batches": steps,
                "loss": loss_sum.item() / count,
                "acc": correct.item() / count,
                "images_per_s": count * s.ctx.world_size / max(now - self.epoch_start, 1e-9),
                "eta_s": (now - self.run_start) / self.done * (self.remaining_batches - self.done),
                "lr": lr,
            }
        )


# ---------------------------------------------------------------------------------------------
# The whole training


def train(
    cfg: TrainConfig,
    on_event: EventCallback | None = None,
    stop: threading.Event | None = None,
    resume: str | Path | None = None,
) -> Path:
    """Fine-tune and write a run folder; returns its path. `stop.set()` ends at the next batch.
    A config without a strategy gets the default for its weights (config.default_strategy); `cfg`
    itself is not changed, run.json records the strategy used."""
    started = time.perf_counter()
    cfg.validate()
    cfg, strategy_note = settle_strategy(cfg)
    notes = [strategy_note] if strategy_note and not resume else []
    stop = stop or threading.Event()
    ctx = Distributed.from_env()
    if resume:  # rank 0's configuration (see resume_config), through the store: the device depends on it
        cfg = ctx.share_from_main(cfg, "reading the run's configuration")
    device = resolve_device(cfg.device, ctx)
    ctx.init(device)
    if ctx.enabled and device.type == "cpu":  # torchrun's OMP_NUM_THREADS=1 leaves all but one core idle
        torch.set_num_threads(cpu_threads())
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    resume_dir = Path(resume) if resume else None
    try:
        # from before the scan (there is no run.json yet), this says a training runs in that runs
        # folder, so a studio does not start a second one beside it; rank 0 speaks for all ranks
        lock_folder = resume_dir.parent if resume_dir is not None else Path(cfg.runs_dir)
        with TrainingLock(lock_folder, cfg.data) if ctx.is_main else contextlib.nullcontext() as lock:
            return _train(cfg, ctx, device, on_event, stop, resume_dir, lock, started, notes)
    except BaseException as error:
        full = disk_full(error, cfg.runs_dir)
        if full is not None and full is not error:
            raise full from None
        raise
    finally:
        ctx.close()


def settle_strategy(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """`cfg` with its strategy settled, and the one line to log about it: which default was taken
    without pretrained weights, or a warning for a strategy that freezes random layers."""
    from_scratch = default_strategy(cfg.weights) == "all"
    if cfg.strategy is None:
        cfg = dataclasses.replace(cfg, strategy=cfg.resolved_strategy())
        if from_scratch:
            return cfg, (
                "strategy all (the default without pretrained weights): every layer trains, as layers "
                "left frozen would keep their random values"
            )
        return cfg, None
    if from_scratch and cfg.strategy != "all":
        return cfg, (
            f"warning: strategy {cfg.strategy} without pretrained weights: the layers it freezes keep "
            f"their random values, so it learns little; strategy all trains every layer"
        )
    return cfg, None


class TrainingDiverged(FinetuneError):
    """The loss became nan or inf: raised once the run is settled (status, error, best model kept)."""


def divergence(record: EpochRecord, lr: float) -> str | None:
    """The one-line reason when an epoch's training or validation loss is not finite."""
    for loss, what in ((record["train_loss"], "training"), (record["val_loss"], "validation")):
        if not math.isfinite(loss):
            return (
                f"training diverged: the {what} loss became {loss} in epoch {record['epoch']}; "
                f"try a lower --lr (this run used {lr:g})"
            )
    return None


def _train(
    cfg: TrainConfig,
    ctx: Distributed,
    device: torch.device,
    on_event,
    stop,
    resume_dir,
    lock: TrainingLock | None,
    started: float,
    notes: list[str],
) -> Path:
    seed_everything(cfg.seed)
    listeners: list[EventCallback] = []

    def emit(event: Event) -> None:
        if ctx.is_main:
            event.setdefault("time", time.time())
            for listener in listeners:
                listener(event)

    def write_event(writer: EventWriter, event: Event) -> None:
        try:
            writer(event)
        except OSError as error:  # a write error has no file name: give it one
            raise (disk_full(error, run.events) or error) from None

    if on_event is not None:  # from the start: the scan's progress comes before there is a run folder
        listeners.append(on_event)
    run, scan, model, checkpoint = open_run(cfg, ctx, resume_dir, emit)
    if lock is not None:
        lock.set_run(run.path)
    pids = ctx.all_gather(os.getpid())
    event_file = EventWriter(run.events) if ctx.is_main else None
    if event_file:
        listeners.insert(0, functools.partial(write_event, event_file))  # in the file before anyone reacts to it
    reporting = Reporting.open(cfg, run, emit, enabled=ctx.is_main)  # --report-to, rank 0 only
    listeners.insert(1, reporting)  # after the file, before on_event (which may raise)
    try:
        mark_running(cfg, ctx, device, run, scan, checkpoint is None, notes, pids, emit)
        return _run_epochs(cfg, ctx, device, run, scan, model, checkpoint, emit, stop, started)
    except TrainingDiverged:
        raise  # the run is settled already (run.json says how, the best model is kept)
    except BaseException as error:
        replacement = settle_failure(error, ctx, run, emit)
        if replacement is not None:
            raise replacement from None
        raise
    finally:
        reporting.close()
        if event_file:
            try:
                event_file.close()
            except OSError:  # what a full disk did not take is lost; the error above says why
                pass


def open_run(
    cfg: TrainConfig, ctx: Distributed, resume_dir: Path | None, emit: EventCallback
) -> tuple[RunDir, DatasetScan, nn.Module, object]:
    """The run folder, its split and its model, and the checkpoint a resumed run continues from (read_resumed;
    None for a new run). Rank 0 alone reads the run folder and scans; the others wait for its results
    (patiently: a scan of many images takes longer than a collective's timeout), then every rank checks
    that it can read the dataset."""
    if resume_dir is not None:
        run = RunDir(resume_dir)  # on several nodes, the folder is on rank 0's only
        checkpoint, scan = ctx.from_main(functools.partial(read_resumed, run), f"reading {run.last}")
        model = build_model(cfg.arch, len(scan.classes), "none")
        load_resumed(model, checkpoint["model"], run.last)
        check_data_everywhere(ctx, scan)
        return run, scan, model, checkpoint
    scan = ctx.from_main(lambda: scan_for_training(cfg, ScanProgress(emit)), "scanning the images")
    check_data_everywhere(ctx, scan)
    # the weights before the run folder: unavailable or wrong weights leave no failed run behind
    model = build_model(cfg.arch, len(scan.classes), cfg.weights)
    run = ctx.from_main(
        lambda: RunDir.create(cfg.runs_dir, cfg.arch, cfg.resolved_strategy(), cfg.run_name),
        "creating the run folder",
    )
    return run, scan, model, None


def read_resumed(run: RunDir) -> tuple[dict, DatasetScan]:
    """A resumed run's last.pth, checked, its "model" the whole state_dict (checkpoint_model_state), and
    its split. Under torchrun rank 0 reads them and broadcasts them whole: one pickled broadcast of a
    few hundred MB at most (resnet50's model and AdamW moments) before training, which a broadcast per
    tensor would only replace with hundreds of collectives and a second copy of the structure."""
    if not run.last.is_file():
        raise FinetuneError(f"{run.path} has no last.pth to resume from (it stopped before its first epoch)")
    checkpoint = safe_load(run.last, "checkpoint")
    state = checkpoint_model_state(run, checkpoint)
    return {**cast(dict, checkpoint), "model": state}, run.read_split()


# How many of the split's files every rank opens before training: spread over the split, the same on
# every rank, enough to catch a node without the dataset or with another copy of it.
DATA_SAMPLE = 20


def check_data_everywhere(ctx: Distributed, scan: DatasetScan) -> None:
    """Under torchrun, every rank can read the dataset's folder and a sample of its files (on several
    nodes, each needs the dataset at the same path); else one line, on every rank, naming the node,
    the rank and the first path it cannot read."""
    if not ctx.enabled:
        return
    reports = ctx.all_gather((socket.gethostname(), ctx.rank, unreadable_data(scan)))
    for host, rank, path in reports:
        if path is not None:
            raise FinetuneError(
                f"rank {rank} on {host} cannot read {path}: every node needs the dataset (and the pools a "
                f"curation adds from) at the same path (a shared folder, or a copy at that path)"
            )


def unreadable_data(scan: DatasetScan) -> str | None:
    """The dataset's root, or the first of DATA_SAMPLE of its training and validation files, that this
    process cannot read; None when all can be."""
    root = Path(scan.root)
    if not root.is_dir():
        return str(root)
    items = [*scan.train, *scan.val]
    added = [item for item in scan.train if os.path.isabs(item[0])]  # a curation's pool images: other folders
    for relative, _ in items[:: max(1, math.ceil(len(items) / DATA_SAMPLE))] + added[:DATA_SAMPLE]:
        path = root / relative
        try:
            if not path.is_file():  # a regular file: opening a FIFO put there would wait
                return str(path)
            with open(path, "rb") as file:
                file.read(1)
        except OSError:
            return str(path)
    return None


def mark_running(
    cfg: TrainConfig,
    ctx: Distributed,
    device: torch.device,
    run: RunDir,
    scan: DatasetScan,
    fresh: bool,
    notes: list[str],
    pids: list,
    emit: EventCallback,
) -> None:
    """Before the first epoch: the notes logged, a new run's folder filled, and run.json says who trains."""
    for note in notes:
        emit({"type": "log", "message": note})
    if ctx.is_main and fresh:
        start_run_folder(run, cfg, scan, device, ctx)
        emit({"type": "log", "message": scan.report()})
    if ctx.is_main:  # who is training: after a restart the studio checks whether they are still alive
        run.update_info(
            status="running", pids=pids, launcher_pid=os.getppid() if ctx.enabled else None, host=os.uname().nodename
        )


def settle_failure(error: BaseException, ctx: Distributed, run: RunDir, emit: EventCallback) -> FinetuneError | None:
    """A failed run's "error" event and run.json status (each as far as a full disk allows). Returns the
    one-line error to raise instead of `error` (a full disk named, or run.json's own failure added),
    None to raise `error` itself."""
    failure = disk_full(error, run.path) or error
    message = (
        str(failure)
        if isinstance(failure, FinetuneError)
        else "interrupted"
        if isinstance(failure, KeyboardInterrupt)
        else f"{type(failure).__name__}: {failure}"
    )
    try:
        emit({"type": "error", "message": message})
    except (OSError, FinetuneError):  # the events file may lie on that full disk too
        pass
    if ctx.is_main:
        try:
            run.update_info(status="failed", error=message)
        except (OSError, FinetuneError) as problem:
            problem = disk_full(problem, run.info_path) or problem
            message += f"; {run.info_path} still says running: it could not be updated either ({problem})"
    if isinstance(failure, FinetuneError) and (failure is not error or message != str(failure)):
        return (DiskFull if isinstance(failure, DiskFull) else FinetuneError)(message)
    return None


class ScanProgress:
    """The scan's on_progress as "progress" events (at most BATCH_EVENTS_PER_SECOND, and the last one):
    listing files (total unknown), then decoding every image to check it, which takes minutes for a
    large folder. They precede the run folder, so they reach on_event only, not events.jsonl."""

    WHAT = {"walk": "listing files", "check": "checking images"}

    def __init__(self, emit: EventCallback):
        self.emit, self.last = emit, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if (total and done >= total) or now - self.last >= 1 / BATCH_EVENTS_PER_SECOND:
            self.last = now
            self.emit(
                {"type": "progress", "stage": stage, "what": self.WHAT.get(stage, stage), "done": done, "total": total}
            )


def scan_for_training(cfg: TrainConfig, on_progress: Callable[[str, int, int], None] | None = None) -> DatasetScan:
    """The split to train on: the folder's scan, with the curation file's decisions applied (the
    folder itself is never changed; split.json and the data report say what was excluded or relabelled).
    `on_progress(stage, done, total)`: see data.scan_dataset."""
    scan = scan_dataset(cfg.data, cfg.val_fraction, cfg.seed, on_progress=on_progress, labels=cfg.labels)
    if cfg.curation:
        from .curation import apply_curation, load_curation

        scan = apply_curation(scan, load_curation(cfg.curation))
    return scan


def start_run_folder(run: RunDir, cfg: TrainConfig, scan: DatasetScan, device: torch.device, ctx: Distributed) -> None:
    """What a run folder holds before the first epoch: split, report, class map, run.json."""
    curation = getattr(scan, "curation", None)  # a CuratedScan's (curation.apply_curation)
    run.write_split(scan)
    run.write_class_indices(scan.classes)
    run.write_info(
        {
            "status": "running",
            "created": datetime.now().isoformat(timespec="seconds"),
            "arch": cfg.arch,
            "strategy": cfg.resolved_strategy(),
            "num_classes": len(scan.classes),
            "classes": scan.classes,
            "image_size": cfg.image_size,
            "resize_size": resize_size(cfg.image_size),
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
            "config": cfg.to_dict(),
            "versions": versions(),
            "device": describe_device(device),
            "world_size": ctx.world_size,
            **({"curation": curation_summary(curation)} if curation else {}),
        }
    )


def curation_summary(record: dict) -> dict:
    """What run.json keeps of an applied curation (split.json has the full list)."""
    leaks = [e["path"] for e in record["excluded"] if (e.get("note") or "").startswith("leak")]
    return {
        "file": record.get("file"),
        "excluded": len(record["excluded"]),
        "relabelled": len(record["relabelled"]),
        "leaks_removed": leaks,
        "unknown_paths": len(record["unknown"]),
        "added": record.get("added", []),  # pool images trained on: path (in the pool), pool, class
        "not_added": len(record.get("not_added", [])),
    }


def _run_epochs(
    cfg, ctx, device, run: RunDir, scan: DatasetScan, model, checkpoint, emit, stop, started: float
) -> Path:
    session = setup_session(cfg, ctx, device, run, scan, model, emit)
    state = TrainState()
    if checkpoint is not None:
        state = restore_checkpoint(session, checkpoint)
        session.log(f"resuming {run.path} at epoch {state.epoch + 1}")
    start_epoch = state.epoch + 1
    announce_start(session, start_epoch)
    progress = _Progress(session, start_epoch)
    status, diverged = train_epochs(session, state, start_epoch, stop, progress)
    return finish_run(session, state, status, diverged, started, progress.run_start)


def announce_start(session: Session, start_epoch: int) -> None:
    """The "start" event, and the settled config and data pipeline in run.json."""
    cfg, ctx, device, run, scan, model, emit = (
        session.cfg,
        session.ctx,
        session.device,
        session.run,
        session.scan,
        session.model,
        session.emit,
    )
    emit(
        {
            "type": "start",
            "run_dir": str(run.path),
            "epochs": cfg.epochs,
            "start_epoch": start_epoch,
            "batches_per_epoch": session.steps_per_epoch,
            "train_images": len(scan.train),
            "val_images": len(scan.val),
            "classes": scan.classes,
            "device": describe_device(device),
            "world_size": ctx.world_size,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total_params": sum(p.numel() for p in model.parameters()),
            "pipeline": session.pipeline.description,
            "strategy": cfg.resolved_strategy(),
            "arch": cfg.arch,
        }
    )
    if ctx.is_main:
        run.update_info(config=cfg.to_dict(), pipeline=session.pipeline.description)


def train_epochs(
    session: Session, state: TrainState, start_epoch: int, stop: threading.Event, progress: _Progress
) -> tuple[str, str | None]:
    """Epochs from start_epoch until the last, a stop or early stopping: the run's status, and why the
    loss diverged when it did."""
    cfg, ctx, run, emit = session.cfg, session.ctx, session.run, session.emit
    for epoch in range(start_epoch, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        train_stats, stopped = train_one_epoch(session, epoch, stop, progress)
        if not train_stats["images"]:
            break
        record = epoch_record(session, epoch, train_stats, stopped, epoch_start)
        # the epoch's sums were read anyway: checking them costs no extra wait for the device. Every
        # rank sees the same sums, so all of them end here together.
        diverged = divergence(record, cfg.head_lr())
        if diverged is not None:
            return diverged_status(state, diverged)
        improved = state.add(record)
        early_stop = bool(cfg.early_stopping) and state.epochs_without_gain >= cfg.early_stopping
        save_checkpoint(
            session, state, improved, complete=not stopped, final=not stopped and (epoch == cfg.epochs or early_stop)
        )
        if ctx.is_main:
            run.update_info(history=state.history, best=state.best, epochs_done=epoch)
        emit(epoch_event(record, state.best))
        if stopped or (epoch < cfg.epochs and _stop_requested(ctx, stop)):
            session.log(
                f"stopped {'during' if stopped else 'after'} epoch {epoch}; keeping the best model so far "
                f"(epoch {state.best['epoch']})"
            )
            return "stopped", None
        if early_stop:
            session.log(
                f"early stopping: no improvement for {state.epochs_without_gain} epochs "
                f"(best epoch {state.best['epoch']})"
            )
            return "early-stopped", None
    return "completed", None


def epoch_record(session: Session, epoch: int, train_stats: dict, stopped: bool, epoch_start: float) -> EpochRecord:
    """The epoch's line of the history: its training sums, then a validation pass."""
    val_loss, val_acc = validate(session)
    return {
        "epoch": epoch,
        "train_loss": train_stats["train_loss"],
        "train_acc": train_stats["train_acc"],
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": session.optimizer.param_groups[0]["lr"],
        "seconds": time.perf_counter() - epoch_start,
        "complete": not stopped,
        "images": int(train_stats["images"]),
    }


def diverged_status(state: TrainState, diverged: str) -> tuple[str, str]:
    """A diverged run's status and error. Nothing of the diverged epoch is saved: model.pth (the best
    epoch) and last.pth stay finite."""
    usable = state.best["epoch"] > 0
    diverged += (
        f"; the best model so far (epoch {state.best['epoch']}) is kept"
        if usable
        else "; no epoch finished before it, so there is no model"
    )
    return ("stopped" if usable else "failed"), diverged


def finish_run(
    session: Session, state: TrainState, status: str, diverged: str | None, started: float, run_start: float
) -> Path:
    """The final evaluation, run.json's status, timing and summary, and the "end" event; raises
    TrainingDiverged after them when the loss diverged."""
    ctx, run, emit = session.ctx, session.run, session.emit
    training_end = time.perf_counter()
    metrics = final_evaluation(session, state)
    end = time.perf_counter()
    # the whole wall time and where it went: a cache built once can take far longer than the epochs
    stages = {
        "setup": run_start - started - session.pipeline_seconds,
        "cache": session.pipeline_seconds,
        "training": training_end - run_start,
        "evaluation": end - training_end,
    }
    timing = Timing(seconds=end - started, stages=stages, cache=session.pipeline.kind)
    if ctx.is_main:
        outcome: RunInfo = {
            "status": status,
            "summary": metrics
            and {
                k: metrics[k]
                for k in ("accuracy", "balanced_accuracy", "top_k_accuracy", "macro_f1", "num_images")
                if k in metrics
            },
            "seconds": timing["seconds"],
            "stages": timing["stages"],
            "cache": timing["cache"],
        }
        if diverged:
            outcome["error"] = diverged
        run.update_info(**outcome)
    if diverged is not None:
        emit({"type": "error", "message": diverged})
    emit(
        end_event(
            status,
            str(run.path),
            state.best,
            metrics and {k: v for k, v in metrics.items() if k != "misclassified"},
            summary_line(metrics) if metrics else "no epoch completed",
            timing,
        )
    )
    if diverged is not None:
        raise TrainingDiverged(diverged)
    return run.path


# ---------------------------------------------------------------------------------------------
# Final evaluation


def final_evaluation(session: Session, state: TrainState) -> dict | None:
    """Metrics of the best model on val (and test, when given): rank 0 only.

    When the pipeline cached every validation image (frozen features or eval crops), val reuses that
    cache through the trainable part: the same numbers (within float16 for layer3 features) at a
    fraction of the cost. Returns the val metrics (None when no epoch completed)."""
    s = session
    if not s.ctx.is_main or not s.run.model.is_file():
        return None
    best = torch.load(s.run.model, map_location="cpu", weights_only=True)
    save_safetensors(best, s.run.safetensors, {"format": "pt", "arch": s.cfg.arch})  # the Hub's format
    s.model.load_state_dict(best)
    s.model.eval()
    plot_history(state.history, s.run.curves)
    results, temperature = {}, 1.0
    for split in ("val", "test"):
        items = getattr(s.scan, split)
        if not items:
            continue
        logits, targets = _split_logits(s, split, items)
        if split == "val":
            temperature = calibrate_run(s, logits, targets)["temperature"]
        # confidences as prediction gives them (accuracy, top-k and the confusion matrix do not change)
        probs = softmax(logits, temperature)
        metrics = compute_metrics(targets, probs, s.scan.classes, [rel for rel, _ in items])
        metrics["history"] = state.history if split == "val" else None
        write_reports(s.run.path, metrics, prefix="" if split == "val" else "test_")
        results[split] = metrics
    return results.get("val")


def calibrate_run(s: Session, logits: np.ndarray, targets: np.ndarray) -> dict:
    """Temperature scaling on the validation set: the temperature, ECE before and after and the
    suggested min_confidence go into run.json ("calibration"), the reliability plot beside it.
    Prediction applies the temperature, and so do the confidences in metrics.json."""
    try:
        record = calibrate(logits, targets, s.run.reliability)
    except NonFiniteLogits as problem:
        s.log(f"warning: calibration skipped ({problem}); predictions use the raw probabilities")
        return {"temperature": 1.0}
    s.run.update_info(calibration=record)
    s.log(
        f"calibration on {record['val_images']} val images: temperature {record['temperature']:.3f}, "
        f"ECE {record['ece_before']:.3f} -> {record['ece_after']:.3f}; suggested min confidence "
        f"{record['suggested_min_confidence']:.2f} ({record['at_suggested']['answered']:.0%} of val answered)"
    )
    return record


def _split_logits(s: Session, split: str, items: list[tuple[str, int]]):
    if split == "val" and s.pipeline.val_covers_all:  # its loader: every val image, in order, one process
        with torch.inference_mode():
            return predict_logits(_Prepared(s.trainable, s.pipeline.prepare_eval), s.val_loader, s.device, s.amp_dtype)
    dataset = ImageListDataset(
        s.scan.root, items, eval_transform(s.cfg.image_size), min_size=resize_size(s.cfg.image_size)
    )
    loader = DataLoader(
        dataset, batch_size=s.cfg.batch_size * 2, num_workers=s.workers, pin_memory=pin_memory(s.device)
    )
    return predict_logits(s.model, loader, s.device, s.amp_dtype, s.memory_format == torch.channels_last)


class _Prepared(nn.Module):
    """The trainable part behind a pipeline's prepare_eval: cached inputs -> logits."""

    def __init__(self, trainable: nn.Module, prepare: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.trainable, self.prepare = trainable, prepare

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.trainable(self.prepare(inputs))

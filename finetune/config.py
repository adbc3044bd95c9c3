"""The one configuration shared by the CLI, the UI and the run folder (`run.json`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ARCHS = ("resnet34", "resnet50")
STRATEGIES = ("all", "last", "head")

STRATEGY_HELP = {
    "all": "every layer trains (best accuracy with enough data; slowest)",
    "last": "the last residual stage and the new head train (a good default)",
    "head": "only the new head trains on frozen ImageNet features (fastest; small data)",
}

# Head learning rate per strategy when --lr is not given (AdamW). Pretrained layers
# learn slower than the new head: see BACKBONE_LR_SCALE and model.param_groups.
DEFAULT_LR = {"all": 1e-3, "last": 1e-3, "head": 3e-3}


class FinetuneError(Exception):
    """A problem with the user's input: shown as one line, never as a traceback."""


@dataclass
class TrainConfig:
    data: str = "data"
    arch: str = "resnet34"
    strategy: str = "last"
    weights: str = "imagenet"  # "imagenet", "none", or a path to a state_dict .pth
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None  # head learning rate; None = DEFAULT_LR[strategy]
    backbone_lr_scale: float = 0.1  # pretrained layers learn at lr * this (less for earlier stages)
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    image_size: int = 224
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    workers: int | None = None  # DataLoader workers; None = sized to the cores
    class_weighted_loss: bool = False
    early_stopping: int = 0  # stop after this many epochs without val improvement; 0 = off
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 + grad scaler)
    channels_last: bool = True  # on CUDA
    compile: bool = False  # torch.compile the trainable part
    cache: str = "auto"  # auto: cache frozen features / decoded pixels within memory budget; off: stream
    cache_views: int = 2  # augmented views cached per image for frozen-feature caches (original + flipped)
    memory_budget_gb: float | None = None  # cache budget; None = a share of available RAM
    runs_dir: str = "runs"
    run_name: str | None = None  # folder name under runs_dir; None = <time>-<arch>-<strategy>
    extra: dict = field(default_factory=dict)

    def head_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    def validate(self) -> "TrainConfig":
        if self.arch not in ARCHS:
            raise FinetuneError(f"unknown architecture {self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.strategy not in STRATEGIES:
            raise FinetuneError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (32 <= self.image_size <= 1024, f"image size must be between 32 and 1024, got {self.image_size}"),
            (0 < self.val_fraction < 1, f"val fraction must be between 0 and 1, got {self.val_fraction}"),
            (self.cache in ("auto", "off"), f"cache must be 'auto' or 'off', got {self.cache!r}"),
            (self.cache_views >= 1, f"cache views must be at least 1, got {self.cache_views}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

"""The one configuration shared by the CLI, the studio and the run folder (`run.json`).

Each field carries its command-line help in its metadata (`option(...)`): `cli.build_parser`
generates the `train` options from it, so a field added here is at once an option, part of
`--config FILE.json`, recorded in run.json and passed on by the studio.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .architectures import ARCHITECTURES, architecture

ARCHS = tuple(ARCHITECTURES)  # the --arch names: one row each in architectures.py
STRATEGIES = ("all", "last", "head")
JPEG_DECODING = ("auto", "device", "workers")
AUGMENTS = ("light", "default", "strong")  # augment.py says what each does, and where
REPORTERS = ("tensorboard", "mlflow")  # --report-to: reporting.py says what each writes where
# export's file formats, here so that the command line lists them without importing torch (export.py does).
# pt2: torch.export's ExportedProgram (torch.export.load(path).module()), where torch is heading;
# torchscript stays for what only loads TorchScript (C++ libtorch, the classic scripts), deprecated in torch
EXPORT_FORMATS = ("torchscript", "onnx", "pt2")

STRATEGY_HELP = {
    "all": "every layer trains (best accuracy with enough data; slowest)",
    "last": "the last residual stage and the new head train (a good default)",
    "head": "only the new head trains on frozen ImageNet features (fastest; small data)",
}

# Head learning rate per strategy when --lr is not given (AdamW). Pretrained layers
# learn slower than the new head: see model.param_groups.
DEFAULT_LR = {"all": 1e-3, "last": 1e-3, "head": 3e-3}

# Argument groups of `finetune train --help`, in this order.
GROUPS = {
    "data": "data",
    "model": "model and weights",
    "optim": "optimisation",
    "speed": "devices and speed",
    "output": "run folder",
}


class FinetuneError(Exception):
    """A problem with the user's input: shown as one line, never as a traceback."""


def plain_folder_name(name: str) -> bool:
    """A name that makes one folder inside its parent: "../x" or "/x" would put a run elsewhere."""
    return (
        bool(name.strip())
        and name not in (".", "..")
        and not any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
    )


def default_strategy(weights: str) -> str:
    """The strategy when none is given: `all` from scratch (weights "none"): the layers another strategy
    freezes would stay random, and a head on random features learns next to nothing (chance accuracy on
    the sample data); `last` from pretrained weights."""
    return "all" if weights in ("none", "", None) else "last"


def option(
    default,
    help: str,
    group: str,
    *,
    choices=None,
    metavar: str | None = None,
    flag: str | None = None,
    positional: bool = False,
    studio: str | None = "advanced",
    rank: int = 0,
    label: str | None = None,
    info: str | None = None,
    ui: dict | None = None,
    many: bool = False,
):
    """A TrainConfig field with what the command line and the studio need to offer it.

    `flag` overrides the option name (e.g. "--no-amp" for a field that defaults to True).
    The studio's Train tab shows it by `studio`: "left" or "right" (a column of the common settings on
    top, ordered by `rank`, which also orders the start_training endpoint's parameters), "advanced"
    (the Advanced accordion, in its group), or None (not offered). `label` names it there (default:
    from the field's name), `info` explains it (default: `help`, under Advanced only) and `ui` holds
    further properties of its component (bounds, a placeholder). `many`: the value is a comma-separated
    list of `choices` ("none": none of them; `listed` reads it), a multiple choice in the studio."""
    return field(
        default=default,
        metadata={
            "help": help,
            "group": group,
            "choices": choices,
            "metavar": metavar,
            "flag": flag,
            "positional": positional,
            "studio": studio,
            "rank": rank,
            "label": label,
            "info": info,
            "ui": ui or {},
            "many": many,
        },
    )


@dataclass
class TrainConfig:
    data: str = option(
        "data",
        "image folder (class sub-folders, or train/ and val/ of them), or a .zip of one "
        "(extracted safely to ~/.cache/finetune/datasets, or $FINETUNE_DATASETS)",
        "data",
        positional=True,
        studio=None,
    )  # the studio: chosen on the Data tab
    labels: str | None = option(
        None,
        "a CSV of path,label[,split] rows for a flat folder of images (paths relative to DATA; the "
        "separator and a header are sniffed), instead of class folders",
        "data",
        metavar="FILE.csv",
        label="Labels file (CSV, optional): path,label[,split] rows instead of class folders",
        ui={"placeholder": "labels.csv"},
    )
    val_fraction: float = option(
        0.2,
        "share of each class held out for validation when DATA has no val/ folder",
        "data",
        label="Validation fraction",
        ui={"minimum": 0, "maximum": 1},
    )
    curation: str | None = option(
        None,
        "a curation.json of review decisions (exclude, relabel) to apply to DATA; the folder itself is never changed",
        "data",
        metavar="FILE",
        studio="left",
        rank=9,
        label="Curation file (optional): review decisions to apply",
        info="Filled in from the Review tab once it has decisions for this data. Excluded "
        "images are left out and relabelled ones moved; the folder is never changed. "
        "Empty: train on the folder as it is.",
        ui={"placeholder": "runs/curation.json"},
    )
    seed: int = option(0, "for the split, initialisation and augmentation", "data", studio="right", rank=8)
    image_size: int = option(
        224,
        "crop size in pixels (train and eval)",
        "data",
        studio="right",
        rank=7,
        label="Image size (pixels)",
        ui={"minimum": 32, "maximum": 1024},
    )
    arch: str = option(
        "resnet34", "ImageNet ResNet to fine-tune", "model", choices=ARCHS, studio="left", rank=1, label="Architecture"
    )
    strategy: str | None = option(
        None,
        "; ".join(f"{k}: {v}" for k, v in STRATEGY_HELP.items()) + " (default: all with --weights none, else last)",
        "model",
        choices=STRATEGIES,
        studio="left",
        rank=2,
        label="What to train (strategy)",
    )
    weights: str = option(
        "imagenet",
        "imagenet (torchvision's V1, as the classic scripts; torch hub cache, downloaded when online), "
        "imagenet-v2 (the newer weights of ResNet-50/101/152: a better start for all or last on enough data), "
        "none (from scratch), or a .pth state_dict path",
        "model",
        studio="left",
        rank=3,
        label="Starting weights",
    )
    epochs: int = option(
        5, "epochs (on --resume: the new total)", "optim", studio="right", rank=4, ui={"minimum": 1, "maximum": 1000}
    )
    batch_size: int = option(
        32, "images per training step", "optim", studio="right", rank=5, ui={"minimum": 1, "maximum": 4096}
    )
    lr: float | None = option(
        None,
        "head learning rate (default: per strategy, " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
        "optim",
        studio="right",
        rank=6,
        label="Learning rate (head; set per strategy)",
        ui={"minimum": 0},
    )
    backbone_lr_scale: float = option(
        0.1,
        "pretrained layers learn at lr x this (earlier stages less)",
        "optim",
        label="Backbone learning-rate scale",
        ui={"minimum": 0},
    )
    weight_decay: float = option(0.05, "AdamW weight decay", "optim", ui={"minimum": 0})
    augment: str = option(
        "light",
        "training augmentation: light (RandomResizedCrop and flip, as the classic scripts), default (and a "
        "little colour jitter), strong (and TrivialAugmentWide and random erasing; head and last then stream)",
        "optim",
        choices=AUGMENTS,
        label="Augmentation",
    )
    mixup: float = option(
        0.0,
        "MixUp alpha on each batch (all and last; 0: off)",
        "optim",
        label="MixUp alpha (0: off)",
        ui={"minimum": 0},
    )
    cutmix: float = option(
        0.0,
        "CutMix alpha on each batch (all and last; 0: off; with --mixup each batch takes one of them)",
        "optim",
        label="CutMix alpha (0: off)",
        ui={"minimum": 0},
    )
    ema: float = option(
        0.0,
        "keep an exponential moving average of the trained weights with this decay (e.g. 0.999; 0: off): it is "
        "what is validated each epoch and saved as model.pth",
        "optim",
        label="EMA decay (0: off)",
        ui={"minimum": 0, "maximum": 0.99999},
    )
    label_smoothing: float = option(0.1, "cross-entropy label smoothing", "optim", ui={"minimum": 0, "maximum": 1})
    warmup_epochs: float = option(
        1.0, "linear learning-rate warmup, then cosine decay", "optim", label="Warm-up epochs", ui={"minimum": 0}
    )
    class_weighted_loss: bool = option(
        False, "weight the loss by inverse class frequency (imbalanced classes)", "optim", label="Class-weighted loss"
    )
    early_stopping: int = option(
        0,
        "stop after this many epochs without improvement (0: off)",
        "optim",
        metavar="PATIENCE",
        label="Early stopping (patience in epochs)",
        ui={"minimum": 0},
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps", "speed")
    workers: int | None = option(
        None,
        "data loader processes (default: sized to this process's share of the cores)",
        "speed",
        label="Data loader workers",
        ui={"minimum": 0},
    )
    amp: bool = option(
        True,
        "no mixed precision on CUDA (default: bf16 on GPUs with bf16 units, else fp16 with a gradient scaler)",
        "speed",
        flag="--no-amp",
        label="Mixed precision (AMP) on CUDA",
        info="bf16 on GPUs with bf16 units, else fp16 with a gradient scaler",
    )
    channels_last: bool = option(
        True,
        "keep the NCHW memory layout (channels_last is faster on CUDA and x86 CPUs)",
        "speed",
        flag="--no-channels-last",
        label="channels_last memory layout",
        info="faster on CUDA and x86 CPUs",
    )
    compile: bool = option(False, "torch.compile the trainable layers", "speed", label="torch.compile")
    cache: str = option(
        "auto",
        "auto: compute frozen layers once and decode images once when it fits in memory; off: stream",
        "speed",
        choices=("auto", "off"),
        label="Feature and image cache",
    )
    cache_views: int = option(
        2,
        "augmented views per image kept in a frozen-feature cache",
        "speed",
        label="Cached views per image",
        ui={"minimum": 1},
    )
    jpeg_decode: str = option(
        "auto",
        "where streamed training JPEGs are decoded: auto (on CUDA the GPU, with nvJPEG; else workers), "
        "device (in the training process: nvJPEG on CUDA, libjpeg elsewhere) or workers (PIL)",
        "speed",
        choices=JPEG_DECODING,
        label="JPEG decoding when streaming",
    )
    memory_budget_gb: float | None = option(
        None,
        "memory for caches in GiB (default: half the free RAM)",
        "speed",
        label="Memory budget for caches (GiB)",
        ui={"minimum": 0},
    )
    # typed str: None given (the default) is replaced by __post_init__, so every reader gets a folder
    runs_dir: str = option(
        None,
        "where run folders are created (default: $FINETUNE_RUNS_DIR, else ./runs; "
        "recorded in run.json as an absolute path)",
        "output",
        studio=None,
    )  # the studio: its own runs folder (finetune-studio --runs-dir)
    run_name: str | None = option(
        None, "run folder name (default: <time>-<arch>-<strategy>)", "output", label="Run folder name"
    )
    report_to: str = option(
        "none",
        "also report the metrics of each epoch, and the run's plots and files at its end, to: none, or one or "
        "more of tensorboard (event files in the run folder's tensorboard/) and mlflow ($MLFLOW_TRACKING_URI, "
        "else sqlite:///RUNS_DIR/mlflow.db), comma-separated",
        "output",
        choices=REPORTERS,
        many=True,
        metavar="LIST",
        label="Report to",
    )
    extra: dict = field(default_factory=dict)  # free-form notes kept in run.json; not an option (nor in the studio)

    def __post_init__(self) -> None:
        # The default is resolved here, once, so the command line, the API and the studio share it and
        # run.json records the folder used: where the user is, never where finetune is installed.
        given: str | None = self.runs_dir  # None until here (the field is typed for its readers)
        if given is None:
            from .paths import default_runs_dir

            self.runs_dir = str(default_runs_dir())
        reporters: object = self.report_to  # the API takes a list too: report_to=["tensorboard", "mlflow"]
        if isinstance(reporters, (list, tuple)) and all(isinstance(name, str) for name in reporters):
            self.report_to = ",".join(reporters) if reporters else "none"

    def head_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.resolved_strategy()]

    def resolved_strategy(self) -> str:
        """The strategy given, or the default for the weights (default_strategy)."""
        return self.strategy or default_strategy(self.weights)

    def validate(self) -> TrainConfig:
        self._check_types()
        architecture(self.arch)  # the one "unknown architecture" line
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise FinetuneError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (32 <= self.image_size <= 1024, f"image size must be between 32 and 1024, got {self.image_size}"),
            (0 < self.val_fraction < 1, f"val fraction must be between 0 and 1, got {self.val_fraction}"),
            (self.cache in ("auto", "off"), f"cache must be 'auto' or 'off', got {self.cache!r}"),
            (
                self.jpeg_decode in JPEG_DECODING,
                f"jpeg decode must be one of {', '.join(JPEG_DECODING)}, got {self.jpeg_decode!r}",
            ),
            (self.augment in AUGMENTS, f"augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"),
            (
                self.mixup >= 0 and self.cutmix >= 0,
                f"mixup and cutmix must be 0 or more, got {self.mixup}, {self.cutmix}",
            ),
            (
                not (self.mixup or self.cutmix) or self.resolved_strategy() != "head",
                "mixup and cutmix need strategy all or last: head trains on pooled vectors, with nothing to cut",
            ),
            (0 <= self.ema < 1, f"ema decay must be 0 (off) or between 0 and 1, got {self.ema}"),
            (
                self.run_name is None or plain_folder_name(self.run_name),
                f"run name must be a plain folder name (no / or \\, not . or .., no control characters), "
                f"got {self.run_name!r}",
            ),
            (self.cache_views >= 1, f"cache views must be at least 1, got {self.cache_views}"),
            (self.workers is None or self.workers >= 0, f"workers must be 0 or more, got {self.workers}"),
            (self.early_stopping >= 0, f"early stopping must be 0 or more, got {self.early_stopping}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FinetuneError(message)
        self._check_reporters()
        return self

    def _check_reporters(self) -> None:
        """Each --report-to name known, and its library installed (one line naming the extra to install)."""
        for name in listed(self.report_to):
            if name not in REPORTERS:
                raise FinetuneError(
                    f"report to {self.report_to!r}: unknown {name!r}, give none or a comma-separated list of "
                    f"{', '.join(REPORTERS)}"
                )
        from .reporting import check_installed  # here: reporting imports this module

        check_installed(listed(self.report_to))

    def _check_types(self) -> None:
        """Values from a config file or the studio must have the field's type ("5" is not an epoch count)."""
        accepted = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "dict": (dict,)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = field_type(f)
            if value is None and optional:
                continue
            kinds = accepted[base]
            if not isinstance(value, kinds) or (base != "bool" and isinstance(value, bool)):
                raise FinetuneError(
                    f"option {f.name} must be {'a number' if base in ('int', 'float') else 'a ' + base}"
                    f"{' (whole)' if base == 'int' else ''}, got {value!r}"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def save(self, path: str | Path) -> Path:
        from .fsutil import write_text_atomic  # here: fsutil imports FinetuneError from this module

        path = Path(path)
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A configuration file (as `save` or run.json's "config" writes it); unknown keys are an error,
        so a typo is not silently ignored."""
        from .fsutil import read_json  # here: fsutil imports FinetuneError from this module

        path = Path(path).expanduser()
        values = read_json(path, "config file")
        if isinstance(values, dict) and isinstance(values.get("config"), dict):
            # a run.json: its runs_dir is where that run was made (recorded absolute, perhaps on another
            # machine), not where a new one goes: that is --runs-dir, else the default
            values = {k: v for k, v in values["config"].items() if k != "runs_dir"}
        if not isinstance(values, dict):
            raise FinetuneError(f"{path} must hold a JSON object of training options")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FinetuneError(f"{path}: unknown option {unknown[0]!r}")
        try:
            return cls(**values)
        except TypeError as error:
            raise FinetuneError(f"{path}: {error}") from None


def listed(value: str) -> list[str]:
    """The names of a comma-separated option (`option(many=True)`): "tensorboard, mlflow" -> ["tensorboard",
    "mlflow"]; "none" or "" -> []."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    return [] if names == ["none"] else names


def default_of(name: str) -> Any:
    """TrainConfig's default for the field `name`: the one value the split (val_fraction, seed) and the
    other options have wherever they are a parameter (scan, doctor, studio), so none can drift from training's."""
    default = {f.name: f for f in dataclasses.fields(TrainConfig)}[name].default
    if default is dataclasses.MISSING:
        raise TypeError(f"TrainConfig.{name} has no plain default")
    return default


def cli_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields offered on the command line, in declaration order."""
    return [f for f in dataclasses.fields(TrainConfig) if "group" in f.metadata]


def field_type(f: dataclasses.Field) -> tuple[str, bool]:
    """("int" | "float" | "str" | "bool" | "dict", whether None is accepted) of a TrainConfig field
    (its annotation is a string: this module postpones annotations)."""
    base, _, optional = str(f.type).partition(" | ")
    return base, bool(optional)


def studio_fields() -> list[dataclasses.Field]:
    """The TrainConfig fields the studio's Train tab offers (option(studio=...)), in declaration order."""
    return [f for f in cli_fields() if f.metadata["studio"] is not None]


def studio_label(f: dataclasses.Field) -> str:
    """The field's name on the Train tab."""
    return f.metadata["label"] or f.name.replace("_", " ").capitalize()


def cli_flag(f: dataclasses.Field) -> str:
    """The field's option on the command line (--class-weighted-loss, --no-amp)."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")

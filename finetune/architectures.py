"""One table of what finetune knows about each architecture (after fastai's `model_meta`).

A row (`Architecture`) names the torchvision builder, the ImageNet weights torchvision downloads for
it, its label in the studio and its feature sizes; its `Layout`, shared by every ResNet, names the
stages, where each strategy cuts the network into a frozen front and a trainable back, and the
Grad-CAM layer. `model.py`, `explain.py`, `config.ARCHS` and the studio read this table and nothing
else, so ResNet-18, -101 and -152 are rows like the others.

The module imports neither torch nor torchvision at import time: `config` (the layer every other
module stands on) derives `ARCHS` from it, and `finetune --help` must stay quick.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

# torch.hub.HASH_REGEX: the hash prefix torch.hub checks (check_hash=True) is the one in the file name.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")


@dataclass(frozen=True)
class Weights:
    """ImageNet weights as torchvision publishes them: a member of its weights enum and its download URL."""

    enum: str  # "<Enum>.<member>" in torchvision.models, e.g. "ResNet34_Weights.IMAGENET1K_V1"
    url: str

    @property
    def file_name(self) -> str:
        """The name torchvision saves the download under, in $TORCH_HOME/hub/checkpoints."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        """The start of the file's sha256 that torch.hub checks after a download."""
        found = _HASH_IN_NAME.search(self.file_name)
        return found.group(1) if found else ""

    def member(self):
        """The torchvision enum member itself (imports torchvision)."""
        from torchvision import models

        enum_name, member_name = self.enum.split(".")
        return getattr(getattr(models, enum_name), member_name)


# --weights names of torchvision's ImageNet weights -> the version. V1 is the default: what the classic
# scripts download, and it transfers well as fixed features (Kornblith et al. 2019: the regularisation
# that makes V2 better on ImageNet can hurt frozen-feature transfer). V2 (torchvision's newer recipe,
# ResNet-50 80.9% top-1 against 76.1%) is the better start for `all` or `last` on enough data.
IMAGENET_WEIGHTS_NAMES = {"imagenet": "V1", "imagenet-v1": "V1", "imagenet-v2": "V2"}


def imagenet_version(weights: str | None) -> str | None:
    """ "V1" or "V2" for a --weights name of torchvision's ImageNet weights; None for none or a file."""
    return IMAGENET_WEIGHTS_NAMES.get(weights or "")


@dataclass(frozen=True)
class Stage:
    name: str
    modules: tuple[str, ...]  # the model's attributes that make up the stage, in forward order
    lr_factor: float  # pretrained stages learn at head_lr * backbone_lr_scale * this


@dataclass(frozen=True)
class Layout:
    """How a family of torchvision models is put together, and where the strategies cut it."""

    family: str
    stages: tuple[Stage, ...]
    pool: tuple[str, ...]  # between the last stage and the head, then flattened
    head: str  # the classifier finetune replaces
    cuts: tuple[tuple[str, int], ...]  # strategy -> how many stages, from the front, it freezes
    gradcam: tuple[str, int]  # (stage attribute, block index): the layer Grad-CAM looks at
    reductions: tuple[int, ...]  # each stage's output stride (input size / feature map size)

    def cut(self, strategy: str) -> int:
        for name, frozen in self.cuts:
            if name == strategy:
                return frozen
        from .config import FinetuneError

        raise FinetuneError(f"unknown strategy {strategy!r}")

    def frozen_stages(self, strategy: str) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages[: self.cut(strategy)])

    def frozen_modules(self, strategy: str) -> tuple[str, ...]:
        """The attributes `strategy` freezes (their state_dict keys start with these names)."""
        modules = tuple(name for stage in self.stages[: self.cut(strategy)] for name in stage.modules)
        return modules + self.pool if self.cut(strategy) == len(self.stages) else modules

    def attributes(self) -> tuple[str, ...]:
        """Every attribute a model of this layout has; the Grad-CAM stage first (the most telling one missing)."""
        names = [self.gradcam[0], *(name for stage in self.stages for name in stage.modules), *self.pool, self.head]
        return tuple(dict.fromkeys(names))

    def missing(self, model: object) -> str | None:
        return next((name for name in self.attributes() if not hasattr(model, name)), None)

    def gradcam_layer(self, model: nn.Module) -> nn.Module:
        stage, block = self.gradcam
        return getattr(model, stage)[block]


# Every torchvision ResNet (18 to 152): a stem, four residual stages, average pooling and `fc`. Earlier,
# more generic stages learn slower (fastai's discriminative learning rates).
RESNET = Layout(
    family="ResNet",
    stages=(
        Stage("stem", ("conv1", "bn1", "relu", "maxpool"), 0.1),
        Stage("layer1", ("layer1",), 0.1),
        Stage("layer2", ("layer2",), 0.25),
        Stage("layer3", ("layer3",), 0.5),
        Stage("layer4", ("layer4",), 1.0),
    ),
    pool=("avgpool",),
    head="fc",
    cuts=(("all", 0), ("last", 4), ("head", 5)),
    # layer4's 7x7 (at 224 px) cells still know where they are in the image
    gradcam=("layer4", -1),
    reductions=(4, 4, 8, 16, 32),
)


@dataclass(frozen=True)
class Architecture:
    name: str  # the --arch value, recorded in run.json
    title: str  # "ResNet-34"
    note: str  # what to choose it for, shown beside the title
    builder: str  # the torchvision.models function
    weights: Weights | None  # ImageNet V1; None: no ImageNet weights known (--weights none or a file only)
    channels: tuple[int, ...]  # each stage's output channels (the last: the head's input features)
    layout: Layout = RESNET
    weights_v2: Weights | None = None  # torchvision's IMAGENET1K_V2, where it has them

    def imagenet(self, version: str) -> Weights | None:
        """The ImageNet weights of that version ("V1", "V2"), None where torchvision has none."""
        return self.weights_v2 if version == "V2" else self.weights

    @property
    def label(self) -> str:
        """What the studio shows for it."""
        return f"{self.title} ({self.note})" if self.note else self.title

    @property
    def num_features(self) -> int:
        return self.channels[-1]

    def build(self, num_classes: int = 1000) -> nn.Module:
        """The torchvision model, randomly initialised (in training mode, as torchvision builds it)."""
        from torchvision import models

        return getattr(models, self.builder)(weights=None, num_classes=num_classes)

    def feature_shape(self, strategy: str, image_size: int) -> tuple[int, ...]:
        """What the frozen front computes for one image: the pooled vector (`head`), the last frozen stage's
        map (`last`), the image itself (`all`)."""
        frozen = self.layout.cut(strategy)
        if frozen == len(self.layout.stages):
            return (self.num_features,)
        if frozen == 0:
            return (3, image_size, image_size)
        # every strided convolution and pooling here pads so that it halves a size rounding up
        side = image_size
        for _ in range(int(math.log2(self.layout.reductions[frozen - 1]))):
            side = -(-side // 2)
        return (self.channels[frozen - 1], side, side)

    def state_keys(self) -> frozenset[str]:
        """The state_dict keys of the body (not the head, not BatchNorm's num_batches_tracked, which old
        checkpoints lack): built on the meta device, so no memory and no initialisation."""
        import torch

        with torch.device("meta"):
            model = self.build()
        return frozenset(key for key in model.state_dict() if not _ignored_key(key, self.layout.head))


def _ignored_key(key: str, head: str) -> bool:
    return key.startswith(head + ".") or key.endswith(".num_batches_tracked")


def _torchvision(arch: str, version: str, file_hash: str) -> Weights:
    """torchvision's ImageNet weights for a ResNet (the test checks each against torchvision's enum)."""
    enum = f"ResNet{arch.removeprefix('resnet')}_Weights.IMAGENET1K_{version}"
    return Weights(enum, f"https://download.pytorch.org/models/{arch}-{file_hash}.pth")


BASIC, BOTTLENECK = (64, 64, 128, 256, 512), (64, 256, 512, 1024, 2048)  # each stage's output channels

ARCHITECTURES: Mapping[str, Architecture] = MappingProxyType(
    {
        arch.name: arch
        for arch in (
            Architecture(
                "resnet18",
                "ResNet-18",
                "fastest, smallest",
                "resnet18",
                _torchvision("resnet18", "V1", "f37072fd"),
                BASIC,
            ),
            Architecture(
                "resnet34", "ResNet-34", "faster", "resnet34", _torchvision("resnet34", "V1", "b627a593"), BASIC
            ),
            Architecture(
                "resnet50",
                "ResNet-50",
                "more accurate, slower",
                "resnet50",
                _torchvision("resnet50", "V1", "0676ba61"),
                BOTTLENECK,
                weights_v2=_torchvision("resnet50", "V2", "11ad3fa6"),
            ),
            Architecture(
                "resnet101",
                "ResNet-101",
                "deeper, slower",
                "resnet101",
                _torchvision("resnet101", "V1", "63fe2227"),
                BOTTLENECK,
                weights_v2=_torchvision("resnet101", "V2", "cd907fc2"),
            ),
            Architecture(
                "resnet152",
                "ResNet-152",
                "deepest, slowest",
                "resnet152",
                _torchvision("resnet152", "V1", "394f9c45"),
                BOTTLENECK,
                weights_v2=_torchvision("resnet152", "V2", "f82ba261"),
            ),
        )
    }
)


def architecture(arch: str | Architecture) -> Architecture:
    """The table's row for an --arch name (a row passes through: a caller may bring its own)."""
    if isinstance(arch, Architecture):
        return arch
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    from .config import FinetuneError

    raise FinetuneError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")


def arch_choices() -> list[tuple[str, str]]:
    """(label, name) per architecture, for a Gradio Radio or Dropdown."""
    return [(arch.label, arch.name) for arch in ARCHITECTURES.values()]


def layout_of(model: nn.Module, doing: str = "use") -> Layout:
    """The layout of a model the table's architectures build; FinetuneError naming what it lacks."""
    layouts = list(dict.fromkeys(arch.layout for arch in ARCHITECTURES.values()))
    for layout in layouts:
        if layout.missing(model) is None:
            return layout
    from .config import FinetuneError

    raise FinetuneError(
        f"cannot {doing} a {type(model).__name__}: it has no {layouts[0].missing(model)} "
        f"(not a {' or '.join(layout.family for layout in layouts)})"
    )


def infer_architecture(keys: Iterable[str], candidates: Iterable[Architecture] | None = None) -> Architecture | None:
    """The architecture whose body has exactly these state_dict keys (None: none has)."""
    rows = list(ARCHITECTURES.values() if candidates is None else candidates)
    keys = set(keys)
    for arch in rows:
        if {key for key in keys if not _ignored_key(key, arch.layout.head)} == arch.state_keys():
            return arch
    return None

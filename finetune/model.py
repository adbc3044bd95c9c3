"""The table's architectures (architectures.py) with a new head, ImageNet weights, and the three freezing
strategies.

A model is split in two for training: `frozen` (computes features that never change, run
without gradients in eval mode) and `trainable` (everything that learns). Their composition is
the plain torchvision model, so `model.pth` stays a classic state_dict.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .architectures import Architecture, Weights, architecture, imagenet_version, layout_of
from .config import FinetuneError
from .fsutil import open_user_file


def stage_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {stage.name: [getattr(model, name) for name in stage.modules] for stage in layout_of(model).stages}


def frozen_modules(model: nn.Module, strategy: str) -> list[nn.Module]:
    """The modules `strategy` freezes (apply_strategy turns their gradients off)."""
    return [getattr(model, name) for name in layout_of(model).frozen_modules(strategy)]


def imagenet_weights(arch: str | Architecture, weights: str = "imagenet") -> Weights:
    """The architecture's ImageNet weights of that name (imagenet = imagenet-v1, imagenet-v2);
    FinetuneError when the table knows none."""
    spec = architecture(arch)
    version = imagenet_version(weights) or "V1"
    found = spec.imagenet(version)
    if found is None and version == "V1":
        raise FinetuneError(
            f"no ImageNet weights are known for {spec.name}: pass --weights PATH to a state_dict "
            f"file, or --weights none to train from scratch"
        )
    if found is None:
        raise FinetuneError(
            f"torchvision has no ImageNet {version} weights for {spec.name} (only ResNet-50, 101 and 152 have "
            f"them): use --weights imagenet (V1), a state_dict file, or none"
        )
    return found


def imagenet_weights_path(arch: str | Architecture, weights: str = "imagenet") -> Path:
    """Where torchvision keeps (and looks for) the downloaded ImageNet checkpoint."""
    return Path(torch.hub.get_dir()) / "checkpoints" / imagenet_weights(arch, weights).file_name


# The most bytes of tensors one weights file may unpack to. ResNet-50, the largest architecture here,
# is 102 MB of float32, and last.pth holds about three times that (AdamW keeps two moments per weight);
# ten times the model leaves room for other checkpoints (another optimizer, an EMA copy, float64).
MAX_WEIGHTS_BYTES = 1 << 30


def _check_weights_archive(file, path: Path, what: str) -> None:
    """Refuse, before torch.load reads it, a file whose tensors would unpack to more than it holds.

    torch.save writes a zip of uncompressed records, but torch.load also accepts compressed ones: a
    522 KB file of deflated zeros loaded as a 512 MB tensor. So every record must be stored, and all of
    them together must fit in the file (records sharing their bytes would multiply them) and under
    MAX_WEIGHTS_BYTES. The legacy format (before PyTorch 1.6) allocates whatever sizes its pickle
    claims before reading them, so it is refused too."""
    head = file.read(4)
    file.seek(0)
    if not zipfile.is_zipfile(file):
        if head[:1] == b"\x80":  # a bare pickle stream: torch's legacy format
            raise FinetuneError(
                f"refusing {what} {path}: it is in torch's legacy format (before PyTorch 1.6), whose tensors "
                f"may claim any size; load it where you trust it and save it again with torch.save"
            )
        raise FinetuneError(f"cannot read {what} {path}: not a file torch.save writes (a zip archive)")
    try:
        with zipfile.ZipFile(file) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise FinetuneError(f"cannot read {what} {path}: not a readable zip archive ({error})") from None
    total = 0
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise FinetuneError(
                f"refusing {what} {path}: its record {record.filename!r} is compressed, which torch.save never "
                f"does (it could unpack to far more than the file holds)"
            )
        total += record.file_size
    size = os.fstat(file.fileno()).st_size
    if total > size:
        raise FinetuneError(
            f"refusing {what} {path}: its records claim {total:,} bytes, more than the file's "
            f"{size:,} (records sharing their data?)"
        )
    if total > MAX_WEIGHTS_BYTES:
        raise FinetuneError(
            f"refusing {what} {path}: it holds {total / 1e6:,.0f} MB, more than the "
            f"{MAX_WEIGHTS_BYTES / 1e6:,.0f} MB a ResNet checkpoint needs"
        )


def safe_load(path: str | Path, what: str = "file") -> object:
    """torch.load that never runs code from the file, never waits on a FIFO, never unpacks compressed
    records (see _check_weights_archive); clear one-line errors. Every .pth goes through here."""
    path = Path(path).expanduser()
    with open_user_file(path, what) as file:
        _check_weights_archive(file, path, what)
        file.seek(0)
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise FinetuneError(
                f"refusing to load {path}: it holds pickled Python objects, not plain tensors "
                f"(only weights_only files are loaded){': ' + first if first else ''}"
            ) from None
        except Exception as error:  # noqa: BLE001 - corrupt zip, wrong format, truncated file
            raise FinetuneError(f"cannot read {what} {path}: {type(error).__name__}: {error}") from None


def load_safetensors(path: str | Path, what: str = "model") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file (a JSON header and raw bytes: no code can run), as a state_dict
    on the CPU; a file over MAX_WEIGHTS_BYTES or that safetensors refuses is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path).expanduser()
    with open_user_file(path, what) as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_WEIGHTS_BYTES:
            raise FinetuneError(f"refusing {what} {path}: {size / 1e6:,.0f} MB, more than a ResNet needs")
        data = file.read()
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise FinetuneError(f"cannot read {what} {path}: not a safetensors file ({error})") from None


def load_imagenet_state_dict(arch: str | Architecture, weights: str = "imagenet") -> dict[str, torch.Tensor]:
    """From the torch hub cache, downloading it there when online; clear error when neither."""
    spec = architecture(arch)
    path = imagenet_weights_path(spec, weights)
    if not path.is_file():
        try:
            torch.hub.load_state_dict_from_url(imagenet_weights(spec, weights).url, progress=True, check_hash=True)
        except Exception as error:  # noqa: BLE001 - offline, proxy, disk full: all mean "not available"
            named = "ImageNet V2 weights" if imagenet_version(weights) == "V2" else "ImageNet weights"
            raise FinetuneError(
                f"{named} for {spec.name} are not available: expected {path} and the download "
                f"failed ({type(error).__name__}). Put {path.name} there (or set TORCH_HOME), pass "
                f"--weights PATH to a state_dict file, or --weights none to train from scratch"
            ) from None
    return state_dict_from(safe_load(path, "ImageNet weights"), path)


def require_finite(state_dict: dict, source: str | Path) -> None:
    """FinetuneError naming the first tensor of `state_dict` that holds nan or inf values."""
    for name, tensor in state_dict.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            what = "nan" if torch.isnan(tensor).any() else "infinite"
            raise FinetuneError(
                f"refusing the weights in {source}: {name} holds {what} values (a diverged or damaged model)"
            )


def state_dict_from(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state_dict, or a checkpoint dict that holds one under 'model'/'state_dict';
    its values must be finite (require_finite)."""
    if isinstance(obj, dict):
        state: dict = obj
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            require_finite(state, path)
            return {k.removeprefix("module."): v for k, v in state.items()}
    raise FinetuneError(f"{path} is not a state_dict (a dict of parameter name -> tensor)")


def weights_available(arch: str | Architecture, weights: str) -> tuple[bool, str]:
    """(ok, message) for the UI and CLI to say before training whether the weights can be had."""
    if weights == "none":
        return True, "training from scratch (no pretrained weights)"
    if imagenet_version(weights):
        try:
            path = imagenet_weights_path(arch, weights)
        except FinetuneError as error:
            return False, str(error).split(":")[0]
        if path.is_file():
            return True, f"ImageNet weights found at {path}"
        return False, f"ImageNet weights not cached: expected {path} (downloaded on first use when online)"
    path = Path(weights).expanduser()
    return path.is_file(), (f"weights file {path}" if path.is_file() else f"weights file not found: {path}")


def build_model(arch: str | Architecture, num_classes: int, weights: str = "imagenet") -> nn.Module:
    """The architecture's torchvision model with pretrained backbone (ImageNet, a local file, or none) and a
    new head. `arch`: a name in the table, or a row of one's own."""
    spec = architecture(arch)
    model = spec.build()
    if imagenet_version(weights):
        backbone = load_imagenet_state_dict(spec, weights)
    elif weights in ("none", "", None):
        backbone = None
    else:
        path = Path(weights).expanduser()
        backbone = state_dict_from(safe_load(path, "weights file"), path)
    if backbone is not None:
        load_backbone(model, backbone, source=str(weights))
    name = spec.layout.head
    setattr(model, name, nn.Linear(spec.num_features, num_classes))
    head = getattr(model, name)
    if backbone is not None and backbone[f"{name}.weight"].shape == head.weight.shape:
        # a fine-tuned model with the same classes: keep its head too
        head.load_state_dict({"weight": backbone[f"{name}.weight"], "bias": backbone[f"{name}.bias"]})
    return model


def load_backbone(model: nn.Module, state_dict: dict, source: str) -> None:
    head = layout_of(model, "load weights into").head
    body = {k: v for k, v in state_dict.items() if not k.startswith(f"{head}.")}
    expected = {k for k in model.state_dict() if not k.startswith(f"{head}.")}
    missing = sorted(expected - set(body))
    if missing or f"{head}.weight" not in state_dict:
        raise FinetuneError(
            f"weights {source} do not fit {type(model).__name__}: missing {missing[:3] or [f'{head}.weight']}"
            f"{' ...' if len(missing) > 3 else ''} (wrong --arch?)"
        )
    try:
        model.load_state_dict(body, strict=False)
    except RuntimeError as error:
        detail = next((ln.strip() for ln in str(error).splitlines() if "size mismatch" in ln), str(error))
        raise FinetuneError(f"weights {source} do not fit this architecture: {detail} (wrong --arch?)") from None


def load_classifier(arch: str | Architecture, state_dict: dict, num_classes: int, source: str) -> nn.Module:
    """A fine-tuned model for prediction (`state_dict` as state_dict_from gives it); the head must
    match the class list."""
    spec = architecture(arch)
    arch = spec.name
    head = state_dict.get(f"{spec.layout.head}.weight")
    if head is None:
        raise FinetuneError(f"{source} has no classifier head ({spec.layout.head}.weight): not a fine-tuned {arch}")
    if head.shape[0] != num_classes:
        raise FinetuneError(f"{source} has a {head.shape[0]}-class head but the class list has {num_classes} classes")
    model = spec.build(num_classes)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:
        detail = next((ln.strip() for ln in str(error).splitlines() if "size mismatch" in ln), "keys differ")
        raise FinetuneError(f"{source} does not fit {arch}: {detail} (wrong --arch?)") from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Strategies


class Frozen(nn.Module):
    """The frozen front of the network: always eval mode, never gradients."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.body.requires_grad_(False)
        self.train(False)  # torchvision builds models in training mode

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)  # BatchNorm running statistics must not move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def split_model(model: nn.Module, strategy: str) -> tuple[nn.Module, nn.Module]:
    """(frozen, trainable) modules sharing the model's parameters; trainable(frozen(x)) == model(x)."""
    layout = layout_of(model, "split")
    cut = layout.cut(strategy)
    front, back = (
        [getattr(model, name) for stage in stages for name in stage.modules]
        for stages in (layout.stages[:cut], layout.stages[cut:])
    )
    pool = [*(getattr(model, name) for name in layout.pool), nn.Flatten(1)]
    head = getattr(model, layout.head)
    if not front:
        return nn.Identity(), nn.Sequential(*back, *pool, head)
    if not back:
        return Frozen([*front, *pool]), head
    return Frozen(front), nn.Sequential(*back, *pool, head)


def apply_strategy(model: nn.Module, strategy: str) -> None:
    """requires_grad off for every frozen parameter (the head always trains)."""
    model.requires_grad_(True)
    for module in frozen_modules(model, strategy):
        module.requires_grad_(False)


def param_groups(
    model: nn.Module, strategy: str, head_lr: float, backbone_scale: float, pretrained: bool
) -> list[dict]:
    """AdamW groups: the head at head_lr, each trainable pretrained stage slower (none frozen)."""
    layout = layout_of(model)
    groups = [{"params": list(getattr(model, layout.head).parameters()), "lr": head_lr, "name": "head"}]
    for stage in layout.stages[layout.cut(strategy) :]:
        scale = backbone_scale * stage.lr_factor if pretrained else 1.0
        params = [p for name in stage.modules for p in getattr(model, name).parameters()]
        groups.append({"params": params, "lr": head_lr * scale, "name": stage.name})
    return groups

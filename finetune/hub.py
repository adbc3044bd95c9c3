"""A run as a self-contained model folder in the Hugging Face layout, read back, and pushed to the Hub.

    model.safetensors    the weights: a plain torchvision state_dict, as safetensors
    config.json          arch, classes in index order, preprocessing, calibration (`format`: HF_FORMAT)
    README.md            the model card (model_card.py), with the front matter the Hub reads
    class_indices.json   the classic class map, 4-space indent
    confusion_matrix.png, reliability.png, training_curves.png: the card's images (those the run has)

`finetune predict DIR` and `finetune.load(DIR)` take such a folder (`read_hf_folder`). Nothing of the
machine it was made on goes in: no paths, no data file names, only counts (see model_card.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .config import FinetuneError
from .fsutil import JSON_ERRORS, read_json, write_text_atomic
from .rundir import RunDir, class_indices_json, save_safetensors

HF_FORMAT = "finetune-hf/1"
CONFIG, WEIGHTS, CARD, CLASSES = "config.json", "model.safetensors", "README.md", "class_indices.json"
IMAGES = ("confusion_matrix.png", "reliability.png", "training_curves.png")
FILES = (WEIGHTS, CONFIG, CARD, CLASSES, *IMAGES)  # what an export writes (and may replace)
DEFAULT_FOLDER = "hf"  # in the run folder
MAX_IMAGE_BYTES = 32 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def hf_config(predictor) -> dict:
    """config.json: what a program needs beside the weights to answer as `finetune predict` does."""
    from . import __version__
    from .architectures import architecture

    classes = list(predictor.classes)
    return {
        "format": HF_FORMAT,
        "finetune_version": __version__,
        "arch": predictor.arch,
        "torchvision_model": architecture(predictor.arch).builder,
        "num_classes": len(classes),
        "classes": classes,
        "id2label": {str(i): name for i, name in enumerate(classes)},
        "label2id": {name: i for i, name in enumerate(classes)},
        "image_size": predictor.image_size,
        "resize_size": predictor.min_size,
        "mean": list(predictor.transform_mean),
        "std": list(predictor.transform_std),
        "temperature": predictor.temperature,
        "min_confidence": predictor.suggested_min_confidence,
        "preprocessing": "RGB; resize the short side to resize_size (bilinear, antialiased); centre crop "
        "image_size; scale to [0, 1]; normalise with mean and std",
        "probabilities": "softmax(logits / temperature); answer 'unknown' when the top one < min_confidence",
    }


def is_hf_folder(path: str | Path) -> bool:
    """A folder an export wrote (its config.json says HF_FORMAT)."""
    config = Path(path) / CONFIG
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, *JSON_ERRORS):
        return False
    return isinstance(data, dict) and data.get("format") == HF_FORMAT


def check_target(out: Path) -> None:
    """`out` may be new, an empty folder or an earlier export; anything else is the user's: refused."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FinetuneError(f"{out} exists and is not a folder: give --out a new folder")
    if out.is_dir() and any(out.iterdir()) and not is_hf_folder(out):
        raise FinetuneError(
            f"{out} is a folder with other files in it (not an earlier hf export): give --out a new or empty "
            f"folder; nothing was written"
        )


def export_hf(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """The run's model folder in `out` (default: RUN/hf), written beside it and moved in when complete;
    an earlier export there is replaced, file by file (other files in it are left as they are)."""
    run = RunDir(Path(run_dir).expanduser())
    out = Path(out).expanduser() if out is not None else run.path / DEFAULT_FOLDER
    from .predict import Predictor

    predictor = Predictor.from_run(run.path, device="cpu")  # every field checked, the weights loaded
    check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write_folder(staging, run, predictor)
        move_into(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def write_folder(folder: Path, run: RunDir, predictor) -> None:
    from .model_card import model_card

    config = hf_config(predictor)
    metadata = {"format": "pt", "arch": predictor.arch, "finetune": HF_FORMAT}
    save_safetensors(predictor.model.state_dict(), folder / WEIGHTS, metadata)
    write_text_atomic(folder / CONFIG, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(folder / CLASSES, class_indices_json(config["classes"]))
    images = [name for name in IMAGES if copy_png(run.path / name, folder / name)]
    try:
        metrics: dict | None = run.metrics()
    except FinetuneError:  # no evaluation yet, or unreadable: the card says so
        metrics = None
    try:
        split = run.read_split()
    except FinetuneError:
        split = None
    card = model_card(config, dict(run.info()), metrics, split, images)
    write_text_atomic(folder / CARD, card)


def copy_png(source: Path, target: Path) -> bool:
    """Copy a run's plot when it is a plain PNG file: never what a link points at (a run folder may come
    from anyone, and the folder may be pushed to the Hub: a link to a private file must not go with it)."""
    try:
        if source.is_symlink() or not source.is_file() or source.stat().st_size > MAX_IMAGE_BYTES:
            return False
        data = source.read_bytes()
    except OSError:
        return False
    if not data.startswith(PNG_SIGNATURE):
        return False
    target.write_bytes(data)
    return True


def move_into(staging: Path, out: Path) -> None:
    """The staged files into `out`: the whole folder renamed when `out` is new (or empty), else each of
    FILES replaced (one the run no longer has removed), so a reader never sees half a file."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        staging.rename(out)
        staging.mkdir()  # for the caller's clean-up
        return
    for name in FILES:
        if (staging / name).is_file():
            os.replace(staging / name, out / name)
        elif (out / name).is_file() or (out / name).is_symlink():
            (out / name).unlink()


def read_hf_folder(path: str | Path) -> tuple[dict, dict]:
    """(config.json, the state_dict) of an exported folder, each field checked as run.json's are (a
    folder from the Hub is a stranger's): a one-line FinetuneError naming the file otherwise."""
    from .data import resize_size
    from .model import load_safetensors, state_dict_from
    from .predict import check_run_fields, read_class_indices

    folder = Path(path).expanduser()
    config_path = folder / CONFIG
    config = read_json(config_path, "model config")
    if not isinstance(config, dict) or config.get("format") != HF_FORMAT:
        raise FinetuneError(f"{config_path} is not a finetune model folder's config (format {HF_FORMAT!r})")
    missing = [key for key in ("arch", "classes", "image_size", "mean", "std", "temperature") if key not in config]
    if missing or not config["classes"]:
        raise FinetuneError(f"{config_path} has no {', '.join(missing) or 'classes'}: not a finetune model folder's")
    check_run_fields({**config, "calibration": {}}, config_path)
    threshold = config.get("min_confidence")
    if threshold is not None and not (isinstance(threshold, (int, float)) and 0 <= threshold <= 1):
        raise FinetuneError(f"{config_path}: its 'min_confidence' must be a number from 0 to 1 or null")
    if config.get("resize_size", resize_size(config["image_size"])) != resize_size(config["image_size"]):
        raise FinetuneError(f"{config_path}: its 'resize_size' is not the one finetune uses for its image_size")
    if (folder / CLASSES).is_file() and read_class_indices(folder / CLASSES) != config["classes"]:
        raise FinetuneError(f"{folder / CLASSES} does not match the classes in {config_path}")
    weights = folder / WEIGHTS
    return config, state_dict_from(load_safetensors(weights), weights)


# ---------------------------------------------------------------------------------------------
# The Hub


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Export the run (`export_hf`, into a temporary folder: only what the export writes goes up) and
    upload it to the model repository `repo_id` (created when missing; `private` only then), with
    `token` or the user's own (`hf auth login`, or $HF_TOKEN). Returns the repository's URL."""
    from .extras import require

    hub = require("huggingface_hub")
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise FinetuneError(f"not a Hub repository id {repo_id!r}: {str(error).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise FinetuneError(f"give the repository as USER/NAME (or ORG/NAME), not {repo_id!r}")
    if constants.HF_HUB_OFFLINE:  # read from the environment when huggingface_hub is imported
        raise FinetuneError("offline (HF_HUB_OFFLINE is set): cannot push to the Hub; unset it when online")
    token = token or hub.get_token()
    if not token:
        raise FinetuneError("no Hugging Face token: log in with `hf auth login`, or set HF_TOKEN (write access)")
    with tempfile.TemporaryDirectory(prefix="finetune-push-") as tmp:
        folder = export_hf(run_dir, Path(tmp) / "model")
        api = hub.HfApi(token=token)
        try:
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                commit_message=f"finetune {RunDir(run_dir).name}",
            )
        except Exception as error:  # noqa: BLE001 - any failure of the network or the Hub is one line
            raise FinetuneError(hub_error(repo_id, error)) from None
    return str(url)


def hub_error(repo_id: str, error: Exception) -> str:
    """One line for a failed push: offline, the token refused, the Hub unreachable, or what the Hub said."""
    from huggingface_hub import errors

    if isinstance(error, errors.OfflineModeIsEnabled):
        return "offline (HF_HUB_OFFLINE is set): cannot push to the Hub"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return f"the Hub refused the token for {repo_id} (HTTP {status}): log in with `hf auth login` (write access)"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    if isinstance(error, (OSError, ConnectionError)) or "connect" in type(error).__name__.lower():
        return f"cannot reach the Hugging Face Hub ({first}): are you online?"
    return f"cannot push to {repo_id}: {first}"

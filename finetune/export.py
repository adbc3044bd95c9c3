"""TorchScript and ONNX exports of a run's model (inputs: normalised RGB, N x 3 x S x S; outputs: logits).

Each export carries what a deployment needs beside the weights, as JSON under the key
`finetune` (TorchScript: an extra file `finetune.json`; ONNX: a `metadata_props` entry): the
class names in index order, the input size, mean and std, and the calibration: probabilities are
`softmax(logits / temperature)`, and below `min_confidence` the honest answer is "unknown".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .config import FinetuneError
from .fsutil import replacing
from .predict import Predictor

FORMATS = ("torchscript", "onnx")
METADATA_KEY = "finetune"


def export_metadata(predictor: Predictor) -> dict:
    return {
        "format": "finetune-export/1",
        "arch": predictor.arch,
        "classes": predictor.classes,
        "image_size": predictor.image_size,
        "resize_size": predictor.min_size,
        "mean": list(predictor.transform_mean),
        "std": list(predictor.transform_std),
        "temperature": predictor.temperature,
        "min_confidence": predictor.suggested_min_confidence,
        "probabilities": "softmax(logits / temperature); answer 'unknown' when the top one < min_confidence",
    }


SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """A run's model as `fmt` in `out` (default: model.onnx or model.torchscript.pt in the run folder)."""
    check_format(fmt)
    predictor = Predictor.from_run(run_dir, device="cpu")
    return export_predictor(predictor, fmt, Path(out) if out else Path(run_dir) / f"model{SUFFIXES[fmt]}")


def export_predictor(predictor: Predictor, fmt: str, path: str | Path) -> Path:
    """A loaded model (on the CPU; a run's, or a plain weights file's) as `fmt` in `path`."""
    check_format(fmt)
    path = Path(path)
    model = predictor.model.float().eval()
    example = torch.zeros(1, 3, predictor.image_size, predictor.image_size)
    metadata = json.dumps(export_metadata(predictor))
    # a file of its own renamed into place: the studio serves the export by a hard link to it, and a
    # second export (the command line beside the app) must not write into the file being downloaded
    with warnings.catch_warnings(), replacing(path) as tmp:
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        if fmt == "torchscript":
            with torch.inference_mode():
                scripted = torch.jit.trace(model, example)
            scripted.save(str(tmp), _extra_files={f"{METADATA_KEY}.json": metadata})
        else:
            _export_onnx(model, example, tmp, metadata)
    return path


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: str) -> None:
    from .extras import require

    onnx = require("onnx")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    exported = onnx.load(str(path))
    entry = exported.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    onnx.save(exported, str(path))


def read_metadata(path: str | Path) -> dict:
    """The `finetune` metadata of an export (TorchScript or ONNX)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from .extras import require

        onnx = require("onnx")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    files = {f"{METADATA_KEY}.json": ""}
    torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[f"{METADATA_KEY}.json"])

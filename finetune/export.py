"""TorchScript and ONNX exports of a run's model (inputs: normalised RGB, N x 3 x S x S; outputs: logits).

With `embed_preprocessing` the graph takes what an app has: a uint8 RGB batch N x 3 x S x S, already
resized (short side `resize_size`) and centre-cropped, scales and normalises it inside, and returns
the logits and the calibrated probabilities, softmax(logits / temperature), as Ultralytics' classify
exports return them. `half` runs the model in float16 (outputs stay float32). ONNX goes through the
torch.export-based exporter (`dynamo=True`, needs onnxscript) and falls back to the TorchScript-based
one where that fails; the metadata says which made the file.

Each export carries what a deployment needs beside the weights, as JSON under the key
`finetune` (TorchScript: an extra file `finetune.json`; ONNX: a `metadata_props` entry): the
class names in index order, the input size, mean and std, and the calibration: probabilities are
`softmax(logits / temperature)`, and below `min_confidence` the honest answer is "unknown".
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import EXPORT_FORMATS as FORMATS
from .config import FinetuneError
from .fsutil import replacing
from .predict import Predictor

METADATA_KEY = "finetune"
BATCH = torch.export.Dim("batch", min=1, max=4096)  # torch.export's exports take any batch size


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


SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "pt2": ".pt2"}


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return fmt


def export(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    embed_preprocessing: bool = False,
    half: bool = False,
) -> Path:
    """A run's model as `fmt` in `out` (default: model.onnx or model.torchscript.pt in the run folder)."""
    check_format(fmt)
    predictor = Predictor.from_run(run_dir, device="cpu")
    path = Path(out) if out else Path(run_dir) / f"model{SUFFIXES[fmt]}"
    return export_predictor(predictor, fmt, path, embed_preprocessing, half)


class Deployable(nn.Module):
    """uint8 RGB [N, 3, S, S] -> (logits, softmax(logits / temperature)), the normalisation inside."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean, std, temperature: float, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype, self.temperature = model.to(dtype), dtype, float(temperature)
        self.register_buffer("mean", (torch.tensor(mean) * 255).view(1, 3, 1, 1).to(dtype))
        self.register_buffer("std", (torch.tensor(std) * 255).view(1, 3, 1, 1).to(dtype))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model((images.to(self.dtype) - self.mean) / self.std).float()
        return logits, torch.softmax(logits / self.temperature, dim=1)


def export_predictor(
    predictor: Predictor, fmt: str, path: str | Path, embed_preprocessing: bool = False, half: bool = False
) -> Path:
    """A loaded model (on the CPU; a run's, or a plain weights file's) as `fmt` in `path`."""
    check_format(fmt)
    path = Path(path)
    size = predictor.image_size
    model: nn.Module = copy.deepcopy(predictor.model).float().eval()  # the predictor's own stays as it is
    info = export_metadata(predictor)
    # batch 2: torch.export would make a batch of 1 a constant of the graph
    if embed_preprocessing:
        model = Deployable(
            model,
            predictor.transform_mean,
            predictor.transform_std,
            predictor.temperature,
            torch.float16 if half else torch.float32,
        ).eval()
        example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
        info.update(input="uint8 RGB N x 3 x S x S, resized and centre-cropped", outputs=["logits", "probabilities"])
    else:
        model = model.half() if half else model
        example = torch.zeros(2, 3, size, size, dtype=torch.float16 if half else torch.float32)
        info.update(input="normalised RGB N x 3 x S x S", outputs=["logits"])
    info.update(embedded_preprocessing=embed_preprocessing, dtype="float16" if half else "float32")
    # a file of its own renamed into place: the studio serves the export by a hard link to it, and a
    # second export (the command line beside the app) must not write into the file being downloaded
    with warnings.catch_warnings(), replacing(path) as tmp:
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        if fmt == "torchscript":
            with torch.inference_mode():
                scripted = torch.jit.trace(model, example)
            scripted.save(str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(info)})
        elif fmt == "pt2":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: BATCH},))
            torch.export.save(program, str(tmp), extra_files={f"{METADATA_KEY}.json": json.dumps(info)})
        else:
            _export_onnx(model, example, tmp, info)
    return path


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, info: dict) -> None:
    from .extras import require

    outputs = info.setdefault("outputs", ["logits"])
    onnx = require("onnx")
    try:
        _torch_export_onnx(model, example, path, outputs)
        info["exporter"] = "torch.export (dynamo)"
    except Exception as error:  # noqa: BLE001 - no onnxscript, or a graph it cannot take: the older exporter
        info["exporter"] = f"TorchScript-based (torch.export failed: {str(error).splitlines()[0][:200]})"
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=outputs,
            dynamic_axes={"image": {0: "batch"}, **{name: {0: "batch"} for name in outputs}},
            opset_version=17,
            dynamo=False,
        )
    exported = onnx.load(str(path))
    entry = exported.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)
    onnx.save(exported, str(path))


def _torch_export_onnx(model: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("onnxscript is not installed")
    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines ("[torch.onnx] ... ✅")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["image"],
            output_names=outputs,
            dynamic_shapes=({0: BATCH},),
            opset_version=18,
            dynamo=True,
            external_data=False,
        )


def read_metadata(path: str | Path) -> dict:
    """The `finetune` metadata of an export (TorchScript or ONNX)."""
    path = Path(path)
    if path.suffix == ".onnx":
        from .extras import require

        onnx = require("onnx")
        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[METADATA_KEY])
    files = {f"{METADATA_KEY}.json": ""}
    if path.suffix == ".pt2":
        torch.export.load(str(path), extra_files=files)
    else:
        torch.jit.load(str(path), _extra_files=files)
    return json.loads(files[f"{METADATA_KEY}.json"])

"""TorchScript and ONNX exports of a run's model (inputs: normalised RGB, N x 3 x S x S)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import FinetuneError
from .predict import Predictor

FORMATS = ("torchscript", "onnx")


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    if fmt not in FORMATS:
        raise FinetuneError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    predictor = Predictor.from_run(run_dir, device="cpu")
    model = predictor.model.float().eval()
    example = torch.zeros(1, 3, predictor.image_size, predictor.image_size)
    suffix = {"torchscript": ".torchscript.pt", "onnx": ".onnx"}[fmt]
    path = Path(out) if out else Path(run_dir) / f"model{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and exporter deprecation chatter
        if fmt == "torchscript":
            with torch.inference_mode():
                scripted = torch.jit.trace(model, example)
            scripted.save(str(path))
        else:
            _export_onnx(model, example, path)
    return path


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise FinetuneError("ONNX export needs the onnx package: pip install onnx") from None
    torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                      dynamo=False)

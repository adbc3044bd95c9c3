"""Exported TorchScript and ONNX models give the same outputs as PyTorch on real images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SHARED_DATASETS, copy_run

from finetune.config import FinetuneError
from finetune.data import eval_transform, list_images, load_rgb
from finetune.export import export, read_metadata
from finetune.predict import Predictor


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory):
    return copy_run(tiny_run, tmp_path_factory.mktemp("runs"))  # the exports are written into the run


@pytest.fixture(scope="module")
def real_images(sample_data, run):
    """A batch of real photos when the shared datasets are here, plus the bundled samples."""
    paths = list_images([sample_data])[::12]
    bees = SHARED_DATASETS / "hymenoptera_data" / "val" / "bees"
    if bees.is_dir():
        paths += list_images([bees])[:4]
    size = json.loads((run / "run.json").read_text())["image_size"]
    return torch.stack([eval_transform(size)(load_rgb(p)) for p in paths])


def reference(run, images):
    predictor = Predictor.from_run(run, device="cpu")
    with torch.inference_mode():
        return predictor.model(images)


def test_torchscript_matches_pytorch(run, real_images):
    path = export(run, "torchscript")
    assert path == run / "model.torchscript.pt"
    scripted = torch.jit.load(str(path))
    with torch.inference_mode():
        got = scripted(real_images)
    torch.testing.assert_close(got, reference(run, real_images), atol=1e-4, rtol=0)


def test_onnx_matches_pytorch_with_any_batch_size(run, real_images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export(run, "onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = reference(run, real_images)
    for batch in (real_images, real_images[:1]):
        (got,) = session.run(["logits"], {"image": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected[: len(batch)], atol=1e-4, rtol=0)


def test_exports_carry_classes_and_calibration(run, tmp_path):
    import json

    info = json.loads((run / "run.json").read_text())
    paths = [export(run, "torchscript", tmp_path / "m.pt")]
    if __import__("importlib").util.find_spec("onnx"):
        paths.append(export(run, "onnx", tmp_path / "m.onnx"))
    for path in paths:
        meta = read_metadata(path)
        assert meta["classes"] == info["classes"] and meta["image_size"] == 32 == info["image_size"]
        assert meta["temperature"] == info["calibration"]["temperature"]
        assert meta["min_confidence"] == info["calibration"]["suggested_min_confidence"]
        assert meta["mean"] == info["mean"] and meta["std"] == info["std"]


def test_unknown_format_and_missing_run(run, tmp_path):
    with pytest.raises(FinetuneError, match="unknown export format"):
        export(run, "tflite")
    with pytest.raises(FinetuneError, match="not a run folder"):
        export(tmp_path, "onnx")

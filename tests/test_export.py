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


@pytest.fixture(scope="module")
def onnx_export(run, tmp_path_factory):
    """One plain ONNX export for the tests that read it (torch.export's exporter takes seconds a call)."""
    pytest.importorskip("onnxruntime")
    return export(run, "onnx", tmp_path_factory.mktemp("onnx") / "m.onnx")


@pytest.fixture(scope="module")
def embedded_onnx_export(run, tmp_path_factory):
    """One ONNX export with the preprocessing inside, shared likewise."""
    pytest.importorskip("onnxruntime")
    return export(run, "onnx", tmp_path_factory.mktemp("onnx") / "model.onnx", embed_preprocessing=True)


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


def test_onnx_matches_pytorch_with_any_batch_size(run, real_images, onnx_export):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_export), providers=["CPUExecutionProvider"])
    expected = reference(run, real_images)
    for batch in (real_images, real_images[:1]):
        (got,) = session.run(["logits"], {"image": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), expected[: len(batch)], atol=1e-4, rtol=0)


def test_exports_carry_classes_and_calibration(run, tmp_path, onnx_export):
    info = json.loads((run / "run.json").read_text())
    for path in (export(run, "torchscript", tmp_path / "m.pt"), onnx_export):
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


@pytest.fixture(scope="module")
def crops(sample_data, run):
    """uint8 centre crops, as an app hands them to an export with the preprocessing inside."""
    from finetune.data import eval_pixels

    size = json.loads((run / "run.json").read_text())["image_size"]
    return torch.stack([eval_pixels(size)(load_rgb(p)) for p in list_images([sample_data])[::12]])


def expected_outputs(run, crops):
    from finetune.data import to_model_input

    predictor = Predictor.from_run(run, device="cpu")
    logits = reference(run, to_model_input(crops, mean=predictor.transform_mean, std=predictor.transform_std))
    return logits, torch.softmax(logits / predictor.temperature, dim=1)


def test_embedded_preprocessing_takes_uint8_and_gives_calibrated_probabilities(
    run, crops, tmp_path, embedded_onnx_export
):
    import onnxruntime as ort

    logits, probabilities = expected_outputs(run, crops)
    scripted = torch.jit.load(str(export(run, "torchscript", tmp_path / "m.pt", embed_preprocessing=True)))
    with torch.inference_mode():
        got_logits, got_probabilities = scripted(crops)
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_probabilities, probabilities, atol=1e-5, rtol=0)
    path = embedded_onnx_export
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(uint8)"
    for batch in (crops, crops[:1]):
        got_logits, got_probabilities = session.run(["logits", "probabilities"], {"image": batch.numpy()})
        torch.testing.assert_close(torch.from_numpy(got_logits), logits[: len(batch)], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.from_numpy(got_probabilities), probabilities[: len(batch)], atol=1e-5, rtol=0)
    meta = read_metadata(path)
    assert meta["embedded_preprocessing"] and meta["outputs"] == ["logits", "probabilities"]
    assert meta["exporter"] == "torch.export (dynamo)"


def test_a_half_precision_export_stays_close(run, crops, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    logits, _ = expected_outputs(run, crops)
    path = export(run, "onnx", tmp_path / "half.onnx", embed_preprocessing=True, half=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got, _ = session.run(["logits", "probabilities"], {"image": crops.numpy()})
    assert got.dtype.name == "float32" and read_metadata(path)["dtype"] == "float16"
    assert (torch.from_numpy(got) - logits).abs().max() <= 0.02 * logits.abs().max() + 0.02


def test_the_older_onnx_exporter_takes_over_where_torch_export_fails(run, real_images, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    from finetune import export as export_module

    def fails(*args, **kwargs):
        raise RuntimeError("unsupported operator in this graph")

    monkeypatch.setattr(export_module, "_torch_export_onnx", fails)
    path = export(run, "onnx", tmp_path / "old.onnx")
    assert read_metadata(path)["exporter"].startswith("TorchScript-based (torch.export failed: unsupported operator")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": real_images.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), reference(run, real_images), atol=1e-4, rtol=0)


def test_the_documented_onnxruntime_snippet_answers_as_finetune_predict(run, sample_data, embedded_onnx_export, capsys):
    """docs/cli.md's snippet (Pillow, numpy, onnxruntime: no torch) run as written on an export."""
    import re

    from conftest import REPO

    text = (REPO / "docs" / "cli.md").read_text()
    snippet = re.search(r"<!-- onnx-snippet -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert not re.search(r"^\s*(import|from)\s+torch", snippet, re.M)  # no torch, no torchvision
    model = embedded_onnx_export
    photo = list_images([sample_data])[5]
    code = snippet.replace('"model.onnx"', repr(str(model))).replace('"photo.jpg"', repr(str(photo)))
    exec(compile(code, "snippet", "exec"), {"__name__": "snippet"})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    label, probability = printed.rsplit(" ", 1)
    expected = Predictor.from_run(run, device="cpu").predict_one(photo, top_k=1)
    assert label == expected.answer
    assert abs(float(probability) - expected.confidence) < 0.02


def test_a_pt2_export_runs_any_batch_and_carries_the_metadata(run, real_images, crops, tmp_path):
    path = export(run, "pt2")
    assert path == run / "model.pt2"
    program = torch.export.load(str(path)).module()
    for batch in (real_images, real_images[:1]):
        torch.testing.assert_close(program(batch), reference(run, real_images)[: len(batch)], atol=1e-4, rtol=0)
    assert read_metadata(path)["classes"] == json.loads((run / "run.json").read_text())["classes"]
    embedded = torch.export.load(str(export(run, "pt2", tmp_path / "e.pt2", embed_preprocessing=True))).module()
    logits, probabilities = expected_outputs(run, crops)
    got_logits, got_probabilities = embedded(crops)
    torch.testing.assert_close(got_logits, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_probabilities, probabilities, atol=1e-5, rtol=0)

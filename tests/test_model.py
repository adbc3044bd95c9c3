"""Weights loading, the three strategies, learning-rate groups, refusing pickled code."""

from __future__ import annotations

import os
import time
import urllib.error
import zipfile

import pytest
import torch
from torchvision import models

from conftest import run_within
from finetune.config import FinetuneError
from finetune.model import (apply_strategy, build_model, imagenet_weights_path, param_groups, safe_load,
                            split_model, weights_available)


@pytest.fixture(scope="module")
def resnet34_standin(tmp_path_factory):
    """A locally written stand-in for the ImageNet checkpoint (same keys and shapes, random values)."""
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet34-standin.pth"
    torch.save(models.resnet34(weights=None).state_dict(), path)
    return path


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch, resnet34_standin):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert imagenet_weights_path("resnet34") == expected
    assert weights_available("resnet34", "imagenet")[0] is False
    expected.parent.mkdir(parents=True)
    expected.write_bytes(resnet34_standin.read_bytes())
    assert weights_available("resnet34", "imagenet") == (True, f"ImageNet weights found at {expected}")
    model = build_model("resnet34", 5, "imagenet")
    reference = torch.load(resnet34_standin, weights_only=True)
    assert torch.equal(model.layer3[0].conv1.weight, reference["layer3.0.conv1.weight"])
    assert torch.equal(model.bn1.running_var, reference["bn1.running_var"])
    assert model.fc.out_features == 5


def test_offline_without_cache_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FinetuneError) as error:
        build_model("resnet50", 2, "imagenet")
    message = str(error.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "--weights PATH" in message and "--weights none" in message


def test_local_weights_file_and_wrong_architecture(tmp_path, resnet34_standin):
    model = build_model("resnet34", 3, str(resnet34_standin))
    reference = torch.load(resnet34_standin, weights_only=True)
    assert torch.equal(model.conv1.weight, reference["conv1.weight"])
    with pytest.raises(FinetuneError, match="do not fit"):
        build_model("resnet50", 3, str(resnet34_standin))
    with pytest.raises(FinetuneError, match="weights file not found"):
        build_model("resnet34", 3, str(tmp_path / "missing.pth"))
    # a checkpoint dict holding the state_dict under "model" (and DDP's "module." prefix) works too
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference.items()}, "epoch": 3}, wrapped)
    assert torch.equal(build_model("resnet34", 3, str(wrapped)).conv1.weight, reference["conv1.weight"])


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = marker
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": exploit}, path)
    with pytest.raises(FinetuneError, match="refusing to load .*evil.pth"):
        safe_load(path)
    with pytest.raises(FinetuneError, match="refusing"):
        build_model("resnet34", 2, str(path))
    assert not marker.exists()


def test_corrupt_weights_file_is_named(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(FinetuneError, match="cannot read .*broken.pth"):
        safe_load(path)


def test_compressed_weights_file_is_refused_before_torch_unpacks_it(tmp_path):
    """torch.save never compresses, but torch.load unpacks deflated records: 16 MB from 17 KB here
    (a 522 KB file loaded as 512 MB)."""
    plain = tmp_path / "zeros.pth"
    torch.save({"fc.weight": torch.zeros(4 * 2**20)}, plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record))
    assert bomb.stat().st_size < plain.stat().st_size / 100
    assert torch.load(bomb, weights_only=True)["fc.weight"].numel() == 4 * 2**20  # torch takes it
    started = time.perf_counter()
    with pytest.raises(FinetuneError, match=r"^refusing weights file \S*bomb.pth: its record '\S+' is compressed"):
        safe_load(bomb, "weights file")
    with pytest.raises(FinetuneError, match=r"bomb.pth: its record .* is compressed"):
        build_model("resnet34", 2, str(bomb))
    assert time.perf_counter() - started < 3
    assert safe_load(plain)["fc.weight"].shape == (4 * 2**20,)  # what torch.save writes still loads


def test_legacy_and_non_regular_weights_files_are_refused_by_name(tmp_path):
    legacy = tmp_path / "old.pth"
    torch.save({"fc.weight": torch.zeros(3)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(FinetuneError, match=r"refusing model \S*old.pth: it is in torch's legacy format"):
        safe_load(legacy, "model")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.pth"
        os.mkfifo(fifo)
        with pytest.raises(FinetuneError, match=r"refusing model \S*fifo.pth: not a regular file \(a named pipe\)"):
            run_within(10, lambda: safe_load(fifo, "model"), [fifo])
    with pytest.raises(FinetuneError, match="refusing model .*: not a regular file \\(a folder\\)"):
        safe_load(tmp_path, "model")


@pytest.mark.parametrize("strategy, trainable_prefixes", [
    ("all", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")),
    ("last", ("layer4", "fc")),
    ("head", ("fc",)),
])
def test_each_strategy_trains_exactly_its_parameters(strategy, trainable_prefixes):
    model = build_model("resnet34", 4, "none")
    apply_strategy(model, strategy)
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == name.startswith(trainable_prefixes), name
    groups = param_groups(model, strategy, head_lr=1e-3, backbone_scale=0.1, pretrained=True)
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates["head"] == 1e-3
    if strategy != "head":
        assert rates["layer4"] == pytest.approx(1e-4)  # pretrained layers learn slower than the head
    if strategy == "all":
        assert rates["stem"] < rates["layer2"] < rates["layer4"]


def test_split_model_composes_to_the_full_model_and_frozen_stays_in_eval():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 64)
    for strategy in ("last", "head"):
        model = build_model("resnet34", 3, "none")  # torchvision builds it in training mode
        frozen, trainable = split_model(model, strategy)
        assert not any(m.training for m in frozen.modules()), "frozen BatchNorm must start in eval mode"
        frozen.train()  # a parent calling train() must not switch frozen BatchNorm to batch statistics
        assert not any(m.training for m in frozen.modules())
        with torch.no_grad():
            assert torch.equal(trainable.eval()(frozen(images)), model.eval()(images))
    model = build_model("resnet34", 3, "none").eval()
    frozen, trainable = split_model(model, "all")
    with torch.no_grad():
        assert torch.equal(trainable(frozen(images)), model(images))

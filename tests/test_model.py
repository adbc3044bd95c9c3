"""Weights loading, the three strategies, learning-rate groups, refusing pickled code."""

from __future__ import annotations

import os
import time
import urllib.error
import zipfile

import pytest
import torch
from conftest import run_within
from torchvision import models

from finetune.api import infer_arch
from finetune.architectures import ARCHITECTURES, Architecture, arch_choices, infer_architecture
from finetune.config import ARCHS, STRATEGIES, FinetuneError, TrainConfig
from finetune.explain import target_layer
from finetune.model import (
    apply_strategy,
    build_model,
    imagenet_weights_path,
    load_classifier,
    param_groups,
    safe_load,
    split_model,
    weights_available,
)


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
    assert time.perf_counter() - started < 3  # refused from the zip's directory, nothing unpacked
    with pytest.raises(FinetuneError, match=r"bomb.pth: its record .* is compressed"):
        build_model("resnet34", 2, str(bomb))  # (building the model itself takes seconds on a busy CPU)
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


@pytest.mark.parametrize(
    "strategy, trainable_prefixes",
    [
        ("all", ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")),
        ("last", ("layer4", "fc")),
        ("head", ("fc",)),
    ],
)
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


def test_the_architecture_table_agrees_with_torchvision():
    """Each row's weights are torchvision's, its feature sizes what its model computes (on the meta device:
    shapes without memory), and it is what config, the studio and arch inference offer."""
    assert tuple(ARCHITECTURES) == ARCHS and TrainConfig.arch in ARCHS
    assert arch_choices() == [("ResNet-34 (faster)", "resnet34"), ("ResNet-50 (more accurate, slower)", "resnet50")]
    for name, arch in ARCHITECTURES.items():
        assert {strategy for strategy, _ in arch.layout.cuts} == set(STRATEGIES)
        member = arch.weights.member()
        assert member.url == arch.weights.url and str(member) == arch.weights.enum
        assert arch.weights.file_name == f"{name}-{arch.weights.hash_prefix}.pth" and len(arch.weights.hash_prefix) == 8
        with torch.device("meta"):
            model = arch.build()
            images = torch.zeros(1, 3, 60, 60)
        assert model.fc.in_features == arch.num_features
        for strategy in STRATEGIES:
            frozen, _ = split_model(model, strategy)
            assert tuple(frozen(images).shape[1:]) == arch.feature_shape(strategy, 60), (name, strategy)
        assert infer_architecture(model.state_dict()) is arch
        assert infer_arch(model.state_dict(), "w.pth") == name
    with pytest.raises(FinetuneError, match=r"^w.pth is neither a resnet34 nor a resnet50 state_dict: give arch=$"):
        infer_arch({"layer1.0.conv1.weight": torch.zeros(1)}, "w.pth")


def test_an_architecture_is_one_row(tmp_path):
    """A ResNet-18 row made here, not in the table, goes through building, freezing, learning rates,
    Grad-CAM, loading and arch inference with no other code to edit."""
    resnet18 = Architecture("resnet18", "ResNet-18", "", "resnet18", weights=None, channels=(64, 64, 128, 256, 512))
    torch.manual_seed(0)
    model = build_model(resnet18, 3, "none")
    assert len(model.layer3) == 2 and model.fc.out_features == 3 and resnet18.label == "ResNet-18"
    assert target_layer(model) is model.layer4[-1]
    images = torch.randn(2, 3, 32, 32)
    for strategy in STRATEGIES:
        apply_strategy(model, strategy)
        trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
        assert (
            trainable
            == {
                "all": {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"},
                "last": {"layer4", "fc"},
                "head": {"fc"},
            }[strategy]
        )
        groups = param_groups(model, strategy, head_lr=1e-3, backbone_scale=0.1, pretrained=True)
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
        frozen, rest = split_model(model.eval(), strategy)
        with torch.no_grad():
            features = frozen(images)
            assert tuple(features.shape[1:]) == resnet18.feature_shape(strategy, 32)
            assert torch.equal(rest(features), model(images))
    state = model.state_dict()
    assert infer_architecture(state, [*ARCHITECTURES.values(), resnet18]) is resnet18
    assert infer_architecture(state) is None  # not in the shipped table
    assert torch.equal(load_classifier(resnet18, state, 3, "m.pth").fc.weight, model.fc.weight)
    assert weights_available(resnet18, "imagenet") == (False, "no ImageNet weights are known for resnet18")
    with pytest.raises(FinetuneError, match="no ImageNet weights are known for resnet18: pass --weights PATH"):
        build_model(resnet18, 3, "imagenet")
    with pytest.raises(FinetuneError, match=r"^unknown architecture 'resnet18': choose one of resnet34, resnet50$"):
        build_model("resnet18", 3, "none")

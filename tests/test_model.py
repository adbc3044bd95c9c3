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
    assert ARCHS == ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
    assert arch_choices()[1] == ("ResNet-34 (faster)", "resnet34")
    for name, arch in ARCHITECTURES.items():
        assert {strategy for strategy, _ in arch.layout.cuts} == set(STRATEGIES)
        for weights in (arch.weights, arch.weights_v2):
            if weights is None:
                continue
            member = weights.member()
            assert member.url == weights.url and str(member) == weights.enum
            assert weights.file_name == f"{name}-{weights.hash_prefix}.pth" and len(weights.hash_prefix) == 8
        # torchvision's newer ImageNet weights, where it has them
        assert (arch.weights_v2 is not None) == (name in ("resnet50", "resnet101", "resnet152"))
        with torch.device("meta"):
            model = arch.build()
            images = torch.zeros(1, 3, 60, 60)
        assert model.fc.in_features == arch.num_features
        for strategy in STRATEGIES:
            frozen, _ = split_model(model, strategy)
            assert tuple(frozen(images).shape[1:]) == arch.feature_shape(strategy, 60), (name, strategy)
        assert infer_architecture(model.state_dict()) is arch
        assert infer_arch(model.state_dict(), "w.pth") == name
    with pytest.raises(
        FinetuneError, match=r"^w.pth is neither a resnet18 nor a resnet34 nor .* state_dict: give arch=$"
    ):
        infer_arch({"layer1.0.conv1.weight": torch.zeros(1)}, "w.pth")


def test_an_architecture_is_one_row(tmp_path):
    """A row made here, not in the table (a ResNet-18 without weights), goes through building, freezing,
    learning rates, Grad-CAM, loading and arch inference with no other code to edit."""
    resnet18 = Architecture("my-resnet18", "ResNet-18", "", "resnet18", weights=None, channels=(64, 64, 128, 256, 512))
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
    assert infer_architecture(state, [ARCHITECTURES["resnet34"], resnet18]) is resnet18
    assert infer_architecture(state) is ARCHITECTURES["resnet18"]  # the table's own row, same layers
    assert torch.equal(load_classifier(resnet18, state, 3, "m.pth").fc.weight, model.fc.weight)
    assert weights_available(resnet18, "imagenet") == (False, "no ImageNet weights are known for my-resnet18")
    with pytest.raises(FinetuneError, match="no ImageNet weights are known for my-resnet18: pass --weights PATH"):
        build_model(resnet18, 3, "imagenet")
    with pytest.raises(
        FinetuneError,
        match=r"^unknown architecture 'resnet26': choose one of resnet18, resnet34, resnet50, resnet101, resnet152$",
    ):
        build_model("resnet26", 3, "none")


@pytest.mark.parametrize(
    "arch, weights, file_name",
    [
        ("resnet18", "imagenet", "resnet18-f37072fd.pth"),
        ("resnet18", "imagenet-v1", "resnet18-f37072fd.pth"),  # the same file: V1 is what imagenet means
        ("resnet50", "imagenet-v2", "resnet50-11ad3fa6.pth"),
    ],
)
def test_each_imagenet_weights_name_loads_its_own_file(tmp_path, monkeypatch, arch, weights, file_name):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / file_name
    assert imagenet_weights_path(arch, weights) == expected
    expected.parent.mkdir(parents=True)
    torch.manual_seed(1)
    reference = ARCHITECTURES[arch].build().state_dict()
    torch.save(reference, expected)
    assert weights_available(arch, weights) == (True, f"ImageNet weights found at {expected}")
    model = build_model(arch, 4, weights)
    assert torch.equal(model.layer4[0].conv1.weight, reference["layer4.0.conv1.weight"])
    assert model.fc.out_features == 4


def test_v2_weights_offline_name_their_file_and_only_the_deep_resnets_have_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(FinetuneError) as error:
        build_model("resnet50", 2, "imagenet-v2")
    message = str(error.value)
    assert message.startswith("ImageNet V2 weights for resnet50 are not available")
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    for arch in ("resnet101", "resnet152"):
        assert imagenet_weights_path(arch, "imagenet-v2").name != imagenet_weights_path(arch).name
    with pytest.raises(FinetuneError, match="torchvision has no ImageNet V2 weights for resnet34"):
        build_model("resnet34", 2, "imagenet-v2")
    assert weights_available("resnet18", "imagenet-v2") == (
        False,
        "torchvision has no ImageNet V2 weights for resnet18 (only ResNet-50, 101 and 152 have them)",
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_from_scratch_at_a_small_size(arch):
    """One optimizer step of each strategy's trainable part, on 32-px images, from random weights."""
    torch.manual_seed(0)
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    for strategy in STRATEGIES:
        model = build_model(arch, 2, "none")
        apply_strategy(model, strategy)
        frozen, trainable = split_model(model, strategy)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        with torch.no_grad():
            features = frozen.eval()(images)
        assert tuple(features.shape[1:]) == ARCHITECTURES[arch].feature_shape(strategy, 32)
        loss = torch.nn.functional.cross_entropy(trainable.train()(features), labels)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        after = model.state_dict()
        assert not torch.equal(after["fc.weight"], before["fc.weight"])
        frozen_keys = [k for k in before if k.startswith(ARCHITECTURES[arch].layout.frozen_modules(strategy))]
        assert all(torch.equal(after[k], before[k]) for k in frozen_keys)

"""`finetune selftest --device cpu`: what users run on their own machine passes here; its checks fail
and skip for the right reasons (GPU cases simulated)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from finetune import selftest
from finetune.syncs import Syncs


@pytest.mark.slow
def test_selftest_on_the_cpu_passes(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "finetune", "selftest", "--device", "cpu", "--image-size", "64"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert "mixed precision: off" in out and "channels_last: on" in out
    for strategy in ("head", "last", "all"):
        assert f"{strategy}: frozen layers" in out and f"{strategy}: cached = full model" in out
        assert f"{strategy}: syncs per step: 0 in the" in out  # nothing but the progress reads
    assert "all: frozen layers: nothing frozen; every trained stage changed (conv1" in out
    assert "last: calibration" in out and "Grad-CAM on cpu" in out
    assert "stream: resume from last.pth" in out and "pipeline: streamed" in out
    assert "nvJPEG needs CUDA" in out  # the GPU decode check: skipped here
    assert "resnet50 last: cached = full model" in out
    assert "precision: float32" in out and "images/s over" in out
    assert "FAIL" not in out and "all checks passed" in out


def test_selftest_reports_a_failure_and_exits_1(monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("simulated device fault")

    monkeypatch.setattr(selftest, "check_training", broken)
    report = selftest.run_selftest("cpu", image_size=32)
    assert not report.passed and "simulated device fault" in report.table()
    assert "FAIL" in capsys.readouterr().out


def test_a_missing_optional_package_is_a_skip_not_a_failure(monkeypatch):
    monkeypatch.setattr(selftest, "missing", lambda module: f"{module} needs installing: pip install it")
    report = selftest.Report()
    report.run("last: heatmaps", selftest.check_heatmaps, Path("no-run"), torch.device("cpu"))
    report.run("last: ONNX = PyTorch", selftest.check_onnx, Path("no-run"))
    assert report.passed and [c.verdict for c in report.checks] == ["SKIP", "SKIP"]
    assert "pytorch_grad_cam needs installing" in report.table() and "FAIL" not in report.table()


def batch_events(timer: selftest.StepTimer, syncs: Syncs, batches: int, per_step: int, epoch: int = 1) -> None:
    """An epoch's batch events as training emits them (each after two allowed progress reads)."""
    timer({"type": "start", "batches_per_epoch": batches, "train_images": batches * 4})
    for batch in range(1, batches + 1):
        syncs.by_op["_local_scalar_dense"] += per_step
        syncs.allowed += 2
        timer({"type": "batch", "epoch": epoch, "batch": batch, "batches": batches})


@pytest.mark.parametrize("per_step, passes", [(0, True), (1, False)])
def test_a_sync_per_step_fails_the_check(per_step, passes):
    syncs = Syncs()
    timer = selftest.StepTimer(syncs)
    batch_events(timer, syncs, batches=21, per_step=per_step)
    trained = selftest.Trained(Path("run"), None, timer)  # type: ignore[arg-type]
    passed, detail, _ = selftest.check_syncs(trained)
    assert passed is passes, detail
    assert f"{20 * per_step} in the 20 steady-state steps of epoch 1" in detail
    assert timer.windows[0].images == 80


@pytest.fixture(scope="module")
def standin(tmp_path_factory) -> Path:
    return selftest.standin_weights("resnet34", tmp_path_factory.mktemp("standin") / "standin.pth", classes=3)


def fake_run(folder: Path, state: dict, scale: float, epochs: int = 1) -> selftest.Trained:
    """A run folder whose model.pth and last.pth hold `state`, after `epochs` of 4 fp16 steps."""
    folder.mkdir()
    torch.save(state, folder / "model.pth")
    record = {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0}
    checkpoint = {
        "model": state,
        "epoch": epochs,
        "history": [],
        "best": record,
        "scheduler": {},
        "rng": torch.get_rng_state(),
        "scaler": {"scale": scale},
    }
    timer = selftest.StepTimer()
    timer({"type": "start", "batches_per_epoch": 4, "train_images": 16})
    return selftest.Trained(folder, None, timer, checkpoint)  # type: ignore[arg-type]


def test_frozen_layers_when_the_gradient_scaler_skipped_every_step(standin, tmp_path):
    """fp16 at scale 65536 overflows in the first steps, which the scaler skips: layer1 unchanged is
    then right (the old check failed here), and a change would be wrong."""
    state = torch.load(standin, weights_only=True)
    all_skipped = fake_run(tmp_path / "skipped", state, scale=65536 / 2**4)
    assert all_skipped.skipped == 4 and all_skipped.steps == 4
    passed, detail, _ = selftest.check_frozen(all_skipped, standin, "all", "resnet34")
    assert passed and "skipped all 4 steps, and nothing trained changed" in detail, detail

    moved = {**state, "layer1.0.conv1.weight": state["layer1.0.conv1.weight"] + 1}
    passed, detail, _ = selftest.check_frozen(fake_run(tmp_path / "moved", moved, 4096.0), standin, "all", "resnet34")
    assert not passed and "layer1 changed" in detail


def test_frozen_layers_after_some_steps_were_taken(standin, tmp_path):
    state = torch.load(standin, weights_only=True)
    trained = {k: v + 1 if k.startswith(("layer4.", "fc.")) and v.is_floating_point() else v for k, v in state.items()}
    two_skipped = fake_run(tmp_path / "ok", trained, scale=65536 / 4)
    passed, detail, _ = selftest.check_frozen(two_skipped, standin, "last", "resnet34")
    assert passed and "every trained stage changed (layer4, fc) in 2 steps (2 skipped" in detail, detail

    head_only = {k: v + 1 if k.startswith("fc.") else v for k, v in state.items()}
    passed, detail, _ = selftest.check_frozen(
        fake_run(tmp_path / "stuck", head_only, 65536 / 4), standin, "last", "resnet34"
    )
    assert not passed and "layer4 did not change" in detail

    frozen_moved = {**trained, "layer3.0.bn1.running_mean": state["layer3.0.bn1.running_mean"] + 1}
    passed, detail, _ = selftest.check_frozen(
        fake_run(tmp_path / "bn", frozen_moved, 65536.0), standin, "last", "resnet34"
    )
    assert not passed and "layer3.0.bn1.running_mean" in detail


@pytest.mark.parametrize(
    "capability, rule, scaler, passes",
    [
        ((7, 5), torch.float16, {"scale": 1024.0}, True),  # T4, RTX 20xx: fp16 and the scaler
        ((7, 5), torch.bfloat16, {}, False),  # emulated bf16 chosen: wrong
        ((7, 0), torch.float16, {}, False),  # fp16 without a scaler: wrong
        ((8, 0), torch.bfloat16, {}, True),  # A100
        ((9, 0), torch.float16, {"scale": 1.0}, False),  # H100 on fp16: wrong
    ],
)
def test_precision_follows_the_compute_capability(monkeypatch, capability, rule, scaler, passes):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(selftest, "amp_choice", lambda device, enabled=True: (rule, "the rule under test"))
    trained = selftest.Trained(Path("all"), None, selftest.StepTimer(), {"scaler": scaler})  # type: ignore[arg-type]
    passed, detail, _ = selftest.check_precision(torch.device("cuda", 0), [trained])
    assert passed is passes, detail
    assert f"compute capability {capability[0]}.{capability[1]}" in detail or not passes


def test_precision_off_cuda_is_float32_without_a_scaler():
    trained = selftest.Trained(Path("all"), None, selftest.StepTimer(), {"scaler": {}})  # type: ignore[arg-type]
    assert selftest.check_precision(torch.device("cpu"), [trained])[:2] == (
        True,
        "float32 (cpu: mixed precision on CUDA only)",
    )


def test_the_gpu_decode_check_skips_off_cuda_and_fails_a_run_that_decoded_elsewhere(tmp_path):
    from finetune.config import TrainConfig

    def trained(device: str, pipeline: str) -> selftest.Trained:
        timer = selftest.StepTimer()
        timer.start = {"pipeline": pipeline}
        return selftest.Trained(tmp_path, TrainConfig(data="d", device=device), timer)

    report = selftest.Report()
    report.run("stream: JPEGs decoded on the GPU", selftest.check_gpu_decode, trained("cpu", "streamed"), tmp_path)
    # on CUDA, a stream that fell back to PIL in the workers is reported before any decode is tried
    gone = trained("cuda", "streamed images (decoded every epoch, uint8 to the device)")
    report.run("stream: JPEGs decoded on the GPU", selftest.check_gpu_decode, gone, tmp_path)
    assert [c.verdict for c in report.checks] == ["SKIP", "FAIL"]
    assert "not decoded on the GPU" in report.table()

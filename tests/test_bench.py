"""bench/: the baseline's classic and like-for-like settings, and the benchmark table (no GPU needed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_class_folders

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return load("benchmark")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_class_folders(tmp_path_factory.mktemp("bench") / "tiny", per_class=5)


def tiny_values(data: Path, tmp: Path) -> dict:
    return dict(
        data=str(data),
        arch="resnet34",
        strategy="head",
        weights="none",
        epochs=1,
        batch_size=4,
        image_size=32,
        seed=0,
        device="cpu",
        workers=0,
        runs_dir=str(tmp / "runs"),
    )


@pytest.mark.parametrize(
    "options, layout",
    [({"amp": True, "channels_last": True}, "channels_last"), ({"amp": False, "channels_last": False}, "NCHW")],
    ids=["like-for-like", "classic"],
)
def test_baseline_in_process(benchmark, tiny, tmp_path, options, layout, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the worker puts bench/ on the path
    result = benchmark.worker("baseline", dict(tiny_values(tiny, tmp_path), baseline_options=options))
    assert result["train_images"] + result["val_images"] == 10
    assert result["seconds"] > 0 and result["first_epoch_s"] is not None
    assert 0.0 <= result["best_val_acc"] <= 1.0 and len(result["val_acc_history"]) == 1
    assert result["has_best_weights"] and result["workers"] == 0
    assert result["device"] == "cpu"
    assert result["precision"] == "fp32"  # AMP is used on CUDA only, like ours
    assert result["grad_scaler"] is False
    assert result["memory_layout"] == layout  # channels_last on the CPU too, like ours
    assert result["pin_memory"] is False and result["non_blocking"] is False  # CUDA only (MPS rejects them)
    assert result["peak_gpu_mb"] is None
    assert result["peak_rss_mb"] > 0 and result["torch_threads"] >= 1


@pytest.mark.slow  # a whole (tiny) training with its final evaluation
def test_ours_is_timed_like_the_baseline(benchmark, tiny, tmp_path):
    """Both to the end of the last epoch: ours' final evaluation and calibration are reported apart."""
    result = benchmark.worker("ours", tiny_values(tiny, tmp_path))
    assert result["timed"] == benchmark.TIMED and "last epoch" in result["timed"]
    assert 0 < result["seconds"] < result["total_s"] and result["final_evaluation_s"] > 0
    assert result["seconds"] + result["final_evaluation_s"] <= result["total_s"]
    assert result["final_val_accuracy"] is not None  # the evaluation ran, outside the timed span


def test_like_for_like_options_on_cpu(benchmark):
    # ours uses channels_last on the CPU, so like-for-like differs from classic there and is run
    assert benchmark.like_for_like_options("cpu") == {"amp": True, "channels_last": True}
    # with both off (or on a device where neither applies) it would be the classic run again
    assert benchmark.like_for_like_options("cpu", amp=True, channels_last=False) is None


def fake_run(seconds: float, gpu: float | None, precision="fp32", layout="NCHW", **extra) -> dict:
    return {
        "seconds": seconds,
        "images_per_s": 100 / seconds,
        "first_epoch_s": seconds / 2,
        "peak_rss_mb": 2000.0,
        "peak_gpu_mb": gpu,
        "best_val_acc": 0.9,
        "precision": precision,
        "memory_layout": layout,
        **extra,
    }


def test_markdown_gpu_and_cpu_rows(benchmark):
    gpu_row = {
        "arch": "resnet50",
        "strategy": "all",
        "epochs": 2,
        "baseline": fake_run(40.0, 5120.4),
        "like_for_like": fake_run(20.0, 3010.0, "bf16", "channels_last"),
        "ours": fake_run(10.0, 2900.6, "bf16", "channels_last", pipeline="streaming (GPU augment)"),
    }
    cpu_row = {
        "arch": "resnet34",
        "strategy": "head",
        "epochs": 10,
        "baseline": fake_run(90.0, None),
        "like_for_like": fake_run(60.0, None, "fp32", "channels_last"),
        "ours": fake_run(30.0, None, "fp32", "channels_last", pipeline="cached features (2 views)"),
    }
    table = benchmark.markdown([gpu_row, cpu_row], [])
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert "time classic / like-for-like / ours (s)" in header
    assert "speed-up vs classic" in header and "speed-up vs like-for-like" in header
    assert "peak GPU memory classic / like-for-like / ours (MB)" in header
    assert lines[1].count("---") == len(header)
    gpu = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|")), strict=True))
    cpu = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|")), strict=True))
    assert gpu["time classic / like-for-like / ours (s)"] == "40.0 / 20.0 / 10.0"
    assert gpu["speed-up vs classic"] == "**4.00x**" and gpu["speed-up vs like-for-like"] == "**2.00x**"
    assert gpu["peak GPU memory classic / like-for-like / ours (MB)"] == "5120 / 3010 / 2901"
    assert gpu["ours: pipeline"] == "streaming"
    assert cpu["peak GPU memory classic / like-for-like / ours (MB)"] == "-"
    assert cpu["speed-up vs classic"] == "**3.00x**" and cpu["speed-up vs like-for-like"] == "**2.00x**"
    assert cpu["best val acc classic / like-for-like / ours"] == "0.900 / 0.900 / 0.900"
    assert "classic (fp32, NCHW); like-for-like (bf16, channels_last or fp32, channels_last); ours (" in table
    assert f"Time: {benchmark.TIMED}, for every run." in table  # the table says what is timed


def test_markdown_without_like_for_like(benchmark):
    row = {
        "arch": "resnet34",
        "strategy": "last",
        "epochs": 1,
        "baseline": fake_run(30.0, None),
        "like_for_like": None,
        "ours": fake_run(15.0, None, "fp32", "channels_last", pipeline="streaming"),
    }
    table = benchmark.markdown([row], [])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert "time classic / ours (s)" in header and "speed-up vs like-for-like" not in header
    cells = dict(zip(header, (c.strip() for c in table.splitlines()[2].strip("|").split("|")), strict=True))
    assert cells["time classic / ours (s)"] == "30.0 / 15.0" and cells["speed-up vs classic"] == "**2.00x**"
    assert cells["peak GPU memory classic / ours (MB)"] == "-"
    assert "not run" in table


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # the scaler skips an overflowing step
def test_baseline_fp16_uses_a_grad_scaler(tiny, tmp_path, monkeypatch):
    """What an fp16 GPU (compute capability 7.5) gets: autocast to fp16 and a GradScaler, simulated on the CPU."""
    baseline = load("baseline")
    monkeypatch.setattr(baseline, "amp_choice", lambda device, enabled=True: (torch.float16, "fp16 (simulated)"))
    from finetune.config import TrainConfig

    cfg = TrainConfig(**tiny_values(tiny, tmp_path))
    classic = baseline.run_baseline(cfg)  # off by default: amp_choice is not even asked
    assert classic["precision"] == "fp32" and classic["grad_scaler"] is False and classic["memory_layout"] == "NCHW"
    result = baseline.run_baseline(cfg, amp=True, channels_last=True)
    assert result["precision"] == "fp16" and result["grad_scaler"] is True
    assert result["amp_reason"] == "fp16 (simulated)" and result["memory_layout"] == "channels_last"
    assert 0.0 <= result["best_val_acc"] <= 1.0


def test_feeder_on_a_tiny_generated_dataset(tmp_path, monkeypatch):
    """bench/feeder.py end to end on a few tiny generated JPEGs: every pipeline timed, the keys there."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the feeder puts the repository and bench/ on it
    feeder = load("feeder")
    data, out = tmp_path / "photos", tmp_path / "feeder.json"
    argv = ["--generate", "imagenet", "--count", "8", "--generate-size", "48x40", "--data", str(data)]
    argv += ["--image-size", "32", "--batch-size", "2", "--workers", "0", "--batches", "2", "--device", "cpu"]
    assert feeder.main([*argv, "--json", str(out)]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["circles", "squares"]
    assert len(list(data.glob("*/*.jpg"))) == 8
    report = json.loads(out.read_text())
    for name in ("classic", "streaming", "streaming_device", "pixels", "features"):
        assert report[f"{name}_images_per_s"] > 0 and report[f"{name}_images_per_s_per_core"] > 0
        assert report[f"{name}_bytes_per_image"] > 0
        assert "fell_back" not in report["pipelines"][name]  # each pipeline is the one it is named for
    assert report["streaming_bytes_per_image"] > 0 and report["uint8_bytes_per_image"] == 3 * 32 * 32
    assert report["classic_bytes_per_image"] == 4 * 3 * 32 * 32  # float32 crops
    # JPEGs decoded in the training process: their files' bytes crossed (a few hundred), not pixels
    assert "JPEGs in the training process" in report["pipelines"]["streaming_device"]["pipeline"]
    assert 100 < report["streaming_device_bytes_per_image"] < 3 * 48 * 40
    assert report["pixels_build_s"] > 0 and report["features_build_s"] > 0
    assert report["cores"] >= 1 and report["data"]["images"] == 8


def test_gpu_script_parses_and_runs_the_three_steps():
    """bench/gpu.sh, what a lent GPU runs first: valid bash, calling selftest, the benchmark and the feeder bench."""
    import subprocess

    script = BENCH / "gpu.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    assert "finetune selftest" in text and "--nproc" in text
    assert "bench/benchmark.py" in text and "bench/feeder.py" in text
    assert "set -u" in text and "set -e" not in text  # a failing step is recorded, the next one runs

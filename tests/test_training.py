"""The training loop and the run folder it leaves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading

import pytest
import torch
from conftest import make_class_folders, tree_digest
from torchvision import models

from finetune.config import FinetuneError, TrainConfig
from finetune.events import format_event, read_events
from finetune.rundir import DiskFull
from finetune.training import resume_config, train

FROZEN_PREFIXES = {
    "head": ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"),
    "last": ("conv1", "bn1", "layer1", "layer2", "layer3"),
    "all": (),
}


def tiny_config(data, runs, **overrides) -> TrainConfig:
    values = dict(
        data=str(data), runs_dir=str(runs), weights="none", epochs=2, batch_size=4, image_size=64, workers=0, seed=0
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("data") / "pets", classes=("cats", "dogs", "owls"), per_class=6)


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    """Pretrained-looking weights: random, but BatchNorm statistics far from their defaults."""
    torch.manual_seed(7)
    model = models.resnet34(weights=None)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("weights") / "standin.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.parametrize("strategy", ["head", "last", pytest.param("all", marks=pytest.mark.slow)])
def test_frozen_parameters_and_buffers_are_bit_identical(dataset, standin, tmp_path, strategy):
    run = train(tiny_config(dataset, tmp_path, strategy=strategy, weights=str(standin), lr=1e-2))
    before = torch.load(standin, weights_only=True)
    after = torch.load(run / "model.pth", weights_only=True)
    frozen = [k for k in after if k.startswith(FROZEN_PREFIXES[strategy])]
    trained = [k for k in after if not k.startswith(FROZEN_PREFIXES[strategy]) and not k.startswith("fc.")]
    assert len(frozen) + len(trained) + 2 == len(after)
    for key in frozen:  # weights, BatchNorm running stats and num_batches_tracked alike
        assert torch.equal(before[key], after[key]), f"{strategy}: frozen {key} changed"
    if strategy == "last":
        assert not torch.equal(before["layer4.0.conv1.weight"], after["layer4.0.conv1.weight"])
        assert not torch.equal(before["layer4.0.bn1.running_mean"], after["layer4.0.bn1.running_mean"])
    if strategy == "all":
        assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
        assert not torch.equal(before["layer1.0.bn1.running_var"], after["layer1.0.bn1.running_var"])
    assert after["fc.weight"].shape == (3, 512)


@pytest.mark.slow
def test_run_folder_has_everything_needed(dataset, tmp_path):
    events = []
    run = train(tiny_config(dataset, tmp_path, strategy="last"), on_event=events.append)
    assert run.parent == tmp_path and run.name.endswith("-resnet34-last")
    assert (run / "class_indices.json").read_text() == json.dumps({"0": "cats", "1": "dogs", "2": "owls"}, indent=4)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["classes"] == ["cats", "dogs", "owls"]
    assert (info["arch"], info["strategy"], info["image_size"]) == ("resnet34", "last", 64)
    assert info["mean"] == [0.485, 0.456, 0.406] and info["versions"]["torch"] == torch.__version__
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert TrainConfig.from_dict(info["config"]) == tiny_config(dataset, tmp_path, strategy="last")

    state = torch.load(run / "model.pth", weights_only=True)  # a plain torchvision state_dict
    classic = models.resnet34(num_classes=3)
    classic.load_state_dict(state)
    checkpoint = torch.load(run / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 2

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["num_images"] == 3
    assert set(metrics["per_class"]) == {"cats", "dogs", "owls"}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["cats"])
    assert sum(map(sum, metrics["confusion_matrix"])) == 3
    assert "balanced_accuracy" in metrics and "1" in metrics["top_k_accuracy"]
    for item in metrics["misclassified"]:
        assert {"path", "true", "predicted", "confidence"} <= set(item)
    split = json.loads((run / "split.json").read_text())
    assert split["root"] == str(dataset.resolve())
    assert all(not path.startswith("/") for path, _ in split["train"] + split["val"])
    assert not {p for p, _ in split["train"]} & {p for p, _ in split["val"]}
    calibration = info["calibration"]  # temperature scaling on val, recorded for prediction
    assert calibration["val_images"] == 3 and calibration["temperature"] > 0
    assert 0 <= calibration["suggested_min_confidence"] <= 1 and calibration["plot"] == "reliability.png"
    for name in ("confusion_matrix.png", "training_curves.png", "data_report.txt", "reliability.png"):
        assert (run / name).stat().st_size > 0

    kinds = [e["type"] for e in events if e["type"] != "progress"]  # the scan's: before the run folder
    assert kinds[0] == "log" or kinds[0] == "start"
    assert kinds.count("epoch") == 2 and kinds[-1] == "end" and "batch" in kinds
    batch = next(e for e in events if e["type"] == "batch")
    assert {"epoch", "batch", "batches", "loss", "acc", "images_per_s", "eta_s"} <= set(batch)
    written = read_events(run)
    assert [e["type"] for e in written] == kinds  # the event file holds the same events
    # the whole wall time, and where it went (a cache built once can take far longer than the epochs)
    end = events[-1]
    assert set(end["stages"]) == {"setup", "cache", "training", "evaluation"} and end["cache"] == "features"
    assert all(seconds >= 0 for seconds in end["stages"].values())
    assert end["seconds"] >= sum(end["stages"].values()) - 1e-6 and end["seconds"] > end["stages"]["training"]
    assert (info["seconds"], info["stages"]) == (end["seconds"], end["stages"])
    assert re.match(r"completed in \d+:\d\d \(.*training \d+:\d\d.*\); best epoch", format_event(end))
    # no pickled Python objects anywhere: every .pth loads with weights_only
    for path in run.glob("*.pth"):
        torch.load(path, weights_only=True)


def test_curation_is_applied_recorded_and_survives_resume(dataset, tmp_path):
    from finetune.curation import load_curation, new_curation, save_curation
    from finetune.data import scan_dataset

    before = tree_digest(dataset)
    scan = scan_dataset(dataset, 0.2, 0)
    excluded_train, relabelled, leaked_val = scan.train[0][0], scan.train[1][0], scan.val[0][0]
    curation = new_curation(dataset)
    curation.set(excluded_train, "exclude")
    curation.set(relabelled, "relabel", "owls")
    curation.set(leaked_val, "exclude", note=f"leak: exact duplicate in val of train file {scan.train[2][0]}")
    curation.set("cats/gone.png", "exclude")  # deleted since the review: reported, not an error
    path = save_curation(curation, tmp_path / "curation.json")
    assert load_curation(path).by_path()[relabelled].label == "owls"

    events = []
    run = train(
        tiny_config(dataset, tmp_path / "runs", strategy="head", epochs=1, curation=str(path)), on_event=events.append
    )
    split = json.loads((run / "split.json").read_text())
    train_paths = dict((p, label) for p, label in split["train"])
    assert excluded_train not in train_paths and leaked_val not in {p for p, _ in split["val"]}
    assert train_paths[relabelled] == 2  # owls
    assert len(split["train"]) == len(scan.train) - 1 and len(split["val"]) == len(scan.val) - 1
    info = json.loads((run / "run.json").read_text())
    assert info["curation"]["excluded"] == 3 - 1 and info["curation"]["relabelled"] == 1
    assert info["curation"]["leaks_removed"] == [leaked_val] and info["curation"]["unknown_paths"] == 1
    assert info["config"]["curation"] == str(path)
    report = (run / "data_report.txt").read_text()
    assert f"excluded {excluded_train}" in report and f"relabelled {relabelled}" in report
    assert any(e["type"] == "log" and "Curation:" in e["message"] for e in events)
    assert tree_digest(dataset) == before  # the folder itself is never changed

    resumed = train(resume_config(run, epochs=2), resume=run)  # the curated split, not a fresh scan
    assert json.loads((resumed / "split.json").read_text())["train"] == split["train"]


def test_a_curation_that_does_not_fit_fails_before_a_run_folder(dataset, tmp_path):
    from finetune.curation import new_curation, save_curation

    curation = new_curation(dataset)
    curation.set("cats/img_0.png", "relabel", "ferrets")
    path = save_curation(curation, tmp_path / "curation.json")
    with pytest.raises(FinetuneError, match="'ferrets': not a class"):
        train(tiny_config(dataset, tmp_path / "runs", curation=str(path)))
    with pytest.raises(FinetuneError, match="curation file not found"):
        train(tiny_config(dataset, tmp_path / "runs", curation=str(tmp_path / "missing.json")))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_metrics_confidences_are_the_calibrated_ones_prediction_shows(tmp_path):
    from finetune.predict import Predictor

    # val holds one picture under two classes: whatever the weights learn, one of the two is a mistake
    data = make_class_folders(tmp_path / "data" / "train", classes=("cats", "dogs", "owls"), per_class=4).parent
    make_class_folders(data / "val", classes=("cats", "dogs", "owls"), per_class=1)
    shutil.copyfile(data / "val" / "cats" / "img_0.png", data / "val" / "dogs" / "same_as_the_cat.png")
    run = train(tiny_config(data, tmp_path / "runs", strategy="all", epochs=1, label_smoothing=0.0))
    metrics = json.loads((run / "metrics.json").read_text())
    predictor = Predictor.from_run(run, device="cpu")
    split = json.loads((run / "split.json").read_text())
    predictions = predictor.predict_paths([data / rel for rel, _ in split["val"]], top_k=1)
    shown = {rel: p for (rel, _), p in zip(split["val"], predictions, strict=True)}
    assert metrics["misclassified"], "the test needs a mistake to compare"
    for item in metrics["misclassified"]:
        assert shown[item["path"]].label == item["predicted"]
        assert shown[item["path"]].confidence == pytest.approx(item["confidence"], abs=1e-3)


@pytest.mark.slow
def test_same_seed_gives_same_metrics(dataset, tmp_path):
    first = train(tiny_config(dataset, tmp_path / "a", strategy="all", epochs=1))
    second = train(tiny_config(dataset, tmp_path / "b", strategy="all", epochs=1))
    history = [json.loads((run / "run.json").read_text())["history"] for run in (first, second)]
    for a, b in zip(*history, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == b[key]


@pytest.mark.slow
def test_resume_continues_from_the_saved_epoch(dataset, tmp_path):
    run = train(tiny_config(dataset, tmp_path, strategy="last", epochs=1))
    finished = torch.load(run / "last.pth", weights_only=True)  # layer4 and the head: the rest is in model.pth
    assert "optimizer" not in finished and {key.split(".")[0] for key in finished["model"]} == {"layer4", "fc"}
    cfg = resume_config(run, epochs=3)
    events = []
    assert train(cfg, on_event=events.append, resume=run) == run
    start = next(e for e in events if e["type"] == "start")
    assert start["start_epoch"] == 2
    assert [e["epoch"] for e in events if e["type"] == "epoch"] == [2, 3]
    info = json.loads((run / "run.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert info["config"]["epochs"] == 3 and info["status"] == "completed"
    assert torch.load(run / "last.pth", weights_only=True)["epoch"] == 3


def test_stop_ends_at_the_next_batch_and_leaves_a_usable_run(dataset, tmp_path):
    from finetune.predict import Predictor

    stop = threading.Event()
    batches = []

    def on_event(event):
        if event["type"] == "batch":
            batches.append(event)
            stop.set()

    run = train(tiny_config(dataset, tmp_path, epochs=5), on_event=on_event, stop=stop)
    assert len(batches) == 1
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and len(info["history"]) == 1
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.classes == ["cats", "dogs", "owls"]
    assert (run / "metrics.json").exists()


def test_without_pretrained_weights_the_default_strategy_trains_every_layer(dataset, standin, tmp_path):
    """From scratch, `head` and `last` keep random frozen layers and end at chance: a config without
    a strategy trains all (said in one line), run.json records it; the caller's config is unchanged."""
    from finetune.training import settle_strategy

    cfg = tiny_config(dataset, tmp_path, epochs=1)
    assert cfg.strategy is None
    stop, logs = threading.Event(), []

    def on_event(event):
        if event["type"] == "log":
            logs.append(event["message"])
        stop.set()  # the first batch is enough to see what trains

    run = train(cfg, on_event=on_event, stop=stop)
    info = json.loads((run / "run.json").read_text())
    assert info["strategy"] == info["config"]["strategy"] == "all" and run.name.endswith("-resnet34-all")
    assert "strategy all (the default without pretrained weights): every layer trains" in logs[0]
    assert cfg.strategy is None
    assert settle_strategy(tiny_config(dataset, tmp_path, weights=str(standin)))[0].strategy == "last"
    assert settle_strategy(tiny_config(dataset, tmp_path, weights=str(standin), strategy="head"))[1] is None
    explicit, warning = settle_strategy(tiny_config(dataset, tmp_path, strategy="head"))
    assert explicit.strategy == "head" and warning.startswith("warning: strategy head without pretrained weights")


def test_no_image_is_dropped_from_an_epoch_and_no_batch_is_tiny(tmp_path):
    """57 training images at batch 32 used to train on 32 an epoch (drop_last): now on all 57, in
    batches of 29 and 28; only a lone image left from a pair is left out (BatchNorm needs two)."""
    from torch.utils.data import DistributedSampler

    from finetune.training import EvenBatches

    data = tmp_path / "data"
    make_class_folders(data / "train", classes=("cats", "dogs", "owls"), per_class=19, size=(8, 8))
    make_class_folders(data / "val", classes=("cats", "dogs", "owls"), per_class=1, size=(8, 8))
    events = []
    train(
        tiny_config(data, tmp_path / "runs", strategy="head", epochs=1, batch_size=32, image_size=32),
        on_event=events.append,
    )
    (start,) = [e for e in events if e["type"] == "start"]
    (epoch,) = [e for e in events if e["type"] == "epoch"]
    assert start["train_images"] == 57 and start["batches_per_epoch"] == 2 and epoch["images"] >= 54

    def sizes(n, batch):
        return [len(b) for b in EvenBatches(range(n), batch)]

    assert sizes(57, 32) == [29, 28] and sizes(64, 32) == [32, 32] and sizes(20, 32) == [20]
    assert sizes(1000, 32) == [32] * 30 + [20, 20] and sizes(3, 2) == [2] and sizes(33, 32) == [17, 16]
    for n, batch in [(57, 32), (1000, 32), (3, 2), (5, 5), (33, 4)]:  # never more than one image left out
        assert n - 1 <= sum(sizes(n, batch)) <= n and min(sizes(n, batch)) >= min(n, 2, batch)
    # several processes: each rank's sampler has as many indices, so every rank has as many batches
    per_rank = [len(EvenBatches(DistributedSampler(range(57), 2, rank, shuffle=True, seed=0), 8)) for rank in (0, 1)]
    assert per_rank[0] == per_rank[1] == 4


def test_early_stopping_and_class_weighted_loss(dataset, tmp_path):
    cfg = tiny_config(
        dataset, tmp_path, strategy="head", epochs=6, early_stopping=1, lr=1e-12, class_weighted_loss=True
    )
    run = train(cfg)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "early-stopped"
    assert len(info["history"]) == 2


def test_bad_files_are_reported_and_the_users_folder_is_untouched(tmp_path):
    data = make_class_folders(tmp_path / "photos", per_class=5)
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a full jpeg")
    (data / "dogs" / "empty.png").write_bytes(b"")
    before = tree_digest(data)
    events = []
    run = train(tiny_config(data, tmp_path / "runs", strategy="head", epochs=1), on_event=events.append)
    assert tree_digest(data) == before
    report = (run / "data_report.txt").read_text()
    assert "cats/broken.jpg" in report and "dogs/empty.png: empty file" in report
    split = json.loads((run / "split.json").read_text())
    assert {path for path, _ in split["skipped"]} == {"cats/broken.jpg", "dogs/empty.png"}
    logged = "\n".join(e["message"] for e in events if e["type"] == "log")
    assert "cats/broken.jpg" in logged


def test_bad_config_and_data_are_one_line_errors(tmp_path):
    with pytest.raises(FinetuneError, match="unknown strategy 'some'"):
        train(tiny_config(tmp_path, tmp_path, strategy="some"))
    with pytest.raises(FinetuneError, match="data folder not found"):
        train(tiny_config(tmp_path / "nope", tmp_path))
    assert not (tmp_path / "runs").exists()


def test_resnet50_head_trains(dataset, tmp_path):
    run = train(tiny_config(dataset, tmp_path, arch="resnet50", strategy="head", epochs=1))
    assert torch.load(run / "model.pth", weights_only=True)["fc.weight"].shape == (3, 2048)


@pytest.mark.parametrize("strategy", ["last", pytest.param("all", marks=pytest.mark.slow)])
def test_no_float64_tensor_where_a_gpu_would_hold_it(dataset, tmp_path, monkeypatch, strategy):
    """Apple MPS has no float64. With the accumulators chosen as for a GPU, nothing the training and
    its evaluation create with torch may be float64 (on MPS it would be on the device and crash)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from finetune import training as train_module

    monkeypatch.setattr(train_module, "accumulator_dtype", lambda device: torch.float32)
    found = []

    class Float64Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64:
                    found.append(str(func))
            return out

    with Float64Watch():
        train(tiny_config(dataset, tmp_path, strategy=strategy, epochs=1))
    assert not found, f"float64 tensors created by {sorted(set(found))[:5]}"


@pytest.mark.slow
def test_checkpoints_hold_cpu_tensors_only_and_a_finished_runs_last_pth_only_the_trained_layers(dataset, tmp_path):
    """A run stopped after an epoch keeps the whole last.pth (optimizer too) to resume exactly; once it
    ends by itself, last.pth keeps only the layers the strategy trains (model.pth has the frozen ones)
    and no optimizer: a head run's is kilobytes beside an 85 MB model.pth, and resumes all the same."""
    from finetune.training import to_cpu

    stop = threading.Event()
    run = train(
        tiny_config(dataset, tmp_path, strategy="head", epochs=2),
        stop=stop,
        on_event=lambda event: stop.set() if event["type"] == "epoch" else None,
    )
    assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    for name in ("model.pth", "last.pth"):
        loaded = torch.load(run / name, weights_only=True)  # no map_location: as on a CPU-only machine
        tensors = (
            list(loaded.values())
            if name == "model.pth"
            else list(loaded["model"].values()) + [t for s in loaded["optimizer"]["state"].values() for t in s.values()]
        )
        assert tensors and all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    assert "base" not in loaded and len(loaded["model"]) == len(torch.load(run / "model.pth", weights_only=True))
    nested = {"a": [torch.ones(1), (torch.zeros(2), 3)], "b": "x"}
    assert to_cpu(nested)["a"][1][1] == 3 and to_cpu(nested)["b"] == "x"

    train(resume_config(run), resume=run)  # the interrupted run finishes: now it ended by itself
    slim = torch.load(run / "last.pth", weights_only=True)
    assert "optimizer" not in slim and slim["base"] == "model.pth" and set(slim["model"]) == {"fc.weight", "fc.bias"}
    assert (run / "last.pth").stat().st_size * 100 < (run / "model.pth").stat().st_size
    model_before = torch.load(run / "model.pth", weights_only=True)

    events = []
    train(resume_config(run, epochs=3), on_event=events.append, resume=run)  # more epochs after the end
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and [h["epoch"] for h in info["history"]] == [1, 2, 3]
    assert any("keeps no optimizer state: AdamW starts afresh" in e["message"] for e in events if e["type"] == "log")
    model_after = torch.load(run / "model.pth", weights_only=True)
    frozen = [key for key in model_after if not key.startswith("fc.")]
    assert all(torch.equal(model_before[key], model_after[key]) for key in frozen), "frozen layers from model.pth"


# ---------------------------------------------------------------------------------------------
# Faults: weights that are not finite, a loss that diverges, a full disk, the lock of a training


def test_weights_with_a_nan_are_refused_in_one_line_naming_the_file_and_tensor(dataset, tmp_path):
    state = models.resnet34(weights=None).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    weights = tmp_path / "diverged.pth"
    torch.save(state, weights)
    with pytest.raises(FinetuneError) as caught:
        train(tiny_config(dataset, tmp_path / "runs", weights=str(weights), strategy="head"))
    message = str(caught.value)
    assert (
        message == f"refusing the weights in {weights}: layer1.0.conv1.weight holds nan values "
        f"(a diverged or damaged model)"
    )
    assert not any((tmp_path / "runs").iterdir()), "no run folder (and no lock) left behind"

    # the same for a run's last.pth on --resume
    run = tmp_path / "runs" / "r"
    run.mkdir()
    torch.save({"model": {"conv1.weight": torch.full((2, 2), float("inf"))}}, run / "last.pth")
    with pytest.raises(
        FinetuneError,
        match=rf"refusing the weights in {run / 'last.pth'}: conv1.weight holds "
        r"infinite values",
    ):
        train(tiny_config(dataset, tmp_path / "runs"), resume=run)


def test_a_nan_epoch_is_never_the_best_and_calibration_refuses_nan_logits():
    import numpy as np

    from finetune.calibrate import NonFiniteLogits, calibrate
    from finetune.training import TrainState

    state = TrainState()
    assert state.add({"epoch": 1, "val_acc": 0.5, "val_loss": 1.0})
    assert not state.add({"epoch": 2, "val_acc": 0.9, "val_loss": float("nan")})  # nan logits still have an argmax
    assert state.best["epoch"] == 1
    logits = np.array([[2.0, 0.0], [float("nan"), 1.0], [0.0, 3.0]])
    with pytest.raises(NonFiniteLogits, match="nan or infinite outputs for 1 of 3 validation images"):
        calibrate(logits, np.array([0, 1, 1]))


def test_the_lock_is_held_from_before_the_scan_and_removed_after(dataset, tmp_path, monkeypatch):
    """A studio must see a training that has no run folder yet (it is still scanning)."""
    from finetune import training as train_module
    from finetune.rundir import live_trainings

    runs = tmp_path / "runs"
    seen = []

    def scanning(cfg, on_progress=None):
        seen.extend(live_trainings(runs))  # read as another process would: a new open file, its own flock
        raise FinetuneError("stop after the look")

    monkeypatch.setattr(train_module, "scan_for_training", scanning)
    with pytest.raises(FinetuneError, match="stop after the look"):
        train(tiny_config(dataset, runs))
    assert [(t["pid"], t["data"], t["run_dir"]) for t in seen] == [(os.getpid(), str(dataset), None)]
    assert list(runs.iterdir()) == [] and live_trainings(runs) == []


def test_a_disk_too_full_even_to_mark_the_run_failed_says_so_in_the_same_line(dataset, tmp_path, monkeypatch):
    import errno

    from finetune import rundir
    from finetune import training as train_module

    real_write = rundir.write_text_atomic

    def fills_up(cfg, ctx, device, run, *rest):
        def no_room(path, text):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(rundir, "write_text_atomic", no_room)
        raise OSError(errno.ENOSPC, "No space left on device", str(run.last))

    monkeypatch.setattr(train_module, "_run_epochs", fills_up)
    with pytest.raises(DiskFull) as caught:
        train(tiny_config(dataset, tmp_path / "runs"))
    monkeypatch.setattr(rundir, "write_text_atomic", real_write)
    (run,) = [p for p in (tmp_path / "runs").iterdir()]
    assert re.fullmatch(
        rf"disk full: could not write {run}/last.pth \(.* free on that file system\); "
        rf"{run}/run.json still says running: it could not be updated either \(disk full: could "
        rf"not write {run}/run.json \(.*\)\)",
        str(caught.value),
    ), caught.value
    assert json.loads((run / "run.json").read_text())["status"] == "running"


def _mount_tmpfs(folder, size: str) -> bool:
    folder.mkdir(parents=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_really_full_disk_at_the_second_checkpoint(dataset, tmp_path):
    """A small tmpfs as the runs folder (needs root; skipped elsewhere): epoch 1's model.pth and
    last.pth fit, epoch 2's next checkpoint does not."""
    runs = tmp_path / "small-disk"
    if not _mount_tmpfs(runs, "200m"):  # resnet34's checkpoints are about 85 MB each
        pytest.skip("cannot mount a tmpfs here (not root, or no mount permission)")
    try:
        epochs = []
        with pytest.raises(DiskFull) as caught:
            train(
                tiny_config(dataset, runs, strategy="head", epochs=3),
                on_event=lambda e: epochs.append(e) if e["type"] == "epoch" else None,
            )
        assert [e["epoch"] for e in epochs] == [1]
        assert re.fullmatch(
            rf"disk full: could not write {runs}/\S+/(model|last)\.pth \([\d.]+ MB free on that "
            rf"file system\)",
            str(caught.value),
        ), caught.value
        (run,) = [p for p in runs.iterdir() if p.is_dir()]
        info = json.loads((run / "run.json").read_text())
        assert info["status"] == "failed" and info["error"] == str(caught.value)
        assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
        assert [p.name for p in runs.iterdir()] == [run.name], "no lock or temporary file left"
        assert torch.load(run / "model.pth", weights_only=True)["fc.weight"].shape == (3, 512)
    finally:
        subprocess.run(["umount", "-l", str(runs)], capture_output=True)


@pytest.mark.parametrize(
    "overrides, fp16",
    [
        pytest.param(dict(strategy="all"), False, marks=pytest.mark.slow),  # pixel cache: crops on the device
        pytest.param(dict(strategy="last", cache="off"), False, marks=pytest.mark.slow),  # streamed uint8 images
        (dict(strategy="head", cache_views=1, ema=0.99), True),  # feature cache, fp16 + GradScaler as on a T4, EMA
    ],
    ids=["pixels", "streaming", "features-fp16"],
)
def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch, overrides, fp16):
    """Syncs as torch sees them (aten._local_scalar_dense: .item(), bool(), float()), counted over each
    epoch's steps: only the epoch's own reads (its sums, two batch events), never one per step."""
    from finetune import training
    from finetune.syncs import count_syncs

    if fp16:  # with the default AdamW, GradScaler.step would .item() its inf check every step
        monkeypatch.setattr(training, "amp_dtype_for", lambda device, enabled=True: torch.float16)
    # batch events (each reads the device's sums) at an epoch's first and last batch only: they are
    # throttled by time, and on a slow CPU every batch would be half a second apart
    monkeypatch.setattr(training, "BATCH_EVENTS_PER_SECOND", 1e-9)
    counts, steps = [], []
    one_epoch = training.train_one_epoch

    def counted(session, *args, **kwargs):
        with count_syncs("cpu") as syncs:
            result = one_epoch(session, *args, **kwargs)
        counts.append(syncs.count)
        steps.append(session.steps_per_epoch)
        return result

    monkeypatch.setattr(training, "train_one_epoch", counted)
    data = make_class_folders(tmp_path / "data", classes=("a", "b"), per_class=24, size=(40, 32))
    cfg = TrainConfig(  # ResNet-18: the steps are the same code for every row, with half the ops to count
        data=str(data), runs_dir=str(tmp_path), arch="resnet18", weights="none", epochs=2, batch_size=2,
        image_size=32, workers=0,
    )  # fmt: skip
    for name, value in overrides.items():
        setattr(cfg, name, value)
    train(cfg)
    assert steps[0] >= 15 and len(counts) == 2  # enough steps that one sync each would show
    assert max(counts) <= steps[0] / 10 + 8, counts


def test_grad_scaler_steps_the_fused_adamw_without_a_sync():
    """Why training uses the fused AdamW: GradScaler passes it the scale and the inf check as tensors;
    any other optimizer makes GradScaler read them back with .item() every step."""
    from finetune.syncs import count_syncs
    from finetune.training import adamw_options

    def syncs_per_step(**options) -> float:
        model = torch.nn.Linear(8, 2)
        optimizer = torch.optim.AdamW(model.parameters(), **options)
        scaler = torch.amp.GradScaler("cpu")
        with count_syncs("cpu") as syncs:
            for _ in range(5):
                optimizer.zero_grad()
                scaler.scale(model(torch.randn(4, 8)).sum()).backward()
                scaler.step(optimizer)
                scaler.update()
        return syncs.count / 5

    assert adamw_options(torch.device("cuda")) == {"fused": True}
    assert syncs_per_step(**adamw_options(torch.device("cpu"))) == 0
    assert syncs_per_step(foreach=True) >= 1  # the check can fail


def test_a_last_pth_of_a_non_fused_adamw_resumes_into_the_fused_one():
    """load_state_dict keeps the saved groups' settings: an older last.pth (fused None) would turn the
    fused AdamW back into a loop, and GradScaler, set up for the fused kernel, fails on that."""
    from finetune.training import adamw_options, kernel_choice_of

    def model_and_optimizer(**options):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        return model, torch.optim.AdamW(model.parameters(), **options)

    old_model, old = model_and_optimizer()
    old_model(torch.randn(3, 4)).sum().backward()
    old.step()
    model, optimizer = model_and_optimizer(**adamw_options(torch.device("cpu")))
    optimizer.load_state_dict(kernel_choice_of(optimizer, old.state_dict()))
    assert optimizer.param_groups[0]["fused"] is True
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    scaler.step(optimizer)  # without kernel_choice_of: "Expected grad_scale and found_inf to be None"
    scaler.update()

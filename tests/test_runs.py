"""finetune.runs: what the UI reads about runs and a training process (no gradio, no browser)."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest

from conftest import REPO, make_class_folders
from finetune.config import FinetuneError, TrainConfig
from finetune.runs import (EventFollower, TrainingJob, TrainingView, list_runs, read_metrics, resolve_run, run_choices,
                           train_command)


def make_run(runs_dir, name, created, status="completed", model=True, accuracy=0.5):
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"created": created, "status": status,
                                              "summary": {"accuracy": accuracy}}))
    if model:
        (run / "model.pth").write_bytes(b"x")
    return run


def test_runs_listed_newest_first_and_usable_only(tmp_path):
    old = make_run(tmp_path, "b-old", "2025-01-01T10:00:00")
    new = make_run(tmp_path, "a-new", "2025-02-01T10:00:00", status="stopped")
    make_run(tmp_path, "c-failed", "2025-03-01T10:00:00", status="failed", model=False)
    (tmp_path / "not-a-run").mkdir()
    assert [p.name for p in list_runs(tmp_path)] == ["c-failed", "a-new", "b-old"]
    choices = run_choices(tmp_path, usable_only=True)
    assert [path for _, path in choices] == [str(new), str(old)]
    assert choices[0][0] == "a-new · stopped · val acc 0.500"
    assert list_runs(tmp_path / "missing") == []


def test_resolve_run_stays_inside_the_runs_folder(tmp_path):
    run = make_run(tmp_path / "runs", "r1", "2025-01-01T10:00:00")
    assert resolve_run(str(run), tmp_path / "runs") == run.resolve()
    assert resolve_run("r1", tmp_path / "runs") == run.resolve()
    with pytest.raises(FinetuneError, match="not a run in"):
        resolve_run(str(tmp_path), tmp_path / "runs")
    with pytest.raises(FinetuneError, match="not a run in"):
        resolve_run("../r1", tmp_path / "runs")
    with pytest.raises(FinetuneError, match="no run chosen"):
        resolve_run("", tmp_path / "runs")
    with pytest.raises(FinetuneError, match="no evaluation yet"):
        read_metrics(run)


def test_event_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    follower = EventFollower(path)
    assert follower.poll() == []
    path.write_text('{"type": "log", "message": "a"}\n{"type": "lo')
    assert follower.poll() == [{"type": "log", "message": "a"}]
    with open(path, "a") as f:
        f.write('g", "message": "b"}\n')
    assert follower.poll() == [{"type": "log", "message": "b"}]
    assert follower.poll() == []


def test_training_view_progress_and_curves():
    view = TrainingView()
    assert "preparing" in view.progress_text()
    view.add({"type": "start", "run_dir": "/r", "epochs": 2, "batches_per_epoch": 4, "train_images": 8,
              "val_images": 2, "classes": ["a", "b"], "device": "CPU", "trainable_params": 10,
              "total_params": 100, "arch": "resnet34", "strategy": "head"})
    view.add({"type": "batch", "epoch": 1, "epochs": 2, "batch": 2, "batches": 4, "loss": 1.0, "acc": 0.5,
              "images_per_s": 12.0, "eta_s": 65})
    assert view.fraction() == pytest.approx(0.25)
    assert view.progress_text() == "epoch 1/2 · batch 2/4 · 12 images/s · about 1:05 left"
    view.add({"type": "epoch", "epoch": 1, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6,
              "seconds": 1.0, "best": True})
    assert {(c["series"], c["metric"]) for c in view.curves} == {
        ("train", "loss"), ("train", "accuracy"), ("val", "loss"), ("val", "accuracy")}
    view.add({"type": "end", "status": "stopped", "summary": "2 images: accuracy 0.5", "best": {"epoch": 1},
              "seconds": 3})
    assert view.fraction() == 1.0 and view.progress_text().startswith("stopped after 1/2 epochs")


def test_train_command():
    cmd = train_command(TrainConfig(data="d", weights="none", epochs=2, lr=0.01, runs_dir="R", run_name="n"))
    assert cmd[:4] == [sys.executable, "-m", "finetune", "train"]
    assert cmd[cmd.index("--lr") + 1] == "0.01" and cmd[cmd.index("--run-name") + 1] == "n"


def test_failed_process_is_a_one_line_message(tmp_path):
    job = TrainingJob(TrainConfig(data=str(tmp_path / "missing"), weights="none", runs_dir=str(tmp_path / "runs")))
    deadline = time.time() + 60
    while not job.finished() and time.time() < deadline:
        job.update()
        time.sleep(0.1)
    assert job.view.status == "failed"
    assert job.view.error.startswith("data folder not found")


def test_killed_process_says_so(tmp_path):
    job = TrainingJob(TrainConfig(data=str(tmp_path), weights="none", runs_dir=str(tmp_path / "runs")))
    job.process.send_signal(signal.SIGKILL)
    job.process.wait(10)
    view = job.update()
    assert view.status == "failed" and "killed by SIGKILL" in view.error and "out of memory" in view.error


@pytest.mark.slow
def test_two_process_training_under_torchrun_stops_cleanly(tmp_path):
    """What the app launches when several GPUs are visible (here 2 CPU processes, gloo)."""
    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=8)
    cfg = TrainConfig(data=str(data), weights="none", epochs=50, batch_size=2, image_size=32, workers=0,
                      device="cpu", runs_dir=str(tmp_path / "runs"))
    assert train_command(cfg, processes=2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                   "--nproc_per_node", "2"]
    job = TrainingJob(cfg, cwd=REPO, processes=2)
    deadline = time.time() + 180
    while job.update().batch == 0 and job.running() and time.time() < deadline:
        time.sleep(0.2)
    assert job.view.batch > 0, job.failure_message()
    assert job.stop()
    while not job.finished() and time.time() < deadline:
        job.update()
        time.sleep(0.2)
    assert job.view.status == "stopped", job.view.error
    assert job.process.returncode == 0
    info = json.loads((job.run_dir / "run.json").read_text())
    assert info["world_size"] == 2 and info["status"] == "stopped"
    assert (job.run_dir / "model.pth").is_file()
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [job.run_dir.name]

"""Several processes: torchrun with 2 CPU processes (gloo) leaves one normal run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_class_folders
from finetune.predict import Predictor
from finetune.events import read_events


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["last", "all"])
def test_torchrun_two_cpu_processes_write_one_normal_run(tmp_path, strategy):
    data = make_class_folders(tmp_path / "data", classes=("red", "green", "blue"), per_class=7)
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "finetune", "train", str(data), "--weights", "none", "--strategy", strategy,
               "--epochs", "2", "--batch-size", "4", "--image-size", "64", "--workers", "0", "--device", "cpu",
               "--runs-dir", str(runs), "--quiet"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, "only rank 0 creates a run folder"
    run = run_dirs[0]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 2
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    for name in ("model.pth", "last.pth", "class_indices.json", "metrics.json", "confusion_matrix.png",
                 "split.json", "data_report.txt"):
        assert (run / name).is_file(), name

    events = read_events(run)
    assert sum(e["type"] == "start" for e in events) == 1  # one writer: no duplicated events
    assert sum(e["type"] == "epoch" for e in events) == 2
    # every validation image evaluated once, whichever rank held it
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert metrics["num_images"] == len(split["val"])

    state = torch.load(run / "model.pth", weights_only=True)
    assert not any(key.startswith("module.") for key in state), "saved without the DDP wrapper"
    predictor = Predictor.from_run(run, device="cpu")
    assert predictor.classes == ["blue", "green", "red"]

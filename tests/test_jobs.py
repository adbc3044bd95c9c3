"""finetune.jobs: a training process as the studio sees it (no gradio, no browser)."""

from __future__ import annotations

import json
import signal
import sys
import time

import pytest
from conftest import REPO, every_option_config, make_class_folders

from finetune.config import TrainConfig
from finetune.jobs import TrainingJob, TrainingView, train_command


def test_training_view_progress_and_curves():
    view = TrainingView()
    assert "preparing" in view.progress_text()
    view.add(
        {
            "type": "start",
            "run_dir": "/r",
            "epochs": 2,
            "batches_per_epoch": 4,
            "train_images": 8,
            "val_images": 2,
            "classes": ["a", "b"],
            "device": "CPU",
            "trainable_params": 10,
            "total_params": 100,
            "arch": "resnet34",
            "strategy": "head",
        }
    )
    view.add(
        {
            "type": "batch",
            "epoch": 1,
            "epochs": 2,
            "batch": 2,
            "batches": 4,
            "loss": 1.0,
            "acc": 0.5,
            "images_per_s": 12.0,
            "eta_s": 65,
        }
    )
    assert view.fraction() == pytest.approx(0.25)
    assert view.progress_text() == "epoch 1/2 · batch 2/4 · 12 images/s · about 1:05 left"
    view.add(
        {
            "type": "epoch",
            "epoch": 1,
            "train_loss": 1.0,
            "train_acc": 0.5,
            "val_loss": 0.9,
            "val_acc": 0.6,
            "seconds": 1.0,
            "best": True,
        }
    )
    assert {(c["series"], c["metric"]) for c in view.curves} == {
        ("train", "loss"),
        ("train", "accuracy"),
        ("val", "loss"),
        ("val", "accuracy"),
    }
    view.add(
        {"type": "end", "status": "stopped", "summary": "2 images: accuracy 0.5", "best": {"epoch": 1}, "seconds": 3}
    )
    assert view.fraction() == 1.0 and view.progress_text().startswith("stopped after 1/2 epochs")


def test_a_diverging_loss_puts_no_point_on_the_curves():
    view = TrainingView()
    view.add(
        {
            "type": "batch",
            "epoch": 2,
            "epochs": 2,
            "batch": 1,
            "batches": 4,
            "loss": float("nan"),
            "acc": 0.3,
            "images_per_s": 12.0,
            "eta_s": 5,
        }
    )
    view.add(
        {
            "type": "epoch",
            "epoch": 2,
            "train_loss": float("nan"),
            "train_acc": 0.3,
            "val_loss": float("inf"),
            "val_acc": 0.3,
            "seconds": 1.0,
            "best": False,
        }
    )
    assert {(c["series"], c["metric"]) for c in view.curves} == {("train", "accuracy"), ("val", "accuracy")}


def test_a_run_stopped_by_a_diverging_loss_says_why_not_on_request(tmp_path):
    """The training emits its error, then its end with status "stopped" (the best model is usable)."""
    from finetune.studio.views import training_result

    message = (
        "training diverged: the training loss became nan in epoch 2; try a lower --lr (this run used "
        "0.003); the best model so far (epoch 1) is kept"
    )
    for events, expected, absent in (
        ([{"type": "error", "message": message}], "training diverged", "on request"),
        ([], "Stopped on request", "diverged"),
    ):
        view = TrainingView(run_dir=str(tmp_path))
        for event in [
            *events,
            {
                "type": "end",
                "status": "stopped",
                "run_dir": str(tmp_path),
                "best": {"epoch": 1},
                "summary": "val acc 0.5",
                "seconds": 3.0,
            },
        ]:
            view.add(event)
        text, _ = training_result(view)
        assert view.status == "stopped" and expected in text and absent not in text, text


def test_train_command_passes_the_whole_config_as_a_file(tmp_path):
    assert train_command(tmp_path / "c.json") == [
        sys.executable,
        "-m",
        "finetune",
        "train",
        "--config",
        str(tmp_path / "c.json"),
        "--quiet",
    ]


def test_every_option_reaches_the_training_process(tmp_path, monkeypatch):
    """The studio's launch path: the config file the job writes is what `train --config` reads,
    with every path made absolute against the studio's working directory (not the training's)."""
    from finetune.cli import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    cfg = every_option_config()
    job = TrainingJob(cfg, cwd=REPO)
    job.kill()
    launched = job.command[job.command.index("--config") + 1]
    args = build_parser().parse_args(["train", "--config", launched])
    received = config_from_args(args)
    expected = dict(
        cfg.to_dict(),
        data=str(tmp_path / "photos"),
        weights=str(tmp_path / "w.pth"),
        runs_dir=str(tmp_path / "my-runs"),
        curation=str(tmp_path / "review" / "curation.json"),
    )
    assert received.to_dict() == expected


@pytest.mark.slow
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
    cfg = TrainConfig(
        data=str(data),
        arch="resnet18",
        weights="none",
        epochs=50,
        batch_size=2,
        image_size=32,
        workers=0,
        device="cpu",
        runs_dir=str(tmp_path / "runs"),
    )
    assert train_command("c.json", processes=2)[1:6] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
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


def test_the_studio_refuses_to_start_beside_a_terminal_training_that_is_still_scanning(tmp_path):
    """A terminal training has no run.json while it scans: its lock in the runs folder is what the
    studio sees. Once it ends, the studio may start one."""
    from test_rundir import hold_lock

    from finetune.config import FinetuneError
    from finetune.studio.state import Studio

    runs, data = tmp_path / "runs", make_class_folders(tmp_path / "photos")
    studio = Studio(runs, tmp_path / "workspace", data)
    holder = hold_lock(runs, data)
    try:
        cfg = TrainConfig(data=str(data), weights="none", runs_dir=str(runs))
        with pytest.raises(FinetuneError) as refused:
            studio.start(cfg)
        assert str(refused.value) == (
            f"a training started from a terminal (pid {holder.pid}, data {data}) is "
            f"running in this runs folder; wait for it or stop it (Ctrl-C in its "
            f"terminal, or kill {holder.pid})"
        )
        assert studio.job is None and not [p for p in runs.iterdir() if p.is_dir()], "nothing was started"
        assert studio.start_up() is None  # not followable yet (no run folder): start-up goes on
    finally:
        holder.stdin.close()
        holder.wait(30)
    studio.require_idle()  # what the start handler asks first: no training now


def test_studio_start_up_survives_a_run_it_cannot_mark_and_folders_it_cannot_make(tmp_path, monkeypatch, caplog):
    """After a training died of a full disk its run.json still says running; marking it ended
    fails the same way: a warning, not a traceback. A runs folder that cannot be made is one line."""
    from finetune import rundir
    from finetune.config import FinetuneError
    from finetune.studio.state import Studio

    runs = tmp_path / "runs"
    run = rundir.RunDir.create(runs, "resnet34", "head", "left-running")
    run.write_info({"status": "running", "pids": [2**22 + 1]})

    def disk_is_full(path, text):
        raise rundir.DiskFull(f"disk full: could not write {path} (0.0 MB free on that file system)")

    monkeypatch.setattr(rundir, "write_text_atomic", disk_is_full)
    assert Studio(runs, tmp_path / "workspace", tmp_path).start_up() is None
    assert f"could not mark left-running as ended: disk full: could not write {run.info_path}" in caplog.text
    assert run.info()["status"] == "running"  # as it was: the next start-up tries again
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(FinetuneError, match=f"cannot use {blocker / 'runs'}: Not a directory"):
        Studio(blocker / "runs", tmp_path / "workspace", tmp_path)


# a stand-in for a training the kernel's OOM killer ends: it marks its run running, then SIGKILL
KILLED_BY_THE_SYSTEM = (
    "import json, os, pathlib, sys\n"
    "run = pathlib.Path(sys.argv[1])\n"
    "run.mkdir(parents=True)\n"
    "info = {'status': 'running', 'pids': [os.getpid()], 'host': os.uname().nodename}\n"
    "(run / 'run.json').write_text(json.dumps(info))\n"
    "os.kill(os.getpid(), 9)\n"
)


def test_a_training_the_system_kills_leaves_its_run_failed_with_why(tmp_path, monkeypatch):
    from finetune import jobs
    from finetune.rundir import RunDir

    runs = tmp_path / "runs"
    monkeypatch.setattr(
        jobs, "train_command", lambda config, processes: [sys.executable, "-c", KILLED_BY_THE_SYSTEM, str(runs / "oom")]
    )
    job = TrainingJob(TrainConfig(data=str(tmp_path), weights="none", runs_dir=str(runs), run_name="oom"))
    assert job.process.wait(30) == -signal.SIGKILL
    view = job.update()
    info = RunDir(job.run_dir).info()
    assert view.status == info["status"] == "failed" and view.error == info["error"]
    assert info["error"].startswith("the training process was killed by SIGKILL")
    assert "out of memory" in info["error"] and "--batch-size" in info["error"] and "dmesg" in info["error"]


TORCHRUN_REPORT = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
finetune FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2025-01-01_10:00:00
  host      : node1
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242) (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================"""


def test_a_rank_the_system_kills_under_torchrun_is_the_cause_in_run_json(tmp_path):
    """torchrun exits 1 after one rank was SIGKILLed and tears the others down; rank 0 settled the run
    with only the consequence (a broken collective): the studio records the root cause."""
    import types

    from finetune.jobs import killed_rank
    from finetune.rundir import RunDir

    run = RunDir.create(tmp_path / "runs", "resnet18", "all", "torn-down")
    run.write_info({"status": "failed", "error": "RuntimeError: Connection closed by peer"})
    run.events.write_text(json.dumps({"type": "error", "message": "RuntimeError: Connection closed by peer"}) + "\n")
    job = TrainingJob.__new__(TrainingJob)
    job._follow(TrainConfig(data=str(tmp_path)), run.path, 2, attached_pids=[])
    job.process = types.SimpleNamespace(returncode=1, pid=1, poll=lambda: 1)
    job._stderr.extend(["error: RuntimeError: Connection closed by peer", *TORCHRUN_REPORT.splitlines()])
    view = job.update()
    cause = "training process rank 1 (pid 4242) was killed by SIGKILL, most likely by the system"
    assert view.status == "failed" and view.error.startswith(cause) and run.info()["error"].startswith(cause)
    other_cause = TORCHRUN_REPORT.replace("exitcode  : -9", "exitcode  : 1")
    assert killed_rank(other_cause.splitlines()) is None and killed_rank([]) is None

"""finetune.rundir: the run folder's files, naming, info, and finding runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import FinetuneError
from finetune.rundir import RunDir, list_runs, read_metrics, resolve_run, run_choices, run_name


def make_run(runs_dir, name, created, status="completed", model=True, accuracy=0.5):
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"created": created, "status": status, "summary": {"accuracy": accuracy}}))
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


def test_run_names_are_unique_and_create_never_reuses_a_folder(tmp_path):
    first = RunDir.create(tmp_path, "resnet34", "last", name="fixed")
    second = RunDir.create(tmp_path, "resnet34", "last", name="fixed")
    assert (first.name, second.name) == ("fixed", "fixed-2")
    assert run_name("resnet50", "head", tmp_path).endswith("-resnet50-head")
    assert not any(second.path.iterdir())


def test_info_updates_keep_what_was_there(tmp_path):
    run = RunDir.create(tmp_path, "resnet34", "last")
    assert run.info() == {} and not run.is_run()
    run.write_info({"status": "running", "classes": ["a", "b"]})
    run.update_info(status="completed")
    assert run.info() == {"format": "finetune-run/1", "status": "completed", "classes": ["a", "b"]}
    assert [p.name for p in run.path.iterdir()] == ["run.json"], "no temporary file left behind"
    run.write_class_indices(["daisy", "roses"])
    assert run.class_indices.read_text() == '{\n    "0": "daisy",\n    "1": "roses"\n}'


def test_require_trained_names_what_is_missing(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    with pytest.raises(FinetuneError, match="not a run folder"):
        run.require_trained()
    run.write_info({"status": "running"})
    with pytest.raises(FinetuneError, match="has no arch and classes"):
        run.require_trained()
    run.update_info(arch="resnet34", classes=["a", "b"])
    with pytest.raises(FinetuneError, match="has no model.pth yet"):
        run.require_trained()
    run.model.write_bytes(b"")
    assert run.require_trained()["classes"] == ["a", "b"]


# ---------------------------------------------------------------------------------------------
# Atomic writes on a full disk, and the lock a training holds in the runs folder


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path, monkeypatch):
    import errno

    import torch

    from finetune import fsutil, rundir

    target = tmp_path / "model.pth"
    rundir.save_atomic({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def disk_fills(self, data):  # part of the data, then what a full disk says
        os.write(self.fd, bytes(memoryview(data).cast("B")[:10]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil._Sink, "write", disk_fills)
    with pytest.raises(rundir.DiskFull) as caught:  # torch.save raises RuntimeError over the OSError
        rundir.save_atomic({"w": torch.zeros(1000)}, target)
    assert re.fullmatch(
        rf"disk full: could not write {target} \([\d.]+ [MG]B free on that file system\)", str(caught.value)
    )
    with pytest.raises(rundir.DiskFull, match=f"could not write {tmp_path / 'run.json'}"):
        rundir.write_json(tmp_path / "run.json", {"status": "failed"})
    monkeypatch.undo()

    def breaks(sink):
        sink.write(b"half")
        raise ValueError("not a disk problem")

    with pytest.raises(ValueError, match="not a disk problem"):  # other errors pass unchanged
        rundir.write_atomic(target, breaks)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_temporary_names_are_unique_so_two_writers_never_share_one(tmp_path):
    from finetune.rundir import write_atomic

    target = tmp_path / "run.json"

    def outer(sink):
        write_atomic(target, lambda inner: inner.write(b"inner"))  # while the outer one is half written
        sink.write(b"outer")

    write_atomic(target, outer)
    assert target.read_bytes() == b"outer" and [p.name for p in tmp_path.iterdir()] == ["run.json"]


HOLD_LOCK = (
    "import sys\nfrom finetune.rundir import TrainingLock\n"
    "with TrainingLock(sys.argv[1], sys.argv[2]) as lock:\n"
    "    print(lock.path, flush=True)\n    sys.stdin.readline()\n"
)


def hold_lock(runs_dir, data) -> subprocess.Popen:
    """Another process that holds a training's lock in `runs_dir` until its stdin closes."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(runs_dir), str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    holder.lock_path = Path(holder.stdout.readline().strip())
    assert holder.lock_path.is_file(), "the lock holder did not start"
    return holder


def test_two_trainings_hold_locks_side_by_side_and_a_dead_ones_lock_is_stale(tmp_path):
    from finetune.rundir import live_trainings

    runs = tmp_path / "runs"
    first, second = hold_lock(runs, "/data/one"), hold_lock(runs, "/data/two")  # neither refuses the other
    try:
        assert sorted((t["pid"], t["data"]) for t in live_trainings(runs)) == sorted(
            [(first.pid, "/data/one"), (second.pid, "/data/two")]
        )
        first.kill()  # SIGKILL: no clean-up ran, the file stays, but nobody holds its flock
        first.wait(10)
        assert first.lock_path.is_file()
        assert [t["pid"] for t in live_trainings(runs)] == [second.pid]
        assert not first.lock_path.exists(), "a stale lock is removed on the way"
        second.stdin.close()
        assert second.wait(30) == 0
        assert live_trainings(runs) == [] and list(runs.iterdir()) == []
    finally:
        for holder in (first, second):
            holder.kill()
            holder.wait(10)


def test_a_running_run_whose_processes_are_gone_reads_as_ended_unexpectedly(tmp_path):
    """The OOM killer's SIGKILL leaves run.json at "running": readers say so, and write nothing."""
    from finetune.rundir import ENDED_UNEXPECTEDLY, TrainingLock, training_pids

    here, gone = os.uname().nodename, 2**22 + 1  # above Linux's largest pid: never a live process
    run = RunDir.create(tmp_path / "runs", "resnet18", "all", "killed")
    run.write_info({"status": "running", "pids": [gone], "host": here})
    before = run.info_path.read_bytes()
    assert run.status() == ENDED_UNEXPECTEDLY
    assert run.status_text() == f"ended unexpectedly (process {gone} is gone: killed, out of memory?)"
    assert run.label() == f"killed · ended unexpectedly (process {gone} is gone: killed, out of memory?)"
    with pytest.raises(FinetuneError, match="status: ended unexpectedly"):
        run.metrics()
    assert run.info_path.read_bytes() == before, "a reader never writes"
    with TrainingLock(run.path.parent, "/data") as lock:  # a live training's lock names it: it runs
        lock.set_run(run.path)  # (a notebook's kernel: no finetune on its command line)
        assert run.status() == "running"
    run.update_info(pids=[os.getpid()], host="another-machine")  # its processes cannot be seen from here
    assert run.status() == "running"
    run.update_info(status="completed")
    assert run.status() == "completed"
    assert training_pids({"pids": ["12", 0, -1, True, 7]}) == [7] and training_pids({"pid": 5}) == [5]


def test_training_here_names_the_training_that_holds_the_gpu(tmp_path):
    from finetune.rundir import TrainingLock, training_here

    runs = tmp_path / "runs"
    assert training_here(runs) is None
    with TrainingLock(runs, "/data") as lock:
        assert training_here(runs) == f"pid {os.getpid()}"  # still scanning: no run folder yet
        run = RunDir.create(runs, "resnet50", "last", "on-the-gpu")
        run.write_info({"status": "running", "device": "NVIDIA H100 (cuda:0, compute capability 9.0)"})
        lock.set_run(run.path)
        assert training_here(runs) == "on-the-gpu"
        run.update_info(device="CPU (16 cores)")
        assert training_here(runs) is None, "a training on the CPU leaves the GPU free"
    assert training_here(runs) is None


# ---------------------------------------------------------------------------------------------
# A run.json from a stranger: a bad field reads as unknown, and the runs beside it are still found


def write_run(runs_dir, name, text) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return run


def test_a_created_that_is_no_text_sorts_by_the_folder_time(tmp_path):
    from finetune import jobs
    from finetune.rundir import TrainingLock

    runs = tmp_path / "runs"
    good = make_run(runs, "good", "2025-01-01T10:00:00", status="running")
    for name, created in (("number", 5), ("list", [1]), ("empty", "")):
        write_run(runs, name, {"status": "completed", "created": created})
    assert sorted(p.name for p in list_runs(runs)) == ["empty", "good", "list", "number"]
    assert list_runs(runs)[-1] == good  # the others sort by their folders' time: today, newer
    assert len(run_choices(runs)) == 4
    with TrainingLock(runs, "/data") as lock:  # the good run trains: the studio still finds it
        lock.set_run(good)
        assert jobs.running_trainings(runs) == [good]
        with pytest.raises(FinetuneError, match=r"already running \(good\)"):
            jobs.require_no_training(runs)


def test_a_pid_too_wide_for_the_system_is_no_process(tmp_path):
    from finetune import jobs
    from finetune.rundir import ENDED_UNEXPECTEDLY, is_training_process, training_pids

    huge = 10**20  # os.kill raises OverflowError for it
    assert training_pids({"pids": [huge, 2**31, 7]}) == [7] and training_pids({"pid": huge}) == []
    assert is_training_process(huge) is False
    runs = tmp_path / "runs"
    run = write_run(runs, "wide", {"status": "running", "pids": [huge], "host": os.uname().nodename})
    good = make_run(runs, "good", "2025-01-01T10:00:00")
    assert RunDir(run).status() == ENDED_UNEXPECTEDLY
    assert jobs.running_trainings(runs) == [] and RunDir(run).info()["status"] != "running"
    assert list_runs(runs) == [run, good]


@pytest.mark.parametrize(
    "summary", ["no", [0.9], {"accuracy": "high"}, {"accuracy": True}, {"accuracy": None}, {"accuracy": [1]}]
)
def test_a_label_leaves_out_an_accuracy_that_is_no_number(tmp_path, summary):
    runs = tmp_path / "runs"
    write_run(runs, "odd", {"status": "completed", "created": "2025-02-01T10:00:00", "summary": summary})
    make_run(runs, "good", "2025-01-01T10:00:00", accuracy=0.25)
    assert [label for label, _ in run_choices(runs)] == ["odd · completed", "good · completed · val acc 0.250"]


@pytest.mark.parametrize("accuracy", ["Infinity", "-Infinity", "NaN", "1" + "0" * 400, "-0.5"])
def test_a_label_leaves_out_an_accuracy_that_is_not_finite(tmp_path, accuracy):
    run = write_run(tmp_path, "odd", '{"status": "completed", "summary": {"accuracy": ' + accuracy + "}}")
    assert RunDir(run).label() == "odd · completed"


@pytest.mark.parametrize("text", ['{"status": "completed", "epochs": 1' + "0" * 5000 + "}", "[" * 100_000])
def test_a_run_json_that_python_cannot_parse_is_unreadable_not_a_crash(tmp_path, text):
    """An int of over 4300 digits raises ValueError (not JSONDecodeError), deep nesting RecursionError."""
    runs = tmp_path / "runs"
    run = RunDir(write_run(runs, "odd", text))
    (run.path / "metrics.json").write_text(text)
    (run.path / "split.json").write_text(text)
    make_run(runs, "good", "2025-01-01T10:00:00")
    assert run.info() == {} and run.data_root() is None
    with pytest.raises(FinetuneError, match="cannot read"):
        run.require_info()
    assert [p.name for p in list_runs(runs)] == ["odd", "good"]  # odd by its folder's time: today
    assert RunDir(runs / "good").label() == "good · completed · val acc 0.500"


def test_data_root_of_a_split_that_is_no_object_is_unknown(tmp_path):
    run = RunDir(make_run(tmp_path, "r", "2025-01-01T10:00:00"))
    run.split_path.write_text("[1, 2]")
    assert run.data_root() is None

"""Several processes: torchrun with 2 CPU processes (gloo) leaves one normal run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_class_folders

from finetune.events import read_events
from finetune.predict import Predictor


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["last", "all"])
def test_torchrun_two_cpu_processes_write_one_normal_run(tmp_path, strategy):
    data = make_class_folders(tmp_path / "data", classes=("red", "green", "blue"), per_class=7)
    runs = tmp_path / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "finetune",
        "train",
        str(data),
        "--arch",
        "resnet18",  # the smallest row: DDP's code is the same for each
        "--weights",
        "none",
        "--strategy",
        strategy,
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--image-size",
        "64",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--runs-dir",
        str(runs),
        "--quiet",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, "only rank 0 creates a run folder"
    run = run_dirs[0]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["world_size"] == 2
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    for name in (
        "model.pth",
        "last.pth",
        "class_indices.json",
        "metrics.json",
        "confusion_matrix.png",
        "split.json",
        "data_report.txt",
    ):
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


def torchrun(script_or_module: list[str], tmp_path, nproc=2, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *script_or_module,
    ]
    return subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


@pytest.mark.slow
def test_ranks_with_different_memory_readings_agree_on_one_pipeline(tmp_path):
    """Rank 0 reads plenty of free memory, rank 1 almost none: they must still build the same
    pipeline (else their batch counts differ and the collectives hang), within the smaller node's
    memory (streamed). Then, in the same processes, --resume as on two nodes: rank 1 never reads the
    run folder (on another node there is none) and gets last.pth, the split and the configuration from
    rank 0."""
    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=8)
    runs = tmp_path / "runs"
    script = tmp_path / "rank_memory.py"
    script.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "from finetune import cache, rundir, training\n"
        "rank = int(os.environ['RANK'])\n"
        "cache.available_memory_bytes = lambda: [8 * 1024**3, 1024][rank]\n"
        "from finetune.cli import main\n"
        f"code = main(['train', '--arch', 'resnet18', '--weights', 'none', '--strategy', 'last', '--epochs', '2',"
        f" '--batch-size', '4', '--image-size', '64', '--workers', '0', '--device', 'cpu', '--runs-dir', {str(runs)!r},"
        f" '--quiet', '--', {str(data)!r}])\n"
        "if code:\n"
        "    sys.exit(code)\n"
        f"run = next(p for p in Path({str(runs)!r}).iterdir() if p.is_dir())\n"
        "if rank == 1:\n"
        "    def elsewhere(*args, **kwargs):\n"
        "        raise AssertionError('rank 1 read the run folder')\n"
        "    rundir.RunDir.read_split = rundir.RunDir.require_info = rundir.RunDir.info = elsewhere\n"
        "    training.safe_load = elsewhere\n"
        "sys.exit(main(['train', '--resume', str(run), '--epochs', '3', '--quiet']))\n"
    )
    process = torchrun([str(script)], tmp_path)
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        pytest.fail("the ranks hung (different pipelines?)")
    assert process.returncode == 0, err[-3000:]
    run = next(p for p in runs.iterdir() if p.is_dir())
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "completed" and info["pipeline"].startswith("streamed images"), info["pipeline"]
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3] and info["world_size"] == 2


def _two_gloo_ranks(rank: int, port: int, data: str) -> None:
    """One of two gloo ranks that torch.multiprocessing started (as torchrun would, by its variables)."""
    import time
    from datetime import timedelta

    from finetune.config import FinetuneError
    from finetune.data import scan_dataset
    from finetune.device import Distributed
    from finetune.training import check_data_everywhere

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"
    )
    ctx = Distributed.from_env()
    ctx.init(torch.device("cpu"))
    try:
        # rank 0's slow work (a scan, a checkpoint read): its result, tensors and all, on both
        got = ctx.from_main(lambda: time.sleep(1) or {"weights": torch.arange(4.0)}, "scanning")
        assert torch.equal(got["weights"], torch.arange(4.0))

        def fails():
            raise FinetuneError("no images in /nowhere")

        # rank 0 fails: rank 1 fails at once with its line, rather than after a timeout
        expected = "no images in /nowhere" if rank == 0 else "rank 0 failed while scanning: no images in /nowhere"
        with pytest.raises(FinetuneError, match=expected):
            ctx.from_main(fails, "scanning")
        if rank == 1:  # the slow rank at the end of cache building: the other waits for it on the store
            time.sleep(1)
        ctx.patient_barrier("building the cache")
        # rank 1's node has no dataset at that path: both ranks say so, naming rank 1
        scan = scan_dataset(data, 0.25, 0)
        if rank == 1:
            scan.root = data + "-elsewhere"
        with pytest.raises(FinetuneError, match=r"rank 1 on .+ cannot read .+-elsewhere: every node needs"):
            check_data_everywhere(ctx, scan)
        if rank == 1:  # a wait that runs out, with rank 0 still there (it waits at the barrier below)
            with pytest.raises(FinetuneError, match="rank 1 on .+ waited 0.2 s for rank 0 to finish never"):
                ctx.wait_for_main("never", timeout=timedelta(seconds=0.2))
        ctx.all_gather(None)
    finally:
        ctx.close()


@pytest.mark.slow
def test_two_gloo_ranks_wait_on_the_store_and_agree(tmp_path):
    """Distributed's waits on the store (no second process group), its failures carried from rank 0,
    and the dataset check, with two real gloo processes and no torchrun."""
    import socket

    import torch.multiprocessing as mp

    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_two_gloo_ranks, args=(port, str(data)), nprocs=2, join=True)


def test_a_rank_that_cannot_read_the_data_is_named_on_every_rank(tmp_path):
    from finetune.config import FinetuneError
    from finetune.data import scan_dataset
    from finetune.device import Distributed
    from finetune.training import DATA_SAMPLE, check_data_everywhere, unreadable_data

    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=12)
    scan = scan_dataset(data, 0.25, 0)
    assert unreadable_data(scan) is None
    first = Path(scan.root) / scan.train[0][0]
    first.unlink()  # in every sample: the split's first file
    assert unreadable_data(scan) == str(first) and len(scan.train) + len(scan.val) > DATA_SAMPLE

    class OtherNodeFine(Distributed):
        def all_gather(self, value):
            return [("node-a", 0, None), value]

    with pytest.raises(FinetuneError, match=f"rank 1 on .+ cannot read {first}"):
        check_data_everywhere(OtherNodeFine(1, 2, 0, 1), scan)
    check_data_everywhere(Distributed(), scan)  # one process: it has just scanned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for_training(run_dir_parent, timeout=180):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        runs = [p for p in run_dir_parent.iterdir() if p.is_dir()] if run_dir_parent.is_dir() else []  # not the lock
        if runs and any(e["type"] == "batch" for e in read_events(runs[0])):
            info = json.loads((runs[0] / "run.json").read_text())
            if info.get("pids"):
                return runs[0], info
        time.sleep(0.3)
    pytest.fail("the training did not start in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm-torchrun", "sigkill-rank-1"])
def test_torchrun_shutdown_leaves_no_process_and_no_running_run(tmp_path, how):
    import signal
    import time

    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=8)
    runs = tmp_path / "runs"
    process = torchrun(
        [
            "-m",
            "finetune",
            "train",
            "--arch",
            "resnet18",
            "--weights",
            "none",
            "--strategy",
            "all",
            "--epochs",
            "200",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--runs-dir",
            str(runs),
            "--quiet",
            "--",
            str(data),
        ],
        tmp_path,
    )
    try:
        run, info = _wait_for_training(runs)
        pids = info["pids"]
        assert len(pids) == 2 and info["launcher_pid"] == process.pid
        if how == "sigterm-torchrun":
            process.send_signal(signal.SIGTERM)
        else:
            os.kill(pids[1], signal.SIGKILL)
        process.communicate(timeout=90)
        deadline = time.time() + 30
        while any(_alive(pid) for pid in pids) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in pids), "a training process was left behind"
        status = json.loads((run / "run.json").read_text())["status"]
        assert status in ("stopped", "failed"), status
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)


# ---------------------------------------------------------------------------------------------
# A SIGTERM while the main thread is stuck in C++ (a collective whose peer is frozen): the signal is
# taken in a helper thread (cli.install_stop_handlers), as a Python handler would never run


def _rank_of(pid: int) -> int | None:
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(b"RANK="):
            return int(entry[5:])
    return None


def _in_groups(groups: set[int]) -> list[int]:
    """The live processes (zombies left out) whose process group is one of `groups`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            state, _parent, group = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if state != "Z" and int(group) in groups:
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_sigterm_ends_torchrun_whose_other_rank_is_frozen(tmp_path):
    """Rank 1 frozen with SIGSTOP, so rank 0 waits in a collective for ever; then torchrun gets SIGTERM.
    Rank 0 takes it in its signal thread, and SIGTERM_GRACE_S later marks the run and exits; torchrun
    SIGKILLs the frozen rank after its own 30 s: within 45 s no process of theirs is left, and the run
    is not "running" but names the SIGTERM."""
    import signal
    import time

    data = make_class_folders(tmp_path / "data", classes=("red", "green"), per_class=8)
    runs = tmp_path / "runs"
    options = ["--arch", "resnet18", "--weights", "none", "--strategy", "last", "--epochs", "200", "--batch-size", "2"]
    options += ["--image-size", "32", "--workers", "0", "--device", "cpu", "--runs-dir", str(runs), "--quiet"]
    process = torchrun(["-m", "finetune", "train", *options, "--", str(data)], tmp_path)
    groups = {process.pid}  # torchrun's process group; each rank leads its own
    try:
        run, info = _wait_for_training(runs)
        groups.update(info["pids"])
        os.kill(next(pid for pid in info["pids"] if _rank_of(pid) == 1), signal.SIGSTOP)
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 45
        while _in_groups(groups) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _in_groups(groups), "a process was left behind"
        info = json.loads((run / "run.json").read_text())
        assert info["status"] in ("stopped", "failed") and "SIGTERM" in info.get("error", ""), info
    finally:
        for pid in _in_groups(groups):
            os.kill(pid, signal.SIGKILL)  # a stopped process dies of it too
        process.communicate(timeout=30)


# The main thread stuck in C for ever, as in an all_reduce whose peer is frozen: a default pthread mutex
# (all zero bytes, as PTHREAD_MUTEX_INITIALIZER) locked twice; a signal does not end the wait.
STUCK_IN_C = """
import ctypes, json, sys, threading
from pathlib import Path
from finetune import cli
from finetune.progress import TerminalProgress

cli.SIGTERM_GRACE_S = 1.0
run = Path(sys.argv[1])
run.mkdir()
(run / "run.json").write_text(json.dumps({"status": "running"}))
progress = TerminalProgress(quiet=True)
cli.install_stop_handlers(threading.Event(), progress)
progress.run_dir = str(run)  # as the start event sets it
mutex, libc = ctypes.create_string_buffer(64), ctypes.CDLL(None)
libc.pthread_mutex_lock(mutex)
print("stuck", flush=True)
libc.pthread_mutex_lock(mutex)
"""

# Ctrl-C twice while the main thread runs Python: the first sets stop, the second raises KeyboardInterrupt
# there; put_back() then leaves the handler and the signal mask as they were.
INTERRUPTED_TWICE = """
import signal, threading, time
from finetune import cli

signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a background job's children start
before = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
stop = threading.Event()
put_back = cli.install_stop_handlers(stop)
try:  # "ready" inside: a quick second SIGINT may land while print() is still returning
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    put_back()
    after = (signal.getsignal(signal.SIGINT), signal.pthread_sigmask(signal.SIG_BLOCK, []))
    print("aborted", stop.is_set(), after == before, flush=True)
"""


def _started(code: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() in ("stuck\n", "ready\n")
    return process


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigtimedwait"), reason="signals taken in a thread: Linux")
def test_sigterm_to_a_main_thread_stuck_in_c_marks_the_run_and_exits(tmp_path):
    import signal

    process = _started(STUCK_IN_C, str(tmp_path / "run"))
    try:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 143, err
    assert "stopping after the current batch" in err and "could not stop in time" in err
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "failed" and "SIGTERM" in info["error"]


@pytest.mark.skipif(not hasattr(__import__("signal"), "sigtimedwait"), reason="signals taken in a thread: Linux")
def test_a_second_ctrl_c_aborts_and_put_back_restores_the_signals():
    import signal

    process = _started(INTERRUPTED_TWICE)
    try:
        process.send_signal(signal.SIGINT)
        assert process.stderr is not None
        while "stopping after the current batch" not in process.stderr.readline():
            pass
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert out.split() == ["aborted", "True", "True"], err

"""A training as the studio sees it: a process it started (or found still running), followed
through the events it writes. No gradio here.

The studio launches `python -m finetune train --config FILE.json` (under torchrun for several
GPUs) in a session of its own, reads only what it writes (events.jsonl, run.json), sends SIGINT to
stop it, and signals every process group of the training (torchrun's workers run in sessions of
their own) when it must end it for good.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .architectures import imagenet_version
from .config import FinetuneError, TrainConfig
from .events import Event, EventFollower, duration, format_event
from .rundir import (  # is_training_process, training_pids: re-exported (they moved to rundir's readers)
    FINAL_STATUSES,
    RunDir,
    gone_training,
    is_training_process,
    list_runs,
    live_trainings,
    lock_names_run,
    run_name,
    training_pids,
)

USABLE_STATUSES = ("completed", "stopped", "early-stopped")
KILLED_HERE = "the training was killed because it did not stop in time"
# The kernel's OOM killer sends SIGKILL, which no handler sees: the process cannot say why it ended,
# so the studio that started it says it (run.json and the training view). 137: a shell's 128 + 9.
KILLED_BY_THE_SYSTEM = (
    "{who} was killed by SIGKILL, most likely by the system because it ran out of memory: try a "
    "smaller --batch-size, fewer --workers or a lower --memory-budget-gb (dmesg says whether the "
    "kernel's out-of-memory killer did it)"
)
SIGKILL_CODES = (-signal.SIGKILL, 128 + signal.SIGKILL)
# torchrun's failure report (torch.distributed.elastic ChildFailedError), one block per failed rank,
# its root cause printed last: "  rank      : 1 (local_rank: 1)" then "  exitcode  : -9 (pid: 4242) ..."
TORCHRUN_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)")
TORCHRUN_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)")


# ---------------------------------------------------------------------------------------------
# What a training looks like from its events


@dataclass
class TrainingView:
    """Everything the UI shows about one training, built up from its events."""

    run_dir: str | None = None
    epochs: int = 0
    epoch: int = 0
    batch: int = 0
    batches: int = 0
    images_per_s: float = 0.0
    eta_s: float | None = None
    status: str = "starting"
    curves: list[dict] = field(default_factory=list)  # {"epoch": x, "value": v, "series": name, "metric": m}
    log: deque = field(default_factory=lambda: deque(maxlen=400))
    summary: str = ""
    metrics: dict | None = None
    error: str | None = None
    device: str = ""
    seconds: float | None = None

    def add(self, event: Event) -> None:
        line = format_event(event)
        if line is not None:
            self.log.append(line)
        if event["type"] == "start":
            self.run_dir = event["run_dir"]
            self.epochs, self.batches = event["epochs"], event["batches_per_epoch"]
            self.status, self.device = "training", event.get("device", "")
        elif event["type"] == "batch":
            self.epoch, self.epochs = event["epoch"], event["epochs"]
            self.batch, self.batches = event["batch"], event["batches"]
            self.images_per_s, self.eta_s = event["images_per_s"], event["eta_s"]
            x = event["epoch"] - 1 + event["batch"] / max(1, event["batches"])
            self._point(x, event["loss"], "train", "loss")
            self._point(x, event["acc"], "train", "accuracy")
        elif event["type"] == "epoch":
            x = float(event["epoch"])
            self._point(x, event["val_loss"], "val", "loss")
            self._point(x, event["val_acc"], "val", "accuracy")
            self.status = "evaluating" if event["epoch"] == self.epochs else "training"
        elif event["type"] == "end":
            self.status = event["status"]
            self.summary = event.get("summary", "")
            self.metrics = event.get("metrics")
            self.eta_s, self.seconds = 0, event.get("seconds")
        elif event["type"] == "error":
            self.status = "failed"
            self.error = event.get("message")

    def _point(self, x: float, value: float, series: str, metric: str) -> None:
        if math.isfinite(value):  # a diverging loss (nan, inf) would spoil the plot's scale: the log says it
            self.curves.append({"epoch": x, "value": value, "series": series, "metric": metric})

    def fraction(self) -> float:
        if self.status in USABLE_STATUSES:
            return 1.0
        if not self.epochs or not self.batches:
            return 0.0
        return (
            min(1.0, ((self.epoch - 1) * self.batches + self.batch) / (self.epochs * self.batches))
            if self.epoch
            else 0.0
        )

    def progress_text(self) -> str:
        if self.status == "starting":
            return "preparing: checking the images and building the model…"
        if self.epoch == 0 and self.status == "training":
            return "preparing the data pipeline…"
        text = (
            f"epoch {self.epoch}/{self.epochs} · batch {self.batch}/{self.batches} · {self.images_per_s:.0f} images/s"
        )
        if self.status == "training":
            return text + f" · about {duration(self.eta_s)} left"
        if self.status == "evaluating":
            return text + " · evaluating the best model on the validation images…"
        if self.status in USABLE_STATUSES:
            return f"{self.status} after {self.epoch}/{self.epochs} epochs in {duration(self.seconds)}"
        return text


# ---------------------------------------------------------------------------------------------
# Processes


def train_command(config_file: str | Path, processes: int = 1) -> list[str]:
    """argv for `python -m finetune train --config FILE`; `processes` > 1: under torchrun (one process
    per GPU, DistributedDataParallel). Nothing the user typed becomes an argument of its own."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "finetune", "train", "--config", str(config_file), "--quiet"]


def absolute_paths(cfg: TrainConfig, base: str | Path | None = None) -> TrainConfig:
    """The same configuration with its paths resolved once, here, against `base` (default: the
    current folder): the training process may run in another working directory."""
    root = Path(base or os.getcwd())

    def resolve(name: str) -> str:
        path = Path(name).expanduser()
        return str((path if path.is_absolute() else root / path).resolve())

    values = cfg.to_dict()
    values["data"] = resolve(cfg.data)
    values["runs_dir"] = resolve(cfg.runs_dir)
    if cfg.curation:
        values["curation"] = resolve(cfg.curation)
    if cfg.labels and Path(cfg.labels).expanduser().exists():  # else it is one inside the data folder
        values["labels"] = resolve(cfg.labels)
    if cfg.weights != "none" and not imagenet_version(cfg.weights):  # a file
        values["weights"] = resolve(cfg.weights)
    return TrainConfig.from_dict(values)


def children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc; empty elsewhere)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields_after_name[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # a PermissionError says it exists (someone else's)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _signal_groups(pids: list[int], sig: int) -> None:
    """Signal each process group (a training process and its DataLoader workers)."""
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class TrainingJob:
    """One training: a `python -m finetune train` process this studio started, or (`attach`) one
    that an earlier studio process started and that is still running."""

    process: subprocess.Popen[str] | None  # None: attached to (or not started yet)
    _reader: threading.Thread | None

    def __init__(self, cfg: TrainConfig, cwd: str | Path | None = None, env: dict | None = None, processes: int = 1):
        cfg = absolute_paths(cfg.validate())
        processes = max(1, int(processes))
        if not cfg.run_name:
            cfg.run_name = run_name(cfg.arch, cfg.resolved_strategy(), cfg.runs_dir)
        # the whole configuration travels as a file (mode 0600), not as a command line to re-parse
        handle, config_path = tempfile.mkstemp(prefix="finetune-train-", suffix=".json")
        os.close(handle)
        config_file = cfg.save(config_path)
        self._follow(
            cfg, Path(cfg.runs_dir) / cfg.run_name, processes, config_file, train_command(config_file, processes)
        )
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            self.command,
            cwd=cwd,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read_stderr, args=(self.process,), daemon=True)
        self._reader.start()

    @classmethod
    def attach(cls, run_dir: str | Path) -> TrainingJob:
        """Follow (and be able to stop) a training an earlier studio process started."""
        job = cls.__new__(cls)
        run = RunDir(run_dir)
        info = run.info()
        job._follow(
            TrainConfig.from_dict(info.get("config", {})),
            run.path,
            int(info.get("world_size", 1)),
            attached_pids=training_pids(info),
        )
        return job

    def _follow(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        processes: int,
        config_file: Path | None = None,
        command: list[str] | None = None,
        attached_pids: list[int] | None = None,
    ) -> None:
        """Every attribute of a job, in one place: one this studio starts (its config file and command;
        __init__ then starts the process) or one it attaches to (the pids run.json names)."""
        self.cfg, self.run_dir, self.processes = cfg, run_dir, processes
        self.config_file, self.command = config_file, command or []
        self.view = TrainingView(run_dir=str(run_dir))
        self.started = time.time()
        self.stop_requested = False
        self.killed_here = False  # this studio sent the SIGKILL (kill): not the system's doing
        self._stderr: deque[str] = deque(maxlen=50)
        self._lock = threading.Lock()
        self.process = None
        self._reader = None
        self.follower = EventFollower(RunDir(run_dir).events)
        self.attached_pids = attached_pids or []

    def _read_stderr(self, process: subprocess.Popen[str]) -> None:
        for line in process.stderr or ():
            line = line.rstrip()
            if line:
                self._stderr.append(line)

    def pids(self) -> list[int]:
        """The training processes (not torchrun itself)."""
        if self.process is None:
            alive = [pid for pid in self.attached_pids if is_training_process(pid)]
            if alive or not lock_names_run(RunDir(self.run_dir)):
                return alive
            # its lock says it trains, under another command line (a notebook's kernel)
            return [pid for pid in self.attached_pids if _exists(pid)]
        if self.processes > 1:
            return children(self.process.pid)
        return [self.process.pid]

    def running(self) -> bool:
        if self.process is None:
            return bool(self.pids())
        return self.process.poll() is None

    def stop(self) -> bool:
        """SIGINT to every training process: they end together at the next batch check and keep the best
        checkpoint; torchrun then exits on its own (a SIGINT to torchrun would tear its workers down)."""
        if not self.running():
            return False
        self.stop_requested = True
        for pid in self.pids() or ([self.process.pid] if self.process else []):
            try:
                os.kill(pid, signal.SIGINT)
            except (ProcessLookupError, PermissionError):
                pass
        return True

    def kill(self, timeout: float = 10.0) -> None:
        """Stop, and if that does not end it within `timeout` s, kill every process group of the
        training (torchrun's, and each worker's with its DataLoader processes)."""
        if not self.running():
            return
        self.stop()
        deadline = time.time() + timeout
        while self.running() and time.time() < deadline:
            time.sleep(0.1)
        if self.running():
            self.killed_here = True
            groups = self.pids() + ([self.process.pid] if self.process is not None else [])
            _signal_groups(groups, signal.SIGKILL)
            if self.process is not None:
                self.process.wait(10)
        mark_ended(RunDir(self.run_dir), KILLED_HERE)

    def update(self) -> TrainingView:
        """Read new events; when the process has ended, settle the final status."""
        with self._lock:
            alive = self.running()
            for event in self.follower.poll():
                self.view.add(event)
            if not alive:
                if self._reader is not None:
                    self._reader.join(timeout=2)
                for event in self.follower.poll():
                    self.view.add(event)
                killed = self.killed_message()
                if self.view.status not in FINAL_STATUSES:
                    self.view.status = "failed"
                    # a process killed outright cannot mark its run: do it for it
                    mark_ended(RunDir(self.run_dir), self.failure_message())
                elif killed is not None:
                    record_cause(RunDir(self.run_dir), killed)
                if self.view.status == "failed" or killed is not None:
                    self.view.error = killed or self.failure_message() or self.view.error
                if self.config_file is not None:
                    self.config_file.unlink(missing_ok=True)
            return self.view

    def failure_message(self) -> str:
        if self.process is None:
            return self.view.error or RunDir(self.run_dir).info().get("error") or "the training process ended"
        code = self.process.returncode
        killed = self.killed_message()
        if killed is not None or self.killed_here:
            return killed or KILLED_HERE
        errors = [line for line in self._stderr if line.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            return f"the training process was killed by {name}"
        tail = [line for line in self._stderr if line.strip()]
        last = tail[-1] if tail else ""
        return f"the training process exited with status {code}" + (f": {last}" if last else "")

    def killed_message(self) -> str | None:
        """Why the training ended when the system killed it with SIGKILL (the process itself, or one
        of torchrun's ranks, after which torchrun tears the others down and exits 1); None otherwise,
        and when this studio killed it (`kill`)."""
        if self.process is None or self.process.returncode is None or self.killed_here:
            return None
        if self.process.returncode in SIGKILL_CODES:
            return KILLED_BY_THE_SYSTEM.format(who="the training process")
        rank = killed_rank(self._stderr)
        if rank is None:
            return None
        return KILLED_BY_THE_SYSTEM.format(who=f"training process rank {rank[0]} (pid {rank[1]})")

    def finished(self) -> bool:
        return not self.running() and self.view.status in FINAL_STATUSES


def killed_rank(stderr: Iterable[str]) -> tuple[str, int] | None:
    """(rank, pid) of the rank that torchrun's failure report names as its root cause (the last
    block) when SIGKILL ended it; None when there is no such report or another cause."""
    rank, root = "?", None
    for line in stderr:
        if found := TORCHRUN_RANK.match(line):
            rank = found[1]
        elif found := TORCHRUN_EXITCODE.match(line):
            root = (rank, int(found[1]), int(found[2]))
    if root is None or root[1] != -signal.SIGKILL:
        return None
    return root[0], root[2]


# ---------------------------------------------------------------------------------------------
# Trainings left behind by an earlier studio process


def mark_ended(run: RunDir, reason: str) -> None:
    """A run whose processes are gone but whose run.json still says "running": stopped when it has a
    model to use, failed otherwise. Never left at "running", unless run.json cannot be written (a full
    disk, which may be why the training ended): a warning then, and the next look tries again."""
    info = run.info()
    if info.get("status") != "running":
        return
    try:
        run.update_info(status="stopped" if run.has_model() else "failed", error=reason)
    except (OSError, FinetuneError) as problem:
        logging.getLogger(__name__).warning("could not mark %s as ended: %s", run.name, problem)


def record_cause(run: RunDir, cause: str) -> None:
    """run.json's error becomes `cause` (a rank the system killed) where rank 0 settled the run as
    stopped or failed while torchrun tore it down (its own error then is only the consequence)."""
    info = run.info()
    if info.get("status") not in ("stopped", "failed") or info.get("error") == cause:
        return
    try:
        run.update_info(error=cause)
    except (OSError, FinetuneError) as problem:
        logging.getLogger(__name__).warning("could not record in %s why it ended: %s", run.name, problem)


def running_trainings(runs_dir: str | Path) -> list[Path]:
    """Runs whose training processes are still alive on this machine (started by an earlier studio,
    or from a terminal); runs marked running whose processes are gone (rundir.gone_training, what
    readers show as ended unexpectedly) are marked ended on the way."""
    alive = []
    host = os.uname().nodename
    for path in list_runs(runs_dir):
        run = RunDir(path)
        info = run.info()
        if info.get("status") != "running" or info.get("host", host) != host:
            continue
        if gone_training(run, info) is None:
            alive.append(path)
        else:
            mark_ended(run, "the training process ended without finishing (killed, or the machine restarted)")
    return alive


def require_no_training(runs_dir: str | Path) -> None:
    """FinetuneError when a training is already running in this runs folder: one with a run folder
    whose processes live, or one that holds a lock there and is still before its run folder (scanning
    the images, loading the weights). Trainings from terminals never wait for each other: only the
    studio asks this before it starts one."""
    alive = running_trainings(runs_dir)
    if alive:
        raise FinetuneError(f"a training is already running ({alive[0].name}): wait for it or stop it first")
    for lock in live_trainings(runs_dir):
        here = lock.get("host") in (None, os.uname().nodename)
        where = "" if here else f" on {lock.get('host')}"
        run = f", run {Path(lock['run_dir']).name}" if lock.get("run_dir") else ""
        kill = f", or kill {lock['pid']}" if here and lock.get("pid") else ""
        raise FinetuneError(
            f"a training started from a terminal (pid {lock.get('pid', '?')}{where}, data "
            f"{lock.get('data', '?')}{run}) is running in this runs folder; wait for it or stop it "
            f"(Ctrl-C in its terminal{kill})"
        )

"""Run folders as the UI sees them: listing, reading, following a training process. No gradio here.

A training started from the UI runs as its own process (`python -m finetune train ...`); the UI only
reads what it writes (events.jsonl, run.json) and sends it SIGINT to stop. These helpers keep that
bookkeeping out of app.py and testable without a browser.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .config import FinetuneError, TrainConfig


# ---------------------------------------------------------------------------------------------
# Listing and reading runs


def read_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders (with a run.json), newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.iterdir() if p.is_dir() and (p / "run.json").is_file()]

    def created(p: Path) -> tuple[str, str]:
        stamp = read_run(p).get("created") or datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="seconds")
        return stamp, p.name

    return sorted(found, key=created, reverse=True)


def run_label(run_dir: str | Path) -> str:
    """'20250101-120000-resnet34-last · completed · acc 0.93' for a dropdown."""
    run_dir = Path(run_dir)
    info = read_run(run_dir)
    parts = [run_dir.name, info.get("status", "?")]
    summary = info.get("summary") or {}
    if "accuracy" in summary:
        parts.append(f"val acc {summary['accuracy']:.3f}")
    return " · ".join(parts)


def run_choices(runs_dir: str | Path, usable_only: bool = False) -> list[tuple[str, str]]:
    """[(label, path)] newest first; usable_only: only runs that have a model.pth."""
    return [(run_label(p), str(p)) for p in list_runs(runs_dir)
            if not usable_only or (p / "model.pth").is_file()]


def resolve_run(run: str | None, runs_dir: str | Path) -> Path:
    """The run folder a dropdown value names; it must lie inside runs_dir."""
    if not run:
        raise FinetuneError("no run chosen: train a model first (Train tab) or pick a run")
    runs_root = Path(runs_dir).resolve()
    path = Path(run)
    path = (path if path.is_absolute() else runs_root / path).resolve()
    if not path.is_relative_to(runs_root):
        raise FinetuneError(f"not a run in {runs_root}: {run}")
    if not (path / "run.json").is_file():
        raise FinetuneError(f"not a run folder (no run.json): {path}")
    return path


def read_metrics(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        info = read_run(run_dir)
        status = info.get("status", "unknown")
        raise FinetuneError(f"{Path(run_dir).name} has no evaluation yet (status: {status}); "
                            f"metrics are written when a training ends")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Following events


class EventFollower:
    """Reads only the new complete lines of events.jsonl on every call."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0

    def poll(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for line in data[: end + 1].splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


def duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(max(0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


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

    def add(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "log":
            self.log.append(event["message"])
        elif kind == "start":
            self.run_dir = event["run_dir"]
            self.epochs, self.batches = event["epochs"], event["batches_per_epoch"]
            self.status, self.device = "training", event.get("device", "")
            self.log.append(f"{event['arch']} / {event['strategy']} on {event['device']}: "
                            f"{event['train_images']} train / {event['val_images']} val images, "
                            f"{len(event['classes'])} classes, {event['trainable_params']:,} of "
                            f"{event['total_params']:,} parameters train")
        elif kind == "batch":
            self.epoch, self.epochs = event["epoch"], event["epochs"]
            self.batch, self.batches = event["batch"], event["batches"]
            self.images_per_s, self.eta_s = event["images_per_s"], event["eta_s"]
            x = event["epoch"] - 1 + event["batch"] / max(1, event["batches"])
            self.curves.append({"epoch": x, "value": event["loss"], "series": "train", "metric": "loss"})
            self.curves.append({"epoch": x, "value": event["acc"], "series": "train", "metric": "accuracy"})
        elif kind == "epoch":
            x = float(event["epoch"])
            self.curves.append({"epoch": x, "value": event["val_loss"], "series": "val", "metric": "loss"})
            self.curves.append({"epoch": x, "value": event["val_acc"], "series": "val", "metric": "accuracy"})
            self.log.append(f"epoch {event['epoch']}: train loss {event['train_loss']:.4f} acc "
                            f"{event['train_acc']:.4f} | val loss {event['val_loss']:.4f} acc {event['val_acc']:.4f}"
                            f" | {event['seconds']:.1f}s{'  *best' if event.get('best') else ''}")
            self.status = "evaluating" if event["epoch"] == self.epochs else "training"
        elif kind == "end":
            self.status = event["status"]
            self.summary = event.get("summary", "")
            self.metrics = event.get("metrics")
            self.eta_s, self.seconds = 0, event.get("seconds")
            self.log.append(f"{event['status']} in {duration(event.get('seconds'))}; best epoch "
                            f"{event['best']['epoch']}: {self.summary}")
        elif kind == "error":
            self.status = "failed"
            self.error = event.get("message")
            self.log.append(f"error: {self.error}")

    def fraction(self) -> float:
        if self.status in ("completed", "stopped", "early-stopped"):
            return 1.0
        if not self.epochs or not self.batches:
            return 0.0
        return min(1.0, ((self.epoch - 1) * self.batches + self.batch) / (self.epochs * self.batches)) \
            if self.epoch else 0.0

    def progress_text(self) -> str:
        if self.status == "starting":
            return "preparing: checking the images and building the model…"
        if self.epoch == 0 and self.status == "training":
            return "preparing the data pipeline…"
        text = (f"epoch {self.epoch}/{self.epochs} · batch {self.batch}/{self.batches} · "
                f"{self.images_per_s:.0f} images/s")
        if self.status == "training":
            return text + f" · about {duration(self.eta_s)} left"
        if self.status == "evaluating":
            return text + " · evaluating the best model on the validation images…"
        if self.status in ("completed", "stopped", "early-stopped"):
            return f"{self.status} after {self.epoch}/{self.epochs} epochs in {duration(self.seconds)}"
        return text


# ---------------------------------------------------------------------------------------------
# The training process


def new_run_name(arch: str, strategy: str, runs_dir: str | Path) -> str:
    base = f"{datetime.now():%Y%m%d-%H%M%S}-{arch}-{strategy}"
    name, n = base, 1
    while (Path(runs_dir) / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def train_command(cfg: TrainConfig, processes: int = 1) -> list[str]:
    """argv for `python -m finetune train` with this configuration; `processes` > 1: under torchrun
    (one process per GPU, DistributedDataParallel)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    cmd = [*launcher, "-m", "finetune", "train", cfg.data, "--arch", cfg.arch, "--strategy", cfg.strategy,
           "--weights", cfg.weights, "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
           "--image-size", str(cfg.image_size), "--seed", str(cfg.seed), "--runs-dir", cfg.runs_dir, "--quiet"]
    if cfg.lr is not None:
        cmd += ["--lr", repr(float(cfg.lr))]
    if cfg.run_name:
        cmd += ["--run-name", cfg.run_name]
    if cfg.device != "auto":
        cmd += ["--device", cfg.device]
    if cfg.class_weighted_loss:
        cmd.append("--class-weighted-loss")
    return cmd


def _children(pid: int) -> list[int]:
    """Direct child processes of pid (Linux /proc; empty elsewhere)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields_after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields_after_name[1]) == pid:
            children.append(int(stat.parent.name))
    return children


class TrainingJob:
    """One `python -m finetune train` process and what it has written so far."""

    def __init__(self, cfg: TrainConfig, cwd: str | Path | None = None, env: dict | None = None,
                 processes: int = 1):
        cfg.validate()
        self.processes = max(1, int(processes))
        if not cfg.run_name:
            cfg.run_name = new_run_name(cfg.arch, cfg.strategy, cfg.runs_dir)
        self.cfg = cfg
        self.run_dir = Path(cfg.runs_dir) / cfg.run_name
        self.command = train_command(cfg, self.processes)
        self.view = TrainingView(run_dir=str(self.run_dir))
        self.started = time.time()
        self.stop_requested = False
        self._stderr: deque = deque(maxlen=50)
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        self.process = subprocess.Popen(
            self.command, cwd=cwd, env=child_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        self.follower = EventFollower(self.run_dir / "events.jsonl")
        self._lock = threading.Lock()

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            line = line.rstrip()
            if line:
                self._stderr.append(line)

    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> bool:
        """SIGINT: the engine ends at the next batch and keeps its best checkpoint."""
        if not self.running():
            return False
        self.stop_requested = True
        if self.processes > 1:
            # the training processes themselves, which stop together at the next batch; torchrun then
            # exits on its own (a SIGINT to torchrun would make it tear its workers down)
            for pid in _children(self.process.pid) or [self.process.pid]:
                try:
                    os.kill(pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        else:
            self.process.send_signal(signal.SIGINT)
        return True

    def kill(self, timeout: float = 10.0) -> None:
        if self.running():
            self.stop()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def update(self) -> TrainingView:
        """Read new events; when the process has ended, settle the final status."""
        with self._lock:
            alive = self.running()
            for event in self.follower.poll():
                self.view.add(event)
            if not alive:
                self._reader.join(timeout=2)
                for event in self.follower.poll():
                    self.view.add(event)
                if self.view.status not in ("completed", "stopped", "early-stopped", "failed"):
                    self.view.status = "failed"
                if self.view.status == "failed" and not self.view.error:
                    self.view.error = self.failure_message()
                elif self.view.status == "failed":
                    self.view.error = self.failure_message() or self.view.error
            return self.view

    def failure_message(self) -> str:
        code = self.process.returncode
        errors = [line for line in self._stderr if line.startswith("error:")]
        if errors:
            return errors[-1].removeprefix("error:").strip()
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            hint = " (probably out of memory: try a smaller batch size or image size)" if -code == 9 else ""
            return f"the training process was killed by {name}{hint}"
        tail = [line for line in self._stderr if line.strip()]
        last = tail[-1] if tail else ""
        return f"the training process exited with status {code}" + (f": {last}" if last else "")

    def finished(self) -> bool:
        return not self.running() and self.view.status in ("completed", "stopped", "early-stopped", "failed")

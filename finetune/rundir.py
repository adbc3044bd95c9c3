"""The run folder: its files, its name, its info (`run.json`), its split, and finding runs.

One place knows the layout (`runs/<time>-<arch>-<strategy>/`):

    model.pth            best model: a plain torchvision state_dict (CPU tensors)
    last.pth             resume checkpoint: model, optimizer, scheduler, scaler, epoch, history
    class_indices.json   the classic class map {"0": "daisy", ...}, 4-space indent
    run.json             architecture, classes, preprocessing, config, status, history, summary
    split.json           the split (paths relative to the data root), skipped files
    data_report.txt      the same as text
    events.jsonl         every training event (events.py)
    metrics.json, confusion_matrix.png, training_curves.png, per_class.csv, misclassified.csv

Every write goes through a temporary file and a rename, so a reader (the studio, while the
training writes) never sees half a file.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import torch

from .config import FinetuneError
from .events import EVENTS_FILE

RUN_FORMAT = "finetune-run/1"
FINAL_STATUSES = ("completed", "stopped", "early-stopped", "failed")


def write_json(path: Path, data) -> None:
    """Write via a temporary file so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def class_indices_json(classes: list[str]) -> str:
    """The classic predict.py class map: {"0": "daisy", ...} with 4-space indentation."""
    return json.dumps({str(i): name for i, name in enumerate(classes)}, indent=4)


def run_name(arch: str, strategy: str, runs_dir: str | Path, name: str | None = None) -> str:
    """`name`, or <time>-<arch>-<strategy>; with -2, -3, ... when that folder exists already."""
    base = name or f"{datetime.now():%Y%m%d-%H%M%S}-{arch}-{strategy}"
    candidate, n = base, 1
    while (Path(runs_dir) / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


class RunDir:
    """One run folder and the names of the files in it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, runs_dir: str | Path, arch: str, strategy: str, name: str | None = None) -> "RunDir":
        """A new, empty run folder (never an existing one)."""
        runs_dir = Path(runs_dir)
        while True:
            path = runs_dir / run_name(arch, strategy, runs_dir, name)
            try:
                path.mkdir(parents=True)
                return cls(path)
            except FileExistsError:  # another process took that name a moment ago
                continue

    # -- file names
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def model(self) -> Path:
        return self.path / "model.pth"

    @property
    def last(self) -> Path:
        return self.path / "last.pth"

    @property
    def info_path(self) -> Path:
        return self.path / "run.json"

    @property
    def split_path(self) -> Path:
        return self.path / "split.json"

    @property
    def class_indices(self) -> Path:
        return self.path / "class_indices.json"

    @property
    def events(self) -> Path:
        return self.path / EVENTS_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def report(self) -> Path:
        return self.path / "data_report.txt"

    @property
    def confusion_matrix(self) -> Path:
        return self.path / "confusion_matrix.png"

    @property
    def curves(self) -> Path:
        return self.path / "training_curves.png"

    @property
    def reliability(self) -> Path:
        return self.path / "reliability.png"

    def is_run(self) -> bool:
        return self.info_path.is_file()

    def has_model(self) -> bool:
        return self.model.is_file()

    # -- run.json
    def info(self) -> dict:
        """run.json, or {} while it does not exist (or is being replaced)."""
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def require_info(self) -> dict:
        if not self.info_path.is_file():
            raise FinetuneError(f"not a run folder (no run.json): {self.path}")
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise FinetuneError(f"cannot read {self.info_path}: {error}") from None

    def require_trained(self, checkpoint: str = "model.pth") -> dict:
        """run.json of a run that has a model to load (arch, classes and the checkpoint file), else a
        one-line error saying what is missing."""
        info = self.require_info()
        if not isinstance(info, dict) or not isinstance(info.get("arch"), str) or not info.get("classes"):
            raise FinetuneError(f"{self.info_path} has no arch and classes: not a finetune run")
        if not (self.path / checkpoint).is_file():
            raise FinetuneError(f"{self.path} has no {checkpoint} yet (training has not finished an epoch)")
        return info

    def write_info(self, info: dict) -> None:
        write_json(self.info_path, {"format": RUN_FORMAT, **info})

    def update_info(self, **changes) -> None:
        info = self.info()
        info.update(changes)
        write_json(self.info_path, info)

    # -- the split and the class map
    def write_split(self, scan) -> None:
        write_json(self.split_path, scan.to_dict())
        self.report.write_text(scan.report() + "\n")

    def read_split(self):
        from .data import DatasetScan

        try:
            data = json.loads(self.split_path.read_text())
            if isinstance(data, dict) and data.get("curation"):
                from .curation import CuratedScan

                return CuratedScan.from_dict(data)
            return DatasetScan.from_dict(data)
        except (OSError, json.JSONDecodeError, TypeError) as error:
            raise FinetuneError(f"cannot read the split of {self.path}: {error}") from None

    def data_root(self) -> str | None:
        """The data folder the run was trained on (from split.json), None when unknown."""
        try:
            return json.loads(self.split_path.read_text())["root"]
        except (OSError, KeyError, ValueError):
            return None

    def write_class_indices(self, classes: list[str]) -> None:
        self.class_indices.write_text(class_indices_json(classes))

    # -- metrics
    def metrics(self) -> dict:
        if not self.metrics_path.is_file():
            status = self.info().get("status", "unknown")
            raise FinetuneError(f"{self.name} has no evaluation yet (status: {status}); "
                                f"metrics are written when a training ends")
        return json.loads(self.metrics_path.read_text())

    def label(self) -> str:
        """'20250101-120000-resnet34-last · completed · val acc 0.930' for a dropdown."""
        info = self.info()
        parts = [self.name, info.get("status", "?")]
        summary = info.get("summary") or {}
        if "accuracy" in summary:
            parts.append(f"val acc {summary['accuracy']:.3f}")
        return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# Finding runs


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run folders (with a run.json), newest first."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    found = [p for p in runs_dir.iterdir() if p.is_dir() and RunDir(p).is_run()]

    def created(p: Path) -> tuple[str, str]:
        stamp = RunDir(p).info().get("created") or \
            datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="seconds")
        return stamp, p.name

    return sorted(found, key=created, reverse=True)


def run_choices(runs_dir: str | Path, usable_only: bool = False) -> list[tuple[str, str]]:
    """[(label, path)] newest first; usable_only: only runs that have a model.pth."""
    return [(RunDir(p).label(), str(p)) for p in list_runs(runs_dir)
            if not usable_only or RunDir(p).has_model()]


def resolve_run(run: str | None, runs_dir: str | Path) -> Path:
    """The run folder a dropdown value names; it must lie inside runs_dir."""
    if not run:
        raise FinetuneError("no run chosen: train a model first (Train tab) or pick a run")
    runs_root = Path(runs_dir).resolve()
    path = Path(run)
    path = (path if path.is_absolute() else runs_root / path).resolve()
    if not path.is_relative_to(runs_root):
        raise FinetuneError(f"not a run in {runs_root}: {run}")
    if not RunDir(path).is_run():
        raise FinetuneError(f"not a run folder (no run.json): {path}")
    return path


def read_run(run_dir: str | Path) -> dict:
    return RunDir(run_dir).info()


def read_metrics(run_dir: str | Path) -> dict:
    return RunDir(run_dir).metrics()


def run_label(run_dir: str | Path) -> str:
    return RunDir(run_dir).label()

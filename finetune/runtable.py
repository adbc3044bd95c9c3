"""Every run of a runs folder in one table: what `finetune runs`, `finetune.runs()` and the studio's
Runs tab show, gathered in one place (`runs_table`).

A runs folder may hold more than runs (the Review tab's curation files, a folder copied in by hand, a
run folder from someone else): only folders are looked at; one without run.json is skipped and named
in the table's note, one whose run.json cannot be read is a row of status "unreadable". Nothing here
writes, and every field of run.json is checked for its type before it is shown (RunInfo's rule).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import FinetuneError
from .names import printable
from .rundir import RunDir, RunInfo

UNREADABLE = "unreadable"
# (key of RunRow.cells(), heading) in the order the terminal and the studio show them
COLUMNS = (
    ("name", "run"),
    ("data", "data"),
    ("arch", "arch"),
    ("strategy", "strategy"),
    ("weights", "weights"),
    ("epochs", "epochs"),
    ("best_val_acc", "best val acc"),
    ("macro_f1", "macro F1"),
    ("ece", "ECE (cal.)"),
    ("images", "images"),
    ("duration", "duration"),
    ("status", "status"),
)


@dataclass(frozen=True)
class RunRow:
    """One run folder as the table shows it; None where run.json does not say (yet)."""

    name: str
    path: str
    status: str
    created: str
    data: str | None = None
    arch: str | None = None
    strategy: str | None = None
    weights: str | None = None
    epochs_done: int | None = None
    epochs: int | None = None
    best_val_acc: float | None = None
    best_epoch: int | None = None
    macro_f1: float | None = None
    ece: float | None = None  # after temperature scaling (calibrate: ece_after)
    train_images: int | None = None
    val_images: int | None = None
    seconds: float | None = None
    problem: str | None = None  # why it is unreadable

    @property
    def images(self) -> int | None:
        known = [n for n in (self.train_images, self.val_images) if n is not None]
        return sum(known) if known else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images": self.images}

    def cells(self) -> dict[str, str]:
        """Each column as text for a terminal or a table: names through printable (one line, no
        control characters), the data folder and a weights file by their names (the JSON has paths)."""
        return {
            "name": printable(self.name),
            "data": printable(Path(self.data).name or self.data) if self.data else "",
            "arch": printable(self.arch or ""),
            "strategy": printable(self.strategy or ""),
            "weights": printable(_weights_name(self.weights)),
            "epochs": _epochs(self.epochs_done, self.epochs),
            "best_val_acc": _fraction(self.best_val_acc),
            "macro_f1": _fraction(self.macro_f1),
            "ece": _fraction(self.ece),
            "images": "" if self.images is None else str(self.images),
            "duration": duration_text(self.seconds),
            "status": printable(self.status),
        }


@dataclass
class RunsTable:
    """The runs of `runs_dir`, newest first, and the folders skipped (no run.json)."""

    runs_dir: Path
    rows: list[RunRow]
    skipped: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runs_dir": str(self.runs_dir),
            "runs": [row.to_dict() for row in self.rows],
            "skipped": self.skipped,
        }

    def to_json(self) -> str:
        # ASCII only: a control or bidi character of a name reaches a terminal as its \u escape;
        # strict JSON for scripts (the rows hold only finite numbers: _real): never an Infinity
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def note(self) -> str:
        if not self.skipped:
            return ""
        names = ", ".join(printable(name) for name in self.skipped[:5])
        more = f" and {len(self.skipped) - 5} more" if len(self.skipped) > 5 else ""
        return f"skipped {len(self.skipped)} folder(s) without run.json: {names}{more}"

    def text(self) -> str:
        """The table for a terminal: aligned columns, one run a line."""
        if not self.rows:
            lines = [f"no runs in {printable(str(self.runs_dir))}"]
        else:
            table = [[heading for _, heading in COLUMNS]]
            table += [[row.cells()[key] for key, _ in COLUMNS] for row in self.rows]
            widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
            lines = [
                "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
                for line in table
            ]
        return "\n".join(lines + ([self.note()] if self.skipped else []))

    def row(self, name: str) -> RunRow | None:
        return next((row for row in self.rows if row.name == name), None)


def runs_table(runs_dir: str | Path) -> RunsTable:
    """Every run folder of `runs_dir`, newest first (run.json's "created", else the folder's time)."""
    runs_dir = Path(runs_dir).expanduser().absolute()  # for scripts: paths that hold from any folder
    if not runs_dir.is_dir():
        raise FinetuneError(f"no runs folder at {runs_dir}")
    try:
        folders = sorted(p for p in runs_dir.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError as problem:
        raise FinetuneError(f"cannot read the runs folder {runs_dir}: {problem.strerror or problem}") from None
    rows, skipped = [], []
    for folder in folders:
        run = RunDir(folder)
        if run.is_run():
            rows.append(run_row(run))
        else:
            skipped.append(folder.name)
    rows.sort(key=lambda row: (row.created, row.name), reverse=True)
    return RunsTable(runs_dir, rows, skipped)


def run_row(run: RunDir) -> RunRow:
    """The row of one run folder; status "unreadable" (and why) when its run.json cannot be read."""
    try:
        info = run.require_info()
    except FinetuneError as problem:
        return RunRow(run.name, str(run.path), UNREADABLE, _folder_time(run.path), problem=str(problem))
    config = _dict(info.get("config"))
    summary, best = _dict(info.get("summary")), _dict(info.get("best"))
    return RunRow(
        name=run.name,
        path=str(run.path),
        status=run.status(info),
        created=_text(info.get("created")) or _folder_time(run.path),
        data=_text(config.get("data")),
        arch=_text(info.get("arch")) or _text(config.get("arch")),
        strategy=_text(info.get("strategy")) or _text(config.get("strategy")),
        weights=_text(config.get("weights")),
        epochs_done=_whole(info.get("epochs_done")),
        epochs=_whole(config.get("epochs")),
        best_val_acc=_real(best.get("val_acc")),
        best_epoch=_whole(best.get("epoch")),
        macro_f1=_real(summary.get("macro_f1")),
        ece=_real(_dict(info.get("calibration")).get("ece_after")),
        train_images=_train_images(info),
        val_images=_whole(summary.get("num_images")),
        seconds=_real(info.get("seconds")) if "seconds" in info else _epoch_seconds(info),
    )


# ---------------------------------------------------------------------------------------------
# What the studio compares: the validation curves and the per-class F1 of a run


def val_curve(run: RunDir, metric: str = "val_acc") -> list[tuple[int, float]]:
    """(epoch, value) of `metric` ("val_acc", "val_loss", ...) for every epoch in run.json's history
    (what the run recorded so far)."""
    points = []
    for record in _history(run.info()):
        epoch, value = _whole(record.get("epoch")), _real(record.get(metric))
        if epoch is not None and value is not None:
            points.append((epoch, value))
    return points


def per_class_f1(run: RunDir) -> dict[str, float]:
    """{class: F1} of the run's final validation (metrics.json), {} before it has one."""
    try:
        per_class = _dict(run.metrics().get("per_class"))
    except FinetuneError:
        return {}
    found = {}
    for name, scores in per_class.items():
        f1 = _real(_dict(scores).get("f1"))
        if f1 is not None:
            found[str(name)] = f1
    return found


# ---------------------------------------------------------------------------------------------
# Formatting and type checks (a run.json may have been written by hand)


def duration_text(seconds: float | None) -> str:
    """12s, 3m 05s, 2h 07m."""
    if seconds is None or not math.isfinite(seconds):  # int(inf) raises: unknown, as None
        return ""
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _weights_name(weights: str | None) -> str:
    if not weights:
        return ""
    return weights if weights in ("imagenet", "none") else Path(weights).name or weights


def _epochs(done: int | None, planned: int | None) -> str:
    if done is None and planned is None:
        return ""
    return f"{'?' if done is None else done}/{'?' if planned is None else planned}"


def _fraction(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _folder_time(path: Path) -> str:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    except OSError:
        return ""


def _history(info: RunInfo) -> list[dict]:
    history: object = info.get("history")
    return [record for record in history if isinstance(record, dict)] if isinstance(history, list) else []


def _train_images(info: RunInfo) -> int | None:
    """The training images of a whole epoch (an epoch stopped half-way saw fewer)."""
    counts = [_whole(r.get("images")) for r in _history(info) if r.get("complete", True) is True]
    known = [n for n in counts if n is not None]
    return max(known) if known else None


def _epoch_seconds(info: RunInfo) -> float | None:
    seconds = [_real(record.get("seconds")) for record in _history(info)]
    known = [s for s in seconds if s is not None]
    return _real(sum(known)) if known else None  # a sum of huge ones may overflow to inf


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _whole(value: Any) -> int | None:
    # a count or an epoch: a negative one, or one wider than a float holds exactly (gradio's orjson
    # refuses ints over 64 bits, and a sum of two must still fit), is unknown
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        return None
    return value


def _real(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int of 400 digits
        return None
    return number if math.isfinite(number) else None  # NaN, Infinity: unknown (and no strict JSON)

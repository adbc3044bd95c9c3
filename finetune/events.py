"""Training events: what the loop emits, their one text format, and the file that carries them.

A training emits dicts with a "type", one TypedDict per type (the schema is the classes below):

* ``log`` (`LogEvent`), ``error`` (`ErrorEvent`): message
* ``progress`` (`ProgressEvent`; before the run folder exists, so never in events.jsonl; throttled like
  batch events): the scan's stage, done and total (0: not known yet)
* ``start`` (`StartEvent`): the run, its model, its data and where it trains
* ``batch`` (`BatchEvent`, throttled to about 2 a second): running loss and accuracy, speed, ETA
* ``epoch`` (`EpochEvent`): the epoch's `EpochRecord` (also run.json's history) and the best so far
* ``end`` (`EndEvent`): status, best epoch, metrics, and the whole wall time with where it went

Every event carries the "time" it was emitted (set by the training's emit). Rank 0 appends each one as
a JSON line to ``<run>/events.jsonl`` (`EventWriter`); the terminal progress bar consumes them
directly, the studio follows the file (`EventFollower`). Keys marked NotRequired are missing from the
files of older runs, which still read.
"""

# no `from __future__ import annotations`: TypedDict reads NotRequired[...] from evaluated annotations only
# (with string annotations Python 3.11 counts every key as required)
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, NotRequired, TypedDict, cast, get_args

from .fsutil import JSON_ERRORS


class LogEvent(TypedDict):
    type: Literal["log"]
    message: str
    time: NotRequired[float]


class ErrorEvent(TypedDict):
    type: Literal["error"]
    message: str
    time: NotRequired[float]


class ProgressEvent(TypedDict):
    type: Literal["progress"]
    stage: str  # "walk", "check"
    what: str  # "listing files", "checking images"
    done: int
    total: int  # 0: not known yet
    time: NotRequired[float]


class StartEvent(TypedDict):
    type: Literal["start"]
    run_dir: str
    arch: str
    strategy: str
    device: str
    world_size: int
    epochs: int
    start_epoch: int
    batches_per_epoch: int
    train_images: int
    val_images: int
    classes: list[str]
    trainable_params: int
    total_params: int
    pipeline: str
    time: NotRequired[float]


class BatchEvent(TypedDict):
    type: Literal["batch"]
    epoch: int
    epochs: int
    batch: int
    batches: int
    loss: float
    acc: float
    images_per_s: float
    eta_s: float
    lr: float
    time: NotRequired[float]


class BestEpoch(TypedDict):
    epoch: int  # 0: none yet
    val_acc: float
    val_loss: float


class EpochRecord(TypedDict):
    """One epoch as the training records it: the fields of its event and an entry of run.json's history."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float
    seconds: float
    complete: bool  # False: stopped during the epoch
    images: NotRequired[int]  # trained in the epoch, over all ranks
    best: NotRequired[bool]  # the best epoch so far (set once the epoch is counted)


class EpochEvent(EpochRecord):
    type: Literal["epoch"]
    best_epoch: int
    best_val_acc: float
    time: NotRequired[float]


class Timing(TypedDict):
    """The whole wall time of a training call and where it went (in the end event and run.json)."""

    seconds: float
    # setup: scan, weights and run folder; cache: building the data pipeline; training: the epochs
    # with their validation; evaluation: the final one
    stages: dict[str, float]
    cache: str  # the pipeline's kind: stream, features or pixels


class EndEvent(TypedDict):
    type: Literal["end"]
    status: str
    run_dir: str
    best: BestEpoch
    metrics: dict[str, Any] | None  # metrics.json without the misclassified list
    summary: str
    seconds: float
    stages: NotRequired[dict[str, float]]
    cache: NotRequired[str]
    time: NotRequired[float]


Event = LogEvent | ErrorEvent | ProgressEvent | StartEvent | BatchEvent | EpochEvent | EndEvent
EventCallback = Callable[[Event], None]
# each event type's name ("log", ...) and its TypedDict
EVENT_TYPES: Mapping[str, type] = MappingProxyType(
    {get_args(cls.__annotations__["type"])[0]: cls for cls in get_args(Event)}
)

EVENTS_FILE = "events.jsonl"


def epoch_event(record: EpochRecord, best: BestEpoch) -> EpochEvent:
    """An epoch's event: its record (the line run.json's history keeps) and the best epoch so far."""
    # the ignore: mypy cannot tell that a record brings no "time" (the emitter stamps it); the rest is checked
    return {
        "type": "epoch",
        **record,  # type: ignore[typeddict-item]
        "best_epoch": best["epoch"],
        "best_val_acc": best["val_acc"],
    }


def end_event(
    status: str, run_dir: str, best: BestEpoch, metrics: dict[str, Any] | None, summary: str, timing: Timing
) -> EndEvent:
    """The last event of a training that got as far as its epochs."""
    return {
        "type": "end",
        "status": status,
        "run_dir": run_dir,
        "best": best,
        "metrics": metrics,
        "summary": summary,
        "seconds": timing["seconds"],
        "stages": timing["stages"],
        "cache": timing["cache"],
    }


def duration(seconds: float | None) -> str:
    """'1:05' or '2:03:04'; '?' when unknown."""
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(max(0, seconds)))
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


CACHE_NAMES = {"features": "feature cache", "pixels": "image cache"}


def stages_text(event: EndEvent) -> str:
    """' (feature cache 4:23, training 0:17)': where an end event's time went; stages under a second
    are left out, training never (an end event from before the stages were recorded: '')."""
    stages = event.get("stages")
    if not stages:
        return ""
    names = {
        "setup": "set-up",
        "cache": CACHE_NAMES.get(event.get("cache", ""), "data pipeline"),
        "training": "training",
        "evaluation": "evaluation",
    }
    parts = [
        f"{names.get(key, key)} {duration(seconds)}"
        for key, seconds in stages.items()
        if key == "training" or seconds >= 1
    ]
    return f" ({', '.join(parts)})"


def format_event(event: Event) -> str | None:
    """The one-line text of a log, start, epoch, end or error event (None for batch events)."""
    if event["type"] == "log":
        return event["message"]
    if event["type"] == "start":
        workers = f" x{event['world_size']}" if event.get("world_size", 1) > 1 else ""
        return (
            f"{event['arch']} / {event['strategy']} on {event['device']}{workers}: "
            f"{event['train_images']} train / {event['val_images']} val images, "
            f"{len(event['classes'])} classes, {event['trainable_params']:,} of "
            f"{event['total_params']:,} parameters train"
        )
    if event["type"] == "epoch":
        return (
            f"epoch {event['epoch']:>3}: train loss {event['train_loss']:.4f} acc {event['train_acc']:.4f}"
            f" | val loss {event['val_loss']:.4f} acc {event['val_acc']:.4f}"
            f" | {event['seconds']:.1f}s{'  *best' if event.get('best') else ''}"
        )
    if event["type"] == "end":
        return (
            f"{event['status']} in {duration(event.get('seconds'))}{stages_text(event)}; best epoch "
            f"{event['best']['epoch']}\nval: {event.get('summary', '')}"
        )
    if event["type"] == "error":
        return f"error: {event.get('message')}"
    return None


class EventWriter:
    """Appends each event as one JSON line, flushed at once so a follower sees it."""

    def __init__(self, path: str | Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open from event to event, until close()

    def __call__(self, event: Event) -> None:
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class EventFollower:
    """Reads only the new complete lines of an events.jsonl on every call (a line still being
    written is left for the next call)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0

    def poll(self) -> list[Event]:
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
                event = parse_event(json.loads(line))
            except JSON_ERRORS:
                continue
            if event is not None:
                events.append(event)
        return events


def parse_event(value: object) -> Event | None:
    """A JSON value read back as an event: a dict with a known "type", else None (a line that is no event,
    which every reader would skip anyway). Its other keys are taken as written: an older run's event
    lacks the keys marked NotRequired, and readers read those with .get."""
    if isinstance(value, dict) and value.get("type") in EVENT_TYPES:
        return cast(Event, value)
    return None


def read_events(run_dir: str | Path) -> list[Event]:
    """Every complete event a run has written so far."""
    return EventFollower(Path(run_dir) / EVENTS_FILE).poll()

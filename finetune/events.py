"""Training events: what the loop emits, their one text format, and the file that carries them.

A training emits dicts with a "type":

* ``log``: ``message``
* ``progress`` (before the run folder exists, so never in events.jsonl; throttled like batch events):
  stage ("walk", "check"), what ("listing files", "checking images"), done, total (0: not known yet)
* ``start``: run_dir, arch, strategy, device, world_size, epochs, start_epoch, batches_per_epoch,
  train_images, val_images, classes, trainable_params, total_params, pipeline
* ``batch`` (throttled to about 2 a second): epoch, epochs, batch, batches, loss, acc, images_per_s,
  eta_s, lr
* ``epoch``: epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds, complete, images (trained
  in the epoch, over all ranks), best, best_epoch, best_val_acc
* ``end``: status, run_dir, best, metrics, summary, seconds (the whole wall time of the training
  call), stages (seconds of setup: scan, weights and run folder; cache: building the data pipeline;
  training: the epochs with their validation; evaluation: the final one), cache (the pipeline's
  kind: stream, features or pixels)
* ``error``: message

Rank 0 appends each one as a JSON line to ``<run>/events.jsonl`` (`EventWriter`); the terminal
progress bar consumes them directly, the studio follows the file (`EventFollower`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

Event = dict
EventCallback = Callable[[Event], None]

EVENTS_FILE = "events.jsonl"


def duration(seconds: float | None) -> str:
    """'1:05' or '2:03:04'; '?' when unknown."""
    if seconds is None or seconds != seconds:
        return "?"
    seconds = int(round(max(0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


CACHE_NAMES = {"features": "feature cache", "pixels": "image cache"}


def stages_text(event: Event) -> str:
    """' (feature cache 4:23, training 0:17)': where an end event's time went; stages under a second
    are left out, training never (an end event from before the stages were recorded: '')."""
    stages = event.get("stages")
    if not stages:
        return ""
    names = {"setup": "set-up", "cache": CACHE_NAMES.get(event.get("cache"), "data pipeline"),
             "training": "training", "evaluation": "evaluation"}
    parts = [f"{names.get(key, key)} {duration(seconds)}" for key, seconds in stages.items()
             if key == "training" or seconds >= 1]
    return f" ({', '.join(parts)})"


def format_event(event: Event) -> str | None:
    """The one-line text of a log, start, epoch, end or error event (None for batch events)."""
    kind = event.get("type")
    if kind == "log":
        return event["message"]
    if kind == "start":
        workers = f" x{event['world_size']}" if event.get("world_size", 1) > 1 else ""
        return (f"{event['arch']} / {event['strategy']} on {event['device']}{workers}: "
                f"{event['train_images']} train / {event['val_images']} val images, "
                f"{len(event['classes'])} classes, {event['trainable_params']:,} of "
                f"{event['total_params']:,} parameters train")
    if kind == "epoch":
        return (f"epoch {event['epoch']:>3}: train loss {event['train_loss']:.4f} acc {event['train_acc']:.4f}"
                f" | val loss {event['val_loss']:.4f} acc {event['val_acc']:.4f}"
                f" | {event['seconds']:.1f}s{'  *best' if event.get('best') else ''}")
    if kind == "end":
        return (f"{event['status']} in {duration(event.get('seconds'))}{stages_text(event)}; best epoch "
                f"{event['best']['epoch']}\nval: {event.get('summary', '')}")
    if kind == "error":
        return f"error: {event.get('message')}"
    return None


class EventWriter:
    """Appends each event as one JSON line, flushed at once so a follower sees it."""

    def __init__(self, path: str | Path):
        self.file = open(path, "a", encoding="utf-8")

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
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events


def read_events(run_dir: str | Path) -> list[Event]:
    """Every complete event a run has written so far."""
    return EventFollower(Path(run_dir) / EVENTS_FILE).poll()

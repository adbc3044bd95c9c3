"""Reporting while training (`--report-to tensorboard,mlflow`): the training's events, sent on.

`training._train` attaches one `Reporting` to its events on rank 0, and the loop knows nothing more of
it. Each reporter runs in a thread of its own (`Worker`): the training hands it the events and never
waits for a slow or unreachable server, except at its very end, for the last files (at most
`CLOSE_TIMEOUT_S`). A reporter that fails (an unreachable server, a library error) is dropped for the
rest of the run, and the training's log says so in one warning line; the training goes on.

* **tensorboard** (`TensorBoardReporter`): event files in the run folder's `tensorboard/`, through
  `torch.utils.tensorboard`: the config as text at the start; per epoch the scalars `train/loss`,
  `train/accuracy`, `val/loss`, `val/accuracy` and `lr`; at the end the best model's val metrics
  (`final/accuracy`, `final/macro_f1`, ...) and the confusion matrix and reliability plot as images.
* **mlflow** (`MLflowReporter`): a run in the experiment `$MLFLOW_EXPERIMENT_NAME` (default "finetune")
  of the store `$MLFLOW_TRACKING_URI`, by default `sqlite:///<runs folder>/mlflow.db` with its artifacts
  in `<runs folder>/.mlflow-artifacts/`: the config as params, the same metrics under the same names,
  and at the end the run folder's key files (`ARTIFACTS`: run.json, class_indices.json, metrics, the
  CSVs and plots, the data report) as artifacts. Not the weights: model.pth is 45 MB for a ResNet-18 and
  over 200 MB for a ResNet-101, a copy per run in the tracking store; the run's tag `finetune.run_dir`
  says where they are. The MLflow run's id goes into run.json (`mlflow_run_id`; never the store's URI,
  which may hold a password), and a resumed run continues it. The run ends FINISHED, KILLED (stopped,
  interrupted) or FAILED, as the training's events say.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from . import extras
from .config import FinetuneError, TrainConfig, listed
from .events import Event, EventCallback
from .rundir import RunDir

# the events a reporter reads (batch and progress events, a few a second, stay out of their queues)
REPORTED = ("start", "epoch", "error", "end")
# an epoch event's numbers, by the name both reporters give them
EPOCH_SCALARS = {
    "train/loss": "train_loss",
    "train/accuracy": "train_acc",
    "val/loss": "val_loss",
    "val/accuracy": "val_acc",
    "lr": "lr",
}
# how long the end of a training waits for its reporters' last files (artifacts to a slow server)
CLOSE_TIMEOUT_S = 120.0
CONNECT_TIMEOUT_S = 5.0
EXPERIMENT = "finetune"  # the MLflow experiment without $MLFLOW_EXPERIMENT_NAME
# the run folder's files an MLflow run keeps (test_*: when the data has a test split); never the weights
ARTIFACTS = tuple(
    prefix + name
    for name in ("metrics.json", "per_class.csv", "misclassified.csv", "confusion_matrix.png")
    for prefix in ("", "test_")
) + ("run.json", "class_indices.json", "training_curves.png", "reliability.png", "data_report.txt")
# the end event's status as an MLflow run status
MLFLOW_STATUS = {"completed": "FINISHED", "early-stopped": "FINISHED", "stopped": "KILLED"}


class Reporter(Protocol):
    name: str

    def handle(self, event: Event) -> None: ...

    def close(self, ok: bool) -> None:
        """The end of the run: `ok` False after a failure of this reporter (then only let go of what is local)."""


OnMain = Callable[[Callable[[], None]], None]  # runs a call on the training's thread (run.json, the log)


def check_installed(names: list[str]) -> None:
    """A FinetuneError of one line naming the extra to install when a reporter's library is missing
    (TrainConfig.validate: said before the training starts). A local MLflow store needs SQLAlchemy and
    alembic too, which mlflow-skinny (enough for a tracking server) does not bring."""
    for name in names:
        extras.check_installed(name)  # each reporter's library has its name: tensorboard, mlflow
        if name == "mlflow" and local_store(os.environ.get("MLFLOW_TRACKING_URI")):
            extras.check_installed("sqlalchemy")
            extras.check_installed("alembic")


def local_store(uri: str | None) -> bool:
    return not uri or uri.startswith("sqlite:")


class Reporting:
    """The one listener of the training for every reporter of --report-to; `close()` at the end."""

    def __init__(self, emit: EventCallback):
        self.emit = emit
        self.on_training: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self.workers: list[Worker] = []

    @classmethod
    def open(cls, cfg: TrainConfig, run: RunDir, emit: EventCallback, enabled: bool = True) -> Reporting:
        """The reporters of `cfg.report_to` for `run` (none when not `enabled`: the ranks after 0)."""
        reporting = cls(emit)
        for name in dict.fromkeys(listed(cfg.report_to)) if enabled else ():
            reporter = REPORTER_TYPES[name](run, cfg, reporting.on_training.put)
            reporting.workers.append(Worker(reporter, reporting.on_training.put, reporting.warn))
        return reporting

    def __call__(self, event: Event) -> None:
        if event["type"] in REPORTED:
            for worker in self.workers:
                worker.put(event)
        self.run_pending()

    def warn(self, message: str) -> None:
        self.emit({"type": "log", "message": f"warning: {redact(message)}"})

    def run_pending(self) -> None:
        """What the reporters left for the training's thread: run.json updates and warnings."""
        while True:
            try:
                call = self.on_training.get_nowait()
            except queue.Empty:
                return
            try:
                call()
            except (OSError, FinetuneError):  # run.json or the log on a full disk: reporting is no reason to fail
                pass

    def close(self) -> None:
        """Let every reporter finish (at most CLOSE_TIMEOUT_S for all), then say what they left to say."""
        for worker in self.workers:
            worker.put(None)
        deadline, later = time.monotonic() + CLOSE_TIMEOUT_S, self.on_training.put
        try:
            for worker in self.workers:
                worker.thread.join(max(0.0, deadline - time.monotonic()))
                if worker.thread.is_alive():
                    later(functools.partial(self.warn, f"{worker.name}: not done after {CLOSE_TIMEOUT_S:g} s, left"))
        except KeyboardInterrupt:  # the training is over: a Ctrl-C here only stops the waiting
            later(functools.partial(self.warn, "stopped waiting for the reporters: what they had not sent is left out"))
        self.run_pending()


class Worker:
    """One reporter in a daemon thread, fed through a queue; its first exception drops it."""

    def __init__(self, reporter: Reporter, on_training: OnMain, warn: Callable[[str], None]):
        self.reporter, self.name = reporter, reporter.name
        self.on_training, self.warn = on_training, warn
        self.inbox: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self.failed = False
        self.thread = threading.Thread(target=self.work, name=f"finetune-report-{self.name}", daemon=True)
        self.thread.start()

    def put(self, event: Event | None) -> None:
        if not self.failed:
            self.inbox.put(event)

    def work(self) -> None:
        try:
            while (event := self.inbox.get()) is not None:
                self.reporter.handle(event)
        except Exception as error:  # noqa: BLE001 - whatever a reporter raises, the training goes on
            self.failed = True
            self.say(f"{self.name} reporting stopped for this run: {one_line(error)}")
        try:
            self.reporter.close(ok=not self.failed)
        except Exception as error:  # noqa: BLE001
            self.say(f"{self.name} reporting could not finish: {one_line(error)}")

    def say(self, message: str) -> None:
        self.on_training(functools.partial(self.warn, message))


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def redact(text: str) -> str:
    """`text` without the user:password@ (or token@) of any URL in it."""
    return re.sub(r"([a-zA-Z][\w+.-]*://)[^/\s@]+@", r"\1", text)


def end_scalars(event: Event) -> dict[str, float]:
    """The end event's val metrics of the best model that are single numbers, as final/<name>."""
    metrics = cast(dict[str, Any], event.get("metrics") or {})
    return {
        f"final/{key}": float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }


def epoch_scalars(event: Event) -> dict[str, float]:
    return {name: float(event[key]) for name, key in EPOCH_SCALARS.items() if key in event}  # type: ignore[literal-required]


# ---------------------------------------------------------------------------------------------
# TensorBoard


class TensorBoardReporter:
    name = "tensorboard"

    def __init__(self, run: RunDir, cfg: TrainConfig, on_training: OnMain):
        self.run, self.cfg = run, cfg
        self.writer: Any = None

    def handle(self, event: Event) -> None:
        if event["type"] == "start":
            extras.require("tensorboard")  # torch's own message for a missing one is not the install line
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run.tensorboard))
            # indented: a code block in TensorBoard's markdown
            config = json.dumps(self.cfg.to_dict(), indent=2)
            self.writer.add_text("config", "\n".join("    " + line for line in config.splitlines()))
        elif self.writer is not None and event["type"] == "epoch":
            for name, value in epoch_scalars(event).items():
                self.writer.add_scalar(name, value, event["epoch"])
            self.writer.flush()  # a TensorBoard open on the folder shows each epoch (else every 2 minutes)
        elif self.writer is not None and event["type"] == "end":
            step = event["best"]["epoch"]
            for name, value in end_scalars(event).items():
                self.writer.add_scalar(name, value, step)
            for name, path in (("confusion_matrix", self.run.confusion_matrix), ("reliability", self.run.reliability)):
                if path.is_file():
                    self.writer.add_image(name, png_pixels(path), step, dataformats="HWC")

    def close(self, ok: bool) -> None:
        if self.writer is not None:
            self.writer.close()


def png_pixels(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# MLflow


def tracking_uri(runs_dir: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite database in the runs folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).absolute() / 'mlflow.db'}"


def check_reachable(uri: str) -> None:
    """A tracking server that does not answer is said at once: MLflow's own client retries for minutes."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise ConnectionError(
            f"cannot reach the MLflow server at {parts.scheme}://{parts.hostname}:{port} ({error})"
        ) from None


class MLflowReporter:
    name = "mlflow"

    def __init__(self, run: RunDir, cfg: TrainConfig, on_training: OnMain):
        self.run, self.cfg, self.on_training = run, cfg, on_training
        self.uri = tracking_uri(cfg.runs_dir)
        self.default_store = not os.environ.get("MLFLOW_TRACKING_URI")
        self.resumed_id = run.info().get("mlflow_run_id")  # read here, on the training's thread
        self.client: Any = None
        self.run_id: str | None = None
        self.status: str | None = None  # set by an error or the end event

    def handle(self, event: Event) -> None:
        if event["type"] == "start":
            self.start()
        elif self.run_id is None:
            return
        elif event["type"] == "epoch":
            self.log_metrics(epoch_scalars(event), event["epoch"], event.get("time"))
        elif event["type"] == "error":
            self.status = "KILLED" if event["message"] == "interrupted" else "FAILED"
        elif event["type"] == "end":
            self.status = self.status or MLFLOW_STATUS.get(event["status"], "FAILED")
            self.log_metrics(end_scalars(event), event["best"]["epoch"], event.get("time"))
            for name in ARTIFACTS:
                if (self.run.path / name).is_file():
                    self.client.log_artifact(self.run_id, str(self.run.path / name))

    def start(self) -> None:
        extras.require("mlflow")
        check_reachable(self.uri)
        # SQLAlchemy 2.1 deprecates a loader MLflow's SQLite store still uses: not the user's to act on
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\.")
        from mlflow.tracking import MlflowClient

        # its "Creating initial MLflow database tables..." would interleave with the training's own lines
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.client = MlflowClient(self.uri)
        run_id = self.continued() or self.create()
        self.run_id = run_id
        self.on_training(functools.partial(self.run.update_info, mlflow_run_id=run_id))

    def continued(self) -> str | None:
        """A resumed training's MLflow run, when this store has it (its params stay as they were logged)."""
        if not isinstance(self.resumed_id, str):
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(self.resumed_id)
        except MlflowException:
            return None
        self.client.update_run(self.resumed_id, status="RUNNING")
        return self.resumed_id

    def create(self) -> str:
        from mlflow.entities import Param

        created = self.client.create_run(
            self.experiment_id(), run_name=self.run.name, tags={"finetune.run_dir": str(self.run.path)}
        )
        run_id = self.run_id = created.info.run_id  # from now on close() ends it, whatever fails next
        params = [Param(key, value) for key, value in config_params(self.cfg).items()]
        self.client.log_batch(run_id, params=params)
        return run_id

    def experiment_id(self) -> str:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # the default store keeps its artifacts in the runs folder too (else MLflow's ./mlruns: where the user is)
        location = (Path(self.cfg.runs_dir).absolute() / ".mlflow-artifacts").as_uri() if self.default_store else None
        return self.client.create_experiment(name, artifact_location=location)

    def log_metrics(self, values: dict[str, float], step: int, at: float | None) -> None:
        from mlflow.entities import Metric

        stamp = int((at or time.time()) * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, stamp, step) for key, value in values.items()])

    def close(self, ok: bool) -> None:
        """End the MLflow run, also after a failure of this reporter (a failed artifact upload, a metric
        refused): else it stays RUNNING in the store forever. A server gone away is tried once (5 s),
        not through MLflow's minutes of retries."""
        if self.run_id is None:
            return
        if not ok:
            check_reachable(self.uri)
        self.client.set_terminated(self.run_id, self.status or "FAILED")


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """The config as MLflow params: text, a dict as JSON (MLflow keeps at most 6000 characters of one)."""
    return {
        key: (json.dumps(value) if isinstance(value, dict) else str(value))[:6000]
        for key, value in cfg.to_dict().items()
    }


REPORTER_TYPES: dict[str, Callable[[RunDir, TrainConfig, OnMain], Reporter]] = {
    "tensorboard": TensorBoardReporter,
    "mlflow": MLflowReporter,
}

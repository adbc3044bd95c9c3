"""The studio's state: where runs and uploads live, the one training job, and the loaded predictors.

One Studio per app process; every handler takes it as its first argument. No gradio here.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .. import jobs
from ..config import FinetuneError, TrainConfig
from ..rundir import RunDir, disk_full
from .workspace import Workspace

PACKAGE_PARENT = Path(__file__).resolve().parents[2]  # the folder that holds the finetune package
MAX_SCAN_FILES = 200_000
MAX_BATCH_IMAGES = 10_000
PREDICTORS_KEPT = 3


def resolved_device(choice: str) -> str:
    """'auto' -> the device it means here ('cuda:0', 'mps', 'cpu')."""
    from ..device import resolve_device

    return str(resolve_device(choice))


def load_predictor(run_dir: Path, device: str):
    from ..predict import Predictor

    return Predictor.from_run(run_dir, device=device)


class PredictorCache:
    """Loaded models, kept warm: an LRU of a few, keyed by (run, model.pth version, device), so a
    better model.pth or another device loads afresh and the cache never grows past `size`."""

    def __init__(self, size: int = PREDICTORS_KEPT, loader: Callable = load_predictor):
        self.size, self.loader = max(1, size), loader
        self._items: OrderedDict[tuple[str, int, str], object] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(run_dir: str | Path, device: str) -> tuple[str, int, str]:
        run = RunDir(Path(run_dir).resolve())
        try:
            version = run.model.stat().st_mtime_ns
        except OSError:
            raise FinetuneError(f"{run.name} has no model yet (it has not finished an epoch)") from None
        return str(run.path), version, device

    def get(self, run_dir: str | Path, device: str):
        key = self.key(run_dir, device)
        with self._lock:  # one load at a time: two requests for one model load it once
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            for stale in [k for k in self._items if k[0] == key[0] and k[2] == device]:
                del self._items[stale]  # an older model.pth of this run
            predictor = self.loader(Path(key[0]), device)
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return predictor

    def keys(self) -> list[tuple[str, int, str]]:
        with self._lock:
            return list(self._items)

    def drop_accelerated(self) -> int:
        """Forget the predictors that hold GPU (or MPS) memory; returns how many."""
        with self._lock:
            gone = [k for k in self._items if not k[2].startswith("cpu")]
            for k in gone:
                del self._items[k]
            return len(gone)


class ModelLock:
    """Who may use one loaded model at a time: any number of predictions together (shared), or one
    Grad-CAM alone (exclusive: it hooks the model and runs a backward pass, so a forward pass of
    another request would feed its hooks). A waiting Grad-CAM holds back new predictions."""

    def __init__(self):
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def shared(self):
        with self._changed:
            while self._writing or self._writers_waiting:
                self._changed.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def exclusive(self):
        with self._changed:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._changed.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


class DeviceNotes:
    """Why predictions left the GPU (device.InferenceDevice.note), said once per cause (a training,
    short memory), not at every request: logged when the cause changes, and kept until the UI takes it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cause: str | None = None
        self._unsaid: str | None = None

    def record(self, choice) -> None:
        with self._lock:
            if choice.cause != self._cause:
                self._cause, self._unsaid = choice.cause, choice.note
                if choice.note:
                    logging.getLogger(__name__).info("%s", choice.note)

    def take(self) -> str | None:
        with self._lock:
            note, self._unsaid = self._unsaid, None
            return note


def folder_problem(error: OSError) -> str:
    """One line for a folder the studio cannot make, read or write."""
    full = disk_full(error)
    if full is not None:
        return str(full)
    where = f" {error.filename}" if error.filename else ""
    return f"cannot use{where}: {error.strerror or error}"


class Studio:
    """The app's state; `base_dir` (the app's working directory) is what relative paths mean."""

    def __init__(
        self,
        runs_dir: str | Path,
        workspace: str | Path,
        default_data: str | Path,
        browse_root: str | Path | None = None,
        *,
        base_dir: str | Path | None = None,
        quota_bytes: int | None = None,
        max_scan_files: int = MAX_SCAN_FILES,
        max_batch_images: int = MAX_BATCH_IMAGES,
        predictors: int = PREDICTORS_KEPT,
        predictor_loader: Callable = load_predictor,
    ):
        self.base_dir = Path(base_dir or os.getcwd()).resolve()
        self.runs_dir = self.resolve_path(runs_dir)
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self.workspace = Workspace(self.resolve_path(workspace), quota_bytes)
        except OSError as problem:
            raise FinetuneError(folder_problem(problem)) from None
        self.default_data = str(self.resolve_path(default_data))
        self.browse_root = str(self.resolve_path(browse_root or Path.home()))
        self.max_scan_files, self.max_batch_images = max_scan_files, max_batch_images
        self.job: jobs.TrainingJob | None = None
        self.job_lock = threading.Lock()
        self.predictors = PredictorCache(predictors, predictor_loader)
        self.device_notes = DeviceNotes()
        self._model_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._model_locks_lock = threading.Lock()

    def resolve_path(self, path: str | Path) -> Path:
        """A path the user typed, made absolute once: relative to the app's working directory."""
        path = Path(str(path).strip()).expanduser()
        return (path if path.is_absolute() else self.base_dir / path).resolve()

    def start_up(self) -> Path | None:
        """What the app does before it serves: tidy the workspace (a failure there is a warning: the
        app works without it) and follow a training left running (`attach_running`). FinetuneError
        when the runs folder cannot be read."""
        try:
            self.workspace.cleanup()
        except OSError as problem:
            logging.getLogger(__name__).warning("workspace clean-up skipped: %s", folder_problem(problem))
        try:
            return self.attach_running()
        except OSError as problem:
            raise FinetuneError(folder_problem(problem)) from None

    # -- the training
    def running_job(self) -> jobs.TrainingJob | None:
        """The training job while it runs, else None."""
        job = self.job
        return job if job is not None and job.running() else None

    def training(self) -> bool:
        return self.running_job() is not None

    def attach_running(self) -> Path | None:
        """At start-up: follow a training an earlier app process (or a terminal) left running in this
        runs folder, so it can be watched and stopped and no second one starts beside it. Runs left
        at "running" whose processes are gone are marked ended on the way."""
        alive = jobs.running_trainings(self.runs_dir)
        if not alive:
            return None
        with self.job_lock:
            self.job = jobs.TrainingJob.attach(alive[0])
        return alive[0]

    def require_idle(self) -> None:
        """FinetuneError while a training runs: this studio's, or one started elsewhere (a terminal)
        in the same runs folder."""
        job = self.running_job()
        if job is not None:
            view = job.update()
            raise FinetuneError(
                f"A training is already running ({Path(view.run_dir or job.run_dir).name}: "
                f"{view.progress_text()}). Wait for it to finish or press Stop first. "
                f"One training at a time."
            )
        jobs.require_no_training(self.runs_dir)

    def start(self, cfg: TrainConfig, processes: int = 1) -> jobs.TrainingJob:
        """Start `cfg` (every field passed on, paths made absolute against base_dir) as a training
        process; FinetuneError while another one runs."""
        with self.job_lock:
            self.require_idle()
            cfg = jobs.absolute_paths(cfg, self.base_dir)
            self.release_accelerator()
            self.workspace.touch(cfg.data)
            self.job = jobs.TrainingJob(cfg, cwd=PACKAGE_PARENT, processes=processes)
            return self.job

    def release_accelerator(self) -> None:
        """Before a training: drop the predictors on the GPU and give their memory back."""
        if self.predictors.drop_accelerated():
            from ..device import release_gpu_memory

            release_gpu_memory()

    def stop(self) -> str:
        job = self.running_job()
        if job is None:
            return "No training is running."
        job.stop()
        return f"Stopping {job.run_dir.name} after the current batch; the best model so far is kept."

    def shutdown(self, attached: bool = True) -> None:
        """The app is ending: end its training too (SIGINT, then every process group is killed).
        attached=False: only one this studio started, not one it follows (a terminal's): a studio that
        failed to start must not cost the user a training it never served."""
        if self.job is not None and (attached or self.job.process is not None):
            self.job.kill()

    def in_use(self) -> tuple[Path, ...]:
        """Data a running training reads (kept by the workspace clean-up): its data folder, and the
        pools its curation adds images from (an uploaded pool is in the workspace too)."""
        job = self.running_job()
        if job is None or job.cfg is None:
            return ()
        pools: list[Path] = []
        if job.cfg.curation:
            from ..curation import load_curation

            try:
                pools = sorted({Path(d.pool) for d in load_curation(job.cfg.curation).adds() if d.pool})
            except (FinetuneError, OSError):  # unreadable now: the training read it when it started
                pools = []
        return (Path(job.cfg.data), *pools)

    # -- predictions
    def inference_choice(self, doing: str = "predicting"):
        """device.inference_device for this studio: the CPU while a training runs on this machine
        (its own, or one from a terminal or torchrun in its runs folder: rundir.training_here) or
        while the GPU's free memory is short, otherwise what 'auto' means here."""
        from ..device import inference_device
        from ..rundir import training_here

        job = self.running_job()
        busy = job.run_dir.name if job is not None else training_here(self.runs_dir)
        return inference_device("auto", busy, doing)

    def prediction_device(self) -> str:
        """inference_choice's device; its note is said once (device_notes)."""
        choice = self.inference_choice()
        self.device_notes.record(choice)
        return str(choice.device)

    def predictor(self, run_dir: str | Path):
        return self.predictors.get(run_dir, self.prediction_device())

    def model_lock(self, predictor) -> ModelLock:
        """The lock of one loaded predictor: `shared()` around predictions, `exclusive()` around Grad-CAM."""
        with self._model_locks_lock:
            lock = self._model_locks.get(predictor)
            if lock is None:
                lock = self._model_locks[predictor] = ModelLock()
            return lock

    def serve_run_file(self, path: str | Path | None) -> str | None:
        """A file of a run (in the runs folder), made downloadable; None when there is none."""
        if path is None or not Path(path).is_file():
            return None
        path = Path(path).resolve()
        if not path.is_relative_to(self.runs_dir):
            raise FinetuneError(f"not a file of a run in {self.runs_dir}: {path}")
        return str(self.workspace.publish(path, f"runs/{path.parent.name}"))

    def visible_gpus(self) -> int:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0

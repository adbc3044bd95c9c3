"""The run folder: its files, its name, its info (`run.json`), its split, and finding runs.

One place knows the layout (`runs/<time>-<arch>-<strategy>/`):

    model.pth            best model: a plain torchvision state_dict (CPU tensors)
    model.safetensors    the same tensors as safetensors (written when the training ends)
    last.pth             resume checkpoint: model, optimizer, scheduler, scaler, epoch, history
    class_indices.json   the classic class map {"0": "daisy", ...}, 4-space indent
    run.json             architecture, classes, preprocessing, config, status, history, summary
    split.json           the split (paths relative to the data root), skipped files
    data_report.txt      the same as text
    events.jsonl         every training event (events.py)
    metrics.json, confusion_matrix.png, training_curves.png, per_class.csv, misclassified.csv
    tensorboard/         --report-to tensorboard: the event files (reporting.py)

Every write goes through a temporary file and a rename, so a reader (the studio, while the
training writes) never sees half a file. A write that fails (a full disk) removes its temporary
file and says so in one line (`DiskFull`).
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack, cast

from .config import FinetuneError
from .events import EVENTS_FILE, BestEpoch, EpochRecord
from .fsutil import JSON_ERRORS, DiskFull, disk_full, write_atomic, write_text_atomic  # noqa: F401 - re-exported

try:
    import fcntl
except ImportError:  # Windows: trainings are told apart by their pid alone
    fcntl = None  # type: ignore[assignment]  # checked before each use

RUN_FORMAT = "finetune-run/1"
FINAL_STATUSES = ("completed", "stopped", "early-stopped", "failed")
# what readers show for a run.json that says "running" whose processes are gone (RunDir.status):
# a process the kernel kills (the OOM killer's SIGKILL) cannot mark its run, and readers never write
ENDED_UNEXPECTEDLY = "ended unexpectedly"


class RunInfo(TypedDict, total=False):
    """run.json: what finetune writes there, read and written only through `RunDir` (info, require_info,
    require_trained, write_info, update_info). Every key may be missing: the training fills it in as it
    goes, and an older run has fewer keys. A run folder may come from someone else: a field that drives
    code is checked where it is used (predict's fields, the API's readers), not trusted for its type."""

    format: str  # RUN_FORMAT
    # from the start of the training (training.start_run_folder)
    status: str  # running, then one of FINAL_STATUSES
    created: str  # ISO time, to sort runs
    arch: str
    strategy: str
    num_classes: int
    classes: list[str]
    image_size: int
    resize_size: int
    mean: list[float]
    std: list[float]
    config: dict[str, Any]  # TrainConfig.to_dict()
    versions: dict[str, str]
    device: str
    world_size: int
    curation: dict[str, Any]  # training.curation_summary, when a curation file was applied
    # who is training (the studio checks they are alive after a restart)
    pids: list[int]
    pid: int  # older runs: one process
    launcher_pid: int | None
    host: str
    # while it trains, and at its end
    pipeline: str
    history: list[EpochRecord]
    best: BestEpoch
    epochs_done: int
    summary: dict[str, float] | None  # accuracy, balanced_accuracy, top_k_accuracy, macro_f1, num_images
    seconds: float  # events.Timing
    stages: dict[str, float]
    cache: str
    calibration: dict[str, Any]  # calibrate.calibrate's record: temperature, suggested_min_confidence, ...
    error: str  # why it failed or stopped early
    mlflow_run_id: str  # --report-to mlflow: the run's id in its tracking store (never the store's URI)


def write_json(path: Path, data) -> None:
    """Write via a temporary file so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2))


def save_atomic(obj, path: Path) -> None:
    import torch  # here: what only reads run folders or takes a lock need not load torch

    write_atomic(path, lambda sink: torch.save(obj, sink))


def save_safetensors(state: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state_dict as safetensors (the Hub's and timm's format: tensors only, nothing to unpickle)."""
    from safetensors.torch import save

    data = save({key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}, metadata)
    write_atomic(path, lambda sink: sink.write(data))


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
    def create(cls, runs_dir: str | Path, arch: str, strategy: str, name: str | None = None) -> RunDir:
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
    def safetensors(self) -> Path:
        """model.pth's tensors as safetensors, written when the training ends (removed when model.pth
        changes before that: it never holds another epoch than model.pth)."""
        return self.path / "model.safetensors"

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

    @property
    def tensorboard(self) -> Path:
        """--report-to tensorboard's event files (`tensorboard --logdir runs` shows every run's)."""
        return self.path / "tensorboard"

    def is_run(self) -> bool:
        return self.info_path.is_file()

    def has_model(self) -> bool:
        return self.model.is_file()

    # -- run.json
    def info(self) -> RunInfo:
        """run.json, or {} while it does not exist (or is being replaced), or holds no JSON object."""
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, *JSON_ERRORS):
            return {}
        return cast(RunInfo, info) if isinstance(info, dict) else {}

    def require_info(self) -> RunInfo:
        if not self.info_path.is_file():
            raise FinetuneError(f"not a run folder (no run.json): {self.path}")
        try:
            info = json.loads(self.info_path.read_text())
        except (OSError, *JSON_ERRORS) as error:
            raise FinetuneError(f"cannot read {self.info_path}: {error}") from None
        if not isinstance(info, dict):  # a list or a number: every reader expects the run's fields
            raise FinetuneError(f"{self.info_path} does not hold a JSON object: not a finetune run")
        return cast(RunInfo, info)

    def require_trained(self, checkpoint: str = "model.pth") -> RunInfo:
        """run.json of a run that has a model to load (arch, classes and the checkpoint file), else a
        one-line error saying what is missing."""
        info = self.require_info()
        if not isinstance(info, dict) or not isinstance(info.get("arch"), str) or not info.get("classes"):
            raise FinetuneError(f"{self.info_path} has no arch and classes: not a finetune run")
        if not (self.path / checkpoint).is_file():
            raise FinetuneError(f"{self.path} has no {checkpoint} yet (training has not finished an epoch)")
        return info

    def write_info(self, info: RunInfo) -> None:
        write_json(self.info_path, {"format": RUN_FORMAT, **info})

    def update_info(self, **changes: Unpack[RunInfo]) -> None:
        info = self.info()
        info.update(changes)
        write_json(self.info_path, info)

    # -- the split and the class map
    def write_split(self, scan) -> None:
        write_json(self.split_path, scan.to_dict())
        write_text_atomic(self.report, scan.report() + "\n")

    def read_split(self):
        from .data import DatasetScan

        try:
            data = json.loads(self.split_path.read_text())
            if isinstance(data, dict) and data.get("curation"):
                from .curation import CuratedScan

                return CuratedScan.from_dict(data)
            return DatasetScan.from_dict(data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise FinetuneError(f"cannot read the split of {self.path}: {error}") from None

    def data_root(self) -> str | None:
        """The data folder the run was trained on (from split.json), None when unknown."""
        try:
            return json.loads(self.split_path.read_text())["root"]
        except (OSError, KeyError, TypeError, *JSON_ERRORS):  # TypeError: a list, not an object
            return None

    def write_class_indices(self, classes: list[str]) -> None:
        write_text_atomic(self.class_indices, class_indices_json(classes))

    # -- metrics
    def metrics(self) -> dict:
        if not self.metrics_path.is_file():
            status = self.status_text()
            raise FinetuneError(
                f"{self.name} has no evaluation yet (status: {status}); metrics are written when a training ends"
            )
        try:
            metrics = json.loads(self.metrics_path.read_text())
        except (OSError, *JSON_ERRORS) as error:
            raise FinetuneError(f"cannot read {self.metrics_path}: {error}") from None
        if not isinstance(metrics, dict):
            raise FinetuneError(f"{self.metrics_path} does not hold a JSON object")
        return metrics

    def status(self, info: RunInfo | None = None) -> str:
        """run.json's status as readers show it: ENDED_UNEXPECTEDLY for a run that says "running"
        on this machine whose processes are gone (`gone_training`), "unknown" when it has none."""
        return self.status_text(info, detail=False)

    def status_text(self, info: RunInfo | None = None, detail: bool = True, missing: str = "unknown") -> str:
        """`status()`, with why a run reads as ended: 'ended unexpectedly (process 1234 is gone:
        killed, out of memory?)'. Nothing is written: the studio marks such a run ended when it
        looks for trainings to follow (jobs.running_trainings)."""
        info = self.info() if info is None else info
        status = info.get("status")
        gone = gone_training(self, info)
        if gone is not None:
            if not detail:
                return ENDED_UNEXPECTEDLY
            who = (
                "its process is"
                if not gone
                else f"process {gone[0]} is"
                if len(gone) == 1
                else f"processes {', '.join(map(str, gone))} are"
            )
            return f"{ENDED_UNEXPECTEDLY} ({who} gone: killed, out of memory?)"
        return status if isinstance(status, str) else missing

    def label(self) -> str:
        """'20250101-120000-resnet34-last · completed · val acc 0.930' for a dropdown."""
        info = self.info()
        parts = [self.name, self.status_text(info, missing="?")]
        summary: object = info.get("summary")
        accuracy = summary.get("accuracy") if isinstance(summary, dict) else None
        # only a fraction: a run.json from anyone may hold text, true, NaN, Infinity or a 400-digit int
        if isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1:
            parts.append(f"val acc {accuracy:.3f}")
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
        stamp: object = RunDir(p).info().get("created")
        if not isinstance(stamp, str) or not stamp:  # a number or a list would not sort beside the others
            stamp = datetime.fromtimestamp(p.stat().st_mtime).isoformat(timespec="seconds")
        return stamp, p.name

    return sorted(found, key=created, reverse=True)


def run_choices(runs_dir: str | Path, usable_only: bool = False) -> list[tuple[str, str]]:
    """[(label, path)] newest first; usable_only: only runs that have a model.pth."""
    return [(RunDir(p).label(), str(p)) for p in list_runs(runs_dir) if not usable_only or RunDir(p).has_model()]


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


def read_metrics(run_dir: str | Path) -> dict:
    return RunDir(run_dir).metrics()


# ---------------------------------------------------------------------------------------------
# Who is training in a runs folder, from before the scan (a run folder comes only after it)

LOCK_PREFIX, LOCK_SUFFIX = ".training-", ".lock"


class TrainingLock:
    """`runs/.training-<pid>-<id>.lock`, held (flock) by a training from before its scan to its end.

    It says "a training is running here" while there is no run.json yet. The flock goes with the
    process, so the file of a training that was killed is seen to be stale (and removed) without
    trusting a pid that may have been reused. Every training takes its own: it never makes one wait
    or refuse; the studio refuses to start another beside a live one (`live_trainings`)."""

    def __init__(self, runs_dir: str | Path, data: str | Path):
        self.runs_dir = Path(runs_dir)
        self.info = {
            "pid": os.getpid(),
            "host": os.uname().nodename,
            "started": datetime.now().isoformat(timespec="seconds"),
            "data": str(data),
            "run_dir": None,
        }
        self.path: Path | None = None
        self._fd: int | None = None
        self._written = 0

    def __enter__(self) -> TrainingLock:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        name = f"{LOCK_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # filled and locked under a name no reader looks at, then renamed: a reader never finds the
        # file unlocked while its training lives (the lock belongs to the file, not to its name)
        tmp, path = self.runs_dir / f"{name}.new", self.runs_dir / f"{name}{LOCK_SUFFIX}"
        try:
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # a file system without locks: readers fall back to the pid
                    pass
            self._write()
            os.replace(tmp, path)
            self.path = path
        except BaseException as error:
            self._close()
            tmp.unlink(missing_ok=True)
            full = disk_full(error, tmp)
            if full is not None and full is not error:
                raise full from None
            raise
        return self

    def set_run(self, run_dir: str | Path) -> None:
        """The run folder, once the scan made it: the studio can then name it."""
        self.info["run_dir"] = str(run_dir)
        try:
            self._write()
        except OSError:  # only a detail for the message of a studio that waits: not worth failing for
            pass

    def _write(self) -> None:
        assert self._fd is not None, "written only while the lock file is open"
        data = json.dumps(self.info).encode()
        # in place (a rename would drop the lock), padded over the old text: JSON ignores the spaces
        os.pwrite(self._fd, data.ljust(self._written), 0)
        self._written = max(self._written, len(data))

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)  # first: no reader sees it once the training ends
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def live_trainings(runs_dir: str | Path, remove_stale: bool = True) -> list[dict]:
    """The lock files' details ({"pid", "host", "started", "data", "run_dir", "lock"}) of the trainings
    alive in `runs_dir`; the files of trainings that died are removed on the way (unless not
    `remove_stale`: a reader that only looks)."""
    runs_dir = Path(runs_dir)
    try:
        candidates = sorted(runs_dir.glob(f"{LOCK_PREFIX}*{LOCK_SUFFIX}"))
    except OSError:
        return []
    alive = []
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # gone meanwhile, or not ours to read
            continue
        try:
            try:
                info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
            except (OSError, ValueError):
                info = {}
            info = info if isinstance(info, dict) else {}
            if _lock_held(fd, info):
                alive.append({**info, "lock": str(path)})
            elif remove_stale:
                path.unlink(missing_ok=True)
        except OSError:
            continue
        finally:
            os.close(fd)
    return alive


def _lock_held(fd: int, info: dict) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False  # nobody holds it: its training is gone
        except BlockingIOError:
            return True
        except OSError:
            pass
    # no flock here: the pid, on the host that wrote it (another host's cannot be checked: kept)
    if info.get("host") != os.uname().nodename:
        return True
    try:
        pid = int(info.get("pid", 0))
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, TypeError, ValueError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Whether a run that says "running" still runs (readers only look: nothing here writes)


def this_host() -> str:
    return os.uname().nodename


def training_pids(info: RunInfo) -> list[int]:
    """The training's processes that run.json names (an older run: its one "pid"); only positive
    integers that fit a pid_t: a run folder may come from anyone, a pid of 0 or -1 would signal whole
    groups, and a wider one is no process (os.kill would raise OverflowError)."""
    named: object = info.get("pids") or [info.get("pid")]  # as written, whatever its type
    if not isinstance(named, list):
        return []
    return [pid for pid in named if isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid < 2**31]


def is_training_process(pid: int) -> bool:
    """A live process that is a finetune training (not another program that got the pid since)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # wider than a pid_t: no process has it
        return False
    except PermissionError:  # alive, someone else's
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the signal check
    return b"finetune" in b" ".join(cmdline) and b"train" in cmdline


def lock_names_run(run: RunDir) -> bool:
    """A live training's lock (`TrainingLock`, in the folder above the run, held to the training's
    end) names this run: it runs, whatever its command line (a notebook's kernel trains too)."""
    return any(
        isinstance(lock.get("run_dir"), str) and Path(lock["run_dir"]).name == run.name
        for lock in live_trainings(run.path.parent, remove_stale=False)
    )


def gone_training(run: RunDir, info: RunInfo) -> list[int] | None:
    """For a run.json that says "running" on this machine: the pids it names (maybe none) when no
    live lock names the run and none of them is a live training: killed (the OOM killer's SIGKILL
    leaves no time to mark the run), or the machine restarted. None while it runs, for any other
    status, and for another machine's run (its processes cannot be seen from here)."""
    if info.get("status") != "running" or info.get("host", this_host()) != this_host():
        return None
    pids = training_pids(info)
    if any(is_training_process(pid) for pid in pids) or lock_names_run(run):
        return None
    return pids


def training_here(runs_dir: str | Path) -> str | None:
    """The name of a training that runs on this machine's GPU from `runs_dir` (its run folder, or
    "pid N" while it still scans the images), None when there is none: from the trainings' locks,
    which every training holds from before its scan to its end (rank 0 for all of torchrun's).
    A training whose run.json says it runs on the CPU leaves the GPU free. Nothing is written."""
    for lock in live_trainings(runs_dir, remove_stale=False):
        if lock.get("host") not in (None, this_host()):
            continue
        run_dir = lock.get("run_dir")
        if not isinstance(run_dir, str):
            return f"pid {lock.get('pid', '?')}"
        device = RunDir(Path(runs_dir) / Path(run_dir).name).info().get("device")
        if not (isinstance(device, str) and device.startswith("CPU")):  # device.describe_device's words
            return Path(run_dir).name
    return None

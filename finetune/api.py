"""The Python API: the engine the command line and the studio use, in a few calls.

    import finetune
    run = finetune.train("photos/", arch="resnet50", strategy="last", epochs=5)  # any TrainConfig field
    run.metrics["accuracy"]; run.classes; run.path
    run.predict(["a.jpg", "b.jpg"], top_k=3)     # finetune.predict.Prediction objects
    run.evaluate("holdout/")                     # finetune.evaluate.Evaluation
    run.export("onnx")                           # -> Path; also "torchscript"
    run.explain("a.jpg")                         # Grad-CAM overlay (a PIL image)
    run = finetune.load("runs/<name>")           # a run folder, or a classic model.pth + class_indices.json
    finetune.runs()                              # every run of ./runs: .rows, .text(), .to_dict()
    finetune.scan("photos/"); finetune.doctor("photos/")

The engine modules behind them are named for what they hold (training.py, the data_doctor package), so
`finetune.train` and `finetune.doctor` are these plain functions whatever else is imported. Nothing here imports
torch until it is needed: `import finetune` stays quick.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import difflib
import html
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .architectures import architecture
from .config import FinetuneError, TrainConfig, default_of
from .events import Event, EventCallback
from .progress import TerminalProgress, for_environment, in_notebook, shown

if TYPE_CHECKING:
    from PIL import Image

    from .data import DatasetScan
    from .data_doctor import DoctorReport
    from .evaluate import Evaluation
    from .predict import Prediction, Predictor
    from .rundir import RunInfo
    from .runtable import RunsTable

__all__ = ["Model", "Run", "doctor", "load", "runs", "scan", "train"]

STOP_MESSAGE = "stopping after the current batch (interrupt again to abort)"


# ---------------------------------------------------------------------------------------------
# Training


def train(
    data: str | os.PathLike,
    *,
    progress: bool = True,
    on_event: EventCallback | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> Run:
    """Fine-tune on `data` (a folder of class folders, or with train/ and val/; or a .zip of one) and
    return the Run. `options`: any TrainConfig field (epochs=5, arch="resnet50", weights="none", ...).

    `progress`: a bar and a line per epoch (in a notebook its widget, in a terminal the command line's
    bar, in a captured log plain lines); False shows nothing. `on_event`: receives every event (see
    finetune.events) as well. `stop`: a threading.Event; set it (from another thread) to stop at the
    next batch. Ctrl-C, or a notebook's interrupt, does the same: the run keeps its best model and is
    "stopped"; a second one aborts. A run that fails raises FinetuneError."""
    cfg = make_config(data, options).validate()
    consumer = for_environment(progress)
    cfg.data = _dataset_folder(cfg.data, consumer)
    listeners = [listener for listener in (consumer, on_event) if listener is not None]

    def fan_out(event: Event) -> None:
        for listener in listeners:
            listener(event)

    from .training import train as run_training

    stop = stop if stop is not None else threading.Event()
    with interrupt_stops(stop):
        try:
            path = run_training(cfg, on_event=fan_out if listeners else None, stop=stop)
        except MemoryError:
            raise FinetuneError("out of memory: try a smaller batch_size or image_size") from None
        except RuntimeError as error:
            if "out of memory" in str(error).lower():
                raise FinetuneError("out of GPU memory: try a smaller batch_size or image_size") from None
            raise
        finally:
            if consumer is not None:  # a bar half-way (the scan's, an epoch's) must not stay on screen
                consumer.close()
    return Run(path, device=cfg.device)


def make_config(data: str | os.PathLike, options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig of `data` and keyword options; an unknown keyword is a one-line error that names the
    closest field. Paths may be given as Path objects."""
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "data"]  # data: the first argument
    refuse_unknown(options, fields, "finetune.train")
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    return TrainConfig(data=os.fspath(data) if isinstance(data, os.PathLike) else data, **values)


def check_options(options: dict[str, Any], function: Callable, name: str, taken: Iterable[str] = ()) -> None:
    """An unknown keyword for `function` as one line naming the closest one (as make_config does), not
    a TypeError; `taken`: the parameters the API fills itself."""
    import inspect

    known = [p for p in inspect.signature(function).parameters if p not in taken]
    refuse_unknown(options, known, name)


def refuse_unknown(options: Iterable[str], known: list[str], name: str) -> None:
    """The first option not in `known` as one line naming the closest known one (or all of them)."""
    for option in options:
        if option not in known:
            close = difflib.get_close_matches(option, known, n=1)
            hint = f": did you mean {close[0]!r}?" if close else f" (the options: {', '.join(known)})"
            raise FinetuneError(f"unknown option {option!r} for {name}{hint}")


@contextlib.contextmanager
def interrupt_stops(stop: threading.Event):
    """While training: the first SIGINT (Ctrl-C, a notebook's interrupt button) sets `stop`, the second
    raises KeyboardInterrupt. Only in the main thread (the only one Python delivers signals to), and the
    handler that was there before is put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print("\n" + STOP_MESSAGE, file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        # None: a handler not installed from Python, which cannot be put back; Python's default then
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def _dataset_folder(data: str, consumer: TerminalProgress | None) -> str:
    from .archive import dataset_folder

    return dataset_folder(data, consumer.write if consumer is not None else None)


def _lines(progress: bool) -> Callable[[str], None] | None:
    """Where progress lines of the doctor and the like go: the cell's output in a notebook, else stderr."""
    if not progress:
        return None
    stream = (lambda: sys.stdout) if in_notebook() else (lambda: sys.stderr)
    return lambda line: print(shown(line), file=stream(), flush=True)


# ---------------------------------------------------------------------------------------------
# A trained model, and a run


class Model:
    """A trained classifier: predict, explain and export. `finetune.load` gives a Run for a run folder
    and a Model for a plain weights file (a classic model.pth with its class_indices.json), which has no
    run behind it: no metrics, status or configuration, and nothing to evaluate against its split."""

    def __init__(self, path: str | os.PathLike, predictor: Predictor):
        self.path = Path(path)
        self._predictor = predictor

    @property
    def predictor(self) -> Predictor:
        """The model loaded (once) with its classes, preprocessing and calibration."""
        return self._predictor

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    @property
    def arch(self) -> str:
        return self.predictor.arch

    def predict(
        self, images: Any, top_k: int = 3, min_confidence: float | None = None, batch_size: int = 64
    ) -> list[Prediction]:
        """Predictions for image files, folders (searched recursively) and PIL images, one or a list, in
        the order given (a folder's images sorted). Each has .label (the best guess), .confidence
        (calibrated), .unknown (below `min_confidence`, default the run's suggestion from validation;
        .answer is then "unknown"), .top (the top_k (class, probability) pairs) and .error (an unreadable
        file: the other fields are empty)."""
        from PIL import Image

        from .data import list_images
        from .predict import Prediction

        predictor = self.predictor
        threshold = predictor.min_confidence(min_confidence)
        slots: list = []  # a Path to predict in a batch, a PIL image, or a finished Prediction
        for item in _as_list(images):
            if isinstance(item, Image.Image):
                slots.append(item)
            elif isinstance(item, (str, os.PathLike)):
                skipped: list[tuple[str, str]] = []
                slots.extend(list_images([Path(item)], skipped))
                slots.extend(Prediction(name, error=reason) for name, reason in skipped)
            else:
                raise FinetuneError(f"cannot predict a {type(item).__name__}: give image files, folders or PIL images")
        paths = [slot for slot in slots if isinstance(slot, Path)]
        batched = iter(
            predictor.predict_paths(paths, top_k=top_k, batch_size=batch_size, min_confidence=threshold)
            if paths
            else []
        )
        results = []
        for number, slot in enumerate(slots):
            if isinstance(slot, Path):
                results.append(next(batched))
            elif isinstance(slot, Image.Image):
                prediction = predictor.predict_one(slot, top_k=top_k, min_confidence=threshold)
                prediction.path = getattr(slot, "filename", "") or f"<image {number}>"
                results.append(prediction)
            else:
                results.append(slot)
        return results

    def explain(self, image: str | os.PathLike | Image.Image, target_class: str | int | None = None) -> Image.Image:
        """A Grad-CAM overlay: the image (at its own size) tinted where it made the model say
        `target_class` (default: the predicted class)."""
        from .explain import explain_image

        # a path of any kind as a Path: explain_image reads str and Path, and would take another for an image
        path_or_image = Path(image) if isinstance(image, (str, os.PathLike)) else image
        return explain_image(self.predictor, path_or_image, target_class).overlay

    def export(self, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
        """The model as ONNX ("onnx") or TorchScript ("torchscript"), with its classes, preprocessing and
        calibration inside; returns the file (default: beside the weights)."""
        from .export import SUFFIXES, check_format, export_predictor

        check_format(fmt)
        target = Path(out) if out is not None else self.path.with_name(self.path.stem + SUFFIXES[fmt])
        if out is None and target.exists():  # the weights' folder is the user's, not a run's: nothing replaced
            raise FinetuneError(f"{target} exists already: give out= to write the export elsewhere (or over it)")
        return export_predictor(self._cpu_predictor(), fmt, target)

    def _cpu_predictor(self) -> Predictor:
        from .predict import Predictor

        p = self.predictor
        return Predictor(
            _cpu_copy(p.model),
            p.classes,
            p.arch,
            p.image_size,
            p.transform_mean,
            p.transform_std,
            "cpu",
            source=p.source,
            temperature=p.temperature,
            suggested_min_confidence=p.suggested_min_confidence,
        )

    def evaluate(self, data: str | os.PathLike, **options: Any) -> Evaluation:
        raise FinetuneError(
            f"{self.path} is a plain weights file, not a run: evaluation needs a run folder (its "
            f"split tells held-out images from training ones, its folder keeps the report); "
            f"predict, explain and export work"
        )

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, arch={self.arch!r}, classes={len(self.classes)})"

    def _repr_html_(self) -> str:
        return _summary_html(
            f"model {self.path.name}",
            [("architecture", self.arch), ("weights", str(self.path)), ("classes", _class_list(self.classes))],
        )


class Run(Model):
    """A run folder: the model it trained (loaded once, when first needed) and what it recorded.

    .path, .status ("completed", "stopped", "early-stopped", "failed", "running", or "ended
    unexpectedly": run.json says running but its processes are gone), .classes, .metrics
    (the final validation metrics, metrics.json), .config (its TrainConfig), .history (one record per
    epoch); predict, evaluate, export and explain."""

    def __init__(self, path: str | os.PathLike, device: str = "auto"):
        from .rundir import RunDir

        self.path = Path(path).expanduser()
        self.device = device
        self._run = RunDir(self.path)
        self._run.require_info()  # a one-line error for a folder that is not a run
        self._loaded: Predictor | None = None  # on first use (Model's _predictor is never None)

    @property
    def info(self) -> RunInfo:
        """run.json as it is now."""
        return self._run.info()

    @property
    def name(self) -> str:
        return self.path.name

    # run.json may come from anyone (a run folder shared as a zip): a field of the wrong type reads
    # as missing here, and the model itself is checked when it is loaded (Predictor.from_run)
    @property
    def status(self) -> str:
        return self._run.status()

    @property
    def classes(self) -> list[str]:
        classes = self.info.get("classes")
        return [str(name) for name in classes] if isinstance(classes, list) else []

    @property
    def arch(self) -> str:
        return _text(self.info.get("arch"), "?")

    @property
    def config(self) -> TrainConfig:
        config = self.info.get("config")
        if not isinstance(config, dict):
            raise FinetuneError(f"{self._run.info_path} holds no training configuration")
        return TrainConfig.from_dict(config)

    @property
    def history(self) -> list[dict]:
        history: object = self.info.get("history")  # as written, whatever its type (see above)
        return [record for record in history if isinstance(record, dict)] if isinstance(history, list) else []

    @property
    def metrics(self) -> dict:
        """The best model's metrics on the validation split ({} until the training has ended)."""
        if not self._run.metrics_path.is_file():
            return {}
        return self._run.metrics()

    @property
    def predictor(self) -> Predictor:
        if self._loaded is None:
            from .predict import Predictor

            self._loaded = Predictor.from_run(self.path, self.device)
        return self._loaded

    def evaluate(self, data: str | os.PathLike, **options: Any) -> Evaluation:
        """The model on another labelled folder or .zip (its test/ or val/ split if it has one): metrics,
        confusion matrix and calibration report, written to RUN/eval-<data>-<time> (or out=). Options:
        min_confidence, batch_size, out, held_out_only (leave out images the run trained on)."""
        from .evaluate import evaluate_run

        check_options(options, evaluate_run, "Run.evaluate", taken=("run", "data", "predictor", "device", "log"))
        return evaluate_run(self.path, os.fspath(data), predictor=self.predictor, **options)

    def export(self, fmt: str = "onnx", out: str | os.PathLike | None = None) -> Path:
        """The model as ONNX ("onnx") or TorchScript ("torchscript"), with its classes, preprocessing and
        calibration inside; returns the file (default: model.onnx / model.torchscript.pt in the run).
        "hf": the Hugging Face model folder (weights, config.json, model card; default RUN/hf)."""
        from .export import export

        if fmt == "hf":
            from .hub import export_hf

            return export_hf(self.path, Path(out) if out is not None else None)
        return export(self.path, fmt, Path(out) if out else None)

    def __repr__(self) -> str:
        accuracy = _number(_dict(self.info.get("summary")).get("accuracy"))
        shown_accuracy = f", accuracy={accuracy}" if accuracy != "?" else ""
        return f"Run({str(self.path)!r}, status={self.status!r}{shown_accuracy}, classes={len(self.classes)})"

    def _repr_html_(self) -> str:
        info = self.info
        summary = _dict(info.get("summary"))
        strategy = _text(info.get("strategy") or _dict(info.get("config")).get("strategy"), "?")
        rows = [("status", self._run.status_text(info)), ("model", f"{self.arch} / {strategy}")]
        if "accuracy" in summary:
            rows.append(
                (
                    "val accuracy",
                    (
                        f"{_number(summary['accuracy'])} (balanced "
                        f"{_number(summary.get('balanced_accuracy'))}, macro F1 "
                        f"{_number(summary.get('macro_f1'))}) on "
                        f"{_number(summary.get('num_images'), '')} images"
                    ),
                )
            )
        suggested = _dict(info.get("calibration")).get("suggested_min_confidence")
        if suggested is not None:
            rows.append(("min confidence", f"{_number(suggested, '.2f')} (suggested from validation)"))
        if info.get("error"):
            rows.append(("error", str(info["error"])))
        rows.append(("classes", _class_list(self.classes)))
        rows.append(("folder", str(self.path)))
        return _summary_html(f"run {self.name}", rows, self._run.confusion_matrix)


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _text(value: Any, default: str) -> str:
    return value if isinstance(value, str) else default


def _number(value: Any, spec: str = ".4f") -> str:
    """A number of run.json formatted, or "?" for anything else (a string, a list: written by hand)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return format(value, spec)


def _as_list(images: Any) -> list:
    from PIL import Image

    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    if isinstance(images, Iterable):
        return list(images)
    raise FinetuneError(f"cannot predict a {type(images).__name__}: give image files, folders or PIL images")


def _cpu_copy(model):
    import copy

    return copy.deepcopy(model).cpu().float()


def _class_list(classes: list[str], limit: int = 20) -> str:
    more = f" and {len(classes) - limit} more" if len(classes) > limit else ""
    return f"{len(classes)}: " + ", ".join(classes[:limit]) + more


def _summary_html(title: str, rows: list[tuple[str, str]], image: Path | None = None) -> str:
    """A small table and, when there is one, the confusion matrix inline. Every string is escaped: class
    and folder names come from whoever made the data."""
    cells = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(k)}</th>"
        f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
        for k, v in rows
    )
    png = _run_png(image) if image is not None else None
    picture = ""
    if png is not None:
        encoded = base64.b64encode(png).decode("ascii")
        picture = (
            f"<img src='data:image/png;base64,{encoded}' alt='confusion matrix' "
            f"style='max-width:100%;max-height:480px'>"
        )
    return f"<div><b>{html.escape(title)}</b><table>{cells}</table>{picture}</div>"


MAX_INLINE_PNG = 8 * 1024 * 1024  # a confusion matrix of hundreds of classes is a few MB
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run_png(path: Path) -> bytes | None:
    """The bytes of a PNG the run wrote, or None. A run folder may come from a stranger: a link (to
    ~/.ssh/id_rsa, say) would put another file into the notebook, which is then saved and shared; a
    FIFO would block the kernel; a huge file would fill the page. Only a plain file is read."""
    from .fsutil import NotRegularFile, open_regular

    try:
        if path.is_symlink():
            return None
        with open_regular(path) as file:
            data = file.read(MAX_INLINE_PNG + 1)
    except (OSError, NotRegularFile):
        return None
    return data if len(data) <= MAX_INLINE_PNG and data.startswith(PNG_SIGNATURE) else None


# ---------------------------------------------------------------------------------------------
# Loading, scanning, the doctor


def load(
    path: str | os.PathLike,
    classes: str | os.PathLike | list[str] | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
) -> Model:
    """A run folder -> Run. A folder `finetune export --format hf` wrote (config.json, model.safetensors)
    -> Model. A classic weights file (a torchvision ResNet state_dict .pth), or a folder that
    holds model.pth without run.json -> Model: its classes from `classes` (a class_indices.json, or the
    names in index order), else the class_indices.json beside it; `arch` (a name of the architectures table) is read
    from the weights when not given; `image_size` defaults to 224."""
    source = Path(path).expanduser()
    if source.is_dir() and (source / "run.json").is_file():
        if classes is not None or arch is not None or image_size is not None:
            raise FinetuneError(f"{source} is a run folder: its classes, architecture and image size are its own")
        return Run(source, device=device)
    if source.is_dir() and (source / "config.json").is_file() and not (source / "model.pth").is_file():
        if classes is not None or arch is not None or image_size is not None:
            raise FinetuneError(f"{source} is an exported model folder: its config.json says its classes and sizes")
        from .predict import Predictor

        return Model(source / "model.safetensors", Predictor.from_hf_folder(source, device))
    if source.is_dir():
        if not (source / "model.pth").is_file():
            raise FinetuneError(f"not a run folder (no run.json) and no model.pth in it: {source}")
        source = source / "model.pth"
    elif not source.exists():
        raise FinetuneError(f"model not found: {source}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or not 32 <= image_size <= 1024
    ):
        raise FinetuneError(f"image_size must be a whole number from 32 to 1024, got {image_size!r}")
    return Model(source, _weights_predictor(source, classes, arch, image_size or 224, device))


def _weights_predictor(weights: Path, classes, arch: str | None, image_size: int, device: str) -> Predictor:
    from .model import load_classifier, safe_load, state_dict_from
    from .predict import Predictor, read_class_indices

    if isinstance(classes, (list, tuple)):
        names = [str(name) for name in classes]
    else:
        names = read_class_indices(Path(classes) if classes is not None else weights.with_name("class_indices.json"))
    state = state_dict_from(safe_load(weights, "model"), weights)
    if arch is None:
        arch = infer_arch(state, weights)
    else:
        architecture(arch)  # an unknown name: the one line naming the choices
    model = load_classifier(arch, state, len(names), str(weights))
    return Predictor(model, names, arch, image_size, device=device, source=str(weights))


def infer_arch(state: dict, source: Path) -> str:
    """The architecture in the table whose layers have exactly these keys."""
    from .architectures import ARCHITECTURES, infer_architecture

    found = infer_architecture(state)
    if found is None:
        names = " nor ".join(f"a {name}" for name in ARCHITECTURES)
        raise FinetuneError(f"{source} is neither {names} state_dict: give arch=")
    return found.name


def runs(runs_dir: str | os.PathLike | None = None) -> RunsTable:
    """Every run of a runs folder (default: $FINETUNE_RUNS_DIR, else ./runs), newest first: what
    `finetune runs` prints. `.rows` (name, data, arch, strategy, weights, epochs, best_val_acc, macro_f1,
    ece, images, seconds, status; None where the run does not say), `.text()`, `.to_dict()`; folders
    without run.json are in `.skipped`, a run.json that cannot be read is a row of status "unreadable"."""
    from .paths import default_runs_dir
    from .runtable import runs_table

    return runs_table(default_runs_dir() if runs_dir is None else os.fspath(runs_dir))


def scan(
    data: str | os.PathLike,
    val_fraction: float = default_of("val_fraction"),
    seed: int = default_of("seed"),
    labels: str | os.PathLike | None = None,
) -> DatasetScan:
    """The data report of a folder (or .zip) as training would see it: classes, the train/val(/test)
    split, skipped files and warnings. In a notebook it shows as the report; `.report()` is the text.
    `labels`: a CSV of path,label[,split] rows for a flat folder of images."""
    from .data import scan_dataset

    root = _dataset_folder(os.fspath(data), None)
    return scan_dataset(root, val_fraction, seed, labels=os.fspath(labels) if labels is not None else None)


def doctor(data: str | os.PathLike, *, progress: bool = True, **options: Any) -> DoctorReport:
    """The data doctor's findings on a folder (or .zip): likely label errors, duplicates leaking between
    splits, odd images. Options as finetune.data_doctor.run_doctor (run=, arch=, weights=, image_size=, folds=,
    cache_dir= (default: the shared feature cache), ...). `.summary_text()` is the command line's report."""
    from .data_doctor import default_cache_dir, run_doctor

    check_options(options, run_doctor, "finetune.doctor", taken=("data", "log"))
    options.setdefault("cache_dir", default_cache_dir())
    log = _lines(progress)
    return run_doctor(_dataset_folder(os.fspath(data), None), log=log, **options)

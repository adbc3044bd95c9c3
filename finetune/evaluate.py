"""Metrics (scikit-learn), the confusion matrix and training-curve plots (matplotlib), and the
evaluation of a trained run on another labelled folder (`evaluate_run`, shared by the command line
and the Python API)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from .config import FinetuneError
from .events import EpochRecord
from .fsutil import write_atomic, write_text_atomic


def compute_metrics(targets, probs, classes: list[str], paths: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, top-k, per-class P/R/F1/support, confusion matrix, misclassified.

    Confusion matrix rows are true classes, columns predictions (scikit-learn's convention).
    """
    from sklearn.metrics import (
        accuracy_score,
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    targets = np.asarray(targets, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(classes)
    labels = list(range(n))
    if len(targets) == 0:
        return {"num_images": 0, "classes": classes}
    preds = probs.argmax(axis=1)
    present = sorted(set(targets.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(targets, preds, labels=labels, zero_division=0)
    metrics = {
        "num_images": int(len(targets)),
        "accuracy": float(accuracy_score(targets, preds)),
        # over the classes that have images here (a class absent from val has no recall to average)
        "balanced_accuracy": float(np.mean([recall[i] for i in present])),
        "top_k_accuracy": {},
        "classes": classes,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "macro_f1": float(np.mean([f1[i] for i in present])),
        "confusion_matrix": confusion_matrix(targets, preds, labels=labels).tolist(),
    }
    if len(present) > 1:
        metrics["balanced_accuracy"] = float(balanced_accuracy_score(targets, preds))
    metrics["top_k_accuracy"]["1"] = metrics["accuracy"]
    for k in (3, 5):
        if k < n:  # top-k with k >= number of classes is always 1: not worth reporting
            metrics["top_k_accuracy"][str(k)] = float(top_k_accuracy_score(targets, probs, k=k, labels=labels))
    if paths is not None:
        metrics["misclassified"] = [
            {
                "path": paths[i],
                "true": classes[targets[i]],
                "predicted": classes[preds[i]],
                "confidence": float(probs[i, preds[i]]),
            }
            for i in np.flatnonzero(preds != targets)
        ]
        metrics["misclassified"].sort(key=lambda m: -m["confidence"])
    return metrics


def summary_line(metrics: dict) -> str:
    if not metrics.get("num_images"):
        return "no images to evaluate"
    parts = [f"accuracy {metrics['accuracy']:.4f}", f"balanced accuracy {metrics['balanced_accuracy']:.4f}"]
    parts += [f"top-{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items() if k != "1"]
    parts.append(f"macro F1 {metrics['macro_f1']:.4f}")
    return f"{metrics['num_images']} images: " + ", ".join(parts)


def per_class_table(metrics: dict) -> str:
    width = max([len(c) for c in metrics["classes"]] + [5])
    lines = ["  " + "class".ljust(width) + "  precision  recall      f1  support"]
    for name, m in metrics["per_class"].items():
        lines.append(
            f"  {name.ljust(width)}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:6.3f}  {m['support']:7d}"
        )
    return "\n".join(lines)


def plot_confusion_matrix(matrix, classes: list[str], path: Path, title: str = "Confusion matrix") -> Path:
    """Counts and row-normalised side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    n = len(classes)
    size = max(4.0, 0.5 * n + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), constrained_layout=True)
    for ax, data, label, fmt in ((axes[0], counts, "counts", "d"), (axes[1], normalised, "row-normalised", ".2f")):
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=(1.0 if fmt != "d" else max(1, data.max())))
        ax.set_title(f"{title} ({label})")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        if n <= 30:
            threshold = data.max() / 2 if data.max() else 0.5
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        format(data[i, j], fmt),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if data[i, j] > threshold else "black",
                    )
        fig.colorbar(im, ax=ax, shrink=0.8)
    write_atomic(path, lambda sink: fig.savefig(sink, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_history(history: list[EpochRecord], path: Path) -> Path:
    """Loss and accuracy per epoch, train and val."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for label, losses, accuracies in (
        ("train", [h["train_loss"] for h in history], [h["train_acc"] for h in history]),
        ("val", [h["val_loss"] for h in history], [h["val_acc"] for h in history]),
    ):
        loss_ax.plot(epochs, losses, marker="o", label=label)
        acc_ax.plot(epochs, accuracies, marker="o", label=label)
    loss_ax.set(title="loss", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.02))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    write_atomic(path, lambda sink: fig.savefig(sink, format="png", dpi=110))
    plt.close(fig)
    return path


def write_reports(out_dir: Path, metrics: dict, prefix: str = "") -> None:
    """metrics.json, confusion_matrix.png (rows = true class, columns = predicted), per_class.csv and,
    when the metrics name the images, misclassified.csv (most confident mistakes first)."""
    from .csvfile import number, write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{prefix}metrics.json", json.dumps(metrics, indent=2))
    if metrics.get("num_images"):
        plot_confusion_matrix(
            metrics["confusion_matrix"], metrics["classes"], out_dir / f"{prefix}confusion_matrix.png"
        )
        write_csv(
            out_dir / f"{prefix}per_class.csv",
            ["class", "precision", "recall", "f1", "support"],
            (
                [
                    name,
                    number(m["precision"], ".4f"),
                    number(m["recall"], ".4f"),
                    number(m["f1"], ".4f"),
                    int(m["support"]),
                ]
                for name, m in metrics["per_class"].items()
            ),
        )
    if "misclassified" in metrics:
        write_csv(
            out_dir / f"{prefix}misclassified.csv",
            ["path", "true", "predicted", "confidence"],
            ([m["path"], m["true"], m["predicted"], number(m["confidence"], ".6f")] for m in metrics["misclassified"]),
        )


@torch.inference_mode()
def predict_logits(model, loader, device: torch.device, amp_dtype=None, channels_last=False):
    """(logits as float32, targets) as numpy arrays over a DataLoader of (images, labels).

    Logits, not probabilities: a float32 softmax saturates to exact 0 and 1 for a confident model,
    and the temperature fitted afterwards needs what the softmax threw away."""
    all_logits, all_targets = [], []
    model.eval()
    for images, targets in loader:
        images = images.to(device, non_blocking=device.type == "cuda")  # pinned memory on CUDA only
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(torch.as_tensor(targets).cpu())  # a cache on the GPU keeps its labels there
    if not all_logits:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy()


# ---------------------------------------------------------------------------------------------
# A run evaluated on a labelled folder


@dataclass
class Evaluation:
    """What `evaluate_run` found and wrote. `overlap`: how many of the folder's images were in the run's
    training split (None when the run has no readable split.json); `warning`: the line that says the
    score is not held out, when some were and were evaluated."""

    metrics: dict  # as written to metrics.json
    out: Path  # the report folder
    confusion_matrix: Path
    data: str  # the folder whose images were evaluated (the extraction, for a .zip)
    overlap: int | None
    held_out_only: bool = False
    warning: str | None = None

    def summary_text(self) -> str:
        """The report as the command line prints it."""
        from .calibrate import held_out_line

        lines = [self.warning] if self.warning else []
        if self.held_out_only and self.overlap:
            lines.append(f"held out only: left out the {self.overlap} images that were in this run's training split")
        lines.append(summary_line(self.metrics))
        if "calibration" in self.metrics:
            lines.append(held_out_line(self.metrics["calibration"]))
        lines.append(per_class_table(self.metrics))
        lines.append(f"wrote {self.out / 'metrics.json'} and {self.confusion_matrix}")
        return "\n".join(lines)


def _data_key(root: Path, hint: tuple[str, str] | None = None) -> tuple[str, Path]:
    """(archive sha256 or "", path) naming where a data root's files come from. A root inside an extracted
    zip is known by the archive's hash and its path inside the extraction, so the same zip extracted again
    elsewhere (the studio's workspace, another cache) still matches; any other folder by its resolved path.
    `hint` (an extraction's folder name, its sha256) recognises a root whose extraction was removed since."""
    from .archive import read_extraction

    extraction = read_extraction(root)
    if extraction is not None and root.is_relative_to(extraction.folder):
        return extraction.sha256, root.relative_to(extraction.folder)
    if hint is not None and hint[0] in root.parts:
        at = len(root.parts) - 1 - root.parts[::-1].index(hint[0])
        return hint[1], Path(*root.parts[at + 1 :])
    return "", root


def in_training_split(run, root: str | Path, rels: list[str]) -> set[str] | None:
    """The paths of `rels` (relative to `root`) that were in the training split of `run` (a RunDir),
    matched by file location: the same folder, the run's own data folder or one of its splits, or the
    same zip extracted again. None when the run has no readable split."""
    from .archive import read_extraction

    try:
        split = run.read_split()
    except FinetuneError:
        return None
    root = Path(root).resolve()
    extraction = read_extraction(root)
    hint = (extraction.folder.name, extraction.sha256) if extraction is not None else None
    key, inside = _data_key(root, hint)
    train_key, train_inside = _data_key(Path(split.root), hint)
    # pool images a curation added: in the split by their absolute paths (curation.added_item)
    pooled = {Path(rel) for rel, _ in split.train if os.path.isabs(rel)}
    from_pools = {rel for rel in rels if root / rel in pooled}
    if key != train_key:
        return from_pools
    trained = {train_inside / rel for rel, _ in split.train}
    return from_pools | {rel for rel in rels if inside / rel in trained}


def check_report_folder(folder: Path, root: str | Path) -> None:
    """FinetuneError when an evaluation report asked for at `folder` (--out) would change what is not
    an evaluation's: the data folder (`root`) or anything in it, a run folder (its own metrics.json
    and reports would be replaced: this run's, or another's), a file."""
    resolved = folder.resolve()
    if resolved.is_relative_to(Path(root).resolve()):  # nothing is ever written into the user's data
        raise FinetuneError(f"refusing to write the report into the data folder {root}: choose --out outside it")
    if folder.exists() and not folder.is_dir():
        raise FinetuneError(f"--out {folder} is a file, not a folder: choose a new folder")
    if (resolved / "run.json").exists():
        raise FinetuneError(
            f"refusing to write the report into the run folder {folder}: its own metrics.json "
            f"and reports would be replaced; choose --out elsewhere (by default a new eval-... "
            f"folder inside the run)"
        )


def evaluate_run(
    run: str | Path,
    data: str | Path,
    *,
    min_confidence: float | None = None,
    batch_size: int = 64,
    device: str = "auto",
    out: str | Path | None = None,
    held_out_only: bool = False,
    predictor=None,
    log: Callable[[str], None] | None = None,
    labels: str | Path | None = None,
) -> Evaluation:
    """A trained run on a labelled folder or .zip (its test/ or val/ split if it has one): calibrated
    metrics, the calibration report at `min_confidence` (default: the run's suggestion), and the report
    folder `out` (default RUN/eval-<data>-<time>) with metrics.json, confusion_matrix.png, per_class.csv,
    misclassified.csv. Images that were in the run's training split are counted (and, with
    `held_out_only`, left out). `predictor`: the run's model already loaded (a Predictor); `log` gets
    the extraction's and the skipped files' lines. `labels`: a CSV of path,label[,split] rows for a
    flat folder (its test rows, else val rows, else all)."""
    from .archive import dataset_folder
    from .calibrate import held_out_report, softmax
    from .data import scan_labelled_folder
    from .predict import Predictor
    from .rundir import RunDir

    run_dir = RunDir(Path(run).expanduser())
    if predictor is None:
        predictor = Predictor.from_run(run_dir.path, device)
    threshold = predictor.min_confidence(min_confidence)  # a bad value is refused before the long part
    root, items, skipped = scan_labelled_folder(dataset_folder(data, log), predictor.classes, labels)
    if log is not None:
        for rel, reason in skipped:
            log(f"skipped {rel}: {reason}")
    default = f"eval-{Path(root).name}-{datetime.now():%Y%m%d-%H%M%S}"
    folder = Path(out).expanduser() if out else run_dir.path / default
    if out:
        check_report_folder(folder, root)
    items, overlap, warning = _held_out(run_dir, root, items, held_out_only)
    logits = _logits_of(predictor, root, items, batch_size)
    targets = [label for _, label in items]
    metrics = compute_metrics(
        targets, softmax(logits, predictor.temperature), predictor.classes, [rel for rel, _ in items]
    )
    metrics["data"] = root
    metrics["skipped"] = skipped
    metrics["training_overlap"] = overlap  # images of the folder in the run's training split (None: unknown)
    metrics["held_out_only"] = held_out_only  # those left out of the metrics
    metrics["calibration"] = held_out_report(logits, targets, predictor.temperature, threshold)
    _write_evaluation(folder, metrics)
    matrix = folder / "confusion_matrix.png"
    return Evaluation(metrics, folder, matrix, root, overlap, held_out_only, warning)


def _logits_of(predictor, root: str, items: list[tuple[str, int]], batch_size: int) -> np.ndarray:
    """(images, classes) logits of the images at `root`/rel."""
    predictions = predictor.predict_paths(
        [Path(root, rel) for rel, _ in items], top_k=1, batch_size=batch_size, keep_logits=True
    )
    # an unreadable image (rare: the scan decoded each one) counts as a uniform answer
    return np.array([p.logits or [0.0] * len(predictor.classes) for p in predictions]).reshape(
        len(items), len(predictor.classes)
    )


def _held_out(
    run_dir, root: str | Path, items: list[tuple[str, int]], held_out_only: bool
) -> tuple[list[tuple[str, int]], int | None, str | None]:
    """The items to evaluate (with `held_out_only`, those not in the training split of run_dir, a
    RunDir), how many of all were in it (None: unknown, no readable split.json), and the warning when
    the score is not held out."""
    trained = in_training_split(run_dir, root, [rel for rel, _ in items])
    overlap = None if trained is None else len(trained)
    warning = None
    if held_out_only:
        if trained is None:
            raise FinetuneError(
                f"{run_dir.path} has no readable split.json: which images it was trained on is "
                f"unknown, so none can be called held out"
            )
        total = len(items)
        items = [item for item in items if item[0] not in trained]
        if not items:
            raise FinetuneError(
                f"all {total} images of {root} were in the training split of {run_dir.name}: none are held out"
            )
    elif overlap == len(items):
        warning = f"warning: all {overlap} images were in this run's training split: the score is not held out"
    elif overlap:
        warning = (
            f"warning: {overlap} of {len(items)} images were in this run's training split: the score is not "
            f"held out; --held-out-only evaluates the other {len(items) - overlap}"
        )
    return items, overlap, warning


def _write_evaluation(folder: Path, metrics: dict) -> None:
    """The report folder's files; a full disk or an unwritable folder is one line."""
    try:
        write_reports(folder, metrics)
    except OSError as error:
        from .fsutil import disk_full

        raise (
            disk_full(error, folder) or FinetuneError(f"cannot write the report to {folder}: {error.strerror or error}")
        ) from None

"""Metrics (scikit-learn), the confusion matrix and training-curve plots (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .fsutil import write_atomic, write_text_atomic


def compute_metrics(targets, probs, classes: list[str], paths: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, top-k, per-class P/R/F1/support, confusion matrix, misclassified.

    Confusion matrix rows are true classes, columns predictions (scikit-learn's convention).
    """
    from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                                 precision_recall_fscore_support, top_k_accuracy_score)

    targets = np.asarray(targets, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    n = len(classes)
    labels = list(range(n))
    if len(targets) == 0:
        return {"num_images": 0, "classes": classes}
    preds = probs.argmax(axis=1)
    present = sorted(set(targets.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=labels, zero_division=0
    )
    metrics = {
        "num_images": int(len(targets)),
        "accuracy": float(accuracy_score(targets, preds)),
        # over the classes that have images here (a class absent from val has no recall to average)
        "balanced_accuracy": float(np.mean([recall[i] for i in present])),
        "top_k_accuracy": {},
        "classes": classes,
        "per_class": {
            name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
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
            {"path": paths[i], "true": classes[targets[i]], "predicted": classes[preds[i]],
             "confidence": float(probs[i, preds[i]])}
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
        lines.append(f"  {name.ljust(width)}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:6.3f}"
                     f"  {m['support']:7d}")
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
                    ax.text(j, i, format(data[i, j], fmt), ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] > threshold else "black")
        fig.colorbar(im, ax=ax, shrink=0.8)
    write_atomic(path, lambda sink: fig.savefig(sink, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train and val."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        loss_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        acc_ax.plot(epochs, [h[key] for h in history], marker="o", label=label)
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
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["classes"],
                              out_dir / f"{prefix}confusion_matrix.png")
        write_csv(out_dir / f"{prefix}per_class.csv", ["class", "precision", "recall", "f1", "support"],
                  ([name, number(m["precision"], ".4f"), number(m["recall"], ".4f"), number(m["f1"], ".4f"),
                    int(m["support"])] for name, m in metrics["per_class"].items()))
    if "misclassified" in metrics:
        write_csv(out_dir / f"{prefix}misclassified.csv", ["path", "true", "predicted", "confidence"],
                  ([m["path"], m["true"], m["predicted"], number(m["confidence"], ".6f")]
                   for m in metrics["misclassified"]))


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
        all_targets.append(torch.as_tensor(targets))
    if not all_logits:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64)
    return torch.cat(all_logits).numpy(), torch.cat(all_targets).numpy()

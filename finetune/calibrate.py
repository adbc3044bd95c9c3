"""Temperature scaling, calibration error, and an honest "unknown" below a confidence threshold.

A network trained with cross-entropy is usually over- or under-confident: its top probability is
not the chance that it is right. One scalar temperature T, fitted on the validation set (logits / T
before the softmax), fixes most of that without changing any prediction (Guo et al., 2017).

The suggested `min_confidence` comes from validation too: the calibrated confidence below which
only `MISS_RATE` (5 %) of the correctly answered validation images lie. So on data like the
validation set, about 95 % of the right answers are still given, and images unlike any class
(which tend to get flatter probabilities) more often fall under it and are answered "unknown".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import overload

import numpy as np

from .fsutil import write_atomic

UNKNOWN = "unknown"
UNKNOWN_INDEX = -1
ECE_BINS = 15
MISS_RATE = 0.05  # share of correct validation answers the suggested threshold may turn into "unknown"
T_BOUNDS = (0.05, 20.0)  # a temperature outside this says the logits are degenerate, not miscalibrated
THRESHOLD_RULE = (
    f"the calibrated confidence below which {MISS_RATE:.0%} of the correctly classified validation images lie"
)


class NonFiniteLogits(ValueError):
    """Logits with nan or inf in them: no temperature fitted on them would mean anything."""


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    return np.exp(_log_softmax(np.asarray(logits, dtype=np.float64) / temperature))


def nll(logits, targets, temperature: float = 1.0) -> float:
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 0.0
    log_p = _log_softmax(logits / temperature)
    return float(-log_p[np.arange(len(targets)), targets].mean())


def fit_temperature(logits, targets) -> float:
    """The T > 0 minimising the validation NLL of softmax(logits / T): a bounded 1-D search on log T
    (convex in 1/T, so the minimum found is the minimum)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0 or logits.ndim != 2 or logits.shape[1] < 2:
        return 1.0
    if (logits.argmax(axis=1) == targets).all():
        # no mistake to calibrate against: the NLL only falls as T -> 0, and a sharpened model would
        # answer everything, noise included, with a confidence of exactly 1
        return 1.0
    low, high = (math.log(b) for b in T_BOUNDS)
    result = minimize_scalar(
        lambda log_t: nll(logits, targets, math.exp(log_t)),
        bounds=(low, high),
        method="bounded",
        options={"xatol": 1e-4},
    )
    temperature = float(math.exp(result.x))
    # keep T = 1 unless scaling really helps: a flat objective must not move the probabilities
    return temperature if nll(logits, targets, temperature) < nll(logits, targets) - 1e-9 else 1.0


def expected_calibration_error(probs, targets, bins: int = ECE_BINS) -> float:
    """Top-label ECE: over equal-width confidence bins, the image-weighted |accuracy - confidence|."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 0.0
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(targets))


def _bin_stats(probs: np.ndarray, targets: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == targets
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    accuracy = np.bincount(which, weights=correct, minlength=bins) / np.maximum(counts, 1)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(counts, 1)
    return counts, accuracy, mean_conf


def reliability_plot(probs_before, probs_after, targets, path: str | Path, bins: int = ECE_BINS) -> Path:
    """Accuracy against confidence per bin, before and after scaling, with each ECE in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = np.asarray(targets, dtype=np.int64)
    width = 1.0 / bins
    centres = np.linspace(0, 1, bins + 1)[:-1] + width / 2
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), constrained_layout=True, sharey=True)
    for ax, probs, title in ((axes[0], probs_before, "before"), (axes[1], probs_after, "after temperature scaling")):
        probs = np.asarray(probs, dtype=np.float64)
        counts, accuracy, _ = _bin_stats(probs, targets, bins)
        shown = counts > 0
        ax.bar(
            centres[shown], accuracy[shown], width=width * 0.95, color="tab:blue", edgecolor="black", label="accuracy"
        )
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ece = expected_calibration_error(probs, targets, bins)
        ax.set(title=f"{title} (ECE {ece:.3f})", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
        for x, n in zip(centres[shown], counts[shown], strict=True):
            ax.text(x, 0.02, str(n), ha="center", fontsize=7, rotation=90, color="white")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    path = Path(path)
    write_atomic(path, lambda sink: fig.savefig(sink, format="png", dpi=110))
    plt.close(fig)
    return path


def suggest_threshold(calibrated, targets, miss_rate: float = MISS_RATE) -> float:
    """A `min_confidence` from validation (see THRESHOLD_RULE); 0 (never unknown) without correct answers.

    At least 1 / number of classes: no top probability is lower, so that is where "never unknown"
    starts anyway, and the number shown to the user stays meaningful."""
    probs = np.asarray(calibrated, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if len(targets) == 0:
        return 0.0
    correct = probs.argmax(axis=1) == targets
    if not correct.any():
        return 0.0
    threshold = float(np.quantile(probs.max(axis=1)[correct], miss_rate))
    # rounded down: rounding 0.99996 up to 1.0 would turn every answer into unknown
    return math.floor(max(threshold, 1.0 / probs.shape[1]) * 1e4) / 1e4


@overload
def is_unknown(confidence: float, threshold: float) -> bool: ...
@overload
def is_unknown(confidence: np.ndarray, threshold: float) -> np.ndarray: ...
def is_unknown(confidence, threshold):
    """The one "unknown" rule, for a confidence or an array of them: a (calibrated) top probability
    below `threshold`; at the threshold itself the best guess is still the answer."""
    return confidence < threshold


def apply_unknown(probs, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(answers, best guesses, confidences): the answer is the best guess, or UNKNOWN_INDEX (-1)
    where the top probability is unknown by `is_unknown`."""
    probs = np.asarray(probs, dtype=np.float64)
    best, confidence = probs.argmax(axis=1), probs.max(axis=1)
    answers = np.where(is_unknown(confidence, threshold), UNKNOWN_INDEX, best)
    return answers, best, confidence


def coverage(probs, targets, threshold: float) -> dict:
    """What a threshold does on labelled images: share answered, accuracy of those answered."""
    answers, _, _ = apply_unknown(probs, threshold)
    targets = np.asarray(targets, dtype=np.int64)
    answered = answers != UNKNOWN_INDEX
    return {
        "answered": float(answered.mean()) if len(targets) else 0.0,
        "accuracy_answered": float((answers[answered] == targets[answered]).mean()) if answered.any() else 0.0,
    }


def calibrate(logits, targets, plot_path: str | Path | None = None) -> dict:
    """Everything a run records after training, from validation logits (or log-probabilities):
    temperature, ECE and NLL before and after, the suggested min_confidence and what it does.
    NonFiniteLogits when any logit is nan or infinite (the caller skips calibration)."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).reshape(len(logits), -1).any(axis=1).sum())
        raise NonFiniteLogits(f"the model gave nan or infinite outputs for {bad} of {len(logits)} validation images")
    temperature = fit_temperature(logits, targets)
    before, after = softmax(logits), softmax(logits, temperature)
    threshold = suggest_threshold(after, targets)
    record = {
        "temperature": round(temperature, 6),
        # at a bound: validation cannot pin T down (e.g. no mistakes to be calibrated against)
        "temperature_at_bound": bool(min(abs(math.log(temperature / b)) for b in T_BOUNDS) < 1e-3),
        "val_images": int(len(targets)),
        "ece_before": expected_calibration_error(before, targets),
        "ece_after": expected_calibration_error(after, targets),
        "nll_before": nll(logits, targets),
        "nll_after": nll(logits, targets, temperature),
        "suggested_min_confidence": threshold,
        "threshold_rule": THRESHOLD_RULE,
        "at_suggested": coverage(after, targets, threshold),
    }
    if plot_path is not None and len(targets):
        record["plot"] = Path(reliability_plot(before, after, targets, plot_path)).name
    return record


def held_out_report(logits, targets, temperature: float, threshold: float) -> dict:
    """What the run's calibration does on labelled images it was not fitted on: ECE of the raw model
    and of the calibrated one (softmax(logits / temperature)), and what the threshold answers there."""
    logits = np.asarray(logits, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    calibrated = softmax(logits, temperature)
    return {
        "temperature": temperature,
        "ece_raw": expected_calibration_error(softmax(logits), targets),
        "ece_calibrated": expected_calibration_error(calibrated, targets),
        "min_confidence": threshold,
        **coverage(calibrated, targets, threshold),
    }


def held_out_line(report: dict) -> str:
    return (
        f"calibration (temperature {report['temperature']:.3f}): ECE {report['ece_raw']:.3f} raw, "
        f"{report['ece_calibrated']:.3f} calibrated; at min confidence {report['min_confidence']:.2f}, "
        f"{report['answered']:.0%} answered, {report['accuracy_answered']:.1%} of those right"
    )

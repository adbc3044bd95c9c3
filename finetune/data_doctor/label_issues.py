"""Likely label errors: out-of-sample probabilities from a linear probe on the features, ranked by cleanlab."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from .records import Record


def out_of_sample_probs(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """[N, K] probabilities, each image's from a logistic regression that did not see it (K = labels.max()+1;
    every class needs at least 2 images). Folds: at most the size of the smallest class."""
    from sklearn.decomposition import PCA
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    num_classes = int(labels.max()) + 1
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    splits = max(2, min(folds, smallest))
    probs = np.zeros((len(labels), num_classes), dtype=np.float64)
    for fit_idx, held_idx in StratifiedKFold(splits, shuffle=True, random_state=seed).split(features, labels):
        # PCA keeping 99% of the variance: the same probe, several times faster on correlated features
        head = make_pipeline(StandardScaler(), PCA(n_components=0.99), LogisticRegression(C=0.1, max_iter=500))
        with warnings.catch_warnings():  # a probe not fully converged still ranks labels well
            warnings.simplefilter("ignore", ConvergenceWarning)
            head.fit(features[fit_idx], labels[fit_idx])
        probs[np.ix_(held_idx, head.classes_)] = head.predict_proba(features[held_idx])
    return probs


def find_label_issues(
    features: np.ndarray, records: list[Record], classes: list[str], folds: int = 5, seed: int = 0
) -> tuple[list[dict], dict]:
    """Issues {path, split, given, suggested, score} most suspicious first, and facts about the check.

    score: cleanlab's label quality (self-confidence, 0..1): the out-of-sample probability of the
    given class; the lower, the more likely the label is wrong. Classes with fewer than 2 images
    cannot be cross-validated and are left out (they are flagged as small classes anyway)."""
    from ..extras import require

    cleanlab_issues = require("cleanlab.filter").find_label_issues
    get_label_quality_scores = require("cleanlab.rank").get_label_quality_scores

    labels = np.asarray([r.label for r in records], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    usable = np.flatnonzero(counts >= 2)
    info: dict[str, Any] = {"images": 0, "classes": int(len(usable)), "folds": 0, "out_of_sample_accuracy": None}
    if len(usable) < 2:
        return [], info
    rows = np.flatnonzero(np.isin(labels, usable))
    remap = {int(c): i for i, c in enumerate(usable)}
    local = np.asarray([remap[int(v)] for v in labels[rows]], dtype=np.int64)
    probs = out_of_sample_probs(features[rows], local, folds, seed)
    info.update(
        images=int(len(rows)),
        folds=max(2, min(folds, int(counts[usable].min()))),
        out_of_sample_accuracy=float((probs.argmax(axis=1) == local).mean()),
    )
    ranked = cleanlab_issues(local, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(local, probs, method="self_confidence")
    issues = []
    for i in ranked:
        others = probs[i].copy()
        others[local[i]] = -1.0  # the suggestion is another class, even where the given one is argmax
        suggested = int(others.argmax())
        record = records[rows[i]]
        issues.append(
            {
                "path": record.path,
                "split": record.split,
                "given": classes[record.label],
                "suggested": classes[int(usable[suggested])],
                "score": round(float(quality[i]), 6),
                "suggested_probability": round(float(probs[i, suggested]), 6),
            }
        )
    return issues, info

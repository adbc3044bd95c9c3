"""The whole check: scan, features, label issues, duplicates and other problems, in one report."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..config import FinetuneError, default_of
from ..data import DatasetScan, scan_dataset
from .backbone import load_backbone, read_run
from .duplicates import (
    EMBEDDING_SIMILARITY,
    PHASH_DISTANCE,
    duplicate_groups,
    embedding_closeness,
    exact_groups,
    hash_closeness,
    near_hash_pairs,
    similar_pairs,
)
from .features import compute_embeddings
from .label_issues import find_label_issues
from .records import SPLITS, Log, Record, quiet, records_of
from .report import DoctorReport
from .stats import FLAT_STD, ImageStats, other_issues, stats_all


def run_doctor(
    data: str | Path | DatasetScan,
    run: str | Path | None = None,
    arch: str = default_of("arch"),
    weights: str = "imagenet",
    image_size: int | None = None,
    folds: int = 5,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    seed: int = default_of("seed"),
    val_fraction: float = default_of("val_fraction"),
    phash_distance: int = PHASH_DISTANCE,
    similarity: float = EMBEDDING_SIMILARITY,
    use_embeddings: bool | None = None,
    log: Log | None = None,
    labels: str | Path | None = None,
) -> DoctorReport:
    """Scan (or take a scan), compute features, and find label issues, duplicates and other problems.

    With `run`, its backbone, image size and split settings (val_fraction, seed) are used; without, the
    split defaults are training's (TrainConfig), so a leak is one against the split training makes.
    `use_embeddings`: add embedding similarity to the near-duplicate search (None: when the backbone
    is pretrained; random features say nothing about similarity). `cache_dir`: the feature cache
    (None: no cache; `default_cache_dir()` is the usual place)."""
    log = log or quiet
    _check_settings(folds, similarity)
    seconds: dict[str, float] = {}
    with _timed(seconds, "total"):
        with _timed(seconds, "scan"):
            scan = data if isinstance(data, DatasetScan) else _scan(data, run, val_fraction, seed, labels)
        records = records_of(scan)
        backbone = load_backbone(run, arch, weights, image_size)
        log(
            f"data doctor: {len(records)} images in {len(scan.classes)} classes; features from "
            f"{backbone.description} at {backbone.image_size} px"
        )
        with _timed(seconds, "features"):
            features = compute_embeddings(scan, backbone, device, batch_size, cache_dir, workers, log)
        with _timed(seconds, "label check"):
            label_issues, check = find_label_issues(features, records, scan.classes, folds, seed)
        log(f"label check: {len(label_issues)} likely label errors ({seconds['label check']:.1f} s)")
        embeddings_used = backbone.pretrained if use_embeddings is None else use_embeddings
        with _timed(seconds, "duplicates and image checks"):
            stats = stats_all(Path(scan.root), records)
            near_similarity = similarity if embeddings_used else None
            groups = _duplicates(scan, records, stats, features, phash_distance, near_similarity)
            others = other_issues(records, stats, scan.classes, scan.skipped)
    summary = _summary(scan, records, label_issues, check, groups, others, phash_distance, near_similarity)
    summary["image_size"] = backbone.image_size
    summary["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    log(f"data doctor done in {seconds['total']:.1f} s")
    notes = _notes(backbone.pretrained, run is not None, check["classes"] < len(scan.classes))
    return DoctorReport(
        scan.root, list(scan.classes), backbone.description, label_issues, groups, others, summary, notes
    )


def _check_settings(folds: int, similarity: float) -> None:
    if folds < 2:
        raise FinetuneError(f"folds must be at least 2, not {folds}")
    if not 0.0 < similarity < 1.0:
        raise FinetuneError(f"embedding similarity must be between 0 and 1, not {similarity}")
    from ..extras import require

    require("cleanlab")  # now, not after minutes of features


def _summary(scan, records, label_issues, check, groups, others, phash_distance, near_similarity) -> dict:
    """The report's counts; run_doctor adds the image size and the seconds."""
    return {
        "images": len(records),
        "splits": {s: len(getattr(scan, s)) for s in SPLITS},
        "label_issues": len(label_issues),
        "label_check": check,
        "duplicate_groups": len(groups),
        "leak_groups": sum(g["leak"] for g in groups),
        "conflict_groups": sum(g["conflict"] for g in groups),
        "other_issues": dict(Counter(i["problem"] for i in others)),
        "near_duplicates": {"phash_max_distance": phash_distance, "embedding_similarity": near_similarity},
    }


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    mark = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - mark


def _scan(
    data: str | Path, run: str | Path | None, val_fraction: float, seed: int, labels: str | Path | None = None
) -> DatasetScan:
    """The folder split as the run split it (its recorded val_fraction, seed and labels file), else as
    given; `labels`: a CSV of path,label[,split] rows (labels.py)."""
    if run is not None:
        config = read_run(run)[1].get("config") or {}
        val_fraction, seed = config.get("val_fraction", val_fraction), config.get("seed", seed)
        labels = labels or config.get("labels")
    return scan_dataset(data, val_fraction=val_fraction, seed=seed, labels=labels)


def _duplicates(
    scan: DatasetScan,
    records: list[Record],
    stats: list[ImageStats | None],
    features: np.ndarray,
    phash_distance: int,
    similarity: float | None,
) -> list[dict]:
    """Exact copies, and near ones by perceptual hash and (`similarity` not None) by embedding similarity."""
    exact = exact_groups(Path(scan.root), [r.path for r in records])
    hashed = [(i, s.phash) for i, s in enumerate(stats) if s is not None and s.std >= FLAT_STD]  # flat: noise bits
    hashable = [i for i, _ in hashed]
    hashes = np.asarray([phash for _, phash in hashed], dtype=np.uint64)
    near: dict[str, dict[tuple[int, int], float] | set[tuple[int, int]]] = {
        "phash": hash_closeness(hashes, near_hash_pairs(hashes, phash_distance), phash_distance, hashable)
    }
    if similarity is not None:
        eligible = np.zeros(len(records), dtype=bool)
        eligible[hashable] = True
        near["embedding"] = embedding_closeness(
            features, similar_pairs(features, similarity, eligible=eligible), similarity
        )
    return duplicate_groups(records, scan.classes, exact, near)


def _notes(pretrained: bool, from_run: bool, classes_left_out: bool) -> list[str]:
    notes = []
    if not pretrained and from_run:
        notes.append(
            "the run was trained from scratch (weights none), not fine-tuned from ImageNet: its features "
            "are weaker and embedding similarity is off; label suggestions are rough"
        )
    elif not pretrained:
        notes.append(
            "the features come from a backbone without pretraining: label suggestions are rough, and "
            "embedding similarity is off (ImageNet weights, or a run trained on this data, give better "
            "ones)"
        )
    if classes_left_out:
        notes.append("classes with fewer than 2 images are left out of the label check")
    return notes

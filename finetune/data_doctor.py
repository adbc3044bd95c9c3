"""The data doctor: likely label errors, duplicates that leak between splits, and other problems.

Everything here only reads the user's folder. What it costs, and how it scales:

* **Features** (the expensive part): one batched, gradient-free pass of the backbone (everything but
  `fc`) over every image at the eval transform, through the same `ImageViews`/`compute_features` as
  the training's feature cache. They are kept in an on-disk cache (`.npz`, one per backbone and data
  folder, rows keyed by path, size and mtime), so a second run only computes new or changed files.
* **Label issues**: a K-fold logistic regression on the standardised features (PCA to 99% of the
  variance) gives every image an out-of-sample probability per class (seconds for thousands of
  images); cleanlab ranks the images whose given label the probabilities disagree with.
* **Duplicates**: exact copies by sha256 (only files sharing a byte size are hashed); near copies by
  a 64-bit perceptual hash (DCT of a 32x32 grayscale). Pairs within `d` bits are found by blocking,
  not all pairs: the hash is cut into d + 1 bands and two hashes within d bits agree on at least one
  band (pigeonhole), so only images sharing a band value are compared. With a pretrained backbone,
  embeddings with cosine similarity above a threshold join in, found by a chunked matrix product
  whose memory stays bounded (rows x N floats per chunk). Beyond ~100k images an approximate
  nearest-neighbour index (FAISS, hnswlib) would replace the exact product; the interface is the
  same: a list of index pairs. Near pairs form groups by complete linkage (every two members are a
  near pair), not by chaining: look-alikes (product shots on white, X-rays) that each resemble the
  next would otherwise join into one group of thousands that are not copies of each other.
* **Other problems**: from the same small decode as the hash (header size, pixel spread).

pHash instead of imagededup: imagededup 0.3.3 publishes wheels only up to Python 3.12; on newer
Pythons pip falls back to imagededup 0.1.0, which pins tensorflow 2.0 and numpy 1.16. Its own
loader also ignores EXIF orientation, and its search compares all pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import FinetuneError
from .device import amp_dtype_for, channels_last_for, resolve_device
from .data import (IMAGENET_MEAN, IMAGENET_STD, IMBALANCE_RATIO, DatasetScan, load_rgb, open_image, scan_dataset,
                   usable_cores)
from .fsutil import open_regular, replacing, write_text_atomic

DOCTOR_FORMAT = "finetune-doctor/1"
SPLITS = ("train", "val", "test")
PHASH_DISTANCE = 8  # bits of 64: resized and re-encoded copies are within ~4, slight crops within ~8
EMBEDDING_SIMILARITY = 0.97  # cosine similarity of pretrained features that marks a near-duplicate
FLAT_STD = 4.0  # grayscale standard deviation (0-255) under which an image is near-constant
TINY_SIDE = 32  # pixels: a shorter side than this is upsampled more than 7x for a 224 crop
ASPECT_LIMIT = 4.0  # long side / short side: the centre crop then throws most of the picture away
STATS_SIZE = 64  # decode size for the hash and pixel statistics (JPEGs decode at reduced scale)
CHUNK_BYTES = 64 * 1024**2  # similarity matrix memory per chunk

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


@dataclass
class Record:
    path: str  # relative to the data root
    split: str
    label: int


def records_of(scan: DatasetScan) -> list[Record]:
    return [Record(rel, split, label) for split in SPLITS for rel, label in getattr(scan, split)]


# ---------------------------------------------------------------------------------------------
# Backbone


@dataclass
class Backbone:
    module: nn.Module  # images [N, 3, S, S] -> pooled features [N, D]
    arch: str
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: str  # what the features depend on: keys the feature cache
    pretrained: bool  # features mean something before training (needed for embedding duplicates)
    description: str


def _file_identity(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _read_run(run: str | Path) -> tuple[Path, dict]:
    from .rundir import RunDir

    run_dir = RunDir(Path(run).expanduser())
    return run_dir.model, run_dir.require_trained()


def load_backbone(run: str | Path | None = None, arch: str = "resnet34", weights: str = "imagenet",
                  image_size: int | None = None) -> Backbone:
    """The feature extractor: a run's fine-tuned model (its arch, size and normalisation from run.json),
    else `arch` with `weights` ("imagenet", "none" or a .pth state_dict)."""
    from .model import IMAGENET_WEIGHTS, build_model, split_model

    if run is not None:
        model_path, info = _read_run(run)
        arch, size = info["arch"], int(image_size or info.get("image_size", 224))
        model = build_model(arch, len(info["classes"]), str(model_path))
        source = (info.get("config") or {}).get("weights", "imagenet")
        backbone_of = dict(identity=f"run:{_file_identity(model_path)}", pretrained=source != "none",
                           description=f"{arch} fine-tuned in {Path(run).expanduser()}")
        mean, std = tuple(info.get("mean", IMAGENET_MEAN)), tuple(info.get("std", IMAGENET_STD))
    else:
        size = int(image_size or 224)
        if weights in ("none", "", None):
            # seeded, so that random features are the same every run (and can be cached)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = build_model(arch, 2, "none")
            backbone_of = dict(identity=f"{arch}:none:seed0:torch{torch.__version__}", pretrained=False,
                               description=f"{arch} with random weights (no pretraining)")
        else:
            model = build_model(arch, 2, weights)
            if weights == "imagenet":
                identity = f"{arch}:imagenet:{IMAGENET_WEIGHTS[arch]}"
            else:
                identity = f"{arch}:file:{_file_identity(Path(weights).expanduser())}"
            backbone_of = dict(identity=identity, pretrained=True,
                               description=f"{arch} with {'ImageNet' if weights == 'imagenet' else weights} weights")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    if size < 32:
        raise FinetuneError(f"image size {size} is too small for a ResNet (at least 32)")
    frozen, _ = split_model(model, "head")
    return Backbone(module=frozen, arch=arch, image_size=size, mean=tuple(mean), std=tuple(std), **backbone_of)


# ---------------------------------------------------------------------------------------------
# Embeddings with an on-disk cache


def default_cache_dir() -> Path:
    """$FINETUNE_FEATURE_CACHE, else ~/.cache/finetune/features."""
    env = os.environ.get("FINETUNE_FEATURE_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "finetune" / "features"


def cache_path(cache_dir: str | Path, backbone: Backbone, root: str | Path) -> Path:
    key = f"{backbone.identity}|{backbone.image_size}|{backbone.mean}|{backbone.std}|{Path(root).resolve()}"
    return Path(cache_dir).expanduser() / f"{backbone.arch}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"


def _row_key(root: Path, rel: str) -> str:
    stat = (root / rel).stat()
    return f"{rel}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """{row key: feature vector}; an unreadable cache is just empty (it is only a cache)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return dict(zip(stored["keys"].tolist(), stored["features"]))
    except Exception:  # noqa: BLE001 - missing, truncated or from another version: recompute
        return {}


def _write_cache(path: Path, keys: list[str], features: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp, open(tmp, "wb") as f:  # its own name: the studio runs doctors in threads
            # a file object: np.savez would append .npz to a name
            np.savez(f, keys=np.asarray(keys, dtype=str), features=features.astype(np.float32))
    except (OSError, FinetuneError):  # FinetuneError: DiskFull
        pass  # a read-only or full cache folder costs speed next time, nothing else


def compute_embeddings(data: DatasetScan | tuple[str | Path, list[str]], backbone: Backbone,
                       device: str | torch.device = "auto", batch_size: int = 64, cache_dir: str | Path | None = None,
                       workers: int | None = None, log: Log | None = None) -> np.ndarray:
    """Pooled backbone features [N, D] (float32) of every image: a scan's train, val and test in that
    order, or (root, relative paths). Only images missing from the cache (`cache_dir`) are computed."""
    from .cache import ImageViews, compute_features

    log = log or _quiet
    if isinstance(data, DatasetScan):
        root, rels = Path(data.root), [r.path for r in records_of(data)]
    else:
        root, rels = Path(data[0]), list(data[1])
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if not rels:
        return np.zeros((0, 0), dtype=np.float32)
    keys = [_row_key(root, rel) for rel in rels]
    store = cache_path(cache_dir, backbone, root) if cache_dir is not None else None
    cached = _read_cache(store) if store is not None else {}
    missing = [i for i, key in enumerate(keys) if key not in cached]
    if cached and len(missing) < len(rels):
        log(f"feature cache: {len(rels) - len(missing)} of {len(rels)} images from {store}")
    computed = np.zeros((0, 0), dtype=np.float32)
    if missing:
        module = backbone.module.to(device).eval()
        memory_format = torch.channels_last if channels_last_for(device) else torch.contiguous_format
        module = module.to(memory_format=memory_format)
        with torch.no_grad():
            shape = tuple(module(torch.zeros(1, 3, backbone.image_size, backbone.image_size, device=device)).shape[1:])
        source = ImageViews(root, [(rel, 0) for rel in rels], missing, backbone.image_size, 1, 0,
                            backbone.mean, backbone.std)
        if workers is None:  # on the CPU the model needs the cores; a GPU needs decoding in parallel
            workers = min(8, usable_cores()) if device.type == "cuda" else 0
        computed = compute_features(module, source, shape, torch.float32, device, amp_dtype_for(device), memory_format,
                                    batch_size, workers, log, "computing features")[0].numpy()
    dim = computed.shape[1] if missing else len(next(iter(cached.values())))
    features = np.empty((len(rels), dim), dtype=np.float32)
    computed_rows = iter(computed)
    for i, key in enumerate(keys):
        features[i] = cached[key] if key in cached else next(computed_rows)
    if store is not None and missing:
        _write_cache(store, keys, features)
    return features


# ---------------------------------------------------------------------------------------------
# Label issues


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


def find_label_issues(features: np.ndarray, records: list[Record], classes: list[str], folds: int = 5,
                      seed: int = 0) -> tuple[list[dict], dict]:
    """Issues {path, split, given, suggested, score} most suspicious first, and facts about the check.

    score: cleanlab's label quality (self-confidence, 0..1): the out-of-sample probability of the
    given class; the lower, the more likely the label is wrong. Classes with fewer than 2 images
    cannot be cross-validated and are left out (they are flagged as small classes anyway)."""
    from .extras import require

    cleanlab_issues = require("cleanlab.filter").find_label_issues
    get_label_quality_scores = require("cleanlab.rank").get_label_quality_scores

    labels = np.asarray([r.label for r in records], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    usable = np.flatnonzero(counts >= 2)
    info = {"images": 0, "classes": int(len(usable)), "folds": 0, "out_of_sample_accuracy": None}
    if len(usable) < 2:
        return [], info
    rows = np.flatnonzero(np.isin(labels, usable))
    remap = {int(c): i for i, c in enumerate(usable)}
    local = np.asarray([remap[int(v)] for v in labels[rows]], dtype=np.int64)
    probs = out_of_sample_probs(features[rows], local, folds, seed)
    info.update(images=int(len(rows)), folds=max(2, min(folds, int(counts[usable].min()))),
                out_of_sample_accuracy=float((probs.argmax(axis=1) == local).mean()))
    ranked = cleanlab_issues(local, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    quality = get_label_quality_scores(local, probs, method="self_confidence")
    issues = []
    for i in ranked:
        others = probs[i].copy()
        others[local[i]] = -1.0  # the suggestion is another class, even where the given one is argmax
        suggested = int(others.argmax())
        record = records[rows[i]]
        issues.append({"path": record.path, "split": record.split, "given": classes[record.label],
                       "suggested": classes[int(usable[suggested])], "score": round(float(quality[i]), 6),
                       "suggested_probability": round(float(probs[i, suggested]), 6)})
    return issues, info


# ---------------------------------------------------------------------------------------------
# Hashes and pixel statistics


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II: dct2(x) = M @ x @ M.T."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    matrix[0] /= math.sqrt(2)
    return matrix


_DCT32 = _dct_matrix(32)
_BIT_WEIGHTS = (np.uint64(1) << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: the 8x8 lowest DCT frequencies of a 32x32 grayscale, each bit set when
    the coefficient is above their median (the DC term left out of the median: it only says brightness)."""
    gray = np.asarray(image.convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ gray @ _DCT32.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


_POPCOUNT8 = np.array([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between uint64 hashes (broadcasting)."""
    xor = np.bitwise_xor(a, b)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(xor)
    return _POPCOUNT8[xor[..., None].view(np.uint8)].sum(axis=-1)


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of max_distance + 1 bands covering the 64 bits."""
    count = max_distance + 1
    edges = [round(64 * k / count) for k in range(count + 1)]
    return [(edges[k], edges[k + 1] - edges[k]) for k in range(count)]


def near_hash_pairs(hashes: np.ndarray, max_distance: int = PHASH_DISTANCE,
                    chunk_bytes: int = CHUNK_BYTES) -> set[tuple[int, int]]:
    """Index pairs (i < j) with Hamming distance <= max_distance, without comparing all pairs.

    Pigeonhole blocking: cut the 64 bits into max_distance + 1 bands; two hashes that differ in at most
    max_distance bits agree exactly on at least one band, so only members of a shared (band, value)
    bucket are compared (exact: no pair within the distance is missed)."""
    if not 0 <= max_distance <= 31:
        raise FinetuneError(f"perceptual-hash distance must be 0..31 bits of 64, not {max_distance}")
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs: set[tuple[int, int]] = set()
    for shift, width in _bands(max_distance):
        values = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(values, kind="stable")
        sorted_values = values[order]
        starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends):
            if end - start > 1:
                pairs |= _close_pairs(order[start:end], hashes, max_distance, chunk_bytes)
    return pairs


def _close_pairs(members: np.ndarray, hashes: np.ndarray, max_distance: int, chunk_bytes: int) -> set[tuple[int, int]]:
    """All pairs of one bucket within the distance, a block of rows at a time (bounded memory)."""
    members = np.sort(members)
    member_hashes = hashes[members]
    rows = max(1, chunk_bytes // (8 * len(members)))
    found = set()
    for start in range(0, len(members), rows):
        block = hamming(member_hashes[start:start + rows, None], member_hashes[None, :])
        a, b = np.nonzero(block <= max_distance)
        a = a + start
        keep = b > a
        found.update(zip(members[a[keep]].tolist(), members[b[keep]].tolist()))
    return found


def similar_pairs(features: np.ndarray, threshold: float = EMBEDDING_SIMILARITY,
                  chunk_bytes: int = CHUNK_BYTES, eligible: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose features have cosine similarity > threshold: exact, by a chunked
    matrix product (a block of rows against all, at most `chunk_bytes` of similarities at a time)."""
    features = np.asarray(features, dtype=np.float32)
    index = np.arange(len(features)) if eligible is None else np.flatnonzero(eligible)
    if len(index) < 2:
        return set()
    unit = features[index] / np.maximum(np.linalg.norm(features[index], axis=1, keepdims=True), 1e-12)
    rows = max(1, chunk_bytes // (4 * len(index)))
    found = set()
    for start in range(0, len(index), rows):
        sims = unit[start:start + rows] @ unit.T
        a, b = np.nonzero(sims > threshold)
        a = a + start
        keep = b > a
        found.update(zip(index[a[keep]].tolist(), index[b[keep]].tolist()))
    return found


@dataclass
class ImageStats:
    width: int
    height: int
    std: float  # grayscale pixel spread, 0..255
    phash: int


def image_stats(path: Path) -> ImageStats | None:
    try:
        with open_image(path) as header:
            width, height = header.size
        image = load_rgb(path, STATS_SIZE)
    except Exception:  # noqa: BLE001 - the scan decoded it; a file changed since is left out, not fatal
        return None
    small = image.convert("L")
    small.thumbnail((STATS_SIZE * 2, STATS_SIZE * 2))
    return ImageStats(width, height, float(np.asarray(small, dtype=np.float32).std()), phash(image))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:  # a file swapped for a FIFO since the scan must not block the doctor
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exact_groups(root: Path, rels: list[str]) -> list[list[int]]:
    """Indices of byte-identical files; only files sharing a size are read and hashed."""
    by_size: dict[int, list[int]] = defaultdict(list)
    for i, rel in enumerate(rels):
        by_size[(root / rel).stat().st_size].append(i)
    groups = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_digest: dict[str, list[int]] = defaultdict(list)
        for i in same_size:
            by_digest[file_sha256(root / rels[i])].append(i)
        groups.extend(g for g in by_digest.values() if len(g) > 1)
    return groups


def hash_closeness(hashes: np.ndarray, pairs: set[tuple[int, int]], max_distance: int,
                   index: list[int] | None = None) -> dict[tuple[int, int], float]:
    """{(i, j): Hamming distance / max_distance} for pairs of positions in `hashes` (0: the same hash,
    1: at the limit), keyed by `index[position]` when given (the records the hashes belong to)."""
    if not pairs:
        return {}
    a, b = np.asarray(sorted(pairs), dtype=np.int64).T
    distance = hamming(np.asarray(hashes, dtype=np.uint64)[a], np.asarray(hashes, dtype=np.uint64)[b])
    scale = 1.0 / max_distance if max_distance else 0.0
    if index is not None:
        a, b = np.asarray(index, dtype=np.int64)[a], np.asarray(index, dtype=np.int64)[b]
    return dict(zip(zip(a.tolist(), b.tolist()), (distance * scale).tolist()))


def embedding_closeness(features: np.ndarray, pairs: set[tuple[int, int]], threshold: float,
                        chunk: int = 8192) -> dict[tuple[int, int], float]:
    """{(i, j): (1 - cosine similarity) / (1 - threshold)}: 0 for the same direction, 1 at the threshold."""
    if not pairs:
        return {}
    ordered = sorted(pairs)
    a, b = np.asarray(ordered, dtype=np.int64).T
    features = np.asarray(features, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    values = []
    for start in range(0, len(a), chunk):  # bounded memory: a chunk of pairs at a time
        i, j = a[start:start + chunk], b[start:start + chunk]
        cosine = np.einsum("nd,nd->n", features[i], features[j]) / (norms[i] * norms[j])
        values.append(np.clip((1.0 - cosine) / (1.0 - threshold), 0.0, 1.0))
    return dict(zip(ordered, np.concatenate(values).tolist()))


def complete_linkage(edges: dict[tuple[int, int], float]) -> list[list[int]]:
    """Clusters of nodes in which every two nodes share an edge: agglomerative complete linkage over the
    given edges only (a missing edge is "too far"), the pair of clusters whose farthest pair is closest
    merged first. Unlike connected components, A-B and B-C do not put A with C unless A-C is an edge too.

    Each cluster keeps, per neighbouring cluster, [edges between them, the largest closeness among them];
    two clusters may merge once the edges between them are all |A| x |B| pairs. Merging folds the
    cluster with fewer neighbours into the other, so the work stays near the number of edges (log factor)."""
    import heapq

    links: dict[int, dict[int, list]] = defaultdict(dict)
    for (u, v), closeness in edges.items():
        links[u][v] = links[v][u] = [1, closeness]
    members = {node: [node] for node in links}
    heap = [(closeness, u, v) for (u, v), closeness in edges.items()]
    heapq.heapify(heap)
    while heap:
        closeness, u, v = heapq.heappop(heap)
        link = links[u].get(v) if u in members and v in members else None
        if link is None or link[1] != closeness or link[0] != len(members[u]) * len(members[v]):
            continue  # merged away, or no longer complete: the entry is stale
        keep, gone = (u, v) if len(links[u]) >= len(links[v]) else (v, u)
        del links[keep][gone]
        members[keep].extend(members.pop(gone))
        for other, (count, farthest) in links.pop(gone).items():
            if other == keep:
                continue
            del links[other][gone]
            mine = links[keep].get(other)
            merged = [count, farthest] if mine is None else [mine[0] + count, max(mine[1], farthest)]
            links[keep][other] = links[other][keep] = merged
            # only a neighbour of both can be complete with the larger cluster
            if mine is not None and merged[0] == len(members[keep]) * len(members[other]):
                heapq.heappush(heap, (merged[1], min(keep, other), max(keep, other)))
    return [sorted(nodes) for nodes in members.values()]


def duplicate_groups(records: list[Record], classes: list[str], exact: list[list[int]],
                     near: dict[str, dict[tuple[int, int], float] | set[tuple[int, int]]]) -> list[dict]:
    """Exact groups as they are, and near pairs (by method) formed into groups in which every two images
    are near copies of each other (complete linkage, closest first): look-alikes that each resemble the
    next (A~B~C...~Z, A far from Z) are not chained into one group. Leaks and conflicts first, then larger.

    `near`: {method: {(i, j): closeness}}, closeness 0 (identical) to 1 (at the method's limit), or a set of
    pairs (all at the limit). An exact group takes part as one image: byte-identical files have the same
    hash and features, so it joins a near group as a whole or not at all."""
    node = list(range(len(records)))
    images: dict[int, list[int]] = {}
    for group in exact:
        for i in group:
            node[i] = group[0]
        images[group[0]] = sorted(group)
    edges: dict[tuple[int, int], float] = {}
    for pairs in near.values():
        scored = pairs.items() if isinstance(pairs, dict) else ((pair, 1.0) for pair in pairs)
        for (a, b), closeness in scored:
            u, v = (node[a], node[b]) if node[a] < node[b] else (node[b], node[a])
            if u != v:
                edges[(u, v)] = min(closeness, edges.get((u, v), closeness))
    found = complete_linkage(edges)
    linked = {n for nodes in found for n in nodes}
    found += [[n] for n in images if n not in linked]  # exact groups near nothing else
    in_cluster = {n: number for number, nodes in enumerate(found) for n in nodes}
    methods: list[set[str]] = [set() for _ in found]
    for number, nodes in enumerate(found):
        if any(len(images.get(n, ())) > 1 for n in nodes):
            methods[number].add("sha256")
    for method, pairs in near.items():
        for a, b in pairs:  # the methods that saw a pair inside the group (copies within an exact group too)
            if in_cluster.get(node[a], -1) == in_cluster.get(node[b], -2):
                methods[in_cluster[node[a]]].add(method)
    groups = []
    for number, nodes in enumerate(found):
        indices = sorted(i for n in nodes for i in images.get(n, [n]))
        if len(indices) < 2:
            continue
        splits = [records[i].split for i in indices]
        labels = [classes[records[i].label] for i in indices]
        groups.append({
            "kind": "exact" if len(nodes) == 1 else "near",
            "paths": [records[i].path for i in indices], "splits": splits, "classes": labels,
            "leak": len(set(splits)) > 1, "conflict": len(set(labels)) > 1,
            "methods": sorted(methods[number]),
        })
    groups.sort(key=lambda g: (not g["leak"], not g["conflict"], -len(g["paths"]), g["paths"][0]))
    for number, group in enumerate(groups, start=1):
        group["group"] = number
    return groups


def other_issues(records: list[Record], stats: list[ImageStats | None], classes: list[str],
                 skipped: list[tuple[str, str]]) -> list[dict]:
    """Unreadable, near-constant, tiny and extremely elongated images, and classes much smaller than the rest."""
    issues = [{"path": rel, "split": None, "class": None, "problem": "unreadable", "detail": reason}
              for rel, reason in skipped]
    for record, stat in zip(records, stats):
        if stat is None:
            continue
        where = {"path": record.path, "split": record.split, "class": classes[record.label]}
        short, long = min(stat.width, stat.height), max(stat.width, stat.height)
        if stat.std < FLAT_STD:
            issues.append({**where, "problem": "near-constant", "detail": f"pixel standard deviation {stat.std:.1f}"})
        if short < TINY_SIDE:
            issues.append({**where, "problem": "tiny", "detail": f"{stat.width}x{stat.height} px"})
        if long / max(1, short) > ASPECT_LIMIT:
            issues.append({**where, "problem": "aspect ratio",
                           "detail": f"{stat.width}x{stat.height} px ({long / max(1, short):.1f}:1)"})
    counts = Counter(r.label for r in records)
    for label, name in enumerate(classes):
        others = [counts.get(i, 0) for i in range(len(classes)) if i != label]
        typical = float(np.median(others)) if others else 0.0
        if counts.get(label, 0) * IMBALANCE_RATIO <= typical:
            count = counts.get(label, 0)
            issues.append({"path": None, "split": None, "class": name, "problem": "small class",
                           "detail": f"{count} image{'' if count == 1 else 's'}; the other classes have "
                                     f"{typical:.0f} (median)"})
    return issues


# ---------------------------------------------------------------------------------------------
# The report


@dataclass
class DoctorReport:
    data: str
    classes: list[str]
    backbone: str
    label_issues: list[dict] = field(default_factory=list)
    duplicate_groups: list[dict] = field(default_factory=list)
    other_issues: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"format": DOCTOR_FORMAT, "data": self.data, "classes": self.classes, "backbone": self.backbone,
                "summary": self.summary, "notes": self.notes, "label_issues": self.label_issues,
                "duplicate_groups": self.duplicate_groups, "other_issues": self.other_issues}

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """How IPython and Jupyter show a report: its summary (names through names.printable), not every finding."""
        from .names import printable

        printer.text("\n".join(printable(line) for line in self.summary_text().split("\n")))

    def summary_text(self, limit: int = 10) -> str:
        s = self.summary
        lines = [f"Data doctor: {self.data}", f"  {s['images']} images, {len(self.classes)} classes; "
                 f"features from {self.backbone}"]
        check = s.get("label_check", {})
        accuracy = check.get("out_of_sample_accuracy")
        lines.append(f"Likely label errors: {len(self.label_issues)}"
                     + (f" (linear probe on the features, {check['folds']}-fold: {accuracy:.1%} out-of-sample "
                        f"accuracy)" if accuracy is not None else ""))
        for issue in self.label_issues[:limit]:
            lines.append(f"  {issue['path']}  given {issue['given']}, suggested {issue['suggested']} "
                         f"(label quality {issue['score']:.3f})")
        if len(self.label_issues) > limit:
            lines.append(f"  ... {len(self.label_issues) - limit} more (--json / --csv for all)")
        groups = self.duplicate_groups
        kinds = Counter(g["kind"] for g in groups)
        lines.append(f"Duplicate groups: {len(groups)} ({kinds.get('exact', 0)} exact, {kinds.get('near', 0)} near); "
                     f"{sum(g['leak'] for g in groups)} span splits (leak), "
                     f"{sum(g['conflict'] for g in groups)} span classes (conflict)")
        for group in groups[:limit]:
            flags = [f for f in ("leak", "conflict") if group[f]]
            members = ", ".join(f"{p} [{s}]" for p, s in zip(group["paths"][:4], group["splits"][:4]))
            more = f" +{len(group['paths']) - 4}" if len(group["paths"]) > 4 else ""
            lines.append(f"  {group['kind']}{' ' + ' '.join(f.upper() for f in flags) if flags else ''}: {members}{more}")
        if len(groups) > limit:
            lines.append(f"  ... {len(groups) - limit} more groups")
        problems = Counter(i["problem"] for i in self.other_issues)
        lines.append("Other problems: " + (", ".join(f"{n} {p}" for p, n in sorted(problems.items())) or "none"))
        for issue in self.other_issues[:limit]:
            lines.append(f"  {issue['problem']}: {issue['path'] or issue['class']} ({issue['detail']})")
        if len(self.other_issues) > limit:
            lines.append(f"  ... {len(self.other_issues) - limit} more")
        timing = s.get("seconds", {})
        if timing:
            lines.append("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
        lines.extend(f"Note: {note}" for note in self.notes)
        return "\n".join(lines)


def _outside_data(path: str | Path, data_root: str) -> Path:
    path = Path(path).expanduser()
    root = Path(data_root).resolve()
    target = path.resolve()
    if target == root or root in target.parents:
        raise FinetuneError(f"refusing to write {path} inside the dataset folder {root}: choose a path outside it")
    return path


def write_json(report: DoctorReport, path: str | Path) -> Path:
    path = _outside_data(path, report.data)
    try:
        write_text_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")  # writers may run at once
    except OSError as error:
        raise FinetuneError(f"cannot write {path}: {error.strerror or error}") from None
    return path


CSV_HEADER = ["finding", "path", "split", "class", "suggested", "score", "group", "detail"]


def csv_rows(report: DoctorReport) -> list[list]:
    """One row per finding: label issues, every member of every duplicate group, other problems."""
    from .csvfile import number

    rows = [["label issue", i["path"], i["split"], i["given"], i["suggested"], number(i["score"], ".6f"), "",
             f"p(suggested) {i['suggested_probability']:.3f}"] for i in report.label_issues]
    for g in report.duplicate_groups:
        flags = " ".join(f for f in ("leak", "conflict") if g[f])
        for path, split, name in zip(g["paths"], g["splits"], g["classes"]):
            rows.append([f"{g['kind']} duplicate", path, split, name, "", "", number(g["group"]),
                         " ".join(filter(None, [flags, "by " + "+".join(g["methods"])]))])
    rows += [[i["problem"], i["path"], i["split"], i["class"], "", "", "", i["detail"]] for i in report.other_issues]
    return rows


def write_csv(report: DoctorReport, path: str | Path) -> Path:
    from .csvfile import write_csv as write_safe_csv

    path = _outside_data(path, report.data)
    try:
        return write_safe_csv(path, CSV_HEADER, csv_rows(report))
    except OSError as error:
        raise FinetuneError(f"cannot write {path}: {error.strerror or error}") from None


# ---------------------------------------------------------------------------------------------
# The whole check


def _stats_all(root: Path, records: list[Record]) -> list[ImageStats | None]:
    with ThreadPoolExecutor(max_workers=min(16, usable_cores() * 2)) as pool:  # PIL releases the GIL
        return list(pool.map(lambda r: image_stats(root / r.path), records, chunksize=16))


def run_doctor(data: str | Path | DatasetScan, run: str | Path | None = None, arch: str = "resnet34",
               weights: str = "imagenet", image_size: int | None = None, folds: int = 5,
               device: str | torch.device = "auto", batch_size: int = 64, cache_dir: str | Path | None = None,
               workers: int | None = None, seed: int = 0, val_fraction: float = 0.2,
               phash_distance: int = PHASH_DISTANCE, similarity: float = EMBEDDING_SIMILARITY,
               use_embeddings: bool | None = None, log: Log | None = None) -> DoctorReport:
    """Scan (or take a scan), compute features, and find label issues, duplicates and other problems.

    With `run`, its backbone, image size and split settings (val_fraction, seed) are used.
    `use_embeddings`: add embedding similarity to the near-duplicate search (None: when the backbone
    is pretrained; random features say nothing about similarity). `cache_dir`: the feature cache
    (None: no cache; `default_cache_dir()` is the usual place)."""
    log = log or _quiet
    if folds < 2:
        raise FinetuneError(f"folds must be at least 2, not {folds}")
    if not 0.0 < similarity < 1.0:
        raise FinetuneError(f"embedding similarity must be between 0 and 1, not {similarity}")
    from .extras import require

    require("cleanlab")  # now, not after minutes of features
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    if isinstance(data, DatasetScan):
        scan = data
    else:
        if run is not None:
            config = (_read_run(run)[1].get("config") or {})
            val_fraction, seed = config.get("val_fraction", val_fraction), config.get("seed", seed)
        scan = scan_dataset(data, val_fraction=val_fraction, seed=seed)
    seconds["scan"] = time.perf_counter() - started
    records, root = records_of(scan), Path(scan.root)
    backbone = load_backbone(run, arch, weights, image_size)
    log(f"data doctor: {len(records)} images in {len(scan.classes)} classes; features from {backbone.description} "
        f"at {backbone.image_size} px")

    mark = time.perf_counter()
    features = compute_embeddings(scan, backbone, device, batch_size, cache_dir, workers, log)
    seconds["features"] = time.perf_counter() - mark

    mark = time.perf_counter()
    label_issues, check = find_label_issues(features, records, scan.classes, folds, seed)
    seconds["label check"] = time.perf_counter() - mark
    log(f"label check: {len(label_issues)} likely label errors ({seconds['label check']:.1f} s)")

    mark = time.perf_counter()
    rels = [r.path for r in records]
    stats = _stats_all(root, records)
    exact = exact_groups(root, rels)
    hashable = [i for i, s in enumerate(stats) if s is not None and s.std >= FLAT_STD]  # flat images: noise bits
    hashes = np.asarray([stats[i].phash for i in hashable], dtype=np.uint64)
    near = {"phash": hash_closeness(hashes, near_hash_pairs(hashes, phash_distance), phash_distance, hashable)}
    embeddings_used = backbone.pretrained if use_embeddings is None else use_embeddings
    if embeddings_used:
        eligible = np.zeros(len(records), dtype=bool)
        eligible[hashable] = True
        near["embedding"] = embedding_closeness(features, similar_pairs(features, similarity, eligible=eligible),
                                                similarity)
    groups = duplicate_groups(records, scan.classes, exact, near)
    others = other_issues(records, stats, scan.classes, scan.skipped)
    seconds["duplicates and image checks"] = time.perf_counter() - mark
    seconds["total"] = time.perf_counter() - started

    notes = []
    if not backbone.pretrained and run is not None:
        notes.append("the run was trained from scratch (weights none), not fine-tuned from ImageNet: its features "
                     "are weaker and embedding similarity is off; label suggestions are rough")
    elif not backbone.pretrained:
        notes.append("the features come from a backbone without pretraining: label suggestions are rough, and "
                     "embedding similarity is off (ImageNet weights, or a run trained on this data, give better "
                     "ones)")
    if check["classes"] < len(scan.classes):
        notes.append("classes with fewer than 2 images are left out of the label check")
    summary = {
        "images": len(records), "splits": {s: len(getattr(scan, s)) for s in SPLITS},
        "label_issues": len(label_issues), "label_check": check,
        "duplicate_groups": len(groups), "leak_groups": sum(g["leak"] for g in groups),
        "conflict_groups": sum(g["conflict"] for g in groups),
        "other_issues": dict(Counter(i["problem"] for i in others)),
        "near_duplicates": {"phash_max_distance": phash_distance,
                            "embedding_similarity": similarity if embeddings_used else None},
        "image_size": backbone.image_size, "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    log(f"data doctor done in {seconds['total']:.1f} s")
    return DoctorReport(scan.root, list(scan.classes), backbone.description, label_issues, groups, others, summary,
                        notes)

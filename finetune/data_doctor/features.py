"""Pooled backbone features of every image, kept in an on-disk cache so a second run only computes new files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from ..config import FinetuneError
from ..data import DatasetScan, usable_cores
from ..device import amp_dtype_for, channels_last_for, resolve_device
from ..fsutil import replacing
from .backbone import Backbone
from .records import Log, quiet, records_of


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
            return dict(zip(stored["keys"].tolist(), stored["features"], strict=True))
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


def compute_embeddings(
    data: DatasetScan | tuple[str | Path, list[str]],
    backbone: Backbone,
    device: str | torch.device = "auto",
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    log: Log | None = None,
) -> np.ndarray:
    """Pooled backbone features [N, D] (float32) of every image: a scan's train, val and test in that
    order, or (root, relative paths). Only images missing from the cache (`cache_dir`) are computed."""
    from ..cache import ImageViews, compute_features

    log = log or quiet
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
        source = ImageViews(
            root, [(rel, 0) for rel in rels], missing, backbone.image_size, 1, 0, backbone.mean, backbone.std
        )
        if workers is None:  # on the CPU the model needs the cores; a GPU needs decoding in parallel
            workers = min(8, usable_cores()) if device.type == "cuda" else 0
        computed = compute_features(
            module,
            source,
            shape,
            torch.float32,
            device,
            amp_dtype_for(device),
            memory_format,
            batch_size,
            workers,
            log,
            "computing features",
        )[0].numpy()
    dim = computed.shape[1] if missing else len(next(iter(cached.values())))
    features = np.empty((len(rels), dim), dtype=np.float32)
    computed_rows = iter(computed)
    for i, key in enumerate(keys):
        features[i] = cached[key] if key in cached else next(computed_rows)
    if store is not None and missing:
        _write_cache(store, keys, features)
    return features

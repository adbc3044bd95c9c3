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

One module per job: `backbone` (the feature extractor), `features` (features and their cache),
`label_issues`, `duplicates` (hashes, near pairs, groups), `stats` (image statistics and the problems
they show), `report` (the report and its files), `doctor` (`run_doctor`, the whole check); `records`
holds the image records they share. The names below are the public ones: import them from here.
"""

from __future__ import annotations

from .backbone import Backbone, load_backbone
from .doctor import run_doctor
from .duplicates import (
    CHUNK_BYTES,
    EMBEDDING_SIMILARITY,
    PHASH_DISTANCE,
    complete_linkage,
    duplicate_groups,
    embedding_closeness,
    exact_groups,
    file_sha256,
    hamming,
    hash_closeness,
    near_hash_pairs,
    phash,
    similar_pairs,
)
from .features import cache_path, compute_embeddings, default_cache_dir
from .label_issues import find_label_issues, out_of_sample_probs
from .records import SPLITS, Log, Record, records_of
from .report import CSV_HEADER, DOCTOR_FORMAT, DoctorReport, csv_rows, write_csv, write_json
from .stats import ASPECT_LIMIT, FLAT_STD, STATS_SIZE, TINY_SIDE, ImageStats, image_stats, other_issues

__all__ = [
    "ASPECT_LIMIT",
    "CHUNK_BYTES",
    "CSV_HEADER",
    "DOCTOR_FORMAT",
    "EMBEDDING_SIMILARITY",
    "FLAT_STD",
    "PHASH_DISTANCE",
    "SPLITS",
    "STATS_SIZE",
    "TINY_SIDE",
    "Backbone",
    "DoctorReport",
    "ImageStats",
    "Log",
    "Record",
    "cache_path",
    "complete_linkage",
    "compute_embeddings",
    "csv_rows",
    "default_cache_dir",
    "duplicate_groups",
    "embedding_closeness",
    "exact_groups",
    "file_sha256",
    "find_label_issues",
    "hamming",
    "hash_closeness",
    "image_stats",
    "load_backbone",
    "near_hash_pairs",
    "other_issues",
    "out_of_sample_probs",
    "phash",
    "records_of",
    "run_doctor",
    "similar_pairs",
    "write_csv",
    "write_json",
]

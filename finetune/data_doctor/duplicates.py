"""Exact copies (sha256), near copies (perceptual hash, embedding similarity) and their groups (complete linkage)."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import FinetuneError
from ..fsutil import open_regular
from .records import Record

PHASH_DISTANCE = 8  # bits of 64: resized and re-encoded copies are within ~4, slight crops within ~8
EMBEDDING_SIMILARITY = 0.97  # cosine similarity of pretrained features that marks a near-duplicate
CHUNK_BYTES = 64 * 1024**2  # similarity matrix memory per chunk


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
    gray = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
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


def near_hash_pairs(
    hashes: np.ndarray, max_distance: int = PHASH_DISTANCE, chunk_bytes: int = CHUNK_BYTES
) -> set[tuple[int, int]]:
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
        for start, end in zip(starts, ends, strict=True):
            if end - start > 1:
                pairs |= _close_pairs(order[start:end], hashes, max_distance, chunk_bytes)
    return pairs


def _close_pairs(members: np.ndarray, hashes: np.ndarray, max_distance: int, chunk_bytes: int) -> set[tuple[int, int]]:
    """All pairs of one bucket within the distance, a block of rows at a time (bounded memory)."""
    members = np.sort(members)
    member_hashes = hashes[members]
    rows = max(1, chunk_bytes // (8 * len(members)))
    found: set[tuple[int, int]] = set()
    for start in range(0, len(members), rows):
        block = hamming(member_hashes[start : start + rows, None], member_hashes[None, :])
        a, b = np.nonzero(block <= max_distance)
        a = a + start
        keep = b > a
        found.update(zip(members[a[keep]].tolist(), members[b[keep]].tolist(), strict=True))
    return found


def similar_pairs(
    features: np.ndarray,
    threshold: float = EMBEDDING_SIMILARITY,
    chunk_bytes: int = CHUNK_BYTES,
    eligible: np.ndarray | None = None,
) -> set[tuple[int, int]]:
    """Index pairs (i < j) whose features have cosine similarity > threshold: exact, by a chunked
    matrix product (a block of rows against all, at most `chunk_bytes` of similarities at a time)."""
    features = np.asarray(features, dtype=np.float32)
    index = np.arange(len(features)) if eligible is None else np.flatnonzero(eligible)
    if len(index) < 2:
        return set()
    unit = features[index] / np.maximum(np.linalg.norm(features[index], axis=1, keepdims=True), 1e-12)
    rows = max(1, chunk_bytes // (4 * len(index)))
    found: set[tuple[int, int]] = set()
    for start in range(0, len(index), rows):
        sims = unit[start : start + rows] @ unit.T
        a, b = np.nonzero(sims > threshold)
        a = a + start
        keep = b > a
        found.update(zip(index[a[keep]].tolist(), index[b[keep]].tolist(), strict=True))
    return found


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
    groups: list[list[int]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_digest: dict[str, list[int]] = defaultdict(list)
        for i in same_size:
            by_digest[file_sha256(root / rels[i])].append(i)
        groups.extend(g for g in by_digest.values() if len(g) > 1)
    return groups


def hash_closeness(
    hashes: np.ndarray, pairs: set[tuple[int, int]], max_distance: int, index: list[int] | None = None
) -> dict[tuple[int, int], float]:
    """{(i, j): Hamming distance / max_distance} for pairs of positions in `hashes` (0: the same hash,
    1: at the limit), keyed by `index[position]` when given (the records the hashes belong to)."""
    if not pairs:
        return {}
    a, b = np.asarray(sorted(pairs), dtype=np.int64).T
    distance = hamming(np.asarray(hashes, dtype=np.uint64)[a], np.asarray(hashes, dtype=np.uint64)[b])
    scale = 1.0 / max_distance if max_distance else 0.0
    if index is not None:
        a, b = np.asarray(index, dtype=np.int64)[a], np.asarray(index, dtype=np.int64)[b]
    return dict(zip(zip(a.tolist(), b.tolist(), strict=True), (distance * scale).tolist(), strict=True))


def embedding_closeness(
    features: np.ndarray, pairs: set[tuple[int, int]], threshold: float, chunk: int = 8192
) -> dict[tuple[int, int], float]:
    """{(i, j): (1 - cosine similarity) / (1 - threshold)}: 0 for the same direction, 1 at the threshold."""
    if not pairs:
        return {}
    ordered = sorted(pairs)
    a, b = np.asarray(ordered, dtype=np.int64).T
    features = np.asarray(features, dtype=np.float32)
    norms = np.maximum(np.linalg.norm(features, axis=1), 1e-12)
    values = []
    for start in range(0, len(a), chunk):  # bounded memory: a chunk of pairs at a time
        i, j = a[start : start + chunk], b[start : start + chunk]
        cosine = np.einsum("nd,nd->n", features[i], features[j]) / (norms[i] * norms[j])
        values.append(np.clip((1.0 - cosine) / (1.0 - threshold), 0.0, 1.0))
    return dict(zip(ordered, np.concatenate(values).tolist(), strict=True))


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


def duplicate_groups(
    records: list[Record],
    classes: list[str],
    exact: list[list[int]],
    near: dict[str, dict[tuple[int, int], float] | set[tuple[int, int]]],
) -> list[dict]:
    """Exact groups as they are, and near pairs (by method) formed into groups in which every two images
    are near copies of each other (complete linkage, closest first): look-alikes that each resemble the
    next (A~B~C...~Z, A far from Z) are not chained into one group. Leaks and conflicts first, then larger.

    `near`: {method: {(i, j): closeness}}, closeness 0 (identical) to 1 (at the method's limit), or a set of
    pairs (all at the limit). An exact group takes part as one image: byte-identical files have the same
    hash and features, so it joins a near group as a whole or not at all."""
    node = list(range(len(records)))
    images: dict[int, list[int]] = {}
    for copies in exact:
        for i in copies:
            node[i] = copies[0]
        images[copies[0]] = sorted(copies)
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
    groups: list[dict] = []
    for number, nodes in enumerate(found):
        indices = sorted(i for n in nodes for i in images.get(n, [n]))
        if len(indices) < 2:
            continue
        splits = [records[i].split for i in indices]
        labels = [classes[records[i].label] for i in indices]
        groups.append(
            {
                "kind": "exact" if len(nodes) == 1 else "near",
                "paths": [records[i].path for i in indices],
                "splits": splits,
                "classes": labels,
                "leak": len(set(splits)) > 1,
                "conflict": len(set(labels)) > 1,
                "methods": sorted(methods[number]),
            }
        )
    groups.sort(key=lambda g: (not g["leak"], not g["conflict"], -len(g["paths"]), g["paths"][0]))
    for number, group in enumerate(groups, start=1):
        group["group"] = number
    return groups

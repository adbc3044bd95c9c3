"""`finetune suggest RUN POOL`: which unlabelled images to label next, so that labelling teaches the
model the most.

1. Every image of the pool (a folder or a zip, read as any folder is: formats, bounds, hostile names,
   FIFOs) goes through the run's model once: its calibrated probabilities, and its pooled features.
2. Images already in the run's data (the same bytes as one of its training or validation files) are
   left out: labelling them again teaches nothing.
3. Uncertainty: the margin between the two likeliest classes (1 - (p1 - p2): 1 is a tie), or the
   entropy of the probabilities, normalised to 0..1.
4. Diversity: near-copies (the same bytes, or perceptual hashes within the data doctor's duplicate
   distance) count once, by their most uncertain; of the most uncertain (CANDIDATES_PER_PICK x n),
   a k-center greedy pick on the model's pooled features (each next pick the candidate farthest from
   those picked; the most uncertain first). Five copies of one ambiguous photo give one suggestion.
   (Near-copies are told by their pixels, not by the features: a model trained on little data, or
   from scratch, sees most images alike.)
5. The picks, most uncertain first, with the model's best guesses.

The pool is only ever read.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .config import FinetuneError
from .curation import Curation
from .data import list_images
from .data_doctor.duplicates import file_sha256
from .labels import file_inside
from .model import split_model
from .names import printable
from .predict import Predictor, _collate, _Files

CANDIDATES_PER_PICK = 5
MEASURES = ("margin", "entropy")


@dataclass
class Suggestion:
    path: str  # relative to the pool
    uncertainty: float  # 0 (sure) .. 1 (a tie, or uniform)
    top: list[tuple[str, float]]  # the model's best guesses, calibrated

    def to_dict(self) -> dict:
        return {"path": self.path, "uncertainty": self.uncertainty, "top": [list(t) for t in self.top]}


def uncertainty(probabilities: torch.Tensor, measure: str = "margin") -> torch.Tensor:
    """Per row, 0 when the model is sure, 1 at a tie (margin) or a uniform guess (entropy)."""
    if measure == "entropy":
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(1)
        return entropy / math.log(probabilities.shape[1])
    best = probabilities.topk(2, dim=1).values
    return 1 - (best[:, 0] - best[:, 1])


def known_images(run: Path) -> set[str]:
    """The sha256 of every image of the run's data (from its split.json: the pool images a curation
    added to it too). Its test images too: an add of one is refused (curation: already in the data),
    so suggesting it would only waste a click."""
    from .rundir import RunDir

    scan = RunDir(run).read_split()  # a curated split's added pool images by their absolute paths
    root = Path(scan.root)
    known = set()
    for rel, _ in scan.train + scan.val + scan.test:
        try:
            known.add(file_sha256(root / rel))
        except (OSError, FinetuneError):  # moved (or replaced by a FIFO) since: not in the pool under these bytes
            continue
    return known


def decided_in(curation: str | Path | Curation | None, pool: Path) -> set[str]:
    """The pool-relative paths of `pool` that `curation` has a decision about."""
    if curation is None:
        return set()
    from .curation import load_curation

    loaded = curation if isinstance(curation, Curation) else load_curation(curation)
    return set(loaded.of_pool(pool))


def pool_hashes(pool: Path, files: list[Path], skipped: list[tuple[str, str]]) -> dict[Path, str]:
    """{file: sha256} of the pool's files that may be read; the others are named in `skipped`."""
    hashes: dict[Path, str] = {}
    inside = pool.resolve()
    for path in files:
        # a link out of the pool is not the pool's (an add of it would be refused: curation.pool_file_problem)
        reason = file_inside(inside, path.relative_to(pool), "the pool")
        if reason is not None:
            skipped.append((printable(str(path)), reason))
            continue
        try:
            hashes[path] = file_sha256(path)  # never blocks on a FIFO named like an image
        except (OSError, FinetuneError) as error:
            skipped.append((printable(str(path)), str(error)))
    return hashes


@torch.inference_mode()
def _score(predictor: Predictor, files: list[Path], batch_size: int, skipped: list[tuple[str, str]]):
    """(probabilities [N, C], unit features [N, F], the files scored): one pass of the run's model."""
    frozen, head = split_model(predictor.model, "head")
    loader = DataLoader(
        _Files(files, predictor.transform, predictor.min_size), batch_size=batch_size, collate_fn=_collate
    )
    probabilities, features, kept = [], [], []
    for images, indices, failed in loader:
        skipped += [(printable(str(files[i])), error) for i, error in failed]
        if images is None:
            continue
        images = images.to(predictor.device)
        if predictor.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        pooled = frozen(images).float()
        logits = head(pooled).float()
        probabilities.append(torch.softmax(logits / predictor.temperature, 1).cpu())
        features.append(torch.nn.functional.normalize(pooled.flatten(1), dim=1).cpu())
        kept += [files[i] for i in indices]
    if not kept:
        raise FinetuneError("no readable image in the pool")
    return torch.cat(probabilities), torch.cat(features), kept


def near_copy_groups(paths: list[Path], sha: list[str]) -> list[int]:
    """A group number per image: the same bytes, or perceptual hashes within the data doctor's
    duplicate distance (resized and re-encoded copies), share one. Unreadable files stay alone."""
    import numpy as np

    from .data import load_rgb
    from .data_doctor.duplicates import near_hash_pairs, phash

    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    hashes, hashed = [], []
    for k, path in enumerate(paths):
        try:
            hashes.append(phash(load_rgb(path, 64)))
            hashed.append(k)
        except Exception:  # noqa: BLE001 - _score names the file; here it only has no hash
            continue
    pairs = {(hashed[a], hashed[b]) for a, b in near_hash_pairs(np.array(hashes, dtype=np.uint64))}
    first_of: dict[str, int] = {}
    for k, digest in enumerate(sha):
        pairs.add((first_of.setdefault(digest, k), k))
    for a, b in pairs:
        parent[root(a)] = root(b)
    return [root(k) for k in range(len(paths))]


def pick_diverse(scores: torch.Tensor, features: torch.Tensor, n: int, groups: list[int]) -> list[int]:
    """Indices of up to n items, most uncertain first: one per near-copy group (its most uncertain),
    then a k-center greedy pick on the features among the CANDIDATES_PER_PICK x n most uncertain."""
    seen: set[int] = set()
    order = []
    for index in scores.argsort(descending=True).tolist():
        if groups[index] not in seen:
            seen.add(groups[index])
            order.append(index)
    order = order[: n * CANDIDATES_PER_PICK]
    picked = [order[0]]
    nearest = 1 - features[order] @ features[order[0]]  # each candidate's distance to the nearest pick
    nearest[0] = -1
    while len(picked) < min(n, len(order)):
        farthest = int(nearest.argmax())
        picked.append(order[farthest])
        nearest = torch.minimum(nearest, 1 - features[order] @ features[order[farthest]])
        nearest[farthest] = -1
    return sorted(picked, key=lambda i: -float(scores[i]))


def suggest(
    run: str | Path,
    pool: str | Path,
    n: int = 50,
    measure: str = "margin",
    device: str = "auto",
    batch_size: int = 64,
    top_k: int = 3,
    log: Callable[[str], None] | None = None,
    curation: str | Path | Curation | None = None,
) -> tuple[list[Suggestion], list[tuple[str, str]]]:
    """The n images of `pool` most worth labelling for `run`'s model, and the pool's files skipped.
    With `curation` (a curation file, or a Curation), the pool's files decided there (added, or
    excluded as none of the classes) are left out too: labelled since the run, not to be asked again."""
    if n < 1:
        raise FinetuneError(f"n must be at least 1, got {n}")
    if measure not in MEASURES:
        raise FinetuneError(f"unknown uncertainty measure {measure!r}: choose {' or '.join(MEASURES)}")
    run_dir, pool_dir = Path(run).expanduser(), Path(pool).expanduser()
    if not pool_dir.is_dir():
        raise FinetuneError(f"pool folder not found: {pool_dir}")
    predictor = Predictor.from_run(run_dir, device)
    skipped: list[tuple[str, str]] = []
    files = list_images([pool_dir], skipped)
    known = known_images(run_dir)
    hashes = pool_hashes(pool_dir, files, skipped)
    decided = decided_in(curation, pool_dir)
    readable = [path for path in files if path in hashes]  # the others are in `skipped`, with why
    in_data = [path for path in readable if hashes[path] in known]
    fresh = [
        path for path in readable if hashes[path] not in known and path.relative_to(pool_dir).as_posix() not in decided
    ]
    if log:
        log(
            pool_counts(
                len(files),
                len(files) - len(readable),
                len(in_data),
                len(readable) - len(in_data) - len(fresh),
                len(fresh),
            )
        )
    if not fresh:
        return [], skipped
    probabilities, features, kept = _score(predictor, fresh, batch_size, skipped)
    scores = uncertainty(probabilities, measure)
    picked = pick_diverse(scores, features, n, near_copy_groups(kept, [hashes[path] for path in kept]))
    suggestions = []
    for index in picked:
        values, classes = probabilities[index].topk(min(top_k, probabilities.shape[1]))
        top = [(predictor.classes[c], float(v)) for v, c in zip(values.tolist(), classes.tolist(), strict=True)]
        rel = kept[index].relative_to(pool_dir).as_posix()
        suggestions.append(Suggestion(rel, float(scores[index]), top))
    return suggestions, skipped


def pool_counts(files: int, skipped: int, in_data: int, decided: int, fresh: int) -> str:
    """What happened to the pool's images, each cause counted apart (a FIFO is not 'in the data')."""
    parts = [f"{in_data} already in the run's data"]
    if decided:
        parts.append(f"{decided} decided in the curation")
    if skipped:
        parts.append(f"{skipped} skipped (not readable as an image here: listed below)")
    return f"{files} pool images, {', '.join(parts)}; scoring {fresh}"


def write_outputs(
    suggestions: list[Suggestion], json_path: str | Path | None, csv_path: str | Path | None
) -> list[Path]:
    """--json (every field) and --csv (rank, path, uncertainty, best guess, its probability; cells escaped
    against spreadsheet formulas: the paths are strangers' file names)."""
    import json

    from .csvfile import number, write_csv
    from .fsutil import write_text_atomic

    written = []
    if json_path:
        text = json.dumps({"suggestions": [s.to_dict() for s in suggestions]}, indent=2)
        write_text_atomic(Path(json_path), text + "\n")
        written.append(Path(json_path))
    if csv_path:
        rows = [
            [rank, s.path, number(s.uncertainty, ".4f"), s.top[0][0], number(s.top[0][1], ".4f")]
            for rank, s in enumerate(suggestions, start=1)
        ]
        written.append(write_csv(csv_path, ["rank", "path", "uncertainty", "best_guess", "probability"], rows))
    return written


def table(suggestions: list[Suggestion]) -> str:
    if not suggestions:
        return "nothing to suggest: no pool image is left to score (the counts above say why)"
    lines = ["rank  uncertainty  path  (best guesses)"]
    for rank, s in enumerate(suggestions, start=1):
        guesses = ", ".join(f"{printable(c)} {p:.2f}" for c, p in s.top)
        lines.append(f"{rank:>4}  {s.uncertainty:>11.3f}  {printable(s.path)}  ({guesses})")
    return "\n".join(lines)

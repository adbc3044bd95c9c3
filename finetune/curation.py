"""The curation file: the user's decisions about single images, applied to a scan, never to the folder.

`curation.json` lives next to the runs (never inside the dataset, nor inside a pool):

    {"format": "finetune-curation/1", "data": "/abs/path/to/data",
     "decisions": [{"path": "train/roses/1.jpg", "action": "exclude", "note": "leak: ..."},
                   {"path": "train/tulips/7.jpg", "action": "relabel", "label": "roses"},
                   {"path": "val/daisy/3.jpg", "action": "keep"},
                   {"path": "garden/0042.jpg", "action": "add", "label": "roses", "pool": "/abs/path/to/pool"}]}

Paths are relative (to the data root, or for an `add` to its pool), with forward slashes. One decision
per path: a later one for the same path replaces the earlier (the Review tab changes its mind by
appending). `keep` records that a flagged image was looked at and is fine (the Review tab then stops
showing it); `exclude` drops the file from train, val and test; `relabel` moves it to another existing
class in whichever split it is in. Leaking duplicates (`leak_decisions`) become plain `exclude`
decisions for the copies outside the earliest split, with a `note` saying which file they duplicate.

`add` (the Review tab's Label mode, after `finetune suggest RUN POOL`) puts an image of an unlabelled
pool folder into train with `label`, an existing class; `pool` is that folder, an absolute resolved
path, and `path` is relative to it. An add is keyed by (pool, path): the same name in two pools is two
decisions, and an add never replaces a decision about a data file. A pool may also hold `exclude`
decisions ("none of these": never trained on). The pool is only read, never changed or copied: the
training reads the added file where it is (split.json lists it by its absolute path, and its
curation record's `added` says from which pool, with which class). An added file that leaves its pool
(a symlink out), is no regular file, cannot be decoded, or has the bytes of an image already in the
data is skipped and named in the curation report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .config import FinetuneError
from .data import DatasetScan
from .fsutil import read_json, write_text_atomic

CURATION_FORMAT = "finetune-curation/1"
CURATION_FILE = "curation.json"
ACTIONS = ("keep", "exclude", "relabel", "add")
POOL_ACTIONS = ("add", "exclude")  # what a decision about a pool file may be
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class Decision:
    path: str
    action: str
    label: str | None = None  # the new class, for relabel; the class, for add
    note: str | None = None  # why (shown in the report), optional
    pool: str | None = None  # for a file of a pool (add): the pool folder, absolute and resolved

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def key(self) -> tuple[str | None, str]:
        """What one decision is about: (None, path) for a data file, (pool, path) for a pool's."""
        return (self.pool, self.path)


@dataclass
class Curation:
    data: str
    decisions: list[Decision] = field(default_factory=list)
    source: str | None = None  # the file it was loaded from (for messages); not saved

    def set(
        self,
        path: str,
        action: str,
        label: str | None = None,
        note: str | None = None,
        pool: str | Path | None = None,
    ) -> Decision:
        """Record a decision, replacing any earlier one for the same path (of the same pool, for a pool's)."""
        where = pool_folder(pool) if pool is not None else None
        decision = _decision({"path": path, "action": action, "label": label, "note": note, "pool": where}, "decision")
        self._replace(decision)
        return decision

    def remove(self, path: str, pool: str | Path | None = None) -> bool:
        """Forget the decision about `path` (of `pool`); False when there was none."""
        key = (pool_folder(pool) if pool is not None else None, normalise_path(path, "decision"))
        before = len(self.decisions)
        self.decisions = [d for d in self.decisions if d.key != key]
        return len(self.decisions) < before

    def _replace(self, decision: Decision) -> None:
        self.decisions = [d for d in self.decisions if d.key != decision.key] + [decision]

    def by_path(self) -> dict[str, Decision]:
        """The decisions about the data's own files, by their path (a pool's are in `adds`)."""
        return {d.path: d for d in self.decisions if d.pool is None}

    def adds(self) -> list[Decision]:
        """The `add` decisions, in the order they were made."""
        return [d for d in self.decisions if d.action == "add"]

    def of_pool(self, pool: str | Path) -> dict[str, Decision]:
        """The decisions about the files of `pool` (add or exclude), by their pool-relative path."""
        where = pool_folder(pool)
        return {d.path: d for d in self.decisions if d.pool == where}

    def to_dict(self) -> dict:
        return {"format": CURATION_FORMAT, "data": self.data, "decisions": [d.to_dict() for d in self.decisions]}


def normalise_path(path: object, where: str) -> str:
    """A relative path inside the data root, with forward slashes; a one-line error otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise FinetuneError(f"{where}: 'path' must be a non-empty string")
    posix = PurePosixPath(path.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts or (posix.parts and ":" in posix.parts[0]):
        raise FinetuneError(f"{where}: path {path!r} must be relative to the data folder (no '..', not absolute)")
    return posix.as_posix().removeprefix("./")


def pool_folder(pool: str | Path) -> str:
    """A pool as decisions name it: the folder's absolute, resolved path."""
    if not isinstance(pool, (str, Path)) or not str(pool).strip():
        raise FinetuneError(f"the pool must be a folder path, got {pool!r}")
    return str(Path(pool).expanduser().resolve())


def _decision(raw: object, where: str) -> Decision:
    if not isinstance(raw, dict):
        raise FinetuneError(f"{where}: each decision must be an object with path and action")
    path = normalise_path(raw.get("path"), where)
    action = raw.get("action")
    if action not in ACTIONS:
        raise FinetuneError(f"{where}: action {action!r} for {path!r} is not one of {', '.join(ACTIONS)}")
    label = raw.get("label")
    if action == "relabel" and (not isinstance(label, str) or not label):
        raise FinetuneError(f"{where}: relabel of {path!r} needs the new class in 'label'")
    if action == "add" and (not isinstance(label, str) or not label):
        raise FinetuneError(f"{where}: add of {path!r} needs its class in 'label'")
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise FinetuneError(f"{where}: 'note' of {path!r} must be a string")
    pool = _pool_of(raw.get("pool"), action, path, where)
    return Decision(path, action, label if action in ("relabel", "add") else None, note, pool)


def _pool_of(pool: object, action: str, path: str, where: str) -> str | None:
    """A decision's pool: required for an add, allowed for an exclude, an absolute path."""
    if pool is None:
        if action == "add":
            raise FinetuneError(f"{where}: add of {path!r} needs the pool folder it is in, in 'pool'")
        return None
    if action not in POOL_ACTIONS:
        raise FinetuneError(f"{where}: a decision about a pool file ({path!r}) must be add or exclude, not {action}")
    if not isinstance(pool, str) or not Path(pool).expanduser().is_absolute():
        raise FinetuneError(f"{where}: 'pool' of {path!r} must be the pool folder's absolute path, got {pool!r}")
    return pool_folder(pool)


def new_curation(data: str | Path) -> Curation:
    return Curation(str(Path(data).expanduser().resolve()))


def load_curation(path: str | Path) -> Curation:
    """Read and check a curation file; every problem is one line naming the file."""
    path = Path(path).expanduser()
    raw = read_json(path, "curation file")
    if not isinstance(raw, dict) or raw.get("format") != CURATION_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise FinetuneError(f"{path} is not a curation file (format {found!r}, expected {CURATION_FORMAT!r})")
    if not isinstance(raw.get("data"), str):
        raise FinetuneError(f"{path}: 'data' must be the data folder the paths are relative to")
    if not isinstance(raw.get("decisions"), list):
        raise FinetuneError(f"{path}: 'decisions' must be a list")
    curation = Curation(raw["data"], source=str(path))
    for number, item in enumerate(raw["decisions"], start=1):
        curation._replace(_decision(item, f"{path}, decision {number}"))
    return curation


def load_or_new_curation(path: str | Path, data_root: str | Path) -> Curation:
    """The curation file at `path`, or a new, empty one for `data_root` when there is none yet."""
    return load_curation(path) if Path(path).expanduser().is_file() else new_curation(data_root)


def save_curation(curation: Curation, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file); refuses a place inside the dataset or a pool."""
    path = Path(path).expanduser()
    target = path.resolve()
    pools = sorted({d.pool for d in curation.decisions if d.pool is not None})
    for kind, folder in [("dataset", curation.data)] + [("pool", pool) for pool in pools]:
        root = Path(folder).expanduser().resolve()
        if target == root or root in target.parents:
            raise FinetuneError(
                f"the curation file must not be inside the {kind} {root}: {path} (keep it next to the runs)"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(curation.to_dict(), indent=2) + "\n")  # two pages may save at once
    except OSError as error:
        raise FinetuneError(f"cannot write curation file {path}: {error.strerror or error}") from None
    curation.source = str(path)
    return path


# ---------------------------------------------------------------------------------------------
# Applying it to a scan


@dataclass
class CuratedScan(DatasetScan):
    """A DatasetScan with a curation applied; `curation` says what changed (saved with split.json)."""

    curation: dict = field(default_factory=dict)

    def report(self) -> str:
        return super().report() + ("\n" + curation_report(self.curation) if self.curation else "")


def curation_report(record: dict) -> str:
    lines = [
        f"Curation: {record.get('file') or 'decisions'}: {len(record['excluded'])} excluded, "
        f"{len(record['relabelled'])} relabelled, {record['kept']} kept as they are"
    ]
    lines += [
        f"  excluded {e['path']} ({e['split']}, {e['class']}){': ' + e['note'] if e.get('note') else ''}"
        for e in record["excluded"]
    ]
    lines += [f"  relabelled {r['path']} ({r['split']}): {r['from']} -> {r['to']}" for r in record["relabelled"]]
    if record["unknown"]:
        lines.append(
            f"  {len(record['unknown'])} decision(s) name files not in this dataset (ignored): "
            + ", ".join(record["unknown"][:5])
            + (" ..." if len(record["unknown"]) > 5 else "")
        )
    return "\n".join(lines)


def apply_curation(scan: DatasetScan, curation: Curation) -> CuratedScan:
    """A new scan with the decisions applied (the given scan and the folder are left alone).

    The split itself does not move: excluded files leave their split, relabelled files stay in theirs
    with the new class. Decisions for paths the scan does not have (deleted, skipped as unreadable)
    are listed under `unknown`, not an error: the data changed since the review."""
    where = curation.source or CURATION_FILE
    decisions = curation.by_path()
    index = {name: i for i, name in enumerate(scan.classes)}
    _check_relabels(where, decisions, index)
    excluded: list[dict] = []
    relabelled: list[dict] = []
    kept = 0
    seen: set[str] = set()
    new_splits: dict[str, list[tuple[str, int]]] = {}
    for split in SPLIT_ORDER:
        kept_items = []
        for rel, label in getattr(scan, split):
            chosen = decisions.get(rel)
            seen.add(rel)
            if chosen is None:
                kept_items.append((rel, label))
                continue
            if chosen.action == "exclude":
                excluded.append(
                    {
                        "path": rel,
                        "split": split,
                        "class": scan.classes[label],
                        **({"note": chosen.note} if chosen.note else {}),
                    }
                )
                continue
            # a relabel's label is a class of this scan: checked above
            new = index[chosen.label] if chosen.action == "relabel" and chosen.label is not None else label
            if new != label:
                relabelled.append({"path": rel, "split": split, "from": scan.classes[label], "to": chosen.label})
            else:
                kept += 1  # a keep, or a relabel to the class it already has
            kept_items.append((rel, new))
        new_splits[split] = kept_items
    unknown = sorted(set(decisions) - seen)
    record = {
        "file": curation.source,
        "format": CURATION_FORMAT,
        "excluded": excluded,
        "relabelled": relabelled,
        "kept": kept,
        "unknown": unknown,
    }

    notes = _curated_notes(where, scan, curation, new_splits, unknown)
    base = {f.name: copy.deepcopy(getattr(scan, f.name)) for f in dataclasses.fields(DatasetScan)}
    return CuratedScan(**{**base, **new_splits, "warnings": notes, "curation": record})


# ---------------------------------------------------------------------------------------------
# Decisions from the data doctor


def _check_relabels(where: str, decisions: dict[str, Decision], index: dict[str, int]) -> None:
    for decision in decisions.values():
        if decision.action == "relabel" and decision.label not in index:
            raise FinetuneError(
                f"{where}: relabel of {decision.path!r} to {decision.label!r}: not a class of "
                f"this dataset ({', '.join(index)})"
            )


def _curated_notes(
    where: str, scan: DatasetScan, curation: Curation, new_splits: dict[str, list[tuple[str, int]]], unknown: list[str]
) -> list[str]:
    """The scan's warnings and what the curation changed that a user should know; no training image
    left in a class is an error."""
    empty = [name for i, name in enumerate(scan.classes) if not any(lb == i for _, lb in new_splits["train"])]
    if empty:
        raise FinetuneError(f"{where}: after the curation class {empty[0]!r} has no training image left")
    notes = list(scan.warnings)
    for i, name in enumerate(scan.classes):
        if any(lb == i for _, lb in scan.val) and not any(lb == i for _, lb in new_splits["val"]):
            notes.append(f"after the curation class {name!r} has no validation image; its metrics will be empty")
    if unknown:
        notes.append(f"the curation names {len(unknown)} file(s) that are not in the data (ignored)")
    if Path(curation.data).expanduser().resolve() != Path(scan.root).resolve():
        notes.append(f"the curation was made for {curation.data}, applied to {scan.root} (paths are relative)")
    return notes


def leak_decisions(duplicate_groups: list[dict]) -> list[Decision]:
    """For each group that spans splits: exclude the copies outside the earliest split it is in.

    A copy of a training image in val (or test) is a free answer the model has seen; removing the
    val/test copy keeps the training data whole and makes the validation honest. A group spread over
    val and test alone keeps its val copies and drops the test ones."""
    decisions = []
    for group in duplicate_groups:
        splits = group["splits"]
        if len(set(splits)) < 2:
            continue
        first = min(splits, key=SPLIT_ORDER.index)
        originals = [p for p, s in zip(group["paths"], splits, strict=True) if s == first]
        for path, split in zip(group["paths"], splits, strict=True):
            if split != first:
                decisions.append(
                    Decision(
                        path,
                        "exclude",
                        note=f"leak: {group['kind']} duplicate in {split} of {first} file {originals[0]}",
                    )
                )
    return decisions


def add_decisions(curation: Curation, decisions: list[Decision]) -> Curation:
    for decision in decisions:
        curation.set(decision.path, decision.action, decision.label, decision.note, decision.pool)
    return curation


def default_curation_path(runs_dir: str | Path, data_root: str | Path) -> Path:
    """Where the Review tab (and `doctor --leaks-to` by default) keeps decisions: `curation.json` next
    to the runs, or `curation-<data folder name>.json` when curation.json already belongs to another
    data folder (two datasets reviewed from one studio do not mix their decisions)."""
    runs = Path(runs_dir).expanduser()
    root = Path(data_root).expanduser().resolve()
    plain = runs / CURATION_FILE
    try:
        owner = json.loads(plain.read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return plain  # absent or unreadable: the plain name (an unreadable one fails clearly on load)
    if owner is None or Path(owner).expanduser().resolve() == root:
        return plain
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "data"
    return runs / f"curation-{slug}.json"

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
from typing import cast

from .config import FinetuneError
from .data import DatasetScan, check_image, is_image_file
from .data_doctor.duplicates import file_sha256
from .fsutil import JSON_ERRORS, read_json, write_text_atomic
from .labels import file_inside
from .names import printable, unsafe_name_reason

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

    @classmethod
    def from_dict(cls, data: dict) -> CuratedScan:
        """split.json of a curated run. Its added pool images are in train by their absolute paths, and
        each must be one of its curation record's `added` (pool, path): nothing else may lie outside the
        root (a run folder may come from anyone)."""
        allowed = recorded_adds(data.get("curation") if isinstance(data, dict) else None)
        train = data.get("train") if isinstance(data, dict) else None
        if not allowed or not isinstance(train, list):
            return cast(CuratedScan, super().from_dict(data))

        def is_added(item: object) -> bool:
            return isinstance(item, (list, tuple)) and len(item) == 2 and item[0] in allowed

        scan = cast(CuratedScan, super().from_dict({**data, "train": [i for i in train if not is_added(i)]}))
        added = [(item[0], item[1]) for item in train if is_added(item)]
        if not all(isinstance(lb, int) and not isinstance(lb, bool) and 0 <= lb < len(scan.classes) for _, lb in added):
            raise ValueError("its added pool images' labels are not class indices")
        scan.train = scan.train + added
        return scan


def added_item(pool: str, path: str) -> str:
    """How an added pool image is named in the split (the scan's train list, split.json): its absolute
    path, which `Path(scan.root) / item` leaves as it is, so every reader of the split finds the file."""
    return (Path(pool) / path).as_posix()


def recorded_adds(record: object) -> set[str]:
    """The split items a curation record's `added` allows; ValueError when the list is malformed."""
    entries = record.get("added") if isinstance(record, dict) else None
    if not isinstance(entries, list):
        return set()
    items = set()
    for entry in entries:
        pool = entry.get("pool") if isinstance(entry, dict) else None
        if not isinstance(pool, str) or not Path(pool).is_absolute():
            raise ValueError("its curation's 'added' is not a list of pool files")
        try:
            items.add(added_item(pool, normalise_path(entry.get("path"), "added")))
        except FinetuneError as error:
            raise ValueError(str(error)) from None
    return items


def curation_report(record: dict) -> str:
    added, not_added = record.get("added", []), record.get("not_added", [])
    lines = [
        f"Curation: {record.get('file') or 'decisions'}: {len(record['excluded'])} excluded, "
        f"{len(record['relabelled'])} relabelled, "
        + (f"{len(added)} added from a pool, " if added or not_added else "")
        + f"{record['kept']} kept as they are"
    ]
    lines += [
        f"  excluded {e['path']} ({e['split']}, {e['class']}){': ' + e['note'] if e.get('note') else ''}"
        for e in record["excluded"]
    ]
    lines += [f"  relabelled {r['path']} ({r['split']}): {r['from']} -> {r['to']}" for r in record["relabelled"]]
    lines += [f"  added {printable(added_item(a['pool'], a['path']))} (train): {a['class']}" for a in added]
    lines += [f"  not added {printable(added_item(a['pool'], a['path']))}: {a['reason']}" for a in not_added]
    if record["unknown"]:
        lines.append(
            f"  {len(record['unknown'])} decision(s) name files not in this dataset (ignored): "
            + ", ".join(record["unknown"][:5])
            + (" ..." if len(record["unknown"]) > 5 else "")
        )
    return "\n".join(lines)


def apply_curation(scan: DatasetScan, curation: Curation) -> CuratedScan:
    """A new scan with the decisions applied (the given scan, the folder and the pools are left alone).

    The split itself does not move: excluded files leave their split, relabelled files stay in theirs
    with the new class, added pool images join train (by their absolute paths: `added_item`). Decisions
    for paths the scan does not have (deleted, skipped as unreadable) are listed under `unknown`, not an
    error: the data changed since the review. Added files that may not be read, or that are already in
    the data, are listed under `not_added` with the reason."""
    where = curation.source or CURATION_FILE
    decisions = curation.by_path()
    index = {name: i for i, name in enumerate(scan.classes)}
    _check_labels(where, curation.decisions, index)
    record: dict = {"file": curation.source, "format": CURATION_FORMAT, "excluded": [], "relabelled": [], "kept": 0}
    new_splits = {split: _curated_split(scan, split, decisions, index, record) for split in SPLIT_ORDER}
    present = {rel for split in SPLIT_ORDER for rel, _ in getattr(scan, split)}
    record["unknown"] = sorted(set(decisions) - present)
    record["added"], record["not_added"] = _pool_images(scan.root, curation.adds(), new_splits)
    new_splits["train"] = new_splits["train"] + [
        (added_item(a["pool"], a["path"]), index[a["class"]]) for a in record["added"]
    ]

    notes = _curated_notes(where, scan, curation, new_splits, record)
    base = {f.name: copy.deepcopy(getattr(scan, f.name)) for f in dataclasses.fields(DatasetScan)}
    return CuratedScan(**{**base, **new_splits, "warnings": notes, "curation": record})


def _curated_split(
    scan: DatasetScan, split: str, decisions: dict[str, Decision], index: dict[str, int], record: dict
) -> list[tuple[str, int]]:
    """One split's items with the data files' decisions applied; what changed goes into `record`."""
    kept_items = []
    for rel, label in getattr(scan, split):
        chosen = decisions.get(rel)
        if chosen is None:
            kept_items.append((rel, label))
            continue
        if chosen.action == "exclude":
            note = {"note": chosen.note} if chosen.note else {}
            record["excluded"].append({"path": rel, "split": split, "class": scan.classes[label], **note})
            continue
        # a relabel's label is a class of this scan: checked by _check_labels
        new = index[chosen.label] if chosen.action == "relabel" and chosen.label is not None else label
        if new != label:
            record["relabelled"].append({"path": rel, "split": split, "from": scan.classes[label], "to": chosen.label})
        else:
            record["kept"] += 1  # a keep, or a relabel to the class it already has
        kept_items.append((rel, new))
    return kept_items


# ---------------------------------------------------------------------------------------------
# Added pool images


def _pool_images(root: str, adds: list[Decision], splits: dict[str, list[tuple[str, int]]]) -> tuple[list, list]:
    """(added, not added) records of the add decisions: a file joins when it may be read as any data
    file (`pool_file_problem`) and its bytes are neither a data image's nor an earlier add's."""
    added: list[dict] = []
    not_added: list[dict] = []
    digests: dict[int, str] = {}
    for number, decision in enumerate(adds):
        entry = {"path": decision.path, "pool": decision.pool, "class": decision.label}
        reason = pool_file_problem(decision)
        if reason is None:
            try:
                digests[number] = file_sha256(Path(cast(str, decision.pool)) / decision.path)
            except (OSError, FinetuneError) as error:
                reason = f"cannot be read: {getattr(error, 'strerror', None) or error}"
        if reason is not None:
            not_added.append({**entry, "reason": reason})
    in_data = _data_digests(Path(root), splits, adds, digests)
    first: dict[str, str] = {}
    for number, digest in digests.items():
        decision = adds[number]
        entry = {"path": decision.path, "pool": decision.pool, "class": decision.label}
        where = added_item(cast(str, decision.pool), decision.path)
        if digest in in_data:
            not_added.append({**entry, "reason": f"already in the data (the same image as {in_data[digest]})"})
        elif digest in first:
            not_added.append({**entry, "reason": f"the same image as {first[digest]}, added already"})
        else:
            first[digest] = where
            added.append(entry)
    return added, not_added


def pool_file_problem(decision: Decision) -> str | None:
    """Why the added file may not be trained on (None: it may): the rules of any data file. Inside its
    pool after symlinks are resolved, a regular file (never a FIFO), an image by its name and
    decodable within the format and pixel limits (data.check_image)."""
    pool = Path(cast(str, decision.pool))
    if not pool.is_dir():
        return "its pool folder is not there"
    reason = unsafe_name_reason(decision.path)
    if reason is not None:
        return reason
    if not is_image_file(decision.path):
        return "not an image file (by its name)"
    reason = file_inside(pool.resolve(), decision.path, "the pool")
    if reason is not None:
        return reason
    return check_image(pool / decision.path)


def _data_digests(
    root: Path, splits: dict[str, list[tuple[str, int]]], adds: list[Decision], digests: dict[int, str]
) -> dict[str, str]:
    """{sha256: data file} of the data files that may be an added file's copy: only those of an added
    file's byte size are read (a stat per data file, not a hash)."""
    sizes = set()
    for number in digests:
        try:
            sizes.add((Path(cast(str, adds[number].pool)) / adds[number].path).stat().st_size)
        except OSError:
            continue
    found: dict[str, str] = {}
    for split in SPLIT_ORDER:
        for rel, _ in splits[split]:
            try:
                if (root / rel).stat().st_size in sizes:
                    found.setdefault(file_sha256(root / rel), rel)
            except (OSError, FinetuneError):  # gone or swapped since the scan: training will say so
                continue
    return found


def _check_labels(where: str, decisions: list[Decision], index: dict[str, int]) -> None:
    """A relabel's or an add's class must be one of the scan's."""
    for decision in decisions:
        if decision.action in ("relabel", "add") and decision.label not in index:
            pool = f" (pool {decision.pool})" if decision.pool else ""
            raise FinetuneError(
                f"{where}: {decision.action} of {decision.path!r}{pool} to {decision.label!r}: not a class of "
                f"this dataset ({', '.join(index)})"
            )


def _curated_notes(
    where: str, scan: DatasetScan, curation: Curation, new_splits: dict[str, list[tuple[str, int]]], record: dict
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
    if record["unknown"]:
        notes.append(f"the curation names {len(record['unknown'])} file(s) that are not in the data (ignored)")
    if record["not_added"]:
        notes.append(
            f"{len(record['not_added'])} of the curation's {len(record['added']) + len(record['not_added'])} "
            "added pool image(s) were not added (the curation report says why)"
        )
    if Path(curation.data).expanduser().resolve() != Path(scan.root).resolve():
        notes.append(f"the curation was made for {curation.data}, applied to {scan.root} (paths are relative)")
    return notes


# ---------------------------------------------------------------------------------------------
# Decisions from the data doctor


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
    except (OSError, AttributeError, *JSON_ERRORS):
        return plain  # absent or unreadable: the plain name (an unreadable one fails clearly on load)
    if owner is None or Path(owner).expanduser().resolve() == root:
        return plain
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.name) or "data"
    return runs / f"curation-{slug}.json"

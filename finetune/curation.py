"""The curation file: the user's decisions about single images, applied to a scan, never to the folder.

`curation.json` lives next to the runs (never inside the dataset):

    {"format": "finetune-curation/1", "data": "/abs/path/to/data",
     "decisions": [{"path": "train/roses/1.jpg", "action": "exclude", "note": "leak: ..."},
                   {"path": "train/tulips/7.jpg", "action": "relabel", "label": "roses"},
                   {"path": "val/daisy/3.jpg", "action": "keep"}]}

Paths are relative to the data root, with forward slashes. One decision per path: a later one for
the same path replaces the earlier (the Review tab changes its mind by appending). `keep` records
that a flagged image was looked at and is fine (the Review tab then stops showing it); `exclude`
drops the file from train, val and test; `relabel` moves it to another existing class in whichever
split it is in. Leaking duplicates (`leak_decisions`) become plain `exclude` decisions for the copies
outside the earliest split, with a `note` saying which file they duplicate.
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
ACTIONS = ("keep", "exclude", "relabel")
SPLIT_ORDER = ("train", "val", "test")


@dataclass
class Decision:
    path: str
    action: str
    label: str | None = None  # the new class, for relabel
    note: str | None = None  # why (shown in the report), optional

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class Curation:
    data: str
    decisions: list[Decision] = field(default_factory=list)
    source: str | None = None  # the file it was loaded from (for messages); not saved

    def set(self, path: str, action: str, label: str | None = None, note: str | None = None) -> Decision:
        """Record a decision, replacing any earlier one for the same path."""
        decision = _decision({"path": path, "action": action, "label": label, "note": note}, "decision")
        self.decisions = [d for d in self.decisions if d.path != decision.path] + [decision]
        return decision

    def by_path(self) -> dict[str, Decision]:
        return {d.path: d for d in self.decisions}

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
    note = raw.get("note")
    if note is not None and not isinstance(note, str):
        raise FinetuneError(f"{where}: 'note' of {path!r} must be a string")
    return Decision(path, action, label if action == "relabel" else None, note)


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
        decision = _decision(item, f"{path}, decision {number}")
        curation.decisions = [d for d in curation.decisions if d.path != decision.path] + [decision]
    return curation


def load_or_new_curation(path: str | Path, data_root: str | Path) -> Curation:
    """The curation file at `path`, or a new, empty one for `data_root` when there is none yet."""
    return load_curation(path) if Path(path).expanduser().is_file() else new_curation(data_root)


def save_curation(curation: Curation, path: str | Path) -> Path:
    """Write atomically (a reader never sees half a file); refuses a place inside the dataset."""
    path = Path(path).expanduser()
    data_root = Path(curation.data).expanduser().resolve()
    target = path.resolve()
    if target == data_root or data_root in target.parents:
        raise FinetuneError(
            f"the curation file must not be inside the dataset {data_root}: {path} (keep it next to the runs)"
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
        curation.set(decision.path, decision.action, decision.label, decision.note)
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

"""Labels from a CSV file: a flat folder of images and a file of `path,label[,split]` rows (Kaggle and
lab exports, Hugging Face's metadata.csv), read into the same per-split lists as class folders, so
that the scan, the split, the doctor and training downstream do not know the difference.

The file comes from strangers as often as the images do:

* it must be a regular file of at most MAX_LABELS_BYTES (a label file, not a dump);
* the separator (`,` `;` tab `|`) and a header are sniffed; a BOM, CRLF and quoted cells are fine;
* a path is relative to the data folder and must stay inside it: absolute paths, `..` and symlinks
  that lead out are refused (named in the report, never opened);
* a row naming a missing file, or a file listed twice with two labels (a `conflict`, as the doctor
  calls two copies of one image in two classes), or a row without a label is skipped and named;
* several labels on a row (multi-label) is an error that says it is not supported.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath

from .config import FinetuneError
from .fsutil import NotRegularFile, open_regular
from .names import printable, unsafe_name_reason

MAX_LABELS_BYTES = 64 * 1024**2  # ~1 million rows of typical paths: far more than anyone labels by hand
DELIMITERS = ",;\t|"
SNIFF_CHARS, SNIFF_LINES = 4096, 20
DRIVE = re.compile(r"[A-Za-z]:")  # C:... (Windows), but not 8:30am.png
PATH_HEADERS = ("path", "file", "filename", "file_name", "image", "image_path")
LABEL_HEADERS = ("label", "class", "category", "target")
SPLIT_HEADERS = ("split", "set", "subset", "fold")
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class LabelRows:
    """What a labels file says: per split ("all" when it gives none), per class, the paths; and the
    rows it skipped with why."""

    per_split: dict[str, dict[str, list[str]]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def read_text(path: Path) -> str:
    """The file's text: a regular file (not a FIFO), bounded, UTF-8 with or without a BOM."""
    try:
        with open_regular(path) as file:
            size = os.fstat(file.fileno()).st_size
            if size > MAX_LABELS_BYTES:
                raise FinetuneError(
                    f"labels file {path} is {size / 1e6:,.0f} MB: too large to be a label file "
                    f"(at most {MAX_LABELS_BYTES / 1e6:,.0f} MB)"
                )
            data = file.read(MAX_LABELS_BYTES + 1)
    except FileNotFoundError:
        raise FinetuneError(f"labels file not found: {path}") from None
    except NotRegularFile as error:
        raise FinetuneError(f"labels file {path}: {error}") from None
    except OSError as error:
        raise FinetuneError(f"cannot read labels file {path}: {error.strerror or error}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FinetuneError(f"labels file {path} is not UTF-8 text (byte {error.start})") from None


def _rows(text: str, path: Path) -> Iterator[tuple[int, list[str]]]:
    # a few lines are enough to tell the separator, and csv.Sniffer's regexes take quadratic time
    # (a crafted 64 KB sample costs half a minute of CPU)
    sample = "".join(text[:SNIFF_CHARS].splitlines(keepends=True)[:SNIFF_LINES])
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(sample, delimiters=DELIMITERS)
    except csv.Error:
        dialect = csv.excel  # one column, or nothing to tell: commas
    try:
        for number, row in enumerate(csv.reader(io.StringIO(text, newline=""), dialect), start=1):
            yield number, [cell.strip() for cell in row]
    except csv.Error as error:
        raise FinetuneError(f"labels file {path} is not a CSV file: {error}") from None


def _columns(header: list[str]) -> dict[str, int] | None:
    """{path, label[, split]: column} when the first row is a header, else None."""
    names = [cell.casefold() for cell in header]

    def find(candidates: tuple[str, ...]) -> int | None:
        return next((i for i, name in enumerate(names) if name in candidates), None)

    path, label, split = find(PATH_HEADERS), find(LABEL_HEADERS), find(SPLIT_HEADERS)
    if path is None or label is None:
        return None
    return {"path": path, "label": label, **({"split": split} if split is not None else {})}


def read_labels(labels: str | Path, root: Path) -> LabelRows:
    """The labels file's rows as per-split, per-class relative paths under `root`."""
    path = Path(labels).expanduser()
    rows = [(n, row) for n, row in _rows(read_text(path), path) if any(row)]
    if not rows:
        raise FinetuneError(f"labels file {path} has no rows")
    columns = _columns(rows[0][1])
    header_width = None if columns is None else len(rows[0][1])
    if columns is None:  # no header: path, label and maybe the split, in that order
        columns = {"path": 0, "label": 1, "split": 2}
    else:
        rows = rows[1:]
    result = LabelRows({})
    seen: dict[str, tuple[str, str, int]] = {}  # rel -> (label, split, row)
    conflicts: dict[str, set[str]] = {}
    for number, row in rows:
        parsed = _row(row, columns, number, path, header_width)
        if isinstance(parsed, tuple) and len(parsed) == 2:  # (what, why): skipped
            result.skipped.append(parsed)
            continue
        rel, label, split = parsed
        found = inside(root, rel)
        if isinstance(found, str):
            result.skipped.append((rel, f"{found} (row {number} of {path.name})"))
            continue
        # one file, however it is written (./a.png, a.png/, .//a.png, a link to it): one key, so that
        # two labels of it are a conflict and it cannot be in train and val at once
        rel = found.relative_to(root).as_posix()
        if rel in seen and seen[rel][0] != label:
            conflicts.setdefault(rel, {seen[rel][0]}).add(label)
            continue
        seen.setdefault(rel, (label, split, number))
    for rel, names in sorted(conflicts.items()):
        seen.pop(rel, None)
        shown = " and ".join(repr(printable(n)) for n in sorted(names))
        result.skipped.append((rel, f"conflict: labelled {shown} in {path.name}"))
    if conflicts:
        result.notes.append(
            f"{len(conflicts)} file(s) have two labels in {path.name} (conflict): left out until one is chosen"
        )
    given = {split for _, split, _ in seen.values() if split}
    for rel, (label, split, _) in seen.items():
        where = split or ("train" if given else "all")  # rows without a split, beside rows with one: train
        result.per_split.setdefault(where, {}).setdefault(label, []).append(rel)
    return result


def _row(
    row: list[str], columns: dict[str, int], number: int, path: Path, header_width: int | None
) -> tuple[str, str, str] | tuple[str, str]:
    """(relative path, label, split) of a row, or (what, why) for one to skip; FinetuneError for a
    multi-label row: more cells than the header has, or without a header a cell after the label that
    is not a split name."""

    def cell(index: int | None) -> str:
        return row[index] if index is not None and index < len(row) else ""

    rel, label = cell(columns["path"]).replace("\\", "/"), cell(columns["label"])
    split = cell(columns.get("split")).casefold()
    if header_width is None:
        rest = row[2:]
        if rest and rest[0].casefold() in SPLIT_NAMES:
            rest = rest[1:]
        else:
            split = ""
        extra = [c for c in rest if c]
    else:
        extra = [c for c in row[header_width:] if c]
    if extra:
        cells = [label, *extra]
        shown = ", ".join(repr(printable(c)[:40]) for c in cells[:3]) + (
            f" and {len(cells) - 3} more" if len(cells) > 3 else ""
        )
        raise FinetuneError(
            f"row {number} of {path} gives several labels ({shown}): "
            f"multi-label classification is not supported, one label per image"
        )
    if not rel:
        return f"row {number} of {path.name}", "no path"
    if not label:
        return rel, f"no label (row {number} of {path.name})"
    if split and split not in SPLIT_NAMES:
        return rel, f"unknown split {split!r} (row {number} of {path.name}): use train, val or test"
    reason = unsafe_name_reason(label) or unsafe_name_reason(rel)
    if reason:
        return printable(rel), f"{reason} (row {number} of {path.name})"
    return rel, label, SPLIT_NAMES.get(split, "")


def inside(root: Path, rel: str) -> Path | str:
    """The file `rel` names under the resolved folder `root` (links and ./ resolved), or why it may
    not be read: absolute, climbing out with `..`, a symlink that leads out, or not a file."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or DRIVE.match(rel) or rel.startswith("//"):
        return "an absolute path: paths in a labels file are relative to the data folder"
    if ".." in pure.parts:
        return "the path leaves the data folder (..)"
    found = resolved_inside(root, pure)
    return "listed in the labels file but not found" if found == NOT_FOUND else found


NOT_FOUND = "not found"


def file_inside(root: Path, rel: str | PurePath, folder: str = "the data folder") -> str | None:
    """Why the file `rel` of the resolved folder `root` may not be read (None: it may): NOT_FOUND, a
    symlink that leads out of `folder` (as it is named in the reason), or not a regular file (a FIFO
    would block its reader). Also the curation's pool files (curation.apply_curation)."""
    found = resolved_inside(root, rel, folder)
    return found if isinstance(found, str) else None


def resolved_inside(root: Path, rel: str | PurePath, folder: str = "the data folder") -> Path | str:
    """The file `rel` of the resolved folder `root`, resolved, or why it may not be read (file_inside)."""
    try:
        resolved = (root / rel).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        return NOT_FOUND
    except (OSError, RuntimeError) as error:  # a symlink loop, a name too long
        return f"cannot be read: {error}"
    if not resolved.is_relative_to(root):
        return f"a link that leads out of {folder}"
    if not resolved.is_file():
        return "not a file"
    return resolved

"""Safe extraction of a dataset .zip (uploaded in the browser or given on the command line).

Every entry is checked before anything is written: no entry may leave the target folder
(`../`, absolute paths, drive letters), symlinks are refused, entries may not share their data
(overlapping entries, CVE-2024-0450), and the number of entries, the total uncompressed size and
the compression ratio (claimed per entry, and against the archive's real size on disk) are limited
(zip bombs), as are how deep entries are nested and how long their names are (a zip unpacking
1,000 folders deep breaks every later walk of the folder). An image file whose name holds control
or bidirectional-control characters is refused (see finetune.names). Only image files are
written: anything else (.html, .svg, .js, ...) could be served back to a browser by the app, so it
is left in the archive and reported as skipped, with a reason.

The archive is extracted into a fresh temporary folder that is renamed into place once complete,
so nothing the user has is ever overwritten and no one sees a half-written dataset. The manifest
written last (`.complete`) records the archive's full sha256, what was written and what was skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import stat
import struct
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NoReturn

from .config import FinetuneError
from .data import IMAGE_EXTENSIONS, is_ignored
from .fsutil import human_size, open_user_file, remove_tree, walk
from .labels import MAX_LABELS_BYTES
from .names import printable, unsafe_name_reason

MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 8 * 1024**3  # 8 GiB uncompressed
MAX_RATIO = 200  # uncompressed / compressed, per entry and overall (images hardly compress)
RATIO_MIN_BYTES = 1024 * 1024  # ratios of entries smaller than this are not checked (tiny text files)
MAX_DEPTH = 32  # path parts of an entry (folders and the file): real datasets nest a few levels
MAX_NAME_BYTES = 255  # one file or folder name, in UTF-8 (what Linux and macOS file systems allow)
LABELS_EXTENSIONS = {".csv", ".tsv"}  # written too, up to MAX_LABELS_BYTES each: see _skip_reason
MAX_PATH_BYTES = 1024  # a whole entry's path, in UTF-8: well inside PATH_MAX (4096) under any folder
MANIFEST = ".complete"  # hidden, so scans never take it for data
BLOCK = 4096  # a file takes whole blocks on disk, however small it is
STALE_AFTER_S = 24 * 3600  # temporary folders older than this were left by a process that died
_DRIVE = re.compile(r"^[A-Za-z]:")
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, fixed fields, file name length, extra field length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class QuotaExceeded(FinetuneError):
    """The extraction would take a folder over its disk quota (the numbers are there to reword it)."""

    def __init__(self, message: str, folder: Path, used: int, need: int, limit: int):
        super().__init__(message)
        self.folder, self.used, self.need, self.limit = folder, used, need, limit


@dataclass
class ZipContents:
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]]  # (entry, safe relative parts) to write
    skipped: list[tuple[str, str]]  # (entry name, reason) of what is not written
    total_bytes: int  # uncompressed size of the files to write


@dataclass
class Extraction:
    root: Path  # the dataset root: the folder, or its single top folder (my_data/cats/...)
    folder: Path  # dest_parent/<name>-<hash>
    archive: str
    sha256: str
    files: int
    bytes: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    reused: bool = False  # an earlier, complete extraction of the same archive


def _entry_parts(info: zipfile.ZipInfo, source: str) -> tuple[str, ...]:
    """The entry's path as safe relative parts; FinetuneError if it could leave the target."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name) or "\x00" in name:
        raise FinetuneError(f"{source}: refusing entry with an absolute path: {info.filename!r}")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if ".." in parts:
        raise FinetuneError(f"{source}: refusing entry that leaves the folder: {info.filename!r}")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise FinetuneError(f"{source}: refusing symbolic link entry: {info.filename!r}")
    if len(parts) > MAX_DEPTH:
        raise FinetuneError(
            f"{source}: refusing entry nested {len(parts)} levels deep (at most {MAX_DEPTH} "
            f"are accepted): {_shown(name)}"
        )
    longest = max((len(part.encode()) for part in parts), default=0)
    if longest > MAX_NAME_BYTES:
        raise FinetuneError(
            f"{source}: refusing entry with a name of {longest} bytes (at most {MAX_NAME_BYTES} "
            f"are accepted): {_shown(name)}"
        )
    if len(name.encode()) > MAX_PATH_BYTES:
        raise FinetuneError(
            f"{source}: refusing entry with a path of {len(name.encode())} bytes (at most "
            f"{MAX_PATH_BYTES} are accepted): {_shown(name)}"
        )
    return parts


def _shown(name: str, limit: int = 120) -> str:
    """An entry's name for a one-line message: escaped, and cut short when long."""
    shown = printable(name)
    return f"'{shown if len(shown) <= limit else shown[:limit] + '...'}'"


def _skip_reason(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(what to name, why) when an entry is not written; None for an image file or a labels file
    (a flat folder's `metadata.csv` travels in its zip: `--labels metadata.csv` finds it there)."""
    for depth, part in enumerate(parts[:-1]):
        if is_ignored(part):  # __MACOSX/ holds one ._ file per image: name the folder once
            return "/".join(parts[: depth + 1]) + "/", "hidden or system folder"
    if is_ignored(parts[-1]):
        return "/".join(parts), "hidden or system file"
    if PurePosixPath(parts[-1]).suffix.lower() not in IMAGE_EXTENSIONS and not _is_labels_file(parts):
        return "/".join(parts), "not an image file"
    return None


def _is_labels_file(parts: tuple[str, ...]) -> bool:
    return PurePosixPath(parts[-1]).suffix.lower() in LABELS_EXTENSIONS


def _check_overlaps(path: Path, infos: list[zipfile.ZipInfo], source: str) -> None:
    """Refuse entries whose bytes (local header, name, extra field and data) overlap another's or
    run past the end of the file: the central directory can point many entries at one block, and
    then every claimed size and ratio looks harmless (CVE-2024-0450)."""
    real_size = path.stat().st_size
    spans = []
    try:
        with open(path, "rb") as f:
            for info in infos:
                if info.header_offset < 0:
                    raise FinetuneError(
                        f"{source} is not a readable .zip archive (entry {info.filename!r} starts before the file)"
                    )
                f.seek(info.header_offset)
                header = f.read(_LOCAL_HEADER.size)
                if len(header) < _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
                    raise FinetuneError(
                        f"{source} is not a readable .zip archive (entry {info.filename!r} has no local header)"
                    )
                _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
                end = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length + info.compress_size
                if end > real_size:
                    raise FinetuneError(f"{source} is truncated: entry {info.filename!r} ends past the end of the file")
                spans.append((info.header_offset, end, info.filename))
    except OSError as error:
        raise FinetuneError(f"{source} is not a readable .zip archive ({error})") from None
    spans.sort()
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise FinetuneError(
                f"{source}: entries {first!r} and {second!r} overlap (the same data listed "
                f"twice, a zip bomb?); refusing the archive"
            )


def check_zip(
    path: str | Path,
    max_entries: int = MAX_ENTRIES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
) -> ZipContents:
    """Validate every entry; returns the image files to write and what is skipped (with reasons)."""
    path = Path(path)
    source = path.name
    infos = _zip_entries(path, source, max_entries)
    total, compressed, files, skipped, named, not_images = 0, 0, [], [], set(), 0
    for info in infos:
        parts = _entry_parts(info, source)
        if info.flag_bits & 0x1:
            raise FinetuneError(f"{source} is encrypted ({info.filename!r}); use a zip without a password")
        if not parts or info.is_dir():
            continue
        reason = _skip_reason(parts)
        if reason is not None:  # not written, so a strange name does no harm: shown escaped
            reason = (printable(reason[0]), reason[1])
            if not reason[1].startswith("hidden"):
                not_images += 1
            if reason[0] not in named:
                named.add(reason[0])
                skipped.append(reason)
            continue
        unsafe = next(filter(None, map(unsafe_name_reason, parts)), None)
        if unsafe is not None:
            raise FinetuneError(f"{source}: refusing entry {_shown(info.filename)}: {unsafe}")
        if _is_labels_file(parts) and info.file_size > MAX_LABELS_BYTES:
            skipped.append((printable("/".join(parts)), "too large to be a labels file"))
            continue
        total += info.file_size
        compressed += info.compress_size
        if total > max_total_bytes:
            raise FinetuneError(
                f"{source} unpacks to more than {max_total_bytes / 1024**3:.1f} GiB; that is over the limit"
            )
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise FinetuneError(
                f"{source}: entry {info.filename!r} is compressed "
                f"{info.file_size / max(info.compress_size, 1):.0f}:1 (a zip bomb?); "
                f"at most {max_ratio:.0f}:1 is accepted"
            )
        files.append((info, parts))
    _check_overall_ratio(path, source, total, compressed, max_ratio)
    _check_overlaps(path, infos, source)
    labels_files = [parts for _, parts in files if _is_labels_file(parts)]
    if len(labels_files) == len(files):  # nothing but labels files: still no images
        named_labels = [(printable("/".join(parts)), "not an image file") for parts in labels_files]
        _no_files(source, skipped + named_labels, not_images + len(labels_files))
    return ZipContents(files, skipped, total)


def _zip_entries(path: Path, source: str, max_entries: int) -> list[zipfile.ZipInfo]:
    open_user_file(path, "zip file").close()  # a FIFO named .zip would block is_zipfile for ever
    if not zipfile.is_zipfile(path):
        raise FinetuneError(f"{source} is not a .zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise FinetuneError(f"{source} is not a readable .zip archive ({error})") from None
    if len(infos) > max_entries:
        raise FinetuneError(f"{source} has {len(infos):,} entries; at most {max_entries:,} are accepted")
    return infos


def _check_overall_ratio(path: Path, source: str, total: int, compressed: int, max_ratio: float) -> None:
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(compressed, 1):
        raise FinetuneError(
            f"{source} is compressed {total / max(compressed, 1):.0f}:1 overall (a zip bomb?); "
            f"at most {max_ratio:.0f}:1 is accepted"
        )
    # The claimed compressed sizes may all describe one shared block: only the file itself is real.
    real_size = path.stat().st_size
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(real_size, 1):
        raise FinetuneError(
            f"{source} unpacks to {human_size(total)} from {human_size(real_size)} on disk "
            f"({total / max(real_size, 1):.0f}:1, a zip bomb?); at most {max_ratio:.0f}:1 is accepted"
        )


def _no_files(source: str, skipped: list[tuple[str, str]], not_images: int) -> NoReturn:
    if not_images:
        example = next(name for name, why in skipped if not why.startswith("hidden"))
        raise FinetuneError(
            f"{source} contains no image files ({not_images} other file(s), e.g. '{example}'; "
            f"accepted: {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    raise FinetuneError(f"{source} contains no files")


def skipped_summary(skipped: list[tuple[str, str]], limit: int = 5) -> str:
    """'index.html (not an image file), ... and 3 more' for a log line or a message."""
    shown = [f"{name} ({why})" for name, why in skipped[:limit]]
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return ", ".join(shown) + more


def dataset_root(folder: Path) -> Path:
    """The folder itself, or its single sub-folder when the zip held one top folder (my_data/cats/...)."""
    while True:
        children = [p for p in folder.iterdir() if not is_ignored(p.name)]
        if len(children) == 1 and children[0].is_dir():
            inner = children[0]
            # one top folder that itself holds class folders (or train/val): descend
            if any(c.is_dir() for c in inner.iterdir()):
                folder = inner
                continue
        return folder


def file_digest(path: Path, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned[:60] or "data"


def disk_usage(folder: str | Path) -> int:
    """Bytes the files and folders under `folder` take on disk (as `du` counts them: whole blocks,
    each hard-linked file once, symlinks not followed); 0 if it does not exist."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirnames, filenames in walk(folder):
        for name in dirnames + filenames + ["."]:
            try:
                info = os.lstat(os.path.join(dirpath, name))
            except OSError:  # removed while we walk (another extraction cleaning up)
                continue
            if name != "." and stat.S_ISDIR(info.st_mode):
                continue  # counted when the walk enters it
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            blocks = getattr(info, "st_blocks", None)
            total += blocks * 512 if blocks is not None else info.st_size
    return total


def _disk_estimate(contents: ZipContents) -> int:
    """What writing the files will take on disk: whole blocks, and a block per folder."""
    folders = {parts[:-1] for _, parts in contents.files}
    blocks = sum(max(BLOCK, -(-info.file_size // BLOCK) * BLOCK) for info, _ in contents.files)
    return blocks + BLOCK * (len(folders) + 2)


def read_extraction(folder: str | Path) -> Extraction | None:
    """The manifest of a complete extraction (given its folder or the dataset root inside it),
    or None when there is none, or it is from before manifests recorded the archive's sha256."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        marker = candidate / MANIFEST
        if marker.is_file():
            break
    else:
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        sha = data["sha256"]
        if not isinstance(sha, str) or len(sha) != 64:
            return None
        return Extraction(
            root=dataset_root(candidate),
            folder=candidate,
            archive=str(data["archive"]),
            sha256=sha,
            files=int(data["files"]),
            bytes=int(data["bytes"]),
            skipped=[(str(name), str(why)) for name, why in data.get("skipped", [])],
            reused=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_stale(dest_parent: Path, name: str) -> None:
    """Temporary folders of this archive left by a process that died (no extraction takes a day)."""
    now = time.time()
    for leftover in [*dest_parent.glob(f".{name}.partial-*"), *dest_parent.glob(f".{name}.old-*")]:
        try:
            if leftover.is_dir() and not leftover.is_symlink() and now - leftover.stat().st_mtime > STALE_AFTER_S:
                remove_tree(leftover)
        except OSError:
            pass


def _install(tmp: Path, target: Path, sha: str, fallback: Path) -> Path:
    """Rename the complete `tmp` to `target` (atomic) and return where it is. When another extraction
    of the same archive got there first, keep that one and drop ours; a complete extraction of another
    archive (same hash prefix) is never touched: ours goes to `fallback`; an incomplete or outdated
    folder in the way is moved aside."""
    for _ in range(10):
        try:
            os.rename(tmp, target)  # fails when target is a folder that is not empty
            return target
        except OSError:
            if not os.path.lexists(target):
                raise
        done = read_extraction(target)
        if done is not None and done.folder == target:
            if done.sha256 == sha:
                remove_tree(tmp)
                return target
            if target != fallback:
                target = fallback
                continue
        aside = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(target, aside)
        except FileNotFoundError:  # someone else moved it aside: try again
            continue
        remove_tree(aside)  # a link in the way is unlinked, never followed
    raise FinetuneError(
        f"could not put the extracted files in place at {target} (other extractions kept replacing it); try again"
    )


def extract(
    path: str | Path,
    dest_parent: str | Path,
    max_dest_bytes: int | None = None,
    quota_folder: str | Path | None = None,
    **limits,
) -> Extraction:
    """Extract the image files into a new folder `dest_parent/<name>-<hash>/`; what was skipped is in
    the result (and in the folder's manifest, see `read_extraction`).

    The same archive extracted again reuses the earlier extraction when it is complete and its manifest
    records this archive's sha256. `max_dest_bytes` is a disk quota for `quota_folder` (default
    `dest_parent`): an extraction that would take the folder over it is refused (QuotaExceeded).
    `limits` go to `check_zip`.
    """
    path = Path(path)
    contents = check_zip(path, **limits)
    dest_parent = Path(dest_parent)
    sha = file_digest(path, length=64)
    target = dest_parent / f"{safe_name(path.stem)}-{sha[:12]}"
    # for another archive whose hash starts the same (made to collide?): the two are never mixed
    fallback = dest_parent / f"{safe_name(path.stem)}-{sha}"
    earlier = read_extraction(target)
    if earlier is not None and earlier.folder == target and earlier.sha256 != sha:
        target = fallback
        earlier = read_extraction(target)
    if earlier is not None and earlier.folder == target and earlier.sha256 == sha:
        return earlier
    if max_dest_bytes is not None:
        _check_quota(path, contents, Path(quota_folder) if quota_folder is not None else dest_parent, max_dest_bytes)
    dest_parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest_parent, target.name)
    # unique per call, so concurrent extractions of one archive never share (or delete) a folder
    tmp = Path(tempfile.mkdtemp(dir=dest_parent, prefix=f".{target.name}.partial-"))
    try:
        _unpack(path, contents, tmp, sha)
        target = _install(tmp, target, sha, fallback)
    except FileExistsError as error:
        remove_tree(tmp)
        raise FinetuneError(f"{path.name} lists the same file twice: {Path(error.filename).name}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        remove_tree(tmp)
        raise FinetuneError(f"{path.name} could not be extracted: {error}") from None
    except BaseException:
        remove_tree(tmp)
        raise
    done = read_extraction(target)
    if done is None:  # only if someone removed it in the instant since
        raise FinetuneError(f"the extraction of {path.name} at {target} disappeared; try again")
    done.reused = False
    return done


def _check_quota(path: Path, contents: ZipContents, folder: Path, max_dest_bytes: int) -> None:
    """QuotaExceeded when the extraction would take `folder` over `max_dest_bytes`."""
    used, need = disk_usage(folder), _disk_estimate(contents)
    if used + need > max_dest_bytes:
        raise QuotaExceeded(
            f"{path.name} unpacks to {human_size(need)}, and {folder} already holds "
            f"{human_size(used)}: that is over its limit of {human_size(max_dest_bytes)}",
            folder,
            used,
            need,
            max_dest_bytes,
        )


def _unpack(path: Path, contents: ZipContents, tmp: Path, sha: str) -> None:
    """The checked entries written into the new folder `tmp`, and its manifest. An entry never lands
    outside `tmp`, nor grows past the size its header gave (both checked again as the bytes come)."""
    real_tmp = tmp.resolve()
    with zipfile.ZipFile(path) as archive:
        for info, parts in contents.files:
            out = tmp.joinpath(*parts)
            if not out.resolve().is_relative_to(real_tmp):  # belt and braces after the checks above
                raise FinetuneError(f"{path.name}: refusing entry that leaves the folder: {info.filename!r}")
            out.parent.mkdir(parents=True, exist_ok=True)
            written = 0
            with archive.open(info) as src, open(out, "xb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    written += len(block)
                    if written > info.file_size:  # the header lied about the size
                        raise FinetuneError(f"{path.name}: entry {info.filename!r} is larger than it says")
                    dst.write(block)
    manifest = {
        "archive": path.name,
        "sha256": sha,
        "files": len(contents.files),
        "bytes": contents.total_bytes,
        "skipped": [list(item) for item in contents.skipped],
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")


def default_datasets_dir() -> Path:
    """Where a dataset .zip given by path is extracted: $FINETUNE_DATASETS, else the user's cache
    ($XDG_CACHE_HOME or ~/.cache)/finetune/datasets."""
    given = os.environ.get("FINETUNE_DATASETS")
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune" / "datasets"


def dataset_folder(data: str | Path, log: Callable[[str], None] | None = None) -> str:
    """DATA as given, or, for a .zip, the folder it was safely extracted to (see `extract`) in
    `default_datasets_dir()`: kept there, since runs refer to it, and reused when the same archive
    comes again. `log` receives the "extracted to" line and what the archive held that was skipped.

    One function for the command line, the Python API and everything else that takes a data path."""
    path = Path(data).expanduser()
    # anything but a folder named .zip goes to the extractor, so a FIFO or a device is refused in one line
    if path.suffix.lower() != ".zip" or not path.exists() or path.is_dir():
        return str(data)
    extraction = extract(path, default_datasets_dir())
    if log is not None:
        log(f"{path.name}: {'already extracted to' if extraction.reused else 'extracted to'} {extraction.root}")
        if extraction.skipped:  # only image files are extracted: say what was left in the archive
            log(f"{path.name}: skipped {skipped_summary(extraction.skipped)}")
    return str(extraction.root)


def extract_zip(path: str | Path, dest_parent: str | Path, **limits) -> Path:
    """Extract (see `extract`) and return the dataset root inside the new folder."""
    return extract(path, dest_parent, **limits).root

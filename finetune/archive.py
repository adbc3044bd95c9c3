"""Safe extraction of a dataset .zip (uploaded in the browser or given on the command line).

Every entry is checked before anything is written: no entry may leave the target folder
(`../`, absolute paths, drive letters), symlinks are refused, and the number of entries, the total
uncompressed size and the compression ratio are limited (zip bombs). The archive is extracted into
a fresh folder that did not exist before, so nothing the user has is ever overwritten.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import zipfile
from pathlib import Path, PurePosixPath

from .config import FinetuneError

MAX_ENTRIES = 100_000
MAX_TOTAL_BYTES = 8 * 1024**3  # 8 GiB uncompressed
MAX_RATIO = 200  # uncompressed / compressed, per entry and overall (images hardly compress)
RATIO_MIN_BYTES = 1024 * 1024  # ratios of entries smaller than this are not checked (tiny text files)
SKIPPED_PARTS = {"__MACOSX", "Thumbs.db", "desktop.ini"}
_DRIVE = re.compile(r"^[A-Za-z]:")


def _skipped(parts: tuple[str, ...]) -> bool:
    return any(p in SKIPPED_PARTS or p.startswith(".") for p in parts)


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
    return parts


def check_zip(path: str | Path, max_entries: int = MAX_ENTRIES, max_total_bytes: int = MAX_TOTAL_BYTES,
              max_ratio: float = MAX_RATIO) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Validate every entry; returns [(info, safe parts)] of the files to extract."""
    path = Path(path)
    source = path.name
    if not path.is_file():
        raise FinetuneError(f"zip file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise FinetuneError(f"{source} is not a .zip archive")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as error:
        raise FinetuneError(f"{source} is not a readable .zip archive ({error})") from None
    if len(infos) > max_entries:
        raise FinetuneError(f"{source} has {len(infos):,} entries; at most {max_entries:,} are accepted")
    total, compressed, files = 0, 0, []
    for info in infos:
        parts = _entry_parts(info, source)
        if info.flag_bits & 0x1:
            raise FinetuneError(f"{source} is encrypted ({info.filename!r}); use a zip without a password")
        if not parts or info.is_dir() or _skipped(parts):
            continue
        total += info.file_size
        compressed += info.compress_size
        if total > max_total_bytes:
            raise FinetuneError(f"{source} unpacks to more than {max_total_bytes / 1024**3:.1f} GiB; "
                                f"that is over the limit")
        if info.file_size >= RATIO_MIN_BYTES and info.file_size > max_ratio * max(info.compress_size, 1):
            raise FinetuneError(f"{source}: entry {info.filename!r} is compressed {info.file_size / max(info.compress_size, 1):.0f}"
                                f":1 (a zip bomb?); at most {max_ratio:.0f}:1 is accepted")
        files.append((info, parts))
    if total >= RATIO_MIN_BYTES and total > max_ratio * max(compressed, 1):
        raise FinetuneError(f"{source} is compressed {total / max(compressed, 1):.0f}:1 overall (a zip bomb?); "
                            f"at most {max_ratio:.0f}:1 is accepted")
    if not files:
        raise FinetuneError(f"{source} contains no files")
    return files


def dataset_root(folder: Path) -> Path:
    """The folder itself, or its single sub-folder when the zip held one top folder (my_data/cats/...)."""
    while True:
        children = [p for p in folder.iterdir() if not _skipped((p.name,))]
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


def extract_zip(path: str | Path, dest_parent: str | Path, **limits) -> Path:
    """Extract into a new folder `dest_parent/<name>-<hash>/` and return the dataset root inside it.

    The same archive extracted twice reuses the first, complete extraction."""
    path = Path(path)
    files = check_zip(path, **limits)
    dest_parent = Path(dest_parent)
    dest_parent.mkdir(parents=True, exist_ok=True)
    target = dest_parent / f"{safe_name(path.stem)}-{file_digest(path)}"
    if (target / ".complete").is_file():
        return dataset_root(target)
    tmp = dest_parent / f".{target.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        real_tmp = tmp.resolve()
        with zipfile.ZipFile(path) as archive:
            for info, parts in files:
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
        (tmp / ".complete").write_text(path.name + "\n")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(tmp, target)
    except FileExistsError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FinetuneError(f"{path.name} lists the same file twice: {Path(error.filename).name}") from None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FinetuneError(f"{path.name} could not be extracted: {error}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dataset_root(target)

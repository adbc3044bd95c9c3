"""Walking and removing folder trees of any depth.

Python 3.11's os.walk, shutil.rmtree and Path.rglob recurse once per folder level, so a tree about
1,000 levels deep (a zip made to unpack that way, or a folder someone made) raises RecursionError in
whatever walks it: a scan, a disk-usage count, a clean-up. These two never recurse, never follow a
symbolic link, and carry on past files that vanish or cannot be read.

open_regular opens a file the user named only if it is a regular file (not a FIFO or a device).

write_atomic writes a file through a temporary file of its own and a rename, so a reader never sees
half a file, two writers never share a temporary name, and a failure (a full disk) leaves nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, BinaryIO, cast

from .config import FinetuneError

_NOFOLLOW_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
# Removal by file descriptors (openat, unlinkat) reaches any depth: a path longer than PATH_MAX
# (4096 bytes) cannot be named, but each folder can be opened relative to its parent.
_BY_FD = (
    {os.open, os.unlink, os.rmdir} <= os.supports_dir_fd and os.scandir in os.supports_fd and hasattr(os, "O_DIRECTORY")
)


def walk(
    top: str | Path,
    max_depth: int | None = None,
    on_too_deep: Callable[[str], None] | None = None,
    on_error: Callable[[OSError], None] | None = None,
) -> Iterator[tuple[str, list[str], list[str]]]:
    """(dirpath, dirnames, filenames) for `top` and every folder under it, top-down and depth-first in
    the order of dirnames, like os.walk(top): sort or prune dirnames in place to choose what is entered.

    Unlike os.walk it keeps an explicit stack (no recursion), and dirnames holds real folders only:
    a symbolic link, to a folder or not, is among filenames and is never entered. Folders more than
    `max_depth` levels below `top` are not entered: each one passes its path to `on_too_deep`.
    A folder that cannot be read goes to `on_error` (ignored by default) and the walk goes on.
    `top` itself is read even when it is a link to a folder, as os.walk does.
    """
    stack: list[tuple[str, int]] = [(os.fspath(top), 0)]
    while stack:
        dirpath, depth = stack.pop()
        dirnames: list[str] = []
        filenames: list[str] = []
        try:
            with os.scandir(dirpath) as entries:
                for entry in entries:
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    (dirnames if is_dir else filenames).append(entry.name)
        except OSError as error:
            if on_error is not None:
                on_error(error)
            continue
        yield dirpath, dirnames, filenames
        if max_depth is not None and depth >= max_depth:
            for name in dirnames:
                if on_too_deep is not None:
                    on_too_deep(os.path.join(dirpath, name))
            continue
        stack.extend((os.path.join(dirpath, name), depth + 1) for name in reversed(dirnames))


def remove_tree(path: str | Path) -> bool:
    """Delete `path` and everything under it, deepest first; True when it is gone.

    A symbolic link is unlinked, never followed (not the top, not one inside). Files that vanish
    meanwhile are fine; what cannot be removed (permissions) is left, the rest still removed.
    """
    path = os.fspath(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return _unlink(path)
    if _BY_FD:
        _clear_by_fd(path)
    else:
        _clear_by_path(path)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _unlink(name: str, dir_fd: int | None = None) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino


def _clear(fd: int) -> list[str]:
    """Unlink every non-folder in the open folder `fd`; its sub-folders' names."""
    folders = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    folders.append(entry.name)
                else:
                    _unlink(entry.name, dir_fd=fd)
    except OSError:
        pass
    return folders


def _clear_by_fd(path: str) -> None:
    """Empty the folder `path` holding one descriptor at a time: down into each sub-folder (opened
    without following links), and back up through '..', checked to be the folder we came from, so a
    folder moved away meanwhile never leads the removal outside the tree."""
    try:
        fd = os.open(path, _NOFOLLOW_DIR)
    except OSError:
        return
    try:
        # per level: (its name in the parent, its identity, the sub-folders still to remove)
        levels: list[tuple[str, tuple[int, int], list[str]]] = [("", _identity(fd), _clear(fd))]
        while levels:
            _, _, pending = levels[-1]
            if pending:
                name = pending.pop()
                try:
                    child = os.open(name, _NOFOLLOW_DIR, dir_fd=fd)
                except OSError as error:
                    if error.errno in (errno.ELOOP, errno.ENOTDIR):  # replaced by a link or file meanwhile
                        _unlink(name, dir_fd=fd)
                    continue
                os.close(fd)
                fd = child
                levels.append((name, _identity(fd), _clear(fd)))
                continue
            name, _, _ = levels.pop()
            if not levels:
                break
            parent = os.open("..", _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = parent
            if _identity(fd) != levels[-1][1]:  # moved meanwhile: stop rather than go elsewhere
                return
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                pass
    except OSError:
        pass
    finally:
        os.close(fd)


def _clear_by_path(path: str) -> None:
    """The same where folders cannot be opened relative to each other (Windows): by whole paths."""
    folders = []
    for dirpath, _, filenames in walk(path):
        folders.append(dirpath)
        for name in filenames:
            _unlink(os.path.join(dirpath, name))
    for dirpath in reversed(folders[1:]):  # every folder after everything under it
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


class NotRegularFile(FinetuneError):
    """A path that is not a regular file (a named pipe, a device, a socket, a folder): reading one
    blocks for ever or never ends, so it is refused unopened. The message is the reason alone; callers
    name the file."""


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return kind
    return "not a file"


def _reading_without_blocking(path: str, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading in binary, only if it is a regular file (a link to one is fine);
    NotRegularFile otherwise, OSError (FileNotFoundError, ...) as open() raises it.

    A FIFO named x.jpg blocks whoever opens it until someone writes, and a device may never end, so
    the path is checked before it is opened (opening a device may itself act); it is opened without
    blocking and checked again on the descriptor, so a file swapped for a FIFO in between is caught."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(f"not a regular file ({_kind(info.st_mode)})")
    file = open(path, "rb", opener=_reading_without_blocking)  # noqa: SIM115 - returned to the caller
    try:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"not a regular file ({_kind(info.st_mode)})")
        if hasattr(os, "set_blocking"):
            os.set_blocking(file.fileno(), True)  # ignored by regular files; cleared for whoever reads on
    except BaseException:
        file.close()
        raise
    return file


def open_user_file(path: str | Path, what: str) -> BinaryIO:
    """open_regular for a file the user named, with its failures as one line naming `what` and the
    path (FinetuneError): not found, not a regular file, unreadable."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise FinetuneError(f"{what} not found: {path}") from None
    except NotRegularFile as error:
        raise FinetuneError(f"refusing {what} {path}: {error}") from None
    except OSError as error:
        raise FinetuneError(f"cannot read {what} {path}: {error.strerror or error}") from None


# What json.loads raises on a file from anyone: ValueError (not JSON, not UTF-8, an int of over 4300
# digits, which Python refuses to convert) and RecursionError (arrays nested too deep for the parser).
JSON_ERRORS = (ValueError, RecursionError)


def read_json(path: str | Path, what: str) -> object:
    """The JSON value in a file the user named; every failure is one line naming `what` and the path:
    not found, not a regular file (a FIFO would block the reader for ever), unreadable, not JSON."""
    with open_user_file(path, what) as file:
        data = file.read()
    try:
        return json.loads(data.decode("utf-8"))
    except JSON_ERRORS as error:
        raise FinetuneError(f"{what} {path} is not valid JSON: {str(error)[:200]}") from None


# ---------------------------------------------------------------------------------------------
# Writing files atomically

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(FinetuneError):
    """No room left to write a file (the disk, or a quota): one line with the path and the space left."""


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def human_size(nbytes: float) -> str:
    """A byte count for people: "512 bytes", "3.4 KB", "12.0 MB", "1.5 GB" (powers of 1000)."""
    for unit in ("bytes", "KB", "MB"):
        if nbytes < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} GB"


def disk_full(error: BaseException, path: str | Path | None = None) -> DiskFull | None:
    """`error` as a DiskFull naming the file (`path` when the error does not), or None when it is
    something else. The OSError may hide behind the exception it caused: torch.save's clean-up
    raises RuntimeError('... inline_container.cc ... unexpected pos') over it."""
    seen: list[BaseException] = []
    cause: BaseException | None = error
    while cause is not None and not any(cause is e for e in seen):
        if isinstance(cause, DiskFull):
            return cause
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return _disk_full_line(cause, path)
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return None


def _disk_full_line(error: OSError, path: str | Path | None) -> DiskFull:
    quota = " or over its quota" if error.errno == errno.EDQUOT else ""
    name = error.filename or path
    if not name:
        return DiskFull(f"disk full{quota}: could not write a file ({error.strerror})")
    target = Path(os.fsdecode(name))
    folder = next((p for p in (target, *target.parents) if p.is_dir()), None)
    try:
        free = f"{_size(shutil.disk_usage(folder).free)} free on that file system" if folder else "free space unknown"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"disk full{quota}: could not write {target} ({free})")


class _Sink:
    """What torch.save writes to: every byte goes out through os.write, so a full disk surfaces as
    OSError(ENOSPC) (torch.save to a path or a buffered file reports only 'unexpected pos')."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        while view:
            view = view[os.write(self.fd, view) :]
        return size

    def flush(self) -> None:
        pass


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path of its own beside `path` (a unique name: two writers never share one) for a
    writer that wants a file name (TorchScript, ONNX); renamed over `path` when the block ends well.
    On any failure the temporary file is removed; a full disk raises DiskFull."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        full = disk_full(error, path)
        if full is not None and full is not error:
            raise full from None
        raise


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(sink)` into a temporary file (see `replacing`), then renamed over `path`. The sink writes
    every byte with os.write, so a full disk is an OSError that `replacing` turns into DiskFull."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            # typed as the file object torch.save and savefig take; they call only write() and flush()
            write(cast(IO[bytes], _Sink(fd)))
        finally:
            os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda sink: sink.write(text.encode("utf-8")))

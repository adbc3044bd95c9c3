"""The studio's workspace folder: what users upload, what the studio hands to the browser, and limits.

    uploads/   datasets extracted from uploaded .zip files (image files only, see finetune.archive);
               an extraction unused for a day is removed
    inputs/    one temporary folder per batch prediction (its zips extracted), removed when it ends
    served/    the only folder the web server serves from: files a handler produced on purpose, of a
               safe type (exports, prediction CSVs, and hard links or copies of run files)
    gradio-cache/  gradio's own cache (GRADIO_TEMP_DIR, set by the app): what browsers uploaded and
               gradio's copies of what the page shows; gradio serves it, uploads only as downloads

Nothing a user uploaded is ever served back: uploads/ and inputs/ hold only images, and they are
not among the server's allowed paths. The workspace as a whole (gradio's cache too) may be held to a
disk quota, checked before anything is extracted or written. The workspace folder is made private
(0700) when it is created here, gradio's cache always: other users of the machine read neither.
No gradio here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..archive import Extraction, QuotaExceeded, disk_usage, extract
from ..config import FinetuneError
from ..fsutil import human_size, remove_tree, walk

# What may be handed to the browser: model files, data (json, csv, txt), images we drew, archives
# we made. Never .html, .svg, .js or anything else a browser would run.
SERVED_SUFFIXES = {".pth", ".pt", ".onnx", ".json", ".csv", ".txt", ".png", ".zip"}
UNUSED_SECONDS = 24 * 3600  # uploads not used for a day, and served files older than that, are removed
LEFTOVER_SECONDS = 6 * 3600  # temporary folders a crash left behind


class Workspace:
    def __init__(self, root: str | Path, quota_bytes: int | None = None):
        self.root = Path(root).expanduser().resolve()
        self.quota_bytes = quota_bytes
        self.root.parent.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(mode=0o700, exist_ok=True)  # an existing folder keeps the mode its owner gave it
        for folder in (self.uploads, self.inputs, self.served):
            folder.mkdir(parents=True, exist_ok=True)
        self.gradio_cache.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.gradio_cache, 0o700)  # also when it was there: gradio's copies are not for other users

    def __fspath__(self) -> str:
        return str(self.root)

    def __truediv__(self, other) -> Path:
        return self.root / other

    @property
    def uploads(self) -> Path:
        return self.root / "uploads"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def served(self) -> Path:
        return self.root / "served"

    @property
    def gradio_cache(self) -> Path:
        return self.root / "gradio-cache"

    # -- the quota
    def usage(self) -> int:
        return disk_usage(self.root)

    def full_message(self, what: str, need: int, used: int) -> str:
        return (
            f"The workspace is full: {what} needs {human_size(need)}, and {self.root} already holds "
            f"{human_size(used)} of its {human_size(self.quota_bytes or 0)} limit. Uploads unused for a "
            f"day are removed; or start the app with a larger --workspace-quota-gb."
        )

    def check_room(self, need: int, what: str) -> None:
        """FinetuneError when writing `need` more bytes would take the workspace over its quota."""
        if self.quota_bytes is None:
            return
        used = self.usage()
        if used + need > self.quota_bytes:
            self.cleanup()
            used = self.usage()
            if used + need > self.quota_bytes:
                raise FinetuneError(self.full_message(what, need, used))

    # -- uploads
    def extract_dataset(self, zip_path: str | Path, keep: tuple[Path, ...] = ()) -> Extraction:
        """An uploaded dataset .zip extracted into uploads/ (or the earlier, complete extraction of it)."""
        self.cleanup(keep=keep)
        extraction = self._extract(zip_path, self.uploads)
        self.touch(extraction.folder)
        return extraction

    def _extract(self, zip_path: str | Path, dest: Path) -> Extraction:
        try:
            return extract(zip_path, dest, max_dest_bytes=self.quota_bytes, quota_folder=self.root)
        except QuotaExceeded as error:
            raise FinetuneError(self.full_message(Path(zip_path).name, error.need, error.used)) from None

    def upload_of(self, path: str | Path) -> Path | None:
        """The uploads/<name>-<hash> folder that `path` lies in, if it does."""
        path = Path(path).resolve()
        if not path.is_relative_to(self.uploads) or path == self.uploads:
            return None
        return self.uploads / path.relative_to(self.uploads).parts[0]

    def touch(self, path: str | Path) -> None:
        """Mark the upload that `path` lies in as used now (its folder's time), so it is kept."""
        folder = self.upload_of(path)
        if folder is not None and folder.is_dir():
            try:
                os.utime(folder)
            except OSError:
                pass

    # -- temporary inputs
    @contextmanager
    def temporary(self):
        """A fresh folder under inputs/, removed with everything in it when the block ends."""
        self.inputs.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=self.inputs, prefix="batch-"))
        try:
            yield folder
        finally:
            remove_tree(folder)

    def extract_input(self, zip_path: str | Path, scratch: Path) -> Extraction:
        """A zip of images to classify, extracted into a temporary folder (see `temporary`)."""
        return self._extract(zip_path, scratch)

    # -- what the browser may download
    def output(self, kind: str, name: str, need: int = 0) -> Path:
        """A path in served/<kind>/ for a file a handler is about to write (the quota checked first)."""
        path = self._served_path(kind, name)
        self.check_room(need, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def publish(self, source: str | Path, kind: str) -> Path:
        """`source` (a file the engine or a handler wrote) made downloadable: a hard link in
        served/<kind>/ (a copy where links are not possible), renewed when the source changes."""
        source = Path(source)
        target = self._served_path(kind, source.name)
        if not source.is_file():
            raise FinetuneError(f"{source.name} does not exist (any more)")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and _same_file(source, target):
            os.utime(target)
            return target
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
        try:
            os.link(source, tmp)
        except OSError:  # another file system, or links not allowed
            self.check_room(source.stat().st_size, source.name)
            shutil.copy2(source, tmp)
        os.replace(tmp, target)
        os.utime(target)
        return target

    def _served_path(self, kind: str, name: str) -> Path:
        if Path(name).suffix.lower() not in SERVED_SUFFIXES:
            raise FinetuneError(f"refusing to serve {name}: only {', '.join(sorted(SERVED_SUFFIXES))} files are served")
        path = (self.served / kind / name).resolve()
        if not path.is_relative_to(self.served.resolve()):
            raise FinetuneError(f"refusing to serve {kind}/{name}: outside {self.served}")
        return path

    # -- clean-up
    def cleanup(self, now: float | None = None, keep: tuple[Path, ...] = ()) -> list[Path]:
        """Remove uploads unused for a day (except those in `keep`, e.g. a running training's data),
        served files and gradio's cached files older than a day, and temporary folders a crash left
        behind. (Gradio's own delete_cache removes only the files of this process.)"""
        now = time.time() if now is None else now
        kept = {self.upload_of(path) for path in keep} - {None}
        removed: list[Path] = []

        def old(path: Path, seconds: float, stamp: str = "st_mtime") -> bool:
            try:
                return now - getattr(path.lstat(), stamp) > seconds
            except OSError:
                return False

        for entry in _entries(self.uploads):
            hidden = entry.name.startswith(".")  # .<name>.partial-... of an extraction that died
            if entry not in kept and old(entry, LEFTOVER_SECONDS if hidden else UNUSED_SECONDS):
                removed.append(_remove(entry))
        for entry in _entries(self.inputs):
            if old(entry, LEFTOVER_SECONDS):
                removed.append(_remove(entry))
        # gradio's cache by change time, as gradio ages it: its copies keep their source's mtime
        for tree, stamp in ((self.served, "st_mtime"), (self.gradio_cache, "st_ctime")):
            # reversed, the walk reaches every folder after everything in it
            for dirpath, _, filenames in reversed(list(walk(tree))):
                for name in filenames:
                    path = Path(dirpath, name)
                    if old(path, UNUSED_SECONDS, stamp):
                        removed.append(_remove(path))
                if Path(dirpath) != tree and old(Path(dirpath), UNUSED_SECONDS, stamp):
                    try:
                        os.rmdir(dirpath)  # only when empty (and not just made for a new file)
                    except OSError:
                        pass
        return removed


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _remove(path: Path) -> Path:
    remove_tree(path)  # any depth; a link is unlinked, never followed
    return path


def _same_file(source: Path, target: Path) -> bool:
    """The served file still shows the source: the same inode (a link), or a copy of this version."""
    try:
        a, b = source.stat(), target.stat()
    except OSError:
        return False
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    return a.st_nlink == 1 and b.st_nlink == 1 and a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns

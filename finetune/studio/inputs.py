"""The images of one batch prediction, bounded: those of a folder on the server first, then the
uploaded image files and .zip files of images in the order given.

Zips are extracted into a temporary folder the caller owns (Workspace.temporary) and removed with
it. At most `limit` images are taken (the first ones, in a stable order); walking a folder stops
early, and a folder with too many files that are not images is refused rather than walked for ever.
No gradio here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import FinetuneError
from ..data import MAX_SCAN_DEPTH, is_ignored, is_image_file
from ..fsutil import walk
from .workspace import Workspace


@dataclass
class BatchInputs:
    limit: int
    paths: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # what the table and the CSV call each image
    truncated: bool = False  # more images were given than `limit`

    def add(self, path: Path, name: str) -> bool:
        """False (and truncated) once the limit is reached."""
        if len(self.paths) >= self.limit:
            self.truncated = True
            return False
        self.paths.append(path)
        self.names.append(name)
        return True


def walk_images(root: Path, max_files: int):
    """Image files under root, sorted, hidden and system folders left out; FinetuneError after
    `max_files` files of any kind (the caller stops early once it has enough images)."""
    seen = 0
    for dirpath, dirnames, filenames in walk(root, max_depth=MAX_SCAN_DEPTH):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        seen += len(filenames)
        if seen > max_files:
            raise FinetuneError(f"{root} holds more than {max_files:,} files: choose a smaller folder")
        for name in sorted(filenames):
            if not is_ignored(name) and is_image_file(name):
                yield Path(dirpath, name)


def gather_images(
    files: list | None, folder: Path | None, workspace: Workspace, scratch: Path, limit: int, max_files: int = 200_000
) -> BatchInputs:
    batch = BatchInputs(limit)
    if folder is not None:
        if not folder.is_dir():
            raise FinetuneError(f"folder not found: {folder}")
        for image in walk_images(folder, max_files):
            if not batch.add(image, image.relative_to(folder).as_posix()):
                return batch
    for index, file in enumerate(files or []):
        path = Path(file if isinstance(file, str) else file.name)
        if path.suffix.lower() == ".zip":
            root = workspace.extract_input(path, scratch / str(index)).root
            for image in walk_images(root, max_files):
                if not batch.add(image, f"{path.name}/{image.relative_to(root).as_posix()}"):
                    return batch
        elif is_image_file(path):
            if not batch.add(path, path.name):
                return batch
        else:
            raise FinetuneError(f"{path.name} is neither an image nor a .zip")
    return batch

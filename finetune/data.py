"""Finding, checking, splitting and decoding the user's images.

The user's folder is only ever read: nothing here writes, renames or re-saves a file in it.
"""

from __future__ import annotations

import io
import mmap
import os
import re
import struct
import threading
import time
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .config import FinetuneError, default_of
from .device import usable_cores
from .fsutil import open_regular, walk
from .names import printable, unsafe_name_reason

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# What Image.open may decode: only these, whatever a file's name or first bytes claim (an EPS
# named .jpg must not reach Ghostscript).
ACCEPTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")
IGNORED_NAMES = {"__MACOSX", "Thumbs.db", "desktop.ini"}
VAL_DIR_NAMES = ("val", "valid", "validation")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMBALANCE_RATIO = 3.0  # warn when the largest class has this many times the images of the smallest


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS and not is_ignored(Path(path).name)


# ---------------------------------------------------------------------------------------------
# Decoding


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Transparent pixels become white, as they look in a browser or photo viewer."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode a camera, phone or scanner produces -> 8-bit RGB with the intended colours."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _flatten_alpha(image)
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own convert clips 16-bit values at 255 (a white image): rescale instead.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if (mode.startswith("I;16") or array.max(initial=0) > 255) else 255.0
        if mode == "F" and array.max(initial=0) <= 1.0:
            peak = 1.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, LAB, HSV


# The most pixels one image may have, read from its header before anything is decoded: a PNG of a
# few hundred KB can claim 100+ megapixels and take more than 1 GB to decode. A 40-megapixel photo
# is more than most cameras take, and still well inside what a scan can afford.
DEFAULT_MAX_PIXELS = 40_000_000
MAX_PIXELS_ENV = "FINETUNE_MAX_PIXELS"  # an environment variable, so training processes inherit it


class ImageTooLarge(Image.DecompressionBombError):
    """An image over the pixel limit (a DecompressionBombError, so PIL's own handlers catch it too)."""


def _megapixels(pixels: int) -> str:
    megapixels = pixels / 1e6
    return f"{megapixels:,.0f}" if megapixels >= 100 else f"{megapixels:.3g}"


def max_pixels() -> int:
    """The pixel limit per image: FINETUNE_MAX_PIXELS if set, else DEFAULT_MAX_PIXELS.

    PIL is held to the same limit, for every decoder in this process (the app's too): PIL warns
    above MAX_IMAGE_PIXELS and refuses above twice it, so it gets half of ours.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    limit = DEFAULT_MAX_PIXELS
    if text:
        try:
            limit = int(float(text))
        except (ValueError, OverflowError):
            limit = 0
        if limit < 1:
            raise FinetuneError(f"{MAX_PIXELS_ENV} must be a number of pixels such as 40000000, not {text!r}")
    Image.MAX_IMAGE_PIXELS = (limit + 1) // 2
    return limit


try:
    max_pixels()
except FinetuneError:  # said again, as one line, where an image is first opened
    pass
# PIL's warning band (half the limit up to the limit) is within what we accept: not a bomb to warn about.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class ImageTooCostly(ImageTooLarge):
    """An image within the pixel limit whose structure costs far more than its pixels: too many TIFF
    pages or JPEG scans, metadata tags that claim more data than the file holds, or a slow decode."""


# What one image may cost beyond its pixels, read from its structure before PIL parses it: files of a
# few hundred KB passed the pixel limit yet took tens of seconds (or gigabytes) every time they were
# decoded, for a thumbnail, in every epoch, for every prediction.
MAX_TIFF_PAGES = 64  # PIL's n_frames reads every page and costs their square: 65,536 pages took 21 s
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10 and libjpeg sets no limit: 2,000 took 25 s
# Each scan passes over the whole picture: a large one may have fewer, as many as 30 at the pixel limit
# (a CMYK progressive JPEG has 24). 100 scans over 36 megapixels took 6 s, 10 took 0.45 s.
SCANS_AT_PIXEL_LIMIT = 30
# The last line, for whatever else makes a decode slow: a check (a scan) that took more CPU time than
# this skips the file, so training, thumbnails and reviews never pay it again. A decode cannot be
# interrupted, so the scan itself pays it once. CPU time of the decoding thread, not wall time: a busy
# machine running the checks in parallel does not make a normal image look costly.
MAX_DECODE_SECONDS = 10.0
# Bytes per value of each TIFF tag type (TIFF 6.0 and BigTIFF; PIL ignores the types left at 0).
_TIFF_UNIT = np.array([0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8, 4, 0, 0, 8], dtype=np.float64)
_EXIF_SUB_IFDS = (0x8769, 0x8825, 0xA005)  # the Exif, GPS and Interop IFDs, which PIL reads as well
_TAG_SLACK = 64 * 1024  # what tags may claim beyond twice a (tiny) file or block, for odd writers
# A JPEG marker: 0xFF followed by neither stuffing (0x00), a restart marker (RST0-7) nor fill (0xFF).
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOF0-15


def _size_text(nbytes: float) -> str:
    return f"{nbytes / 1e6:,.0f} MB" if nbytes >= 1e6 else f"{nbytes / 1e3:,.0f} KB"


def _check_tiff(fp, size: int, what: str, max_pages: int) -> None:
    """Refuse a TIFF structure (a .tif file, or the EXIF block of another format) whose chain of IFDs
    is longer than `max_pages`, or whose tags claim more than twice the `size` bytes it has.

    PIL reads the data of every tag of an IFD when it parses it, so tags that all point at one block
    cost their number times its size: 4,000 of them pointing at a 150 KB block of a 200 KB PNG took
    600 MB. In a real file the tags' data do not overlap and fit in it. The walk reads only the IFD
    tables, with a cycle check; what it cannot read is left for PIL to refuse.
    """
    fp.seek(0)
    head = fp.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return
    big = struct.unpack(order + "H", head[2:4])[0] == 43
    if big and len(head) < 16:
        return
    pointer = order + ("Q" if big else "L")
    inline = struct.calcsize(pointer)  # a tag's data of this many bytes or fewer is in its entry
    count_format, entry_size = (order + "Q", 20) if big else (order + "H", 12)
    wide = order + ("u8" if big else "u4")
    entry = np.dtype([("tag", order + "u2"), ("type", order + "u2"), ("count", wide), ("value", wide)])
    first = struct.unpack(pointer, head[8:16] if big else head[4:8])[0]
    pending, seen, pages, claimed = [(first, True)], set(), 0, 0.0
    while pending:
        offset, in_chain = pending.pop()
        while 0 < offset < size and offset not in seen:
            seen.add(offset)
            if in_chain:
                pages += 1
                if pages > max_pages:
                    if what != "TIFF":  # PIL reads no further in an EXIF block than its first IFDs
                        break
                    raise ImageTooCostly(
                        f"too costly to decode: a TIFF of more than {max_pages} pages "
                        f"(at most {max_pages}; only the first is used)"
                    )
            fp.seek(offset)
            raw = fp.read(struct.calcsize(count_format))
            if len(raw) < struct.calcsize(count_format):
                break
            count = min(struct.unpack(count_format, raw)[0], (size - offset) // entry_size)
            table_bytes = fp.read(count * entry_size)
            table = np.frombuffer(table_bytes, dtype=entry, count=len(table_bytes) // entry_size)
            types = table["type"].astype(np.int64)
            unit = np.where(types < len(_TIFF_UNIT), _TIFF_UNIT[np.minimum(types, len(_TIFF_UNIT) - 1)], 0.0)
            nbytes = table["count"].astype(np.float64) * unit
            claimed += float(nbytes[nbytes > inline].sum())
            if claimed > 2 * size + _TAG_SLACK:
                raise ImageTooCostly(
                    f"too costly to decode: its {what} tags claim {_size_text(claimed)} of data from {_size_text(size)}"
                )
            sub = table[np.isin(table["tag"], _EXIF_SUB_IFDS) & (table["count"] == 1) & np.isin(types, (4, 13, 16, 18))]
            pending.extend((int(value), False) for value in sub["value"])
            following = fp.read(inline)
            if not in_chain or len(following) < inline:
                break
            offset = struct.unpack(pointer, following)[0]


def _check_jpeg(data, size: int) -> None:
    """Refuse a JPEG of more than MAX_JPEG_SCANS scans (libjpeg passes over the whole picture for each
    one) or whose EXIF or MPF block would cost too much. A walk over its markers: each segment skipped
    by its length, each scan's data searched through for the next marker; it ends at the first EOI
    (what follows, such as an MPO's second picture, is not decoded)."""
    scans, allowed, pixels, position, frames = 0, MAX_JPEG_SCANS, 0, 2, 0
    while (found := _JPEG_MARKER.search(data, position)) is not None:
        marker, position = data[found.end() - 1], found.end()
        if marker == 0xD9:
            return
        if marker == 0x01 or position + 2 > size:  # TEM has no length
            continue
        length = (data[position] << 8) | data[position + 1]
        if marker in _JPEG_FRAMES and frames:
            # PIL takes the last frame header's size, libjpeg and nvJPEG the first: two sizes for one
            # file would let a picture checked small be decoded large elsewhere
            raise OSError("malformed JPEG: a second frame header (SOF) in one picture")
        if marker in _JPEG_FRAMES and position + 7 <= size:
            frames += 1
            pixels = ((data[position + 3] << 8) | data[position + 4]) * ((data[position + 5] << 8) | data[position + 6])
            if pixels:
                allowed = max(1, min(MAX_JPEG_SCANS, SCANS_AT_PIXEL_LIMIT * max_pixels() // pixels))
        elif marker == 0xDA:
            scans += 1
            if scans > allowed:
                at = f" over {_megapixels(pixels)} megapixels" if allowed < MAX_JPEG_SCANS else ""
                raise ImageTooCostly(
                    f"too costly to decode: more than {allowed} JPEG scans{at} (a progressive JPEG has about 10)"
                )
        elif marker == 0xE1 and data[position + 2 : position + 8] == b"Exif\0\0":
            _check_exif(data[position + 8 : position + length])
        elif marker == 0xE2 and data[position + 2 : position + 6] == b"MPF\0":
            _check_exif(data[position + 6 : position + length])
        position += length


def _check_exif(block: bytes | None) -> None:
    while block and block.startswith(b"Exif\0\0"):  # as PIL strips it
        block = block[6:]
    if block:
        _check_tiff(io.BytesIO(block), len(block), "EXIF", 2)


def _check_structure(file) -> None:
    """ImageTooCostly for a TIFF or JPEG whose structure would cost far more than its pixels."""
    size = os.fstat(file.fileno()).st_size
    file.seek(0)
    head = file.read(4)
    if (
        len(head) == 4
        and head[:2] in (b"II", b"MM")
        and struct.unpack("<H" if head[:2] == b"II" else ">H", head[2:4])[0] in (42, 43)
    ):  # TIFF, BigTIFF
        _check_tiff(file, size, "TIFF", MAX_TIFF_PAGES)
    elif head[:3] == b"\xff\xd8\xff":
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system that cannot map files: read it instead
            file.seek(0)
            data = file.read()
        try:
            _check_jpeg(data, len(data))
        finally:
            if isinstance(data, mmap.mmap):
                data.close()
    file.seek(0)


def _exif_block(image: Image.Image) -> bytes | None:
    """The EXIF block that getexif (and so exif_transpose) parses, where PNG, WebP and JPEG keep it."""
    block = image.info.get("exif")
    raw = image.info.get("Raw profile type exif")  # ImageMagick's hex in a PNG text chunk
    if block is None and isinstance(raw, str):
        try:
            block = bytes.fromhex("".join(raw.split("\n")[3:]))
        except ValueError:
            return None
    return block if isinstance(block, bytes) else None


def open_image(path: str | Path) -> Image.Image:
    """Open an image file lazily (the header only), as one of ACCEPTED_FORMATS whatever its name or
    content claims (an EPS named .jpg never reaches Ghostscript); ImageTooLarge over the pixel limit,
    ImageTooCostly for a structure that would cost far more than its pixels (see _check_structure),
    NotRegularFile for a FIFO or device named like an image (it would block the reader for ever)."""
    limit = max_pixels()
    file = open_regular(path)
    try:
        _check_structure(file)
        # From the file object opened above, never the path again: PIL reopens a path by name to
        # memory-map it, and the name may by then be a FIFO.
        image = Image.open(file, formats=ACCEPTED_FORMATS)
    except ImageTooLarge:
        file.close()
        raise
    except Image.DecompressionBombError as error:  # PIL's own guard, at the same limit
        file.close()
        claimed = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{_megapixels(int(claimed.group(1)))} megapixels" if claimed else "more pixels than allowed"
        raise ImageTooLarge(f"image too large: {size}, over the limit of {_megapixels(limit)} megapixels") from None
    except Image.UnidentifiedImageError:
        file.close()
        raise Image.UnidentifiedImageError(f"cannot identify image file {str(path)!r}") from None
    except BaseException:
        file.close()
        raise
    image._exclusive_fp = True  # the image owns the file, as when PIL opens a path: closed with it
    width, height = image.size
    if width * height > limit:  # PIL's guard is global: other code may have switched it off
        image.close()
        raise ImageTooLarge(
            f"image too large: {width} x {height} pixels ({_megapixels(width * height)} megapixels), "
            f"over the limit of {_megapixels(limit)} megapixels"
        )
    return image


def _prepare(image: Image.Image, min_size: int | None) -> None:
    """JPEGs decoded at a reduced scale when `min_size` allows. An image opens at its first frame,
    which is all that is decoded: n_frames is never asked, as it reads every frame of a GIF or TIFF."""
    if min_size and image.format in ("JPEG", "MPO"):  # MPO: a camera's JPEG with a second picture
        image.draft("RGB", (min_size, min_size))


def _decode(image: Image.Image) -> Image.Image:
    image.load()
    _check_exif(_exif_block(image))  # a PNG's EXIF may follow its pixels: known only once loaded
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def load_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied (first frame of an animation).

    `min_size` lets JPEG decoding skip detail that a resize to that short side would throw away
    (libjpeg's DCT scaling), which makes a 24-megapixel photo as cheap as a small one.
    Only ACCEPTED_FORMATS are opened, and nothing over the pixel limit is decoded (ImageTooLarge).
    """
    with open_image(path) as image:
        _prepare(image, min_size)
        return _decode(image)


class PixelBudget:
    """Lets decodes run together while the pixels they hold add up to at most `capacity`; one image
    alone always gets through (it is within the per-image limit), so this bounds memory, not progress."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        with self._changed:
            while self.used and self.used + pixels > self.capacity:
                self._changed.wait()
            self.used += pixels
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def check_image(path: str | Path, budget: PixelBudget | None = None) -> str | None:
    """None if the file decodes completely, else a short reason it does not.

    The size is read from the header first: an image over the pixel limit is refused undecoded, and
    with a `budget` the decode waits until its pixels fit beside those of other threads. So is a
    structure that would cost far more than its pixels (ImageTooCostly), and a FIFO or device is
    never opened. A decode that took more than MAX_DECODE_SECONDS of CPU time is reported too costly.
    """
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return "empty file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open_image(path) as opened:
                _prepare(opened, 64)
                width, height = opened.size
                with budget.hold(width * height) if budget else nullcontext():
                    started = time.thread_time()
                    image = _decode(opened)
                    spent = time.thread_time() - started
                    width, height = image.size
                    del image
        if width < 1 or height < 1:
            return "image has no pixels"
        if spent > MAX_DECODE_SECONDS:
            return (
                f"too costly to decode: {spent:.1f} s of CPU time for {width} x {height} pixels "
                f"(at most {MAX_DECODE_SECONDS:g} s)"
            )
        return None
    except ImageTooLarge as error:
        return str(error)
    except Image.DecompressionBombError:
        return f"image too large: over the limit of {_megapixels(max_pixels())} megapixels"
    except Image.UnidentifiedImageError:
        return "not a readable image"
    except FinetuneError as error:
        return str(error)
    except OSError as error:
        text = str(error)
        return "truncated image" if "truncated" in text else f"cannot decode ({text})"
    except Exception as error:  # noqa: BLE001 - any decoder failure means: skip this file, name it
        return f"cannot decode ({type(error).__name__}: {error})"


def check_images(
    root: Path, relpaths: list[str], workers: int | None = None, on_progress: Callable[[int, int], None] | None = None
) -> dict[str, str]:
    """Decode every file in parallel; returns {relpath: reason} for those that fail.

    Threads decode together only while their images' pixels add up to one image at the pixel limit,
    so a folder of huge (but allowed) images costs the memory of one of them, not of one per thread.
    `on_progress(done, total)` is called now and then; an exception it raises ends the check at once
    (the decodes not yet started are cancelled), which is how a caller cancels a scan.
    """
    workers = workers or min(32, usable_cores() * 2)
    budget = PixelBudget(max_pixels())
    found: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=workers)  # PIL releases the GIL while decoding
    try:
        reasons = pool.map(lambda rel: check_image(root / rel, budget), relpaths)
        for done, (rel, reason) in enumerate(zip(relpaths, reasons, strict=True), 1):
            if reason is not None:
                found[rel] = reason
            if on_progress is not None and (done % 50 == 0 or done == len(relpaths)):
                on_progress(done, len(relpaths))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return found


# ---------------------------------------------------------------------------------------------
# Scanning a dataset folder

# Folder levels below a class folder (or a folder of images to predict) that a scan enters: a zip
# may hold at most 32 (archive.MAX_DEPTH), and a tree 1,000 levels deep made on disk is not walked.
MAX_SCAN_DEPTH = 64
TOO_DEEP = f"folder nested more than {MAX_SCAN_DEPTH} levels deep: not scanned"


def _split_item(item, key: str, num_classes: int) -> bool:
    """One (path, label) of split.json (or (path, reason) of its skipped files): a path relative to the
    root that stays inside it, and a class index."""
    if not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str):
        return False
    if key == "skipped":
        return isinstance(item[1], str)
    path = PurePosixPath(item[0].replace("\\", "/"))
    return (
        not path.is_absolute()
        and ".." not in path.parts
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and 0 <= item[1] < num_classes
    )


@dataclass
class DatasetScan:
    """What is in the user's folder, how it is split, and what was skipped.

    Paths are relative to `root`, so the split (saved as split.json) can be reproduced; only the pool
    images a curation adds to train are absolute (curation.added_item: `Path(root) / item` is the file).
    """

    root: str
    layout: str  # "class-folders" (split by us) or "train-val" (split given)
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    val_fraction: float | None = None
    seed: int | None = None
    split_dirs: dict[str, str] = field(default_factory=dict)  # the split folders' names: {"train": "Train", ...}
    labels_file: str = ""  # the CSV the labels came from (labels.py), "" for class folders

    def layout_text(self) -> str:
        """What the scan understood of the folder, in one line."""

        def held_out(where: str = "") -> str:
            return f"{round((self.val_fraction or 0) * 100)}% of each class{where} held out for validation" + (
                f" (seed {self.seed})" if self.seed is not None else ""
            )

        if self.labels_file:
            given = "the split given in it" if self.val_fraction is None else held_out()
            return f"labels from {Path(self.labels_file).name} ({len(self.classes)} classes); {given}"
        if not self.split_dirs and self.layout == "class-folders":
            return f"class folders at the top ({len(self.classes)} classes); {held_out()}"
        names = {"train": "train", **({"val": "val"} if self.layout == "train-val" else {}), **self.split_dirs}
        folders = [f"{names[split]}/" for split in ("train", "val", "test") if split in names]
        listed = folders[0] if len(folders) == 1 else f"{', '.join(folders[:-1])} and {folders[-1]}"
        text = f"{listed} split{'s' if len(folders) > 1 else ''}"
        if self.layout == "train-val":
            return f"{text} ({len(self.classes)} classes)"
        return f"{text}, no val/ ({len(self.classes)} classes); {held_out(' in ' + folders[0])}"

    def counts(self) -> dict[str, dict[str, int]]:
        result = {}
        for split in ("train", "val", "test"):
            items = getattr(self, split)
            if items or split != "test":
                tally = Counter(label for _, label in items)
                result[split] = {name: tally.get(index, 0) for index, name in enumerate(self.classes)}
        return result

    def to_dict(self) -> dict:
        data = asdict(self)
        data["counts"] = self.counts()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DatasetScan:
        """A scan as to_dict wrote it (split.json). ValueError naming what is not: a run folder may come
        from anyone, and its paths are read (on --resume) below its root, so none may climb out of it."""
        if not isinstance(data, dict) or not isinstance(data.get("root"), str) or not data["root"]:
            raise ValueError("no data root in it")
        classes = data.get("classes")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("its classes are not a list of names")
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("train", "val", "test", "skipped"):
            items = fields.get(key, [])
            if not isinstance(items, list) or not all(_split_item(item, key, len(classes)) for item in items):
                raise ValueError(f"its {key!r} is not a list of (path, {'reason' if key == 'skipped' else 'label'})")
            fields[key] = [tuple(item) for item in items]
        return cls(**fields)

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """How IPython and Jupyter show a scan: its report (names through names.printable), not every file."""
        printer.text("\n".join(printable(line) for line in self.report().split("\n")))

    def report(self) -> str:
        """A human-readable data report (terminal, data_report.txt, UI)."""
        counts = self.counts()
        splits = list(counts)
        width = max([len(c) for c in self.classes] + [5])
        lines = [f"Data: {self.root}", f"Layout: {self.layout_text()}"]
        lines.append("  " + "class".ljust(width) + "".join(s.rjust(8) for s in splits))
        for name in self.classes:
            lines.append("  " + name.ljust(width) + "".join(str(counts[s][name]).rjust(8) for s in splits))
        lines.append("  " + "total".ljust(width) + "".join(str(sum(counts[s].values())).rjust(8) for s in splits))
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {path}: {reason}" for path, reason in self.skipped)
        lines.extend(f"Warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _class_dirs(split_dir: Path) -> list[Path]:
    """The class folders; FinetuneError for one whose name a terminal or browser would act on."""
    found = sorted((p for p in split_dir.iterdir() if p.is_dir() and not is_ignored(p.name)), key=lambda p: p.name)
    for folder in found:
        reason = unsafe_name_reason(folder.name)
        if reason is not None:
            raise FinetuneError(
                f"class folder '{printable(folder.name)}' in {printable(str(split_dir))}: {reason}; rename it"
            )
    return found


class _FileCount:
    """Files seen while walking a dataset: over `limit` is an error (a scan of / or of a huge tree
    stops early); `on_progress("walk", seen, 0)` now and then."""

    def __init__(self, root: Path, limit: int | None, on_progress=None):
        self.root, self.limit, self.on_progress, self.seen = root, limit, on_progress, 0

    def add(self, n: int) -> None:
        before, self.seen = self.seen, self.seen + n
        if self.limit is not None and self.seen > self.limit:
            raise FinetuneError(
                f"{self.root} holds more than {self.limit:,} files: choose a smaller folder "
                f"(at most {self.limit:,} files are scanned)"
            )
        if self.on_progress is not None and self.seen // 1000 > before // 1000:
            self.on_progress("walk", self.seen, 0)


def _image_files(
    class_dir: Path, root: Path, count: _FileCount | None = None, skipped: list[tuple[str, str]] | None = None
) -> list[str]:
    """Image files anywhere under a class folder (nested folders belong to the class, down to
    MAX_SCAN_DEPTH levels). Image files and folders with a name a terminal or browser would act on
    (see finetune.names), and folders nested deeper, are left out and added to `skipped` as
    (escaped relative path, reason): they are never decoded."""
    found = []
    skipped = [] if skipped is None else skipped

    def relative(*parts: str) -> str:
        return Path(*parts).relative_to(root).as_posix()

    def too_deep(path: str) -> None:
        skipped.append((printable(relative(path)) + "/", TOO_DEEP))

    for dirpath, dirnames, filenames in walk(class_dir, max_depth=MAX_SCAN_DEPTH, on_too_deep=too_deep):
        kept = []
        for name in sorted(d for d in dirnames if not is_ignored(d)):
            reason = unsafe_name_reason(name)
            if reason is None:
                kept.append(name)
            else:
                skipped.append((printable(relative(dirpath, name)) + "/", reason))
        dirnames[:] = kept
        if count is not None:
            count.add(len(filenames))
        for name in sorted(filenames):
            if is_image_file(name):
                reason = unsafe_name_reason(name)
                if reason is None:
                    found.append(relative(dirpath, name))
                else:
                    skipped.append((printable(relative(dirpath, name)), reason))
    return found


@dataclass
class Layout:
    """How a dataset folder is organised: `splits` maps "train", "val", "test" to their folders, or
    "all" to the root (class folders at the top); `notes` say what of the top level is not used."""

    splits: dict[str, Path]
    notes: list[str] = field(default_factory=list)


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name)), key=lambda p: p.name)


def _holds_images(folder: Path) -> bool:
    """Whether image files lie directly in `folder` (stops at the first)."""
    with os.scandir(folder) as entries:
        return any(is_image_file(entry.name) and entry.is_file() for entry in entries)


@contextmanager
def _readable(folder: Path):
    """A folder of the data that cannot be listed (no permission, gone meanwhile) as one line naming it
    (deeper folders are walked past, see fsutil.walk)."""
    try:
        yield
    except OSError as error:
        where = printable(os.fsdecode(error.filename)) if error.filename else printable(str(folder))
        raise FinetuneError(f"cannot read {where}: {error.strerror or error}") from None


def detect_layout(root: Path) -> Layout:
    """Split folders or class folders, judged from the whole top level, not from one name.

    A top folder named train (any case) is a split only when it holds folders and no image of its
    own, and every other top folder is a split too (val, valid, validation, test), or a val split
    beside it makes the layout plain (then other folders are left out, with a note). A train/ of
    images is a class like any other ({train, bus, car}; {Train, Test}). A train/ of folders beside
    other class-like folders and no val/ cannot be told apart: a FinetuneError naming the folder."""
    top = _subfolders(root)
    train = next((p for p in top if p.name.lower() == "train"), None)
    if train is None or _holds_images(train) or not _subfolders(train):
        return Layout({"all": root})
    by_name = {p.name.lower(): p for p in top}
    splits = {"train": train}
    val = next((by_name[name] for name in VAL_DIR_NAMES if name in by_name), None)
    if val is not None:
        splits["val"] = val
    if "test" in by_name:
        splits["test"] = by_name["test"]
    others = [p for p in top if p not in splits.values()]
    notes = []
    if others:
        # a few names, then a count: a folder of thousands of classes must still give one readable line
        shown = ", ".join(f"'{printable(p.name)}/'" for p in others[:5]) + (
            f" and {len(others) - 5:,} more" if len(others) > 5 else ""
        )
        if val is None:
            raise FinetuneError(
                f"cannot tell how {printable(str(root))} is organised: '{printable(train.name)}/' holds folders "
                f"(a train split of class folders?) but {shown} beside it {'is' if len(others) == 1 else 'are'} "
                f"not a split (val/, test/): put every class folder at the top, or the class folders of each "
                f"split in train/ and val/"
            )
        notes.append(f"{shown} beside the train/ and val/ splits {'is' if len(others) == 1 else 'are'} not used")
    for split, folder in splits.items():
        if split != "train" and _holds_images(folder):
            raise FinetuneError(
                f"'{printable(folder.name)}/' in {printable(str(root))} holds images of its own: in a "
                f"train/ and {printable(folder.name)}/ layout each split holds one folder per class"
            )
    return Layout(splits, notes)


def find_splits(root: Path) -> dict[str, Path]:
    """{'train': dir, 'val': dir, 'test': dir} for a split layout, or {'all': root} (detect_layout)."""
    return detect_layout(root).splits


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices for train and val: each class split in proportion, at least one val image per class."""
    from sklearn.model_selection import train_test_split

    labels_array = np.asarray(labels)
    train_idx, val_idx = [], []
    for label in np.unique(labels_array):
        members = np.flatnonzero(labels_array == label)
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        tr, va = train_test_split(members, test_size=n_val, random_state=seed + int(label))
        train_idx.extend(tr.tolist())
        val_idx.extend(va.tolist())
    return sorted(train_idx), sorted(val_idx)


def scan_dataset(
    data: str | Path,
    val_fraction: float = default_of("val_fraction"),
    seed: int = default_of("seed"),
    check: bool = True,
    max_files: int | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    labels: str | Path | None = None,
) -> DatasetScan:
    """Find classes and images, check every image, and split train/val when no split is given.
    `labels`: a CSV of path,label[,split] rows for a flat folder of images (labels.py) instead of
    class folders.

    `max_files`: refuse a folder holding more files than this (counted while walking, so a huge tree
    is refused early). `on_progress(stage, done, total)`: stage "walk" (files seen so far) or "check"
    (images decoded of total); an exception it raises ends the scan (a cancel).
    """
    root = _data_folder(data)
    if labels:
        return _scan_labelled_rows(root, Path(labels).expanduser(), val_fraction, seed, check, max_files, on_progress)
    with _readable(root):
        layout_found = detect_layout(root)
    splits = layout_found.splits
    main_split = "all" if "all" in splits else "train"
    per_split, unusable = _list_images(root, splits, max_files, on_progress)
    classes = _class_names(per_split, splits, main_split)
    good, skipped = _decodable_images(root, per_split, unusable, check, on_progress)
    _require_an_image_per_class(classes, good, per_split, splits, main_split)

    notes: list[str] = layout_found.notes + _lookalike_classes(classes)
    if "val" in splits:
        layout, train, val = "train-val", _labelled(good, "train", classes), _labelled(good, "val", classes)
        used_fraction = None
        for name in classes:
            if not good["val"].get(name):
                notes.append(f"class {name!r} has no validation image; its metrics will be empty")
    else:
        layout, used_fraction = "class-folders", val_fraction
        train, val = _drawn_split(_labelled(good, main_split, classes), classes, good[main_split], val_fraction, seed)
    test = _labelled(good, "test", classes) if "test" in splits else []
    notes += _imbalance_notes(classes, train)
    return DatasetScan(
        root=str(root),
        layout=layout,
        classes=classes,
        train=train,
        val=val,
        test=test,
        skipped=skipped,
        warnings=notes,
        val_fraction=used_fraction,
        seed=seed if used_fraction else None,
        split_dirs={split: folder.name for split, folder in splits.items() if split != "all"},
    )


def _scan_labelled_rows(
    root: Path,
    labels: Path,
    val_fraction: float,
    seed: int,
    check: bool,
    max_files: int | None,
    on_progress: Callable[[str, int, int], None] | None,
) -> DatasetScan:
    """scan_dataset for a labels file: its rows in place of class folders, then the same checks."""
    from .labels import read_labels

    labels = _labels_file(root, labels)
    rows = read_labels(labels, root)
    per_split = rows.per_split
    listed = sum(len(files) for split in per_split.values() for files in split.values())
    if max_files is not None and listed > max_files:
        raise FinetuneError(f"{labels} lists {listed:,} images, more than the {max_files:,} allowed here")
    main = "all" if "all" in per_split else "train"
    if main not in per_split:
        raise FinetuneError(f"{labels} gives no training images (rows with split train, or no split)")
    classes = sorted(per_split[main])
    for split in ("val", "test"):
        extra = sorted(set(per_split.get(split, {})) - set(classes))
        if extra:
            raise FinetuneError(f"class {extra[0]!r} has {split} rows in {labels} but no training rows")
    if len(classes) < 2:
        raise FinetuneError(f"need at least 2 classes in {labels}, found {classes[0]!r} only")
    good, skipped = _decodable_images(root, per_split, rows.skipped, check, on_progress)
    for name in classes:
        if not good[main][name]:
            raise FinetuneError(f"class {name!r} has no valid image in {labels} ({len(per_split[main][name])} listed)")
    for split in ("all", "train", "val", "test"):  # every split's classes, each in scan order
        if split in good:
            good[split] = {c: good[split].get(c, []) for c in classes}
    notes = rows.notes + _lookalike_classes(classes)
    if "val" in per_split:
        train, val, used_fraction = _labelled(good, "train", classes), _labelled(good, "val", classes), None
    else:
        used_fraction = val_fraction
        train, val = _drawn_split(_labelled(good, main, classes), classes, good[main], val_fraction, seed)
    return DatasetScan(
        root=str(root),
        layout="labels",
        classes=classes,
        train=train,
        val=val,
        test=_labelled(good, "test", classes),
        skipped=skipped,
        warnings=notes + _imbalance_notes(classes, train),
        val_fraction=used_fraction,
        seed=seed if used_fraction else None,
        labels_file=str(labels.resolve()),
    )


def _data_folder(data: str | Path) -> Path:
    """The data folder, resolved; one line when it is missing or not a folder."""
    root = Path(data).expanduser()
    if not root.exists():
        raise FinetuneError(f"data folder not found: {root}")
    if not root.is_dir():
        raise FinetuneError(f"data path is not a folder: {root}")
    return root.resolve()


def _list_images(
    root: Path, splits: dict[str, Path], max_files: int | None, on_progress: Callable[[str, int, int], None] | None
) -> tuple[dict[str, dict[str, list[str]]], list[tuple[str, str]]]:
    """The image files of each split's class folders (relative to root), and the files not decoded
    with why (strange names, folders nested too deep)."""
    per_split: dict[str, dict[str, list[str]]] = {}
    count = _FileCount(root, max_files, on_progress)
    unusable: list[tuple[str, str]] = []
    for split, split_dir in splits.items():
        with _readable(split_dir):
            class_dirs = _class_dirs(split_dir)
        per_split[split] = {d.name: _image_files(d, root, count, unusable) for d in class_dirs}
    return per_split, unusable


def _class_names(per_split: dict[str, dict[str, list[str]]], splits: dict[str, Path], main_split: str) -> list[str]:
    """The classes (the main split's folders, sorted): val/ and test/ add none, and there are at least 2."""
    train_classes = set(per_split[main_split])
    for split in ("val", "test"):
        extra = sorted(set(per_split.get(split, {})) - train_classes)
        if extra:
            raise FinetuneError(f"class {extra[0]!r} is in {splits[split].name}/ but not in {splits[main_split].name}/")
    classes = sorted(train_classes)
    if len(classes) < 2:
        where = splits[main_split]
        found = f"only {classes[0]!r}" if classes else "none"
        raise FinetuneError(f"need at least 2 class folders in {where}, found {found}")
    return classes


def _decodable_images(
    root: Path,
    per_split: dict[str, dict[str, list[str]]],
    unusable: list[tuple[str, str]],
    check: bool,
    on_progress: Callable[[str, int, int], None] | None,
) -> tuple[dict[str, dict[str, list[str]]], list[tuple[str, str]]]:
    """per_split without the files that do not decode (each one decoded unless `check` is False), and
    every file skipped with why, sorted."""
    all_files = [rel for split in per_split.values() for files in split.values() for rel in files]
    check_progress = (lambda done, total: on_progress("check", done, total)) if on_progress else None
    bad = check_images(root, all_files, on_progress=check_progress) if check else {}
    skipped = sorted([*bad.items(), *unusable])
    good = {
        split: {c: [r for r in files if r not in bad] for c, files in by_class.items()}
        for split, by_class in per_split.items()
    }
    return good, skipped


def _require_an_image_per_class(
    classes: list[str],
    good: dict[str, dict[str, list[str]]],
    per_split: dict[str, dict[str, list[str]]],
    splits: dict[str, Path],
    main_split: str,
) -> None:
    """One line for the first class of the main split without a decodable image."""
    for name in classes:
        if not good[main_split][name]:
            total = len(per_split[main_split][name])
            detail = f"{total} file(s), none decodable" if total else "no image files"
            raise FinetuneError(f"class {name!r} has no valid image in {splits[main_split]} ({detail})")


def _labelled(good: dict[str, dict[str, list[str]]], split: str, classes: list[str]) -> list[tuple[str, int]]:
    """A split's (path, label) pairs, class by class; the label is the class's index in `classes`."""
    return [(rel, label) for label, c in enumerate(classes) for rel in good.get(split, {}).get(c, [])]


def _drawn_split(
    pool: list[tuple[str, int]], classes: list[str], good: dict[str, list[str]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A class-folders dataset split into train and val, stratified: each class needs 2 images."""
    for name in classes:
        if len(good[name]) < 2:
            raise FinetuneError(
                f"class {name!r} has only 1 valid image: at least 2 are needed to split train/val "
                f"(add images or give a val/ folder)"
            )
    train_idx, val_idx = stratified_split([label for _, label in pool], val_fraction, seed)
    return [pool[i] for i in train_idx], [pool[i] for i in val_idx]


def _imbalance_notes(classes: list[str], train: list[tuple[str, int]]) -> list[str]:
    """The warning for a training split whose largest class outnumbers its smallest IMBALANCE_RATIO times."""
    train_counts = Counter(label for _, label in train)
    largest, smallest = max(train_counts.values()), min(train_counts.values())
    if smallest and largest / smallest >= IMBALANCE_RATIO:
        big = classes[max(train_counts, key=train_counts.__getitem__)]
        small = classes[min(train_counts, key=train_counts.__getitem__)]
        return [
            f"classes are imbalanced ({big!r}: {largest} vs {small!r}: {smallest} training images); "
            f"consider --class-weighted-loss"
        ]
    return []


def _lookalike_classes(classes: list[str]) -> list[str]:
    """Warnings for classes that differ only in letter case, in Unicode normalisation ('café' typed
    as one character or as 'e' and an accent) or in invisible characters (a zero-width space pasted
    into a label): most likely one class split in two. Kept apart."""
    groups: dict[str, list[str]] = {}
    for name in classes:
        groups.setdefault(_visible(name).casefold(), []).append(name)
    notes = []
    for names in groups.values():
        if len(names) < 2:
            continue
        shown = " and ".join(ascii(n) for n in names)  # the escapes show how they differ
        if len({unicodedata.normalize("NFC", n) for n in names}) < len(names):
            how = "only in how their accents are stored (Unicode normalisation)"
        elif len({_visible(n) for n in names}) < len(names):
            how = "only in invisible characters (zero-width spaces, joiners or marks)"
        else:
            shown = " and ".join(f"'{printable(n)}'" for n in names)
            how = "only in letter case"
        notes.append(
            f"classes {shown} differ {how}: they are kept as separate classes; rename the folders "
            f"if they are meant to be one"
        )
    return notes


def _visible(name: str) -> str:
    """The name as it looks: NFC, without format characters (Unicode category Cf: U+200B, U+FEFF...)."""
    return "".join(c for c in unicodedata.normalize("NFC", name) if unicodedata.category(c) != "Cf")


def list_images(paths: list[str | Path], skipped: list[tuple[str, str]] | None = None) -> list[Path]:
    """Image files from a mix of files and folders (folders searched recursively down to
    MAX_SCAN_DEPTH levels, sorted). Files with a name a terminal would act on (see finetune.names),
    and folders nested deeper, are left out and added to `skipped` as (escaped path, reason)."""
    found: list[Path] = []
    skipped = [] if skipped is None else skipped
    for given in paths:
        path = Path(given).expanduser()
        if not path.exists():
            raise FinetuneError(f"not found: {printable(str(path))}")
        if path.is_dir():  # relative to its parent, so what is skipped is named with the folder
            found.extend(path.parent / rel for rel in _image_files(path, path.parent, skipped=skipped))
        elif (reason := unsafe_name_reason(path.name)) is not None:
            skipped.append((printable(str(path)), reason))
        else:
            found.append(path)
    return found


# ---------------------------------------------------------------------------------------------
# Transforms and datasets


def resize_size(image_size: int) -> int:
    """Short side before the centre crop, in the ImageNet ratio 256/224."""
    return int(round(image_size * 256 / 224))


def train_pixels(image_size: int, extra: list | tuple = ()) -> v2.Compose:
    """The training augmentation as uint8 pixels (RandomResizedCrop, flip, then `extra`, e.g.
    augment.worker_transforms): what crosses processes and the bus, a quarter of float32's bytes; the
    device scales and normalises it (`to_model_input`, augment.training_input)."""
    crop = [v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *extra]
    return v2.Compose([v2.ToImage(), *crop])


def eval_pixels(image_size: int) -> v2.Compose:
    """The evaluation view as uint8 pixels: resize the short side, centre crop."""
    return v2.Compose([v2.ToImage(), v2.Resize(resize_size(image_size), antialias=True), v2.CenterCrop(image_size)])


def to_model_input(
    images: torch.Tensor, memory_format=torch.preserve_format, mean=IMAGENET_MEAN, std=IMAGENET_STD
) -> torch.Tensor:
    """uint8 images (a batch, on the device) -> float32, scaled to [0, 1] and normalised, in the model's
    memory format. Exactly what ToDtype(scale=True) + Normalize give on the CPU."""
    images = v2.functional.normalize(v2.functional.to_dtype(images, torch.float32, scale=True), list(mean), list(std))
    if memory_format == torch.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def eval_transform(image_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> v2.Compose:
    return v2.Compose([eval_pixels(image_size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class ImageListDataset(Dataset):
    """(image tensor, label) for a list of (path relative to root, label)."""

    def __init__(self, root: str | Path, items: list[tuple[str, int]], transform, min_size: int | None = None):
        self.root = Path(root)
        self.items = list(items)
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        return self.transform(load_rgb(self.root / rel, self.min_size)), label


def scan_labelled_folder(
    data: str | Path, classes: list[str], labels: str | Path | None = None
) -> tuple[str, list[tuple[str, int]], list[tuple[str, str]]]:
    """Images to evaluate a trained model on: (root, [(relpath, label)], skipped).

    Takes the folder's test/ split if it has one, else its val/ split, else every class folder.
    Class folders must use the model's class names (a subset is fine). `labels`: a CSV of
    path,label[,split] rows instead (its test rows if it has some, else its val rows, else all).
    """
    root = Path(data).expanduser()
    if not root.is_dir():
        raise FinetuneError(f"data folder not found: {root}" if not root.exists() else f"not a folder: {root}")
    root = root.resolve()
    if labels:
        return _labelled_rows_to_evaluate(root, Path(labels).expanduser(), classes)
    with _readable(root):
        splits = find_splits(root)
    split_dir = splits.get("test") or splits.get("val") or splits.get("all") or splits["train"]
    index = {name: i for i, name in enumerate(classes)}
    unusable: list[tuple[str, str]] = []
    with _readable(split_dir):
        class_dirs = _class_dirs(split_dir)
    per_class = {d.name: _image_files(d, root, skipped=unusable) for d in class_dirs}
    unknown = sorted(set(per_class) - set(index))
    if unknown:
        raise FinetuneError(
            f"class {unknown[0]!r} in {split_dir} is not one of the model's classes: {', '.join(classes)}"
        )
    files = [rel for rels in per_class.values() for rel in rels]
    bad = check_images(root, files)
    items = [(rel, index[c]) for c, rels in per_class.items() for rel in rels if rel not in bad]
    if not items:
        raise FinetuneError(f"no valid images in class folders under {split_dir}")
    return str(root), items, sorted([*bad.items(), *unusable])


def _labels_file(root: Path, labels: Path) -> Path:
    """The labels file as given, or, when there is none there, the one of that name inside the data
    folder (or its zip)."""
    return root / labels if not labels.exists() and (root / labels).is_file() else labels


def _labelled_rows_to_evaluate(
    root: Path, labels: Path, classes: list[str]
) -> tuple[str, list[tuple[str, int]], list[tuple[str, str]]]:
    from .labels import read_labels

    labels = _labels_file(root, labels)
    rows = read_labels(labels, root)
    split = next(name for name in ("test", "val", "all", "train") if name in rows.per_split or name == "train")
    per_class = rows.per_split.get(split, {})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(per_class) - set(index))
    if unknown:
        raise FinetuneError(f"class {unknown[0]!r} in {labels} is not one of the model's classes: {', '.join(classes)}")
    files = [rel for rels in per_class.values() for rel in rels]
    bad = check_images(root, files)
    items = [(rel, index[c]) for c, rels in per_class.items() for rel in rels if rel not in bad]
    if not items:
        raise FinetuneError(f"no valid images listed in {labels}")
    return str(root), items, sorted([*bad.items(), *rows.skipped])

"""Streamed JPEGs decoded on the training device: nvJPEG on CUDA, through torchvision.io.decode_jpeg.

Workers do the cheap part of each image: they open it with every check of data.open_image (formats,
pixel limit, hostile structure and EXIF), read its bytes, its size and its EXIF orientation, and draw
its RandomResizedCrop box and flip, as v2.RandomResizedCrop draws them. A batch then crosses to the
training process as JPEG bytes (a tenth of its pixels' bytes), and a helper thread of that process
decodes it on the device, orients, crops, resizes and flips there.

The thread, not the training loop, waits for the decoder: torchvision's GPU decoder synchronises its
stream with the host before it returns, which in the loop would be a host sync per step. The thread
also waits for its own stream before every decode, because nvJPEG's hardware engine does not honour
stream order (it may write a buffer that queued kernels still read; pytorch/vision#9606,
meta-pytorch/torchcodec#1634), and hands each batch over with record_stream, so the allocator never
gives its memory to the decoder while the training stream still reads it.

What nvJPEG cannot take (PNG, WebP, CMYK JPEGs) is decoded and cropped by PIL in the workers, as
without this; a JPEG the device decoder rejects is decoded again by PIL, and named if that fails too.
Validation images stay on PIL, so the validation accuracy is measured as the final evaluation and
`finetune predict` see the images.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from .data import _check_exif, _decode, _exif_block, open_image, train_pixels

JPEG_FORMATS = ("JPEG", "MPO")  # MPO: a camera's JPEG with a second picture after the first
DEVICE_MODES = ("RGB", "L")  # what nvJPEG decodes to RGB (not CMYK or YCCK)
# Decoded pixels per decode_jpeg call: bounds the decoder's output (3 bytes a pixel, 192 MiB here),
# however large the photos; a batch of 256 phone photos would otherwise need 9 GB at once.
PIXELS_PER_DECODE = 64 * 2**20
QUEUED_BATCHES = 2  # decoded batches waiting for the training loop (each B x 3 x S x S uint8)
ORIENTATION_TAG = 0x0112
_END = object()


class EncodedBatch(NamedTuple):
    """A training batch as it crosses from the workers, in a few tensors whatever its size (each tensor
    crossing processes holds a file descriptor while in flight): the JPEGs to decode on the device, one
    after another in `data` (`lengths` bytes each), and the crops PIL decoded, stacked in `pixels`.

    plans: int64 [B, PLAN]: on the device?, EXIF orientation, top, left, height, width (the crop box in
    the oriented image), then the stored image's height and width; flips: bool [B]; paths: each image's
    file (errors name it). Images keep their order: the k-th encoded plan is the k-th of `lengths`."""

    data: torch.Tensor
    lengths: torch.Tensor
    pixels: torch.Tensor
    plans: torch.Tensor
    flips: torch.Tensor
    paths: list[str]


PLAN = 8


class EncodedImages(Dataset):
    """(JPEG bytes and their crop plan, or a PIL-decoded crop; label) for a list of (path, label).

    Which decoder: nvJPEG decodes every pixel, PIL's draft mode skips what a crop of the training size
    cannot use (DCT scaling, a 12-megapixel photo decoded at 1/4 or 1/8). So a JPEG goes to the device
    when draft decoding could not reduce it (its short side under twice `draft`, the size PIL keeps),
    and a larger one is decoded here at a reduced scale: each decoder where it is the faster, and no
    4 MB photo crosses processes and the bus whole."""

    scale = (0.08, 1.0)  # v2.RandomResizedCrop's defaults, which train_pixels uses
    ratio = (3 / 4, 4 / 3)

    def __init__(self, root: str | Path, items: list[tuple[str, int]], image_size: int):
        self.root = Path(root)
        self.items = list(items)
        self.image_size = image_size
        self.draft = image_size * 2  # what the PIL streaming path keeps: RandomResizedCrop may zoom in
        self.decode_here = train_pixels(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        rel, label = self.items[index]
        path = self.root / rel
        try:
            return self._read(path, label)
        except FileNotFoundError:
            raise  # its message names the file
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            raise OSError(f"cannot read {path}: {error}") from None

    def on_device(self, image: Image.Image) -> bool:
        return (
            image.format in JPEG_FORMATS
            and image.mode in DEVICE_MODES
            and min(image.size) < 2 * self.draft  # draft decoding would not reduce it
        )

    def _read(self, path: Path, label: int):
        with open_image(path) as image:
            if not self.on_device(image):
                image.draft("RGB", (self.draft, self.draft))
                crop = self.decode_here(_decode(image))
                return crop, torch.zeros(PLAN, dtype=torch.long), False, str(path), label
            _check_exif(_exif_block(image))
            orientation = image.getexif().get(ORIENTATION_TAG, 1)
            orientation = orientation if orientation in range(1, 9) else 1  # as exif_transpose: others ignored
            width, height = image.size
            assert isinstance(image, ImageFile.ImageFile) and image.fp is not None  # opened from a file
            image.fp.seek(0)
            data = image.fp.read()  # the file open_image checked: never the path again
        oriented = (width, height) if orientation < 5 else (height, width)  # 5 to 8 swap the sides
        top, left, h, w = v2.RandomResizedCrop.get_params(
            torch.empty((0, oriented[1], oriented[0])), list(self.scale), list(self.ratio)
        )  # get_params reads only the shape: an empty tensor of it allocates nothing
        plan = torch.tensor([1, orientation, top, left, h, w, height, width], dtype=torch.long)
        flip = bool(torch.rand(()) < 0.5)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), plan, flip, str(path), label


def collate_encoded(samples: list[tuple]) -> tuple[EncodedBatch, torch.Tensor]:
    payloads, plans, flips, paths, labels = zip(*samples, strict=True)
    encoded = [payload for payload, plan in zip(payloads, plans, strict=True) if plan[0]]
    crops = [payload for payload, plan in zip(payloads, plans, strict=True) if not plan[0]]
    size = crops[0].shape[-1] if crops else 0
    batch = EncodedBatch(
        torch.cat(encoded) if encoded else torch.empty(0, dtype=torch.uint8),
        torch.tensor([len(p) for p in encoded], dtype=torch.long),
        torch.stack(crops) if crops else torch.empty((0, 3, size, size), dtype=torch.uint8),
        torch.stack(plans),
        torch.tensor(flips, dtype=torch.bool),
        list(paths),
    )
    return batch, torch.tensor(labels, dtype=torch.long)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded [C, H, W] image turned upright by its EXIF orientation, as PIL's exif_transpose does."""
    turns = {
        2: lambda x: x.flip(-1),
        3: lambda x: x.flip(-1, -2),
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(-1, -2),
        6: lambda x: x.transpose(-1, -2).flip(-1),
        7: lambda x: x.transpose(-1, -2).flip(-1, -2),
        8: lambda x: x.transpose(-1, -2).flip(-2),
    }
    return turns[orientation](image) if orientation in turns else image


def crop_and_resize(image: torch.Tensor, plan: list[int], flip: bool, size: int) -> torch.Tensor:
    """A decoded image's crop resized to size x size (bilinear, antialiased: v2.RandomResizedCrop's
    resize on tensors) and flipped where drawn, as uint8."""
    orientation, top, left, h, w = plan[1:6]
    crop = orient(image, orientation)[:, top : top + h, left : left + w]
    resized = F.interpolate(crop[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
    resized = resized.round_().clamp_(0, 255).to(torch.uint8)
    return resized.flip(-1) if flip else resized


def _pil_decode(data: torch.Tensor, path: str, size: tuple[int, int], where: torch.device) -> torch.Tensor:
    """The fallback for a JPEG the device decoder rejects: PIL, without exif_transpose (the plan's
    orientation is applied later, as for the device's decode), on `where`."""
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes()), formats=list(JPEG_FORMATS)) as image:
            image.load()
            pixels = v2.functional.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:
        raise OSError(f"cannot decode {path}: {error}") from None
    if tuple(pixels.shape[-2:]) != size:
        raise OSError(f"cannot decode {path}: its header says {size[1]} x {size[0]}, its pixels differ")
    if where.type == "cuda":  # from pinned memory: a pageable copy would wait (a sync, in the thread)
        return pixels.pin_memory().to(where, non_blocking=True)
    return pixels.to(where)


def decode_batch(batch: EncodedBatch, size: int, where: torch.device) -> torch.Tensor:
    """An EncodedBatch -> uint8 [B, 3, size, size] on `where` (CUDA: nvJPEG; the CPU: libjpeg), the
    JPEGs decoded in chunks of at most PIXELS_PER_DECODE pixels."""
    plans = batch.plans.tolist()  # a host tensor: reading it never waits for the device
    flips = batch.flips.tolist()
    images = torch.empty((len(plans), 3, size, size), dtype=torch.uint8, device=where)
    encoded = [k for k, plan in enumerate(plans) if plan[0]]
    decoded_here = [k for k, plan in enumerate(plans) if not plan[0]]
    for k, crop in zip(decoded_here, batch.pixels, strict=True):
        images[k].copy_(crop, non_blocking=True)
    payloads = dict(zip(encoded, torch.split(batch.data, batch.lengths.tolist()), strict=True))
    for chunk in _chunks(encoded, [plans[k][6] * plans[k][7] for k in encoded]):
        for k, image in zip(chunk, _decode_chunk([payloads[k] for k in chunk], chunk, batch, where), strict=True):
            try:
                images[k] = crop_and_resize(image, plans[k], flips[k], size)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as error:
                raise OSError(f"cannot resize {batch.paths[k]} on {where}: {error}") from None
    return images


def _chunks(positions: list[int], pixels: list[int]) -> Iterator[list[int]]:
    chunk: list[int] = []
    total = 0
    for k, n in zip(positions, pixels, strict=True):
        if chunk and total + n > PIXELS_PER_DECODE:
            yield chunk
            chunk, total = [], 0
        chunk.append(k)
        total += n
    if chunk:
        yield chunk


def _decode_chunk(data: list[torch.Tensor], chunk: list[int], batch: EncodedBatch, where: torch.device):
    """The chunk's JPEGs decoded on `where`, each checked against the size its header gave the worker
    (a file with two frame headers could give nvJPEG and PIL two sizes): PIL decodes what does not fit."""
    if where.type == "cuda":
        _settle(where)
    try:
        decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=where)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError:  # one image the decoder cannot take fails the call: each goes to PIL alone
        if where.type == "cuda":  # the failed call may leave writes queued into memory it had taken
            torch.cuda.synchronize(where)
        decoded = [None] * len(chunk)
    plans = batch.plans[chunk].tolist()
    return [
        image
        if image is not None and tuple(image.shape[-2:]) == (plan[6], plan[7])
        else _pil_decode(data[i], batch.paths[k], (plan[6], plan[7]), where)
        for i, (k, image, plan) in enumerate(zip(chunk, decoded, plans, strict=True))
    ]


def _settle(device: torch.device) -> None:
    """Wait (this thread) until the kernels queued on this thread's stream have run. nvJPEG's hardware
    engine may write its output before them, into a block they still read: freed on this stream, the
    allocator hands it out again at once. An event wait: set_sync_debug_mode does not count it."""
    queued = torch.cuda.Event()
    queued.record(torch.cuda.current_stream(device))
    queued.synchronize()


class DeviceDecoded:
    """The training loader's batches (EncodedBatch, labels) as (uint8 images on the device, labels):
    a helper thread decodes up to QUEUED_BATCHES ahead of the training loop, on a CUDA stream of its own
    (on other devices with libjpeg, then copied there)."""

    def __init__(self, loader: DataLoader, image_size: int, device: torch.device):
        self.loader, self.image_size, self.device = loader, image_size, device
        self.bytes_crossed = self.images_crossed = 0  # what came from the workers (bench/feeder.py)

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_sampler(self):  # training.epoch_sampler finds the epoch's order through these
        return self.loader.batch_sampler

    @property
    def sampler(self):
        return self.loader.sampler

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ready: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
        stop = threading.Event()
        thread = threading.Thread(target=self._feed, args=(ready, stop), name="finetune-jpeg-decode", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                images, labels, written = item
                if written is not None:  # the training stream waits (on the device) for the decode stream
                    training_stream = torch.cuda.current_stream(self.device)
                    training_stream.wait_event(written)
                    images.record_stream(training_stream)  # its memory is not reused before it has been read
                yield images, labels
        finally:
            stop.set()
            while thread.is_alive():  # unblock a feeder waiting for room, then let it end
                try:
                    ready.get(timeout=0.05)
                except queue.Empty:
                    pass
            thread.join()

    def _feed(self, ready: queue.Queue, stop: threading.Event) -> None:
        def hand_over(item: Any) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        cuda = self.device.type == "cuda"
        where = self.device if cuda else torch.device("cpu")
        try:
            stream = torch.cuda.Stream(self.device) if cuda else None
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                for batch, labels in self.loader:
                    if stop.is_set():
                        return
                    self.bytes_crossed += batch.data.numel() + batch.pixels.numel()
                    self.images_crossed += len(batch.paths)
                    images = decode_batch(batch, self.image_size, where).to(self.device, non_blocking=True)
                    written = None
                    if stream is not None:
                        written = torch.cuda.Event()
                        written.record(stream)
                    hand_over((images, labels, written))
            hand_over(_END)
        except BaseException as error:  # noqa: BLE001  # raised again in the training loop, which reports it
            hand_over(error)


def device_decode_problem(device: torch.device) -> str | None:
    """Why JPEGs cannot be decoded on this device (None: they can): a tiny JPEG is decoded there."""
    if device.type != "cuda":
        return f"nvJPEG needs a CUDA device, not {device.type}"
    try:
        probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        decoded = decode_jpeg(probe, mode=ImageReadMode.RGB, device=device)
        torch.cuda.synchronize(device)
    except RuntimeError as error:
        return f"torchvision cannot decode JPEGs on {device}: {str(error).splitlines()[0]}"
    return None if tuple(decoded.shape) == (3, 16, 16) else f"torchvision's GPU decoder gave {tuple(decoded.shape)}"

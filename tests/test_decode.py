"""Streamed JPEGs decoded in the training process (nvJPEG on CUDA): the same path runs here with libjpeg
on the CPU, so everything but the GPU decoder itself is exercised (selftest checks that one on CUDA)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from finetune import decode
from finetune.config import FinetuneError, TrainConfig
from finetune.decode import DeviceDecoded, EncodedImages, collate_encoded, decode_batch, orient

CPU = torch.device("cpu")
RED, GREEN = (200, 30, 30), (30, 200, 30)


def save(path, colour=RED, size=(60, 40), mode="RGB", orientation=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour).convert(mode)
    options = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[decode.ORIENTATION_TAG] = orientation
        options["exif"] = exif
    image.save(path, format=fmt, **options)
    return path


def batch_of(root, items, size=32):
    dataset = EncodedImages(root, items, size)
    return collate_encoded([dataset[k] for k in range(len(dataset))])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_an_image_upright_as_exif_transpose_does(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    image.getexif()[decode.ORIENTATION_TAG] = orientation
    expected = np.asarray(ImageOps.exif_transpose(image))
    turned = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0)
    assert np.array_equal(turned.numpy(), expected)


def test_every_kind_of_image_comes_out_as_its_colour(tmp_path):
    """JPEGs (RGB, grey, EXIF-rotated) cross as bytes; a CMYK JPEG and a PNG with alpha are decoded by
    PIL in the worker. Solid colours survive any crop, resize and flip, so each must come out as its own."""
    files = {
        "rgb.jpg": dict(colour=RED),
        "turned.jpg": dict(colour=GREEN, size=(90, 30), orientation=6),
        "mirrored.jpg": dict(colour=GREEN, orientation=5),
        "grey.jpg": dict(colour=RED, mode="L"),
        "cmyk.jpg": dict(colour=GREEN, mode="CMYK"),
        "alpha.png": dict(colour=RED, mode="RGBA"),
    }
    for name, options in files.items():
        save(tmp_path / name, **options)
    batch, labels = batch_of(tmp_path, [(name, k) for k, name in enumerate(files)])
    encoded = dict(zip(files, batch.plans[:, 0].tolist(), strict=True))
    assert encoded == {"rgb.jpg": 1, "turned.jpg": 1, "mirrored.jpg": 1, "grey.jpg": 1, "cmyk.jpg": 0, "alpha.png": 0}
    turned = batch.plans[1].tolist()
    assert turned[1] == 6 and turned[2] + turned[4] <= 90 and turned[3] + turned[5] <= 30  # box in the upright image
    images = decode_batch(batch, 32, CPU)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8 and labels.tolist() == list(range(6))
    grey = Image.new("RGB", (1, 1), RED).convert("L").getpixel((0, 0))
    expected = [RED, GREEN, GREEN, (grey,) * 3, GREEN, RED]
    means = images.float().mean((2, 3))
    assert torch.allclose(means, torch.tensor(expected, dtype=torch.float32), atol=5), means


def test_a_jpeg_the_decoder_rejects_goes_to_pil_and_a_broken_one_is_named(tmp_path, monkeypatch):
    save(tmp_path / "good.jpg", GREEN)
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    broken = tmp_path / "broken.jpg"
    Image.fromarray(noise).save(broken)
    broken.write_bytes(broken.read_bytes()[:20_000])  # the header parses, the pixels are cut off

    def rejects(*args, **kwargs):
        raise RuntimeError("not supported by this decoder")

    monkeypatch.setattr(decode, "decode_jpeg", rejects)
    batch, _ = batch_of(tmp_path, [("good.jpg", 0)])
    assert decode_batch(batch, 16, CPU).float().mean((2, 3)).sub(torch.tensor(GREEN)).abs().max() < 5
    batch, _ = batch_of(tmp_path, [("good.jpg", 0), ("broken.jpg", 1)], size=256)  # both to the device
    with pytest.raises(OSError, match="broken.jpg"):
        decode_batch(batch, 16, CPU)
    broken.write_bytes(broken.read_bytes()[:300])  # now the header too: the worker names it
    with pytest.raises(OSError, match="cannot read .*broken.jpg"):
        batch_of(tmp_path, [("broken.jpg", 1)])


def test_large_photos_are_decoded_a_bounded_number_of_pixels_at_a_time(tmp_path, monkeypatch):
    for k in range(5):
        save(tmp_path / f"{k}.jpg", size=(100, 100))
    calls = []
    real = decode.decode_jpeg

    def counted(data, **kwargs):
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(decode, "decode_jpeg", counted)
    monkeypatch.setattr(decode, "PIXELS_PER_DECODE", 25_000)  # two of these photos a call
    batch, _ = batch_of(tmp_path, [(f"{k}.jpg", 0) for k in range(5)], size=64)
    assert decode_batch(batch, 16, CPU).shape[0] == 5
    assert calls == [2, 2, 1]


def decoder_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "finetune-jpeg-decode"]


def test_the_decoding_thread_hands_over_batches_and_ends_with_the_loop(tmp_path):
    items = [(save(tmp_path / f"{k}.jpg", RED if k % 2 else GREEN).name, k % 2) for k in range(12)]
    loader = DataLoader(EncodedImages(tmp_path, items, 24), batch_size=4, collate_fn=collate_encoded)
    decoded = DeviceDecoded(loader, 24, CPU)
    assert len(decoded) == 3 and decoded.sampler is loader.sampler
    batches = list(decoded)
    assert [tuple(images.shape) for images, _ in batches] == [(4, 3, 24, 24)] * 3
    assert not decoder_threads()
    for _ in decoded:  # a loop that stops early (Ctrl-C, early stopping) ends the thread too
        break
    assert not decoder_threads()


def test_a_file_gone_while_training_is_raised_in_the_training_loop(tmp_path):
    items = [(save(tmp_path / f"{k}.jpg").name, 0) for k in range(4)]
    (tmp_path / "2.jpg").unlink()
    loader = DataLoader(EncodedImages(tmp_path, items, 24), batch_size=4, collate_fn=collate_encoded)
    with pytest.raises(FileNotFoundError, match="2.jpg"):
        list(DeviceDecoded(loader, 24, CPU))
    assert not decoder_threads()


def test_auto_decodes_on_the_device_only_where_the_gpu_decoder_works(monkeypatch):
    from finetune.cache import decodes_on_device

    logged: list[str] = []
    cuda = torch.device("cuda")
    assert not decodes_on_device(TrainConfig(data="d"), CPU, logged.append)
    assert decodes_on_device(TrainConfig(data="d", jpeg_decode="device"), CPU, logged.append)
    assert not decodes_on_device(TrainConfig(data="d", jpeg_decode="workers"), cuda, logged.append)
    assert "needs a CUDA device" in decode.device_decode_problem(CPU)
    monkeypatch.setattr("finetune.cache.device_decode_problem", lambda device: "no nvJPEG in this build")
    assert not decodes_on_device(TrainConfig(data="d"), cuda, logged.append)
    assert logged == ["JPEGs are decoded by PIL in the workers: no nvJPEG in this build"]
    monkeypatch.setattr("finetune.cache.device_decode_problem", lambda device: None)
    assert decodes_on_device(TrainConfig(data="d"), cuda, logged.append)
    with pytest.raises(FinetuneError, match="jpeg decode must be one of auto, device, workers"):
        TrainConfig(data="d", jpeg_decode="gpu").validate()


def test_a_streamed_training_decodes_its_jpegs_in_the_training_process(tmp_path):
    from finetune.training import train

    for c, colour in enumerate((RED, GREEN)):
        for k in range(8):
            save(tmp_path / "data" / f"c{c}" / f"{k}.jpg", colour, size=(48 + k, 40), orientation=1 + k % 8)
    cfg = TrainConfig(
        data=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        weights="none",
        epochs=2,
        batch_size=4,
        image_size=32,
        workers=1,
        cache="off",
        jpeg_decode="device",
    )
    run = train(cfg)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["config"]["jpeg_decode"] == "device"
    assert "JPEGs in the training process" in (run / "events.jsonl").read_text()
    assert not decoder_threads()


def test_a_photo_draft_decoding_can_shrink_is_decoded_in_the_worker(tmp_path):
    """nvJPEG decodes every pixel: a phone photo is cheaper through PIL's draft mode, and its 4 MB
    would cross processes and the bus whole. Only JPEGs draft cannot reduce go to the device."""
    save(tmp_path / "small.jpg", size=(120, 90))
    save(tmp_path / "large.jpg", GREEN, size=(1200, 900))
    batch, _ = batch_of(tmp_path, [("small.jpg", 0), ("large.jpg", 1)], size=32)  # draft keeps 64 px
    assert batch.plans[:, 0].tolist() == [1, 0]
    assert batch.pixels.shape == (1, 3, 32, 32) and batch.lengths.tolist() == [len(batch.data)]
    images = decode_batch(batch, 32, CPU)
    assert images[1].float().mean((1, 2)).sub(torch.tensor(GREEN)).abs().max() < 5


def test_a_decode_of_another_size_than_the_header_said_goes_to_pil_and_oom_is_not_hidden(tmp_path, monkeypatch):
    save(tmp_path / "a.jpg", RED, size=(60, 40))
    batch, _ = batch_of(tmp_path, [("a.jpg", 0)])

    def wrong_size(data, **kwargs):
        return [torch.zeros((3, 7, 7), dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(decode, "decode_jpeg", wrong_size)
    assert decode_batch(batch, 16, CPU).float().mean((2, 3)).sub(torch.tensor(RED)).abs().max() < 5

    def out_of_memory(data, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decode, "decode_jpeg", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):  # not retried image by image through PIL
        decode_batch(batch, 16, CPU)

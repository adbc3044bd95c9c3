"""Labels from a CSV (path,label[,split]) for a flat folder of images: the same DatasetScan as class
folders, and a stranger's CSV is safe."""

from __future__ import annotations

import json
import os
import time

import pytest
from conftest import make_image, tree_digest

from finetune.cli import main
from finetune.config import FinetuneError
from finetune.data import DatasetScan, scan_dataset
from finetune.labels import MAX_LABELS_BYTES

PALETTE = {"cat": (220, 40, 40), "dog": (40, 200, 60), "owl": (40, 60, 220)}


def flat_folder(root, per_class=4):
    """root/img_<class>_<n>.png, no class folders; [(name, class)]."""
    rows = []
    for name, colour in PALETTE.items():
        for i in range(per_class):
            file = f"img_{name}_{i}.png"
            make_image(root / file, tuple(min(255, v + 5 * i) for v in colour))
            rows.append((file, name))
    return rows


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


def train_from_csv(tmp_path, data, labels) -> int:
    """`finetune train DATA --labels FILE`, tiny, into tmp_path/runs/csv; its exit status."""
    options = ["--weights", "none", "--epochs", "1", "--image-size", "32", "--workers", "0", "--batch-size", "4"]
    runs = ["--runs-dir", str(tmp_path / "runs"), "--run-name", "csv"]
    return main(["train", str(data), "--labels", str(labels), *options, *runs])


def test_a_csv_gives_the_scan_class_folders_would(tmp_path):
    data = tmp_path / "flat"
    rows = flat_folder(data)
    labels = write(tmp_path / "labels.csv", "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    scan = scan_dataset(data, val_fraction=0.25, seed=3, labels=labels)
    assert scan.classes == ["cat", "dog", "owl"] and scan.layout == "labels"
    assert len(scan.train) == 9 and len(scan.val) == 3  # stratified: one of each class's four
    assert {scan.classes[label] for _, label in scan.val} == {"cat", "dog", "owl"}
    assert all(scan.classes[label] in path for path, label in scan.train + scan.val)
    assert "labels from labels.csv (3 classes); 25% of each class held out" in scan.report()
    assert DatasetScan.from_dict(json.loads(json.dumps(scan.to_dict()))) == scan  # split.json round trip


def test_a_given_split_is_used_and_the_format_is_sniffed(tmp_path):
    """Semicolons, a BOM, CRLF, a quoted cell with the separator in it, Hugging Face's file_name header."""
    data = tmp_path / "flat"
    rows = flat_folder(data)
    make_image(data / "odd; name.png", PALETTE["owl"])
    lines = ["file_name;label;split"]
    lines += [f"{p};{c};{'val' if p.endswith('_0.png') else 'train'}" for p, c in rows]
    lines.append('"odd; name.png";owl;TEST')
    labels = write(tmp_path / "metadata.csv", "\ufeff" + "\r\n".join(lines) + "\r\n")
    scan = scan_dataset(data, labels=labels)
    assert len(scan.val) == 3 and all(path.endswith("_0.png") for path, _ in scan.val)
    assert scan.test == [("odd; name.png", 2)] and len(scan.train) == 9
    assert scan.val_fraction is None and "the split given in it" in scan.layout_text()


def test_a_headerless_csv_and_a_csv_inside_the_data_folder(tmp_path):
    data = tmp_path / "flat"
    rows = flat_folder(data, per_class=2)
    write(data / "labels.csv", "".join(f"{p}\t{c}\n" for p, c in rows))
    scan = scan_dataset(data, labels="labels.csv")  # found in the data folder
    assert len(scan.train) + len(scan.val) == 6 and scan.classes == ["cat", "dog", "owl"]


def test_a_hostile_csv_is_refused_row_by_row_and_nothing_outside_is_read(tmp_path):
    data = tmp_path / "flat"
    rows = flat_folder(data)
    secret = make_image(tmp_path / "secret.png", (1, 2, 3))
    os.symlink(secret, data / "link.png")
    (data / "broken.png").write_bytes(b"not an image")
    hostile = [
        (str(secret), "cat"),  # absolute
        ("../secret.png", "cat"),  # climbs out
        ("link.png", "dog"),  # a link that leads out
        ("missing.png", "dog"),
        ("broken.png", "owl"),  # not decodable
        ("img_cat_0.png", "dog"),  # a second label for a listed file: conflict
        ("unlabelled.png", ""),  # no label
    ]
    make_image(data / "unlabelled.png", (9, 9, 9))
    before = tree_digest(data)
    text = "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows + hostile)
    scan = scan_dataset(data, labels=write(tmp_path / "labels.csv", text))
    reasons = dict(scan.skipped)
    assert "absolute path" in reasons[str(secret)]
    assert "leaves the data folder" in reasons["../secret.png"]
    assert "leads out of the data folder" in reasons["link.png"]
    assert "not found" in reasons["missing.png"] and "broken.png" in reasons
    assert "conflict: labelled 'cat' and 'dog'" in reasons["img_cat_0.png"]
    assert "no label" in reasons["unlabelled.png"]
    used = {path for path, _ in scan.train + scan.val}
    assert "img_cat_0.png" not in used and len(used) == 11 and not any("secret" in p for p in used)
    assert any("conflict" in warning for warning in scan.warnings)
    assert tree_digest(data) == before  # the folder is only read


def test_one_file_written_several_ways_is_one_file(tmp_path):
    """./a.png, a.png/, .//a.png and a link inside the folder name one file: a second label of it is a
    conflict, and it is never in train and val at once."""
    data = tmp_path / "flat"
    rows = flat_folder(data)
    os.symlink("img_owl_0.png", data / "alias.png")  # a link that stays inside
    make_image(data / "8:30am.png", PALETTE["cat"])  # a colon that is not a drive letter
    ways = [
        ("./img_cat_0.png", "dog"),
        ("img_cat_1.png/", "dog"),
        (".//img_dog_0.png", "dog", "val"),  # the same label, another split: still one file
        ("alias.png", "cat"),
        ("8:30am.png", "cat"),
    ]
    lines = [f"{p},{c},train" for p, c in rows] + [",".join(row) + ("" if len(row) == 3 else ",train") for row in ways]
    scan = scan_dataset(data, labels=write(tmp_path / "labels.csv", "path,label,split\n" + "\n".join(lines) + "\n"))
    reasons = dict(scan.skipped)
    for name in ("img_cat_0.png", "img_cat_1.png", "img_owl_0.png"):
        assert "conflict" in reasons[name], scan.skipped
    used = [path for path, _ in scan.train + scan.val]
    assert len(used) == len(set(used)) and set(used) <= {p for p, _ in rows} | {"8:30am.png"}
    assert "img_dog_0.png" in [path for path, _ in scan.train] and "8:30am.png" in used
    drive = write(tmp_path / "drive.csv", "C:/x.png,cat\n" + "".join(f"{p},{c}\n" for p, c in rows))
    assert "absolute path" in dict(scan_dataset(data, labels=drive).skipped)["C:/x.png"]


def test_a_crafted_csv_costs_no_time_to_sniff_and_its_error_stays_one_short_line(tmp_path):
    """csv.Sniffer's regexes are quadratic: 64 KB of ',"a' took ~30 s to sniff, and each of its cells
    went into the multi-label message."""
    data = tmp_path / "flat"
    flat_folder(data, per_class=1)
    crafted = write(tmp_path / "crafted.csv", ',"a' * 21845)
    started = time.monotonic()
    with pytest.raises(FinetuneError) as raised:
        scan_dataset(data, labels=crafted)
    assert time.monotonic() - started < 10  # unguarded: ~30 s here
    message = str(raised.value)
    assert "multi-label" in message and "more" in message and len(message) < 400 and "\n" not in message


def test_multi_label_rows_an_oversized_file_and_a_fifo_say_so_in_one_line(tmp_path):
    data = tmp_path / "flat"
    rows = flat_folder(data, per_class=2)
    several = write(tmp_path / "multi.csv", "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows) + "a.png,cat,dog\n")
    with pytest.raises(FinetuneError, match=r"gives several labels \('cat', 'dog'\): multi-label .* not supported"):
        scan_dataset(data, labels=several)
    headerless = write(tmp_path / "multi2.csv", "a.png,cat,dog\n")
    with pytest.raises(FinetuneError, match="multi-label"):
        scan_dataset(data, labels=headerless)
    big = tmp_path / "big.csv"
    with open(big, "wb") as file:
        file.truncate(MAX_LABELS_BYTES + 1)
    with pytest.raises(FinetuneError, match="too large to be a label file"):
        scan_dataset(data, labels=big)
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    with pytest.raises(FinetuneError, match="fifo.csv"):
        scan_dataset(data, labels=fifo)
    with pytest.raises(FinetuneError, match="labels file not found"):
        scan_dataset(data, labels=tmp_path / "nope.csv")
    latin = write(tmp_path / "latin.csv", "path,label\nx.png,caf\xe9\n", encoding="latin-1")
    with pytest.raises(FinetuneError, match="not UTF-8"):
        scan_dataset(data, labels=latin)


def test_the_command_line_scans_and_trains_from_a_csv(tmp_path, capsys):
    data = tmp_path / "flat"
    rows = flat_folder(data, per_class=4)
    labels = write(tmp_path / "labels.csv", "path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    assert main(["scan", str(data), "--labels", str(labels)]) == 0
    assert "labels from labels.csv (3 classes)" in capsys.readouterr().out
    assert train_from_csv(tmp_path, data, labels) == 0
    run = tmp_path / "runs" / "csv"
    split = json.loads((run / "split.json").read_text())
    assert split["labels_file"] == str(labels) and split["classes"] == ["cat", "dog", "owl"]
    assert json.loads((run / "run.json").read_text())["config"]["labels"] == str(labels)


def test_doctor_and_evaluate_read_the_same_csv(tmp_path, capsys):
    from finetune.data_doctor.doctor import _scan
    from finetune.evaluate import evaluate_run

    data = tmp_path / "flat"
    rows = flat_folder(data, per_class=4)
    lines = [f"{p},{c},{'test' if p.endswith('_3.png') else ''}" for p, c in rows]
    labels = write(tmp_path / "labels.csv", "path,label,split\n" + "\n".join(lines) + "\n")
    scan = _scan(data, None, 0.25, 0, labels)  # what `finetune doctor DATA --labels` checks
    assert len(scan.test) == 3 and scan.layout == "labels"
    assert train_from_csv(tmp_path, data, labels) == 0
    evaluation = evaluate_run(tmp_path / "runs" / "csv", data, labels=labels, device="cpu")
    assert evaluation.metrics["num_images"] == 3  # the test rows
    with pytest.raises(FinetuneError, match="not one of the model's classes"):
        evaluate_run(tmp_path / "runs" / "csv", data, labels=write(tmp_path / "x.csv", "p,l\nimg_cat_0.png,bird\n"))

"""The curation file: decisions honoured by apply_curation, the dataset folder never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_class_folders, tree_digest

from finetune.config import FinetuneError
from finetune.curation import (
    CURATION_FORMAT,
    CuratedScan,
    Decision,
    add_decisions,
    apply_curation,
    leak_decisions,
    load_curation,
    new_curation,
    save_curation,
)
from finetune.data import DatasetScan, scan_dataset


@pytest.fixture
def split_data(tmp_path) -> Path:
    root = tmp_path / "data"
    make_class_folders(root / "train", ("cats", "dogs", "fish"), per_class=4)
    make_class_folders(root / "val", ("cats", "dogs", "fish"), per_class=2)
    return root


def test_round_trip_exclude_relabel_keep(split_data, tmp_path):
    before = tree_digest(split_data)
    scan = scan_dataset(split_data)
    curation = new_curation(split_data)
    curation.set("train/cats/img_0.png", "exclude", note="blurry")
    curation.set("train/dogs/img_1.png", "relabel", "cats")
    curation.set("val/fish/img_0.png", "relabel", "dogs")
    curation.set("train/fish/img_2.png", "keep")
    curation.set("train/cats/img_3.png", "relabel", "fish")
    curation.set("train/cats/img_3.png", "keep")  # a later decision replaces the earlier one
    curation.set("train/gone.png", "exclude")  # no longer in the data
    path = save_curation(curation, tmp_path / "runs" / "curation.json")

    loaded = load_curation(path)
    assert loaded.data == str(split_data.resolve()) and loaded.source == str(path)
    assert [d.path for d in loaded.decisions] == [d.path for d in curation.decisions]
    raw = json.loads(path.read_text())
    assert raw["format"] == CURATION_FORMAT
    assert {"path": "train/dogs/img_1.png", "action": "relabel", "label": "cats"} in raw["decisions"]

    curated = apply_curation(scan, loaded)
    assert isinstance(curated, CuratedScan)
    index = {name: i for i, name in enumerate(scan.classes)}
    train, val = dict(curated.train), dict(curated.val)
    assert "train/cats/img_0.png" not in train and "train/cats/img_0.png" not in val
    assert train["train/dogs/img_1.png"] == index["cats"]
    assert val["val/fish/img_0.png"] == index["dogs"]
    assert train["train/fish/img_2.png"] == index["fish"] and train["train/cats/img_3.png"] == index["cats"]
    assert len(curated.train) == len(scan.train) - 1 and len(curated.val) == len(scan.val)
    # the scan it came from is unchanged, and so is the folder
    assert dict(scan.train)["train/dogs/img_1.png"] == index["dogs"] and len(scan.train) == 12
    assert tree_digest(split_data) == before

    record = curated.curation
    assert record["excluded"] == [{"path": "train/cats/img_0.png", "split": "train", "class": "cats", "note": "blurry"}]
    assert {"path": "val/fish/img_0.png", "split": "val", "from": "fish", "to": "dogs"} in record["relabelled"]
    assert record["kept"] == 2 and record["unknown"] == ["train/gone.png"] and record["file"] == str(path)
    saved = curated.to_dict()  # what split.json gets
    assert saved["curation"] == record and saved["counts"]["train"]["cats"] == 4  # 4 - 1 excluded + 1 relabelled
    assert isinstance(DatasetScan.from_dict(json.loads(json.dumps(saved))), DatasetScan)
    report = curated.report()
    assert "Curation:" in report and "1 excluded, 2 relabelled" in report and "train/gone.png" in report


def test_leak_groups_become_exclusions_of_the_val_and_test_copies(split_data, tmp_path):
    groups = [
        {
            "kind": "exact",
            "paths": ["train/cats/img_0.png", "val/cats/img_1.png"],
            "splits": ["train", "val"],
            "classes": ["cats", "cats"],
        },
        {
            "kind": "near",
            "paths": ["val/dogs/img_0.png", "test/dogs/x.png", "train/dogs/img_2.png"],
            "splits": ["val", "test", "train"],
            "classes": ["dogs", "dogs", "dogs"],
        },
        {
            "kind": "near",
            "paths": ["val/fish/img_0.png", "test/fish/y.png"],
            "splits": ["val", "test"],
            "classes": ["fish", "fish"],
        },
        {
            "kind": "exact",
            "paths": ["train/cats/img_1.png", "train/cats/img_2.png"],
            "splits": ["train", "train"],
            "classes": ["cats", "cats"],
        },
    ]
    decisions = leak_decisions(groups)
    assert [(d.path, d.action) for d in decisions] == [
        ("val/cats/img_1.png", "exclude"),
        ("val/dogs/img_0.png", "exclude"),
        ("test/dogs/x.png", "exclude"),
        ("test/fish/y.png", "exclude"),
    ]
    assert "train/cats/img_0.png" in decisions[0].note
    curated = apply_curation(scan_dataset(split_data), add_decisions(new_curation(split_data), decisions))
    assert "val/cats/img_1.png" not in dict(curated.val)
    assert any(e.get("note", "").startswith("leak:") for e in curated.curation["excluded"])


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ('{"format": "other", "data": "x", "decisions": []}', "not a curation file"),
        ("[1, 2]", "not a curation file"),
        ('{"format": "finetune-curation/1", "decisions": []}', "'data'"),
        ('{"format": "finetune-curation/1", "data": "x", "decisions": {}}', "'decisions' must be a list"),
        (
            '{"format": "finetune-curation/1", "data": "x", "decisions": [{"path": "a.png", "action": "delete"}]}',
            "action 'delete'",
        ),
        (
            '{"format": "finetune-curation/1", "data": "x", "decisions": [{"path": "a.png", "action": "relabel"}]}',
            "needs the new class",
        ),
        (
            '{"format": "finetune-curation/1", "data": "x", "decisions": [{"path": "/etc/a.png", "action": "keep"}]}',
            "must be relative",
        ),
        (
            '{"format": "finetune-curation/1", "data": "x", "decisions": [{"path": "../a.png", "action": "keep"}]}',
            "must be relative",
        ),
        ('{"format": "finetune-curation/1", "data": "x", "decisions": ["a.png"]}', "decision 1"),
    ],
)
def test_bad_curation_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "curation.json"
    path.write_text(content)
    with pytest.raises(FinetuneError, match=message) as caught:
        load_curation(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_missing_file_unknown_class_emptied_class_and_saving_inside_the_data(split_data, tmp_path):
    with pytest.raises(FinetuneError, match="not found"):
        load_curation(tmp_path / "nope.json")
    scan = scan_dataset(split_data)
    curation = new_curation(split_data)
    curation.set("train/cats/img_0.png", "relabel", "horses")
    with pytest.raises(FinetuneError, match="'horses': not a class"):
        apply_curation(scan, curation)
    curation = new_curation(split_data)
    for i in range(4):
        curation.set(f"train/fish/img_{i}.png", "exclude")
    with pytest.raises(FinetuneError, match="'fish' has no training image left"):
        apply_curation(scan, curation)
    with pytest.raises(FinetuneError, match="must not be inside the dataset"):
        save_curation(curation, split_data / "curation.json")
    with pytest.raises(FinetuneError, match="'label'"):
        curation.set("train/cats/img_0.png", "relabel")
    assert not (split_data / "curation.json").exists()


def test_windows_separators_and_dot_prefix_are_normalised(split_data, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "format": CURATION_FORMAT,
                "data": str(split_data),
                "decisions": [
                    {"path": "train\\cats\\img_0.png", "action": "exclude"},
                    {"path": "./train/dogs/img_0.png", "action": "exclude"},
                ],
            }
        )
    )
    curation = load_curation(path)
    assert [d.path for d in curation.decisions] == ["train/cats/img_0.png", "train/dogs/img_0.png"]
    assert curation.decisions[0] == Decision("train/cats/img_0.png", "exclude")
    curated = apply_curation(scan_dataset(split_data), curation)
    assert len(curated.curation["excluded"]) == 2


def test_class_folder_layout_keeps_its_split(tmp_path):
    root = make_class_folders(tmp_path / "flat", ("a", "b"), per_class=10)
    scan = scan_dataset(root, val_fraction=0.2, seed=3)
    victim = scan.val[0][0]
    curation = new_curation(root)
    curation.set(victim, "exclude")
    curated = apply_curation(scan, curation)
    assert curated.train == scan.train and curated.val == scan.val[1:]
    assert curated.seed == 3 and curated.val_fraction == 0.2 and curated.layout == "class-folders"

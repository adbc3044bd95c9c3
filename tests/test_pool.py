"""`add` decisions: images of an unlabelled pool labelled in the Review tab's Label mode, trained on
where they lie (the pool is only read)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_class_folders, make_image, tree_digest
from PIL import Image

from finetune.config import FinetuneError, TrainConfig
from finetune.curation import (
    CuratedScan,
    Decision,
    added_item,
    apply_curation,
    load_curation,
    new_curation,
    save_curation,
)
from finetune.data import scan_dataset
from finetune.evaluate import in_training_split
from finetune.model_card import curation_line
from finetune.rundir import RunDir
from finetune.suggest import suggest
from finetune.training import train, unreadable_data


@pytest.fixture
def data_and_pool(tmp_path) -> tuple[Path, Path]:
    data = make_class_folders(tmp_path / "data", ("cats", "dogs"), per_class=4)
    pool = tmp_path / "pool"
    for i, colour in enumerate([(230, 50, 50), (50, 210, 70), (240, 60, 40)]):
        make_image(pool / "batch" / f"p{i}.png", colour)
    return data, pool


def test_adds_round_trip_keyed_by_pool_and_path(data_and_pool, tmp_path):
    data, pool = data_and_pool
    other = tmp_path / "other"
    curation = new_curation(data)
    curation.set("cats/img_0.png", "exclude")
    curation.set("./batch\\p0.png", "add", "cats", pool=pool)
    curation.set("batch/p0.png", "add", "dogs", pool=other)  # the same name in another pool: another decision
    curation.set("cats/img_0.png", "add", "dogs", pool=pool)  # a data file's name in a pool: not its exclude
    curation.set("batch/p1.png", "add", "cats", pool=pool)
    curation.set("batch/p1.png", "add", "dogs", pool=pool, note="changed my mind")  # replaces the earlier
    curation.set("batch/p2.png", "exclude", pool=pool, note="none of these")
    path = save_curation(curation, tmp_path / "runs" / "curation.json")

    loaded = load_curation(path)
    assert loaded.decisions == curation.decisions and len(loaded.decisions) == 6
    assert loaded.by_path() == {"cats/img_0.png": Decision("cats/img_0.png", "exclude")}
    resolved = str(pool.resolve())
    assert [(d.path, d.label, d.pool) for d in loaded.adds()] == [
        ("batch/p0.png", "cats", resolved),
        ("batch/p0.png", "dogs", str(other.resolve())),
        ("cats/img_0.png", "dogs", resolved),
        ("batch/p1.png", "dogs", resolved),
    ]
    assert set(loaded.of_pool(pool)) == {"batch/p0.png", "cats/img_0.png", "batch/p1.png", "batch/p2.png"}
    raw = json.loads(path.read_text())
    assert {"path": "batch/p0.png", "action": "add", "label": "cats", "pool": resolved} in raw["decisions"]
    assert loaded.remove("batch/p0.png", pool) and not loaded.remove("batch/p0.png", pool)
    assert len(loaded.adds()) == 3


@pytest.mark.parametrize(
    ("decision", "message"),
    [
        ({"path": "a.png", "action": "add", "pool": "/p"}, "needs its class in 'label'"),
        ({"path": "a.png", "action": "add", "label": "cats"}, "needs the pool folder"),
        ({"path": "a.png", "action": "add", "label": "cats", "pool": "relative/pool"}, "absolute path"),
        ({"path": "a.png", "action": "relabel", "label": "cats", "pool": "/p"}, "must be add or exclude"),
        ({"path": "../a.png", "action": "add", "label": "cats", "pool": "/p"}, "no '..'"),
        ({"path": "/etc/a.png", "action": "add", "label": "cats", "pool": "/p"}, "no '..'"),
    ],
)
def test_malformed_adds_are_one_line_errors(tmp_path, decision, message):
    path = tmp_path / "curation.json"
    path.write_text(json.dumps({"format": "finetune-curation/1", "data": str(tmp_path), "decisions": [decision]}))
    with pytest.raises(FinetuneError, match=message) as error:
        load_curation(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_the_curation_file_is_never_written_into_a_pool(data_and_pool):
    data, pool = data_and_pool
    curation = new_curation(data)
    curation.set("batch/p0.png", "add", "cats", pool=pool)
    with pytest.raises(FinetuneError, match="inside the pool"):
        save_curation(curation, pool / "curation.json")


def hostile_pool(data: Path, pool: Path) -> dict[str, str]:
    """Next to the fixture's three good images: {pool path: what the curation report says of it}."""
    (pool / "batch" / "sub").mkdir(parents=True)
    shutil.move(pool / "batch" / "p2.png", pool / "batch" / "sub" / "p2.png")
    shutil.copy(data / "cats" / "img_0.png", pool / "copy_of_data.png")
    (pool / "link_to_p0.png").symlink_to(pool / "batch" / "p0.png")  # inside the pool, but p0's bytes
    make_image(data.parent / "private" / "secret.png", (1, 2, 3))
    (pool / "escape.png").symlink_to(data.parent / "private" / "secret.png")
    (pool / "out").symlink_to(data.parent / "private", target_is_directory=True)
    os.mkfifo(pool / "fifo.png")
    (pool / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (pool / "notes.txt").write_text("hello")
    return {
        "copy_of_data.png": "already in the data (the same image as cats/img_0.png)",
        "link_to_p0.png": "added already",
        "escape.png": "a link that leads out of the pool",
        "out/secret.png": "a link that leads out of the pool",
        "fifo.png": "not a file",
        "broken.png": "",
        "notes.txt": "not an image file",
        "missing.png": "not found",
    }


ADDS = {"batch/p0.png": "cats", "batch/p1.png": "dogs", "batch/sub/p2.png": "cats"}


@pytest.fixture
def curated(data_and_pool, tmp_path) -> tuple[Path, Path, Path, dict[str, str]]:
    """The data, a pool with good and hostile files, and a curation file adding all of them."""
    data, pool = data_and_pool
    refused = hostile_pool(data, pool)
    curation = new_curation(data)
    for rel, label in ADDS.items():
        curation.set(rel, "add", label, pool=pool)
    for rel in refused:
        curation.set(rel, "add", "dogs", pool=pool)
    return data, pool, save_curation(curation, tmp_path / "runs" / "curation.json"), refused


def test_apply_adds_the_pool_images_and_names_those_it_may_not_read(curated):
    data, pool, path, refused = curated
    before = tree_digest(pool)
    scan = scan_dataset(data)
    curated_scan = apply_curation(scan, load_curation(path))
    resolved = pool.resolve()
    index = {name: i for i, name in enumerate(scan.classes)}
    added = {added_item(str(resolved), rel): index[label] for rel, label in ADDS.items()}
    assert curated_scan.train == scan.train + list(added.items()) and curated_scan.val == scan.val
    assert all((Path(scan.root) / item).is_file() for item in added)  # what every reader of the split does
    record = curated_scan.curation
    assert record["added"] == [{"path": r, "pool": str(resolved), "class": c} for r, c in ADDS.items()]
    reasons = {entry["path"]: entry["reason"] for entry in record["not_added"]}
    assert set(reasons) == set(refused)
    assert all(want in reasons[rel] for rel, want in refused.items()), reasons
    report = curated_scan.report()
    assert "3 added from a pool" in report and "not added" in report and "fifo.png: not a file" in report
    assert any("8 of the curation's 11 added pool image(s) were not added" in w for w in curated_scan.warnings)
    assert tree_digest(pool) == before and (pool / "fifo.png").exists()
    # under torchrun every rank checks that it reads the pools too
    assert unreadable_data(curated_scan) is None
    gone = str(pool.parent / "gone-pool" / "x.png")
    assert unreadable_data(dataclasses.replace(curated_scan, train=[*curated_scan.train, (gone, 0)])) == gone


def test_an_add_to_a_class_the_data_does_not_have_is_one_line(data_and_pool):
    data, pool = data_and_pool
    curation = new_curation(data)
    curation.set("batch/p0.png", "add", "zebras", pool=pool)
    with pytest.raises(FinetuneError, match=r"add of 'batch/p0.png' \(pool .+\) to 'zebras': not a class") as error:
        apply_curation(scan_dataset(data), curation)
    assert "\n" not in str(error.value) and "cats, dogs" in str(error.value)


def test_adds_cannot_climb_out_of_the_pool(data_and_pool):
    data, pool = data_and_pool
    curation = new_curation(data)
    for path in ("../data/cats/img_0.png", "batch/../../data/cats/img_0.png", str(data / "cats" / "img_0.png")):
        with pytest.raises(FinetuneError, match="no '..', not absolute"):
            curation.set(path, "add", "cats", pool=pool)
    assert curation.decisions == []


def test_split_json_takes_absolute_paths_only_as_recorded_adds(curated):
    data, pool, path, _ = curated
    saved = json.loads(json.dumps(apply_curation(scan_dataset(data), load_curation(path)).to_dict()))
    loaded = CuratedScan.from_dict(saved)
    assert loaded.train == [tuple(item) for item in saved["train"]]
    sneaked = {**saved, "train": [*saved["train"], [str(data.parent / "private" / "secret.png"), 0]]}
    with pytest.raises(ValueError, match="'train' is not a list"):
        CuratedScan.from_dict(sneaked)
    forged = {**saved, "curation": {**saved["curation"], "added": [{"pool": str(pool), "path": "../private/x.png"}]}}
    with pytest.raises(ValueError, match="no '..'"):
        CuratedScan.from_dict(forged)


@pytest.mark.slow
def test_a_run_trains_on_the_adds_and_suggest_does_not_ask_for_them_again(curated, tmp_path):
    data, pool, path, _ = curated
    rng = np.random.default_rng(0)
    for k in range(3):  # distinct pictures (plain colours would be near-copies of each other to suggest)
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(pool / f"fresh_{k}.png")
    before = tree_digest(pool)
    cfg = TrainConfig(
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        curation=str(path),
        weights="none",
        strategy="last",
        epochs=1,
        batch_size=4,
        image_size=32,
        workers=0,
        device="cpu",
        seed=0,
    )
    run = Path(train(cfg))
    resolved = str(pool.resolve())
    split = json.loads((run / "split.json").read_text())
    added = {added_item(resolved, rel) for rel in ADDS}
    assert added <= {rel for rel, _ in split["train"]} and not added & {rel for rel, _ in split["val"]}
    plain = scan_dataset(data, cfg.val_fraction, cfg.seed).counts()["train"]  # the data's own split, unchanged
    assert split["counts"]["train"] == {"cats": plain["cats"] + 2, "dogs": plain["dogs"] + 1}
    assert [a["path"] for a in split["curation"]["added"]] == list(ADDS)
    info = json.loads((run / "run.json").read_text())
    assert info["curation"]["added"] == [{"path": r, "pool": resolved, "class": c} for r, c in ADDS.items()]
    assert info["curation"]["not_added"] == 8
    assert "3 unlabelled image(s) labelled and added to train" in curation_line(info["curation"])
    assert len(RunDir(run).read_split().train) == len(split["train"])  # as --resume reads it back
    assert in_training_split(RunDir(run), pool, ["batch/p0.png", "fresh_0.png"]) == {"batch/p0.png"}
    assert tree_digest(pool) == before

    suggestions, skipped = suggest(run, pool, n=20, device="cpu")
    suggested = {s.path for s in suggestions}
    assert suggested == {"fresh_0.png", "fresh_1.png", "fresh_2.png"}  # not the added ones, nor their copies
    assert any(path.endswith("escape.png") and "leads out of the pool" in why for path, why in skipped)
    curation = load_curation(path)
    curation.set("fresh_0.png", "exclude", pool=pool, note="none of these")
    again = {s.path for s in suggest(run, pool, n=20, device="cpu", curation=curation)[0]}
    assert again == {"fresh_1.png", "fresh_2.png"}  # decided since the run: not asked again
    assert tree_digest(pool) == before

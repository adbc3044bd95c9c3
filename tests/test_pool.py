"""`add` decisions: images of an unlabelled pool labelled in the Review tab's Label mode, trained on
where they lie (the pool is only read)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_class_folders, make_image

from finetune.config import FinetuneError
from finetune.curation import Decision, load_curation, new_curation, save_curation


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

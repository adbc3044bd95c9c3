"""`finetune suggest RUN POOL`: the images most worth labelling next: uncertain, distinct, new."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from conftest import make_image, tree_digest
from PIL import Image

from finetune.cli import main
from finetune.suggest import pick_diverse, suggest, uncertainty


def pool_of(tmp_path, tiny_run):
    """Twelve distinct pictures, five near-copies of one (re-encoded, resized by a pixel), a byte copy of
    a training image, and a file named like a spreadsheet formula."""
    pool = tmp_path / "pool"
    rng = np.random.default_rng(0)
    for k in range(12):
        pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(pool / f"distinct_{k}.png" if pool.exists() else _mk(pool) / f"distinct_{k}.png")
    twin = Image.fromarray(np.full((32, 40, 3), (150, 120, 90), dtype=np.uint8))
    for k in range(5):
        twin.resize((40 + k % 2, 32)).save(pool / f"copy_{k}.jpg", quality=80 + k)
    split = json.loads((tiny_run / "split.json").read_text())
    trained = split["train"][0][0]
    shutil.copy(f"{split['root']}/{trained}", pool / "already_trained.png")
    make_image(pool / "=HYPERLINK(1).png", (10, 200, 10))
    return pool


def _mk(path):
    path.mkdir(parents=True)
    return path


def test_suggestions_are_new_distinct_ranked_and_leave_the_pool_as_it_was(tmp_path, tiny_run):
    pool = pool_of(tmp_path, tiny_run)
    before = tree_digest(pool)
    suggestions, skipped = suggest(tiny_run, pool, n=30, device="cpu")
    paths = [s.path for s in suggestions]
    assert len(paths) == len(set(paths)) and not skipped
    assert "already_trained.png" not in paths  # the same bytes as a training image
    assert sum(path.startswith("copy_") for path in paths) <= 1  # five near-copies: one suggestion at most
    scores = [s.uncertainty for s in suggestions]
    assert scores == sorted(scores, reverse=True) and all(0 <= u <= 1 for u in scores)
    assert all(len(s.top) == 2 and abs(sum(p for _, p in s.top) - 1) < 1e-4 for s in suggestions)  # 2 classes
    assert tree_digest(pool) == before


def test_the_command_writes_json_and_a_csv_a_spreadsheet_cannot_run(tmp_path, tiny_run, capsys):
    pool = pool_of(tmp_path, tiny_run)
    out_json, out_csv = tmp_path / "s.json", tmp_path / "s.csv"
    args = ["suggest", str(tiny_run), str(pool), "--n", "5", "--device", "cpu", "--json", str(out_json)]
    assert main([*args, "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("rank  uncertainty") and f"wrote {out_csv}" in printed
    assert len(json.loads(out_json.read_text())["suggestions"]) == 5
    rows = list(csv.reader(out_csv.open()))
    assert rows[0] == ["rank", "path", "uncertainty", "best_guess", "probability"] and len(rows) == 6
    assert all(not row[1].startswith("=") for row in rows[1:])
    # --curation: a pool image decided since the run (here: none of the classes) is not asked again
    from finetune.curation import new_curation, save_curation

    decided = rows[1][1]
    curation = new_curation(tmp_path / "data")
    curation.set(decided, "exclude", pool=str(pool.resolve()))
    save_curation(curation, tmp_path / "curation.json")
    out_json.unlink()
    assert main([*args, "--curation", str(tmp_path / "curation.json"), "--quiet"]) == 0
    again = [s["path"] for s in json.loads(out_json.read_text())["suggestions"]]
    assert len(again) == 5 and decided not in again


def test_uncertainty_and_the_diverse_pick():
    probabilities = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4]])
    assert uncertainty(probabilities).tolist() == [1.0, pytest_approx(0.2), pytest_approx(0.8)]
    assert uncertainty(torch.tensor([[0.5, 0.5]]), "entropy").item() == 1.0
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [1.0, 0.001], [0, 1.0], [0.7, 0.7]]), dim=1)
    scores = torch.tensor([0.9, 0.95, 0.5, 0.1])
    picked = pick_diverse(scores, features, 3, [0, 1, 2, 3])
    assert picked == [1, 2, 3]  # 1 first (the most uncertain), then the farthest from it: 2, then 3 (not 0)
    assert pick_diverse(scores, features, 4, [0, 0, 2, 3]) == [1, 2, 3]  # 0 and 1: one group


def pytest_approx(value):
    import pytest

    return pytest.approx(value, abs=1e-6)


def test_the_runs_test_images_are_known_too(tmp_path):
    """A pool copy of a test image is not suggested: training would refuse its add (already in the data)."""
    from finetune.data_doctor.duplicates import file_sha256
    from finetune.suggest import known_images

    data, run = tmp_path / "data", tmp_path / "run"
    for split, colour in (("train", (1, 2, 3)), ("val", (50, 60, 70)), ("test", (200, 10, 10))):
        make_image(data / split / "a" / "x.png", colour)
    run.mkdir()
    items = {split: [[f"{split}/a/x.png", 0]] for split in ("train", "val", "test")}
    (run / "split.json").write_text(json.dumps({"root": str(data), "classes": ["a"], "layout": "splits", **items}))
    assert known_images(run) == {file_sha256(data / split / "a" / "x.png") for split in items}


def test_files_it_cannot_read_are_counted_as_skipped_not_as_in_the_data(tmp_path, tiny_run):
    """A FIFO and a link out of the pool are skipped and said so; they are not 'already in the data'."""
    import os

    pool = _mk(tmp_path / "pool")
    os.mkfifo(pool / "fifo.png")
    os.symlink(make_image(tmp_path / "outside.png", (1, 2, 3)), pool / "link.png")
    said = []
    suggestions, skipped = suggest(tiny_run, pool, n=5, device="cpu", log=said.append)
    reasons = {Path(name).name: why for name, why in skipped}
    assert suggestions == [] and reasons == {"fifo.png": "not a file", "link.png": "a link that leads out of the pool"}
    assert "0 already in the run's data" in said[0] and "2 skipped" in said[0] and "scoring 0" in said[0]
    from finetune.suggest import table

    assert "already in the run's data" not in table(suggestions)

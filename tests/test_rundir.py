"""finetune.rundir: the run folder's files, naming, info, and finding runs."""

from __future__ import annotations

import json

import pytest

from finetune.config import FinetuneError
from finetune.rundir import RunDir, list_runs, read_metrics, resolve_run, run_choices, run_name


def make_run(runs_dir, name, created, status="completed", model=True, accuracy=0.5):
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"created": created, "status": status,
                                              "summary": {"accuracy": accuracy}}))
    if model:
        (run / "model.pth").write_bytes(b"x")
    return run


def test_runs_listed_newest_first_and_usable_only(tmp_path):
    old = make_run(tmp_path, "b-old", "2025-01-01T10:00:00")
    new = make_run(tmp_path, "a-new", "2025-02-01T10:00:00", status="stopped")
    make_run(tmp_path, "c-failed", "2025-03-01T10:00:00", status="failed", model=False)
    (tmp_path / "not-a-run").mkdir()
    assert [p.name for p in list_runs(tmp_path)] == ["c-failed", "a-new", "b-old"]
    choices = run_choices(tmp_path, usable_only=True)
    assert [path for _, path in choices] == [str(new), str(old)]
    assert choices[0][0] == "a-new · stopped · val acc 0.500"
    assert list_runs(tmp_path / "missing") == []


def test_resolve_run_stays_inside_the_runs_folder(tmp_path):
    run = make_run(tmp_path / "runs", "r1", "2025-01-01T10:00:00")
    assert resolve_run(str(run), tmp_path / "runs") == run.resolve()
    assert resolve_run("r1", tmp_path / "runs") == run.resolve()
    with pytest.raises(FinetuneError, match="not a run in"):
        resolve_run(str(tmp_path), tmp_path / "runs")
    with pytest.raises(FinetuneError, match="not a run in"):
        resolve_run("../r1", tmp_path / "runs")
    with pytest.raises(FinetuneError, match="no run chosen"):
        resolve_run("", tmp_path / "runs")
    with pytest.raises(FinetuneError, match="no evaluation yet"):
        read_metrics(run)


def test_run_names_are_unique_and_create_never_reuses_a_folder(tmp_path):
    first = RunDir.create(tmp_path, "resnet34", "last", name="fixed")
    second = RunDir.create(tmp_path, "resnet34", "last", name="fixed")
    assert (first.name, second.name) == ("fixed", "fixed-2")
    assert run_name("resnet50", "head", tmp_path).endswith("-resnet50-head")
    assert not any(second.path.iterdir())


def test_info_updates_keep_what_was_there(tmp_path):
    run = RunDir.create(tmp_path, "resnet34", "last")
    assert run.info() == {} and not run.is_run()
    run.write_info({"status": "running", "classes": ["a", "b"]})
    run.update_info(status="completed")
    assert run.info() == {"format": "finetune-run/1", "status": "completed", "classes": ["a", "b"]}
    assert [p.name for p in run.path.iterdir()] == ["run.json"], "no temporary file left behind"
    run.write_class_indices(["daisy", "roses"])
    assert run.class_indices.read_text() == '{\n    "0": "daisy",\n    "1": "roses"\n}'



def test_require_trained_names_what_is_missing(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    with pytest.raises(FinetuneError, match="not a run folder"):
        run.require_trained()
    run.write_info({"status": "running"})
    with pytest.raises(FinetuneError, match="has no arch and classes"):
        run.require_trained()
    run.update_info(arch="resnet34", classes=["a", "b"])
    with pytest.raises(FinetuneError, match="has no model.pth yet"):
        run.require_trained()
    run.model.write_bytes(b"")
    assert run.require_trained()["classes"] == ["a", "b"]

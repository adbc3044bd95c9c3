"""The studio's handlers, state and workspace on a temporary runs folder: no server, no browser.

Runs here are fake run folders (run.json, metrics.json, a few PNGs); predictors are fake where only
the cache is tested. The same handlers run behind the app's API (tests/test_app.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import every_option_config, make_class_folders, make_image, sleeper, tree_digest

gr = pytest.importorskip("gradio")

from finetune import jobs  # noqa: E402
from finetune.config import FinetuneError, TrainConfig  # noqa: E402
from finetune.names import printable  # noqa: E402
from finetune.predict import Prediction  # noqa: E402
from finetune.studio import app as studio_app  # noqa: E402
from finetune.studio import (  # noqa: E402
    common,
    data_tab,
    evaluate_tab,
    export_tab,
    label_mode,
    predict_tab,
    review_tab,
    train_tab,
    views,
)
from finetune.studio.state import PredictorCache, Studio  # noqa: E402
from finetune.studio.workspace import UNUSED_SECONDS, Workspace  # noqa: E402

CLASSES = ["circle", "square", "triangle"]
HEAD = dict(
    arch="resnet34",
    strategy="head",
    weights="none",
    weights_file=None,
    epochs=1,
    batch_size=16,
    lr=0.01,
    image_size=64,
    seed=0,
)  # Train tab settings of a short training (handlers take them by keyword)


def last(generator):
    """The final output of a generator handler (what the API returns)."""
    result = None
    for output in generator:
        result = output
    return result


def fake_run(
    runs_dir: Path,
    name: str,
    data: Path | None = None,
    model: bool = True,
    created: str = "2025-01-01T10:00:00",
    status: str = "completed",
    **info,
) -> Path:
    run = runs_dir / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps(
            {
                "format": "finetune-run/1",
                "status": status,
                "arch": "resnet34",
                "strategy": "head",
                "classes": CLASSES,
                "created": created,
                "summary": {"accuracy": 0.9},
                **info,
            }
        )
    )
    (run / "class_indices.json").write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=4))
    if model:
        (run / "model.pth").write_bytes(b"weights")
    if data is not None:
        (run / "split.json").write_text(json.dumps({"root": str(data)}))
        wrong = [{"path": "circle/circle_00.jpg", "true": "circle", "predicted": "square", "confidence": 0.8}]
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "num_images": 15,
                    "accuracy": 0.9333,
                    "balanced_accuracy": 0.93,
                    "macro_f1": 0.931,
                    "top_k_accuracy": {"1": 0.9333, "2": 1.0},
                    "per_class": {c: {"precision": 0.9, "recall": 0.95, "f1": 0.92, "support": 5} for c in CLASSES},
                    "misclassified": wrong,
                }
            )
        )
        make_image(run / "confusion_matrix.png", size=(20, 20))
        make_image(run / "training_curves.png", size=(20, 10))
    return run


@pytest.fixture
def studio(tmp_path, sample_data):
    (tmp_path / "cwd").mkdir()
    return Studio(tmp_path / "runs", tmp_path / "ws", sample_data, browse_root=tmp_path, base_dir=tmp_path / "cwd")


# ---------------------------------------------------------------------------------------------
# Data


def test_scan_resolves_a_relative_folder_against_the_apps_working_directory(studio, tmp_path):
    make_class_folders(tmp_path / "cwd" / "photos", classes=("cats", "dogs"), per_class=4)
    out = last(data_tab.scan(studio, "photos"))
    folder = str(tmp_path / "cwd" / "photos")
    assert f"`{folder}`" in out["summary"] and folder in out["ready"] and "2 classes" in out["summary"]
    assert data_tab.absolute_path(studio, " photos ") == folder  # what the path box then shows
    assert list(out["counts"]["class"]) == ["cats", "dogs", "total"]


def test_scan_of_too_many_files_is_refused_early(studio, tmp_path):
    make_class_folders(tmp_path / "cwd" / "many", classes=("a", "b"), per_class=6)
    studio.max_scan_files = 5
    with pytest.raises(gr.Error, match="holds more than 5 files: choose a smaller folder"):
        last(data_tab.scan(studio, "many"))


def test_cancelled_scan_stops_its_work(studio, monkeypatch):
    """Closing the event's generator (what gradio does on Cancel) ends the engine's scan at its next
    progress report, instead of leaving it to decode a whole tree in the background."""
    import finetune.data

    ended, reports = threading.Event(), []

    def endless_scan(root, max_files=None, on_progress=None, **_):
        try:
            while True:
                reports.append(1)
                on_progress("check", len(reports), 10**6)
                time.sleep(0.01)
        finally:
            ended.set()

    monkeypatch.setattr(finetune.data, "scan_dataset", endless_scan)
    scanning = data_tab.scan(studio, str(studio.default_data))
    assert next(scanning) == gr.skip()  # a cancellation point while the scan runs
    scanning.close()
    assert ended.wait(5) and reports


def test_zip_with_html_and_svg_riders_extracts_only_images(studio, sample_data, tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.rglob("*.jpg"))[::4]:
            z.write(path, "shapes/" + path.relative_to(sample_data).as_posix())
        z.writestr("shapes/index.html", "<script>alert(document.cookie)</script>")
        z.writestr("shapes/circle/logo.svg", "<svg onload='alert(1)'/>")
        z.writestr("shapes/square/run.js", "alert(1)")
    out = last(data_tab.upload_zip(studio, str(archive)))
    root = Path(out["path"])
    assert root.is_relative_to(studio.workspace.uploads) and root.name == "shapes"
    files = {p.suffix for p in root.parent.rglob("*") if p.is_file() and p.name != ".complete"}
    assert files == {".jpg"}
    skipped = out["skipped"]
    rows = skipped.value["data"] if isinstance(skipped.value, dict) else skipped.value.values.tolist()
    named = {row[0]: row[1] for row in rows}
    assert {"shapes/index.html", "shapes/circle/logo.svg", "shapes/square/run.js"} <= set(named)
    assert all("not extracted" in why for name, why in named.items() if not name.endswith(".jpg"))
    assert "3 file(s) skipped" in out["summary"] and skipped.visible is True


def test_full_workspace_refuses_an_upload_with_a_clear_message(tmp_path, sample_data):
    studio = Studio(tmp_path / "runs", tmp_path / "ws", sample_data, base_dir=tmp_path, quota_bytes=20_000)
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.rglob("*.jpg")):
            z.write(path, path.relative_to(sample_data).as_posix())
    with pytest.raises(gr.Error, match="The workspace is full: big.zip needs .* --workspace-quota-gb"):
        last(data_tab.upload_zip(studio, str(archive)))
    assert not any(studio.workspace.uploads.iterdir())


def test_cleanup_removes_unused_uploads_leftovers_and_old_downloads(tmp_path):
    space = Workspace(tmp_path / "ws")
    old = time.time() - UNUSED_SECONDS - 60
    stale, fresh, training = (space.uploads / n for n in ("stale-1", "fresh-2", "training-3"))
    for folder in (stale, fresh, training):
        make_image(folder / "cats" / "a.png")
    leftover = space.inputs / "batch-x"
    leftover.mkdir()
    served_old = space.output("predictions", "old.csv")
    served_old.write_text("x")
    for path in (stale, training, leftover, served_old):
        os.utime(path, (old, old))
    removed = space.cleanup(keep=(training / "cats",))
    assert set(removed) == {stale, leftover, served_old}
    assert fresh.is_dir() and training.is_dir()
    space.touch(fresh / "cats" / "a.png")
    assert time.time() - fresh.stat().st_mtime < 60


def test_gradio_cache_is_private_counted_and_cleaned_up(tmp_path):
    """gradio's cache (GRADIO_TEMP_DIR, set by the app) lies in the workspace: 0700, in the quota,
    and its files are removed a day after gradio last wrote or handed them out (their change time:
    a copy keeps its source's old modification time)."""
    import stat

    space = Workspace(tmp_path / "ws", quota_bytes=10_000_000)
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(space.root) == 0o700 and mode(space.gradio_cache) == 0o700
    assert space.gradio_cache.parent == space.root and not space.gradio_cache.is_relative_to(space.served)
    copy = space.gradio_cache / "0123abcd" / "model.pth"
    copy.parent.mkdir()
    copy.write_bytes(bytes(2_000_000))
    old = time.time() - 30 * 24 * 3600
    os.utime(copy, (old, old))  # what shutil.copy2 does to a copy of an old run file
    assert space.usage() >= 2_000_000
    with pytest.raises(FinetuneError, match="The workspace is full"):
        space.check_room(9_000_000, "big.zip")
    assert space.cleanup() == [] and copy.is_file()  # handed out just now: kept
    removed = space.cleanup(now=time.time() + UNUSED_SECONDS + 60)
    assert copy in removed and not copy.exists()
    # a workspace the user made keeps its mode; the cache is made private whatever it was
    mine = tmp_path / "mine"
    (mine / "gradio-cache").mkdir(parents=True)
    os.chmod(mine, 0o750)
    os.chmod(mine / "gradio-cache", 0o755)
    again = Workspace(mine)
    assert mode(again.root) == 0o750 and mode(again.gradio_cache) == 0o700


def test_only_safe_files_are_served_and_a_changed_run_file_is_served_anew(tmp_path):
    space = Workspace(tmp_path / "ws")
    evil = tmp_path / "page.html"
    evil.write_text("<script>alert(1)</script>")
    with pytest.raises(FinetuneError, match="refusing to serve page.html"):
        space.publish(evil, "runs/x")
    with pytest.raises(FinetuneError, match="refusing to serve"):
        space.output("../../elsewhere", "a.csv")
    source = tmp_path / "model.pth"
    source.write_bytes(b"one")
    served = space.publish(source, "runs/r1")
    assert served.read_bytes() == b"one" and served.is_relative_to(space.served)
    replacement = tmp_path / "new.pth"
    replacement.write_bytes(b"two")
    os.replace(replacement, source)  # how the training writes a better model.pth
    assert space.publish(source, "runs/r1").read_bytes() == b"two"


# ---------------------------------------------------------------------------------------------
# Train


class FakeJob:
    def __init__(self, cfg, cwd=None, env=None, processes=1):
        self.cfg, self.processes = cfg, processes
        self.run_dir = Path(cfg.runs_dir) / "fake-run"
        self.view = jobs.TrainingView(run_dir=str(self.run_dir))
        self.alive = True

    def running(self):
        return self.alive

    def update(self):
        return self.view


def test_start_passes_every_setting_and_releases_the_gpu(studio, tmp_path, monkeypatch):
    import finetune.device

    make_class_folders(tmp_path / "cwd" / "photos", classes=("cats", "dogs"), per_class=3)
    monkeypatch.setattr(jobs, "TrainingJob", FakeJob)
    released = []
    monkeypatch.setattr(finetune.device, "release_gpu_memory", lambda: released.append(True))
    studio.predictors = PredictorCache(3, loader=lambda run, device: object())
    run = fake_run(studio.runs_dir, "r1")
    studio.predictors.get(run, "cuda:0")
    studio.predictors.get(run, "cpu")
    out = train_tab.start_training(
        studio,
        data="photos",
        arch="resnet50",
        strategy="all",
        weights="none",
        weights_file=None,
        epochs=7,
        batch_size=16,
        lr=0.02,
        image_size=96,
        seed=3,
        gpus=1,
    )
    assert out["message"] == "Started fake-run" and "train_status_text" in out["progress"]
    expected = TrainConfig(
        data=str(tmp_path / "cwd" / "photos"),
        arch="resnet50",
        strategy="all",
        weights="none",
        epochs=7,
        batch_size=16,
        lr=0.02,
        image_size=96,
        seed=3,
        runs_dir=str(studio.runs_dir),
    )
    assert studio.job.cfg.to_dict() == expected.to_dict()  # every field, the rest at their defaults
    assert [k[2] for k in studio.predictors.keys()] == ["cpu"] and released == [True]  # noqa: SIM118 - not a dict
    with pytest.raises(gr.Error, match="already running \\(fake-run"):
        train_tab.start_training(studio, data="photos", **HEAD)


def test_without_imagenet_weights_the_train_tab_opens_on_strategy_all_and_says_why(studio, monkeypatch):
    """Offline the page preselects "None: train from scratch"; with strategy last it ended at chance on
    the sample data. It preselects all (the engine's default without pretrained weights), and so does
    choosing None later; other weights leave the strategy as it is."""
    import finetune.model
    from finetune.config import DEFAULT_LR

    monkeypatch.setattr(finetune.model, "weights_available", lambda arch, weights: (weights != "imagenet", "x"))
    demo = studio_app.build_app(studio)
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert (by_id["weights"].value, by_id["strategy"].value, by_id["lr"].value) == ("none", "all", DEFAULT_LR["all"])
    note = train_tab.check_weights(studio, "resnet34", "none", None, "all")
    assert "Strategy *all*, the default without pretrained weights: every layer trains" in note and "Tip" not in note
    assert "choose strategy *all*" in train_tab.check_weights(studio, "resnet34", "none", None, "last")
    assert train_tab.strategy_for_weights(studio, "none", "last") == "all"
    assert train_tab.strategy_for_weights(studio, "none", "all") == gr.skip()
    assert train_tab.strategy_for_weights(studio, "file", "head") == gr.skip()
    assert "strategy_for_weights" in {fn.api_name for fn in demo.fns.values()}

    monkeypatch.setattr(finetune.model, "weights_available", lambda arch, weights: (True, "x"))
    by_id = {
        block.elem_id: block
        for block in studio_app.build_app(studio).blocks.values()
        if getattr(block, "elem_id", None)
    }
    assert (by_id["weights"].value, by_id["strategy"].value) == ("imagenet", "last")


# TrainConfig fields the Train tab does not offer: data (chosen on the Data tab), runs_dir (the studio's own
# runs folder) and extra (free-form notes of the Python API, not an option). See train_tab's docstring.
NOT_ON_THE_TRAIN_TAB = {"data", "runs_dir", "extra"}
OLD_START_PARAMETERS = [
    "data",
    "arch",
    "strategy",
    "weights",
    "weights_file",
    "epochs",
    "batch_size",
    "lr",
    "image_size",
    "seed",
    "gpus",
    "curation",
]  # API clients may pass these by position


def built_train_tab(studio) -> train_tab.TrainTab:
    with gr.Blocks():
        return train_tab.build(studio)


def start_parameters(demo) -> list[str]:
    return [p["parameter_name"] for p in demo.get_api_info()["named_endpoints"]["/start_training"]["parameters"]]


def in_advanced(component) -> bool:
    while component is not None and not isinstance(component, gr.Accordion):
        component = component.parent
    return component is not None


def test_the_train_tab_offers_every_option_and_passes_each_on(studio, tmp_path, monkeypatch):
    import finetune.curation
    import finetune.model

    demo = studio_app.build_app(studio)
    offered = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_ON_THE_TRAIN_TAB
    params = start_parameters(demo)
    assert params[: len(OLD_START_PARAMETERS)] == OLD_START_PARAMETERS
    assert set(params) == offered | {"data", "weights_file", "gpus"} and len(params) == len(set(params))
    tab = built_train_tab(studio)
    assert set(tab.settings) == offered
    advanced = {name for name, component in tab.settings.items() if in_advanced(component)}
    assert "class_weighted_loss" in advanced and not advanced & set(OLD_START_PARAMETERS)
    monkeypatch.setattr(jobs, "TrainingJob", FakeJob)
    monkeypatch.setattr(finetune.model, "weights_available", lambda arch, weights: (True, ""))
    monkeypatch.setattr(finetune.curation, "load_curation", lambda path: None)
    make_class_folders(tmp_path / "cwd" / "photos", per_class=2)
    wanted = {name: getattr(every_option_config(), name) for name in offered}
    train_tab.start_training(studio, data="photos", **wanted)
    got = studio.job.cfg
    assert {name: getattr(got, name) for name in offered - {"weights", "curation", "labels"}} == {
        name: value for name, value in wanted.items() if name not in ("weights", "curation", "labels")
    }
    assert got.weights.endswith("w.pth") and got.curation == str(tmp_path / "cwd" / "review" / "curation.json")
    assert got.labels == str(tmp_path / "cwd" / "labels.csv")  # resolved as the data folder is


def test_settings_from_the_page_are_checked_and_empty_boxes_are_defaults(studio):
    cfg = train_tab.training_config(
        studio,
        data=str(studio.default_data),
        **{**HEAD, "epochs": 2.0},
        workers=None,
        run_name="  ",
        memory_budget_gb=None,
        curation="",
    )
    assert cfg.epochs == 2 and type(cfg.epochs) is int and cfg.workers is None and cfg.run_name is None
    assert cfg.curation is None
    with pytest.raises(FinetuneError, match="option cache_views must be a number"):
        train_tab.training_config(studio, data=str(studio.default_data), **HEAD, cache_views="3")
    with pytest.raises(FinetuneError, match="unknown training setting 'runs_dir'"):
        train_tab.training_config(studio, data=str(studio.default_data), **HEAD, runs_dir="/elsewhere")


def test_a_field_added_to_trainconfig_appears_on_the_train_tab(studio, monkeypatch):
    """The tab really is generated: a new option(...) field is a setting under Advanced, an endpoint
    parameter, and reaches the config, with nothing else edited."""
    from finetune import config

    extended = dataclasses.make_dataclass(
        "TrainConfig",
        [("dropout", "float", config.option(0.0, "dropout before the new head", "optim"))],
        bases=(TrainConfig,),
    )
    monkeypatch.setattr(config, "TrainConfig", extended)
    monkeypatch.setattr(train_tab, "TrainConfig", extended)
    box = built_train_tab(studio).settings["dropout"]
    assert isinstance(box, gr.Number) and box.value == 0.0 and box.label == "Dropout" and in_advanced(box)
    assert box.info == "dropout before the new head"
    assert "dropout" in start_parameters(studio_app.build_app(studio))
    cfg = train_tab.training_config(studio, data=str(studio.default_data), **HEAD, dropout=0.25)
    assert isinstance(cfg, extended) and cfg.dropout == 0.25


def test_the_data_tabs_imbalance_hint_names_the_train_tabs_setting(studio, tmp_path):
    from finetune.data import scan_dataset

    root = make_class_folders(tmp_path / "d", classes=("many",), per_class=9)
    make_class_folders(root, classes=("few",), per_class=2)
    text = views.data_warnings(scan_dataset(root))
    box = built_train_tab(studio).settings["class_weighted_loss"]
    assert f'consider "{box.label}" (Train tab, Advanced)' in text and "--" not in text
    assert isinstance(box, gr.Checkbox) and box.value is False


@pytest.mark.parametrize(
    "data, message", [("", "Choose the training data first"), ("missing", "data folder not found: .*cwd/missing")]
)
def test_start_refuses_missing_data(studio, data, message):
    with pytest.raises(gr.Error, match=message):
        train_tab.start_training(studio, data=data, **HEAD)


def test_render_of_a_finished_training_serves_its_matrix(studio, sample_data):
    run = fake_run(studio.runs_dir, "r1", data=sample_data)
    view = jobs.TrainingView(
        run_dir=str(run), epochs=1, epoch=1, batch=4, batches=4, status="completed", summary="15 images: accuracy 0.93"
    )
    view.curves = [{"epoch": 0.5, "value": 1.0, "series": "train", "metric": "loss"}]
    out = train_tab.render(studio, view)
    assert "width:100%" in out["progress"] and out["result"].startswith("### Completed: r1")
    assert set(out["loss_plot"].value["data"][0][2:]) == {"train"} and out["acc_plot"] == gr.skip()
    assert out["matrix"].visible is True
    assert Path(out["matrix"].value["path"]).read_bytes() == (run / "confusion_matrix.png").read_bytes()
    assert (studio.workspace.served / "runs" / "r1" / "confusion_matrix.png").samefile(run / "confusion_matrix.png")


def running_process(tmp_path: Path) -> subprocess.Popen:
    """A process that looks like a finetune training to the studio (argv: ... finetune train) and
    ends on SIGINT, as a training does."""
    process = subprocess.Popen(
        [sys.executable, "-c", sleeper(120), "finetune", "train"],
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline() == "ready\n"  # its SIGINT handler is set
    deadline = time.time() + 10
    while not jobs.is_training_process(process.pid):  # /proc shows the new command line a moment later
        assert time.time() < deadline
        time.sleep(0.02)
    return process


def test_start_up_attaches_to_a_training_left_running_and_marks_dead_ones(studio, tmp_path):
    process = running_process(tmp_path)
    try:
        alive = fake_run(
            studio.runs_dir,
            "alive",
            model=False,
            status="running",
            pids=[process.pid],
            host=os.uname().nodename,
            created="2025-01-02T10:00:00",
        )
        dead = fake_run(
            studio.runs_dir, "dead", model=True, status="running", pids=[2**22 + 12345], host=os.uname().nodename
        )
        earlier = {"type": "log", "message": "hello from before\nLayout: x\x1b[2J"}
        (alive / "events.jsonl").write_text(json.dumps(earlier) + "\n")
        assert studio.attach_running() == alive
        assert json.loads((dead / "run.json").read_text())["status"] == "stopped"  # it has a model
        assert studio.training() and studio.prediction_device() == "cpu"
        with pytest.raises(gr.Error, match="already running \\(alive"):
            train_tab.start_training(studio, data=str(studio.default_data), **HEAD)
        first = next(train_tab.follow_training(studio))
        # a log entry of several lines (the data report) keeps its breaks; a control character shows escaped
        assert "hello from before\nLayout: x\\x1b[2J" in first["log"]
        assert train_tab.stop_training(studio).startswith("Stopping alive")
        assert process.wait(10) == -signal.SIGINT or process.returncode in (1, 130)
        view = last(train_tab.follow_training(studio))
        assert view["result"].startswith("### Training failed")
        assert json.loads((alive / "run.json").read_text())["status"] == "failed"
        assert not studio.training() and train_tab.stop_training(studio) == "No training is running."
    finally:
        process.kill()


def test_shutdown_ends_the_training(studio, tmp_path):
    process = running_process(tmp_path)
    try:
        run = fake_run(
            studio.runs_dir, "alive", model=True, status="running", pids=[process.pid], host=os.uname().nodename
        )
        studio.attach_running()
        studio.shutdown()
        assert process.wait(10) is not None
        assert json.loads((run / "run.json").read_text())["status"] == "stopped"
    finally:
        process.kill()


# ---------------------------------------------------------------------------------------------
# Runs, evaluate, export


def test_refresh_runs_lists_usable_runs_newest_first(studio):
    older = fake_run(studio.runs_dir, "older", created="2025-01-01T10:00:00")
    newer = fake_run(studio.runs_dir, "newer", created="2025-01-02T10:00:00")
    fake_run(studio.runs_dir, "no-model", model=False, created="2025-01-03T10:00:00")
    lists = common.refresh_runs(studio, None, str(older), "/elsewhere")
    assert [d.value for d in lists] == [str(newer), str(older), str(newer)]
    assert [path for _, path in lists[0].choices] == [str(newer), str(older)]
    assert common.latest_runs(studio)[0].value == str(newer)


def test_evaluate_view_of_a_fake_run(studio, sample_data):
    run = fake_run(studio.runs_dir, "r1", data=sample_data)
    out = evaluate_tab.evaluate_run(studio, str(run))
    assert out["summary"].startswith("**r1** (completed, resnet34 / head)") and "accuracy **93.3%**" in out["summary"]
    assert "top-2 100.0%" in out["summary"]
    assert list(out["table"]["class"]) == CLASSES
    ((image, caption),) = out["gallery"]
    assert caption == "circle → square (80%)" and image.size[0] <= 200
    assert out["note"] == "1 of 15 validation images misclassified"
    for key, name in (("matrix", "confusion_matrix.png"), ("curves", "training_curves.png")):
        served = Path(out[key])
        assert served.name == name and served.is_relative_to(studio.workspace.served)
    assert out["calibration"].startswith("This run has no calibration") and out["reliability"] is None
    calibrated = fake_run(
        studio.runs_dir,
        "r2",
        data=sample_data,
        calibration={
            "temperature": 1.5,
            "temperature_at_bound": False,
            "val_images": 15,
            "ece_before": 0.12,
            "ece_after": 0.04,
            "suggested_min_confidence": 0.55,
            "at_suggested": {"answered": 0.9, "accuracy_answered": 0.97},
        },
    )
    make_image(calibrated / "reliability.png", size=(20, 10))
    out = evaluate_tab.evaluate_run(studio, str(calibrated))
    assert "temperature 1.500" in out["calibration"] and "**0.040** after" in out["calibration"]
    assert "minimum confidence **0.55**: 90% of validation answered" in out["calibration"]
    assert Path(out["reliability"]).name == "reliability.png"
    assert Path(out["reliability"]).is_relative_to(studio.workspace.served)
    assert evaluate_tab.evaluate_run(studio, None)["summary"].startswith("No trained run yet")
    with pytest.raises(gr.Error, match="not a run in"):
        evaluate_tab.evaluate_run(studio, "/etc")


def test_export_files_and_zip(studio, sample_data, monkeypatch):
    run = fake_run(studio.runs_dir, "r1", data=sample_data)
    out = export_tab.export_files(studio, str(run))
    assert out["classes"].interactive and out["model"].interactive and out["files"] is None
    for button, name in ((out["classes"], "class_indices.json"), (out["model"], "model.pth")):
        assert Path(button.value["path"]).read_bytes() == (run / name).read_bytes()  # gradio's copy
        assert (studio.workspace.served / "runs" / "r1" / name).samefile(run / name)
    (run / "model.onnx").write_bytes(b"onnx")
    assert [Path(p).name for p in export_tab.export_files(studio, str(run))["files"]] == ["model.onnx"]
    files = export_tab.export_zip(studio, str(run))
    zipped = Path(files[-1])
    assert zipped == studio.workspace.served / "exports" / "r1.zip"
    with zipfile.ZipFile(zipped) as z:
        assert "r1/model.pth" in z.namelist() and "r1/run.json" in z.namelist()
    studio.job = FakeJob(TrainConfig(runs_dir=str(studio.runs_dir)))
    studio.job.run_dir = run
    with pytest.raises(gr.Error, match="r1 is still training"):
        export_tab.export_zip(studio, str(run))
    nothing = export_tab.export_files(studio, None)
    assert nothing["classes"].interactive is False and nothing["files"] is None


def test_curation_files_saved_at_once_are_all_whole(tmp_path, sample_data):
    """Two pages of the Review tab saving their decisions at the same moment: each save writes a
    temporary file of its own (one shared name let one rename the other's half-written file)."""
    from finetune.curation import load_curation, new_curation, save_curation

    target, threads, errors = tmp_path / "curation.json", 8, []
    start = threading.Barrier(threads)

    def save(i):
        curation = new_curation(sample_data)
        for n in range(400):  # a larger file widens the window
            curation.set(f"circle/img_{i}_{n}.jpg", "exclude", note="x" * 50)
        try:
            start.wait()
            for _ in range(5):
                save_curation(curation, target)
        except BaseException as problem:  # noqa: BLE001 - reported below
            errors.append(problem)

    pool = [threading.Thread(target=save, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    assert len(load_curation(target).decisions) == 400
    assert [p.name for p in tmp_path.iterdir()] == ["curation.json"]


def test_zips_of_one_run_made_at_once_are_all_complete(studio, sample_data):
    """Several exports of one run at the same moment (two pages, or a client bypassing the queue)
    each write a partial file of their own: all succeed, the zip is whole, nothing is left over."""
    run = fake_run(studio.runs_dir, "r1", data=sample_data)
    (run / "model.pth").write_bytes(os.urandom(3_000_000))  # a longer write widens the window
    threads, results, errors = 6, [], []
    start = threading.Barrier(threads)

    def zip_it():
        try:
            start.wait()
            results.append(export_tab.export_zip(studio, str(run)))
        except BaseException as problem:  # noqa: BLE001 - reported below
            errors.append(problem)

    pool = [threading.Thread(target=zip_it) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert not errors, errors
    assert len(results) == threads
    zipped = studio.workspace.served / "exports" / "r1.zip"
    assert all(Path(files[-1]) == zipped for files in results)
    with zipfile.ZipFile(zipped) as z:
        assert z.testzip() is None and z.read("r1/model.pth") == (run / "model.pth").read_bytes()
    assert [p.name for p in zipped.parent.iterdir()] == ["r1.zip"]


# ---------------------------------------------------------------------------------------------
# Predict


class FakePredictor:
    def __init__(self, device="cpu"):
        self.device = device
        self.thresholds = []

    def predict_paths(self, paths, top_k=5, on_progress=None, min_confidence=None):
        self.thresholds.append(min_confidence)
        if on_progress:
            on_progress(len(paths), len(paths))
        return [
            Prediction(str(p), [("circle", 0.7), ("square", 0.3)][:top_k], unknown=(min_confidence or 0) > 0.7)
            for p in paths
        ]


def test_predictor_cache_key_and_eviction(tmp_path):
    loads = []

    def loader(run, device):
        loads.append((run.name, device))
        return FakePredictor(device)

    cache = PredictorCache(2, loader)
    a, b, c = (fake_run(tmp_path / "runs", name) for name in "abc")
    first = cache.get(a, "cpu")
    assert cache.get(a, "cpu") is first and loads == [("a", "cpu")]
    assert PredictorCache.key(a, "cpu") == (str(a.resolve()), (a / "model.pth").stat().st_mtime_ns, "cpu")
    cache.get(b, "cpu")
    cache.get(a, "cpu")  # a is now the most recently used
    cache.get(c, "cpu")  # evicts b
    assert [k[0] for k in cache.keys()] == [str(a), str(c)]  # noqa: SIM118 - PredictorCache is not a dict
    cache.get(a, "cuda:0")  # another device: loaded again
    assert loads[-1] == ("a", "cuda:0") and len(cache.keys()) == 2
    stamp = (a / "model.pth").stat().st_mtime_ns + 10**9
    os.utime(a / "model.pth", ns=(stamp, stamp))  # a better model.pth
    cache.get(a, "cuda:0")
    assert loads[-1] == ("a", "cuda:0") and [k[1] for k in cache.keys() if k[2] == "cuda:0"] == [stamp]  # noqa: SIM118
    assert cache.drop_accelerated() == 1 and all(k[2] == "cpu" for k in cache.keys())  # noqa: SIM118
    with pytest.raises(FinetuneError, match="has no model yet"):
        cache.get(fake_run(tmp_path / "runs", "empty", model=False), "cpu")


def test_prediction_device_is_the_cpu_only_while_training(studio):
    from finetune.studio.state import resolved_device

    assert studio.prediction_device() == resolved_device("auto")
    studio.job = FakeJob(TrainConfig(runs_dir=str(studio.runs_dir)))
    assert studio.prediction_device() == "cpu"
    studio.job.alive = False
    assert studio.prediction_device() == resolved_device("auto")


def test_batch_predict_is_bounded_and_removes_its_temporary_inputs(studio, sample_data, tmp_path):
    studio.predictors = PredictorCache(3, loader=lambda run, device: FakePredictor(device))
    studio.max_batch_images = 4
    run = fake_run(studio.runs_dir, "r1")
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.glob("circle/*.jpg"))[:3]:
            z.write(path, "batch/" + path.name)
    images = sorted(sample_data.glob("square/*.jpg"))[:2]
    before = tree_digest(sample_data)
    with pytest.warns(UserWarning, match="Only the first 4 images were classified: at most 4 per request"):
        out = predict_tab.predict_batch(studio, str(run), [str(p) for p in images] + [str(archive)], 2, None)
    assert list(out["table"]["file"]) == [
        images[0].name,
        images[1].name,
        "more.zip/batch/circle_00.jpg",
        "more.zip/batch/circle_01.jpg",
    ]
    assert not any(studio.workspace.inputs.iterdir())  # the extracted zip is gone
    assert Path(out["csv"]).parent == studio.workspace.served / "predictions"
    with pytest.warns(UserWarning, match="Only the first 4 images were classified: at most 4 per request"):
        out = predict_tab.predict_batch(studio, str(run), None, 2, str(sample_data))
    assert len(out["table"]) == 4 and out["table"]["file"][0] == "circle/circle_00.jpg"
    out = predict_tab.predict_batch(studio, str(run), [str(images[0])], 2, None, 0.8)
    row = out["table"].iloc[0]
    assert (row["prediction"], row["best guess"], row["confidence"]) == ("unknown", "circle", 0.7)
    assert studio.predictors.get(run, "cpu").thresholds[-1] == 0.8
    assert tree_digest(sample_data) == before
    with pytest.raises(gr.Error, match="is neither an image nor a .zip"):
        predict_tab.predict_batch(studio, str(run), [str(tmp_path / "notes.txt")], 2, None)


# ---------------------------------------------------------------------------------------------
# Start-up options


@pytest.mark.parametrize(
    "given, host",
    [("", "127.0.0.1"), ("  ", "127.0.0.1"), (None, "127.0.0.1"), ("[::1]", "::1"), (" 0.0.0.0 ", "0.0.0.0")],
)
def test_host_is_normalised(given, host):
    assert studio_app.normalise_host(given) == host


def test_empty_host_from_the_environment_means_loopback(monkeypatch):
    monkeypatch.setenv("FINETUNE_HOST", "")
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    args = studio_app.parse_args([])
    assert args.host == "127.0.0.1" and studio_app.is_loopback(args.host)
    assert not studio_app.is_loopback("0.0.0.0") and not studio_app.is_loopback("")
    assert "all IPv4 interfaces" in studio_app.where("0.0.0.0", 7860)
    assert "all interfaces" in studio_app.where("::", 7860)
    assert studio_app.where("127.0.0.1", 7860) == (
        "listening on 127.0.0.1, port 7860 (this computer only): open http://127.0.0.1:7860"
    )


def test_a_short_or_malformed_password_is_refused_at_start(monkeypatch, capsys):
    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    for given, message in (("ada:short", "has 5 characters: use at least 8"), ("ada", "must look like user:password")):
        assert studio_app.main(["--auth", given, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "short" not in err  # the password is not shown
    monkeypatch.setenv("FINETUNE_AUTH", "ada:1234567")
    assert studio_app.main(["--port", "1"]) == 2 and "at least 8" in capsys.readouterr().err
    assert studio_app.parse_auth("ada:12345678") == ("ada", "12345678")


def test_allowed_hosts_from_options_and_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_ALLOWED_HOSTS", "studio.example.org, Proxy.lan:8443")
    assert studio_app.parse_args([]).allowed_hosts == ["studio.example.org", "proxy.lan"]
    assert studio_app.parse_args(["--allowed-hosts", ""]).allowed_hosts == []
    with pytest.raises(SystemExit):
        studio_app.parse_args(["--allowed-hosts", "http://x/y"])


def test_limits_from_options_and_environment(monkeypatch):
    monkeypatch.setenv("FINETUNE_MAX_UPLOAD_MB", "5")
    monkeypatch.setenv("FINETUNE_WORKSPACE_QUOTA_GB", "1.5")
    args = studio_app.parse_args([])
    assert (args.max_upload_mb, args.workspace_quota_gb) == (5, 1.5)
    args = studio_app.parse_args(["--max-upload-mb", "7", "--workspace-quota-gb", "0"])
    assert (args.max_upload_mb, args.workspace_quota_gb) == (7, 0)
    monkeypatch.delenv("FINETUNE_MAX_UPLOAD_MB")
    monkeypatch.delenv("FINETUNE_WORKSPACE_QUOTA_GB")
    args = studio_app.parse_args([])
    assert (args.max_upload_mb, args.workspace_quota_gb) == (2048, 20)


def test_names_from_users_are_shown_not_rendered(studio, tmp_path):
    """Class folders and paths are the user's (or a downloaded zip's) text: Markdown shows them
    literally and error toasts (which gradio renders as HTML) escape them."""
    make_class_folders(tmp_path / "cwd" / "hostile", classes=("[click](http:evil)", "<img src=x>"), per_class=3)
    out = last(data_tab.scan(studio, "hostile"))
    assert "\\<img src=x\\>" in out["ready"] and "\\[click\\](http:evil)" in out["ready"]
    with pytest.raises(gr.Error) as raised:
        last(data_tab.scan(studio, "/no/<img src=x onerror=alert(1)>"))
    assert "&lt;img src=x onerror=alert(1)&gt;" in raised.value.message


# ---------------------------------------------------------------------------------------------
# Names shown as text: whatever a folder, file, class or run is called, the page shows its name

HOSTILE_ROOT = "a\n\n[Session expired: click to log in again](http://evil.example)\n\n<img src=x onerror=alert(1)>"
HOSTILE_CLASSES = ["$$\\Huge X$$", "<img src=x onerror=alert(1)>", "`tick`", "a@b.example", "www.evil.example"]
CONTROL_CLASS = "cls\n# Heading"  # the scan refuses such a folder; a run's own class list may still hold it
RENDERED_AS_MARKUP = re.compile(r"<(a|img|h[1-6]|script|iframe|table|blockquote|del|s|svg)\b|latex-block", re.I)
GRADIO_MARKED = """
const marked = create_marked({header_links: false, line_breaks: false,
                              latex_delimiters: [{left: "$$", right: "$$", display: true}]});
const texts = JSON.parse(readFileSync(0, "utf8"));
const html = [];
for (const text of texts) html.push(await marked.parse(text));
process.stdout.write(JSON.stringify(html));
"""


@pytest.fixture(scope="module")
def page_html(tmp_path_factory):
    """texts -> the HTML the page makes of each: markdown-it-py (CommonMark, raw HTML on) and, where
    node is here, gradio's own renderer (marked with GFM and gradio's LaTeX block, from the bundle in
    gradio's server build), which also links www.x.y and http://x in plain text."""
    from markdown_it import MarkdownIt

    commonmark = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])
    marked = None
    chunks = Path(gr.__file__).parent / "templates" / "node" / "build" / "server" / "chunks"
    bundle = next(iter(sorted(chunks.glob("markdown-code-*.js"))), None)
    if shutil.which("node") and bundle is not None:
        source = bundle.read_text(encoding="utf-8")
        factory = re.search(r"function (\w+)\(\{header_links:\w+,line_breaks:\w+,latex_delimiters:\w+\}\)", source)
        exports = re.search(r"export \{ ([^}]*) \};", source)
        if factory and exports:
            copy = tmp_path_factory.mktemp("gradio-markdown") / "chunks"
            shutil.copytree(chunks, copy)
            (copy / "package.json").write_text('{"type": "module"}')
            (copy / bundle.name).write_text(
                source.replace(exports[0], f"export {{ {exports[1]}, {factory[1]} as create_marked }};"),
                encoding="utf-8",
            )
            marked = copy / "render.mjs"
            marked.write_text(
                f'import {{ readFileSync }} from "fs";\nimport {{ create_marked }} from '
                f'"./{bundle.name}";\n{GRADIO_MARKED}',
                encoding="utf-8",
            )

    def render(texts: list[str]) -> list[str]:
        html = [commonmark.render(text) for text in texts]
        if marked is not None:
            out = subprocess.run(
                ["node", str(marked)], input=json.dumps(texts), capture_output=True, text=True, timeout=60
            )
            assert out.returncode == 0, out.stderr
            html += json.loads(out.stdout)
        return html

    render.gradio = marked is not None
    return render


def shown_text(html: str) -> str:
    import html as entities

    return entities.unescape(re.sub(r"<[^>]+>", "", html))


def assert_text_only(page_html, markdown: list[str], texts: list[str]) -> None:
    """Markdown outputs render to no link, image, heading, script, table, quote or LaTeX; and
    neither they nor text outputs (cells, captions, labels, choices) hold a control character."""
    for text in markdown:
        assert not any(line.lstrip().startswith("#") for line in text.splitlines()), text
    for html in page_html(markdown):
        assert not RENDERED_AS_MARKUP.search(html), html
    for line in [line for text in markdown for line in text.split("\n")] + texts:  # templates' own lines
        assert printable(line) == line, line


def test_hostile_names_are_shown_as_text_on_every_tab(studio, tmp_path, page_html):
    """A folder named to show a fake "session expired" link and an image, classes named like links,
    code, LaTeX and an e-mail address, files and classes with control characters: the Data,
    Evaluate, Predict and Review tabs show every one as text."""
    import torch

    from finetune.data_doctor import DoctorReport
    from finetune.model import build_model
    from finetune.predict import Predictor

    root = make_class_folders(tmp_path / "cwd" / HOSTILE_ROOT, classes=HOSTILE_CLASSES, per_class=3)
    make_image(root / "www.evil.example" / "x\x1b[2J<b>.png")
    out = last(data_tab.scan(studio, str(root)))
    markdown = [out["summary"], out["warnings"], out["ready"]]  # every tab's, checked at the end
    texts = [caption for _, caption in out["thumbs"]] + list(out["counts"]["class"])
    texts += [cell for row in out["skipped"].value["data"] for cell in row]
    summary, ready = map(shown_text, page_html([out["summary"], out["ready"]])[-2:])
    assert HOSTILE_ROOT.replace("//", "/").replace("\n", "\\x0a") in summary
    assert all(name in ready for name in HOSTILE_CLASSES)
    assert {caption for _, caption in out["thumbs"]} == set(HOSTILE_CLASSES)  # as they are: text there

    refused = make_class_folders(tmp_path / HOSTILE_ROOT / "more", classes=("dogs", CONTROL_CLASS), per_class=2)
    with pytest.raises(gr.Error) as raised:  # a toast: HTML, one line
        last(data_tab.scan(studio, str(refused)))
    assert "\n" not in raised.value.message and "<" not in raised.value.message
    assert "cls\\x0a# Heading" in raised.value.message and "&lt;img src=x" in raised.value.message

    classes = [CONTROL_CLASS, *HOSTILE_CLASSES[:2]]
    run = fake_run(
        studio.runs_dir, "run [x](http:evil) <img src=x>", data=root, classes=classes, status="completed `x`"
    )
    (run / "class_indices.json").write_text(json.dumps(dict(enumerate(classes))))
    image = f"{HOSTILE_CLASSES[1]}/img_0.png"
    (run / "metrics.json").write_text(
        json.dumps(
            {
                "num_images": 3,
                "accuracy": 0.5,
                "balanced_accuracy": 0.5,
                "macro_f1": 0.5,
                "top_k_accuracy": {"1": 0.5},
                "per_class": {c: {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 1} for c in classes},
                "misclassified": [{"path": image, "true": classes[1], "predicted": CONTROL_CLASS, "confidence": 0.8}],
            }
        )
    )
    out = evaluate_tab.evaluate_run(studio, str(run))
    assert out["gallery"], "the misclassified image is shown"
    markdown += [out["summary"], out["note"], out["calibration"]]
    texts += list(out["table"]["class"]) + [caption for _, caption in out["gallery"]]

    torch.manual_seed(0)
    predictor = Predictor(
        build_model("resnet34", len(classes), "none"), classes, "resnet34", image_size=32, device="cpu"
    )
    studio.predictors = PredictorCache(3, loader=lambda run, device: predictor)
    label = predict_tab.predict_image(studio, str(run), str(root / image), top_k=3)["label"]
    assert {name for name, _ in label["confidences"]} == {printable(c) for c in classes}
    table = predict_tab.predict_batch(studio, str(run), None, 3, str(root / HOSTILE_CLASSES[1]))["table"]
    texts += [label["label"]] + [name for name, _ in label["confidences"]] + list(map(str, table.to_numpy().ravel()))

    issue = {
        "kind": "label",
        "path": image,
        "split": "train",
        "given": classes[1],
        "suggested": CONTROL_CLASS,
        "score": 0.1,
        "probability": 0.9,
        "others": [(image, CONTROL_CLASS)],
    }
    report = DoctorReport(
        data=str(root),
        classes=classes,
        backbone="run [x](http:evil)",
        label_issues=[issue],
        other_issues=[{"problem": "small class", "class": CONTROL_CLASS, "detail": "<img src=x>"}],
        summary={"images": 9, "other_issues": {"www.evil.example": 1}},
        notes=["`tick` www.x.y"],
    )
    review = review_tab.Review(
        data=str(root),
        classes=classes,
        curation=str(tmp_path / "curation.json"),
        items=[issue],
        index=0,
        groups=[],
        leaks=0,
    )
    shown = review_tab.render(review)
    assert [value for _, value in shown["relabel_to"].choices] == classes  # decisions keep the real names
    markdown += [views.review_summary(report), shown["details"], shown["curation"]]
    texts += [caption for _, caption in shown["others"]] + [label for label, _ in shown["relabel_to"].choices]
    assert_text_only(page_html, markdown, texts)
    assert page_html.gradio or shutil.which("node") is None  # where node is here, gradio's renderer ran


def test_an_unexpected_exception_reaches_the_page_as_one_escaped_line(studio, capsys):
    """An exception no handler expected (not a FinetuneError) would reach the toast, which renders
    HTML, as gradio's show_error prints it; every event turns it into one escaped line, and the
    traceback goes to the server's log, escaped too."""

    def broken(studio, name=None):
        raise ValueError(f"cannot read {name}")

    def broken_stream(studio, name=None):
        yield {"summary": "working"}
        raise ValueError(f"cannot read {name}")

    for handler in (broken, broken_stream):
        event = common.bind(studio, handler, {"summary": "summary_component"})
        with pytest.raises(gr.Error) as raised:
            result = event(HOSTILE_ROOT + "\x1b[2J")
            if handler is broken_stream:
                assert next(result) == {"summary_component": "working"}
                next(result)
        message = raised.value.message
        assert message.startswith("unexpected error: ValueError: cannot read a\\x0a\\x0a[Session expired")
        assert "\n" not in message and "\x1b" not in message and "<" not in message and "&lt;img src=x" in message
        log = capsys.readouterr().err
        assert "Traceback" in log and f"in {handler.__name__}" in log and "\x1b" not in log
    safe = common.error("data folder not found: <b>x</b>")
    with pytest.raises(gr.Error) as raised:
        common.bind(studio, lambda studio: (_ for _ in ()).throw(safe))()
    assert raised.value is safe  # a handler's own error, already escaped, as it is
    demo = studio_app.build_app(studio)
    assert not [fn.name for fn in demo.fns.values() if fn.fn is not None and not getattr(fn.fn, "shielded", False)]


def test_followers_share_a_small_limit_and_scans_can_be_cancelled(studio):
    """Many open pages each follow the training: together they get a few workers, so Stop (no limit)
    and Predict (its own) are never starved; the Cancel button cancels every kind of scan."""
    demo = studio_app.build_app(studio)
    fns = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name}
    followers = [fns["follow_training"], fns["attach_training"]]
    assert {fn.concurrency_id for fn in followers} == {"follow"}
    assert {fn.concurrency_limit for fn in followers} == {train_tab.FOLLOWERS} and train_tab.FOLLOWERS <= 10
    assert fns["stop_training"].concurrency_limit is None
    assert fns["predict_batch"].concurrency_id == "predict" != "follow"
    cancel = next(fn for fn in demo.fns.values() if fn.cancels)
    cancelled = {demo.fns[i].api_name for i in cancel.cancels}
    assert {"scan_folder", "scan_folder_submit", "scan_sample", "upload_zip", "initial_scan"} <= cancelled


@pytest.fixture(scope="module")
def small_predictor():
    """A real (random) ResNet-34 at 64 pixels with a high suggested threshold: every answer is unknown."""
    import torch

    from finetune.model import build_model
    from finetune.predict import Predictor

    torch.manual_seed(0)
    return Predictor(
        build_model("resnet34", len(CLASSES), "none"),
        CLASSES,
        "resnet34",
        image_size=64,
        device="cpu",
        suggested_min_confidence=0.95,
    )


def test_unknown_below_the_threshold_and_why_shows_the_heatmap_at_the_images_size(studio, tmp_path, small_predictor):
    studio.predictors = PredictorCache(3, loader=lambda run, device: small_predictor)
    run = fake_run(studio.runs_dir, "r1", calibration={"temperature": 1.3, "suggested_min_confidence": 0.95})
    picture = make_image(tmp_path / "up" / "photo.png", (30, 200, 90), size=(90, 70))
    assert predict_tab.run_threshold(studio, str(run)) == {
        "min_conf": 0.95,
        "min_note": "Suggested from validation: 0.95 (below it the answer is *unknown*, with the best guess).",
    }
    old = fake_run(studio.runs_dir, "old")
    assert predict_tab.run_threshold(studio, str(old))["min_conf"] == 0.0
    assert "no calibration" in predict_tab.run_threshold(studio, str(old))["min_note"]
    out = predict_tab.predict_image(studio, str(run), str(picture), 2, 0.95, False)
    guess, confidence = out["label"]["confidences"][0]
    assert out["label"]["label"] == f"unknown (best guess: {guess}, {confidence:.0%})" and confidence < 0.95
    assert len(out["label"]["confidences"]) == 2 and out["heatmap"].visible is False
    out = predict_tab.predict_image(studio, str(run), str(picture), 3, 0.0, True)
    assert out["label"]["label"] in CLASSES  # no minimum: always an answer
    from PIL import Image

    assert out["heatmap"].visible is True
    with Image.open(out["heatmap"].value["path"]) as overlay:  # gradio's copy of the PIL image
        assert overlay.size == (90, 70)
    label = predict_tab.answer_label().postprocess(out["label"])
    assert label.label == out["label"]["label"] and [c.label for c in label.confidences][0] == guess
    assert predict_tab.predict_image(studio, str(run), None, 3, 0.5, True)["label"] is None


def test_an_upload_in_another_format_is_refused_without_decoding(studio, tmp_path, monkeypatch):
    """EPS (Ghostscript), or any format but the accepted ones, is a one-line message: the upload is
    never handed to PIL's other decoders, by the Predict tab nor (once pruned) by anyone in the app."""
    from PIL import EpsImagePlugin, Image

    from finetune.data import ACCEPTED_FORMATS

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args) or 1 / 0)
    studio.predictors = PredictorCache(3, loader=lambda run, device: pytest.fail("no model needed"))
    run = fake_run(studio.runs_dir, "r1")
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(pwned) print\nshowpage\n%%EOF\n")
    with pytest.raises(gr.Error) as raised:
        predict_tab.predict_image(studio, str(run), str(eps), 3, 0.0, False)
    assert raised.value.message == (
        "drawing.eps is not an image this app reads: only JPEG, PNG, BMP, GIF, WEBP, TIFF files are opened"
    )
    upload = predict_tab.image_upload()
    assert upload.type == "filepath" and upload.image_mode is None
    assert upload.preprocess(gr.data_classes.ImageData(path=str(eps), orig_name="drawing.eps")) == str(eps)
    monkeypatch.setattr(Image, "OPEN", dict(Image.OPEN))  # restored after the test: other tests open EPS
    monkeypatch.setattr(Image, "ID", list(Image.ID))
    removed = studio_app.restrict_image_openers()
    assert "EPS" in removed and set(Image.ID) == set(Image.OPEN) == set(ACCEPTED_FORMATS)
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(eps)  # gradio's own Image.open, too
    with Image.open(make_image(tmp_path / "ok.png")) as fine:
        assert fine.format == "PNG"
    assert calls == [] and Image.MAX_IMAGE_PIXELS is not None


# ---------------------------------------------------------------------------------------------
# Review


def test_review_decisions_go_to_the_curation_file_and_the_data_is_untouched(studio, tmp_path, monkeypatch):
    """The doctor (random features at 64 px: seconds) on planted problems; Keep, Exclude, Relabel and the
    leak button write curation.json next to the runs; a kept image is not shown again; the folder is
    byte-for-byte the same; images go to the browser as PIL thumbnails, never as dataset paths."""
    from PIL import Image
    from test_data_doctor import make_problem_dataset

    from finetune.curation import load_curation

    monkeypatch.setattr(review_tab, "IMAGE_SIZE", 64)
    monkeypatch.setenv("FINETUNE_FEATURE_CACHE", str(tmp_path / "features"))
    data = make_problem_dataset(tmp_path / "cwd" / "colours")
    before = tree_digest(data)
    steps = list(review_tab.run_review(studio, "colours", "none"))
    assert any(isinstance(s, dict) and "data doctor" in s.get("log", "") for s in steps[:-1])  # progress lines
    out = steps[-1]
    review, path = out["state"], studio.runs_dir / "curation.json"
    kinds = [item["kind"] for item in review.items]
    assert kinds == sorted(kinds, key=["label", "duplicate", "other"].index) and {"label", "duplicate"} <= set(kinds)
    labels = [item["score"] for item in review.items if item["kind"] == "label"]
    assert labels == sorted(labels)  # most suspicious first
    duplicates = [item for item in review.items if item["kind"] == "duplicate"]
    leaks = [item["path"] for item in duplicates if item["leak"]]
    assert duplicates[: len(leaks)] == [item for item in duplicates if item["leak"]]  # leaks first
    assert "val/red/leaked_copy.png" in leaks  # shown on the val copy, its train original beside it
    assert "likely label errors" in out["summary"] and "leak between splits" in out["summary"]
    assert f"`{path}`" in out["curation"] and out["leak_btn"].interactive
    assert isinstance(out["image"], Image.Image) and all(isinstance(p, Image.Image) for p, _ in out["others"])
    first = review.items[0]
    assert first["path"] in out["details"] and out["relabel_to"].value == first["suggested"]

    out = review_tab.keep_item(studio, review)
    assert out["train_curation"] == str(path) and out["state"].index == 1
    second = out["state"].items[1]
    out = review_tab.exclude_item(studio, out["state"])
    third = out["state"].items[2]
    other_class = next(c for c in review.classes if c != third["given"])
    out = review_tab.relabel_item(studio, out["state"], other_class)
    out = review_tab.exclude_leaks(studio, out["state"])
    decisions = {d.path: d for d in load_curation(path).decisions}
    assert decisions[first["path"]].action == "keep" and decisions[second["path"]].action == "exclude"
    assert (decisions[third["path"]].action, decisions[third["path"]].label) == ("relabel", other_class)
    assert decisions["val/red/leaked_copy.png"].action == "exclude"
    assert "leak" in decisions["val/red/leaked_copy.png"].note
    assert f"({len(decisions)} so far)" in out["curation"]
    with pytest.raises(gr.Error, match="choose the class"):
        review_tab.relabel_item(studio, out["state"], None)

    again = last(review_tab.run_review(studio, str(data), "none"))
    paths = [item["path"] for item in again["state"].items]
    assert first["path"] not in paths and second["path"] in paths  # kept: not shown again; excluded: marked
    at = paths.index(second["path"])
    shown = review_tab.step(studio, again["state"].at(at), 0)
    assert "Decided: excluded" in shown["details"]
    assert "1 flagged image(s) you kept" in again["summary"]
    assert review_tab.curation_for(studio, str(data)) == str(path)
    assert review_tab.curation_for(studio, str(tmp_path)) == ""
    cfg = train_tab.training_config(studio, data=str(data), **HEAD, curation=str(path))
    assert cfg.curation == str(path)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(FinetuneError, match="not a curation file"):
        train_tab.training_config(studio, data=str(data), **HEAD, curation=str(tmp_path / "bad.json"))
    assert tree_digest(data) == before


def test_review_needs_a_folder_and_says_why_the_doctor_cannot_run(studio, tmp_path):
    with pytest.raises(gr.Error, match="Choose a data folder"):
        last(review_tab.run_review(studio, " ", "none"))
    with pytest.raises(gr.Error, match="data folder not found"):
        last(review_tab.run_review(studio, str(tmp_path / "missing"), "none"))
    with pytest.raises(gr.Error, match="Run the doctor first"):
        review_tab.keep_item(studio, None)
    assert [value for _, value in review_tab.backbone_choices(studio)][:2] == ["imagenet", "none"]


def test_evaluate_heatmaps_of_the_misclassified_images(studio, sample_data, small_predictor, monkeypatch):
    studio.predictors = PredictorCache(3, loader=lambda run, device: small_predictor)
    run = fake_run(studio.runs_dir, "r1", data=sample_data)
    metrics = json.loads((run / "metrics.json").read_text())
    wrong = [
        {"path": f"square/square_0{i}.jpg", "true": "square", "predicted": "circle", "confidence": 0.6}
        for i in range(3)
    ]
    (run / "metrics.json").write_text(json.dumps({**metrics, "misclassified": metrics["misclassified"] + wrong}))
    monkeypatch.setattr(evaluate_tab, "MAX_HEATMAPS", 2)
    out = evaluate_tab.evaluate_run(studio, str(run), True)
    captions = [caption for _, caption in out["gallery"]]
    assert captions == [
        "circle → square (80%) · heatmap",
        "square → circle (60%) · heatmap",
        "square → circle (60%)",
        "square → circle (60%)",
    ]
    heat, plain = out["gallery"][0][0], out["gallery"][2][0]
    assert heat.size == plain.size == (96, 96) and heat.tobytes() != plain.tobytes()
    assert out["note"].endswith("· heatmaps on the first 2")


# ---------------------------------------------------------------------------------------------
# The server's own checks (finetune.studio.guard), on gradio's real routes without a server


def guarded_app(hosts, backoff=None, auth=None, check_room=None):
    """gradio's ASGI app for a small Blocks, with the app's middleware: what launch() serves."""
    from starlette.testclient import TestClient

    from finetune.studio import guard

    with gr.Blocks() as demo:
        gr.Markdown("hello")
    demo.auth, demo.max_file_size = auth, None  # what launch() would set
    app = gr.routes.App.create_app(demo, app_kwargs={"middleware": guard.middleware(hosts, backoff, check_room)})
    return TestClient(app, base_url=f"http://127.0.0.1:{hosts.port}")


def test_host_and_origin_rules_on_every_interface_and_behind_a_proxy():
    from finetune.studio.guard import AllowedHosts

    everywhere = AllowedHosts.of("0.0.0.0", 7860, ["studio.example.org"])
    for name in ("10.1.2.3", "fe80::1", "127.0.0.1", "::1", "localhost", "studio.example.org"):
        assert everywhere.allows(name), name
    assert not everywhere.allows("evil.example") and not everywhere.allows("10.1.2.3.nip.io")
    one = AllowedHosts.of("192.168.1.5", 7860)
    assert one.allows("192.168.1.5") and one.allows("localhost") and not one.allows("192.168.1.6")
    assert everywhere.allows_origin("http://10.1.2.3:8080", "10.1.2.3:8080")  # a port forward: as addressed
    assert everywhere.allows_origin("https://studio.example.org", "127.0.0.1:7860")  # the proxy's page
    assert not everywhere.allows_origin("http://10.1.2.4:7860", "10.1.2.3:7860")  # another machine's page
    assert not everywhere.allows_origin("http://studio.example.org.evil.example", "127.0.0.1:7860")
    client = guarded_app(everywhere)
    assert client.get("/config", headers={"Host": "studio.example.org"}).status_code == 200
    assert client.get("/config", headers={"Host": "[fe80::1]:7860"}).status_code == 200
    assert client.get("/config", headers={"Host": "rebound.evil.example:7860"}).status_code == 400
    reset = client.post("/gradio_api/reset", json={"session_hash": "x"}, headers={"Origin": "http://evil.example"})
    assert reset.status_code == 403 and reset.headers["content-type"].startswith("text/plain")


def test_an_upload_beyond_the_workspace_quota_is_refused_before_gradio_writes_it(tmp_path, monkeypatch):
    """Gradio's cache is in the workspace: its uploads count, and one that does not fit is refused."""
    from finetune.studio.guard import AllowedHosts
    from finetune.studio.workspace import Workspace

    workspace = Workspace(tmp_path / "ws", quota_bytes=200_000)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(workspace.gradio_cache))
    client = guarded_app(
        AllowedHosts.of("127.0.0.1", 7860), check_room=lambda need: workspace.check_room(need, "this upload")
    )
    small = client.post("/gradio_api/upload", files={"files": ("a.zip", b"0" * 10_000, "application/zip")})
    assert small.status_code == 200, small.text
    big = client.post("/gradio_api/upload", files={"files": ("b.zip", b"0" * 300_000, "application/zip")})
    assert big.status_code == 413 and big.text.startswith("The workspace is full: this upload needs"), big.text
    assert not [p for p in workspace.gradio_cache.rglob("*") if p.name == "b.zip"]


def test_guessing_the_log_in_is_refused_and_the_right_password_works_after_the_back_off():
    from finetune.studio.guard import AllowedHosts, Backoff

    now = [1000.0]
    backoff = Backoff(free=3, global_free=50, delay=10, max_delay=40, clock=lambda: now[0])
    client = guarded_app(AllowedHosts.of("127.0.0.1", 7860), backoff, auth=[("ada", "correct-horse")])

    def log_in(password):
        return client.post("/login", data={"username": "ada", "password": password})

    started = time.monotonic()
    answers = [log_in(f"guess-{i}") for i in range(200)]
    assert time.monotonic() - started < 30  # refused at once: nothing sleeps
    assert [a.status_code for a in answers[:3]] == [400, 400, 400]  # gradio's "Incorrect credentials"
    assert {a.status_code for a in answers[3:]} == {429}
    assert answers[-1].headers["retry-after"] == "10" and "try again in 10 s" in answers[-1].text
    assert log_in("correct-horse").status_code == 429  # while locked out the password is not even checked
    now[0] += 10.5
    assert log_in("guess-again").status_code == 400
    assert log_in("correct-horse").headers["retry-after"] == "20"  # doubled
    now[0] += 20.5
    right = log_in("correct-horse")
    assert right.status_code == 200 and right.json() == {"success": True}
    assert client.get("/config").status_code == 200  # logged in (the cookie)
    assert log_in("wrong-once-more").status_code == 400  # a success starts the count again


def test_guessing_from_many_clients_is_held_back_together():
    from finetune.studio.guard import Backoff

    now = [0.0]
    backoff = Backoff(free=5, global_free=20, delay=1, max_delay=300, max_clients=8, clock=lambda: now[0])
    allowed = sum(backoff.attempt(f"10.0.{i // 250}.{i % 250}") == 0 for i in range(1000))
    assert allowed == 20  # then every client waits
    assert 0 < backoff.attempt("192.0.2.1") <= 1 and len(backoff._clients) <= 8
    waits = []
    for i in range(10):  # each expiry lets one guess through and doubles the wait, up to max_delay
        now[0] += 400
        assert backoff.attempt(f"10.9.9.{i}") == 0
        waits.append(backoff.attempt("10.9.8.1"))
    assert waits == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    now[0] += 4000  # failures this old are forgotten
    assert backoff.attempt("10.9.9.11") == 0


def test_the_train_tab_says_which_architectures_have_imagenet_v2_weights(studio, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert any("ImageNet V2" in label for label, value in train_tab.WEIGHT_CHOICES if value == "imagenet-v2")
    note = train_tab.check_weights(studio, "resnet34", "imagenet-v2")
    assert note.startswith("**Problem:** torchvision has no ImageNet V2 weights for resnet34")
    note = train_tab.check_weights(studio, "resnet50", "imagenet-v2")
    assert note.startswith("**Warning:** **ImageNet V2 weights for resnet50 are not on this machine.**")
    assert "resnet50-11ad3fa6.pth" in note
    expected = tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"")
    assert train_tab.check_weights(studio, "resnet50", "imagenet-v2").startswith("Ready: ImageNet weights found at")


def test_the_data_tab_scans_a_flat_folder_with_its_labels_csv_and_training_takes_it(studio):
    folder = studio.base_dir / "flat"
    for k in range(4):
        make_image(folder / f"r{k}.png", (220, 30 + k, 30))
        make_image(folder / f"g{k}.png", (30, 220, 30 + k))
    rows = [f"r{k}.png,red" for k in range(4)] + [f"g{k}.png,green" for k in range(4)]
    (folder / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    out = last(data_tab.scan(studio, "flat", "labels.csv"))  # a name inside the folder
    assert "labels from `labels.csv`" in out["summary"] and "ready" in out
    assert data_tab.upload_labels(studio, str(folder / "labels.csv")) == str(folder / "labels.csv")
    cfg = train_tab.training_config(studio, "flat", labels="labels.csv")
    assert cfg.labels == str(folder / "labels.csv")
    with pytest.raises(gr.Error, match="labels file not found"):
        last(data_tab.scan(studio, "flat", "missing.csv"))


# ---------------------------------------------------------------------------------------------
# The Review tab's Label mode


def label_pool(root: Path, k: int = 6) -> Path:
    """k distinct pictures (random pixels: the tiny run is unsure about them in different degrees)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for i in range(k):
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


def test_label_mode_suggests_by_uncertainty_and_saves_each_decision_at_once(studio, tmp_path, tiny_run):
    """The pool (typed relative to the app's folder) ranked by the run's model, most uncertain first;
    a class button writes an `add` with the pool-relative path and the resolved pool, Skip writes
    nothing, None of these a pool `exclude`; a new suggestion leaves the decided images out; the
    images go to the browser as PIL thumbnails; the pool is unchanged."""
    from conftest import copy_run
    from PIL import Image

    from finetune.curation import load_curation

    run = copy_run(tiny_run, studio.runs_dir)
    pool = label_pool(tmp_path / "cwd" / "pool")
    before = tree_digest(pool)
    with pytest.raises(gr.Error, match="pool folder not found"):
        last(label_mode.suggest_pool(studio, str(run), "missing", 5))
    with pytest.raises(gr.Error, match="between 1 and"):
        last(label_mode.suggest_pool(studio, str(run), "pool", 0))
    with pytest.raises(gr.Error, match="first"):
        label_mode.skip_image(studio, None)
    out = last(label_mode.suggest_pool(studio, str(run), "pool", 4))
    session, path = out["state"], studio.runs_dir / "curation.json"
    scores = [item["uncertainty"] for item in session.items]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    assert session.pool == str(pool.resolve()) and session.classes == ["cats", "dogs"]
    assert "**4** image(s)" in out["status"] and "Image 1 of 4" in out["position"]
    assert isinstance(out["image"], Image.Image) and all(isinstance(p, Image.Image) for p, _ in out["examples"])
    assert {caption for _, caption in out["examples"]} == {"cats", "dogs"}
    assert set(out["guesses"]) == {"cats", "dogs"} and abs(sum(out["guesses"].values()) - 1) < 1e-4
    assert [out[f"slot_{i}"].value for i in range(2)] == ["cats", "dogs"] and not out["slot_2"].visible
    first, second, third = (item["path"] for item in session.items[:3])

    out = label_mode.label_slot(studio, session, 1)
    assert out["train_curation"] == str(path) and out["state"].index == 1
    saved = path.read_bytes()
    out = label_mode.skip_image(studio, out["state"])
    assert path.read_bytes() == saved and out["state"].index == 2 and "train_curation" not in out
    out = label_mode.none_of_these(studio, out["state"])
    raw = json.loads(path.read_text())
    assert raw["data"] == str(Path(session.data)) and len(raw["decisions"]) == 2
    added, excluded = raw["decisions"]
    assert {k: added[k] for k in ("path", "action", "label", "pool")} == {
        "path": first, "action": "add", "label": "dogs", "pool": str(pool.resolve())
    }  # fmt: skip
    assert (excluded["path"], excluded["action"], excluded["pool"]) == (third, "exclude", str(pool.resolve()))
    back = label_mode.previous_image(studio, label_mode.previous_image(studio, out["state"])["state"])
    assert back["state"].index == 1 and "Decided" not in back["details"]  # the skipped one
    shown = label_mode.render(back["state"].at(0))
    assert "Decided: labelled dogs" in shown["details"]
    with pytest.raises(gr.Error, match="one of the run's classes"):
        label_mode.label_as(studio, out["state"], "wolves")
    out = label_mode.label_as(studio, out["state"], "cats")  # the fourth: then all done
    assert "All 4 suggested image(s) seen; 3 decided" in out["position"] and out["image"] is None
    assert not out["skip_btn"].interactive and out["prev_btn"].interactive
    assert len(load_curation(path).adds()) == 2

    again = last(label_mode.suggest_pool(studio, str(run), str(pool), 10))
    paths = [item["path"] for item in again["state"].items]
    assert second in paths and not {first, third} & set(paths)  # decided: not asked again; skipped: asked
    assert tree_digest(pool) == before


def test_label_mode_shows_hostile_pool_and_class_names_as_text(studio, tmp_path, page_html):
    """A pool file and classes named like links, LaTeX, code and markup: the Label mode shows each as
    text; the buttons and the class list keep the real names for the decisions."""
    classes = [CONTROL_CLASS, *HOSTILE_CLASSES]
    name = "www.evil.example/[Session expired](http:evil.example) <img src=x onerror=alert(1)> $$x$$.png"
    pool = tmp_path / HOSTILE_ROOT
    make_image(pool / name)
    make_image(tmp_path / "data" / "a.png")
    top = [(c, 1 / len(classes)) for c in classes]
    session = label_mode.Labelling(
        run=str(tmp_path / "runs" / "run <img src=x>"),
        pool=str(pool.resolve()),
        data=str(tmp_path / "data"),
        classes=classes,
        curation=str(tmp_path / "runs" / "curation.json"),
        items=[{"path": name, "uncertainty": 0.9, "top": top}],
        examples={c: [str(tmp_path / "data" / "a.png")] for c in classes},
    )
    shown = label_mode.render(session)
    assert shown["image"] is not None and len(shown["examples"]) == label_mode.GUESSES_SHOWN
    assert [value for _, value in shown["other"].choices] == classes
    out = label_mode.label_slot(studio, session, 2)
    status = views.label_status(session.pool, session.run, 1, ["`tick` www.x.y"], [(name, "<b>bad</b>")])
    assert shown["position"].startswith("### Image 1 of 1")  # numbers only: the one heading
    markdown = [shown["details"], out["position"], status]  # the last: "all done", naming the files
    buttons = [shown[f"slot_{i}"].value for i in range(len(classes))]
    assert buttons == [printable(c) for c in classes]
    texts = buttons + list(shown["guesses"]) + [c for _, c in shown["examples"]]
    texts += [label for label, _ in shown["other"].choices]
    assert_text_only(page_html, markdown, texts)
    decision = json.loads(Path(session.curation).read_text())["decisions"][0]
    assert (decision["path"], decision["label"]) == (name, classes[2])  # the real names


def test_a_click_meant_for_the_image_before_decides_nothing(studio, tmp_path):
    """Two buttons clicked before the page showed the next image: the queue runs the second on the
    session's next image, which the user never saw. The page's hidden label_shown names the image the
    click was for: another is refused, nothing saved."""
    pool = tmp_path / "pool"
    for name in ("a.png", "b.png"):
        make_image(pool / name)
    session = label_mode.Labelling(
        run=str(tmp_path / "runs" / "r"),
        pool=str(pool.resolve()),
        data=str(tmp_path / "data"),
        classes=["cats", "dogs"],
        curation=str(tmp_path / "runs" / "curation.json"),
        items=[
            {"path": name, "uncertainty": 0.5, "top": [("cats", 0.5), ("dogs", 0.5)]} for name in ("a.png", "b.png")
        ],
        examples={},
    )
    assert label_mode.render(session)["shown"] == "a.png"
    out = label_mode.label_slot(studio, session, 0, "a.png")
    assert out["state"].index == 1 and out["shown"] == "b.png"
    saved = Path(session.curation).read_bytes()
    for late in (
        lambda: label_mode.label_slot(studio, out["state"], 1, "a.png"),
        lambda: label_mode.label_as(studio, out["state"], "dogs", "a.png"),
        lambda: label_mode.none_of_these(studio, out["state"], "a.png"),
    ):
        with pytest.raises(gr.Error, match="nothing saved"):
            late()
    assert Path(session.curation).read_bytes() == saved
    done = label_mode.none_of_these(studio, out["state"], "b.png")
    assert done["shown"] == "" and len(json.loads(Path(session.curation).read_text())["decisions"]) == 2


def test_a_running_trainings_pools_are_in_use_so_the_workspace_keeps_them(studio, tmp_path):
    """An uploaded pool a running training adds images from is not cleaned up under it."""
    from types import SimpleNamespace

    from finetune.curation import new_curation, save_curation

    pool, data = tmp_path / "pool", tmp_path / "data"
    make_image(pool / "a.png")
    curation = new_curation(data)
    curation.set("a.png", "add", "cats", pool=pool)
    path = save_curation(curation, tmp_path / "runs" / "curation.json")
    cfg = TrainConfig(data=str(data), curation=str(path), runs_dir=str(tmp_path / "runs"))
    studio.job = SimpleNamespace(running=lambda: True, cfg=cfg)
    try:
        assert studio.in_use() == (data, pool.resolve())
        path.write_text("{")  # unreadable now: the data folder still
        assert studio.in_use() == (data,)
    finally:
        studio.job = None


def test_label_mode_takes_a_pool_as_a_zip_into_the_workspace(studio, tmp_path):
    """An uploaded pool .zip is extracted (its images only) into the workspace; its folder fills the box."""
    archive = tmp_path / "pool.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(make_image(tmp_path / "a.png"), "pool/a.png")
        z.writestr("pool/run.html", "<script>alert(1)</script>")
    folder = Path(label_mode.upload_pool(studio, str(archive)))
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name[0] != "."]
    assert folder.is_relative_to(studio.workspace.uploads) and files == ["pool/a.png"]
    assert label_mode.upload_pool(studio, None) == gr.skip()

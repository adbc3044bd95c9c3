"""Hostile inputs to the surfaces of issue 16 (the Python API, the studio's launch, the compact
checkpoint, evaluate_run, the layout, the dataset archive): each one a line of ours, nothing of the
user's read or written where it should not be."""

from __future__ import annotations

import json
import os
import signal

import pytest
from conftest import make_class_folders, run_within
from PIL import Image

import finetune

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, **info):
    """A run folder as a stranger might hand one over: run.json and whatever else is given."""
    folder.mkdir(parents=True)
    base = {
        "format": "finetune-run/1",
        "status": "completed",
        "arch": "resnet34",
        "classes": ["a", "b"],
        "config": {"data": "x"},
    }
    (folder / "run.json").write_text(json.dumps({**base, **info}))
    return folder


# ---------------------------------------------------------------------------------------------
# The Python API


def test_a_run_json_that_is_not_an_object_is_one_line(tmp_path):
    folder = fake_run(tmp_path / "run")
    (folder / "run.json").write_text("[1, 2]")
    with pytest.raises(finetune.FinetuneError, match="does not hold a JSON object: not a finetune run"):
        finetune.load(folder)


def test_a_run_json_of_wrong_types_still_shows_itself_escaped(tmp_path):
    folder = fake_run(
        tmp_path / "run",
        status="<script>x</script>",
        classes=[1, {"<u>": 2}],
        history=5,
        summary={"accuracy": "<i>high</i>", "num_images": []},
        calibration="x",
        strategy=["?"],
    )
    run = finetune.load(folder)
    page = run._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<i>" not in page and "<u>" not in page
    assert "val accuracy" in page and run.classes == ["1", "{'<u>': 2}"] and run.history == []
    assert repr(run) == f"Run({str(folder)!r}, status='<script>x</script>', classes=2)"
    (folder / "run.json").write_text(json.dumps({"status": "completed", "config": "x"}))
    with pytest.raises(finetune.FinetuneError, match="holds no training configuration"):
        _ = run.config
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(finetune.FinetuneError, match="cannot read .*metrics.json"):
        _ = run.metrics


def test_a_run_json_whose_model_fields_are_not_finetunes_is_one_line_naming_the_field(tmp_path):
    hostile = {
        "arch": "evil",
        "classes": [1, 2],
        "image_size": "224",
        "mean": "x",
        "std": [0, 1, 1],
        "calibration": "x",
    }
    for key, value in hostile.items():
        folder = fake_run(tmp_path / key, **{key: value})
        (folder / "model.pth").write_bytes(b"")  # never read: run.json is refused first
        with pytest.raises(finetune.FinetuneError, match=f"run.json: its '{key}'"):
            finetune.load(folder).predict(tmp_path / "any.jpg")


def test_an_unknown_keyword_of_evaluate_or_doctor_is_one_line_naming_the_closest(tmp_path):
    run = finetune.load(fake_run(tmp_path / "run"))
    with pytest.raises(
        finetune.FinetuneError, match="unknown option 'held_out' for Run.evaluate: did you mean 'held_out_only'"
    ):
        run.evaluate(tmp_path, held_out=True)
    with pytest.raises(finetune.FinetuneError, match="unknown option 'predictor' for Run.evaluate"):
        run.evaluate(tmp_path, predictor=None)  # the run's own
    with pytest.raises(finetune.FinetuneError, match="unknown option 'fold' for finetune.doctor: did you mean 'folds'"):
        finetune.doctor(tmp_path, fold=3)


def test_the_inlined_confusion_matrix_is_a_png_of_the_run_never_a_link_a_fifo_or_another_file(tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_bytes(PNG + b"PRIVATE KEY")  # even a file that looks like a PNG: a link is not followed
    folder = fake_run(tmp_path / "run")
    matrix = folder / "confusion_matrix.png"
    Image.new("RGB", (4, 4)).save(matrix)
    assert "<img src='data:image/png;base64," in finetune.load(folder)._repr_html_()
    matrix.unlink()
    matrix.symlink_to(secret)
    assert "<img" not in finetune.load(folder)._repr_html_()
    matrix.unlink()
    matrix.write_text("<script>alert(1)</script>")  # not a PNG
    assert "<img" not in finetune.load(folder)._repr_html_()
    matrix.unlink()
    os.mkfifo(matrix)
    assert "<img" not in run_within(20, finetune.load(folder)._repr_html_, fifos=[matrix])


def test_a_plain_weights_files_export_never_replaces_a_file_beside_it(tmp_path):
    import torch

    from finetune.model import build_model

    torch.save(build_model("resnet34", 2, "none").state_dict(), tmp_path / "model.pth")
    (tmp_path / "class_indices.json").write_text(json.dumps({"0": "a", "1": "b"}))
    mine = tmp_path / "model.torchscript.pt"
    mine.write_text("the user's own export")
    with pytest.raises(finetune.FinetuneError, match="exists already: give out="):
        finetune.load(tmp_path / "model.pth", image_size=32, device="cpu").export("torchscript")
    assert mine.read_text() == "the user's own export"
    for size in ("224", 8, 0, 224.0):
        with pytest.raises(finetune.FinetuneError, match="image_size must be a whole number from 32 to 1024"):
            finetune.load(tmp_path / "model.pth", image_size=size)


def test_the_sigint_handler_and_the_screen_are_given_back_when_train_raises(tmp_path, monkeypatch):
    import io

    from finetune import api, training
    from finetune.progress import TerminalProgress

    before = signal.getsignal(signal.SIGINT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(finetune.FinetuneError):
        finetune.train(tmp_path / "empty", runs_dir=tmp_path / "runs", weights="none", progress=False)
    assert signal.getsignal(signal.SIGINT) is before
    # a bar drawn, then the training fails without its last event (here, in the scan)
    consumer = TerminalProgress(bar=True)
    monkeypatch.setattr(consumer, "bar_stream", lambda: io.StringIO())
    monkeypatch.setattr(api, "for_environment", lambda progress: consumer)

    def scan_then_fail(cfg, on_event=None, stop=None):
        on_event({"type": "progress", "stage": "check", "what": "checking images", "done": 1, "total": 9})
        raise OSError("the disk went away")

    monkeypatch.setattr(training, "train", scan_then_fail)
    with pytest.raises(OSError):
        finetune.train(tmp_path / "empty", runs_dir=tmp_path / "runs", weights="none")
    assert consumer.bar is None and signal.getsignal(signal.SIGINT) is before


# ---------------------------------------------------------------------------------------------
# The studio's launch()


def test_a_launch_that_fails_leaves_a_training_it_only_followed_running(tmp_path, monkeypatch):
    """A terminal trains in ./runs; launch() in a notebook on a port in use fails in one line and must
    not stop that training on its way out (it never served it)."""
    pytest.importorskip("gradio")
    import socket
    import types

    from finetune.studio import launch
    from finetune.studio.state import Studio

    stopped = []
    terminals = types.SimpleNamespace(process=None, kill=lambda: stopped.append("killed"), running=lambda: True)

    def attach_running(self):
        self.job = terminals
        return tmp_path / "runs" / "the-terminals-run"

    monkeypatch.setattr(Studio, "attach_running", attach_running)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(finetune.FinetuneError, match="it is in use"):
            launch(runs_dir=tmp_path / "runs", port=taken.getsockname()[1], inline=False, quiet=True)
    assert stopped == []


def test_an_auth_that_is_neither_a_pair_nor_text_is_one_line():
    from finetune.studio.app import parse_auth

    for auth in (123, b"ada:correct-horse", lambda user, password: True, ("", ""), ("ada", "short")):
        with pytest.raises(finetune.FinetuneError):
            parse_auth(auth)
    assert parse_auth("") is None and parse_auth(None) is None


def test_a_port_that_is_not_one_is_one_line_before_anything_starts(tmp_path):
    from finetune.studio import launch

    for port in ("abc", 70000, 0, 7860.5):
        with pytest.raises(finetune.FinetuneError, match="port must be a whole number from 1 to 65535"):
            launch(runs_dir=tmp_path / "runs", port=port, inline=False, quiet=True)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Resuming from a last.pth someone else wrote


def resumable_run(tmp_path, checkpoint):
    """A run folder (run.json with its configuration) whose last.pth is `checkpoint`."""
    import torch

    folder = fake_run(
        tmp_path / "runs" / "run",
        config={"data": str(tmp_path / "photos"), "weights": "none", "epochs": 1, "runs_dir": str(tmp_path / "runs")},
    )
    torch.save(checkpoint, folder / "last.pth")
    return folder


def test_a_hostile_last_pth_is_one_line_and_its_base_is_never_a_path_from_the_file(tmp_path, capsys):
    import torch

    from finetune import cli
    from finetune.model import build_model

    weights = build_model("resnet34", 2, "none").state_dict()
    elsewhere = tmp_path / "elsewhere.pth"
    torch.save(weights, elsewhere)  # a perfectly good model, outside the run: must not be loaded
    slim = {
        "model": {"fc.weight": weights["fc.weight"], "fc.bias": weights["fc.bias"]},
        "epoch": 1,
        "history": [],
        "best": {"epoch": 1, "val_acc": 0.5, "val_loss": 1.0},
        "scheduler": {},
        "rng": torch.get_rng_state(),
    }
    cases = {
        "a list": ([1, 2], "is not a checkpoint finetune wrote"),
        "no model": ({**slim, "model": "x"}, "is not a checkpoint finetune wrote"),
        "a base upwards": ({**slim, "base": "../../elsewhere.pth"}, "refers to '../../elsewhere.pth'"),
        "an absolute base": ({**slim, "base": str(elsewhere)}, "refers to"),
        "a text epoch": ({**slim, "base": "model.pth", "epoch": "1"}, "its 'epoch' is a str"),
        "a broken history": ({**slim, "base": "model.pth", "history": [{"epoch": 1}]}, "its history is not one"),
    }
    for name, (checkpoint, message) in cases.items():
        folder = resumable_run(tmp_path / name.replace(" ", "-"), checkpoint)
        before = (folder / "run.json").read_text()
        assert cli.main(["train", "--resume", str(folder)]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (name, err)
        assert (folder / "run.json").read_text() == before, name  # refused before the run is touched


def test_resumed_weights_that_do_not_fit_are_one_line(tmp_path):
    import torch

    from finetune.model import build_model
    from finetune.training import load_resumed

    model = build_model("resnet34", 3, "none")
    state = model.state_dict()
    for wrong in (
        {**state, "fc.weight": torch.zeros(7, 512)},
        {**state, "evil.weight": torch.zeros(1)},
        {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"},
    ):
        with pytest.raises(finetune.FinetuneError, match=r"last.pth does not fit this run's model \(3 classes\)"):
            load_resumed(model, wrong, tmp_path / "last.pth")


# ---------------------------------------------------------------------------------------------
# A split.json someone else wrote (resume reads its paths; evaluate matches them)


def test_a_hostile_split_json_is_unreadable_never_a_traceback_and_no_path_climbs_out(tmp_path):
    from finetune.evaluate import in_training_split
    from finetune.rundir import RunDir

    folder = fake_run(tmp_path / "run")
    good = {
        "root": str(tmp_path / "photos"),
        "layout": "class-folders",
        "classes": ["a", "b"],
        "train": [["a/1.png", 0]],
        "val": [["b/1.png", 1]],
    }
    hostile = [
        [1],
        {**good, "root": 5},
        {**good, "classes": "ab"},
        {**good, "train": 5},
        {**good, "train": [5]},
        {**good, "train": [["a/1.png", 0, 1]]},
        {**good, "train": [[["a"], 0]]},
        {**good, "train": [["a", 7]]},
        {**good, "train": [["../../home/.ssh/id_rsa", 0]]},
        {**good, "train": [["/etc/passwd", 0]]},
        {**good, "train": [["a\\..\\..\\x", 0]]},
        {**good, "skipped": [["x", 1]]},
    ]
    for split in hostile:
        (folder / "split.json").write_text(json.dumps(split))
        with pytest.raises(finetune.FinetuneError, match="cannot read the split of"):
            RunDir(folder).read_split()
        assert in_training_split(RunDir(folder), tmp_path / "photos", ["a/1.png"]) is None  # unknown, not a guess
    (folder / "split.json").write_text(json.dumps(good))
    assert in_training_split(RunDir(folder), tmp_path / "photos", ["a/1.png", "b/1.png"]) == {"a/1.png"}


# ---------------------------------------------------------------------------------------------
# The layout of a hostile tree


def test_a_tree_of_hundreds_of_top_folders_is_still_one_short_line(tmp_path):
    from finetune.data import detect_layout

    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(300):
        (tmp_path / f"c{i:03}\x1b[2J").mkdir()
    with pytest.raises(finetune.FinetuneError, match="and 295 more beside it are not a split") as refused:
        detect_layout(tmp_path)
    assert len(str(refused.value)) < 500 and "\x1b" not in str(refused.value)
    (tmp_path / "val" / "a").mkdir(parents=True)
    [note] = detect_layout(tmp_path).notes
    assert "and 295 more beside the train/ and val/ splits are not used" in note and len(note) < 300


def test_a_split_folder_that_cannot_be_listed_is_one_line_naming_it(tmp_path, monkeypatch):
    from pathlib import Path

    from finetune import data

    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    listed = Path.iterdir

    def iterdir(folder):  # as for a folder of another user (this test may run as root, whom nothing stops)
        if folder.name == "train":
            raise PermissionError(13, "Permission denied", str(folder))
        return listed(folder)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    for scan in (lambda: data.scan_dataset(tmp_path), lambda: data.scan_labelled_folder(tmp_path, ["a"])):
        with pytest.raises(finetune.FinetuneError, match=r"cannot read .*train: Permission denied"):
            scan()


# ---------------------------------------------------------------------------------------------
# A run.json from another machine (its runs_dir recorded absolute)


def test_a_run_json_from_elsewhere_never_sends_a_new_run_to_its_runs_dir(tmp_path, monkeypatch):
    from finetune.cli import build_parser, config_from_args
    from finetune.config import TrainConfig
    from finetune.training import resume_config

    foreign = tmp_path / "home" / "someone" / "runs"  # as recorded on their machine
    folder = fake_run(
        tmp_path / "here" / "runs" / "their-run",
        config={"data": "/their/photos", "epochs": 3, "runs_dir": str(foreign)},
    )
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.delenv("FINETUNE_RUNS_DIR", raising=False)
    assert TrainConfig.load(folder / "run.json").runs_dir == str(tmp_path / "here" / "runs")  # the default
    given = config_from_args(
        build_parser().parse_args(["train", "--config", str(folder / "run.json"), "--runs-dir", str(tmp_path / "mine")])
    )
    assert given.runs_dir == str(tmp_path / "mine") and given.epochs == 3
    assert resume_config(folder).runs_dir == str(folder.parent)  # resumed where it lies now
    assert not (tmp_path / "home").exists()


def test_the_studios_banner_shows_a_strangers_folder_names_escaped(tmp_path):
    import types

    from finetune.studio.app import RunningStudio

    studio = types.SimpleNamespace(runs_dir=tmp_path / "runs", workspace=types.SimpleNamespace(root=tmp_path / "ws"))
    running = RunningStudio(
        types.SimpleNamespace(share_url=None),
        studio,
        url="http://127.0.0.1:7860",
        host="127.0.0.1",
        port=7860,
        auth=False,
        attached=tmp_path / "runs" / "x\x1b]0;owned\x07",
        proxy_url=None,
        undo=[],
    )
    banner = running.banner("Ctrl-C stops it.")
    assert "\x1b" not in banner and "\x07" not in banner and "following the training still running in" in banner


@pytest.mark.parametrize("name", ["../outside", "/tmp/elsewhere", "a/b", "..", "tab\there"])
def test_a_run_name_that_would_leave_the_runs_folder_is_refused(tmp_path, name):
    from finetune.config import FinetuneError, TrainConfig
    from finetune.training import train

    data = make_class_folders(tmp_path / "data", per_class=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FinetuneError, match="run name must be a plain folder name"):
        train(TrainConfig(data=str(data), runs_dir=str(tmp_path / "runs"), weights="none", run_name=name))
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_jpeg_with_two_frame_headers_is_refused(tmp_path):
    """PIL reads the last frame header's size, libjpeg and nvJPEG the first: a file checked small by one
    could be decoded large by another (the GPU path decodes with nvJPEG what the worker checked)."""
    import io
    import struct

    from PIL import Image

    from finetune.data import check_image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buffer, "JPEG")
    data = buffer.getvalue()
    start = data.index(b"\xff\xc0")
    end = start + 2 + struct.unpack(">H", data[start + 2 : start + 4])[0]
    large = bytearray(data[start:end])
    large[5:9] = struct.pack(">HH", 4000, 4000)
    (tmp_path / "two.jpg").write_bytes(data[:end] + bytes(large) + data[end:])
    (tmp_path / "one.jpg").write_bytes(data)
    assert check_image(tmp_path / "one.jpg") is None
    assert "a second frame header" in check_image(tmp_path / "two.jpg")

"""Hostile inputs to the surfaces of issue 16 (the Python API, the studio's launch, the compact
checkpoint, evaluate_run, the layout, the dataset archive): each one a line of ours, nothing of the
user's read or written where it should not be."""

from __future__ import annotations

import json
import os
import signal

import pytest
from PIL import Image

import finetune
from conftest import run_within

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, **info):
    """A run folder as a stranger might hand one over: run.json and whatever else is given."""
    folder.mkdir(parents=True)
    base = {"format": "finetune-run/1", "status": "completed", "arch": "resnet34", "classes": ["a", "b"],
            "config": {"data": "x"}}
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
    folder = fake_run(tmp_path / "run", status="<script>x</script>", classes=[1, {"<u>": 2}], history=5,
                      summary={"accuracy": "<i>high</i>", "num_images": []}, calibration="x", strategy=["?"])
    run = finetune.load(folder)
    page = run._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<i>" not in page and "<u>" not in page
    assert "val accuracy" in page and run.classes == ["1", "{'<u>': 2}"] and run.history == []
    assert repr(run) == f"Run({str(folder)!r}, status='<script>x</script>', classes=2)"
    (folder / "run.json").write_text(json.dumps({"status": "completed", "config": "x"}))
    with pytest.raises(finetune.FinetuneError, match="holds no training configuration"):
        run.config
    (folder / "metrics.json").write_text("{not json")
    with pytest.raises(finetune.FinetuneError, match="cannot read .*metrics.json"):
        run.metrics


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


def test_the_sigint_handler_is_given_back_when_train_raises(tmp_path):
    before = signal.getsignal(signal.SIGINT)
    (tmp_path / "empty").mkdir()
    with pytest.raises(finetune.FinetuneError):
        finetune.train(tmp_path / "empty", runs_dir=tmp_path / "runs", weights="none", progress=False)
    assert signal.getsignal(signal.SIGINT) is before


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

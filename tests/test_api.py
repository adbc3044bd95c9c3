"""The Python API (finetune.train, load, scan, doctor and the Run), and progress on the screen."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import subprocess
import sys
import textwrap
import warnings

import pytest
from conftest import REPO, make_class_folders
from PIL import Image

import finetune

HOSTILE = "<img src=x onerror=alert(1)>"  # a class folder a stranger named
CLASSES = ("cats", "dogs", HOSTILE)
TINY = dict(arch="resnet18", weights="none", image_size=32, batch_size=4, workers=0)  # no ImageNet weights here


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run for the module, trained with progress=False while everything printed is caught."""
    base = tmp_path_factory.mktemp("api")
    photos = make_class_folders(base / "photos", CLASSES, per_class=5)
    holdout = make_class_folders(base / "holdout", CLASSES, per_class=2)
    events, out, err = [], io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(record=True):
        run = finetune.train(
            photos, strategy="head", epochs=1, runs_dir=base / "runs", progress=False, on_event=events.append, **TINY
        )
    return {
        "run": run,
        "photos": photos,
        "holdout": holdout,
        "events": events,
        "printed": out.getvalue() + err.getvalue(),
        "base": base,
    }


@pytest.mark.slow
def test_the_snippet_runs_as_written(trained, monkeypatch):
    """The README's lines, on the module's run (resnet18/head and 1 epoch rather than resnet50/last/5: the
    calls are what is tested)."""
    run, photos = trained["run"], trained["photos"]
    monkeypatch.chdir(photos)  # the snippet's relative names
    a, b = "cats/img_0.png", "dogs/img_1.png"

    assert 0.0 <= run.metrics["accuracy"] <= 1.0 and run.metrics["num_images"] == 3
    assert run.classes == sorted(CLASSES) and run.path.is_dir() and run.status == "completed"
    assert run.config.epochs == 1 and run.config.strategy == "head" and len(run.history) == 1

    preds = run.predict([a, b], top_k=3)
    assert [p.path for p in preds] == [a, b]
    for p in preds:
        assert p.error is None and len(p.top) == 3 and p.label == p.top[0][0] and p.confidence == p.top[0][1]
        assert p.unknown == (p.confidence < run.predictor.min_confidence()) and p.answer in (*CLASSES, "unknown")
    everything = run.predict(".")  # a folder, searched recursively
    assert len(everything) == 15 and all(p.error is None for p in everything)

    report = run.evaluate(trained["holdout"])
    assert report.metrics["num_images"] == 6 and "calibration" in report.metrics
    assert report.confusion_matrix.is_file() and report.out.parent == run.path
    assert "accuracy" in report.summary_text()

    onnx = run.export("onnx")
    assert onnx == run.path / "model.onnx" and onnx.stat().st_size > 0

    overlay = run.explain(a)
    assert isinstance(overlay, Image.Image) and overlay.size == Image.open(a).size

    again = finetune.load(run.path)
    assert isinstance(again, finetune.Run) and again.classes == run.classes and again.metrics == run.metrics

    scan = finetune.scan(".")
    assert scan.classes == sorted(CLASSES) and len(scan.train) + len(scan.val) == 15
    doctor = finetune.doctor(".", weights="none", image_size=32, folds=2, cache_dir=None, progress=False)
    assert doctor.classes == sorted(CLASSES) and "Data doctor" in doctor.summary_text()
    from IPython.lib.pretty import pretty

    assert pretty(doctor) == doctor.summary_text()  # how a notebook shows it (no escapes in these names)


def test_a_classic_weights_file_predicts_and_says_what_it_cannot_do(trained, tmp_path):
    run = trained["run"]
    classic = tmp_path / "classic"
    classic.mkdir()
    (classic / "model.pth").write_bytes((run.path / "model.pth").read_bytes())
    (classic / "class_indices.json").write_bytes((run.path / "class_indices.json").read_bytes())
    model = finetune.load(classic / "model.pth", image_size=32)  # the architecture is read from the weights
    assert not isinstance(model, finetune.Run) and model.arch == "resnet18" and model.classes == run.classes
    image = trained["photos"] / "cats" / "img_0.png"
    # the same weights, preprocessing and classes; only the run's calibration (temperature) differs
    assert model.predict(image)[0].label == run.predict(image)[0].label
    with pytest.raises(finetune.FinetuneError, match="plain weights file, not a run: evaluation needs a run folder"):
        model.evaluate(trained["holdout"])
    assert finetune.load(classic).path == classic / "model.pth"  # a folder holding model.pth, no run.json
    with pytest.raises(finetune.FinetuneError, match="not a run folder"):
        finetune.load(tmp_path)


def test_an_unknown_keyword_is_one_line_naming_the_closest_field(tmp_path):
    with pytest.raises(finetune.FinetuneError, match="unknown option 'epoch' for finetune.train: did you mean 'epochs"):
        finetune.train(tmp_path, epoch=3)
    with pytest.raises(finetune.FinetuneError, match="unknown option 'colour'"):
        finetune.train(tmp_path, colour="red")
    with pytest.raises(finetune.FinetuneError, match="epochs must be at least 1"):
        finetune.train(tmp_path, epochs=0)
    assert list(tmp_path.iterdir()) == []  # refused before anything was made


def test_predict_on_paths_and_on_pil_images_agree(trained):
    run, photos = trained["run"], trained["photos"]
    paths = [photos / c / "img_3.png" for c in CLASSES]
    images = [Image.open(p) for p in paths]
    by_path, by_image = run.predict(paths, top_k=3), run.predict(images, top_k=3)
    mixed = run.predict([paths[0], images[1], photos / CLASSES[2]])
    for p, q in zip(by_path, by_image, strict=True):
        assert [name for name, _ in p.top] == [name for name, _ in q.top]
        assert [prob for _, prob in p.top] == pytest.approx([prob for _, prob in q.top], abs=1e-4)
        assert p.unknown == q.unknown
    assert q.path == str(paths[2])  # a PIL image opened from a file keeps its name
    assert mixed[0].path == str(paths[0]) and mixed[1].label == by_path[1].label and len(mixed) == 2 + 5
    with pytest.raises(finetune.FinetuneError, match="cannot predict a int"):
        run.predict([3])


def test_progress_false_prints_nothing_and_on_event_gets_every_event(trained):
    assert trained["printed"] == ""
    events = trained["events"]
    kinds = [e["type"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("epoch") == 1 and kinds[-1] == "end"
    assert "batch" in kinds and "log" in kinds
    # the scan's progress comes before the run folder exists (and so never goes into events.jsonl)
    scanning = [e for e in events[: kinds.index("start")] if e["type"] == "progress"]
    assert scanning and scanning[-1]["what"] == "checking images"
    assert scanning[-1]["done"] == scanning[-1]["total"] == 15
    written = [json.loads(line)["type"] for line in (trained["run"].path / "events.jsonl").read_text().splitlines()]
    assert "progress" not in written and written.count("epoch") == 1


def test_a_run_shows_itself_in_a_notebook_with_every_name_escaped(trained):
    run = trained["run"]
    page = run._repr_html_()
    assert HOSTILE not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert page.count("<img") == 1 and "<img src='data:image/png;base64," in page  # the confusion matrix only
    assert "completed" in page and run.name in page
    assert repr(run).startswith(f"Run({str(run.path)!r}, status='completed'")


def test_a_scan_shows_as_its_report_in_a_notebook(trained):
    from IPython.lib.pretty import pretty

    scan = finetune.scan(trained["photos"])
    assert pretty(scan) == scan.report()
    assert "cats" in pretty(scan) and "img_0.png" not in pretty(scan)  # not every file, as a dataclass would


# ---------------------------------------------------------------------------------------------
# Interrupting, and progress in a captured log (a subprocess each: a SIGINT, a terminal)


STOPPED_BY_SIGINT = textwrap.dedent("""
    import os, signal, sys, threading
    import finetune
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job's children ignore SIGINT
    before = signal.getsignal(signal.SIGINT)
    sent = threading.Event()

    def on_event(event):
        if event["type"] == "batch" and not sent.is_set():
            sent.set()  # from another thread, as a terminal or a notebook's interrupt button would
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT)).start()

    run = finetune.train(sys.argv[1], runs_dir=sys.argv[2], epochs=3, strategy="head", arch="resnet18", weights="none",
                         image_size=32, batch_size=2, workers=0, on_event=on_event)
    print("status", run.status, "model", (run.path / "model.pth").is_file(),
          "restored", signal.getsignal(signal.SIGINT) is before)
""")


@pytest.mark.slow
def test_ctrl_c_stops_at_the_next_batch_keeps_the_model_and_a_captured_log_is_clean_lines(tmp_path):
    data = make_class_folders(tmp_path / "photos", per_class=5)
    result = subprocess.run(
        [sys.executable, "-c", STOPPED_BY_SIGINT, str(data), str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "status stopped model True restored True" in result.stdout
    assert "stopping after the current batch (interrupt again to abort)" in result.stderr
    info = json.loads(next((tmp_path / "runs").glob("*/run.json")).read_text())
    assert info["status"] == "stopped" and info["epochs_done"] == 1
    # progress=True in a script whose output is captured: the epoch lines, and no bar to run into them
    log = result.stdout + result.stderr
    assert "\r" not in log and "\x1b" not in log
    assert any(line.startswith("epoch   1: train loss") for line in result.stdout.splitlines())


@pytest.mark.slow
def test_the_command_line_shows_the_scan_on_a_terminal_and_keeps_a_redirected_stdout_clean(tmp_path):
    """`finetune train DATA > log`: bars (the scan's, the epoch's) on the terminal, clean lines in the log."""
    import fcntl
    import struct
    import termios
    import threading

    data = make_class_folders(tmp_path / "photos", per_class=5)
    master, slave = pty.openpty()
    fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    options = [part for key, value in TINY.items() for part in ("--" + key.replace("_", "-"), str(value))]
    command = [
        sys.executable,
        "-m",
        "finetune",
        "train",
        str(data),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--epochs",
        "1",
        "--strategy",
        "head",
        *options,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, cwd=REPO, text=True
    )
    os.close(slave)
    terminal = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                return
            if not chunk:
                return
            terminal.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        stdout, _ = process.communicate(timeout=300)
    finally:
        process.kill()
        reader.join(10)
        os.close(master)
    shown = terminal.decode(errors="replace")
    assert process.returncode == 0, shown
    assert "checking images: 100%" in shown and "10/10" in shown  # the scan's bar
    assert "epoch 1/1" in shown  # the epoch's
    assert "\r" not in stdout and "epoch   1: train loss" in stdout and "run folder: " in stdout


# ---------------------------------------------------------------------------------------------
# The progress consumers, fed events


def events_of_a_short_run() -> list[dict]:
    return [
        {"type": "progress", "stage": "check", "what": "checking images", "done": 50, "total": 100},
        {"type": "progress", "stage": "check", "what": "checking images", "done": 100, "total": 100},
        {"type": "log", "message": "Data: photos"},
        {
            "type": "start",
            "run_dir": "runs/r",
            "arch": "resnet34",
            "strategy": "head",
            "device": "CPU",
            "epochs": 1,
            "train_images": 80,
            "val_images": 20,
            "classes": ["a", "b"],
            "trainable_params": 1026,
            "total_params": 21_000_000,
            "world_size": 1,
        },
        {
            "type": "batch",
            "epoch": 1,
            "epochs": 1,
            "batch": 1,
            "batches": 3,
            "loss": 0.7,
            "acc": 0.5,
            "images_per_s": 100.0,
            "eta_s": 2.0,
            "lr": 0.001,
        },
        {
            "type": "epoch",
            "epoch": 1,
            "train_loss": 0.6,
            "train_acc": 0.6,
            "val_loss": 0.5,
            "val_acc": 0.7,
            "seconds": 1.0,
            "best": True,
        },
    ]


def test_without_a_terminal_there_is_no_bar_only_lines(capsys):
    from finetune.progress import TerminalProgress

    progress = TerminalProgress()  # stderr is pytest's capture here, not a terminal
    for event in events_of_a_short_run():
        progress(event)
    out, err = capsys.readouterr()
    assert err == "" and "\r" not in out
    assert out.splitlines() == [
        "Data: photos",
        "run folder: runs/r",
        ("resnet34 / head on CPU: 80 train / 20 val images, 2 classes, 1,026 of 21,000,000 parameters train"),
        "epoch   1: train loss 0.6000 acc 0.6000 | val loss 0.5000 acc 0.7000 | 1.0s  *best",
    ]

    progress = TerminalProgress()
    progress.line_every_s = 0  # a long scan and a long epoch: a plain line now and then
    for event in events_of_a_short_run():
        progress(event)
    lines = capsys.readouterr().out.splitlines()
    assert "checking images: 50/100 (50%)" in lines
    assert "epoch 1/1: batch 1/3, loss 0.700, acc 0.500, img/s 100, eta 0:02" in lines

    quiet = TerminalProgress(quiet=True)  # the command line's --quiet: the lines on stderr, nothing else
    quiet.line_every_s = 0
    for event in events_of_a_short_run():
        quiet(event)
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 4 and "checking images" not in err


def test_a_bar_when_asked_and_names_escaped(capsys):
    from finetune.progress import TerminalProgress

    progress = TerminalProgress(bar=True)
    for event in events_of_a_short_run():
        progress(event)
    progress({"type": "log", "message": "class \x1b]0;owned\x07"})
    out, err = capsys.readouterr()
    assert "checking images:" in err and "epoch 1/1:" in err  # the bars, on stderr
    assert "\r" not in out and "class \\x1b]0;owned\\x07" in out and "\x1b" not in out


def test_a_notebook_is_a_kernel_not_an_environment_variable(monkeypatch):
    from finetune import progress

    monkeypatch.setenv("JPY_PARENT_PID", "1")  # what a terminal inside JupyterLab has
    assert not progress.in_notebook()
    assert type(progress.for_environment()) is progress.TerminalProgress
    assert progress.for_environment(False) is None

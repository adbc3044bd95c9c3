"""`python -m finetune ...` as a user runs it: helpful output, one-line errors, no tracebacks."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO, every_option_config, make_class_folders, make_image, tree_digest
from PIL import Image


def cli(*args, cwd=None, env=None):
    result = subprocess.run(
        [sys.executable, "-m", "finetune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )
    return result


def cli_here(capsys, *args) -> subprocess.CompletedProcess:
    """cli(*args) in this process, as cli() reports it (exit status, stdout, stderr): for the steps after a
    test's first command, as a second start of python and torch costs seconds each."""
    from finetune.cli import main

    capsys.readouterr()
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


ONE_LINE_ERRORS = [
    (("train", "/no/such/folder", "--weights", "none"), "error: data folder not found: /no/such/folder"),
    (("train",), "error: give a DATA folder"),
    (("predict", "/no/such/run", "x.jpg"), "error: model not found: /no/such/run"),
    (("evaluate", "/no/such/run", "data"), "error: not a run folder"),
    (("export", "/no/such/run"), "error: not a run folder"),
    (("train", "data", "--epochs", "0"), "error: epochs must be at least 1, got 0"),
]


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2
    assert result.stderr.strip() == message or result.stderr.strip().startswith(message)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", ONE_LINE_ERRORS)
def test_errors_are_one_line_without_traceback(args, message, capsys):
    assert_one_line_error(cli_here(capsys, *args), message)


@pytest.mark.slow
def test_an_error_from_the_installed_entry_point_is_one_line_too():
    """The same through `python -m finetune` (a fresh interpreter: nothing of the suite's set up)."""
    args, message = ONE_LINE_ERRORS[0]
    assert_one_line_error(cli(*args), message)


def test_help_and_version_answer_without_loading_torch():
    """Every command's --help (and a mistyped `finetune train`) answers in a fraction of a second: the
    parser and the first checks import neither torch nor the web stack."""
    code = (
        "import contextlib, io, sys\n"
        "from finetune.cli import build_parser, main\n"
        "parser = build_parser()\n"
        "for command in [[]] + [[name] for name in parser._subparsers._group_actions[0].choices]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        parser.parse_args([*command, '--help'])\n"
        "with contextlib.redirect_stderr(io.StringIO()):\n"
        "    assert main(['train']) == 2\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'numpy', 'gradio', 'fastapi') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_missing_imagenet_weights_offline_names_the_file(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "d")
    env_home = tmp_path / "torch-home"
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch.hub, urllib.error, sys\n"
            "def offline(*a, **k): raise urllib.error.URLError('offline')\n"
            "torch.hub.load_state_dict_from_url = offline\n"
            "from finetune.cli import main; sys.exit(main(sys.argv[1:]))",
            "train",
            str(data),
            "--runs-dir",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"TORCH_HOME": str(env_home), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert f"{env_home}/hub/checkpoints/resnet34-b627a593.pth" in result.stderr
    assert "Traceback" not in result.stderr
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "no failed run folder left behind"


def test_help_lists_every_command():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "predict", "evaluate", "export", "doctor", "scan", "selftest"):
        assert command in result.stdout
    train_help = cli("train", "--help").stdout
    assert "--strategy {all,last,head}" in train_help and "--resume RUN" in train_help


def test_every_option_of_every_command_has_a_help_text_and_defaults_read_one_way():
    import argparse
    import re

    from finetune.cli import build_parser

    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) >= {
        "train",
        "predict",
        "evaluate",
        "export",
        "doctor",
        "scan",
        "selftest",
        "sample-data",
    }
    for name, command in commands.choices.items():
        undocumented = [a.dest for a in command._actions if not (a.help or "").strip()]
        assert not undocumented, f"{name}: no help text for {undocumented}"
        text = " ".join(command.format_help().split())  # the lines joined: a default may wrap
        mentions = re.findall(r"\(default\b[^)]*", text)
        assert all(m.startswith("(default: ") for m in mentions), (name, [m for m in mentions if ":" not in m])
        for action in command._actions:  # a default worth reading is shown
            if action.option_strings and action.default not in (None, False, True, argparse.SUPPRESS):
                assert f"(default: {action.default}" in text, (name, action.dest)
    sample = " ".join(commands.choices["sample-data"].format_help().split())
    assert "images per class (default: 24)" in sample and "(default: data)" in sample
    scan = " ".join(commands.choices["scan"].format_help().split())
    assert "no val/ folder, as train splits it (default: 0.2)" in scan
    train_help = " ".join(commands.choices["train"].format_help().split())
    assert "(default: 5)" in train_help and "(default: all with --weights none, else last)" in train_help


def test_every_option_round_trips_through_the_command_line_and_a_config_file(tmp_path):
    from finetune.cli import build_parser, config_from_args
    from finetune.config import TrainConfig, cli_fields

    cfg = every_option_config()
    argv = ["train"]
    for f in cli_fields():
        value, meta = getattr(cfg, f.name), f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if meta["positional"]:
            argv.append(str(value))
        elif isinstance(value, bool):
            argv.append(flag)  # every flag here is the non-default side
        else:
            argv += [flag, str(value)]
    assert config_from_args(build_parser().parse_args(argv)) == cfg
    saved = cfg.save(tmp_path / "config.json")
    overridden = config_from_args(build_parser().parse_args(["train", "--config", str(saved), "--epochs", "9"]))
    assert overridden == TrainConfig.from_dict({**cfg.to_dict(), "epochs": 9})


@pytest.mark.slow
def test_train_predict_evaluate_export_from_the_terminal(tmp_path, capsys):
    data = make_class_folders(tmp_path / "photos", per_class=5)
    result = cli(
        "train",
        data,
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--epochs",
        "1",
        "--image-size",
        "64",
        "--batch-size",
        "4",
        "--runs-dir",
        tmp_path / "runs",
        "--workers",
        "0",
        "--strategy",
        "head",
    )
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / result.stdout.strip().splitlines()[-1].split("run folder: ")[1].split("/")[-1]
    assert (run / "model.pth").exists()
    assert "epoch   1:" in result.stdout and "val: " in result.stdout
    assert "\r" not in result.stdout + result.stderr  # a captured log: no progress bar among the lines
    assert (
        "warning: strategy head without pretrained weights: the layers it freezes keep their random" in result.stdout
    )  # an explicit strategy is kept, and questioned in one line
    assert re.search(r"^completed in \d+:\d\d \(.*training \d+:\d\d.*\); best epoch 1$", result.stdout, re.M)

    out_csv = tmp_path / "p.csv"
    predicted = cli_here(capsys, "predict", run, data / "cats", "--top-k", "2", "--csv", out_csv)
    assert predicted.returncode == 0, predicted.stderr
    with open(out_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["best_guess"] for r in rows} <= {"cats", "dogs"}
    assert {r["prediction"] for r in rows} <= {"cats", "dogs", "unknown"}
    suggested = json.loads((run / "run.json").read_text())["calibration"]["suggested_min_confidence"]
    assert f"min confidence {suggested:.2f} (suggested from validation" in predicted.stdout

    # above every confidence: all unknown, the best guess kept; heatmaps at each image's size
    cautious = cli_here(
        capsys,
        "predict",
        run,
        data / "cats",
        "--min-confidence",
        "1",
        "--csv",
        out_csv,
        "--explain",
        tmp_path / "why",
        "--explain-class",
        "dogs",
    )
    assert cautious.returncode == 0, cautious.stderr
    with open(out_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["prediction"] for r in rows} == {"unknown"} and all(r["best_guess"] for r in rows)
    assert "unknown (best guess " in cautious.stdout
    heatmaps = sorted((tmp_path / "why").glob("*.gradcam.png"))
    assert len(heatmaps) == 5 and Image.open(heatmaps[0]).size == (40, 32)
    assert "wrote 5 heatmap(s) (dogs)" in cautious.stdout
    wrong = cli_here(capsys, "predict", run, data / "cats", "--explain", tmp_path / "why", "--explain-class", "ferrets")
    assert wrong.returncode == 2 and "ferrets" in wrong.stderr and "Traceback" not in wrong.stderr
    assert cli_here(capsys, "predict", run, data, "--min-confidence", "1.5").returncode == 2

    evaluated = cli_here(capsys, "evaluate", run, data, "--out", tmp_path / "eval")
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 10 and (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert {"ece_raw", "ece_calibrated", "answered", "accuracy_answered"} <= set(metrics["calibration"])
    assert "calibration (temperature " in evaluated.stdout
    # the training folder itself: the images it trained on are counted, and can be left out
    trained = len(json.loads((run / "split.json").read_text())["train"])
    assert 0 < trained < 10 and metrics["training_overlap"] == trained
    assert f"warning: {trained} of 10 images were in this run's training split" in evaluated.stdout
    held = cli_here(capsys, "evaluate", run, data, "--out", tmp_path / "held-out", "--held-out-only")
    assert held.returncode == 0
    assert f"held out only: left out the {trained} images that were in this run's training split" in held.stdout
    held_out = json.loads((tmp_path / "held-out" / "metrics.json").read_text())
    assert held_out["num_images"] == 10 - trained and held_out["held_out_only"] is True

    exported = cli_here(capsys, "export", run, "--format", "torchscript")
    assert exported.returncode == 0 and (run / "model.torchscript.pt").exists()

    scanned = cli_here(capsys, "scan", data, "--json")
    assert json.loads(scanned.stdout)["classes"] == ["cats", "dogs"]


@pytest.mark.slow
def test_doctor_finds_leaks_and_writes_a_curation_file(tmp_path, capsys):
    from test_data_doctor import make_problem_dataset

    data = make_problem_dataset(tmp_path / "data")
    before = tree_digest(data)
    curation = tmp_path / "runs" / "curation.json"
    result = cli(
        "doctor",
        data,
        "--arch",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--device",
        "cpu",
        "--no-cache",
        "--json",
        tmp_path / "report.json",
        "--csv",
        tmp_path / "report.csv",
        "--leaks-to",
        curation,
    )
    assert result.returncode == 0, result.stderr
    assert "Likely label errors:" in result.stdout and "Duplicate groups:" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"label_issues", "duplicate_groups"} <= set(report)
    assert {"path", "given", "suggested", "score"} <= set(report["label_issues"][0])
    assert {"paths", "splits", "classes", "kind"} <= set(report["duplicate_groups"][0])
    decisions = json.loads(curation.read_text())["decisions"]
    assert "val/red/leaked_copy.png" in {d["path"] for d in decisions if d["action"] == "exclude"}
    assert f"train with --curation {curation}" in result.stdout
    assert tree_digest(data) == before
    inside = cli_here(capsys, "doctor", data, "--weights", "none", "--image-size", "64", "--json", data / "r.json")
    assert inside.returncode == 2 and "inside the dataset" in inside.stderr and not (data / "r.json").exists()


@pytest.mark.slow
def test_a_zip_of_class_folders_is_extracted_safely_and_used(tmp_path, monkeypatch, capsys):
    data = make_class_folders(tmp_path / "photos", per_class=3)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(data.rglob("*.png")):
            z.write(path, "photos/" + path.relative_to(data).as_posix())
    before = archive.read_bytes()
    env = {"FINETUNE_DATASETS": str(tmp_path / "extracted")}
    scanned = cli("scan", archive, "--json", env=env)
    assert scanned.returncode == 0, scanned.stderr
    info = json.loads(scanned.stdout)
    assert info["classes"] == ["cats", "dogs"] and len(info["train"]) + len(info["val"]) == 6
    assert info["root"].startswith(str(tmp_path / "extracted"))
    assert archive.read_bytes() == before

    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("../outside/cats/a.png", b"x")
    monkeypatch.setenv("FINETUNE_DATASETS", env["FINETUNE_DATASETS"])
    refused = cli_here(capsys, "scan", evil)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: evil.zip: refusing entry that leaves the folder")
    assert not (tmp_path / "outside").exists()


# ---------------------------------------------------------------------------------------------
# Faults during a training: one line, exit status 2, a run marked as it ended, no temporary files


def train_in_process(data, runs, monkeypatch, capsys) -> tuple[int, list[str], str]:
    """`finetune train` through cli.main in this process (its Ctrl-C handlers left out: they would
    stay installed in pytest): (exit status, the "error:" lines, stdout)."""
    from finetune import cli

    monkeypatch.setattr(cli, "install_stop_handlers", lambda stop, progress=None: None)
    code = cli.main(
        [
            "train",
            str(data),
            "--runs-dir",
            str(runs),
            "--weights",
            "none",
            "--strategy",
            "head",
            "--epochs",
            "3",
            "--batch-size",
            "4",
            "--image-size",
            "64",
            "--workers",
            "0",
            "--quiet",
        ]
    )
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, [line for line in err.splitlines() if line.startswith("error:")], out


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_a_failed_run(tmp_path, monkeypatch, capsys):
    import errno

    import torch

    from finetune import fsutil
    from finetune import training as train

    real_write, real_save = fsutil._Sink.write, train.save_checkpoint
    full, epoch_1_model = [False], []

    def write(self, data):  # what a disk does when it fills: part of the data, then ENOSPC
        if not full[0]:
            return real_write(self, data)
        view = memoryview(data).cast("B")
        os.write(self.fd, view[: len(view) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    def save_checkpoint(session, state, improved, complete, **options):
        full[0] = state.epoch >= 2  # the checkpoints' writes only: the clean-up's small files still fit
        try:
            real_save(session, state, improved, complete, **options)
        finally:
            full[0] = False
        if state.epoch == 1:
            epoch_1_model.append(hashlib.sha256(session.run.model.read_bytes()).hexdigest())

    monkeypatch.setattr(fsutil._Sink, "write", write)
    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    data, runs = make_class_folders(tmp_path / "d", classes=("a", "b", "c")), tmp_path / "runs"
    code, errors, _ = train_in_process(data, runs, monkeypatch, capsys)
    assert code == 2
    (run,) = [p for p in runs.iterdir()]  # and no lock file left
    (line,) = errors
    assert line.startswith(f"error: disk full: could not write {run}/") and "free on that file system)" in line
    assert line.split(" (")[0].endswith(("model.pth", "last.pth"))
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == line.removeprefix("error: ")
    assert [h["epoch"] for h in info["history"]] == [1]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    assert hashlib.sha256((run / "model.pth").read_bytes()).hexdigest() == epoch_1_model[0], "model.pth changed"
    assert torch.load(run / "model.pth", weights_only=True)["fc.weight"].shape == (3, 512)


@pytest.mark.slow
def test_a_loss_that_turns_nan_ends_the_training_keeping_the_best_model(tmp_path, monkeypatch, capsys):
    import torch

    from finetune import training as train

    real_setup = train.setup_session

    def setup_session(*args, **kwargs):
        session = real_setup(*args, **kwargs)
        criterion, calls = session.criterion, [0]

        def diverging(logits, targets):
            calls[0] += 1
            loss = criterion(logits, targets)
            return loss * float("nan") if calls[0] > session.steps_per_epoch else loss

        session.criterion = diverging
        return session

    monkeypatch.setattr(train, "setup_session", setup_session)
    data, runs = make_class_folders(tmp_path / "d", classes=("a", "b", "c")), tmp_path / "runs"
    code, errors, _ = train_in_process(data, runs, monkeypatch, capsys)
    assert code == 2
    assert errors == [
        "error: training diverged: the training loss became nan in epoch 2; try a lower --lr "
        "(this run used 0.003); the best model so far (epoch 1) is kept"
    ]
    (run,) = [p for p in runs.iterdir()]
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "stopped" and info["error"].startswith("training diverged")  # stopped: usable
    assert info["best"]["epoch"] == 1 and [h["epoch"] for h in info["history"]] == [1]
    assert all(math.isfinite(info["history"][0][k]) for k in ("train_loss", "val_loss"))
    assert math.isfinite(info["calibration"]["temperature"]) and (run / "metrics.json").is_file()
    state = torch.load(run / "model.pth", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


@pytest.mark.slow
def test_names_with_terminal_escapes_are_printed_escaped(tmp_path, monkeypatch, capfd):
    """A folder, a class and a file named with ESC and BEL (set the window title, write the clipboard
    with OSC 52, clear the screen) reach the terminal escaped, from scan, train, predict and doctor,
    in every line and on stdout and stderr alike; files written keep the real names. (In-process:
    torch is imported once.)"""
    from finetune import cli as commands

    monkeypatch.setattr(commands, "install_stop_handlers", lambda *args: None)  # pytest keeps its signals
    title, clipboard, clear = "\x1b]0;pwned\x07", "\x1b]52;c;aGk=\x07", "\x1b[2J"
    data = make_class_folders(tmp_path / f"photos{title}", per_class=4)
    make_image(data / "cats" / f"x{clear}.png")
    other = make_class_folders(tmp_path / "more", classes=("cats", f"evil{clipboard}"), per_class=2)

    def run(*args) -> tuple[int, str]:
        code = commands.main([str(arg) for arg in args])
        captured = capfd.readouterr()
        return code, captured.out + captured.err

    outputs = {
        "scan": run("scan", data),
        "scan of the other": run("scan", other),  # refused or scanned
        "train": run(
            "train",
            data,
            "--weights",
            "none",
            "--epochs",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--strategy",
            "head",
            "--runs-dir",
            tmp_path / "runs",
        ),
    }
    assert outputs["train"][0] == 0, outputs["train"][1]
    run_dir = next((tmp_path / "runs").iterdir())
    classes = [f"evil{clipboard}", "dogs"]  # a run from elsewhere may call its classes anything
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "classes": classes}))
    (run_dir / "class_indices.json").write_text(json.dumps(dict(enumerate(classes))))
    outputs["predict"] = run("predict", run_dir, data / "cats", "--top-k", "2", "--csv", tmp_path / "p.csv")
    outputs["doctor"] = run(
        "doctor", data, "--weights", "none", "--image-size", "32", "--device", "cpu", "--no-cache", "--folds", "2"
    )
    for command, (_code, text) in outputs.items():
        assert "\x1b" not in text and "\x07" not in text, command
    shown = {"title": "photos\\x1b]0;pwned\\x07", "clipboard": "evil\\x1b]52;c;aGk=\\x07", "clear": "x\\x1b[2J.png"}
    assert shown["title"] in outputs["train"][1] and shown["clear"] in outputs["scan"][1]
    assert shown["clipboard"] in outputs["scan of the other"][1] and shown["clipboard"] in outputs["predict"][1]
    assert shown["title"] in outputs["doctor"][1] and shown["clear"] in outputs["doctor"][1]
    assert outputs["predict"][1].count(shown["title"]) >= 4  # every image's line names its path
    with open(tmp_path / "p.csv", newline="", encoding="utf-8") as f:
        assert {row["best_guess"] for row in csv.DictReader(f)} <= set(classes)  # the real names

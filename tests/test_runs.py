"""`finetune runs`, finetune.runs() and finetune.runtable: every run of a runs folder in one table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_class_folders

import finetune
from finetune.cli import main
from finetune.config import FinetuneError
from finetune.rundir import RunDir
from finetune.runtable import UNREADABLE, duration_text, per_class_f1, runs_table, val_curve


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """Two tiny trained runs (head for 1 epoch, then all for 2), a run.json that is not JSON, a folder
    that is no run, and a file (the Review tab's curation.json lives beside the runs)."""
    from finetune.config import TrainConfig
    from finetune.training import train

    base = tmp_path_factory.mktemp("runs-table")
    data = make_class_folders(base / "photos", per_class=4)
    common = dict(data=str(data), runs_dir=str(base / "runs"), weights="none", batch_size=4, image_size=32)
    for name, strategy, epochs in (("first", "head", 1), ("second", "all", 2)):
        cfg = TrainConfig(**common, strategy=strategy, epochs=epochs, workers=0, device="cpu", run_name=name)
        train(cfg)
    runs = base / "runs"
    (runs / "broken").mkdir()
    (runs / "broken" / "run.json").write_text('{"status": "compl')
    (runs / "holiday photos").mkdir()
    (runs / "curation.json").write_text("{}")
    return runs


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["runs", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_the_table_has_each_run_newest_first_with_what_it_recorded(runs_dir):
    table = runs_table(runs_dir)
    trained = [row for row in table.rows if row.status != UNREADABLE]
    assert [row.name for row in trained] == ["second", "first"]  # trained one after the other
    for row in trained:
        info = RunDir(row.path).info()
        metrics = RunDir(row.path).metrics()
        counts = json.loads(RunDir(row.path).split_path.read_text())["counts"]
        assert row.status == "completed" and row.arch == "resnet34" and row.weights == "none"
        assert row.strategy == info["config"]["strategy"] and row.epochs == row.epochs_done == info["config"]["epochs"]
        assert row.best_val_acc == info["best"]["val_acc"] and 0 <= row.best_val_acc <= 1
        assert row.macro_f1 == pytest.approx(metrics["macro_f1"])
        assert row.ece == pytest.approx(info["calibration"]["ece_after"])
        assert row.train_images == sum(counts["train"].values()) and row.val_images == sum(counts["val"].values())
        assert row.images == 8 and row.data == str(runs_dir.parent / "photos")
        assert row.seconds is not None and row.seconds > 0
    assert (table.row("first").strategy, table.row("second").strategy) == ("head", "all")


@pytest.mark.slow
def test_a_damaged_folder_is_a_row_and_a_foreign_one_a_note(runs_dir):
    table = runs_table(runs_dir)
    broken = table.row("broken")
    assert broken is not None and broken.status == UNREADABLE and "cannot read" in broken.problem
    assert broken.arch is None and broken.best_val_acc is None
    assert table.skipped == ["holiday photos"]  # the file curation.json is neither
    assert "skipped 1 folder(s) without run.json: holiday photos" in table.text()


@pytest.mark.slow
def test_cli_prints_the_table_and_json_for_scripts(runs_dir, capsys):
    code, out, err = cli(capsys, "--runs-dir", str(runs_dir))
    assert code == 0 and not err
    lines = out.splitlines()
    for heading in ("run", "data", "arch", "strategy", "weights", "epochs", "best val acc", "macro F1", "ECE"):
        assert heading in lines[0]
    assert "images" in lines[0] and "duration" in lines[0] and "status" in lines[0]
    names = [line.split()[0] for line in lines[1:4]]
    assert sorted(names) == ["broken", "first", "second"] and names.index("second") < names.index("first")
    second = next(line for line in lines if line.startswith("second"))
    assert "completed" in second and "2/2" in second and "photos" in second
    assert UNREADABLE in next(line for line in lines if line.startswith("broken"))

    code, out, _ = cli(capsys, "--runs-dir", str(runs_dir), "--json")
    data = json.loads(out)
    assert code == 0 and data == runs_table(runs_dir).to_dict()
    first = next(run for run in data["runs"] if run["name"] == "first")
    assert first["epochs"] == 1 and first["strategy"] == "head" and first["path"] == str(runs_dir / "first")


@pytest.mark.slow
def test_the_api_gives_the_same_table(runs_dir):
    assert finetune.runs(runs_dir).to_dict() == runs_table(runs_dir).to_dict()


@pytest.mark.slow
def test_curves_and_per_class_f1_for_the_comparison(runs_dir):
    second = RunDir(runs_dir / "second")
    assert [epoch for epoch, _ in val_curve(second)] == [1, 2]
    assert all(0 <= accuracy <= 1 for _, accuracy in val_curve(second))
    f1 = per_class_f1(second)
    metrics = second.metrics()
    assert set(f1) == {"cats", "dogs"} and f1 == {k: v["f1"] for k, v in metrics["per_class"].items()}
    assert per_class_f1(RunDir(runs_dir / "broken")) == {} and val_curve(RunDir(runs_dir / "broken")) == []


@pytest.mark.slow
def test_names_with_control_characters_reach_the_terminal_escaped(runs_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(runs_dir / "first", runs / "evil\x1b[2J\u202egpj.exe")
    info = json.loads((runs / "evil\x1b[2J\u202egpj.exe" / "run.json").read_text())
    info["config"]["data"] = "/data/\x07bell\nnext"
    (runs / "evil\x1b[2J\u202egpj.exe" / "run.json").write_text(json.dumps(info))
    for argv in ((), ("--json",)):
        code, out, _ = cli(capsys, "--runs-dir", str(runs), *argv)
        assert code == 0
        assert not any(c in out for c in "\x1b\x07\u202e")
        if not argv:
            assert len(out.splitlines()) == 2  # a newline in a name or path does not start a line
    code, out, _ = cli(capsys, "--runs-dir", str(runs))
    assert "evil\\x1b[2J\\u202egpj.exe" in out and "bell\\x0anext" in out


def test_run_json_of_the_wrong_types_reads_as_unknown(tmp_path, capsys):
    run = tmp_path / "odd"
    run.mkdir()
    (run / "run.json").write_text(
        json.dumps(
            {
                "created": 5,
                "status": ["x"],
                "config": "no",
                "best": {"val_acc": "high", "epoch": True},
                "summary": {"macro_f1": None, "num_images": 2.5},
                "calibration": [1],
                "history": [{"epoch": 1, "val_acc": 0.5, "images": 3, "seconds": 2}, "junk", {"epoch": "2"}],
            }
        )
    )
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "run.json").write_text("[1, 2]")
    table = runs_table(tmp_path)
    odd = table.row("odd")
    assert odd.status == "unknown" and odd.best_val_acc is None and odd.macro_f1 is None and odd.ece is None
    assert odd.train_images == 3 and odd.val_images is None and odd.seconds == 2 and odd.data is None
    assert val_curve(RunDir(run)) == [(1, 0.5)]
    assert table.row("list").status == UNREADABLE
    code, out, _ = cli(capsys, "--runs-dir", str(tmp_path))
    assert code == 0 and "odd" in out and UNREADABLE in out


def test_an_empty_or_missing_runs_folder(tmp_path, capsys):
    code, out, _ = cli(capsys, "--runs-dir", str(tmp_path))
    assert code == 0 and out.strip() == f"no runs in {tmp_path}"
    code, out, err = cli(capsys, "--runs-dir", str(tmp_path / "nowhere"))
    assert code == 2 and not out and err.strip() == f"error: no runs folder at {tmp_path / 'nowhere'}"
    with pytest.raises(FinetuneError, match="no runs folder"):
        finetune.runs(tmp_path / "nowhere")


def test_durations_read_as_people_write_them():
    assert [duration_text(s) for s in (None, 4.4, 65, 3599.6, 7325)] == ["", "4s", "1m 05s", "1h 00m", "2h 02m"]


# ---------------------------------------------------------------------------------------------
# The studio's Runs tab, its handlers without a browser (tests/test_browser_runs.py drives the page)


@pytest.fixture
def studio(runs_dir, tmp_path, sample_data):
    """A Studio over a copy of the module's runs (a test may delete some)."""
    pytest.importorskip("gradio")
    from finetune.studio.state import Studio

    shutil.copytree(runs_dir, tmp_path / "runs", symlinks=True)
    return Studio(tmp_path / "runs", tmp_path / "ws", sample_data, base_dir=tmp_path)


@pytest.mark.slow
def test_studio_table_sorts_and_compares(studio):
    from finetune.studio import runs_tab

    view = runs_tab.runs_view(studio, "name", ["first", "gone"], None)
    assert list(view["table"]["run"]) == ["broken", "first", "second"]
    assert list(view["table"].columns)[:3] == ["run", "data", "arch"] and "ECE (cal.)" in view["table"].columns
    assert "broken" in view["note"] and "holiday photos" in view["note"]
    assert view["table"]["images"].tolist() == [None, 8, 8]  # numbers (the page's header sort sorts them so)
    assert view["compare"].value == ["first"]  # a run that is gone is no longer ticked
    assert [name for _, name in view["compare"].choices] == ["second", "first"]  # readable runs only
    by_f1 = runs_tab.runs_view(studio, "macro F1")["table"]
    scores = [float(v) for v in by_f1["macro F1"] if v]
    assert scores == sorted(scores, reverse=True) and list(by_f1["run"])[-1] == "broken"

    assert runs_tab.compare_runs(studio, ["first"])["curves"] is None
    compared = runs_tab.compare_runs(studio, ["first", "second"])
    accuracy, loss = compared["curves"].axes
    assert [len(line.get_xdata()) for line in accuracy.lines] == [1, 2]  # one curve a run, an epoch a point
    assert [t.get_text() for t in accuracy.get_legend().get_texts()] == ["first", "second"]
    second_loss = [v for _, v in val_curve(RunDir(studio.runs_dir / "second"), "val_loss")]
    assert loss.get_ylabel() == "validation loss" and list(loss.lines[1].get_ydata()) == second_loss
    f1 = compared["f1"]
    assert list(f1.columns) == ["class", "first", "second"] and list(f1["class"]) == ["cats", "dogs"]
    assert f1["second"].tolist() == [round(v, 3) for v in per_class_f1(RunDir(studio.runs_dir / "second")).values()]


@pytest.mark.slow
def test_use_this_run_sets_the_three_run_lists(studio):
    from finetune.studio import runs_tab

    *lists, message = runs_tab.use_run(studio, "first")
    assert [dropdown.value for dropdown in lists] == [str(studio.runs_dir / "first")] * 3
    assert "first" in message
    with pytest.raises(gr_error(), match="not a run in"):
        runs_tab.use_run(studio, "../first")
    with pytest.raises(gr_error(), match="no run.json"):
        runs_tab.use_run(studio, "holiday photos")


def gr_error():
    import gradio as gr

    return gr.Error


@pytest.mark.slow
def test_delete_asks_first_and_deletes_only_a_run_inside_the_runs_folder(studio, tmp_path):
    from finetune.studio import runs_tab

    asked = runs_tab.ask_delete(studio, "first")
    assert asked["pending"] == "first" and "cannot be undone" in asked["confirm_text"]
    assert (studio.runs_dir / "first").is_dir()  # asking deletes nothing
    assert runs_tab.cancel_delete(studio)["pending"] is None and (studio.runs_dir / "first").is_dir()
    done = runs_tab.confirm_delete(studio, "first")
    assert not (studio.runs_dir / "first").exists() and "Deleted" in done["status"]
    assert (studio.runs_dir / "second").is_dir()

    outside = tmp_path / "elsewhere"
    shutil.copytree(studio.runs_dir / "second", outside / "mine")
    (studio.runs_dir / "link").symlink_to(outside / "mine")
    for name in ("link", str(outside / "mine"), "../elsewhere/mine", str(studio.runs_dir)):
        with pytest.raises(gr_error()):
            runs_tab.confirm_delete(studio, name)
    assert (outside / "mine" / "model.pth").is_file()


@pytest.mark.slow
def test_a_run_that_trains_is_never_deleted(studio):
    import os

    from finetune.studio import runs_tab

    info_path = studio.runs_dir / "second" / "run.json"
    info = json.loads(info_path.read_text())
    # this test's own process, named by a lock that says it trains that run (what every training holds)
    from finetune.rundir import TrainingLock

    with TrainingLock(studio.runs_dir, "photos") as lock:
        lock.set_run(studio.runs_dir / "second")
        info_path.write_text(json.dumps({**info, "status": "running", "pids": [os.getpid()]}))
        for handler in (runs_tab.ask_delete, runs_tab.confirm_delete):
            with pytest.raises(gr_error(), match="is training: stop it first"):
                handler(studio, "second")
    assert (studio.runs_dir / "second" / "model.pth").is_file()
    # another machine's training in a shared runs folder: its processes cannot be seen from here
    info_path.write_text(json.dumps({**info, "status": "running", "host": "elsewhere", "pids": [1]}))
    with pytest.raises(gr_error(), match="is training"):
        runs_tab.confirm_delete(studio, "second")
    assert (studio.runs_dir / "second").is_dir()


# ---------------------------------------------------------------------------------------------
# Numbers no training writes (a run.json from anyone): unknown, never a traceback

HUGE = "1" + "0" * 400  # float() of it raises OverflowError


def hostile_runs(runs: Path) -> Path:
    """Runs whose numbers are infinite, too wide for a float or for 64 bits, beside a good one."""
    runs.mkdir()
    texts = {
        "infinite": '{"status": "completed", "seconds": Infinity, "best": {"val_acc": -Infinity, "epoch": '
        + HUGE
        + "}}",
        "wide": f'{{"status": "completed", "best": {{"val_acc": {HUGE}}}, "summary": {{"macro_f1": {HUGE}, '
        f'"num_images": {10**20}}}}}',
        "history": json.dumps(
            {
                "status": "completed",
                "config": {"epochs": 10**20},
                "epochs_done": -1,
                "history": [
                    {"epoch": 10**20, "val_acc": 0.5, "val_loss": 1.0, "images": 10**20, "seconds": 1e308},
                    {"epoch": 1, "val_acc": 0.6, "val_loss": -1e308, "images": 4, "seconds": 1e308},
                    {"epoch": 2, "val_acc": 0.7, "val_loss": 1e308, "images": 2**53},
                ],
            }
        ),
        "good": json.dumps(
            {
                "status": "completed",
                "created": "2025-01-01T10:00:00",
                "seconds": 65,
                "best": {"val_acc": 0.75},
                "history": [{"epoch": 1, "val_acc": 0.75, "val_loss": 0.5}],
            }
        ),
    }
    for name, text in texts.items():
        (runs / name).mkdir()
        (runs / name / "run.json").write_text(text)
    return runs


def test_numbers_out_of_range_read_as_unknown(tmp_path, capsys):
    runs = hostile_runs(tmp_path / "runs")
    table = runs_table(runs)
    assert [row.name for row in table.rows][-1] == "good" and table.row("good").best_val_acc == 0.75
    infinite, wide, history = table.row("infinite"), table.row("wide"), table.row("history")
    assert infinite.seconds is None and infinite.best_val_acc is None and infinite.best_epoch is None
    assert wide.best_val_acc is None and wide.macro_f1 is None and wide.val_images is None
    assert history.epochs is None and history.epochs_done is None and history.train_images == 4
    assert history.seconds is None, "1e308 + 1e308 overflows to inf: unknown"
    assert val_curve(RunDir(runs / "history")) == [(1, 0.6), (2, 0.7)]
    assert duration_text(float("inf")) == duration_text(float("nan")) == ""
    code, out, err = cli(capsys, "--runs-dir", str(runs))
    assert code == 0 and not err and len(out.splitlines()) == 5 and "1m 05s" in out


def test_runs_json_is_strict_json(tmp_path, capsys):
    runs = hostile_runs(tmp_path / "runs")

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    code, out, _ = cli(capsys, "--runs-dir", str(runs), "--json")
    assert code == 0 and "Infinity" not in out
    rows = json.loads(out, parse_constant=refuse)["runs"]
    assert [row["name"] for row in rows][-1] == "good" and all(row["seconds"] is None for row in rows[:-1])


def test_the_runs_tab_shows_and_plots_out_of_range_numbers(tmp_path):
    """The table reaches the page through orjson (which refuses ints over 64 bits), the curves
    through matplotlib (whose axis overflows on a span of -1e308 to 1e308)."""
    gr = pytest.importorskip("gradio")
    import io

    import orjson

    from finetune.studio import runs_tab

    runs = hostile_runs(tmp_path / "runs")
    table = runs_table(runs)
    frame = runs_tab.table_frame(table.rows)
    assert list(frame["run"])[-1] == "good" and frame["images"].tolist()[:3] == [None, None, 4]
    orjson.dumps(gr.Dataframe().postprocess(frame).model_dump(), option=orjson.OPT_SERIALIZE_NUMPY)
    compared = [RunDir(runs / name) for name in ("history", "good", "infinite")]
    figure = runs_tab.curves_figure(compared)
    figure.savefig(io.BytesIO(), format="png")
    accuracy, loss = figure.axes
    assert [list(line.get_xdata()) for line in accuracy.lines] == [[1, 2], [1]]
    assert [list(line.get_ydata()) for line in loss.lines] == [[0.5]]  # the losses of +-1e308 are left out

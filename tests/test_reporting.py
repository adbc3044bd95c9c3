"""--report-to: TensorBoard and MLflow fed by the training's events, read back with their own readers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, make_class_folders

from finetune.config import FinetuneError, TrainConfig
from finetune.rundir import RunDir

EPOCH_NAMES = {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "lr"}


def tiny(tmp_path: Path, **changes) -> TrainConfig:
    """Two colours, 32 px, a frozen random ResNet-18 under a new head: a training of a few seconds."""
    data = make_class_folders(tmp_path / "photos", per_class=4)
    values = dict(
        data=str(data),
        runs_dir=str(tmp_path / "runs"),
        weights="none",
        arch="resnet18",
        strategy="head",
        epochs=2,
        batch_size=4,
        image_size=32,
        workers=0,
        device="cpu",
    )
    return TrainConfig(**{**values, **changes})


def train_logging(cfg: TrainConfig, **options) -> tuple[Path, list[str]]:
    from finetune.training import train

    logs: list[str] = []
    run = train(cfg, on_event=lambda e: logs.append(e["message"]) if e["type"] == "log" else None, **options)
    return run, logs


# ---------------------------------------------------------------------------------------------
# The option


def test_report_to_names_are_checked_in_one_line():
    for bad, named in (("tensorbord", "tensorbord"), ("none,mlflow", "none"), ("mlflow,wandb", "wandb")):
        with pytest.raises(FinetuneError, match=f"report to '{bad}': unknown '{named}', give none or") as caught:
            TrainConfig(report_to=bad).validate()
        assert "\n" not in str(caught.value)
    with pytest.raises(FinetuneError, match="option report_to must be a str"):
        TrainConfig(report_to=5).validate()  # type: ignore[arg-type]
    assert TrainConfig(report_to=" tensorboard , mlflow ").validate().report_to == " tensorboard , mlflow "
    assert TrainConfig(report_to=["tensorboard", "mlflow"]).report_to == "tensorboard,mlflow"  # the API's list
    assert TrainConfig(report_to=[]).report_to == "none"


def test_report_to_on_the_command_line_takes_a_list():
    from finetune.cli import build_parser, config_from_args

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["train", "photos", "--report-to", "mlflow,tensorboard"]))
    assert cfg.report_to == "mlflow,tensorboard" and cfg.validate()
    assert "--report-to LIST" in parser._subparsers._group_actions[0].choices["train"].format_help()


def test_a_missing_library_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for module, report_to, line in (
        ("tensorboard", "tensorboard", "--report-to tensorboard needs tensorboard: "),
        ("mlflow", "tensorboard,mlflow", "--report-to mlflow needs mlflow: "),
        ("sqlalchemy", "mlflow", "a local MLflow store needs sqlalchemy: "),
    ):
        with monkeypatch.context() as hidden:
            hidden.setitem(sys.modules, module, None)  # as if not installed
            with pytest.raises(FinetuneError) as caught:
                TrainConfig(report_to=report_to).validate()
        extra = "mlflow" if module != "tensorboard" else "tensorboard"
        assert str(caught.value) == f"{line}pip install 'finetune-studio[{extra}]'"
    # a tracking server needs no database of this machine's: mlflow-skinny alone is enough
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    TrainConfig(report_to="mlflow").validate()


def test_the_studio_offers_report_to_as_a_multiple_choice():
    import dataclasses

    from finetune.studio import train_tab

    field = {f.name: f for f in dataclasses.fields(TrainConfig)}["report_to"]
    component = train_tab.setting(field, "tensorboard")
    assert component.multiselect and [choice[1] for choice in component.choices] == ["tensorboard", "mlflow"]
    assert component.value == ["tensorboard"]
    assert train_tab.config_values({"report_to": ["tensorboard", "mlflow"]}) == {"report_to": "tensorboard,mlflow"}
    assert train_tab.config_values({"report_to": []}) == {"report_to": "none"}
    assert train_tab.config_values({"report_to": "mlflow"}) == {"report_to": "mlflow"}  # an API client's text


# ---------------------------------------------------------------------------------------------
# Trainings that report


@pytest.mark.slow
def test_tensorboard_and_mlflow_read_back_what_the_training_reported(tmp_path, monkeypatch):
    """A training stopped after its first epoch (MLflow: KILLED), then resumed to its second: one MLflow
    run, FINISHED, and both epochs in either reader."""
    import threading

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.training import resume_config, train

    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shapes")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # MLflow keeps a store's artifacts where it is started (./mlruns)
    stop = threading.Event()
    run = RunDir(
        train(tiny(tmp_path, report_to="tensorboard,mlflow"), lambda e: e["type"] == "epoch" and stop.set(), stop)
    )
    client = MlflowClient(uri)
    first = run.require_info()
    assert first["status"] == "stopped" and first["epochs_done"] == 1
    assert client.get_run(first["mlflow_run_id"]).info.status == "KILLED"
    run_path, logs = train_logging(resume_config(run.path, epochs=2), resume=run.path)
    info = run.require_info()
    history = info["history"]
    assert info["status"] == "completed" and info["mlflow_run_id"] == first["mlflow_run_id"]
    assert not [line for line in logs if line.startswith("warning: ") and "reporting" in line]

    board = EventAccumulator(str(run.tensorboard))
    board.Reload()
    tags = board.Tags()
    assert set(tags["scalars"]) >= EPOCH_NAMES and "final/accuracy" in tags["scalars"]
    assert [(s.step, round(s.value, 5)) for s in board.Scalars("val/accuracy")] == [
        (h["epoch"], round(h["val_acc"], 5)) for h in history
    ]
    assert [s.step for s in board.Scalars("train/loss")] == [1, 2]
    assert {"confusion_matrix", "reliability"} <= set(tags["images"])
    from PIL import Image

    with Image.open(run.confusion_matrix) as plot:
        shown = board.Images("confusion_matrix")[-1]
        assert (shown.width, shown.height) == plot.size
    assert any(tag.startswith("config") for tag in tags["tensors"])  # add_text: a text summary

    mlflow_run = client.get_run(info["mlflow_run_id"])
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == run.name
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "shapes"
    params = mlflow_run.data.params
    assert params["arch"] == "resnet18" and params["epochs"] == "2" and params["report_to"] == "tensorboard,mlflow"
    assert mlflow_run.data.tags["finetune.run_dir"] == str(run.path)
    assert set(mlflow_run.data.metrics) >= EPOCH_NAMES
    assert [(m.step, round(m.value, 5)) for m in client.get_metric_history(mlflow_run.info.run_id, "val/accuracy")] == [
        (h["epoch"], round(h["val_acc"], 5)) for h in history
    ]
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"run.json", "class_indices.json", "metrics.json", "confusion_matrix.png", "reliability.png"} <= artifacts
    assert not {name for name in artifacts if name.endswith((".pth", ".safetensors"))}  # never the weights
    assert uri not in run.info_path.read_text()


def synthetic_run(tmp_path: Path, name: str) -> RunDir:
    run = RunDir(tmp_path / "runs" / name)
    run.path.mkdir(parents=True)
    run.write_info({"status": "running"})
    (run.path / "class_indices.json").write_text('{"0": "a"}')
    return run


def epoch(n: int) -> dict:
    return {"type": "epoch", "epoch": n, "train_loss": 1.0 / n, "train_acc": 0.5, "val_loss": 0.9, "val_acc": 0.6}


@pytest.mark.slow
def test_the_mlflow_run_ends_as_the_training_did_in_a_store_beside_the_runs(tmp_path, monkeypatch):
    """Without $MLFLOW_TRACKING_URI, sqlite:///<runs>/mlflow.db, artifacts in the runs folder too; a
    stopped or interrupted training's run is KILLED, a failed one FAILED, a finished one FINISHED."""
    from mlflow.tracking import MlflowClient

    from finetune.reporting import Reporting

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    cfg = TrainConfig(runs_dir=str(tmp_path / "runs"), report_to="mlflow")
    endings = {
        "stopped": [epoch(1), {"type": "end", "status": "stopped", "best": {"epoch": 1}, "metrics": None}],
        "interrupted": [epoch(1), {"type": "error", "message": "interrupted"}],
        "failed": [epoch(1), {"type": "error", "message": "RuntimeError: out of memory"}],
        "early-stopped": [epoch(1), epoch(2), {"type": "end", "status": "early-stopped", "best": {"epoch": 1}}],
    }
    expected = {"stopped": "KILLED", "interrupted": "KILLED", "failed": "FAILED", "early-stopped": "FINISHED"}
    logs: list[str] = []
    for name, events in endings.items():
        run = synthetic_run(tmp_path, name)
        reporting = Reporting.open(cfg, run, lambda e: logs.append(e["message"]))
        for event in [{"type": "start", "run_dir": str(run.path)}, *events]:
            reporting({**event, "time": time.time()})
        reporting.close()
        assert logs == []
        client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
        reported = client.get_run(run.require_info()["mlflow_run_id"])
        assert (name, reported.info.status) == (name, expected[name])
        assert [m.step for m in client.get_metric_history(reported.info.run_id, "train/loss")] == [
            e["epoch"] for e in events if e["type"] == "epoch"
        ]
    assert client.get_experiment_by_name("finetune").artifact_location.startswith((tmp_path / "runs").as_uri())
    assert {a.path for a in client.list_artifacts(reported.info.run_id)} == {"run.json", "class_indices.json"}
    assert list((tmp_path / "cwd").iterdir()) == []  # nothing where the user is


@pytest.mark.slow
def test_an_unreachable_server_or_a_failing_reporter_is_a_warning_and_the_training_finishes(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def broken(*args, **kwargs):
        raise RuntimeError("the disk said no")

    port = free_port()  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://someone:s3cret@127.0.0.1:{port}")
    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    started = time.monotonic()
    run_path, logs = train_logging(tiny(tmp_path, report_to="tensorboard,mlflow"))
    run = RunDir(run_path)
    info = run.require_info()
    assert info["status"] == "completed" and run.model.is_file() and "mlflow_run_id" not in info
    warnings = sorted(line for line in logs if line.startswith("warning: ") and "reporting" in line)
    assert len(warnings) == 2, logs
    assert warnings[0].startswith(
        f"warning: mlflow reporting stopped for this run: ConnectionError: cannot reach the MLflow server at "
        f"http://127.0.0.1:{port} ("
    )
    assert warnings[1] == "warning: tensorboard reporting stopped for this run: RuntimeError: the disk said no"
    assert "s3cret" not in run.events.read_text() and "s3cret" not in run.info_path.read_text()
    assert time.monotonic() - started < 120  # never MLflow's minutes of retries


def test_warnings_leave_out_passwords_in_urls():
    from finetune.reporting import redact

    assert redact("POST https://me:pa55@host:5000/api failed; see http://tok@x") == (
        "POST https://host:5000/api failed; see http://x"
    )
    assert json.loads(json.dumps(redact("sqlite:////tmp/a.db"))) == "sqlite:////tmp/a.db"


def test_a_failing_reporter_is_dropped_after_one_warning_and_a_stuck_one_is_not_waited_for(tmp_path, monkeypatch):
    import threading

    from finetune import reporting

    seen: list[str] = []
    release = threading.Event()

    class Failing:
        name = "tensorboard"

        def __init__(self, run, cfg, on_training):
            pass

        def handle(self, event):
            seen.append(event["type"])
            if event["type"] == "epoch":
                raise OSError("no space left on device")

        def close(self, ok):
            seen.append(f"closed ok={ok}")

    class Stuck(Failing):
        name = "mlflow"

        def handle(self, event):
            release.wait(30)  # a server that never answers

        def close(self, ok):
            pass

    monkeypatch.setitem(reporting.REPORTER_TYPES, "tensorboard", Failing)
    monkeypatch.setitem(reporting.REPORTER_TYPES, "mlflow", Stuck)
    monkeypatch.setattr(reporting, "CLOSE_TIMEOUT_S", 0.5)
    logs: list[str] = []
    cfg = TrainConfig(runs_dir=str(tmp_path), report_to="tensorboard,mlflow,tensorboard")  # each reporter once
    reports = reporting.Reporting.open(cfg, RunDir(tmp_path / "run"), lambda e: logs.append(e["message"]))
    for event in ({"type": "start"}, {"type": "batch"}, epoch(1), epoch(2), {"type": "end"}):
        reports(event)
    started = time.monotonic()
    reports.close()
    release.set()
    assert time.monotonic() - started < 5
    assert seen == ["start", "epoch", "closed ok=False"]  # no batch events; nothing after the failure
    assert logs == [
        "warning: tensorboard reporting stopped for this run: OSError: no space left on device",
        "warning: mlflow: not done after 0.5 s, left",
    ]


@pytest.mark.slow
def test_a_failed_artifact_upload_still_ends_the_mlflow_run(tmp_path, monkeypatch):
    """A reporter failing after its run began (here the artifacts) is one warning, and the MLflow run
    still ends (not RUNNING forever), with the status the training's end gave it."""
    from mlflow.tracking import MlflowClient

    from finetune.reporting import Reporting

    def refused(*args, **kwargs):
        raise OSError("the artifact store said no")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(MlflowClient, "log_artifact", refused)
    run = synthetic_run(tmp_path, "artifacts-refused")
    logs: list[str] = []
    reporting = Reporting.open(TrainConfig(runs_dir=str(tmp_path / "runs"), report_to="mlflow"), run,
                               lambda e: logs.append(e["message"]))  # fmt: skip
    end = {"type": "end", "status": "completed", "best": {"epoch": 1}, "metrics": {"accuracy": 0.5}}
    for event in ({"type": "start"}, epoch(1), end):
        reporting({**event, "time": time.time()})
    reporting.close()
    assert logs == ["warning: mlflow reporting stopped for this run: OSError: the artifact store said no"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert client.get_run(run.require_info()["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_params_refused_at_the_start_still_end_the_created_mlflow_run(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from finetune.reporting import Reporting

    def refused(*args, **kwargs):
        raise OSError("params said no")

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(MlflowClient, "log_batch", refused)
    run = synthetic_run(tmp_path, "params-refused")
    logs: list[str] = []
    reporting = Reporting.open(TrainConfig(runs_dir=str(tmp_path / "runs"), report_to="mlflow"), run,
                               lambda e: logs.append(e["message"]))  # fmt: skip
    reporting({"type": "start", "time": time.time()})
    reporting.close()
    assert logs == ["warning: mlflow reporting stopped for this run: OSError: params said no"]
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [created] = client.search_runs([client.get_experiment_by_name("finetune").experiment_id])
    assert created.info.status == "FAILED"

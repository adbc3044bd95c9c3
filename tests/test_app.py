"""app.py through gradio_client: every endpoint, including errors arriving as clear messages.

The app runs as `python app.py` on a free loopback port with a temporary runs folder (see
conftest.app_server). Trainings use weights none, 64-pixel images and the `head` strategy: seconds.
"""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
from conftest import make_class_folders, sleeper

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

FAST = dict(
    arch="resnet18", strategy="head", weights="none", weights_file=None, batch_size=16, lr=0.01, image_size=64, seed=0
)

# gradio_client's httpx default (5 s) is short for a server answering its API info while the other
# test workers keep both cores busy
PATIENT = {"timeout": 60}


@pytest.fixture(scope="module")
def client(app_server, tmp_path_factory):
    return Client(
        app_server.url,
        analytics_enabled=False,
        verbose=False,
        httpx_kwargs=PATIENT,
        download_files=str(tmp_path_factory.mktemp("downloads")),
    )


def follow(client, until=None, timeout=240):
    """Stream /follow_training; returns the list of updates (each a tuple of outputs)."""
    job = client.submit(api_name="/follow_training")
    updates, start = [], time.time()
    for out in job:
        updates.append(out)
        if until is not None and until(out):
            job.cancel()
            break
        assert time.time() - start < timeout, "training did not end in time"
    if until is None:
        updates.extend(o for o in job.outputs()[len(updates) :])
    return updates


def status_text(update) -> str:
    return update[0]  # the progress HTML (bar + status line)


def train(client, data, epochs=1, **overrides):
    settings = dict(FAST, **overrides)
    client.predict(
        str(data),
        settings["arch"],
        settings["strategy"],
        settings["weights"],
        settings["weights_file"],
        epochs,
        settings["batch_size"],
        settings["lr"],
        settings["image_size"],
        settings["seed"],
        api_name="/start_training",
    )


@pytest.fixture(scope="module")
def trained(client, app_server, sample_data):
    """One short training on the sample data; returns (run path, streamed updates)."""
    # the worker's studio is shared with other files (the browser tests copy runs into it), so the run is
    # the one this training made, not the last name in the folder
    before = set(app_server.runs_dir.iterdir())
    train(client, sample_data, epochs=1)
    updates = follow(client)
    runs = [p for p in set(app_server.runs_dir.iterdir()) - before if (p / "run.json").is_file()]
    assert len(runs) == 1, app_server.log_tail()
    return runs[0], updates


# ---------------------------------------------------------------------------------------------
# Data


def test_scan_sample_data(client, sample_data):
    summary, counts, gallery, skipped, warnings, ready = client.predict(str(sample_data), api_name="/scan_folder")
    assert "3 classes" in summary and "57 training and 15 validation images" in summary
    assert counts["headers"] == ["class", "train", "val", "total"]
    assert counts["data"][0] == ["circle", 19, 5, 24] and counts["data"][-1][0] == "total"
    assert len(gallery) == 18 and {item["caption"] for item in gallery} == {"circle", "square", "triangle"}
    assert Path(gallery[0]["image"]).is_file()
    assert "No warnings" in warnings
    assert "3 classes" in ready and str(sample_data) in ready


def test_scan_reports_skipped_files_and_imbalance(client, tmp_path):
    data = make_class_folders(tmp_path / "d", classes=("cats", "dogs"), per_class=2)
    make_class_folders(tmp_path / "more", classes=("cats",), per_class=12)
    for path in (tmp_path / "more" / "cats").iterdir():
        path.rename(data / "cats" / f"more_{path.name}")
    (data / "dogs" / "broken.jpg").write_bytes(b"not an image")
    summary, counts, gallery, skipped, warnings, ready = client.predict(str(data), api_name="/scan_folder")
    assert "1 file(s) skipped" in summary
    assert skipped["visible"] is True  # the table is shown only when something was skipped
    assert skipped["value"]["data"] == [["dogs/broken.jpg", "not a readable image"]]
    assert "imbalanced" in warnings


@pytest.mark.parametrize(
    "path, message",
    [
        ("/no/such/folder", "data folder not found: /no/such/folder"),
        ("", "Type a folder path"),
    ],
)
def test_scan_errors_are_messages(client, path, message):
    with pytest.raises(AppError, match=message):
        client.predict(path, api_name="/scan_folder")


def test_scan_one_class_folder(client, tmp_path):
    data = make_class_folders(tmp_path / "one", classes=("cats",), per_class=3)
    with pytest.raises(AppError, match="need at least 2 class folders"):
        client.predict(str(data), api_name="/scan_folder")


def test_upload_zip_with_one_top_folder(client, app_server, sample_data, tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.rglob("*.jpg"))[::4]:
            z.write(path, "my shapes/" + path.relative_to(sample_data).as_posix())
    summary, counts, gallery, skipped, warnings, ready, path = client.predict(
        handle_file(str(archive)), api_name="/upload_zip"
    )
    assert "3 classes" in summary and "my shapes" in summary
    uploads = app_server.workspace / "uploads"
    assert path.startswith(str(uploads)) and path.endswith("my shapes") and path in summary
    names = [p.name for p in uploads.iterdir()]  # other tests (browser zip upload) share the workspace
    assert Path(path).parent.name in names and not any(n.startswith(".") for n in names), names


def test_upload_bad_zip_is_a_message(client, tmp_path):
    fake = tmp_path / "holiday.zip"
    fake.write_bytes(b"PK but not really a zip")
    with pytest.raises(AppError, match="holiday.zip is not a .zip archive"):
        client.predict(handle_file(str(fake)), api_name="/upload_zip")


def test_upload_traversal_zip_is_refused(client, tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("cats/a.png", b"x")
        z.writestr("../../escape.png", b"x")
    with pytest.raises(AppError, match="refusing entry that leaves the folder"):
        client.predict(handle_file(str(evil)), api_name="/upload_zip")


def test_pick_folder_fills_the_path(client, sample_data):
    # the server's folder browser is rooted at the repository in these tests (--browse-root)
    picked = client.predict([["finetune", "sample_data", "circle"]], api_name="/pick_folder")
    assert picked == str(sample_data / "circle")


# ---------------------------------------------------------------------------------------------
# Train settings


def test_weights_check_names_the_expected_file(client):
    from finetune.model import imagenet_weights_path, weights_available

    note = client.predict("resnet50", "imagenet", None, api_name="/check_weights")
    if weights_available("resnet50", "imagenet")[0]:
        assert note.startswith("Ready: ImageNet weights found")
    else:
        assert "not on this machine" in note and str(imagenet_weights_path("resnet50")) in note
        assert "None: train from scratch" in note and "weights file" in note
    none_note = client.predict("resnet50", "none", None, "all", api_name="/check_weights")
    assert none_note.startswith("Ready: training from scratch") and "Tip" not in none_note
    assert "choose strategy *all*" in client.predict("resnet50", "none", None, "head", api_name="/check_weights")
    if not weights_available("resnet50", "imagenet")[0]:
        assert "not on this machine" in none_note  # said even when None is chosen (it was preselected)
    assert "Upload a `.pth`" in client.predict("resnet34", "file", None, api_name="/check_weights")


def test_strategy_sets_its_learning_rate(client):
    from finetune.config import DEFAULT_LR

    assert client.predict("head", api_name="/strategy_lr") == DEFAULT_LR["head"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(data="/no/such/folder"), "data folder not found"),
        (dict(epochs=0), "Value 0 is less than minimum value 1"),
        (dict(weights="file"), "Upload a weights file"),
    ],
)
def test_start_refuses_bad_settings(client, sample_data, change, message):
    settings = dict(FAST, data=str(sample_data), epochs=1)
    settings.update(change)
    with pytest.raises(AppError, match=message):
        client.predict(
            settings["data"],
            settings["arch"],
            settings["strategy"],
            settings["weights"],
            settings["weights_file"],
            settings["epochs"],
            settings["batch_size"],
            settings["lr"],
            settings["image_size"],
            settings["seed"],
            api_name="/start_training",
        )


# ---------------------------------------------------------------------------------------------
# Training, live


def test_training_streams_progress_curves_and_result(trained):
    run_dir, updates = trained
    assert len(updates) >= 3
    assert any("batch" in status_text(u) and "images/s" in status_text(u) for u in updates)
    progress, loss, acc, log, result, matrix = updates[-1]
    assert "completed" in progress and "width:100%" in progress
    series = {row[2] for row in loss["value"]["data"]}
    assert series == {"train", "val"}
    assert "epoch   1: train loss" in log
    assert "Completed" in result and run_dir.name in result
    assert matrix["visible"] is True  # the matrix appears when the training has ended
    image = matrix["value"]
    assert Path(image if isinstance(image, str) else image["path"]).name == "confusion_matrix.png"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_stop_and_one_training_at_a_time_and_predict_stays_responsive(client, trained, app_server, sample_data):
    run_dir, _ = trained
    before = set(app_server.runs_dir.iterdir())
    train(client, sample_data, epochs=300)
    with pytest.raises(AppError, match="already running"):
        train(client, sample_data, epochs=1)
    follow(client, until=lambda u: "batch" in status_text(u), timeout=120)
    # prediction with the earlier run while the training runs; that the training is still running when
    # the answer comes ("Stopping" below) shows it did not wait for it, on any machine's speed
    label, _ = client.predict(
        str(run_dir), handle_file(str(next(sample_data.glob("circle/*.jpg")))), 3, api_name="/predict_image"
    )
    assert label["label"] in ("circle", "square", "triangle")
    assert "Stopping" in client.predict(api_name="/stop_training")
    updates = follow(client, timeout=120)
    assert "stopped" in status_text(updates[-1])
    assert "kept" in updates[-1][4]
    (stopped,) = set(app_server.runs_dir.iterdir()) - before
    info = json.loads((stopped / "run.json").read_text())
    assert info["status"] == "stopped" and (stopped / "model.pth").is_file()
    assert client.predict(api_name="/stop_training") == "No training is running."


@pytest.mark.slow
def test_failed_training_is_a_message_and_the_app_keeps_working(client, tmp_path, sample_data):
    data = make_class_folders(tmp_path / "one", classes=("cats",), per_class=3)
    train(client, data, epochs=1)
    updates = follow(client, timeout=120)
    progress, result = updates[-1][0], updates[-1][4]
    assert "Training failed: need at least 2 class folders" in progress
    assert "The app still works" in result
    summary = client.predict(str(sample_data), api_name="/scan_folder")[0]
    assert "3 classes" in summary


# ---------------------------------------------------------------------------------------------
# Runs, evaluate


def test_list_runs_newest_first(client, trained, app_server):
    usable = [p for p in app_server.runs_dir.iterdir() if (p / "model.pth").is_file()]
    newest = max(usable, key=lambda p: json.loads((p / "run.json").read_text())["created"] + p.name)
    # every tab (Evaluate, Predict, Export) preselects the newest usable run
    dropdowns = client.predict(None, None, None, api_name="/list_runs")
    assert [d["value"] for d in dropdowns] == [str(newest)] * 3
    labels = [label for label, _ in dropdowns[0]["choices"]]
    assert labels[0].startswith(newest.name) and "val acc" in labels[0]
    # a run a tab already shows stays selected
    run_dir, _ = trained
    assert client.predict(str(run_dir), None, None, api_name="/list_runs")[0]["value"] == str(run_dir)


def test_evaluate_run(client, trained):
    run_dir, _ = trained
    summary, matrix, table, gallery, note, calibration, reliability, curves = client.predict(
        str(run_dir), api_name="/evaluate_run"
    )
    assert run_dir.name in summary and "accuracy" in summary and "top-1" in summary
    assert "**Calibration** on 15 validation images" in calibration and Path(reliability).name == "reliability.png"
    assert Path(matrix).name == "confusion_matrix.png" and Path(curves).name == "training_curves.png"
    assert table["headers"] == ["class", "precision", "recall", "f1", "support"]
    assert [row[0] for row in table["data"]] == ["circle", "square", "triangle"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    wrong = len(metrics["misclassified"])
    assert len(gallery) == min(wrong, 60)
    if wrong:
        first = metrics["misclassified"][0]
        assert gallery[0]["caption"].startswith(f"{first['true']} → {first['predicted']} (")
        assert f"{wrong} of 15" in note
    else:
        assert "correctly" in note


@pytest.mark.parametrize(
    "run, message",
    [
        ("/etc", "not a run in"),
        ("no-such-run", "not a run folder"),
    ],
)
def test_evaluate_errors(client, run, message):
    with pytest.raises(AppError, match=message):
        client.predict(run, api_name="/evaluate_run")


# ---------------------------------------------------------------------------------------------
# Predict


def test_predict_image(client, trained, sample_data):
    run_dir, _ = trained
    label, heatmap = client.predict(
        str(run_dir), handle_file(str(next(sample_data.glob("square/*.jpg")))), 2, api_name="/predict_image"
    )  # no minimum confidence given: 0, an answer
    assert label["label"] in ("circle", "square", "triangle")
    assert len(label["confidences"]) == 2
    assert 0 <= label["confidences"][0]["confidence"] <= 1


def test_predict_image_unknown_why_and_a_refused_format(client, trained, sample_data, tmp_path):
    run_dir, _ = trained
    image = handle_file(str(next(sample_data.glob("circle/*.jpg"))))
    label, heatmap = client.predict(str(run_dir), image, 3, 1.0, True, api_name="/predict_image")
    assert label["label"].startswith("unknown (best guess: ") and label["label"].endswith("%)")
    assert Path(heatmap["value"] if isinstance(heatmap, dict) and "value" in heatmap else heatmap).is_file()
    eps = tmp_path / "drawing.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n(pwned) print\nshowpage\n%%EOF\n")
    with pytest.raises(AppError, match="drawing.eps is not an image this app reads: only JPEG"):
        client.predict(str(run_dir), handle_file(str(eps)), 3, 0.0, False, api_name="/predict_image")


def test_predict_batch_images_and_zip(client, trained, sample_data, tmp_path):
    run_dir, _ = trained
    images = sorted(sample_data.glob("triangle/*.jpg"))[:2]
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.glob("circle/*.jpg"))[:3]:
            z.write(path, "batch/" + path.name)
    table, csv_file = client.predict(
        str(run_dir),
        [handle_file(str(p)) for p in images] + [handle_file(str(archive))],
        3,
        None,
        api_name="/predict_batch",
    )
    assert len(table["data"]) == 5
    assert table["headers"][:4] == ["file", "prediction", "best guess", "confidence"]
    assert table["data"][0][0] == images[0].name and table["data"][2][0].startswith("more.zip/")
    lines = Path(csv_file).read_text().splitlines()
    assert lines[0].startswith("path,prediction,best_guess,confidence") and len(lines) == 6


def test_predict_batch_errors(client, trained, tmp_path):
    run_dir, _ = trained
    note = tmp_path / "notes.txt"
    note.write_text("hello")
    with pytest.raises(AppError, match="Invalid file type"):
        client.predict(str(run_dir), [handle_file(str(note))], 3, None, api_name="/predict_batch")
    fake = tmp_path / "broken.jpg"
    fake.write_text("not really a picture")
    table, csv_file = client.predict(str(run_dir), [handle_file(str(fake))], 3, None, api_name="/predict_batch")
    assert table["data"][0][0] == "broken.jpg" and table["data"][0][1] == "" and table["data"][0][-1]
    with pytest.raises(AppError, match="Drop image files"):
        client.predict(str(run_dir), None, 3, "", api_name="/predict_batch")
    with pytest.raises(AppError, match="folder not found: /no/such/images"):
        client.predict(str(run_dir), None, 3, "/no/such/images", api_name="/predict_batch")


def test_predict_batch_server_folder(client, trained, sample_data):
    run_dir, _ = trained
    table, csv_file = client.predict(str(run_dir), None, 2, str(sample_data / "square"), api_name="/predict_batch")
    assert len(table["data"]) == 24 and table["data"][0][0] == "square_00.jpg"
    assert table["headers"][4] == "top 2"


# ---------------------------------------------------------------------------------------------
# Export


@pytest.mark.slow
def test_export_downloads(client, trained):
    from finetune.rundir import class_indices_json

    run_dir, _ = trained
    classes, model, made = client.predict(str(run_dir), api_name="/export_files")
    assert classes["interactive"] and model["interactive"]  # download buttons enabled with their files
    classes, model = classes["value"], model["value"]
    assert Path(classes).read_bytes() == class_indices_json(["circle", "square", "triangle"]).encode()
    assert Path(classes).read_text() == json.dumps({"0": "circle", "1": "square", "2": "triangle"}, indent=4)
    assert Path(model).stat().st_size == (run_dir / "model.pth").stat().st_size
    files = client.predict(str(run_dir), api_name="/export_torchscript")
    assert any(Path(f).name == "model.torchscript.pt" for f in files)
    files = client.predict(str(run_dir), api_name="/export_onnx")
    assert any(Path(f).name == "model.onnx" for f in files)
    files = client.predict(str(run_dir), api_name="/export_zip")
    zipped = next(Path(f) for f in files if f.endswith(".zip"))
    with zipfile.ZipFile(zipped) as z:
        names = z.namelist()
    assert f"{run_dir.name}/class_indices.json" in names and f"{run_dir.name}/model.pth" in names


def test_no_run_yet_is_a_hint_not_an_error(client):
    assert "No trained run yet" in client.predict(None, api_name="/evaluate_run")[0]
    classes, model, made = client.predict(None, api_name="/export_files")
    assert classes["interactive"] is False and model["interactive"] is False and made is None
    with pytest.raises(AppError, match="no run chosen"):
        client.predict(None, api_name="/export_torchscript")


# ---------------------------------------------------------------------------------------------
# Starting the app: loopback by default, a log-in required beyond it


def run_app(*args, env=None, timeout=60):
    import os
    import subprocess
    import sys

    from conftest import REPO

    full_env = dict(os.environ)
    full_env.pop("FINETUNE_AUTH", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, str(REPO / "app.py"), *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def test_non_loopback_host_without_auth_is_refused():
    result = run_app("--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a log-in" in result.stderr and "--auth" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_auth_is_refused():
    result = run_app("--auth", "nopassword", "--port", "1")
    assert result.returncode != 0 and "--auth must look like user:password" in result.stderr


@pytest.mark.slow
def test_auth_from_the_environment_and_ending_the_app_stops_its_training(tmp_path, sample_data):
    """FINETUNE_AUTH requires a log-in. SIGTERM to the app (a service manager, `kill`) stops its
    training cleanly (status stopped, best model kept) instead of leaving it running on its own."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, free_port

    port = free_port()
    env = dict(os.environ, FINETUNE_AUTH="ada:secret-pass")
    runs_dir = tmp_path / "runs"
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "app.py"),
            "--port",
            str(port),
            "--runs-dir",
            str(runs_dir),
            "--workspace",
            str(tmp_path / "ws"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                client = Client(
                    url, auth=("ada", "secret-pass"), analytics_enabled=False, verbose=False, httpx_kwargs=PATIENT
                )
                break
            except Exception:  # noqa: BLE001 - not answering yet
                assert time.time() < deadline and process.poll() is None, "app did not start"
                time.sleep(0.5)
        with pytest.raises(AuthenticationError):
            Client(url, analytics_enabled=False, verbose=False)  # no log-in: refused
        # guessing: after a few failures, refused (429) before the password is checked, then the
        # right one works once the back-off has passed
        import httpx

        def log_in(password):
            return httpx.post(f"{url}/login", data={"username": "ada", "password": password})

        # guess until the back-off is at least 3 s, so that the right password, tried at once, still
        # meets it on a slow machine (a 1 s lock-out may run out between two requests)
        answers = [log_in(f"guess-{i}") for i in range(5)]
        give_up = time.time() + 30
        while answers[-1].status_code != 429 or int(answers[-1].headers["retry-after"]) < 3:
            assert time.time() < give_up, [answer.status_code for answer in answers]
            time.sleep(0.05)
            answers.append(log_in(f"guess-{len(answers)}"))
        codes = [answer.status_code for answer in answers]
        assert codes[:5] == [400] * 5 and codes.count(400) <= 8, codes
        wait = int(answers[-1].headers["retry-after"])
        assert wait <= 10 and log_in("secret-pass").status_code == 429
        time.sleep(wait + 0.5)
        assert log_in("secret-pass").status_code == 200
        assert "3 classes" in client.predict(api_name="/scan_folder")[0]
        train(client, sample_data, epochs=300)
        follow(client, until=lambda u: "batch" in status_text(u), timeout=120)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        run_dir = next(runs_dir.glob("*/run.json")).parent
        assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
        assert (run_dir / "model.pth").is_file()
    finally:
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------------------------------------
# Hostile input: files never served, limits, host, paths, a training left running


def get(url: str):
    """(status, headers) of a GET."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers
    except urllib.error.HTTPError as problem:
        return problem.code, problem.headers


def file_url(server_url: str, path) -> str:
    from urllib.parse import quote

    return f"{server_url}/gradio_api/file={quote(str(path))}"


def test_zip_riders_are_skipped_and_nothing_of_the_users_is_served(client, app_server, trained, sample_data, tmp_path):
    """A zip with .html/.svg/.js riders: only its images are extracted, the rest is listed as skipped,
    and the server serves nothing from the uploads or the runs folder (only workspace/served)."""
    import httpx

    archive = tmp_path / "riders.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.rglob("*.jpg"))[::5]:
            z.write(path, "riders/" + path.relative_to(sample_data).as_posix())
        z.writestr("riders/index.html", "<script>fetch('/steal?c=' + document.cookie)</script>")
        z.writestr("riders/circle/logo.svg", "<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    summary, counts, gallery, skipped, warnings, ready, path = client.predict(
        handle_file(str(archive)), api_name="/upload_zip"
    )
    root = Path(path)
    named = {row[0]: row[1] for row in skipped["value"]["data"]}
    assert skipped["visible"] and "2 file(s) skipped" in summary
    assert "not an image file" in named["riders/index.html"] and "riders/circle/logo.svg" in named
    on_disk = [p for p in root.parent.rglob("*") if p.is_file()]
    assert on_disk and all(p.suffix == ".jpg" or p.name == ".complete" for p in on_disk)
    # neither the riders (where they would have been), nor the user's images, nor run files are served
    run_dir, _ = trained
    for refused in (
        root / "index.html",
        root / "circle" / "logo.svg",
        next(root.rglob("*.jpg")),
        run_dir / "run.json",
        run_dir / "class_indices.json",
        sample_data / "circle" / "circle_00.jpg",
    ):
        assert get(file_url(app_server.url, refused))[0] == 403, refused
    # what a handler published is served
    status, headers = get(
        file_url(app_server.url, app_server.workspace / "served" / "runs" / run_dir.name / "confusion_matrix.png")
    )
    assert status == 200 and headers["content-type"] == "image/png"
    # an .html posted straight to gradio's upload route is kept in gradio's cache, served only as a download
    uploaded = httpx.post(
        f"{app_server.url}/gradio_api/upload", files={"files": ("page.html", b"<script>alert(1)</script>", "text/html")}
    ).json()[0]
    status, headers = get(file_url(app_server.url, uploaded))
    assert status == 200 and "text/html" not in headers["content-type"]
    assert headers["content-disposition"].startswith("attachment")
    # gradio's cache is the app's own, in the workspace: private, counted in the quota
    assert Path(uploaded).is_relative_to(app_server.workspace / "gradio-cache")


# ---------------------------------------------------------------------------------------------
# Attacks from the user's own browser: DNS rebinding, cross-site requests, the direct API route


def cache_files(app_server) -> set[Path]:
    return {p for p in (app_server.workspace / "gradio-cache").rglob("*") if p.is_file()}


def test_only_the_apps_own_host_names_are_answered(app_server):
    """A page whose DNS name was rebound to 127.0.0.1 reaches the app with its own name as Host."""
    import httpx

    port = app_server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "", "[::1"):
        answer = httpx.get(f"{app_server.url}/config", headers={"Host": host})
        assert answer.status_code == 400 and "Invalid host header" in answer.text, host
        assert "components" not in answer.text
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        "localhost",
        f"[::1]:{port}",
        "[::1]",
        f"LOCALHOST:{port}",
    ):
        assert httpx.get(f"{app_server.url}/config", headers={"Host": host}).status_code == 200, host
    # a script on another page (another port of this machine included) may not read the answers,
    # which gradio's CORS rules would allow it for any localhost page; a link from elsewhere still opens
    for origin in (f"http://localhost:{int(port) + 1}", "http://evil.example", "null"):
        answer = httpx.get(f"{app_server.url}/config", headers={"Origin": origin})
        assert answer.status_code == 403 and "components" not in answer.text, origin
    assert httpx.get(f"{app_server.url}/config", headers={"Origin": app_server.url}).status_code == 200
    assert httpx.get(f"{app_server.url}/", headers={"Referer": "http://evil.example/"}).status_code == 200


def test_a_cross_origin_upload_is_refused_and_writes_nothing(app_server):
    """A multipart POST needs no CORS preflight: a page of another site (or another port of this
    machine) could write into gradio's cache. Same-origin and origin-less uploads still work."""
    import httpx

    url = f"{app_server.url}/gradio_api/upload"
    payload = {"files": ("planted.png", b"\x89PNG not really", "image/png")}
    before = cache_files(app_server)
    port = int(app_server.url.rsplit(":", 1)[1])
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": f"http://evil.example:{port}"},
        {"Origin": "null"},
        {"Origin": f"http://127.0.0.1:{port + 1}"},
        {"Origin": f"http://localhost:{port + 1}"},
        {"Origin": f"file://127.0.0.1:{port}"},
        {"Referer": "http://evil.example/page.html"},
    ):
        answer = httpx.post(url, files=payload, headers=headers)
        assert answer.status_code == 403 and "Cross-origin request refused" in answer.text, headers
    # other state-changing routes are refused the same way: joining the queue runs a handler
    joined = httpx.post(
        f"{app_server.url}/gradio_api/queue/join",
        headers={"Origin": "http://evil.example"},
        json={"data": ["/etc"], "fn_index": 0, "session_hash": "x", "event_data": None},
    )
    assert joined.status_code == 403
    assert cache_files(app_server) == before
    for headers in (
        {"Origin": app_server.url},
        {"Origin": f"http://localhost:{port}"},
        {"Referer": f"{app_server.url}/?view=api"},
        {},
    ):
        answer = httpx.post(url, files=payload, headers=headers)
        assert answer.status_code == 200, (headers, answer.text)
        assert Path(answer.json()[0]).is_relative_to(app_server.workspace / "gradio-cache")


def test_the_direct_run_route_is_closed_and_the_queue_works(app_server, client, sample_data):
    """/gradio_api/run/<name> would run a handler outside the queue and its concurrency limits."""
    import httpx

    for name in ("scan_folder", "predict_batch", "export_zip"):
        answer = httpx.post(f"{app_server.url}/gradio_api/run/{name}", json={"data": [str(sample_data)]})
        assert answer.status_code == 404, (name, answer.text)
    assert "3 classes" in client.predict(str(sample_data), api_name="/scan_folder")[0]


def test_gradio_cache_is_private_and_in_the_workspace(app_server, client, sample_data):
    """Uploads and gradio's copies of what the page shows lie in workspace/gradio-cache (0700), not
    in the shared <temp>/gradio where other users of the machine could read them."""
    import stat

    import httpx

    cache = app_server.workspace / "gradio-cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert stat.S_IMODE(app_server.workspace.stat().st_mode) == 0o700  # made by the app
    uploaded = httpx.post(
        f"{app_server.url}/gradio_api/upload", files={"files": ("mine.png", b"\x89PNG private", "image/png")}
    ).json()[0]
    assert Path(uploaded).is_relative_to(cache) and Path(uploaded).read_bytes() == b"\x89PNG private"
    gallery = client.predict(str(sample_data), api_name="/scan_folder")[2]
    assert gallery and cache_files(app_server)  # thumbnails too (the client downloads them from there)


@pytest.fixture(scope="module")
def elsewhere_app(tmp_path_factory):
    """A second app: started in another working directory (with a `photos` folder in it), with
    --host "" while GRADIO_SERVER_NAME=0.0.0.0, 1 MB uploads, a 0.3 MB workspace quota, and a
    training left running in its runs folder by an earlier app process."""
    import os
    import subprocess
    import sys

    from conftest import REPO, AppServer, free_port

    base = tmp_path_factory.mktemp("elsewhere")
    cwd, runs_dir = base / "cwd", base / "runs"
    make_class_folders(cwd / "photos", classes=("cats", "dogs"), per_class=6, size=(64, 64))
    left = subprocess.Popen(
        [sys.executable, "-c", sleeper(300), "finetune", "train"], start_new_session=True, stdout=subprocess.PIPE
    )
    assert left.stdout is not None and left.stdout.readline() == b"ready\n"  # its SIGINT handler is set
    from finetune.jobs import is_training_process

    while not is_training_process(left.pid):
        time.sleep(0.02)
    run = runs_dir / "20250101-100000-resnet34-head"
    run.mkdir(parents=True)
    (run / "run.json").write_text(
        json.dumps(
            {
                "format": "finetune-run/1",
                "status": "running",
                "pids": [left.pid],
                "host": os.uname().nodename,
                "created": "2025-01-01T10:00:00",
                "arch": "resnet34",
                "strategy": "head",
                "classes": ["a", "b"],
            }
        )
    )
    (run / "events.jsonl").write_text(
        json.dumps({"type": "log", "message": "epoch 7 of a training from before"}) + "\n"
    )
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", GRADIO_SERVER_NAME="0.0.0.0", FINETUNE_HOST="  ")
    env.pop("FINETUNE_AUTH", None)
    log = base / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "app.py"),
                "--host",
                "",
                "--port",
                str(port),
                "--runs-dir",
                "../runs",
                "--workspace",
                "ws",
                "--max-upload-mb",
                "1",
                "--workspace-quota-gb",
                "0.0003",
            ],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = AppServer(f"http://127.0.0.1:{port}", runs_dir, cwd / "ws", log, process)
    server.port, server.cwd, server.left, server.left_run = port, cwd, left, run
    deadline = time.time() + 120
    while "Ctrl-C stops it" not in log.read_text():
        assert process.poll() is None and time.time() < deadline, server.log_tail()
        time.sleep(0.3)
    yield server
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    left.kill()


@pytest.fixture(scope="module")
def elsewhere(elsewhere_app, tmp_path_factory):
    return Client(
        elsewhere_app.url,
        analytics_enabled=False,
        verbose=False,
        httpx_kwargs=PATIENT,
        download_files=str(tmp_path_factory.mktemp("downloads-elsewhere")),
    )


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # LISTEN
                raw = bytes.fromhex(address)
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host order per word
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_empty_host_listens_on_loopback_only_and_says_so(elsewhere_app):
    if not Path("/proc/net/tcp").is_file():
        pytest.skip("no /proc/net/tcp to read the listening sockets from")
    assert listening_addresses(elsewhere_app.port) == {"127.0.0.1"}
    banner = elsewhere_app.log.read_text()
    assert f"listening on 127.0.0.1, port {elsewhere_app.port} (this computer only)" in banner
    assert "0.0.0.0" not in banner and "all interfaces" not in banner
    assert f"following the training still running in {elsewhere_app.left_run}" in banner


def test_upload_size_and_workspace_quota(elsewhere_app, elsewhere, tmp_path):
    import httpx

    big = httpx.post(
        f"{elsewhere_app.url}/gradio_api/upload", files={"files": ("big.zip", b"0" * 1_500_000, "application/zip")}
    )
    assert big.status_code == 413
    # under the upload limit but not within the workspace quota (gradio's cache is in it): refused
    # before gradio writes it
    fits_limit = httpx.post(
        f"{elsewhere_app.url}/gradio_api/upload", files={"files": ("half.zip", b"0" * 500_000, "application/zip")}
    )
    assert fits_limit.status_code == 413 and "The workspace is full: this upload needs" in fits_limit.text
    from PIL import Image

    # an upload that fits, whose extraction would not (BMPs compress to almost nothing in the zip)
    archive = tmp_path / "noise.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in ("cats/a.bmp", "dogs/b.bmp"):
            flat = tmp_path / "flat.bmp"
            Image.new("RGB", (220, 220), (200, 30, 30)).save(flat)
            z.write(flat, name)
    with pytest.raises(AppError, match="The workspace is full: noise.zip needs .* --workspace-quota-gb"):
        elsewhere.predict(handle_file(str(archive)), api_name="/upload_zip")
    assert not any((elsewhere_app.workspace / "uploads").iterdir())


@pytest.mark.slow
def test_a_training_left_running_is_followed_and_stopped_then_a_relative_folder_trains(elsewhere_app, elsewhere):
    """Start-up found the training an earlier app left running: the Train tab follows it, a second
    training is refused, Stop ends it. Then `photos`, relative to the app's working directory, is
    what is scanned and what trains."""
    first = next(iter(elsewhere.submit(api_name="/attach_training")))
    assert "epoch 7 of a training from before" in first[3]
    with pytest.raises(AppError, match="already running \\(20250101-100000-resnet34-head"):
        train(elsewhere, "photos", epochs=1)
    assert "Stopping 20250101-100000-resnet34-head" in elsewhere.predict(api_name="/stop_training")
    elsewhere_app.left.wait(10)
    updates = follow(elsewhere, timeout=60)
    assert "Training failed" in updates[-1][4]
    assert json.loads((elsewhere_app.left_run / "run.json").read_text())["status"] == "failed"

    photos = elsewhere_app.cwd / "photos"
    summary = elsewhere.predict("photos", api_name="/scan_folder")[0]
    assert f"`{photos}`" in summary and "2 classes" in summary
    train(elsewhere, "photos", epochs=1)
    updates = follow(elsewhere, timeout=180)
    assert "completed" in status_text(updates[-1]), updates[-1]
    run = sorted(p for p in elsewhere_app.runs_dir.iterdir() if p != elsewhere_app.left_run)[-1]
    assert json.loads((run / "split.json").read_text())["root"] == str(photos)
    assert json.loads((run / "run.json").read_text())["config"]["data"] == str(photos)

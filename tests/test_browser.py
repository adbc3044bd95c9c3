"""app.py in a real browser: Playwright driving Debian's Chromium headless.

What a first-time user does: the sample data is already chosen, train one short epoch and watch the
curves appear, see the confusion matrix, drop an image and read the label (and why), download
class_indices.json, and stop a training. Every test fails if the page requests anything beyond
127.0.0.1; a screenshot of a failing test is saved in test-artifacts/.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import REPO

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = REPO / "test-artifacts"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture
def page(browser, app_server, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(30_000)
    page = context.new_page()
    outside: list[str] = []

    def record(req):
        scheme = urlparse(req.url).scheme
        host = urlparse(req.url).hostname
        if scheme in ("data", "blob"):
            return
        if host not in LOOPBACK:
            outside.append(req.url)

    page.on("request", record)
    page.goto(app_server.url)
    page.wait_for_selector("#data_summary", state="attached")
    yield page
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed or outside:
        ARTIFACTS.mkdir(exist_ok=True)
        try:
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
        except Exception:  # noqa: BLE001 - a screenshot is a courtesy
            pass
    context.close()
    assert not outside, f"the page made requests beyond 127.0.0.1: {outside}"


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.blur()


def choose(page, elem_id: str, label_text: str) -> None:
    page.locator(f"#{elem_id} label").filter(has_text=label_text).first.click()


def fast_settings(page, epochs: int) -> None:
    """ResNet-18, weights none, the head strategy, 64-pixel images: a training of a few seconds."""
    open_tab(page, "2. Train")
    choose(page, "arch", "ResNet-18")
    choose(page, "weights", "None: train")  # first: choosing None selects strategy all
    choose(page, "strategy", "head: only")
    set_number(page, "epochs", epochs)
    set_number(page, "batch_size", 16)
    set_number(page, "image_size", 64)


def wait_idle(app_server, timeout=120):
    """Wait until no training of an earlier test still runs (the app allows one at a time)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        busy = any(json.loads(p.read_text()).get("status") == "running" for p in app_server.runs_dir.glob("*/run.json"))
        if not busy:
            return
        time.sleep(0.5)


def test_sample_data_is_preselected(page, sample_data):
    summary = page.locator("#data_summary")
    summary.filter(has_text="3 classes").wait_for()
    assert str(sample_data) in summary.inner_text()
    assert page.locator("#data_path textarea, #data_path input").first.input_value() == str(sample_data)
    assert page.locator("#class_thumbs img").count() >= 18
    assert "circle" in page.locator("#class_counts").inner_text()


def test_train_one_epoch_curves_and_confusion_matrix(page, app_server):
    wait_idle(app_server)
    fast_settings(page, epochs=1)
    page.locator("#train_advanced").get_by_text("Advanced", exact=True).click()  # closed until opened
    page.locator("#class_weighted_loss input[type=checkbox]").check()
    page.locator("#train_data").filter(has_text="3 classes").wait_for()
    page.locator("#start_btn").click()
    # the loss curve appears while training (vega line marks), then the result and the matrix
    page.locator("#loss_plot svg path[aria-roledescription='line mark']").first.wait_for(timeout=90_000)
    page.locator("#train_result").filter(has_text="Completed").wait_for(timeout=120_000)
    assert "completed" in page.locator("#train_status_text").inner_text()
    assert page.locator("#acc_plot svg path[aria-roledescription='line mark']").count() >= 1
    page.locator("#train_matrix img").wait_for()
    assert "epoch   1: train loss" in page.locator("#train_log textarea").input_value()
    # the new run is what Predict now uses
    name = page.locator("#train_result").inner_text().split("Completed:")[1].split()[0]
    config = json.loads((app_server.runs_dir / name / "run.json").read_text())["config"]
    assert config["class_weighted_loss"] is True and config["epochs"] == 1  # a setting under Advanced, too
    open_tab(page, "4. Predict")
    page.wait_for_function(
        "name => document.querySelector('#predict_run input')?.value.startsWith(name)", arg=name, timeout=15_000
    )


def test_evaluate_shows_confusion_matrix_and_table(page):
    open_tab(page, "3. Evaluate")
    page.locator("#eval_matrix img").wait_for(timeout=30_000)
    page.locator("#eval_summary").filter(has_text="accuracy").wait_for()
    table = page.locator("#eval_table").inner_text()
    for name in ("circle", "square", "triangle", "precision", "recall"):
        assert name in table
    assert page.locator("#eval_note").inner_text().strip()


def test_drop_an_image_and_read_the_label(page, sample_data):
    open_tab(page, "4. Predict")
    page.wait_for_function("() => document.querySelector('#predict_run input')?.value", timeout=30_000)
    image = next(sample_data.glob("triangle/*.jpg"))
    page.locator("#predict_image input[type=file]").set_input_files(str(image))
    label = page.locator("#predict_label")
    label.filter(has_text=re.compile("circle|square|triangle")).wait_for(timeout=30_000)
    assert re.search(r"\d+%", label.inner_text())
    threshold = re.compile(r"Suggested from validation: 0\.\d\d|no calibration")
    page.locator("#min_conf_note").filter(has_text=threshold).wait_for(timeout=15_000)
    page.locator("#predict_why input").check()  # Why?: the Grad-CAM overlay beside the label
    page.locator("#predict_heatmap img").wait_for(timeout=30_000)


def test_download_class_indices(page):
    open_tab(page, "5. Export")
    button = page.locator("#download_class_indices")
    page.wait_for_function(
        "() => !document.querySelector('#download_class_indices button, button#download_class_indices')?.disabled",
        timeout=30_000,
    )
    with page.expect_download() as download:
        button.click()
    data = Path(download.value.path()).read_bytes()
    assert download.value.suggested_filename == "class_indices.json"
    assert data == json.dumps({"0": "circle", "1": "square", "2": "triangle"}, indent=4).encode()


def test_upload_a_zip(page, sample_data, tmp_path):
    archive = tmp_path / "shapes.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(sample_data.rglob("*.jpg"))[::3]:
            z.write(path, "shapes/" + path.relative_to(sample_data).as_posix())
    page.locator("#zip_upload input[type=file]").set_input_files(str(archive))
    page.locator("#data_summary").filter(has_text="workspace").wait_for(timeout=30_000)
    assert "3 classes" in page.locator("#data_summary").inner_text()
    assert "shapes" in page.locator("#data_path textarea, #data_path input").first.input_value()


def test_hostile_names_are_shown_as_text(page, tmp_path):
    """A folder named like a link and an image, classes named like a web address, LaTeX, code and an
    image: the page shows each name and renders none of them; an error toast shows its HTML as text."""
    from conftest import make_class_folders

    classes = ("www.evil.example", "$$\\Huge X$$", "<img src=x onerror=alert(1)>", "`tick`")
    root = make_class_folders(
        tmp_path / "[Session expired: log in](http:evil.example) <img src=x>", classes=classes, per_class=2
    )
    box = page.locator("#data_path textarea, #data_path input").first
    box.fill(str(root))
    page.locator("#scan_btn").click()
    page.locator("#data_summary").filter(has_text="4 classes").wait_for()
    assert str(root) in page.locator("#data_summary").inner_text()
    open_tab(page, "2. Train")  # its data line is drawn once the tab is open
    page.locator("#train_data").filter(has_text="4 classes").wait_for()
    assert all(name in page.locator("#train_data").inner_text() for name in classes)
    markup = ", ".join(
        f"#{where} {tag}"
        for where in ("data_summary", "data_warnings", "train_data")
        for tag in ("a", "img", "h1", "h2", "h3", ".katex", ".latex-block", "code code")
    )
    assert page.locator(markup).count() == 0
    open_tab(page, "1. Data")
    box.fill("/no/<img src=x onerror=alert(1)>")
    page.locator("#scan_btn").click()
    toast = page.locator(".toast-body").filter(has_text="not found")
    toast.wait_for(timeout=90_000)  # a loaded CI machine took longer than the default 30 s here
    assert "<img src=x onerror=alert(1)>" in toast.inner_text() and toast.locator("img").count() == 0


def test_stop_during_training_and_second_start_says_why(page, app_server):
    wait_idle(app_server)
    fast_settings(page, epochs=300)
    page.locator("#start_btn").click()
    page.locator("#train_status_text").filter(has_text="batch").wait_for(timeout=90_000)
    page.locator("#start_btn").click()
    page.get_by_text(re.compile("already running")).first.wait_for(timeout=15_000)
    page.locator("#stop_btn").click()
    page.locator("#train_result").filter(has_text="Stopped").wait_for(timeout=60_000)
    assert "best model so far was kept" in page.locator("#train_result").inner_text()


def test_label_mode_labels_a_suggested_image(page, app_server, tiny_run, tmp_path):
    """Review → Label new images: a pool and a run, Suggest, the image with one button per class;
    a class button saves an `add` at once and shows the next; Skip saves nothing."""
    import shutil

    from conftest import make_image

    from finetune.curation import default_curation_path, load_curation

    run = Path(shutil.copytree(tiny_run, app_server.runs_dir / "label-mode-run", symlinks=True))
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "created": "2000-01-01T00:00:00"}))  # never the newest
    for i, colour in enumerate([(200, 90, 90), (90, 180, 100), (130, 120, 50)]):  # none a training image
        make_image(tmp_path / "pool" / f"p{i}.png", colour)
    open_tab(page, "1b. Review")
    page.get_by_role("tab", name="Label new images").click()
    page.locator("#label_pool textarea, #label_pool input").first.fill(str(tmp_path / "pool"))
    page.locator("#label_run input").click()
    page.get_by_role("option", name=re.compile("label-mode-run")).click()
    set_number(page, "label_n", 2)
    page.locator("#label_suggest_btn").click()
    page.locator("#label_position").filter(has_text="Image 1 of 2").wait_for(timeout=60_000)
    page.locator("#label_image img").wait_for()
    assert page.locator("#label_class_0").inner_text() == "cats" and page.locator("#label_class_2").count() == 0
    assert "cats" in page.locator("#label_guesses").inner_text()
    page.locator("#label_class_1").click()
    page.locator("#label_position").filter(has_text="Image 2 of 2").wait_for()
    path = default_curation_path(app_server.runs_dir, json.loads((run / "split.json").read_text())["root"])
    [decision] = load_curation(path).decisions
    assert (decision.action, decision.label, decision.pool) == ("add", "dogs", str((tmp_path / "pool").resolve()))
    page.locator("#label_skip").click()
    page.locator("#label_position").filter(has_text="All 2 suggested image(s) seen; 1 decided").wait_for()
    assert len(load_curation(path).decisions) == 1

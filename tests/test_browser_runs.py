"""The Runs tab in a real browser (Playwright driving Debian's Chromium, as tests/test_browser.py):
two trained runs and one named like markup, sorted, compared, one used by the other tabs, one
deleted after a confirmation. Its own app and runs folder: a deletion here touches no other test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO, AppServer, free_port, make_class_folders
from test_browser import ARTIFACTS, LOOPBACK, open_tab

pytestmark = [pytest.mark.browser, pytest.mark.slow]

HOSTILE = "zz-<img src=x onerror=alert(1)>$$\\Huge X$$"


@pytest.fixture(scope="module")
def runs_app(tmp_path_factory):
    """app.py over a runs folder holding "first" (head, 1 epoch), "second" (all, 2 epochs) and a copy of
    "first" named like HTML and LaTeX."""
    from finetune.config import TrainConfig
    from finetune.training import train

    base = tmp_path_factory.mktemp("runs-app")
    data = make_class_folders(base / "photos", per_class=4)
    runs_dir = base / "runs"
    for name, strategy, epochs in (("first", "head", 1), ("second", "all", 2)):
        train(
            TrainConfig(
                data=str(data), runs_dir=str(runs_dir), weights="none", strategy=strategy, epochs=epochs,
                batch_size=4, image_size=32, workers=0, device="cpu", run_name=name,
            )
        )  # fmt: skip
    shutil.copytree(runs_dir / "first", runs_dir / HOSTILE)
    port, log = free_port(), base / "app.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("FINETUNE_AUTH", None)
    command = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--runs-dir", str(runs_dir)]
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*command, "--workspace", str(base / "ws"), "--data", str(data)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = AppServer(f"http://127.0.0.1:{port}", runs_dir, base / "ws", log, process)
    deadline = time.time() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/config", timeout=2):
                break
        except OSError:
            if time.time() > deadline:
                process.kill()
                pytest.fail(f"app.py did not answer within 120 s:\n{server.log_tail()}")
            time.sleep(0.3)
    yield server
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture
def runs_page(browser, runs_app, request):
    from urllib.parse import urlparse

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda req: (
            outside.append(req.url)
            if urlparse(req.url).scheme not in ("data", "blob") and urlparse(req.url).hostname not in LOOPBACK
            else None
        ),
    )
    page.goto(runs_app.url)
    page.wait_for_selector("#data_summary", state="attached")
    open_tab(page, "Runs")
    page.locator("#runs_table").filter(has_text="second").wait_for()
    yield page
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not outside, f"the page made requests beyond 127.0.0.1: {outside}"


# gradio 6 draws a Dataframe's rows as div.virtual-row (its <table> only sizes the columns)
FIRST_CELLS = "#runs_table .virtual-row .body-cell:first-child"


def table_names(page) -> list[str]:
    return [name.strip() for name in page.locator(FIRST_CELLS).all_inner_texts()]


def pick(page, elem_id: str, text: str) -> None:
    """Choose the option of a dropdown that shows `text`."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option").filter(has_text=text).first.click()


def test_table_sorts_and_two_runs_compare(runs_page):
    page = runs_page
    assert table_names(page) == ["second", HOSTILE, "first"]  # newest first (the copy has first's time)
    pick(page, "runs_sort", "name")
    page.wait_for_function(
        "sel => document.querySelector(sel)?.innerText.trim() === 'first'", arg=FIRST_CELLS, polling=100
    )
    assert table_names(page) == ["first", "second", HOSTILE]
    row = page.locator("#runs_table .virtual-row").filter(has_text="second").inner_text()
    assert "resnet34" in row and "2/2" in row and "completed" in row

    page.locator("#runs_compare label").filter(has_text="first").first.click()
    page.locator("#runs_compare_note").filter(has_text="two or more").wait_for()
    page.locator("#runs_compare label").filter(has_text="second").click()
    page.locator("#runs_curves img").wait_for()
    f1 = page.locator("#runs_f1")
    f1.filter(has_text="dogs").wait_for()
    assert all(word in f1.inner_text() for word in ("class", "cats", "first", "second"))
    # the name made of markup is text everywhere it is shown
    page.locator("#runs_compare label").filter(has_text="zz-").click()
    f1.filter(has_text="zz-").wait_for()
    assert HOSTILE in page.locator("#runs_compare").inner_text()
    markup = ", ".join(f"#{where} {tag}" for where in ("runs_table", "runs_compare", "runs_f1", "runs_note")
                       for tag in ("img", ".katex", "h1"))  # fmt: skip
    assert page.locator(markup).count() == 0


def test_use_this_run_then_delete_one_after_a_confirmation(runs_page, runs_app):
    page = runs_page
    pick(page, "runs_run", "first")
    page.locator("#runs_use").click()
    page.locator("#runs_status").filter(has_text="now use").wait_for()
    for tab, run in (("3. Evaluate", "eval_run"), ("4. Predict", "predict_run"), ("5. Export", "export_run")):
        open_tab(page, tab)
        page.wait_for_function(
            "id => document.querySelector(`#${id} input`)?.value.startsWith('first')", arg=run, polling=100
        )
    open_tab(page, "Runs")
    pick(page, "runs_run", "second")
    page.locator("#runs_delete").click()
    page.locator("#runs_confirm_text").filter(has_text="cannot be undone").wait_for()
    assert "second" in page.locator("#runs_confirm_text").inner_text()
    page.locator("#runs_delete_no").click()
    page.locator("#runs_status").filter(has_text="Nothing was deleted").wait_for()
    assert (runs_app.runs_dir / "second" / "model.pth").is_file()
    page.locator("#runs_delete").click()
    page.locator("#runs_delete_yes").click()
    page.locator("#runs_status").filter(has_text="Deleted").wait_for()
    assert not (runs_app.runs_dir / "second").exists() and (runs_app.runs_dir / "first").is_dir()
    page.wait_for_function(
        "sel => ![...document.querySelectorAll(sel)].some(td => td.innerText.trim() === 'second')",
        arg=FIRST_CELLS,
        polling=100,
    )
    assert table_names(page) == [HOSTILE, "first"]
    open_tab(page, "3. Evaluate")  # the Evaluate list no longer offers it
    page.locator("#eval_run input").click()
    options = page.get_by_role("option").all_inner_texts()
    assert options and not any(text.startswith("second") for text in options)

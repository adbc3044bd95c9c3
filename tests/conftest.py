"""Shared fixtures: small generated datasets and paths to the real ones in ../shared/datasets."""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root (to prove a folder was not changed)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_image(path: Path, colour=(200, 30, 30), size=(40, 32), mode="RGB", fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def make_class_folders(root: Path, classes=("cats", "dogs"), per_class=6, size=(40, 32)) -> Path:
    """root/<class>/img_N.png with a distinct colour per class (learnable in a few steps)."""
    palette = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (220, 200, 40), (160, 40, 200)]
    for c, name in enumerate(classes):
        for i in range(per_class):
            shade = tuple(max(0, min(255, v + 6 * i)) for v in palette[c % len(palette)])
            make_image(root / name / f"img_{i}.png", shade, size)
    return root


def every_option_config():
    """A TrainConfig with every command-line option away from its default (round-trip tests)."""
    from finetune.config import TrainConfig, cli_fields

    cfg = TrainConfig(
        data="photos",
        arch="resnet50",
        strategy="last",
        weights="w.pth",
        epochs=2,
        batch_size=3,
        lr=0.02,
        backbone_lr_scale=0.3,
        weight_decay=0.01,
        label_smoothing=0.0,
        warmup_epochs=0.5,
        image_size=64,
        val_fraction=0.3,
        seed=7,
        device="cpu",
        workers=0,
        class_weighted_loss=True,
        early_stopping=2,
        amp=False,
        channels_last=False,
        compile=True,
        cache="off",
        cache_views=3,
        jpeg_decode="workers",
        ema=0.99,
        augment="strong",
        mixup=0.2,
        cutmix=1.0,
        memory_budget_gb=1.5,
        runs_dir="my-runs",
        run_name="n",
        curation="review/curation.json",
        labels="labels.csv",
        report_to="tensorboard,mlflow",  # never trained on: a round trip through the CLI, a config file and the studio
    )
    untested = [f.name for f in cli_fields() if getattr(cfg, f.name) == f.default]
    assert not untested, f"give these options a non-default value in every_option_config: {untested}"
    return cfg


def run_within(seconds: float, call, fifos=()):
    """call() in a thread: its result (or its exception), or a test failure after `seconds` rather
    than a hang; a reader stuck on one of `fifos` is then let go (the FIFO opened for writing)."""
    import threading

    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as error:  # noqa: BLE001 - raised again in the test's thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"still running after {seconds} s (waiting on a FIFO?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")


@pytest.fixture(scope="session", autouse=True)
def torch_threads_per_worker():
    """Under pytest-xdist (`make test`) each worker is a process of its own: torch's threads split the
    cores between the workers, or each would start one per core and they would take turns (slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    return make_class_folders(tmp_path / "tiny")


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """The sample dataset shipped inside the package (finetune/sample_data)."""
    from finetune.paths import sample_data as shipped

    return shipped()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """ONE finished run, trained once per session (per worker under xdist) for the tests that only need a
    run to read, predict with or export: two colours, 32 px, one epoch, weights="none", ResNet-18 (the
    smallest row of the table: what these tests check is the same for every architecture, and its
    exports trace in half the time). Shared, so never written to: a test that writes into a run takes
    its own with copy_run."""
    from finetune.config import TrainConfig
    from finetune.training import train

    base = tmp_path_factory.mktemp("tiny-run")
    data = make_class_folders(base / "photos", per_class=4)
    return train(
        TrainConfig(
            data=str(data),
            runs_dir=str(base / "runs"),
            arch="resnet18",
            weights="none",
            strategy="last",
            epochs=1,
            batch_size=4,
            image_size=32,
            workers=0,
            device="cpu",
            seed=0,
        )
    )


def copy_run(run: Path, into: Path) -> Path:
    """A copy of a run folder (e.g. tiny_run) under `into`, for a test that writes into it."""
    import shutil

    return Path(shutil.copytree(run, into / run.name, symlinks=True))


# ---------------------------------------------------------------------------------------------
# The browser app (app.py), started once per test session on a free loopback port


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    def __init__(self, url: str, runs_dir: Path, workspace: Path, log: Path, process):
        self.url, self.runs_dir, self.workspace, self.log, self.process = url, runs_dir, workspace, log, process

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """`python app.py` on 127.0.0.1:<free port> with its own runs folder and workspace."""
    import subprocess
    import sys
    import time
    import urllib.request

    base = tmp_path_factory.mktemp("app")
    runs_dir, workspace, log = base / "runs", base / "workspace", base / "app.log"
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("FINETUNE_AUTH", None)
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "app.py"),
                "--port",
                str(port),
                "--runs-dir",
                str(runs_dir),
                "--workspace",
                str(workspace),
                "--browse-root",
                str(REPO),
            ],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = AppServer(f"http://127.0.0.1:{port}", runs_dir, workspace, log, process)
    deadline = time.time() + 120
    while True:
        if process.poll() is not None:
            pytest.fail(f"app.py exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/config", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
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


def pytest_collection_modifyitems(config, items):
    """The files with the most slow tests first, each file's tests in their own order. `make test` hands
    whole files to its workers in this order (--dist loadfile --no-loadscope-reorder), so the long files
    start early and the quick ones fill in at the end, rather than one worker running a long file alone
    while the other has finished."""
    del config
    files = [item.nodeid.split("::", 1)[0] for item in items]
    slow = Counter(file for file, item in zip(files, items, strict=True) if item.get_closest_marker("slow"))
    first_seen = {file: index for index, file in enumerate(dict.fromkeys(files))}
    order = {item.nodeid: (-slow[file], first_seen[file]) for file, item in zip(files, items, strict=True)}
    items.sort(key=lambda item: order[item.nodeid])


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can see whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def sleeper(seconds: int) -> str:
    """`python -c` code for a process that sleeps and ends on SIGINT, as a training does, even when the
    suite was started as a background job of a shell (it ignores SIGINT, and children inherit that)."""
    return (
        "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"print('ready', flush=True); time.sleep({seconds})"
    )  # 'ready': a SIGINT sent before the handler is back would be ignored (wait for the line)


# ---------------------------------------------------------------------------------------------
# Notebooks, executed in a real Jupyter kernel (the venv's ipykernel, kernel "python3")


def execute_notebook(nb_or_cells, cwd: Path, timeout: int = 120, env: dict | None = None):
    """Run a notebook top to bottom in a fresh kernel whose working folder is `cwd`; returns the executed
    notebook (outputs in each cell's "outputs"). A failing cell fails the test with its traceback.

    `nb_or_cells`: an nbformat notebook, the path of an .ipynb, or a list of code cells' sources.
    `env`: variables added to this process's environment for the kernel (how a test parameterises a
    notebook that reads them with defaults). `timeout`: seconds per cell."""
    import tempfile

    import nbformat
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    if isinstance(nb_or_cells, (str, Path)):
        nb = nbformat.read(nb_or_cells, as_version=4)
    elif isinstance(nb_or_cells, list):
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in nb_or_cells])
    else:
        nb = nb_or_cells
    # unix sockets in a private folder rather than TCP ports (a short path: a socket's is limited to ~100 bytes)
    with tempfile.TemporaryDirectory(prefix="kernel-") as sockets:
        manager = KernelManager(kernel_name="python3", transport="ipc", ip=str(Path(sockets) / "k"))
        client = NotebookClient(nb, km=manager, timeout=timeout, resources={"metadata": {"path": str(cwd)}})
        # the kernel's environment replaces this one: start from ours so the suite's settings carry over
        client.execute(env={**os.environ, **(env or {})})
    return nb


def notebook_text(nb) -> str:
    """Every stream and text/plain output of an executed notebook, joined (for assertions)."""
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The browser tests' Chromium: one per worker process, here so that every browser test file shares it
# (a fixture imported into a second module is a second session fixture: two sync_playwright()s in one
# thread, and the second refuses to start "inside the asyncio loop" of the first)

CHROMIUM = os.environ.get("FINETUNE_CHROMIUM", "/usr/lib/chromium/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--disable-features=AutofillServerCommunication,OptimizationHints,MediaRouter",
]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium driven by Playwright (skips without either)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set FINETUNE_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

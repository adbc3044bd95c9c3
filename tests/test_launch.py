"""finetune.studio.launch(): the studio started from Python, a script or a notebook.

It never reads sys.argv nor touches signal handlers, changes only what it needs of the process (and
gives it back on close), shows itself inline in Jupyter and through Colab's own proxy in Colab, makes a
share link only with a log-in, and its guard lets in exactly the proxy's and the share link's host.
The share tunnel and Colab are stand-ins here: neither can be reached from a test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import pytest
from conftest import REPO, free_port

PASSWORD = ("ada", "correct-horse")


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port (a bind as the server does it, SO_REUSEADDR, succeeds)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def fetch(url: str, host: str | None = None, origin: str | None = None, method: str = "GET", body: bytes | None = None):
    """(status, text) of one request, with the Host and Origin headers a browser behind a proxy sends."""
    request = urllib.request.Request(url, data=body, method=method)
    if host:
        request.add_header("Host", host)
    if origin:
        request.add_header("Origin", origin)
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Importing the studio, and launch() from a plain script


def test_importing_the_studio_sets_only_gradios_telemetry_switch():
    code = (
        "import os, sys, json; before = dict(os.environ); import finetune.studio; "
        "print(json.dumps({k: os.environ.get(k) for k in set(before) | set(os.environ) "
        "if before.get(k) != os.environ.get(k)}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "GRADIO_"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"GRADIO_ANALYTICS_ENABLED": "False"}


SCRIPT = textwrap.dedent("""
    import json, os, signal, socket, sys, urllib.request
    from ipaddress import ip_address

    outside = []

    def local(host):
        try:
            return host in ("localhost", "") or ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    def audit(event, args):  # every name looked up and every address connected to
        if event == "socket.getaddrinfo" and not local(args[0]):
            outside.append(f"lookup {args[0]}")
        elif event == "socket.connect" and isinstance(args[1], tuple) and not local(args[1][0]):
            outside.append(f"connect {args[1]}")

    sys.addaudithook(audit)
    sys.argv = ["ipykernel_launcher.py", "-f", "/nonexistent/kernel-1234.json"]  # what a kernel has
    sigint, sigterm = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    before = dict(os.environ)
    import finetune.studio
    from PIL import Image
    Image.init()
    openers = set(Image.OPEN)
    studio = finetune.studio.launch(runs_dir=os.environ["T_RUNS"], port=int(os.environ["T_PORT"]))
    with urllib.request.urlopen(studio.url + "/config", timeout=30) as response:
        config = json.loads(response.read())
    report = dict(status=response.status, version=config.get("version"), url=studio.url,
                  same_signals=(signal.getsignal(signal.SIGINT) is sigint
                                and signal.getsignal(signal.SIGTERM) is sigterm),
                  temp_while_running=os.environ.get("GRADIO_TEMP_DIR"), narrowed=len(Image.OPEN) < len(openers),
                  workspace=str(studio.workspace), repr=repr(studio))
    studio.close()
    studio.close()  # twice: nothing more
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", studio.port))  # the port is free again
    report.update(changed=sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
                  openers_back=set(Image.OPEN) == openers, outside=outside, closed_repr=repr(studio))
    print("REPORT " + json.dumps(report))
""")


@pytest.mark.slow
def test_launch_from_a_script_ignores_argv_keeps_signals_stays_offline_and_gives_everything_back(tmp_path):
    """A script (as a kernel: sys.argv with `-f kernel.json`) launches the studio without HF_HUB_OFFLINE or
    any other switch set: /config answers, the signal handlers are the script's, nothing is looked up or
    connected to beyond this machine; close() frees the port and gives back GRADIO_TEMP_DIR and PIL's openers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "GRADIO_", "FINETUNE_"))}
    env.update(T_RUNS=str(tmp_path / "runs"), T_PORT=str(port), PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(out.stdout.split("REPORT ", 1)[1])
    assert report["status"] == 200 and report["version"] and report["url"] == f"http://127.0.0.1:{port}"
    assert report["same_signals"]
    assert report["outside"] == []
    assert report["temp_while_running"] == str(tmp_path / "runs-workspace" / "gradio-cache")
    assert report["workspace"] == str(tmp_path / "runs-workspace")
    assert report["narrowed"] and report["openers_back"]
    # what stays: gradio's telemetry switches (ours at import; huggingface_hub's, set by gradio itself when
    # analytics are off) and torch's own cache variable; never HF_HUB_OFFLINE, GRADIO_TEMP_DIR, a server name
    assert set(report["changed"]) <= {"GRADIO_ANALYTICS_ENABLED", "HF_HUB_DISABLE_TELEMETRY", "TORCHINDUCTOR_CACHE_DIR"}
    assert "running" in report["repr"] and "closed" in report["closed_repr"]
    assert f"open http://127.0.0.1:{port}" in out.stdout and "Stop it with .close()" in out.stdout
    assert port_is_free(port)


# ---------------------------------------------------------------------------------------------
# share=True: only with a log-in, said plainly, the share link's host let in


def test_share_without_a_log_in_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    from finetune.config import FinetuneError
    from finetune.studio import app, launch

    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    with pytest.raises(FinetuneError, match="refusing to make a share link without a log-in") as refused:
        launch(runs_dir=tmp_path / "runs", port=free_port(), share=True)
    assert "\n" not in str(refused.value) and "FINETUNE_AUTH" in str(refused.value)
    assert not (tmp_path / "runs").exists()
    assert app.main(["--share", "--port", "1", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to make a share link without a log-in") and err.count("\n") == 1
    with pytest.raises(FinetuneError, match="auth must be"):
        launch(runs_dir=tmp_path / "runs", share=True, auth=("ada",))
    assert not (tmp_path / "runs").exists()


class FakeTunnel:
    def __init__(self, local_port):
        self.local_port, self.killed = local_port, False

    def kill(self):
        self.killed = True


@pytest.fixture
def fake_share_server(monkeypatch):
    """gradio's share tunnel replaced: setup_tunnel answers a made-up gradio.live address at once."""
    gr = pytest.importorskip("gradio")
    from gradio import networking, tunneling

    calls = []

    def setup_tunnel(local_host, local_port, share_token, share_server_address, share_server_tls_certificate):
        calls.append(FakeTunnel(local_port))
        tunneling.CURRENT_TUNNELS.append(calls[-1])
        return f"https://f00dcafe{local_port}.gradio.live"

    monkeypatch.setattr(networking, "setup_tunnel", setup_tunnel)
    yield calls
    for tunnel in calls:
        if tunnel in tunneling.CURRENT_TUNNELS:
            tunneling.CURRENT_TUNNELS.remove(tunnel)
    assert gr  # gradio was importable


def test_share_with_a_log_in_makes_the_link_lets_its_host_in_and_close_ends_it(
    tmp_path, monkeypatch, capsys, fake_share_server
):
    from gradio import tunneling

    from finetune.studio import launch

    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    port = free_port()
    studio = launch(runs_dir=tmp_path / "runs", port=port, share=True, auth=PASSWORD, inline=False)
    try:
        out = capsys.readouterr().out
        notice = out.index("anyone who has the link")
        assert "The log-in is what protects it" in out and notice < out.index("Finetune Studio is listening")
        share_host = f"f00dcafe{port}.gradio.live"
        assert studio.share_url == f"https://{share_host}" and f"share link: https://{share_host}" in out
        [tunnel] = fake_share_server
        assert tunnel.local_port == port
        # what the tunnel delivers: the share link's host in Host, its page as Origin
        assert fetch(studio.url + "/", host=share_host)[0] == 200  # the log-in page
        assert fetch(studio.url + "/", host=f"other{port}.gradio.live")[0] == 400
        assert fetch(studio.url + "/", host="gradio.live")[0] == 400
        reset = json.dumps({"session_hash": "x"}).encode()
        assert fetch(
            studio.url + "/gradio_api/reset", host=share_host, origin=f"https://{share_host}", method="POST", body=reset
        )[0] not in (400, 403)
        assert (
            fetch(
                studio.url + "/gradio_api/reset",
                host=share_host,
                origin="https://evil.gradio.live",
                method="POST",
                body=reset,
            )[0]
            == 403
        )
    finally:
        studio.close()
    assert tunnel.killed and tunnel not in tunneling.CURRENT_TUNNELS
    assert port_is_free(port)


def test_a_share_link_that_cannot_be_made_is_one_line_and_nothing_keeps_running(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    from gradio import networking

    from finetune.config import FinetuneError
    from finetune.studio import launch

    def unreachable(*args, **kwargs):
        raise RuntimeError("Could not get share link from Gradio API Server.")

    monkeypatch.setattr(networking, "setup_tunnel", unreachable)
    port, temp = free_port(), os.environ.get("GRADIO_TEMP_DIR")
    with pytest.raises(FinetuneError, match="could not make the share link: gradio's share server") as failed:
        launch(runs_dir=tmp_path / "runs", port=port, share=True, auth=PASSWORD, inline=False, quiet=True)
    assert "\n" not in str(failed.value)
    assert port_is_free(port) and os.environ.get("GRADIO_TEMP_DIR") == temp


# ---------------------------------------------------------------------------------------------
# Colab: shown through the kernel's own proxy, whose host alone is let in


class FakeColabShell:
    """What get_ipython() is in Colab, as far as gradio and launch() look (its class's module, a kernel)."""

    kernel = object()

    def __str__(self):
        return "<google.colab._shell.Shell object at 0x7f0>"


@pytest.fixture
def colab(monkeypatch):
    pytest.importorskip("gradio")
    import types

    import IPython
    import IPython.core.getipython
    import IPython.display

    port = free_port()
    proxy = f"https://q1w2e3r4t5y-496ff2e9c6d22116-{port}-colab.googleusercontent.com/"
    asked, shown = [], []
    output = types.ModuleType("google.colab.output")

    def eval_js(script, ignore_result=False, timeout_sec=None):
        asked.append(script)
        return proxy

    output.eval_js = eval_js
    colab_module = types.ModuleType("google.colab")
    colab_module.output = output
    monkeypatch.setitem(sys.modules, "google.colab", colab_module)
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    shell = FakeColabShell()
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.core.getipython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **kw: shown.extend(objects))
    return types.SimpleNamespace(port=port, proxy=proxy, host=proxy[len("https://") : -1], asked=asked, shown=shown)


def test_in_colab_it_shows_through_the_kernels_proxy_and_lets_in_that_host_only(tmp_path, monkeypatch, colab):
    from finetune.studio import launch

    monkeypatch.delenv("FINETUNE_AUTH", raising=False)
    studio = launch(runs_dir=tmp_path / "runs", port=colab.port)
    try:
        assert colab.asked == [f"google.colab.kernel.proxyPort({colab.port})"]
        assert studio.proxy_url == colab.proxy and studio.share_url is None  # gradio's Colab default (share) not taken
        [shown] = colab.shown  # gradio's own Colab display: an iframe of the proxy of our port
        assert type(shown).__name__ == "Javascript"
        assert "google.colab.kernel.proxyPort(port" in shown.data and f"({colab.port}, " in shown.data
        # what Colab's proxy delivers: its host (or, rewritten, localhost) in Host, its page as Origin
        assert fetch(studio.url + "/config", host=colab.host)[0] == 200
        reset = json.dumps({"session_hash": "x"}).encode()
        for host in (colab.host, f"127.0.0.1:{colab.port}"):
            assert fetch(
                studio.url + "/gradio_api/reset", host=host, origin=f"https://{colab.host}", method="POST", body=reset
            )[0] not in (400, 403)
        another_vm = colab.host.replace("q1w2e3r4t5y", "zzzzzzzzzzz")
        another_port = colab.host.replace(f"-{colab.port}-", f"-{colab.port + 1}-")
        for host in (another_vm, another_port, "colab.googleusercontent.com", "x.prod.colab.dev"):
            assert fetch(studio.url + "/config", host=host)[0] == 400, host
            assert (
                fetch(
                    studio.url + "/gradio_api/reset",
                    host=f"127.0.0.1:{colab.port}",
                    origin=f"https://{host}",
                    method="POST",
                    body=reset,
                )[0]
                == 403
            ), host
    finally:
        studio.close()
    assert port_is_free(colab.port)


def test_guard_lets_in_late_names_only_once_known():
    from finetune.studio.guard import AllowedHosts

    link = []
    hosts = AllowedHosts.of(
        "127.0.0.1", 7860, ["abc-496ff2e9c6d22116-7860-colab.googleusercontent.com"], late=lambda: link
    )
    assert hosts.allows("abc-496ff2e9c6d22116-7860-colab.googleusercontent.com")
    assert hosts.allows_origin("https://abc-496ff2e9c6d22116-7860-colab.googleusercontent.com", "127.0.0.1:7860")
    assert not hosts.allows("1234abcd.gradio.live")  # the share link, before gradio has it
    link.append("https://1234abcd.gradio.live")
    assert hosts.allows("1234abcd.gradio.live") and not hosts.allows("gradio.live")
    assert hosts.allows_origin("https://1234abcd.gradio.live", "1234abcd.gradio.live")
    assert not hosts.allows_origin("https://1234abcd.gradio.live.evil.example", "1234abcd.gradio.live")
    assert not hosts.allows("abc-496ff2e9c6d22116-7861-colab.googleusercontent.com")


# ---------------------------------------------------------------------------------------------
# The command: --share, and the same launch


def test_the_command_passes_share_and_its_options_to_launch(monkeypatch, tmp_path):
    from finetune.studio import app

    seen = {}

    class Stub:
        def banner(self, ending):
            return "banner " + ending

        def wait(self):
            seen["waited"] = True

        def close(self):
            seen["closed"] = True

    def fake_launch(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return Stub()

    monkeypatch.setattr(app, "launch", fake_launch)
    monkeypatch.setattr(app.signal, "signal", lambda *a: seen.setdefault("signal", a[0]))
    monkeypatch.setenv("FINETUNE_AUTH", "ada:correct-horse")
    assert app.main(["--share", "--port", "7999", "--runs-dir", str(tmp_path / "r")]) == 0
    assert seen["args"] == (str(tmp_path / "r"), 7999)
    assert seen["kwargs"]["share"] is True and seen["kwargs"]["auth"] == "ada:correct-horse"
    assert seen["kwargs"]["inline"] is False and seen["waited"] and seen["closed"]
    assert app.parse_args([]).share is False


# ---------------------------------------------------------------------------------------------
# In a real Jupyter kernel: launch, fetch, train through the API in the same kernel, close


NOTEBOOK = [
    """import json, os, signal, urllib.request
import finetune, finetune.studio
sigint = signal.getsignal(signal.SIGINT)
studio = finetune.studio.launch(port=int(os.environ["T_PORT"]), runs_dir=os.environ["T_RUNS"])""",
    """with urllib.request.urlopen(studio.url + "/config", timeout=30) as response:
    config = json.loads(response.read())
assert response.status == 200 and config["version"], config
assert signal.getsignal(signal.SIGINT) is sigint  # the kernel's own (its interrupt button)
print("config answered", response.status)""",
    """run = finetune.train(os.environ["T_DATA"], epochs=1, image_size=32, arch="resnet18", weights="none",
                    strategy="all", batch_size=4, device="cpu", workers=0, runs_dir=os.environ["T_RUNS"])
print("trained", run.path)""",
    """studio.close()
print("closed", repr(studio))""",
]


@pytest.mark.slow
def test_the_studio_in_a_jupyter_kernel_shows_inline_answers_trains_beside_it_and_closes(tmp_path):
    pytest.importorskip("nbclient")
    from conftest import execute_notebook, make_class_folders, notebook_text

    port, runs = free_port(), tmp_path / "runs"
    data = make_class_folders(tmp_path / "photos", classes=("cats", "dogs"), per_class=4)
    nb = execute_notebook(
        NOTEBOOK, cwd=tmp_path, timeout=300, env={"T_PORT": str(port), "T_RUNS": str(runs), "T_DATA": str(data)}
    )
    text = notebook_text(nb)
    assert "config answered 200" in text and "closed <Finetune Studio at" in text and "(closed)>" in text
    # shown inline: gradio's iframe of the local address, as a local Jupyter's browser reaches it
    html = [output["data"]["text/html"] for output in nb.cells[0]["outputs"] if "text/html" in output.get("data", {})]
    assert any(f'src="http://127.0.0.1:{port}/"' in page and "<iframe" in page for page in html), nb.cells[0]["outputs"]
    [trained] = [p for p in runs.iterdir() if (p / "run.json").is_file()]
    assert f"trained {trained}" in text and (trained / "model.pth").is_file()
    assert port_is_free(port)


def test_a_port_in_use_is_one_line_and_leaves_nothing_behind(tmp_path):
    pytest.importorskip("gradio")
    from finetune.config import FinetuneError
    from finetune.studio import launch

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port, temp = taken.getsockname()[1], os.environ.get("GRADIO_TEMP_DIR")
        with pytest.raises(FinetuneError, match=f"cannot listen on 127.0.0.1, port {port}: it is in use") as refused:
            launch(runs_dir=tmp_path / "runs", port=port, inline=False, quiet=True)
    assert "\n" not in str(refused.value) and "GRADIO" not in str(refused.value)
    assert os.environ.get("GRADIO_TEMP_DIR") == temp

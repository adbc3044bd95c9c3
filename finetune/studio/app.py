"""Finetune Studio: arguments, launch, and the wiring between the tabs. `main()` is the
`finetune-studio` command (and what `python app.py` runs).

    finetune-studio                      # http://127.0.0.1:7860, sample data preselected
    FINETUNE_AUTH=user:password finetune-studio --host 0.0.0.0
    finetune-studio --runs-dir my-runs --port 7861
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import sys
from pathlib import Path

ALL_INTERFACES = {"0.0.0.0": "all IPv4 interfaces", "::": "all interfaces"}


def build_app(studio):
    import gradio as gr

    from . import data_tab, evaluate_tab, export_tab, predict_tab, review_tab, runs_tab, train_tab
    from .common import bind, latest_runs, refresh_runs, select_trained_run

    with gr.Blocks(title="Finetune Studio", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown(
            "# Finetune Studio\nTeach a ResNet your own image classes: **1. Data** → **2. Train** → "
            "**3. Evaluate** → **4. Predict** → **5. Export**. The sample shapes dataset is already "
            "selected: go to *Train* and press *Start training*. *Review data* finds mislabelled, "
            "duplicated and leaking images before you train. *Runs* compares your runs.",
            elem_id="intro",
        )
        with gr.Tabs(elem_id="tabs"):
            data, review = data_tab.build(studio), review_tab.build(studio)
            train = train_tab.build(studio)
            evaluate, predict, export = evaluate_tab.build(studio), predict_tab.build(studio), export_tab.build(studio)
            runs = runs_tab.build(studio)
        data_tab.wire(studio, data, demo, ready=train.data_ready)
        review_tab.wire(studio, review, data_path=data.path, train_curation=train.settings["curation"])
        followed, weights_inputs = train_tab.wire(studio, train, data_path=data.path)
        # The Train tab's curation file follows the data: the Review tab's file when it has decisions for it.
        suggesting, curation = bind(studio, review_tab.curation_for), train.settings["curation"]
        data.path.change(suggesting, data.path, curation, api_name="suggest_curation", show_progress="hidden")
        demo.load(suggesting, data.path, curation, api_name="initial_curation", show_progress="hidden")
        # ... and its labels file is the Data tab's (typed there or uploaded)
        mirrored = bind(studio, data_tab.same_labels)
        data.labels.change(mirrored, data.labels, train.settings["labels"], api_visibility="private")
        train_tab.wire_page_load(studio, train, demo, weights_inputs)
        evaluate_tab.wire(studio, evaluate)
        predict_tab.wire(studio, predict)
        export_tab.wire(studio, export)

        # The run lists of Evaluate, Predict and Export: refreshed on a tab switch and a page load; after
        # a training, all three switch to the new run.
        run_lists = [evaluate.run, predict.run, export.run]
        refreshing = bind(studio, refresh_runs)
        evaluate.refresh.click(refreshing, run_lists, run_lists, api_name="list_runs")
        for tab in (evaluate.tab, predict.tab, export.tab):
            tab.select(refreshing, run_lists, run_lists, api_visibility="private")
        followed.then(bind(studio, select_trained_run), run_lists, run_lists, api_name="refresh_runs_after_training")
        demo.load(bind(studio, latest_runs), None, run_lists, api_name="initial_runs")
        # The Runs tab: "Use this run" chooses it in all three; a deleted run leaves them.
        runs_deleted = runs_tab.wire(studio, runs)
        runs.use.click(bind(studio, runs_tab.use_run), runs.run, [*run_lists, runs.status], api_name="use_run")
        runs_deleted.then(refreshing, run_lists, run_lists, api_visibility="private")
    return demo


def restrict_image_openers() -> list[str]:
    """In the app's process, PIL may open only the accepted formats (finetune.data.ACCEPTED_FORMATS),
    whoever calls Image.open (gradio, too): every plugin is registered first (Image.init), then the
    others' openers are removed, so an EPS upload never reaches Ghostscript, nor a rare format its
    decoder. Importing finetune.data also sets PIL's pixel limit. Returns the formats removed."""
    from PIL import Image

    from ..data import ACCEPTED_FORMATS

    Image.init()
    removed = sorted(set(Image.OPEN) - set(ACCEPTED_FORMATS))
    for name in removed:  # in place: whoever holds these objects sees the same restriction
        del Image.OPEN[name]
    Image.ID[:] = [name for name in Image.ID if name in ACCEPTED_FORMATS]
    return removed


# ---------------------------------------------------------------------------------------------
# Command line


def normalise_host(text: str | None) -> str:
    """The address to listen on: empty or blank means 127.0.0.1 (never gradio's GRADIO_SERVER_NAME)."""
    host = (text or "").strip()
    return (host[1:-1] if host.startswith("[") and host.endswith("]") else host) or "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def where(host: str, port: int) -> str:
    """The start-up line's account of where the app listens, and the address to open."""
    url_host = f"[{host}]" if ":" in host else host
    if host in ALL_INTERFACES:
        return (
            f"listening on {ALL_INTERFACES[host]} ({host}), port {port}: open http://<this machine's "
            f"address>:{port} (http://127.0.0.1:{port} here)"
        )
    scope = "this computer only" if is_loopback(host) else "this address only"
    return f"listening on {host}, port {port} ({scope}): open http://{url_host}:{port}"


def parse_auth(text: object) -> tuple[str, str] | None:
    """(user, password) of FINETUNE_AUTH / --auth / launch(auth=...) ("user:password" or a pair);
    FinetuneError when it is malformed or the password is short (the back-off slows guessing, it does
    not make a short password safe)."""
    from ..config import FinetuneError
    from .guard import MIN_PASSWORD_LENGTH

    if isinstance(text, (tuple, list)):
        if len(text) != 2 or not all(isinstance(part, str) for part in text):
            raise FinetuneError("auth must be (user, password) or 'user:password'")
        text = f"{text[0]}:{text[1]}" if text[0] and ":" not in text[0] else ":"
    if text is None or text is False or text == "":
        return None
    if not isinstance(text, str):  # a number, bytes, gradio's callable auth: not what finetune checks
        raise FinetuneError("auth must be (user, password) or 'user:password'")
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FinetuneError("--auth must look like user:password (FINETUNE_AUTH too)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise FinetuneError(
            f"the password in FINETUNE_AUTH (or --auth) has {len(password)} characters: use at "
            f"least {MIN_PASSWORD_LENGTH}"
        )
    return user, password


def env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise SystemExit(f"error: {name} must be a number, got {text!r}") from None


# ---------------------------------------------------------------------------------------------
# Starting the studio: launch() for Python and notebooks, and what main() runs


SHARE_NOTICE = (
    "share=True: a public link through gradio's share server (gradio.live) makes this studio reachable "
    "from the internet by anyone who has the link, until the studio is closed (gradio ends a link after "
    "a week at most). The log-in is what protects it: whoever logs in can do all you can here: see the "
    "images of any folder this process can read, train on this machine, download its runs' models and "
    "files, and upload files."
)


def refuse_exposure(host: str, share: bool, auth) -> None:
    """FinetuneError when the studio would be reachable beyond this computer without a log-in."""
    from ..config import FinetuneError

    if share and auth is None:
        raise FinetuneError(
            "refusing to make a share link without a log-in: anyone with the link could train, read "
            "and download here. Set FINETUNE_AUTH=user:password (or auth=(user, password), or "
            "--auth, which `ps` shows to other users)"
        )
    if not is_loopback(host) and auth is None:
        raise FinetuneError(
            f"refusing to listen on {host} without a log-in: anyone who can reach this machine "
            f"could train, read and download here. Set FINETUNE_AUTH=user:password (or --auth, which "
            f"`ps` shows to other users), or use --host 127.0.0.1."
        )


def local_url(host: str, port: int) -> str:
    """The address this machine itself reaches the app at."""
    connect = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{connect}]' if ':' in connect else connect}:{port}"


def first_free_port(host: str, start: int = 7860, tries: int = 100) -> int:
    """The first port from `start` nobody listens on at `host` (gradio's own range)."""
    import errno
    import socket

    from ..config import FinetuneError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in range(start, start + tries):
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is free
            try:
                probe.bind((host, port))
            except OSError as problem:
                if problem.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise FinetuneError(f"cannot listen on {host}: {problem.strerror or problem}") from None
        return port
    raise FinetuneError(f"no free port from {start} to {start + tries - 1} on {host}: pass port=")


def notebook_kind() -> str | None:
    """ "colab", "hosted" (Kaggle, SageMaker: no proxy to the kernel's ports), "jupyter" (a kernel whose
    browser can reach this machine's loopback, as a local Jupyter's can), or None (no notebook: a script,
    a terminal IPython). gradio's own checks."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return None
    from gradio import utils

    if utils.colab_check():
        return "colab"
    return "hosted" if utils.is_hosted_notebook() else "jupyter"


def colab_proxy_url(port: int, timeout: float = 10.0) -> str | None:
    """The https address at which Colab's proxy serves `port` of this kernel's machine to the notebook's
    browser (google.colab.kernel.proxyPort, asked of the browser through the kernel); None when the
    browser does not answer in time (no tab open)."""
    try:
        from google.colab.output import eval_js

        url = eval_js(f"google.colab.kernel.proxyPort({int(port)})", timeout_sec=timeout)
    except Exception:  # noqa: BLE001 - its own timeout and JavaScript errors: no proxy address
        return None
    return url if isinstance(url, str) and url.startswith("https://") else None


class RunningStudio:
    """A studio started by launch(). `url`: its address on this machine (what the kernel itself can fetch);
    `share_url`: the public link (share=True); `proxy_url`: Colab's address of it for the notebook's browser.
    `close()` ends its training and the server and frees the port; `wait()` blocks until Ctrl-C or close().
    Also a context manager (`with finetune.studio.launch() as studio:`)."""

    def __init__(
        self, demo, studio, *, url: str, host: str, port: int, auth: bool, attached, proxy_url: str | None, undo: list
    ):
        self.demo, self.studio, self.url, self.host, self.port = demo, studio, url, host, port
        self.auth, self.attached, self.proxy_url, self._undo = auth, attached, proxy_url, undo
        self.closed = False

    @property
    def share_url(self) -> str | None:
        return getattr(self.demo, "share_url", None)

    @property
    def runs_dir(self) -> Path:
        return self.studio.runs_dir

    @property
    def workspace(self) -> Path:
        return self.studio.workspace.root

    def banner(self, ending: str) -> str:
        lines = [
            (
                f"Finetune Studio is {where(self.host, self.port)} in a browser"
                f"{' (log-in required)' if self.auth else ''}. {ending}"
            ),
            f"  runs: {self.runs_dir}",
            f"  uploads and downloads: {self.workspace}",
        ]
        if self.share_url:
            lines.append(f"  share link: {self.share_url} (log-in required; it ends when the studio closes)")
        if self.proxy_url:
            lines.append(f"  through Colab's proxy: {self.proxy_url}")
        if self.attached:
            lines.append(f"  following the training still running in {self.attached}")
        from ..progress import shown

        return shown("\n".join(lines))  # folder names (a run's, found in the runs folder) must not drive the terminal

    def wait(self) -> None:
        """Block until close() (from another thread) or Ctrl-C; what a script does to keep serving."""
        import time

        try:
            while not self.closed and self.demo.is_running:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass

    def close(self) -> None:
        """End the studio's training (its best model is kept), the share link and the server; give back
        what launch() changed in this process. Safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            self.studio.shutdown()
        finally:
            try:
                from gradio.tunneling import CURRENT_TUNNELS

                # demo.close() leaves gradio's share tunnel running (gradio ends it only at exit)
                for tunnel in [t for t in CURRENT_TUNNELS if getattr(t, "local_port", None) == self.port]:
                    tunnel.kill()
                    CURRENT_TUNNELS.remove(tunnel)
                self.demo.close(verbose=False)
            finally:
                while self._undo:
                    self._undo.pop()()

    def __enter__(self) -> RunningStudio:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "running"
        public = f", share link {self.share_url}" if self.share_url else ""
        return f"<Finetune Studio at {self.url}{public}, runs in {self.runs_dir} ({state})>"

    def _repr_html_(self) -> str:
        from html import escape

        if self.closed:
            return f"<p>Finetune Studio at {escape(self.url)}: closed.</p>"
        links = [
            (self.proxy_url, "through Colab's proxy"),
            (self.share_url, "share link"),
            (self.url, "on this machine"),
        ]
        items = " · ".join(
            f'<a href="{escape(u, quote=True)}" target="_blank">{escape(what)}</a>' for u, what in links if u
        )
        return (
            f"<p><b>Finetune Studio</b> ({items}); runs in <code>{escape(str(self.runs_dir))}</code>. "
            f"<code>.close()</code> stops it.</p>"
        )


def launch(
    runs_dir: str | Path | None = None,
    port: int | None = None,
    share: bool = False,
    auth: str | tuple[str, str] | None = None,
    inline: bool | None = None,
    host: str = "127.0.0.1",
    data: str | Path | None = None,
    *,
    workspace: str | Path | None = None,
    browse_root: str | Path | None = None,
    allowed_hosts=(),
    max_upload_mb: float = 2048,
    workspace_quota_gb: float = 20,
    height: int = 900,
    quiet: bool = False,
) -> RunningStudio:
    """Start the studio in this process, in the background, and return a RunningStudio (`.url`, `.close()`).

    runs_dir: default $FINETUNE_RUNS_DIR, else ./runs; workspace: beside it; data: the folder preselected
    (default: the sample data). port: default the first free one from 7860. host: 127.0.0.1 (this computer
    only); anything else needs a log-in. auth: "user:password" or (user, password); default $FINETUNE_AUTH.
    share=True: also a public gradio.live link (for Kaggle or a remote Jupyter, which have no proxy to this
    machine); refused without a log-in. inline: show the studio in the notebook (None: in Jupyter and
    Colab, through Colab's own proxy there). allowed_hosts: more host names the browser may use (a
    reverse proxy's). Never reads sys.argv and never touches signal handlers; it sets GRADIO_TEMP_DIR
    (gradio's upload cache, in the workspace) and narrows PIL's image openers while it runs, and close()
    gives both back. FinetuneError (one line) for what the user must change."""
    from ..extras import check_installed

    check_installed("gradio")  # found, not imported: gradio is imported once GRADIO_TEMP_DIR is set
    host, port, auth_pair, extra_hosts = _checked_options(host, port, share, auth, allowed_hosts, max_upload_mb)
    if share:
        print(SHARE_NOTICE, flush=True)
    quota = int(workspace_quota_gb * 1e9) if workspace_quota_gb > 0 else None
    studio = _new_studio(runs_dir, workspace, data, browse_root, quota)
    undo: list = []
    demo = None
    try:
        _use_workspace_gradio_cache(studio, undo)
        inline, proxy_url = _notebook_display(port, share, inline, quiet)
        attached = studio.start_up()
        demo = build_app(studio)
        undo.append(_keep_image_openers())
        restrict_image_openers()  # after every import that might register a PIL plugin
        hosts = extra_hosts + ([host_of(proxy_url)] if proxy_url else [])
        _serve(demo, studio, host, port, auth_pair, share, inline, height, max_upload_mb, hosts, quota)
        running = _running(demo, studio, host, port, auth_pair is not None, attached, proxy_url, undo, share)
    except BaseException:
        _abandon_start(studio, demo, undo)
        raise
    _close_at_exit(running, undo)
    if not quiet:
        ending = ("It is shown below. " if inline else "") + "Stop it with .close() on what launch() returned."
        print(running.banner(ending), flush=True)
    return running


def _new_studio(runs_dir, workspace, data, browse_root, quota: int | None):
    """The Studio over runs_dir (default: finetune.paths'), its workspace (default: beside it) and data
    (default: the sample data)."""
    from ..paths import default_runs_dir, default_workspace, sample_data

    runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    workspace = workspace if workspace is not None else default_workspace(runs_dir)

    from .. import data as _engine_data  # noqa: F401 - PIL's pixel limit, before anything decodes
    from .state import Studio

    return Studio(runs_dir, workspace, data if data is not None else sample_data(), browse_root, quota_bytes=quota)


def _running(demo, studio, host: str, port: int, auth: bool, attached, proxy_url, undo: list, share: bool):
    """The RunningStudio for a served demo; FinetuneError when share was asked for and no link came."""
    from ..config import FinetuneError

    url = local_url(host, port)
    running = RunningStudio(
        demo, studio, url=url, host=host, port=port, auth=auth, attached=attached, proxy_url=proxy_url, undo=undo
    )
    if share and not running.share_url:
        raise FinetuneError(
            "could not make the share link: gradio's share server (gradio.live) did not answer (no internet here?)"
        )
    return running


def _abandon_start(studio, demo, undo: list) -> None:
    """What a launch that failed half-way had started, stopped, and what it changed given back."""
    studio.shutdown(attached=False)  # a training it follows (a terminal's) goes on
    if demo is not None:
        demo.close(verbose=False)
    while undo:
        undo.pop()()


def _close_at_exit(running: RunningStudio, undo: list) -> None:
    """The interpreter (the kernel) ending closes the studio, which ends its training too; close()
    itself unregisters that."""
    import atexit

    atexit.register(running.close)
    undo.append(lambda: atexit.unregister(running.close))


def _checked_options(
    host: str, port, share: bool, auth, allowed_hosts, max_upload_mb: float
) -> tuple[str, int, tuple[str, str] | None, list[str]]:
    """launch()'s network options checked before anything starts: the host, the port (the first free one
    when None), the log-in, and the extra host names. One line for each mistake."""
    from ..config import FinetuneError
    from .guard import parse_host_list

    host = normalise_host(host)
    auth_pair = parse_auth(os.environ.get("FINETUNE_AUTH") if auth is None else auth)
    refuse_exposure(host, share, auth_pair)
    try:
        extra_hosts = parse_host_list(allowed_hosts)
    except ValueError as problem:
        raise FinetuneError(f"allowed_hosts: {problem}") from None
    if max_upload_mb <= 0:
        raise FinetuneError("max_upload_mb must be positive")
    if isinstance(port, str) and port.strip().isdigit():  # from an environment variable
        port = int(port)
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535):
        raise FinetuneError(f"port must be a whole number from 1 to 65535, got {port!r}")
    port = first_free_port(host) if port is None else port
    return host, port, auth_pair, extra_hosts


def _use_workspace_gradio_cache(studio, undo: list) -> None:
    """Gradio's cache (uploads, and a copy of every file the page shows or downloads) in the workspace:
    private (0700, not the shared <temp>/gradio), held to the quota, cleaned up with it. Set before
    gradio is imported (some of it reads the variable once, at import) and kept while the studio runs:
    gradio checks every file a request names against it. `undo` gets what gives the variable back."""
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(studio.workspace.gradio_cache)
    undo.append(lambda: _restore_env("GRADIO_TEMP_DIR", previous, str(studio.workspace.gradio_cache)))
    import gradio  # noqa: F401 - the first import, when this is the first studio: with the variable set


def _notebook_display(port: int, share: bool, inline: bool | None, quiet: bool) -> tuple[bool, str | None]:
    """Whether to show the studio in the notebook (None: in Jupyter and Colab), and Colab's proxy address
    for it; says so when the notebook's browser cannot reach it."""
    kind = notebook_kind()
    if inline is None:
        inline = kind in ("colab", "jupyter") or (kind == "hosted" and share)
    if kind == "hosted" and not share and not quiet:
        print(
            "This notebook's browser cannot reach the studio (Kaggle and SageMaker have no proxy to the "
            "kernel's ports): launch(share=True, auth=...) gives it a public link.",
            flush=True,
        )
    proxy_url = colab_proxy_url(port) if kind == "colab" else None
    if kind == "colab" and proxy_url is None and not quiet:
        print(
            "Colab did not say at which address its proxy serves the studio (is the notebook's tab "
            "open?): if the page answers 'Invalid host header', pass that address's host as "
            "allowed_hosts=[...].",
            flush=True,
        )
    return inline, proxy_url


def _serve(
    demo,
    studio,
    host: str,
    port: int,
    auth_pair: tuple[str, str] | None,
    share: bool,
    inline: bool,
    height: int,
    max_upload_mb: float,
    extra_hosts: list[str],
    quota: int | None,
) -> None:
    """demo served in the background behind the studio's guards (allowed hosts, log-in backoff, upload
    room); one line when it cannot listen."""
    import gradio as gr

    from ..config import FinetuneError
    from .views import CSS

    # api_open=False: /gradio_api/run/<name> would run a handler at once, outside the queue and so
    # outside every concurrency_limit; gradio_client and the page go through the queue.
    demo.queue(default_concurrency_limit=1, api_open=False)
    guards = _guards(demo, studio, host, port, auth_pair, extra_hosts, quota)
    try:
        # Served: only the files handlers put in workspace/served (never uploads, data or run folders).
        # share passed always: gradio turns it on by itself in Colab and Kaggle.
        demo.launch(
            server_name=host,
            server_port=port,
            auth=auth_pair,
            share=share,
            inline=inline,
            height=height,
            show_error=True,
            allowed_paths=[str(studio.workspace.served)],
            blocked_paths=[str(studio.workspace.uploads), str(studio.workspace.inputs)],
            max_file_size=int(max_upload_mb * 1e6),
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            css=CSS,
            theme=gr.themes.Default(),
            footer_links=["settings"],
            quiet=True,
            prevent_thread_lock=True,
            inbrowser=False,
            app_kwargs={"middleware": guards},
        )
    except OSError as problem:  # the port is taken (gradio's words name its own options), no such address
        why = "it is in use: choose another (port=, --port)" if "empty port" in str(problem) else problem
        raise FinetuneError(f"cannot listen on {host}, port {port}: {why}") from None


def _guards(demo, studio, host: str, port: int, auth_pair, extra_hosts: list[str], quota: int | None):
    """The studio's middleware: allowed hosts (with the share link's once it is known), log-in backoff
    and, with a quota, upload room."""
    from .guard import AllowedHosts, Backoff, middleware

    hosts = AllowedHosts.of(
        host, port, extra_hosts, late=lambda: [demo.share_url] if getattr(demo, "share_url", None) else []
    )
    return middleware(
        hosts,
        Backoff() if auth_pair else None,
        (lambda need: studio.workspace.check_room(need, "this upload")) if quota else None,
    )


def host_of(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or ""


def _restore_env(name: str, previous: str | None, ours: str) -> None:
    if os.environ.get(name) != ours:
        return  # someone set it since (another studio): theirs now
    if previous is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = previous


def _keep_image_openers():
    """A function that puts PIL's image openers back as they are now (after restrict_image_openers)."""
    from PIL import Image

    Image.init()
    opened, ids = dict(Image.OPEN), list(Image.ID)

    def restore():
        Image.OPEN.update(opened)
        Image.ID[:] = ids

    return restore


def parse_args(argv=None) -> argparse.Namespace:
    from .. import __version__
    from ..paths import default_runs_dir, default_workspace

    parser = argparse.ArgumentParser(
        # argparse names the script: finetune-studio, app.py, or for -m only __main__.py
        prog="python -m finetune.studio" if Path(sys.argv[0]).name == "__main__.py" else None,
        description="Finetune Studio: train and use an image classifier in the browser.",
        epilog="Beyond this computer a log-in is required: set FINETUNE_AUTH=user:password in the environment "
        "(recommended: --auth on the command line is visible to every user of the machine in `ps`).",
    )
    parser.add_argument("--version", action="version", version=f"finetune-studio {__version__}")
    _add_network_arguments(parser)
    _add_folder_arguments(parser)
    args = parser.parse_args(argv)
    args.runs_dir = args.runs_dir or str(default_runs_dir())
    args.workspace = args.workspace or str(default_workspace(args.runs_dir))
    args.host = normalise_host(args.host)
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    from .guard import parse_host_list

    try:
        args.allowed_hosts = parse_host_list(args.allowed_hosts)
    except ValueError as problem:
        parser.error(f"--allowed-hosts (FINETUNE_ALLOWED_HOSTS): {problem}")
    return args


def _add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """--host, --port, --allowed-hosts, --auth, --share: where the studio listens and who may reach it."""
    env = os.environ.get
    parser.add_argument(
        "--host",
        default=env("FINETUNE_HOST", "127.0.0.1"),
        help="address to listen on (also FINETUNE_HOST; default and when empty: 127.0.0.1, this "
        "computer only; 0.0.0.0 = every interface, needs a log-in)",
    )
    parser.add_argument("--port", type=int, default=int(env("FINETUNE_PORT", "7860")))
    parser.add_argument(
        "--allowed-hosts",
        default=env("FINETUNE_ALLOWED_HOSTS", ""),
        metavar="NAMES",
        help="more host names the browser may use to reach the app, comma-separated, e.g. an "
        "HTTPS reverse proxy's (also FINETUNE_ALLOWED_HOSTS; the listening address and "
        "localhost always work)",
    )
    parser.add_argument(
        "--auth",
        default=env("FINETUNE_AUTH"),
        metavar="USER:PASSWORD",
        help="log-in required; prefer the FINETUNE_AUTH environment variable (not shown by `ps`)",
    )
    parser.add_argument(
        "--share",
        action="store_true",
        help="also a public https://….gradio.live link through gradio's share server, for a machine "
        "the browser cannot reach (Kaggle, a remote Jupyter): anyone with the link reaches the "
        "studio while it runs, so a log-in is required (FINETUNE_AUTH)",
    )


def _add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """--runs-dir, --workspace, --data, --browse-root and the upload and workspace limits."""
    from ..paths import sample_data

    env = os.environ.get
    # Folders relative to where the command runs, never to where finetune is installed (finetune.paths).
    parser.add_argument(
        "--runs-dir", default=None, help="where runs are saved and listed (default: $FINETUNE_RUNS_DIR, else ./runs)"
    )
    parser.add_argument(
        "--workspace",
        default=None,
        help="where uploads are extracted and downloads prepared (default: $FINETUNE_WORKSPACE, "
        "else RUNS-workspace beside the runs folder)",
    )
    parser.add_argument(
        "--data",
        default=env("FINETUNE_DATA") or str(sample_data()),
        help="dataset folder preselected in the UI (default: the sample data shipped with finetune)",
    )
    parser.add_argument(
        "--browse-root",
        default=env("FINETUNE_BROWSE_ROOT", str(Path.home())),
        help="top folder of the server folder browser on the Data tab (default: home folder)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=env_number("FINETUNE_MAX_UPLOAD_MB", 2048),
        help="largest file a browser may upload, in MB (also FINETUNE_MAX_UPLOAD_MB; default 2048)",
    )
    parser.add_argument(
        "--workspace-quota-gb",
        type=float,
        default=env_number("FINETUNE_WORKSPACE_QUOTA_GB", 20),
        help="disk the workspace may take, in GB; uploads beyond it are refused (also "
        "FINETUNE_WORKSPACE_QUOTA_GB; default 20; 0 = no limit)",
    )


def main(argv=None) -> int:
    from ..config import FinetuneError
    from ..names import printable

    args = parse_args(argv)
    # the command's own process: whatever gradio falls back to is this host
    os.environ["GRADIO_SERVER_NAME"] = args.host
    try:
        running = launch(
            args.runs_dir,
            args.port,
            share=args.share,
            auth=args.auth,
            inline=False,
            host=args.host,
            data=args.data,
            workspace=args.workspace,
            browse_root=args.browse_root,
            allowed_hosts=args.allowed_hosts,
            max_upload_mb=args.max_upload_mb,
            workspace_quota_gb=args.workspace_quota_gb,
            quiet=True,
        )
    except FinetuneError as problem:
        print(f"error: {printable(str(problem))}", file=sys.stderr)
        return 2
    try:
        # SIGTERM (service managers, `kill`) ends the app like Ctrl-C, and with it its training (kept:
        # the best checkpoint). The command's own: launch() never touches signal handlers.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        print(running.banner("Ctrl-C stops it."), flush=True)
        running.wait()
    except SystemExit:
        pass
    finally:
        running.close()  # ends its training, stops the server thread, so the process can end
    return 0


if __name__ == "__main__":
    sys.exit(main())

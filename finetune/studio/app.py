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

    from . import data_tab, evaluate_tab, export_tab, predict_tab, review_tab, train_tab
    from .common import bind, latest_runs, refresh_runs, select_trained_run

    with gr.Blocks(title="Finetune Studio", delete_cache=(3600, 86400), analytics_enabled=False) as demo:
        gr.Markdown("# Finetune Studio\nTeach a ResNet your own image classes: **1. Data** → **2. Train** → "
                    "**3. Evaluate** → **4. Predict** → **5. Export**. The sample shapes dataset is already "
                    "selected: go to *Train* and press *Start training*. *Review data* finds mislabelled, "
                    "duplicated and leaking images before you train.", elem_id="intro")
        with gr.Tabs(elem_id="tabs"):
            data, review = data_tab.build(studio), review_tab.build(studio)
            train = train_tab.build(studio)
            evaluate, predict, export = evaluate_tab.build(studio), predict_tab.build(studio), export_tab.build(studio)
        data_tab.wire(studio, data, demo, ready=train.data_ready)
        review_tab.wire(studio, review, data_path=data.path, train_curation=train.curation)
        followed, weights_inputs = train_tab.wire(studio, train, data_path=data.path)
        # The Train tab's curation file follows the data: the Review tab's file when it has decisions for it.
        suggesting = bind(studio, review_tab.curation_for)
        data.path.change(suggesting, data.path, train.curation, api_name="suggest_curation", show_progress="hidden")
        demo.load(suggesting, data.path, train.curation, api_name="initial_curation", show_progress="hidden")
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
            tab.select(refreshing, run_lists, run_lists, api_name=False)
        followed.then(bind(studio, select_trained_run), run_lists, run_lists, api_name="refresh_runs_after_training")
        demo.load(bind(studio, latest_runs), None, run_lists, api_name="initial_runs")
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
        return (f"listening on {ALL_INTERFACES[host]} ({host}), port {port}: open http://<this machine's "
                f"address>:{port} (http://127.0.0.1:{port} here)")
    scope = "this computer only" if is_loopback(host) else "this address only"
    return f"listening on {host}, port {port} ({scope}): open http://{url_host}:{port}"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """(user, password) of FINETUNE_AUTH / --auth; FinetuneError when it is malformed or the
    password is short (the back-off slows guessing, it does not make a short password safe)."""
    from ..config import FinetuneError
    from .guard import MIN_PASSWORD_LENGTH

    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FinetuneError("--auth must look like user:password (FINETUNE_AUTH too)")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise FinetuneError(f"the password in FINETUNE_AUTH (or --auth) has {len(password)} characters: use at "
                            f"least {MIN_PASSWORD_LENGTH}")
    return user, password


def env_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        return float(text) if text else default
    except ValueError:
        raise SystemExit(f"error: {name} must be a number, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    from ..paths import default_runs_dir, default_workspace, sample_data

    env = os.environ.get
    parser = argparse.ArgumentParser(
        description="Finetune Studio: train and use an image classifier in the browser.",
        epilog="Beyond this computer a log-in is required: set FINETUNE_AUTH=user:password in the environment "
               "(recommended: --auth on the command line is visible to every user of the machine in `ps`).")
    parser.add_argument("--host", default=env("FINETUNE_HOST", "127.0.0.1"),
                        help="address to listen on (also FINETUNE_HOST; default and when empty: 127.0.0.1, this "
                             "computer only; 0.0.0.0 = every interface, needs a log-in)")
    parser.add_argument("--port", type=int, default=int(env("FINETUNE_PORT", "7860")))
    parser.add_argument("--allowed-hosts", default=env("FINETUNE_ALLOWED_HOSTS", ""), metavar="NAMES",
                        help="more host names the browser may use to reach the app, comma-separated, e.g. an "
                             "HTTPS reverse proxy's (also FINETUNE_ALLOWED_HOSTS; the listening address and "
                             "localhost always work)")
    parser.add_argument("--auth", default=env("FINETUNE_AUTH"), metavar="USER:PASSWORD",
                        help="log-in required; prefer the FINETUNE_AUTH environment variable (not shown by `ps`)")
    # Folders relative to where the command runs, never to where finetune is installed (finetune.paths).
    parser.add_argument("--runs-dir", default=None,
                        help="where runs are saved and listed (default: $FINETUNE_RUNS_DIR, else ./runs)")
    parser.add_argument("--workspace", default=env("FINETUNE_WORKSPACE"),
                        help="where uploads are extracted and downloads prepared (default: $FINETUNE_WORKSPACE, "
                             "else RUNS-workspace beside the runs folder)")
    parser.add_argument("--data", default=env("FINETUNE_DATA") or str(sample_data()),
                        help="dataset folder preselected in the UI (default: the sample data shipped with finetune)")
    parser.add_argument("--browse-root", default=env("FINETUNE_BROWSE_ROOT", str(Path.home())),
                        help="top folder of the server folder browser on the Data tab (default: home folder)")
    parser.add_argument("--max-upload-mb", type=float, default=env_number("FINETUNE_MAX_UPLOAD_MB", 2048),
                        help="largest file a browser may upload, in MB (also FINETUNE_MAX_UPLOAD_MB; default 2048)")
    parser.add_argument("--workspace-quota-gb", type=float, default=env_number("FINETUNE_WORKSPACE_QUOTA_GB", 20),
                        help="disk the workspace may take, in GB; uploads beyond it are refused (also "
                             "FINETUNE_WORKSPACE_QUOTA_GB; default 20; 0 = no limit)")
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


def main(argv=None) -> int:
    from ..config import FinetuneError
    from ..names import printable

    args = parse_args(argv)
    try:
        auth = parse_auth(args.auth)
    except FinetuneError as problem:
        print(f"error: {printable(str(problem))}", file=sys.stderr)
        return 2
    if not is_loopback(args.host) and auth is None:
        print(f"error: refusing to listen on {args.host} without a log-in: anyone who can reach this machine "
              f"could train, read and download here. Set FINETUNE_AUTH=user:password (or --auth, which `ps` "
              f"shows to other users), or use --host 127.0.0.1.", file=sys.stderr)
        return 2
    os.environ["GRADIO_SERVER_NAME"] = args.host  # whatever gradio falls back to is this host too
    from .. import data  # noqa: F401 - PIL's pixel limit, before anything decodes
    from .guard import AllowedHosts, Backoff, middleware
    from .state import Studio

    quota = int(args.workspace_quota_gb * 1e9) if args.workspace_quota_gb > 0 else None
    try:  # a folder that cannot be made (full disk, no permission): one line, not a traceback
        studio = Studio(args.runs_dir, args.workspace, args.data, args.browse_root, quota_bytes=quota)
    except FinetuneError as problem:
        print(f"error: {printable(str(problem))}", file=sys.stderr)
        return 2
    # Gradio's cache (uploads, and a copy of every file the page shows or downloads) in the
    # workspace: private (0700, not the shared <temp>/gradio), held to the quota, cleaned up with
    # it. Set before gradio is imported: some of it reads the variable once, at import.
    os.environ["GRADIO_TEMP_DIR"] = str(studio.workspace.gradio_cache)
    import gradio as gr

    from .views import CSS

    try:
        attached = studio.start_up()
    except FinetuneError as problem:
        print(f"error: {printable(str(problem))}", file=sys.stderr)
        return 2
    demo = build_app(studio)
    restrict_image_openers()  # after every import that might register a PIL plugin
    # api_open=False: /gradio_api/run/<name> would run a handler at once, outside the queue and so
    # outside every concurrency_limit; gradio_client and the page go through the queue.
    demo.queue(default_concurrency_limit=1, api_open=False)
    guards = middleware(AllowedHosts.of(args.host, args.port, args.allowed_hosts), Backoff() if auth else None,
                        (lambda need: studio.workspace.check_room(need, "this upload")) if quota else None)
    try:
        # Served: only the files handlers put in workspace/served (never uploads, data or run folders).
        demo.launch(server_name=args.host, server_port=args.port, auth=auth, share=False, show_error=True,
                    allowed_paths=[str(studio.workspace.served)],
                    blocked_paths=[str(studio.workspace.uploads), str(studio.workspace.inputs)],
                    max_file_size=int(args.max_upload_mb * 1e6), ssr_mode=False, pwa=False, mcp_server=False,
                    enable_monitoring=False, css=CSS, theme=gr.themes.Default(), footer_links=["settings"],
                    quiet=True, prevent_thread_lock=True, app_kwargs={"middleware": guards})
        # SIGTERM (service managers, `kill`) ends the app like Ctrl-C, and with it its training (kept:
        # the best checkpoint). Installed after launch(), which sets handlers of its own.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
        print(f"Finetune Studio is {where(demo.server_name, demo.server_port)} in a browser"
              f"{' (log-in required)' if auth else ''}. Ctrl-C stops it.\n"
              f"  runs: {studio.runs_dir}\n  uploads and downloads: {studio.workspace.root}"
              + (f"\n  following the training still running in {attached}" if attached else ""), flush=True)
        demo.block_thread()
    except SystemExit:
        pass
    finally:
        studio.shutdown()
        demo.close()  # stops the server thread, so the process can end
    return 0


if __name__ == "__main__":
    sys.exit(main())

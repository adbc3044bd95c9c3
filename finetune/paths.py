"""The default folders, the same for the command line, the Python API and the studio.

They never depend on where finetune is installed (a wheel lives in a read-only site-packages):
runs go where the user is, the sample data comes from inside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

RUNS_ENV = "FINETUNE_RUNS_DIR"
WORKSPACE_ENV = "FINETUNE_WORKSPACE"


def default_runs_dir() -> Path:
    """$FINETUNE_RUNS_DIR, else ./runs, as an absolute path (fixed now, so a run.json or a training
    process started elsewhere names the same folder)."""
    return Path(os.environ.get(RUNS_ENV, "").strip() or "runs").expanduser().absolute()


def default_workspace(runs_dir: str | Path | None = None) -> Path:
    """The studio's workspace (uploads, downloads, gradio's cache): beside the runs folder, named after
    it (runs -> runs-workspace), so it is never a folder of the user's such as ~/workspace, whose
    contents would count against the workspace quota. $FINETUNE_WORKSPACE, when set, is used instead."""
    chosen = os.environ.get(WORKSPACE_ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser().absolute()
    runs = Path(runs_dir).expanduser().absolute() if runs_dir is not None else default_runs_dir()
    return runs.parent / f"{runs.name or 'runs'}-workspace"


def sample_data() -> Path:
    """The small sample dataset (three shapes, see finetune.sample) shipped inside the package."""
    return Path(__file__).resolve().parent / "sample_data"

"""The optional parts of finetune and what each needs: `pip install 'finetune-studio[EXTRA]'`.

The core (train, predict, evaluate, TorchScript export, the command line) needs none of these; the
library is imported only where its feature starts, through `require`, so a missing one is a line
saying what to install rather than a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import NamedTuple

from .config import FinetuneError

DISTRIBUTION = "finetune-studio"  # the name on PyPI (`finetune` there is an unrelated library)


class Extra(NamedTuple):
    feature: str  # what needs it, as the sentence's subject
    package: str  # the name pip installs
    extra: str  # the finetune-studio extra that brings it


# By importable top-level module name.
EXTRAS = {
    "gradio": Extra("the studio", "gradio", "studio"),
    "cleanlab": Extra("the data doctor", "cleanlab", "doctor"),
    "pytorch_grad_cam": Extra("Grad-CAM", "grad-cam", "explain"),
    "onnx": Extra("ONNX export", "onnx", "onnx"),
    "fastapi": Extra("finetune serve", "fastapi", "serve"),
    "uvicorn": Extra("finetune serve", "uvicorn", "serve"),
    "python_multipart": Extra("finetune serve", "python-multipart", "serve"),
    "huggingface_hub": Extra("finetune push", "huggingface_hub", "hub"),
    "tensorboard": Extra("--report-to tensorboard", "tensorboard", "tensorboard"),
    "mlflow": Extra("--report-to mlflow", "mlflow", "mlflow"),
    # a local MLflow store (sqlite:///..., the default) needs these beside mlflow-skinny (mlflow brings them)
    "sqlalchemy": Extra("a local MLflow store", "sqlalchemy", "mlflow"),
    "alembic": Extra("a local MLflow store", "alembic", "mlflow"),
}


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def missing_message(module: str) -> str:
    """The one line for an absent optional library, e.g. "the studio needs gradio: pip install
    'finetune-studio[studio]'"."""
    need = EXTRAS[module.partition(".")[0]]
    return f"{need.feature} needs {need.package}: {install_hint(need.extra)}"


def check_installed(module: str) -> None:
    """FinetuneError with `missing_message` when `module` cannot be found, without importing it: for
    gradio, which must be imported only after its environment (GRADIO_TEMP_DIR) is set."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken entry in sys.modules
        found = False
    if not found:
        raise FinetuneError(missing_message(module))


def require(module: str) -> ModuleType:
    """`module` (one of EXTRAS, or a submodule of one) imported, or FinetuneError with one line
    naming the extra to install. Installed but broken (a dependency of its own missing) says so."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if (error.name or "").partition(".")[0] == top:
            raise FinetuneError(missing_message(module)) from None
        need = EXTRAS[top]
        raise FinetuneError(
            f"{need.feature}: {need.package} is installed but cannot be imported ({error}); "
            f"reinstall it: {install_hint(need.extra)}"
        ) from None

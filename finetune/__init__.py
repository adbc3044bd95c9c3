"""finetune: turn a folder of labelled images into a working image classifier.

    import finetune
    run = finetune.train("photos/", epochs=5)      # any TrainConfig field as a keyword
    run.predict(["a.jpg"]); run.evaluate("holdout/"); run.export("onnx"); run.explain("a.jpg")
    run = finetune.load("runs/<name>")              # a run folder, or a classic model.pth
    finetune.scan("photos/"); finetune.doctor("photos/")

See finetune.api. Importing the package is quick: torch loads when a function needs it.
"""

from typing import TYPE_CHECKING

from .api import Model, Run, load, scan
from .config import FinetuneError, TrainConfig

if TYPE_CHECKING:  # for type checkers; at run time finetune.train and finetune.doctor are the callable modules
    from .api import doctor, train

__all__ = ["FinetuneError", "Model", "Run", "TrainConfig", "__version__", "doctor", "load", "scan", "train"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # finetune.train and finetune.doctor are engine modules made callable as the API's functions (see
    # finetune.api.callable_module); imported on first use, since they load torch
    if name in ("train", "doctor"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "train", "doctor"})  # tab completion offers them before their first use

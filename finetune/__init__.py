"""finetune: turn a folder of labelled images into a working image classifier.

    import finetune
    run = finetune.train("photos/", epochs=5)      # any TrainConfig field as a keyword
    run.predict(["a.jpg"]); run.evaluate("holdout/"); run.export("onnx"); run.explain("a.jpg")
    run = finetune.load("runs/<name>")              # a run folder, or a classic model.pth
    finetune.scan("photos/"); finetune.doctor("photos/"); finetune.runs()  # the runs table

See finetune.api. Importing the package is quick: torch loads when a function needs it.
"""

from .api import Model, Run, doctor, load, runs, scan, train
from .config import FinetuneError, TrainConfig

__all__ = ["FinetuneError", "Model", "Run", "TrainConfig", "__version__", "doctor", "load", "runs", "scan", "train"]
__version__ = "0.1.0"

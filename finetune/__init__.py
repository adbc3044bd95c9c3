"""finetune: turn a folder of labelled images into a working image classifier."""

from .config import FinetuneError, TrainConfig

__all__ = ["FinetuneError", "TrainConfig"]
__version__ = "0.1.0"

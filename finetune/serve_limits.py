"""`finetune serve`'s limits: a plain dataclass, light to import, so the CLI's parser takes its
defaults from here without loading FastAPI/starlette into every `finetune --help` (finetune/serve.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .config import FinetuneError


@dataclass(frozen=True)
class ServeLimits:
    max_upload_mb: float = 64.0  # the whole request body, counted as it arrives
    queue_size: int = 256  # decoded images waiting for the model
    max_batch: int = 32
    max_wait_ms: float = 5.0  # how long a batch waits for more images once it has one
    top_k: int = 5
    max_files: int = 64  # images (and other form fields) in one request
    max_connections: int = 128  # open connections and requests in flight (then 503)
    read_timeout_s: float = 20.0  # a request's head, and its body's start, must arrive within this
    min_upload_rate: int = 10_000  # bytes per second a body's deadline grows by, beyond read_timeout_s
    keep_alive_s: int = 5  # an idle connection between requests

    def check(self) -> ServeLimits:
        for field in fields(self):
            value = getattr(self, field.name)
            # nan passes every comparison below; inf overflows sizes and timers
            if isinstance(value, float) and not math.isfinite(value):
                raise FinetuneError(f"{field.name.replace('_', ' ')} must be a finite number, got {value}")
            if field.name == "max_wait_ms":
                if value < 0:
                    raise FinetuneError(f"max wait must be 0 or more milliseconds, got {value}")
            elif value <= 0:
                raise FinetuneError(f"{field.name.replace('_', ' ')} must be positive, got {value}")
        if self.max_files > self.queue_size:  # while the model is busy, all of a request's images wait in the queue
            raise FinetuneError(
                f"max files ({self.max_files}) is more than the queue size ({self.queue_size}): a request with "
                "more images than the queue holds would be refused as busy however often it is retried"
            )
        return self

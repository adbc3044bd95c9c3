"""An exponential moving average of the trained weights (`--ema DECAY`): validated, and saved as the
model when it scores best, in place of the raw weights.

Not torch.optim.swa_utils.AveragedModel: its update_parameters asks `if self.n_averaged == 0`, a
tensor read back to the host every step, which is a sync per step on a GPU (finetune keeps its steps
free of them; tests/test_training.py counts). Here one `_foreach_lerp_` over the floating tensors
(weights and BatchNorm statistics, as timm's ModelEmaV3) and a copy of the integer ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightsEMA:
    """shadow <- decay * shadow + (1 - decay) * live, for every tensor of the module's state."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.live = list(module.state_dict(keep_vars=True).values())  # the module's own tensors
        self.shadow = [t.detach().clone() for t in self.live]
        self._floats = [k for k, t in enumerate(self.live) if t.is_floating_point()]
        self._others = [k for k, t in enumerate(self.live) if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: one fused lerp on the device, no host read."""
        torch._foreach_lerp_(
            [self.shadow[k] for k in self._floats], [self.live[k].detach() for k in self._floats], 1.0 - self.decay
        )
        for k in self._others:
            self.shadow[k].copy_(self.live[k])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The module holds the averaged weights inside the block, its own again after it."""
        with torch.no_grad():
            own = [t.detach().clone() for t in self.live]
            torch._foreach_copy_([t.detach() for t in self.live], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([t.detach() for t in self.live], own)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [t.detach().cpu() for t in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        shadow = state.get("shadow")
        if not isinstance(shadow, list) or len(shadow) != len(self.shadow):
            raise ValueError("its EMA state does not fit this model")
        with torch.no_grad():
            for mine, saved in zip(self.shadow, shadow, strict=True):
                if not isinstance(saved, torch.Tensor) or saved.shape != mine.shape:
                    raise ValueError("its EMA state does not fit this model")
                mine.copy_(saved)

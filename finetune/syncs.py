"""Count host-device synchronisations: the waits that stop the CPU from running ahead of the GPU.

    with count_syncs(device) as syncs:    # every device: the aten ops that make the host wait
        ...
    syncs.count, syncs.by_op

    with cuda_sync_debug() as warned:     # CUDA only: what the CUDA runtime itself reports
        ...
    warned.count

count_syncs sees the ops through a TorchDispatchMode, so it works on the CPU too, where it shows
what would wait on a GPU. Counted, because each one waits for the device on CUDA (and MPS):

* `_local_scalar_dense` (`item`, `is_nonzero` under inference_mode): `.item()`, `bool(t)`,
  `float(t)`, `int(t)`, `if t:`; and `torch.equal`;
* ops whose output size depends on the data (the host must read it first): `nonzero`,
  `masked_select`, `unique`, `repeat_interleave` without `output_size`, and indexing with a boolean
  mask (`x[mask]`, `x[mask] = v`), which becomes `nonzero` inside the kernel (torch's docs say so
  for nonzero, repeat_interleave);
* copies between the host and the device without `non_blocking` (`.cpu()` of a GPU tensor,
  `.to("cuda")` of a host tensor): torch copies them with memcpy_and_sync.

Not counted, as they never wait for a device: reads of the optimizer's step, which torch keeps on
the CPU (unless fused or capturable) so that reading it never waits (`_get_value` in torch.optim),
and what the DataLoader does on the host to fetch a batch (in worker processes on a GPU; in this
thread with workers=0: torchvision's random crop parameters, a cached row's index). Pass the
training device: on a GPU, ops on host tensors are not syncs either.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType

import torch
from torch.optim import optimizer as _optimizer
from torch.utils._python_dispatch import TorchDispatchMode

_DATA_DEPENDENT = frozenset(
    {
        "_local_scalar_dense",
        # under inference_mode the mode sees these before they become _local_scalar_dense
        "item",
        "is_nonzero",
        "equal",  # torch.equal: a Python bool
        "nonzero",
        "masked_select",
        "_unique",
        "_unique2",
        "unique_dim",
        "unique_consecutive",
        "unique_dim_consecutive",
    }
)
_COPIES = frozenset({"_to_copy", "copy_"})
_INDEXING = frozenset({"index", "index_put", "index_put_"})

# torch's warning for set_sync_debug_mode("warn") (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync)
CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"


@dataclass
class Syncs:
    """Syncs seen so far, by aten op name (the counts go on rising while the block runs); `allowed`:
    those made inside the functions given as `allow`, counted apart."""

    by_op: Counter[str] = field(default_factory=Counter)
    allowed: int = 0

    @property
    def count(self) -> int:
        return sum(self.by_op.values())


def _tensors(values) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


def _caller(host_tensor: bool, allowed: frozenset) -> str | None:
    """ "allowed" when an `allow` function is on the stack; "host" for work that never waits for a
    device although it reads a value: the optimizer's host-side step (torch.optim's _get_value), and
    what the DataLoader does to fetch a batch (worker processes on a GPU; host tensors in any case)."""
    frame: FrameType | None = sys._getframe(3)  # above syncing_op and the mode's handler
    while frame is not None:
        if frame.f_code in allowed:
            return "allowed"
        if host_tensor and (
            frame.f_code is _optimizer._get_value.__code__
            or frame.f_globals.get("__name__") == "torch.utils.data.dataloader"
        ):
            return "host"
        frame = frame.f_back
    return None


def _copy_devices(name: str, args, kwargs) -> tuple[torch.device, torch.device] | None:
    """(source, destination) of a blocking copy, None for an asynchronous one."""
    if kwargs.get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]):
        return None
    if name == "_to_copy":
        return args[0].device, torch.device(kwargs.get("device") or args[0].device)
    return args[1].device, args[0].device


def _waits(name: str, args, kwargs, device_type: str | None) -> list[torch.Tensor] | None:
    """The tensors of an op that makes the host wait for `device_type` (any device when None), or None."""
    tensors = list(_tensors(args))
    if name in _COPIES:
        devices = _copy_devices(name, args, kwargs)
        if devices is None or "cpu" not in (devices[0].type, devices[1].type) or devices[0] == devices[1]:
            return None
        return tensors if device_type in (None, *(d.type for d in devices if d.type != "cpu")) else None
    if name in _INDEXING:
        if not any(t.dtype in (torch.bool, torch.uint8) for t in _tensors(args[1:2])):
            return None
    elif name == "repeat_interleave":
        if kwargs.get("output_size") is not None or not tensors:
            return None
    elif name not in _DATA_DEPENDENT:
        return None
    if device_type is not None and not any(t.device.type == device_type for t in tensors):
        return None
    return tensors


def syncing_op(func, args, kwargs, device_type: str | None, allowed: frozenset = frozenset()) -> str | None:
    """The op's name when it makes the host wait ("allowed" inside an allowed function), else None."""
    name = func.overloadpacket.__name__
    tensors = _waits(name, args, kwargs, device_type)
    if tensors is None:
        return None
    caller = _caller(all(t.device.type == "cpu" for t in tensors), allowed)
    if caller == "host":
        return None
    return caller or name


class _Counting(TorchDispatchMode):
    def __init__(self, syncs: Syncs, device_type: str | None, allowed: frozenset):
        super().__init__()
        self.syncs, self.device_type, self.allowed = syncs, device_type, allowed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = syncing_op(func, args, kwargs, self.device_type, self.allowed)
        if name == "allowed":
            self.syncs.allowed += 1
        elif name is not None:
            self.syncs.by_op[name] += 1
        return func(*args, **kwargs)


@contextmanager
def count_syncs(device: torch.device | str | None = None, allow: Iterable[Callable] = ()) -> Iterator[Syncs]:
    """Count the ops in the block that make the host wait for `device` (its type: "cuda" counts every
    GPU; "cpu" counts what would wait if the CPU were a GPU; None: any device). Syncs inside the
    functions in `allow` (e.g. a throttled progress read) go to `.allowed` instead. This thread only:
    DataLoader workers and other threads are not seen."""
    device_type = None if device is None else torch.device(device).type
    syncs = Syncs()
    with _Counting(syncs, device_type, frozenset(function.__code__ for function in allow)):
        yield syncs


@dataclass
class SyncWarnings:
    """CUDA's own sync warnings in the block (torch.cuda.set_sync_debug_mode("warn")), counted as they come."""

    recorded: list[warnings.WarningMessage] = field(default_factory=list)
    active: bool = False  # False off CUDA: nothing was watched

    @property
    def count(self) -> int:
        return sum(CUDA_SYNC_WARNING in str(warning.message) for warning in self.recorded)


@contextmanager
def cuda_sync_debug(device: torch.device | str | None = None) -> Iterator[SyncWarnings]:
    """On CUDA, have torch warn at every synchronising CUDA call in the block and count the warnings
    (the other warnings are passed on when it ends); the previous debug mode comes back after, also
    after an error. A no-op elsewhere.

    The mode is process-wide: syncs in other threads (pin memory) are counted too. torch says not
    every syncing operation warns (torch.distributed's, for one), so count_syncs runs beside it."""
    result = SyncWarnings()
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if not on_cuda:
        yield result
        return
    previous = torch.cuda.get_sync_debug_mode()
    result.active = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            result.recorded = caught  # the list catch_warnings appends to
            warnings.simplefilter("always")  # each one, not once per line
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield result
            finally:
                torch.cuda.set_sync_debug_mode(previous)
    finally:
        others = [warning for warning in result.recorded if CUDA_SYNC_WARNING not in str(warning.message)]
        result.recorded = [warning for warning in result.recorded if CUDA_SYNC_WARNING in str(warning.message)]
        for warning in others:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
